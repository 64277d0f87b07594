"""Which package may import which, read from the source with `ast` (no import runs).

Between the four packages, imports flow crypto -> rendezvous -> overlay -> sim, never
upward. Inside overlay/, the rooms:
- transports/, content/ and dht/ import nothing else of overlay/;
- transfer/ may import transports/ and content/; mail/ may import content/;
- app/ wires everything, and nothing imports app/.
Every import counts: module level, inside functions, and under TYPE_CHECKING.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("crypto", "rendezvous", "overlay", "sim")

# package -> the packages it may import (besides itself)
TOP_ALLOWED = {
    "crypto": set(),
    "rendezvous": {"crypto"},
    "overlay": {"crypto", "rendezvous"},
    "sim": {"crypto", "rendezvous", "overlay"},
}
# overlay room -> the rooms it may import (besides itself). "" is overlay/__init__.py.
ROOMS_ALLOWED = {
    "transports": set(),
    "content": set(),
    "dht": set(),
    "transfer": {"transports", "content"},
    "mail": {"content"},
    "app": {"transports", "content", "dht", "transfer", "mail"},
    "": set(),
}


def imported_modules(source: str) -> list[tuple[int, str]]:
    """(line, absolute module name) for every import statement in `source`."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # the project uses absolute imports only
                out.append((node.lineno, "." * node.level + (node.module or "")))
            elif node.module:
                out.append((node.lineno, node.module))
    return out


def room_of(module_path: str) -> str:
    """The overlay room of a dotted module name ("overlay.transfer.core" -> "transfer")."""
    parts = module_path.split(".")
    if len(parts) < 2 or parts[0] != "overlay":
        return ""
    return parts[1] if parts[1] in ROOMS_ALLOWED else ""


def violations(rel_path: str, source: str) -> list[str]:
    """What `source`, the file at `rel_path` (e.g. overlay/transports/tcp.py), imports
    against the rules above, one line of text each."""
    own_module = rel_path.removesuffix(".py").replace("/", ".")
    package = own_module.split(".")[0]
    found: list[str] = []
    for line, target in imported_modules(source):
        where = f"{rel_path}:{line} imports {target}"
        if target.startswith("."):
            found.append(f"{where}: use an absolute import")
            continue
        top = target.split(".")[0]
        if top in PACKAGES and top != package and top not in TOP_ALLOWED[package]:
            found.append(f"{where}: {package}/ may not import {top}/")
        if package == "overlay" and top == "overlay":
            mine, theirs = room_of(own_module), room_of(target)
            if theirs == mine:
                continue
            if theirs == "" and target != "overlay":
                found.append(f"{where}: overlay/ has no module outside its rooms")
            elif theirs == "app":
                found.append(f"{where}: nothing imports overlay/app/")
            elif theirs and theirs not in ROOMS_ALLOWED[mine]:
                found.append(f"{where}: overlay/{mine or '__init__'} may not import "
                             f"overlay/{theirs}/")
    return found


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def test_the_tree_keeps_the_rules() -> None:
    files = _sources()
    assert len(files) > 100, "the packages were not found"
    problems = [v for p in files
                for v in violations(p.relative_to(REPO).as_posix(), p.read_text())]
    assert problems == []


def test_overlay_has_only_rooms_at_its_top() -> None:
    loose = sorted(p.name for p in (REPO / "overlay").glob("*.py") if p.name != "__init__.py")
    assert loose == [], f"modules outside the rooms: {loose}"
    rooms = sorted(p.name for p in (REPO / "overlay").iterdir()
                   if p.is_dir() and p.name != "__pycache__")
    assert rooms == sorted(r for r in ROOMS_ALLOWED if r)


@pytest.mark.parametrize(("path", "line", "complaint"), [
    ("overlay/transports/tcp.py", "from overlay.transfer.core import TransferConnection",
     "overlay/transports may not import overlay/transfer/"),
    ("overlay/transports/tcp.py", "def f():\n    import overlay.content.catalog",
     "overlay/transports may not import overlay/content/"),
    ("overlay/content/catalog.py", "from overlay.dht.node import DhtNode",
     "overlay/content may not import overlay/dht/"),
    ("overlay/dht/node.py", "from overlay.transports.stream import Stream",
     "overlay/dht may not import overlay/transports/"),
    ("overlay/mail/inbox.py", "from overlay.transfer.downloader import Downloader",
     "overlay/mail may not import overlay/transfer/"),
    ("overlay/transfer/core.py", "from overlay.mail.db import NodeDB",
     "overlay/transfer may not import overlay/mail/"),
    ("overlay/mail/inbox.py", "from overlay.app.home import NodeHome",
     "nothing imports overlay/app/"),
    ("overlay/transfer/core.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
     "    from overlay.app.node import Node", "nothing imports overlay/app/"),
    ("rendezvous/server.py", "from overlay.transports.tcp import TcpServer",
     "rendezvous/ may not import overlay/"),
    ("crypto/content.py", "import rendezvous.framing", "crypto/ may not import rendezvous/"),
    ("overlay/dht/node.py", "from sim.loop import SimLoop", "overlay/ may not import sim/"),
    ("overlay/dht/node.py", "from .records import ProviderRecord", "use an absolute import"),
])
def test_a_forbidden_import_is_caught(path: str, line: str, complaint: str) -> None:
    found = violations(path, line)
    assert len(found) == 1 and complaint in found[0], found


@pytest.mark.parametrize(("path", "line"), [
    ("overlay/transfer/downloader.py", "from overlay.transports.ladder import Source"),
    ("overlay/transfer/server.py", "from overlay.content.interfaces import Catalog"),
    ("overlay/mail/retention.py", "from overlay.content.catalog import ContentStore"),
    ("overlay/app/node.py", "from overlay.dht.directory import ProviderDirectory"),
    ("overlay/transports/relay.py", "from rendezvous.client_core import RelayHandshake"),
    ("sim/deploy.py", "from overlay.app.node import Node"),
])
def test_an_allowed_import_passes(path: str, line: str) -> None:
    assert violations(path, line) == []
