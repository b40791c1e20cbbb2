"""
The circuit breaker recovers by itself, seen from outside: a real relay on
loopback TLS in front of the sandbox API over real HTTP, faults injected
through the sandbox's own HTTP fault API, and smtplib as the client.

For each kind of outage (500, 503, reset, time-out, slow, lost response):
the API fails -> the client gets 4xx, at last the breaker's own
C{451 4.3.0 ... after repeated failures} -> the API recovers -> the
client's retry 1.5 s later gets C{250}, and exactly one email exists.
"""

from __future__ import annotations

import json
import urllib.request
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater

from poststack_relay.replies import API_DOWN
from tests.common.relay import RelayTestCase, send_once, tagged_message

# The fault on both routes the relay uses: sends (POST /emails), and key
# checks and the breaker's probe (GET /emails?per_page=1).
ROUTES = (("POST", "/emails"), ("GET", "/emails"))


def fault_api(api_url: str, method: str, body: dict[str, Any] | None = None) -> None:
    """Call the sandbox's fault API (C{/_sandbox/faults}) over HTTP."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{api_url}/_sandbox/faults", data=data, method=method,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status in (200, 201), answer.status


class BreakerRecoveryTests(RelayTestCase):
    """
    Two failed messages open the breaker (each counts once, however many
    attempts it made); it probes the API every 0.5 s by itself.
    """

    timeout = 60
    relay_options = {"api_timeout": 1.0, "api_deadline": 3.0, "api_breaker_failures": 2}

    async def outage(self, mode: str, delay: float = 0.0) -> None:
        port, context = self.port, self.context()
        # A first message logs in (the key is then cached) and is sent.
        warm = await self.in_thread(send_once, port, context, tagged_message("warm-up"))
        self.assertEqual(warm[0], 250, warm)
        for method, path in ROUTES:
            fault = {"mode": mode, "count": -1, "delay": delay, "method": method, "path": path}
            await self.in_thread(fault_api, self.api_url, "POST", fault)
        tag = f"outage-{mode}"
        replies = []
        for _ in range(6):
            replies.append(await self.in_thread(send_once, port, context, tagged_message(tag)))
            if replies[-1][1] == f"{API_DOWN.enhanced} {API_DOWN.text}":
                break
        self.assertTrue(all(400 <= code < 500 for code, _ in replies), replies)
        # The first message failed on its own, however many attempts it
        # made: one message alone never opens the breaker.
        self.assertNotEqual(replies[0][1], f"{API_DOWN.enhanced} {API_DOWN.text}", replies)
        self.assertEqual(replies[-1], (API_DOWN.code, f"{API_DOWN.enhanced} {API_DOWN.text}"), replies)
        self.assertEqual(self.relay.metrics.registry.get_sample_value("poststack_relay_api_breaker_open"), 1.0)
        await self.in_thread(fault_api, self.api_url, "DELETE")  # the API is back
        await deferLater(reactor, 1.5, lambda: None)
        code, text = await self.in_thread(send_once, port, context, tagged_message(tag))
        stored = [e for e in self.stored() if e.payload.get("subject") == tag]
        self.assertEqual(code, 250, (replies, text))
        self.assertEqual(len(stored), 1, stored)
        self.assertEqual(text, f"2.0.0 Ok: queued as {stored[0].id}")
        self.assertEqual(self.relay.metrics.registry.get_sample_value("poststack_relay_api_breaker_open"), 0.0)

    async def test_500(self) -> None:
        """500 on every request, then recovery."""
        await self.outage("500")

    async def test_503(self) -> None:
        """503 on every request, then recovery."""
        await self.outage("503")

    async def test_reset(self) -> None:
        """Every connection reset, then recovery."""
        await self.outage("reset")

    async def test_timeout(self) -> None:
        """Every request hangs (time-outs); the probe in flight still hangs after recovery."""
        await self.outage("hang")

    async def test_slow(self) -> None:
        """Every answer slower than the attempt time-out, then recovery."""
        await self.outage("slow", delay=2.0)

    async def test_lost_response(self) -> None:
        """Stored, then a 500 (the answer is lost): the retry gets the same email's id."""
        await self.outage("accept_then_500")
