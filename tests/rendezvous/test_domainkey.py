"""The domain key file, its fingerprint and the DNS TXT value that will publish it."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crypto.errors import DecodeError
from rendezvous.domainkey import (
    DOMAIN_KEY_NAME,
    DomainKey,
    decode_key,
    fingerprint,
    load_or_create,
    parse_txt,
    txt_value,
)


def test_load_or_create_makes_the_key_once_owner_only(tmp_path: Path) -> None:
    key = load_or_create(tmp_path)
    path = tmp_path / DOMAIN_KEY_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = load_or_create(tmp_path)
    assert again.public == key.public
    assert key.fingerprint.startswith("SHA256:") and "=" not in key.fingerprint


def test_a_damaged_key_file_is_refused_with_the_reason(tmp_path: Path) -> None:
    (tmp_path / DOMAIN_KEY_NAME).write_text('{"version": 9, "kind": "peerpost-domain-key"}')
    with pytest.raises(DecodeError, match="unsupported domain key file version 9"):
        load_or_create(tmp_path)


def test_txt_value_round_trips() -> None:
    key = DomainKey.from_seed(b"\x07" * 32)
    value = txt_value(key.public)
    assert value == f"v=peerpost1; k=ed25519; p={base64.b64encode(key.public).decode()}"
    assert parse_txt(value) == key.public
    assert parse_txt(value.replace("; ", ";")) == key.public  # spacing is not significant


@pytest.mark.parametrize(("value", "why"), [
    ("v=peerpost2; k=ed25519; p=" + "A" * 43 + "=", "version 'peerpost2' is not supported"),
    ("v=peerpost1; k=rsa; p=" + "A" * 43 + "=", "key kind 'rsa' is not supported"),
    ("k=ed25519; p=" + "A" * 43 + "=", "no version"),
    ("v=peerpost1; p=" + "A" * 43 + "=", "no key kind"),
    ("v=peerpost1; k=ed25519", "no public key"),
    ("v=peerpost1; k=ed25519; p=AAAA", "is 32 bytes, got 3"),
    ("v=peerpost1; k=ed25519; p=!!!", "not base64"),
    ("v=peerpost1; v=peerpost1; k=ed25519", "appears twice"),
    ("v=peerpost1; junk", "is not NAME=VALUE"),
])
def test_parse_txt_refuses_with_a_clear_error(value: str, why: str) -> None:
    with pytest.raises(DecodeError, match=why):
        parse_txt(value)


@given(st.text(max_size=300))
def test_parse_txt_never_raises_anything_but_decode_error(value: str) -> None:
    try:
        key = parse_txt(value)
    except DecodeError:
        return
    assert len(key) == 32


@given(st.binary(min_size=32, max_size=32))
def test_any_key_round_trips_through_txt(public: bytes) -> None:
    assert parse_txt(txt_value(public)) == public
    assert decode_key(base64.b64encode(public).decode()) == public


@given(st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32))
def test_fingerprints_differ_for_different_keys(a: bytes, b: bytes) -> None:
    assert (fingerprint(a) == fingerprint(b)) == (a == b)
