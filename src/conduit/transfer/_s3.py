"""``FileTransferHandler(storage_dir="s3://BUCKET/PREFIX")``: build the object-store backend.

Imported only for an ``s3://`` storage directory, so the core install never
loads boto3. The endpoint and credentials come from the standard AWS
environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``), read by boto3 itself.
"""

from __future__ import annotations

from ._backend_store import StoreBackend, StoreSettings

__all__ = ["s3_backend"]


def s3_backend(url: str, settings: StoreSettings) -> StoreBackend:
    """A :class:`StoreBackend` on ``url``; ``ValueError`` if it is malformed or boto3 is missing.

    Nothing is contacted here: a wrong endpoint or credentials fail the first
    transfer (with a clear error), not the construction.
    """
    try:
        from ..cluster.s3 import S3Store
    except ImportError as exc:
        from .._extras import install_hint

        raise ValueError(
            f"storage_dir={url!r} needs the S3 client: {install_hint('cluster')} ({exc})"
        ) from None
    store = S3Store(url)
    backend = StoreBackend(store, settings, substore=store.child)
    backend.cluster_staging = store
    return backend
