"""Framing and message decoding: round trips, and garbage never escapes as a crash."""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.codec import packb, unpackb
from rendezvous import messages
from rendezvous.errors import RemoteProtocolError
from rendezvous.framing import FrameDecoder, encode_frame
from rendezvous.messages import (
    Advertise,
    Authorization,
    Challenge,
    Deliver,
    Finger,
    List,
    Pipe,
    PipeMessage,
    Quit,
    Remove,
    Reply,
    Request,
    Retrieve,
    Send,
    SendItem,
    ServerMessage,
    decode_request,
    decode_server_message,
    encode_request,
    encode_server_message,
)
from rendezvous.records import Envelope
from rendezvous.status import Status

from .conftest import ident

LIMIT = 256 * 1024
PEER = bytes(range(20))
MID = bytes(range(16))


@given(st.lists(st.binary(max_size=300), max_size=8), st.lists(st.integers(1, 50), min_size=1))
def test_frames_survive_any_split(bodies: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(encode_frame(b) for b in bodies)
    dec = FrameDecoder(1024)
    out: list[bytes] = []
    pos = i = 0
    while pos < len(stream):
        step = cuts[i % len(cuts)]
        out += dec.feed(stream[pos : pos + step])
        pos += step
        i += 1
    assert out == bodies
    assert dec.pending == 0


def test_length_over_limit_is_refused_before_buffering() -> None:
    dec = FrameDecoder(1000)
    with pytest.raises(RemoteProtocolError) as err:
        dec.feed(struct.pack(">I", 1001) + b"x")
    assert err.value.fatal and err.value.status == Status.TOO_LARGE
    assert "1001 bytes over the limit 1000" in err.value.text


@given(st.binary(max_size=2000))
def test_decoder_on_random_bytes_raises_only_protocol_errors(data: bytes) -> None:
    try:
        for frame in FrameDecoder(1024).feed(data):
            decode_request(frame, 1024)
    except RemoteProtocolError:
        pass
    try:
        decode_request(data, 4096)
    except RemoteProtocolError:
        pass
    try:
        decode_server_message(data, 4096)
    except RemoteProtocolError:
        pass


_scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=20) \
    | st.binary(max_size=40) | st.floats(allow_nan=False)
_values = st.recursive(_scalars, lambda c: st.lists(c, max_size=4)
                       | st.dictionaries(st.text(max_size=10), c, max_size=4), max_leaves=12)
_tags = st.sampled_from(["AUTHORIZATION", "QUIT", "SEND", "LIST", "RETRIEVE", "REMOVE",
                         "FINGER", "PIPE", "ADVERTISE", "NOPE"])


@settings(max_examples=300)
@given(_tags, st.integers(-5, 2**64 - 1) | st.text(max_size=3),
       st.dictionaries(st.sampled_from(["address", "verify_key", "signature", "mid", "prio",
                                        "items", "to", "device", "payload", "hold_ms",
                                        "advertise", "after", "limit", "invite", "register"]),
                       _values, max_size=8))
def test_structured_garbage_gives_a_reply_not_a_crash(tag: str, rid: object,
                                                      fields: dict[str, object]) -> None:
    body = packb({"t": tag, "id": rid, **fields})
    try:
        req = decode_request(body, LIMIT)
    except RemoteProtocolError as exc:
        assert exc.text  # always says why
        return
    assert req.TAG == tag


def _roundtrip_request(req: Request) -> Request:
    return decode_request(encode_request(req), LIMIT)


@pytest.mark.parametrize("req", [
    Authorization.signed(1, ident(1), "example.net", b"n" * 32, "alice@example.net",
                         invite="tok", register=True, advertise={"addrs": ["1.2.3.4:5"]}),
    Quit(2),
    Send(3, MID, 2, (SendItem("bob@example.net", PEER, b"blob"),)),
    List(4, 17, 10),
    Retrieve(5, MID),
    Remove(6, MID),
    Finger(7, "bob@example.net"),
    Pipe(8, "bob@example.net", b"offer", PEER, 5000),
    Pipe(9, "bob@example.net", b"offer"),
    Advertise(10, {"nat": True, "port": 4567}),
])
def test_requests_round_trip(req: Request) -> None:
    assert _roundtrip_request(req) == req


@pytest.mark.parametrize("msg", [
    Challenge("example.net", b"n" * 32, 3478, None, bytes(range(32))),
    Reply(3, 404, "no such address: x@example.net", {"k": [1, 2]}),
    Deliver(Envelope(MID, "a@example.net", "b@example.net", PEER, 1, b"sealed", 1.5)),
    PipeMessage("a@example.net", PEER, b"answer"),
])
def test_server_messages_round_trip(msg: ServerMessage) -> None:
    assert decode_server_message(encode_server_message(msg), LIMIT) == msg


def test_unknown_verb_is_named_in_the_error() -> None:
    with pytest.raises(RemoteProtocolError) as err:
        decode_request(packb({"t": "STEAL", "id": 9}), LIMIT)
    assert err.value.text == "unknown verb 'STEAL'" and err.value.request_id == 9


@pytest.mark.parametrize("adv, why", [
    ({"k" * 40: "v"}, "keys are text"),
    ({"addrs": ["x"] * 17}, "list over 16"),
    ({"nested": {"a": 1}}, "expected text, a boolean"),
    ({f"k{i}": "v" for i in range(17)}, "17 keys"),
])
def test_bad_advertisements_are_refused(adv: dict[str, object], why: str) -> None:
    with pytest.raises(RemoteProtocolError) as err:
        decode_request(packb({"t": "ADVERTISE", "id": 1, "advertise": adv}), LIMIT)
    assert why in err.value.text


def test_send_needs_a_recipient_and_a_16_byte_id() -> None:
    with pytest.raises(RemoteProtocolError, match="at least one recipient"):
        decode_request(packb({"t": "SEND", "id": 1, "mid": MID, "prio": 0, "items": []}), LIMIT)
    with pytest.raises(RemoteProtocolError, match="expected 16 bytes"):
        decode_request(packb({"t": "SEND", "id": 1, "mid": b"x", "prio": 0, "items": [
            {"to": "b@example.net", "device": PEER, "blob": b""}]}), LIMIT)


# --- the well-formed fast paths agree with the full decoders ---------------------------

_ADDRESSES = st.sampled_from(["bob@example.net", " Bob@Example.NET ", "x@y", "no-at-sign",
                              "a" * 250 + "@b.c", "", "é@example.net"])
_ANY = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.text(max_size=4),
                 st.binary(max_size=4), st.lists(st.integers(-9, 9), max_size=2),
                 st.dictionaries(st.text(max_size=2), st.integers(-9, 9), max_size=2))


def _field(valid: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    """Mostly valid values, sometimes anything, sometimes absent (None drops the key)."""
    return st.one_of(valid, valid, valid, _ANY)


def _map(**fields: st.SearchStrategy[object]) -> st.SearchStrategy[dict[str, object]]:
    return st.fixed_dictionaries({k: _field(v) for k, v in fields.items()}).map(
        lambda d: {k: v for k, v in d.items() if v is not None})


_IDS = st.one_of(st.integers(0, 3), st.just((1 << 63) - 1), st.just(1 << 63))
_SEND_ITEM = _map(to=_ADDRESSES, device=st.binary(min_size=19, max_size=21),
                  blob=st.binary(max_size=40))
_SEND = _map(t=st.just("SEND"), id=_IDS, mid=st.binary(min_size=15, max_size=17),
             prio=st.integers(-1, 8), items=st.lists(_SEND_ITEM, max_size=3))
_REMOVE = _map(t=st.just("REMOVE"), id=_IDS, mid=st.binary(min_size=15, max_size=17))
_ENV = _map(mid=st.binary(min_size=15, max_size=17), device=st.binary(min_size=19, max_size=21),
            prio=st.integers(-1, 8), blob=st.binary(max_size=40), at=st.integers(-1, 1 << 54),
            **{"from": _ADDRESSES, "to": _ADDRESSES})
_REPLY = _map(t=st.just("REPLY"), id=_IDS, status=st.integers(99, 1000), text=st.text(max_size=3),
              body=st.dictionaries(st.text(max_size=2), st.integers(-9, 9)))
_DELIVER = _map(t=st.just("DELIVER"), env=_ENV)


def _outcome(decode: Callable[[bytes, int], object], frame: bytes) -> object:
    try:
        return decode(frame, LIMIT)
    except RemoteProtocolError as exc:
        return ("refused", exc.status, exc.text, exc.request_id)


@settings(max_examples=800)
@given(st.one_of(_SEND, _REMOVE, _REPLY, _DELIVER))
def test_fast_paths_agree_with_the_full_decoders(obj: dict[str, object]) -> None:
    """Same message or same refusal (text, status, request id), with or without them."""
    decode = decode_request if obj.get("t") in ("SEND", "REMOVE") else decode_server_message
    frame = packb(obj)
    fast = _outcome(decode, frame)
    with _no_fast_paths():
        assert _outcome(decode, frame) == fast


def test_fast_paths_take_well_formed_frames() -> None:
    send = Send(3, MID, 2, (SendItem("bob@example.net", PEER, b"x"),))
    obj = unpackb(encode_request(send), max_bytes=LIMIT)
    assert Send.decode_well_formed(3, obj) == send
    env = Envelope(MID, "a@example.net", "bob@example.net", PEER, 1, b"blob", 1.5)
    assert Envelope.decode_well_formed(env.to_wire()) == env
    reply = Reply(4, 200, "ok", {"stored": 1})
    assert Reply.decode_well_formed(reply.fields()) == reply


@contextlib.contextmanager
def _no_fast_paths() -> Iterator[None]:
    saved = (dict(messages._WELL_FORMED_REQUESTS), dict(messages._WELL_FORMED_SERVER_MESSAGES))
    messages._WELL_FORMED_REQUESTS.clear()
    messages._WELL_FORMED_SERVER_MESSAGES.clear()
    try:
        yield
    finally:
        messages._WELL_FORMED_REQUESTS.update(saved[0])
        messages._WELL_FORMED_SERVER_MESSAGES.update(saved[1])


def test_packb_reuses_no_state_between_calls() -> None:
    """crypto.codec.packb keeps a Packer per thread: same bytes as msgpack.packb, an error
    leaves nothing behind, and threads don't mix their output."""
    obj = {"id": 7, "t": "REPLY", "body": {"blob": b"\x00" * 600, "list": [1, "two"]}}
    assert packb(obj) == msgpack.packb(obj, use_bin_type=True)
    with pytest.raises(TypeError):
        packb({"half": [1, object()]})
    assert packb(obj) == msgpack.packb(obj, use_bin_type=True)
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda n: packb({"n": n, "pad": b"x" * n}), range(200)))
    assert outs == [msgpack.packb({"n": n, "pad": b"x" * n}) for n in range(200)]
