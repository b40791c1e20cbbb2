# -*- test-case-name: tests.test_listening,tests.test_listeners,tests.test_metrics_service,tests.test_startup_lines -*-
"""
A service that listens on a stream server endpoint while it runs, and
whose failure to bind stops start-up.

Twisted's C{StreamServerEndpointService} logs a failed bind and carries on
unless a private flag is set, and keeps its port's Deferred in a private
attribute; the relay needs both (a relay that cannot listen must not
start, and readiness must know which listeners are bound), so it has this
small service of its own instead.

A listener that knows its name and the option that sets its address
(L{ListeningService}'s C{name} and C{option}) turns a failed bind into
L{ListenFailed}, whose message is the one line an operator needs:

    cannot listen on 127.0.0.1:9587 (metrics listener): Address already in
    use; change --metrics-listen (HOST:PORT, or off)
"""

from __future__ import annotations

import os
import sys
from typing import Any, Optional

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from .places import ListenerConfig

_log = Logger()


class ListenFailed(CannotListenError):
    """
    A listener could not bind: a L{CannotListenError} whose message is one
    line naming the listener, its address, why, and the option to change.

    @ivar listener: which listener (C{SMTP listener}, C{metrics listener}).
    @ivar option: what to change (C{--port or --interface}).
    @ivar address: where it tried to listen (C{127.0.0.1:587}, C{*:587},
        C{[::1]:465}).
    @ivar reason: why it could not (C{Address already in use}).
    """

    def __init__(self, listener: str, option: str, error: CannotListenError) -> None:
        super().__init__(error.interface, error.port, error.socketError)  # type: ignore[no-untyped-call]  # CannotListenError: unannotated in Twisted
        self.listener = listener
        self.option = option
        host = error.interface or "*"
        self.address = f"[{host}]:{error.port}" if ":" in host else f"{host}:{error.port}"
        cause = error.socketError
        if isinstance(cause, OSError) and cause.errno:
            self.reason = os.strerror(cause.errno)  # without what socket.create_server adds
        else:
            self.reason = str(cause) or "unknown error"

    def __str__(self) -> str:
        return f"cannot listen on {self.address} ({self.listener}): {self.reason}; change {self.option}"


def port_address(port: IListeningPort) -> str:
    """
    Where C{port} listens, as logs show it: C{127.0.0.1:587}, C{[::1]:465}.
    """
    host = port.getHost()
    address, number = getattr(host, "host", None), getattr(host, "port", None)
    if address is None or number is None:
        return str(host)
    return f"[{address}]:{number}" if ":" in address else f"{address}:{number}"


def smtp_listener_name(listener: ListenerConfig) -> tuple[str, str]:
    """
    The name of an SMTP listener and the option that sets its address,
    for L{ListeningService} and L{ListenFailed}.
    """
    if listener.spec:
        return f"SMTP listener --listen {listener.spec!r}", "that --listen spec"
    return "SMTP listener", "--port or --interface"


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
    @ivar name: what this listener is, for L{ListenFailed} (C{None}: a
        failed bind raises the endpoint's own error).
    @ivar option: the option that sets its address, for L{ListenFailed}.
    """

    def __init__(
        self,
        endpoint: IStreamServerEndpoint,
        factory: IProtocolFactory,
        name: Optional[str] = None,
        option: str = "",
    ) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.name = name
        self.option = option
        self.listening_port: Optional[IListeningPort] = None
        self.started_listening = False
        self._pending: Optional[Deferred[IListeningPort]] = None
        self._settled = False
        self._waiters: list[Deferred[Optional[IListeningPort]]] = []

    def privilegedStartService(self) -> None:
        """
        Bind now.

        @raise Exception: why the endpoint could not listen, when it says
            so at once (TCP, adopted and systemd sockets all do):
            L{ListenFailed} for a L{CannotListenError} when C{name} is set.
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
            error = failed[0].value
            if self.name is not None and isinstance(error, CannotListenError):
                raise ListenFailed(self.name, self.option, error) from error
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

def report_listen_failures() -> None:
    """
    Make a listener that cannot bind end the process with one line
    instead of a traceback (exit status 1, as for any uncaught error).

    twistd binds the listeners after C{makeService}, so the
    L{poststack_relay.listening.ListenFailed} of a busy port leaves
    twistd's runner (C{twistd}, the C{poststack-relay} command, C{twist})
    as an uncaught exception: this hook, installed for the whole process,
    turns it into the C{listen_failed} event (in the relay's log format)
    when twistd has taken over standard error for its log, else into
    C{poststack-relay: error: ...} on standard error.  Any other
    exception still gets the previous hook's traceback.  Installing it
    again changes nothing.
    """
    previous = sys.excepthook
    if getattr(previous, "reports_listen_failures", False):
        return

    def hook(kind: type[BaseException], value: BaseException, traceback: Any) -> None:
        if not isinstance(value, ListenFailed):
            previous(kind, value, traceback)
            return
        stderr = sys.__stderr__
        if stderr is not None and sys.stderr is stderr:
            stderr.write(f"poststack-relay: error: {value}\n")
            stderr.flush()
            return
        _log.critical(
            "cannot listen on {address} ({listener}): {reason}; change {option}",
            address=value.address,
            listener=value.listener,
            reason=value.reason,
            option=value.option,
            event="listen_failed",
        )

    hook.reports_listen_failures = True  # type: ignore[attr-defined]  # a mark on the function, for the check above
    sys.excepthook = hook


__all__ = ["ListenFailed", "ListeningService", "port_address", "report_listen_failures", "smtp_listener_name"]
