# -*- test-case-name: tests.test_smtp_limits -*-
"""
The relay's limits: connections in total and per client address, the
whole-transaction time limit, AUTH failures and errors per connection,
the size limit advertised and enforced, and the error count reset.
"""

from __future__ import annotations

import base64
import shutil
import tempfile
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from poststack_relay.smtp import CLOSE_LINGER, REFUSAL_LINGER, RefusalProtocol, RelaySMTP
from poststack_relay.testing import write_certificate
from poststack_relay.implicittls import ImplicitTLSFactory
from poststack_relay.tls import load_certificate_options
from tests.common.smtp import (
    AUTH_OK,
    BEGIN,
    KEY,
    MESSAGE,
    TOO_MANY_ERRORS,
    Collector,
    Connections,
    RecordingHarness,
    plain,
    queued,
    ready,
    stuff,
)

BANNER = b"220 relay.test ESMTP PostStack relay\r\n"


TOO_MANY = b"421 4.7.0 Too many connections, try again later\r\n"


TOO_MANY_FROM_CLIENT = b"421 4.7.0 Too many connections from your address, try again later\r\n"


TRANSACTION_TIMEOUT = b"421 4.4.2 Error: transaction time limit exceeded, closing connection"


IDLE_TIMEOUT = b"421 4.4.2 Error: timeout exceeded, closing connection"


AUTH_LIMIT = b"421 4.7.0 Error: too many authentication failures"


BAD_AUTH = b"AUTH PLAIN " + plain("poststack", "sk_test_wrong") + b"\r\n"


def guesses(count: int) -> bytes:
    """C{count} AUTH PLAIN commands, each with another wrong key (each a new guess)."""
    return b"".join(b"AUTH PLAIN " + plain("poststack", f"sk_test_wrong{n}") + b"\r\n" for n in range(count))



class ConnectionLimitTests(SynchronousTestCase):
    def test_total_limit(self) -> None:
        """Past max_connections a new client gets 421 4.7.0 and is closed; a closed session frees its place."""
        c = Connections(max_connections=3, stress_threshold=0)
        # The harness's own session is the first.
        sessions = [c.open("192.0.2.%d" % n) for n in (1, 2)]
        self.assertEqual([t.value() for _, t in sessions], [BANNER, BANNER])
        proto, transport = c.open("192.0.2.3")
        self.assertIsInstance(proto, RefusalProtocol)
        self.assertEqual(transport.value(), TOO_MANY)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(len(c.factory.sessions), 3)
        sessions[0][0].connectionLost(None)
        self.assertEqual(len(c.factory.sessions), 2)
        proto, transport = c.open("192.0.2.3")
        self.assertIsInstance(proto, RelaySMTP)
        self.assertEqual(transport.value(), BANNER)

    def test_per_client_limit(self) -> None:
        """Past max_connections_per_ip one address gets 421 4.7.0 while others are still served."""
        c = Connections(max_connections_per_ip=2)
        first = [c.open("198.51.100.9") for _ in range(2)]
        self.assertEqual([t.value() for _, t in first], [BANNER, BANNER])
        proto, transport = c.open("198.51.100.9")
        self.assertEqual(transport.value(), TOO_MANY_FROM_CLIENT)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(c.open("198.51.100.10")[1].value(), BANNER)
        self.assertEqual(c.factory.connections_from("198.51.100.9"), 2)
        first[1][0].connectionLost(None)
        self.assertEqual(c.factory.connections_from("198.51.100.9"), 1)
        self.assertEqual(c.open("198.51.100.9")[1].value(), BANNER)

    def test_counts_released(self) -> None:
        """Every way a session ends (QUIT, time-out, error limit, lost connection) releases its counts, once."""
        c = Connections(max_connections_per_ip=4)
        quitting, idle, noisy, lost = (c.open("203.0.113.1") for _ in range(4))
        self.assertEqual(c.factory.connections_from("203.0.113.1"), 4)
        quitting[0].dataReceived(b"QUIT\r\n")
        noisy[0].dataReceived(b"BOGUS\r\n" * 30)
        c.harness.clock.advance(301)
        for proto, transport in (quitting, idle, noisy):
            self.assertTrue(transport.disconnecting)
            proto.connectionLost(None)
            proto.connectionLost(None)
        lost[0].connectionLost(None)
        self.assertEqual(c.factory.connections_from("203.0.113.1"), 0)
        self.assertEqual(c.factory.sessions, {c.harness.proto})

    def test_closed_session_whose_client_stays_is_dropped(self) -> None:
        """A session the relay closed (here after QUIT) whose client never closes is aborted after CLOSE_LINGER, freeing its place."""
        c = Connections(max_connections_per_ip=1)
        proto, transport = c.open("192.0.2.50")
        proto.dataReceived(b"QUIT\r\n")
        self.assertTrue(transport.disconnecting)
        c.harness.clock.advance(CLOSE_LINGER - 0.1)
        self.assertFalse(transport.disconnected)
        c.harness.clock.advance(0.2)
        self.assertTrue(transport.disconnected)
        proto.connectionLost(None)  # what the abort brings
        self.assertEqual(c.open("192.0.2.50")[1].value(), BANNER)

    def test_refusal_is_not_a_session(self) -> None:
        """A refused connection does not count against the limits, and its loss changes nothing."""
        c = Connections(max_connections=1, stress_threshold=0)
        proto, transport = c.open()
        self.assertEqual(transport.value(), TOO_MANY)
        proto.connectionLost(None)
        self.assertEqual(c.factory.sessions, {c.harness.proto})

    def test_refused_client_that_never_reads_is_dropped(self) -> None:
        """A refused connection still open after the linger time is aborted; one that closed in time is not touched."""
        c = Connections(max_connections=1, stress_threshold=0)
        _, stuck = c.open()
        proto, polite = c.open()
        proto.connectionLost(None)
        c.harness.clock.advance(REFUSAL_LINGER - 0.5)
        self.assertFalse(stuck.disconnected)
        c.harness.clock.advance(1)
        self.assertTrue(stuck.disconnected)
        self.assertFalse(polite.disconnected)

    def test_refusal_inside_tls(self) -> None:
        """Through the implicit-TLS wrapper the 421 is sent inside TLS, after the handshake, and the connection closes."""
        c = Connections(max_connections=1, stress_threshold=0)
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        cert_path, key_path = write_certificate(directory)
        with open(cert_path, "rb") as f:
            trust = Certificate.loadPEM(f.read())
        clock = c.harness.clock
        server_factory = ImplicitTLSFactory(load_certificate_options(cert_path, key_path), c.factory, 2.0, clock)
        client_factory = TLSMemoryBIOFactory(
            optionsForClientTLS("localhost", trustRoot=trust), True, Factory.forProtocol(Collector), clock
        )
        address = IPv4Address("TCP", "127.0.0.1", 1)
        server = server_factory.buildProtocol(address)
        client = client_factory.buildProtocol(address)
        server_io = iosim.makeFakeServer(server)
        client_io = iosim.makeFakeClient(client)
        app, refusal = client.wrappedProtocol, server.wrappedProtocol
        self.assertIsInstance(refusal, RefusalProtocol)
        pump = iosim.connect(server, server_io, client, client_io, clock=clock)
        pump.flush()
        # Received by the client's TLS layer, so it was sent inside TLS.
        self.assertEqual(app.received, TOO_MANY)
        self.assertTrue(server_io.disconnecting)
        # The connection closed in time: the linger timer was cancelled.
        self.assertIsNone(refusal._linger)


class TransactionTimeLimitTests(SynchronousTestCase):
    def test_limit_while_in_commands(self) -> None:
        """A transaction kept open with commands past transaction_timeout gets 421 4.4.2 and is closed."""
        h = ready(transaction_timeout=600)
        self.assertEqual(h.send(b"MAIL FROM:<you@yourdomain.com>\r\n"), [b"250 2.1.0 Ok"])
        for _ in range(5):
            h.clock.advance(100)
            self.assertEqual(h.send(b"NOOP\r\n"), [b"250 2.0.0 Ok"])
        h.transport.clear()
        h.clock.advance(99)
        self.assertEqual(h.transport.value(), b"")
        h.clock.advance(1)
        self.assertEqual(h.transport.value(), TRANSACTION_TIMEOUT + b"\r\n")
        self.assertTrue(h.transport.disconnecting)

    def test_limit_while_in_data(self) -> None:
        """A client trickling DATA past the limit is cut off with 421 4.4.2 and nothing is delivered."""
        h = ready(transaction_timeout=600)
        h.open_data()
        for _ in range(5):
            h.clock.advance(110)
            self.assertEqual(h.feed(b"a line of the body\r\n"), [])
        h.clock.advance(50)
        self.assertEqual(h.transport.value(), TRANSACTION_TIMEOUT + b"\r\n")
        self.assertEqual(h.feed(b".\r\n"), [])
        self.assertEqual((h.raws, h.api.sent), ([], []))

    def test_not_while_waiting_on_the_api(self) -> None:
        """The limit stops at the final dot: a delivery slower than the limit still gets its 250."""
        h = ready(transaction_timeout=60, idle_timeout=300)
        h.api.hold = True
        h.open_data()
        h.clock.advance(59)
        h.feed(stuff(b"Subject: x\r\n\r\nslow\r\n"))
        h.clock.advance(1000)
        self.assertFalse(h.transport.disconnecting)
        h.transport.clear()
        h.api.pending[0].callback(None)
        self.assertEqual(h.transport.value(), queued(1) + b"\r\n")
        # The next transaction has its own, fresh limit.
        self.assertEqual(h.send(b"MAIL FROM:<you@yourdomain.com>\r\n"), [b"250 2.1.0 Ok"])
        h.clock.advance(59)
        self.assertEqual(h.send(b"RSET\r\n"), [b"250 2.0.0 Ok"])
        h.clock.advance(59)
        self.assertFalse(h.transport.disconnecting)

    def test_ended_transactions_stop_it(self) -> None:
        """RSET, EHLO, a delivered message and a 552 each end the transaction and its time limit."""
        h = ready(transaction_timeout=100, max_message_size=100)
        endings = [
            b"RSET\r\n",
            b"EHLO again\r\n",
            b"RCPT TO:<user@example.com>\r\nDATA\r\n" + stuff(b"Subject: x\r\n\r\nok\r\n"),
            b"RCPT TO:<user@example.com>\r\nDATA\r\n" + stuff(b"x" * 98 + b"\r\n" + b"y\r\n"),
        ]
        for ending in endings:
            h.send(b"MAIL FROM:<you@yourdomain.com>\r\n")
            h.clock.advance(90)
            h.send(ending)
            for _ in range(3):
                h.clock.advance(90)
                self.assertEqual(h.send(b"NOOP\r\n"), [b"250 2.0.0 Ok"], ending)
        self.assertEqual(len(h.raws), 1)

    def test_idle_session_has_no_transaction_limit(self) -> None:
        """A logged-in session with no MAIL only has the idle time-out."""
        h = ready(transaction_timeout=60, idle_timeout=300)
        for _ in range(10):
            h.clock.advance(250)
            self.assertEqual(h.send(b"NOOP\r\n"), [b"250 2.0.0 Ok"])
        h.transport.clear()
        h.clock.advance(300)
        self.assertEqual(h.transport.value(), IDLE_TIMEOUT + b"\r\n")

    def test_connection_lost_cancels_it(self) -> None:
        """A session lost mid-transaction leaves no timer behind."""
        h = ready(transaction_timeout=60)
        h.send(b"MAIL FROM:<you@yourdomain.com>\r\n")
        h.proto.connectionLost(None)
        self.assertEqual(h.clock.getDelayedCalls(), [])


class AuthFailureLimitTests(SynchronousTestCase):
    def helo(self, **config: Any) -> RecordingHarness:
        """A session that has sent EHLO."""
        h = RecordingHarness(**config)
        h.send(b"EHLO x\r\n")
        return h

    def test_third_failure_closes(self) -> None:
        """The third failed AUTH gets its 535, then 421 4.7.0 and the connection closes."""
        h = self.helo()
        for n in range(2):
            out = h.send(b"AUTH PLAIN " + plain("poststack", f"sk_test_wrong{n}") + b"\r\n")
            self.assertEqual(len(out), 1)
            self.assertTrue(out[0].startswith(b"535 5.7.8 "), out)
        out = h.send(BAD_AUTH)
        self.assertEqual(len(out), 2, out)
        self.assertTrue(out[0].startswith(b"535 5.7.8 "))
        self.assertEqual(out[1], AUTH_LIMIT)
        self.assertTrue(h.transport.disconnecting)

    def test_success_after_failures(self) -> None:
        """Two failures then the right key: logged in, and the session goes on."""
        h = self.helo()
        h.send(BAD_AUTH + BAD_AUTH)
        self.assertEqual(h.send(b"AUTH PLAIN " + plain("poststack", KEY) + b"\r\n"), [AUTH_OK])
        self.assertEqual(h.send(b"MAIL FROM:<you@yourdomain.com>\r\n"), [b"250 2.1.0 Ok"])
        self.assertFalse(h.transport.disconnecting)

    def test_pipelined_failures(self) -> None:
        """Pipelined failing AUTHs stop at the limit: three 535s, the 421, nothing more checked or answered."""
        h = self.helo()
        out = h.send(guesses(50) + b"NOOP\r\n")
        self.assertEqual(len(out), 4, out)
        self.assertEqual(out[3], AUTH_LIMIT)

    def test_every_kind_of_535_counts(self) -> None:
        """Wrong LOGIN password, wrong mailbox password and a mismatched PLAIN authzid all count."""
        h = self.helo()
        h.send(b"AUTH LOGIN\r\n" + base64.b64encode(b"poststack") + b"\r\n")
        self.assertTrue(h.send(base64.b64encode(b"sk_wrong") + b"\r\n")[0].startswith(b"535 "))
        self.assertTrue(
            h.send(b"AUTH PLAIN " + plain("alice@yourdomain.com", "nope") + b"\r\n")[0].startswith(b"535 ")
        )
        out = h.send(b"AUTH PLAIN " + plain("poststack", KEY, authzid="someone") + b"\r\n")
        self.assertEqual(out[1:], [AUTH_LIMIT], out)

    def test_other_failures_do_not_count(self) -> None:
        """API-down (454), malformed responses (501) and aborts are not authentication failures."""
        h = self.helo()
        h.api.unavailable = True
        for _ in range(4):
            self.assertTrue(h.send(b"AUTH PLAIN " + plain("poststack", KEY) + b"\r\n")[0].startswith(b"454 "))
        h.api.unavailable = False
        h.send(b"AUTH PLAIN !!!\r\n" + b"AUTH PLAIN " + base64.b64encode(b"x") + b"\r\n" + b"AUTH LOGIN\r\n*\r\n")
        self.assertFalse(h.transport.disconnecting)
        self.assertEqual(h.send(b"AUTH PLAIN " + plain("poststack", KEY) + b"\r\n"), [AUTH_OK])

    def test_configurable(self) -> None:
        """max_auth_failures=1 closes after the first 535; a higher value allows more attempts."""
        h = self.helo(max_auth_failures=1)
        out = h.send(BAD_AUTH)
        self.assertEqual(out[1:], [AUTH_LIMIT])
        h = self.helo(max_auth_failures=5)
        out = h.send(guesses(5))
        self.assertEqual(len(out), 6)
        self.assertEqual(out[5], AUTH_LIMIT)

    def test_same_guess_again_counts_once(self) -> None:
        """
        The same wrong credentials again on one connection (smtplib tries
        PLAIN, then LOGIN, with one secret) get 535 each time but count as
        one failure; a different wrong secret is a new one.
        """
        h = self.helo()
        login_again = (
            b"AUTH LOGIN\r\n" + base64.b64encode(b"poststack") + b"\r\n"
            + base64.b64encode(b"sk_test_wrong") + b"\r\n"
        )
        out = h.send(BAD_AUTH + login_again + BAD_AUTH + login_again)
        self.assertEqual([o[:4] for o in out], [b"535 ", b"334 ", b"334 ", b"535 ", b"535 ", b"334 ", b"334 ", b"535 "])
        self.assertFalse(h.transport.disconnecting)
        out = h.send(guesses(2))
        self.assertEqual(out[2:], [AUTH_LIMIT], out)

    def test_async_failure_closes_before_pipelined_input(self) -> None:
        """When the limit is reached by a check that answers later, buffered input after it is never served."""
        h = self.helo(max_auth_failures=1)
        h.api.hold_checks = True
        h.send(BAD_AUTH + b"AUTH PLAIN " + plain("poststack", KEY) + b"\r\nNOOP\r\n")
        h.transport.clear()
        h.api.release_checks()
        out = h.transport.value().split(b"\r\n")[:-1]
        self.assertEqual(len(out), 2, out)
        self.assertEqual(out[1], AUTH_LIMIT)
        self.assertEqual(h.api.checks, 1)


class ErrorLimitTests(SynchronousTestCase):
    def test_configurable(self) -> None:
        """max_errors sets how many error replies are tolerated before 421 4.7.0."""
        h = RecordingHarness(max_errors=5)
        out = h.send(b"BOGUS\r\n" * 10)
        self.assertEqual(len(out), 7, out)
        self.assertEqual(out[6], TOO_MANY_ERRORS)
        self.assertTrue(h.transport.disconnecting)

    def test_oversized_message_counts_at_once(self) -> None:
        """A 552 for an oversized message that is one error too many closes the session right after it."""
        h = ready(max_errors=3, max_message_size=10)
        h.send(b"BOGUS\r\n" * 3)
        out = h.send(BEGIN + stuff(b"x" * 20 + b"\r\n") + b"NOOP\r\n")
        self.assertTrue(out[-2].startswith(b"552 5.3.4 "), out)
        self.assertEqual(out[-1], TOO_MANY_ERRORS)


class ErrorResetTests(SynchronousTestCase):
    def test_errors_reset_after_delivery(self) -> None:
        """The error count restarts after a delivered message, as in Postfix."""
        h = ready()
        h.send(b"BOGUS\r\n" * 15)
        out = h.send(
            b"MAIL FROM:<you@yourdomain.com>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n" + stuff(MESSAGE)
        )
        self.assertEqual(out[-1], queued(1))
        out = h.send(b"BOGUS\r\n" * 15)
        self.assertEqual(len(out), 15)
        self.assertFalse(h.transport.disconnecting)


class SizeLimitTests(SynchronousTestCase):
    def test_size_advertised_and_enforced(self) -> None:
        """EHLO advertises the configured SIZE; MAIL SIZE= over it and data over it both get 552 5.3.4."""
        h = RecordingHarness(max_message_size=500)
        self.assertIn(b"250-SIZE 500", h.send(b"EHLO x\r\n"))
        h.send(b"AUTH PLAIN " + plain("poststack", KEY) + b"\r\n")
        out = h.send(b"MAIL FROM:<you@yourdomain.com> SIZE=501\r\n")
        self.assertEqual(out, [b"552 5.3.4 Message size exceeds fixed limit of 500 octets"])
        h.open_data()
        out = h.feed(stuff(b"z" * 499 + b"\r\n"))
        self.assertEqual(out, [b"552 5.3.4 Message size exceeds fixed maximum message size of 500 octets"])

    def test_size_counted_after_normalisation(self) -> None:
        """The size is that of the message as handed on, so bare LFs made CRLF count two octets."""
        h = ready(max_message_size=12)
        h.open_data()
        self.assertEqual(h.feed(b"a\nb\nc\nd\r\n.\r\n"), [queued(1)])  # 12 octets once normalised
        h.open_data()
        out = h.feed(b"a\nb\nc\nd\ne\r\n.\r\n")  # 11 on the wire, 15 once normalised
        self.assertTrue(out[0].startswith(b"552 5.3.4 "), out)
