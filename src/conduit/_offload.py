"""CPU work off the event loop: a worker thread, except under an autojumping test clock.

Trio's :class:`~trio.testing.MockClock` with ``autojump_threshold=0`` jumps
virtual time forward whenever every task is blocked, and a task waiting for a
worker thread counts as blocked: the clock would leap past ``auth_timeout``
(or a test's ``fail_after``) while a 1 ms handshake computes. Trio's docs call
threads and a zero threshold incompatible, so under such a clock the work runs
inline (virtual time does not pass while it runs, which is the clock's point).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar, TypeVarTuple, Unpack

import trio
import trio.testing

_T = TypeVar("_T")
_Ts = TypeVarTuple("_Ts")


def _autojumping() -> bool:
    clock = trio.lowlevel.current_clock()
    return isinstance(clock, trio.testing.MockClock) and clock.autojump_threshold == 0


async def run_sync(
    function: Callable[[Unpack[_Ts]], _T],
    *args: *_Ts,
    limiter: trio.CapacityLimiter | None = None,
) -> _T:
    """``function(*args)`` in a worker thread (under ``limiter``, if given)."""
    if _autojumping():
        await trio.lowlevel.checkpoint()
        return function(*args)
    return await trio.to_thread.run_sync(function, *args, limiter=limiter)


__all__ = ["run_sync"]
