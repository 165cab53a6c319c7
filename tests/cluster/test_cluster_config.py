"""Cluster settings of ``ServerDescriptor``: validation, defaults, imports, start-up errors."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import trio

from conduit import FileTransferHandler, Server, ServerDescriptor
from conduit.cluster.bus import BusError


def _descriptor(**fields: object) -> ServerDescriptor:
    return ServerDescriptor(password="secret", **fields)  # type: ignore[arg-type]


def test_defaults_are_a_single_server() -> None:
    descriptor = _descriptor()
    assert descriptor.cluster_url is None
    assert descriptor.node_name is None
    assert descriptor.cluster_staging is None
    assert Server(descriptor).cluster is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"cluster_url": "http://127.0.0.1:6379"}, "cluster_url must be a redis://"),
        ({"cluster_url": "127.0.0.1:6379"}, "cluster_url must be a redis://"),
        ({"node_name": "a"}, "node_name needs cluster_url"),
        ({"cluster_staging": "s3://bucket/p"}, "cluster_staging needs cluster_url"),
        ({"cluster_url": "redis://h/0", "node_name": "a:b"}, "node_name must be"),
        ({"cluster_url": "redis://h/0", "node_name": ""}, "node_name must be"),
        ({"cluster_url": "redis://h/0", "node_name": "x" * 64}, "node_name must be"),
        ({"cluster_url": "redis://h/0", "cluster_ttl": 0.1}, "cluster_ttl must be between"),
        ({"cluster_url": "redis://h/0", "cluster_ttl": 31}, "cluster_ttl must be between"),
        ({"cluster_url": "redis://h/0", "cluster_namespace": "a b"}, "cluster_namespace"),
        ({"cluster_url": "redis://h/0", "cluster_staging": "s3://B_ad/p"}, "cluster_staging"),
        ({"cluster_url": "redis://h/0", "cluster_staging": "s3://bucket/../x"}, "cluster_staging"),
        ({"cluster_url": "redis://h/0", "cluster_staging": "/tmp/x"}, "cluster_staging"),
    ],
)
def test_bad_cluster_settings_fail_at_once(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _descriptor(**fields)


def test_node_names() -> None:
    named = Server(_descriptor(cluster_url="redis://127.0.0.1:1/0", node_name="node-a.1"))
    assert named.cluster is not None
    assert named.cluster.node_name == "node-a.1"
    first = Server(_descriptor(cluster_url="redis://127.0.0.1:1/0"))
    second = Server(_descriptor(cluster_url="redis://127.0.0.1:1/0"))
    assert first.cluster is not None and second.cluster is not None
    # Unique per process, and per server within it.
    assert first.cluster.node_name != second.cluster.node_name
    assert str(os.getpid()) in first.cluster.node_name


CHECK = """
import sys
from conduit import FileTransferHandler, Server, ServerDescriptor

def loaded():
    return sorted({m.split(".")[0] for m in sys.modules} & {"boto3", "botocore", "redis"})

server = Server(ServerDescriptor(password="x"))
FileTransferHandler(storage_dir=sys.argv[1]).register_server_handlers(server)
assert loaded() == [], loaded()
assert not any(m.startswith("conduit.cluster") for m in sys.modules), "cluster imported"
server = Server(ServerDescriptor(password="x", cluster_url="redis://127.0.0.1:1/0"))
FileTransferHandler(storage_dir=sys.argv[1]).register_server_handlers(server)
assert loaded() == ["redis"], loaded()
print("ok")
"""


def test_cluster_code_is_loaded_only_with_a_cluster(tmp_path: object) -> None:
    result = subprocess.run(
        [sys.executable, "-c", CHECK, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


async def test_unreachable_bus_stops_the_server_at_start(tmp_path: object) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = Server(
        _descriptor(host="127.0.0.1", port=0, cluster_url=f"redis://127.0.0.1:{port}/0")
    )
    FileTransferHandler(storage_dir=str(tmp_path)).register_server_handlers(server)
    # Out of the server's nursery, so in a group, as any error of a running server.
    refused = pytest.RaisesGroup(
        pytest.RaisesExc(BusError, match="cluster bus.*refused"), flatten_subgroups=True
    )
    with trio.fail_after(30), refused:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
    assert not server.is_running
