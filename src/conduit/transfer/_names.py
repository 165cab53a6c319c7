"""Reduce file names that arrive from the network to safe relative POSIX paths.

Everything here is pure string logic: no file system access. :mod:`._storage`
resolves the names this module produces, segment by segment, under a directory
file descriptor, so that a name refused here can never reach the disk.

The policy of :func:`safe_relative_name`, each rule with its reason:

* The result is a relative POSIX path: segments joined by ``/``, subdirectories
  allowed (``reports/2024/a.pdf``). Empty segments (``a//b``) and ``.``
  segments (``./a``, ``a/./b``) are redundant and are dropped; a trailing ``/``
  or ``/.`` would name a directory, not a file, and is refused.
* Refused outright: the empty name, absolute paths, any ``..`` segment (even one
  that would "cancel out", such as ``a/../b``: there is no legitimate reason to
  send one and resolving it is where traversal bugs live), backslashes (a path
  separator on Windows, so ``a\\b`` would mean different files to different
  peers), and ``:`` anywhere (drive letters ``C:foo``, and NTFS alternate data
  streams ``file:stream``; a Windows peer would join ``dir/C:foo`` as a
  drive-relative path).
* Control characters (Unicode category ``Cc``: NUL, C0, DEL, C1), the Unicode
  line/paragraph separators, and bidirectional-override characters are refused:
  they break logs and terminals or make ``exe.txt`` display as ``txt.exe``.
* Lone surrogates (undecodable bytes smuggled through ``surrogateescape``) are
  refused: the name must be real Unicode text so it can be encoded as UTF-8.
* Unicode is normalised to NFC, so a name typed on macOS (which produces NFD) and
  the same name typed elsewhere refer to the same file. NFC never changes the
  meaning of a name, only its encoding.
* Every segment is also checked in its NFKC *compatibility* form: a segment that
  folds to ``.`` or ``..``, to something containing a separator, to a hidden
  name or to a device name is refused (``\\u2025`` "two dot leader" folds to
  ``..``, full-width ``\\uff0f`` to ``/``, ``COM\\u00b9`` to ``COM1``). Such
  look-alikes are harmless to POSIX but dangerous to any peer or tool that
  applies compatibility folding ("best fit" code page conversion on Windows).
  Look-alike slashes without a compatibility mapping (``\\u2215``, ``\\u2044``)
  are refused for the same reason: a name must not appear to contain a directory
  it does not.
* Hidden segments (starting with ``.``) are refused. This reserves the hidden
  namespace for the partial files conduit writes while receiving
  (:data:`PARTIAL_PREFIX`), keeps peers away from ``.ssh``, ``.git``,
  ``.htaccess`` and friends, and matches the listing, which never shows hidden
  entries: every name accepted here can be listed and downloaded back.
* Segments ending in ``.`` or a space are refused (Windows strips them, so
  ``a.`` and ``a`` would alias), and so are Windows device names in any segment,
  case-insensitively and with any extension (``nul``, ``CON.txt``,
  ``com1.tar.gz``).
* Size limits: a segment is at most :data:`MAX_SEGMENT_BYTES` bytes of UTF-8, the
  whole name at most :data:`MAX_NAME_BYTES`, and at most :data:`MAX_DEPTH`
  segments deep (so one name cannot make the receiver create thousands of nested
  directories).
* Percent-encoding is never decoded: ``%2e%2e%2f`` is an odd but harmless
  literal name. Characters that are merely *invalid* on Windows but harmless on
  POSIX (``?``, ``*``, ``|``, ``<``, ``>``, ``"``) are allowed: they cannot
  escape the root, and refusing them would refuse legitimate POSIX files.
"""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
from collections.abc import Callable, Iterator
from typing import Final

from ..errors import UnsafePathError

__all__ = [
    "DOWNLOAD_ID_PREFIX",
    "LINEAR_COLLISION_ATTEMPTS",
    "MAX_COLLISION_ATTEMPTS",
    "MAX_DEPTH",
    "MAX_NAME_BYTES",
    "MAX_SEGMENT_BYTES",
    "PARTIAL_PREFIX",
    "check_transfer_id",
    "collision_candidates",
    "fit_segment",
    "is_partial_name",
    "is_text",
    "name_bytes",
    "partial_basename",
    "safe_relative_name",
    "split_name",
]

#: Prefix of the hidden files conduit receives into. Hidden, so no accepted name
#: can collide with it and no listing shows it.
PARTIAL_PREFIX: Final = ".conduit-partial-"
#: What a download's partial id starts with. Upload and push partials take
#: ids of 32 hex digits (``._space.owned_transfer_id``), so a download's
#: (``"dl_"`` and 32 hex digits) is never taken for one of theirs when a
#: directory both receives pushes or uploads and downloads.
DOWNLOAD_ID_PREFIX: Final = "dl_"
#: Longest segment, in bytes of UTF-8 (the usual ``NAME_MAX``).
MAX_SEGMENT_BYTES: Final = 255
#: Longest whole name, in bytes of UTF-8 (the usual ``PATH_MAX``).
MAX_NAME_BYTES: Final = 4096
#: Most segments (directories plus file name) in one name.
MAX_DEPTH: Final = 64
#: How many ``name (n).ext`` alternatives a non-overwriting publish tries.
MAX_COLLISION_ATTEMPTS: Final = 10_000
#: Alternatives tried one by one before the search for a free number jumps
#: ahead (see :func:`collision_candidates`).
LINEAR_COLLISION_ATTEMPTS: Final = 16

_TRANSFER_ID: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")

_DEVICE_NAMES: Final = frozenset(
    {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"}
    | {f"COM{digit}" for digit in range(1, 10)}
    | {f"LPT{digit}" for digit in range(1, 10)}
)

# Invisible characters that reorder or break the displayed text.
_INVISIBLE_CONTROLS: Final = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u2028\u2029"
)

# Slash look-alikes that NFKC does not fold (the full-width ones it does).
_LOOKALIKE_SEPARATORS: Final = frozenset("\u2044\u2215\u2216\u29f8\u29f9")

# Accepted names remembered by safe_relative_name, and the longest remembered
# (in characters): at most ~1 MiB of names, whatever a peer sends.
_NAMES_REMEMBERED: Final = 512
_REMEMBERED_LENGTH: Final = 255

# Extensions kept whole when a collision suffix is inserted: "a (1).tar.gz".
_COMPOUND_EXTENSIONS: Final = (".tar.gz", ".tar.bz2", ".tar.xz", ".tar.zst")
# A longer "extension" is more likely part of the name than a real extension.
_MAX_EXTENSION_BYTES: Final = 32


def safe_relative_name(name: str) -> str:
    """Return ``name`` as a safe, normalised relative POSIX path, or raise.

    The rules are described in the module docstring. The result is idempotent
    (``safe_relative_name(result) == result``) and, joined to any directory,
    names something inside that directory.

    Raises:
        UnsafePathError: naming the problem, for any name that is not allowed
            (including a value that is not a ``str`` at all).
    """
    if type(name) is str and len(name) <= _REMEMBERED_LENGTH:
        # One small file's name is checked at each step of storing it (the
        # receiver, the budget, the partial, the publish, the directory sync):
        # the Unicode checks are its largest fixed cost, so accepted names are
        # remembered (a refused one raises, and is never remembered).
        return _checked_name(name)
    return _safe_relative_name(name)


@functools.lru_cache(maxsize=_NAMES_REMEMBERED)
def _checked_name(name: str) -> str:
    return _safe_relative_name(name)


def _safe_relative_name(name: str) -> str:
    text = _require_text(name)
    if not text:
        raise _unsafe(text, "the name is empty")
    # Cheap bound before any O(n) Unicode work: characters never outnumber bytes.
    if len(text) > MAX_NAME_BYTES:
        raise _unsafe(text, f"the name is longer than {MAX_NAME_BYTES} bytes")
    _require_encodable(text)
    normal = unicodedata.normalize("NFC", text)
    _check_characters(text, normal, allow_slash=True)
    segments = _split_segments(text, normal)
    for segment in segments:
        _check_segment(text, segment)
    result = "/".join(segments)
    if len(result.encode("utf-8")) > MAX_NAME_BYTES:
        raise _unsafe(text, f"the name is longer than {MAX_NAME_BYTES} bytes")
    return result


def split_name(safe_name: str) -> tuple[tuple[str, ...], str]:
    """Split a name returned by :func:`safe_relative_name` into (directories, file name)."""
    *directories, basename = safe_name.split("/")
    return tuple(directories), basename


def check_transfer_id(transfer_id: str) -> str:
    """Return ``transfer_id`` if it is 1-64 characters of ``[A-Za-z0-9_-]``, else raise.

    Transfer ids become part of partial file names, so they get a strict
    alphabet rather than the general name rules.

    Raises:
        UnsafePathError: if the id is malformed.
    """
    value = _require_text(transfer_id)
    if _TRANSFER_ID.fullmatch(value) is None:
        raise UnsafePathError(
            f"invalid transfer id {_show(value)}: expected 1-64 characters of [A-Za-z0-9_-]"
        )
    return value


def partial_basename(basename: str, transfer_id: str) -> str:
    """The hidden partial file name for ``basename`` received as ``transfer_id``.

    ``PARTIAL_PREFIX + transfer_id + "-" + basename``, readable in a directory
    listing. When that would exceed :data:`MAX_SEGMENT_BYTES`, the basename is
    shortened and a digest of the full basename appended, so the result stays
    unique and deterministic (a retry finds the same partial file).
    """
    return fit_segment(f"{PARTIAL_PREFIX}{transfer_id}-", basename)


def fit_segment(head: str, basename: str, tail: str = "") -> str:
    """``head + basename + tail``, within :data:`MAX_SEGMENT_BYTES`: when it
    would not be, the basename is shortened and a digest of the whole of it
    added (before ``tail``), so the result stays unique and deterministic."""
    full = head + basename + tail
    if len(full.encode("utf-8")) <= MAX_SEGMENT_BYTES:
        return full
    digest = "~" + hashlib.sha256(basename.encode("utf-8")).hexdigest()[:16]
    budget = MAX_SEGMENT_BYTES - len((head + digest + tail).encode("utf-8"))
    return head + _truncate_utf8(basename, budget) + digest + tail


def is_partial_name(basename: str) -> bool:
    """Whether a directory entry is one of conduit's partial files."""
    return basename.startswith(PARTIAL_PREFIX)


def collision_candidates(
    basename: str, is_taken: Callable[[str], bool] | None = None
) -> Iterator[str]:
    """Yield ``stem (1).ext``, ``stem (2).ext``, ... for a taken ``basename``.

    Numbers up to :data:`MAX_COLLISION_ATTEMPTS`. The number goes before the
    extension (before ``.tar.gz`` for the common compound ones), as browsers
    do, so the file still opens with the right program. The stem is shortened
    when needed to keep each candidate within :data:`MAX_SEGMENT_BYTES`; any
    candidate that would not itself be a safe, normalised name is skipped.

    ``is_taken(candidate)``: a cheap look (an ``lstat``, a ``HEAD``) at
    whether a name is in use. With it, only the first
    :data:`LINEAR_COLLISION_ATTEMPTS` numbers are yielded one by one; past
    them each next candidate is the first free number found by doubling the
    step, then halving it (a few dozen looks where 10,000 names are taken),
    and a candidate the caller then fails to take (taken in between) resumes
    the search one number further. Without it, a peer that had filled
    ``a (1).txt`` to ``a (9999).txt`` made every upload named ``a.txt`` try
    10,000 links, and a batch of 64 such files cost the server seconds. Where
    the taken numbers leave gaps, the number found is free but not always the
    lowest free one.
    """
    stem, extension = _split_extension(basename)

    def candidate(number: int) -> str | None:
        suffix = f" ({number}){extension}"
        budget = MAX_SEGMENT_BYTES - len(suffix.encode("utf-8"))
        name = _truncate_utf8(stem, budget) + suffix
        return name if _is_canonical_segment(name) else None

    def taken(number: int) -> bool:
        name = candidate(number)
        return name is None or (is_taken is not None and is_taken(name))

    number = 1
    while number <= MAX_COLLISION_ATTEMPTS:
        if is_taken is not None and number > LINEAR_COLLISION_ATTEMPTS:
            found = _first_free(number, taken)
            if found is None:
                return
            number = found
        name = candidate(number)
        if name is not None:
            yield name
        number += 1


def _first_free(start: int, taken: Callable[[int], bool]) -> int | None:
    """A number from ``start`` to :data:`MAX_COLLISION_ATTEMPTS` that is not ``taken``.

    The lowest one when the taken numbers from ``start`` on are contiguous
    (as the names this search produces are): a galloping search, about
    ``2 log2(n)`` looks for ``n`` taken numbers.
    """
    last = MAX_COLLISION_ATTEMPTS
    if not taken(start):
        return start
    low, step = start, 1  # low: known taken
    while True:
        high = min(low + step, last)
        if not taken(high):
            break
        if high == last:
            return None
        low, step = high, step * 2
    while high - low > 1:  # low taken, high free
        middle = (low + high) // 2
        if taken(middle):
            low = middle
        else:
            high = middle
    return high


# --------------------------------------------------------------------------- helpers


def _require_text(value: object) -> str:
    # Names come off the wire; a decoder bug must still end in UnsafePathError.
    if not isinstance(value, str):
        raise UnsafePathError(f"file name must be text, not {type(value).__name__}")
    return value


def is_text(name: str) -> bool:
    """Whether ``name`` is text: no lone surrogate (what Python makes of a
    local name's bytes that are not UTF-8), which no message can carry."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def name_bytes(name: str) -> int:
    """A name's UTF-8 bytes, as the wire and memory hold it; a lone surrogate
    counts as it would be sent, were it not refused."""
    return len(name.encode("utf-8", "surrogatepass"))


def _require_encodable(text: str) -> None:
    if not is_text(text):
        raise _unsafe(text, "it contains a lone surrogate (not valid Unicode)")


def _check_characters(original: str, text: str, *, allow_slash: bool) -> None:
    if "\\" in text:
        raise _unsafe(original, "it contains a backslash (a path separator on Windows)")
    if ":" in text:
        raise _unsafe(original, "it contains ':' (a drive letter or an NTFS stream on Windows)")
    if not allow_slash and "/" in text:
        raise _unsafe(original, "it contains a character that folds to '/'")
    if text.isascii() and text.isprintable():
        # The common name: no ASCII control (the only Cc in ASCII are the
        # unprintable ones) and no invisible control or slash look-alike (none
        # is ASCII). Skipping the loop saves a few µs per new name, paid on
        # both ends of every small upload.
        return
    for char in text:
        if unicodedata.category(char) == "Cc":
            raise _unsafe(original, f"it contains the control character U+{ord(char):04X}")
        if char in _INVISIBLE_CONTROLS:
            raise _unsafe(original, f"it contains the invisible control U+{ord(char):04X}")
        if char in _LOOKALIKE_SEPARATORS:
            raise _unsafe(original, f"it contains U+{ord(char):04X}, which looks like a slash")


def _split_segments(original: str, text: str) -> list[str]:
    if text.startswith("/"):
        raise _unsafe(original, "it is an absolute path")
    raw = text.split("/")
    if raw[-1] in ("", "."):
        raise _unsafe(original, "it names a directory, not a file")
    segments = [segment for segment in raw if segment not in ("", ".")]
    if len(segments) > MAX_DEPTH:
        raise _unsafe(original, f"it is nested deeper than {MAX_DEPTH} levels")
    return segments


def _check_segment(original: str, segment: str) -> None:
    problem = _segment_problem(segment)
    if problem is not None:
        raise _unsafe(original, f"segment {_show(segment)} {problem}")
    folded = unicodedata.normalize("NFKC", segment)
    if folded == segment:
        return
    _check_characters(original, folded, allow_slash=False)
    problem = _segment_problem(folded)
    if problem is not None:
        raise _unsafe(
            original, f"segment {_show(segment)} looks like {_show(folded)}, which {problem}"
        )


def _segment_problem(segment: str) -> str | None:
    """Why one segment (already free of separators and controls) is refused, if it is."""
    if segment == "..":
        return "is '..' (the parent directory)"
    if segment.startswith("."):
        return "is hidden (starts with '.'); hidden names are reserved"
    if segment.endswith((".", " ")):
        return "ends with a dot or a space (Windows would strip it)"
    if segment.split(".", 1)[0].rstrip(" ").upper() in _DEVICE_NAMES:
        return "is a reserved Windows device name"
    if len(segment.encode("utf-8")) > MAX_SEGMENT_BYTES:
        return f"is longer than {MAX_SEGMENT_BYTES} bytes"
    return None


def _is_canonical_segment(segment: str) -> bool:
    try:
        return safe_relative_name(segment) == segment
    except UnsafePathError:
        return False


def _split_extension(basename: str) -> tuple[str, str]:
    lowered = basename.lower()
    for compound in _COMPOUND_EXTENSIONS:
        if lowered.endswith(compound) and len(basename) > len(compound):
            return basename[: -len(compound)], basename[-len(compound) :]
    stem, dot, extension = basename.rpartition(".")
    if not dot or not stem or len(extension.encode("utf-8")) >= _MAX_EXTENSION_BYTES:
        return basename, ""
    return stem, dot + extension


def _truncate_utf8(text: str, max_bytes: int) -> str:
    # Cut on a byte budget without splitting a character.
    return text.encode("utf-8")[: max(max_bytes, 0)].decode("utf-8", errors="ignore")


def _show(text: str, limit: int = 60) -> str:
    # Hostile names can be huge; keep error messages one readable line.
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 4] + "...'"


def _unsafe(name: str, reason: str) -> UnsafePathError:
    return UnsafePathError(f"unsafe file name {_show(name)}: {reason}")
