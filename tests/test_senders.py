"""
Tests for who may send as whom: mailbox identities (envelope sender, From,
Sender, Reply-To), API-key identities (the API's domain scope, its 403/422
reaching the client), and the RFC 5321 syntax and length limits of MAIL
and RCPT paths.

Synchronous: StringTransport sessions with a Clock, and either an
in-memory API or the real HTTP client over C{StubTreq} serving the sandbox.
"""

from __future__ import annotations

import base64
from email.header import Header
from typing import Any, Optional

from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from treq.testing import StubTreq

from poststack_relay.api import HTTPEmailAPI, IEmailAPI
from poststack_relay.auth import Identity, PostStackChecker, RelayRealm
from poststack_relay.config import RelayConfig
from poststack_relay.delivery import RelayDelivery
from poststack_relay.fleet import LocalState
from poststack_relay.holds import CredentialHolds
from poststack_relay.replies import Reply
from poststack_relay.sandbox import IN_TREE_DATA_PATH, SandboxResource, SandboxStore, load_sandbox_data
from poststack_relay.smtp import RelayFactory, RelaySMTP
from poststack_relay.testing import MemoryEmailAPI
from poststack_relay.translate import Envelope, TranslationError, translate
from poststack_relay.translate.addressing import sender_fields
from poststack_relay.translate.parse import parse_message

KEY = "sk_test_valid_key_0123456789"
MAILBOX = "alice@yourdomain.com"
MAILBOX_ID = Identity("mailbox", "sk_test_service", MAILBOX, MAILBOX, b"", "mailbox:" + MAILBOX)
KEY_ID = Identity("api_key", KEY, None, "sk_test_va\N{HORIZONTAL ELLIPSIS}", b"", "key:x")
ENV = Envelope(MAILBOX, ("user@example.com",))
SENDER_NOT_OWNED = (
    "550 5.7.1 Sender header must be your mailbox address <alice@yourdomain.com>; "
    "remove it or change it (Reply-To may name any address)"
)
FROM_NOT_OWNED = (
    "550 5.7.1 From must be your mailbox address <alice@yourdomain.com>; change the From header"
)
ENVELOPE_NOT_OWNED = (
    b"550 5.7.1 Sender address rejected: a mailbox login may only send from its own address"
)


def plain(user: str, password: str) -> bytes:
    """An AUTH PLAIN initial response."""
    return base64.b64encode(f"\0{user}\0{password}".encode())


def message(headers: bytes, body: bytes = b"Hello\r\n") -> bytes:
    """A message with C{headers} (each ending CRLF) plus To and Subject."""
    return headers + b"To: user@example.com\r\nSubject: s\r\n\r\n" + body


def line(reply: Reply) -> str:
    """A reply as the client reads it, without CRLF."""
    return reply.line().decode("ascii").rstrip("\r\n")


class Session:
    """
    One SMTP session over a StringTransport against C{api}.
    """

    def __init__(
        self, api: IEmailAPI, clock: Optional[Clock] = None, holds: Optional[CredentialHolds] = None,
        **config: Any,
    ) -> None:
        self.clock = clock or Clock()
        cfg = RelayConfig(metrics_listen="off", 
            tls_cert="unused.pem", hostname="relay.test", service_key="sk_test_relay_service", **config
        )
        checker = PostStackChecker(api, self.clock, cfg.service_key)
        portal = Portal(RelayRealm(lambda i: RelayDelivery(i, api, True, holds)), [checker])
        self.factory = RelayFactory(portal, cfg, self.clock)
        proto = self.factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 1))
        assert isinstance(proto, RelaySMTP)
        self.proto = proto
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 5555))
        self.proto.makeConnection(self.transport)
        self.send(b"EHLO client.test\r\n")

    def send(self, data: bytes) -> list[bytes]:
        """Feed C{data}; the reply lines it caused."""
        self.transport.clear()
        self.proto.dataReceived(data)
        return self.transport.value().split(b"\r\n")[:-1]

    def login(self, user: str, password: str) -> None:
        """AUTH PLAIN, which must succeed."""
        out = self.send(b"AUTH PLAIN " + plain(user, password) + b"\r\n")
        assert out == [b"235 2.7.0 Authentication successful"], out

    def transaction(self, mail_from: str, raw: bytes, rcpt: str = "user@example.com") -> list[bytes]:
        """MAIL, RCPT, DATA and the message; all reply lines."""
        return self.send(
            f"MAIL FROM:<{mail_from}>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n".encode()
            + raw.replace(b"\r\n.", b"\r\n..")
            + b".\r\n"
        )


class MailboxEnvelopeTests(SynchronousTestCase):
    """The envelope sender of a mailbox login."""

    def setUp(self) -> None:
        self.api = MemoryEmailAPI(mailboxes={MAILBOX: "mbpass"})
        self.s = Session(self.api)
        self.s.login(MAILBOX, "mbpass")

    def test_own_address_any_case(self) -> None:
        """MAIL FROM the mailbox's own address is accepted whatever its case."""
        for address in (b"alice@yourdomain.com", b"ALICE@YOURDOMAIN.COM", b"Alice@YourDomain.Com"):
            self.assertEqual(self.s.send(b"MAIL FROM:<" + address + b">\r\n"), [b"250 2.1.0 Ok"])
            self.s.send(b"RSET\r\n")

    def test_other_address(self) -> None:
        """MAIL FROM another address, even on the same domain or with a sub-address, is 550 5.7.1."""
        for address in (b"bob@yourdomain.com", b"alice+x@yourdomain.com", b"alice@yourdomain.com.evil.com"):
            self.assertEqual(self.s.send(b"MAIL FROM:<" + address + b">\r\n"), [ENVELOPE_NOT_OWNED])

    def test_refusals_logged_with_reason(self) -> None:
        """A refused MAIL FROM is one smtp_sender_refused event with its reason: the username as sender, another address."""
        with capturedLogs() as events:
            self.s.send(b"MAIL FROM:<poststack>\r\nMAIL FROM:<bob@yourdomain.com>\r\nMAIL FROM:<alice@yourdomain.com>\r\n")
        refused = [e for e in events if e.get("event") == "smtp_sender_refused"]
        self.assertEqual(
            [(e["session"], e["client"], e["identity"], e["mail_from"], e["reason"], e["reply_code"], e["reply_enhanced"])
             for e in refused],
            [(self.s.proto.session, "192.0.2.7", MAILBOX, "poststack", "no_domain", 553, "5.1.7"),
             (self.s.proto.session, "192.0.2.7", MAILBOX, "bob@yourdomain.com", "not_owned", 550, "5.7.1")],
        )
        self.assertEqual(refused[1]["reply_text"], ENVELOPE_NOT_OWNED.decode()[10:])

    def test_route_does_not_hide_the_address(self) -> None:
        """A source route before another address does not pass as the mailbox."""
        self.assertEqual(
            self.s.send(b"MAIL FROM:<@yourdomain.com:bob@yourdomain.com>\r\n"), [ENVELOPE_NOT_OWNED]
        )
        self.assertEqual(
            self.s.send(b"MAIL FROM:<@relay.example:alice@yourdomain.com>\r\n"), [b"250 2.1.0 Ok"]
        )

    def test_null_sender_needs_own_from(self) -> None:
        """MAIL FROM:<> is accepted (the API sends from the From header), and From must still be the mailbox."""
        out = self.s.transaction("", message(b"From: bob@yourdomain.com\r\n"))
        self.assertEqual(out[-1].decode(), FROM_NOT_OWNED)
        out = self.s.transaction("", message(b"From: alice@yourdomain.com\r\n"))
        self.assertTrue(out[-1].startswith(b"250 2.0.0 Ok: queued as "), out)
        self.assertEqual(self.api.sent[-1][1].payload["from"], "alice@yourdomain.com")


class MailboxHeaderTests(SynchronousTestCase):
    """From, Sender and Reply-To of a mailbox login's message (through RelayDelivery)."""

    def deliver(self, raw: bytes, identity: Identity = MAILBOX_ID) -> tuple[str, MemoryEmailAPI]:
        api = MemoryEmailAPI()
        reply = self.successResultOf(RelayDelivery(identity, api).deliver(ENV, raw))
        return line(reply), api

    def assertSent(self, raw: bytes, identity: Identity = MAILBOX_ID) -> dict[str, Any]:
        text, api = self.deliver(raw, identity)
        self.assertTrue(text.startswith("250 2.0.0 Ok: queued as "), text)
        [(_, request)] = api.sent
        return request.payload

    def assertRefused(self, raw: bytes, expected: str) -> None:
        text, api = self.deliver(raw)
        self.assertEqual(text, expected)
        self.assertEqual(api.sent, [])

    def test_from_with_encoded_display_name(self) -> None:
        """A From with an RFC 2047 display name and the mailbox address passes, the name decoded."""
        name = Header("Al\u00efce M\u00fcller", "utf-8").encode()
        payload = self.assertSent(message(b"From: " + name.encode() + b" <alice@yourdomain.com>\r\n"))
        self.assertEqual(payload["from"], "Al\u00efce M\u00fcller <alice@yourdomain.com>")

    def test_from_case_folded(self) -> None:
        """A From address that matches only after case folding passes."""
        self.assertSent(message(b"From: Alice <ALICE@YourDomain.COM>\r\n"))

    def test_from_other_address(self) -> None:
        """A From naming another address is 550 5.7.1 and nothing is sent."""
        self.assertRefused(message(b"From: Alice <bob@yourdomain.com>\r\n"), FROM_NOT_OWNED)

    def test_from_display_name_is_not_the_address(self) -> None:
        """A display name (plain or encoded) that spells the mailbox does not make another address pass."""
        self.assertRefused(
            message(b'From: "alice@yourdomain.com" <bob@yourdomain.com>\r\n'), FROM_NOT_OWNED
        )
        name = Header("alice@yourdomain.com", "utf-8").encode().encode()
        self.assertRefused(message(b"From: " + name + b" <bob@yourdomain.com>\r\n"), FROM_NOT_OWNED)

    def test_sender_absent_or_own(self) -> None:
        """No Sender, or a Sender naming the mailbox (any case, with a name, folded), passes."""
        self.assertSent(message(b"From: alice@yourdomain.com\r\n"))
        self.assertSent(message(b"From: alice@yourdomain.com\r\nSender: ALICE@yourdomain.com\r\n"))
        self.assertSent(
            message(b"From: alice@yourdomain.com\r\nSender: Alice\r\n <alice@yourdomain.com>\r\n")
        )

    def test_sender_other_address(self) -> None:
        """A Sender naming another address is 550 5.7.1 with the rule in the text; nothing is sent."""
        for sender in (
            b"bob@yourdomain.com",
            b"Alice <bob@yourdomain.com>",
            b'"alice@yourdomain.com" <bob@yourdomain.com>',
            b"alice@yourdomain.com, bob@yourdomain.com",
            b"alice@yourdomain.com\r\n , bob@yourdomain.com",
            b"not an address",
        ):
            self.assertRefused(
                message(b"From: alice@yourdomain.com\r\nSender: " + sender + b"\r\n"), SENDER_NOT_OWNED
            )

    def test_second_sender_header(self) -> None:
        """Every Sender header is checked, not only the first."""
        self.assertRefused(
            message(
                b"From: alice@yourdomain.com\r\nSender: alice@yourdomain.com\r\n"
                b"sender: bob@yourdomain.com\r\n"
            ),
            SENDER_NOT_OWNED,
        )

    def test_sender_fully_encoded(self) -> None:
        """A Sender whose whole value is RFC 2047-encoded is decoded before the check."""
        bad = Header("Bob <bob@yourdomain.com>", "utf-8").encode().encode()
        self.assertRefused(message(b"From: alice@yourdomain.com\r\nSender: " + bad + b"\r\n"), SENDER_NOT_OWNED)
        good = Header("Al\u00efce <alice@yourdomain.com>", "utf-8").encode().encode()
        self.assertSent(message(b"From: alice@yourdomain.com\r\nSender: " + good + b"\r\n"))

    def test_sender_in_body_is_ignored(self) -> None:
        """A 'Sender:' line in the body, or in a header named X-Sender or Original-Sender, is not a Sender header."""
        self.assertSent(
            message(
                b"From: alice@yourdomain.com\r\nX-Sender: bob@yourdomain.com\r\n"
                b"Original-Sender: bob@yourdomain.com\r\n",
                body=b"Sender: bob@yourdomain.com\r\n",
            )
        )

    def test_empty_sender_is_ignored(self) -> None:
        """An empty Sender header claims nothing and passes."""
        self.assertSent(message(b"From: alice@yourdomain.com\r\nSender:\r\n"))

    def test_reply_to_is_free(self) -> None:
        """Reply-To may name any address: it claims no authorship, and reaches the API."""
        payload = self.assertSent(
            message(b"From: alice@yourdomain.com\r\nReply-To: Support <help@elsewhere.example>\r\n")
        )
        self.assertEqual(payload["reply_to"], "Support <help@elsewhere.example>")

    def test_api_key_identity_is_not_checked(self) -> None:
        """For an API-key login the relay leaves From and Sender to the API's domain scope."""
        self.assertSent(
            message(b"From: anyone@anotherdomain.com\r\nSender: someone@else.example\r\n"), KEY_ID
        )


class SenderFieldTests(SynchronousTestCase):
    """
    The Sender fields the policy judges are the parsed message's header
    fields (the Sender rule once scanned the raw header block itself; the
    cases of that scan, through translation now).
    """

    def fields(self, raw: bytes) -> list[list[str]]:
        return sender_fields(parse_message(raw))

    def refused(self, raw: bytes, mailbox: str) -> Optional[str]:
        """The reply text when translation refuses C{raw} for C{mailbox}, else C{None}."""
        try:
            translate(raw, Envelope(mailbox, ("user@example.com",)), mailbox=mailbox)
        except TranslationError as e:
            return e.text
        return None

    def test_values(self) -> None:
        """Fields are unfolded, parsed and kept in order; bare LF line ends work too."""
        self.assertEqual(
            self.fields(b"From: a@b.c\r\nSender: x@y.z\r\nSENDER:\r\n  Name\r\n\t<q@r.s>\r\n\r\nSender: body@x.y\r\n"),
            [["x@y.z"], ["q@r.s"]],
        )
        self.assertEqual(self.fields(b"Sender: a@b.c\nSubject: x\n\nSender: b@c.d\n"), [["a@b.c"]])
        self.assertEqual(self.fields(b"Sender:\r\nSender: \t\r\n\r\n"), [])

    def test_stops_where_the_parser_stops(self) -> None:
        """The header section ends at the first line that is not a header field (the body begins there)."""
        self.assertEqual(self.fields(b"Subject: x\r\nnot a header\r\nSender: b@c.d\r\n\r\n"), [])
        self.assertEqual(self.fields(b"\r\nSender: b@c.d\r\n"), [])
        self.assertEqual(self.fields(b"From someone Mon Jan  1\r\nSender: b@c.d\r\n\r\n"), [["b@c.d"]])
        # "Sender :" (blank before the colon) is no header field to the
        # parser: the header section ends there and the line is body text,
        # which is what the API receives (it never receives a Sender field).
        self.assertEqual(self.fields(b"From: a@b.c\r\nSender : x@y.z\r\n\r\nhi\r\n"), [])

    def test_eight_bit(self) -> None:
        """8-bit header bytes (UTF-8 or not) never raise."""
        self.assertEqual(self.fields("Sender: J\u00f6rg <j@b.de>\r\n\r\n".encode()), [["j@b.de"]])
        self.assertEqual(self.fields(b"Sender: J\xf6rg <J@B.DE>\r\n\r\n"), [["J@B.DE"]])
        self.assertIsNone(self.refused(b"From: j@b.de\r\nSender: J\xf6rg <J@B.DE>\r\nTo: user@example.com\r\n\r\nx\r\n", "j@b.de"))

    def test_first_refusal(self) -> None:
        """The Sender rule is decided before the other limits of the message (thousands of headers here)."""
        raw = b"From: b@c.d\r\n" + b"X-H: v\r\n" * 5000 + b"Sender: b@c.d\r\n\r\n" + b"x" * 1_000_000
        self.assertEqual(self.fields(raw), [["b@c.d"]])
        self.assertEqual(
            self.refused(raw, "x@y.z"),
            "Sender header must be your mailbox address <x@y.z>; remove it or change it (Reply-To may name any address)",
        )
        self.assertEqual(self.refused(raw, "b@c.d"), "Message has more than 1000 header fields; remove some headers")


UNVERIFIED = (
    b"550 5.7.1 Sender address rejected: the domain pendingdomain.com is not verified in PostStack; "
    b"verify it (PostStack dashboard, Domains), or send from a verified domain"
)


class APIKeyScopeTests(SynchronousTestCase):
    """
    API-key identities: the sender rules are the API's (a domain-scoped key,
    an unverified domain), and its 403/422 reach the client as they are.
    The real HTTP client talks to the sandbox through StubTreq.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        store = SandboxStore(self.mktemp())
        self.addCleanup(store.close)
        self.store = store
        sandbox = SandboxResource(store, load_sandbox_data(IN_TREE_DATA_PATH), self.clock)
        api = HTTPEmailAPI(
            StubTreq(sandbox),
            "http://sandbox.invalid/",
            10.0,
            "sk_test_relay_service",
            clock=self.clock,
            max_attempts=1,
            breaker_failures=0,
        )
        self.api = api

    def session(self, key: str, holds: Optional[CredentialHolds] = None) -> Session:
        s = Session(self.api, self.clock, holds)
        s.login("poststack", key)
        return s

    def test_scoped_key_other_domain(self) -> None:
        """A key scoped to yourdomain.com sending from anotherdomain.com gets the API's 403 as 550 5.7.1 naming the domain."""
        s = self.session("sk_test_yourdomain_only")
        out = s.transaction("you@anotherdomain.com", message(b"From: you@anotherdomain.com\r\n"))
        self.assertEqual(
            out[-1],
            b"550 5.7.1 Sender address rejected: this API key may not send from anotherdomain.com; use a key "
            b"allowed to send from it, or send from a verified domain (PostStack API: API key is not allowed "
            b"to send from anotherdomain.com, HTTP 403)",
        )
        self.assertEqual(self.store.emails(), [])

    def test_scoped_key_own_domain(self) -> None:
        """The same key sending from its own domain is accepted."""
        s = self.session("sk_test_yourdomain_only")
        out = s.transaction("you@yourdomain.com", message(b"From: you@yourdomain.com\r\n"))
        self.assertTrue(out[-1].startswith(b"250 2.0.0 Ok: queued as em_"), out)

    def test_scope_follows_the_from_header(self) -> None:
        """The API judges the From header, not the envelope: an in-scope envelope does not carry an out-of-scope From."""
        s = self.session("sk_test_yourdomain_only")
        out = s.transaction("you@yourdomain.com", message(b"From: you@anotherdomain.com\r\n"))
        self.assertTrue(out[-1].startswith(b"550 5.7.1 Sender address rejected: this API key may not send from anotherdomain.com;"), out)

    def test_unverified_domain(self) -> None:
        """A full-access key sending from an unverified domain gets the API's 422 as 550 5.7.1 naming the domain and saying to verify it."""
        s = self.session("sk_test_full_access")
        out = s.transaction("you@pendingdomain.com", message(b"From: you@pendingdomain.com\r\n"))
        self.assertEqual(out[-1], UNVERIFIED + b" (PostStack API: Domain not verified, HTTP 422)")

    def test_unverified_domain_held_at_mail_from(self) -> None:
        """
        After the API's 422 the next MAIL FROM on that domain with that key is
        refused 550 5.7.1 before any DATA, and logged with its reason; another
        domain and another key are not; after --sender-domain-hold it is asked again.
        """
        holds = CredentialHolds(LocalState(self.clock), sender_domain_hold=60.0)
        s = self.session("sk_test_full_access", holds)
        s.transaction("you@pendingdomain.com", message(b"From: you@pendingdomain.com\r\n"))
        with capturedLogs() as events:
            out = s.send(b"MAIL FROM:<Other@PendingDomain.com>\r\n")
        self.assertEqual(out, [UNVERIFIED + b" (PostStack API said HTTP 422 recently)"])
        [event] = [e for e in events if e.get("event") == "smtp_sender_refused"]
        self.assertEqual(
            {k: event[k] for k in ("mail_from", "reason", "reply_code", "reply_enhanced", "identity")},
            {"mail_from": "Other@PendingDomain.com", "reason": "sender_domain", "reply_code": 550,
             "reply_enhanced": "5.7.1", "identity": "sk_test_fu\u2026"},
        )
        self.assertNotIn("sk_test_full_access", repr(event))
        self.assertEqual(s.send(b"MAIL FROM:<you@yourdomain.com>\r\nRSET\r\n"), [b"250 2.1.0 Ok", b"250 2.0.0 Ok"])
        other = self.session("sk_test_sending_access", holds)
        self.assertEqual(other.send(b"MAIL FROM:<you@pendingdomain.com>\r\n"), [b"250 2.1.0 Ok"])
        self.clock.advance(59)
        self.assertEqual(s.send(b"MAIL FROM:<you@pendingdomain.com>\r\n")[0][:9], b"550 5.7.1")
        self.clock.advance(1)
        self.assertEqual(s.send(b"MAIL FROM:<you@pendingdomain.com>\r\n"), [b"250 2.1.0 Ok"])

    def test_template_422_not_held(self) -> None:
        """A 422 that is not about the domain (an unpublished template) stays 554 5.6.0 and holds nothing."""
        holds = CredentialHolds(LocalState(self.clock))
        s = self.session("sk_test_full_access", holds)
        out = s.transaction(
            "you@yourdomain.com",
            message(b"From: you@yourdomain.com\r\nX-PostStack-Template-Id: tpl_draft000000000000000\r\n"),
        )
        self.assertEqual(out[-1], b"554 5.6.0 PostStack API: Template not published (HTTP 422)")
        self.assertEqual(s.send(b"MAIL FROM:<you@yourdomain.com>\r\n"), [b"250 2.1.0 Ok"])

    def test_session_usable_after_refusal(self) -> None:
        """After the API's refusal the same session can send within its scope."""
        s = self.session("sk_test_yourdomain_only")
        s.transaction("you@anotherdomain.com", message(b"From: you@anotherdomain.com\r\n"))
        out = s.transaction("you@yourdomain.com", message(b"From: you@yourdomain.com\r\n"))
        self.assertTrue(out[-1].startswith(b"250 2.0.0 "), out)


class PathLimitTests(SynchronousTestCase):
    """RFC 5321 syntax and length limits of MAIL FROM and RCPT TO paths."""

    def setUp(self) -> None:
        self.api = MemoryEmailAPI(api_keys={KEY})
        self.s = Session(self.api)
        self.s.login("poststack", KEY)

    def mail(self, address: str) -> bytes:
        """MAIL FROM:<address>, with SMTPUTF8 when it is not ASCII."""
        self.s.send(b"RSET\r\n")
        utf8 = b"" if address.isascii() else b" SMTPUTF8"
        [out] = self.s.send(b"MAIL FROM:<" + address.encode() + b">" + utf8 + b"\r\n")
        return out

    def rcpt(self, address: str) -> bytes:
        """RCPT TO:<address> in a new transaction, SMTPUTF8 when the address is not ASCII."""
        utf8 = b"" if address.isascii() else b" SMTPUTF8"
        self.s.send(b"RSET\r\nMAIL FROM:<you@yourdomain.com>" + utf8 + b"\r\n")
        [out] = self.s.send(b"RCPT TO:<" + address.encode() + b">\r\n")
        return out

    def test_local_part(self) -> None:
        """A local part of 64 octets is accepted, 65 is 501 (5.1.7 sender, 5.1.3 recipient)."""
        self.assertEqual(self.mail("a" * 64 + "@yourdomain.com"), b"250 2.1.0 Ok")
        self.assertEqual(self.rcpt("a" * 64 + "@example.com"), b"250 2.1.5 Ok")
        self.assertEqual(
            self.mail("a" * 65 + "@yourdomain.com"),
            b"501 5.1.7 Bad sender address syntax: local part longer than 64 octets (RFC 5321)",
        )
        self.assertEqual(
            self.rcpt("a" * 65 + "@example.com"),
            b"501 5.1.3 Bad recipient address syntax: local part longer than 64 octets (RFC 5321)",
        )

    def test_local_part_counts_octets(self) -> None:
        """UTF-8 counts in octets: 32 two-octet characters fit, 33 do not."""
        self.assertEqual(self.rcpt("\u00e9" * 32 + "@example.com"), b"250 2.1.5 Ok")
        self.assertTrue(self.rcpt("\u00e9" * 33 + "@example.com").startswith(b"501 5.1.3 "))

    def test_path(self) -> None:
        """An address of 254 octets (a 256-octet path) is accepted; 255 is 501 path too long."""
        domain = ".".join(["d" * 63, "e" * 63, "f" * 63, "g" * 49]) + ".com"
        address = "a" * (254 - len(domain) - 1) + "@" + domain
        self.assertEqual(len(address), 254)
        self.assertEqual(self.mail(address), b"250 2.1.0 Ok")
        self.assertEqual(self.rcpt(address), b"250 2.1.5 Ok")
        self.assertEqual(
            self.mail("a" + address),
            b"501 5.1.7 Bad sender address syntax: path longer than 256 octets (RFC 5321)",
        )
        self.assertEqual(
            self.rcpt("a" + address),
            b"501 5.1.3 Bad recipient address syntax: path longer than 256 octets (RFC 5321)",
        )

    def test_path_counts_the_route(self) -> None:
        """A source route counts towards the 256 octets of the path (and is then removed)."""
        address = "a" * 60 + "@" + "b" * 60 + ".example.com"
        route = "@" + "r" * 120 + ".example:"
        self.assertTrue(self.rcpt(route + address).startswith(b"501 5.1.3 Bad recipient address syntax: path"))
        self.assertEqual(self.rcpt("@relay.example:" + address), b"250 2.1.5 Ok")

    def test_domain(self) -> None:
        """A domain over 255 octets is 501 domain too long (checked before the path)."""
        domain = ("x" * 62 + ".") * 4 + "example.com"
        self.assertEqual(len(domain), 263)
        self.assertEqual(
            self.rcpt("a@" + domain),
            b"501 5.1.3 Bad recipient address syntax: domain longer than 255 octets (RFC 5321)",
        )

    def test_comments(self) -> None:
        """Comments (inside the path, or after it, or in a bare address) are 501 with a clear text."""
        sender = b"501 5.1.7 Bad sender address syntax: comments are not allowed in MAIL FROM"
        recipient = b"501 5.1.3 Bad recipient address syntax: comments are not allowed in RCPT TO"
        self.assertEqual(self.mail("you(me)@yourdomain.com"), sender)
        self.assertEqual(self.mail("(me)you@yourdomain.com"), sender)
        self.assertEqual(self.mail("you@yourdomain.com(me)"), sender)
        self.assertEqual(self.s.send(b"RSET\r\nMAIL FROM:<you@yourdomain.com> (me)\r\n")[1:], [sender])
        self.assertEqual(self.s.send(b"MAIL FROM:you@yourdomain.com(me)\r\n"), [sender])
        self.assertEqual(self.rcpt("user(x)@example.com"), recipient)
        self.s.send(b"RSET\r\nMAIL FROM:<you@yourdomain.com>\r\n")
        self.assertEqual(self.s.send(b"RCPT TO:<user@example.com> (the user)\r\n"), [recipient])

    def test_quoted_local_parts(self) -> None:
        """Quoted local parts (spaces, parentheses, an escaped quote inside) are accepted and passed on unchanged."""
        for address in ('"you two"@yourdomain.com', '"a(b)"@example.com', '"a\\"b"@example.com'):
            self.assertEqual(self.rcpt(address), b"250 2.1.5 Ok", address)
        self.assertEqual(self.mail('"you two"@yourdomain.com'), b"250 2.1.0 Ok")

    def test_bad_syntax(self) -> None:
        """Unquoted spaces, brackets, stray quotes or bad domains get the plain syntax replies."""
        for address in ("a b@example.com", 'a"b@example.com', "a@b..com", "a@-b.com", "a\u0085b@example.com", "a\x01@b.com"):
            self.assertEqual(self.rcpt(address), b"501 5.1.3 Bad recipient address syntax", address)
            self.assertEqual(
                self.mail(address.replace("example", "yourdomain")),
                b"553 5.1.7 Sender address rejected: bad address syntax",
                address,
            )

    def test_no_domain_keeps_its_reply(self) -> None:
        """An address without a domain keeps its own (hinting) reply."""
        self.assertTrue(self.mail("poststack").startswith(b"553 5.1.7 Sender address rejected: the sender must be"))
        self.assertTrue(self.mail("you@").startswith(b"553 5.1.7 Sender address rejected: the sender must be"))
        self.assertEqual(self.rcpt("user"), b"501 5.1.3 Bad recipient address syntax")

    def test_address_literal(self) -> None:
        """A domain address literal is accepted."""
        self.assertEqual(self.rcpt("user@[192.0.2.1]"), b"250 2.1.5 Ok")
        self.assertEqual(self.rcpt("user@[IPv6:2001:db8::1]"), b"250 2.1.5 Ok")

    def test_idn_domains_reach_the_api_as_a_labels(self) -> None:
        """
        UTF-8 (IDN) domains are accepted with SMTPUTF8 and reach the API as
        A-labels, the UTF-8 local part as sent; the To header's U-label
        spelling is the same recipient (no Bcc copy).
        """
        out = self.s.send(
            "RSET\r\nMAIL FROM:<you@yourdomain.com> SMTPUTF8\r\nRCPT TO:<j\u00f6rg@b\u00fccher.de>\r\n"
            "DATA\r\n".encode()
            + "From: you@yourdomain.com\r\nTo: J\u00f6rg <j\u00f6rg@B\u00fccher.de>\r\nSubject: s\r\n\r\nhi\r\n.\r\n".encode()
        )
        self.assertTrue(out[-1].startswith(b"250 2.0.0 Ok: queued as "), out)
        payload = self.api.sent[-1][1].payload
        self.assertEqual(payload["to"], ["J\u00f6rg <j\u00f6rg@xn--bcher-kva.de>"])
        self.assertNotIn("bcc", payload)

    def test_idn_domain_length_in_octets(self) -> None:
        """A UTF-8 domain is measured in octets: 130 two-octet characters are over 255."""
        label = "\u00e4" * 60
        domain = ".".join([label, label, "\u00e4" * 10]) + ".de"
        self.assertLess(len(domain), 255)
        self.assertGreater(len(domain.encode()), 255)
        self.assertEqual(
            self.rcpt("a@" + domain),
            b"501 5.1.3 Bad recipient address syntax: domain longer than 255 octets (RFC 5321)",
        )

    def test_nothing_reaches_the_api(self) -> None:
        """After refused paths, DATA is refused and no request is made."""
        self.s.send(b"MAIL FROM:<you(me)@yourdomain.com>\r\n")
        self.assertEqual(self.s.send(b"RCPT TO:<user@example.com>\r\n"), [b"503 5.5.1 Error: need MAIL command"])
        self.s.send(b"MAIL FROM:<you@yourdomain.com>\r\nRCPT TO:<" + b"a" * 65 + b"@example.com>\r\n")
        self.assertEqual(self.s.send(b"DATA\r\n"), [b"503 5.5.1 Error: need RCPT command"])
        self.assertEqual(self.api.sent, [])
