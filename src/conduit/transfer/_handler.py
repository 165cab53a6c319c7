"""``FileTransferHandler``: the File Transfer Guide's API on top of RPC and data streams.

Three flows share one sender and one receiver:

* **upload** (``send_to_server``): the client asks the server to
  ``file_upload_begin`` (which opens a partial file and a stream, and says where
  to resume), streams the file, then asks ``file_upload_finish`` for the verdict;
* **push** (``send_to_client``): the same with the roles swapped, through the
  ``file_push_begin`` / ``file_push_finish`` methods a client registers;
* **download** (``receive_from_server``): the client opens its partial file and
  a stream, and ``file_download`` makes the server stream into it.

What raises and what returns ``{"success": False, ...}``: problems on *this*
side that are known before anything is sent raise (``FileNotFoundError`` for a
missing local file, ``IsADirectoryError``, ``ConnectionClosed`` when not
connected, ``UnsafePathError`` for a local name that cannot be stored). Every
failure of the transfer itself, including anything the peer refuses, a checksum
mismatch and a lost connection, comes back as ``{"success": False, "error":
message, "code": code}``; success is never reported unless the receiver
verified the SHA-256 and published the file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import logging
import math
import os
import secrets
import stat
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import trio

from .._bridge import bridged
from .._callbacks import invoke, trio_callback
from .._connection import Connection
from .._peer import Peer
from .._streams import IncomingStream, OutgoingStream, StreamReset
from ..errors import ConduitError, ConnectionClosed, RPCError, TransferError
from ._engine import hash_prefix, receive_file, send_file
from ._names import safe_relative_name
from ._progress import Direction, ProgressReporter, TransferProgress
from ._storage import PartialFile, StorageRoot
from ._wire import (
    DOWNLOAD,
    FILE_LIST,
    FILE_STAT,
    PUSH_BEGIN,
    PUSH_FINISH,
    PUSH_SMALL,
    UPLOAD_BEGIN,
    UPLOAD_FINISH,
    UPLOAD_SMALL,
    transfer_key,
)

if TYPE_CHECKING:
    from ..client import Client
    from ..server import Server

log = logging.getLogger("conduit.transfer")

F = TypeVar("F", bound=Callable[..., Any])
ProgressCallback = Callable[[TransferProgress], Any]

DEFAULT_CHUNK_SIZE = 64 * 1024
_CLEANUP_INTERVAL = 600.0
# Transfer control calls wait as long as the work takes (re-hashing a large
# partial, fsync of a large file); a dead peer is caught by the heartbeat.
_NO_TIMEOUT = math.inf
# Files up to this size (and the chunk size) go in one call instead of a stream.
_SMALL_FILE = 256 * 1024


@attrs.define
class _Inbound:
    """One file being received: its verdict, once known."""

    stream: IncomingStream
    key: str
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    done: trio.Event = attrs.field(factory=trio.Event)
    result: dict[str, Any] | None = None
    error: RPCError | None = None


def _rpc_error(exc: BaseException) -> RPCError:
    """Turn a local failure into the error the peer should see."""
    if isinstance(exc, RPCError):
        return exc
    if isinstance(exc, TransferError):
        return RPCError(exc.message, exc.code)
    if isinstance(exc, ConnectionClosed):
        return RPCError(exc.reason, "connection_closed")
    if isinstance(exc, FileNotFoundError):
        return RPCError(f"no such file: {exc.filename or exc}", "not_found")
    if isinstance(exc, IsADirectoryError):
        return RPCError(f"is a directory: {exc.filename or exc}", "not_a_file")
    if isinstance(exc, PermissionError):
        return RPCError(f"permission denied: {exc.filename or exc}", "permission_denied")
    if isinstance(exc, OSError):
        return RPCError(f"I/O error: {exc.strerror or exc}", "io_error")
    return RPCError(f"{type(exc).__name__}: {exc}", "transfer_failed")


def _failure(exc: BaseException) -> dict[str, Any]:
    error = _rpc_error(exc)
    return {"success": False, "error": error.message, "code": error.code}


class FileTransferHandler:
    """Chunked, verified, resumable file transfer in both directions.

    ::

        transfer = FileTransferHandler(storage_dir="./uploads", chunk_size=64 * 1024)
        transfer.register_server_handlers(server)

        @transfer.on_file_received
        async def on_file(client, filepath, metadata): ...

    ``storage_dir`` is where received files go (and, on a server, what clients
    may list and download); it is created on first use, not here. Files arrive
    into a hidden partial file, are checked against the sender's SHA-256,
    fsynced, then published under their name without ever overwriting an
    existing file: a clash becomes ``name (1).ext`` unless ``overwrite=True``.
    A partial file left by a dropped connection is kept for ``partial_ttl``
    seconds, and sending the same file again resumes from it.
    """

    def __init__(
        self,
        storage_dir: str | os.PathLike[str] = "./transfers",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        *,
        max_file_size: int | None = None,
        overwrite: bool = False,
        partial_ttl: float = 24 * 3600.0,
        max_listed: int = 10_000,
    ) -> None:
        if not 1024 <= chunk_size <= 1024 * 1024:
            raise ValueError(f"chunk_size must be between 1 KiB and 1 MiB, got {chunk_size}")
        if max_file_size is not None and max_file_size < 0:
            raise ValueError("max_file_size must be positive or None")
        self.storage = StorageRoot(storage_dir)
        self.chunk_size = chunk_size
        self.max_file_size = max_file_size
        self.overwrite = overwrite
        self.partial_ttl = partial_ttl
        self.max_listed = max_listed
        self._callbacks: list[Callable[..., Any]] = []
        self._inbound: weakref.WeakKeyDictionary[Connection, dict[int, _Inbound]] = (
            weakref.WeakKeyDictionary()
        )
        self._last_cleanup = float("-inf")
        self.max_transfers_per_connection = 128
        self._active: weakref.WeakKeyDictionary[Connection, int] = weakref.WeakKeyDictionary()

    def _claim(self, connection: Connection) -> None:
        count = self._active.get(connection, 0)
        if count >= self.max_transfers_per_connection:
            raise RPCError(
                f"too many transfers on this connection "
                f"(limit {self.max_transfers_per_connection})",
                "overloaded",
            )
        self._active[connection] = count + 1

    def _release(self, connection: Connection) -> None:
        self._active[connection] = self._active.get(connection, 1) - 1

    @property
    def storage_dir(self) -> Path:
        """The storage directory, absolute."""
        return self.storage.path

    def on_file_received(self, function: F) -> F:
        """Register a callback for every file this side receives and publishes.

        On a server it is called as ``callback(client, filepath, metadata)``; on
        a client (pushed or downloaded files) as ``callback(filepath, metadata)``.
        ``metadata`` holds ``filename`` (the published relative name),
        ``original_name``, ``size``, ``checksum`` (SHA-256 hex), ``path``,
        ``resumed_from`` and ``elapsed``.
        """
        self._callbacks.append(function)
        return function

    # ------------------------------------------------------------------ registration

    def register_server_handlers(self, server: Server) -> None:
        """Register the transfer RPC methods (uploads, downloads, ``file_list``) on a server."""
        server.register_rpc(self._rpc_file_list, FILE_LIST)
        server.register_rpc(self._rpc_file_stat, FILE_STAT)
        server.register_rpc(self._rpc_upload_begin, UPLOAD_BEGIN)
        server.register_rpc(self._rpc_receive_small, UPLOAD_SMALL)
        server.register_rpc(self._rpc_receive_finish, UPLOAD_FINISH)
        server.register_rpc(self._rpc_download, DOWNLOAD)

    def register_client_handlers(self, client: Client) -> None:
        """Let the server push files to this client, into ``storage_dir``."""
        client.register_rpc(self._rpc_push_begin, PUSH_BEGIN)
        client.register_rpc(self._rpc_receive_small, PUSH_SMALL)
        client.register_rpc(self._rpc_receive_finish, PUSH_FINISH)

    # ------------------------------------------------------------------ public operations

    @bridged
    async def send_to_server(
        self,
        client: Client,
        path: str | os.PathLike[str],
        on_progress: ProgressCallback | None = None,
        *,
        remote_name: str | None = None,
    ) -> dict[str, Any]:
        """Upload ``path``; return ``{"success": True, "path": name_on_server, ...}``.

        ``remote_name`` (default: the file's base name) may contain
        subdirectories, e.g. ``"reports/2024/q1.pdf"``.
        """
        return await self._send(
            client.server, path, remote_name, on_progress, UPLOAD_BEGIN, UPLOAD_FINISH, "upload"
        )

    @bridged
    async def send_to_client(
        self,
        server: Server,
        client_id: str,
        path: str | os.PathLike[str],
        on_progress: ProgressCallback | None = None,
        *,
        remote_name: str | None = None,
    ) -> dict[str, Any]:
        """Push ``path`` to the client ``client_id`` (which called ``register_client_handlers``)."""
        peer = server.clients.get(client_id)
        if peer is None:
            raise ConnectionClosed(f"no connected client with id {client_id!r}")
        return await self._send(
            peer, path, remote_name, on_progress, PUSH_BEGIN, PUSH_FINISH, "push"
        )

    @bridged
    async def receive_from_server(
        self,
        client: Client,
        name: str,
        local_dir: str | os.PathLike[str] = "./downloads",
        on_progress: ProgressCallback | None = None,
    ) -> dict[str, Any]:
        """Download the server's file ``name`` into ``local_dir``.

        Returns ``{"success": True, "path": local_path, "filename": ..., "size":
        ..., "checksum": ...}``. An interrupted download leaves a hidden partial
        file in ``local_dir``; calling again resumes it.
        """
        peer = client.server
        local = StorageRoot(local_dir)
        safe = safe_relative_name(name)
        try:
            stat = await peer.call(FILE_STAT, name=safe)
        except (RPCError, ConnectionClosed) as exc:
            return _failure(exc)
        size, mtime_ns = int(stat["size"]), int(stat["modified_ns"])
        key = transfer_key(safe, size, mtime_ns)
        connection = peer.connection
        try:
            await trio.to_thread.run_sync(local.check_can_accept, size, None)
            partial = await trio.to_thread.run_sync(
                lambda: local.open_partial(safe, key, resume=True)
            )
        except TransferError as exc:
            return _failure(exc)
        stream: IncomingStream | None = None
        try:
            stream = connection.open_incoming_stream()
            answer = await peer.call(
                DOWNLOAD,
                name=safe,
                stream_id=stream.stream_id,
                size=size,
                offset=partial.offset,
                prefix_sha256=partial.sha256_hex(),
            )
            start = int(answer["offset"])
            if start != partial.offset:
                # The server did not recognise our prefix: start over.
                await trio.to_thread.run_sync(partial.close)
                partial = await trio.to_thread.run_sync(
                    lambda: local.open_partial(safe, key, resume=False)
                )
            result = await self._receive_into(
                connection, stream, partial, safe, size, on_progress, "download", peer=None
            )
        except (ConduitError, OSError) as exc:
            if stream is not None:
                connection.close_stream(stream, reset=("aborted", "download aborted"))
            await trio.to_thread.run_sync(partial.close)
            return _failure(exc)
        except BaseException:
            if stream is not None:
                connection.close_stream(stream, reset=("cancelled", "download cancelled"))
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(partial.close)
            raise
        return result

    @bridged
    async def list_files(self, client: Client) -> list[dict[str, Any]]:
        """The server's files as ``[{"name", "size", "modified"}, ...]`` (raises on failure)."""
        answer = await client.call(FILE_LIST)
        return list(answer["files"])

    # ------------------------------------------------------------------ sending

    async def _send(
        self,
        peer: Peer,
        path: str | os.PathLike[str],
        remote_name: str | None,
        on_progress: ProgressCallback | None,
        begin_method: str,
        finish_method: str,
        direction: Direction,
    ) -> dict[str, Any]:
        file = await trio.to_thread.run_sync(_open_local, Path(path))
        try:
            info = os.fstat(file.fileno())
            size = info.st_size
            name = safe_relative_name(Path(path).name if remote_name is None else remote_name)
            if size <= min(self.chunk_size, _SMALL_FILE):
                small_method = UPLOAD_SMALL if direction == "upload" else PUSH_SMALL
                return await self._send_small(
                    peer, file, name, size, on_progress, small_method, direction
                )
            key = transfer_key(name, size, info.st_mtime_ns)
            try:
                # No timeout: re-hashing a large partial may take a while;
                # the heartbeat notices a dead peer.
                begin = await peer.call(
                    begin_method, name=name, size=size, key=key, timeout=_NO_TIMEOUT
                )
                start, stream_id = int(begin["offset"]), int(begin["stream_id"])
                hasher = await self._resume_hasher(file, start, str(begin["prefix_sha256"]))
                if hasher is None:  # our prefix differs from theirs: restart from zero
                    await peer.call(finish_method, stream_id=stream_id, abandon=True)
                    begin = await peer.call(
                        begin_method, name=name, size=size, key=key, restart=True
                    )
                    start, stream_id = 0, int(begin["stream_id"])
                    hasher = hashlib.sha256()
                    await trio.to_thread.run_sync(file.seek, 0)
                reporter = ProgressReporter(
                    on_progress,
                    filename=name,
                    direction=direction,
                    total_size=size,
                    resumed_from=start,
                )
                # If the receiver stops us (StreamReset), its verdict below says why.
                with contextlib.suppress(StreamReset):
                    await self._stream_out(
                        peer.connection, stream_id, file, start, size, hasher, reporter
                    )
                result: dict[str, Any] = await peer.call(
                    finish_method, stream_id=stream_id, timeout=_NO_TIMEOUT
                )
            except (ConduitError, OSError) as exc:
                return _failure(exc)
            final = await reporter.finish()
            result.update(
                success=True, resumed_from=start, elapsed=final.elapsed, speed=final.speed
            )
            return result
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(file.close)

    async def _send_small(
        self,
        peer: Peer,
        file: io.FileIO,
        name: str,
        size: int,
        on_progress: ProgressCallback | None,
        method: str,
        direction: Direction,
    ) -> dict[str, Any]:
        """Files up to one chunk travel inside a single call: one round trip, no stream."""
        data = await trio.to_thread.run_sync(file.read, size + 1)
        if len(data) != size:
            return _failure(TransferError("the file changed while being read", "source_changed"))
        reporter = ProgressReporter(
            on_progress, filename=name, direction=direction, total_size=size
        )
        try:
            result: dict[str, Any] = await peer.call(
                method,
                name=name,
                data=data,
                sha256=hashlib.sha256(data).hexdigest(),
                timeout=_NO_TIMEOUT,
            )
        except (ConduitError, OSError) as exc:
            return _failure(exc)
        await reporter.advance(size)
        final = await reporter.finish()
        result.update(success=True, resumed_from=0, elapsed=final.elapsed, speed=final.speed)
        return result

    async def _resume_hasher(self, file: io.FileIO, start: int, their_prefix: str) -> Any | None:
        if start == 0:
            return hashlib.sha256()
        try:
            hasher = await hash_prefix(file, start)
        except TransferError:
            return None
        return hasher if hasher.hexdigest() == their_prefix else None

    async def _stream_out(
        self,
        connection: Connection,
        stream_id: int,
        file: io.FileIO,
        start: int,
        size: int,
        hasher: Any,
        reporter: ProgressReporter,
    ) -> None:
        stream: OutgoingStream = connection.open_outgoing_stream(stream_id)
        try:
            await send_file(
                stream,
                file,
                start=start,
                size=size,
                hasher=hasher,
                chunk_size=self.chunk_size,
                reporter=reporter,
            )
        except BaseException as exc:
            reason = exc.message if isinstance(exc, TransferError) else "the sender gave up"
            connection.close_stream(stream, reset=("aborted", reason))
            raise
        connection.close_stream(stream)

    # ------------------------------------------------------------------ receiving

    async def _begin_receive(
        self, peer: Peer, name: str, size: int, key: str, restart: bool
    ) -> dict[str, Any]:
        connection = peer.connection
        inbound_here = self._inbound.setdefault(connection, {})
        # A retry of the same file on this connection replaces an attempt the
        # sender gave up on (its begin timed out or was cancelled after we had
        # opened the partial), which would otherwise hold the partial's lock.
        for stale in [entry for entry in inbound_here.values() if entry.key == key]:
            stale.scope.cancel()
            await stale.done.wait()
        self._claim(connection)
        try:
            safe = safe_relative_name(name)
            await self._maybe_cleanup()
            await trio.to_thread.run_sync(
                lambda: self.storage.check_can_accept(size, self.max_file_size)
            )
            partial = await trio.to_thread.run_sync(
                lambda: self.storage.open_partial(safe, key, resume=not restart)
            )
            if partial.offset > size:
                await trio.to_thread.run_sync(partial.close)
                partial = await trio.to_thread.run_sync(
                    lambda: self.storage.open_partial(safe, key, resume=False)
                )
        except BaseException as exc:
            self._release(connection)
            if isinstance(exc, Exception):
                raise _rpc_error(exc) from None
            raise
        try:
            # Cancelled while the (uncancellable) thread opened the file: the
            # caller is gone, so do not keep the partial locked for nobody.
            await trio.lowlevel.checkpoint()
        except BaseException:
            self._release(connection)
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(partial.close)
            raise
        stream = connection.open_incoming_stream()
        inbound = _Inbound(stream, key)
        inbound_here[stream.stream_id] = inbound
        connection.spawn(self._receive_task, connection, peer, partial, safe, size, inbound)
        return {
            "stream_id": stream.stream_id,
            "offset": partial.offset,
            "prefix_sha256": partial.sha256_hex(),
        }

    async def _receive_task(
        self,
        connection: Connection,
        peer: Peer,
        partial: PartialFile,
        name: str,
        size: int,
        inbound: _Inbound,
    ) -> None:
        try:
            with inbound.scope:
                inbound.result = await self._receive_into(
                    connection, inbound.stream, partial, name, size, None, "receive", peer=peer
                )
            if inbound.scope.cancelled_caught:
                inbound.error = RPCError("replaced by a newer attempt", "superseded")
        except Exception as exc:
            inbound.error = _rpc_error(exc)
            log.warning("receiving %r failed: %s", name, inbound.error)
        finally:
            self._release(connection)
            inbound.done.set()

    async def _receive_into(
        self,
        connection: Connection,
        stream: IncomingStream,
        partial: PartialFile,
        name: str,
        size: int,
        on_progress: ProgressCallback | None,
        direction: Direction,
        *,
        peer: Peer | None,
    ) -> dict[str, Any]:
        """Receive, verify, publish, notify. Keeps the partial file for a resume
        when the connection drops; removes it when the data is wrong."""
        resumed_from = partial.offset
        reporter = ProgressReporter(
            on_progress,
            filename=name,
            direction=direction,
            total_size=size,
            resumed_from=resumed_from,
        )
        try:
            trailer = await receive_file(stream, partial, size=size, reporter=reporter)
            if trailer.size != size or partial.offset != size:
                raise TransferError(
                    f"size mismatch: announced {size}, trailer says {trailer.size}, "
                    f"received {partial.offset}",
                    "size_mismatch",
                )
            published = await trio.to_thread.run_sync(
                lambda: partial.publish(overwrite=self.overwrite, expected_sha256=trailer.checksum)
            )
        except (ConnectionClosed, StreamReset, trio.Cancelled):
            # The link or the sender went away, but the bytes we have are good:
            # keep the partial file so that sending again resumes.
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(partial.close)
            raise
        except BaseException as exc:
            # The data itself is wrong or cannot be stored: remove it, and stop
            # the sender if it is still sending.
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(partial.discard)
            if not stream.finished:
                code = exc.code if isinstance(exc, TransferError) else "receiver_error"
                connection.close_stream(stream, reset=(code, str(exc)))
            raise
        finally:
            connection.close_stream(stream)
        final = await reporter.finish()
        result = await self._announce(
            connection,
            peer,
            partial.root,
            published,
            name,
            size,
            trailer.checksum,
            resumed_from=resumed_from,
            elapsed=final.elapsed,
        )
        local_path = result.pop("local_path")  # never sent to the peer
        result["path"] = published if direction != "download" else local_path
        if direction == "download":
            result.update(resumed_from=resumed_from, elapsed=final.elapsed, speed=final.speed)
        return result

    async def _announce(
        self,
        connection: Connection,
        peer: Peer | None,
        root: StorageRoot,
        published: str,
        name: str,
        size: int,
        checksum: str,
        *,
        resumed_from: int,
        elapsed: float,
    ) -> dict[str, Any]:
        """A file was verified and published: tell the callbacks, build the result."""
        local_path = str(root.path / published)
        metadata = {
            "filename": published,
            "original_name": name,
            "size": size,
            "checksum": checksum,
            "path": local_path,
            "resumed_from": resumed_from,
            "elapsed": elapsed,
        }
        if peer is not None:
            metadata["client_id"] = peer.id
        log.info("received %r (%d bytes, sha256 %s)", published, size, checksum)
        for callback in self._callbacks:
            try:
                if peer is not None and not connection.is_client:
                    await invoke(callback, peer, local_path, dict(metadata))
                else:
                    await invoke(callback, local_path, dict(metadata))
            except Exception:
                log.exception("on_file_received callback %r failed", callback)
        return {
            "success": True,
            "path": published,
            "local_path": local_path,
            "filename": published,
            "size": size,
            "checksum": checksum,
        }

    async def _receive_small(
        self, peer: Peer, name: str, data: bytes, sha256: str
    ) -> dict[str, Any]:
        """A whole small file in one call: check, write, verify, fsync, publish in one
        worker-thread hop. Nothing to resume, so the partial gets a one-off id."""
        started = time.monotonic()
        try:
            safe = safe_relative_name(name)
            published = await trio.to_thread.run_sync(self._store_small, safe, data, sha256)
        except Exception as exc:
            raise _rpc_error(exc) from None
        result = await self._announce(
            peer.connection,
            peer,
            self.storage,
            published,
            safe,
            len(data),
            sha256,
            resumed_from=0,
            elapsed=time.monotonic() - started,
        )
        result.pop("local_path")
        return result

    def _store_small(self, name: str, data: bytes, sha256: str) -> str:
        self.storage.check_can_accept(len(data), self.max_file_size)
        partial = self.storage.open_partial(name, secrets.token_hex(16), resume=False)
        try:
            partial.write_block(data)
            return partial.publish(overwrite=self.overwrite, expected_sha256=sha256)
        except BaseException:
            partial.discard()
            raise

    async def _maybe_cleanup(self) -> None:
        now = time.monotonic()
        if now - self._last_cleanup >= _CLEANUP_INTERVAL:
            self._last_cleanup = now
            removed = await trio.to_thread.run_sync(
                lambda: self.storage.cleanup_stale_partials(self.partial_ttl)
            )
            if removed:
                log.info("removed %d stale partial files", removed)

    # ------------------------------------------------------------------ RPC methods
    # Library code written for Trio: marked so that they run in Trio even when
    # the application lives in asyncio (where plain coroutines run on asyncio).

    @trio_callback
    async def _rpc_receive_small(
        self, caller: Peer, name: str, data: bytes, sha256: str
    ) -> dict[str, Any]:
        return await self._receive_small(caller, name, data, sha256)

    @trio_callback
    async def _rpc_upload_begin(
        self, caller: Peer, name: str, size: int, key: str, restart: bool = False
    ) -> dict[str, Any]:
        return await self._begin_receive(caller, name, size, key, restart)

    @trio_callback
    async def _rpc_push_begin(
        self, caller: Peer, name: str, size: int, key: str, restart: bool = False
    ) -> dict[str, Any]:
        return await self._begin_receive(caller, name, size, key, restart)

    @trio_callback
    async def _rpc_receive_finish(
        self, caller: Peer, stream_id: int, abandon: bool = False
    ) -> dict[str, Any]:
        streams = self._inbound.get(caller.connection, {})
        inbound = streams.get(stream_id)
        if inbound is None:
            raise RPCError(f"no transfer on stream {stream_id}", "not_found")
        if abandon:
            # The sender will restart from zero: stop receiving; its new begin
            # (restart=True) truncates the partial.
            inbound.stream.fail(StreamReset("the sender restarts the transfer", "restart"))
            await inbound.done.wait()
            streams.pop(stream_id, None)
            return {"abandoned": True}
        await inbound.done.wait()
        streams.pop(stream_id, None)
        if inbound.error is not None:
            raise inbound.error
        assert inbound.result is not None
        return inbound.result

    @trio_callback
    async def _rpc_file_list(self) -> dict[str, Any]:
        entries = await trio.to_thread.run_sync(
            lambda: self.storage.list_files(max_entries=self.max_listed)
        )
        return {
            "files": [{"name": e.name, "size": e.size, "modified": e.modified} for e in entries]
        }

    @trio_callback
    async def _rpc_file_stat(self, name: str) -> dict[str, Any]:
        try:
            file, size = await trio.to_thread.run_sync(self.storage.open_for_read, name)
        except Exception as exc:
            raise _rpc_error(exc) from None
        with file:
            info = os.fstat(file.fileno())
        return {"name": safe_relative_name(name), "size": size, "modified_ns": info.st_mtime_ns}

    @trio_callback
    async def _rpc_download(
        self, caller: Peer, name: str, stream_id: int, size: int, offset: int, prefix_sha256: str
    ) -> dict[str, Any]:
        if not 0 < stream_id < 2**32:
            raise RPCError(f"invalid stream id {stream_id}", "invalid_arguments")
        self._claim(caller.connection)
        try:
            file, actual_size = await trio.to_thread.run_sync(self.storage.open_for_read, name)
        except BaseException as exc:
            self._release(caller.connection)
            if isinstance(exc, Exception):
                raise _rpc_error(exc) from None
            raise
        try:
            if actual_size != size:
                raise RPCError(f"{name!r} changed on the server; ask again", "source_changed")
            start = offset if 0 <= offset <= size else 0
            hasher = await self._resume_hasher(file, start, prefix_sha256)
            if hasher is None:
                start, hasher = 0, hashlib.sha256()
                await trio.to_thread.run_sync(file.seek, 0)
            reporter = ProgressReporter(
                None, filename=name, direction="download", total_size=size, resumed_from=start
            )
            caller.connection.spawn(
                self._serve_download,
                caller.connection,
                stream_id,
                file,
                start,
                size,
                hasher,
                reporter,
            )
        except BaseException:
            self._release(caller.connection)
            await trio.to_thread.run_sync(file.close)
            raise
        return {"offset": start, "size": size}

    async def _serve_download(
        self,
        connection: Connection,
        stream_id: int,
        file: io.FileIO,
        start: int,
        size: int,
        hasher: Any,
        reporter: ProgressReporter,
    ) -> None:
        try:
            await self._stream_out(connection, stream_id, file, start, size, hasher, reporter)
        except (ConduitError, OSError) as exc:
            log.warning("download of %r stopped: %s", reporter.snapshot().filename, exc)
        finally:
            self._release(connection)
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(file.close)


def _open_local(path: Path) -> io.FileIO:
    """Open a local file to send; raise the usual OSError subclasses before anything is sent."""
    info = os.stat(path)  # FileNotFoundError, PermissionError as usual
    if not stat.S_ISREG(info.st_mode):
        # Checked before opening: opening a FIFO for reading would block.
        raise IsADirectoryError(errno.EISDIR, "not a regular file", str(path))
    return io.FileIO(path, "r")


__all__ = ["FileTransferHandler"]
