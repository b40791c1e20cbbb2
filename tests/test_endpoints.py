"""
Tests for the relay's listening endpoints (L{poststack_relay.endpoints},
L{poststack_relay.implicittls.ImplicitTLSEndpoint}) and the C{implicittls:}
endpoint description: built by C{serverFromString}, a real TLS handshake
over loopback through it, and plaintext clients refused through it.
"""

from __future__ import annotations

import os
import socket
import ssl
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, serverFromString
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from poststack_relay.config import ConfigError
from poststack_relay.places import ListenerConfig
from poststack_relay.endpoints import listening_endpoint, parse_implicit_tls, relay_endpoint
from poststack_relay.implicittls import ImplicitTLSEndpoint, ImplicitTLSFactory
from poststack_relay.metrics import RelayMetrics
from poststack_relay.proxyprotocol import ProxyProtocolEndpoint, ProxyProtocolFactory
from poststack_relay.testing import write_certificate
from poststack_relay.tls import TLSOptions, load_certificate_options

BANNER = b"220 hello inside TLS\r\n"


class Banner(Protocol):
    """Greets, as an SMTP server does."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(BANNER)


class DescriptionTests(SynchronousTestCase):
    """C{implicittls:} descriptions through C{serverFromString}."""

    def setUp(self) -> None:
        self.cert, self.key = write_certificate(os.path.abspath(self.mktemp()))

    def test_builds_endpoint(self) -> None:
        """An escaped TCP description, certificate, key and detectTimeout give an ImplicitTLSEndpoint over that TCP endpoint."""
        clock = MemoryReactorClock()
        endpoint = serverFromString(
            clock,
            f"implicittls:tcp\\:2465\\:interface\\=127.0.0.1:certificate={self.cert}:key={self.key}"
            ":detectTimeout=0.5",
        )
        self.assertIsInstance(endpoint, ImplicitTLSEndpoint)
        verifyObject(IStreamServerEndpoint, endpoint)
        self.assertEqual(endpoint.detectTimeout, 0.5)
        self.assertIs(endpoint.clock, clock)
        self.assertIsInstance(endpoint.tls, TLSOptions)
        self.assertEqual(endpoint.tls.profile, "intermediate")
        self.assertIsInstance(endpoint.wrapped, TCP4ServerEndpoint)
        endpoint.listen(Factory.forProtocol(Banner))
        [(port, factory, _, interface)] = clock.tcpServers
        self.assertEqual((port, interface), (2465, "127.0.0.1"))
        self.assertIsInstance(factory, ImplicitTLSFactory)
        self.assertEqual(factory.detectTimeout, 0.5)

    def test_simple_form_and_defaults(self) -> None:
        """implicittls:tcp:465:certificate=... needs no escaping; the key may be in the certificate file; defaults apply."""
        combined = os.path.join(os.path.dirname(self.cert), "combined.pem")
        with open(combined, "wb") as out:
            for part in (self.cert, self.key):
                with open(part, "rb") as f:
                    out.write(f.read())
        clock = MemoryReactorClock()
        endpoint = serverFromString(clock, f"implicittls:tcp:465:certificate={combined}:profile=modern")
        self.assertEqual(endpoint.detectTimeout, 2.0)
        self.assertEqual(endpoint.tls.profile, "modern")
        endpoint.listen(Factory.forProtocol(Banner))
        self.assertEqual([(port, interface) for port, _, _, interface in clock.tcpServers], [(465, "")])

    def test_bad_descriptions(self) -> None:
        """A missing certificate or endpoint, an unknown argument or a bad detectTimeout is a ValueError naming it."""
        cases = [
            ("implicittls:tcp:465", "certificate= is required"),
            (f"implicittls:certificate={self.cert}", "which endpoint"),
            (f"implicittls:tcp:465:certificate={self.cert}:cert={self.cert}", "unknown argument 'cert'"),
            (f"implicittls:tcp:465:certificate={self.cert}:detectTimeout=soon", "detectTimeout must be a number"),
            (f"implicittls:tcp:465:certificate={self.cert}:detectTimeout=-1", "must not be negative"),
        ]
        for description, message in cases:
            with self.assertRaises(ValueError, msg=description) as raised:
                serverFromString(MemoryReactorClock(), description)
            self.assertIn(message, str(raised.exception), description)

    def test_bad_certificate(self) -> None:
        """An unreadable certificate is the relay's one-line ConfigError."""
        with self.assertRaises(ConfigError):
            parse_implicit_tls(MemoryReactorClock(), "tcp:465", certificate="/nonexistent.pem")


class RelayEndpointTests(SynchronousTestCase):
    """One relay listener's stack of endpoints."""

    def setUp(self) -> None:
        cert, key = write_certificate(os.path.abspath(self.mktemp()))
        self.tls = load_certificate_options(cert, key)

    def test_plain_listener(self) -> None:
        """Without PROXY protocol: implicit TLS straight on the TCP endpoint; IPv6 interfaces get TCP6."""
        clock = MemoryReactorClock()
        metrics = RelayMetrics()
        where = listening_endpoint(ListenerConfig(interface="127.0.0.1", port=2587), clock)
        endpoint = relay_endpoint(where, ListenerConfig(port=2587), self.tls, clock, 1.5, metrics)
        self.assertIs(endpoint.wrapped, where)
        self.assertIs(endpoint.metrics, metrics)
        self.assertEqual(endpoint.detectTimeout, 1.5)
        self.assertIsInstance(
            listening_endpoint(ListenerConfig(interface="::1", port=2587), clock), TCP6ServerEndpoint
        )

    def test_proxy_listener(self) -> None:
        """With PROXY protocol: TCP, then the PROXY header, then TLS, then the application's factory."""
        clock = MemoryReactorClock()
        where = listening_endpoint(ListenerConfig(port=2587), clock)
        endpoint = relay_endpoint(
            where, ListenerConfig(port=2587, proxy_protocol=True), self.tls, clock, 2.0
        )
        self.assertIsInstance(endpoint.wrapped, ProxyProtocolEndpoint)
        self.assertIs(endpoint.wrapped.wrapped, where)
        application = Factory.forProtocol(Banner)
        endpoint.listen(application)
        [(_, factory, _, _)] = clock.tcpServers
        self.assertIsInstance(factory, ProxyProtocolFactory)
        self.assertIsInstance(factory.wrappedFactory, ImplicitTLSFactory)
        self.assertIs(factory.wrappedFactory.wrappedFactory, application)


class LogNamespaceTests(SynchronousTestCase):
    """The listener's events keep the namespaces the relay's logs always showed."""

    def test_namespaces(self) -> None:
        """tls_plaintext_refused is poststack_relay.tls's, proxy_header_invalid poststack_relay.service's."""
        cert, key = write_certificate(os.path.abspath(self.mktemp()))
        clock = MemoryReactorClock()
        endpoint = relay_endpoint(
            listening_endpoint(ListenerConfig(port=2587), clock),
            ListenerConfig(port=2587, proxy_protocol=True),
            load_certificate_options(cert, key),
            clock,
            2.0,
        )
        endpoint.listen(Factory.forProtocol(Banner))
        [(_, factory, _, _)] = clock.tcpServers
        peer = IPv4Address("TCP", "10.0.0.5", 40000)
        with capturedLogs() as events:
            for data in (b"PROXY TCP4 203.0.113.7 192.0.2.1 1 2\r\nEHLO x\r\n", b"EHLO x\r\n"):
                protocol = factory.buildProtocol(peer)
                protocol.makeConnection(StringTransport(peerAddress=peer))
                protocol.dataReceived(data)
        self.assertEqual(
            [(e["event"], e["log_namespace"]) for e in events if "event" in e],
            [
                ("tls_plaintext_refused", "poststack_relay.tls"),
                ("proxy_header_invalid", "poststack_relay.service"),
            ],
        )


def _tls_banner(port: int, cafile: str) -> bytes:
    context = ssl.create_default_context(cafile=cafile)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            data = b""
            while not data.endswith(b"\r\n"):
                chunk = tls.recv(100)
                if not chunk:
                    break
                data += chunk
            return data


def _plaintext(port: int, send: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        if send:
            raw.sendall(send)
        data = b""
        while True:
            chunk = raw.recv(100)
            if not chunk:
                return data
            data += chunk


class LoopbackTests(TestCase):
    """The endpoint from a description, listening for real on loopback."""

    timeout = 30

    async def listen(self, detect: float = 2.0) -> tuple[int, str]:
        cert, key = write_certificate(os.path.abspath(self.mktemp()))
        endpoint = serverFromString(
            reactor,
            f"implicittls:tcp\\:0\\:interface\\=127.0.0.1:certificate={cert}:key={key}"
            f":detectTimeout={detect}",
        )
        port = await endpoint.listen(Factory.forProtocol(Banner))
        self.addCleanup(port.stopListening)
        return port.getHost().port, cert

    async def test_tls_handshake(self) -> None:
        """A real TLS client completes the handshake and reads the banner inside TLS."""
        port, cert = await self.listen()
        self.assertEqual(await deferToThread(_tls_banner, port, cert), BANNER)

    async def test_plaintext_client(self) -> None:
        """A plaintext client gets one 554 5.7.0 line in clear, then the connection closes."""
        port, _ = await self.listen()
        reply = await deferToThread(_plaintext, port, b"EHLO client.test\r\n")
        self.assertTrue(reply.startswith(b"554 5.7.0 "), reply)
        self.assertEqual(reply.count(b"\r\n"), 1, reply)

    async def test_silent_client(self) -> None:
        """A client that waits for a banner is told after detectTimeout."""
        port, _ = await self.listen(detect=0.2)
        reply = await deferToThread(_plaintext, port, b"")
        self.assertTrue(reply.startswith(b"554 5.7.0 "), reply)


