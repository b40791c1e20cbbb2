"""
Certificate reload without restart (L{poststack_relay.tls.ReloadableTLS},
L{poststack_relay.service.RelayService.reload_tls}, the SIGHUP handler of
L{poststack_relay.tap}).

Three layers: the reloader and the file poll on a memory reactor with a
Clock; the relay in this process on real loopback TLS with sessions open
across a reload; and C{twistd -n poststack-relay} as a real process that
gets a real SIGHUP.
"""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import time
from typing import Any, Callable, Optional

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL
from twisted.application.internet import TimerService
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase

from poststack_relay import RelayConfig, makeRelayService, tap
from poststack_relay.config import ConfigError
from poststack_relay.testing import MemoryEmailAPI, write_certificate
from poststack_relay.tls import ReloadableTLS
from tests.common.keys import FULL_KEY
from tests.common.relay import RelayTestCase
from tests.common.processes import ROOT, TWISTD, free_port, stop_process, wait_for_port
from tests.common.tls import client_context, make_chain, pump


def install(source_cert: str, source_key: Optional[str], cert: str, key: str) -> None:
    """
    Put new files in place the way ACME clients and C{install} do: write a
    temporary file next to the target, then rename it over the target.
    """
    for source, target in ((source_cert, cert), (source_key, key)):
        if source is None:
            continue
        temporary = target + ".new"
        shutil.copyfile(source, temporary)
        os.replace(temporary, target)


def write(path: str, data: bytes) -> None:
    temporary = path + ".new"
    with open(temporary, "wb") as f:
        f.write(data)
    os.replace(temporary, path)


def served(connection: SSL.Connection, version: Optional[int] = None) -> Optional[x509.Certificate]:
    """
    Complete a handshake with the server connection C{connection}; the
    certificate it presented, or C{None} if the handshake failed.
    """
    connection.set_accept_state()
    client = SSL.Connection(client_context(version), None)
    client.set_connect_state()
    client_error, server_error = pump(client, connection)
    if client_error is not None or server_error is not None:
        return None
    return client.get_peer_certificate(as_cryptography=True)


def events_named(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") == name]


class ReloadableTLSTests(SynchronousTestCase):
    """
    The reloader by itself, and the relay's file poll on a Clock.
    """

    def setUp(self) -> None:
        base = os.path.abspath(self.mktemp())
        self.a = make_chain(os.path.join(base, "a"))
        self.b = make_chain(os.path.join(base, "b"))
        live = os.path.join(base, "live")
        os.makedirs(live)
        self.cert = os.path.join(live, "fullchain.pem")
        self.key = os.path.join(live, "privkey.pem")
        install(self.a.cert, self.a.key, self.cert, self.key)

    def relay(self, interval: float, profile: str = "intermediate") -> tuple[Any, MemoryReactorClock]:
        reactor = MemoryReactorClock()
        config = RelayConfig(metrics_listen="off", 
            tls_cert=self.cert, tls_key=self.key, hostname="relay.test",
            tls_reload_interval=interval, tls_profile=profile,
        )
        service = makeRelayService(config, reactor, api=MemoryEmailAPI())
        service.startService()
        return service, reactor

    def serving(self, tls: Any) -> Optional[x509.Certificate]:
        return served(tls.serverConnectionForTLS(None))

    def test_new_connections_only(self) -> None:
        """After a reload a new connection presents the new certificate; a connection made before it still presents the old one."""
        tls = ReloadableTLS(self.cert, self.key)
        before = tls.serverConnectionForTLS(None)
        install(self.b.cert, self.b.key, self.cert, self.key)
        with capturedLogs() as events:
            self.assertTrue(tls.reload("test"))
        self.assertEqual(self.serving(tls), self.b.leaf)
        self.assertEqual(served(before), self.a.leaf)
        [event] = events_named(events, "tls_reloaded")
        self.assertEqual(event["subject"], "CN=localhost")
        self.assertEqual(event["serial"], format(self.b.leaf.serial_number, "x"))
        self.assertEqual(event["not_after"], self.b.leaf.not_valid_after_utc.isoformat())
        self.assertEqual(event["trigger"], "test")
        text = formatEvent(event)
        self.assertIn(format(self.b.leaf.serial_number, "x"), text)
        self.assertIn("chain of 2", text)

    def test_poll_picks_up_renewal(self) -> None:
        """With tls_reload_interval 30, renewed files are in use after the next check (30 s), logged once; unchanged files are not reloaded."""
        service, reactor = self.relay(30)
        install(self.b.cert, self.b.key, self.cert, self.key)
        with capturedLogs() as events:
            reactor.advance(29)
            self.assertEqual(self.serving(service.tls), self.a.leaf)
            reactor.advance(1)
            self.assertEqual(self.serving(service.tls), self.b.leaf)
            reactor.advance(600)
        self.assertEqual(len(events_named(events, "tls_reloaded")), 1)
        self.assertEqual(events_named(events, "tls_reload_failed"), [])

    def test_poll_sees_rewrite_in_place(self) -> None:
        """A file rewritten in place (same inode, later mtime) is noticed too."""
        service, reactor = self.relay(5)
        stat = os.stat(self.cert)
        for source, target in ((self.b.cert, self.cert), (self.b.key, self.key)):
            with open(source, "rb") as f, open(target, "wb") as out:
                out.write(f.read())
            os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))
        self.assertEqual(os.stat(self.cert).st_ino, stat.st_ino)
        reactor.advance(5)
        self.assertEqual(self.serving(service.tls), self.b.leaf)

    def test_interval_zero(self) -> None:
        """With tls_reload_interval 0 there is no poll: changed files wait for reload_tls() (what SIGHUP calls)."""
        service, reactor = self.relay(0)
        self.assertEqual([s for s in service if isinstance(s, TimerService)], [])
        install(self.b.cert, self.b.key, self.cert, self.key)
        reactor.advance(3600)
        self.assertEqual(self.serving(service.tls), self.a.leaf)
        self.assertTrue(service.reload_tls())
        self.assertEqual(self.serving(service.tls), self.b.leaf)

    def test_bad_file_keeps_old(self) -> None:
        """A garbage certificate keeps the old one in use and logs one tls_reload_failed with the one-line reason, once per bad version of the files."""
        service, reactor = self.relay(10)
        write(self.cert, b"-----BEGIN CERTIFICATE-----\nnot base64\n")
        with capturedLogs() as events:
            reactor.advance(10)
            self.assertEqual(self.serving(service.tls), self.a.leaf)
            reactor.advance(100)  # same bad files: not retried, not logged again
        [failed] = events_named(events, "tls_reload_failed")
        self.assertIn("holds no PEM certificate", failed["reason"])
        self.assertEqual(failed["old_serial"], format(self.a.leaf.serial_number, "x"))
        text = formatEvent(failed)
        self.assertNotIn("\n", text)
        self.assertIn("holds no PEM certificate", text)
        self.assertEqual(failed["log_level"].name, "error")
        # An explicit reload (SIGHUP) tries again and says so again.
        with capturedLogs() as events:
            self.assertFalse(service.reload_tls("SIGHUP"))
        self.assertEqual(len(events_named(events, "tls_reload_failed")), 1)
        # Good files end it.
        install(self.b.cert, self.b.key, self.cert, self.key)
        with capturedLogs() as events:
            reactor.advance(10)
        self.assertEqual(self.serving(service.tls), self.b.leaf)
        self.assertEqual(len(events_named(events, "tls_reloaded")), 1)

    def test_certificate_before_key(self) -> None:
        """Renewal seen half done (new certificate, old key): refused as a mismatch; the next check, with the new key, loads both."""
        service, reactor = self.relay(10)
        install(self.b.cert, None, self.cert, self.key)
        with capturedLogs() as events:
            reactor.advance(10)
        [failed] = events_named(events, "tls_reload_failed")
        self.assertIn("does not match", failed["reason"])
        self.assertEqual(self.serving(service.tls), self.a.leaf)
        install(self.b.key, None, self.key, self.key)
        reactor.advance(10)
        self.assertEqual(self.serving(service.tls), self.b.leaf)

    def test_missing_key(self) -> None:
        """A key file that is gone is a failed reload naming the file; the old certificate stays."""
        service, reactor = self.relay(0)
        os.remove(self.key)
        with capturedLogs() as events:
            self.assertFalse(service.reload_tls())
        [failed] = events_named(events, "tls_reload_failed")
        self.assertIn(f"cannot read TLS key {self.key!r}", failed["reason"])
        self.assertEqual(self.serving(service.tls), self.a.leaf)

    def test_unreadable_at_start_is_fatal(self) -> None:
        """Only a reload falls back to the old files: at start an unusable file is still a ConfigError."""
        write(self.cert, b"garbage")
        with self.assertRaises(ConfigError):
            ReloadableTLS(self.cert, self.key)

    def test_profile_kept(self) -> None:
        """A reload keeps the profile: with modern, the new certificate is still TLS 1.3 only."""
        service, reactor = self.relay(0, "modern")
        install(self.b.cert, self.b.key, self.cert, self.key)
        self.assertTrue(service.reload_tls())
        self.assertIsNone(served(service.tls.serverConnectionForTLS(None), SSL.TLS1_2_VERSION))
        self.assertEqual(served(service.tls.serverConnectionForTLS(None), SSL.TLS1_3_VERSION), self.b.leaf)


class SIGHUPHandlerTests(SynchronousTestCase):
    """
    L{tap.reload_tls_on_sighup} with a recording reactor.
    """

    def test_sighup_calls_reload_tls(self) -> None:
        """SIGHUP schedules service.reload_tls("SIGHUP") on the reactor thread (callFromThread)."""
        calls: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

        class Reactor:
            def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
                calls.append((f, args))

        class Service:
            def reload_tls(self, trigger: str = "") -> bool:
                return True

        service = Service()
        previous = signal.getsignal(signal.SIGHUP)
        self.addCleanup(signal.signal, signal.SIGHUP, previous)
        tap.reload_tls_on_sighup(Reactor(), service)
        os.kill(os.getpid(), signal.SIGHUP)
        deadline = time.monotonic() + 5
        while not calls and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertEqual(calls, [(service.reload_tls, ("SIGHUP",))])


class LoopbackReloadTests(RelayTestCase):
    """
    The relay in this process on 127.0.0.1 with the sandbox API; smtplib
    clients in threads; reload by L{RelayService.reload_tls}.
    """

    relay_options = {"tls_reload_interval": 0}

    def new_certificate(self) -> tuple[str, bytes]:
        """
        Make a different certificate for localhost and install it over the
        relay's files; return (a file holding it, its DER).
        """
        directory = os.path.abspath(self.mktemp())
        cert, key = write_certificate(directory)
        install(cert, key, self.cafile, self.keyfile)
        with open(cert, "rb") as f:
            return cert, x509.load_pem_x509_certificate(f.read()).public_bytes(Encoding.DER)

    def session(self, cafile: str) -> smtplib.SMTP_SSL:
        client = smtplib.SMTP_SSL("localhost", self.port, context=ssl.create_default_context(cafile=cafile), timeout=30)
        client.ehlo("client.test")
        return client

    async def test_open_session_untouched(self) -> None:
        """Session A stays open across a reload and still delivers with the old certificate; session B, opened after, gets (and verifies) the new one; a client trusting only the old one is now refused."""
        old = os.path.abspath(self.mktemp())
        shutil.copyfile(self.cafile, old)
        a = await self.in_thread(self.session, old)
        self.addCleanup(self.in_thread, a.close)
        a_der = a.sock.getpeercert(binary_form=True)
        new_file, new_der = self.new_certificate()
        self.assertNotEqual(a_der, new_der)
        self.assertTrue(self.relay.reload_tls())

        b = await self.in_thread(self.session, new_file)
        self.addCleanup(self.in_thread, b.close)
        self.assertEqual(b.sock.getpeercert(binary_form=True), new_der)
        with self.assertRaises(ssl.SSLCertVerificationError):
            await self.in_thread(self.session, old)

        def send_on_a() -> tuple[int, bytes]:
            a.login("poststack", FULL_KEY)
            a.mail("you@yourdomain.com")
            a.rcpt("user@example.com")
            return a.data(b"From: you@yourdomain.com\r\nTo: user@example.com\r\nSubject: across a reload\r\n\r\nhi\r\n")

        code, text = await self.in_thread(send_on_a)
        self.assertEqual(code, 250, text)
        self.assertEqual(a.sock.getpeercert(binary_form=True), a_der)
        self.assertEqual(len(self.stored()), 1)
        self.assertEqual((await self.in_thread(b.noop))[0], 250)

    async def test_bad_file_keeps_serving(self) -> None:
        """After a failed reload (garbage certificate file) new sessions still get the old certificate and can log in."""
        old = os.path.abspath(self.mktemp())
        shutil.copyfile(self.cafile, old)
        write(self.cafile, b"garbage\n")
        self.assertFalse(self.relay.reload_tls())

        def login() -> tuple[int, bytes]:
            with self.session(old) as client:
                return client.login("poststack", FULL_KEY)

        code, _ = await self.in_thread(login)
        self.assertEqual(code, 235)


class ProcessReloadTests(TestCase):
    """
    C{twistd -n poststack-relay} as a real process.  Its API URL is a
    closed port: nothing here reaches AUTH.
    """

    timeout = 120

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        self.a = make_chain(os.path.join(self.dir, "a"))
        self.b = make_chain(os.path.join(self.dir, "b"))
        self.cert = os.path.join(self.dir, "fullchain.pem")
        self.key = os.path.join(self.dir, "privkey.pem")
        install(self.a.cert, self.a.key, self.cert, self.key)
        self.log = os.path.join(self.dir, "relay.log")

    def start(self, *extra: str) -> tuple[subprocess.Popen[bytes], int]:
        port = free_port()
        log = open(self.log, "wb")
        proc = subprocess.Popen(
            [
                TWISTD, "-n", "--pidfile=", "poststack-relay",
                "--port", str(port), "--interface", "127.0.0.1",
                "--tls-cert", self.cert, "--tls-key", self.key,
                "--api-url", f"http://127.0.0.1:{free_port()}", "--hostname", "localhost",
                "--metrics-listen", "127.0.0.1:0",
                *extra,
            ],
            cwd=self.dir, env=dict(os.environ, PYTHONPATH=ROOT), stdout=log, stderr=subprocess.STDOUT,
        )

        def stop() -> None:
            stop_process(proc)
            log.close()

        self.addCleanup(stop)
        wait_for_port(port, proc)
        return proc, port

    def connect(self, port: int) -> ssl.SSLSocket:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        tls = context.wrap_socket(raw, server_hostname="localhost")
        self.addCleanup(tls.close)
        return tls

    def serving(self, port: int) -> x509.Certificate:
        with self.connect(port) as tls:
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            return x509.load_der_x509_certificate(der)

    def wait_until(self, condition: Callable[[], bool], what: str, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self.fail(f"relay exited with {proc.returncode} waiting for {what}: {self.log_text()}")
            if condition():
                return
            time.sleep(0.1)
        self.fail(f"timed out waiting for {what}: {self.log_text()}")

    def log_text(self) -> str:
        with open(self.log, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def test_sighup(self) -> None:
        """A real SIGHUP: new connections get the new certificate, an open session still answers, a bad file then keeps it and is logged, and SIGTERM still exits 0."""
        proc, port = self.start("--tls-reload-interval", "0")
        self.assertEqual(self.serving(port), self.a.leaf)
        open_session = self.connect(port)
        self.assertTrue(open_session.recv(1024).startswith(b"220 "))

        install(self.b.cert, self.b.key, self.cert, self.key)
        time.sleep(0.2)
        self.assertEqual(self.serving(port), self.a.leaf)  # no poll: nothing happens without the signal
        proc.send_signal(signal.SIGHUP)
        self.wait_until(lambda: self.serving(port) == self.b.leaf, "the new certificate", proc)
        self.assertIn("TLS certificate reloaded (SIGHUP): CN=localhost serial", self.log_text())

        open_session.sendall(b"NOOP\r\n")
        self.assertTrue(open_session.recv(1024).startswith(b"250 "))
        self.assertEqual(x509.load_der_x509_certificate(open_session.getpeercert(binary_form=True) or b""), self.a.leaf)

        write(self.key, b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
        proc.send_signal(signal.SIGHUP)
        self.wait_until(lambda: "TLS certificate reload (SIGHUP) failed" in self.log_text(), "the failure log", proc)
        self.assertIn("holds no usable unencrypted PEM private key", self.log_text())
        self.assertEqual(self.serving(port), self.b.leaf)

        proc.send_signal(signal.SIGTERM)
        self.assertEqual(proc.wait(timeout=20), 0)

    def test_poll(self) -> None:
        """With --tls-reload-interval 0.2 and no signal, renewed files are served within seconds."""
        proc, port = self.start("--tls-reload-interval", "0.2")
        self.assertEqual(self.serving(port), self.a.leaf)
        install(self.b.cert, self.b.key, self.cert, self.key)
        self.wait_until(lambda: self.serving(port) == self.b.leaf, "the new certificate", proc)
        self.assertIn("TLS certificate reloaded (files changed)", self.log_text())
