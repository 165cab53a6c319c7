"""One-shot partials (:meth:`StorageRoot.open_one_shot`): anonymous files and their fallback.

Every test runs twice on real files under ``tmp_path``: with ``O_TMPFILE``
(the file has no name until it is published) and with the named partial
that file systems without it get. The fallback is reached two ways: the
module's switch off (no ``O_TMPFILE`` or no ``/proc``), and a real refusal
from the kernel (``O_TMPFILE`` with ``O_RDONLY`` is ``EINVAL``), which takes
the same branch as a file system's ``EOPNOTSUPP``.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from conduit.errors import ChecksumMismatch, TransferError
from conduit.transfer import _space, _storage
from conduit.transfer._names import check_transfer_id, is_partial_name
from conduit.transfer._space import DiskBudget, OneShotAdmitter
from conduit.transfer._storage import ENTRY_ALLOWANCE, StorageRoot
from transfer_helpers import BudgetSettings

TID = "one-shot-1"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def entries(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def read(path: Path) -> bytes:
    return path.read_bytes()


@pytest.fixture(params=["anonymous", "switched off", "refused by the kernel"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    kind: str = request.param
    if kind == "switched off":
        monkeypatch.setattr(_storage, "_TMPFILE_FLAGS", None)
    elif kind == "refused by the kernel":
        monkeypatch.setattr(_storage, "_TMPFILE_FLAGS", os.O_TMPFILE | os.O_RDONLY)
    return kind


@pytest.fixture
def storage(tmp_path: Path) -> StorageRoot:
    return StorageRoot(tmp_path / "root", file_mode=0o640)


def test_anonymous_where_supported_named_otherwise(storage: StorageRoot, mode: str) -> None:
    partial = storage.open_one_shot("d/a.txt", TID)
    partial.write_block(b"hello")
    if mode == "anonymous":
        # Nothing under any name until it is published.
        assert partial.partial_name is None
        assert entries(storage.path / "d") == []
    else:
        assert partial.partial_name is not None
        assert entries(storage.path / "d") == [partial.partial_name]
    assert partial.publish(expected_sha256=sha256(b"hello")) == "d/a.txt"
    assert entries(storage.path / "d") == ["a.txt"]
    assert read(storage.path / "d/a.txt") == b"hello"
    # The root's file_mode, set on the descriptor before the name exists.
    assert stat.S_IMODE(os.stat(storage.path / "d/a.txt").st_mode) == 0o640


def test_publish_never_overwrites(storage: StorageRoot, mode: str) -> None:
    published = []
    for index, data in enumerate([b"first", b"second", b"third"]):
        partial = storage.open_one_shot("a.txt", f"t{index}")
        partial.write_block(data)
        published.append(partial.publish(expected_sha256=sha256(data), sync_directory=False))
    assert published == ["a.txt", "a (1).txt", "a (2).txt"]
    assert read(storage.path / "a.txt") == b"first"
    assert read(storage.path / "a (2).txt") == b"third"
    assert entries(storage.path) == ["a (1).txt", "a (2).txt", "a.txt"]


def test_overwrite_replaces_and_leaves_no_temporary(storage: StorageRoot, mode: str) -> None:
    storage.ensure()
    (storage.path / "a.txt").write_bytes(b"old")
    partial = storage.open_one_shot("a.txt", TID)
    partial.write_block(b"new")
    assert partial.publish(overwrite=True, expected_sha256=sha256(b"new")) == "a.txt"
    assert read(storage.path / "a.txt") == b"new"
    assert entries(storage.path) == ["a.txt"]


def test_overwrite_onto_a_directory_is_a_conflict(storage: StorageRoot, mode: str) -> None:
    (storage.path / "d.txt").mkdir(parents=True)
    partial = storage.open_one_shot("d.txt", TID)
    partial.write_block(b"x")
    with pytest.raises(TransferError) as info:
        partial.publish(overwrite=True, expected_sha256=sha256(b"x"))
    assert info.value.code == "conflict"
    partial.discard()
    assert entries(storage.path) == ["d.txt"]
    assert entries(storage.path / "d.txt") == []


def test_a_wrong_checksum_publishes_nothing(storage: StorageRoot, mode: str) -> None:
    partial = storage.open_one_shot("a.txt", TID)
    partial.write_block(b"bytes")
    with pytest.raises(ChecksumMismatch):
        partial.publish(expected_sha256=sha256(b"other bytes"))
    assert partial.finished
    assert entries(storage.path) == []


def test_discard_leaves_nothing(storage: StorageRoot, mode: str) -> None:
    partial = storage.open_one_shot("a.txt", TID)
    partial.write_block(b"bytes")
    partial.discard()
    partial.discard()
    assert entries(storage.path) == []


def test_an_abandoned_anonymous_file_leaves_nothing_to_sweep(storage: StorageRoot) -> None:
    # A worker that dies between write and publish (here: closes without
    # either) leaves a named partial for the sweeper; an anonymous one is gone.
    partial = storage.open_one_shot("a.txt", TID)
    partial.write_block(b"bytes")
    partial.close()
    assert entries(storage.path) == []
    assert storage.list_partials() == []


def test_publish_under_another_name(storage: StorageRoot, mode: str) -> None:
    partial = storage.open_one_shot("a.txt", TID)
    partial.write_block(b"moved")
    assert partial.publish("e/f/b.txt", expected_sha256=sha256(b"moved")) == "e/f/b.txt"
    assert read(storage.path / "e/f/b.txt") == b"moved"
    assert not any(is_partial_name(name) for name in entries(storage.path))


def test_a_written_one_shot_file_still_counts_against_the_quota(
    storage: StorageRoot, mode: str
) -> None:
    # Two one-shot files of one account in flight at once (two store threads):
    # the first one's bytes, written but not yet linked, must still count, or
    # the second is admitted over the quota. Anonymous bytes are invisible to
    # the quota's walk of the tree, so their reservation stays whole.
    budget = DiskBudget(BudgetSettings(storage))
    storage.ensure()
    # Two files of 4096 bytes, their entries (one is counted once stored) and
    # the root directory's own size.
    quota = storage.stored_bytes() + 2 * 4096 + ENTRY_ALLOWANCE
    admitter = OneShotAdmitter(budget, None, storage, (), "user:carol", quota, 0.0)
    first = admitter.admit("a.bin", 4096)
    assert first.partial is not None
    first.partial.write_block(b"x" * 4096)
    with pytest.raises(TransferError) as info:
        admitter.admit("b.bin", 4096 + ENTRY_ALLOWANCE + 1)
    assert info.value.code == "quota_exceeded"
    assert first.partial.publish(expected_sha256=sha256(b"x" * 4096)) == "a.bin"
    admitter.release(first)
    # Published and released: the walk sees it (and its entry), nothing else is reserved.
    with pytest.raises(TransferError):
        admitter.admit("b.bin", 4096 + 1)
    second = admitter.admit("b.bin", quota - storage.stored_bytes())
    assert second.partial is not None
    second.partial.discard()
    admitter.release(second)
    assert entries(storage.path) == ["a.bin"]


def test_a_proc_that_cannot_be_linked_from_turns_anonymous_files_off(
    storage: StorageRoot, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A real failing linkat: the magic links' directory does not exist.
    monkeypatch.setattr(_storage, "_TMPFILE_FLAGS", _storage._TMPFILE_FLAGS)
    monkeypatch.setattr(_storage, "_PROC_FD", "/nonexistent-proc/self/fd/")
    partial = storage.open_one_shot("a.txt", TID)
    assert partial.partial_name is None
    partial.write_block(b"lost")
    with pytest.raises(FileNotFoundError):
        partial.publish(expected_sha256=sha256(b"lost"))
    partial.discard()
    assert entries(storage.path) == []
    # From now on: named partials, which need no /proc.
    assert _storage._TMPFILE_FLAGS is None
    partial = storage.open_one_shot("a.txt", "one-shot-2")
    assert partial.partial_name is not None
    partial.write_block(b"kept")
    assert partial.publish(expected_sha256=sha256(b"kept")) == "a.txt"
    assert entries(storage.path) == ["a.txt"]


def test_one_shot_ids_are_unique_without_a_random_draw_per_file(
    storage: StorageRoot, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A one-shot file's transfer id comes from a secret drawn once per process
    # and a counter: no getrandom per file. Each admission's id is new, valid
    # as a partial's name, and (named fallback, overwrite) names its own temporary.
    budget = DiskBudget(BudgetSettings(storage))
    admitter = OneShotAdmitter(budget, None, storage, (), "host:127.0.0.1", None, 0.0)

    def no_draw(_nbytes: int | None = None) -> str:
        raise AssertionError("a random draw per one-shot file")

    monkeypatch.setattr(secrets, "token_hex", no_draw)  # the secrets module _space draws from
    ids = set()
    for index in range(50):
        data = b"%d" % index
        admission = admitter.admit(f"f{index}.bin", len(data))
        assert admission.partial is not None
        assert check_transfer_id(admission.transfer_id) == admission.transfer_id
        assert len(admission.transfer_id) == 32
        ids.add(admission.transfer_id)
        admission.partial.write_block(data)
        assert admission.partial.publish(expected_sha256=sha256(data)) == f"f{index}.bin"
        admitter.release(admission)
    assert len(ids) == 50
    assert [name for name in entries(storage.path) if is_partial_name(name)] == []


def test_a_forked_child_draws_its_own_one_shot_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    # A child of a fork must not repeat its parent's ids (both may store into
    # one directory): the secret half is drawn again in the child. The hook
    # os.register_at_fork is given is run here as the child would run it
    # (a real fork of the multi-threaded test process is not needed for that).
    hooks: list[Callable[[], None]] = []

    def register_at_fork(*, after_in_child: Callable[[], None]) -> None:
        hooks.append(after_in_child)

    monkeypatch.setattr(os, "register_at_fork", register_at_fork)  # as _space calls it
    ids = _space._OneShotIds()
    assert len(hooks) == 1
    parent = [ids.new() for _ in range(3)]
    hooks[0]()  # in the child, after the fork
    child = [ids.new() for _ in range(3)]
    assert all(len(tid) == 32 for tid in parent + child)
    assert {tid[:16] for tid in parent} != {tid[:16] for tid in child}
    assert len({*parent, *child}) == 6
