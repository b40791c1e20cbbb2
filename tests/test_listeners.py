"""
Several listeners from one relay process (C{--listen}, issue 7):
the spec grammar (L{poststack_relay.places.parse_listener},
L{RelayConfig.listeners}), its one-line errors through C{twistd}'s options
and the config file, the assembly on a memory reactor, and real loopback
listeners with real TLS, each serving its own certificate.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import tempfile
from typing import Any, Optional

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.task import deferLater
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.threads import deferToThread
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase

from poststack_relay import RelayConfig, makeRelayService, tap
from poststack_relay.config import ConfigError
from poststack_relay.places import ListenerConfig, parse_listener
from poststack_relay.proxyprotocol import ProxyProtocolFactory
from poststack_relay.service import RelayService
from poststack_relay.smtp import RelayFactory
from poststack_relay.testing import MemoryEmailAPI, write_certificate
from poststack_relay.implicittls import ImplicitTLSFactory
from tests.common.processes import free_port
from tests.common.systemd import notify_receiver, pending_datagrams

MAIN = ListenerConfig(port=587, tls_cert="/main.pem", tls_key="/main.key")


def leaf(path: str) -> bytes:
    """The DER of the first certificate in the PEM file C{path}."""
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificate(f.read()).public_bytes(Encoding.DER)


def combined(directory: str) -> str:
    """
    A self-signed certificate for localhost with its key in the same PEM
    file (the key then needs no tls-key=); return the file's path.
    """
    cert, key = write_certificate(directory)
    path = os.path.join(directory, "combined.pem")
    with open(path, "wb") as out:
        for part in (cert, key):
            with open(part, "rb") as f:
                out.write(f.read())
    return path


def context_of(factory: Any) -> Any:
    """The C{SSL.Context} a new connection of a TLS wrapping factory gets."""
    return factory.connectionCreator.getContext()


def events_named(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") == name]


class SpecTests(SynchronousTestCase):
    """
    The C{listen} spec grammar and what a listener inherits.
    """

    def test_valid(self) -> None:
        """Each valid form parses to its interface, port, socket, PROXY setting and certificate."""
        cases: list[tuple[str, tuple[str, int, str, bool, str, Optional[str]], str]] = [
            ("465", ("", 465, "", False, "/main.pem", "/main.key"), "*:465"),
            ("127.0.0.1:2465", ("127.0.0.1", 2465, "", False, "/main.pem", "/main.key"), "127.0.0.1:2465"),
            ("[::1]:465", ("::1", 465, "", False, "/main.pem", "/main.key"), "[::1]:465"),
            ("systemd:smtps", ("", 587, "smtps", False, "/main.pem", "/main.key"), "systemd:smtps"),
            ("465,proxy-protocol", ("", 465, "", True, "/main.pem", "/main.key"), "*:465"),
            ("465,proxy-protocol=yes", ("", 465, "", True, "/main.pem", "/main.key"), "*:465"),
            ("465,tls-cert=/b.pem", ("", 465, "", False, "/b.pem", None), "*:465"),
            (
                "10.0.0.1:465,tls-cert=/b.pem,tls-key=/b.key,proxy-protocol",
                ("10.0.0.1", 465, "", True, "/b.pem", "/b.key"),
                "10.0.0.1:465",
            ),
            ("465, proxy-protocol , tls-cert = /b.pem", ("", 465, "", True, "/b.pem", None), "*:465"),
            ("0", ("", 0, "", False, "/main.pem", "/main.key"), "*:0"),
        ]
        for spec, expected, label in cases:
            listener = parse_listener(spec, MAIN)
            self.assertEqual(
                (
                    listener.interface,
                    listener.port,
                    listener.systemd_socket,
                    listener.proxy_protocol,
                    listener.tls_cert,
                    listener.tls_key,
                ),
                expected,
                spec,
            )
            self.assertEqual(listener.label, label, spec)
            self.assertEqual(listener.spec, spec)

    def test_inherits_proxy_protocol(self) -> None:
        """Without the option a listener takes the main listener's proxy_protocol; proxy-protocol=no turns it off."""
        main = ListenerConfig(port=587, proxy_protocol=True, tls_cert="/main.pem")
        self.assertTrue(parse_listener("465", main).proxy_protocol)
        self.assertFalse(parse_listener("465,proxy-protocol=no", main).proxy_protocol)
        self.assertFalse(parse_listener("465", MAIN).proxy_protocol)

    def test_own_key_not_inherited(self) -> None:
        """With tls-cert alone, the key comes from that file, never the main key."""
        self.assertIsNone(parse_listener("465,tls-cert=/b.pem", MAIN).tls_key)

    def test_invalid(self) -> None:
        """Each bad spec is one ConfigError line starting 'listen <spec>:' with the reason."""
        cases = [
            ("", "empty spec"),
            (",proxy-protocol", "empty spec"),
            ("bogus", "port must be a number, not 'bogus'"),
            ("465,bogus", "unknown option 'bogus' (proxy-protocol, tls-cert=, tls-key=)"),
            ("465,tls-cert", "unknown option 'tls-cert'"),
            ("465,", "empty option"),
            ("70000", "port must be between 0 and 65535, not 70000"),
            ("-1", "port must be a number, not '-1'"),
            ("127.0.0.1:", "port must be a number, not ''"),
            (":465", "empty interface"),
            ("[::1:465", "missing ']'"),
            ("[::1]465", "want [INTERFACE]:PORT after the brackets"),
            ("[]:465", "empty interface in brackets"),
            ("::1:465", "put an IPv6 interface in brackets"),
            ("systemd:", "systemd socket name must be"),
            ("465,proxy-protocol=maybe", "proxy-protocol must be yes or no, not 'maybe'"),
            ("465,tls-cert=", "tls-cert= needs a path"),
            ("465,tls-key=/b.key", "tls-key= needs tls-cert="),
            ("465,proxy-protocol,proxy-protocol=no", "option 'proxy-protocol' given twice"),
            ("465,tls-cert=/a,tls-cert=/b", "option 'tls-cert' given twice"),
        ]
        for spec, reason in cases:
            with self.assertRaises(ConfigError, msg=spec) as caught:
                parse_listener(spec, MAIN)
            message = str(caught.exception)
            self.assertTrue(message.startswith(f"listen {spec!r}: "), message)
            self.assertIn(reason, message)
            self.assertNotIn("\n", message)

    def test_listeners_main_first(self) -> None:
        """RelayConfig.listeners() is the main listener, then one per spec in order."""
        config = RelayConfig(metrics_listen="off", 
            tls_cert="/a.pem", port=2587, interface="127.0.0.1",
            listen=("465", "[::1]:465,tls-cert=/b.pem"),
        )
        main, first, second = config.listeners()
        self.assertEqual(main, config.main_listener())
        self.assertEqual((main.label, main.spec, main.tls_cert), ("127.0.0.1:2587", "", "/a.pem"))
        self.assertEqual((first.label, first.tls_cert), ("*:465", "/a.pem"))
        self.assertEqual((second.label, second.tls_cert), ("[::1]:465", "/b.pem"))
        self.assertEqual(RelayConfig(metrics_listen="off", tls_cert="/a.pem").listeners(), (RelayConfig(metrics_listen="off", tls_cert="/a.pem").main_listener(),))
        self.assertEqual(
            RelayConfig(metrics_listen="off", tls_cert="/a.pem", systemd_socket="smtps").main_listener().label, "systemd:smtps"
        )

    def test_config_validates_specs(self) -> None:
        """RelayConfig refuses a bad spec at construction, naming the spec."""
        with self.assertRaises(ConfigError) as caught:
            RelayConfig(metrics_listen="off", tls_cert="/a.pem", listen=("465", "465,bogus"))
        self.assertTrue(str(caught.exception).startswith("listen '465,bogus': unknown option"))

    def test_duplicates(self) -> None:
        """Two listeners on one interface and port (the main one included), or one systemd socket twice, are refused; port 0 may repeat."""
        cases = [
            ({"port": 587}, ("587",), "listen '587': the same address as the main listener *:587"),
            ({"port": 587}, ("0.0.0.0:587",), "the same address as the main listener *:587"),
            ({"port": 587, "interface": "127.0.0.1"}, ("127.0.0.1:587,proxy-protocol",), "127.0.0.1:587"),
            ({}, ("465", "465,tls-cert=/b.pem"), "listen '465,tls-cert=/b.pem': the same address as the listener *:465"),
            ({"systemd_socket": "smtps"}, ("systemd:smtps",), "the same address as the main listener systemd:smtps"),
            ({"interface": "::1", "port": 465}, ("[::1]:465",), "[::1]:465"),
        ]
        for fields, specs, message in cases:
            with self.assertRaises(ConfigError, msg=specs) as caught:
                RelayConfig(metrics_listen="off", tls_cert="/a.pem", listen=specs, **fields)  # type: ignore[arg-type]
            self.assertIn(message, str(caught.exception))
            self.assertTrue(str(caught.exception).startswith("listen "))
        # Not duplicates: port 0 (each gets its own free port), other interfaces, other sockets.
        RelayConfig(metrics_listen="off", tls_cert="/a.pem", port=0, interface="127.0.0.1", listen=("127.0.0.1:0", "127.0.0.1:0"))
        RelayConfig(metrics_listen="off", tls_cert="/a.pem", port=465, listen=("127.0.0.1:465", "[::1]:465", "systemd:submissions"))
        RelayConfig(metrics_listen="off", tls_cert="/a.pem", systemd_socket="smtps", listen=("587", "systemd:submission"))


class OptionTests(SynchronousTestCase):
    """
    C{--listen} through C{twistd}'s options, the environment and a TOML file.
    """

    def setUp(self) -> None:
        self.cert, self.key = write_certificate(os.path.abspath(self.mktemp()))

    def test_command_line(self) -> None:
        """--listen is repeatable and reaches the listeners."""
        options = tap.Options(environ={})
        options.parseOptions(
            ["--tls-cert", self.cert, "--listen", "465", "--listen", "127.0.0.1:2465,proxy-protocol"]
        )
        self.assertEqual(
            [l.label for l in options.config.listeners()], ["*:587", "*:465", "127.0.0.1:2465"]
        )
        self.assertTrue(options.config.listeners()[2].proxy_protocol)

    def test_environment(self) -> None:
        """POSTSTACK_RELAY_LISTEN holds specs separated by white space."""
        options = tap.Options(environ={"POSTSTACK_RELAY_LISTEN": "465  [::1]:2465,tls-cert=/b.pem"})
        options.parseOptions(["--tls-cert", self.cert])
        self.assertEqual(options.config.listen, ("465", "[::1]:2465,tls-cert=/b.pem"))

    def test_bad_spec_is_one_line(self) -> None:
        """--listen bogus ends the command with one line naming the spec."""
        options = tap.Options(environ={})
        with self.assertRaises(SystemExit) as caught:
            options.parseOptions(["--tls-cert", self.cert, "--listen", "bogus"])
        self.assertEqual(
            str(caught.exception.code),
            "poststack-relay: error: listen 'bogus': port must be a number, not 'bogus'",
        )

    def test_duplicate_of_main_is_one_line(self) -> None:
        """A --listen on the main port is one line too."""
        options = tap.Options(environ={})
        with self.assertRaises(SystemExit) as caught:
            options.parseOptions(["--tls-cert", self.cert, "--port", "2587", "--listen", "2587"])
        self.assertEqual(
            str(caught.exception.code),
            "poststack-relay: error: listen '2587': the same address as the main listener *:2587",
        )

    def test_bad_spec_in_file(self) -> None:
        """A bad spec from the TOML file is one line naming the file."""
        path = os.path.join(os.path.abspath(self.mktemp()))
        with open(path, "w") as f:
            f.write(f'tls_cert = "{self.cert}"\nlisten = ["465", "465,bogus"]\n')
        options = tap.Options(environ={})
        with self.assertRaises(SystemExit) as caught:
            options.parseOptions(["--config", path])
        self.assertEqual(
            str(caught.exception.code),
            f"poststack-relay: error: config file {path!r}: listen '465,bogus': unknown option 'bogus' "
            "(proxy-protocol, tls-cert=, tls-key=)",
        )

    def test_file_listen(self) -> None:
        """listen = [...] in the TOML file adds the listeners."""
        path = os.path.join(os.path.abspath(self.mktemp()))
        with open(path, "w") as f:
            f.write(f'tls_cert = "{self.cert}"\nlisten = ["465", "127.0.0.1:2525,proxy-protocol"]\n')
        options = tap.Options(environ={})
        options.parseOptions(["--config", path])
        self.assertEqual([l.label for l in options.config.listeners()], ["*:587", "*:465", "127.0.0.1:2525"])


class AssemblyTests(SynchronousTestCase):
    """
    The listeners on a memory reactor.
    """

    def setUp(self) -> None:
        base = os.path.abspath(self.mktemp())
        self.cert, self.key = write_certificate(os.path.join(base, "a"))
        self.other, self.other_key = write_certificate(os.path.join(base, "b"))
        self.both = combined(os.path.join(base, "c"))

    def relay(self, reactor: Any, *listen: str, **kw: Any) -> RelayService:
        config = RelayConfig(metrics_listen="off", 
            tls_cert=self.cert, tls_key=self.key, hostname="relay.test", port=2587,
            interface="127.0.0.1", listen=listen, **kw,
        )
        return makeRelayService(config, reactor, api=MemoryEmailAPI())

    def test_one_factory_each_its_wrapping(self) -> None:
        """Each listener binds its address with its own wrapping (PROXY or not, its certificate) around the one RelayFactory."""
        reactor = MemoryReactorClock()
        service = self.relay(reactor, "2465", f"[::1]:2466,proxy-protocol,tls-cert={self.both}")
        service.startService()
        [(p1, f1, _, i1), (p2, f2, _, i2), (p3, f3, _, i3)] = reactor.tcpServers
        self.assertEqual([(p1, i1), (p2, i2), (p3, i3)], [(2587, "127.0.0.1"), (2465, ""), (2466, "::1")])
        self.assertIsInstance(f1, ImplicitTLSFactory)
        self.assertIsInstance(f2, ImplicitTLSFactory)
        self.assertIsInstance(f3, ProxyProtocolFactory)
        tls3 = f3.wrappedFactory
        self.assertIsInstance(tls3, ImplicitTLSFactory)
        self.assertIsInstance(service.factory, RelayFactory)
        for tls_factory in (f1, f2, tls3):
            self.assertIs(tls_factory.wrappedFactory, service.factory)
        # The second listener shares the main ReloadableTLS; the third has its own.
        main, own = service.certificates
        self.assertIs(main, service.tls)
        self.assertIs(context_of(f1), main.getContext())
        self.assertIs(context_of(f2), main.getContext())
        self.assertIs(context_of(tls3), own.getContext())
        self.assertIsNot(main.getContext(), own.getContext())
        self.assertEqual((own.cert_path, own.key_path, own.profile), (self.both, None, "intermediate"))
        self.assertIs(service.listener, service.listeners[0])
        self.assertEqual(len(service.listeners), 3)
        ports = self.successResultOf(service.ports())
        self.assertEqual([p.getHost().port for p in ports], [2587, 2465, 2466])
        self.assertIs(self.successResultOf(service.port()), ports[0])

    def test_same_files_share(self) -> None:
        """A listener naming the main files, and two listeners naming the same other files, share one ReloadableTLS each."""
        service = self.relay(
            MemoryReactorClock(),
            f"2465,tls-cert={self.cert},tls-key={self.key}",
            f"2466,tls-cert={self.both}",
            f"2467,tls-cert={self.both}",
        )
        self.assertEqual(len(service.certificates), 2)
        self.assertIs(service.certificates[0], service.tls)

    def test_profile_applies(self) -> None:
        """A listener's own certificate gets the relay's TLS profile."""
        service = self.relay(MemoryReactorClock(), f"2465,tls-cert={self.both}", tls_profile="modern")
        self.assertEqual([tls.profile for tls in service.certificates], ["modern", "modern"])

    def test_no_proxy_inherited(self) -> None:
        """With proxy_protocol on, a listener inherits it unless its spec says proxy-protocol=no."""
        reactor = MemoryReactorClock()
        self.relay(reactor, "2465", "2466,proxy-protocol=no", proxy_protocol=True).startService()
        factories = [f for _, f, _, _ in reactor.tcpServers]
        self.assertEqual(
            [type(f) for f in factories], [ProxyProtocolFactory, ProxyProtocolFactory, ImplicitTLSFactory]
        )

    def test_bad_own_certificate(self) -> None:
        """A listener's unreadable certificate is a ConfigError naming the spec, before anything listens."""
        reactor = MemoryReactorClock()
        with self.assertRaises(ConfigError) as caught:
            self.relay(reactor, "2465,tls-cert=/nonexistent.pem")
        self.assertEqual(
            str(caught.exception),
            "listen '2465,tls-cert=/nonexistent.pem': cannot read TLS certificate '/nonexistent.pem': "
            "No such file or directory",
        )
        self.assertEqual(reactor.tcpServers, [])

    def test_missing_systemd_socket(self) -> None:
        """A systemd:NAME listener whose socket systemd did not pass is a ConfigError naming the spec."""
        with self.assertRaises(ConfigError) as caught:
            self.relay(MemoryReactorClock(), "systemd:nosuchsocket")
        self.assertTrue(
            str(caught.exception).startswith("listen 'systemd:nosuchsocket': systemd-socket 'nosuchsocket'"),
            caught.exception,
        )

    def test_logs(self) -> None:
        """One relay_configured naming every listener, one listener_configured each, one tls_configured per distinct certificate."""
        with capturedLogs() as events:
            self.relay(MemoryReactorClock(), "2465", f"2466,proxy-protocol,tls-cert={self.both}")
        [relay] = events_named(events, "relay_configured")
        self.assertEqual(relay["listeners"], ["127.0.0.1:2587", "*:2465", "*:2466"])
        self.assertIn(
            "configured: SMTP on 127.0.0.1:2587 (implicit TLS), *:2465 (implicit TLS), "
            "*:2466 (implicit TLS behind PROXY protocol); API",
            formatEvent(relay),
        )
        listeners = events_named(events, "listener_configured")
        self.assertEqual(
            [(e["listener"], e["proxy"], e["tls_cert"], e["own_certificate"]) for e in listeners],
            [
                ("127.0.0.1:2587", False, self.cert, False),
                ("*:2465", False, self.cert, False),
                ("*:2466", True, self.both, True),
            ],
        )
        tls = events_named(events, "tls_configured")
        self.assertEqual(
            [(e["tls_cert"], e["listeners"]) for e in tls],
            [(self.cert, ["127.0.0.1:2587", "*:2465"]), (self.both, ["*:2466"])],
        )
        self.assertIn("; for *:2466", formatEvent(tls[1]))

    def test_single_listener_log_unchanged(self) -> None:
        """Without listen specs the start-up line reads as before."""
        with capturedLogs() as events:
            self.relay(MemoryReactorClock())
        [relay] = events_named(events, "relay_configured")
        self.assertTrue(
            formatEvent(relay).startswith("poststack-relay configured: SMTP on 127.0.0.1:2587 (implicit TLS); API "),
            formatEvent(relay),
        )
        [tls] = events_named(events, "tls_configured")
        self.assertNotIn("; for", formatEvent(tls))

    def test_reload_reaches_every_certificate(self) -> None:
        """reload_tls() reloads each distinct certificate once; one bad file makes it False but the others still reload."""
        service = self.relay(MemoryReactorClock(), f"2465,tls-cert={self.other},tls-key={self.other_key}")
        with capturedLogs() as events:
            self.assertTrue(service.reload_tls("test"))
        self.assertEqual(
            sorted(e["serial"] for e in events_named(events, "tls_reloaded")),
            sorted(tls.current.describe()["serial"] for tls in service.certificates),
        )
        with open(self.cert, "wb") as f:
            f.write(b"garbage")
        with capturedLogs() as events:
            self.assertFalse(service.reload_tls("test"))
        self.assertEqual(len(events_named(events, "tls_reload_failed")), 1)
        self.assertEqual(len(events_named(events, "tls_reloaded")), 1)

    def test_poll_checks_every_certificate(self) -> None:
        """The file poll notices a renewed certificate of a second listener."""
        reactor = MemoryReactorClock()
        service = self.relay(reactor, f"2465,tls-cert={self.other},tls-key={self.other_key}", tls_reload_interval=10)
        service.startService()
        before = service.certificates[1].current
        replacement, replacement_key = write_certificate(os.path.abspath(self.mktemp()))
        for source, target in ((replacement, self.other), (replacement_key, self.other_key)):
            shutil.copyfile(source, target + ".new")
            os.replace(target + ".new", target)
        main_before = service.tls.current
        reactor.advance(10)
        self.assertIsNot(service.certificates[1].current, before)
        self.assertEqual(
            service.certificates[1].current.certificate.public_bytes(Encoding.DER), leaf(replacement)
        )
        self.assertIs(service.tls.current, main_before)

    def test_stop_closes_all_before_drain(self) -> None:
        """stopService stops every listener before the drain waits for an open session."""
        reactor = MemoryReactorClock()
        service = self.relay(reactor, "2465", "2466,proxy-protocol")
        service.startService()
        session = service.factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 1))
        session.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 1)))
        d = service.stopService()
        self.assertEqual([listener.running for listener in service.listeners], [False, False, False])
        self.assertNoResult(d)
        session.connectionLost(None)
        self.successResultOf(d)

    def test_readiness_after_all(self) -> None:
        """READY=1 names every listener's address."""
        directory = tempfile.mkdtemp(prefix="poststack-notify-")
        self.addCleanup(shutil.rmtree, directory, True)
        sock = notify_receiver(directory)
        self.addCleanup(sock.close)
        old = os.environ.get("NOTIFY_SOCKET")
        os.environ["NOTIFY_SOCKET"] = sock.getsockname()
        self.addCleanup(
            lambda: os.environ.pop("NOTIFY_SOCKET", None) if old is None else os.environ.update(NOTIFY_SOCKET=old)
        )
        reactor = MemoryReactorClock()
        service = self.relay(reactor, "[::1]:2465")
        service.startService()
        self.assertEqual(
            pending_datagrams(sock), [b"READY=1\nSTATUS=listening on 0.0.0.0:2587, [::1]:2465"]  # MemoryReactor's addresses
        )


def tls_client(port: int, header: bytes = b"") -> tuple[ssl.SSLSocket, bytes, bytes]:
    """
    Connect to 127.0.0.1:C{port}, send C{header} in clear, then TLS
    (without verification); return the socket, the server certificate's
    DER and the greeting line.  Runs in a thread.
    """
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        if header:
            raw.sendall(header)
        tls = context.wrap_socket(raw, server_hostname="localhost")
    except BaseException:
        raw.close()
        raise
    der = tls.getpeercert(binary_form=True)
    assert der is not None
    greeting = b""
    while not greeting.endswith(b"\r\n") and len(greeting) < 1024:
        chunk = tls.recv(1024)
        if not chunk:
            break
        greeting += chunk
    return tls, der, greeting


def refused(port: int) -> bool:
    """Whether nothing listens on 127.0.0.1:C{port} any more."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


class LoopbackTests(TestCase):
    """
    A relay on 127.0.0.1 with three listeners: the main one, one with its
    own certificate, one behind the PROXY protocol; real TLS clients in
    threads.
    """

    timeout = 60

    def setUp(self) -> Deferred[None]:
        base = os.path.abspath(self.mktemp())
        self.dir = base
        self.cert, self.key = write_certificate(os.path.join(base, "a"))
        self.other, self.other_key = write_certificate(os.path.join(base, "b"))
        config = RelayConfig(metrics_listen="off", 
            tls_cert=self.cert, tls_key=self.key, port=0, interface="127.0.0.1", hostname="localhost",
            tls_reload_interval=0, drain_timeout=1.0,
            listen=(
                f"127.0.0.1:0,tls-cert={self.other},tls-key={self.other_key}",
                "127.0.0.1:0,proxy-protocol",
            ),
        )
        self.relay = makeRelayService(config, reactor, api=MemoryEmailAPI())
        self.relay.startService()
        self.addCleanup(self.relay.stopService)
        return Deferred.fromCoroutine(self._ports())

    async def _ports(self) -> None:
        ports = await self.relay.ports()
        self.main, self.own, self.proxied = (p.getHost().port for p in ports)

    async def connect(self, port: int, header: bytes = b"") -> tuple[bytes, bytes]:
        tls, der, greeting = await deferToThread(tls_client, port, header)
        self.addCleanup(tls.close)
        return der, greeting

    async def test_each_port_its_certificate(self) -> None:
        """The main port serves the main certificate, the other port its own; both greet with 220."""
        main_der, main_greeting = await self.connect(self.main)
        own_der, own_greeting = await self.connect(self.own)
        self.assertEqual(main_der, leaf(self.cert))
        self.assertEqual(own_der, leaf(self.other))
        self.assertNotEqual(main_der, own_der)
        self.assertTrue(main_greeting.startswith(b"220 localhost "), main_greeting)
        self.assertTrue(own_greeting.startswith(b"220 localhost "), own_greeting)

    async def test_proxied_and_direct(self) -> None:
        """Behind a PROXY v1 header the session's client is the header's source; on the plain port it is the real peer; both sessions count in the one factory."""
        der, greeting = await self.connect(
            self.proxied, b"PROXY TCP4 203.0.113.7 192.0.2.1 56324 465\r\n"
        )
        self.assertEqual(der, leaf(self.cert))  # inherited certificate
        self.assertTrue(greeting.startswith(b"220 localhost "), greeting)
        _, greeting = await self.connect(self.main)
        self.assertTrue(greeting.startswith(b"220 localhost "), greeting)
        self.assertEqual(sorted(s.client for s in self.relay.factory.sessions), ["127.0.0.1", "203.0.113.7"])

    async def test_proxied_port_needs_header(self) -> None:
        """A direct TLS client on the proxied port is dropped, while the same client works on the plain port."""
        with self.assertRaises((ssl.SSLError, OSError)):
            await self.connect(self.proxied)
        _, greeting = await self.connect(self.own)
        self.assertTrue(greeting.startswith(b"220 "))

    async def test_reload_both(self) -> None:
        """After both certificates' files are replaced, reload_tls() is True and new connections on each port get its new certificate."""
        new_main = write_certificate(os.path.join(self.dir, "a2"))
        new_own = write_certificate(os.path.join(self.dir, "b2"))
        for (source_cert, source_key), (cert, key) in (
            (new_main, (self.cert, self.key)),
            (new_own, (self.other, self.other_key)),
        ):
            for source, target in ((source_cert, cert), (source_key, key)):
                shutil.copyfile(source, target + ".new")
                os.replace(target + ".new", target)
        self.assertTrue(self.relay.reload_tls("test"))
        main_der, _ = await self.connect(self.main)
        own_der, _ = await self.connect(self.own)
        proxied_der, _ = await self.connect(self.proxied, b"PROXY TCP4 203.0.113.7 192.0.2.1 1 465\r\n")
        self.assertEqual(main_der, leaf(new_main[0]))
        self.assertEqual(proxied_der, leaf(new_main[0]))
        self.assertEqual(own_der, leaf(new_own[0]))

    async def test_stop_closes_every_port(self) -> None:
        """stopService closes all three ports."""
        ports = (self.main, self.own, self.proxied)
        self.assertEqual([refused(p) for p in ports], [False, False, False])
        await self.relay.stopService()
        self.assertEqual([refused(p) for p in ports], [True, True, True])


class BindFailureTests(TestCase):
    """
    A second listener whose port is taken stops start-up.
    """

    timeout = 30

    async def taken_port(self, start: str) -> None:
        """
        Start a relay whose second listener's port is taken with its
        method C{start}: it raises CannotListenError, and the main
        listener, bound first, is closed again.
        """
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        main = free_port()
        cert, key = write_certificate(os.path.abspath(self.mktemp()))
        config = RelayConfig(metrics_listen="off", 
            tls_cert=cert, tls_key=key, port=main, interface="127.0.0.1", hostname="localhost",
            tls_reload_interval=0, listen=(f"127.0.0.1:{port}",),
        )
        relay = makeRelayService(config, reactor, api=MemoryEmailAPI())
        self.assertRaises(CannotListenError, getattr(relay, start))
        self.assertFalse(relay.running)
        for _ in range(100):  # the port closes on a later reactor turn
            if refused(main):
                break
            await deferLater(reactor, 0.01, lambda: None)
        self.assertTrue(refused(main))
        self.assertFalse(relay.listener.running)

    async def test_taken_port(self) -> None:
        """startService raises CannotListenError, and the main listener, bound first, is closed again."""
        await self.taken_port("startService")

    async def test_taken_port_privileged(self) -> None:
        """The same when twistd binds in privilegedStartService (before dropping privileges)."""
        await self.taken_port("privilegedStartService")


class CheckConfigListenerTests(SynchronousTestCase):
    """
    C{--check-config} loads the certificate of every listener, not only the main one.
    """

    def test_bad_listener_certificate(self) -> None:
        """An unreadable certificate of an extra listener ends --check-config with one line naming its spec."""
        from poststack_relay.tap import Options
        from poststack_relay.testing import write_certificate

        directory = self.mktemp()
        os.makedirs(directory)
        cert, key = write_certificate(directory)
        missing = os.path.join(directory, "missing.pem")
        options = Options(environ={})
        with self.assertRaises(SystemExit) as caught:
            options.parseOptions(
                ["--tls-cert", cert, "--tls-key", key, "--listen", f"127.0.0.1:0,tls-cert={missing}",
                 "--check-config"]
            )
        message = str(caught.exception.code)
        self.assertTrue(message.startswith("poststack-relay: error: listen '127.0.0.1:0,tls-cert="), message)
        self.assertIn("missing.pem", message)
        self.assertNotIn("\n", message)
