"""What every command shares: exit codes, addresses, sizes, passwords, signals, connecting."""

from __future__ import annotations

import contextlib
import decimal
import enum
import getpass
import json
import logging
import math
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TextIO

import attrs
import trio

from .. import (
    AuthenticationError,
    AuthModeMismatch,
    Client,
    ClientDescriptor,
    ConduitError,
    ConnectionClosed,
    HandshakeTimeout,
    LockedOut,
)
from .._connect_error import describe_connect_error
from ._tls_probe import speaks_tls

PASSWORD_ENV = "CONDUIT_PASSWORD"
ADDRESS_ENV = "CONDUIT_ADDRESS"
#: ``conduit serve --cluster``'s default: where a bus URL holding a password goes.
CLUSTER_ENV = "CONDUIT_CLUSTER_URL"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_ADDRESS = f"{DEFAULT_HOST}:{DEFAULT_PORT}"


class ExitCode(enum.IntEnum):
    """The documented exit codes (docs/cli.md)."""

    OK = 0
    TRANSFER_FAILED = 1
    USAGE = 2
    AUTH_FAILED = 3
    CONNECTION_FAILED = 4
    INTERRUPTED = 130
    #: What reads the output went away (``conduit ls | head -1``): as a tool
    #: that SIGPIPE ended, quietly.
    BROKEN_PIPE = 141
    TERMINATED = 143


class CLIError(Exception):
    """A failure that ends the command with a message and an exit code, no traceback."""

    def __init__(self, message: str, exit_code: ExitCode = ExitCode.USAGE) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def printable(text: str) -> str:
    """``text`` fit for a terminal: each character that is not printable
    shown as its Python escape (``\\x1b``, ``\\u202e``, ``\\n``).

    What the server sends (an error's text and code, where it stored a
    file) reaches the terminal in these lines: an escape sequence in it
    could clear the screen, retitle the window or hide what follows, and a
    newline could make up a line of its own.
    """
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def error_line(message: str) -> str:
    """How fatal errors look on stderr (see :func:`printable`)."""
    return f"conduit: error: {printable(message)}"


def print_error(message: str) -> None:
    """Print a fatal error on stderr."""
    print(error_line(message), file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- sizes

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
#: The largest size taken (a signed 64-bit file offset).
MAX_SIZE = (1 << 63) - 1


def parse_size(text: str) -> int:
    """``"10M"`` -> 10485760. Binary multiples: K, M, G, T (optionally ``KiB``, ``MB``, ...)."""
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"not a size: {text!r} (examples: 4096, 512K, 10M, 2G)")
    number, unit = match.groups()
    # Exact decimal arithmetic: a float would round a large size silently
    # (2**53 + 1 bytes) and overflow a huge one into a traceback.
    size = decimal.Decimal(number) * _UNITS[unit.lower()]
    if size != size.to_integral_value():
        raise ValueError(f"not a whole number of bytes: {text!r} is {size} bytes")
    if size > MAX_SIZE:
        raise ValueError(f"too large: {text!r} (at most {MAX_SIZE} bytes)")
    return int(size)


def size_text(size: int) -> str:
    """``10485760`` -> ``"10M"``: a size as :func:`parse_size` reads it, in the
    largest unit that divides it exactly."""
    for unit in ("T", "G", "M", "K"):
        factor = _UNITS[unit.lower()]
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def human_bytes(size: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def human_rate(bytes_per_second: float) -> str:
    """``1048576.0`` -> ``"1.0 MiB/s"``."""
    if not math.isfinite(bytes_per_second) or bytes_per_second <= 0:
        return "-"
    return f"{human_bytes(bytes_per_second)}/s"


def human_seconds(seconds: float) -> str:
    """A duration for people: ``0.25 s``, ``3.1 s``, ``2:05``, ``1:02:03``."""
    if not math.isfinite(seconds):
        return "-"
    if seconds < 60:
        return f"{seconds:.2f} s" if seconds < 10 else f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def human_eta(seconds: float) -> str:
    """A short clock for progress bars: ``0:07``, ``12:34``, ``1:02:03``; ``-`` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "-"
    minutes, secs = divmod(math.ceil(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


# --------------------------------------------------------------------------- addresses


@attrs.frozen
class Address:
    """A server address from ``--to``/``--from``/``CONDUIT_ADDRESS``."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str) -> Address:
    """``HOST:PORT``, ``[IPv6]:PORT``, ``HOST`` (port 8080) or ``:PORT`` (127.0.0.1)."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"not an address: {text!r} (expected [IPv6]:PORT)")
        port_text = rest[1:] if rest else ""
    elif text.count(":") > 1:
        raise ValueError(f"not an address: {text!r} (write IPv6 addresses as [::1]:8080)")
    else:
        host, _, port_text = text.partition(":")
    host = host or DEFAULT_HOST
    if not port_text:
        return Address(host, DEFAULT_PORT)
    if not port_text.isdigit() or not 0 < int(port_text) <= 65535:
        raise ValueError(f"not a port: {port_text!r} in {text!r}")
    return Address(host, int(port_text))


# --------------------------------------------------------------------------- password


def read_password(*, prompt: str, confirm: bool = False) -> str:
    """The password from ``CONDUIT_PASSWORD``, or typed at a prompt; never from argv.

    Raises :class:`CLIError` (exit 2) when the variable is unset and standard
    input is not a terminal, so that a script never hangs on a prompt.
    """
    from_env = os.environ.get(PASSWORD_ENV)
    if from_env is not None:
        if not from_env:
            raise CLIError(f"{PASSWORD_ENV} is set but empty")
        return from_env
    if not sys.stdin.isatty():
        raise CLIError(
            f"no password: set {PASSWORD_ENV}, or run from a terminal to be asked for it "
            "(passwords are never taken from the command line)"
        )
    try:
        password = getpass.getpass(prompt)
        if not password:
            raise CLIError("the password must not be empty")
        if confirm and getpass.getpass("Repeat the password: ") != password:
            raise CLIError("the passwords do not match")
    except EOFError:
        raise CLIError("no password given") from None
    return password


# --------------------------------------------------------------------------- signals


class Signals:
    """Turns Ctrl-C (SIGINT) and SIGTERM into a clean Trio cancellation.

    Trio's default is a ``KeyboardInterrupt`` raised wherever the main task
    happens to be, which can land in the middle of cleanup code. Instead, the
    first signal sets :attr:`event` and cancels the innermost scope opened with
    :meth:`cancel_on_signal` (the library's cleanup then runs as it does for
    any cancellation: partial files are closed and kept for a resume), and the
    code after that scope reports what was done. A second signal exits at once.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.event = trio.Event()
        self._scopes: list[trio.CancelScope] = []

    @property
    def exit_code(self) -> ExitCode:
        """130 after SIGINT, 143 after SIGTERM."""
        return ExitCode.TERMINATED if self.received == signal.SIGTERM else ExitCode.INTERRUPTED

    @contextlib.contextmanager
    def cancel_on_signal(self) -> Iterator[trio.CancelScope]:
        """A cancel scope that the first signal cancels (if it is the innermost one)."""
        scope = trio.CancelScope()
        if self.received is not None:
            scope.cancel()
        self._scopes.append(scope)
        try:
            with scope:
                yield scope
        finally:
            self._scopes.remove(scope)

    async def watch(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run in a nursery until cancelled."""
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()
            async for signum in signals:
                if self.received is not None:
                    print("\nconduit: interrupted again, exiting now", file=sys.stderr)
                    sys.stderr.flush()
                    os._exit(self.exit_code)
                self.received = signum
                self.event.set()
                if self._scopes:
                    # Only the innermost: the code around it then reports what
                    # was done (a cancelled outer scope would swallow that too).
                    self._scopes[-1].cancel()


def _only_cli_error(group: BaseExceptionGroup[BaseException]) -> CLIError | None:
    """The CLIError a group holds, if it holds exactly that (at any depth) and nothing else."""
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
        leaf = leaf.exceptions[0]
    return leaf if isinstance(leaf, CLIError) else None


def run_trio(command: Callable[[Signals], Awaitable[int]], *, cancel: bool = True) -> int:
    """Run ``command(signals)`` under ``trio.run`` and return its exit code.

    :class:`CLIError` becomes its message and exit code. With ``cancel`` (the
    default) the first signal cancels the whole command, which then ends with
    130 (or 143) unless it returned an exit code of its own; without it the
    command waits for :attr:`Signals.event` and stops in its own way.
    """

    async def main() -> int:
        signals = Signals()
        code: int | None = None
        async with trio.open_nursery() as nursery:
            await nursery.start(signals.watch)
            with signals.cancel_on_signal() if cancel else contextlib.nullcontext():
                try:
                    code = await command(signals)
                except CLIError as exc:
                    print_error(exc.message)
                    code = exc.exit_code
                except BaseExceptionGroup as group:
                    # A CLIError raised inside a nursery arrives wrapped; it is
                    # still one expected failure, worth one line, not a traceback.
                    error = _only_cli_error(group)
                    if error is None:
                        raise
                    print_error(error.message)
                    code = error.exit_code
            nursery.cancel_scope.cancel()
        return signals.exit_code if code is None else code

    try:
        return trio.run(main)
    except KeyboardInterrupt:  # before the signal receiver was installed, or after
        return ExitCode.INTERRUPTED


# --------------------------------------------------------------------------- connecting


@attrs.frozen
class ClientOptions:
    """How client commands reach a server."""

    address: Address
    password: str
    tls: bool = False
    tls_ca_file: str | None = None
    tls_server_hostname: str | None = None
    #: The account to log in as (servers with accounts); None: shared password.
    username: str | None = None
    #: The largest a download's receive window may grow (see
    #: ``ClientDescriptor.max_receive_window``); None: the library's default.
    max_receive_window: int | None = None


def client_descriptor(options: ClientOptions) -> ClientDescriptor:
    """The descriptor of a client command's connection; a setting it refuses
    (an unusable ``--tls-ca`` file, say) is a configuration error, exit 2."""
    address = options.address
    try:
        return ClientDescriptor(
            server_host=address.host,
            server_port=address.port,
            password=options.password,
            username=options.username,
            name="conduit-cli",
            tls=options.tls,
            tls_ca_file=options.tls_ca_file,
            tls_server_hostname=options.tls_server_hostname,
            # Transfers can take long; the heartbeat notices a dead server.
            rpc_timeout=None,
            max_receive_window=options.max_receive_window,
        )
    except ValueError as exc:
        raise CLIError(str(exc)) from None


@contextlib.asynccontextmanager
async def connected(options: ClientOptions) -> AsyncIterator[Client]:
    """A connected, authenticated :class:`~conduit.Client`; failures become exit
    2 (a setting the descriptor refuses), 3 or 4."""
    address = options.address
    client = Client(client_descriptor(options))
    try:
        await client.connect()
    except HandshakeTimeout as exc:
        raise CLIError(f"cannot connect to {address}: {exc}", ExitCode.CONNECTION_FAILED) from None
    except LockedOut as exc:
        raise CLIError(
            f"{address} has locked this client out after too many failed logins; "
            f"try again in {human_seconds(exc.retry_after)} ({exc})",
            ExitCode.AUTH_FAILED,
        ) from None
    except AuthModeMismatch as exc:
        hint = "drop --user" if options.username else "log in with --user NAME"
        raise CLIError(
            f"{address} refused the login: {exc} ({hint})", ExitCode.AUTH_FAILED
        ) from None
    except AuthenticationError as exc:
        raise CLIError(
            f"{address} refused the password ({exc}); check {PASSWORD_ENV}"
            + (f" and the user name {options.username!r}" if options.username else ""),
            ExitCode.AUTH_FAILED,
        ) from None
    except (OSError, ConnectionClosed, ConduitError) as exc:
        reason = describe_connect_error(exc)
        # A TLS server hangs up on a plain HELLO without a word (see _tls_probe).
        hung_up = isinstance(exc, ConnectionClosed) and "without answering" in str(exc)
        if hung_up and not options.tls and await speaks_tls(address.host, address.port):
            reason = "the server speaks TLS; use --tls (or --tls-ca FILE)"
        raise CLIError(
            f"cannot connect to {address}: {reason}", ExitCode.CONNECTION_FAILED
        ) from None
    try:
        yield client
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(3):
            await client.disconnect()


# --------------------------------------------------------------------------- output


def emit_json(document: dict[str, Any], stream: TextIO | None = None) -> None:
    """Write one JSON document (and a newline) on stdout."""
    out = sys.stdout if stream is None else stream
    out.write(json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    out.flush()


def finite(value: Any) -> Any:
    """JSON has no infinity: None instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class _ConciseFormatter(logging.Formatter):
    """``2025-01-31 12:00:00 message``; warnings and errors say so."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        if record.levelno >= logging.WARNING:
            stamp, _, rest = line.partition(" ")
            time_part, _, message = rest.partition(" ")
            line = f"{stamp} {time_part} {record.levelname.lower()}: {message}"
        return line


def configure_logging(*, cli_level: int, library_level: int) -> None:
    """One concise handler on stderr for every ``conduit.*`` logger.

    ``conduit.cli`` (this tool's event lines) and the library's loggers get
    separate levels, so that the tool's one line per event is not doubled by
    the library's own INFO lines unless asked for with ``-v``.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_ConciseFormatter())
    root = logging.getLogger("conduit")
    root.addHandler(handler)
    root.setLevel(library_level)
    root.propagate = False
    logging.getLogger("conduit.cli").setLevel(cli_level)
