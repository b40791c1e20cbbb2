# -*- test-case-name: tests.test_metrics_service -*-
"""
The metrics listener as C{makeRelayService} wires it: real loopback TLS and
SMTP against the sandbox, then C{/metrics}, C{/healthz} and C{/readyz} over
real HTTP; and Debian's HAProxy taking a relay out of rotation when its
C{/readyz} fails.
"""

from __future__ import annotations

import os
import smtplib
import socket
import time
from typing import Any, Optional

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.task import deferLater

from tests.common.keys import FULL_KEY
from tests.common.relay import RelayTestCase, http_get
from tests.common.haproxy import HAPROXY, haproxy_config, start_haproxy
from tests.common.processes import free_port, wait_for_port


def sample(text: str, name: str, **labels: str) -> Optional[float]:
    """
    The value of sample C{name} with C{labels} in an exposition, or C{None}.
    """
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None


class WiredMetricsTests(RelayTestCase):
    """makeRelayService serves the relay's own counters on its metrics listener."""

    async def metrics_url(self) -> str:
        assert self.relay.metrics_service is not None
        port = await self.relay.metrics_service.port()
        return f"http://127.0.0.1:{port.getHost().port}"

    async def test_counts_a_real_session(self) -> None:
        """One relayed message and one failed login show up in /metrics with their real values."""
        base = await self.metrics_url()

        def session() -> None:
            with self.smtp() as client:
                client.login("poststack", FULL_KEY)
                client.sendmail("you@yourdomain.com", ["a@example.com", "b@example.com"],
                                b"Subject: metrics\r\n\r\nhello\r\n")
            with self.smtp() as client:
                with self.assertRaises(smtplib.SMTPAuthenticationError):
                    client.login("poststack", "sk_test_wrong")

        await self.in_thread(session)
        status, text = await self.in_thread(http_get, base + "/metrics")
        self.assertEqual(status, 200)
        self.assertEqual(sample(text, "poststack_relay_messages_total", code="250"), 1.0)
        self.assertEqual(sample(text, "poststack_relay_upstream_requests_total", call="send", status="202"), 1.0)
        self.assertEqual(sample(text, "poststack_relay_connections_total"), 2.0)
        self.assertGreaterEqual(sample(text, "poststack_relay_auth_total", result="invalid") or 0, 1.0)
        self.assertEqual(sample(text, "poststack_relay_auth_total", result="ok"), 1.0)
        self.assertEqual(sample(text, "poststack_relay_message_size_bytes_count"), 1.0)
        expiry = sample(text, "poststack_relay_tls_certificate_expiry_timestamp_seconds", certificate=self.cafile)
        self.assertIsNotNone(expiry)
        assert expiry is not None
        self.assertGreater(expiry, time.time())
        self.assertEqual(await self.in_thread(http_get, base + "/healthz"), (200, "ok\n"))
        code, body = await self.in_thread(http_get, base + "/readyz")
        self.assertEqual(code, 200, body)

    async def test_not_ready_while_draining(self) -> None:
        """Once a stop begins, /readyz answers 503 "relay is stopping" while sessions drain."""
        base = await self.metrics_url()
        client = await self.in_thread(self.smtp)
        await self.in_thread(client.login, "poststack", FULL_KEY)
        await self.in_thread(client.mail, "you@yourdomain.com")  # mid-transaction: the drain waits
        stopping = self.relay.stopService()
        code, body = await self.in_thread(http_get, base + "/readyz")
        self.assertEqual(code, 503)
        self.assertIn("relay is stopping", body)
        await self.in_thread(client.close)
        await stopping


def haproxy_status(stats: str) -> str:
    """
    The status (UP, DOWN, ...) of the backend server "relay", from HAProxy's stats socket.
    """
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(stats)
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    for line in data.decode().splitlines():
        fields = line.split(",")
        if len(fields) > 17 and fields[0] == "relay" and fields[1] == "relay":
            return fields[17]
    raise AssertionError(f"no relay server in {data!r}")


class UnreachableApiTests(RelayTestCase):
    """With the API gone, /readyz says so, and HAProxy's httpchk takes the relay out of rotation."""

    relay_options = {"api_timeout": 0.5}

    def setUp(self) -> Any:
        # Probe every 0.2 s, so "reachable recently" means the last ~0.9 s.
        from poststack_relay import service

        self.patch(service, "API_PROBE_INTERVAL", 0.2)
        return super().setUp()

    async def wait_for(self, predicate: Any, seconds: float = 15.0) -> None:
        """Poll C{predicate} (run in a thread) until true, at most C{seconds}."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if await self.in_thread(predicate):
                return
            await deferLater(reactor, 0.1, lambda: None)
        self.fail(f"not true after {seconds}s: {predicate}")

    async def test_readyz_follows_the_api(self) -> None:
        """/readyz is 200 while the sandbox answers, then 503 naming the API once it is gone."""
        assert self.relay.metrics_service is not None
        port = await self.relay.metrics_service.port()
        base = f"http://127.0.0.1:{port.getHost().port}"
        await self.wait_for(lambda: http_get(base + "/readyz")[0] == 200)
        # The API "down": every request answered 503 (a stopped listener
        # would leave the relay's kept-alive connection answering).
        self.sandbox.resource.inject_fault("503", count=-1, method="GET")
        await self.wait_for(lambda: http_get(base + "/readyz")[0] == 503)
        code, body = await self.in_thread(http_get, base + "/readyz")
        self.assertIn("PostStack API not reachable", body)
        self.assertEqual(await self.in_thread(http_get, base + "/healthz"), (200, "ok\n"))

    async def test_haproxy_httpchk(self) -> None:
        """HAProxy marks the relay UP through /readyz, relays through it, DOWN while the API fails, UP again after."""
        if HAPROXY is None:
            self.skipTest("haproxy is not installed (apt-get install haproxy)")
        import tempfile

        directory = tempfile.mkdtemp(prefix="hap-")  # short: AF_UNIX paths are limited
        self.addCleanup(__import__("shutil").rmtree, directory, True)
        stats = os.path.join(directory, "stats.sock")
        assert self.relay.metrics_service is not None
        metrics_port = (await self.relay.metrics_service.port()).getHost().port
        front = free_port()
        process = start_haproxy(self, directory, haproxy_config(
            front,
            self.port,
            server=f"check port {metrics_port} inter 200ms fall 1 rise 1",
            backend=["option httpchk GET /readyz"],
            global_=[f"stats socket {stats} mode 600 level user"],
        ))
        await self.in_thread(wait_for_port, front, process)
        await self.wait_for(lambda: haproxy_status(stats) == "UP")

        def send() -> None:
            with smtplib.SMTP_SSL("localhost", front, context=self.context(), timeout=30) as client:
                client.login("poststack", FULL_KEY)
                client.sendmail("you@yourdomain.com", "user@example.com",
                                b"Subject: behind haproxy\r\n\r\nhello\r\n")

        await self.in_thread(send)
        self.assertEqual(len(self.stored()), 1)
        self.sandbox.resource.inject_fault("503", count=-1, method="GET")
        await self.wait_for(lambda: haproxy_status(stats).startswith("DOWN"))
        self.sandbox.resource.clear_faults()
        await self.wait_for(lambda: haproxy_status(stats) == "UP")
