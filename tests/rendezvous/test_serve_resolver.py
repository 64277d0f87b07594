"""`serve --resolver HOST:PORT` (and the config key `resolver`) picks the name server that
finds other domains; a malformed one is one clear line, not a traceback."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

SERVE = [sys.executable, "-m", "rendezvous", "serve", "--domain", "a.test",
         "--listen", "127.0.0.1:0", "--plaintext", "--stun-port", "off", "--dht-port", "off"]


def test_a_malformed_resolver_is_refused_in_one_line(tmp_path: Path) -> None:
    done = subprocess.run([*SERVE, "--data", str(tmp_path / "d"), "--resolver", "bogus"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "resolver must be HOST:PORT, got 'bogus'" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_resolver_comes_from_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "serve.toml"
    config.write_text('resolver = "127.0.0.1:53535"\n')
    proc = subprocess.Popen([*SERVE, "--data", str(tmp_path / "d"), "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("listening "):
                break
        else:
            raise AssertionError("the server did not start")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0
    bad = tmp_path / "bad.toml"
    bad.write_text('resolver = "nope"\n')
    done = subprocess.run([*SERVE, "--data", str(tmp_path / "e"), "--config", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "resolver must be HOST:PORT" in done.stderr
