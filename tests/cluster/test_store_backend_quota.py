"""The store backend's quota against its own concurrency: PUTs and uploads that
land while another call or admission counts the user's bytes.

The store is a real :class:`~conduit.cluster.local.LocalStore` (the backend
does not care which store it drives) with a delay where S3 has its round trip,
so that the interleaving is the one a network gives, every time.
"""

from __future__ import annotations

import hashlib
import types
from pathlib import Path
from typing import Any

import attrs
import trio

from conduit.cluster.local import LocalStore
from conduit.errors import TransferError
from conduit.transfer._backend_store import StoreBackend
from conduit.transfer._batch_store import Entry
from conduit.transfer._storage import ENTRY_ALLOWANCE

QUOTA = 600_000


class SlowStore(LocalStore):
    """A local store whose PUT and listing take a round trip (0.2 s)."""

    async def put_file(
        self, name: str, data: bytes, *, sha256: str, overwrite: bool = False
    ) -> str:
        await trio.sleep(0.2)
        return await super().put_file(name, data, sha256=sha256, overwrite=overwrite)

    async def used_bytes(self) -> int:
        counted = await super().used_bytes()
        await trio.sleep(0.2)  # the answer arrives later than the count it holds
        return counted


@attrs.define
class Settings:
    max_file_size: int | None = None
    overwrite: bool = False
    partial_ttl: float = 3600.0
    max_partial_bytes: int | None = None
    hash_gate: Any = None


def backend_on(tmp_path: Path) -> StoreBackend:
    base = tmp_path / "base"
    return StoreBackend(SlowStore(base), Settings(), substore=lambda root: SlowStore(base / root))


def user(tag: int) -> Any:
    """A peer of the user "u" (quota 600,000), connection ``tag``."""
    account = types.SimpleNamespace(root="u", quota=QUOTA, read_only=False)
    return types.SimpleNamespace(
        account=account,
        username="u",
        address=None,
        id=tag,
        connection=types.SimpleNamespace(owned={}),
    )


def entry(name: str, data: bytes) -> Entry:
    return Entry(name, data, hashlib.sha256(data).hexdigest())


async def stored_bytes(tmp_path: Path) -> int:
    """What the quota counts for the user, less what its entries and root take."""
    root = tmp_path / "base" / "u"
    files = sum(1 for path in root.rglob("*") if path.is_file())
    overhead = root.stat().st_size + files * ENTRY_ALLOWANCE
    return await LocalStore(root).used_bytes() - overhead


async def test_small_files_whose_puts_overlap_count_each_other(tmp_path: Path) -> None:
    backend = backend_on(tmp_path)
    entries = [entry("f1.bin", b"1" * 400_000), entry("f2.bin", b"2" * 400_000)]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for index, one in enumerate(entries):
                nursery.start_soon(backend.store_small, user(index), [one])
    outcomes = sorted(
        (one.published is not None, getattr(one.error, "code", None)) for one in entries
    )
    assert outcomes == [(False, "quota_exceeded"), (True, None)], outcomes
    assert await stored_bytes(tmp_path) == 400_000


async def test_an_upload_published_during_a_listing_is_counted(tmp_path: Path) -> None:
    backend = backend_on(tmp_path)
    data = b"a" * 400_000
    first = await backend.admit(user(1), "a.bin", len(data), "k" * 32, restart=False)

    async def publish_first() -> None:
        await trio.sleep(0.1)  # while the second admission's listing is under way
        await first.sink.write([data])
        await first.sink.publish(overwrite=False, expected_sha256=hashlib.sha256(data).hexdigest())
        await backend.release(first)

    refused: list[str] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(publish_first)
            try:
                await backend.admit(user(2), "b.bin", 400_000, "j" * 32, restart=False)
            except Exception as exc:  # the backend's TransferError
                refused.append(getattr(exc, "code", repr(exc)))
    assert refused == ["quota_exceeded"]
    assert await stored_bytes(tmp_path) == 400_000


async def test_a_refused_new_version_leaves_the_older_versions_partial_counted(
    tmp_path: Path,
) -> None:
    """The owner's partial of an older version is evicted when a new version's
    upload is admitted, not before: a new version refused (here by
    ``max_partial_bytes``) left it in the store, no longer counted by the cap
    (a review, 2026-12-07). Admitted, the new version takes it away."""
    base = tmp_path / "base"
    backend = StoreBackend(
        LocalStore(base),
        Settings(max_partial_bytes=1000),
        substore=lambda root: LocalStore(base / root),
    )
    with trio.fail_after(30):
        cut = await backend.admit(user(1), "r.bin", 800, "k" * 32, restart=False)
        await cut.sink.write([b"x" * 400])
        await backend.release(cut)  # cut: kept for a resume
        assert [key[1] for key in backend._kept] == ["r.bin"]
        refused = None
        try:
            await backend.admit(user(2), "r.bin", 1200, "j" * 32, restart=False)
        except TransferError as exc:
            refused = exc.code
        assert refused == "no_space"
        assert [key[1] for key in backend._kept] == ["r.bin"]  # still counted
        admitted = await backend.admit(user(3), "r.bin", 900, "i" * 32, restart=False)
        assert backend._kept == {}  # the older version's partial went
        await admitted.sink.close()
        await backend.release(admitted)
