"""Driving the sans-IO handshake over a Trio stream.

The caller bounds each function with its own timeout; these only move bytes
between the socket and :mod:`conduit.protocol.handshake`.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Awaitable, Callable

import attrs
import trio

from . import _threads
from ._socket_io import SocketIO
from ._stored_errors import detached
from .accounts import AccountRecord
from .errors import ConnectionClosed, HandshakeError, RemoteProtocolError
from .protocol import (
    ClientHandshake,
    Frame,
    FrameKind,
    FrameReader,
    FrameWriter,
    HandshakeState,
    ServerHandshake,
    SessionKeys,
)
from .protocol.codec import decode_body, encode_frame, structure_from_wire, unpack
from .protocol.frames import PROTOCOL_VERSION
from .protocol.handshake import peer_version, refusal_frame, version_refusal
from .protocol.messages import Resume, Welcome

_CHUNK = 4096


@attrs.define
class Established:
    """A finished handshake: the keyed reader/writer and what the peer told us."""

    reader: FrameReader
    writer: FrameWriter
    keys: SessionKeys
    peer_name: str
    #: Server side, accounts mode: the authenticated user and its record.
    username: str | None = None
    account: AccountRecord | None = None
    #: Server side: the client announced a resume token (read it with :func:`read_resume`).
    resuming: bool = False
    #: Server side: the SERVER_CONFIRM, held back to go out in one send with
    #: the WELCOME (:func:`welcome_record`), or before the resume token is read.
    unsent: bytes = b""
    #: The socket's fast path (plain sockets only), for the session to go on
    #: with: it knows whether the last read drained the socket.
    io: SocketIO | None = None
    #: Server side: the WELCOME already sent, sealed, with an early
    #: SERVER_CONFIRM (see :func:`server_handshake`); None when it is still due.
    welcomed: Welcome | None = None
    #: Server side: a resuming client whose user (or address) already held
    #: all the connections it may; served only if its token resumes one of
    #: them (see :meth:`~conduit._gatekeeper.Gatekeeper.admit_resumed`).
    past_share: bool = False


async def _receive(stream: trio.abc.Stream, io: SocketIO | None) -> bytes | bytearray:
    """Up to _CHUNK bytes; on a plain socket (``io``, one per connection) without
    Trio's per-call overhead (:mod:`conduit._socket_io`: a scheduler pass per
    call, each handshake makes five)."""
    if io is None:
        return await stream.receive_some(_CHUNK)
    return await io.receive(_CHUNK)


async def send_bytes(
    stream: trio.abc.Stream, data: bytes | bytearray, io: SocketIO | None = None
) -> None:
    """Send all of ``data``: on a plain socket written at once when it fits (a
    handshake message always does, so there is nothing to wait for or shield),
    else the rest the Trio way. ``io``: the stream's fast path, if the caller
    has one."""
    if io is None:
        io = SocketIO.of(stream)
    if io is not None:
        sent = io.send_now(data)
        if sent == len(data):
            return
        data = data[sent:]
    await stream.send_all(data)


async def _next_frame(stream: trio.abc.Stream, reader: FrameReader, io: SocketIO | None) -> Frame:
    while (frame := reader.next_frame()) is None:
        data = await _receive(stream, io)
        if not data:
            raise ConnectionClosed("peer closed the connection during the handshake")
        reader.feed(data)
    return frame


_TLS_HINT = "use --tls / tls=True"
_PLAIN_HINT = "connect without --tls / tls=True"
#: What OpenSSL calls bytes that are no TLS record, in reply to a ClientHello:
#: "wrong version number" up to 3.1, "record layer failure" from 3.2 on.
_NOT_TLS_REASONS = frozenset({"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE"})


def _looks_like_tls(data: bytes | bytearray) -> bool:
    """Whether ``data`` starts with a TLS record header (alert or handshake, version 3.x)."""
    return len(data) >= 2 and data[0] in (0x15, 0x16) and data[1] == 0x03


async def _first_reply(stream: trio.abc.Stream, reader: FrameReader, io: SocketIO | None) -> None:
    """Read the server's first bytes, recognising a TLS server spoken to in plain text.

    A TLS server answers our HELLO with a TLS record (an alert) or just hangs up;
    either way the user needs one hint, not a timeout or a bare "closed".
    """
    data = await _receive(stream, io)
    if not data:
        # Two causes look alike from here: a TLS server hanging up on plain
        # text, and a proxy or load balancer that took the connection but
        # could not reach its server (a review found the TLS hint alone
        # misleading behind one).
        raise ConnectionClosed(
            "the server closed the connection without answering: it may speak TLS "
            f"({_TLS_HINT}), or a proxy in front of it could not reach it"
        )
    if _looks_like_tls(data):
        raise HandshakeError(f"the server speaks TLS; {_TLS_HINT}")
    reader.feed(data)


async def open_tls(
    stream: trio.abc.Stream, context: ssl.SSLContext, server_hostname: str
) -> trio.SSLStream[trio.abc.Stream]:
    """Run the client's TLS handshake on ``stream``; a failure is a ConduitError in words.

    A plain server answers a TLS ClientHello with a plain AUTH_FAILED (see
    :func:`read_hello`), which OpenSSL reads as no TLS record (see
    :data:`_NOT_TLS_REASONS`): the user is told to drop TLS rather than shown
    OpenSSL's words alone.
    """
    tls = trio.SSLStream(stream, context, server_hostname=server_hostname, https_compatible=False)
    try:
        await tls.do_handshake()
    except trio.BrokenResourceError as exc:
        await trio.aclose_forcefully(tls)
        # trio's error has no text of its own; the SSL error is its cause.
        cause = exc.__cause__ or exc
        if isinstance(cause, ssl.SSLError) and cause.reason in _NOT_TLS_REASONS:
            raise HandshakeError(
                f"the server does not speak TLS (it answered in plain TCP); {_PLAIN_HINT}"
            ) from exc
        raise ConnectionClosed(f"TLS handshake failed: {cause}") from exc
    except BaseException:
        await trio.aclose_forcefully(tls)
        raise
    return tls


async def client_handshake(
    stream: trio.abc.Stream,
    handshake: ClientHandshake,
    max_frame_size: int,
    resume_token: bytes = b"",
    *,
    on_cancel: Callable[[ClientRun], bool] | None = None,
) -> tuple[Established, Welcome]:
    """Authenticate to the server; return the session and its WELCOME.

    With a ``resume_token`` (the ``handshake`` must have been made with
    ``resume=True``), present it sealed, first thing, to get the old client id
    back: in the same send as the CLIENT_CONFIRM, sealed with the keys that
    confirmation commits to (only a server that knows the password, hence
    those keys, can open it; and it opens it only after checking the
    confirmation), so the server answers both at once with its SERVER_CONFIRM
    and the WELCOME: a round trip fewer than sending it after the server's
    confirmation. A SERVER_HELLO that costs an Argon2id stretch (accounts mode, the
    first connect of a ``Client``) is handled in a worker thread; every other
    step (a few scalar multiplications, or one HMAC) inline.

    ``on_cancel(run)``: called when a cancellation stops the handshake where
    it can go on (:attr:`ClientRun.resumable`); True if it takes the
    handshake over (to finish it in another task: the stream is that task's
    now), False to let it end here. Ended in any other way, the handshake is
    over (the caller closes the stream).
    """
    run = ClientRun(stream, handshake, max_frame_size, resume_token)
    try:
        return await run.run()
    except trio.Cancelled:
        if on_cancel is None or not run.resumable or not on_cancel(run):
            run.give_up()
        raise
    except BaseException:
        run.give_up()
        raise


@attrs.define(eq=False)
class ClientRun:
    """One client handshake over ``stream`` (see :func:`client_handshake`),
    which a task other than the one that began it can finish.

    :meth:`run` drives it to its end. A :meth:`run` cancelled while it waited
    for the server loses nothing: the bytes read so far stay in the reader, a
    frame taken and not yet handled stays pending, and a send never waits
    when the socket takes it whole (a handshake message always fits). While
    :attr:`resumable`, :meth:`run` may be called again, from any task, to go
    on from there (see :func:`client_handshake`'s ``on_cancel``). Whoever
    drops it instead calls :meth:`give_up` and closes the stream.
    """

    stream: trio.abc.Stream
    handshake: ClientHandshake
    max_frame_size: int
    resume_token: bytes = b""
    _reader: FrameReader = attrs.field(init=False, factory=FrameReader)
    _writer: FrameWriter = attrs.field(init=False, factory=FrameWriter)
    _io: SocketIO | None = attrs.field(init=False, default=None)
    #: The server's first bytes were read (and were not a TLS server's).
    _replied: bool = attrs.field(init=False, default=False)
    #: The resume token went with our CLIENT_CONFIRM, sealed.
    _sealing: bool = attrs.field(init=False, default=False)
    #: A frame taken from the reader, not yet handled (a cancellation came
    #: between: the stretch's hand-off to a thread checks for one first).
    _frame: Frame | None = attrs.field(init=False, default=None)
    #: The records after the server's confirmation are being read.
    _keyed: bool = attrs.field(init=False, default=False)
    #: A send was under way: cancelled there, what reached the socket is unknown.
    _sending: bool = attrs.field(init=False, default=False)
    #: It ended: done, failed, or given up.
    _over: bool = attrs.field(init=False, default=False)

    def __attrs_post_init__(self) -> None:
        self._io = SocketIO.of(self.stream)

    @property
    def resumable(self) -> bool:
        """Whether our hello went out and the run stopped only where it can go on
        (cancelled while it waited for the server, never within a send)."""
        return (
            self.handshake.state is not HandshakeState.START
            and not self._sending
            and not self._over
        )

    def give_up(self) -> None:
        """Drop the handshake (the caller closes the stream): see
        :meth:`ClientHandshake.abandon`."""
        if not self._over:
            self._over = True
            self.handshake.abandon()

    async def run(self) -> tuple[Established, Welcome]:
        """Go on with the handshake until the WELCOME; the session and that WELCOME.

        Any error but a cancellation ends it (:meth:`give_up` is done here).
        """
        if self._over:
            raise RuntimeError("this handshake has ended")
        try:
            result = await self._run()
        except trio.Cancelled:
            raise  # the caller decides: take it on elsewhere, or give up
        except BaseException:
            self.give_up()
            raise
        self._over = True
        return result

    async def _send(self, data: bytes | bytearray) -> None:
        self._sending = True
        await send_bytes(self.stream, data, self._io)
        self._sending = False

    async def _run(self) -> tuple[Established, Welcome]:
        stream, handshake, reader, io = self.stream, self.handshake, self._reader, self._io
        if handshake.state is HandshakeState.START:
            await self._send(handshake.start())
            handshake.precompute()  # while the server works on its hello
        if not self._replied:
            await _first_reply(stream, reader, io)
            self._replied = True
        while handshake.keys is None:
            if self._frame is None:
                self._frame = await _next_frame(stream, reader, io)
            frame = self._frame
            if handshake.will_stretch(frame):
                # Cancelled, it raises before the thread starts: the frame
                # stays pending, unhandled.
                reply = await _threads.run_sync(handshake.receive, frame)
            else:
                reply = handshake.receive(frame)
            self._frame = None
            reply = self._with_token(reply)
            if reply:
                await self._send(reply)
            if io is not None:
                # A server that confirms first sends its confirmation right
                # behind its hello, not in answer to ours: while we worked on the
                # hello it has usually arrived, so the read goes first.
                io.may_have_more()
        keys = handshake.keys
        if not self._keyed:
            self._keyed = True
            reader.start_decryption(keys.receive_key, self.max_frame_size)
            if not self._sealing:
                self._writer.start_encryption(keys.send_key, keys.peer_max_frame_size)
        frame = await _next_frame(stream, reader, io)
        if frame.kind is not FrameKind.WELCOME:
            raise RemoteProtocolError(f"expected WELCOME, got {frame.kind.name}")
        welcome = decode_body(frame, Welcome)
        established = Established(reader, self._writer, keys, handshake.server_name, io=io)
        return established, welcome

    def _with_token(self, reply: bytes) -> bytes:
        """``reply``, followed by the sealed resume token if it is the CLIENT_CONFIRM."""
        early = self.handshake.unconfirmed_keys
        if not self.resume_token or early is None or self._sealing:
            return reply
        # The reply is the CLIENT_CONFIRM: the token goes with it.
        self._sealing = True
        self._writer.start_encryption(early.send_key, early.peer_max_frame_size)
        (record,) = self._writer.write_frames(
            [(encode_frame(FrameKind.MESSAGE, 0, Resume(self.resume_token)),)]
        )
        return reply + record


class VersionMismatch(RemoteProtocolError):
    """The peer speaks another protocol version (it has been told so)."""


async def read_hello(stream: trio.abc.Stream) -> tuple[FrameReader, Frame, SocketIO | None]:
    """The client's first frame, the reader to go on with, and the stream's fast path.

    A peer whose first header names another protocol version gets an
    AUTH_FAILED in its own version's header (an old client then reports a
    protocol version error, not a MAC failure), then VersionMismatch.
    """
    reader = FrameReader()
    # The connection's task has just started, and its client's hello is
    # usually there already: the client sends it right after TCP's handshake,
    # while the server wakes for the accept and starts this task. So the read
    # is tried at once, with no scheduler pass of its own (the task's start
    # was one); a hello not there yet is waited for as any read.
    io = SocketIO.of(stream, just_started=True)
    first = await _receive(stream, io)
    if not first:
        raise ConnectionClosed("peer closed the connection during the handshake")
    version = peer_version(first)
    if version is not None and version != PROTOCOL_VERSION:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(version_refusal(version))
        raise VersionMismatch(
            f"peer speaks protocol version {version}, this side speaks {PROTOCOL_VERSION}"
        )
    if _looks_like_tls(first):
        # A TLS client on a plain server: tell it in the one way its TLS stack
        # can notice (bytes that are no TLS record), and say so in our log.
        await refuse(stream, "tls", f"this server does not use TLS; {_PLAIN_HINT}")
        raise RemoteProtocolError("the client speaks TLS; this server serves plain TCP")
    reader.feed(first)
    return reader, await _next_frame(stream, reader, io), io


async def server_handshake(
    stream: trio.abc.Stream,
    handshake: ServerHandshake,
    max_frame_size: int,
    *,
    reader: FrameReader,
    hello: Frame,
    run: Callable[[Frame], Awaitable[bytes]],
    precompute: Callable[[], object] | None = None,
    io: SocketIO | None = None,
    confirm_first: Callable[[], bytes | None] | None = None,
    welcome: Callable[[], Welcome] | None = None,
) -> Established:
    """Check the client's password proof; raise AuthenticationError if it is wrong.

    ``hello`` is the first frame (from :func:`read_hello`); ``run(frame)``
    feeds a frame to ``handshake`` (inline or in a worker thread, as the
    server's gatekeeper decides) and returns its reply. ``precompute()`` is
    called after each reply is sent, while the client works on its answer:
    the gatekeeper runs there what needs nothing from the client, if it lets
    it run inline (:meth:`ServerHandshake.precompute` when
    :attr:`~ServerHandshake.precompute_due`, so that the server's
    multiplication overlaps the client's instead of coming before it, else
    the CLIENT_CONFIRM's step does that work; and the next handshake's random
    pair).

    With ``confirm_first`` (runs :meth:`ServerHandshake.confirm_first` if
    the server can afford it now, else returns None) and ``welcome`` (makes
    the WELCOME, with no side effect: it is only a promise until the client
    has confirmed), a client
    that is not resuming gets the SERVER_CONFIRM and the sealed WELCOME right
    behind the SERVER_HELLO, before we read its confirmation: its
    ``connect()`` ends one round trip sooner, as soon as it has checked our
    confirmation and sent its own. The SERVER_HELLO goes alone, first, so
    that the client's multiplications run while we make our confirmation.
    The returned :class:`Established` names that WELCOME (``welcomed``); it
    is returned only once the client's confirmation has checked, as always.
    A resuming client's WELCOME waits for its token (:func:`read_resume`).
    """
    writer = FrameWriter()
    reply = await run(hello)
    welcomed: Welcome | None = None
    if (
        confirm_first is not None
        and welcome is not None
        and handshake.can_confirm_first
        and not handshake.client_resuming
    ):
        # The SERVER_HELLO goes at once: the client's multiplications (one
        # with the shared password, two with SPAKE2+) then run while we make
        # our confirmation, instead of after it.
        await send_bytes(stream, reply, io)
        reply = b""
        if (confirmation := confirm_first()) is not None:
            early = handshake.unconfirmed_keys
            assert early is not None
            writer.start_encryption(early.send_key, early.peer_max_frame_size)
            welcomed = welcome()
            (record,) = writer.write_frames([(encode_frame(FrameKind.WELCOME, 0, welcomed),)])
            reply = confirmation + record
    while handshake.keys is None:
        if reply:
            await send_bytes(stream, reply, io)
        if handshake.error is not None:
            raise detached(handshake.error)
        if precompute is not None:
            precompute()
        reply = await run(await _next_frame(stream, reader, io))
    # ``reply``: the SERVER_CONFIRM, held back to go with the WELCOME, or
    # nothing if it went first.
    keys = handshake.keys
    reader.start_decryption(keys.receive_key, max_frame_size)
    if welcomed is None:
        writer.start_encryption(keys.send_key, keys.peer_max_frame_size)
    return Established(
        reader,
        writer,
        keys,
        handshake.client_name,
        resuming=handshake.client_resuming,
        unsent=reply,
        io=io,
        welcomed=welcomed,
    )


async def read_resume(
    stream: trio.abc.Stream, established: Established, *, confirm: bool = True
) -> bytes | None:
    """The resume token an authenticated client announced (its first sealed frame).

    A client sends it with its CLIENT_CONFIRM: then it is read already, and
    the SERVER_CONFIRM stays held back to go out with the WELCOME (one send
    answers both). An older client sends it only once it has the
    SERVER_CONFIRM: when the token has not come with the confirmation, that
    goes out first, then the token is awaited; with ``confirm=False`` (the
    server may still refuse the client, in the confirmation's place) None
    is returned instead.
    """
    reader = established.reader
    frame = reader.next_frame()
    if frame is None:
        if not confirm:
            return None
        if established.unsent:
            unsent, established.unsent = established.unsent, b""
            await send_bytes(stream, unsent, established.io)
        frame = await _next_frame(stream, reader, established.io)
    if frame.kind is not FrameKind.MESSAGE:
        raise RemoteProtocolError(f"expected the resume token, got {frame.kind.name}")
    # A MESSAGE frame in form (the one kind a sealed channel may open with),
    # but only ever read here, before the connection's state machine runs.
    return structure_from_wire(unpack(frame.payload), Resume, what="resume token").token


def welcome_record(established: Established, welcome: Welcome) -> bytes | bytearray:
    """What the server sends to end the handshake: the SERVER_CONFIRM if still
    held back, then the WELCOME, its first sealed record (one send, one wake-up
    of the client)."""
    (record,) = established.writer.write_frames([(encode_frame(FrameKind.WELCOME, 0, welcome),)])
    if established.unsent:
        unsent, established.unsent = established.unsent, b""
        return unsent + record
    return record


async def refuse(stream: trio.abc.Stream, code: str, reason: str, retry_after: float = 0.0) -> None:
    """Tell a connecting client why it is turned away, best effort.

    The caller closes the stream (the server's per-connection task always
    does, last thing): a refusal is the common case under a flood, so it is
    not closed twice.
    """
    with trio.move_on_after(1):
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(refusal_frame(code, reason, retry_after))


__all__ = [
    "ClientRun",
    "Established",
    "VersionMismatch",
    "client_handshake",
    "open_tls",
    "read_hello",
    "read_resume",
    "refuse",
    "send_bytes",
    "server_handshake",
    "welcome_record",
]
