# -*- test-case-name: tests.test_etc -*-
"""
The deployment examples in C{etc/}: the systemd unit passes
C{systemd-analyze verify} and keeps secrets off its command line, and the
environment file example names every relay option with its true default.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import attrs

from poststack_relay import tap
from poststack_relay.config import RelayConfig
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.common.running import COMMAND

ETC = Path(__file__).resolve().parent.parent / "etc"
UNIT = ETC / "poststack-relay.service"
ENV_EXAMPLE = ETC / "poststack-relay.env.example"

# Options whose values are secrets: never in the unit, only in the env file.
SECRET_OPTIONS = ("service-key",)

# An assignment line of the env example, commented out (a default) or not.
_ASSIGNMENT = re.compile(r"^(#?)([A-Z][A-Z0-9_]*)=(.*)$")


def _unit_directives(text: str) -> list[tuple[str, str, str]]:
    """
    The (section, key, value) of each directive of a unit file, in order,
    with duplicates kept (systemd allows repeated keys).
    """
    directives: list[tuple[str, str, str]] = []
    section = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", ";")):
            continue
        if stripped.startswith("[") and stripped.endswith("]"):
            section = stripped[1:-1]
            continue
        key, sep, value = stripped.partition("=")
        if sep:
            directives.append((section, key.strip(), value.strip()))
    return directives


def _env_assignments(text: str) -> list[tuple[bool, str, str, int]]:
    """
    The assignments of the env example: (commented out, name, value, line index).
    """
    found = []
    for index, line in enumerate(text.splitlines()):
        match = _ASSIGNMENT.match(line)
        if match:
            found.append((match.group(1) == "#", match.group(2), match.group(3), index))
    return found


def _option_names() -> list[str]:
    """
    The long names of every C{twistd poststack-relay} option.
    """
    return [name for name, _, _, _ in tap._OPTIONS]


class UnitVerifyTests(SynchronousTestCase):
    """
    C{systemd-analyze verify} accepts the example unit.
    """

    def setUp(self) -> None:
        self.analyze = shutil.which("systemd-analyze")
        if self.analyze is None:
            raise SkipTest("systemd-analyze is not installed")
        self.directory = Path(tempfile.mkdtemp(prefix="poststack-etc-"))
        self.addCleanup(shutil.rmtree, self.directory, True)

    def _verify(self, text: str) -> tuple[int, list[str]]:
        """
        Verify C{text} as C{poststack-relay.service} with its ExecStart
        binary and its user replaced by ones this host has; return the exit
        status and the stderr lines that are about this unit.
        """
        binary = COMMAND if COMMAND.is_file() else Path(sys.executable)
        text, count = re.subn(
            r"(?m)^ExecStart=/opt/poststack-relay/venv/bin/poststack-relay$", f"ExecStart={binary}", text
        )
        self.assertEqual(count, 1, "the unit's ExecStart line has changed: adapt this test")
        text = re.sub(r"(?m)^User=.*$", "User=root", text)
        text = re.sub(r"(?m)^Group=.*$", "Group=root", text)
        unit = self.directory / UNIT.name
        unit.write_text(text)
        result = subprocess.run(
            [str(self.analyze), "verify", str(unit)],
            cwd=self.directory,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        ours = [line for line in result.stderr.splitlines() if UNIT.name in line]
        return result.returncode, ours

    def test_unit_verifies(self) -> None:
        """The unit passes systemd-analyze verify with no complaint about its directives."""
        status, complaints = self._verify(UNIT.read_text())
        self.assertEqual((status, complaints), (0, []))

    def test_credentials_alternative_verifies(self) -> None:
        """The commented-out LoadCredential= alternative also verifies once uncommented."""
        text = UNIT.read_text()
        text, count = re.subn(r"(?m)^#((?:LoadCredential|Environment)=)", r"\1", text)
        self.assertEqual(count, 3)
        status, complaints = self._verify(text)
        self.assertEqual((status, complaints), (0, []))

    def test_verify_catches_mistakes(self) -> None:
        """The check above is real: an unknown or malformed directive is reported."""
        text = UNIT.read_text().replace(
            "NoNewPrivileges=yes\n", "NoNewPrivileges=yes\nNoNewPrivilege=yes\nProtectSystem=sometimes\n"
        )
        _, complaints = self._verify(text)
        self.assertEqual(len(complaints), 2, complaints)


class UnitContentTests(SynchronousTestCase):
    """
    The example unit runs the relay the way the deployment guide says.
    """

    def setUp(self) -> None:
        self.text = UNIT.read_text()
        self.directives = _unit_directives(self.text)
        self.service = {key: value for section, key, value in self.directives if section == "Service"}

    def test_header_says_example(self) -> None:
        """The unit opens with a comment saying it is an example to adapt."""
        first = self.text.splitlines()[0]
        self.assertTrue(first.startswith("#"), first)
        self.assertIn("EXAMPLE", first)
        self.assertIn("adapt", first)

    def test_runs_the_command(self) -> None:
        """ExecStart runs the venv's poststack-relay command (the foreground, no pidfile), Type=notify."""
        self.assertEqual(self.service["ExecStart"], "/opt/poststack-relay/venv/bin/poststack-relay")
        self.assertEqual(self.service["Type"], "notify")
        self.assertEqual(self.service["NotifyAccess"], "main")
        self.assertEqual(self.service["EnvironmentFile"], "/etc/poststack-relay/relay.env")
        self.assertEqual((self.service["User"], self.service["Group"]), ("poststack-relay", "poststack-relay"))

    def test_hardening(self) -> None:
        """The unit keeps its privileges to binding a low port and sandboxes the rest."""
        expected = {
            "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
            "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
            "NoNewPrivileges": "yes",
            "ProtectSystem": "strict",
            "ProtectHome": "yes",
            "PrivateTmp": "yes",
            "PrivateDevices": "yes",
            "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
            "Restart": "on-failure",
            "RestartSec": "5",
            "KillSignal": "SIGTERM",
            "TimeoutStopSec": "60",
        }
        self.assertEqual({key: self.service.get(key) for key in expected}, expected)
        # pyOpenSSL's cffi callbacks need W+X memory: see the comment in the unit.
        self.assertNotIn("MemoryDenyWriteExecute", self.service)

    def test_no_secret_in_unit(self) -> None:
        """No directive of the unit carries a secret: no key value, no secret option, no secret variable."""
        for section, key, value in self.directives:
            where = f"[{section}] {key}={value}"
            self.assertIsNone(re.search(r"\bsk_(live|test)_", value), where)
            for option in SECRET_OPTIONS:
                self.assertNotIn(f"--{option}", value, where)
                self.assertNotIn(tap.env_name(option), value, where)
        # Nor in the commented-out lines a reader might uncomment.
        self.assertIsNone(re.search(r"\bsk_(live|test)_", self.text))
        for option in SECRET_OPTIONS:
            self.assertNotIn(f"{tap.env_name(option)}=", self.text)
            self.assertNotIn(f"--{option}", self.text)


class EnvExampleTests(SynchronousTestCase):
    """
    C{etc/poststack-relay.env.example} documents every option.
    """

    def setUp(self) -> None:
        self.text = ENV_EXAMPLE.read_text()
        self.lines = self.text.splitlines()
        self.assignments = _env_assignments(self.text)

    def test_every_option_once(self) -> None:
        """Each option's POSTSTACK_RELAY_* name is assigned exactly once, and no other name is."""
        names = [name for _, name, _, _ in self.assignments]
        self.assertEqual(sorted(names), sorted(tap.env_name(option) for option in _option_names()))

    def test_no_unknown_relay_variable(self) -> None:
        """Every POSTSTACK_RELAY_ name mentioned anywhere, comments included, is a real option."""
        known = {tap.env_name(option) for option in _option_names()}
        mentioned = set(re.findall(r"POSTSTACK_RELAY_[A-Z0-9_]+", self.text))
        self.assertEqual(mentioned - known, set())

    def test_every_option_has_a_comment(self) -> None:
        """Each assignment is directly preceded by a comment naming its command-line option."""
        by_env = {tap.env_name(option): option for option in _option_names()}
        for _, name, _, index in self.assignments:
            comment: list[str] = []
            i = index - 1
            while i >= 0 and self.lines[i].startswith("# "):
                comment.insert(0, self.lines[i])
                i -= 1
            self.assertTrue(comment, f"{name} has no comment above it")
            self.assertIn(f"--{by_env[name]}", "\n".join(comment), name)

    def test_commented_values_are_the_defaults(self) -> None:
        """Every commented-out line shows RelayConfig's real default, and every option with a fixed default is commented out."""
        defaults = {
            field.name: field.default
            for field in attrs.fields(RelayConfig)
            # attrs.Factory defaults (the host name) have no fixed value.
            if field.default is not attrs.NOTHING and getattr(field.default, "factory", None) is None
        }
        shown: dict[str, object] = {}
        for option, convert, field, _ in tap._OPTIONS:
            for commented, name, value, _ in self.assignments:
                if name == tap.env_name(option) and commented:
                    shown[field] = convert(value) if value or convert is tap._listen_specs else ""
        fixed = {field: value for field, value in defaults.items() if value is not None}
        options_fields = {field for _, _, field, _ in tap._OPTIONS}
        # The Redis settings, commented out, show placeholders: they have no default.
        placeholders = {"redis_url", "redis_password", "redis_tls_ca"}
        self.assertEqual(set(shown) & {f for f in defaults if defaults[f] is None}, placeholders)
        shown = {f: v for f, v in shown.items() if f not in placeholders}
        self.assertEqual(shown, {f: v for f, v in fixed.items() if f in options_fields})

    def test_example_is_accepted_by_the_relay(self) -> None:
        """The example, read as systemd would, configures the relay with the values it shows."""
        environ = {name: value for commented, name, value, _ in self.assignments if not commented}
        for commented, name, value, _ in self.assignments:
            if commented:
                environ[name] = value
        options = tap.Options(environ=environ)
        options.parseOptions([])
        config = options.config
        self.assertEqual(config.tls_cert, environ["POSTSTACK_RELAY_TLS_CERT"])
        self.assertEqual(config.tls_key, environ["POSTSTACK_RELAY_TLS_KEY"])
        self.assertEqual(config.hostname, environ["POSTSTACK_RELAY_HOSTNAME"])
        self.assertEqual(config.service_key, environ["POSTSTACK_RELAY_SERVICE_KEY"])
        self.assertEqual(config.port, 587)

    def test_format_is_plain(self) -> None:
        """Every line is blank, a comment, or NAME=value without spaces around '=' or quotes."""
        for line in self.lines:
            if not line or line.startswith("#"):
                continue
            self.assertRegex(line, r"^POSTSTACK_RELAY_[A-Z0-9_]+=[^\s\"']\S*$")
