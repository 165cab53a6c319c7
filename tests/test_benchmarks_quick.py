"""The benchmark suite runs end to end in ``--quick`` mode and writes a complete record.

This runs the real thing, every scenario (rpc, bulk, memory, hol, smallfiles,
sftp, cluster): separate server and client processes for every contender, netconduit
5.0.0 in its private virtualenv (created by pip on first use under
``benchmarks/.venvs/``, like asyncssh and matplotlib when this interpreter lacks
them), conduit natively and through the asyncio shim, real files on /dev/shm
whose SHA-256 the suite checks after every transfer. It checks the shape of the
JSON record, that every contender ran, and the charts: timings depend on the
machine, so nothing here asserts a number.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from benchmarks.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
CONTENDERS = {"bare-trio", "conduit-trio", "conduit-asyncio", "netconduit"}
#: Measured in the handshake group only: accounts mode (SPAKE2+), one reconnecting Client.
HANDSHAKE_ONLY = {"conduit-accounts"}
WORKLOADS = {"seq", "c16", "c64"}
WORKLOAD_KEYS = {
    "calls",
    "wall_s",
    "calls_per_s",
    "cpu_us_per_call",
    "p50_us",
    "p90_us",
    "p99_us",
    "max_us",
}
ROW_KEYS = {"group", "metric", "unit", "better", "contender", "median", "min", "max", "n"}
SCENARIOS = {"rpc", "bulk", "memory", "hol", "smallfiles", "sftp", "cluster", "auth_abuse"}
TRANSFER_CONTENDERS = {
    "bulk": {
        "raw-aead",
        "raw-aead-64k",
        "raw-plain",
        "conduit-trio",
        "conduit-asyncio",
        "netconduit",
    },
    "memory": {"conduit-trio", "raw-aead", "netconduit"},
    "hol": {"conduit-trio", "netconduit"},
    "smallfiles": {"raw-aead", "conduit-trio", "conduit-trio x8", "conduit-trio dir", "netconduit"},
    "sftp": {"conduit-trio", "sftp"},
    "cluster": {"same-node", "cross-node", "local store", "S3 store"},
}
#: Two repetitions are enough to check the record's shape (medians, min/max, paired
#: ratios) at under half the time of the default five; the default itself is checked
#: on the parser.
REPEAT = 2
OP_KEYS = {"bytes", "wall_s", "mb_per_s", "client_cpu_s", "client_cpu_s_per_gib"}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


def _inside(path: str, directory: Path) -> bool:
    return Path(path).resolve().is_relative_to(directory.resolve())


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    """Run ``python -m benchmarks --quick`` once; return the JSON record and stdout."""
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--quick",
            "--repeat",
            str(REPEAT),
            "--json-out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return json.loads(out.read_text()), completed.stdout


@pytest.mark.slow
def test_record_header_and_machine(quick_run: tuple[dict[str, Any], str]) -> None:
    record, _ = quick_run
    assert record["schema_version"] == 1
    assert record["mode"] == "quick"
    assert record["repeat"] == REPEAT
    assert build_parser().parse_args([]).repeat >= 5
    assert record["created_utc"].endswith("Z")
    assert "--quick" in record["command"]
    assert _is_number(record["duration_s"])
    machine = record["machine"]
    assert machine["cpu_model"]
    assert machine["logical_cores"] >= 1
    assert machine["python"].startswith("3.")
    for library in ("conduit", "trio", "cryptography"):
        assert machine["versions"][library]
    assert set(record["scenarios"]) == SCENARIOS


@pytest.mark.slow
def test_every_contender_measured_from_the_right_library(
    quick_run: tuple[dict[str, Any], str],
) -> None:
    record, _ = quick_run
    rpc = record["scenarios"]["rpc"]
    repeat = record["repeat"]
    counts = rpc["config"]["counts_per_repetition"]
    assert set(rpc["contenders"]) == CONTENDERS | HANDSHAKE_ONLY
    for name, info in rpc["contenders"].items():
        assert info["status"] == "ok", (name, info.get("reason"))
        assert len(info["repetitions"]) == repeat
        for repetition in info["repetitions"]:
            if name in HANDSHAKE_ONLY:
                assert repetition["workloads"] == {}
                assert repetition["handshake"]["connects"] == counts["handshakes"]
                assert _is_number(repetition["handshake"]["p50_ms"])
                continue
            assert set(repetition["workloads"]) >= WORKLOADS
            for workload in WORKLOADS:
                figures = repetition["workloads"][workload]
                assert set(figures) >= WORKLOAD_KEYS
                assert figures["calls"] == counts[workload]
                assert all(_is_number(figures[key]) for key in WORKLOAD_KEYS)
            assert repetition["handshake"]["connects"] == counts["handshakes"]
            assert _is_number(repetition["handshake"]["p50_ms"])
            assert _is_number(repetition["handshake"]["cpu_ms_per_connect"])
            server_cpu = repetition["server_cpu"]
            assert server_cpu["rpc_calls"] > sum(counts[w] for w in WORKLOADS)
            if sys.platform.startswith("linux"):
                assert _is_number(server_cpu["us_per_call"])
                assert _is_number(server_cpu["ms_per_connect"])
    # The two libraries share the import name `conduit`: each side must have
    # imported its own.
    ours = rpc["contenders"]["conduit-trio"]["runtime"]
    assert _inside(ours["module_file"], REPO / "src")
    assert rpc["contenders"]["conduit-asyncio"]["runtime"]["flavor"] == "asyncio"
    theirs = rpc["contenders"]["netconduit"]
    assert theirs["versions"]["netconduit"] == "5.0.0"
    assert theirs["runtime"]["distribution_version"] == "5.0.0"
    assert _inside(theirs["runtime"]["module_file"], REPO / "benchmarks" / ".venvs")
    assert "seq-direct" in rpc["contenders"]["bare-trio"]["repetitions"][0]["workloads"]


@pytest.mark.slow
def test_rows_ratios_and_goals(quick_run: tuple[dict[str, Any], str]) -> None:
    record, stdout = quick_run
    rpc = record["scenarios"]["rpc"]
    rows = rpc["rows"]
    assert rpc["ratio_columns"] == ["x bare-trio", "x netconduit"]
    for row in rows:
        assert set(row) >= ROW_KEYS
        assert row["n"] == record["repeat"]
        assert row["min"] <= row["median"] <= row["max"]
        assert set(row["ratios"]) == set(rpc["ratio_columns"])
        for ratio in row["ratios"].values():
            # None only where the reference measured zero (server CPU of a TCP
            # connect is below the kernel's tick).
            assert ratio is not None or row["metric"].startswith("server CPU")
            assert ratio is None or ratio["min"] <= ratio["median"] <= ratio["max"]
    covered = {(row["group"], row["metric"], row["contender"]) for row in rows}
    groups = {row["group"] for row in rows}
    # sequential, 16 callers, 64 callers, server CPU, handshake
    assert len(groups) == 5
    for group in groups:
        metrics = {metric for g, metric, _ in covered if g == group}
        for metric in metrics:
            assert {c for g, m, c in covered if g == group and m == metric} >= CONTENDERS
    handshake_rows = {(m, c) for g, m, c in covered if g.startswith("handshake")}
    assert {m for m, c in handshake_rows if c in HANDSHAKE_ONLY} == {
        m for m, c in handshake_rows if c == "conduit-trio"
    }
    references = [row for row in rows if row["contender"] == "bare-trio"]
    assert references
    for row in references:
        ratio = row["ratios"]["x bare-trio"]
        # A reference that measured zero (server CPU of a TCP connect, below the
        # kernel's tick) has no ratio to itself.
        assert (ratio is None and row["metric"].startswith("server CPU")) or ratio["median"] == 1.0
    assert len(rpc["goals"]) == 9
    for goal in rpc["goals"]:
        assert _is_number(goal["value"])
        assert isinstance(goal["met"], bool)
    assert rpc["notes"]
    assert "== scenario rpc" in stdout
    assert "goals (reported, not asserted)" in stdout


# ----------------------------------------------------------------------- transfer scenarios


def _scenario(quick_run: tuple[dict[str, Any], str], name: str) -> dict[str, Any]:
    record, _ = quick_run
    scenario: dict[str, Any] = record["scenarios"][name]
    assert set(scenario["contenders"]) == TRANSFER_CONTENDERS[name]
    for contender, info in scenario["contenders"].items():
        assert info["status"] == "ok", (name, contender, info.get("reason"))
        assert len(info["repetitions"]) == record["repeat"]
    return scenario


def _check_rows(scenario: dict[str, Any], repeat: int) -> None:
    assert scenario["rows"]
    for row in scenario["rows"]:
        assert set(row) >= ROW_KEYS
        assert row["n"] == repeat
        assert row["min"] <= row["median"] <= row["max"]
        assert set(row["ratios"]) <= set(scenario["ratio_columns"])
    for goal in scenario["goals"]:
        assert _is_number(goal["value"]), goal
        assert isinstance(goal["met"], bool)
    assert scenario["notes"]


def _check_op(op: dict[str, Any], kind: str, size: int) -> None:
    assert op["op"] == kind
    assert set(op) >= OP_KEYS
    assert op["bytes"] == size == op["result"]["size"]
    assert all(_is_number(op[key]) for key in OP_KEYS)


@pytest.mark.slow
def test_bulk_every_contender_moved_the_right_bytes(
    quick_run: tuple[dict[str, Any], str],
) -> None:
    record, stdout = quick_run
    bulk = _scenario(quick_run, "bulk")
    size = bulk["config"]["file_bytes"]
    assert size == 64 * 1024 * 1024
    if sys.platform.startswith("linux"):
        assert bulk["config"]["files"]["storage"] == "ram"
    for info in bulk["contenders"].values():
        for repetition in info["repetitions"]:
            upload, download = repetition["ops"]
            _check_op(upload, "upload", size)
            _check_op(download, "download", size)
            assert len(repetition["verified_sha256"]) == 64
    contenders = bulk["contenders"]
    assert _inside(contenders["conduit-trio"]["runtime"]["module_file"], REPO / "src")
    assert contenders["conduit-asyncio"]["runtime"]["flavor"] == "asyncio"
    assert contenders["netconduit"]["runtime"]["distribution_version"] == "5.0.0"
    assert contenders["raw-aead"]["runtime"]["aead"] is True
    assert contenders["raw-plain"]["runtime"]["aead"] is False
    assert contenders["raw-aead-64k"]["runtime"]["record"] == 64 * 1024
    assert bulk["ratio_columns"] == ["x raw-aead", "x netconduit"]
    groups = {row["group"] for row in bulk["rows"]}
    assert groups == {"upload 64 MiB", "download 64 MiB"}
    for group in groups:
        throughput = {
            r["contender"]
            for r in bulk["rows"]
            if r["group"] == group and r["metric"] == "throughput"
        }
        assert throughput == TRANSFER_CONTENDERS["bulk"]
    _check_rows(bulk, record["repeat"])
    # vs the reference and netconduit (both directions), the shim's cost and
    # the asyncio event-loop stall (both directions)
    assert len(bulk["goals"]) == 8
    stalls = [goal for goal in bulk["goals"] if "event-loop stall" in goal["goal"]]
    assert [goal["unit"] for goal in stalls] == ["ms", "ms"]
    stall_rows = {
        (row["group"], row["contender"])
        for row in bulk["rows"]
        if row["metric"].startswith("event-loop stall")
    }
    assert stall_rows == {(g, c) for g in groups for c in ("conduit-trio", "conduit-asyncio")}
    assert "== scenario bulk" in stdout


@pytest.mark.slow
def test_memory_upload_peaks_and_idle_connections(quick_run: tuple[dict[str, Any], str]) -> None:
    record, _ = quick_run
    memory = _scenario(quick_run, "memory")
    small, large = memory["config"]["upload_sizes"]
    connections = memory["config"]["idle_connections"]
    assert connections == 100
    for name, info in memory["contenders"].items():
        for repetition in info["repetitions"]:
            sizes = {small} if name == "netconduit" else {small, large}
            assert set(repetition["upload"]) == sizes
            for figures in repetition["upload"].values():
                assert _is_number(figures["peak_rss_mib"])
                assert _is_number(figures["sampled_peak_rss_mib"])
                assert figures["samples"] >= 1
            if name in ("conduit-trio", "netconduit"):
                idle = repetition["idle"]
                assert idle["connections"] == connections
                assert _is_number(idle["rss_after_mib"])
                assert isinstance(idle["kib_per_connection"], float)
    groups = {row["group"] for row in memory["rows"]}
    assert len(groups) == 3
    _check_rows(memory, record["repeat"])
    assert [goal["unit"] for goal in memory["goals"]] == ["MiB", "MiB", "KiB"]


@pytest.mark.slow
def test_hol_rpcs_ran_during_the_upload(quick_run: tuple[dict[str, Any], str]) -> None:
    record, _ = quick_run
    hol = _scenario(quick_run, "hol")
    for info in hol["contenders"].values():
        for repetition in info["repetitions"]:
            figures = repetition["hol"]
            assert figures["idle"]["calls"] == hol["config"]["idle_calls"]
            assert figures["during_upload"]["calls"] >= 1
            assert _is_number(figures["during_upload"]["p99_us"])
            assert figures["upload"]["bytes"] == hol["config"]["upload_bytes"]
    _check_rows(hol, record["repeat"])
    assert len(hol["goals"]) == 1
    assert hol["goals"][0]["unit"] == "ms"


@pytest.mark.slow
def test_smallfiles_every_file_uploaded(quick_run: tuple[dict[str, Any], str]) -> None:
    record, _ = quick_run
    smallfiles = _scenario(quick_run, "smallfiles")
    for name, info in smallfiles["contenders"].items():
        for repetition in info["repetitions"]:
            figures = repetition["smallfiles"]
            assert figures["files"] == smallfiles["config"]["files"] == 200
            assert figures["concurrency"] == (8 if name.endswith("x8") else 1)
            assert _is_number(figures["files_per_s"])
            # Paced slice by slice with the other contenders, on one connection.
            assert figures["slices"] == smallfiles["config"]["slices"] == 4
    _check_rows(smallfiles, record["repeat"])


@pytest.mark.slow
def test_sftp_transfers_and_handshakes(quick_run: tuple[dict[str, Any], str]) -> None:
    record, _ = quick_run
    sftp = _scenario(quick_run, "sftp")
    size = sftp["config"]["file_bytes"]
    for info in sftp["contenders"].values():
        for repetition in info["repetitions"]:
            upload, download = repetition["ops"]
            _check_op(upload, "upload", size)
            _check_op(download, "download", size)
            assert repetition["handshake"]["connects"] == sftp["config"]["connects"]
    runtime = sftp["contenders"]["sftp"]["runtime"]
    assert runtime["library"] == "asyncssh"
    assert runtime["cipher"] == "aes256-gcm@openssh.com"
    _check_rows(sftp, record["repeat"])


@pytest.mark.slow
def test_cluster_pushes_to_both_nodes(quick_run: tuple[dict[str, Any], str]) -> None:
    record, _ = quick_run
    cluster = _scenario(quick_run, "cluster")
    sizes = cluster["config"]["sizes"]
    assert sizes == ["64 KiB", "4 MiB"]
    for name in ("same-node", "cross-node"):
        for repetition in cluster["contenders"][name]["repetitions"]:
            assert set(repetition) == set(sizes)
            assert all(_is_number(seconds) and seconds > 0 for seconds in repetition.values())
    # The store comparison: the same file up and down through each store.
    stored = cluster["config"]["store_file_size"]
    for name in ("local store", "S3 store"):
        for repetition in cluster["contenders"][name]["repetitions"]:
            assert set(repetition) == {"upload MiB/s", "download MiB/s"}
            assert all(_is_number(rate) and rate > 0 for rate in repetition.values())
    assert {row["group"] for row in cluster["rows"]} == {
        *(f"push of {size}" for size in sizes),
        f"upload of {stored}",
        f"download of {stored}",
    }
    _check_rows(cluster, record["repeat"])


@pytest.mark.slow
def test_charts_one_png_per_group(quick_run: tuple[dict[str, Any], str]) -> None:
    record, stdout = quick_run
    assert "charts_error" not in record
    groups = {
        (name, row["group"])
        for name, scenario in record["scenarios"].items()
        for row in scenario["rows"]
    }
    assert len(record["charts"]) == len(groups)
    results = Path(stdout.split("results: ", 1)[1].splitlines()[0])
    for chart in record["charts"]:
        assert (results.parent / chart).read_bytes().startswith(b"\x89PNG")
