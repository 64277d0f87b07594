"""Every decoder under a short atheris run, and the saved corpus replayed in-process.

The short run (FUZZ_CI_RUNS inputs per decoder, 30,000 by default: 29 s for all here)
starts from the committed seeds; `make fuzz` runs the long campaign. A crash fails the test
and leaves its input in `tests/fuzz/corpus/<target>/crash-<sha1>`: once the decoder is fixed,
rename it `regress-<what>` and commit it, so the replay test keeps it fixed.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from crypto.identity import DeviceIdentity
from crypto.location import decode_location
from overlay.app.config import NodeConfig
from overlay.dht.state import decode_state
from overlay.dht.wire import decode_datagram
from overlay.mail.receipts import Receipt
from overlay.transfer.frames import decode_header
from overlay.transports.punch import decode_punch
from overlay.transports.quic import decode_quic
from overlay.transports.signalling import decode_signal, decode_unsupported
from rendezvous.messages import decode_request, decode_server_message
from tests.fuzz.driver import CORPUS, REPO, fuzz
from tests.fuzz.seeds import seeds
from tests.fuzz.targets import TARGETS

CI_RUNS = int(os.environ.get("FUZZ_CI_RUNS", "30000"))
# Targets that copy a whole session, seal or unpack on disk per input run ~10x slower:
# fewer inputs in CI.
SLOW = {"transfer_session": 5, "envelope": 2, "folder_archive": 10}


@pytest.mark.parametrize("target", list(TARGETS))
def test_saved_inputs_meet_the_contract(target: str) -> None:
    files = sorted(p for p in (CORPUS / target).iterdir() if p.is_file())
    assert any(p.name.startswith("seed-") for p in files), f"no seeds for {target}"
    for path in files:
        TARGETS[target](path.read_bytes())


@pytest.mark.parametrize("target", list(TARGETS))
def test_fuzz(atheris_available: None, target: str) -> None:
    runs = CI_RUNS // SLOW.get(target, 1)
    out = fuzz(target, runs, timeout=120)
    saved = ", ".join(str(p.relative_to(REPO)) for p in out.artifacts) or "nothing saved"
    assert out.ok, (f"{target} crashed after {out.inputs} inputs ({saved}):\n"
                    + "\n".join(out.log.splitlines()[-40:]))
    # Every input asked for ran: the run did not stop early. libFuzzer's -runs may be
    # passed by one (folder_archive ran 3,001 of 3,000 once, in a fresh clone's CI).
    assert runs <= out.inputs <= runs + 1, (out.inputs, runs)


_ACCEPT: dict[str, Callable[[bytes], object]] = {
    "rendezvous_request": lambda d: decode_request(d, 1 << 20),
    "rendezvous_server_message": lambda d: decode_server_message(d, 1 << 20),
    "transfer_header": lambda d: decode_header(d[1:], bytes(d[0])),
    "dht_datagram": decode_datagram,
    "dht_state": decode_state,
    "location": decode_location,
    "signal": decode_signal,
    "punch_signal": decode_punch,
    "quic_signal": decode_quic,
    "unsupported": lambda d: decode_unsupported(d, "zz-offer"),
    "receipt": Receipt.decode,
    "identity_file": lambda d: DeviceIdentity.from_json(d.decode()),
    "node_config": lambda d: NodeConfig.from_json(d.decode()),
}


@pytest.mark.parametrize("target", list(_ACCEPT))
def test_seeds_are_valid_messages(target: str) -> None:
    """The fuzzer starts from inside each decoder: its seeds decode without a refusal."""
    for label, data in seeds()[target]:
        try:
            _ACCEPT[target](data)
        except Exception as exc:
            raise AssertionError(f"seed {label} of {target} refused: {exc}") from exc


def test_corpus_holds_no_unexplained_crash() -> None:
    crashes = [p.relative_to(REPO) for p in CORPUS.glob("*/*")
               if p.name.startswith(("crash-", "timeout-", "oom-"))]
    assert not crashes, f"crash inputs left in the corpus (fix, then rename regress-): {crashes}"
