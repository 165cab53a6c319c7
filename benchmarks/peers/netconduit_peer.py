"""netconduit 5.0.0 (PyPI, asyncio + pydantic) as a benchmark peer.

Runs only in netconduit's own virtualenv: its import name ``conduit`` clashes
with ours. Uses its documented API: ``@server.rpc``, ``await server.start()``,
``await client.connect()`` and ``client.rpc.call("echo", args=data(data=...))``.

netconduit's ``ServerDescriptor`` rejects port 0, so the server picks a free
ephemeral port itself (bind to 0, release, listen there; retried on a clash).

Usage: ``python netconduit_peer.py server`` /
``python netconduit_peer.py client --port N --spec JSON``.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import _peerlib


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((_peerlib.HOST, 0))
        return int(probe.getsockname()[1])


async def serve() -> None:
    """Serve ``echo`` on a free loopback port until SIGTERM."""
    from conduit import Server, ServerDescriptor

    for attempt in range(5):
        port = _free_port()
        server = Server(
            ServerDescriptor(
                host=_peerlib.HOST,
                port=port,
                password=_peerlib.PASSWORD,
                max_connections=100_000,
            )
        )

        # The guide's bare-decorator form; netconduit annotates `name` as `str | None`.
        @server.rpc  # type: ignore[arg-type]
        async def echo(data: bytes) -> bytes:
            return data

        try:
            await server.start()
        except OSError:
            if attempt == 4:
                raise
            continue
        break
    _peerlib.announce_port(port)
    await _peerlib.asyncio_until_terminated()


async def client(port: int, spec: dict[str, Any]) -> dict[str, Any]:
    """Run the spec's handshakes and workloads; return the measurements."""
    from importlib.metadata import version

    import conduit
    from conduit import Client, ClientDescriptor, data

    body = _peerlib.payload(spec["payload_size"])
    runtime = _peerlib.runtime_info("netconduit", conduit)
    runtime["distribution_version"] = version("netconduit")
    runtime["pydantic"] = version("pydantic")
    runtime["msgpack"] = version("msgpack")
    result: dict[str, Any] = {"runtime": runtime, "workloads": {}}

    def make_client() -> Any:
        return Client(
            ClientDescriptor(
                server_host=_peerlib.HOST,
                server_port=port,
                password=_peerlib.PASSWORD,
                reconnect_enabled=False,
            )
        )

    async def connect_once() -> int:
        probe = make_client()
        started = time.perf_counter_ns()
        connected = await probe.connect()
        elapsed = time.perf_counter_ns() - started
        if not connected:
            raise RuntimeError("netconduit connect() returned False")
        await probe.disconnect()
        return elapsed

    if spec["handshakes"]:
        result["handshake"] = await _peerlib.time_handshakes(
            connect_once, spec["handshake_warmup"], spec["handshakes"]
        )

    if not spec["workloads"]:
        return result
    rpc_client = make_client()
    if not await rpc_client.connect():
        raise RuntimeError("netconduit connect() returned False")
    try:
        call = rpc_client.rpc.call

        async def one_call() -> None:
            reply = await call("echo", args=data(data=body))
            if reply["data"] != body:
                raise AssertionError(f"bad reply: {reply!r}")

        for _ in range(spec["warmup"]):
            await one_call()
        for workload in spec["workloads"]:
            result["workloads"][workload["name"]] = await _peerlib.asyncio_closed_loop(
                one_call, workload["callers"], workload["calls"]
            )
    finally:
        await rpc_client.disconnect()
    return result


def main() -> None:
    """Entry point (see the module docstring)."""
    args = _peerlib.parse_args()
    if args.role == "server":
        with _peerlib.maybe_profiled("netconduit-server"):
            asyncio.run(serve())
        return
    spec = _peerlib.parse_spec(args.spec)
    with _peerlib.maybe_profiled("netconduit-client"):
        result = asyncio.run(client(args.port, spec))
    _peerlib.emit_result(result)


if __name__ == "__main__":
    main()
