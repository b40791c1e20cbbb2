# -*- test-case-name: tests.test_smtp_protocol -*-
"""
Byte-exact SMTP dialogues with L{poststack_relay.smtp.RelaySMTP}: the
greeting and EHLO, whole transactions, and sessions through real TLS
(iosim), over a StringTransport with an in-memory API and a Clock.
"""

from __future__ import annotations

import shutil
import tempfile
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from poststack_relay.api import APIError
from poststack_relay.replies import Reply
from poststack_relay.smtp import MAX_PENDING_INPUT
from poststack_relay.testing import write_certificate
from poststack_relay.implicittls import ImplicitTLSFactory
from poststack_relay.tls import load_certificate_options
from tests.common.smtp import (
    AUTH_OK,
    BEGIN,
    KEY,
    MESSAGE,
    START,
    Collector,
    Harness,
    RecordingHarness,
    plain,
    queued,
    stuff,
)

class GreetingTests(SynchronousTestCase):
    def test_banner(self) -> None:
        """The banner names the host and says ESMTP."""
        h = Harness()
        self.assertEqual(h.transport.value(), b"220 relay.test ESMTP PostStack relay\r\n")

    def test_ehlo_capabilities(self) -> None:
        """EHLO advertises exactly AUTH, SIZE, 8BITMIME, PIPELINING, ENHANCEDSTATUSCODES, SMTPUTF8, never STARTTLS."""
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
                b"250-ENHANCEDSTATUSCODES",
                b"250 SMTPUTF8",
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


class TLSStackTests(SynchronousTestCase):
    def connect(self, h: RecordingHarness) -> tuple[Any, Collector, iosim.IOPump]:
        """
        A real TLS client connected through ImplicitTLSFactory to a fresh
        session of C{h}'s factory, handshake done.  Pauses and resumes of
        the server's TCP transport are noted in C{self.flow}.
        """
        self.flow: list[str] = []
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        cert_path, key_path = write_certificate(directory)
        with open(cert_path, "rb") as f:
            trust = Certificate.loadPEM(f.read())
        server_factory = ImplicitTLSFactory(load_certificate_options(cert_path, key_path), h.factory, 2.0, h.clock)
        client_factory = TLSMemoryBIOFactory(
            optionsForClientTLS("localhost", trustRoot=trust), True, Factory.forProtocol(Collector), h.clock
        )
        address = IPv4Address("TCP", "127.0.0.1", 1)
        server = server_factory.buildProtocol(address)
        client = client_factory.buildProtocol(address)
        server_io = iosim.makeFakeServer(server)
        server_io.pauseProducing = lambda: self.flow.append("pause")
        server_io.resumeProducing = lambda: self.flow.append("resume")
        pump = iosim.connect(server, server_io, client, iosim.makeFakeClient(client), clock=h.clock)
        return client, client.wrappedProtocol, pump

    def test_session_over_tls(self) -> None:
        """Through real TLS, written in small records, a pipelined session gets the banner and its replies, and the message arrives intact."""
        h = RecordingHarness()
        client, app, pump = self.connect(h)
        self.assertEqual(app.received, b"220 relay.test ESMTP PostStack relay\r\n")
        message = b"Subject: tls\r\n\r\n.dot\r\n\xff\xfe\r\n" + b"x" * 70000 + b"\r\n"
        session = (
            b"EHLO c\r\nAUTH PLAIN " + plain("poststack", KEY) + b"\r\n" + BEGIN + stuff(message) + b"QUIT\r\n"
        )
        for n in range(0, len(session), 997):
            client.write(session[n : n + 997])
            pump.flush()
        lines = app.received.split(b"\r\n")[:-1]
        self.assertEqual(lines[-6:], [AUTH_OK, b"250 2.1.0 Ok", b"250 2.1.5 Ok", START, queued(1), b"221 2.0.0 Bye"])
        self.assertEqual(h.raws, [message])

    def test_pipelined_input_during_delivery_over_tls(self) -> None:
        """Over TLS, more than 1 MiB pipelined during a delivery pauses and resumes the TCP transport and all of it is answered."""
        h = RecordingHarness()
        h.api.hold = True
        client, app, pump = self.connect(h)
        client.write(b"EHLO c\r\nAUTH PLAIN " + plain("poststack", KEY) + b"\r\n" + BEGIN + stuff(MESSAGE))
        pump.flush()
        count = MAX_PENDING_INPUT // 6 + 100
        client.write(b"NOOP\r\n" * count)
        pump.flush()
        self.assertEqual(app.received.count(b"250 2.0.0 Ok\r\n"), 0)
        self.assertEqual(self.flow, ["pause"])
        h.api.pending[0].callback(None)
        pump.flush()
        self.assertEqual(self.flow, ["pause", "resume"])
        self.assertIn(queued(1) + b"\r\n", app.received)
        self.assertEqual(app.received.count(b"250 2.0.0 Ok\r\n"), count)
