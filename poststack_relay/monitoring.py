# -*- test-case-name: tests.test_metrics,tests.test_metrics_service -*-
"""
The monitoring HTTP listener: C{/metrics} (Prometheus), C{/healthz} and
C{/readyz}, on an address of their own (C{--metrics-listen}).

L{makeMetricsService} serves a L{RelayMetrics} registry with
C{twisted.web} on the reactor thread (not
C{prometheus_client.twisted.MetricsResource}, which uses the global
reactor and a thread pool); L{relay_readiness} is the relay's C{/readyz}
check, and L{ApiProbeService} keeps its "API reachable recently" part true
while there is no traffic.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Protocol, Sequence, runtime_checkable

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import (
    IListeningPort,
    IReactorTCP,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import Request as HTTPRequest
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from .places import parse_metrics_listen
from .listening import ListeningService
from .metrics import RelayMetrics

# The namespace the relay's logs have always shown for these events.
_log = Logger(namespace="poststack_relay.metrics")

Readiness = Callable[[], list[str]]


def _set(request: Request, name: bytes, value: bytes) -> None:
    request.responseHeaders.setRawHeaders(name, [value])


class MetricsResource(Resource):
    """
    C{/metrics}, C{/healthz} and C{/readyz}; GET and HEAD only.

    Everything runs on the reactor thread: a scrape reads the registry
    while nothing else changes it.
    """

    isLeaf = True

    def __init__(self, metrics: RelayMetrics, readiness: Readiness) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # Resource: unannotated in Twisted
        self.metrics = metrics
        self.readiness = readiness

    def render(self, request: Request) -> bytes:
        """
        Answer one request (see the class docstring).
        """
        _set(request, b"Cache-Control", b"no-store")
        path = request.path
        if path not in (b"/metrics", b"/healthz", b"/readyz"):
            return self._text(request, 404, "not found\n")
        if request.method not in (b"GET", b"HEAD"):
            _set(request, b"Allow", b"GET, HEAD")
            return self._text(request, 405, "method not allowed\n")
        if path == b"/healthz":
            return self._text(request, 200, "ok\n")
        if path == b"/readyz":
            try:
                reasons = list(self.readiness())
            except Exception:
                _log.failure("readiness check failed", event="readiness_crash")
                reasons = ["readiness check failed"]
            if reasons:
                return self._text(request, 503, "".join(r + "\n" for r in reasons))
            return self._text(request, 200, "ready\n")
        accept = request.getHeader(b"accept")
        body, content_type = self.metrics.exposition(
            accept.decode("latin-1") if accept is not None else None
        )
        request.setResponseCode(200)
        _set(request, b"Content-Type", content_type.encode("ascii"))
        return body

    @staticmethod
    def _text(request: Request, code: int, text: str) -> bytes:
        request.setResponseCode(code)
        _set(request, b"Content-Type", b"text/plain; charset=utf-8")
        return text.encode("utf-8")


class _QuietSite(Site):
    """
    A C{Site} without access log lines (each scrape would log one).
    """

    noisy = False
    displayTracebacks = False

    def log(self, request: HTTPRequest) -> None:
        pass


class MetricsService(ListeningService):
    """
    The metrics HTTP listener; a failed bind stops start-up.
    """

    def port(self) -> "Deferred[Optional[IListeningPort]]":
        """
        A Deferred firing with the listening port (for tests using port 0).
        """
        waiting = self.when_listening()
        assert waiting is not None, "the service was not started"
        return waiting


def makeMetricsService(
    metrics: RelayMetrics,
    listen: str,
    reactor: IReactorTCP,
    readiness: Readiness,
) -> MetricsService:
    """
    Serve C{metrics} and the health checks over HTTP on C{listen}.

    @param metrics: what C{/metrics} exposes.
    @param listen: C{HOST:PORT} or C{[IPv6]:PORT} (see L{parse_metrics_listen});
        port 0 picks a free port (L{MetricsService.port} tells which).
    @param reactor: provides C{IReactorTCP} and C{IReactorTime}.
    @param readiness: called for each C{/readyz}; returns the reasons the
        relay is not ready (empty: ready), e.g. L{relay_readiness}.
    @raise ConfigError: if C{listen} is not valid.
    """
    host, port = parse_metrics_listen(listen)
    endpoint: IStreamServerEndpoint
    if ":" in host:
        endpoint = TCP6ServerEndpoint(reactor, port, interface=host)  # type: ignore[no-untyped-call]  # endpoints: unannotated in Twisted
    else:
        endpoint = TCP4ServerEndpoint(reactor, port, interface=host)  # type: ignore[no-untyped-call]  # endpoints: unannotated in Twisted
    resource = MetricsResource(metrics, readiness)
    site = _QuietSite(resource, timeout=30, reactor=reactor)  # type: ignore[no-untyped-call]  # Site: unannotated in Twisted
    return MetricsService(endpoint, site, "metrics listener", "--metrics-listen (HOST:PORT, or off)")


def listener_bound(listener: ListeningService) -> bool:
    """
    Is C{listener} running and bound to its port?
    """
    return bool(listener.running and listener.listening_port is not None)


@runtime_checkable
class Reachable(Protocol):
    """
    What C{/readyz} and L{ApiProbeService} need of the API client
    (L{poststack_relay.api.HTTPEmailAPI}).
    """

    def reachable_within(self, seconds: float) -> bool:
        """
        Did the API give an answer that is not a 5xx within C{seconds}?
        """

    def probe(self) -> "Deferred[bool]":
        """
        Ask the API once whether it answers.
        """


def relay_readiness(
    listeners: Callable[[], Iterable[tuple[str, ListeningService]]],
    factory: object,
    api: object,
    max_age: float,
) -> Readiness:
    """
    The relay's C{/readyz} check: every SMTP listener is bound, the relay
    is not draining nor saturated (under stress: its open connections
    past the high-water mark, so a balancer sends new clients to another
    relay), and the API gave an answer that is not a 5xx within
    the last C{max_age} seconds (an C{api} without C{reachable_within},
    e.g. an in-memory one, always counts as reachable).

    @param listeners: returns (label, listening service) for each SMTP
        listener; called for each check.
    @param factory: the L{poststack_relay.smtp.RelayFactory} (its
        C{stopping}, C{stressed} and C{sessions}).
    @param api: the API client (L{Reachable} when it can tell).
    @param max_age: seconds.
    """

    def readiness() -> list[str]:
        reasons = []
        for label, listener in listeners():
            if not listener_bound(listener):
                reasons.append(f"SMTP listener {label} is not listening")
        if getattr(factory, "stopping", False):
            reasons.append("relay is stopping")
        elif getattr(factory, "stressed", False):
            sessions = len(getattr(factory, "sessions", ()))
            reasons.append(f"relay is saturated: {sessions} connections open (stress)")
        reachable = getattr(api, "reachable_within", None)
        if reachable is not None and not reachable(max_age):
            reasons.append(f"PostStack API not reachable within the last {max_age:g} s")
        return reasons

    return readiness


class ApiProbeService(Service):
    """
    Keeps C{api.reachable_within()} meaningful without traffic: probes
    the API (C{api.probe()}) when the service starts, then every
    C{interval} seconds unless an answer from real traffic came within the
    last C{interval} seconds.  At most one probe is in flight; stopping
    the service cancels it.
    """

    def __init__(self, api: Reachable, clock: IReactorTime, interval: float = 15.0) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be positive, not {interval}")
        self.api = api
        self.clock = clock
        self.interval = interval
        self._loop: Optional[LoopingCall] = None
        self._probing: Optional[Deferred[bool]] = None

    def startService(self) -> None:
        """
        Probe now and every C{interval} seconds.
        """
        Service.startService(self)  # type: ignore[no-untyped-call]  # Service: unannotated in Twisted
        loop = self._loop = LoopingCall(self.tick)
        loop.clock = self.clock
        loop.start(self.interval, now=True)

    def stopService(self) -> None:
        """
        Stop probing; cancel a probe in flight.
        """
        Service.stopService(self)  # type: ignore[no-untyped-call]  # Service: unannotated in Twisted
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
        probing, self._probing = self._probing, None
        if probing is not None:
            probing.cancel()
        return None

    def tick(self) -> None:
        """
        Probe unless one is in flight or real traffic proved the API
        reachable within the interval.  Never raises.
        """
        try:
            if self._probing is not None or self.api.reachable_within(self.interval):
                return
            d = self._probing = self.api.probe()
        except Exception:
            _log.failure("API probe crashed", event="api_probe_crash")
            return

        def done(result: object) -> None:
            if self._probing is d:
                self._probing = None
            if isinstance(result, Failure) and not isinstance(result.value, CancelledError):
                _log.failure("API probe crashed", result, event="api_probe_crash")

        d.addBoth(done)


__all__: Sequence[str] = (
    "ApiProbeService",
    "MetricsResource",
    "MetricsService",
    "Reachable",
    "listener_bound",
    "makeMetricsService",
    "relay_readiness",
)
