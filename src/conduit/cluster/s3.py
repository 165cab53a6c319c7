"""The S3 store: published files are objects, partials are multipart uploads.

Layout under ``s3://BUCKET/PREFIX``:

* ``PREFIX/<name>``: a published file; ``<name>`` is a
  ``safe_relative_name`` (so never hidden).
* ``PREFIX/.conduit/uploads/<id>.json``: the state of one partial, ``<id>``
  derived from (name, transfer id): the object key it will be published as, the
  multipart upload id, and for every stored part its number, size, ETag,
  SHA-256 and the *whole-file* SHA-256 state after it. Any node can resume the
  upload from it. Hidden, so never listed and never reachable by a name.
* ``PREFIX/.conduit/names/<hash of key>``: the reservation of a final key by a
  partial (created with ``If-None-Match: *``), so two conduit uploads never
  aim at one name.

Why the state lives beside the upload: SeaweedFS's ``ListParts`` does not
return part checksums yet ``CompleteMultipartUpload`` requires them, and the
parts of an unfinished upload cannot be read back to re-hash them, so the
whole-file SHA-256 (the guide's ``checksum``; S3's own object checksum is a
composite, not that) is carried forward as a saved hash state
(:mod:`._sha256`). The store needs no bus: a single node on S3 resumes too.
Resuming cross-checks the state with ``ListParts`` (sizes and ETags) and keeps
the longest prefix of parts both agree on.

Writers: every state update is a conditional PUT (``If-Match`` the ETag this
writer last saw), so a second writer of the same partial fails with
``TransferError("busy")`` at its next part instead of silently interleaving;
the cluster's upload lease (:mod:`.bus`) keeps it from starting at all. A part
another writer replaced under the same number no longer matches the ETag in
the state, which ``CompleteMultipartUpload`` and a resume both refuse, so a
race can fail an upload but never publish mixed bytes. Resuming a partial
whose writer let go (marked ``closing``) writes its state back at once
(:meth:`S3Store._claim`), so the node that let go, which may evict it later,
sees it taken over: it evicts only through :meth:`S3Store.discard_partial_if`,
conditional on the state's ETag (``DeleteObject`` with ``If-Match``).

Publishing: the whole-file SHA-256 is checked first, then
``CompleteMultipartUpload`` with ``If-None-Match: *`` (SeaweedFS 4.48 honours
it: 412 ``PreconditionFailed``, tested), so an object that appeared under the
name meanwhile is never overwritten. The collision policy (``name (1).ext``)
chooses the key when the partial is opened, since a multipart upload cannot
change its key: the first candidate with neither an object nor a reservation.
A non-conduit writer that creates the exact key between open and publish makes
the publish fail with ``name_collision`` (nothing is overwritten; the bytes must
be sent again).

Parts are ``part_size`` bytes (default 8 MiB; S3 wants at least 5 MiB except
for the last) and sent with ``ChecksumSHA256``, so the store verifies each one
(``BadDigest`` becomes ``TransferError`` code ``"bad_digest"``). Bytes not yet
making a whole part are buffered in memory and are not durable: a resume
starts at the last whole part.

Why boto3 in worker threads: it is the reference S3 client with the complete
multipart API (per-part checksums, conditional writes), measured here at
86-90 MiB/s through ``trio.to_thread`` with per-part SHA-256. obstore's async
API fails under Trio ("no running event loop") and has no part-level API;
handtruck (httpx + anyio) is Trio-native but very young. The blocking calls are
large (a part, a listing page), so a thread hop per call costs little; the
client is thread-safe and shared, and a capacity limiter bounds the threads.
Measured through this store against ``weed mini`` on this machine at rest:
60-67 MiB/s upload (SHA-256 per part, the running whole-file hash and a state
write per 8 MiB part, one part in flight) where bare ``upload_part`` calls
without checksums reach 130-140 MiB/s; reading back is not the bottleneck.
"""

from __future__ import annotations

import concurrent.futures
import copy
import functools
import hashlib
import hmac
import itertools
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import botocore.config  # type: ignore[import-untyped]
import botocore.exceptions  # type: ignore[import-untyped]
import trio

from .. import _threads
from ..errors import ChecksumMismatch, TransferError, UnsafePathError
from ..transfer._names import (
    check_transfer_id,
    collision_candidates,
    safe_relative_name,
    split_name,
)
from ._s3_partial import S3Partial, S3Reader
from ._s3_wire import (
    CONTROL,
    DEFAULT_PART_SIZE,
    LIST_PAGE,
    MAX_PARTS,
    MIN_PART_SIZE,
    S3_ERRORS,
    SUFFIX_ROOM,
    Part,
    UploadState,
    b64_sha256,
    error_code,
    is_missing,
    is_precondition,
    is_write_conflict,
    make_s3_client,
    retried,
    short_digest,
    storage_error,
)
from .location import MAX_KEY_BYTES, S3Location, parse_s3_url
from .store import StoredFile

__all__ = [
    "DEFAULT_PART_SIZE",
    "MIN_PART_SIZE",
    "S3Partial",
    "S3Reader",
    "S3Store",
    "make_s3_client",
]

T = TypeVar("T")

#: The name of a staging partial's state is this and its token (never a file name: hidden).
_STAGING_NAME = ".staging/"
#: Seconds a resume waits at most for another writer of the partial to let go.
WRITER_WAIT = 5.0
#: Seconds without a change of the partial's state after which its writer is taken for dead.
WRITER_QUIET = 1.5
#: Seconds between two looks at the state while waiting.
WRITER_POLL = 0.2
#: The largest object one ``CopyObject`` copies (AWS S3's limit): a rename of a
#: larger file copies it in parts (``UploadPartCopy``).
MAX_COPY_OBJECT = 5 * 1024**3
#: The size of each part of such a copy: S3's largest object (5 TiB) in 5,120
#: parts, within its 10,000.
COPY_PART_SIZE = 1024**3

log = logging.getLogger("conduit.cluster.s3")


# --------------------------------------------------------------------------- store


class S3Store:
    """:class:`~conduit.cluster.store.Store` on an S3-compatible object store.

    ``location`` is ``"s3://BUCKET/PREFIX"`` or an :class:`S3Location`;
    ``client`` a boto3 S3 client (default: :func:`make_s3_client`, from the
    AWS environment). Safe to share between tasks; one :class:`S3Partial` is
    driven by one task.
    """

    def __init__(
        self,
        location: S3Location | str,
        *,
        client: Any | None = None,
        part_size: int = DEFAULT_PART_SIZE,
        max_threads: int = 8,
    ) -> None:
        """Configure; nothing is contacted until the first operation."""
        if part_size < MIN_PART_SIZE or part_size % (1024 * 1024):
            raise ValueError("part_size must be a whole number of MiB, at least 5 MiB")
        self.location = parse_s3_url(location) if isinstance(location, str) else location
        self.client = make_s3_client() if client is None else client
        self.part_size = part_size
        self._limiter = trio.CapacityLimiter(max_threads)
        # Background part uploads (one per partial at a time); threads start on demand.
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_threads, thread_name_prefix="conduit-s3"
        )

    # ----------------------------------------------------------------- plumbing

    @property
    def bucket(self) -> str:
        """The bucket."""
        return self.location.bucket

    async def _run(self, function: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        return await _threads.run_sync(
            functools.partial(function, *args, **kwargs), limiter=self._limiter
        )

    def _control_key(self, *parts: str) -> str:
        return self.location.key("/".join((CONTROL, *parts)))

    def _state_key(self, name: str, transfer_id: str) -> str:
        return self._control_key("uploads", short_digest(f"{name}\0{transfer_id}") + ".json")

    def _reservation_key(self, key: str) -> str:
        return self._control_key("names", short_digest(key))

    def _checked_name(self, name: str) -> str:
        safe = safe_relative_name(name)
        if len(self.location.key(safe).encode("utf-8")) + SUFFIX_ROOM > MAX_KEY_BYTES:
            raise UnsafePathError(
                f"unsafe file name: {len(safe.encode('utf-8'))} bytes is too long for "
                f"an S3 key under {self.location.url()!r} (keys are at most {MAX_KEY_BYTES} bytes)"
            )
        return safe

    def location_of(self, name: str) -> str:
        """See :meth:`conduit.cluster.store.Store.location_of`: ``s3://bucket/prefix/name``."""
        return self.location.url(self._checked_name(name))

    def child(self, prefix: str) -> S3Store:
        """The same bucket below ``PREFIX/prefix``, e.g. one user's root.

        Shares this store's client, threads and background uploader (close
        only the parent). ``prefix`` is checked as :func:`parse_s3_url` checks one.
        """
        child = copy.copy(self)
        child.location = parse_s3_url(self.location.url(prefix))
        return child

    def close(self) -> None:
        """Stop the background uploader once its parts are sent (call at shutdown).

        Partials still open then fail at their next part; the client is the
        caller's if it was passed in, so it is left open.
        """
        self._executor.shutdown(wait=False)

    # ----------------------------------------------------------------- S3 calls

    def _get(self, key: str) -> tuple[bytes, str] | None:
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=key)
        except botocore.exceptions.ClientError as exc:
            if is_missing(exc):
                return None
            raise
        with answer["Body"] as body:
            return body.read(), str(answer["ETag"])

    def _put(self, key: str, data: bytes, *, if_match: str | None) -> str | None:
        """Conditional PUT: create-only (``if_match=None``) or replace that ETag only.

        Returns the new ETag, or None if the precondition failed.
        """
        condition = {"IfNoneMatch": "*"} if if_match is None else {"IfMatch": if_match}
        try:
            answer = self.client.put_object(Bucket=self.bucket, Key=key, Body=data, **condition)
        except botocore.exceptions.ClientError as exc:
            if not is_precondition(exc):
                raise
            # Perhaps written by an attempt whose answer was lost: ours if it
            # holds what we wrote (a state holds its time of writing).
            return self._etag_if_holding(key, data) if retried(exc) else None
        return str(answer["ETag"])

    def _etag_if_holding(self, key: str, data: bytes) -> str | None:
        """The ETag of the object at ``key`` if it holds exactly ``data`` (None: it does not)."""
        found = self._get(key)
        return found[1] if found is not None and found[0] == data else None

    def _delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=key)

    def _head(self, key: str) -> dict[str, Any] | None:
        try:
            answer: dict[str, Any] = self.client.head_object(Bucket=self.bucket, Key=key)
        except botocore.exceptions.ClientError as exc:
            if is_missing(exc):
                return None
            raise
        return answer

    def _abort(self, key: str, upload_id: str) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except botocore.exceptions.ClientError as exc:
            if error_code(exc) != "NoSuchUpload" and not is_missing(exc):
                raise

    def _list_parts(self, key: str, upload_id: str) -> dict[int, set[tuple[int, str]]] | None:
        """Stored parts as {number: {(size, etag), ...}}, or None if the upload is gone.

        A set per number: SeaweedFS keeps every upload of a part number (AWS
        keeps the last) and completes with the one whose ETag is named.
        """
        parts: dict[int, set[tuple[int, str]]] = {}
        try:
            for page in self._part_pages(key, upload_id):
                for part in page:
                    entry = (int(part["Size"]), str(part["ETag"]))
                    parts.setdefault(int(part["PartNumber"]), set()).add(entry)
        except _UploadGone:
            return None
        return parts

    def _written_since(self, upload: dict[str, Any], cutoff: float) -> bool:
        """Whether ``upload`` (an entry of ``list_multipart_uploads``) was
        created or had a part stored at ``cutoff`` or later.

        What tells a live upload from an abandoned one whose state nobody
        here knows of: an upload's creation says nothing of a long upload,
        or of one resumed after a pause, still written to (the state of a
        user's upload lives in that user's store, and a staging upload's in
        the sending node's). Looked at only for uploads created before the
        cutoff; one gone meanwhile counts as not written.
        """
        if upload["Initiated"].timestamp() >= cutoff:
            return True
        pages = self._part_pages(str(upload["Key"]), str(upload["UploadId"]))
        try:
            return any(
                part["LastModified"].timestamp() >= cutoff for page in pages for part in page
            )
        except _UploadGone:
            return False

    def _part_pages(self, key: str, upload_id: str) -> Iterator[list[dict[str, Any]]]:
        """The stored parts of an upload, a page of ``list_parts`` at a time;
        raises :class:`_UploadGone` if the upload is gone."""
        marker = 0
        for _page in range(MAX_PARTS // LIST_PAGE + 1):
            try:
                answer = self.client.list_parts(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumberMarker=marker
                )
            except botocore.exceptions.ClientError as exc:
                if error_code(exc) == "NoSuchUpload" or is_missing(exc):
                    raise _UploadGone from None
                raise
            yield answer.get("Parts", [])
            if not answer.get("IsTruncated"):
                return
            marker = int(answer["NextPartNumberMarker"])

    def _list_keys(self, prefix: str, after: str | None = None) -> Iterator[dict[str, Any]]:
        """The keys below ``prefix``, in the store's order; with ``after`` (a key),
        only those that come after it there (``StartAfter``: the store skips
        the rest itself)."""
        paginator = self.client.get_paginator("list_objects_v2")
        starting = {} if after is None else {"StartAfter": after}
        for page in paginator.paginate(
            Bucket=self.bucket,
            Prefix=prefix,
            PaginationConfig={"PageSize": LIST_PAGE},
            **starting,
        ):
            yield from page.get("Contents", [])

    # ----------------------------------------------------------------- partials (sync)

    def _load_state(self, name: str, transfer_id: str) -> tuple[UploadState | None, str] | None:
        """(state, its ETag); (None, ETag) if the object is unreadable; None if absent."""
        found = self._get(self._state_key(name, transfer_id))
        if found is None:
            return None
        data, etag = found
        try:
            state = UploadState.loads(data)
        except ValueError:  # malformed (UploadState.loads)
            return None, etag
        if state.name != name or state.transfer_id != transfer_id or not self._own(state):
            return None, etag
        return state, etag

    def _own(self, state: UploadState) -> bool:
        """Whether ``state`` names only keys this store would have chosen for its name.

        Checked before anything a state names is aborted or deleted: a state
        object is data in the bucket, and one written by anyone else (a
        forged file where control keys live) must not steer the sweeper to
        another user's objects.

        A staging state (:meth:`open_staging`) is recognised by its exact
        layout: name ``.staging/<token>``, transfer id ``<token>``, key the
        staging key of that token, no reservation. A state of that name
        naming any other key is still refused.
        """
        if state.name.startswith(_STAGING_NAME):
            token = state.name[len(_STAGING_NAME) :]
            return (
                _is_token(token)
                and state.transfer_id == token
                and state.key == self._staging_key(token)
                and state.reservation is None
            )
        relative = self.location.relative(state.key)
        if relative is None or split_name(relative)[0] != split_name(state.name)[0]:
            return False
        try:
            if safe_relative_name(relative) != relative:
                return False
        except UnsafePathError:
            return False
        return state.reservation in (None, self._reservation_key(state.key))

    def _taken_in(self, directories: tuple[str, ...]) -> Callable[[str], bool]:
        """Whether a name in ``directories`` is taken: an object or a reservation (two HEADs).

        Leads :func:`collision_candidates`' search past its first numbers, so a
        crowded name costs a few dozen requests, not thousands.
        """

        def taken(basename: str) -> bool:
            key = self.location.key("/".join((*directories, basename)))
            return self._head(key) is not None or self._head(self._reservation_key(key)) is not None

        return taken

    def _reserve(self, name: str, owner: str, overwrite: bool) -> tuple[str, str | None]:
        """Choose the final key for ``name``; return (key, reservation key or None)."""
        directories, basename = split_name(name)
        if overwrite:
            return self.location.key(name), None
        candidates = itertools.chain(
            [basename], collision_candidates(basename, self._taken_in(directories))
        )
        for candidate in candidates:
            key = self.location.key("/".join((*directories, candidate)))
            if self._head(key) is not None:
                continue
            reservation = self._reservation_key(key)
            if self._put(reservation, owner.encode(), if_match=None) is None:
                held = self._get(reservation)
                if held is None or held[0] != owner.encode():
                    continue  # another upload aims at this name
                # else: ours, left by an attempt that crashed before saving its state
            # A publisher completes its object before it releases the name, so
            # an object that appeared before our reservation is visible now.
            if self._head(key) is not None:
                self._delete(reservation)
                continue
            return key, reservation
        raise TransferError(f"no free name for {basename!r}", "name_collision")

    def _release(self, state: UploadState) -> None:
        if state.reservation is not None:
            self._delete(state.reservation)

    def _open(self, name: str, transfer_id: str, resume: bool, overwrite: bool) -> S3Partial:
        safe = self._checked_name(name)
        tid = check_transfer_id(transfer_id)
        state_key = self._state_key(safe, tid)
        loaded = self._load_state(safe, tid)
        if loaded is not None and loaded[0] is None:
            # Unreadable (not ours, or truncated): nothing to resume; start afresh.
            self._delete(state_key)
            loaded = None
        if loaded is not None:
            state, etag = loaded
            assert state is not None
            if resume:
                verified = self._verify_parts(state)
                if verified is not None:
                    claimed = self._claim(state, state_key, etag)
                    if claimed is not None:
                        return claimed
                    # Gone since we read it: the node that let go of it evicted it.
                    loaded = None
        if loaded is not None:
            state, etag = loaded
            assert state is not None
            # Restart (asked for, or the upload is gone): same key, new upload.
            self._abort(state.key, state.upload_id)
            state.parts = []
            state.upload_id = self._create_upload(state.key)
            new_etag = self._put(state_key, state.dumps(), if_match=etag)
            if new_etag is None:
                self._abort(state.key, state.upload_id)
                raise TransferError(f"{safe!r} is already being received", "busy")
            return S3Partial(self, state, state_key, new_etag)
        owner = short_digest(f"{safe}\0{tid}")
        key, reservation = self._reserve(safe, owner, overwrite)
        try:
            upload_id = self._create_upload(key)
        except BaseException:
            if reservation is not None:  # no state will ever name it: release it now
                self._delete(reservation)
            raise
        state = UploadState(
            name=safe,
            transfer_id=tid,
            key=key,
            upload_id=upload_id,
            part_size=self.part_size,
            overwrite=overwrite,
            reservation=reservation,
        )
        created = self._put(state_key, state.dumps(), if_match=None)
        if created is None:  # another node opened the same partial at the same moment
            self._abort(key, upload_id)
            raise TransferError(f"{safe!r} is already being received", "busy")
        return S3Partial(self, state, state_key, created)

    def _claim(self, state: UploadState, state_key: str, etag: str) -> S3Partial | None:
        """Resume ``state`` (read with ``etag``); None if its state was deleted meanwhile.

        A state its last writer marked ``closing`` (it let go: its client was
        cut off) is written back at once, unmarked, before any part is sent:
        the node that let go indexed the partial as abandoned under the ETag
        it saw, and may evict it later (``discard_partial_if``), which it does
        only while the state still has that ETag. Without this write, a
        resume that has not yet stored a part would leave the ETag unchanged
        and could have its upload aborted under it. A state not marked
        ``closing`` is resumed as it is: its writer may still be recording the
        part it had in flight, which :meth:`S3Partial._merge_late_writer` then
        keeps (a write here would make that writer's record fail instead).
        """
        if not state.closing:
            return S3Partial(self, state, state_key, etag)
        state.closing = False
        claimed = self._put(state_key, state.dumps(), if_match=etag)
        if claimed is not None:
            return S3Partial(self, state, state_key, claimed)
        if self._get(state_key) is None:
            return None
        raise TransferError(f"{state.name!r} is already being received", "busy")

    def _create_upload(self, key: str) -> str:
        answer = self.client.create_multipart_upload(
            Bucket=self.bucket, Key=key, ChecksumAlgorithm="SHA256"
        )
        return str(answer["UploadId"])

    def _verify_parts(self, state: UploadState) -> UploadState | None:
        """Keep the longest prefix of parts the store agrees with; None if the upload is gone."""
        stored = self._list_parts(state.key, state.upload_id)
        if stored is None:
            return None
        kept: list[Part] = []
        for number, part in enumerate(state.parts, start=1):
            if part.number != number or (part.size, part.etag) not in stored.get(number, ()):
                break
            if part.size != state.part_size or not part.hash_state:
                break  # a short last part (publish was cut): resent with what follows
            kept.append(part)
        state.parts = kept
        return state

    def _discard(self, name: str, transfer_id: str, version: str | None = None) -> bool:
        safe = self._checked_name(name)
        tid = check_transfer_id(transfer_id)
        state_key = self._state_key(safe, tid)
        loaded = self._load_state(safe, tid)
        if loaded is None:
            return False
        state, etag = loaded
        if version is not None:
            # Only the partial as the caller saw it: a state written since
            # (another node resumed it: see _claim) is a live upload. The
            # state is deleted first and only if it still has that ETag, so
            # a node claiming it between this read and the delete makes the
            # delete fail (412) rather than lose its upload; once the state
            # is gone, no node can resume this upload any more, so aborting
            # it hits nobody. (A resume that starts afresh right then reuses
            # the name's reservation, which the release below may remove:
            # that upload then publishes unreserved, still never over
            # another file.)
            if etag != version or not self._delete_if_match(state_key, etag):
                return False
            if state is not None:
                self._abort(state.key, state.upload_id)
                self._release(state)
            return True
        if state is not None:
            self._abort(state.key, state.upload_id)
            self._release(state)
        self._delete(state_key)
        return True

    def _delete_if_match(self, key: str, etag: str) -> bool:
        """Delete ``key`` only while it is the object of ``etag``; whether it was deleted.

        ``DeleteObject`` with ``If-Match`` (SeaweedFS honours it, tested; AWS
        S3 too). A store that ignores the header deletes unconditionally: the
        check of the ETag just before is then the only guard.
        """
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key, IfMatch=etag)
        except botocore.exceptions.ClientError as exc:
            if is_precondition(exc) or is_missing(exc):
                return False
            raise
        return True

    def _partial_version(self, name: str, transfer_id: str) -> tuple[int, str] | None:
        loaded = self._load_state(self._checked_name(name), check_transfer_id(transfer_id))
        if loaded is None or loaded[0] is None:
            return None
        return loaded[0].durable, loaded[1]

    def _cleanup(self, max_age_seconds: float) -> int:
        cutoff = time.time() - max_age_seconds
        removed = 0
        live_uploads: set[str] = set()
        live_reservations: set[str] = set()
        for entry in self._list_keys(self._control_key("uploads") + "/"):
            found = self._get(str(entry["Key"]))
            if found is None:
                continue
            try:
                state = UploadState.loads(found[0])
            except ValueError:  # malformed (UploadState.loads)
                continue
            if not self._own(state):
                log.warning("ignoring upload state %s: it names keys not its own", entry["Key"])
                continue
            if entry["LastModified"].timestamp() >= cutoff:
                live_uploads.add(state.upload_id)
                if state.reservation is not None:
                    live_reservations.add(state.reservation)
                continue
            # Also the state a publish left behind when its clean-up failed
            # (S3Partial.publish): its upload is completed, so the abort
            # finds none (NoSuchUpload, ignored) and the published object
            # stays; the reservation and the state go.
            self._abort(state.key, state.upload_id)
            self._release(state)
            self._delete(str(entry["Key"]))
            if not state.name.startswith(_STAGING_NAME):  # staged files are not counted
                removed += 1
        # Staged files nobody collected (the node that was to read them died).
        for entry in self._list_keys(self._control_key("staging") + "/"):
            if entry["LastModified"].timestamp() < cutoff:
                self._delete(str(entry["Key"]))
        # Names reserved by an upload whose state was never written or is gone
        # (a node died between the two, or a store error): left, they would
        # keep the name from everyone for good.
        for entry in self._list_keys(self._control_key("names") + "/"):
            key = str(entry["Key"])
            if entry["LastModified"].timestamp() < cutoff and key not in live_reservations:
                self._delete(key)
        # Uploads whose state was never written (a crash right after creating
        # them). Those of the stores below this one (users' roots, under
        # accounts) have their states there: not written to for as long as
        # the cutoff, they are abandoned too.
        paginator = self.client.get_paginator("list_multipart_uploads")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.location.list_prefix):
            for upload in page.get("Uploads", []):
                if upload["UploadId"] in live_uploads:
                    continue
                if not self._written_since(upload, cutoff):
                    self._abort(str(upload["Key"]), str(upload["UploadId"]))
        return removed

    # ----------------------------------------------------------------- published (sync)

    def _list(self, max_entries: int, below: str, after: str | None) -> list[StoredFile]:
        entries: list[StoredFile] = []
        start = None if after is None else self.location.key(after)
        for entry in self._list_keys(below, start):
            if len(entries) >= max_entries:
                break
            relative = self.location.relative(str(entry["Key"]))
            if relative is None or not _listable(relative):
                continue
            modified = entry["LastModified"].timestamp()
            entries.append(
                StoredFile(
                    relative, int(entry["Size"]), int(modified * 1e9), str(entry.get("ETag", ""))
                )
            )
        return entries  # in the store's order: the order its StartAfter goes on in

    def _used_bytes(self) -> int:
        total = 0
        for entry in self._list_keys(self.location.list_prefix):
            relative = self.location.relative(str(entry["Key"]))
            if relative is not None and _listable(relative):  # what list_files shows
                total += int(entry["Size"])
        return total

    def _stat(self, name: str) -> tuple[StoredFile, str]:
        safe = self._checked_name(name)
        info = self._head(self.location.key(safe))
        if info is None:
            raise FileNotFoundError(2, "no such file in storage", safe)
        modified = int(info["LastModified"].timestamp() * 1e9)
        etag = str(info["ETag"])
        return StoredFile(safe, int(info["ContentLength"]), modified, etag), etag

    def _open_reader(self, name: str, start: int) -> S3Reader:
        stored, etag = self._stat(name)
        return self._read_key(self.location.key(stored.name), stored, etag, start)

    def _read_key(self, key: str, stored: StoredFile, etag: str, start: int) -> S3Reader:
        if not 0 <= start <= stored.size:
            raise ValueError(f"start {start} is outside the file ({stored.size} bytes)")
        body = None
        if start < stored.size:
            # If-Match: a file replaced since the HEAD is an error, not a mix of two files.
            answer = self.client.get_object(
                Bucket=self.bucket,
                Key=key,
                Range=f"bytes={start}-{stored.size - 1}",
                IfMatch=etag,
            )
            body = answer["Body"]
        return S3Reader(self, stored, body)

    # ----------------------------------------------------------------- staging (sync)

    def _staging_key(self, token: str) -> str:
        return self._control_key("staging", check_transfer_id(token))

    def _open_staging(self, token: str) -> S3Partial:
        key = self._staging_key(token)
        # A name no published file can have, so its state never meets a real upload's.
        name = _STAGING_NAME + token
        state_key = self._state_key(name, token)
        self._discard_state(state_key)  # a staging upload restarts, it never resumes
        state = UploadState(
            name=name,
            transfer_id=token,
            key=key,
            upload_id=self._create_upload(key),
            part_size=self.part_size,
            overwrite=True,
            reservation=None,
        )
        created = self._put(state_key, state.dumps(), if_match=None)
        if created is None:
            self._abort(key, state.upload_id)
            raise TransferError(f"staging {token!r} is already being written", "busy")
        return S3Partial(self, state, state_key, created)

    def _discard_state(self, state_key: str) -> None:
        found = self._get(state_key)
        if found is None:
            return
        try:
            state = UploadState.loads(found[0])
        except ValueError:  # malformed (UploadState.loads)
            pass
        else:
            self._abort(state.key, state.upload_id)
        self._delete(state_key)

    def _open_staged(self, token: str, start: int) -> S3Reader:
        key = self._staging_key(token)
        info = self._head(key)
        if info is None:
            raise FileNotFoundError(2, "no such staged file", token)
        modified = int(info["LastModified"].timestamp() * 1e9)
        stored = StoredFile(token, int(info["ContentLength"]), modified)
        return self._read_key(key, stored, str(info["ETag"]), start)

    def _delete_staged(self, token: str) -> bool:
        key = self._staging_key(token)
        self._discard_state(self._state_key(_STAGING_NAME + token, token))
        if self._head(key) is None:
            return False
        self._delete(key)
        return True

    def _cleanup_staging(self, max_age_seconds: float) -> int:
        cutoff = time.time() - max_age_seconds
        prefix = self._control_key("staging") + "/"
        removed = 0
        for entry in self._list_keys(prefix):
            token = str(entry["Key"])[len(prefix) :]
            if entry["LastModified"].timestamp() < cutoff and _is_token(token):
                removed += self._delete_staged(token)
        # Staging uploads never completed (the sending node died while staging).
        paginator = self.client.get_paginator("list_multipart_uploads")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            for upload in page.get("Uploads", []):
                token = str(upload["Key"])[len(prefix) :]
                if _is_token(token) and not self._written_since(upload, cutoff):
                    self._abort(str(upload["Key"]), str(upload["UploadId"]))
                    self._delete(self._state_key(_STAGING_NAME + token, token))
                    removed += 1
        return removed

    def _delete_file(self, name: str) -> bool:
        safe = self._checked_name(name)
        key = self.location.key(safe)
        if self._head(key) is None:
            return False
        self._delete(key)
        return True

    def _rename(self, name: str, new_name: str, overwrite: bool) -> str:
        safe = self._checked_name(name)
        target = self._checked_name(new_name)
        source = self.location.key(safe)
        found = self._head(source)
        if found is None:
            raise FileNotFoundError(2, "no such file in storage", safe)
        etag = str(found["ETag"])
        directories, basename = split_name(target)
        if overwrite:
            if self._head(self._reservation_key(self.location.key(target))) is not None:
                raise TransferError(f"{target!r} is being written; try again later", "busy")
            candidates: Iterator[str] = iter([basename])
        else:
            taken = self._taken_in(directories)
            candidates = itertools.chain([basename], collision_candidates(basename, taken))
        condition = {} if overwrite else {"IfNoneMatch": "*"}
        for candidate in candidates:
            final = "/".join((*directories, candidate))
            key = self.location.key(final)
            if final == safe:
                # The source's own name, among the numbered ones: taken (and
                # S3 refuses a copy onto itself).
                continue
            if not overwrite and self._head(self._reservation_key(key)) is not None:
                continue  # an upload in progress will publish under this name
            # A copy in parts learns that the name is taken only at its
            # completion, after copying it all: look first.
            if (
                not overwrite
                and int(found["ContentLength"]) > MAX_COPY_OBJECT
                and self._head(key) is not None
            ):
                continue
            try:
                self._copy(source, found, key, condition)
            except botocore.exceptions.ClientError as exc:
                # A racing write (409) is taken as a taken name too: the next
                # free one is used, never an overwrite.
                if not (is_precondition(exc) or is_write_conflict(exc)):
                    raise
                if not self._copied_by_a_lost_attempt(exc, key, etag):
                    if self._source_changed(source, etag):
                        raise TransferError(
                            f"{safe!r} changed during the rename; try again", "busy"
                        ) from None
                    continue  # the target name is taken
            # Remove the source only if it is still what was copied: a file
            # written there meanwhile stays (the copy is then a second name for
            # the old bytes, not the loss of the new ones). S3 has no
            # conditional delete everywhere: a write between this look and the
            # delete is the window left.
            if not self._source_changed(source, etag):
                self._delete(source)
            return final
        raise TransferError(f"no free name for {basename!r}", "name_collision")

    def _copied_by_a_lost_attempt(
        self, exc: botocore.exceptions.ClientError, key: str, etag: str
    ) -> bool:
        """Whether a copy to ``key`` refused on a retry was made by an earlier
        attempt, whose answer was lost: the object there has the source's ETag.

        A copy keeps the ETag on SeaweedFS (measured), and an object stored
        in one PUT has its content's MD5 as its ETag on most stores, its copy
        too; a store that gives a copy a new one (AWS S3, for an object stored
        in parts) makes such a lost answer still leave the file under a
        second name.
        """
        if not (retried(exc) and is_precondition(exc)):
            return False
        now = self._head(key)
        return now is not None and str(now["ETag"]) == etag

    def _copy(
        self, source: str, found: Mapping[str, Any], key: str, condition: dict[str, str]
    ) -> None:
        """Copy the object at ``source``, as ``found`` by its HEAD, to ``key`` (server side).

        Only that object, not one written over it since (``CopySourceIfMatch``
        its ETag), and under ``condition`` at the target. One ``CopyObject`` up
        to :data:`MAX_COPY_OBJECT`; a larger object goes part by part
        (``UploadPartCopy`` of :data:`COPY_PART_SIZE` ranges, each with the same
        source condition) into a multipart upload completed under ``condition``,
        and aborted if any step fails. A precondition that fails is raised as
        the ``ClientError`` it is, either way.
        """
        copy_source = {"Bucket": self.bucket, "Key": source}
        etag = str(found["ETag"])
        size = int(found["ContentLength"])
        if size <= MAX_COPY_OBJECT:
            self.client.copy_object(
                Bucket=self.bucket,
                Key=key,
                CopySource=copy_source,
                CopySourceIfMatch=etag,
                **condition,
            )
            return
        # CopyObject keeps the object's type and user metadata: so does this.
        described = {
            field: found[field] for field in ("ContentType", "Metadata") if found.get(field)
        }
        upload_id = str(
            self.client.create_multipart_upload(Bucket=self.bucket, Key=key, **described)[
                "UploadId"
            ]
        )
        try:
            parts = []
            for number, start in enumerate(range(0, size, COPY_PART_SIZE), start=1):
                end = min(start + COPY_PART_SIZE, size) - 1
                answer = self.client.upload_part_copy(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    CopySource=copy_source,
                    CopySourceRange=f"bytes={start}-{end}",
                    CopySourceIfMatch=etag,
                )
                parts.append({"PartNumber": number, "ETag": answer["CopyPartResult"]["ETag"]})
            self.client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
                **condition,
            )
        except BaseException:
            # The error to report is this one; an abort that fails too leaves an
            # incomplete upload for the bucket's lifecycle rule (docs/cluster.md).
            try:
                self._abort(key, upload_id)
            except Exception:
                log.warning("could not abort the copy to %r", key, exc_info=True)
            raise

    def _source_changed(self, source: str, etag: str) -> bool:
        """Whether the object at ``source`` is gone or no longer the one of ``etag``."""
        now = self._head(source)
        return now is None or str(now["ETag"]) != etag

    # ----------------------------------------------------------------- Store protocol

    async def open_partial(
        self, name: str, transfer_id: str, *, resume: bool, overwrite: bool = False
    ) -> S3Partial:
        """See :meth:`conduit.cluster.store.Store.open_partial`.

        A resume first lets a writer that may still be at work (another
        node whose client was just cut off, finishing the part it had in
        flight) finish: see :meth:`_wait_for_writer`.
        """
        if resume:
            await self._wait_for_writer(name, transfer_id)
        return await self._guard(
            f"opening {name!r}", self._open, name, transfer_id, resume, overwrite
        )

    async def _wait_for_writer(self, name: str, transfer_id: str) -> None:
        """Wait, bounded, until the partial's state says its writer let go or goes quiet.

        A writer that closes marks the state ``closing`` (after storing the
        part it had in flight), so resuming after that loses nothing. A state
        without the mark was written by a writer that is still at work, or
        was killed: wait until the mark appears, or the state has not changed
        for :data:`WRITER_QUIET` seconds (a dead writer), at most
        :data:`WRITER_WAIT` seconds in all (a live one: the resume then goes
        ahead, and one of the two writers gets ``busy``).
        """
        safe = self._checked_name(name)
        tid = check_transfer_id(transfer_id)
        deadline = trio.current_time() + WRITER_WAIT
        last_etag = None
        quiet_since = trio.current_time()
        while True:
            loaded = await self._guard(f"looking up {safe!r}", self._load_state, safe, tid)
            if loaded is None or loaded[0] is None or loaded[0].closing:
                return
            now = trio.current_time()
            if loaded[1] != last_etag:
                last_etag, quiet_since = loaded[1], now
            if now - quiet_since >= WRITER_QUIET or now >= deadline:
                return
            await trio.sleep(WRITER_POLL)

    async def put_file(
        self, name: str, data: bytes, *, sha256: str, overwrite: bool = False
    ) -> str:
        """See :meth:`conduit.cluster.store.Store.put_file`: one ``PUT`` (no multipart upload).

        Checked against ``sha256`` here and by the store (``ChecksumSHA256``);
        without ``overwrite``, conditional (``If-None-Match: *``) on the first
        candidate name that no upload has reserved, the next one on a clash.
        """
        actual = hashlib.sha256(data).hexdigest()
        if not hmac.compare_digest(actual, sha256.strip().lower()):
            raise ChecksumMismatch(f"{name!r}: received bytes hash to {actual}, expected {sha256}")
        return await self._guard(f"storing {name!r}", self._put_file, name, data, overwrite)

    def _put_file(self, name: str, data: bytes, overwrite: bool) -> str:
        safe = self._checked_name(name)
        checksum = b64_sha256(data)
        if overwrite:
            self.client.put_object(
                Bucket=self.bucket, Key=self.location.key(safe), Body=data, ChecksumSHA256=checksum
            )
            return safe
        directories, basename = split_name(safe)
        taken = self._taken_in(directories)
        for candidate in itertools.chain([basename], collision_candidates(basename, taken)):
            final = "/".join((*directories, candidate))
            key = self.location.key(final)
            if self._head(self._reservation_key(key)) is not None:
                continue  # an upload in progress will publish under this name
            try:
                self.client.put_object(
                    Bucket=self.bucket,
                    Key=key,
                    Body=data,
                    ChecksumSHA256=checksum,
                    IfNoneMatch="*",
                )
            except botocore.exceptions.ClientError as exc:
                if not is_precondition(exc):
                    raise
                # Refused on a retry: our first attempt may have stored it,
                # its answer lost; then it is ours (else the file would be
                # stored twice, here and under the next name).
                if retried(exc) and self._etag_if_holding(key, data) is not None:
                    return final
                continue
            return final
        raise TransferError(f"no free name for {basename!r}", "name_collision")

    async def find_partial(self, name: str, transfer_id: str) -> int | None:
        """See :meth:`conduit.cluster.store.Store.find_partial` (from the saved state)."""
        safe = self._checked_name(name)
        tid = check_transfer_id(transfer_id)
        loaded = await self._guard(f"looking up {safe!r}", self._load_state, safe, tid)
        state = None if loaded is None else loaded[0]
        return None if state is None else state.durable

    async def discard_partial(self, name: str, transfer_id: str) -> bool:
        """See :meth:`conduit.cluster.store.Store.discard_partial`."""
        return await self._guard(f"discarding {name!r}", self._discard, name, transfer_id)

    async def partial_version(self, name: str, transfer_id: str) -> tuple[int, str] | None:
        """The partial's durable size and the version (ETag) of its state; None if none.

        What :meth:`discard_partial_if` compares with: the version changes
        whenever any node writes the state (stores a part, resumes, lets go).
        """
        safe = self._checked_name(name)
        return await self._guard(f"looking up {safe!r}", self._partial_version, safe, transfer_id)

    async def discard_partial_if(self, name: str, transfer_id: str, version: str) -> bool:
        """Discard the partial only if its state is still at ``version``; whether it was.

        For a node evicting a partial it let go of earlier: if another node
        has resumed it since, its state was written (another version) and it
        is left alone. Conditional in the store too (``If-Match``), so a
        resume that races with the eviction is never aborted.
        """
        return await self._guard(f"discarding {name!r}", self._discard, name, transfer_id, version)

    async def check_can_accept(
        self, size: int, max_file_size: int | None = None, *, offset: int = 0
    ) -> None:
        """See :meth:`conduit.cluster.store.Store.check_can_accept` (no free-space limit)."""
        if size < 0 or not 0 <= offset <= size:
            raise TransferError(f"invalid size {size} (offset {offset})", "invalid_size")
        if max_file_size is not None and size > max_file_size:
            raise TransferError(
                f"file of {size} bytes exceeds the limit of {max_file_size} bytes", "too_large"
            )
        if size > self.part_size * MAX_PARTS:
            raise TransferError(
                f"file of {size} bytes exceeds {MAX_PARTS} parts of {self.part_size} bytes",
                "too_large",
            )

    async def list_files(
        self, *, max_entries: int = 100_000, prefix: str | None = None, after: str | None = None
    ) -> list[StoredFile]:
        """See :meth:`conduit.cluster.store.Store.list_files` (keys below ``prefix/``).

        The first ``max_entries`` keys in the store's own order, and with
        ``after``, the first that come after its key there (``StartAfter``):
        S3 lists keys in the order of their bytes, which is the names' order,
        but a store may not (SeaweedFS lists ``a/b`` before ``a-z.txt``), and
        going on in the store's own order is what reads only the keys a page
        needs. (Reading every key below to find the first by name made each
        listing, and each ``is_directory`` probe, cost the whole prefix: 75 ms
        per 1,000 keys, a review measured.)
        """
        if max_entries < 0:
            raise ValueError("max_entries must not be negative")
        below = self.location.list_prefix
        if prefix is not None:
            below = self.location.key(self._checked_name(prefix)) + "/"
        if after is not None:
            # Not _checked_name: a key another tool wrote may use the room
            # that one keeps for our suffixes, and be a page's last.
            after = safe_relative_name(after)
        return await self._guard("listing", self._list, max_entries, below, after)

    async def used_bytes(self) -> int:
        """See :meth:`conduit.cluster.store.Store.used_bytes` (one listing, summed as it pages)."""
        return await self._guard("counting the stored bytes", self._used_bytes)

    async def stat(self, name: str) -> StoredFile:
        """See :meth:`conduit.cluster.store.Store.stat`."""
        stored, _etag = await self._guard(f"reading {name!r}", self._stat, name)
        return stored

    async def open_reader(self, name: str, *, start: int = 0) -> S3Reader:
        """See :meth:`conduit.cluster.store.Store.open_reader` (one ranged GET)."""
        return await self._guard(f"reading {name!r}", self._open_reader, name, start)

    async def delete(self, name: str) -> bool:
        """See :meth:`conduit.cluster.store.Store.delete`."""
        return await self._guard(f"deleting {name!r}", self._delete_file, name)

    async def rename(self, name: str, new_name: str, *, overwrite: bool = False) -> str:
        """See :meth:`conduit.cluster.store.Store.rename` (server-side copy, then delete)."""
        return await self._guard(f"renaming {name!r}", self._rename, name, new_name, overwrite)

    async def cleanup_stale_partials(self, max_age_seconds: float) -> int:
        """See :meth:`conduit.cluster.store.Store.cleanup_stale_partials`.

        Also removes staged files older than ``max_age_seconds`` (not counted).
        """
        return await self._guard("cleaning up", self._cleanup, max_age_seconds)

    # ----------------------------------------------------------------- staging

    async def open_staging(self, token: str) -> S3Partial:
        """A partial for bytes another node will read by ``token``, e.g. a cross-node push.

        ``token`` is 1-64 characters of ``[A-Za-z0-9_-]``. The staged file lives
        under the hidden control prefix: never listed, never reachable by a
        file name. Written and published like any partial (``publish``
        returns its key below the prefix); opening the same token again starts
        over. Read it with :meth:`open_staged`, remove it with
        :meth:`delete_staged`; :meth:`cleanup_stale_partials` removes any left.
        """
        return await self._guard(f"staging {token!r}", self._open_staging, token)

    async def open_staged(self, token: str, *, start: int = 0) -> S3Reader:
        """Read a staged file from byte ``start``; ``FileNotFoundError`` if there is none."""
        return await self._guard(f"reading staged {token!r}", self._open_staged, token, start)

    async def delete_staged(self, token: str) -> bool:
        """Remove a staged file (and an unfinished staging upload); whether it existed."""
        return await self._guard(f"deleting staged {token!r}", self._delete_staged, token)

    async def cleanup_staging(self, max_age_seconds: float) -> int:
        """Remove staged files (and unfinished staging uploads) older than ``max_age_seconds``.

        Only the staging area: unlike :meth:`cleanup_stale_partials` it never
        touches the partials of uploads, whose age limit is the transfer
        handler's. Returns how many were removed.
        """
        return await self._guard("cleaning up staging", self._cleanup_staging, max_age_seconds)

    async def _guard(
        self,
        what: str,
        function: Callable[..., T],
        /,
        *args: Any,
        abandon_on_cancel: bool = False,
    ) -> T:
        """Run ``function`` in a thread; S3 failures become :class:`TransferError`.

        ``abandon_on_cancel``: a cancelled caller returns at once, the thread
        going on until the client's timeouts end it (holding its limiter slot
        until then).
        """
        try:
            return await _threads.run_sync(
                functools.partial(function, *args),
                limiter=self._limiter,
                abandon_on_cancel=abandon_on_cancel,
            )
        except S3_ERRORS as exc:
            raise storage_error(exc, what) from exc


class _UploadGone(Exception):
    """A multipart upload was aborted or completed meanwhile (see ``S3Store._part_pages``)."""


def _is_token(token: str) -> bool:
    """Whether a key below the staging prefix is one :meth:`S3Store.open_staging` made."""
    try:
        check_transfer_id(token)
    except UnsafePathError:
        return False
    return True


def _listable(relative: str) -> bool:
    """Whether a key below the prefix is a published file: canonical and not hidden."""
    if not relative or relative.endswith("/"):
        return False
    try:
        return safe_relative_name(relative) == relative
    except UnsafePathError:
        return False
