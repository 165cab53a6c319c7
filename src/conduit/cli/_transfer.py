"""``conduit send``, ``get``, ``ls``, ``rm`` and ``mv``: the client side of file transfer."""

from __future__ import annotations

import datetime
import os
import stat
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

from .. import Client, ConduitError, FileTransferHandler, UnsafePathError
from ..errors import failure_dict
from ..transfer._names import safe_relative_name
from ..transfer._tree import FilePlaces, local_directory_name
from ._common import (
    Address,
    ClientOptions,
    CLIError,
    ExitCode,
    Signals,
    connected,
    emit_json,
    human_bytes,
    print_error,
    printable,
)
from ._display import (
    RECONNECTED_LINE,
    Display,
    FileJob,
    ProgressCallback,
    Verb,
    file_jobs,
    make_display,
    reconnecting_line,
)

Transfer = Callable[[FileJob, ProgressCallback | None], Awaitable[dict[str, Any]]]
#: Sends several jobs in one go; one result per job, in order.
GroupTransfer = Callable[[Sequence[FileJob]], Awaitable[list[dict[str, Any]]]]
#: Small files handed to ``send_files_to_server`` or ``receive_files_from_server``
#: at once (one batch call each).
GROUP_FILES = 64


@attrs.frozen
class Skipped:
    """A local entry ``conduit send DIR`` leaves out, and why."""

    local: str
    reason: str
    #: Meant to be sent but it could not be read (a permission refused, a
    #: dangling link, an I/O error): a failure, not a choice like a hidden name.
    failed: bool = False

    def to_json(self) -> dict[str, str | bool]:
        """The ``skipped`` entry of the ``--json`` document."""
        return {"local": self.local, "reason": self.reason, "failed": self.failed}


# --------------------------------------------------------------------------- planning


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _is_directory(path: Path) -> bool:
    """Whether ``path`` is a directory (following a link); False when it cannot be
    told (a path too long for the system): sent as a file, it fails as one."""
    try:
        return path.is_dir()
    except OSError:
        return False


def collect_uploads(
    sources: Sequence[Path], rename: str | None = None
) -> tuple[list[FileJob], list[Skipped]]:
    """Turn ``conduit send`` arguments into files to upload and entries to skip.

    A file is sent under its base name (or ``rename``). A directory is walked
    recursively and each file sent as ``DIRNAME/relative/path`` (``rename``
    replaces ``DIRNAME``), so the tree keeps its layout on the server. Hidden
    entries (the server refuses hidden names), special files and symbolic links
    to directories are skipped and reported.
    """
    if rename is not None and len(sources) != 1:
        raise CLIError("--as needs exactly one FILE_OR_DIR")
    if rename == "":
        # Most likely an unset "$NAME": a directory's files would land in
        # the server's root. Saying so takes "--as /".
        raise CLIError("--as needs a name (--as / sends a directory's files into the root)")
    jobs: list[FileJob] = []
    skipped: list[Skipped] = []
    seen: set[tuple[str, str]] = set()

    def add(local: Path, name: str, size: int | None) -> None:
        key = (os.path.realpath(local), name)
        if key not in seen:  # the same file twice would race itself
            seen.add(key)
            jobs.append(FileJob(name=name, local=str(local), size=size))

    for source in sources:
        if not _is_directory(source):
            if rename is not None and not rename.strip("/"):
                # Said before connecting: the server would refuse the name.
                raise CLIError(
                    f"--as {rename} sends a directory's files into the root; "
                    f"{source} is not a directory: give the file a name"
                )
            try:
                size: int | None = source.stat().st_size
            except OSError:
                size = None  # the library reports the problem when sending
            add(source, rename if rename is not None else source.name, size)
            continue
        # (.. and . take the name of the directory they resolve to, as the library does)
        top = rename if rename is not None else local_directory_name(source)
        top = top.strip("/")

        def on_error(error: OSError) -> None:
            skipped.append(
                Skipped(str(error.filename), f"cannot read: {error.strerror}", failed=True)
            )

        for root, dirs, files in os.walk(source, onerror=on_error):
            root_path = Path(root)
            keep = []
            for directory in sorted(dirs):
                path = root_path / directory
                if _is_hidden(directory):
                    skipped.append(Skipped(str(path), "hidden (servers refuse hidden names)"))
                    continue
                try:
                    is_link = stat.S_ISLNK(os.lstat(path).st_mode)
                except OSError as exc:
                    # A path the system cannot take (longer than PATH_MAX), or
                    # an entry gone since it was listed: that subtree is not
                    # sent, and says so (until 2026-12-07 the error ended the
                    # command with a traceback, nothing sent).
                    skipped.append(Skipped(str(path), f"cannot read: {exc.strerror}", failed=True))
                    continue
                if is_link:
                    skipped.append(Skipped(str(path), "symbolic link to a directory"))
                else:
                    keep.append(directory)
            dirs[:] = keep
            for file in sorted(files):
                path = root_path / file
                if _is_hidden(file):
                    skipped.append(Skipped(str(path), "hidden (servers refuse hidden names)"))
                    continue
                try:
                    info = path.stat()
                except OSError as exc:
                    skipped.append(Skipped(str(path), f"cannot read: {exc.strerror}", failed=True))
                    continue
                if not stat.S_ISREG(info.st_mode):
                    skipped.append(Skipped(str(path), "not a regular file"))
                    continue
                relative = path.relative_to(source).as_posix()
                add(path, f"{top}/{relative}" if top else relative, info.st_size)
    return jobs, skipped


# --------------------------------------------------------------------------- running


async def _run_jobs(
    jobs: Sequence[FileJob],
    transfer: Transfer,
    display: Display,
    parallel: int | None,
    group: tuple[int, GroupTransfer] | None = None,
) -> None:
    """Run every job, ``parallel`` at a time (None: as the library moves a
    directory's files, see :class:`~conduit.transfer._tree.FilePlaces`).

    With ``group = (limit, send)``, the jobs of at most ``limit`` bytes go
    :data:`GROUP_FILES` at a time through ``send`` (many files per call); each
    group takes a place of a large file, and its files get their lines as the
    group ends (no bar: each is done in one step).
    """
    places = FilePlaces() if parallel is None else FilePlaces(parallel, parallel)

    async def one(job: FileJob) -> None:
        async with places.taken(job.size):
            on_progress = display.file_started(job)
            try:
                job.result = await transfer(job, on_progress)
            except (OSError, ConduitError) as exc:
                job.result = failure_dict(exc)
            display.file_finished(job)

    async def several(batch: Sequence[FileJob], send: GroupTransfer) -> None:
        # As many bytes held as a large file may (up to GROUP_FILES small files).
        async with places.taken(None):
            try:
                results = await send(batch)
            except (OSError, ConduitError) as exc:
                results = [failure_dict(exc)] * len(batch)
            for job, result in zip(batch, results, strict=True):
                job.result = result
                display.file_finished(job)

    grouped: list[FileJob] = []
    if group is not None:
        limit = group[0]
        grouped = [job for job in jobs if job.size is not None and job.size <= limit]
    async with trio.open_nursery() as nursery:
        if group is not None:
            for start in range(0, len(grouped), GROUP_FILES):
                nursery.start_soon(several, grouped[start : start + GROUP_FILES], group[1])
        alone = {id(job) for job in grouped}
        for job in jobs:
            if id(job) not in alone:
                nursery.start_soon(one, job)


async def _transfer_files(
    verb: Verb,
    jobs: Sequence[FileJob],
    transfer: Transfer,
    *,
    parallel: int | None,
    json_output: bool,
    client: Client,
    group: tuple[int, GroupTransfer] | None = None,
    unread: int = 0,
) -> float:
    """Run every job with a display; return the elapsed time (``unread``: local
    entries that could not be read, failures the summary counts)."""
    display = make_display(verb, jobs, json_output=json_output, unread=unread)
    attempts = client.descriptor.reconnect_attempts
    client.on_reconnecting(
        lambda attempt, delay: display.status(reconnecting_line(attempt, attempts, delay))
    )
    client.on_reconnect(lambda: display.status(RECONNECTED_LINE))
    started = time.monotonic()
    with display:
        interrupted = True
        try:
            await _run_jobs(jobs, transfer, display, parallel, group)
            interrupted = False
        finally:
            display.finished(jobs, time.monotonic() - started, interrupted)
    return time.monotonic() - started


def _exit_code(
    jobs: Sequence[FileJob], signals: Signals, *, unread: bool = False, refused: bool = False
) -> ExitCode:
    """The exit code: ``unread`` when local entries meant to be sent could not be
    read; ``refused`` when the automatic reconnect was refused the password,
    so that the transfers that failed exit as a refused password does (3).

    A signal that came once every file had arrived cut nothing: 0, as if it
    had come a moment later (it was 130 until 2026-12-07, a review found,
    for a run whose summary said every file was there)."""
    if _cut_short(jobs, signals, unread=unread):
        return signals.exit_code
    if not _complete(jobs, unread=unread):
        return ExitCode.AUTH_FAILED if refused else ExitCode.TRANSFER_FAILED
    return ExitCode.OK


def _complete(jobs: Sequence[FileJob], *, unread: bool) -> bool:
    """Whether every file arrived (and every local entry could be read)."""
    return not unread and all(job.success for job in file_jobs(jobs))


def _cut_short(jobs: Sequence[FileJob], signals: Signals, *, unread: bool) -> bool:
    """Whether a signal stopped the run before every file had arrived."""
    return signals.received is not None and not _complete(jobs, unread=unread)


def _report(
    command: str,
    address: Address,
    jobs: Sequence[FileJob],
    signals: Signals,
    elapsed: float,
    *,
    unread: bool = False,
    **extra: Any,
) -> None:
    emit_json(
        {
            "command": command,
            "server": str(address),
            "ok": _exit_code(jobs, signals, unread=unread) == ExitCode.OK,
            "interrupted": _cut_short(jobs, signals, unread=unread),
            "elapsed": elapsed,
            "files": [job.to_json() for job in file_jobs(jobs)],
            **extra,
        }
    )


def _fatal_json(command: str, address: Address, error: CLIError) -> None:
    emit_json(
        {
            "command": command,
            "server": str(address),
            "ok": False,
            "error": error.message,
            "exit_code": int(error.exit_code),
        }
    )


# --------------------------------------------------------------------------- send


async def send(
    signals: Signals,
    options: ClientOptions,
    jobs: list[FileJob],
    skipped: list[Skipped],
    *,
    parallel: int | None,
    json_output: bool,
) -> int:
    """``conduit send``: upload every job; the exit code says how it went."""
    unread = sum(entry.failed for entry in skipped)
    if not json_output:
        for entry in skipped:
            label = "FAILED  " if entry.failed else "skipped "
            # Local names too may hold escape sequences or newlines (a tree
            # unpacked from an archive): shown escaped, as every other line.
            print(printable(f"{label}  {display_path(entry.local)}: {entry.reason}"), flush=True)
    elapsed = 0.0
    started = time.monotonic()
    refused = False
    try:
        with signals.cancel_on_signal():
            async with connected(options) as client:
                handler = FileTransferHandler()

                async def upload(job: FileJob, on_progress: ProgressCallback | None) -> Any:
                    assert job.local is not None
                    return await handler.send_to_server(
                        client, job.local, on_progress, remote_name=job.name
                    )

                async def upload_group(group: Sequence[FileJob]) -> list[dict[str, Any]]:
                    files = [(job.local or "", job.name) for job in group]
                    return await handler.send_files_to_server(client, files)

                if not jobs and not json_output:
                    print("nothing to send", flush=True)
                await _transfer_files(
                    "send",
                    jobs,
                    upload,
                    parallel=parallel,
                    json_output=json_output,
                    client=client,
                    # Small files many per call (send_files_to_server batches them).
                    group=(handler.chunk_size, upload_group),
                    unread=unread,
                )
                refused = client.reconnect_refused is not None
    except CLIError as exc:
        if json_output:
            _fatal_json("send", options.address, exc)
        raise
    elapsed = time.monotonic() - started
    if json_output:
        _report(
            "send",
            options.address,
            jobs,
            signals,
            elapsed,
            unread=bool(unread),
            skipped=[entry.to_json() for entry in skipped],
        )
    return _exit_code(jobs, signals, unread=bool(unread), refused=refused)


# --------------------------------------------------------------------------- get


def _listed_time(entry: dict[str, Any]) -> str:
    """A listed file's modification time as ``ls`` shows it (16 characters).

    The server's to give: a time past the year 9999 (a tmpfs allows it), or
    no number at all, is shown as unknown rather than end ``ls`` with a
    traceback (``--json`` gives it as it came).
    """
    try:
        modified = datetime.datetime.fromtimestamp(float(entry["modified"]))
    except (TypeError, ValueError, OverflowError, OSError, KeyError):
        return "????-??-?? ??:??"
    return f"{modified:%Y-%m-%d %H:%M}"


def download_name(name: str) -> str:
    """NAME as the server names it: ``./photos/`` is ``photos``, ``a//b`` is ``a/b``.

    The server lists and stores names in this form only, so planning must ask
    for it (``./photos`` is a prefix of no listed name). A name the library
    refuses (``..``, an absolute path) is kept as given: its download then
    fails with ``unsafe_path``, as any refused name does.
    """
    try:
        # A trailing "/" says "a directory"; the name itself has none.
        return safe_relative_name(name.rstrip("/"))
    except UnsafePathError:
        return name


async def _plan_name(handler: FileTransferHandler, client: Client, name: str) -> list[FileJob]:
    """The jobs for one NAME: every file under it when it is a directory listed in full.

    Only that directory is listed (``file_list`` with a prefix), never the
    whole server, whose listing is cut at ``max_listed`` files and so may miss
    the directory entirely or in part. Anything else is one job by name: a
    file, a missing name and an empty directory list as empty, a refused name
    or a lost connection fails the listing, and a directory listed only in
    part is fetched whole by ``receive_from_server``, whose result names its
    files and says it is incomplete (code ``truncated``).
    """
    try:
        safe_relative_name(name)
    except UnsafePathError:
        # Never a listing: "" lists the whole server (an unset "$NAME" in a
        # script fetched every file), "." its root. Its download says why.
        return [FileJob(name=name, local=None, size=None)]
    try:
        listing = await handler.list_files(client, prefix=name)
    except ConduitError:
        return [FileJob(name=name, local=None, size=None)]
    if not listing or listing.truncated:
        return [FileJob(name=name, local=None, size=None)]
    entries = sorted(listing, key=lambda entry: str(entry["name"]))
    return [FileJob(name=str(e["name"]), local=None, size=int(e["size"])) for e in entries]


async def _plan_downloads(
    handler: FileTransferHandler, client: Client, names: Sequence[str]
) -> list[FileJob]:
    """Expand each NAME: a file on the server, or a directory (every file under it)."""
    jobs: list[FileJob] = []
    seen: set[str] = set()
    for given in names:
        for job in await _plan_name(handler, client, download_name(given)):
            if job.name not in seen:  # the same file twice would race itself
                seen.add(job.name)
                jobs.append(job)
    return jobs


def _is_tree(result: dict[str, Any]) -> bool:
    """Whether ``result`` is a directory download's (``receive_tree``): files, no path."""
    return "path" not in result and isinstance(result.get("files"), list)


def _tree_parts(name: str, result: dict[str, Any]) -> list[FileJob]:
    """A directory download's result as one finished job per file.

    Plus one failed job for the directory itself when it failed as a whole:
    its listing failed, or was cut short (the server's ``max_listed``, or
    what fits in one message: the files listed were received; the others were
    not, and must not pass unnoticed).
    """
    parts: list[FileJob] = []
    for entry in result["files"]:
        if not isinstance(entry, dict):
            continue
        outcome = {k: v for k, v in entry.items() if k not in ("name", "local")}
        path = outcome.get("path")
        local = display_path(str(path)) if outcome.get("success") and path else None
        size = outcome.get("size")
        parts.append(
            FileJob(
                name=str(entry.get("name")),
                local=local,
                size=size if isinstance(size, int) else None,
                result=outcome,
            )
        )
    if result.get("error") is not None:
        error = str(result["error"])
        if result.get("code") == "truncated":
            error = (
                f"only {len(parts)} files of this directory were listed (all a "
                "server that does not page answers at once, or all this side "
                "takes); the others were not received: get its subdirectories "
                "one at a time"
            )
        failure = {"success": False, "error": error, "code": result.get("code")}
        parts.append(FileJob(name=name, local=None, size=None, result=failure))
    return parts


def display_path(path: str | os.PathLike[str]) -> str:
    """``path`` as a user reads it: relative to here when below here, else absolute; no ``..``."""
    absolute = os.path.normpath(os.path.abspath(path))
    try:
        relative = os.path.relpath(absolute)
    except ValueError:
        return absolute
    return absolute if relative.startswith("..") else relative


async def get(
    signals: Signals,
    options: ClientOptions,
    names: Sequence[str],
    output_dir: Path,
    *,
    overwrite: bool,
    parallel: int | None,
    json_output: bool,
) -> int:
    """``conduit get``: download every NAME into ``output_dir``."""
    jobs: list[FileJob] = []
    started = time.monotonic()
    refused = False
    try:
        with signals.cancel_on_signal():
            async with connected(options) as client:
                handler = FileTransferHandler(overwrite=overwrite)
                jobs = await _plan_downloads(handler, client, names)

                async def download(job: FileJob, on_progress: ProgressCallback | None) -> Any:
                    result = await handler.receive_from_server(
                        client, job.name, output_dir, on_progress
                    )
                    if _is_tree(result):
                        # A directory the plan did not expand: report its files.
                        job.parts = _tree_parts(job.name, result)
                    elif result.get("success") and "path" in result:
                        job.local = display_path(str(result["path"]))
                    return result

                async def download_group(group: Sequence[FileJob]) -> list[dict[str, Any]]:
                    names, sizes = [job.name for job in group], [job.size for job in group]
                    results = await handler.receive_files_from_server(
                        client, names, output_dir, sizes=sizes
                    )
                    for job, result in zip(group, results, strict=True):
                        if result.get("success") and "path" in result:
                            job.local = display_path(str(result["path"]))
                    return results

                await _transfer_files(
                    "get",
                    jobs,
                    download,
                    parallel=parallel,
                    json_output=json_output,
                    client=client,
                    # Small files many per call (receive_files_from_server batches them).
                    group=(handler.chunk_size, download_group),
                )
                refused = client.reconnect_refused is not None
    except CLIError as exc:
        if json_output:
            _fatal_json("get", options.address, exc)
        raise
    if json_output:
        _report("get", options.address, jobs, signals, time.monotonic() - started)
    return _exit_code(jobs, signals, refused=refused)


# --------------------------------------------------------------------------- ls


async def ls(signals: Signals, options: ClientOptions, *, json_output: bool) -> int:
    """``conduit ls``: the server's files, one per line (or ``--json``).

    Page after page (a server answers at most its ``max_listed`` files at
    once), up to what this side takes (``FileTransferHandler.list_all_files``); a
    listing cut short all the same (that many files, or a server that does
    not page) says so (``"truncated": true``) and exits 1: it is not
    everything the server holds.
    """
    try:
        async with connected(options) as client:
            try:
                files = await FileTransferHandler().list_all_files(client)
            except ConduitError as exc:
                raise CLIError(
                    f"{options.address} could not list its files: {exc}",
                    ExitCode.TRANSFER_FAILED,
                ) from None
    except CLIError as exc:
        if json_output:
            _fatal_json("ls", options.address, exc)
        raise
    code = ExitCode.TRANSFER_FAILED if files.truncated else ExitCode.OK
    if json_output:
        emit_json(
            {
                "command": "ls",
                "server": str(options.address),
                "ok": code == ExitCode.OK,
                "truncated": files.truncated,
                "files": files,
            }
        )
        return code
    for entry in files:
        # (Names are safe relative names: list_files checked them.)
        print(f"{human_bytes(int(entry['size'])):>11}  {_listed_time(entry)}  {entry['name']}")
    total = sum(int(entry["size"]) for entry in files)
    print(f"{len(files)} files, {human_bytes(total)}" if files else "no files", flush=True)
    if files.truncated:
        print(
            f"truncated: the server listed {len(files)} files and holds more",
            flush=True,
        )
        print_error(f"{options.address} listed only part of its files ({len(files)} of them)")
    return code


# --------------------------------------------------------------------------- rm, mv


#: One ``rm``/``mv`` operation: the names it was asked for (its ``--json``
#: entry starts with them), and what runs it.
Operation = tuple[dict[str, str], Callable[[FileTransferHandler, Client], Awaitable[Any]]]


def _outcome(verb: str, label: str, result: dict[str, Any]) -> bool:
    """Print one line for one operation's result; whether it succeeded."""
    if result.get("success"):
        print(printable(f"{verb:<9} {label}"), flush=True)
        return True
    print(printable(f"FAILED    {label}: {result.get('error')} [{result.get('code')}]"), flush=True)
    return False


async def _manage(
    command: str,
    verb: str,
    options: ClientOptions,
    operations: Sequence[Operation],
    *,
    json_output: bool,
) -> int:
    results: list[dict[str, Any]] = []
    try:
        async with connected(options) as client:
            handler = FileTransferHandler()
            for asked, operation in operations:
                result = {**asked, **await operation(handler, client)}
                results.append(result)
                if not json_output:
                    _outcome(verb, " -> ".join(asked.values()), result)
    except CLIError as exc:
        if json_output:
            _fatal_json(command, options.address, exc)
        raise
    ok = all(result.get("success") for result in results)
    if json_output:
        emit_json({"command": command, "server": str(options.address), "ok": ok, "files": results})
    return ExitCode.OK if ok else ExitCode.TRANSFER_FAILED


async def rm(
    signals: Signals, options: ClientOptions, names: Sequence[str], *, json_output: bool
) -> int:
    """``conduit rm``: delete each NAME on the server."""

    def delete(name: str) -> Callable[[FileTransferHandler, Client], Awaitable[Any]]:
        return lambda handler, client: handler.delete(client, name)

    operations = [({"name": name}, delete(name)) for name in names]
    return await _manage("rm", "deleted", options, operations, json_output=json_output)


async def mv(
    signals: Signals,
    options: ClientOptions,
    old: str,
    new: str,
    *,
    overwrite: bool,
    json_output: bool,
) -> int:
    """``conduit mv``: rename OLD to NEW on the server."""

    async def rename(handler: FileTransferHandler, client: Client) -> Any:
        return await handler.rename(client, old, new, overwrite=overwrite)

    asked = {"name": old, "new_name": new}
    return await _manage("mv", "renamed", options, [(asked, rename)], json_output=json_output)
