"""Transfers over a long link, side by side: ``python -m benchmarks.long_link``.

Every other scenario runs on loopback, where a round trip takes a tenth of a
millisecond and no window of bytes in flight is ever too small. This one puts
a proxy between client and server (``peers/delay_proxy.py``: each direction
delayed by half of ``--rtt`` milliseconds, capped at ``--rate`` MB/s, with a
queue of ``--queue`` MiB at that narrowest point, as a router's) and measures,
in one run, alternating, ``--repeat`` times:

* **tcp**: a plain socket copy of ``--size`` MiB through the same proxy, each
  way (the most any protocol gets from this link);
* **conduit** (this tree, and ``--base TREE`` when given): the scenario peers'
  upload and download of ``--size`` MiB (``peers/conduit_transfer.py``, Trio
  client), every copy's SHA-256 checked; then calls (``echo``, 100 bytes,
  every 50 ms) on the same connection while it uploads the file again: their
  latency is what a larger window in flight costs. Each tree runs with its
  descriptors' defaults (here, a window free to grow to 32 MiB), with fixed
  windows (``max_receive_window`` of 4 MiB, the default ``receive_window``,
  on both ends; ``--no-fixed`` leaves that run out), and, with ``--grow``
  MiB, with ``max_receive_window`` of that on both ends;
* **netconduit** 5.0.0: its upload and download of ``--netconduit-size`` MiB
  (it sends one 64 KiB chunk per round trip, so a file of ``--size`` would
  take minutes; 0 leaves it out);
* **directories** (each conduit tree, with this tree's client script): a
  directory of ``--files`` files of ``--file-kib`` KiB sent up whole
  (``send_to_server``) and brought back whole (``receive_from_server``),
  every copy compared with its source; seconds each way (0 files: left out).

Each figure is the median of the repetitions (min-max beside it). The link is
emulated: a real one adds loss, slow start and a kernel's own window limits,
and its queue may be shallower (or deeper). Use it to compare systems and
trees in one run, never as a timing assertion.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from conduit.descriptors import RECEIVE_WINDOW

from ._harness import ServerProcess, foreign_env, format_table, run_client
from ._venvs import netconduit_python
from .ab import CLIENT_TIMEOUT, START_TIMEOUT, Tree
from .scenarios._transfer import RAM_DIR, make_source, verify

MiB = 1024 * 1024
#: The descriptors' default ``receive_window``: as ``max_receive_window``,
#: windows that never grow.
FIXED_WINDOW = RECEIVE_WINDOW
PROXY = Path(__file__).resolve().parent / "peers" / "delay_proxy.py"
#: Calls timed on the idle connection, then every this many seconds during the upload.
IDLE_CALLS = 20
CALL_PAUSE = 0.05


@contextlib.contextmanager
def delayed(target: int, options: argparse.Namespace) -> Iterator[int]:
    """A delay proxy in front of ``target`` (a port on 127.0.0.1); yields its port."""
    argv = [sys.executable, str(PROXY), "--target", str(target), "--rtt-ms", str(options.rtt)]
    argv += ["--rate", str(options.rate), "--queue", str(options.queue * MiB)]
    with ServerProcess(argv, foreign_env(), START_TIMEOUT) as proxy:
        yield proxy.port


def tcp(options: argparse.Namespace) -> dict[str, float]:
    """A plain copy of ``--size`` MiB each way through the proxy: MB/s up and down."""
    size = options.size * MiB
    block = b"\0" * MiB
    listener = socket.create_server(("127.0.0.1", 0))
    figures: dict[str, float] = {}

    def serve() -> None:
        for _ in range(2):
            peer, _ = listener.accept()
            with peer:
                if peer.recv(1) == b"u":  # take the upload, then say so
                    while peer.recv(MiB):
                        pass
                    peer.sendall(b"k")
                else:  # send the download
                    for _ in range(options.size):
                        peer.sendall(block)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    with listener, delayed(listener.getsockname()[1], options) as port:
        for way in ("up", "down"):
            with socket.create_connection(("127.0.0.1", port)) as link:
                started = time.perf_counter()
                if way == "up":
                    link.sendall(b"u")
                    for _ in range(options.size):
                        link.sendall(block)
                    link.shutdown(socket.SHUT_WR)
                    if link.recv(1) != b"k":
                        raise RuntimeError("tcp: the upload was not taken whole")
                else:
                    link.sendall(b"d")
                    got = 0
                    while data := link.recv(MiB):
                        got += len(data)
                    if got != size:
                        raise RuntimeError(f"tcp: {got} of {size} bytes came down")
                figures[way] = size / 1e6 / (time.perf_counter() - started)
    server.join(timeout=10)
    return figures


def _transfers(
    python: str, peer: str, env: dict[str, str], source: Path, expected: str, scratch: Path,
    options: argparse.Namespace, *, calls: bool, settings: dict[str, int] | None = None,
) -> dict[str, float]:  # fmt: skip
    """Upload then download ``source`` through the proxy (and the calls during a
    second upload when ``calls``), both ends' descriptors given ``settings``;
    MB/s each way, call latencies in ms."""
    settings = settings or {}
    storage, down = scratch / "store", scratch / "down"
    for directory in (storage, down):
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir()
    server_spec = json.dumps({"storage": str(storage), **settings})
    figures: dict[str, float] = {}
    serve = [python, peer, "server", "--spec", server_spec]
    with (
        ServerProcess(serve, env, START_TIMEOUT) as server,
        delayed(server.port, options) as port,
    ):
        ops = [
            {"op": "upload", "path": str(source), "name": source.name},
            {"op": "download", "name": source.name, "dir": str(down)},
        ]
        spec = json.dumps({"kind": "transfer", "ops": ops, "server_pid": server.pid, **settings})
        argv = [python, peer, "client", "--port", str(port), "--spec", spec]
        up, download = run_client(argv, env, CLIENT_TIMEOUT)["ops"]
        verify(storage / source.name, expected, "uploaded copy")
        verify(down / source.name, expected, "downloaded copy")
        figures["up"], figures["down"] = up["mb_per_s"], download["mb_per_s"]
        if calls:
            spec = json.dumps({
                "kind": "hol", "path": str(source), "name": "again.bin",
                "idle_calls": IDLE_CALLS, "warmup": 5, "pause_s": CALL_PAUSE, **settings,
            })  # fmt: skip
            argv = [python, peer, "client", "--port", str(port), "--spec", spec]
            hol = run_client(argv, env, CLIENT_TIMEOUT)["hol"]
            verify(storage / "again.bin", expected, "second upload")
            figures["idle_p50"] = hol["idle"]["p50_us"] / 1e3
            for key in ("p50", "p90", "max"):
                figures[f"busy_{key}"] = hol["during_upload"][f"{key}_us"] / 1e3
    return figures


def make_tree(top: Path, files: int, kib: int) -> dict[str, bytes]:
    """``files`` files of ``kib`` KiB of random bytes under ``top`` (a tenth in a
    subdirectory); relative name to bytes."""
    written = {}
    for index in range(files):
        name = f"sub/f{index:04d}.bin" if index % 10 == 9 else f"f{index:04d}.bin"
        data = random.randbytes(kib * 1024)
        (top / name).parent.mkdir(parents=True, exist_ok=True)
        (top / name).write_bytes(data)
        written[name] = data
    return written


def _same_tree(top: Path, expected: dict[str, bytes], what: str) -> None:
    found = {
        path.relative_to(top).as_posix(): path.read_bytes()
        for path in top.rglob("*")
        if path.is_file()
    }
    if found != expected:
        raise RuntimeError(f"{what}: the directory does not hold what was sent: void")


def directories(
    peer: str, env: dict[str, str], source: Path, expected: dict[str, bytes], scratch: Path,
    options: argparse.Namespace,
) -> dict[str, float]:  # fmt: skip
    """Send the directory ``source`` up and bring it back through the proxy; seconds each way."""
    storage, down = scratch / "store", scratch / "down"
    for directory in (storage, down):
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir()
    serve = [sys.executable, peer, "server", "--spec", json.dumps({"storage": str(storage)})]
    with (
        ServerProcess(serve, env, START_TIMEOUT) as server,
        delayed(server.port, options) as port,
    ):
        ops = [
            {"op": "upload", "path": str(source), "name": "tree"},
            {"op": "download", "name": "tree", "dir": str(down)},
        ]
        spec = json.dumps({"kind": "transfer", "ops": ops, "server_pid": server.pid})
        argv = [sys.executable, peer, "client", "--port", str(port), "--spec", spec]
        up, download = run_client(argv, env, CLIENT_TIMEOUT)["ops"]
    _same_tree(storage / "tree", expected, "uploaded directory")
    _same_tree(down / "tree", expected, "downloaded directory")
    return {"dir_up": up["wall_s"], "dir_down": download["wall_s"]}


def measure(options: argparse.Namespace, scratch: Path) -> dict[str, list[dict[str, float]]]:
    """Every system, ``--repeat`` times, alternating; figures per system and repetition."""
    source = scratch / f"link-{options.size}MiB.bin"
    expected = make_source(source, options.size * MiB)
    trees = [Tree.checked("conduit", options.tree)]
    if options.base:
        trees.append(Tree.checked("base", options.base))
    netconduit = None
    if options.netconduit_size:
        small = scratch / f"link-{options.netconduit_size}MiB.bin"
        digest = make_source(small, options.netconduit_size * MiB)
        netconduit = (str(netconduit_python()), small, digest)
    tree_source = scratch / "tree-source"
    tree_files = make_tree(tree_source, options.files, options.file_kib)
    found: dict[str, list[dict[str, float]]] = {}
    for repetition in range(options.repeat):
        print(f"repetition {repetition + 1}/{options.repeat}", file=sys.stderr)
        found.setdefault("tcp", []).append(tcp(options))
        runs: list[tuple[Tree, dict[str, int]]] = []
        for tree in trees:
            runs.append((tree, {}))
            if options.fixed:
                runs.append((tree, {"max_receive_window": FIXED_WINDOW}))
            if options.grow:
                runs.append((tree, {"max_receive_window": options.grow * MiB}))
        for tree, settings in runs if repetition % 2 == 0 else runs[::-1]:
            work = scratch / tree.label
            work.mkdir(exist_ok=True)
            figures = _transfers(
                sys.executable, tree.peer("conduit_transfer.py"), tree.env(), source, expected,
                work, options, calls=True, settings=settings,
            )  # fmt: skip
            if options.files and not settings:
                # This tree's client script for every tree: the same work asked of each.
                client = trees[0].peer("conduit_transfer.py")
                figures |= directories(client, tree.env(), tree_source, tree_files, work, options)
            name = f"{tree.label} ({tree.path.name}){_window_label(settings)}"
            found.setdefault(name, []).append(figures)
        if netconduit is not None:
            python, small, digest = netconduit
            work = scratch / "netconduit"
            work.mkdir(exist_ok=True)
            peer = trees[0].peer("netconduit_transfer.py")
            figures = _transfers(
                python, peer, foreign_env(), small, digest, work, options, calls=False
            )
            found.setdefault(f"netconduit ({options.netconduit_size} MiB)", []).append(figures)
    return found


def _window_label(settings: dict[str, int]) -> str:
    """How a run's windows were set, for its row's name."""
    if "max_receive_window" not in settings:
        return ""
    limit = settings["max_receive_window"]
    return ", fixed window" if limit == FIXED_WINDOW else f", growing to {limit // MiB} MiB"


def render(found: dict[str, list[dict[str, float]]]) -> str:
    """One row per system: each figure's median (min-max)."""
    columns = [
        ("up", "upload MB/s"), ("down", "download MB/s"), ("idle_p50", "call p50 ms, idle"),
        ("busy_p50", "p50 during upload"), ("busy_p90", "p90"), ("busy_max", "max"),
        ("dir_up", "directory up s"), ("dir_down", "directory down s"),
    ]  # fmt: skip
    digits = {"dir_up": 2, "dir_down": 2}  # seconds: a tenth is most of a figure
    rows = []
    for system, runs in found.items():
        row = [system]
        for key, _title in columns:
            values = [run[key] for run in runs if key in run]
            if not values:
                row.append("")
                continue
            middle, places = statistics.median(values), digits.get(key, 1)
            row.append(f"{middle:.{places}f} ({min(values):.{places}f}-{max(values):.{places}f})")
        rows.append(row)
    return format_table(["system", *(title for _key, title in columns)], rows)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.long_link", description=__doc__)
    parser.add_argument("--tree", default=str(Path(__file__).resolve().parent.parent))
    parser.add_argument("--base", help="another tree to measure beside this one")
    parser.add_argument("--rtt", type=float, default=80.0, help="round trip, ms (default 80)")
    parser.add_argument("--rate", type=float, default=100.0, help="MB/s each way (default 100)")
    parser.add_argument("--queue", type=int, default=32, help="MiB queued each way (default 32)")
    parser.add_argument("--size", type=int, default=256, help="MiB per transfer (default 256)")
    parser.add_argument("--netconduit-size", type=int, default=8, help="MiB; 0: leave it out")
    parser.add_argument(
        "--grow", type=int, default=0, help="a run with max_receive_window of this, MiB (0: none)"
    )
    parser.add_argument(
        "--fixed",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a run with fixed windows (max_receive_window 4 MiB; default: yes)",
    )
    parser.add_argument("--files", type=int, default=200, help="files in the directory runs")
    parser.add_argument("--file-kib", type=int, default=4, help="KiB per file (default 4)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="64 MiB, 2 MiB, once")
    options = parser.parse_args(argv)
    if options.quick:
        options.size, options.netconduit_size, options.repeat = 64, 2, 1
    if options.size < 1 or options.repeat < 1 or options.rtt < 0 or options.rate < 0:
        parser.error("--size and --repeat must be at least 1, --rtt and --rate at least 0")
    if options.grow and options.grow * MiB <= FIXED_WINDOW:
        parser.error(f"--grow must be more than {FIXED_WINDOW // MiB}, the window it opens with")
    if options.files < 0 or options.file_kib < 1:
        parser.error("--files must be at least 0 and --file-kib at least 1")
    return options


def main(argv: Sequence[str] | None = None) -> int:
    """Run and print the table."""
    options = parse_args(argv)
    base = str(RAM_DIR) if RAM_DIR.is_dir() else None
    scratch = Path(tempfile.mkdtemp(prefix="conduit-long-link-", dir=base))
    try:
        print(
            f"round trip {options.rtt:g} ms, {options.rate:g} MB/s each way, "
            f"{options.queue} MiB queue; {options.size} MiB per transfer",
            file=sys.stderr,
        )
        print(render(measure(options, scratch)))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
