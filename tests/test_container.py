"""
The relay's container image (C{Containerfile}, built by C{make image}),
started with podman and checked from outside, as an operator runs it: the
SMTP page's smtplib example relayed through the container to the sandbox
API on the host; the relay not root; SIGTERM draining a transaction in
flight, then exit status 0; a read-only root filesystem; the published
ports with the metrics listener opened on request; and the image's own
metadata (user, entry point, labels, health check, ports).

Skipped with a reason when podman or the image is missing; under CI
(C{.ci/run} installs podman and runs C{make image} first) that is a failure.
How podman is run here: docs/deployment.md, "Containers".
"""

from __future__ import annotations

import json
import os
import smtplib
import ssl
import subprocess
import threading
import time
import urllib.request
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from typing import Any

from twisted.trial.unittest import TestCase

from poststack_relay._version import __version__
from poststack_relay.testing import write_certificate
from tests.common.keys import FULL_KEY
from tests.common.podman import IMAGE, ULIMITS, Container, image_or_skip, podman
from tests.common.processes import DATA, ROOT, TWISTD, free_port, missing, stop_process, wait_for_port
from tests.common.relay import http_get, send_once, tagged_message

#: The image's user (the Kubernetes manifests' runAsUser).
UID = 10001
#: Where the image expects the certificate (POSTSTACK_RELAY_TLS_CERT/KEY).
TLS_DIR = "/etc/poststack-relay/tls"


def page_example(port: int, context: ssl.SSLContext) -> dict[str, tuple[int, bytes]]:
    """The SMTP page's smtplib example (its host and key replaced), sent to loopback C{port}."""
    msg = MIMEMultipart("alternative")
    msg["From"] = "you@yourdomain.com"
    msg["To"] = "user@example.com"
    msg["Subject"] = "Hello from PostStack SMTP"
    msg["X-PostStack-Tags"] = "welcome,onboarding"
    html = "<p>Sent via SMTP relay!</p>"
    msg.attach(MIMEText(html, "html"))
    with smtplib.SMTP_SSL("localhost", port, context=context, timeout=30) as server:
        server.login("poststack", FULL_KEY)
        refused: dict[str, tuple[int, bytes]] = server.sendmail(
            "you@yourdomain.com",
            "user@example.com",
            msg.as_string(),
        )
        return refused


def sandbox_call(api_url: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """Call the sandbox's own HTTP API (C{/_sandbox/...}); the decoded JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{api_url}{path}", data=data, method=method, headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())


class ImageTests(TestCase):
    """What C{podman image inspect} says of the built image."""

    def test_metadata(self) -> None:
        """Non-root user, the relay as exec-form entry point, OCI labels, health check, ports."""
        image = image_or_skip()
        config = image["Config"]
        self.assertEqual(config["User"], f"{UID}:{UID}")
        self.assertEqual(config["Entrypoint"], ["/opt/poststack-relay/bin/poststack-relay"])
        labels = config["Labels"]
        self.assertEqual(labels["org.opencontainers.image.version"], __version__)
        self.assertEqual(labels["org.opencontainers.image.licenses"], "MIT")
        self.assertEqual(labels["org.opencontainers.image.title"], "poststack-relay")
        self.assertTrue(labels["org.opencontainers.image.source"])
        self.assertTrue(labels["org.opencontainers.image.description"])
        self.assertEqual(
            image["Healthcheck"]["Test"],
            ["CMD", "/opt/poststack-relay/bin/python", "/opt/poststack-relay/healthcheck.py"],
        )
        self.assertEqual(set(config["ExposedPorts"]), {"587/tcp", "9587/tcp"})
        env = dict(item.split("=", 1) for item in config["Env"])
        self.assertFalse([name for name in env if "KEY" in name and name != "POSTSTACK_RELAY_TLS_KEY"], env)


class SbomTests(TestCase):
    """C{make sbom}'s SBOM, beside the image, against what the image holds."""

    def test_sbom_lists_the_image_venv(self) -> None:
        """Every distribution in the image's venv, with its version and purl; nothing else."""
        image_or_skip()
        path = os.path.join(ROOT, "dist", f"poststack-relay-{__version__}.cdx.json")
        if not os.path.exists(path):
            raise missing(f"{path} is missing (make sbom)")
        with open(path, encoding="utf-8") as f:
            bom = json.load(f)
        self.assertEqual(bom["bomFormat"], "CycloneDX")
        listed = {(c["name"].lower(), c["version"]) for c in bom["components"]}
        for component in bom["components"]:
            self.assertEqual(component["purl"].split("@")[0].split("/")[0], "pkg:pypi", component)
        installed = podman(
            "run", "--rm", "--network", "none", "--read-only", "--health-interval", "disable", *ULIMITS,
            "--entrypoint", "/opt/poststack-relay/bin/python", IMAGE, "-c",
            "import importlib.metadata as m, json; "
            "print(json.dumps(sorted({(d.metadata['Name'], d.version) for d in m.distributions()})))",
        ).stdout
        self.assertEqual(listed, {(name.lower(), version) for name, version in json.loads(installed)})
        self.assertIn(("poststack-relay", __version__), listed)


class ContainerTests(TestCase):
    """
    The image run with C{--read-only} and C{--network host} (the container
    reaches the sandbox on the host's loopback), the certificate mounted
    read-only where the image expects it.
    """

    timeout = 120

    def setUp(self) -> None:
        image_or_skip()
        self.directory = os.path.abspath(self.mktemp())
        tls = os.path.join(self.directory, "tls")
        cert, key = write_certificate(tls)
        os.rename(cert, os.path.join(tls, "fullchain.pem"))
        os.rename(key, os.path.join(tls, "privkey.pem"))
        # The relay runs as UID 10001: the mounted key must be readable by it.
        os.chmod(os.path.join(tls, "privkey.pem"), 0o644)
        os.chmod(self.directory, 0o755)
        os.chmod(tls, 0o755)
        self.context = ssl.create_default_context(cafile=os.path.join(tls, "fullchain.pem"))
        self.tls = tls
        self.api_url = self.start_sandbox()

    def start_sandbox(self) -> str:
        """The sandbox API as a process on the host's loopback; its base URL."""
        port = free_port()
        log = open(os.path.join(self.directory, "sandbox.log"), "wb")
        try:
            sandbox = subprocess.Popen(
                [TWISTD, "-n", "--pidfile=", "poststack-sandbox", "--port", str(port),
                 "--interface", "127.0.0.1", "--db", "sandbox.sqlite3", "--data", DATA],
                cwd=self.directory, env=dict(os.environ, PYTHONPATH=ROOT), stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        finally:
            log.close()
        self.addCleanup(stop_process, sandbox)
        wait_for_port(port, sandbox)
        return f"http://127.0.0.1:{port}"

    def start_relay(self) -> tuple[Container, int, int]:
        """The image on the host's network, relay and metrics on free loopback ports."""
        port, metrics = free_port(), free_port()
        name = f"psr-test-{os.getpid()}-{port}"
        container = Container(self, name, [
            "--read-only", "--network", "host",
            "--volume", f"{self.tls}:{TLS_DIR}:ro",
            "--env", f"POSTSTACK_RELAY_PORT={port}",
            "--env", "POSTSTACK_RELAY_INTERFACE=127.0.0.1",
            "--env", f"POSTSTACK_RELAY_API_URL={self.api_url}",
            "--env", "POSTSTACK_RELAY_HOSTNAME=localhost",
            "--env", f"POSTSTACK_RELAY_METRICS_LISTEN=127.0.0.1:{metrics}",
        ])
        container.wait_for_log(f"RelayFactory (TLS) starting on {port}")
        return container, port, metrics

    def test_page_example_relayed(self) -> None:
        """
        The page's smtplib example reaches the sandbox through the container,
        whose relay is UID 10001 (not root) on a read-only root filesystem,
        healthy by its own health check.
        """
        container, port, metrics = self.start_relay()
        self.assertEqual(page_example(port, self.context), {})
        stored = sandbox_call(self.api_url, "GET", "/_sandbox/emails")["data"]
        self.assertEqual(len(stored), 1, stored)
        payload = stored[0]["payload"]
        self.assertEqual(payload["subject"], "Hello from PostStack SMTP")
        self.assertEqual(payload["tags"], ["welcome", "onboarding"])
        self.assertIn("<p>Sent via SMTP relay!</p>", payload["html"])
        # The relay (PID 1 in the container) is not root.
        top = podman("top", container.name, "user", "pid", "args").stdout.splitlines()
        self.assertEqual(top[1].split()[:2], ["poststack-relay", "1"], top)
        self.assertIn("/opt/poststack-relay/bin/poststack-relay", top[1])
        self.assertEqual(podman("exec", container.name, "id", "-u").stdout.strip(), str(UID))
        # The root filesystem is read-only, and the relay needed nothing written.
        self.assertTrue(container.inspect()["HostConfig"]["ReadonlyRootfs"])
        touched = podman("exec", container.name, "touch", "/opt/poststack-relay/x", check=False)
        self.assertNotEqual(touched.returncode, 0)
        self.assertIn("Read-only file system", touched.stderr)
        self.assertNotIn("Unable to write to plugin cache", container.logs())
        # Health: the image's own check (run by hand: no systemd timers here) and /healthz.
        self.assertEqual(podman("healthcheck", "run", container.name, check=False).returncode, 0)
        self.assertEqual(http_get(f"http://127.0.0.1:{metrics}/healthz")[0], 200)

    def test_sigterm_drains(self) -> None:
        """
        SIGTERM while a message's API call is in flight (the sandbox slowed
        by its fault API): the client still gets 250, the message is stored
        once, and the container exits 0.
        """
        container, port, _ = self.start_relay()
        sandbox_call(self.api_url, "POST", "/_sandbox/faults",
                     {"mode": "slow", "count": 1, "delay": 4.0, "method": "POST", "path": "/emails"})
        replies: list[tuple[int, str]] = []
        errors: list[BaseException] = []

        def send() -> None:
            try:
                replies.append(send_once(port, self.context, tagged_message("drain"), quit=False))
            except BaseException as e:  # reported below, not lost in the thread
                errors.append(e)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        # The fault is taken (no longer pending) once the API call is in flight.
        end = time.monotonic() + 20
        while sandbox_call(self.api_url, "GET", "/_sandbox/faults")["data"] and time.monotonic() < end:
            time.sleep(0.05)
        self.assertFalse(sandbox_call(self.api_url, "GET", "/_sandbox/faults")["data"], "the send never reached the API")
        podman("kill", "--signal", "TERM", container.name)
        sender.join(30)
        self.assertFalse(errors, errors)
        self.assertEqual(len(replies), 1)
        self.assertEqual(replies[0][0], 250, replies)
        self.assertEqual(container.wait(), 0, container.logs()[-3000:])
        stored = sandbox_call(self.api_url, "GET", "/_sandbox/emails")["data"]
        self.assertEqual([e["payload"]["subject"] for e in stored], ["drain"])
        self.assertIn("drained", container.logs())


class PublishedPortsTests(TestCase):
    """
    The image on its own network (podman's bridge) as an operator runs it:
    SMTP on the default port 587 published to the host's loopback, and the
    metrics listener opened with POSTSTACK_RELAY_METRICS_LISTEN=0.0.0.0:9587
    and published too: both reachable from outside the container.
    """

    timeout = 120

    def test_published(self) -> None:
        image_or_skip()
        directory = os.path.abspath(self.mktemp())
        cert, key = write_certificate(os.path.join(directory, "tls"))
        tls = os.path.dirname(cert)
        os.rename(cert, os.path.join(tls, "fullchain.pem"))
        os.rename(key, os.path.join(tls, "privkey.pem"))
        os.chmod(os.path.join(tls, "privkey.pem"), 0o644)
        os.chmod(directory, 0o755)
        os.chmod(tls, 0o755)
        smtp, metrics = free_port(), free_port()
        container = Container(self, f"psr-test-{os.getpid()}-{smtp}", [
            "--read-only",
            # Port 587 as UID 10001: unprivileged ports start at 0 in the container's own network.
            "--sysctl", "net.ipv4.ip_unprivileged_port_start=0",
            "--publish", f"127.0.0.1:{smtp}:587", "--publish", f"127.0.0.1:{metrics}:9587",
            "--volume", f"{tls}:{TLS_DIR}:ro",
            "--env", "POSTSTACK_RELAY_HOSTNAME=localhost",
            "--env", "POSTSTACK_RELAY_METRICS_LISTEN=0.0.0.0:9587",
        ])
        container.wait_for_log("RelayFactory (TLS) starting on 587")
        end = time.monotonic() + 20
        status: tuple[int, str] | None = None
        while time.monotonic() < end:
            try:
                status = http_get(f"http://127.0.0.1:{metrics}/healthz")
                break
            except OSError:
                time.sleep(0.2)
        self.assertIsNotNone(status, "the published metrics port never answered")
        assert status is not None
        self.assertEqual(status[0], 200, status)
        self.assertEqual(http_get(f"http://127.0.0.1:{metrics}/metrics")[0], 200)
        context = ssl.create_default_context(cafile=os.path.join(tls, "fullchain.pem"))
        with smtplib.SMTP_SSL("localhost", smtp, context=context, timeout=30) as server:
            code, _ = server.ehlo()
            self.assertEqual(code, 250)
        self.assertEqual(podman("healthcheck", "run", container.name, check=False).returncode, 0)
