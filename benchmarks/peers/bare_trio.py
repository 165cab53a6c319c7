"""Bare Trio echo over loopback TCP: the floor of the ``rpc`` scenario.

Messages are ``!II`` (body length, call id) followed by the payload; no
authentication, no encryption, no serialisation. The server echoes every
complete message it has buffered in one ``send_all``. The client multiplexes
concurrent callers on one connection the way any RPC client must (a reader task
wakes the waiting caller; a writer task coalesces queued requests into one
``send_all``); ``seq-direct`` is the plain ping-pong without helper tasks, the
absolute floor.

Usage: ``python bare_trio.py server`` / ``python bare_trio.py client --port N --spec JSON``.
"""

from __future__ import annotations

import struct
import time
from typing import Any

import _peerlib
import trio

HEADER = struct.Struct("!II")
CHUNK = 65536


class _Framer:
    """Incremental parser of ``!II`` framed messages."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self.buffer += data
        messages: list[tuple[int, bytes]] = []
        offset = 0
        buffer = self.buffer
        while len(buffer) - offset >= HEADER.size:
            length, call_id = HEADER.unpack_from(buffer, offset)
            end = offset + HEADER.size + length
            if len(buffer) < end:
                break
            messages.append((call_id, bytes(buffer[offset + HEADER.size : end])))
            offset = end
        del buffer[:offset]
        return messages


async def _serve_one(stream: trio.SocketStream) -> None:
    framer = _Framer()
    try:
        while data := await stream.receive_some(CHUNK):
            replies = [
                HEADER.pack(len(body), call_id) + body for call_id, body in framer.feed(data)
            ]
            if replies:
                await stream.send_all(b"".join(replies))
    except trio.BrokenResourceError:
        pass


async def serve() -> None:
    """Listen on an ephemeral loopback port and echo until SIGTERM."""
    listeners = await trio.open_tcp_listeners(0, host=_peerlib.HOST)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, _serve_one, listeners)
        _peerlib.announce_port(listeners[0].socket.getsockname()[1])
        await _peerlib.trio_until_terminated()
        nursery.cancel_scope.cancel()


class MuxClient:
    """One connection, many concurrent callers.

    A reader task wakes the waiting caller; a writer task sends everything the
    callers queued since its last write in one ``send_all`` (coalescing, as any
    decent RPC client does under load).
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.waiting: dict[int, list[Any]] = {}
        self.outbox: list[bytes] = []
        self.wakeup = trio.Event()
        self.next_id = 0

    async def reader(self) -> None:
        """Hand each reply to the caller waiting for its id, until the stream ends."""
        framer = _Framer()
        while data := await self.stream.receive_some(CHUNK):
            for call_id, body in framer.feed(data):
                slot = self.waiting.pop(call_id)
                slot[1] = body
                slot[0].set()

    async def writer(self) -> None:
        """Send whatever the callers queued since the last write, in one ``send_all``."""
        while True:
            await self.wakeup.wait()
            self.wakeup = trio.Event()
            data = b"".join(self.outbox)
            self.outbox.clear()
            await self.stream.send_all(data)

    async def call(self, body: bytes) -> bytes:
        """Send ``body`` as one call and return the echoed reply."""
        self.next_id += 1
        call_id = self.next_id
        slot: list[Any] = [trio.Event(), None]
        self.waiting[call_id] = slot
        self.outbox.append(HEADER.pack(len(body), call_id) + body)
        self.wakeup.set()
        await slot[0].wait()
        return slot[1]  # type: ignore[no-any-return]


async def _direct_ping_pong(stream: trio.SocketStream, body: bytes, count: int) -> dict[str, float]:
    framer = _Framer()
    message = HEADER.pack(len(body), 0) + body
    latencies: list[int] = []
    clock = time.perf_counter_ns
    cpu_started = time.process_time_ns()
    started = clock()
    for _ in range(count):
        begun = clock()
        await stream.send_all(message)
        while not (replies := framer.feed(await stream.receive_some(CHUNK))):
            pass
        if replies[0][1] != body:
            raise AssertionError("bad echo")
        latencies.append(clock() - begun)
    wall = clock() - started
    return _peerlib.summarize(latencies, wall, time.process_time_ns() - cpu_started)


async def _connect_once(port: int) -> int:
    started = time.perf_counter_ns()
    stream = await trio.open_tcp_stream(_peerlib.HOST, port)
    elapsed = time.perf_counter_ns() - started
    await stream.aclose()
    return elapsed


async def _mux_workloads(
    port: int, body: bytes, spec: dict[str, Any], into: dict[str, Any]
) -> None:
    stream = await trio.open_tcp_stream(_peerlib.HOST, port)
    async with stream, trio.open_nursery() as nursery:
        mux = MuxClient(stream)
        nursery.start_soon(mux.reader)
        nursery.start_soon(mux.writer)

        async def one_call() -> None:
            if await mux.call(body) != body:
                raise AssertionError("bad echo")

        for _ in range(spec["warmup"]):
            await one_call()
        for workload in spec["workloads"]:
            into[workload["name"]] = await _peerlib.trio_closed_loop(
                one_call, workload["callers"], workload["calls"]
            )
        nursery.cancel_scope.cancel()


async def client(port: int, spec: dict[str, Any]) -> dict[str, Any]:
    """Run the spec's handshakes and workloads; return the measurements."""
    body = _peerlib.payload(spec["payload_size"])
    result: dict[str, Any] = {"runtime": _peerlib.runtime_info("trio", trio), "workloads": {}}
    if spec["handshakes"]:
        result["handshake"] = await _peerlib.time_handshakes(
            lambda: _connect_once(port), spec["handshake_warmup"], spec["handshakes"]
        )
    if spec["workloads"]:
        await _mux_workloads(port, body, spec, result["workloads"])
    direct_calls = spec.get("direct_calls", 0)
    if direct_calls:
        async with await trio.open_tcp_stream(_peerlib.HOST, port) as direct:
            await _direct_ping_pong(direct, body, spec["warmup"])
            result["workloads"]["seq-direct"] = await _direct_ping_pong(direct, body, direct_calls)
    return result


def main() -> None:
    """Entry point (see the module docstring)."""
    args = _peerlib.parse_args()
    if args.role == "server":
        with _peerlib.maybe_profiled("bare-trio-server"):
            trio.run(serve)
        return
    spec = _peerlib.parse_spec(args.spec)
    with _peerlib.maybe_profiled("bare-trio-client"):
        result = trio.run(client, args.port, spec)
    _peerlib.emit_result(result)


if __name__ == "__main__":
    main()
