"""Resume tokens: how a reconnecting client gets its client id back, and nobody else does.

Every WELCOME carries a fresh random token, sent only inside the sealed
channel. A client that reconnects presents it, sealed, right after it has
authenticated again (see ``conduit._handshake_io.read_resume``); the server
then gives it the same ``client_id``. Knowing a client id is not enough: ids
are visible to server code and in logs, tokens only to the one client.
A token is also tied to the account it was issued to (``None`` in shared
password mode): someone holding alice's token who logs in as bob cannot take
alice's id, close her live connection as stale, or receive her pushes.

Tokens are single-use (each WELCOME replaces the last one), kept as their
SHA-256 (a table dump does not leak usable tokens), valid for
:data:`RESUME_TTL` seconds after their connection was lost (not after a
client's GOODBYE for good: a client that disconnects forgets its token, and
the server its digest, :meth:`ResumeTokens.retire`), and the table is
bounded (:data:`MAX_TOKENS`): when it is full a token goes, and its client
simply gets a new id when it comes back. The token that goes is the oldest of
the *owner* with the most tokens (an account, or in shared-password mode the
address the client came from, see :func:`conduit._throttle.address_key`): one
client that connects again and again, or many behind one address, evicts its
own tokens, never those of the clients that come and go now and then.

Single use counts from when the client is known to hold its next token: a
redeemed token is *held* by the session that redeemed it until that session
hears from its client (``held_by`` of :meth:`ResumeTokens.redeem`; a client
that sends a frame has its WELCOME, and the new token in it). Until then the
network may have lost the WELCOME, so the client may present the same token
again; a session that ends before hearing from its client puts the token
back (:meth:`ResumeTokens.settle`), never past ``ttl`` after it was first
redeemed. Without that, a reconnect cut inside its own handshake spent the
token, and the client came back under a new id.

In a cluster every token is also shared on the bus, again as its SHA-256
(:meth:`conduit.cluster._node.ClusterNode.share_resume_token`), so that a
client whose node died can resume on another one (the bus keeps the newest
:data:`~conduit.cluster.bus.RESUME_ENTRIES_PER_OWNER` of each owner's,
owners as here); there the bus entry
decides, held in the same way for the whole cluster (the redeeming node
deletes it once its session has heard from the client:
:meth:`conduit.cluster._node.ClusterNode.spend_resume_token`).
"""

from __future__ import annotations

import hashlib
import heapq
import math
import secrets
from collections.abc import Callable

import attrs

#: Seconds a disconnected client may take to come back and keep its id.
RESUME_TTL = 3600.0
#: Tokens kept at most (one per client seen within ``RESUME_TTL``).
MAX_TOKENS = 100_000
#: The key of whoever a token counts against when the table is full (see the
#: module docstring); None: one owner for all the tokens issued without one.
Owner = str | None
_TOKEN_BYTES = 32


@attrs.define
class _Entry:
    client_id: str
    #: The authenticated account the token was issued to (None in shared mode).
    username: str | None
    owner: Owner = None
    expires: float = math.inf
    #: Redeemed by a session that may not have heard from its client yet:
    #: whether it has (None: not held).
    held_by: Callable[[], bool] | None = None
    #: Fixed when first held: a token put back never lives past it (or one
    #: leaked could be kept good for ever, redeemed and dropped again and again).
    deadline: float = math.inf
    #: The owner's tokens are a list, oldest first, linked through these
    #: digests: a few bytes a token, where a container per owner would double
    #: the table's size when every client comes from an address of its own.
    older: bytes | None = None
    newer: bytes | None = None


@attrs.define
class _OwnerTokens:
    """The ends of one owner's list of tokens, and its length."""

    oldest: bytes
    newest: bytes
    count: int = 1


class ResumeTokens:
    """Token digest -> client id, bounded in size and in time.

    Times are the caller's clock (``trio.current_time()``), so a test's
    MockClock drives expiry like every other timer.
    """

    def __init__(self, *, ttl: float = RESUME_TTL, max_tokens: int = MAX_TOKENS) -> None:
        self._ttl = ttl
        self._max = max_tokens
        self._entries: dict[bytes, _Entry] = {}
        self._by_client: dict[str, bytes] = {}
        # Each owner's tokens, oldest first, and the owners by how many they
        # hold (each count's owners in the order they reached it): a full
        # table evicts from the biggest owner in O(1), as an LFU cache does.
        self._owner_tokens: dict[Owner, _OwnerTokens] = {}
        self._owners_by_count: dict[int, dict[Owner, None]] = {}
        self._top_count = 0
        # (expires, digest) of every start_expiry, soonest first: the sweep
        # pops what is due instead of scanning the table on each disconnect.
        # Items whose token was redeemed or replaced since are skipped then.
        self._expiries: list[tuple[float, bytes]] = []

    def __len__(self) -> int:
        return len(self._entries)

    def issue(
        self,
        client_id: str,
        username: str | None = None,
        token: bytes | None = None,
        *,
        owner: Owner = None,
    ) -> bytes:
        """A new token for ``client_id`` (logged in as ``username``), replacing the one it had.

        ``token``: one made beforehand by :func:`new_token` (a WELCOME sent
        before the client had confirmed carries it; it is valid from now on).
        ``owner``: whom the token counts against when the table is full (its
        account, or the address key of its client in shared-password mode).
        """
        self._forget(client_id)
        if token is None:
            token = new_token()
        digest = token_digest(token)
        entry = self._entries[digest] = _Entry(client_id, username, owner)
        self._by_client[client_id] = digest
        self._count_in(entry, digest)
        while len(self._entries) > self._max:
            biggest = next(iter(self._owners_by_count[self._top_count]))
            self.spend(self._owner_tokens[biggest].oldest)
        return token

    def redeem(
        self,
        token: bytes,
        now: float,
        username: str | None = None,
        held_by: Callable[[], bool] | None = None,
    ) -> str | None:
        """The client id ``token`` was issued for, once; None if unknown, expired or not ours.

        Only the account the token was issued to (``username``, None in
        shared mode) may redeem it. Another account's attempt leaves the
        token in place, still good for its owner.

        ``held_by``: whether the session redeeming it has heard from its
        client; the token stays good until then (see the module docstring,
        and :meth:`settle` when that session ends). None: spent at once.
        """
        digest = token_digest(token)
        entry = self._entries.get(digest)
        if entry is None or entry.username != username:
            return None
        if now >= entry.expires or (entry.held_by is not None and entry.held_by()):
            # Expired, or redeemed by a session that has heard from its
            # client since: that client holds a newer token.
            self.spend(digest)
            return None
        if held_by is None:
            self.spend(digest)
            return entry.client_id
        if self._by_client.get(entry.client_id) == digest:
            del self._by_client[entry.client_id]  # the new WELCOME's token is current
        if entry.deadline == math.inf:
            entry.deadline = entry.expires if entry.expires != math.inf else now + self._ttl
        entry.expires = math.inf
        entry.held_by = held_by
        return entry.client_id

    def settle(self, handle: bytes, now: float, held_by: Callable[[], bool]) -> None:
        """The session that redeemed ``handle``'s token as ``held_by`` ended (or never began).

        ``handle`` is :func:`token_digest` of the token. Heard from its
        client: the token is spent. Not: the client may not have its next
        token, so this one is good for ``ttl`` more seconds, but never past
        the deadline it had when first redeemed. A token a later session
        redeemed since is that session's to settle.
        """
        entry = self._entries.get(handle)
        if entry is None or entry.held_by is not held_by:
            return
        if held_by():
            self.spend(handle)
            return
        entry.held_by = None
        self.start_expiry(handle, now)
        entry.expires = min(entry.expires, entry.deadline)

    def spend(self, handle: bytes) -> None:
        """Forget ``handle``'s token: good no more (a no-op for one already gone)."""
        entry = self._entries.pop(handle, None)
        if entry is None:
            return
        # (A held token is not its client's current one: leave that be.)
        if self._by_client.get(entry.client_id) == handle:
            del self._by_client[entry.client_id]
        self._count_out(entry)

    def current(self, client_id: str) -> bytes | None:
        """A handle on ``client_id``'s token now (for :meth:`start_expiry`), if it has one."""
        return self._by_client.get(client_id)

    def start_expiry(self, handle: bytes | None, now: float) -> None:
        """The connection that got ``handle``'s token ended: it is good for ``ttl`` more seconds.

        A token already redeemed or replaced is not touched: a replaced
        connection's end must not start the clock on its successor's token
        (nor on a token a newer session holds: see :meth:`settle`).
        """
        entry = self._entries.get(handle) if handle is not None else None
        if entry is not None and handle is not None and entry.held_by is None:
            entry.expires = now + self._ttl
            heapq.heappush(self._expiries, (entry.expires, handle))
            if len(self._expiries) > 2 * self._max + 64:
                self._rebuild_expiries()
        self._sweep(now)

    def retire(self, handle: bytes | None, now: float) -> None:
        """The connection that got ``handle``'s token ended with its client's
        GOODBYE for good: the client forgot the token (``Client.disconnect``),
        so it goes now rather than in ``ttl`` seconds. A token redeemed or
        replaced since is not touched, as by :meth:`start_expiry`.
        """
        entry = self._entries.get(handle) if handle is not None else None
        if entry is not None and handle is not None and entry.held_by is None:
            self.spend(handle)
        self._sweep(now)

    def owners(self) -> int:
        """How many owners hold a token now (for tests and diagnostics)."""
        return len(self._owner_tokens)

    def _forget(self, client_id: str) -> None:
        digest = self._by_client.get(client_id)
        if digest is not None:
            self.spend(digest)

    def _sweep(self, now: float) -> None:
        expiries = self._expiries
        while expiries and expiries[0][0] <= now:
            _, digest = heapq.heappop(expiries)
            entry = self._entries.get(digest)
            if entry is not None and entry.expires <= now:
                self.spend(digest)

    def _count_in(self, entry: _Entry, digest: bytes) -> None:
        """Append ``entry`` (just put in the table) to its owner's list."""
        tokens = self._owner_tokens.get(entry.owner)
        if tokens is None:
            tokens = self._owner_tokens[entry.owner] = _OwnerTokens(digest, digest, 0)
        else:
            entry.older = tokens.newest
            self._entries[tokens.newest].newer = digest
            tokens.newest = digest
        tokens.count += 1
        self._move(entry.owner, tokens.count - 1, tokens.count)
        self._top_count = max(self._top_count, tokens.count)

    def _count_out(self, entry: _Entry) -> None:
        """Unlink ``entry`` (just taken out of the table) from its owner's list."""
        tokens = self._owner_tokens[entry.owner]
        older, newer = entry.older, entry.newer
        if older is not None:
            self._entries[older].newer = newer
        elif newer is not None:
            tokens.oldest = newer
        if newer is not None:
            self._entries[newer].older = older
        elif older is not None:
            tokens.newest = older
        tokens.count -= 1
        self._move(entry.owner, tokens.count + 1, tokens.count)
        if not tokens.count:
            del self._owner_tokens[entry.owner]
        # Counts move by one, so the top count is found again by stepping down.
        while self._top_count and self._top_count not in self._owners_by_count:
            self._top_count -= 1

    def _move(self, owner: Owner, old: int, new: int) -> None:
        if old:
            owners = self._owners_by_count[old]
            del owners[owner]
            if not owners:
                del self._owners_by_count[old]
        if new:
            self._owners_by_count.setdefault(new, {})[owner] = None

    def _rebuild_expiries(self) -> None:
        # Bound the heap: drop the items of tokens redeemed, replaced or evicted.
        self._expiries = [
            (entry.expires, digest)
            for digest, entry in self._entries.items()
            if entry.expires != math.inf
        ]
        heapq.heapify(self._expiries)


def new_token() -> bytes:
    """A fresh random token, not yet valid anywhere (see :meth:`ResumeTokens.issue`)."""
    return secrets.token_bytes(_TOKEN_BYTES)


def token_digest(token: bytes) -> bytes:
    """What a token is kept as: its SHA-256 (here and, in a cluster, on the bus)."""
    return hashlib.sha256(token).digest()


__all__ = ["MAX_TOKENS", "RESUME_TTL", "Owner", "ResumeTokens", "new_token", "token_digest"]
