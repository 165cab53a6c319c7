"""A shared corpus of file names for the storage and network transfer tests.

``HOSTILE_NAMES``: names a peer might send to escape, or misuse, the storage
directory. :func:`conduit.transfer._names.safe_relative_name` must refuse every
one of them with ``UnsafePathError``, and so must every operation that takes a
name from the network (upload, download, push, list).

``SAFE_NAMES``: odd but legitimate names. Each is already in normal form, so
it is accepted *unchanged*: uploading it and listing the directory shows the
same name, and downloading by that name returns the bytes.

``NORMALISED_NAMES``: accepted names that are reduced to a different, canonical
form (redundant ``./`` and ``//`` dropped, NFD composed to NFC).

Import with ``from hostile_names import HOSTILE_NAMES, SAFE_NAMES`` (pytest puts
``tests/`` on ``sys.path``).
"""

from __future__ import annotations

PARTIAL_PREFIX = ".conduit-partial-"

HOSTILE_NAMES: list[str] = [
    # Empty, current and parent directory.
    "",
    " ",
    ".",
    "..",
    "./",
    "...",
    # Traversal.
    "../x",
    "../../etc/passwd",
    "a/../../b",
    "a/./../..",
    "a/..",
    "a/../b",
    "reports/../../../root/.ssh/authorized_keys",
    "..%2f",
    "..%2f..%2fetc%2fpasswd",
    # Absolute paths and UNC shares.
    "/etc/passwd",
    "/",
    "//server/share/x",
    "\\\\server\\share",
    "\\\\?\\C:\\Windows",
    # Backslash traversal and drive letters.
    "..\\..\\x",
    "a\\b",
    "C:\\Windows",
    "C:foo",
    "c:\\x",
    "C:/Windows/win.ini",
    "dir/D:evil",
    "file.txt::$DATA",
    "a:stream",
    # Windows device names, any case, any extension, any segment.
    "nul",
    "NUL",
    "CON.txt",
    "con.tar.gz",
    "aux",
    "prn.log",
    "COM1",
    "lpt9.txt",
    "CON .txt",
    "CONIN$",
    "reports/nul/a.txt",
    "COM\u00b9.txt",
    # Control characters and invisible reordering.
    "x\x00y",
    "x\ny",
    "tab\tname",
    "\x7f",
    "bell\x07",
    "c1\x85control",
    "evil\u202etxt.exe",
    "line\u2028break",
    # Unicode look-alikes of dots and slashes.
    "\u2025",
    "\u2025/x",
    "\u2024",
    "\uff0e\uff0e/etc/passwd",
    "a\uff0fb",
    "a\u2215b",
    "a\u2044b",
    "\uff3cwindows",
    # Hidden and reserved names.
    ".hidden",
    "dir/.hidden",
    ".ssh/authorized_keys",
    ".git/config",
    f"{PARTIAL_PREFIX}abc-x.txt",
    f"dir/{PARTIAL_PREFIX}abc-x.txt",
    # Trailing dot or space; directories.
    "trailing.",
    "trailing ",
    "dir./x",
    "dir/",
    "dir/.",
    # Not valid Unicode.
    "\ud800",
    "a\udcff.txt",
    # Too long.
    "x" * 256,
    "\u00e9" * 128,
    "a/" * 2049 + "b",
    "/".join(["d"] * 65),
]

SAFE_NAMES: list[str] = [
    "r\u00e9sum\u00e9 2024.pdf",
    "\u0434\u0430\u043d\u043d\u044b\u0435.bin",
    "\u65e5\u672c\u8a9e.txt",
    "reports/2024/a.pdf",
    "a..b.txt",
    "%2e%2e%2fetc%2fpasswd",
    "CONSOLE.log",
    "com10.txt",
    "nullable.txt",
    "lpt.txt",
    "file with  spaces.txt",
    " leading space.txt",
    "party \U0001f389.txt",
    "\ufb01le.txt",
    "~user",
    "-rf",
    "$HOME.txt",
    "#hash%percent&amp;[x]{y}.txt",
    "archive.tar.gz",
    "noext",
    "x" * 255,
    "\u540d" * 85,
    "/".join(["d"] * 20) + "/f.txt",
]

NORMALISED_NAMES: dict[str, str] = {
    "./a.txt": "a.txt",
    "a//b.txt": "a/b.txt",
    "a/./b.txt": "a/b.txt",
    "./reports//2024/./a.pdf": "reports/2024/a.pdf",
    "re\u0301sume\u0301.pdf": "r\u00e9sum\u00e9.pdf",
    "\u2126hm.txt": "\u03a9hm.txt",
}
