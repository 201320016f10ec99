"""What crosses between the driver and a state's Ray task: the project's value model only.

Every call into the value model and the IPC message types made for Ray is here, so that
the Ray executor follows the process boundary wherever it goes. Driver to worker: the
context snapshot, encoded as for a state process (:func:`agent.context.encode_snapshot`),
in the very ``run`` frame a state process gets (the
state function and the TypedContextData classes the snapshot needs are cloudpickled
inside it, in that direction only), with the run's context budget. Worker to driver:
context writes and human-input requests as IPC frames, and the attempt's end as one
encoded value; the driver decodes them within the same bounds as a child's frames and
checks their shape, and never unpickles anything a worker made beyond the ``bytes``
object Ray hands over.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from .. import values
from ..context import Context, ContextBudget
from ..errors import (
    FailureReason, ProtocolError, UnencodableValueError, ValueTooLargeError, exception_message, exception_text,
    exception_type_name, reported, traceback_text,
)
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

BOUNDS = values.Bounds(max_frame=values.max_frame_from_env())
"""What a frame and a value may hold (``AGENT_IPC_MAX_FRAME``, as between processes)."""

_SLACK = 4096  # room for the frame around one encoded value

_FAILURE_FIELDS: dict[str, tuple[type, ...]] = {
    "kind": (str,), "message": (str,), "traceback": (str,), "exit_code": (int, type(None)),
    "signal": (int, type(None)), "exception_type": (str, type(None)), "details": (dict,),
}
_END_FIELDS: dict[str, tuple[type, ...]] = {
    "pushed": (int,), "frames": (list,), "failure": (dict, type(None)), "log": (bytes,), "usage": (dict,),
    "not_a_transition": (str,),
}


# --- driver to worker --------------------------------------------------------------------


def encode_run(run_id: str, agent_name: str, state_name: str, attempt: int, function: bytes,
               classes: bytes, snapshot: dict[str, bytes], context: Context) -> bytes:
    """The attempt for its task: the same ``run`` frame a state process receives."""
    budget = context.budget
    return encode_message(Run(run_id=run_id, agent_name=agent_name, state_name=state_name, attempt=attempt,
                              function=function, classes=classes, context=snapshot, max_frame=BOUNDS.max_frame,
                              context_budget=budget.limit, context_bytes=budget.used,
                              failures=context.failed_states()))


def read_run(frame: bytes) -> Run:
    msg = decode_message(frame, BOUNDS, FROM_SUPERVISOR)
    if not isinstance(msg, Run):
        raise ProtocolError(f"expected a run message, got {msg.TYPE}")
    return msg


def decode_snapshot(run: Run) -> tuple[dict[str, Any], ContextBudget]:
    """The worker's copy of the context and the run's budget (from the trusted driver:
    modules may be imported)."""
    snapshot, sizes = {}, {}
    for key, data in run.context.items():
        decoded = values.decode(data, BOUNDS, import_modules=True)
        snapshot[key] = decoded.value
        sizes[key] = values.entry_size(key, decoded.size)
    return snapshot, ContextBudget(run.context_budget, max(run.context_bytes, sum(sizes.values())), sizes)


def human_response(request_id: int, answer: str | None, error_type: str | None, error: str | None) -> bytes:
    return encode_message(HumanInputResponse(request_id=request_id, answer=answer, error_type=error_type, error=error))


def read_human_response(frame: bytes) -> HumanInputResponse:
    msg = decode_message(frame, BOUNDS, FROM_SUPERVISOR)
    if not isinstance(msg, HumanInputResponse):
        raise ProtocolError(f"expected a human_input_response, got {msg.TYPE}")
    return msg


# --- worker to driver --------------------------------------------------------------------


def write_frame(key: str, value: Any, deleted: bool) -> bytes:
    """One ``set_state`` / ``remove_state`` (``Context.set_state`` has checked the value and
    the run's budget)."""
    return encode_message(ContextWrite(key=key, value=None if deleted else value, deleted=deleted))


def human_request(request_id: int, prompt: str, timeout: float | None, default: str | None, *,
                  question: int = 0, attempt: int = 1, rejected: str | None = None,
                  left: float | None = None) -> bytes:
    return encode_message(HumanInputRequest(request_id=request_id, prompt=prompt, timeout=timeout, default=default,
                                            question=question, attempt=attempt, rejected=rejected, left=left))


def read_frame(frame: bytes) -> Message:
    """A frame a worker sent: a schema-checked message of the child-to-supervisor kinds, its
    value decoded within bounds (TypedContextData classes only those already imported)."""
    return decode_message(frame, BOUNDS, FROM_CHILD)


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
    """The task's return value; a result outside the model becomes the attempt's failure."""
    body: dict[str, Any] = {"pushed": pushed, "frames": frames, "failure": None, "log": log, "usage": usage,
                            "not_a_transition": "", "result": None}
    if failure is None:
        result = values.plain_names(result)
        try:
            size = values.check(result, "the state's return value", BOUNDS)
            if size > BOUNDS.max_frame - _SLACK:
                raise ValueTooLargeError(
                    f"the state's return value encodes to {size:,} bytes, over the {BOUNDS.max_frame:,}-byte "
                    "limit of one message: keep large data in a file and return a state name"
                )
            body["result"] = result
            return values.encode(body)
        except UnencodableValueError as exc:  # as a state process reports it: its name, its traceback
            problem = values.transition_problem(result)
            if problem is not None:  # no transition either: refused by the driver for that, as inline
                body["not_a_transition"] = problem
                return values.encode(body)
            if type(exc) is UnencodableValueError:  # names no state has: refused as unknown, as inline
                body["result"] = values.names_as_text(result)
                return values.encode(body)
            failure = FailureReason(
                kind="exception", message=exception_message(type(exc).__name__, exception_text(exc)),
                exception_type=exception_type_name(type(exc)), traceback=traceback_text(exc))
    body["failure"] = {
        "kind": failure.kind, "message": failure.message, "traceback": failure.traceback,
        "exit_code": failure.exit_code, "signal": failure.signal,
        "exception_type": failure.exception_type, "details": _plain(failure.details),
    }
    return values.encode(body)


def decode_end(data: Any) -> End:
    """Read what a task returned; raises ProtocolError on anything but a well-formed end."""
    if type(data) is not bytes:
        raise ProtocolError(f"the state's Ray task returned a {type(data).__name__}, not bytes")
    body, _ = values.unpack(data, BOUNDS, framed=True)  # the result sits one level down
    result = body.pop("result", None) if type(body) is dict else None
    _check_fields(body, _END_FIELDS, "the task's end")
    failure = None
    if body["failure"] is not None:
        _check_fields(body["failure"], _FAILURE_FIELDS, "the task's failure")
        failure = FailureReason(**body["failure"])
        if type(failure.message) is str and type(failure.traceback) is str:
            failure = replace(failure, message=reported(failure.message),
                              traceback=reported(failure.traceback, tail=True))
        result = None
    elif body["not_a_transition"]:
        result = values.NotATransition(reported(body["not_a_transition"]))
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
            values.check(value)
        except UnencodableValueError:
            value = repr(value)
        out[str(key)] = value
    return out
