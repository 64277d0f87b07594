"""Scenario files: TOML in sections, checked against `sim/scenario.schema.json`.

    name = "nat-mix"
    seed = 1

    [topology]                    # hosts, domains, links, latency, loss, NAT mix
    hosts = 12
    up = { dist = "fixed", value = 5.0 }           # Mbit/s, drawn per host
    latency = { model = "pairwise", rtt = [0.02, 0.2] }
    nat = { none = 0.25, full_cone = 0.25, port_restricted = 0.25, symmetric = 0.25 }

    [workload]                    # what is sent, to whom, when
    kind = "files"
    size_mb = { dist = "fixed", value = 5.0 }

    [churn]                       # who leaves and comes back
    [adversaries]                 # Sybils, free riders
    [measure]                     # which metrics and plots

The workload's kind (and, for files, the number of domains and whether anyone churns)
picks the run that executes it: files on one domain ("family-video", or "churn" when hosts
churn), files across domains ("federation"), DHT lookups ("dht-lookup"), envelopes through
one server ("server-load"). Every key is either honoured by that run or refused at
validation with the reason: nothing is accepted and ignored.

`run(spec_or_doc, seed, overrides)` is the one entry point (the CLI and sweeps call it):
overrides are dotted key paths (`{"topology.hosts": 100}`) applied before validation.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import difflib
import hashlib
import json
import random
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from sim.network.host import Host
from sim.network.latency import CoordinateLatency, FixedLatency, LatencyModel, PairwiseRtt
from sim.network.nat import NatBehaviour
from sim.plots import Plot
from sim.simulation import Simulation

Progress = Callable[[int, int], None]

NAT_KINDS = ("none", "full_cone", "restricted", "port_restricted", "symmetric")
MBIT = 1e6 / 8  # bytes/s per Mbit/s


class ScenarioError(ValueError):
    """A scenario file or value is wrong; the message names the key path and why.

    `problems` holds each problem as one line ("topology.nat.symmetric: 1.5 is greater
    than the maximum of 1").
    """

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems if problems is not None else [message]


@dataclass(frozen=True, slots=True)
class ScenarioSpec:
    """A checked scenario: the document with every default filled in.

    `given`: the dotted leaf paths the author wrote (defaults excluded). `driver`: the run
    that executes it. `base`: the folder relative file paths are read from.
    """

    name: str
    seed: int
    doc: dict[str, Any]
    given: frozenset[str]
    driver: str
    base: Path = Path(".")

    @property
    def kind(self) -> str:
        """The run that executes the scenario (the name reports give it)."""
        return self.driver

    def get(self, path: str, default: Any = None) -> Any:
        """The value at a dotted key path, e.g. `spec.get("topology.hosts")`."""
        node: Any = self.doc
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    def file(self, path: str) -> Path:
        """A file the scenario names, relative to the scenario file's folder."""
        p = Path(path)
        return p if p.is_absolute() else self.base / p


@dataclass(slots=True)
class ScenarioResult:
    """What a run produced: one CSV row per measured item, a summary, plots, trace hash."""

    columns: list[str]
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    plots: list[Plot] = field(default_factory=list)
    trace_hash: str = ""  # BLAKE2b-128 over every simulation event; same seed, same hash
    seed: int = 0
    name: str = ""
    wall_s: float = 0.0
    callback_errors: int = 0
    virtual_s: float = 0.0  # virtual time at the end of the (first) simulation


# --- the schema -------------------------------------------------------------------------


@cache
def schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a scenario document."""
    text = resources.files("sim").joinpath("scenario.schema.json").read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def _path(parts: Any) -> str:
    return ".".join(str(p) for p in parts)


def _where(parts: Any, key: str | None = None) -> str:
    p = _path(parts)
    if key is None:
        return p or "(top level)"
    return f"{p}.{key}" if p else key


def _subschema(path: list[Any]) -> dict[str, Any]:
    node = schema()
    for part in path:
        props = node.get("properties", {})
        if isinstance(part, str) and part in props:
            node = props[part]
        elif isinstance(part, int) and "items" in node:
            node = node["items"]
        else:
            return {}
    return node


def _messages(error: Any) -> list[str]:
    """One line per problem of a jsonschema error, naming the key path."""
    path = list(error.absolute_path)
    if error.validator == "additionalProperties":
        known = sorted(_subschema(path).get("properties", {}))
        extra = sorted(set(error.instance) - set(known))
        out = []
        for key in extra:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else (
                f" (known: {', '.join(known)})" if known else "")
            out.append(f"{_where(path, key)}: unknown key{hint}")
        return out
    if error.validator == "required":
        missing = error.message.split("'")[1] if "'" in error.message else error.message
        return [f"{_where(path, missing)}: required"
                + (f" when dist = {error.instance.get('dist')!r}"
                   if isinstance(error.instance, dict) and "dist" in error.instance else "")
                + (f" when process = {error.instance.get('process')!r}"
                   if isinstance(error.instance, dict) and "process" in error.instance else "")]
    if error.validator == "anyOf":
        return [f"{_where(path)}: {error.instance!r} is not a number in [0, 0.9] "
                "or a list of them"]
    if error.validator == "type" and error.validator_value in ("object", "array"):
        # Say how to write it: a bare value where a table or a list belongs.
        node = _subschema(path)
        props = node.get("properties", {})
        shown = json.dumps(error.instance) if isinstance(error.instance, int | float | str) \
            else None
        if "dist" in props and isinstance(error.instance, int | float):
            return [f"{_where(path)}: {error.instance!r} is not a distribution: write "
                    f"{{ dist = \"fixed\", value = {shown} }}"]
        if "process" in props:
            return [f"{_where(path)}: {error.instance!r} is not an arrival process: write "
                    "e.g. { process = \"uniform\", window_s = 60.0 }"]
        if error.validator_value == "array" and node.get("minItems", 1) > 1:
            example = f", e.g. {json.dumps(node['default'])}" if "default" in node else ""
            return [f"{_where(path)}: {error.instance!r} is not a list of "
                    f"{node['minItems']}{example}"]
        if error.validator_value == "array" and shown is not None:
            return [f"{_where(path)}: {error.instance!r} is not a list: write [{shown}]"]
    if error.validator == "enum":
        options = ", ".join(repr(v) for v in error.validator_value)
        return [f"{_where(path)}: {error.instance!r} is not one of {options}"]
    return [f"{_where(path)}: {error.message}"]


def schema_problems(doc: Mapping[str, Any]) -> list[str]:
    """Every place `doc` breaks the JSON Schema, one line each, sorted by key path."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path])
    out: list[str] = []
    for error in errors:
        if error.validator in ("allOf", "if"):  # the branch's own errors come through
            continue
        for line in _messages(error):
            if line not in out:
                out.append(line)
    return out


def _defaults(node: dict[str, Any], value: Any) -> Any:
    """`value` with the schema's defaults filled in (objects: recursively)."""
    if node.get("type") != "object" or not isinstance(value, dict):
        return value
    out = dict(value)
    for key, sub in node.get("properties", {}).items():
        if key in out:
            out[key] = _defaults(sub, out[key])
        elif "default" in sub:
            out[key] = copy.deepcopy(sub["default"])
        elif sub.get("type") == "object" and "required" not in sub:
            out[key] = _defaults(sub, {})
    return out


def _leaves(value: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(value, dict):  # an empty table says nothing
        for k, v in value.items():
            yield from _leaves(v, f"{prefix}.{k}" if prefix else k)
    elif prefix:
        yield prefix


# --- which run executes a scenario, and what it honours ----------------------------------

_COMMON = ("name", "description", "seed", "simulation.signatures", "topology.hosts",
           "topology.up", "topology.down", "topology.latency", "topology.loss",
           "workload.kind", "measure.metrics", "measure.plots")
# driver -> (key paths it honours, beyond _COMMON; its plots)
DRIVERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "family-video": (("topology.nat", "workload.size_mb", "workload.online",
                      "workload.co_recipients", "adversaries.free_rider_share",
                      "adversaries.bad_chunk_share", "measure.sample_s", "topology.domains"),
                     ("completion-cdf", "completed-over-time", "bytes-by-path")),
    "churn": (("topology.nat", "workload.size_mb", "workload.online", "workload.co_recipients",
               "churn.share", "churn.session", "churn.off_time", "churn.until_s", "churn.trace",
               "adversaries.free_rider_share", "adversaries.bad_chunk_share", "measure.sample_s",
               "topology.domains"),
              ("completion-cdf", "bytes-by-path")),
    "federation": (("topology.domains", "workload.size_mb", "workload.messages",
                    "workload.recipients", "workload.send", "churn.server_outage"),
                   ("delivery-delay-cdf",)),
    "dht-lookup": (("workload.keys", "workload.lookups", "workload.healthy_lookups",
                    "workload.concurrency", "churn.dead_share", "churn.share",
                    "churn.session", "churn.off_time", "churn.until_s", "adversaries.sybil_share",
                    "adversaries.sybil_behaviour", "adversaries.sybil_placement", "dht"),
                   ("lookup-latency-cdf", "lookup-messages-cdf", "sybil-success",
                    "sybil-latency")),
    "server-load": (("workload.messages", "workload.size_bytes", "workload.online",
                     "workload.send", "workload.late_share", "measure.sample_s"),
                    ("push-latency-cdf", "queue-depth")),
}


def driver_of(doc: Mapping[str, Any]) -> str:
    """The run that executes a (schema-valid, defaulted) document."""
    kind = doc["workload"]["kind"]
    if kind == "lookups":
        return "dht-lookup"
    if kind == "envelopes":
        return "server-load"
    if doc["topology"]["domains"] > 1:
        return "federation"
    churn = doc.get("churn", {})
    return "churn" if churn.get("share", 0) > 0 or "trace" in churn else "family-video"


def _honoured(path: str, driver: str) -> bool:
    keys = _COMMON + DRIVERS[driver][0]
    return any(path == k or path.startswith(k + ".") for k in keys)


def _why_not(path: str) -> str:
    """Which runs honour a key, for the refusal's text."""
    runs = [d for d in DRIVERS if _honoured(path, d)]
    return f"only {' and '.join(runs)} runs use it" if runs else "no run uses it"


_CHURN_KEYS = ("churn.session", "churn.off_time", "churn.until_s")


def _table_of(doc: Mapping[str, Any], path: str) -> str:
    """A leaf inside a distribution or arrival-process table is reported as the table
    (`churn.session`, not its `dist` and `value` one line each)."""
    head, _, leaf = path.rpartition(".")
    node: Any = doc
    for part in head.split(".") if head else []:
        node = node.get(part) if isinstance(node, dict) else None
    if leaf and isinstance(node, dict) and ("dist" in node or "process" in node):
        return head
    return path


def _semantic_problems(doc: dict[str, Any], given: frozenset[str], driver: str,
                       base: Path) -> list[str]:
    out: list[str] = []
    what = {"family-video": "files on one domain", "churn": "files on one domain with churn",
            "federation": "files across domains", "dht-lookup": "lookups",
            "server-load": "envelopes"}[driver]
    for path in sorted({_table_of(doc, g) for g in given}):
        if not _honoured(path, driver):
            if driver == "family-video" and path in _CHURN_KEYS:
                out.append(f"{path}: nobody churns (churn.share is 0; a share above 0 or a "
                           "churn.trace makes this a churn run)")
                continue
            out.append(f"{path}: not used by this scenario (it runs as {driver}: {what}; "
                       f"{_why_not(path)})")
    top, work, churn, adv = doc["topology"], doc["workload"], doc["churn"], doc["adversaries"]
    shares = top["nat"]
    if "none" not in shares:  # public: the rest
        shares["none"] = round(1.0 - sum(shares[k] for k in NAT_KINDS[1:]), 12)
        if shares["none"] < 0:
            out.append(f"topology.nat: the NATed shares sum to {1 - shares['none']:g}, "
                       "more than 1")
    elif abs(sum(shares[k] for k in NAT_KINDS) - 1.0) > 1e-6:
        out.append(f"topology.nat: the shares sum to {sum(shares.values()):g}, not 1")
    for path in ("topology.up", "topology.down", "workload.size_mb", "workload.messages",
                 "churn.session", "churn.off_time"):
        section, key = path.split(".")
        d = doc[section].get(key)
        if isinstance(d, dict) and d.get("dist") == "uniform" and "low" in d and "high" in d \
                and d["low"] > d["high"]:
            out.append(f"{path}.low: {d['low']} is above high ({d['high']})")
    for key in ("rtt", "access"):
        lo, hi = top["latency"][key]
        if lo > hi:
            out.append(f"topology.latency.{key}: [low, high] with low {lo} above high {hi}")
    if top["latency"]["model"] == "matrix":
        if "file" not in top["latency"]:
            out.append("topology.latency.file: required when model = 'matrix'")
        else:
            try:
                _read_matrix(base / top["latency"]["file"])
            except ScenarioError as exc:
                out.append(f"topology.latency.file: {exc}")
    elif "file" in top["latency"]:
        out.append("topology.latency.file: only used when model = 'matrix'")
    if driver == "churn" and len(work["co_recipients"]) != 1:
        out.append("workload.co_recipients: a churn run takes one mode, e.g. [\"on\"]")
    if "trace" in churn:
        try:
            _read_churn_trace(base / churn["trace"], top["hosts"])
        except ScenarioError as exc:
            out.append(f"churn.trace: {exc}")
    if driver == "federation":
        outage = churn.get("server_outage")
        if outage is not None and outage["domain"] >= top["domains"]:
            out.append(f"churn.server_outage.domain: {outage['domain']} is not below "
                       f"topology.domains ({top['domains']})")
        others = (top["domains"] - 1) * top["hosts"]
        if work["recipients"] > others:
            out.append(f"workload.recipients: {work['recipients']} is more than the "
                       f"{others} users of the other domains")
    if driver == "server-load":
        msgs = work.get("messages")
        if msgs is not None and msgs.get("dist") != "fixed":
            out.append("workload.messages: envelopes take a fixed count per device")
        for key in ("online", "send"):
            if work[key]["process"] != "uniform":
                out.append(f"workload.{key}.process: envelopes take 'uniform' windows")
    if driver in ("family-video", "churn") and work["online"]["process"] == "poisson":
        out.append("workload.online.process: recipients come online 'at_start' or 'uniform'")
    out += _unused_parameters(doc, given, driver)
    if driver == "dht-lookup":
        impl = doc["dht"]["implementation"]
        sybil = adv["sybil_share"]
        if impl == "kademlia" and (sybil != 0.0 or "adversaries.sybil_behaviour" in given
                                   or "adversaries.sybil_placement" in given):
            out.append("adversaries.sybil_share: Sybils are modelled on the overlay DHT "
                       "only (dht.implementation = 'overlay')")
        if impl == "kademlia" and doc["simulation"]["signatures"] == "fast":
            out.append("simulation.signatures: the kademlia package signs nothing; "
                       "'fast' applies to the overlay DHT")
    elif doc["simulation"]["signatures"] == "fast":
        out.append("simulation.signatures: 'fast' is offered for lookups only (a node's "
                   "mail and transfers keep real signatures)")
    plots = doc["measure"].get("plots")
    if plots is not None:
        known = DRIVERS[driver][1]
        for i, name in enumerate(plots):
            if name not in known:
                out.append(f"measure.plots.{i}: {name!r} is not a plot of {driver} "
                           f"(its plots: {', '.join(known)})")
    return out


_LATENCY_KEYS = {"pairwise": {"rtt"}, "fixed": {"one_way"},
                 "coordinates": {"spread", "access", "jitter"}, "matrix": {"file"}}
_DIST_KEYS = {"fixed": {"value"}, "uniform": {"low", "high"}, "exponential": {"mean"},
              "weibull": {"scale", "shape"}, "lognormal": {"median", "sigma"}}
_PROCESS_KEYS = {"at_start": set(), "uniform": {"window_s"}, "poisson": {"rate_per_s"}}


def _unused_parameters(doc: dict[str, Any], given: frozenset[str], driver: str) -> list[str]:
    """Keys that are valid but that the choice next to them makes meaningless: rtt with a
    fixed latency, low with a fixed distribution, a churn session with nobody churning."""
    out: list[str] = []
    model = doc["topology"]["latency"]["model"]
    for key in sorted(set().union(*_LATENCY_KEYS.values())):
        if f"topology.latency.{key}" in given and key not in _LATENCY_KEYS[model]:
            wants = next(m for m, keys in _LATENCY_KEYS.items() if key in keys)
            if key != "file":  # a file without model = matrix is reported above
                out.append(f"topology.latency.{key}: only used when model = '{wants}' "
                           f"(model is '{model}')")
    tables = [("topology", "up"), ("topology", "down"), ("workload", "size_mb"),
              ("workload", "messages"), ("churn", "session"), ("churn", "off_time"),
              ("workload", "online"), ("workload", "send")]
    for section, key in tables:
        table = doc[section].get(key)
        if not isinstance(table, dict) or not any(
                g.startswith(f"{section}.{key}.") for g in given):
            continue
        kind, allowed = ((table["dist"], _DIST_KEYS[table["dist"]]) if "dist" in table
                         else (table["process"], _PROCESS_KEYS[table["process"]]))
        what = "dist" if "dist" in table else "process"
        for extra in sorted(set(table) - allowed - {what}):
            out.append(f"{section}.{key}.{extra}: not a parameter of {what} = '{kind}' "
                       f"(it takes {', '.join(sorted(allowed)) or 'none'})")
    churn = doc["churn"]
    if "trace" in churn:
        for key in ("share", "session", "off_time"):
            if f"churn.{key}" in given or any(g.startswith(f"churn.{key}.") for g in given):
                out.append(f"churn.{key}: churn.trace gives every change; leave {key} out")
    elif driver == "dht-lookup" and churn["share"] == 0:
        for key in ("session", "off_time", "until_s"):
            if f"churn.{key}" in given or any(g.startswith(f"churn.{key}.") for g in given):
                out.append(f"churn.{key}: nobody churns (churn.share is 0)")
    if driver == "dht-lookup":
        shares = doc["adversaries"]["sybil_share"]
        if not any(shares if isinstance(shares, list) else [shares]):
            for key in ("sybil_behaviour", "sybil_placement"):
                if f"adversaries.{key}" in given:
                    out.append(f"adversaries.{key}: there are no Sybils "
                               "(adversaries.sybil_share is 0)")
    return out


def parse_scenario(doc: Mapping[str, Any], *, base: Path | None = None,
                   default_name: str = "scenario") -> ScenarioSpec:
    """Check a decoded scenario document; raise ScenarioError naming every problem."""
    problems = schema_problems(doc)
    if problems:
        raise ScenarioError("\n".join(problems), problems)
    given = frozenset(_leaves(dict(doc)))
    full: dict[str, Any] = _defaults(schema(), copy.deepcopy(dict(doc)))
    driver = driver_of(full)
    problems = _semantic_problems(full, given, driver, base or Path("."))
    if problems:
        raise ScenarioError("\n".join(problems), problems)
    return ScenarioSpec(full.get("name", default_name), full["seed"], full, given, driver,
                        base or Path("."))


def apply_overrides(doc: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `doc` with each dotted key path set (tables made as needed)."""
    out = copy.deepcopy(dict(doc))
    for path, value in overrides.items():
        parts = path.split(".")
        if not all(parts):
            raise ScenarioError(f"{path}: not a key path (section.key)")
        node = out
        for i, part in enumerate(parts[:-1]):
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ScenarioError(f"{'.'.join(parts[:i + 1])}: is a value, not a table")
            node = nxt
        node[parts[-1]] = value
    return out


def builtin_names() -> list[str]:
    """Names of the scenario files shipped in sim/scenarios."""
    folder = resources.files("sim.scenarios")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def scenario_source(name_or_path: str) -> tuple[str, str]:
    """(where it came from, its text): a file path, or "sim/scenarios/NAME.toml" for a
    built-in. Citations give this place and the text's SHA-256."""
    path = Path(name_or_path)
    try:
        if path.suffix == ".toml" or path.is_file():  # a results folder may share the name
            return str(path), path.read_text()
        if name_or_path in builtin_names():
            text = resources.files("sim.scenarios").joinpath(f"{name_or_path}.toml").read_text()
            return f"sim/scenarios/{name_or_path}.toml", text
    except OSError as exc:
        hint = (f" (the built-in is named {path.stem!r}, without .toml)"
                if path.stem in builtin_names() and not path.exists() else "")
        raise ScenarioError(f"cannot read scenario {name_or_path!r}: "
                            f"{exc.strerror or exc}{hint}") from None
    raise ScenarioError(f"no scenario file or built-in named {name_or_path!r} "
                        f"(built-in: {', '.join(builtin_names())})")


def load_document(name_or_path: str) -> tuple[dict[str, Any], Path, str]:
    """(document, folder for relative paths, default name) of a built-in or a file."""
    where, text = scenario_source(name_or_path)
    builtin = where.startswith("sim/scenarios/") and not Path(name_or_path).suffix
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"cannot read scenario {name_or_path!r}: {exc}") from None
    if builtin:
        return doc, Path("."), name_or_path
    return doc, Path(where).parent, Path(where).stem


def load_scenario(name_or_path: str,
                  overrides: Mapping[str, Any] | None = None) -> ScenarioSpec:
    """A built-in scenario by name, or a TOML file by path, checked."""
    doc, base, stem = load_document(name_or_path)
    if overrides:
        doc = apply_overrides(doc, overrides)
    return parse_scenario(doc, base=base, default_name=stem)


# --- building the network ------------------------------------------------------------------


def _read_matrix(path: Path) -> list[list[float]]:
    try:
        with path.open(newline="") as f:
            rows = [[float(x) for x in row] for row in csv.reader(f) if row]
    except OSError as exc:
        raise ScenarioError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ScenarioError(f"{path}: not a CSV of numbers ({exc})") from None
    n = len(rows)
    if n == 0 or any(len(r) != n for r in rows):
        raise ScenarioError(f"{path}: want N rows of N delays, got {n} rows of "
                            f"{sorted({len(r) for r in rows})} values")
    if any(not 0 <= v <= 10 for r in rows for v in r):
        raise ScenarioError(f"{path}: delays are seconds in [0, 10]")
    return rows


class MatrixLatency:
    """One-way delays between regions from a matrix; each host lands in a random region."""

    def __init__(self, matrix: list[list[float]], rng: random.Random) -> None:
        self.matrix = matrix
        self._rng = rng
        self._region: dict[int, int] = {}

    def place(self, host: Host) -> None:
        """Put `host` in a region drawn uniformly."""
        self._region[host.index] = self._rng.randrange(len(self.matrix))

    def one_way(self, a: Host, b: Host) -> float:
        """The matrix entry for the two hosts' regions."""
        return self.matrix[self._region[a.index]][self._region[b.index]]


def build_simulation(spec: ScenarioSpec, seed: int) -> Simulation:
    """A Simulation whose latency model and loss follow `spec.topology`."""
    lat = spec.doc["topology"]["latency"]
    latency: LatencyModel
    if lat["model"] == "fixed":
        latency = FixedLatency(lat["one_way"])
    elif lat["model"] == "pairwise":
        latency = PairwiseRtt(seed, tuple(lat["rtt"]))
    elif lat["model"] == "matrix":
        latency = MatrixLatency(_read_matrix(spec.file(lat["file"])),
                                random.Random(f"peerpost-sim/{seed}/regions"))
    else:
        latency = CoordinateLatency(random.Random(f"peerpost-sim/{seed}/coordinates"),
                                    spread=lat["spread"], access=tuple(lat["access"]),
                                    jitter=lat["jitter"])
    return Simulation(seed, latency=latency, loss=spec.doc["topology"]["loss"])


@contextlib.contextmanager
def variant(sim: Simulation, spec: ScenarioSpec, n: int,
            digests: list[str]) -> Iterator[Simulation]:
    """The simulation for the `n`-th of several runs in one scenario (a mode, a Sybil
    share): `sim` itself first, then a fresh one of the same spec and seed. A run that
    ends normally adds its trace digest to `digests` and its errors to `sim`'s; a fresh
    one is closed either way."""
    s = sim if n == 0 else build_simulation(spec, sim.seed)
    if s is not sim and sim.on_variant is not None:
        sim.on_variant(s)
    if s is sim:
        yield s
        digests.append(s.trace.digest())
        return
    with s:  # closed either way (abandoned on Ctrl-C)
        yield s
        digests.append(s.trace.digest())
        sim.errors.extend(s.errors)


def draw(dist: Mapping[str, Any], rng: random.Random) -> float:
    """One draw of a distribution table (`{dist = "uniform", low = 1, high = 4}`)."""
    kind = dist["dist"]
    if kind == "fixed":
        return float(dist["value"])
    if kind == "uniform":
        return rng.uniform(dist["low"], dist["high"])
    if kind == "exponential":
        return rng.expovariate(1.0 / dist["mean"])
    if kind == "weibull":
        return rng.weibullvariate(dist["scale"], dist["shape"])
    if kind == "lognormal":
        import math

        return rng.lognormvariate(math.log(dist["median"]), dist["sigma"])
    raise ScenarioError(f"unknown distribution {kind!r}")


def draw_int(dist: Mapping[str, Any], rng: random.Random) -> int:
    """An integer draw: fixed, or uniform over low..high inclusive."""
    if dist["dist"] == "uniform":
        return rng.randint(int(dist["low"]), int(dist["high"]))
    return int(dist["value"])


def times(process: Mapping[str, Any], n: int, rng: random.Random) -> list[float]:
    """`n` event times (s) of an arrival process, in draw order."""
    kind = process["process"]
    if kind == "at_start":
        return [0.0] * n
    if kind == "uniform":
        return [rng.uniform(0, process["window_s"]) for _ in range(n)]
    out, t = [], 0.0
    for _ in range(n):
        t += rng.expovariate(process["rate_per_s"])
        out.append(t)
    return out


def window(process: Mapping[str, Any]) -> float:
    """How long an arrival process's window is (uniform: window_s; otherwise 0)."""
    return float(process.get("window_s", 0.0)) if process["process"] == "uniform" else 0.0


def _nat_behaviour(kind: str) -> NatBehaviour | None:
    return {"none": None, "full_cone": NatBehaviour.full_cone(),
            "restricted": NatBehaviour.restricted_cone(),
            "port_restricted": NatBehaviour.port_restricted_cone(),
            "symmetric": NatBehaviour.symmetric()}[kind]


def nat_plan(spec: ScenarioSpec, n: int, rng: random.Random) -> list[str]:
    """NAT kinds for `n` peer hosts: the shares' counts (largest remainder), shuffled."""
    shares = spec.doc["topology"]["nat"]
    exact = [(shares[k] * n, k) for k in NAT_KINDS]
    counts = {k: int(x) for x, k in exact}
    left = n - sum(counts.values())
    for _, k in sorted(exact, key=lambda e: (-(e[0] - int(e[0])), NAT_KINDS.index(e[1])))[:left]:
        counts[k] += 1
    kinds = [k for k in NAT_KINDS for _ in range(counts[k])]
    rng.shuffle(kinds)
    return kinds


class Peers:
    """Adds peer hosts as `[topology]` says: links drawn per host, NATs by the mix."""

    def __init__(self, sim: Simulation, spec: ScenarioSpec, count: int) -> None:
        self.sim = sim
        self.spec = spec
        self._rng = sim.rng_for("topology/links")
        self._nats = nat_plan(spec, count, sim.rng_for("topology/nat"))
        self.nat_of: dict[str, str] = {}

    def rate(self, key: str) -> float | None:
        """A link rate in bytes/s drawn from topology.up/down (None: unlimited)."""
        dist = self.spec.doc["topology"].get(key)
        return None if dist is None else max(1.0, draw(dist, self._rng) * MBIT)

    def add(self, name: str, *, nat: bool = True) -> Host:
        """One peer host; `nat=False` keeps it public (not counted in the mix)."""
        kind = self._nats.pop(0) if nat and self._nats else "none"
        self.nat_of[name] = kind
        return self.sim.add_host(name, up=self.rate("up"), down=self.rate("down"),
                                 nat=_nat_behaviour(kind))


def _read_churn_trace(path: Path, hosts: int) -> list[tuple[int, float, bool]]:
    try:
        with path.open(newline="") as f:
            rows = [r for r in csv.reader(f) if r and not r[0].startswith("#")]
    except OSError as exc:
        raise ScenarioError(f"cannot read {path}: {exc.strerror}") from None
    if rows and rows[0][0].strip() == "host":
        rows = rows[1:]
    out = []
    for n, row in enumerate(rows, 1):
        try:
            host, at, online = int(row[0]), float(row[1]), int(row[2])
        except (ValueError, IndexError):
            raise ScenarioError(f"{path} line {n}: want host,at_s,online") from None
        if not 0 <= host < hosts or at < 0 or online not in (0, 1):
            raise ScenarioError(f"{path} line {n}: host in [0, {hosts}), at_s >= 0, "
                                "online 0 or 1")
        out.append((host, at, bool(online)))
    return out


def churn_trace(spec: ScenarioSpec) -> list[tuple[int, float, bool]]:
    """The churn trace file's events (recipient index, time, online)."""
    return _read_churn_trace(spec.file(spec.doc["churn"]["trace"]),
                             spec.doc["topology"]["hosts"])


def combine_hashes(digests: list[str]) -> str:
    """One trace hash for a run made of several simulations (modes, Sybil shares)."""
    if len(digests) == 1:
        return digests[0]
    return hashlib.blake2b("/".join(digests).encode(), digest_size=16).hexdigest()


# --- running ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_logs() -> Iterator[None]:
    """For one run only: the levels are put back after it, so a program (or a test) that
    runs a scenario in its own process logs as before once it is done."""
    import logging

    # Lost RPCs are what a scenario measures; the packages would print each one. The real
    # nodes and servers log as they do at home (a node waiting for its server, a source
    # gone): hundreds of hosts would bury the progress bar, and the CSV has the outcome.
    levels = {"kademlia": logging.CRITICAL, "rpcudp": logging.CRITICAL,
              "peerpost": logging.ERROR, "overlay": logging.ERROR,
              "rendezvous": logging.ERROR, "aioice": logging.ERROR}
    before = {name: logging.getLogger(name).level for name in levels}
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    try:
        yield
    finally:
        for name, level in before.items():
            logging.getLogger(name).setLevel(level)


def run(spec_or_doc: ScenarioSpec | Mapping[str, Any] | str, seed: int | None = None,
        overrides: Mapping[str, Any] | None = None, *, progress: Progress | None = None,
        on_simulation: Callable[[Simulation], None] | None = None,
        base: Path | None = None) -> ScenarioResult:
    """Run a scenario: a spec, a document, or a built-in name / file path.

    `seed` (None: the scenario's), `overrides` dotted key paths applied before checking;
    `base`: the folder a document's relative file paths (churn trace, latency matrix) are
    read from (a spec or a file knows its own).
    Deterministic: the same scenario, overrides and seed give the same rows, summary and
    `trace_hash` in any process. `on_simulation` sees each simulation as it starts (a run
    of several modes or Sybil shares has one each; progress bars show the running one).
    """
    from sim.scenarios import runner_for

    if isinstance(spec_or_doc, str):
        spec = load_scenario(spec_or_doc, overrides)
    elif isinstance(spec_or_doc, ScenarioSpec):
        spec = spec_or_doc
        if overrides:
            spec = parse_scenario(apply_overrides(_given_doc(spec), overrides), base=spec.base,
                                  default_name=spec.name)
    else:
        spec = parse_scenario(apply_overrides(spec_or_doc, overrides or {}), base=base)
    seed = spec.seed if seed is None else seed
    runner = runner_for(spec.driver)
    fast = spec.doc["simulation"]["signatures"] == "fast"
    wall = time.perf_counter()
    with _quiet_logs(), build_simulation(spec, seed) as sim:
        if on_simulation is not None:
            on_simulation(sim)
            sim.on_variant = on_simulation
        if fast:
            from sim.fastsig import fast_signatures

            with fast_signatures():
                result = runner(sim, spec, progress)
        else:
            result = runner(sim, spec, progress)
        if not result.trace_hash:
            result.trace_hash = sim.trace.digest()
        result.callback_errors = len(sim.errors)
        result.virtual_s = round(sim.now, 3)
    result.wall_s = round(time.perf_counter() - wall, 3)
    result.seed, result.name = seed, spec.name
    if fast:
        note = "fast (keyed BLAKE2b stand-in for Ed25519 in the DHT; not deployable)"
        result.summary = {"signatures": note} | result.summary
        result.plots = [replace(p, title=f"{p.title} [fast signatures]")
                        for p in result.plots]
    _select(spec, result)
    result.summary["trace_hash"] = result.trace_hash
    return result


def _given_doc(spec: ScenarioSpec) -> dict[str, Any]:
    """The document as written (defaults left out), rebuilt from `given`."""
    out: dict[str, Any] = {}
    for path in spec.given:
        value = spec.get(path)
        out = apply_overrides(out, {path: value})
    return out


def _select(spec: ScenarioSpec, result: ScenarioResult) -> None:
    """Keep the metrics and plots [measure] asks for."""
    measure = spec.doc["measure"]
    if "metrics" in measure:
        missing = [m for m in measure["metrics"] if m not in result.summary]
        if missing:
            raise ScenarioError(
                f"measure.metrics: {', '.join(map(repr, missing))} not produced by this run "
                f"(it produces: {', '.join(result.summary)})")
        result.summary = {k: v for k, v in result.summary.items() if k in measure["metrics"]}
    if "plots" in measure:
        result.plots = [p for p in result.plots if p.name in measure["plots"]]


# --- the schema as a table, for docs/simulator.md --------------------------------------------


def _type_of(node: dict[str, Any]) -> str:
    if "enum" in node:
        return " \\| ".join(f'`"{v}"`' for v in node["enum"])
    if "anyOf" in node:
        return " or ".join(_type_of(n) for n in node["anyOf"])
    t = node.get("type", "")
    if t == "array":
        return f"array of {_type_of(node.get('items', {}))}"
    if t == "object" and "dist" in node.get("properties", {}):
        return "distribution"
    if t == "object" and "process" in node.get("properties", {}):
        return "arrival process"
    return str(t)


def _range_of(node: dict[str, Any]) -> str:
    if "anyOf" in node:
        return next((r for r in map(_range_of, node["anyOf"]) if r), "")
    if node.get("type") == "array" and "items" in node:
        inner = _range_of(node["items"])
        n = node.get("minItems")
        return (f"{n} items" if n and n == node.get("maxItems") else "") + (
            (", each " if n and n == node.get("maxItems") else "each ") + inner if inner else "")
    lo = node.get("minimum")
    xlo = node.get("exclusiveMinimum")
    hi = node.get("maximum")
    if "dist" in node.get("properties", {}):
        return "dist = " + ", ".join(node["properties"]["dist"]["enum"])
    if "process" in node.get("properties", {}):
        return "process = " + ", ".join(node["properties"]["process"]["enum"])
    if lo is None and xlo is None and hi is None:
        return ""
    left = f"[{lo:g}" if lo is not None else (f"({xlo:g}" if xlo is not None else "(-inf")
    return f"{left}, {hi:g}]" if hi is not None else f"{left}, inf)"


def _default_of(node: dict[str, Any]) -> str:
    if "default" not in node:
        return ""
    return "`" + json.dumps(node["default"]).replace("|", "\\|") + "`"


def schema_table() -> str:
    """Markdown: one row per key of the schema (path, type, range, default, meaning)."""
    lines = ["| key | type | range / values | default | meaning |",
             "|---|---|---|---|---|"]

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, sub in node.get("properties", {}).items():
            path = f"{prefix}{key}"
            if sub.get("type") == "object" and not ({"dist", "process"}
                                                    & set(sub.get("properties", {}))):
                lines.append(f"| **`[{path}]`** | table | | | {sub.get('description', '')} |")
                walk(sub, f"{path}.")
                continue
            lines.append(f"| `{path}` | {_type_of(sub)} | {_range_of(sub)} | "
                         f"{_default_of(sub)} | {sub.get('description', '')} |")

    walk(schema(), "")
    return "\n".join(lines)


def distribution_table() -> str:
    """Markdown: the parameters each distribution takes."""
    node = schema()["properties"]["churn"]["properties"]["session"]
    lines = ["| dist | keys |", "|---|---|"]
    for cond in node["allOf"]:
        kind = cond["if"]["properties"]["dist"]["const"]
        need = cond["then"]["required"]
        lines.append(f"| `{kind}` | " + ", ".join(
            f"`{k}` ({node['properties'][k]['description'].partition(': ')[2]})"
            for k in need) + " |")
    return "\n".join(lines)
