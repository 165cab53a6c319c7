"""``FileTransferHandler``: the File Transfer Guide's API, a thin facade over its two roles.

The work is done by a :class:`~._sender.Sender` (uploads, pushes, serving
downloads) and a :class:`~._receiver.Receiver` (the inbound registry, begin /
receive / publish, small files, the client side of a download); this class
holds the settings, the user's callbacks and the per-connection transfer
limit they share, registers the RPC methods, and bridges the public
operations to asyncio. Three flows share that one sender and one receiver:

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

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .._bridge import bridged
from . import _manage as manage
from ._answers import listing_answer, listing_arguments
from ._backend import Backend
from ._backend_local import LocalBackend
from ._hashing import HashGate
from ._hooks import Hooks
from ._listing import FileListing, GatheredListing, listed_name
from ._progress import TransferProgress, callback_errors_as_they_are, forward_only
from ._receiver import Receiver
from ._resilient import on_client, on_server
from ._sender import Sender
from ._slots import TransferLimits, TransferSlots, default_max_transfers
from ._small import probe
from ._space import DEFAULT_FREE_SPACE_MARGIN
from ._storage import StorageRoot
from ._tree import receive_files, receive_tree, send_files, send_tree
from ._wire import (
    DOWNLOAD,
    DOWNLOAD_BATCH,
    FILE_DELETE,
    FILE_LIST,
    FILE_RENAME,
    FILE_STAT,
    PUSH_BEGIN,
    PUSH_FINISH,
    PUSH_SMALL,
    UPLOAD_BATCH,
    UPLOAD_BEGIN,
    UPLOAD_FINISH,
    UPLOAD_SMALL,
)

if TYPE_CHECKING:
    from .._peer import Peer
    from ..client import Client
    from ..server import Server

#: ``callback(client, filepath, metadata)`` on a server, ``callback(filepath,
#: metadata)`` on a client; sync or ``async``.
ReceivedHook = TypeVar(
    "ReceivedHook", bound="Callable[[Peer, str, Any], object] | Callable[[str, Any], object]"
)
#: ``callback(client, progress)`` on a server, ``callback(progress)`` on a client.
ProgressHook = TypeVar(
    "ProgressHook",
    bound="Callable[[Peer, TransferProgress], object] | Callable[[TransferProgress], object]",
)
#: ``callback(client, name, metadata)``, sync or ``async``.
ServedHook = TypeVar("ServedHook", bound="Callable[[Peer, str, Any], object]")
ProgressCallback = Callable[[TransferProgress], Any]

DEFAULT_CHUNK_SIZE = 64 * 1024


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

    What one connection may cost this side (see ``docs/security.md``):

    * ``max_transfers_per_connection`` -- transfers (uploads, pushes, downloads
      served) running at once on one connection; more are refused with code
      ``"overloaded"``. Each holds an open file (an upload two).
    * ``max_transfers_per_user`` and ``max_transfers`` -- the same, over all the
      connections of one user (with a shared password: of one client host),
      and over all connections: by default a quarter of the process's
      descriptor limit for all (so transfers hold at most half of the
      descriptors), and a quarter of that for one user. A transfer refused by
      either is tried again by its client for up to 30 s.
    * ``read_ahead_per_connection`` -- bytes of file data read ahead of the
      socket for all of a connection's outgoing transfers together; a peer that
      stops reading holds at most this much (plus the connection's send buffer).
    * ``resume_hash_budget`` -- bytes the server hashes for a connection's
      download resume points that turn out wrong; past it, that connection's
      downloads restart from zero instead of being checked.

    Disk budget (see ``docs/security.md``): an upload is accepted only if its
    declared size fits in the free space minus what uploads in progress have
    reserved minus ``free_space_margin`` bytes; abandoned partial files are
    removed within moments of ``partial_ttl`` passing, and the oldest of them
    first whenever space is needed; ``max_partial_bytes`` (default: no cap
    besides the disk) caps the bytes of unfinished uploads, abandoned or not;
    ``max_reserved_per_user`` (default: no cap besides the disk) caps what the
    uploads in progress of one user (with a shared password: of one client
    host) reserve together.
    On a server with accounts, each user sees only their own root below
    ``storage_dir``, within their quota.

    ``storage_dir="s3://BUCKET/PREFIX"`` keeps the files in an S3-compatible
    object store instead (the ``cluster`` extra: ``pip install '.[cluster]'``
    in a checkout; endpoint
    and credentials from ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``), which every node of a
    cluster can share (see :doc:`cluster`): the same checks (SHA-256 verified
    before publishing, never overwriting, hostile names refused), partials
    that any node resumes from their last stored 8 MiB part, a user's root as
    a key prefix. There is no disk budget there; at most 4 uploads run at once
    per connection (each holds two parts in memory). ``storage_dir`` and
    :attr:`storage` then raise ``ValueError``; :attr:`storage_url` says where
    files go in both cases.
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
        max_transfers_per_connection: int = 32,
        max_transfers_per_user: int | None = None,
        max_transfers: int | None = None,
        read_ahead_per_connection: int = 8 * 1024 * 1024,
        resume_hash_budget: int = 1024 * 1024 * 1024,
        free_space_margin: int = DEFAULT_FREE_SPACE_MARGIN,
        max_partial_bytes: int | None = None,
        max_reserved_per_user: int | None = None,
    ) -> None:
        if not 1024 <= chunk_size <= 1024 * 1024:
            raise ValueError(f"chunk_size must be between 1 KiB and 1 MiB, got {chunk_size}")
        if max_file_size is not None and max_file_size < 0:
            raise ValueError("max_file_size must be positive or None")
        if free_space_margin < 0:
            raise ValueError("free_space_margin must not be negative")
        if max_partial_bytes is not None and max_partial_bytes < 0:
            raise ValueError("max_partial_bytes must be positive or None")
        if max_reserved_per_user is not None and (
            not isinstance(max_reserved_per_user, int) or max_reserved_per_user < 0
        ):
            raise ValueError(
                f"max_reserved_per_user must be positive or None, got {max_reserved_per_user!r}"
            )
        if not isinstance(max_listed, int) or isinstance(max_listed, bool) or max_listed < 1:
            # 0 would answer every listing with nothing and no next page.
            raise ValueError(f"max_listed must be at least 1, got {max_listed!r}")
        if max_transfers_per_connection < 1:
            raise ValueError(
                "max_transfers_per_connection must be at least 1, "
                f"got {max_transfers_per_connection}"
            )
        for setting, value in (
            ("max_transfers_per_user", max_transfers_per_user),
            ("max_transfers", max_transfers),
        ):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{setting} must be at least 1 or None, got {value!r}")
        if read_ahead_per_connection < chunk_size:
            raise ValueError(
                f"read_ahead_per_connection must be at least chunk_size ({chunk_size}), "
                f"got {read_ahead_per_connection}"
            )
        if resume_hash_budget < 0:
            raise ValueError(f"resume_hash_budget must not be negative, got {resume_hash_budget}")
        self._storage: StorageRoot | None = None
        #: Where the server side stores: the local directory (the default) or
        #: an object store (see :mod:`conduit.transfer._backend`).
        self.backend: Backend
        # Checked here, not with cluster.location.is_s3_url: the core loads
        # the cluster package (and boto3) only for an s3:// storage_dir.
        if isinstance(storage_dir, str) and storage_dir.lower().startswith("s3://"):
            from ._s3 import s3_backend

            self.backend = s3_backend(storage_dir, self)
            url = storage_dir
        else:
            self._storage = StorageRoot(storage_dir)
            self.backend = LocalBackend(self)
            url = str(self._storage.path)
        #: Where received files go: the ``s3://`` URL, or the directory made absolute.
        self.storage_url = url
        #: The largest DATA frame this side sends, and the size up to which a
        #: file (up to 256 KiB) goes whole in one call; bytes, 1 KiB to 1 MiB.
        self.chunk_size = chunk_size
        #: The largest file this side accepts (bytes); None: no limit but the disk's.
        self.max_file_size = max_file_size
        #: Whether a received file replaces one of its name (else it is
        #: published as ``name (1).ext``).
        self.overwrite = overwrite
        #: Seconds an abandoned partial file is kept for a resume.
        self.partial_ttl = partial_ttl
        #: The most entries one ``list_files`` answer holds.
        self.max_listed = max_listed
        #: Free bytes never handed out to uploads (1 MiB by default): an upload
        #: is accepted only if its size fits in free space minus reservations
        #: minus this margin.
        self.free_space_margin = free_space_margin
        #: Cap on the bytes of unfinished uploads (in progress plus abandoned
        #: partials); None: only the disk bounds them.
        self.max_partial_bytes = max_partial_bytes
        #: Cap on the bytes the uploads in progress of one user (with a shared
        #: password: of one client host) reserve together (what they still have
        #: to write); more is refused ``"overloaded"``, and an upload that alone
        #: needs more ``"no_space"``. None: only the disk bounds them.
        self.max_reserved_per_user = max_reserved_per_user
        #: Transfers (uploads, pushes, downloads served) one connection may run
        #: at once; more are refused with code ``"overloaded"``.
        self.max_transfers_per_connection = max_transfers_per_connection
        #: Transfers the connections of one user (with a shared password: of
        #: one client host) may run at once; more are refused with code
        #: ``"overloaded"``. None: a quarter of :attr:`max_transfers`.
        self.max_transfers_per_user = max_transfers_per_user
        #: Transfers all connections may run at once; more are refused with
        #: code ``"overloaded"``. None: a quarter of the process's descriptor
        #: limit (``RLIMIT_NOFILE``), read at each transfer's start, or 4,096
        #: where there is none.
        self.max_transfers = max_transfers
        #: Bytes of file data read ahead of the socket per connection (all its
        #: outgoing transfers together).
        self.read_ahead_per_connection = read_ahead_per_connection
        #: Bytes of resume-prefix hashing a connection may waste on wrong
        #: claims before its downloads restart from zero instead.
        self.resume_hash_budget = resume_hash_budget
        #: Whole-file hashing for peers (``file_stat(sha256=True)``, re-run
        #: checks): one hash at a time per connection, shared threads, cached.
        self.hash_gate = HashGate()
        #: Seconds ``send_to_client`` waits for a client whose connection
        #: dropped mid-push to reconnect (it keeps its id) before giving up.
        self.push_reconnect_timeout = 120.0
        hooks = Hooks()
        slots = TransferSlots()
        # Both roles read the settings above from this object at each use, so
        # changing an attribute after construction takes effect.
        self._hooks = hooks
        self._sender = Sender(self, hooks, slots)
        self._receiver = Receiver(self, hooks, slots)
        self._manager = manage.Manager(self)

    def transfer_limits(self) -> TransferLimits:
        """The limits a transfer starting now counts against (see the settings above)."""
        total = default_max_transfers() if self.max_transfers is None else self.max_transfers
        per_owner = self.max_transfers_per_user
        if per_owner is None:
            per_owner = max(1, total // 4)
        return TransferLimits(self.max_transfers_per_connection, per_owner, total)

    @property
    def storage(self) -> StorageRoot:
        """The local storage directory's root (``ValueError`` for an ``s3://`` storage)."""
        if self._storage is None:
            raise ValueError(f"storage {self.storage_url!r} is not a local directory")
        return self._storage

    @property
    def storage_dir(self) -> Path:
        """The storage directory, absolute (``ValueError`` for an ``s3://`` storage)."""
        return self.storage.path

    def storage_for(self, peer: Peer | None) -> StorageRoot:
        """The local root ``peer`` sees: its user's root in accounts mode, else :attr:`storage`."""
        if not isinstance(self.backend, LocalBackend):
            raise ValueError(f"storage {self.storage_url!r} is not a local directory")
        return self.backend.root_for(peer)

    def on_file_received(self, function: ReceivedHook) -> ReceivedHook:
        """Register a callback for every file this side receives and publishes.

        On a server it is called as ``callback(client, filepath, metadata)``; on
        a client (pushed or downloaded files) as ``callback(filepath, metadata)``.
        ``metadata`` holds ``filename`` (the published relative name),
        ``original_name``, ``size``, ``checksum`` (SHA-256 hex), ``path``,
        ``resumed_from`` and ``elapsed``.
        """
        self._hooks.received.append(function)
        return function

    def on_progress(self, function: ProgressHook) -> ProgressHook:
        """Register a callback for the progress of every file the peer sends
        this side: uploads on a server, pushes on a client.

        On a server it is called as ``callback(client, progress)``, on a client
        as ``callback(progress)``, with a :class:`TransferProgress` whose
        ``direction`` is ``"receive"``: at most every 0.1 s per file, and once
        at 100 % (a small file, which arrives in one call, only then). Sync or
        ``async``, and under ``asyncio.run`` in the application's loop; keep it
        short, the file's bytes wait for it. One that raises is logged and
        does not affect the transfer. (The ``on_progress=`` argument of
        ``send_to_server``, ``receive_from_server`` and ``send_to_client``
        follows the side that starts a transfer, and stops it if it raises.)
        """
        self._hooks.progress.append(function)
        return function

    def on_file_served(self, function: ServedHook) -> ServedHook:
        """Register a callback for every download this server serves, once it ends.

        Called as ``callback(client, name, metadata)``, like ``on_file_received``:
        sync or ``async``, and under ``asyncio.run`` in the application's asyncio
        loop; one that raises is logged and does not affect the download.
        ``name`` is the relative name the client asked for.

        ``metadata`` always holds ``filename``, ``client_id``, ``size`` and
        ``success``. When ``success`` is true, every byte and the SHA-256 trailer
        were sent (the client then verifies them); it also holds ``checksum``,
        ``path`` (the served file), ``resumed_from``, ``elapsed`` and ``speed``.
        When false, the download was refused (no such file, changed on the
        server, too many transfers) or stopped (the client gave up), and
        ``error`` and ``code`` say why, as in the failure results. A download
        cut off by the connection closing is not reported here
        (``on_client_disconnect`` is). The small files of a directory download
        are served many per call (``file_download_batch``) and each is reported
        as it is read into the answer; one that could not be opened reports
        ``size`` 0. A download's transfer slot is given back once the callbacks
        have returned; a download the same client asks for meanwhile, finding
        its slots full, waits for it (up to 5 s): keep them short.
        """
        self._hooks.served.append(function)
        return function

    # ------------------------------------------------------------------ registration

    def register_server_handlers(self, server: Server) -> None:
        """Register the transfer RPC methods on a server.

        Uploads, downloads, ``file_list``, ``file_stat``, and ``file_delete`` /
        ``file_rename`` (any authenticated client may delete and rename).
        """
        server.register_rpc(self._sender.rpc_file_list, FILE_LIST)
        server.register_rpc(self._sender.rpc_file_stat, FILE_STAT)
        server.register_rpc(self._receiver.rpc_begin, UPLOAD_BEGIN)
        server.register_rpc(self._receiver.rpc_receive_small, UPLOAD_SMALL)
        server.register_rpc(self._receiver.rpc_receive_batch, UPLOAD_BATCH)
        server.register_rpc(self._receiver.rpc_finish, UPLOAD_FINISH)
        server.register_rpc(self._sender.rpc_download, DOWNLOAD)
        server.register_rpc(self._sender.rpc_download_batch, DOWNLOAD_BATCH)
        server.register_rpc(self._manager.rpc_delete, FILE_DELETE)
        server.register_rpc(self._manager.rpc_rename, FILE_RENAME)
        if server.cluster is not None:
            # Pushes that other nodes stage for this node's clients go out
            # through us; an S3 storage is also where pushes may be staged.
            server.cluster.serve_pushes(self._push_here, self.backend.cluster_staging)

    def register_client_handlers(self, client: Client) -> None:
        """Let the server push files to this client, into ``storage_dir``."""
        client.register_rpc(self._receiver.rpc_begin, PUSH_BEGIN)
        client.register_rpc(self._receiver.rpc_receive_small, PUSH_SMALL)
        client.register_rpc(self._receiver.rpc_finish, PUSH_FINISH)

    # ------------------------------------------------------------------ public operations

    @bridged
    @callback_errors_as_they_are
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
        on_progress = forward_only(on_progress)
        # One look: a directory, or a small file read whole (see ._small).
        found = await probe(path, self._sender.small_file_limit, client)
        if found.is_directory:
            return await send_tree(
                self._sender,
                lambda attempt: on_client(client, attempt),
                Path(path),
                remote_name,
                on_progress,
            )
        return await on_client(
            client,
            lambda peer: self._sender.send(
                peer, path, remote_name, on_progress, "upload", small=found.small
            ),
        )

    @bridged
    @callback_errors_as_they_are
    async def send_files_to_server(
        self,
        client: Client,
        files: Sequence[str | os.PathLike[str] | tuple[str | os.PathLike[str], str]],
        on_progress: ProgressCallback | None = None,
    ) -> list[dict[str, Any]]:
        """Upload several files; return one result per file, in order.

        ``files`` holds paths (sent under their base names) or ``(path,
        remote_name)`` pairs. Each result is what :meth:`send_to_server`
        returns for that file, and a problem with one file (missing, a name
        the server refuses, over quota) is that file's ``{"success": False,
        ...}``: nothing raises for it. Small files (up to ``chunk_size`` and
        256 KiB) go many per call with one fsync pass per call on the server
        (see :doc:`file-transfer`), which is much faster than a
        ``send_to_server`` per file; the others go one by one, a few at once.
        Raises ``ConnectionClosed`` when not connected.
        """
        return await send_files(
            self._sender,
            lambda attempt: on_client(client, attempt),
            files,
            forward_only(on_progress),
        )

    @bridged
    @callback_errors_as_they_are
    async def send_to_client(
        self,
        server: Server,
        client_id: str,
        path: str | os.PathLike[str],
        on_progress: ProgressCallback | None = None,
        *,
        remote_name: str | None = None,
    ) -> dict[str, Any]:
        """Push ``path`` to the client ``client_id`` (which called ``register_client_handlers``).

        In a cluster (``cluster_url``) the client may be connected to any node:
        see :doc:`cluster` for how the file gets there and what can fail. A
        push to a local client whose connection drops waits up to
        ``push_reconnect_timeout`` seconds for it to come back, then resumes.
        """
        on_progress = forward_only(on_progress)
        if client_id not in server.clients and server.cluster is not None:
            return await server.cluster.push(client_id, path, remote_name, on_progress)
        return await self._push_here(server, client_id, path, remote_name, on_progress)

    async def _push_here(
        self,
        server: Server,
        client_id: str,
        path: str | os.PathLike[str],
        remote_name: str | None,
        on_progress: ProgressCallback | None,
    ) -> dict[str, Any]:
        """Push to a client connected to ``server`` (this node): in its turn, and
        again, resuming, if its connection drops and it comes back within
        ``push_reconnect_timeout``, or through the node of a cluster it
        resumed its session on meanwhile. Pushes staged by other nodes for
        this node's clients go out through this too, so they follow the
        client as a local push does."""
        result = await on_server(
            server,
            client_id,
            self.push_reconnect_timeout,
            lambda peer: self._sender.send(peer, path, remote_name, on_progress, "push"),
        )
        cluster = server.cluster
        if not result.get("success") and cluster is not None and cluster.moved_away(client_id):
            # It resumed its session on another node meanwhile: finish there
            # (from the client's partial file, as a local resume would).
            return await cluster.push(client_id, path, remote_name, on_progress)
        return result

    @bridged
    @callback_errors_as_they_are
    async def receive_from_server(
        self,
        client: Client,
        name: str,
        local_dir: str | os.PathLike[str] = "./downloads",
        on_progress: ProgressCallback | None = None,
        *,
        offset: int | None = None,
        length: int | None = None,
    ) -> dict[str, Any]:
        """Download the server's file ``name`` into ``local_dir``.

        Returns ``{"success": True, "path": local_path, "filename": ..., "size":
        ..., "checksum": ...}``. An interrupted download leaves a hidden partial
        file in ``local_dir``; calling again resumes it. A local file with the
        same name, size and SHA-256 is not downloaded again (``"skipped": True,
        "reason": "already_there"``).

        A ``name`` that is a directory on the server brings every file under
        it, to ``local_dir/name/...``, with one result per file (see
        :mod:`conduit.transfer._tree`). ``offset`` / ``length`` download only
        that byte range, into ``NAME.range-OFFSET-LENGTH``; the result's
        ``checksum`` is the SHA-256 of the range, verified end to end.
        """
        on_progress = forward_only(on_progress)
        if offset is not None or length is not None:
            byte_range = (0 if offset is None else offset, length)
            return await on_client(
                client,
                lambda peer: self._receiver.download(
                    peer, name, local_dir, on_progress, byte_range
                ),
            )
        result = await on_client(
            client, lambda peer: self._receiver.download(peer, name, local_dir, on_progress)
        )
        if result.get("code") != "is_directory":
            return result
        return await receive_tree(
            self._receiver,
            lambda attempt: on_client(client, attempt),
            name,
            Path(local_dir),
            on_progress,
            small_file_limit=self._sender.small_file_limit,
        )

    @bridged
    @callback_errors_as_they_are
    async def receive_files_from_server(
        self,
        client: Client,
        names: Sequence[str],
        local_dir: str | os.PathLike[str] = "./downloads",
        on_progress: ProgressCallback | None = None,
        *,
        sizes: Sequence[int | None] | None = None,
    ) -> list[dict[str, Any]]:
        """Download several of the server's files into ``local_dir``; one result per name, in order.

        Each result is what :meth:`receive_from_server` returns for that file
        (a name that is a directory there fails: download it by itself), and a
        problem with one file (missing, a refused name) is that file's
        ``{"success": False, ...}``: nothing raises for it. Small files (up to
        ``chunk_size`` and 256 KiB) come many per call
        (``file_download_batch``, see :doc:`file-transfer`), and a local copy
        with the server's SHA-256 is not sent again; the others come one by
        one, a few at once. ``sizes`` (one per name, None where not known:
        what :meth:`list_files` gave) packs the calls: a file of unknown size
        is counted as large as a small file may be. A name given twice is
        downloaded twice (the second finds the first ``already_there``, or a
        large one ``busy``).
        """
        if isinstance(names, str) or not all(isinstance(name, str) for name in names):
            raise TypeError("names must be a sequence of str (a single name is ['name'])")
        if sizes is not None:
            if len(sizes) != len(names):
                raise ValueError(f"{len(sizes)} sizes for {len(names)} names")
            if not all(size is None or type(size) is int for size in sizes):
                raise TypeError("sizes must be ints (or None where not known)")
        return await receive_files(
            self._receiver,
            lambda attempt: on_client(client, attempt),
            names,
            Path(local_dir),
            forward_only(on_progress),
            small_file_limit=self._sender.small_file_limit,
            sizes=sizes,
        )

    @bridged
    async def list_files(
        self, client: Client, *, prefix: str | None = None, after: str | None = None
    ) -> FileListing:
        """The server's files as ``[{"name", "size", "modified"}, ...]``, by name
        (raises on failure).

        ``prefix`` (a directory on the server) lists only the files under it; a
        name that is not a directory there lists as empty.

        The result is a :class:`~conduit.transfer.FileListing`: a ``list`` with
        a ``truncated`` attribute, True when the server had more files than it
        answers at once (its ``max_listed``, 10,000 by default, or fewer when
        their names are long: the answer must fit in one message of this
        side's ``max_frame_size``) and returned only some, and ``next`` says
        where the next page starts: ``list_files(client, prefix=...,
        after=listing.next)``. Each page is sorted by name; the pages follow
        the storage's listing order, the names' but on an S3 store that lists
        otherwise (see :class:`~conduit.transfer.FileListing`). A server of
        before 2026-12-07 does not page (``next`` is None; one of 2026-12-07
        pages only local storage). Check ``truncated`` before treating the
        listing as everything there is. :meth:`list_all_files` goes page
        after page, and checks that no page repeats a file (a loop of one's
        own must: a server could list without end).
        """
        return await self._listed_page(client, prefix, after)

    @bridged
    async def list_all_files(self, client: Client, *, prefix: str | None = None) -> FileListing:
        """Every file the server lists (under the directory ``prefix``), page
        after page, sorted by name: what ``conduit ls`` and a directory's
        download gather.

        Each page is checked as by :meth:`list_files`, and a page that names a
        file an earlier one did is refused (:class:`~conduit.TransferError`
        ``bad_answer``: a server could list without end). Up to 200,000 files
        or 64 MiB of names (their UTF-8 bytes): a server that listed without
        end must not take all of this side's memory. Past that, or from a
        server that does not page (one of before 2026-12-07), the result is
        ``truncated``; its ``next`` is where the next page would start.
        """
        listing = await self._listed_page(client, prefix, None)
        gathered = GatheredListing()
        gathered.add(listing)
        while listing.next is not None and not gathered.full:
            page = await self._listed_page(client, prefix, listing.next)
            gathered.add(page)
            listing.extend(page)
            listing.truncated, listing.next = page.truncated, page.next
        listing.sort(key=listed_name)  # each page is; the pages follow the storage's order
        return listing

    async def _listed_page(
        self, client: Client, prefix: str | None, after: str | None
    ) -> FileListing:
        answer = await client.call(FILE_LIST, listing_arguments(prefix, after))
        # The server adds "truncated" only when it cut the list; older ones never do.
        page = listing_answer(answer, prefix)
        return FileListing(page.files, truncated=page.truncated, next=page.next)

    @bridged
    async def delete(self, client: Client, name: str) -> dict[str, Any]:
        """Delete the server's file ``name``: ``{"success": True, "path": name}`` or a failure.

        Failure codes: ``not_found``, ``busy`` (a transfer is writing it),
        ``unsafe_path`` (a symlink, directory or refused name).
        """
        return await manage.delete(client.server, name)

    @bridged
    async def rename(
        self, client: Client, old: str, new: str, *, overwrite: bool = False
    ) -> dict[str, Any]:
        """Rename the server's file ``old`` to ``new`` (directories created as needed).

        Atomic; an existing ``new`` is refused with code ``exists`` unless
        ``overwrite=True``. Returns ``{"success": True, "old": old, "path":
        new}`` or a failure (codes as :meth:`delete`, plus ``exists``).
        """
        return await manage.rename(client.server, old, new, overwrite=overwrite)


__all__ = ["FileTransferHandler"]
