# -*- test-case-name: tests.e2e.test_nodemailer_runner -*-
"""
Tests for L{tests.common.node}: the pinned nodemailer scripts, run against
a tiny in-process implicit-TLS ESMTP server (Twisted's own C{ESMTP}) on
127.0.0.1 with a certificate generated here.

These prove the harness, not the relay: the relay's own end-to-end tests use
the same scripts against the real relay.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
import shutil
import tempfile
import time
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any, Callable, Mapping

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from zope.interface import implementer

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.portal import IRealm, Portal
from twisted.internet import reactor as _global_reactor
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IAddress, IListeningPort
from twisted.internet.protocol import Factory, Protocol, ServerFactory
from twisted.internet.ssl import CertificateOptions
from twisted.mail import smtp
from twisted.mail.imap4 import LOGINCredentials, PLAINCredentials
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase

from tests.common.node import NODE_DIR, NodeScriptError, ensure_node_modules, node_available, run_node_script

reactor: Any = _global_reactor


def make_self_signed_localhost() -> tuple[bytes, bytes]:
    """
    Make a throw-away EC P-256 key and a self-signed certificate for
    C{localhost} (SAN: DNS localhost, IP 127.0.0.1), valid from one hour ago
    for one day. Returns C{(certificate PEM, private key PEM)}.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


@attrs.define
class Received:
    """One message as the test server received it, for one recipient."""

    username: bytes
    mail_from: str
    rcpt_to: str
    data: bytes

    def parsed(self) -> EmailMessage:
        """The message parsed with the modern C{email} policy (CRLF read as LF)."""
        msg = message_from_bytes(self.data.replace(b"\r\n", b"\n"), policy=policy.default)
        assert isinstance(msg, EmailMessage)
        return msg


@attrs.define
class ServerState:
    """What the test server saw: credentials presented and messages received."""

    logins: list[tuple[bytes, bytes]] = attrs.field(factory=list)
    messages: list[Received] = attrs.field(factory=list)


@implementer(smtp.IMessage)
@attrs.define
class _Message:
    state: ServerState
    username: bytes
    mail_from: str
    rcpt_to: str
    lines: list[bytes] = attrs.field(factory=list)

    def lineReceived(self, line: bytes) -> None:
        self.lines.append(line)

    def eomReceived(self) -> Deferred[None]:
        data = b"\r\n".join(self.lines) + b"\r\n"
        self.state.messages.append(
            Received(self.username, self.mail_from, self.rcpt_to, data)
        )
        return succeed(None)

    def connectionLost(self) -> None:
        self.lines.clear()


@implementer(smtp.IMessageDelivery)
@attrs.define
class _Delivery:
    state: ServerState
    username: bytes
    mail_from: str = ""

    def receivedHeader(
        self, helo: tuple[bytes, bytes], origin: smtp.Address, recipients: list[smtp.User]
    ) -> None:
        return None

    def validateFrom(self, helo: tuple[bytes, bytes], origin: smtp.Address) -> smtp.Address:
        self.mail_from = str(origin)
        return origin

    def validateTo(self, user: smtp.User) -> Callable[[], _Message]:
        rcpt, sender = str(user.dest), self.mail_from
        return lambda: _Message(self.state, self.username, sender, rcpt)


@implementer(IRealm)
@attrs.define
class _Realm:
    state: ServerState

    def requestAvatar(
        self, avatarId: bytes, mind: object, *interfaces: Any
    ) -> tuple[Any, _Delivery, Callable[[], None]]:
        if smtp.IMessageDelivery not in interfaces:
            raise NotImplementedError(interfaces)
        return smtp.IMessageDelivery, _Delivery(self.state, avatarId), lambda: None


@implementer(ICredentialsChecker)
@attrs.define
class _AnyPassword:
    """Accepts every user name and password, and records them."""

    state: ServerState
    credentialInterfaces = (IUsernamePassword,)

    def requestAvatarId(self, credentials: IUsernamePassword) -> Deferred[bytes]:
        self.state.logins.append((credentials.username, credentials.password))
        return succeed(credentials.username)


class _TrackedESMTP(smtp.ESMTP):
    """An ESMTP that tells its factory when its connection is gone."""

    lost: Deferred[None]

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        smtp.ESMTP.connectionLost(self, reason)
        self.lost.callback(None)


class _ESMTPFactory(ServerFactory):
    """Builds ESMTP servers that accept any login on the given mechanisms."""

    def __init__(self, state: ServerState, mechanisms: Mapping[bytes, type]) -> None:
        self.portal = Portal(_Realm(state), [_AnyPassword(state)])
        self.mechanisms = dict(mechanisms)
        self.connections: list[_TrackedESMTP] = []

    def buildProtocol(self, addr: IAddress | None) -> _TrackedESMTP:
        proto = _TrackedESMTP(chal=self.mechanisms, contextFactory=None)
        proto.portal = self.portal
        proto.host = b"localhost"
        proto.factory = self
        proto.lost = Deferred()
        self.connections.append(proto)
        return proto


class _RefusePlaintext(Protocol):
    """Writes the relay's plaintext refusal line and closes, as the relay does."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"554 5.7.0 TLS required: use implicit TLS (secure: true)\r\n")
        self.transport.loseConnection()


class _Silent(Protocol):
    """Accepts a connection and never says anything."""


ALL_MECHANISMS = {b"PLAIN": PLAINCredentials, b"LOGIN": LOGINCredentials}


class NodeClientTests(TestCase):
    """The nodemailer scripts, run by L{run_node_script}, against an in-process server."""

    timeout = 120

    def setUp(self) -> None:
        reason = node_available()
        if reason is not None:
            raise SkipTest(reason)
        ensure_node_modules()
        cert_pem, key_pem = make_self_signed_localhost()
        # Not self.mktemp(): under pytest that writes below the working directory.
        self.tmp = tempfile.mkdtemp(prefix="poststack-node-runner-")
        self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)
        self.ca_path = os.path.join(self.tmp, "ca.pem")
        with open(self.ca_path, "wb") as f:
            f.write(cert_pem)
        self.server_tls = CertificateOptions(
            privateKey=load_pem_private_key(key_pem, None),
            certificate=x509.load_pem_x509_certificate(cert_pem),
        )
        self.state = ServerState()

    async def _listen_tls(self, mechanisms: Mapping[bytes, type] = ALL_MECHANISMS) -> int:
        """Start the implicit-TLS ESMTP server on 127.0.0.1:0 and return its port."""
        factory = _ESMTPFactory(self.state, mechanisms)
        endpoint = SSL4ServerEndpoint(
            reactor, 0, self.server_tls, interface="127.0.0.1"
        )
        port: IListeningPort = await endpoint.listen(factory)
        self.addCleanup(self._close_connections, factory)
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    def _close_connections(self, factory: _ESMTPFactory) -> Deferred[list[None]]:
        for proto in factory.connections:
            if proto.transport is not None and not proto.lost.called:
                proto.transport.abortConnection()
        return gatherResults([proto.lost for proto in factory.connections])

    async def _listen_plain(self, protocol: type[Protocol]) -> int:
        """Start a plain TCP server on 127.0.0.1:0 speaking C{protocol}."""
        port: IListeningPort = await TCP4ServerEndpoint(
            reactor, 0, interface="127.0.0.1"
        ).listen(Factory.forProtocol(protocol))
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    def _env(self, port: int, **extra: str) -> dict[str, str]:
        return {
            "SMTP_HOST": "127.0.0.1",
            "SMTP_PORT": str(port),
            "SMTP_CA": self.ca_path,
            **extra,
        }

    async def test_page_html_tags(self) -> None:
        """The page's first example arrives with its html and X-PostStack-Tags header."""
        port = await self._listen_tls()
        result = await run_node_script(reactor, "page_html_tags.mjs", [], self._env(port))
        self.assertTrue(result["ok"], result)
        self.assertEqual(result["response"], "250 Delivery in progress")
        self.assertEqual(
            result["envelope"], {"from": "you@yourdomain.com", "to": ["user@example.com"]}
        )
        self.assertEqual(self.state.logins, [(b"poststack", b"sk_live_...")])
        [received] = self.state.messages
        self.assertEqual(
            (received.mail_from, received.rcpt_to), ("you@yourdomain.com", "user@example.com")
        )
        header, _, _ = received.data.partition(b"\r\n\r\n")
        # Header names are case-insensitive, and nodemailer re-cases them.
        self.assertIn(b"x-poststack-tags: welcome,onboarding", header.lower().split(b"\r\n"))
        self.assertIn(b"X-Poststack-Tags: welcome,onboarding", header.split(b"\r\n"))
        msg = received.parsed()
        self.assertEqual(msg["Subject"], "Hello from PostStack SMTP")
        self.assertEqual(msg["X-PostStack-Tags"], "welcome,onboarding")
        self.assertEqual(msg.get_content_type(), "text/html")
        self.assertEqual(msg.get_content().strip(), "<p>Sent via SMTP relay!</p>")
        self.assertEqual(msg["Message-ID"], result["messageId"])

    async def test_credentials_from_environment(self) -> None:
        """SMTP_USER and SMTP_PASS replace the page's placeholder credentials."""
        port = await self._listen_tls()
        result = await run_node_script(
            reactor,
            "page_html_tags.mjs",
            [],
            self._env(port, SMTP_USER="poststack", SMTP_PASS="sk_test_e2e_key"),
        )
        self.assertTrue(result["ok"], result)
        self.assertEqual(self.state.logins, [(b"poststack", b"sk_test_e2e_key")])

    async def test_auth_login_prompts(self) -> None:
        """nodemailer copes with Twisted's AUTH LOGIN prompts when PLAIN is not offered."""
        port = await self._listen_tls({b"LOGIN": LOGINCredentials})
        result = await run_node_script(reactor, "page_html_tags.mjs", [], self._env(port))
        self.assertTrue(result["ok"], result)
        self.assertEqual(self.state.logins, [(b"poststack", b"sk_live_...")])
        self.assertEqual(len(self.state.messages), 1)

    async def test_page_template(self) -> None:
        """
        The page's template example sends the template id and the variables as
        JSON; nodemailer RFC 2047-encodes that JSON (it holds quotes), re-cases
        the header names and leaves out the empty Subject.
        """
        port = await self._listen_tls()
        result = await run_node_script(reactor, "page_template.mjs", [], self._env(port))
        self.assertTrue(result["ok"], result)
        [received] = self.state.messages
        msg = received.parsed()
        self.assertEqual(msg["X-PostStack-Template-Id"], "tpl_abc123def456ghi789")
        self.assertEqual(
            json.loads(msg["X-PostStack-Variables"]),
            {"first_name": "Alice", "company_name": "Acme Inc"},
        )
        header, _, _ = received.data.partition(b"\r\n\r\n")
        self.assertIn(b"X-Poststack-Template-ID: tpl_abc123def456ghi789", header.split(b"\r\n"))
        self.assertIn(b"X-Poststack-Variables: =?UTF-8?Q?", header)
        self.assertIsNone(msg["Subject"])
        self.assertEqual(msg.get_content_type(), "text/plain")
        self.assertEqual(msg.get_content().strip(), "")

    async def test_rich_full(self) -> None:
        """The 'full' shape carries html, text, two attachments and a cid: image."""
        port = await self._listen_tls()
        result = await run_node_script(reactor, "rich.mjs", ["full"], self._env(port))
        self.assertTrue(result["ok"], result)
        self.assertEqual(result["variant"], "full")
        [received] = self.state.messages
        msg = received.parsed()
        body = msg.get_body(("html",))
        assert body is not None
        self.assertIn('src="cid:logo@yourdomain.com"', body.get_content())
        plain = msg.get_body(("plain",))
        assert plain is not None
        self.assertEqual(plain.get_content().strip(), "Plain-text part.\nSecond line.")
        parts = {
            part.get_filename(): part for part in msg.walk() if part.get_filename() is not None
        }
        self.assertEqual(
            set(parts), {"notes.txt", "Übersicht_été_報告.pdf", "logo.png"}
        )
        self.assertEqual(parts["logo.png"]["Content-ID"], "<logo@yourdomain.com>")
        sent = {a["filename"]: a for a in result["sent"]["attachments"]}
        self.assertEqual(
            parts["Übersicht_été_報告.pdf"].get_content(),
            base64.b64decode(sent["Übersicht_été_報告.pdf"]["content"]["base64"]),
        )

    async def test_rich_calendar(self) -> None:
        """The 'calendar' shape carries a text/calendar part with METHOD:REQUEST."""
        port = await self._listen_tls()
        result = await run_node_script(reactor, "rich.mjs", ["calendar"], self._env(port))
        self.assertTrue(result["ok"], result)
        msg = self.state.messages[0].parsed()
        calendars = [p for p in msg.walk() if p.get_content_type() == "text/calendar"]
        self.assertEqual(len(calendars), 1)
        self.assertEqual(calendars[0].get_param("method"), "REQUEST")
        self.assertIn("SUMMARY:Kick-off", calendars[0].get_content())

    async def test_rich_list(self) -> None:
        """The 'list' shape carries List-Unsubscribe and List-ID headers."""
        port = await self._listen_tls()
        result = await run_node_script(reactor, "rich.mjs", ["list"], self._env(port))
        self.assertTrue(result["ok"], result)
        msg = self.state.messages[0].parsed()
        self.assertEqual(
            msg["List-Unsubscribe"], "<https://yourdomain.com/unsubscribe?u=123> (Unsubscribe)"
        )
        self.assertEqual(msg["List-ID"], '"Your Domain News" <news.yourdomain.com>')

    async def test_rich_ccbcc(self) -> None:
        """The 'ccbcc' shape has display names in To/Cc, and Bcc only in the envelope."""
        port = await self._listen_tls()
        result = await run_node_script(reactor, "rich.mjs", ["ccbcc"], self._env(port))
        self.assertTrue(result["ok"], result)
        self.assertEqual(
            result["envelope"]["to"], ["user@example.com", "cc@example.com", "bcc@example.com"]
        )
        self.assertEqual(
            sorted(m.rcpt_to for m in self.state.messages),
            ["bcc@example.com", "cc@example.com", "user@example.com"],
        )
        msg = self.state.messages[0].parsed()
        self.assertEqual(msg["To"], "User Example <user@example.com>")
        self.assertEqual(msg["Cc"], "Zoë Carbon-Copy <cc@example.com>")
        self.assertEqual(msg["From"], "You at Your Domain <you@yourdomain.com>")
        self.assertIsNone(msg["Bcc"])

    async def test_untrusted_certificate_refused(self) -> None:
        """The scripts verify the server certificate: another self-signed CA is refused."""
        port = await self._listen_tls()
        other_ca = os.path.join(self.tmp, "other-ca.pem")
        with open(other_ca, "wb") as f:
            f.write(make_self_signed_localhost()[0])
        result = await run_node_script(
            reactor, "page_html_tags.mjs", [], self._env(port, SMTP_CA=other_ca)
        )
        self.assertFalse(result["ok"], result)
        self.assertIn("self-signed certificate", result["error"])
        self.assertEqual(self.state.logins, [])

    async def test_plaintext_misconfig_refused(self) -> None:
        """secure: false against a server answering 554 reports the code and the reply text."""
        port = await self._listen_plain(_RefusePlaintext)
        result = await run_node_script(reactor, "plaintext_misconfig.mjs", [], self._env(port))
        self.assertFalse(result["ok"], result)
        self.assertEqual(result["code"], 554)
        self.assertIn("554 5.7.0 TLS required", result["response"])
        self.assertIn("554 5.7.0 TLS required", result["error"])

    async def test_refusal_reported(self) -> None:
        """A server refusing the connection gives ok: false and exit status 0, not an error."""
        port = await self._listen_plain(_RefusePlaintext)
        result = await run_node_script(reactor, "page_html_tags.mjs", [], self._env(port))
        self.assertFalse(result["ok"], result)
        self.assertIsInstance(result["error"], str)

    async def test_timeout_kills_script(self) -> None:
        """A script still running at the timeout is killed and fails with NodeScriptError."""
        port = await self._listen_plain(_Silent)
        started = time.monotonic()
        with self.assertRaises(NodeScriptError) as caught:
            await run_node_script(
                reactor, "page_html_tags.mjs", [], self._env(port), timeout=1.0
            )
        self.assertIn("timed out after 1.0 s", str(caught.exception))
        self.assertLess(time.monotonic() - started, 10)

    async def test_harness_bug_reported(self) -> None:
        """A script exiting with status 2 fails with its stderr in the error."""
        with self.assertRaises(NodeScriptError) as caught:
            await run_node_script(reactor, "rich.mjs", ["nonsense"], self._env(1))
        self.assertIn("exit status 2", str(caught.exception))
        self.assertIn("first argument must be one of", str(caught.exception))

    async def test_unknown_script(self) -> None:
        """A script name outside tests/e2e/node fails without spawning anything."""
        with self.assertRaises(NodeScriptError) as caught:
            await run_node_script(reactor, "../test_e2e_smtp.py", [], {})
        self.assertIn(str(NODE_DIR), str(caught.exception))
