"""
The relay as users start it: C{twistd -n poststack-relay} and the README's
C{.tac} example, as real processes on loopback, sending a real message.
"""

from __future__ import annotations

import json
import os
import signal
import smtplib
import ssl
import subprocess
import urllib.request

from twisted.trial.unittest import TestCase

from poststack_relay.testing import write_certificate
from tests.common.processes import DATA, ROOT, TWISTD, free_port, stop_process, wait_for_port


class ProcessTests(TestCase):
    timeout = 120

    def start(self, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        environ = dict(os.environ, PYTHONPATH=ROOT)
        environ.update(env)
        proc = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", *args],
            cwd=self.dir, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )

        def stop() -> None:
            stop_process(proc)
            assert proc.stdout is not None
            proc.stdout.close()

        self.addCleanup(stop)
        return proc

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.cert, self.key = write_certificate(self.dir)
        self.api_port = free_port()
        sandbox = self.start(
            ["poststack-sandbox", "--port", str(self.api_port), "--db", "s.sqlite3", "--data", DATA], {}
        )
        wait_for_port(self.api_port, sandbox)

    def send(self, port: int) -> tuple[int, bytes]:
        ctx = ssl.create_default_context(cafile=self.cert)
        with smtplib.SMTP_SSL("localhost", port, context=ctx, timeout=30) as s:
            s.login("poststack", "sk_test_full_access")
            s.mail("you@yourdomain.com")
            s.rcpt("user@example.com")
            return s.data(b"From: you@yourdomain.com\r\nTo: user@example.com\r\nSubject: cmd\r\n\r\nhi\r\n")

    def test_twistd_plugin(self) -> None:
        """twistd -n poststack-relay, configured from the environment, relays a message and stops on SIGTERM."""
        port = free_port()
        proc = self.start(
            ["poststack-relay"],
            {
                "POSTSTACK_RELAY_PORT": str(port),
                "POSTSTACK_RELAY_INTERFACE": "127.0.0.1",
                "POSTSTACK_RELAY_TLS_CERT": self.cert,
                "POSTSTACK_RELAY_TLS_KEY": self.key,
                "POSTSTACK_RELAY_API_URL": f"http://127.0.0.1:{self.api_port}",
                "POSTSTACK_RELAY_HOSTNAME": "localhost",
                "POSTSTACK_RELAY_METRICS_LISTEN": "127.0.0.1:0",
            },
        )
        wait_for_port(port, proc)
        code, text = self.send(port)
        self.assertEqual(code, 250, text)
        self.assertTrue(text.startswith(b"2.0.0 Ok: queued as em_"), text)
        proc.send_signal(signal.SIGTERM)
        # SIGTERM is a graceful stop (tap.stop_on_sigterm): exit status 0.
        self.assertEqual(proc.wait(timeout=20), 0)
        assert proc.stdout is not None
        self.assertIn(b"Main loop terminated.", proc.stdout.read())

    def test_tac_example(self) -> None:
        """The .tac example (etc/poststack-relay.tac) reads settings as the command does (environment, config file) and relays."""
        port, metrics = free_port(), free_port()
        config = os.path.join(self.dir, "relay.toml")
        with open(config, "w") as f:
            f.write('hostname = "tac.example.com"\nmax_recipients = 1\n')
        proc = self.start(
            ["-y", os.path.join(ROOT, "etc", "poststack-relay.tac")],
            {
                "POSTSTACK_RELAY_PORT": str(port),
                "POSTSTACK_RELAY_INTERFACE": "127.0.0.1",
                "POSTSTACK_RELAY_TLS_CERT": self.cert,
                "POSTSTACK_RELAY_TLS_KEY": self.key,
                "POSTSTACK_RELAY_API_URL": f"http://127.0.0.1:{self.api_port}",
                "POSTSTACK_RELAY_METRICS_LISTEN": f"127.0.0.1:{metrics}",
                "POSTSTACK_RELAY_LOG_FORMAT": "json",
                "POSTSTACK_RELAY_CONFIG": config,
            },
        )
        wait_for_port(port, proc)
        code, text = self.send(port)
        self.assertEqual(code, 250, text)
        ctx = ssl.create_default_context(cafile=self.cert)
        with smtplib.SMTP_SSL("localhost", port, context=ctx, timeout=30) as s:
            self.assertIn(b"tac.example.com", s.ehlo()[1])  # hostname from the config file
            s.login("poststack", "sk_test_full_access")
            s.mail("you@yourdomain.com")
            self.assertEqual(s.rcpt("a@example.com")[0], 250)
            self.assertEqual(s.rcpt("b@example.com")[0] // 100, 4)  # max_recipients = 1 from the file
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/healthz", timeout=30) as answer:
            self.assertEqual(answer.read(), b"ok\n")  # POSTSTACK_RELAY_METRICS_LISTEN
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        assert proc.stdout is not None
        lines = proc.stdout.read().decode("utf-8", "replace").splitlines()
        events = [json.loads(line) for line in lines if line.startswith("{")]  # POSTSTACK_RELAY_LOG_FORMAT
        self.assertIn("relay_listening", [e["event"] for e in events], lines[-20:])
        self.assertEqual([line for line in lines if not line.startswith("{")], [])

    def test_tac_bad_setting(self) -> None:
        """A bad setting in the .tac's environment: the command's one line, status 1."""
        proc = self.start(
            ["-y", os.path.join(ROOT, "etc", "poststack-relay.tac")],
            {"POSTSTACK_RELAY_TLS_CERT": self.cert, "POSTSTACK_RELAY_METRICS_LISTEN": "9587x"},
        )
        self.assertEqual(proc.wait(timeout=60), 1)
        assert proc.stdout is not None
        output = proc.stdout.read().decode()
        self.assertEqual(
            output.strip().splitlines()[-1],
            "poststack-relay: error: metrics-listen must be HOST:PORT or [IPv6]:PORT with an IP address "
            "(e.g. 127.0.0.1:9587, [::1]:9587, 0.0.0.0:9587), or off to disable it, not '9587x'",
        )
        self.assertNotIn("Traceback", output)
