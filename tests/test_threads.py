"""Worker-thread calls whose errors make no reference cycle (``conduit._threads``)."""

from __future__ import annotations

import gc
import traceback
import types
from collections.abc import Awaitable, Callable

import pytest
import trio

from conduit import _threads
from conduit.errors import TransferError


def _missing() -> None:
    try:
        open("/nonexistent/conduit-test-file")  # noqa: SIM115 - the failure is the point
    except FileNotFoundError as error:
        raise TransferError("not there", "not_found") from error


def _bug() -> None:
    raise KeyError("a bug")


def _refused_while_cleaning_up() -> None:
    # A cause and, apart from it, a context: the refusal is raised from one
    # failure while another is being handled.
    try:
        open("/nonexistent/conduit-test-file")  # noqa: SIM115 - the failure is the point
    except FileNotFoundError as error:
        missing = error
    try:
        raise ValueError("while cleaning up")
    except ValueError:
        raise TransferError("not there", "not_found") from missing


def _several() -> None:
    # A group's members were raised (and so hold worker frames) before it.
    failures: list[Exception] = []
    for failing in (_missing, _bug):
        try:
            failing()
        except Exception as error:
            failures.append(error)
    raise ExceptionGroup("two failures", failures)


def _tracebacks_left(error: BaseException) -> list[str]:
    """Every error reachable from ``error`` that still has a traceback."""
    left, pending, seen = [], [error], set()
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if current is not error and current.__traceback__ is not None:
            left.append(repr(current))
        pending += [e for e in (current.__cause__, current.__context__) if e is not None]
        if isinstance(current, BaseExceptionGroup):
            pending += current.exceptions
    return left


async def _cyclic_garbage_of(call: Callable[[], Awaitable[None]]) -> list[str]:
    """The frames and exceptions left in reference cycles by ``await call()``,
    a call that raises, with the cycle collector off (after one more
    call on the same worker thread: Trio's thread cache drops its last
    outcome only then)."""
    gc.collect()
    gc.disable()
    try:
        with pytest.raises(TransferError):
            await call()
        await trio.to_thread.run_sync(int)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        return sorted(
            type(thing).__name__
            for thing in gc.garbage
            if isinstance(thing, (BaseException, types.FrameType))
        )
    finally:
        gc.garbage.clear()
        gc.set_debug(0)
        gc.enable()


async def test_values_come_back_and_errors_are_raised_with_their_cause() -> None:
    assert await _threads.run_sync(divmod, 7, 2) == (3, 1)
    with pytest.raises(TransferError) as caught:
        await _threads.run_sync(_missing)
    assert caught.value.code == "not_found"
    assert isinstance(caught.value.__cause__, FileNotFoundError)
    # The worker's frames are gone from it (they made the cycle); ours are there.
    frames = [frame.f_code.co_name for frame, _ in traceback.walk_tb(caught.value.__traceback__)]
    assert "_missing" not in frames
    assert caught.value.__cause__.__traceback__ is None


@pytest.mark.parametrize("function", [_refused_while_cleaning_up, _several])
async def test_every_error_it_leads_to_loses_its_worker_traceback(
    function: Callable[[], None],
) -> None:
    with pytest.raises(BaseException) as caught:
        await _threads.run_sync(function)
    # The cause, the context (a different error) and a group's members all
    # held worker frames: each would make the cycle on its own.
    assert _tracebacks_left(caught.value) == []
    if function is _refused_while_cleaning_up:
        assert isinstance(caught.value.__cause__, FileNotFoundError)
        assert isinstance(caught.value.__context__, ValueError)
    else:
        assert isinstance(caught.value, ExceptionGroup)
        missing, bug = caught.value.exceptions
        assert (type(missing), type(bug)) == (TransferError, KeyError)
        # The bug's worker traceback is kept as text; the expected error's is not.
        (note,) = bug.__notes__
        assert note.startswith("in a worker thread:") and "_bug" in note
        assert not getattr(missing, "__notes__", None)


async def test_an_unexpected_error_keeps_its_worker_traceback_as_a_note() -> None:
    with pytest.raises(KeyError) as caught:
        await _threads.run_sync(_bug)
    (note,) = caught.value.__notes__
    assert note.startswith("in a worker thread:") and "_bug" in note


async def test_a_failing_call_leaves_no_reference_cycle() -> None:
    async def ours() -> None:
        await _threads.run_sync(_missing)

    async def trios() -> None:
        await trio.to_thread.run_sync(_missing)

    assert await _cyclic_garbage_of(ours) == []
    # What this module is for: Trio's own leaves one (if it stops, this can go).
    assert await _cyclic_garbage_of(trios) != []
