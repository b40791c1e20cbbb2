"""
Tests for the Prometheus metrics, C{/healthz} and C{/readyz}
(L{poststack_relay.metrics}) and for the instrumentation of the SMTP, TLS
and API layers; one test runs a real relay and scrapes it over loopback.
"""

from __future__ import annotations

import json
import os
import re
import smtplib
import socket
import ssl
import urllib.error
import urllib.request
from typing import Any, Optional

from prometheus_client.parser import text_string_to_metric_families
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, RaisingMemoryReactor, StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from treq.testing import StubTreq

from poststack_relay.api import HTTPEmailAPI
from poststack_relay.auth import PostStackChecker, RelayRealm
from poststack_relay.config import ConfigError, RelayConfig
from poststack_relay.places import parse_metrics_listen
from poststack_relay.delivery import RelayDelivery
from poststack_relay.metrics import RelayMetrics
from poststack_relay.monitoring import (
    ApiProbeService,
    MetricsResource,
    makeMetricsService,
    relay_readiness,
)
from poststack_relay.sandbox import (
    IN_TREE_DATA_PATH,
    SandboxResource,
    SandboxStore,
    load_sandbox_data,
)
from poststack_relay.smtp import RelayFactory
from poststack_relay.testing import MemoryEmailAPI, make_certificate, write_certificate
from poststack_relay.implicittls import ImplicitTLSFactory
from poststack_relay.listening import ListeningService
from poststack_relay.tls import ReloadableTLS, load_certificate_options
from tests.common.api import BASE, email
from tests.common.keys import FULL_KEY, SERVICE_KEY
from tests.common.smtp import MESSAGE, Harness, plain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DASHBOARD = os.path.join(ROOT, "etc", "grafana-dashboard.json")
DOCS = os.path.join(ROOT, "docs", "metrics.md")

P = "poststack_relay_"


def value(metrics: RelayMetrics, name: str, **labels: str) -> Optional[float]:
    """
    One sample's value (C{None} if absent).
    """
    return metrics.registry.get_sample_value(P + name, labels)


class RelayMetricsTests(SynchronousTestCase):
    def test_own_registry(self) -> None:
        """Two RelayMetrics do not share instruments, and neither uses the global registry."""
        from prometheus_client import REGISTRY

        a, b = RelayMetrics(), RelayMetrics()
        a.connections_total.inc()
        self.assertEqual(value(a, "connections_total"), 1.0)
        self.assertEqual(value(b, "connections_total"), 0.0)
        self.assertIsNone(REGISTRY.get_sample_value(P + "connections_total"))

    def test_every_name_prefixed(self) -> None:
        """Every metric is named poststack_relay_*."""
        names = {m.name for m in RelayMetrics().registry.collect()}
        self.assertGreater(len(names), 15)
        for name in names:
            self.assertTrue(name.startswith(P), name)

    def test_message_codes(self) -> None:
        """message() counts by reply code, one child per code."""
        m = RelayMetrics()
        for code in (250, 250, 451, 554):
            m.message(code)
        self.assertEqual(value(m, "messages_total", code="250"), 2.0)
        self.assertEqual(value(m, "messages_total", code="451"), 1.0)
        self.assertEqual(value(m, "messages_total", code="554"), 1.0)
        self.assertIsNone(value(m, "messages_total", code="552"))

    def test_exposition_formats(self) -> None:
        """The text format by default, OpenMetrics when the Accept header asks for it."""
        m = RelayMetrics()
        body, content_type = m.exposition(None)
        self.assertTrue(content_type.startswith("text/plain; version=0.0.4"), content_type)
        self.assertIn(b"# TYPE poststack_relay_connections_total counter", body)
        body, content_type = m.exposition("application/openmetrics-text; version=1.0.0")
        self.assertTrue(content_type.startswith("application/openmetrics-text"), content_type)
        self.assertTrue(body.endswith(b"# EOF\n"))

    def test_documented(self) -> None:
        """docs/metrics.md names every metric."""
        with open(DOCS, encoding="utf-8") as f:
            text = f.read()
        for metric in RelayMetrics().registry.collect():
            shown = metric.name + ("_total" if metric.type == "counter" else "")
            self.assertIn(f"`{shown}`", text)


class ListenParseTests(SynchronousTestCase):
    def test_good(self) -> None:
        """IPv4, bracketed IPv6, localhost and port 0 parse."""
        self.assertEqual(parse_metrics_listen("127.0.0.1:9587"), ("127.0.0.1", 9587))
        self.assertEqual(parse_metrics_listen("[::1]:9587"), ("::1", 9587))
        self.assertEqual(parse_metrics_listen("[::]:0"), ("::", 0))
        self.assertEqual(parse_metrics_listen("localhost:9"), ("127.0.0.1", 9))
        self.assertEqual(parse_metrics_listen("0.0.0.0:9587"), ("0.0.0.0", 9587))

    def test_bad(self) -> None:
        """Anything else is a one-line ConfigError starting with metrics-listen."""
        for bad in ("9587", "127.0.0.1", "::1:9587", "[::1]", "host.example:9587", "1.2.3.4:70000",
                    "127.0.0.1:-1", "[nope]:1", "127.0.0.1:95 87", "tcp:9587", ":9587"):
            with self.assertRaises(ConfigError, msg=bad) as ctx:
                parse_metrics_listen(bad)
            self.assertTrue(str(ctx.exception).startswith("metrics-listen "), str(ctx.exception))
            self.assertNotIn("\n", str(ctx.exception))

    def test_config_validates(self) -> None:
        """RelayConfig refuses a bad metrics-listen and accepts an empty one (disabled)."""
        with self.assertRaises(ConfigError) as ctx:
            RelayConfig(tls_cert="x.pem", metrics_listen="nonsense")
        self.assertTrue(str(ctx.exception).startswith("metrics-listen "))
        self.assertEqual(RelayConfig(tls_cert="x.pem", metrics_listen="").metrics_listen, "")


class ResourceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.metrics = RelayMetrics()
        self.reasons: list[str] = []
        self.stub = StubTreq(MetricsResource(self.metrics, lambda: list(self.reasons)))

    def get(self, path: str, method: str = "GET", **kw: Any) -> tuple[int, bytes, Any]:
        response = self.successResultOf(self.stub.request(method, "http://metrics.test" + path, **kw))
        body = self.successResultOf(response.content())
        return response.code, body, response.headers

    def test_metrics(self) -> None:
        """/metrics serves the registry in the text format."""
        self.metrics.connections_total.inc(3)
        code, body, headers = self.get("/metrics")
        self.assertEqual(code, 200)
        self.assertTrue(headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain; version=0.0.4"))
        families = {f.name: f for f in text_string_to_metric_families(body.decode())}
        [sample] = [s for s in families[P + "connections"].samples if s.name.endswith("_total")]
        self.assertEqual(sample.value, 3.0)

    def test_openmetrics(self) -> None:
        """An OpenMetrics Accept header gets OpenMetrics."""
        code, body, headers = self.get(
            "/metrics", headers={b"Accept": [b"application/openmetrics-text; version=1.0.0"]}
        )
        self.assertEqual(code, 200)
        self.assertTrue(headers.getRawHeaders(b"content-type")[0].startswith(b"application/openmetrics-text"))
        self.assertTrue(body.endswith(b"# EOF\n"))

    def test_healthz(self) -> None:
        """/healthz is 200 ok even when not ready."""
        self.reasons.append("nope")
        self.assertEqual(self.get("/healthz")[:2], (200, b"ok\n"))

    def test_readyz(self) -> None:
        """/readyz is 200 when there is no reason, else 503 with one reason per line."""
        self.assertEqual(self.get("/readyz")[:2], (200, b"ready\n"))
        self.reasons.extend(["listener down", "API unreachable"])
        self.assertEqual(self.get("/readyz")[:2], (503, b"listener down\nAPI unreachable\n"))

    def test_readyz_crash(self) -> None:
        """A readiness check that raises makes /readyz 503, not 500."""

        def broken() -> list[str]:
            raise RuntimeError("boom")

        stub = StubTreq(MetricsResource(self.metrics, broken))
        response = self.successResultOf(stub.get("http://metrics.test/readyz"))
        self.assertEqual(response.code, 503)
        self.assertEqual(self.successResultOf(response.content()), b"readiness check failed\n")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_not_found_and_methods(self) -> None:
        """Other paths are 404; other methods are 405 with Allow; HEAD has no body."""
        self.assertEqual(self.get("/")[0], 404)
        self.assertEqual(self.get("/metrics/x")[0], 404)
        code, _, headers = self.get("/metrics", method="POST", data=b"x")
        self.assertEqual(code, 405)
        self.assertEqual(headers.getRawHeaders(b"allow"), [b"GET, HEAD"])
        code, body, _ = self.get("/healthz", method="HEAD")
        self.assertEqual((code, body), (200, b""))


class ServiceTests(SynchronousTestCase):
    def test_binds(self) -> None:
        """The service listens on the parsed interface and port, IPv4 or IPv6, and exposes the port."""
        for listen, interface in (("127.0.0.1:9587", "127.0.0.1"), ("[::1]:9588", "::1")):
            reactor = MemoryReactorClock()
            service = makeMetricsService(RelayMetrics(), listen, reactor, lambda: [])
            service.startService()
            [(port, factory, _, bound)] = reactor.tcpServers
            self.assertEqual((port, bound), (int(listen[-4:]), interface))
            self.assertFalse(factory.noisy)
            self.successResultOf(service.port())

    def test_bind_failure_is_fatal(self) -> None:
        """A port that cannot be bound stops start-up."""
        reactor = RaisingMemoryReactor(listenException=CannotListenError("", 9587, OSError("in use")))
        service = makeMetricsService(RelayMetrics(), "127.0.0.1:9587", reactor, lambda: [])
        self.assertRaises(CannotListenError, service.startService)

    def test_bad_listen(self) -> None:
        """A bad listen value is a ConfigError before anything listens."""
        self.assertRaises(ConfigError, makeMetricsService, RelayMetrics(), "x", MemoryReactorClock(), lambda: [])


class FakeAPI:
    """
    Counts probes; the test fires them.
    """

    def __init__(self) -> None:
        self.probes: list[Deferred[bool]] = []
        self.cancelled: list[int] = []
        self.reachable = False

    def reachable_within(self, seconds: float) -> bool:
        return self.reachable

    def probe(self) -> "Deferred[bool]":
        d: Deferred[bool] = Deferred(lambda _: self.cancelled.append(len(self.probes) - 1))
        self.probes.append(d)
        return d


class ProbeServiceTests(SynchronousTestCase):
    def test_probes_when_idle(self) -> None:
        """A probe at start, one per interval, never two at once, none while traffic proves reachability."""
        api, clock = FakeAPI(), Clock()
        service = ApiProbeService(api, clock, interval=15)
        service.startService()
        self.assertEqual(len(api.probes), 1)
        clock.advance(15)
        self.assertEqual(len(api.probes), 1)  # the first is still in flight
        api.probes[0].callback(True)
        clock.advance(15)
        self.assertEqual(len(api.probes), 2)
        api.probes[1].callback(False)
        api.reachable = True
        clock.advance(15)
        self.assertEqual(len(api.probes), 2)
        api.reachable = False
        clock.advance(15)
        self.assertEqual(len(api.probes), 3)
        service.stopService()
        self.assertEqual(api.cancelled, [2])
        clock.advance(100)
        self.assertEqual(len(api.probes), 3)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_http_probe(self) -> None:
        """probe() is True for any non-5xx answer (the sandbox's 401), False for a 5xx or a hang."""
        clock = Clock()
        store = SandboxStore(self.mktemp())
        self.addCleanup(store.close)
        sandbox = SandboxResource(store, load_sandbox_data(IN_TREE_DATA_PATH), clock)
        stub = StubTreq(sandbox)
        metrics = RelayMetrics()
        api = HTTPEmailAPI(stub, BASE, 10.0, SERVICE_KEY, clock=clock, metrics=metrics)
        self.assertFalse(api.reachable_within(1000))
        self.assertTrue(self.successResultOf(api.probe()))
        self.assertTrue(api.reachable_within(0))
        self.assertEqual(value(metrics, "upstream_requests_total", call="probe", status="401"), 1.0)
        self.assertEqual(value(metrics, "api_last_reachable_timestamp_seconds"), 0.0 + clock.seconds())
        clock.advance(100)
        self.assertFalse(api.reachable_within(99))
        sandbox.inject_fault("503", path="/emails", method="GET")
        self.assertFalse(self.successResultOf(api.probe()))
        self.assertFalse(api.reachable_within(99))
        sandbox.inject_fault("hang", path="/emails", method="GET")
        d = api.probe(timeout=5.0)
        self.assertNoResult(d)
        clock.advance(5)
        self.assertFalse(self.successResultOf(d))
        self.assertEqual(value(metrics, "upstream_requests_total", call="probe", status="timeout"), 1.0)
        sandbox.abort_pending()


class APIInstrumentationTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.store = SandboxStore(self.mktemp())
        self.addCleanup(self.store.close)
        self.sandbox = SandboxResource(self.store, load_sandbox_data(IN_TREE_DATA_PATH), self.clock)
        self.stub = StubTreq(self.sandbox)
        self.metrics = RelayMetrics()

        class Fixed:
            def uniform(self, a: float, b: float) -> float:
                return b

        self.api = HTTPEmailAPI(
            self.stub, BASE, 10.0, SERVICE_KEY, clock=self.clock, metrics=self.metrics, rng=Fixed()  # type: ignore[arg-type]
        )

    def test_attempts_and_retries(self) -> None:
        """Each attempt is counted by call and status with its duration; a retry is counted once."""
        self.sandbox.inject_fault("503")
        d = self.api.send_email(FULL_KEY, email())
        self.stub.flush()
        self.clock.advance(0.25)  # the back-off (the fixed jitter takes the whole range)
        self.stub.flush()
        self.successResultOf(d)
        m = self.metrics
        self.assertEqual(value(m, "upstream_requests_total", call="send", status="503"), 1.0)
        self.assertEqual(value(m, "upstream_requests_total", call="send", status="202"), 1.0)
        self.assertEqual(value(m, "upstream_retries_total", call="send"), 1.0)
        self.assertEqual(value(m, "upstream_request_duration_seconds_count", call="send"), 2.0)
        self.assertEqual(value(m, "upstream_request_duration_seconds_sum", call="send"), 0.0)
        self.assertTrue(self.successResultOf(self.api.check_api_key(FULL_KEY)))
        self.assertFalse(self.successResultOf(self.api.check_api_key("sk_test_nope")))
        self.assertEqual(value(m, "upstream_requests_total", call="key_check", status="200"), 1.0)
        self.assertEqual(value(m, "upstream_requests_total", call="key_check", status="401"), 1.0)
        self.assertTrue(self.api.reachable_within(0))

    def test_5xx_not_reachable(self) -> None:
        """A 5xx answer does not count as reachable."""
        api = HTTPEmailAPI(self.stub, BASE, 10.0, SERVICE_KEY, clock=self.clock, max_attempts=1)
        self.sandbox.inject_fault("500")
        self.failureResultOf(api.send_email(FULL_KEY, email()))
        self.assertIsNone(api.last_reachable)
        self.assertEqual(value(api.metrics, "upstream_requests_total", call="send", status="500"), 1.0)

    def test_timeout_duration_and_in_flight(self) -> None:
        """A hanging attempt is in flight until it times out after 10 s, then counted as timeout."""
        api = HTTPEmailAPI(self.stub, BASE, 10.0, SERVICE_KEY, clock=self.clock, max_attempts=1,
                           metrics=self.metrics)
        self.sandbox.inject_fault("hang")
        d = api.send_email(FULL_KEY, email())
        self.assertEqual(value(self.metrics, "upstream_in_flight"), 1.0)
        self.clock.advance(10)
        self.failureResultOf(d)
        self.assertEqual(value(self.metrics, "upstream_in_flight"), 0.0)
        self.assertEqual(value(self.metrics, "upstream_requests_total", call="send", status="timeout"), 1.0)
        self.assertEqual(value(self.metrics, "upstream_request_duration_seconds_sum", call="send"), 10.0)
        self.sandbox.abort_pending()

    def test_queue_and_breaker(self) -> None:
        """The queue gauge counts waiters for a slot; the breaker gauge is 1 while it refuses."""
        api = HTTPEmailAPI(self.stub, BASE, 10.0, SERVICE_KEY, clock=self.clock, max_attempts=1,
                           max_in_flight=1, breaker_failures=1, metrics=self.metrics)
        self.sandbox.inject_fault("hang")
        first = api.send_email(FULL_KEY, email())
        second = api.send_email(FULL_KEY, email())
        self.assertEqual(value(self.metrics, "upstream_queue"), 1.0)
        self.assertEqual(value(self.metrics, "api_breaker_open"), 0.0)
        self.clock.advance(10)  # the first times out: a failure opens the breaker
        self.failureResultOf(first)
        self.assertEqual(value(self.metrics, "upstream_queue"), 0.0)
        self.assertEqual(value(self.metrics, "api_breaker_open"), 1.0)
        self.failureResultOf(second)
        self.sandbox.abort_pending()


class SMTPInstrumentationTests(SynchronousTestCase):
    def test_session_counts(self) -> None:
        """A session is counted open, then closed with its duration; AUTH and messages by result and code."""
        h = Harness(max_message_size=100000)
        m = h.factory.metrics
        self.assertEqual(value(m, "connections_total"), 1.0)
        self.assertEqual(value(m, "connections_open"), 1.0)
        h.send(b"EHLO client.test\r\n")
        self.assertEqual(h.send(b"AUTH PLAIN " + plain("poststack", "wrong") + b"\r\n")[0][:3], b"535")
        self.assertEqual(h.send(b"AUTH PLAIN !!!\r\n")[0][:3], b"501")
        h.login()
        h.send(b"MAIL FROM:<you@yourdomain.com>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n")
        lines = h.send(MESSAGE + b".\r\n")
        self.assertEqual(lines[0][:3], b"250")
        self.assertEqual(value(m, "auth_total", result="ok"), 1.0)
        self.assertEqual(value(m, "auth_total", result="invalid"), 1.0)
        self.assertEqual(value(m, "auth_total", result="malformed"), 1.0)
        self.assertEqual(value(m, "messages_total", code="250"), 1.0)
        self.assertEqual(value(m, "message_size_bytes_count"), 1.0)
        self.assertEqual(value(m, "message_size_bytes_sum"), float(len(MESSAGE)))
        h.clock.advance(7)
        h.proto.connectionLost(None)
        self.assertEqual(value(m, "connections_open"), 0.0)
        self.assertEqual(value(m, "session_duration_seconds_count"), 1.0)
        self.assertEqual(value(m, "session_duration_seconds_sum"), 7.0)

    def test_too_big_and_rejected(self) -> None:
        """552 for a too-big message and the API's own rejection code are counted at the end of DATA."""
        from poststack_relay.api import APIError
        from poststack_relay.replies import Reply

        h = Harness(max_message_size=50)
        h.login()
        h.send(b"MAIL FROM:<you@yourdomain.com>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n")
        self.assertEqual(h.send(b"x" * 80 + b"\r\n.\r\n")[0][:3], b"552")
        h.api.next_error = APIError(Reply(554, "5.6.0", "nope"))
        h.send(b"MAIL FROM:<you@yourdomain.com>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n")
        self.assertEqual(h.send(b"Subject: x\r\n\r\nhi\r\n.\r\n")[0][:3], b"554")
        m = h.factory.metrics
        self.assertEqual(value(m, "messages_total", code="552"), 1.0)
        self.assertEqual(value(m, "messages_total", code="554"), 1.0)
        self.assertEqual(value(m, "message_size_bytes_count"), 2.0)
        self.assertEqual(value(m, "message_size_bytes_bucket", le="1024.0"), 2.0)

    def test_auth_unavailable(self) -> None:
        """AUTH while the API is down is counted as unavailable."""
        h = Harness()
        h.api.unavailable = True
        h.send(b"EHLO client.test\r\n")
        self.assertEqual(h.send(b"AUTH PLAIN " + plain("poststack", "sk_test_x") + b"\r\n")[0][:3], b"454")
        self.assertEqual(value(h.factory.metrics, "auth_total", result="unavailable"), 1.0)

    def test_refusals(self) -> None:
        """Refused connections are counted by reason and are not sessions."""
        metrics = RelayMetrics()
        cfg = RelayConfig(tls_cert="unused.pem", hostname="relay.test", max_connections=2,
                          max_connections_per_ip=1, stress_threshold=0)
        factory = RelayFactory(Portal(RelayRealm(lambda i: None), []), cfg, Clock(), metrics=metrics)
        a = IPv4Address("TCP", "192.0.2.1", 1)
        b = IPv4Address("TCP", "192.0.2.2", 1)
        c = IPv4Address("TCP", "192.0.2.3", 1)
        factory.buildProtocol(a)
        factory.buildProtocol(a)  # per client
        factory.buildProtocol(b)
        factory.buildProtocol(c)  # in total
        factory.stopping = True
        factory.buildProtocol(c)
        self.assertEqual(value(metrics, "connections_total"), 2.0)
        self.assertEqual(value(metrics, "connections_refused_total", reason="max_connections_per_ip"), 1.0)
        self.assertEqual(value(metrics, "connections_refused_total", reason="max_connections"), 1.0)
        self.assertEqual(value(metrics, "connections_refused_total", reason="stopping"), 1.0)


class Banner(Protocol):
    def connectionMade(self) -> None:
        self.transport.write(b"220 banner\r\n")


class TLSInstrumentationTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.cert, self.key = write_certificate(os.path.abspath(self.mktemp()))
        self.metrics = RelayMetrics()
        self.clock = Clock()

    def connect(self) -> tuple[Any, StringTransport]:
        factory = ImplicitTLSFactory(
            load_certificate_options(self.cert, self.key), Factory.forProtocol(Banner), 2.0,
            self.clock, metrics=self.metrics,
        )
        proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 2))
        proto.makeConnection(transport)
        return proto, transport

    def failures(self, reason: str) -> Optional[float]:
        return value(self.metrics, "tls_handshake_failures_total", reason=reason)

    def test_reasons(self) -> None:
        """plaintext, timeout, handshake error and mid-handshake close are each counted once."""
        proto, _ = self.connect()
        proto.dataReceived(b"EHLO x\r\n")
        proto.connectionLost(None)
        proto, _ = self.connect()
        self.clock.advance(2)
        proto.connectionLost(None)
        proto, _ = self.connect()
        proto.dataReceived(b"\x16\x03\x01\x00\x05hello")  # not a ClientHello
        proto.connectionLost(None)
        proto, _ = self.connect()
        proto.dataReceived(b"\x16\x03")  # the start of a record, then nothing
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        proto.connectionLost(Failure(ConnectionDone()))
        proto, _ = self.connect()
        proto.connectionLost(None)  # no byte at all: a health check, not counted
        self.assertEqual(
            [self.failures(r) for r in ("plaintext", "timeout", "handshake", "closed")],
            [1.0, 1.0, 1.0, 1.0],
        )

    def test_refusal_logged_with_reason(self) -> None:
        """tls_plaintext_refused says which case it was: a silent client (timeout: STARTTLS or plain SMTP) or plaintext bytes."""
        from twisted.logger import capturedLogs, formatEvent

        with capturedLogs() as events:
            proto, transport = self.connect()
            self.clock.advance(2)
            proto.connectionLost(None)
            proto, _ = self.connect()
            proto.dataReceived(b"EHLO x\r\n")
            proto.connectionLost(None)
        refused = [e for e in events if e.get("event") == "tls_plaintext_refused"]
        self.assertEqual([(e["reason"], e["seconds"]) for e in refused], [("timeout", 2.0), ("plaintext", 2.0)])
        self.assertIn("it sent nothing for 2 s (it waits for a plaintext greeting: configured for STARTTLS",
                      formatEvent(refused[0]))
        self.assertIn("its first bytes were not TLS", formatEvent(refused[1]))
        self.assertTrue(transport.value().startswith(b"554 5.7.0 "), transport.value())

    def test_good_handshake_not_counted(self) -> None:
        """A client that completes the handshake (TLS 1.3 or 1.2) is not a failure."""
        from twisted.internet.ssl import CertificateOptions, TLSVersion
        from twisted.protocols.tls import TLSMemoryBIOFactory
        from twisted.test.iosim import connect, makeFakeClient, makeFakeServer

        for version in (TLSVersion.TLSv1_3, TLSVersion.TLSv1_2):
            server_factory = ImplicitTLSFactory(
                load_certificate_options(self.cert, self.key), Factory.forProtocol(Banner), 2.0,
                self.clock, metrics=self.metrics,
            )
            received: list[bytes] = []

            class Client(Protocol):
                def dataReceived(self, data: bytes) -> None:
                    received.append(data)

            client_factory = TLSMemoryBIOFactory(
                CertificateOptions(verify=False, lowerMaximumSecurityTo=version),
                True, Factory.forProtocol(Client), self.clock,
            )
            server = server_factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
            client = client_factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 2))
            pump = connect(server, makeFakeServer(server), client, makeFakeClient(client),
                           greet=False, clock=self.clock)
            for _ in range(20):
                pump.flush()
                self.clock.advance(0)
            self.assertEqual(b"".join(received), b"220 banner\r\n", version)
            self.assertEqual(server.getHandle().get_protocol_version_name(), version.name.replace("v1_", "v1."))
            client.transport.loseConnection()
            pump.flush()
            for reason in ("plaintext", "timeout", "handshake", "closed"):
                self.assertEqual(self.failures(reason), 0.0, (version, reason))

    def test_no_common_protocol_is_a_handshake_failure(self) -> None:
        """A TLS 1.2 client against the modern (TLS 1.3 only) profile is counted once, as handshake."""
        from twisted.internet.ssl import CertificateOptions, TLSVersion
        from twisted.protocols.tls import TLSMemoryBIOFactory
        from twisted.test.iosim import connect, makeFakeClient, makeFakeServer

        server_factory = ImplicitTLSFactory(
            load_certificate_options(self.cert, self.key, "modern"), Factory.forProtocol(Banner),
            2.0, self.clock, metrics=self.metrics,
        )
        client_factory = TLSMemoryBIOFactory(
            CertificateOptions(verify=False, lowerMaximumSecurityTo=TLSVersion.TLSv1_2),
            True, Factory.forProtocol(Protocol), self.clock,
        )
        server = server_factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        client = client_factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 2))
        pump = connect(server, makeFakeServer(server), client, makeFakeClient(client),
                       greet=False, clock=self.clock)
        for _ in range(20):
            pump.flush()
            self.clock.advance(0)
        self.assertEqual(
            [self.failures(r) for r in ("plaintext", "timeout", "handshake", "closed")],
            [0.0, 0.0, 1.0, 0.0],
        )

    def test_certificate_expiry(self) -> None:
        """The expiry gauge follows the loaded certificate, and reloads are counted by result."""
        from cryptography import x509

        tls = ReloadableTLS(self.cert, self.key, metrics=self.metrics)

        def not_after() -> float:
            with open(self.cert, "rb") as f:
                return x509.load_pem_x509_certificate(f.read()).not_valid_after_utc.timestamp()

        expiry = lambda: value(self.metrics, "tls_certificate_expiry_timestamp_seconds",  # noqa: E731
                               certificate=self.cert)
        self.assertEqual(expiry(), not_after())
        cert_pem, key_pem, _ = make_certificate("localhost", days=90)
        with open(self.cert, "wb") as f:
            f.write(cert_pem)
        with open(self.key, "wb") as f:
            f.write(key_pem)
        self.assertTrue(tls.reload("test"))
        self.assertEqual(expiry(), not_after())
        with open(self.cert, "wb") as f:
            f.write(b"garbage")
        self.assertFalse(tls.reload("test"))
        self.assertEqual(value(self.metrics, "tls_reloads_total", result="ok"), 1.0)
        self.assertEqual(value(self.metrics, "tls_reloads_total", result="failed"), 1.0)


class ReadinessTests(SynchronousTestCase):
    def test_reasons(self) -> None:
        """Not listening, stopping and API unreachable each give a reason; an in-memory API is reachable."""
        reactor = MemoryReactorClock()
        listener = ListeningService(TCP4ServerEndpoint(reactor, 0), Factory.forProtocol(Protocol))

        class Stopping:
            stopping = False

        class API:
            ok = False

            def reachable_within(self, seconds: float) -> bool:
                return self.ok

        factory, api = Stopping(), API()
        check = relay_readiness(lambda: [("127.0.0.1:587", listener)], factory, api, 60)
        self.assertEqual(
            check(),
            ["SMTP listener 127.0.0.1:587 is not listening",
             "PostStack API not reachable within the last 60 s"],
        )
        listener.startService()
        api.ok = True
        self.assertEqual(check(), [])
        factory.stopping = True
        self.assertEqual(check(), ["relay is stopping"])
        self.assertEqual(relay_readiness(lambda: [], Stopping(), MemoryEmailAPI(), 1)(), [])


def _expr_names(expr: str) -> set[str]:
    """
    The metric names an expression uses.
    """
    return set(re.findall(r"\b(poststack_relay_[a-z_]+)\b", expr))


class DashboardTests(SynchronousTestCase):
    def test_dashboard(self) -> None:
        """The Grafana dashboard loads, uses the DS_PROMETHEUS input, and only names metrics that exist."""
        with open(DASHBOARD, encoding="utf-8") as f:
            dashboard = json.load(f)
        self.assertEqual(dashboard["__inputs"][0]["name"], "DS_PROMETHEUS")
        known = RelayMetrics().names()
        exprs = [
            target["expr"]
            for panel in dashboard["panels"]
            for target in panel.get("targets", [])
        ]
        self.assertGreaterEqual(len(exprs), 11)
        used: set[str] = set()
        for expr in exprs:
            used |= _expr_names(expr)
        self.assertTrue(used)
        self.assertEqual(sorted(used - known), [])
        # every instrument family is shown somewhere but the session/probe extras
        for name in ("messages_total", "upstream_request_duration_seconds_bucket",
                     "upstream_requests_total", "upstream_retries_total", "upstream_in_flight",
                     "connections_open", "auth_total", "tls_handshake_failures_total",
                     "message_size_bytes_bucket", "tls_certificate_expiry_timestamp_seconds"):
            self.assertIn(P + name, used)


# ---------------------------------------------------------------------------
# A real relay over loopback


def _http(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class LoopbackTests(TestCase):
    """
    The relay assembled by hand (sandbox over HTTP, HTTPEmailAPI, TLS
    listener) with the metrics service, both on 127.0.0.1:0.
    """

    timeout = 60

    async def _start(self) -> None:
        from twisted.internet import reactor
        from twisted.web.client import Agent, HTTPConnectionPool
        import treq.client

        from poststack_relay.sandbox import makeSandboxService

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.cafile, keyfile = write_certificate(directory)
        sandbox = makeSandboxService(
            0, "127.0.0.1", os.path.join(directory, "db.sqlite3"), IN_TREE_DATA_PATH, reactor
        )
        sandbox.startService()
        self.addCleanup(sandbox.stopService)
        api_url = f"http://127.0.0.1:{(await sandbox.when_listening()).getHost().port}"
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        self.metrics = metrics = RelayMetrics()
        self.api = api = HTTPEmailAPI(
            treq.client.HTTPClient(Agent(reactor, pool=pool)), api_url, 10.0, SERVICE_KEY,
            clock=reactor, metrics=metrics,
        )
        cfg = RelayConfig(tls_cert=self.cafile, tls_key=keyfile, hostname="localhost", api_url=api_url)
        portal = Portal(RelayRealm(lambda i: RelayDelivery(i, api)),
                        [PostStackChecker(api, reactor, SERVICE_KEY)])
        self.factory = factory = RelayFactory(portal, cfg, reactor, metrics=metrics)
        tls = ReloadableTLS(self.cafile, keyfile, metrics=metrics)
        wrapped = ImplicitTLSFactory(tls, factory, 2.0, reactor, metrics=metrics)
        listener = ListeningService(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"), wrapped)
        listener.startService()
        self.addCleanup(listener.stopService)
        self.smtp_port = (await listener.when_listening()).getHost().port
        service = makeMetricsService(
            metrics, "127.0.0.1:0", reactor, relay_readiness(lambda: [("smtps", listener)], factory, api, 60)
        )
        service.startService()
        self.addCleanup(service.stopService)
        port = (await service.port()).getHost().port
        self.base = f"http://127.0.0.1:{port}"

    def test_scrape(self) -> "Deferred[None]":
        """One message, one failed AUTH and one plaintext client show up in /metrics; /readyz follows the API."""
        return Deferred.fromCoroutine(self._test_scrape())

    async def _test_scrape(self) -> None:
        from twisted.internet import reactor
        from twisted.internet.task import deferLater
        from twisted.internet.threads import deferToThread

        await self._start()
        self.assertEqual(await deferToThread(_http, self.base + "/healthz"), (200, b"ok\n"))
        code, body = await deferToThread(_http, self.base + "/readyz")
        self.assertEqual(code, 503)
        self.assertEqual(body, b"PostStack API not reachable within the last 60 s\n")

        def clients() -> None:
            context = ssl.create_default_context(cafile=self.cafile)
            with smtplib.SMTP_SSL("localhost", self.smtp_port, context=context, timeout=20) as s:
                s.login("poststack", FULL_KEY)
                s.sendmail("you@yourdomain.com", ["user@example.com"],
                           "From: you@yourdomain.com\r\nTo: user@example.com\r\n"
                           "Subject: metrics\r\n\r\nHello\r\n")
            with smtplib.SMTP_SSL("localhost", self.smtp_port, context=context, timeout=20) as s:
                try:
                    s.login("poststack", "sk_test_not_a_key")
                except smtplib.SMTPAuthenticationError as e:
                    assert e.smtp_code == 535, e
                else:
                    raise AssertionError("a bad key logged in")
            with socket.create_connection(("127.0.0.1", self.smtp_port), timeout=20) as raw:
                raw.sendall(b"EHLO plain.test\r\n")
                assert raw.recv(1024).startswith(b"554 5.7.0"), "no plaintext refusal"

        await deferToThread(clients)
        for _ in range(100):  # the server sees the last close a little later
            if not self.factory.sessions:
                break
            await deferLater(reactor, 0.05)
        self.assertEqual(await deferToThread(_http, self.base + "/readyz"), (200, b"ready\n"))

        code, body = await deferToThread(_http, self.base + "/metrics")
        self.assertEqual(code, 200)
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode("utf-8"))
            for s in family.samples
        }

        def v(name: str, **labels: str) -> Optional[float]:
            return samples.get((P + name, tuple(sorted(labels.items()))))

        self.assertEqual(v("connections_total"), 3.0)
        self.assertEqual(v("connections_open"), 0.0)
        self.assertEqual(v("tls_handshake_failures_total", reason="plaintext"), 1.0)
        self.assertEqual(v("auth_total", result="ok"), 1.0)
        # smtplib tries PLAIN, then LOGIN, with the same secret: two 535s,
        # one failed guess.
        self.assertEqual(v("auth_total", result="invalid"), 1.0)
        self.assertEqual(v("auth_total", result="repeated"), 1.0)
        self.assertEqual(v("messages_total", code="250"), 1.0)
        self.assertEqual(v("message_size_bytes_count"), 1.0)
        self.assertEqual(v("upstream_requests_total", call="key_check", status="200"), 1.0)
        self.assertEqual(v("upstream_requests_total", call="key_check", status="401"), 1.0)
        self.assertEqual(v("upstream_requests_total", call="send", status="202"), 1.0)
        self.assertEqual(v("upstream_request_duration_seconds_count", call="send"), 1.0)
        self.assertEqual(v("upstream_in_flight"), 0.0)
        self.assertEqual(v("session_duration_seconds_count"), 3.0)
        self.assertGreater(v("tls_certificate_expiry_timestamp_seconds", certificate=self.cafile) or 0, 0)
