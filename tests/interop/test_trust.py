"""
Trusting the self-signed certificate of C{make run}: each command that
README.md ("Trying it") and docs/interop.md ("Trusting a self-signed
certificate") give, run as written (port and paths aside) against a relay
that serves the certificate the Makefile's C{cert} target makes, connecting
to C{localhost}, the name the docs say to use. Without the trust setting the
same client must refuse the certificate, so every test here can fail.
"""

from __future__ import annotations

import os
import smtplib
import ssl
import subprocess
import sys
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID
from twisted.internet import reactor

from tests.common.interop import InteropTestCase
from tests.common.keys import FULL_KEY
from tests.common.node import ensure_node_modules, node_available, run_node_script
from tests.common.processes import ROOT, missing, required_tool


def make_cert(directory: str) -> tuple[str, str]:
    """
    Run the Makefile's C{cert} target with C{RUN=directory} (the very
    C{openssl req} command C{make run} uses); return (cert, key).
    Blocking, so call it before the relay serves (from C{setUp}).
    """
    make = required_tool("make", "apt-get install make")
    required_tool("openssl", "apt-get install openssl; .ci/run installs it")
    done = subprocess.run(
        [make, "-s", "cert", f"RUN={directory}"],
        cwd=ROOT,
        capture_output=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    if done.returncode != 0:
        raise AssertionError(f"make cert failed: {done.stdout!r} {done.stderr!r}")
    return os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")


class MakeCertTestCase(InteropTestCase):
    """The relay serves C{make cert}'s self-signed certificate."""

    def certificate(self, directory: str) -> tuple[str, str]:
        return make_cert(os.path.join(directory, "run"))


class CertificateTests(MakeCertTestCase):
    def test_names_localhost(self) -> None:
        """make cert's certificate is self-signed for localhost and 127.0.0.1, the names the docs connect to."""
        with open(self.cafile, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        self.assertEqual(cert.subject, cert.issuer)
        self.assertEqual(
            [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)], ["localhost"]
        )
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["localhost"])
        self.assertEqual([str(ip) for ip in san.get_values_for_type(x509.IPAddress)], ["127.0.0.1"])


class PythonTrustTests(MakeCertTestCase):
    """smtplib with C{ssl.create_default_context(cafile=...)}, and C{sendtest --cafile}."""

    def send(self, context: ssl.SSLContext) -> Any:
        def blocking() -> Any:
            with smtplib.SMTP_SSL("localhost", self.port, context=context, timeout=30) as client:
                client.login("poststack", FULL_KEY)
                return client.sendmail(
                    "you@yourdomain.com", ["user@example.com"], b"Subject: trusted\r\n\r\nHi.\r\n"
                )

        return self.in_thread(blocking)

    async def test_cafile(self) -> None:
        """ssl.create_default_context(cafile=cert.pem) + SMTP_SSL("localhost", ...) sends."""
        self.assertEqual(await self.send(ssl.create_default_context(cafile=self.cafile)), {})
        self.assertEqual(self.only_email().payload["subject"], "trusted")

    async def test_default_context_refuses(self) -> None:
        """Without cafile the default context refuses the self-signed certificate."""
        with self.assertRaises(ssl.SSLCertVerificationError) as caught:
            await self.send(ssl.create_default_context())
        self.assertIn("self-signed certificate", str(caught.exception))
        self.assertEqual(self.stored(), [])

    async def test_sendtest_cafile(self) -> None:
        """The README's `python -m poststack_relay.sendtest --port P --cafile .run/cert.pem` gets a 250."""
        result = await self.run_tool(
            [sys.executable, "-m", "poststack_relay.sendtest", "--port", str(self.port),
             "--cafile", self.cafile],
            env={"PYTHONPATH": ROOT},
            cwd=ROOT,
        )
        self.assertEqual(result.code, 0, result.output)
        email = self.only_email()
        self.assertEqual(result.stdout.strip(), f"250 2.0.0 Ok: queued as {email.id}")


class NodemailerTrustTests(MakeCertTestCase):
    """The PostStack page's nodemailer example with host 'localhost', trusting cert.pem."""

    def setUp(self) -> Any:
        reason = node_available()
        if reason is not None:
            raise missing(reason)
        ensure_node_modules()
        return super().setUp()

    async def node(self, variant: str, **env: str) -> dict[str, Any]:
        base = {
            "SMTP_HOST": "localhost",
            "SMTP_PORT": str(self.port),
            "SMTP_CA": self.cafile,
            "SMTP_PASS": FULL_KEY,
        }
        return await run_node_script(reactor, "page_trust.mjs", [variant], {**base, **env}, timeout=60)

    async def test_node_extra_ca_certs(self) -> None:
        """NODE_EXTRA_CA_CERTS=cert.pem and no tls option at all: sent."""
        result = await self.node("env", NODE_EXTRA_CA_CERTS=self.cafile)
        self.assertTrue(result["ok"], result)
        email = self.only_email()
        self.assertEqual(result["response"], f"250 2.0.0 Ok: queued as {email.id}")
        self.assertEqual(email.payload["tags"], ["welcome", "onboarding"])

    async def test_tls_ca(self) -> None:
        """tls: { ca: fs.readFileSync('cert.pem') }: sent."""
        result = await self.node("ca")
        self.assertTrue(result["ok"], result)
        self.assertEqual(self.only_email().payload["subject"], "Hello from PostStack SMTP")

    async def test_untrusted_is_self_signed_error(self) -> None:
        """Neither: nodemailer fails with 'self-signed certificate' (the error the docs explain); nothing sent."""
        result = await self.node("env")
        self.assertFalse(result["ok"], result)
        self.assertIn("self-signed certificate", result["error"])
        self.assertEqual(self.stored(), [])


class CommandLineTrustTests(MakeCertTestCase):
    """swaks --tls-ca-path, curl --cacert and msmtp tls_trust_file with cert.pem, host localhost."""

    tools = ("swaks", "curl", "msmtp")

    def swaks(self, *trust: str) -> list[str]:
        return [
            self.tool("swaks"), "--server", f"localhost:{self.port}", "--tlsc", *trust,
            "--auth-user", "poststack", "--auth-password", FULL_KEY,
            "--from", "you@yourdomain.com", "--to", "user@example.com",
            "--header", "Subject: swaks trusted", "--timeout", "30",
        ]

    async def test_swaks_tls_ca_path(self) -> None:
        """swaks --tlsc --tls-verify --tls-ca-path cert.pem: sent; without --tls-ca-path the verification fails."""
        result = await self.run_tool(self.swaks("--tls-verify", "--tls-ca-path", self.cafile))
        self.assertEqual(result.code, 0, result.output)
        self.assertEqual(self.only_email().payload["subject"], "swaks trusted")
        refused = await self.run_tool(self.swaks("--tls-verify"))
        self.assertNotEqual(refused.code, 0, refused.output)
        self.assertEqual(len(self.stored()), 1)

    async def test_curl_cacert(self) -> None:
        """curl smtps://localhost:PORT --cacert cert.pem: sent; without --cacert curl refuses (exit 60)."""
        message = self.write_file("message.eml", "Subject: curl trusted\r\n\r\nHi.\r\n")

        def curl(*trust: str) -> list[str]:
            return [
                self.tool("curl"), "--silent", "--show-error", "--max-time", "30",
                f"smtps://localhost:{self.port}", *trust,
                "--user", f"poststack:{FULL_KEY}", "--mail-from", "you@yourdomain.com",
                "--mail-rcpt", "user@example.com", "--upload-file", message,
            ]

        result = await self.run_tool(curl("--cacert", self.cafile))
        self.assertEqual(result.code, 0, result.output)
        self.assertEqual(self.only_email().payload["subject"], "curl trusted")
        refused = await self.run_tool(curl())
        # CURLE_PEER_FAILED_VERIFICATION; 77 if the system has no CA bundle at all.
        self.assertIn(refused.code, (60, 77), refused.output)
        self.assertEqual(len(self.stored()), 1)

    async def test_msmtp_tls_trust_file(self) -> None:
        """msmtp with tls_trust_file cert.pem (host localhost): sent; with the system CAs it refuses."""

        def config(trust_file: str) -> str:
            return self.write_file(
                f"msmtprc-{os.path.basename(trust_file)}",
                "account default\n"
                "host localhost\n"
                f"port {self.port}\n"
                "tls on\ntls_starttls off\n"
                f"tls_trust_file {trust_file}\n"
                "auth plain\nuser poststack\n"
                f"password {FULL_KEY}\n"
                "from you@yourdomain.com\n"
                "timeout 30\n",
            )

        message = "Subject: msmtp trusted\r\n\r\nHi.\r\n"
        result = await self.run_tool(
            [self.tool("msmtp"), "-C", config(self.cafile), "user@example.com"], stdin=message
        )
        self.assertEqual(result.code, 0, result.output)
        self.assertEqual(self.only_email().payload["subject"], "msmtp trusted")
        system = "/etc/ssl/certs/ca-certificates.crt"
        if os.path.exists(system):
            refused = await self.run_tool(
                [self.tool("msmtp"), "-C", config(system), "user@example.com"], stdin=message
            )
            self.assertNotEqual(refused.code, 0, refused.output)
            self.assertEqual(len(self.stored()), 1)
