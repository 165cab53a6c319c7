"""The cluster bus: nodes, clients, inboxes and leases on Redis / Valkey.

One :class:`ClusterBus` per node. While :meth:`ClusterBus.run` runs (a
background task, ``await nursery.start(bus.run)``), the node is registered
and reads its inbox; when it stops, cleanly or not, the rest of the cluster
forgets it within ``ttl`` seconds. What lives in Redis, all under
``<namespace>:``:

* ``node:<name>``: the node's registration, a value with a random token,
  expiring after ``ttl`` and refreshed every ``ttl / 3`` by a compare-and-extend
  script, so a node that stops refreshing is forgotten within ``ttl`` and a
  second process can never refresh (or steal) another's name.
* ``client:<id>``: which node a client is connected to; created only where
  no node holds it (``SET NX``, a departed mark counting as free: client ids
  are unique in the cluster), refreshed with the node's heartbeat,
  so the clients of a dead node expire with it. A client that resumes its
  session on another node *moves* its entry there (plain ``SET``, see
  :meth:`ClusterBus.move_client`); the old node's refresh and cleanup only
  ever touch an entry that still names it (compare-and-extend,
  compare-and-set), so they cannot undo the move. A client that leaves node
  N leaves N's *departed* mark for ``ttl``, not a missing entry: a node it
  moved from that has not yet seen the move must not take its entry for one
  the bus lost (a Redis restart), which it recreates. N itself recreates its
  own mark on an entry of a client it holds again (a resume on N that landed
  before the release of the client's old session there).
* ``resume:<sha256>``: a client's resume token, by the SHA-256 of the token
  (never the token itself): the client id and a tag of the account it was
  issued to, so that any node can give a reconnecting client its id back.
  Redeemed by an atomic compare-and-delete (single use in the whole
  cluster); expires ``RESUME_TTL`` after its connection ended, or is
  deleted then if its client said goodbye for good (it forgot the token).
* ``resumes:<sha256>``: the resume tokens one owner was issued (an account,
  or with a shared password an address, by a hash of it), newest last: a
  sorted set whose oldest members go, with their ``resume:`` entries, past
  the owner's bound (:meth:`ClusterBus.share_resume`); a token spent with
  whom it counted against leaves it (:meth:`ClusterBus.spend_resume`). Without it, one
  client connecting in a loop left an entry per session on the bus for an
  hour each, and nothing bounded their number.
* ``inbox:<name>``: a stream of requests and replies addressed to the node.
  Streams rather than pub/sub: a message sent while the reader is between two
  reads is not lost, and the reader needs no subscription handshake.
* ``events``: one shared stream for broadcasts; every node reads it.
* ``lease:<name>``: leases (``SET NX PX`` with a token, renewed by
  compare-and-extend, released by compare-and-delete), e.g. one per partial
  upload so two nodes never write one partial.

Client choice: redis-py's synchronous client, each call in a Trio worker
thread, and one dedicated connection in a thread blocked in ``XREAD BLOCK``
with a short timeout (so cancelling the reader costs at most that timeout in
the abandoned thread, never a hang). redis-py is the reference client, pure
Python, typed, already a dependency of most deployments, and speaks to Redis
and Valkey alike; its asyncio API cannot run under Trio. Measured once on this
machine (loopback, Valkey 9.1, two cores shared with other jobs, load average
4.5): broadcast to handler one way, median 0.85 ms (p90 1.4 ms, best 0.53 ms);
request to reply round trip, median 0.92 ms; the same XADD / XREAD BLOCK with
plain threads and no Trio, median 0.46 ms, so the thread hops cost about
0.4 ms. On the machine at rest (load 0.6): one way 0.65 ms (best 0.39 ms)
against 0.42 ms for plain threads. Last week's notes: valkey-glide (Rust core, native Trio support)
100-230 us, coredis (anyio) 270-450 us, redis-py in threads 190-520 us. A
millisecond is small next to what the bus carries (a cross-node push is a
file transfer, a broadcast a fan-out to sockets), and glide would add a native
dependency; the client sits behind :class:`ClusterBus`, so it can change
without touching callers.

Trust: Redis is infrastructure, not a peer. Anyone who can write to it can
pose as a node, so protect it as the operators protect the store (password or
ACL in the URL, ``rediss://``, a private network). The bus still type-checks
every message it reads, so garbage on a stream is logged and skipped, never a
crash.

Besides requests, replies and broadcasts, an inbox carries one-way messages
(:meth:`ClusterBus.tell`), progress reports for a pending request
(:meth:`ClusterBus.report_progress`, handed to the requester's
``on_progress``) and word that requests are still being served: every
``ttl / 3`` a node tells each node it is serving requests for which ones it
is still working on. A request with no word for a whole ``ttl``, while its
node stays registered and the bus answers, was lost on the way (a Redis
restart without persistence, a failover that missed the last writes, a
trimmed stream), or its reply was: the requester stops waiting
(:class:`RequestLost`) instead of waiting for ever.

Payloads are msgpack (a dict of plain values, bytes allowed), at most
``max_message_bytes``: the bus routes requests, it does not carry files
(a cross-node push stages the file in the shared store and sends its key).
"""

from __future__ import annotations

import contextvars
import functools
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Final, TypeVar

import attrs
import msgpack
import redis
import trio

from .. import _threads
from .._stored_errors import detached
from ..errors import ConduitError, RPCError

__all__ = [
    "BusError",
    "ClientIdTaken",
    "ClusterBus",
    "EventHandler",
    "Lease",
    "LeaseBusy",
    "LeaseLost",
    "NodeNameTaken",
    "NodeUnreachable",
    "ProgressHandler",
    "RequestHandler",
    "RequestLost",
]

log = logging.getLogger("conduit.cluster.bus")

T = TypeVar("T")

#: ``handler(kind, payload, sender_node) -> reply payload``.
RequestHandler = Callable[[str, dict[str, Any], str], Awaitable[dict[str, Any]]]
#: ``handler(event, data, sender_node)``.
EventHandler = Callable[[str, Any, str], Awaitable[None]]
#: ``on_progress(data)``: a progress report of a pending request (see :meth:`ClusterBus.request`).
ProgressHandler = Callable[[Any], Awaitable[None]]

_READ_BLOCK_MS: Final = 250
_READ_COUNT: Final = 128
_STREAM_MAXLEN: Final = 10_000
_CLIENT_BATCH: Final = 500
#: Broadcasts waiting for the event handler; beyond this they are dropped (and logged).
_EVENT_BACKLOG: Final = 1024
#: ... and the bytes they came in (each up to ``max_message_bytes``): beyond
#: this too. (Until 2026-12-07 only their number was bounded: 1,024 messages
#: of a megabyte, a gigabyte per node behind one slow client.)
_EVENT_BACKLOG_BYTES: Final = 32 * 1024 * 1024
#: Seconds a requester that stopped waiting tries to tell the serving node so.
_CANCEL_TIMEOUT: Final = 5.0

# Extend KEYS[1] by ARGV[2] ms if it still holds ARGV[1]; recreate it if it expired.
# 1: extended, 2: recreated, 0: someone else holds it.
_HEARTBEAT: Final = """
local value = redis.call('GET', KEYS[1])
if value == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if not value then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 2 end
return 0
"""
# Extend only if still ours (leases, client entries): 1 or 0.
_EXTEND: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# Extend every KEYS[i] that still holds ARGV[1]; recreate missing ones (the bus
# lost them: a Redis restart, or a heartbeat away past the TTL) and those holding
# this node's own departed mark ARGV[3] (its release of a client's old session
# landed after the client's resume here: it holds the client again). Returns the
# keys that name another node, or another node's departed mark (their clients
# moved there, and maybe left).
_EXTEND_CLIENTS: Final = """
local lost = {}
for _, key in ipairs(KEYS) do
  local value = redis.call('GET', key)
  if value == ARGV[1] then redis.call('PEXPIRE', key, ARGV[2])
  elseif not value or value == ARGV[3] then redis.call('SET', key, ARGV[1], 'PX', ARGV[2])
  else table.insert(lost, key) end
end
return lost
"""
_DELETE_IF: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# A node leaving: its registration KEYS[1] and its inbox KEYS[2] go, if the
# registration is still its own (ARGV[1]). Else the name is a newer
# process's now, and so is the inbox (until 2026-12-07 it was deleted anyway).
_UNREGISTER_NODE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[2])
  return redis.call('DEL', KEYS[1])
end
return 0
"""
#: What a client entry holds for ``ttl`` after its client left node N: this
#: prefix and N (never a node name: those have neither a colon nor a space).
_DEPARTED: Final = ": departed "
# A client entry that still names this node (ARGV[1]) becomes its departed mark
# (ARGV[2]) for ARGV[3] ms rather than vanish: a node that held the client
# before it moved here, and has not yet seen the move, would take a missing
# entry for one the bus lost and recreate it in its own name (see
# _EXTEND_CLIENTS, which recreates only this node's own mark).
_BURY_CLIENT: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
return 0
"""
# Register a new client id (KEYS[1]) for node ARGV[1] for ARGV[3] ms, unless a
# node holds it (SET NX, where a departed mark, prefix ARGV[2], counts as free).
_REGISTER_CLIENT: Final = """
local value = redis.call('GET', KEYS[1])
if value and string.sub(value, 1, string.len(ARGV[2])) ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
return 1
"""
# Redeem a resume entry "OWNER CLIENT_ID": only for its owner (ARGV[1]), and only
# once (deleted in the same step). Returns the client id, or nil.
# ARGV[2]: 0 to consume the token, else the most milliseconds it may stay
# good from now (held: see ClusterBus.redeem_resume); never lengthened.
_REDEEM: Final = """
local value = redis.call('GET', KEYS[1])
if not value then return false end
local owner = ARGV[1] .. ' '
if string.sub(value, 1, string.len(owner)) ~= owner then return false end
local hold = tonumber(ARGV[2])
if hold == 0 then
  redis.call('DEL', KEYS[1])
else
  local left = redis.call('PTTL', KEYS[1])
  if left < 0 or left > hold then redis.call('PEXPIRE', KEYS[1], hold) end
end
return string.sub(value, string.len(owner) + 1)
"""


# Keep a resume entry (KEYS[1], value ARGV[1], for ARGV[2] ms) in its owner's
# set (KEYS[2]: digest ARGV[3], scored by the Redis server's clock, not a
# node's, which may be behind: its new token would be the oldest); delete
# the entry it replaces (digest ARGV[4], or ''); past ARGV[5] members the
# oldest go, with their entries (named ARGV[6] .. digest: keys only known
# here, so this bus needs a single Redis, not a Redis Cluster, as every other
# script here assumes). Returns how many went.
_SHARE_RESUME: Final = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if ARGV[4] ~= '' and ARGV[4] ~= ARGV[3] then
  redis.call('DEL', ARGV[6] .. ARGV[4])
  redis.call('ZREM', KEYS[2], ARGV[4])
end
local now = redis.call('TIME')
redis.call('ZADD', KEYS[2], now[1] * 1000000 + now[2], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[5])
if over <= 0 then return 0 end
local gone = redis.call('ZPOPMIN', KEYS[2], over)
for i = 1, #gone, 2 do redis.call('DEL', ARGV[6] .. gone[i]) end
return over
"""


#: Resume entries one owner (an account, or an address with a shared
#: password) keeps on the bus: as many clients of its as come back within
#: ``RESUME_TTL`` keep their ids (about 3 MB of Redis memory at most).
RESUME_ENTRIES_PER_OWNER: Final = 10_000


class BusError(ConduitError):
    """A cluster bus operation failed."""


class NodeUnreachable(BusError):
    """The node (or the node of a client) is not registered, or stopped answering."""


class RequestLost(NodeUnreachable):
    """The node stayed registered, but sent no word about the request for a whole TTL.

    The request, or its reply, was lost on the bus: whether the node ran it
    is unknown. A :class:`NodeUnreachable`, so code that handles an
    unreachable node handles this too.
    """


class NodeNameTaken(BusError):
    """Another live process is registered under this node name."""


class ClientIdTaken(BusError):
    """The client id is already registered by some node."""


class LeaseBusy(BusError):
    """Someone else holds the lease."""


class LeaseLost(BusError):
    """A held lease expired or was taken before it was released."""


def default_node_name() -> str:
    """A name unique per process: host, pid and a random suffix."""
    host = socket.gethostname().split(".")[0] or "node"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


@attrs.define
class _Pending:
    node: str
    done: trio.Event = attrs.field(factory=trio.Event)
    reply: dict[str, Any] | None = None
    error: RPCError | None = None
    #: Set on a reply and on a progress report; the requester replaces it.
    wake: trio.Event = attrs.field(factory=trio.Event)
    #: The latest progress report not yet handed to ``on_progress`` (only the
    #: latest counts: a slow callback skips reports, it never queues them).
    progress: Any = None
    has_progress: bool = False
    #: When the last word about the request came (sent, still served, a
    #: progress report), in ``trio.current_time()``; a whole TTL without one
    #: means the request or its reply was lost.
    heard: float = attrs.field(factory=trio.current_time)


@attrs.frozen
class _Message:
    """One bus message, as packed on the streams (short keys keep it small)."""

    # "req", "rep", "evt", "one" (one-way request), "prg" (progress), "alv"
    # (the request ids in ``payload`` are still being served) or "cxl" (the
    # requester stopped waiting for request ``id``: stop serving it)
    type: str
    sender: str
    id: str = ""
    kind: str = ""
    payload: Any = None
    error: tuple[str, str] | None = None


_TYPES: Final = frozenset({"req", "rep", "evt", "one", "prg", "alv", "cxl"})
#: The request a handler task is serving (where :meth:`ClusterBus.report_progress` sends).
_SERVING: contextvars.ContextVar[_Message | None] = contextvars.ContextVar(
    "conduit_cluster_serving", default=None
)


def _parse(raw: bytes) -> _Message | None:
    """Decode and type-check a message; None if malformed (Redis is shared, not a peer)."""
    try:
        document = msgpack.unpackb(raw, raw=False)
    except Exception:
        return None
    if not isinstance(document, dict):
        return None
    fields = {"t": str, "s": str, "i": str, "k": str}
    if any(not isinstance(document.get(key, ""), kind) for key, kind in fields.items()):
        return None
    error = document.get("e")
    if error is not None:
        if not (isinstance(error, list | tuple) and len(error) == 2):
            return None
        error = (str(error[0]), str(error[1]))
    if not document.get("t") or not document.get("s"):
        return None
    return _Message(
        document["t"],
        document["s"],
        document.get("i", ""),
        document.get("k", ""),
        document.get("p"),
        error,
    )


@attrs.define(eq=False)
class Lease:
    """A held lease; :meth:`renew` it within ``ttl``, :meth:`release` it when done."""

    bus: ClusterBus
    name: str
    token: str
    ttl: float

    async def renew(self) -> bool:
        """Extend by ``ttl``; False if it was lost (expired and maybe taken)."""
        key = self.bus._key("lease", self.name)
        result = await self.bus._call(
            self.bus._extend, keys=[key], args=[self.token, _ms(self.ttl)]
        )
        return bool(result)

    async def release(self) -> None:
        """Give it up (only if still ours)."""
        key = self.bus._key("lease", self.name)
        await self.bus._call(self.bus._delete_if, keys=[key], args=[self.token])


async def _hand_over_progress(pending: _Pending, on_progress: ProgressHandler | None) -> None:
    if pending.has_progress:
        data, pending.progress, pending.has_progress = pending.progress, None, False
        if on_progress is not None:
            await on_progress(data)


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def _node_of(entry: object) -> str | None:
    """The node a client entry names; None for no entry or a departed client."""
    if entry is None:
        return None
    node = _text(entry)
    return None if node.startswith(_DEPARTED) else node


def _last_node_of(entry: object) -> str | None:
    """The node a client entry names, or the one that marked it departed; None for no entry."""
    if entry is None:
        return None
    node = _text(entry)
    return node.removeprefix(_DEPARTED) or None


def _text(value: object) -> str:
    """A Redis reply (bytes with the default decode_responses=False) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _entry_id(text: str) -> tuple[int, int]:
    """A stream entry id (``"MS-SEQ"``) as a pair that orders as Redis does."""
    milliseconds, _, sequence = text.partition("-")
    return int(milliseconds), int(sequence or 0)


def _restart_behind(reader: redis.Redis, positions: dict[str, str]) -> list[str]:
    """Read again from its start each stream whose last id is below the
    position read to; what was repaired.

    Such a stream was made anew (expired while idle, or Redis restarted
    without its data) with ids from a clock behind the one of the old
    entries, or read past an entry whose id was forged far ahead: reading on
    from the position would wait for ids it may not reach for a long time,
    or never. Every entry it has now is one not read yet.
    """
    repaired = []
    for stream, position in positions.items():
        try:
            info: Any = reader.xinfo_stream(stream)
        except redis.ResponseError:  # no such stream (yet): nothing to read
            continue
        if _entry_id(_text(info["last-generated-id"])) < _entry_id(position):
            positions[stream] = "0-0"
            repaired.append(f"{stream}: read again from its start")
    return repaired


def _clear_wrong_types(reader: redis.Redis, positions: dict[str, str]) -> list[str]:
    """Delete the keys of the streams read that hold something else than a
    stream; what was repaired.

    The namespace is the cluster's own: such a key is garbage (written by
    hand or by another program), and while it is there every read of this
    node's streams fails, its inbox's with it (they are read together).
    """
    cleared = []
    for stream in positions:
        kind = _text(reader.type(stream))
        if kind not in ("stream", "none"):
            reader.delete(stream)
            cleared.append(f"{stream} ({kind}): deleted")
    return cleared


def _read_streams(reader: redis.Redis, positions: dict[str, str]) -> list[tuple[str, str, bytes]]:
    """One ``XREAD BLOCK``: (stream, entry id, message) in order; [] after the block timeout."""
    streams: dict[Any, Any] = dict(positions)
    batches: Any = reader.xread(streams, count=_READ_COUNT, block=_READ_BLOCK_MS)
    found: list[tuple[str, str, bytes]] = []
    for stream, entries in batches or ():
        for entry_id, fields in entries:
            found.append((_text(stream), _text(entry_id), bytes(fields.get(b"m", b""))))
    return found


class ClusterBus:
    """One node's connection to the cluster; Trio-native, backed by redis-py in threads.

    ``url`` is ``redis://HOST:PORT/DB`` (``rediss://`` for TLS, credentials in
    the URL as redis-py accepts them). ``ttl``: how long a silent node (and its
    clients) stays registered. Nothing is contacted before :meth:`run`.
    """

    def __init__(
        self,
        url: str,
        node_name: str | None = None,
        *,
        namespace: str = "conduit",
        ttl: float = 10.0,
        request_timeout: float = 30.0,
        max_handlers: int = 64,
        max_message_bytes: int = 1 << 20,
    ) -> None:
        """Configure; see the class docstring."""
        if not 0.3 <= ttl <= 30.0:
            raise ValueError("ttl must be between 0.3 and 30 seconds")
        self.url = url
        self.node_name = node_name or default_node_name()
        if not self.node_name or any(c in self.node_name for c in ": \t\r\n"):
            raise ValueError(f"invalid node name {self.node_name!r}")
        self.namespace = namespace
        self.ttl = ttl
        self.request_timeout = request_timeout
        self.max_message_bytes = max_message_bytes
        self._redis = redis.Redis.from_url(
            url,
            socket_timeout=max(5.0, ttl),
            socket_connect_timeout=5.0,
            max_connections=32,
        )
        self._heartbeat = self._redis.register_script(_HEARTBEAT)
        self._extend = self._redis.register_script(_EXTEND)
        self._extend_clients = self._redis.register_script(_EXTEND_CLIENTS)
        self._delete_if = self._redis.register_script(_DELETE_IF)
        self._unregister_node = self._redis.register_script(_UNREGISTER_NODE)
        self._bury_client = self._redis.register_script(_BURY_CLIENT)
        self._register_client = self._redis.register_script(_REGISTER_CLIENT)
        self._redeem = self._redis.register_script(_REDEEM)
        self._share_resume = self._redis.register_script(_SHARE_RESUME)
        self._limiter = trio.CapacityLimiter(16)
        self._handler_limiter = trio.CapacityLimiter(max_handlers)
        # One-way notices (a client moved away, ...) have a limit of their
        # own: a node busy with max_handlers long requests (pushes) must
        # still hear them.
        self._notice_limiter = trio.CapacityLimiter(max_handlers)
        self._request_handler: RequestHandler | None = None
        self._event_handler: EventHandler | None = None
        self._pending: dict[str, _Pending] = {}
        #: The requests this node is serving (replies not yet sent), by requesting node.
        self._serving: dict[str, set[str]] = {}
        #: The cancel scope of each request being served, by request id, with
        #: its requesting node (only that node may cancel it).
        self._serving_scopes: dict[str, tuple[str, trio.CancelScope]] = {}
        self._clients: set[str] = set()
        #: This node's mark on the entry of a client that left it (see _BURY_CLIENT).
        self._departed = _DEPARTED + self.node_name
        self._registration = ""
        self._running = False
        self._events_in, self._events_out = trio.open_memory_channel[tuple[str, Any, str, int]](
            _EVENT_BACKLOG
        )
        #: The bytes of the broadcasts queued for the event handler (see _EVENT_BACKLOG_BYTES).
        self._events_bytes = 0

    # ----------------------------------------------------------------- plumbing

    def _key(self, kind: str, name: str = "") -> str:
        return f"{self.namespace}:{kind}:{name}" if name else f"{self.namespace}:{kind}"

    async def _call(self, function: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        try:
            return await _threads.run_sync(
                functools.partial(function, *args, **kwargs), limiter=self._limiter
            )
        except redis.RedisError as exc:
            raise BusError(f"cluster bus: {type(exc).__name__}: {exc}") from exc

    def _pack(self, message: dict[str, Any]) -> bytes:
        data: bytes = msgpack.packb(message, use_bin_type=True)
        if len(data) > self.max_message_bytes:
            raise BusError(f"bus message of {len(data)} bytes exceeds {self.max_message_bytes}")
        return data

    def _xadd(self, stream: str, data: bytes) -> None:
        try:
            self._xadd_once(stream, data)
        except redis.ResponseError as exc:
            if "last possible ID" not in str(exc):
                raise
            # An entry with the largest id (forged: nodes' ids are times) leaves
            # no id to add after it, for ever, and the failing pipeline's
            # PEXPIRE keeps the stream alive: it is made anew. Its readers
            # find it behind where they read to, and read it from its start.
            log.warning("cluster bus: %s has used up its ids; made anew", stream)
            self._redis.delete(stream)
            self._xadd_once(stream, data)

    def _xadd_once(self, stream: str, data: bytes) -> None:
        pipe = self._redis.pipeline(transaction=False)
        pipe.xadd(stream, {"m": data}, maxlen=_STREAM_MAXLEN, approximate=True)
        # An inbox outlives its node by a little, never forever.
        pipe.pexpire(stream, _ms(self.ttl * 3))
        pipe.execute()

    def _require_running(self) -> None:
        if not self._running:
            raise BusError("the cluster bus is not running (start ClusterBus.run first)")

    # ----------------------------------------------------------------- handlers

    def on_request(self, handler: RequestHandler) -> RequestHandler:
        """Set the handler of requests from other nodes (usable as a decorator)."""
        self._request_handler = handler
        return handler

    def on_event(self, handler: EventHandler) -> EventHandler:
        """Set the handler of broadcasts from other nodes (usable as a decorator)."""
        self._event_handler = handler
        return handler

    # ----------------------------------------------------------------- lifecycle

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Register this node, then heartbeat and read the inbox until cancelled.

        Raises :class:`NodeNameTaken` if a live node has the name (after
        waiting up to 1.5 TTL for a crashed predecessor's registration to
        expire), or later if this node was presumed dead and its name reused:
        it must stop.
        On exit the node, its clients and its inbox are removed at once, so
        the rest of the cluster does not wait for them to expire.
        """
        if self._running:
            raise RuntimeError("ClusterBus.run is already running")
        inbox, events = self._key("inbox", self.node_name), self._key("events")
        # Read from what is there now: older messages were for a previous node.
        positions = {inbox: await self._call(self._last_id, inbox)}
        positions[events] = await self._call(self._last_id, events)
        info = {"node": self.node_name, "pid": os.getpid(), "started": time.time()}
        self._registration = f"{secrets.token_hex(8)} {msgpack.packb(info).hex()}"
        node_key = self._key("node", self.node_name)
        await self._claim_name(node_key)
        self._running = True
        reader = redis.Redis.from_url(
            self.url, socket_timeout=_READ_BLOCK_MS / 1000 + 5.0, socket_connect_timeout=5.0
        )
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._heartbeat_loop)
                nursery.start_soon(self._still_serving_loop)
                nursery.start_soon(self._read_loop, nursery, reader, positions)
                nursery.start_soon(self._event_loop)
                task_status.started()
        finally:
            self._running = False
            for pending in self._pending.values():
                pending.error = RPCError("this node's cluster bus stopped", "node_unreachable")
                pending.done.set()
            # Shielded from the cancellation that stops us, bounded by its own deadline
            # (and by the socket timeout: a thread in a Redis call is not interrupted).
            with trio.CancelScope(shield=True, deadline=trio.current_time() + 2) as cleanup:
                await self._unregister(node_key, inbox)
            if cleanup.cancelled_caught:
                log.warning("could not unregister node %r; it expires by itself", self.node_name)
            self._clients.clear()
            with trio.CancelScope(shield=True):
                await _threads.run_sync(reader.close, abandon_on_cancel=True)

    async def _claim_name(self, node_key: str) -> None:
        """Register the name; a previous holder gets one TTL to prove it is alive.

        A node restarted right after a crash finds its old registration still
        there; it is free once the TTL passes without a heartbeat. A live
        holder keeps refreshing it, so the wait ends in NodeNameTaken.
        """
        deadline = trio.current_time() + self.ttl * 1.5
        while True:
            created = await self._call(
                self._redis.set, node_key, self._registration, nx=True, px=_ms(self.ttl)
            )
            if created:
                return
            if trio.current_time() >= deadline:
                raise NodeNameTaken(f"node name {self.node_name!r} is in use by a live node")
            await trio.sleep(self.ttl / 6)

    def _last_id(self, stream: str) -> str:
        last = self._redis.xrevrange(stream, count=1)
        return _text(last[0][0]) if last else "0-0"

    async def _unregister(self, node_key: str, inbox: str) -> None:
        clients = [self._key("client", client) for client in self._clients]

        def work() -> None:
            pipe = self._redis.pipeline(transaction=False)
            for key in clients:
                self._bury_client(
                    keys=[key], args=[self.node_name, self._departed, _ms(self.ttl)], client=pipe
                )
            self._unregister_node(keys=[node_key, inbox], args=[self._registration], client=pipe)
            pipe.execute()

        try:
            await self._call(work)
        except BusError as exc:
            log.warning("unregistering node %r: %s", self.node_name, exc)

    async def _heartbeat_loop(self) -> None:
        node_key = self._key("node", self.node_name)
        while True:
            await trio.sleep(self.ttl / 3)
            try:
                state = await self._call(
                    self._heartbeat, keys=[node_key], args=[self._registration, _ms(self.ttl)]
                )
                await self._refresh_clients()
            except BusError as exc:
                # Redis unreachable for a moment: the next beat tries again;
                # if it stays away past the TTL the node is forgotten, as it should be.
                log.warning("cluster heartbeat failed: %s", exc)
                continue
            if state == 0:
                raise NodeNameTaken(
                    f"node {self.node_name!r} was presumed dead and its name taken by another node"
                )

    async def _still_serving_loop(self) -> None:
        """Every ``ttl / 3``, tell each requesting node which of its requests are still served.

        One message per requesting node (not per request): what lets a
        requester tell a long request from a lost one (see :meth:`request`).
        A message the bus fails to take is not retried: the next round
        carries the same word.
        """
        while True:
            await trio.sleep(self.ttl / 3)
            for node, served in list(self._serving.items()):
                ids = sorted(served)
                for start in range(0, len(ids), _CLIENT_BATCH):
                    batch = ids[start : start + _CLIENT_BATCH]
                    data = self._pack({"t": "alv", "s": self.node_name, "p": batch})
                    try:
                        await self._call(self._xadd, self._key("inbox", node), data)
                    except BusError as exc:
                        log.debug("could not tell node %r its requests are served: %s", node, exc)

    async def _refresh_clients(self) -> None:
        clients = sorted(self._clients)
        for start in range(0, len(clients), _CLIENT_BATCH):
            keys = [self._key("client", c) for c in clients[start : start + _CLIENT_BATCH]]
            lost = await self._call(
                self._extend_clients,
                keys=keys,
                args=[self.node_name, _ms(self.ttl), self._departed],
            )
            if lost:
                # Their clients resumed on another node: stop claiming them, or
                # a later beat would recreate the entry here once they leave there.
                prefix = self._key("client") + ":"
                for key in lost:
                    self._clients.discard(_text(key)[len(prefix) :])
                log.info("%d client ids of this node moved to another node", len(lost))

    async def _read_loop(
        self, nursery: trio.Nursery, reader: redis.Redis, positions: dict[str, str]
    ) -> None:
        looked = trio.current_time()
        while True:
            # Abandoned on cancel: the thread ends by itself within the block timeout.
            try:
                found = await _threads.run_sync(
                    _read_streams, reader, dict(positions), abandon_on_cancel=True
                )
            except redis.RedisError as exc:
                # Redis away for a moment: retry; the node is forgotten if it stays away.
                log.warning("cluster bus read failed: %s", exc)
                if "WRONGTYPE" in str(exc):
                    await self._heal(_clear_wrong_types, reader, positions)
                await trio.sleep(min(1.0, self.ttl / 3))
                continue
            for stream, entry_id, data in found:
                positions[stream] = entry_id
                self._dispatch(nursery, data)
            if trio.current_time() - looked >= self.ttl / 3:
                # Is a stream behind where this node read to? (Not only while
                # idle: the other stream's traffic would keep this one unread.)
                looked = trio.current_time()
                await self._heal(_restart_behind, reader, positions)

    async def _heal(
        self,
        how: Callable[[redis.Redis, dict[str, str]], list[str]],
        reader: redis.Redis,
        positions: dict[str, str],
    ) -> None:
        """Run ``how`` (a repair of the streams read) in a thread; what it
        repaired is logged, and so is a failure to look."""
        try:
            repaired = await _threads.run_sync(how, reader, positions, abandon_on_cancel=True)
        except redis.RedisError as exc:
            log.warning("cluster bus: could not look at its streams: %s", exc)
            return
        if repaired:
            log.warning("cluster bus: repaired %s", ", ".join(repaired))

    # ----------------------------------------------------------------- messages

    def _dispatch(self, nursery: trio.Nursery, raw: bytes) -> None:
        message = _parse(raw)
        if message is None:
            log.warning("ignoring a malformed bus message")
            return
        if message.type not in _TYPES:
            # From a node of a later version, during a rolling upgrade: not
            # an error (it must still work with this one, which ignores it).
            log.debug("ignoring a bus message of unknown type %r", message.type)
            return
        if message.type == "rep":
            pending = self._pending.get(message.id)
            if pending is not None:
                if message.error is not None:
                    pending.error = RPCError(*message.error)
                else:
                    pending.reply = message.payload if isinstance(message.payload, dict) else {}
                pending.done.set()
                pending.wake.set()
        elif message.type == "prg":
            pending = self._pending.get(message.id)
            if pending is not None and not pending.done.is_set():
                pending.progress = message.payload
                pending.has_progress = True
                pending.heard = trio.current_time()
                pending.wake.set()
        elif message.type == "alv" and isinstance(message.payload, list):
            now = trio.current_time()
            for request_id in message.payload:
                pending = self._pending.get(request_id) if isinstance(request_id, str) else None
                if pending is not None and pending.node == message.sender:
                    pending.heard = now
        elif message.type in ("req", "one"):
            limiter = self._handler_limiter if message.type == "req" else self._notice_limiter
            try:
                limiter.acquire_on_behalf_of_nowait(message.id)
            except (trio.WouldBlock, RuntimeError):  # RuntimeError: the same id twice
                if message.type == "one":
                    log.warning("node overloaded: dropped %r from %r", message.kind, message.sender)
                    return
                error = ("node overloaded", "overloaded")
                nursery.start_soon(self._reply, message.sender, message.id, None, error)
                return
            scope = trio.CancelScope()
            if message.type == "req":
                # Registered now, not when the task starts: a "cxl" read in
                # the same batch must find it (a scope cancelled before it is
                # entered is cancelled on entry).
                self._serving_scopes[message.id] = (message.sender, scope)
            nursery.start_soon(self._serve_request, message, scope)
        elif message.type == "cxl":
            serving = self._serving_scopes.get(message.id)
            if serving is not None and serving[0] == message.sender:
                serving[1].cancel()
        elif message.type == "evt" and message.sender != self.node_name:
            if self._event_handler is None:
                return
            size = len(raw)
            if self._events_bytes + size <= _EVENT_BACKLOG_BYTES:
                try:
                    queued = (message.kind, message.payload, message.sender, size)
                    self._events_in.send_nowait(queued)
                except trio.WouldBlock:  # its number is full (_EVENT_BACKLOG)
                    pass
                else:
                    self._events_bytes += size
                    return
            log.warning("event handler too slow: dropped cluster event %r", message.kind)

    async def _serve_request(self, message: _Message, scope: trio.CancelScope) -> None:
        """Run the handler for ``message`` and reply; ``scope`` is cancelled
        when its requester stops waiting (nobody to reply to then)."""
        one_way = message.type == "one"
        # This task's own context (Trio copies it per task): report_progress
        # finds the request it is serving without the handler passing it along.
        _SERVING.set(None if one_way else message)
        if not one_way:
            self._serving.setdefault(message.sender, set()).add(message.id)
        try:
            with scope:
                try:
                    handler = self._request_handler
                    if handler is None:
                        raise RPCError("this node serves no cluster requests", "not_found")
                    payload = message.payload if isinstance(message.payload, dict) else {}
                    reply = await handler(message.kind, payload, message.sender)
                    if not one_way:
                        await self._reply(message.sender, message.id, reply, None)
                except Exception as exc:
                    # A copy: this frame keeps ``error`` after the block, and
                    # the handler's own error has this frame in its traceback
                    # (a reference cycle, see conduit._stored_errors).
                    error = (
                        detached(exc)
                        if isinstance(exc, RPCError)
                        else RPCError(f"{type(exc).__name__}: {exc}")
                    )
                    if not isinstance(exc, RPCError):
                        log.exception("cluster request %r failed", message.kind)
                    if one_way:
                        log.warning(
                            "one-way %r from %r failed: %s", message.kind, message.sender, error
                        )
                    else:
                        await self._reply(
                            message.sender, message.id, None, (error.message, error.code)
                        )
            if scope.cancelled_caught:
                log.info(
                    "stopped serving %r: node %r stopped waiting for it",
                    message.kind,
                    message.sender,
                )
        finally:
            if self._serving_scopes.get(message.id, (None, None))[1] is scope:
                del self._serving_scopes[message.id]
            served = self._serving.get(message.sender)
            if served is not None:
                served.discard(message.id)
                if not served:
                    del self._serving[message.sender]
            limiter = self._notice_limiter if one_way else self._handler_limiter
            limiter.release_on_behalf_of(message.id)

    async def _event_loop(self) -> None:
        # One at a time, in stream order: broadcasts arrive in the order they were sent.
        async for event, data, sender, size in self._events_out:
            self._events_bytes -= size
            handler = self._event_handler
            if handler is None:
                continue
            try:
                await handler(event, data, sender)
            except Exception:
                log.exception("cluster event handler failed for %r", event)

    async def _reply(
        self,
        node: str,
        request_id: str,
        reply: dict[str, Any] | None,
        error: tuple[str, str] | None,
    ) -> None:
        message = {"t": "rep", "s": self.node_name, "i": request_id, "p": reply, "e": error}
        try:
            data = self._pack(message)
        except BusError as exc:
            data = self._pack({**message, "p": None, "e": (str(exc), "too_large")})
        # Tried again for a TTL: the requester waits that long after the bus
        # answers again (and a reply sent twice is harmless: the second finds
        # no request waiting). Meanwhile the request is still "served".
        deadline = trio.current_time() + self.ttl
        while True:
            try:
                await self._call(self._xadd, self._key("inbox", node), data)
                return
            except BusError as exc:
                if trio.current_time() >= deadline:
                    log.warning("could not reply to node %r: %s", node, exc)
                    return
            await trio.sleep(self.ttl / 6)

    # ----------------------------------------------------------------- nodes

    async def nodes(self) -> list[str]:
        """Names of the live nodes, sorted (this one included while it runs)."""
        prefix = self._key("node") + ":"

        def scan() -> list[str]:
            found = {
                _text(key)[len(prefix) :]
                for key in self._redis.scan_iter(match=prefix + "*", count=500)
            }
            return sorted(found)

        return await self._call(scan)

    async def node_alive(self, node: str) -> bool:
        """Whether ``node`` is registered (it heartbeated within the TTL)."""
        return bool(await self._call(self._redis.exists, self._key("node", node)))

    # ----------------------------------------------------------------- clients

    async def register_client(self, client_id: str) -> None:
        """Record that ``client_id`` is connected here; :class:`ClientIdTaken` if it is not new."""
        self._require_running()
        key = self._key("client", client_id)
        created = await self._call(
            self._register_client, keys=[key], args=[self.node_name, _DEPARTED, _ms(self.ttl)]
        )
        if not created:
            raise ClientIdTaken(f"client id {client_id!r} is already in use in the cluster")
        self._clients.add(client_id)

    async def new_client_id(self, prefix: str = "") -> str:
        """A fresh client id, unique in the cluster, already registered to this node."""
        for _attempt in range(16):
            candidate = f"{prefix}{secrets.token_hex(8)}"
            try:
                await self.register_client(candidate)
            except ClientIdTaken:
                continue
            return candidate
        raise BusError("could not find a free client id")  # pragma: no cover - 2**-64 odds

    async def move_client(self, client_id: str) -> str | None:
        """Register ``client_id`` here whoever held it; the node that held it
        before, if any, or that it left last (its departed mark, kept ``ttl``):
        that node may have pushes waiting for the client to come back, which
        must hear that it came back elsewhere.

        For a client resuming its session here after it lost its connection to
        another node (it proved it is the same client with its resume token):
        its old node's entry is stale, so it is overwritten, not waited out.
        That node's refresh and cleanup only touch an entry naming it, so
        they leave this one alone.
        """
        self._require_running()
        key = self._key("client", client_id)
        previous = await self._call(
            self._redis.set, key, self.node_name, px=_ms(self.ttl), get=True
        )
        self._clients.add(client_id)
        return _last_node_of(previous)

    def forget_client(self, client_id: str) -> None:
        """Stop refreshing ``client_id`` here, without touching its entry (it moved away)."""
        self._clients.discard(client_id)

    async def unregister_client(self, client_id: str) -> None:
        """Forget ``client_id`` (only if this node holds it).

        Its entry is marked departed for ``ttl`` rather than deleted, so that
        a node it moved here from cannot recreate it (see ``_BURY_CLIENT``).
        """
        self._clients.discard(client_id)
        key = self._key("client", client_id)
        await self._call(
            self._bury_client, keys=[key], args=[self.node_name, self._departed, _ms(self.ttl)]
        )

    async def locate_client(self, client_id: str) -> str | None:
        """The node ``client_id`` is connected to, or ``None`` (unknown, left, or its node died)."""
        return _node_of(await self._call(self._redis.get, self._key("client", client_id)))

    # ----------------------------------------------------------------- resume tokens

    async def share_resume(
        self,
        digest: str,
        client_id: str,
        owner: str,
        ttl: float,
        *,
        replaces: str | None = None,
        counted_against: str | None = None,
        keep: int = RESUME_ENTRIES_PER_OWNER,
    ) -> int:
        """Keep a resume token for ``ttl`` seconds, by its ``digest`` (hex SHA-256 of the token).

        ``owner`` (no spaces) tags the account it was issued to; only that
        owner can redeem it. ``replaces``: the digest of the client's previous
        token, deleted in the same step (a token is good once).

        ``counted_against`` (no spaces; ``owner`` when None): whom the token
        counts against, an account or an address, by a hash of it. Of its
        tokens the newest ``keep`` stay; older ones go, good no more (their
        clients get new ids when they come back): one client that connects
        again and again evicts its own tokens, never another's. Returns how
        many went.
        """
        group = owner if counted_against is None else counted_against
        for tag in (owner, group):
            if " " in tag or not tag:
                raise ValueError("the owner tag must be non-empty, without spaces")
        if keep < 1:
            raise ValueError("keep must be at least 1")
        went = await self._call(
            self._share_resume,
            keys=[self._key("resume", digest), self._key("resumes", group)],
            args=[
                f"{owner} {client_id}",
                _ms(ttl),
                digest,
                replaces or "",
                keep,
                self._key("resume") + ":",  # what _key("resume", digest) starts with
            ],
        )
        return int(went)

    async def redeem_resume(
        self, digest: str, owner: str, *, hold: float | None = None
    ) -> str | None:
        """The client id of the token with ``digest``; None if unknown or not ``owner``'s.

        Another owner's attempt leaves the token in place for its owner.
        ``hold=None``: the token is consumed, atomically (of two nodes
        redeeming it at once, one gets the id). ``hold``: seconds; the token
        stays good for at most that long from now (never longer than it
        already had), until :meth:`spend_resume`: the redeeming session has
        not heard from its client yet, whose WELCOME the network may lose.
        """
        if hold is not None and not (hold > 0 and math.isfinite(hold)):
            raise ValueError("hold must be a positive, finite number of seconds")
        hold_ms = 0 if hold is None else _ms(hold)
        value = await self._call(
            self._redeem, keys=[self._key("resume", digest)], args=[owner, hold_ms]
        )
        return None if value is None else _text(value)

    async def spend_resume(self, digest: str, *, counted_against: str | None = None) -> None:
        """Forget the token with ``digest``: good no more (a no-op for one already gone).

        ``counted_against``: whom it counted against (as given to
        :meth:`share_resume`), whose set it leaves too (else its member
        stays there, about 130 bytes, until the set passes its bound or
        expires).
        """
        entry = self._key("resume", digest)
        if counted_against is None:
            await self._call(self._redis.delete, entry)
            return

        def work() -> None:
            pipe = self._redis.pipeline(transaction=True)
            pipe.delete(entry)
            pipe.zrem(self._key("resumes", counted_against), digest)
            pipe.execute()

        await self._call(work)

    async def expire_resume(self, digests: list[str], ttl: float) -> None:
        """Let the tokens with these digests live ``ttl`` more seconds (gone ones stay gone)."""

        def work(batch: list[str]) -> None:
            pipe = self._redis.pipeline(transaction=False)
            for digest in batch:
                pipe.pexpire(self._key("resume", digest), _ms(ttl))
            pipe.execute()

        # In batches: a node with many clients must not build one huge pipeline.
        for start in range(0, len(digests), _CLIENT_BATCH):
            await self._call(work, digests[start : start + _CLIENT_BATCH])

    # ----------------------------------------------------------------- requests

    async def request(
        self,
        node: str,
        kind: str,
        payload: dict[str, Any],
        *,
        timeout: float | None = None,
        on_progress: ProgressHandler | None = None,
    ) -> dict[str, Any]:
        """Send ``kind`` / ``payload`` to ``node``'s request handler; return its reply.

        Raises :class:`NodeUnreachable` if the node is not registered or is
        forgotten while we wait (checked every ``ttl / 3``; a check the bus
        fails to answer is tried again, and only a bus silent for a whole
        ``ttl`` counts as the node being gone), :class:`RequestLost` (a
        :class:`NodeUnreachable`) if the node stays registered but sends no
        word about the request for a whole ``ttl`` while the bus answers (it
        says every ``ttl / 3`` which requests it is still serving, so only a
        request or reply lost on the bus ends here; whether it ran is then
        unknown), :class:`BusError` if the
        request could not be sent, ``TimeoutError`` after ``timeout`` (default
        ``request_timeout``), and :class:`RPCError` with the handler's message
        and code if it failed. Each as a plain exception, never inside an
        ``ExceptionGroup``.

        ``on_progress(data)`` is awaited with what the handler passes to
        :meth:`report_progress`, in order, before this returns; when it is
        slower than the reports, only the latest waiting one is handed over.
        What it raises ends the wait.

        Whenever the wait ends without the reply (what ``on_progress``
        raises, a timeout, a cancellation, the node taken for gone or the
        request for lost), the node is told to stop serving the request: its
        handler is cancelled (a node of a version before 2026-12-05 ignores
        this, and logs it as a malformed message).
        """
        self._require_running()
        if not await self.node_alive(node):
            raise NodeUnreachable(f"node {node!r} is not in the cluster")
        request_id = secrets.token_hex(12)
        data = self._pack(
            {"t": "req", "s": self.node_name, "i": request_id, "k": kind, "p": payload}
        )
        pending = self._pending[request_id] = _Pending(node)
        sent = False
        try:
            await self._call(self._xadd, self._key("inbox", node), data)
            sent = True
            pending.heard = trio.current_time()
            limit = self.request_timeout if timeout is None else timeout
            failed: Exception | None = None
            # Why the watch gave up, if the bus stayed silent for a TTL (a
            # node seen gone needs no reason). The watch never raises: under
            # Trio's strict exception groups anything raised in the nursery
            # would reach the caller wrapped in an ExceptionGroup, which
            # callers catching NodeUnreachable / ConduitError would miss.
            verdict: list[NodeUnreachable] = []
            with trio.move_on_after(limit) as waited:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(
                        self._watch_node, kind, pending, nursery.cancel_scope, verdict
                    )
                    try:
                        while not pending.done.is_set():
                            await pending.wake.wait()
                            pending.wake = trio.Event()
                            await _hand_over_progress(pending, on_progress)
                    except Exception as exc:  # on_progress's: raised as is, not in a group
                        failed = exc
                    nursery.cancel_scope.cancel()
                # Raised from locals of this frame, which their tracebacks
                # will hold: deleted on the way out (see conduit._stored_errors).
                if failed is not None:
                    try:
                        raise failed
                    finally:
                        del failed
                if verdict and not pending.done.is_set():
                    lost = verdict.pop(0)
                    verdict.clear()
                    try:
                        raise lost
                    finally:
                        del lost
                # A report that came in with the reply: the reply follows it on
                # the stream, so it is the last one and must not be lost.
                await _hand_over_progress(pending, on_progress)
            if waited.cancelled_caught:
                raise TimeoutError(f"node {node!r} did not answer {kind!r} within {limit} s")
            if not pending.done.is_set():
                raise NodeUnreachable(f"node {node!r} left the cluster before answering {kind!r}")
        finally:
            del self._pending[request_id]
            if sent and not pending.done.is_set():
                # We stopped waiting (on_progress raised, a timeout, our
                # caller's cancellation, the node taken for gone or the
                # request for lost): the node must not go on serving it.
                await self._cancel_request(node, request_id)
        if pending.error is not None:
            if pending.error.code == "node_unreachable":
                raise NodeUnreachable(pending.error.message)
            raise detached(pending.error)
        assert pending.reply is not None
        return pending.reply

    async def _cancel_request(self, node: str, request_id: str) -> None:
        """Tell ``node`` to stop serving ``request_id`` (shielded, bounded, never raises)."""
        data = self._pack({"t": "cxl", "s": self.node_name, "i": request_id})
        with trio.CancelScope(shield=True), trio.move_on_after(_CANCEL_TIMEOUT):
            try:
                await self._call(self._xadd, self._key("inbox", node), data)
            except BusError as exc:
                log.debug("could not tell node %r to stop request %s: %s", node, request_id, exc)

    async def _watch_node(
        self,
        kind: str,
        pending: _Pending,
        scope: trio.CancelScope,
        verdict: list[NodeUnreachable],
    ) -> None:
        """Cancel ``scope`` once the node is gone or the request lost; why goes in ``verdict``.

        Never raises. Looks every ``ttl / 3``. A look that fails (the bus did
        not answer) proves nothing about the node: one Redis blip must not
        fail a long request, so it is tried again at the next look. The node
        is taken for gone when it is seen missing and has sent no word about
        the request for half a TTL (a bus restarted empty has lost every
        registration, which each node writes again at its next heartbeat,
        a third of a TTL later at most: until 2026-12-07 one look in that
        gap failed a push the node was still delivering), or when the bus has not
        answered for a whole TTL since the node was last seen (by then the
        node's own registration may have expired unseen, and nothing can be
        learnt). The request is taken for lost when the node is seen
        registered and has sent no word about it for a whole TTL, counted
        from when the bus last came back if it was away (the node's word
        could not get through meanwhile either).
        """
        node = pending.node
        seen = trio.current_time()  # request() saw it registered just before
        blind = False
        while True:
            await trio.sleep(self.ttl / 3)
            try:
                alive = await self.node_alive(node)
            except Exception as exc:  # BusError, or anything the thread raised
                blind = True
                silent = trio.current_time() - seen
                if silent < self.ttl:
                    log.debug("could not look at node %r (trying again): %s", node, exc)
                    continue
                verdict.append(
                    NodeUnreachable(
                        f"node {node!r}: the cluster bus has not answered for {silent:.1f} s "
                        f"while waiting for its reply ({exc})"
                    )
                )
                scope.cancel()
                return
            if not alive:  # request() says so: no reply came
                if trio.current_time() - pending.heard <= self.ttl / 2:
                    continue  # it still serves: its registration comes back
                scope.cancel()
                return
            seen = trio.current_time()
            if blind:
                pending.heard = max(pending.heard, seen)
                blind = False
            elif seen - pending.heard > self.ttl:
                verdict.append(
                    RequestLost(
                        f"node {node!r} is in the cluster but has sent no word about {kind!r} "
                        f"for {seen - pending.heard:.1f} s: the request or its reply was lost "
                        "on the cluster bus (whether it ran is unknown)"
                    )
                )
                scope.cancel()
                return

    async def request_for_client(
        self, client_id: str, kind: str, payload: dict[str, Any], *, timeout: float | None = None
    ) -> dict[str, Any]:
        """:meth:`request` to the node ``client_id`` is connected to."""
        node = await self.locate_client(client_id)
        if node is None:
            raise NodeUnreachable(f"no node has a client with id {client_id!r}")
        return await self.request(node, kind, payload, timeout=timeout)

    async def tell(self, node: str, kind: str, payload: dict[str, Any]) -> None:
        """Send ``kind`` / ``payload`` to ``node``'s request handler and return: no reply.

        For notices whose outcome the sender does not need (and a node that
        is gone simply never reads them: its inbox expires).
        """
        self._require_running()
        request_id = secrets.token_hex(12)
        data = self._pack(
            {"t": "one", "s": self.node_name, "i": request_id, "k": kind, "p": payload}
        )
        await self._call(self._xadd, self._key("inbox", node), data)

    async def report_progress(self, data: Any) -> None:
        """From a request handler: hand ``data`` to the requester's ``on_progress``.

        Best effort and not acknowledged; :class:`BusError` if it could not be
        sent, ``RuntimeError`` outside a request handler. Throttle the calls
        yourself: every one is a message on the requester's inbox.
        """
        serving = _SERVING.get()
        if serving is None:
            raise RuntimeError("report_progress is for the handler of a request (not one-way)")
        message = self._pack({"t": "prg", "s": self.node_name, "i": serving.id, "p": data})
        await self._call(self._xadd, self._key("inbox", serving.sender), message)

    async def broadcast(self, event: str, data: Any = None) -> None:
        """Deliver ``event`` / ``data`` to the event handler of every other node."""
        self._require_running()
        message = self._pack({"t": "evt", "s": self.node_name, "k": event, "p": data})
        await self._call(self._xadd, self._key("events"), message)

    # ----------------------------------------------------------------- leases

    async def acquire_lease(self, name: str, ttl: float = 30.0) -> Lease | None:
        """Take the lease ``name`` for ``ttl`` seconds if free; ``None`` if someone holds it."""
        token = f"{self.node_name} {secrets.token_hex(8)}"
        taken = await self._call(
            self._redis.set, self._key("lease", name), token, nx=True, px=_ms(ttl)
        )
        return Lease(self, name, token, ttl) if taken else None

    async def lease_holder(self, name: str) -> str | None:
        """The node holding lease ``name``, or ``None``."""
        value = await self._call(self._redis.get, self._key("lease", name))
        return None if value is None else _text(value).split(" ", 1)[0]

    @asynccontextmanager
    async def lease(self, name: str, *, ttl: float = 30.0) -> AsyncIterator[Lease]:
        """Hold lease ``name`` for the body, renewed every ``ttl / 3``, released after.

        :class:`LeaseBusy` if it is held. If it is lost anyway (Redis
        unreachable past the TTL), the body is cancelled and :class:`LeaseLost`
        raised: whoever takes it next must not find us still writing.
        """
        lease = await self.acquire_lease(name, ttl)
        if lease is None:
            raise LeaseBusy(f"lease {name!r} is held by another node")
        lost = False
        try:
            async with trio.open_nursery() as nursery:

                async def keep() -> None:
                    nonlocal lost
                    while True:
                        await trio.sleep(ttl / 3)
                        try:
                            renewed = await lease.renew()
                        except BusError:
                            continue
                        if not renewed:
                            lost = True
                            nursery.cancel_scope.cancel()
                            return

                nursery.start_soon(keep)
                try:
                    yield lease
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + 2):
                await lease.release()
        if lost:
            raise LeaseLost(f"lease {name!r} was lost while held")
