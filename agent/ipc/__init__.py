"""The process boundary: message types, the safe value codec and the ZeroMQ channel.

This package imports nothing of the framework but its error tree and
``TypedContextData`` (for the codec), so both sides of the boundary can use it.
"""

from .codec import DEFAULT_MAX_FRAME, Limits, decode_value, encode_value
from .messages import (
    FROM_CHILD,
    FROM_SUPERVISOR,
    PROTOCOL_VERSION,
    Cancel,
    CheckpointSnapshot,
    ContextWrite,
    Error,
    Hello,
    HumanInputRequest,
    HumanInputResponse,
    Log,
    Message,
    Preempt,
    Result,
    Run,
    decode_message,
    encode_message,
)
from .transport import MemoryTransport, Transport
from .zmtp import DealerTransport

__all__ = [
    "DEFAULT_MAX_FRAME", "FROM_CHILD", "FROM_SUPERVISOR", "PROTOCOL_VERSION", "Cancel",
    "CheckpointSnapshot", "ContextWrite", "DealerTransport", "Error", "Hello",
    "HumanInputRequest", "HumanInputResponse", "Limits", "Log", "MemoryTransport", "Message",
    "Preempt", "Result", "Run", "Transport", "decode_message", "decode_value",
    "encode_message", "encode_value",
]
