"""``conduit user add|remove|list``, ``serve --accounts`` and ``--user``, as real subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from conduit import Accounts, Client, ClientDescriptor
from conduit.protocol.handshake import account_verifier
from test_cli import _env, conduit, start_server

ALICE = "alice's long passphrase"


def test_user_add_list_remove(tmp_path: Path) -> None:
    accounts = tmp_path / "accounts.json"
    added = conduit(
        "user", "add", "alice", "--accounts", str(accounts), "--quota", "10M", password=ALICE
    )
    assert added.returncode == 0, added.stderr
    assert "added user 'alice'" in added.stdout
    assert "warning" not in added.stderr
    bob = conduit(
        "user",
        "add",
        "bob",
        "--accounts",
        str(accounts),
        "--root",
        "shared",
        "--read-only",
        password="bob's long passphrase",
    )
    assert bob.returncode == 0, bob.stderr
    listed = conduit("user", "list", "--accounts", str(accounts), password=None)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines() == [
        "alice\troot=alice, quota 10.0 MiB",
        "bob\troot=shared, read-only",
    ]
    # The file holds verifiers, never the password.
    text = accounts.read_text()
    assert ALICE not in text and json.loads(text)["users"]["alice"]["quota"] == 10 * 1024 * 1024
    again = conduit("user", "add", "alice", "--accounts", str(accounts), password=ALICE)
    assert again.returncode == 2 and "already exists" in again.stderr
    removed = conduit("user", "remove", "bob", "--accounts", str(accounts), password=None)
    assert removed.returncode == 0, removed.stderr
    gone = conduit("user", "remove", "bob", "--accounts", str(accounts), password=None)
    assert gone.returncode == 2 and "no user named 'bob'" in gone.stderr
    assert "bob" not in conduit("user", "list", "--accounts", str(accounts)).stdout
    no_password = conduit("user", "add", "carol", "--accounts", str(accounts), password=None)
    assert no_password.returncode == 2 and "CONDUIT_PASSWORD" in no_password.stderr
    short = conduit("user", "add", "dave", "--accounts", str(accounts), password="hunter2")
    assert short.returncode == 0, short.stderr  # the administrator decides, warned
    assert "warning: the password is short (7 characters)" in short.stderr


def test_user_passwd_gives_a_new_password_and_keeps_the_rest(tmp_path: Path) -> None:
    accounts = tmp_path / "accounts.json"
    assert (
        conduit(
            "user", "add", "alice", "--accounts", str(accounts), "--quota", "10M", password=ALICE
        ).returncode
        == 0
    )
    before = json.loads(accounts.read_text())["users"]["alice"]
    changed = conduit(
        "user", "passwd", "alice", "--accounts", str(accounts), password="a new long passphrase"
    )
    assert changed.returncode == 0, changed.stderr
    assert "changed the password of user 'alice'" in changed.stdout
    after = json.loads(accounts.read_text())["users"]["alice"]
    assert after["w0"] != before["w0"] and after["salt"] != before["salt"]
    assert {key: after[key] for key in ("root", "quota")} == {"root": "alice", "quota": 10 << 20}
    record = Accounts(accounts).get("alice")
    for password, matches in (("a new long passphrase", True), (ALICE, False)):
        verifier = account_verifier(password, "alice", record.salt, record.stretch)
        assert (verifier.w0 == record.verifier.w0) is matches
    unknown = conduit("user", "passwd", "bob", "--accounts", str(accounts), password=ALICE)
    assert unknown.returncode == 2 and "no user named 'bob'" in unknown.stderr
    short = conduit("user", "passwd", "alice", "--accounts", str(accounts), password="hunter2")
    assert short.returncode == 0 and "the password is short" in short.stderr


def test_user_add_and_passwd_check_what_they_can_before_asking_for_a_password(
    tmp_path: Path,
) -> None:
    """A name or root refused, a user that exists (add) or does not (passwd),
    a file that is missing (passwd): said before any password is asked for.
    Asked first, the password was typed twice and then refused for a reason
    known before (a review, 2026-12-07). Run with no password to give (no
    CONDUIT_PASSWORD, no terminal): each ends on its own reason, not on that."""
    accounts = tmp_path / "accounts.json"
    assert (
        conduit("user", "add", "alice", "--accounts", str(accounts), password=ALICE).returncode == 0
    )
    cases = [
        (["add", "bad/name"], "username"),
        (["add", "CON"], "username"),
        (["add", "bob", "--root", "../up"], "root"),
        (["add", "alice"], "already exists"),
        (["passwd", "bob"], "no user named 'bob'"),
    ]
    for command, reason in cases:
        result = conduit("user", *command, "--accounts", str(accounts), password=None)
        assert result.returncode == 2, (command, result.stderr)
        assert reason in result.stderr and "CONDUIT_PASSWORD" not in result.stderr, (
            command,
            result.stderr,
        )
    missing = tmp_path / "missing.json"
    result = conduit("user", "passwd", "alice", "--accounts", str(missing), password=None)
    assert result.returncode == 2 and "does not exist" in result.stderr, result.stderr
    assert "CONDUIT_PASSWORD" not in result.stderr and not missing.exists()


def test_user_commands_refuse_an_accounts_file_given_as_a_link(tmp_path: Path) -> None:
    """Changing the file through a symbolic link would replace the link with a
    plain file: a server reading the target never saw the change (a removed
    user kept logging in). The change is refused, naming the file to give;
    reading through the link (list, serve) is fine."""
    real = tmp_path / "etc" / "accounts.json"
    real.parent.mkdir()
    link = tmp_path / "accounts.json"
    link.symlink_to(real)
    assert conduit("user", "add", "alice", "--accounts", str(real), password=ALICE).returncode == 0
    text = real.read_text()
    for command in (["add", "bob"], ["passwd", "alice"], ["remove", "alice"]):
        result = conduit("user", *command, "--accounts", str(link), password=ALICE)
        assert result.returncode == 2, (command, result.stderr)
        assert "is a symbolic link" in result.stderr and f"--accounts {real}" in result.stderr
        assert "Traceback" not in result.stderr
    assert link.is_symlink() and real.read_text() == text
    listed = conduit("user", "list", "--accounts", str(link))
    assert listed.returncode == 0 and listed.stdout.startswith("alice\t"), listed.stderr


@pytest.mark.parametrize("users", [2, 3_000], ids=["at-exit", "mid-listing"])
def test_user_list_into_a_reader_that_went_away_ends_quietly(tmp_path: Path, users: int) -> None:
    # `conduit user list | head -1` (a command click runs without Trio: click
    # itself turned the broken pipe into a bare exit 1).
    accounts = tmp_path / "accounts.json"
    assert (
        conduit("user", "add", "alice", "--accounts", str(accounts), password=ALICE).returncode == 0
    )
    document = json.loads(accounts.read_text())
    record = document["users"]["alice"]
    document["users"] = {f"user{index:05}": dict(record) for index in range(users)}
    accounts.write_text(json.dumps(document))
    process = subprocess.Popen(
        [sys.executable, "-m", "conduit", "user", "list", "--accounts", str(accounts)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()
    errors = process.stderr.read().decode()
    assert process.wait(timeout=60) == 141, errors
    assert "Traceback" not in errors and "Exception ignored" not in errors, errors


def test_user_commands_on_an_unusable_accounts_file_are_configuration_errors(
    tmp_path: Path,
) -> None:
    """A FILE in a missing directory cannot be written, a malformed one cannot be
    read: exit 2 with one line saying so, never a traceback."""
    missing = tmp_path / "no such directory" / "accounts.json"
    added = conduit("user", "add", "alice", "--accounts", str(missing), password=ALICE)
    assert added.returncode == 2, (added.stdout, added.stderr)
    assert "cannot write the accounts file" in added.stderr and "Traceback" not in added.stderr
    malformed = tmp_path / "accounts.json"
    # Nested too deep for the JSON parser: a RecursionError, not a ValueError.
    for text in ("{not json", "[" * 100_000):
        malformed.write_text(text)
        for command in (["add", "alice"], ["remove", "alice"], ["list"]):
            result = conduit("user", *command, "--accounts", str(malformed), password=ALICE)
            assert result.returncode == 2, (command, result.stderr)
            assert "cannot read the accounts file" in result.stderr, (command, result.stderr)
            assert "Traceback" not in result.stderr


def test_commands_that_only_read_the_accounts_file_refuse_a_missing_one(
    tmp_path: Path,
) -> None:
    """A mistyped FILE is exit 2 with the way to create it, not a server with
    no users or an empty listing; only ``user add`` creates the file."""
    missing = tmp_path / "acounts.json"
    for command in (
        ["serve", str(tmp_path / "served"), "--port", "0", "--accounts", str(missing)],
        ["user", "list", "--accounts", str(missing)],
        ["user", "remove", "alice", "--accounts", str(missing)],
    ):
        result = conduit(*command, password=ALICE, timeout=30)
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        assert f"the accounts file {missing} does not exist" in result.stderr, command
        assert f"conduit user add NAME --accounts {missing}" in result.stderr
        assert not missing.exists()
    assert not (tmp_path / "served").exists()  # refused before it served anything
    # An existing file whose last user was removed is served, with a warning.
    assert (
        conduit("user", "add", "alice", "--accounts", str(missing), password=ALICE).returncode == 0
    )
    assert conduit("user", "remove", "alice", "--accounts", str(missing)).returncode == 0
    server = start_server(tmp_path, "--accounts", str(missing), password="unused")
    try:
        server.wait_for_log(r"accounts file .* has no users yet")
    finally:
        server.stop()


def test_serve_with_accounts_and_log_in_as_a_user(tmp_path: Path) -> None:
    accounts = tmp_path / "accounts.json"
    assert (
        conduit("user", "add", "alice", "--accounts", str(accounts), password=ALICE).returncode == 0
    )
    server = start_server(tmp_path, "--accounts", str(accounts), password="unused")
    try:
        listed = conduit("ls", "--from", server.address, "--user", "alice", password=ALICE)
        assert listed.returncode == 0, listed.stderr
        server.wait_for_log(r"connect +client \w+ user alice")
        wrong = conduit("ls", "--from", server.address, "--user", "alice", password="wrong")
        assert wrong.returncode == 3
        assert "refused the password" in wrong.stderr and "'alice'" in wrong.stderr
        nobody = conduit("ls", "--from", server.address, "--user", "mallory", password="wrong")
        assert nobody.returncode == 3
        # No user: the server explains that it has accounts.
        anonymous = conduit("ls", "--from", server.address, password=ALICE)
        assert anonymous.returncode == 3 and "username" in anonymous.stderr
        # ... and what to do about it: not the password to check, a --user to give.
        assert "log in with --user NAME" in anonymous.stderr, anonymous.stderr
        assert "CONDUIT_PASSWORD" not in anonymous.stderr
    finally:
        server.stop()


def test_the_server_log_says_why_a_session_ended(tmp_path: Path) -> None:
    """A session the server ends (its account removed) and one its client ends
    each say why in their disconnect line: without -v, a removed user's
    session ending looked like any other (a review, 2026-12-07)."""
    accounts = tmp_path / "accounts.json"
    assert (
        conduit("user", "add", "alice", "--accounts", str(accounts), password=ALICE).returncode == 0
    )
    server = start_server(tmp_path, "--accounts", str(accounts), password="unused")
    try:
        assert (
            conduit("ls", "--from", server.address, "--user", "alice", password=ALICE).returncode
            == 0
        )
        server.wait_for_log(r"disconnect client \w+ user alice \(.*\) after [\d.]+ s \(.+\)")

        async def session() -> None:
            client = Client(
                ClientDescriptor(
                    server_host=server.host,
                    server_port=server.port,
                    username="alice",
                    password=ALICE,
                )
            )
            with trio.fail_after(60):
                await client.connect()
                removed = await trio.to_thread.run_sync(
                    lambda: conduit("user", "remove", "alice", "--accounts", str(accounts))
                )
                assert removed.returncode == 0, removed.stderr
                await trio.to_thread.run_sync(
                    server.wait_for_log,
                    r"disconnect client \w+ user alice .* \(account 'alice' was removed\)",
                )
                await client.disconnect()

        trio.run(session)
    finally:
        server.stop()


def test_lock_out_is_reported_with_its_duration(tmp_path: Path) -> None:
    accounts = tmp_path / "accounts.json"
    assert (
        conduit("user", "add", "alice", "--accounts", str(accounts), password=ALICE).returncode == 0
    )
    server = start_server(tmp_path, "--accounts", str(accounts), password="unused")
    try:
        for _ in range(5):  # the default auth_failure_limit
            result = conduit("ls", "--from", server.address, "--user", "alice", password="guess")
            assert result.returncode == 3 and "locked out" not in result.stderr
        locked = conduit("ls", "--from", server.address, "--user", "alice", password=ALICE)
        assert locked.returncode == 3, locked.stderr
        assert "locked this client out" in locked.stderr and "try again in" in locked.stderr
        assert "check CONDUIT_PASSWORD" not in locked.stderr
    finally:
        server.stop()


def test_an_accounts_file_whose_directory_may_not_be_searched_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``Path.exists`` raises ``PermissionError`` (it does not say False) for a
    file in a directory the user may not search: reading commands gave a
    traceback and exit 1, where docs/cli.md says an unreadable file is a
    one-line error (exit 2). (Simulated: these tests may run as root, whom
    no directory refuses.)"""
    from conduit.cli._common import CLIError
    from conduit.cli._users import open_accounts

    def refused(self: Path, **_: object) -> bool:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "exists", refused)
    with pytest.raises(CLIError, match=r"cannot read the accounts file .*Permission denied"):
        open_accounts(tmp_path / "locked" / "users.json", must_exist=True)
