"""RPC and message handlers: registration, argument binding, dispatch.

A handler is an ordinary function (sync, Trio or asyncio coroutine). Its
parameters are filled from the call's keyword arguments, each structured by
cattrs into the parameter's annotation, so ``def add(a: int, b: int)`` gets ints
and ``def create(user: User)`` gets a ``User`` attrs instance. A parameter
annotated :class:`~conduit.Peer` receives the calling peer instead, and
:func:`current_peer` returns it anywhere inside the handler.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar, overload

import attrs
import cattrs
from cattrs.errors import CattrsError, StructureHandlerNotFoundError

from ._call_workers import UnsendableResult
from ._callbacks import callback_world, current_host_loop, invoke
from ._peer import Peer
from ._rpc_proxy import to_wire
from .errors import CallbackCancelledError, RPCError
from .protocol import converter

log = logging.getLogger("conduit.rpc")

F = TypeVar("F", bound=Callable[..., Any])

_CoroutineType = types.CoroutineType

_current_peer: contextvars.ContextVar[Peer] = contextvars.ContextVar("conduit_current_peer")


def current_peer() -> Peer:
    """The peer whose call or message is being handled (inside a handler only)."""
    try:
        return _current_peer.get()
    except LookupError:
        raise RuntimeError("current_peer() called outside an RPC or message handler") from None


@attrs.frozen
class _Param:
    name: str
    annotation: Any
    required: bool
    wants_peer: bool
    #: The annotation when it is a type of _PRIMITIVES (a value of exactly it
    #: needs no structuring), else None.
    primitive: Any = attrs.field(init=False)
    #: For a primitive annotation, or a union of primitives (``str | None``):
    #: whether a wire value is one of them as it is (see :func:`_strict_check`).
    strict: Callable[[Any], bool] | None = attrs.field(init=False)

    @primitive.default
    def _primitive(self) -> Any:
        return self.annotation if self.annotation in _PRIMITIVES else None

    @strict.default
    def _strict(self) -> Callable[[Any], bool] | None:
        return _strict_check(self.annotation)


def _strict_check(annotation: Any) -> Callable[[Any], bool] | None:
    """The exact-type test for ``annotation`` when it is a primitive or a union of them.

    cattrs would coerce (``str(123)`` is ``"123"``), in a union too, so these
    are checked here, and only a value that passes is structured.
    """
    try:
        if annotation in _STRICT:
            return _STRICT[annotation]
    except TypeError:  # an unhashable annotation: not a primitive
        return None
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return None
    checks: list[Callable[[Any], bool]] = []
    for member in typing.get_args(annotation):
        if member is type(None):
            checks.append(_is_none)
        elif member in _STRICT:
            checks.append(_STRICT[member])
        else:
            return None
    return lambda value: any(check(value) for check in checks)


def _is_none(value: Any) -> bool:
    return value is None


def _resolved_hints(
    name: str, function: Callable[..., Any], signature: inspect.Signature
) -> dict[str, Any]:
    """The parameters' annotations, resolved (``from __future__ import annotations``
    makes them strings).

    When ``typing.get_type_hints`` fails (one annotation names a type imported
    only under ``TYPE_CHECKING``, or a class local to a function, or the
    return's does), each parameter's is resolved alone: until 2026-12-07 all
    were then left as strings, which turned off the structuring and checking
    of every argument of the handler, silently (found by a review). One that
    still cannot be resolved is left as its string, which passes its values
    as they come, unchecked, and a warning at registration says so and what
    to do; one naming ``Peer`` needs no resolving (the calling peer is
    recognised by name).
    """
    try:
        return typing.get_type_hints(function)
    except Exception:
        pass
    target = inspect.unwrap(function)
    while isinstance(target, functools.partial):  # resolved in its function's module
        target = inspect.unwrap(target.func)
    namespace = getattr(target, "__globals__", {})
    hints: dict[str, Any] = {}
    for parameter in signature.parameters.values():
        annotation = parameter.annotation
        if not isinstance(annotation, str) or _is_peer_annotation(annotation):
            hints[parameter.name] = annotation
            continue
        try:
            hints[parameter.name] = typing.get_type_hints(
                _Annotated(annotation), globalns=namespace
            )["value"]
        except Exception as exc:
            log.warning(
                "RPC handler %r: the annotation %r of parameter %r cannot be resolved "
                "(%s: %s), so its values are passed as they come, unchecked: import its "
                "type at module level, at run time (not only under TYPE_CHECKING)",
                name,
                annotation,
                parameter.name,
                type(exc).__name__,
                exc,
            )
            hints[parameter.name] = annotation
    return hints


class _Annotated:
    """An object whose one annotation, ``value``, is ``annotation``: resolved by
    ``typing.get_type_hints`` with the namespace given, as a function's are."""

    def __init__(self, annotation: str) -> None:
        self.__annotations__ = {"value": annotation}


def _is_peer_annotation(annotation: Any) -> bool:
    return annotation is Peer or (
        isinstance(annotation, str) and annotation.rsplit(".", 1)[-1] == "Peer"
    )


@attrs.frozen
class RPCMethod:
    """A registered handler and how to bind wire arguments to it."""

    name: str
    function: Callable[..., Any]
    params: tuple[_Param, ...]
    accepts_extra: bool
    #: The one parameter that takes *all* arguments as one attrs object.
    whole_args: _Param | None
    #: Where the handler asked to run (``@trio_callback`` / ``@asyncio_callback``).
    world: str | None = None
    #: The names ``whole_args``' class takes (its fields' names).
    whole_fields: frozenset[str] = frozenset()

    @classmethod
    def from_function(cls, name: str, function: Callable[..., Any]) -> RPCMethod:
        """Inspect ``function``'s signature once, at registration."""
        signature = inspect.signature(function)
        hints = _resolved_hints(name, function, signature)
        params: list[_Param] = []
        accepts_extra = False
        for parameter in signature.parameters.values():
            if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                accepts_extra = True
                continue
            if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
                continue
            if parameter.kind is inspect.Parameter.POSITIONAL_ONLY:
                raise TypeError(f"RPC handler {name!r}: positional-only parameters cannot be bound")
            annotation = hints.get(parameter.name, parameter.annotation)
            params.append(
                _Param(
                    parameter.name,
                    annotation,
                    parameter.default is inspect.Parameter.empty,
                    _is_peer_annotation(annotation),
                )
            )
        data_params = [p for p in params if not p.wants_peer]
        whole = None
        fields: frozenset[str] = frozenset()
        if len(data_params) == 1 and attrs.has(data_params[0].annotation):
            whole = data_params[0]
            # By their names: the converter reads the map by them (a private
            # field "_secret" is sent as "_secret", not as its alias).
            fields = frozenset(field.name for field in attrs.fields(whole.annotation))
        # The parameters that get the calling peer come first, so that an
        # argument of their name is refused whatever the order (the whole-args
        # parameter, before them, took it among its fields: a review).
        ordered = sorted(params, key=lambda param: not param.wants_peer)
        return cls(
            name,
            function,
            tuple(ordered),
            accepts_extra,
            whole,
            callback_world(function),
            fields,
        )

    def bind(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        """Structure wire arguments into keyword arguments for the handler."""
        kwargs: dict[str, Any] = {}
        remaining = dict(args)
        for param in self.params:
            if param.wants_peer:
                if param.name in remaining:
                    # Else **kwargs would take it over: the handler would see a
                    # string of the caller's choosing where it checks who called.
                    raise RPCError(
                        f"{self.name}() argument {param.name!r} is the calling peer, "
                        "not an argument",
                        "invalid_arguments",
                    )
                kwargs[param.name] = peer
            elif param is self.whole_args and param.name not in remaining:
                # The arguments are the object's fields; none given and a
                # default declared: the default (not an object made of {}).
                if remaining or param.required:
                    unknown = remaining.keys() - self.whole_fields
                    if unknown and not self.accepts_extra:
                        # cattrs drops keys that are no field: refused, as an
                        # unexpected argument is in the other style.
                        names = ", ".join(sorted(map(repr, unknown)))
                        raise RPCError(
                            f"{self.name}() got unexpected arguments {names}",
                            "invalid_arguments",
                        )
                    kwargs[param.name] = _structure(remaining, param)
                    remaining = {}
            elif param.name in remaining:
                value = remaining.pop(param.name)
                # Already the declared primitive type: no _structure call.
                if type(value) is not param.primitive:
                    value = _structure(value, param)
                kwargs[param.name] = value
            elif param.required:
                raise RPCError(
                    f"{self.name}() is missing argument {param.name!r}", "invalid_arguments"
                )
        if remaining:
            if not self.accepts_extra:
                names = ", ".join(sorted(map(repr, remaining)))
                raise RPCError(
                    f"{self.name}() got unexpected arguments {names}", "invalid_arguments"
                )
            kwargs.update(remaining)
        return kwargs


_PRIMITIVES = frozenset({str, int, float, bool, bytes, type(None)})
_STRICT: dict[Any, Callable[[Any], bool]] = {
    str: lambda v: type(v) is str,
    int: lambda v: type(v) is int,
    bool: lambda v: type(v) is bool,
    bytes: lambda v: type(v) is bytes,
    float: lambda v: type(v) in (int, float),
}


def _structure(value: Any, param: _Param) -> Any:
    annotation = param.annotation
    if annotation is inspect.Parameter.empty or annotation is Any or isinstance(annotation, str):
        return value
    if type(value) is annotation and annotation in _PRIMITIVES:
        return value  # already the right type: skip cattrs' dispatch
    if param.strict is not None and not param.strict(value):
        # cattrs would coerce with str()/int()/bool(): name=123 would become "123".
        expected = getattr(annotation, "__name__", None) or str(annotation)
        raise RPCError(
            f"argument {param.name!r}: expected {expected}, got {type(value).__name__}",
            "invalid_arguments",
        )
    try:
        return converter.structure(value, annotation)
    except StructureHandlerNotFoundError:
        raise  # the handler's annotation, not the caller's value: a handler_error
    except (
        CattrsError,  # its validation errors, and a value outside a Literal
        TypeError,
        ValueError,
        KeyError,
        AttributeError,
        OverflowError,
    ) as exc:
        if isinstance(exc, cattrs.BaseValidationError):
            detail = "; ".join(cattrs.transform_error(exc))
        else:
            detail = str(exc) or type(exc).__name__
        raise RPCError(f"argument {param.name!r}: {detail}", "invalid_arguments") from None


class Handlers:
    """The RPC methods and message handlers of one Server or Client."""

    def __init__(self, *, message_handler_takes_peer: bool) -> None:
        self.methods: dict[str, RPCMethod] = {}
        self.events: dict[str, list[Callable[..., Any]]] = {}
        #: Whether message handlers get ``(peer, data)`` (a server's) or ``(data)``.
        self.message_handler_takes_peer = message_handler_takes_peer

    def add_method(self, function: Callable[..., Any], name: str | None = None) -> None:
        """Register ``function`` under ``name`` (default: its ``__name__``).

        A name registered again gets the new handler (logged: a second
        FileTransferHandler, or two functions of one name, replace the
        first one's methods).
        """
        given: object = function  # typed as callable; a caller may still pass anything
        if not callable(given):
            hint = " (to name the method, write @rpc(name=...))" if isinstance(given, str) else ""
            raise TypeError(f"an RPC handler must be callable, got {given!r}{hint}")
        method_name = name or getattr(function, "__name__", None)
        if not method_name:
            raise TypeError(f"{function!r} has no __name__: register it with name=...")
        if method_name in self.methods:
            log.warning(
                "RPC method %r registered again: the new handler replaces the old", method_name
            )
        self.methods[method_name] = RPCMethod.from_function(method_name, function)

    @overload
    def decorator(self, function: F, *, name: str | None = None) -> F: ...
    @overload
    def decorator(self, function: None = None, *, name: str | None = None) -> Callable[[F], F]: ...
    def decorator(
        self, function: F | None = None, *, name: str | None = None
    ) -> F | Callable[[F], F]:
        """``@x.rpc`` or ``@x.rpc(name="...")``."""
        if function is None:
            return functools.partial(self.decorator, name=name)
        self.add_method(function, name)
        return function

    def add_event(self, event: str, function: Callable[..., Any]) -> None:
        """Register a handler for a one-way message."""
        self.events.setdefault(event, []).append(function)

    def bound_to(self, peer: Peer) -> PeerDispatcher:
        """The dispatcher of one connection: these handlers, called on behalf of ``peer``."""
        return PeerDispatcher(self, peer)


@attrs.define
class PeerDispatcher:
    """What one connection hands its incoming calls and messages to.

    Bound to the connection's :class:`~conduit.Peer` when the connection is
    built, so a handler's caller is known without any lookup (the
    ``conduit._connection.Dispatcher`` protocol).
    """

    handlers: Handlers
    peer: Peer
    #: Whether this connection's Trio run is hosted by asyncio (its users'
    #: handlers live there). Looked up on the first call only: a connection
    #: never leaves the Trio run it was made in.
    _hosted: bool | None = attrs.field(init=False, default=None)

    async def handle_call(self, method: str, args: dict[str, Any]) -> Any:
        """Run an RPC and return its value, unstructured for the wire."""
        entry = self.handlers.methods.get(method)
        if entry is None:
            raise RPCError(f"no RPC method named {method!r}", "not_found")
        peer = self.peer
        kwargs = entry.bind(args, peer)
        token = _current_peer.set(peer)
        try:
            hosted = self._hosted
            if hosted is None:
                hosted = self._hosted = current_host_loop() is not None
            if entry.world is None and not hosted:
                # Plain Trio and an unmarked handler: call it here, skipping
                # invoke()'s world dispatch on the hot path.
                value = entry.function(**kwargs)
                # An async def handler's coroutine, tested by type before
                # inspect.isawaitable (a Python function call).
                if type(value) is _CoroutineType or inspect.isawaitable(value):
                    value = await value
            else:
                value = await invoke(functools.partial(entry.function, **kwargs))
        finally:
            _current_peer.reset(token)
        # to_wire, inline: most values are primitives already.
        if type(value) in _PRIMITIVES:
            return value
        try:
            return to_wire(value)
        except Exception as exc:  # RecursionError too: a value nested too deep
            raise UnsendableResult(
                f"the handler's result cannot be sent: {type(exc).__name__}: {exc}"
            ) from exc

    async def handle_message(self, event: str, data: Any) -> None:
        """Deliver a one-way message: run every handler registered for ``event``."""
        handlers = self.handlers.events.get(event)
        if not handlers:
            log.debug("no handler for message %r; dropped", event)
            return
        peer = self.peer
        token = _current_peer.set(peer)
        try:
            for handler in handlers:
                # Each handler runs whatever the one before did: one that
                # raises is logged, and the next runs (until 2026-12-07 the
                # first failure stopped the rest, a review found).
                try:
                    if self.handlers.message_handler_takes_peer:
                        await invoke(handler, peer, data)
                    else:
                        await invoke(handler, data)
                except CallbackCancelledError:
                    raise  # asyncio's shutdown: the rest would be cancelled too
                except Exception:
                    log.exception(
                        "handler %s for message %r failed",
                        getattr(handler, "__qualname__", handler),
                        event,
                    )
        finally:
            _current_peer.reset(token)


__all__ = ["Handlers", "PeerDispatcher", "RPCMethod", "current_peer"]
