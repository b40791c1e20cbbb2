"""
L{poststack_relay.fleet.redis.RedisState} against a real C{redis-server}
on loopback: two relays' states share counts and notes; a state that
starts later loads the notes; Redis paused, stopped and restarted is not
an outage (the states decide alone, count it, log once each way, and
share again once Redis answers).
"""

from __future__ import annotations

import socket
import time
from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from poststack_relay.config import RelayConfig
from poststack_relay.places import parse_redis_url
from poststack_relay.fleet.redis import RedisState
from poststack_relay.fleet.service import FleetStateService, make_fleet_state
from poststack_relay.fleet.wire import FleetKeys, fleet_secret
from poststack_relay.fleet import LocalState
from poststack_relay.metrics import RelayMetrics
from poststack_relay.testing import write_certificate
from tests.common.processes import free_port
from tests.common.redis import RedisServer, SilencingProxy, redis_server_or_skip, start_redis

# Bounds of every wait here.
WAIT = 10.0


def _keys(port: int) -> list[bytes]:
    """Every key name of the relays in the server (KEYS psr:*), over a plain socket."""
    data = b""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(b"KEYS psr:*\r\n")
        s.settimeout(0.3)
        try:
            while chunk := s.recv(65536):
                data += chunk
        except socket.timeout:
            pass
    return [line for line in data.split(b"\r\n") if line.startswith(b"psr:")]


class SharedStateTests(TestCase):
    def setUp(self) -> None:
        self.server = start_redis(self, self.mktemp())
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def state(self, timeout: float = 0.2) -> RedisState:
        metrics = RelayMetrics()
        state = RedisState(
            parse_redis_url(self.server.url), reactor, FleetKeys(fleet_secret(None)), timeout, metrics
        )
        state.start()
        self.addCleanup(state.stop)
        return state

    async def until(self, what: Callable[[], bool], within: float = WAIT) -> None:
        deadline = time.monotonic() + within
        while not what():
            if time.monotonic() > deadline:
                self.fail(f"not within {within}s")
            await deferLater(reactor, 0.02, lambda: None)

    def logged(self, event: str) -> int:
        return sum(1 for e in self.events if e.get("event") == event)

    def fallbacks(self, state: RedisState, operation: str) -> float:
        value = state.metrics.registry.get_sample_value(
            "poststack_relay_fleet_state_fallbacks_total", {"operation": operation}
        )
        return value or 0.0

    async def test_counts_shared(self) -> None:
        """
        A failure counted by one relay is known to the other within
        moments, and both count on from the fleet's count.
        """
        a, b = self.state(), self.state()
        await self.until(lambda: a.up and b.up)
        await deferLater(reactor, 0.1, lambda: None)  # both subscribed
        self.assertEqual(a.add(["ip:192.0.2.1", "user:alice@example.com"], 30), [1, 1])
        await self.until(lambda: b.counts(["ip:192.0.2.1"]) == [1])
        self.assertEqual(b.add(["ip:192.0.2.1"], 30), [2])
        await self.until(lambda: a.counts(["ip:192.0.2.1", "user:alice@example.com"]) == [2, 1])
        # Each relay knows how long the fleet's count lives.
        for state in (a, b):
            left = state.seconds_left(["ip:192.0.2.1", "ip:192.0.2.9"])
            self.assertTrue(25 < left[0] <= 30 and left[1] == 0, left)
        # Key names are digests: no address or mailbox in Redis.
        names = _keys(self.server.port)
        self.assertEqual(len(names), 2)
        for name in names:
            self.assertNotIn(b"192.0.2.1", name)
            self.assertNotIn(b"alice", name)
        self.assertEqual(self.logged("fleet_state_up"), 2)

    async def test_notes_shared_and_loaded(self) -> None:
        """
        A note is known to the other relays, and to one that starts later.
        """
        a, b = self.state(), self.state()
        await self.until(lambda: a.up and b.up)
        await deferLater(reactor, 0.1, lambda: None)
        a.remember("hold:abc", "rate", 5)
        await self.until(lambda: b.recall("hold:abc") is not None)
        value, left = b.recall("hold:abc") or ("", 0.0)
        self.assertEqual(value, "rate")
        self.assertTrue(4 < left <= 5, left)
        c = self.state()
        await self.until(lambda: c.recall("hold:abc") is not None)
        self.assertEqual((c.recall("hold:abc") or ("",))[0], "rate")

    async def test_paused(self) -> None:
        """
        Redis paused: writes are decided locally at once, counted as
        fallbacks, "unavailable" is logged once; resumed: "available" once,
        and sharing works again.
        """
        a, b = self.state(), self.state()
        await self.until(lambda: a.up and b.up)
        await deferLater(reactor, 0.1, lambda: None)
        self.server.pause()
        try:
            started = time.monotonic()
            self.assertEqual(a.add(["ip:198.51.100.7"], 30), [1])
            self.assertLess(time.monotonic() - started, 0.05)
            await self.until(lambda: not a.up)
            for expected in (2, 3, 4):
                self.assertEqual(a.add(["ip:198.51.100.7"], 30), [expected])
            self.assertEqual(a.counts(["ip:198.51.100.7"]), [4])
            self.assertGreaterEqual(self.fallbacks(a, "add"), 4)
            await deferLater(reactor, 1.5, lambda: None)  # a few checks fail
        finally:
            self.server.resume()
        # Once per state that noticed (b checks every few seconds while
        # all is well, so it may not have).
        downs = self.logged("fleet_state_down")
        self.assertIn(downs, (1, 2))
        await self.until(lambda: a.up and b.up)
        self.assertEqual(a.add(["ip:203.0.113.9"], 30), [1])
        await self.until(lambda: b.counts(["ip:203.0.113.9"]) == [1])
        self.assertEqual(self.logged("fleet_state_down"), downs)
        self.assertEqual(self.logged("fleet_state_up"), 2 + downs)

    async def test_restarted(self) -> None:
        """
        Redis stopped and started again: the states reconnect by
        themselves (both connections) and share again.
        """
        # A budget well above a loaded machine's stalls: this test counts
        # outages, and a call that merely took long would add one.
        a, b = self.state(timeout=1.0), self.state(timeout=1.0)
        await self.until(lambda: a.up and b.up)
        self.server.stop()
        a.add(["ip:192.0.2.200"], 30)
        await self.until(lambda: not a.up and not b.up)
        self.assertEqual(a.counts(["ip:192.0.2.200"]), [1])
        self.server.start()
        await self.until(lambda: a.up and b.up)
        # The subscriptions are back too.
        def shared() -> bool:
            a.remember("hold:restart", "rate", 30)
            return b.recall("hold:restart") is not None

        await self.until(shared)
        self.assertEqual(self.logged("fleet_state_up"), 4)
        self.assertEqual(self.logged("fleet_state_down"), 2)


    async def test_counts_never_go_backwards(self) -> None:
        """
        Failures counted while Redis was paused are not undone when the
        fleet's (smaller) count is announced after it answers again.
        """
        a = self.state()
        await self.until(lambda: a.up)
        await deferLater(reactor, 0.1, lambda: None)
        self.server.pause()
        try:
            a.add(["ip:198.51.100.8"], 30)  # sent, answered after the pause
            await self.until(lambda: not a.up)
            for _ in range(3):
                a.add(["ip:198.51.100.8"], 30)
            self.assertEqual(a.counts(["ip:198.51.100.8"]), [4])
        finally:
            self.server.resume()
        await self.until(lambda: a.up)
        await deferLater(reactor, 0.3, lambda: None)  # the late announcement heard
        self.assertEqual(a.counts(["ip:198.51.100.8"]), [4])

    async def test_databases_are_separate_fleets(self) -> None:
        """
        Two fleets on one server in different databases (as the docs
        advise) do not hear each other.
        """
        base = self.server.url.rsplit("/", 1)[0]

        def on(db: int) -> RedisState:
            state = RedisState(
                parse_redis_url(f"{base}/{db}"), reactor, FleetKeys(fleet_secret(None)), 0.2,
                RelayMetrics(),
            )
            state.start()
            self.addCleanup(state.stop)
            return state

        one, two, other_one = on(1), on(2), on(1)
        await self.until(lambda: one.up and two.up and other_one.up)
        await deferLater(reactor, 0.1, lambda: None)
        one.remember("hold:db", "rate", 30)
        one.add(["ip:192.0.2.77"], 30)
        await self.until(lambda: other_one.recall("hold:db") is not None)
        await deferLater(reactor, 0.2, lambda: None)
        self.assertIsNone(two.recall("hold:db"))
        self.assertEqual(two.counts(["ip:192.0.2.77"]), [0])

    async def test_long_outage_bounded(self) -> None:
        """
        Redis not answering (paused), then gone (stopped): the health
        check keeps at most one request waiting, not one more each second
        (a long outage must not grow the relay's memory).  txredisapi's
        queues are read here: nothing else shows them.
        """
        a = self.state()
        await self.until(lambda: a.up)

        def waiting() -> int:
            client = a._client
            return len(client.connectionQueue.peekers) + sum(
                len(conn.replyQueue.waiting) for conn in client.pool
            )

        self.server.pause()
        try:
            a.add(["ip:192.0.2.55"], 30)
            await self.until(lambda: not a.up)
            await deferLater(reactor, 4.5, lambda: None)
            self.assertLessEqual(waiting(), 2)
        finally:
            self.server.resume()
        await self.until(lambda: a.up)
        self.server.stop()
        a.add(["ip:192.0.2.56"], 30)
        await self.until(lambda: not a.up)
        await deferLater(reactor, 4.5, lambda: None)
        self.assertLessEqual(waiting(), 2)

    async def test_silent_subscription(self) -> None:
        """
        Connections whose peer goes silent without closing them (a crashed
        host, a partition) are noticed and made again, the subscription
        too: the relay hears the fleet again.
        """
        proxy = SilencingProxy("127.0.0.1", self.server.port)
        port = reactor.listenTCP(0, proxy, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        a = self.state()
        b = RedisState(
            parse_redis_url(f"redis://127.0.0.1:{port.getHost().port}/0"), reactor,
            FleetKeys(fleet_secret(None)), 0.2, RelayMetrics(),
        )
        b.start()
        self.addCleanup(proxy.close)  # after b stops (clean-ups run last first)
        self.addCleanup(b.stop)
        await self.until(lambda: a.up and b.up)
        await deferLater(reactor, 0.1, lambda: None)
        proxy.silence()
        b.add(["ip:192.0.2.60"], 30)
        await self.until(lambda: not b.up)
        await self.until(lambda: b.up)

        def heard() -> bool:
            a.remember("hold:silent", "rate", 30)
            return b.recall("hold:silent") is not None

        await self.until(heard)

    async def test_demoted_master(self) -> None:
        """
        The server a relay writes to becomes a replica (a Sentinel
        failover behind a proxy that now leads to the new master): its
        writes are refused (READONLY), so the relay drops the connection
        and makes it again, reaching the new master.
        """
        new_master = start_redis(self, self.mktemp())
        proxy = SilencingProxy("127.0.0.1", self.server.port)
        port = reactor.listenTCP(0, proxy, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        a = RedisState(
            parse_redis_url(f"redis://127.0.0.1:{port.getHost().port}/0"), reactor,
            FleetKeys(fleet_secret(None)), 0.2, RelayMetrics(),
        )
        a.start()
        self.addCleanup(proxy.close)
        self.addCleanup(a.stop)
        b = RedisState(
            parse_redis_url(new_master.url), reactor, FleetKeys(fleet_secret(None)), 0.2, RelayMetrics()
        )
        b.start()
        self.addCleanup(b.stop)
        await self.until(lambda: a.up and b.up)
        proxy.port = new_master.port  # new connections reach the new master
        with socket.create_connection(("127.0.0.1", self.server.port), timeout=2) as s:
            s.sendall(f"REPLICAOF 127.0.0.1 {new_master.port}\r\n".encode())
            s.settimeout(2)
            self.assertTrue(s.recv(64).startswith(b"+OK"))
        await deferLater(reactor, 0.2, lambda: None)

        def shared() -> bool:
            a.add(["ip:192.0.2.61"], 30)
            return b.counts(["ip:192.0.2.61"]) != [0]

        await self.until(shared)

    async def test_stop_is_not_an_outage(self) -> None:
        """
        A call still in flight when the relay stops does not log that
        Redis is unavailable.
        """
        a = self.state()
        await self.until(lambda: a.up)
        self.server.pause()
        try:
            a.add(["ip:192.0.2.99"], 30)
            await a.stop()
        finally:
            self.server.resume()
        await deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(self.logged("fleet_state_down"), 0)


class ServiceTests(TestCase):
    def test_local_without_url(self) -> None:
        state, service = make_fleet_state(RelayConfig(tls_cert="c.pem"), reactor, RelayMetrics())
        self.assertIsInstance(state, LocalState)
        self.assertIsNone(service)

    async def test_service_connects_and_closes(self) -> None:
        server = start_redis(self, self.mktemp())
        config = RelayConfig(tls_cert="c.pem", redis_url=server.url, redis_timeout=0.2)
        state, service = make_fleet_state(config, reactor, RelayMetrics())
        assert isinstance(service, FleetStateService) and isinstance(state, RedisState)
        service.startService()
        deadline = time.monotonic() + WAIT
        while not state.up and time.monotonic() < deadline:
            await deferLater(reactor, 0.02, lambda: None)
        self.assertTrue(state.up)
        self.assertEqual(
            state.metrics.registry.get_sample_value("poststack_relay_fleet_state_up"), 1.0
        )
        await service.stopService()
        self.assertFalse(service.running)


class TLSRedisServer(RedisServer):
    """
    The same server with a TLS port too (C{rediss://}), its certificate
    self-signed for C{localhost}.
    """

    def __init__(self, directory: str) -> None:
        super().__init__(directory)
        self.tls_port = free_port()
        self.cert, self.key = write_certificate(self.directory, "localhost")

    def argv(self) -> list[str]:
        return super().argv() + [
            "--tls-port", str(self.tls_port),
            "--tls-cert-file", self.cert,
            "--tls-key-file", self.key,
            "--tls-ca-cert-file", self.cert,
            "--tls-auth-clients", "no",
        ]


class TLSTests(TestCase):
    """
    C{rediss://}: the server's certificate is checked, against
    C{--redis-tls-ca} or the system's CAs.
    """

    def setUp(self) -> None:
        redis_server_or_skip()
        self.server = TLSRedisServer(self.mktemp())
        self.addCleanup(self.server.stop)
        self.server.start()

    def state(self, ca: str | None) -> RedisState:
        config = RelayConfig(
            tls_cert="c.pem",
            redis_url=f"rediss://localhost:{self.server.tls_port}/0",
            redis_tls_ca=ca,
            redis_timeout=0.3,
        )
        state, service = make_fleet_state(config, reactor, RelayMetrics())
        assert isinstance(state, RedisState) and service is not None
        service.startService()
        self.addCleanup(service.stopService)
        return state

    async def test_trusted(self) -> None:
        a, b = self.state(self.server.cert), self.state(self.server.cert)
        deadline = time.monotonic() + WAIT
        while not (a.up and b.up):
            self.assertLess(time.monotonic(), deadline)
            await deferLater(reactor, 0.05, lambda: None)
        await deferLater(reactor, 0.2, lambda: None)
        a.remember("hold:tls", "rate", 10)
        while b.recall("hold:tls") is None:
            self.assertLess(time.monotonic(), deadline)
            await deferLater(reactor, 0.05, lambda: None)

    async def test_untrusted_never_used(self) -> None:
        """
        A certificate the system's CAs do not sign: the relay never talks
        to that server (it stays down, deciding alone), and says so.
        """
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        state = self.state(None)
        await deferLater(reactor, 1.5, lambda: None)
        self.assertFalse(state.up)
        self.assertEqual(state.add(["ip:192.0.2.9"], 30), [1])
        self.assertEqual([e["event"] for e in events if e.get("event", "").startswith("fleet_state_")],
                         ["fleet_state_connecting", "fleet_state_down"])


class PasswordTests(TestCase):
    """
    A password Redis refuses: the relay decides alone (no unhandled error),
    and keeps trying with new connections, so fixing the password on the
    server (or rotating it to the relay's) brings sharing back by itself.
    """

    async def test_refused_then_accepted(self) -> None:
        server = start_redis(self, self.mktemp(), password="old-secret")
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        config = RelayConfig(
            tls_cert="c.pem", redis_url=server.url, redis_password="new-secret", redis_timeout=0.2
        )
        state, service = make_fleet_state(config, reactor, RelayMetrics())
        assert isinstance(state, RedisState) and service is not None
        service.startService()
        self.addCleanup(service.stopService)
        await deferLater(reactor, 2.5, lambda: None)
        self.assertFalse(state.up)
        with socket.create_connection(("127.0.0.1", server.port), timeout=2) as s:
            s.sendall(b"AUTH old-secret\r\nCONFIG SET requirepass new-secret\r\n")
            reply = b""
            while reply.count(b"+OK") < 2:
                chunk = s.recv(100)
                self.assertTrue(chunk, reply)
                reply += chunk
        deadline = time.monotonic() + WAIT
        while not state.up:
            self.assertLess(time.monotonic(), deadline, "not up again")
            await deferLater(reactor, 0.05, lambda: None)
        fleet = [e["event"] for e in events if str(e.get("event", "")).startswith("fleet_state_")]
        self.assertEqual(fleet, ["fleet_state_connecting", "fleet_state_down", "fleet_state_up"])
        for event in events:
            self.assertNotIn("secret", repr(event.get("log_format", "")) + repr(event.get("url", "")))

    async def test_started_while_paused(self) -> None:
        """
        A relay started while Redis takes connections but answers nothing
        (paused): its AUTH times out and txredisapi gives up; the relay
        makes new connections (both: it hears the fleet too) and shares
        once Redis answers.  txredisapi's own "could not auth" lines stay
        out of the log.
        """
        server = start_redis(self, self.mktemp(), password="pw-ok")
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)

        def state() -> RedisState:
            config = RelayConfig(
                tls_cert="c.pem", redis_url=server.url, redis_password="pw-ok", redis_timeout=0.2
            )
            state, service = make_fleet_state(config, reactor, RelayMetrics())
            assert isinstance(state, RedisState) and service is not None
            service.startService()
            self.addCleanup(service.stopService)
            return state

        server.pause()
        try:
            a = state()
            await deferLater(reactor, 3.5, lambda: None)  # AUTH times out (2 s)
            self.assertFalse(a.up)
        finally:
            server.resume()
        b = state()
        deadline = time.monotonic() + WAIT
        while not (a.up and b.up):
            self.assertLess(time.monotonic(), deadline, "not up")
            await deferLater(reactor, 0.05, lambda: None)
        await deferLater(reactor, 0.2, lambda: None)
        for writer, reader, subject in ((a, b, "hold:p1"), (b, a, "hold:p2")):
            writer.remember(subject, "rate", 30)
            while reader.recall(subject) is None:
                self.assertLess(time.monotonic(), deadline, subject)
                await deferLater(reactor, 0.05, lambda: None)
        legacy = [formatEvent(e) for e in events if "could not" in (formatEvent(e) or "")]
        self.assertEqual(legacy, [])
