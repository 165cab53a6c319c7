"""How transfers look: live rich progress bars on a terminal, one line per file otherwise.

Three displays share one small interface (:class:`Display`):

* :class:`LiveDisplay` (stdout is an interactive terminal): a bar per file in
  flight with bytes, percent, speed and ETA, a total bar when there is more
  than one file, and a line per finished file printed above the bars;
* :class:`PlainDisplay` (a pipe or a file): exactly one line per finished file
  and a summary line, nothing that redraws;
* :class:`SilentDisplay` (``--json``): nothing on stdout, where the command
  prints one JSON document at the end; the connection's lines go to stderr.

When the connection drops, the client reconnects on its own and the transfers
resume; the live and plain displays say so in a line ("connection lost,
reconnecting in 2 s, attempt 2/5", then "reconnected, resuming"), so a user
sees why the bars paused.

Speed and ETA come from the library's :class:`~conduit.TransferProgress`, which
counts only the bytes moved in this attempt, so a resumed file does not show a
burst of impossible speed.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Literal

import attrs
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TaskProgressColumn,
    TextColumn,
)
from rich.table import Column
from rich.text import Text

from .. import TransferProgress
from ._common import finite, human_bytes, human_eta, human_rate, human_seconds, printable

Verb = Literal["send", "get"]
ProgressCallback = Callable[[TransferProgress], None]

_LABEL_WIDTH = 32


@attrs.define
class FileJob:
    """One file to transfer, and how it went once it is done.

    ``result`` is the library's result dict (``{"success": True, "path": ...}``
    or ``{"success": False, "error": ..., "code": ...}``); None while pending.
    """

    name: str
    local: str | None
    size: int | None
    result: dict[str, Any] | None = None
    #: A download by name that turned out to be a whole directory (one the plan
    #: did not expand into its files): one job per file it brought, and one for
    #: the directory's own failure (a listing that failed or was cut short).
    #: The job then stands for these, not for a file of its own.
    parts: list[FileJob] | None = None

    @property
    def success(self) -> bool:
        """Whether the transfer finished and was verified."""
        return self.result is not None and bool(self.result.get("success"))

    def files(self) -> list[FileJob]:
        """What this job reports as: its :attr:`parts` once known, else itself."""
        return [self] if self.parts is None else self.parts

    def to_json(self) -> dict[str, Any]:
        """The per-file entry of the ``--json`` document."""
        document: dict[str, Any] = {"name": self.name, "local": self.local}
        result = self.result or {
            "success": False,
            "error": "interrupted before this file finished",
            "code": "interrupted",
        }
        for key, value in result.items():
            document[key] = finite(value)
        document.setdefault("size", self.size)
        document["success"] = bool(document.get("success"))
        return document


def file_jobs(jobs: Sequence[FileJob]) -> list[FileJob]:
    """Every file the jobs stand for (a directory job's parts instead of the job)."""
    return [part for job in jobs for part in job.files()]


def shorten(label: str, width: int = _LABEL_WIDTH) -> str:
    """Keep the end of a long name (the file name matters more than its directories)."""
    return label if len(label) <= width else "…" + label[-(width - 1) :]


def outcome_line(verb: Verb, job: FileJob) -> str:
    """The one line printed when a file is done (see :func:`printable`: the
    server's error text, code and stored names are the peer's)."""
    return printable(_outcome_text(verb, job))


def _outcome_text(verb: Verb, job: FileJob) -> str:
    result = job.result or {}
    if not job.success:
        error = result.get("error", "not transferred")
        return f"FAILED    {job.name}: {error} [{result.get('code')}]"
    size = int(result.get("size", job.size or 0))
    if result.get("skipped"):
        # A re-run: the peer (or this side) already has exactly these bytes,
        # maybe under a variant of the name (a collision the first time).
        stored = str(result.get("path", job.name)) if verb == "send" else job.name
        where = f", stored as {stored}" if stored != job.name else ""
        return f"unchanged {job.name}  {human_bytes(size)}  (already there{where}, not sent again)"
    if verb == "send":
        head = f"sent      {job.name}"
        stored = str(result.get("path", job.name))
        if stored != job.name:
            head += f" (stored as {stored})"
    else:
        head = f"received  {job.name} -> {job.local or result.get('path')}"
    line = (
        f"{head}  {human_bytes(size)}  {human_seconds(float(result.get('elapsed', 0.0)))}"
        f"  {human_rate(float(result.get('speed', 0.0)))}"
    )
    resumed = int(result.get("resumed_from", 0))
    if resumed:
        line += f"  (resumed at {human_bytes(resumed)})"
    return line


def summary_line(
    verb: Verb, jobs: Sequence[FileJob], elapsed: float, interrupted: bool, unread: int = 0
) -> str:
    """The closing line: counts, bytes, time; what to do after an interruption.

    ``unread``: local entries meant to be sent that could not be read (their
    ``FAILED`` lines came first): failures too, which the counts include
    (until 2026-12-07 a run whose only failures were those said "1 of 1
    files sent", a review found). Files the other side had already
    (``unchanged`` lines) are counted apart, and their bytes are not among
    those moved: a re-run that sent nothing said "2 of 2 files sent (2.9
    MiB)" until 2026-12-07 (a review).
    """
    jobs = file_jobs(jobs)
    done = [job for job in jobs if job.success]
    unchanged = [job for job in done if (job.result or {}).get("skipped")]
    moved_jobs = [job for job in done if not (job.result or {}).get("skipped")]
    failed = len([job for job in jobs if job.result is not None and not job.success]) + unread
    moved = sum(int((job.result or {}).get("size", 0)) for job in moved_jobs)
    past = "sent" if verb == "send" else "received"
    line = f"{len(moved_jobs)} of {len(jobs) + unread} files {past} ({human_bytes(moved)})"
    if unchanged:
        line += f", {len(unchanged)} unchanged"
    line += f" in {human_seconds(elapsed)}"
    if failed:
        line += f"; {failed} failed"
    if interrupted:
        line = f"interrupted: {line}; run the same command again to resume"
    return line


def reconnecting_line(attempt: int, attempts: int, delay: float) -> str:
    """The line shown while the client reconnects (``attempts`` 0: unlimited)."""
    of = f"/{attempts}" if attempts else ""
    return f"connection lost, reconnecting in {delay:.0f} s, attempt {attempt}{of}"


RECONNECTED_LINE = "reconnected, resuming"


class Display:
    """What the transfer commands tell a display (the base class shows nothing)."""

    #: Local entries that could not be read, counted in the summary (see summary_line).
    unread = 0

    def status(self, line: str) -> None:
        """A line about the connection (reconnecting, reconnected)."""

    def __enter__(self) -> Display:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        return None

    def file_started(self, job: FileJob) -> ProgressCallback | None:
        """A file's transfer begins; return its ``on_progress`` callback."""
        return None

    def file_finished(self, job: FileJob) -> None:
        """A file's transfer ended (``job.result`` says how)."""

    def finished(self, jobs: Sequence[FileJob], elapsed: float, interrupted: bool) -> None:
        """Every file is done (or the user interrupted)."""


class SilentDisplay(Display):
    """``--json``: nothing on stdout until the JSON document."""

    def status(self, line: str) -> None:
        """Print the line on stderr: a script waiting for the document sees why
        it is late (the connection is being reconnected), stdout stays one
        document."""
        print(f"conduit: {printable(line)}", file=sys.stderr, flush=True)


@attrs.define
class PlainDisplay(Display):
    """One line per finished file, then a summary line; for pipes and log files.

    Nothing else goes to stdout: a status line (the connection is being
    reconnected) goes to stderr, as under ``--json``, so that a script
    reading the lines finds only files and the summary there.
    """

    verb: Verb

    def file_finished(self, job: FileJob) -> None:
        """Print the file's line (a directory job: one line per file it brought)."""
        for part in job.files():
            print(outcome_line(self.verb, part), flush=True)

    def status(self, line: str) -> None:
        """Print the line on stderr."""
        print(f"conduit: {printable(line)}", file=sys.stderr, flush=True)

    def finished(self, jobs: Sequence[FileJob], elapsed: float, interrupted: bool) -> None:
        """Print the summary line."""
        print(summary_line(self.verb, jobs, elapsed, interrupted, self.unread), flush=True)


class SpeedColumn(ProgressColumn):
    """Speed from the task's ``speed`` field (set from :class:`TransferProgress`)."""

    def render(self, task: Task) -> Text:
        speed = task.fields.get("speed")
        return Text(human_rate(float(speed)) if speed else "-", style="progress.data.speed")


class EtaColumn(ProgressColumn):
    """Time left from the task's ``eta`` field; elapsed time once finished."""

    def render(self, task: Task) -> Text:
        if task.finished:
            return Text("in " + human_eta(task.finished_time or 0.0), style="progress.elapsed")
        eta = task.fields.get("eta")
        text = "eta " + human_eta(float(eta)) if eta is not None else "eta -"
        return Text(text, style="progress.remaining")


def progress_columns(console_width: int, label_width: int = _LABEL_WIDTH) -> list[ProgressColumn]:
    """Name, bar, bytes, percent, speed, ETA: the columns of every conduit progress bar.

    The name and the bar give way on narrow terminals so that a bar stays on one line.
    """
    fixed = 15 + 4 + 11 + 9 + 6  # bytes, percent, speed, ETA, the gaps between columns
    bar = 30 if console_width >= 110 else 20
    label = max(10, min(label_width, console_width - fixed - bar))
    return [
        TextColumn(
            "{task.description}",
            table_column=Column(width=label, no_wrap=True, overflow="ellipsis"),
        ),
        BarColumn(bar_width=bar),
        DownloadColumn(binary_units=True, table_column=Column(no_wrap=True, justify="right")),
        TaskProgressColumn(),
        SpeedColumn(table_column=Column(width=11, no_wrap=True, justify="right")),
        EtaColumn(table_column=Column(width=9, no_wrap=True, justify="right")),
    ]


class LiveDisplay(Display):
    """Live bars on an interactive terminal (rich), with a line per finished file."""

    def __init__(self, verb: Verb, console: Console, jobs: Sequence[FileJob]) -> None:
        self.verb = verb
        self.console = console
        # Transient: the bars go away at the end, leaving one line per file.
        self.progress = Progress(
            *progress_columns(console.width),
            console=console,
            refresh_per_second=10,
            transient=True,
        )
        self._summary: str | None = None
        self._started = time.monotonic()
        self._transferred: dict[int, int] = {}
        self._moved: dict[int, int] = {}
        self._tasks: dict[int, TaskID] = {}
        self._sizes = {id(job): job.size for job in jobs}
        self._total: TaskID | None = None
        self._count = len(jobs)
        self._done = 0
        if len(jobs) > 1:
            known = [size for size in self._sizes.values() if size is not None]
            self._total = self.progress.add_task(
                self._total_label(), total=sum(known) if known else None
            )

    def _total_label(self) -> str:
        return f"total {self._done}/{self._count}"

    def __enter__(self) -> LiveDisplay:
        self._started = time.monotonic()
        self.progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.progress.stop()
        if self._summary is not None:
            self.console.print(self._summary, markup=False, highlight=False, soft_wrap=True)

    def file_started(self, job: FileJob) -> ProgressCallback:
        """Add the file's bar; return the callback that moves it."""
        key = id(job)
        task = self.progress.add_task(shorten(job.name), total=job.size)
        self._tasks[key] = task

        def on_progress(update: TransferProgress) -> None:
            if self._sizes.get(key) is None:
                self._sizes[key] = update.total_size
                self._update_total_size()
            self._transferred[key] = update.transferred
            self._moved[key] = update.transferred - update.resumed_from
            self.progress.update(
                task,
                total=update.total_size,
                completed=update.transferred,
                speed=update.speed,
                eta=update.eta,
            )
            self._update_total()

        return on_progress

    def _update_total_size(self) -> None:
        if self._total is not None:
            known = [size for size in self._sizes.values() if size is not None]
            self.progress.update(self._total, total=sum(known))

    def _update_total(self) -> None:
        if self._total is None:
            return
        elapsed = time.monotonic() - self._started
        transferred = sum(self._transferred.values())
        moved = sum(self._moved.values())
        speed = moved / elapsed if elapsed > 0 else 0.0
        total = sum(size for size in self._sizes.values() if size is not None)
        left = max(0, total - transferred)
        eta = left / speed if speed > 0 else (0.0 if left == 0 else float("inf"))
        self.progress.update(
            self._total,
            completed=transferred,
            speed=speed,
            eta=eta,
            description=self._total_label(),
        )

    def file_finished(self, job: FileJob) -> None:
        """Replace the file's bar by its line (a directory job's bar by one line per file)."""
        key = id(job)
        task = self._tasks.pop(key, None)
        if task is not None:
            self.progress.remove_task(task)
        files = job.files()
        # A directory job counted as one file until its files were known.
        self._count += len(files) - 1
        self._done += len(files)
        if job.parts is not None:
            # Its bar followed one file after another: what arrived is the sum.
            arrived = sum(int((f.result or {}).get("size", 0)) for f in files if f.success)
            self._transferred[key] = self._sizes[key] = arrived
            self._update_total_size()
        elif job.success:
            self._transferred[key] = int((job.result or {}).get("size", job.size or 0))
        elif self._total is not None:
            # A failed file will not arrive: take it out of the total.
            self._sizes[key] = self._transferred.get(key, 0)
            self._update_total_size()
        for part in files:
            self.progress.console.print(
                outcome_line(self.verb, part), markup=False, highlight=False, soft_wrap=True
            )
        self._update_total()

    def status(self, line: str) -> None:
        """Print the line above the bars (they stay, paused, until the transfers resume)."""
        self.progress.console.print(printable(line), markup=False, highlight=False, soft_wrap=True)

    def finished(self, jobs: Sequence[FileJob], elapsed: float, interrupted: bool) -> None:
        """Remember the summary line; it is printed once the bars are gone."""
        self._summary = summary_line(self.verb, jobs, elapsed, interrupted, self.unread)


def make_display(
    verb: Verb,
    jobs: Sequence[FileJob],
    *,
    json_output: bool,
    console: Console | None = None,
    unread: int = 0,
) -> Display:
    """The display for this run: silent for ``--json``, live on a terminal, plain
    otherwise; ``unread`` local entries that could not be read count as failed."""
    display: Display
    if json_output:
        display = SilentDisplay()
    else:
        console = console or Console()
        display = LiveDisplay(verb, console, jobs) if console.is_interactive else PlainDisplay(verb)
    display.unread = unread
    return display
