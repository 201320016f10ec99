"""Message types between the supervisor and a state child, and their wire form.

Every frame is a msgpack map ``{"v": PROTOCOL_VERSION, "t": <type>, <fields>...}`` in
the value model's wire form (:func:`agent.values.encode`), so context values travel
inline and a frame is decoded, and its values checked, in one bounded pass
(:func:`agent.values.unpack`, within the receiving side's :class:`~agent.values.Bounds`).
The map is then checked against the dataclass it names: exactly its fields, each of its
declared type (:func:`agent.values.checker`, worked out once per field). A field named
``value`` comes last, so its size on the wire is the frame's less what precedes it
(:func:`value_size`).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

from ..errors import ProtocolError
from ..values import Bounds, checker, encode, short_repr, unpack

_VALUE_KEY = len(encode("value"))

PROTOCOL_VERSION = 5


@dataclass(frozen=True)
class Hello:
    """Child to supervisor, first frame: the child is up.

    ``secret`` names the attempt; the supervisor believes it only from the process the
    zygote forked for that attempt (the connection's ``SO_PEERCRED`` pid), and from then
    on binds the attempt to that connection alone.
    """

    TYPE: ClassVar[str] = "hello"
    pid: int
    secret: bytes


@dataclass(frozen=True)
class Run:
    """Supervisor to child: the state function and the context snapshot.

    ``function`` and ``classes`` (the TypedContextData classes the snapshot holds, so the
    child can rebuild them even when their module cannot be imported) are cloudpickled:
    this direction only, from the supervisor, which the child trusts. Each context value
    is encoded on its own (:func:`agent.values.encode`), so the child decodes it once
    those classes are loaded. ``context_bytes`` is what the run's context takes of its
    ``context_budget`` at launch. ``failures`` are the run's states that failed for good so
    far, with why (``context.failed_states()`` under ``on_failure="continue"``).
    """

    TYPE: ClassVar[str] = "run"
    run_id: str
    agent_name: str
    state_name: str
    attempt: int
    function: bytes
    classes: bytes
    context: dict[str, bytes]
    max_frame: int
    context_budget: int
    context_bytes: int
    failures: dict[str, str]


@dataclass(frozen=True)
class Welcome:
    """Supervisor to child, once its hello was believed: the connection is the attempt's.

    A child that got its ``run`` with its spec starts the state at once, and may finish
    before the supervisor reads its hello; it keeps its connection open until this comes,
    so that the connection's peer credentials can still be read when the hello is.
    """

    TYPE: ClassVar[str] = "welcome"


@dataclass(frozen=True)
class ContextWrite:
    """Child to supervisor: one ``set_state``, or a ``remove_state`` (value None)."""

    TYPE: ClassVar[str] = "context_write"
    key: str
    deleted: bool
    value: Any


@dataclass(frozen=True)
class Result:
    """Child to supervisor: what the state returned. For a value that cannot cross and is no
    transition either, ``not_a_transition`` says why (:func:`agent.values.transition_problem`)
    and the value stays behind: the engine refuses it as it refuses any non-name."""

    TYPE: ClassVar[str] = "result"
    not_a_transition: str = field(default="", kw_only=True)  # before the value: value_size wants it last
    value: Any


@dataclass(frozen=True)
class Error:
    """Child to supervisor: the state raised."""

    TYPE: ClassVar[str] = "error"
    exception_type: str
    message: str
    traceback: str


@dataclass(frozen=True)
class Log:
    """Child to supervisor: a line for the supervisor's log."""

    TYPE: ClassVar[str] = "log"
    level: str
    message: str


@dataclass(frozen=True)
class HumanInputRequest:
    """Child to supervisor: ask a human (the validator stays in the child).

    ``question`` numbers the state's question; asked again after the child rejected an
    answer, it keeps its number, with ``attempt`` one higher and ``rejected`` saying why,
    so that the human sees one question asked again, as from an inline state.
    """

    TYPE: ClassVar[str] = "human_input_request"
    request_id: int
    prompt: str
    timeout: float | None
    default: str | None
    question: int = 0
    attempt: int = 1
    rejected: str | None = None
    left: float | None = None  # seconds left of ``timeout`` (a re-ask); None: all of it


@dataclass(frozen=True)
class HumanInputResponse:
    """Supervisor to child: the answer, or the error (type name and message) to raise."""

    TYPE: ClassVar[str] = "human_input_response"
    request_id: int
    answer: str | None
    error_type: str | None
    error: str | None


@dataclass(frozen=True)
class CoordinationRequest:
    """Child to supervisor: the state's code takes (``take``) or gives back (``give_back``) a
    coordination primitive: ``kind`` ``mutex`` (made on first use, with ``ttl``) or
    ``allocation`` (``amount`` of a QUOTA or SEMAPHORE). ``owner`` None: the attempt, or,
    for a ``task`` other than 0, that task the state started (an owner of its own).
    A give-back names the take's ``request_id`` and is not answered."""

    TYPE: ClassVar[str] = "coordination_request"
    request_id: int
    op: str
    kind: str
    name: str
    owner: str | None
    task: int
    amount: float
    ttl: float | None
    timeout: float | None


@dataclass(frozen=True)
class CoordinationResponse:
    """Supervisor to child: the take is granted (no error), or the error to raise."""

    TYPE: ClassVar[str] = "coordination_response"
    request_id: int
    error_type: str | None
    error: str | None


@dataclass(frozen=True)
class Preempt:
    """Supervisor to child: stop now, keep your writes, you will be run again."""

    TYPE: ClassVar[str] = "preempt"
    reason: str


@dataclass(frozen=True)
class Cancel:
    """Supervisor to child: stop now (timeout or cancellation)."""

    TYPE: ClassVar[str] = "cancel"
    reason: str


@dataclass(frozen=True)
class CheckpointSnapshot:
    """Child to supervisor, on preemption: the keys this attempt wrote so far."""

    TYPE: ClassVar[str] = "checkpoint_snapshot"
    keys: list[str]


Message = Union[
    Hello, Run, Welcome, ContextWrite, Result, Error, Log, HumanInputRequest, HumanInputResponse,
    CoordinationRequest, CoordinationResponse, Preempt, Cancel, CheckpointSnapshot,
]

FROM_CHILD: frozenset[type] = frozenset(
    {Hello, ContextWrite, Result, Error, Log, HumanInputRequest, CoordinationRequest, CheckpointSnapshot}
)
FROM_SUPERVISOR: frozenset[type] = frozenset(
    {Run, Welcome, HumanInputResponse, CoordinationResponse, Preempt, Cancel}
)

_TYPES: dict[str, type] = {cls.TYPE: cls for cls in FROM_CHILD | FROM_SUPERVISOR}
_SCHEMAS: dict[type, dict[str, Any]] = {
    cls: {f.name: typing.get_type_hints(cls)[f.name] for f in dataclasses.fields(cls)}
    for cls in _TYPES.values()
}
_FIELD_CHECKS: dict[type, tuple[tuple[str, Any, Any], ...]] = {
    cls: tuple((name, tp, checker(tp)) for name, tp in schema.items()) for cls, schema in _SCHEMAS.items()
}


def encode_message(msg: Message) -> bytes:
    """The wire form of ``msg``."""
    body = {"v": PROTOCOL_VERSION, "t": msg.TYPE}
    for name in _SCHEMAS[type(msg)]:
        body[name] = getattr(msg, name)
    return encode(body)


def decode_message(frame: bytes | memoryview, bounds: Bounds, allowed: frozenset[type] | None = None) -> Message:
    """Unpack and validate one frame; raises :class:`ProtocolError` on anything wrong
    (:class:`~agent.errors.BoundExceededError` past a bound)."""
    return decode_counted(frame, bounds, allowed)[0]


def decode_counted(
    frame: bytes | memoryview, bounds: Bounds, allowed: frozenset[type] | None = None, *, import_modules: bool = False
) -> tuple[Message, int]:
    """:func:`decode_message`, and how many objects decoding the frame made. ``import_modules``:
    a typed value's module may be imported to find its class (a trusted sender's data)."""
    body, objects = unpack(frame, bounds, framed=True, import_modules=import_modules)
    if type(body) is not dict:
        raise ProtocolError(f"frame is a msgpack {type(body).__name__}, not a map")
    # What an error quotes of a frame is cut short: a frame may be megabytes of anything.
    version = body.pop("v", None)
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {short_repr(version)} is not {PROTOCOL_VERSION}: the child runs another "
            "version of the framework"
        )
    kind = body.pop("t", None)
    cls = _TYPES.get(kind) if type(kind) is str else None
    if cls is None or (allowed is not None and cls not in allowed):
        raise ProtocolError(f"message type {short_repr(kind)} is not allowed here")
    schema = _SCHEMAS[cls]
    if body.keys() != schema.keys():
        fields = sorted(short_repr(k) for k in list(body)[:20]) + (["..."] if len(body) > 20 else [])
        raise ProtocolError(f"{cls.TYPE} message has fields {', '.join(fields)}, expected {sorted(schema)}")
    for name, tp, check in _FIELD_CHECKS[cls]:
        value = body[name]
        if not check(value):
            raise ProtocolError(f"{cls.TYPE}.{name} is a {type(value).__name__}, not {tp}")
    return cls(**body), objects


def value_size(msg: ContextWrite | Result, frame_size: int) -> int:
    """The wire size of ``msg.value`` in a frame of ``frame_size`` bytes.

    Exact for a frame :func:`encode_message` made (the value last); for any other, at
    least the value's own size, as the fields before it take at least what they take here.
    """
    body = {"v": PROTOCOL_VERSION, "t": msg.TYPE}
    body.update((name, getattr(msg, name)) for name in _SCHEMAS[type(msg)] if name != "value")
    return frame_size - len(encode(body)) - _VALUE_KEY
