"""User accounts: per-user verifiers, never passwords, in one JSON file.

Each record holds what SPAKE2+ (RFC 9383) needs on the server side: a random
16-byte salt, the Argon2id cost, ``w0`` and ``L = w1*P`` (see
:mod:`conduit.protocol.pake`). ``w0`` and ``L`` come out of a memory-hard
stretch of the password with that salt and the username, so a stolen file
gives an attacker an offline dictionary attack at the Argon2id price per guess
per user, and two users with one password have unrelated records. Neither the
password nor any fast or unsalted hash of it is ever written.

The file::

    {"format": "conduit-accounts", "version": 1,
     "secret": "<base64: 32 random bytes for the fake records of unknown users>",
     "users": {"alice": {"salt": "<b64>", "opslimit": 3, "memlimit": 67108864,
                         "w0": "<b64>", "L": "<b64>", "w0M": "<b64>", "w0N": "<b64>",
                         "root": "alice",
                         "quota": null, "read_only": false}}}

Every change is a read-modify-write of the whole file under an advisory lock
(``<file>.lock``, so two ``conduit user add`` never lose each other's change),
written to a temporary file, fsynced, and moved over the old one with
``os.replace`` (mode 0600 when new; a rewrite keeps the file's owner, group
and group permissions, and never gives others any): a reader sees the old
file or the new one, never a mix. A missing file is an empty set of accounts.

A running server sees changes made by another process by calling
:meth:`Accounts.reload_if_changed` (one ``stat``) before each lookup.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import errno
import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
from nacl import bindings as sodium

from ._stored_errors import detached
from .protocol.handshake import account_verifier
from .protocol.pake import (
    DEFAULT_STRETCH,
    MIN_STRETCH,
    SALT_SIZE,
    StretchParams,
    Verifier,
    reduce_scalar,
)

if sys.platform != "win32":
    # POSIX advisory locks; on Windows changes are still atomic, only not serialised.
    import fcntl

FORMAT = "conduit-accounts"
VERSION = 1
MAX_USERNAME = 64
MAX_ROOT = 255
#: Fake records kept by :meth:`Accounts.lookup` (about 1 KiB each).
FAKE_CACHE = 1024
_USERNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]*\Z")
_SECRET_SIZE = 32
# The suffix of the temporary file a change is written to before its rename.
_TEMPORARY_SUFFIX = ".tmp"


class _NoFile:
    """What :data:`_NO_FILE` is: no malformed file seen (a missing file's
    signature is None, and a missing file is an empty set of accounts)."""


_NO_FILE = _NoFile()


@attrs.frozen(repr=False)
class AccountRecord:
    """One account as the server uses it (or a fake one for an unknown username)."""

    username: str
    salt: bytes
    stretch: StretchParams
    verifier: Verifier
    #: Relative to the server's storage directory.
    root: str
    #: Bytes the user may occupy (files, partials, reservations); None: no quota.
    quota: int | None
    read_only: bool

    @property
    def w0(self) -> bytes:
        """SPAKE2+ ``w0``."""
        return self.verifier.w0

    @property
    def L(self) -> bytes:
        """SPAKE2+ ``L = w1*P``."""
        return self.verifier.L

    def __repr__(self) -> str:
        return (
            f"AccountRecord(username={self.username!r}, root={self.root!r}, "
            f"quota={self.quota!r}, read_only={self.read_only!r}, <verifier hidden>)"
        )


def check_username(username: object) -> str:
    """``username`` if it is a valid account name, else ValueError.

    1 to 64 ASCII letters, digits and ``. _ @ + -``, starting with a letter or
    digit and without ``..``: it names the user's default root directory, so it
    must be a safe path component on every platform.
    """
    if not isinstance(username, str) or not 1 <= len(username) <= MAX_USERNAME:
        raise ValueError(f"a username is 1 to {MAX_USERNAME} characters")
    if not _USERNAME.match(username) or ".." in username:
        raise ValueError(
            f"invalid username {username!r}: use letters, digits and . _ @ + - "
            "(starting with a letter or digit, no '..')"
        )
    _as_stored_names_are(username, f"invalid username {username!r} (it names its root)")
    return username


def check_root(root: object) -> str:
    """``root`` if it is a safe relative directory (``/``-separated), else ValueError."""
    if not isinstance(root, str) or not 1 <= len(root) <= MAX_ROOT:
        raise ValueError(f"a root is a relative path of 1 to {MAX_ROOT} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in root):
        raise ValueError(f"root {root!r} contains a control character")
    if "\\" in root:
        raise ValueError(f"root {root!r}: use '/' as the separator")
    if root.startswith("/") or re.match(r"[A-Za-z]:", root):
        raise ValueError(f"root {root!r} must be relative to the storage directory")
    if any(part in ("", ".", "..") for part in root.split("/")):
        raise ValueError(f"root {root!r} must not contain empty, '.' or '..' components")
    if any(part.startswith(".") for part in root.split("/")):
        # Hidden names are conduit's own (partial files; an S3 store's
        # .conduit/ control keys, which its sweeper acts on): a user's files
        # must never live among them.
        raise ValueError(f"root {root!r} must not contain hidden components (starting with '.')")
    _as_stored_names_are(root, f"root {root!r}")
    return root


def _as_stored_names_are(path: str, what: str) -> None:
    """``ValueError`` unless ``path`` passes, unchanged, the checks of a stored file's name.

    A root is a directory of the store, and a username its default root: the
    same rules as every name a client may store hold for them (no reserved
    device names such as ``CON``, no trailing dot or space, no bidirectional
    overrides, Unicode in normal form; see :mod:`conduit.transfer._names`).
    Until 2026-12-07 roots and names were checked by rules of their own,
    which let these through (a review): on Windows ``a`` and ``a.`` are one
    directory, and ``user list`` printed a right-to-left override as it was.
    """
    # Imported here: the transfer package imports this module.
    from .errors import UnsafePathError
    from .transfer._names import safe_relative_name

    try:
        checked = safe_relative_name(path)
    except UnsafePathError as exc:
        raise ValueError(f"{what}: {exc}") from None
    if checked != path:
        raise ValueError(f"{what}: use its normal form, {checked!r}")


def _check_quota(quota: object) -> int | None:
    if quota is None:
        return None
    if type(quota) is not int or quota < 0:
        raise ValueError(f"quota must be a number of bytes >= 0 or None, not {quota!r}")
    return quota


def _check_password(password: object) -> str:
    if not isinstance(password, str) or not password:
        raise ValueError("the password must be a non-empty string")
    return password


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: object, size: int, what: str) -> bytes:
    if not isinstance(value, str):
        raise ValueError(f"{what} is not base64 text")
    try:
        data = base64.b64decode(value, validate=True)
    except ValueError as exc:
        raise ValueError(f"{what} is not valid base64") from exc
    if len(data) != size:
        raise ValueError(f"{what} is {len(data)} bytes, expected {size}")
    return data


def _record_to_json(record: AccountRecord) -> dict[str, Any]:
    return {
        "salt": _b64(record.salt),
        "opslimit": record.stretch.opslimit,
        "memlimit": record.stretch.memlimit,
        "w0": _b64(record.verifier.w0),
        "L": _b64(record.verifier.L),
        # w0*M and w0*N, so that loading the file costs no scalar multiplication.
        "w0M": _b64(record.verifier.w0_m),
        "w0N": _b64(record.verifier.w0_n),
        "root": record.root,
        "quota": record.quota,
        "read_only": record.read_only,
    }


def _record_from_json(username: str, raw: object) -> AccountRecord:
    what = f"user {username!r}"
    if not isinstance(raw, dict):
        raise ValueError(f"{what} is not an object")
    try:
        stretch = StretchParams(raw["opslimit"], raw["memlimit"]).check()
        w0 = _unb64(raw["w0"], 32, f"{what}: w0")
        if "w0M" in raw and "w0N" in raw:
            verifier = Verifier(
                w0,
                _unb64(raw["L"], 32, f"{what}: L"),
                _unb64(raw["w0M"], 32, f"{what}: w0M"),
                _unb64(raw["w0N"], 32, f"{what}: w0N"),
            )
        else:
            verifier = Verifier(w0, _unb64(raw["L"], 32, f"{what}: L"))
        if not sodium.crypto_core_ed25519_is_valid_point(verifier.L):
            raise ValueError(f"{what}: L is not a valid point")
        read_only = raw.get("read_only", False)
        if type(read_only) is not bool:
            raise ValueError(f"{what}: read_only is not true or false")
        return AccountRecord(
            username=check_username(username),
            salt=_unb64(raw["salt"], SALT_SIZE, f"{what}: salt"),
            stretch=stretch,
            verifier=verifier,
            root=check_root(raw.get("root", username)),
            quota=_check_quota(raw.get("quota")),
            read_only=read_only,
        )
    except KeyError as exc:
        raise ValueError(f"{what} lacks the field {exc.args[0]!r}") from exc


#: The costs of a set of records, in a fixed order, and the running count of each.
_CostMix = tuple[tuple[StretchParams, ...], tuple[int, ...]]


def _cost_mix(users: dict[str, AccountRecord]) -> _CostMix:
    """The costs of ``users``' records (in a fixed order) and the running count of each.

    ``([a, b], [3, 4])``: three records at cost ``a``, one at ``b``. What the
    fake records of unknown names are drawn from (see :meth:`Accounts._fake`).
    """
    counts: dict[StretchParams, int] = {}
    for record in users.values():
        counts[record.stretch] = counts.get(record.stretch, 0) + 1
    costs = tuple(sorted(counts, key=lambda cost: (cost.opslimit, cost.memlimit)))
    running: list[int] = []
    total = 0
    for cost in costs:
        total += counts[cost]
        running.append(total)
    return costs, tuple(running)


@attrs.frozen
class _State:
    secret: bytes
    users: dict[str, AccountRecord]
    # (st_ino, st_size, st_mtime_ns) of the file this state was read from; None if absent.
    signature: tuple[int, int, int] | None
    # The records' costs and their running counts (see _cost_mix), for the fakes.
    costs: _CostMix = attrs.field(
        default=attrs.Factory(lambda state: _cost_mix(state.users), takes_self=True)
    )


class Accounts:
    """The accounts file at ``path`` (created on the first change).

    ``stretch`` is the Argon2id cost given to new or re-passworded accounts
    (stored in each record, so raising it later leaves old records valid):
    :data:`DEFAULT_STRETCH` unless given; ``stretch=MIN_STRETCH`` makes
    accounts cheap to create and to guess, for tests only. Thread-safe; several
    processes may change the same file (changes are serialised with a lock
    file where the OS has ``fcntl``).
    """

    def __init__(self, path: str | os.PathLike[str], *, stretch: StretchParams = DEFAULT_STRETCH):
        #: The accounts file.
        self.path = Path(path)
        #: The Argon2id cost of the records this object writes.
        self.stretch = stretch.check()
        self._lock = threading.Lock()
        self._state = self._read()
        #: Counts the times the records were replaced (re-read or changed by
        #: this process): a server compares it to end the sessions of users
        #: whose record changed (see :meth:`current`).
        self.generation = 0
        # The signature of a file that failed to parse: not read again until it
        # moves. (Not None when there is none: None is a missing file's.)
        self._malformed: tuple[int, int, int] | _NoFile | None = _NO_FILE
        #: The error of the last ``stat`` of the file, if it failed (other than
        #: a missing file): the accounts keep their data meanwhile (see changed).
        self.stat_error: OSError | None = None
        # The last FAKE_CACHE fakes built, by what they are drawn from (the
        # secret and the records' mix of costs) and username (see lookup).
        self._fakes: OrderedDict[tuple[bytes, _CostMix, str], AccountRecord] = OrderedDict()
        self._fakes_lock = threading.Lock()

    # --- Queries --------------------------------------------------------------------------

    def __contains__(self, username: object) -> bool:
        return isinstance(username, str) and username in self._state.users

    def __len__(self) -> int:
        return len(self._state.users)

    def __iter__(self) -> Iterator[str]:
        return iter(self.usernames())

    def usernames(self) -> list[str]:
        """Every account's name, sorted."""
        return sorted(self._state.users)

    def get(self, username: str) -> AccountRecord:
        """The record of an existing account; KeyError if there is none."""
        try:
            return self._state.users[username]
        except KeyError:
            raise KeyError(f"no account named {username!r}") from None

    def current(self, username: str) -> AccountRecord | None:
        """The record of ``username`` as the accounts stand now; None if there is none."""
        return self._state.users.get(username)

    def lookup(self, username: str) -> AccountRecord:
        """The record for ``username``, or a fake one if there is no such account.

        The fake is deterministic (keyed with the file's secret, so the same
        unknown name always gets the same salt and cost), has a cost drawn
        from those of the real records, as often as they hold it (see
        :meth:`_fake`), and a verifier no password matches; it is made for every lookup,
        known user or not, so both take the same work. The last
        :data:`FAKE_CACHE` fakes are kept, by username, for the same reason
        both ways: a name looked up lately (known or not) costs a dictionary
        hit, a new one (known or not) the building. This is what the server's
        handshake calls (:data:`conduit.protocol.handshake.AccountLookup`).
        """
        state = self._state
        fake = self._cached_fake(state, username)
        real = state.users.get(username)
        return fake if real is None else real

    def _cached_fake(self, state: _State, username: str) -> AccountRecord:
        # A reload that changes the mix of costs draws the fakes again.
        key = (state.secret, state.costs, username)
        with self._fakes_lock:
            fake = self._fakes.get(key)
            if fake is not None:
                self._fakes.move_to_end(key)
                return fake
        fake = self._fake(state, username)
        with self._fakes_lock:
            self._fakes[key] = fake
            while len(self._fakes) > FAKE_CACHE:
                self._fakes.popitem(last=False)
        return fake

    def _fake(self, state: _State, username: str) -> AccountRecord:
        """The fake record of ``username`` in ``state``.

        Its cost is what a real record of that name would likely have: drawn
        from the costs of the real records, each as often as the records hold
        it, by a number keyed with the file's secret (the same name always
        gets the same cost while the records' costs stay the same mix); the
        configured cost when there are no records. A fake at a cost no record
        has would tell that the name does not exist, since the SERVER_HELLO
        shows the cost (as it does the salt). The draw is a point in [0, 1)
        placed on the costs' shares, so a change in the mix moves only the
        names whose point lies where the shares moved.
        """
        secret = state.secret
        name = username.encode("utf-8", "replace")

        def tag(label: bytes) -> bytes:
            return hmac.new(secret, label + b"\0" + name, hashlib.sha512).digest()

        costs, running = state.costs
        if costs:
            point = (int.from_bytes(tag(b"stretch")[:8], "big") * running[-1]) >> 64
            stretch = costs[bisect.bisect_right(running, point)]
        else:
            stretch = self.stretch
        return AccountRecord(
            username=username,
            salt=tag(b"salt")[:SALT_SIZE],
            stretch=stretch,
            # Points of unknown logarithm stand in for L, w0*M and w0*N (no
            # password can match them anyway), at a third of the cost of
            # multiplying: the fake is built on every lookup, known user or not.
            verifier=Verifier(
                reduce_scalar(tag(b"w0")),
                sodium.crypto_core_ed25519_from_uniform(tag(b"L")[:32]),
                sodium.crypto_core_ed25519_from_uniform(tag(b"w0M")[:32]),
                sodium.crypto_core_ed25519_from_uniform(tag(b"w0N")[:32]),
            ),
            root=username,
            quota=None,
            read_only=False,
        )

    # --- Changes --------------------------------------------------------------------------

    def add(
        self,
        username: str,
        password: str,
        *,
        root: str | None = None,
        quota: int | None = None,
        read_only: bool = False,
    ) -> None:
        """Create an account; ValueError if it exists or an argument is invalid.

        Runs the Argon2id stretch (~0.1-0.2 s at the default cost).
        """
        check_username(username)
        _check_password(password)
        self.reload_if_changed()
        root = check_root(username if root is None else root)
        quota = _check_quota(quota)
        if type(read_only) is not bool:
            raise ValueError("read_only must be True or False")
        if username in self:
            raise ValueError(f"an account named {username!r} already exists")
        record = self._new_record(username, password, root, quota, read_only)
        with self._changing() as users:
            if username in users:
                raise ValueError(f"an account named {username!r} already exists")
            users[username] = record

    def remove(self, username: str) -> None:
        """Delete an account; KeyError if there is none. Its files stay on disk."""
        with self._changing() as users:
            if username not in users:
                raise KeyError(f"no account named {username!r}")
            del users[username]

    def set_password(self, username: str, password: str) -> None:
        """Give an account a new password (and a new salt); KeyError if there is none."""
        _check_password(password)
        self.reload_if_changed()
        old = self.get(username)
        fresh = self._new_record(username, password, old.root, old.quota, old.read_only)
        with self._changing() as users:
            current = users.get(username)
            if current is None:
                raise KeyError(f"no account named {username!r}")
            users[username] = attrs.evolve(
                current, salt=fresh.salt, stretch=fresh.stretch, verifier=fresh.verifier
            )

    def _new_record(
        self, username: str, password: str, root: str, quota: int | None, read_only: bool
    ) -> AccountRecord:
        salt = secrets.token_bytes(SALT_SIZE)
        return AccountRecord(
            username=username,
            salt=salt,
            stretch=self.stretch,
            verifier=account_verifier(password, username, salt, self.stretch),
            root=root,
            quota=quota,
            read_only=read_only,
        )

    # --- The file -------------------------------------------------------------------------

    def changed(self) -> bool:
        """Whether the file differs from what was last read: one ``stat``, nothing read.

        Lets the server re-read the file (in a worker thread) only when there
        is something to read. A file that failed to parse counts as unchanged
        until it changes again (it is not re-read for nothing), and so does a
        file that cannot be ``stat``-ed for another reason than being missing
        (a permission refused on its directory, a symlink loop, an I/O error):
        the accounts keep their data, and :attr:`stat_error` says why.
        """
        signature = self._current_signature()
        return signature != self._state.signature and signature != self._malformed

    def reload_if_changed(self) -> bool:
        """Re-read the file if another process changed it; True if it did.

        One ``stat`` when nothing changed: cheap enough to call before every
        handshake. A malformed file raises ValueError and leaves the accounts
        as they were; it is not read again until it changes (a fixed file is
        read at the next call). A file that cannot be ``stat``-ed counts as
        unchanged (see :meth:`changed`); one that cannot be read raises
        OSError, and is tried again at the next call.
        """
        if not self.changed():
            return False
        with self._lock:
            signature = self._current_signature()
            if signature == self._state.signature or signature == self._malformed:
                return False
            try:
                self._state = self._read(keep_secret=self._state.secret)
                self.generation += 1
            except ValueError:
                # Parsing is what costs (the whole file); an I/O error is cheap
                # and may pass, so only a malformed file is remembered.
                self._malformed = signature
                raise
            self._malformed = _NO_FILE
            return True

    def _current_signature(self) -> tuple[int, int, int] | None:
        """The file's signature; the one last read if it cannot be stat-ed (the
        error kept in :attr:`stat_error`), so that it counts as unchanged."""
        try:
            signature = self._signature()
        except OSError as exc:
            # Detached: its traceback holds this frame, which holds self (see
            # conduit._stored_errors).
            self.stat_error = detached(exc)
            return self._state.signature
        self.stat_error = None
        return signature

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _read(self, keep_secret: bytes | None = None) -> _State:
        signature = self._signature()
        try:
            text = _read_regular_file(self.path)
        except FileNotFoundError:
            return _State(keep_secret or secrets.token_bytes(_SECRET_SIZE), {}, None)
        try:
            raw = json.loads(text)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
            raise ValueError(f"{self.path}: not a JSON accounts file: {exc}") from exc
        try:
            return _State(*self._parse(raw, keep_secret), signature)
        except ValueError as exc:
            raise ValueError(f"{self.path}: {exc}") from exc

    @staticmethod
    def _parse(raw: object, keep_secret: bytes | None) -> tuple[bytes, dict[str, AccountRecord]]:
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file")
        if raw.get("version") != VERSION:
            raise ValueError(f"accounts file version {raw.get('version')!r}, expected {VERSION}")
        if "secret" in raw:
            secret = _unb64(raw["secret"], _SECRET_SIZE, "secret")
        else:
            secret = keep_secret or secrets.token_bytes(_SECRET_SIZE)
        users = raw.get("users", {})
        if not isinstance(users, dict):
            raise ValueError("users is not an object")
        return secret, {name: _record_from_json(name, body) for name, body in users.items()}

    @contextlib.contextmanager
    def _changing(self) -> Iterator[dict[str, AccountRecord]]:
        """Lock, re-read the file, let the caller change the users, write it back.

        Never through a symbolic link (``PermissionError``): the new file
        replaces what is at the path, so the link would become a plain file
        and a server reading the link's target would never see the change (a
        removed user kept logging in, found by a review on 2026-12-07); and
        writing to wherever the link points would let whoever may write its
        directory make the changer (root, say) replace any file.
        """
        _refuse_a_link(self.path)
        with self._lock, self._file_lock():
            _refuse_a_link(self.path)  # made a link while we waited for the lock
            _remove_abandoned_temporaries(self.path)
            state = self._read(keep_secret=self._state.secret)
            users = dict(state.users)
            yield users
            document = {
                "format": FORMAT,
                "version": VERSION,
                "secret": _b64(state.secret),
                "users": {name: _record_to_json(users[name]) for name in sorted(users)},
            }
            _write_atomic(self.path, (json.dumps(document, indent=2) + "\n").encode())
            self._state = _State(state.secret, users, self._signature())
            self.generation += 1
            self._malformed = _NO_FILE

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        if sys.platform == "win32":  # pragma: no cover
            yield
            return
        fd = _open_lock(self.path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock


def _read_regular_file(path: Path) -> bytes:
    """The bytes of ``path``; ``ValueError`` if it is not a regular file.

    A FIFO put in the file's place would block its open and its read until a
    writer came (a server's logins waited on it for good until 2026-12-07), a
    device would give anything: neither holds accounts. Opened without
    blocking, then looked at before anything is read.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            raise ValueError(f"{path} is not a regular file")
        return file.read()


def _refuse_a_link(path: Path) -> None:
    """``PermissionError`` naming the file to give instead if ``path`` is a symbolic link."""
    if not path.is_symlink():
        return
    try:
        target = str(path.resolve(strict=False))
    except (OSError, RuntimeError):  # a loop of links
        target = os.readlink(path)
    raise PermissionError(
        errno.ELOOP,
        f"{path} is a symbolic link (to {target}): accounts are changed only in the file "
        f"itself, which a server reading either name sees; give that: --accounts {target}",
    )


def _open_lock(path: Path) -> int:
    """Open (or create) the lock file beside the accounts file ``path``.

    Never through a symbolic link: whoever may write the directory (a
    service whose file root changes) could otherwise make the changer create
    a file anywhere it may. Given the accounts file's owner, group and mode
    (as :func:`_keep_owner` gives the file), so that the file's owner can
    still change its file after root did. A lock that is not ours to open
    says whose it is.
    """
    lock_path = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PermissionError(
                exc.errno, f"{lock_path} is a symbolic link: remove it (a lock file is plain)"
            ) from None
        if isinstance(exc, PermissionError):
            try:
                held = os.stat(lock_path, follow_symlinks=False)
            except OSError:
                raise exc from None
            raise PermissionError(
                exc.errno,
                f"{lock_path} belongs to uid {held.st_uid} / gid {held.st_gid}: give it "
                "to the accounts file's owner, or remove it",
            ) from None
        raise
    try:
        lock = os.fstat(fd)
        if not stat.S_ISREG(lock.st_mode):
            raise PermissionError(errno.EPERM, f"{lock_path} is not a plain file: remove it")
        with contextlib.suppress(FileNotFoundError):
            owner = os.stat(path)
            if (lock.st_uid, lock.st_gid) != (owner.st_uid, owner.st_gid):
                # Root may; anyone else keeps the lock as it is (it is theirs).
                with contextlib.suppress(PermissionError):
                    _keep_owner(fd, owner, lock_path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _keep_owner(fd: int, owner: os.stat_result, path: Path) -> None:
    """Give the new file the old one's owner and group, and its mode: owner
    and group permissions as they were, none for others (an administrator
    changing a service's file as root must not lock the service out of it,
    whether the service owns it or reads it through its group).

    ``PermissionError`` (with a message that says so) when that is not
    allowed: the file stays as it was rather than become unreadable to its
    owner.
    """
    mode = stat.S_IMODE(owner.st_mode) & 0o770 | 0o600
    if sys.platform == "win32":  # pragma: no cover - no owners to keep
        return
    if (owner.st_uid, owner.st_gid) != (os.geteuid(), os.getegid()):  # else a new file's are
        try:
            os.fchown(fd, owner.st_uid, owner.st_gid)
        except PermissionError as exc:
            if owner.st_uid != os.geteuid():
                raise PermissionError(
                    exc.errno,
                    f"{path} belongs to uid {owner.st_uid} / gid {owner.st_gid}, and the "
                    "changed file could not be given to them (its owner could no longer "
                    "read it); change it as that user or as root",
                ) from None
            if mode & 0o070:
                # Ours, but its group, which may read it (a service's), is
                # one we are not in: that group would lose the file.
                raise PermissionError(
                    exc.errno,
                    f"{path} may be read by its group (gid {owner.st_gid}), which the changed "
                    "file could not be given to (you are not in it): change it as root or "
                    "as a member of that group",
                ) from None
            mode &= 0o700  # its group had nothing: ours, which gets nothing either
    os.fchmod(fd, mode)


def _remove_abandoned_temporaries(path: Path) -> None:
    """Delete the temporary files of writes killed before their rename.

    Called with the file lock held: every writer makes and renames its
    temporary under that lock, so one found now belongs to a dead writer (a
    ``conduit user add`` killed mid-write). It would otherwise stay beside the
    accounts file for ever, holding a copy of the verifiers.
    """
    if sys.platform == "win32":  # pragma: no cover - no lock, so no proof of death
        return
    # Exactly _write_atomic's names: a prefix alone would also take those of
    # another accounts file whose name starts with this one's (".acc." is
    # the start of ".acc.json.*"), whose writer holds another lock.
    ours = re.compile(re.escape(f".{path.name}.") + r"[0-9a-f]{32}" + re.escape(_TEMPORARY_SUFFIX))
    with contextlib.suppress(OSError), os.scandir(path.parent) as entries:
        for entry in entries:
            if ours.fullmatch(entry.name):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never a mix."""
    try:
        owner: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        owner = None
    # Named as _remove_abandoned_temporaries expects; O_EXCL: never someone else's file.
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(16)}{_TEMPORARY_SUFFIX}")
    fd = os.open(
        temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
    )
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
            if owner is not None:
                _keep_owner(file.fileno(), owner, path)
            else:
                os.fchmod(file.fileno(), 0o600)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    # The rename itself must survive a crash too.
    with contextlib.suppress(OSError):  # some platforms cannot open a directory
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


__all__ = [
    "DEFAULT_STRETCH",
    "MIN_STRETCH",
    "AccountRecord",
    "Accounts",
    "StretchParams",
    "check_root",
    "check_username",
]
