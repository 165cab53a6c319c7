"""The hash gate's digest cache serves only settled digests (git's "racy" entries).

A digest keyed on ``(dev, ino, size, mtime, ctime)`` is only as good as the
timestamps: a write through a shared mapping to an already-dirty page, or a
write within one tick of a coarse clock, changes the bytes and not the key.
So a file whose mtime or ctime is recent (within ``SETTLE_NS`` of the moment
its hash starts) is read every time it is asked for; an old, unchanged file
costs one ``fstat`` and a lookup.

Time is controlled, never measured: ``_hashing._now_ns`` (the wall clock the
gate compares timestamps with) is replaced by a clock pinned relative to the
file's own timestamps, so a loaded machine cannot turn "recent" into "old".
ctime cannot be set back, so "old" is made by moving the gate's clock forward.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import time
from pathlib import Path

import pytest
import trio

from conduit import FileTransferHandler
from conduit.transfer import _hashing
from conduit.transfer._hashing import SETTLE_NS, HashGate
from conduit.transfer._storage import sha256_of_fd
from conftest import ClientFactory, ServerFactory
from transfer_helpers import storage_server

SIZE = 64 * 1024
HOUR_NS = 3600 * 10**9


def _last_change_ns(path: Path) -> int:
    info = os.stat(path)
    return max(info.st_mtime_ns, info.st_ctime_ns)


def _recent_clock(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    """The gate's clock reads 1 s after ``path``'s last change, whatever the real time."""
    pinned = _last_change_ns(path) + 10**9
    assert pinned - SETTLE_NS < _last_change_ns(path)  # i.e. 1 s is "recent"
    monkeypatch.setattr(_hashing, "_now_ns", lambda: pinned)


def _settled_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """The gate's clock an hour ahead: every file written by the test is settled."""
    monkeypatch.setattr(_hashing, "_now_ns", lambda: time.time_ns() + HOUR_NS)


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes of the whole-file reads the gate makes (``sha256_of_fd`` calls)."""
    calls: list[int] = []
    real = sha256_of_fd

    def counting(fd: int, size: int) -> tuple[str, int]:
        calls.append(size)
        return real(fd, size)

    monkeypatch.setattr(_hashing, "sha256_of_fd", counting)
    return calls


def _digest(gate: HashGate, path: Path) -> str:
    fd = os.open(path, os.O_RDONLY)
    try:
        return gate.digest_of_fd(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def test_a_recently_changed_file_is_hashed_every_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reads: list[int]
) -> None:
    path = tmp_path / "fresh.bin"
    first = os.urandom(SIZE)
    path.write_bytes(first)
    _recent_clock(monkeypatch, path)
    gate = HashGate()
    for _ in range(3):
        assert _digest(gate, path) == hashlib.sha256(first).hexdigest()
    # Not remembered: each ask read the file (the old code read it once).
    assert reads == [SIZE] * 3
    assert gate.hashed_bytes == 3 * SIZE
    # Same size, new bytes, mtime put back: only the (recent) ctime moved.
    before = os.stat(path)
    second = os.urandom(SIZE)
    path.write_bytes(second)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(path).st_mtime_ns == before.st_mtime_ns
    _recent_clock(monkeypatch, path)
    assert _digest(gate, path) == hashlib.sha256(second).hexdigest()
    assert len(reads) == 4


def test_an_old_unchanged_file_is_read_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reads: list[int]
) -> None:
    path = tmp_path / "old.bin"
    data = os.urandom(SIZE)
    path.write_bytes(data)
    past = _last_change_ns(path) - HOUR_NS
    os.utime(path, ns=(past, past))
    _settled_clock(monkeypatch)
    gate = HashGate()
    for _ in range(5):
        assert _digest(gate, path) == hashlib.sha256(data).hexdigest()
    assert reads == [SIZE]  # served from the cache four times
    assert gate.hashed_bytes == SIZE
    # A change moves ctime (and here mtime): a miss, read again.
    changed = os.urandom(SIZE)
    path.write_bytes(changed)
    assert _digest(gate, path) == hashlib.sha256(changed).hexdigest()
    assert reads == [SIZE, SIZE]


def test_a_cached_entry_is_not_served_once_its_timestamps_look_recent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reads: list[int]
) -> None:
    path = tmp_path / "clock.bin"
    path.write_bytes(os.urandom(SIZE))
    _settled_clock(monkeypatch)
    gate = HashGate()
    _digest(gate, path)
    _digest(gate, path)
    assert len(reads) == 1
    # The clock is set back: the same key is now "recent", so it is read again.
    _recent_clock(monkeypatch, path)
    _digest(gate, path)
    _digest(gate, path)
    assert len(reads) == 3


def test_bytes_changed_through_a_dirty_shared_mapping_are_seen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reviewer's case on the gate: the second store hits an already-dirty
    page, so no timestamp moves and the key is the same; the file was changed
    a moment ago, so its digest is read again, not served."""
    path = tmp_path / "mapped.bin"
    path.write_bytes(os.urandom(SIZE))
    gate = HashGate()
    fd = os.open(path, os.O_RDWR)
    try:
        with mmap.mmap(fd, SIZE) as mapped:
            mapped[0:4] = b"AAAA"  # the first store dirties the page (timestamps move)
            _recent_clock(monkeypatch, path)
            assert gate.digest_of_fd(fd, SIZE) == hashlib.sha256(mapped[:]).hexdigest()
            mapped[100:104] = b"ZZZZ"  # same page, already dirty: no timestamp moves
            mapped.flush()
            now = mapped[:]
        assert gate.digest_of_fd(fd, SIZE) == hashlib.sha256(now).hexdigest()
    finally:
        os.close(fd)


def test_a_file_written_during_its_hash_is_read_again_and_not_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "racing.bin"
    old, new = os.urandom(SIZE), os.urandom(SIZE)
    path.write_bytes(old)
    _settled_clock(monkeypatch)  # settled, so only the after-fstat can refuse it
    real = sha256_of_fd
    calls: list[int] = []

    def read_then_overwrite(fd: int, size: int) -> tuple[str, int]:
        result = real(fd, size)
        calls.append(size)
        if len(calls) == 1:  # a writer lands just as the first read ends
            stamp = os.stat(path).st_mtime_ns - HOUR_NS  # a key that surely differs
            path.write_bytes(new)
            os.utime(path, ns=(stamp, stamp))
        return result

    monkeypatch.setattr(_hashing, "sha256_of_fd", read_then_overwrite)
    gate = HashGate()
    # The first read's digest (of the old bytes) was not trusted: read again.
    assert _digest(gate, path) == hashlib.sha256(new).hexdigest()
    assert len(calls) == 2
    # The second read was settled and stable: cached under the new key only.
    assert _digest(gate, path) == hashlib.sha256(new).hexdigest()
    assert len(calls) == 2


async def test_a_download_re_run_fetches_a_file_changed_through_a_mapping(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The reviewer's reproduction end to end: ``file_stat(sha256=True)`` then a
    re-run of ``receive_from_server`` must not answer ``already_there`` with the
    server's old digest."""
    storage = tmp_path / "store"
    storage.mkdir()
    _handler, server = await storage_server(server_factory, storage)
    client = await client_factory(server)
    size = 1024 * 1024
    old = bytearray(os.urandom(size))
    (storage / "doc.bin").write_bytes(old)
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(storage / "doc.bin", os.O_RDWR)
    try:
        with mmap.mmap(fd, size) as mapped:
            mapped[0:4] = b"AAAA"
            old[0:4] = b"AAAA"
            (out / "doc.bin").write_bytes(bytes(old))  # the client has this version
            _recent_clock(monkeypatch, storage / "doc.bin")
            with trio.fail_after(30):
                first = await client.call("file_stat", name="doc.bin", sha256=True)
            assert first["sha256"] == hashlib.sha256(old).hexdigest()
            mapped[100:104] = b"ZZZZ"  # no timestamp moves
            mapped.flush()
            now = mapped[:]
    finally:
        os.close(fd)
    assert now != bytes(old)
    with trio.fail_after(30):
        second = await client.call("file_stat", name="doc.bin", sha256=True)
        result = await FileTransferHandler().receive_from_server(client, "doc.bin", local_dir=out)
    assert second["sha256"] == hashlib.sha256(now).hexdigest()
    assert result["success"] and not result.get("skipped"), result
    fetched = {path.name: path.read_bytes() for path in out.iterdir()}
    assert now in fetched.values(), sorted(fetched)
