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

``--reference`` adds the floor: a bare-Trio server and client (no conduit
connection, no codec, no state machines) that exchange the same messages over
loopback, with the same sizes, reads and writes, and do the same cryptography
inline (the same :mod:`conduit.protocol.pake` calls and key schedule, the
WELCOME sealed and the GOODBYE opened with AES-256-GCM): accept (one task per
connection, ``trio.serve_listeners``), read the hello, send the reply, the
multiplication, read the confirmation, send the confirmation and the WELCOME,
read the GOODBYE, close. Its CPU per connect, server and client, is what this
machine needs for the handshake's work with Trio and nothing of ours: what
conduit's figures are to be compared with.
"""

from __future__ import annotations

import argparse
import functools
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
from typing import Any, TypedDict

PASSWORD = "handshake-budget-password"
USERNAME = "bench"
HOST = "127.0.0.1"


class _Limits(TypedDict):
    """The frame and window limits both handshake machines are built with."""

    max_frame_size: int
    receive_window: int


#: The limits of the machines run in-process (the descriptors' defaults).
LIMITS: _Limits = {"max_frame_size": 1 << 20, "receive_window": 4 << 20}


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
        async def no_session(
            stream: object, arrival: object, established: object, client_id: str, held: object
        ) -> None:
            return None

        server._serve_client = no_session  # type: ignore[method-assign]
    if callgrind:
        # Under valgrind every step takes ~50x longer, so a connect can come
        # while the last one's confirmation is still being checked (two in
        # the gate: the loop share applies), and the share (a budget of loop
        # *seconds*) would run out and send steps to worker threads, more or
        # fewer with the machine's load: the instructions would depend on the
        # load. Measurement only: every step inline.
        server._gate.loop_share = LoopShare(share=1.0, burst=float("inf"))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.run)
        print(port, flush=True)
        await trio.to_thread.run_sync(sys.stdin.readline)
        nursery.cancel_scope.cancel()


# ----------------------------------------------------------------------------- the floor

#: The sealed WELCOME and GOODBYE records' sizes as conduit sends them (strace
#: of one shared-mode connect: 225 bytes = the 61-byte SERVER_CONFIRM and a
#: 164-byte WELCOME record; the GOODBYE record 62 bytes). The handshake
#: messages' sizes are taken from the sans-IO machines (:func:`_message_sizes`).
_WELCOME_RECORD = 164
_GOODBYE_RECORD = 62
_AEAD_TAG = 16


def _frames(data: bytes) -> list[Any]:
    from conduit.protocol import FrameReader

    reader = FrameReader()
    reader.feed(data)
    out = []
    while (frame := reader.next_frame()) is not None:
        out.append(frame)
    return out


def _message_sizes(mode: str) -> tuple[int, int, int, int]:
    """Bytes of CLIENT_HELLO, SERVER_HELLO, CLIENT_CONFIRM, SERVER_CONFIRM in ``mode``."""
    from conduit.accounts import Accounts
    from conduit.protocol import ClientHandshake, ServerHandshake

    with tempfile.TemporaryDirectory(prefix="conduit-budget-") as scratch:
        lookup = None
        if mode == "accounts":
            accounts = Accounts(Path(scratch) / "accounts.json")
            accounts.add(USERNAME, PASSWORD)
            lookup = accounts.lookup
        username = USERNAME if lookup else None
        client = ClientHandshake(PASSWORD, name="conduit-client", username=username, **LIMITS)
        server = ServerHandshake(
            None if lookup else PASSWORD, name="conduit-server", accounts=lookup, **LIMITS
        )
        hello = client.start()
        server_hello = server.receive(_frames(hello)[0])
        confirm = client.receive(_frames(server_hello)[0])
        server_confirm = server.receive(_frames(confirm)[0])
        return len(hello), len(server_hello), len(confirm), len(server_confirm)


class _Secrets:
    """The reference's long-term secrets, derived once per process (as conduit's are)."""

    def __init__(self, mode: str) -> None:
        from conduit.protocol import pake
        from conduit.protocol.handshake import SERVER_IDENTITY, shared_secret

        self.mode = mode
        self.sizes = _message_sizes(mode)
        self.balanced = shared_secret(PASSWORD)
        salt = bytes(pake.SALT_SIZE)
        self.prover = pake.prover_secret(
            PASSWORD, salt, pake.DEFAULT_STRETCH, USERNAME.encode(), SERVER_IDENTITY
        )
        self.verifier = pake.register(self.prover)


def _padded(data: bytes, size: int) -> bytes:
    return data + bytes(max(0, size - len(data)))


async def _receive_exactly(stream: Any, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise EOFError("the peer closed early")
        data += chunk
    return data


def _sealed(key: bytes, size: int) -> bytes:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key).encrypt(bytes(12), bytes(size - _AEAD_TAG), None)


def _opened(key: bytes, record: bytes) -> bytes:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key).decrypt(bytes(12), record, None)


async def _reference_connection(secrets: _Secrets, stream: Any) -> None:
    """The server's side of one reference connect (see the module docstring)."""
    import hmac

    from conduit.protocol import pake
    from conduit.protocol.handshake import _account_keys, _balanced_keys

    hello_size, server_hello_size, confirm_size, server_confirm_size = secrets.sizes
    async with stream:
        hello = await _receive_exactly(stream, hello_size)
        if secrets.mode == "shared":
            y, share_b = pake.spake2_share(secrets.balanced, role_a=False)
            server_hello = _padded(share_b, server_hello_size)
            await stream.send_all(server_hello)
            k = pake.spake2_shared_point(secrets.balanced, False, y, hello[:32])
            keys, (c2s, s2c) = _balanced_keys(
                secrets.balanced, hello[:32], share_b, k, hello, server_hello
            )
            confirm = await _receive_exactly(stream, confirm_size)
            ok, mine = hmac.compare_digest(confirm[:32], keys.confirm_a), keys.confirm_b
        else:
            verifier = secrets.verifier
            y, share_v = pake.spake2plus_verifier_share(verifier)
            server_hello = _padded(share_v, server_hello_size)
            await stream.send_all(server_hello)
            hy = pake.cofactor_times(y)
            v = pake.spake2plus_verifier_v(verifier, hy)
            confirm = await _receive_exactly(stream, confirm_size)
            share_p = confirm[32:64]
            z = pake.spake2plus_verifier_z(verifier, hy, share_p)
            keys2, (c2s, s2c) = _account_keys(
                USERNAME, verifier.w0, share_p, share_v, z, v, hello, server_hello
            )
            ok, mine = hmac.compare_digest(confirm[:32], keys2.confirm_p), keys2.confirm_v
        if not ok:
            raise AssertionError("the reference's confirmation differs")
        await stream.send_all(_padded(mine, server_confirm_size) + _sealed(s2c, _WELCOME_RECORD))
        _opened(c2s, await _receive_exactly(stream, _GOODBYE_RECORD))


async def _serve_reference(mode: str) -> None:
    import trio

    secrets = _Secrets(mode)
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host=HOST)
        port = listeners[0].socket.getsockname()[1]

        async def handler(stream: Any) -> None:
            await _reference_connection(secrets, stream)

        nursery.start_soon(trio.serve_listeners, handler, listeners)
        print(port, flush=True)
        await trio.to_thread.run_sync(sys.stdin.readline)
        nursery.cancel_scope.cancel()


async def _reference_connects(port: int, secrets: _Secrets, count: int) -> None:
    """The client's side of ``count`` reference connects."""
    import hmac
    import socket

    import trio

    from conduit.protocol import pake
    from conduit.protocol.handshake import _account_keys, _balanced_keys

    mode = secrets.mode
    hello_size, server_hello_size, confirm_size, server_confirm_size = secrets.sizes
    for _ in range(count):
        # As conduit's client dials an IP address: one socket, one connect.
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        await sock.connect((HOST, port))
        async with trio.SocketStream(sock) as stream:
            if mode == "shared":
                x, share_a = pake.spake2_share(secrets.balanced, role_a=True)
                hello = _padded(share_a, hello_size)
                await stream.send_all(hello)
                server_hello = await _receive_exactly(stream, server_hello_size)
                share_b = server_hello[:32]
                k = pake.spake2_shared_point(secrets.balanced, True, x, share_b)
                keys, (c2s, s2c) = _balanced_keys(
                    secrets.balanced, share_a, share_b, k, hello, server_hello
                )
                mine, theirs = keys.confirm_a, keys.confirm_b
            else:
                hello = _padded(b"", hello_size)
                await stream.send_all(hello)
                fresh = pake.ephemeral()  # while the server works, as conduit's client
                server_hello = await _receive_exactly(stream, server_hello_size)
                share_v = server_hello[:32]
                x, share_p = pake.spake2plus_prover_share(secrets.prover, fresh)
                z, v = pake.spake2plus_prover_points(secrets.prover, x, share_v)
                keys2, (c2s, s2c) = _account_keys(
                    USERNAME, secrets.prover.w0, share_p, share_v, z, v, hello, server_hello
                )
                mine, theirs = keys2.confirm_p + share_p, keys2.confirm_v
            await stream.send_all(_padded(mine, confirm_size))
            answer = await _receive_exactly(stream, server_confirm_size + _WELCOME_RECORD)
            if not hmac.compare_digest(answer[:32], theirs):
                raise AssertionError("the reference's confirmation differs")
            _opened(s2c, answer[server_confirm_size:])
            await stream.send_all(_sealed(c2s, _GOODBYE_RECORD))


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
    mode: str,
    handshake_only: bool,
    connects: int,
    callgrind: str | None,
    reference: _Secrets | None = None,
) -> tuple[float, float, float]:
    """Server (user, system) CPU ms per connect and the client's (this
    process's) CPU ms per connect; with ``callgrind``, the server's million
    instructions (callgrind counts user space only), then 0, 0. With
    ``reference`` (its secrets), the bare-Trio floor instead of conduit."""
    import trio

    command = [sys.executable, "-m", "benchmarks.handshake_budget", "--serve", mode]
    if handshake_only:
        command.append("--handshake-only")
    if reference is not None:
        command.append("--reference")
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

        def run(count: int) -> None:
            if reference is None:
                trio.run(_connects, port, mode, count)
            else:
                trio.run(_reference_connects, port, reference, count)

        run(5)  # warm-up: stretches, first-use imports
        time.sleep(0.3)
        if callgrind is not None:
            subprocess.run(["callgrind_control", "-z", str(server.pid)], capture_output=True)
        before = _cpu_seconds(server.pid)
        client_before = time.process_time()
        run(connects)
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
    from conduit.protocol import ClientHandshake, Frame, ServerHandshake, pake
    from conduit.protocol.handshake import ProverCache, hello_username

    frames = _frames

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
            PASSWORD, name="c", username=USERNAME if lookup else None, cache=cache, **LIMITS
        )
        server = ServerHandshake(None if lookup else PASSWORD, name="s", accounts=lookup, **LIMITS)
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
    confirm_us = timed([functools.partial(server.receive, frame) for server, frame in confirms])
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
    parser.add_argument(
        "--reference",
        action="store_true",
        help="also measure the bare-Trio floor (same messages and cryptography, no conduit)",
    )
    args = parser.parse_args()
    if args.serve:
        import trio

        if args.reference:
            trio.run(_serve_reference, args.serve)
        else:
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
    floor: list[tuple[float, float, float]] = []
    secrets = _Secrets(args.mode) if args.reference else None
    print(f"load average at start: {os.getloadavg()}")
    for _ in range(args.repeat):
        for name, only in (("full", False), ("handshake only", True)):
            user, kernel, client_ms = measure(args.mode, only, args.connects, prefix)
            results[name].append(user + kernel)
            system[name].append(kernel)
            if not only:
                client.append(client_ms)
        if secrets is not None:
            floor.append(measure(args.mode, False, args.connects, prefix, secrets))
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
    if floor:
        totals = [user + kernel for user, kernel, _ in floor]
        print(
            f"  {'bare-Trio floor':15s} median {statistics.median(totals):.3f}  "
            f"min {min(totals):.3f}  all {[round(v, 3) for v in totals]}"
        )
    if not args.callgrind:
        print(
            f"client (this process, full runs), CPU ms per connect: median "
            f"{statistics.median(client):.3f}  min {min(client):.3f}"
        )
        if floor:
            ours = [c for _, _, c in floor]
            print(
                f"client, bare-Trio floor, CPU ms per connect: median "
                f"{statistics.median(ours):.3f}  min {min(ours):.3f}"
            )
    print(f"load average at end: {os.getloadavg()}")
    print(f"server handshake steps, sans-IO ({args.mode}), thread CPU us:")
    for label, micros in sans_io_steps(args.mode, args.loops):
        print(f"  {micros:8.1f}  {label}")


if __name__ == "__main__":
    main()
