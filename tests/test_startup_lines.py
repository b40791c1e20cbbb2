"""
What the relay says at start, seen from outside (real processes on
loopback): a port already taken is one line naming the listener, the
address and the option to change, with exit status 1 and no traceback,
under C{twistd poststack-relay}, the C{poststack-relay} command, C{twist},
C{--workers 2} and C{make run} (whose C{METRICS_LISTEN} reaches the relay); C{relay_listening} comes only once every listener is bound; and
the JSON log of a relay that started, relayed a message, refused a bad
login and a plaintext client, and stopped, holds values in its fields,
never pieces of a sentence.
"""

from __future__ import annotations

import json
import os
import signal
import smtplib
import socket
import ssl
import subprocess
import time
from typing import Any, Callable

from twisted.trial.unittest import SynchronousTestCase

from poststack_relay.testing import write_certificate
from tests.common.processes import ROOT, TWISTD, find_tool, free_port, missing, wait_for_port
from tests.common.running import COMMAND_LINE, start_program, start_sandbox

#: Every wait on a process is bounded by this many seconds.
TIMEOUT = 60
TWIST = os.path.join(os.path.dirname(TWISTD), "twist")


def held_port() -> tuple[socket.socket, int]:
    """A loopback port some other program listens on (this test, until the socket is closed)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return sock, sock.getsockname()[1]


class ListenFailureTests(SynchronousTestCase):
    """A listener that cannot bind: one line, exit status 1."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        self.cert, self.key = write_certificate(self.dir)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("POSTSTACK_RELAY_")}
        self.env["PYTHONPATH"] = ROOT

    def hold(self) -> int:
        sock, port = held_port()
        self.addCleanup(sock.close)
        return port

    def run_relay(self, command: list[str], *args: str) -> tuple[int, list[str], str]:
        """Run the relay until it exits (bounded): its status, its output lines (stdout), its stderr."""
        result = subprocess.run(
            [*command, "--interface", "127.0.0.1", "--tls-cert", self.cert, "--tls-key", self.key,
             "--tls-reload-interval", "0", *args],
            cwd=self.dir, env=self.env, capture_output=True, text=True, timeout=TIMEOUT, check=False,
        )
        return result.returncode, result.stdout.splitlines(), result.stderr

    def assert_one_line(self, lines: list[str], stderr: str, expected: str) -> None:
        """Exactly one line says it (ending the output), nothing says listening, no traceback."""
        everything = "\n".join(lines) + stderr
        self.assertEqual([line for line in lines if "cannot listen" in line], [lines[-1]], everything)
        self.assertTrue(lines[-1].endswith(expected), everything)
        self.assertNotIn("Traceback", everything)
        self.assertNotIn("CannotListenError", everything)
        self.assertNotIn("listening on", everything)
        self.assertEqual(stderr, "")

    def test_metrics_port_taken_twistd(self) -> None:
        """twistd -n poststack-relay with the metrics port taken: the listen_failed line, status 1."""
        metrics = self.hold()
        status, lines, stderr = self.run_relay(
            [TWISTD, "-n", "--pidfile=", "poststack-relay"], "--port", str(free_port()),
            "--metrics-listen", f"127.0.0.1:{metrics}",
        )
        self.assertEqual(status, 1, lines)
        self.assert_one_line(
            lines, stderr,
            f"[poststack_relay.listening#critical] cannot listen on 127.0.0.1:{metrics} (metrics listener): "
            "Address already in use; change --metrics-listen (HOST:PORT, or off)",
        )

    def test_smtp_port_taken_command_json(self) -> None:
        """poststack-relay --log-format json with the SMTP port taken: one JSON line with the fields, status 1."""
        port = self.hold()
        status, lines, stderr = self.run_relay(
            [*COMMAND_LINE], "--port", str(port), "--metrics-listen", "127.0.0.1:0", "--log-format", "json",
        )
        self.assertEqual(status, 1, lines)
        self.assert_one_line(lines, stderr, '"option": "--port or --interface"}')
        event = json.loads(lines[-1])
        self.assertEqual(
            {k: event[k] for k in ("event", "level", "address", "listener", "reason", "option")},
            {"event": "listen_failed", "level": "critical", "address": f"127.0.0.1:{port}",
             "listener": "SMTP listener", "reason": "Address already in use", "option": "--port or --interface"},
        )
        self.assertNotIn("relay_listening", "\n".join(lines))

    def test_extra_listener_taken(self) -> None:
        """A --listen spec's port taken (after the main port bound): the line names the spec and --listen."""
        taken = self.hold()
        status, lines, stderr = self.run_relay(
            [*COMMAND_LINE], "--port", str(free_port()), "--listen", f"127.0.0.1:{taken}",
            "--metrics-listen", "off",
        )
        self.assertEqual(status, 1, lines)
        self.assert_one_line(
            lines, stderr,
            f"cannot listen on 127.0.0.1:{taken} (SMTP listener --listen '127.0.0.1:{taken}'): "
            "Address already in use; change that --listen spec",
        )

    def test_twist_stderr(self) -> None:
        """Under twist (which starts the relay before its log): the same line on stderr, status 1."""
        port = self.hold()
        result = subprocess.run(
            [TWIST, "poststack-relay", "--interface", "127.0.0.1", "--tls-cert", self.cert, "--tls-key", self.key,
             "--port", str(port), "--metrics-listen", "off"],
            cwd=self.dir, env=self.env, capture_output=True, text=True, timeout=TIMEOUT, check=False,
        )
        self.assertEqual(result.returncode, 1, result)
        self.assertEqual(
            result.stderr,
            f"poststack-relay: error: cannot listen on 127.0.0.1:{port} (SMTP listener): "
            "Address already in use; change --port or --interface\n",
        )

    def test_workers_smtp_port_taken(self) -> None:
        """--workers 2 with the SMTP port taken: the supervisor's one line, status 1, no worker started."""
        port = self.hold()
        status, lines, stderr = self.run_relay(
            [*COMMAND_LINE], "--workers", "2", "--port", str(port), "--metrics-listen", "off",
        )
        self.assertEqual(status, 1, lines)
        self.assert_one_line(
            lines, stderr,
            f"cannot listen on 127.0.0.1:{port} (SMTP listener): Address already in use; change --port or --interface",
        )
        self.assertNotIn("worker 0 started", "\n".join(lines))


class MakeRunTests(SynchronousTestCase):
    """C{make run} beside another program holding the metrics port: its METRICS_LISTEN, and the one line."""

    def make_run(self, metrics_listen: str, sandbox_port: int) -> subprocess.CompletedProcess[str]:
        """C{make run} with its own ports and files (RUN in a temporary directory), bounded in time."""
        make = find_tool("make")
        if make is None or not os.path.exists(os.path.join(ROOT, ".venv", "bin", "twistd")):
            raise missing("make run needs make and the tree's .venv (make venv)")
        run = os.path.abspath(self.mktemp())
        env = {k: v for k, v in os.environ.items() if not k.startswith("POSTSTACK_RELAY_")}
        # -o: never reinstall the venv from a test; RUN: the certificate, pid, log and database here.
        return subprocess.run(
            [make, "-s", "-C", ROOT, "-o", ".venv/.installed", "run", f"RUN={run}",
             f"RELAY_PORT={free_port()}", f"SANDBOX_PORT={sandbox_port}", f"METRICS_LISTEN={metrics_listen}"],
            env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False,
        )

    def test_metrics_port_taken(self) -> None:
        """METRICS_LISTEN reaches the relay; a taken one: one line naming --metrics-listen, make fails, the sandbox is stopped."""
        sock, metrics = held_port()
        self.addCleanup(sock.close)
        sandbox_port = free_port()
        result = self.make_run(f"127.0.0.1:{metrics}", sandbox_port)
        self.assertNotEqual(result.returncode, 0, result)
        output = result.stdout + result.stderr
        self.assertIn(f"Sandbox API: http://127.0.0.1:{sandbox_port}", output)
        self.assertIn(f"metrics on 127.0.0.1:{metrics}", output)  # make run's own banner
        self.assertEqual(
            [line.split("] ", 1)[-1] for line in output.splitlines() if "cannot listen" in line],
            [f"cannot listen on 127.0.0.1:{metrics} (metrics listener): Address already in use; "
             "change --metrics-listen (HOST:PORT, or off)"],
        )
        self.assertNotIn("Traceback", output)
        self.assertNotIn("poststack-relay listening on", output)
        # make run's trap stops the sandbox it started when the relay ends.
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", sandbox_port), timeout=1).close()
            except OSError:
                break
            self.assertLess(time.monotonic(), deadline, "the sandbox still listens")
            time.sleep(0.2)


# JSON keys every line has; the others are the event's own fields.
_ENVELOPE = {"time", "level", "namespace", "event", "message", "worker"}


def fragments(event: dict[str, Any]) -> dict[str, Any]:
    """
    The fields of one JSON log event that look like a piece of its text
    rather than a value: an empty string, a string with white space at
    either end, or one starting with punctuation (C{" behind PROXY
    protocol"}, C{"; for *:465"}, C{" and when the files change ..."}).
    """
    found = {}
    for key, value in event.items():
        if key in _ENVELOPE or not isinstance(value, str):
            continue
        if value == "" or value != value.strip() or value[0] in ";,.:)":
            found[key] = value
    return found


class JSONLogTests(SynchronousTestCase):
    """The JSON log of a relay that ran: values in fields, whole texts, relay_listening after the binds."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        self.cert, self.key = write_certificate(self.dir)

    def test_fragment_detector(self) -> None:
        """The detector finds the fragments this relay used to log, and leaves values alone."""
        self.assertEqual(
            fragments({"event": "tls_configured", "message": "m", "poll": " and when the files change",
                       "used_by": "; for *:465", "proxy_text": "", "subject": "CN=x", "spec": None, "port": 587}),
            {"poll": " and when the files change", "used_by": "; for *:465", "proxy_text": ""},
        )

    def wait_for(self, started: Any, test: Callable[[str], bool], what: str) -> str:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            output = started.output()
            if test(output):
                return output
            if started.process.poll() is not None:
                self.fail(f"the relay exited ({started.process.returncode}) before {what}:\n{output[-3000:]}")
            time.sleep(0.1)
        self.fail(f"no {what} within {TIMEOUT} s")

    def test_started_relay_log(self) -> None:
        """A relay's JSON log, start to stop: no field is a fragment of a text; relay_listening follows the binds."""
        api_url = start_sandbox(self, self.dir)
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("POSTSTACK_RELAY_")}
        env.update(
            PYTHONPATH=ROOT, POSTSTACK_RELAY_LOG_FORMAT="json", POSTSTACK_RELAY_SERVICE_KEY="sk_test_relay_service",
            POSTSTACK_RELAY_TLS_DETECT_TIMEOUT="0.5",
        )
        relay = start_program(
            self, self.dir, "relay",
            [*COMMAND_LINE, "--port", str(port), "--interface", "127.0.0.1", "--tls-cert", self.cert,
             "--tls-key", self.key, "--api-url", api_url, "--hostname", "localhost",
             "--metrics-listen", "127.0.0.1:0", "--listen", f"127.0.0.1:{free_port()},proxy-protocol"],
            env,
        )
        wait_for_port(port, relay.process)
        self.wait_for(relay, lambda out: '"relay_listening"' in out, "relay_listening")
        context = ssl.create_default_context(cafile=self.cert)
        with smtplib.SMTP_SSL("localhost", port, context=context, timeout=30) as s:
            s.login("poststack", "sk_test_full_access")
            s.sendmail("you@yourdomain.com", ["user@example.com"],
                       b"From: you@yourdomain.com\r\nTo: user@example.com\r\nSubject: log\r\n\r\nhi\r\n")
        with smtplib.SMTP_SSL("localhost", port, context=context, timeout=30) as s:
            with self.assertRaises(smtplib.SMTPAuthenticationError):
                s.login("poststack", "sk_test_wrong")
        with socket.create_connection(("127.0.0.1", port), timeout=30) as silent:  # a STARTTLS client
            self.assertTrue(silent.recv(1024).startswith(b"554 5.7.0"))
        relay.process.send_signal(signal.SIGTERM)
        self.assertEqual(relay.process.wait(timeout=TIMEOUT), 0)
        events = [json.loads(line) for line in relay.output().splitlines() if line.startswith("{")]
        names = [e["event"] for e in events]
        for name in ("relay_configured", "listener_configured", "tls_configured", "relay_listening",
                     "smtp_transaction", "auth_failed", "tls_plaintext_refused", "drain_done"):
            self.assertIn(name, names)
        found = {f"{e['event']}.{k}": v for e in events for k, v in fragments(e).items()}
        self.assertEqual(found, {})
        [listening] = [e for e in events if e["event"] == "relay_listening"]
        self.assertEqual(listening["listeners"][0], f"127.0.0.1:{port}")
        self.assertEqual(len(listening["listeners"]), 2)
        self.assertRegex(listening["metrics"], r"^127\.0\.0\.1:\d+$")
        # After every bind: Twisted's own "starting on" line of each port comes first.
        starts = [i for i, e in enumerate(events) if "starting on" in (e.get("message") or "")]
        self.assertEqual(len(starts), 3, [e.get("message") for e in events])
        self.assertGreater(names.index("relay_listening"), max(starts))

    def test_workers_log(self) -> None:
        """--workers 2, JSON: the supervisor's and the workers' events hold values too; each worker says ready once."""
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("POSTSTACK_RELAY_")}
        env.update(PYTHONPATH=ROOT)
        relay = start_program(
            self, self.dir, "workers",
            [*COMMAND_LINE, "--workers", "2", "--port", str(port), "--interface", "127.0.0.1",
             "--tls-cert", self.cert, "--tls-key", self.key, "--metrics-listen", f"127.0.0.1:{free_port()}",
             "--log-format", "json"],
            env,
        )
        self.wait_for(relay, lambda out: '"workers_ready"' in out, "workers_ready")
        relay.process.send_signal(signal.SIGTERM)
        self.assertEqual(relay.process.wait(timeout=TIMEOUT), 0)
        events = [json.loads(line) for line in relay.output().splitlines() if line.startswith("{")]
        names = [e["event"] for e in events]
        self.assertEqual(names.count("worker_ready"), 2)
        self.assertNotIn("relay_listening", names)  # a worker says worker_ready instead
        found = {f"{e['event']}.{k}": v for e in events for k, v in fragments(e).items()}
        self.assertEqual(found, {})
