"""Private virtualenvs for competitors whose import name clashes with ours.

``netconduit`` on PyPI is also imported as ``conduit``, so it can never share an
environment with this repository. :func:`ensure_venv` creates
``benchmarks/.venvs/<name>`` with ``python -m venv`` and ``pip install <pins>``
on first use, and reuses it afterwards (a marker file records what was
installed; a changed pin rebuilds it). The directory is git-ignored.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from ._harness import BENCH_DIR, foreign_env, log

VENVS_DIR = BENCH_DIR / ".venvs"
NETCONDUIT_REQUIREMENTS = ("netconduit==5.0.0",)

_MARKER = ".benchmark-installed.json"


class VenvError(RuntimeError):
    """The virtualenv could not be created or installed."""


def _python_of(venv: Path) -> Path:
    if os.name == "nt":
        return venv / "Scripts" / "python.exe"
    return venv / "bin" / "python"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise venv creation between concurrent benchmark runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if sys.platform == "win32":  # no fcntl: concurrent first runs are on their own
        yield
        return
    import fcntl

    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(argv: Sequence[str], timeout: float) -> None:
    try:
        completed = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, env=foreign_env()
        )
    except subprocess.TimeoutExpired:
        raise VenvError(f"{' '.join(argv)} timed out after {timeout:g}s") from None
    if completed.returncode != 0:
        raise VenvError(
            f"{' '.join(argv)} failed with code {completed.returncode}:\n"
            + "\n".join((completed.stdout + completed.stderr).strip().splitlines()[-20:])
        )


def ensure_venv(name: str, requirements: Sequence[str]) -> Path:
    """Return the interpreter of ``benchmarks/.venvs/<name>``, creating it if needed."""
    venv = VENVS_DIR / name
    python = _python_of(venv)
    marker = venv / _MARKER
    wanted = {"requirements": list(requirements), "base_python": sys.version.split()[0]}
    with _locked(VENVS_DIR / f".{name}.lock"):
        if python.exists() and marker.exists():
            try:
                if json.loads(marker.read_text()) == wanted:
                    return python
            except ValueError:
                pass
        log(f"creating virtualenv {venv} with {' '.join(requirements)} (first use)")
        if venv.exists():
            shutil.rmtree(venv)
        _run([sys.executable, "-m", "venv", str(venv)], timeout=300)
        _run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--no-input",
                "--quiet",
                *requirements,
            ],
            timeout=900,
        )
        marker.write_text(json.dumps(wanted))
    return python


def netconduit_python() -> Path:
    """The interpreter of the private netconduit 5.0.0 environment."""
    return ensure_venv("netconduit", NETCONDUIT_REQUIREMENTS)


def installed_versions(python: Path, distributions: Sequence[str]) -> dict[str, str | None]:
    """Versions of ``distributions`` as seen by another interpreter."""
    script = (
        "import json, sys\n"
        "from importlib import metadata\n"
        "out = {}\n"
        "for name in sys.argv[1:]:\n"
        "    try:\n"
        "        out[name] = metadata.version(name)\n"
        "    except metadata.PackageNotFoundError:\n"
        "        out[name] = None\n"
        "print(json.dumps(out))\n"
    )
    completed = subprocess.run(
        [str(python), "-c", script, *distributions],
        capture_output=True,
        text=True,
        timeout=60,
        env=foreign_env(),
        check=False,
    )
    if completed.returncode != 0:
        return dict.fromkeys(distributions)
    versions: dict[str, str | None] = json.loads(completed.stdout)
    return versions
