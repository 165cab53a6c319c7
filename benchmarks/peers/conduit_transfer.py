"""conduit (this repository) as a file-transfer benchmark peer.

The server runs on Trio: ``Server`` + ``FileTransferHandler(storage_dir=...)``
with ``register_server_handlers`` (the guide's setup) and an ``echo`` RPC for
the head-of-line scenario. The client runs on Trio (``--flavor trio``) or under
``asyncio.run`` through the shim (``--flavor asyncio``) and uses the guide's API
only: ``transfer.send_to_server(client, path)`` and
``transfer.receive_from_server(client, name, local_dir=...)``.

Client kinds (``--spec``, see ``_transferlib``): ``transfer``, ``smallfiles``,
``hol`` and ``idle``.

Usage: ``python conduit_transfer.py server --spec '{"storage": DIR}'`` /
``python conduit_transfer.py client --port N --spec JSON [--flavor asyncio]``.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import _peerlib
import _transferlib


async def serve(spec: dict[str, Any]) -> None:
    """Serve transfers into ``spec["storage"]`` (and ``echo``) until SIGTERM."""
    import trio

    from conduit import FileTransferHandler, Server, ServerDescriptor

    server = Server(
        ServerDescriptor(
            host=_peerlib.HOST,
            port=0,
            password=_peerlib.PASSWORD,
            max_connections=int(spec.get("max_connections", 1000)),
            max_connections_per_user=spec.get("max_connections_per_user"),
            max_receive_window=spec.get("max_receive_window"),
        )
    )
    transfer = FileTransferHandler(storage_dir=spec["storage"])
    transfer.register_server_handlers(server)

    @server.rpc
    async def echo(data: bytes) -> bytes:
        return data

    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.run)
        _peerlib.announce_port(port)
        await _peerlib.trio_until_terminated()
        await server.close()


def _make_client(port: int, spec: dict[str, Any] | None = None) -> Any:
    """A client of the server on ``port``; the spec's ``max_receive_window``, if any."""
    from conduit import Client, ClientDescriptor

    return Client(
        ClientDescriptor(
            server_host=_peerlib.HOST,
            server_port=port,
            password=_peerlib.PASSWORD,
            max_receive_window=(spec or {}).get("max_receive_window"),
        )
    )


def _checked(outcome: dict[str, Any], what: str) -> dict[str, Any]:
    """``outcome`` if the transfer succeeded and moved every byte it is timed for.

    A transfer that resumed, or was skipped because an equal file was already
    there, would be timed for bytes it never sent: the figures would flatter it.
    """
    if not outcome.get("success"):
        raise RuntimeError(f"{what} failed: {outcome!r}")
    for moved in (outcome, *outcome.get("files", ())):
        if moved.get("resumed_from") or moved.get("skipped") or moved.get("already_there"):
            raise RuntimeError(f"{what} did not move the whole file: {moved!r}")
    return outcome


class _Driver:
    """The few concurrency primitives the workloads need, in Trio or asyncio."""

    def __init__(self, flavor: str) -> None:
        self.flavor = flavor
        #: Set when ``while_running`` stops its side task: loops check it as well,
        #: since an asyncio cancellation can be swallowed by a racing reply.
        self.stopping = False

    async def gather(self, jobs: list[Callable[[], Awaitable[None]]]) -> None:
        """Run ``jobs`` concurrently and wait for all of them."""
        if self.flavor == "trio":
            import trio

            async with trio.open_nursery() as nursery:
                for job in jobs:
                    nursery.start_soon(job)
        else:
            import asyncio

            await asyncio.gather(*(job() for job in jobs))

    async def while_running(
        self, main: Callable[[], Awaitable[Any]], side: Callable[[], Awaitable[None]]
    ) -> Any:
        """Run ``side`` in the background while ``main`` runs; stop it when ``main`` returns."""
        if self.flavor == "trio":
            import trio

            box: list[Any] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(side)
                box.append(await main())
                nursery.cancel_scope.cancel()
            return box[0]
        import asyncio
        import contextlib

        task = asyncio.ensure_future(side())
        try:
            return await main()
        finally:
            self.stopping = True
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def to_thread(self, function: Callable[[], Any]) -> Any:
        """Run a blocking ``function`` (a read of stdin) in a thread of the current world."""
        if self.flavor == "trio":
            import trio

            return await trio.to_thread.run_sync(function)
        import asyncio

        return await asyncio.get_running_loop().run_in_executor(None, function)

    async def sleep(self, seconds: float) -> None:
        """Sleep in the current world."""
        if self.flavor == "trio":
            import trio

            await trio.sleep(seconds)
        else:
            import asyncio

            await asyncio.sleep(seconds)


#: The ticker that measures how late the event loop runs callbacks during a
#: transfer (the asyncio shim's promise: big transfers never stall the loop).
_TICK = 0.005


async def _tick(driver: _Driver, lateness: list[float]) -> None:
    while not driver.stopping:
        started = time.perf_counter()
        await driver.sleep(_TICK)
        lateness.append(time.perf_counter() - started - _TICK)


def _stall_figures(lateness: list[float]) -> dict[str, float | None]:
    if not lateness:
        return {"loop_stall_max_ms": None, "loop_stall_p99_ms": None}
    ordered = sorted(lateness)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return {"loop_stall_max_ms": ordered[-1] * 1000, "loop_stall_p99_ms": p99 * 1000}


async def _transfer(
    port: int, spec: dict[str, Any], result: dict[str, Any], driver: _Driver
) -> None:
    from conduit import FileTransferHandler

    client = _make_client(port, spec)
    await client.connect()
    transfer = FileTransferHandler()
    try:
        for op in spec["ops"]:

            async def one(op: dict[str, Any] = op) -> dict[str, Any]:
                if op["op"] == "upload":
                    return await transfer.send_to_server(client, op["path"], remote_name=op["name"])
                return await transfer.receive_from_server(client, op["name"], local_dir=op["dir"])

            lateness: list[float] = []

            async def ticker(lateness: list[float] = lateness) -> None:
                await _tick(driver, lateness)

            driver.stopping = False
            with _transferlib.OpTimer(spec.get("server_pid"), spec.get("prime")) as timer:
                outcome = await driver.while_running(one, ticker)
            _checked(outcome, op["op"])
            # A directory's result has a size per file.
            size = outcome.get(
                "size", sum(file.get("size", 0) for file in outcome.get("files", ()))
            )
            result["ops"].append(
                {
                    "op": op["op"],
                    "result": outcome,
                    **timer.figures(size),
                    **_stall_figures(lateness),
                }
            )
    finally:
        await client.disconnect()

    async def connect_once() -> int:
        probe = _make_client(port)
        started = time.perf_counter_ns()
        await probe.connect()
        elapsed = time.perf_counter_ns() - started
        await probe.disconnect()
        return elapsed

    if spec.get("connects"):
        result["handshake"] = await _peerlib.time_handshakes(
            connect_once, spec.get("handshake_warmup", 2), spec["connects"]
        )


async def _smallfiles(port: int, spec: dict[str, Any], driver: _Driver) -> dict[str, Any]:
    from conduit import FileTransferHandler

    client = _make_client(port)
    await client.connect()
    transfer = FileTransferHandler()
    steps = _transferlib.SmallFileSteps(spec)
    concurrency = int(spec.get("concurrency", 1))

    async def directory(source: str, count: int) -> None:
        # The whole source directory in one call, into the storage root itself.
        outcome = _checked(
            await transfer.send_to_server(client, source, remote_name=""), "directory upload"
        )
        if outcome["transferred"] != count:
            raise RuntimeError(f"directory upload sent {outcome['transferred']} of {count}")

    async def uploads(source: str, names: list[str]) -> None:
        queue = iter(names)

        async def worker() -> None:
            for name in queue:
                _checked(
                    await transfer.send_to_server(
                        client, os.path.join(source, name), remote_name=name
                    ),
                    f"upload of {name}",
                )

        await driver.gather([worker] * concurrency)

    async def next_slice() -> dict[str, Any] | None:
        # Only a paced run waits on stdin (in a thread: the connection stays served).
        return await driver.to_thread(steps.next_slice) if steps.stepped else steps.next_slice()

    try:
        steps.ready()
        while (part := await next_slice()) is not None:
            names: list[str] = list(part["names"])
            with _transferlib.OpTimer(steps.server_pid) as timer:
                if spec.get("directory"):
                    await directory(part["dir"], len(names))
                else:
                    await uploads(part["dir"], names)
            steps.finished(len(names), timer)
    finally:
        await client.disconnect()
    return steps.result(concurrency)


async def _hol(port: int, spec: dict[str, Any], driver: _Driver) -> dict[str, Any]:
    """RPC latency on an idle connection, then on the same connection during an upload."""
    from conduit import FileTransferHandler

    body = _peerlib.payload(spec.get("payload_size", 100))
    client = _make_client(port, spec)
    await client.connect()
    transfer = FileTransferHandler()
    call = client.rpc.call
    pause = float(spec.get("pause_s", 0.0))

    async def one_call() -> int:
        started = time.perf_counter_ns()
        reply = await call("echo", data=body)
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
            if pause:
                await driver.sleep(pause)
        idle_figures = _peerlib.summarize(
            idle, time.perf_counter_ns() - started, time.process_time_ns() - cpu
        )
        busy: list[int] = []
        starts: list[int] = []
        window = _transferlib.DataWindow()

        async def rpc_loop() -> None:
            while not driver.stopping:
                starts.append(time.perf_counter_ns())
                busy.append(await one_call())
                if pause:
                    await driver.sleep(pause)

        async def upload() -> dict[str, Any]:
            return _checked(
                await transfer.send_to_server(
                    client, spec["path"], window.on_progress, remote_name=spec["name"]
                ),
                "upload",
            )

        with _transferlib.OpTimer(spec.get("server_pid")) as timer:
            outcome = await driver.while_running(upload, rpc_loop)
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
    return {
        "idle": idle_figures,
        "during_upload": busy_figures,
        "during_data": data_figures,
        "upload": {"result": outcome, **timer.figures(outcome["size"])},
    }


async def _idle(port: int, spec: dict[str, Any], driver: _Driver) -> dict[str, Any]:
    """Open ``connections`` authenticated clients, announce READY, hold them until SIGTERM."""
    count = int(spec["connections"])
    parallel = int(spec.get("parallel", 8))
    clients: list[Any] = []
    before = _transferlib.memory_status()

    async def opener(amount: int) -> None:
        for _ in range(amount):
            client = _make_client(port)
            await client.connect()
            clients.append(client)

    started = time.perf_counter()
    await driver.gather(
        [functools.partial(opener, n) for n in _transferlib.split(count, parallel) if n]
    )
    after = _transferlib.memory_status()
    _transferlib.announce_ready(
        {
            "connections": len(clients),
            "connect_s": time.perf_counter() - started,
            "client_rss_kib_before": before.get("VmRSS"),
            "client_rss_kib_after": after.get("VmRSS"),
        }
    )
    if driver.flavor == "trio":
        await _peerlib.trio_until_terminated()
    else:
        await _peerlib.asyncio_until_terminated()
    return {"connections": len(clients)}


async def client(port: int, spec: dict[str, Any], flavor: str) -> dict[str, Any]:
    """Run the spec's workload under ``flavor``; return the measurements."""
    import conduit

    driver = _Driver(flavor)
    result: dict[str, Any] = {
        "runtime": {**_peerlib.runtime_info("conduit", conduit), "flavor": flavor},
        "ops": [],
    }
    kind = spec["kind"]
    if kind == "transfer":
        await _transfer(port, spec, result, driver)
    elif kind == "smallfiles":
        result["smallfiles"] = await _smallfiles(port, spec, driver)
    elif kind == "hol":
        result["hol"] = await _hol(port, spec, driver)
    elif kind == "idle":
        result["idle"] = await _idle(port, spec, driver)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return result


def main() -> None:
    """Entry point (see the module docstring)."""
    args = _peerlib.parse_args()
    spec = _peerlib.parse_spec(args.spec)
    if args.role == "server":
        import trio

        with _peerlib.maybe_profiled("conduit-transfer-server"):
            trio.run(serve, spec)
        return
    with _peerlib.maybe_profiled(f"conduit-transfer-{args.flavor}-client"):
        if args.flavor == "trio":
            import trio

            result = trio.run(client, args.port, spec, "trio")
        else:
            import asyncio

            result = asyncio.run(client(args.port, spec, "asyncio"))
    _peerlib.emit_result(result)


if __name__ == "__main__":
    main()
