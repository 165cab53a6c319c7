"""A server's membership of the cluster: the bus, cluster-unique client ids, broadcasts, pushes.

A :class:`~conduit.Server` whose descriptor has ``cluster_url`` creates one
:class:`ClusterNode` (``server.cluster``) and runs it beside its listeners:

* **ids**: every client id the server hands out is registered in the bus
  (``SET NX``), so it is unique in the cluster and says which node the client
  is on; it is released when the client goes, and expires with its node.
* **resume**: every resume token the server issues is shared on the bus (as
  its SHA-256, see :mod:`conduit._resume`), so a client that lost its node
  and reconnects to another keeps its id: the new node redeems the token,
  moves the id's registration to itself and tells the old node, which closes
  the client's stale connection there (:meth:`ClusterNode.resume_client_id`).
* **broadcast**: ``server.broadcast`` sends to this node's clients, then
  publishes the event on the bus; every other node sends it to its own
  clients (:meth:`ClusterNode.broadcast`, the ``"broadcast"`` bus event).
* **push**: ``send_to_client`` for a client that is not here asks
  :meth:`ClusterNode.push`, which stages the file in the shared store and has
  the client's node deliver it (:mod:`._push`).

Nothing here is imported unless ``cluster_url`` is set; it needs the
``cluster`` extra (redis, and boto3 when ``cluster_staging`` is set).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
from collections import OrderedDict
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final

import trio

from .._resume import RESUME_TTL, token_digest
from .._rpc_proxy import to_wire
from ..errors import ConnectionClosed, RPCError
from ._push import (
    PUSH_REQUEST,
    ProgressCallback,
    Pusher,
    PushRequest,
    deliver_staged,
    push_via_node,
)
from .bus import BusError, ClusterBus

if TYPE_CHECKING:
    from ..descriptors import ServerDescriptor
    from ..server import Server
    from .s3 import S3Store

__all__ = ["BROADCAST_EVENT", "CLIENT_MOVED", "ClusterNode"]

log = logging.getLogger("conduit.cluster.node")

#: The bus event that carries ``server.broadcast`` to the other nodes.
BROADCAST_EVENT: Final = "broadcast"
#: The one-way bus request that tells a node one of its clients resumed elsewhere.
CLIENT_MOVED: Final = "client_moved"
#: How often stale staged files are swept, and how old they must be.
_SWEEP_INTERVAL: Final = 3600.0
#: Bound on releasing a client id once its connection ended (the id expires anyway).
_RELEASE_TIMEOUT: Final = 5.0
#: Clients remembered as resumed on another node (for pushes waiting for them here).
_MOVED_KEPT: Final = 10_000


class ClusterNode:
    """One server's part in the cluster: see the module docstring.

    Created by :class:`~conduit.Server` when ``descriptor.cluster_url`` is set;
    :meth:`run` starts with the server and stops with it.
    """

    def __init__(self, server: Server, descriptor: ServerDescriptor) -> None:
        """Configure from the descriptor; nothing is contacted until :meth:`run`."""
        assert descriptor.cluster_url is not None
        self._server = server
        #: The bus connection (registrations, inboxes, events).
        self.bus = ClusterBus(
            descriptor.cluster_url,
            descriptor.node_name,
            namespace=descriptor.cluster_namespace,
            ttl=descriptor.cluster_ttl,
        )
        self._staging_url = descriptor.cluster_staging
        self._staging: S3Store | None = None
        # The transfer handler's own S3 store (storage_dir="s3://..."): staged
        # in when cluster_staging is unset, never closed here (it is the handler's).
        self._handler_store: S3Store | None = None
        self._pusher: Pusher | None = None
        #: Client id -> the digest of its current resume token on the bus, for
        #: this node's connected clients (refreshed while they stay).
        self._resume_digests: dict[str, str] = {}
        #: Client id -> connections of this node holding it (handed out and
        #: not released yet): a reconnect here overlaps its stale predecessor,
        #: and only the last one to end may release the id.
        self._holders: dict[str, int] = {}
        #: Client id -> the node it resumed its session on, for clients that
        #: left this node that way (the newest few; forgotten when one is back).
        self._moved_away: OrderedDict[str, str] = OrderedDict()
        #: Client id -> when (a serial of this node) it was last claimed here:
        #: a "moved away" notice that raced a claim here is out of date (see
        #: :meth:`_client_moved`). The newest few, as ``_moved_away``.
        self._claims: OrderedDict[str, int] = OrderedDict()
        self._claim_serials = itertools.count()
        self.bus.on_event(self._on_event)
        self.bus.on_request(self._on_request)

    @property
    def node_name(self) -> str:
        """This node's name in the cluster."""
        return self.bus.node_name

    @property
    def staging(self) -> S3Store | None:
        """The store cross-node pushes are staged in (None without one).

        ``cluster_staging`` while running, else the transfer handler's own S3
        store when its ``storage_dir`` is ``s3://...``.
        """
        return self._staging if self._staging is not None else self._handler_store

    def serve_pushes(self, pusher: Pusher, store: S3Store | None = None) -> None:
        """Deliver pushes from other nodes to this node's clients with ``pusher``.

        ``FileTransferHandler.register_server_handlers`` calls this with its
        local push, so the files go out exactly as a local push would (in
        their turn, waiting for a client whose connection drops to come
        back, and resuming), and with
        its S3 store if it stores in one (the staging area without
        ``cluster_staging``).
        """
        self._pusher = pusher
        self._handler_store = store

    # ----------------------------------------------------------------- lifecycle

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Join the cluster, serve it until cancelled, then leave (the bus unregisters us)."""
        if self._staging_url is not None:
            # boto3 is imported only by a node that stages pushes.
            from .s3 import S3Store

            self._staging = S3Store(self._staging_url)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.bus.run)
                if self.staging is not None:
                    nursery.start_soon(self._sweep_staging, self.staging)
                nursery.start_soon(self._refresh_resume_tokens)
                log.info("cluster node %r joined %s", self.node_name, self.bus.namespace)
                task_status.started()
        finally:
            if self._staging is not None:
                self._staging.close()
                self._staging = None

    async def _sweep_staging(self, store: S3Store) -> None:
        # Staged files are deleted once delivered; only a node killed mid-push
        # leaves one behind. Any node may sweep: deleting twice is harmless.
        # Only the staging area: upload partials are the transfer handler's.
        while True:
            try:
                await store.cleanup_staging(_SWEEP_INTERVAL)
            except Exception as exc:
                log.warning("sweeping staged pushes failed: %s", exc)
            await trio.sleep(_SWEEP_INTERVAL)

    # ----------------------------------------------------------------- client ids

    async def new_client_id(self) -> str:
        """A fresh client id, unique in the cluster, registered to this node.

        Held until :meth:`release_client_id`.
        """
        client_id = await self.bus.new_client_id()
        self._hold(client_id)
        return client_id

    def _hold(self, client_id: str) -> None:
        self._holders[client_id] = self._holders.get(client_id, 0) + 1
        self._moved_away.pop(client_id, None)

    def moved_away(self, client_id: str) -> str | None:
        """The node ``client_id`` resumed its session on, if it left this node that way.

        A push waiting here for the client to come back stops waiting then
        (see ``Server._wait_for_client``), and the transfer handler finishes
        it through that node.
        """
        return self._moved_away.get(client_id)

    async def claim_client_id(self, client_id: str) -> None:
        """Register a known id here (a client resuming its session), wherever it was.

        Only for an id the client proved is its own (its resume token): its
        connection to the node that holds the id is a dead one, so the id
        moves here at once, and that node is told to close its stale
        connection (it also notices at its next heartbeat).
        """
        previous = await self.bus.move_client(client_id)
        # In the same step as move_client's own bookkeeping (no checkpoint in
        # between): a notice handled across this claim sees the serial change.
        self._claims[client_id] = next(self._claim_serials)
        self._claims.move_to_end(client_id)
        while len(self._claims) > _MOVED_KEPT:
            self._claims.popitem(last=False)
        if previous is not None and previous != self.node_name:
            log.info("client %s resumed here, moved from node %r", client_id, previous)
            try:
                await self.bus.tell(previous, CLIENT_MOVED, {"client_id": client_id})
            except BusError as exc:
                log.warning(
                    "could not tell node %r that client %s moved: %s", previous, client_id, exc
                )

    async def release_client_id(
        self,
        client_id: str,
        *,
        forgotten_token: bytes | None = None,
        counted_against: str | None = None,
    ) -> None:
        """A connection given ``client_id`` ended; never raises, bounded in time.

        Once no connection of this node holds the id any more (one handed
        out by :meth:`new_client_id` or :meth:`resume_client_id`, once per
        connection), it is unregistered, and its resume token stays
        redeemable on any node for ``RESUME_TTL`` from now.
        ``forgotten_token``: the handle (:func:`~conduit._resume.token_digest`)
        of the token of a connection whose client said goodbye for good (it
        forgot it): spent now, even while another connection of that client
        holds the id (a stale one, whose end must not make it good again);
        ``counted_against``: whom that token counted against (as given to
        :meth:`share_resume_token`), whose bound on the bus it leaves too.
        """
        forgotten = None if forgotten_token is None else forgotten_token.hex()
        if forgotten is not None and self._resume_digests.get(client_id) == forgotten:
            del self._resume_digests[client_id]  # neither refreshed nor expired again
        left = self._holders.get(client_id, 0) - 1
        if left > 0:  # a reconnect of the same client, here, holds it now
            self._holders[client_id] = left
        else:
            self._holders.pop(client_id, None)
        digest = self._resume_digests.pop(client_id, None) if left <= 0 else None
        with trio.CancelScope(shield=True), trio.move_on_after(_RELEASE_TIMEOUT):
            try:
                if left <= 0:
                    await self.bus.unregister_client(client_id)
                if forgotten is not None:
                    await self.bus.spend_resume(
                        forgotten, counted_against=_counted_tag(counted_against)
                    )
                if digest is not None:
                    await self.bus.expire_resume([digest], RESUME_TTL)
            except BusError as exc:
                # The bus no longer refreshes it, so the entry expires within the TTL.
                log.warning("releasing client id %s: %s", client_id, exc)

    # ----------------------------------------------------------------- resume tokens

    async def share_resume_token(
        self, token: bytes, client_id: str, username: str | None, counted_against: str
    ) -> None:
        """Make ``token`` (just issued to ``client_id``) redeemable on every node.

        Stored as its SHA-256, tied to ``username`` like the local table; it
        replaces the client's previous token. ``counted_against``: whom it
        counts against, as in the local table (the account, or the address
        with a shared password): the bus keeps each one's newest
        :data:`~conduit.cluster.bus.RESUME_ENTRIES_PER_OWNER` tokens.
        :class:`BusError` if the bus is unreachable (the handshake then
        fails, as for a new id).
        """
        digest = token_digest(token).hex()
        previous = self._resume_digests.get(client_id)
        await self.bus.share_resume(
            digest,
            client_id,
            _owner(username),
            RESUME_TTL,
            replaces=previous,
            counted_against=_counted_tag(counted_against),
        )
        self._resume_digests[client_id] = digest

    async def resume_client_id(self, token: bytes, username: str | None) -> str | None:
        """The id ``token`` was issued for, by any node, now registered here; None if unknown.

        Only ``username``'s (the account it was issued to, None in
        shared-password mode). The token stays good, in the whole cluster,
        until the session that redeemed it has heard from its client
        (:meth:`spend_resume_token`; the network may lose the WELCOME with
        the next token, and the client then presents this one again), and
        for at most ``RESUME_TTL`` from its first redemption, as on a single
        server (see ``conduit._resume``). The id moves here
        (:meth:`claim_client_id`) from wherever it was registered, this node
        included (a stale connection here, or one that has just ended), and
        is held until :meth:`release_client_id`.
        """
        digest = token_digest(token).hex()
        client_id = await self.bus.redeem_resume(digest, _owner(username), hold=RESUME_TTL)
        if client_id is not None:
            if self._resume_digests.get(client_id) == digest:
                # Its stale connection was here: the token must be neither
                # refreshed (its hold would outlive its deadline) nor deleted
                # as replaced by the WELCOME's new one (which may be lost).
                del self._resume_digests[client_id]
            # Held before the move registers it here: a handshake whose
            # deadline ends the claim after the move (while the old node is
            # told) would otherwise leave the id registered, refreshed by
            # this node for ever, with nobody to release it.
            self._hold(client_id)
            try:
                await self.claim_client_id(client_id)
            except BaseException:
                await self.release_client_id(client_id)  # shielded, bounded, never raises
                raise
            # Here now, whatever a notice handled during the claim said.
            self._moved_away.pop(client_id, None)
        return client_id

    async def spend_resume_token(
        self, token_handle: bytes, counted_against: str | None = None
    ) -> None:
        """The session that redeemed a token has heard from its client, who
        holds the next one: the token (``token_handle``, its
        :func:`~conduit._resume.token_digest`) is good no more, and leaves
        the bound of ``counted_against`` (whom it counted against, as given
        to :meth:`share_resume_token`). Never raises, bounded in time (if the
        bus is unreachable, the hold's own deadline ends it)."""
        with trio.CancelScope(shield=True), trio.move_on_after(_RELEASE_TIMEOUT):
            try:
                await self.bus.spend_resume(
                    token_handle.hex(), counted_against=_counted_tag(counted_against)
                )
            except BusError as exc:
                log.warning("spending a redeemed resume token: %s", exc)

    async def _refresh_resume_tokens(self) -> None:
        # A connected client's token must outlive its connection by RESUME_TTL
        # even if this node dies without a goodbye: refreshed well within it.
        while True:
            await trio.sleep(RESUME_TTL / 4)
            try:
                await self.bus.expire_resume(list(self._resume_digests.values()), RESUME_TTL)
            except BusError as exc:
                log.warning("refreshing resume tokens: %s", exc)

    async def _client_moved(self, payload: dict[str, Any], sender: str) -> None:
        client_id = payload.get("client_id")
        if not isinstance(client_id, str):
            raise RPCError("malformed client_moved notice", "invalid_arguments")
        peer = self._server.clients.get(client_id)
        claimed = self._claims.get(client_id)
        located = await self.bus.locate_client(client_id)
        if located == self.node_name or self._claims.get(client_id) != claimed:
            # It came back here meanwhile: the notice is out of date. (A claim
            # here whose move crossed our lookup on the bus is caught by its
            # serial: forgetting the id now would stop its refresh, and the
            # id would expire while the client is connected here.)
            return
        self.bus.forget_client(client_id)
        self._resume_digests.pop(client_id, None)
        self._moved_away[client_id] = sender
        while len(self._moved_away) > _MOVED_KEPT:
            self._moved_away.popitem(last=False)
        self._server._arrivals.unpark_all()  # pushes waiting for it here: it is not coming
        if peer is not None and self._server.clients.get(client_id) is peer:
            log.info(
                "client %s resumed on node %r: closing its stale connection", client_id, sender
            )
            await peer.connection.close(f"the client resumed its session on node {sender!r}", 0.5)

    # ----------------------------------------------------------------- broadcast

    async def broadcast(self, event: str, data: Any, exclude: Iterable[str]) -> None:
        """Publish ``server.broadcast(event, data, exclude)`` to the other nodes.

        Best effort, like a broadcast to local clients: if the bus is
        unreachable the other nodes miss it and a warning is logged.
        """
        # Unstructured as Peer.send does, so attrs instances cross the bus as maps.
        document = {"event": event, "data": to_wire(data), "exclude": sorted(exclude)}
        try:
            await self.bus.broadcast(BROADCAST_EVENT, document)
        except (BusError, TypeError, ValueError) as exc:
            log.warning("broadcast %r did not reach the other nodes: %s", event, exc)

    async def _on_event(self, kind: str, payload: Any, sender: str) -> None:
        if kind != BROADCAST_EVENT or not isinstance(payload, dict):
            log.warning("ignoring cluster event %r from %r", kind, sender)
            return
        event, exclude = payload.get("event"), payload.get("exclude", [])
        if not isinstance(event, str) or not isinstance(exclude, list):
            log.warning("ignoring a malformed broadcast from %r", sender)
            return
        await self._server._broadcast_local(event, payload.get("data"), exclude)

    # ----------------------------------------------------------------- push

    async def push(
        self,
        client_id: str,
        path: str | os.PathLike[str],
        remote_name: str | None,
        on_progress: ProgressCallback | None = None,
    ) -> dict[str, Any]:
        """Push ``path`` to ``client_id`` on whichever node it is connected to.

        ``on_progress`` gets the delivering node's progress reports (about ten
        a second at most, and the last one). Raises
        :class:`~conduit.ConnectionClosed` when no node has the client (as a
        local push to an unknown id does), and what opening the local file
        raises; every later failure is the usual ``{"success": False, ...}``,
        with code ``"unreachable"`` when its node dies or leaves before
        answering (noticed within ``cluster_ttl``).
        """
        node = await self._locate(client_id)
        return await push_via_node(
            self.bus, self.staging, node, client_id, path, remote_name, on_progress
        )

    async def _locate(self, client_id: str) -> str:
        try:
            node = await self.bus.locate_client(client_id)
        except BusError as exc:
            raise ConnectionClosed(
                f"cannot reach the cluster to find client {client_id!r}: {exc}"
            ) from exc
        if node is None or node == self.node_name:
            # Ours but not in server.clients: it is connecting or just left.
            raise ConnectionClosed(f"no connected client with id {client_id!r} on any node")
        return node

    async def _on_request(self, kind: str, payload: dict[str, Any], sender: str) -> dict[str, Any]:
        if kind == CLIENT_MOVED:
            await self._client_moved(payload, sender)
            return {}
        if kind != PUSH_REQUEST:
            raise RPCError(f"unknown cluster request {kind!r}", "not_found")
        request = PushRequest.parse(payload)
        peer = self._server.clients.get(request.client_id)
        if peer is None:  # (looked at before the staged file is fetched)
            raise RPCError(
                f"client {request.client_id!r} is not connected to node {self.node_name!r}",
                "connection_closed",
            )
        if self._pusher is None:
            raise RPCError(f"node {self.node_name!r} has no FileTransferHandler", "not_found")
        staging = self.staging
        if staging is None:
            raise RPCError(f"node {self.node_name!r} has no cluster_staging", "no_staging")
        log.info("push of %r to client %s, staged by node %r", request.name, peer.id, sender)
        return await deliver_staged(
            staging, request, self._server, self._pusher, self.bus.report_progress
        )


def _owner(username: str | None) -> str:
    """The bus tag of the account a token is for: a hash, so no name goes into Redis."""
    if username is None:
        return "-"
    return _tag(b"conduit-user", username)


def _counted_tag(counted_against: str | None) -> str | None:
    """The bus tag of whom tokens count against (an account, an address)."""
    return None if counted_against is None else _tag(b"conduit-owner", counted_against)


def _tag(kind: bytes, name: str) -> str:
    """A name (an account, an address) as it goes into Redis: a hash of it."""
    return hashlib.sha256(kind + b"\0" + name.encode()).hexdigest()
