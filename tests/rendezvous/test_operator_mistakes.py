"""An operator's obvious mistakes with real `peerpost-rendezvous serve` processes, each
answered with one line that names what to fix: a TLS certificate or key that is missing,
not PEM, encrypted or not the certificate's; a UDP port in use (the OS's reason, not
uvloop's "could not bind"); a PostgreSQL that does not answer (not "cannot listen"); and a
second instance on one database started without a copy of the domain's domain_key.json."""

from __future__ import annotations

import datetime
import shutil
import socket
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from rendezvous.domainkey import fingerprint, load_or_create

from .conftest import DOMAIN
from .test_operator import run, serve

pytestmark = pytest.mark.slow


def _pem_pair(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for `name` and its key, as an operator's CA files."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30)).sign(key, hashes.SHA256()))
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


async def test_tls_file_mistakes_are_one_line_naming_the_flag_and_file(tmp_path: Path) -> None:
    cert, key = _pem_pair(tmp_path, "mail.example.net")
    other_cert, other_key = _pem_pair(tmp_path, "other.example.net")
    locked = tmp_path / "locked.key"
    loaded = serialization.load_pem_private_key(key.read_bytes(), None)
    locked.write_bytes(loaded.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pass phrase")))
    missing = tmp_path / "nope" / "cert.pem"
    data = tmp_path / "data"
    cases = [
        ((missing, key), f"--tls-cert {missing}: No such file or directory"),
        ((cert, missing), f"--tls-key {missing}: No such file or directory"),
        ((cert, other_key), f"--tls-key {other_key} is not the private key of --tls-cert "
                            f"{cert}"),
        ((key, cert), f"--tls-cert {key} is not a PEM certificate "
                      "(-----BEGIN CERTIFICATE-----)"),
        ((cert, other_cert), f"--tls-key {other_cert} is not a PEM private key "
                             "(-----BEGIN PRIVATE KEY-----)"),
        ((cert, locked), f"--tls-key {locked} is encrypted: give the key without a pass "
                         "phrase (mode 0600)"),
    ]
    for (c, k), text in cases:
        code, out, err = await run("serve", "--domain", DOMAIN, "--data", str(data),
                                   "--listen", "127.0.0.1:0", "--stun-port", "off",
                                   "--dht-port", "off", "--tls-cert", str(c), "--tls-key", str(k))
        assert (code, out, err) == (1, "", f"peerpost-rendezvous: {text}\n")
    assert not data.exists()  # a typo leaves no data folder (and no domain key) behind
    # The right pair serves.
    async with serve(data, "--tls-cert", str(cert), "--tls-key", str(key),
                     "--stun-port", "off", "--dht-port", "off", expect=1) as srv:
        assert srv.lines[0].startswith("listening 127.0.0.1:")


async def test_a_udp_port_in_use_says_the_os_reason(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        for flag, other, name in (("--stun-port", "--dht-port", "STUN"),
                                  ("--dht-port", "--stun-port", "DHT")):
            code, _, err = await run("serve", "--domain", DOMAIN, "--data",
                                     str(tmp_path / "data"), "--listen", "127.0.0.1:0",
                                     flag, str(port), other, "off")
            errors = [ln for ln in err.splitlines() if ln.startswith("peerpost-rendezvous:")]
            assert code == 1 and errors == [
                f"peerpost-rendezvous: cannot run {name} on 127.0.0.1:{port} (UDP): Address "
                f"already in use ({flag} N moves it, off turns it off)"], err


@pytest.mark.parametrize("port", [4500, 0])
async def test_a_listen_address_this_host_lacks_blames_listen(tmp_path: Path, port: int) -> None:
    # Was "cannot run STUN on 192.0.2.1:P (UDP): Cannot assign requested address
    # (--stun-port N moves it, off turns it off)": STUN binds first, and took the blame.
    code, _, err = await run("serve", "--domain", DOMAIN, "--data", str(tmp_path / "data"),
                             "--listen", f"192.0.2.1:{port}")
    errors = [ln for ln in err.splitlines() if ln.startswith("peerpost-rendezvous:")]
    assert code == 1 and errors == [
        f"peerpost-rendezvous: cannot listen on 192.0.2.1:{port} (TCP): Cannot assign "
        "requested address (not an address of this host: check --listen)"], err


async def test_a_data_folder_that_cannot_be_one_names_the_flag(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    for data, why in (("afile", "it is a file"), ("afile/sub", "Not a directory")):
        code, _, err = await run("serve", "--domain", DOMAIN, "--data", str(tmp_path / data),
                                 "--listen", "127.0.0.1:0")
        errors = [ln for ln in err.splitlines() if ln.startswith("peerpost-rendezvous:")]
        assert code == 1 and errors == [  # was "[Errno 17] File exists: '.../afile'"
            f"peerpost-rendezvous: cannot use --data {tmp_path / data} as the data folder: "
            f"{why}"], err


async def test_a_start_that_never_listened_binds_no_domain(tmp_path: Path) -> None:
    # A mistyped domain whose first start failed (its port taken) was kept: the folder was
    # then "data serves exmaple.net, not example.net", and `invite` took the typo.
    data = tmp_path / "data"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, _, err = await run("serve", "--domain", "exmaple.net", "--data", str(data),
                                 "--listen", f"127.0.0.1:{port}", "--stun-port", "off",
                                 "--dht-port", "off")
    assert code == 1 and f"cannot listen on 127.0.0.1:{port} (TCP)" in err, err
    code, _, err = await run("invite", "bob@exmaple.net", "--data", str(data))
    # What to run names --domain, which `serve` can't go without.
    assert code == 1 and err.strip().splitlines()[-1] == (
        f"peerpost-rendezvous: {data} is not a server's data folder yet: no `serve` has "
        "listened with it (one that failed to start, say on a port in use, does not count: "
        "its error says why); start `peerpost-rendezvous serve --domain DOMAIN --data "
        f"{data}` first"), err
    async with serve(data, "--stun-port", "off", "--dht-port", "off", expect=1) as srv:
        await srv.wait_log(f"event=server.listening domain={DOMAIN} ")
        code, out, err = await run("invite", f"bob@{DOMAIN}", "--data", str(data))
        assert code == 0 and out.strip(), err
    # Once it has listened, the folder is the domain's.
    code, _, err = await run("serve", "--domain", "other.test", "--data", str(data),
                             "--listen", "127.0.0.1:0")
    assert code == 1 and f"{data} serves {DOMAIN}, not other.test" in err, err


async def test_a_database_that_does_not_answer_is_not_a_busy_listen_port(
        tmp_path: Path) -> None:
    pytest.importorskip("asyncpg")
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        url = f"postgresql://peerpost@127.0.0.1:{port}/rv"
        code, _, err = await run("serve", "--domain", DOMAIN, "--data", str(tmp_path / "d"),
                                 "--listen", "127.0.0.1:0", "--stun-port", "off",
                                 "--dht-port", "off", "--store", url)
    errors = [ln for ln in err.splitlines() if ln.startswith("peerpost-rendezvous:")]
    assert code == 1 and errors == [
        f"peerpost-rendezvous: cannot connect to {url}: Connection refused"], err


async def test_the_operator_commands_name_a_database_that_does_not_answer(
        tmp_path: Path) -> None:
    # `accounts` and `devices` printed "peerpost-rendezvous: : cannot connect to ...", an
    # empty file name in front of the database's error.
    pytest.importorskip("asyncpg")
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        url = f"postgresql://peerpost@127.0.0.1:{closed.getsockname()[1]}/rv"
        for args in (("accounts", "list"), ("accounts", "show", "bob@example.net"),
                     ("accounts", "delete", "bob@example.net"),
                     ("devices", "revoke", "bob@example.net", "3f9a01c2"),
                     ("invite", "bob@example.net")):
            code, out, err = await run(*args, "--store", url)
            assert code == 1 and out == "", (args, out)
            (line,) = err.splitlines()
            assert line.startswith(f"peerpost-rendezvous: cannot connect to {url}: "), args


async def test_an_instance_without_the_domain_key_is_refused_on_the_database(
        tmp_path: Path, pg_url: str) -> None:
    first = tmp_path / "one"
    async with serve(first, "--store", pg_url, "--stun-port", "off", "--dht-port", "off",
                     expect=1):
        pass
    served = load_or_create(first)
    stray = tmp_path / "two"  # an instance set up without copying domain_key.json
    code, out, err = await run("serve", "--domain", DOMAIN, "--data", str(stray),
                               "--listen", "127.0.0.1:0", "--stun-port", "off",
                               "--dht-port", "off", "--store", pg_url)
    own = load_or_create(stray)  # the key it made for itself
    errors = [ln for ln in err.splitlines() if ln.startswith("peerpost-rendezvous:")]
    assert code == 1 and out == "" and errors == [
        f"peerpost-rendezvous: {pg_url} is served with the domain key "
        f"{fingerprint(served.public)}, and this instance's domain_key.json holds "
        f"{fingerprint(own.public)}: every instance of a domain needs a copy of the one "
        "domain_key.json in its --data folder (its DNS TXT record publishes it): copy it "
        "from an instance that serves"], err
    # With the copy it serves.
    shutil.copy2(first / "domain_key.json", stray / "domain_key.json")
    async with serve(stray, "--store", pg_url, "--stun-port", "off", "--dht-port", "off",
                     expect=1) as srv:
        assert srv.lines[0].startswith("listening ")


async def test_a_busy_metrics_port_and_an_unknown_listen_host_are_one_line(
        tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, _, err = await run("serve", "--domain", DOMAIN, "--data", str(tmp_path / "d"),
                                 "--stun-port", "off", "--dht-port", "off",
                                 "--metrics", f"127.0.0.1:{port}")
    errors = [ln for ln in err.splitlines() if ln.startswith("peerpost-rendezvous:")]
    assert code == 1 and errors == [
        f"peerpost-rendezvous: cannot serve metrics on 127.0.0.1:{port} (TCP): Address "
        "already in use (--metrics)"], err
    # A host that does not resolve is the --listen flag's fault, not STUN's port.
    code, _, err = await run("serve", "--domain", DOMAIN, "--data", str(tmp_path / "d"),
                             "--listen", "no-such-host.invalid:4500")
    assert code == 1 and err.startswith(
        "peerpost-rendezvous: cannot listen on no-such-host.invalid:4500: "), err
    assert err.rstrip().endswith("(--listen HOST:PORT)") and "STUN" not in err, err


async def test_the_domain_is_checked_and_kept_as_addresses_carry_it(tmp_path: Path) -> None:
    code, _, err = await run("serve", "--domain", "mail example", "--data", str(tmp_path / "x"))
    assert code == 2 and "argument --domain: not a mail domain: 'mail example'" in err
    conf = tmp_path / "rv.toml"
    conf.write_text('domain = "Example.NET."\ndata = "d"\nstun_port = "off"\ndht_port = "off"\n')
    async with serve(tmp_path / "d", "--config", str(conf), expect=1) as srv:
        await srv.wait_log(f"event=server.listening domain={DOMAIN} ")
        code, out, err = await run("invite", f"bob@{DOMAIN}", "--data", str(tmp_path / "d"))
        assert code == 0 and out.strip(), err
