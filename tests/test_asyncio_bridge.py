"""The asyncio <-> Trio bridge: conduit._asyncio and conduit._callbacks.

Async tests run under Trio (pytest-trio, ``trio_mode = true``); asyncio cases are
plain ``def`` tests that call ``asyncio.run`` themselves, through ``run_strict``,
which also fails the test on any warning, any asyncio log record, anything passed
to the loop's exception handler and any unraisable exception (the "Task was
destroyed but it is pending" / "exception was never retrieved" family).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import gc
import inspect
import logging
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import traceback
import warnings
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

import pytest
import sniffio
import trio

from conduit import Client, Server, _asyncio
from conduit._asyncio import get_guest_token, run_in_trio
from conduit._bridge import bridged, current_flavor
from conduit._callbacks import (
    asyncio_callback,
    callback_world,
    calling_task,
    current_host_loop,
    invoke,
    is_asyncio_hosted,
    trio_callback,
)
from conduit.errors import CallbackCancelledError, ConnectionClosed
from conftest import client_descriptor, server_descriptor

T = TypeVar("T")

SRC = Path(__file__).resolve().parents[1] / "src"


# --------------------------------------------------------------------------- helpers


class _Problems:
    def __init__(self) -> None:
        self.log_records: list[logging.LogRecord] = []
        self.handler_contexts: list[dict[str, Any]] = []
        self.unraisable: list[Any] = []

    def describe(self) -> str:
        return "\n".join(
            [f"log: {r.getMessage()}" for r in self.log_records]
            + [f"loop exception handler: {c}" for c in self.handler_contexts]
            + [f"unraisable: {u.exc_value!r} in {u.object!r}" for u in self.unraisable]
        )


class _ListHandler(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__(level=logging.DEBUG)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            self.records.append(record)


@contextlib.contextmanager
def _strict() -> Iterator[_Problems]:
    # What earlier tests left for the garbage collector (an unclosed socket's
    # ResourceWarning, a dead loop's pending task) dies now, outside the window
    # that counts this test's problems.
    gc.collect()
    problems = _Problems()
    handler = _ListHandler(problems.log_records)
    logger = logging.getLogger("asyncio")
    logger.addHandler(handler)
    old_hook = sys.unraisablehook
    sys.unraisablehook = problems.unraisable.append
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            yield problems
            # Pending-task and never-retrieved reports happen when objects die.
            gc.collect()
    finally:
        sys.unraisablehook = old_hook
        logger.removeHandler(handler)


def _assert_guest_gone() -> None:
    # The guest run must be over: no runner left installed in this thread (that
    # is what breaks the next asyncio.run), and no registry entry.
    assert not trio.lowlevel.in_trio_run()
    assert len(_asyncio._guests) == 0


def run_strict(main: Callable[[], Coroutine[Any, Any, T]], *, debug: bool = False) -> T:
    """``asyncio.run(main())``, failing on warnings, logs and unretrieved errors."""
    with _strict() as problems:

        async def wrapper() -> T:
            loop = asyncio.get_running_loop()
            loop.set_exception_handler(
                lambda _loop, context: problems.handler_contexts.append(context)
            )
            # Debug mode checks thread affinity; do not let slow CI trip the
            # slow-callback warning.
            loop.slow_callback_duration = 60.0
            return await main()

        try:
            return asyncio.run(wrapper(), debug=debug)
        finally:
            gc.collect()
            assert not (problems.log_records or problems.handler_contexts or problems.unraisable), (
                problems.describe()
            )
            _assert_guest_gone()


def run_strict_raises(
    expected: type[BaseException], main: Callable[[], Coroutine[Any, Any, object]]
) -> BaseException:
    """Like :func:`run_strict` but ``asyncio.run`` must raise ``expected``."""
    with pytest.raises(expected) as info:
        run_strict(main)
    return info.value


# --------------------------------------------------------------------------- flavor


async def test_current_flavor_under_trio() -> None:
    assert current_flavor() == "trio"


def test_current_flavor_under_asyncio() -> None:
    async def main() -> str:
        return current_flavor()

    assert run_strict(main) == "asyncio"


def test_current_flavor_outside_async_code_raises() -> None:
    with pytest.raises(RuntimeError, match="Trio or asyncio"):
        current_flavor()


# --------------------------------------------------------------------------- run_in_trio


def test_result_crosses_and_code_runs_in_trio() -> None:
    seen: dict[str, object] = {}

    async def trio_side(x: int, y: int) -> int:
        await trio.sleep(0.001)  # a real Trio wait, through the guest's I/O thread
        seen["library"] = sniffio.current_async_library()
        seen["hosted"] = is_asyncio_hosted()
        seen["task"] = trio.lowlevel.current_task()
        seen["host_loop"] = current_host_loop()
        return x * y

    async def main() -> tuple[int, asyncio.AbstractEventLoop, bool]:
        result = await run_in_trio(trio_side, 6, 7)
        # From asyncio code the Trio-side helpers answer "not in Trio".
        return result, asyncio.get_running_loop(), is_asyncio_hosted()

    result, loop, hosted_from_asyncio = run_strict(main)
    assert result == 42
    assert seen["library"] == "trio"
    assert seen["hosted"] is True
    assert isinstance(seen["task"], trio.lowlevel.Task)
    assert seen["host_loop"] is loop
    assert hosted_from_asyncio is False


class _Boom(Exception):
    pass


def test_exception_crosses_with_type_and_traceback() -> None:
    raised: list[BaseException] = []

    async def deep_in_trio() -> None:
        await trio.lowlevel.checkpoint()
        error = _Boom("from trio")
        raised.append(error)
        raise error

    async def trio_side() -> None:
        await deep_in_trio()

    async def main() -> None:
        await run_in_trio(trio_side)

    error = run_strict_raises(_Boom, main)
    assert error is raised[0]  # the very object, not a copy or a wrapper
    names = [frame.name for frame in traceback.extract_tb(error.__traceback__)]
    assert "deep_in_trio" in names
    assert "main" in names


def test_exception_group_crosses() -> None:
    async def fail(n: int) -> None:
        raise ValueError(n)  # no checkpoint: the sibling's failure cannot cancel it first

    async def trio_side() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fail, 1)
            nursery.start_soon(fail, 2)

    async def main() -> None:
        await run_in_trio(trio_side)

    group = run_strict_raises(ExceptionGroup, main)
    assert isinstance(group, ExceptionGroup)
    assert sorted(e.args[0] for e in group.exceptions) == [1, 2]


def test_keyboard_interrupt_from_trio_code_crosses_and_spares_the_guest() -> None:
    async def trio_side() -> None:
        await trio.lowlevel.checkpoint()
        raise KeyboardInterrupt

    async def main() -> int:
        await run_in_trio(_return_after_checkpoint, None)
        token = get_guest_token()
        with pytest.raises(KeyboardInterrupt):
            await run_in_trio(trio_side)
        # The guest run did not crash: later calls go on in the same run.
        value: int = await run_in_trio(_return_after_checkpoint, 5)
        assert get_guest_token() is token
        return value

    assert run_strict(main) == 5


def test_keyboard_interrupt_from_trio_code_leaves_asyncio_run() -> None:
    async def trio_side() -> None:
        await trio.lowlevel.checkpoint()
        raise KeyboardInterrupt

    async def main() -> None:
        await run_in_trio(trio_side)

    run_strict_raises(KeyboardInterrupt, main)

    # ...and the thread is fit for the next asyncio.run.
    async def again() -> int:
        return await run_in_trio(_return_after_checkpoint, 5)

    assert run_strict(again) == 5


async def _keyboard_interrupt_under_a_nursery() -> None:
    """Trio code whose child task meets Ctrl-C: a KeyboardInterrupt inside a group."""

    async def child() -> None:
        await trio.lowlevel.checkpoint()
        raise KeyboardInterrupt

    async with trio.open_nursery() as nursery:
        nursery.start_soon(child)


async def _keyboard_interrupt_under_a_nursery_once_cancelled() -> None:
    """The same, met while the call unwinds from its caller's cancellation."""

    async def child() -> None:
        try:
            await trio.sleep_forever()
        finally:
            raise KeyboardInterrupt

    async with trio.open_nursery() as nursery:
        nursery.start_soon(child)


def test_keyboard_interrupt_in_a_group_from_trio_code_leaves_asyncio_run() -> None:
    """A KeyboardInterrupt raised under a nursery (as a second Ctrl-C is, in
    whatever Trio task it lands: a server's connection tasks run in
    nurseries) stops the loop as a bare one does, from a background task and
    from a task cancelled meanwhile. Before, it reached asyncio inside an
    exception group, which asyncio keeps as the task's result: the Ctrl-C was
    swallowed and the program went on."""

    async def from_a_background_task() -> None:
        task = asyncio.create_task(run_in_trio(_keyboard_interrupt_under_a_nursery))
        await asyncio.sleep(5)  # the main task busy with something else
        task.cancel()

    error = run_strict_raises(KeyboardInterrupt, from_a_background_task)
    assert type(error) is KeyboardInterrupt

    async def from_a_cancelled_task() -> None:
        task = asyncio.create_task(run_in_trio(_keyboard_interrupt_under_a_nursery_once_cancelled))
        await asyncio.sleep(0.05)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await asyncio.sleep(5)

    error = run_strict_raises(KeyboardInterrupt, from_a_cancelled_task)
    assert type(error) is KeyboardInterrupt

    # ...and the thread is fit for the next asyncio.run.
    async def again() -> int:
        return await run_in_trio(_return_after_checkpoint, 5)

    assert run_strict(again) == 5


def test_trio_async_generators_are_finalised_by_trio_in_every_run_of_a_runner() -> None:
    """``asyncio.Runner.run`` twice (or a loop kept across tests): Trio code
    in the second run starts its async generators under the guest run's
    hooks, so one dropped half-way is finalised by Trio, whose ``finally`` can
    await. Before, asyncio's ``run_forever`` had put back the hooks it found
    when the first run returned: the generator went to asyncio, which closed
    it in an asyncio task ("Task got bad yield" at its first Trio await)."""
    finalised: list[str] = []

    async def numbers(tag: str) -> AsyncIterator[int]:
        try:
            yield 1
            yield 2
        finally:
            # Trio clean-up (shielded: Trio finalises in a cancelled scope).
            await trio.lowlevel.cancel_shielded_checkpoint()
            finalised.append(tag)

    async def drop_half_way(tag: str) -> None:
        generator = numbers(tag)
        assert await generator.__anext__() == 1
        del generator
        gc.collect()
        for _ in range(100):  # Trio finalises it in a system task
            if tag in finalised:
                return
            await trio.sleep(0.01)

    with _strict() as problems:
        # Trio's warning for each generator dropped half-way: on purpose here.
        warnings.filterwarnings("ignore", "Async generator .* garbage collected", ResourceWarning)
        with asyncio.Runner() as runner:
            runner.get_loop().set_exception_handler(
                lambda _loop, context: problems.handler_contexts.append(context)
            )
            runner.run(run_in_trio(drop_half_way, "first run"))
            runner.run(run_in_trio(drop_half_way, "second run"))
        gc.collect()
    assert finalised == ["first run", "second run"]
    assert not (problems.log_records or problems.handler_contexts or problems.unraisable), (
        problems.describe()
    )
    _assert_guest_gone()


def test_a_second_ctrl_c_landing_in_trio_code_stops_asyncio_run_without_crashing_it() -> None:
    """Under ``asyncio.run`` the second Ctrl-C raises ``KeyboardInterrupt`` at
    once, wherever the main thread is. One that lands in a guest tick is
    raised from the loop's next turn instead: Trio's code in between (here
    the line after the signal) runs to its next ``await``, and the
    ``KeyboardInterrupt`` leaves ``asyncio.run`` as usual, which puts back
    Python's default handler. Before, it was raised in the middle of Trio's
    scheduler or of conduit's tasks: the guest run crashed with
    ``TrioInternalError``, or hung until a third Ctrl-C."""
    steps: list[str] = []

    async def trio_side() -> None:
        signal.raise_signal(signal.SIGINT)  # the second Ctrl-C, in Trio code
        steps.append("went on")
        await trio.sleep(5)
        steps.append("slept")

    async def main() -> None:
        await run_in_trio(_return_after_checkpoint, None)  # the guest runs
        try:
            signal.raise_signal(signal.SIGINT)  # the first: cancels the main task
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            steps.append("cancelled")  # and it drains, as a graceful stop does
        await run_in_trio(trio_side)

    default = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    try:
        with _strict() as problems:
            with asyncio.Runner() as runner:
                runner.get_loop().set_exception_handler(
                    lambda _loop, context: problems.handler_contexts.append(context)
                )
                with pytest.raises(KeyboardInterrupt):
                    runner.run(main())
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
            gc.collect()
    finally:
        signal.signal(signal.SIGINT, default)
    assert steps == ["cancelled", "went on"]
    assert not (problems.log_records or problems.handler_contexts or problems.unraisable), (
        problems.describe()
    )
    _assert_guest_gone()


@pytest.mark.parametrize("ctrl_cs", [1, 2])
def test_a_ctrl_c_while_asyncio_run_shuts_down_lets_the_guest_run_end_first(ctrl_cs: int) -> None:
    """A Ctrl-C while ``asyncio.run``'s shutdown ends the guest run (here in
    the clean-up of a Trio task that lives until then) came to Python's
    default handler, which the runner had put back: raised there, it stopped
    the shutdown, and the guest run was abandoned (Trio's warning; a review
    of 2026-12-07 found this after a second Ctrl-C, 8 runs in 15). Now it is
    held until the guest run has ended, then ``KeyboardInterrupt`` comes out
    of ``asyncio.run`` and Python's default handler is back. Two of them: the
    second is raised at once (whoever presses twice wants out; here the
    clean-up takes it), and the run still ends whole."""
    seen: list[str] = []

    async def lives_until_the_end() -> None:
        try:
            await trio.sleep_forever()
        finally:
            seen.append(type(signal.getsignal(signal.SIGINT)).__name__)
            for _ in range(ctrl_cs):
                with contextlib.suppress(KeyboardInterrupt):
                    signal.raise_signal(signal.SIGINT)

    async def start() -> None:
        # A system task: cancelled only when the guest run itself ends.
        trio.lowlevel.spawn_system_task(lives_until_the_end)
        await trio.lowlevel.checkpoint()

    async def main() -> None:
        await run_in_trio(start)

    def run(problems: Any) -> None:
        with asyncio.Runner() as runner:
            runner.get_loop().set_exception_handler(
                lambda _loop, context: problems.handler_contexts.append(context)
            )
            runner.run(main())

    default = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    try:
        with _strict() as problems:
            with pytest.raises(KeyboardInterrupt):
                run(problems)
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
            gc.collect()
    finally:
        signal.signal(signal.SIGINT, default)
    assert seen == ["function"]  # ours, not Python's built-in default
    assert not (problems.log_records or problems.handler_contexts or problems.unraisable), (
        problems.describe()
    )
    _assert_guest_gone()


def _asyncio_run_ends_with_keyboard_interrupt(main: Callable[[], Coroutine[Any, Any, Any]]) -> None:
    """``asyncio.run(main())`` under Python's default SIGINT handler (as in a
    terminal) raises ``KeyboardInterrupt`` and leaves that handler installed."""
    default = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            asyncio.run(main())
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, default)


def test_a_ctrl_c_deferred_while_the_main_task_ends_is_not_lost() -> None:
    """A Ctrl-C lands in the guest tick that hands the main task its last
    result, and the main task ends before the deferred handler runs: the
    Ctrl-C came while it ran, so ``asyncio.run`` still ends with
    ``KeyboardInterrupt`` (raised once the guest run has ended). Dropped
    because the main task was done by then, the program went on as if it had
    never been pressed (the third review of the guard)."""

    async def main() -> str:
        loop = asyncio.get_running_loop()
        await run_in_trio(_return_after_checkpoint, None)  # the guest runs, the handler wrapped
        last: asyncio.Future[str] = loop.create_future()

        async def hand_over() -> None:
            last.set_result("last result")  # the main task's wake-up is queued
            signal.raise_signal(signal.SIGINT)  # the Ctrl-C, in this guest tick

        background = loop.create_task(run_in_trio(hand_over))
        try:
            return await last
        finally:
            background.cancel()

    _asyncio_run_ends_with_keyboard_interrupt(main)
    _assert_guest_gone()


def test_a_ctrl_c_in_an_async_handler_conduit_called_is_raised_there_at_once() -> None:
    """An ``async def`` RPC handler runs on the asyncio side under conduit's
    frames: the second Ctrl-C that lands in it is raised there, at once, as
    without conduit, so a loop in it can be stopped. Deferred because
    conduit's frames were below it, a busy handler held it until its next
    await, for ever in a loop (the review of the guard's first version)."""
    steps: list[str] = []

    async def main() -> None:
        server = Server(server_descriptor(port=0))

        @server.rpc
        async def busy() -> None:
            signal.raise_signal(signal.SIGINT)  # the first: cancels the main task
            signal.raise_signal(signal.SIGINT)  # the second: raised here
            steps.append("went on")

        task = asyncio.get_running_loop().create_task(server.run())
        # The server's run ends with the KeyboardInterrupt its handler raised:
        # taken here, not logged as "never retrieved" when the task goes.
        task.add_done_callback(lambda done: done.cancelled() or done.exception())
        try:
            port = await server.wait_listening()
            async with Client(client_descriptor(port)) as client:
                await client.call("busy")
        finally:
            await server.close()
            task.cancel()

    _asyncio_run_ends_with_keyboard_interrupt(main)
    assert steps == []
    _assert_guest_gone()


def test_a_ctrl_c_after_a_runners_run_is_pythons_own_while_the_guest_lives() -> None:
    """A run of ``asyncio.Runner`` left conduit's guest run alive, and the
    program goes on with the runner's loop (``run_until_complete``): a
    Ctrl-C there is Python's, raised at once. The first version of the
    shutdown's holder took "the run's main task is done and Python's default
    handler is back" for the shutdown, and held it for the whole loop run
    (the review of that version). The holder now comes only with the guest
    run's shutdown."""
    steps: list[str] = []

    async def later() -> None:
        signal.raise_signal(signal.SIGINT)
        steps.append("went on")

    default = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    try:
        with asyncio.Runner() as runner:
            runner.run(run_in_trio(_return_after_checkpoint, None))  # the guest runs on
            with pytest.raises(KeyboardInterrupt):
                runner.get_loop().run_until_complete(later())
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, default)
    assert steps == []
    _assert_guest_gone()


def test_the_sigint_guard_steps_aside_as_each_run_of_a_runner_ends() -> None:
    """While a run of ``asyncio.Runner`` goes on, its SIGINT handler has the
    guard in front (a new one for each run); when the run ends, Python's
    default handler is back, as the runner leaves it without conduit (it puts
    it back only if it finds its own handler)."""
    during: list[Any] = []

    async def look() -> None:
        await run_in_trio(_return_after_checkpoint, None)
        during.append(signal.getsignal(signal.SIGINT))

    default = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    try:
        with asyncio.Runner() as runner:
            runner.run(look())
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
            runner.run(look())
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, default)
    first, second = during
    assert first.__qualname__.endswith("wrapper") and second.__qualname__.endswith("wrapper")
    assert first is not second


async def _return_after_checkpoint(value: T) -> T:
    await trio.lowlevel.checkpoint()
    return value


def test_after_the_guest_run_crashed_calls_on_its_loop_get_a_clear_error() -> None:
    """A crashed guest run (a bug: here a system task raising, which Trio
    turns into ``TrioInternalError``) takes every conduit object of the run
    with it. The call in flight and every later call on that loop raise a
    ``RuntimeError`` that says so, instead of a fresh run letting the old
    objects fail deep in Trio; the crash goes to the loop's exception
    handler once, and the next ``asyncio.run`` starts afresh."""

    async def crash_the_run() -> None:
        async def failing_system_task() -> None:
            raise ValueError("a bug")

        trio.lowlevel.spawn_system_task(failing_system_task)
        await trio.sleep_forever()

    async def main() -> tuple[BaseException, BaseException, BaseException]:
        with pytest.raises(RuntimeError, match="guest run on this event loop crashed") as flight:
            await run_in_trio(crash_the_run)
        later = []
        for _ in range(2):
            with pytest.raises(RuntimeError, match=r"crashed .*TrioInternalError") as info:
                await run_in_trio(_return_after_checkpoint, 1)
            later.append(info.value)
            assert get_guest_token() is None
        return flight.value, later[0], later[1]

    contexts: list[dict[str, Any]] = []

    async def recording(crashing: Callable[[], Awaitable[T]]) -> T:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, c: contexts.append(c))
        return await crashing()

    with _strict():
        in_flight, first, second = asyncio.run(recording(main))
    assert isinstance(in_flight.__cause__, trio.TrioInternalError)
    assert first.__cause__ is None and second.__cause__ is None  # the loop is not kept alive
    assert [c["message"] for c in contexts] == ["conduit: the Trio guest run crashed"]
    assert isinstance(contexts[0]["exception"], trio.TrioInternalError)
    _assert_guest_gone()
    assert run_strict(functools.partial(run_in_trio, _return_after_checkpoint, 7)) == 7


def test_many_concurrent_calls_share_one_guest() -> None:
    tokens: list[trio.lowlevel.TrioToken | None] = []

    async def trio_side(i: int) -> int:
        tokens.append(get_guest_token(asyncio.get_running_loop()))
        await trio.sleep(0.01)
        return i

    async def main() -> tuple[list[int], int, int]:
        threads_before = threading.active_count()
        # All 200 arrive while the guest run is still starting, then run at once.
        results = await asyncio.gather(*(run_in_trio(trio_side, i) for i in range(200)))
        return list(results), threads_before, threading.active_count()

    results, threads_before, threads_after = run_strict(main)
    assert results == list(range(200))
    assert len(tokens) == 200
    assert tokens[0] is not None
    assert all(token is tokens[0] for token in tokens)  # one guest run served them all
    # No thread per call: the guest's I/O wait uses Trio's thread cache.
    assert threads_after <= threads_before + 2


def test_loops_in_several_threads_each_get_their_own_guest() -> None:
    results: list[int] = []
    errors: list[BaseException] = []

    async def trio_side(i: int) -> int:
        await trio.sleep(0.01)
        return i

    async def main() -> int:
        values = await asyncio.gather(*(run_in_trio(trio_side, i) for i in range(20)))
        return sum(values)

    def in_thread() -> None:
        try:
            for _ in range(3):
                results.append(asyncio.run(main()))
            assert not trio.lowlevel.in_trio_run()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=in_thread) for _ in range(3)]
    with _strict() as problems:
        for thread in threads:
            thread.start()
        try:
            in_thread()  # the main thread too, at the same time
        finally:
            for thread in threads:
                thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    assert results == [190] * 12
    assert not (problems.log_records or problems.unraisable), problems.describe()
    _assert_guest_gone()


@pytest.mark.parametrize("how", ["wait_for", "timeout"])
def test_asyncio_timeout_cancels_trio_work_and_waits_for_its_finally(how: str) -> None:
    events: list[str] = []

    async def trio_side() -> None:
        try:
            events.append("started")
            await trio.sleep(30)
            events.append("not cancelled")
        except trio.Cancelled:
            events.append("cancelled")
            raise
        finally:
            # Cleanup that itself waits: the asyncio side must wait for it.
            with trio.CancelScope(shield=True):
                await trio.sleep(0.05)
            events.append("finally done")

    async def with_timeout() -> None:
        if how == "wait_for":
            await asyncio.wait_for(run_in_trio(trio_side), timeout=0.1)
        else:
            async with asyncio.timeout(0.1):
                await run_in_trio(trio_side)

    async def main() -> list[str]:
        with pytest.raises(TimeoutError):
            await with_timeout()
        return list(events)  # snapshot at the moment the timeout was raised

    assert run_strict(main) == ["started", "cancelled", "finally done"]


def test_task_cancel_cancels_the_trio_scope() -> None:
    events: list[str] = []

    async def trio_side(started: asyncio.Event) -> None:
        started.set()  # asyncio.Event.set from the guest: same thread, safe
        try:
            await trio.sleep(30)
        except trio.Cancelled:
            events.append("cancelled")
            raise
        finally:
            events.append("finally")

    async def main() -> None:
        started = asyncio.Event()
        task = asyncio.create_task(run_in_trio(trio_side, started))
        await asyncio.wait_for(started.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert events == ["cancelled", "finally"]
        # The guest survives a cancelled call.
        assert await run_in_trio(_return_after_checkpoint, "still here") == "still here"

    run_strict(main)


def test_cancel_of_a_trio_call_that_ignores_it_still_raises_cancelled_error() -> None:
    async def trio_side(started: asyncio.Event) -> str:
        started.set()
        with trio.CancelScope(shield=True):
            await trio.sleep(0.05)
        return "finished anyway"

    async def main() -> None:
        started = asyncio.Event()
        task = asyncio.create_task(run_in_trio(trio_side, started))
        await asyncio.wait_for(started.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run_strict(main)


def test_cancel_arriving_after_the_trio_side_failed_retrieves_the_error() -> None:
    # The Trio side has already put an exception in the future when the caller
    # is cancelled: the caller raises CancelledError, and nothing may be logged
    # ("Future exception was never retrieved").
    async def trio_side(started: asyncio.Event) -> None:
        started.set()  # wakes main first...
        raise _Boom("already failed")  # ...then settles the caller's future

    async def main() -> None:
        started = asyncio.Event()
        task = asyncio.create_task(run_in_trio(trio_side, started))
        await started.wait()
        task.cancel()  # before the task has seen its settled future
        with pytest.raises(asyncio.CancelledError):
            await task

    run_strict(main)


def test_error_while_unwinding_is_chained_onto_cancelled_error() -> None:
    async def trio_side(started: asyncio.Event) -> None:
        started.set()
        try:
            await trio.sleep(30)
        finally:
            raise _Boom("cleanup failed")

    async def main() -> None:
        started = asyncio.Event()
        task = asyncio.create_task(run_in_trio(trio_side, started))
        await asyncio.wait_for(started.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError) as info:
            await task
        assert isinstance(info.value.__cause__, _Boom)

    run_strict(main)


def test_guest_started_by_a_task_with_a_pending_cancellation() -> None:
    events: list[str] = []

    async def trio_side() -> None:
        try:
            await trio.sleep(30)
            events.append("not cancelled")
        finally:
            events.append("finally")

    async def main() -> None:
        # The cancellation lands on the first await, while the guest run is
        # still starting (its root task has not run yet).
        current = asyncio.current_task()
        assert current is not None
        current.cancel()
        await run_in_trio(trio_side)

    run_strict_raises(asyncio.CancelledError, main)
    assert events == ["finally"]


async def _cleanup_call(outcomes: list[str]) -> None:
    """A bridged call from cleanup code run while asyncio.run ends; records
    whether it "completed" or was "cancelled" (and re-raises that)."""
    try:
        await run_in_trio(_return_after_checkpoint, None)
        outcomes.append("completed")
    except asyncio.CancelledError:
        outcomes.append("cancelled")
        raise


def test_guest_started_during_asyncio_run_shutdown() -> None:
    # The first bridged call ever is made by a leftover task while asyncio.run
    # is cancelling it: the keeper task is created too late to be cancelled
    # with the others, so the loop-end sentinel has to end the guest run.
    results: list[object] = []
    background: list[asyncio.Task[None]] = []

    async def leftover() -> None:
        try:
            await asyncio.sleep(30)
        finally:
            results.append(await run_in_trio(_return_after_checkpoint, "cleanup ran"))

    async def main() -> None:
        background.append(asyncio.create_task(leftover()))
        await asyncio.sleep(0)

    run_strict(main)
    assert results == ["cleanup ran"]
    # The next asyncio.run in this thread still works.
    assert run_strict(lambda: run_in_trio(_return_after_checkpoint, 1)) == 1


def test_a_call_while_asyncio_run_closes_async_generators_starts_no_guest() -> None:
    # asyncio.run closes the async generators left open after it cancelled its
    # tasks, the guest's keeper included: a bridged call from one's finally
    # raises CancelledError (the loop is ending). It started a guest run that
    # nothing ended, and the next asyncio.run in the thread failed.
    outcomes: list[str] = []
    kept: list[AsyncIterator[int]] = []

    async def generator() -> AsyncIterator[int]:
        try:
            yield 1
        finally:
            await _cleanup_call(outcomes)

    async def main() -> None:
        await run_in_trio(_return_after_checkpoint, None)  # the guest exists
        opened = generator()
        kept.append(opened)  # still referenced when main returns
        assert await anext(opened) == 1

    run_strict(main)
    kept.clear()
    assert outcomes == ["cancelled"]
    # The next asyncio.run in this thread still works.
    assert run_strict(lambda: run_in_trio(_return_after_checkpoint, 1)) == 1


def test_a_task_factory_without_a_context_argument_still_gets_a_guest() -> None:
    # Task factories written before Python 3.11 take (loop, coro) only (some
    # instrumentation libraries'): the guest's keeper task is made without
    # the factory. It was made with it, failed, and left the guest running
    # with no keeper: the call hung, and the next asyncio.run failed.
    made: list[str] = []

    def old_style_factory(
        loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any]
    ) -> asyncio.Task[Any]:
        made.append(getattr(coro, "__name__", "?"))
        return asyncio.Task(coro, loop=loop)

    async def main() -> int:
        asyncio.get_running_loop().set_task_factory(old_style_factory)  # type: ignore[arg-type]
        result: int = await asyncio.wait_for(run_in_trio(_return_after_checkpoint, 7), 10)
        return result

    assert run_strict(main) == 7
    assert run_strict(lambda: run_in_trio(_return_after_checkpoint, 1)) == 1


def test_leftover_bridged_call_is_cancelled_when_asyncio_run_ends() -> None:
    events: list[str] = []
    background: list[asyncio.Task[None]] = []

    async def trio_side() -> None:
        try:
            await trio.sleep(30)
        finally:
            events.append("trio finally")

    async def main() -> None:
        background.append(asyncio.create_task(run_in_trio(trio_side)))
        await run_in_trio(_return_after_checkpoint, None)  # let it start

    run_strict(main)
    assert events == ["trio finally"]


def test_cleanup_call_during_shutdown_does_not_log() -> None:
    # A leftover task's cleanup calls the bridge while asyncio.run cancels every
    # task, the keeper included: depending on which runs first the call either
    # completes or raises CancelledError, and nothing may be logged.
    outcomes: list[str] = []
    background: list[asyncio.Task[None]] = []

    async def leftover(started: asyncio.Event) -> None:
        try:
            started.set()
            await asyncio.sleep(30)
        finally:
            await _cleanup_call(outcomes)

    async def main() -> None:
        await run_in_trio(_return_after_checkpoint, None)  # the guest exists
        started = asyncio.Event()
        background.append(asyncio.create_task(leftover(started)))
        await started.wait()

    run_strict(main)
    assert outcomes in (["completed"], ["cancelled"])


@pytest.mark.parametrize("debug", [False, True])
def test_two_asyncio_runs_in_a_row(debug: bool) -> None:
    tokens: list[trio.lowlevel.TrioToken | None] = []

    async def main() -> int:
        assert get_guest_token() is None  # lazily started...
        value: int = await run_in_trio(_return_after_checkpoint, 3)
        tokens.append(get_guest_token())  # ...on the first call
        return value

    for _ in range(2):
        assert run_strict(main, debug=debug) == 3
    assert len(tokens) == 2
    assert tokens[0] is not None
    assert tokens[1] is not None
    assert tokens[0] is not tokens[1]  # one guest run per loop


async def test_run_in_trio_from_trio_raises() -> None:
    with pytest.raises(RuntimeError, match="must be awaited from asyncio"):
        await run_in_trio(_return_after_checkpoint, 1)


def test_run_in_trio_from_trio_code_inside_the_guest_raises() -> None:
    async def trio_side() -> None:
        await run_in_trio(_return_after_checkpoint, 1)

    async def main() -> None:
        await run_in_trio(trio_side)

    run_strict_raises(RuntimeError, main)


async def test_is_asyncio_hosted_is_false_under_trio_run() -> None:
    assert is_asyncio_hosted() is False
    assert current_host_loop() is None


def test_is_asyncio_hosted_is_false_outside_trio() -> None:
    assert is_asyncio_hosted() is False


def test_contextvars_flow_from_the_asyncio_caller() -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")

    async def trio_side() -> str:
        await trio.lowlevel.checkpoint()
        return var.get()

    async def main() -> list[str]:
        var.set("first")
        first = await run_in_trio(trio_side)  # queued before the guest's nursery exists
        var.set("second")
        second = await run_in_trio(trio_side)  # handed to the (now idle) worker
        return [first, second]

    assert run_strict(main) == ["first", "second"]


# --------------------------------------------------------------------------- worker pool
#
# Calls run in long-lived worker tasks of the guest's service nursery: an idle
# worker is reused, a new one is started only when none is idle, and cancelling a
# call retires the worker that ran it.


async def _task_after_checkpoint() -> trio.lowlevel.Task:
    await trio.lowlevel.checkpoint()
    return trio.lowlevel.current_task()


def test_sequential_calls_reuse_one_worker() -> None:
    async def main() -> set[trio.lowlevel.Task]:
        return {await run_in_trio(_task_after_checkpoint) for _ in range(50)}

    assert len(run_strict(main)) == 1


def test_concurrent_calls_get_a_worker_each_and_reuse_them() -> None:
    async def trio_side() -> trio.lowlevel.Task:
        await trio.sleep(0.01)
        return trio.lowlevel.current_task()

    async def main() -> tuple[list[trio.lowlevel.Task], list[trio.lowlevel.Task]]:
        first = await asyncio.gather(*(run_in_trio(trio_side) for _ in range(10)))
        second = await asyncio.gather(*(run_in_trio(trio_side) for _ in range(10)))
        return first, second

    first, second = run_strict(main)
    assert len(set(first)) == 10  # concurrent calls never share a worker...
    assert set(second) == set(first)  # ...and the idle ones were reused


def test_calls_never_wait_for_a_free_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    # Far more calls than idle workers are kept, each waiting until all have
    # started: only possible if every call runs at once (a long call, such as
    # Server.run, must never delay the others). The surplus workers end after.
    monkeypatch.setattr(_asyncio, "_MAX_IDLE_WORKERS", 3)
    count = 40
    started: list[int] = []
    everyone: list[trio.Event] = []

    async def trio_side(i: int) -> int:
        if not everyone:
            everyone.append(trio.Event())
        started.append(i)
        if len(started) == count:
            everyone[0].set()
        with trio.fail_after(10):
            await everyone[0].wait()
        return i

    async def main() -> tuple[list[int], int]:
        results = await asyncio.gather(*(run_in_trio(trio_side, i) for i in range(count)))
        idle = len(_asyncio._guests[asyncio.get_running_loop()].idle)
        # The kept workers still serve calls.
        again = await asyncio.gather(*(run_in_trio(_return_after_checkpoint, i) for i in range(5)))
        assert again == list(range(5))
        return list(results), idle

    results, idle = run_strict(main)
    assert results == list(range(count))
    assert idle == 3


def test_cancelled_call_retires_its_worker() -> None:
    ran_in: list[trio.lowlevel.Task] = []

    async def trio_side(started: asyncio.Event) -> None:
        ran_in.append(trio.lowlevel.current_task())
        started.set()
        await trio.sleep(30)

    async def main() -> tuple[trio.lowlevel.Task, trio.lowlevel.Task]:
        before = await run_in_trio(_task_after_checkpoint)
        started = asyncio.Event()
        task = asyncio.create_task(run_in_trio(trio_side, started))
        await asyncio.wait_for(started.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # A fresh worker takes the next call, and it is not cancelled.
        after = await run_in_trio(_task_after_checkpoint)
        guest = _asyncio._guests[asyncio.get_running_loop()]
        assert all(worker.task is not before for worker in guest.idle)
        return before, after

    before, after = run_strict(main)
    assert ran_in == [before]  # the cancelled call ran in the idle worker...
    assert after is not before  # ...which ended with it


def test_call_cancelled_before_its_worker_picked_it_up() -> None:
    events: list[str] = []

    async def trio_side() -> None:
        events.append("started")
        try:
            await trio.lowlevel.checkpoint()
            events.append("not cancelled")
        finally:
            events.append("finally")

    async def main() -> None:
        await run_in_trio(_return_after_checkpoint, None)  # a worker is idle now
        task = asyncio.create_task(run_in_trio(trio_side))
        await asyncio.sleep(0)  # the task hands its call to the idle worker...
        assert events == []  # ...which has not run it yet
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await run_in_trio(_return_after_checkpoint, "next") == "next"

    run_strict(main)
    # As with a task per call: the Trio side starts in a cancelled scope, so it
    # is cancelled at its first checkpoint and its finally blocks run.
    assert events == ["started", "finally"]


def test_each_call_on_a_reused_worker_gets_its_callers_context() -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    inner: contextvars.ContextVar[str] = contextvars.ContextVar("inner", default="unset")

    async def trio_side() -> tuple[str, str, trio.lowlevel.Task]:
        await trio.lowlevel.checkpoint()
        seen = var.get(), inner.get()
        # Set in Trio: stays in this call, as with a task per call.
        inner.set("leaked")
        var.set("leaked")
        await trio.lowlevel.checkpoint()
        return *seen, trio.lowlevel.current_task()

    async def in_task(value: str) -> tuple[str, str, trio.lowlevel.Task]:
        var.set(value)
        return await run_in_trio(trio_side)

    async def main() -> list[tuple[str, str, trio.lowlevel.Task]]:
        results = [await asyncio.create_task(in_task(value)) for value in ("a", "b", "c")]
        var.set("main")
        results.append(await run_in_trio(trio_side))
        assert (var.get(), inner.get()) == ("main", "unset")
        return results

    results = run_strict(main)
    assert [result[:2] for result in results] == [
        ("a", "unset"),
        ("b", "unset"),
        ("c", "unset"),
        ("main", "unset"),
    ]
    assert len({result[2] for result in results}) == 1  # all four on one worker


@pytest.mark.parametrize("warm", [False, True], ids=["first call", "reused worker"])
def test_idle_workers_keep_nothing_of_their_last_call(warm: bool) -> None:
    class Payload:
        pass

    var: contextvars.ContextVar[Payload] = contextvars.ContextVar("var")
    refs: list[weakref.ref[Payload]] = []

    async def trio_side(argument: Payload) -> Payload:
        await trio.lowlevel.checkpoint()
        assert isinstance(var.get(), Payload)
        return Payload()

    async def caller() -> None:
        in_context, argument = Payload(), Payload()
        var.set(in_context)
        result = await run_in_trio(trio_side, argument)
        refs.extend(weakref.ref(obj) for obj in (in_context, argument, result))

    async def main() -> list[bool]:
        if warm:
            await run_in_trio(_return_after_checkpoint, None)
        await asyncio.create_task(caller())  # its context goes away with it
        await asyncio.sleep(0.01)  # the worker is parked by now
        gc.collect()
        assert len(_asyncio._guests[asyncio.get_running_loop()].idle) == 1
        return [ref() is None for ref in refs]

    assert run_strict(main) == [True, True, True]


def test_without_context_swapping_every_call_gets_its_own_task(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The fallback for a Trio that would not let us set Task.context.
    monkeypatch.setattr(_asyncio, "_context_swap_works", False)
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")

    async def trio_side() -> tuple[str, trio.lowlevel.Task]:
        await trio.lowlevel.checkpoint()
        return var.get(), trio.lowlevel.current_task()

    async def main() -> list[tuple[str, trio.lowlevel.Task]]:
        results = []
        for value in ("a", "b", "c"):
            var.set(value)
            results.append(await run_in_trio(trio_side))
        return results

    results = run_strict(main)
    assert [value for value, _ in results] == ["a", "b", "c"]
    assert len({task for _, task in results}) == 3


class _BlockingIOWaits(trio.abc.Instrument):
    """Counts scheduler passes after which Trio may block waiting for I/O."""

    def __init__(self) -> None:
        self.count = 0

    def before_io_wait(self, timeout: float) -> None:
        if timeout > 0:
            self.count += 1


def test_calls_do_not_wake_trio_one_by_one() -> None:
    # Waking a guest run that waits for I/O costs two thread hand-offs. A
    # caller submitting its next call as soon as the previous one returns finds
    # the guest still ticking (an idle worker stays runnable while calls keep
    # finishing), and calls submitted together share one wake-up.
    waits = _BlockingIOWaits()

    async def add() -> None:
        trio.lowlevel.add_instrument(waits)

    async def remove() -> None:
        trio.lowlevel.remove_instrument(waits)

    async def main() -> tuple[int, int]:
        await run_in_trio(add)
        waits.count = 0
        for i in range(200):
            assert await run_in_trio(_return_after_checkpoint, i) == i
        sequential, waits.count = waits.count, 0
        await asyncio.gather(*(run_in_trio(_return_after_checkpoint, i) for i in range(200)))
        together = waits.count
        await run_in_trio(remove)
        return sequential, together

    sequential, together = run_strict(main)
    assert sequential <= 5  # not one per call
    assert together <= 5  # not one per call


@pytest.mark.parametrize("wrapper", ["wait_for", "task"])
def test_calls_a_few_loop_iterations_apart_do_not_wake_trio_one_by_one(wrapper: str) -> None:
    # asyncio.wait_for and create_task put a few loop iterations between one
    # call's result and the next call: the idle worker learns to wait that long.
    waits = _BlockingIOWaits()

    async def add() -> None:
        trio.lowlevel.add_instrument(waits)

    async def remove() -> None:
        trio.lowlevel.remove_instrument(waits)

    async def one_call(i: int) -> int:
        if wrapper == "wait_for":
            return await asyncio.wait_for(run_in_trio(_return_after_checkpoint, i), 10)
        return await asyncio.create_task(run_in_trio(_return_after_checkpoint, i))

    async def main() -> int:
        await run_in_trio(add)
        waits.count = 0
        for i in range(200):
            assert await one_call(i) == i
        count = waits.count
        await run_in_trio(remove)
        return count

    # Until the spinner has learnt how long to wait (counted in ticks, not
    # time, so this does not depend on the machine's load) some calls wake Trio:
    # 16 (one probe interval) or none here, 200 without the spinner.
    assert run_strict(main) <= 20


# --------------------------------------------------------------------------- bridged


class _Service:
    """A stand-in for a conduit class with bridged methods."""

    def __init__(self) -> None:
        self.libraries: list[str] = []

    @bridged
    async def double(self, x: int, *, extra: int = 0) -> int:
        """Double ``x`` (in Trio)."""
        await trio.sleep(0.001)
        self.libraries.append(sniffio.current_async_library())
        return 2 * x + extra

    @bridged
    async def fail(self) -> None:
        await trio.lowlevel.checkpoint()
        raise _Boom("bridged failure")


def test_bridged_keeps_metadata() -> None:
    assert _Service.double.__name__ == "double"
    assert _Service.double.__doc__ == "Double ``x`` (in Trio)."
    assert inspect.iscoroutinefunction(_Service.double)
    assert list(inspect.signature(_Service.double).parameters) == ["self", "x", "extra"]


async def test_bridged_under_trio() -> None:
    service = _Service()
    assert await service.double(20, extra=2) == 42
    assert service.libraries == ["trio"]
    with pytest.raises(_Boom):
        await service.fail()


def test_bridged_under_asyncio() -> None:
    service = _Service()

    async def main() -> int:
        with pytest.raises(_Boom):
            await service.fail()
        return await service.double(20, extra=2)

    assert run_strict(main) == 42
    assert service.libraries == ["trio"]  # the body ran in Trio all the same


# --------------------------------------------------------------------------- invoke, plain trio.run


async def test_invoke_sync_callback_under_trio() -> None:
    assert await invoke(lambda a, b: a + b, 1, 2) == 3


async def test_invoke_trio_callback_under_trio() -> None:
    async def callback(x: int) -> tuple[int, str]:
        await trio.sleep(0.001)
        return x, sniffio.current_async_library()

    assert await invoke(callback, 7) == (7, "trio")


async def test_invoke_sync_callback_returning_awaitable_under_trio() -> None:
    def callback() -> Awaitable[str]:
        return _return_after_checkpoint("awaited")

    assert await invoke(callback) == "awaited"


async def test_invoke_propagates_exceptions_under_trio() -> None:
    async def callback() -> None:
        await trio.lowlevel.checkpoint()
        raise _Boom

    with pytest.raises(_Boom):
        await invoke(callback)

    def sync_callback() -> None:
        raise _Boom

    with pytest.raises(_Boom):
        await invoke(sync_callback)


async def test_invoke_asyncio_callback_needs_an_asyncio_host() -> None:
    @asyncio_callback
    async def callback() -> None:
        raise AssertionError("must not run")

    with pytest.raises(RuntimeError, match="not hosted on an asyncio loop"):
        await invoke(callback)


def test_invoke_outside_trio_raises() -> None:
    async def main() -> None:
        await invoke(lambda: None)

    with pytest.raises(RuntimeError, match="from a Trio task"):
        run_strict(main)


def test_markers() -> None:
    async def plain(*args: object) -> None:
        pass

    marked = trio_callback(plain)
    assert marked is plain
    assert callback_world(marked) == "trio"
    assert callback_world(functools.partial(functools.partial(marked, 1), 2)) == "trio"
    assert callback_world(lambda: None) is None

    class Handler:
        async def handle(self) -> None:
            pass

    handler = Handler()
    asyncio_callback(handler.handle)  # a bound method: its function gets the mark
    assert callback_world(handler.handle) == "asyncio"
    assert callback_world(Handler().handle) == "asyncio"

    wrapped = asyncio_callback(len)  # takes no attributes: wrapped
    assert callback_world(wrapped) == "asyncio"
    assert wrapped([1, 2]) == 2


# --------------------------------------------------------------------------- invoke, asyncio-hosted


def _run_in_guest(trio_side: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await run_in_trio(trio_side)

    return run_strict(main)


def test_invoke_sync_callback_when_hosted() -> None:
    def callback(x: int) -> tuple[int, str]:
        return x, sniffio.current_async_library()

    async def trio_side() -> tuple[int, str]:
        return await invoke(callback, 4)  # type: ignore[no-any-return]

    assert _run_in_guest(trio_side) == (4, "trio")  # called right in the Trio task


def test_invoke_async_callback_runs_on_the_asyncio_loop_when_hosted() -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")

    async def callback(x: int) -> dict[str, object]:
        await asyncio.sleep(0.001)  # would fail under Trio
        return {
            "x": x,
            "library": sniffio.current_async_library(),
            "task": asyncio.current_task() is not None,
            "var": var.get(),
        }

    async def trio_side() -> dict[str, object]:
        var.set("from trio")
        return await invoke(callback, 9)  # type: ignore[no-any-return]

    assert _run_in_guest(trio_side) == {
        "x": 9,
        "library": "asyncio",
        "task": True,
        "var": "from trio",  # the asyncio task copies the Trio task's context
    }


def test_an_asyncio_callback_cancelled_before_it_starts_is_not_reported_unawaited() -> None:
    """The callback's coroutine runs inside a wrapper that returns SystemExit
    as a value; cancelled before its task's first step, the task closes only
    the wrapper, and the callback's coroutine was reported as "never awaited"
    (run_strict fails on that warning)."""
    started: list[bool] = []

    async def callback() -> None:
        started.append(True)

    async def trio_side() -> bool:
        with trio.CancelScope() as scope:
            scope.cancel()  # cancelled before the asyncio task gets its first step
            await invoke(callback)
        return scope.cancelled_caught

    assert _run_in_guest(trio_side)
    assert started == []


def test_calling_task_of_a_bridged_call_is_the_task_awaiting_its_asyncio_callback() -> None:
    # A Trio task awaits an asyncio callback (a handler), which awaits a
    # bridged call: that call runs in a worker on the Trio task's behalf
    # (the connection's "is this one of my tasks?" asks about it). The tasks
    # the call starts inherit its contextvars, but are themselves.
    seen: dict[str, object] = {}

    async def bridged_call() -> None:
        seen["worker"] = trio.lowlevel.current_task()
        seen["on behalf of"] = calling_task()
        async with trio.open_nursery() as nursery:

            async def started() -> None:
                seen["child"] = trio.lowlevel.current_task()
                seen["child on behalf of"] = calling_task()

            nursery.start_soon(started)

    async def callback() -> None:
        await run_in_trio(bridged_call)

    async def trio_side() -> None:
        seen["awaiting"] = trio.lowlevel.current_task()
        assert calling_task() is seen["awaiting"]
        await invoke(callback)

    _run_in_guest(trio_side)
    assert seen["worker"] is not seen["awaiting"]
    assert seen["on behalf of"] is seen["awaiting"]
    assert seen["child on behalf of"] is seen["child"]


def test_invoke_trio_marked_callback_runs_in_trio_when_hosted() -> None:
    @trio_callback
    async def callback() -> str:
        await trio.sleep(0.001)  # would fail under asyncio
        return sniffio.current_async_library()

    async def trio_side() -> str:
        return await invoke(callback)  # type: ignore[no-any-return]

    assert _run_in_guest(trio_side) == "trio"


def test_invoke_asyncio_marked_sync_callback_runs_in_an_asyncio_task() -> None:
    @asyncio_callback
    def callback() -> tuple[bool, str]:
        return asyncio.current_task() is not None, sniffio.current_async_library()

    async def trio_side() -> tuple[bool, str]:
        return await invoke(callback)  # type: ignore[no-any-return]

    assert _run_in_guest(trio_side) == (True, "asyncio")


def test_invoke_asyncio_callback_exception_crosses_into_trio() -> None:
    async def callback() -> None:
        await asyncio.sleep(0)
        raise _Boom("from asyncio")

    async def trio_side() -> str:
        with pytest.raises(_Boom, match="from asyncio"):
            await invoke(callback)
        return "caught in trio"

    assert _run_in_guest(trio_side) == "caught in trio"


def test_trio_cancellation_of_invoke_cancels_the_asyncio_task() -> None:
    events: list[str] = []

    async def callback() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            events.append("asyncio task cancelled")
            raise
        finally:
            await asyncio.sleep(0.01)  # cleanup that awaits: Trio must wait for it
            events.append("asyncio finally done")

    async def trio_side() -> list[str]:
        with trio.move_on_after(0.1) as scope:
            await invoke(callback)
        assert scope.cancelled_caught  # a genuine trio.Cancelled was raised
        return list(events)  # snapshot right after invoke() gave up

    assert _run_in_guest(trio_side) == ["asyncio task cancelled", "asyncio finally done"]


def test_trio_cancellation_wins_over_an_asyncio_callback_that_ignores_it() -> None:
    async def callback() -> str:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            return "ignored the cancellation"
        return "slept"

    async def trio_side() -> bool:
        with trio.move_on_after(0.05) as scope:
            await invoke(callback)
        return scope.cancelled_caught

    assert _run_in_guest(trio_side) is True


def test_asyncio_callback_cancelled_by_someone_else() -> None:
    async def callback() -> None:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        await asyncio.sleep(0)

    async def trio_side() -> str:
        with pytest.raises(CallbackCancelledError):
            await invoke(callback)
        return "ok"

    assert _run_in_guest(trio_side) == "ok"


def test_asyncio_callback_can_call_back_into_bridged_code() -> None:
    service = _Service()

    async def callback() -> int:
        await asyncio.sleep(0)
        return await service.double(10)  # asyncio -> Trio again, from inside invoke

    async def trio_side() -> int:
        return await invoke(callback)  # type: ignore[no-any-return]

    assert _run_in_guest(trio_side) == 20


# --------------------------------------------------------------------------- sys.exit in handlers


async def _wait_for(predicate: Callable[[], bool]) -> None:
    """Under asyncio: return once ``predicate()`` holds (at most 10 s)."""
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("not within 10 s")


def test_a_server_handler_calling_sys_exit_as_asyncio_run_ends_leaves_no_guest_run() -> None:
    """A server handler calls ``sys.exit(3)``; the application's main task awaits
    the call that made it, not ``server.run()``, and returns: asyncio.run then
    cancels ``server.run()`` with every other task, and its SystemExit comes
    out of ``asyncio.run`` once the guest run is over. (Raised from the loop at
    once, it stopped asyncio.run's shutdown with the run still going: "Trio
    guest run got abandoned", its runner left in the thread.)"""

    async def main() -> None:
        server = Server(server_descriptor())

        @server.rpc
        def stop() -> None:
            sys.exit(3)

        serving = asyncio.create_task(server.run())
        port = await server.wait_listening()
        client = Client(client_descriptor(port, reconnect_enabled=False))
        await client.connect()
        with pytest.raises(ConnectionClosed):
            await client.call("stop")
        assert not serving.done()

    exited = run_strict_raises(SystemExit, main)
    assert isinstance(exited, SystemExit) and exited.code == 3


def test_an_asyncio_client_handler_calling_sys_exit_reaches_the_application_once() -> None:
    """As under Trio (``tests/test_server_client.py``): the connection ends, the
    server's call gets ``connection_closed``, and the application's next call
    raises the SystemExit, once. (asyncio's Task raised it straight out of the
    loop, the conduit task awaiting the handler never saw it, and it came out
    of asyncio.run besides.)"""

    async def main() -> None:
        server = Server(server_descriptor())
        serving = asyncio.create_task(server.run())
        port = await server.wait_listening()
        client = Client(client_descriptor(port, reconnect_enabled=False))

        @client.rpc
        async def leave() -> None:
            await asyncio.sleep(0)
            sys.exit(3)

        await client.connect()
        client_id = client.id
        assert client_id is not None
        await _wait_for(lambda: client_id in server.clients)
        answer = await asyncio.wait_for(server.clients[client_id].rpc.call("leave"), 10)
        assert answer["code"] == "connection_closed", answer
        await _wait_for(lambda: not client.connected)
        with pytest.raises(SystemExit) as exited:
            await client.call("anything")
        assert exited.value.code == 3
        with pytest.raises(ConnectionClosed):
            await client.call("anything")
        await server.close()
        await serving

    run_strict(main)


# --------------------------------------------------------------------------- Ctrl-C

_CTRL_C_SCRIPT = textwrap.dedent(
    """
    import asyncio, signal, sys
    import trio
    from conduit._asyncio import run_in_trio

    # Python's Ctrl-C handler even when this was started with SIGINT ignored
    # (a shell's background job): asyncio.run() installs its own only then.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    async def long_operation(mode):
        print("READY", flush=True)
        try:
            if mode == "idle":  # Trio waits in its I/O thread
                await trio.sleep(60)
            else:  # Trio keeps the loop busy with scheduler ticks
                with trio.move_on_after(60):
                    while True:
                        await trio.lowlevel.checkpoint()
        finally:
            print("TRIO FINALLY", flush=True)

    async def main(mode):
        # Several bridged calls in flight, as in a real program.
        await asyncio.gather(*(run_in_trio(long_operation, mode) for _ in range(3)))

    try:
        asyncio.run(main(sys.argv[1]))
    except KeyboardInterrupt:
        print("KEYBOARD INTERRUPT", flush=True)
        sys.exit(42)
    print("RETURNED NORMALLY", flush=True)
    """
)


def _pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line.rstrip("\n"))
    lines.put(None)  # end of stream


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("mode", ["idle", "busy"])
def test_ctrl_c_stops_long_bridged_calls(mode: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(SRC), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", _CTRL_C_SCRIPT, mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # one stream: tracebacks and warnings show up in it
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()
    # A reader thread, so every wait below has a timeout (select() on a
    # buffered text stream would miss lines already buffered).
    reader = threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True)
    reader.start()
    try:
        for _ in range(3):
            assert lines.get(timeout=30) == "READY"
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)  # prompt: well before the Trio sleeps would end
        reader.join(timeout=10)
        output: list[str] = []
        for _ in range(10_000):
            line = lines.get(timeout=10)
            if line is None:
                break
            output.append(line)
        assert proc.returncode == 42, output
        assert output == ["TRIO FINALLY"] * 3 + ["KEYBOARD INTERRUPT"]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        reader.join(timeout=10)  # EOF once the child is gone
        proc.stdout.close()


# ------------------------------------------------------------------- another thread's objects


def test_a_servers_methods_awaited_from_another_threads_loop_are_refused() -> None:
    """A server served by one thread's ``asyncio.run``, awaited from another's:
    its methods touch its run's nurseries and tasks, and awaited from the other
    run they corrupted both (found by a review on 2026-12-07: the broadcast
    seemed to succeed, then both runs crashed). Refused now, saying where to
    await them; ``asyncio.run_coroutine_threadsafe`` on the server's loop works;
    once that run is over, the objects may be used from anywhere again."""
    server = Server(server_descriptor())
    client = Client(client_descriptor(0))
    loop_of_the_server: asyncio.AbstractEventLoop | None = None
    ready = threading.Event()
    stop: asyncio.Event | None = None

    async def serve() -> None:
        nonlocal loop_of_the_server, client, stop
        loop_of_the_server, stop = asyncio.get_running_loop(), asyncio.Event()
        serving = asyncio.create_task(server.run())
        await server.wait_listening()
        client = Client(client_descriptor(server.port))
        await client.connect()
        await client.rpc.call("nothing")  # answered: the server lists the client
        ready.set()
        await stop.wait()
        await client.disconnect()
        await server.close()
        await serving

    thread = threading.Thread(target=lambda: asyncio.run(asyncio.wait_for(serve(), 60)))
    thread.start()
    try:
        assert ready.wait(30)

        async def from_here() -> tuple[list[str], int]:
            refused = []
            for awaitable in (
                lambda: server.broadcast("news", 1),
                lambda: client.call("echo", text="x"),
                lambda: client.rpc.call("echo", text="x"),
                lambda: server.clients[str(client.id)].call("echo"),
                lambda: client.disconnect(),
            ):
                with pytest.raises(RuntimeError, match="of another thread, which still runs"):
                    await awaitable()
                refused.append("refused")
            assert loop_of_the_server is not None
            there = asyncio.run_coroutine_threadsafe(
                server.broadcast("news", 1), loop_of_the_server
            )
            return refused, await asyncio.wrap_future(there)

        # (Not run_strict: the server's thread has a guest run of its own.)
        refused, reached = asyncio.run(asyncio.wait_for(from_here(), 30))
        assert refused == ["refused"] * 5 and reached == 1
        assert client.connected  # nothing of its run was touched
    finally:
        if loop_of_the_server is not None and stop is not None:
            loop_of_the_server.call_soon_threadsafe(stop.set)
        thread.join(60)
    assert not thread.is_alive()

    async def after_its_run() -> None:
        # That run is over: this thread may run the server and connect the client.
        serving = asyncio.create_task(server.run())
        await server.wait_listening()
        again = Client(client_descriptor(server.port))
        await again.connect()
        await again.disconnect()
        await server.close()
        await serving

    run_strict(after_its_run)


def test_a_clients_calls_from_another_threads_trio_run_are_refused() -> None:
    """The same between two ``trio.run`` threads, while the client is connected."""
    refused: list[str] = []

    async def main() -> None:
        server = Server(server_descriptor())
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            client = Client(client_descriptor(server.port))
            await client.connect()

            def other_thread() -> None:
                async def call() -> None:
                    with pytest.raises(RuntimeError, match="of another thread, which still runs"):
                        await client.rpc.call("anything")
                    refused.append("refused")

                trio.run(call)

            await trio.to_thread.run_sync(other_thread)
            await client.disconnect()

            def connect_there() -> None:
                # Disconnected, the client lives nowhere, though its run goes
                # on: another thread's run may connect it (a review found it
                # refused).
                async def use() -> None:
                    await client.connect()
                    await client.rpc.call("anything")
                    await client.disconnect()

                trio.run(use)
                refused.append("connected there")

            await trio.to_thread.run_sync(connect_there)
            await server.close()

    trio.run(main)
    assert refused == ["refused", "connected there"]


def test_a_handlers_generator_exit_ends_its_server_not_the_guest_run() -> None:
    """A handler that raises ``GeneratorExit`` (a ``BaseException``): as under
    ``trio.run``, it comes out of its server's ``run()``, and the loop's other
    conduit objects work on. It was taken for the worker's coroutine being
    closed, went to Trio, and crashed the guest run with every conduit object
    on the loop (found by a review on 2026-12-07)."""

    async def main() -> tuple[str, Any]:
        # The timeout in this coroutine, the task's own: awaited through
        # another (asyncio.wait_for's since Python 3.12, any wrapper's), a
        # GeneratorExit out of the awaited task is Python's signal to close
        # this coroutine, which then sees a new, empty one.
        async with asyncio.timeout(30):
            crashing, steady = Server(server_descriptor()), Server(server_descriptor())

            @crashing.rpc
            async def boom() -> int:
                raise GeneratorExit("from the handler")

            @steady.rpc
            def ok() -> int:
                return 7

            crashing_run = asyncio.create_task(crashing.run())
            steady_run = asyncio.create_task(steady.run())
            await crashing.wait_listening()
            await steady.wait_listening()
            victim = Client(client_descriptor(crashing.port))
            bystander = Client(client_descriptor(steady.port))
            await victim.connect()
            await bystander.connect()
            answer = await victim.rpc.call("boom")
            with pytest.raises(GeneratorExit, match="from the handler"):
                await crashing_run
            after = await bystander.rpc.call("ok")
            await victim.disconnect()
            await bystander.disconnect()
            await steady.close()
            await steady_run
            return answer["code"], after

    code, after = asyncio.run(main())
    assert code == "connection_closed"
    assert after == {"success": True, "data": 7}


@pytest.mark.skipif(sys.version_info < (3, 12), reason="asyncio.eager_task_factory is 3.12's")
def test_an_eager_task_made_in_a_plain_handler_calls_through_the_bridge() -> None:
    """Under ``asyncio.eager_task_factory``, a task a plain ``def`` handler
    creates takes its first step at once, inside the Trio guest tick that runs
    the handler, where sniffio says "trio": its bridged call was awaited as
    Trio code and failed ("Task got bad yield: WaitTaskRescheduled"; a review
    of Python 3.12 and 3.13 found it). Run with ``nox -s tests_other_pythons``."""
    outcomes: list[Any] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined]
        server = Server(server_descriptor())
        tasks: set[asyncio.Task[None]] = set()

        async def notify(client: Client) -> None:
            try:
                outcomes.append((await client.rpc.call("add", a=1, b=2))["data"])
            except BaseException as exc:
                outcomes.append(exc)

        @server.rpc
        def add(a: int, b: int) -> int:
            return a + b

        @server.rpc
        def poke() -> None:
            tasks.add(loop.create_task(notify(client)))

        running = asyncio.create_task(server.run())
        await server.wait_listening()
        client = Client(client_descriptor(server.port))
        await client.connect()
        await client.rpc.call("poke")
        assert tasks  # made by the handler before it answered
        async with asyncio.timeout(10):
            await asyncio.gather(*tasks)
        await client.disconnect()
        await server.close()
        await running

    asyncio.run(main())
    assert outcomes == [3], outcomes


def test_trio_run_from_an_asyncio_task_is_trio_while_another_thread_hosts_a_guest() -> None:
    """A ``trio.run`` started inside an asyncio task of one thread runs Trio's
    code there, while another thread's loop hosts a guest run: the bridge's
    test for an asyncio task stepping in a guest tick is for the thread that
    ticks (its first version counted guest runs over the process, and sent
    this thread's Trio calls to asyncio: "cannot start conduit's Trio guest
    run", found by a review)."""
    outcome: dict[str, Any] = {}

    async def main() -> None:
        server = Server(server_descriptor())

        @server.rpc
        def add(a: int, b: int) -> int:
            return a + b

        running = asyncio.create_task(server.run())
        await server.wait_listening()
        port = server.port

        def other_thread() -> None:
            async def in_trio() -> Any:
                client = Client(client_descriptor(port))
                await client.connect()
                try:
                    return await client.rpc.call("add", a=1, b=2)
                finally:
                    await client.disconnect()

            async def in_asyncio() -> None:
                try:
                    outcome["value"] = trio.run(in_trio)
                except BaseException as exc:
                    outcome["error"] = exc

            asyncio.run(in_asyncio())

        thread = threading.Thread(target=other_thread)
        thread.start()
        await asyncio.to_thread(thread.join, 30)
        await server.close()
        await running

    asyncio.run(main())
    assert outcome == {"value": {"success": True, "data": 3}}, outcome
