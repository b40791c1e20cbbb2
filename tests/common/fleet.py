"""
A fleet on loopback, as production runs one (docs/operations.md, "A
fleet"): the sandbox API as its own process (C{twistd -n poststack-sandbox}),
relay processes (C{twistd -n poststack-relay --proxy-protocol yes}, each
with its own metrics port), Debian's HAProxy in TCP mode in front of them
(round-robin, C{send-proxy-v2}, C{GET /readyz} health checks), and
optionally a real C{redis-server} (L{tests.common.redis}) every relay
shares state through. Every process is started and stopped by its own PID;
a relay can be killed with SIGKILL and started again on the same ports.

Also the clients' side: L{Fleet.smtp} (a TLS client through HAProxy or
straight to one relay, from a chosen loopback source address), the
sandbox's stored emails and the number of API-key checks it answered
(read from its access log).

Blocking calls throughout: for L{SynchronousTestCase}s, whose clients run
in threads.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import smtplib
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any, Sequence

from poststack_relay.testing import write_certificate
from tests.common.haproxy import HAPROXY, haproxy_fleet_config, server_states, start_haproxy
from tests.common.keys import SERVICE_KEY
from tests.common.processes import DATA, ROOT, TWISTD, free_port, missing, stop_process, wait_for_port

__all__ = [
    "KEY_CHECK",
    "RECIPIENT",
    "SENDER",
    "Fleet",
    "Outcome",
    "RelayProcess",
    "RetryingClient",
    "fleet_message",
    "guess_keys",
    "haproxy_or_skip",
]

#: A line of the sandbox's access log: the request line and the status.
_ACCESS = re.compile(rb'"([A-Z]+ \S+) HTTP/1\.1" (\d{3}) ')
#: The relay's API-key check, as that request line.
KEY_CHECK = "GET /emails?per_page=1"


def haproxy_or_skip() -> str:
    """
    The path of C{haproxy}; skip without it, except under CI (C{.ci/run}
    installs it), where the test fails instead.
    """
    if HAPROXY is not None:
        return HAPROXY
    raise missing("haproxy is not installed (apt-get install haproxy; .ci/run installs it)")


class RelayProcess:
    """
    One C{twistd -n poststack-relay} of the fleet: its SMTP port, its
    metrics port, its arguments and log file; L{start} again after L{kill}
    reuses both ports.
    """

    def __init__(self, fleet: "Fleet", name: str, args: Sequence[str], proxy_protocol: bool,
                 env: dict[str, str]) -> None:
        self.fleet = fleet
        self.name = name
        self.port = free_port()
        self.metrics_port = free_port()
        self.args = list(args)
        self.proxy_protocol = proxy_protocol
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.log_offset = 0

    def argv(self) -> list[str]:
        fleet = self.fleet
        return [
            TWISTD, "-n", "--pidfile=", "poststack-relay",
            "--port", str(self.port), "--interface", "127.0.0.1",
            "--proxy-protocol", "yes" if self.proxy_protocol else "no",
            "--tls-cert", fleet.cert, "--tls-key", fleet.key, "--hostname", "localhost",
            "--api-url", fleet.api_url, "--metrics-listen", f"127.0.0.1:{self.metrics_port}",
            "--log-format", "json", "--drain-timeout", "2",
            *self.args,
        ]

    def start(self) -> None:
        """Start it and wait (bounded) until its C{/readyz} answers 200."""
        assert self.process is None or self.process.poll() is not None, f"{self.name} runs"
        self.starts += 1
        self.log_offset = len(self.fleet.log(self.name))
        environ = dict(os.environ, PYTHONPATH=ROOT, POSTSTACK_RELAY_SERVICE_KEY=SERVICE_KEY)
        environ.update(self.env)
        log = open(os.path.join(self.fleet.directory, f"{self.name}.log"), "ab")
        try:
            self.process = subprocess.Popen(
                self.argv(), cwd=self.fleet.directory, env=environ, stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        finally:
            log.close()
        self.wait_ready()

    def wait_ready(self, deadline: float = 30.0) -> None:
        """Wait until C{GET /readyz} answers 200; fail at once if the process exits."""
        assert self.process is not None
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited with {self.process.returncode}: {self.fleet.log(self.name)[-3000:]}"
                )
            if self.ready():
                return
            time.sleep(0.05)
        raise AssertionError(f"{self.name} not ready in {deadline} s: {self.fleet.log(self.name)[-3000:]}")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=2) as r:
                return bool(r.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def metrics(self) -> str:
        """The relay's C{/metrics} text."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return str(r.read().decode("utf-8"))

    def metric(self, name: str) -> float | None:
        """
        The value of metric C{name} (a full sample name, labels included:
        C{poststack_relay_fleet_state_up}), or L{None} if absent.
        """
        for line in self.metrics().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        return None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None and self.process.poll() is None else None

    def kill(self) -> None:
        """SIGKILL, by its PID: no drain, no goodbye; its sockets close with the process."""
        assert self.process is not None and self.process.poll() is None, f"{self.name} is not running"
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        """SIGTERM (SIGKILL after 20 s), by its PID."""
        if self.process is not None:
            stop_process(self.process)

    def events(self, name: str, since_start: bool = False) -> list[dict[str, Any]]:
        """
        The JSON log events called C{name} (lines that are not JSON are
        skipped); with C{since_start}, only those of the latest start.
        """
        found = []
        text = self.fleet.log(self.name)
        for line in (text[self.log_offset:] if since_start else text).splitlines():
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict) and value.get("event") == name:
                found.append(value)
        return found


class Fleet:
    """
    The sandbox, relays and HAProxy of one test, in C{directory}; every
    process is stopped at the test's clean-up.

    @ivar front: HAProxy's port (after L{start_balancer}).
    @ivar relays: the L{RelayProcess}es, in the order added.
    """

    def __init__(self, test: Any, directory: str) -> None:
        self.test = test
        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.cert, self.key = write_certificate(self.directory)
        self.relays: list[RelayProcess] = []
        self.front = 0
        self.stats_socket = ""
        self.balanced: dict[str, RelayProcess] = {}
        self.sandbox_port = free_port()
        self.api_url = f"http://127.0.0.1:{self.sandbox_port}"
        log = open(os.path.join(self.directory, "sandbox.log"), "wb")
        try:
            sandbox = subprocess.Popen(
                [TWISTD, "-n", "--pidfile=", "poststack-sandbox", "--port", str(self.sandbox_port),
                 "--interface", "127.0.0.1", "--db", "sandbox.sqlite3", "--data", DATA],
                cwd=self.directory, env=dict(os.environ, PYTHONPATH=ROOT), stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        finally:
            log.close()
        test.addCleanup(stop_process, sandbox)
        wait_for_port(self.sandbox_port, sandbox)

    def log(self, name: str) -> str:
        """The output of process C{name} (C{sandbox}, C{relay1}, ...) so far."""
        try:
            with open(os.path.join(self.directory, f"{name}.log"), "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def add_relay(self, *args: str, proxy_protocol: bool = True, env: dict[str, str] | None = None,
                  start: bool = True) -> RelayProcess:
        """One more relay with further C{args} (started and ready unless C{start} is false)."""
        relay = RelayProcess(self, f"relay{len(self.relays) + 1}", args, proxy_protocol, env or {})
        self.relays.append(relay)
        self.test.addCleanup(relay.stop)
        if start:
            relay.start()
        return relay

    def start_balancer(self, relays: Sequence[RelayProcess] | None = None) -> None:
        """HAProxy round-robin over C{relays} (default: all), waiting until it accepts."""
        haproxy_or_skip()
        chosen = self.relays if relays is None else relays
        self.front = free_port()
        # A UNIX socket path must be short (108 bytes): not in the test's directory.
        sockets = tempfile.mkdtemp(prefix="psr-haproxy-")
        self.test.addCleanup(shutil.rmtree, sockets, True)
        self.stats_socket = os.path.join(sockets, "stats.sock")
        self.balanced = {f"relay{i}": relay for i, relay in enumerate(chosen, 1)}
        process = start_haproxy(
            self.test, self.directory,
            haproxy_fleet_config(self.front, [(r.port, r.metrics_port) for r in chosen],
                                 stats_socket=self.stats_socket),
        )
        wait_for_port(self.front, process, 10.0)
        for relay in chosen:
            self.wait_balanced(relay)

    def wait_balanced(self, relay: RelayProcess, deadline: float = 15.0) -> None:
        """Wait (bounded) until HAProxy's health checks hold C{relay} UP."""
        name = next(n for n, r in self.balanced.items() if r is relay)
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if server_states(self.stats_socket).get(name) == "UP":
                return
            time.sleep(0.05)
        raise AssertionError(f"HAProxy never held {relay.name} UP: {server_states(self.stats_socket)}")

    # -- clients ----------------------------------------------------------

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.cert)

    def smtp(self, port: int | None = None, source: str = "127.0.0.1", timeout: float = 15.0) -> smtplib.SMTP_SSL:
        """A TLS session to C{port} (default: HAProxy's) from loopback address C{source}."""
        return smtplib.SMTP_SSL(
            "localhost", port or self.front, context=self.context(), timeout=timeout,
            source_address=(source, 0),
        )

    # -- the sandbox ------------------------------------------------------

    def sandbox(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """Call the sandbox's HTTP API (e.g. C{/_sandbox/faults}); the decoded JSON answer."""
        request = urllib.request.Request(
            f"{self.api_url}{path}", method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)

    def emails(self) -> list[dict[str, Any]]:
        """Every email the sandbox stored, in order (C{StoredEmail} as JSON)."""
        return list(self.sandbox("GET", "/_sandbox/emails")["data"])

    def answered(self, request: str, status: str | None = None) -> int:
        """
        How many C{request}s (C{"POST /emails"}, L{KEY_CHECK}) the sandbox has
        answered so far, with C{status} (e.g. C{"401"}) or any; read from its
        access log, which it writes when it answers.
        """
        with open(os.path.join(self.directory, "sandbox.log"), "rb") as f:
            found = _ACCESS.findall(f.read())
        return sum(
            1 for line, code in found
            if line.decode() == request and (status is None or code.decode() == status)
        )

    def key_checks(self, status: str | None = None) -> int:
        """How many API-key checks (L{KEY_CHECK}) the sandbox has answered, with C{status} or any."""
        return self.answered(KEY_CHECK, status)


# -- a client that retries as an MTA does ------------------------------------

#: The envelope and headers of the fleet tests' messages.
SENDER = "you@yourdomain.com"
RECIPIENT = "user@example.com"

#: What a dropped connection is, seen from smtplib.
_DROPS = (smtplib.SMTPServerDisconnected, ConnectionError, ssl.SSLError, TimeoutError, OSError)


def fleet_message(tag: str) -> bytes:
    """A small message whose Subject is C{tag} and whose Message-ID is its own."""
    return (
        f"From: {SENDER}\r\nTo: {RECIPIENT}\r\nSubject: {tag}\r\n"
        f"Message-ID: <{tag}@yourdomain.com>\r\n\r\nbody of {tag}\r\n"
    ).encode()


class Outcome:
    """
    How one message went, as its client saw it.

    @ivar seen: each attempt's reply code, or C{"drop"} for a lost connection.
    @ivar final: the last reply code (C{250} when sent), or L{None} if the
        client ran out of attempts or time on drops only.
    @ivar email_id: the id in the final 250 (C{queued as ...}).
    @ivar last_attempt: when the last attempt began (C{time.time()}).
    """

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.seen: list[int | str] = []
        self.final: int | None = None
        self.email_id: str | None = None
        self.last_attempt = 0.0


class RetryingClient:
    """
    One client sending its messages in turn over one TLS session (through
    HAProxy), as an MTA does: a 4xx or a dropped connection closes the
    session and the same bytes are sent again on a new one, after a short
    pause, up to C{attempts} times and never past C{deadline} (monotonic);
    a 250 or a 5xx ends the message. A session ends after C{per_session}
    messages (so that new sessions spread over the balancer's servers).
    """

    def __init__(self, fleet: Fleet, login: tuple[str, str], deadline: float,
                 attempts: int = 12, pause: float = 0.2, timeout: float = 15.0,
                 per_session: int = 5) -> None:
        self.fleet = fleet
        self.login = login
        self.deadline = deadline
        self.attempts = attempts
        self.pause = pause
        self.timeout = timeout
        self.per_session = per_session
        self._session: smtplib.SMTP_SSL | None = None
        self._sent = 0

    def close(self) -> None:
        session, self._session = self._session, None
        self._sent = 0
        if session is not None:
            try:
                session.close()
            except OSError:
                pass

    def quit(self) -> None:
        """End the session politely (QUIT); a failure to do so is a dropped connection, ignored."""
        session = self._session
        if session is not None:
            try:
                session.quit()
            except (smtplib.SMTPException, OSError):
                pass
        self.close()

    def _attempt(self, data: bytes) -> tuple[int, str]:
        if self._session is None:
            session = self.fleet.smtp(timeout=self.timeout)
            self._session = session
            session.login(*self.login)
        session = self._session
        code, text = session.mail(SENDER)
        if code == 250:
            code, text = session.rcpt(RECIPIENT)
        if code == 250:
            code, text = session.data(data)
        return code, text.decode("utf-8", "replace")

    def send(self, tag: str) -> Outcome:
        outcome = Outcome(tag)
        data = fleet_message(tag)
        while len(outcome.seen) < self.attempts and time.monotonic() < self.deadline:
            outcome.last_attempt = time.time()
            try:
                code, text = self._attempt(data)
            except smtplib.SMTPResponseException as e:
                code, text = e.smtp_code, str(e.smtp_error)
            except _DROPS:
                outcome.seen.append("drop")
                outcome.final = None
                self.close()
                time.sleep(self.pause)
                continue
            outcome.seen.append(code)
            outcome.final = code
            if code == 250:
                outcome.email_id = text.rsplit(" ", 1)[-1]
                self._sent += 1
                if self._sent >= self.per_session:
                    self.quit()
                return outcome
            self.close()
            if code >= 500:
                return outcome
            time.sleep(self.pause)
        return outcome


def guess_keys(fleet: Fleet, count: int, port: int | None = None, source: str = "127.0.0.1",
               deadline: float | None = None) -> list[tuple[int | str, float]]:
    """
    C{count} AUTH PLAIN attempts with wrong API keys (each a different one),
    one after another, over sessions to C{port} (default: HAProxy's) from
    C{source}; a session the relay closes is replaced by a new one. Returns
    each attempt's reply code (or C{"drop"} for a session lost mid-attempt)
    and the seconds from the start to its reply. Bounded by C{deadline}
    (monotonic): fewer come back past it.
    """
    codes: list[tuple[int | str, float]] = []
    started = time.monotonic()
    run = os.urandom(4).hex()
    session: smtplib.SMTP_SSL | None = None
    try:
        while len(codes) < count and (deadline is None or time.monotonic() < deadline):
            key = f"sk_test_wrong_{run}_{len(codes):06d}"
            secret = base64.b64encode(f"\0poststack\0{key}".encode()).decode()
            try:
                if session is None:
                    session = fleet.smtp(port, source=source)
                    session.ehlo()
                code, _ = session.docmd("AUTH", "PLAIN " + secret)
            except _DROPS:
                codes.append(("drop", time.monotonic() - started))
                session = None
                continue
            codes.append((code, time.monotonic() - started))
            if code == 421:
                session.close()
                session = None
    finally:
        if session is not None:
            session.close()
    return codes
