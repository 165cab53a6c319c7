"""netconduit 5.0.0 (PyPI) as a file-transfer benchmark peer, with its own API.

Runs only in netconduit's private virtualenv (its import name ``conduit``
clashes with ours). Server: ``FileTransferHandler(storage_dir=...)`` +
``register_server_handlers(server)`` + an ``echo`` RPC. Client:
``transfer.send_to_server(client, path)`` (hashes the whole file first, then
one RPC round trip per base64-encoded 64 KiB chunk) and
``transfer.receive_from_server(client, name, local_dir)`` (one RPC per chunk;
no checksum, no fsync: that is its design, reported as such).

netconduit names the uploaded file after the source's base name: the
orchestrator gives every contender a source whose base name is the name to use.

Usage: ``python netconduit_transfer.py server --spec '{"storage": DIR}'`` /
``python netconduit_transfer.py client --port N --spec JSON``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from typing import Any

import _peerlib
import _transferlib


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((_peerlib.HOST, 0))
        return int(probe.getsockname()[1])


async def serve(spec: dict[str, Any]) -> None:
    """Serve transfers into ``spec["storage"]`` (and ``echo``) until SIGTERM."""
    from conduit import Server, ServerDescriptor
    from conduit.transfer import FileTransferHandler

    for attempt in range(5):
        port = _free_port()
        server = Server(
            ServerDescriptor(
                host=_peerlib.HOST,
                port=port,
                password=_peerlib.PASSWORD,
                max_connections=int(spec.get("max_connections", 100_000)),
                connection_timeout=3600,
            )
        )
        transfer = FileTransferHandler(storage_dir=spec["storage"])
        transfer.register_server_handlers(server)

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


async def _connect(port: int) -> Any:
    from conduit import Client, ClientDescriptor

    client = Client(
        ClientDescriptor(
            server_host=_peerlib.HOST,
            server_port=port,
            password=_peerlib.PASSWORD,
            reconnect_enabled=False,
        )
    )
    if not await client.connect():
        raise RuntimeError("netconduit connect() returned False")
    return client


def _checked(outcome: dict[str, Any], what: str) -> dict[str, Any]:
    if not outcome.get("success"):
        raise RuntimeError(f"{what} failed: {outcome!r}")
    return outcome


def _upload_outcome(outcome: dict[str, Any], size: int) -> dict[str, Any]:
    """``{"success", "filename", "size", "path": absolute path on the server, ...}``."""
    path = outcome.get("path") or (outcome.get("data") or {}).get("path", "")
    return {"success": True, "path": os.path.basename(str(path)), "size": size}


async def _transfer(port: int, spec: dict[str, Any], result: dict[str, Any]) -> None:
    from conduit.transfer import FileTransferHandler

    client = await _connect(port)
    try:
        for op in spec["ops"]:
            transfer = FileTransferHandler(storage_dir=op.get("dir") or os.path.dirname(op["path"]))
            with _transferlib.OpTimer(spec.get("server_pid"), spec.get("prime")) as timer:
                if op["op"] == "upload":
                    if os.path.basename(op["path"]) != op["name"]:
                        raise ValueError("netconduit uploads under the source's base name")
                    raw = await transfer.send_to_server(client, op["path"])
                else:
                    raw = await transfer.receive_from_server(client, op["name"], op["dir"])
            _checked(raw, op["op"])
            if op["op"] == "upload":
                outcome = _upload_outcome(raw, _transferlib.file_size(op["path"]))
            else:
                outcome = {"success": True, "path": raw["path"], "size": raw["size"]}
            result["ops"].append(
                {"op": op["op"], "result": outcome, **timer.figures(outcome["size"])}
            )
    finally:
        await client.disconnect()


async def _smallfiles(port: int, spec: dict[str, Any]) -> dict[str, Any]:
    from conduit.transfer import FileTransferHandler

    client = await _connect(port)
    steps = _transferlib.SmallFileSteps(spec)
    # storage_dir is where downloads land; an upload names its source path.
    transfer = FileTransferHandler(storage_dir=steps.slices[0]["dir"])
    loop = asyncio.get_running_loop()
    concurrency = int(spec.get("concurrency", 1))

    async def uploads(source: str, names: list[str]) -> None:
        queue = iter(names)

        async def worker() -> None:
            for name in queue:
                _checked(
                    await transfer.send_to_server(client, os.path.join(source, name)),
                    f"upload of {name}",
                )

        # As conduit's x8 client: that many workers on the one connection.
        await asyncio.gather(*(worker() for _ in range(concurrency)))

    try:
        steps.ready()
        while (part := await loop.run_in_executor(None, steps.next_slice)) is not None:
            names: list[str] = list(part["names"])
            with _transferlib.OpTimer(steps.server_pid) as timer:
                await uploads(part["dir"], names)
            steps.finished(len(names), timer)
    finally:
        await client.disconnect()
    return steps.result(concurrency)


async def _hol(port: int, spec: dict[str, Any]) -> dict[str, Any]:
    """RPC latency on an idle connection, then on the same connection during an upload."""
    from conduit import data
    from conduit.transfer import FileTransferHandler

    body = _peerlib.payload(spec.get("payload_size", 100))
    client = await _connect(port)
    transfer = FileTransferHandler(storage_dir=os.path.dirname(spec["path"]))
    call = client.rpc.call

    async def one_call() -> int:
        started = time.perf_counter_ns()
        reply = await call("echo", args=data(data=body))
        elapsed = time.perf_counter_ns() - started
        if reply["data"] != body:
            raise AssertionError(f"bad reply: {reply!r}")
        return elapsed

    try:
        for _ in range(spec.get("warmup", 50)):
            await one_call()
        idle: list[int] = []
        cpu = time.process_time_ns()
        started = time.perf_counter_ns()
        for _ in range(spec["idle_calls"]):
            idle.append(await one_call())
        idle_figures = _peerlib.summarize(
            idle, time.perf_counter_ns() - started, time.process_time_ns() - cpu
        )
        busy: list[int] = []
        starts: list[int] = []
        window = _transferlib.DataWindow()
        uploading = True

        async def rpc_loop() -> None:
            # The flag, not only cancel(): Python 3.11's asyncio.wait_for (which
            # netconduit's call uses) can swallow a cancellation that races with
            # the reply, and the loop would then run forever.
            while uploading:
                starts.append(time.perf_counter_ns())
                busy.append(await one_call())

        with _transferlib.OpTimer(spec.get("server_pid")) as timer:
            loop = asyncio.ensure_future(rpc_loop())
            try:
                raw = _checked(
                    await transfer.send_to_server(client, spec["path"], window.on_progress),
                    "upload",
                )
            finally:
                uploading = False
                loop.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loop
        if not busy:
            raise RuntimeError("no RPC completed during the upload")
        busy_figures = _peerlib.summarize(busy, timer.wall_ns, timer.cpu_ns)
        # None when no call started in it (a short upload, calls paced far
        # apart): the hol scenario refuses that, benchmarks.long_link reads
        # only the whole upload's figures.
        in_data = window.calls_within(starts[: len(busy)], busy)
        data_figures = (
            _peerlib.summarize(in_data, window.wall_ns, window.cpu_ns) if in_data else None
        )
    finally:
        await client.disconnect()
    outcome = _upload_outcome(raw, _transferlib.file_size(spec["path"]))
    return {
        "idle": idle_figures,
        "during_upload": busy_figures,
        "during_data": data_figures,
        "upload": {"result": outcome, **timer.figures(outcome["size"])},
    }


async def _idle(port: int, spec: dict[str, Any]) -> dict[str, Any]:
    """Open ``connections`` authenticated clients, announce READY, hold them until SIGTERM."""
    count = int(spec["connections"])
    clients: list[Any] = []
    before = _transferlib.memory_status()

    async def opener(amount: int) -> None:
        for _ in range(amount):
            clients.append(await _connect(port))

    started = time.perf_counter()
    parts = _transferlib.split(count, int(spec.get("parallel", 8)))
    await asyncio.gather(*(opener(n) for n in parts if n))
    after = _transferlib.memory_status()
    _transferlib.announce_ready(
        {
            "connections": len(clients),
            "connect_s": time.perf_counter() - started,
            "client_rss_kib_before": before.get("VmRSS"),
            "client_rss_kib_after": after.get("VmRSS"),
        }
    )
    await _peerlib.asyncio_until_terminated()
    return {"connections": len(clients)}


async def client(port: int, spec: dict[str, Any]) -> dict[str, Any]:
    """Run the spec's workload; return the measurements."""
    from importlib.metadata import version

    import conduit

    runtime = _peerlib.runtime_info("netconduit", conduit)
    runtime["distribution_version"] = version("netconduit")
    result: dict[str, Any] = {"runtime": runtime, "ops": []}
    kind = spec["kind"]
    if kind == "transfer":
        await _transfer(port, spec, result)
    elif kind == "smallfiles":
        result["smallfiles"] = await _smallfiles(port, spec)
    elif kind == "hol":
        result["hol"] = await _hol(port, spec)
    elif kind == "idle":
        result["idle"] = await _idle(port, spec)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return result


def main() -> None:
    """Entry point (see the module docstring)."""
    args = _peerlib.parse_args()
    spec = _peerlib.parse_spec(args.spec)
    if args.role == "server":
        with _peerlib.maybe_profiled("netconduit-transfer-server"):
            asyncio.run(serve(spec))
        return
    with _peerlib.maybe_profiled("netconduit-transfer-client"):
        result = asyncio.run(client(args.port, spec))
    _peerlib.emit_result(result)


if __name__ == "__main__":
    main()
