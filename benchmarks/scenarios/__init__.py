"""The suite's scenarios, by name.

A scenario is a module with ``NAME`` and ``run(config: RunConfig) -> ScenarioResult``
(see :mod:`benchmarks._harness`). Add new ones (bulk transfer, many small files,
head-of-line blocking, memory, connection setup) here, in running order.
"""

from __future__ import annotations

from collections.abc import Callable

from .._harness import RunConfig, ScenarioResult
from . import bulk, memory, rpc

Scenario = Callable[[RunConfig], ScenarioResult]

SCENARIOS: dict[str, Scenario] = {
    rpc.NAME: rpc.run,
    bulk.NAME: bulk.run,
    memory.NAME: memory.run,
}

__all__ = ["SCENARIOS", "Scenario"]
