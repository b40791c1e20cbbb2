# -*- test-case-name: tests.test_proxy_protocol -*-
"""
The PROXY protocol (HAProxy's v1 text and v2 binary headers) in front of a
listener: the balancer says who the client is before the client speaks.

L{ProxyProtocolEndpoint} wraps any stream server endpoint; each connection
it accepts must start with a v1 or v2 header, and only once the header is
read does the wrapped factory build its protocol, with the header's source
address as the peer.  So a factory's per-address limits and a session's
C{connectionMade} never see the balancer's address.  A connection whose
first bytes are not a valid header, or that sends none within
C{headerTimeout} seconds, is dropped without a reply (it is not a client of
ours: nothing it could read would help it).

Twisted's public C{twisted.protocols.haproxy.proxyEndpoint} connects the
wrapped protocol as soon as TCP connects, has no time limit and needs the
first bytes of the header in one read, so the relay parses the header
itself (L{parse_proxy_header}, a pure function) in this module.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Literal, Optional, cast

import attrs
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IListeningPort,
    ILoggingContext,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
    ITCPTransport,
    ITransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

# The namespace the relay's logs have always shown for these events.
_log = Logger(namespace="poststack_relay.service")

PROXY_HEADER_TIMEOUT = 10.0
"""Seconds a connection may take to send its PROXY header (a balancer sends
it at once, with the connection)."""

V1_SIGNATURE = b"PROXY"
V1_MAX_LENGTH = 107
"""The longest v1 header, CRLF included (the protocol's own limit)."""
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_FIXED = 16  # signature, version and command, family, length

# v2 address blocks by family (high nibble of the family byte): their size.
_V2_INET, _V2_INET6, _V2_UNIX = 0x10, 0x20, 0x30
_V2_ADDRESS_SIZE = {_V2_INET: 12, _V2_INET6: 36, _V2_UNIX: 216}


class InvalidProxyHeader(ValueError):
    """
    The bytes are not a valid PROXY protocol v1 or v2 header.
    """


class NoProxyHeader(InvalidProxyHeader):
    """
    The bytes do not even start like a PROXY protocol header.
    """


@attrs.frozen
class ProxyHeader:
    """
    What a PROXY header says.

    @ivar source: the client's address; C{None} when the header carries
        none (v1 C{UNKNOWN}, v2 C{LOCAL} or an unspecified family): the
        connection's own addresses then stand.
    @ivar destination: the address the client connected to, or C{None}.
    """

    source: Optional[IAddress] = None
    destination: Optional[IAddress] = None


def parse_proxy_header(data: bytes) -> tuple[Optional[ProxyHeader], int]:
    """
    Parse the PROXY header at the start of C{data} (the bytes received so
    far).

    @return: (the header, its length in bytes) once C{data} holds a whole
        header; (C{None}, 0) while more bytes are needed.
    @raise InvalidProxyHeader: C{data} does not start with a valid v1 or
        v2 header.
    """
    if data.startswith(V1_SIGNATURE):
        end = data.find(b"\r\n", 0, V1_MAX_LENGTH)
        if end < 0:
            if len(data) >= V1_MAX_LENGTH:
                raise InvalidProxyHeader("v1 header too long")
            return None, 0
        return _parse_v1(data[:end]), end + 2
    if data.startswith(V2_SIGNATURE):
        if len(data) > len(V2_SIGNATURE) and data[12] & 0xF0 != 0x20:
            raise NoProxyHeader("not PROXY protocol version 2")
        if len(data) < _V2_FIXED:
            return None, 0
        (length,) = struct.unpack("!H", data[14:16])
        end = _V2_FIXED + length
        if len(data) < end:
            return None, 0
        return _parse_v2(data[12], data[13], data[_V2_FIXED:end]), end
    if V1_SIGNATURE.startswith(data) or V2_SIGNATURE.startswith(data):
        return None, 0  # too few bytes yet to tell
    raise NoProxyHeader("no PROXY protocol header")


def _port(text: bytes) -> int:
    if not text.isdigit() or len(text) > 5 or int(text) > 65535:
        raise InvalidProxyHeader(f"bad port {text!r}")
    return int(text)


def _parse_v1(line: bytes) -> ProxyHeader:
    """
    C{PROXY TCP4|TCP6 SOURCE DESTINATION SPORT DPORT} or C{PROXY UNKNOWN ...}
    (without the CRLF).
    """
    fields = line.split(b" ")
    if fields[0] != V1_SIGNATURE or len(fields) < 2:
        raise InvalidProxyHeader("bad v1 header")
    family = fields[1]
    if family == b"UNKNOWN":
        return ProxyHeader()
    if family not in (b"TCP4", b"TCP6") or len(fields) != 6:
        raise InvalidProxyHeader("bad v1 header")
    try:
        source, destination = (f.decode("ascii") for f in fields[2:4])
        version = ipaddress.ip_address(source).version
        if version != ipaddress.ip_address(destination).version or (
            version == 4
        ) != (family == b"TCP4"):
            raise InvalidProxyHeader("v1 addresses do not match their family")
    except (UnicodeDecodeError, ValueError):
        raise InvalidProxyHeader("bad v1 address") from None
    sport, dport = _port(fields[4]), _port(fields[5])
    if family == b"TCP4":
        return ProxyHeader(IPv4Address("TCP", source, sport), IPv4Address("TCP", destination, dport))
    return ProxyHeader(IPv6Address("TCP", source, sport), IPv6Address("TCP", destination, dport))


def _ipv6_text(packed: bytes) -> str:
    # Eight groups in hex without zero compression, as Twisted's own parser
    # wrote them (what the relay always logged for v2 IPv6 clients).
    return ":".join(f"{group:x}" for group in struct.unpack("!8H", packed))


def _parse_v2(version_command: int, family_protocol: int, body: bytes) -> ProxyHeader:
    """
    The v2 header after its signature (version 2 checked): command, family and
    transport protocol, and the C{body} (addresses, then TLVs, ignored).
    """
    command = version_command & 0x0F
    if command == 0:  # LOCAL: the balancer's own connection (a health check)
        return ProxyHeader()
    if command != 1:
        raise InvalidProxyHeader(f"unknown v2 command {command}")
    family, protocol = family_protocol & 0xF0, family_protocol & 0x0F
    if family not in (0x00, *_V2_ADDRESS_SIZE) or protocol not in (0, 1, 2):
        raise InvalidProxyHeader(f"unknown v2 family {family_protocol:#04x}")
    if family == 0x00 or protocol == 0:
        return ProxyHeader()
    size = _V2_ADDRESS_SIZE[family]
    if len(body) < size:
        raise InvalidProxyHeader("v2 addresses missing")
    if family == _V2_UNIX:
        return ProxyHeader(
            UNIXAddress(body[:108].rstrip(b"\0")), UNIXAddress(body[108:216].rstrip(b"\0"))
        )
    kind: Literal["TCP", "UDP"] = "TCP" if protocol == 1 else "UDP"
    if family == _V2_INET:
        source, destination, sport, dport = struct.unpack("!4s4sHH", body[:size])
        return ProxyHeader(
            IPv4Address(kind, str(ipaddress.IPv4Address(source)), sport),
            IPv4Address(kind, str(ipaddress.IPv4Address(destination)), dport),
        )
    source, destination, sport, dport = struct.unpack("!16s16sHH", body[:size])
    return ProxyHeader(
        IPv6Address(kind, _ipv6_text(source), sport),
        IPv6Address(kind, _ipv6_text(destination), dport),
    )


class ProxiedConnection(ProtocolWrapper):
    """
    Reads the PROXY header, and only then builds the wrapped protocol (with
    the client's address) and connects it; it is then the wrapped
    protocol's transport, with the header's addresses as C{getPeer} and
    C{getHost}.
    """

    factory: "ProxyProtocolFactory"

    def __init__(self, factory: "ProxyProtocolFactory") -> None:
        super().__init__(factory, Protocol())  # a placeholder until the header
        self._buffer = b""
        self._header: Optional[ProxyHeader] = None
        self._headerCall: Optional[IDelayedCall] = None

    def _transport(self) -> ITransport:
        assert self.transport is not None, "not connected"
        return self.transport

    def makeConnection(self, transport: ITransport) -> None:
        """
        Start the header's clock; the wrapped protocol waits for the header.
        """
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)  # type: ignore[no-untyped-call]  # BaseProtocol: unannotated in Twisted
        self.factory.registerProtocol(self)  # type: ignore[no-untyped-call]  # WrappingFactory: unannotated in Twisted
        if self.factory.headerTimeout > 0:
            self._headerCall = self.factory.clock.callLater(
                self.factory.headerTimeout, self._drop, "no PROXY header in time"
            )

    def getPeer(self) -> IAddress:
        """
        The header's source address, else the connection's peer.
        """
        if self._header is not None and self._header.source is not None:
            return self._header.source
        return self._transport().getPeer()

    def getHost(self) -> IAddress:
        """
        The header's destination address, else the connection's own.
        """
        if self._header is not None and self._header.destination is not None:
            return self._header.destination
        return self._transport().getHost()

    def _drop(self, reason: str) -> None:
        self._headerCall = None
        peer = self._transport().getPeer()
        _log.info(
            "dropped connection from {balancer}: {reason}",
            balancer=getattr(peer, "host", str(peer)),
            reason=reason,
            event="proxy_header_invalid",
        )
        self.disconnecting = 1
        transport = self._transport()
        if ITCPTransport.providedBy(transport):
            transport.abortConnection()
        else:
            transport.loseConnection()

    def _stopTimer(self) -> None:
        if self._headerCall is not None and self._headerCall.active():
            self._headerCall.cancel()
        self._headerCall = None

    def dataReceived(self, data: bytes) -> None:
        """
        Before the header: collect and parse it; after: pass bytes on.
        """
        if self._header is not None:
            self.wrappedProtocol.dataReceived(data)
            return
        if self.disconnecting:
            return
        self._buffer += data
        try:
            header, length = parse_proxy_header(self._buffer)
        except InvalidProxyHeader as e:
            self._stopTimer()
            if isinstance(e, NoProxyHeader):
                self._drop("no PROXY protocol header")
            else:
                self._drop("invalid PROXY protocol header")
            return
        if header is None:
            return
        remaining, self._buffer = self._buffer[length:], b""
        self._header = header
        self._stopTimer()
        protocol = self.factory.wrappedFactory.buildProtocol(self.getPeer())
        if protocol is None:
            self._transport().loseConnection()
            return
        self.wrappedProtocol = protocol
        # This wrapper provides its transport's interfaces (makeConnection).
        protocol.makeConnection(cast(ITransport, self))
        if remaining:
            protocol.dataReceived(remaining)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Stop the header's clock; tell the wrapped protocol (if built).
        """
        self._stopTimer()
        super().connectionLost(reason)  # type: ignore[no-untyped-call]  # ProtocolWrapper: unannotated in Twisted


class ProxyProtocolFactory(WrappingFactory[ProxiedConnection]):
    """
    Wraps a server factory so each connection starts with a PROXY protocol
    v1 or v2 header; the wrapped factory's C{buildProtocol} and its
    protocol's transport (C{getPeer}, C{getHost}) see the addresses from
    the header.  A v2 C{LOCAL} header (a balancer's health check) keeps the
    real TCP addresses.

    @ivar headerTimeout: seconds a connection may take to send the header
        (0: no limit).
    """

    noisy = False

    def __init__(
        self,
        wrappedFactory: IProtocolFactory,
        clock: IReactorTime,
        headerTimeout: float = PROXY_HEADER_TIMEOUT,
    ) -> None:
        super().__init__(wrappedFactory)  # type: ignore[no-untyped-call]  # WrappingFactory: unannotated in Twisted
        self.wrappedFactory: IProtocolFactory = wrappedFactory
        self.clock = clock
        self.headerTimeout = headerTimeout

    def buildProtocol(self, addr: Optional[IAddress]) -> ProxiedConnection:
        """
        A connection that waits for its PROXY header.
        """
        return ProxiedConnection(self)

    def logPrefix(self) -> str:
        """
        The wrapped factory's prefix marked C{(PROXY)}, as Twisted's own
        PROXY wrapper wrote it (C{RelayFactory (TLS) (PROXY) starting on 587}).
        """
        wrapped = self.wrappedFactory
        if ILoggingContext.providedBy(wrapped):
            return f"{ILoggingContext(wrapped).logPrefix()} (PROXY)"
        return f"{wrapped.__class__.__name__} (PROXY)"


@implementer(IStreamServerEndpoint)
@attrs.frozen
class ProxyProtocolEndpoint:
    """
    A stream server endpoint whose connections start with a PROXY protocol
    header (see the module); it listens on C{wrapped}.

    @ivar wrapped: where to listen (TCP, a systemd socket...).
    @ivar clock: for the header's time limit.
    @ivar headerTimeout: seconds a connection may take to send its header.
    """

    wrapped: IStreamServerEndpoint
    clock: IReactorTime
    headerTimeout: float = PROXY_HEADER_TIMEOUT

    def listen(self, protocolFactory: IProtocolFactory) -> "Deferred[IListeningPort]":
        """
        Listen on the wrapped endpoint with L{ProxyProtocolFactory} around
        C{protocolFactory}.
        """
        return self.wrapped.listen(
            ProxyProtocolFactory(protocolFactory, self.clock, self.headerTimeout)
        )


__all__ = [
    "PROXY_HEADER_TIMEOUT",
    "InvalidProxyHeader",
    "NoProxyHeader",
    "ProxyHeader",
    "ProxiedConnection",
    "ProxyProtocolEndpoint",
    "ProxyProtocolFactory",
    "parse_proxy_header",
]
