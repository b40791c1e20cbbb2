"""
How many guesses of one mailbox's password the relay allows per hour.

    PYTHONPATH=. .venv/bin/python bench/auth_guessing.py [--addresses 4] [--seconds 30]

Starts the sandbox API and a relay in this process (loopback only, real
implicit TLS), then lets N attackers, each from its own loopback address
(127.0.0.x), guess the password of alice@yourdomain.com with smtplib's
login() (PLAIN, then LOGIN), as fast as the relay lets them: a new wrong
password at every AUTH PLAIN (one per connection); on `454 ... try again
in N s` it waits N - 1 seconds and then asks again every 50 ms (refusals
cost it nothing: the best an attacker can do), on 535 it goes on at once.  At the
end a client from an address that never failed logs in with the right
password (it must get 235).

Time is scaled so the run stays short: the failure window, the delays and
the run's length are all multiplied by SCALE (window 300 s -> 300*SCALE s),
so the relay's rules behave as at full scale, only faster; guesses per
hour are reported at full scale (guesses / (seconds / SCALE) * 3600).
Bounded: --seconds of wall time (at most 120), at most 5,000 logins.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import smtplib
import ssl
import sys
import tempfile
import threading
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from twisted.internet import defer, task  # noqa: E402
from twisted.internet.threads import deferToThread  # noqa: E402

from poststack_relay import RelayConfig, makeRelayService  # noqa: E402
from poststack_relay.config import (  # noqa: E402
    DEFAULT_AUTH_FAILURE_DELAY,
    DEFAULT_AUTH_FAILURE_MAX_DELAY,
    DEFAULT_AUTH_FAILURE_WINDOW,
    DEFAULT_AUTH_FAILURES_PER_IP,
    DEFAULT_AUTH_FAILURES_PER_USER,
)
from poststack_relay.sandbox import makeSandboxService  # noqa: E402
from poststack_relay.testing import write_certificate  # noqa: E402

MAILBOX, PASSWORD = "alice@yourdomain.com", "alice-password"
SERVICE_KEY = "sk_test_relay_service"
DATA = os.path.join(ROOT, "etc", "sandbox.json")
MOST_LOGINS = 5000
_WAIT = re.compile(rb"try again in (\d+) s")


def attacker(port: int, cafile: str, source: str, until: float, logins: list[int], out: dict[str, Any]) -> None:
    """One attacker: a new connection and one AUTH PLAIN per guess, until C{until}."""
    context = ssl.create_default_context(cafile=cafile)
    guesses = refused = 0
    times: list[float] = []
    n = 0
    while time.monotonic() < until and logins[0] < MOST_LOGINS:
        logins[0] += 1
        n += 1
        secret = base64.b64encode(f"\0{MAILBOX}\0guess-{source}-{n}".encode()).decode()
        with smtplib.SMTP_SSL("localhost", port, context=context, timeout=30, source_address=(source, 0)) as s:
            s.ehlo()
            code, text = s.docmd("AUTH", "PLAIN " + secret)
        if code == 535:
            guesses += 1
            times.append(time.monotonic())
        elif code == 454 and _WAIT.search(text):
            refused += 1
            # N is rounded up to whole seconds, much of a scaled window:
            # wait N - 1 s, then ask again every 50 ms (refusals are free).
            wait = float(_WAIT.search(text).group(1)) - 1.0  # type: ignore[union-attr]  # matched just above
            time.sleep(min(max(wait, 0.05), max(0.0, until - time.monotonic())))
        else:
            raise AssertionError((code, text))
    out[source] = {"guesses": guesses, "refused": refused, "times": times}


async def run(reactor: Any, addresses: int, seconds: float, scale: float) -> None:
    directory = tempfile.mkdtemp(prefix="auth-guessing-")
    cafile, keyfile = write_certificate(directory)
    sandbox = makeSandboxService(0, "127.0.0.1", os.path.join(directory, "sandbox.sqlite3"), DATA, reactor)
    sandbox.startService()
    sandbox_port = await sandbox.when_listening()
    config = RelayConfig(
        tls_cert=cafile, tls_key=keyfile, port=0, interface="127.0.0.1",
        api_url=f"http://127.0.0.1:{sandbox_port.getHost().port}", service_key=SERVICE_KEY,
        hostname="localhost", metrics_listen="off",
        auth_failure_window=DEFAULT_AUTH_FAILURE_WINDOW * scale,
        auth_failure_delay=DEFAULT_AUTH_FAILURE_DELAY * scale,
        auth_failure_max_delay=DEFAULT_AUTH_FAILURE_MAX_DELAY * scale,
        # The negative cache must not answer a guess (each is new anyway).
        auth_negative_ttl=10.0 * scale,
    )
    relay = makeRelayService(config, reactor)
    relay.startService()
    port = (await relay.port()).getHost().port
    throttle = relay.factory.throttle
    try:
        logins = [0]
        results: dict[str, Any] = {}
        started = time.monotonic()
        until = started + seconds
        await defer.gatherResults([
            deferToThread(attacker, port, cafile, f"127.0.0.{10 + i}", until, logins, results)
            for i in range(addresses)
        ])
        elapsed = time.monotonic() - started
        counted = throttle.failures(user=MAILBOX)
        t0 = time.monotonic()

        def legit() -> int:
            context = ssl.create_default_context(cafile=cafile)
            with smtplib.SMTP_SSL("localhost", port, context=context, timeout=30,
                                  source_address=("127.0.0.200", 0)) as s:
                return s.login(MAILBOX, PASSWORD)[0]

        code = await deferToThread(legit)
        legit_seconds = time.monotonic() - t0
    finally:
        await relay.stopService()
        await sandbox.stopService()
    full_seconds = elapsed / scale
    guesses = sum(r["guesses"] for r in results.values())
    per_hour = guesses / full_seconds * 3600
    # The second half of the run: the mailbox is under attack by then.
    half = started + elapsed / 2
    late = sum(1 for r in results.values() for t in r["times"] if t >= half)
    late_per_hour = late / (full_seconds / 2) * 3600
    print(f"scale {scale:g}: window {config.auth_failure_window:g} s, delays "
          f"{config.auth_failure_delay:g}..{config.auth_failure_max_delay:g} s; per address "
          f"{DEFAULT_AUTH_FAILURES_PER_IP}, per mailbox from an address {DEFAULT_AUTH_FAILURES_PER_USER}")
    print(f"{addresses} attacking addresses, {elapsed:.1f} s wall = {full_seconds:.0f} s at full scale, "
          f"{logins[0]} logins")
    for source, r in sorted(results.items()):
        print(f"  {source}: {r['guesses']} guesses checked, {r['refused']} refused (454)")
    print(f"guesses checked: {guesses} (the relay's count for the mailbox: {counted})")
    print(f"full-scale guesses per hour over the whole run: {per_hour:.0f} in all, "
          f"{per_hour / addresses:.1f} per address")
    print(f"full-scale guesses per hour in the run's second half (mailbox under attack): "
          f"{late_per_hour:.0f} in all, {late_per_hour / addresses:.1f} per address "
          f"(bound: one per {DEFAULT_AUTH_FAILURE_WINDOW:g} s window = "
          f"{3600 / DEFAULT_AUTH_FAILURE_WINDOW:.0f} per address)")
    print(f"right password from a clean address: {code} in {legit_seconds * 1000:.0f} ms")
    if code != 235:
        raise SystemExit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--addresses", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--scale", type=float, default=0.02)
    args = parser.parse_args()
    if not 1 <= args.addresses <= 50 or not 1 <= args.seconds <= 120 or not 0 < args.scale <= 1:
        parser.error("--addresses 1..50, --seconds 1..120, --scale in (0, 1]")
    threading.stack_size(512 * 1024)
    task.react(lambda reactor: defer.ensureDeferred(run(reactor, args.addresses, args.seconds, args.scale)))


if __name__ == "__main__":
    main()
