"""Seed inputs: one valid encoding of each message kind per target, from the real encoders.

`python -m tests.fuzz.seeds` (re)writes `tests/fuzz/corpus/<target>/seed-<label>`; the files
are committed, so a decoder change that stops accepting a valid message fails the replay test.
"""

from __future__ import annotations

import io
import json
import struct
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

from crypto.codec import packb
from crypto.envelope import sign_payload
from crypto.identity import seal
from crypto.location import Description, Handle, Headers, LocationMessage, SenderHints
from overlay.app.config import NodeConfig
from overlay.dht import wire as dht
from overlay.dht.records import ProviderRecord
from overlay.dht.state import encode_state
from overlay.dht.tokens import TOKEN_LEN
from overlay.mail.folders import pack, plan_pack
from overlay.mail.receipts import Receipt
from overlay.transfer import frames as tf
from overlay.transfer.core import Role, TransferConnection
from overlay.transports.punch import PunchAnswer, PunchOffer, PunchReject, encode_punch
from overlay.transports.quic import QuicAnswer, QuicOffer, QuicReject, encode_quic
from overlay.transports.signalling import (
    Answer,
    Offer,
    Reject,
    Unsupported,
    encode_signal,
    encode_unsupported,
)
from rendezvous import messages as rv
from rendezvous.framing import encode_frame
from rendezvous.records import Envelope
from rendezvous.stun import binding_request, binding_success
from tests.fuzz.targets import DEVICE, NOW, PEER

CORPUS = Path(__file__).resolve().parent / "corpus"
ADDR = "alice@example.net"
MID = b"m" * 16
DEV = PEER.peer_id
CID = b"c" * 32


def _requests() -> Iterator[tuple[str, bytes]]:
    auth = rv.Authorization.signed(1, PEER, "example.net", b"n" * 32, ADDR, invite="abc",
                                   register=True, advertise={"tcp": ["127.0.0.1:4000"]})
    reqs: list[rv.Request] = [
        auth, rv.Quit(2),
        rv.Send(3, MID, 4, (rv.SendItem("bob@example.net", DEV, b"blob"),
                            rv.SendItem("bob@example.net", bytes(20), b""))),
        rv.List(4, 17, 10), rv.Retrieve(5, MID), rv.Remove(6, MID), rv.Finger(7, ADDR),
        rv.Pipe(8, ADDR, b"payload", DEV, 1500), rv.Advertise(9, {"k": True, "n": 3}),
        rv.Relay(10, ADDR, DEV, b"s" * 16), rv.RelayAccept(11, b"s" * 16),
    ]
    for r in reqs:
        yield r.TAG.lower(), rv.encode_request(r)


def _server_messages() -> Iterator[tuple[str, bytes]]:
    env = Envelope(MID, ADDR, "bob@example.net", DEV, 3, b"sealed", 1_700_000_000.5)
    msgs: list[rv.ServerMessage] = [
        rv.Challenge("example.net", b"n" * 32, 3478, 4000, key=PEER.public.verify_key),
        rv.Reply(5, 200, "ok", {"items": [env.info().to_wire()]}),
        rv.Deliver(env), rv.PipeMessage(ADDR, DEV, b"hi"),
        rv.RelayInvite(ADDR, DEV, b"s" * 16),
    ]
    for m in msgs:
        yield m.TAG.lower(), rv.encode_server_message(m)


def _frames() -> Iterator[tuple[str, bytes]]:
    body = b"".join(encode_frame(b) for _, b in _requests())
    yield "requests", bytes([255, 7, 0]) + body
    yield "over-limit", bytes([0, 0, 3]) + encode_frame(b"x" * 50)


def _stun() -> Iterator[tuple[str, bytes]]:
    req, tid = binding_request(b"t" * 12)
    yield "request", req
    yield "success-v4", binding_success(tid, ("198.51.100.7", 40000))
    yield "success-v6", binding_success(tid, ("2001:db8::7", 40000))
    attr = struct.pack("!HH", 0x0006, 4) + b"user"
    yield "unknown-attr", struct.pack("!HHI12s", 1, len(attr), 0x2112A442, tid) + attr


def _transfer_headers() -> Iterator[tuple[str, bytes]]:
    msgs: list[tf.Message] = [
        tf.Open(CID, b"p" * 32), tf.Opened(CID, 1 << 20, 1 << 16, b"\xff\x0f"),
        tf.HashesRequest(CID, 0, 16), tf.Hashes(CID, 2, (b"h" * 32, b"i" * 32)),
        tf.Get(CID, 9), tf.Chunk(CID, 3, b"z" * 40), tf.Cancel(CID, 9),
        tf.Error(404, "unknown", CID, 2), tf.Have(CID, (1, 2, 70000)), tf.Gets(CID, (4, 5)),
    ]
    for m in msgs:
        n = len(m.data) if isinstance(m, tf.Chunk) else 0
        yield type(m).__name__.lower(), bytes([n]) + tf.encode_header(m)
    yield "open-alone", bytes([0]) + tf.encode_header(tf.Open(CID, b"p" * 32, alone=True))


def _transfer_sessions() -> Iterator[tuple[str, bytes]]:
    def record(m: tf.Message) -> bytes:
        head = tf.encode_header(m)
        n = len(m.data) if isinstance(m, tf.Chunk) else 0
        return bytes([0, 128, n]) + len(head).to_bytes(2, "big") + head

    replies: list[tf.Message] = [tf.Opened(CID, 1 << 20, 1 << 16, None),
                                 tf.Chunk(CID, 3, b"z" * 40), tf.Have(CID, (1, 2))]
    requests: list[tf.Message] = [tf.Open(CID, b"p" * 32), tf.Gets(CID, (6,), shown=True),
                                  tf.Gets(CID, (4, 5)), tf.Cancel(CID, 4)]
    yield "replies", b"\x01" + b"".join(record(m) for m in replies)
    yield "requests", b"\x00" + b"".join(record(m) for m in requests)


def _transfer_connection() -> Iterator[tuple[str, bytes]]:
    # What each side's first handshake message looks like on the wire.
    hello = b"".join(TransferConnection(Role.INITIATOR, PEER).data_to_send())
    yield "hello", bytes([0, 255, 9]) + bytes(hello)
    yield "junk-frame", bytes([1, 3, 3]) + (40).to_bytes(4, "big") + bytes(40)


def _dht() -> Iterator[tuple[str, bytes]]:
    mid, key = b"q" * 20, PEER.public.verify_key
    bodies: list[dht.RequestBody] = [
        dht.Ping(), dht.FindNode(b"t" * 20), dht.FindProviders(CID),
        dht.StoreProvider(CID, b"record", b"k" * TOKEN_LEN),
    ]
    for b in bodies:
        yield f"request-{type(b).__name__.lower()}", dht.Request(mid, key, True, b).encode()
    replies: list[dht.ReplyBody] = [
        dht.Pong(), dht.Stored(), dht.ErrorReply("busy"),
        dht.Nodes((dht.Contact(DEV, "192.0.2.9", 4000), dht.Contact(DEV, "2001:db8::9", 1)),
                  b"tok", (b"rec",)),
    ]
    for r in replies:
        yield (f"reply-{type(r).__name__.lower()}",
               dht.Reply(mid, key, dht.encode_reply_body(r), b"s" * 64).encode())


def _envelopes() -> Iterator[tuple[str, bytes]]:
    signed = sign_payload(PEER, "location", b"body")
    yield "signed", b"\x00" + signed
    yield "sealed", b"\x01" + seal(DEVICE.public, signed)


def _location() -> Iterator[tuple[str, bytes]]:
    msg = LocationMessage(
        headers=Headers(MID, ADDR, PEER.peer_id, ("bob@example.net",), 1_700_000_000),
        description=Description(title="t", note="n", media_type="video/mp4", file_name="a.mp4",
                                stamps=(("recorded", 1),), copyright="c",
                                fields=(("place", "Lyon"),), duration_ms=10, width=640,
                                height=360, thumbnail=b"\xff\xd8"),
        handle=Handle(CID, 10_000, 1 << 16, b"k" * 32, b"p" * 32,
                      SenderHints(PEER.peer_id, "127.0.0.1:4000", ("127.0.0.1:5000",))),
    )
    yield "full", msg.encode()


def _misc() -> dict[str, list[tuple[str, bytes]]]:
    record = ProviderRecord.create(PEER, CID, ["192.0.2.1:4000"], "example.net:4000", NOW)
    cfg = NodeConfig(ADDR, "example.net:4000", options={"relay": True})
    return {
        "dht_state": [("two", encode_state([dht.Contact(DEV, "192.0.2.9", 4000),
                                            dht.Contact(DEV, "::1", 9)]))],
        "provider_record": [("valid", record.encode())],
        "identity_file": [("valid", DEVICE.to_json().encode())],
        "signal": [("offer", encode_signal(Offer(b"s" * 16, "v=0\r\no=- 1 1 IN IP4 0\r\n"))),
                   ("answer", encode_signal(Answer(b"s" * 16, "v=0" + "a" * 17000))),
                   ("reject", encode_signal(Reject(b"s" * 16, "busy")))],
        "punch_signal": [
            ("offer", encode_punch(PunchOffer(b"s" * 16, (("203.0.113.5", 40000),
                                                          ("192.168.1.9", 40000)),
                                              nominate=True))),
            ("answer", encode_punch(PunchAnswer(b"s" * 16, (("2001:db8::7", 4000),)))),
            ("reject", encode_punch(PunchReject(b"s" * 16, "no STUN over TCP")))],
        "quic_signal": [
            ("offer", encode_quic(QuicOffer(b"s" * 16, (("203.0.113.5", 40000),
                                                        ("192.168.1.9", 40000))))),
            ("answer", encode_quic(QuicAnswer(b"s" * 16, (("2001:db8::7", 4000),), "0f" * 32))),
            ("reject", encode_quic(QuicReject(b"s" * 16, "QUIC is turned off")))],
        "unsupported": [
            ("reply", encode_unsupported(Unsupported(b"s" * 16, "zz-offer"))),
            ("offer", packb({"t": "zz-offer", "s": b"s" * 16, "c": ["203.0.113.5:4000"]}))],
        "receipt": [("valid", Receipt(MID, "downloaded", 1_700_000_000).encode()),
                    ("declined", Receipt(MID, "declined", 1_700_000_000,
                                         "refused: 'top/../x': outside top/").encode())],
        "node_config": [("valid", cfg.to_json().encode())],
        "control_request": [
            ("echo", encode_frame(packb({"op": "echo", "args": {"x": "hi"}}))
             + encode_frame(packb({"op": "nope"}))),
            ("bad", encode_frame(packb({"op": 3}))),
            ("json", json.dumps({"op": "echo"}).encode()),
        ],
    }


def _folder_archives() -> Iterator[tuple[str, bytes]]:
    """What our sender packs (a nested folder, a non-ASCII name long enough for a PAX
    header, an empty file), and layouts the receiver refuses."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "top"
        (src / "a" / "b").mkdir(parents=True)
        (src / "a" / "b" / ("é" * 60 + ".jpg")).write_bytes(b"jpeg" * 100)
        (src / "empty").write_bytes(b"")
        yield "packed", pack(plan_pack([src]), Path(tmp) / "store", lambda n: None).read_bytes()

    def tar(members: list[tuple[str, bytes]], form: int = tarfile.PAX_FORMAT) -> bytes:
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=form) as t:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
        return out.getvalue()
    yield "file-then-inside", tar([("top/a", b"1"), ("top/a/b", b"2")])
    yield "case", tar([("top/X", b"1"), ("top/x", b"2")])
    yield "gnu-long", tar([("top/" + "n" * 200, b"1")], tarfile.GNU_FORMAT)


def seeds() -> dict[str, list[tuple[str, bytes]]]:
    out = {
        "frame_decoder": list(_frames()),
        "rendezvous_request": list(_requests()),
        "rendezvous_server_message": list(_server_messages()),
        "stun": list(_stun()),
        "transfer_header": list(_transfer_headers()),
        "transfer_connection": list(_transfer_connection()),
        "transfer_session": list(_transfer_sessions()),
        "dht_datagram": list(_dht()),
        "location": list(_location()),
        "envelope": list(_envelopes()),
        "folder_archive": list(_folder_archives()),
    }
    out.update(_misc())
    return out


def write(corpus: Path = CORPUS) -> None:
    for target, items in seeds().items():
        folder = corpus / target
        folder.mkdir(parents=True, exist_ok=True)
        for label, data in items:
            (folder / f"seed-{label}").write_bytes(data)


if __name__ == "__main__":
    write(Path(sys.argv[1]) if len(sys.argv) > 1 else CORPUS)
