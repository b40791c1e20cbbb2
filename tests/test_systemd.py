"""
Tests for the systemd integration (L{poststack_relay.systemd}): readiness
notification over a real datagram socket, socket activation through a real
C{twistd} process given a listening socket as systemd would, and the
example socket units in C{etc/}.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from poststack_relay import ConfigError, RelayConfig, makeRelayService, tap
from poststack_relay.systemd import SystemdNotifier, socketEndpoint
from poststack_relay.testing import write_certificate
from tests.common.processes import ROOT, TWISTD, stop_process
from tests.common.running import COMMAND, COMMAND_LINE
from tests.common.systemd import LAUNCHER, notify_receiver, pending_datagrams

ETC = Path(ROOT) / "etc"
SOCKET_UNIT = ETC / "poststack-relay.socket"
SOCKET_SERVICE = ETC / "poststack-relay-socket.service"

class NotifierTests(SynchronousTestCase):
    """
    L{SystemdNotifier} speaks the sd_notify datagram protocol.
    """

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="poststack-notify-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.sock = notify_receiver(self.dir)
        self.addCleanup(self.sock.close)

    def test_path_socket(self) -> None:
        """A state is sent as one datagram to the path in NOTIFY_SOCKET."""
        notifier = SystemdNotifier({"NOTIFY_SOCKET": self.sock.getsockname()})
        self.assertTrue(notifier.notify("READY=1\nSTATUS=x"))
        self.assertEqual(pending_datagrams(self.sock), [b"READY=1\nSTATUS=x"])

    def test_abstract_socket(self) -> None:
        """An @name NOTIFY_SOCKET is an abstract socket."""
        name = f"poststack-test-{os.getpid()}-{time.monotonic_ns()}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind("\0" + name)
            sock.settimeout(0)
            self.assertTrue(SystemdNotifier({"NOTIFY_SOCKET": "@" + name}).notify("READY=1"))
            self.assertEqual(pending_datagrams(sock), [b"READY=1"])

    def test_no_notify_socket(self) -> None:
        """Without NOTIFY_SOCKET nothing is sent."""
        self.assertFalse(SystemdNotifier({}).notify("READY=1"))
        self.assertEqual(pending_datagrams(self.sock), [])

    def test_send_failure_is_not_raised(self) -> None:
        """A NOTIFY_SOCKET nobody listens on is reported, not raised."""
        missing = os.path.join(self.dir, "missing")
        self.assertFalse(SystemdNotifier({"NOTIFY_SOCKET": missing}).notify("READY=1"))
        self.flushLoggedErrors()


class ReadinessServiceTests(SynchronousTestCase):
    """
    The relay service sends READY=1 once bound and STOPPING=1 when it stops.
    """

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="poststack-notify-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.sock = notify_receiver(self.dir)
        self.addCleanup(self.sock.close)
        old = os.environ.get("NOTIFY_SOCKET")
        os.environ["NOTIFY_SOCKET"] = self.sock.getsockname()

        def restore() -> None:
            if old is None:
                os.environ.pop("NOTIFY_SOCKET", None)
            else:
                os.environ["NOTIFY_SOCKET"] = old

        self.addCleanup(restore)
        cert, key = write_certificate(self.dir)
        self.config = RelayConfig(metrics_listen="off", 
            tls_cert=cert, tls_key=key, hostname="relay.test", port=2587, interface="127.0.0.1"
        )

    def test_ready_then_stopping(self) -> None:
        """READY=1 with the bound address after the port fires; STOPPING=1 as stopping begins."""
        reactor = MemoryReactorClock()
        service = makeRelayService(self.config, reactor)
        self.assertEqual(pending_datagrams(self.sock), [])
        service.startService()
        host = self.successResultOf(service.port()).getHost()
        self.assertEqual(
            pending_datagrams(self.sock), [f"READY=1\nSTATUS=listening on {host.host}:{host.port}".encode()]
        )
        d = service.stopService()
        self.assertEqual(pending_datagrams(self.sock), [b"STOPPING=1\nSTATUS=stopping"])
        self.successResultOf(d)

    def test_nothing_without_notify_socket(self) -> None:
        """Without NOTIFY_SOCKET the relay starts and stops without sending anything."""
        del os.environ["NOTIFY_SOCKET"]
        service = makeRelayService(self.config, MemoryReactorClock())
        service.startService()
        self.successResultOf(service.stopService())
        self.assertEqual(pending_datagrams(self.sock), [])


class SocketEndpointTests(SynchronousTestCase):
    """
    L{socketEndpoint} finds the socket systemd passed by name.
    """

    def test_not_activated(self) -> None:
        """Without a socket of that name from systemd, the option is one clear ConfigError at start-up."""
        with self.assertRaises(ConfigError) as caught:
            socketEndpoint(MemoryReactorClock(), "smtps")
        self.assertTrue(
            str(caught.exception).startswith(
                "systemd-socket 'smtps': systemd passed no socket of that name"
            ),
            caught.exception,
        )

    def test_option(self) -> None:
        """--systemd-socket sets the config; unset by default."""
        options = tap.Options(environ={})
        options.parseOptions(["--tls-cert", "c.pem", "--systemd-socket", "smtps"])
        self.assertEqual(options.config.systemd_socket, "smtps")
        self.assertEqual(RelayConfig(metrics_listen="off", tls_cert="c.pem").systemd_socket, "")


class SocketActivationProcessTests(SynchronousTestCase):
    """
    C{poststack-relay --systemd-socket smtps} (the unit's command) and
    C{twistd -n poststack-relay --systemd-socket smtps} run as systemd would
    run them: the listening socket on fd 3 with LISTEN_* set, NOTIFY_SOCKET
    pointing at a datagram socket of ours.
    """

    def test_banner_through_passed_socket(self) -> None:
        """The command does implicit TLS on the passed IPv4 socket, and notifies READY=1 and STOPPING=1."""
        self.run_activated(socket.AF_INET, "127.0.0.1", "127.0.0.1", COMMAND_LINE)

    def test_ipv6_socket(self) -> None:
        """An IPv6 socket (what ListenStream=587 makes) is adopted as IPv6, under twistd too."""
        try:
            socket.socket(socket.AF_INET6, socket.SOCK_STREAM).bind(("::1", 0))
        except OSError:
            raise SkipTest("no IPv6 loopback")
        self.run_activated(socket.AF_INET6, "::1", "[::1]", [TWISTD, "-n", "--pidfile=", "poststack-relay"])

    def run_activated(self, family: int, address: str, shown: str, command: list[str]) -> None:
        """Run the relay (C{command}) on a passed listening socket of C{family} bound to C{address}."""
        directory = tempfile.mkdtemp(prefix="poststack-activate-")
        self.addCleanup(shutil.rmtree, directory, True)
        cert, key = write_certificate(directory)
        notify = notify_receiver(directory)
        self.addCleanup(notify.close)
        listening = socket.socket(family, socket.SOCK_STREAM)
        self.addCleanup(listening.close)
        listening.bind((address, 0))
        listening.listen(16)
        port = listening.getsockname()[1]
        environ = dict(
            os.environ,
            PYTHONPATH=ROOT,
            NOTIFY_SOCKET=notify.getsockname(),
            POSTSTACK_RELAY_TLS_CERT=cert,
            POSTSTACK_RELAY_TLS_KEY=key,
            POSTSTACK_RELAY_HOSTNAME="localhost",
            POSTSTACK_RELAY_DRAIN_TIMEOUT="1",
            POSTSTACK_RELAY_METRICS_LISTEN="127.0.0.1:0",
        )
        log = open(os.path.join(directory, "relay.log"), "wb")
        self.addCleanup(log.close)
        proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, str(listening.fileno()), *command, "--systemd-socket", "smtps"],
            cwd=directory, env=environ, stdout=log, stderr=subprocess.STDOUT,
            pass_fds=(listening.fileno(),),
        )
        self.addCleanup(stop_process, proc)
        listening.close()  # only the relay holds it now

        messages: list[bytes] = []
        end = time.monotonic() + 30
        while not messages and time.monotonic() < end and proc.poll() is None:
            time.sleep(0.1)
            messages = pending_datagrams(notify)
        with open(os.path.join(directory, "relay.log"), "rb") as f:
            output = f.read().decode(errors="replace")
        self.assertEqual(messages, [f"READY=1\nSTATUS=listening on {shown}:{port}".encode()], output)

        context = ssl.create_default_context(cafile=cert)
        with socket.create_connection((address, port), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                banner = tls.recv(1024)
        self.assertTrue(banner.startswith(b"220 localhost "), banner)

        proc.send_signal(signal.SIGTERM)
        self.assertEqual(proc.wait(timeout=30), 0)
        self.assertEqual(pending_datagrams(notify), [b"STOPPING=1\nSTATUS=stopping"])


class SocketUnitTests(SynchronousTestCase):
    """
    The socket-activated units in C{etc/} verify and fit together.
    """

    def test_units_fit_together(self) -> None:
        """The socket names the service and the descriptor name the service passes to --systemd-socket."""
        socket_text = SOCKET_UNIT.read_text()
        service_text = SOCKET_SERVICE.read_text()
        self.assertRegex(socket_text, r"(?m)^ListenStream=587$")
        self.assertRegex(socket_text, r"(?m)^FileDescriptorName=smtps$")
        self.assertRegex(socket_text, rf"(?m)^Service={SOCKET_SERVICE.name}$")
        self.assertRegex(service_text, r"(?m)^ExecStart=\S*/poststack-relay --systemd-socket smtps$")
        self.assertRegex(service_text, r"(?m)^Type=notify$")
        self.assertRegex(service_text, r"(?m)^NotifyAccess=main$")
        self.assertNotIn("CAP_NET_BIND_SERVICE", service_text)
        self.assertIsNone(re.search(r"sk_(live|test)_|--service-key|SERVICE_KEY=", service_text))

    def test_systemd_analyze_verify(self) -> None:
        """systemd-analyze verify accepts the socket and its service, with no complaint about either."""
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise SkipTest("systemd-analyze is not installed")
        directory = Path(tempfile.mkdtemp(prefix="poststack-etc-"))
        self.addCleanup(shutil.rmtree, directory, True)
        binary = COMMAND if COMMAND.is_file() else Path(sys.executable)
        text, count = re.subn(
            r"(?m)^ExecStart=/opt/poststack-relay/venv/bin/poststack-relay ",
            f"ExecStart={binary} ",
            SOCKET_SERVICE.read_text(),
        )
        self.assertEqual(count, 1)
        text = re.sub(r"(?m)^User=.*$", "User=root", text)
        text = re.sub(r"(?m)^Group=.*$", "Group=root", text)
        (directory / SOCKET_SERVICE.name).write_text(text)
        shutil.copy(SOCKET_UNIT, directory / SOCKET_UNIT.name)
        result = subprocess.run(
            [analyze, "verify", str(directory / SOCKET_UNIT.name), str(directory / SOCKET_SERVICE.name)],
            cwd=directory, capture_output=True, text=True, timeout=120, check=False,
        )
        ours = [
            line for line in result.stderr.splitlines()
            if SOCKET_UNIT.name in line or SOCKET_SERVICE.name in line
        ]
        self.assertEqual((result.returncode, ours), (0, []), result.stderr)
