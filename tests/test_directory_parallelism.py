"""How many of a directory's files go at once, one by one (``conduit.transfer._tree``).

Files over the small-file limit each cost two or three round trips besides
their bytes, so medium ones (up to ``MEDIUM_FILE_SIZE``) go
``PARALLEL_MEDIUM_FILES`` at once, and larger ones (or of a size not known)
no more than ``PARALLEL_FILES`` of those. Counted at the handler's own
single-file entry points, both ways, over loopback; and the CLI's jobs,
which take the same places unless ``-j`` says how many.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from conduit import FileTransferHandler
from conduit.cli._display import FileJob, SilentDisplay
from conduit.cli._transfer import _run_jobs
from conduit.transfer._receiver import Receiver
from conduit.transfer._sender import Sender
from conduit.transfer._tree import MEDIUM_FILE_SIZE, PARALLEL_FILES, PARALLEL_MEDIUM_FILES
from conftest import ClientFactory, ServerFactory
from transfer_helpers import storage_server, visible_files

KiB = 1024


@attrs.define
class _InFlight:
    """The most files in flight at once, in all and of the large ones."""

    large_names: set[str]
    now: int = 0
    large_now: int = 0
    most: int = 0
    most_large: int = 0

    def wrap(self, method: Callable[..., Any], name_at: int) -> Callable[..., Any]:
        async def counted(*args: Any, **kwargs: Any) -> Any:
            large = os.fspath(args[name_at]).rsplit("/", 1)[-1] in self.large_names
            self.now += 1
            self.large_now += large
            self.most = max(self.most, self.now)
            self.most_large = max(self.most_large, self.large_now)
            try:
                return await method(*args, **kwargs)
            finally:
                self.now -= 1
                self.large_now -= large

        return counted


def _tree(top: Path) -> tuple[dict[str, bytes], set[str]]:
    files = {f"m{i:02d}.bin": os.urandom(100 * KiB + i) for i in range(30)}
    large = {f"L{i}.bin": os.urandom(MEDIUM_FILE_SIZE + 1 + i) for i in range(8)}
    files.update(large)
    top.mkdir()
    for name, data in files.items():
        (top / name).write_bytes(data)
    return files, set(large)


async def test_medium_files_go_more_at_once_than_large_ones_both_ways(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    storage = tmp_path / "storage"
    _handler, server = await storage_server(server_factory, storage)
    client = await client_factory(server)
    files, large = _tree(tmp_path / "tree")
    local = FileTransferHandler(storage_dir=tmp_path / "client")

    up = _InFlight(large)
    # Sender.send(self, peer, path, remote_name, ...): the local path is args[2].
    monkeypatch.setattr(Sender, "send", up.wrap(Sender.send, 2))
    sent = await local.send_to_server(client, tmp_path / "tree", remote_name="d")
    assert sent["success"] is True and sent["transferred"] == len(files), sent
    assert {name: (storage / "d" / name).read_bytes() for name in files} == files

    down = _InFlight(large)
    # Receiver.download(self, peer, name, ...): the remote name is args[2].
    monkeypatch.setattr(Receiver, "download", down.wrap(Receiver.download, 2))
    got = await local.receive_from_server(client, "d", tmp_path / "out")
    assert got["success"] is True and got["transferred"] == len(files), got
    assert visible_files(tmp_path / "out" / "d") == sorted(files)
    assert {name: (tmp_path / "out" / "d" / name).read_bytes() for name in files} == files

    for seen in (up, down):
        # More than the large files' limit at once: the medium ones are not
        # held to it; never more than either limit.
        assert PARALLEL_FILES < seen.most <= PARALLEL_MEDIUM_FILES, seen
        assert 1 <= seen.most_large <= PARALLEL_FILES, seen


_MEDIUM = [FileJob(f"m{i}", None, 200 * KiB) for i in range(30)]
_LARGE = [FileJob(f"L{i}", None, MEDIUM_FILE_SIZE + 1) for i in range(10)]
_UNKNOWN = [FileJob("u", None, None)]  # of a size not known: as a large one


@pytest.mark.parametrize(
    ("jobs", "kinds", "most"),
    [
        (None, "medium", PARALLEL_MEDIUM_FILES),
        (None, "large", PARALLEL_FILES),
        (None, "all", PARALLEL_MEDIUM_FILES),
        (3, "all", 3),
        (20, "large", len(_LARGE) + 1),  # -j says how many, whatever the sizes
    ],
    ids=lambda value: "default" if value is None else str(value),
)
async def test_the_cli_jobs_take_the_same_places(jobs: int | None, kinds: str, most: int) -> None:
    chosen = {
        "medium": _MEDIUM,
        "large": [*_LARGE, *_UNKNOWN],
        "all": [*_LARGE, *_UNKNOWN, *_MEDIUM],
    }[kinds]
    planned = [FileJob(job.name, job.local, job.size) for job in chosen]
    seen = _InFlight({job.name for job in [*_LARGE, *_UNKNOWN]})
    let_go = trio.Event()

    async def transfer(_name: str, _job: FileJob, _on_progress: Any) -> dict[str, Any]:
        await let_go.wait()
        return {"success": True}

    counted = seen.wrap(transfer, 0)

    async def by_name(job: FileJob, on_progress: Any) -> dict[str, Any]:
        result: dict[str, Any] = await counted(job.name, job, on_progress)
        return result

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_run_jobs, planned, by_name, SilentDisplay(), jobs)
            await trio.testing.wait_all_tasks_blocked()
            assert seen.most == most, seen
            if jobs is None:
                assert seen.most_large <= PARALLEL_FILES, seen
            let_go.set()
    assert all(job.success for job in planned)
