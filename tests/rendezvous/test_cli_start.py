"""`peerpost-rendezvous` loads what a command runs, not `serve`'s imports: an operator runs
`--help`, `accounts list` and `backup` by hand and from cron, and each paid for the
server, dnspython, TLS and the instance bus (about 400 modules, 250 ms of CPU here)
before doing anything. The parser is built from light modules; each command imports its
handler's modules when it runs."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from rendezvous.sqlite_store import DB_NAME, connect

# Run a command as the console script does, then name the modules it loaded of these.
_CODE = """
import sys
from rendezvous.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
watched = {watched!r}
print("LOADED", sorted(m for m in watched if m in sys.modules), file=sys.stderr)
sys.exit(code)
"""
# What `serve` needs and no other command: the server, its DNS, TLS and the instance bus.
SERVE_ONLY = ("rendezvous.server", "rendezvous.dns", "dns", "rendezvous.tls",
              "cryptography", "rendezvous.instances", "rendezvous.services",
              "rendezvous.federation", "asyncpg", "aiohttp", "tomllib")
# Nor does the help load a store or the event loop.
STORES = ("rendezvous.opcli", "rendezvous.admin", "rendezvous.sqlite_store",
          "rendezvous.limits", "sqlite3", "asyncio", "nacl", "logging", "shutil")


def run(*args: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    code = _CODE.format(watched=(*SERVE_ONLY, *STORES))
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "COLUMNS": "100"})
    line = [ln for ln in res.stderr.splitlines() if ln.startswith("LOADED ")]
    assert line, res.stderr[-800:]
    loaded: list[str] = ast.literal_eval(line[-1].removeprefix("LOADED "))
    return res, loaded


def test_help_loads_neither_the_server_nor_a_store() -> None:
    for args in (["--help"], ["serve", "--help"], ["accounts", "list", "--help"]):
        res, loaded = run(*args)
        assert res.returncode == 0, res.stderr[-800:]
        assert res.stdout.startswith("usage: peerpost-rendezvous"), res.stdout[:200]
        assert loaded == [], (args, loaded)
    res, _ = run("serve", "--help")
    # The defaults shown still come from the server's limits (rendezvous.defaults).
    assert "relayed bytes per second per account (0: no cap; default 2e+06)" in \
        " ".join(res.stdout.split())


def test_accounts_list_loads_no_server(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    connect(data / DB_NAME).close()  # the database `serve` makes
    res, loaded = run("accounts", "list", "--data", str(data))
    assert res.returncode == 0, res.stderr[-800:]
    assert res.stdout.splitlines()[-1] == "0 accounts", res.stdout
    assert not set(loaded) & set(SERVE_ONLY), loaded
    assert "rendezvous.admin" in loaded  # it did run the command
