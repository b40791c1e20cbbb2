"""
Tests for the PROXY protocol v1/v2 option (L{poststack_relay.proxyprotocol}):
in memory, and end to end over loopback with real TLS and a real SMTP client.
"""

from __future__ import annotations

import os
import smtplib
import socket
import struct
from typing import Any

from OpenSSL import SSL
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import provider

from poststack_relay import RelayConfig, makeRelayService
from poststack_relay.proxyprotocol import (
    PROXY_HEADER_TIMEOUT,
    InvalidProxyHeader,
    NoProxyHeader,
    ProxyHeader,
    ProxyProtocolFactory,
    parse_proxy_header,
)
from poststack_relay.service import RelayService
from poststack_relay.tap import Options
from poststack_relay.testing import MemoryEmailAPI, write_certificate
from poststack_relay.implicittls import ImplicitTLSFactory
from tests.common.haproxy import HAPROXY, haproxy_config, start_haproxy
from tests.common.keys import FULL_KEY
from tests.common.processes import free_port, wait_for_port
from tests.common.relay import RelayTestCase

V1_HEADER = b"PROXY TCP4 203.0.113.7 192.0.2.1 56324 587\r\n"
BALANCER = IPv4Address("TCP", "10.0.0.5", 40000)


def v2_header(source: str, destination: str, sport: int, dport: int, command: int = 0x21) -> bytes:
    """
    A binary PROXY v2 header for TCP over IPv4, built by hand.
    """
    addresses = socket.inet_aton(source) + socket.inet_aton(destination) + struct.pack("!HH", sport, dport)
    if command == 0x20:  # LOCAL: no addresses
        return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([command, 0x00]) + struct.pack("!H", 0)
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([command, 0x11]) + struct.pack("!H", 12) + addresses


def client_hello() -> bytes:
    """
    The first flight of a real TLS client (a ClientHello record).
    """
    connection = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
    connection.set_connect_state()
    try:
        connection.do_handshake()
    except SSL.WantReadError:
        pass
    return connection.bio_read(65536)


class HeaderParserTests(SynchronousTestCase):
    """L{parse_proxy_header}, the pure parser, on bytes alone."""

    def test_v1(self) -> None:
        """v1 TCP4 and TCP6 headers give both addresses and the header's length."""
        header, length = parse_proxy_header(V1_HEADER + b"\x16rest")
        self.assertEqual(length, len(V1_HEADER))
        assert header is not None
        self.assertEqual(header.source, IPv4Address("TCP", "203.0.113.7", 56324))
        self.assertEqual(header.destination, IPv4Address("TCP", "192.0.2.1", 587))
        header, _ = parse_proxy_header(b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 587\r\n")
        assert header is not None
        self.assertEqual(header.source, IPv6Address("TCP", "2001:db8::1", 4000))

    def test_v1_unknown(self) -> None:
        """PROXY UNKNOWN carries no addresses (the connection's own stand)."""
        self.assertEqual(
            parse_proxy_header(b"PROXY UNKNOWN whatever\r\n"), (ProxyHeader(), 24)
        )

    def test_v2(self) -> None:
        """v2 PROXY over IPv4 and IPv6, with TLVs after the addresses; LOCAL carries none."""
        data = v2_header("198.51.100.23", "192.0.2.1", 40123, 587)
        header, length = parse_proxy_header(data + b"tail")
        self.assertEqual(length, len(data))
        assert header is not None
        self.assertEqual(header.source, IPv4Address("TCP", "198.51.100.23", 40123))
        six = (
            b"\r\n\r\n\x00\r\nQUIT\n\x21\x21" + struct.pack("!H", 36 + 7)
            + socket.inet_pton(socket.AF_INET6, "2001:db8::7") + socket.inet_pton(socket.AF_INET6, "::1")
            + struct.pack("!HH", 5000, 587) + b"\x04\x00\x04abcd"
        )
        header, length = parse_proxy_header(six)
        self.assertEqual(length, len(six))
        assert header is not None
        # Eight groups without zero compression, as Twisted's parser wrote them.
        self.assertEqual(header.source, IPv6Address("TCP", "2001:db8:0:0:0:0:0:7", 5000))
        local = v2_header("0.0.0.0", "0.0.0.0", 0, 0, command=0x20)
        self.assertEqual(parse_proxy_header(local), (ProxyHeader(), len(local)))

    def test_needs_more(self) -> None:
        """Every proper prefix of a v1 or v2 header asks for more bytes (a v2 header split anywhere)."""
        for whole in (V1_HEADER, v2_header("198.51.100.23", "192.0.2.1", 40123, 587)):
            for cut in range(len(whole)):
                self.assertEqual(parse_proxy_header(whole[:cut]), (None, 0), (whole, cut))

    def test_invalid(self) -> None:
        """Bytes that are not a header, and malformed headers, raise; the first kind says there is no header."""
        for data in (client_hello(), b"EHLO client.test\r\n", b"\r\n\r\n\x00\r\nQUIT\n\x11"):
            with self.assertRaises(NoProxyHeader, msg=data):
                parse_proxy_header(data)
        for data in (
            b"PROXY TCP4 not-an-address\r\n",
            b"PROXY TCP4 203.0.113.7 192.0.2.1 56324 99999\r\n",
            b"PROXY TCP4 2001:db8::1 192.0.2.1 1 2\r\n",
            b"PROXY TCP5 203.0.113.7 192.0.2.1 1 2\r\n",
            b"PROXY " + b"x" * 120,
            b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x04abcd",  # addresses cut short
            b"\r\n\r\n\x00\r\nQUIT\n\x22\x11\x00\x00",  # unknown command
            b"\r\n\r\n\x00\r\nQUIT\n\x21\x41\x00\x00",  # unknown family
        ):
            with self.assertRaises(InvalidProxyHeader, msg=data) as raised:
                parse_proxy_header(data)
            self.assertFalse(isinstance(raised.exception, NoProxyHeader), data)


class ProxyProtocolMemoryTests(SynchronousTestCase):
    """The wrapper on a memory reactor and a string transport."""

    def start(self, **kw: Any) -> tuple[RelayService, MemoryReactorClock, Any]:
        cert, key = write_certificate(os.path.abspath(self.mktemp()))
        config = RelayConfig(metrics_listen="off", 
            tls_cert=cert, tls_key=key, hostname="relay.test", proxy_protocol=True, tls_reload_interval=0, **kw
        )
        reactor = MemoryReactorClock()
        service = makeRelayService(config, reactor, api=MemoryEmailAPI())
        service.startService()
        return service, reactor, reactor.tcpServers[0][1]

    def connect(self, factory: Any) -> tuple[Any, StringTransport]:
        protocol = factory.buildProtocol(BALANCER)
        transport = StringTransport(peerAddress=BALANCER, hostAddress=IPv4Address("TCP", "10.0.0.9", 587))
        protocol.makeConnection(transport)
        return protocol, transport

    def test_listener_order(self) -> None:
        """The listener is PROXY first, then implicit TLS, then SMTP; off by default."""
        service, _, factory = self.start()
        self.assertIsInstance(factory, ProxyProtocolFactory)
        self.assertIsInstance(factory.wrappedFactory, ImplicitTLSFactory)
        self.assertIs(factory.wrappedFactory.wrappedFactory, service.factory)
        self.assertFalse(RelayConfig(metrics_listen="off", tls_cert="x").proxy_protocol)

    def test_log_prefix(self) -> None:
        """The listener logs as "RelayFactory (TLS) (PROXY)", as with Twisted's own PROXY wrapper."""
        _, _, factory = self.start()
        self.assertEqual(factory.logPrefix(), "RelayFactory (TLS) (PROXY)")

    def test_v1_header_then_tls(self) -> None:
        """A v1 header then a ClientHello: TLS answers and the session's client is the header's source."""
        service, _, factory = self.start()
        protocol, transport = self.connect(factory)
        self.assertEqual(service.factory.sessions, set())  # nothing built before the header
        protocol.dataReceived(V1_HEADER + client_hello())
        [session] = service.factory.sessions
        self.assertEqual(session.client, "203.0.113.7")
        self.assertEqual(service.factory.connections_from("203.0.113.7"), 1)
        self.assertEqual(service.factory.connections_from("10.0.0.5"), 0)
        self.assertEqual(transport.value()[:1], b"\x16")  # a TLS handshake record, not a 554 line
        self.assertFalse(transport.disconnecting)

    def test_header_in_pieces(self) -> None:
        """A v1 header that arrives a few bytes at a time, then TLS, still works."""
        service, _, factory = self.start()
        protocol, transport = self.connect(factory)
        data = V1_HEADER + client_hello()
        for i in range(0, 60, 3):
            protocol.dataReceived(data[i : i + 3])
        protocol.dataReceived(data[60:])
        [session] = service.factory.sessions
        self.assertEqual(session.client, "203.0.113.7")
        self.assertEqual(transport.value()[:1], b"\x16")

    def test_v2_header(self) -> None:
        """A binary v2 PROXY header (split after 10 bytes) gives the client's address."""
        service, _, factory = self.start()
        protocol, transport = self.connect(factory)
        data = v2_header("198.51.100.23", "192.0.2.1", 40123, 587) + client_hello()
        protocol.dataReceived(data[:10])
        self.assertEqual(service.factory.sessions, set())
        protocol.dataReceived(data[10:])
        [session] = service.factory.sessions
        self.assertEqual(session.client, "198.51.100.23")
        self.assertEqual(transport.value()[:1], b"\x16")

    def test_v2_local(self) -> None:
        """A v2 LOCAL header (a balancer's health check) keeps the TCP peer address."""
        service, _, factory = self.start()
        protocol, _ = self.connect(factory)
        protocol.dataReceived(v2_header("0.0.0.0", "0.0.0.0", 0, 0, command=0x20) + client_hello())
        [session] = service.factory.sessions
        self.assertEqual(session.client, "10.0.0.5")

    def test_no_header_dropped(self) -> None:
        """A direct TLS client (no PROXY header) is dropped without a reply or a session."""
        service, _, factory = self.start()
        protocol, transport = self.connect(factory)
        protocol.dataReceived(client_hello())
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(service.factory.sessions, set())

    def test_plaintext_dropped(self) -> None:
        """Plaintext SMTP without a header is dropped too (no 554 notice: it is not a client)."""
        service, _, factory = self.start()
        protocol, transport = self.connect(factory)
        protocol.dataReceived(b"EHLO client.test\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(service.factory.sessions, set())

    def test_invalid_v1_dropped(self) -> None:
        """A malformed v1 header is dropped."""
        service, _, factory = self.start()
        protocol, transport = self.connect(factory)
        protocol.dataReceived(b"PROXY TCP4 not-an-address\r\n" + client_hello())
        self.assertTrue(transport.disconnecting)
        self.assertEqual(service.factory.sessions, set())

    def test_header_timeout(self) -> None:
        """A connection that sends no header is dropped after the header timeout."""
        service, reactor, factory = self.start()
        protocol, transport = self.connect(factory)
        reactor.advance(PROXY_HEADER_TIMEOUT - 0.1)
        self.assertFalse(transport.disconnecting)
        reactor.advance(0.2)
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(None)
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_plaintext_after_header(self) -> None:
        """After the header, the implicit-TLS plaintext detection sees the client's first byte."""
        service, _, factory = self.start()
        protocol, transport = self.connect(factory)
        protocol.dataReceived(V1_HEADER + b"EHLO client.test\r\n")
        self.assertTrue(transport.value().startswith(b"554 5.7.0"))
        self.assertTrue(transport.disconnecting)

    def test_per_ip_limit_uses_client(self) -> None:
        """The per-address connection limit counts the header's source, not the balancer."""
        service, _, factory = self.start(max_connections_per_ip=1)
        p1, _ = self.connect(factory)
        p1.dataReceived(V1_HEADER + client_hello())
        p2, _ = self.connect(factory)
        p2.dataReceived(V1_HEADER.replace(b"203.0.113.7", b"203.0.113.8") + client_hello())
        self.assertEqual(
            sorted(s.client for s in service.factory.sessions), ["203.0.113.7", "203.0.113.8"]
        )

    def test_tap_option(self) -> None:
        """--proxy-protocol yes sets the config field."""
        cert, key = write_certificate(os.path.abspath(self.mktemp()))
        options = Options()
        options.parseOptions(["--tls-cert", cert, "--tls-key", key, "--proxy-protocol", "yes"])
        self.assertTrue(options.config.proxy_protocol)


def smtp_through_proxy(port: int, cafile: str, header: bytes) -> tuple[int, int]:
    """
    Connect, send C{header} in clear, then TLS and SMTP: AUTH and one
    message.  Returns the AUTH and the final DATA reply codes.
    """
    import ssl

    raw = socket.create_connection(("127.0.0.1", port), timeout=30)
    raw.sendall(header)
    context = ssl.create_default_context(cafile=cafile)
    tls = context.wrap_socket(raw, server_hostname="localhost")
    client = smtplib.SMTP(timeout=30)
    client.sock = tls
    try:
        code, _ = client.getreply()
        assert code == 220, code
        client.ehlo("client.test")
        auth_code, _ = client.login("poststack", FULL_KEY)
        client.mail("you@yourdomain.com")
        client.rcpt("user@example.com")
        data_code, _ = client.data(b"From: you@yourdomain.com\r\nTo: user@example.com\r\n"
                                   b"Subject: via proxy\r\n\r\nhello\r\n")
        client.quit()
    finally:
        client.close()
    return auth_code, data_code


class ProxyProtocolEndToEndTests(RelayTestCase):
    """A real TLS + SMTP client behind a hand-written PROXY header, over loopback."""

    relay_options = {"proxy_protocol": True}

    def capture(self) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []

        @provider(ILogObserver)
        def observe(event: dict[str, Any]) -> None:
            if event.get("event") in ("auth_ok",):
                events.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        return events

    async def test_v1(self) -> None:
        """v1 header, TLS, AUTH, a message: stored, and AUTH is logged for 203.0.113.7."""
        events = self.capture()
        codes = await self.in_thread(smtp_through_proxy, self.port, self.cafile, V1_HEADER)
        self.assertEqual(codes, (235, 250))
        self.assertEqual(len(self.stored()), 1)
        self.assertEqual([e["client"] for e in events], ["203.0.113.7"])

    async def test_v2(self) -> None:
        """v2 binary header, TLS, AUTH, a message: stored, AUTH logged for 198.51.100.23."""
        events = self.capture()
        header = v2_header("198.51.100.23", "127.0.0.1", 40123, self.port)
        codes = await self.in_thread(smtp_through_proxy, self.port, self.cafile, header)
        self.assertEqual(codes, (235, 250))
        self.assertEqual(len(self.stored()), 1)
        self.assertEqual([e["client"] for e in events], ["198.51.100.23"])

    async def test_no_header_refused(self) -> None:
        """A plain implicit-TLS client without a header is dropped: the handshake fails."""
        import ssl

        def direct() -> None:
            with self.assertRaises((ssl.SSLError, OSError, smtplib.SMTPException)):
                smtplib.SMTP_SSL("localhost", self.port, context=self.context(), timeout=30)

        await self.in_thread(direct)
        self.assertEqual(self.stored(), [])


class RealHAProxyTests(RelayTestCase):
    """Debian's HAProxy in TCP mode in front of the relay on loopback."""

    relay_options = {"proxy_protocol": True}
    if HAPROXY is None:
        skip = "haproxy is not installed (apt-get install haproxy)"

    async def through_haproxy(self, send_proxy: str) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        front = free_port()
        process = start_haproxy(
            self, directory, haproxy_config(front, self.port, server=send_proxy)
        )
        events: list[dict[str, Any]] = []

        @provider(ILogObserver)
        def observe(event: dict[str, Any]) -> None:
            if event.get("event") == "auth_ok":
                events.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

        def send() -> None:
            wait_for_port(front, process, 10.0)
            # From 127.0.0.2, so the relay (which sees HAProxy at 127.0.0.1)
            # can only learn this address from the PROXY header.
            with smtplib.SMTP_SSL(
                "localhost", front, context=self.context(), timeout=30,
                source_address=("127.0.0.2", 0),
            ) as client:
                client.login("poststack", FULL_KEY)
                client.sendmail("you@yourdomain.com", "user@example.com",
                                b"Subject: via haproxy\r\n\r\nhello\r\n")

        await self.in_thread(send)
        self.assertEqual(len(self.stored()), 1)
        self.assertEqual([e["client"] for e in events], ["127.0.0.2"])

    async def test_send_proxy_v2(self) -> None:
        """HAProxy with send-proxy-v2: the message is stored and AUTH is logged for the real client."""
        await self.through_haproxy("send-proxy-v2")

    async def test_send_proxy_v1(self) -> None:
        """HAProxy with send-proxy (v1): the same."""
        await self.through_haproxy("send-proxy")
