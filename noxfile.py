"""Automation entry points: ``python -m nox`` (the default sessions) or ``-s <session>``.

``python -m nox`` with no arguments runs what a reviewer checks, in order: lint,
typecheck, docs (warnings are errors) and tests. It is the README's test command
and what ``.ci/run`` runs. Every session installs what it needs into its own
virtualenv under ``.nox/``, so these work on a fresh machine that has only Python
and pip.
"""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
# Cheap checks first: a lint error fails in seconds, before minutes of tests.
nox.options.sessions = ["lint", "typecheck", "docs", "tests"]

PYTHON = None  # the interpreter nox itself runs on (3.11+ is required by pyproject)


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Run the whole test suite, in two worker processes.

    Most tests wait (on loopback sockets, subprocesses, real servers) rather
    than compute, so two workers roughly halve the wall time on a 2-core
    machine. ``--dist loadfile`` keeps each test file in one worker, so a
    module's expensive fixture (a benchmark scenario's quick run, the cluster
    engines) starts once; each benchmark scenario has a test file of its own
    (``tests/test_benchmarks_quick_<name>.py``), so the workers share them.
    Pass ``-- -n 0`` to run in one process.
    """
    session.install("-e", ".[test,cli]")
    session.run("python", "-m", "pytest", "-n", "2", "--dist", "loadfile", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """Ruff lint and format check (``examples/`` keeps the guide's own formatting)."""
    session.install("ruff>=0.6")
    paths = ["src", "tests", "benchmarks", "noxfile.py", "docs/conf.py"]
    session.run("ruff", "check", *paths)
    session.run("ruff", "format", "--check", *paths)


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the library."""
    session.install("-e", ".[test,cli]", "mypy>=1.11")
    session.run("mypy")


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """The README's first command: a server and a client talking on loopback."""
    session.install("-e", ".[cli]")
    session.run("python", "-m", "conduit", "demo", *session.posargs)


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """Build the documentation site with warnings as errors."""
    session.install("-e", ".", "sphinx>=7", "furo", "myst-parser>=2")
    session.run(
        "python", "-m", "sphinx", "-W", "--keep-going", "-b", "html", "docs", "docs/_build/html"
    )


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """The benchmark suite (``-- --quick`` for the small CI-sized run)."""
    session.install("-e", ".[test,bench]")
    session.run("python", "-m", "benchmarks", *session.posargs)


@nox.session(python=PYTHON)
def stress_disk(session: nox.Session) -> None:
    """Issue 11's full-size disk thresholds (needs root: mounts a 64 MiB tmpfs)."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "benchmarks.scenarios.disk_abuse", *session.posargs)


@nox.session(python=PYTHON)
def stress(session: nox.Session) -> None:
    """Issue 11's abuse thresholds at full size, each server in its own process (minutes).

    ``benchmarks.abuse`` prints one PASS/FAIL line of figures per scenario; the
    CI-sized versions (and every malformed peer answer) run as tests first.
    """
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", "-q", "tests/test_resource_limits.py")
    session.run("python", "-m", "benchmarks.abuse", *session.posargs)
