"""The accounts file: verifiers only, atomic changes, fake records, and the handshake over it."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from nacl import bindings as sodium

from conduit import accounts as accounts_module
from conduit.accounts import DEFAULT_STRETCH, AccountRecord, Accounts, StretchParams
from conduit.errors import AuthenticationError
from conduit.protocol import (
    ClientHandshake,
    Frame,
    FrameReader,
    HandshakeState,
    ServerHandshake,
)
from conduit.protocol.handshake import ACCOUNTS_REFUSAL
from conftest import HANDSHAKE_LIMITS

#: The lowest Argon2id cost, so the tests do not spend 0.1 s per account.
FAST = StretchParams(opslimit=1, memlimit=8 * 1024)
PASSWORD = "correct horse battery staple \N{GREEK SMALL LETTER ALPHA}"


def _accounts(tmp_path: Path, name: str = "users.json") -> Accounts:
    return Accounts(tmp_path / name, stretch=FAST)


def test_a_missing_file_is_empty_and_is_not_created_by_reading(tmp_path: Path) -> None:
    accounts = _accounts(tmp_path)
    assert accounts.usernames() == [] and "alice" not in accounts and len(accounts) == 0
    accounts.lookup("alice")
    assert accounts.reload_if_changed() is False
    assert not (tmp_path / "users.json").exists()


def test_add_remove_and_list(tmp_path: Path) -> None:
    accounts = _accounts(tmp_path)
    accounts.add("alice", PASSWORD)
    accounts.add("bob", "hunter2", root="shared/bob", quota=10_000, read_only=True)
    assert accounts.usernames() == ["alice", "bob"]
    assert "alice" in accounts and "carol" not in accounts and 42 not in accounts
    alice, bob = accounts.get("alice"), accounts.get("bob")
    assert (alice.root, alice.quota, alice.read_only) == ("alice", None, False)
    assert (bob.root, bob.quota, bob.read_only) == ("shared/bob", 10_000, True)
    with pytest.raises(ValueError, match="already exists"):
        accounts.add("alice", "other")
    accounts.remove("alice")
    assert accounts.usernames() == ["bob"]
    with pytest.raises(KeyError):
        accounts.remove("alice")
    # Another instance reads the same file.
    again = _accounts(tmp_path)
    assert again.usernames() == ["bob"]
    assert again.get("bob").verifier == bob.verifier


@pytest.mark.parametrize(
    "username",
    [
        *("", "a" * 65, "..", ".hidden", "a/b", "a\\b", "a..b", "al\x00ice", "al\nice", "é", " a"),
        # Names of the root they name by default, refused as a stored file's
        # name is (until 2026-12-07 they were let through, a review found):
        *("CON", "nul", "COM1.txt", "a."),
    ],
)
def test_invalid_usernames_are_refused(tmp_path: Path, username: str) -> None:
    accounts = _accounts(tmp_path)
    with pytest.raises(ValueError):
        accounts.add(username, PASSWORD)
    assert not (tmp_path / "users.json").exists()


@pytest.mark.parametrize(
    "root",
    [
        "",
        "/etc",
        "../up",
        "a/../b",
        "a/./b",
        "a//b",
        "a/",
        "C:/x",
        "a\\b",
        "a\x00b",
        "a\x1fb",
        "x" * 256,
        ".conduit",  # an S3 store's control keys: its sweeper acts on them
        "alice/.conduit",
        ".hidden/alice",
        # As a stored file's name is (until 2026-12-07 they were let through):
        "CON",
        "shared/CON",
        "a ",
        "a.",
        "x\u202ey",  # a right-to-left override, which `user list` printed
        "cafe\u0301",  # not in its normal form (NFC: "café")
    ],
)
def test_invalid_roots_are_refused(tmp_path: Path, root: str) -> None:
    accounts = _accounts(tmp_path)
    with pytest.raises(ValueError):
        accounts.add("alice", PASSWORD, root=root)
    assert "alice" not in accounts


@pytest.mark.parametrize("quota", [-1, 1.5, "10", True])
def test_invalid_quotas_are_refused(tmp_path: Path, quota: object) -> None:
    with pytest.raises(ValueError, match="quota"):
        _accounts(tmp_path).add("alice", PASSWORD, quota=quota)  # type: ignore[arg-type]


def test_an_empty_password_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="password"):
        _accounts(tmp_path).add("alice", "")


def _forbidden_forms(password: str) -> list[bytes]:
    """The password and every fast, unsalted hash of it, as they could appear in the file."""
    raw = password.encode()
    forms = [raw, base64.b64encode(raw)]
    for name in ("md5", "sha1", "sha256", "sha512", "sha3_256", "blake2b"):
        digest = hashlib.new(name, raw).digest()
        forms += [
            digest.hex().encode(),
            digest.hex().upper().encode(),
            base64.b64encode(digest),
            base64.urlsafe_b64encode(digest),
        ]
    return forms


def test_the_file_holds_no_password_nor_a_fast_hash_of_it(tmp_path: Path) -> None:
    accounts = _accounts(tmp_path)
    accounts.add("alice", PASSWORD)
    accounts.add("bob", "hunter2")
    accounts.set_password("bob", "tr0ub4dor&3")
    data = (tmp_path / "users.json").read_bytes()
    for password in (PASSWORD, "hunter2", "tr0ub4dor&3"):
        for form in _forbidden_forms(password):
            assert form not in data, form
    assert stat.S_IMODE((tmp_path / "users.json").stat().st_mode) == 0o600
    document = json.loads(data)
    assert document["format"] == "conduit-accounts" and document["version"] == 1
    assert set(document["users"]["alice"]) == {
        "salt",
        "opslimit",
        "memlimit",
        "w0",
        "L",
        "w0M",
        "w0N",
        "root",
        "quota",
        "read_only",
    }


def test_two_users_with_one_password_have_unrelated_records(tmp_path: Path) -> None:
    accounts = _accounts(tmp_path)
    accounts.add("alice", PASSWORD)
    accounts.add("bob", PASSWORD)
    alice, bob = accounts.get("alice"), accounts.get("bob")
    assert alice.salt != bob.salt
    assert alice.w0 != bob.w0 and alice.L != bob.L


def test_set_password_replaces_salt_and_verifier_and_keeps_the_rest(tmp_path: Path) -> None:
    accounts = _accounts(tmp_path)
    accounts.add("alice", PASSWORD, root="home/alice", quota=5, read_only=True)
    before = accounts.get("alice")
    accounts.set_password("alice", PASSWORD)
    after = accounts.get("alice")
    assert after.salt != before.salt and after.verifier != before.verifier
    assert (after.root, after.quota, after.read_only) == ("home/alice", 5, True)
    with pytest.raises(KeyError):
        accounts.set_password("nobody", PASSWORD)


def test_the_default_cost_is_argon2id_at_64_mib(tmp_path: Path) -> None:
    assert StretchParams(opslimit=3, memlimit=64 * 1024 * 1024) == DEFAULT_STRETCH
    assert Accounts(tmp_path / "a.json").stretch == DEFAULT_STRETCH


def test_a_failed_write_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    accounts = _accounts(tmp_path)
    accounts.add("alice", PASSWORD)
    before = (tmp_path / "users.json").read_bytes()

    def refuse(_src: object, _dst: object) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="disk on fire"):
        accounts.add("bob", PASSWORD)
    monkeypatch.undo()
    assert (tmp_path / "users.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users.json", "users.json.lock"]
    assert accounts.usernames() == ["alice"]


def test_the_temporary_of_a_writer_killed_before_its_rename_goes_at_the_next_change(
    tmp_path: Path,
) -> None:
    """A ``conduit user add`` killed mid-write leaves its temporary (a copy of
    the verifiers); the next change, holding the lock, deletes it and nothing else."""
    accounts = _accounts(tmp_path)
    accounts.add("alice", PASSWORD)
    before = (tmp_path / "users.json").read_bytes()
    writer = (
        "import os, signal, sys\n"
        "from conduit.accounts import Accounts, StretchParams\n"
        "accounts = Accounts(sys.argv[1], stretch=StretchParams(opslimit=1, memlimit=8192))\n"
        "os.replace = lambda *_: os.kill(os.getpid(), signal.SIGKILL)\n"
        "accounts.add('bob', 'a password of bob')\n"
    )
    killed = subprocess.run(
        [sys.executable, "-c", writer, str(tmp_path / "users.json")], timeout=60, check=False
    )
    assert killed.returncode == -signal.SIGKILL
    (tmp_path / "unrelated.tmp").write_bytes(b"not ours")
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".users.json.")]
    assert len(left) == 1 and left[0].endswith(".tmp")
    assert (tmp_path / "users.json").read_bytes() == before
    accounts.add("carol", PASSWORD)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "unrelated.tmp",
        "users.json",
        "users.json.lock",
    ]
    assert accounts.usernames() == ["alice", "carol"]


def test_a_file_nested_too_deep_is_a_malformed_file(tmp_path: Path) -> None:
    # json.loads raises RecursionError there, which is not a ValueError: it
    # crashed a running server's reload (which keeps the old data on a
    # ValueError) and `conduit user list`.
    accounts = _accounts(tmp_path)
    accounts.add("alice", PASSWORD)
    path = tmp_path / "users.json"
    path.write_text("[" * 100_000)
    with pytest.raises(ValueError, match="not a JSON accounts file"):
        Accounts(path)
    with pytest.raises(ValueError, match="not a JSON accounts file"):
        accounts.reload_if_changed()
    assert accounts.usernames() == ["alice"]  # the old data stays


def test_the_temporaries_of_another_accounts_file_beside_are_left_alone(
    tmp_path: Path,
) -> None:
    """``acc`` and ``acc.json`` in one directory: a change of ``acc`` deletes
    its own abandoned temporaries, not the live one of a change of
    ``acc.json`` (whose writer holds another lock). Found by a review: every
    name starting ``.acc.`` was taken, and the other change then failed at
    its rename."""
    accounts = _accounts(tmp_path, "acc")
    accounts.add("alice", PASSWORD)
    theirs = tmp_path / f".acc.json.{'ab' * 16}.tmp"
    abandoned = tmp_path / f".acc.{'cd' * 16}.tmp"
    theirs.write_bytes(b"the other file's change, being written")
    abandoned.write_bytes(b"a copy of the verifiers")
    accounts.add("bob", PASSWORD)
    assert theirs.exists() and not abandoned.exists()


def test_a_lock_file_that_is_a_symbolic_link_is_refused(tmp_path: Path) -> None:
    """Whoever may write the accounts file's directory (a service) could make
    the lock a link to anywhere; a change as root then created the file it
    points to. Now the change is refused, saying why, and creates nothing."""
    accounts = _accounts(tmp_path)
    accounts.add("alice", PASSWORD)
    (tmp_path / "users.json.lock").unlink()
    target = tmp_path / "elsewhere" / "nologin"
    target.parent.mkdir()
    (tmp_path / "users.json.lock").symlink_to(target)
    with pytest.raises(PermissionError, match="is a symbolic link"):
        accounts.add("bob", PASSWORD)
    assert not target.exists()
    assert accounts.usernames() == ["alice"]


def test_a_deleted_file_is_an_empty_one_at_the_next_reload(tmp_path: Path) -> None:
    """A missing file is an empty set of accounts, whether it was there or
    malformed before. Found by a review: deleted while a server ran, it
    counted as unchanged (its users kept logging in), unless a malformed
    file had been seen first."""
    writer = _accounts(tmp_path)
    writer.add("alice", PASSWORD)
    server_view = _accounts(tmp_path)
    (tmp_path / "users.json").unlink()
    assert server_view.changed() is True
    assert server_view.reload_if_changed() is True
    assert server_view.usernames() == []
    assert server_view.reload_if_changed() is False


_NOBODY = 65534
_as_root = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0,
    reason="giving a file to another user takes root",
)


def _file_of(tmp_path: Path, uid: int, gid: int, mode: int | None = None) -> tuple[Accounts, Path]:
    """Accounts with one user, their file given to ``uid``:``gid`` (and ``mode``)."""
    accounts = _accounts(tmp_path)
    accounts.add("alice", PASSWORD)
    path = tmp_path / "users.json"
    os.chown(path, uid, gid)
    if mode is not None:
        path.chmod(mode)
    return accounts, path


@_as_root
def test_a_change_keeps_the_files_owner_and_group(tmp_path: Path) -> None:
    # An administrator adding a user as root to the file of a server that
    # runs as a service user: the file must stay the service's (mode 0600).
    accounts, path = _file_of(tmp_path, _NOBODY, _NOBODY)
    accounts.add("bob", PASSWORD)
    status = path.stat()
    assert (status.st_uid, status.st_gid) == (_NOBODY, _NOBODY)
    assert stat.S_IMODE(status.st_mode) == 0o600
    assert b"bob" in path.read_bytes()


@_as_root
@pytest.mark.parametrize(("before", "after"), [(0o640, 0o640), (0o664, 0o660), (0o604, 0o600)])
def test_a_change_keeps_the_group_permissions_and_gives_others_none(
    tmp_path: Path, before: int, after: int
) -> None:
    # A service reading the file through its group, the file root's: an
    # administrator's `conduit user add` as root must not take the group's
    # read away (it did until 2026-12-05: every change made the file 0600),
    # nor keep what others were given (the verifiers are for offline guessing).
    accounts, path = _file_of(tmp_path, 0, _NOBODY, before)
    accounts.add("bob", PASSWORD)
    status = path.stat()
    assert (status.st_uid, status.st_gid) == (0, _NOBODY)
    assert stat.S_IMODE(status.st_mode) == after


@_as_root
def test_a_change_as_root_gives_the_lock_file_to_the_files_owner(tmp_path: Path) -> None:
    """An administrator's change as root made the lock file root's, 0600:
    the service owning the accounts file could then change it no more
    ("cannot write the accounts file: Permission denied", the lock's). Now a
    change as root gives the lock the file's owner, group and mode."""
    accounts, _ = _file_of(tmp_path, _NOBODY, _NOBODY)
    lock = tmp_path / "users.json.lock"
    os.chown(lock, 0, 0)  # as a change before this one left it
    accounts.add("bob", PASSWORD)
    status = lock.stat()
    assert (status.st_uid, status.st_gid) == (_NOBODY, _NOBODY)
    assert stat.S_IMODE(status.st_mode) == 0o600


def _refuse_fchown(monkeypatch: pytest.MonkeyPatch) -> None:
    """As for a user who may not give a file away: ``fchown`` refused."""

    def refuse(fd: int, uid: int, gid: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "fchown", refuse)


@_as_root
def test_a_change_that_cannot_keep_the_files_owner_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As for a user who is neither root nor the file's owner: the kernel
    # refuses to give the new file away, and it would be unreadable to its
    # owner; the old file stays, with no temporary left.
    accounts, path = _file_of(tmp_path, _NOBODY, _NOBODY)
    before = path.read_bytes()
    _refuse_fchown(monkeypatch)
    with pytest.raises(PermissionError, match=f"belongs to uid {_NOBODY}"):
        accounts.add("bob", PASSWORD)
    assert path.read_bytes() == before and path.stat().st_uid == _NOBODY
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users.json", "users.json.lock"]


@_as_root
@pytest.mark.parametrize("mode", [0o640, 0o600])
def test_a_group_that_cannot_be_kept_is_refused_only_if_it_may_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: int
) -> None:
    # As for the file's owner, not in its group (a service's, which reads the
    # file through it): the group cannot be kept. It was dropped without a
    # word, and the service locked out; now the change is refused when the
    # group may read the file, and made, the group getting nothing, when not.
    accounts, path = _file_of(tmp_path, 0, _NOBODY, mode)
    before = path.read_bytes()
    _refuse_fchown(monkeypatch)
    if mode & 0o070:
        with pytest.raises(PermissionError, match=f"may be read by its group \\(gid {_NOBODY}\\)"):
            accounts.add("bob", PASSWORD)
        assert path.read_bytes() == before and path.stat().st_gid == _NOBODY
    else:
        accounts.add("bob", PASSWORD)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users.json", "users.json.lock"]


def test_writes_replace_the_file_whole(tmp_path: Path) -> None:
    # Readers holding the old file keep reading the old contents: the new
    # version is a different file moved into place.
    accounts = _accounts(tmp_path)
    accounts.add("alice", PASSWORD)
    with open(tmp_path / "users.json", "rb") as old:
        accounts.add("bob", PASSWORD)
        assert b"bob" not in old.read()
    assert b"bob" in (tmp_path / "users.json").read_bytes()


def test_changes_from_another_process_are_seen_after_reload(tmp_path: Path) -> None:
    server_view = _accounts(tmp_path)
    cli_view = _accounts(tmp_path)
    assert server_view.reload_if_changed() is False
    cli_view.add("alice", PASSWORD)
    assert "alice" not in server_view
    assert server_view.reload_if_changed() is True
    assert "alice" in server_view
    assert server_view.reload_if_changed() is False
    # Both views changing the file: neither loses the other's change.
    server_view.add("bob", PASSWORD)
    cli_view.add("carol", PASSWORD)
    assert _accounts(tmp_path).usernames() == ["alice", "bob", "carol"]


def test_generation_counts_each_replacement_of_the_records(tmp_path: Path) -> None:
    """What a server compares to find the sessions whose record changed."""
    server_view = _accounts(tmp_path)
    cli_view = _accounts(tmp_path)
    start = server_view.generation
    server_view.add("alice", PASSWORD)  # by this process
    assert server_view.generation == start + 1
    record = server_view.current("alice")
    assert record is not None and record == server_view.get("alice")
    assert server_view.reload_if_changed() is False
    assert server_view.generation == start + 1  # nothing read: nothing replaced
    cli_view.reload_if_changed()
    cli_view.set_password("alice", "another long passphrase")  # by another process
    assert server_view.reload_if_changed() is True
    assert server_view.generation == start + 2
    assert server_view.current("alice") != record  # a new salt and verifier
    assert server_view.current("nobody") is None


def test_concurrent_adds_from_threads_all_land(tmp_path: Path) -> None:
    views = [_accounts(tmp_path) for _ in range(4)]
    errors: list[BaseException] = []

    def add(view: Accounts, index: int) -> None:
        try:
            view.add(f"user{index}", PASSWORD)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(v, i)) for i, v in enumerate(views * 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert _accounts(tmp_path).usernames() == sorted(f"user{i}" for i in range(8))


def test_a_malformed_file_is_refused_and_a_bad_reload_keeps_the_accounts(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON accounts file"):
        Accounts(path)
    path.unlink()
    accounts = _accounts(tmp_path)
    accounts.add("alice", PASSWORD)
    document = json.loads(path.read_text())
    document["users"]["alice"]["root"] = "../escape"
    path.write_text(json.dumps(document))
    with pytest.raises(ValueError, match="root"):
        accounts.reload_if_changed()
    assert accounts.get("alice").root == "alice"
    with pytest.raises(ValueError):
        accounts.add("bob", PASSWORD)  # never overwrites a file it cannot read


def test_unknown_users_get_stable_fake_records(tmp_path: Path) -> None:
    accounts = _accounts(tmp_path)
    accounts.add("alice", PASSWORD)
    fake = accounts.lookup("mallory")
    assert isinstance(fake, AccountRecord)
    assert "mallory" not in accounts
    # Stable across lookups and instances (the secret is in the file)...
    assert accounts.lookup("mallory") == fake == _accounts(tmp_path).lookup("mallory")
    # ...different per name, shaped like a real record.
    other = accounts.lookup("trudy")
    assert other.salt != fake.salt and other.verifier != fake.verifier
    real = accounts.lookup("alice")
    assert real == accounts.get("alice")
    assert len(fake.salt) == len(real.salt) and fake.stretch == real.stretch
    assert sodium.crypto_core_ed25519_is_valid_point(fake.L)
    assert "hidden" in repr(fake)


# --- The handshake over a real accounts file -------------------------------------------------


def _frame(data: bytes) -> Frame:
    reader = FrameReader()
    reader.feed(data)
    frame = reader.next_frame()
    assert frame is not None
    return frame


def _connect(accounts: Accounts, username: str, password: str) -> ServerHandshake:
    client = ClientHandshake(password, name="c", username=username, **HANDSHAKE_LIMITS)
    server = ServerHandshake(None, name="s", accounts=accounts.lookup, **HANDSHAKE_LIMITS)
    server_hello = server.receive(_frame(client.start()))
    answer = server.receive(_frame(client.receive(_frame(server_hello))))
    if server.error is not None:
        with pytest.raises(AuthenticationError, match=ACCOUNTS_REFUSAL):
            client.receive(_frame(answer))
        return server
    client.receive(_frame(answer))
    assert client.state is HandshakeState.DONE
    return server


def test_the_handshake_authenticates_against_the_file(tmp_path: Path) -> None:
    accounts = _accounts(tmp_path)
    accounts.add("alice", PASSWORD, root="data/alice", quota=100)
    server = _connect(accounts, "alice", PASSWORD)
    assert server.state is HandshakeState.DONE and server.username == "alice"
    assert isinstance(server.account, AccountRecord)
    assert (server.account.root, server.account.quota) == ("data/alice", 100)
    for username, password in [("alice", "wrong"), ("mallory", PASSWORD), ("Alice", PASSWORD)]:
        refused = _connect(accounts, username, password)
        assert isinstance(refused.error, AuthenticationError) and refused.username is None


def test_a_new_password_takes_effect_and_a_removed_user_is_refused(tmp_path: Path) -> None:
    accounts = _accounts(tmp_path)
    accounts.add("alice", PASSWORD)
    accounts.set_password("alice", "new password")
    assert _connect(accounts, "alice", PASSWORD).error is not None
    assert _connect(accounts, "alice", "new password").error is None
    accounts.remove("alice")
    assert _connect(accounts, "alice", "new password").error is not None


def test_a_file_without_the_precomputed_points_still_loads(tmp_path: Path) -> None:
    accounts = _accounts(tmp_path)
    accounts.add("alice", PASSWORD)
    path = tmp_path / "users.json"
    document = json.loads(path.read_text())
    del document["users"]["alice"]["w0M"], document["users"]["alice"]["w0N"]
    path.write_text(json.dumps(document))
    reloaded = _accounts(tmp_path)
    assert reloaded.get("alice").verifier == accounts.get("alice").verifier
    assert _connect(reloaded, "alice", PASSWORD).error is None


# --- What an unknown name's SERVER_HELLO shows ------------------------------------------------

#: A second cost, as after an administrator raised the cost for new accounts.
RAISED = StretchParams(opslimit=2, memlimit=16 * 1024)
#: The cost the tested Accounts object is configured with: no record has it.
CONFIGURED = StretchParams(opslimit=1, memlimit=16 * 1024)


def _mixed_file(tmp_path: Path) -> Path:
    """Three records at FAST, one at RAISED, and a fixed secret (so the draw is fixed)."""
    path = tmp_path / "users.json"
    old = Accounts(path, stretch=FAST)
    for name in ("alice", "bob", "carol"):
        old.add(name, PASSWORD)
    Accounts(path, stretch=RAISED).add("dave", PASSWORD)
    document = json.loads(path.read_text())
    document["secret"] = base64.b64encode(bytes(range(32))).decode()
    path.write_text(json.dumps(document))
    return path


def test_unknown_names_get_the_costs_of_the_records_in_their_mix(tmp_path: Path) -> None:
    """A fake at a cost no record has (the configured one, say) would tell at once
    that the name does not exist: the SERVER_HELLO shows the cost."""
    accounts = Accounts(_mixed_file(tmp_path), stretch=CONFIGURED)
    assert {accounts.get(n).stretch for n in accounts} == {FAST, RAISED}
    names = [f"nobody{i}" for i in range(4000)]
    costs = [accounts.lookup(name).stretch for name in names]
    # Only costs the records have ...
    assert set(costs) == {FAST, RAISED}
    # ... the same for a name on every lookup and in another instance of the file ...
    again = Accounts(accounts.path, stretch=DEFAULT_STRETCH)
    assert [again.lookup(name).stretch for name in names] == costs
    # ... and in the records' proportions: one record in four is at RAISED.
    # Were the keyed draw uniform, the count at RAISED would be binomial,
    # n = 4000, p = 1/4: mean 1000, standard deviation sqrt(n p (1-p)) = 27.4.
    # Six deviations (165) is exceeded with a probability below 2e-9 for a
    # random secret, and the secret here is fixed: the check cannot flake.
    n, p = len(names), 1 / 4
    bound = 6 * (n * p * (1 - p)) ** 0.5
    assert abs(costs.count(RAISED) - n * p) < bound, costs.count(RAISED)


def test_the_mix_of_fake_costs_follows_the_records_on_reload(tmp_path: Path) -> None:
    path = _mixed_file(tmp_path)
    accounts = Accounts(path, stretch=CONFIGURED)
    names = [f"nobody{i}" for i in range(400)]
    before = {name: accounts.lookup(name).stretch for name in names}
    # Another process gives RAISED a larger share: a name at RAISED keeps it
    # (a change in the mix moves only the names where the shares moved).
    Accounts(path, stretch=RAISED).add("erin", PASSWORD)
    assert accounts.reload_if_changed()
    after = {name: accounts.lookup(name).stretch for name in names}
    assert all(after[name] == RAISED for name in names if before[name] == RAISED)
    assert sum(cost == RAISED for cost in after.values()) > sum(
        cost == RAISED for cost in before.values()
    )
    # Only RAISED left: every unknown name has it.
    other = Accounts(path, stretch=RAISED)
    for name in ("alice", "bob", "carol"):
        other.remove(name)
    assert accounts.reload_if_changed()
    assert {accounts.lookup(name).stretch for name in names} == {RAISED}
    # No records at all: the configured cost.
    for name in ("dave", "erin"):
        other.remove(name)
    assert accounts.reload_if_changed()
    assert {accounts.lookup(name).stretch for name in names} == {CONFIGURED}


# --- A file that is malformed or cannot be stat-ed --------------------------------------------


def _count_reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every read of an accounts file's contents from now on, in a list."""
    reads: list[Path] = []
    read = accounts_module._read_regular_file

    def counting(path: Path) -> bytes:
        reads.append(path)
        return read(path)

    monkeypatch.setattr(accounts_module, "_read_regular_file", counting)
    return reads


def test_a_malformed_file_is_read_once_until_it_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    accounts = _accounts(tmp_path)
    accounts.add("alice", PASSWORD)
    good = accounts.path.read_text()
    reads = _count_reads(monkeypatch)
    accounts.path.write_text(good[:-10])  # a truncated write
    with pytest.raises(ValueError, match="not a JSON accounts file"):
        accounts.reload_if_changed()
    assert len(reads) == 1
    for _ in range(5):
        assert not accounts.changed()
        assert not accounts.reload_if_changed()
    assert len(reads) == 1 and accounts.usernames() == ["alice"]
    # Fixed (here with a user more): read at the next call.
    document = json.loads(good)
    document["users"]["bob"] = dict(document["users"]["alice"], root="bob")
    accounts.path.write_text(json.dumps(document))
    assert accounts.changed()
    assert accounts.reload_if_changed()
    assert len(reads) == 2 and accounts.usernames() == ["alice", "bob"]


def accounts_behind_a_looped_link(tmp_path: Path) -> tuple[Accounts, Path]:
    """Accounts (user "alice") in a directory reached through the link
    ``tmp_path / "cfg"``, which then points at itself: the file's ``stat``
    fails (ELOOP). As root no permission bit stops ``stat``; the loop stands
    in for EACCES on the directory, ESTALE or EIO. Also returns the real
    directory, which the link can be pointed at again."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "cfg").symlink_to(real)
    accounts = Accounts(tmp_path / "cfg" / "users.json", stretch=FAST)
    accounts.add("alice", PASSWORD)
    (tmp_path / "cfg").unlink()
    (tmp_path / "cfg").symlink_to(tmp_path / "cfg")
    return accounts, real


def test_a_file_that_cannot_be_stated_counts_as_unchanged(tmp_path: Path) -> None:
    accounts, real = accounts_behind_a_looped_link(tmp_path)
    assert not accounts.changed()
    assert isinstance(accounts.stat_error, OSError)
    assert not accounts.reload_if_changed()
    assert accounts.usernames() == ["alice"]
    (tmp_path / "cfg").unlink()
    (tmp_path / "cfg").symlink_to(real)
    assert not accounts.changed() and accounts.stat_error is None
