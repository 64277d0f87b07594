"""Tier (a): the sans-I/O transfer core and the holder's request logic, back to back."""

from __future__ import annotations

import logging
import random
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crypto.capability import prove_capability
from crypto.codec import packb
from crypto.content import merkle_root
from crypto.errors import DecodeError
from crypto.identity import DeviceIdentity
from overlay.content.catalog import ContentStore
from overlay.content.local import LocalContent
from overlay.transfer.core import (
    BadMessage,
    ConnectionClosed,
    ConnectionFailed,
    Event,
    HandshakeComplete,
    Role,
    State,
    TransferConnection,
)
from overlay.transfer.errors import LocalProtocolError
from overlay.transfer.frames import (
    MAX_CHUNKS,
    MAX_GET_BATCH,
    MAX_HAVE_ITEMS,
    Cancel,
    Chunk,
    Error,
    ErrorCode,
    Get,
    Gets,
    Hashes,
    HashesRequest,
    Have,
    Message,
    Open,
    Opened,
    decode_header,
    encode_header,
)
from overlay.transfer.holder import MAX_QUEUED_GETS, ServingSession
from overlay.transfer.superseed import SuperSeed

CLIENT = DeviceIdentity.from_seed(b"c" * 32)
SERVER = DeviceIdentity.from_seed(b"s" * 32)
CHUNK = 1024


def pair(
    expected: bytes | None = SERVER.peer_id,
) -> tuple[TransferConnection, TransferConnection]:
    return (TransferConnection(Role.INITIATOR, CLIENT, expected_peer=expected),
            TransferConnection(Role.RESPONDER, SERVER))


def wire(conn: TransferConnection) -> bytes:
    return b"".join(bytes(b) for b in conn.data_to_send())


def events(conn: TransferConnection) -> list[Event]:
    out = []
    while (e := conn.next_event()) is not None:
        out.append(e)
    return out


def transfer(a: TransferConnection, b: TransferConnection) -> tuple[list[Event], list[Event]]:
    """Shuttle bytes both ways until both are quiet; returns (events at a, events at b)."""
    ea: list[Event] = []
    eb: list[Event] = []
    while True:
        to_b, to_a = wire(a), wire(b)
        if not to_a and not to_b:
            return ea, eb
        if to_b:
            b.receive_data(to_b)
        if to_a:
            a.receive_data(to_a)
        ea += events(a)
        eb += events(b)


def connected() -> tuple[TransferConnection, TransferConnection]:
    c, s = pair()
    ec, es = transfer(c, s)
    assert isinstance(ec[0], HandshakeComplete) and isinstance(es[0], HandshakeComplete)
    return c, s


def test_handshake_authenticates_both_and_agrees_on_transcript() -> None:
    c, s = pair()
    ec, es = transfer(c, s)
    assert ec == [HandshakeComplete(SERVER.public, c.transcript or b"")]
    assert es == [HandshakeComplete(CLIENT.public, s.transcript or b"")]
    assert c.transcript == s.transcript and c.state is s.state is State.OPEN


def test_wrong_server_is_refused() -> None:
    c, s = pair(expected=b"x" * 20)
    ec, _ = transfer(c, s)
    assert isinstance(ec[0], ConnectionFailed) and "expected" in ec[0].reason
    assert c.state is State.FAILED
    with pytest.raises(LocalProtocolError):
        c.send(Get(b"c" * 32, 0))


def test_every_message_round_trips_and_roles_are_enforced() -> None:
    c, s = connected()
    cid = b"i" * 32
    requests: list[Message] = [Open(cid, b"p" * 32), HashesRequest(cid, 0, 10), Get(cid, 3),
                               Cancel(cid, 3), Gets(cid, (9, 4, 5)), Gets(cid, (2,), True)]
    for msg in requests:
        c.send(msg)
    replies: list[Message] = [Opened(cid, 5000, CHUNK, b"\x05"), Opened(cid, 5000, CHUNK),
               Hashes(cid, 0, (b"h" * 32,) * 3), Chunk(cid, 3, b"sealed bytes"),
               Error(ErrorCode.NOT_HELD, "no", cid, 3), Error(ErrorCode.BUSY, "busy"),
               Have(cid, (7, 0, 12))]
    for reply in replies:
        s.send(reply)
    ec, es = transfer(c, s)
    assert es == requests
    got = [Chunk(e.content_id, e.index, bytes(e.data)) if isinstance(e, Chunk) else e
           for e in ec]
    assert got == replies
    with pytest.raises(LocalProtocolError):
        s.send(Open(cid, b"p" * 32))
    with pytest.raises(LocalProtocolError):
        c.send(Chunk(cid, 0, b""))
    with pytest.raises(LocalProtocolError):
        s.send(Gets(cid, (1, 2)))


def test_eof_and_truncated_frames() -> None:
    _, s = connected()
    s.receive_data(b"")
    assert events(s) == [ConnectionClosed()] and s.state is State.CLOSED
    c2, s2 = connected()
    c2.send(Get(b"c" * 32, 1))
    s2.receive_data(wire(c2)[:-3])
    s2.receive_data(b"")
    [e] = events(s2)
    # Cut off, not a violation: the requester must not tell its user the peer misbehaved.
    assert e == ConnectionFailed("connection closed in the middle of a frame", cut=True)


def test_oversized_frame_fails_before_buffering() -> None:
    _, s = connected()
    s.receive_data((1 << 30).to_bytes(4, "big"))
    [e] = events(s)
    assert isinstance(e, ConnectionFailed) and "over the limit" in e.reason
    c, s = connected()
    c.limit_payload(CHUNK + 16)
    s.send(Chunk(b"c" * 32, 0, bytes(CHUNK + 17)))
    ec, _ = transfer(c, s)
    assert isinstance(ec[0], ConnectionFailed)


def test_tampered_replayed_and_malformed_frames() -> None:
    c, s = connected()
    c.send(Get(b"c" * 32, 1))
    frame = bytearray(wire(c))
    frame[-1] ^= 1
    s.receive_data(bytes(frame))
    [e] = events(s)
    assert isinstance(e, ConnectionFailed) and not e.cut

    c, s = connected()
    c.send(Get(b"c" * 32, 1))
    frame = bytearray(wire(c))
    s.receive_data(bytes(frame))
    s.receive_data(bytes(frame))  # replay
    ev = events(s)
    assert ev[0] == Get(b"c" * 32, 1) and isinstance(ev[1], ConnectionFailed)

    # Authentic but not a message (unknown tag): a BadMessage, and the session carries on.
    c, s = connected()
    cipher = c._cipher
    assert cipher is not None
    header = cipher.encrypt(b"\x81\xa1t\x63")  # {"t": 99}
    s.receive_data((4 + len(header)).to_bytes(4, "big") + len(header).to_bytes(4, "big")
                   + header)
    c.send(Get(b"c" * 32, 2))
    s.receive_data(wire(c))
    ev = events(s)
    assert isinstance(ev[0], BadMessage) and "unknown transfer message type 99" in ev[0].reason
    assert ev[1] == Get(b"c" * 32, 2)
    # A reply sent by a requester is a BadMessage too.
    c, s = connected()
    c._may_send = (Opened,)
    c.send(Opened(b"c" * 32, 1, CHUNK))
    s.receive_data(wire(c))
    assert isinstance(events(s)[0], BadMessage)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_frames_split_at_any_boundary(data: st.DataObject) -> None:
    """The same events whatever way the byte streams are cut (deterministic ephemerals)."""
    c = TransferConnection(Role.INITIATOR, CLIENT, ephemeral_seed=b"1" * 32)
    s = TransferConnection(Role.RESPONDER, SERVER, ephemeral_seed=b"2" * 32)
    cid = b"k" * 32
    payloads = [random.Random(i).randbytes(CHUNK + 16) for i in range(3)]

    def feed(conn: TransferConnection, blob: bytes) -> list[Event]:
        cuts = sorted(data.draw(st.lists(st.integers(0, len(blob)), max_size=12)))
        for lo, hi in zip([0, *cuts], [*cuts, len(blob)], strict=True):
            if hi > lo:
                conn.receive_data(blob[lo:hi])
        return events(conn)

    assert feed(s, wire(c)) == []
    ec = feed(c, wire(s))
    es = feed(s, wire(c))
    assert isinstance(es[0], HandshakeComplete) and isinstance(ec[0], HandshakeComplete)
    c.send(Open(cid, b"p" * 32))
    c.send(Get(cid, 0))
    assert feed(s, wire(c)) == [Open(cid, b"p" * 32), Get(cid, 0)]
    for i, p in enumerate(payloads):
        s.send(Chunk(cid, i, p))
    got = feed(c, wire(s))
    assert [(e.index, bytes(e.data)) for e in got if isinstance(e, Chunk)] == list(
        enumerate(payloads))
    # Byte-at-a-time, too.
    s.send(Chunk(cid, 9, payloads[0]))
    out = wire(s)
    for i in range(len(out)):
        c.receive_data(out[i : i + 1])
    [last] = events(c)
    assert isinstance(last, Chunk) and bytes(last.data) == payloads[0]


@settings(max_examples=60, deadline=None)
@given(junk=st.binary(max_size=600), after_handshake=st.booleans(),
       role=st.sampled_from(list(Role)))
def test_random_bytes_never_raise(junk: bytes, after_handshake: bool, role: Role) -> None:
    c, s = connected() if after_handshake else pair()
    target = c if role is Role.INITIATOR else s
    target.receive_data(junk)
    target.receive_data(b"")
    for e in events(target):
        assert isinstance(e, ConnectionFailed | BadMessage | ConnectionClosed | HandshakeComplete)
    assert target.state in (State.FAILED, State.CLOSED)


# --- the holder's request logic ----------------------------------------------------------


@pytest.fixture
def held(tmp_path: Path) -> tuple[ContentStore, LocalContent]:
    (tmp_path / "f").write_bytes(random.Random(1).randbytes(5 * CHUNK + 3))
    store = ContentStore(tmp_path / "store")
    return store, store.add_local_file_blocking(tmp_path / "f", chunk_size=CHUNK)


def serve(
    c: TransferConnection, s: TransferConnection, logic: ServingSession
) -> list[Event]:
    """Deliver c's requests to the logic, send its replies (and queued chunks) back."""
    s.receive_data(wire(c))
    for e in events(s):
        if isinstance(e, HandshakeComplete | ConnectionFailed | ConnectionClosed):
            continue
        replies = (logic.bad_message(e.reason) if isinstance(e, BadMessage)
                   else logic.handle(e, 0.0))
        for r in [replies] if isinstance(replies, Error) else replies:
            s.send(r)
    while (g := logic.pop_get()) is not None:
        content = logic.content(g.content_id)
        assert content is not None
        s.send(Chunk(g.content_id, g.index, content.read_sealed(g.index)))
    c.receive_data(wire(s))
    return events(c)


def test_open_with_good_and_bad_proofs(held: tuple[ContentStore, LocalContent]) -> None:
    store, content = held
    c, s = connected()
    counters: Counter[str] = Counter()
    logic = ServingSession(store, s.transcript or b"", counters)
    cid = content.content_id
    c.send(Open(cid, prove_capability(b"w" * 32, cid, c.transcript or b"")))
    [e] = serve(c, s, logic)
    assert e == Error(ErrorCode.BAD_CAPABILITY, "capability proof rejected", cid)
    assert counters["bad_capability"] == 1
    c.send(Get(cid, 0))
    [e] = serve(c, s, logic)
    assert isinstance(e, Error) and e.code == ErrorCode.NOT_OPEN

    # A proof made for another session (replayed) is refused the same way.
    other_c, _ = connected()
    c.send(Open(cid, prove_capability(content.capability, cid, other_c.transcript or b"")))
    [e] = serve(c, s, logic)
    assert isinstance(e, Error) and e.code == ErrorCode.BAD_CAPABILITY
    assert counters["bad_capability"] == 2

    c.send(Open(b"u" * 32, b"p" * 32))
    [e] = serve(c, s, logic)
    assert isinstance(e, Error) and e.code == ErrorCode.UNKNOWN_CONTENT

    c.send(Open(cid, prove_capability(content.capability, cid, c.transcript or b"")))
    [e] = serve(c, s, logic)
    assert e == Opened(cid, content.size, CHUNK, None)

    c.send(HashesRequest(cid, 0, 4))
    c.send(HashesRequest(cid, 4, 100))
    h1, h2 = serve(c, s, logic)
    assert isinstance(h1, Hashes) and isinstance(h2, Hashes)
    assert merkle_root(h1.leaves + h2.leaves) == cid

    for i in range(6):
        c.send(Get(cid, i))
    c.send(Cancel(cid, 4))
    c.send(Get(cid, 6))
    got = serve(c, s, logic)
    chunks = {e.index: bytes(e.data) for e in got if isinstance(e, Chunk)}
    assert sorted(chunks) == [0, 1, 2, 3, 5]
    assert all(content.cipher.open(i, chunks[i]) == content.cipher.open(i, content.read_sealed(i))
               for i in chunks)
    [refused] = [e for e in got if isinstance(e, Error)]
    assert refused.code == ErrorCode.NOT_HELD and refused.index == 6
    assert counters["cancelled"] == 1


def test_a_co_recipient_whose_copy_is_gone_says_so_not_that_the_source_changed(
    held: tuple[ContentStore, LocalContent], tmp_path: Path
) -> None:
    """A co-recipient's received copy deleted: its 410 says this holder no longer has the
    file, also after a restart (read back from its store). The sender's file deleted: its
    410 says the source changed. Before, both said the sender's "source changed"."""
    store, content = held
    cid = content.content_id

    def refusal(catalog: ContentStore) -> Error:
        c, s = connected()
        logic = ServingSession(catalog, s.transcript or b"", Counter())
        c.send(Open(cid, prove_capability(content.capability, cid, c.transcript or b"")))
        [refused] = serve(c, s, logic)
        assert isinstance(refused, Error) and refused.code == ErrorCode.SOURCE_CHANGED
        return refused

    co = ContentStore(tmp_path / "co")
    part = co.open_partial(cid, content.size, CHUNK, content.key, content.capability,
                           tmp_path / "co-in", "f", scheme=content.scheme)
    part.set_leaves(content.leaves)
    for i in range(len(content.leaves)):
        part.write_chunk(i, content.read_sealed(i))
    part.complete().unlink()
    content.path.unlink()
    gone = ("this holder no longer has the file: its copy was edited, moved or deleted "
            "after it was received")
    assert refusal(co).text == gone
    co.close()
    restarted = ContentStore(tmp_path / "co")
    assert refusal(restarted).text == gone
    restarted.close()
    assert refusal(store).text.startswith("source changed: the file was edited, moved or "
                                          "deleted after it was sent")


def test_a_refused_open_and_the_gets_of_its_flight_log_one_line(
    held: tuple[ContentStore, LocalContent], caplog: pytest.LogCaptureFixture
) -> None:
    """A requester opens a content whose file was deleted and sends GETs in the same
    flight: each is refused, and the holder's log (at the node's default level) has one
    line naming the requester, the content and why. Before, one line each: the OPEN's,
    then "content not opened" for every GET."""
    store, content = held
    cid = content.content_id
    content.path.unlink()
    c, s = connected()
    logic = ServingSession(store, s.transcript or b"", Counter(), peer="7002463fb353@peer")
    c.send(Open(cid, prove_capability(content.capability, cid, c.transcript or b"")))
    c.send(Gets(cid, (0, 1, 2), shown=True))
    with caplog.at_level(logging.INFO, "overlay.transfer.holder"):
        refused, *gets = serve(c, s, logic)
    assert isinstance(refused, Error) and refused.code == ErrorCode.SOURCE_CHANGED
    assert [g.code for g in gets if isinstance(g, Error)] == [ErrorCode.NOT_OPEN] * 3
    assert [r.getMessage() for r in caplog.records if r.name == "overlay.transfer.holder"
            and r.levelno >= logging.INFO] == [
        f"transfer: refused 7002463fb353@peer content {cid.hex()[:16]}: {refused.text}"]


def test_gets_sent_with_the_open_are_served_only_as_its_opened_shows(
    held: tuple[ContentStore, LocalContent], tmp_path: Path
) -> None:
    """GETS sent in the OPEN's flight (`shown`): refused as not opened when the OPEN is
    refused, else served only for the chunks the OPENED showed: every one of a full holder
    alone, the held ones of a partial holder, those a super-seeding sender shows this
    requester. The hash list asked for in between comes before their chunks."""
    store, content = held
    cid = content.content_id

    def session(catalog: ContentStore, seeder: SuperSeed | None = None
                ) -> tuple[TransferConnection, TransferConnection, ServingSession]:
        c, s = connected()
        return c, s, ServingSession(catalog, s.transcript or b"", Counter(), seeder=seeder)

    def proof(c: TransferConnection) -> bytes:
        return prove_capability(content.capability, cid, c.transcript or b"")

    c, s, logic = session(store)
    c.send(Open(cid, prove_capability(b"w" * 32, cid, c.transcript or b"")))
    c.send(HashesRequest(cid, 0, 4))
    c.send(Gets(cid, (0, 2), shown=True))
    refused, hashes, get0, get2 = serve(c, s, logic)
    assert refused == Error(ErrorCode.BAD_CAPABILITY, "capability proof rejected", cid)
    assert isinstance(hashes, Error) and hashes.code == ErrorCode.NOT_OPEN
    assert get0 == Error(ErrorCode.NOT_OPEN, "content not opened", cid, 0)
    assert get2 == Error(ErrorCode.NOT_OPEN, "content not opened", cid, 2)
    assert logic.queued == 0

    c, s, logic = session(store)
    c.send(Open(cid, proof(c)))
    c.send(HashesRequest(cid, 0, 6))
    c.send(Gets(cid, (4, 0), shown=True))
    opened, hashes, chunk4, chunk0 = serve(c, s, logic)
    assert opened == Opened(cid, content.size, CHUNK, None)
    assert isinstance(hashes, Hashes)
    assert isinstance(chunk4, Chunk) and chunk4.index == 4
    assert isinstance(chunk0, Chunk) and chunk0.index == 0

    co = ContentStore(tmp_path / "co")
    part = co.open_partial(cid, content.size, CHUNK, content.key, content.capability,
                           tmp_path / "co-in", "f", scheme=content.scheme)
    part.set_leaves(content.leaves)
    part.write_chunk(1, content.read_sealed(1))
    c, s, logic = session(co)
    c.send(Open(cid, proof(c)))
    c.send(Gets(cid, (0, 1), shown=True))
    opened, chunk = serve(c, s, logic)  # nothing about 0: the requester reads the bitmap
    assert opened == Opened(cid, content.size, CHUNK, bytes([0b10]))
    assert isinstance(chunk, Chunk) and chunk.index == 1

    seeder = SuperSeed(ahead=2)
    c, s, first = session(store, seeder)
    c.send(Open(cid, proof(c)))
    c.send(Gets(cid, (5,), shown=True))
    [opened, chunk] = serve(c, s, first)
    assert opened == Opened(cid, content.size, CHUNK, None)  # alone: shown every chunk
    c, s, second = session(store, seeder)
    c.send(Open(cid, proof(c)))
    c.send(Gets(cid, tuple(range(6)), shown=True))
    opened, *chunks = serve(c, s, second)
    assert isinstance(opened, Opened) and opened.have is not None
    shown = [i for i in range(6) if opened.have[i >> 3] & (1 << (i & 7))]
    assert len(shown) == 2 and 5 not in shown  # the least spread: not the one sent
    assert sorted(c.index for c in chunks if isinstance(c, Chunk)) == shown
    assert second.counters["first_not_shown"] == 4
    c.send(Gets(cid, (5,), shown=True))  # only the GETS of the OPEN's flight is held to it
    [chunk] = serve(c, s, second)
    assert isinstance(chunk, Chunk) and chunk.index == 5


def test_open_says_when_the_requester_fetches_from_no_other_holder() -> None:
    """`Open.alone` goes on the wire only when true: any other OPEN is byte for byte what
    requesters sent before it (a holder that does not know the key ignores it, as decoders
    ignore keys they don't know), and an OPEN without it decodes as one that may share.
    Anything but true/false (or nil, read as absent) is refused with the usual text."""
    cid, proof = b"i" * 32, b"p" * 32
    before = packb({"c": cid, "p": proof, "t": Open.TAG})
    assert encode_header(Open(cid, proof)) == before
    assert decode_header(before, b"") == Open(cid, proof, alone=False)
    alone = encode_header(Open(cid, proof, alone=True))
    assert decode_header(alone, b"") == Open(cid, proof, alone=True)
    assert len(alone) == len(before) + 3  # "a": true
    assert decode_header(packb({"c": cid, "p": proof, "t": Open.TAG, "z": 7}), b"") == Open(
        cid, proof)
    assert decode_header(packb({"c": cid, "p": proof, "t": Open.TAG, "a": None}), b"") == Open(
        cid, proof)
    for bad in (1, 0, "yes", b"\x01", [True], {"a": True}, 1.0):
        with pytest.raises(DecodeError, match=r"^transfer message\.a: expected true/false, got "):
            decode_header(packb({"c": cid, "p": proof, "t": Open.TAG, "a": bad}), b"")


def test_a_requester_that_fetches_from_no_other_holder_is_shown_every_chunk(
    held: tuple[ContentStore, LocalContent]
) -> None:
    """Another requester asked a super-seeding holder for every chunk. A second one that
    may share is shown none (its download would wait to probe); one whose OPEN says it
    fetches from no other holder is shown every chunk and served the GETS of its OPEN's
    flight, none of them a probe."""
    store, content = held
    cid = content.content_id
    seeder = SuperSeed()
    counters: Counter[str] = Counter()
    every = tuple(range(6))

    def fetch(device: bytes, alone: bool) -> tuple[Opened, list[int], TransferConnection,
                                                   TransferConnection, ServingSession]:
        c, s = connected()
        logic = ServingSession(store, s.transcript or b"", counters, seeder=seeder,
                               device=device)
        c.send(Open(cid, prove_capability(content.capability, cid, c.transcript or b""),
                    alone))
        c.send(Gets(cid, every, shown=True))
        opened, *chunks = serve(c, s, logic)
        assert isinstance(opened, Opened)
        return opened, [e.index for e in chunks if isinstance(e, Chunk)], c, s, logic

    opened, got, *_ = fetch(b"first", alone=False)
    assert opened.have is None and got == list(every)  # alone: every chunk
    opened, got, c, s, sharing = fetch(b"shares", alone=False)
    assert opened.have == bytes(1) and got == []  # every chunk asked for already
    opened, got, *_ = fetch(b"sourcing off", alone=True)
    assert opened.have is None and got == list(every)
    assert counters["first_not_shown"] == 6 and counters["super_seed_probes"] == 0
    c.send(Get(cid, 3))  # the sharing one, stuck, probes
    [chunk] = serve(c, s, sharing)
    assert isinstance(chunk, Chunk) and chunk.index == 3
    assert counters["super_seed_probes"] == 1


def test_get_queue_is_bounded(held: tuple[ContentStore, LocalContent]) -> None:
    store, content = held
    c, s = connected()
    counters: Counter[str] = Counter()
    logic = ServingSession(store, s.transcript or b"", counters, max_queued=2)
    cid = content.content_id
    c.send(Open(cid, prove_capability(content.capability, cid, c.transcript or b"")))
    serve(c, s, logic)
    s.receive_data(b"")
    for i in range(3):
        logic.handle(Get(cid, i), 0.0)
    assert logic.queued == 2 and counters["busy"] == 1


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.binary(min_size=1, max_size=300))
def test_authentic_garbage_gets_an_error_reply(
    held: tuple[ContentStore, LocalContent], junk: bytes
) -> None:
    store, _ = held
    c, s = connected()
    counters: Counter[str] = Counter()
    logic = ServingSession(store, s.transcript or b"", counters)
    cipher = c._cipher
    assert cipher is not None
    header = cipher.encrypt(junk)
    c._out.append((4 + len(header)).to_bytes(4, "big") + len(header).to_bytes(4, "big")
                  + header)
    got = serve(c, s, logic)
    # Either it happened to be a valid request, or it got a 400 and a counter.
    if counters["bad_frame"]:
        assert any(isinstance(e, Error) and e.code == ErrorCode.BAD_REQUEST for e in got)
    assert s.state is State.OPEN


def opened(
    held: tuple[ContentStore, LocalContent], *, max_queued: int = MAX_QUEUED_GETS
) -> tuple[TransferConnection, TransferConnection, ServingSession, Counter[str]]:
    """A session that has opened the held content."""
    store, content = held
    c, s = connected()
    counters: Counter[str] = Counter()
    logic = ServingSession(store, s.transcript or b"", counters, max_queued=max_queued)
    cid = content.content_id
    c.send(Open(cid, prove_capability(content.capability, cid, c.transcript or b"")))
    serve(c, s, logic)
    return c, s, logic, counters


def test_gets_names_each_chunk_once() -> None:
    cid = b"i" * 32
    with pytest.raises(DecodeError, match="names no chunk"):
        decode_header(encode_header(Gets(cid, ())), b"")
    with pytest.raises(DecodeError, match="twice"):
        decode_header(encode_header(Gets(cid, (3, 4, 3))), b"")
    with pytest.raises(DecodeError, match="expected a list"):
        decode_header(packb({"t": Gets.TAG, "c": cid, "l": 5}), b"")


def test_a_malformed_gets_is_refused_with_the_reason_and_the_session_goes_on(
    held: tuple[ContentStore, LocalContent]
) -> None:
    _, content = held
    cid = content.content_id
    c, s, logic, counters = opened(held)
    c.send(Gets(cid, tuple(range(MAX_GET_BATCH + 1))))  # the sender doesn't check: the holder
    [e] = serve(c, s, logic)
    assert isinstance(e, Error) and e.code == ErrorCode.BAD_REQUEST and e.index is None
    assert f"{MAX_GET_BATCH + 1} items, limit {MAX_GET_BATCH}" in e.text
    assert logic.queued == 0 and counters["bad_frame"] == 1
    c.send(Gets(cid, (1, 1)))
    [e] = serve(c, s, logic)
    assert isinstance(e, Error) and e.code == ErrorCode.BAD_REQUEST and "twice" in e.text
    assert s.state is State.OPEN and logic.queued == 0
    c.send(Gets(cid, (2, 0)))
    got = serve(c, s, logic)
    open_ = content.cipher.open
    assert [(e.index, open_(e.index, e.data)) for e in got if isinstance(e, Chunk)] == [
        (2, open_(2, content.read_sealed(2))), (0, open_(0, content.read_sealed(0)))]


def test_gets_is_served_as_that_many_gets(held: tuple[ContentStore, LocalContent]) -> None:
    _, content = held
    cid = content.content_id
    _, _, logic, counters = opened(held, max_queued=3)
    # Not open, not held, over the queue bound: each index is refused on its own.
    assert logic.handle(Gets(b"u" * 32, (0, 1)), 0.0) == [
        Error(ErrorCode.NOT_OPEN, "content not opened", b"u" * 32, 0),
        Error(ErrorCode.NOT_OPEN, "content not opened", b"u" * 32, 1)]
    replies = logic.handle(Gets(cid, (5, 6, 0, 1, 2)), 0.0)
    assert [(e.code, e.index) for e in replies if isinstance(e, Error)] == [
        (ErrorCode.NOT_HELD, 6), (ErrorCode.BUSY, 2)]
    assert [g.index for g in (logic.pop_get(), logic.pop_get(), logic.pop_get())
            if g is not None] == [5, 0, 1]
    assert logic.pop_get() is None and counters["busy"] == 1 and counters["not_held"] == 1


@pytest.mark.parametrize(("cls", "limit"), [(Have, MAX_HAVE_ITEMS), (Gets, MAX_GET_BATCH)])
def test_index_lists_are_bounded_and_checked(cls: type[Have | Gets], limit: int) -> None:
    cid = b"i" * 32
    big = cls(cid, tuple(range(limit)))
    assert decode_header(encode_header(big), b"") == big
    with pytest.raises(DecodeError, match="limit"):
        decode_header(encode_header(cls(cid, tuple(range(limit + 1)))), b"")
    for bad in ([-1], ["x"], [True], [MAX_CHUNKS + 1]):
        raw = packb({"t": cls.TAG, "c": cid, "l": bad})
        with pytest.raises(DecodeError, match="chunk index"):
            decode_header(raw, b"")


def test_a_partial_holder_announces_new_chunks_after_opened(
    held: tuple[ContentStore, LocalContent], tmp_path: Path
) -> None:
    """OPENED carries the bitmap as of then; each chunk verified afterwards goes out in a
    HAVE, once, and only after the adapter has sent OPENED (take_growing)."""
    _, content = held
    co = ContentStore(tmp_path / "co")
    part = co.open_partial(content.content_id, content.size, CHUNK, content.key,
                           content.capability, tmp_path / "co-in", "f", scheme=content.scheme)
    part.set_leaves(content.leaves)
    part.write_chunk(1, content.read_sealed(1))
    woken: list[int] = []
    stop = part.watch(lambda: woken.append(part.held))
    c, s = connected()
    counters: Counter[str] = Counter()
    logic = ServingSession(co, s.transcript or b"", counters)
    cid = content.content_id
    c.send(Open(cid, prove_capability(content.capability, cid, c.transcript or b"")))
    [opened] = serve(c, s, logic)
    assert isinstance(opened, Opened) and opened.have == bytes([0b10])
    part.write_chunk(3, content.read_sealed(3))
    assert logic.haves() == [], "nothing before the adapter says OPENED went out"
    [(got_cid, growing)] = logic.take_growing()
    assert got_cid == cid and growing is part
    part.write_chunk(0, content.read_sealed(0))
    assert logic.haves() == [Have(cid, (3, 0))] and logic.haves() == []
    c.send(Get(cid, 3))
    [chunk] = serve(c, s, logic)
    assert isinstance(chunk, Chunk)
    assert content.cipher.open(3, chunk.data) == content.cipher.open(3, content.read_sealed(3))
    assert woken == [2, 3] and counters["haves_sent"] == 1
    stop()
    part.write_chunk(2, content.read_sealed(2))
    assert woken == [2, 3]
    co.close()


def test_cancel_reaches_a_get_already_being_sealed(
    held: tuple[ContentStore, LocalContent],
) -> None:
    _, content = held
    cid = content.content_id
    _, _, logic, counters = opened(held)
    for i in (0, 1, 2):
        logic.handle(Get(cid, i), 0.0)
    first, second = logic.pop_get(), logic.pop_get()  # both with the sealers now
    assert first is not None and second is not None
    logic.handle(Cancel(cid, 1), 0.0)  # too late for the queue, in time for the sender
    logic.handle(Cancel(cid, 2), 0.0)  # still queued
    assert logic.finish_get(cid, 0) and not logic.finish_get(cid, 1)
    assert logic.pop_get() is None and counters["cancelled"] == 2
    logic.handle(Cancel(cid, 0), 0.0)  # already sent: nothing to do, nothing grows
    assert logic.finish_get(cid, 0) and counters["cancelled"] == 2


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_chunk_payloads_are_own_buffers_whatever_the_receive_buffer(
        data: st.DataObject) -> None:
    """The receiver copies each CHUNK payload into a buffer of its own as it arrives, so a
    transport may hand in one reused buffer, and two chunks never share memory."""
    c, s = connected()
    cid = b"k" * 32
    payloads = [random.Random(i).randbytes(CHUNK + 16) for i in range(3)]
    for i, p in enumerate(payloads):
        s.send(Chunk(cid, i, p))
    blob = wire(s)
    scratch = bytearray(len(blob))
    cuts = sorted(data.draw(st.lists(st.integers(1, len(blob) - 1), max_size=12)))
    for lo, hi in zip([0, *cuts], [*cuts, len(blob)], strict=True):
        n = hi - lo
        if not n:
            continue  # b"" would mean EOF
        scratch[:n] = blob[lo:hi]
        c.receive_data(memoryview(scratch)[:n])
        scratch[:n] = bytes(n)  # the transport reuses its buffer at once
    got = [e for e in events(c) if isinstance(e, Chunk)]
    assert [(e.index, bytes(e.data)) for e in got] == list(enumerate(payloads))
    flipped = got[0].data
    assert not isinstance(flipped, bytes)  # received into a buffer of our own
    flipped[0] ^= 1
    assert bytes(got[1].data) == payloads[1]


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_payload_received_in_place_at_any_split(data: st.DataObject) -> None:
    """A transport that reads into `payload_space()` gets the same events as one that
    hands bytes to `receive_data`, however the two ways are mixed, into page-aligned
    payload buffers or not."""
    c, s = connected()
    if data.draw(st.booleans()):
        c.align_payloads(data.draw(st.sampled_from([0, 12, 100])))
    cid = b"k" * 32
    payloads = [random.Random(i).randbytes(CHUNK + 16) for i in range(3)]
    for i, p in enumerate(payloads):
        s.send(Chunk(cid, i, p))
    s.send(Error(ErrorCode.NOT_HELD, "no", cid, 7))
    blob = memoryview(wire(s))
    cuts = sorted(data.draw(st.lists(st.integers(1, len(blob) - 1), max_size=16)))
    for lo, hi in zip([0, *cuts], [*cuts, len(blob)], strict=True):
        piece, in_place = blob[lo:hi], data.draw(st.booleans())
        while piece:
            space = c.payload_space()
            if in_place and space is not None:
                n = min(len(piece), len(space))
                space[:n] = piece[:n]
                c.payload_received(n)
            else:
                n = len(piece) if space is None else min(len(piece), 40)
                c.receive_data(bytes(piece[:n]))
            piece = piece[n:]
    got = events(c)
    assert [(e.index, bytes(e.data)) for e in got if isinstance(e, Chunk)] == list(
        enumerate(payloads))
    assert got[-1] == Error(ErrorCode.NOT_HELD, "no", cid, 7)
    assert c.payload_space() is None
    with pytest.raises(LocalProtocolError):
        c.payload_received(1)  # no payload under way


def test_recycled_payload_buffers_are_reused_and_overwritten() -> None:
    c, s = connected()
    cid = b"k" * 32
    first, second = random.Random(1).randbytes(CHUNK + 16), random.Random(2).randbytes(CHUNK + 16)
    s.send(Chunk(cid, 0, first))
    c.receive_data(wire(s))
    [got] = events(c)
    assert isinstance(got, Chunk) and isinstance(got.data, bytearray) and got.data == first
    buf = got.data
    c.recycle(buf)
    s.send(Chunk(cid, 1, second[:100]))  # another length: a fresh buffer
    s.send(Chunk(cid, 2, second))
    out = wire(s)
    for i in range(0, len(out), 333):
        c.receive_data(out[i : i + 333])
    short, again = events(c)
    assert isinstance(short, Chunk) and short.data is not buf and short.data == second[:100]
    assert isinstance(again, Chunk) and again.data is buf and buf == second


@pytest.mark.parametrize("lead", [0, 12, 64])
def test_aligned_payloads_put_the_byte_after_the_lead_on_a_page(lead: int) -> None:
    """After align_payloads(lead), each CHUNK payload is its own writable buffer whose byte
    `lead` starts a page (where a GCM chunk's ciphertext begins), however it arrived;
    a recycled one is reused."""
    import ctypes
    import mmap

    c, s = connected()
    c.align_payloads(lead)
    cid = b"k" * 32
    payloads = [random.Random(i).randbytes(CHUNK + 16) for i in range(3)]
    for i, p in enumerate(payloads):
        s.send(Chunk(cid, i, p))
    out = wire(s)
    for i in range(0, len(out), 1000):  # bytes handed in, not read in place
        c.receive_data(out[i : i + 1000])
    got = [e for e in events(c) if isinstance(e, Chunk)]
    assert [(e.index, bytes(e.data)) for e in got] == list(enumerate(payloads))
    for e in got:
        view = memoryview(e.data)
        assert not view.readonly
        assert ctypes.addressof(ctypes.c_char.from_buffer(view[lead:])) % mmap.PAGESIZE == 0
    buf = got[0].data
    assert not isinstance(buf, bytes)  # received into a buffer of our own
    c.recycle(buf)
    s.send(Chunk(cid, 3, payloads[2]))
    c.receive_data(wire(s))
    [again] = events(c)
    assert isinstance(again, Chunk) and again.data is got[0].data
    assert bytes(again.data) == payloads[2]
    with pytest.raises(LocalProtocolError, match="not within a page"):
        c.align_payloads(mmap.PAGESIZE)


@pytest.mark.parametrize("spare", [0, 2, 9])
def test_as_many_recycled_payloads_are_kept_as_the_receiver_asked(spare: int) -> None:
    """align_payloads(lead, spare): `spare` recycled buffers are reused by the next
    chunks, none beyond it (a buffer past the bound is let go, the chunk after it gets a
    fresh one)."""
    c, s = connected()
    c.align_payloads(0, spare=spare)
    cid = b"k" * 32
    n = spare + 2
    payloads = [random.Random(i).randbytes(CHUNK + 16) for i in range(2 * n)]
    for i in range(n):
        s.send(Chunk(cid, i, payloads[i]))
    c.receive_data(wire(s))
    first = [e for e in events(c) if isinstance(e, Chunk)]
    for e in first:
        assert not isinstance(e.data, bytes)
        c.recycle(e.data)
    for i in range(n, 2 * n):
        s.send(Chunk(cid, i, payloads[i]))
    c.receive_data(wire(s))
    second = [e for e in events(c) if isinstance(e, Chunk)]
    assert [bytes(e.data) for e in second] == payloads[n:]
    old = {id(e.data) for e in first}
    assert sum(id(e.data) in old for e in second) == spare
