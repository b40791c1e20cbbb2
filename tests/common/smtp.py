"""
Helpers for the SMTP tests (L{poststack_relay.smtp}): byte-level harnesses
over a StringTransport with an in-memory API and a Clock, the replies and
commands the tests send and expect, and a few builders.
"""

from __future__ import annotations

import base64
import re
from typing import Any, Optional

import attrs
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from poststack_relay.auth import Identity, PostStackChecker, RelayRealm
from poststack_relay.config import RelayConfig
from poststack_relay.delivery import RelayDelivery
from poststack_relay.interfaces import IEmailAPI
from poststack_relay.replies import Reply
from poststack_relay.smtp import RelayFactory, RelaySMTP
from poststack_relay.testing import MemoryEmailAPI
from poststack_relay.translate import Envelope, MimeScan

KEY = "sk_test_valid_key_0123456789"
MESSAGE = (
    b"From: You <you@yourdomain.com>\r\n"
    b"To: user@example.com\r\n"
    b"Subject: Hello\r\n"
    b"\r\n"
    b"Hi there\r\n"
)


def plain(user: str, password: str, authzid: str = "") -> bytes:
    """An AUTH PLAIN response: base64 of authzid NUL user NUL password."""
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode())


class Harness:
    """
    One session of a fresh L{RelayFactory} over a StringTransport, with a
    L{MemoryEmailAPI} (one API key, one mailbox) and a Clock.
    """

    def __init__(self, **config: Any) -> None:
        self.api = MemoryEmailAPI(api_keys={KEY}, mailboxes={"alice@yourdomain.com": "mbpass"})
        self.clock = Clock()
        cfg = RelayConfig(
            metrics_listen="off", tls_cert="unused.pem", hostname="relay.test", service_key="sk_test_service", **config
        )
        checker = PostStackChecker(self.api, self.clock, cfg.service_key)
        portal = Portal(RelayRealm(lambda i: RelayDelivery(i, self.api)), [checker])
        self.factory = RelayFactory(portal, cfg, self.clock)
        self.proto: RelaySMTP = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 5555))
        self.proto.makeConnection(self.transport)

    def send(self, data: bytes) -> list[bytes]:
        """Feed C{data} in one chunk; the reply lines it caused."""
        self.transport.clear()
        self.proto.dataReceived(data)
        return self.transport.value().split(b"\r\n")[:-1]

    def login(self) -> None:
        """EHLO, then AUTH PLAIN with the API key."""
        self.send(b"EHLO client.test\r\n")
        assert self.send(b"AUTH PLAIN " + plain("poststack", KEY) + b"\r\n") == [
            b"235 2.7.0 Authentication successful"
        ]


START = b"354 End data with <CR><LF>.<CR><LF>"
BEGIN = b"MAIL FROM:<you@yourdomain.com>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n"
AUTH_OK = b"235 2.7.0 Authentication successful"
LINE_TOO_LONG = b"500 5.5.2 Error: line too long"
AUTH_LINE_TOO_LONG = b"500 5.5.6 Authentication Exchange line is too long"
TIMEOUT = b"421 4.4.2 Error: timeout exceeded, closing connection"
TOO_MANY_ERRORS = b"421 4.7.0 Error: too many errors, closing connection"


def queued(n: int) -> bytes:
    """The reply to the C{n}th message the in-memory API accepted."""
    return b"250 2.0.0 Ok: queued as em_%020d" % n


def normalised(message: bytes) -> bytes:
    """C{message} as the relay hands it on: every bare LF made CRLF."""
    return re.sub(rb"(?<!\r)\n", b"\r\n", message)


def stuff(message: bytes) -> bytes:
    """
    What a client sends for C{message} (which is empty or ends in CRLF):
    dot-stuffed, with the terminator.
    """
    stuffed = message.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed + b".\r\n"


@attrs.define
class HoldingAPI(MemoryEmailAPI):
    """
    A MemoryEmailAPI whose API-key checks can be held pending too.
    """

    hold_checks: bool = False
    pending_checks: list[tuple["Deferred[bool]", bool]] = attrs.field(factory=list)

    def check_api_key(self, api_key: str) -> "Deferred[bool]":
        if not self.hold_checks:
            return super().check_api_key(api_key)
        self.checks += 1
        d: Deferred[bool] = Deferred()
        self.pending_checks.append((d, api_key in self.api_keys))
        return d

    def release_checks(self) -> None:
        """Answer every held API-key check."""
        pending, self.pending_checks = self.pending_checks, []
        for d, result in pending:
            d.callback(result)


class RecordingDelivery(RelayDelivery):
    """
    A RelayDelivery that records each transaction it is handed.
    """

    def __init__(self, identity: Identity, api: IEmailAPI, record: list[tuple[Envelope, bytes]]) -> None:
        super().__init__(identity, api)
        self.record = record

    def deliver(
        self, envelope: Envelope, raw: bytes, session: str = "-", client: str = "-",
        scan: Optional[MimeScan] = None,
    ) -> "Deferred[Reply]":
        self.record.append((envelope, raw))
        return super().deliver(envelope, raw, session, client, scan)


class RecordingHarness(Harness):
    """
    The byte-level L{Harness}, with an API whose checks can be
    held and a delivery that records the raw bytes it is handed.
    """

    def __init__(self, **config: Any) -> None:
        self.api = HoldingAPI(api_keys={KEY}, mailboxes={"alice@yourdomain.com": "mbpass"})
        self.clock = Clock()
        self.record: list[tuple[Envelope, bytes]] = []
        cfg = RelayConfig(metrics_listen="off", 
            tls_cert="unused.pem", hostname="relay.test", service_key="sk_test_service", **config
        )
        checker = PostStackChecker(self.api, self.clock, cfg.service_key)
        realm = RelayRealm(lambda i: RecordingDelivery(i, self.api, self.record))
        self.factory = RelayFactory(Portal(realm, [checker]), cfg, self.clock)
        self.proto: RelaySMTP = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 5555))
        self.proto.makeConnection(self.transport)

    @property
    def raws(self) -> list[bytes]:
        """The raw messages handed to the delivery, in order."""
        return [raw for _, raw in self.record]

    @property
    def held(self) -> int:
        """Octets the DATA scanner holds back (0 outside DATA)."""
        scanner = self.proto.state.scanner
        return 0 if scanner is None else scanner.held

    @property
    def kept(self) -> int:
        """Octets of message content kept so far (0 outside DATA)."""
        scanner = self.proto.state.scanner
        return 0 if scanner is None else scanner.kept

    def feed(self, *pieces: bytes) -> list[bytes]:
        """
        Deliver C{pieces} as separate chunks; the reply lines they caused.
        """
        self.transport.clear()
        for piece in pieces:
            self.proto.dataReceived(piece)
        return self.transport.value().split(b"\r\n")[:-1]

    def open_data(self) -> None:
        """MAIL, RCPT and DATA, checking that DATA mode began."""
        assert self.send(BEGIN) == [b"250 2.1.0 Ok", b"250 2.1.5 Ok", START]


def ready(**config: Any) -> RecordingHarness:
    """A session that has sent EHLO and logged in with the API key."""
    h = RecordingHarness(**config)
    h.login()
    return h


class Collector(Protocol):
    """
    A client application protocol that keeps what it receives.
    """

    received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class Connections:
    """
    Connections to one factory (that of a L{RecordingHarness}), each from a
    chosen client address, over StringTransports.
    """

    def __init__(self, **config: Any) -> None:
        self.harness = RecordingHarness(**config)
        self.factory = self.harness.factory

    def open(self, host: str = "192.0.2.7") -> tuple[Any, StringTransport]:
        """A new connection from C{host}: its protocol and transport."""
        address = IPv4Address("TCP", host, 40000)
        proto = self.factory.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        proto.makeConnection(transport)
        return proto, transport
