"""Sphinx configuration for the conduit documentation (``python -m nox -s docs``)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from conduit import __version__

project = "conduit"
author = "conduit developers"
release = version = __version__
# No napoleon: the field comments (#:) are prose, and napoleon read a first line
# "X: Y" as a type X described by Y.
extensions = [
    "sphinx.ext.autodoc",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
html_theme = "furo"
html_title = f"conduit {release}"
myst_heading_anchors = 3
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "undoc-members": False}
# Some pages link to repository files outside the docs tree (benchmarks/README.md,
# fuzz/README.md); on GitHub those links work, in the built site they stay plain.
suppress_warnings = ["myst.xref_missing"]
# No intersphinx: the docs must build offline, as CI has no network.
nitpicky = False
