"""SPAKE2 / SPAKE2+ building blocks: RFC vectors, the constants, an independent oracle.

The RFC 9382 and RFC 9383 test vectors are for P-256, so they check what does
not depend on the group: the transcript ``TT`` and the whole key schedule,
fed the vectors' own shares and shared points. The edwards25519 arithmetic is
checked against the pure-Python group of the ``spake2`` package (same point
encoding), an implementation independent of libsodium.
"""

from __future__ import annotations

import hashlib
import secrets

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from nacl import bindings as sodium
from spake2 import ed25519_basic as oracle

from conduit.protocol import pake

h = bytes.fromhex

# RFC 9382 Appendix B (SPAKE2-P256-SHA256-HKDF-HMAC), all four vectors.
RFC9382 = [
    {
        "A": b"server",
        "B": b"client",
        "w": "2ee57912099d31560b3a44b1184b9b4866e904c49d12ac5042c97dca461b1a5f",
        "pA": (
            "04a56fa807caaa53a4d28dbb9853b9815c61a411118a6fe516a8798434751470"
            "f9010153ac33d0d5f2047ffdb1a3e42c9b4e6be662766e1eeb4116988ede5f91"
            "2c"
        ),
        "pB": (
            "0406557e482bd03097ad0cbaa5df82115460d951e3451962f1eaf4367a420676"
            "d09857ccbc522686c83d1852abfa8ed6e4a1155cf8f1543ceca528afb591a1e0"
            "b7"
        ),
        "K": (
            "0412af7e89717850671913e6b469ace67bd90a4df8ce45c2af19010175e37eed"
            "69f75897996d539356e2fa6a406d528501f907e04d97515fbe83db277b715d33"
            "25"
        ),
        "TT": (
            "06000000000000007365727665720600000000000000636c69656e7441000000"
            "0000000004a56fa807caaa53a4d28dbb9853b9815c61a411118a6fe516a87984"
            "34751470f9010153ac33d0d5f2047ffdb1a3e42c9b4e6be662766e1eeb411698"
            "8ede5f912c41000000000000000406557e482bd03097ad0cbaa5df82115460d9"
            "51e3451962f1eaf4367a420676d09857ccbc522686c83d1852abfa8ed6e4a115"
            "5cf8f1543ceca528afb591a1e0b741000000000000000412af7e897178506719"
            "13e6b469ace67bd90a4df8ce45c2af19010175e37eed69f75897996d539356e2"
            "fa6a406d528501f907e04d97515fbe83db277b715d332520000000000000002e"
            "e57912099d31560b3a44b1184b9b4866e904c49d12ac5042c97dca461b1a5f"
        ),
        "Ke": "0e0672dc86f8e45565d338b0540abe69",
        "Ka": "15bdf72e2b35b5c9e5663168e960a91b",
        "KcA": "00c12546835755c86d8c0db7851ae86f",
        "KcB": "a9fa3406c3b781b93d804485430ca27a",
        "A_conf": "58ad4aa88e0b60d5061eb6b5dd93e80d9c4f00d127c65b3b35b1b5281fee38f0",
        "B_conf": "d3e2e547f1ae04f2dbdbf0fc4b79f8ecff2dff314b5d32fe9fcef2fb26dc459b",
    },
    {
        "A": b"",
        "B": b"client",
        "w": "0548d8729f730589e579b0475a582c1608138ddf7054b73b5381c7e883e2efae",
        "pA": (
            "04a897b769e681c62ac1c2357319a3d363f610839c4477720d24cbe32f5fd85f"
            "44fb92ba966578c1b712be6962498834078262caa5b441ecfa9d4a9485720e91"
            "8a"
        ),
        "pB": (
            "04e0f816fd1c35e22065d5556215c097e799390d16661c386e0ecc84593974a6"
            "1b881a8c82327687d0501862970c64565560cb5671f696048050ca66ca5f8cc7"
            "fc"
        ),
        "K": (
            "048f83ec9f6e4f87cc6f9dc740bdc2769725f923364f01c84148c049a39a735e"
            "bda82eac03e00112fd6a5710682767cff5361f7e819e53d8d3c3a2922e0d837a"
            "a6"
        ),
        "Ke": "642f05c473c2cd79909f9a841e2f30a7",
        "Ka": "0bf89b18180af97353ba198789c2b963",
        "KcA": "c6be376fc7cd1301fd0a13adf3e7bffd",
        "KcB": "b7243f4ae60440a49b3f8cab3c1fba07",
        "A_conf": "47d29e6666af1b7dd450d571233085d7a9866e4d49d2645e2df975489521232b",
        "B_conf": "3313c5cefc361d27fb16847a91c2a73b766ffa90a4839122a9b70a2f6bd1d6df",
    },
    {
        "A": b"server",
        "B": b"",
        "w": "626e0cdc7b14c9db3e52a0b1b3a768c98e37852d5db30febe0497b14eae8c254",
        "pA": (
            "04f88fb71c99bfffaea370966b7eb99cd4be0ff1a7d335caac4211c4afd855e2"
            "e15a873b298503ad8ba1d9cbb9a392d2ba309b48bfd7879aefd0f2cea6009763"
            "b0"
        ),
        "pB": (
            "040c269d6be017dccb15182ac6bfcd9e2a14de019dd587eaf4bdfd353f031101"
            "e7cca177f8eb362a6e83e7d5e729c0732e1b528879c086f39ba0f31a9661bd34"
            "db"
        ),
        "K": (
            "0445ee233b8ecb51ebd6e7da3f307e88a1616bae2166121221fdc0dadb986afa"
            "f3ec8a988dc9c626fa3b99f58a7ca7c9b844bb3e8dd9554aafc5b53813504c1c"
            "be"
        ),
        "Ke": "005184ff460da2ce59062c87733c299c",
        "Ka": "3521297d736598fc0a1127600efa1afb",
        "KcA": "f3da53604f0aeecea5a33be7bddf6edf",
        "KcB": "9e3f86848736f159bd92b6e107ec6799",
        "A_conf": "bc9f9bbe99f26d0b2260e6456e05a86196a3307ec6663a18bf6ac825736533b2",
        "B_conf": "c2370e1bf813b086dff0d834e74425a06e6390f48f5411900276dcccc5a297ec",
    },
    {
        "A": b"",
        "B": b"",
        "w": "7bf46c454b4c1b25799527d896508afd5fc62ef4ec59db1efb49113063d70cca",
        "pA": (
            "04a65b367a3f613cf9f0654b1b28a1e3a8a40387956c8ba6063e8658563890f4"
            "6ca1ef6a676598889fc28de2950ab8120b79a5ef1ea4c9f44bc98f585634b46d"
            "66"
        ),
        "pB": (
            "04589f13218822710d98d8b2123a079041052d9941b9cf88c6617ddb2fcc0494"
            "662eea8ba6b64692dc318250030c6af045cb738bc81ba35b043c3dcb46adf6f5"
            "8d"
        ),
        "K": (
            "041a3c03d51b452537ca2a1fea6110353c6d5ed483c4f0f86f4492ca3f378d40"
            "a994b4477f93c64d928edbbcd3e85a7c709b7ea73ee97986ce3d1438e1355437"
            "72"
        ),
        "Ke": "fc6374762ba5cf11f4b2caa08b2cd1b9",
        "Ka": "907ae0e26e8d6234318d91583cd74c86",
        "KcA": "5dbd2f477166b7fb6d61febbd77a5563",
        "KcB": "7689b4654407a5faeffdc8f18359d8a3",
        "A_conf": "dfb4db8d48ae5a675963ea5e6c19d98d4ea028d8e898dad96ea19a80ade95dca",
        "B_conf": "d0f0609d1613138d354f7e95f19fb556bf52d751947241e8c7118df5ef0ae175",
    },
]

# RFC 9383 Appendix C (SPAKE2+-P256-SHA256-HKDF-SHA256-HMAC-SHA256).
RFC9383 = {
    "Context": b"SPAKE2+-P256-SHA256-HKDF-SHA256-HMAC-SHA256 Test Vectors",
    "idProver": b"client",
    "idVerifier": b"server",
    # RFC 9382's P-256 M and N, compressed; the transcript takes them uncompressed.
    "M": "02886e2f97ace46e55ba9dd7242579f2993b64e16ef3dcab95afd497333d8fa12f",
    "N": "03d8bbd6c639c62937b04d997f38c3770719c629d7014d49a24b4f98baa1292b49",
    "w0": "bb8e1bbcf3c48f62c08db243652ae55d3e5586053fca77102994f23ad95491b3",
    "shareP": (
        "04ef3bd051bf78a2234ec0df197f7828060fe9856503579bb1733009042c15c0"
        "c1de127727f418b5966afadfdd95a6e4591d171056b333dab97a79c7193e3417"
        "27"
    ),
    "shareV": (
        "04c0f65da0d11927bdf5d560c69e1d7d939a05b0e88291887d679fcadea75810"
        "fb5cc1ca7494db39e82ff2f50665255d76173e09986ab46742c798a9a68437b0"
        "48"
    ),
    "Z": (
        "04bbfce7dd7f277819c8da21544afb7964705569bdf12fb92aa388059408d500"
        "91a0c5f1d3127f56813b5337f9e4e67e2ca633117a4fbd559946ab474356c418"
        "39"
    ),
    "V": (
        "0458bf27c6bca011c9ce1930e8984a797a3419797b936629a5a937cf2f11c8b9"
        "514b82b993da8a46e664f23db7c01edc87faa530db01c2ee405230b18997f16b"
        "68"
    ),
    "K_main": "4c59e1ccf2cfb961aa31bd9434478a1089b56cd11542f53d3576fb6c2a438a29",
    "K_confirmP": "871ae3f7b78445e34438fb284504240239031c39d80ac23eb5ab9be5ad6db58a",
    "K_confirmV": "ccd53c7c1fa37b64a462b40db8be101cedcf838950162902054e644b400f1680",
    "confirmP": "926cc713504b9b4d76c9162ded04b5493e89109f6d89462cd33adc46fda27527",
    "confirmV": "9747bcc4f8fe9f63defee53ac9b07876d907d55047e6ff2def2e7529089d3e68",
    "K_shared": "0c5f8ccd1413423a54f6c1fb26ff01534a87f893779c6e68666d772bfd91f3e7",
}

L = pake.GROUP_ORDER


def _uncompressed(compressed: str) -> bytes:
    point = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), h(compressed))
    return point.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


@pytest.mark.parametrize("vector", RFC9382, ids=lambda v: f"A={v['A']!r},B={v['B']!r}")
def test_spake2_key_schedule_matches_rfc_9382(vector: dict[str, object]) -> None:
    def get(name: str) -> bytes:
        value = vector[name]
        assert isinstance(value, str)
        return h(value)

    assert isinstance(vector["A"], bytes) and isinstance(vector["B"], bytes)
    transcript = pake.spake2_transcript(
        vector["A"], vector["B"], get("pA"), get("pB"), get("K"), get("w")
    )
    if "TT" in vector:
        assert transcript == get("TT")
    keys = pake.spake2_keys(transcript)
    assert keys.ke == get("Ke")
    assert keys.ka == get("Ka")
    assert keys.kc_a == get("KcA")
    assert keys.kc_b == get("KcB")
    assert keys.confirm_a == get("A_conf")
    assert keys.confirm_b == get("B_conf")
    # AAD goes into the confirmation keys only: a different AAD, different MACs, same Ke.
    other = pake.spake2_keys(transcript, b"conduit")
    assert other.ke == keys.ke and other.confirm_a != keys.confirm_a


def test_spake2plus_key_schedule_matches_rfc_9383() -> None:
    v = RFC9383
    transcript = pake.spake2plus_transcript(
        v["Context"],  # type: ignore[arg-type]
        v["idProver"],  # type: ignore[arg-type]
        v["idVerifier"],  # type: ignore[arg-type]
        _uncompressed(str(v["M"])),
        _uncompressed(str(v["N"])),
        h(str(v["shareP"])),
        h(str(v["shareV"])),
        h(str(v["Z"])),
        h(str(v["V"])),
        h(str(v["w0"])),
    )
    keys = pake.spake2plus_keys(transcript, h(str(v["shareP"])), h(str(v["shareV"])))
    assert keys.k_main == h(str(v["K_main"]))
    assert keys.k_confirm_p == h(str(v["K_confirmP"]))
    assert keys.k_confirm_v == h(str(v["K_confirmV"]))
    assert keys.confirm_p == h(str(v["confirmP"]))
    assert keys.confirm_v == h(str(v["confirmV"]))
    assert keys.k_shared == h(str(v["K_shared"]))


def test_lengths_are_eight_bytes_little_endian() -> None:
    assert pake.lp(b"ab", b"") == b"\x02" + b"\0" * 7 + b"ab" + b"\0" * 8


@pytest.mark.parametrize(("seed", "point"), [(b"(M)", pake.M), (b"(N)", pake.N)])
def test_m_and_n_rederived_from_their_seeds(seed: bytes, point: bytes) -> None:
    # RFC 9382 appendix A: iterate SHA-256 over the seed until the output is the
    # encoding of a point of the prime-order subgroup.
    candidate = b"edwards25519 point generation seed " + seed
    for _ in range(1000):
        candidate = hashlib.sha256(candidate).digest()
        if sodium.crypto_core_ed25519_is_valid_point(candidate):
            break
    assert candidate == point
    assert sodium.crypto_core_ed25519_is_valid_point(point)


def _scalar_int(scalar: bytes) -> int:
    return int.from_bytes(scalar, "little")


def _balanced(w: bytes) -> pake.BalancedSecret:
    return pake.BalancedSecret(w, pake.point_mul(w, pake.M), pake.point_mul(w, pake.N))


@pytest.mark.parametrize("run", range(4))
def test_spake2_group_operations_agree_with_the_spake2_package(run: int) -> None:
    w = pake.random_scalar()
    secret = _balanced(w)
    x, share_a = pake.spake2_share(secret, role_a=True)
    y, share_b = pake.spake2_share(secret, role_a=False)
    base, m, n = oracle.Base, oracle.bytes_to_element(pake.M), oracle.bytes_to_element(pake.N)
    wi, xi, yi = _scalar_int(w), _scalar_int(x), _scalar_int(y)
    assert base.scalarmult(xi).add(m.scalarmult(wi)).to_bytes() == share_a
    assert base.scalarmult(yi).add(n.scalarmult(wi)).to_bytes() == share_b
    k_a = pake.spake2_shared_point(secret, True, x, share_b)
    k_b = pake.spake2_shared_point(secret, False, y, share_a)
    assert k_a == k_b
    peer_b = oracle.bytes_to_element(share_b)
    expected = peer_b.add(n.scalarmult(L - wi)).scalarmult(8 * xi % L)
    assert expected.to_bytes() == k_a
    # The shared point is h*x*y*P, as the RFC's algebra says.
    assert base.scalarmult(8 * xi * yi % L).to_bytes() == k_a


def test_spake2plus_group_operations_agree_with_the_spake2_package() -> None:
    secret = pake.ProverSecret(pake.random_scalar(), pake.random_scalar())
    verifier = pake.register(secret)
    x, share_p = pake.spake2plus_prover_share(secret)
    y, share_v = pake.spake2plus_verifier_share(verifier)
    prover = pake.spake2plus_prover_points(secret, x, share_v)
    assert prover == pake.spake2plus_verifier_points(verifier, y, share_p)
    base = oracle.Base
    w0, w1, xi, yi = (_scalar_int(s) for s in (secret.w0, secret.w1, x, y))
    assert base.scalarmult(w1).to_bytes() == verifier.L
    m, n = oracle.bytes_to_element(pake.M), oracle.bytes_to_element(pake.N)
    assert base.scalarmult(xi).add(m.scalarmult(w0)).to_bytes() == share_p
    assert base.scalarmult(yi).add(n.scalarmult(w0)).to_bytes() == share_v
    assert prover == (
        base.scalarmult(8 * xi * yi % L).to_bytes(),
        base.scalarmult(8 * yi * w1 % L).to_bytes(),
    )


def _small_order_point() -> bytes:
    # (0, -1), of order 2: y = p - 1, little-endian.
    return ((2**255 - 19) - 1).to_bytes(32, "little")


def _mixed_order_point() -> bytes:
    # A point of order 2L: on the curve, not in the prime-order subgroup.
    return sodium.crypto_core_ed25519_add(pake.base_mul(pake.random_scalar()), _small_order_point())


def _off_curve_point() -> bytes:
    for i in range(1, 1000):
        candidate = i.to_bytes(32, "little")
        try:
            sodium.crypto_core_ed25519_add(candidate, candidate)
        except Exception:
            return candidate
    raise AssertionError("no off-curve encoding found")


INVALID_SHARES = {
    "identity": b"\x01" + b"\0" * 31,
    "order-2": _small_order_point(),
    "order-4": bytes(32),  # (sqrt(-1), 0)
    "order-8": bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"),
    "order-2L": _mixed_order_point(),
    "order-8L": sodium.crypto_core_ed25519_add(
        pake.base_mul(pake.random_scalar()),
        bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"),
    ),
    "identity, sign bit set": b"\x01" + b"\0" * 30 + b"\x80",
    "off-curve": _off_curve_point(),
    "non-canonical": (2**255 - 19 + 1).to_bytes(32, "little"),  # y = p + 1
    "short": pake.M[:31],
    "long": pake.M + b"\0",
    "empty": b"",
}


@pytest.mark.parametrize("share", INVALID_SHARES.values(), ids=INVALID_SHARES.keys())
def test_invalid_shares_are_refused_everywhere(share: bytes) -> None:
    secret = _balanced(pake.random_scalar())
    with pytest.raises(pake.PakeError):
        pake.check_share(share)
    with pytest.raises(pake.PakeError):
        pake.spake2_shared_point(secret, True, pake.random_scalar(), share)
    prover = pake.ProverSecret(pake.random_scalar(), pake.random_scalar())
    with pytest.raises(pake.PakeError):
        pake.spake2plus_prover_points(prover, pake.random_scalar(), share)
    with pytest.raises(pake.PakeError):
        pake.spake2plus_verifier_points(pake.register(prover), pake.random_scalar(), share)


def test_unblinding_accepts_exactly_the_shares_check_share_accepts() -> None:
    # The handshakes validate a share with unblind() + the multiplication's own
    # check instead of check_share(): same verdict, valid shares unchanged.
    blind = pake.point_mul(pake.random_scalar(), pake.M)
    for _ in range(20):
        share = pake.base_mul(pake.random_scalar())
        assert pake.check_share(share) == share
        unblinded = pake.unblind(share, blind)
        assert unblinded == pake.point_sub(share, blind)
        pake.point_mul(pake.random_scalar(), unblinded)  # accepted
    for share in INVALID_SHARES.values():
        with pytest.raises(pake.PakeError):
            pake.point_mul(pake.random_scalar(), pake.unblind(share, blind))


def test_a_share_that_cancels_to_the_identity_is_refused_by_the_prover() -> None:
    prover = pake.ProverSecret(pake.random_scalar(), pake.random_scalar())
    with pytest.raises(pake.PakeError):
        pake.spake2plus_prover_points(
            prover, pake.random_scalar(), pake.point_mul(prover.w0, pake.N)
        )


def test_a_share_that_cancels_to_the_identity_gives_the_verifier_a_random_z() -> None:
    # shareP = w0*M needs w0: the verifier answers as for a wrong password
    # (a random Z: the confirmation cannot match) instead of a distinct error.
    prover = pake.ProverSecret(pake.random_scalar(), pake.random_scalar())
    verifier = pake.register(prover)
    crafted = pake.point_mul(prover.w0, pake.M)
    y = pake.random_scalar()
    first = pake.spake2plus_verifier_points(verifier, y, crafted)
    second = pake.spake2plus_verifier_points(verifier, y, crafted)
    assert first[0] != second[0]
    assert first[1] == second[1] == pake.point_mul(pake.cofactor_times(y), verifier.L)


FAST = pake.StretchParams(opslimit=1, memlimit=8 * 1024)


def test_prover_secret_is_argon2id_split_and_reduced_as_rfc_9383_says() -> None:
    salt = bytes(range(16))
    secret = pake.prover_secret("hunter2", salt, FAST, b"alice", b"conduit-server")
    wide = sodium.crypto_pwhash_alg(
        80,
        pake.lp(b"hunter2", b"alice", b"conduit-server"),
        salt,
        FAST.opslimit,
        FAST.memlimit,
        sodium.crypto_pwhash_ALG_ARGON2ID13,
    )
    assert _scalar_int(secret.w0) == int.from_bytes(wide[:40], "little") % L
    assert _scalar_int(secret.w1) == int.from_bytes(wide[40:], "little") % L
    assert pake.prover_secret("hunter2", salt, FAST, b"alice", b"conduit-server") == secret
    assert pake.prover_secret("hunter2", bytes(16), FAST, b"alice", b"conduit-server") != secret
    assert pake.prover_secret("hunter2", salt, FAST, b"bob", b"conduit-server") != secret
    assert "hunter2" not in repr(secret) and secret.w0.hex() not in repr(secret)


@pytest.mark.parametrize(
    "params",
    [
        pake.StretchParams(0, 64 * 1024 * 1024),
        pake.StretchParams(3, 1024),
        pake.StretchParams(11, 64 * 1024 * 1024),
        pake.StretchParams(3, 2 * 1024 * 1024 * 1024),
        pake.StretchParams(True, 64 * 1024 * 1024),
    ],
)
def test_stretch_parameters_out_of_range_are_refused(params: pake.StretchParams) -> None:
    with pytest.raises(pake.PakeError, match="out of range"):
        pake.prover_secret("pw", bytes(16), params, b"a", b"b")


def test_balanced_secret_is_memoised_and_hidden() -> None:
    password = "memo " + secrets.token_hex(4)
    first = pake.balanced_secret(password, b"a", b"b")
    assert pake.balanced_secret(password, b"a", b"b") is first
    assert pake.balanced_secret(password, b"a", b"c") != first
    assert password not in repr(first)
    with pytest.raises(ValueError, match="empty"):
        pake.balanced_secret("", b"a", b"b")


def test_session_keys_are_two_distinct_aes_256_keys() -> None:
    c2s, s2c = pake.session_keys(b"k" * 16, b"label")
    assert len(c2s) == len(s2c) == 32 and c2s != s2c
    assert pake.session_keys(b"k" * 16, b"other") != (c2s, s2c)


def test_group_operations_refuse_wrong_sizes() -> None:
    """libsodium reads 32 bytes: anything else is refused before the call."""
    point = pake.base_mul(pake.random_scalar())
    for bad in (b"", point[:31], point + b"\0", bytearray(point)):
        with pytest.raises(TypeError):
            pake.point_add(point, bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            pake.point_mul(pake.random_scalar(), bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            pake.base_mul(bad)  # type: ignore[arg-type]
    with pytest.raises(pake.PakeError):
        pake.point_mul(pake.random_scalar(), pake.IDENTITY)
