"""What ``add_state`` builds: state specs, dependency graph checks, and what each state can return.

Everything here is checked or computed before a run starts (or, for the return graph,
the first time a run has more than one branch), so a run never meets a malformed state.

What a state can return is read from its code: the string constants in its ``return``
statements (``return "next"``, ``return ["a", "b"]``, ``return "a" if x else "b"``),
from the source when it is available and from the bytecode otherwise. A state that
returns anything else (a variable, a call, an f-string) counts as able to return any
state, unless ``add_state(..., next_states=[...])`` declares its targets. The engine
uses this to decide whether a name returned by one branch can start at once or must
wait for a sibling that could still return it (DESIGN.md item 3).
"""

from __future__ import annotations

import ast
import dis
import functools
import inspect
import linecache
import textwrap
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from . import _validate, values
from ._types import Priority, ResourceType
from .dependencies import DependencyConfig, DependencyType
from .errors import (
    DependencyCycleError,
    DuplicateStateError,
    InvalidConfigurationError,
    InvalidStateFunctionError,
    ResourceRequestError,
    UnknownStateError,
    WorkflowDefinitionError,
)
from .executor import Isolation, parse_isolation
from .resources import MIN_MEMORY_MB, ResourceRequirements
from .retry import RetryPolicy
from .scope import check_context_keys
from .state import StateMetadata

ON_FAILURE: Final = ("fail", "continue")
"""What a state's permanent failure does to the run: fail it (default), or end only its branch."""


@dataclass(slots=True, init=False)
class StateSpec:
    """A state as added to an agent."""

    name: str
    func: Callable[..., Any]
    dependencies: dict[str, DependencyConfig] = field(default_factory=dict)
    resources: ResourceRequirements | None = None
    retry_policy: RetryPolicy | None = None
    max_retries: int | None = None
    isolation: Isolation | None = None
    timeout: float | None = None
    priority: Priority = Priority.NORMAL
    next_states: frozenset[str] | None = None
    on_failure: str | None = None
    context_keys: tuple[str, ...] | None = None
    """Keys (and ``"prefix*"`` patterns) the state may read and write; None: see :mod:`agent.scope`."""

    # Written out rather than generated: compiled (setup.py), it is native code.
    def __init__(
        self,
        name: str,
        func: Callable[..., Any],
        dependencies: dict[str, DependencyConfig] | None = None,
        resources: ResourceRequirements | None = None,
        retry_policy: RetryPolicy | None = None,
        max_retries: int | None = None,
        isolation: Isolation | None = None,
        timeout: float | None = None,
        priority: Priority = Priority.NORMAL,
        next_states: frozenset[str] | None = None,
        on_failure: str | None = None,
        context_keys: tuple[str, ...] | None = None,
    ) -> None:
        self.name = name
        self.func = func
        self.dependencies = {} if dependencies is None else dependencies
        self.resources = resources
        self.retry_policy = retry_policy
        self.max_retries = max_retries
        self.isolation = isolation
        self.timeout = timeout
        self.priority = priority
        self.next_states = next_states
        self.on_failure = on_failure
        self.context_keys = context_keys

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickling and copying: compiled (setup.py), the class cannot be made without its
        # constructor's arguments, so it says how to make it again.
        return (StateSpec, (self.name, self.func, self.dependencies, self.resources, self.retry_policy,
                            self.max_retries, self.isolation, self.timeout, self.priority, self.next_states,
                            self.on_failure, self.context_keys))

    def max_retries_with(self, default_policy: RetryPolicy | None) -> int:
        """Retries after the first attempt: add_state(max_retries), else the state's policy, else the agent's."""
        if self.max_retries is not None:
            return self.max_retries
        policy = self.retry_policy or default_policy
        return 0 if policy is None else policy.max_retries

    @property
    def effective_timeout(self) -> float | None:
        if self.timeout is not None:
            return self.timeout
        return self.resources.timeout if self.resources is not None else None


_NORMAL: Final = Priority.NORMAL
_CONFINED: Final = frozenset((Isolation.PROCESS, Isolation.WORKER, Isolation.SANDBOX))  # levels with a cgroup
_Requirements: Final = ResourceRequirements  # a Final name is a C static here, not a global's lookup
_SURELY_SHORT: Final = _validate.MAX_STATE_NAME_BYTES // 4  # characters: at most 4 UTF-8 bytes each


def check_on_failure(value: Any, where: str) -> str | None:
    if value is None or value in ON_FAILURE:
        return value  # type: ignore[no-any-return]
    raise InvalidConfigurationError(f"{where}: on_failure must be 'fail' or 'continue', got {value!r}")


def new_spec(agent: Any, name: Any, func: Any, dependencies: Any, resources: Any, retry_policy: Any,
             max_retries: Any, isolation: Any, timeout: Any, priority: Any, next_states: Any, on_failure: Any,
             context_keys: Any) -> StateSpec:
    """``agent.add_state(...)``'s arguments checked, as the spec they describe.

    Raises the typed error for the first bad one (``agent`` gives the states added so far,
    its name for messages, and its pool, which checks ``resources``). The arguments are
    untyped here on purpose: this module is compiled (setup.py), and compiled code would
    answer a wrong type with a bare ``TypeError`` before these checks could name it.
    """
    if type(name) is not str or not 0 < len(name) <= _SURELY_SHORT or not name.isascii():  # else surely valid
        _validate.state_name(name, error=WorkflowDefinitionError)
    if name in agent._states:
        raise DuplicateStateError(f"state {name!r} is already added to agent {agent.name!r}: use another name")
    check_state_function(name, func)
    deps = parse_dependencies(name, dependencies) if dependencies is not None else {}
    if resources is not None:
        if not isinstance(resources, _Requirements):
            raise InvalidConfigurationError(
                f"state {name!r}: resources must be a ResourceRequirements, got {type(resources).__name__}"
            )
        agent.resource_pool.check_request(resources, name)
    if retry_policy is not None and not isinstance(retry_policy, RetryPolicy):
        raise InvalidConfigurationError(
            f"state {name!r}: retry_policy must be a RetryPolicy, got {type(retry_policy).__name__}"
        )
    if max_retries is not None:
        _validate.integer(max_retries, f"state {name!r}: max_retries", error=InvalidConfigurationError, none=True)
    if timeout is not None:
        _validate.number(timeout, f"state {name!r}: timeout", error=InvalidConfigurationError,
                         above=True, none=True, unit="seconds")
    level = parse_isolation(isolation) if isolation is not None else None
    if (resources is not None and 0 < resources.memory_mb < MIN_MEMORY_MB
            and (level or agent.isolation) in _CONFINED and ResourceType.MEMORY in resources.resource_types):
        raise ResourceRequestError(
            f"state {name!r}: memory_mb={resources.memory_mb:g} is below {MIN_MEMORY_MB} MiB, too small for any "
            "process: ask for more, leave MEMORY out of resource_types, or run the state inline"
        )
    if priority is None:
        priority = resources.priority if resources is not None else _NORMAL
    elif not isinstance(priority, Priority):
        priority = Priority(_validate.member(Priority, priority, f"state {name!r}: priority",
                                             error=InvalidConfigurationError))
    declared = None
    if next_states is not None:
        if isinstance(next_states, str) or not isinstance(next_states, Iterable):
            raise InvalidConfigurationError(f"state {name!r}: next_states must be a list of state names")
        names = tuple(next_states)  # once: a generator is used up by reading it
        if not all(isinstance(n, str) for n in names):
            raise InvalidConfigurationError(f"state {name!r}: next_states must be a list of state names")
        declared = frozenset(names)
    if on_failure is not None:
        check_on_failure(on_failure, f"state {name!r}")
    keys = check_context_keys(name, context_keys) if context_keys is not None else None
    return StateSpec(name, func, deps, resources, retry_policy, max_retries, level, timeout, priority,
                     declared, on_failure, keys)


def enter_state(agent: Any, name: Any, func: Any, dependencies: Any, resources: Any, retry_policy: Any,
                max_retries: Any, isolation: Any, timeout: Any, priority: Any, next_states: Any, on_failure: Any,
                context_keys: Any) -> Any:
    """``agent.add_state(...)`` up to its run: the spec (:func:`new_spec`) and its
    metadata entered in the agent's tables. Returns the agent's unfinished run, if any,
    which the caller tells of the new state (a state added during a run may join it).

    Here rather than in the method: compiled (setup.py), about 0.1 µs less a state.
    """
    spec = new_spec(agent, name, func, dependencies, resources, retry_policy, max_retries, isolation, timeout,
                    priority, next_states, on_failure, context_keys)
    run = agent._run
    if run is not None and run.done:
        run = None
    states = agent._states
    if run is not None:
        check_graph(agent.name, {**states, name: spec})
    states[name] = spec
    deps = spec.dependencies
    if deps or spec.next_states is not None:
        agent._graph_checked = False  # only these can make check_graph fail
        if deps:
            agent._has_dependencies = True
    agent._graph = None
    agent.state_metadata[name] = StateMetadata(
        name, spec.max_retries_with(agent.retry_policy), resources, spec.priority, deps, spec.isolation
    )
    return run


# --- state functions ---------------------------------------------------------------------

_CO_COROUTINE: Final = inspect.CO_COROUTINE
_FunctionType: Final = types.FunctionType
_CO_VARARGS: Final = inspect.CO_VARARGS


def check_state_function(name: str, func: Any) -> None:
    """Raise unless ``func`` is ``async def f(context)`` (extra parameters need defaults).

    Plain functions are checked from their code object (cheap: this runs once per
    ``add_state``); anything else (methods, partials, callable objects) through
    :mod:`inspect`.
    """
    if type(func) is _FunctionType:
        code = func.__code__
        if code.co_argcount == 1 and not code.co_kwonlyargcount and code.co_flags & _CO_COROUTINE:
            return  # async def f(context): the common case
        if not code.co_flags & _CO_COROUTINE:
            raise _not_coroutine(name, func)
        positional = code.co_argcount
        required = positional - len(func.__defaults__ or ())
        kw_required = code.co_kwonlyargcount - len(func.__kwdefaults__ or ())
        if required > 1 or kw_required > 0 or (positional == 0 and not code.co_flags & _CO_VARARGS):
            raise _wrong_signature(name, func)
        return
    if not callable(func):
        raise InvalidStateFunctionError(f"state {name!r}: {func!r} is not callable")
    target = func
    if not inspect.iscoroutinefunction(target) and not inspect.isfunction(target):
        call = getattr(type(target), "__call__", None)  # noqa: B004 (the class's own __call__, not callable())
        if call is not None and inspect.iscoroutinefunction(call):
            target = call.__get__(target)
    if not inspect.iscoroutinefunction(target):
        raise _not_coroutine(name, func)
    try:
        inspect.signature(target).bind(object())
    except TypeError:
        raise _wrong_signature(name, func) from None
    except ValueError:  # no signature available (some builtins): accept
        pass


def _not_coroutine(name: str, func: Any) -> InvalidStateFunctionError:
    return InvalidStateFunctionError(
        f"state {name!r}: {getattr(func, '__name__', func)!r} is not a coroutine function: "
        "define it with `async def name(context: Context) -> StateResult`"
    )


def _wrong_signature(name: str, func: Any) -> InvalidStateFunctionError:
    return InvalidStateFunctionError(
        f"state {name!r}: {getattr(func, '__name__', func)!r} must take exactly one positional "
        "argument, the context (further parameters need default values)"
    )


# --- dependencies --------------------------------------------------------------------------


def parse_dependencies(name: str, dependencies: Any) -> dict[str, DependencyConfig]:
    """``add_state(dependencies=...)`` as a name -> config map (a list means REQUIRED)."""
    if dependencies is None:
        return {}
    if isinstance(dependencies, str):
        dependencies = [dependencies]
    if not isinstance(dependencies, Mapping):
        names = list(dependencies) if isinstance(dependencies, Iterable) else None
        if names is None or not all(isinstance(dep, str) for dep in names):
            raise WorkflowDefinitionError(
                f"state {name!r}: dependencies must be a state name, a list of names or a dict of "
                f"name -> DependencyType/DependencyConfig, got {type(dependencies).__name__} "
                f"{values.short_repr(dependencies)}"
            )
        dependencies = {dep: DependencyType.REQUIRED for dep in names}
    deps: dict[str, DependencyConfig] = {}
    for dep, value in dependencies.items():
        if not isinstance(dep, str):
            raise WorkflowDefinitionError(f"state {name!r}: dependency names are str, got {dep!r}")
        if dep == name:
            raise DependencyCycleError(f"state {name!r} depends on itself: remove that dependency")
        deps[dep] = DependencyConfig.of(value)
    return deps


def check_graph(agent_name: str, specs: Mapping[str, StateSpec]) -> None:
    """Unknown dependencies and dependency cycles are rejected before anything runs."""
    for spec in specs.values():
        for dep in spec.dependencies:
            if dep not in specs:
                raise UnknownStateError(
                    f"state {spec.name!r} depends on {dep!r}, which is not a state of agent "
                    f"{agent_name!r}: add {dep!r} with add_state() or remove the dependency"
                )
        if spec.next_states is not None:
            unknown = sorted(spec.next_states - set(specs))
            if unknown:
                raise UnknownStateError(
                    f"state {spec.name!r} declares next_states {unknown}, which are not states of agent "
                    f"{agent_name!r}: add them with add_state() or fix next_states (a state that adds the states "
                    "it returns while the run goes on declares no next_states)"
                )
    white, grey, black = 0, 1, 2
    color = dict.fromkeys(specs, white)
    for root in specs:
        if color[root] != white or not specs[root].dependencies:
            continue
        stack: list[tuple[str, Iterator[str]]] = [(root, iter(specs[root].dependencies))]
        path = [root]
        color[root] = grey
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                color[node] = black
                stack.pop()
                path.pop()
            elif color[nxt] == grey:
                cycle = path[path.index(nxt):] + [nxt]
                raise DependencyCycleError(
                    "dependency cycle: " + " -> ".join(cycle) + ": remove one of these dependencies"
                )
            elif color[nxt] == white:
                color[nxt] = grey
                path.append(nxt)
                stack.append((nxt, iter(specs[nxt].dependencies)))


# --- what a state can return -----------------------------------------------------------------


def declared_returns(spec: StateSpec) -> frozenset[str] | None:
    """The names ``spec`` can return (None: anything); ``next_states`` wins over its code."""
    if spec.next_states is not None:
        return spec.next_states
    return function_returns(spec.func)


def function_returns(func: Any) -> frozenset[str] | None:
    """The state names ``func`` can return, read from its code; None when that cannot be told."""
    if type(func) is types.FunctionType:  # the common case, first
        return _code_returns(func)
    while isinstance(func, functools.partial):
        func = func.func
    if isinstance(func, types.MethodType):
        func = func.__func__
    if not isinstance(func, types.FunctionType):
        call = getattr(type(func), "__call__", None)  # noqa: B004 (the class's own __call__)
        if isinstance(call, types.FunctionType):
            func = call
        else:
            return None
    return _code_returns(func)


def _read_once(cache: dict[int, tuple[types.CodeType, Any]], func: types.FunctionType,
               read: Callable[[types.FunctionType], Any]) -> Any:
    """What ``read(func)`` finds in ``func``'s code, read once per code object. Keyed by
    ``id(code)``: hashing a code object hashes all of its contents on every lookup; holding
    the code keeps its id from being reused."""
    code = func.__code__
    cached = cache.get(id(code))
    if cached is None or cached[0] is not code:
        cached = cache[id(code)] = (code, read(func))
    return cached[1]


def _read_returns(func: types.FunctionType) -> frozenset[str] | None:
    found = _source_returns(func)
    return _bytecode_returns(func.__code__) if found is _UNREADABLE else found


_returns_cache: Final[dict[int, tuple[types.CodeType, Any]]] = {}  # code -> what it returns


def _code_returns(func: types.FunctionType) -> frozenset[str] | None:
    return _read_once(_returns_cache, func, _read_returns)  # type: ignore[no-any-return]


_SUSPENDING: Final = frozenset(("YIELD_VALUE", "SEND", "GET_AWAITABLE", "GET_AITER", "GET_ANEXT", "BEFORE_ASYNC_WITH"))


def _read_cannot_suspend(func: types.FunctionType) -> bool:
    code = func.__code__
    return bool(code.co_flags & _CO_COROUTINE) and not any(
        ins.opname in _SUSPENDING for ins in dis.get_instructions(code))


_suspend_cache: Final[dict[int, tuple[types.CodeType, Any]]] = {}  # code -> whether it cannot suspend


def cannot_suspend(func: Any) -> bool:
    """Whether ``func`` is an ``async def`` whose code awaits nothing: its coroutine returns
    or raises at its first step (every way to suspend compiles to one of ``_SUSPENDING``)."""
    return type(func) is _FunctionType and bool(_read_once(_suspend_cache, func, _read_cannot_suspend))


def values_used(func: Any) -> dict[str, Any]:
    """The values ``func``'s code uses by name: its closure variables (those bound), and
    the globals its own code and the functions inside it name. What a copy of ``func``
    in another process takes along."""
    code = getattr(func, "__code__", None)
    if code is None:
        return {}
    globals_ = getattr(func, "__globals__", {})
    used = {name: globals_[name] for name in _read_once(_names_cache, func, _read_names) if name in globals_}
    for name, cell in zip(code.co_freevars, getattr(func, "__closure__", None) or (), strict=False):
        try:
            used[name] = cell.cell_contents
        except ValueError:  # a variable not bound yet
            continue
    return used


_names_cache: Final[dict[int, tuple[types.CodeType, Any]]] = {}  # code -> the names it and its inner code use


def _read_names(func: types.FunctionType) -> tuple[str, ...]:
    names: dict[str, None] = {}
    codes = [func.__code__]
    while codes:  # the function's own code, and the functions and comprehensions inside it
        current = codes.pop()
        names.update(dict.fromkeys(current.co_names))
        codes.extend(c for c in current.co_consts if isinstance(c, types.CodeType))
    return tuple(names)


def uses_an_agent(func: Any) -> bool:
    """Whether ``func``'s code uses an :class:`~agent.agent.Agent` (a global or a closure
    variable of its own or of a function inside it): such a state works on that live object,
    which a state process could only get a copy of."""
    from .agent import Agent

    return any(isinstance(value, Agent) for value in values_used(func).values())


_UNREADABLE: Final = object()


def _source_returns(func: types.FunctionType) -> Any:
    """Returns read from the source with :mod:`ast`; ``_UNREADABLE`` when there is no usable source.

    The lines come from :mod:`linecache`, and the function's extent from its code object
    (``inspect.getsource`` maps every loaded module to its file and tokenizes the block,
    which costs milliseconds the first time in a process).
    """
    code = func.__code__
    lines = linecache.getlines(code.co_filename, func.__globals__)
    first = code.co_firstlineno
    if not lines or first > len(lines):
        return _UNREADABLE
    last = max((end for _, _, end in code.co_lines() if end is not None), default=first)
    indent = len(lines[first - 1]) - len(lines[first - 1].lstrip())
    while last < len(lines):  # lines after the last one with code: closing brackets, comments
        line = lines[last]
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break
        last += 1
    try:
        tree = ast.parse(textwrap.dedent("".join(lines[first - 1:last])))
    except (SyntaxError, ValueError):
        return _UNREADABLE
    node = next((n for n in ast.walk(tree) if isinstance(n, (ast.AsyncFunctionDef, ast.FunctionDef))
                 and n.name == func.__name__), None)
    if node is None:
        return _UNREADABLE
    names: set[str] = set()
    for ret in _returns_of(node):
        got = _constant_names(ret.value)
        if got is None:
            return None
        names |= got
    return frozenset(names)


def _returns_of(func: ast.AST) -> Iterable[ast.Return]:
    """The ``return`` statements of ``func`` itself (not of functions or classes nested in it)."""
    stack = list(ast.iter_child_nodes(func))
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        if isinstance(node, ast.Return):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _constant_names(expr: ast.expr | None) -> set[str] | None:
    if expr is None:
        return set()
    if isinstance(expr, ast.Constant):
        if expr.value is None:
            return set()
        return {expr.value} if isinstance(expr.value, str) else None
    if isinstance(expr, (ast.List, ast.Tuple, ast.Set)):
        out: set[str] = set()
        for elt in expr.elts:
            if not (isinstance(elt, ast.Constant) and isinstance(elt.value, str)):
                return None
            out.add(elt.value)
        return out
    if isinstance(expr, ast.IfExp):
        body, orelse = _constant_names(expr.body), _constant_names(expr.orelse)
        return None if body is None or orelse is None else body | orelse
    return None


def _bytecode_returns(code: types.CodeType) -> frozenset[str] | None:
    """Returns read from the bytecode: every return must be fed by constants, else None."""
    instructions = list(dis.get_instructions(code))
    names: set[str] = set()
    for i, ins in enumerate(instructions):
        if ins.opname == "RETURN_CONST":
            value = ins.argval
        elif ins.opname == "RETURN_VALUE":
            value = _fed_constant(instructions, i)
            if value is _UNREADABLE:
                return None
        else:
            continue
        if value is None:
            continue
        if isinstance(value, str):
            names.add(value)
        elif isinstance(value, (tuple, frozenset)) and all(isinstance(v, str) for v in value):
            names.update(value)
        else:
            return None
    return frozenset(names)


def _fed_constant(instructions: list[dis.Instruction], i: int) -> Any:
    """What the RETURN_VALUE at ``i`` returns, when the instructions just before it build it
    from constants and no jump lands after the first of them (``return x or None`` jumps to
    its RETURN_VALUE carrying ``x``); else ``_UNREADABLE``."""
    prev = instructions[i - 1] if i else None
    if prev is None:
        return _UNREADABLE
    first, value = i - 1, _UNREADABLE
    if prev.opname == "LOAD_CONST":
        value = prev.argval
    elif (prev.opname in ("LIST_EXTEND", "SET_UPDATE") and i >= 3 and instructions[i - 2].opname == "LOAD_CONST"
          and instructions[i - 3].opname in ("BUILD_LIST", "BUILD_SET") and instructions[i - 3].arg == 0):
        first, value = i - 3, instructions[i - 2].argval
    elif prev.opname in ("BUILD_LIST", "BUILD_TUPLE", "BUILD_SET") and prev.arg is not None and i > prev.arg:
        loads = instructions[i - 1 - prev.arg:i - 1]
        if all(x.opname == "LOAD_CONST" and isinstance(x.argval, str) for x in loads):
            first, value = i - 1 - prev.arg, tuple(x.argval for x in loads)
    if any(x.is_jump_target for x in instructions[first + 1:i + 1]):
        return _UNREADABLE
    return value


class ReturnGraph:
    """Which states each state can lead to by returning names (transitively).

    ``reach(name)`` is the set of states ``name`` can return directly or through the
    states those return, or None when that includes a state whose returns cannot be
    read (then it can lead anywhere). Computed on demand, one strongly connected
    component at a time, and cached for the life of the graph.
    """

    def __init__(self, specs: Mapping[str, StateSpec]) -> None:
        self._specs = specs
        self._direct: dict[str, frozenset[str] | None] = {}
        self._reach: dict[str, frozenset[str] | None] = {}
        # id(what decides a state's returns: its next_states, else its function) -> (that
        # object, its reach): a fan-out's branches share one function, so one reach.
        self._shared: dict[int, tuple[object, frozenset[str] | None]] = {}
        self._within: dict[tuple[str, str], frozenset[str] | None] = {}

    def direct(self, name: str) -> frozenset[str] | None:
        """What ``name`` returns directly (names that are not states are harmless here: nothing waits on them)."""
        found = self._direct.get(name, _UNREADABLE)
        if found is _UNREADABLE:
            spec = self._specs.get(name)
            if spec is None:
                found = frozenset()
            elif spec.next_states is None and type(spec.func) is _FunctionType:  # the common case
                found = _code_returns(spec.func)
            else:
                found = declared_returns(spec)
            self._direct[name] = found
        return found  # type: ignore[return-value]

    def reach(self, name: str) -> frozenset[str] | None:
        known = self._reach
        found = known.get(name, _UNREADABLE)
        if found is not _UNREADABLE:
            return found  # type: ignore[return-value]
        # What a state reaches is what its returns reach (itself too, through a loop):
        # two states whose returns one object decides (the same function, or the same
        # next_states) reach the same states.
        spec = self._specs.get(name)
        decider = None if spec is None else spec.func if spec.next_states is None else spec.next_states
        shared = self._shared.get(id(decider))
        if shared is not None and shared[0] is decider:
            known[name] = shared[1]
            return shared[1]
        found = self._compute(name)
        if decider is not None:
            self._shared[id(decider)] = (decider, found)
        return found

    def reach_within(self, name: str, opener: str | None) -> frozenset[str] | None:
        """What ``name`` can lead to in the round of a fan-out that ``opener`` returned: as
        :meth:`reach`, but never through ``opener`` (reaching it ends the path: running it
        again opens a new fan-out, a new round that joins on its own). ``opener`` None
        (the run's own branches) is :meth:`reach`."""
        reach = self.reach(name)
        if opener is None or (reach is not None and opener not in reach):
            return reach  # (anything, None, may come only through the opener: walked below)
        key = (name, opener)
        found = self._within.get(key, _UNREADABLE)
        if found is not _UNREADABLE:
            return found  # type: ignore[return-value]
        seen: set[str] = set()
        todo = [name]
        within: frozenset[str] | None = None  # something on the way can return anything
        while todo:
            succ = self.direct(todo.pop())
            if succ is None:
                break
            for s in succ:
                if s not in seen:
                    seen.add(s)
                    if s != opener:
                        todo.append(s)
        else:
            within = frozenset(seen)
        self._within[key] = within
        return within

    def _compute(self, name: str) -> frozenset[str] | None:
        succ = self.direct(name)
        known = self._reach
        if succ is None:
            known[name] = None
            return None
        # The common case: every successor is known already and there is no loop back.
        if name not in succ and succ <= known.keys():
            out = set(succ)
            for s in succ:
                further = known[s]
                if further is None:
                    known[name] = None
                    return None
                out |= further
            if name not in out:
                value = known[name] = frozenset(out)
                return value
        self._tarjan(name)
        return known[name]

    def _tarjan(self, root: str) -> None:
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        stack: list[str] = []
        on_stack: set[str] = set()
        work: list[tuple[str, list[str]]] = []

        def enter(node: str) -> None:
            index[node] = low[node] = len(index)
            stack.append(node)
            on_stack.add(node)
            succ = self.direct(node)
            work.append((node, [] if succ is None else [s for s in succ if s not in self._reach]))

        enter(root)
        while work:
            node, todo = work[-1]
            if todo:
                nxt = todo.pop()
                if nxt not in index:
                    enter(nxt)
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] != index[node]:
                continue
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            self._close(component)

    def _close(self, component: list[str]) -> None:
        members = set(component)
        out: set[str] = set()
        anywhere = False
        for member in component:
            succ = self.direct(member)
            if succ is None:
                anywhere = True
                break
            out |= succ
            for s in succ:
                if s not in members:
                    further = self._reach[s]
                    if further is None:
                        anywhere = True
                        break
                    out |= further
            if anywhere:
                break
        value = None if anywhere else frozenset(out)
        for member in component:
            self._reach[member] = value
