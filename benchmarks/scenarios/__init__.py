"""The suite's scenarios, by name.

A scenario is a module with ``NAME`` and ``run(config: RunConfig) -> ScenarioResult``
(see :mod:`benchmarks._harness`), registered here in running order: small RPCs,
bulk transfer, memory, head-of-line blocking, many small files, SFTP, pushes
across cluster nodes, and the pre-authentication abuse thresholds. The
transfer scenarios share :mod:`benchmarks.scenarios._transfer`.
"""

from __future__ import annotations

from collections.abc import Callable

from .._harness import RunConfig, ScenarioResult
from . import auth_abuse, bulk, cluster, hol, memory, rpc, sftp, smallfiles

Scenario = Callable[[RunConfig], ScenarioResult]

SCENARIOS: dict[str, Scenario] = {
    rpc.NAME: rpc.run,
    bulk.NAME: bulk.run,
    memory.NAME: memory.run,
    hol.NAME: hol.run,
    smallfiles.NAME: smallfiles.run,
    sftp.NAME: sftp.run,
    auth_abuse.NAME: auth_abuse.run,
    cluster.NAME: cluster.run,
}

__all__ = ["SCENARIOS", "Scenario"]
