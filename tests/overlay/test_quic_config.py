"""The node config's `quic` key: the QUIC rung is on unless a user turns it off, and a
value that is not a boolean is refused by name (a typo must not turn it off silently)."""

from __future__ import annotations

import json

import pytest

from crypto.errors import DecodeError
from overlay.app.config import NodeConfig

ADDR = "bob@a.test"


def test_quic_is_on_by_default_and_off_round_trips() -> None:
    assert NodeConfig(ADDR, "127.0.0.1:4500").quic is True
    off = NodeConfig(ADDR, "127.0.0.1:4500", quic=False)
    assert NodeConfig.from_json(off.to_json()).quic is False


def test_a_config_written_before_the_rung_has_quic_on() -> None:
    text = NodeConfig(ADDR, "127.0.0.1:4500").to_json()
    old = json.loads(text)
    del old["quic"]
    assert NodeConfig.from_json(json.dumps(old)).quic is True


@pytest.mark.parametrize("value", ['"off"', "0", "null"])
def test_a_quic_value_that_is_not_true_or_false_is_named(value: str) -> None:
    text = NodeConfig(ADDR, "127.0.0.1:4500").to_json().replace('"quic": true',
                                                                f'"quic": {value}')
    with pytest.raises(DecodeError, match="quic must be true or false"):
        NodeConfig.from_json(text)
