"""Finding a domain's servers and key in DNS: RFC 2782 order, and DnsResolver against a
real name server (dnsmasq, tests/dnstest.py) serving what `dns-records` prints."""

from __future__ import annotations

import os
import random
import re
import socket
import stat
import subprocess
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.app.lab import _script
from rendezvous.dns import DnsResolver, DomainLookupError, SrvTarget, rfc2782_order
from rendezvous.domainkey import DomainKey, load_or_create, txt_value
from tests.dnstest import Dnsmasq

# --- RFC 2782 order ---------------------------------------------------------------------

srv_lists = st.lists(
    st.builds(SrvTarget, priority=st.integers(0, 5), weight=st.integers(0, 100),
              port=st.integers(1, 65535),
              target=st.from_regex(r"[a-z]{1,8}\.test", fullmatch=True)),
    min_size=1, max_size=12)


@given(srv_lists, st.integers(0, 2**32))
def test_order_is_a_permutation_lowest_priority_first(records: list[SrvTarget],
                                                       seed: int) -> None:
    ordered = rfc2782_order(records, random.Random(seed))
    assert Counter(ordered) == Counter(records)  # every server once
    prios = [r.priority for r in ordered]
    assert prios == sorted(prios)


def _expected_first(group: list[SrvTarget]) -> list[float]:
    """RFC 2782's chance of each record of one priority being picked first: weight-0
    records are put first, a number is drawn uniformly in 0..sum and the first record whose
    running sum reaches it is picked."""
    arranged = [r for r in group if r.weight == 0] + [r for r in group if r.weight != 0]
    total = sum(r.weight for r in arranged)
    chances = {id(r): 0.0 for r in group}
    running = 0
    for pick in range(total + 1):
        running = 0
        for r in arranged:
            running += r.weight
            if running >= pick:
                chances[id(r)] += 1 / (total + 1)
                break
    return [chances[id(r)] for r in group]


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(0, 20), min_size=2, max_size=5), st.integers(0, 2**32))
def test_weights_respected_in_distribution(weights: list[int], seed: int) -> None:
    group = [SrvTarget(10, w, 4500 + i, f"h{i}.test") for i, w in enumerate(weights)]
    rng = random.Random(seed)
    draws = 4000
    first = Counter(rfc2782_order(group, rng)[0] for _ in range(draws))
    for r, chance in zip(group, _expected_first(group), strict=True):
        # 4000 draws: one standard deviation is at most 0.8 percentage points.
        assert abs(first[r] / draws - chance) < 0.04, (r, first[r] / draws, chance)


def test_heavy_weight_usually_first_and_zero_weight_rarely() -> None:
    group = [SrvTarget(1, 0, 1, "zero.test"), SrvTarget(1, 1, 2, "light.test"),
             SrvTarget(1, 98, 3, "heavy.test")]
    rng = random.Random(7)
    first = Counter(rfc2782_order(group, rng)[0].target for _ in range(5000))
    assert first["heavy.test"] > 0.95 * 5000
    assert first["zero.test"] < 0.03 * 5000


def test_all_zero_weights_keep_their_order() -> None:
    group = [SrvTarget(1, 0, i, f"h{i}.test") for i in range(4)]
    assert rfc2782_order(group, random.Random(1)) == group


def test_bad_resolver_setting_is_named() -> None:
    with pytest.raises(DomainLookupError, match="PEERPOST_RESOLVER"):
        DnsResolver(environ={"PEERPOST_RESOLVER": "nonsense"})
    with pytest.raises(DomainLookupError, match="IP address"):
        DnsResolver("localhost:53")._get_resolver()


# --- a real name server -----------------------------------------------------------------

KEY = DomainKey.from_seed(bytes(range(32)))
A_ZONE = [
    "_peerpost._tcp.a.test. 300 IN SRV 20 0 4602 rv2.a.test.",
    "_peerpost._tcp.a.test. 300 IN SRV 10 0 4601 rv1.a.test.",
    f'_peerpost.a.test. 300 IN TXT "{txt_value(KEY.public)}"',
]
HOSTS = {"rv1.a.test": "127.0.0.1", "rv2.a.test": "127.0.0.2"}


async def test_srv_order_and_key_from_dnsmasq(dns_server: Callable[..., Dnsmasq]) -> None:
    ns = dns_server(A_ZONE, HOSTS)
    records = await DnsResolver(ns.hostport).resolve("a.test")
    assert records.domain == "a.test"
    assert records.servers == (("127.0.0.1", 4601), ("127.0.0.2", 4602))
    assert records.key == KEY.public


async def test_environment_picks_the_name_server(dns_server: Callable[..., Dnsmasq]) -> None:
    ns = dns_server(A_ZONE, HOSTS)
    resolver = DnsResolver(environ={"PEERPOST_RESOLVER": ns.hostport})
    assert (await resolver.resolve("A.test.")).key == KEY.public


async def test_weighted_instances_follow_the_seeded_rng(
        dns_server: Callable[..., Dnsmasq]) -> None:
    zone = [f"_peerpost._tcp.w.test. 300 IN SRV 10 {w} 4600 rv{i}.w.test."
            for i, w in enumerate((1, 9))]
    zone.append(f'_peerpost.w.test. 300 IN TXT "{txt_value(KEY.public)}"')
    ns = dns_server(zone, {"rv0.w.test": "127.0.0.10", "rv1.w.test": "127.0.0.11"})
    resolver = DnsResolver(ns.hostport, rng=random.Random(3))
    first = Counter([(await resolver.resolve("w.test")).servers[0][0] for _ in range(60)])
    assert first["127.0.0.11"] > first["127.0.0.10"]  # weight 9 against 1
    assert sum(first.values()) == 60


@pytest.mark.parametrize(("zone", "domain", "text"), [
    ([], "b.test", "no _peerpost._tcp.b.test SRV record"),
    (["_peerpost._tcp.c.test. 300 IN SRV 10 0 4500 rv1.a.test."], "c.test",
     "no _peerpost.c.test TXT record (the domain key)"),
    (["_peerpost._tcp.d.test. 300 IN SRV 10 0 4500 rv1.a.test.",
      '_peerpost.d.test. 300 IN TXT "v=spf1 -all"'], "d.test",
     "the _peerpost.d.test TXT record is not a peerpost key: TXT value: version 'spf1 -all' "
     "is not supported"),
    (["_peerpost._tcp.e.test. 300 IN SRV 0 0 0 .",
      f'_peerpost.e.test. 300 IN TXT "{txt_value(KEY.public)}"'], "e.test",
     "the _peerpost._tcp.e.test SRV record has target \".\": the domain says it offers no "
     "peerpost service"),
    (["_peerpost._tcp.f.test. 300 IN SRV 10 0 4500 nowhere.f.test.",
      f'_peerpost.f.test. 300 IN TXT "{txt_value(KEY.public)}"'], "f.test",
     "no A/AAAA record for nowhere.f.test (the target of the _peerpost._tcp.f.test SRV record)"),
])
async def test_missing_or_bad_records_are_named(dns_server: Callable[..., Dnsmasq],
                                                zone: list[str], domain: str,
                                                text: str) -> None:
    ns = dns_server(zone, HOSTS)
    with pytest.raises(DomainLookupError) as info:
        await DnsResolver(ns.hostport).resolve(domain)
    assert str(info.value).startswith(text), str(info.value)


async def test_a_target_the_name_server_refuses_to_resolve_is_passed_over(
        dns_server: Callable[..., Dnsmasq]) -> None:
    # dnsmasq with no upstream answers a name outside its --local domains from its host
    # records (A) and refuses the rest (AAAA: REFUSED), as RFC 4074's name servers do. That
    # refused AAAA failed the whole lookup ("failed to answer AAAA rv.other.example"),
    # and `init` gave up although it had the A record and two more targets.
    zone = ["_peerpost._tcp.g.test. 300 IN SRV 10 0 4601 rv.other.example.",
            "_peerpost._tcp.g.test. 300 IN SRV 20 0 4602 gone.other.example.",
            "_peerpost._tcp.g.test. 300 IN SRV 30 0 4603 rv3.g.test.",
            f'_peerpost.g.test. 300 IN TXT "{txt_value(KEY.public)}"']
    ns = dns_server(zone, {"rv.other.example": "127.0.0.3", "rv3.g.test": "127.0.0.5"})
    records = await DnsResolver(ns.hostport).resolve("g.test")
    assert records.servers == (("127.0.0.3", 4601), ("127.0.0.5", 4603))
    assert records.key == KEY.public
    # With no target left that resolves, the name server's refusal is the error.
    only_gone = [zone[1], zone[3]]
    ns = dns_server(only_gone, {})
    with pytest.raises(DomainLookupError, match=re.escape(
            f"name server {ns.hostport} failed to answer A gone.other.example")):
        await DnsResolver(ns.hostport).resolve("g.test")


async def test_silent_name_server_times_out_clearly() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))  # receives the query and never answers
        port = silent.getsockname()[1]
        resolver = DnsResolver(f"127.0.0.1:{port}", timeout=0.5)
        with pytest.raises(DomainLookupError,
                           match=re.escape(f"name server 127.0.0.1:{port} did not answer")):
            await resolver.resolve("a.test")


# --- dns-records ------------------------------------------------------------------------

SCRIPT = _script("peerpost-rendezvous")


def _dns_records(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SCRIPT, "dns-records", *args],
                          capture_output=True, text=True, timeout=60, check=False)


async def test_dns_records_make_the_key_and_publish_it(
        tmp_path: Path, dns_server: Callable[..., Dnsmasq]) -> None:
    data = tmp_path / "data"
    res = _dns_records("--data", str(data), "--domain", "Pub.Test", "--host", "rv1.pub.test",
                       "--host", "rv2.pub.test.", "--port", "4500", "--priority", "10",
                       "--priority", "20", "--weight", "5")
    assert res.returncode == 0, res.stderr
    key = load_or_create(data)  # made by dns-records, reused (serve does the same)
    assert stat.S_IMODE(os.stat(data / "domain_key.json").st_mode) == 0o600
    assert res.stdout.splitlines() == [
        "_peerpost._tcp.pub.test. 300 IN SRV 10 5 4500 rv1.pub.test.",
        "_peerpost._tcp.pub.test. 300 IN SRV 20 5 4500 rv2.pub.test.",
        f'_peerpost.pub.test. 300 IN TXT "{txt_value(key.public)}"',
    ]
    assert key.fingerprint in res.stderr
    again = _dns_records("--data", str(data), "--domain", "pub.test", "--host", "rv1.pub.test",
                         "--port", "4500")
    assert again.stdout.splitlines()[-1] == res.stdout.splitlines()[-1]  # same key

    ns = dns_server(res.stdout.splitlines(), {"rv1.pub.test": "127.0.0.1",
                                              "rv2.pub.test": "127.0.0.2"})
    records = await DnsResolver(ns.hostport).resolve("pub.test")
    assert records.servers == (("127.0.0.1", 4500), ("127.0.0.2", 4500))
    assert records.key == key.public


def test_dns_records_takes_a_port_per_host(tmp_path: Path) -> None:
    # Two instances on one host: a second --port was taken for both.
    res = _dns_records("--data", str(tmp_path), "--domain", "a.test", "--host", "rv.a.test",
                       "--host", "rv.a.test", "--port", "4500", "--port", "4510")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[:2] == [
        "_peerpost._tcp.a.test. 300 IN SRV 10 0 4500 rv.a.test.",
        "_peerpost._tcp.a.test. 300 IN SRV 10 0 4510 rv.a.test.",
    ]
    res = _dns_records("--data", str(tmp_path), "--domain", "a.test", "--host", "x.a.test",
                       "--host", "y.a.test", "--host", "z.a.test", "--port", "1",
                       "--port", "2")
    assert res.returncode == 2
    assert "give --port (1..65535) once, or once per --host" in res.stderr


def test_dns_records_refuses_mismatched_priorities(tmp_path: Path) -> None:
    res = _dns_records("--data", str(tmp_path), "--domain", "a.test", "--host", "x.a.test",
                       "--host", "y.a.test", "--host", "z.a.test", "--port", "1",
                       "--priority", "1", "--priority", "2")
    assert res.returncode == 2
    assert "give --priority (0..65535) once, or once per --host" in res.stderr
