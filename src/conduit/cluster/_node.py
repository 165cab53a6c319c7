"""A server's membership of the cluster: the bus, cluster-unique client ids, broadcasts, pushes.

A :class:`~conduit.Server` whose descriptor has ``cluster_url`` creates one
:class:`ClusterNode` (``server.cluster``) and runs it beside its listeners:

* **ids**: every client id the server hands out is registered in the bus
  (``SET NX``), so it is unique in the cluster and says which node the client
  is on; it is released when the client goes, and expires with its node.
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

import logging
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final

import trio

from .._rpc_proxy import to_wire
from ..errors import ConnectionClosed, RPCError
from ._push import PUSH_REQUEST, Pusher, PushRequest, deliver_staged, push_via_node
from .bus import BusError, ClientIdTaken, ClusterBus

if TYPE_CHECKING:
    from ..descriptors import ServerDescriptor
    from ..server import Server
    from .s3 import S3Store

__all__ = ["BROADCAST_EVENT", "ClusterNode"]

log = logging.getLogger("conduit.cluster.node")

#: The bus event that carries ``server.broadcast`` to the other nodes.
BROADCAST_EVENT: Final = "broadcast"
#: How often stale staged files are swept, and how old they must be.
_SWEEP_INTERVAL: Final = 3600.0
#: Bound on releasing a client id once its connection ended (the id expires anyway).
_RELEASE_TIMEOUT: Final = 5.0


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
        sender, so the files go out exactly as a local push would, and with
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
        """A fresh client id, unique in the cluster, registered to this node."""
        return await self.bus.new_client_id()

    async def claim_client_id(self, client_id: str) -> bool:
        """Register a known id here (a client resuming its session).

        False if another node holds it (its old connection there is still open).
        """
        try:
            await self.bus.register_client(client_id)
        except ClientIdTaken:
            return False
        return True

    async def release_client_id(self, client_id: str) -> None:
        """Forget ``client_id`` (its connection ended); never raises, bounded in time."""
        with trio.CancelScope(shield=True), trio.move_on_after(_RELEASE_TIMEOUT):
            try:
                await self.bus.unregister_client(client_id)
            except BusError as exc:
                # The bus no longer refreshes it, so the entry expires within the TTL.
                log.warning("releasing client id %s: %s", client_id, exc)

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
    ) -> dict[str, Any]:
        """Push ``path`` to ``client_id`` on whichever node it is connected to.

        Raises :class:`~conduit.ConnectionClosed` when no node has the client
        (as a local push to an unknown id does), and what opening the local
        file raises; every later failure is the usual ``{"success": False,
        ...}``, with code ``"unreachable"`` when its node dies or leaves before
        answering (noticed within ``cluster_ttl``).
        """
        node = await self._locate(client_id)
        return await push_via_node(self.bus, self.staging, node, client_id, path, remote_name)

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
        if kind != PUSH_REQUEST:
            raise RPCError(f"unknown cluster request {kind!r}", "not_found")
        request = PushRequest.parse(payload)
        peer = self._server.clients.get(request.client_id)
        if peer is None:
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
        return await deliver_staged(staging, request, peer, self._pusher)
