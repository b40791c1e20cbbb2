"""
The relay's TLS against Mozilla's server profiles (L{poststack_relay.tls}).

Three layers:

  - C{ProfileTests}: in-memory handshakes (pyOpenSSL over memory BIOs, no
    sockets) that try every protocol version, every cipher suite and a set of
    key exchange groups, one at a time, against the server context: a small
    scanner that needs nothing but pyOpenSSL.
  - C{LoopbackTests}: the relay on a real loopback port, a real client
    (stdlib C{ssl}) that trusts only the test root and so must receive the
    intermediate certificate from the relay, for an ECDSA and an RSA
    certificate.
  - C{ScannerTests}: sslyze, a real TLS scanner, run against
    C{twistd -n poststack-relay} on loopback, with its Mozilla compliance
    checker.  sslyze pins C{cryptography<47} while pyOpenSSL 26 needs
    C{>=49}, so it lives in its own virtualenv (C{.venv-sslyze}, see
    L{find_sslyze}) and runs as a command, as a scanner would.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import ssl
import subprocess
import sys
from typing import Any, Optional

import attrs
from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from poststack_relay import RelayConfig, makeRelayService
from poststack_relay.testing import MemoryEmailAPI
from poststack_relay.tls import TLS12_CIPHERS, TLSOptions, load_certificate_options
from tests.common.processes import ROOT, TWISTD, free_port, wait_for_port
from tests.common.tls import Chain, client_context, handshake, make_chain, pem, pump

# The scanner's Python: POSTSTACK_SSLYZE, else the repository's .venv-sslyze.
SSLYZE_ENV = "POSTSTACK_SSLYZE"
SSLYZE_VENV = os.path.join(ROOT, ".venv-sslyze")

ECDSA_TLS12 = {
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
}
RSA_TLS12 = {
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-RSA-CHACHA20-POLY1305",
}
TLS13 = {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"}
# Mozilla's TLS 1.2 list for the intermediate profile, without its optional DHE suites.
MOZILLA_INTERMEDIATE_TLS12 = ECDSA_TLS12 | RSA_TLS12


def _has_group(group: bytes) -> bool:
    """
    Whether the OpenSSL under pyOpenSSL knows a key exchange group.
    """
    from OpenSSL._util import lib

    return bool(lib.SSL_CTX_set1_curves_list(SSL.Context(SSL.TLS_METHOD)._context, group) == 1)


def _all_tls12_cipher_names() -> list[str]:
    """
    Every TLS 1.2-and-older cipher suite the local OpenSSL can offer.
    """
    probe = SSL.Connection(client_context(), None)
    return [name for name in probe.get_cipher_list() if not name.startswith("TLS_")]


class ProfileTests(SynchronousTestCase):
    """
    The server context, probed one version, cipher and group at a time.
    """

    def setUp(self) -> None:
        base = os.path.abspath(self.mktemp())
        self.chains = {kind: make_chain(os.path.join(base, kind), kind) for kind in ("ec", "rsa")}

    def options(self, kind: str = "ec", profile: str = "intermediate") -> TLSOptions:
        chain = self.chains[kind]
        return load_certificate_options(chain.cert, chain.key, profile)

    def test_versions_intermediate(self) -> None:
        """Intermediate: TLS 1.0 and 1.1 are refused as an unsupported protocol, 1.2 and 1.3 are accepted."""
        options = self.options()
        for version in (SSL.TLS1_VERSION, SSL.TLS1_1_VERSION):
            result = handshake(options, client_context(version))
            self.assertFalse(result.ok)
            self.assertIn("unsupported protocol", result.server_reason())
        for version, name in ((SSL.TLS1_2_VERSION, "TLSv1.2"), (SSL.TLS1_3_VERSION, "TLSv1.3")):
            result = handshake(options, client_context(version))
            self.assertTrue(result.ok, result)
            self.assertEqual(result.server.get_protocol_version_name(), name)

    def test_versions_modern(self) -> None:
        """Modern: only TLS 1.3; a TLS 1.2 client is refused as an unsupported protocol."""
        options = self.options(profile="modern")
        for version in (SSL.TLS1_VERSION, SSL.TLS1_1_VERSION, SSL.TLS1_2_VERSION):
            result = handshake(options, client_context(version))
            self.assertFalse(result.ok)
            self.assertIn("unsupported protocol", result.server_reason())
        result = handshake(options, client_context(SSL.TLS1_3_VERSION))
        self.assertTrue(result.ok, result)
        self.assertEqual(result.server.get_protocol_version_name(), "TLSv1.3")

    def test_tls12_cipher_suites(self) -> None:
        """Offered one at a time, of all TLS 1.2 suites only ECDHE with AES-GCM or ChaCha20 matching the key type is accepted."""
        self.assertEqual(set(TLS12_CIPHERS.split(":")), MOZILLA_INTERMEDIATE_TLS12)
        names = _all_tls12_cipher_names()
        self.assertGreater(len(names), 40)  # the probe really offers the weak ones too
        for kind, expected in (("ec", ECDSA_TLS12), ("rsa", RSA_TLS12)):
            options = self.options(kind)
            accepted = set()
            for name in names:
                result = handshake(options, client_context(SSL.TLS1_2_VERSION, ciphers=name.encode() + b":@SECLEVEL=0"))
                if result.ok:
                    self.assertEqual(result.server.get_cipher_name(), name)
                    accepted.add(name)
            self.assertEqual(accepted, expected, kind)

    def test_tls13_cipher_suites(self) -> None:
        """Offered one at a time, the TLS 1.3 suites accepted are exactly AES-128-GCM, AES-256-GCM and ChaCha20 (no CCM)."""
        options = self.options()
        accepted = set()
        for name in sorted(TLS13 | {"TLS_AES_128_CCM_SHA256", "TLS_AES_128_CCM_8_SHA256"}):
            result = handshake(options, client_context(SSL.TLS1_3_VERSION, tls13=name.encode()))
            if result.ok:
                accepted.add(result.server.get_cipher_name())
        self.assertEqual(accepted, TLS13)

    def test_groups(self) -> None:
        """Key exchange uses X25519, P-256 or P-384 (TLS 1.2 and 1.3) and X25519MLKEM768 (TLS 1.3, if OpenSSL has it); X448, P-521 and finite-field groups are refused."""
        # RSA for TLS 1.2: there a P-256 ECDSA certificate also needs P-256
        # among the client's groups (RFC 8422), which would blur the test.
        for version, options in ((SSL.TLS1_2_VERSION, self.options("rsa")), (SSL.TLS1_3_VERSION, self.options())):
            for group, names in ((b"X25519", {"x25519"}), (b"P-256", {"prime256v1", "secp256r1"}), (b"P-384", {"secp384r1"})):
                result = handshake(options, client_context(version, groups=group))
                self.assertTrue(result.ok, (version, group, result))
                self.assertIn(result.server.get_group_name(), names)
            if version == SSL.TLS1_3_VERSION and _has_group(b"X25519MLKEM768"):
                result = handshake(options, client_context(version, groups=b"X25519MLKEM768"))
                self.assertTrue(result.ok, result)
                self.assertEqual(result.server.get_group_name(), "X25519MLKEM768")
            for group in (b"X448", b"P-521", b"ffdhe2048"):
                if version == SSL.TLS1_2_VERSION and group == b"ffdhe2048":
                    continue  # not an ECDHE group in TLS 1.2: the suites need ECDHE anyway
                result = handshake(options, client_context(version, groups=group))
                self.assertFalse(result.ok, (version, group))

    def test_client_cipher_order_wins(self) -> None:
        """As in Mozilla's profiles the client's order decides: ChaCha20 first gets ChaCha20, AES first gets AES."""
        options = self.options()
        for first, second in (
            ("ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-ECDSA-AES128-GCM-SHA256"),
            ("ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305"),
        ):
            result = handshake(options, client_context(SSL.TLS1_2_VERSION, ciphers=f"{first}:{second}".encode()))
            self.assertEqual(result.server.get_cipher_name(), first)
        for first, second in (
            ("TLS_CHACHA20_POLY1305_SHA256", "TLS_AES_256_GCM_SHA384"),
            ("TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"),
        ):
            result = handshake(options, client_context(SSL.TLS1_3_VERSION, tls13=f"{first}:{second}".encode()))
            self.assertEqual(result.server.get_cipher_name(), first)

    def test_context_options(self) -> None:
        """No compression, no renegotiation, no stateless tickets, and no server cipher preference, in both profiles."""
        for profile in ("intermediate", "modern"):
            options = self.options(profile=profile).getContext().set_options(0)
            self.assertTrue(options & SSL.OP_NO_COMPRESSION)
            self.assertTrue(options & SSL.OP_NO_RENEGOTIATION)
            self.assertTrue(options & SSL.OP_NO_TICKET)
            self.assertFalse(options & SSL.OP_CIPHER_SERVER_PREFERENCE)

    def test_no_session_resumption(self) -> None:
        """A client offering the session of its last handshake gets a full handshake (no server cache); with a cache it would resume."""
        from OpenSSL._util import lib

        def reused(options: Any) -> bool:
            context = client_context(SSL.TLS1_2_VERSION)
            first = handshake(options, context)
            self.assertTrue(first.ok, first)
            server_conn = options.serverConnectionForTLS(None)
            server_conn.set_accept_state()
            client_conn = SSL.Connection(context, None)
            client_conn.set_connect_state()
            client_conn.set_session(first.client.get_session())
            self.assertEqual(pump(client_conn, server_conn), (None, None))
            return bool(lib.SSL_session_reused(server_conn._ssl))

        self.assertFalse(reused(self.options()))
        # The same check sees a resumption when the server caches sessions.
        caching = self.options()
        caching.getContext().set_session_cache_mode(SSL.SESS_CACHE_SERVER)
        self.assertTrue(reused(caching))

    def test_full_chain_served(self) -> None:
        """Leaf and intermediate are both sent, in order, and a client trusting only the root verifies them (ECDSA and RSA)."""
        for kind, chain in self.chains.items():
            for version in (SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION):
                result = handshake(self.options(kind), client_context(version, cafile=chain.ca))
                self.assertTrue(result.ok, (kind, version, result))
                served = result.client.get_peer_cert_chain(as_cryptography=True)
                self.assertEqual(served, [chain.leaf, chain.intermediate])

    def test_unknown_profile(self) -> None:
        """An unknown profile name is a one-line ConfigError, not a default."""
        from poststack_relay.config import ConfigError

        chain = self.chains["ec"]
        with self.assertRaises(ConfigError) as ctx:
            load_certificate_options(chain.cert, chain.key, "old")
        self.assertIn("tls-profile", str(ctx.exception))


# -- a real client over loopback ------------------------------------------


class LoopbackTests(TestCase):
    """
    The relay in this process on 127.0.0.1, a stdlib client in a thread.
    """

    timeout = 60

    async def serve(self, kind: str, profile: str = "intermediate") -> tuple[Chain, int]:
        chain = make_chain(os.path.abspath(self.mktemp()), kind)
        config = RelayConfig(metrics_listen="off", 
            tls_cert=chain.cert,
            tls_key=chain.key,
            port=0,
            interface="127.0.0.1",
            hostname="localhost",
            tls_profile=profile,
            tls_reload_interval=0,
        )
        relay = makeRelayService(config, reactor, api=MemoryEmailAPI())
        relay.startService()
        self.addCleanup(relay.stopService)
        port = await relay.port()
        return chain, port.getHost().port

    @staticmethod
    def greet(port: int, cafile: str, maximum: Optional[ssl.TLSVersion] = None) -> tuple[str, str, bytes]:
        context = ssl.create_default_context(cafile=cafile)  # verifies chain and host name
        if maximum is not None:
            context.maximum_version = maximum
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                banner = tls.recv(1024)
                version, cipher = tls.version() or "", (tls.cipher() or ("",))[0]
                return version, cipher, banner

    async def test_ecdsa_and_rsa(self) -> None:
        """A verifying stdlib client that trusts only the root completes TLS 1.3 and 1.2 and reads the 220 banner, with ECDSA and with RSA 2048."""
        for kind, expected in (("ec", ECDSA_TLS12), ("rsa", RSA_TLS12)):
            chain, port = await self.serve(kind)
            version, cipher, banner = await deferToThread(self.greet, port, chain.ca)
            self.assertEqual(version, "TLSv1.3")
            self.assertIn(cipher, TLS13)
            self.assertTrue(banner.startswith(b"220 localhost "), banner)
            version, cipher, banner = await deferToThread(self.greet, port, chain.ca, ssl.TLSVersion.TLSv1_2)
            self.assertEqual(version, "TLSv1.2")
            self.assertIn(cipher, expected)
            self.assertTrue(banner.startswith(b"220 "), banner)

    async def test_modern_refuses_tls12_client(self) -> None:
        """With the modern profile a TLS 1.2-only stdlib client fails the handshake; a TLS 1.3 one succeeds."""
        chain, port = await self.serve("ec", "modern")
        with self.assertRaises(ssl.SSLError):
            await deferToThread(self.greet, port, chain.ca, ssl.TLSVersion.TLSv1_2)
        version, _, _ = await deferToThread(self.greet, port, chain.ca)
        self.assertEqual(version, "TLSv1.3")


# -- sslyze ------------------------------------------------------------------


def find_sslyze() -> Optional[list[str]]:
    """
    The command that runs sslyze: C{$POSTSTACK_SSLYZE -m sslyze} (a Python
    with sslyze installed), else C{.venv-sslyze/bin/python -m sslyze}, else
    this Python if it can import sslyze; C{None} if none of them.
    """
    candidates = [os.environ.get(SSLYZE_ENV, ""), os.path.join(SSLYZE_VENV, "bin", "python")]
    for python in candidates:
        if python and os.access(python, os.X_OK):
            return [python, "-m", "sslyze"]
    if importlib.util.find_spec("sslyze") is not None:
        return [sys.executable, "-m", "sslyze"]
    return None


SSLYZE_MISSING = (
    "sslyze not found: create .venv-sslyze (python3 -m venv .venv-sslyze && "
    ".venv-sslyze/bin/pip install sslyze==6.3.1) or point POSTSTACK_SSLYZE at a Python that has it"
)


@attrs.frozen
class Scan:
    """
    One sslyze run: its exit status, console output, and JSON results for
    the one server scanned.
    """

    status: int
    output: str
    result: dict[str, Any]

    def accepted(self, field: str) -> set[str]:
        """
        IANA names of the suites accepted for one C{*_cipher_suites} scan.
        """
        attempt = self.result["scan_result"][field]
        assert attempt["status"] == "COMPLETED", attempt
        return {s["cipher_suite"]["name"] for s in attempt["result"]["accepted_cipher_suites"]}

    def outcome(self, field: str) -> dict[str, Any]:
        attempt = self.result["scan_result"][field]
        assert attempt["status"] == "COMPLETED", attempt
        result: dict[str, Any] = attempt["result"]
        return result


class ScannerTests(TestCase):
    """
    sslyze against C{twistd -n poststack-relay} with a certificate chain made
    for the test.  The relay's API URL points at a closed port: a TLS scan
    never reaches SMTP AUTH, so the API is never called.
    """

    timeout = 120

    def setUp(self) -> None:
        self.sslyze = find_sslyze()
        if self.sslyze is None:
            raise SkipTest(SSLYZE_MISSING)
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def relay(self, chain: Chain, *extra: str) -> int:
        port = free_port()
        log = open(os.path.join(self.dir, f"relay-{port}.log"), "wb")
        proc = subprocess.Popen(
            [
                TWISTD, "-n", "--pidfile=", "poststack-relay",
                "--port", str(port), "--interface", "127.0.0.1",
                "--tls-cert", chain.cert, "--tls-key", chain.key,
                "--api-url", f"http://127.0.0.1:{free_port()}", "--hostname", "localhost",
                "--metrics-listen", "127.0.0.1:0",
                # A scan makes hundreds of connections a second from one
                # address: far past the default connection rate.
                "--max-connection-rate-per-ip", "0",
                *extra,
            ],
            cwd=self.dir, env=dict(os.environ, PYTHONPATH=ROOT), stdout=log, stderr=subprocess.STDOUT,
        )

        def stop() -> None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
            log.close()

        self.addCleanup(stop)
        wait_for_port(port, proc)
        return port

    def scan(self, port: int, chain: Chain, profile: str) -> Scan:
        assert self.sslyze is not None
        out = os.path.join(self.dir, f"sslyze-{port}-{profile}.json")
        done = subprocess.run(
            [
                *self.sslyze,
                f"--mozilla_config={profile}",
                "--certinfo_ca_file", chain.ca,
                "--json_out", out,
                f"localhost:{port}{{127.0.0.1}}",
            ],
            capture_output=True, timeout=100, cwd=self.dir,
        )
        output = done.stdout.decode("utf-8", "replace") + done.stderr.decode("utf-8", "replace")
        with open(out) as f:
            [result] = json.load(f)["server_scan_results"]
        self.assertEqual(result["connectivity_status"], "COMPLETED", output)
        self.assertEqual(result["scan_status"], "COMPLETED", output)
        return Scan(done.returncode, output, result)

    def assertCompliant(self, scan: Scan, port: int) -> None:
        self.assertIn(f"localhost:{port}: OK - Compliant.", scan.output, scan.output)
        self.assertEqual(scan.status, 0, scan.output)

    def assertCommonFindings(self, scan: Scan, chain: Chain) -> None:
        """
        What holds for both profiles: no SSL 2/3, TLS 1.0/1.1; the TLS 1.3
        suites; the groups; the full chain, trusted through the test root;
        no compression; EMS; TLS_FALLBACK_SCSV; no client renegotiation.
        """
        for field in ("ssl_2_0_cipher_suites", "ssl_3_0_cipher_suites", "tls_1_0_cipher_suites", "tls_1_1_cipher_suites"):
            self.assertEqual(scan.accepted(field), set(), field)
        self.assertEqual(scan.accepted("tls_1_3_cipher_suites"), TLS13)
        curves = {c["name"] for c in scan.outcome("elliptic_curves")["supported_curves"]}
        self.assertEqual(curves, {"X25519", "secp256r1", "secp384r1"})
        [deployment] = scan.outcome("certificate_info")["certificate_deployments"]
        served = [c["as_pem"].encode() for c in deployment["received_certificate_chain"]]
        self.assertEqual(served, [pem(chain.leaf), pem(chain.intermediate)])
        trusted = {
            r["trust_store"]["name"] for r in deployment["path_validation_results"] if r["was_validation_successful"]
        }
        self.assertEqual(trusted, {"Supplied CA file"})
        self.assertFalse(scan.outcome("tls_compression")["supports_compression"])
        self.assertTrue(scan.outcome("tls_extended_master_secret")["supports_ems_extension"])
        self.assertTrue(scan.outcome("tls_fallback_scsv")["supports_fallback_scsv"])
        renegotiation = scan.outcome("session_renegotiation")
        self.assertTrue(renegotiation["supports_secure_renegotiation"])
        self.assertFalse(renegotiation["is_vulnerable_to_client_renegotiation_dos"])
        self.assertEqual(renegotiation["client_renegotiations_success_count"], 0)

    def test_intermediate_ecdsa(self) -> None:
        """sslyze finds the default (intermediate) relay with an ECDSA chain compliant with Mozilla intermediate, and not with modern."""
        chain = make_chain(os.path.join(self.dir, "ec"), "ec")
        port = self.relay(chain)
        scan = self.scan(port, chain, "intermediate")
        self.assertCompliant(scan, port)
        self.assertCommonFindings(scan, chain)
        self.assertEqual(
            scan.accepted("tls_1_2_cipher_suites"),
            {
                "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
                "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
                "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
            },
        )
        # The checker is not vacuous: the same server fails "modern", for TLS 1.2.
        strict = self.scan(port, chain, "modern")
        self.assertIn(f"localhost:{port}: FAILED - Not compliant.", strict.output)
        self.assertIn("tls_versions: TLS versions {'TLSv1.2'} are supported", strict.output)
        self.assertEqual(strict.status, 1)

    def test_intermediate_rsa(self) -> None:
        """sslyze finds the relay with an RSA 2048 certificate compliant with Mozilla intermediate, ECDHE-RSA suites only."""
        chain = make_chain(os.path.join(self.dir, "rsa"), "rsa")
        port = self.relay(chain)
        scan = self.scan(port, chain, "intermediate")
        self.assertCompliant(scan, port)
        self.assertCommonFindings(scan, chain)
        self.assertEqual(
            scan.accepted("tls_1_2_cipher_suites"),
            {
                "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
                "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
                "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
            },
        )
        self.assertEqual(scan.outcome("robot")["robot_result"], "NOT_VULNERABLE_RSA_NOT_SUPPORTED")

    def test_modern(self) -> None:
        """sslyze finds the relay started with --tls-profile modern compliant with Mozilla modern: TLS 1.3 only."""
        chain = make_chain(os.path.join(self.dir, "modern"), "ec")
        port = self.relay(chain, "--tls-profile", "modern")
        scan = self.scan(port, chain, "modern")
        self.assertCompliant(scan, port)
        self.assertCommonFindings(scan, chain)
        self.assertEqual(scan.accepted("tls_1_2_cipher_suites"), set())
