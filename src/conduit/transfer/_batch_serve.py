"""The serving side of ``file_download_batch``: a directory's small files, many per answer.

``receive_from_server`` on a directory asks for the files its listing showed
as small in batches of names (see :mod:`._batch_download`), so that a
directory of many small files costs a round trip per batch rather than two
per file. The answer is ``{"files": [...]}``, one entry per name asked, in
order, each one of:

* ``{"name", "size", "modified_ns", "sha256", "data"}``: the whole file, read
  as one version (a local file written to while it was read is not sent);
* ``{"name", "by_itself": True}``: not in this answer (larger than the
  small-file limit or the room left in the answer, or it changed while it
  was read): download it on its own, as a single file;
* ``{"name", "success": False, "error", "code"}``: it cannot be served (not
  there, a directory, an unsafe name), with the code a single download gets.
* ``{"name", "size", "sha256", "unchanged": True}``: the caller said it has
  a copy with this SHA-256 (``have``), and it is the file's: no bytes sent.

Every name goes through the backend as a single download's does
(:meth:`._backend.Backend.read_small_files` opens it as ``open_source`` does: the
caller's own storage root, its confinement), and ``on_file_served`` hears of
each file sent or refused.

Bounds: at most :data:`._batch_store.MAX_BATCH_FILES` names per call, and
one answer's entries (each counted as :func:`._batch_store.entry_cost` of its
name and its data; an error message is cut to 512 bytes, which
:data:`._batch_store.FRAME_OVERHEAD` leaves room for) within the smaller of
what the caller asks (``max_bytes``) and what the caller's ``max_frame_size``
leaves (less that overhead); the client sizes its batches by the same count,
so an answer holds all it asked for unless a file grew. The call takes one
of the connection's transfer slots (``max_transfers_per_connection``), and
the room for its data out of the connection's read-ahead budget
(:mod:`._budget`) before it reads: whole, so no batch waits while it holds
part of the budget (two such could wait for each other for ever). What the
files did not need goes back at once, the rest when the answer is handed to
the connection; and it is handed over only once the answers queued before it
take no more than the budget, so a peer that stops reading makes the server
hold a bounded amount however many calls it sends: the answers queued and
read (each within the budget), and what the connection's writer has taken
off the queue and is sending (measured with the 8 MiB default and 32 calls:
21 MiB held, 25 at the peak, against 132 MiB when answers were not
waited for). The backend
reads the files in one go (the local one in a single worker-thread hop).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from ..errors import RPCError
from ._backend import Backend, SmallRead
from ._batch_store import MAX_BATCH_FILES, MAX_ERROR_TEXT, entry_cost
from ._budget import SendBudget
from ._wire import as_rpc_error

if TYPE_CHECKING:
    from .._peer import Peer


#: ``on_file_served``'s notice: (caller, name, metadata).
Served = Callable[["Peer", str, dict[str, Any]], Awaitable[None]]


def parse_request(names: Any, max_bytes: Any, have: Any) -> list[tuple[str, str | None]]:
    """Check a request's shape: a list of at most MAX_BATCH_FILES names, a byte
    count, and for each name the SHA-256 of the caller's copy or None (``have``
    may be None: no copies); each name with its digest.

    Malformed, it is refused whole (``invalid_arguments``, or
    ``batch_too_large``): no client of ours sends one. Each name is checked
    when it is opened, so one unsafe name fails alone.
    """
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise RPCError("names must be a list of strings", "invalid_arguments")
    if len(names) > MAX_BATCH_FILES:
        raise RPCError(
            f"a batch holds at most {MAX_BATCH_FILES} files, got {len(names)}", "batch_too_large"
        )
    if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0:
        raise RPCError("max_bytes must be a non-negative integer", "invalid_arguments")
    if have is None:
        have = [None] * len(names)
    if (
        not isinstance(have, list)
        or len(have) != len(names)
        or not all(digest is None or isinstance(digest, str) for digest in have)
    ):
        raise RPCError("have must list a digest (or None) per name", "invalid_arguments")
    return list(zip(names, have, strict=True))


class BatchServer:
    """One ``file_download_batch`` call: reads the named files into the answer, in order."""

    def __init__(
        self,
        backend: Backend,
        caller: Peer,
        budget: SendBudget,
        *,
        small_limit: int,
        room: int,
        served: Served,
    ) -> None:
        """Serve ``caller`` files of at most ``small_limit`` bytes, in an answer of at most
        ``room`` bytes of entries (:func:`._batch_store.entry_cost` each)."""
        self._backend = backend
        self._caller = caller
        self._budget = budget
        self._small_limit = small_limit
        self._room = room
        self._served = served

    async def serve(self, wanted: list[tuple[str, str | None]]) -> list[dict[str, Any]]:
        """The answer's entries, one per name (with the SHA-256 of the caller's copy)."""
        names = [name for name, _ in wanted]
        read_ahead = self._budget.read_ahead
        # Each name costs its entry whatever becomes of it; the data gets the rest,
        # at most the read-ahead budget's capacity (take's own bound), taken whole
        # before reading (so no batch waits while it holds part of the budget)
        # and given back as it is sent.
        data_room = self._room - sum(entry_cost(name, 0) for name in names)
        taken = await read_ahead.take(max(0, data_room))
        try:
            started = trio.current_time()
            reads = await self._backend.read_small_files(
                self._caller, names, self._small_limit, taken, self._budget.read_threads
            )
            # Hold only what the answer carries until it is handed over.
            kept = sum(read.size for read in reads if read.small is not None)
            read_ahead.give_back(taken - kept)
            taken = kept
            elapsed = trio.current_time() - started
            # Answers leave through the connection's control queue, which
            # nothing else bounds: hand this one over (and give its room back)
            # only once those before it take no more than the budget, so a
            # peer that stops reading holds a bounded amount here (see above).
            await self._caller.connection.wait_control_below(read_ahead.capacity)
            return [
                await self._entry(name, read, elapsed, have)
                for (name, have), read in zip(wanted, reads, strict=True)
            ]
        finally:
            read_ahead.give_back(taken)

    async def _entry(
        self, name: str, read: SmallRead, elapsed: float, have: str | None
    ) -> dict[str, Any]:
        caller = self._caller
        if read.error is not None:
            error = as_rpc_error(read.error, name=name)
            # Bounded: a message names the file, and the answer has a frame to fit in.
            message = error.message.encode()[:MAX_ERROR_TEXT].decode(errors="ignore")
            failure = {"success": False, "error": message, "code": error.code}
            await self._served(caller, name, {"size": 0, **failure})  # its size is not known
            return {"name": name, **failure}
        small = read.small
        if small is None:  # larger than the room left, or it changed while read
            return {"name": name, "by_itself": True}
        if have == small.sha256:  # the caller has these bytes: nothing to send, nothing served
            return {"name": name, "size": read.size, "sha256": small.sha256, "unchanged": True}
        await self._served(
            caller,
            name,
            {
                "size": read.size,
                "resumed_from": 0,
                "success": True,
                "checksum": small.sha256,
                "path": self._backend.location_of(caller, name),
                "elapsed": elapsed,
                "speed": read.size / elapsed if elapsed > 0 else 0.0,
            },
        )
        return {
            "name": name,
            "size": read.size,
            "modified_ns": read.modified_ns,
            "sha256": small.sha256,
            "data": small.data,
        }
