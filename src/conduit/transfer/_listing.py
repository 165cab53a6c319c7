"""What :meth:`FileTransferHandler.list_files` returns: a list that says whether it is complete."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "ENTRY_OVERHEAD",
    "LISTING_OVERHEAD",
    "MAX_GATHERED_FILES",
    "MAX_GATHERED_NAME_BYTES",
    "FileListing",
    "gathered_enough",
    "listing_within",
    "name_bytes",
]

#: The most files a listing that goes page after page gathers (a directory's
#: download, ``conduit ls``), and the most bytes of their names: what this
#: side holds of it (about 0.5 KB per file, and its name two or three times
#: over) must stay bounded whatever a server lists (a review measured 7.9 KB
#: per file of a 4 KB name). Past either, the listing counts as cut.
MAX_GATHERED_FILES = 200_000
MAX_GATHERED_NAME_BYTES = 64 * 1024 * 1024

#: The most bytes a listed file's entry takes in the answer besides its name:
#: ``{"name": ..., "size": ..., "modified": ...}`` packed (a map header, the
#: three keys, a name's string header, a 64-bit integer and a float).
ENTRY_OVERHEAD = 48
#: Room kept in the answer's frame for the rest of it: the RESULT's envelope
#: (its call id, the ``files`` list's header, ``"truncated": True``, the
#: ``next`` key and its string's header; the name ``next`` holds is counted
#: apart).
LISTING_OVERHEAD = 1024


class FileListing(list[dict[str, Any]]):
    """The server's files, ``[{"name", "size", "modified"}, ...]``, and whether it left some out.

    A plain ``list`` in every other way (it compares equal to a list with the
    same entries, iterates, sorts and slices like one), so code written for a
    list keeps working. A server lists at most its ``max_listed`` files
    (10,000 by default), and no more than fit in one message of the caller's
    ``max_frame_size``, in one answer; :attr:`truncated` is True when it had
    more, so a caller can tell "these are all the files" from "these are the
    first files" (by name; :attr:`next` says where the rest starts). A slice
    or a copy made with ``list(...)`` is a plain list and loses both.
    """

    #: True when the server cut the listing (its ``max_listed``, or the size
    #: of one message): more files exist.
    truncated: bool
    #: Of a cut listing, where the next page starts: pass it as ``list_files``'
    #: ``after``. None when the listing is whole, or the server does not page.
    next: str | None

    def __init__(
        self,
        files: Iterable[dict[str, Any]] = (),
        *,
        truncated: bool = False,
        next: str | None = None,  # the protocol's name (it shadows a builtin here only)
    ) -> None:
        super().__init__(files)
        self.truncated = truncated
        self.next = next


def name_bytes(files: Iterable[dict[str, Any]]) -> int:
    """The bytes of the names of ``files`` (UTF-8), what :func:`gathered_enough` counts."""
    return sum(map(_name_size, files))


def _name_size(entry: dict[str, Any]) -> int:
    """The bytes of a listed file's name, as the wire and this side's memory hold it."""
    return len(str(entry["name"]).encode("utf-8", "surrogatepass"))


def gathered_enough(files: Sequence[dict[str, Any]] | int, name_bytes: int) -> bool:
    """Whether a listing gathered page after page (``files``, or their count, and
    ``name_bytes`` of names) is as long as this side takes."""
    count = files if isinstance(files, int) else len(files)
    return count >= MAX_GATHERED_FILES or name_bytes >= MAX_GATHERED_NAME_BYTES


def listing_within(
    entries: Sequence[dict[str, Any]], max_listed: int, room: int
) -> tuple[list[dict[str, Any]], bool]:
    """The first ``entries`` that a ``file_list`` answer may hold, and whether any were left out.

    At most ``max_listed`` of them, and no more than fit in ``room`` bytes (the
    peer's ``max_frame_size``, which the answer must fit in) with the last
    one's name again as the answer's ``next``: a listing of long names passed
    1 MiB well below 10,000 files, and the whole call then failed
    (``bad_result``) where it could have been cut (a review found a directory
    of 300 files with 4 KB names that could not be listed at all).
    """
    budget = room - LISTING_OVERHEAD
    used = 0
    kept: list[dict[str, Any]] = []
    for entry in entries[:max_listed]:
        name = _name_size(entry)
        if used + name + ENTRY_OVERHEAD + name > budget:  # with its name as "next"
            return kept, True
        used += name + ENTRY_OVERHEAD
        kept.append(entry)
    return kept, len(entries) > max_listed
