"""The sealed record layer used after the handshake.

::

    record = length (u32, big endian) || AES-256-GCM(plaintext) || tag (16 bytes)

The plaintext is one or more whole frames. The length prefix is the AEAD's
associated data, and the nonce is a per-direction counter, so a record that is
altered, dropped, replayed or reordered fails to open and the connection ends.
"""

from __future__ import annotations

import mmap
import struct
import sys

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import IntegrityError, LocalProtocolError, RemoteProtocolError

LENGTH = struct.Struct("!I")
TAG_SIZE = 16
#: The 12-byte nonce: four zero bytes, then the 64-bit counter, big endian.
_NONCE = struct.Struct("!4xQ")
_MAX_COUNTER = 2**64 - 1
_nonce = _NONCE.pack
#: Records below this size are sealed by concatenation, larger ones in place.
_SMALL_RECORD = 64 * 1024


#: Records with at most this much ciphertext are opened from a copy of their bytes.
_SLICED_MAX = 4096
_TAMPERED = (
    "a record failed authentication: the data was altered in transit "
    "or the peer does not share the session keys"
)

#: Records with at least this much ciphertext are opened into the opener's
#: reusable mapped buffers (bulk data); smaller ones into fresh ``bytes``.
MAPPED_MIN = 64 * 1024
#: Mapped buffers an opener keeps for reuse: a 4 MiB window of 1 MiB records
#: in flight, a receiver's two 2 MiB batches being written or queued (see
#: ``conduit.transfer._write_behind``), the one being opened, and slack.
MAPPED_KEEP = 12


def anonymous_buffer(size: int) -> mmap.mmap:
    """``size`` zeroed bytes of private anonymous memory, given back to the system
    when closed or collected (not a heap block: see :class:`RecordOpener`)."""
    if sys.platform == "win32":  # pragma: no cover - no flags there; private already
        return mmap.mmap(-1, size)
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def has_views(buffer: mmap.mmap) -> bool:
    """Whether a memoryview of ``buffer`` (a frame payload, say) is still alive.

    An mmap counts the buffers it has exported and refuses to resize while any
    is alive; resizing to its own size is otherwise a no-op (``mremap``), so the
    refusal is an exact test, whatever the interpreter's reference counting.
    """
    try:
        buffer.resize(len(buffer))
    except BufferError:
        return True
    return False


def _can_test_views() -> bool:
    """Whether :func:`has_views` works here (it needs ``mremap``: Linux)."""
    try:
        has_views(anonymous_buffer(mmap.PAGESIZE))
    except (OSError, SystemError, ValueError):
        return False
    return True


#: Whether mapped buffers are reused (only where a live view can be detected
#: exactly; elsewhere large records open into fresh ``bytes``, as small ones do).
REUSABLE = _can_test_views()


class RecordSealer:
    """Seals outgoing plaintext into records with a counter nonce."""

    def __init__(self, key: bytes, max_plaintext: int) -> None:
        self._aead = AESGCM(key)
        self._counter = 0
        self.max_plaintext = max_plaintext

    def seal(self, plaintext: bytes | bytearray | memoryview) -> bytearray:
        """Return one record ready for the socket."""
        size = len(plaintext)
        if size >= _SMALL_RECORD:
            record = bytearray(LENGTH.size + size + TAG_SIZE)
            self.seal_into(plaintext, record)
            return record
        # A small record (a call, a result): prefix + ciphertext is one short
        # append, cheaper than a sized buffer and views around encrypt_into.
        if size > self.max_plaintext:
            raise LocalProtocolError(f"record of {size} bytes exceeds {self.max_plaintext}")
        if self._counter >= _MAX_COUNTER:
            raise LocalProtocolError("nonce space exhausted; reconnect")
        prefix = LENGTH.pack(size + TAG_SIZE)
        record = bytearray(prefix)
        record += self._aead.encrypt(_nonce(self._counter), plaintext, prefix)
        self._counter += 1
        return record

    def seal_into(self, plaintext: bytes | bytearray | memoryview, out: bytearray) -> memoryview:
        """Seal one record into the front of ``out``; return the view of it.

        ``out`` must hold ``len(plaintext) + 20`` bytes. Lets a bulk writer reuse
        one buffer per record instead of allocating (and page-faulting in) a
        fresh megabyte each time.
        """
        size = len(plaintext)
        if size > self.max_plaintext:
            raise LocalProtocolError(f"record of {size} bytes exceeds {self.max_plaintext}")
        if self._counter >= _MAX_COUNTER:
            raise LocalProtocolError("nonce space exhausted; reconnect")
        end = LENGTH.size + size + TAG_SIZE
        LENGTH.pack_into(out, 0, size + TAG_SIZE)
        record = memoryview(out)[:end]
        # encrypt_into writes straight behind the prefix: no concatenation copy.
        self._aead.encrypt_into(
            _nonce(self._counter), plaintext, bytes(record[: LENGTH.size]), record[LENGTH.size :]
        )
        self._counter += 1
        return record


class RecordOpener:
    """Incrementally splits the byte stream into records and opens them.

    Large records (bulk data) are opened into buffers that are anonymous
    memory mappings, kept and reused once no memoryview of them is left (the
    frames' payloads are views of their record, held until the consumer has
    written them). Two reasons: a fresh megabyte from ``malloc`` per record
    lands in the heap (glibc raises its mmap threshold to the size of the
    last large block freed), where a few concurrent uploads leave tens of
    megabytes the process never gives back after they end; and a fresh
    mapping per record would pay a page fault per 4 KiB (measured ~9x the
    cost of the decryption itself). Kept mappings pay neither, and are
    unmapped, memory returned to the system, when the connection ends
    (:meth:`release_buffers`) or stays idle (:meth:`release_idle_buffers`).
    """

    def __init__(self, key: bytes, max_plaintext: int, initial: bytes = b"") -> None:
        self._aead = AESGCM(key)
        self._counter = 0
        self._max_sealed = max_plaintext + TAG_SIZE
        # Bytes received and not yet opened start at _offset. When everything
        # before was opened, the next chunk from the socket becomes the buffer
        # as it is (an RPC's record, or a bulk record read whole into the
        # connection's mapping: no copy); bytes that must wait for more are
        # kept in a bytearray we own.
        self._buffer: bytes | bytearray | memoryview = bytearray(initial)
        self._offset = 0
        self._mapped: list[mmap.mmap] = []
        # How many of _mapped (from the front) were handed out since the last
        # release_idle_buffers: the buffers past that were idle all along.
        self._mapped_reach = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes received from the socket.

        A memoryview fed while nothing is buffered is opened in place, not
        copied: its memory must stay as it is until :meth:`next_record` has
        returned None (the opener then copies the part of a record it keeps).
        The connection's reads into its mapping are used so: a record that
        arrived whole in one read is decrypted straight from the read.
        """
        buffer = self._buffer
        if self._offset == len(buffer) and (type(data) is bytes or type(data) is memoryview):
            self._buffer = data
            self._offset = 0
            return
        if type(buffer) is not bytearray:
            buffer = self._buffer = bytearray(memoryview(buffer)[self._offset :])
            self._offset = 0
        buffer += data

    @property
    def buffered(self) -> int:
        """Bytes received and not yet opened."""
        return len(self._buffer) - self._offset

    @property
    def opened(self) -> int:
        """Records opened so far."""
        return self._counter

    def partial(self) -> memoryview:
        """The bytes received and not yet opened: the start of the next record.

        With :meth:`discard_partial`, lets the reader put them in front of
        the rest of the record in its own buffer and feed the whole record,
        so that the rest is never copied (see :mod:`conduit._receive_buffer`).
        """
        return memoryview(self._buffer)[self._offset :]

    def discard_partial(self) -> None:
        """Forget the bytes of :meth:`partial`: the caller feeds them again, with the rest."""
        self._buffer = b""
        self._offset = 0

    @property
    def missing(self) -> int:
        """Bytes still to come before the next record is whole; 0 when its length is unknown.

        The reader waits for that many (see :mod:`conduit._receive_buffer`):
        a bulk record then arrives in one read, not in a read per TCP segment burst.
        """
        buffered = len(self._buffer) - self._offset
        if buffered < LENGTH.size:
            return 0
        sealed_size: int = LENGTH.unpack_from(self._buffer, self._offset)[0]
        return max(0, LENGTH.size + min(sealed_size, self._max_sealed) - buffered)

    def next_record(self) -> bytes | memoryview | None:
        """Return the next opened plaintext, or None if a whole record is not here yet.

        A large one is a view of a reused buffer: it stays valid as long as it
        (or a view of it) is referenced.
        """
        buffer = self._buffer
        start = self._offset
        if len(buffer) - start < LENGTH.size:
            self._compact()
            return None
        (sealed_size,) = LENGTH.unpack_from(buffer, start)
        # Checked before waiting for (and so before buffering) the body.
        if sealed_size > self._max_sealed or sealed_size < TAG_SIZE:
            raise RemoteProtocolError(
                f"record of {sealed_size} bytes is outside the limit of {self._max_sealed}"
            )
        end = start + LENGTH.size + sealed_size
        if end > len(buffer):
            self._compact()
            return None
        if sealed_size <= _SLICED_MAX:
            # A call or a result: slicing copies a few hundred bytes, cheaper
            # than a view made, sliced and released around the decryption.
            try:
                opened = self._aead.decrypt(
                    _nonce(self._counter),
                    buffer[start + LENGTH.size : end],
                    buffer[start : start + 4],
                )
            except InvalidTag:
                raise IntegrityError(_TAMPERED) from None
            self._counter += 1
            self._offset = end
            return opened
        view = memoryview(buffer)
        plaintext: bytes | memoryview
        try:
            if sealed_size >= MAPPED_MIN and REUSABLE:
                plaintext = self._mapped_buffer()[: sealed_size - TAG_SIZE]
                self._aead.decrypt_into(
                    _nonce(self._counter),
                    view[start + LENGTH.size : end],
                    bytes(buffer[start : start + 4]),
                    plaintext,
                )
            else:
                plaintext = self._aead.decrypt(
                    _nonce(self._counter),
                    view[start + LENGTH.size : end],
                    bytes(buffer[start : start + 4]),
                )
        except InvalidTag:
            raise IntegrityError(_TAMPERED) from None
        finally:
            view.release()
        self._counter += 1
        self._offset = end
        return plaintext

    def release_buffers(self) -> None:
        """Drop every buffer, the bytes not yet opened too: the connection is
        over. Kept mappings are unmapped with their last view."""
        self._mapped = []
        self._buffer = b""
        self._offset = 0

    def release_idle_buffers(self) -> None:
        """Unmap the kept buffers not handed out since the previous call (and no
        longer referenced): an idle connection holds no bulk megabytes, and
        one whose large records come one at a time keeps one buffer, not as
        many as a burst once needed.

        Exact per buffer without looking at each on every record: buffers are
        handed out from the front (the first one free), so one handed out
        since the last call lies within the reach recorded, and one past it
        was not used since.
        """
        reach = self._mapped_reach
        if reach < len(self._mapped):
            # Dropped ones are unmapped with their last view.
            self._mapped = self._mapped[:reach] + [
                buffer for buffer in self._mapped[reach:] if has_views(buffer)
            ]
        self._mapped_reach = 0

    def _mapped_buffer(self) -> memoryview:
        """A kept mapping no view refers to any more, or a new one."""
        mapped = self._mapped
        for index, buffer in enumerate(mapped):
            if not has_views(buffer):
                if index >= self._mapped_reach:
                    self._mapped_reach = index + 1
                return memoryview(buffer)
        buffer = anonymous_buffer(self._max_sealed)
        if len(mapped) < MAPPED_KEEP:
            mapped.append(buffer)
            self._mapped_reach = len(mapped)
        # Not kept: unmapped when its last view goes.
        return memoryview(buffer)

    def _compact(self) -> None:
        buffer = self._buffer
        if type(buffer) is memoryview:
            # A read we were lent (see feed): keep a copy of the part of a record
            # in it, as its memory is reused by the next read.
            self._buffer = bytearray(buffer[self._offset :]) if self._offset < len(buffer) else b""
            self._offset = 0
            return
        if self._offset:
            if self._offset == len(self._buffer):
                self._buffer = b""  # all opened: the next chunk becomes the buffer
            elif type(self._buffer) is bytearray:
                del self._buffer[: self._offset]
            else:
                self._buffer = bytearray(memoryview(self._buffer)[self._offset :])
            self._offset = 0
