"""Log lines a peer causes at will: rate-limited, and holding nothing of the connection."""

from __future__ import annotations

import gc
import logging
import weakref

from conduit._log_limit import LimitedLog


class _Kept:
    """Something a failing frame held (a connection, say)."""


class _KeepRecords(logging.Handler):
    """A handler that keeps every record (as a memory buffer or a test's capture does)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _fail_holding(kept: _Kept) -> None:
    holder = kept  # in this frame, which the traceback keeps
    raise OSError(f"failed with {type(holder).__name__}")


def test_an_exception_in_a_lines_arguments_is_kept_as_its_text() -> None:
    """A line logged with an exception among its arguments kept the exception
    in its record, and through its traceback every frame it passed: a
    handler that keeps records kept the connections those frames held (a
    fuzzing review, 2026-12-07). The record holds the exception's text."""
    logger = logging.getLogger("conduit.test_log_limit")
    handler = _KeepRecords()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        limited = LimitedLog(logger)
        kept = _Kept()
        gone = weakref.ref(kept)
        try:
            _fail_holding(kept)
        except OSError as exc:
            limited.warning("owner", 0.0, "download of %r stopped: %s", "a.bin", exc)
        del kept
        gc.collect()
        assert gone() is None, "the record kept what the failing frame held"
        (record,) = handler.records
        assert record.getMessage() == "download of 'a.bin' stopped: failed with _Kept"
        assert not any(isinstance(arg, BaseException) for arg in record.args or ())
    finally:
        logger.removeHandler(handler)


class _Unshowable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text")


def test_an_exception_that_cannot_be_shown_does_not_stop_the_line() -> None:
    """Its text is asked for here now (not by logging, which would have
    reported a failure to format): one that cannot give it is named by its
    type, and the line is logged all the same."""
    logger = logging.getLogger("conduit.test_log_limit.unshowable")
    handler = _KeepRecords()
    logger.addHandler(handler)
    logger.propagate = False
    try:
        LimitedLog(logger).warning("owner", 0.0, "failed: %s", _Unshowable())
        (record,) = handler.records
        assert record.getMessage() == "failed: <_Unshowable that cannot be shown>"
    finally:
        logger.removeHandler(handler)
