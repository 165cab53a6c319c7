"""The exceptions conduit raises.

Everything conduit raises on purpose derives from :class:`ConduitError`, so one
``except ConduitError`` catches all of it. Where Python already has the right
meaning, the class derives from that too (``TimeoutError``, ``ValueError``),
so ordinary handlers keep working.
"""

from __future__ import annotations

from typing import Any


class ConduitError(Exception):
    """Base class of every error conduit raises on purpose."""


class ProtocolError(ConduitError):
    """The byte stream broke the wire protocol.

    Raised by the sans-IO layer for anything malformed: a bad magic number, an
    unknown frame kind, a length over the negotiated limit, a body that does not
    decode, a frame that is not allowed in the current state.
    """


class RemoteProtocolError(ProtocolError):
    """The *peer* sent something that breaks the protocol."""


class LocalProtocolError(ProtocolError):
    """*This side* was asked to do something the protocol does not allow."""


class HandshakeError(ConduitError):
    """The connection ended before the handshake completed.

    The base of :class:`AuthenticationError` (the peer was refused or failed to
    prove it knows the password) and :class:`HandshakeTimeout` (it did not
    answer in time), which are handled differently: only the first means
    "check the password".
    """


class AuthenticationError(HandshakeError):
    """The password did not match, or the peer failed to prove it knows it."""


class AuthModeMismatch(AuthenticationError):
    """The server is in the other mode: it has user accounts and the client gave
    no username, or it has a shared password and the client gave one. No
    password was tried."""


class LockedOut(AuthenticationError):
    """The server refused to try the password: too many failed attempts lately.

    ``retry_after`` is how many seconds the server said to wait. Nothing about
    the password is known: it was not checked.
    """

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        #: Seconds until the server takes attempts again.
        self.retry_after = retry_after


class HandshakeTimeout(HandshakeError, TimeoutError):
    """The peer did not complete the handshake in time (no verdict on the password)."""


class ConnectionClosed(ConduitError):
    """The connection is closed; the operation cannot complete.

    ``reason`` says why, in words meant for a log line.
    """

    def __init__(self, reason: str = "connection closed") -> None:
        super().__init__(reason)
        self.reason = reason


class IntegrityError(ConnectionClosed):
    """A sealed record failed authentication: the bytes were altered in transit."""


class RPCError(ConduitError):
    """A remote procedure call failed on the other side.

    ``code`` is a short machine-readable string (``"not_found"``,
    ``"invalid_arguments"``, ``"handler_error"``, ``"timeout"``, ...), ``message``
    is for humans.
    """

    def __init__(self, message: str, code: str = "error") -> None:
        super().__init__(message)
        self.message = message
        self.code = code

    def __str__(self) -> str:
        return f"{self.message} [{self.code}]"


class RPCTimeoutError(RPCError, TimeoutError):
    """A remote procedure call got no answer within its timeout."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="timeout")


class TransferError(ConduitError):
    """A file transfer failed. ``code`` classifies it like :class:`RPCError`."""

    def __init__(self, message: str, code: str = "transfer_failed") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class ChecksumMismatch(TransferError):
    """The received bytes do not hash to the checksum the sender announced."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="checksum_mismatch")


class StreamReset(TransferError):
    """The other side aborted the stream."""


class UnsafePathError(TransferError, ValueError):
    """A file name from the network would escape, or is not allowed in, the storage root."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="unsafe_path")


def failure_dict(exc: BaseException, *, default_code: str = "error") -> dict[str, Any]:
    """The guide's failure result for ``exc``: ``{"success": False, "error": ..., "code": ...}``.

    The one place that turns an exception into what a caller gets back instead
    of a raise (transfer results, the CLI's per-file results, ``rpc.call``):
    ``error`` is a message for people, ``code`` a short machine-readable string.
    Errors that carry a code (:class:`RPCError`, :class:`TransferError`) keep
    it; a closed connection is ``connection_closed``; the usual ``OSError``
    subclasses get ``not_found``, ``not_a_file``, ``permission_denied`` or
    ``io_error``. Anything else gets ``default_code``, and, when it is not one
    of ours, its type name in the message (``ValueError: ...`` says more than
    a bare message from deep inside the standard library).
    """
    message: str
    code: str
    if isinstance(exc, (RPCError, TransferError)):
        message, code = exc.message, exc.code
    elif isinstance(exc, ConnectionClosed):
        message, code = exc.reason, "connection_closed"
    elif isinstance(exc, FileNotFoundError):
        message, code = f"no such file: {exc.filename or exc}", "not_found"
    elif isinstance(exc, IsADirectoryError):
        # Also what a FIFO, a device or a socket raises (transfer._local),
        # saying so: "not a regular file".
        what = "not a regular file" if exc.strerror == "not a regular file" else "is a directory"
        message, code = f"{what}: {exc.filename or exc}", "not_a_file"
    elif isinstance(exc, PermissionError):
        message, code = f"permission denied: {exc.filename or exc}", "permission_denied"
    elif isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        message, code = f"I/O error: {exc.strerror or exc}{where}", "io_error"
    elif isinstance(exc, ConduitError):
        message, code = str(exc), default_code
    else:
        message, code = f"{type(exc).__name__}: {exc}", default_code
    return {"success": False, "error": message, "code": code}


class CallbackCancelledError(ConduitError):
    """An asyncio callback's task was cancelled by something other than conduit.

    Typically the asyncio loop is shutting down and cancelled every task. Trio
    code sees an ordinary exception instead of a foreign ``CancelledError``.
    """


__all__ = [
    "AuthModeMismatch",
    "AuthenticationError",
    "CallbackCancelledError",
    "ChecksumMismatch",
    "ConduitError",
    "ConnectionClosed",
    "HandshakeError",
    "HandshakeTimeout",
    "IntegrityError",
    "LocalProtocolError",
    "LockedOut",
    "ProtocolError",
    "RPCError",
    "RPCTimeoutError",
    "RemoteProtocolError",
    "StreamReset",
    "TransferError",
    "UnsafePathError",
]
