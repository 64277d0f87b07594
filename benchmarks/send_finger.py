"""`send` behind a slow FINGER: what a cross-domain round trip adds to each send.

`python -m benchmarks send_finger [--mib 1024] [--finger-ms 0,100] [--rounds 3]
[--baseline DIR --pairs 2]`

The node side of `peerpost send FILE --to ADDR`: `MailSender.send` with the real content
store, node.db, file and description (PyAV), against a rendezvous client whose FINGER
answers after `--finger-ms` (a round trip through a remote domain's server: 50-300 ms) and
whose SEND is acknowledged at once. The clock runs from the call to its return, which is
the server's acknowledgement; CPU is the process's (all threads). Each run is a fresh
process sending the same file (in the page cache after the first round) `--rounds` times,
each into a fresh store and node.db; a run's figure is its median.

`--baseline DIR`: a checkout of other code (`git worktree add DIR COMMIT`) run the same
way, alternating with this tree (old, new, new, old, ...), the old runs with DIR first on
PYTHONPATH. Run it with nothing else busy: the machine's 2 cores are shared.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[1]


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


async def _sends(src: Path, tmp: Path, finger_ms: int, rounds: int) -> list[dict[str, float]]:
    """`rounds` sends of `src`, each into a fresh store: seconds and CPU seconds each."""
    from crypto.identity import DeviceIdentity
    from overlay.content.catalog import ContentStore
    from overlay.mail.contacts import Contacts
    from overlay.mail.db import NodeDB
    from overlay.mail.outbox import Outbox
    from overlay.mail.outgoing import MailSender
    from rendezvous.records import DeviceInfo, FingerResult

    bob = DeviceIdentity.from_seed(b"\x02" * 32).public.verify_key

    class SlowFinger:
        """A rendezvous client whose FINGER takes `finger_ms`; SEND is acknowledged at once."""

        async def finger(self, address: str) -> FingerResult:
            await asyncio.sleep(finger_ms / 1000)
            return FingerResult(address, (DeviceInfo(bob, True, None, {}),))

        async def send(self, message_id: bytes, items: list[Any]) -> None:
            return None

    out = []
    for i in range(rounds):
        with NodeDB.open(tmp / f"node{i}") as db:
            store = ContentStore(tmp / f"store{i}")
            try:
                sender = MailSender(
                    DeviceIdentity.from_seed(b"\x01" * 32), "alice@a.test",
                    rendezvous=SlowFinger(), store=store,  # type: ignore[arg-type]
                    contacts=Contacts(db), outbox=Outbox(db), announce=lambda c: None,
                    direct_addresses=list, home_server="a.test", wall=time.time)
                c0, t0 = _cpu(), time.perf_counter()
                await sender.send(src, ["bob@b.test"], "bench", "")
                out.append({"seconds": time.perf_counter() - t0, "cpu": _cpu() - c0})
            finally:
                store.close()
    return out


def _child(argv: list[str]) -> int:
    src, tmp, finger_ms, rounds = Path(argv[0]), Path(argv[1]), int(argv[2]), int(argv[3])
    print(json.dumps(asyncio.run(_sends(src, tmp, finger_ms, rounds))))
    return 0


def _run(src: Path, tmp: Path, finger_ms: int, rounds: int, base: Path | None
         ) -> dict[str, float]:
    """One fresh process on this tree's code or `base`'s: the medians of its rounds."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (base or ROOT, ROOT))
    # -P: not this file's folder first on sys.path (benchmarks/rendezvous.py is not
    # the rendezvous package).
    res = subprocess.run([sys.executable, "-P", str(Path(__file__).resolve()), "--child",
                          str(src), str(tmp), str(finger_ms), str(rounds)],
                         env=env, check=True, capture_output=True, text=True)
    rounds_out = json.loads(res.stdout.strip().splitlines()[-1])
    return {k: statistics.median(r[k] for r in rounds_out) for k in ("seconds", "cpu")}


def main(argv: list[str]) -> int:
    from benchmarks.common import report
    from benchmarks.transfer import compile_tree, make_file

    ap = argparse.ArgumentParser(prog="python -m benchmarks send_finger")
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--finger-ms", default="0,100",
                    help="FINGER delays to run, comma separated (ms)")
    ap.add_argument("--rounds", type=int, default=3, help="sends per run")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="a checkout of older code to run alternately with this one")
    ap.add_argument("--pairs", type=int, default=2, help="old/new pairs with --baseline")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    delays = [int(d) for d in args.finger_ms.split(",")]
    plan: list[tuple[str, Path | None]] = [("new", None)]
    if args.baseline is not None:
        pair: list[tuple[str, Path | None]] = [("old", args.baseline.resolve()), ("new", None)]
        plan = [run for i in range(args.pairs) for run in (pair if i % 2 == 0 else pair[::-1])]
        compile_tree(args.baseline.resolve())
    compile_tree(ROOT)
    load_before = os.getloadavg()[0]
    runs: list[tuple[str, int, dict[str, float]]] = []
    with tempfile.TemporaryDirectory(prefix="peerpost-bench-") as tmp:
        src = Path(tmp) / "payload.bin"
        make_file(src, args.mib * MiB)
        os.sync()
        for i, (code, base) in enumerate(plan):
            for delay in delays:
                work = Path(tmp) / f"run{i}-{delay}"
                work.mkdir()
                runs.append((code, delay, _run(src, work, delay, args.rounds, base)))
                subprocess.run(["rm", "-rf", str(work)], check=True)
    load_after = os.getloadavg()[0]
    gb = args.mib * MiB / 1e9
    rows: list[dict[str, Any]] = []
    for code in dict.fromkeys(c for c, _, _ in runs):
        for delay in delays:
            mine = [r for c, d, r in runs if c == code and d == delay]
            seconds = [r["seconds"] for r in mine]
            rows.append({"metric": f"{code}: send {args.mib} MiB, FINGER {delay} ms, "
                                   "start → server ack",
                         "value": statistics.median(seconds),
                         "unit": f"s (runs {', '.join(f'{s:.3f}' for s in seconds)})"})
            rows.append({"metric": f"{code}: CPU per GB, FINGER {delay} ms",
                         "value": statistics.median(r["cpu"] for r in mine) / gb,
                         "unit": "s/GB"})
    rows.append({"metric": "load average (1 min) before / after",
                 "value": f"{load_before:.2f} / {load_after:.2f}",
                 "unit": f"{os.cpu_count()} CPUs"})
    report("send_finger", rows, out=args.out,
           meta={"bytes": args.mib * MiB, "baseline": str(args.baseline or ""),
                 "rounds": args.rounds,
                 "runs": [{"code": c, "finger_ms": d, **r} for c, d, r in runs]})
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        sys.exit(_child(sys.argv[2:]))
    sys.exit(main(sys.argv[1:]))
