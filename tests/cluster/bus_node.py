"""A cluster node in its own process, for tests that ``kill -9`` it.

Usage: ``python bus_node.py URL NAMESPACE NODE_NAME CLIENT_ID TTL``. Registers
the node and one client, answers ``echo`` requests, prints ``ready`` and runs
until killed.
"""

from __future__ import annotations

import sys
from typing import Any

import trio

from conduit.cluster.bus import ClusterBus


async def main(url: str, namespace: str, node: str, client_id: str, ttl: float) -> None:
    bus = ClusterBus(url, node, namespace=namespace, ttl=ttl)

    @bus.on_request
    async def echo(kind: str, payload: dict[str, Any], sender: str) -> dict[str, Any]:
        return {"kind": kind, "payload": payload, "from": sender}

    async with trio.open_nursery() as nursery:
        await nursery.start(bus.run)
        await bus.register_client(client_id)
        print("ready", flush=True)


if __name__ == "__main__":
    url, namespace, node, client_id, ttl = sys.argv[1:6]
    trio.run(main, url, namespace, node, client_id, float(ttl))
