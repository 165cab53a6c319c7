"""File transfer: safe names, symlink-safe storage and chunked upload/download."""
