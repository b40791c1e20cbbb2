# -*- test-case-name: tests.test_smtp -*-
"""
Test helpers for the relay and for code that embeds it: an in-memory
L{IEmailAPI}, and certificates made at test time.
"""

from __future__ import annotations

import datetime
from typing import Any, Optional

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from .api import APIError, APIUnavailable, IEmailAPI
from .translate import EmailRequest


@implementer(IEmailAPI)
@attrs.define
class MemoryEmailAPI:
    """
    An in-memory PostStack: known keys and mailboxes, and a list of what
    was sent.

    Set C{unavailable} to make every call fail as if the API were down;
    set C{next_error} to an L{APIError} to fail the next send with it; set
    C{hold} to keep sends pending in C{pending} until the test fires them.
    """

    api_keys: set[str] = attrs.field(factory=set)
    mailboxes: dict[str, str] = attrs.field(factory=dict)
    sent: list[tuple[str, EmailRequest]] = attrs.field(factory=list)
    unavailable: bool = False
    next_error: Optional[APIError] = None
    hold: bool = False
    pending: list[Deferred[str]] = attrs.field(factory=list)
    checks: int = 0

    def check_api_key(self, api_key: str) -> "Deferred[bool]":
        self.checks += 1
        if self.unavailable:
            return fail(APIUnavailable())
        return succeed(api_key in self.api_keys)

    def authenticate_mailbox(self, email: str, password: str) -> "Deferred[Optional[str]]":
        self.checks += 1
        if self.unavailable:
            return fail(APIUnavailable())
        for address, secret in self.mailboxes.items():
            if address.lower() == email.lower() and secret == password:
                return succeed(address)
        return succeed(None)

    def send_email(self, api_key: str, request: EmailRequest) -> "Deferred[str]":
        if self.next_error is not None:
            error, self.next_error = self.next_error, None
            return fail(error)
        self.sent.append((api_key, request))
        email_id = "em_%020d" % len(self.sent)
        if self.hold:
            d: Deferred[str] = Deferred()
            d.addCallback(lambda _: email_id)
            self.pending.append(d)
            return d
        return succeed(email_id)


def make_certificate(
    hostname: str = "localhost",
    key_type: str = "ec",
    days: int = 30,
    issuer_key: Any = None,
    issuer_name: Optional[x509.Name] = None,
    ca: bool = False,
) -> tuple[bytes, bytes, Any]:
    """
    A certificate for C{hostname} (and 127.0.0.1): (cert PEM, key PEM, key).

    Self-signed unless C{issuer_key}/C{issuer_name} are given.
    """
    if key_type == "rsa":
        key: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    import ipaddress

    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(hostname), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    cert = builder.sign(issuer_key or key, hashes.SHA256())
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert_pem, key_pem, key


def write_certificate(directory: str, hostname: str = "localhost", key_type: str = "ec") -> tuple[str, str]:
    """
    Write a self-signed certificate and key into C{directory}; return
    their paths (cert, key).
    """
    import os

    os.makedirs(directory, exist_ok=True)
    cert_pem, key_pem, _ = make_certificate(hostname, key_type)
    cert_path = os.path.join(directory, "cert.pem")
    key_path = os.path.join(directory, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert_pem)
    with open(key_path, "wb") as f:
        f.write(key_pem)
    return cert_path, key_path
