# -*- test-case-name: tests.test_metrics -*-
"""
Prometheus metrics, C{/healthz} and C{/readyz} on a separate HTTP port.

L{RelayMetrics} owns one C{CollectorRegistry} (never the process-wide
default one, so several relays can live in one process) and every
instrument, all named C{poststack_relay_*} (C{docs/metrics.md} lists them).
The instrumented classes (L{poststack_relay.smtp.RelayFactory},
L{poststack_relay.api.HTTPEmailAPI}, L{poststack_relay.tls.ImplicitTLSFactory},
L{poststack_relay.tls.ReloadableTLS}) each take an optional C{metrics}
argument and make their own L{RelayMetrics} without one, so they never
branch on it.

The hot path stays cheap: children of labelled instruments are bound once
(at construction, or the first time a label value is seen, kept in a
dict), so a message costs a handful of C{inc()}/C{observe()} calls and no
label parsing.

L{makeMetricsService} serves the registry with C{twisted.web} on the
reactor thread (not C{prometheus_client.twisted.MetricsResource}, which
uses the global reactor and a thread pool); L{ApiProbeService} keeps the
"API reachable recently" part of C{/readyz} true while there is no traffic.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Protocol, Sequence, runtime_checkable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
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
from twisted.web.resource import Resource
from twisted.web.http import Request as HTTPRequest
from twisted.web.server import Request, Site

from .config import parse_metrics_listen
from .listening import ListeningService

_log = Logger()

PREFIX = "poststack_relay_"

MESSAGE_SIZE_BUCKETS = (
    1024.0,
    4096.0,
    16384.0,
    65536.0,
    262144.0,
    1048576.0,
    2097152.0,
    4194304.0,
    8388608.0,
    16777216.0,
    33554432.0,
)
"""Bytes: 1 KiB to 32 MiB (the default limit is 25 MiB)."""

UPSTREAM_DURATION_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Seconds of one API attempt (the default attempt time-out is 10 s)."""

SESSION_DURATION_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0)
"""Seconds of one SMTP session, connect to disconnect."""

TLS_FAILURE_REASONS = ("plaintext", "timeout", "handshake", "closed")
"""Label values of C{tls_handshake_failures_total} (see C{docs/metrics.md})."""

AUTH_RESULTS = ("ok", "invalid", "unavailable", "throttled", "error", "malformed")
"""Label values of C{auth_total}."""

REFUSAL_REASONS = ("stopping", "max_connections", "max_connections_per_ip")
"""Label values of C{connections_refused_total}."""

UPSTREAM_CALLS = ("send", "key_check", "mailbox_check", "probe")
"""Label values of C{call} on the C{upstream_*} metrics."""


class UpstreamMetrics:
    """
    The instruments of one kind of API call (C{call} label), bound once.
    """

    def __init__(self, metrics: "RelayMetrics", call: str) -> None:
        self._requests = metrics.upstream_requests_total
        self._call = call
        self._by_status: dict["int | str", Counter] = {}
        self.duration = metrics.upstream_request_duration_seconds.labels(call)
        self.retries = metrics.upstream_retries_total.labels(call)

    def attempt(self, status: "int | str", seconds: float) -> None:
        """
        One HTTP attempt ended: C{status} is the HTTP status (an C{int}) or
        C{"timeout"}, C{"network_error"}, C{"client_error"}, C{"cancelled"}.
        """
        child = self._by_status.get(status)
        if child is None:
            child = self._by_status[status] = self._requests.labels(self._call, str(status))
        child.inc()
        self.duration.observe(seconds)


class RelayMetrics:
    """
    Every instrument of one relay, in its own registry.

    Instrument attributes are named as the metric without the
    C{poststack_relay_} prefix; see C{docs/metrics.md} for their meaning.

    @ivar registry: the C{CollectorRegistry} L{makeMetricsService} serves.
    """

    def __init__(self, registry: Optional[CollectorRegistry] = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        # One line per metric: its kind, name (after the prefix), help and labels.
        # -- connections and sessions
        self.connections_open = self._gauge("connections_open", "SMTP sessions open now.")
        self.connections_total = self._counter(
            "connections_total",
            "SMTP sessions started (TCP connections accepted within the limits).",
        )
        self.connections_refused_total = self._counter(
            "connections_refused_total",
            "Connections answered 421 and closed: relay stopping or a connection limit reached.",
            "reason",
        )
        self.session_duration_seconds = self._histogram(
            "session_duration_seconds",
            "Duration of SMTP sessions, connect to disconnect.",
            SESSION_DURATION_BUCKETS,
        )
        # -- TLS
        self.tls_handshake_failures_total = self._counter(
            "tls_handshake_failures_total",
            "Connections that never completed the implicit-TLS handshake, by reason: "
            "plaintext (refused, not TLS), timeout (no ClientHello in time), "
            "handshake (TLS error), closed (client left mid-handshake).",
            "reason",
        )
        self.tls_certificate_expiry_timestamp_seconds = self._gauge(
            "tls_certificate_expiry_timestamp_seconds",
            "End of validity (notAfter, Unix time) of the certificate in use, by certificate file.",
            "certificate",
        )
        self.tls_reloads_total = self._counter(
            "tls_reloads_total",
            "Certificate reloads (SIGHUP or changed files), by result: ok or failed.",
            "result",
        )
        # -- AUTH
        self.auth_total = self._counter(
            "auth_total",
            "AUTH attempts by result: ok, invalid (535), unavailable (454, API down), "
            "throttled (454, too many failures), error (454, unexpected), malformed (501).",
            "result",
        )
        # -- messages
        self.messages_total = self._counter(
            "messages_total",
            "Messages (SMTP transactions that reached the end of DATA), by the final reply code.",
            "code",
        )
        self.message_size_bytes = self._histogram(
            "message_size_bytes",
            "Size of received messages (octets of DATA after dot-unstuffing).",
            MESSAGE_SIZE_BUCKETS,
        )
        # -- the API
        self.upstream_requests_total = self._counter(
            "upstream_requests_total",
            "HTTP attempts to the PostStack API, by call and by HTTP status or "
            "timeout/network_error/client_error/cancelled.",
            "call",
            "status",
        )
        self.upstream_request_duration_seconds = self._histogram(
            "upstream_request_duration_seconds",
            "Duration of one HTTP attempt to the PostStack API, whatever its outcome.",
            UPSTREAM_DURATION_BUCKETS,
            "call",
        )
        self.upstream_retries_total = self._counter(
            "upstream_retries_total",
            "Attempts to the PostStack API repeated after a transient failure.",
            "call",
        )
        self.upstream_in_flight = self._gauge(
            "upstream_in_flight", "HTTP requests to the PostStack API in flight now."
        )
        self.upstream_queue = self._gauge(
            "upstream_queue", "Requests waiting for a free request slot (api-max-in-flight) now."
        )
        self.api_breaker_open = self._gauge(
            "api_breaker_open",
            "1 while the circuit breaker refuses API requests (open or half-open), else 0.",
        )
        self.api_last_reachable_timestamp_seconds = self._gauge(
            "api_last_reachable_timestamp_seconds",
            "When the PostStack API last gave an answer that is not a 5xx (Unix time; 0: never).",
        )
        # Children bound once, so the hot path does no label lookups.
        self.refused = {
            reason: self.connections_refused_total.labels(reason) for reason in REFUSAL_REASONS
        }
        self.tls_failures = {
            reason: self.tls_handshake_failures_total.labels(reason)
            for reason in TLS_FAILURE_REASONS
        }
        self.auth = {result: self.auth_total.labels(result) for result in AUTH_RESULTS}
        self._messages_by_code: dict[int, Counter] = {}
        self.upstream = {call: UpstreamMetrics(self, call) for call in UPSTREAM_CALLS}

    def _counter(self, name: str, documentation: str, *labels: str) -> Counter:
        return Counter(PREFIX + name, documentation, labels, registry=self.registry)

    def _gauge(self, name: str, documentation: str, *labels: str) -> Gauge:
        return Gauge(PREFIX + name, documentation, labels, registry=self.registry)

    def _histogram(
        self, name: str, documentation: str, buckets: Sequence[float], *labels: str
    ) -> Histogram:
        return Histogram(
            PREFIX + name, documentation, labels, buckets=buckets, registry=self.registry
        )

    def message(self, code: int) -> None:
        """
        A transaction ended at the end of DATA with the reply code C{code}.
        """
        child = self._messages_by_code.get(code)
        if child is None:
            child = self._messages_by_code[code] = self.messages_total.labels(str(code))
        child.inc()

    def names(self) -> set[str]:
        """
        Every sample name this registry can expose (for tests and
        dashboards): metric names with their C{_total}, C{_bucket},
        C{_sum}, C{_count} and C{_created} forms.
        """
        found: set[str] = set()
        for metric in self.registry.collect():
            found.add(metric.name)
            if metric.type == "counter":
                found.update({metric.name + "_total", metric.name + "_created"})
            elif metric.type == "histogram":
                found.update(metric.name + s for s in ("_bucket", "_sum", "_count", "_created"))
        return found

    def exposition(self, accept: Optional[str] = None) -> tuple[bytes, str]:
        """
        The registry in the text format the C{Accept} header asks for
        (Prometheus text 0.0.4, or OpenMetrics): (body, content type).
        """
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


# ---------------------------------------------------------------------------
# The HTTP side

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
    return MetricsService(endpoint, site)


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
    is not draining, and the API gave an answer that is not a 5xx within
    the last C{max_age} seconds (an C{api} without C{reachable_within},
    e.g. an in-memory one, always counts as reachable).

    @param listeners: returns (label, listening service) for each SMTP
        listener; called for each check.
    @param factory: the L{poststack_relay.smtp.RelayFactory} (its C{stopping}).
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
    "RelayMetrics",
    "UpstreamMetrics",
    "MetricsResource",
    "MetricsService",
    "makeMetricsService",
    "parse_metrics_listen",
    "relay_readiness",
    "listener_bound",
    "ApiProbeService",
)
