"""SPAKE2 (RFC 9382) and SPAKE2+ (RFC 9383) on edwards25519, sans-IO.

The group arithmetic is libsodium's (PyNaCl's bundled copy): constant-time
scalar multiplication in C, ~0.1 ms a point, instead of Python integers. This
module holds the cryptography only; :mod:`conduit.protocol.handshake` puts it
on the wire.

Choices, all from the RFCs unless said otherwise:

- **Group**: edwards25519 in its standard 32-byte encoding (the RFCs'
  ``SPAKE2-edwards25519-SHA256-HKDF-HMAC`` and
  ``SPAKE2+-edwards25519-SHA256-HKDF-SHA256-HMAC-SHA256`` suites). ``M`` and
  ``N`` are RFC 9382 section 6's constants; the tests re-derive them from their
  seeds. Scalars are 32 bytes little-endian, reduced modulo the group order
  ``L`` (the edwards25519 convention; the RFCs' P-256 vectors are big-endian).
- **Cofactor** ``h = 8``: every received share must be a canonical point of the
  prime-order subgroup other than the identity (``is_valid_point``), and the
  shared points are ``h*x*(...)`` exactly as written in the RFCs.
- **Key schedule**: SHA-256, HKDF-SHA256 and HMAC-SHA256, with the transcript
  ``TT`` of each RFC (every field prefixed with its length as 8 bytes
  little-endian). RFC 9382: ``Ke || Ka = Hash(TT)``, ``KcA || KcB =
  KDF(nil, Ka, "ConfirmationKeys" || AAD)``, confirmations ``MAC(Kc, TT)``.
  RFC 9383: ``K_main = Hash(TT)``, ``K_confirmP || K_confirmV = KDF(nil,
  K_main, "ConfirmationKeys")``, ``K_shared = KDF(nil, K_main, "SharedKey")``,
  ``confirmP = MAC(K_confirmP, shareV)``, ``confirmV = MAC(K_confirmV,
  shareP)``.
- **Password stretching**: Argon2id (libsodium) as the RFCs' memory-hard
  function, over ``len(pw) || pw || len(idA) || idA || len(idB) || idB``.
  SPAKE2+ takes 80 bytes, ``w0s || w1s``, 40 bytes each (the group order's 32
  plus the 8 extra bytes RFC 9383 asks for, so the reduction mod ``L`` is
  unbiased), each reduced mod ``L``. The shared-password mode takes 40 bytes
  for ``w``; it has no per-user salt to send, so its salt is a fixed protocol
  label (see :func:`balanced_secret`).
"""

from __future__ import annotations

import collections
import functools
import hashlib
import hmac
import os

import attrs
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from nacl import bindings as sodium
from nacl import pwhash

# The same libsodium functions without PyNaCl's wrappers (nacl.bindings): they
# check their arguments with several calls that format their error messages
# every time, about as much Python as the rest of a handshake's group
# operations. The one check that matters (a C function reads 32 bytes) is
# made here; a failure (return code) is reported as the wrappers would.
from nacl._sodium import ffi as _ffi  # type: ignore[import-not-found]
from nacl._sodium import lib as _lib

#: RFC 9382 section 6: edwards25519 ``M``, from seed "edwards25519 point generation seed (M)".
M = bytes.fromhex("d048032c6ea0b6d697ddc2e86bda85a33adac920f1bf18e1b0c6d166a5cecdaf")
#: RFC 9382 section 6: edwards25519 ``N``, from seed "edwards25519 point generation seed (N)".
N = bytes.fromhex("d3bfb518f44f3430f29d0c92af503865a1ed3281dc69b35dd868ba85f886c4ab")
#: The edwards25519 cofactor, as a scalar (little-endian).
COFACTOR = (8).to_bytes(32, "little")
#: Order of the prime-order subgroup.
GROUP_ORDER = 2**252 + 27742317777372353535851937790883648493
POINT_SIZE = 32
SCALAR_SIZE = 32
#: Bytes of stretched output per scalar: 32 for the order plus 8 so that the
#: reduction mod L is unbiased (RFC 9383 section 3.2).
_WIDE = 40


class PakeError(ValueError):
    """A share or parameter from the peer is not acceptable (not a secret failure)."""


def lp(*parts: bytes) -> bytes:
    """Each part prefixed with its length as 8 bytes little-endian (the RFCs' ``len()``)."""
    return b"".join(len(part).to_bytes(8, "little") + part for part in parts)


# --- Group operations (libsodium) -----------------------------------------------------------


def _bytes32(*values: bytes) -> None:
    for value in values:
        if type(value) is not bytes or len(value) != 32:
            raise TypeError("points and scalars are 32 bytes")


def _result(out: object, rc: int) -> bytes:
    if rc != 0:
        raise RuntimeError("libsodium refused the operation")
    return _ffi.buffer(out, 32)[:]  # type: ignore[no-any-return]


def reduce_scalar(data: bytes) -> bytes:
    """An integer given little-endian in up to 64 bytes, reduced mod L."""
    if len(data) > 64:
        raise ValueError("at most 64 bytes can be reduced")
    out = _ffi.new("unsigned char[32]")
    _lib.crypto_core_ed25519_scalar_reduce(out, bytes(data).ljust(64, b"\0"))
    return _result(out, 0)


def random_scalar() -> bytes:
    """A uniformly random non-zero scalar."""
    while True:
        scalar = reduce_scalar(os.urandom(64))
        if any(scalar):
            return scalar


def cofactor_times(scalar: bytes) -> bytes:
    """``h * scalar`` mod L, so that ``h*x*P`` costs one multiplication."""
    _bytes32(scalar)
    out = _ffi.new("unsigned char[32]")
    _lib.crypto_core_ed25519_scalar_mul(out, scalar, COFACTOR)
    return _result(out, 0)


def base_mul(scalar: bytes) -> bytes:
    """``scalar * P`` (the standard base point)."""
    _bytes32(scalar)
    out = _ffi.new("unsigned char[32]")
    return _result(out, _lib.crypto_scalarmult_ed25519_base_noclamp(out, scalar))


def point_mul(scalar: bytes, point: bytes) -> bytes:
    """``scalar * point``; PakeError if ``point`` is not in the prime-order
    subgroup or the product is the identity (libsodium refuses both)."""
    _bytes32(scalar, point)
    out = _ffi.new("unsigned char[32]")
    if _lib.crypto_scalarmult_ed25519_noclamp(out, scalar, point) != 0:
        raise PakeError("point outside the prime-order group, or identity result")
    return _result(out, 0)


def point_add(p: bytes, q: bytes) -> bytes:
    """``p + q``."""
    _bytes32(p, q)
    out = _ffi.new("unsigned char[32]")
    return _result(out, _lib.crypto_core_ed25519_add(out, p, q))


def point_sub(p: bytes, q: bytes) -> bytes:
    """``p - q``."""
    _bytes32(p, q)
    out = _ffi.new("unsigned char[32]")
    return _result(out, _lib.crypto_core_ed25519_sub(out, p, q))


def check_share(share: bytes) -> bytes:
    """Accept a peer's share only if it is a canonical encoding of a point of the
    prime-order subgroup other than the identity; return it.

    The handshakes do not call this: :func:`unblind` checks the same at a
    third of the cost (see there). Kept for tests and for a share used alone.
    """
    check_encoding(share)
    if not sodium.crypto_core_ed25519_is_valid_point(share):
        raise PakeError("the share is not a point of the edwards25519 prime-order group")
    return share


#: The field prime of edwards25519, 2^255 - 19.
_FIELD_PRIME = 2**255 - 19
_Y_MASK = (1 << 255) - 1


def check_encoding(share: bytes) -> bytes:
    """The checks of :func:`check_share` that need no group operation: 32 bytes,
    a canonical ``y`` (below the field prime), not the identity (``y = 1``)."""
    if type(share) is not bytes or len(share) != POINT_SIZE:
        raise PakeError(f"a share is {POINT_SIZE} bytes")
    y = int.from_bytes(share, "little") & _Y_MASK
    if y >= _FIELD_PRIME:
        raise PakeError("the share is not a canonical point encoding")
    if y == 1:
        raise PakeError("the share is the identity")
    return share


#: The identity's (canonical) encoding.
IDENTITY = b"\x01" + bytes(31)


def unblind(share: bytes, blind: bytes) -> bytes:
    """``share - blind``, for a peer's ``share`` and our own ``blind`` (``w*M``,
    ``w0*N``, ...: a point of the prime-order subgroup), validating the share.

    Every use of the result is a :func:`point_mul`, which libsodium makes check
    its point (canonical, not of small order, in the prime-order subgroup)
    anyway. The result is in that subgroup exactly when the share is (the
    blind is), so that check covers the share's membership too, and a full
    :func:`check_share` first would do the most expensive part (a
    multiplication by the group order, ~70 us) twice. What the multiplication
    cannot see is checked here: the share's length, a canonical encoding (a
    non-canonical one would enter the transcript as other bytes for the same
    point), and the identity (``0 - blind`` is a valid point); a point off the
    curve is refused by the subtraction. The result is the identity only for
    ``share == blind``: the caller decides what that means
    (:func:`point_mul` refuses it).
    """
    check_encoding(share)
    try:
        return point_sub(share, blind)
    except RuntimeError as exc:  # a point off the curve
        raise PakeError("the share is not a point of edwards25519") from exc


# --- Key schedule helpers --------------------------------------------------------------------


def _kdf(ikm: bytes, info: bytes, length: int) -> bytes:
    # RFC 9382/9383 KDF(salt=nil, ikm, info): HKDF-SHA256 with an empty salt.
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(ikm)


def mac(key: bytes, data: bytes) -> bytes:
    """HMAC-SHA256."""
    return hmac.new(key, data, hashlib.sha256).digest()


# --- Password stretching ---------------------------------------------------------------------


@attrs.frozen
class StretchParams:
    """Argon2id cost: ``opslimit`` passes over ``memlimit`` bytes.

    The defaults (3 passes, 64 MiB: libsodium's OPSLIMIT_MODERATE passes at
    its INTERACTIVE memory) take ~0.1-0.2 s on one core; an attacker holding an
    accounts file pays that per guess per user. A client accepts a server's
    parameters only between :data:`MIN_STRETCH` and :data:`MAX_STRETCH`: a
    hostile server can make it spend at most 10 passes over 1 GiB (seconds)
    per connect, and at least one pass over 8 KiB, which is no stretch to
    speak of but gives that server nothing: a password guess against the
    client still costs it one connection.
    """

    opslimit: int = 3
    memlimit: int = 64 * 1024 * 1024

    def check(self) -> StretchParams:
        """Self, if within the accepted bounds; PakeError otherwise."""
        if not (
            type(self.opslimit) is int
            and type(self.memlimit) is int
            and MIN_STRETCH.opslimit <= self.opslimit <= MAX_STRETCH.opslimit
            and MIN_STRETCH.memlimit <= self.memlimit <= MAX_STRETCH.memlimit
        ):
            raise PakeError(
                f"stretch parameters out of range: opslimit={self.opslimit!r} "
                f"memlimit={self.memlimit!r}"
            )
        return self


#: Accounts' default cost (stored in each record, so it can be raised later).
DEFAULT_STRETCH = StretchParams()
#: The lowest cost accepted (libsodium's minimum: for tests only, never in production).
MIN_STRETCH = StretchParams(opslimit=pwhash.argon2id.OPSLIMIT_MIN, memlimit=8 * 1024)
#: The highest cost a client agrees to pay for a server's record.
MAX_STRETCH = StretchParams(opslimit=10, memlimit=1024 * 1024 * 1024)
SALT_SIZE = pwhash.argon2id.SALTBYTES


def stretch(
    password: bytes, salt: bytes, params: StretchParams, id_a: bytes, id_b: bytes, size: int
) -> bytes:
    """Argon2id over ``len(pw)||pw||len(idA)||idA||len(idB)||idB`` (the RFCs' PBKDF input)."""
    if len(salt) != SALT_SIZE:
        raise PakeError(f"a salt is {SALT_SIZE} bytes")
    params.check()
    return pwhash.argon2id.kdf(
        size,
        lp(password, id_a, id_b),
        salt,
        opslimit=params.opslimit,
        memlimit=params.memlimit,
    )


# --- SPAKE2 (RFC 9382): the shared-password mode ---------------------------------------------

#: Argon2id cost of the shared password: a protocol constant, since both sides
#: must agree on it before they exchange anything.
BALANCED_STRETCH = StretchParams(opslimit=3, memlimit=64 * 1024 * 1024)
#: The shared-password mode has no per-user salt to send without an extra round
#: trip, so its salt is a fixed label: a precomputed dictionary would serve
#: against every conduit deployment, which the memory-hard cost makes expensive.
#: Use accounts (per-user salts) where that matters.
BALANCED_SALT = hashlib.sha256(b"conduit shared-password salt v2").digest()[:SALT_SIZE]


@attrs.frozen(repr=False)
class BalancedSecret:
    """``w`` for one password with ``w*M`` and ``w*N`` precomputed (never printed)."""

    w: bytes
    w_m: bytes
    w_n: bytes

    def __repr__(self) -> str:
        return "BalancedSecret(<hidden>)"


@functools.lru_cache(maxsize=8)
def balanced_secret(password: str, id_a: bytes, id_b: bytes) -> BalancedSecret:
    """``w = Argon2id(pw, idA, idB) mod L``, memoised per process.

    The first call for a password costs the stretch (0.07 s of one core on the
    2026-12-06 benchmark machine): call it in a
    worker thread (``trio.to_thread.run_sync``) before the first handshake, and
    every later handshake finds it cached.
    """
    if not password:
        raise ValueError("the password must not be empty")
    wide = stretch(password.encode(), BALANCED_SALT, BALANCED_STRETCH, id_a, id_b, _WIDE)
    w = reduce_scalar(wide)
    return BalancedSecret(w, point_mul(w, M), point_mul(w, N))


@attrs.frozen(repr=False)
class Spake2Keys:
    """RFC 9382 key schedule output."""

    ke: bytes
    ka: bytes
    kc_a: bytes
    kc_b: bytes
    confirm_a: bytes
    confirm_b: bytes

    def __repr__(self) -> str:
        return "Spake2Keys(<hidden>)"


def spake2_share(
    secret: BalancedSecret, role_a: bool, fresh: tuple[bytes, bytes] | None = None
) -> tuple[bytes, bytes]:
    """A fresh ``(x, pA = x*P + w*M)`` for A, or ``(y, pB = y*P + w*N)`` for B;
    ``fresh``: an unused :func:`ephemeral` made beforehand (:class:`Ephemerals`)."""
    scalar, scalar_p = fresh if fresh is not None else ephemeral()
    return scalar, point_add(scalar_p, secret.w_m if role_a else secret.w_n)


def spake2_shared_point(
    secret: BalancedSecret, role_a: bool, scalar: bytes, peer_share: bytes
) -> bytes:
    """A: ``K = h*x*(pB - w*N)``; B: ``K = h*y*(pA - w*M)``. PakeError for a bad share.

    The two halves, for a caller that does the cheap one first:
    :func:`spake2_unblind` then :func:`point_mul` by ``h*scalar``.
    """
    return point_mul(cofactor_times(scalar), spake2_unblind(secret, role_a, peer_share))


def spake2_unblind(secret: BalancedSecret, role_a: bool, peer_share: bytes) -> bytes:
    """A: ``pB - w*N``; B: ``pA - w*M`` (:func:`unblind`: the cheap checks of the
    share; its membership in the prime-order group is checked by the
    multiplication that follows)."""
    return unblind(peer_share, secret.w_n if role_a else secret.w_m)


def spake2_transcript(
    id_a: bytes, id_b: bytes, share_a: bytes, share_b: bytes, k: bytes, w: bytes
) -> bytes:
    """RFC 9382 ``TT``."""
    return lp(id_a, id_b, share_a, share_b, k, w)


def spake2_keys(transcript: bytes, aad: bytes = b"") -> Spake2Keys:
    """RFC 9382 section 4: ``Ke || Ka = Hash(TT)``, confirmation keys and MACs."""
    digest = hashlib.sha256(transcript).digest()
    ke, ka = digest[:16], digest[16:]
    kc = _kdf(ka, b"ConfirmationKeys" + aad, 32)
    kc_a, kc_b = kc[:16], kc[16:]
    return Spake2Keys(ke, ka, kc_a, kc_b, mac(kc_a, transcript), mac(kc_b, transcript))


# --- SPAKE2+ (RFC 9383): the accounts mode ---------------------------------------------------


def _times_m(owner: ProverSecret | Verifier) -> bytes:
    return point_mul(owner.w0, M)


def _times_n(owner: ProverSecret | Verifier) -> bytes:
    return point_mul(owner.w0, N)


@attrs.frozen(repr=False)
class ProverSecret:
    """The client's ``w0`` and ``w1`` (derived from the password; never stored).

    ``w0*M`` and ``w0*N`` are computed once with it: a cached secret then
    costs a handshake two scalar multiplications fewer.
    """

    w0: bytes
    w1: bytes
    w0_m: bytes = attrs.field(default=attrs.Factory(_times_m, takes_self=True))
    w0_n: bytes = attrs.field(default=attrs.Factory(_times_n, takes_self=True))

    def __repr__(self) -> str:
        return "ProverSecret(<hidden>)"


@attrs.frozen(repr=False)
class Verifier:
    """What the server stores: ``w0`` and ``L = w1*P``, never ``w1``.

    ``w0*M`` and ``w0*N`` (derived from ``w0``, so they tell nothing more)
    are kept with it for the same reason as :class:`ProverSecret`'s; they are
    computed from ``w0`` unless given.
    """

    w0: bytes
    L: bytes
    w0_m: bytes = attrs.field(default=attrs.Factory(_times_m, takes_self=True))
    w0_n: bytes = attrs.field(default=attrs.Factory(_times_n, takes_self=True))

    def __repr__(self) -> str:
        return "Verifier(<hidden>)"


@attrs.frozen(repr=False)
class Spake2PlusKeys:
    """RFC 9383 key schedule output."""

    k_main: bytes
    k_confirm_p: bytes
    k_confirm_v: bytes
    k_shared: bytes
    confirm_p: bytes
    confirm_v: bytes

    def __repr__(self) -> str:
        return "Spake2PlusKeys(<hidden>)"


def prover_secret(
    password: str, salt: bytes, params: StretchParams, id_prover: bytes, id_verifier: bytes
) -> ProverSecret:
    """``w0s || w1s = Argon2id(...)``; ``w0 = w0s mod L``, ``w1 = w1s mod L`` (RFC 9383 3.2)."""
    if not password:
        raise ValueError("the password must not be empty")
    wide = stretch(password.encode(), salt, params, id_prover, id_verifier, 2 * _WIDE)
    return ProverSecret(reduce_scalar(wide[:_WIDE]), reduce_scalar(wide[_WIDE:]))


def register(secret: ProverSecret) -> Verifier:
    """The verifier record for a prover secret: ``(w0, L = w1*P)``."""
    return Verifier(secret.w0, base_mul(secret.w1), secret.w0_m, secret.w0_n)


def ephemeral() -> tuple[bytes, bytes]:
    """A fresh random scalar ``x`` and ``x*P``, for one share only."""
    x = random_scalar()
    return x, base_mul(x)


class Ephemerals:
    """A small stock of :func:`ephemeral` pairs made ahead of time.

    A share's ``x*P`` (a base-point multiplication, ~40-50 us here) needs
    nothing from the peer, so a handshake that has sent its message and waits
    for the answer makes the *next* handshake's pair then (:meth:`refill`),
    and that handshake takes it (:meth:`take`) instead of making it on its
    critical path. Each pair is handed out once: :meth:`take` removes it
    (atomically: a ``deque`` is safe across threads), and a forked child never
    uses its parent's pairs (the stock belongs to the process that made it).
    An empty stock makes a pair on the spot, as if there were none.
    """

    __slots__ = ("_capacity", "_pid", "_stock")

    def __init__(self, capacity: int = 2) -> None:
        if capacity < 1:
            raise ValueError("an Ephemerals stock holds at least one pair")
        self._capacity = capacity
        self._stock: collections.deque[tuple[bytes, bytes]] = collections.deque()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self._stock) if self._pid == os.getpid() else 0

    def take(self) -> tuple[bytes, bytes]:
        """An unused ``(x, x*P)``: from the stock, or made now."""
        try:
            pair = self._stock.popleft()
        except IndexError:
            return ephemeral()
        if self._pid != os.getpid():  # made before a fork: the parent may use it too
            self._forked()
            return ephemeral()
        return pair

    def refill(self) -> bool:
        """Make one pair if the stock is not full; whether one was made."""
        if self._pid != os.getpid():
            self._forked()
        if len(self._stock) >= self._capacity:
            return False
        self._stock.append(ephemeral())
        return True

    def _forked(self) -> None:
        self._stock.clear()
        self._pid = os.getpid()


def spake2plus_prover_share(
    secret: ProverSecret, fresh: tuple[bytes, bytes] | None = None
) -> tuple[bytes, bytes]:
    """A fresh ``(x, shareP = x*P + w0*M)``; ``fresh``: an unused :func:`ephemeral`
    made beforehand (the prover makes it while it waits for the verifier's share)."""
    x, x_p = fresh if fresh is not None else ephemeral()
    return x, point_add(x_p, secret.w0_m)


def spake2plus_verifier_share(
    verifier: Verifier, fresh: tuple[bytes, bytes] | None = None
) -> tuple[bytes, bytes]:
    """A fresh ``(y, shareV = y*P + w0*N)``; ``fresh``: an unused :func:`ephemeral`
    made beforehand (:class:`Ephemerals`)."""
    y, y_p = fresh if fresh is not None else ephemeral()
    return y, point_add(y_p, verifier.w0_n)


def spake2plus_prover_points(secret: ProverSecret, x: bytes, share_v: bytes) -> tuple[bytes, bytes]:
    """Prover: ``Z = h*x*(shareV - w0*N)``, ``V = h*w1*(shareV - w0*N)``."""
    unblinded = unblind(share_v, secret.w0_n)
    return (
        point_mul(cofactor_times(x), unblinded),
        point_mul(cofactor_times(secret.w1), unblinded),
    )


def spake2plus_verifier_points(verifier: Verifier, y: bytes, share_p: bytes) -> tuple[bytes, bytes]:
    """Verifier: ``Z = h*y*(shareP - w0*M)``, ``V = h*y*L``.

    ``shareP - w0*M`` is the identity only for a prover who knows ``w0``; then,
    rather than answer differently (which would confirm a guess without it
    failing like one), ``Z`` becomes a random point and the confirmation fails
    as a wrong password does.
    """
    hy = cofactor_times(y)
    return spake2plus_verifier_z(verifier, hy, share_p), spake2plus_verifier_v(verifier, hy)


def spake2plus_verifier_z(verifier: Verifier, hy: bytes, share_p: bytes) -> bytes:
    """Verifier: ``Z = hy*(shareP - w0*M)`` for ``hy = h*y`` (see
    :func:`spake2plus_verifier_points`, also for the identity)."""
    unblinded = unblind(share_p, verifier.w0_m)
    try:
        return point_mul(hy, unblinded)
    except PakeError:
        if unblinded != IDENTITY:
            raise  # an invalid share: not in the prime-order subgroup
        return base_mul(random_scalar())


def spake2plus_verifier_v(verifier: Verifier, hy: bytes) -> bytes:
    """Verifier: ``V = hy*L`` for ``hy = h*y``. It needs nothing from the
    prover: the server computes it while the prover works on its share."""
    return point_mul(hy, verifier.L)


def spake2plus_transcript(
    context: bytes,
    id_prover: bytes,
    id_verifier: bytes,
    m: bytes,
    n: bytes,
    share_p: bytes,
    share_v: bytes,
    z: bytes,
    v: bytes,
    w0: bytes,
) -> bytes:
    """RFC 9383 ``TT``."""
    return lp(context, id_prover, id_verifier, m, n, share_p, share_v, z, v, w0)


def spake2plus_keys(transcript: bytes, share_p: bytes, share_v: bytes) -> Spake2PlusKeys:
    """RFC 9383 section 3.4: ``K_main``, confirmation keys and MACs, ``K_shared``."""
    k_main = hashlib.sha256(transcript).digest()
    kc = _kdf(k_main, b"ConfirmationKeys", 64)
    k_confirm_p, k_confirm_v = kc[:32], kc[32:]
    return Spake2PlusKeys(
        k_main,
        k_confirm_p,
        k_confirm_v,
        _kdf(k_main, b"SharedKey", 32),
        mac(k_confirm_p, share_v),
        mac(k_confirm_v, share_p),
    )


def session_keys(secret: bytes, label: bytes) -> tuple[bytes, bytes]:
    """Two AES-256-GCM keys (client to server, server to client) from a PAKE's shared key."""
    okm = _kdf(secret, label, 64)
    return okm[:32], okm[32:]
