"""Charts next to a results record, and ``docs/benchmarks.md`` from the latest records.

::

    python -m benchmarks.report                  # regenerate docs/benchmarks.md
    python -m benchmarks.report --charts R.json  # (re)draw the charts of one record

Charts: one PNG per scenario group, written to the directory named like the
record without ``.json`` (``benchmarks/results/<stamp>/``), by
``benchmarks/_charts.py`` under an interpreter with matplotlib: this one if it
has it (``pip install -e .[bench]``), else the private virtualenv
``benchmarks/.venvs/charts`` (created on first use).

The docs page takes, for every scenario, the newest *full* record in
``benchmarks/results/`` that has it (a quick record only when no full one
exists, marked as such), and shows its table, goals, notes, the machine and
its load, the exact command, and the charts.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from ._harness import (
    BENCH_DIR,
    REPO_ROOT,
    RESULTS_DIR,
    _format_number,
    foreign_env,
    goal_value_text,
    log,
)
from ._venvs import VenvError, ensure_venv

CHARTS_SCRIPT = BENCH_DIR / "_charts.py"
CHARTS_REQUIREMENTS = ("matplotlib==3.11.2",)
DOCS_PAGE = REPO_ROOT / "docs" / "benchmarks.md"
SCENARIO_ORDER = ("rpc", "bulk", "memory", "hol", "smallfiles", "sftp")


def charts_dir(record_path: Path) -> Path:
    """Where the charts of a record go: its path without ``.json``."""
    return record_path.with_suffix("")


def _charts_python() -> str:
    probe = subprocess.run(
        [sys.executable, "-c", "import matplotlib"],
        capture_output=True,
        env=foreign_env(),
        timeout=60,
        check=False,
    )
    if probe.returncode == 0:
        return sys.executable
    return str(ensure_venv("charts", CHARTS_REQUIREMENTS))


def make_charts(record_path: Path) -> list[Path]:
    """Draw the record's charts (one PNG per scenario group); return their paths."""
    out = charts_dir(record_path)
    try:
        python = _charts_python()
    except VenvError as exc:
        raise RuntimeError(f"no matplotlib for the charts: {exc}") from exc
    completed = subprocess.run(
        [python, str(CHARTS_SCRIPT), str(record_path), str(out)],
        capture_output=True,
        text=True,
        env=foreign_env(),
        timeout=300,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"charts failed:\n{completed.stderr[-2000:]}")
    return [Path(line) for line in completed.stdout.splitlines() if line.strip()]


# ----------------------------------------------------------------------- docs


def _load(path: Path) -> dict[str, Any] | None:
    try:
        record: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record.get("scenarios"), dict) else None


def latest_records(results_dir: Path = RESULTS_DIR) -> dict[str, tuple[Path, dict[str, Any]]]:
    """Scenario -> (path, record) of its newest full record (else newest quick one)."""
    records = []
    for path in sorted(results_dir.glob("*.json")):
        record = _load(path)
        if record is not None:
            records.append((record.get("created_utc", ""), path, record))
    records.sort(key=lambda item: (item[0], item[1].name))
    chosen: dict[str, tuple[Path, dict[str, Any]]] = {}
    for mode in ("quick", "full"):  # full records, newest last, win
        for _, path, record in records:
            if record.get("mode") == mode:
                for scenario in record["scenarios"]:
                    chosen[scenario] = (path, record)
    return chosen


def _cell(value: float) -> str:
    return _format_number(value)


def _table(result: dict[str, Any]) -> list[str]:
    columns = list(result.get("ratio_columns", []))
    header = ["group", "metric", "contender", "median", "min", "max", "unit", *columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    previous = None
    for row in result["rows"]:
        ratios = []
        for column in columns:
            ratio = row.get("ratios", {}).get(column)
            ratios.append("" if ratio is None else f"{ratio['median']:.2f}x")
        cells = [
            row["group"] if row["group"] != previous else "",
            row["metric"],
            f"**{row['contender']}**"
            if row["contender"].startswith("conduit")
            else row["contender"],
            _cell(row["median"]),
            _cell(row["min"]),
            _cell(row["max"]),
            row["unit"],
            *ratios,
        ]
        previous = row["group"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _goal_line(goal: dict[str, Any]) -> str:
    if goal.get("value") is None:
        return f"- {goal['goal']}: not measured"
    shown = goal_value_text(goal)
    line = f"- {goal['goal']}: **{shown}** -> {'met' if goal['met'] else 'MISSED'}"
    return f"{line} ({goal['context']})" if goal.get("context") else line


def _dirt_text(machine: dict[str, Any]) -> str:
    """What the record says of uncommitted changes, after its commit."""
    if not machine.get("git_dirty"):
        return ""
    changes = machine.get("git_changes")
    if not changes:  # records before 2026-12-05 18:00 say only "dirty"
        return " (dirty tree)"
    if changes["code_changed"]:
        return f" (dirty tree: {changes['count']} changed paths, code among them)"
    return f" (dirty tree: {changes['count']} changed paths, no code: results or docs)"


def _load_text(machine: dict[str, Any]) -> str:
    parts = []
    for key, label in (("load_average_at_start", "start"), ("load_average_at_end", "end")):
        load = machine.get(key)
        if load:
            parts.append(f"{label} {' / '.join(f'{value:.2f}' for value in load)}")
    return "; ".join(parts) or "unknown"


def render_docs(chosen: dict[str, tuple[Path, dict[str, Any]]]) -> str:
    """The Markdown of ``docs/benchmarks.md``."""
    lines = [
        "# Benchmarks",
        "",
        "<!-- Generated by `python -m benchmarks.report` from benchmarks/results/; "
        "do not edit by hand. -->",
        "",
        "How the suite works (separate processes, alternating repetitions, medians with "
        "min/max, ratios paired per repetition, every transferred file verified by "
        "SHA-256) is in [benchmarks/README.md](../benchmarks/README.md). Each section "
        "below is the newest full run of that scenario; rerun it with the command shown. "
        "Figures come from a shared 2-vCPU machine: read them with the load average next "
        "to them, and prefer the ratios (both sides measured in the same repetition) to absolute "
        "numbers.",
        "",
    ]
    order = [s for s in SCENARIO_ORDER if s in chosen] + sorted(
        s for s in chosen if s not in SCENARIO_ORDER
    )
    if not order:
        lines.append("No results yet: run `python -m benchmarks`.")
    for scenario in order:
        path, record = chosen[scenario]
        result = record["scenarios"][scenario]
        machine = record.get("machine", {})
        versions = machine.get("versions", {})
        lines += [
            f"## {scenario}",
            "",
            f"- run: {record.get('created_utc', '?')}, mode **{record.get('mode')}**, "
            f"{record.get('repeat')} repetitions, {result.get('duration_s', 0):.0f} s"
            + (
                ""
                if record.get("mode") == "full"
                else " (quick mode: small sizes, indicative only)"
            ),
            f"- command: `{' '.join(record.get('command', []))}`",
            f"- machine: {machine.get('cpu_model', '?')}, {machine.get('usable_cores', '?')} "
            f"usable cores, Python {machine.get('python', '?')}, trio {versions.get('trio')}, "
            f"cryptography {versions.get('cryptography')}; "
            f"git {str(machine.get('git_commit'))[:10]}{_dirt_text(machine)}",
            f"- load average (1/5/15 min): {_load_text(machine)}",
            f"- record: [{path.name}](../{path.relative_to(REPO_ROOT).as_posix()})",
            "",
            *_table(result),
            "",
        ]
        missing = {n: i for n, i in result.get("contenders", {}).items() if i.get("status") != "ok"}
        if missing:
            lines.append("Not measured:")
            lines.append("")
            for name, info in missing.items():
                reason = (str(info.get("reason", "")).strip().splitlines() or [""])[0]
                lines.append(f"- {name}: {info.get('status')}: {reason}")
            lines.append("")
        if result.get("goals"):
            lines += ["Goals (reported, not asserted):", ""]
            lines += [_goal_line(goal) for goal in result["goals"]]
            lines.append("")
        if result.get("notes"):
            lines += ["Notes:", ""]
            lines += [f"- {note}" for note in result["notes"]]
            lines.append("")
        directory = charts_dir(path)
        charts = sorted(directory.glob(f"{scenario}-*.png")) if directory.is_dir() else []
        for chart in charts:
            relative = Path("..") / chart.relative_to(REPO_ROOT)
            lines += [f"![{scenario}: {chart.stem}]({relative.as_posix()})", ""]
    return "\n".join(lines).rstrip() + "\n"


#: Everything from this line to the end of ``docs/benchmarks.md`` is written by
#: hand (analyses such as the per-call CPU budget) and survives regeneration.
HAND_WRITTEN_MARKER = (
    "<!-- Hand-written below this line: kept by `python -m benchmarks.report`. -->"
)


def hand_written_tail(page: Path) -> str:
    """The hand-written part of an existing page (from the marker on), or ""."""
    if not page.is_file():
        return ""
    text = page.read_text()
    start = text.find(HAND_WRITTEN_MARKER)
    return "" if start < 0 else text[start:]


def update_docs(results_dir: Path = RESULTS_DIR, page: Path = DOCS_PAGE) -> Path:
    """Regenerate ``docs/benchmarks.md`` from the newest records, keeping the hand-written tail."""
    generated = render_docs(latest_records(results_dir))
    tail = hand_written_tail(page)
    page.write_text(generated + ("\n" + tail if tail else ""))
    log(f"wrote {page}")
    return page


def main(argv: list[str] | None = None) -> int:
    """Command line: regenerate the docs page, or draw one record's charts."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__)
    parser.add_argument("--charts", type=Path, metavar="RECORD", help="draw this record's charts")
    args = parser.parse_args(argv)
    if args.charts is not None:
        for path in make_charts(args.charts):
            print(path)
        return 0
    print(update_docs())
    return 0


if __name__ == "__main__":
    sys.exit(main())
