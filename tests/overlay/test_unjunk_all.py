"""`prefs junk remove` gives back every message of the sender, not only those among the
newest 1,000 of the inbox: the older ones were left junk, hidden and never downloaded.
The control operation over a real node.db."""

from __future__ import annotations

from pathlib import Path

from crypto.codec import Fields
from overlay.mail.db import NodeDB
from tests.overlay.test_rm_shared import _operations


async def test_junk_remove_takes_back_a_sender_s_oldest_messages_too(tmp_path: Path) -> None:
    with NodeDB.open(tmp_path) as db:
        ops, inbox, _ = _operations(db, "bob@example.net")
        ops.prefs.add_junk("dave@example.net")
        ids = [n.to_bytes(16, "big") for n in range(1, 1002)]
        for n, mid in enumerate(ids):
            inbox.add(id=mid, sender="dave@example.net", sender_peer_id=b"d" * 20,
                      title=f"clip {n}", note="", size=1, file_name="clip.bin",
                      media_type="application/octet-stream", content_id=mid * 2,
                      chunk_count=1, message=b"", received_at=1000.0 + n, junk=True)
        assert inbox.count(junk_only=True) == 1001

        await ops.prefs_list(Fields({"list": "junk", "action": "remove",
                                     "address": "dave@example.net"}, "prefs_list"))
        assert inbox.count(junk_only=True) == 0
        oldest = inbox.get(ids[0])
        assert oldest is not None and not oldest.junk
