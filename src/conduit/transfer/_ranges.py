"""Ranged downloads: which bytes, and what the local file is called.

``receive_from_server(client, name, offset=..., length=...)`` writes exactly
bytes ``offset .. offset+length`` of the server's file into its own local file,
``NAME.range-OFFSET-LENGTH`` next to where ``NAME`` would go, so a part never
passes for the whole file. The server streams only that slice; the trailer's
size and SHA-256 are the slice's, verified by the client before the file is
published, and the result's ``checksum`` is that SHA-256 of the range. An
interrupted ranged download resumes like any other.
"""

from __future__ import annotations

from ..errors import TransferError
from ._names import fit_segment, safe_relative_name

#: ``file_download``'s ``range_length`` when no range is asked for (with offset 0).
WHOLE_FILE = -1


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def resolve_range(size: int, offset: int, length: int | None) -> tuple[int, int]:
    """``(offset, length)`` within a file of ``size`` bytes, or ``"invalid_range"``.

    ``length=None`` means to the end; a length that runs past the end is
    clipped to it (as HTTP does); an offset past the end is refused.
    """
    if not _is_count(offset) or (length is not None and not _is_count(length)):
        raise TransferError(f"invalid range: offset {offset!r}, length {length!r}", "invalid_range")
    if offset > size:
        raise TransferError(
            f"range starts at {offset}, past the end of the {size}-byte file", "invalid_range"
        )
    available = size - offset
    return offset, available if length is None else min(length, available)


def range_name(name: str, offset: int, length: int) -> str:
    """The local name of bytes ``offset .. offset+length`` of ``name`` (a safe
    name): ``NAME.range-OFF-LEN``, the basename shortened as a partial's is
    when that would be too long for a file name (it was refused, ``unsafe_path``)."""
    directories, _, basename = name.rpartition("/")
    local = fit_segment("", basename, f".range-{offset}-{length}")
    return safe_relative_name(f"{directories}/{local}" if directories else local)
