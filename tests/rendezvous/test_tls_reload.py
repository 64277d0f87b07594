"""A renewed certificate without a restart: a real `peerpost-rendezvous serve` given
`--tls-cert/--tls-key` presents the files' new certificate after SIGHUP (as `openssl
s_client` sees it), the sessions open before keep working, a client logging in afterwards
verifies the domain key's signature over the new certificate's binding, and files that
can't serve (a key of another certificate) are logged while the old certificate stays.
A reload landing between a connection's accept and its ClientHello is safe too: the
handshake shows the new certificate and the server signs that certificate's binding."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import signal
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from rendezvous.client import RendezvousClient
from rendezvous.domainkey import DOMAIN_KEY_NAME, DomainKey, load_or_create
from rendezvous.server import RendezvousServer
from rendezvous.sqlite_store import SqliteStore
from rendezvous.tls import binding_of, peer_binding, self_signed, server_tls

from .conftest import DOMAIN, ident
from .test_operator import serve
from .test_tls import _openssl

pytestmark = pytest.mark.slow

ALICE, BOB = ident(61), ident(62)


async def presented(openssl: str, port: int) -> bytes:
    """The binding (SHA-256 of the DER) of the certificate `openssl s_client` is shown."""
    proc = await asyncio.create_subprocess_exec(
        openssl, "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(b""), 30)
    pem = re.search(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", out, re.S)
    assert pem is not None, out.decode(errors="replace")
    cert = x509.load_pem_x509_certificate(pem.group(0))
    return binding_of(cert.public_bytes(serialization.Encoding.DER))


def binding_of_file(cert: Path) -> bytes:
    return binding_of(x509.load_pem_x509_certificate(cert.read_bytes())
                      .public_bytes(serialization.Encoding.DER))


async def test_sighup_presents_the_renewed_certificate_and_keeps_sessions(
        tmp_path: Path) -> None:
    openssl = _openssl()
    for name in ("old", "new", "live"):
        (tmp_path / name).mkdir()
    old_cert, old_key = self_signed(tmp_path / "old", DOMAIN)
    new_cert, new_key = self_signed(tmp_path / "new", DOMAIN)
    live = tmp_path / "live"
    cert, key = live / "fullchain.pem", live / "privkey.pem"
    shutil.copy(old_cert, cert)
    shutil.copy(old_key, key)
    data = tmp_path / "data"
    # No STUN or DHT node: nothing here uses them (the other tests' config says the same).
    async with serve(data, "--open-registration", "--tls-cert", str(cert), "--tls-key",
                     str(key), "--stun-port", "off", "--dht-port", "off", expect=1) as srv:
        proc, port = srv.proc, srv.port
        assert await presented(openssl, port) == binding_of_file(old_cert)
        pinned = DomainKey.from_json((data / DOMAIN_KEY_NAME).read_text()).public
        async with contextlib.AsyncExitStack() as stack:
            alice = await stack.enter_async_context(RendezvousClient(
                "127.0.0.1", port, ALICE, "alice@example.net", register=True, tls=True,
                server_key=pinned, reconnect=False))
            # Renewed in place, as certbot does, then the reload its deploy hook sends.
            shutil.copy(new_cert, cert)
            shutil.copy(new_key, key)
            proc.send_signal(signal.SIGHUP)
            line = await srv.wait_log("event=server.tls_reloaded ")
            assert f"sha256={binding_of_file(new_cert).hex()}" in line, line
            assert await presented(openssl, port) == binding_of_file(new_cert)
            # The session from before the reload still answers, on its old certificate.
            assert (await alice.finger("alice@example.net")).address == "alice@example.net"
            assert alice.reconnects == 0
            # A new login checks the domain key's signature over the new binding.
            bob = await stack.enter_async_context(RendezvousClient(
                "127.0.0.1", port, BOB, "bob@example.net", register=True, tls=True,
                server_key=pinned, reconnect=False))
            assert (await bob.finger("alice@example.net")).address == "alice@example.net"

            # A key that is not the certificate's: logged, and the certificate stays.
            shutil.copy(old_key, key)
            proc.send_signal(signal.SIGHUP)
            line = await srv.wait_log("event=server.tls_reload_failed ")
            assert "is not the private key of --tls-cert" in line, line
            assert await presented(openssl, port) == binding_of_file(new_cert)
            async with RendezvousClient("127.0.0.1", port, ident(63), "carol@example.net",
                                        register=True, tls=True, server_key=pinned,
                                        reconnect=False) as carol:
                assert (await carol.finger("bob@example.net")).address == "bob@example.net"
        assert proc.returncode is None  # served on through both reloads


class HeldForwarder:
    """Opens its upstream connection as soon as a client connects (the server accepts it)
    and passes no byte either way until `release` is set."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.port = 0
        self.accepted = asyncio.Event()
        self.release = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> HeldForwarder:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for w in self._writers:
            w.close()
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        self._writers += [writer, up_writer]
        self.accepted.set()
        await self.release.wait()

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def test_a_reload_between_accept_and_client_hello(tmp_path: Path) -> None:
    for name in ("data", "new"):
        (tmp_path / name).mkdir()
    data = tmp_path / "data"
    server = RendezvousServer(DOMAIN, SqliteStore(data / "rv.sqlite3"), open_registration=True,
                              domain_key=load_or_create(data),
                              tls=server_tls(*self_signed(data, DOMAIN)))
    await server.start("127.0.0.1", 0)
    try:
        assert server.address is not None and server.tls is not None
        new = server_tls(*self_signed(tmp_path / "new", DOMAIN))
        wrapped = asyncio.Event()

        class Announced(ssl.SSLObject):
            """The server's TLS object of a connection, made when the server accepts it
            (with the listener's context, the old certificate's), before any ClientHello."""

            def __new__(cls) -> Announced:
                wrapped.set()
                return super().__new__(cls)

        server.tls.context.sslobject_class = Announced
        async with HeldForwarder(server.address[1]) as fwd:
            client = RendezvousClient("127.0.0.1", fwd.port, ALICE, "alice@example.net",
                                      register=True, tls=True,
                                      server_key=server.domain_key.public, reconnect=False)
            login = asyncio.create_task(client.start())
            await asyncio.wait_for(fwd.accepted.wait(), 10)
            await asyncio.wait_for(wrapped.wait(), 10)  # accepted: TLS set up, no byte read
            server.reload_tls(new)
            fwd.release.set()
            await asyncio.wait_for(login, 10)
            try:
                assert client._proto is not None and client._proto.transport is not None
                assert peer_binding(client._proto.transport) == new.binding
                assert (await client.finger("alice@example.net")).address == "alice@example.net"
            finally:
                await client.aclose()
    finally:
        await server.aclose()


async def test_a_reload_naming_a_certificate_without_its_key_keeps_serving(
        tmp_path: Path) -> None:
    """A --config edited to name --tls-cert without --tls-key (the key line lost) is
    logged on SIGHUP, as at start, and the server goes on with the old certificate."""
    openssl = _openssl()
    (tmp_path / "certs").mkdir()
    cert, key = self_signed(tmp_path / "certs", DOMAIN)
    config = tmp_path / "serve.toml"
    both = (f'domain = "{DOMAIN}"\ndata = "data"\nlisten = "127.0.0.1:0"\n'
            'open_registration = true\nstun_port = "off"\ndht_port = "off"\n'
            f'tls_cert = "{cert}"\n')
    config.write_text(both + f'tls_key = "{key}"\n')
    async with serve(tmp_path / "data", "--config", str(config), expect=1) as srv:
        config.write_text(both)
        srv.proc.send_signal(signal.SIGHUP)
        line = await srv.wait_log("event=server.tls_reload_failed ")
        assert "--tls-cert and --tls-key go together" in line, line
        # Not applied, so not reported as changed (it said changed=tls_key).
        line = await srv.wait_log("event=server.reloaded ")
        assert " changed=- " in line, line
        assert await presented(openssl, srv.port) == binding_of_file(cert)
        assert srv.proc.returncode is None, "".join(srv.log[-30:])
