"""Each user's share of a server's call memory, kept while the user is connected.

A server counts what the large calls and queued messages of all its
connections hold decoded in one :class:`~conduit.protocol.connection.CallMemory`
(``server_call_budget``). :class:`CallShares` gives each user (in
shared-password mode, each address: the owner the connection limits count)
a :class:`~conduit.protocol.connection.CallShare` of it
(``user_call_budget``), the same one for all of that user's connections, so
that no user can hold what the others need.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator

from .protocol.connection import CallMemory, CallShare


class CallShares:
    """The :class:`CallShare` of each user with a connection, by owner.

    A share lives as long as a connection of its user holds it (its
    settings and its state machine do), and no longer: the table keeps
    them weakly, so it never outgrows the connections. A connection gives
    back all it counted when it ends (``Connection._release_call_memory``),
    so a user's next connection, finding the share gone, starts from zero
    as the old one would have.
    """

    def __init__(self, server: CallMemory, limit: int) -> None:
        #: The server's memory, which every share counts into.
        self.server = server
        #: What each user's share may hold (see :meth:`CallShare.admits`).
        self.limit = limit
        self._shares: weakref.WeakValueDictionary[str, CallShare] = weakref.WeakValueDictionary()

    def of(self, owner: str) -> CallShare:
        """The share of ``owner``: the one its other connections hold, or a new one."""
        share = self._shares.get(owner)
        if share is None:
            share = self._shares[owner] = CallShare(self.limit, self.server)
        return share

    def __len__(self) -> int:
        """How many users hold a share now."""
        return len(self._shares)

    def __iter__(self) -> Iterator[CallShare]:
        """The shares held now (a copy: one may go while the caller looks)."""
        return iter(list(self._shares.values()))


__all__ = ["CallShares"]
