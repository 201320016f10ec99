"""What crosses between the driver and a state's Ray task: the project's value model only.

Every call into the value codec and the IPC message types made for Ray is here, so that
the Ray executor follows the codec wherever it goes. Driver to worker: the context
snapshot as encoded values in the very ``run`` frame a state process gets (the state
function and the TypedContextData classes the snapshot needs are cloudpickled inside it,
in that direction only). Worker to driver: context writes and human-input requests as
IPC frames, and the attempt's end as one encoded value; the driver decodes them with the
bounded decoder and checks their shape, and never unpickles anything a worker made
beyond the ``bytes`` object Ray hands over.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..context import Context
from ..errors import FailureReason, ProtocolError, UnencodableValueError
from ..ipc.codec import DEFAULT_MAX_FRAME, Limits, decode_value, encode_value
from ..ipc.messages import (
    FROM_CHILD,
    FROM_SUPERVISOR,
    ContextWrite,
    HumanInputRequest,
    HumanInputResponse,
    Message,
    Run,
    decode_message,
    encode_message,
)

LIMITS = Limits(max_frame=int(os.environ.get("AGENT_IPC_MAX_FRAME") or DEFAULT_MAX_FRAME))
"""Caps on one value and one frame (``AGENT_IPC_MAX_FRAME``, as between processes)."""

_SLACK = 4096  # room for the frame around one encoded value

_FAILURE_FIELDS: dict[str, tuple[type, ...]] = {
    "kind": (str,), "message": (str,), "traceback": (str,), "exit_code": (int, type(None)),
    "signal": (int, type(None)), "exception_type": (str, type(None)), "details": (dict,),
}
_END_FIELDS: dict[str, tuple[type, ...]] = {
    "pushed": (int,), "frames": (list,), "failure": (dict, type(None)), "log": (bytes,), "usage": (dict,),
}


# --- driver to worker --------------------------------------------------------------------


def encode_snapshot(context: Context) -> tuple[dict[str, bytes], tuple[type, ...], list[str]]:
    """The context as encoded values, the TypedContextData classes they hold, and the keys
    that cannot be encoded (they stay with the driver, as for a state process)."""
    snapshot: dict[str, bytes] = {}
    classes: set[type] = set()
    skipped: list[str] = []
    for key, value in context.to_dict().items():
        try:
            snapshot[key] = encode_value(value, key=key, max_size=LIMITS.max_frame, classes=classes)
        except UnencodableValueError:
            skipped.append(key)
    return snapshot, tuple(classes), skipped


def encode_run(run_id: str, agent_name: str, state_name: str, attempt: int, function: bytes,
               classes: bytes, snapshot: dict[str, bytes]) -> bytes:
    """The attempt for its task: the same ``run`` frame a state process receives."""
    return encode_message(Run(run_id=run_id, agent_name=agent_name, state_name=state_name, attempt=attempt,
                              function=function, classes=classes, context=snapshot, max_frame=LIMITS.max_frame))


def read_run(frame: bytes) -> Run:
    msg = decode_message(frame, LIMITS, FROM_SUPERVISOR)
    if not isinstance(msg, Run):
        raise ProtocolError(f"expected a run message, got {msg.TYPE}")
    return msg


def decode_snapshot(snapshot: dict[str, bytes]) -> dict[str, Any]:
    """The worker's copy of the context (from the trusted driver: modules may be imported)."""
    return {key: decode_value(data, LIMITS, import_modules=True) for key, data in snapshot.items()}


def human_response(request_id: int, answer: str | None, error_type: str | None, error: str | None) -> bytes:
    return encode_message(HumanInputResponse(request_id=request_id, answer=answer, error_type=error_type, error=error))


def read_human_response(frame: bytes) -> HumanInputResponse:
    msg = decode_message(frame, LIMITS, FROM_SUPERVISOR)
    if not isinstance(msg, HumanInputResponse):
        raise ProtocolError(f"expected a human_input_response, got {msg.TYPE}")
    return msg


# --- worker to driver --------------------------------------------------------------------


def write_frame(key: str, value: Any, deleted: bool) -> bytes:
    """One ``set_state`` / ``remove_state``; raises UnencodableValueError in the state."""
    if deleted:
        return encode_message(ContextWrite(key=key, value=None, deleted=True))
    data = encode_value(value, key=key, max_size=LIMITS.max_frame - _SLACK)
    return encode_message(ContextWrite(key=key, value=data, deleted=False))


def human_request(request_id: int, prompt: str, timeout: float | None, default: str | None) -> bytes:
    return encode_message(HumanInputRequest(request_id=request_id, prompt=prompt, timeout=timeout, default=default))


def read_frame(frame: bytes) -> Message:
    """A frame a worker sent: a schema-checked message of the child-to-supervisor kinds."""
    return decode_message(frame, LIMITS, FROM_CHILD)


def read_value(data: bytes) -> Any:
    """A value inside a frame a worker sent (bounded; classes only those already imported)."""
    return decode_value(data, LIMITS)


@dataclass(frozen=True)
class End:
    """How an attempt ended, as its Ray task reported it."""

    result: Any
    failure: FailureReason | None
    pushed: int
    """How many frames the task pushed to the relay before it returned."""
    frames: list[bytes]
    """The frames it had not pushed yet: they come after those."""
    log: bytes
    usage: dict[str, Any]


def encode_end(result: Any, failure: FailureReason | None, pushed: int, frames: list[bytes], log: bytes,
               usage: dict[str, Any]) -> bytes:
    """The task's return value; an unencodable result becomes the attempt's failure."""
    body: dict[str, Any] = {"pushed": pushed, "frames": frames, "failure": None, "log": log, "usage": usage,
                            "result": None}
    if failure is None:
        body["result"] = result
        try:
            return encode_value(body, max_size=LIMITS.max_frame)
        except UnencodableValueError:
            body["result"] = None
            room = LIMITS.max_frame - len(encode_value(body)) - _SLACK
            try:  # again, alone, for an error that speaks of the return value
                encode_value(result, max_size=room)
                raise
            except UnencodableValueError as exc:
                failure = FailureReason(kind="exception", message=f"the state's return value: {exc}",
                                        exception_type=f"agent.errors.{type(exc).__qualname__}")
    body["failure"] = {
        "kind": failure.kind, "message": failure.message, "traceback": failure.traceback,
        "exit_code": failure.exit_code, "signal": failure.signal,
        "exception_type": failure.exception_type, "details": _plain(failure.details),
    }
    return encode_value(body)


def decode_end(data: Any) -> End:
    """Read what a task returned; raises ProtocolError on anything but a well-formed end."""
    if type(data) is not bytes:
        raise ProtocolError(f"the state's Ray task returned a {type(data).__name__}, not bytes")
    body = decode_value(data, LIMITS)
    result = body.pop("result", None) if type(body) is dict else None
    _check_fields(body, _END_FIELDS, "the task's end")
    failure = None
    if body["failure"] is not None:
        _check_fields(body["failure"], _FAILURE_FIELDS, "the task's failure")
        failure = FailureReason(**body["failure"])
        result = None
    if not all(type(frame) is bytes for frame in body["frames"]):
        raise ProtocolError("the task's end: frames holds something other than bytes")
    return End(result=result, failure=failure, pushed=body["pushed"], frames=body["frames"], log=body["log"],
               usage=body["usage"])


def _check_fields(body: Any, fields: dict[str, tuple[type, ...]], what: str) -> None:
    if type(body) is not dict or body.keys() != fields.keys():
        keys = sorted(body) if type(body) is dict else type(body).__name__
        raise ProtocolError(f"{what} has fields {keys}, expected {sorted(fields)}")
    for name, types in fields.items():
        if type(body[name]) not in types:
            raise ProtocolError(f"{what}: {name} is a {type(body[name]).__name__}")


def _plain(details: dict[str, Any]) -> dict[str, Any]:
    """The encodable part of a failure's details (they are informative only)."""
    out = {}
    for key, value in details.items():
        try:
            encode_value(value)
        except UnencodableValueError:
            value = repr(value)
        out[str(key)] = value
    return out
