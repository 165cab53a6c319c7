"""Plain helpers for ``test_transfer.py``: random files, hashes, tree snapshots, a cutter.

Nothing here is a fixture (fixtures live in the test module, so that ruff does
not see fixture parameters as redefinitions of imported names). The file
helpers are synchronous and meant to run in a worker thread
(``await trio.to_thread.run_sync(...)``), or through the async wrappers below,
so a test never blocks its event loop on the disk while a server is running.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import stat
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from conduit import Client, ClientDescriptor, FileTransferHandler, Server, ServerDescriptor
from conduit._connection import Connection
from conduit.transfer._names import partial_basename
from conduit.transfer._space import owned_transfer_id
from conduit.transfer._storage import StorageRoot
from conftest import Direction, ServerFactory, Tamper, TcpProxy
from hostile_names import PARTIAL_PREFIX

#: Block size for generating and hashing files: big files never sit in memory whole.
BLOCK = 8 * 1024 * 1024
MiB = 1024 * 1024


# --------------------------------------------------------------------------- servers


async def storage_server(
    server_factory: ServerFactory, storage: Path, **options: Any
) -> tuple[FileTransferHandler, Server]:
    """A server whose handler stores under ``storage`` (``options``: handler settings)."""
    handler = FileTransferHandler(storage_dir=storage, **options)
    server = await server_factory(register=handler.register_server_handlers)
    return handler, server


# --------------------------------------------------------------------------- files


#: Who owns a loopback test client's uploads in shared-password mode (its address).
LOOPBACK_OWNER = "host:127.0.0.1"


def upload_partial_name(name: str, key: str, owner: str = LOOPBACK_OWNER) -> str:
    """The basename of the partial file a server keeps for ``owner``'s upload of ``name``."""
    return partial_basename(name, owned_transfer_id(key, owner))


@attrs.define
class BudgetSettings:
    """What :class:`~conduit.transfer._space.DiskBudget` reads (the handler's
    settings, for a budget alone)."""

    storage: StorageRoot
    max_file_size: int | None = None
    overwrite: bool = False
    partial_ttl: float = 3600.0
    free_space_margin: int = 0
    max_partial_bytes: int | None = None
    max_reserved_per_user: int | None = None


class LinkCounter:
    """Counts the process's ``os.link`` calls (each still made) while ``monkeypatch`` lasts."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real_link = os.link

        def counting_link(*args: Any, **kwargs: Any) -> None:
            self.count += 1
            real_link(*args, **kwargs)

        monkeypatch.setattr(os, "link", counting_link)


@contextlib.contextmanager
def refusing_changes(directory: Path) -> Iterator[None]:
    """``directory`` refuses to have entries made or removed, for real:
    immutable as root (``chattr +i``), read-only to anyone else."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(directory)], check=True)
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(directory)], check=True)
    else:
        directory.chmod(0o555)
        try:
            yield
        finally:
            directory.chmod(0o700)


def write_random_file(path: Path, size: int) -> str:
    """Write ``size`` bytes from ``os.urandom`` to ``path`` in blocks; return their SHA-256 hex.

    Creates missing parent directories.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with open(path, "wb") as file:
        remaining = size
        while remaining > 0:
            block = os.urandom(min(BLOCK, remaining))
            digest.update(block)
            file.write(block)
            remaining -= len(block)
    return digest.hexdigest()


def sha256_of(path: Path) -> str:
    """SHA-256 hex of a file, read in blocks (never follows a final symlink)."""
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with open(fd, "rb") as file:
        while block := file.read(BLOCK):
            digest.update(block)
    return digest.hexdigest()


async def make_file(path: Path, size: int) -> str:
    """Async wrapper of :func:`write_random_file` (runs in a worker thread)."""
    return await trio.to_thread.run_sync(write_random_file, path, size)


async def file_sha256(path: Path) -> str:
    """Async wrapper of :func:`sha256_of` (runs in a worker thread)."""
    return await trio.to_thread.run_sync(sha256_of, path)


def write_bytes(path: Path, data: bytes) -> None:
    """Write a small file, creating its parent directories."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


# --------------------------------------------------------------------------- trees


def tree_snapshot(root: Path, *, skip: Path | None = None) -> dict[str, object]:
    """Every entry below ``root`` (links not followed): what it is and what it holds.

    Regular files map to ``(size, sha256)``, so the snapshot stays small for big
    files; ``skip`` leaves one subtree out (the storage directory itself, whose
    contents a test checks separately).
    """
    result: dict[str, object] = {}
    if not root.exists():
        return result
    for directory, dirnames, filenames in os.walk(root):  # os.walk does not follow links
        here = Path(directory)
        if skip is not None and (here == skip or skip in here.parents):
            dirnames[:] = []
            continue
        for entry in sorted(dirnames + filenames):
            full = here / entry
            if skip is not None and full == skip:
                continue
            relative = full.relative_to(root).as_posix()
            info = full.lstat()
            if stat.S_ISLNK(info.st_mode):
                result[relative] = ("link", os.readlink(full))
            elif stat.S_ISDIR(info.st_mode):
                result[relative] = "dir"
            elif stat.S_ISREG(info.st_mode):
                result[relative] = (info.st_size, sha256_of(full))
            else:
                result[relative] = "special"
    return result


def _regular_files(root: Path) -> list[Path]:
    found: list[Path] = []
    if not root.exists():
        return found
    for directory, dirnames, filenames in os.walk(root):
        for entry in dirnames + filenames:
            full = Path(directory, entry)
            try:
                mode = full.lstat().st_mode
            except FileNotFoundError:
                # A running server may remove a partial file (or its empty
                # directory) between the listing and this look.
                continue
            if stat.S_ISREG(mode):
                found.append(full)
    return found


def visible_files(root: Path) -> list[str]:
    """Relative names of the regular files below ``root`` with no hidden segment, sorted."""
    names = [path.relative_to(root).as_posix() for path in _regular_files(root)]
    return sorted(n for n in names if not any(part.startswith(".") for part in n.split("/")))


def partial_files(root: Path) -> list[Path]:
    """conduit's hidden partial files below ``root``."""
    return sorted(p for p in _regular_files(root) if p.name.startswith(PARTIAL_PREFIX))


def all_files(root: Path) -> list[str]:
    """Relative names of every regular file below ``root``, hidden ones included, sorted."""
    return sorted(path.relative_to(root).as_posix() for path in _regular_files(root))


# --------------------------------------------------------------------------- cutting


@attrs.define(eq=False)
class Cutter:
    """A ``tamper_factory`` for conftest's :class:`TcpProxy` that cuts the link mid-way.

    Bytes of ``direction`` pass unchanged until ``threshold`` of them have been
    forwarded; then the proxy black-holes that direction (nothing more gets
    through) and :meth:`cut_when_tripped`, running in the test's nursery, drops
    every connection. Set :attr:`proxy` once the proxy exists.
    """

    direction: Direction
    threshold: int
    proxy: TcpProxy | None = None
    forwarded: int = 0
    tripped: trio.Event = attrs.field(factory=trio.Event)

    def __call__(self, direction: Direction) -> Tamper | None:
        return self._count if direction == self.direction else None

    def _count(self, chunk: bytes) -> bytes:
        self.forwarded += len(chunk)
        if self.forwarded >= self.threshold and not self.tripped.is_set():
            assert self.proxy is not None, "set Cutter.proxy before traffic flows"
            self.proxy.blackhole(self.direction)
            self.tripped.set()
        return chunk

    async def cut_when_tripped(self) -> None:
        """Wait for the threshold, then drop every connection of the proxy."""
        await self.tripped.wait()
        assert self.proxy is not None
        await self.proxy.cut()


def register_without(handler: FileTransferHandler, method: str) -> Callable[[Server], None]:
    """Registers ``handler`` on a server but for ``method``: a server from before it."""

    def register(server: Server) -> None:
        add = server.register_rpc

        def everything_but(function: Any, name: str | None = None) -> None:
            if name != method:
                add(function, name)

        server.register_rpc = everything_but  # type: ignore[method-assign]
        handler.register_server_handlers(server)

    return register


def register_replacing(
    handler: FileTransferHandler, method: str, function: Callable[..., Any]
) -> Callable[[Server], None]:
    """Registers ``handler`` on a server with ``function`` as its ``method``:
    a server that answers that call its own way (a hostile or a busy one)."""

    def register(server: Server) -> None:
        handler.register_server_handlers(server)
        server.register_rpc(function, method)

    return register


def record_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The RPC methods every connection calls from now on, in order."""
    methods: list[str] = []
    original = Connection.call

    async def recording(
        self: Connection, method: str, args: dict[str, object], timeout: float | None
    ) -> object:
        methods.append(method)
        return await original(self, method, args, timeout)

    monkeypatch.setattr(Connection, "call", recording)
    return methods


@contextlib.asynccontextmanager
async def asyncio_file_server(storage: Path) -> AsyncIterator[tuple[FileTransferHandler, Client]]:
    """Under ``asyncio.run``, as the guide's users run one: a server whose
    transfer handler stores in ``storage``, and a client connected to it; the
    client disconnected and the server closed on the way out."""
    server = Server(ServerDescriptor(host="127.0.0.1", port=0, password="pw"))
    transfer = FileTransferHandler(storage_dir=storage)
    transfer.register_server_handlers(server)
    task = asyncio.create_task(server.run())
    try:
        await asyncio.wait_for(server.wait_listening(), 10)
        client = Client(ClientDescriptor(server_port=server.port, password="pw"))
        await client.connect()
        try:
            yield transfer, client
        finally:
            await client.disconnect()
    finally:
        await server.close()
        await asyncio.wait_for(task, 10)
