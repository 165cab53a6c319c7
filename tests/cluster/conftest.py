"""Fixtures for the cluster tests: real engines, started once per session.

``engines`` starts SeaweedFS (``weed mini``) and Valkey on free loopback ports
(see :mod:`cluster_engines`) the first time a cluster test needs them and
stops them, by PID, at the end of the session. Each test gets its own key
prefix (``s3_url``) and bus namespace (``bus_namespace``), so tests never see
each other's data although they share the engines.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import pytest

from cluster_engines import Engines, running_engines


@pytest.fixture(scope="session")
def engines() -> Iterator[Engines]:
    with running_engines() as started:
        yield started


@pytest.fixture
def s3_client_factory(engines: Engines) -> Iterator[Any]:
    """Make boto3 clients for the test store: each one is a separate "node"."""
    from conduit.cluster.s3 import make_s3_client

    clients: list[Any] = []

    def make() -> Any:
        client = make_s3_client(
            endpoint_url=engines.s3.endpoint_url,
            aws_access_key_id=engines.s3.access_key,
            aws_secret_access_key=engines.s3.secret_key,
            region_name=engines.s3.region,
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def s3_url(engines: Engines) -> str:
    """A fresh ``s3://bucket/prefix`` for one test."""
    return f"s3://{engines.s3.bucket}/t-{secrets.token_hex(6)}"


@pytest.fixture
def bus_namespace() -> str:
    """A fresh key namespace on the shared Valkey for one test."""
    return f"conduit-test-{secrets.token_hex(6)}"


@pytest.fixture
def aws_environment(engines: Engines, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point boto3 at the test store through the standard variables, as a user
    would (for servers made in the test process with ``s3://`` storage)."""
    for name, value in engines.s3.environment().items():
        monkeypatch.setenv(name, value)
