"""
Byte-level tests of the SMTP protocol (L{poststack_relay.smtp}) over a
StringTransport, with an in-memory API and a Clock.
"""

from __future__ import annotations

import base64
from typing import Any

from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from poststack_relay.api import APIError
from poststack_relay.auth import PostStackChecker, RelayRealm
from poststack_relay.config import RelayConfig
from poststack_relay.delivery import RelayDelivery
from poststack_relay.replies import Reply
from poststack_relay.smtp import RelayFactory, RelaySMTP
from poststack_relay.testing import MemoryEmailAPI

KEY = "sk_test_valid_key_0123456789"
MESSAGE = (
    b"From: You <you@yourdomain.com>\r\n"
    b"To: user@example.com\r\n"
    b"Subject: Hello\r\n"
    b"\r\n"
    b"Hi there\r\n"
)


def plain(user: str, password: str, authzid: str = "") -> bytes:
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode())


class Harness:
    def __init__(self, **config: Any) -> None:
        self.api = MemoryEmailAPI(api_keys={KEY}, mailboxes={"alice@yourdomain.com": "mbpass"})
        self.clock = Clock()
        cfg = RelayConfig(metrics_listen="off", tls_cert="unused.pem", hostname="relay.test", service_key="sk_test_service", **config)
        checker = PostStackChecker(self.api, self.clock, cfg.service_key)
        portal = Portal(RelayRealm(lambda i: RelayDelivery(i, self.api)), [checker])
        self.factory = RelayFactory(portal, cfg, self.clock)
        self.proto: RelaySMTP = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 5555))
        self.proto.makeConnection(self.transport)

    def send(self, data: bytes) -> list[bytes]:
        self.transport.clear()
        self.proto.dataReceived(data)
        return self.transport.value().split(b"\r\n")[:-1]

    def login(self) -> None:
        self.send(b"EHLO client.test\r\n")
        assert self.send(b"AUTH PLAIN " + plain("poststack", KEY) + b"\r\n") == [
            b"235 2.7.0 Authentication successful"
        ]


class GreetingTests(SynchronousTestCase):
    def test_banner(self) -> None:
        """The banner names the host and says ESMTP."""
        h = Harness()
        self.assertEqual(h.transport.value(), b"220 relay.test ESMTP PostStack relay\r\n")

    def test_ehlo_capabilities(self) -> None:
        """EHLO advertises exactly AUTH, SIZE, 8BITMIME, PIPELINING, ENHANCEDSTATUSCODES, never STARTTLS."""
        h = Harness(max_message_size=1000)
        lines = h.send(b"EHLO client.test\r\n")
        self.assertEqual(
            lines,
            [
                b"250-relay.test",
                b"250-AUTH PLAIN LOGIN",
                b"250-SIZE 1000",
                b"250-8BITMIME",
                b"250-PIPELINING",
                b"250 ENHANCEDSTATUSCODES",
            ],
        )

    def test_ehlo_needs_argument(self) -> None:
        """EHLO without a name is a syntax error with an enhanced code."""
        self.assertEqual(Harness().send(b"EHLO\r\n"), [b"501 5.5.4 Syntax: EHLO hostname"])

    def test_starttls_refused(self) -> None:
        """STARTTLS is not offered: the session is already TLS."""
        h = Harness()
        h.send(b"EHLO x\r\n")
        self.assertEqual(h.send(b"STARTTLS\r\n"), [b"554 5.5.1 Error: TLS already active"])

    def test_unknown_command(self) -> None:
        """Unknown commands get 502 5.5.2 and the session goes on."""
        h = Harness()
        self.assertEqual(h.send(b"FOO bar\r\n"), [b"502 5.5.2 Error: command not recognized"])
        self.assertEqual(h.send(b"NOOP\r\n"), [b"250 2.0.0 Ok"])

    def test_quit(self) -> None:
        """QUIT says goodbye and closes."""
        h = Harness()
        self.assertEqual(h.send(b"QUIT\r\n"), [b"221 2.0.0 Bye"])
        self.assertTrue(h.transport.disconnecting)

    def test_idle_timeout(self) -> None:
        """A silent client gets 421 4.4.2 after the idle time-out and is disconnected."""
        h = Harness(idle_timeout=300)
        h.transport.clear()
        h.clock.advance(299)
        self.assertFalse(h.transport.disconnecting)
        h.clock.advance(2)
        self.assertEqual(
            h.transport.value(), b"421 4.4.2 Error: timeout exceeded, closing connection\r\n"
        )
        self.assertTrue(h.transport.disconnecting)

    def test_too_many_errors(self) -> None:
        """After 20 errors the session is closed with 421 4.7.0."""
        h = Harness()
        out = h.send(b"BOGUS\r\n" * 25)
        self.assertEqual(out[-1], b"421 4.7.0 Error: too many errors, closing connection")
        self.assertEqual(len(out), 22)
        self.assertTrue(h.transport.disconnecting)

    def test_long_line(self) -> None:
        """An overlong command line gets 500 5.5.2 once and is discarded."""
        h = Harness()
        out = h.send(b"NOOP " + b"x" * 5000 + b"\r\nNOOP\r\n")
        self.assertEqual(out, [b"500 5.5.2 Error: line too long", b"250 2.0.0 Ok"])


class AuthTests(SynchronousTestCase):
    def test_mail_before_auth(self) -> None:
        """MAIL before AUTH is refused with 530 5.7.0."""
        h = Harness()
        h.send(b"EHLO x\r\n")
        self.assertTrue(h.send(b"MAIL FROM:<you@yourdomain.com>\r\n")[0].startswith(b"530 5.7.0 "))
        self.assertTrue(h.send(b"RCPT TO:<a@b.com>\r\n")[0].startswith(b"530 5.7.0 "))

    def test_auth_plain_ok(self) -> None:
        """AUTH PLAIN with poststack + valid key succeeds."""
        h = Harness()
        h.login()

    def test_auth_plain_continuation(self) -> None:
        """AUTH PLAIN without initial response gets an empty 334 challenge."""
        h = Harness()
        h.send(b"EHLO x\r\n")
        self.assertEqual(h.send(b"AUTH PLAIN\r\n"), [b"334 "])
        self.assertEqual(
            h.send(plain("poststack", KEY) + b"\r\n"), [b"235 2.7.0 Authentication successful"]
        )

    def test_auth_login(self) -> None:
        """AUTH LOGIN uses the standard Username:/Password: prompts."""
        h = Harness()
        h.send(b"EHLO x\r\n")
        self.assertEqual(h.send(b"AUTH LOGIN\r\n"), [b"334 VXNlcm5hbWU6"])
        self.assertEqual(h.send(base64.b64encode(b"poststack") + b"\r\n"), [b"334 UGFzc3dvcmQ6"])
        self.assertEqual(
            h.send(base64.b64encode(KEY.encode()) + b"\r\n"),
            [b"235 2.7.0 Authentication successful"],
        )

    def test_auth_bad_key(self) -> None:
        """A wrong key gets 535 5.7.8 with a hint, and MAIL stays refused."""
        h = Harness()
        h.send(b"EHLO x\r\n")
        out = h.send(b"AUTH PLAIN " + plain("poststack", "sk_test_wrong") + b"\r\n")
        self.assertTrue(out[0].startswith(b"535 5.7.8 Authentication credentials invalid"), out)
        self.assertTrue(h.send(b"MAIL FROM:<you@yourdomain.com>\r\n")[0].startswith(b"530 "))

    def test_auth_api_down(self) -> None:
        """When the API cannot be reached, AUTH gets 454 4.7.0."""
        h = Harness()
        h.api.unavailable = True
        h.send(b"EHLO x\r\n")
        out = h.send(b"AUTH PLAIN " + plain("poststack", KEY) + b"\r\n")
        self.assertTrue(out[0].startswith(b"454 4.7.0 "), out)

    def test_auth_mailbox(self) -> None:
        """A mailbox login may only use its own address as sender."""
        h = Harness()
        h.send(b"EHLO x\r\n")
        self.assertEqual(
            h.send(b"AUTH PLAIN " + plain("alice@yourdomain.com", "mbpass") + b"\r\n"),
            [b"235 2.7.0 Authentication successful"],
        )
        out = h.send(b"MAIL FROM:<bob@yourdomain.com>\r\n")
        self.assertTrue(out[0].startswith(b"550 5.7.1 "), out)
        self.assertEqual(h.send(b"MAIL FROM:<Alice@YourDomain.com>\r\n"), [b"250 2.1.0 Ok"])

    def test_auth_ok_logged(self) -> None:
        """A login is logged once with its text ready made: braces in the address stay text, the fields are kept."""
        from twisted.logger import capturedLogs, formatEvent

        h = Harness()
        h.api.mailboxes["{x}@yourdomain.com"] = "mbpass"
        h.send(b"EHLO x\r\n")
        with capturedLogs() as events:
            out = h.send(b"AUTH PLAIN " + plain("{x}@yourdomain.com", "mbpass") + b"\r\n")
        self.assertEqual(out, [b"235 2.7.0 Authentication successful"])
        [event] = [e for e in events if e.get("event") == "auth_ok"]
        self.assertEqual(
            formatEvent(event),
            f"{h.proto.session} auth ok user={{x}}@yourdomain.com identity={{x}}@yourdomain.com client=192.0.2.7",
        )
        self.assertEqual((event["user"], event["client"]), ("{x}@yourdomain.com", "192.0.2.7"))

    def test_auth_bad_base64(self) -> None:
        """Undecodable base64 gets 501 5.5.2."""
        h = Harness()
        h.send(b"EHLO x\r\n")
        self.assertEqual(
            h.send(b"AUTH PLAIN !!!notbase64\r\n"),
            [b"501 5.5.2 Cannot decode response: not valid base64"],
        )

    def test_auth_malformed_plain(self) -> None:
        """A PLAIN response without two NULs gets 501 5.5.2, not a crash."""
        h = Harness()
        h.send(b"EHLO x\r\n")
        self.assertEqual(
            h.send(b"AUTH PLAIN " + base64.b64encode(b"justone") + b"\r\n"),
            [b"501 5.5.2 Malformed authentication response"],
        )

    def test_auth_cancel(self) -> None:
        """'*' cancels AUTH with 501 5.7.0."""
        h = Harness()
        h.send(b"EHLO x\r\n")
        h.send(b"AUTH LOGIN\r\n")
        self.assertEqual(h.send(b"*\r\n"), [b"501 5.7.0 Authentication aborted"])

    def test_auth_unknown_mechanism(self) -> None:
        """CRAM-MD5 is not offered: 504 5.5.4."""
        h = Harness()
        h.send(b"EHLO x\r\n")
        self.assertTrue(h.send(b"AUTH CRAM-MD5\r\n")[0].startswith(b"504 5.5.4 "))

    def test_auth_twice(self) -> None:
        """A second AUTH gets 503 5.5.1."""
        h = Harness()
        h.login()
        self.assertEqual(
            h.send(b"AUTH PLAIN " + plain("poststack", KEY) + b"\r\n"),
            [b"503 5.5.1 Error: already authenticated"],
        )

    def test_auth_before_ehlo(self) -> None:
        """AUTH before EHLO gets 503 5.5.1."""
        self.assertEqual(
            Harness().send(b"AUTH PLAIN " + plain("poststack", KEY) + b"\r\n"),
            [b"503 5.5.1 Error: send EHLO first"],
        )

    def test_auth_cache(self) -> None:
        """A repeated login within the TTL does not ask the API again."""
        h1 = Harness()
        h1.login()
        self.assertEqual(h1.api.checks, 1)


class TransactionTests(SynchronousTestCase):
    def test_send(self) -> None:
        """A whole transaction makes one API call and answers 250 with its id."""
        h = Harness()
        h.login()
        self.assertEqual(h.send(b"MAIL FROM:<you@yourdomain.com>\r\n"), [b"250 2.1.0 Ok"])
        self.assertEqual(h.send(b"RCPT TO:<user@example.com>\r\n"), [b"250 2.1.5 Ok"])
        self.assertEqual(h.send(b"RCPT TO:<other@example.com>\r\n"), [b"250 2.1.5 Ok"])
        self.assertEqual(h.send(b"DATA\r\n"), [b"354 End data with <CR><LF>.<CR><LF>"])
        self.assertEqual(
            h.send(MESSAGE + b".\r\n"), [b"250 2.0.0 Ok: queued as em_00000000000000000001"]
        )
        self.assertEqual(len(h.api.sent), 1)
        key, request = h.api.sent[0]
        self.assertEqual(key, KEY)
        self.assertEqual(request.payload["subject"], "Hello")
        self.assertEqual(request.payload["bcc"], ["other@example.com"])

    def test_pipelined(self) -> None:
        """A fully pipelined transaction gets its replies in order."""
        h = Harness()
        h.send(b"EHLO x\r\n")
        out = h.send(
            b"AUTH PLAIN " + plain("poststack", KEY) + b"\r\n"
            b"MAIL FROM:<you@yourdomain.com>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n"
            + MESSAGE + b".\r\nQUIT\r\n"
        )
        self.assertEqual(
            out,
            [
                b"235 2.7.0 Authentication successful",
                b"250 2.1.0 Ok",
                b"250 2.1.5 Ok",
                b"354 End data with <CR><LF>.<CR><LF>",
                b"250 2.0.0 Ok: queued as em_00000000000000000001",
                b"221 2.0.0 Bye",
            ],
        )

    def test_waits_for_api(self) -> None:
        """Nothing after the final dot is answered before the API answers."""
        h = Harness()
        h.login()
        h.api.hold = True
        out = h.send(
            b"MAIL FROM:<you@yourdomain.com>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n"
            + MESSAGE + b".\r\nNOOP\r\n"
        )
        self.assertEqual(out[-1], b"354 End data with <CR><LF>.<CR><LF>")
        h.transport.clear()
        h.api.pending[0].callback(None)
        self.assertEqual(
            h.transport.value(),
            b"250 2.0.0 Ok: queued as em_00000000000000000001\r\n250 2.0.0 Ok\r\n",
        )

    def test_api_error(self) -> None:
        """An API error reaches the client as its reply, and the session stays usable."""
        h = Harness()
        h.login()
        h.api.next_error = APIError(Reply(554, "5.6.0", "PostStack API: Domain not verified (HTTP 422)"))
        out = h.send(
            b"MAIL FROM:<you@yourdomain.com>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n"
            + MESSAGE + b".\r\n"
        )
        self.assertEqual(out[-1], b"554 5.6.0 PostStack API: Domain not verified (HTTP 422)")
        out = h.send(
            b"MAIL FROM:<you@yourdomain.com>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n"
            + MESSAGE + b".\r\n"
        )
        self.assertTrue(out[-1].startswith(b"250 2.0.0 Ok: queued as "))

    def test_sender_without_domain(self) -> None:
        """MAIL FROM:<poststack> gets 553 5.1.7 explaining that the username is not a sender."""
        h = Harness()
        h.login()
        out = h.send(b"MAIL FROM:<poststack>\r\n")
        self.assertTrue(out[0].startswith(b"553 5.1.7 "), out)
        self.assertIn(b"username is not a sender", out[0])

    def test_size_parameter(self) -> None:
        """MAIL FROM with SIZE over the limit gets 552 5.3.4."""
        h = Harness(max_message_size=1000)
        h.login()
        self.assertTrue(h.send(b"MAIL FROM:<you@yourdomain.com> SIZE=1001\r\n")[0].startswith(b"552 5.3.4 "))
        self.assertEqual(h.send(b"MAIL FROM:<you@yourdomain.com> SIZE=1000\r\n"), [b"250 2.1.0 Ok"])

    def test_data_too_big(self) -> None:
        """Data past the limit gets 552 5.3.4 after the dot, and nothing is sent."""
        h = Harness(max_message_size=1000)
        h.login()
        out = h.send(
            b"MAIL FROM:<you@yourdomain.com>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n"
            + MESSAGE + (b"x" * 70 + b"\r\n") * 20 + b".\r\n"
        )
        self.assertTrue(out[-1].startswith(b"552 5.3.4 "), out)
        self.assertEqual(h.api.sent, [])

    def test_too_many_recipients(self) -> None:
        """RCPT past the limit gets 452 4.5.3."""
        h = Harness(max_recipients=2)
        h.login()
        h.send(b"MAIL FROM:<you@yourdomain.com>\r\n")
        h.send(b"RCPT TO:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n")
        self.assertTrue(h.send(b"RCPT TO:<c@example.com>\r\n")[0].startswith(b"452 4.5.3 "))

    def test_sequence_errors(self) -> None:
        """RCPT before MAIL, DATA before RCPT and nested MAIL get 503 5.5.1."""
        h = Harness()
        h.login()
        self.assertEqual(h.send(b"RCPT TO:<a@example.com>\r\n"), [b"503 5.5.1 Error: need MAIL command"])
        h.send(b"MAIL FROM:<you@yourdomain.com>\r\n")
        self.assertEqual(h.send(b"DATA\r\n"), [b"503 5.5.1 Error: need RCPT command"])
        self.assertEqual(h.send(b"MAIL FROM:<you@yourdomain.com>\r\n"), [b"503 5.5.1 Error: nested MAIL command"])

    def test_dot_stuffing(self) -> None:
        """Leading dots are unstuffed, across chunk boundaries too."""
        h = Harness()
        h.login()
        h.send(b"MAIL FROM:<you@yourdomain.com>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n")
        body = MESSAGE + b"..leading dot\r\n.\r"
        for byte in range(len(body)):
            h.proto.dataReceived(body[byte : byte + 1])
        h.proto.dataReceived(b"\n")
        self.assertTrue(h.transport.value().endswith(b"queued as em_00000000000000000001\r\n"))
        payload = h.api.sent[0][1].payload
        self.assertIn(".leading dot", payload["text"])
        self.assertNotIn("..leading", payload["text"])

    def test_bare_lf_dot_does_not_end_data(self) -> None:
        """<LF>.<LF> is not the end of data."""
        h = Harness()
        h.login()
        out = h.send(
            b"MAIL FROM:<you@yourdomain.com>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n"
            + MESSAGE + b"\n.\nMAIL FROM:<x@y.com>\r\n"
        )
        self.assertEqual(out[-1], b"354 End data with <CR><LF>.<CR><LF>")
        self.assertEqual(h.api.sent, [])
        out = h.send(b"\r\n.\r\n")
        self.assertTrue(out[-1].startswith(b"250 2.0.0 "))
        self.assertEqual(len(h.api.sent), 1)
