"""Whole directories: ``send_to_server(client, a_directory)`` and its download twin.

A directory's files are sent each exactly like a single file (same names
rules, same verification, resume and re-run rules, and each on its own
survives a reconnect like a single transfer; the small ones many per call, see
:mod:`._batch`), under
``REMOTE_NAME/relative/path`` so the layout is kept. Downloading a name that
is a directory on the server lists the files under it (``file_list`` with a
``prefix``) and downloads each into ``local_dir`` under its full name.

The local walk never follows a symbolic link: a link (to a file or a
directory) and a special file (FIFO, device, socket) each become a failed entry
with code ``"unsafe_path"`` or ``"not_a_file"``. Each directory is listed
through a descriptor opened with ``O_NOFOLLOW``, and each file is then opened
through its directory, checked to be the one listed
(:class:`._local.WalkedDirectories`), with ``O_NOFOLLOW``: a link swapped in
after the walk, for the file or for any directory of the tree, is refused
too (``unsafe_path``). Hidden
entries (``.git``, ``.DS_Store``) are skipped, not failed: no receiver accepts
hidden names. The result::

    {"success": all entries succeeded,
     "directory": the remote name of the directory,
     "files": [{"name": remote name, "local": local path, **that file's result}, ...],
     "transferred": n, "skipped": n, "failed": n}

where each file's result is what a single transfer returns (a re-run's
unchanged files have ``"skipped": True, "reason": "already_there"``, hidden
ones ``"skipped": True, "reason": "hidden"``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import trio

from .. import _threads
from ..errors import ConduitError
from ._answers import ListedPage, listing_answer, listing_arguments
from ._batch import LocalFile, send_small_files
from ._batch_download import receive_small_files
from ._listing import GatheredListing
from ._local import DirectoryId, directory_id
from ._names import MAX_DEPTH, is_text, safe_relative_name
from ._progress import TransferProgress
from ._turns import Attempt
from ._wire import FILE_LIST, transfer_failure

if TYPE_CHECKING:
    from .._peer import Peer
    from ._receiver import Receiver
    from ._sender import Sender

#: Files of one directory transferred at once over the connection, of those
#: larger than MEDIUM_FILE_SIZE (or of a size not known); also the groups of
#: small files read and held for batches at once (see ._batch).
PARALLEL_FILES = 4
#: Files up to MEDIUM_FILE_SIZE transferred at once, one by one (over the
#: small-file limit, so not batched). Each costs two or three round trips
#: besides its bytes, so on a long link more of them in flight is what keeps
#: it busy: 50 files of 200 KiB over 80 ms took 2.3 s with 4 at once, 0.7 s
#: with 16. Twelve, not 16: each stream holds a receive window (4 MiB by
#: default) of the receiver's connection budget (64 MiB), and a push or
#: another transfer beside the directory should still find room.
PARALLEL_MEDIUM_FILES = 12
#: The largest file that counts as medium: under the 2 MiB after which a
#: receiver gives a transfer a writer thread of its own (see ._write_behind),
#: so a directory of them holds none.
MEDIUM_FILE_SIZE = 1024 * 1024

#: Runs one attempt (a call on a peer, returning a result dict) on the
#: client's connection, again after each reconnect: ``on_client`` bound to
#: the client, so every file of a tree survives a cut on its own.
OnPeer = Callable[[Attempt], Awaitable[dict[str, Any]]]
ProgressCallback = Callable[[TransferProgress], Any]


@attrs.define
class _Entry:
    name: str
    local: str
    result: dict[str, Any] | None = None
    #: Its size as known before the transfer: what the server's listing gave
    #: (downloads) or a look at the local file (uploads); None when not known.
    size: int | None = None
    #: The directory a walk listed it in (uploads of a directory); None for a
    #: path the caller named (links followed).
    within: DirectoryId | None = None


FileTransfer = Callable[[_Entry], Awaitable[dict[str, Any]]]


def _entry_name(entry: _Entry) -> str:
    return entry.name


def _failed(message: str, code: str) -> dict[str, Any]:
    return {"success": False, "error": message, "code": code}


_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK | os.O_CLOEXEC


def walk_local(top: Path, prefix: str) -> list[_Entry]:
    """The entries under ``top`` to send as ``prefix/relative``; links are never followed.

    Each directory is listed through a descriptor (a subdirectory's opened
    with ``O_NOFOLLOW`` in its parent's), and each file's entry records the
    identity of the directory listed, through which it is opened later.
    """
    entries: list[_Entry] = []

    def visit(dir_fd: int, path: str, relative: tuple[str, ...]) -> None:
        within = directory_id(os.fstat(dir_fd))
        try:
            with os.scandir(dir_fd) as iterator:
                children = sorted(iterator, key=lambda entry: entry.name)
        except OSError as exc:
            cannot_read(path, relative, exc)
            return
        for child in children:
            parts = (*relative, child.name)
            name = "/".join(part for part in (prefix, *parts) if part)
            entry = _Entry(name, os.path.join(path, child.name), within=within)
            if child.name.startswith("."):
                entry.result = {"success": True, "skipped": True, "reason": "hidden"}
            elif not is_text(child.name):
                # Its own failure (a directory's: its whole subtree): sent, it
                # failed the call of every file in its batch.
                entry.result = _failed(
                    f"{os.fsencode(child.name)!r} is not UTF-8: a name must be text",
                    "unsafe_path",
                )
            elif child.is_symlink():
                entry.result = _failed("a symbolic link; not followed", "unsafe_path")
            elif child.is_dir(follow_symlinks=False):
                if len(parts) < MAX_DEPTH:
                    descend(dir_fd, entry.local, parts)
                    continue
                entry.result = _failed(f"nested deeper than {MAX_DEPTH} levels", "unsafe_path")
            elif not child.is_file(follow_symlinks=False):
                entry.result = _failed("not a regular file (FIFO, device or socket)", "not_a_file")
            entries.append(entry)

    def descend(parent_fd: int, path: str, relative: tuple[str, ...]) -> None:
        try:
            # Not followed: a link swapped in since the listing is refused.
            dir_fd = os.open(relative[-1], _DIRECTORY_FLAGS | os.O_NOFOLLOW, dir_fd=parent_fd)
        except OSError as exc:
            cannot_read(path, relative, exc)
            return
        try:
            visit(dir_fd, path, relative)
        finally:
            os.close(dir_fd)

    def cannot_read(path: str, relative: tuple[str, ...], exc: OSError) -> None:
        name = "/".join((prefix, *relative)) or "."
        entries.append(_Entry(name, path, _failed(f"cannot read: {exc}", "io_error")))

    # The top directory is the caller's choice: it may be a link.
    try:
        top_fd = os.open(top, _DIRECTORY_FLAGS)
    except (FileNotFoundError, NotADirectoryError):
        raise  # not a directory to send: the caller's mistake, raised as before the walk
    except OSError as exc:  # there, but it may not be listed: the tree's one failed entry
        cannot_read(os.fspath(top), (), exc)
        return entries
    try:
        visit(top_fd, os.fspath(top), ())
    finally:
        os.close(top_fd)
    return entries


def local_directory_name(top: Path) -> str:
    """The name of the directory ``top`` points at, for ``"."`` and ``".."`` too.

    ``Path("..").name`` is ``".."`` (and ``Path(".").name`` is ``""``): not a
    name but a step, which as a remote segment would be refused as unsafe.
    Those take the name from the resolved path (links followed, as the walk of
    ``top`` itself does); ``"/"`` has none and gives ``""`` (the remote root).
    """
    if top.name not in ("", ".", ".."):
        return top.name
    return Path(os.path.realpath(top)).name


def remote_prefix(top: Path, remote_name: str | None) -> str:
    """The remote directory name: ``remote_name`` or the local directory's own name."""
    if remote_name is None:
        remote_name = local_directory_name(top)
    remote_name = remote_name.strip("/")
    return safe_relative_name(remote_name) if remote_name else ""


class FilePlaces:
    """The places of files that move one by one: ``at_once`` in all, of which
    ``large_at_once`` larger than :data:`MEDIUM_FILE_SIZE` (or of a size not known).

    ::

        places = FilePlaces()
        async with places.taken(size):
            ...  # transfer the file
    """

    def __init__(
        self, at_once: int = PARALLEL_MEDIUM_FILES, large_at_once: int = PARALLEL_FILES
    ) -> None:
        self._any = trio.CapacityLimiter(at_once)
        self._large = trio.CapacityLimiter(min(large_at_once, at_once))

    @contextlib.asynccontextmanager
    async def taken(self, size: int | None) -> AsyncIterator[None]:
        """Hold a place for a file of ``size`` bytes (None: not known) while inside."""
        if size is not None and size <= MEDIUM_FILE_SIZE:
            async with self._any:
                yield
            return
        # The scarcer place first, so a large file that waits for it keeps no
        # medium one out.
        async with self._large, self._any:
            yield


async def transfer_all(entries: list[_Entry], transfer: FileTransfer) -> None:
    """Run ``transfer(entry)`` for every entry without a result yet, a few at a
    time (:class:`FilePlaces`)."""
    places = FilePlaces()

    async def one(entry: _Entry) -> None:
        async with places.taken(entry.size):
            entry.result = await transfer(entry)

    async with trio.open_nursery() as nursery:
        for entry in entries:
            if entry.result is None:
                nursery.start_soon(one, entry)


def tree_result(directory: str, entries: list[_Entry], **extra: Any) -> dict[str, Any]:
    """The documented result of a directory transfer (see the module docstring)."""
    files = [{"name": e.name, "local": e.local, **(e.result or {})} for e in entries]
    failed = sum(1 for f in files if not f.get("success"))
    skipped = sum(1 for f in files if f.get("success") and f.get("skipped"))
    return {
        "success": failed == 0 and not extra.get("error"),
        "directory": directory,
        "files": files,
        "transferred": len(files) - failed - skipped,
        "skipped": skipped,
        "failed": failed,
        **extra,
    }


def remote_entries(listing: Any, prefix: str, local_dir: Path) -> tuple[list[_Entry], ListedPage]:
    """The files a ``file_list(prefix=...)`` answer names, each to land at
    ``local_dir/name``, and the checked page (whether the server cut the
    listing short, where its next page starts).

    The server is not trusted: the answer is checked (:func:`._answers.listing_answer`:
    a map whose ``files`` are maps, each with a name that is already a safe
    relative name under ``prefix``), and anything else raises
    :class:`BadAnswer` (``bad_answer``) before a single file is fetched or a
    local path is made from it.
    """
    page = listing_answer(listing, prefix)
    entries = [
        _Entry(item["name"], str(local_dir / item["name"]), size=item["size"])
        for item in page.files
    ]
    return entries, page


async def send_tree(
    sender: Sender,
    on_peer: OnPeer,
    top: Path,
    remote_name: str | None,
    on_progress: ProgressCallback | None,
) -> dict[str, Any]:
    """Upload every file under ``top`` (``send_to_server`` on a directory)."""
    prefix = remote_prefix(top, remote_name)
    entries = await _threads.run_sync(walk_local, top, prefix)
    await send_entries(sender, on_peer, entries, on_progress)
    return tree_result(prefix, entries)


async def send_files(
    sender: Sender,
    on_peer: OnPeer,
    files: Sequence[str | os.PathLike[str] | tuple[str | os.PathLike[str], str]],
    on_progress: ProgressCallback | None,
) -> list[dict[str, Any]]:
    """Upload ``files`` (paths, or (path, remote name) pairs); one result each, in order."""
    entries = []
    for item in files:
        local, remote = item if isinstance(item, tuple) else (item, None)
        entry = _Entry("", os.fspath(local))
        try:
            entry.name = safe_relative_name(Path(local).name if remote is None else remote)
        except ConduitError as exc:
            entry.name, entry.result = str(remote), transfer_failure(exc)
        entries.append(entry)
    await send_entries(sender, on_peer, entries, on_progress)
    return [entry.result or {} for entry in entries]


async def send_entries(
    sender: Sender,
    on_peer: OnPeer,
    entries: list[_Entry],
    on_progress: ProgressCallback | None,
) -> None:
    """Upload every entry without a result yet: small files many per call, the rest one by one.

    An entry a walk found (``within``) is opened through its directory; one
    the caller named, as the caller named it (links followed).
    """

    async def upload(entry: _Entry) -> dict[str, Any]:
        try:
            return await on_peer(
                lambda peer: sender.send(
                    peer, entry.local, entry.name, on_progress, "upload", within=entry.within
                )
            )
        except (OSError, ConduitError) as exc:
            return transfer_failure(exc)

    pending: list[LocalFile] = [
        (i, e.name, e.local, e.within) for i, e in enumerate(entries) if e.result is None
    ]
    results = await send_small_files(
        on_peer, pending, sender.small_file_limit, PARALLEL_FILES, on_progress
    )
    for index, result in results.items():
        entries[index].result = result
    await _threads.run_sync(_look_at_sizes, entries)
    await transfer_all(entries, upload)


def _look_at_sizes(entries: list[_Entry]) -> None:
    """Each local file's size, for the ones still to send (a file that cannot be
    looked at is left to its transfer, which reports why). Only an order: the
    largest go first; what is sent is what the transfer opens."""
    for entry in entries:
        if entry.result is None:
            try:
                entry.size = os.stat(entry.local, follow_symlinks=entry.within is None).st_size
            except OSError:
                entry.size = None


async def receive_tree(
    receiver: Receiver,
    on_peer: OnPeer,
    name: str,
    local_dir: Path,
    on_progress: ProgressCallback | None,
    *,
    small_file_limit: int,
) -> dict[str, Any]:
    """Download every file under the server's directory ``name`` into ``local_dir/name``:
    those listed up to ``small_file_limit`` bytes many per call (see
    :mod:`._batch_download`), the rest one by one."""
    prefix = safe_relative_name(name)
    entries: list[_Entry] = []
    after: str | None = None
    truncated = True
    gathered = GatheredListing()
    # Page after page (a server answers at most its max_listed files, fewer
    # when their names are long), up to what this side takes (see
    # _listing.gathered_enough): a server that never ends its listing must not
    # make this side hold files without end.
    while truncated and not gathered.full:
        arguments = listing_arguments(prefix, after)

        async def list_once(peer: Peer, arguments: dict[str, str] = arguments) -> dict[str, Any]:
            # A result dict, so that on_peer retries a listing cut by a lost link.
            try:
                return {"success": True, "listing": await peer.call(FILE_LIST, arguments)}
            except ConduitError as exc:
                return transfer_failure(exc)

        listed = await on_peer(list_once)
        if not listed.get("success"):
            return {**listed, "directory": prefix, "files": []}
        try:
            found, page = remote_entries(listed["listing"], prefix, local_dir)
            gathered.add(page.files)
        except ConduitError as exc:
            return {**transfer_failure(exc), "directory": prefix, "files": []}
        entries.extend(found)
        truncated = page.truncated
        if page.next is None:
            break  # whole, or cut by a server that does not page
        after = page.next
    # Each page is in name order, the pages in the storage's: the result is in
    # name order, as a local walk's (a store such as SeaweedFS lists otherwise).
    entries.sort(key=_entry_name)

    await receive_entries(
        receiver, on_peer, entries, local_dir, on_progress, small_file_limit=small_file_limit
    )
    extra: dict[str, Any] = {}
    if truncated:
        extra = {"error": "the server listed only part of the directory", "code": "truncated"}
    return tree_result(prefix, entries, **extra)


async def receive_files(
    receiver: Receiver,
    on_peer: OnPeer,
    names: Sequence[str],
    local_dir: Path,
    on_progress: ProgressCallback | None,
    *,
    small_file_limit: int,
    sizes: Sequence[int | None] | None = None,
) -> list[dict[str, Any]]:
    """Download the server's files ``names`` into ``local_dir``; one result each, in order
    (``sizes``: what a listing gave for each, or None)."""
    entries = []
    for name, size in zip(names, sizes or [None] * len(names), strict=True):
        entry = _Entry(str(name), "", size=size)
        try:
            entry.name = safe_relative_name(name)
            entry.local = str(local_dir / entry.name)
        except ConduitError as exc:
            entry.result = transfer_failure(exc)
        entries.append(entry)
    await receive_entries(
        receiver, on_peer, entries, local_dir, on_progress, small_file_limit=small_file_limit
    )
    return [entry.result or {} for entry in entries]


async def receive_entries(
    receiver: Receiver,
    on_peer: OnPeer,
    entries: list[_Entry],
    local_dir: Path,
    on_progress: ProgressCallback | None,
    *,
    small_file_limit: int,
) -> None:
    """Download every entry without a result yet: the small ones (by the size listed,
    or any whose size is not known) many per call, the rest one by one."""
    pending = [
        (index, entry.name, entry.size)
        for index, entry in enumerate(entries)
        if entry.result is None
    ]
    results = await receive_small_files(
        receiver,
        on_peer,
        pending,
        local_dir,
        limit=small_file_limit,
        parallel=PARALLEL_FILES,
        on_progress=on_progress,
    )
    for index, result in results.items():
        entries[index].result = result

    async def download(entry: _Entry) -> dict[str, Any]:
        remote = entry.name
        # One file's failure is that file's result, as in send_tree: never an
        # exception that would cancel its siblings and escape as a group.
        try:
            return await on_peer(
                lambda peer: receiver.download(peer, remote, local_dir, on_progress)
            )
        except (OSError, ConduitError) as exc:
            return transfer_failure(exc)

    await transfer_all(entries, download)
