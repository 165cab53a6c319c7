"""The ``smallfiles`` scenario paces its clients slice by slice on one connection each.

Real processes: the raw reference's server and client (standard library plus
``cryptography``, no handshake to wait for), real files on disk, SHA-256
checked. Nothing here asserts a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from benchmarks._harness import PEERS_DIR, ServerProcess
from benchmarks.scenarios.smallfiles import _make_files, _PacedClient

TIMEOUT = 60.0


def _peer(role: str, *args: str) -> list[str]:
    return [sys.executable, str(PEERS_DIR / "raw_reference.py"), role, *args]


def test_slices_split_the_files_and_name_them_uniquely(tmp_path: Path) -> None:
    parts, digests = _make_files(tmp_path / "source", 10, 4)
    assert [len(part["names"]) for part in parts] == [3, 3, 2, 2]
    names = [name for part in parts for name in part["names"]]
    assert sorted(names) == sorted(digests) and len(set(names)) == 10
    for part in parts:
        for name in part["names"]:
            data = (Path(part["dir"]) / name).read_bytes()
            assert hashlib.sha256(data).hexdigest() == digests[name]


def test_a_paced_client_uploads_one_slice_per_step_on_one_connection(tmp_path: Path) -> None:
    parts, digests = _make_files(tmp_path / "source", 9, 3)
    storage = tmp_path / "storage"
    storage.mkdir()
    server_spec = json.dumps({"storage": str(storage)})
    with ServerProcess(_peer("server", "--spec", server_spec), dict(os.environ), TIMEOUT) as server:
        spec = {"kind": "smallfiles", "slices": parts, "server_pid": server.pid, "aead": True}
        argv = _peer("client", "--port", str(server.port), "--spec", json.dumps(spec))
        paced = _PacedClient(argv, dict(os.environ), TIMEOUT)
        try:
            paced._start()  # connected, nothing uploaded before the first GO
            assert sorted(os.listdir(storage)) == []
            expected: list[str] = []
            for index, part in enumerate(parts):
                paced.step(index)
                expected += part["names"]
                # Exactly the slices asked for so far, no more.
                assert sorted(os.listdir(storage)) == sorted(expected)
            result = paced.finish()["smallfiles"]
        finally:
            paced.stop()
    assert result["files"] == 9
    assert result["slices"] == 3
    assert len(result["slice_wall_s"]) == 3
    assert result["wall_s"] == sum(result["slice_wall_s"])
    assert result["files_per_s"] == 9 / result["wall_s"]
    for name, digest in digests.items():
        assert hashlib.sha256((storage / name).read_bytes()).hexdigest() == digest
