"""Typed bodies of control frames.

Each body is a frozen attrs class (except :class:`Result`, built once per result
received: see its comment); :mod:`conduit.protocol.codec` turns them into
msgpack maps and back with cattrs, so a malformed body from the network becomes a
:class:`~conduit.errors.RemoteProtocolError`, never a stray ``KeyError``.
"""

from __future__ import annotations

from typing import Any

import attrs

from .frames import FrameKind


@attrs.frozen
class ClientHello:
    """First handshake frame: the client's limits and how it authenticates.

    Shared-password mode: ``pake`` is the SPAKE2 share ``pA`` and ``username``
    is empty. Accounts mode: ``username`` names the account and ``pake`` is
    empty (the SPAKE2+ share needs the salt the server answers with), or,
    from a client that has logged in to this account on a server that said
    it takes one (``ServerHello.early_share``), its SPAKE2+ share ``shareP``
    made with the stretch it was answered with then: ``salt``, ``opslimit``
    and ``memlimit`` name that stretch, and the server uses the share only
    if they are the account's (RFC 9383's order: the verifier can then
    confirm first, and the client is done one round trip sooner).

    ``resume``: the client will present a resume token (see :class:`Resume`)
    in its first sealed frame, before the server's WELCOME. Only a flag: the
    token itself never crosses the wire in the clear.
    """

    protocol_version: int
    name: str
    pake: bytes
    max_frame_size: int
    receive_window: int
    username: str = ""
    resume: bool = False
    salt: bytes = b""
    opslimit: int = 0
    memlimit: int = 0


@attrs.frozen
class ServerHello:
    """The server's share (SPAKE2 ``pB``, or SPAKE2+ ``shareV``) and its limits.

    In accounts mode it also carries the account's Argon2id ``salt`` and cost
    (``opslimit``, ``memlimit``), so the client can stretch its password; an
    unknown username gets a deterministic fake salt, indistinguishable; and
    ``early_share``: this server takes the client's share in its next
    CLIENT_HELLO (see :class:`ClientHello`; an older server refuses one, so
    a client sends it only to a server that said so).
    """

    protocol_version: int
    name: str
    pake: bytes
    max_frame_size: int
    receive_window: int
    salt: bytes = b""
    opslimit: int = 0
    memlimit: int = 0
    early_share: bool = False


@attrs.frozen
class Confirm:
    """Key confirmation: an HMAC keyed from the transcript.

    In accounts mode the client's confirmation also carries its SPAKE2+
    share ``shareP`` (``share``); it is empty otherwise.
    """

    mac: bytes
    share: bytes = b""


@attrs.frozen
class AuthFailed:
    """The server refuses the handshake. ``code`` is machine-readable."""

    code: str
    reason: str
    retry_after: float = 0.0


@attrs.frozen
class Welcome:
    """First sealed frame from the server: the client's identity on this server.

    ``resume_token`` is a fresh random secret the client presents (sealed) when
    it reconnects, to get ``client_id`` back; it is single-use.
    """

    client_id: str
    server_name: str
    heartbeat_interval: float
    resume_token: bytes = b""


@attrs.frozen
class Resume:
    """A reconnecting client's first sealed frame (a MESSAGE frame's body on the wire).

    Sent only when its CLIENT_HELLO said ``resume``: the token of its previous
    WELCOME, so the server gives it its old client id back.
    """

    token: bytes


@attrs.frozen
class Call:
    """Invoke ``method`` on the peer. The header's stream id is the call id."""

    method: str
    args: dict[str, Any] = attrs.field(factory=dict)


# Not frozen, as the connection's events are not: the caller's side builds one
# per result received, and attrs' frozen __init__ (``object.__setattr__`` per
# field) costs ~250 ns more (timeit, with Frame's: docs/benchmark-journal.md,
# "Frames and results built unfrozen"). Treat it as read-only.
@attrs.define
class Result:
    """Outcome of a call. ``ok`` decides whether ``value`` or ``error``/``code`` count."""

    ok: bool
    value: Any = None
    error: str = ""
    code: str = ""


@attrs.frozen
class Cancel:
    """The caller gave up on the call with the header's id."""


@attrs.frozen
class Message:
    """A one-way event: no reply is expected."""

    event: str
    data: Any = None


@attrs.frozen
class Credit:
    """Grant the sender of the header's stream ``increment`` more bytes."""

    increment: int


@attrs.frozen
class Reset:
    """Abort the stream in the header, with a reason for the other side."""

    code: str
    reason: str


@attrs.frozen
class Ping:
    """Liveness probe; the peer answers with :class:`Pong` carrying the same nonce."""

    nonce: int


@attrs.frozen
class Pong:
    """Answer to :class:`Ping`."""

    nonce: int


@attrs.frozen
class Goodbye:
    """Orderly close, with the reason.

    ``going_away``: the sender itself is going away (a server shutting
    down, to restart or not), as WebSocket's 1001 and HTTP/2's GOAWAY say;
    the connection was not ended for the peer's sake, so a client with
    automatic reconnect comes back. From a client: it comes back on its
    resume token (the handshake of a cancelled ``connect()``, finished
    alone). Absent (an older peer), it is False: the connection was closed on
    purpose, and is not to be reopened by itself; a client's then says it
    forgot its resume token, which its server forgets too.
    """

    reason: str
    going_away: bool = False


Body = (
    ClientHello
    | ServerHello
    | Confirm
    | AuthFailed
    | Welcome
    | Resume
    | Call
    | Result
    | Cancel
    | Message
    | Credit
    | Reset
    | Ping
    | Pong
    | Goodbye
)

#: Which body class each control frame kind carries.
BODY_TYPES: dict[FrameKind, type[Any]] = {
    FrameKind.CLIENT_HELLO: ClientHello,
    FrameKind.SERVER_HELLO: ServerHello,
    FrameKind.CLIENT_CONFIRM: Confirm,
    FrameKind.SERVER_CONFIRM: Confirm,
    FrameKind.AUTH_FAILED: AuthFailed,
    FrameKind.WELCOME: Welcome,
    FrameKind.CALL: Call,
    FrameKind.RESULT: Result,
    FrameKind.CANCEL: Cancel,
    FrameKind.MESSAGE: Message,
    FrameKind.CREDIT: Credit,
    FrameKind.RESET: Reset,
    FrameKind.PING: Ping,
    FrameKind.PONG: Pong,
    FrameKind.GOODBYE: Goodbye,
}
