"""`peerpost node` on a host that a test can put to sleep.

    python tests/natlab/sleepy_node.py SLEPT_FILE --home HOME node [node options]

The node's `asleep` clock (overlay.transports.wake) reads the kernel's time spent
suspended plus the seconds written in SLEPT_FILE (none while it is empty or missing). A
real suspend can't be had in a test: writing 600 there is what the node would see on
waking from ten minutes asleep, CLOCK_BOOTTIME ten minutes ahead of CLOCK_MONOTONIC. All
else is the real daemon: its sockets, its server, the network namespaces around it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from overlay.app.cli import build_parser
from overlay.app.home import NodeHome
from overlay.app.node import NodeOptions, run_node
from overlay.transports.wake import time_asleep
from rendezvous.logfmt import configure


def main(argv: list[str]) -> int:
    slept = Path(argv[0])
    args = build_parser().parse_args(argv[1:])
    if args.command != "node":
        raise SystemExit(f"sleepy_node runs `node`, not {args.command!r}")
    home = NodeHome(args.home)

    def asleep() -> float:
        try:
            extra = float(slept.read_text() or 0)
        except FileNotFoundError:
            extra = 0.0
        return time_asleep() + extra

    configure("info", "text", file=home.log_path)
    return run_node(home, args, options=NodeOptions(asleep=asleep))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
