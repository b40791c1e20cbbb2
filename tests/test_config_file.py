"""
Tests for the TOML config file (C{--config}) and C{--check-config} of
L{poststack_relay.tap}, and for the example C{etc/poststack-relay.toml}.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib

import attrs
from twisted.trial.unittest import SynchronousTestCase

from poststack_relay import tap
from poststack_relay.config import RelayConfig
from poststack_relay.testing import write_certificate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "etc", "poststack-relay.toml")
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")

# A key = value line of the example, commented out (a default) or not.
_SETTING = re.compile(r"^(#?)([a-z][a-z0-9_]*) = (.*)$")


class PrecedenceTests(SynchronousTestCase):
    """
    Settings come from the command line, the environment, the file and the defaults, in that order.
    """

    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_four_sources(self) -> None:
        """Command line beats environment beats file beats defaults, and each source is recorded."""
        path = self.write(
            'tls_cert = "file.pem"\nport = 1001\nidle_timeout = 11\nmax_recipients = 7\n'
            "derive_idempotency_keys = false\n"
        )
        env = {"POSTSTACK_RELAY_PORT": "2002", "POSTSTACK_RELAY_IDLE_TIMEOUT": "22",
               "POSTSTACK_RELAY_CONFIG": path}
        options = tap.Options(environ=env)
        options.parseOptions(["--idle-timeout", "33"])
        config = options.config
        self.assertEqual(
            (config.tls_cert, config.port, config.idle_timeout, config.max_recipients,
             config.derive_idempotency_keys, config.max_errors),
            ("file.pem", 2002, 33.0, 7, False, 20),
        )
        self.assertEqual(
            {name: options.sources.get(name, "default") for name in
             ("tls-cert", "port", "idle-timeout", "max-recipients", "max-errors")},
            {"tls-cert": "file", "port": "environment", "idle-timeout": "command line",
             "max-recipients": "file", "max-errors": "default"},
        )

    def test_command_line_config_beats_environment_config(self) -> None:
        """--config on the command line wins over POSTSTACK_RELAY_CONFIG."""
        cli = self.write('tls_cert = "cli.pem"\n')
        env = self.write('tls_cert = "env.pem"\n')
        options = tap.Options(environ={"POSTSTACK_RELAY_CONFIG": env})
        options.parseOptions(["--config", cli])
        self.assertEqual(options.config.tls_cert, "cli.pem")

    def test_numbers_and_empty_strings(self) -> None:
        """An integer is accepted for a seconds setting, and an empty string means unset."""
        path = self.write('tls_cert = "c.pem"\napi_timeout = 4\ntls_key = ""\n')
        options = tap.Options(environ={})
        options.parseOptions(["--config", path])
        self.assertEqual((options.config.api_timeout, options.config.tls_key), (4.0, None))
        self.assertIsInstance(options.config.api_timeout, float)

    def test_wrong_types(self) -> None:
        """A value of the wrong TOML type is refused, booleans are not numbers, numbers not strings."""
        for text, word in [
            ("port = true\n", "port must be an integer"),
            ("port = 1.5\n", "port must be an integer"),
            ('idle_timeout = "300"\n', "idle_timeout must be a number"),
            ("idle_timeout = false\n", "idle_timeout must be a number"),
            ('derive_idempotency_keys = "yes"\n', "derive_idempotency_keys must be true or false"),
            ("hostname = 5\n", "hostname must be a string"),
            ("[listener]\nport = 1\n", "unknown key 'listener'"),
        ]:
            path = self.write('tls_cert = "c.pem"\n' + text)
            with self.assertRaises(SystemExit) as ctx:
                tap.Options(environ={}).parseOptions(["--config", path])
            self.assertIn(word, str(ctx.exception.code))

    def test_command_line_errors_one_line(self) -> None:
        """A bad command-line value next to a file is one line naming the option."""
        path = self.write('tls_cert = "c.pem"\n')
        with self.assertRaises(SystemExit) as ctx:
            tap.Options(environ={}).parseOptions(["--config", path, "--port", "x"])
        self.assertIn("--port", str(ctx.exception.code))


class CommandLineTests(SynchronousTestCase):
    """
    C{twistd poststack-relay} with a config file, as an operator runs it.
    """

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)

    def write(self, text: str) -> str:
        path = os.path.join(self.directory, f"relay{len(os.listdir(self.directory))}.toml")
        with open(path, "w") as f:
            f.write(text)
        return path

    def run_twistd(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        environ = {k: v for k, v in os.environ.items() if not k.startswith(tap.ENV_PREFIX)}
        environ["PYTHONPATH"] = ROOT
        environ.update(env or {})
        return subprocess.run(
            [TWISTD, "-n", "--pidfile=", "poststack-relay", *args],
            capture_output=True, text=True, timeout=60, env=environ, cwd=self.directory,
        )

    def assertOneLineError(self, result: subprocess.CompletedProcess[str], expected: str) -> None:
        """The command failed with status 1 and exactly one stderr line, the expected one."""
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertEqual(result.stdout, "")
        self.assertEqual(result.stderr.strip().splitlines(), [f"poststack-relay: error: {expected}"])

    def test_file_errors_are_one_line(self) -> None:
        """Unknown key, wrong type, bad range, invalid TOML and an unreadable file: one line each, exit 1."""
        missing = os.path.join(self.directory, "missing.toml")
        cases = [
            (self.write('tls_cert = "c.pem"\nmax-recipients = 3\n'),
             "config file {path!r}: unknown key 'max-recipients' (write max_recipients)"),
            (self.write('tls_cert = "c.pem"\nbogus = 1\n'), "config file {path!r}: unknown key 'bogus'"),
            (self.write('tls_cert = "c.pem"\nport = "smtp"\n'),
             "config file {path!r}: port must be an integer, not 'smtp'"),
            (self.write('tls_cert = "c.pem"\nport = 70000\n'),
             "config file {path!r}: port must be between 0 and 65535, not 70000"),
            (self.write("port = \n"),
             "config file {path!r} is not valid TOML: Invalid value (at line 1, column 8)"),
            (missing, "cannot read config file {path!r}: No such file or directory"),
        ]
        for path, expected in cases:
            self.assertOneLineError(self.run_twistd("--config", path), expected.format(path=path))

    def test_config_from_environment(self) -> None:
        """POSTSTACK_RELAY_CONFIG names the file when --config is not given."""
        path = self.write("port = []\n")
        result = self.run_twistd(env={"POSTSTACK_RELAY_CONFIG": path})
        self.assertOneLineError(result, f"config file {path!r}: port must be an integer, not []")

    def test_check_config(self) -> None:
        """--check-config prints every setting with its source, the secret masked, and exits 0."""
        cert, key = write_certificate(os.path.join(self.directory, "tls"))
        path = self.write(
            f'tls_cert = "{cert}"\ntls_key = "{key}"\nport = 1001\nmax_recipients = 7\n'
            'service_key = "sk_live_supersecret123"\nhostname = "smtp.example.com"\n'
        )
        result = self.run_twistd(
            "--config", path, "--idle-timeout", "33", "--check-config",
            env={"POSTSTACK_RELAY_PORT": "2002"},
        )
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        self.assertNotIn("supersecret", result.stdout)
        lines = result.stdout.splitlines()
        self.assertEqual(len(lines), len(tap._OPTIONS))
        for expected in [
            "port = 2002  # environment",
            "idle_timeout = 33.0  # command line",
            "max_recipients = 7  # file",
            f'tls_cert = "{cert}"  # file',
            'service_key = "sk_live_su\N{HORIZONTAL ELLIPSIS}"  # file',
            "max_errors = 20  # default",
            "derive_idempotency_keys = true  # default",
            'api_url = "https://api.poststack.dev"  # default',
        ]:
            self.assertIn(expected, lines)

    def test_check_config_unset_secret(self) -> None:
        """--check-config shows an unset service key as (unset)."""
        cert, key = write_certificate(os.path.join(self.directory, "tls"))
        result = self.run_twistd("--tls-cert", cert, "--tls-key", key, "--check-config")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("service_key = (unset)  # default", result.stdout.splitlines())
        self.assertIn(f'tls_cert = "{cert}"  # command line', result.stdout.splitlines())

    def test_check_config_errors(self) -> None:
        """--check-config reports a bad value, a missing certificate or a bad key in one line, exit 1."""
        cert, key = write_certificate(os.path.join(self.directory, "tls"))
        bad_key = os.path.join(self.directory, "bad.key")
        with open(bad_key, "w") as f:
            f.write("not a key\n")
        self.assertOneLineError(
            self.run_twistd("--tls-cert", cert, "--port", "x", "--check-config"),
            "--port: not a valid int: 'x'",
        )
        self.assertOneLineError(
            self.run_twistd("--tls-cert", cert, "--check-config", env={"POSTSTACK_RELAY_API_URL": "ftp://x"}),
            "api-url must start with https:// or http://, not 'ftp://x'",
        )
        self.assertOneLineError(
            self.run_twistd("--tls-cert", "/nonexistent/cert.pem", "--check-config"),
            "cannot read TLS certificate '/nonexistent/cert.pem': No such file or directory",
        )
        result = self.run_twistd("--tls-cert", cert, "--tls-key", bad_key, "--check-config")
        self.assertEqual(result.returncode, 1)
        self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
        self.assertIn("holds no usable unencrypted PEM private key", result.stderr)


class ExampleFileTests(SynchronousTestCase):
    """
    C{etc/poststack-relay.toml} documents every option with its default.
    """

    def setUp(self) -> None:
        with open(EXAMPLE) as f:
            self.text = f.read()
        self.lines = self.text.splitlines()
        self.settings = [
            (match.group(1) == "#", match.group(2), match.group(3), index)
            for index, line in enumerate(self.lines)
            if (match := _SETTING.match(line))
        ]

    def test_every_option_once(self) -> None:
        """Each option's key appears exactly once, and no other key does."""
        self.assertEqual(
            sorted(key for _, key, _, _ in self.settings),
            sorted(tap.file_key(name) for name, _, _, _ in tap._OPTIONS),
        )

    def test_every_option_has_a_comment(self) -> None:
        """Each setting is directly preceded by a comment naming its command-line option."""
        by_key = {tap.file_key(name): name for name, _, _, _ in tap._OPTIONS}
        for _, key, _, index in self.settings:
            comment: list[str] = []
            i = index - 1
            while i >= 0 and self.lines[i].startswith("# "):
                comment.insert(0, self.lines[i])
                i -= 1
            self.assertIn(f"--{by_key[key]}", "\n".join(comment), key)

    def test_uncommented_is_valid_with_defaults(self) -> None:
        """Uncommented, the file parses, the relay accepts it, and every fixed default shown is the real one."""
        uncommented = "\n".join(
            line[1:] if _SETTING.match(line) and line.startswith("#") else line for line in self.lines
        )
        table = tomllib.loads(uncommented)
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(uncommented)
        options = tap.Options(environ={})
        options.parseOptions(["--config", path])
        config = options.config
        for commented, key, _, _ in self.settings:
            value = table[key]
            self.assertEqual(getattr(config, key), tuple(value) if isinstance(value, list) else value, key)
        defaults = {
            field.name: field.default
            for field in attrs.fields(RelayConfig)
            if field.default is not attrs.NOTHING and getattr(field.default, "factory", None) is None
            and field.default is not None
        }
        shown = {
            key: tuple(table[key]) if isinstance(table[key], list) else table[key]
            for commented, key, _, _ in self.settings if commented
        }
        expected = {
            field: value for field, value in defaults.items()
            if any(f == field for _, _, f, _ in tap._OPTIONS)
        }
        # The service key and the Redis settings, commented out, show
        # placeholders: they have no default.
        placeholders = {"service_key", "redis_url", "redis_password", "redis_tls_ca"}
        self.assertEqual({k: v for k, v in shown.items() if k not in placeholders}, expected)
        self.assertEqual(set(shown) - set(expected), placeholders)

    def test_as_is_is_the_defaults(self) -> None:
        """Used as it is, the example sets only the certificate, key and host name; the rest is default."""
        options = tap.Options(environ={})
        options.parseOptions(["--config", EXAMPLE])
        self.assertEqual(
            {name: source for name, source in options.sources.items()},
            {"tls-cert": "file", "tls-key": "file", "hostname": "file"},
        )
        self.assertEqual(options.config.hostname, "smtp.example.com")
        self.assertIsNone(options.config.service_key)
