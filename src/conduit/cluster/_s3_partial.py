"""One multipart upload being written (:class:`S3Partial`) and one ranged read (:class:`S3Reader`).

See :mod:`conduit.cluster.s3` for the layout and the guarantees; these classes
are what :class:`~conduit.cluster.s3.S3Store` hands out.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import hmac
import logging
from typing import TYPE_CHECKING, Any

import botocore.exceptions  # type: ignore[import-untyped]
import trio

from .. import _threads
from ..errors import ChecksumMismatch, TransferError
from ._s3_wire import (
    MAX_PARTS,
    S3_ERRORS,
    Part,
    UploadState,
    b64_sha256,
    is_precondition,
    retried,
    storage_error,
)
from ._sha256 import ResumableSha256
from .store import StoredFile

if TYPE_CHECKING:
    from .s3 import S3Store

__all__ = ["S3Partial", "S3Reader"]

log = logging.getLogger("conduit.cluster.s3")

#: Longest closing a partial waits for its part upload in flight, and then
#: for the state that says it closed to be stored. A store that stopped
#: answering would otherwise hold the close (and a node's clean close with
#: it) for the client's timeouts and retries, about a minute a call; the part
#: upload and the save go on in their threads until those end them (a part
#: whose upload never ends is sent again by the resume).
CLOSE_PATIENCE = 10.0


class S3Partial:
    """:class:`~conduit.cluster.store.PartialUpload` as a multipart upload.

    One part is uploaded in the background while the next one fills: a part
    upload takes as long as receiving a part, and awaiting it in
    :meth:`append` would stall the sender for that long every ``part_size``
    bytes. The part is hashed (its own SHA-256 and the running whole-file
    hash) before it is handed over, so :meth:`sha256_hex` and the saved states
    never depend on the upload; a failed upload surfaces at the next
    :meth:`append`, :meth:`publish` or :meth:`discard`.
    """

    def __init__(self, store: S3Store, state: UploadState, state_key: str, etag: str) -> None:
        """Use :meth:`S3Store.open_partial`."""
        self._store = store
        self._state = state
        state.closing = False  # whoever wrote it last, this writer is live
        self._state_key = state_key
        self._etag = etag
        # Whether the state saved last says "closing" (see close()).
        self._saved_closing = False
        self._buffer = bytearray()
        self._hash = (
            ResumableSha256.restore(base64.b64decode(state.parts[-1].hash_state))
            if state.parts
            else ResumableSha256()
        )
        self._queued = state.durable  # bytes in parts stored or being stored
        self._next_part = len(state.parts) + 1
        self._inflight: concurrent.futures.Future[None] | None = None
        self._closed = False
        self._finished = False

    @property
    def name(self) -> str:
        """The name it was opened for."""
        return self._state.name

    @property
    def transfer_id(self) -> str:
        """Its transfer id."""
        return self._state.transfer_id

    @property
    def key(self) -> str:
        """The object key it will be published as."""
        return self._state.key

    @property
    def offset(self) -> int:
        """Bytes accepted: parts stored or being stored, plus the buffered tail."""
        return self._queued + len(self._buffer)

    @property
    def closed(self) -> bool:
        """Whether it was closed, published or discarded."""
        return self._closed

    def sha256_hex(self) -> str:
        """Hex SHA-256 of everything accepted, buffered tail included."""
        if not self._buffer:
            return self._hash.hexdigest()
        total = self._hash.copy()
        total.update(bytes(self._buffer))
        return total.hexdigest()

    def _require_open(self) -> None:
        if self._closed:
            raise ValueError(f"partial upload for {self.name!r} is closed")

    async def append(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer ``data``; hand every whole part to the uploader (one part in flight)."""
        self._require_open()
        self._buffer += data
        size = self._state.part_size
        while len(self._buffer) >= size:
            await self._queue_part(bytes(self._buffer[:size]))
            # Only once it is queued (no checkpoint since): a cancellation or
            # a failure while it waited for the part in flight leaves it in
            # the buffer, so the offset (what the sender may have been told
            # was accepted) never goes back.
            del self._buffer[:size]

    async def _queue_part(self, data: bytes) -> None:
        """Hash ``data``, wait for the part in flight, then send ``data`` as the next part.

        Changes nothing until it returns (no checkpoint after the first
        change), so if it raises or is cancelled, the part was not queued.
        """
        number = self._next_part
        if number > MAX_PARTS:
            raise TransferError(f"{self.name!r} needs more than {MAX_PARTS} parts", "too_large")
        checksum, hasher = await _threads.run_sync(self._hash_part, data)
        await self._wait_inflight()
        # A last part may end off a 64-byte boundary; its state is never resumed from.
        saved = hasher.save() if hasher.length % 64 == 0 else b""
        self._hash = hasher
        self._next_part += 1
        self._queued += len(data)
        self._inflight = self._store._executor.submit(
            self._send_part, number, data, checksum, base64.b64encode(saved).decode()
        )

    def _hash_part(self, data: bytes) -> tuple[str, ResumableSha256]:
        hasher = self._hash.copy()
        hasher.update(data)
        return b64_sha256(data), hasher

    async def _wait_inflight(self) -> None:
        """Wait for the part being uploaded; raise what it raised."""
        future = self._inflight
        if future is None:
            return
        await _wait_future(future)
        self._inflight = None
        try:
            future.result()
        except S3_ERRORS as exc:
            raise storage_error(exc, f"storing {self.name!r}") from exc

    async def _settle(self) -> bool:
        """Wait for an upload in flight, whatever the cancellation, up to
        :data:`CLOSE_PATIENCE`; its errors do not matter. Whether it ended."""
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_PATIENCE) as patience:
            try:
                await self._wait_inflight()
            except Exception as exc:
                # Closing or discarding anyway: the part is resent or thrown away.
                log.debug("part upload for %r failed while closing: %s", self.name, exc)
        if patience.cancelled_caught:
            log.warning(
                "the part upload of %r did not end within %.0f s; closing without it",
                self.name,
                CLOSE_PATIENCE,
            )
            return False
        return True

    def _send_part(self, number: int, data: bytes, checksum: str, hash_state: str) -> None:
        """Upload one part and record it in the state (worker thread)."""
        state = self._state
        answer = self._store.client.upload_part(
            Bucket=self._store.bucket,
            Key=state.key,
            UploadId=state.upload_id,
            PartNumber=number,
            Body=data,
            ChecksumSHA256=checksum,
        )
        state.parts.append(Part(number, len(data), str(answer["ETag"]), checksum, hash_state))
        closing = state.closing
        etag = self._store._put(self._state_key, state.dumps(), if_match=self._etag)
        if etag is None:
            etag = self._merge_late_writer()
        if etag is None:
            state.parts.pop()
            raise TransferError(f"{self.name!r} is being received by another writer", "busy")
        self._etag, self._saved_closing = etag, closing

    def _merge_late_writer(self) -> str | None:
        """Save our state over a writer that was letting go; its new ETag, or None (busy).

        A node whose client was cut off finishes the part it was storing and
        records it (marked ``closing``), possibly after this node resumed from
        the state before that. Its parts are then a prefix of ours (the same
        bytes of the same file: equal ETags), and ours is the state to keep.
        Anything else, including a writer that is not letting go, is a second
        live writer, which must not be overwritten.
        """
        for _attempt in range(3):
            found = self._store._get(self._state_key)
            if found is None:
                return None  # discarded meanwhile
            data, etag = found
            try:
                theirs = UploadState.loads(data)
            except ValueError:  # malformed (UploadState.loads)
                return None
            ours = self._state
            if (
                not theirs.closing
                or theirs.upload_id != ours.upload_id
                or len(theirs.parts) > len(ours.parts)
            ):
                return None
            if any(
                (mine.number, mine.size, mine.etag) != (other.number, other.size, other.etag)
                for mine, other in zip(ours.parts, theirs.parts, strict=False)
            ):
                return None
            saved = self._store._put(self._state_key, ours.dumps(), if_match=etag)
            if saved is not None:
                return saved
        return None

    async def publish(self, *, expected_sha256: str | None = None) -> str:
        """Send the last part, check the SHA-256, complete without overwriting; return the name."""
        self._require_open()
        try:
            if self._buffer or self._next_part == 1:
                await self._queue_part(bytes(self._buffer))
                self._buffer.clear()
            await self._wait_inflight()
        except BaseException:
            await self._settle()
            raise
        actual = self._hash.hexdigest()
        if expected_sha256 is not None and not hmac.compare_digest(
            actual, expected_sha256.strip().lower()
        ):
            await self.discard()
            raise ChecksumMismatch(
                f"{self.name!r}: received bytes hash to {actual}, expected {expected_sha256}"
            )
        await self._store._guard(f"publishing {self.name!r}", self._complete)
        # Published: whatever happens now, the file is there under its name,
        # and saying otherwise would make the receiver discard a partial that
        # no longer exists and tell the sender to send a file it has.
        self._closed = self._finished = True
        with trio.CancelScope(shield=True):
            await self._store._run(self._clean_up_published)
        relative = self._store.location.relative(self._state.key)
        assert relative is not None
        return relative

    def _complete(self) -> None:
        state = self._state
        condition = {} if state.overwrite else {"IfNoneMatch": "*"}
        try:
            self._store.client.complete_multipart_upload(
                Bucket=self._store.bucket,
                Key=state.key,
                UploadId=state.upload_id,
                MultipartUpload={
                    "Parts": [
                        {"PartNumber": p.number, "ETag": p.etag, "ChecksumSHA256": p.sha256_b64}
                        for p in state.parts
                    ]
                },
                **condition,
            )
        except botocore.exceptions.ClientError as exc:
            if not is_precondition(exc):
                raise
            if retried(exc) and self._store._list_parts(state.key, state.upload_id) is None:
                # Refused on a retry, and the upload is gone: an attempt whose
                # answer was lost completed it (nobody else ends an upload
                # being published), so the object there is this file.
                return
            self._remove()
            raise TransferError(
                f"{state.name!r}: {self._store.location.relative(state.key)!r} was created by "
                "another writer while this file was being received; nothing was overwritten",
                "name_collision",
            ) from None

    def _clean_up_published(self) -> None:
        """Release the name and delete the state of the published upload (worker thread).

        A failure is logged, not raised: the file is published. What is left
        is harmless meanwhile (the reservation holds a name whose object
        exists; the state names an upload that is completed, so a resume
        finds no upload and starts over) and the sweeper removes both once
        the state is older than the partials' age limit
        (``S3Store._cleanup``: the abort of a completed upload is a no-op).
        """
        try:
            self._store._release(self._state)
        except S3_ERRORS as exc:
            log.warning(
                "%r is published; its name reservation is left to the sweeper: %s", self.name, exc
            )
        try:
            self._store._delete(self._state_key)
        except S3_ERRORS as exc:
            log.warning(
                "%r is published; its upload state is left to the sweeper: %s", self.name, exc
            )

    def _remove(self) -> None:
        self._store._abort(self._state.key, self._state.upload_id)
        self._store._release(self._state)
        self._store._delete(self._state_key)

    async def close(self) -> None:
        """Finish the part in flight, drop the buffered tail (not durable) and stop.

        Whole parts stay for a resume. The part in flight is recorded as
        ``closing``: a node that resumed meanwhile keeps its state over it.

        Also right after a failed part or a failed publish (a transient S3
        error, for a retry to resume): the state saved names only parts the
        store acknowledged (a part whose upload failed was never added to
        it), so a resume continues after the last stored part and skips no
        byte; a short last part queued by :meth:`publish` is recorded but
        never resumed from (see ``S3Store._verify_parts``).
        """
        self._buffer.clear()
        self._closed = True
        self._state.closing = True
        # A part still in flight may yet change the state in its thread: then
        # nothing is saved (the store is not answering anyway).
        settled = await self._settle()
        if settled and not self._finished and not self._saved_closing:
            # Say so even with no part in flight: a node resuming this partial
            # then need not wait to see whether a writer is still at work.
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_PATIENCE):
                try:
                    await self._store._guard(
                        f"closing {self.name!r}", self._save_closing, abandon_on_cancel=True
                    )
                except TransferError as exc:
                    log.debug("could not mark %r as closing: %s", self.name, exc)

    def _save_closing(self) -> None:
        etag = self._store._put(self._state_key, self._state.dumps(), if_match=self._etag)
        if etag is not None:  # else another writer took over: its state stands
            self._etag, self._saved_closing = etag, True

    async def discard(self) -> None:
        """Abort the multipart upload, release the name, delete the state."""
        if self._finished:
            return
        self._buffer.clear()
        self._closed = self._finished = True
        await self._settle()
        await self._store._guard(f"discarding {self.name!r}", self._remove)


async def _wait_future(future: concurrent.futures.Future[None]) -> None:
    """Wait for a future of the store's executor without holding a thread."""
    if future.done():
        return
    done = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def wake(_future: object) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(done.set)

    future.add_done_callback(wake)
    await done.wait()


# --------------------------------------------------------------------------- reader


class S3Reader:
    """:class:`~conduit.cluster.store.FileReader` over one ranged GET."""

    def __init__(self, store: S3Store, stored: StoredFile, body: Any | None) -> None:
        """Use :meth:`S3Store.open_reader`."""
        self._store = store
        self._stored = stored
        self._body = body

    @property
    def size(self) -> int:
        """Size of the whole file."""
        return self._stored.size

    @property
    def modified_ns(self) -> int:
        """Modification time of the object read."""
        return self._stored.modified_ns

    @property
    def version(self) -> str:
        """The ETag of the object read."""
        return self._stored.version

    async def read(self, max_bytes: int) -> bytes:
        """The next up to ``max_bytes`` bytes; ``b""`` at the end."""
        if self._body is None or max_bytes <= 0:
            return b""
        data: bytes = await self._store._guard(
            f"reading {self._stored.name!r}", self._body.read, max_bytes
        )
        return data

    async def aclose(self) -> None:
        """Close the HTTP response."""
        body, self._body = self._body, None
        if body is not None:
            await _threads.run_sync(body.close)
