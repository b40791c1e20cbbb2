"""
Holding the door, from outside (issue 18): a relay process with its
defaults, 1,000 idle, NOOP-ing and half-handshake connections from 20
loopback addresses (127.0.0.2 to 127.0.0.21, 50 each: every place of
C{--max-connections}), then a legitimate client from a 21st address
(127.0.0.22) relays a message within 15 s.

Real TLS, real sockets, the relay and the sandbox API as their own
processes (C{twistd}); bounded: every socket has a time-out, the siege
ends with the test, and the whole test takes well under a minute.
"""

from __future__ import annotations

import os
import resource
import smtplib
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from twisted.trial.unittest import SynchronousTestCase

from poststack_relay.testing import write_certificate
from tests.common.keys import FULL_KEY
from tests.common.processes import ROOT, TWISTD, free_port, wait_for_port
from tests.common.relay import tagged_message
from tests.common.running import relay_environment, start_program, start_sandbox

ATTACKERS = [f"127.0.0.{n}" for n in range(2, 22)]  # 20 addresses
PER_ADDRESS = 50  # --max-connections-per-ip; 20 x 50 = --max-connections
LEGITIMATE = "127.0.0.22"
NOOP_INTERVAL = 3.0  # under --stress-timeout (10 s): NOOP-ers stay alive
LIMIT = 15.0  # seconds the legitimate client may take, connect to 250


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _sample(metrics: str, name: str) -> float:
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


class Siege:
    """
    The attackers' connections, kept in this process.
    """

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        self.port = port
        self.context = context
        self.noopers: list[ssl.SSLSocket] = []
        self.held: list[socket.socket] = []
        self.failed = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def _connect(self, source: str) -> socket.socket:
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        raw.settimeout(10)
        raw.bind((source, 0))
        raw.connect(("127.0.0.1", self.port))
        return raw

    def open(self, index: int) -> None:
        """
        Connection C{index} of 1,000: 340 NOOP-ing, then 340 idle after the
        handshake, then 320 stalled handshakes (the cheapest last, so the
        siege holds every place for a good 10 s even on a slow machine).
        """
        source = ATTACKERS[index % len(ATTACKERS)]
        kind = 1 if index < 340 else 0 if index < 680 else 2
        try:
            raw = self._connect(source)
            if kind == 2:
                raw.sendall(b"\x16\x03\x01")  # a TLS record's start, then nothing
                kept: socket.socket = raw
            else:
                kept = self.context.wrap_socket(raw, server_hostname="localhost")
                kept.recv(1024)  # the banner
        except OSError:
            with self.lock:
                self.failed += 1
            return
        with self.lock:
            self.held.append(kept)
            if kind == 1:
                self.noopers.append(kept)  # type: ignore[arg-type]  # a wrapped socket

    def noop_loop(self) -> None:
        """NOOP on every NOOP-er every few seconds, until stopped."""
        while not self.stop.wait(NOOP_INTERVAL):
            with self.lock:
                noopers = list(self.noopers)
            for s in noopers:
                try:
                    s.settimeout(0.5)
                    s.sendall(b"NOOP\r\n")
                except OSError:
                    with self.lock:
                        if s in self.noopers:
                            self.noopers.remove(s)

    def close(self) -> None:
        self.stop.set()
        with self.lock:
            held, self.held, self.noopers = self.held, [], []
        for s in held:
            try:
                s.close()
            except OSError:
                pass


def _send(port: int, context: ssl.SSLContext) -> tuple[int, str, float]:
    started = time.monotonic()
    with smtplib.SMTP_SSL(
        "localhost", port, context=context, timeout=LIMIT, source_address=(LEGITIMATE, 0)
    ) as s:
        s.login("poststack", FULL_KEY)
        s.mail("you@yourdomain.com")
        s.rcpt("user@example.com")
        code, text = s.data(tagged_message("door-legitimate"))
        return code, text.decode(), time.monotonic() - started


class SiegeTests(SynchronousTestCase):
    def setUp(self) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = 4096
        if soft < want:
            if hard != resource.RLIM_INFINITY and hard < want:
                self.skipTest(f"needs {want} file descriptors, the hard limit is {hard}")
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))

    def test_legitimate_client_gets_in(self) -> None:
        """
        With every place taken by squatters from 20 addresses, the relay
        says it is saturated on /readyz, sheds the oldest idle
        unauthenticated sessions, and a client from a 21st address
        relays a message within 15 s.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        cert, key = write_certificate(directory)
        api_url = start_sandbox(self, directory)
        port, metrics_port = free_port(), free_port()
        env = relay_environment(dict(os.environ, PYTHONPATH=ROOT), port, cert, key, api_url)
        env["POSTSTACK_RELAY_METRICS_LISTEN"] = f"127.0.0.1:{metrics_port}"
        relay = start_program(self, directory, "relay", [TWISTD, "-n", "--pidfile=", "poststack-relay"], env)
        wait_for_port(port, relay.process)
        wait_for_port(metrics_port, relay.process)
        metrics_url = f"http://127.0.0.1:{metrics_port}"
        context = ssl.create_default_context(cafile=cert)

        siege = Siege(port, context)
        self.addCleanup(siege.close)
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(siege.open, range(len(ATTACKERS) * PER_ADDRESS)))
        filled = time.monotonic() - started
        nooper = threading.Thread(target=siege.noop_loop, daemon=True)
        nooper.start()
        self.addCleanup(nooper.join, 10)

        status, body = _get(metrics_url + "/readyz")
        metrics = _get(metrics_url + "/metrics")[1]
        open_then = _sample(metrics, "poststack_relay_connections_open")

        code, text, took = _send(port, context)
        metrics = _get(metrics_url + "/metrics")[1]
        shed = _sample(metrics, "poststack_relay_sessions_shed_total")
        refused = _sample(metrics, "poststack_relay_connections_refused_total")
        print(
            f"\nsiege: {len(siege.held)} connections held ({siege.failed} failed) in {filled:.1f} s; "
            f"{open_then:.0f} open; /readyz {status}; legitimate 250 after {took:.2f} s; "
            f"{shed:.0f} sessions shed, {refused:.0f} connections refused"
        )
        self.assertEqual((code, text.split(":")[0]), (250, "2.0.0 Ok"))
        self.assertLess(took, LIMIT)
        self.assertEqual(status, 503)
        self.assertIn("relay is saturated", body)
        self.assertIn("under stress: ", relay.output())

        # The siege lifted: the relay is ready again.
        siege.close()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            status, body = _get(metrics_url + "/readyz")
            if status == 200:
                break
            time.sleep(0.2)
        self.assertEqual((status, body), (200, "ready\n"))
        self.assertIn("stress over after", relay.output())
