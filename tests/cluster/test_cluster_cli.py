"""``conduit serve DIR --cluster URL --node-name NAME``: joins, says so, leaves on Ctrl-C.

And ``conduit serve s3://BUCKET/PREFIX --cluster URL``: stores in the bucket.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis

PASSWORD = "cluster-cli-password"
_TIMEOUT = 60.0


def _env(**extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(sys.path),
        "CONDUIT_PASSWORD": PASSWORD,
        **extra,
    }


def _serve(
    tmp_path: Path, *options: str, directory: str | None = None, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp_path / "serve.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "conduit",
                "serve",
                str(tmp_path / "d") if directory is None else directory,
                "--port",
                "0",
                *options,
            ],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            env=_env() if env is None else env,
        )
    return process, log


def _wait_for(log: Path, pattern: str, process: subprocess.Popen[bytes]) -> re.Match[str]:
    deadline = time.monotonic() + _TIMEOUT
    while time.monotonic() < deadline:
        found = re.search(pattern, log.read_text(errors="replace"))
        if found is not None:
            return found
        assert process.poll() is None, log.read_text(errors="replace")
        time.sleep(0.05)
    raise AssertionError(f"{pattern!r} not logged: {log.read_text(errors='replace')}")


def test_serve_joins_and_leaves_the_cluster(engines: Any, tmp_path: Path) -> None:
    name = f"cli-{secrets.token_hex(4)}"
    process, log = _serve(tmp_path, "--cluster", engines.bus.url, "--node-name", name)
    bus = redis.Redis.from_url(engines.bus.url)
    try:
        _wait_for(log, rf"listening on 127\.0\.0\.1:\d+, cluster node {name},", process)
        assert bus.exists(f"conduit:node:{name}")
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=_TIMEOUT) == 0, log.read_text()
        # A clean stop unregisters at once (no waiting for the TTL).
        assert not bus.exists(f"conduit:node:{name}")
        text = log.read_text()
        assert "stopped" in text and "Traceback" not in text, text
    finally:
        process.kill()
        process.wait(timeout=_TIMEOUT)
        bus.close()


def test_serve_refuses_bad_cluster_settings(tmp_path: Path) -> None:
    process, log = _serve(tmp_path, "--cluster", "http://127.0.0.1:1")
    assert process.wait(timeout=_TIMEOUT) == 2
    assert "cluster_url must be a redis://" in log.read_text()


def test_serve_reports_an_unreachable_bus(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process, log = _serve(tmp_path, "--cluster", f"redis://127.0.0.1:{port}/0")
    assert process.wait(timeout=_TIMEOUT) == 4
    text = log.read_text()
    assert "cannot join the cluster" in text and "Traceback" not in text, text


def test_a_bus_password_comes_from_the_environment_never_argv(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"redis://:s3cret@127.0.0.1:{port}/0"
    for run in ("argv", "query", "env"):
        (tmp_path / run).mkdir()
    # In the URL's user part, or in its query (which redis-py reads too).
    for run, given in (("argv", url), ("query", f"redis://127.0.0.1:{port}/0?password=s3cret")):
        process, log = _serve(tmp_path / run, "--cluster", given)
        assert process.wait(timeout=_TIMEOUT) == 2
        text = log.read_text()
        assert "CONDUIT_CLUSTER_URL" in text and "cannot join" not in text, text
    # The same URL from the environment is taken: it gets as far as the bus.
    process, log = _serve(tmp_path / "env", env={**_env(), "CONDUIT_CLUSTER_URL": url})
    assert process.wait(timeout=_TIMEOUT) == 4
    text = log.read_text()
    assert "cannot join the cluster" in text and "s3cret" not in text, text


def test_serve_an_s3_prefix_in_a_cluster(
    engines: Any, s3_url: str, s3_client_factory: Any, tmp_path: Path
) -> None:
    """``conduit serve s3://BUCKET/PREFIX --cluster URL``: uploads land in the bucket."""
    import trio

    from conduit import Client, ClientDescriptor, FileTransferHandler
    from conduit.cluster.s3 import S3Store

    process, log = _serve(
        tmp_path,
        "--cluster",
        engines.bus.url,
        directory=s3_url,
        env=_env(**engines.s3.environment()),
    )
    try:
        found = _wait_for(
            log, r"listening on 127\.0\.0\.1:(\d+), cluster node [^,]+, serving (\S+)", process
        )
        assert found.group(2) == s3_url
        source = tmp_path / "hello.txt"
        source.write_bytes(b"hello from the CLI test" * 1000)

        async def upload() -> dict[str, Any]:
            descriptor = ClientDescriptor(
                server_host="127.0.0.1", server_port=int(found.group(1)), password=PASSWORD
            )
            with trio.fail_after(_TIMEOUT):
                async with Client(descriptor) as client:
                    handler = FileTransferHandler(storage_dir=tmp_path / "client")
                    return await handler.send_to_server(client, source)

        result = trio.run(upload)
        assert result["success"] is True, result
        store = S3Store(s3_url, client=s3_client_factory())

        async def listed() -> list[tuple[str, int]]:
            return [(f.name, f.size) for f in await store.list_files()]

        assert trio.run(listed) == [("hello.txt", source.stat().st_size)]
        store.close()
        assert re.search(r"upload +hello\.txt", log.read_text()), log.read_text()
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=_TIMEOUT) == 0, log.read_text()
    finally:
        process.kill()
        process.wait(timeout=_TIMEOUT)


def test_serve_refuses_a_malformed_s3_url(tmp_path: Path) -> None:
    process, log = _serve(tmp_path, directory="s3://Not_A_Bucket/x")
    assert process.wait(timeout=_TIMEOUT) != 0
    text = log.read_text()
    assert "invalid S3 bucket name" in text and "Traceback" not in text, text
