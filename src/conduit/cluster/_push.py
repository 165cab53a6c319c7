"""A push to a client of another node: stage the file in the shared store, the other node delivers.

The origin node (where ``send_to_client`` was called) copies the file into
the staging area of the S3 store under a random token, hashing it on the way
(the store verifies every part and the whole against that SHA-256), then
sends a ``push`` request on the bus to the client's node with the token, the
name, size and SHA-256. That node reads the staged object into a temporary
file, checks size and SHA-256 again, deletes the staged object, and pushes the
file to its client with its own transfer handler, exactly as a local push.
The reply is the push's result dict, which ``send_to_client`` returns on the
origin. The bus carries only the small request and reply, never file data.

Progress: the client's node reports the push's progress on the bus as its
handler reports it locally (at most every ``REPORT_INTERVAL``, about ten a
second, plus once at the end), from a task of its own that sends only the
latest report, so a slow bus never holds the transfer up. The origin hands
each report to ``send_to_client``'s ``on_progress`` as a
:class:`~conduit.transfer.TransferProgress` (direction ``"push"``; the
counts and elapsed time are the delivering node's).

Failure handling: the origin removes the staged object whenever the request
did not succeed (a dead node cannot), and the nodes sweep what a node killed
mid-push left behind. A node that dies or leaves while the origin waits ends
the wait within the cluster TTL (the bus watches its registration), with
code ``"unreachable"``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import logging
import math
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from .. import _threads
from .._callbacks import invoke, trio_callback
from ..errors import ConduitError, ConnectionClosed, RPCError, TransferError, failure_dict
from ..transfer._local import open_local_file
from ..transfer._names import safe_relative_name
from ..transfer._progress import TransferProgress
from .bus import BusError, ClusterBus, NodeUnreachable

if TYPE_CHECKING:
    from ..server import Server
    from .s3 import S3Store

__all__ = ["PUSH_REQUEST", "PushRequest", "Pusher", "deliver_staged", "push_via_node"]

log = logging.getLogger("conduit.cluster.push")

#: The bus request kind of a cross-node push.
PUSH_REQUEST: Final = "push"
#: Bytes read (and staged, and fetched) per worker-thread call.
_CHUNK: Final = 1024 * 1024
#: Bound on removing a staged object after a failure (the sweep gets it otherwise).
_CLEANUP_TIMEOUT: Final = 10.0
#: Bound on sending the final progress report before the reply.
_LAST_REPORT_TIMEOUT: Final = 2.0
_SHA256_HEX: Final = re.compile(r"[0-9a-f]{64}")
_TOKEN: Final = re.compile(r"[0-9a-f]{32}")

#: ``on_progress(progress)``, as ``send_to_client`` takes it.
ProgressCallback = Callable[[TransferProgress], Any]
#: ``pusher(server, client_id, path, remote_name, on_progress)``: the transfer
#: handler's push to one of this node's clients, exactly as a local
#: ``send_to_client`` (in its turn; waiting for the client to come back and
#: resuming); ``ConnectionClosed`` if the client is not connected.
Pusher = Callable[["Server", str, Path, str, ProgressCallback | None], Awaitable[dict[str, Any]]]
#: ``report(data)``: sends a progress report to the origin (``ClusterBus.report_progress``).
Reporter = Callable[[Any], Awaitable[None]]


@attrs.frozen
class PushRequest:
    """What the origin tells the client's node: who, which staged object, what it must be."""

    client_id: str
    token: str
    name: str
    size: int
    sha256: str
    #: The source's modification time: the copy on the client's node gets it,
    #: so a push cut off and sent again resumes as a local one would.
    modified_ns: int

    def payload(self) -> dict[str, Any]:
        """As sent on the bus."""
        return attrs.asdict(self)

    @classmethod
    def parse(cls, payload: dict[str, Any]) -> PushRequest:
        """Check a request read from the bus; :class:`RPCError` ``invalid_arguments`` if wrong.

        Redis is infrastructure, not a peer, but a request that does not make
        sense must still fail clearly rather than reach the store or a client.
        """
        try:
            request = cls(
                client_id=payload["client_id"],
                token=payload["token"],
                name=payload["name"],
                size=payload["size"],
                sha256=payload["sha256"],
                modified_ns=payload["modified_ns"],
            )
        except (KeyError, TypeError) as exc:
            raise RPCError(f"malformed push request: {exc}", "invalid_arguments") from None
        valid = (
            isinstance(request.client_id, str)
            and isinstance(request.token, str)
            and _TOKEN.fullmatch(request.token) is not None
            and isinstance(request.name, str)
            and isinstance(request.size, int)
            and request.size >= 0
            and isinstance(request.sha256, str)
            and _SHA256_HEX.fullmatch(request.sha256) is not None
            and isinstance(request.modified_ns, int)
            and request.modified_ns >= 0
        )
        if not valid:
            raise RPCError("malformed push request", "invalid_arguments")
        try:
            safe = safe_relative_name(request.name)
        except TransferError as exc:
            raise RPCError(exc.message, exc.code) from None
        return attrs.evolve(request, name=safe)


# --------------------------------------------------------------------------- origin


async def push_via_node(
    bus: ClusterBus,
    store: S3Store | None,
    node: str,
    client_id: str,
    path: str | os.PathLike[str],
    remote_name: str | None,
    on_progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Stage ``path`` and have ``node`` push it to ``client_id``; the push's result dict.

    Raises what opening ``path`` raises and ``UnsafePathError`` for a bad
    name, like a local push; every later failure is a failure dict.
    ``on_progress`` gets the delivering node's progress reports.
    """
    local = Path(path)
    name = safe_relative_name(local.name if remote_name is None else remote_name)
    file = await _threads.run_sync(open_local_file, local)
    try:
        if store is None:
            return failure_dict(
                TransferError(
                    f"client {client_id!r} is on node {node!r}, and pushing to another node "
                    "needs cluster_staging (an s3:// location both nodes can read)",
                    "no_staging",
                )
            )
        token = secrets.token_hex(16)
        modified_ns = os.fstat(file.fileno()).st_mtime_ns
        try:
            size, digest = await _stage(store, token, file)
        except (ConduitError, OSError) as exc:
            return failure_dict(exc, default_code="transfer_failed")
    finally:
        with trio.CancelScope(shield=True):
            await _threads.run_sync(file.close)
    request = PushRequest(client_id, token, name, size, digest, modified_ns)
    delivered = False

    async def progress(data: Any) -> None:
        report = _parse_progress(data, name)
        if report is not None and on_progress is not None:
            await invoke(on_progress, report)

    try:
        # No overall timeout: pushing a large file takes as long as it takes;
        # a node that dies, or a request or reply the bus loses, is noticed
        # within about its TTL (NodeUnreachable, RequestLost).
        reply = await bus.request(
            node,
            PUSH_REQUEST,
            request.payload(),
            timeout=math.inf,
            on_progress=None if on_progress is None else progress,
        )
        delivered = True
    except NodeUnreachable as exc:
        return {"success": False, "error": str(exc), "code": "unreachable"}
    except ConduitError as exc:  # RPCError from the other node (its code kept), BusError
        return failure_dict(exc, default_code="transfer_failed")
    finally:
        if not delivered:
            with (
                trio.CancelScope(shield=True),
                trio.move_on_after(_CLEANUP_TIMEOUT),
                contextlib.suppress(ConduitError),
            ):
                await store.delete_staged(token)
    return reply


def _parse_progress(data: Any, name: str) -> TransferProgress | None:
    """A report from the delivering node as the origin's callback takes it; None if malformed."""
    if not isinstance(data, dict):
        return None
    transferred, total_size, resumed_from, elapsed = (
        data.get(key) for key in ("transferred", "total_size", "resumed_from", "elapsed")
    )
    if not (
        isinstance(transferred, int)
        and isinstance(total_size, int)
        and isinstance(resumed_from, int)
        and min(transferred, total_size, resumed_from) >= 0
        and isinstance(elapsed, int | float)
        and 0 <= elapsed < math.inf
    ):
        return None
    return TransferProgress(name, "push", transferred, total_size, float(elapsed), resumed_from)


def _progress_payload(progress: TransferProgress) -> dict[str, Any]:
    return {
        "transferred": progress.transferred,
        "total_size": progress.total_size,
        "elapsed": progress.elapsed,
        "resumed_from": progress.resumed_from,
    }


class _ProgressRelay:
    """The delivering node's progress, sent to the origin without slowing the push.

    :meth:`update` is the push's ``on_progress``: it only keeps the report;
    :meth:`run` sends the latest one whenever it is free, so a slow or
    unreachable bus skips reports instead of holding the transfer up.
    """

    def __init__(self, report: Reporter) -> None:
        self._report = report
        self._latest: dict[str, Any] | None = None
        self._wake = trio.Event()

    @trio_callback
    async def update(self, progress: TransferProgress) -> None:
        """Keep ``progress`` to send (marked for Trio: it is ours, not the application's)."""
        self._latest = _progress_payload(progress)
        self._wake.set()

    async def run(self) -> None:
        """Send reports as they come, until cancelled."""
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            await self.flush()

    async def flush(self) -> None:
        """Send the report not sent yet, if any (best effort)."""
        latest, self._latest = self._latest, None
        if latest is None:
            return
        try:
            await self._report(latest)
        except BusError as exc:
            log.debug("progress report not sent: %s", exc)


async def _stage(store: S3Store, token: str, file: io.FileIO) -> tuple[int, str]:
    """Copy ``file`` into the staging object ``token``; its size and SHA-256."""
    partial = await store.open_staging(token)
    hasher = hashlib.sha256()
    size = 0
    try:
        while True:
            chunk = await _threads.run_sync(file.read, _CHUNK)
            if not chunk:
                break
            hasher.update(chunk)
            size += len(chunk)
            await partial.append(chunk)
        digest = hasher.hexdigest()
        await partial.publish(expected_sha256=digest)
    except BaseException:
        with (
            trio.CancelScope(shield=True),
            trio.move_on_after(_CLEANUP_TIMEOUT),
            contextlib.suppress(ConduitError),
        ):
            await partial.discard()
        raise
    return size, digest


# --------------------------------------------------------------------------- client's node


def _write_all(out: io.FileIO, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = out.write(view)
        if not written:  # took nothing, with no error: trying again would spin for ever
            raise OSError(errno.EIO, f"the file system took none of {len(view)} bytes")
        view = view[written:]


async def deliver_staged(
    store: S3Store, request: PushRequest, server: Server, pusher: Pusher, report: Reporter
) -> dict[str, Any]:
    """Fetch the staged file, check it, delete it, push it to the request's client
    of ``server``; the push's result.

    The copy goes through a private temporary file because the transfer
    handler sends from a local file (and may resume from it). The push's
    progress goes to ``report``, the last report before the result.
    """
    directory = Path(await _threads.run_sync(tempfile.mkdtemp, None, "conduit-push-"))
    try:
        local = directory / "file"
        await _fetch(store, request, local)
        with contextlib.suppress(ConduitError):
            await store.delete_staged(request.token)
        relay = _ProgressRelay(report)
        result: dict[str, Any] = {}
        failure: Exception | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay.run)
            try:
                result = await pusher(server, request.client_id, local, request.name, relay.update)
            except Exception as exc:  # raised below as is, not inside the nursery's group
                failure = exc
            finally:
                nursery.cancel_scope.cancel()
        if failure is not None:
            try:
                if isinstance(failure, ConnectionClosed):  # the client left just now
                    raise RPCError(failure.reason, "connection_closed") from None
                raise failure
            finally:
                # Its traceback holds this frame: a cycle otherwise (see
                # conduit._stored_errors).
                del failure
        # After run() stopped (a send in flight completes first), so the final
        # report goes out after every earlier one and before the reply.
        with trio.move_on_after(_LAST_REPORT_TIMEOUT):
            await relay.flush()
        return result
    finally:
        with trio.CancelScope(shield=True):
            await _threads.run_sync(shutil.rmtree, directory, True)


async def _fetch(store: S3Store, request: PushRequest, local: Path) -> None:
    try:
        reader = await store.open_staged(request.token)
    except FileNotFoundError:
        raise RPCError("the staged file is gone", "not_found") from None
    except TransferError as exc:
        raise RPCError(exc.message, exc.code) from None
    hasher = hashlib.sha256()
    size = 0
    try:
        with await _threads.run_sync(io.FileIO, local, "w") as out:
            while True:
                chunk = await reader.read(_CHUNK)
                if not chunk:
                    break
                hasher.update(chunk)
                size += len(chunk)
                await _threads.run_sync(_write_all, out, chunk)
    except TransferError as exc:
        raise RPCError(exc.message, exc.code) from None
    finally:
        with trio.CancelScope(shield=True):
            await reader.aclose()
    if size != request.size or hasher.hexdigest() != request.sha256:
        raise RPCError("the staged file differs from what was staged", "checksum_mismatch")
    modified = request.modified_ns
    await _threads.run_sync(lambda: os.utime(local, ns=(modified, modified)))
