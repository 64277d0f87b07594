"""The node's `--metrics`, `--log-format json` and node.log, and the systemd units in
contrib/systemd/ run as written (paths swapped for temporary ones) up to READY=1."""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from overlay.app.lab import LocalNetwork, _script

pytestmark = pytest.mark.slow

UNITS = Path(__file__).resolve().parents[2] / "contrib" / "systemd"
KiB = 1 << 10


def fetch(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as res:
            return res.status, res.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def metrics_url(log: str) -> str:
    m = re.search(r"^ready .* metrics=(\S+)$", log, re.M)
    assert m, log
    return f"http://{m.group(1)}"


def hook_events(url: str) -> dict[str, float]:
    """The node's `--on-message` counters in its /metrics, by event."""
    return {dict(labels)["event"]: v for (name, labels), v in
            samples(fetch(url + "/metrics")[1]).items()
            if name == "peerpost_node_on_message_events_total"}


def test_node_metrics_count_a_download_and_logs_are_json(tmp_path: Path) -> None:
    with LocalNetwork(tmp_path / "lab") as net:
        net.start_server()
        alice = net.add_node("alice", extra=["--metrics", "127.0.0.1:0"])
        hook = ["--on-message", shlex.join([sys.executable, "-c", "pass"])]
        bob = net.add_node("bob", extra=["--metrics", "127.0.0.1:0", "--log-format", "json",
                                         *hook])
        net.start_node(alice)
        net.start_node(bob)
        assert bob.proc is not None
        url = metrics_url(bob.proc.log())
        status, body = fetch(url + "/healthz")
        assert status == 200 and body.startswith("connected to ")

        src = tmp_path / "clip.bin"
        src.write_bytes(random.Random(3).randbytes(600 * KiB))
        mid = net.cli(alice, "send", str(src), "--to", bob.address).stdout.strip()

        net.wait_complete(bob, mid, 120, "bob's download")
        _, text = fetch(url + "/metrics")
        got = samples(text)
        families = {f.name for f in text_string_to_metric_families(text)}
        for name in ("connected", "inbox_messages", "downloads", "download_bytes",
                     "download_sources", "download_retries", "upload_events", "dht_events",
                     "mail_events"):
            assert "peerpost_node_" + name in families, name
        assert got[("peerpost_node_inbox_messages", (("state", "complete"),))] == 1
        assert got[("peerpost_node_downloads_total", (("outcome", "complete"),))] == 1
        assert got[("peerpost_node_download_bytes_total", (("path", "tcp"),))] >= 600 * KiB
        assert got[("peerpost_node_mail_events_total", (("event", "received"),))] == 1
        # The hook ran for `arrived` and `complete`, as `info` counts it.
        hooks = net.wait_until(lambda: (h := hook_events(url)).get("ran") == 2 and h,
                               30, "bob's hook runs in /metrics")
        assert hooks == {"ran": 2, "failed": 0, "timed-out": 0, "deferred": 0}
        assert net.cli_json(bob, "info")["counters"]["on-message ran"] == 2
        assert alice.proc is not None
        _, text = fetch(metrics_url(alice.proc.log()) + "/metrics")
        served = samples(text)[("peerpost_node_upload_events_total",
                                (("event", "chunks_served"),))]
        assert served >= 1

        net.stop_node(bob)
        lines = (bob.home / "node.log").read_text().splitlines()
        docs = [json.loads(line) for line in lines]
        assert docs and all({"ts", "level", "logger", "event"} <= d.keys() for d in docs)
        assert any(d["logger"] == "peerpost.node" and d.get("msg") == "stopping" for d in docs)


def test_node_bad_log_level_is_a_usage_error(tmp_path: Path) -> None:
    res = subprocess.run([_script("peerpost"), "--home", str(tmp_path), "node",
                          "--log-level", "loud"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    assert "invalid choice: 'loud'" in res.stderr


def unit_command(unit: str, subst: dict[str, str]) -> list[str]:
    """The unit's ExecStart as argv: its specifiers replaced, the program taken from this
    venv, every listening port 0."""
    text = (UNITS / unit).read_text()
    for key in ("ProtectSystem=strict", "ProtectHome=", "NoNewPrivileges=yes",
                "PrivateTmp=yes", "RestrictAddressFamilies=", "Type=notify"):
        assert key in text, (unit, key)
    line = next(x for x in text.splitlines() if x.startswith("ExecStart="))
    for spec, value in subst.items():
        line = line.replace(spec, value)
    argv = shlex.split(line.removeprefix("ExecStart="))
    argv[0] = _script(Path(argv[0]).name)
    for i, word in enumerate(argv[:-1]):
        if word in ("--listen", "--metrics"):
            argv[i + 1] = "127.0.0.1:0"
        elif word in ("--stun-port", "--dht-port"):
            argv[i + 1] = "0"
    return argv


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"@peerpost-unit-test-{os.getpid()}-{tmp_path.name}"
    sock.bind("\0" + name[1:])
    sock.settimeout(60)
    try:
        yield sock, name
    finally:
        sock.close()


def wait_notify(sock: socket.socket, want: str) -> None:
    while True:
        got = sock.recv(4096).decode().splitlines()
        if want in got:
            return


def test_units_start_and_report_ready(tmp_path: Path,
                                      notify_socket: tuple[socket.socket, str]) -> None:
    sock, name = notify_socket
    env = {**os.environ, "NOTIFY_SOCKET": name, "PYTHONUNBUFFERED": "1"}
    env.pop("PEERPOST_HOME", None)
    subst = {"%S": str(tmp_path / "state"), "%h": str(tmp_path / "user")}
    procs: list[subprocess.Popen[str]] = []
    try:
        server = subprocess.Popen(unit_command("peerpost-rendezvous.service", subst),
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  text=True, env=env)
        procs.append(server)
        wait_notify(sock, "READY=1")
        assert server.stdout is not None
        port = int(server.stdout.readline().split()[-1].rsplit(":", 1)[1])

        data = tmp_path / "state" / "peerpost-rendezvous"
        address = "carol@example.net"
        token = subprocess.run([_script("peerpost-rendezvous"), "invite", address, "--data",
                                str(data)], capture_output=True, text=True, check=True,
                               timeout=60).stdout.strip()
        home = tmp_path / "user" / ".peerpost"
        subprocess.run([_script("peerpost"), "--home", str(home), "init", "--address",
                        address, "--server", f"127.0.0.1:{port}", "--invite", token,
                        "--listen", "127.0.0.1:0"], capture_output=True, text=True,
                       check=True, timeout=120, env=env)
        config = json.loads((home / "config.json").read_text())
        config["web"] = "off"
        (home / "config.json").write_text(json.dumps(config))

        node = subprocess.Popen(unit_command("peerpost-node.service", subst),
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True, env=env)
        procs.append(node)
        wait_notify(sock, "READY=1")
        assert node.stdout is not None
        ready = node.stdout.readline()
        assert ready.startswith(f"ready address={address}")
        status, _ = fetch(metrics_url(ready.strip()) + "/healthz")
        assert status == 200

        for proc in (node, server):
            proc.send_signal(signal.SIGTERM)
            wait_notify(sock, "STOPPING=1")
            assert proc.wait(30) == 0
        assert (home / "node.log").exists()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
