"""The synchronous storage layer: safe names, symlink-safe resolution, publishing.

Everything runs against real files under ``tmp_path``. A test that plants a
symlink also keeps a snapshot of the directory it points to and checks that
nothing there changed.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import posixpath
import re
import stat
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conduit.errors import ChecksumMismatch, TransferError, UnsafePathError
from conduit.transfer import _names, _storage
from conduit.transfer._names import (
    MAX_SEGMENT_BYTES,
    PARTIAL_PREFIX,
    check_transfer_id,
    collision_candidates,
    partial_basename,
    safe_relative_name,
)
from conduit.transfer._prefix_digests import PREFIX_DIGESTS
from conduit.transfer._stoppable import Stopped
from conduit.transfer._storage import FileEntry, PartialFile, StorageRoot
from conftest import open_descriptors, opened_since
from hostile_names import HOSTILE_NAMES, NORMALISED_NAMES, SAFE_NAMES
from transfer_helpers import LinkCounter, refusing_changes

TID = "transfer-1"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def snapshot(path: Path) -> dict[str, object]:
    """Every entry below ``path``: file contents, directories, link targets."""
    result: dict[str, object] = {}
    for directory, dirnames, filenames in os.walk(path):  # does not follow links
        for entry in dirnames + filenames:
            full = Path(directory, entry)
            relative = full.relative_to(path).as_posix()
            if full.is_symlink():
                result[relative] = ("link", os.readlink(full))
            elif full.is_dir():
                result[relative] = "dir"
            elif full.is_file():
                result[relative] = full.read_bytes()
            else:
                result[relative] = "special"
    return result


def receive(
    storage: StorageRoot,
    name: str,
    data: bytes,
    transfer_id: str = TID,
    *,
    final_name: str | None = None,
    overwrite: bool = False,
) -> str:
    """Receive ``data`` as ``name`` in two blocks and publish it; return the published name."""
    partial = storage.open_partial(name, transfer_id, resume=False)
    half = len(data) // 2
    partial.write_block(data[:half])
    partial.write_block(memoryview(data)[half:])
    return partial.publish(final_name, overwrite=overwrite, expected_sha256=sha256(data))


def read_back(storage: StorageRoot, name: str) -> bytes:
    handle, size = storage.open_for_read(name)
    with handle:
        data = handle.read()
    assert len(data) == size
    return data


@pytest.fixture
def storage(tmp_path: Path) -> StorageRoot:
    return StorageRoot(tmp_path / "root")


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory next to the root, with a file a hostile peer would love to reach."""
    target = tmp_path / "outside"
    target.mkdir()
    (target / "secret.txt").write_bytes(b"top secret")
    return target


@pytest.fixture
def trapped(storage: StorageRoot, outside: Path) -> StorageRoot:
    """A root with symlinks planted inside that point outside it."""
    storage.ensure()
    os.symlink(outside, storage.path / "linkdir")
    os.symlink(outside / "secret.txt", storage.path / "linkfile")
    os.symlink(outside / "created.txt", storage.path / "dangling")
    return storage


# --------------------------------------------------------------------------- the corpus


def test_corpus_is_big_enough() -> None:
    assert len(HOSTILE_NAMES) >= 30
    assert len(SAFE_NAMES) >= 10
    assert not set(HOSTILE_NAMES) & set(SAFE_NAMES)


# --------------------------------------------------------------------------- safe_relative_name


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_names_are_refused(name: str) -> None:
    with pytest.raises(UnsafePathError) as info:
        safe_relative_name(name)
    assert info.value.code == "unsafe_path"
    assert str(info.value).startswith("unsafe file name ")


@pytest.mark.parametrize("name", SAFE_NAMES)
def test_safe_names_are_accepted_unchanged(name: str) -> None:
    assert safe_relative_name(name) == name


@pytest.mark.parametrize(("name", "expected"), NORMALISED_NAMES.items())
def test_names_are_normalised(name: str, expected: str) -> None:
    assert safe_relative_name(name) == expected
    assert safe_relative_name(expected) == expected


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("..", "'..'"),
        ("a/../b", "parent directory"),
        ("/etc/passwd", "absolute"),
        ("C:foo", "drive letter"),
        ("a\\b", "backslash"),
        ("nul.txt", "device name"),
        ("x\x00y", "control character U+0000"),
        (".hidden", "hidden"),
        ("x" * 256, "255 bytes"),
        ("a/" * 2049 + "b", "4096 bytes"),
        ("\u2025", "looks like '..'"),
        ("", "empty"),
        ("dir/", "directory"),
        ("\ud800", "surrogate"),
        ("trailing.", "ends with a dot"),
        ("evil\u202etxt.exe", "invisible"),
    ],
)
def test_refusals_name_the_problem(name: str, words: str) -> None:
    with pytest.raises(UnsafePathError, match=re.escape(words)):
        safe_relative_name(name)


@pytest.mark.parametrize("value", [None, b"a.txt", 42, ["a"]])
def test_non_text_is_refused_as_unsafe(value: object) -> None:
    with pytest.raises(UnsafePathError, match="must be text"):
        safe_relative_name(value)  # type: ignore[arg-type]


def test_error_message_of_a_huge_name_stays_short() -> None:
    with pytest.raises(UnsafePathError) as info:
        safe_relative_name("x" * 100_000)
    assert len(str(info.value)) < 200


_PIECES = [
    "/", "//", ".", "..", "./", "../", "\\", ":", "a", "b.txt", "\u00e9", "e\u0301",
    " ", "\x00", "\n", "nul", "CON", "com1", "\u2025", "\u2024", "\uff0e", "\uff0f",
    "\u2215", "C:", "~", "%2f", "\ud800", PARTIAL_PREFIX, "\u202e", "\u00b9", "\ufb01",
]  # fmt: skip
_NAMES = st.one_of(
    st.text(),
    st.text(st.characters(codec=None, exclude_categories=())),
    st.lists(st.sampled_from(_PIECES), max_size=12).map("".join),
)


@given(_NAMES)
@settings(max_examples=1000)
def test_any_text_is_refused_or_stays_inside_the_root(name: str) -> None:
    root = "/srv/conduit root"
    try:
        result = safe_relative_name(name)
    except UnsafePathError:
        return
    joined = posixpath.normpath(posixpath.join(root, result))
    assert joined.startswith(root + "/")
    assert joined == posixpath.join(root, result)  # nothing for normpath to resolve
    assert safe_relative_name(result) == result
    for segment in result.split("/"):
        assert segment not in ("", ".", "..")
        assert not segment.startswith(".")
        assert len(segment.encode("utf-8")) <= MAX_SEGMENT_BYTES


@given(_NAMES)
@settings(max_examples=150, deadline=None)
def test_any_accepted_name_is_written_inside_the_root(name: str) -> None:
    try:
        safe = safe_relative_name(name)
    except UnsafePathError:
        return
    with tempfile.TemporaryDirectory() as scratch:
        storage = StorageRoot(Path(scratch) / "root")
        published = receive(storage, name, b"payload")
        path = Path(scratch, "root", published)
        assert published == safe
        assert path.resolve().is_relative_to(Path(scratch, "root").resolve())
        assert path.read_bytes() == b"payload"
        assert [entry.name for entry in storage.list_files()] == [safe]


@pytest.mark.parametrize(
    "transfer_id", ["", "a/b", "../x", ".hidden", "x" * 65, "sp ace", "nul\x00", "\u00e9"]
)
def test_malformed_transfer_ids_are_refused(storage: StorageRoot, transfer_id: str) -> None:
    with pytest.raises(UnsafePathError, match="transfer id"):
        check_transfer_id(transfer_id)
    with pytest.raises(UnsafePathError, match="transfer id"):
        storage.open_partial("a.txt", transfer_id, resume=False)
    assert not storage.path.exists()


def test_partial_names_fit_in_one_segment_and_stay_distinct() -> None:
    long_a, long_b = "a" * 254 + "1", "a" * 254 + "2"
    names = {partial_basename(n, "t" * 64) for n in (long_a, long_b, "short.txt")}
    assert len(names) == 3
    for name in names:
        assert name.startswith(PARTIAL_PREFIX)
        assert len(name.encode("utf-8")) <= MAX_SEGMENT_BYTES
    assert partial_basename("short.txt", "t1") == f"{PARTIAL_PREFIX}t1-short.txt"


def test_collision_candidates() -> None:
    first = [next(collision_candidates(name)) for name in ("a.txt", "archive.tar.gz", "README")]
    assert first == ["a (1).txt", "archive (1).tar.gz", "README (1)"]
    candidates = list(collision_candidates("\u540d" * 85))
    assert len(candidates) == _names.MAX_COLLISION_ATTEMPTS
    assert len(set(candidates)) == len(candidates)
    for candidate in candidates[::997]:
        assert len(candidate.encode("utf-8")) <= MAX_SEGMENT_BYTES
        assert safe_relative_name(candidate) == candidate


# --------------------------------------------------------------------------- construction


@pytest.mark.parametrize("taken_count", [0, 1, 16, 17, 100, 4097, 9999])
def test_collision_search_finds_the_first_free_number(taken_count: int) -> None:
    numbers = {f"a ({n}).txt": n for n in range(1, _names.MAX_COLLISION_ATTEMPTS + 1)}
    looks: list[str] = []

    def is_taken(name: str) -> bool:
        looks.append(name)
        return numbers[name] <= taken_count

    # The caller takes the first candidate that is free (its own attempt).
    found = next(
        name for name in collision_candidates("a.txt", is_taken) if not numbers[name] <= taken_count
    )
    assert found == f"a ({taken_count + 1}).txt"
    # A linear scan would try taken_count names; the search looks at none of
    # the first 16 and then at about two per doubling.
    searched = max(0, taken_count - _names.LINEAR_COLLISION_ATTEMPTS)
    assert len(looks) <= 2 * searched.bit_length() + 2


def test_collision_search_with_every_number_taken_ends() -> None:
    looks = 0

    def is_taken(name: str) -> bool:
        nonlocal looks
        looks += 1
        return True

    tried = list(collision_candidates("a.txt", is_taken))
    assert tried == [f"a ({n}).txt" for n in range(1, _names.LINEAR_COLLISION_ATTEMPTS + 1)]
    assert looks <= 2 * _names.MAX_COLLISION_ATTEMPTS.bit_length() + 2


def test_collision_search_resumes_past_a_name_taken_in_between() -> None:
    taken = {f"a ({n}).txt" for n in range(1, 41)}
    candidates = collision_candidates("a.txt", taken.__contains__)
    results: list[str] = []
    for name in candidates:
        if name in taken:
            continue
        if len(results) < 2:
            taken.add(name)  # another publisher took it first
            results.append(name)
            continue
        results.append(name)
        break
    assert results == ["a (41).txt", "a (42).txt", "a (43).txt"]


def test_a_crowded_name_is_published_with_few_links(
    storage: StorageRoot, monkeypatch: pytest.MonkeyPatch
) -> None:
    crowd = 300
    storage.ensure()
    for number in range(1, crowd + 1):
        (storage.path / f"a ({number}).txt").write_bytes(b"x")
    (storage.path / "a.txt").write_bytes(b"x")
    links = LinkCounter(monkeypatch)
    assert receive(storage, "a.txt", b"new", "t1") == f"a ({crowd + 1}).txt"
    assert read_back(storage, f"a ({crowd + 1}).txt") == b"new"
    # The name itself, the first 16 numbers, then the one the search found
    # (a linear scan tried all 301).
    assert links.count <= _names.LINEAR_COLLISION_ATTEMPTS + 2


def test_construction_touches_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    storage = StorageRoot("deep/files")
    assert storage.path == tmp_path / "deep" / "files"
    # Read-only operations on a root that does not exist yet create nothing either.
    assert storage.list_files() == []
    assert storage.find_partial("a.txt", TID) is None
    assert storage.discard_partial("a.txt", TID) is False
    assert storage.cleanup_stale_partials(0) == 0
    assert storage.free_space() > 0
    storage.check_can_accept(1)
    with pytest.raises(FileNotFoundError):
        storage.open_for_read("a.txt")
    assert list(tmp_path.iterdir()) == []


def test_ensure_creates_a_private_directory(storage: StorageRoot) -> None:
    storage.ensure()
    storage.ensure()  # idempotent
    assert stat.S_IMODE(storage.path.stat().st_mode) == 0o700 & ~_current_umask()


def test_a_new_root_and_its_new_parents_are_made_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each directory ensure() creates has its parent fsynced, as every
    # directory made below a root has: a root made just before a crash must
    # not vanish with the files published into it since (files review).
    synced: list[str] = []
    real_fsync = os.fsync

    def recording(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    StorageRoot(tmp_path / "a" / "b").ensure()
    assert synced == [str(tmp_path), str(tmp_path / "a")]
    synced.clear()
    StorageRoot(tmp_path / "a" / "b").ensure()  # nothing new: nothing to sync
    assert synced == []


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_a_symlinked_root_is_allowed(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    os.symlink(real, tmp_path / "alias")
    storage = StorageRoot(tmp_path / "alias")
    assert receive(storage, "a.txt", b"x") == "a.txt"
    assert (real / "a.txt").read_bytes() == b"x"


# --------------------------------------------------------------------------- round trips


def test_safe_names_round_trip(storage: StorageRoot) -> None:
    for index, name in enumerate(SAFE_NAMES):
        assert receive(storage, name, name.encode("utf-8") * 3, f"t{index}") == name
    listed = storage.list_files()
    assert [entry.name for entry in listed] == sorted(SAFE_NAMES)
    for entry in listed:
        assert read_back(storage, entry.name) == entry.name.encode("utf-8") * 3
        assert entry.size == len(entry.name.encode("utf-8")) * 3


def test_normalised_names_are_stored_under_the_canonical_name(storage: StorageRoot) -> None:
    assert receive(storage, "./x//re\u0301sume\u0301.pdf", b"cv") == "x/r\u00e9sum\u00e9.pdf"
    assert read_back(storage, "x/re\u0301sume\u0301.pdf") == b"cv"
    assert read_back(storage, "x/r\u00e9sum\u00e9.pdf") == b"cv"


def test_publish_under_another_directory(storage: StorageRoot) -> None:
    partial = storage.open_partial("in/a.txt", TID, resume=False)
    partial.write_block(b"moved")
    assert partial.publish("out/b.txt") == "out/b.txt"
    assert read_back(storage, "out/b.txt") == b"moved"
    assert os.listdir(storage.path / "in") == []


def test_empty_file(storage: StorageRoot) -> None:
    assert receive(storage, "empty", b"") == "empty"
    assert read_back(storage, "empty") == b""
    assert storage.list_files()[0].size == 0


# ------------------------------------------------------------------- hostile names everywhere


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_names_are_refused_by_every_entry_point(
    tmp_path: Path, storage: StorageRoot, name: str
) -> None:
    storage.ensure()
    partial = storage.open_partial("ok.txt", TID, resume=False)
    partial.write_block(b"data")
    before = snapshot(tmp_path)
    attempts: list[Callable[[], object]] = [
        lambda: storage.open_partial(name, "other", resume=False),
        lambda: storage.open_partial(name, "other", resume=True),
        lambda: storage.find_partial(name, "other"),
        lambda: storage.discard_partial(name, "other"),
        lambda: storage.open_for_read(name),
        lambda: partial.publish(name),
        lambda: partial.publish(name, overwrite=True),
    ]
    for attempt in attempts:
        with pytest.raises(UnsafePathError):
            attempt()
    assert snapshot(tmp_path) == before
    # The refused publish left the partial intact and usable.
    assert partial.publish() == "ok.txt"
    assert read_back(storage, "ok.txt") == b"data"


# --------------------------------------------------------------------------- symlinks


def test_write_through_a_symlinked_directory_is_refused(
    trapped: StorageRoot, outside: Path
) -> None:
    before = snapshot(outside)
    for name in ("linkdir/x.txt", "linkdir/sub/x.txt"):
        with pytest.raises(UnsafePathError, match="symbolic link"):
            trapped.open_partial(name, TID, resume=False)
        with pytest.raises(UnsafePathError, match="symbolic link"):
            trapped.find_partial(name, TID)
    partial = trapped.open_partial("x.txt", TID, resume=False)
    partial.write_block(b"evil")
    with pytest.raises(UnsafePathError, match="symbolic link"):
        partial.publish("linkdir/x.txt")
    with pytest.raises(UnsafePathError, match="symbolic link"):
        partial.publish("linkdir/secret.txt", overwrite=True)
    assert snapshot(outside) == before


def test_publish_onto_a_symlink_never_follows_it(trapped: StorageRoot, outside: Path) -> None:
    before = snapshot(outside)
    assert receive(trapped, "linkfile", b"one", "t1") == "linkfile (1)"
    assert receive(trapped, "dangling", b"two", "t2") == "dangling (1)"
    assert snapshot(outside) == before
    assert not (outside / "created.txt").exists()
    # Overwriting replaces the link itself, never the file it points to.
    assert receive(trapped, "linkfile", b"three", "t3", overwrite=True) == "linkfile"
    assert not (trapped.path / "linkfile").is_symlink()
    assert read_back(trapped, "linkfile") == b"three"
    assert snapshot(outside) == before


def test_a_planted_partial_symlink_is_refused(trapped: StorageRoot, outside: Path) -> None:
    before = snapshot(outside)
    os.symlink(outside / "secret.txt", trapped.path / partial_basename("a.txt", "t1"))
    os.symlink(outside / "new.txt", trapped.path / partial_basename("b.txt", "t2"))
    for resume in (True, False):
        with pytest.raises(UnsafePathError):
            trapped.open_partial("a.txt", "t1", resume=resume)
        with pytest.raises(UnsafePathError):
            trapped.open_partial("b.txt", "t2", resume=resume)
    with pytest.raises(UnsafePathError):
        trapped.find_partial("a.txt", "t1")
    assert trapped.discard_partial("a.txt", "t1") is False
    assert snapshot(outside) == before


def test_read_through_symlinks_is_refused(trapped: StorageRoot, outside: Path) -> None:
    for name in ("linkfile", "dangling", "linkdir/secret.txt"):
        with pytest.raises(UnsafePathError, match="symbolic link"):
            trapped.open_for_read(name)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        trapped.open_for_read("linkdir")


def test_a_symlink_swapped_in_after_the_check_is_still_refused(
    trapped: StorageRoot, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Simulate losing the race: the lstat check sees nothing, then a link is there.
    monkeypatch.setattr(_storage, "_lstat", lambda dir_fd, entry: None)
    before = snapshot(outside)
    os.symlink(outside / "secret.txt", trapped.path / partial_basename("a.txt", "t1"))
    os.symlink(outside / "new.txt", trapped.path / partial_basename("b.txt", "t2"))
    with pytest.raises(UnsafePathError):
        trapped.open_for_read("linkfile")
    with pytest.raises(UnsafePathError):
        trapped.open_for_read("dangling")
    for name, transfer_id in (("a.txt", "t1"), ("b.txt", "t2")):
        for resume in (True, False):
            with pytest.raises(UnsafePathError):
                trapped.open_partial(name, transfer_id, resume=resume)
    assert snapshot(outside) == before


def test_listing_skips_symlinks(trapped: StorageRoot) -> None:
    receive(trapped, "real.txt", b"r")
    assert trapped.list_files() == [FileEntry("real.txt", 1, _mtime(trapped, "real.txt"))]


def _mtime(storage: StorageRoot, name: str) -> float:
    return (storage.path / name).stat().st_mtime


def test_directory_swapped_for_a_symlink_before_publish(
    storage: StorageRoot, outside: Path
) -> None:
    before = snapshot(outside)
    partial = storage.open_partial("sub/a.txt", TID, resume=False)
    partial.write_block(b"late")
    os.rename(storage.path / "sub", storage.path / "moved")
    os.symlink(outside, storage.path / "sub")
    with pytest.raises(UnsafePathError, match="symbolic link"):
        partial.publish()
    partial.close()
    assert snapshot(outside) == before


def test_cleanup_neither_follows_nor_removes_symlinks(trapped: StorageRoot, outside: Path) -> None:
    before = snapshot(outside)
    link = trapped.path / partial_basename("a.txt", "t1")
    os.symlink(outside / "secret.txt", link)
    os.utime(link, (1, 1), follow_symlinks=False)
    assert trapped.cleanup_stale_partials(60) == 0
    assert link.is_symlink()
    assert snapshot(outside) == before


# --------------------------------------------------------------------------- publishing


def test_publish_never_overwrites(storage: StorageRoot) -> None:
    assert receive(storage, "a.txt", b"first", "t1") == "a.txt"
    assert receive(storage, "a.txt", b"second", "t2") == "a (1).txt"
    assert receive(storage, "a.txt", b"third", "t3") == "a (2).txt"
    assert receive(storage, "a (1).txt", b"fourth", "t4") == "a (1) (1).txt"
    assert receive(storage, "d/archive.tar.gz", b"x", "t5") == "d/archive.tar.gz"
    assert receive(storage, "d/archive.tar.gz", b"y", "t6") == "d/archive (1).tar.gz"
    assert read_back(storage, "a.txt") == b"first"
    assert read_back(storage, "a (1).txt") == b"second"
    assert read_back(storage, "a (2).txt") == b"third"
    assert not any(name.startswith(".") for name in os.listdir(storage.path))


def test_publish_onto_a_directory_picks_another_name(storage: StorageRoot) -> None:
    (storage.path / "d.txt").mkdir(parents=True)
    assert receive(storage, "d.txt", b"x", "t1") == "d (1).txt"
    with pytest.raises(TransferError) as info:
        receive(storage, "d.txt", b"x", "t2", overwrite=True)
    assert info.value.code == "conflict"


def test_overwrite_replaces_atomically(storage: StorageRoot) -> None:
    receive(storage, "a.txt", b"old", "t1")
    assert receive(storage, "a.txt", b"new", "t2", overwrite=True) == "a.txt"
    assert read_back(storage, "a.txt") == b"new"
    assert [entry.name for entry in storage.list_files()] == ["a.txt"]


def test_collision_attempts_are_bounded(
    storage: StorageRoot, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_names, "MAX_COLLISION_ATTEMPTS", 3)
    for index in range(4):
        receive(storage, "a.txt", b"x", f"t{index}")
    with pytest.raises(TransferError) as info:
        receive(storage, "a.txt", b"x", "t9")
    assert info.value.code == "name_collision"
    assert storage.find_partial("a.txt", "t9") == 1  # kept: the caller decides


def test_a_rename_survives_its_target_directory_being_pruned(
    storage: StorageRoot, monkeypatch: pytest.MonkeyPatch
) -> None:
    receive(storage, "a.txt", b"a")
    real_move = StorageRoot._move
    moves = 0

    def pruned_before_the_first_move(*args: Any) -> None:
        # What a delete's pruning in another thread can do between the
        # rename's making of new/dir and its move: remove them, empty.
        nonlocal moves
        moves += 1
        if moves == 1:
            assert storage.prune_empty_directories(("new", "dir")) == 2
        real_move(*args)

    monkeypatch.setattr(StorageRoot, "_move", staticmethod(pruned_before_the_first_move))
    assert storage.rename("a.txt", "new/dir/a.txt") == "new/dir/a.txt"
    assert moves == 2
    assert read_back(storage, "new/dir/a.txt") == b"a"


def test_a_partial_survives_its_directory_being_pruned(
    storage: StorageRoot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A download beside this one made ``sub/``, gave up with nothing and
    removes the directories it made: between this one's opening of ``sub/``
    and the creation of its partial there (a review, 2026-12-07: the second
    download failed "no such file" for a file the server had)."""
    real_open = _storage._open_partial_fd
    opens = 0

    def pruned_before_the_first_open(*args: Any, **kwargs: Any) -> int:
        nonlocal opens
        opens += 1
        if opens == 1:
            assert storage.prune_empty_directories(("sub",)) == 1
        return real_open(*args, **kwargs)

    monkeypatch.setattr(_storage, "_open_partial_fd", pruned_before_the_first_open)
    partial = storage.open_partial("sub/b.bin", "t1", resume=False)
    partial.write_block(b"b")
    assert partial.publish() == "sub/b.bin"
    assert opens == 2
    assert read_back(storage, "sub/b.bin") == b"b"


@pytest.mark.parametrize("fallback", ["link", "renameat2", "placeholder"])
def test_concurrent_publishes_get_distinct_names(
    storage: StorageRoot, monkeypatch: pytest.MonkeyPatch, fallback: str
) -> None:
    _force_publish_strategy(monkeypatch, fallback)
    receive(storage, "same.txt", b"original", "t-orig")
    workers = 8
    barrier = threading.Barrier(workers)
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            partial = storage.open_partial("same.txt", f"t{index}", resume=False)
            partial.write_block(b"payload %d" % index)
            barrier.wait()
            results[index] = partial.publish()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(index,)) for index in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    assert sorted(results.values()) == sorted(f"same ({n}).txt" for n in range(1, workers + 1))
    for index, name in results.items():
        assert read_back(storage, name) == b"payload %d" % index
    assert read_back(storage, "same.txt") == b"original"
    assert not any(name.startswith(".") for name in os.listdir(storage.path))


def _force_publish_strategy(monkeypatch: pytest.MonkeyPatch, strategy: str) -> None:
    """Make hard links (and renameat2) look unsupported, like on FAT or some FUSE mounts."""
    if strategy == "link":
        return

    def no_links(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EPERM, "hard links not supported")

    monkeypatch.setattr(os, "link", no_links)
    if strategy == "renameat2":
        if _storage._renameat2 is None:
            pytest.skip("renameat2 is only loaded on Linux with glibc >= 2.28")
        return

    def no_renameat2(*args: object) -> int:
        ctypes.set_errno(errno.EINVAL)
        return -1

    monkeypatch.setattr(_storage, "_renameat2", no_renameat2)


@pytest.mark.parametrize("fallback", ["renameat2", "placeholder"])
def test_fallbacks_never_overwrite(
    storage: StorageRoot, monkeypatch: pytest.MonkeyPatch, fallback: str
) -> None:
    _force_publish_strategy(monkeypatch, fallback)
    assert receive(storage, "a.txt", b"first", "t1") == "a.txt"
    assert receive(storage, "a.txt", b"second", "t2") == "a (1).txt"
    assert read_back(storage, "a.txt") == b"first"
    assert read_back(storage, "a (1).txt") == b"second"
    assert sorted(os.listdir(storage.path)) == ["a (1).txt", "a.txt"]


def test_checksum_mismatch_discards_and_publishes_nothing(storage: StorageRoot) -> None:
    partial = storage.open_partial("a.txt", TID, resume=False)
    partial.write_block(b"corrupted")
    with pytest.raises(ChecksumMismatch):
        partial.publish(expected_sha256=sha256(b"original"))
    assert partial.closed
    assert storage.list_files() == []
    assert storage.find_partial("a.txt", TID) is None


def test_published_file_mode(tmp_path: Path) -> None:
    private = StorageRoot(tmp_path / "private")
    shared = StorageRoot(tmp_path / "shared", file_mode=0o644)
    receive(private, "a.txt", b"x")
    receive(shared, "a.txt", b"x")
    assert stat.S_IMODE((private.path / "a.txt").stat().st_mode) == 0o600
    assert stat.S_IMODE((shared.path / "a.txt").stat().st_mode) == 0o644


def test_an_intermediate_file_is_a_conflict(storage: StorageRoot) -> None:
    receive(storage, "a.txt", b"x")
    with pytest.raises(TransferError) as info:
        storage.open_partial("a.txt/b.txt", TID, resume=False)
    assert info.value.code == "conflict"
    with pytest.raises(FileNotFoundError):
        storage.open_for_read("a.txt/b.txt")


# --------------------------------------------------------------------------- partial files


def test_partial_files_are_hidden(storage: StorageRoot) -> None:
    partial = storage.open_partial("sub/a.txt", TID, resume=False)
    partial.write_block(b"half")
    assert storage.list_files() == []
    assert partial.partial_name is not None
    assert partial.partial_name.startswith(PARTIAL_PREFIX)
    assert partial.root is storage
    assert (partial.name, partial.transfer_id) == ("sub/a.txt", TID)
    assert (storage.path / "sub" / partial.partial_name).read_bytes() == b"half"
    with pytest.raises(UnsafePathError):
        storage.open_for_read(f"sub/{partial.partial_name}")
    with pytest.raises(FileNotFoundError):
        storage.open_for_read("sub/a.txt")
    assert stat.S_IMODE((storage.path / "sub" / partial.partial_name).stat().st_mode) == 0o600
    partial.publish()
    assert [entry.name for entry in storage.list_files()] == ["sub/a.txt"]


def test_resume_rehash_matches_one_shot_hash(storage: StorageRoot) -> None:
    data = os.urandom(3 * _storage._HASH_BLOCK + 12345)
    cut = 2 * _storage._HASH_BLOCK + 777  # several hash blocks and a ragged end
    first = storage.open_partial("big.bin", TID, resume=False)
    first.write_block(data[:cut])
    first.close()  # the connection dropped
    assert storage.find_partial("big.bin", TID) == cut
    second = storage.open_partial("big.bin", TID, resume=True)
    assert second.offset == cut
    assert second.sha256_hex() == sha256(data[:cut])
    second.write_block(memoryview(data)[cut:])
    assert second.sha256_hex() == sha256(data)
    assert second.rehash_prefix() == len(data)
    assert second.sha256_hex() == sha256(data)
    assert second.publish(expected_sha256=sha256(data)) == "big.bin"
    assert read_back(storage, "big.bin") == data


def test_restart_truncates_the_partial(storage: StorageRoot) -> None:
    with storage.open_partial("a.txt", TID, resume=False) as partial:
        partial.write_block(b"stale bytes")
    fresh = storage.open_partial("a.txt", TID, resume=False)
    assert fresh.offset == 0
    assert storage.find_partial("a.txt", TID) == 0
    fresh.write_block(b"new")
    assert fresh.publish(expected_sha256=sha256(b"new")) == "a.txt"


def test_resume_without_a_partial_starts_at_zero(storage: StorageRoot) -> None:
    partial = storage.open_partial("a.txt", TID, resume=True)
    assert partial.offset == 0
    assert partial.sha256_hex() == sha256(b"")
    partial.discard()


def test_one_transfer_id_cannot_be_received_twice_at_once(storage: StorageRoot) -> None:
    first = storage.open_partial("a.txt", TID, resume=False)
    first.write_block(b"abc")
    with pytest.raises(TransferError) as info:
        storage.open_partial("a.txt", TID, resume=True)
    assert info.value.code == "busy"
    first.close()
    second = storage.open_partial("a.txt", TID, resume=True)
    assert second.offset == 3
    second.close()


def test_short_writes_are_completed(storage: StorageRoot, monkeypatch: pytest.MonkeyPatch) -> None:
    real_pwrite = os.pwrite

    def dribble(fd: int, data: memoryview, offset: int) -> int:
        return real_pwrite(fd, data[:3], offset)

    monkeypatch.setattr(os, "pwrite", dribble)
    data = bytes(range(256)) * 4
    partial = storage.open_partial("a.bin", TID, resume=False)
    partial.write_block(data)
    assert partial.offset == len(data)
    assert partial.sha256_hex() == sha256(data)
    monkeypatch.undo()
    assert partial.publish() == "a.bin"
    assert read_back(storage, "a.bin") == data


def test_a_full_disk_is_a_transfer_error(
    storage: StorageRoot, monkeypatch: pytest.MonkeyPatch
) -> None:
    partial = storage.open_partial("a.bin", TID, resume=False)
    partial.write_block(b"ok")

    def full(fd: int, data: memoryview, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(TransferError) as info:
        partial.write_block(b"more")
    assert info.value.code == "no_space"
    assert partial.offset == 2
    assert partial.sha256_hex() == sha256(b"ok")
    partial.close()


def test_short_vector_writes_are_completed_mid_chunk(
    storage: StorageRoot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """write_chunks: a pwritev that takes 5 bytes at a time (ending inside a
    chunk) is repeated from there; offset and hash match the file."""
    real_pwritev = os.pwritev

    def dribble(fd: int, buffers: list[memoryview], offset: int) -> int:
        first = next(buffer for buffer in buffers if buffer)
        return real_pwritev(fd, [first[:5]], offset)

    monkeypatch.setattr(os, "pwritev", dribble)
    chunks: list[bytes | bytearray | memoryview] = [
        bytes(range(256)),
        b"",
        memoryview(b"abcdefgh"),
        bytearray(b"xy" * 50),
    ]
    data = b"".join(bytes(chunk) for chunk in chunks)
    partial = storage.open_partial("v.bin", TID, resume=False)
    partial.write_chunks(chunks)
    assert partial.offset == len(data)
    assert partial.sha256_hex() == sha256(data)
    monkeypatch.undo()
    assert partial.publish() == "v.bin"
    assert read_back(storage, "v.bin") == data


def test_a_full_disk_during_a_vector_write_keeps_what_reached_the_file(
    storage: StorageRoot, monkeypatch: pytest.MonkeyPatch
) -> None:
    partial = storage.open_partial("v.bin", TID, resume=False)
    real_pwritev = os.pwritev
    calls = {"n": 0}

    def fills_up(fd: int, buffers: list[memoryview], offset: int) -> int:
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwritev(fd, [buffers[0][:3]], offset)  # 3 bytes went, then the disk is full

    monkeypatch.setattr(os, "pwritev", fills_up)
    with pytest.raises(TransferError) as info:
        partial.write_chunks([b"okay", b"more"])
    assert info.value.code == "no_space"
    assert partial.offset == 3
    assert partial.sha256_hex() == sha256(b"oka")
    partial.close()


def _write_more(partial: PartialFile, *, vector: bool) -> None:
    """Four more bytes, with ``write_chunks`` (``vector``) or ``write_block``."""
    if vector:
        partial.write_chunks([b"mo", b"re"])
    else:
        partial.write_block(b"more")


@pytest.mark.parametrize("vector", [False, True], ids=["write_block", "write_chunks"])
def test_a_write_that_takes_nothing_is_an_error_not_a_spin(
    storage: StorageRoot, monkeypatch: pytest.MonkeyPatch, vector: bool
) -> None:
    """A write that reports 0 bytes and no error (a file system in user space
    may) raises EIO; retrying it would spin for ever in the writer thread.
    What reached the file before still matches the offset and hash."""
    partial = storage.open_partial("z.bin", TID, resume=False)
    partial.write_block(b"ok")
    calls = {"n": 0}

    def takes_nothing(*args: object) -> int:
        calls["n"] += 1
        assert calls["n"] < 100, "the write was retried without end"
        return 0

    monkeypatch.setattr(os, "pwritev" if vector else "pwrite", takes_nothing)
    with pytest.raises(OSError, match="took none of 4 bytes") as info:
        _write_more(partial, vector=vector)
    assert info.value.errno == errno.EIO
    assert calls["n"] == 1
    assert partial.offset == 2
    assert partial.sha256_hex() == sha256(b"ok")
    partial.close()


def test_discard(storage: StorageRoot) -> None:
    partial = storage.open_partial("a.txt", TID, resume=False)
    partial.write_block(b"x")
    partial.discard()
    partial.discard()
    assert partial.closed
    assert storage.find_partial("a.txt", TID) is None
    closed_first = storage.open_partial("b.txt", TID, resume=False)
    closed_first.close()
    closed_first.discard()  # after a close it removes the file by name
    assert storage.find_partial("b.txt", TID) is None
    assert os.listdir(storage.path) == []


def test_a_partial_the_disk_will_not_delete_is_closed_all_the_same(
    storage: StorageRoot, caplog: pytest.LogCaptureFixture
) -> None:
    # A failed upload discards its partial; a directory that refuses the
    # unlink (read-only, a file system remounted so) once left the partial
    # open and locked, and its name "busy" until the server restarted.
    partial = storage.open_partial("sub/a.bin", TID, resume=False)
    partial.write_block(b"x" * 10)
    with refusing_changes(storage.path / "sub"), caplog.at_level("WARNING"):
        partial.discard()  # a cleanup on the way out of a failure: it must not raise
    assert partial.closed
    assert "could not delete the partial file of 'sub/a.bin'" in caplog.text
    again = storage.open_partial("sub/a.bin", TID, resume=True)  # not "busy"
    assert again.offset == 10  # still there, for the sweep of old partials
    again.discard()
    assert storage.find_partial("sub/a.bin", TID) is None
    # A peer can make it come again (resume, abandon, again): within a budget.
    partials = [storage.open_partial(f"sub/{index}.bin", TID, resume=False) for index in range(50)]
    caplog.clear()
    with refusing_changes(storage.path / "sub"), caplog.at_level("WARNING"):
        for partial in partials:
            partial.discard()
    assert all(partial.closed for partial in partials)
    assert 1 <= caplog.text.count("could not delete the partial file") <= 5


def test_a_closed_partial_refuses_use(storage: StorageRoot) -> None:
    partial = storage.open_partial("a.txt", TID, resume=False)
    partial.close()
    partial.close()
    for use in (lambda: partial.write_block(b"x"), partial.publish, partial.fsync):
        with pytest.raises(ValueError, match="closed"):
            use()


def test_partial_file_for_a_maximal_name(storage: StorageRoot) -> None:
    name = "\u540d" * 85  # 255 bytes: no room for the partial prefix without shortening
    assert receive(storage, name, b"x", "t" * 64) == name
    assert receive(storage, name, b"y", "u" * 64) == "\u540d" * 83 + " (1)"  # 249 + 4 bytes


def test_cleanup_removes_only_stale_idle_partials(storage: StorageRoot) -> None:
    def leave_partial(name: str, transfer_id: str, age: float) -> Path:
        with storage.open_partial(name, transfer_id, resume=False) as partial:
            partial.write_block(b"x")
            assert partial.partial_name is not None
            path = storage.path / os.path.dirname(name) / partial.partial_name
        os.utime(path, (time.time() - age, time.time() - age))
        return path

    stale = leave_partial("a.txt", "t1", 3600)
    nested = leave_partial("d/e/b.txt", "t2", 3600)
    fresh = leave_partial("c.txt", "t3", 1)
    active = storage.open_partial("busy.txt", "t4", resume=False)
    assert active.partial_name is not None
    active_path = storage.path / active.partial_name
    os.utime(active_path, (1, 1))
    receive(storage, "old-but-published.txt", b"keep", "t5")
    not_ours = storage.path / ".cache" / partial_basename("x.txt", "t6")
    not_ours.parent.mkdir()
    not_ours.write_bytes(b"hidden directories are not ours to clean")
    os.utime(not_ours, (1, 1))
    os.utime(storage.path / "old-but-published.txt", (1, 1))

    assert storage.cleanup_stale_partials(600) == 2
    assert not stale.exists()
    assert not nested.exists()
    assert fresh.exists()
    assert active_path.exists()
    assert read_back(storage, "old-but-published.txt") == b"keep"
    assert not_ours.exists()
    active.close()
    assert storage.cleanup_stale_partials(600) == 1
    assert storage.cleanup_stale_partials(0, now=time.time() + 10) == 1  # the fresh one


# --------------------------------------------------------------------------- reading


def test_open_for_read_refuses_what_is_not_a_regular_file(storage: StorageRoot) -> None:
    (storage.path / "dir").mkdir(parents=True)
    os.mkfifo(storage.path / "fifo")  # opening it for reading would block a worker thread
    with pytest.raises(UnsafePathError, match="directory"):
        storage.open_for_read("dir")
    with pytest.raises(UnsafePathError, match="regular file"):
        storage.open_for_read("fifo")
    with pytest.raises(FileNotFoundError):
        storage.open_for_read("missing.txt")
    with pytest.raises(FileNotFoundError):
        storage.open_for_read("missing/a.txt")


def test_open_for_read_returns_an_unbuffered_file(storage: StorageRoot) -> None:
    receive(storage, "a.bin", b"0123456789")
    handle, size = storage.open_for_read("a.bin")
    with handle:
        buffer = bytearray(4)
        assert size == 10
        assert handle.readinto(buffer) == 4
        assert buffer == b"0123"
        assert os.get_blocking(handle.fileno())
    assert handle.closed


# --------------------------------------------------------------------------- listing


def test_list_files(storage: StorageRoot) -> None:
    receive(storage, "b.txt", b"bb", "t1")
    receive(storage, "a/c.txt", b"ccc", "t2")
    receive(storage, "a/b/d.txt", b"", "t3")
    (storage.path / "empty-dir").mkdir()
    listed = storage.list_files()
    assert [(entry.name, entry.size) for entry in listed] == [
        ("a/b/d.txt", 0),
        ("a/c.txt", 3),
        ("b.txt", 2),
    ]
    for entry in listed:
        assert entry.modified == pytest.approx(_mtime(storage, entry.name))
    assert storage.list_files(max_entries=2) == listed[:2]
    assert storage.list_files(max_entries=0) == []
    with pytest.raises(ValueError, match="max_entries"):
        storage.list_files(max_entries=-1)


def test_list_files_shows_only_downloadable_names(storage: StorageRoot) -> None:
    storage.ensure()
    root = storage.path
    (root / "ok.txt").write_bytes(b"ok")
    (root / ".hidden").write_bytes(b"h")
    (root / "CON").write_bytes(b"c")
    (root / "back\\slash").write_bytes(b"b")
    (root / "ne\u0301.txt").write_bytes(b"nfd")  # would download as a different (NFC) name
    (root / ".git").mkdir()
    (root / ".git" / "config").write_bytes(b"g")
    os.mkfifo(root / "fifo")
    assert [entry.name for entry in storage.list_files()] == ["ok.txt"]


# --------------------------------------------------------------------------- space checks


def test_free_space(storage: StorageRoot) -> None:
    storage.ensure()
    result = os.statvfs(storage.path)
    assert storage.free_space() == pytest.approx(result.f_bavail * result.f_frsize, rel=0.01)


def test_check_can_accept(storage: StorageRoot, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(StorageRoot, "free_space", lambda self: 1000)
    storage.check_can_accept(1000)
    storage.check_can_accept(1000, max_file_size=1000)
    storage.check_can_accept(5000, offset=4000)  # a resume only needs the rest
    cases = [
        ((1001,), {"max_file_size": 1000}, "too_large"),
        ((1001,), {}, "no_space"),
        ((1000,), {"reserve": 1}, "no_space"),
        ((-1,), {}, "invalid_size"),
        ((10,), {"offset": 11}, "invalid_size"),
    ]
    for args, kwargs, code in cases:
        with pytest.raises(TransferError) as info:
            storage.check_can_accept(*args, **kwargs)
        assert info.value.code == code


def test_partial_file_is_a_context_manager(storage: StorageRoot) -> None:
    with storage.open_partial("a.txt", TID, resume=False) as partial:
        assert isinstance(partial, PartialFile)
        partial.write_block(b"abc")
        partial.fsync()
    assert partial.closed
    assert storage.find_partial("a.txt", TID) == 3


def test_a_fresh_start_cuts_a_partial_left_over_but_a_new_one_needs_no_cut(
    storage: StorageRoot,
) -> None:
    # A partial file already there (a crashed try with the same id) is cut to
    # nothing by a fresh start; a partial the open creates is empty as it is.
    left = storage.open_partial("cut.bin", TID, resume=False)
    left.write_block(b"stale bytes of an earlier try" * 100)
    left.close()
    again = storage.open_partial("cut.bin", TID, resume=False)
    assert again.offset == 0 and os.fstat(again._require_open()).st_size == 0
    again.write_block(b"new")
    assert again.publish(overwrite=False, expected_sha256=sha256(b"new")) == "cut.bin"
    assert read_back(storage, "cut.bin") == b"new"
    fresh = storage.open_partial("new.bin", "f" * 32, resume=False)
    try:
        assert os.fstat(fresh._require_open()).st_size == 0
        # Written and read back through the descriptor, left non-blocking (a
        # regular file's reads and writes are not affected).
        fresh.write_block(b"x" * 70000)
        assert fresh.publish(overwrite=False, expected_sha256=sha256(b"x" * 70000)) == "new.bin"
    finally:
        fresh.close()
    assert read_back(storage, "new.bin") == b"x" * 70000


def test_a_held_root_serves_this_threads_operations_and_is_closed_after(
    storage: StorageRoot,
) -> None:
    # A missing root is not held (nothing is created by the hold itself).
    with storage.holding_root():
        assert not storage.path.exists()
        receive(storage, "made.bin", b"first")
    before = open_descriptors()
    with storage.holding_root():
        receive(storage, "sub/held.bin", b"second")
        storage.sync_directories(["sub/held.bin", "made.bin"])
        # Another instance on the same path does not use this thread's hold.
        other = StorageRoot(storage.path)
        assert read_back(other, "sub/held.bin") == b"second"
        # Another thread does not see the hold: it resolves the root itself.
        seen: list[bytes] = []
        reader = threading.Thread(target=lambda: seen.append(read_back(storage, "made.bin")))
        reader.start()
        reader.join(10)
        assert seen == [b"first"]
    assert not opened_since(before)
    assert read_back(storage, "sub/held.bin") == b"second"


def size_of(info: os.stat_result | None) -> int:
    assert info is not None
    return info.st_size


def test_a_held_root_is_used_as_it_is_for_a_top_level_check_and_sync(
    storage: StorageRoot, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A small file's re-run check (entry_stat) and its directory's fsync
    # use the held descriptor itself for a name at the top: no dup, no close,
    # no open. A name in a subdirectory still opens (and closes) its directory.
    receive(storage, "top.bin", b"top")
    receive(storage, "sub/deep.bin", b"deep")
    calls: list[str] = []
    real_dup, real_close, real_open = os.dup, os.close, os.open

    def dup(fd: int) -> int:
        calls.append("dup")
        return real_dup(fd)

    def close(fd: int) -> None:
        calls.append("close")
        real_close(fd)

    def open_(*args: object, **kwargs: object) -> int:
        calls.append("open")
        return real_open(*args, **kwargs)  # type: ignore[arg-type]

    before = open_descriptors()
    with storage.holding_root():
        monkeypatch.setattr(os, "dup", dup)
        monkeypatch.setattr(os, "close", close)
        monkeypatch.setattr(os, "open", open_)
        assert size_of(storage.entry_stat("top.bin")) == 3
        assert storage.entry_stat("missing.bin") is None
        storage.sync_directories(["top.bin"])
        assert calls == []
        assert size_of(storage.entry_stat("sub/deep.bin")) == 4
        storage.sync_directories(["sub/deep.bin"])
        assert calls.count("close") == calls.count("dup") + calls.count("open") > 0
        monkeypatch.undo()
    assert not opened_since(before)
    # The hold ended with its descriptor closed; the root still works unheld.
    assert size_of(storage.entry_stat("top.bin")) == 3


def test_a_resume_takes_the_hash_kept_at_close_and_reads_only_what_it_lacks(
    storage: StorageRoot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A partial closed as it was is not read again when resumed: its running
    hash was kept (``_prefix_digests``). Until 2026-12-07 every resume read
    it whole, which a peer beginning the same upload in a loop made the
    server do again and again (271 begins: 15 GiB hashed in 9 s). A file
    changed since (its change time moved) is read whole; a hash stopped
    part way keeps what it read, and the next resume reads only the rest."""
    block = _storage._HASH_BLOCK
    data = os.urandom(3 * block + 4321)
    read: list[int] = []
    real_pread = os.pread

    def counting_pread(fd: int, length: int, offset: int) -> bytes:
        read.append(length)
        return real_pread(fd, length, offset)

    monkeypatch.setattr(os, "pread", counting_pread)
    first = storage.open_partial("big.bin", TID, resume=False)
    first.write_block(data)
    first.close()
    again = storage.open_partial("big.bin", TID, resume=True)
    assert (again.offset, again.sha256_hex(), sum(read)) == (len(data), sha256(data), 0)
    again.close()
    # Changed behind its back: read whole, and hashed as it now is.
    grown = data + b"more"
    path = storage.path / partial_basename("big.bin", TID)
    with open(path, "ab") as extra:
        extra.write(b"more")
    changed = storage.open_partial("big.bin", TID, resume=True)
    assert (changed.offset, changed.sha256_hex(), sum(read)) == (
        len(grown),
        sha256(grown),
        len(grown),
    )
    changed.close()
    with open(path, "ab") as extra:  # (so that nothing kept applies)
        extra.write(b"!")
    grown += b"!"
    # Stopped after its first block: the next resume reads the rest only.
    read.clear()
    stop = threading.Event()

    def stopping_pread(fd: int, length: int, offset: int) -> bytes:
        stop.set()
        return counting_pread(fd, length, offset)

    monkeypatch.setattr(os, "pread", stopping_pread)
    with pytest.raises(Stopped):
        storage.open_partial("big.bin", TID, resume=True, stop=stop)
    assert read == [block]
    monkeypatch.setattr(os, "pread", counting_pread)
    rest = storage.open_partial("big.bin", TID, resume=True)
    assert (rest.offset, rest.sha256_hex(), sum(read)) == (len(grown), sha256(grown), len(grown))
    rest.close()


def test_a_removed_partial_takes_its_kept_hash_with_it(storage: StorageRoot) -> None:
    """Each way a partial goes (expired by the sweep, evicted or dropped by
    its directory, discarded by name) forgets the hash kept for it at its
    close (until 2026-12-08 those stayed until 10,000 later ones pushed them
    out); a partial that stays keeps its own."""

    def kept(status: os.stat_result) -> bool:
        return (status.st_dev, status.st_ino) in PREFIX_DIGESTS._kept

    ids = [f"{i:032x}" for i in range(1, 5)]
    paths = [storage.path / partial_basename("kept.bin", tid) for tid in ids]
    for transfer_id in ids:
        partial = storage.open_partial("kept.bin", transfer_id, resume=False)
        partial.write_block(b"some bytes")
        partial.close()
    stats = [path.stat() for path in paths]
    assert all(kept(status) for status in stats)
    os.utime(paths[0], (1, 1))  # old enough for the sweep
    assert storage.cleanup_stale_partials(3600) == 1
    assert storage.remove_idle_partial((), paths[1].name)
    assert storage.discard_partial("kept.bin", ids[2])
    assert storage.remove_other_partials("kept.bin", ids[3]) == 0  # its own stays
    assert [kept(status) for status in stats] == [False, False, False, True]


def test_a_listing_is_in_name_order_and_pages_from_any_name(tmp_path: Path) -> None:
    """The walk yields names in plain name order (``a-z.txt`` and ``a.txt``
    before ``a/b``, which comes before ``a0``), so a listing cut at N files
    holds the first N by name, and ``after=`` starts the next page whatever
    name it is given, one that exists or not, skipping the directories all
    of whose names come before it."""
    names = [
        "a-z.txt", "a.txt", "a/b", "a/b-c", "a/c-", "a/c/d", "a/c/e/f", "a/é", "a0", "b",
        "zz/y", "é",
    ]  # fmt: skip
    for name in names:
        path = tmp_path / "root" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(name.encode())
    root = StorageRoot(tmp_path / "root")
    assert [entry.name for entry in root.list_files()] == sorted(names)
    for size in range(1, 6):
        listed: list[str] = []
        after = None
        while page := [entry.name for entry in root.list_files(max_entries=size, after=after)]:
            listed += page
            after = page[-1]
        assert listed == sorted(names), size
    for after in ["", "a", "a/", "a/c", "a/c/", "a/c/d", "a/c/e", "a/zzz", "a-", "zz", "\uffff"]:
        expected = [name for name in sorted(names) if name > after]
        assert [entry.name for entry in root.list_files(after=after)] == expected, after
    assert [entry.name for entry in root.list_files(prefix="a", after="a/c")] == [
        "a/c-", "a/c/d", "a/c/e/f", "a/é",
    ]  # fmt: skip


def test_a_directory_past_a_slice_is_read_again_and_every_name_listed_once(tmp_path: Path) -> None:
    """A listing holds a slice of a directory's children at a time (at least
    ``_LISTING_SLICE``) and reads the directory again for the next: across
    slices of empty directories, hidden and partial files and files named
    among the directories, every page lists the next names by name, each
    once, from any ``after``."""
    root_path = tmp_path / "root"
    root_path.mkdir()
    listable: list[str] = []
    for i in range(_storage._LISTING_SLICE + 44):
        (root_path / f"a{i:03d}").mkdir()  # empty: nothing listed
        (root_path / f".h{i:03d}").write_bytes(b"")
        if i % 50 == 7:
            (root_path / f"a{i:03d}-x").write_bytes(b"x")  # sorts before "a007/"
            listable.append(f"a{i:03d}-x")
    (root_path / ".conduit-partial-1-b000").write_bytes(b"")
    for i in range(_storage._LISTING_SLICE + 100):
        (root_path / f"b{i:03d}").write_bytes(b"b")
        listable.append(f"b{i:03d}")
    (root_path / "a299" / "in").write_bytes(b"deep")
    listable.append("a299/in")
    listable.sort()
    root = StorageRoot(root_path)
    for size in [1, 7, 300, len(listable) + 1]:
        listed: list[str] = []
        after = None
        for _ in range(len(listable) + 1):
            page = [entry.name for entry in root.list_files(max_entries=size, after=after)]
            assert len(page) <= size
            if not page:
                break
            listed += page
            after = page[-1]
        assert listed == listable, size
    for after in ["a007", "a007-x", "a200", "a299", "a299/", "a299/in", "a300", "b", "b299", "c"]:
        expected = [name for name in listable if name > after][:300]
        assert [entry.name for entry in root.list_files(max_entries=300, after=after)] == expected


def test_a_listing_holds_a_slice_of_a_large_directory_not_all_of_it(tmp_path: Path) -> None:
    """A page of a directory of 20,000 files holds about the page's worth of
    entries, not the directory (before 2026-12-08 every child was read and
    sorted: 150,000 files held 30 MB for a page of two)."""
    directory = tmp_path / "root" / "d"
    directory.mkdir(parents=True)
    for i in range(20_000):
        (directory / f"f{i:05d}").write_bytes(b"")
    root = StorageRoot(tmp_path / "root")
    pages = [(None, ["d/f00000", "d/f00001"]), ("d/f10000", ["d/f10001", "d/f10002"])]
    for after, expected in pages:
        tracemalloc.start()
        try:
            names = [entry.name for entry in root.list_files(max_entries=2, after=after)]
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert names == expected
        assert peak < 512 * 1024, peak  # 20,000 entries held took over 3 MB


def test_what_a_listing_never_shows_takes_no_room_in_its_slices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hidden files, symlinks and FIFOs ahead of a page's first file are left
    out before a directory's slice is cut (20,000 hidden files filled 79
    slices, and their directory was read 79 times for a page of two), and
    the slices grow while a directory's children list nothing (3,000 empty
    directories: 4 readings, not 12)."""
    readings: list[int] = []
    children = _storage._children

    def counted(dir_fd: int, *args: Any) -> Any:
        readings.append(dir_fd)
        return children(dir_fd, *args)

    monkeypatch.setattr(_storage, "_children", counted)
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    for i in range(3_000):
        (hidden / f".h{i:04d}").write_bytes(b"")
        (hidden / f"l{i:04d}").symlink_to("z")
    os.mkfifo(hidden / "fifo")
    (hidden / "z").write_bytes(b"z")
    assert [entry.name for entry in StorageRoot(hidden).list_files(max_entries=2)] == ["z"]
    assert len(readings) == 1
    readings.clear()
    empty = tmp_path / "empty"
    empty.mkdir()
    for i in range(3_000):
        (empty / f"d{i:04d}").mkdir()
    (empty / "z").write_bytes(b"z")
    assert [entry.name for entry in StorageRoot(empty).list_files(max_entries=2)] == ["z"]
    top = readings[0]
    assert readings.count(top) == 4  # slices of 256, 512, 1,024, 2,048 children and more


def test_a_listing_of_nothing_leaves_no_descriptor_open(tmp_path: Path) -> None:
    """``max_entries=0`` lists nothing and closes the directory it opened."""
    (tmp_path / "root" / "d").mkdir(parents=True)
    (tmp_path / "root" / "d" / "f").write_bytes(b"f")
    root = StorageRoot(tmp_path / "root")
    before = open_descriptors()
    for prefix in [None, "d"] * 10:
        assert root.list_files(max_entries=0, prefix=prefix) == []
    assert not opened_since(before)


def test_a_walk_short_of_descriptors_fails_rather_than_count_short(tmp_path: Path) -> None:
    """A directory the quota's count, the search for partial files or a listing
    cannot open for want of a descriptor raises; one that is gone, or a
    symlink, is passed over. (Every open failure passed its directory over
    as if gone: the first version of the walk that holds a directory open
    per level counted short, without a word, under every odd limit from 11
    to 39 descriptors; the walk before it failed on a directory's reading
    first, by luck. A listing below a prefix whose directory could not be
    opened so was empty.)"""
    deep = tmp_path / "root" / "/".join(f"d{i}" for i in range(40))
    deep.mkdir(parents=True)
    (deep / "f").write_bytes(b"deep")
    (deep / ".conduit-partial-1-g").write_bytes(b"partial")
    (tmp_path / "root" / "link").symlink_to(tmp_path / "root" / "d0", target_is_directory=True)
    # Under each limit from too few descriptors to enough, each walk either
    # raises or finds everything (which limit makes which open fail depends
    # on what the interpreter holds: so every one in between is tried).
    script = f"""
import resource
from conduit.transfer._storage import StorageRoot
root = StorageRoot({str(tmp_path / "root")!r})
walks = {{
    "stored_bytes": root.stored_bytes,
    "list_partials": lambda: [(p.directories, p.basename) for p in root.list_partials()],
    "list_files": lambda: [e.name for e in root.list_files()],
    "list_files_prefix": lambda: [e.name for e in root.list_files(prefix="d0/d1/d2/d3")],
}}
whole = {{name: walk() for name, walk in walks.items()}}
assert whole["list_files"] == ["/".join(f"d{{i}}" for i in range(40)) + "/f"], whole
assert len(whole["list_partials"]) == 1 and whole["list_files_prefix"], whole
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
for limit in range(3, 80):
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    for name, walk in walks.items():
        try:
            found = walk()
        except OSError as exc:
            print(limit, name, "raised", exc.errno)
        else:
            print(limit, name, "whole" if found == whole[name] else "short")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    outcomes = [line.split(" ", 2)[2] for line in done.stdout.splitlines()]
    assert "short" not in outcomes, done.stdout
    assert f"raised {errno.EMFILE}" in outcomes, done.stdout  # the limits were low enough
    assert outcomes[-4:] == ["whole"] * 4, done.stdout  # and high enough


def test_the_walks_of_every_entry_hold_one_entry_per_level(tmp_path: Path) -> None:
    """The quota's count and the search for partial files visit every entry
    in whatever order the directories give: they hold no directory whole (a
    directory of 20,000 files took over 3 MB, read whole and sorted, until
    2026-12-08) and still count and find every one."""
    directory = tmp_path / "root" / "d"
    directory.mkdir(parents=True)
    for i in range(20_000):
        (directory / f"f{i:05d}").write_bytes(b"x")
    (directory / ".conduit-partial-1-f00000").write_bytes(b"part")
    root = StorageRoot(tmp_path / "root")
    expected = (
        20_000 * (1 + _storage.ENTRY_ALLOWANCE)
        + os.stat(tmp_path / "root").st_size
        + os.stat(directory).st_size
    )
    tracemalloc.start()
    try:
        total = root.stored_bytes()
        _, counting_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        partials = root.list_partials()
        _, finding_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == expected
    assert [partial.basename for partial in partials] == [".conduit-partial-1-f00000"]
    assert counting_peak < 512 * 1024, counting_peak
    assert finding_peak < 512 * 1024, finding_peak
