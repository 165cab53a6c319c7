"""Checking what a peer answers to our transfer calls, before acting on it.

The peer of ``send_to_client`` (a client) and of ``receive_from_server`` (a
server) is not trusted to answer sensibly: a negative resume offset, a stream id
of the wrong type or a missing key must end that one transfer with
``{"success": False, "code": "bad_answer"}``, not raise out of the caller (an
application pushing to many clients in one nursery would lose them all) and
not make us act on it (a negative offset once made us send the whole file
before failing).
"""

from __future__ import annotations

from typing import Any

import attrs

from ..errors import TransferError, UnsafePathError
from ..protocol import is_valid_stream_id
from ._names import safe_relative_name

#: The failure code of an answer that does not make sense.
BAD_ANSWER = "bad_answer"
# A SHA-256 in hex is 64 characters; anything much longer is not a hash.
_MAX_HASH_TEXT = 128


class BadAnswer(TransferError):
    """The peer answered a transfer call with something malformed."""

    def __init__(self, message: str) -> None:
        super().__init__(f"the peer's answer is malformed: {message}", BAD_ANSWER)


def _mapping(answer: Any, what: str) -> dict[str, Any]:
    if not isinstance(answer, dict):
        raise BadAnswer(f"{what} is a {type(answer).__name__}, not a map")
    return answer


def _integer(answer: dict[str, Any], key: str, low: int, high: int | None) -> int:
    value = answer.get(key)
    # bool is an int subclass; True is not an offset.
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadAnswer(f"{key!r} is {type(value).__name__}, not an integer")
    if value < low or (high is not None and value > high):
        bound = f"{low}..{high}" if high is not None else f">= {low}"
        raise BadAnswer(f"{key!r} is {value}, outside {bound}")
    return value


def _text(answer: dict[str, Any], key: str, limit: int) -> str:
    value = answer.get(key)
    if not isinstance(value, str) or len(value) > limit:
        raise BadAnswer(f"{key!r} is not a string of at most {limit} characters")
    return value


@attrs.frozen
class BeginAnswer:
    """A receiver's answer to ``file_upload_begin`` / ``file_push_begin``."""

    offset: int
    stream_id: int
    prefix_sha256: str


def begin_answer(answer: Any, size: int) -> BeginAnswer:
    """Check a begin answer: a valid stream id and a resume offset within the file."""
    body = _mapping(answer, "the begin answer")
    stream_id = _integer(body, "stream_id", 0, None)
    if not is_valid_stream_id(stream_id):
        raise BadAnswer(f"'stream_id' {stream_id} is not a valid stream id")
    offset = _integer(body, "offset", 0, size)
    return BeginAnswer(offset, stream_id, _text(body, "prefix_sha256", _MAX_HASH_TEXT))


def finish_answer(answer: Any, size: int) -> dict[str, Any]:
    """Check a receiver's verdict (``*_finish`` or ``*_small``): where it stored what."""
    body = _mapping(answer, "the verdict")
    _text(body, "path", 64 * 1024)
    _text(body, "filename", 64 * 1024)
    _text(body, "checksum", _MAX_HASH_TEXT)
    if _integer(body, "size", 0, None) != size:
        raise BadAnswer(f"'size' is {body['size']}, but {size} bytes were sent")
    return dict(body)


@attrs.frozen
class StatAnswer:
    """A server's answer to ``file_stat``."""

    size: int
    modified_ns: int


def stat_answer(answer: Any) -> StatAnswer:
    """Check a ``file_stat`` answer: a size and an mtime, both integers."""
    body = _mapping(answer, "the file_stat answer")
    return StatAnswer(
        _integer(body, "size", 0, None), _integer(body, "modified_ns", -(2**63), 2**63 - 1)
    )


@attrs.frozen
class ListedPage:
    """A checked ``file_list`` answer."""

    files: list[dict[str, Any]]
    #: The server had more files than it answered.
    truncated: bool
    #: Where the next page starts (``after=``): one of this page's names (its
    #: last in the storage's order); None when the listing is whole, or cut by
    #: a server that does not page (one of before 2026-12-07, or of that day
    #: with S3 storage).
    next: str | None


def listing_arguments(prefix: str | None, after: str | None) -> dict[str, str]:
    """The arguments of a ``file_list`` call: only those given (a server that does
    not page refuses an ``after`` it does not know, and is never sent one: it
    gives no ``next``)."""
    arguments = {"prefix": prefix, "after": after}
    return {key: value for key, value in arguments.items() if value is not None}


def listing_answer(answer: Any, prefix: str | None) -> ListedPage:
    """Check a ``file_list`` answer: its files, whether the server cut them short,
    and where its next page starts.

    A map whose ``files`` is a list of maps, each with a ``name`` that is
    already a safe relative name (``_names.safe_relative_name``: no control
    character, nothing outside the root),
    under the directory ``prefix`` when one was asked for, a ``size`` (an
    integer, 0 or more) and a ``modified`` time (a number). Anything else
    raises :class:`BadAnswer`: a caller building local paths from the names
    (``conduit get``) must never find one outside what it asked for. The
    names must come in name order, each once, and a ``next`` must be one of
    them, of a cut listing. (That no page names a file an earlier one did is
    checked by whoever gathers them: ``_listing.GatheredListing``. The pages
    follow the storage's order, which is not always the names': a page may
    hold names before the ``after`` it was asked for.)
    """
    body = _mapping(answer, "the file_list answer")
    files = body.get("files")
    if not isinstance(files, list):
        raise BadAnswer(f"'files' is {type(files).__name__}, not a list")
    under = ""
    if prefix is not None:
        try:
            under = safe_relative_name(prefix) + "/"
        except UnsafePathError:
            raise BadAnswer(f"it lists files under {prefix!r}, which is no directory") from None
    previous: str | None = None
    for item in files:
        entry = _mapping(item, "a listed file")
        name = entry.get("name")
        try:
            safe = isinstance(name, str) and safe_relative_name(name) == name
        except UnsafePathError:
            safe = False
        if not safe or not str(name).startswith(under):
            where = f"a file under {prefix!r}" if under else "a safe relative name"
            raise BadAnswer(f"the server listed {name!r}, not {where}")
        if previous is not None and str(name) <= previous:
            raise BadAnswer(f"the server listed {name!r} after {previous!r}: not in name order")
        previous = str(name)
        _integer(entry, "size", 0, None)
        modified = entry.get("modified")
        if not isinstance(modified, int | float) or isinstance(modified, bool):
            raise BadAnswer(f"{name!r}'s 'modified' is {type(modified).__name__}, not a number")
    truncated = body.get("truncated") is True
    following = body.get("next")
    if following is not None and (
        not truncated or not isinstance(following, str) or not _names_one_of(following, files)
    ):
        raise BadAnswer(f"'next' is {following!r}, not a name of a cut listing")
    return ListedPage(files, truncated, following)


def _names_one_of(name: str, files: list[dict[str, Any]]) -> bool:
    """Whether one of the (checked) listed ``files`` is ``name``; the last, from
    a storage that lists by name, is looked at first."""
    return any(entry["name"] == name for entry in reversed(files))


def outcome_answer(answer: Any, what: str) -> dict[str, Any]:
    """Check the answer to a call that reports its outcome as a result dict
    (``file_delete``, ``file_rename``): a map whose ``success`` is a bool, whose
    ``error`` and ``code`` are strings when it failed, and whose names
    (``path``, ``old``), when there, are strings: what the result's type says."""
    body = _mapping(answer, what)
    success = body.get("success")
    if not isinstance(success, bool):
        raise BadAnswer(f"{what}'s 'success' is {type(success).__name__}, not a bool")
    if not success:
        _text(body, "error", 64 * 1024)
        _text(body, "code", 256)
    for name in ("path", "old"):
        if name in body:
            _text(body, name, 64 * 1024)
    return dict(body)


def download_offset(answer: Any, asked: int) -> int:
    """Check a ``file_download`` answer: it resumes where we asked, or from zero."""
    offset = _integer(_mapping(answer, "the file_download answer"), "offset", 0, asked)
    if offset not in (0, asked):
        raise BadAnswer(f"'offset' is {offset}; only 0 or {asked} were possible")
    return offset


@attrs.frozen
class BatchFile:
    """A file a ``file_download_batch`` answer carries whole (its hash not checked yet)."""

    name: str
    data: bytes
    sha256: str


@attrs.frozen
class SameFile:
    """A file a ``file_download_batch`` answer says the caller already has (same SHA-256)."""

    name: str
    size: int
    sha256: str


def failed_entry(answer: dict[str, Any]) -> dict[str, Any]:
    """A peer's ``{"success": False, "error", "code"}`` for one file, both texts bounded."""
    error, code = answer.get("error"), answer.get("code")
    if not isinstance(error, str) or not isinstance(code, str):
        raise BadAnswer("a failed file's entry lacks error and code")
    return {"success": False, "error": error[:4096], "code": code[:64]}


def _batch_entry(
    entry: Any, name: str, limit: int, have: tuple[str, int] | None
) -> BatchFile | SameFile | dict[str, Any] | None:
    body = _mapping(entry, "a batch entry")
    if body.get("name") != name:
        shown = repr(body.get("name"))[:200]  # the peer's text: bounded in our result
        raise BadAnswer(f"an entry names {shown} where {name!r} was asked")
    if body.get("success") is False:
        return failed_entry(body)
    if body.get("by_itself") is True:
        return None
    size = _integer(body, "size", 0, limit)
    if body.get("unchanged") is True:
        if have is None or (body.get("sha256"), size) != have:
            raise BadAnswer(f"{name!r} is said unchanged, but not as the copy we have")
        return SameFile(name, size, have[0])
    data = body.get("data")
    if not isinstance(data, bytes) or len(data) != size:
        raise BadAnswer(f"the data of {name!r} is not {size} bytes")
    return BatchFile(name, data, _text(body, "sha256", _MAX_HASH_TEXT))


def batch_download_answer(
    answer: Any, asked: list[tuple[str, tuple[str, int] | None]], limit: int
) -> list[BatchFile | SameFile | dict[str, Any] | None]:
    """Check a ``file_download_batch`` answer: one entry per name asked, in order
    (``asked``: each name with the SHA-256 and size of our copy, or None).

    Each entry becomes the file (at most ``limit`` bytes), a :class:`SameFile`
    (only our copy's digest and size), that file's failure, or None: download
    it by itself. An answer that does not list the names asked raises
    :class:`BadAnswer`; one malformed entry is that file's ``bad_answer``
    failure.
    """
    listed = _mapping(answer, "the batch answer").get("files")
    if not isinstance(listed, list) or len(listed) != len(asked):
        raise BadAnswer("a batch answer must list one entry per name asked")
    entries: list[BatchFile | SameFile | dict[str, Any] | None] = []
    for entry, (name, have) in zip(listed, asked, strict=True):
        try:
            entries.append(_batch_entry(entry, name, limit, have))
        except BadAnswer as exc:
            entries.append({"success": False, "error": exc.message, "code": exc.code})
    return entries


__all__ = [
    "BAD_ANSWER",
    "BadAnswer",
    "BatchFile",
    "BeginAnswer",
    "SameFile",
    "StatAnswer",
    "batch_download_answer",
    "begin_answer",
    "download_offset",
    "failed_entry",
    "finish_answer",
    "stat_answer",
]
