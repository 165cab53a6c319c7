"""What file transfers put on the wire besides raw chunks.

Control goes through ordinary RPCs (names below); the bytes go through a data
stream whose END frame carries :class:`Trailer`: the size and SHA-256 of the
whole file, computed by the sender while it read.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import struct
from typing import Any

import attrs

from .._log_limit import ThreadedLimitedLog
from .._stored_errors import detached
from ..errors import RemoteProtocolError, RPCError, failure_dict
from ._names import DOWNLOAD_ID_PREFIX

#: Codes of failures that may be this side's own storage's (a directory it
#: may not write, a disk full or failing, an object store out of reach):
#: logged where they happen (:func:`as_rpc_error`) when the storage itself
#: raised them, since the peer's error alone leaves whoever runs this side
#: blind to them. (A ``no_space`` of the admission, a size announced over the
#: free space, is the peer's request refused: not logged.)
STORAGE_FAULTS = frozenset({"permission_denied", "io_error", "no_space", "storage_unavailable"})
# A peer can make them come again and again (one upload after another into a
# directory the server may not write): one budget per code. Locked: batches
# of small files are stored, and their failures turned into errors, in
# worker threads.
_storage_log = ThreadedLimitedLog(logging.getLogger("conduit.transfer"))


def _from_storage(exc: BaseException) -> bool:
    """Whether ``exc`` came from the storage: an OSError, or raised from one
    (or from an object store's error) by the code that met it."""
    return isinstance(exc, OSError) or exc.__cause__ is not None


_TRAILER = struct.Struct("!Q32s")

# RPC methods a server registers (the names are part of the protocol).
FILE_LIST = "file_list"
FILE_STAT = "file_stat"
UPLOAD_BEGIN = "file_upload_begin"
UPLOAD_FINISH = "file_upload_finish"
UPLOAD_SMALL = "file_upload_small"
UPLOAD_BATCH = "file_upload_batch"
DOWNLOAD = "file_download"
DOWNLOAD_BATCH = "file_download_batch"
FILE_DELETE = "file_delete"
FILE_RENAME = "file_rename"
# ... and a client registers, to receive pushes.
PUSH_BEGIN = "file_push_begin"
PUSH_FINISH = "file_push_finish"
PUSH_SMALL = "file_push_small"


@attrs.frozen
class Trailer:
    """Size and SHA-256 digest of the complete file."""

    size: int
    sha256: bytes

    def pack(self) -> bytes:
        """Encode for the END frame."""
        return _TRAILER.pack(self.size, self.sha256)

    @classmethod
    def unpack(cls, data: bytes) -> Trailer:
        """Decode an END frame's payload; anything else is a protocol error."""
        if len(data) != _TRAILER.size:
            raise RemoteProtocolError(
                f"file trailer must be {_TRAILER.size} bytes, got {len(data)}"
            )
        size, digest = _TRAILER.unpack(data)
        return cls(size, digest)

    @property
    def checksum(self) -> str:
        """The digest as lowercase hex, as reported to users."""
        return self.sha256.hex()


def transfer_key(name: str, size: int, mtime_ns: int) -> str:
    """Identify one attempt to send one version of a file, for resuming.

    The receiver keeps a partial file under this key; a retry of the same file
    (same name, size and modification time) finds it. The receiver still
    re-verifies the prefix by hash before trusting it.
    """
    digest = hashlib.sha256(f"{name}\0{size}\0{mtime_ns}".encode()).hexdigest()
    return digest[:32]


def download_transfer_id(key: str) -> str:
    """The id of a download's partial file, from its :func:`transfer_key`."""
    return DOWNLOAD_ID_PREFIX + key


def as_rpc_error(exc: BaseException, *, name: str | None = None) -> RPCError:
    """The error the peer sees for a local failure of a transfer RPC.

    The same message and code as the failure dict a local caller gets
    (:func:`conduit.errors.failure_dict`), so both sides of a transfer name a
    failure alike. An ``OSError`` names the path it failed on, which may be
    this side's absolute storage path: given ``name`` (the file the peer asked
    for), the peer is told that instead. It is new, or a
    :func:`~conduit._stored_errors.detached` copy of ``exc``: without a
    traceback, fit to be kept as a transfer's verdict.
    """
    if isinstance(exc, RPCError):
        return detached(exc)
    local = exc
    if isinstance(exc, OSError) and name is not None:
        # OSError(errno, ...) builds the matching subclass (FileNotFoundError...).
        exc = OSError(exc.errno or errno.EIO, exc.strerror or "I/O error", name)
    failure = transfer_failure(exc)
    code = failure["code"]
    if code in STORAGE_FAULTS and _from_storage(local):
        # The local error itself: it may say more than the peer is told.
        about = f" for {name!r}" if name is not None else ""
        _storage_log.warning(code, "storage failure (%s)%s: %s", code, about, local)
    return RPCError(failure["error"], code)


def transfer_failure(exc: BaseException) -> dict[str, Any]:
    """The ``{"success": False, ...}`` result of a transfer that failed with ``exc``."""
    return failure_dict(exc, default_code="transfer_failed")
