"""TLS 1.3 on the rendezvous port, and the channel binding the handshake signs.

The server presents `--tls-cert/--tls-key` when given, else a self-signed certificate it
makes once in its data folder (`tls_cert.pem`, `tls_key.pem`, 0600; ECDSA P-256). Clients
do not check it against any CA: the domain key vouches for the server instead (see
rendezvous/messages.py), over the **channel binding** = SHA-256 of the server's
certificate (DER), RFC 5929's tls-server-end-point. A proxy that terminates TLS with its
own certificate changes the binding, so neither side's signature verifies through it.
On a plaintext connection (simulator, benchmarks) the binding is empty bytes.
"""

from __future__ import annotations

import datetime
import hashlib
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from rendezvous.keyfile import write_secret_file

CERT_NAME = "tls_cert.pem"
KEY_NAME = "tls_key.pem"
SELF_SIGNED_DAYS = 3650


def binding_of(cert_der: bytes) -> bytes:
    """tls-server-end-point: SHA-256 of the server certificate's DER."""
    return hashlib.sha256(cert_der).digest()


@dataclass(frozen=True, slots=True)
class ServerTls:
    """What a TLS listener needs: its context and the binding of its certificate."""

    context: ssl.SSLContext
    cert_der: bytes

    @property
    def binding(self) -> bytes:
        return binding_of(self.cert_der)

    @property
    def not_after(self) -> datetime.datetime:
        """When the certificate expires (UTC)."""
        return x509.load_der_x509_certificate(self.cert_der).not_valid_after_utc


def server_tls(cert: Path, key: Path) -> ServerTls:
    """A TLS 1.3-only server context for the certificate (chain) in `cert`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(str(cert), str(key))
    leaf = x509.load_pem_x509_certificate(Path(cert).read_bytes())
    return ServerTls(ctx, leaf.public_bytes(serialization.Encoding.DER))


def tls_files_problem(cert: Path, key: Path) -> str | None:
    """Why `--tls-cert cert --tls-key key` cannot serve, in the operator's terms, or None.

    ssl's own errors name neither file ("[SSL] PEM lib", "KEY_VALUES_MISMATCH"), and an
    encrypted key would make OpenSSL ask for a pass phrase on the terminal."""
    blobs: dict[str, bytes] = {}
    for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
        try:
            blobs[flag] = Path(path).read_bytes()
        except OSError as exc:
            return f"{flag} {path}: {exc.strerror or exc}"
    try:
        x509.load_pem_x509_certificate(blobs["--tls-cert"])
    except ValueError:
        return f"--tls-cert {cert} is not a PEM certificate (-----BEGIN CERTIFICATE-----)"
    try:
        serialization.load_pem_private_key(blobs["--tls-key"], password=None)
    except TypeError:
        return f"--tls-key {key} is encrypted: give the key without a pass phrase (mode 0600)"
    except (ValueError, UnsupportedAlgorithm):
        return f"--tls-key {key} is not a PEM private key (-----BEGIN PRIVATE KEY-----)"
    try:
        server_tls(cert, key)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            return f"--tls-key {key} is not the private key of --tls-cert {cert}"
        return f"--tls-cert {cert} with --tls-key {key}: {exc.reason or exc}"
    return None


def self_signed(data_dir: Path, domain: str, now: datetime.datetime | None = None,
                ) -> tuple[Path, Path]:
    """DATA/tls_cert.pem and DATA/tls_key.pem, made once (a self-signed cert for `domain`)."""
    cert_path, key_path = Path(data_dir) / CERT_NAME, Path(data_dir) / KEY_NAME
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domain)])
    start = now or datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start - datetime.timedelta(days=1))
            .not_valid_after(start + datetime.timedelta(days=SELF_SIGNED_DAYS))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain)]), critical=False)
            .sign(key, hashes.SHA256()))
    write_secret_file(key_path, key.private_bytes(serialization.Encoding.PEM,
                                                  serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    write_secret_file(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def client_context() -> ssl.SSLContext:
    """TLS 1.3 or nothing, no CA check: the domain key's signature authenticates instead."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def can_half_close(transport: Any) -> bool:
    """Whether `transport` (None: not connected yet) can keep sending after the peer's EOF,
    as `eof_received` returning True asks. Plain TCP can; TLS has no half-close, and there
    asyncio closes whatever `eof_received` returns and logs a warning for a True."""
    return transport is None or transport.get_extra_info("ssl_object") is None


def peer_binding(transport: Any) -> bytes:
    """The channel binding a client sees on `transport` (b"" when it is not TLS)."""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return b""
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise ssl.SSLError("the server presented no certificate")
    return binding_of(der)
