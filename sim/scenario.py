"""Scenario files: TOML naming a built-in kind, its parameters, and the network to build.

    name = "dht-lookup"          # what the run is called in reports
    kind = "dht-lookup"          # which built-in scenario runs it
    seed = 1                     # default; `peerpost-sim run --seed` overrides

    [network]
    latency = "coordinates"      # or "fixed", or "pairwise"
    one_way = 0.02               # fixed: one-way delay (s)
    spread = 0.1                 # coordinates: plane width (s)
    access = [0.001, 0.01]       # coordinates: per-host access delay range (s)
    jitter = 0.0                 # coordinates: extra uniform delay (s)
    rtt = [0.02, 0.2]            # pairwise: each pair's round trip, uniform in [low, high] (s)
    loss = 0.0                   # datagram loss probability
    up = 1e6                     # default host uplink, bytes/s (absent: unlimited)
    down = 1e7                   # default host downlink, bytes/s

    [params]                     # the kind's own parameters (see its module)

Unknown keys are errors, so a typo never silently runs the default.
"""

from __future__ import annotations

import random
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from sim.network.latency import CoordinateLatency, FixedLatency, LatencyModel, PairwiseRtt
from sim.plots import Plot
from sim.simulation import Simulation

Progress = Callable[[int, int], None]


class ScenarioError(ValueError):
    """A scenario file or parameter is wrong; the message says which and why."""


_NETWORK_KEYS = {"latency", "one_way", "spread", "access", "jitter", "loss", "up", "down",
                 "rtt"}


@dataclass(frozen=True, slots=True)
class NetworkSpec:
    """How to build the simulated network."""

    latency: str = "coordinates"
    one_way: float = 0.02
    spread: float = 0.1
    access: tuple[float, float] = (0.001, 0.01)
    jitter: float = 0.0
    rtt: tuple[float, float] = (0.02, 0.2)
    loss: float = 0.0
    up: float | None = None
    down: float | None = None


@dataclass(frozen=True, slots=True)
class ScenarioSpec:
    """A parsed scenario file."""

    name: str
    kind: str
    seed: int
    network: NetworkSpec
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class ScenarioResult:
    """What a run produced: one CSV row per measured item, and a summary."""

    columns: list[str]
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    plots: list[Plot] = field(default_factory=list)


def _number(table: Mapping[str, Any], key: str, default: float | None, *, lo: float = 0.0,
            hi: float = float("inf")) -> float | None:
    value = table.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ScenarioError(f"network.{key} must be a number, got {value!r}")
    if not lo <= value <= hi:
        raise ScenarioError(f"network.{key} must be in [{lo}, {hi}], got {value!r}")
    return float(value)


def _interval(table: Mapping[str, Any], key: str, default: list[float]) -> tuple[float, float]:
    value = table.get(key, default)
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(x, int | float) and not isinstance(x, bool) and 0 <= x <= 10
                       for x in value)
            or value[0] > value[1]):
        raise ScenarioError(f"network.{key} must be [low, high] seconds")
    return (float(value[0]), float(value[1]))


def parse_network(table: Mapping[str, Any]) -> NetworkSpec:
    """Check the [network] table."""
    unknown = set(table) - _NETWORK_KEYS
    if unknown:
        raise ScenarioError(f"unknown network keys: {', '.join(sorted(unknown))}")
    latency = table.get("latency", "coordinates")
    if latency not in ("coordinates", "fixed", "pairwise"):
        raise ScenarioError("network.latency must be 'coordinates', 'fixed' or 'pairwise', "
                            f"not {latency!r}")
    access = _interval(table, "access", [0.001, 0.01])
    rtt = _interval(table, "rtt", [0.02, 0.2])
    return NetworkSpec(
        latency=latency,
        one_way=_number(table, "one_way", 0.02, hi=10) or 0.0,
        spread=_number(table, "spread", 0.1, hi=10) or 0.0,
        access=access,
        rtt=rtt,
        jitter=_number(table, "jitter", 0.0, hi=10) or 0.0,
        loss=_number(table, "loss", 0.0, hi=0.99) or 0.0,
        up=_number(table, "up", None, lo=1.0),
        down=_number(table, "down", None, lo=1.0),
    )


def parse_scenario(doc: Mapping[str, Any]) -> ScenarioSpec:
    """Check a decoded scenario document."""
    unknown = set(doc) - {"name", "kind", "seed", "network", "params"}
    if unknown:
        raise ScenarioError(f"unknown top-level keys: {', '.join(sorted(unknown))}")
    kind = doc.get("kind")
    if not isinstance(kind, str) or not kind:
        raise ScenarioError("'kind' must name a built-in scenario kind")
    name = doc.get("name", kind)
    seed = doc.get("seed", 1)
    if not isinstance(name, str) or not isinstance(seed, int) or isinstance(seed, bool):
        raise ScenarioError("'name' must be a string and 'seed' an integer")
    network = doc.get("network", {})
    params = doc.get("params", {})
    if not isinstance(network, dict) or not isinstance(params, dict):
        raise ScenarioError("[network] and [params] must be tables")
    return ScenarioSpec(name, kind, seed, parse_network(network), dict(params))


def builtin_names() -> list[str]:
    """Names of the scenario files shipped in sim/scenarios."""
    folder = resources.files("sim.scenarios")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_scenario(name_or_path: str) -> ScenarioSpec:
    """A built-in scenario by name, or a TOML file by path."""
    path = Path(name_or_path)
    try:
        if path.suffix == ".toml" or path.is_file():  # a results folder may share the name
            text = path.read_text()
        elif name_or_path in builtin_names():
            text = resources.files("sim.scenarios").joinpath(f"{name_or_path}.toml").read_text()
        else:
            raise ScenarioError(f"no scenario file or built-in named {name_or_path!r} "
                                f"(built-in: {', '.join(builtin_names())})")
        return parse_scenario(tomllib.loads(text))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ScenarioError(f"cannot read scenario {name_or_path!r}: {exc}") from None


def build_simulation(spec: NetworkSpec, seed: int) -> Simulation:
    """A Simulation whose latency model and loss follow `spec`."""
    latency: LatencyModel
    if spec.latency == "fixed":
        latency = FixedLatency(spec.one_way)
    elif spec.latency == "pairwise":
        latency = PairwiseRtt(seed, spec.rtt)
    else:
        latency = CoordinateLatency(random.Random(f"peerpost-sim/{seed}/coordinates"),
                                    spread=spec.spread, access=spec.access, jitter=spec.jitter)
    return Simulation(seed, latency=latency, loss=spec.loss)
