"""The calling side of RPC: ``x.rpc.call(...)`` / ``x.rpc.invoke(...)``, and values for the wire.

:class:`RPCProxy` is ``client.rpc`` and ``peer.rpc``: ``await x.rpc.call(...)``
returns a result dict (the shape the guide reads), ``await x.rpc.invoke(...)``
returns the value or raises. The handling side (registration, argument binding,
dispatch) is :mod:`conduit._rpc`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, overload

import attrs

from ._bridge import RunBinding, RunBound, bridged
from ._connection import Connection
from .errors import ConduitError, ConnectionClosed, LocalProtocolError, RPCError, failure_dict
from .protocol import converter

if TYPE_CHECKING:
    from ._rpc import Handlers

F = TypeVar("F", bound=Callable[..., Any])

_PRIMITIVES = frozenset({str, int, float, bool, bytes, type(None)})


def to_wire(value: Any) -> Any:
    """Unstructure ``value`` for msgpack (attrs instances become maps).

    What ``converter.unstructure`` gives, with plain data walked here: a
    ``dict`` or ``list`` of primitives (a batch's per-file answers, a
    call's list of files) is copied here, where cattrs looks up a hook for
    every key and item: 5.4 µs instead of 20.3 for the answer of a batch
    of eight small files, 2.5 instead of 8.1 for its list of files (this
    machine, 2026-12-06). Anything else, at any depth, still goes through
    the converter. The result is the converter's for every value it can
    walk; one nested deeper than its recursion reaches (about 330 levels)
    now goes up to msgpack's own bound (511) instead of failing here.
    """
    kind = type(value)
    if kind in _PRIMITIVES:
        return value
    if kind is dict:
        return {
            (key if type(key) in _PRIMITIVES else to_wire(key)): (
                item if type(item) in _PRIMITIVES else to_wire(item)
            )
            for key, item in value.items()
        }
    if kind is list:
        return [item if type(item) in _PRIMITIVES else to_wire(item) for item in value]
    return converter.unstructure(value)


def message_data(data: Any) -> Any:
    """A message's ``data`` made fit for the wire (:func:`to_wire`); one that
    cannot be raises ``LocalProtocolError("value cannot be sent: ...")``, as a
    call's arguments do (a bare ``TypeError`` until 2026-12-07)."""
    try:
        return to_wire(data)
    except (TypeError, ValueError, RecursionError) as exc:
        raise LocalProtocolError(f"value cannot be sent: {exc}") from exc


def call_arguments(args: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Merge ``args`` (a mapping, an attrs instance or None) with keyword arguments.

    A value that cannot be made fit for the wire (a dict with tuple keys,
    whose keys become lists) raises ``LocalProtocolError("value cannot be
    sent: ...")``, as one msgpack refuses does, before anything is sent.
    """
    if not (args is None or attrs.has(type(args)) or isinstance(args, dict)):
        raise TypeError(
            f"args must be a dict, an attrs instance or None, not {type(args).__name__}"
        )
    try:
        if args is None:
            merged: dict[str, Any] = {}
        elif attrs.has(type(args)):
            merged = converter.unstructure(args)
        else:
            merged = {str(key): to_wire(value) for key, value in args.items()}
        for key, value in kwargs.items():
            # to_wire's test, inline: one call less per argument of every call.
            merged[key] = value if type(value) in _PRIMITIVES else to_wire(value)
    except (TypeError, ValueError, RecursionError) as exc:
        raise LocalProtocolError(f"value cannot be sent: {exc}") from exc
    return merged


def result_dict(value: Any = None, error: ConduitError | None = None) -> dict[str, Any]:
    """The guide's result shape: ``{"success", "data"}`` or ``{"success", "error", "code"}``."""
    if error is None:
        return {"success": True, "data": value}
    return failure_dict(error)


def checked_timeout(timeout: float) -> float:
    """A call's timeout given by the caller (None, the default, needs no check).

    Checked before the call takes an id: a NaN deadline crashed the
    connection's timer (every call on it failed), a string failed after the
    call was registered (left pending for ever).
    """
    if type(timeout) is not float and type(timeout) is not int:  # bool is no timeout
        raise TypeError(f"timeout must be a number of seconds or None, got {timeout!r}")
    if timeout != timeout:
        raise ValueError("timeout must not be NaN")
    return timeout


class RPCProxy(RunBound):
    """Call methods on the peer; on a client also ``@client.rpc`` registers handlers."""

    def __init__(
        self,
        connection: Callable[[], Connection],
        default_timeout: float | None,
        handlers: Handlers | None = None,
        binding: Callable[[], RunBinding | None] | None = None,
    ) -> None:
        self._connection = connection
        self._handlers = handlers
        #: The timeout of a call that gives none (seconds; None: no limit).
        self.default_timeout = default_timeout
        #: The run its calls go through lives in (its owner's: see _bridge.RunBound);
        #: a peer's proxy is made in its connection's run, a client's is told
        #: of each run it connects in.
        self._binding = binding if binding is not None else lambda: connection().binding
        if binding is None:
            self._thread_of_run = threading.get_ident()

    def _run_binding(self) -> RunBinding | None:
        return self._binding()

    @overload
    def __call__(self, function: F, *, name: str | None = None) -> F: ...
    @overload
    def __call__(self, function: None = None, *, name: str | None = None) -> Callable[[F], F]: ...
    def __call__(
        self, function: F | None = None, *, name: str | None = None
    ) -> F | Callable[[F], F]:
        """Register a handler the peer can call: ``@client.rpc`` or ``@client.rpc(name=...)``."""
        if self._handlers is None:
            raise TypeError("this side has no RPC registry; register on the Server or Client")
        return self._handlers.decorator(function, name=name)

    @bridged
    async def invoke(
        self, method: str, args: Any = None, timeout: float | None = None, **kwargs: Any
    ) -> Any:
        """Call ``method`` on the peer and return its value.

        Raises :class:`~conduit.RPCError` (with ``.code``) when the peer reports a
        failure, :class:`~conduit.RPCTimeoutError` after ``timeout`` seconds (default:
        the descriptor's ``rpc_timeout``), :class:`~conduit.ConnectionClosed` when
        the connection is gone. Keyword arguments become the call's arguments;
        ``args`` (a dict or attrs instance) is merged in first, which is also how
        to pass an argument literally named ``timeout``.
        """
        arguments = call_arguments(args, kwargs)
        return await self._connection().call(
            method, arguments, self.default_timeout if timeout is None else checked_timeout(timeout)
        )

    @bridged
    async def call(
        self, method: str, args: Any = None, timeout: float | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """Call ``method``; return ``{"success": True, "data": value}`` or
        ``{"success": False, "error": message, "code": code}``.

        Failures of the call (remote errors, timeouts, a lost connection) come
        back in the dict; only programming errors, such as arguments that cannot
        be serialised, raise.
        """
        arguments = call_arguments(args, kwargs)
        try:
            connection = self._connection()
            value = await connection.call(
                method,
                arguments,
                self.default_timeout if timeout is None else checked_timeout(timeout),
            )
        except (RPCError, ConnectionClosed) as exc:
            return result_dict(error=exc)
        return {"success": True, "data": value}  # result_dict(value), inline: once per call


__all__ = [
    "RPCProxy",
    "call_arguments",
    "checked_timeout",
    "message_data",
    "result_dict",
    "to_wire",
]
