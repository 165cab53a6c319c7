"""The server's CPU per connect + authenticate, split into its parts.

``python -m benchmarks.handshake_budget`` starts a conduit server in a child
process (shared password, or ``--mode accounts`` with one account at the
default Argon2id cost), connects and disconnects ``--connects`` times over
loopback the way the ``rpc`` scenario's handshake run does (a ``Client`` per
connect; in accounts mode one ``Client`` reconnecting), and reads the server
process's CPU time from ``/proc`` around the run: many more connects than the
scenario's quick mode, whose 12 connects meet the 10 ms clock tick. Each run is
done twice, alternately, ``--repeat`` times:

- **full**: what the scenario measures, from the accept to the socket's close
  (handshake, WELCOME, the session's start and its end on the client's GOODBYE);
- **handshake only**: the same server, but each connection is closed right after
  its WELCOME (the server's per-session method replaced in the child): the
  difference is what starting and ending a session costs.

``--callgrind`` runs the server under ``valgrind --tool=callgrind`` and reports
instructions per connect instead of CPU time: slower (about 50x), but the same
on a loaded machine as on a quiet one, so before/after comparisons need no
quiet minutes. (The server's loop share is unlimited then: at valgrind's pace
it would run out and move steps to worker threads, as many as the load made
it, and the count would depend on the load after all.) Last, the sans-IO
steps of the server's handshake are timed in this process (thread CPU clock):
the two ``ServerHandshake.receive`` calls, ``ServerHandshake.precompute``
between them (the multiplication done once the SERVER_HELLO is sent) and the
group operations inside them.
"""

from __future__ import annotations

import argparse
import gc
import glob
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PASSWORD = "handshake-budget-password"
USERNAME = "bench"
HOST = "127.0.0.1"


# ----------------------------------------------------------------------------- the server


async def _serve(mode: str, handshake_only: bool, callgrind: bool) -> None:
    import trio

    from conduit import Accounts, Server, ServerDescriptor
    from conduit._gatekeeper import LoopShare

    if mode == "accounts":
        # Removed when the server returns (a TemporaryDirectory's finalizer).
        scratch = tempfile.TemporaryDirectory(prefix="conduit-budget-")
        accounts = Accounts(Path(scratch.name) / "accounts.json")
        accounts.add(USERNAME, PASSWORD)
        descriptor = ServerDescriptor(host=HOST, port=0, accounts=accounts)
    else:
        descriptor = ServerDescriptor(host=HOST, port=0, password=PASSWORD)
    server = Server(descriptor)
    if handshake_only:
        # Measurement only: the session is skipped, the connection's task then
        # closes the socket as it does after any session.
        async def no_session(*_: Any) -> None:
            return None

        server._serve_client = no_session  # type: ignore[method-assign]
    if callgrind:
        # Under valgrind every step takes ~50x longer, so the loop share (a
        # budget of loop *seconds*) would run out and send steps to worker
        # threads, more or fewer with the machine's load: the instructions
        # would depend on the load. Measurement only: every step inline.
        server._gate.loop_share = LoopShare(share=1.0, burst=float("inf"))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.run)
        print(port, flush=True)
        await trio.to_thread.run_sync(sys.stdin.readline)
        nursery.cancel_scope.cancel()


# ----------------------------------------------------------------------------- the client


async def _connects(port: int, mode: str, count: int) -> None:
    from conduit import Client, ClientDescriptor

    fields: dict[str, Any] = {"server_host": HOST, "server_port": port, "password": PASSWORD}
    if mode == "accounts":
        fields["username"] = USERNAME
    reused = Client(ClientDescriptor(**fields)) if mode == "accounts" else None
    for _ in range(count):
        client = reused if reused is not None else Client(ClientDescriptor(**fields))
        await client.connect()
        await client.disconnect()


def _cpu_seconds(pid: int) -> tuple[float, float]:
    """The process's (user, system) CPU seconds so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _callgrind_total(prefix: str, pid: int) -> int:
    subprocess.run(["callgrind_control", "-d", str(pid)], capture_output=True, check=False)
    for _ in range(100):
        dumps = sorted(glob.glob(f"{prefix}.{pid}.*"), key=os.path.getmtime)
        if dumps:
            with open(dumps[-1]) as dump:
                for line in dump:
                    if line.startswith(("totals:", "summary:")):
                        return int(line.split()[1])
        time.sleep(0.1)
    raise RuntimeError("callgrind wrote no dump")


def measure(
    mode: str, handshake_only: bool, connects: int, callgrind: str | None
) -> tuple[float, float, float]:
    """Server (user, system) CPU ms per connect and the client's (this
    process's) CPU ms per connect; with ``callgrind``, the server's million
    instructions (callgrind counts user space only), then 0, 0."""
    import trio

    command = [sys.executable, "-m", "benchmarks.handshake_budget", "--serve", mode]
    if handshake_only:
        command.append("--handshake-only")
    env = dict(os.environ)
    if callgrind is not None:
        command.append("--callgrind")
        command = [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={callgrind}.%p",
            "--collect-atstart=yes",
            *command,
        ]
        env["PYTHONMALLOC"] = "malloc"  # count the allocator's instructions as they are
    server = subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL if callgrind is not None else None,
        text=True,
        env=env,
    )
    try:
        assert server.stdout is not None and server.stdin is not None
        port = int(server.stdout.readline())
        trio.run(_connects, port, mode, 5)  # warm-up: stretches, first-use imports
        time.sleep(0.3)
        if callgrind is not None:
            subprocess.run(["callgrind_control", "-z", str(server.pid)], capture_output=True)
        before = _cpu_seconds(server.pid)
        client_before = time.process_time()
        trio.run(_connects, port, mode, connects)
        client = (time.process_time() - client_before) / connects * 1e3
        time.sleep(0.2)
        if callgrind is not None:
            return _callgrind_total(callgrind, server.pid) / connects / 1e6, 0.0, 0.0
        after = _cpu_seconds(server.pid)
        user, kernel = ((a - b) / connects * 1e3 for a, b in zip(after, before, strict=True))
        return user, kernel, client
    finally:
        if server.stdin is not None:
            server.stdin.write("\n")
            server.stdin.flush()
        server.wait(timeout=120)


# ----------------------------------------------------------------------------- sans-IO steps


def _thread_us(step: Callable[[], object], loops: int) -> float:
    step()
    started = time.thread_time_ns()
    for _ in range(loops):
        step()
    return (time.thread_time_ns() - started) / loops / 1e3


def sans_io_steps(mode: str, loops: int) -> list[tuple[str, float]]:
    """Thread-CPU µs of the server's handshake steps, without any I/O."""
    from conduit.accounts import Accounts
    from conduit.protocol import ClientHandshake, Frame, FrameReader, ServerHandshake, pake
    from conduit.protocol.handshake import ProverCache, hello_username

    def frames(data: bytes) -> list[Frame]:
        reader = FrameReader()
        reader.feed(data)
        out = []
        while (frame := reader.next_frame()) is not None:
            out.append(frame)
        return out

    limits = {"max_frame_size": 1 << 20, "receive_window": 4 << 20}
    lookup = None
    if mode == "accounts":
        # Removed when the steps are timed (a TemporaryDirectory's finalizer).
        scratch = tempfile.TemporaryDirectory(prefix="conduit-budget-")
        accounts = Accounts(Path(scratch.name) / "accounts.json")
        accounts.add(USERNAME, PASSWORD)
        lookup = accounts.lookup
    cache = ProverCache()

    def machines() -> tuple[ClientHandshake, ServerHandshake, Frame]:
        client = ClientHandshake(
            PASSWORD, name="c", username=USERNAME if lookup else None, cache=cache, **limits
        )
        server = ServerHandshake(None if lookup else PASSWORD, name="s", accounts=lookup, **limits)
        (hello,) = frames(client.start())
        return client, server, hello

    def timed(calls: list[Callable[[], object]]) -> float:
        # The prepared machines are many objects: keep a collection of them
        # out of the timed loop.
        gc.collect()
        gc.disable()
        try:
            started = time.thread_time_ns()
            for call in calls:
                call()
            return (time.thread_time_ns() - started) / len(calls) / 1e3
        finally:
            gc.enable()

    # Each receive needs a machine in the right state: prepared outside the
    # timed loops. The first exchange pays the client's stretch.
    prepared = [machines() for _ in range(loops + 1)]
    first_client, first_server, first_hello = prepared.pop()
    first_client.receive(frames(first_server.receive(first_hello))[0])
    replies = [b""] * len(prepared)

    def hello_call(index: int) -> Callable[[], object]:
        def call() -> None:
            replies[index] = prepared[index][1].receive(prepared[index][2])

        return call

    hello_us = timed([hello_call(i) for i in range(len(prepared))])
    precompute_us = timed([server.precompute for _, server, _ in prepared])
    confirms = [
        (server, frames(client.receive(frames(reply)[0]))[0])
        for (client, server, _), reply in zip(prepared, replies, strict=True)
    ]
    confirm_us = timed([lambda s=server, f=frame: s.receive(f) for server, frame in confirms])
    scalar = pake.random_scalar()
    point = pake.base_mul(scalar)
    steps = [
        (
            "read the hello's username (before the throttle)",
            _thread_us(lambda: hello_username(first_hello), loops),
        ),
        ("receive(CLIENT_HELLO): decode, lookup, share, SERVER_HELLO", hello_us),
        (
            "precompute(), after the SERVER_HELLO is sent: K and keys (shared), V (accounts)",
            precompute_us,
        ),
        (
            "receive(CLIENT_CONFIRM): decode, (Z and keys, accounts), MAC check, SERVER_CONFIRM",
            confirm_us,
        ),
        (
            "  of which: one variable-base multiplication (incl. libsodium's subgroup check)",
            _thread_us(lambda: pake.point_mul(scalar, point), loops),
        ),
        (
            "  of which: one base-point multiplication",
            _thread_us(lambda: pake.base_mul(scalar), loops),
        ),
        (
            "  for reference: a full share check (is_valid_point), no longer done",
            _thread_us(lambda: pake.check_share(point), loops),
        ),
    ]
    return steps


# ----------------------------------------------------------------------------- main


def main() -> None:
    """Entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("shared", "accounts"), default="shared")
    parser.add_argument("--connects", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--loops", type=int, default=300, help="sans-IO loops")
    parser.add_argument("--callgrind", action="store_true", help="instructions, not CPU time")
    parser.add_argument("--serve", choices=("shared", "accounts"), help=argparse.SUPPRESS)
    parser.add_argument("--handshake-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        import trio

        trio.run(_serve, args.serve, args.handshake_only, args.callgrind)
        return
    prefix = None
    if args.callgrind:
        # The profiles are read as each run ends; the directory goes at exit.
        profiles = tempfile.TemporaryDirectory(prefix="conduit-budget-cg-")
        prefix = os.path.join(profiles.name, "callgrind.out")
    unit = "M instructions" if args.callgrind else "ms CPU"
    results: dict[str, list[float]] = {"full": [], "handshake only": []}
    system: dict[str, list[float]] = {"full": [], "handshake only": []}
    client: list[float] = []
    print(f"load average at start: {os.getloadavg()}")
    for _ in range(args.repeat):
        for name, only in (("full", False), ("handshake only", True)):
            user, kernel, client_ms = measure(args.mode, only, args.connects, prefix)
            results[name].append(user + kernel)
            system[name].append(kernel)
            if not only:
                client.append(client_ms)
    print(f"server, per connect ({args.mode}, {args.connects} connects x {args.repeat}): {unit}")
    for name, values in results.items():
        split = ""
        if not args.callgrind:
            kernel = statistics.median(system[name])
            split = f"  (system {kernel:.3f}, user {statistics.median(values) - kernel:.3f})"
        print(
            f"  {name:15s} median {statistics.median(values):.3f}  min {min(values):.3f}  "
            f"all {[round(v, 3) for v in values]}{split}"
        )
    session = [f - h for f, h in zip(results["full"], results["handshake only"], strict=True)]
    print(f"  {'session start+end':15s} median {statistics.median(session):.3f}")
    if not args.callgrind:
        print(
            f"client (this process, full runs), CPU ms per connect: median "
            f"{statistics.median(client):.3f}  min {min(client):.3f}"
        )
    print(f"load average at end: {os.getloadavg()}")
    print(f"server handshake steps, sans-IO ({args.mode}), thread CPU us:")
    for label, micros in sans_io_steps(args.mode, args.loops):
        print(f"  {micros:8.1f}  {label}")


if __name__ == "__main__":
    main()
