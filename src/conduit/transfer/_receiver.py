"""The receiving side of every transfer: begin, receive, verify, publish, tell.

* :meth:`Receiver.rpc_begin` -- ``file_upload_begin`` on a server and
  ``file_push_begin`` on a client (one method, registered under both names):
  open the hidden partial file (resuming when a retry finds one), open a
  stream, record it in the inbound registry and spawn the task that receives
  into it. :meth:`Receiver.rpc_finish` hands the sender that task's verdict.
  The registry of a connection is owned by the connection
  (``Connection.owned``), so it goes when the connection ends, however it ends;
  verdicts nobody asks for are kept for at most :data:`UNCLAIMED_TTL` seconds,
  :data:`MAX_UNCLAIMED` per connection (or one per transfer slot, if more).
* :meth:`Receiver.rpc_receive_small` -- a whole small file in one call.
* :meth:`Receiver.download` -- ``receive_from_server``: the client's side of a
  download, the same receive path with the roles of who opens what swapped.

Every file lands in a partial (a hidden partial file, or a multipart upload
in an object store), is checked against the sender's SHA-256, made durable,
then published without ever overwriting (see :mod:`._storage` and
:mod:`._backend`); only then do ``on_file_received`` callbacks run. Where the
server side stores is the handler's backend (:mod:`._backend`); the client
side of a download always writes to a local directory.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import attrs
import trio

from .. import _threads
from .._callbacks import trio_callback
from .._connection import Connection
from .._log_limit import LimitedLog
from .._peer import Peer
from .._stored_errors import detached
from .._streams import IncomingStream
from ..errors import (
    ConduitError,
    ConnectionClosed,
    RPCError,
    StreamReset,
    TransferError,
    UnsafePathError,
)
from ._answers import BatchFile, download_offset, stat_answer
from ._backend import Admitted, LocalSink, Sink
from ._batch_store import DirectoryAdmitter, Entry, parse_batch, store_batch
from ._engine import receive_file
from ._hooks import Hooks, TransferSettings, notify
from ._names import safe_relative_name, split_name
from ._progress import Direction, ProgressReporter, TransferProgress
from ._ranges import range_name, resolve_range
from ._rerun import find_already_there, kept_download_result, same_size_exists, says_skipped
from ._sender import NO_TIMEOUT
from ._slots import TransferSlots
from ._space import check_writable, partial_owner
from ._stoppable import run_stoppable
from ._storage import PartialFile, StorageRoot
from ._wire import (
    DOWNLOAD,
    FILE_STAT,
    as_rpc_error,
    download_transfer_id,
    transfer_failure,
    transfer_key,
)

log = logging.getLogger("conduit.transfer")

ProgressCallback = Callable[[TransferProgress], Any]

#: Finished transfers whose verdict a connection has not asked for
#: (``*_finish``), kept at most (or one per transfer slot of the
#: connection, when it has more: a sender whose ``*_finish`` was refused
#: by the call limit asks again, see ``_sender._ask_verdict``); the oldest
#: go first.
MAX_UNCLAIMED = 16
#: Seconds (of Trio's clock) a verdict waits for its ``*_finish`` call.
UNCLAIMED_TTL = 60.0
#: Seconds the callbacks of a download batch's stored files may still take,
#: in all, once the caller has stopped (cancelled, or its on_progress raised).
ANNOUNCE_GRACE = 1.0


@attrs.define
class _Inbound:
    """One file being received: its verdict, once known."""

    stream: IncomingStream
    key: str
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    done: trio.Event = attrs.field(factory=trio.Event)
    result: dict[str, Any] | None = None
    error: RPCError | None = None
    #: When the receive task ended (Trio's clock); None while it runs.
    finished_at: float | None = None


def _forget_unclaimed(inbound_here: dict[int, _Inbound], now: float, keep: int) -> None:
    """Drop verdicts nobody asked for: too old, or too many (the oldest first).

    A peer that begins transfers and never finishes them (a bad checksum, then
    no ``*_finish``) must not grow this registry for the connection's lifetime.
    """
    finished = sorted(
        (entry.finished_at, stream_id)
        for stream_id, entry in inbound_here.items()
        if entry.finished_at is not None
    )
    excess = len(finished) - keep
    for index, (finished_at, stream_id) in enumerate(finished):
        if index < excess or now - finished_at > UNCLAIMED_TTL:
            del inbound_here[stream_id]


async def _abandon(streams: dict[int, _Inbound], stream_id: int, inbound: _Inbound) -> None:
    """Stop waiting for ``inbound``'s stream (the sender will not send it) and forget it."""
    inbound.stream.fail(StreamReset("the sender abandoned the stream", "restart"))
    await inbound.done.wait()
    streams.pop(stream_id, None)


#: Failures that say nothing against the bytes already stored, so the partial
#: is kept for a resume rather than discarded: "busy" (another writer, the node
#: the sender used before and not done letting go, stored a part under us),
#: a sender that stopped sending ("stalled": see STALL_HEARTBEAT_TIMEOUTS),
#: and an object store's refusal or absence ("storage_error",
#: "storage_unavailable": a 503 SlowDown burst or a connection reset outlasting
#: the client's retries), after which the parts it acknowledged are intact.
_KEPT_ON_FAILURE = frozenset({"busy", "stalled", "storage_error", "storage_unavailable"})
#: A stream that has brought nothing for this many times ``heartbeat_timeout``
#: (90 s at the default) while this side waited for it and read its socket
#: fails ``stalled``, its partial kept: a peer that answers heartbeats but
#: never sends (a client that began an upload, a server that answered a
#: download) held the transfer, its slot, its file and, on a server, the
#: disk space reserved for it, for as long as its connection lived (until
#: 2026-12-07). As long as a sender whose own peer stopped reading waits for
#: its credit (``_CREDIT_PATIENCE`` in the engine).
STALL_HEARTBEAT_TIMEOUTS = 2
#: What a download keeps besides: a full disk ("no_space") says nothing
#: against what reached the file either. A download cut there resumes once
#: room is made, as one refused up front for room does (the server's uploads
#: remove theirs: the room is the server's users', not one peer's).
_DOWNLOAD_KEPT_ON_FAILURE = _KEPT_ON_FAILURE | {"no_space"}


class _DownloadPartial(LocalSink):
    """A download's local partial, and how many directories were made for it.

    A download that fails (or is cancelled) before a byte reached its partial
    removes it, and those directories: a download refused by the server
    (the file deleted since its ``file_stat``, a malformed answer, one of
    many names a hostile server listed and then refused) left an empty
    hidden file and its directories in the user's destination for good
    (a review, 2026-12-07). One that holds bytes stays for a resume.
    """

    def __init__(self, partial: PartialFile, made: int) -> None:
        """Wrap ``partial``, for which the last ``made`` of its directories were made."""
        super().__init__(partial)
        self.made = made

    async def let_go(self) -> None:
        """Keep the partial for a resume if it holds bytes; else remove it, and
        the directories made for it that are empty."""
        if self.offset:
            await self.close()
            return
        await self.discard()
        if self.made:
            partial = self.partial
            directories = split_name(partial.name)[0]
            keep = len(directories) - self.made
            await _threads.run_sync(
                lambda: partial.root.prune_empty_directories(directories, keep=keep)
            )


def _in_destination(
    exc: BaseException, target: str, local_dir: str | os.PathLike[str]
) -> BaseException:
    """``exc``, an OSError of the local destination, as a failure that says so.

    It names ``target`` (not the hidden partial it failed on) and the
    destination, with a code of the destination's: ``permission_denied``,
    ``no_space``, else ``io_error``. Its own class would say ``not_found``
    for a destination gone, which reads as the server's file missing (the
    second review of this change).
    """
    if not isinstance(exc, OSError) or isinstance(exc, ConduitError):
        return exc
    if isinstance(exc, PermissionError) or exc.errno == errno.EROFS:
        code = "permission_denied"
    elif exc.errno in (errno.ENOSPC, errno.EDQUOT):
        code = "no_space"
    else:
        code = "io_error"
    return TransferError(
        f"cannot store {target!r} in {os.fspath(local_dir)!r}: {exc.strerror or exc}", code
    )


class Receiver:
    """Receives the files a peer sends, and the downloads this side asks for."""

    def __init__(self, settings: TransferSettings, hooks: Hooks, slots: TransferSlots) -> None:
        self._settings = settings
        self._hooks = hooks
        self._slots = slots
        # Lines a peer causes at will, under a budget per owner (user, or host).
        self._peer_log = LimitedLog(log)

    def _begins(self, connection: Connection) -> dict[str, list[trio.Event]]:
        """``connection``'s begins still running, by transfer key: each event
        is set once its begin has let go of what it held or handed it to a
        receive task (owned by the connection)."""
        begins: dict[str, list[trio.Event]] | None = connection.owned.get((self, "begins"))
        if begins is None:
            begins = connection.owned[(self, "begins")] = {}
        return begins

    def _inbound(self, connection: Connection) -> dict[int, _Inbound]:
        """``connection``'s transfers being received, by stream id (owned by the connection)."""
        inbound_here: dict[int, _Inbound] | None = connection.owned.get(self)
        if inbound_here is None:
            inbound_here = connection.owned[self] = {}
        return inbound_here

    # ------------------------------------------------------------------ RPC methods
    # Library code written for Trio: marked so that they run in Trio even when
    # the application lives in asyncio (where plain coroutines run on asyncio).

    @trio_callback
    async def rpc_begin(
        self,
        caller: Peer,
        name: str,
        size: int,
        key: str,
        restart: bool = False,
        sha256: str = "",
    ) -> dict[str, Any]:
        """``file_upload_begin`` / ``file_push_begin``: where to resume, and the stream to use.

        Or, for a file this side already has (see :mod:`._rerun`),
        ``{"check_sha256": True}`` (begin again with ``sha256=``) or
        a skipped result, ``{"skipped": True, "reason": "already_there", ...}``
        (nothing to send).
        """
        connection = caller.connection
        inbound_here = self._inbound(connection)
        # A retry of the same file on this connection replaces an attempt the
        # sender gave up on (its begin timed out or was cancelled after we had
        # opened the partial), which would otherwise hold the partial's lock.
        # Waited for before the look for the file below: an attempt given up
        # on while we verified and published it (which nothing stops) has
        # published it once this wait ends, and the retry must find it there,
        # not only the partial (it stored a second copy, under "NAME (1)").
        for stale in [entry for entry in inbound_here.values() if entry.key == key]:
            stale.scope.cancel()
            await stale.done.wait()
        rerun = await self._rerun_answer(caller, name, size, sha256)
        if rerun is not None:
            if says_skipped(rerun):
                # Published already (by another send): the caller's partial
                # of it, left by a cut attempt, will never be resumed.
                with contextlib.suppress(ConduitError, OSError):
                    await self._settings.backend.forget_partial(
                        caller, safe_relative_name(name), key
                    )
            return rerun
        # Transfers whose stream the sender reset (its caller cancelled, say)
        # are letting go of their slot; the reset came before this begin, so
        # the begin must not find that slot still taken ("overloaded").
        for ending in [
            entry
            for entry in inbound_here.values()
            if entry.stream.error is not None and not entry.done.is_set()
        ]:
            await ending.done.wait()
        begins = self._begins(connection)
        let_go = trio.Event()
        begins.setdefault(key, []).append(let_go)
        try:
            return await self._begin(caller, name, size, key, restart, inbound_here)
        finally:
            running = begins[key]
            running.remove(let_go)
            if not running:
                del begins[key]
            let_go.set()

    async def _begin(
        self,
        caller: Peer,
        name: str,
        size: int,
        key: str,
        restart: bool,
        inbound_here: dict[int, _Inbound],
    ) -> dict[str, Any]:
        """Claim a slot, admit the file, open the stream and start its receive task."""
        connection = caller.connection
        settings = self._settings
        limits = settings.transfer_limits()
        with self._slots.claim(connection, partial_owner(caller), limits) as slot:
            backend = settings.backend
            try:
                safe = safe_relative_name(name)
                admission = await backend.admit(caller, safe, size, key, restart=restart)
            except Exception as exc:
                raise as_rpc_error(exc, name=name) from None
            partial = admission.sink
            try:
                # Cancelled while the (uncancellable) thread opened the file: the
                # caller is gone, so do not keep the partial locked for nobody.
                await trio.lowlevel.checkpoint()
                stream = connection.open_incoming_stream()
                inbound = _Inbound(stream, key)
                slot.spawn(
                    connection.spawn,
                    self._receive_task,
                    connection,
                    caller,
                    admission,
                    safe,
                    size,
                    inbound,
                    inbound_here,
                )
            except BaseException:
                with trio.CancelScope(shield=True):
                    await partial.close()
                    await backend.release(admission)
                raise
            inbound_here[stream.stream_id] = inbound
        return {
            "stream_id": stream.stream_id,
            "offset": partial.offset,
            "prefix_sha256": partial.sha256_hex(),
        }

    async def _rerun_answer(
        self, caller: Peer, name: str, size: int, sha256: str
    ) -> dict[str, Any] | None:
        try:
            # A read-only account is refused before the look: "already there"
            # would answer it success for an upload it may not make.
            check_writable(caller)
            safe = safe_relative_name(name)
            # (A hostile size matches no stored file; the admission refuses it.)
            return await self._settings.backend.rerun_answer(caller, safe, size, sha256)
        except Exception as exc:
            raise as_rpc_error(exc) from None

    @trio_callback
    async def rpc_finish(
        self,
        caller: Peer,
        stream_id: int | None = None,
        abandon: bool = False,
        key: str = "",
    ) -> dict[str, Any]:
        """``file_upload_finish`` / ``file_push_finish``: the receive task's verdict.

        With ``abandon=True``, stop waiting for the stream instead: the one of
        ``stream_id``, or (``key=``, for a sender whose begin was cancelled
        before its answer came, so it never learnt the stream id) the one
        this connection's begin of ``key`` opened, if any.
        """
        streams = self._inbound(caller.connection)
        if key:
            if stream_id is not None or not abandon:
                raise RPCError("key= names a stream to abandon, alone", "invalid_arguments")
            begins = self._begins(caller.connection)
            return {"abandoned": await self._abandon_key(streams, begins, key)}
        if stream_id is None:
            raise RPCError("stream_id is required", "invalid_arguments")
        inbound = streams.get(stream_id)
        if inbound is None:
            raise RPCError(f"no transfer on stream {stream_id}", "not_found")
        if abandon:
            # The sender will restart from zero (its new begin, restart=True,
            # truncates the partial), or gave up before it opened the stream:
            # stop waiting for the stream. The partial stays for a resume.
            await _abandon(streams, stream_id, inbound)
            return {"abandoned": True}
        await inbound.done.wait()
        streams.pop(stream_id, None)
        if inbound.error is not None:
            raise detached(inbound.error)
        assert inbound.result is not None
        return inbound.result

    @staticmethod
    async def _abandon_key(
        streams: dict[int, _Inbound], begins: dict[str, list[trio.Event]], key: str
    ) -> bool:
        """Abandon the stream still waiting for ``key``'s data; whether there was one.

        The sender's CANCEL of its begin reached us before this call did, so a
        begin still running has been cancelled: it lets go by itself, but only
        once the worker thread it waits in returns (opening a partial to resume
        hashes its bytes), so this waits for that first; the sender's slot is
        then free when its cancelled call returns. A begin that had answered
        left its entry here, which is what this lets go.
        """
        running = list(begins.get(key, ()))
        for let_go in running:
            await let_go.wait()
        waiting = [
            (stream_id, inbound)
            for stream_id, inbound in streams.items()
            if inbound.key == key and inbound.finished_at is None
        ]
        for stream_id, inbound in waiting:
            await _abandon(streams, stream_id, inbound)
        return bool(waiting or running)

    @trio_callback
    async def rpc_receive_small(
        self, caller: Peer, name: str, data: bytes, sha256: str
    ) -> dict[str, Any]:
        """``file_upload_small`` / ``file_push_small``: a whole small file in one call.

        Check, write, verify, fsync, publish in one worker-thread hop: a batch
        of one (see :mod:`._batch_store`). Nothing to resume, so the partial
        gets a one-off id.
        """
        started = trio.current_time()
        if not isinstance(data, bytes):
            raise RPCError("data must be bytes", "invalid_arguments")
        entry = Entry(name, data, sha256)
        await self._store(caller, [entry])
        if entry.error is not None:
            raise detached(entry.error)
        if entry.skipped:
            return entry.skipped_result()
        return await self._announce_stored(caller, entry, trio.current_time() - started)

    @trio_callback
    async def rpc_receive_batch(self, caller: Peer, files: Any) -> dict[str, Any]:
        """``file_upload_batch``: several small files in one call, one fsync pass.

        ``files`` is a list of ``{"name", "data", "sha256"}``; the answer is
        ``{"results": [...]}``, one ``file_upload_small`` result (or failure)
        per entry, in order. See :mod:`._batch_store` for the bounds and the
        durability guarantee.
        """
        started = trio.current_time()
        entries = parse_batch(files, caller.connection.settings.max_frame_size)
        await self._store(caller, entries)
        elapsed = trio.current_time() - started
        results = []
        for entry in entries:
            if entry.error is not None:
                results.append(entry.failure())
            elif entry.skipped:
                results.append(entry.skipped_result())
            else:
                results.append(await self._announce_stored(caller, entry, elapsed))
        return {"results": results}

    async def _store(self, caller: Peer, entries: list[Entry]) -> None:
        """Store one-shot files (the backend's way); outcomes are left on the entries.

        A read-only account's are each refused ``forbidden`` before any look:
        one the store holds already would otherwise be answered success.
        """
        try:
            check_writable(caller)
        except TransferError as exc:
            refused = as_rpc_error(exc)
            for entry in entries:
                entry.error = refused
            await trio.lowlevel.checkpoint()
            return
        await self._settings.backend.store_small(caller, entries)

    def _progress_hooks(self, connection: Connection, peer: Peer) -> ProgressCallback | None:
        """The handler's ``on_progress`` callbacks as one reporter's callback
        (None without any). A server's are told which client sends; one that
        raises is logged and stops nothing, as for ``on_file_received``."""
        callbacks = self._hooks.progress
        if not callbacks:
            return None
        who = () if connection.is_client else (peer,)

        async def report(progress: TransferProgress) -> None:
            await notify(callbacks, "on_progress", *who, progress)

        return trio_callback(report)  # ours, run in Trio, not the user's world

    async def _announce_stored(self, caller: Peer, entry: Entry, elapsed: float) -> dict[str, Any]:
        assert entry.published is not None
        report = self._progress_hooks(caller.connection, caller)
        if report is not None:
            # A one-shot file arrives whole: its one report, at 100 %.
            size = len(entry.data)
            await report(TransferProgress(entry.safe, "receive", size, size, elapsed))
        location = self._settings.backend.location_of(caller, entry.published)
        result = await self._announce_entry(caller.connection, caller, location, entry, elapsed)
        result.pop("local_path")
        return result

    async def _announce_entry(
        self,
        connection: Connection,
        peer: Peer | None,
        local_path: str,
        entry: Entry,
        elapsed: float,
    ) -> dict[str, Any]:
        """:meth:`_announce` for a one-shot file (of a batch, or alone) stored whole."""
        assert entry.published is not None
        return await self._announce(
            connection,
            peer,
            local_path,
            entry.published,
            entry.safe,
            len(entry.data),
            entry.sha256,
            resumed_from=0,
            elapsed=elapsed,
        )

    # ------------------------------------------------------------------ download (client side)

    async def download(
        self,
        peer: Peer,
        name: str,
        local_dir: str | os.PathLike[str],
        on_progress: ProgressCallback | None,
        byte_range: tuple[int, int | None] | None = None,
    ) -> dict[str, Any]:
        """Ask ``peer`` (a server) for ``name`` and receive it into ``local_dir``.

        ``byte_range`` is ``(offset, length or None)``: only those bytes, into
        the local file named by :func:`._ranges.range_name`.
        """
        local = StorageRoot(local_dir)
        safe = safe_relative_name(name)
        try:
            stat = stat_answer(await peer.call(FILE_STAT, name=safe))
        except (RPCError, ConnectionClosed, TransferError) as exc:
            return transfer_failure(exc)
        size, mtime_ns = stat.size, stat.modified_ns
        target, expected, extra = safe, size, {}
        if byte_range is not None:
            try:
                requested = resolve_range(size, *byte_range)
                target = range_name(safe, *requested)
            except (TransferError, UnsafePathError) as exc:
                return transfer_failure(exc)
            expected = requested[1]
            extra = {"range_offset": requested[0], "range_length": requested[1]}
        else:
            try:
                skipped = await self._local_copy_is_current(peer, local, safe, size)
            except OSError as exc:  # the destination cannot be looked at (see below)
                return transfer_failure(_in_destination(exc, safe, local_dir))
            if skipped is not None:
                # Complete already: the callback still sees its one 100% report.
                await ProgressReporter(
                    on_progress,
                    filename=safe,
                    direction="download",
                    total_size=size,
                    resumed_from=size,
                ).finish()
                return skipped
        # (Versions before DOWNLOAD_ID_PREFIX named the partial by the key alone.)
        former_key = (
            transfer_key(f"{target}\0{safe}", size, mtime_ns)
            if extra
            else transfer_key(safe, size, mtime_ns)
        )
        key = download_transfer_id(former_key)
        connection = peer.connection
        try:
            partial = await self._open_download_partial(
                local, target, key, expected, former_key=former_key
            )
        except (ConduitError, OSError) as exc:
            # The local directory cannot take it (read-only, a file in its
            # place, full): a result, as for any other failure of a download
            # (until 2026-12-07 an OSError was raised, naming the hidden
            # partial: a review).
            return transfer_failure(_in_destination(exc, target, local_dir))
        stream: IncomingStream | None = None
        try:
            stream = connection.open_incoming_stream()
            # No timeout when resuming: the server re-hashes our whole prefix
            # inside this call (behind the connection's other hashes), which
            # takes as long as the disk takes; the heartbeat notices a dead
            # peer. From zero it only opens the file: the usual timeout.
            answer = await peer.call(
                DOWNLOAD,
                name=safe,
                stream_id=stream.stream_id,
                size=size,
                offset=partial.offset,
                prefix_sha256=partial.sha256_hex(),
                timeout=NO_TIMEOUT if partial.offset else None,
                **extra,
            )
            start = download_offset(answer, partial.offset)
            if start != partial.offset:
                # The server did not recognise our prefix: start over.
                await partial.close()
                partial = _DownloadPartial(
                    await _threads.run_sync(lambda: local.open_partial(target, key, resume=False)),
                    partial.made,
                )
                await _threads.run_sync(local.remove_other_partials, target, key)
            result = await self._receive_into(
                connection, stream, partial, target, expected, on_progress, "download", peer=None
            )
            result.update(extra)
        except (ConduitError, OSError) as exc:
            if stream is not None:
                connection.close_stream(stream, reset=("aborted", "download aborted"))
            # Shielded as below: the connection closing often comes with the
            # caller's own cancellation, which would stop the close before it
            # began, and the partial would stay open and locked ("busy").
            with trio.CancelScope(shield=True):
                await partial.let_go()
            return transfer_failure(_in_destination(exc, target, local_dir))
        except BaseException:
            if stream is not None:
                connection.close_stream(stream, reset=("cancelled", "download cancelled"))
            with trio.CancelScope(shield=True):
                await partial.let_go()
            raise
        return result

    async def keep_small_downloads(
        self,
        connection: Connection,
        local_dir: str | os.PathLike[str],
        files: list[BatchFile],
        on_progress: ProgressCallback | None,
        *,
        started: float,
    ) -> list[dict[str, Any]]:
        """Store the whole files of a download batch in ``local_dir``; one result each.

        As the server stores an upload batch (:func:`._batch_store.store_batch`):
        one worker-thread hop, each file verified against its SHA-256 and
        fsynced, the directories synced once; then the partials earlier
        downloads of these files left go. Each result is what a single
        download of that file returns (skipped when ``local_dir`` holds it
        already); ``started``: when the call that brought them was made.
        """
        local = StorageRoot(local_dir)
        entries = [Entry(file.name, file.data, file.sha256) for file in files]
        overwrite = self._settings.overwrite

        def store() -> None:
            store_batch(entries, DirectoryAdmitter(local, self._settings.max_file_size), overwrite)
            # A cut download of an earlier version of a file left its partial
            # (a single download removes it when it starts from zero).
            local.remove_download_partials(e.safe for e in entries if e.error is None)

        results = []
        announced: set[int] = set()
        try:
            await _threads.run_sync(store)
            for index, entry in enumerate(entries):
                if entry.error is not None:
                    results.append(entry.failure())
                    continue
                final = await self._report_kept(entry, on_progress, started)
                if entry.skipped:
                    assert entry.published is not None
                    path, size = str(local.path / entry.published), len(entry.data)
                    digest = entry.sha256
                    results.append(kept_download_result(entry.published, size, digest, path))
                    continue
                # A cancellation already pending lands here, before the file is
                # handed to the callbacks (under asyncio it would cancel the
                # callback's task before its first step): the finally then
                # announces it. One that comes while a callback runs cuts it
                # short, and it is not run again.
                await trio.lowlevel.checkpoint_if_cancelled()
                announced.add(index)
                result = await self._announce_kept(connection, local, entry, final.elapsed)
                result.update(resumed_from=0, elapsed=final.elapsed, speed=final.speed)
                results.append(result)
        finally:
            # The files stored and not yet announced are announced, also when
            # the caller stops or its on_progress raises before their turn (a
            # batch is stored whole, and a cancellation may land as the
            # store's thread returns): shielded, but for ANNOUNCE_GRACE at most,
            # so that a callback waiting for something the caller's
            # cancellation ended cannot keep the caller from stopping.
            with trio.move_on_after(ANNOUNCE_GRACE, shield=True):
                for index, entry in enumerate(entries):
                    stored = entry.published and entry.error is None and not entry.skipped
                    if stored and index not in announced:
                        elapsed = trio.current_time() - started
                        await self._announce_kept(connection, local, entry, elapsed)
        return results

    @staticmethod
    async def _report_kept(
        entry: Entry, on_progress: ProgressCallback | None, started: float
    ) -> TransferProgress:
        """The one progress report of a stored (or skipped) file of a download batch."""
        size = len(entry.data)
        reporter = ProgressReporter(
            on_progress,
            filename=entry.safe,
            direction="download",
            total_size=size,
            resumed_from=size if entry.skipped else 0,
            started=started,
        )
        if not entry.skipped:
            await reporter.advance(size)
        return await reporter.finish()

    async def _announce_kept(
        self, connection: Connection, local: StorageRoot, entry: Entry, elapsed: float
    ) -> dict[str, Any]:
        """Tell the callbacks of a stored file of a download batch; its result."""
        assert entry.published is not None
        location = str(local.path / entry.published)
        result = await self._announce_entry(connection, None, location, entry, elapsed)
        result["path"] = result.pop("local_path")
        return result

    async def _open_download_partial(
        self, local: StorageRoot, target: str, key: str, expected: int, *, former_key: str
    ) -> _DownloadPartial:
        """Open (resuming) the partial that receives ``target``, if the disk can take the rest.

        Only the ``expected`` bytes the partial does not hold yet need room: a
        download cut at 6 of 10 GB resumes with 4 GB free. A partial that
        starts at zero first removes the idle partials left for other versions
        of ``target`` (:meth:`StorageRoot.remove_other_partials`), whose room
        then counts too. Refused (``TransferError``, ``"no_space"``), a
        partial with bytes stays for a later try; an empty one is removed.
        A partial an earlier version of conduit left under ``former_key``
        (before download ids had their prefix) is taken over first.
        """

        def adopt_and_open(stop: threading.Event) -> _DownloadPartial:
            made = local.missing_directories(split_name(target)[0])
            local.adopt_partial(target, former_key, key)
            return _DownloadPartial(local.open_partial(target, key, resume=True, stop=stop), made)

        # Stoppable: a cancelled download need not wait for the whole hash of
        # a partial of many GiB (see _stoppable).
        partial = await run_stoppable(adopt_and_open, name="conduit: open a download's partial")
        try:
            if partial.offset == 0:
                await _threads.run_sync(local.remove_other_partials, target, key)
            held = min(partial.offset, expected)
            limit = self._settings.max_file_size
            await _threads.run_sync(lambda: local.check_can_accept(expected, limit, offset=held))
        except BaseException:
            with trio.CancelScope(shield=True):
                await partial.let_go()
            raise
        return partial

    async def _local_copy_is_current(
        self, peer: Peer, local: StorageRoot, name: str, size: int
    ) -> dict[str, Any] | None:
        """The skipped result if ``local`` already holds ``name`` with the server's bytes."""
        overwrite = self._settings.overwrite
        if not await same_size_exists(local, name, size, overwrite=overwrite):
            return None
        try:
            # No timeout: the server hashes the whole file inside this call
            # (behind the connection's other hashes); a timeout here would
            # read as "not the same file" and fetch a second copy.
            remote = await peer.call(FILE_STAT, name=name, sha256=True, timeout=NO_TIMEOUT)
            remote_size = stat_answer(remote).size
        except (RPCError, ConnectionClosed, TransferError):
            return None  # the download itself reports the problem
        digest = remote.get("sha256")
        # A hash we compare with ours: hex of SHA-256, nothing else.
        if remote_size != size or not isinstance(digest, str) or len(digest) != 64:
            return None
        stored = await find_already_there(local, name, size, digest, overwrite=overwrite)
        if stored is None:
            return None
        return kept_download_result(stored, size, digest, str(local.path / stored))

    # ------------------------------------------------------------------ receiving

    async def _receive_task(
        self,
        connection: Connection,
        peer: Peer,
        admission: Admitted,
        name: str,
        size: int,
        inbound: _Inbound,
        inbound_here: dict[int, _Inbound],
    ) -> None:
        """The spawned half of an upload or push; its slot wrapper gives the slot back."""
        partial = admission.sink
        try:
            with inbound.scope:
                inbound.result = await self._receive_into(
                    connection,
                    inbound.stream,
                    partial,
                    name,
                    size,
                    self._progress_hooks(connection, peer),
                    "receive",
                    peer=peer,
                )
            if inbound.scope.cancelled_caught:
                inbound.error = RPCError("replaced by a newer attempt", "superseded")
        except Exception as exc:
            inbound.error = as_rpc_error(exc, name=name)
            # A peer ends its uploads at will (abandoned, cut off): INFO; and
            # any such line under a budget per owner, or one user could make
            # the log grow as fast as it can ask (570 lines a second).
            # (Lines of their own: the peer's INFO must not spend the
            # budget of a WARNING about a failure of ours.)
            if isinstance(exc, (ConnectionClosed, StreamReset)):
                report, template = self._peer_log.info, "receiving %r ended by the peer: %s"
            else:
                report, template = self._peer_log.warning, "receiving %r failed: %s"
            report(partial_owner(peer), trio.current_time(), template, name, inbound.error)
        finally:
            await self._settings.backend.release(admission)
            inbound.finished_at = now = trio.current_time()
            inbound.done.set()
            keep = max(MAX_UNCLAIMED, self._settings.max_transfers_per_connection)
            _forget_unclaimed(inbound_here, now, keep)

    async def _receive_into(
        self,
        connection: Connection,
        stream: IncomingStream,
        partial: Sink,
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
        overwrite = self._settings.overwrite
        try:
            trailer = await receive_file(
                stream,
                partial,
                size=size,
                reporter=reporter,
                stall_after=STALL_HEARTBEAT_TIMEOUTS * connection.settings.heartbeat_timeout,
            )
            if trailer.size != size or partial.offset != size:
                raise TransferError(
                    f"size mismatch: announced {size}, trailer says {trailer.size}, "
                    f"received {partial.offset}",
                    "size_mismatch",
                )
            published = await partial.publish(overwrite=overwrite, expected_sha256=trailer.checksum)
        except (ConnectionClosed, StreamReset, trio.Cancelled) as exc:
            # The link or the sender went away, but the bytes we have are good:
            # keep the partial file so that sending again resumes. Unless the
            # sender says its file changed: they are then a prefix of a version
            # that no later send resumes (its key names the old size and mtime).
            changed = isinstance(exc, StreamReset) and exc.code == "source_changed"
            with trio.CancelScope(shield=True):
                await (partial.discard() if changed else partial.close())
            if isinstance(exc, trio.Cancelled) and not stream.finished:
                # We stop (a newer attempt of the same file replaced this one,
                # say) while the sender may still be sending: tell it, or it
                # waits for credit for good on a live connection.
                connection.close_stream(stream, reset=("cancelled", "the receiver stopped"))
            raise
        except BaseException as exc:
            # The data itself is wrong or cannot be stored: remove it, and stop
            # the sender if it is still sending. Except when the bytes kept
            # are good (see _KEPT_ON_FAILURE): keep them for a resume.
            code = exc.code if isinstance(exc, TransferError) else "receiver_error"
            # What the user's own code raised (an on_progress callback, say)
            # says nothing against the bytes either: kept, as a resume checks
            # every prefix by hash anyway.
            kept = _DOWNLOAD_KEPT_ON_FAILURE if direction == "download" else _KEPT_ON_FAILURE
            keep = code in kept or not isinstance(exc, (ConduitError, OSError))
            with trio.CancelScope(shield=True):
                await (partial.close() if keep else partial.discard())
            if not stream.finished:
                connection.close_stream(stream, reset=(code, str(exc)))
            raise
        finally:
            connection.close_stream(stream)
        final = await reporter.finish()
        result = await self._announce(
            connection,
            peer,
            partial.location_of(published),
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
        local_path: str,
        published: str,
        name: str,
        size: int,
        checksum: str,
        *,
        resumed_from: int,
        elapsed: float,
    ) -> dict[str, Any]:
        """A file was verified and published: tell the callbacks, build the result."""
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
        # A server's callbacks are told which client sent the file; a client's
        # (pushes, downloads) have only one peer.
        who = (peer,) if peer is not None and not connection.is_client else ()
        await notify(self._hooks.received, "on_file_received", *who, local_path, metadata=metadata)
        return {
            "success": True,
            "path": published,
            "local_path": local_path,
            "filename": published,
            "size": size,
            "checksum": checksum,
        }
