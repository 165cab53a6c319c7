"""What :meth:`FileTransferHandler.list_files` returns: a list that says whether it is complete."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["FileListing"]


class FileListing(list[dict[str, Any]]):
    """The server's files, ``[{"name", "size", "modified"}, ...]``, and whether it left some out.

    A plain ``list`` in every other way (it compares equal to a list with the
    same entries, iterates, sorts and slices like one), so code written for a
    list keeps working. A server lists at most its ``max_listed`` files
    (10,000 by default) in one answer; :attr:`truncated` is True when it had
    more, so a caller can tell "these are all the files" from "these are the
    first files". A slice or a copy made with ``list(...)`` is a plain list and
    loses the flag.
    """

    #: True when the server cut the listing at its ``max_listed``: more files exist.
    truncated: bool

    def __init__(self, files: Iterable[dict[str, Any]] = (), *, truncated: bool = False) -> None:
        super().__init__(files)
        self.truncated = truncated
