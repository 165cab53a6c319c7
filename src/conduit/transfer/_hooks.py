"""What the sender and receiver share from the handler: its settings and the user's callbacks.

The callbacks are shared by the receiver (``on_file_received``) and the sender (``on_file_served``)
so that both run user code the same way: through :func:`invoke` (sync or async;
in the application's world when it lives in asyncio), one after the other, and
a callback that raises is logged, never allowed to fail the transfer that has
already succeeded or to stop the callbacks after it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import attrs

from .._callbacks import invoke
from ._hashing import HashGate

if TYPE_CHECKING:
    from ._backend import Backend
    from ._slots import TransferLimits

log = logging.getLogger("conduit.transfer")


class TransferSettings(Protocol):
    """What the sender and receiver read from ``FileTransferHandler`` at each use.

    Read live rather than copied, so that changing an attribute of the handler
    after construction (``handler.overwrite = True``) takes effect.
    """

    #: Where the server side stores (see :mod:`._backend`).
    backend: Backend
    chunk_size: int
    max_file_size: int | None
    overwrite: bool
    partial_ttl: float
    max_listed: int
    max_transfers_per_connection: int
    max_transfers: int | None
    max_transfers_per_user: int | None
    free_space_margin: int
    max_partial_bytes: int | None
    max_reserved_per_user: int | None
    read_ahead_per_connection: int
    resume_hash_budget: int
    hash_gate: HashGate

    def transfer_limits(self) -> TransferLimits:
        """The limits a transfer's slot counts against, as they stand now."""


@attrs.define
class Hooks:
    """The registered callbacks, in registration order."""

    received: list[Callable[..., Any]] = attrs.field(factory=list)
    served: list[Callable[..., Any]] = attrs.field(factory=list)
    #: ``on_progress``: the files the peer sends this side on its own
    #: initiative (uploads to a server, pushes to a client).
    progress: list[Callable[..., Any]] = attrs.field(factory=list)


async def notify(
    callbacks: list[Callable[..., Any]],
    event: str,
    *args: Any,
    metadata: dict[str, Any] | None = None,
) -> None:
    """Run each callback as ``callback(*args, metadata)`` (``callback(*args)``
    without ``metadata``); log (and survive) one that raises.

    Each callback gets its own copy of ``metadata``, so one that edits it does
    not change what the next one sees.
    """
    for callback in callbacks:
        try:
            if metadata is None:
                await invoke(callback, *args)
            else:
                await invoke(callback, *args, dict(metadata))
        except Exception:
            log.exception("%s callback %r failed", event, callback)
