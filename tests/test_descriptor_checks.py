"""Descriptor values that cannot work fail when the descriptor is made, not later."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import attrs
import pytest

from conduit import ClientDescriptor, ServerDescriptor
from conduit._connection import settings_from
from conduit.descriptors import _optional_positive, _positive


def _positive_fields(descriptor: type[Any]) -> list[str]:
    names = []
    for field in attrs.fields(descriptor):
        checks = field.validator
        inner = getattr(checks, "_validators", (checks,))
        numeric = field.type in ("float", "float | None")  # an int field refuses NaN itself
        if numeric and any(check in (_positive, _optional_positive) for check in inner):
            names.append(field.name)
    return names


@pytest.mark.parametrize("descriptor", [ServerDescriptor, ClientDescriptor])
def test_a_nan_setting_is_refused(descriptor: type[Any]) -> None:
    # NaN passed "value <= 0" (every comparison with NaN is false); the
    # server then failed every connection (trio.fail_after refuses NaN).
    names = _positive_fields(descriptor)
    assert {"rpc_timeout", "heartbeat_timeout"} <= set(names), names
    for name in names:
        with pytest.raises(ValueError, match=f"{name} must be positive"):
            descriptor(password="x", **{name: math.nan})
        descriptor(password="x", **{name: math.inf})  # no limit: still a number


def test_an_empty_listening_host_is_refused() -> None:
    # The socket layer takes "" for every interface: an unset variable in
    # `--host "$HOST"` exposed the server on IPv4 and IPv6.
    with pytest.raises(ValueError, match="host must not be empty"):
        ServerDescriptor(password="x", host="")
    ServerDescriptor(password="x", host="0.0.0.0")


@pytest.mark.parametrize("descriptor", [ServerDescriptor, ClientDescriptor])
@pytest.mark.parametrize("value", ["10", True, None, [1]])
def test_a_setting_that_is_not_a_number_is_refused_by_name(
    descriptor: type[Any], value: object
) -> None:
    # A string from a config file failed in a comparison that named no field
    # ("'>' not supported between instances of 'str' and 'int'"); True passed
    # as 1 (a bool is an int to Python).
    names = _positive_fields(descriptor)
    for name in names:
        if value is None and _allows_none(descriptor, name):
            continue
        with pytest.raises(TypeError, match=f"{name} must be a number"):
            descriptor(password="x", **{name: value})
    # (A string port is refused by the field's instance_of(int) check, by name.)
    with pytest.raises(TypeError, match="port must be a whole number"):
        descriptor(password="x", **{_port_field(descriptor): True})


def _allows_none(descriptor: type[Any], name: str) -> bool:
    return "None" in str(attrs.fields_dict(descriptor)[name].type)


def _port_field(descriptor: type[Any]) -> str:
    return "port" if descriptor is ServerDescriptor else "server_port"


@pytest.mark.parametrize("descriptor", [ServerDescriptor, ClientDescriptor])
def test_a_window_limit_below_the_window_it_opens_with_is_refused(descriptor: type[Any]) -> None:
    window = 1024 * 1024
    for wrong in (window - 1, 2 * 1024**3, 2.0 * window, "8 MiB"):
        with pytest.raises(ValueError, match="max_receive_window must be None or an int"):
            descriptor(password="x", receive_window=window, max_receive_window=wrong)
    assert descriptor(password="x", receive_window=window, max_receive_window=window)


@pytest.mark.parametrize("descriptor", [ServerDescriptor, ClientDescriptor])
def test_a_window_may_grow_to_eight_times_its_opening_size_unless_told_otherwise(
    descriptor: type[Any],
) -> None:
    """``max_receive_window`` None (the default) is eight windows, from the
    descriptor's own ``receive_window``, however the descriptor was made;
    ``receive_window`` itself keeps windows fixed."""

    def limit(made: Any) -> int | None:
        return settings_from(made).max_receive_window

    defaults = descriptor(password="x")
    assert defaults.max_receive_window is None
    assert limit(defaults) == 32 * 1024**2
    assert limit(descriptor(password="x", receive_window=1024**2)) == 8 * 1024**2
    # Never past the protocol's largest window.
    big = 256 * 1024**2
    assert (
        limit(descriptor(password="x", receive_window=big, connection_receive_budget=big))
        == 1024**3
    )
    # A descriptor evolved to another window grows from that one.
    evolved = attrs.evolve(defaults, receive_window=big, connection_receive_budget=2 * big)
    assert limit(evolved) == 1024**3
    assert limit(attrs.evolve(defaults, receive_window=1024**2)) == 8 * 1024**2
    fixed = descriptor(password="x", max_receive_window=4 * 1024**2)
    assert limit(fixed) == fixed.receive_window


@pytest.mark.parametrize("value", ["15", True, math.nan, -1])
def test_heartbeat_intervals_and_cluster_ttls_are_checked_by_name(value: Any) -> None:
    """Until 2026-12-07 ``heartbeat_interval=True`` was taken (as 1 s), and
    ``"15"`` or ``cluster_ttl="10"`` failed in a comparison that named no field."""
    error = (
        ValueError if isinstance(value, float | int) and not isinstance(value, bool) else TypeError
    )
    for descriptor in (ServerDescriptor, ClientDescriptor):
        with pytest.raises(error, match="heartbeat_interval must be"):
            descriptor(password="x", heartbeat_interval=value)
    if value != -1:  # (-1 is a number, outside the bound: a ValueError of its own)
        with pytest.raises(error, match="cluster_ttl must be"):
            ServerDescriptor(password="x", cluster_ttl=value)
    ServerDescriptor(password="x", heartbeat_interval=0, cluster_ttl=10)


@pytest.mark.parametrize(
    ("descriptor", "field"),
    [
        (ServerDescriptor, "tls_certfile"),
        (ServerDescriptor, "tls_keyfile"),
        (ClientDescriptor, "tls_ca_file"),
        (ClientDescriptor, "tls_server_hostname"),
    ],
)
def test_tls_paths_and_names_are_text(descriptor: type[Any], field: str) -> None:
    """Until 2026-12-07 ``tls_server_hostname=5`` was taken, and the connect
    then failed with ``AttributeError: 'int' object has no attribute 'decode'``."""
    extra = {"tls_certfile": "chain.pem"} if field == "tls_keyfile" else {}
    with pytest.raises(TypeError, match=f"{field} must be a str or None"):
        descriptor(password="x", **{field: 5}, **extra)


def test_a_tls_file_that_cannot_be_read_is_named(tmp_path: Path) -> None:
    """The server reads its TLS files when it starts: until 2026-12-07 a
    missing one failed there with a bare ``[Errno 2] No such file or
    directory`` that named no file."""
    missing = str(tmp_path / "missing-chain.pem")
    with pytest.raises(ValueError, match=r"missing-chain\.pem cannot be used"):
        ServerDescriptor(password="x", tls_certfile=missing).build_ssl_context()
