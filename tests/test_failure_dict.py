"""``conduit.errors.failure_dict``: the one mapping from an exception to the failure result.

The transfer results, the error a transfer RPC sends its peer, and the CLI's
per-file results all come from it, so the same failure reads the same
everywhere.
"""

from __future__ import annotations

import errno
from typing import Any

import pytest

from conduit import (
    ChecksumMismatch,
    ConnectionClosed,
    IntegrityError,
    RemoteProtocolError,
    RPCError,
    RPCTimeoutError,
    TransferError,
    UnsafePathError,
)
from conduit.errors import failure_dict
from conduit.transfer._wire import as_rpc_error, transfer_failure

CASES: list[tuple[BaseException, str, str]] = [
    (RPCError("no RPC method named 'x'", "not_found"), "no RPC method named 'x'", "not_found"),
    (RPCTimeoutError("no answer in 2 s"), "no answer in 2 s", "timeout"),
    (TransferError("disk is full", "no_space"), "disk is full", "no_space"),
    (UnsafePathError("'..' is not allowed"), "'..' is not allowed", "unsafe_path"),
    (ChecksumMismatch("sha256 differs"), "sha256 differs", "checksum_mismatch"),
    (ConnectionClosed("peer went away"), "peer went away", "connection_closed"),
    (IntegrityError("record altered"), "record altered", "connection_closed"),
    (
        FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/a.bin"),
        "no such file: /data/a.bin",
        "not_found",
    ),
    (
        IsADirectoryError(errno.EISDIR, "Is a directory", "/data"),
        "is a directory: /data",
        "not_a_file",
    ),
    (
        # What transfer._local raises for a FIFO, a device or a socket: it
        # read "is a directory" too until 2026-12-07 (found by a review of the CLI).
        IsADirectoryError(errno.EISDIR, "not a regular file", "/dev/null"),
        "not a regular file: /dev/null",
        "not_a_file",
    ),
    (
        PermissionError(errno.EACCES, "Permission denied", "/root/x"),
        "permission denied: /root/x",
        "permission_denied",
    ),
    (OSError(errno.EIO, "Input/output error"), "I/O error: Input/output error", "io_error"),
    (
        OSError(errno.EIO, "Input/output error", "/mnt/disk"),
        "I/O error: Input/output error (/mnt/disk)",
        "io_error",
    ),
]


@pytest.mark.parametrize(("exc", "message", "code"), CASES, ids=lambda v: type(v).__name__)
def test_errors_that_say_what_they_are(exc: BaseException, message: str, code: str) -> None:
    expected = {"success": False, "error": message, "code": code}
    assert failure_dict(exc) == expected
    # A code of their own wins over the default.
    assert failure_dict(exc, default_code="transfer_failed") == expected


def test_other_errors_take_the_default_code() -> None:
    ours = RemoteProtocolError("file trailer must be 40 bytes, got 5")
    assert failure_dict(ours) == {
        "success": False,
        "error": "file trailer must be 40 bytes, got 5",
        "code": "error",
    }
    # Not ours: the type name says what kind of failure the message is about.
    foreign = ValueError("bad value")
    assert failure_dict(foreign, default_code="transfer_failed") == {
        "success": False,
        "error": "ValueError: bad value",
        "code": "transfer_failed",
    }


@pytest.mark.parametrize(
    "exc", [case[0] for case in CASES] + [ValueError("v")], ids=lambda v: type(v).__name__
)
def test_the_peer_is_told_what_a_local_caller_gets(exc: BaseException) -> None:
    told = as_rpc_error(exc)
    result: dict[str, Any] = transfer_failure(exc)
    assert (told.message, told.code) == (result["error"], result["code"])
    if isinstance(exc, RPCError):
        # Passed on as it is, subclass and all, but as a copy without a
        # traceback: fit to be kept (see conduit._stored_errors).
        assert type(told) is type(exc) and told is not exc
        assert (told.args, vars(told)) == (exc.args, vars(exc))
        assert told.__traceback__ is None
