# -*- test-case-name: tests.test_fleet -*-
"""
The relay as a fleet, tested as a fleet: real processes on loopback, as
production runs them (docs/operations.md, "A fleet").

  - L{RedisServerTests}: the real C{redis-server} the fleet tests share
    state through (L{tests.common.redis}) starts, pauses, resumes and
    restarts on its port.
  - L{SigkillTests}: 20 clients x 50 messages through HAProxy while one
    of three relays is killed with SIGKILL and started again: 0 lost,
    0 doubled.

The fleet (L{tests.common.fleet}): the sandbox API, relay processes with
C{--proxy-protocol yes}, HAProxy round-robin with C{send-proxy-v2} and
C{/readyz} health checks; each test prints its figures (run with C{-s} to
see them).
"""

from __future__ import annotations

import collections
import datetime
import os
import socket
import threading
import time
import uuid

from twisted.trial.unittest import SynchronousTestCase

from tests.common.fleet import Fleet, Outcome, RetryingClient, haproxy_or_skip
from tests.common.keys import FULL_KEY
from tests.common.redis import RedisServer, ping, redis_server_or_skip, start_redis


class RedisServerTests(SynchronousTestCase):
    """The harness's C{redis-server}: a real one, driven by its PID."""

    def test_start_pause_resume_restart(self) -> None:
        """It answers PING once started, not while paused (SIGSTOP), again after SIGCONT, and after a restart on the same port."""
        server = start_redis(self, self.mktemp())
        self.assertTrue(ping(server.port))
        self.assertEqual(server.url, f"redis://127.0.0.1:{server.port}/0")
        first = server.pid
        server.pause()
        started = time.monotonic()
        self.assertFalse(ping(server.port, timeout=0.3))
        self.assertLess(time.monotonic() - started, 5)
        server.resume()
        self.assertTrue(ping(server.port))
        server.stop()
        self.assertIsNone(server.pid)
        self.assertFalse(ping(server.port, timeout=0.3))
        server.start()
        self.assertTrue(ping(server.port))
        self.assertNotEqual(server.pid, first)

    def test_loopback_only_and_no_persistence(self) -> None:
        """It listens on 127.0.0.1 only and writes no RDB/AOF file into its directory."""
        server = start_redis(self, self.mktemp())
        with socket.create_connection(("127.0.0.1", server.port), timeout=2) as s:
            s.sendall(b"SET k v\r\nCONFIG GET save\r\nCONFIG GET appendonly\r\nCONFIG GET bind\r\n")
            data = b""
            deadline = time.monotonic() + 5
            while b"bind" not in data or not data.endswith(b"\r\n") or data.count(b"\r\n") < 13:
                if time.monotonic() > deadline:
                    break
                data += s.recv(4096)
        self.assertIn(b"+OK", data)
        self.assertIn(b"$4\r\nsave\r\n$0\r\n\r\n", data)
        self.assertIn(b"$10\r\nappendonly\r\n$2\r\nno\r\n", data)
        self.assertIn(b"$4\r\nbind\r\n$9\r\n127.0.0.1\r\n", data)
        server.stop()
        self.assertEqual(
            sorted(f for f in os.listdir(server.directory) if f != "redis.log"), []
        )

    def test_paused_server_stops(self) -> None:
        """A paused server is stopped all the same (resumed, then SIGTERM): nothing outlives a test."""
        redis_server_or_skip()
        server = RedisServer(self.mktemp())
        server.start()
        self.addCleanup(server.kill)
        server.pause()
        started = time.monotonic()
        server.stop()
        self.assertLess(time.monotonic() - started, 15)
        self.assertIsNone(server.pid)
        self.assertFalse(ping(server.port, timeout=0.3))


#: Two credentials, so that the idempotency keys (scoped per API key at the API) differ between clients.
LOGINS = [("poststack", FULL_KEY), ("poststack", "sk_test_sending_access")]


class SigkillTests(SynchronousTestCase):
    """
    Three relays behind HAProxy; one is killed with SIGKILL mid-run and
    started again on its port (each client's last ten messages wait for
    that, so the restarted relay is seen serving). Clients retry on a 4xx
    and on a dropped connection, as MTAs do, and start a new session every
    five messages: every message ends as exactly one email with
    the id its client was given, or as an honest failure the client saw
    last and no email; none is stored twice.
    """

    CLIENTS = 20
    MESSAGES = 50
    #: Messages answered before the kill (so it lands mid-run).
    KILL_AFTER = 300
    #: Each client's messages from this one on wait until the killed relay
    #: is back, so that it is seen serving again.
    AFTER_RESTART = 40
    #: Seconds the killed relay stays down.
    DOWN = 1.0
    #: The whole run's bound (the test fails, with its figures, past it).
    BUDGET = 110.0

    def test_sigkill_one_relay_mid_run(self) -> None:
        """20 clients x 50 messages while relay 2 of 3 is SIGKILLed and restarted: 0 lost, 0 doubled, the figures printed."""
        haproxy_or_skip()
        fleet = Fleet(self, self.mktemp())
        for _ in range(3):
            fleet.add_relay()
        fleet.start_balancer()
        victim = fleet.relays[1]
        run = uuid.uuid4().hex[:8]
        deadline = time.monotonic() + self.BUDGET
        outcomes: list[Outcome] = []
        lock = threading.Lock()
        answered = threading.Event()
        restarted = threading.Event()
        errors: list[BaseException] = []

        def client(i: int) -> None:
            sender = RetryingClient(fleet, LOGINS[i % 2], deadline)
            try:
                for j in range(self.MESSAGES):
                    if j == self.AFTER_RESTART:
                        restarted.wait(max(0.0, deadline - time.monotonic()))
                    outcome = sender.send(f"fleet-{run}-c{i:02d}-m{j:02d}")
                    with lock:
                        outcomes.append(outcome)
                        if len(outcomes) >= self.KILL_AFTER:
                            answered.set()
            except BaseException as e:  # reported below, with the figures
                errors.append(e)
            finally:
                sender.close()

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(self.CLIENTS)]
        started = time.monotonic()
        for t in threads:
            t.start()
        killed_at = down_for = 0.0
        if answered.wait(max(0.0, deadline - time.monotonic())):
            killed_pid = victim.pid
            # Every send now waits half a second at the API, so the kill finds
            # messages whose email the API stores after the relay is gone: their
            # clients see a drop, send again and must get the same email back.
            fleet.sandbox("POST", "/_sandbox/faults", {"mode": "slow", "delay": 0.5, "count": -1})
            time.sleep(0.3)
            victim.kill()
            fleet.sandbox("DELETE", "/_sandbox/faults")
            killed_at = time.monotonic() - started
            time.sleep(self.DOWN)
            victim.start()
            down_for = time.monotonic() - started - killed_at
            # HAProxy sends to it again after two good checks.
            fleet.wait_balanced(victim)
            restarted.set()
            self.assertNotEqual(victim.pid, killed_pid)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()) + 20)
        elapsed = time.monotonic() - started
        self.assertEqual(errors, [])
        self.assertFalse(any(t.is_alive() for t in threads), "clients still running past the budget")

        emails = fleet.emails()
        stored: dict[str, list[str]] = collections.defaultdict(list)
        created: dict[str, float] = {}
        for email in emails:
            stored[email["payload"]["subject"]].append(email["id"])
            created[email["payload"]["subject"]] = datetime.datetime.fromisoformat(
                email["created_at"].replace("Z", "+00:00")
            ).timestamp()
        seen = [code for o in outcomes for code in o.seen]
        figures = {
            "messages": len(outcomes),
            "attempts": len(seen),
            "retries": len(seen) - len(outcomes),
            "4xx seen": sum(1 for c in seen if isinstance(c, int) and 400 <= c < 500),
            "5xx seen": sum(1 for c in seen if isinstance(c, int) and c >= 500),
            "drops seen": seen.count("drop"),
            "ended 250": sum(1 for o in outcomes if o.final == 250),
            "ended 4xx/5xx/drop": sum(1 for o in outcomes if o.final != 250),
            "emails stored": len(emails),
            "re-sent after a drop": sum(1 for o in outcomes if "drop" in o.seen),
            # Of those, answered with the email an earlier attempt had stored
            # (the derived idempotency key at work; in the other order, the
            # late first attempt is the one the API answers as a replay).
            "replayed after a drop": sum(
                1 for o in outcomes
                if "drop" in o.seen and o.tag in created and created[o.tag] < o.last_attempt
            ),
            "lost": sum(1 for o in outcomes if o.final == 250 and stored.get(o.tag) != [o.email_id]),
            "doubled": sum(1 for ids in stored.values() if len(ids) > 1),
            "stored without a 250": sum(1 for o in outcomes if o.final != 250 and stored.get(o.tag)),
            "killed at s": round(killed_at, 1),
            "down s": round(down_for, 1),
            "elapsed s": round(elapsed, 1),
            "served by the restarted relay": sum(
                1 for e in victim.events("smtp_transaction", since_start=True) if e.get("outcome") == "relayed"
            ),
        }
        print("\nfleet SIGKILL run:", ", ".join(f"{k} {v}" for k, v in figures.items()))
        self.assertEqual(victim.starts, 2, figures)
        self.assertEqual(figures["messages"], self.CLIENTS * self.MESSAGES, figures)
        self.assertEqual(figures["lost"], 0, figures)
        self.assertEqual(figures["doubled"], 0, figures)
        self.assertEqual(figures["stored without a 250"], 0, figures)
        # Every stored email belongs to one of this run's messages.
        self.assertEqual(set(stored) - {o.tag for o in outcomes}, set(), figures)
        # The kill hit sessions in flight, and the relay served again once back.
        self.assertGreater(figures["drops seen"], 0, figures)
        self.assertGreater(figures["served by the restarted relay"], 0, figures)
        # Honest failures are allowed, but a retrying client gets through.
        self.assertEqual(figures["ended 250"], self.CLIENTS * self.MESSAGES, figures)

