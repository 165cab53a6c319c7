"""The password handshake: SPAKE2 with explicit key confirmation, sans-IO.

::

    client                                   server
      CLIENT_HELLO  {pake_A, name, limits}  ->
                                          <-  SERVER_HELLO  {pake_B, name, limits}
      CLIENT_CONFIRM {HMAC(kc_client, T)}   ->
                                          <-  SERVER_CONFIRM {HMAC(kc_server, T)}
                                              (or AUTH_FAILED {code, reason})

``T`` is a hash over both hello payloads exactly as they crossed the wire, so
the names, limits and protocol version are authenticated too. The SPAKE2
identities are the two roles, which stops a reflected message being accepted.
Neither the password nor anything an eavesdropper could test guesses against
ever crosses the wire: each connection allows one online guess, no more.

Keys come from HKDF-SHA256 over the SPAKE2 secret, salted with ``T``: two
confirmation keys and one AES-256-GCM key per direction.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from typing import Any

import attrs
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from spake2 import SPAKE2_A, SPAKE2_B

from ..errors import AuthenticationError, ConnectionClosed, RemoteProtocolError
from .codec import decode_body, encode_frame
from .frames import (
    HEADER_SIZE,
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

#: Handshake frames are tiny; anything larger is hostile.
HANDSHAKE_MAX_FRAME = 4096
CLIENT_IDENTITY = b"conduit-client"
SERVER_IDENTITY = b"conduit-server"
_MAX_NAME = 256

#: AUTH_FAILED codes that mean "the credentials were refused".
AUTH_CODES = frozenset({"wrong_password", "throttled"})


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


@attrs.frozen
class _Derived:
    client_confirm: bytes
    server_confirm: bytes
    client_to_server: bytes
    server_to_client: bytes
    transcript: bytes


def _derive(secret: bytes, client_hello: bytes, server_hello: bytes) -> _Derived:
    transcript = hashlib.sha256()
    for part in (b"conduit handshake v1", client_hello, server_hello):
        transcript.update(len(part).to_bytes(4, "big"))
        transcript.update(part)
    digest = transcript.digest()
    okm = HKDF(
        algorithm=hashes.SHA256(), length=128, salt=digest, info=b"conduit v1 session keys"
    ).derive(secret)
    return _Derived(okm[0:32], okm[32:64], okm[64:96], okm[96:128], digest)


def _mac(key: bytes, role: bytes, transcript: bytes) -> bytes:
    return hmac.new(key, role + transcript, hashlib.sha256).digest()


def _check_limits(name: str, max_frame_size: int, receive_window: int, version: int) -> None:
    check_version(version)
    if len(name) > _MAX_NAME:
        raise RemoteProtocolError("peer name is too long")
    if not MIN_FRAME_SIZE <= max_frame_size <= MAX_FRAME_SIZE:
        raise RemoteProtocolError(f"peer max_frame_size {max_frame_size} is out of range")
    if not MIN_WINDOW <= receive_window <= MAX_WINDOW:
        raise RemoteProtocolError(f"peer receive window {receive_window} is out of range")


def _finish_pake(pake: Any, message: bytes) -> bytes:
    try:
        return pake.finish(message)  # type: ignore[no-any-return]
    except Exception as exc:  # spake2 raises ValueError and its own classes
        raise RemoteProtocolError(f"invalid SPAKE2 message: {exc}") from exc


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


class ClientHandshake(_Handshake):
    """Client side of the handshake. Call :meth:`start`, then feed frames to :meth:`receive`."""

    def __init__(
        self, password: str, *, name: str, max_frame_size: int, receive_window: int
    ) -> None:
        self.state = HandshakeState.START
        self.keys: SessionKeys | None = None
        self.server_name = ""
        self._pake = SPAKE2_A(password.encode(), idA=CLIENT_IDENTITY, idB=SERVER_IDENTITY)
        self._hello = ClientHello(
            PROTOCOL_VERSION, name, self._pake.start(), max_frame_size, receive_window
        )
        self._hello_payload = b""
        self._derived: _Derived | None = None
        self._server_hello: ServerHello | None = None

    def start(self) -> bytes:
        """The CLIENT_HELLO frame to send first."""
        if self.state is not HandshakeState.START:
            raise RuntimeError("handshake already started")
        frame = encode_frame(FrameKind.CLIENT_HELLO, 0, self._hello)
        self._hello_payload = frame[HEADER_SIZE:]
        self.state = HandshakeState.WAIT_SERVER_HELLO
        return frame

    def _receive(self, frame: Frame) -> bytes:
        if frame.kind is FrameKind.AUTH_FAILED:
            refusal = decode_body(frame, AuthFailed)
            if refusal.code in AUTH_CODES:
                raise AuthenticationError(refusal.reason)
            raise ConnectionClosed(f"server refused the connection: {refusal.reason}")
        if self.state is HandshakeState.WAIT_SERVER_HELLO:
            _expect(frame, FrameKind.SERVER_HELLO, self.state)
            hello = decode_body(frame, ServerHello)
            _check_limits(
                hello.name, hello.max_frame_size, hello.receive_window, hello.protocol_version
            )
            secret = _finish_pake(self._pake, hello.pake)
            self._derived = _derive(secret, self._hello_payload, bytes(frame.payload))
            self._server_hello = hello
            self.server_name = hello.name
            self.state = HandshakeState.WAIT_SERVER_CONFIRM
            mac = _mac(self._derived.client_confirm, b"client", self._derived.transcript)
            return encode_frame(FrameKind.CLIENT_CONFIRM, 0, Confirm(mac))
        if self.state is HandshakeState.WAIT_SERVER_CONFIRM:
            _expect(frame, FrameKind.SERVER_CONFIRM, self.state)
            confirm = decode_body(frame, Confirm)
            assert self._derived is not None and self._server_hello is not None
            expected = _mac(self._derived.server_confirm, b"server", self._derived.transcript)
            if not hmac.compare_digest(expected, confirm.mac):
                raise AuthenticationError(
                    "the server could not prove it knows the password: "
                    "it may be an impostor, or it was configured with a different password"
                )
            self.keys = SessionKeys(
                send_key=self._derived.client_to_server,
                receive_key=self._derived.server_to_client,
                peer_name=self._server_hello.name,
                peer_max_frame_size=self._server_hello.max_frame_size,
                peer_receive_window=self._server_hello.receive_window,
            )
            self.state = HandshakeState.DONE
            return b""
        raise RemoteProtocolError(f"unexpected {frame.kind.name} frame after the handshake ended")


class ServerHandshake(_Handshake):
    """Server side of the handshake.

    :meth:`receive` returns bytes to send. When the client's confirmation is
    wrong it returns an AUTH_FAILED frame and sets :attr:`error`; the caller
    sends the frame, then raises the error.
    """

    def __init__(
        self, password: str, *, name: str, max_frame_size: int, receive_window: int
    ) -> None:
        self.state = HandshakeState.WAIT_CLIENT_HELLO
        self.keys: SessionKeys | None = None
        self.error: AuthenticationError | None = None
        self.client_name = ""
        self._password = password.encode()
        self._name = name
        self._max_frame_size = max_frame_size
        self._receive_window = receive_window
        self._derived: _Derived | None = None
        self._client_hello: ClientHello | None = None

    def _receive(self, frame: Frame) -> bytes:
        if self.state is HandshakeState.WAIT_CLIENT_HELLO:
            _expect(frame, FrameKind.CLIENT_HELLO, self.state)
            hello = decode_body(frame, ClientHello)
            _check_limits(
                hello.name, hello.max_frame_size, hello.receive_window, hello.protocol_version
            )
            pake = SPAKE2_B(self._password, idA=CLIENT_IDENTITY, idB=SERVER_IDENTITY)
            reply = encode_frame(
                FrameKind.SERVER_HELLO,
                0,
                ServerHello(
                    PROTOCOL_VERSION,
                    self._name,
                    pake.start(),
                    self._max_frame_size,
                    self._receive_window,
                ),
            )
            secret = _finish_pake(pake, hello.pake)
            self._derived = _derive(secret, bytes(frame.payload), reply[HEADER_SIZE:])
            self._client_hello = hello
            self.client_name = hello.name
            self.state = HandshakeState.WAIT_CLIENT_CONFIRM
            return reply
        if self.state is HandshakeState.WAIT_CLIENT_CONFIRM:
            _expect(frame, FrameKind.CLIENT_CONFIRM, self.state)
            confirm = decode_body(frame, Confirm)
            assert self._derived is not None and self._client_hello is not None
            expected = _mac(self._derived.client_confirm, b"client", self._derived.transcript)
            if not hmac.compare_digest(expected, confirm.mac):
                self.state = HandshakeState.FAILED
                self.error = AuthenticationError("wrong password")
                return refusal_frame("wrong_password", "authentication failed: wrong password")
            self.keys = SessionKeys(
                send_key=self._derived.server_to_client,
                receive_key=self._derived.client_to_server,
                peer_name=self._client_hello.name,
                peer_max_frame_size=self._client_hello.max_frame_size,
                peer_receive_window=self._client_hello.receive_window,
            )
            self.state = HandshakeState.DONE
            mac = _mac(self._derived.server_confirm, b"server", self._derived.transcript)
            return encode_frame(FrameKind.SERVER_CONFIRM, 0, Confirm(mac))
        raise RemoteProtocolError(f"unexpected {frame.kind.name} frame in state {self.state.value}")


def refusal_frame(code: str, reason: str, retry_after: float = 0.0) -> bytes:
    """An AUTH_FAILED frame (sent in clear: it carries nothing secret)."""
    return encode_frame(FrameKind.AUTH_FAILED, 0, AuthFailed(code, reason, retry_after))
