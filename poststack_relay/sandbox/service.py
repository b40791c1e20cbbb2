# -*- test-case-name: tests.test_sandbox -*-
"""
Serving the sandbox: L{SandboxService} serves a L{SandboxResource} over
HTTP on one TCP endpoint (a failed bind fails startup), and
L{makeSandboxService} builds it all (data file, SQLite store, resource,
endpoint) for the twistd plugin and the end-to-end tests.
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import (
    IListeningPort,
    IReactorTCP,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.python.failure import Failure
from twisted.web.server import Site

from .data import SandboxData, load_sandbox_data
from .exchange import log
from .router import SandboxResource
from .store import SandboxStore


class SandboxService(Service):
    """
    Serves a L{SandboxResource} over HTTP on one TCP endpoint.

    @ivar port: The listening port once started (C{port.getHost().port} is
        the bound port number, useful with port 0), else L{None}.
    @ivar resource: The served L{SandboxResource} (inject faults on it).
    @ivar store: Its L{SandboxStore}; closed when the service stops.
    """

    def __init__(
        self,
        endpoint: IStreamServerEndpoint,
        resource: SandboxResource,
        store: SandboxStore,
    ) -> None:
        self._endpoint = endpoint
        self.resource = resource
        self.store = store
        self.site = Site(resource)  # type: ignore[no-untyped-call]  # Twisted's Site.__init__ is unannotated
        self.site.displayTracebacks = False
        self.port: IListeningPort | None = None
        self._failure: Failure | None = None
        self._waiting: list[Deferred[IListeningPort]] = []

    def startService(self) -> None:
        """
        Start listening. A failed bind raises here, so startup fails loudly.
        """
        super().startService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        self._failure = None
        listening = self._endpoint.listen(self.site)
        listening.addCallbacks(self._listened, self._listen_failed)
        if self._failure is not None:
            self._failure.raiseException()

    def _listened(self, port: IListeningPort) -> None:
        self.port = port
        address = port.getHost()
        log.info(
            "PostStack sandbox API listening on http://{host}:{port}",
            host=getattr(address, "host", "?"),
            port=getattr(address, "port", "?"),
        )
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(port)

    def _listen_failed(self, failure: Failure) -> None:
        self._failure = failure
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(failure)

    def when_listening(self) -> Deferred[IListeningPort]:
        """
        Return a L{Deferred} that fires with the listening port.
        """
        if self.port is not None:
            return succeed(self.port)
        d: Deferred[IListeningPort] = Deferred()
        if self._failure is not None:
            d.errback(self._failure)
        else:
            self._waiting.append(d)
        return d

    def stopService(self) -> Deferred[None]:
        """
        Stop listening, drop pending sandbox answers, close the store.
        """
        super().stopService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        self.resource.abort_pending()
        port, self.port = self.port, None
        stopping = port.stopListening() if port is not None else None
        stopped: Deferred[None] = (
            stopping if isinstance(stopping, Deferred) else succeed(None)
        )

        def close(result: object) -> None:
            self.store.close()

        return stopped.addBoth(close)


def makeSandboxService(
    port: int | str,
    interface: str,
    db: str,
    data: str | SandboxData,
    reactor: IReactorTCP,
) -> SandboxService:
    """
    Build the sandbox API service: HTTP on C{interface:port}, emails in the
    SQLite file C{db}, keys and domains from C{data}.

    @param port: TCP port; 0 picks a free one (read C{service.port} after
        C{startService}, or use C{service.when_listening()}).
    @param data: Path of the data file, or an already parsed L{SandboxData}.
    @param reactor: Must provide C{IReactorTCP} and C{IReactorTime}.
    @raise ValueError: If C{port} is not a port number or C{data} is invalid.
    """
    port_number = int(port)
    if not 0 <= port_number <= 65535:
        raise ValueError(f"port must be 0-65535, not {port!r}")
    sandbox_data = load_sandbox_data(data) if isinstance(data, str) else data
    store = SandboxStore(db)
    resource = SandboxResource(store, sandbox_data, clock=IReactorTime(reactor))
    endpoint: IStreamServerEndpoint
    # Twisted's TCP endpoint classes are unannotated.
    if ":" in interface:
        endpoint = TCP6ServerEndpoint(reactor, port_number, interface=interface)  # type: ignore[no-untyped-call]  # Twisted's endpoints are unannotated
    else:
        endpoint = TCP4ServerEndpoint(reactor, port_number, interface=interface)  # type: ignore[no-untyped-call]  # Twisted's endpoints are unannotated
    return SandboxService(endpoint, resource, store)
