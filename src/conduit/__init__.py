"""conduit: Trio-native, password-authenticated, encrypted RPC and file transfer.

The public names live here; everything else is private. The same objects work
under ``trio.run`` natively and under ``asyncio.run`` through a Trio guest run.
"""

import logging

from ._peer import Peer, RPCProxy
from ._rpc import current_peer
from ._version import __version__
from .client import Client
from .descriptors import ClientDescriptor, ServerDescriptor
from .errors import (
    AuthenticationError,
    ChecksumMismatch,
    ConduitError,
    ConnectionClosed,
    HandshakeTimeout,
    IntegrityError,
    LocalProtocolError,
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
    "AuthenticationError",
    "ChecksumMismatch",
    "Client",
    "ClientDescriptor",
    "ConduitError",
    "ConnectionClosed",
    "FileTransferHandler",
    "HandshakeTimeout",
    "IntegrityError",
    "LocalProtocolError",
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
    "current_peer",
]
