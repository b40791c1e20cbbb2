"""
Tests for L{poststack_relay.listening.ListeningService}: it binds once,
makes a failed bind fatal, tells when it listens, and closes its port.
"""

from __future__ import annotations

import errno
import io
import sys

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, RaisingMemoryReactor
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from poststack_relay.listening import ListenFailed, ListeningService, report_listen_failures, smtp_listener_name
from poststack_relay.places import ListenerConfig


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


class ListenFailedTests(SynchronousTestCase):
    """A named listener's failed bind: one line naming it, its address, why, and the option to change."""

    def failing(self, interface: str, name: object = None) -> ListeningService:
        error = CannotListenError(interface, 9587, OSError(errno.EADDRINUSE, "Address already in use (while ...)"))
        endpoint = TCP4ServerEndpoint(RaisingMemoryReactor(listenException=error), 9587, interface=interface)
        if name is None:
            return ListeningService(endpoint, Factory.forProtocol(Protocol))
        return ListeningService(endpoint, Factory.forProtocol(Protocol), "metrics listener", "--metrics-listen")

    def test_named_listener(self) -> None:
        """ListenFailed (still a CannotListenError): the reason from errno, without what socket adds."""
        with self.assertRaises(ListenFailed) as raised:
            self.failing("127.0.0.1", "named").startService()
        self.assertIsInstance(raised.exception, CannotListenError)
        self.assertEqual(
            str(raised.exception),
            "cannot listen on 127.0.0.1:9587 (metrics listener): Address already in use; change --metrics-listen",
        )
        with self.assertRaises(ListenFailed) as raised:
            self.failing("", "named").startService()
        self.assertEqual(raised.exception.address, "*:9587")
        with self.assertRaises(ListenFailed) as raised:
            self.failing("::1", "named").startService()
        self.assertEqual(raised.exception.address, "[::1]:9587")

    def test_unnamed_listener(self) -> None:
        """Without a name (an embedder's endpoint) the endpoint's own error is raised."""
        with self.assertRaises(CannotListenError) as raised:
            self.failing("127.0.0.1").startService()
        self.assertNotIsInstance(raised.exception, ListenFailed)

    def test_smtp_listener_names(self) -> None:
        """The main listener names --port and --interface; a listen spec names itself and --listen."""
        self.assertEqual(smtp_listener_name(ListenerConfig()), ("SMTP listener", "--port or --interface"))
        self.assertEqual(
            smtp_listener_name(ListenerConfig(port=465, spec="465,proxy-protocol")),
            ("SMTP listener --listen '465,proxy-protocol'", "that --listen spec"),
        )


class ReportListenFailuresTests(SynchronousTestCase):
    """The process hook: ListenFailed as one line (stderr, or the log when twistd took stderr over)."""

    def setUp(self) -> None:
        self.patch(sys, "excepthook", self.previous)
        self.passed: list[BaseException] = []
        report_listen_failures()
        report_listen_failures()  # a second time changes nothing
        self.hook = sys.excepthook
        error = CannotListenError("127.0.0.1", 587, OSError(errno.EACCES, "Permission denied"))
        self.failure = ListenFailed("SMTP listener", "--port or --interface", error)

    def previous(self, kind: type[BaseException], value: BaseException, traceback: object) -> None:
        self.passed.append(value)

    def test_stderr(self) -> None:
        """Standard error not taken over: the line goes there; other exceptions go to the previous hook."""
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        self.patch(sys, "__stderr__", err)
        self.hook(ListenFailed, self.failure, None)
        self.assertEqual(
            err.getvalue(),
            "poststack-relay: error: cannot listen on 127.0.0.1:587 (SMTP listener): Permission denied; "
            "change --port or --interface\n",
        )
        other = ValueError("x")
        self.hook(ValueError, other, None)
        self.assertEqual(self.passed, [other])  # and only once: the hook was not stacked twice

    def test_log(self) -> None:
        """Standard error taken over by twistd's log: the listen_failed event, nothing written to stderr."""
        err = io.StringIO()
        self.patch(sys, "__stderr__", err)
        self.patch(sys, "stderr", io.StringIO())
        with capturedLogs() as events:
            self.hook(ListenFailed, self.failure, None)
        [event] = [e for e in events if e.get("event") == "listen_failed"]
        self.assertEqual(
            (event["address"], event["listener"], event["reason"], event["option"], event["log_level"]),
            ("127.0.0.1:587", "SMTP listener", "Permission denied", "--port or --interface", LogLevel.critical),
        )
        self.assertEqual(err.getvalue(), "")
