# -*- test-case-name: tests.test_listening,tests.test_listeners,tests.test_metrics_service -*-
"""
A service that listens on a stream server endpoint while it runs, and
whose failure to bind stops start-up.

Twisted's C{StreamServerEndpointService} logs a failed bind and carries on
unless a private flag is set, and keeps its port's Deferred in a private
attribute; the relay needs both (a relay that cannot listen must not
start, and readiness must know which listeners are bound), so it has this
small service of its own instead.
"""

from __future__ import annotations

from typing import Optional

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

_log = Logger()


class ListeningService(Service):
    """
    Listens on C{endpoint} with C{factory} from the first of
    C{privilegedStartService} or C{startService} (C{twistd} binds before it
    drops privileges) until C{stopService}.

    @ivar endpoint: where to listen.
    @ivar factory: what serves each connection.
    @ivar listening_port: the bound port; C{None} before it is bound, after
        it failed to bind, and once stopped.
    @ivar started_listening: whether C{listen} was called (a start was
        attempted), so a failed start knows what to undo.
    """

    def __init__(self, endpoint: IStreamServerEndpoint, factory: IProtocolFactory) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.listening_port: Optional[IListeningPort] = None
        self.started_listening = False
        self._pending: Optional[Deferred[IListeningPort]] = None
        self._settled = False
        self._waiters: list[Deferred[Optional[IListeningPort]]] = []

    def privilegedStartService(self) -> None:
        """
        Bind now.

        @raise Exception: why the endpoint could not listen, when it says
            so at once (TCP, adopted and systemd sockets all do).
        """
        Service.privilegedStartService(self)  # type: ignore[no-untyped-call]  # Service: unannotated in Twisted
        self._listen()

    def startService(self) -> None:
        """
        Bind, unless C{privilegedStartService} did.

        @raise Exception: see L{privilegedStartService}.
        """
        Service.startService(self)  # type: ignore[no-untyped-call]  # Service: unannotated in Twisted
        self._listen()

    def _listen(self) -> None:
        if self.started_listening:
            return
        self.started_listening = True
        failed: list[Failure] = []
        synchronous = True

        def bound(port: IListeningPort) -> None:
            self._pending = None
            self.listening_port = port
            self._settle(port)

        def not_bound(failure: Failure) -> None:
            self._pending = None
            self._settle(None)
            if synchronous:
                failed.append(failure)
            elif not isinstance(failure.value, CancelledError):
                _log.failure("cannot listen on {endpoint}", failure, endpoint=self.endpoint)

        d = self._pending = self.endpoint.listen(self.factory)
        d.addCallbacks(bound, not_bound)
        synchronous = False
        if failed:
            failed[0].raiseException()

    def _settle(self, port: Optional[IListeningPort]) -> None:
        self._settled = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(port)

    def when_listening(self) -> "Optional[Deferred[Optional[IListeningPort]]]":
        """
        A new Deferred firing with the bound port once listening (C{None} if
        it could not bind); C{None} before the service starts.
        """
        if not self.started_listening:
            return None
        if self._settled:
            return succeed(self.listening_port)
        waiter: Deferred[Optional[IListeningPort]] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def stopService(self) -> "Deferred[None]":
        """
        Stop listening (or give up a bind still under way); the Deferred
        fires once the port is closed.
        """
        Service.stopService(self)  # type: ignore[no-untyped-call]  # Service: unannotated in Twisted
        if self._pending is not None:
            self._pending.cancel()
        port, self.listening_port = self.listening_port, None
        if port is None:
            return succeed(None)
        stopped = port.stopListening()
        if isinstance(stopped, Deferred):
            return stopped.addCallback(lambda _: None)
        return succeed(None)

__all__ = ["ListeningService"]
