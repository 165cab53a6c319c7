"""Configuration of servers and clients: validated attrs classes.

Every field has a sane default except the password. Values are checked when the
descriptor is created, so a typo fails at start-up with a message naming the
field, not later on the network.
"""

from __future__ import annotations

import os
import re
import ssl
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import attrs
from attrs import validators as v

from .protocol import DEFAULT_MAX_FRAME_SIZE, MAX_FRAME_SIZE, MAX_WINDOW, MIN_FRAME_SIZE, MIN_WINDOW

if TYPE_CHECKING:
    from .accounts import Accounts

__all__ = ["ClientDescriptor", "ServerDescriptor"]


def _non_empty(_inst: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    if not value:
        raise ValueError(f"{attribute.name} must not be empty")


def _listen_host(_inst: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    if not value:
        # The socket layer would take "" for every interface: an unset
        # variable in a config must not expose the server.
        raise ValueError(
            f"{attribute.name} must not be empty (every interface is spelt "
            '"0.0.0.0" for IPv4, "::" for IPv6 as well)'
        )


def _number(attribute: attrs.Attribute[Any], value: object, *, whole: bool = False) -> None:
    """TypeError naming the field for anything but a number (an int if ``whole``).

    A bool is an int to Python, never a port or a timeout to a user; a string
    from a config file would otherwise fail later, in a comparison that does
    not say which field.
    """
    kinds: tuple[type, ...] = (int,) if whole else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "a whole number" if whole else "a number"
        raise TypeError(f"{attribute.name} must be {kind}, got {value!r}")


def _port(_inst: Any, attribute: attrs.Attribute[Any], value: int) -> None:
    _number(attribute, value, whole=True)
    if not 0 <= value <= 65535:
        raise ValueError(f"{attribute.name} must be between 0 and 65535, got {value}")


def _positive(_inst: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    _number(attribute, value)
    if not value > 0:  # not "value <= 0": NaN must fail too
        raise ValueError(f"{attribute.name} must be positive, got {value}")


def _optional_positive(_inst: Any, attribute: attrs.Attribute[Any], value: float | None) -> None:
    if value is not None:
        _number(attribute, value)
    if value is not None and not value > 0:  # NaN fails too
        raise ValueError(f"{attribute.name} must be positive or None, got {value}")


def _non_negative(_inst: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    _number(attribute, value)
    if not value >= 0:  # NaN fails too
        raise ValueError(f"{attribute.name} must be 0 or more, got {value}")


def _optional_text(_inst: Any, attribute: attrs.Attribute[Any], value: object) -> None:
    """A file's path or a host name: a str, or None."""
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{attribute.name} must be a str or None, got {value!r}")


def _frame_size(_inst: Any, attribute: attrs.Attribute[Any], value: int) -> None:
    if not MIN_FRAME_SIZE <= value <= MAX_FRAME_SIZE:
        raise ValueError(
            f"{attribute.name} must be between {MIN_FRAME_SIZE} and {MAX_FRAME_SIZE}, got {value}"
        )


def _window(_inst: Any, attribute: attrs.Attribute[Any], value: int) -> None:
    if not MIN_WINDOW <= value <= MAX_WINDOW:
        raise ValueError(f"{attribute.name} must be between 64 KiB and 1 GiB, got {value}")


def _at_least(minimum: float) -> Any:
    def check(_inst: Any, attribute: attrs.Attribute[Any], value: float) -> None:
        _number(attribute, value)
        if not value >= minimum:  # written so that NaN fails too
            raise ValueError(f"{attribute.name} must be at least {minimum:g}, got {value}")

    return check


def _delay_max(instance: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if value < instance.reconnect_delay:
        raise ValueError(
            f"{attribute.name} ({value}) must not be shorter than reconnect_delay "
            f"({instance.reconnect_delay})"
        )


def _optional_password(_inst: Any, attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None:
        if not isinstance(value, str):
            raise TypeError(f"{attribute.name} must be a str, got {type(value).__name__}")
        _non_empty(_inst, attribute, value)


def _accounts(_inst: Any, attribute: attrs.Attribute[Any], value: object) -> None:
    from .accounts import Accounts

    if value is not None and not isinstance(value, (str, os.PathLike, Accounts)):
        raise TypeError(f"{attribute.name} must be a path or an Accounts, got {value!r}")


#: The window a stream opens with unless a descriptor's ``receive_window``
#: says otherwise (both descriptors' default).
RECEIVE_WINDOW = 4 * 1024 * 1024
#: ``ServerDescriptor.server_receive_budget``'s default.
SERVER_RECEIVE_BUDGET = 1024 * 1024 * 1024
#: ``ServerDescriptor.server_call_budget``'s default.
SERVER_CALL_BUDGET = 512 * 1024 * 1024
#: ``ServerDescriptor.max_connections``' default.
MAX_CONNECTIONS = 1000

#: How many times its opening window a stream's window may grow to when
#: ``max_receive_window`` is None (the default): as many windows as half the
#: default receive budget holds (32 MiB of 64), the most growth may take.
GROWTH_FACTOR = 8


def window_limit(receive_window: int, max_receive_window: int | None) -> int:
    """The most a stream's window may grow to, for a descriptor's
    ``receive_window`` and ``max_receive_window`` (None: :data:`GROWTH_FACTOR`
    windows, never over the protocol's largest); ``receive_window`` itself
    when it may not grow."""
    if max_receive_window is None:
        return min(GROWTH_FACTOR * receive_window, MAX_WINDOW)
    return max_receive_window


def _max_receive_window(instance: Any, attribute: attrs.Attribute[Any], value: int | None) -> None:
    if value is None:
        return
    if type(value) is not int or not instance.receive_window <= value <= MAX_WINDOW:
        raise ValueError(
            f"{attribute.name} must be None or an int from receive_window "
            f"({instance.receive_window}) to 1 GiB, got {value!r}"
        )


def _receive_budget(instance: Any, attribute: attrs.Attribute[Any], value: int) -> None:
    if value < instance.receive_window:
        raise ValueError(
            f"{attribute.name} must be at least receive_window ({instance.receive_window}), "
            f"got {value}"
        )


_CLUSTER_SCHEMES = ("redis", "rediss", "unix")
_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def _cluster_url(_inst: Any, attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is None:
        return
    if not isinstance(value, str) or urlsplit(value).scheme.lower() not in _CLUSTER_SCHEMES:
        raise ValueError(
            f"{attribute.name} must be a redis://, rediss:// or unix:// URL, got {value!r}"
        )


def _needs_cluster(instance: Any, attribute: attrs.Attribute[Any], value: object) -> None:
    # A cluster setting without a cluster is a mistake worth failing on at start-up.
    if value is not None and instance.cluster_url is None:
        raise ValueError(f"{attribute.name} needs cluster_url")


def _node_name(_inst: Any, attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None and (not isinstance(value, str) or not _NODE_NAME.fullmatch(value)):
        raise ValueError(
            f"{attribute.name} must be 1-63 letters, digits, '.', '_' or '-' "
            f"(starting with a letter or digit), got {value!r}"
        )


def _cluster_ttl(_inst: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    _number(attribute, value)
    if not 0.3 <= value <= 30.0:
        raise ValueError(f"{attribute.name} must be between 0.3 and 30 seconds, got {value}")


def _cluster_staging(_inst: Any, attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is None:
        return
    # Imported here: conduit.cluster.location is light (no boto3), but a server
    # without a cluster should not even load that.
    from .cluster.location import parse_s3_url

    try:
        parse_s3_url(value)
    except ValueError as exc:
        raise ValueError(f"{attribute.name}: {exc}") from None


def _heartbeat_pair(instance: Any, _attribute: attrs.Attribute[Any], value: float) -> None:
    if instance.heartbeat_interval > 0 and value <= instance.heartbeat_interval:
        raise ValueError("heartbeat_timeout must be longer than heartbeat_interval")


@attrs.frozen(kw_only=True)
class ServerDescriptor:
    """How a :class:`~conduit.Server` listens, authenticates and limits its clients.

    Give ``password`` (one secret shared by every client, SPAKE2) or
    ``accounts`` (per-user verifiers, SPAKE2+; see :class:`~conduit.Accounts`),
    not both. The password never leaves this process and is left out of
    ``repr()`` so it does not end up in logs.
    """

    #: The shared secret clients must prove they know (never logged). Required
    #: unless ``accounts`` is given.
    password: str | None = attrs.field(default=None, validator=_optional_password, repr=False)
    #: User accounts (a path to an accounts file, or an :class:`~conduit.Accounts`):
    #: each client logs in as a user, and the server stores only verifiers.
    accounts: str | os.PathLike[str] | Accounts | None = attrs.field(
        default=None, validator=_accounts
    )
    #: Address to bind; "0.0.0.0" (the default, as netconduit's) is every IPv4
    #: interface, "::" every IPv6 one (an empty one is refused rather than
    #: taken for every interface). Give "127.0.0.1" for a server only this
    #: machine may reach (``conduit serve``'s default).
    host: str = attrs.field(default="0.0.0.0", validator=[v.instance_of(str), _listen_host])
    #: Port to bind; 0 picks a free one (read it back from ``Server.port``).
    port: int = attrs.field(default=8080, validator=[v.instance_of(int), _port])
    #: Name reported to clients.
    name: str = attrs.field(default="conduit-server", validator=v.instance_of(str))
    #: Connections (authenticated or still in the handshake) served at once.
    max_connections: int = attrs.field(
        default=MAX_CONNECTIONS, validator=[v.instance_of(int), _positive]
    )
    #: Authenticated connections one user may hold at once (in shared-password
    #: mode: one address, as the password throttle counts addresses); more are
    #: refused with code "busy" (an address at its hello, before any password
    #: work; a user once its password checked, so that a stranger learns
    #: nothing of the account). None: a quarter of ``max_connections``, so
    #: that no one user, or host, can take every slot. Handshakes in flight
    #: may pass it by a few (the throttle bounds them). A client resuming its
    #: own session is let in past it: it replaces its old connection.
    max_connections_per_user: int | None = attrs.field(
        default=None, validator=v.optional([v.instance_of(int), _positive])
    )
    #: Largest frame this side accepts; peers never send more in one frame.
    max_frame_size: int = attrs.field(
        default=DEFAULT_MAX_FRAME_SIZE, validator=[v.instance_of(int), _frame_size]
    )
    #: Bytes a peer may send on one data stream before we grant more, at first.
    receive_window: int = attrs.field(
        default=RECEIVE_WINDOW, validator=[v.instance_of(int), _window]
    )
    #: Let a stream's window (an upload's) grow up to this where the link's
    #: round trip needs more bytes in flight than ``receive_window`` (a window
    #: per round trip caps a stream at window / round trip: 4 MiB over 80 ms
    #: is 52 MB/s); within half of ``connection_receive_budget``, never over a
    #: round trip under 20 ms, and not past the doubling after which the
    #: link's queue stands. None (the default): 8 times ``receive_window``
    #: (32 MiB). ``receive_window`` itself: the window never grows (calls on a
    #: connection then wait behind less of a transfer over a long link).
    max_receive_window: int | None = attrs.field(default=None, validator=_max_receive_window)
    #: Seconds a new connection has to finish the (TLS and) password handshake.
    auth_timeout: float = attrs.field(default=10.0, validator=_positive)
    #: Close connections with no calls, messages or data for this long (never
    #: when None). Data counts either way: a peer taking a download of ours
    #: (its credit for more) is not idle.
    idle_timeout: float | None = attrs.field(default=None, validator=_optional_positive)
    #: Seconds between pings; 0 disables heartbeats.
    heartbeat_interval: float = attrs.field(default=15.0, validator=_non_negative)
    #: Close a connection whose peer has sent nothing for this long, or has
    #: taken none of the bytes we wait to send it for this long (twice as long
    #: while a stream of ours waits for its credit, or a call of ours for its
    #: answer, and it sends only PINGs).
    heartbeat_timeout: float = attrs.field(default=45.0, validator=[_positive, _heartbeat_pair])
    #: Calls from one client running at once; more are refused with code "overloaded".
    max_concurrent_calls: int = attrs.field(default=128, validator=[v.instance_of(int), _positive])
    #: Data streams (uploads, downloads, pushes) open at once on one connection;
    #: one more is refused with code "too_many_streams".
    max_streams_per_connection: int = attrs.field(
        default=64, validator=[v.instance_of(int), _positive]
    )
    #: Bytes of receive credit all inbound data streams of one connection may
    #: hold together (each holds ``receive_window``): the memory one peer can
    #: make this side buffer. A stream that would exceed it is refused with
    #: code "too_many_streams". At least ``receive_window``.
    connection_receive_budget: int = attrs.field(
        default=64 * 1024 * 1024, validator=[v.instance_of(int), _receive_budget]
    )
    #: Bytes of data that the inbound streams of all connections together may
    #: hold: received and not yet written by their uploads. Over it, every
    #: connection with an upload coming in stops reading its socket until the
    #: uploads have written enough (its peer then waits, as TCP makes it);
    #: connections with no upload coming in read on. Each connection's own
    #: share is bounded by ``connection_receive_budget``; this bounds the
    #: server, whatever the number of connections. At least ``receive_window``.
    server_receive_budget: int = attrs.field(
        default=SERVER_RECEIVE_BUDGET, validator=[v.instance_of(int), _receive_budget]
    )
    #: Bytes that the arguments of the large calls running (over 64 KiB decoded)
    #: and the messages queued for the message handlers, of all connections
    #: together, may hold decoded (counted as ``codec.unpack_sized`` bounds
    #: them). Over it, a large call is refused with code "overloaded" (the
    #: caller may try again; smaller calls run on), and a connection
    #: with messages of its own queued reads nothing more until its message
    #: handler has finished one or there is room (a connection whose peer
    #: closes meanwhile is ended). Each connection's own share is bounded
    #: apart (32 MiB of large calls, 32 MiB of messages); this bounds the
    #: server, whatever the number of connections, to twice the budget plus
    #: what one connection holds itself (its large calls, 32 MiB or one
    #: larger call, and its messages, 32 MiB or one larger message, each up
    #: to 72 times ``max_frame_size`` by the count). Past the budget, up
    #: to twice it (the overdraft, what the connection holds itself not
    #: counted), a connection's message is let in while it has none queued,
    #: and one more while calls of the server's wait for its answers (room
    #: may otherwise never come to a connection whose handler waits for its
    #: peer); past the overdraft those wait too, until others release some.
    #: Beside it, per connection, its calls of up to 64 KiB by the count are
    #: not counted (8 MiB by the count at ``max_concurrent_calls``). No one
    #: user holds more of it than twice ``user_call_budget`` plus what one
    #: connection holds itself.
    server_call_budget: int = attrs.field(
        default=SERVER_CALL_BUDGET, validator=[v.instance_of(int), _positive]
    )
    #: Bytes of ``server_call_budget`` that the large calls and queued
    #: messages of one user's connections together may hold (in
    #: shared-password mode: of one address's, as for
    #: ``max_connections_per_user``). Over it, that user's large calls are
    #: refused with code "overloaded" and its connections' further messages
    #: wait, as over the server's budget, while the other users' run on: no
    #: one user, holding calls to a handler that waits say, can keep the
    #: server's budget full for the others. None: a quarter of
    #: ``server_call_budget``.
    user_call_budget: int | None = attrs.field(
        default=None, validator=v.optional([v.instance_of(int), _positive])
    )
    #: Default timeout of server-to-client calls, in seconds (none when None).
    rpc_timeout: float | None = attrs.field(default=30.0, validator=_optional_positive)
    #: Failed handshakes from one address, within ``auth_failure_window``,
    #: before that address is refused for ``auth_lockout`` seconds.
    auth_failure_limit: int = attrs.field(default=5, validator=[v.instance_of(int), _positive])
    #: Seconds over which failed handshakes are counted (see ``auth_failure_limit``).
    auth_failure_window: float = attrs.field(default=60.0, validator=_positive)
    #: Seconds an address is refused after too many failures.
    auth_lockout: float = attrs.field(default=30.0, validator=_positive)
    #: Accounts mode: attempts against one user (from any address) within
    #: ``auth_failure_window`` before that user is locked for ``auth_lockout``
    #: seconds, except from addresses it logged in from in the last 24 hours.
    auth_user_failure_limit: int = attrs.field(
        default=20, validator=[v.instance_of(int), _positive]
    )
    #: Handshakes whose password work (SPAKE2 / SPAKE2+ group operations) runs at
    #: once in worker threads, once handshakes competing with each other have used
    #: their share of the event loop (a quarter of its time); more wait their turn
    #: (within ``auth_timeout``), so a hello flood cannot starve authenticated
    #: clients of CPU. (A handshake alone in the gate always runs on the loop.)
    max_handshakes: int = attrs.field(default=2, validator=[v.instance_of(int), _positive])
    #: Connections not yet authenticated, from all addresses together; more are
    #: refused with code "busy" (counted apart from ``max_connections``).
    max_unauthenticated: int = attrs.field(default=256, validator=[v.instance_of(int), _positive])
    #: Connections not yet authenticated from one address: an idle-socket flood
    #: from one address cannot take the slots of the others. A connection
    #: holds its slot until the server has checked the client's confirmation,
    #: which comes after the client's ``connect()`` returned (the server
    #: confirms first): N clients connecting back to back from one address
    #: can hold up to about 2N slots for a moment.
    max_unauthenticated_per_address: int = attrs.field(
        default=32, validator=[v.instance_of(int), _positive]
    )
    #: PEM certificate chain and key: serve TLS (on top of the password handshake).
    #: Read when the server starts (:meth:`build_ssl_context`): a file that
    #: cannot be used fails :meth:`~conduit.Server.run` then, naming it.
    tls_certfile: str | None = attrs.field(default=None, validator=_optional_text)
    #: PEM private key for ``tls_certfile`` (None when the chain file holds it).
    tls_keyfile: str | None = attrs.field(default=None, validator=_optional_text)
    #: A ready SSL context instead of the two files.
    ssl_context: ssl.SSLContext | None = attrs.field(default=None, eq=False, repr=False)
    #: Join a cluster of conduit nodes through this Redis or Valkey server:
    #: ``redis://HOST:PORT/DB`` (``rediss://`` for TLS, ``redis://:PASSWORD@HOST``
    #: with a password). Client ids are then unique across the nodes,
    #: ``server.broadcast`` reaches the clients of every node and
    #: ``send_to_client`` a client connected to any node. Needs
    #: the ``cluster`` extra (``pip install '.[cluster]'`` in a checkout);
    #: see :doc:`cluster`. None: one
    #: server on its own (nothing of the cluster is imported).
    cluster_url: str | None = attrs.field(default=None, validator=_cluster_url)
    #: This node's name in the cluster: 1-63 letters, digits, ``.``, ``_``,
    #: ``-``. Two live nodes cannot share a name. None: ``HOST-PID-RANDOM``,
    #: unique per process (and per server in it).
    node_name: str | None = attrs.field(default=None, validator=[_needs_cluster, _node_name])
    #: Seconds after which a node that stopped heartbeating (killed, cut off)
    #: is forgotten with its clients; it heartbeats every third of this.
    #: Between 0.3 and 30.
    cluster_ttl: float = attrs.field(default=10.0, validator=_cluster_ttl)
    #: Prefix of every key the cluster keeps in Redis, so that several
    #: clusters can share one Redis database.
    cluster_namespace: str = attrs.field(
        default="conduit", validator=[v.instance_of(str), _non_empty, _node_name]
    )
    #: ``s3://BUCKET/PREFIX`` where a file pushed to a client of another node
    #: waits while that node collects it (objects under ``PREFIX/.conduit/staging/``,
    #: removed once delivered). Endpoint and credentials come from the standard
    #: AWS environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...). None:
    #: the transfer handler's own store when its ``storage_dir`` is
    #: ``s3://...``, else pushes to clients of other nodes fail with code
    #: ``"no_staging"``. Use the location of the file store, so one bucket
    #: holds both.
    cluster_staging: str | None = attrs.field(
        default=None, validator=[_needs_cluster, _cluster_staging]
    )

    def __attrs_post_init__(self) -> None:
        if self.password is not None and self.accounts is not None:
            raise ValueError("give ServerDescriptor a password or accounts, not both")
        if self.password is None and self.accounts is None:
            raise TypeError(
                "ServerDescriptor.__init__() missing 1 required keyword-only argument: "
                "'password' (or give accounts=)"
            )
        # Either would be ignored without a word, and the server would serve
        # plain TCP (or another certificate) where TLS was asked for.
        if self.tls_keyfile is not None and self.tls_certfile is None:
            raise ValueError("tls_keyfile needs tls_certfile (the certificate chain)")
        if self.ssl_context is not None and self.tls_certfile is not None:
            raise ValueError("give ServerDescriptor an ssl_context or tls_certfile, not both")

    @property
    def connections_per_user(self) -> int:
        """``max_connections_per_user``, or its default: a quarter of ``max_connections``."""
        if self.max_connections_per_user is not None:
            return self.max_connections_per_user
        return max(1, self.max_connections // 4)

    @property
    def call_budget_per_user(self) -> int:
        """``user_call_budget``, or its default: a quarter of ``server_call_budget``."""
        if self.user_call_budget is not None:
            return self.user_call_budget
        return max(1, self.server_call_budget // 4)

    def build_ssl_context(self) -> ssl.SSLContext | None:
        """The server-side SSL context, or None when TLS is off."""
        if self.ssl_context is not None:
            return self.ssl_context
        if self.tls_certfile is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        keyfile = self.tls_keyfile or self.tls_certfile

        def no_passphrase() -> str:
            # Called only for a key that needs one. Without it, OpenSSL would
            # prompt on the terminal, each time a context is built, or fail
            # with a bare EINVAL where there is none (a service).
            raise ValueError(
                f"the TLS key in {keyfile} is encrypted (it needs a passphrase), which "
                "conduit does not ask for: give it the key decrypted "
                "(openssl pkey -in ENCRYPTED -out PLAIN), readable by the server only"
            )

        try:
            context.load_cert_chain(self.tls_certfile, self.tls_keyfile, password=no_passphrase)
        except ssl.SSLError:
            raise  # what is wrong with their contents (`conduit serve` says which file)
        except OSError as exc:
            # A bare "[Errno 2] No such file or directory" names no file.
            files = self.tls_certfile + (f" and {self.tls_keyfile}" if self.tls_keyfile else "")
            raise ValueError(f"the TLS files {files} cannot be used: {exc}") from None
        return context


@attrs.frozen(kw_only=True)
class ClientDescriptor:
    """Where a :class:`~conduit.Client` connects and how it behaves."""

    #: The server's password, or the user's own on an accounts server
    #: (required; never sent over the wire, never logged).
    password: str = attrs.field(validator=[v.instance_of(str), _non_empty], repr=False)
    #: The account to log in as on a server with accounts; None for a
    #: shared-password server.
    username: str | None = attrs.field(
        default=None, validator=v.optional([v.instance_of(str), _non_empty])
    )
    #: Host name or address of the server.
    server_host: str = attrs.field(default="localhost", validator=[v.instance_of(str), _non_empty])
    #: Port of the server.
    server_port: int = attrs.field(default=8080, validator=[v.instance_of(int), _port])
    #: Name reported to the server.
    name: str = attrs.field(default="conduit-client", validator=v.instance_of(str))
    #: Seconds for TCP connect plus the handshake.
    connect_timeout: float = attrs.field(default=10.0, validator=_positive)
    #: Default timeout of ``client.rpc.call``, in seconds (none when None).
    rpc_timeout: float | None = attrs.field(default=30.0, validator=_optional_positive)
    #: Largest frame this side accepts; the server never sends more in one frame.
    max_frame_size: int = attrs.field(
        default=DEFAULT_MAX_FRAME_SIZE, validator=[v.instance_of(int), _frame_size]
    )
    #: Bytes the server may send on one data stream (a download, a push)
    #: before we grant more, at first.
    receive_window: int = attrs.field(
        default=RECEIVE_WINDOW, validator=[v.instance_of(int), _window]
    )
    #: Let a stream's window (a download's, a push's) grow up to this where
    #: the link's round trip needs it (see ServerDescriptor). None (the
    #: default): 8 times ``receive_window`` (32 MiB); ``receive_window``
    #: itself: the window never grows.
    max_receive_window: int | None = attrs.field(default=None, validator=_max_receive_window)
    #: Seconds between pings; 0 disables heartbeats.
    heartbeat_interval: float = attrs.field(default=15.0, validator=_non_negative)
    #: Close the connection (and reconnect, if enabled) when the server has
    #: sent nothing for this long, or has taken none of the bytes we wait to
    #: send it for this long (twice as long while a stream of ours waits for
    #: its credit, or a call of ours for its answer, and it sends only PINGs).
    heartbeat_timeout: float = attrs.field(default=45.0, validator=[_positive, _heartbeat_pair])
    #: Close the connection after this long with no calls, messages or data
    #: (never when None). Data counts either way: the server taking an
    #: upload of ours (its credit for more) is not idleness. A close of ours,
    #: as ``disconnect()``: no reconnect, and the next ``connect()`` gets a
    #: new client id.
    idle_timeout: float | None = attrs.field(default=None, validator=_optional_positive)
    #: Calls from the server running at once on this client.
    max_concurrent_calls: int = attrs.field(default=128, validator=[v.instance_of(int), _positive])
    #: Data streams (uploads, downloads, pushes) open at once on one connection;
    #: one more is refused with code "too_many_streams".
    max_streams_per_connection: int = attrs.field(
        default=64, validator=[v.instance_of(int), _positive]
    )
    #: Bytes of receive credit all inbound data streams of one connection may
    #: hold together (each holds ``receive_window``): the memory one peer can
    #: make this side buffer. A stream that would exceed it is refused with
    #: code "too_many_streams". At least ``receive_window``.
    connection_receive_budget: int = attrs.field(
        default=64 * 1024 * 1024, validator=[v.instance_of(int), _receive_budget]
    )
    #: Wrap the connection in TLS and verify the server's certificate.
    tls: bool = attrs.field(default=False, validator=v.instance_of(bool))
    #: CA bundle to verify the server with (default: the system's); turns TLS
    #: on. Loaded when the descriptor is made: a file that cannot be used is
    #: a ValueError then, not a failed connect later.
    tls_ca_file: str | None = attrs.field(default=None, validator=_optional_text)
    #: Host name to check the certificate against (default: ``server_host``);
    #: turns TLS on.
    tls_server_hostname: str | None = attrs.field(default=None, validator=_optional_text)
    #: A ready SSL context instead of ``tls``/``tls_ca_file``.
    ssl_context: ssl.SSLContext | None = attrs.field(default=None, eq=False, repr=False)
    #: Reconnect on its own when an established connection is lost (reset,
    #: timeout, heartbeat) or the server shuts down (Ctrl-C, ``close()``: it
    #: may be restarting), keeping ``client.id`` where the server still knows
    #: it; transfers in flight then resume from the verified offset. Not
    #: after ``disconnect()``, not when the server closed this connection on
    #: purpose (``peer.close()``, an idle timeout, a removed account), never
    #: after a refused password. The first ``connect()`` is not retried.
    reconnect_enabled: bool = attrs.field(default=True, validator=v.instance_of(bool))
    #: Attempts per lost connection before giving up; 0 means unlimited.
    reconnect_attempts: int = attrs.field(default=5, validator=[v.instance_of(int), _at_least(0)])
    #: Seconds before the first attempt; each later wait is multiplied by
    #: ``reconnect_delay_multiplier``, capped at ``reconnect_delay_max``, and
    #: jittered by up to -25 % so that many clients do not return in lockstep.
    reconnect_delay: float = attrs.field(default=2.0, validator=_at_least(0))
    #: The longest wait between two attempts, in seconds.
    reconnect_delay_max: float = attrs.field(default=60.0, validator=[_at_least(0), _delay_max])
    #: Growth of the wait between attempts (1 keeps it constant).
    reconnect_delay_multiplier: float = attrs.field(default=2.0, validator=_at_least(1))

    def __attrs_post_init__(self) -> None:
        if self.ssl_context is None and self.tls_ca_file is not None:
            try:
                ssl.create_default_context(cafile=self.tls_ca_file)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                raise ValueError(
                    f"tls_ca_file {self.tls_ca_file!r} cannot be used: {exc}"
                ) from None

    def reconnect_wait(self, attempt: int) -> float:
        """Seconds before reconnect ``attempt`` (1-based), before jitter."""
        exponent = min(attempt - 1, 64)  # beyond this the cap has long been reached
        return float(
            min(
                self.reconnect_delay_max,
                self.reconnect_delay * self.reconnect_delay_multiplier**exponent,
            )
        )

    def build_ssl_context(self) -> ssl.SSLContext | None:
        """The client-side SSL context, or None when TLS is off."""
        if self.ssl_context is not None:
            return self.ssl_context
        if not self.tls and self.tls_ca_file is None and self.tls_server_hostname is None:
            return None
        return ssl.create_default_context(cafile=self.tls_ca_file)
