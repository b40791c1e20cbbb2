"""
Tests for TLS settings and plaintext detection (L{poststack_relay.tls}).
"""

from __future__ import annotations

import os

from OpenSSL import SSL
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from poststack_relay.config import ConfigError
from poststack_relay.testing import make_certificate, write_certificate
from poststack_relay.implicittls import ImplicitTLSFactory
from poststack_relay.tls import load_certificate_options


class Recorder(Protocol):
    made = False

    def connectionMade(self) -> None:
        self.made = True
        self.transport.write(b"220 banner\r\n")


class LoadTests(SynchronousTestCase):
    def write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)

    def test_ec_and_rsa(self) -> None:
        """ECDSA and RSA certificates both load."""
        for kind in ("ec", "rsa"):
            cert, key = write_certificate(os.path.join(self.dir, kind), key_type=kind)
            load_certificate_options(cert, key)

    def test_chain_and_key_in_one_file(self) -> None:
        """A full chain (leaf, intermediate) with the key in the same file loads, and the chain is served."""
        ca_pem, _, ca_key = make_certificate("Test CA", ca=True)
        from cryptography import x509

        ca_name = x509.load_pem_x509_certificate(ca_pem).subject
        leaf_pem, leaf_key_pem, _ = make_certificate("localhost", issuer_key=ca_key, issuer_name=ca_name)
        path = self.write("full.pem", leaf_pem + ca_pem + leaf_key_pem)
        options = load_certificate_options(path, None)
        self.assertEqual(len(options.extraCertChain), 1)

    def test_errors(self) -> None:
        """Missing files, non-PEM files and a mismatched key are one-line ConfigErrors."""
        cert, key = write_certificate(os.path.join(self.dir, "a"))
        other_cert, other_key = write_certificate(os.path.join(self.dir, "b"))
        garbage = self.write("garbage.pem", b"hello\n")
        cases = [
            (os.path.join(self.dir, "missing.pem"), key, "cannot read TLS certificate"),
            (cert, os.path.join(self.dir, "missing.key"), "cannot read TLS key"),
            (garbage, key, "holds no PEM certificate"),
            (cert, garbage, "holds no usable unencrypted PEM private key"),
            (cert, other_key, "does not match"),
        ]
        for c, k, text in cases:
            with self.assertRaises(ConfigError) as ctx:
                load_certificate_options(c, k)
            self.assertIn(text, str(ctx.exception))
            self.assertNotIn("\n", str(ctx.exception))

    def test_protocol_settings(self) -> None:
        """The context refuses compression and renegotiation (versions: see the e2e tests)."""
        cert, key = write_certificate(self.dir)
        context = load_certificate_options(cert, key).getContext()
        options = context.set_options(0)
        self.assertTrue(options & SSL.OP_NO_COMPRESSION)
        self.assertTrue(options & SSL.OP_NO_RENEGOTIATION)


class DetectionTests(SynchronousTestCase):
    def connect(self, timeout: float = 2.0):  # type: ignore[no-untyped-def]
        directory = self.mktemp()
        cert, key = write_certificate(directory)
        clock = Clock()
        wrapped = Factory.forProtocol(Recorder)
        factory = ImplicitTLSFactory(load_certificate_options(cert, key), wrapped, timeout, clock)
        proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 2))
        proto.makeConnection(transport)
        return proto, transport, clock

    def test_plaintext_command(self) -> None:
        """A client that speaks plaintext SMTP gets one 554 5.7.0 line explaining implicit TLS, and no banner."""
        proto, transport, clock = self.connect()
        proto.dataReceived(b"EHLO client\r\n")
        self.assertTrue(transport.value().startswith(b"554 5.7.0 This port requires TLS from the first byte"))
        self.assertNotIn(b"220", transport.value())
        self.assertTrue(transport.disconnecting)

    def test_plaintext_line_names_each_clients_setting(self) -> None:
        """The 554 line is one SMTP line under 512 octets naming the implicit-TLS setting of each client docs/interop.md covers."""
        proto, transport, clock = self.connect()
        proto.dataReceived(b"EHLO client\r\n")
        line = transport.value()
        self.assertLess(len(line), 512)
        self.assertEqual(line.count(b"\r\n"), 1)
        self.assertTrue(line.endswith(b"\r\n"))
        for setting in (
            b"secure: true (nodemailer)",
            b"smtplib.SMTP_SSL",
            b"use_tls=True (aiosmtplib)",
            b"EMAIL_USE_SSL (Django)",
            b"ENCRYPTION_SMTPS (PHPMailer)",
            b"tls: true (Ruby, Rails)",
            b"tls.Dial (Go)",
            b"mail.smtp.ssl.enable (JavaMail)",
            b"--tlsc (swaks)",
            b"smtps:// (curl, s-nail)",
            b"tls_starttls off (msmtp)",
            b"smtp_tls_wrappermode = yes (Postfix)",
            b"STARTTLS is not offered",
        ):
            self.assertIn(setting, line)

    def test_silent_client(self) -> None:
        """A client waiting for a banner gets the 554 line after the detect time-out."""
        proto, transport, clock = self.connect(2.0)
        clock.advance(1.9)
        self.assertEqual(transport.value(), b"")
        clock.advance(0.2)
        self.assertTrue(transport.value().startswith(b"554 5.7.0 "))
        self.assertTrue(transport.value().endswith(b"\r\n"))
        self.assertEqual(transport.value().count(b"\r\n"), 1)

    def test_disabled(self) -> None:
        """With a detect time-out of 0, a silent client hears nothing."""
        proto, transport, clock = self.connect(0)
        clock.advance(100)
        self.assertEqual(transport.value(), b"")

    def test_tls_client_not_refused(self) -> None:
        """A TLS handshake record cancels the timer and goes to OpenSSL."""
        proto, transport, clock = self.connect(2.0)
        proto.dataReceived(b"\x16\x03\x01\x00\x05hello")
        clock.advance(10)
        self.assertNotIn(b"554", transport.value())

