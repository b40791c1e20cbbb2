# -*- test-case-name: tests.test_contracts -*-
"""
The relay's test kit, for its own tests and for code that embeds it.

  - L{MemoryEmailAPI}: an in-memory L{IEmailAPI}. It passes the same
    contract test (C{tests/test_contracts.py}) as the real client,
    L{poststack_relay.api.HTTPEmailAPI}, talking to the sandbox API; so a
    test written against the fake tells the truth about the real thing.
  - The sandbox API itself (L{poststack_relay.sandbox}) is the fake of the
    PostStack HTTP API: serve its L{SandboxResource
    <poststack_relay.sandbox.SandboxResource>} with C{treq.testing.StubTreq}
    for unit tests, or over loopback HTTP with C{makeSandboxService}.
  - L{make_certificate} and L{write_certificate}: TLS certificates made at
    test time (nothing secret is checked in).

Nothing here touches the network or the global reactor.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from typing import Optional, Union

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from .api import APIError, APIUnavailable, MailboxSuspended
from .interfaces import IEmailAPI
from .replies import reply_for_status
from .translate import EmailRequest

__all__ = ["MemoryEmailAPI", "PrivateKey", "make_certificate", "write_certificate"]

PrivateKey = Union[ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey]
"""The private keys L{make_certificate} makes and signs with."""


@implementer(IEmailAPI)
@attrs.define
class MemoryEmailAPI:
    """
    An in-memory PostStack: known keys and mailboxes, and a list of what
    was sent.

    Set C{unavailable} to make every call fail as if the API were down;
    set C{next_error} to an L{APIError} to fail the next send with it; set
    C{hold} to keep sends pending in C{pending} until the test fires them.

    @ivar api_keys: The keys L{check_api_key} accepts.
    @ivar mailboxes: Mailbox address to password (the address is matched
        case-insensitively; a login gives the address as written here).
    @ivar sent: Every accepted send, as C{(api_key, request)}.
    @ivar tenants: The C{tenant} of every accepted send, in the order of
        C{sent}.
    @ivar refuse_unknown_keys: If true, L{send_email} refuses a key that is
        not in C{api_keys}, as PostStack does; off by default, so a test
        that does not model keys may send with any key.
    @ivar checks: How many key checks and mailbox logins were asked for.
    @ivar suspended: Mailbox addresses (lower case) whose right password
        gives L{MailboxSuspended}, as PostStack's 403 "Mailbox is suspended".
    """

    api_keys: set[str] = attrs.field(factory=set)
    mailboxes: dict[str, str] = attrs.field(factory=dict)
    sent: list[tuple[str, EmailRequest]] = attrs.field(factory=list)
    unavailable: bool = False
    next_error: Optional[APIError] = None
    hold: bool = False
    pending: list[Deferred[str]] = attrs.field(factory=list)
    checks: int = 0
    refuse_unknown_keys: bool = False
    tenants: list[Optional[str]] = attrs.field(factory=list)
    suspended: set[str] = attrs.field(factory=set)

    def check_api_key(self, api_key: str) -> Deferred[bool]:
        """
        Fires C{True} for a key in C{api_keys}, else C{False}; fails with
        L{APIUnavailable} while C{unavailable}.
        """
        self.checks += 1
        if self.unavailable:
            return fail(APIUnavailable())
        return succeed(api_key in self.api_keys)

    def authenticate_mailbox(self, email: str, password: str) -> Deferred[Optional[str]]:
        """
        Fires with the mailbox's own address for the right password, else
        C{None}; fails with L{APIUnavailable} while C{unavailable}, with
        L{MailboxSuspended} for the right password of a C{suspended} one.
        """
        self.checks += 1
        if self.unavailable:
            return fail(APIUnavailable())
        for address, secret in self.mailboxes.items():
            if address.lower() == email.lower() and secret == password:
                if address.lower() in self.suspended:
                    return fail(MailboxSuspended())
                return succeed(address)
        return succeed(None)

    def send_email(
        self, api_key: str, request: EmailRequest, tenant: Optional[str] = None
    ) -> Deferred[str]:
        """
        Record C{request} in C{sent} (and C{tenant} in C{tenants}) and fire
        with a new id (or keep it in C{pending} while C{hold}).

        Fails with C{next_error} if one is set (once); while C{unavailable},
        with the L{APIError} a C{503} answer gives; with
        C{refuse_unknown_keys}, with the one a C{401} gives for a key not in
        C{api_keys}. Nothing is recorded when it fails.

        @raise ValueError: (at once, as the real client) C{request}'s
            idempotency key is not decided: none, or another one in its
            payload (L{poststack_relay.idempotency.keyed} decides it).
        """
        key = request.idempotency_key
        if key is None or request.payload.get("idempotency_key") != key:
            raise ValueError("send_email needs a request whose idempotency key is decided")
        if self.next_error is not None:
            error, self.next_error = self.next_error, None
            return fail(error)
        if self.unavailable:
            return fail(_answered(503, "Service unavailable", "internal_error"))
        if self.refuse_unknown_keys and api_key not in self.api_keys:
            return fail(_answered(401, "Invalid API key", "unauthorized"))
        self.sent.append((api_key, request))
        self.tenants.append(tenant)
        email_id = "em_%020d" % len(self.sent)
        if self.hold:
            d: Deferred[str] = Deferred()
            d.addCallback(lambda _: email_id)
            self.pending.append(d)
            return d
        return succeed(email_id)


def _answered(status: int, message: str, code: str) -> APIError:
    """
    The L{APIError} of an API error answer C{status} with PostStack's body
    C{{"error": message, "code": code}} (its reply from the relay's one
    status-to-reply mapping).
    """
    body = {"error": message, "code": code}
    return APIError(reply_for_status(status, body), status, code)


def make_certificate(
    hostname: str = "localhost",
    key_type: str = "ec",
    days: int = 30,
    issuer_key: Optional[PrivateKey] = None,
    issuer_name: Optional[x509.Name] = None,
    ca: bool = False,
) -> tuple[bytes, bytes, PrivateKey]:
    """
    A certificate for C{hostname} (and 127.0.0.1): (cert PEM, key PEM, key).

    Self-signed unless C{issuer_key}/C{issuer_name} are given.

    @param key_type: C{"ec"} (P-256) or C{"rsa"} (2048 bits).
    @param ca: Make a CA certificate (no subject alternative names).
    """
    key: PrivateKey
    if key_type == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)

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
    Write a self-signed certificate and key into C{directory} (created if
    missing) as C{cert.pem} and C{key.pem}; return their paths (cert, key).
    """
    os.makedirs(directory, exist_ok=True)
    cert_pem, key_pem, _ = make_certificate(hostname, key_type)
    cert_path = os.path.join(directory, "cert.pem")
    key_path = os.path.join(directory, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert_pem)
    with open(key_path, "wb") as f:
        f.write(key_pem)
    return cert_path, key_path
