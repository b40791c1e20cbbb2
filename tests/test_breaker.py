"""
Tests for L{poststack_relay.api.breaker.CircuitBreaker} on its own, with a
probe the test answers, on a L{Clock}; and for the relay stopping its
probing when it stops.
"""

from __future__ import annotations

import os

from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from poststack_relay import RelayConfig, makeRelayService
from poststack_relay.api import CircuitBreaker, HTTPEmailAPI
from poststack_relay.testing import write_certificate


class Probes:
    """A probe the test answers: every call is a new pending Deferred."""

    def __init__(self) -> None:
        self.sent: list[Deferred[bool]] = []
        self.cancelled = 0

    def __call__(self) -> "Deferred[bool]":
        def cancel(d: "Deferred[bool]") -> None:
            self.cancelled += 1

        d: Deferred[bool] = Deferred(cancel)
        self.sent.append(d)
        return d

    def in_flight(self) -> int:
        return len([d for d in self.sent if not d.called])


class CircuitBreakerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.probes = Probes()
        self.breaker = CircuitBreaker(2, 0.5, self.clock, self.probes)

    def open(self) -> None:
        self.breaker.record("failure")
        self.breaker.record("failure")
        self.assertEqual(self.breaker.state, "open")

    def test_counts_and_resets(self) -> None:
        """Failures in a row open it; a success in between resets the count; others change nothing."""
        self.breaker.record("failure")
        self.breaker.record("inconclusive")
        self.breaker.record("success")
        self.breaker.record("failure")
        self.assertEqual((self.breaker.state, self.breaker.failures), ("closed", 1))
        self.assertFalse(self.breaker.refuses())
        self.breaker.record("failure")
        self.assertTrue(self.breaker.refuses())

    def test_first_probe_after_one_interval(self) -> None:
        """No probe at once (the failures just happened); the first one interval later."""
        self.open()
        self.clock.advance(0.499)
        self.assertEqual(self.probes.sent, [])
        self.clock.advance(0.001)
        self.assertEqual(len(self.probes.sent), 1)

    def test_failed_probes_one_per_interval(self) -> None:
        """A probe that fails at once: the next one interval after the previous started."""
        self.open()
        for n in range(1, 6):
            self.clock.advance(0.5)
            self.assertEqual(len(self.probes.sent), n)
            self.probes.sent[-1].callback(False)
        self.assertEqual(self.breaker.state, "open")

    def test_slow_probe_not_doubled(self) -> None:
        """A probe slower than the interval: no second until it ends, then the next at once."""
        self.open()
        self.clock.advance(0.5)
        self.clock.advance(2.0)
        self.assertEqual(self.probes.in_flight(), 1)
        self.assertEqual(len(self.probes.sent), 1)
        self.probes.sent[0].callback(False)
        self.clock.advance(0)
        self.assertEqual(len(self.probes.sent), 2)

    def test_answer_closes_and_stops(self) -> None:
        """A probe answered closes the breaker, logs once, and leaves no timer."""
        self.open()
        self.clock.advance(1.0)
        with capturedLogs() as events:
            self.probes.sent[0].callback(True)
        self.assertEqual(self.breaker.state, "closed")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        [closed] = [e for e in events if e.get("event") == "api_breaker_closed"]
        self.assertEqual(closed["outage"], 1.0)

    def test_other_answer_closes_and_cancels_probe(self) -> None:
        """An answer to a real request while a probe is in flight closes it and cancels the probe."""
        self.open()
        self.clock.advance(0.5)
        self.breaker.record("success")
        self.assertEqual(self.breaker.state, "closed")
        self.assertEqual(self.probes.cancelled, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop(self) -> None:
        """stop() cancels the timer and the probe in flight; the next refusal restarts probing."""
        self.open()
        self.breaker.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(0.5)
        self.assertTrue(self.breaker.refuses())
        self.clock.advance(0)
        self.assertEqual(len(self.probes.sent), 1)
        self.breaker.stop()
        self.assertEqual(self.probes.cancelled, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.breaker.state, "open")

    def test_probe_crash(self) -> None:
        """A probe that raises or fails is logged and the probing goes on."""
        calls: list[int] = []

        def probe() -> "Deferred[bool]":
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("boom")
            return fail(RuntimeError("bang"))

        breaker = CircuitBreaker(1, 0.5, self.clock, probe)
        breaker.record("failure")
        with capturedLogs() as events:
            self.clock.advance(0.5)
            self.clock.advance(0.5)
            self.clock.advance(0.5)
        self.assertEqual(len(calls), 3)
        self.assertEqual(len([e for e in events if e.get("event") == "api_probe_crash"]), 3)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 3)
        breaker.stop()

    def test_cancelled_probe_not_logged(self) -> None:
        """A probe ending in CancelledError from elsewhere is not a crash; probing goes on."""
        self.open()
        self.clock.advance(0.5)
        with capturedLogs() as events:
            self.probes.sent[0].errback(CancelledError())
        self.assertEqual([e for e in events if e.get("event") == "api_probe_crash"], [])
        self.clock.advance(0.5)
        self.assertEqual(len(self.probes.sent), 2)

    def test_interval_must_be_positive(self) -> None:
        """An enabled breaker needs a positive interval (no busy loop); a disabled one does not."""
        self.assertRaises(ValueError, CircuitBreaker, 1, 0.0, self.clock, self.probes)
        CircuitBreaker(0, 0.0, self.clock, self.probes)


class ServiceStopTests(SynchronousTestCase):
    def test_stop_cancels_probing(self) -> None:
        """Stopping the relay leaves no breaker timer behind."""
        cert, key = write_certificate(os.path.abspath(self.mktemp()))
        reactor = MemoryReactorClock()
        service = makeRelayService(
            RelayConfig(metrics_listen="off", tls_cert=cert, tls_key=key, hostname="relay.test"), reactor
        )
        [api] = [child.api for child in service if hasattr(child, "api")]
        self.assertIsInstance(api, HTTPEmailAPI)
        service.startService()
        for _ in range(api.breaker.threshold):
            api.breaker.record("failure")
        self.assertEqual(api.breaker.state, "open")

        def probes() -> list[object]:
            return [c for c in reactor.getDelayedCalls() if "_send_probe" in repr(c.func)]

        self.assertEqual(len(probes()), 1)
        self.successResultOf(service.stopService())
        self.assertEqual(probes(), [])
