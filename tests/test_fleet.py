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
  - L{SharedStateTests}: three relays with C{--redis-url} to a real
    C{redis-server}: 1,000 wrong API keys cost no more API checks than
    against one relay alone; a 429 learned by one relay is answered at
    C{MAIL FROM} by the others; Redis paused, stopped and restarted is not
    an outage, and sharing comes back by itself.

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
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.common.fleet import (
    RECIPIENT,
    SENDER,
    Fleet,
    Outcome,
    RelayProcess,
    RetryingClient,
    fleet_message,
    guess_keys,
    haproxy_or_skip,
)
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


#: Relay options of the shared-state tests: small AUTH delays (the test is
#: about counts, not waits), a small Redis budget.
FAST_AUTH = ("--auth-failure-delay", "0.01", "--auth-failure-max-delay", "0.05")
REDIS_TIMEOUT = "0.25"


def first_refusal(codes: list[tuple[int | str, float]]) -> int | None:
    """The index of the first 454 (AUTH refused by the throttle), or None."""
    return next((i for i, (code, _) in enumerate(codes) if code == 454), None)


class SharedStateTests(SynchronousTestCase):
    """
    Three relays sharing state through a real redis-server
    (C{--redis-url}), behind HAProxy or reached one by one.
    """

    def fleet(self, *args: str, balancer: bool = True, proxy_protocol: bool = True,
              redis: bool = True) -> tuple[Fleet, Any]:
        """The sandbox, a redis-server, three relays with C{--redis-url} and C{args}, HAProxy."""
        haproxy_or_skip()
        directory = os.path.abspath(self.mktemp())
        server = start_redis(self, os.path.join(directory, "redis")) if redis else None
        fleet = Fleet(self, directory)
        shared = ("--redis-url", server.url, "--redis-timeout", REDIS_TIMEOUT) if server else ()
        for _ in range(3):
            fleet.add_relay(*shared, *args, proxy_protocol=proxy_protocol)
        if balancer:
            fleet.start_balancer()
        return fleet, server

    def wrong_keys(self, fleet: Fleet, port: int | None, source: str) -> dict[str, Any]:
        """1,000 wrong API keys from C{source} to C{port} (default: HAProxy); their figures."""
        before = fleet.key_checks("401")
        codes = guess_keys(fleet, 1000, port, source, deadline=time.monotonic() + 60)
        first = first_refusal(codes)
        self.assertEqual(len(codes), 1000, codes[-5:])
        self.assertIsNotNone(first, codes[-5:])
        assert first is not None
        return {
            "API key checks": fleet.key_checks("401") - before,
            "attempts before the first 454": first,
            "seconds to the first 454": round(codes[first][1], 2),
            "535 after the first 454": sum(1 for code, _ in codes[first:] if code == 535),
            "replies": dict(collections.Counter(str(code) for code, _ in codes)),
            "seconds for 1,000": round(codes[-1][1], 2),
        }

    def test_wrong_keys_spread_over_three_relays(self) -> None:
        """1,000 wrong API keys from one address, round-robin over three relays sharing state, cost no more API checks than against one relay alone and reach 454 as fast; after the first 454 no relay tests a key for that address. (Three relays that do not share, the control, cost more.)"""
        fleet, _ = self.fleet(*FAST_AUTH)
        lone = fleet.add_relay(*FAST_AUTH, proxy_protocol=False)
        figures: dict[str, Any] = {
            "one relay": self.wrong_keys(fleet, lone.port, "127.0.0.3"),
            "three relays": self.wrong_keys(fleet, None, "127.0.0.2"),
        }
        figures["three relays"]["454s per relay"] = [
            len([e for e in relay.events("auth_throttled") if e.get("client") == "127.0.0.2"])
            for relay in fleet.relays[:3]
        ]
        # The control: the same three relays' set-up without --redis-url.
        alone, _ = self.fleet(*FAST_AUTH, redis=False)
        figures["three relays without Redis"] = self.wrong_keys(alone, None, "127.0.0.2")
        print("\n1,000 wrong keys:", figures)
        one, three = figures["one relay"], figures["three relays"]
        self.assertLessEqual(three["API key checks"], one["API key checks"], figures)
        self.assertLessEqual(three["attempts before the first 454"], one["attempts before the first 454"], figures)
        self.assertEqual(three["535 after the first 454"], 0, figures)
        # The attempts really were spread: every relay refused some, and
        # relays that do not share let more keys be tested.
        self.assertTrue(all(n > 0 for n in three["454s per relay"]), figures)
        self.assertGreater(figures["three relays without Redis"]["API key checks"], one["API key checks"], figures)

    def test_rate_limit_learned_by_one_refuses_on_all(self) -> None:
        """A 429 rate_limit_exceeded with Retry-After: 5 answered to relay 1 makes relays 2 and 3 refuse that credential at MAIL FROM with 451 4.7.0 ... retry-after, before DATA; another credential still sends; after the 5 s it sends again."""
        # A deadline shorter than the Retry-After: relay 1 does not wait to try
        # again, it answers the 429 (451 4.7.0) at once.
        fleet, _ = self.fleet("--api-deadline", "2", balancer=False, proxy_protocol=False)
        first, second, third = fleet.relays
        fleet.sandbox("POST", "/_sandbox/faults", {"mode": "429", "retry_after": "5", "count": 1})
        with fleet.smtp(first.port) as s:
            s.login("poststack", FULL_KEY)
            self.assertEqual(s.mail(SENDER)[0], 250)
            self.assertEqual(s.rcpt(RECIPIENT)[0], 250)
            code, text = s.data(fleet_message("limited"))
        learned = time.monotonic()
        self.assertEqual((code, text.decode()), (451, "4.7.0 PostStack rate limit reached, retry-after=5s"))

        def mail_from(relay: RelayProcess, key: str) -> tuple[int, str]:
            with fleet.smtp(relay.port) as s:
                s.login("poststack", key)
                code, text = s.mail(SENDER)
                return code, text.decode()

        seen: dict[str, Any] = {}
        for relay in (second, third):
            # Shared state may take a moment to reach the other relays: ask
            # again for at most one second.
            deadline = time.monotonic() + 1.0
            while True:
                code, text = mail_from(relay, FULL_KEY)
                if code != 250 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            seen[relay.name] = (code, text, round(time.monotonic() - learned, 2))
            self.assertEqual(code, 451, seen)
            self.assertRegex(text, r"^4\.7\.0 PostStack rate limit reached, retry-after=[1-5]s$")
        # Another credential is not held.
        self.assertEqual(mail_from(second, "sk_test_sending_access")[0], 250)
        print("\nrate limit held:", seen)
        # After the Retry-After, the credential sends again (bounded wait).
        deadline = learned + 12
        while time.monotonic() < deadline and mail_from(third, FULL_KEY)[0] != 250:
            time.sleep(0.25)
        with fleet.smtp(third.port) as s:
            s.login("poststack", FULL_KEY)
            s.mail(SENDER)
            s.rcpt(RECIPIENT)
            code, _ = s.data(fleet_message("after the hold"))
        self.assertEqual(code, 250)
        self.assertGreaterEqual(time.monotonic() - learned, 3.5)
        self.assertEqual([e["payload"]["subject"] for e in fleet.emails()], ["after the hold"])

    def sessions(self, fleet: Fleet, count: int, tag: str) -> list[float]:
        """C{count} sessions through HAProxy (login, one message, 250 each); the seconds each took."""
        took = []
        for i in range(count):
            started = time.monotonic()
            with fleet.smtp() as s:
                s.login("poststack", FULL_KEY)
                self.assertEqual(s.mail(SENDER)[0], 250)
                self.assertEqual(s.rcpt(RECIPIENT)[0], 250)
                code, text = s.data(fleet_message(f"{tag}-{i}"))
                self.assertEqual(code, 250, text)
            took.append(time.monotonic() - started)
        return took

    def shared_until(self, fleet: Fleet, limit: float) -> tuple[int, float]:
        """
        Wait (at most C{limit} s) until the relays share AUTH failures again:
        from a fresh loopback address, 25 wrong keys through HAProxy reach
        454 and no key is tested after it (three relays counting alone
        would need 30 failures). The tries it took and the seconds.
        """
        started = time.monotonic()
        for n in range(1, 1000):
            codes = guess_keys(fleet, 25, source=f"127.0.{n}.9", deadline=time.monotonic() + 20)
            first = first_refusal(codes)
            if first is not None and all(code != 535 for code, _ in codes[first:]):
                return n, time.monotonic() - started
            if time.monotonic() - started > limit:
                self.fail(f"relays not sharing AUTH failures {limit} s on: {[c for c, _ in codes]}")
        raise AssertionError("unreachable")

    def wait_shared_state(self, fleet: Fleet, up: bool, limit: float) -> float:
        """
        Wait (at most C{limit} s) until every relay's
        C{poststack_relay_fleet_state_up} is C{up}; the seconds it took.
        """
        started = time.monotonic()
        want = 1.0 if up else 0.0
        while True:
            seen = [relay.metric("poststack_relay_fleet_state_up") for relay in fleet.relays]
            if all(value == want for value in seen):
                return time.monotonic() - started
            if time.monotonic() - started > limit:
                self.fail(f"fleet_state_up not {want} on every relay after {limit} s: {seen}")
            time.sleep(0.1)

    def test_redis_paused_mail_flows(self) -> None:
        """With redis-server paused (SIGSTOP), logins, wrong keys and messages get their replies within their usual time and /readyz stays ready, before and after the relays notice; after SIGCONT they share again."""
        fleet, server = self.fleet(*FAST_AUTH)
        usual = max(self.sessions(fleet, 6, "before"))
        self.shared_until(fleet, 10)
        self.wait_shared_state(fleet, True, 5)
        server.pause()
        try:
            # At once: the relays still think Redis answers; a failed login's
            # write waits for it in the background.
            wrong = guess_keys(fleet, 6, source="127.0.0.4", deadline=time.monotonic() + 30)
            paused = self.sessions(fleet, 3, "paused")
            # Every relay notices (a write past its budget, or its periodic check).
            noticed = self.wait_shared_state(fleet, False, 10)
            wrong += guess_keys(fleet, 6, source="127.0.0.5", deadline=time.monotonic() + 30)
            paused += self.sessions(fleet, 3, "paused, noticed")
            ready = [relay.ready() for relay in fleet.relays]
        finally:
            server.resume()
        back = self.wait_shared_state(fleet, True, 10)
        tries, seconds = self.shared_until(fleet, 15)
        fallbacks = [
            relay.metric('poststack_relay_fleet_state_fallbacks_total{operation="add"}') for relay in fleet.relays
        ]
        figures = {
            "usual session s": round(usual, 3),
            "sessions while paused s": [round(t, 3) for t in paused],
            "wrong keys while paused": [(c, round(t, 2)) for c, t in wrong],
            "all relays noticed after s": round(noticed, 2),
            "all relays back after s": round(back, 2),
            "sharing again after s": round(seconds, 2),
            "tries": tries,
            "fallbacks (add) per relay": fallbacks,
        }
        print("\nredis paused:", figures)
        self.assertEqual(ready, [True, True, True], figures)
        self.assertEqual(len(fleet.emails()), 12, figures)
        # Each reply within the usual time: no reply waits for Redis (a
        # second of slack for a loaded machine, far below what a wait for a
        # server that cannot answer would take).
        bound = usual + 1.0
        self.assertLess(max(paused), bound, figures)
        self.assertEqual([c for c, _ in wrong if c not in (535, 421)], [], figures)
        gaps = [b - a for (_, a), (_, b) in zip([(0, 0.0), *wrong[:6]], wrong[:6])]
        gaps += [b - a for (_, a), (_, b) in zip([(0, 0.0), *wrong[6:]], wrong[6:])]
        self.assertLess(max(gaps), bound, figures)
        # The writes Redis could not take were counted as fallbacks.
        self.assertGreater(sum(f or 0 for f in fallbacks), 0, figures)

    def test_redis_restarted_relays_reconnect(self) -> None:
        """redis-server stopped: mail still flows, /readyz stays ready and every relay notices; started again on its port: the relays reconnect by themselves and share again."""
        fleet, server = self.fleet(*FAST_AUTH)
        self.shared_until(fleet, 10)
        self.wait_shared_state(fleet, True, 5)
        server.stop()
        down = self.sessions(fleet, 3, "redis down")
        wrong = guess_keys(fleet, 6, source="127.0.0.4", deadline=time.monotonic() + 30)
        noticed = self.wait_shared_state(fleet, False, 10)
        # Down for a while: the clients' reconnection attempts fail too.
        time.sleep(2.5)
        down += self.sessions(fleet, 3, "redis still down")
        ready = [relay.ready() for relay in fleet.relays]
        server.start()
        back = self.wait_shared_state(fleet, True, 15)
        tries, seconds = self.shared_until(fleet, 15)
        figures = {
            "sessions while down s": [round(t, 3) for t in down],
            "wrong keys while down": [c for c, _ in wrong],
            "all relays noticed after s": round(noticed, 2),
            "all relays back after s": round(back, 2),
            "sharing again after s": round(seconds, 2),
            "tries": tries,
        }
        print("\nredis restarted:", figures)
        self.assertEqual(ready, [True, True, True], figures)
        self.assertEqual([c for c, _ in wrong if c not in (535, 421)], [], figures)
        self.assertEqual(len(fleet.emails()), 6, figures)
