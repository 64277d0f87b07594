"""One ProtocolError base under the rendezvous, transfer and DHT Local/Remote pairs."""

from __future__ import annotations

from types import ModuleType

import pytest

import overlay.dht.errors as dht
import overlay.transfer.errors as transfer
import rendezvous.errors as rendezvous
from crypto.errors import LocalProtocolError, ProtocolError, RemoteProtocolError


@pytest.mark.parametrize("module", [rendezvous, transfer, dht])
def test_each_protocols_errors_are_caught_through_the_one_base(module: ModuleType) -> None:
    local, remote = module.LocalProtocolError, module.RemoteProtocolError
    assert issubclass(local, LocalProtocolError) and issubclass(remote, RemoteProtocolError)
    assert not issubclass(remote, LocalProtocolError)
    with pytest.raises(ProtocolError, match="bad frame"):
        raise remote("bad frame")
