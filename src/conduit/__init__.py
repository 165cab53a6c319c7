"""conduit: Trio-native, password-authenticated, encrypted RPC and file transfer.

The public names live here; everything else is private. The same objects work
under ``trio.run`` natively and under ``asyncio.run`` through a Trio guest run.
"""

import logging

# The asyncio shim: importing it installs the runner of @bridged methods awaited
# from asyncio (see conduit._bridge). Imported here, at the top of the layers,
# and by no feature module.
from ._asyncio import run_in_trio
from ._callbacks import asyncio_callback, is_asyncio_hosted, trio_callback
from ._peer import Peer
from ._rpc import current_peer
from ._rpc_proxy import RPCProxy
from ._version import __version__
from .accounts import Accounts
from .client import Client
from .descriptors import ClientDescriptor, ServerDescriptor
from .errors import (
    AuthenticationError,
    AuthModeMismatch,
    CallbackCancelledError,
    ChecksumMismatch,
    ConduitError,
    ConnectionClosed,
    HandshakeError,
    HandshakeTimeout,
    IntegrityError,
    LocalProtocolError,
    LockedOut,
    ProtocolError,
    RemoteProtocolError,
    RPCError,
    RPCTimeoutError,
    TransferError,
    UnsafePathError,
)
from .server import Server
from .transfer import FileTransferHandler, TransferProgress

# A library logs; the application decides where logs go.
logging.getLogger("conduit").addHandler(logging.NullHandler())

__all__ = [
    "Accounts",
    "AuthModeMismatch",
    "AuthenticationError",
    "CallbackCancelledError",
    "ChecksumMismatch",
    "Client",
    "ClientDescriptor",
    "ConduitError",
    "ConnectionClosed",
    "FileTransferHandler",
    "HandshakeError",
    "HandshakeTimeout",
    "IntegrityError",
    "LocalProtocolError",
    "LockedOut",
    "Peer",
    "ProtocolError",
    "RPCError",
    "RPCProxy",
    "RPCTimeoutError",
    "RemoteProtocolError",
    "Server",
    "ServerDescriptor",
    "TransferError",
    "TransferProgress",
    "UnsafePathError",
    "__version__",
    "asyncio_callback",
    "current_peer",
    "is_asyncio_hosted",
    "run_in_trio",
    "trio_callback",
]
