"""The life of an incoming message, as an explicit state machine (an Enum and a table).

    unverified ──> offered ──> downloading <──> retrying
       │            │  ▲            │
       │            ▼  │            │
       │        complete  │         │
       └──────> failed ───┘ <───────┘

`unverified`: the location message is here but signed by a device key not trusted for its
sender (see overlay.mail.contacts); it is shown, never downloaded, and becomes `offered`
once that key is trusted (vouched for by a pinned key, or accepted by the user).
`offered`: the location message is here, nothing fetched yet (a junk sender's message stays
here until the user says it isn't junk). `downloading`: the downloader works on it.
`retrying`: no source was reachable or all failed; it waits for `next_attempt` (a retry is
scheduled instead of failing). `complete`: every chunk is
verified and the file is in place. `failed`: given up (expired, or the user cancelled); the
user may retry, which goes back to `downloading`.
"""

from __future__ import annotations

from enum import Enum


class InboxState(Enum):
    UNVERIFIED = "unverified"
    OFFERED = "offered"
    DOWNLOADING = "downloading"
    RETRYING = "retrying"
    COMPLETE = "complete"
    FAILED = "failed"


class IllegalTransition(Exception):
    """Our own code asked for a move the inbox state machine does not allow."""


TRANSITIONS: dict[InboxState, frozenset[InboxState]] = {
    InboxState.UNVERIFIED: frozenset({InboxState.OFFERED}),
    InboxState.OFFERED: frozenset({InboxState.DOWNLOADING, InboxState.FAILED}),
    InboxState.DOWNLOADING: frozenset(
        {InboxState.RETRYING, InboxState.COMPLETE, InboxState.FAILED}
    ),
    InboxState.RETRYING: frozenset({InboxState.DOWNLOADING, InboxState.FAILED}),
    InboxState.COMPLETE: frozenset(),
    InboxState.FAILED: frozenset({InboxState.DOWNLOADING}),
}

# States whose chunks_held may still change.
ACTIVE_STATES = frozenset({InboxState.DOWNLOADING, InboxState.RETRYING})


def check_transition(what: str, old: InboxState, new: InboxState) -> None:
    """Raise IllegalTransition, naming `what` and the allowed moves, unless old -> new is ok."""
    if new in TRANSITIONS[old]:
        return
    allowed = ", ".join(sorted(s.value for s in TRANSITIONS[old])) or "none, it is final"
    raise IllegalTransition(
        f"{what}: cannot go from {old.value} to {new.value} (allowed from {old.value}: {allowed})"
    )
