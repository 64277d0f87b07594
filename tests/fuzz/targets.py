"""Fuzz targets: one function per decoder, each checking the decoder's contract.

A target takes the fuzzer's bytes and returns normally when the decoder either produced its
typed record or refused the input with its documented error. Any other exception (IndexError,
KeyError, struct.error, RecursionError, a failed agreement check) escapes and is a crash.
Targets import nothing of atheris, so pytest replays the saved corpus without it.

Where a decoder has a fast path (checked without `Fields`) and a full one, the target
decodes with both and requires the same message or the same refusal.
"""

from __future__ import annotations

import asyncio
import copy
import os
import shutil
import struct
import tarfile
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from crypto.codec import Fields, unpackb
from crypto.envelope import open_envelope
from crypto.errors import CryptoError, DecodeError
from crypto.identity import DeviceIdentity, seal
from crypto.location import FolderInfo, decode_location
from overlay.app.config import NodeConfig
from overlay.app.control import ControlServer
from overlay.content.interfaces import NotEnoughSpace
from overlay.dht.errors import RemoteProtocolError as DhtRemoteProtocolError
from overlay.dht.records import ProviderRecord
from overlay.dht.state import decode_state
from overlay.dht.wire import REQUESTS as DHT_REQUESTS
from overlay.dht.wire import Reply as DhtReply
from overlay.dht.wire import decode_datagram, decode_reply_body
from overlay.mail.folders import FolderError, unpack_with_layout
from overlay.mail.receipts import Receipt
from overlay.transfer.core import (
    BadMessage,
    ConnectionClosed,
    ConnectionFailed,
    Role,
    State,
    TransferConnection,
)
from overlay.transfer.frames import Message as TransferMessage
from overlay.transfer.frames import decode_header
from overlay.transports.punch import PunchEndpoint, PunchSignalError, decode_punch, encode_punch
from overlay.transports.quic import QuicEndpoint, QuicSignalError, decode_quic, encode_quic
from overlay.transports.signalling import (
    SignalError,
    decode_signal,
    decode_unsupported,
    encode_unsupported,
    offered,
    read_signal,
)
from overlay.transports.webrtc import WebRtcEndpoint
from rendezvous.errors import RemoteProtocolError
from rendezvous.framing import FrameDecoder
from rendezvous.messages import (
    _WELL_FORMED_REQUESTS,
    _WELL_FORMED_SERVER_MESSAGES,
    MAX_REQUEST_ID,
    REQUESTS,
    SERVER_MESSAGES,
    Request,
    ServerMessage,
    decode_request,
    decode_server_message,
)
from rendezvous.stun import StunDecodeError, StunResponder, parse_binding_response, parse_message

Target = Callable[[bytes], None]

# Fixed keys: a fuzz run must be reproducible from its input alone.
DEVICE = DeviceIdentity.from_seed(bytes(range(32)))
PEER = DeviceIdentity.from_seed(bytes(range(32, 64)))
MAX_RENDEZVOUS_FRAME = 256 * 1024
NOW = 1_700_000_000.0


def _chunks(data: bytes, sizes: bytes) -> list[bytes]:
    """`data` cut into pieces whose lengths cycle through `sizes` (each byte + 1)."""
    out, pos, i = [], 0, 0
    steps = [b + 1 for b in sizes] or [len(data) or 1]
    while pos < len(data):
        step = steps[i % len(steps)]
        out.append(data[pos : pos + step])
        pos += step
        i += 1
    return out


# --- rendezvous -----------------------------------------------------------------------


def frame_decoder(data: bytes) -> None:
    """FrameDecoder fed in pieces gives the frames a one-pass parse finds, or refuses."""
    if len(data) < 3:
        return
    max_frame = 1 + data[0] * 4
    pieces = _chunks(data[3:], data[1:3])
    stream = data[3:]
    expect: list[bytes] = []
    pos, too_large = 0, False
    while len(stream) - pos >= 4:
        (size,) = struct.unpack_from(">I", stream, pos)
        if size > max_frame:
            too_large = True
            break
        if len(stream) - pos - 4 < size:
            break
        expect.append(stream[pos + 4 : pos + 4 + size])
        pos += 4 + size
    dec = FrameDecoder(max_frame)
    got: list[bytes] = []
    try:
        for piece in pieces:
            got.extend(dec.feed(piece))
            if dec.pending > max_frame + 4 + len(piece):
                raise AssertionError(f"decoder holds {dec.pending} bytes, limit {max_frame}")
    except RemoteProtocolError as exc:
        if not too_large or not exc.fatal:
            raise AssertionError(f"refused a stream the reference accepts: {exc}") from None
        if got != expect[: len(got)]:
            raise AssertionError("frames before the refusal differ") from None
        return
    if too_large:
        raise AssertionError("accepted a frame over the limit")
    if got != expect or dec.pending != len(stream) - pos:
        raise AssertionError(f"frames differ: {got!r} != {expect!r}")


def _full_request(frame: bytes) -> Request:
    """decode_request without its fast path."""
    rid = 0
    try:
        f = Fields(unpackb(frame, max_bytes=MAX_RENDEZVOUS_FRAME), "request")
        rid = f.int("id", lo=1, hi=MAX_REQUEST_ID)
        decode = REQUESTS.get(f.str("t", max_len=32))
        if decode is None:
            raise RemoteProtocolError("unknown verb", request_id=rid)
        return decode(rid, f)
    except DecodeError as exc:
        raise RemoteProtocolError(str(exc), request_id=rid) from None


def _same(what: str, fast: Callable[[], Any], full: Callable[[], Any],
          refusal: type[Exception]) -> None:
    """Both paths give equal results, or both refuse with `refusal`."""
    try:
        a: Any = fast()
    except refusal:
        a = refusal
    try:
        b: Any = full()
    except refusal:
        b = refusal
    if a != b:
        raise AssertionError(f"{what}: fast path gives {a!r}, full path {b!r}")


def _declined(fast: Callable[..., Any], *args: Any) -> Any:
    """A fast decoder's answer, with its None ("not well formed") as a DecodeError."""
    out = fast(*args)
    if out is None:
        raise DecodeError("the fast path declined")
    return out


def rendezvous_request(data: bytes) -> None:
    """decode_request: a Request or RemoteProtocolError, the same as the full path."""
    _same("request", lambda: decode_request(data, MAX_RENDEZVOUS_FRAME),
          lambda: _full_request(data), RemoteProtocolError)
    # The fast decoders themselves: None exactly where the full decoder refuses.
    try:
        obj = unpackb(data, max_bytes=MAX_RENDEZVOUS_FRAME)
    except DecodeError:
        return
    if type(obj) is not dict:
        return
    rid = obj.get("id")
    if type(rid) is not int or not 1 <= rid <= MAX_REQUEST_ID:
        return
    for tag, fast in _WELL_FORMED_REQUESTS.items():
        full = REQUESTS[tag]
        _same(f"{tag} fast decoder", partial(_declined, fast, rid, obj),
              partial(full, rid, Fields(obj, "request")), DecodeError)


def _full_server_message(frame: bytes) -> ServerMessage:
    try:
        f = Fields(unpackb(frame, max_bytes=MAX_RENDEZVOUS_FRAME), "server message")
        decode = SERVER_MESSAGES.get(f.str("t", max_len=32))
        if decode is None:
            raise RemoteProtocolError("unknown server message")
        return decode(f)
    except DecodeError as exc:
        raise RemoteProtocolError(str(exc)) from None


def rendezvous_server_message(data: bytes) -> None:
    """decode_server_message: a ServerMessage or RemoteProtocolError, as the full path."""
    _same("server message", lambda: decode_server_message(data, MAX_RENDEZVOUS_FRAME),
          lambda: _full_server_message(data), RemoteProtocolError)
    try:
        obj = unpackb(data, max_bytes=MAX_RENDEZVOUS_FRAME)
    except DecodeError:
        return
    if type(obj) is not dict:
        return
    for tag, fast in _WELL_FORMED_SERVER_MESSAGES.items():
        full = SERVER_MESSAGES[tag]
        _same(f"{tag} fast decoder", partial(_declined, fast, obj),
              partial(full, Fields(obj, "server message")), DecodeError)


def stun(data: bytes) -> None:
    """STUN parsing refuses with StunDecodeError; the responder never raises."""
    try:
        parse_message(data)
    except StunDecodeError:
        pass
    tid = data[8:20] if len(data) >= 20 else bytes(12)
    try:
        host, port = parse_binding_response(data, tid)
    except StunDecodeError:
        pass
    else:
        if not isinstance(host, str) or not 0 <= port <= 65535:
            raise AssertionError(f"mapped address {host!r}:{port}")
    responder = StunResponder()
    for addr in (("192.0.2.1", 3478), ("2001:db8::1", 3478)):
        reply = responder.datagram_received(data, addr, 0.0)
        if reply is not None:
            parse_message(reply)  # what we answer must parse


# --- transfer -------------------------------------------------------------------------


def transfer_header(data: bytes) -> None:
    """decode_header: first byte = payload length, the rest the plaintext header."""
    if not data:
        return
    payload = bytes(data[0])
    try:
        msg = decode_header(data[1:], payload)
    except DecodeError:
        return
    if not isinstance(msg, TransferMessage):
        raise AssertionError(f"decoded to {msg!r}")


def transfer_connection(data: bytes) -> None:
    """A connection fed raw bytes (in pieces) never raises; bad bytes end it cleanly."""
    if len(data) < 3:
        return
    role = Role.INITIATOR if data[0] & 1 else Role.RESPONDER
    conn = TransferConnection(role, DEVICE, ephemeral_seed=bytes(32))
    for piece in _chunks(data[3:], data[1:3]):
        conn.receive_data(piece)
    conn.receive_data(b"")
    while (event := conn.next_event()) is not None:
        if not isinstance(event, ConnectionFailed | ConnectionClosed | BadMessage):
            raise AssertionError(f"unauthenticated bytes gave {event!r}")


_SESSIONS: tuple[TransferConnection, TransferConnection] | None = None


def _open_pair() -> tuple[TransferConnection, TransferConnection]:
    """An initiator and a responder past the handshake (made once, copied per input)."""
    global _SESSIONS
    if _SESSIONS is None:
        a = TransferConnection(Role.INITIATOR, DEVICE, ephemeral_seed=bytes(32))
        b = TransferConnection(Role.RESPONDER, PEER, ephemeral_seed=bytes(range(32)))
        for _ in range(3):
            for src, dst in ((a, b), (b, a)):
                for piece in src.data_to_send():
                    dst.receive_data(piece)
        if not a.state is b.state is State.OPEN:
            raise AssertionError("the template handshake did not complete")
        while a.next_event() or b.next_event():
            pass
        _SESSIONS = (a, b)
    return _SESSIONS


def transfer_session(data: bytes) -> None:
    """Authentic frames with fuzzed headers and lengths, after the handshake.

    Byte 0 picks the receiving side. Then records: mode, delta, payload length, header
    length (2 bytes), header plaintext. The header is sealed with the sender's session key;
    mode bit 0 makes the frame length lie by `delta`, bit 1 the header length. Honest frames
    each give one message or BadMessage, in order, until a lying one ends the connection.
    """
    if not data:
        return
    a, b = _open_pair()
    receiver, sender = (a, b) if data[0] & 1 else (b, a)
    conn = copy.deepcopy(receiver)
    cipher = copy.copy(sender._cipher)
    if cipher is None:
        raise AssertionError("no session cipher")
    wire, honest, lied, pos = bytearray(), 0, False, 1
    while pos + 5 <= len(data):
        mode, delta, plen = data[pos], data[pos + 1], data[pos + 2]
        hlen = int.from_bytes(data[pos + 3 : pos + 5], "big") % 1024
        header = data[pos + 5 : pos + 5 + hlen]
        pos += 5 + hlen
        sealed = cipher.encrypt(header)
        frame_len = 4 + len(sealed) + plen + (delta - 128 if mode & 1 else 0)
        sealed_len = len(sealed) + (delta - 128 if mode & 2 else 0)
        if mode & 3 and (frame_len, sealed_len) != (4 + len(sealed) + plen, len(sealed)):
            lied = True
        wire += (frame_len % (1 << 32)).to_bytes(4, "big")
        wire += (sealed_len % (1 << 32)).to_bytes(4, "big") + sealed + bytes(plen)
        if not lied:
            honest += 1
    for piece in _chunks(bytes(wire), data[1:4]):
        conn.receive_data(piece)
    got, failed = 0, False
    while (event := conn.next_event()) is not None:
        if isinstance(event, ConnectionFailed):
            failed = True
        elif isinstance(event, BadMessage | TransferMessage):
            got += 1
        else:
            raise AssertionError(f"unexpected event {event!r}")
    if not lied and not failed and got != honest:
        raise AssertionError(f"{honest} honest frames gave {got} events")
    if got < honest and not failed:
        raise AssertionError(f"{honest} honest frames gave {got} events and no failure")


# --- DHT ------------------------------------------------------------------------------


def dht_datagram(data: bytes) -> None:
    """decode_datagram and decode_reply_body refuse with the DHT's RemoteProtocolError."""
    try:
        msg = decode_datagram(data)
    except DhtRemoteProtocolError:
        pass
    else:
        if isinstance(msg, DhtReply):
            for tag in DHT_REQUESTS:
                try:
                    decode_reply_body(msg, tag)
                except DhtRemoteProtocolError:
                    pass
    # The reply body decoder on its own, for bodies the envelope check would not reach.
    body = DhtReply(bytes(20), bytes(32), data, bytes(64))
    for tag in DHT_REQUESTS:
        try:
            decode_reply_body(body, tag)
        except DhtRemoteProtocolError:
            pass


def dht_state(data: bytes) -> None:
    try:
        decode_state(data)
    except DecodeError:
        pass


def provider_record(data: bytes) -> None:
    try:
        ProviderRecord.decode(data, now=NOW)
    except DhtRemoteProtocolError:
        pass


# --- crypto ---------------------------------------------------------------------------


def location(data: bytes) -> None:
    """decode_location: DecodeError, or a message that encodes back to itself."""
    try:
        msg = decode_location(data)
    except DecodeError:
        return
    again = decode_location(msg.encode())
    if again != msg:
        raise AssertionError(f"{msg!r} does not survive encode/decode")


def envelope(data: bytes) -> None:
    """open_envelope: the first byte picks a raw blob (odd) or a sealed payload (even)."""
    if not data:
        return
    blob = data[1:] if data[0] & 1 else seal(DEVICE.public, data[1:])
    try:
        open_envelope(DEVICE, blob)
    except CryptoError:  # DecodeError (malformed) or VerificationError (not ours, forged)
        pass


def identity_file(data: bytes) -> None:
    try:
        DeviceIdentity.from_json(data.decode("utf-8", "replace"))
    except DecodeError:
        pass


# --- overlay --------------------------------------------------------------------------


def signal(data: bytes) -> None:
    try:
        decode_signal(data)
    except SignalError:
        pass


def punch_signal(data: bytes) -> None:
    """decode_punch: None (another kind of PIPE payload), PunchSignalError, or a signal
    that encodes to bytes that decode back to the same signal."""
    try:
        sig = decode_punch(data)
    except PunchSignalError:
        return
    if sig is not None:
        assert decode_punch(encode_punch(sig)) == sig, sig


def quic_signal(data: bytes) -> None:
    """decode_quic: None (another kind of PIPE payload), QuicSignalError, or a signal that
    encodes to bytes that decode back to the same signal."""
    try:
        sig = decode_quic(data)
    except QuicSignalError:
        return
    if sig is not None:
        assert decode_quic(encode_quic(sig)) == sig, sig


def unsupported(data: bytes) -> None:
    """offered: None, or an offer's tag (ending in -offer) and 16-byte session;
    decode_unsupported for each rung's offer and an unknown one: None, SignalError, or the
    reply naming that offer, which encodes to bytes that decode back to it; and the rung a
    node routes the payload to is the one that claims it (`_routed_as_asked`)."""
    offer = offered(data)
    if offer is not None:
        assert offer[0].endswith("-offer") and len(offer[1]) == 16, offer
    for of in ("punch-offer", "quic-offer", "rtc-offer", "zz-offer"):
        try:
            sig = decode_unsupported(data, of)
        except SignalError:
            continue
        if sig is not None:
            assert sig.offer == of and decode_unsupported(encode_unsupported(sig), of) == sig
    _routed_as_asked(data)


_RUNGS = (PunchEndpoint, QuicEndpoint, WebRtcEndpoint)


def _routed_as_asked(data: bytes) -> None:
    """A node reads a PIPE payload once and hands it to the rung its route names: the rung
    that claims it when each is asked in turn (a signal of its own, malformed or not, or an
    `unsupported` naming its offer) is that one, and no other claims it."""
    sig = read_signal(data)
    if sig is None:
        return
    claims = []
    for rung in _RUNGS:
        try:
            claimed = (sig.decode(rung.SIGNALS, rung.WHAT, rung.SIGNAL_ERROR)
                       or sig.unsupported(rung.OFFER_TAG)) is not None
        except ValueError:  # malformed: claimed, as a bad signal of that rung
            claimed = True
        if claimed:
            claims.append(rung)
    assert claims in ([], [r for r in _RUNGS if (sig.route or "") in r.SIGNALS]), claims


def receipt(data: bytes) -> None:
    try:
        Receipt.decode(data)
    except DecodeError:
        pass


def node_config(data: bytes) -> None:
    try:
        NodeConfig.from_json(data.decode("utf-8", "replace"))
    except DecodeError:
        pass


class _Writer:
    """What ControlServer._serve needs of a StreamWriter."""

    def __init__(self) -> None:
        self.frames = bytearray()

    def write(self, data: bytes) -> None:
        self.frames += data

    async def drain(self) -> None:
        pass

    def close(self) -> None:
        pass


async def _echo(args: Fields) -> Any:
    return args.str("x", max_len=64, optional=True)


_LOOP: asyncio.AbstractEventLoop | None = None


def control_request(data: bytes) -> None:
    """The control socket's request loop answers every byte string without raising."""
    global _LOOP
    if _LOOP is None:
        _LOOP = asyncio.new_event_loop()
    server = ControlServer(Path("control.sock"), {"echo": _echo})  # never started
    reader = asyncio.StreamReader(loop=_LOOP)
    reader.feed_data(data)
    reader.feed_eof()
    writer = _Writer()
    _LOOP.run_until_complete(server._serve(reader, writer))  # type: ignore[arg-type]
    replies = FrameDecoder(8 << 20).feed(bytes(writer.frames))
    for frame in replies:
        reply = unpackb(frame, max_bytes=8 << 20)
        if type(reply) is not dict or type(reply.get("ok")) is not bool:
            raise AssertionError(f"control reply {reply!r}")


def _with_checksums(data: bytes) -> bytes:
    """`data` with every 512-byte block that is not all zeros given a valid header
    checksum, so that mutations reach tarfile's parsing and our judging past the check."""
    out = bytearray(data)
    for at in range(0, len(out) - tarfile.BLOCKSIZE + 1, tarfile.BLOCKSIZE):
        block = out[at:at + tarfile.BLOCKSIZE]
        if any(block):
            block[148:156] = b" " * 8
            out[at + 148:at + 156] = b"%06o\0 " % sum(block)
    return bytes(out)


def folder_archive(data: bytes) -> None:
    """unpack_with_layout of any archive under `top/`: FolderError or NotEnoughSpace with
    nothing written, or the folder `top/` holding only folders and regular files, whose
    layout names each file's bytes where they lie in the archive; never anything else."""
    work = Path(tempfile.mkdtemp(prefix="fuzz-folder-"))
    try:
        archive, dest = work / "top.tar", work / "in"
        archive.write_bytes(_with_checksums(data))
        dest.mkdir()
        try:
            folder, layout = unpack_with_layout(archive, FolderInfo("top", 0, 0, 0), dest)
        except (FolderError, NotEnoughSpace):
            if sorted(os.listdir(work)) != ["in", "top.tar"] or any(
                    os.listdir(p) for p in dest.iterdir()):
                raise AssertionError(f"a refusal left {sorted(work.rglob('*'))}") from None
            return
        if folder != dest / "top" or sorted(os.listdir(work)) != ["in", "top.tar"]:
            raise AssertionError(f"unpacked to {folder}: {sorted(work.rglob('*'))}")
        for p in folder.rglob("*"):
            if p.is_symlink() or not (p.is_dir() or p.is_file()):
                raise AssertionError(f"{p} is neither a folder nor a regular file")
        raw = archive.read_bytes()
        for f in layout or ():
            if (folder / f.name).read_bytes() != raw[f.offset:f.offset + f.size]:
                raise AssertionError(f"{f} is not the file's bytes")
    finally:
        shutil.rmtree(work, ignore_errors=True)


TARGETS: dict[str, Target] = {
    "frame_decoder": frame_decoder,
    "rendezvous_request": rendezvous_request,
    "rendezvous_server_message": rendezvous_server_message,
    "stun": stun,
    "transfer_header": transfer_header,
    "transfer_connection": transfer_connection,
    "transfer_session": transfer_session,
    "dht_datagram": dht_datagram,
    "dht_state": dht_state,
    "provider_record": provider_record,
    "location": location,
    "envelope": envelope,
    "identity_file": identity_file,
    "signal": signal,
    "punch_signal": punch_signal,
    "quic_signal": quic_signal,
    "unsupported": unsupported,
    "receipt": receipt,
    "node_config": node_config,
    "control_request": control_request,
    "folder_archive": folder_archive,
}
