"""The CPU cost of each step of one RPC, measured one step at a time.

``python -m benchmarks.rpc_budget`` runs every step of a ~100-byte echo call
(the ``rpc`` scenario's) in a tight loop on this process's thread CPU clock and
prints a table: client encode + seal, server open + parse + decode, the worker
hop, the dispatcher, result encode + seal, client open + decode, and the Trio
socket and scheduler costs that every message pays (with Trio's own
``send_all``/``receive_some`` and with the engine's ``SocketIO`` fast path). It
uses the real objects
(``ConnectionState``, ``FrameReader``/``FrameWriter``, ``PeerDispatcher``), not
copies of them, so it moves when they do. The sum is compared with the server
CPU per call that ``python -m benchmarks --scenario rpc`` measures end to end;
what is left is the engine glue between the steps (task switches, the outbox).

Figures are medians of ``--repeat`` runs of ``--loops`` iterations each.

``--end-to-end`` measures the whole instead: a real ``Server`` and ``Client``
in one Trio run over loopback TCP, ``--loops`` echo calls from 1 and from 16
concurrent callers, and the process CPU time per call, client and server work
together. One process, so the figure does not depend on how the other
processes of a busy machine are scheduled (only on how fast its core runs);
run it on two trees alternately to compare them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import time
from collections.abc import Callable
from typing import Any

import trio

from conduit._rpc import Handlers
from conduit._socket_io import SocketIO
from conduit.protocol import FrameReader, FrameWriter
from conduit.protocol.connection import ConnectionState
from conduit.protocol.messages import Result

KEY_C2S = bytes(range(32))
KEY_S2C = bytes(range(32, 64))
MAX_FRAME = 1024 * 1024
PAYLOAD = os.urandom(100)


def _state(*, is_client: bool) -> ConnectionState:
    return ConnectionState(
        is_client=is_client,
        receive_window=4 * 1024 * 1024,
        peer_receive_window=4 * 1024 * 1024,
        peer_max_frame_size=MAX_FRAME,
        max_concurrent_calls=1 << 30,
    )


def _writer(key: bytes) -> FrameWriter:
    writer = FrameWriter()
    writer.start_encryption(key, MAX_FRAME)
    return writer


def _reader(key: bytes) -> FrameReader:
    reader = FrameReader()
    reader.start_decryption(key, MAX_FRAME)
    return reader


def _per_op(step: Callable[[int], Any], loops: int) -> float:
    """Thread CPU microseconds per call of ``step(i)``."""
    started = time.thread_time_ns()
    for index in range(loops):
        step(index)
    return (time.thread_time_ns() - started) / loops / 1000


def sans_io_steps(loops: int) -> dict[str, float]:
    """Everything that is plain computation, in wire order."""
    client, server = _state(is_client=True), _state(is_client=False)
    c_writer, s_writer = _writer(KEY_C2S), _writer(KEY_S2C)
    c_reader, s_reader = _reader(KEY_S2C), _reader(KEY_C2S)
    args = {"data": PAYLOAD}

    handlers = Handlers(message_handler_takes_peer=True)

    async def echo(data: bytes) -> bytes:
        return data

    handlers.add_method(echo)
    dispatcher = handlers.bound_to(None)  # type: ignore[arg-type]  # echo takes no Peer

    # Pre-build one of each wire object, so each step is timed on its own.
    _, call_frame = client.start_call("echo", args)
    (call_record,) = c_writer.write_frames([(call_frame,)])
    result_frame = server.result_frame(1, Result(True, {"data": PAYLOAD}))
    (result_record,) = s_writer.write_frames([(result_frame,)])

    def client_encode(_: int) -> None:
        client.start_call("echo", args)

    def client_seal(_: int) -> None:
        c_writer.write_frames([(call_frame,)])

    # Records open only in nonce order, so every record the open steps take is
    # sealed up front, outside the timing.
    # As bytes, the way the engine's reads return them.
    call_records = [bytes(c_writer.write_frames([(call_frame,)])[0]) for _ in range(loops)]
    result_records = [bytes(s_writer.write_frames([(result_frame,)])[0]) for _ in range(loops)]
    reader_c2s, reader_s2c = _reader(KEY_C2S), _reader(KEY_S2C)
    # Skip the one record of each direction sealed before these lists.
    _skip(reader_c2s, 1)
    _skip(reader_s2c, 1)
    # The decode steps take frames opened here, outside the timing, by readers
    # of their own. The open steps drop each frame, as the engine does once it
    # has handled it: a step that kept them all would time the cycle
    # collector's passes over a growing list too (1.5-2.5 us more per open).
    frames = _opened(call_records, KEY_C2S)
    result_frames = _opened(result_records, KEY_S2C)

    def server_open(index: int) -> None:
        reader_c2s.feed(call_records[index])
        reader_c2s.next_frame()

    def server_decode(index: int) -> None:
        event = server.receive_frame(frames[index])
        server.call_finished(event.call_id)  # type: ignore[union-attr]

    def server_dispatch(_: int) -> None:
        coroutine = dispatcher.handle_call("echo", args)
        with contextlib.suppress(StopIteration):
            coroutine.send(None)

    def server_encode(index: int) -> None:
        server.result_frame(index + 1, Result(True, {"data": PAYLOAD}))

    def server_seal(_: int) -> None:
        s_writer.write_frames([(result_frame,)])

    def client_open(index: int) -> None:
        reader_s2c.feed(result_records[index])
        reader_s2c.next_frame()

    def client_decode(index: int) -> None:
        client.receive_frame(result_frames[index])

    steps = {
        "client: encode CALL (msgpack + cattrs + header)": client_encode,
        "client: seal CALL record (AES-256-GCM)": client_seal,
        "server: open record + split frames": server_open,
        "server: receive_frame (decode Call, id checks)": server_decode,
        "server: dispatcher (bind args, peer contextvar, echo, to_wire)": server_dispatch,
        "server: encode RESULT": server_encode,
        "server: seal RESULT record": server_seal,
        "client: open record + split frames": client_open,
        "client: receive_frame (decode Result)": client_decode,
    }
    del c_reader, s_reader, call_record, result_record
    return {name: _per_op(step, loops) for name, step in steps.items()}


def _opened(records: list[bytes], key: bytes) -> list[Any]:
    """The frames of ``records`` (sealed after one other record with ``key``), opened."""
    reader = _reader(key)
    _skip(reader, 1)
    frames = []
    for record in records:
        reader.feed(record)
        frames.append(reader.next_frame())
    return frames


def _skip(reader: FrameReader, count: int) -> None:
    """Bring ``reader``'s nonce counter past ``count`` records nobody will open."""
    opener = reader._opener  # measurement only
    assert opener is not None
    opener._counter += count


def trio_steps(loops: int) -> dict[str, float]:
    """What every message pays to Trio: a task hop, and a socket send + wake-up + receive."""
    result: dict[str, float] = {}

    async def hop() -> None:
        # Two tasks hand a token back and forth through ParkingLots: what the
        # reader -> worker handoff (and the result -> caller wake-up) costs.
        lots = trio.lowlevel.ParkingLot(), trio.lowlevel.ParkingLot()
        count = loops

        async def side() -> None:
            for _ in range(count):
                await lots[1].park()
                lots[0].unpark()

        started = time.thread_time_ns()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(side)
            while not lots[1]:  # side parks first (Trio picks the order)
                await trio.lowlevel.checkpoint()
            for _ in range(count):
                lots[1].unpark()
                await lots[0].park()
        result["trio: one task hop (unpark + park + scheduler pass)"] = (
            (time.thread_time_ns() - started) / (2 * count) / 1000
        )

    async def ping_pong() -> None:
        # One message each way over a socket pair: send_all, epoll wake-up,
        # receive_some, as every CALL and RESULT crosses the connection.
        left, right = socket.socketpair()
        a, b = (
            trio.SocketStream(trio.socket.from_stdlib_socket(left)),
            trio.SocketStream(trio.socket.from_stdlib_socket(right)),
        )
        message = bytes(160)

        async def echo() -> None:
            for _ in range(loops):
                data = await b.receive_some(65536)
                await b.send_all(data)

        started = time.thread_time_ns()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(echo)
            for _ in range(loops):
                await a.send_all(message)
                await a.receive_some(65536)
        result["trio: message over loopback (send_all + epoll wake + receive_some)"] = (
            (time.thread_time_ns() - started) / (2 * loops) / 1000
        )
        await a.aclose()
        await b.aclose()

    async def socket_io_ping_pong() -> None:
        # The same over conduit's SocketIO, as the engine does on a plain
        # socket: a non-blocking write, and no scheduler pass on the read that
        # follows a wake-up.
        left, right = socket.socketpair()
        a, b = (
            trio.SocketStream(trio.socket.from_stdlib_socket(left)),
            trio.SocketStream(trio.socket.from_stdlib_socket(right)),
        )
        fast_a, fast_b = SocketIO.of(a), SocketIO.of(b)
        assert fast_a is not None and fast_b is not None
        message = bytes(160)

        async def echo() -> None:
            for _ in range(loops):
                data = await fast_b.receive(65536)
                fast_b.send_now(data)

        started = time.thread_time_ns()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(echo)
            for _ in range(loops):
                fast_a.send_now(message)
                await fast_a.receive(65536)
        result["conduit: message over loopback (SocketIO send_now + epoll wake + receive)"] = (
            (time.thread_time_ns() - started) / (2 * loops) / 1000
        )
        await a.aclose()
        await b.aclose()

    trio.run(hop)
    trio.run(ping_pong)
    trio.run(socket_io_ping_pong)
    return result


def end_to_end(loops: int, callers: int) -> float:
    """Process CPU microseconds per echo call, client and server in this process."""
    from conduit import Client, ClientDescriptor, Server, ServerDescriptor

    password = "rpc budget password"
    spent: list[float] = []

    async def main() -> None:
        server = Server(ServerDescriptor(host="127.0.0.1", port=0, password=password))

        @server.rpc
        async def echo(data: bytes) -> bytes:
            return data

        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.run)
            client = Client(
                ClientDescriptor(server_host="127.0.0.1", server_port=port, password=password)
            )
            await client.connect()
            call = client.rpc.call

            async def caller(count: int) -> None:
                for _ in range(count):
                    await call("echo", data=PAYLOAD)

            await caller(500)  # warm-up
            started = time.process_time_ns()
            async with trio.open_nursery() as callers_nursery:
                for _ in range(callers):
                    callers_nursery.start_soon(caller, loops // callers)
            spent.append((time.process_time_ns() - started) / (loops // callers * callers) / 1000)
            await client.disconnect()
            await server.close()
            nursery.cancel_scope.cancel()

    trio.run(main)
    return spent[0]


def main(argv: list[str] | None = None) -> None:
    """Print the per-step table (or the end-to-end figures)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loops", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--end-to-end", action="store_true", help="CPU per call of a real Server and Client"
    )
    options = parser.parse_args(argv)
    if options.end_to_end:
        for callers in (1, 16):
            values = [end_to_end(options.loops, callers) for _ in range(options.repeat)]
            print(
                f"end to end, {callers:2d} caller(s): {statistics.median(values):6.2f} us CPU/call "
                f"(client + server; median of {options.repeat}; "
                f"{min(values):.2f}-{max(values):.2f})"
            )
        return
    runs: dict[str, list[float]] = {}
    for _ in range(options.repeat):
        for name, value in {**sans_io_steps(options.loops), **trio_steps(options.loops)}.items():
            runs.setdefault(name, []).append(value)
    width = max(len(name) for name in runs)
    print(f"{'step':{width}s}  us/op (median of {options.repeat}; min-max)")
    for name, values in runs.items():
        print(
            f"{name:{width}s}  {statistics.median(values):6.2f}  "
            f"({min(values):.2f}-{max(values):.2f})"
        )


if __name__ == "__main__":
    main()
