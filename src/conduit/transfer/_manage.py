"""Deleting and renaming stored files: the ``file_delete`` and ``file_rename`` RPCs.

The server's side asks the handler's backend (:mod:`._backend`). In a local
directory that is :meth:`StorageRoot.delete` / :meth:`StorageRoot.rename` in
a worker thread: confined to the storage root, never following a symlink,
atomic, refusing to overwrite unless asked, and refusing (``"busy"``) a name a
transfer is writing at that moment. In an object store, a server-side copy
then a delete (see :mod:`._backend_store`). The client's side turns every refusal into
the usual failure dict, ``{"success": False, "error": ..., "code": ...}``, with
the codes ``not_found``, ``exists``, ``busy`` and ``unsafe_path``.
"""

from __future__ import annotations

import logging
from typing import Any

from .._callbacks import trio_callback
from .._peer import Peer
from ..errors import ConduitError, TransferError, UnsafePathError
from ._answers import outcome_answer
from ._hooks import TransferSettings
from ._names import safe_relative_name
from ._space import check_writable
from ._wire import FILE_DELETE, FILE_RENAME, as_rpc_error, transfer_failure

log = logging.getLogger("conduit.transfer")


class Manager:
    """Serves ``file_delete`` and ``file_rename`` on a server's storage."""

    def __init__(self, settings: TransferSettings) -> None:
        self._settings = settings

    @trio_callback
    async def rpc_delete(self, caller: Peer, name: str) -> dict[str, Any]:
        """``file_delete``: remove one stored file."""
        try:
            check_writable(caller)
            await self._settings.backend.delete(caller, name)
        except Exception as exc:
            raise as_rpc_error(exc) from None
        safe = safe_relative_name(name)
        log.info("deleted %r for %s", safe, caller.id)
        return {"success": True, "path": safe}

    @trio_callback
    async def rpc_rename(
        self, caller: Peer, old: str, new: str, overwrite: bool = False
    ) -> dict[str, Any]:
        """``file_rename``: give one stored file another name."""
        try:
            check_writable(caller)
            renamed = await self._settings.backend.rename(
                caller, old, new, overwrite=overwrite is True
            )
        except Exception as exc:
            raise as_rpc_error(exc) from None
        source = safe_relative_name(old)
        log.info("renamed %r to %r for %s", source, renamed, caller.id)
        return {"success": True, "old": source, "path": renamed}


def _checked(name: str) -> str:
    try:
        return safe_relative_name(name)
    except UnsafePathError as exc:
        raise TransferError(str(exc), "unsafe_path") from None


async def delete(peer: Peer, name: str) -> dict[str, Any]:
    """Ask the server to delete ``name``; the result dict."""
    try:
        answer = await peer.call(FILE_DELETE, name=_checked(name))
        return outcome_answer(answer, "the file_delete answer")
    except (ConduitError, OSError) as exc:
        return transfer_failure(exc)


async def rename(peer: Peer, old: str, new: str, *, overwrite: bool) -> dict[str, Any]:
    """Ask the server to rename ``old`` to ``new``; the result dict."""
    try:
        answer = await peer.call(
            FILE_RENAME, old=_checked(old), new=_checked(new), overwrite=overwrite
        )
        return outcome_answer(answer, "the file_rename answer")
    except (ConduitError, OSError) as exc:
        return transfer_failure(exc)
