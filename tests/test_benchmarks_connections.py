"""``benchmarks._harness.established_connections``: a server's connections, counted on its side.

Real loopback sockets of this process: the listener and the clients' own ends
share the process but must not be counted, and a connection the server closed
must not be counted although its client still holds its end.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator

import pytest
from benchmarks._harness import established_connections

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the count reads /proc (Linux only)"
)


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server


def test_only_the_servers_established_ends_on_its_port_count(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    assert established_connections(os.getpid(), port) == 0
    clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
    accepted = [listener.accept()[0] for _ in clients]
    try:
        assert established_connections(os.getpid(), port) == 3
        accepted.pop().close()  # the server lets one go; its client still holds its end
        assert established_connections(os.getpid(), port) == 2
    finally:
        for sock in clients + accepted:
            sock.close()


def test_a_process_that_is_gone_has_no_count() -> None:
    # Far beyond the kernel's pid_max, so it cannot name a live process.
    assert established_connections(2**30, 1) is None
