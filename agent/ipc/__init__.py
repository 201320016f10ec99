"""The process boundary: message types and the ZeroMQ channel.

This package imports nothing of the framework but its error tree and the value model
(:mod:`agent.values`, which encodes what frames carry), so both sides of the boundary can
use it.
"""

from .messages import (
    FROM_CHILD,
    FROM_SUPERVISOR,
    PROTOCOL_VERSION,
    Cancel,
    CheckpointSnapshot,
    ContextWrite,
    CoordinationRequest,
    CoordinationResponse,
    Error,
    Hello,
    HumanInputRequest,
    HumanInputResponse,
    Log,
    Message,
    Preempt,
    Result,
    Run,
    Welcome,
    decode_message,
    encode_message,
)
from .transport import MemoryTransport, Transport
from .zmtp import DealerTransport

__all__ = [
    "FROM_CHILD", "FROM_SUPERVISOR", "PROTOCOL_VERSION", "Cancel", "CheckpointSnapshot",
    "ContextWrite", "CoordinationRequest", "CoordinationResponse", "DealerTransport", "Error", "Hello",
    "HumanInputRequest",
    "HumanInputResponse", "Log", "MemoryTransport", "Message", "Preempt", "Result", "Run",
    "Transport", "Welcome", "decode_message", "encode_message",
]
