"""Every Python code block in the README and docs compiles; the runnable ones run.

A block "runs" when it is a complete, self-contained program: it has its
imports, creates its own ``Server`` and calls ``trio.run(`` or ``asyncio.run(``.
Programs that serve forever (``asyncio.run(server.run())``) and clients that
need one are run by ``tests/test_examples.py`` instead, as a pair; fragments
are only compiled.

The README's test command is also what CI runs, and it runs every check a
reviewer makes: both are checked here, from the files themselves.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    *sorted((ROOT / "docs").glob("*.rst")),
]

_MD_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
_RST_BLOCK = re.compile(r"\.\. code-block:: python\n\n((?:    .*\n|[ \t]*\n)+)")


def _blocks() -> list[tuple[str, int, str]]:
    found = []
    for path in DOCUMENTS:
        text = path.read_text()
        pattern = _RST_BLOCK if path.suffix == ".rst" else _MD_BLOCK
        for match in pattern.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            found.append((path.relative_to(ROOT).as_posix(), line, textwrap.dedent(match.group(1))))
    return found


BLOCKS = _blocks()


def test_there_are_blocks_to_check() -> None:
    assert len(BLOCKS) >= 15


@pytest.mark.parametrize(
    ("document", "line", "code"), BLOCKS, ids=[f"{d}:{n}" for d, n, _ in BLOCKS]
)
def test_block_compiles(document: str, line: int, code: str) -> None:
    compile(code, f"{document}:{line}", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


def _is_program(code: str) -> bool:
    runs = "trio.run(" in code or "asyncio.run(" in code
    has_own_server = "import" in code and "Server(" in code
    # A server run as a background task (asyncio.create_task(server.run())) ends
    # with its program; only one run *as* the program serves forever.
    return runs and has_own_server and "asyncio.run(server.run())" not in code


RUNNABLE = [block for block in BLOCKS if _is_program(block[2])]


@pytest.mark.parametrize(
    ("document", "line", "code"), RUNNABLE, ids=[f"{d}:{n}" for d, n, _ in RUNNABLE]
)
def test_runnable_block_runs(document: str, line: int, code: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"{document}:{line} failed:\n{result.stderr}"


def test_some_blocks_run() -> None:
    assert len(RUNNABLE) >= 3
    # Both worlds: a Trio program and an asyncio one (the port-0 pattern of each).
    assert any("trio.run(" in code for _, _, code in RUNNABLE)
    assert any("asyncio.run(" in code for _, _, code in RUNNABLE)


README_TEST_COMMAND = "python -m pip install nox && python -m nox"


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    readme_lines = (ROOT / "README.md").read_text().splitlines()
    assert README_TEST_COMMAND in readme_lines
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert "set -euo pipefail" in ci
    commands = [line for line in ci if line and not line.startswith("#")]
    assert commands[-1] == README_TEST_COMMAND


def _noxfile_value(target: str) -> object:
    """The literal that ``noxfile.py`` assigns to ``target``."""
    noxfile = ast.parse((ROOT / "noxfile.py").read_text())
    return ast.literal_eval(
        next(
            node.value
            for node in ast.walk(noxfile)
            if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == target
        )
    )


def test_the_default_nox_sessions_are_what_reviewers_check() -> None:
    assert _noxfile_value("nox.options.sessions") == [
        "lint",
        "typecheck",
        "typecheck_netconduit",
        "docs",
        "tests",
    ]


def test_the_netconduit_typecheck_pins_what_the_benchmarks_install() -> None:
    from benchmarks._venvs import NETCONDUIT_REQUIREMENTS

    assert (_noxfile_value("NETCONDUIT"),) == NETCONDUIT_REQUIREMENTS


# --------------------------------------------------------------------------- links

_FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*$", re.MULTILINE)
_LABEL = re.compile(r"^\(([\w-]+)\)=\s*$", re.MULTILINE)


def _slug(heading: str) -> str:
    """A heading's anchor as GitHub and MyST (``myst_heading_anchors``) make it."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = _FENCE.sub("", path.read_text())
    return {_slug(heading) for heading in _HEADING.findall(text)} | set(_LABEL.findall(text))


def _links() -> list[tuple[str, int, str]]:
    found = []
    for path in DOCUMENTS:
        if path.suffix != ".md":
            continue
        text = _FENCE.sub(lambda block: "\n" * block.group(0).count("\n"), path.read_text())
        for match in _LINK.finditer(text):
            target = match.group(1)
            if not target.startswith(("http://", "https://", "mailto:")):
                line = text.count("\n", 0, match.start()) + 1
                found.append((path.relative_to(ROOT).as_posix(), line, target))
    return found


def test_every_link_between_pages_resolves() -> None:
    """Relative links and their anchors, in the README and docs: the docs build
    cannot check the links that leave the docs tree (``myst.xref_missing`` is
    silenced for them, see docs/conf.py), so this does, for all of them."""
    links = _links()
    assert len(links) > 100
    broken = []
    for document, line, target in links:
        path, _, anchor = target.partition("#")
        resolved = (ROOT / document).parent / path if path else ROOT / document
        if not resolved.exists():
            broken.append(f"{document}:{line}: no such file: {target}")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{document}:{line}: no such heading: {target}")
    assert not broken, "\n".join(broken)
