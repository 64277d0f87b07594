"""The sender's retention pass: time and CPU of `apply_retention` over a long outbox.

`python -m benchmarks retention [--sent 10000] [--settled 1,100,1000] [--passes 3]
[--retention keep|delete] [--files none|distinct|same]` fills a node.db with `--sent`
sent messages (one recipient and one file name each, none settled), then for each count
in `--settled` marks that many downloaded and times retention passes: one such pass runs
at every receipt that settles a message and at the node's start. Before each pass the
same messages are made pending again (not timed). Retention is `keep` unless asked, and
the content store is empty, so the pass is the outbox's reading and bookkeeping, not file
work (with `delete`, each settled copy is decided again under the outbox's guard first).
With `--files`, each message's file exists (of a size of its own, or all of one size:
every message then may share a file with those settled, so each is read and its file
looked at), which retention names by identity; the store holds none of them, so none is
deleted. Prints the median wall and CPU milliseconds of a pass and CPU per settled
message.
Only APIs older than the change are used, so the same file times an older checkout (run
it with that checkout as the working directory).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import report
from overlay.content.catalog import ContentStore
from overlay.mail.db import NodeDB
from overlay.mail.outbox import Outbox, RecipientStatus
from overlay.mail.prefs import Prefs
from overlay.mail.retention import apply_retention

BOB = "bob@example.net"


def _fill(outbox: Outbox, sent: int, folder: Path, files: str = "none") -> list[bytes]:
    """`sent` messages to bob, oldest first, each of its own file, acknowledged by the
    server; the files written unless `files` is none."""
    mids = []
    for n in range(sent):
        mid = n.to_bytes(16, "big")
        path, size = folder / f"clip{n}.bin", (n + 1 if files == "distinct" else 1)
        if files != "none":
            path.write_bytes(b"x" * size)
        outbox.add(id=mid, path=str(path), title=f"clip {n}", size=size,
                   content_id=os.urandom(32),
                   created_at=1_700_000_000.0 + n, recipients=[BOB], message=b"\x93" * 600)
        outbox.set_recipient_state(mid, BOB, RecipientStatus.SENT, 1_700_000_000.0 + n)
        mids.append(mid)
    return mids


def _pending_again(db: NodeDB, mids: list[bytes]) -> None:
    with db.transaction() as conn:
        conn.executemany("UPDATE outbox SET retention_done = 0, retention_action = NULL"
                         " WHERE id = ?", [(m,) for m in mids])


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks retention")
    ap.add_argument("--sent", type=int, default=10_000)
    ap.add_argument("--settled", default="1,100,1000",
                    help="comma-separated counts of messages settled before a pass")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--retention", choices=("keep", "delete"), default="keep")
    ap.add_argument("--files", choices=("none", "distinct", "same"), default="none",
                    help="write each message's file: of its own size, or all of one")
    ap.add_argument("--out", type=Path, default=None, help="the JSON file (default out/)")
    args = ap.parse_args(argv)
    counts = [int(c) for c in args.settled.split(",")]
    logging.getLogger("peerpost.retention").setLevel(logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory(prefix="retention-") as tmp:
        root = Path(tmp)
        store = ContentStore(root / "store")
        with NodeDB.open(root / "node") as db:
            outbox, prefs = Outbox(db, max_entries=args.sent), Prefs(db)
            prefs.retention = args.retention
            t0 = time.perf_counter()
            mids = _fill(outbox, args.sent, root, args.files)
            print(f"{args.sent} sent messages in {time.perf_counter() - t0:.1f} s")
            settled = 0
            for count in counts:
                # The newest ones settle: a receipt for what was sent lately.
                for mid in mids[len(mids) - count : len(mids) - settled]:
                    outbox.set_recipient_state(mid, BOB, RecipientStatus.DOWNLOADED, 0.0)
                settled = max(settled, count)
                chosen = mids[len(mids) - count :]
                walls, cpus = [], []
                for _ in range(args.passes):
                    _pending_again(db, chosen)
                    w0, c0 = time.perf_counter(), time.process_time()
                    done = apply_retention(outbox, store, prefs, root / "archive")
                    walls.append(time.perf_counter() - w0)
                    cpus.append(time.process_time() - c0)
                    if len(done) != count:
                        raise SystemExit(f"the pass settled {len(done)}, not {count}")
                wall, cpu = statistics.median(walls), statistics.median(cpus)
                rows += [
                    {"metric": f"pass, {count} settled: wall", "value": round(wall * 1e3, 1),
                     "unit": "ms"},
                    {"metric": f"pass, {count} settled: CPU", "value": round(cpu * 1e3, 1),
                     "unit": "ms"},
                    {"metric": f"pass, {count} settled: CPU per message",
                     "value": round(cpu * 1e3 / count, 3), "unit": "ms"},
                ]
        store.close()
    report("retention", rows, out=args.out, meta={"sent": args.sent, "settled": counts,
                                    "passes": args.passes, "retention": args.retention,
                                    "files": args.files,
                                    "load": os.getloadavg()})
    return 0
