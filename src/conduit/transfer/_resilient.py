"""Transfers that outlive a lost connection: wait for the reconnect, resume, return success.

A transfer attempt (:meth:`Sender.send`, :meth:`Receiver.download`) already
leaves a resumable partial behind when its connection drops, and the next
attempt for the same file resumes from the verified offset (the receiver's
prefix hash must match the sender's). These loops just make that next attempt
happen on their own:

* client side (``send_to_server``, ``receive_from_server``): when the attempt
  failed *because its connection is gone*, wait for the client's automatic
  reconnect (:class:`~conduit.ClientDescriptor` ``reconnect_*``) and try again
  on the new connection; give up with the attempt's failure dict when the
  client does not reconnect (disabled, gave up, refused, ``disconnect()``).
  A client already disconnected (on purpose, or for good: no reconnect) when
  the transfer starts raises ``ConnectionClosed``, as one never connected
  does: there is nothing to wait for.
* server side (``send_to_client``): wait, up to a timeout, for the client id
  to come back (a reconnecting client keeps its id), then push again.

A failure on a connection that is still open (refused, checksum mismatch, no
such file) is returned as it is: only a lost link is worth waiting for. The
exception: an attempt refused at its start because its connection already
runs all it may (``overloaded``, ``too_many_streams``) waits for another of
this side's transfers on that connection to end, then tries again, and
one refused because other connections' calls hold the server's call
memory tries again after a pause, for up to 30 s (see :mod:`._turns`).
Cancellation is never caught here; what it leaves behind is the attempt's
business (a partial file kept for a later resume,
everything else freed).
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any

import trio

from ..errors import ConnectionClosed
from ._turns import Attempt, take_turn

if TYPE_CHECKING:
    from .._peer import Peer
    from ..client import Client
    from ..server import Server

log = logging.getLogger("conduit.transfer")

#: Connections one transfer may outlive (each costs the client a full
#: reconnect, itself bounded by ``reconnect_attempts``).
MAX_RESUMES = 100
#: A receiver that has not yet noticed the old connection is gone may still
#: hold the partial file ("busy"): wait this long between tries, this often.
_BUSY_WAIT = 0.5
_BUSY_TRIES = 20


async def on_client(client: Client, attempt: Attempt) -> dict[str, Any]:
    """Run ``attempt`` on the client's connection, again after each reconnect.

    Raises ``ConnectionClosed`` when the client was never connected, was
    disconnected (``disconnect()``) or lost its connection for good (no
    reconnect: disabled, given up, refused); a client that is reconnecting
    gives the lost session's Peer: the attempt fails on it and waits for the
    reconnect.
    """
    peer = client.server  # raises when disconnected on purpose
    if not peer.connected and not client.reconnecting:
        raise ConnectionClosed(peer.connection.close_reason or "connection closed")
    # One of several on a connection that is full waits for a turn (see ._turns).
    in_turn: Attempt = functools.partial(take_turn, attempt=attempt)
    result = await in_turn(peer)
    for _ in range(MAX_RESUMES):
        if result.get("success") or peer.connected:
            return result
        try:
            peer = await client._wait_reconnected(peer)
        except ConnectionClosed as exc:
            # Not coming back: the caller's failure says why (the reconnect
            # gave up, and on what), not only how the connection was lost.
            return {**result, "error": str(exc)}
        log.info("connection back; resuming the transfer (%s)", result.get("error"))
        result = await _retry_busy(peer, in_turn)
    return result


async def on_server(
    server: Server, client_id: str, timeout: float, attempt: Attempt
) -> dict[str, Any]:
    """Run ``attempt`` on ``client_id``'s connection, again if it comes back within ``timeout``."""
    peer = server.clients.get(client_id)
    if peer is None:
        raise ConnectionClosed(f"no connected client with id {client_id!r}")
    in_turn: Attempt = functools.partial(take_turn, attempt=attempt)
    result = await in_turn(peer)
    for _ in range(MAX_RESUMES):
        if result.get("success") or peer.connected:
            return result
        # A connection closed on purpose (the client's disconnect(), or ours)
        # is not coming back under this id: no waiting for it. Unless we
        # closed it because the client is back on another one already (its
        # reconnect replaced a connection we had not seen die).
        now = server.clients.get(client_id)
        if peer.connection.closed_on_purpose and (now is None or now is peer):
            return result
        back = await server._wait_for_client(client_id, timeout)
        if back is None:
            return result
        peer = back
        log.info("client %s is back; resuming the push", client_id)
        result = await _retry_busy(peer, in_turn)
    return result


async def _retry_busy(peer: Peer, attempt: Attempt) -> dict[str, Any]:
    result = await attempt(peer)
    for _ in range(_BUSY_TRIES):
        if result.get("code") != "busy" or not peer.connected:
            break
        await trio.sleep(_BUSY_WAIT)
        result = await attempt(peer)
    return result


__all__ = ["MAX_RESUMES", "on_client", "on_server"]
