"""Automation entry points: ``python -m nox`` (the default sessions) or ``-s <session>``.

``python -m nox`` with no arguments runs what a reviewer checks, in order: lint,
typecheck (the library, tests and benchmarks; netconduit's peers apart), docs
(warnings are errors) and tests. It is the README's test command and what
``.ci/run`` runs. Every session installs what it needs into its own
virtualenv under ``.nox/``, so these work on a fresh machine that has only Python
and pip.
"""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
# Cheap checks first: a lint error fails in seconds, before minutes of tests.
nox.options.sessions = ["lint", "typecheck", "typecheck_netconduit", "docs", "tests"]

PYTHON = None  # the interpreter nox itself runs on (3.11+ is required by pyproject)

#: The benchmark peers: scripts run from this directory, which import their
#: helpers (``_peerlib``, ``_transferlib``) as top-level modules.
PEERS_DIR = Path(__file__).parent / "benchmarks" / "peers"
#: The peers that run in netconduit's own virtualenv (its import name is ``conduit`` too).
NETCONDUIT_PEERS = sorted(str(path) for path in PEERS_DIR.glob("netconduit_*.py"))
#: The peers that run in ours.
OUR_PEERS = sorted(
    str(path) for path in PEERS_DIR.glob("*.py") if not path.name.startswith("netconduit_")
)
#: What ``benchmarks/_venvs.py`` installs for the netconduit peers (a test checks).
NETCONDUIT = "netconduit==5.0.0"


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


@nox.session(python=["3.12", "3.13"])
def tests_other_pythons(session: nox.Session) -> None:
    """The whole test suite on the other Pythons ``pyproject.toml`` names (3.12, 3.13).

    Not a default session: each run takes as long as ``tests``, three would
    triple CI's time. Run it (``python -m nox -s tests_other_pythons``)
    after changing the asyncio shim, which leans on asyncio's behaviour
    where it changes between versions, and before a release.
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
    """mypy --strict over the library, its tests and the benchmark suite.

    ``mypy`` alone checks what ``pyproject.toml`` names: ``src/conduit``,
    ``tests``, ``benchmarks`` less its peers, this file and the docs'
    ``conf.py``. The peers are then checked as the top-level modules they are
    when they run, all but netconduit's (see ``typecheck_netconduit``).
    """
    session.install("-e", ".[test,cli,bench]", "mypy>=1.11", "nox")  # nox: for noxfile.py
    session.run("mypy")
    session.run("mypy", "--explicit-package-bases", *OUR_PEERS, env={"MYPYPATH": str(PEERS_DIR)})


@nox.session(python=PYTHON)
def typecheck_netconduit(session: nox.Session) -> None:
    """mypy --strict over the netconduit peers, against netconduit itself.

    netconduit imports as ``conduit``, so it cannot share a virtualenv with this
    package. The helper modules the peers import are checked by
    ``typecheck``; here they (and netconduit's own code) are followed
    silently.
    """
    session.install(NETCONDUIT, "mypy>=1.11")
    session.run(
        "mypy",
        "--explicit-package-bases",
        "--follow-imports=silent",
        "--cache-dir",
        ".mypy_cache/netconduit",
        *NETCONDUIT_PEERS,
        env={"MYPYPATH": str(PEERS_DIR)},
    )


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
