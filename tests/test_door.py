"""
Holding the door (issue 18): the connection rate per client address, the
junk-command limit before AUTH, and the TLS handshake time limit.
"""

from __future__ import annotations

import shutil
import tempfile

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.protocol import Factory
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from poststack_relay.fleet import LocalState
from poststack_relay.implicittls import ImplicitTLSFactory
from poststack_relay.metrics import RelayMetrics
from poststack_relay.smtp import RefusalProtocol, RelaySMTP
from poststack_relay.smtp.factory import POLITE_RATE_REFUSALS
from poststack_relay.testing import write_certificate
from poststack_relay.tls import load_certificate_options
from tests.common.smtp import AUTH_OK, KEY, Collector, Connections, RecordingHarness, plain

JUNK = b"421 4.7.0 Error: too many commands without authentication, closing connection"
NOOP_OK = b"250 2.0.0 Ok"
BANNER = b"220 relay.test ESMTP PostStack relay\r\n"


def refused_value(c: Connections, reason: str) -> float:
    value = c.factory.metrics.registry.get_sample_value(
        "poststack_relay_connections_refused_total", {"reason": reason}
    )
    return value or 0.0


class ConnectionRateTests(SynchronousTestCase):
    def test_rate_per_address(self) -> None:
        """
        Past max_connection_rate_per_ip new connections in a minute from one
        address, the next gets 421 4.7.0 with a retry-after hint; other
        addresses are not affected; refusals are not counted, and the
        address gets in again once the burst slides out of the minute.
        """
        c = Connections(max_connection_rate_per_ip=3)
        c.harness.clock.advance(60 * 1000)  # at the start of a minute
        for _ in range(3):
            proto, transport = c.open("198.51.100.1")
            self.assertEqual(transport.value(), BANNER)
            proto.connectionLost(None)  # one at a time: only the rate counts
        with capturedLogs() as events:
            refused, transport = c.open("198.51.100.1")
        self.assertIsInstance(refused, RefusalProtocol)
        # 3 * (1 - g) <= 2 at a third into the next minute: 60 + 20 s.
        self.assertEqual(
            transport.value(),
            b"421 4.7.0 Too many connections from your address per minute, retry-after=80s\r\n",
        )
        self.assertEqual([e["event"] for e in events], ["connection_refused"])
        self.assertEqual(refused_value(c, "max_connection_rate_per_ip"), 1)
        self.assertEqual(c.open("198.51.100.2")[1].value(), BANNER)
        c.harness.clock.advance(79)
        self.assertIsInstance(c.open("198.51.100.1")[0], RefusalProtocol)
        c.harness.clock.advance(1)
        self.assertIsInstance(c.open("198.51.100.1")[0], RelaySMTP)

    def test_flood_dropped_before_tls(self) -> None:
        """
        Past the rate, an address is told so (421) POLITE_RATE_REFUSALS
        times a minute; further connections are closed before TLS (the
        factory builds nothing, so the TLS wrapper makes no handshake).
        """
        c = Connections(max_connection_rate_per_ip=1)
        address = IPv4Address("TCP", "198.51.100.1", 1)
        self.assertIsInstance(c.factory.buildProtocol(address), RelaySMTP)
        for _ in range(POLITE_RATE_REFUSALS):
            self.assertIsInstance(c.factory.buildProtocol(address), RefusalProtocol)
        self.assertIsNone(c.factory.buildProtocol(address))
        self.assertEqual(refused_value(c, "max_connection_rate_per_ip"), POLITE_RATE_REFUSALS)
        self.assertEqual(refused_value(c, "max_connection_rate_per_ip_dropped"), 1)
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        cert, key = write_certificate(directory)
        tls = ImplicitTLSFactory(load_certificate_options(cert, key), c.factory, 2.0, Clock())
        self.assertIsNone(tls.buildProtocol(address))
        self.assertIsNotNone(tls.buildProtocol(IPv4Address("TCP", "198.51.100.2", 1)))

    def test_ipv6_per_64(self) -> None:
        """
        IPv6 clients are counted per /64, as the AUTH throttle counts them.
        """
        c = Connections(max_connection_rate_per_ip=2)
        factory = c.factory
        for host in ("2001:db8:1:2::1", "2001:db8:1:2::ffff"):
            self.assertIsInstance(factory.buildProtocol(IPv6Address("TCP", host, 1)), RelaySMTP)
        self.assertIsInstance(
            factory.buildProtocol(IPv6Address("TCP", "2001:db8:1:2:aaaa::1", 1)), RefusalProtocol
        )
        self.assertIsInstance(
            factory.buildProtocol(IPv6Address("TCP", "2001:db8:1:3::1", 1)), RelaySMTP
        )

    def test_off(self) -> None:
        """
        0 turns the rate limit off.
        """
        c = Connections(max_connection_rate_per_ip=0, max_connections_per_ip=1000)
        for _ in range(700):
            self.assertIsInstance(c.factory.buildProtocol(IPv4Address("TCP", "198.51.100.1", 1)), RelaySMTP)

    def test_shared_state(self) -> None:
        """
        The counts live in the fleet state the factory is given (shared
        through Redis with --redis-url): what another relay counted
        there counts here.
        """
        from poststack_relay.auth import RelayRealm
        from poststack_relay.config import RelayConfig
        from poststack_relay.smtp import RelayFactory
        from twisted.cred.portal import Portal

        clock = Clock()
        state = LocalState(clock)
        config = RelayConfig(tls_cert="unused.pem", hostname="relay.test", max_connection_rate_per_ip=2)
        portal = Portal(RelayRealm(lambda i: None), [])
        one = RelayFactory(portal, config, clock, state=state)
        two = RelayFactory(portal, config, clock, state=state)
        address = IPv4Address("TCP", "198.51.100.1", 1)
        self.assertIsInstance(one.buildProtocol(address), RelaySMTP)
        self.assertIsInstance(two.buildProtocol(address), RelaySMTP)
        self.assertIsInstance(one.buildProtocol(address), RefusalProtocol)


class JunkCommandTests(SynchronousTestCase):
    def test_limit_before_auth(self) -> None:
        """
        An unauthenticated client gets max_junk_commands commands; the one
        after is answered, then 421 4.7.0 closes the connection.
        """
        h = RecordingHarness(max_junk_commands=100)
        out = h.send(b"NOOP\r\n" * 100)
        self.assertEqual(out, [NOOP_OK] * 100)
        self.assertFalse(h.transport.disconnecting)
        with capturedLogs() as events:
            out = h.send(b"RSET\r\n")
        self.assertEqual(out, [b"250 2.0.0 Ok", JUNK])
        self.assertTrue(h.transport.disconnecting)
        self.assertEqual([e["event"] for e in events], ["junk_limit"])

    def test_slow_noops_do_not_live_forever(self) -> None:
        """
        A NOOP every 20 s keeps the idle timer fresh, but not past the
        junk limit.
        """
        h = RecordingHarness(max_junk_commands=10)
        for _ in range(10):
            h.clock.advance(20)
            self.assertEqual(h.send(b"NOOP\r\n"), [NOOP_OK])
        h.clock.advance(20)
        self.assertEqual(h.send(b"NOOP\r\n"), [NOOP_OK, JUNK])

    def test_auth_not_counted_and_limit_ends_at_login(self) -> None:
        """
        AUTH lines do not count, and after a login the limit is gone.
        """
        h = RecordingHarness(max_junk_commands=3, max_auth_failures=10)
        bad = b"AUTH PLAIN " + plain("poststack", "sk_test_wrong") + b"\r\n"
        h.send(b"EHLO x\r\n" + bad + bad)
        self.assertFalse(h.transport.disconnecting)
        h.clock.advance(60)  # the failed logins' delays
        out = h.send(b"NOOP\r\nAUTH PLAIN " + plain("poststack", KEY) + b"\r\n")
        self.assertEqual(out, [NOOP_OK, AUTH_OK])
        self.assertEqual(h.send(b"NOOP\r\n" * 50), [NOOP_OK] * 50)
        self.assertFalse(h.transport.disconnecting)

    def test_off(self) -> None:
        """
        0 turns the limit off.
        """
        h = RecordingHarness(max_junk_commands=0)
        self.assertEqual(h.send(b"NOOP\r\n" * 500), [NOOP_OK] * 500)


class HandshakeTimeoutTests(SynchronousTestCase):
    def setUp(self) -> None:
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        self.cert, self.key = write_certificate(directory)
        self.clock = Clock()
        self.metrics = RelayMetrics()
        self.inner = Connections()
        self.factory = ImplicitTLSFactory(
            load_certificate_options(self.cert, self.key),
            self.inner.factory,
            2.0,
            self.clock,
            metrics=self.metrics,
            handshakeTimeout=10.0,
        )

    def failures(self, reason: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "poststack_relay_tls_handshake_failures_total", {"reason": reason}
        )
        return value or 0.0

    def test_stalled_handshake_dropped(self) -> None:
        """
        One TLS byte, then nothing: dropped after the handshake time
        limit (not the session's idle time-out), counted with its reason
        and logged.
        """
        server = self.factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 1))
        transport = StringTransport()
        server.makeConnection(transport)
        server.dataReceived(b"\x16")
        self.clock.advance(9.9)
        self.assertFalse(transport.disconnecting)
        with capturedLogs() as events:
            self.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual([e["event"] for e in events], ["tls_handshake_timeout"])
        self.assertEqual(self.failures("handshake_timeout"), 1)
        server.connectionLost(None)
        # Counted once, not again as "closed".
        self.assertEqual(self.failures("closed"), 0)
        self.assertEqual(len(self.inner.factory.sessions), 1)  # the harness's own

    def test_finished_handshake_not_limited(self) -> None:
        """
        A handshake finished in time stops the limit: the session lives on.
        """
        with open(self.cert, "rb") as f:
            trust = Certificate.loadPEM(f.read())
        client_factory = TLSMemoryBIOFactory(
            optionsForClientTLS("localhost", trustRoot=trust), True, Factory.forProtocol(Collector), self.clock
        )
        address = IPv4Address("TCP", "127.0.0.1", 1)
        server = self.factory.buildProtocol(address)
        client = client_factory.buildProtocol(address)
        server_io = iosim.makeFakeServer(server)
        client_io = iosim.makeFakeClient(client)
        pump = iosim.connect(server, server_io, client, client_io, clock=self.clock)
        pump.flush()
        self.assertEqual(client.wrappedProtocol.received, BANNER)
        self.clock.advance(60)
        pump.flush()
        self.assertFalse(server_io.disconnecting)
        self.assertEqual(self.failures("handshake_timeout"), 0)
