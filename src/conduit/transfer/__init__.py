"""File transfer: safe names, symlink-safe storage and chunked upload/download."""

from ._handler import FileTransferHandler
from ._listing import FileListing
from ._progress import TransferProgress

__all__ = ["FileListing", "FileTransferHandler", "TransferProgress"]
