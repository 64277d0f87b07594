"""The location message record: round trip, strict validation, size limits."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.codec import packb, unpackb
from crypto.content import LeafScheme
from crypto.envelope import max_body_for, open_envelope, seal_for_recipients
from crypto.errors import DecodeError
from crypto.identity import DeviceIdentity
from crypto.location import (
    MAX_THUMBNAIL,
    Description,
    FolderInfo,
    Handle,
    Headers,
    LocationMessage,
    SenderHints,
    decode_location,
)

ALICE = DeviceIdentity.from_seed(b"a" * 32)
BOB = DeviceIdentity.from_seed(b"b" * 32)


def sample(**desc: Any) -> LocationMessage:
    fields: dict[str, Any] = {"thumbnail": b"\xff\xd8" + b"j" * 100, "note": "the cake!"}
    fields.update(desc)
    return LocationMessage(
        headers=Headers(message_id=b"m" * 16, sender="alice@example.net",
                        sender_peer_id=ALICE.peer_id,
                        recipients=("bob@example.net", "carol@example.org"), created=1_700_000_000),
        description=Description(title="Grandma's 90th", media_type="video/mp2t",
                                file_name="party.ts", stamps=(("recorded", 1_699_990_000),),
                                copyright="(c) Alice", fields=(("place", "Lyon"),),
                                duration_ms=4000, width=640, height=360,
                                **fields),
        handle=Handle(content_id=b"c" * 32, size=10_000_000, chunk_size=1 << 20,
                      content_key=b"k" * 32, capability=b"p" * 32,
                      sender=SenderHints(peer_id=ALICE.peer_id, home_server="127.0.0.1:4000",
                                         addresses=("127.0.0.1:5000",))),
    )


def test_round_trip_through_a_sealed_envelope() -> None:
    msg = sample()
    ((_, blob),) = seal_for_recipients(ALICE, "location", msg.encode(), [BOB.public])
    opened = open_envelope(BOB, blob)
    assert decode_location(opened.body) == msg
    assert opened.sender == ALICE.public


def test_the_largest_message_fits_the_servers_envelope_limit() -> None:
    big = sample(thumbnail=b"t" * MAX_THUMBNAIL, note="n" * 4000)
    assert len(big.encode()) <= max_body_for()
    ((_, blob),) = seal_for_recipients(ALICE, "location", big.encode(), [BOB.public])
    assert len(blob) <= 64 * 1024


def test_a_thumbnail_over_32_kib_is_refused() -> None:
    with pytest.raises(DecodeError, match="thumb"):
        sample(thumbnail=b"t" * (MAX_THUMBNAIL + 1)).encode()


@pytest.mark.parametrize(
    "path, value, reason",
    [
        (("h", "id"), b"short", "expected 16 bytes"),
        (("h", "from"), "not an address", "not a valid address"),
        (("h", "to"), [], "at least one recipient"),
        (("h", "created"), -1, "outside"),
        (("d", "title"), "t" * 201, "length"),
        (("d", "name"), "../../etc/passwd", "not a plain file name"),
        (("d", "width"), 0, "outside"),
        (("d", "thumb"), "text", "expected bytes"),
        (("d", "fields"), [["k"]], "pair"),
        (("k", "cid"), b"c" * 31, "expected 32 bytes"),
        (("k", "chunk"), 3, "chunk size"),
        (("k", "size"), True, "expected an integer"),
        (("k", "key"), None, "missing field"),
    ],
)
def test_each_bad_field_is_refused_with_its_reason(path: tuple[str, str], value: object,
                                                    reason: str) -> None:
    wire = unpackb(sample().encode(), max_bytes=1 << 20)
    wire[path[0]][path[1]] = value
    with pytest.raises(DecodeError, match=reason):
        decode_location(packb(wire))


def test_the_version_says_what_the_leaves_hash() -> None:
    msg = sample()
    wire = unpackb(msg.encode(), max_bytes=1 << 20)
    assert wire["v"] == 3 and msg.handle.scheme is LeafScheme.KEYED_PLAIN_AES
    # Mail named before AES-GCM chunks (version 2) and before keyed plaintext leaves
    # (version 1) still decodes, and encodes back to its own version.
    for version, scheme in ((2, LeafScheme.KEYED_PLAIN), (1, LeafScheme.SEALED)):
        wire["v"] = version
        old = decode_location(packb(wire))
        assert old.handle.scheme is scheme
        assert unpackb(old.encode(), max_bytes=1 << 20)["v"] == version


def test_unknown_version_and_oversize_are_refused() -> None:
    wire = unpackb(sample().encode(), max_bytes=1 << 20)
    wire["v"] = 4
    with pytest.raises(DecodeError, match="unsupported location message version 4"):
        decode_location(packb(wire))
    with pytest.raises(DecodeError, match="too large"):
        decode_location(b"\x00" * (61 * 1024))


@given(st.binary(max_size=2000))
@settings(max_examples=200)
def test_random_bytes_never_raise_anything_but_decode_error(data: bytes) -> None:
    try:
        decode_location(data)
    except DecodeError:
        pass


@given(st.text(max_size=200), st.text(max_size=4000))
@settings(max_examples=50)
def test_any_title_and_note_within_limits_round_trip(title: str, note: str) -> None:
    msg = sample()
    msg = dataclasses.replace(msg, description=dataclasses.replace(msg.description, title=title,
                                                                   note=note))
    assert decode_location(msg.encode()) == msg


def test_a_folder_archive_says_so_within_bounds() -> None:
    folder = FolderInfo(name="sunday", files=48, folders=3, size=9_000_000)
    msg = sample(folder=folder)
    assert decode_location(msg.encode()).description.folder == folder
    assert decode_location(sample().encode()).description.folder is None
    for bad in (dataclasses.replace(folder, name="a/b"), dataclasses.replace(folder, name=".."),
                dataclasses.replace(folder, name=""),
                dataclasses.replace(folder, files=10**6),
                dataclasses.replace(folder, size=10_000_001)):  # more than the archive
        with pytest.raises(DecodeError):
            sample(folder=bad).encode()
