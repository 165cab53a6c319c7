"""conduit (this repository) as a benchmark peer.

The server always runs natively on Trio. The client runs on Trio
(``--flavor trio``) or under ``asyncio.run`` through conduit's asyncio shim
(``--flavor asyncio``); both use the documented API: ``client.connect()`` and
``client.rpc.call("echo", data=...)``, which returns ``{"success": True, "data": ...}``.
``--flavor accounts`` (server and client): accounts mode (SPAKE2+), user
``bench`` in a temporary accounts file at the default Argon2id cost; the client
is one ``Client`` reconnecting, so its one-time stretch falls in the warm-up.

Usage: ``python conduit_peer.py server`` /
``python conduit_peer.py client --port N --spec JSON [--flavor asyncio]``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import _peerlib

USERNAME = "bench"


def _descriptor_kwargs(flavor: str = "trio") -> dict[str, Any]:
    if flavor == "accounts":
        return {"password": _peerlib.PASSWORD, "username": USERNAME}
    return {"password": _peerlib.PASSWORD}


async def serve(flavor: str = "trio") -> None:
    """Serve ``echo`` on an ephemeral loopback port until SIGTERM."""
    import trio

    from conduit import Accounts, Server, ServerDescriptor

    # The accounts file lives only as long as the server (removed on SIGTERM too).
    with tempfile.TemporaryDirectory(prefix="conduit-bench-accounts-") as directory:
        if flavor == "accounts":
            accounts = Accounts(Path(directory) / "accounts.json")
            accounts.add(USERNAME, _peerlib.PASSWORD)
            descriptor = ServerDescriptor(host=_peerlib.HOST, port=0, accounts=accounts)
        else:
            descriptor = ServerDescriptor(host=_peerlib.HOST, port=0, **_descriptor_kwargs())
        server = Server(descriptor)

        @server.rpc
        async def echo(data: bytes) -> bytes:
            return data

        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.run)
            _peerlib.announce_port(port)
            await _peerlib.trio_until_terminated()
            await server.close()


def _make_client(port: int, flavor: str = "trio") -> Any:
    from conduit import Client, ClientDescriptor

    return Client(
        ClientDescriptor(server_host=_peerlib.HOST, server_port=port, **_descriptor_kwargs(flavor))
    )


async def client(port: int, spec: dict[str, Any], flavor: str) -> dict[str, Any]:
    """Run the spec's handshakes and workloads under ``flavor``; return the measurements.

    The same coroutine serves both flavors: conduit's public methods are the same
    objects under Trio and asyncio, only the concurrency driver differs.
    """
    import conduit

    body = _peerlib.payload(spec["payload_size"])
    closed_loop = _peerlib.trio_closed_loop if flavor == "trio" else _peerlib.asyncio_closed_loop
    result: dict[str, Any] = {
        "runtime": {**_peerlib.runtime_info("conduit", conduit), "flavor": flavor},
        "workloads": {},
    }

    # Accounts mode: one Client reconnecting (it keeps the stretched secret,
    # as an application's Client does); shared mode: a Client per connect.
    reused = _make_client(port, flavor) if flavor == "accounts" else None

    async def connect_once() -> int:
        probe = reused if reused is not None else _make_client(port, flavor)
        started = time.perf_counter_ns()
        await probe.connect()
        elapsed = time.perf_counter_ns() - started
        await probe.disconnect()
        return elapsed

    if spec["handshakes"]:
        result["handshake"] = await _peerlib.time_handshakes(
            connect_once, spec["handshake_warmup"], spec["handshakes"]
        )

    if not spec["workloads"]:
        return result
    rpc_client = _make_client(port, flavor)
    await rpc_client.connect()
    try:
        call = rpc_client.rpc.call

        async def one_call() -> None:
            reply = await call("echo", data=body)
            if reply["data"] != body:
                raise AssertionError(f"bad reply: {reply!r}")

        for _ in range(spec["warmup"]):
            await one_call()
        for workload in spec["workloads"]:
            result["workloads"][workload["name"]] = await closed_loop(
                one_call, workload["callers"], workload["calls"]
            )
    finally:
        await rpc_client.disconnect()
    return result


def main() -> None:
    """Entry point (see the module docstring)."""
    args = _peerlib.parse_args()
    if args.role == "server":
        import trio

        with _peerlib.maybe_profiled("conduit-server"):
            trio.run(serve, args.flavor)
        return
    spec = _peerlib.parse_spec(args.spec)
    with _peerlib.maybe_profiled(f"conduit-{args.flavor}-client"):
        if args.flavor in ("trio", "accounts"):
            import trio

            result = trio.run(client, args.port, spec, args.flavor)
        else:
            import asyncio

            result = asyncio.run(client(args.port, spec, "asyncio"))
    _peerlib.emit_result(result)


if __name__ == "__main__":
    main()
