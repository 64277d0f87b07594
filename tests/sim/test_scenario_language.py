"""The scenario language: the schema names the offending key, every built-in validates,
nat-mix and sybil measure what they claim, and docs/simulator.md shows the schema as it is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sim.cli import main
from sim.scenario import (
    ScenarioError,
    builtin_names,
    distribution_table,
    load_scenario,
    parse_scenario,
    run,
    schema_table,
)

ROOT = Path(__file__).resolve().parents[2]
LOOKUPS: dict[str, Any] = {"workload": {"kind": "lookups"}}


def _problems(doc: dict[str, Any]) -> list[str]:
    with pytest.raises(ScenarioError) as caught:
        parse_scenario(doc)
    return caught.value.problems


def test_a_wrong_key_type_or_range_is_named_by_its_path() -> None:
    assert _problems({"workload": {"kind": "files", "sizee": 3}}) == [
        "workload.sizee: unknown key (did you mean size_mb?)"]
    assert _problems({"workload": {"kind": "lookups"}, "topology": {"hosts": "ten"}}) == [
        "topology.hosts: 'ten' is not of type 'integer'"]
    assert _problems({"workload": {"kind": "files"},
                      "topology": {"nat": {"none": 0.0, "symmetric": 1.5}}}) == [
        "topology.nat.symmetric: 1.5 is greater than the maximum of 1"]
    assert _problems({"workload": {"kind": "lookups"}, "topology": {
        "up": {"dist": "uniform", "low": 1.0}}}) == [
        "topology.up.high: required when dist = 'uniform'"]
    assert _problems({"workload": {"kind": "gossip"}}) == [
        "workload.kind: 'gossip' is not one of 'files', 'lookups', 'envelopes'"]
    # A bare value where a table or a list belongs: how to write it.
    assert _problems({"workload": {"kind": "files", "size_mb": 5,
                                   "co_recipients": "on"},
                      "topology": {"latency": {"rtt": 0.1}}}) == [
        "topology.latency.rtt: 0.1 is not a list of 2, e.g. [0.02, 0.2]",
        "workload.co_recipients: 'on' is not a list: write [\"on\"]",
        "workload.size_mb: 5 is not a distribution: write { dist = \"fixed\", value = 5 }"]


def test_a_key_the_selected_run_would_ignore_is_refused() -> None:
    problems = _problems({"workload": {"kind": "files"}, "adversaries": {"sybil_share": 0.2}})
    assert problems == ["adversaries.sybil_share: not used by this scenario (it runs as "
                        "family-video: files on one domain; only dht-lookup runs use it)"]
    assert _problems({"workload": {"kind": "files"},
                      "topology": {"nat": {"none": 0.5, "symmetric": 0.25}}}) == [
        "topology.nat: the shares sum to 0.75, not 1"]
    assert _problems({"workload": {"kind": "files"},
                      "topology": {"nat": {"full_cone": 0.5, "symmetric": 0.75}}}) == [
        "topology.nat: the NATed shares sum to 1.25, more than 1"]
    # Without `none`, the public hosts are the rest: a sweep can vary one share alone.
    spec = parse_scenario({"workload": {"kind": "files"}, "topology": {"nat": {
        "symmetric": 0.25}}})
    assert spec.get("topology.nat.none") == 0.75
    assert _problems(LOOKUPS | {"measure": {"plots": ["queue-depth"]}})[0].startswith(
        "measure.plots.0: 'queue-depth' is not a plot of dht-lookup")
    assert _problems({"workload": {"kind": "files"}, "simulation": {"signatures": "fast"}})[
        0].startswith("simulation.signatures: 'fast' is offered for lookups only")
    # A parameter that the choice beside it makes meaningless is refused too.
    assert _problems(LOOKUPS | {"topology": {"latency": {"model": "fixed", "rtt": [0, 1]}}}) == [
        "topology.latency.rtt: only used when model = 'pairwise' (model is 'fixed')"]
    assert _problems(LOOKUPS | {"topology": {"up": {"dist": "fixed", "value": 5, "low": 1}}}) == [
        "topology.up.low: not a parameter of dist = 'fixed' (it takes value)"]
    assert _problems(LOOKUPS | {"churn": {"session": {"dist": "exponential", "mean": 9}}}) == [
        "churn.session: nobody churns (churn.share is 0)"]
    # On files too, as one line for the table, saying what makes it a churn run.
    assert _problems({"workload": {"kind": "files"},
                      "churn": {"session": {"dist": "fixed", "value": 3}}}) == [
        "churn.session: nobody churns (churn.share is 0; a share above 0 or a churn.trace "
        "makes this a churn run)"]
    assert _problems(LOOKUPS | {"adversaries": {"sybil_behaviour": "lie"}}) == [
        "adversaries.sybil_behaviour: there are no Sybils (adversaries.sybil_share is 0)"]


def test_validate_prints_ok_or_the_key_path_and_exits_non_zero(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", *builtin_names()]) == 0
    out = capsys.readouterr().out
    assert out.count(": OK (runs as") == len(builtin_names())
    bad = tmp_path / "bad.toml"
    bad.write_text('[workload]\nkind = "files"\n[topology.nat]\nnone = 0.0\nsymmetric = 1.5\n')
    assert main(["validate", str(bad)]) == 2
    assert "topology.nat.symmetric: 1.5 is greater than the maximum of 1" in \
        capsys.readouterr().out
    assert main(["validate", "dht-lookup", "--set", "churn.dead_share=0.95"]) == 2
    assert "churn.dead_share: 0.95 is greater than the maximum of 0.9" in \
        capsys.readouterr().out


def test_every_built_in_runs_as_what_it_says() -> None:
    runs = {name: load_scenario(name).driver for name in builtin_names()}
    assert runs == {"churn": "churn", "dht-lookup": "dht-lookup", "family-video": "family-video",
                    "federation": "federation", "nat-mix": "family-video",
                    "server-load": "server-load", "sybil": "dht-lookup"}


SMALL_NAT = {"topology.hosts": 5, "workload.size_mb.value": 1.0,
             "workload.online.window_s": 5.0}


def test_nat_mix_all_symmetric_goes_through_the_relay_all_public_goes_direct() -> None:
    relayed = run("nat-mix", overrides=SMALL_NAT | {
        "topology.nat": {"none": 0.0, "symmetric": 1.0}})
    s = relayed.summary
    assert s["on: completed"] == "5/5" and s["on: all bytes equal"]
    assert s["on: share via relay"] == 1.0
    assert s["on: relay MB"] >= 5.0 and s["on: relay peak concurrent circuits"] >= 1
    assert all(r["relay_mb"] == 1.0 and r["direct_mb"] == r["punch_mb"] == r["quic_mb"]
               == r["webrtc_mb"] == 0
               for r in relayed.rows)
    direct = run("nat-mix", overrides=SMALL_NAT | {"topology.nat": {"none": 1.0}})
    assert direct.summary["on: share via tcp"] == 1.0
    assert direct.summary["on: relay MB"] == 0.0


def test_nat_mix_reports_each_path_by_nat_kind_and_is_deterministic() -> None:
    first = run("nat-mix", overrides=SMALL_NAT | {"topology.hosts": 8})
    s = first.summary
    assert s["on: completed"] == "8/8" and s["on: all bytes equal"]
    assert s["nat mix (hosts)"] == "none 3, full_cone 2, port_restricted 2, symmetric 2"
    assert {k for k in s if k.endswith(": share via direct/punch/quic/webrtc/relay")} == {
        f"on: {k}: share via direct/punch/quic/webrtc/relay"
        for k in ("none", "full_cone", "port_restricted", "symmetric")}
    assert abs(sum(s[f"on: share via {p}"]
                   for p in ("tcp", "tcp-punch", "quic", "webrtc", "relay")) - 1) < 1e-3
    assert s["on: share via tcp-punch"] > 0  # the cone pairs meet in a TCP punch
    again = run("nat-mix", overrides=SMALL_NAT | {"topology.hosts": 8})
    assert again.trace_hash == first.trace_hash and again.summary == s


@pytest.mark.parametrize("behaviour", ["eclipse", "drop", "lie"])
def test_sybils_lower_lookup_success_as_their_share_grows(behaviour: str) -> None:
    result = run("sybil", overrides={
        "topology.hosts": 80, "workload.lookups": 30, "dht.bootstrap_batch": 20,
        "adversaries.sybil_share": [0.0, 0.6], "adversaries.sybil_behaviour": behaviour})
    s = result.summary
    assert s["sybil 0: success_rate"] == 1.0
    assert s["sybil 0.6: sybils"] == 48
    if behaviour == "eclipse":
        # Sybils with random ids: the record also sits on the honest nodes among the k
        # closest, and alpha parallel queries reach them; the lookups take longer.
        assert s["sybil 0.6: success_rate"] <= 1.0
        assert s["sybil 0.6: lookup_p90_s"] >= s["sybil 0: lookup_p90_s"]
    else:
        assert s["sybil 0.6: success_rate"] < 0.9
    assert {p.name for p in result.plots} == {"sybil-success", "sybil-latency",
                                              "lookup-latency-cdf"}
    assert {r["sybil_share"] for r in result.rows} == {0.0, 0.6}


def test_fast_signatures_say_so_and_find_the_same_providers() -> None:
    small = {"topology.hosts": 40, "workload.lookups": 10, "workload.keys": 3,
             "workload.healthy_lookups": 0, "dht.bootstrap_batch": 10}
    fast = run("dht-lookup", overrides=small | {"simulation.signatures": "fast"})
    real = run("dht-lookup", overrides=small)
    assert fast.summary["signatures"].startswith("fast (keyed BLAKE2b")
    assert all("[fast signatures]" in p.title for p in fast.plots)
    assert "signatures" not in real.summary
    assert fast.summary["found"] == real.summary["found"] == 10
    import threading

    from crypto.identity import DeviceIdentity, verify
    from sim.fastsig import fast_sign, fast_signatures

    alice = DeviceIdentity.from_seed(bytes(32))
    verify(alice.public.verify_key, b"t", b"m", alice.sign(b"t", b"m"))  # Ed25519 again
    # Another thread's fast run does not change this thread's signatures.
    inside, go_on = threading.Event(), threading.Event()

    def fast_run() -> None:
        with fast_signatures():
            assert alice.sign(b"t", b"m") == fast_sign(alice, b"t", b"m")
            inside.set()
            go_on.wait(10)

    worker = threading.Thread(target=fast_run)
    worker.start()
    assert inside.wait(10)
    verify(alice.public.verify_key, b"t", b"m", alice.sign(b"t", b"m"))
    go_on.set()
    worker.join()


def test_the_docs_show_the_schema_as_shipped() -> None:
    doc = (ROOT / "docs" / "simulator.md").read_text()
    assert schema_table() in doc, "paste sim.scenario.schema_table() into the doc"
    assert distribution_table() in doc
    for heading in ("## Sweeps", "## Fidelity", "## Citing a figure", "## Determinism"):
        assert heading in doc


def test_bad_chunk_sources_are_banned_and_everyone_still_gets_the_bytes() -> None:
    result = run("nat-mix", overrides=SMALL_NAT | {
        "topology.hosts": 8, "topology.nat": {"none": 1.0},
        "adversaries.bad_chunk_share": 0.25, "adversaries.free_rider_share": 0.25})
    s = result.summary
    assert s["on: completed"] == "8/8" and s["on: all bytes equal"]
    assert s["bad-chunk sources"] == 2 and s["free riders"] == 2
    assert s["on: sources banned (by recipients)"] >= 1
    assert sum(r["bad_chunks"] for r in result.rows) == 2
    assert not any(r["bad_chunks"] and r["free_rider"] for r in result.rows)


def test_a_churn_trace_and_a_latency_matrix_are_followed(tmp_path: Path) -> None:
    (tmp_path / "trace.csv").write_text("host,at_s,online\n0,1,0\n0,5,1\n1,2,0\n1,90,1\n")
    (tmp_path / "regions.csv").write_text("0.005,0.04\n0.04,0.01\n")
    scenario = tmp_path / "traced.toml"
    scenario.write_text(
        '[topology]\nhosts = 4\nlatency = { model = "matrix", file = "regions.csv" }\n'
        'up = { dist = "fixed", value = 2.0 }\n'
        '[workload]\nkind = "files"\nsize_mb = { dist = "fixed", value = 1.0 }\n'
        'online = { process = "at_start" }\n'
        '[churn]\ntrace = "trace.csv"\nuntil_s = 30.0\n')
    result = run(str(scenario))
    s = result.summary
    assert s["completed"] == "4/4" and s["all bytes equal"]
    assert s["churning"] == 2 and s["host_flips"] == 3  # host 1's return at 90 s is past 30
    (late,) = [r for r in result.rows if r["recipient"] == "r1"]
    assert late["completed_at_s"] > 30  # back only when churn ended
    (tmp_path / "regions.csv").write_text("0.005,0.04\n0.04\n")
    problems = _problems_of(scenario)
    assert problems[0].startswith("topology.latency.file: ")
    assert "want N rows of N delays" in problems[0]


def _problems_of(path: Path) -> list[str]:
    with pytest.raises(ScenarioError) as caught:
        load_scenario(str(path))
    return caught.value.problems


def test_a_message_to_several_recipients_across_domains_reaches_each_once() -> None:
    doc: dict[str, Any] = {"topology": {"domains": 2, "hosts": 2},
           "workload": {"kind": "files", "messages": {"dist": "fixed", "value": 1},
                        "recipients": 2, "size_mb": {"dist": "fixed", "value": 0.2},
                        "send": {"process": "uniform", "window_s": 10.0}}}
    result = run(doc)
    s = result.summary
    assert s["messages"] == 4 and s["recipients per message"] == 2
    assert s["delivered"] == "8/8" and s["delivered exactly once"] and s["all bytes equal"]
    assert sorted(r["message"] for r in result.rows) == sorted(
        [f"m{i}" for i in range(4)] * 2)
    assert _problems(doc | {"workload": doc["workload"] | {"recipients": 3}}) == [
        "workload.recipients: 3 is more than the 2 users of the other domains"]


def test_measure_keeps_the_metrics_asked_for_and_refuses_one_never_produced() -> None:
    small = {"topology.hosts": 30, "workload.lookups": 5, "workload.keys": 2,
             "dht.bootstrap_batch": 10}
    result = run("dht-lookup", overrides=small | {
        "measure.metrics": ["success_rate", "lookup_p50_s"], "measure.plots": []})
    assert list(result.summary) == ["success_rate", "lookup_p50_s", "trace_hash"]
    assert result.plots == []
    with pytest.raises(ScenarioError, match=r"measure\.metrics: 'succes_rate' not produced"):
        run("dht-lookup", overrides=small | {"measure.metrics": ["succes_rate"]})


def test_the_shipped_schema_is_a_valid_json_schema_and_every_built_in_fits_it() -> None:
    import tomllib
    from importlib import resources

    import jsonschema

    from sim.scenario import schema, schema_problems

    jsonschema.Draft202012Validator.check_schema(schema())
    for name in builtin_names():
        text = resources.files("sim.scenarios").joinpath(f"{name}.toml").read_text()
        assert schema_problems(tomllib.loads(text)) == [], name


def test_sybils_ground_next_to_a_key_eclipse_it_once_they_outnumber_a_bucket() -> None:
    overrides = {"topology.hosts": 80, "workload.lookups": 20, "workload.keys": 1,
                 "dht.bootstrap_batch": 20, "adversaries.sybil_share": [0.0, 0.3]}
    near = run("sybil", overrides=overrides | {"adversaries.sybil_placement": "near_keys"})
    spread = run("sybil", overrides=overrides)
    assert near.summary["sybil_placement"] == "near_keys (7-bit prefix of a key)"
    assert near.summary["sybil 0: success_rate"] == 1.0
    # 24 Sybils within the key's 7-bit prefix: more than k = 20, so every node a lookup
    # ends on is one of them; the same 24 at random ids barely matter.
    assert near.summary["sybil 0.3: success_rate"] < 0.2
    assert spread.summary["sybil 0.3: success_rate"] >= 0.9


def test_dht_nodes_churn_with_weibull_sessions_while_lookups_run() -> None:
    result = run("dht-lookup", overrides={
        "topology.hosts": 60, "workload.lookups": 20, "workload.keys": 3,
        "workload.healthy_lookups": 0, "dht.bootstrap_batch": 20, "churn.dead_share": 0.0,
        "churn.share": 0.5, "churn.session": {"dist": "weibull", "scale": 0.5, "shape": 0.5},
        "churn.off_time": {"dist": "exponential", "mean": 5.0}})
    s = result.summary
    assert s["churning"] == 30 and s["host_flips"] > 0
    assert s["lookups"] == 20 and s["success_rate"] > 0.5


def test_free_riders_leave_the_sender_to_serve_everyone() -> None:
    small = SMALL_NAT | {"topology.hosts": 8, "topology.nat": {"none": 1.0},
                         "workload.size_mb.value": 2.0, "workload.online.window_s": 20.0}
    sharing = run("nat-mix", overrides=small).summary
    riding = run("nat-mix", overrides=small | {"adversaries.free_rider_share": 1.0}).summary
    assert sharing["on: completed"] == riding["on: completed"] == "8/8"
    assert riding["free riders"] == 8
    assert riding["on: MB from sender"] >= 16.0 > sharing["on: MB from sender"]


def test_a_run_puts_the_log_levels_it_quiets_back() -> None:
    # A program that runs a scenario in its own process (a test worker, a notebook) logs as
    # before afterwards: the nodes' warnings were silenced for good once a run had quieted
    # them (a later test's caplog heard nothing from `overlay`).
    import logging

    overlay_log, kademlia_log = logging.getLogger("overlay"), logging.getLogger("kademlia")
    before = overlay_log.level, kademlia_log.level
    overlay_log.setLevel(logging.WARNING)
    kademlia_log.setLevel(logging.INFO)
    try:
        run("dht-lookup", overrides={"topology.hosts": 10, "workload.lookups": 2,
                                     "workload.keys": 1, "workload.healthy_lookups": 0,
                                     "dht.bootstrap_batch": 10})
        assert (overlay_log.level, kademlia_log.level) == (logging.WARNING, logging.INFO)
    finally:
        overlay_log.setLevel(before[0])
        kademlia_log.setLevel(before[1])
