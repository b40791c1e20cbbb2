# -*- test-case-name: tests.test_tls -*-
"""
Implicit TLS for the listener.

The relay does not use C{SSL4ServerEndpoint} directly: it wraps whatever
stream endpoint it listens on (TCP, or a C{systemd:} socket) in TLS the way
txsni does, with a L{TLSMemoryBIOFactory}.  That is exactly what
C{listenSSL} does inside Twisted, with one addition: the wrapper sees the
first bytes before OpenSSL does, so a client that speaks plaintext SMTP or
waits for a banner (a STARTTLS-configured client on the implicit-TLS port)
is told in one plaintext line what is wrong instead of timing out in
silence.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet.interfaces import IDelayedCall, IProtocolFactory, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import AcceptableCiphers, CertificateOptions, TLSVersion
from twisted.logger import Logger
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory

from .config import ConfigError
from .replies import NOT_TLS

_log = Logger()

# ECDHE key exchange with AEAD ciphers only (TLS 1.2); TLS 1.3 suites are
# all AEAD with (EC)DHE and are configured by OpenSSL itself.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"

# A TLS record starts with content type 22 (handshake) and major version 3.
_TLS_HANDSHAKE = 0x16


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path!r}: {e.strerror or e}") from None


def load_certificate_options(cert_path: str, key_path: Optional[str]) -> CertificateOptions:
    """
    Build the server's TLS settings from PEM files.

    @param cert_path: the certificate, optionally followed by its chain
        (leaf first, as ACME clients write C{fullchain.pem}).
    @param key_path: the private key; C{None} if it is in C{cert_path}.
    @raise ConfigError: with a one-line reason when a file is missing,
        unreadable, not PEM, or the key does not match the certificate.
    """
    cert_pem = _read(cert_path, "TLS certificate")
    key_pem = _read(key_path, "TLS key") if key_path else cert_pem
    try:
        certs = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise ConfigError(f"TLS certificate {cert_path!r} holds no PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        where = key_path or cert_path
        raise ConfigError(
            f"TLS key {where!r} holds no usable unencrypted PEM private key ({e.__class__.__name__})"
        ) from None
    leaf = certs[0]
    if leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise ConfigError(
            f"TLS key does not match the first certificate in {cert_path!r}"
        )
    options = CertificateOptions(
        privateKey=key,
        certificate=leaf,
        extraCertChain=list(certs[1:]),
        raiseMinimumTo=TLSVersion.TLSv1_2,
        acceptableCiphers=AcceptableCiphers.fromOpenSSLCipherString(TLS12_CIPHERS),
    )
    # No renegotiation (CertificateOptions already disables compression and
    # prefers the server's cipher order).
    context = options.getContext()
    context.set_options(getattr(SSL, "OP_NO_RENEGOTIATION", 0) | SSL.OP_NO_COMPRESSION)
    return options


class ImplicitTLSProtocol(BufferingTLSTransport):
    """
    A server TLS connection that refuses plaintext clients politely.

    If the first byte is not a TLS handshake record, or no byte arrives
    within the factory's C{detectTimeout}, one plaintext C{554 5.7.0} line is
    written under the TLS layer and the connection closes.  The application
    protocol's own greeting is inside TLS and is never seen in plaintext.
    """

    factory: "ImplicitTLSFactory"
    _detectCall: Optional[IDelayedCall] = None
    _sawFirstByte = False

    def makeConnection(self, transport: Any) -> None:
        super().makeConnection(transport)
        timeout = self.factory.detectTimeout
        if timeout and self.transport is not None and not self._sawFirstByte:
            self._detectCall = self.factory._clock.callLater(timeout, self._refusePlaintext)

    def dataReceived(self, data: bytes) -> None:
        if not self._sawFirstByte and data:
            self._sawFirstByte = True
            self._cancelDetect()
            if data[0] != _TLS_HANDSHAKE:
                self._refusePlaintext()
                return
        super().dataReceived(data)

    def _cancelDetect(self) -> None:
        if self._detectCall is not None and self._detectCall.active():
            self._detectCall.cancel()
        self._detectCall = None

    def _refusePlaintext(self) -> None:
        self._detectCall = None
        self._sawFirstByte = True
        peer = self.transport.getPeer()
        _log.info(
            "refused plaintext client {client}: port requires implicit TLS",
            client=getattr(peer, "host", str(peer)),
            event="tls_plaintext_refused",
        )
        # Written under the TLS layer, in clear.
        self.transport.write(NOT_TLS.line())
        self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self._cancelDetect()
        super().connectionLost(reason)


class ImplicitTLSFactory(TLSMemoryBIOFactory):
    """
    Wraps an SMTP factory in server-side TLS with plaintext detection.
    """

    protocol = ImplicitTLSProtocol

    def __init__(
        self,
        contextFactory: Any,
        wrappedFactory: IProtocolFactory,
        detectTimeout: float,
        clock: Optional[IReactorTime] = None,
    ) -> None:
        super().__init__(contextFactory, False, wrappedFactory, clock)
        self.detectTimeout = detectTimeout
