"""Progress reports for a transfer, and the throttle that decides when to send them."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, Literal, ParamSpec, TypeVar

import attrs
import trio

from .._callbacks import _mark, callback_world, invoke

P = ParamSpec("P")
T = TypeVar("T")

Direction = Literal["upload", "download", "push", "receive"]

#: Progress callbacks run at most this often, plus once at the end unless the
#: last report already showed the final count, so a 16,000-chunk file does not
#: call user code 16,000 times.
REPORT_INTERVAL = 0.1


@attrs.frozen
class TransferProgress:
    """A snapshot of one transfer, handed to ``on_progress`` callbacks.

    ``transferred`` and ``total_size`` count the whole file, including any part
    resumed from an earlier attempt; ``speed`` counts only bytes moved in this
    attempt, so it is honest about the wire.
    """

    filename: str
    direction: Direction
    transferred: int
    total_size: int
    elapsed: float
    resumed_from: int = 0

    @property
    def percent(self) -> float:
        """0 to 100. An empty file is 100% once done."""
        if self.total_size <= 0:
            return 100.0 if self.transferred >= self.total_size else 0.0
        return min(100.0, 100.0 * self.transferred / self.total_size)

    @property
    def speed(self) -> float:
        """Bytes per second over this attempt."""
        moved = self.transferred - self.resumed_from
        return moved / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float:
        """Seconds left at the current speed (0 when done, ``inf`` when stalled)."""
        left = self.total_size - self.transferred
        if left <= 0:
            return 0.0
        speed = self.speed
        return left / speed if speed > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        """Plain data, for logs and JSON."""
        return {
            "filename": self.filename,
            "direction": self.direction,
            "transferred": self.transferred,
            "total_size": self.total_size,
            "percent": self.percent,
            "speed": self.speed,
            "eta": self.eta,
            "elapsed": self.elapsed,
        }


class ForwardOnly:
    """A user's ``on_progress`` that never sees a file's ``transferred`` go back.

    A transfer that outlives its connection resumes from the receiver's
    verified offset, which can be below what was already reported: the bytes
    in flight when the link died are sent again. Reports below the highest one
    a file (by name and direction) has had are held back, so a progress bar
    stands still instead of moving backwards; ``resumed_from`` and ``speed``
    still describe the attempt. One per public transfer call: a later call
    for the same file starts afresh.
    """

    def __init__(self, callback: Callable[[TransferProgress], Any]) -> None:
        self._callback = callback
        self._highest: dict[tuple[str, str], int] = {}
        world = callback_world(callback)
        if world is not None:  # run where the user's callback asked to run
            _mark(self, world)

    def __call__(self, progress: TransferProgress) -> Any:
        """Pass ``progress`` on unless it is below what this file already showed."""
        file = (progress.filename, progress.direction)
        if progress.transferred < self._highest.get(file, 0):
            return None
        self._highest[file] = progress.transferred
        return self._callback(progress)


def forward_only(
    callback: Callable[[TransferProgress], Any] | None,
) -> Callable[[TransferProgress], Any] | None:
    """``callback`` as a :class:`ForwardOnly` (None stays None)."""
    return None if callback is None else ForwardOnly(callback)


class ProgressCallbackError(Exception):
    """What a user's ``on_progress`` raised, carried through a transfer.

    The transfer machinery tells it from a transfer's own failures: an
    ``OSError`` the callback raised (a broken pipe under its ``print``) is no
    I/O error of the transfer, and the bytes received stay for a resume. The
    public transfer methods raise :attr:`error` itself to their caller
    (:func:`callback_errors_as_they_are`).
    """

    def __init__(self, error: Exception) -> None:
        super().__init__(f"on_progress raised {error!r}")
        self.error = error


def callback_errors_as_they_are(
    function: Callable[P, Awaitable[T]],
) -> Callable[P, Awaitable[T]]:
    """Make a public transfer method raise what its ``on_progress`` raised, as it is.

    Also when the callback raised in one of several files moved at once (a
    directory, :meth:`send_files_to_server`): their nursery raises a group of
    :class:`ProgressCallbackError`, whose first error is raised alone; and
    when Trio's Cancelled came with it (the caller's scope cancelled as the
    callback raised), which the error replaces, as any error raised while a
    scope is cancelled does. A group with failures of another kind stays a
    group.
    """

    @functools.wraps(function)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await function(*args, **kwargs)
        except ProgressCallbackError as exc:
            error = exc.error
        except BaseExceptionGroup as group:
            matched, rest = group.split(ProgressCallbackError)
            try:
                if matched is None or (
                    rest is not None and rest.split(trio.Cancelled)[1] is not None
                ):
                    raise
                first: BaseException = matched
                while isinstance(first, BaseExceptionGroup):
                    first = first.exceptions[0]
                assert isinstance(first, ProgressCallbackError)
                error = first.error
                del first
            finally:
                # The parts of the group hold its traceback, which holds this
                # frame (see conduit._stored_errors).
                del matched, rest
        # Raised out here, not in the except clauses: there, the error would
        # take the ProgressCallbackError (or group) handled as its context,
        # which holds it (``.error``): a cycle.
        try:
            raise error from None
        finally:
            # Its traceback holds this frame.
            del error

    return wrapper


class ProgressReporter:
    """Calls a user's progress callback at a bounded rate.

    What the callback raises comes out as :class:`ProgressCallbackError`.
    """

    def __init__(
        self,
        callback: Callable[[TransferProgress], Any] | None,
        *,
        filename: str,
        direction: Direction,
        total_size: int,
        resumed_from: int = 0,
        started: float | None = None,
    ) -> None:
        """``started``: when the transfer began, on Trio's clock (default: now)."""
        self._callback = callback
        self._filename = filename
        self._direction = direction
        self._total = total_size
        self._resumed_from = resumed_from
        # Trio's clock, not time.monotonic(): a test's MockClock drives the
        # reporting rate and the elapsed time like everything else in the run.
        self._started = trio.current_time() if started is None else started
        # The first advance always reports, whatever the clock's origin (a
        # MockClock starts at 0).
        self._last_report = float("-inf")
        self.transferred = resumed_from
        # The count the last report showed: finish() does not repeat it (a
        # file sent in one block reported 100% twice, back to back).
        self._reported: int | None = None

    def snapshot(self) -> TransferProgress:
        """The current state."""
        return TransferProgress(
            self._filename,
            self._direction,
            self.transferred,
            self._total,
            trio.current_time() - self._started,
            self._resumed_from,
        )

    async def advance(self, amount: int) -> None:
        """Count ``amount`` more bytes; report if enough time has passed."""
        self.transferred += amount
        now = trio.current_time()
        if self._callback is not None and now - self._last_report >= REPORT_INTERVAL:
            self._last_report = now
            self._reported = self.transferred
            await self._report(self._callback, self.snapshot())

    async def finish(self) -> TransferProgress:
        """Report the final state, unless the last report already showed it (so a
        callback always sees 100%, once)."""
        final = self.snapshot()
        if self._callback is not None and self._reported != self.transferred:
            self._reported = self.transferred
            await self._report(self._callback, final)
        return final

    @staticmethod
    async def _report(
        callback: Callable[[TransferProgress], Any], progress: TransferProgress
    ) -> None:
        try:
            await invoke(callback, progress)
        except Exception as exc:
            raise ProgressCallbackError(exc) from exc
