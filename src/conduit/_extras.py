"""How to install the packages of one of conduit's extras, for the errors that need them.

conduit is not on PyPI yet (``README.md``): ``pip install 'trio-conduit[cli]'``
finds nothing there today, and once another project took the name it would
install theirs. So a hint names the extra's packages themselves, as the
installed distribution's metadata lists them, and the form that works in a
checkout.
"""

from __future__ import annotations

import re
from importlib import metadata

#: The distribution's name (``pyproject.toml``).
DISTRIBUTION = "trio-conduit"


def extra_packages(extra: str) -> list[str]:
    """The requirements of ``extra`` (``"click>=8.1"``...), as installed; empty when
    the distribution's metadata is not there (run from a source tree)."""
    try:
        requires = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        return []
    return requirements_of(extra, requires)


def requirements_of(extra: str, requires: list[str]) -> list[str]:
    """The requirements (``Requires-Dist`` lines) of ``requires`` that ``extra`` brings."""
    # Either quote: hatchling writes 'cli', packaging's own writer "cli".
    marker = re.compile(rf"""extra\s*==\s*(['"]){re.escape(extra)}\1""")
    return [
        requirement.partition(";")[0].strip()
        for requirement in requires
        if marker.search(requirement.partition(";")[2])
    ]


def install_hint(extra: str) -> str:
    """What to run to get ``extra``'s packages: ``pip install 'boto3>=1.36' ... (in a
    checkout of conduit: pip install '.[cluster]')``."""
    checkout = f"pip install '.[{extra}]'"
    packages = extra_packages(extra)
    if not packages:
        return f"{checkout} in a checkout of conduit"
    listed = " ".join(f"'{package}'" for package in packages)
    return f"pip install {listed} (in a checkout of conduit: {checkout})"


__all__ = ["DISTRIBUTION", "extra_packages", "install_hint", "requirements_of"]
