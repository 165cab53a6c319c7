"""Pre-authentication attacks on a conduit server, with an honest client measuring.

Usage: ``python auth_attacker.py client --port N --spec JSON`` against
``conduit_peer.py server`` (default settings, shared password). The spec names
the attack and its size::

    {"attack": "guesses", "guesses": 100, "window_s": 10}
    {"attack": "hello_flood", "sockets": 32, "seconds": 15, "addresses": 1}
    {"attack": "hello_flood", "sockets": 1, "seconds": 15, "addresses": 40000}
    {"attack": "idle_flood", "rate": 100, "seconds": 15, "tries": 25}
    {"attack": "honest", "seconds": 15, "baseline_s": 2}   (started by hello_flood)

Each attack comes from its own loopback source address (127.0.0.x), the honest
client from 127.0.0.1 (or 127.0.0.2 for the idle flood), as the thresholds of
the hardening issue describe. Prints ``RESULT {...}``.

The hello flood's honest client runs in a process of its own (this script with
``{"attack": "honest", ...}``): 32 flooding sockets keep the attacker's event
loop busy all the time (about a whole core), and an honest client sharing that
loop would measure the attacker's scheduling, not the server's.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from typing import Any

import _peerlib
import trio

from conduit import AuthenticationError, Client, ClientDescriptor, LockedOut
from conduit.protocol import ClientHandshake
from conduit.protocol.frames import HEADER, MAGIC, FrameKind


def _descriptor(port: int, password: str = _peerlib.PASSWORD) -> ClientDescriptor:
    return ClientDescriptor(
        server_host=_peerlib.HOST, server_port=port, password=password, connect_timeout=20
    )


async def _connect(port: int, password: str, source: str) -> Client:
    client = Client(_descriptor(port, password))
    stream = await trio.open_tcp_stream(_peerlib.HOST, port, local_address=source)
    await client.connect(stream=stream)
    return client


async def guesses(port: int, spec: dict[str, Any]) -> dict[str, Any]:
    """``guesses`` wrong passwords in parallel from one address: how many were evaluated."""
    outcome = {"evaluated": 0, "locked_out": 0, "other": 0}

    async def guess() -> None:
        try:
            await _connect(port, "wrong guess", "127.0.0.10")
        except LockedOut:
            outcome["locked_out"] += 1
        except AuthenticationError:
            outcome["evaluated"] += 1
        except Exception:  # a refusal of another kind still is no evaluated guess
            outcome["other"] += 1

    started = time.perf_counter()
    with trio.move_on_after(spec.get("window_s", 10)):
        async with trio.open_nursery() as nursery:
            for _ in range(spec.get("guesses", 100)):
                nursery.start_soon(guess)
    return {**outcome, "seconds": time.perf_counter() - started}


async def _rpc_latencies(client: Client, stop: trio.Event) -> list[int]:
    body = _peerlib.payload(100)
    latencies: list[int] = []
    while not stop.is_set():
        started = time.perf_counter_ns()
        await client.call("echo", data=body)
        latencies.append(time.perf_counter_ns() - started)
        await trio.sleep(0.005)
    return latencies


def _p(latencies: list[int], fraction: float) -> float:
    return _peerlib.percentile(sorted(latencies), fraction) / 1e6


async def honest(port: int, spec: dict[str, Any]) -> dict[str, Any]:
    """The hello flood's honest client: RPC latencies for ``baseline_s`` before the
    flood (then it prints ``BASELINE``, the signal to start it) and ``seconds`` during."""
    client = await _connect(port, _peerlib.PASSWORD, "127.0.0.1")
    baseline_stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_sleep_then_set, spec.get("baseline_s", 2.0), baseline_stop)
        baseline = await _rpc_latencies(client, baseline_stop)
    print("BASELINE", flush=True)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_sleep_then_set, spec.get("seconds", 15), stop)
        during = await _rpc_latencies(client, stop)
    await client.disconnect()
    return {
        "baseline_p99_ms": _p(baseline, 0.99),
        "p50_ms": _p(during, 0.50),
        "p99_ms": _p(during, 0.99),
        "max_ms": max(during) / 1e6,
        "calls": len(during),
    }


async def _read_line(stdout: trio.abc.ReceiveStream, buffer: bytearray) -> str:
    while b"\n" not in buffer:
        data = await stdout.receive_some()
        if not data:
            raise RuntimeError(f"the honest client exited: {bytes(buffer)!r}")
        buffer += data
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line.decode()


async def hello_flood(port: int, spec: dict[str, Any]) -> dict[str, Any]:
    """``sockets`` concurrent sockets replaying CLIENT_HELLOs; the honest client's RPC p99.

    Each new socket comes from the next of ``addresses`` source addresses
    (127.0.20.1 on), in turn: 32 sockets over 1 or 32 addresses flood from
    each at once; 1 socket over tens of thousands sends one hello at a time
    from an address that has failed too few times to be locked out (the
    per-address budget is 5 failures a minute). A socket is closed once
    answered; the server has let its attempt go by the time the next one's
    hello is read (counted: every step of such a flood ran alone in the
    server's gate). ``hellos_refused`` counts the answers that were a
    refusal (AUTH_FAILED: an address locked out, or the server's own limits),
    not a SERVER_HELLO: a flood meant to stay under the lock-out that is
    refused has not done the work it was sized for.
    """
    hello = ClientHandshake(
        "wrong guess", name="flood", max_frame_size=1 << 20, receive_window=4 << 20
    ).start()
    seconds = spec.get("seconds", 15)
    addresses = spec.get("addresses", 1)
    if not 1 <= addresses <= 236 * 250:  # 127.0.20.1 to 127.0.255.250
        raise ValueError(f"addresses must be 1 to {236 * 250}, not {addresses}")
    sent = 0
    opened = 0
    refused = 0

    async def flooder(stop: trio.Event) -> None:
        nonlocal sent, opened, refused
        while not stop.is_set():
            index = opened % addresses
            opened += 1
            source = f"127.0.{20 + index // 250}.{1 + index % 250}"
            with contextlib.suppress(OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                stream = await trio.open_tcp_stream(_peerlib.HOST, port, local_address=source)
                try:
                    await stream.send_all(hello)
                    sent += 1
                    answer = b""
                    with trio.move_on_after(2):
                        answer = await stream.receive_some(4096)
                    if _is_refusal(answer):
                        refused += 1
                finally:
                    await trio.aclose_forcefully(stream)

    honest_spec = {"attack": "honest", "seconds": seconds, "baseline_s": 2.0}
    argv = [sys.executable, __file__, "client", "--port", str(port)]
    argv += ["--spec", json.dumps(honest_spec)]
    cpu_started = time.process_time()
    process = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None
        buffer = bytearray()
        while await _read_line(process.stdout, buffer) != "BASELINE":
            pass
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            for _ in range(spec.get("sockets", 32)):
                nursery.start_soon(flooder, stop)
            nursery.start_soon(_sleep_then_set, seconds, stop)
        attacker_cpu = time.process_time() - cpu_started
        while not (line := await _read_line(process.stdout, buffer)).startswith("RESULT "):
            pass
        await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    measured: dict[str, Any] = json.loads(line[len("RESULT ") :])
    measured.pop("attack", None)
    return {
        "hellos_sent": sent,
        "hellos_refused": refused,
        "attacker_cpu_s": attacker_cpu,
        **measured,
    }


def _is_refusal(answer: bytes) -> bool:
    """Whether the server's first bytes are an AUTH_FAILED frame (not a SERVER_HELLO)."""
    if len(answer) < HEADER.size:
        return False
    magic, _version, kind, *_ = HEADER.unpack_from(answer)
    return bool(magic == MAGIC and kind == FrameKind.AUTH_FAILED)


async def _sleep_then_set(seconds: float, event: trio.Event) -> None:
    await trio.sleep(seconds)
    event.set()


async def idle_flood(port: int, spec: dict[str, Any]) -> dict[str, Any]:
    """Idle sockets from 127.0.0.30 at ``rate``/s; how often 127.0.0.2 still gets in."""
    held: list[trio.SocketStream] = []
    opened = 0
    connected = 0
    tries = spec.get("tries", 25)
    seconds = spec.get("seconds", 15)

    async def flood(stop: trio.Event) -> None:
        nonlocal opened
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(
                    await trio.open_tcp_stream(_peerlib.HOST, port, local_address="127.0.0.30")
                )
                opened += 1
            await trio.sleep(1 / spec.get("rate", 100))

    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(flood, stop)
        await trio.sleep(min(3.0, seconds / 3))  # let the flood fill what it can
        for _ in range(tries):
            try:
                with trio.fail_after(10):
                    client = await _connect(port, _peerlib.PASSWORD, "127.0.0.2")
                await client.disconnect()
                connected += 1
            except Exception:  # a refusal or a timeout: a failed try
                pass
            await trio.sleep(max(0.0, (seconds - 3) / tries))
        stop.set()
    for stream in held:
        await trio.aclose_forcefully(stream)
    return {"tries": tries, "connected": connected, "idle_sockets_opened": opened}


ATTACKS = {
    "guesses": guesses,
    "hello_flood": hello_flood,
    "honest": honest,
    "idle_flood": idle_flood,
}


def main() -> None:
    """Entry point (see the module docstring)."""
    args = _peerlib.parse_args()
    spec = _peerlib.parse_spec(args.spec)
    result = trio.run(ATTACKS[spec["attack"]], args.port, spec)
    _peerlib.emit_result({"attack": spec["attack"], **result})


if __name__ == "__main__":
    main()
