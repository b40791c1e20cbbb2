"""
The C{poststack-relay} console command (L{poststack_relay.command}): the
options of C{twistd -n poststack-relay}, parsed without scanning for
plugins; C{--version} (also as C{twistd poststack-relay --version}) and
C{--help}; and, as real processes on loopback against the sandbox, a
message relayed, a transaction in flight drained on SIGTERM with exit
status 0, the certificate reloaded on SIGHUP, and C{--workers 2}.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import time

from twisted.scripts import twistd
from twisted.trial.unittest import SynchronousTestCase

from poststack_relay import __version__
from poststack_relay.command import CommandOptions, parse, twistd_arguments
from poststack_relay.testing import write_certificate
from tests.common.processes import ROOT, TWISTD, free_port, wait_for_port
from tests.common.running import COMMAND_LINE, Started, relay_environment, start_program, start_sandbox

#: Every wait on a process is bounded by this many seconds.
TIMEOUT = 60
MESSAGE = b"From: you@yourdomain.com\r\nTo: user@example.com\r\nSubject: command\r\n\r\nhi\r\n"


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    """Run C{args} from the tree (bounded in time), capturing output."""
    return subprocess.run(
        args, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
        timeout=TIMEOUT, check=False,
    )


class ParseTests(SynchronousTestCase):
    """The command line, as twistd's options of C{twistd -n --pidfile= poststack-relay}."""

    def test_arguments(self) -> None:
        """The command's arguments follow the foreground options and the subcommand."""
        self.assertEqual(
            twistd_arguments(["--port", "2587", "--workers", "2"]),
            ["--nodaemon", "--pidfile=", "poststack-relay", "--port", "2587", "--workers", "2"],
        )

    def test_parse(self) -> None:
        """The relay's options are the subcommand's: its config is built; twistd runs it in the foreground, no pidfile."""
        options = parse(["--tls-cert", "/nonexistent/cert.pem", "--port", "2587", "--workers", "3"])
        self.assertEqual(options.subCommand, "poststack-relay")
        self.assertTrue(options["nodaemon"])
        self.assertEqual(options["pidfile"], "")
        self.assertEqual(options.subOptions.config.port, 2587)
        self.assertEqual(options.subOptions.config.workers, 3)
        self.assertEqual(options.subOptions.config.tls_cert, "/nonexistent/cert.pem")
        self.assertIs(options.subOptions.parent, options)

    def test_no_plugin_scan(self) -> None:
        """The command never looks for plugins: a scan would fail here (and write Twisted's plugin cache)."""

        def scan(*args: object) -> object:
            raise AssertionError("the command scanned for plugins")

        self.patch(twistd.ServerOptions, "_getPlugins", staticmethod(scan))
        options = parse(["--tls-cert", "/nonexistent/cert.pem"])
        self.assertEqual(list(options.loadedPlugins), ["poststack-relay"])
        self.assertIsInstance(options, CommandOptions)

    def test_bad_option(self) -> None:
        """An unknown option ends the command with one line naming it, status 1."""
        with self.assertRaises(SystemExit) as raised:
            parse(["--prot", "587"])
        self.assertEqual(
            str(raised.exception.code),
            "poststack-relay: error: option --prot not recognized; did you mean --port? (--help lists the options)",
        )

    def test_bad_value(self) -> None:
        """A bad value is the relay's own one-line error."""
        with self.assertRaises(SystemExit) as raised:
            parse(["--tls-cert", "c.pem", "--port", "many"])
        self.assertEqual(str(raised.exception.code), "poststack-relay: error: --port: not a valid int: 'many'")


class VersionAndHelpTests(SynchronousTestCase):
    """What C{--version} and C{--help} print, from real processes."""

    def test_version(self) -> None:
        """poststack-relay --version prints the relay's version and exits 0."""
        result = _run([*COMMAND_LINE, "--version"])
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.split("(")[0].strip(), f"poststack-relay {__version__}")

    def test_twistd_version(self) -> None:
        """twistd poststack-relay --version prints the relay's version too (not only Twisted's)."""
        result = _run([TWISTD, "poststack-relay", "--version"])
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.split("(")[0].strip(), f"poststack-relay {__version__}")

    def test_help(self) -> None:
        """poststack-relay --help is the relay's usage under the command's own name."""
        result = _run([*COMMAND_LINE, "--help"])
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.splitlines()[0], "Usage: poststack-relay [options]")
        for option in ("--tls-cert=", "--workers=", "--check-config", "--version"):
            self.assertIn(option, result.stdout)
        self.assertNotIn("--nodaemon", result.stdout)

    def help_texts(self) -> dict[str, str]:
        """--help of the command and of twistd poststack-relay, at 80 and 123 columns."""
        texts = {}
        for width in ("80", "123"):
            for name, command in (("command", [*COMMAND_LINE]), ("twistd", [TWISTD, "poststack-relay"])):
                result = subprocess.run(
                    [*command, "--help"], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT, COLUMNS=width),
                    capture_output=True, text=True, timeout=TIMEOUT, check=False,
                )
                self.assertEqual(result.returncode, 0, result.stderr)
                texts[f"{name} at {width}"] = result.stdout
        return texts

    def test_help_wrapping(self) -> None:
        """--help: help texts and the description without runs of spaces or words cut at a hyphen; the example whole."""
        example = ("poststack-relay --tls-cert fullchain.pem --tls-key privkey.pem "
                   "--hostname smtp.example.com")
        for where, text in self.help_texts().items():
            lines = text.splitlines()
            # The option column ends where the first help text starts (a run of spaces after the option).
            column = re.search(r"^ +--\S+ +", text, re.M)
            assert column is not None, text
            start = len(column.group(0))
            for line in lines:
                words = line[start:] if line.startswith("  ") and not line.startswith("    poststack") else line
                if line.startswith("    poststack-relay") or line.startswith("        --hostname"):
                    continue  # the example, as written
                self.assertNotRegex(words.strip(), r"\S {2,}\S", f"{where}: {line!r}")
                self.assertNotRegex(line, r"[A-Za-z]-$", f"{where}: a word cut at a hyphen: {line!r}")
            joined = re.sub(r"\s*\\\n\s*", " ", text)
            self.assertIn(example, joined, where)
            listen = lines.index(next(line for line in lines if line.lstrip().startswith("--listen=")))
            following = [line for line in lines[listen + 1:] if not line.lstrip().startswith("--")]
            listen_help = " ".join(line[start:].strip() for line in [lines[listen], *following[:6]])
            self.assertIn("or systemd:NAME, optionally followed by ,proxy-protocol ,tls-cert=PATH ,tls-key=PATH;",
                          listen_help, where)

    def test_mistyped_option(self) -> None:
        """A mistyped option: a few lines naming it and the nearest option, status 1 (twistd and the command)."""
        for command in ([*COMMAND_LINE], [TWISTD, "poststack-relay"]):
            result = _run([*command, "--metrics-listn", "127.0.0.1:9999"])
            self.assertEqual(result.returncode, 1, result)
            output = (result.stdout + result.stderr).strip().splitlines()
            self.assertLessEqual(len(output), 3, output)
            self.assertEqual(
                output[-1],
                "poststack-relay: error: option --metrics-listn not recognized; "
                "did you mean --metrics-listen? (--help lists the options)",
            )

    def test_check_config(self) -> None:
        """poststack-relay --check-config loads the certificate, prints the settings with their sources, exits 0."""
        directory = os.path.abspath(self.mktemp())
        cert, key = write_certificate(directory)
        result = _run([*COMMAND_LINE, "--check-config", "--tls-cert", cert, "--tls-key", key, "--port", "2587"])
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("port = 2587  # command line", result.stdout.splitlines())

    def test_missing_certificate(self) -> None:
        """Without a certificate the command says so in one line and exits 1."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("POSTSTACK_RELAY_")}
        result = subprocess.run(
            COMMAND_LINE, cwd=ROOT, env=dict(env, PYTHONPATH=ROOT), capture_output=True, text=True,
            timeout=TIMEOUT, check=False,
        )
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stdout, "")
        self.assertTrue(result.stderr.startswith("poststack-relay: error: --tls-cert"), result.stderr)


class RunTests(SynchronousTestCase):
    """The command as a real relay process on loopback, against the sandbox."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.cert, self.key = write_certificate(self.dir)
        self.api_url = start_sandbox(self, self.dir)

    def start_relay(self, *args: str) -> tuple[Started, int]:
        port = free_port()
        env = relay_environment(dict(os.environ, PYTHONPATH=ROOT), port, self.cert, self.key, self.api_url)
        relay = start_program(self, self.dir, "relay", [*COMMAND_LINE, *args], env)
        wait_for_port(port, relay.process)
        return relay, port

    def client(self, port: int) -> smtplib.SMTP_SSL:
        context = ssl.create_default_context(cafile=self.cert)
        client = smtplib.SMTP_SSL("localhost", port, context=context, timeout=30)
        self.addCleanup(client.close)
        client.login("poststack", "sk_test_full_access")
        return client

    def stop(self, relay: Started) -> str:
        """SIGTERM; the relay must exit 0 in time; its output."""
        relay.process.send_signal(signal.SIGTERM)
        self.assertEqual(relay.process.wait(timeout=TIMEOUT), 0, relay.output())
        return relay.output()

    def test_relays_and_stops(self) -> None:
        """The command relays a message, logs to standard output and exits 0 on SIGTERM."""
        relay, port = self.start_relay()
        client = self.client(port)
        client.mail("you@yourdomain.com")
        client.rcpt("user@example.com")
        code, text = client.data(MESSAGE)
        self.assertEqual(code, 250, text)
        self.assertTrue(text.startswith(b"2.0.0 Ok: queued as em_"), text)
        output = self.stop(relay)
        self.assertIn("relayed", output)
        self.assertIn("Main loop terminated.", output)
        self.assertFalse(os.path.exists(os.path.join(self.dir, "twistd.pid")))
        self.assertFalse(os.path.exists(os.path.join(self.dir, "twistd.log")))

    def test_sigterm_drains(self) -> None:
        """SIGTERM during DATA: the transaction in flight still gets its 250, then the command exits 0."""
        relay, port = self.start_relay()
        client = self.client(port)
        client.mail("you@yourdomain.com")
        client.rcpt("user@example.com")
        client.putcmd("data")
        self.assertEqual(client.getreply()[0], 354)
        client.send(MESSAGE[:40])
        relay.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + TIMEOUT
        while "draining" not in relay.output() and time.monotonic() < deadline:
            self.assertIsNone(relay.process.poll(), relay.output())
            time.sleep(0.05)
        self.assertIn("draining: 1 session", relay.output())
        client.send(MESSAGE[40:] + b".\r\n")
        code, text = client.getreply()
        self.assertEqual(code, 250, text)
        self.assertEqual(relay.process.wait(timeout=TIMEOUT), 0, relay.output())
        self.assertIn("drained", relay.output())

    def test_sighup_reloads_certificate(self) -> None:
        """SIGHUP to the command reloads the certificate files: a new connection gets the new certificate."""
        relay, port = self.start_relay("--tls-reload-interval", "0")
        before = self.peer_certificate(port)
        write_certificate(self.dir)  # a new key and certificate over the same files
        relay.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + TIMEOUT
        while "TLS certificate reloaded (SIGHUP)" not in relay.output() and time.monotonic() < deadline:
            self.assertIsNone(relay.process.poll(), relay.output())
            time.sleep(0.05)
        after = self.peer_certificate(port)
        self.assertNotEqual(before, after)
        with open(self.cert, "rb") as f:
            self.assertEqual(after, ssl.PEM_cert_to_DER_cert(f.read().decode("ascii")))
        self.stop(relay)

    def peer_certificate(self, port: int) -> bytes:
        """The certificate (DER) the relay on C{port} presents now."""
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                der = tls.getpeercert(binary_form=True)
        assert der is not None
        return der

    def test_workers(self) -> None:
        """poststack-relay --workers 2 supervises two relay processes that relay; SIGTERM stops all, status 0."""
        relay, port = self.start_relay("--workers", "2")
        client = self.client(port)
        client.mail("you@yourdomain.com")
        client.rcpt("user@example.com")
        code, text = client.data(MESSAGE)
        self.assertEqual(code, 250, text)
        client.quit()
        output = self.stop(relay)
        self.assertIn("worker 0", output)
        self.assertIn("worker 1", output)
        self.assertIn("all workers stopped", output)
