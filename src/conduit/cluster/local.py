"""The local directory store behind the :class:`~conduit.cluster.store.Store` protocol.

A thin async adapter over ``transfer._storage.StorageRoot`` (which keeps all
its guarantees: openat-style resolution, no symlink ever followed, ``flock``
on partials, publish by ``link`` without overwriting). Each call runs in a
worker thread, as the transfer handler runs them today.

It shows the protocol fits the existing store and lets one contract test
suite run against both stores. The transfer handler does not use it: its
local backend (``transfer/_backend_local.py``) calls ``StorageRoot``
directly, one worker-thread hop per operation as before, with the disk budget
and the hash gate around it. ``delete`` and ``rename`` here use StorageRoot's
internal directory walk (with the collision policy of publishing).
"""

from __future__ import annotations

import functools
import io
import os
import secrets
from collections.abc import Callable
from typing import Any, TypeVar

from .. import _threads
from ..transfer._names import safe_relative_name, split_name
from ..transfer._storage import (
    PartialFile,
    StorageRoot,
    _closing,
    _lstat,
    _place,
    _refuse_special,
    _remove_regular,
)
from .store import StoredFile

__all__ = ["LocalPartial", "LocalReader", "LocalStore"]

T = TypeVar("T")


async def _run(function: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    return await _threads.run_sync(functools.partial(function, *args, **kwargs))


class LocalStore:
    """:class:`~conduit.cluster.store.Store` on a local directory (a ``StorageRoot``)."""

    def __init__(self, root: StorageRoot | str | os.PathLike[str]) -> None:
        """Wrap ``root`` (a StorageRoot or a directory path); touches nothing on disk."""
        self.root = root if isinstance(root, StorageRoot) else StorageRoot(root)

    def location_of(self, name: str) -> str:
        """The absolute path ``name`` has (or would have) under the root."""
        return str(self.root.path / safe_relative_name(name))

    async def open_partial(
        self, name: str, transfer_id: str, *, resume: bool, overwrite: bool = False
    ) -> LocalPartial:
        """See :meth:`conduit.cluster.store.Store.open_partial`."""
        partial = await _run(self.root.open_partial, name, transfer_id, resume=resume)
        return LocalPartial(partial, overwrite)

    async def put_file(
        self, name: str, data: bytes, *, sha256: str, overwrite: bool = False
    ) -> str:
        """See :meth:`conduit.cluster.store.Store.put_file` (a one-off partial, one hop)."""
        return await _run(self._put_file, name, data, sha256, overwrite)

    def _put_file(self, name: str, data: bytes, sha256: str, overwrite: bool) -> str:
        partial = self.root.open_partial(name, secrets.token_hex(16), resume=False)
        try:
            partial.write_block(data)
            return partial.publish(overwrite=overwrite, expected_sha256=sha256)
        except BaseException:
            partial.discard()
            raise

    async def find_partial(self, name: str, transfer_id: str) -> int | None:
        """See :meth:`conduit.cluster.store.Store.find_partial`."""
        return await _run(self.root.find_partial, name, transfer_id)

    async def discard_partial(self, name: str, transfer_id: str) -> bool:
        """See :meth:`conduit.cluster.store.Store.discard_partial`."""
        return await _run(self.root.discard_partial, name, transfer_id)

    async def check_can_accept(
        self, size: int, max_file_size: int | None = None, *, offset: int = 0
    ) -> None:
        """See :meth:`conduit.cluster.store.Store.check_can_accept` (free disk space counts)."""
        await _run(self.root.check_can_accept, size, max_file_size, offset=offset)

    async def list_files(
        self, *, max_entries: int = 100_000, prefix: str | None = None, after: str | None = None
    ) -> list[StoredFile]:
        """See :meth:`conduit.cluster.store.Store.list_files`."""
        entries = await _run(
            self.root.list_files, max_entries=max_entries, prefix=prefix, after=after
        )
        return [StoredFile(e.name, e.size, int(e.modified * 1e9)) for e in entries]

    async def used_bytes(self) -> int:
        """See :meth:`conduit.cluster.store.Store.used_bytes` (files and directories)."""
        return await _run(self.root.stored_bytes)

    async def stat(self, name: str) -> StoredFile:
        """See :meth:`conduit.cluster.store.Store.stat`."""
        reader = await self.open_reader(name)
        await reader.aclose()
        return reader.stored

    async def open_reader(self, name: str, *, start: int = 0) -> LocalReader:
        """See :meth:`conduit.cluster.store.Store.open_reader`."""
        safe = safe_relative_name(name)
        file, size = await _run(self.root.open_for_read, safe)
        try:
            if not 0 <= start <= size:
                raise ValueError(f"start {start} is outside the file ({size} bytes)")
            file.seek(start)
            stored = StoredFile(safe, size, os.fstat(file.fileno()).st_mtime_ns)
        except BaseException:
            file.close()
            raise
        return LocalReader(file, stored)

    async def delete(self, name: str) -> bool:
        """See :meth:`conduit.cluster.store.Store.delete` (regular files only)."""
        return await _run(self._delete, safe_relative_name(name))

    def _delete(self, safe: str) -> bool:
        directories, basename = split_name(safe)
        try:
            dir_fd = self.root._open_directory(directories, safe, create=False)
        except FileNotFoundError:
            return False
        with _closing(dir_fd):
            info = _lstat(dir_fd, basename)
            if info is not None:
                _refuse_special(info, safe)
            return _remove_regular(dir_fd, basename)

    async def rename(self, name: str, new_name: str, *, overwrite: bool = False) -> str:
        """See :meth:`conduit.cluster.store.Store.rename` (link, never overwriting by default)."""
        source, target = safe_relative_name(name), safe_relative_name(new_name)
        return await _run(self._rename, source, target, overwrite)

    def _rename(self, source: str, target: str, overwrite: bool) -> str:
        src_dirs, src_base = split_name(source)
        dest_dirs, dest_base = split_name(target)
        src_fd = self.root._open_directory(src_dirs, source, create=False)
        with _closing(src_fd):
            info = _lstat(src_fd, src_base)
            if info is None:
                raise FileNotFoundError(2, "no such file in storage", source)
            _refuse_special(info, source)
            dest_fd = self.root._open_directory(dest_dirs, target, create=True)
            with _closing(dest_fd):
                same = os.path.samestat(os.fstat(src_fd), os.fstat(dest_fd))
                if same and src_base == dest_base:
                    return source
                placed = _place(src_fd, src_base, dest_fd, dest_base, overwrite)
                os.fsync(dest_fd)
        return "/".join((*dest_dirs, placed))

    async def cleanup_stale_partials(self, max_age_seconds: float) -> int:
        """See :meth:`conduit.cluster.store.Store.cleanup_stale_partials`."""
        return await _run(self.root.cleanup_stale_partials, max_age_seconds)


class LocalPartial:
    """:class:`~conduit.cluster.store.PartialUpload` over a ``PartialFile``."""

    def __init__(self, partial: PartialFile, overwrite: bool) -> None:
        """Use :meth:`LocalStore.open_partial`."""
        self._partial = partial
        self._overwrite = overwrite

    @property
    def name(self) -> str:
        """The name it was opened for."""
        return self._partial.name

    @property
    def transfer_id(self) -> str:
        """Its transfer id."""
        return self._partial.transfer_id

    @property
    def offset(self) -> int:
        """Bytes written."""
        return self._partial.offset

    def sha256_hex(self) -> str:
        """Hex SHA-256 of the bytes written."""
        return self._partial.sha256_hex()

    async def append(self, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at the offset (in a worker thread)."""
        await _run(self._partial.write_block, data)

    async def publish(self, *, expected_sha256: str | None = None) -> str:
        """Verify, fsync, link under the name (or ``name (n).ext``); return the name."""
        return await _run(
            self._partial.publish, overwrite=self._overwrite, expected_sha256=expected_sha256
        )

    async def close(self) -> None:
        """Close, keeping the partial file for a resume."""
        await _run(self._partial.close)

    async def discard(self) -> None:
        """Delete the partial file."""
        await _run(self._partial.discard)


class LocalReader:
    """:class:`~conduit.cluster.store.FileReader` over an open file."""

    def __init__(self, file: io.FileIO, stored: StoredFile) -> None:
        """Use :meth:`LocalStore.open_reader`."""
        self._file = file
        self.stored = stored

    @property
    def size(self) -> int:
        """Size of the whole file."""
        return self.stored.size

    @property
    def modified_ns(self) -> int:
        """Modification time of the file opened."""
        return self.stored.modified_ns

    @property
    def version(self) -> str:
        """``""``: a local file has no version tag."""
        return self.stored.version

    async def read(self, max_bytes: int) -> bytes:
        """The next up to ``max_bytes`` bytes; ``b""`` at the end."""
        if max_bytes <= 0:
            return b""
        data = await _run(self._file.read, max_bytes)
        return data or b""

    async def aclose(self) -> None:
        """Close the file."""
        self._file.close()
