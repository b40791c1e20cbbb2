"""
Tests for the twistd plugin and its options (L{poststack_relay.tap}).
"""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase

from poststack_relay import tap
from poststack_relay.config import RelayConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse(argv: list[str], environ: dict[str, str] | None = None) -> RelayConfig:
    options = tap.Options(environ=environ or {})
    options.parseOptions(argv)
    return options.config


class OptionsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """Only --tls-cert is needed; the rest has the documented defaults."""
        config = parse(["--tls-cert", "c.pem"])
        self.assertEqual(config.port, 587)
        self.assertEqual(config.interface, "")
        self.assertEqual(config.api_url, "https://api.poststack.dev")
        self.assertEqual(config.idle_timeout, 300.0)
        self.assertEqual(config.tls_detect_timeout, 2.0)
        self.assertEqual((config.api_breaker_failures, config.api_breaker_cooldown), (5, 0.5))
        self.assertIsNone(config.service_key)

    def test_all_contract_options(self) -> None:
        """Every option name of the contract parses into the config."""
        config = parse(
            [
                "--port", "2587", "--interface", "127.0.0.1", "--tls-cert", "c.pem",
                "--tls-key", "k.pem", "--api-url", "http://127.0.0.1:9", "--service-key", "sk_x",
                "--hostname", "smtp.example.com", "--max-message-size", "1000",
                "--max-recipients", "3", "--idle-timeout", "60",
            ]
        )
        self.assertEqual(
            (config.port, config.interface, config.tls_key, config.api_url, config.service_key,
             config.hostname, config.max_message_size, config.max_recipients, config.idle_timeout),
            (2587, "127.0.0.1", "k.pem", "http://127.0.0.1:9", "sk_x", "smtp.example.com", 1000, 3, 60.0),
        )

    def test_environment(self) -> None:
        """Options come from POSTSTACK_RELAY_* variables; the command line wins."""
        env = {
            "POSTSTACK_RELAY_TLS_CERT": "env.pem",
            "POSTSTACK_RELAY_SERVICE_KEY": "sk_env",
            "POSTSTACK_RELAY_PORT": "2525",
        }
        config = parse(["--port", "2600"], env)
        self.assertEqual((config.tls_cert, config.service_key, config.port), ("env.pem", "sk_env", 2600))

    def test_bad_values(self) -> None:
        """Bad values end the command with one line naming the option (SystemExit, status 1)."""
        for argv, env, word in [
            (["--tls-cert", "c", "--port", "x"], {}, "--port"),
            (["--tls-cert", "c"], {"POSTSTACK_RELAY_IDLE_TIMEOUT": "soon"}, "POSTSTACK_RELAY_IDLE_TIMEOUT"),
            (["--tls-cert", "c", "--port", "70000"], {}, "port"),
            (["--tls-cert", "c", "--api-url", "ftp://x"], {}, "api-url"),
            (["--tls-cert", "c", "--api-breaker-cooldown", "0"], {}, "api-breaker-cooldown"),
            ([], {}, "--tls-cert"),
        ]:
            with self.assertRaises(SystemExit) as ctx:
                parse(argv, env)
            message = str(ctx.exception.code)
            self.assertIn(word, message)
            self.assertTrue(message.startswith("poststack-relay: error: "), message)
            self.assertNotIn("\n", message)

    def test_metrics_listen_values(self) -> None:
        """--metrics-listen: empty means the default, off disables it, and the error for a bad value says so."""
        self.assertEqual(parse(["--tls-cert", "c", "--metrics-listen", ""]).metrics_listen, "127.0.0.1:9587")
        self.assertTrue(parse(["--tls-cert", "c"], {"POSTSTACK_RELAY_METRICS_LISTEN": ""}).metrics_enabled)
        self.assertFalse(parse(["--tls-cert", "c", "--metrics-listen", "off"]).metrics_enabled)
        with self.assertRaises(SystemExit) as ctx:
            parse(["--tls-cert", "c", "--metrics-listen", "9587x"])
        message = str(ctx.exception.code)
        self.assertIn("or off to disable it, not '9587x'", message)
        self.assertNotIn("empty", message)

    def test_share_per_credential(self) -> None:
        """--api-max-in-flight-per-credential (and its variable) sets the share; 0 by default (a quarter); not negative."""
        self.assertEqual(parse(["--tls-cert", "c"]).api_max_in_flight_per_credential, 0)
        config = parse(["--tls-cert", "c", "--api-max-in-flight-per-credential", "5"])
        self.assertEqual(config.api_max_in_flight_per_credential, 5)
        config = parse(["--tls-cert", "c"], {"POSTSTACK_RELAY_API_MAX_IN_FLIGHT_PER_CREDENTIAL": "7"})
        self.assertEqual(config.api_max_in_flight_per_credential, 7)
        with self.assertRaises(SystemExit) as ctx:
            parse(["--tls-cert", "c", "--api-max-in-flight-per-credential", "-1"])
        self.assertIn("api-max-in-flight-per-credential", str(ctx.exception.code))

    def test_secret_not_in_repr(self) -> None:
        """The service key never appears in the config's repr."""
        config = parse(["--tls-cert", "c", "--service-key", "sk_live_supersecret123"])
        self.assertNotIn("supersecret", repr(config))

    def test_plugin_discovered(self) -> None:
        """getPlugins finds poststack-relay with the source tree on sys.path."""
        names = {p.tapname for p in getPlugins(IServiceMaker)}
        self.assertIn("poststack-relay", names)


class CommandLineTests(SynchronousTestCase):
    def run_twistd(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        environ = dict(os.environ)
        environ["PYTHONPATH"] = ROOT
        environ.update(env or {})
        return subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), "twistd"), *args],
            capture_output=True, text=True, timeout=60, env=environ, cwd=self.mktemp_dir(),
        )

    def mktemp_dir(self) -> str:
        path = self.mktemp()
        os.makedirs(path)
        return path

    def test_missing_certificate(self) -> None:
        """A missing certificate is one line on stderr and exit status 1, no traceback."""
        result = self.run_twistd("-n", "--pidfile=", "poststack-relay", "--tls-cert", "/nonexistent/cert.pem", "--port", "0")
        self.assertEqual(result.returncode, 1)
        self.assertNotIn("Traceback", result.stderr + result.stdout)
        self.assertIn("poststack-relay: error: cannot read TLS certificate '/nonexistent/cert.pem'", result.stderr)
        self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)

    def test_unreadable_key(self) -> None:
        """A key file that is not a key is one line and exit status 1."""
        from poststack_relay.testing import write_certificate

        cert, key = write_certificate(os.path.abspath(self.mktemp()))
        with open(key, "w") as f:
            f.write("not a key\n")
        result = self.run_twistd("-n", "--pidfile=", "poststack-relay", "--tls-cert", cert, "--tls-key", key, "--port", "0")
        self.assertEqual(result.returncode, 1)
        self.assertNotIn("Traceback", result.stderr + result.stdout)
        self.assertIn("holds no usable unencrypted PEM private key", result.stderr)


class DocumentationTests(SynchronousTestCase):
    def test_every_option_in_readme(self) -> None:
        """The README's configuration table names every option and its environment variable."""
        with open(os.path.join(ROOT, "README.md")) as f:
            readme = f.read()
        for name, _, _, _ in tap._OPTIONS:
            self.assertIn(f"`--{name}`", readme)
            self.assertIn(f"`{tap.env_name(name)}`", readme)
