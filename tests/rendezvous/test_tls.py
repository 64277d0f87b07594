"""TLS on a real `peerpost-rendezvous serve`: `openssl s_client -tls1_3` completes a
handshake against the default server; a TLS-terminating proxy with its own certificate
between a client and the server is refused, and the error says why; `--plaintext` is
plaintext; the domain key is made once, 0600, and proves itself to a pinned client."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from overlay.app.lab import _script
from overlay.transports.relay import RelayError, RelayInvite, relay_accept, relay_dial
from rendezvous.client import RendezvousClient, ServerIdentityError
from rendezvous.domainkey import DOMAIN_KEY_NAME, DomainKey, fingerprint
from rendezvous.errors import ConnectionLostError, RequestTimeoutError
from rendezvous.tls import CERT_NAME, KEY_NAME, client_context, self_signed, server_tls

from .conftest import DOMAIN, ident

pytestmark = pytest.mark.slow

ALICE, BOB = ident(51), ident(52)
SCRIPT = _script("peerpost-rendezvous")


@asynccontextmanager
async def serve(data: Path, *extra: str, log: Path | None = None) -> AsyncIterator[int]:
    """A real server on a free port (yielded); its log goes to `log` when given."""
    with contextlib.ExitStack() as files:
        stderr = (files.enter_context(log.open("wb")) if log is not None
                  else asyncio.subprocess.DEVNULL)
        proc = await asyncio.create_subprocess_exec(
            SCRIPT, "serve", "--domain", DOMAIN, "--listen", "127.0.0.1:0", "--data",
            str(data), "--open-registration", *extra, stdout=asyncio.subprocess.PIPE,
            stderr=stderr)
    try:
        if proc.stdout is None:
            raise AssertionError("no stdout pipe")
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        if not line.startswith("listening "):
            raise AssertionError(f"unexpected first line {line!r}")
        yield int(line.rsplit(":", 1)[1])
    finally:
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 30)


def _openssl() -> str:
    path = shutil.which("openssl")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("openssl is missing under CI=true (.ci/run installs it)")
        pytest.skip("openssl is not installed")
    return path


async def test_openssl_s_client_completes_a_tls13_handshake(tmp_path: Path) -> None:
    openssl = _openssl()
    async with serve(tmp_path / "data") as port:
        proc = await asyncio.create_subprocess_exec(
            openssl, "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(b""), 30)
        text = out.decode(errors="replace")
        assert "TLSv1.3" in text, text
        assert "BEGIN CERTIFICATE" in text, text
        # And TLS 1.2 is refused: the server's minimum is 1.3.
        proc12 = await asyncio.create_subprocess_exec(
            openssl, "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_2",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        out12, _ = await asyncio.wait_for(proc12.communicate(b""), 30)
        assert proc12.returncode != 0, out12.decode(errors="replace")
    data = tmp_path / "data"
    for name in (DOMAIN_KEY_NAME, KEY_NAME):
        assert stat.S_IMODE((data / name).stat().st_mode) == 0o600
    assert (data / CERT_NAME).exists()


async def test_the_pinned_domain_key_proves_itself_and_a_wrong_pin_is_refused(
        tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with serve(data) as port:
        key = DomainKey.from_json((data / DOMAIN_KEY_NAME).read_text())
        async with RendezvousClient("127.0.0.1", port, ALICE, "alice@example.net",
                                    register=True, tls=True, server_key=key.public,
                                    reconnect=False) as a:
            assert a.server_key == key.public
        wrong = DomainKey.from_seed(b"\x05" * 32).public
        with pytest.raises(ServerIdentityError) as err:
            await RendezvousClient("127.0.0.1", port, ALICE, "alice@example.net", tls=True,
                                   server_key=wrong, reconnect=False).start()
        assert fingerprint(wrong) in err.value.text and key.fingerprint in err.value.text
        # A plaintext client against the TLS port gets no session.
        with pytest.raises(RequestTimeoutError, match="no CHALLENGE"):
            await RendezvousClient("127.0.0.1", port, ALICE, "alice@example.net",
                                   reconnect=False, request_timeout=3).start()


async def test_plaintext_serves_plaintext(tmp_path: Path) -> None:
    async with serve(tmp_path / "data", "--plaintext") as port:
        async with RendezvousClient("127.0.0.1", port, ALICE, "alice@example.net",
                                    register=True, reconnect=False) as a:
            assert a.server_key is not None
        with pytest.raises(ConnectionLostError, match=r"TLS 1\.3 handshake"):
            await RendezvousClient("127.0.0.1", port, ALICE, "alice@example.net", tls=True,
                                   reconnect=False, request_timeout=3).start()


class TlsProxy:
    """A man in the middle: terminates TLS with its own self-signed certificate and
    opens its own TLS connection to the real server, copying bytes both ways."""

    def __init__(self, cert_dir: Path, upstream: int) -> None:
        cert_dir.mkdir(parents=True, exist_ok=True)
        self.tls = server_tls(*self_signed(cert_dir, DOMAIN))
        self.upstream = upstream
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> TlsProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0,
                                                  ssl=self.tls.context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
        for w in self._writers:
            w.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream,
                                                   ssl=client_context())
        self._writers += [writer, up_w]

        async def copy(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            w.close()

        async with asyncio.TaskGroup() as tg:
            tg.create_task(copy(reader, up_w))
            tg.create_task(copy(up_r, writer))


async def test_a_tls_terminating_proxy_is_refused_and_the_error_says_why(
        tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with serve(data) as port, TlsProxy(tmp_path / "mitm", port) as proxy:
        key = DomainKey.from_json((data / DOMAIN_KEY_NAME).read_text())
        async with RendezvousClient("127.0.0.1", port, BOB, "bob@example.net", register=True,
                                    tls=True, server_key=key.public, reconnect=False):
            pass
        with pytest.raises(ServerIdentityError) as err:
            await RendezvousClient("127.0.0.1", proxy.port, ALICE, "alice@example.net",
                                   register=True, tls=True, server_key=key.public,
                                   reconnect=False).start()
        text = err.value.text
        assert "the server's identity does not match the key pinned for it" in text
        assert key.fingerprint in text and "proxy terminating TLS" in text
        # The relay connection through the proxy is refused the same way.
        with pytest.raises(RelayError) as relay_err:
            await relay_dial("127.0.0.1", proxy.port, ALICE, "alice@example.net",
                             "bob@example.net", BOB.peer_id, timeout=10, tls=True,
                             server_key=key.public)
        assert "does not match the key pinned" in relay_err.value.text
        # Nothing was registered through the proxy: the server refused the device's
        # signature, which covers the proxy's certificate, not the server's.
        async with RendezvousClient("127.0.0.1", port, ALICE, "alice@example.net",
                                    register=True, tls=True, server_key=key.public,
                                    reconnect=False) as a:
            assert a.connected


async def test_a_relayed_stream_over_tls_carries_the_bytes_and_ends_without_warnings(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Nodes reach a real server's relay over TLS, which has no half-close: a protocol that
    # asked to keep its sending half open at the peer's EOF made asyncio log a warning for
    # every relayed stream, in the server's log and in both nodes'.
    data, log = tmp_path / "data", tmp_path / "server.log"
    payload = os.urandom(3 << 20)
    async with serve(data, log=log) as port:
        key = DomainKey.from_json((data / DOMAIN_KEY_NAME).read_text()).public
        async with RendezvousClient("127.0.0.1", port, ALICE, "alice@example.net",
                                    register=True, tls=True, server_key=key), \
                RendezvousClient("127.0.0.1", port, BOB, "bob@example.net", register=True,
                                 tls=True, server_key=key) as bob:

            async def accept() -> bytes:
                async for push in bob.pushes():
                    if isinstance(push, RelayInvite):
                        s = await relay_accept("127.0.0.1", port, BOB, "bob@example.net", push,
                                               tls=True, server_key=key)
                        got = b""
                        while len(got) < len(payload):
                            got += await s.receive_some(1 << 20)
                        await s.send_all(b"k")
                        assert await s.receive_some(1) == b""  # alice closed
                        await s.aclose()
                        return got
                raise AssertionError("no RELAY-INVITE")

            accepting = asyncio.create_task(accept())
            a = await relay_dial("127.0.0.1", port, ALICE, "alice@example.net",
                                 "bob@example.net", BOB.peer_id, timeout=10, tls=True,
                                 server_key=key)
            await a.send_all(payload)
            assert await a.receive_some(1) == b"k"
            await a.aclose()
            assert await asyncio.wait_for(accepting, 20) == payload
    warning = "has no effect when using ssl"
    assert warning not in log.read_text()
    assert not [r for r in caplog.records if warning in r.getMessage()]
