"""NAT lab fixtures: skip cleanly where namespaces can't be made, but never in CI.

Elsewhere (not root, no `ip`/`nft`, or a sandbox that forbids `ip netns add`) every lab
test skips with the reason. With `CI=true` the same conditions are errors: CI runs as root
on a machine where the lab works, so a skip there would hide a broken setup.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest

from tests.natlab.lab import NatLab, NatMode, natlab_unavailable, read_line

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def natlab_available() -> None:
    reason = natlab_unavailable()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        pytest.fail(f"CI must run the NAT lab, but: {reason}")
    pytest.skip(reason)


@pytest.fixture
def nat_lab(natlab_available: None, tmp_path: Path) -> Iterator[Callable[[NatMode, NatMode],
                                                                          NatLab]]:
    """A factory: `nat_lab(mode_h1, mode_h2)` builds a fresh lab, torn down after the test."""
    labs: list[NatLab] = []

    def make(h1: NatMode, h2: NatMode) -> NatLab:
        lab = NatLab(h1, h2, log_dir=tmp_path / f"lab{len(labs)}")
        labs.append(lab)
        return lab.up()

    try:
        yield make
    finally:
        for lab in labs:
            lab.down()


def python_argv(module: str, *args: str) -> list[str]:
    """Run one of our modules with this interpreter (the venv's) from the repo root."""
    return [sys.executable, "-m", module, *args]


def start_public(lab: NatLab) -> tuple[int, list[int]]:
    """Rendezvous + STUN in the server namespace; returns (rendezvous port, STUN ports)."""
    data = tempfile.mkdtemp(prefix="natlab-rv-", dir=lab.log_dir)
    proc = lab.run("server", python_argv("tests.natlab.public", data, *lab.server_addrs),
                   cwd=REPO)
    words = read_line(proc, 30, "public server").split()
    if words[:1] != ["ready"] or len(words) != 4:
        raise AssertionError(f"unexpected public server line {words}")
    return int(words[1]), [int(w) for w in words[2:]]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed lab test shows every process's log (fixtures put a `logs()` callable
    on `item.natlab_logs`)."""
    report = yield
    if report.failed:
        for name, logs in getattr(item, "natlab_logs", []):
            report.sections.append((f"logs of {name}", logs()))
    return report


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (`make test`: `-n 2 --dist loadgroup`) the lab's tests all go to
    one worker, one at a time: they share the host's network namespaces and nftables."""
    for item in items:
        if "natlab" in item.path.parts:
            item.add_marker(pytest.mark.xdist_group("natlab"))
