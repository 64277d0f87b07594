"""The runs behind scenario files: each is a module with `run(sim, spec, progress) ->
ScenarioResult`, and each shipped `NAME.toml` here is a ready-made scenario file.

Which run executes a file follows from its sections (`sim.scenario.driver_of`): files on
one domain ("family-video", or "churn" when hosts churn), files across domains
("federation"), lookups ("dht-lookup"), envelopes ("server-load").
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from sim.scenario import Progress, ScenarioError, ScenarioResult, ScenarioSpec
from sim.simulation import Simulation

Runner = Callable[[Simulation, ScenarioSpec, Progress | None], ScenarioResult]

_MODULES = {"dht-lookup": "dht_lookup", "family-video": "family_video", "churn": "churn",
            "server-load": "server_load", "federation": "federation"}


def runner_for(driver: str) -> Runner:
    """The run function of a driver (explicit table, no name lookup from the file)."""
    try:
        module = importlib.import_module(f"sim.scenarios.{_MODULES[driver]}")
    except KeyError:
        raise ScenarioError(
            f"unknown run {driver!r} (known: {', '.join(sorted(_MODULES))})") from None
    runner: Runner = module.run
    return runner
