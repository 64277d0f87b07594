"""Web inbox fixtures: a real server and nodes (LocalNetwork), and Debian's chromium
driven by Playwright (never `playwright install`: its download host is unreachable).

Without chromium or playwright the browser tests skip with the reason; under `CI=true`
that is an error, since .ci/run installs chromium and `make test` the test extra."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from overlay.app.lab import LocalNetwork, NodeHandle

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--autoplay-policy=no-user-gesture-required"]


def _missing_browser() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[test]')"
    if shutil.which("chromium") is None:
        return "chromium is not installed (apt-get install -y chromium)"
    return None


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    """Screenshots go here: $PEERPOST_ARTIFACTS if set (pytest prunes its old tmp
    folders while other runs go on), else under this test's tmp folder; never committed."""
    chosen = os.environ.get("PEERPOST_ARTIFACTS")
    out = Path(chosen) if chosen else tmp_path / "artifacts"
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture
def browser_page(tmp_path: Path) -> Iterator[Any]:
    reason = _missing_browser()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the browser tests: {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    # Chromium keeps its crash-report settings under $XDG_CONFIG_HOME (~/.config/chromium)
    # and GTK its dconf file under $XDG_CACHE_HOME, whatever the profile: here both are
    # in this test's tmp folder, so a run writes nothing in the user's home.
    env: dict[str, str | float | bool] = {
        **os.environ, "XDG_CONFIG_HOME": str(tmp_path / "xdg-config"),
        "XDG_CACHE_HOME": str(tmp_path / "xdg-cache")}
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=shutil.which("chromium"),
            headless=True, args=CHROMIUM_ARGS, viewport={"width": 1100, "height": 800},
            env=env)
        try:
            yield ctx.pages[0] if ctx.pages else ctx.new_page()
        finally:
            ctx.close()


@pytest.fixture
def net(tmp_path: Path) -> Iterator[LocalNetwork]:
    with LocalNetwork(tmp_path / "lab") as n:
        n.start_server()
        yield n


def web_base(node: NodeHandle) -> str:
    """The URL the running node serves its web inbox at (it writes it on start)."""
    return str(json.loads((node.home / "web.json").read_text())["url"])


def login_url(net: LocalNetwork, node: NodeHandle) -> str:
    return net.cli(node, "web", "--url").stdout.strip()
