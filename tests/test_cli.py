"""The ``conduit`` command-line tool, run as a user runs it: real subprocesses.

Every test starts ``python -m conduit ...`` on 127.0.0.1 with bounded timeouts;
servers are always stopped (SIGINT, then kill) in ``finally``. The password
travels in ``CONDUIT_PASSWORD`` only, as the tool requires.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import click
import pytest
import trio

from conduit import Client, ClientDescriptor, ServerDescriptor
from conduit._extras import extra_packages, requirements_of
from conduit.cli._app import cli
from conduit.cli._common import (
    Address,
    ClientOptions,
    CLIError,
    client_descriptor,
    parse_address,
    parse_size,
)
from conduit.cli._serve import ServeLimits, ServeOptions, build_server

PASSWORD = "cli test password \N{GREEK SMALL LETTER BETA} 7"
RUN_TIMEOUT = 120
PARTIAL_PREFIX = ".conduit-partial-"
BIG = 200 * 1024 * 1024

# Variables that would change how the tool behaves or renders.
_SCRUBBED = (
    "CONDUIT_PASSWORD",
    "CONDUIT_ADDRESS",
    "FORCE_COLOR",
    "TTY_COMPATIBLE",
    "TTY_INTERACTIVE",
)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
    env.update(extra)
    return env


def conduit(
    *args: str,
    password: str | None = PASSWORD,
    cwd: Path | None = None,
    timeout: float = RUN_TIMEOUT,
    environment: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m conduit ARGS`` to completion, stdin not a terminal
    (``environment``: variables to set besides)."""
    env = _env(CONDUIT_PASSWORD=password) if password is not None else _env()
    env.update(environment or {})
    return subprocess.run(
        [sys.executable, "-m", "conduit", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
    )


def conduit_json(*args: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    result = conduit(*args, "--json", **kwargs)
    try:
        return result.returncode, json.loads(result.stdout)
    except json.JSONDecodeError:
        raise AssertionError(
            f"not one JSON document: {result.stdout!r} {result.stderr!r}"
        ) from None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_random(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as file:
        left = size
        while left:
            block = os.urandom(min(left, 1 << 20))
            file.write(block)
            left -= len(block)
    return path


def visible_files(root: Path) -> dict[str, bytes]:
    """Relative name -> content of every non-hidden file under ``root``."""
    found = {}
    for path in root.rglob("*"):
        relative = path.relative_to(root)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            found[relative.as_posix()] = path.read_bytes()
    return found


def partial_files(root: Path) -> list[Path]:
    return [p for p in root.rglob(f"{PARTIAL_PREFIX}*") if p.is_file()]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------- server fixture


@attrs.define
class ServeProcess:
    process: subprocess.Popen[bytes]
    directory: Path
    log: Path
    port: int = 0
    #: As the server prints it (an IPv6 address in brackets).
    host: str = "127.0.0.1"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_log(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.log_text())
            if match:
                return match
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} in the server log: {self.log_text()!r}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode


def start_server(
    tmp_path: Path,
    *options: str,
    password: str = PASSWORD,
    host: str = "127.0.0.1",
    open_files: tuple[int, int] | None = None,
) -> ServeProcess:
    """``conduit serve`` in a process of its own; ``open_files`` is the (soft, hard)
    limit on its descriptors it starts with."""
    directory = tmp_path / "served"
    log = tmp_path / "serve.log"
    where = ("--host", host, "--port", "0")

    def limit_descriptors() -> None:
        import resource

        assert open_files is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, open_files)

    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "conduit", "serve", str(directory), *where, *options],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            env=_env(CONDUIT_PASSWORD=password),
            preexec_fn=None if open_files is None else limit_descriptors,
        )
    printed = f"[{host}]" if ":" in host else host
    server = ServeProcess(process, directory, log, host=printed)
    try:
        match = server.wait_for_log(rf"listening on {re.escape(printed)}:(\d+)")
    except BaseException:
        server.stop()
        raise
    server.port = int(match.group(1))
    return server


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServeProcess]:
    serving = start_server(tmp_path)
    try:
        yield serving
    finally:
        serving.stop()


def make_tree(root: Path) -> Path:
    tree = root / "photos"
    (tree / "2024" / "summer").mkdir(parents=True)
    (tree / "empty dir").mkdir()
    (tree / "a.txt").write_text("hello\n")
    (tree / "empty.bin").write_bytes(b"")
    (tree / "2024" / "caf\N{LATIN SMALL LETTER E WITH ACUTE}.txt").write_text("unicode name\n")
    write_random(tree / "2024" / "summer" / "beach.raw", 3 * 1024 * 1024 + 17)
    (tree / ".secret").write_text("hidden files are skipped\n")
    return tree


# --------------------------------------------------------------------------- round trip


def test_send_tree_ls_get_round_trip(tmp_path: Path, server: ServeProcess) -> None:
    tree = make_tree(tmp_path / "src")
    sent = conduit("send", str(tree), "--to", server.address)
    assert sent.returncode == 0, sent.stderr
    assert "skipped" in sent.stdout and ".secret" in sent.stdout
    assert re.search(r"^sent +photos/2024/summer/beach\.raw ", sent.stdout, re.M), sent.stdout
    assert "4 of 4 files sent" in sent.stdout

    expected = {f"photos/{name}": data for name, data in visible_files(tree).items()}
    assert visible_files(server.directory) == expected  # the layout is kept on the server

    listed = conduit("ls", "--from", server.address)
    assert listed.returncode == 0, listed.stderr
    for name in expected:
        assert name in listed.stdout
    assert "4 files" in listed.stdout

    out = tmp_path / "out"
    got = conduit("get", "photos", "-o", str(out), "--from", server.address)
    assert got.returncode == 0, got.stderr
    assert visible_files(out) == expected  # byte-identical, same layout
    assert not partial_files(out)

    log = server.log_text()
    assert re.search(r"connect +client \w+ \(127\.0\.0\.1:\d+\)", log), log
    assert re.search(r"upload +photos/2024/summer/beach\.raw \(3\.0 MiB\) from client", log), log
    # Logged by on_file_served once the server has sent the whole file, which
    # may be a moment after the client has it: wait for the line, do not race it.
    server.wait_for_log(r"download +photos/a\.txt \(6 B\) to client")


def test_send_fails_over_an_entry_it_cannot_read(tmp_path: Path, server: ServeProcess) -> None:
    """An entry of the directory that cannot be read (here a symbolic link loop:
    ELOOP; a permission refused or an I/O error alike) was meant to be sent: the
    rest is sent, and the run says FAILED and exits 1, unlike a hidden file,
    which is left out by choice."""
    tree = tmp_path / "docs"
    tree.mkdir()
    (tree / "a.txt").write_text("a\n")
    (tree / ".hidden").write_text("left out by choice\n")
    os.symlink("loop", tree / "loop")
    sent = conduit("send", str(tree), "--to", server.address)
    assert sent.returncode == 1, (sent.stdout, sent.stderr)
    assert re.search(r"^FAILED +\S*docs/loop: cannot read", sent.stdout, re.M), sent.stdout
    assert re.search(r"^skipped +\S*docs/\.hidden", sent.stdout, re.M), sent.stdout
    assert visible_files(server.directory) == {"docs/a.txt": b"a\n"}

    code, document = conduit_json("send", str(tree), "--to", server.address)
    assert code == 1 and document["ok"] is False, document
    reasons = {Path(entry["local"]).name: entry["failed"] for entry in document["skipped"]}
    assert reasons == {"loop": True, ".hidden": False}, document["skipped"]


def test_address_from_the_environment(tmp_path: Path, server: ServeProcess) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "conduit", "ls"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=_env(CONDUIT_PASSWORD=PASSWORD, CONDUIT_ADDRESS=server.address),
        timeout=RUN_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    assert "no files" in result.stdout


def test_json_documents(tmp_path: Path, server: ServeProcess) -> None:
    source = write_random(tmp_path / "data" / "report.bin", 100_000)
    code, sent = conduit_json("send", str(source), "--as", "reports/q1.bin", "--to", server.address)
    assert code == 0, sent
    assert sent["command"] == "send" and sent["ok"] is True and sent["interrupted"] is False
    assert sent["server"] == server.address and sent["skipped"] == []
    (entry,) = sent["files"]
    assert entry["name"] == "reports/q1.bin" and entry["local"] == str(source)
    assert entry["success"] is True and entry["path"] == "reports/q1.bin"
    assert entry["size"] == 100_000 and entry["checksum"] == sha256(source)
    assert entry["resumed_from"] == 0 and entry["elapsed"] >= 0 and entry["speed"] >= 0

    code, listing = conduit_json("ls", "--from", server.address)
    assert code == 0 and listing["command"] == "ls" and listing["ok"] is True
    (file,) = listing["files"]
    assert file["name"] == "reports/q1.bin" and file["size"] == 100_000
    assert abs(file["modified"] - time.time()) < 3600

    out = tmp_path / "out"
    code, got = conduit_json(
        "get", "reports", "missing.bin", "-o", str(out), "--from", server.address
    )
    assert code == 1  # one of the two failed
    assert got["command"] == "get" and got["ok"] is False
    by_name = {f["name"]: f for f in got["files"]}
    fetched, missing = by_name["reports/q1.bin"], by_name["missing.bin"]
    assert fetched["success"] is True and fetched["checksum"] == sha256(source)
    assert Path(fetched["path"]) == (out / "reports" / "q1.bin").resolve()
    assert (out / "reports" / "q1.bin").read_bytes() == source.read_bytes()
    assert missing["success"] is False and missing["code"] == "not_found" and missing["error"]


def test_a_window_limit_reaches_the_descriptors_of_serve_and_get(tmp_path: Path) -> None:
    # --max-receive-window: serve's uploads, get's downloads; the library's
    # default (None: eight windows) when it is not given.
    window = parse_size("4M")
    served, _ = build_server(
        ServeOptions(tmp_path / "s", "127.0.0.1", 0, PASSWORD, max_receive_window=window)
    )
    assert served.descriptor.max_receive_window == window
    default, _ = build_server(ServeOptions(tmp_path / "d", "127.0.0.1", 0, PASSWORD))
    assert default.descriptor.max_receive_window is None
    address = Address("127.0.0.1", 1)
    fixed = client_descriptor(ClientOptions(address, PASSWORD, max_receive_window=window))
    assert fixed.max_receive_window == window
    assert client_descriptor(ClientOptions(address, PASSWORD)).max_receive_window is None
    with pytest.raises(CLIError, match="max_receive_window"):
        client_descriptor(ClientOptions(address, PASSWORD, max_receive_window=window // 4))


def test_serve_limits_reach_the_descriptor_and_default_to_the_librarys(tmp_path: Path) -> None:
    limits = ServeLimits(
        max_connections=10,
        max_connections_per_user=2,
        idle_timeout=5.5,
        receive_budget=parse_size("64M"),
        call_budget=parse_size("32M"),
        user_call_budget=parse_size("16M"),
    )
    served, _ = build_server(ServeOptions(tmp_path / "s", "127.0.0.1", 0, PASSWORD, limits=limits))
    given = served.descriptor
    assert (given.max_connections, given.max_connections_per_user, given.idle_timeout) == (
        10,
        2,
        5.5,
    )
    assert (given.server_receive_budget, given.server_call_budget) == (64 << 20, 32 << 20)
    assert given.user_call_budget == given.call_budget_per_user == 16 << 20
    default, _ = build_server(ServeOptions(tmp_path / "d", "127.0.0.1", 0, PASSWORD))
    library = ServerDescriptor(password=PASSWORD)
    for name in (
        "max_connections",
        "max_connections_per_user",
        "idle_timeout",
        "server_receive_budget",
        "server_call_budget",
        "user_call_budget",
    ):
        assert getattr(default.descriptor, name) == getattr(library, name), name


async def test_serve_refuses_a_connection_over_the_users_limit_and_closes_an_idle_one(
    tmp_path: Path,
) -> None:
    # With a shared password, "a user" is one client address: the test's held
    # connection leaves no room for the CLI's from the same address.
    serving = start_server(tmp_path, "--max-connections-per-user", "1", "--idle-timeout", "1")
    try:
        descriptor = ClientDescriptor(
            server_host="127.0.0.1",
            server_port=serving.port,
            password=PASSWORD,
            reconnect_enabled=False,
        )
        async with Client(descriptor) as held:
            # Kept busy while the CLI is refused, so that its idleness cannot
            # end it first: a listing every 0.2 s (at most 600 of them).
            async def keep_busy() -> None:
                for _ in range(600):
                    await held.call("file_list")
                    await trio.sleep(0.2)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(keep_busy)
                refused = await trio.to_thread.run_sync(
                    functools.partial(conduit, "ls", "--from", serving.address)
                )
                nursery.cancel_scope.cancel()
            assert refused.returncode == 4, refused.stdout
            assert "already holds all the connections it may (max_connections_per_user=1)" in (
                refused.stderr
            )
            assert "Traceback" not in refused.stderr
            # Left alone, it is closed after its second of idleness (bounded
            # by the wait below), and the address may connect again.
            with trio.fail_after(30):
                await held.wait_closed()
            assert not held.connected
        await trio.to_thread.run_sync(serving.wait_for_log, r"disconnect client \w+ .* after")
        code, listed = await trio.to_thread.run_sync(
            functools.partial(conduit_json, "ls", "--from", serving.address)
        )
        assert code == 0 and listed["ok"] is True, listed
    finally:
        serving.stop()


def test_fixed_windows_from_the_command_line_move_files_both_ways(tmp_path: Path) -> None:
    serving = start_server(tmp_path, "--max-receive-window", "4M")
    try:
        source = write_random(tmp_path / "f.bin", 9 * 1024 * 1024)
        code, sent = conduit_json("send", str(source), "--to", serving.address)
        assert code == 0 and sent["files"][0]["success"] is True
        out = tmp_path / "out"
        code, got = conduit_json(
            "get", "f.bin", "-o", str(out), "--from", serving.address, "--max-receive-window", "4M"
        )
        assert code == 0 and got["files"][0]["checksum"] == sha256(source)
        assert (out / "f.bin").read_bytes() == source.read_bytes()
        # Under the window it opens with, or over the most it grows to by
        # default: a usage error, before any password or connection.
        for size in ("1M", "64M"):
            refused = conduit(
                "get",
                "f.bin",
                "-o",
                str(tmp_path / "r"),
                "--from",
                serving.address,
                "--max-receive-window",
                size,
                password=None,
                timeout=30,
            )
            assert refused.returncode == 2, refused.stderr
            assert f"'--max-receive-window': {size} is outside 4M" in refused.stderr
        assert not (tmp_path / "r").exists()
    finally:
        serving.stop()


def test_too_large_is_a_failed_transfer(tmp_path: Path) -> None:
    serving = start_server(tmp_path, "--max-file-size", "1K")
    try:
        small = write_random(tmp_path / "small.bin", 1000)
        large = write_random(tmp_path / "large.bin", 2048)
        code, sent = conduit_json("send", str(small), str(large), "--to", serving.address)
        assert code == 1
        results = {f["name"]: f for f in sent["files"]}
        assert results["small.bin"]["success"] is True
        assert results["large.bin"]["success"] is False
        assert results["large.bin"]["code"] == "too_large"
    finally:
        serving.stop()


# --------------------------------------------------------------------------- errors


def test_wrong_password_exits_3(tmp_path: Path, server: ServeProcess) -> None:
    result = conduit("ls", "--from", server.address, password="not the password")
    assert result.returncode == 3, (result.stdout, result.stderr)
    assert "refused the password" in result.stderr and "CONDUIT_PASSWORD" in result.stderr
    assert "Traceback" not in result.stderr
    server.wait_for_log(r"warning: authentication failed from")

    code, document = conduit_json("ls", "--from", server.address, password="still wrong")
    assert code == 3
    assert document["ok"] is False and document["exit_code"] == 3 and document["error"]


def test_no_server_exits_4(tmp_path: Path) -> None:
    port = free_port()
    for command in (["ls"], ["get", "x"]):
        result = conduit(*command, "--from", f"127.0.0.1:{port}")
        assert result.returncode == 4, (result.stdout, result.stderr)
        assert f"cannot connect to 127.0.0.1:{port}" in result.stderr
        assert "Traceback" not in result.stderr
    source = write_random(tmp_path / "f.bin", 10)
    assert conduit("send", str(source), "--to", f"127.0.0.1:{port}").returncode == 4


def test_password_is_never_an_argument(tmp_path: Path) -> None:
    source = write_random(tmp_path / "f.bin", 10)
    for args in (
        ["send", str(source), "--password", "hunter2"],
        ["ls", "--password=hunter2"],
        ["serve", str(tmp_path / "d"), "--password", "hunter2"],
    ):
        result = conduit(*args, password=None, timeout=30)
        assert result.returncode == 2, (args, result.stderr)
        assert "CONDUIT_PASSWORD" in result.stderr and "ps" in result.stderr
    # No option and no variable, stdin not a terminal: refuse rather than hang.
    for args in (["serve", str(tmp_path / "d"), "--port", "0"], ["ls"]):
        result = conduit(*args, password=None, timeout=30)
        assert result.returncode == 2, (args, result.stderr)
        assert "no password" in result.stderr and "CONDUIT_PASSWORD" in result.stderr
    assert not (tmp_path / "d").exists()  # the server never started
    assert conduit("ls", password="").returncode == 2  # set but empty


def test_every_option_is_in_the_cli_docs() -> None:
    # docs/cli.md is where a user looks an option up: one added to a command
    # and not there is found here, by any of its names.
    text = (Path(__file__).parent.parent / "docs" / "cli.md").read_text(encoding="utf-8")
    missing = []
    commands: list[tuple[str, click.Command]] = [("conduit", cli)]
    while commands:
        path, command = commands.pop()
        if isinstance(command, click.Group):
            commands.extend((f"{path} {name}", sub) for name, sub in command.commands.items())
        for option in command.params:
            names = [*option.opts, *getattr(option, "secondary_opts", [])]
            if isinstance(option, click.Option) and not any(
                re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text) for name in names
            ):
                missing.append(f"{path} {'/'.join(names)}")
    assert not missing, missing


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    a = write_random(tmp_path / "a", 1)
    b = write_random(tmp_path / "b", 1)
    result = conduit("send", str(a), str(b), "--as", "x")
    assert result.returncode == 2 and "--as needs exactly one" in result.stderr
    assert conduit("send", str(tmp_path / "missing")).returncode == 2
    assert conduit("ls", "--from", "host:notaport").returncode == 2
    assert conduit("serve", str(tmp_path), "--max-file-size", "lots").returncode == 2
    refused = conduit(
        "serve", str(tmp_path / "w"), "--port", "0", "--max-receive-window", "1M", timeout=30
    )
    assert refused.returncode == 2 and "'--max-receive-window': 1M" in refused.stderr
    for option, value, said in (
        ("--receive-budget", "1M", "1M is less than 4M"),
        ("--call-budget", "0", "0 is less than 1 byte"),
        ("--user-call-budget", "0", "0 is less than 1 byte"),
        ("--max-connections", "0", "0 is not in the range x>=1"),
        ("--max-connections-per-user", "-1", "-1 is not in the range x>=1"),
        ("--idle-timeout", "0", "0.0 is not in the range x>0"),
        ("--idle-timeout", "nan", "nan is not a number of seconds"),
    ):
        refused = conduit("serve", str(tmp_path / "w"), "--port", "0", option, value, timeout=30)
        assert refused.returncode == 2 and f"'{option}': {said}" in refused.stderr, refused.stderr
    assert not (tmp_path / "w").exists()  # refused before the storage was made
    assert conduit("no-such-command").returncode == 2


def test_serve_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    serving = start_server(tmp_path)
    try:
        assert conduit("ls", "--from", serving.address).returncode == 0
        serving.process.send_signal(signal.SIGINT)
        assert serving.process.wait(timeout=15) == 0
        log = serving.log_text()
        assert "stopped" in log and "Traceback" not in log, log
    finally:
        serving.stop()


def _soft_descriptor_limit(pid: int) -> int:
    limits = Path(f"/proc/{pid}/limits").read_text()
    match = re.search(r"^Max open files +(\d+) +(\d+)", limits, re.M)
    assert match is not None, limits
    return int(match.group(1))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/limits")
def test_serve_raises_its_descriptor_limit_to_what_its_connections_need(tmp_path: Path) -> None:
    """A soft limit kept low for select() (1,024 by default; 256 here) would
    refuse connections and files long before ``max_connections``: serve lifts it
    to the hard limit, and says so when even that is too low."""
    (tmp_path / "roomy").mkdir()
    (tmp_path / "tight").mkdir()
    roomy = start_server(tmp_path / "roomy", open_files=(256, 4096))
    try:
        assert _soft_descriptor_limit(roomy.process.pid) == 4096
        assert "warning" not in roomy.log_text(), roomy.log_text()
    finally:
        roomy.stop()
    tight = start_server(tmp_path / "tight", open_files=(256, 512))
    try:
        assert _soft_descriptor_limit(tight.process.pid) == 512
        assert conduit("ls", "--from", tight.address).returncode == 0
        log = tight.log_text()
        assert (
            "may open only 512 files and sockets, where 1000 connections and 256 more "
            "authenticating need about 2640"
        ) in log, log
    finally:
        tight.stop()


def test_serve_over_tls(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    cert_file = tmp_path / "server.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    serving = start_server(tmp_path, "--tls-cert", str(cert_file))
    try:
        assert ", TLS" in serving.log_text()
        ok = conduit("ls", "--from", serving.address, "--tls-ca", str(ca_file))
        assert ok.returncode == 0, ok.stderr
        untrusted = conduit("ls", "--from", serving.address, "--tls")  # system CAs only
        assert untrusted.returncode == 4, untrusted.stderr
        assert "TLS handshake failed" in untrusted.stderr
        # A --tls-ca file that is no CA bundle is a configuration error, not a
        # failed connection.
        not_a_ca = tmp_path / "not-a-ca.pem"
        not_a_ca.write_text("not a certificate\n")
        unusable = conduit("ls", "--from", serving.address, "--tls-ca", str(not_a_ca))
        assert unusable.returncode == 2, (unusable.returncode, unusable.stderr)
        assert f"tls_ca_file '{not_a_ca}' cannot be used" in unusable.stderr
        assert "Traceback" not in unusable.stderr
    finally:
        serving.stop()


@pytest.mark.parametrize("files", [3, 3_000], ids=["at-exit", "mid-listing"])
def test_output_into_a_reader_that_went_away_ends_quietly(server: ServeProcess, files: int) -> None:
    # `conduit ls | head -1`: the reader closes the pipe; a small listing
    # meets it when stdout is flushed at the end, a long one mid-way.
    served = server.directory
    served.mkdir(exist_ok=True)
    for index in range(files):
        (served / f"file-{index:05}.txt").write_text("x")
    process = subprocess.Popen(
        [sys.executable, "-m", "conduit", "ls", "--from", server.address],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(CONDUIT_PASSWORD=PASSWORD),
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # as `head` does once it has its line
    errors = process.stderr.read().decode()
    assert process.wait(timeout=RUN_TIMEOUT) == 141, errors
    assert "Traceback" not in errors and "Exception ignored" not in errors, errors


def test_serve_on_ipv6_prints_an_address_a_client_takes(tmp_path: Path) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    # [::1]:PORT, as --from takes it (it printed ::1:PORT, which it does not).
    serving = start_server(tmp_path, host="::1")
    try:
        assert serving.address.startswith("[::1]:")
        listed = conduit("ls", "--from", serving.address)
        assert listed.returncode == 0, listed.stderr
    finally:
        serving.stop()


def test_serve_with_a_certificate_whose_key_is_elsewhere_names_the_files(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    cert_only = tmp_path / "cert.pem"
    trustme.CA().issue_cert("127.0.0.1").cert_chain_pems[0].write_to_path(str(cert_only))
    storage = tmp_path / "files"
    result = conduit("serve", str(storage), "--port", "0", "--tls-cert", str(cert_only))
    assert result.returncode == 2, result.stderr
    assert f"cannot load the TLS certificate {cert_only}" in result.stderr
    assert "--tls-key" in result.stderr and "Traceback" not in result.stderr
    assert not storage.exists()  # a refused configuration leaves nothing behind


def test_serve_in_a_cluster_without_the_cluster_extra_says_what_to_install(
    tmp_path: Path,
) -> None:
    # As if redis were not installed: a package of that name that fails to import.
    blocker = tmp_path / "no-redis" / "redis"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError(\"No module named 'redis'\")\n")
    path = os.pathsep.join(filter(None, [str(blocker.parent), os.environ.get("PYTHONPATH")]))
    storage = tmp_path / "files"
    result = conduit(
        "serve",
        str(storage),
        "--port",
        "0",
        "--cluster",
        "redis://127.0.0.1:1/0",
        environment={"PYTHONPATH": path},
    )
    assert result.returncode == 2, result.stderr
    assert "(in a checkout of conduit: pip install '.[cluster]')" in result.stderr
    assert "pip install 'boto3" in result.stderr
    assert "Traceback" not in result.stderr
    assert not storage.exists()


# --------------------------------------------------------------------------- interruption


def _interrupt_when_partial(
    process: subprocess.Popen[str], where: Path, timeout: float = 60
) -> None:
    """SIGINT ``process`` once a hidden partial file under ``where`` holds 1 MiB or more."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(
                f"finished before it could be interrupted: {process.communicate()}"
            )
        sizes = []
        for path in partial_files(where):
            try:
                sizes.append(path.stat().st_size)
            except FileNotFoundError:
                continue
        if any(size >= 1 << 20 for size in sizes):
            process.send_signal(signal.SIGINT)
            return
        time.sleep(0.01)
    raise AssertionError("no partial file appeared")


def _popen(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "conduit", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(CONDUIT_PASSWORD=PASSWORD),
    )


@pytest.mark.slow
def test_ctrl_c_during_send_then_rerun_resumes(tmp_path: Path, server: ServeProcess) -> None:
    source = write_random(tmp_path / "big.bin", BIG)
    process = _popen("send", str(source), "--to", server.address, "--json")
    try:
        _interrupt_when_partial(process, server.directory)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=10)
    assert process.returncode == 130, (out, err)
    assert "Traceback" not in err, err
    first = json.loads(out)
    assert first["interrupted"] is True and first["ok"] is False
    assert first["files"][0]["code"] == "interrupted"
    # Nothing visible on the server; the hidden partial stays for the resume.
    assert visible_files(server.directory) == {}
    assert partial_files(server.directory)
    assert conduit_json("ls", "--from", server.address)[1]["files"] == []

    code, second = conduit_json("send", str(source), "--to", server.address)
    assert code == 0, second
    (entry,) = second["files"]
    assert entry["success"] is True and entry["resumed_from"] > 0
    assert entry["checksum"] == sha256(source)
    assert sha256(server.directory / "big.bin") == entry["checksum"]
    assert not partial_files(server.directory)


@pytest.mark.slow
def test_ctrl_c_during_get_then_rerun_resumes(tmp_path: Path, server: ServeProcess) -> None:
    stored = write_random(server.directory / "big.bin", BIG)
    out = tmp_path / "out"
    process = _popen("get", "big.bin", "-o", str(out), "--from", server.address)
    try:
        _interrupt_when_partial(process, out)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=10)
    assert process.returncode == 130, err
    assert "Traceback" not in err, err
    assert visible_files(out) == {}  # only the hidden partial file
    assert partial_files(out)

    code, again = conduit_json("get", "big.bin", "-o", str(out), "--from", server.address)
    assert code == 0, again
    (entry,) = again["files"]
    assert entry["success"] is True and entry["resumed_from"] > 0
    assert sha256(out / "big.bin") == sha256(stored)
    assert not partial_files(out)


# --------------------------------------------------------------------------- terminal


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pty behaviour differs")
def test_live_progress_bars_on_a_terminal(tmp_path: Path, server: ServeProcess) -> None:
    import pty

    source = write_random(tmp_path / "live.bin", 64 * 1024 * 1024)
    primary, secondary = pty.openpty()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "conduit", "send", str(source), "--to", server.address],
            stdin=secondary,
            stdout=secondary,
            stderr=secondary,
            env=_env(CONDUIT_PASSWORD=PASSWORD, TERM="xterm-256color", COLUMNS="100"),
        )
        os.close(secondary)
        chunks = []
        deadline = time.monotonic() + RUN_TIMEOUT
        while time.monotonic() < deadline:
            try:
                data = os.read(primary, 65536)
            except OSError:  # EIO: the terminal closed
                break
            if not data:
                break
            chunks.append(data)
        assert process.wait(timeout=30) == 0
    finally:
        os.close(primary)
    screen = b"".join(chunks).decode(errors="replace")
    assert "\x1b[" in screen  # drawn with terminal escapes, not plain lines
    assert "live.bin" in screen and "%" in screen and "/s" in screen
    assert "sent      live.bin" in screen and "1 of 1 files sent" in screen


def test_plain_output_when_not_a_terminal(tmp_path: Path, server: ServeProcess) -> None:
    source = write_random(tmp_path / "plain.bin", 5 * 1024 * 1024)
    result = conduit("send", str(source), "--to", server.address)
    assert result.returncode == 0
    assert "\x1b[" not in result.stdout
    lines = result.stdout.splitlines()
    assert len(lines) == 2, lines  # one line per file, one summary line, nothing redrawn
    assert lines[0].startswith("sent      plain.bin  5.0 MiB  ")
    assert lines[1].startswith("1 of 1 files sent (5.0 MiB) in ")


# --------------------------------------------------------------------------- demo


def _demo_dir(stdout: str) -> Path:
    match = re.search(r"files in (\S+)", stdout)
    assert match, stdout
    return Path(match.group(1))


def test_demo_small(tmp_path: Path) -> None:
    result = conduit("demo", "--size", "2M", "--calls", "20", password=None)
    assert result.returncode == 0, (result.stdout, result.stderr)
    out = result.stdout
    assert "everything matched" in out
    assert re.search(r"wrong password +refused", out)
    assert re.search(r"upload throughput +2\.0 MiB in .*/s", out), out
    assert re.search(r"download throughput +2\.0 MiB in .*/s", out), out
    assert re.search(r"sha256 after the round trip +identical", out), out
    assert not _demo_dir(out).exists()  # cleaned up


def test_demo_keep(tmp_path: Path) -> None:
    result = conduit("demo", "--size", "100K", "--calls", "0", "--keep", password=None)
    assert result.returncode == 0, (result.stdout, result.stderr)
    kept = _demo_dir(result.stdout)
    try:
        assert (kept / "downloads" / "random.bin").stat().st_size == 100 * 1024
        assert f"kept {kept}" in result.stdout
    finally:
        import shutil

        shutil.rmtree(kept, ignore_errors=True)


# --------------------------------------------------------------------------- dependencies


def test_a_bad_address_from_the_environment_names_the_variable() -> None:
    """Click names the option, which the user did not give: the variable is
    named too (a review, 2026-12-07)."""
    given = conduit("ls", "--from", "foo:bar")
    assert given.returncode == 2 and "not a port" in given.stderr
    assert "CONDUIT_ADDRESS" not in given.stderr
    from_environment = conduit("ls", environment={"CONDUIT_ADDRESS": "foo:bar"})
    assert from_environment.returncode == 2, from_environment.stderr
    assert "not a port: 'bar' in 'foo:bar' (from $CONDUIT_ADDRESS)" in from_environment.stderr


def test_help_does_not_claim_a_default_address_the_variable_replaced() -> None:
    """With $CONDUIT_ADDRESS set, ``--help`` said ``[default: 127.0.0.1:8080]``
    all the same (a review, 2026-12-07): the help text says both, and click
    shows no default of its own."""
    shown = conduit("ls", "--help", environment={"CONDUIT_ADDRESS": "files.example:9000"})
    assert shown.returncode == 0, shown.stderr
    text = " ".join(shown.stdout.split())
    assert "default: 127.0.0.1:8080]" not in text and "[default:" not in text, text
    assert "(default: $CONDUIT_ADDRESS, else 127.0.0.1:8080)" in text, text


def _python(program: str) -> subprocess.CompletedProcess[str]:
    """Run ``program`` with ``python -c`` in the tests' environment."""
    return subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, env=_env(), timeout=60
    )


def test_a_ctrl_c_while_the_command_starts_is_exit_130_without_a_traceback() -> None:
    """A Ctrl-C landing while the command imports its modules (half a second
    after it starts), before it handles signals itself: here an import hook
    raises it where the signal would. It printed a traceback until
    2026-12-07 (a review)."""
    program = (
        "import sys, importlib.abc\n"
        "class Interrupt(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'conduit.cli._app':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Interrupt())\n"
        "import conduit.cli\n"
        "sys.exit(conduit.cli.main(['ls']))\n"
    )
    result = _python(program)
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip() == "conduit: interrupted"


def test_missing_cli_dependencies_print_a_hint() -> None:
    program = (
        "import sys\n"
        "sys.modules['rich'] = None\n"
        "sys.modules['click'] = None\n"
        "import conduit.cli\n"
        "sys.exit(conduit.cli.main(['ls']))\n"
    )
    result = _python(program)
    assert result.returncode == 2
    # The packages themselves, as installed (conduit is not on PyPI yet:
    # 'trio-conduit[cli]' would find nothing there), and a checkout's form.
    assert result.stderr.strip().splitlines() == [
        "conduit: the command-line tool needs its extra packages: pip install "
        f"{' '.join(repr(p) for p in extra_packages('cli'))} "
        "(in a checkout of conduit: pip install '.[cli]')"
    ]
    assert any(p.startswith("click") for p in extra_packages("cli"))


def test_an_extras_requirements_are_read_whichever_quotes_the_metadata_uses() -> None:
    """hatchling writes ``extra == 'cli'``; packaging's writer ``extra == "cli"``."""
    requires = [
        "trio>=0.27",
        "click>=8.1; extra == 'cli'",
        'rich>=13.7; extra == "cli"',
        "boto3>=1.36; extra == 'cluster'",
        "clicky; extra == 'client'",
    ]
    assert requirements_of("cli", requires) == ["click>=8.1", "rich>=13.7"]
    assert requirements_of("cluster", requires) == ["boto3>=1.36"]


def test_import_conduit_does_not_import_the_cli_packages() -> None:
    program = (
        "import sys, conduit, conduit.cli\n"
        "loaded = [m for m in ('click', 'rich') if m in sys.modules]\n"
        "print(loaded)\n"
    )
    result = _python(program)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("0", 0),
        ("4096", 4096),
        ("512K", 512 * 1024),
        ("10M", 10 << 20),
        ("2G", 2 << 30),
        ("1.5g", 3 << 29),
        ("10MiB", 10 << 20),
        ("10 MB", 10 << 20),
        ("0.5K", 512),
        # Exact, where a float would round to 2**53.
        ("9007199254740993", 9007199254740993),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "not a size"),
        ("M", "not a size"),
        ("-1", "not a size"),
        ("10X", "not a size"),
        ("ten", "not a size"),
        # Not a whole number of bytes (it was rounded down: 0.5 gave 0 bytes).
        ("0.5", "whole number"),
        ("1.3K", "whole number"),
        # Beyond a 64-bit file offset (9 * 400 digits overflowed a float into a traceback).
        ("9" * 400, "too large"),
        ("8388608T", "too large"),
    ],
)
def test_parse_size_refuses(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("example.org:9000", Address("example.org", 9000)),
        ("example.org", Address("example.org", 8080)),
        (":9000", Address("127.0.0.1", 9000)),
        ("[::1]:9000", Address("::1", 9000)),
        ("[::1]", Address("::1", 8080)),
    ],
)
def test_parse_address(text: str, address: Address) -> None:
    assert parse_address(text) == address


@pytest.mark.parametrize("text", ["host:0", "host:70000", "host:x", "::1:80", "[::1"])
def test_parse_address_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_address(text)
