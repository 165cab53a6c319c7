"""The command line itself (click): options, help texts, and the hand-off to Trio.

Each command parses and checks its arguments, reads the password (before Trio
starts: :func:`getpass.getpass` blocks), then runs its ``async`` body from
:mod:`._serve`, :mod:`._transfer` or :mod:`._demo` under :func:`._common.run_trio`.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import shutil
import sys
import tempfile
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from click.core import ParameterSource

from .._groups import first_leaf
from .._version import __version__
from ..descriptors import (
    MAX_CONNECTIONS,
    RECEIVE_WINDOW,
    SERVER_CALL_BUDGET,
    SERVER_RECEIVE_BUDGET,
    window_limit,
)
from . import _demo, _serve, _transfer, _users
from ._common import (
    ADDRESS_ENV,
    CLUSTER_ENV,
    DEFAULT_ADDRESS,
    PASSWORD_ENV,
    Address,
    ClientOptions,
    CLIError,
    ExitCode,
    configure_logging,
    parse_address,
    parse_size,
    print_error,
    read_password,
    run_trio,
    size_text,
)

F = TypeVar("F", bound=Callable[..., Any])


def _size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """Option callback: ``10M``, ``2G``, ``4096`` (binary multiples)."""
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


#: The most a window grows to by default: with the window a stream opens with,
#: the range of ``--max-receive-window`` (above it, half the connection's
#: receive budget caps a window anyway, and the tool does not change the budget).
_WINDOW_LIMIT = window_limit(RECEIVE_WINDOW, None)
_MIB = 1024 * 1024


def _window(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """Option callback: a window limit from the opening window to the default limit."""
    size = _size(ctx, param, value)
    if size is not None and not RECEIVE_WINDOW <= size <= _WINDOW_LIMIT:
        raise click.BadParameter(
            f"{value} is outside {RECEIVE_WINDOW // _MIB}M (every window fixed) to "
            f"{_WINDOW_LIMIT // _MIB}M (the default)",
            ctx,
            param,
        )
    return size


def _size_at_least(
    minimum: int,
) -> Callable[[click.Context, click.Parameter, str | None], int | None]:
    """Option callback: a size (as :func:`_size`) of at least ``minimum`` bytes."""

    def check(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
        size = _size(ctx, param, value)
        if size is not None and size < minimum:
            least = size_text(minimum) + (" byte" if minimum == 1 else "")
            raise click.BadParameter(f"{value} is less than {least}", ctx, param)
        return size

    return check


def _seconds(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """Option callback: a duration (click's range checks let NaN through)."""
    if value is not None and math.isnan(value):
        raise click.BadParameter(f"{value} is not a number of seconds", ctx, param)
    return value


def _cluster_url(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Option callback: a bus URL with a password comes from the environment, never argv."""
    if (
        value is None
        or ctx.get_parameter_source(param.name or "") is not ParameterSource.COMMANDLINE
    ):
        return value
    try:
        parts = urllib.parse.urlsplit(value)
        secret = parts.password
    except ValueError:
        parts, secret = None, None  # malformed: the bus reports it with its own words
    if parts is not None and not secret:
        # redis-py also takes it from the query: redis://host/0?password=...
        query = urllib.parse.parse_qs(parts.query)
        secret = next((v[0] for k, v in query.items() if k.lower() == "password" and v[0]), None)
    if secret:
        raise click.BadParameter(
            "the URL holds a password, which every local user can read on a command line: "
            f"set ${CLUSTER_ENV} to it instead (see 'Why the password is never an option' "
            "in docs/cli.md)",
            ctx,
            param,
        )
    return value


def _address(ctx: click.Context, param: click.Parameter, value: str) -> Address:
    """Option callback: ``HOST:PORT``, ``[IPv6]:PORT``, ``HOST`` or ``:PORT``.

    A bad value taken from ``$CONDUIT_ADDRESS`` says so: click's message names
    only the option, which the user did not give (a review, 2026-12-07).
    """
    try:
        return parse_address(value)
    except ValueError as exc:
        message = str(exc)
        if ctx.get_parameter_source(str(param.name)) is click.core.ParameterSource.ENVIRONMENT:
            message = f"{message} (from ${param.envvar})"
        raise click.BadParameter(message, ctx, param) from None


_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class _ReaderGone(Exception):
    """What reads our output has gone (a BrokenPipeError, which click would
    otherwise turn into a bare exit 1)."""


class _Commands(click.Group):
    """The command group, handing a reader gone on to :func:`run` as itself."""

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command; a BrokenPipeError becomes :class:`_ReaderGone`."""
        try:
            return super().invoke(ctx)
        except BrokenPipeError as exc:
            raise _ReaderGone() from exc


@click.group(cls=_Commands, context_settings=_CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="conduit")
@click.option("-v", "--verbose", count=True, help="Also show the library's log lines (-vv: debug).")
@click.pass_context
def cli(ctx: click.Context, verbose: int) -> None:
    """Serve a directory, and send, get, list, delete and rename files over an
    encrypted, password-authenticated conduit connection.

    The password comes from the CONDUIT_PASSWORD environment variable or a
    prompt, never from the command line. Exit codes: 0 ok, 1 a transfer
    failed, 2 usage or configuration error, 3 authentication failed, 4
    connection failed, 130 interrupted, 141 the output's reader went away,
    143 terminated (SIGTERM).
    """
    ctx.obj = verbose


def _library_level(verbose: int) -> int:
    return {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)


def _client_options(direction: str) -> Callable[[F], F]:
    """``--to``/``--from``, TLS, ``--json``: shared by the client commands."""
    flag = "--to" if direction == "to" else "--from"

    def decorate(function: F) -> F:
        options = [
            click.option(
                flag,
                "address",
                callback=_address,
                metavar="HOST:PORT",
                envvar=ADDRESS_ENV,
                default=DEFAULT_ADDRESS,
                # Not shown by click: with the variable set, it showed the
                # fallback as the default all the same. The help says both.
                help=f"The server (default: ${ADDRESS_ENV}, else {DEFAULT_ADDRESS}).",
            ),
            click.option("--tls", is_flag=True, help="Use TLS and check the server's certificate."),
            click.option(
                "--tls-ca",
                type=click.Path(exists=True, dir_okay=False),
                help="CA bundle to check the server's certificate with (implies --tls).",
            ),
            click.option(
                "--json", "json_output", is_flag=True, help="Print one JSON document (scripts)."
            ),
            click.option(
                "--user",
                "username",
                metavar="NAME",
                help="Log in as this user (servers with accounts; the password is the user's).",
            ),
        ]
        for option in reversed(options):
            function = option(function)
        return function

    return decorate


def _window_option(transfers: str) -> Callable[[F], F]:
    """``--max-receive-window``: how far the windows of ``transfers`` may grow."""
    return click.option(
        "--max-receive-window",
        callback=_window,
        metavar="SIZE",
        help=(
            f"Largest the receive window of {transfers} may grow, as a long link's round "
            f"trip needs: {RECEIVE_WINDOW // _MIB}M (every window fixed) to "
            f"{_WINDOW_LIMIT // _MIB}M [default: {_WINDOW_LIMIT // _MIB}M]."
        ),
    )


_jobs_option = click.option(
    "-j",
    "--jobs",
    type=click.IntRange(1, 64),
    default=None,
    help="Files transferred at once [default: 12 of up to 1 MiB, of which 4 larger].",
)


def _connect_options(
    address: Address,
    tls: bool,
    tls_ca: str | None,
    verbose: int,
    username: str | None = None,
    max_receive_window: int | None = None,
) -> ClientOptions:
    if verbose:
        configure_logging(cli_level=logging.INFO, library_level=_library_level(verbose))
    who = f"{username}@{address}" if username else str(address)
    password = read_password(prompt=f"Password for {who}: ")
    return ClientOptions(
        address=address,
        password=password,
        tls=tls or tls_ca is not None,
        tls_ca_file=tls_ca,
        username=username,
        max_receive_window=max_receive_window,
    )


# --------------------------------------------------------------------------- serve


@cli.command(context_settings=_CONTEXT)
@click.argument("directory", metavar="DIR")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8080,
    show_default=True,
    help="Port (0: any free port; the log says which).",
)
@click.option(
    "--tls-cert",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="PEM certificate chain: serve TLS as well.",
)
@click.option(
    "--tls-key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="PEM private key (if not in --tls-cert).",
)
@click.option(
    "--max-file-size",
    callback=_size,
    metavar="SIZE",
    help="Refuse larger uploads (e.g. 10M, 2G).",
)
@click.option(
    "--overwrite", is_flag=True, help="Replace existing files instead of storing 'name (1).ext'."
)
@click.option(
    "--accounts",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help="Log users in from this accounts file (conduit user add) instead of one password.",
)
@click.option(
    "--cluster",
    "cluster_url",
    metavar="URL",
    envvar=CLUSTER_ENV,
    callback=_cluster_url,
    help=(
        "Join a cluster through this Redis/Valkey (redis://HOST:PORT/DB; default: "
        f"${CLUSTER_ENV}, where a URL with a password must come from); see docs/cluster.md."
    ),
)
@click.option(
    "--node-name",
    metavar="NAME",
    help="This node's name in the cluster (default: HOST-PID-RANDOM).",
)
@_window_option("an upload")
@click.option(
    "--max-connections",
    type=click.IntRange(1),
    metavar="N",
    help=(
        f"Connections served at once, in the handshake or logged in [default: {MAX_CONNECTIONS}]."
    ),
)
@click.option(
    "--max-connections-per-user",
    type=click.IntRange(1),
    metavar="N",
    help=(
        "Connections one user (with a shared password: one client address) may hold "
        "[default: a quarter of --max-connections]."
    ),
)
@click.option(
    "--idle-timeout",
    type=click.FloatRange(0, min_open=True),
    callback=_seconds,
    metavar="SECONDS",
    help="Close a connection with no calls, messages or file data for this long [default: never].",
)
@click.option(
    "--receive-budget",
    callback=_size_at_least(RECEIVE_WINDOW),
    metavar="SIZE",
    help=(
        "Upload data all connections together may hold received and not yet written; "
        f"at least {size_text(RECEIVE_WINDOW)} "
        f"[default: {size_text(SERVER_RECEIVE_BUDGET)}]."
    ),
)
@click.option(
    "--call-budget",
    callback=_size_at_least(1),
    metavar="SIZE",
    help=(
        "Memory the large calls and queued messages of all connections together may "
        f"hold decoded [default: {size_text(SERVER_CALL_BUDGET)}]."
    ),
)
@click.option(
    "--user-call-budget",
    callback=_size_at_least(1),
    metavar="SIZE",
    help=(
        "The part of --call-budget one user's connections together may hold (with a "
        "shared password: one client address's) [default: a quarter of --call-budget]."
    ),
)
@click.pass_obj
def serve(
    verbose: int,
    directory: str,
    host: str,
    port: int,
    tls_cert: Path | None,
    tls_key: Path | None,
    max_file_size: int | None,
    overwrite: bool,
    accounts: Path | None,
    cluster_url: str | None,
    node_name: str | None,
    max_receive_window: int | None,
    max_connections: int | None,
    max_connections_per_user: int | None,
    idle_timeout: float | None,
    receive_budget: int | None,
    call_budget: int | None,
    user_call_budget: int | None,
) -> int:
    """Serve DIR: clients may upload into it, list it and download from it.

    DIR may be s3://BUCKET/PREFIX: files then live in that S3-compatible
    store (endpoint and credentials from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION), which several nodes of one
    --cluster can share; see docs/cluster.md.

    With --accounts, each client logs in as a user of FILE (no server
    password is asked for). Logs one line per connection, authentication
    failure, upload and download on stderr. Ctrl-C (or SIGTERM) closes every
    connection and exits 0.
    """
    store = None
    password = None
    if accounts is not None:
        store = _users.open_accounts(accounts, must_exist=True)
    else:
        password = read_password(prompt="Password for this server: ", confirm=True)
    configure_logging(
        cli_level=logging.INFO,
        library_level=_library_level(verbose),
    )
    options = _serve.ServeOptions(
        # An s3:// URL stays a string: as a Path it would lose a slash.
        directory=directory if directory.lower().startswith("s3://") else Path(directory),
        host=host,
        port=port,
        password=password,
        tls_cert=tls_cert,
        tls_key=tls_key,
        max_file_size=max_file_size,
        overwrite=overwrite,
        accounts=store,
        cluster_url=cluster_url,
        node_name=node_name,
        max_receive_window=max_receive_window,
        limits=_serve.ServeLimits(
            max_connections=max_connections,
            max_connections_per_user=max_connections_per_user,
            idle_timeout=idle_timeout,
            receive_budget=receive_budget,
            call_budget=call_budget,
            user_call_budget=user_call_budget,
        ),
    )
    return run_trio(functools.partial(_serve.serve, options=options), cancel=False)


# --------------------------------------------------------------------------- send


@cli.command(context_settings=_CONTEXT)
@click.argument(
    "sources",
    nargs=-1,
    required=True,
    type=click.Path(exists=True, path_type=Path),
    metavar="FILE_OR_DIR...",
)
@_client_options("to")
@click.option(
    "--as",
    "rename",
    metavar="NAME",
    help="Name on the server (one FILE_OR_DIR only; may contain '/').",
)
@_jobs_option
@click.pass_obj
def send(
    verbose: int,
    sources: tuple[Path, ...],
    address: Address,
    tls: bool,
    tls_ca: str | None,
    json_output: bool,
    username: str | None,
    rename: str | None,
    jobs: int | None,
) -> int:
    """Upload files; directories recursively, keeping their layout (DIR/sub/file).

    An interrupted upload resumes where it stopped when you run the same
    command again.
    """
    planned, skipped = _transfer.collect_uploads(sources, rename)
    options = _connect_options(address, tls, tls_ca, verbose, username)
    return run_trio(
        functools.partial(
            _transfer.send,
            options=options,
            jobs=planned,
            skipped=skipped,
            parallel=jobs,
            json_output=json_output,
        )
    )


# --------------------------------------------------------------------------- get


@cli.command(context_settings=_CONTEXT)
@click.argument("names", nargs=-1, required=True, metavar="NAME...")
@_client_options("from")
@click.option(
    "-o",
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    help="Directory to download into (created if needed; default: here).",
)
@click.option("--overwrite", is_flag=True, help="Replace existing local files.")
@_jobs_option
@_window_option("a download")
@click.pass_obj
def get(
    verbose: int,
    names: tuple[str, ...],
    address: Address,
    tls: bool,
    tls_ca: str | None,
    json_output: bool,
    username: str | None,
    output: Path,
    overwrite: bool,
    jobs: int | None,
    max_receive_window: int | None,
) -> int:
    """Download files; a NAME that is a directory on the server brings all of it.

    An interrupted download resumes when you run the same command again.
    """
    options = _connect_options(address, tls, tls_ca, verbose, username, max_receive_window)
    return run_trio(
        functools.partial(
            _transfer.get,
            options=options,
            names=names,
            output_dir=output,
            overwrite=overwrite,
            parallel=jobs,
            json_output=json_output,
        )
    )


# --------------------------------------------------------------------------- ls


@cli.command(context_settings=_CONTEXT)
@_client_options("from")
@click.pass_obj
def ls(
    verbose: int,
    address: Address,
    tls: bool,
    tls_ca: str | None,
    json_output: bool,
    username: str | None,
) -> int:
    """List the server's files: size, modification time, name."""
    options = _connect_options(address, tls, tls_ca, verbose, username)
    return run_trio(functools.partial(_transfer.ls, options=options, json_output=json_output))


# --------------------------------------------------------------------------- rm, mv


@cli.command(context_settings=_CONTEXT)
@click.argument("names", nargs=-1, required=True, metavar="NAME...")
@_client_options("from")
@click.pass_obj
def rm(
    verbose: int,
    names: tuple[str, ...],
    address: Address,
    tls: bool,
    tls_ca: str | None,
    json_output: bool,
    username: str | None,
) -> int:
    """Delete files on the server (not directories, never through a link).

    A file that an upload is writing right now is refused (busy); exit 1 if
    any NAME could not be deleted.
    """
    options = _connect_options(address, tls, tls_ca, verbose, username)
    return run_trio(
        functools.partial(_transfer.rm, options=options, names=names, json_output=json_output)
    )


@cli.command(context_settings=_CONTEXT)
@click.argument("old", metavar="OLD")
@click.argument("new", metavar="NEW")
@_client_options("from")
@click.option("--overwrite", is_flag=True, help="Replace NEW if it exists.")
@click.pass_obj
def mv(
    verbose: int,
    old: str,
    new: str,
    address: Address,
    tls: bool,
    tls_ca: str | None,
    json_output: bool,
    username: str | None,
    overwrite: bool,
) -> int:
    """Rename the server's file OLD to NEW (directories in NEW are created).

    Atomic; an existing NEW is kept and the rename refused unless --overwrite.
    """
    options = _connect_options(address, tls, tls_ca, verbose, username)
    return run_trio(
        functools.partial(
            _transfer.mv,
            options=options,
            old=old,
            new=new,
            overwrite=overwrite,
            json_output=json_output,
        )
    )


# --------------------------------------------------------------------------- user

_accounts_option = click.option(
    "--accounts",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    required=True,
    help="The accounts file (created by the first 'user add').",
)


@cli.group(context_settings=_CONTEXT)
def user() -> None:
    """Manage the accounts of a 'conduit serve --accounts FILE' server.

    The file holds verifiers (SPAKE2+, Argon2id-stretched), never passwords;
    a running server sees changes at the next login.
    """


@user.command("add", context_settings=_CONTEXT)
@click.argument("name")
@_accounts_option
@click.option("--root", metavar="DIR", help="The user's directory in DIR (default: NAME).")
@click.option(
    "--quota", callback=_size, metavar="SIZE", help="Bytes the user may store (e.g. 500M, 2G)."
)
@click.option(
    "--read-only",
    is_flag=True,
    help="The user may list and download, not upload, delete or rename.",
)
def user_add(
    name: str, accounts: Path, root: str | None, quota: int | None, read_only: bool
) -> int:
    """Add user NAME; its password comes from CONDUIT_PASSWORD or a prompt."""
    return _users.add(
        accounts,
        name,
        lambda: read_password(prompt=f"Password for user {name}: ", confirm=True),
        root=root,
        quota=quota,
        read_only=read_only,
    )


@user.command("remove", context_settings=_CONTEXT)
@click.argument("name")
@_accounts_option
def user_remove(name: str, accounts: Path) -> int:
    """Remove user NAME (its files stay on disk)."""
    return _users.remove(accounts, name)


@user.command("passwd", context_settings=_CONTEXT)
@click.argument("name")
@_accounts_option
def user_passwd(name: str, accounts: Path) -> int:
    """Give user NAME a new password (from CONDUIT_PASSWORD or a prompt); its open
    sessions end."""
    return _users.passwd(
        accounts,
        name,
        lambda: read_password(prompt=f"New password for user {name}: ", confirm=True),
    )


@user.command("list", context_settings=_CONTEXT)
@_accounts_option
def user_list(accounts: Path) -> int:
    """List the users: name, root directory, quota, read-only."""
    return _users.list_users(accounts)


# --------------------------------------------------------------------------- demo


@cli.command(context_settings=_CONTEXT)
@click.option(
    "--size",
    callback=_size,
    metavar="SIZE",
    default="256M",
    show_default=True,
    help="Size of the file sent and fetched back.",
)
@click.option("--keep", is_flag=True, help="Keep the temporary directory (its path is printed).")
@click.option(
    "--calls", type=click.IntRange(0), default=2000, show_default=True, help="RPC calls to time."
)
@click.pass_obj
def demo(verbose: int, size: int, keep: bool, calls: int) -> int:
    """A server and a client on loopback: RPC, a refused password, a file round trip."""
    if verbose:
        configure_logging(cli_level=logging.INFO, library_level=_library_level(verbose))
    workdir = Path(tempfile.mkdtemp(prefix="conduit-demo-"))
    try:
        return run_trio(functools.partial(_demo.demo, workdir=workdir, size=size, calls=calls))
    finally:
        if keep:
            print(f"conduit demo: kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


# --------------------------------------------------------------------------- entry


def _password_in_argv(argv: list[str]) -> bool:
    for arg in argv:
        if arg == "--":
            return False
        if arg == "--password" or arg.startswith("--password="):
            return True
    return False


def _reader_gone(error: BaseException) -> bool:
    """Whether ``error`` says that what reads our output has gone: a
    BrokenPipeError, alone or in a group (a command under Trio), as
    :class:`_Commands` hands it on."""
    return first_leaf(error, (BrokenPipeError, _ReaderGone)) is not None


def run(argv: list[str]) -> int:
    """Parse ``argv``, run the command, map every outcome to an exit code."""
    if _password_in_argv(argv):
        print_error(
            "conduit never takes a password on the command line (other users can read "
            f"command lines with ps); set {PASSWORD_ENV} or type it at the prompt"
        )
        return ExitCode.USAGE
    try:
        result = cli.main(args=argv, prog_name="conduit", standalone_mode=False)
        sys.stdout.flush()  # here, where a reader gone is caught, not at exit
    except click.exceptions.Abort:  # Ctrl-C or end of input at a prompt
        return ExitCode.INTERRUPTED
    except click.ClickException as exc:
        exc.show()
        return ExitCode.USAGE
    except CLIError as exc:
        print_error(exc.message)
        return exc.exit_code
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return ExitCode.INTERRUPTED
    except BaseException as exc:
        if not _reader_gone(exc):
            raise
        # The reader of our output is gone (`conduit ls | head -1`): stop, as
        # any tool would, without a traceback, and without a second one at
        # exit when Python flushes what stdout still holds.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitCode.BROKEN_PIPE
    return int(result) if isinstance(result, int) else ExitCode.OK
