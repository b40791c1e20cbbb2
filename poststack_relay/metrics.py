# -*- test-case-name: tests.test_metrics -*-
"""
The relay's Prometheus instruments.

L{RelayMetrics} owns one C{CollectorRegistry} (never the process-wide
default one, so several relays can live in one process) and every
instrument, all named C{poststack_relay_*} (C{docs/metrics.md} lists them).
The instrumented classes (L{poststack_relay.smtp.RelayFactory},
L{poststack_relay.api.HTTPEmailAPI}, L{poststack_relay.implicittls.ImplicitTLSFactory},
L{poststack_relay.tls.ReloadableTLS}) each take an optional C{metrics}
argument and make their own L{RelayMetrics} without one, so they never
branch on it.

The hot path stays cheap: children of labelled instruments are bound once
(at construction, or the first time a label value is seen, kept in a
dict), so a message costs a handful of C{inc()}/C{observe()} calls and no
label parsing.

L{poststack_relay.monitoring} serves the registry over HTTP, with
C{/healthz} and C{/readyz}.
"""

from __future__ import annotations

from typing import Optional, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder


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

TLS_FAILURE_REASONS = ("plaintext", "timeout", "handshake", "closed", "handshake_timeout")
"""Label values of C{tls_handshake_failures_total} (see C{docs/metrics.md})."""

AUTH_RESULTS = (
    "ok", "invalid", "repeated", "suspended", "disabled", "unavailable", "throttled", "rate_limited",
    "error", "malformed",
)
"""Label values of C{auth_total}."""

REFUSAL_REASONS = (
    "stopping",
    "max_connections",
    "max_connections_per_ip",
    "max_connection_rate_per_ip",
    "max_connection_rate_per_ip_dropped",
)
"""Label values of C{connections_refused_total}."""

UPSTREAM_CALLS = ("send", "key_check", "mailbox_check", "probe", "breaker_probe")
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
            "Connections answered 421 and closed: relay stopping, or a connection limit "
            "(count or rate) reached; or, past the rate and told so 60 times in the minute, "
            "closed before TLS (max_connection_rate_per_ip_dropped).",
            "reason",
        )
        self.stress = self._gauge(
            "stress",
            "1 while the relay is under stress (open connections past --stress-threshold): "
            "short time-outs, idle unauthenticated sessions shed, /readyz not ready; else 0.",
        )
        self.sessions_shed_total = self._counter(
            "sessions_shed_total",
            "Idle unauthenticated sessions closed (421 4.7.0) under stress to make room for "
            "a new connection.",
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
            "handshake (TLS error), closed (client left mid-handshake), "
            "handshake_timeout (not finished within --tls-handshake-timeout).",
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
        self.upstream_queue_capped = self._gauge(
            "upstream_queue_capped",
            "Requests waiting now because their credential holds its share of the request "
            "slots (api-max-in-flight-per-credential).",
        )
        self.upstream_capped_total = self._counter(
            "upstream_capped_total",
            "Sends that found their credential already holding its share of the request "
            "slots (api-max-in-flight-per-credential), and so waited or were refused.",
        )
        self.api_breaker_open = self._gauge(
            "api_breaker_open",
            "1 while the circuit breaker is open (API requests refused, the relay probing the API), else 0.",
        )
        self.api_last_reachable_timestamp_seconds = self._gauge(
            "api_last_reachable_timestamp_seconds",
            "When the PostStack API last gave an answer that is not a 5xx (Unix time; 0: never).",
        )
        # -- the fleet's shared state (--redis-url)
        self.fleet_state_up = self._gauge(
            "fleet_state_up",
            "1 while the Redis server of --redis-url answers, else 0 (always 0 without it).",
        )
        self.fleet_state_fallbacks_total = self._counter(
            "fleet_state_fallbacks_total",
            "Writes to the shared state (add: a failed login or an accepted connection; "
            "remember: a credential held; "
            "load: the notes read at (re)connection) that Redis did not take in time or at "
            "all: the relay decided with its own memory.",
            "operation",
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


__all__: Sequence[str] = ("RelayMetrics", "UpstreamMetrics")
