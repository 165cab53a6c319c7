"""What a server does with a connection before it is authenticated.

Every rule here bounds what an unauthenticated peer can make the server do:

- **Sockets**: at most ``max_unauthenticated_per_address`` connections per
  address and ``max_unauthenticated`` in total may be in the handshake at once
  (apart from ``max_connections``), so an idle-socket flood from one address
  cannot take the slots of the others.
- **Attempts before work**: the CLIENT_HELLO is read and its username decoded
  (no group operation), then the attempt reserves a slot in the per-address and
  per-user budgets (:mod:`conduit._throttle`) *before* any password work; only a
  success gives it back, so parallel guesses and replayed hellos are bounded.
  A handshake that fails by the server's own fault (not one of
  :data:`PEER_FAILURES`) is not the peer's attempt: released uncounted.
- **A bounded share of the event loop**: the handshake machine's steps
  (a few scalar multiplications in C, ~0.1-0.3 ms) run on the event loop while
  handshakes have used less than :data:`LOOP_SHARE` of its time lately (a
  token bucket, :class:`LoopShare`): a worker thread would cost the loop as
  much in hand-offs as the work itself. Beyond that share, and whatever a step
  costs, they run in worker threads under a ``max_handshakes``
  CapacityLimiter, so a hello flood queues there while the event loop keeps
  serving authenticated clients. The share rations handshakes that compete
  with each other: a handshake alone in the gate (no other unauthenticated
  socket) always runs inline and is not charged. It can hold the loop's other
  work up by one step at a time, which is what any inline step does (a lone
  hello also gets the early confirmation and the stock's refill, where a
  rationed one costs only its hello step: see docs/security.md); a 25 %
  share of wall time would push a single client reconnecting back to back
  (its steps take ~40 % of the time between its connects) into worker
  threads, and a lone attacker's failures are counted by the throttle. The
  accounts file is re-read (in a worker thread) only when its ``stat`` says
  it changed.
- **Locked-out addresses cost next to nothing**: :meth:`Gatekeeper.screen`
  wraps a socket listener so that a connection from an address the throttle
  has locked out is refused (one small send, then closed) inside the accept
  loop itself, before any task, handshake state or log formatting exists for
  it: under a hello flood from locked addresses that is nearly all of them.
- **Quiet logs**: warnings about failing peers are rate-limited per address.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any, NoReturn, cast

import attrs
import trio

from . import _threads
from ._accounts_reload import Reloader
from ._handshake_io import Established, read_hello, refuse, server_handshake
from ._log_limit import LimitedLog
from ._socket_io import peer_has_closed
from ._throttle import Attempt, AuthThrottle, address_key, owner_key
from .accounts import AccountRecord, Accounts
from .descriptors import ServerDescriptor
from .errors import AuthenticationError, ConnectionClosed, HandshakeError, ProtocolError
from .protocol import Frame, FrameKind, ServerHandshake
from .protocol.handshake import shared_secret
from .protocol.messages import Welcome
from .protocol.pake import Ephemerals


def _now() -> float:
    return trio.current_time()


#: Share of the event loop's time that handshake steps may take inline (see LoopShare).
LOOP_SHARE = 0.25

#: Seconds between two looks at the accounts file while serving (one ``stat``
#: each): a user removed or given a new password loses their sessions within
#: this, not at the next login.
ACCOUNTS_POLL = 1.0
#: Seconds of inline handshake work allowed in one burst (~100 handshakes).
LOOP_BURST = 0.03
#: How a handshake can end by the peer's doing: a failed attempt. (So can a
#: BaseException that is not an Exception: the ``auth_timeout`` cancelling it.)
#: Any other Exception is the server's own fault (a bug, say): the attempt
#: is given back uncounted, so that honest clients are not locked out for it.
PEER_FAILURES: tuple[type[BaseException], ...] = (
    HandshakeError,  # AuthenticationError, ...
    ProtocolError,  # the peer's bad frames, VersionMismatch
    ConnectionClosed,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
)


def _server_fault(exc: BaseException) -> bool:
    """Whether a handshake ended by the server's own fault, not the peer's doing."""
    return isinstance(exc, Exception) and not isinstance(exc, PEER_FAILURES)


def _guess_tested(handshake: ServerHandshake) -> bool:
    """Whether the peer holds what tests its password guess (our confirmation,
    sent first) without having proved it right: that attempt counts, whatever
    ended it, or a fault of ours after it (a bus outage, say) would make each
    guess free. Once the peer's own confirmation has been checked (keys set),
    it knows the password: giving its attempt back gains a guesser nothing."""
    return handshake.unconfirmed_keys is not None and handshake.keys is None


@attrs.define
class LoopShare:
    """A token bucket of event-loop seconds for inline handshake work.

    It fills at ``share`` seconds per second up to ``burst``; each inline step
    spends what it measured. While it is empty, steps go to worker threads,
    so handshakes in the gate together never take more than about ``share``
    of the loop, however many arrive and whatever each costs. (A handshake
    alone in the gate is not rationed: :attr:`Gatekeeper.alone`.)
    """

    share: float = LOOP_SHARE
    burst: float = LOOP_BURST
    #: Seconds of inline work available now (negative after an expensive step).
    tokens: float = attrs.field(init=False, default=0.0)
    _stamp: float = attrs.field(init=False, default=0.0)

    def __attrs_post_init__(self) -> None:
        self.tokens = self.burst

    def allows(self, now: float) -> bool:
        """Whether a step may run inline at ``now`` (``time.perf_counter()``)."""
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self._stamp) * self.share)
        self._stamp = now
        return self.tokens > 0

    def spend(self, seconds: float) -> None:
        """An inline step took ``seconds``."""
        self.tokens -= seconds


@attrs.define
class Refused(Exception):
    """The attempt was turned away before any password work (the peer has been told)."""

    reason: str


class Gatekeeper:
    """Admission, throttling and the handshake of one server's connections."""

    def __init__(self, descriptor: ServerDescriptor, log: logging.Logger) -> None:
        self._descriptor = descriptor
        self._log = log
        self.warnings = LimitedLog(log)
        self.throttle = AuthThrottle(
            descriptor.auth_failure_limit,
            descriptor.auth_failure_window,
            descriptor.auth_lockout,
            user_limit=descriptor.auth_user_failure_limit,
        )
        self.limiter = trio.CapacityLimiter(descriptor.max_handshakes)
        self.loop_share = LoopShare()
        #: The servers' random pairs for the next hellos, made while each
        #: handshake waits for its client (see ServerHandshake).
        self.ephemerals = Ephemerals()
        self.accounts: Accounts | None = (
            descriptor.accounts if isinstance(descriptor.accounts, Accounts) else None
        )
        self._reloader: Reloader | None = None
        self._pending: dict[str, int] = {}
        self._pending_total = 0
        # Authenticated connections per user (per address with a shared
        # password), and whom each connection's stream counts against.
        self._sessions: dict[str, int] = {}
        self._session_of: dict[trio.abc.Stream, str] = {}
        # Resuming clients let past their owner's share, not counted yet:
        # each is counted only if it replaces one of that owner's
        # connections (see admit_resumed).
        self._past_share: dict[trio.abc.Stream, str] = {}
        # A slot handed over by admit_resumed: the new stream's, from the
        # stream it replaces (None once that one has ended), and back.
        self._replaces: dict[trio.abc.Stream, trio.abc.Stream | None] = {}
        self._replaced_by: dict[trio.abc.Stream, trio.abc.Stream] = {}
        # Set (and replaced) whenever an attempt settles: attempts queued
        # behind a budget full of in-flight ones look again.
        self._settled = trio.Event()

    async def prepare(self) -> None:
        """Before serving: the shared password's stretch, or the accounts file, in a thread.

        Both take long enough (Argon2id; file I/O) to stall the event loop.
        """
        descriptor = self._descriptor
        if descriptor.password is not None:
            await _threads.run_sync(shared_secret, descriptor.password)
        elif self.accounts is None:
            path = cast("str | os.PathLike[str]", descriptor.accounts)
            self.accounts = await _threads.run_sync(Accounts, path)

    # ------------------------------------------------------------------ sockets

    def admit(self, host: str) -> str | None:
        """Count a new unauthenticated socket; the refusal reason when over a cap."""
        descriptor = self._descriptor
        if self._pending.get(host, 0) >= descriptor.max_unauthenticated_per_address:
            return (
                f"too many connections from {host} still authenticating "
                f"(max_unauthenticated_per_address={descriptor.max_unauthenticated_per_address})"
            )
        if self._pending_total >= descriptor.max_unauthenticated:
            return (
                "too many connections still authenticating "
                f"(max_unauthenticated={descriptor.max_unauthenticated})"
            )
        self._pending[host] = self._pending.get(host, 0) + 1
        self._pending_total += 1
        return None

    def release(self, host: str) -> None:
        """The socket admitted for ``host`` authenticated or ended."""
        left = self._pending[host] - 1
        if left:
            self._pending[host] = left
        else:
            del self._pending[host]
        self._pending_total -= 1

    def end_session(self, stream: trio.abc.Stream) -> None:
        """The connection on ``stream`` ended: its user (or address) may hold another."""
        self._past_share.pop(stream, None)
        successor = self._replaced_by.pop(stream, None)
        replaced = self._replaces.pop(stream, None)
        if successor is not None and successor in self._replaces:
            # Replaced in turn: its successor holds the slot, and should it
            # end first, gives it back to what this one replaced, if open.
            self._replaces[successor] = replaced
            if replaced is not None:
                self._replaced_by[replaced] = successor
            replaced = None
        owner = self._session_of.pop(stream, None)
        if owner is None:
            return
        if replaced is not None:
            # It ended before the connection it was to replace (its WELCOME
            # never went, say): that one, still open, has its slot back.
            del self._replaced_by[replaced]
            self._session_of[replaced] = owner
            return
        left = self._sessions[owner] - 1
        if left:
            self._sessions[owner] = left
        else:
            del self._sessions[owner]

    def _full(self, owner: str) -> bool:
        """Whether ``owner`` holds all the connections it may."""
        return self._sessions.get(owner, 0) >= self._descriptor.connections_per_user

    def _count(self, stream: trio.abc.Stream, owner: str) -> None:
        self._sessions[owner] = self._sessions.get(owner, 0) + 1
        self._session_of[stream] = owner  # until end_session, whatever happens next

    async def _refuse_if_full(self, stream: trio.abc.Stream, owner: str) -> None:
        """Refuse a new connection of ``owner`` (Refused) if it holds all it may."""
        if self._full(owner):
            await self._refuse_as_full(stream, owner)

    async def _refuse_as_full(self, stream: trio.abc.Stream, owner: str) -> NoReturn:
        """Refuse a new connection of ``owner``, which holds all it may (Refused)."""
        limit = self._descriptor.connections_per_user
        who = f"user {owner!r}" if self.accounts is not None else f"address {owner}"
        reason = (
            f"{who} already holds all the connections it may (max_connections_per_user={limit})"
        )
        await refuse(stream, "busy", reason)
        raise Refused(reason)

    async def admit_resumed(
        self, stream: trio.abc.Stream, replacing: trio.abc.Stream | None
    ) -> None:
        """Count the resuming client on ``stream``, let past its owner's share
        (:attr:`~conduit._handshake_io.Established.past_share`), if it takes
        the place of ``replacing``: that owner's connection of the session
        its token resumed, which the server closes next (a link that died
        without the server noticing yet). Else, if its owner still holds all
        it may, refuse it (Refused; its SERVER_CONFIRM was held back: the
        client reads the refusal in its place).

        The slot is handed over, not added: ``replacing`` counts no more
        (its end gives nothing back), so a second connection resuming the
        same session (a token is good until the session that redeemed it
        hears from its client) finds nothing to replace, and each owner
        holds its share, not one more per resume. Should ``stream`` end
        first, the slot goes back to ``replacing``.

        Without this, a client whose share is one connection (a small
        ``max_connections``) could not resume its own session until the
        server's heartbeat timeout ended the dead one.
        """
        owner = self._past_share.pop(stream)
        if replacing is not None and self._session_of.get(replacing) == owner:
            del self._session_of[replacing]
            self._session_of[stream] = owner
            self._replaces[stream] = replacing
            self._replaced_by[replacing] = stream
            return
        await self._refuse_if_full(stream, owner)
        self._count(stream, owner)

    async def refuse_past_share(self, stream: trio.abc.Stream) -> NoReturn:
        """Refuse a resuming client let past its owner's share whose token
        cannot be weighed first (an older client that sends it only after
        our confirmation; a cluster, where redeeming it moves the id here):
        Refused, as at a full share."""
        await self._refuse_as_full(stream, self._past_share.pop(stream))

    # ------------------------------------------------------------------ handshake

    async def handshake(
        self,
        stream: trio.abc.Stream,
        host: str,
        welcome: Callable[[], Welcome] | None = None,
    ) -> Established:
        """Authenticate the client on ``stream``.

        ``welcome``: makes the client's WELCOME without side effects, to send
        sealed with an early SERVER_CONFIRM when the handshake allows it (see
        :func:`~conduit._handshake_io.server_handshake`; ``welcomed`` of the
        result says whether it went).

        Raises :class:`Refused` (throttled), VersionMismatch, AuthenticationError,
        ProtocolError, ConnectionClosed or Trio's stream errors.
        """
        descriptor = self._descriptor
        reader, hello, io = await read_hello(stream)
        if peer_has_closed(stream):
            # It can never confirm: a connect its client gave up on, queued in
            # the kernel while this server could not answer (suspended, its
            # loop blocked), or a peer that wants our answer to test a guess
            # against and sends nothing more. Neither gets one, nor counts as
            # a failed attempt: after a pause, the stale connects of honest
            # clients behind one address locked that address out.
            raise ConnectionClosed("the client closed its end after its hello")
        handshake = self._machine()
        username = handshake.hello_username(hello)
        # Whom the connection counts against once authenticated, counted only
        # once the password checked (a stranger naming a user holds none of
        # that user's slots). An address is checked now, before any password
        # work; a user once it proved who it is (told to a stranger, "alice
        # holds all her connections" would say that alice exists, and more).
        # A resuming client is let past a full share, to be counted once its
        # token says whether it replaces one of its owner's (admit_resumed).
        owner = owner_key(username if self.accounts is not None else None, host)
        resuming = handshake.client_resuming
        if self.accounts is None and not resuming:
            await self._refuse_if_full(stream, owner)
        while not isinstance(attempt := self.throttle.reserve(host, username, _now()), Attempt):
            if attempt > 0:
                break
            # The budget is full of attempts in flight: queue (within auth_timeout).
            await self._settled.wait()
        if not isinstance(attempt, Attempt):
            reason = (
                f"locked out: too many failed password attempts from {host}"
                f"{f' or for user {username!r}' if username else ''}; "
                f"retry in {attempt:.0f}s"
            )
            await refuse(stream, "throttled", reason, attempt)
            raise Refused(reason)
        try:

            async def run(frame: Frame) -> bytes:
                if frame.kind is FrameKind.CLIENT_HELLO and self.accounts is not None:
                    await self._refresh(self.accounts)
                return await self._step(functools.partial(handshake.receive, frame))

            def confirm_first() -> bytes | None:
                # Alone or within the loop share only: under a flood of hellos
                # (the share spent) the usual order, in which a hello that never
                # confirms costs no more than its hello step.
                confirmation: list[bytes] = []
                self._inline(lambda: confirmation.append(handshake.confirm_first()))
                return confirmation[0] if confirmation else None

            def precompute() -> None:
                # Inline only: beyond the loop share (handshakes competing),
                # the confirmation's step does this work in its worker thread,
                # not in a hand-off of its own, and the next hello's step makes
                # its own pair.
                if handshake.precompute_due:
                    self._inline(handshake.precompute)
                self._inline(self.ephemerals.refill)

            established = await server_handshake(
                stream,
                handshake,
                descriptor.max_frame_size,
                reader=reader,
                hello=hello,
                run=run,
                precompute=precompute,
                io=io,
                confirm_first=confirm_first,
                welcome=welcome,
            )
        except BaseException as exc:
            if handshake.wrong_mode or (_server_fault(exc) and not _guess_tested(handshake)):
                # Our own failure, not the peer's (the server logs it), or a
                # client set up for the other mode, which tried no password:
                # the attempt is given back, not counted against the address
                # or user (a misconfigured client must not lock out the
                # honest ones behind the same address).
                self.throttle.released(attempt, _now())
            else:
                self.throttle.failed(attempt, _now())
            self._wake()
            if handshake.unconfirmed_keys is not None and isinstance(
                exc, (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError)
            ):
                # We confirmed first and the client left without confirming:
                # what a wrong password looks like (tested offline against
                # our confirmation, its one guess), or a client gone at once.
                raise AuthenticationError(
                    "the client left without confirming after the server's confirmation "
                    "(a wrong password, or a client gone)"
                ) from exc
            raise
        self.throttle.succeeded(attempt, _now())
        self._wake()
        if resuming and self._full(owner):
            self._past_share[stream] = owner
            established.past_share = True
        else:
            if self.accounts is not None:
                # Its confirmation is still held back (Established.unsent): the
                # client reads this refusal in its place.
                await self._refuse_if_full(stream, owner)
            self._count(stream, owner)
        established.username = handshake.username
        established.account = cast("AccountRecord | None", handshake.account)
        return established

    @property
    def alone(self) -> bool:
        """Whether at most one unauthenticated socket is in the gate: the
        handshake asking to run a step has no other to compete with, so the
        loop share does not ration it (see the module's docstring)."""
        return self._pending_total <= 1

    async def _step(self, step: Callable[[], bytes]) -> bytes:
        """Run a step of the machine: inline when alone or within the loop
        share, else in a thread."""
        if self.alone:
            return step()
        started = time.perf_counter()
        if self.loop_share.allows(started):
            try:
                return step()
            finally:
                self.loop_share.spend(time.perf_counter() - started)
        return await _threads.run_sync(step, limiter=self.limiter)

    def _inline(self, step: Callable[[], object]) -> bool:
        """Run ``step`` now if alone or if the loop share allows it; whether it ran."""
        if self.alone:
            step()
            return True
        started = time.perf_counter()
        if not self.loop_share.allows(started):
            return False
        try:
            step()
        finally:
            self.loop_share.spend(time.perf_counter() - started)
        return True

    def account_change(self, account: AccountRecord | None) -> str | None:
        """Why a session authenticated as ``account`` must end: its account was
        removed or its record changed (password, root, quota, access); None
        if it stands, or if the session has no account."""
        if account is None or self.accounts is None:
            return None
        current = self.accounts.current(account.username)
        if current is None:
            return f"account {account.username!r} was removed"
        if current != account:
            return f"account {account.username!r} was changed: log in again"
        return None

    async def watch_accounts(self, on_change: Callable[[], None]) -> None:
        """While serving: re-read the accounts file when it changes (every
        :data:`ACCOUNTS_POLL` seconds), and call ``on_change`` whenever the
        records were replaced, here, before a hello, or by this process."""
        accounts = self.accounts
        assert accounts is not None
        seen = accounts.generation
        while True:
            await trio.sleep(ACCOUNTS_POLL)
            await self._refresh(accounts)
            if accounts.generation != seen:
                seen = accounts.generation
                on_change()

    async def _refresh(self, accounts: Accounts) -> None:
        """Before a hello's lookup: re-read the accounts file if it changed (one
        ``stat`` when not). A file that cannot be ``stat``-ed counts as unchanged
        (the old data stays), with a warning."""
        if accounts.changed():
            await self._reload(accounts)
        elif accounts.stat_error is not None:
            self.warnings.warning(
                "accounts file",
                _now(),
                "accounts file %s unreadable, keeping the old data: %s",
                accounts.path,
                accounts.stat_error,
            )

    async def _reload(self, accounts: Accounts) -> None:
        """Re-read the changed accounts file (a user added by ``conduit user add``
        logs in at once), waiting for it a second at most; a malformed or
        unreadable file (an I/O error, a permission refused, not a regular
        file) keeps the old data (see :mod:`._accounts_reload`)."""
        reloader = self._reloader
        if reloader is None or reloader.accounts is not accounts or not reloader.belongs_here():
            reloader = self._reloader = Reloader(accounts, self.warnings)
        await reloader.reload()

    def screen(self, listener: trio.abc.Listener[Any]) -> trio.abc.Listener[Any]:
        """``listener``, refusing locked-out addresses as it accepts (socket listeners only).

        A TLS listener is left alone: its refusal has to wait for the TLS
        handshake, which the per-connection task does.
        """
        if isinstance(listener, trio.SocketListener):
            return ScreenedListener(listener, self)
        return listener

    def locked_out(self, host: str) -> float:
        """Seconds ``host`` (an address key) stays locked out; 0 if it may try."""
        return self.throttle.retry_after(host, _now())

    def _wake(self) -> None:
        self._settled.set()
        self._settled = trio.Event()

    def _machine(self) -> ServerHandshake:
        descriptor = self._descriptor
        lookup: Callable[[str], AccountRecord] | None = None
        if self.accounts is not None:
            lookup = self.accounts.lookup
        return ServerHandshake(
            descriptor.password,
            name=descriptor.name,
            max_frame_size=descriptor.max_frame_size,
            receive_window=descriptor.receive_window,
            accounts=lookup,
            ephemerals=self.ephemerals,
        )


#: ``accept`` errors that only mean that connection is gone (Trio's list).
_IGNORED_ACCEPT_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPERM, errno.EPROTO})


class ScreenedListener(trio.abc.Listener[trio.SocketStream]):
    """A socket listener whose :meth:`accept` refuses locked-out addresses itself.

    The refusal is what the per-connection task would have sent (AUTH_FAILED
    "throttled" with ``retry_after``, in clear), but costs the server one
    accept, one small send and one close: no task, no cancel scopes, no hello
    read. What is not locked out is returned for the server to serve.

    It accepts on the listening socket itself (a duplicate of its descriptor),
    waiting for it to be readable first, then one ``accept``: what
    :meth:`trio.SocketListener.accept` does costs each connection a scheduler
    pass, an ``accept`` that fails once the backlog is empty, and the peer's
    address asked of the new socket again (twice, with the server's own
    ``getpeername``); here the address comes from the ``accept``
    (:meth:`accept_with_address`). Waiting first also keeps the accept loop
    fair under a connection flood: each connection is one pass of the scheduler.
    """

    def __init__(self, inner: trio.SocketListener, gate: Gatekeeper) -> None:
        self.inner = inner
        self._gate = gate
        listening = inner.socket
        self._inet = listening.family in (socket.AF_INET, socket.AF_INET6)
        self._listening = socket.socket(
            listening.family, listening.type, listening.proto, fileno=os.dup(listening.fileno())
        )

    @property
    def socket(self) -> trio.socket.SocketType:
        """The listening socket (as :class:`trio.SocketListener` has it)."""
        return self.inner.socket

    async def accept(self) -> trio.SocketStream:
        """The next connection from an address that is not locked out."""
        stream, _ = await self.accept_with_address()
        return stream

    async def accept_with_address(self) -> tuple[trio.SocketStream, tuple[str, int] | None]:
        """The next connection from an address that is not locked out, and that
        address (host, port); None for a socket that is not TCP."""
        listening = self._listening
        while True:
            await trio.lowlevel.wait_readable(listening)
            try:
                accepted, address = listening.accept()
            except BlockingIOError:
                continue  # the connection went away before we took it
            except OSError as exc:
                if exc.errno in _IGNORED_ACCEPT_ERRNOS:
                    continue
                if exc.errno in (errno.EBADF, errno.ENOTSOCK):
                    raise trio.ClosedResourceError("the listener was closed") from None
                raise
            stream = trio.SocketStream(trio.socket.from_stdlib_socket(accepted))
            if not self._inet:
                return stream, None
            peer = (str(address[0]), int(address[1]))
            key = address_key(peer[0])
            wait = self._gate.locked_out(key)
            if wait <= 0:
                return stream, peer
            self._gate.warnings.warning(
                key, _now(), "refused %s: too many failed password attempts", key
            )
            try:
                await refuse(
                    stream,
                    "throttled",
                    f"locked out: too many failed password attempts from {key}; "
                    f"retry in {wait:.0f}s",
                    wait,
                )
            finally:
                stream.socket.close()

    async def aclose(self) -> None:
        """Close the listening socket."""
        if self._listening.fileno() >= 0:
            trio.lowlevel.notify_closing(self._listening)
            self._listening.close()
        await self.inner.aclose()


__all__ = ["LOOP_BURST", "LOOP_SHARE", "Gatekeeper", "LoopShare", "Refused", "ScreenedListener"]
