"""
The real-HTTP relay harness (L{RelayTestCase}): the sandbox API over real HTTP with a real SQLite
file, and the relay on a real loopback port with real TLS, in this
process's reactor.
"""

from __future__ import annotations

import os
import smtplib
import ssl
import urllib.error
import urllib.request
from typing import Any, Callable, TypeVar

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from poststack_relay import RelayConfig, makeRelayService
from poststack_relay.sandbox import makeSandboxService
from poststack_relay.testing import write_certificate
from tests.common.keys import FULL_KEY, SERVICE_KEY
from tests.common.processes import DATA

__all__ = ["RelayTestCase", "http_get", "send_once", "tagged_message"]

T = TypeVar("T")


def tagged_message(tag: str) -> bytes:
    """
    A small message whose subject and Message-ID carry C{tag} (so a
    client's resend has the same derived idempotency key).
    """
    return (
        f"From: you@yourdomain.com\r\nTo: user@example.com\r\nSubject: {tag}\r\n"
        f"Message-ID: <{tag}@yourdomain.com>\r\n\r\nbody of {tag}\r\n"
    ).encode()


def send_once(
    port: int, context: Any, data: bytes, key: str = FULL_KEY, quit: bool = True
) -> tuple[int, str]:
    """
    One transaction with smtplib on a new connection (call from a thread):
    the code and text of the last reply (the first that was not 250).

    @param quit: end with C{QUIT}; C{False} closes the connection without it
        (a draining relay answers C{QUIT} with C{421}, which smtplib's
        context manager would raise).
    """
    s = smtplib.SMTP_SSL("localhost", port, context=context, timeout=30)
    if quit:
        with s:  # QUIT at the end: a reply other than 221 raises
            return _transaction(s, key, data)
    try:
        return _transaction(s, key, data)
    finally:
        s.close()


def _transaction(s: smtplib.SMTP, key: str, data: bytes) -> tuple[int, str]:
    s.login("poststack", key)
    code, text = s.mail("you@yourdomain.com")
    if code == 250:
        code, text = s.rcpt("user@example.com")
    if code == 250:
        code, text = s.data(data)
    return code, text.decode()


def http_get(url: str) -> tuple[int, str]:
    """
    GET C{url} (call from a thread): (status, body); an HTTP error status
    is returned, not raised.
    """
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode("utf-8")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8")


class RelayTestCase(TestCase):
    """
    Starts sandbox + relay before each test; C{self.port} is the relay's
    port, C{self.cafile} the certificate to trust, C{self.sandbox} the
    sandbox service (C{.store}, C{.resource}).
    """

    timeout = 120
    relay_options: dict[str, Any] = {}

    def setUp(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.cafile, self.keyfile = self.certificate(directory)
        self.sandbox = makeSandboxService(
            0, "127.0.0.1", os.path.join(directory, "sandbox.sqlite3"), DATA, reactor
        )
        self.sandbox.startService()
        self.addCleanup(self.sandbox.stopService)
        sandbox_port = await self.sandbox.when_listening()
        self.api_url = f"http://127.0.0.1:{sandbox_port.getHost().port}"
        options = dict(
            tls_cert=self.cafile,
            tls_key=self.keyfile,
            port=0,
            interface="127.0.0.1",
            api_url=self.api_url,
            service_key=SERVICE_KEY,
            hostname="localhost",
            api_timeout=10.0,
            # The real metrics listener, on any free port (the default 9587
            # could be taken by a relay running on this machine).
            metrics_listen="127.0.0.1:0",
        )
        options.update(self.relay_options)
        self.relay = makeRelayService(RelayConfig(**options), reactor)
        self.relay.startService()
        self.addCleanup(self.relay.stopService)
        port = await self.relay.port()
        self.port = port.getHost().port

    def certificate(self, directory: str) -> tuple[str, str]:
        """
        Write the relay's certificate and key into C{directory}; return their
        paths (cert, key). By default a self-signed one for C{localhost} and
        C{127.0.0.1}; override to test another (C{make cert}'s, say).
        """
        return write_certificate(directory)

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.cafile)

    def smtp(self) -> smtplib.SMTP_SSL:
        """
        A connected smtplib client (call from a thread).
        """
        return smtplib.SMTP_SSL("localhost", self.port, context=self.context(), timeout=30)

    def in_thread(self, f: Callable[..., T], *args: Any) -> "Deferred[T]":
        return deferToThread(f, *args)

    def stored(self) -> list[Any]:
        return self.sandbox.store.emails()
