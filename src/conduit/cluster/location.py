"""``storage_dir="s3://BUCKET/PREFIX"``: recognise and parse it without importing boto3.

Parsing needs no boto3, so the core install never imports it.
``ServerDescriptor(cluster_staging=...)`` is parsed here, and
``FileTransferHandler(storage_dir="s3://...")`` through
:class:`~conduit.cluster.s3.S3Store`. The handler itself recognises the
scheme without calling :func:`is_s3_url`, so that a local ``storage_dir``
never loads this package.
"""

from __future__ import annotations

import os
import re
from typing import Final

import attrs

__all__ = ["S3Location", "is_s3_url", "parse_s3_url"]

_SCHEME: Final = "s3://"
# S3's rules for new buckets: 3-63 characters, lowercase letters, digits, '.', '-',
# starting and ending with a letter or digit.
_BUCKET: Final = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
#: Longest object key S3 accepts, in bytes of UTF-8.
MAX_KEY_BYTES: Final = 1024


@attrs.frozen
class S3Location:
    """A bucket and a key prefix (``""`` or segments joined by ``/``, no slashes at the ends)."""

    bucket: str
    prefix: str = ""

    def key(self, name: str) -> str:
        """The object key of the relative name ``name`` (already checked by the caller)."""
        return f"{self.prefix}/{name}" if self.prefix else name

    def relative(self, key: str) -> str | None:
        """The relative name of ``key``, or ``None`` if it is outside the prefix."""
        if not self.prefix:
            return key
        head = self.prefix + "/"
        return key[len(head) :] if key.startswith(head) else None

    @property
    def list_prefix(self) -> str:
        """The prefix to list with (ends with ``/`` unless empty)."""
        return f"{self.prefix}/" if self.prefix else ""

    def url(self, name: str = "") -> str:
        """``s3://bucket/prefix/name``."""
        key = self.key(name) if name else self.prefix
        return f"{_SCHEME}{self.bucket}/{key}" if key else f"{_SCHEME}{self.bucket}"


def is_s3_url(value: str | os.PathLike[str]) -> bool:
    """Whether a ``storage_dir`` names an S3 location rather than a directory."""
    return isinstance(value, str) and value.lower().startswith(_SCHEME)


def parse_s3_url(url: str) -> S3Location:
    """Parse ``s3://BUCKET`` or ``s3://BUCKET/PREFIX``; ``ValueError`` if malformed.

    The prefix is chosen by the operator, not the network, but it is still
    refused if it contains ``..`` or ``.`` segments, a backslash or control
    characters: a key prefix that looks like a path should mean what it says.
    Leading, trailing and repeated slashes are dropped.
    """
    if not is_s3_url(url):
        raise ValueError(f"not an s3:// URL: {url!r}")
    rest = url[len(_SCHEME) :]
    bucket, _, prefix = rest.partition("/")
    if _BUCKET.fullmatch(bucket) is None or ".." in bucket:
        raise ValueError(f"invalid S3 bucket name {bucket!r}")
    segments = [segment for segment in prefix.split("/") if segment]
    for segment in segments:
        if segment in (".", "..") or "\\" in segment:
            raise ValueError(f"invalid S3 prefix {prefix!r}: segment {segment!r}")
        if any(ord(char) < 0x20 or ord(char) == 0x7F for char in segment):
            raise ValueError(f"invalid S3 prefix {prefix!r}: control character")
    joined = "/".join(segments)
    if len(joined.encode("utf-8")) > MAX_KEY_BYTES // 2:
        raise ValueError("S3 prefix too long")
    return S3Location(bucket, joined)
