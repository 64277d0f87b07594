"""Built-in scenarios: each kind is a module with `run(sim, spec, progress) -> ScenarioResult`,
and each shipped `NAME.toml` here is a ready-made scenario file."""

from __future__ import annotations

from collections.abc import Callable

from sim.scenario import Progress, ScenarioError, ScenarioResult, ScenarioSpec
from sim.simulation import Simulation

Runner = Callable[[Simulation, ScenarioSpec, Progress | None], ScenarioResult]


def runner_for(kind: str) -> Runner:
    """The run function of a scenario kind (explicit table, no name lookup from the file)."""
    from sim.scenarios import churn, dht_lookup, family_video, federation, server_load

    kinds: dict[str, Runner] = {"dht-lookup": dht_lookup.run,
                                "family-video": family_video.run,
                                "churn": churn.run,
                                "server-load": server_load.run,
                                "federation": federation.run}
    try:
        return kinds[kind]
    except KeyError:
        raise ScenarioError(
            f"unknown scenario kind {kind!r} (known: {', '.join(sorted(kinds))})") from None
