"""``conduit user add|remove|list --accounts FILE``: manage a server's accounts file.

Plain synchronous work (no Trio): read or change the file through
:class:`~conduit.Accounts`, which writes atomically under a lock, so a running
``conduit serve --accounts FILE`` sees the change at its next login.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from ..accounts import Accounts, check_root, check_username
from ._common import CLIError, ExitCode, human_bytes

#: Fewer characters than this get a warning (as ``serve`` gives a short shared password).
SHORT_PASSWORD = 12


def open_accounts(path: Path, *, must_exist: bool = False) -> Accounts:
    """The accounts file at ``path``; CLIError when unreadable.

    A missing file is empty (``user add`` creates it) unless ``must_exist``:
    then it is a CLIError, since a command that only reads the file was
    most likely given a mistyped path, and serving or listing no users
    would hide that.
    """
    try:
        if must_exist and not path.exists():
            raise CLIError(
                f"the accounts file {path} does not exist: create it with "
                f"'conduit user add NAME --accounts {path}'"
            )
        return Accounts(path)
    except (OSError, ValueError) as exc:  # exists() raises too: a directory we may not search
        raise CLIError(f"cannot read the accounts file {path}: {exc}") from None


def add(
    path: Path,
    username: str,
    ask_password: Callable[[], str],
    *,
    root: str | None,
    quota: int | None,
    read_only: bool,
) -> int:
    """Create the account; a clear error if it exists or an argument is invalid.

    Those are checked before ``ask_password`` is called: a password typed
    twice and then refused for a reason known before was a review's finding.
    """
    try:
        check_username(username)
        check_root(username if root is None else root)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    accounts = open_accounts(path)
    if username in accounts:
        raise CLIError(f"an account named {username!r} already exists in {path}")
    password = ask_password()
    try:
        accounts.add(username, password, root=root, quota=quota, read_only=read_only)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    except OSError as exc:
        raise _cannot_write(path, exc) from None
    record = accounts.get(username)
    print(f"added user {username!r} (root {record.root!r}{_limits(record.quota, read_only)})")
    _warn_if_short(path, password)
    return ExitCode.OK


def passwd(path: Path, username: str, ask_password: Callable[[], str]) -> int:
    """Give the account a new password (a running server ends its open sessions);
    ``ask_password`` is called once the file and the account are found."""
    accounts = open_accounts(path, must_exist=True)
    if username not in accounts:
        raise CLIError(f"no user named {username!r} in {path}")
    password = ask_password()
    try:
        accounts.set_password(username, password)
    except KeyError:
        raise CLIError(f"no user named {username!r} in {path}") from None
    except ValueError as exc:  # a password refused, or a file changed into something unreadable
        raise CLIError(str(exc)) from None
    except OSError as exc:
        raise _cannot_write(path, exc) from None
    print(f"changed the password of user {username!r} (its open sessions end)")
    _warn_if_short(path, password)
    return ExitCode.OK


def _warn_if_short(path: Path, password: str) -> None:
    if len(password) < SHORT_PASSWORD:
        # Set all the same: the administrator decides. But the file's
        # verifiers let whoever copies it try guesses offline, at the
        # stretch's cost each, and a short password falls to that.
        print(
            f"conduit: warning: the password is short ({len(password)} characters); whoever "
            f"gets a copy of {path} can try guesses offline: use {SHORT_PASSWORD} or more "
            "random characters",
            file=sys.stderr,
        )


def remove(path: Path, username: str) -> int:
    """Delete the account (its files stay on disk)."""
    accounts = open_accounts(path, must_exist=True)
    try:
        accounts.remove(username)
    except KeyError:
        raise CLIError(f"no user named {username!r} in {path}") from None
    except ValueError as exc:  # changed by someone else into something unreadable
        raise CLIError(f"cannot read the accounts file {path}: {exc}") from None
    except OSError as exc:
        raise _cannot_write(path, exc) from None
    print(f"removed user {username!r} (its files are left where they are)")
    return ExitCode.OK


def list_users(path: Path) -> int:
    """One line per account: name, root, quota, read-only."""
    accounts = open_accounts(path, must_exist=True)
    for username in accounts.usernames():
        record = accounts.get(username)
        print(f"{username}\troot={record.root}{_limits(record.quota, record.read_only)}")
    return ExitCode.OK


def _cannot_write(path: Path, exc: OSError) -> CLIError:
    """The error for an accounts file that cannot be written: a configuration
    problem (exit 2, as an unreadable one): its directory is missing or not
    writable, or the disk refuses it."""
    return CLIError(f"cannot write the accounts file {path}: {exc.strerror or exc}")


def _limits(quota: int | None, read_only: bool) -> str:
    text = f", quota {human_bytes(quota)}" if quota is not None else ""
    return text + (", read-only" if read_only else "")


__all__ = ["add", "list_users", "open_accounts", "passwd", "remove"]
