"""A SHA-256 whose running state can be saved and restored on another node.

Resuming an upload on a different node needs the SHA-256 of the bytes already
stored, to verify the whole file at the end and to answer the sender's
``prefix_sha256``. The stored bytes are parts of an in-progress S3 multipart
upload, which S3 cannot read back before completion, and a hash of part hashes
is not the file's SHA-256 (which the guide promises as ``checksum``). So the
writer saves the hash *state* beside the upload after every part.

``hashlib`` cannot export its state, so this wraps OpenSSL's ``SHA256_CTX``
(``SHA256_Init/Update/Final``, the libcrypto ``_hashlib`` already loads)
through ctypes. The structure is part of OpenSSL's public ABI (``sha.h``,
unchanged since 0.9.8); the functions are deprecated in 3.x in favour of EVP,
which hides the state, but are still exported. Saving is a ``memcpy`` of 112
bytes; hashing runs at native speed and ctypes releases the GIL during it.

Only states at a 64-byte block boundary are saved (``num == 0``), which part
sizes (multiples of 1 MiB) always are, so a saved state is just the eight
chaining words and the bit length.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import struct
from typing import Final

__all__ = ["ResumableSha256", "Sha256Unavailable"]

_STATE: Final = struct.Struct("!8IQ")
_BLOCK: Final = 64


class Sha256Unavailable(RuntimeError):
    """libcrypto with the ``SHA256_*`` functions could not be loaded."""


class _Context(ctypes.Structure):
    # typedef struct SHA256state_st { SHA_LONG h[8]; SHA_LONG Nl, Nh;
    #   SHA_LONG data[16]; unsigned int num, md_len; } SHA256_CTX;
    _fields_ = (
        ("h", ctypes.c_uint32 * 8),
        ("Nl", ctypes.c_uint32),
        ("Nh", ctypes.c_uint32),
        ("data", ctypes.c_uint32 * 16),
        ("num", ctypes.c_uint),
        ("md_len", ctypes.c_uint),
    )


def _load() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("crypto")
    if name is None:
        return None
    try:
        library = ctypes.CDLL(name)
        for function in ("SHA256_Init", "SHA256_Update", "SHA256_Final"):
            getattr(library, function)
    except (OSError, AttributeError):
        return None
    library.SHA256_Init.argtypes = [ctypes.POINTER(_Context)]
    library.SHA256_Update.argtypes = [ctypes.POINTER(_Context), ctypes.c_void_p, ctypes.c_size_t]
    library.SHA256_Final.argtypes = [ctypes.c_char_p, ctypes.POINTER(_Context)]
    return library


_LIBRARY: Final = _load()


def _library() -> ctypes.CDLL:
    if _LIBRARY is None:
        raise Sha256Unavailable("libcrypto's SHA256_* functions are not available")
    return _LIBRARY


class ResumableSha256:
    """SHA-256 with :meth:`save` / :meth:`restore` of its state at block boundaries."""

    def __init__(self) -> None:
        """Start an empty hash."""
        self._context = _Context()
        _library().SHA256_Init(ctypes.byref(self._context))
        self._length = 0

    @property
    def length(self) -> int:
        """Bytes hashed so far."""
        return self._length

    def update(self, data: bytes | bytearray | memoryview) -> None:
        """Add ``data``."""
        view = memoryview(data).cast("B")
        size = len(view)
        if not size:
            return
        context = ctypes.byref(self._context)
        if isinstance(data, bytes):
            _library().SHA256_Update(context, data, size)  # passed by address, no copy
        elif view.readonly:
            _library().SHA256_Update(context, view.tobytes(), size)
        else:
            array = (ctypes.c_char * size).from_buffer(view)
            _library().SHA256_Update(context, array, size)
        self._length += size

    def copy(self) -> ResumableSha256:
        """An independent hash with the same state."""
        twin = ResumableSha256.__new__(ResumableSha256)
        twin._context = _Context()
        ctypes.pointer(twin._context)[0] = self._context
        twin._length = self._length
        return twin

    def digest(self) -> bytes:
        """The digest of everything added so far (the hash stays usable)."""
        out = ctypes.create_string_buffer(32)
        scratch = self.copy()
        _library().SHA256_Final(out, ctypes.byref(scratch._context))
        return out.raw

    def hexdigest(self) -> str:
        """:meth:`digest` as lowercase hex."""
        return self.digest().hex()

    def save(self) -> bytes:
        """The state as 40 bytes; only at a 64-byte boundary (else ``ValueError``)."""
        if self._length % _BLOCK:
            raise ValueError("SHA-256 state can only be saved at a 64-byte boundary")
        return _STATE.pack(*self._context.h, self._length)

    @classmethod
    def restore(cls, state: bytes) -> ResumableSha256:
        """The hash that :meth:`save` described."""
        if len(state) != _STATE.size:
            raise ValueError(f"a saved SHA-256 state is {_STATE.size} bytes, got {len(state)}")
        *words, length = _STATE.unpack(state)
        if length % _BLOCK:
            raise ValueError("a saved SHA-256 state must be at a 64-byte boundary")
        hasher = cls()
        for index, word in enumerate(words):
            hasher._context.h[index] = word
        bits = length * 8
        hasher._context.Nl = bits & 0xFFFFFFFF
        hasher._context.Nh = bits >> 32
        hasher._length = length
        return hasher
