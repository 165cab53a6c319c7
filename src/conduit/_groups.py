"""Exception groups from our nurseries, as the application should see them.

Trio groups what every task of a nursery raised. The nurseries inside a
server's run, a connection or a client are ours, not the application's: a
user pressing Ctrl-C on ``trio.run(server.run)`` should see a
KeyboardInterrupt, not a group of groups of one, and a handler's
``sys.exit(3)`` should end the process with 3.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar

import trio

E = TypeVar("E", bound=BaseException)

#: What ends a program whatever else went wrong beside it.
FATAL = (KeyboardInterrupt, SystemExit)


def leaves(error: BaseException) -> Iterator[BaseException]:
    """The exceptions ``error`` holds, looking inside groups (itself if not a group)."""
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from leaves(inner)
    else:
        yield error


def first_leaf(error: BaseException, kind: type[E] | tuple[type[E], ...]) -> E | None:
    """The first exception of ``kind`` that ``error`` holds, at any depth."""
    for leaf in leaves(error):
        if isinstance(leaf, kind):
            return leaf
    return None


def collapsed(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """What to raise instead of ``group`` from our own nurseries.

    Cancellation alone stays the group (Trio's cancel scopes find their own
    Cancelled in it). Otherwise, Trio's Cancelled aside: the first
    KeyboardInterrupt or SystemExit, which ends the program anyway; else the
    one exception there is; else the group, unchanged (several failures).
    """
    rest = group.split(trio.Cancelled)[1]
    if rest is None:
        return group
    fatal = first_leaf(rest, FATAL)
    if fatal is not None:
        return fatal
    found = list(leaves(rest))
    return found[0] if len(found) == 1 else group


def beside(group: BaseExceptionGroup[BaseException], chosen: BaseException) -> list[BaseException]:
    """What else ``group`` holds than ``chosen`` (Trio's Cancelled aside): the
    failures that :func:`collapsed`'s KeyboardInterrupt or SystemExit would
    hide, for the caller to report."""
    return [
        leaf
        for leaf in leaves(group)
        if leaf is not chosen and not isinstance(leaf, trio.Cancelled)
    ]


__all__ = ["FATAL", "beside", "collapsed", "first_leaf", "leaves"]
