"""S3 plumbing shared by the store and its partials: client, errors, upload state.

Everything here runs in worker threads or is pure data; nothing waits.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from typing import Any, Final

import attrs
import boto3  # type: ignore[import-untyped]
import botocore.config  # type: ignore[import-untyped]
import botocore.exceptions  # type: ignore[import-untyped]

from ..errors import TransferError
from ..transfer._names import MAX_COLLISION_ATTEMPTS

#: S3's smallest part (all but the last).
MIN_PART_SIZE: Final = 5 * 1024 * 1024
#: Default part size: what a dropped upload may have to resend, at most.
DEFAULT_PART_SIZE: Final = 8 * 1024 * 1024
MAX_PARTS: Final = 10_000
CONTROL: Final = ".conduit"
STATE_VERSION: Final = 1
# The longest collision suffix, " (10000)", must still fit in a key.
SUFFIX_ROOM: Final = len(f" ({MAX_COLLISION_ATTEMPTS})")
LIST_PAGE: Final = 1000


#: Seconds to open a connection to the store, and to wait on one for the next
#: bytes (either way: a send that stalls too). botocore's defaults are 60 s
#: each, which with its retries made a call to a store that stopped
#: answering (a frozen process, a dropped route) fail after about 4 minutes,
#: and a node's clean close wait as long for the part upload in flight (a
#: review of the engines' outages, 2026-12-07). A healthy store answers a
#: part's upload, or sends a download's next bytes, well within this.
CONNECT_TIMEOUT: Final = 5.0
READ_TIMEOUT: Final = 20.0
#: Tries of each call (the first and its retries, botocore's "standard" mode:
#: throttling, 5xx and connection errors, with jittered backoff).
MAX_ATTEMPTS: Final = 3


def make_s3_client(
    *,
    connect_timeout: float = CONNECT_TIMEOUT,
    read_timeout: float = READ_TIMEOUT,
    **overrides: Any,
) -> Any:
    """A boto3 S3 client configured from the standard AWS environment.

    ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` and
    ``AWS_DEFAULT_REGION`` are read by boto3 itself; ``overrides`` (e.g.
    ``endpoint_url=...``) win. Path-style addressing, because self-hosted
    stores (SeaweedFS, MinIO) rarely have wildcard DNS; checksums only where
    conduit supplies them (it sends SHA-256 per part itself). A store that
    stops answering fails a call within about ``MAX_ATTEMPTS`` times
    ``connect_timeout`` plus ``read_timeout`` (see :data:`READ_TIMEOUT`).
    """
    config = botocore.config.Config(
        s3={"addressing_style": "path"},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"mode": "standard", "max_attempts": MAX_ATTEMPTS},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        max_pool_connections=16,
    )
    options: dict[str, Any] = {"config": config}
    options.update(overrides)
    return boto3.session.Session().client("s3", **options)


# --------------------------------------------------------------------------- errors


def error_code(exc: botocore.exceptions.ClientError) -> str:
    """The S3 error code (``"NoSuchKey"``, ``"BadDigest"``, ...), or ``""``."""
    return str(exc.response.get("Error", {}).get("Code", ""))


def http_status(exc: botocore.exceptions.ClientError) -> int:
    """The HTTP status of the failed request, or 0."""
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def is_missing(exc: botocore.exceptions.ClientError) -> bool:
    """Whether the object (or key) does not exist; HEAD answers a bare 404."""
    return error_code(exc) in ("NoSuchKey", "404", "NotFound") or http_status(exc) == 404


def is_precondition(exc: botocore.exceptions.ClientError) -> bool:
    """Whether a conditional write (``If-None-Match`` / ``If-Match``) was refused."""
    return error_code(exc) == "PreconditionFailed" or http_status(exc) == 412


def retried(exc: botocore.exceptions.ClientError) -> bool:
    """Whether the request that failed was sent more than once (boto3 retries
    a request whose answer did not come: a dropped connection, a timeout).

    A conditional write refused on a retry may have been done by an earlier
    attempt, whose answer was lost: the write is then ours, and the refusal
    is of our own object. The caller looks at what is there to tell.
    """
    return int(exc.response.get("ResponseMetadata", {}).get("RetryAttempts", 0)) > 0


def is_write_conflict(exc: botocore.exceptions.ClientError) -> bool:
    """Whether AWS answered a conditional write with 409 ``ConditionalRequestConflict``:
    another write to the key was under way (it may yet fail, so the name may be free)."""
    return error_code(exc) == "ConditionalRequestConflict"


def storage_error(exc: Exception, what: str) -> TransferError:
    """The :class:`TransferError` a caller sees for an S3 failure while doing ``what``.

    Codes: ``"bad_digest"`` (a part arrived corrupted), ``"storage_error"``
    (any other S3 refusal), ``"storage_unavailable"`` (no answer at all).
    """
    if isinstance(exc, botocore.exceptions.ClientError):
        code = error_code(exc)
        message = exc.response.get("Error", {}).get("Message", "")
        if code == "BadDigest":
            return TransferError(
                f"{what}: the store received a part that does not match its SHA-256 "
                f"(BadDigest: {message})",
                "bad_digest",
            )
        return TransferError(
            f"{what}: S3 error {code or http_status(exc)}: {message}", "storage_error"
        )
    return TransferError(f"{what}: the S3 store is unreachable ({exc})", "storage_unavailable")


#: What boto3 raises: an S3 refusal or a transport failure.
S3_ERRORS: Final = (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError)


# --------------------------------------------------------------------------- state


@attrs.frozen
class Part:
    """One stored part of a multipart upload, as the upload state records it."""

    number: int
    size: int
    etag: str
    sha256_b64: str
    #: Whole-file SHA-256 state after this part (ResumableSha256.save()).
    hash_state: str


@attrs.define
class UploadState:
    """Everything needed to resume a partial on any node, saved as JSON beside it."""

    name: str
    transfer_id: str
    key: str
    upload_id: str
    part_size: int
    overwrite: bool
    reservation: str | None
    parts: list[Part] = attrs.field(factory=list)
    #: Written by a writer that is letting go (its client is gone) while it
    #: records the part it had in flight: a node that resumed meanwhile may
    #: keep its own state over this one (see ``S3Partial._merge_late_writer``).
    closing: bool = False

    def dumps(self) -> bytes:
        """Serialise (JSON, with a version and the time of writing)."""
        document = attrs.asdict(self)
        document["version"] = STATE_VERSION
        document["updated"] = time.time()
        return json.dumps(document, separators=(",", ":")).encode()

    @classmethod
    def loads(cls, data: bytes) -> UploadState:
        """Parse :meth:`dumps` output; ``ValueError`` for anything else.

        The object is in the bucket, where anyone with its credentials may
        have written anything: every field is checked for its type here, so
        that no other kind of error reaches the code that reads states (one
        that did, from a state of ``null``, stopped every sweep of its prefix).
        """
        try:
            document = json.loads(data)
        except (ValueError, RecursionError) as exc:  # (UnicodeDecodeError is a ValueError;
            # RecursionError: arrays nested deeper than the interpreter's stack)
            raise ValueError(f"upload state is not JSON: {exc}") from None
        if type(document) is not dict:
            raise ValueError("upload state is not a JSON object")
        if document.pop("version", None) != STATE_VERSION:
            raise ValueError("unknown upload state version")
        document.pop("updated", None)
        parts = document.pop("parts", None)
        if type(parts) is not list:
            raise ValueError("upload state has no list of parts")
        fields = _checked_fields(document, _STATE_FIELDS, "upload state")
        checked = [Part(**_checked_fields(part, _PART_FIELDS, "state part")) for part in parts]
        return cls(**fields, parts=checked)

    @property
    def durable(self) -> int:
        """Bytes in the recorded parts."""
        return sum(part.size for part in self.parts)


#: The fields of a saved :class:`UploadState` (beside its parts, version and
#: time of writing) and of each :class:`Part`, with their JSON types; a
#: field with a default may be missing.
_STATE_FIELDS: Final[dict[str, tuple[type, ...]]] = {
    "name": (str,),
    "transfer_id": (str,),
    "key": (str,),
    "upload_id": (str,),
    "part_size": (int,),
    "overwrite": (bool,),
    "reservation": (str, type(None)),
    "closing": (bool,),
}
_PART_FIELDS: Final[dict[str, tuple[type, ...]]] = {
    "number": (int,),
    "size": (int,),
    "etag": (str,),
    "sha256_b64": (str,),
    "hash_state": (str,),
}
_OPTIONAL_FIELDS: Final = frozenset({"closing"})


def _checked_fields(document: Any, types: dict[str, tuple[type, ...]], what: str) -> dict[str, Any]:
    """``document`` if it is a JSON object of exactly these fields, of these types."""
    if type(document) is not dict:
        raise ValueError(f"{what} is not a JSON object")
    unknown = document.keys() - types.keys()
    if unknown:
        raise ValueError(f"{what} has unknown fields: {', '.join(sorted(map(str, unknown)))}")
    for name, kinds in types.items():
        if name not in document:
            if name in _OPTIONAL_FIELDS:
                continue
            raise ValueError(f"{what} has no {name!r}")
        # type(), not isinstance: JSON's true is no int here.
        if type(document[name]) not in kinds:
            raise ValueError(f"{what}'s {name!r} is a {type(document[name]).__name__}")
    return document


def b64_sha256(data: bytes) -> str:
    """SHA-256 of ``data`` in base64, as ``x-amz-checksum-sha256`` wants it."""
    return base64.b64encode(hashlib.sha256(data).digest()).decode("ascii")


def short_digest(text: str) -> str:
    """160 bits of SHA-256 as hex: fixed-length keys for names of any length."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:40]
