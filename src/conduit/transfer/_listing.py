"""Listings in pages: what a server answers to ``file_list`` (:func:`listing_page`),
what :meth:`FileTransferHandler.list_files` returns (:class:`FileListing`, a
list that says whether it is complete), and what a side that goes page after
page keeps of them (:class:`GatheredListing`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from ._answers import BadAnswer
from ._names import name_bytes

__all__ = [
    "ENTRY_OVERHEAD",
    "LISTING_OVERHEAD",
    "MAX_GATHERED_FILES",
    "MAX_GATHERED_NAME_BYTES",
    "FileListing",
    "GatheredListing",
    "gathered_enough",
    "listed_name",
    "listing_page",
    "listing_within",
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
    first files" (:attr:`next` says where the rest starts). Its files are
    sorted by name; the pages follow the server storage's listing order,
    which is the names' but on an S3 store that lists otherwise (SeaweedFS:
    ``d/a/b`` before ``d/a-z.txt``), where a page may hold names before the
    last page's. A slice or a copy made with ``list(...)`` is a plain list
    and loses both.
    """

    #: True when the server cut the listing (its ``max_listed``, or the size
    #: of one message): more files exist.
    truncated: bool
    #: Of a cut listing, where the next page starts: pass it as ``list_files``'
    #: ``after``. One of its names (the last, but from such a store). None
    #: when the listing is whole, or the server does not page (one of before
    #: 2026-12-07, or of that day with S3 storage).
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


def _name_size(entry: dict[str, Any]) -> int:
    """The bytes of a listed file's name, as the wire and this side's memory hold it."""
    return name_bytes(str(entry["name"]))


def gathered_enough(count: int, names_size: int) -> bool:
    """Whether a listing gathered page after page (``count`` files, ``names_size``
    bytes of names) is as long as this side takes."""
    return count >= MAX_GATHERED_FILES or names_size >= MAX_GATHERED_NAME_BYTES


class GatheredListing:
    """The names the pages of one listing gave so far (a directory's download,
    ``conduit ls``), checked across pages.

    A page that names a file an earlier one did is refused (:class:`BadAnswer`):
    a server that started again where it had been would list without end, or
    have a file fetched twice. (Within a page, ``listing_answer`` checks the
    names; across pages they follow the storage's order, which only the server
    knows, so this is the check.) :attr:`full` once this side holds as much
    of a listing as it takes (:func:`gathered_enough`).
    """

    def __init__(self) -> None:
        self._names: set[str] = set()
        self._name_bytes = 0

    def add(self, files: Iterable[dict[str, Any]]) -> None:
        """Take a checked page's files; :class:`BadAnswer` if one came before."""
        for entry in files:
            name = str(entry["name"])
            if name in self._names:
                raise BadAnswer(f"the server listed {name!r} again, on a later page")
            self._names.add(name)
            self._name_bytes += _name_size(entry)

    @property
    def full(self) -> bool:
        """Whether the pages gathered are as many as this side takes."""
        return gathered_enough(len(self._names), self._name_bytes)


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


def listing_page(entries: Sequence[dict[str, Any]], max_listed: int, room: int) -> dict[str, Any]:
    """The ``file_list`` answer of ``entries``, the storage's first files in its
    listing order: those that fit (:func:`listing_within`), sorted by name; of
    a cut listing, ``truncated`` and ``next``, the last kept in the storage's
    order, where the next page goes on from (the last by name too, but on a
    store that lists otherwise, such as SeaweedFS: see ``Store.list_files``).
    """
    listed, truncated = listing_within(entries, max_listed, room)
    answer: dict[str, Any] = {"files": listed}
    if truncated:
        answer["truncated"] = True
        if listed:
            answer["next"] = listed[-1]["name"]
    listed.sort(key=listed_name)  # already so, but on such a store
    return answer


def listed_name(entry: dict[str, Any]) -> str:
    """A listed file's name (a key to sort a listing by)."""
    return str(entry["name"])
