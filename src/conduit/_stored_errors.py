"""Errors kept to be raised later, without the reference cycles that makes.

An exception raised carries a traceback: every frame it passed through, each
with its local variables. When the object it is kept in (a stream's ``error``,
a job's failure, an upload's verdict) is reachable from one of those frames
(a ``stream`` local of the function it was raised through, say), exception,
traceback, frame and keeper form a reference cycle. Reference counting never
frees a cycle; only the cycle collector does, and its full passes are rare (on
a server they come once the number of long-lived objects has grown by a
quarter). Until then the cycle holds everything those frames reach: the
whole connection, its record buffers and socket reads, megabytes each. A
server whose clients gave up uploads part way held 65 to 198 MiB so.

So an error that is kept is kept :func:`detached` (a copy without traceback
or context, its cause detached too), and each place that raises it raises a
fresh detached copy; an error kept once is taken from its keeper before it is
raised, and a frame that raises a local deletes it on the way out.
"""

from __future__ import annotations

from typing import TypeVar, cast

ErrorT = TypeVar("ErrorT", bound=BaseException)


def detached(error: ErrorT) -> ErrorT:
    """A copy of ``error`` to keep or raise: the same type, arguments and
    attributes, its ``__cause__`` detached in turn (``raise ... from`` says
    where an error came from, and callers read it: an error raised from an
    ``OSError`` is a storage failure), and no ``__traceback__`` or
    ``__context__``.

    The copy is made without calling ``__init__`` (its signature may differ
    from ``args``, as :class:`~conduit.errors.LockedOut`'s does): the
    arguments go to ``__new__``, the attributes are copied as they are
    (``SystemExit.code`` too, which only ``__init__`` sets). An exception
    group's copy holds detached copies of its members.
    An exception class whose ``__new__`` refuses its own arguments is
    returned as it is (correct, only not cycle-free).
    """
    kind = type(error)
    duplicate: BaseException
    if isinstance(error, BaseExceptionGroup):
        # Its members carry tracebacks of their own: detached in turn.
        # (derive(), as the group's own split() does: its message, a group of
        # its kind; the notes, cause and context are copied below.)
        duplicate = error.derive([detached(member) for member in error.exceptions])
    else:
        try:
            duplicate = kind.__new__(kind, *error.args)
        except TypeError:
            return error
        duplicate.args = error.args
    if isinstance(error, SystemExit) and isinstance(duplicate, SystemExit):
        # Set by __init__, not from ``args`` by __new__: sys.exit(3)'s exit status.
        duplicate.code = error.code
    if isinstance(error, OSError) and isinstance(duplicate, OSError):
        # Not in ``args``: the path(s) an OSError names. (Only if named: a
        # None set by hand would show as "-> None" in the message.)
        if error.filename is not None:
            duplicate.filename = error.filename
        if error.filename2 is not None:
            duplicate.filename2 = error.filename2
    duplicate.__dict__.update(error.__dict__)
    if error.__cause__ is not None and error.__cause__ is not error:
        duplicate.__cause__ = detached(error.__cause__)
    return cast("ErrorT", duplicate)


__all__ = ["detached"]
