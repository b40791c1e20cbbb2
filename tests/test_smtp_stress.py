"""
Stress-adaptive time-outs and shedding: the pure policy
(L{poststack_relay.smtp.stress.Stress}) on a Clock, then the factory and
its sessions over StringTransports, and C{/readyz}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from poststack_relay.monitoring import relay_readiness
from poststack_relay.smtp import RefusalProtocol
from poststack_relay.smtp.stress import Stress
from tests.common.smtp import AUTH_OK, KEY, TIMEOUT, Connections, plain

SHED = b"421 4.7.0 Server busy, closing idle unauthenticated session, try again later\r\n"
TOO_MANY = b"421 4.7.0 Too many connections, try again later\r\n"
BANNER = b"220 relay.test ESMTP PostStack relay\r\n"


class Session:
    def __init__(self, name: str, idle: bool = True, authenticated: bool = False) -> None:
        self.name = name
        self.idle = idle
        self.authenticated = authenticated

    def __repr__(self) -> str:
        return self.name


def is_idle(s: Session) -> bool:
    return s.idle


def is_authenticated(s: Session) -> bool:
    return s.authenticated


class StressPolicyTests(SynchronousTestCase):
    def test_marks(self) -> None:
        """
        80 % of 1000: on at 800 open, off once back to 700 (a tenth of the
        limit below), with how long each state lasted.
        """
        clock = Clock()
        stress: Stress[Session] = Stress(clock, 1000, 80)
        self.assertEqual((stress.high, stress.low), (800, 700))
        self.assertIsNone(stress.opened(Session("a"), 799))
        clock.advance(5)
        change = stress.opened(Session("b"), 800)
        assert change is not None
        self.assertEqual((change.on, change.sessions), (True, 800))
        self.assertTrue(stress.on)
        self.assertIsNone(stress.opened(Session("c"), 900))
        self.assertIsNone(stress.closed(Session("c"), 701))
        clock.advance(12.5)
        change = stress.closed(Session("b"), 700)
        assert change is not None
        self.assertEqual((change.on, change.sessions, change.lasted), (False, 700, 12.5))
        self.assertFalse(stress.on)
        # No flapping at the mark: on again only at 800.
        self.assertIsNone(stress.opened(Session("d"), 799))

    def test_never(self) -> None:
        """
        A threshold of 0: never under stress, nothing to shed.
        """
        stress: Stress[Session] = Stress(Clock(), 10, 0)
        for n in range(20):
            self.assertIsNone(stress.opened(Session(str(n)), n + 1))
        self.assertFalse(stress.on)
        self.assertIsNone(stress.victim(is_authenticated, is_idle))

    def test_victim(self) -> None:
        """
        The oldest idle unauthenticated session, only under stress;
        logged-in ones are skipped (and forgotten), busy ones skipped.
        """
        stress: Stress[Session] = Stress(Clock(), 10, 50)  # on at 5, off at 4
        a, b, c, d = Session("a", authenticated=True), Session("b", idle=False), Session("c"), Session("d")
        stress.opened(a, 1)
        stress.opened(b, 2)
        stress.opened(c, 3)
        self.assertIsNone(stress.victim(is_authenticated, is_idle))  # no stress yet
        stress.opened(d, 5)
        self.assertIs(stress.victim(is_authenticated, is_idle), c)
        stress.closed(c, 6)
        self.assertIs(stress.victim(is_authenticated, is_idle), d)
        stress.closed(d, 5)
        self.assertIsNone(stress.victim(is_authenticated, is_idle))
        b.idle = True
        self.assertIs(stress.victim(is_authenticated, is_idle), b)


def login(proto: Any) -> bytes:
    proto.transport.clear()
    proto.dataReceived(b"EHLO x\r\nAUTH PLAIN " + plain("poststack", KEY) + b"\r\n")
    value: bytes = proto.transport.value()
    return value


class StressedFactoryTests(SynchronousTestCase):
    def setUp(self) -> None:
        # High-water mark 4 of 5 (the harness's own session is the first);
        # stress ends at 3.
        self.c = Connections(max_connections=5, stress_threshold=80, stress_timeout=10.0)
        self.clock = self.c.harness.clock
        self.metrics = self.c.factory.metrics

    def gauge(self) -> float:
        value = self.metrics.registry.get_sample_value("poststack_relay_stress")
        assert value is not None
        return value

    def test_stress_on_and_off(self) -> None:
        """
        Reaching the mark turns stress on (gauge, log event, /readyz); idle
        sessions then time out after stress_timeout; falling back turns it
        off and restores the idle time-out.
        """
        readiness = relay_readiness(lambda: [], self.c.factory, object(), 40)
        first, t1 = self.c.open("192.0.2.1")
        second, t2 = self.c.open("192.0.2.2")
        self.assertEqual(self.gauge(), 0)
        self.assertEqual(readiness(), [])
        with capturedLogs() as events:
            third, t3 = self.c.open("192.0.2.3")
        self.assertEqual([e["event"] for e in events if e.get("event", "").startswith("stress")], ["stress_on"])
        self.assertEqual(self.gauge(), 1)
        self.assertTrue(self.c.factory.stressed)
        self.assertEqual(readiness(), ["relay is saturated: 4 connections open (stress)"])
        self.clock.advance(10)
        for transport in (t1, t2, t3):
            self.assertIn(TIMEOUT, transport.value())
        for proto in (first, second, third):
            proto.connectionLost(None)
        self.assertEqual(self.gauge(), 0)
        self.assertEqual(readiness(), [])
        # Back to the normal idle time-out for those left (and new ones).
        fourth, t4 = self.c.open("192.0.2.4")
        self.clock.advance(10)
        self.assertNotIn(TIMEOUT, t4.value())

    def test_shed_oldest_idle_unauthenticated(self) -> None:
        """
        With every place taken under stress, a new connection sheds the
        oldest idle session that has not logged in (never a logged-in
        one); with none left to shed, new connections get 421.
        """
        self.assertEqual(login(self.c.harness.proto).splitlines()[-1], AUTH_OK)
        old, t_old = self.c.open("192.0.2.1")
        authed, t_authed = self.c.open("192.0.2.2")
        self.assertEqual(login(authed).splitlines()[-1], AUTH_OK)
        newer, t_newer = self.c.open("192.0.2.3")
        self.clock.advance(1)
        self.c.open("192.0.2.4")  # the fifth: every place taken
        self.assertEqual(len(self.c.factory.sessions), 5)
        with capturedLogs() as events:
            incoming, t_incoming = self.c.open("192.0.2.9")
        self.assertEqual(t_incoming.value(), BANNER)
        self.assertTrue(t_old.value().endswith(SHED))
        self.assertTrue(t_old.disconnecting)
        self.assertFalse(t_newer.disconnecting)
        self.assertEqual([e["event"] for e in events if e.get("event") == "session_shed"], ["session_shed"])
        self.assertEqual(self.metrics.registry.get_sample_value("poststack_relay_sessions_shed_total"), 1)
        self.assertEqual(len(self.c.factory.sessions), 5)
        self.assertNotIn(old, self.c.factory.sessions)
        # Its connection going away later changes nothing more.
        old.connectionLost(None)
        self.assertEqual(len(self.c.factory.sessions), 5)
        # Next: 192.0.2.3, then .4, then the incoming one; the logged-in never.
        self.c.open("192.0.2.10")
        self.assertTrue(t_newer.value().endswith(SHED))
        self.c.open("192.0.2.11")
        self.c.open("192.0.2.12")
        self.c.open("192.0.2.13")
        self.assertTrue(t_incoming.value().endswith(SHED))
        self.assertFalse(t_authed.disconnecting)
        self.assertFalse(self.c.harness.transport.disconnecting)

    def test_busy_sessions_not_shed(self) -> None:
        """
        A session in an AUTH exchange waiting on the API is not idle: it is
        not shed, and without an idle one the newcomer gets 421.
        """
        api = self.c.harness.api
        api.hold_checks = True
        protos = [self.c.open("192.0.2.%d" % n)[0] for n in range(1, 5)]
        for proto in protos + [self.c.harness.proto]:
            proto.dataReceived(b"EHLO x\r\nAUTH PLAIN " + plain("poststack", KEY) + b"\r\n")
        refused, transport = self.c.open("192.0.2.9")
        self.assertIsInstance(refused, RefusalProtocol)
        self.assertEqual(transport.value(), TOO_MANY)
