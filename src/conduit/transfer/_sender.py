"""The sending side of every transfer: uploads and pushes, and serving downloads.

* :meth:`Sender.send` -- ``send_to_server`` / ``send_to_client``: ask the
  receiver to begin (it answers with a stream and where to resume), check our
  prefix against its hash, stream the rest under its credit, ask for the
  verdict. Files up to one chunk go in a single call instead.
* :meth:`Sender.rpc_download` -- the server's ``file_download``: open the
  stored file, agree on where to resume, and spawn the task that streams it
  into the stream the client opened; ``on_file_served`` hears how it ended.
  ``file_list`` and ``file_stat``, the other reads a client makes before a
  download, live here too.

Every file is read and hashed in one pass in worker threads (see
:mod:`._engine`); nothing here copies file data.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import trio

from .. import _threads
from .._callbacks import trio_callback
from .._connection import Connection
from .._log_limit import LimitedLog
from .._peer import Peer
from .._rpc import current_peer
from .._streams import OutgoingStream
from ..errors import (
    ConduitError,
    ConnectionClosed,
    RPCError,
    RPCTimeoutError,
    StreamReset,
    TransferError,
    UnsafePathError,
)
from ._answers import BadAnswer, begin_answer, finish_answer
from ._backend import Source
from ._batch_serve import BatchServer, parse_request
from ._batch_store import FRAME_OVERHEAD
from ._budget import ByteBudget, SendBudget
from ._engine import FileSource, hash_prefix, send_file
from ._hooks import Hooks, TransferSettings, notify
from ._listing import listing_page
from ._local import DirectoryId, SmallFile, read_source
from ._names import safe_relative_name
from ._progress import ProgressReporter, TransferProgress
from ._ranges import WHOLE_FILE, resolve_range
from ._rationed import FairLimiter
from ._rerun import asks_for_sha256, says_skipped
from ._slots import TransferSlot, TransferSlots
from ._small import SmallUploads, send_one
from ._space import partial_owner
from ._wire import (
    PUSH_BEGIN,
    PUSH_FINISH,
    PUSH_SMALL,
    UPLOAD_BEGIN,
    UPLOAD_FINISH,
    UPLOAD_SMALL,
    Trailer,
    as_rpc_error,
    transfer_failure,
    transfer_key,
)

log = logging.getLogger("conduit.transfer")

ProgressCallback = Callable[[TransferProgress], Any]
SendDirection = Literal["upload", "push"]

#: The timeout of transfer control calls (and of the downloads' ``file_download``
#: and ``file_stat(sha256=True)``, see ._receiver): they wait as long as the
#: work takes (re-hashing a large partial or a whole file, behind other hashes
#: of the connection; fsync of a large file); a dead peer is caught by the heartbeat.
NO_TIMEOUT = math.inf
#: Seconds a sender that gives up waits for the receiver to acknowledge the
#: abandon of a stream it never opened (a courtesy: a dead link must not hold
#: up a cancellation, and the receiver lets go when the connection ends anyway).
_ABANDON_TIMEOUT = 5.0
# Files up to this size (and the chunk size) go in one call instead of a stream.
_SMALL_FILE = 256 * 1024
# Worker threads that may hash resume prefixes at once, for all connections
# together: the rest of the thread pool stays free for everyone's file_list,
# stat and disk reads, however many resumes are claimed.
_HASH_THREADS = 2

#: The receiver's methods for each direction: begin, finish, small file.
_METHODS: dict[SendDirection, tuple[str, str, str]] = {
    "upload": (UPLOAD_BEGIN, UPLOAD_FINISH, UPLOAD_SMALL),
    "push": (PUSH_BEGIN, PUSH_FINISH, PUSH_SMALL),
}


class Sender:
    """Sends files to a peer and serves the downloads a peer asks for."""

    def __init__(self, settings: TransferSettings, hooks: Hooks, slots: TransferSlots) -> None:
        self._settings = settings
        self._hooks = hooks
        self._slots = slots
        # Owners (users; hosts, with a shared password) take turns: a plain
        # limiter served claims in arrival order, so one owner's 16
        # connections each asking for a resume near the end of a large file
        # held another owner's resume of 1 MiB 3.4 s (until 2026-12-07).
        self._hash_slots = FairLimiter(_HASH_THREADS)
        # Lines a peer causes at will, under a budget per owner (user, or host).
        self._peer_log = LimitedLog(log)

    def _budget(self, connection: Connection) -> SendBudget:
        """``connection``'s sending budget, created on first use and owned by the connection."""
        budget: SendBudget | None = connection.owned.get(self)
        if budget is None:
            budget = SendBudget(ByteBudget(self._settings.read_ahead_per_connection))
            connection.owned[self] = budget
        return budget

    @property
    def small_file_limit(self) -> int:
        """Files up to this many bytes travel inside a call instead of a stream."""
        return min(self._settings.chunk_size, _SMALL_FILE)

    # ------------------------------------------------------------------ upload and push

    async def send(
        self,
        peer: Peer,
        path: str | os.PathLike[str],
        remote_name: str | None,
        on_progress: ProgressCallback | None,
        direction: SendDirection,
        *,
        within: DirectoryId | None = None,
        small: SmallFile | None = None,
    ) -> dict[str, Any]:
        """Send ``path`` to ``peer``'s receiver; the result dict (raises only before sending).

        ``within``: ``path`` is a file a directory walk found in that directory,
        opened through it: a symbolic link, there or in place of a directory
        of the walk, is refused instead of followed (see
        :class:`._local.WalkedDirectories`).
        ``small``: ``path``'s bytes, already read (see :func:`._local.probe_source`).
        """
        begin_method, finish_method, small_method = _METHODS[direction]
        if small is None:
            # One worker-thread hop: open, check, and for a small file read,
            # hash and close (see ._local.read_source).
            source = await _threads.run_sync(
                lambda: read_source(path, self.small_file_limit, within=within)
            )
            if source.changed:
                return transfer_failure(
                    TransferError("the file changed while being read", "source_changed")
                )
            small = source.small
        if small is not None:
            name = safe_relative_name(Path(path).name if remote_name is None else remote_name)
            return await self._send_small(peer, name, small, on_progress, small_method, direction)
        file = source.file
        assert file is not None
        try:
            info = os.fstat(file.fileno())
            size = info.st_size
            name = safe_relative_name(Path(path).name if remote_name is None else remote_name)
            key = transfer_key(name, size, info.st_mtime_ns)
            # The stream id of a begin answered whose stream is not open yet.
            unopened: int | None = None
            # A begin is under way: leaving now (cancelled) may leave the
            # receiver waiting on a stream whose id we never learn.
            unanswered = False

            async def call_begin(**extra: Any) -> Any:
                nonlocal unanswered
                unanswered = True
                try:
                    # No timeout: re-hashing a large partial may take a while;
                    # the heartbeat notices a dead peer.
                    answer = await peer.call(
                        begin_method, name=name, size=size, key=key, timeout=NO_TIMEOUT, **extra
                    )
                except RPCTimeoutError:
                    raise
                except RPCError:
                    unanswered = False  # the receiver refused it: it holds nothing
                    raise
                unanswered = False
                return answer

            try:
                raw = await call_begin()
                if asks_for_sha256(raw):
                    # The receiver has a file of this name and size: if it is
                    # this very file, there is nothing to send (see _rerun).
                    digest = (await hash_prefix(file, size)).hexdigest()
                    await _threads.run_sync(file.seek, 0)
                    raw = await call_begin(sha256=digest)
                if says_skipped(raw):
                    skipped = finish_answer(raw, size)
                    # Complete already: the callback still sees its one 100% report.
                    done = ProgressReporter(
                        on_progress,
                        filename=name,
                        direction=direction,
                        total_size=size,
                        resumed_from=size,
                    )
                    await done.finish()
                    return {**skipped, "resumed_from": 0, "elapsed": 0.0, "speed": 0.0}
                begin = begin_answer(raw, size)
                start, stream_id = begin.offset, begin.stream_id
                # From the begin's answer until the stream opens, the receiver
                # holds a partial, a disk reservation and a transfer slot for
                # a stream only we can open: leaving before that (cancelled,
                # or failed hashing or seeking) must tell it (see finally).
                unopened = stream_id
                sending = FileSource(file, info)  # the version the key names
                hasher = await resume_hasher(sending, start, begin.prefix_sha256)
                if hasher is None:  # our prefix differs from theirs: restart from zero
                    await peer.call(finish_method, stream_id=stream_id, abandon=True)
                    unopened = None
                    begin = begin_answer(
                        await call_begin(restart=True),
                        0,  # a restart begins at zero; any other offset is a lie
                    )
                    start, stream_id = 0, begin.stream_id
                    unopened = stream_id
                    hasher = hashlib.sha256()
                    await _threads.run_sync(file.seek, 0)
                reporter = ProgressReporter(
                    on_progress,
                    filename=name,
                    direction=direction,
                    total_size=size,
                    resumed_from=start,
                )
                # If the receiver stops us (StreamReset), its verdict below says
                # why: while we send, or before we even opened the stream (a
                # newer send of the same file took over: "superseded").
                with contextlib.suppress(StreamReset):
                    try:
                        stream = peer.connection.open_outgoing_stream(stream_id)
                    except StreamReset:
                        unopened = None  # the receiver reset it: it let it go
                        raise
                    except RPCError as exc:
                        # An id the receiver may not allocate (one of our
                        # parity): its answer was wrong, not our arguments.
                        raise BadAnswer(f"the begin answer's {exc}") from None
                    # Open: from here its END, or its reset when sending stops
                    # (see _stream_out), is what ends the receiver's wait.
                    unopened = None
                    try:
                        await self._stream_out(peer, stream, sending, start, size, hasher, reporter)
                    except StreamReset:
                        raise  # the receiver's reset: its verdict is asked below
                    except TransferError:  # ours (see _stream_out)
                        await _until_reset_taken(peer, finish_method, stream_id)
                        raise
                result = finish_answer(await _ask_verdict(peer, finish_method, stream_id), size)
            except (ConduitError, OSError) as exc:
                return transfer_failure(exc)
            finally:
                if unopened is not None:
                    await _abandon(peer, finish_method, stream_id=unopened)
                elif unanswered:
                    await _abandon(peer, finish_method, key=key)
            final = await reporter.finish()
            result.update(
                success=True, resumed_from=start, elapsed=final.elapsed, speed=final.speed
            )
            return result
        finally:
            with trio.CancelScope(shield=True):
                await _threads.run_sync(file.close)

    async def _send_small(
        self,
        peer: Peer,
        name: str,
        small: SmallFile,
        on_progress: ProgressCallback | None,
        method: str,
        direction: SendDirection,
    ) -> dict[str, Any]:
        """Files up to one chunk travel inside a single call: one round trip, no stream.

        Uploads in flight together on a connection share calls (see ._small).
        """
        size = len(small.data)
        reporter = ProgressReporter(
            on_progress, filename=name, direction=direction, total_size=size
        )
        if direction == "upload":
            uploads: SmallUploads | None = peer.connection.owned.get(SmallUploads)
            if uploads is None:
                uploads = peer.connection.owned[SmallUploads] = SmallUploads()
            result = await uploads.send(peer, name, small, method)
        else:
            result = await send_one(peer, name, small, method)
        if not result.get("success"):
            return result
        await reporter.advance(size)
        final = await reporter.finish()
        result.update(success=True, resumed_from=0, elapsed=final.elapsed, speed=final.speed)
        return result

    async def _stream_out(
        self,
        peer: Peer,
        stream: OutgoingStream,
        source: Source,
        start: int,
        size: int,
        hasher: Any,
        reporter: ProgressReporter,
        base: int = 0,
    ) -> Trailer:
        """Send ``source`` from ``start`` on the open ``stream``; reset it if sending stops.

        ``base``: where the part sent begins in the source (a range's offset)."""
        connection = peer.connection
        budget = self._budget(connection)
        try:
            trailer = await send_file(
                stream,
                source,
                start=start,
                size=size,
                hasher=hasher,
                chunk_size=self._settings.chunk_size,
                reporter=reporter,
                read_ahead=budget.read_ahead,
                read_threads=budget.read_threads,
                base=base,
            )
        except BaseException as exc:
            # The receiver's verdict names the reason (source_changed: the file
            # changed while it was sent), not a bare "aborted".
            if isinstance(exc, TransferError):
                reset = (exc.code, exc.message)
            else:
                reset = ("aborted", "the sender gave up")
            connection.close_stream(stream, reset=reset)
            raise
        connection.close_stream(stream)
        return trailer

    # ------------------------------------------------------------------ serving downloads
    # Library code written for Trio: marked so that they run in Trio even when
    # the application lives in asyncio (where plain coroutines run on asyncio).

    @trio_callback
    async def rpc_file_list(self, prefix: str = "", after: str | None = None) -> dict[str, Any]:
        """``file_list``: the storage's visible files (only those under the
        directory ``prefix``; only those after ``after`` in the storage's
        listing order: the next page).

        A page is the first files in the storage's listing order (the names'
        order, but for an S3 store that lists otherwise: see
        ``Store.list_files``), sent sorted by name. When ``max_listed``, or the
        caller's ``max_frame_size`` (which the answer must fit in), cut the
        listing short, ``"truncated": True`` is added, and ``"next"``: the
        page's last name in the storage's order (its last by name, but on such
        a store), the ``after`` of the next page.
        """
        settings = self._settings
        caller = current_peer()
        if after is not None:
            try:
                if safe_relative_name(after) != after:
                    raise UnsafePathError(f"{after!r} is not a name a listing gave")
            except UnsafePathError as exc:
                raise RPCError(f"after: {exc}", "invalid_arguments") from None
        try:
            entries = await settings.backend.list_files(
                caller, max_entries=settings.max_listed + 1, prefix=prefix or None, after=after
            )
        except Exception as exc:
            raise as_rpc_error(exc) from None
        room = caller.connection.keys.peer_max_frame_size
        return listing_page(entries, settings.max_listed, room)

    @trio_callback
    async def rpc_file_stat(self, name: str, sha256: bool = False) -> dict[str, Any]:
        """``file_stat``: size and mtime of one stored file (what a download is keyed on).

        With ``sha256=True`` also its SHA-256 (one read of the file), which a
        re-run compares with its local copy. A directory is refused with code
        ``"is_directory"``, which tells ``receive_from_server`` to fetch the tree.
        """
        return await self._settings.backend.stat(current_peer(), name, sha256=sha256 is True)

    @trio_callback
    async def rpc_download(
        self,
        caller: Peer,
        name: str,
        stream_id: int,
        size: int,
        offset: int,
        prefix_sha256: str,
        range_offset: int = 0,
        range_length: int = WHOLE_FILE,
    ) -> dict[str, Any]:
        """``file_download``: start streaming ``name`` into the caller's stream ``stream_id``.

        With ``range_offset`` / ``range_length`` (both given by a client that
        wants a range; the defaults mean the whole file), only that slice of
        the file (see :mod:`._ranges`); ``offset`` and the answer's ``size``
        then count within the slice.
        """
        try:
            return await self._start_download(
                caller, name, stream_id, size, offset, prefix_sha256, range_offset, range_length
            )
        except Exception as exc:
            await self._served(caller, name, {"size": size, **transfer_failure(exc)})
            raise

    @trio_callback
    async def rpc_download_batch(
        self, caller: Peer, names: Any, max_bytes: Any, have: Any = None
    ) -> dict[str, list[dict[str, Any]]]:
        """``file_download_batch``: the small ones of ``names``, read whole into the answer
        (but those whose SHA-256 the caller gives in ``have``).

        See :mod:`._batch_serve` for the answer and its bounds.
        """
        wanted = parse_request(names, max_bytes, have)
        connection = caller.connection
        room = min(max_bytes, connection.keys.peer_max_frame_size - FRAME_OVERHEAD)
        limits = self._settings.transfer_limits()
        with self._slots.claim(connection, partial_owner(caller), limits):
            batch = BatchServer(
                self._settings.backend,
                caller,
                self._budget(connection),
                small_limit=self.small_file_limit,
                room=room,
                served=self._served,
            )
            return {"files": await batch.serve(wanted)}

    async def _start_download(
        self,
        caller: Peer,
        name: str,
        stream_id: int,
        size: int,
        offset: int,
        prefix_sha256: str,
        range_offset: int,
        range_length: int,
    ) -> dict[str, Any]:
        connection = caller.connection
        # Before a slot, the file or a resume's hash is spent on it.
        connection.check_outgoing_stream_id(stream_id)
        limits = self._settings.transfer_limits()
        owner = partial_owner(caller)
        with await self._slots.claim_after_ending(connection, owner, limits) as slot:
            try:
                opened = await self._settings.backend.open_source(caller, name)
            except Exception as exc:
                raise as_rpc_error(exc, name=name) from None
            source = opened.source
            try:
                if opened.size != size:
                    raise RPCError(f"{name!r} changed on the server; ask again", "source_changed")
                base = 0
                if (range_offset, range_length) != (0, WHOLE_FILE):
                    try:
                        base, size = resolve_range(size, range_offset, range_length)
                    except TransferError as exc:
                        raise as_rpc_error(exc) from None
                    await source.seek(base)
                start = offset if 0 <= offset <= size else 0
                hasher = await self._checked_resume(caller, name, source, start, prefix_sha256)
                if hasher is None:
                    start, hasher = 0, hashlib.sha256()
                    await source.seek(base)
                reporter = ProgressReporter(
                    None, filename=name, direction="download", total_size=size, resumed_from=start
                )
                slot.spawn(
                    connection.spawn,
                    self._serve_download,
                    caller,
                    safe_relative_name(name),
                    stream_id,
                    source,
                    start,
                    size,
                    hasher,
                    reporter,
                    base,
                    slot,
                )
            except BaseException:
                with trio.CancelScope(shield=True):
                    await source.aclose()
                raise
        return {"offset": start, "size": size}

    async def _checked_resume(
        self, caller: Peer, name: str, source: Source, start: int, their_prefix: str
    ) -> Any | None:
        """:func:`resume_hasher` within the connection's budget; None means "from zero".

        A resume point is checked by hashing everything before it, which costs
        the server far more than the request costs the client. So one check at
        a time per connection, on the shared hashing threads, and once a
        connection's claims have cost ``resume_hash_budget`` bytes of hashing
        for nothing, its resumes are refused: the download restarts from zero,
        which the client's side already handles (it is told offset 0).
        """
        if start == 0:
            return hashlib.sha256()
        budget = self._budget(caller.connection)
        limit = self._settings.resume_hash_budget
        async with budget.hash_lock:
            if budget.hashed_in_vain >= limit:
                # A peer repeats a wrong claim at will: one line per claim would
                # be a log flood, so under its owner's budget like its other lines.
                self._peer_log.warning(
                    partial_owner(caller),
                    trio.current_time(),
                    "%s: resume of %r refused: its wrong resume claims already cost "
                    "%d bytes of hashing (resume_hash_budget %d); sending from zero",
                    caller.id,
                    name,
                    budget.hashed_in_vain,
                    limit,
                )
                return None
            async with self._hash_slots.slot(partial_owner(caller)):
                hasher = await resume_hasher(source, start, their_prefix)
            if hasher is None:
                budget.hashed_in_vain += start
        return hasher

    async def _serve_download(
        self,
        caller: Peer,
        name: str,
        stream_id: int,
        source: Source,
        start: int,
        size: int,
        hasher: Any,
        reporter: ProgressReporter,
        base: int,
        slot: TransferSlot,
    ) -> None:
        """The spawned half of a download; owns the source (and, via its slot wrapper, the slot).

        ``base``: where the part sent begins in the source (a range's offset)."""
        outcome: dict[str, Any]
        try:
            try:
                stream = caller.connection.open_outgoing_stream(stream_id)
                trailer = await self._stream_out(
                    caller, stream, source, start, size, hasher, reporter, base
                )
            finally:
                # The client may now see the end (the trailer, or the stream's
                # reset) and ask for its next download before this task has
                # closed the file and run on_file_served: that one waits for
                # this slot instead of being refused "overloaded".
                slot.ending()
        except (ConduitError, OSError) as exc:
            # A peer cuts its downloads at will: INFO, under a budget per
            # owner (see Receiver._receive_task).
            if isinstance(exc, (ConnectionClosed, StreamReset)):
                report, template = self._peer_log.info, "download of %r ended by the peer: %s"
            else:
                report, template = self._peer_log.warning, "download of %r stopped: %s"
            report(partial_owner(caller), trio.current_time(), template, name, exc)
            outcome = transfer_failure(exc)
        else:
            final = await reporter.finish()
            outcome = {
                "success": True,
                "checksum": trailer.checksum,
                "path": self._settings.backend.location_of(caller, name),
                "elapsed": final.elapsed,
                "speed": final.speed,
            }
        finally:
            with trio.CancelScope(shield=True):
                await source.aclose()
        await self._served(caller, name, {"size": size, "resumed_from": start, **outcome})

    async def _served(self, caller: Peer, name: str, metadata: dict[str, Any]) -> None:
        await notify(
            self._hooks.served,
            "on_file_served",
            caller,
            name,
            metadata={"filename": name, "client_id": caller.id, **metadata},
        )


async def _ask_verdict(peer: Peer, finish_method: str, stream_id: int) -> Any:
    """The receiver's verdict on a stream we have sent: its ``*_finish`` answer.

    A ``*_finish`` refused ``overloaded`` never ran: the peer's call limit
    (``max_concurrent_calls``) was full of our other calls. The bytes are
    sent and the verdict waits there (for ``UNCLAIMED_TTL``, a minute, and
    beside at most as many others as the connection has transfer slots), so
    ask again after a pause, rather than fail a transfer that may have
    succeeded (whose retry would find it ``already_there``, sending it again
    in vain). The last refusal, after :data:`_VERDICT_PAUSES`, is raised;
    so is the refusal when the verdict was dropped meanwhile (``not_found``:
    more verdicts waited than the receiver keeps), which a retry of the
    whole transfer then settles (``already_there`` if it was stored).
    """
    pauses = iter(_VERDICT_PAUSES)
    refused: RPCError | None = None
    try:
        while True:
            try:
                return await peer.call(finish_method, stream_id=stream_id, timeout=NO_TIMEOUT)
            except RPCError as exc:
                if refused is not None and exc.code == "not_found":
                    raise refused from None
                pause = next(pauses, None)
                if exc.code != "overloaded" or pause is None:
                    raise
                refused = exc
            await trio.sleep(pause)
    finally:
        # The refusal kept is raised through this frame, and was caught in it
        # (its traceback holds this frame either way): this frame must not
        # hold it once over, however it ends (see conduit._stored_errors).
        del refused


#: Pauses between the asks of a verdict refused ``overloaded``: 30.44 s in all,
#: within the minute the receiver keeps it.
_VERDICT_PAUSES = (0.01, 0.03, 0.1, 0.3, *([1.0] * 30))


async def _until_reset_taken(peer: Peer, finish_method: str, stream_id: int) -> None:
    """Wait, :data:`_ABANDON_TIMEOUT` at most, for the receiver's verdict on a
    stream we reset (our file changed while it was sent, or could not be read).

    The reset travels behind the data still in flight, and the receiver acts
    on it (removing a partial that no send resumes, for ``source_changed``)
    only once it has read that far. A caller that closes the connection as
    soon as the transfer returns (``async with client:``, the CLI) closed it
    before: until 2026-12-07 the receiver then took the stream for cut and
    kept the whole partial. Its verdict comes once it has acted; what it
    says is ours already.
    """
    with trio.move_on_after(_ABANDON_TIMEOUT):
        try:
            await peer.call(finish_method, stream_id=stream_id, timeout=NO_TIMEOUT)
        except (ConduitError, OSError) as exc:
            log.debug("verdict on reset stream %s: %s", stream_id, exc)


async def _abandon(
    peer: Peer, finish_method: str, *, stream_id: int | None = None, key: str | None = None
) -> None:
    """Tell the receiver that a stream will never open, so it lets go.

    The stream is ``stream_id``, or, when a begin was cancelled before its
    answer came (so we never learnt the id), the one the receiver may have
    opened for ``key``: our CANCEL reaches it first, so a begin still running
    there is cancelled, and one that had answered is found by its key.

    Its ``*_finish`` with ``abandon=True`` stops the task waiting for the
    stream: the partial stays for a resume; the reservation and the transfer
    slot are given back now rather than when the connection ends. Shielded,
    because a cancelled sender is the usual reason to get here, and bounded
    by :data:`_ABANDON_TIMEOUT`, so a dead link cannot hang the cancellation.
    A courtesy: a failure (the connection is gone, the receiver already
    forgot the stream) is not the caller's problem.
    """
    with trio.CancelScope(shield=True), trio.move_on_after(_ABANDON_TIMEOUT):
        try:
            which = {"stream_id": stream_id} if key is None else {"key": key}
            await peer.call(finish_method, abandon=True, timeout=NO_TIMEOUT, **which)
        except (ConduitError, OSError) as exc:
            log.debug("abandoning stream %s: %s", stream_id if key is None else key, exc)


async def resume_hasher(
    source: Source,
    start: int,
    their_prefix: str,
) -> Any | None:
    """A SHA-256 over our first ``start`` bytes if they hash to ``their_prefix``, else None.

    The file position ends at ``start`` when they match. (A server bounds the
    claims it checks at once: ``Sender._checked_resume``.)
    """
    if start == 0:
        return hashlib.sha256()
    try:
        hasher = await source.hash_prefix(start, None)
    except TransferError:
        return None
    return hasher if hasher.hexdigest() == their_prefix else None
