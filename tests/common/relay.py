"""
The real-HTTP relay harness (L{RelayTestCase}): the sandbox API over real HTTP with a real SQLite
file, and the relay on a real loopback port with real TLS, in this
process's reactor.
"""

from __future__ import annotations

import os
import smtplib
import ssl
from typing import Any, Callable, TypeVar

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from poststack_relay import RelayConfig, makeRelayService
from poststack_relay.sandbox import makeSandboxService
from poststack_relay.testing import write_certificate
from tests.common.keys import SERVICE_KEY
from tests.common.processes import DATA

__all__ = ["RelayTestCase"]

T = TypeVar("T")


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
        self.cafile, self.keyfile = write_certificate(directory)
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
