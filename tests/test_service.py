"""
Tests for service assembly (L{poststack_relay.service}) on a memory reactor.
"""

from __future__ import annotations

import os

from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock, RaisingMemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from poststack_relay import ConfigError, RelayConfig, makeRelayService
from poststack_relay.smtp import RelayFactory
from poststack_relay.testing import MemoryEmailAPI, write_certificate
from poststack_relay.implicittls import ImplicitTLSFactory


class ServiceTests(SynchronousTestCase):
    def config(self, **kw: object) -> RelayConfig:
        cert, key = write_certificate(os.path.abspath(self.mktemp()))
        return RelayConfig(metrics_listen="off", tls_cert=cert, tls_key=key, hostname="relay.test", **kw)  # type: ignore[arg-type]

    def test_listens_with_tls_wrapper(self) -> None:
        """The service listens on the configured port and interface with the TLS-wrapped SMTP factory."""
        reactor = MemoryReactorClock()
        service = makeRelayService(self.config(port=2587, interface="127.0.0.1"), reactor)
        service.startService()
        [(port, factory, backlog, interface)] = reactor.tcpServers
        self.assertEqual((port, interface), (2587, "127.0.0.1"))
        self.assertIsInstance(factory, ImplicitTLSFactory)
        self.assertIsInstance(factory.wrappedFactory, RelayFactory)
        self.assertEqual(factory.detectTimeout, 2.0)
        self.assertEqual(reactor.sslServers, [])  # TLS is ours, not listenSSL's
        self.successResultOf(service.port())

    def test_ipv6_interface(self) -> None:
        """An IPv6 interface is bound as such."""
        reactor = MemoryReactorClock()
        service = makeRelayService(self.config(interface="::1"), reactor)
        service.startService()
        self.assertEqual(reactor.tcpServers[0][3], "::1")

    def test_bind_failure_is_fatal(self) -> None:
        """A port that cannot be bound stops start-up with the error."""
        service = makeRelayService(
            self.config(), RaisingMemoryReactor(listenException=CannotListenError("", 587, OSError("in use")))
        )
        self.assertRaises(CannotListenError, service.startService)

    def test_bad_certificate(self) -> None:
        """An unusable certificate is a ConfigError before anything listens."""
        reactor = MemoryReactorClock()
        with self.assertRaises(ConfigError):
            makeRelayService(RelayConfig(metrics_listen="off", tls_cert="/nonexistent.pem"), reactor)
        self.assertEqual(reactor.tcpServers, [])

    def test_injected_api(self) -> None:
        """An embedder's IEmailAPI is used instead of the HTTP client."""
        api = MemoryEmailAPI()
        reactor = MemoryReactorClock()
        service = makeRelayService(self.config(), reactor, api=api)
        checker = service.factory.portal.checkers[next(iter(service.factory.portal.checkers))]
        self.assertIs(checker._api, api)

    def test_request_slots(self) -> None:
        """The HTTP client gets the configured slots and share per credential (0: a quarter)."""
        for per_credential, share in ((0, 5), (3, 3)):
            service = makeRelayService(
                self.config(api_max_in_flight=20, api_max_in_flight_per_credential=per_credential),
                MemoryReactorClock(),
            )
            checker = service.factory.portal.checkers[next(iter(service.factory.portal.checkers))]
            slots = checker._api.slots
            self.assertEqual((slots.limit, slots.per_tenant), (20, share))

    def test_stop_closes_pool(self) -> None:
        """Stopping the service stops listening and finishes."""
        reactor = MemoryReactorClock()
        service = makeRelayService(self.config(), reactor)
        service.startService()
        self.successResultOf(service.port())
        d = service.stopService()
        self.successResultOf(d)
