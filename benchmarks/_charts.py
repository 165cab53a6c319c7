"""Charts of a results record: one PNG per scenario group.

Run as a script (``python benchmarks/_charts.py RESULTS.json OUT_DIR``) by the
suite, with an interpreter that has matplotlib (this one, or the private
``benchmarks/.venvs/charts``): it imports nothing else of the suite, so it
runs in either.

Each PNG shows one group of one scenario (e.g. ``bulk``: "upload 1 GiB"): one
panel per metric, one horizontal bar per contender at the median, with a
whisker from min to max over the repetitions. Prints the written file names,
one per line.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

#: Bars of the references and competitors are drawn in their own colours.
_COLOURS = {
    "conduit": "#1f77b4",
    "raw": "#7f7f7f",
    "bare": "#7f7f7f",
    "netconduit": "#d62728",
    "sftp": "#9467bd",
}


def slug(text: str) -> str:
    """A file-name-safe form of a group name."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _colour(contender: str) -> str:
    for prefix, colour in _COLOURS.items():
        if contender.startswith(prefix):
            return colour
    return "#2ca02c"


def chart_file_name(scenario: str, group: str) -> str:
    """``<scenario>-<group slug>.png`` (shared with the docs generator)."""
    return f"{scenario}-{slug(group)}.png"


def render(record: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write every group's chart into ``out_dir``; return the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for scenario, result in record["scenarios"].items():
        groups: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for row in result["rows"]:
            groups.setdefault(row["group"], {}).setdefault(row["metric"], []).append(row)
        for group, metrics in groups.items():
            height = max(len(rows) for rows in metrics.values()) * 0.42 + 1.2
            figure, axes = plt.subplots(
                1, len(metrics), figsize=(4.2 * len(metrics), height), squeeze=False
            )
            for axis, (metric, rows) in zip(axes[0], metrics.items(), strict=True):
                names = [row["contender"] for row in rows][::-1]
                medians = [row["median"] for row in rows][::-1]
                low = [row["median"] - row["min"] for row in rows][::-1]
                high = [row["max"] - row["median"] for row in rows][::-1]
                axis.barh(
                    names,
                    medians,
                    xerr=[low, high],
                    color=[_colour(name) for name in names],
                    capsize=3,
                    error_kw={"elinewidth": 1, "ecolor": "#333333"},
                )
                better = "higher is better" if rows[0]["better"] == "higher" else "lower is better"
                axis.set_title(f"{metric} ({rows[0]['unit']})\n{better}", fontsize=9)
                axis.tick_params(labelsize=8)
                axis.grid(axis="x", alpha=0.3)
                for index, (value, extra) in enumerate(zip(medians, high, strict=True)):
                    axis.annotate(
                        f"{value:,.3g}",
                        (value + extra, index),
                        xytext=(3, 0),
                        textcoords="offset points",
                        va="center",
                        fontsize=7,
                    )
            load = record.get("machine", {}).get("load_average_at_start")
            subtitle = f"{record.get('mode', '?')} run {record.get('created_utc', '')}"
            if load:
                subtitle += f", load avg at start {load[0]:.2f}"
            figure.suptitle(f"{scenario}: {group}\n{subtitle}", fontsize=10)
            figure.tight_layout()
            path = out_dir / chart_file_name(scenario, group)
            figure.savefig(path, dpi=90)
            plt.close(figure)
            written.append(path)
    return written


def main(argv: list[str]) -> int:
    """``_charts.py RESULTS.json OUT_DIR``."""
    if len(argv) != 2:
        print("usage: _charts.py RESULTS.json OUT_DIR", file=sys.stderr)
        return 2
    record = json.loads(Path(argv[0]).read_text())
    for path in render(record, Path(argv[1])):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
