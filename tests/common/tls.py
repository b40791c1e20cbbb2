"""
Test certificates and TLS clients: a three-level test PKI written to files
(L{make_chain}), permissive pyOpenSSL clients (L{client_context}) and
handshakes run entirely in memory (L{handshake}, L{pump}).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from typing import Any, Optional

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.trial.unittest import SkipTest

__all__ = ["Chain", "Handshake", "client_context", "handshake", "make_chain", "pem", "pump"]


# -- certificates ------------------------------------------------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    key: Any, subject: str, issuer_key: Any, issuer: str, ca: bool, days: int
) -> x509.Certificate:
    """
    A certificate as a public CA would issue it: key identifiers, key usage,
    and for a leaf the serverAuth EKU and a SAN for localhost and 127.0.0.1.
    """
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        )
    )
    if ca:
        usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
    else:
        usage = x509.KeyUsage(
            True, False, isinstance(key, rsa.RSAPrivateKey), False, False, False, False, False, False
        )
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        ).add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.add_extension(usage, critical=True).sign(issuer_key, hashes.SHA256())


def pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


@attrs.frozen
class Chain:
    """
    Files of a test PKI: C{ca} (the root, to trust), C{cert} (leaf then
    intermediate, like ACME's fullchain.pem) and C{key}.
    """

    ca: str
    cert: str
    key: str
    leaf: x509.Certificate
    intermediate: x509.Certificate


def make_chain(directory: str, key_type: str = "ec", days: int = 89) -> Chain:
    """
    Write a root CA, an intermediate CA and a leaf for localhost issued by
    the intermediate into C{directory}.

    The leaf is ECDSA P-256 or RSA 2048, signed with ECDSA SHA-256 and
    valid for C{days} (Mozilla's modern profile wants at most 90).
    """
    os.makedirs(directory, exist_ok=True)
    root_key = ec.generate_private_key(ec.SECP256R1())
    intermediate_key = ec.generate_private_key(ec.SECP256R1())
    leaf_key: Any = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if key_type == "rsa"
        else ec.generate_private_key(ec.SECP256R1())
    )
    root = _certificate(root_key, "Test Root CA", root_key, "Test Root CA", True, 365)
    intermediate = _certificate(
        intermediate_key, "Test Intermediate CA", root_key, "Test Root CA", True, 365
    )
    leaf = _certificate(leaf_key, "localhost", intermediate_key, "Test Intermediate CA", False, days)
    paths = [os.path.join(directory, name) for name in ("ca.pem", "fullchain.pem", "privkey.pem")]
    contents = [
        pem(root),
        pem(leaf) + pem(intermediate),
        leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    ]
    for path, data in zip(paths, contents):
        with open(path, "wb") as f:
            f.write(data)
    return Chain(paths[0], paths[1], paths[2], leaf, intermediate)


# -- in-memory handshakes ----------------------------------------------------


@attrs.define
class Handshake:
    """
    The outcome of one in-memory handshake.
    """

    client: SSL.Connection
    server: SSL.Connection
    client_error: Optional[SSL.Error]
    server_error: Optional[SSL.Error]

    @property
    def ok(self) -> bool:
        return self.client_error is None and self.server_error is None

    def server_reason(self) -> str:
        return repr(self.server_error)


def pump(client: SSL.Connection, server: SSL.Connection) -> tuple[Optional[SSL.Error], Optional[SSL.Error]]:
    errors: list[Optional[SSL.Error]] = [None, None]
    for _ in range(40):
        moved = False
        for index, (conn, other) in enumerate(((client, server), (server, client))):
            if errors[index] is None:
                try:
                    conn.do_handshake()
                except SSL.WantReadError:
                    pass
                except SSL.Error as e:
                    errors[index] = e
            try:
                data = conn.bio_read(65536)
            except SSL.WantReadError:
                data = b""
            if data:
                other.bio_write(data)
                moved = True
        if not moved:
            break
    return errors[0], errors[1]


def handshake(server: Any, client_context: SSL.Context) -> Handshake:
    """
    Run a handshake between a new server connection from C{server} (an
    C{IOpenSSLServerConnectionCreator}) and a client using
    C{client_context}, entirely in memory.
    """
    server_conn = server.serverConnectionForTLS(None)
    server_conn.set_accept_state()
    client_conn = SSL.Connection(client_context, None)
    client_conn.set_connect_state()
    client_conn.set_tlsext_host_name(b"localhost")
    client_error, server_error = pump(client_conn, server_conn)
    return Handshake(client_conn, server_conn, client_error, server_error)


def client_context(
    version: Optional[int] = None,
    ciphers: bytes = b"ALL:COMPLEMENTOFALL:@SECLEVEL=0",
    tls13: Optional[bytes] = None,
    groups: Optional[bytes] = None,
    cafile: Optional[str] = None,
) -> SSL.Context:
    """
    A permissive client: every cipher OpenSSL has (security level 0, so the
    client is never the one refusing), optionally pinned to one protocol
    version, one group, or verifying the server against C{cafile}.
    """
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(version or SSL.TLS1_VERSION)
    if version:
        context.set_max_proto_version(version)
    context.set_cipher_list(ciphers)
    if tls13 is not None:
        context.set_tls13_ciphersuites(tls13)
    if groups is not None:
        from OpenSSL._util import lib

        if lib.SSL_CTX_set1_curves_list(context._context, groups) != 1:
            raise SkipTest(f"this OpenSSL has no group {groups!r}")
    if cafile is not None:
        context.load_verify_locations(cafile)
        context.set_verify(SSL.VERIFY_PEER)
    return context
