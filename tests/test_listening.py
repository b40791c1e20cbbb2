"""
Tests for L{poststack_relay.listening.ListeningService}: it binds once,
makes a failed bind fatal, tells when it listens, and closes its port.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, RaisingMemoryReactor
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from poststack_relay.listening import ListeningService


class ListeningServiceTests(SynchronousTestCase):
    def service(self, reactor: object) -> ListeningService:
        return ListeningService(TCP4ServerEndpoint(reactor, 2587), Factory.forProtocol(Protocol))

    def test_binds_once(self) -> None:
        """privilegedStartService binds; startService after it does not bind again; the port is known."""
        reactor = MemoryReactorClock()
        service = self.service(reactor)
        self.assertIsNone(service.when_listening())
        service.privilegedStartService()
        service.startService()
        self.assertEqual(len(reactor.tcpServers), 1)
        port = self.successResultOf(service.when_listening())
        self.assertIs(port, service.listening_port)
        self.assertEqual(port.getHost().port, 2587)

    def test_bind_failure_raises(self) -> None:
        """A port that cannot be bound raises from startService; the service then has no port."""
        reactor = RaisingMemoryReactor(listenException=CannotListenError("", 2587, OSError("in use")))
        service = self.service(reactor)
        self.assertRaises(CannotListenError, service.startService)
        self.assertTrue(service.started_listening)
        self.assertIsNone(service.listening_port)
        self.assertIsNone(self.successResultOf(service.when_listening()))

    def test_stop_closes_port(self) -> None:
        """stopService stops listening, waits for the port to close and forgets it."""
        closing: Deferred[None] = Deferred()
        port = RecordingPort(closing)
        service = ListeningService(OnePortEndpoint(port), Factory.forProtocol(Protocol))
        service.startService()
        self.assertIs(service.listening_port, port)
        stopped = service.stopService()
        self.assertTrue(port.stopped)
        self.assertNoResult(stopped)
        closing.callback(None)
        self.successResultOf(stopped)
        self.assertFalse(service.running)
        self.assertIsNone(service.listening_port)

    def test_stop_cancels_pending_bind(self) -> None:
        """A bind still under way when the service stops is cancelled, and not logged as an error."""
        pending: Deferred[object] = Deferred()
        service = ListeningService(PendingEndpoint(pending), Factory.forProtocol(Protocol))
        service.startService()
        waiting = service.when_listening()
        self.successResultOf(service.stopService())
        self.assertTrue(pending.called)  # cancelled (the service handled the CancelledError)
        self.assertIsNone(self.successResultOf(waiting))
        self.assertEqual(self.flushLoggedErrors(), [])


@implementer(IListeningPort)
class RecordingPort:
    """A port whose stopListening is recorded and fires when the test says."""

    def __init__(self, closing: "Deferred[None]") -> None:
        self.closing = closing
        self.stopped = False

    def startListening(self) -> None:
        pass

    def stopListening(self) -> "Deferred[None]":
        self.stopped = True
        return self.closing

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 2587)


@implementer(IStreamServerEndpoint)
class OnePortEndpoint:
    def __init__(self, port: RecordingPort) -> None:
        self.port = port

    def listen(self, factory: object) -> "Deferred[object]":
        return succeed(self.port)


@implementer(IStreamServerEndpoint)
class PendingEndpoint:
    def __init__(self, pending: "Deferred[object]") -> None:
        self.pending = pending

    def listen(self, factory: object) -> "Deferred[object]":
        return self.pending
