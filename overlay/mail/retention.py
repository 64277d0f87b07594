"""What the sender does with its copy once every recipient has it (keep, delete, archive).

The seed's sender "deletes or archives its copy once everyone has it", as its preferences
say; the default is to keep it. Everyone is every device the message was sealed to, but
one whose key the sender has retired since (its server no longer lists it: revoked or
removed); see `Outbox.pending_retention`. A recipient that declined (removed it unread, or its
download failed for good) counts as done: once at least one recipient downloaded it and
the rest declined, the preference applies. When every recipient declined, the user's file
is the only copy: it is never deleted or archived, but the node stops serving it (the
content is forgotten, a folder's map released). The same file may be in several messages
still being fetched (the same content, or the file sent again, which is a new content, by
the same path or another: a symlink, `..`, a symlinked folder; `outbox.file_keys`): its
copy is touched only when the last of them is done, earlier ones are recorded as kept.
What `delete` deletes is the file (a symlink's target, the path the store resolved when
it was sent), not a symlink it was sent by, which is left dangling; a hard link is a name
of its own: deleting it leaves the file to the others, so each goes with its message.
A send of that file that runs while a pass decides counts too (`Outbox.copy_unneeded`).
A crash between the last receipt and this step is finished at the next start, because the
outbox remembers which messages are still pending.

A folder's map (or an archive an older version packed) in the store's outgoing folder is
not the user's file but the node's own: it is deleted whatever the preference, once no
message that names it is still wanted (`folders.release_archives`, which also runs when a
message is withdrawn); the files a map names are the user's and stay. A folder mailed to
one's own address keeps its map while the inbox holds the message complete: the address
counts as having it at this node's own receipt, and the address's other devices can
fetch it from this map only (`rm` of the message releases it).

A file mailed to one's own address is, in the sender's inbox, the file sent: `delete` or
`archive` would take the message received with it, so it is kept while that inbox holds
the message complete (a content id is new with each send: only this node's own send has
it).
"""

from __future__ import annotations

import logging
from pathlib import Path

from overlay.content.catalog import ContentStore
from overlay.content.interfaces import ContentStoreError
from overlay.mail.folders import is_own_archive, release_archives
from overlay.mail.inbox import Inbox
from overlay.mail.outbox import Outbox, OutboxEntry
from overlay.mail.prefs import Prefs

log = logging.getLogger("peerpost.retention")


def apply_retention(outbox: Outbox, store: ContentStore, prefs: Prefs,
                    default_archive: Path, inbox: Inbox | None = None,
                    ) -> list[tuple[OutboxEntry, str]]:
    """Apply the retention preference to every message nobody will fetch any more (each
    recipient downloaded or declined it); blocking I/O. `inbox`: this node's, whose
    complete messages of a content keep its file (mail to oneself)."""
    done: list[tuple[OutboxEntry, str]] = []
    # Only what the pass needs, not the whole outbox, which it listed again for each
    # message settled (quadratic, and only the newest 1,000 were looked at for another
    # message of the same content). Of each content, the messages whose retention is not
    # applied yet, this pass's included: the last one decides.
    seen = outbox.sends_seen  # before the reads: a send recorded after them changes it
    pending = outbox.pending_retention()
    def served(content_ids: list[bytes]) -> dict[bytes, str]:
        # The file delete removes (the path resolved at the send), which the path as
        # recorded may no longer name: a symlink removed or pointed elsewhere since.
        return {cid: str(path) for cid, path in store.files_of(content_ids).items()}

    undone = outbox.not_done(pending, served)
    for entry in pending:
        # Nobody has it: the user's file is the only copy, so the preference does not apply.
        action = prefs.retention if entry.anyone_downloaded else "keep"
        # Mailed to oneself: the message received is this very file (or folder).
        to_self = inbox is not None and inbox.holds(entry.content_id)
        if to_self:
            action = "keep"
        own = is_own_archive(store.root, entry.path)
        if own:
            action = "delete"  # our copy, not the user's; release_archives deletes it
        still_needed = undone.needed_by_another(entry)
        if still_needed:
            action = "keep"  # another message still needs this copy; it decides later
        try:
            if action in ("delete", "archive") and not own:
                # Decided again and done under the outbox's guard: a send of the same file
                # recorded since this pass read the outbox, or running now, keeps it.
                with outbox.copy_unneeded(entry, seen=seen, served=served) as unneeded:
                    if not unneeded:
                        action, still_needed = "keep", True
                    elif action == "delete":
                        store.remove(entry.content_id, delete_file=True)
                    else:
                        target = store.archive(entry.content_id, Path(prefs.archive_dir or
                                                                      default_archive))
                        outbox.set_path(entry.id, str(target))  # for `status` and `resend`
                        log.info("archived %s to %s", entry.path, target)
            elif not entry.anyone_downloaded and not own and not still_needed:
                store.remove(entry.content_id)  # not served any more; the file stays
                log.info("message %s: every recipient declined it; %s is kept and no "
                         "longer served", entry.id.hex(), entry.path)
        except ContentStoreError as exc:
            # Already gone (removed by hand, or an earlier run got this far): nothing to do.
            log.info("retention %s for %s: %s", action, entry.id.hex(), exc)
        outbox.mark_retention_done(entry.id, action)
        undone.settled(entry)
        if own and not still_needed and to_self:
            log.info("message %s: mailed to this address, whose inbox holds it; its map %s "
                     "stays for the address's other devices until it is removed",
                     entry.id.hex(), entry.path)
        elif own and not still_needed:
            # The map is the node's, the folder the user's: it stays whatever the
            # preference; release_archives deletes the map (and logs it) below.
            log.info("message %s: every recipient %s; the folder is kept and no longer "
                     "served (its map %s goes)", entry.id.hex(),
                     "has it or declined it" if entry.anyone_downloaded else "declined it",
                     entry.path)
        elif entry.anyone_downloaded:
            log.info("message %s: every recipient has it or declined it; copy %s",
                     entry.id.hex(),
                     {"keep": "kept", "delete": "deleted", "archive": "archived"}[action])
        done.append((entry, action))
    release_archives(outbox, store, None if inbox is None else inbox.holds)
    return done
