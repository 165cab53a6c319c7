"""``conduit serve DIR``: a file server on a directory (or ``s3://BUCKET/PREFIX``),
with one log line per event."""

from __future__ import annotations

import logging
import ssl
import time
from pathlib import Path
from typing import Any

import attrs
import trio

from .. import Accounts, FileTransferHandler, Peer, Server, ServerDescriptor
from .._endpoint import format_address
from .._groups import first_leaf
from .._log_limit import LimitedLog
from ..errors import ConduitError
from ..transfer._space import partial_owner
from ..transfer._storage import make_directories
from ._common import CLIError, ExitCode, Signals, human_bytes, printable

log = logging.getLogger("conduit.cli.serve")

_LOOPBACK = ("127.0.0.1", "::1", "localhost")

#: The soft limit asked for when the hard limit on open descriptors is unlimited.
_UNLIMITED_DESCRIPTORS_TARGET = 65536
#: The most descriptors macOS gives one process, whatever its hard limit.
_OPEN_MAX = 10240
#: Descriptors the server needs beyond its connections' sockets: its
#: listeners, its event loop, standard streams, the accounts file.
_DESCRIPTORS_BESIDE_CONNECTIONS = 64


def _who(peer: Peer) -> str:
    user = f" user {peer.username}" if peer.username is not None else ""
    if peer.address is None:
        return f"client {peer.id}{user}"
    host, port = peer.address
    return f"client {peer.id}{user} ({host}:{port})"


@attrs.frozen
class ServeLimits:
    """The server's bounds that ``conduit serve`` was given; None keeps the library's default."""

    #: ``ServerDescriptor.max_connections``.
    max_connections: int | None = None
    #: ``ServerDescriptor.max_connections_per_user``.
    max_connections_per_user: int | None = None
    #: ``ServerDescriptor.idle_timeout`` (the library's default: never).
    idle_timeout: float | None = None
    #: ``ServerDescriptor.server_receive_budget``.
    receive_budget: int | None = None
    #: ``ServerDescriptor.server_call_budget``.
    call_budget: int | None = None
    #: ``ServerDescriptor.user_call_budget``.
    user_call_budget: int | None = None

    def descriptor_fields(self) -> dict[str, Any]:
        """The descriptor's fields these set, by name: only those given (``Any``:
        the fields differ in type, and the descriptor's validators check each)."""
        named = {
            "max_connections": self.max_connections,
            "max_connections_per_user": self.max_connections_per_user,
            "idle_timeout": self.idle_timeout,
            "server_receive_budget": self.receive_budget,
            "server_call_budget": self.call_budget,
            "user_call_budget": self.user_call_budget,
        }
        return {name: value for name, value in named.items() if value is not None}


@attrs.frozen
class ServeOptions:
    """What ``conduit serve`` was asked to do."""

    #: The storage directory, or an ``s3://BUCKET/PREFIX`` URL (a str).
    directory: Path | str
    host: str
    port: int
    #: The shared password; None with ``accounts``.
    password: str | None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_file_size: int | None = None
    overwrite: bool = False
    #: Log users in from these accounts instead of one password.
    accounts: Accounts | None = None
    cluster_url: str | None = None
    node_name: str | None = None
    #: The largest a transfer's receive window may grow (see
    #: ``ServerDescriptor.max_receive_window``); None: the library's default.
    max_receive_window: int | None = None
    #: Connections, idleness and memory; the library's defaults where not given.
    limits: ServeLimits = ServeLimits()


def build_server(options: ServeOptions) -> tuple[Server, FileTransferHandler]:
    """The server and its transfer handler, with the logging hooks; fails early on bad config."""
    if options.tls_key is not None and options.tls_cert is None:
        raise CLIError("--tls-key needs --tls-cert")
    try:
        descriptor = ServerDescriptor(
            host=options.host,
            port=options.port,
            password=options.password,
            accounts=options.accounts,
            name="conduit-serve",
            tls_certfile=str(options.tls_cert) if options.tls_cert else None,
            tls_keyfile=str(options.tls_key) if options.tls_key else None,
            cluster_url=options.cluster_url,
            node_name=options.node_name,
            max_receive_window=options.max_receive_window,
            **options.limits.descriptor_fields(),
        )
        descriptor.build_ssl_context()  # a bad certificate or key fails now, not per client
    except ssl.SSLError as exc:
        key = f"the key in {options.tls_key}" if options.tls_key else "its key in the same file"
        raise CLIError(
            f"cannot load the TLS certificate {options.tls_cert} and {key}: {exc} "
            "(a key in a file of its own needs --tls-key; both in PEM)"
        ) from None
    except (ValueError, OSError) as exc:
        raise CLIError(f"invalid server configuration: {exc}") from None
    try:
        server = Server(descriptor)  # a cluster without its extra installed fails here
    except ValueError as exc:
        raise CLIError(f"invalid server configuration: {exc}") from None
    try:
        transfer = FileTransferHandler(
            options.directory, max_file_size=options.max_file_size, overwrite=options.overwrite
        )
    except ValueError as exc:  # a malformed s3:// URL, or no S3 client installed
        raise CLIError(f"cannot use {options.directory} as the storage: {exc}") from None
    transfer.register_server_handlers(server)
    # A failed download is a line a client causes at will (a name that is not
    # there, asked again and again): under a budget per owner, as the
    # library's own lines of that kind. The lines of work done are the log's
    # point, one per file. (The hooks run in the server's Trio tasks.)
    failures = LimitedLog(log)

    @server.on_client_connect
    def connect(peer: Peer) -> None:
        log.info("connect    %s as %r", _who(peer), peer.name)

    @server.on_client_disconnect
    def disconnect(peer: Peer) -> None:
        # Why, too: a session the server ended (an account removed or
        # changed, an idle timeout) looked like any other. The reason may be
        # the client's own text (its goodbye's): shown escaped.
        reason = peer.close_reason or "connection closed"
        log.info(
            "disconnect %s after %.1f s (%s)",
            _who(peer),
            time.time() - peer.connected_at,
            printable(reason),
        )

    @transfer.on_file_received
    def received(peer: Peer, filepath: str, metadata: dict[str, Any]) -> None:
        stored = metadata["filename"]
        original = metadata["original_name"]
        renamed = f" (stored as {stored})" if stored != original else ""
        resumed = int(metadata.get("resumed_from", 0))
        note = f", resumed at {human_bytes(resumed)}" if resumed else ""
        log.info(
            "upload     %s%s (%s) from %s%s",
            original,
            renamed,
            human_bytes(int(metadata["size"])),
            _who(peer),
            note,
        )

    @transfer.on_file_served
    def served(peer: Peer, name: str, metadata: dict[str, Any]) -> None:
        if not metadata["success"]:
            # repr: a refused name is the client's raw text, never to be
            # written into the log as is.
            failures.warning(
                partial_owner(peer),
                trio.current_time(),
                "download   %r for %s failed: %s",
                name,
                _who(peer),
                metadata["error"],
            )
            return
        resumed = int(metadata.get("resumed_from", 0))
        note = f", resumed at {human_bytes(resumed)}" if resumed else ""
        log.info(
            "download   %s (%s) to %s%s",
            name,
            human_bytes(int(metadata["size"])),
            _who(peer),
            note,
        )

    return server, transfer


async def _start(nursery: trio.Nursery, server: Server, options: ServeOptions) -> None:
    """Start serving; a port that cannot be bound or a cluster that cannot be joined is a
    :class:`CLIError`."""
    try:
        await nursery.start(server.run)
    except OSError as exc:
        raise CLIError(
            f"cannot listen on {options.host}:{options.port}: {exc.strerror or exc}",
            ExitCode.CONNECTION_FAILED,
        ) from None
    except (ConduitError, BaseExceptionGroup) as exc:
        # The cluster bus failed to start (Redis unreachable, node name in
        # use): alone, or beside other failures, in a group.
        problem = exc if isinstance(exc, ConduitError) else first_leaf(exc, ConduitError)
        if problem is None:
            raise
        raise CLIError(f"cannot join the cluster: {problem}", ExitCode.CONNECTION_FAILED) from None


def _make_storage(options: ServeOptions) -> None:
    """Create the storage directory, once the server listens: a configuration
    refused, a port in use or a host that cannot be bound leave nothing behind
    (until 2026-12-07 the last two left the directory, a review found)."""
    if isinstance(options.directory, Path):
        try:
            make_directories(options.directory, 0o755)
        except OSError as exc:
            raise CLIError(
                f"cannot use {options.directory} as the storage directory: {exc}"
            ) from None


def raise_descriptor_limit() -> int | None:
    """Raise this process's soft limit on open descriptors to its hard limit; the new limit.

    The soft limit is commonly 1,024, kept low for programs that use
    ``select()``, which Trio does not: systemd's documentation of
    ``LimitNOFILE=`` asks programs that need more to raise it themselves, and a
    server with the default ``max_connections`` (1,000) needs more. None where
    there is no such limit (Windows) or it cannot be read.
    """
    try:
        import resource
    except ImportError:  # Windows
        return None
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return None
    if soft == resource.RLIM_INFINITY:
        return None
    wanted = _UNLIMITED_DESCRIPTORS_TARGET if hard == resource.RLIM_INFINITY else hard
    # macOS refuses more than its per-process cap (OPEN_MAX, 10,240) whatever
    # the hard limit says: that is the next best.
    for target in (wanted, min(wanted, _OPEN_MAX)):
        if soft >= target:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError):
            continue
        return target
    return soft


async def serve(signals: Signals, options: ServeOptions) -> int:
    """Serve until Ctrl-C or SIGTERM, then close every connection and return 0."""
    server, transfer = build_server(options)
    descriptors = raise_descriptor_limit()
    # The transfers of all connections hold at most half of the descriptors
    # (FileTransferHandler.max_transfers); the sockets must fit in the rest.
    sockets = (
        server.descriptor.max_connections
        + server.descriptor.max_unauthenticated
        + _DESCRIPTORS_BESIDE_CONNECTIONS
    )
    needed = 2 * sockets
    if descriptors is not None and descriptors < needed:
        log.warning(
            "this process may open only %d files and sockets, where %d connections and %d "
            "more authenticating need about %d: as many for the files of their transfers "
            "as for their sockets; raise its limit (ulimit -n, or LimitNOFILE= in a "
            "systemd unit)",
            descriptors,
            server.descriptor.max_connections,
            server.descriptor.max_unauthenticated,
            needed,
        )
    if options.accounts is not None and not len(options.accounts):
        log.warning(
            "the accounts file %s has no users yet: add one with "
            "'conduit user add NAME --accounts %s'",
            options.accounts.path,
            options.accounts.path,
        )
    if (
        options.password is not None
        and len(options.password) < 12
        and options.host not in _LOOPBACK
    ):
        log.warning(
            "the password is short (%d characters); use 12 or more random characters "
            "for a server that others can reach",
            len(options.password),
        )
    try:
        async with trio.open_nursery() as nursery:
            await _start(nursery, server, options)
            _make_storage(options)
            limit = ""
            if options.max_file_size is not None:
                limit = f", files up to {human_bytes(options.max_file_size)}"
            tls = ", TLS" if options.tls_cert else ""
            cluster = "" if server.cluster is None else f", cluster node {server.cluster.node_name}"
            addresses = ", ".join(format_address(address) for address in server.addresses)
            log.info(
                "listening on %s%s%s%s, serving %s (Ctrl-C stops)",
                addresses,
                tls,
                cluster,
                limit,
                transfer.storage_url,
            )
            await signals.event.wait()
            log.info("stopping: closing connections")
            with trio.CancelScope(shield=True):
                await server.close()
            nursery.cancel_scope.cancel()
    except* CLIError as failed:
        # Raised inside the nursery, hence in a group: run_trio wants the error itself.
        error = first_leaf(failed, CLIError)
        assert error is not None  # except* matched one
        raise error from None
    log.info("stopped")
    return ExitCode.OK
