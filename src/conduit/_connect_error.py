"""Why a connection attempt failed, in words a log line or a user can act on."""

from __future__ import annotations

import os


def describe_connect_error(exc: BaseException) -> str:
    """Why a connection failed, in words: trio's "all attempts to connect ... failed"
    hides the per-address reasons (connection refused, unreachable) in its cause."""
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        reasons = []
        for leaf in cause.exceptions:
            if isinstance(leaf, OSError) and leaf.errno:
                reason = os.strerror(leaf.errno)
            else:
                reason = str(leaf)
            if reason not in reasons:
                reasons.append(reason)
        return "; ".join(reasons)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


__all__ = ["describe_connect_error"]
