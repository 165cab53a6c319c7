"""The password handshakes, sans-IO: SPAKE2 for a shared password, SPAKE2+ for accounts.

Shared password (balanced, RFC 9382)::

    client (A)                                server (B)
      CLIENT_HELLO  {pA, name, limits}       ->
                                             <-  SERVER_HELLO  {pB, name, limits}
      CLIENT_CONFIRM {cA}                    ->
                                             <-  SERVER_CONFIRM {cB}
                                                 (or AUTH_FAILED {code, reason})

or, the server confirming first (:meth:`ServerHandshake.confirm_first`: the
client reads the same frames in the same order, one round trip sooner)::

      CLIENT_HELLO  {pA, name, limits}       ->
                                             <-  SERVER_HELLO  {pB, name, limits}
                                                 SERVER_CONFIRM {cB}
      CLIENT_CONFIRM {cA}                    ->
                                                 (AUTH_FAILED if cA is wrong)

Accounts (augmented, RFC 9383; the server holds only ``w0`` and ``L = w1*P``)::

    client (prover)                           server (verifier)
      CLIENT_HELLO {username, name, limits}  ->
                                             <-  SERVER_HELLO {shareV, salt, cost, ...}
      CLIENT_CONFIRM {shareP, confirmP}      ->
                                             <-  SERVER_CONFIRM {confirmV}
                                                 (or AUTH_FAILED {code, reason})

or, from a client that has logged in before (its :class:`ProverCache` holds
the account's stretch, and the server said it takes an early share),
RFC 9383's own order, the verifier confirming first::

      CLIENT_HELLO {username, shareP, salt, cost, ...}  ->
                                             <-  SERVER_HELLO {shareV, salt, cost, ...}
                                                 SERVER_CONFIRM {confirmV}
      CLIENT_CONFIRM {confirmP}              ->
                                                 (AUTH_FAILED if confirmP is wrong)

(if the salt or cost changed meanwhile, the server ignores the early share and
the first flow follows: the client's confirmation brings a new one).

The cryptography is :mod:`conduit.protocol.pake`'s. What is bound in:

- the two roles' identities: SPAKE2's ``idA``/``idB`` are ``conduit-client``
  and ``conduit-server``; SPAKE2+'s are the username and ``conduit-server``
  (a reflected message is never accepted);
- the protocol version and both hello payloads exactly as they crossed the wire
  (names, limits, username, salt, cost): hashed into SPAKE2's AAD and into
  SPAKE2+'s ``Context``, so a tampered hello fails the confirmation.

Each connection allows one online guess: every share commits its sender to one
password guess. In the accounts flow of a first login the verifier sends
``shareV`` with the salt, before it has seen ``shareP``, so the prover confirms
first: ``confirmP`` lets a server that does not hold the verifier test only the
one ``w0`` its ``shareV`` committed to (testing another needs ``x*N``, a
Diffie-Hellman problem). That is two round trips; with the prover's share in
the hello (a returning client) the verifier confirms first, as in RFC 9383,
and so does the shared-password server: one round trip. Whichever side
confirms first, its MAC tests only the one password the other's share
committed to.

An unknown username gets a deterministic fake record from the lookup (same
salt each time, a verifier nobody can match), so it costs the server the same
work and the client sees the same message as a wrong password.

Every call of :meth:`ServerHandshake.receive` and :meth:`ClientHandshake.receive`
(and of their ``precompute``, the part of the next step that needs nothing
from the peer, done while waiting for it)
is pure CPU work on the machine's own state, safe to run in a worker thread
(``trio.to_thread.run_sync(handshake.receive, frame)``); the server's costs
~0.3-0.6 ms of scalar multiplications, the client's first SERVER_HELLO in
accounts mode may run the Argon2id stretch (~0.1-0.2 s) unless its
:class:`ProverCache` already holds it. :func:`hello_username` reads the
username of a CLIENT_HELLO without any group operation, so the server can count
the attempt (per user and per address) before it does the work.

Old peers: the version is the frame header's (``frames.PROTOCOL_VERSION``, the
single source, checked by :func:`~conduit.protocol.codec.parse_header`) and
again in each hello. A server can answer an old client in that client's own
header version with :func:`version_refusal`, which the old client reports as a
refusal naming the protocol version rather than a MAC failure.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol, TypeVar

import attrs

from ..errors import (
    AuthenticationError,
    AuthModeMismatch,
    ConnectionClosed,
    LockedOut,
    RemoteProtocolError,
)
from . import pake
from .codec import body_converter, decode_body, encode_frame, pack
from .frames import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_FRAME_SIZE,
    MAX_WINDOW,
    MIN_FRAME_SIZE,
    MIN_WINDOW,
    PROTOCOL_VERSION,
    Frame,
    FrameKind,
    check_version,
)
from .messages import AuthFailed, ClientHello, Confirm, ServerHello

_T = TypeVar("_T")

#: Handshake frames are tiny; anything larger is hostile.
HANDSHAKE_MAX_FRAME = 4096
CLIENT_IDENTITY = b"conduit-client"
SERVER_IDENTITY = b"conduit-server"
_VERSION_LABEL = b"conduit protocol v%d" % PROTOCOL_VERSION
_SESSION_LABEL = b"conduit v%d session keys" % PROTOCOL_VERSION
_ACCOUNTS_CONTEXT = b"conduit v%d SPAKE2+-edwards25519-SHA256-HKDF-SHA256-HMAC-SHA256" % (
    PROTOCOL_VERSION
)
_MAX_NAME = 256
#: Usernames longer than this are refused before any lookup (Accounts allows 64).
MAX_USERNAME = 128

#: AUTH_FAILED codes that mean "the credentials were refused".
AUTH_CODES = frozenset({"wrong_password", "throttled", "auth_mode"})
#: What a client is told for a wrong username or a wrong password: one message.
ACCOUNTS_REFUSAL = "authentication failed: wrong username or password"
#: What a shared-password client says when the server's confirmation does not
#: match: the server confirms first, so this is what a wrong password looks
#: like (and an impostor, which the client cannot tell apart from it).
SHARED_MISMATCH = (
    "authentication failed: wrong password, or a server that could not prove it knows the password"
)


class HandshakeState(enum.Enum):
    """Where a handshake stands."""

    START = "start"
    WAIT_SERVER_HELLO = "wait_server_hello"
    WAIT_CLIENT_HELLO = "wait_client_hello"
    WAIT_CLIENT_CONFIRM = "wait_client_confirm"
    WAIT_SERVER_CONFIRM = "wait_server_confirm"
    DONE = "done"
    FAILED = "failed"


@attrs.frozen(repr=False)
class SessionKeys:
    """What a finished handshake yields: keys (never printed) and the peer's limits."""

    send_key: bytes
    receive_key: bytes
    peer_name: str
    peer_max_frame_size: int
    peer_receive_window: int

    def __repr__(self) -> str:
        return f"SessionKeys(peer_name={self.peer_name!r}, <keys hidden>)"


class AccountVerifier(Protocol):
    """What the server's account lookup returns for a username (real or fake)."""

    @property
    def salt(self) -> bytes:
        """The account's Argon2id salt."""

    @property
    def stretch(self) -> pake.StretchParams:
        """The account's Argon2id cost."""

    @property
    def verifier(self) -> pake.Verifier:
        """``w0`` and ``L``."""


#: ``lookup(username)``: never raises for an unknown user, returns a fake record.
AccountLookup = Callable[[str], AccountVerifier]


class ProverCache:
    """The client's stretched secrets, kept for the life of a ``Client``.

    Keyed by everything the stretch depends on, so a reconnect to the same
    account pays no Argon2id; bounded, so a server that changes salts on every
    connection costs memory for a few entries only. Thread-safe.
    """

    def __init__(self, maxsize: int = 4) -> None:
        self._maxsize = maxsize
        self._entries: OrderedDict[tuple[str, str, bytes, pake.StretchParams], pake.ProverSecret]
        self._entries = OrderedDict()
        # (password, username) -> the stretch a server that takes early
        # shares last answered with: what the next hello's share is made with.
        self._hints: OrderedDict[tuple[str, str], tuple[bytes, pake.StretchParams]]
        self._hints = OrderedDict()
        self._lock = threading.Lock()

    def secret(
        self, password: str, username: str, salt: bytes, params: pake.StretchParams
    ) -> pake.ProverSecret:
        """``(w0, w1)`` for these inputs, stretched on the first call only."""
        key = (password, username, salt, params)
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                return found
        secret = pake.prover_secret(password, salt, params, username.encode(), SERVER_IDENTITY)
        with self._lock:
            self._entries[key] = secret
            while len(self._entries) > self._maxsize:
                self._entries.popitem(last=False)
        return secret

    def remember(
        self, password: str, username: str, salt: bytes, params: pake.StretchParams
    ) -> None:
        """A server that takes early shares answered this account with this stretch."""
        with self._lock:
            self._hints[(password, username)] = (salt, params)
            self._hints.move_to_end((password, username))
            while len(self._hints) > self._maxsize:
                self._hints.popitem(last=False)

    def forget(self, password: str, username: str) -> None:
        """Send no early share for this account until :meth:`remember` again."""
        with self._lock:
            self._hints.pop((password, username), None)

    def early(
        self, password: str, username: str
    ) -> tuple[bytes, pake.StretchParams, pake.ProverSecret] | None:
        """The stretch :meth:`remember` kept for this account and its secret,
        if both are held (nothing is stretched here): what an early share is
        made with. None otherwise."""
        with self._lock:
            hint = self._hints.get((password, username))
            if hint is None:
                return None
            secret = self._entries.get((password, username, *hint))
            return None if secret is None else (*hint, secret)

    def holds(self, password: str, username: str, salt: bytes, params: pake.StretchParams) -> bool:
        """Whether :meth:`secret` for these inputs would return at once (no stretch)."""
        with self._lock:
            return (password, username, salt, params) in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __deepcopy__(self, memo: dict[int, object]) -> ProverCache:
        # A cache is shared, never copied (copies of a machine share its Client's).
        return self


def shared_secret(password: str) -> pake.BalancedSecret:
    """The shared-password mode's stretched ``w`` (memoised per process).

    The first call per password runs Argon2id (64 MiB; 0.07 s of one core on the
    2026-12-06 benchmark machine, more on slower ones): servers and
    clients call it in a worker thread before their first handshake.
    """
    secret = pake.balanced_secret(password, CLIENT_IDENTITY, SERVER_IDENTITY)
    _stretched.add(password)
    return secret


# Passwords whose stretch this process has done (pake.balanced_secret keeps the
# results, keyed by the password too): lets callers skip the trip to a worker
# thread when there is nothing to wait for.
_stretched: set[str] = set()


def shared_secret_ready(password: str) -> bool:
    """Whether :func:`shared_secret` has been computed for ``password`` in this process."""
    return password in _stretched


def account_verifier(
    password: str, username: str, salt: bytes, params: pake.StretchParams
) -> pake.Verifier:
    """The verifier (``w0``, ``L``) stored for an account (used by :mod:`conduit.accounts`)."""
    return pake.register(
        pake.prover_secret(password, salt, params, username.encode(), SERVER_IDENTITY)
    )


def _hello_digest(client_hello: bytes, server_hello: bytes) -> bytes:
    return hashlib.sha256(pake.lp(_VERSION_LABEL, client_hello, server_hello)).digest()


def _check_limits(name: str, max_frame_size: int, receive_window: int, version: int) -> None:
    check_version(version)
    if len(name) > _MAX_NAME:
        raise RemoteProtocolError("peer name is too long")
    if not MIN_FRAME_SIZE <= max_frame_size <= MAX_FRAME_SIZE:
        raise RemoteProtocolError(f"peer max_frame_size {max_frame_size} is out of range")
    if not MIN_WINDOW <= receive_window <= MAX_WINDOW:
        raise RemoteProtocolError(f"peer receive window {receive_window} is out of range")


def _pake_call(what: str, call: Callable[[], _T]) -> _T:
    try:
        return call()
    except pake.PakeError as exc:
        raise RemoteProtocolError(f"invalid {what}: {exc}") from exc


def _expect(frame: Frame, kind: FrameKind, state: HandshakeState) -> None:
    if frame.kind is not kind:
        raise RemoteProtocolError(
            f"unexpected {frame.kind.name} frame during the handshake (state {state.value})"
        )


class _Handshake:
    """What both sides share: any failure leaves the machine in FAILED."""

    state: HandshakeState

    def receive(self, frame: Frame) -> bytes:
        """Process one frame from the peer; return the bytes to send (maybe none)."""
        try:
            return self._receive(frame)
        except BaseException:
            self.state = HandshakeState.FAILED
            raise

    def _receive(self, frame: Frame) -> bytes:
        raise NotImplementedError


@attrs.frozen(repr=False)
class _Pending:
    """Keys derived from the hellos, waiting for the peer's confirmation."""

    expected_mac: bytes
    client_to_server: bytes
    server_to_client: bytes


def _balanced_keys(
    secret: pake.BalancedSecret,
    share_a: bytes,
    share_b: bytes,
    k: bytes,
    client_hello: bytes,
    server_hello: bytes,
) -> tuple[pake.Spake2Keys, tuple[bytes, bytes]]:
    transcript = pake.spake2_transcript(
        CLIENT_IDENTITY, SERVER_IDENTITY, share_a, share_b, k, secret.w
    )
    aad = _hello_digest(client_hello, server_hello)
    keys = pake.spake2_keys(transcript, aad)
    return keys, pake.session_keys(keys.ke, _SESSION_LABEL + aad)


def _account_keys(
    username: str,
    w0: bytes,
    share_p: bytes,
    share_v: bytes,
    z: bytes,
    v: bytes,
    client_hello: bytes,
    server_hello: bytes,
) -> tuple[pake.Spake2PlusKeys, tuple[bytes, bytes]]:
    context = _ACCOUNTS_CONTEXT + _hello_digest(client_hello, server_hello)
    transcript = pake.spake2plus_transcript(
        context, username.encode(), SERVER_IDENTITY, pake.M, pake.N, share_p, share_v, z, v, w0
    )
    keys = pake.spake2plus_keys(transcript, share_p, share_v)
    return keys, pake.session_keys(keys.k_shared, _SESSION_LABEL)


def _check_username(username: str) -> str:
    if not username or len(username) > MAX_USERNAME:
        raise ValueError(f"a username is 1 to {MAX_USERNAME} characters")
    return username


class ClientHandshake(_Handshake):
    """Client side of the handshake. Call :meth:`start`, then feed frames to :meth:`receive`.

    ``username=None`` runs the shared-password SPAKE2 (the constructor derives
    ``w``, memoised per process: see :func:`shared_secret`); a username runs
    SPAKE2+ for that account, stretching the password when the server's salt
    arrives unless ``cache`` (the Client's :class:`ProverCache`) has it.
    """

    def __init__(
        self,
        password: str,
        *,
        name: str,
        max_frame_size: int,
        receive_window: int,
        username: str | None = None,
        cache: ProverCache | None = None,
        resume: bool = False,
    ) -> None:
        self.state = HandshakeState.START
        self.keys: SessionKeys | None = None
        #: The keys the CLIENT_CONFIRM commits to, before the server has
        #: confirmed them (set with that reply): enough to seal a record the
        #: server opens only once it has checked our confirmation, never to
        #: trust one from it (:attr:`keys` is set once its confirmation checks).
        self.unconfirmed_keys: SessionKeys | None = None
        self.server_name = ""
        self.username = None if username is None else _check_username(username)
        self._password = password
        self._cache = cache if cache is not None else ProverCache(maxsize=1)
        self._balanced: pake.BalancedSecret | None = None
        self._x = b""
        share = b""
        # Accounts mode, logged in before on a server that takes early
        # shares: the stretch, the secret, x and shareP sent in the hello.
        self._early: tuple[bytes, pake.StretchParams, pake.ProverSecret, bytes, bytes] | None
        self._early = None
        # The server's hello named that stretch: it uses the early share, and
        # may confirm first (a mismatch is then a wrong username or password).
        self._early_used = False
        # Our hello carried an early share (see abandon()).
        self._sent_early = False
        # The stretch a server offering early shares answered with: kept in
        # the cache once its confirmation has checked (never on the word of
        # an unauthenticated hello).
        self._hint: tuple[bytes, pake.StretchParams] | None = None
        salt, params = b"", pake.StretchParams(0, 0)  # no early share: no stretch named
        if username is None:
            self._balanced = shared_secret(password)
            self._x, share = pake.spake2_share(self._balanced, role_a=True)
        elif (early := self._cache.early(password, username)) is not None:
            salt, params, secret = early
            x, share = pake.spake2plus_prover_share(secret)
            self._early = (salt, params, secret, x, share)
            self._sent_early = True
        self._hello = ClientHello(
            PROTOCOL_VERSION,
            name,
            share,
            max_frame_size,
            receive_window,
            username or "",
            resume,
            salt,
            params.opslimit,
            params.memlimit,
        )
        self._hello_payload = b""
        self._pending: _Pending | None = None
        self._server_hello: ServerHello | None = None
        # Accounts mode: x and x*P, made by precompute() while the SERVER_HELLO is awaited.
        self._fresh: tuple[bytes, bytes] | None = None
        # The SERVER_HELLO decoded by will_stretch(), and its frame: receive()
        # of the same frame does not decode it again (~15-35 us, on the
        # connect's critical path).
        self._peeked: tuple[Frame, ServerHello] | None = None

    def precompute(self) -> None:
        """Accounts mode, after :meth:`start`: make the prover's ``x`` and ``x*P``
        now, while the server works on its hello, rather than after its hello
        (the share needs ``w0``, which needs the salt that hello brings).
        Optional, and nothing to do in the shared-password mode (its share is
        in the CLIENT_HELLO) or once the SERVER_HELLO has been received."""
        if (
            self.username is not None
            and self.state is HandshakeState.WAIT_SERVER_HELLO
            and self._fresh is None
            and self._early is None
        ):
            self._fresh = pake.ephemeral()

    def start(self) -> bytes:
        """The CLIENT_HELLO frame to send first."""
        if self.state is not HandshakeState.START:
            raise RuntimeError("handshake already started")
        frame = encode_frame(FrameKind.CLIENT_HELLO, 0, self._hello)
        self._hello_payload = frame[HEADER_SIZE:]
        self.state = HandshakeState.WAIT_SERVER_HELLO
        return frame

    def will_stretch(self, frame: Frame) -> bool:
        """Whether :meth:`receive` of ``frame`` would run the Argon2id stretch.

        True only in accounts mode, for the SERVER_HELLO whose salt and cost
        the :class:`ProverCache` does not hold yet: the caller runs that one
        :meth:`receive` in a worker thread. Every other step costs a few scalar
        multiplications, less than the hand-off to a thread.
        """
        if (
            self.username is None
            or self.state is not HandshakeState.WAIT_SERVER_HELLO
            or frame.kind is not FrameKind.SERVER_HELLO
        ):
            return False
        try:
            hello = decode_body(frame, ServerHello)
            self._peeked = (frame, hello)
            params = pake.StretchParams(hello.opslimit, hello.memlimit)
            held = self._cache.holds(self._password, self.username, hello.salt, params)
        except (RemoteProtocolError, TypeError):  # malformed: receive() says so, at once
            return False
        return not held

    def abandon(self) -> None:
        """The exchange ended without keys (refused, closed, timed out, an error).

        If it ended before any SERVER_HELLO while our hello carried an early
        share, the next hello goes without one: a server that does not take
        early shares (an older one, or another one behind the same address)
        refuses such a hello without a word, and a client that kept sending
        it would only pile up failed attempts there.
        """
        if self._sent_early and self._server_hello is None and self.username is not None:
            self._cache.forget(self._password, self.username)

    def _receive(self, frame: Frame) -> bytes:
        if frame.kind is FrameKind.AUTH_FAILED:
            refusal = decode_body(frame, AuthFailed)
            if refusal.code == "throttled":
                raise LockedOut(refusal.reason, refusal.retry_after)
            if refusal.code == "auth_mode":
                raise AuthModeMismatch(refusal.reason)
            if refusal.code in AUTH_CODES:
                raise AuthenticationError(refusal.reason)
            raise ConnectionClosed(f"server refused the connection: {refusal.reason}")
        if self.state is HandshakeState.WAIT_SERVER_HELLO:
            _expect(frame, FrameKind.SERVER_HELLO, self.state)
            peeked, self._peeked = self._peeked, None
            if peeked is not None and peeked[0] is frame:
                hello = peeked[1]
            else:
                hello = decode_body(frame, ServerHello)
            _check_limits(
                hello.name, hello.max_frame_size, hello.receive_window, hello.protocol_version
            )
            if self._balanced is not None:
                confirm = self._balanced_confirm(self._balanced, hello, bytes(frame.payload))
            else:
                confirm = self._account_confirm(hello, bytes(frame.payload))
            self._server_hello = hello
            self.server_name = hello.name
            assert self._pending is not None
            self.unconfirmed_keys = SessionKeys(
                send_key=self._pending.client_to_server,
                receive_key=self._pending.server_to_client,
                peer_name=hello.name,
                peer_max_frame_size=hello.max_frame_size,
                peer_receive_window=hello.receive_window,
            )
            self.state = HandshakeState.WAIT_SERVER_CONFIRM
            return encode_frame(FrameKind.CLIENT_CONFIRM, 0, confirm)
        if self.state is HandshakeState.WAIT_SERVER_CONFIRM:
            _expect(frame, FrameKind.SERVER_CONFIRM, self.state)
            server_confirm = decode_body(frame, Confirm)
            assert self._pending is not None and self._server_hello is not None
            if not hmac.compare_digest(self._pending.expected_mac, server_confirm.mac):
                # A server may confirm first (ServerHandshake.confirm_first),
                # before it has checked ours: a wrong password shows here.
                if self._balanced is not None:
                    raise AuthenticationError(SHARED_MISMATCH)
                if self._early_used:
                    raise AuthenticationError(ACCOUNTS_REFUSAL)
                raise AuthenticationError(
                    "the server could not prove it knows the password: "
                    "it may be an impostor, or it was configured with a different password"
                )
            self.keys = self.unconfirmed_keys
            self.state = HandshakeState.DONE
            if self._hint is not None and self.username is not None:
                self._cache.remember(self._password, self.username, *self._hint)
            return b""
        raise RemoteProtocolError(f"unexpected {frame.kind.name} frame after the handshake ended")

    def _balanced_confirm(
        self, secret: pake.BalancedSecret, hello: ServerHello, payload: bytes
    ) -> Confirm:
        if hmac.compare_digest(hello.pake, self._hello.pake):
            # SPAKE2's identities would fail the confirmation anyway; say why now.
            raise RemoteProtocolError("the server's SPAKE2 share is our own: a reflected message")
        k = _pake_call(
            "SPAKE2 share",
            lambda: pake.spake2_shared_point(secret, True, self._x, hello.pake),
        )
        keys, (c2s, s2c) = _balanced_keys(
            secret, self._hello.pake, hello.pake, k, self._hello_payload, payload
        )
        self._pending = _Pending(keys.confirm_b, c2s, s2c)
        return Confirm(keys.confirm_a)

    def _account_confirm(self, hello: ServerHello, payload: bytes) -> Confirm:
        assert self.username is not None
        params = _pake_call(
            "stretch parameters", lambda: pake.StretchParams(hello.opslimit, hello.memlimit).check()
        )
        if len(hello.salt) != pake.SALT_SIZE:
            raise RemoteProtocolError(f"the server's salt is not {pake.SALT_SIZE} bytes")
        early, self._early = self._early, None
        if early is not None and early[:2] == (hello.salt, params):
            # The server uses the share our hello carried (the same rule on
            # both sides: the stretch it names is the account's).
            _, _, secret, x, share_p = early
            self._early_used = True
        else:
            # A new share (the one sent early, if any, is never used again).
            secret = self._cache.secret(self._password, self.username, hello.salt, params)
            fresh, self._fresh = self._fresh, None
            x, share_p = pake.spake2plus_prover_share(secret, fresh)
        if hello.early_share:
            self._hint = (hello.salt, params)
        z, v = _pake_call(
            "SPAKE2+ share", lambda: pake.spake2plus_prover_points(secret, x, hello.pake)
        )
        keys, (c2s, s2c) = _account_keys(
            self.username, secret.w0, share_p, hello.pake, z, v, self._hello_payload, payload
        )
        self._pending = _Pending(keys.confirm_v, c2s, s2c)
        return Confirm(keys.confirm_p, b"" if self._early_used else share_p)


class ServerHandshake(_Handshake):
    """Server side of the handshake: a shared ``password``, or ``accounts``.

    ``accounts`` is a lookup returning an :class:`AccountVerifier` for any
    username, a deterministic fake one for unknown users (see
    :meth:`conduit.accounts.Accounts.lookup`).

    :meth:`receive` returns bytes to send. When the client's confirmation is
    wrong (or it asked for the other mode) it returns an AUTH_FAILED frame and
    sets :attr:`error`; the caller sends the frame, then raises the error. On
    success, :attr:`username` and :attr:`account` name the authenticated
    account (None in shared-password mode).

    Once the SERVER_HELLO is sent, :meth:`precompute` does the one scalar
    multiplication of the next step that needs nothing more from the client
    (while the client computes its confirmation, not after it); the
    CLIENT_CONFIRM's :meth:`receive` does it itself when it was not called.
    In shared-password mode, and in accounts mode when the client's hello
    carried its share, :meth:`confirm_first` instead makes the SERVER_CONFIRM
    right after the hello, to go out before the client's confirmation.

    ``ephemerals``: a :class:`~conduit.protocol.pake.Ephemerals` stock the
    server's random pair is taken from (the caller refills it between
    messages, see :class:`~conduit._gatekeeper.Gatekeeper`); without one, the
    hello's step makes its pair itself.
    """

    def __init__(
        self,
        password: str | None,
        *,
        name: str,
        max_frame_size: int,
        receive_window: int,
        accounts: AccountLookup | None = None,
        ephemerals: pake.Ephemerals | None = None,
    ) -> None:
        if (password is None) == (accounts is None):
            raise ValueError("give a shared password or an account lookup, not both")
        self.state = HandshakeState.WAIT_CLIENT_HELLO
        self.keys: SessionKeys | None = None
        #: Set by :meth:`confirm_first`: the keys our early SERVER_CONFIRM
        #: commits to, before the client has confirmed them: enough to seal
        #: records only a client that knows the password opens (the WELCOME),
        #: never to trust one from it (:attr:`keys` is set once its
        #: confirmation checks).
        self.unconfirmed_keys: SessionKeys | None = None
        self.error: AuthenticationError | None = None
        #: Refused for the wrong mode (a username to a shared-password server,
        #: none to an accounts server): no password was tried, so the
        #: server's throttle counts no failure for it.
        self.wrong_mode = False
        self.client_name = ""
        #: The client announced a resume token (it sends it sealed, first thing).
        self.client_resuming = False
        self.username: str | None = None
        self.account: AccountVerifier | None = None
        self._balanced = None if password is None else shared_secret(password)
        self._lookup = accounts
        self._ephemerals = ephemerals
        self._name = name
        self._max_frame_size = max_frame_size
        self._receive_window = receive_window
        self._pending: _Pending | None = None
        self._client_hello: ClientHello | None = None
        # Between the hellos and the client's confirmation: the account's
        # record (accounts mode), h*y (the cofactor times the server's secret
        # scalar), both hellos' payloads and the server's share.
        self._record: AccountVerifier | None = None
        self._hy = b""
        self._hello_payloads = (b"", b"")
        self._server_share = b""
        self._server_mac = b""
        # The CLIENT_HELLO decoded by hello_username(), and its frame.
        self._peeked: tuple[Frame, ClientHello] | None = None
        # What precompute() does, between the hellos and the confirmation:
        # shared password: K = h*y*(pA - w*M) and the keys (from the unblinded
        # share and the server's share); accounts: V = h*y*L.
        self._due = False
        self._unblinded = b""
        self._v = b""
        # confirm_first() sent the SERVER_CONFIRM: the CLIENT_CONFIRM's step
        # answers nothing on success.
        self._confirmed_first = False
        # Accounts mode: the prover's share from its CLIENT_HELLO, made with
        # the account's stretch (else empty: it comes with its confirmation).
        self._early_share = b""

    @property
    def precompute_due(self) -> bool:
        """Whether :meth:`precompute` has work to do (the SERVER_HELLO went out)."""
        return self._due

    @property
    def can_confirm_first(self) -> bool:
        """Whether :meth:`confirm_first` may run: the SERVER_HELLO is made, the
        client has not confirmed yet, and the server holds what its
        confirmation needs: always with the shared password's SPAKE2; in
        accounts mode, the prover's share, when its CLIENT_HELLO carried one
        made with the account's stretch (else it comes with the client's
        confirmation)."""
        return (
            self.state is HandshakeState.WAIT_CLIENT_CONFIRM
            and not self._confirmed_first
            and (self._record is None or bool(self._early_share))
        )

    def confirm_first(self) -> bytes:
        """The SERVER_CONFIRM, to send right after the SERVER_HELLO instead of
        after the client's confirmation; sets :attr:`unconfirmed_keys`.

        This saves the client a round trip: it reads our confirmation with
        our hello, checks it, and can open what we sealed with these keys (its
        WELCOME) without waiting for us to check its own. It gives nothing
        away: our MAC is keyed from ``K = h*y*(pA - w*M)`` (SPAKE2) or ``Z =
        h*y*(shareP - w0*M)`` (SPAKE2+, with the share the client's hello
        carried: RFC 9383's own order), so a client can test with it only the
        one password its share committed to (another needs ``y*M``, a
        Diffie-Hellman problem), as with our answer to its confirmation in
        the usual order. The CLIENT_CONFIRM is still checked before
        :attr:`keys` is set; its :meth:`receive` then returns nothing on
        success (AUTH_FAILED on failure, as always). Runs :meth:`precompute`
        if it is due, and in accounts mode ``Z`` (a scalar multiplication
        each). RuntimeError unless :attr:`can_confirm_first`.
        """
        if not self.can_confirm_first:
            raise RuntimeError("the server cannot confirm first now")
        self.precompute()
        if self._record is not None:
            try:
                self._account_pending(self._record, self._early_share)
            except BaseException:
                self.state = HandshakeState.FAILED
                raise
        assert self._pending is not None and self._client_hello is not None
        self.unconfirmed_keys = self._session_keys(self._pending, self._client_hello)
        self._confirmed_first = True
        return encode_frame(FrameKind.SERVER_CONFIRM, 0, Confirm(self._server_mac))

    @staticmethod
    def _session_keys(pending: _Pending, hello: ClientHello) -> SessionKeys:
        return SessionKeys(
            send_key=pending.server_to_client,
            receive_key=pending.client_to_server,
            peer_name=hello.name,
            peer_max_frame_size=hello.max_frame_size,
            peer_receive_window=hello.receive_window,
        )

    def precompute(self) -> None:
        """The next step's multiplication, done before the CLIENT_CONFIRM arrives.

        Shared password: ``K = h*y*(pA - w*M)``, then the session and
        confirmation keys; RemoteProtocolError (and FAILED) if the client's
        share is not in the prime-order group (its cheap checks were made on
        the CLIENT_HELLO). Accounts: ``V = h*y*L``, the same work for a real
        user and a fake one. Does nothing when nothing is due.
        """
        if not self._due:
            return
        self._due = False
        try:
            if self._record is not None:
                self._v = pake.spake2plus_verifier_v(self._record.verifier, self._hy)
            else:
                self._balanced_pending()
        except BaseException:
            self.state = HandshakeState.FAILED
            raise

    def hello_username(self, frame: Frame) -> str:
        """The username the CLIENT_HELLO ``frame`` names, as the module's
        :func:`hello_username` reads it; the decoded hello is kept for
        :meth:`receive` of the same frame, which then does not decode it again.
        Sets :attr:`client_resuming` already (the server's admission looks at it)."""
        hello = _decode_hello(frame)
        self._peeked = (frame, hello)
        self.client_resuming = hello.resume
        return hello.username

    def _receive(self, frame: Frame) -> bytes:
        if self.state is HandshakeState.WAIT_CLIENT_HELLO:
            peeked, self._peeked = self._peeked, None
            if peeked is not None and peeked[0] is frame:
                hello = peeked[1]
            else:
                _expect(frame, FrameKind.CLIENT_HELLO, self.state)
                hello = decode_body(frame, ClientHello)
            _check_limits(
                hello.name, hello.max_frame_size, hello.receive_window, hello.protocol_version
            )
            self._client_hello = hello
            self.client_name = hello.name
            self.client_resuming = hello.resume
            if self._lookup is not None:
                if not hello.username:
                    return self._refuse_mode(
                        "this server has user accounts: connect with a username"
                    )
                reply = self._account_hello(self._lookup, hello, bytes(frame.payload))
            else:
                assert self._balanced is not None
                if hello.username:
                    return self._refuse_mode(
                        "this server uses a shared password, not user accounts: "
                        "connect without a username"
                    )
                reply = self._balanced_hello(self._balanced, hello, bytes(frame.payload))
            self.state = HandshakeState.WAIT_CLIENT_CONFIRM
            return reply
        if self.state is HandshakeState.WAIT_CLIENT_CONFIRM:
            _expect(frame, FrameKind.CLIENT_CONFIRM, self.state)
            confirm = decode_body(frame, Confirm)
            assert self._client_hello is not None
            self.precompute()
            if self._record is not None:
                if self._early_share:
                    # One share, one guess: the one the hello carried.
                    if confirm.share and confirm.share != self._early_share:
                        raise RemoteProtocolError("CLIENT_CONFIRM carries a second SPAKE2+ share")
                    if self._pending is None:
                        self._account_pending(self._record, self._early_share)
                else:
                    self._account_pending(self._record, confirm.share)
            assert self._pending is not None
            if not hmac.compare_digest(self._pending.expected_mac, confirm.mac):
                if self._record is not None:
                    self.state = HandshakeState.FAILED
                    self.error = AuthenticationError(
                        f"wrong username or password (username {self._client_hello.username!r})"
                    )
                    return refusal_frame("wrong_password", ACCOUNTS_REFUSAL)
                self.state = HandshakeState.FAILED
                self.error = AuthenticationError("wrong password")
                return refusal_frame("wrong_password", "authentication failed: wrong password")
            self.keys = self.unconfirmed_keys or self._session_keys(
                self._pending, self._client_hello
            )
            if self._record is not None:
                self.username = self._client_hello.username
                self.account = self._record
            self.state = HandshakeState.DONE
            if self._confirmed_first:
                return b""
            return encode_frame(FrameKind.SERVER_CONFIRM, 0, Confirm(self._server_mac))
        raise RemoteProtocolError(f"unexpected {frame.kind.name} frame in state {self.state.value}")

    def _fresh_pair(self) -> tuple[bytes, bytes]:
        if self._ephemerals is None:
            return pake.ephemeral()
        return self._ephemerals.take()

    def _refuse(self, code: str, reason: str) -> bytes:
        self.state = HandshakeState.FAILED
        self.error = AuthenticationError(reason)
        return refusal_frame(code, reason)

    def _refuse_mode(self, reason: str) -> bytes:
        self.wrong_mode = True
        return self._refuse("auth_mode", reason)

    def _hello_frame(self, share: bytes, **extra: bytes | int | bool) -> bytes:
        hello = ServerHello(
            PROTOCOL_VERSION,
            self._name,
            share,
            self._max_frame_size,
            self._receive_window,
            **extra,  # type: ignore[arg-type]
        )
        return encode_frame(FrameKind.SERVER_HELLO, 0, hello)

    def _balanced_hello(
        self, secret: pake.BalancedSecret, hello: ClientHello, payload: bytes
    ) -> bytes:
        # The share's cheap checks now; the multiplication (which checks its
        # group membership) in precompute(), once this reply is on its way.
        self._unblinded = _pake_call(
            "SPAKE2 share", lambda: pake.spake2_unblind(secret, False, hello.pake)
        )
        y, self._server_share = pake.spake2_share(secret, False, self._fresh_pair())
        self._hy = pake.cofactor_times(y)
        reply = self._hello_frame(self._server_share)
        self._hello_payloads = (payload, reply[HEADER_SIZE:])
        self._due = True
        return reply

    def _balanced_pending(self) -> None:
        assert self._balanced is not None and self._client_hello is not None
        k = _pake_call("SPAKE2 share", lambda: pake.point_mul(self._hy, self._unblinded))
        keys, (c2s, s2c) = _balanced_keys(
            self._balanced, self._client_hello.pake, self._server_share, k, *self._hello_payloads
        )
        self._pending = _Pending(keys.confirm_a, c2s, s2c)
        self._server_mac = keys.confirm_b

    def _account_hello(self, lookup: AccountLookup, hello: ClientHello, payload: bytes) -> bytes:
        if len(hello.username) > MAX_USERNAME:
            raise RemoteProtocolError(f"username longer than {MAX_USERNAME} characters")
        record = lookup(hello.username)
        if hello.pake:
            # An early share: its cheap checks now, the group's in the
            # multiplication that uses it. Used only if made with this
            # account's stretch (the client applies the same rule when it
            # reads our hello); otherwise its confirmation brings a new one.
            _pake_call("SPAKE2+ share", lambda: pake.check_encoding(hello.pake))
            stretch = record.stretch
            if (hello.salt, hello.opslimit, hello.memlimit) == (
                record.salt,
                stretch.opslimit,
                stretch.memlimit,
            ):
                self._early_share = hello.pake
        y, self._server_share = pake.spake2plus_verifier_share(record.verifier, self._fresh_pair())
        self._hy = pake.cofactor_times(y)
        reply = self._hello_frame(
            self._server_share,
            salt=record.salt,
            opslimit=record.stretch.opslimit,
            memlimit=record.stretch.memlimit,
            early_share=True,
        )
        self._record = record
        self._hello_payloads = (payload, reply[HEADER_SIZE:])
        self._due = True
        return reply

    def _account_pending(self, record: AccountVerifier, share_p: bytes) -> None:
        assert self._client_hello is not None
        verifier = record.verifier
        z = _pake_call(
            "SPAKE2+ share", lambda: pake.spake2plus_verifier_z(verifier, self._hy, share_p)
        )
        keys, (c2s, s2c) = _account_keys(
            self._client_hello.username,
            verifier.w0,
            share_p,
            self._server_share,
            z,
            self._v,
            *self._hello_payloads,
        )
        self._pending = _Pending(keys.confirm_p, c2s, s2c)
        self._server_mac = keys.confirm_v


def hello_username(frame: Frame) -> str:
    """The username a CLIENT_HELLO names ("" in shared-password mode), decoded alone.

    Cheap (no group operation): the server calls it on the first frame to
    count the attempt against the user and the address *before* handing the
    frame to :meth:`ServerHandshake.receive`, which does the work.
    RemoteProtocolError if the frame is not a well-formed CLIENT_HELLO.
    """
    return _decode_hello(frame).username


def _decode_hello(frame: Frame) -> ClientHello:
    _expect(frame, FrameKind.CLIENT_HELLO, HandshakeState.WAIT_CLIENT_HELLO)
    hello = decode_body(frame, ClientHello)
    if len(hello.username) > MAX_USERNAME:
        raise RemoteProtocolError(f"username longer than {MAX_USERNAME} characters")
    return hello


def refusal_frame(code: str, reason: str, retry_after: float = 0.0) -> bytes:
    """An AUTH_FAILED frame (sent in clear: it carries nothing secret)."""
    return encode_frame(FrameKind.AUTH_FAILED, 0, AuthFailed(code, reason, retry_after))


def peer_version(data: bytes | bytearray) -> int | None:
    """The protocol version in the first header a peer sent; None if not a conduit header."""
    if len(data) < 3 or bytes(data[:2]) != MAGIC:
        return None
    return data[2]


def version_refusal(version: int) -> bytes:
    """AUTH_FAILED for a peer speaking protocol ``version``, in that version's header.

    The AUTH_FAILED body (code, reason, retry_after) is the same in every
    version so far, so an old client decodes it and reports the reason (a
    refusal that names the protocol version) instead of a bare disconnect.
    """
    reason = (
        f"protocol version mismatch: the server speaks conduit protocol version "
        f"{PROTOCOL_VERSION}, this client speaks version {version}; upgrade conduit"
    )
    payload = pack(body_converter.unstructure(AuthFailed("protocol_version", reason, 0.0)))
    return HEADER.pack(MAGIC, version & 0xFF, FrameKind.AUTH_FAILED, 0, 0, len(payload)) + payload
