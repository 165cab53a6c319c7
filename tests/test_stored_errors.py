"""Errors kept to be raised later are kept and raised detached (``conduit._stored_errors``).

A kept error raised as it is takes the frames it passes through into its
traceback; a frame that reaches the keeper closes a reference cycle, freed
only by the cycle collector (what the cycles held: ``tests/test_resource_limits.py``).
"""

from __future__ import annotations

import gc
import inspect
from typing import Any

import pytest
import trio

from conduit import errors
from conduit._stored_errors import ErrorT, detached
from conduit._streams import IncomingStream
from conduit.errors import ConnectionClosed, LockedOut, StreamReset, TransferError


def _sample(kind: type[BaseException]) -> BaseException:
    """An instance of ``kind``, raised and caught: with a traceback and a context."""
    arguments: dict[str, Any] = {}
    for name, parameter in inspect.signature(kind.__init__).parameters.items():
        if name == "self" or parameter.kind is parameter.VAR_KEYWORD:
            continue
        if parameter.kind is parameter.VAR_POSITIONAL:
            break
        if parameter.default is parameter.empty:
            arguments[name] = 2.5 if name == "retry_after" else f"the {name}"
    try:
        try:
            raise KeyError("the cause")
        except KeyError:
            raise kind(*arguments.values()) if arguments else kind("a message")  # noqa: B904
    except BaseException as caught:
        return caught


@pytest.mark.parametrize("name", errors.__all__)
def test_a_detached_copy_is_the_same_error_without_its_traceback(name: str) -> None:
    original = _sample(getattr(errors, name))
    assert original.__traceback__ is not None and original.__context__ is not None
    copy = detached(original)
    assert copy is not original
    assert type(copy) is type(original)
    assert (copy.args, str(copy), vars(copy)) == (original.args, str(original), vars(original))
    assert (copy.__traceback__, copy.__context__, copy.__cause__) == (None, None, None)
    # The original is left as it was.
    assert original.__traceback__ is not None


def test_attributes_beyond_the_arguments_are_kept() -> None:
    copy = detached(LockedOut("too many attempts", retry_after=12.5))
    assert copy.retry_after == 12.5
    assert str(copy) == "too many attempts"
    assert detached(StreamReset("gone", "source_changed")).code == "source_changed"


@pytest.mark.parametrize(
    "error",
    [
        FileNotFoundError(2, "No such file or directory", "a.bin"),
        OSError(18, "Invalid cross-device link", "a", None, "b"),
        PermissionError(13, "Permission denied"),
        OSError("no errno at all"),
    ],
    ids=repr,
)
def test_os_errors_keep_their_number_and_paths(error: OSError) -> None:
    copy = detached(error)
    assert type(copy) is type(error)
    assert (copy.errno, copy.strerror, copy.filename, copy.filename2) == (
        error.errno,
        error.strerror,
        error.filename,
        error.filename2,
    )
    assert str(copy) == str(error)


@pytest.mark.parametrize("code", [3, "a message", None])
def test_a_system_exit_keeps_its_exit_status(code: int | str | None) -> None:
    # A handler's sys.exit(3), kept for the application's next call, must
    # still end the process with status 3.
    copy = detached(_raised(SystemExit(code)))
    assert isinstance(copy, SystemExit) and copy.code == code


def test_a_group_keeps_detached_copies_of_its_members() -> None:
    members: list[Exception] = [ValueError("a"), KeyError("b")]
    members[0] = _raised(members[0])
    group = _raised(ExceptionGroup("two failures", members))
    assert isinstance(group, ExceptionGroup)
    copy = detached(group)
    assert isinstance(copy, ExceptionGroup) and copy is not group
    assert str(copy) == str(group)
    for member, original in zip(copy.exceptions, group.exceptions, strict=True):
        assert member is not original
        assert (type(member), member.args) == (type(original), original.args)
        assert member.__traceback__ is None
    assert group.exceptions[0].__traceback__ is not None  # the original left as it was


def _raised(error: ErrorT) -> ErrorT:
    """``error``, raised and caught: with a traceback."""
    try:
        raise error
    except BaseException:
        return error


def test_an_error_whose_new_refuses_its_arguments_is_returned_as_it_is() -> None:
    class Picky(Exception):
        def __new__(cls, *args: object) -> Picky:
            if args:
                raise TypeError("no arguments, please")
            return super().__new__(cls)

    error = Picky()
    error.args = ("set by hand",)
    assert detached(error) is error


def test_raising_a_kept_error_twice_makes_no_reference_cycle() -> None:
    """The pattern of a stream's error: kept, raised from a frame that holds the keeper."""

    class Keeper:
        def __init__(self) -> None:
            self.error: BaseException | None = detached(ConnectionClosed("peer went away"))

        def check(self) -> None:
            if self.error is not None:
                raise detached(self.error)

    def use(keeper: Keeper) -> None:
        keeper.check()

    gc.collect()
    gc.disable()
    try:
        keeper = Keeper()
        raised = []
        for _ in range(2):
            with pytest.raises(ConnectionClosed) as caught:
                use(keeper)
            raised.append(caught.value)
            del caught
        assert raised[0] is not raised[1] and raised[0] is not keeper.error
        assert keeper.error is not None and keeper.error.__traceback__ is None
        del keeper, raised
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        found = [thing for thing in gc.garbage if isinstance(thing, ConnectionClosed)]
    finally:
        gc.garbage.clear()
        gc.set_debug(0)
        gc.enable()
    assert found == []


async def test_a_failed_streams_error_is_raised_fresh_each_time() -> None:
    """An IncomingStream keeps what failed it detached and raises copies."""
    stream = IncomingStream(1, 64 * 1024, lambda _stream_id, _credit: None)
    try:
        raise TransferError("the sender gave up", "aborted")
    except TransferError as error:
        stream.fail(error)
    assert stream.error is not None and stream.error.__traceback__ is None
    raised = []
    for _ in range(2):
        with trio.fail_after(5), pytest.raises(TransferError) as caught:
            await stream.receive()
        raised.append(caught.value)
    assert raised[0] is not raised[1]
    assert all(error is not stream.error and str(error) == "the sender gave up" for error in raised)


def test_the_cause_is_kept_detached() -> None:
    """``raise ... from`` says where an error came from (a storage failure is
    one raised from an OSError): the copy keeps a detached copy of it."""
    try:
        try:
            raise OSError(28, "No space left on device")
        except OSError as error:
            raise TransferError("could not write the block", "no_space") from error
    except TransferError as caught:
        original = caught
    copy = detached(original)
    assert isinstance(copy.__cause__, OSError)
    assert copy.__cause__ is not original.__cause__
    assert copy.__cause__.__traceback__ is None
    assert str(copy.__cause__) == str(original.__cause__)
