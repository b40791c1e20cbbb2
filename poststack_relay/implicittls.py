# -*- test-case-name: tests.test_tls,tests.test_endpoints,tests.test_metrics,tests.test_door -*-
"""
Implicit TLS (RFC 8314) on any stream server endpoint, with polite refusal
of plaintext clients.

The relay does not listen with C{SSL4ServerEndpoint}: L{ImplicitTLSEndpoint}
wraps whatever endpoint it listens on (TCP, a C{systemd:} socket, a
supervisor's shared socket, a L{ProxyProtocolEndpoint
<poststack_relay.proxyprotocol.ProxyProtocolEndpoint>}) in a
L{TLSMemoryBIOFactory}, the way txsni's C{TLSEndpoint} does and what
C{listenSSL} does inside Twisted, with one addition a bare
C{SSL4ServerEndpoint} cannot make: the wrapper sees the first bytes before
OpenSSL does, so a client that speaks plaintext SMTP or waits for a banner
(a STARTTLS-configured client on the implicit-TLS port) is told in one
plaintext C{554 5.7.0} line what is wrong instead of timing out in silence.

The TLS settings themselves (profiles, certificates, reload) are
L{poststack_relay.tls}'s; C{implicittls:} endpoint descriptions are parsed
by L{poststack_relay.endpoints}.
"""

from __future__ import annotations

from typing import Optional

import attrs
from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IListeningPort,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
    ITransport,
)
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from .metrics import RelayMetrics
from .replies import NOT_TLS

# The namespace the relay's logs have always shown for these events.
_log = Logger(namespace="poststack_relay.tls")

# A TLS record starts with content type 22 (handshake).
_TLS_HANDSHAKE = 0x16


class ImplicitTLSProtocol(BufferingTLSTransport):
    """
    A server TLS connection that refuses plaintext clients politely.

    If the first byte is not a TLS handshake record, or no byte arrives
    within the factory's C{detectTimeout}, one plaintext C{554 5.7.0} line is
    written under the TLS layer and the connection closes.  The application
    protocol's own greeting is inside TLS and is never seen in plaintext.

    The whole handshake must end within the factory's C{handshakeTimeout}
    (from the connection, or from the PROXY header behind a balancer), or
    the connection is dropped: a client that sends one byte and stalls
    holds its place for seconds, not for the session's idle time-out.

    A connection that never completes the handshake is counted once in the
    factory's metrics (C{tls_handshake_failures_total}): C{plaintext},
    C{timeout} (no byte within C{detectTimeout}), C{handshake} (an OpenSSL
    error: no common protocol or cipher, a client alert...), C{closed}
    (the client left mid-handshake) or C{handshake_timeout} (not done
    within C{handshakeTimeout}).  A connection that closes before
    sending any byte (a TCP health check) is not counted.
    """

    factory: "ImplicitTLSFactory"
    _detectCall: Optional[IDelayedCall] = None
    _handshakeCall: Optional[IDelayedCall] = None
    _sawFirstByte = False
    _failureCounted = False
    _handshakeSeen = False

    def makeConnection(self, transport: ITransport) -> None:
        """
        Connect, and start waiting for the client's first byte.
        """
        super().makeConnection(transport)  # type: ignore[no-untyped-call]  # TLSMemoryBIOProtocol: unannotated in Twisted
        timeout = self.factory.detectTimeout
        if timeout and self.transport is not None and not self._sawFirstByte:
            self._detectCall = self.factory.clock.callLater(timeout, self._refusePlaintext)
        limit = self.factory.handshakeTimeout
        if limit and self.transport is not None and not self._handshakeSeen:
            self._handshakeCall = self.factory.clock.callLater(limit, self._handshakeExpired)

    def dataReceived(self, data: bytes) -> None:
        """
        Refuse a first byte that does not start a TLS record; pass the rest
        to TLS.
        """
        if not self._sawFirstByte and data:
            self._sawFirstByte = True
            self._cancelDetect()
            if data[0] != _TLS_HANDSHAKE:
                self._refusePlaintext("plaintext")
                return
        super().dataReceived(data)  # type: ignore[no-untyped-call]  # TLSMemoryBIOProtocol: unannotated in Twisted
        if not self._handshakeSeen:
            self._checkHandshake()

    def _checkHandshake(self) -> None:
        """
        After bytes of the handshake: note that it is done, or count it as
        failed if OpenSSL gave up on it (a client alert, no common protocol
        or cipher, bytes that are not TLS...).

        Both come from pyOpenSSL's public view of the connection: the
        client's Finished message arrives last in a TLS 1.3 handshake, and
        in a full TLS 1.2 one (the relay resumes no sessions) the server
        answers it in the same step; after a fatal error OpenSSL's state is
        C{"error"}.  An end of file mid-handshake only shows in
        C{connectionLost} (C{closed}), never here.
        """
        handle: Optional[SSL.Connection] = self.getHandle()  # type: ignore[no-untyped-call]  # TLSMemoryBIOProtocol: unannotated in Twisted
        if handle is None:
            return
        if handle.get_peer_finished() is not None:
            self._handshakeSeen = True
            self._cancelHandshakeTimer()
        elif handle.get_state_string() == b"error":
            self._countFailure("handshake")

    def _cancelDetect(self) -> None:
        if self._detectCall is not None and self._detectCall.active():
            self._detectCall.cancel()
        self._detectCall = None

    def _cancelHandshakeTimer(self) -> None:
        if self._handshakeCall is not None and self._handshakeCall.active():
            self._handshakeCall.cancel()
        self._handshakeCall = None

    def _handshakeExpired(self) -> None:
        self._handshakeCall = None
        if self._handshakeSeen:
            return
        self._countFailure("handshake_timeout")
        transport = self.transport
        assert transport is not None, "not connected"
        peer = transport.getPeer()
        _log.info(
            "dropped {client}: TLS handshake not finished within {timeout}s",
            client=getattr(peer, "host", str(peer)),
            timeout=self.factory.handshakeTimeout,
            event="tls_handshake_timeout",
        )
        abort = getattr(transport, "abortConnection", None)
        if abort is not None:
            abort()
        else:
            transport.loseConnection()

    def _refusePlaintext(self, reason: str = "timeout") -> None:
        self._detectCall = None
        self._sawFirstByte = True
        self._countFailure(reason)
        transport = self.transport
        assert transport is not None, "not connected"
        peer = transport.getPeer()
        _log.info(
            "refused plaintext client {client}: port requires implicit TLS; "
            + (
                "it sent nothing for {seconds:g} s (it waits for a plaintext greeting: "
                "configured for STARTTLS or plain SMTP)"
                if reason == "timeout"
                else "its first bytes were not TLS"
            ),
            client=getattr(peer, "host", str(peer)),
            reason=reason,
            seconds=self.factory.detectTimeout,
            event="tls_plaintext_refused",
        )
        # Written under the TLS layer, in clear.
        transport.write(NOT_TLS.line())
        transport.loseConnection()

    def _countFailure(self, reason: str) -> None:
        if not self._failureCounted:
            self._failureCounted = True
            self.factory.metrics.tls_failures[reason].inc()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Stop waiting; count a client that left mid-handshake.
        """
        self._cancelDetect()
        self._cancelHandshakeTimer()
        super().connectionLost(reason)
        if self._sawFirstByte and not self._handshakeSeen:
            self._countFailure("closed")


class ImplicitTLSFactory(TLSMemoryBIOFactory):
    """
    Wraps a server factory (the relay's SMTP factory) in server-side TLS
    with plaintext detection.

    @ivar connectionCreator: where each connection's C{SSL.Connection}
        comes from (L{poststack_relay.tls.ReloadableTLS} in the relay).
    @ivar detectTimeout: seconds to wait for the first byte (0: forever).
    @ivar handshakeTimeout: seconds the whole handshake may take (0:
        forever).
    @ivar clock: for C{detectTimeout} and C{handshakeTimeout}.
    @ivar metrics: where handshake failures are counted (a private
        L{RelayMetrics} if none is given).
    """

    protocol = ImplicitTLSProtocol

    def __init__(
        self,
        contextFactory: IOpenSSLServerConnectionCreator,
        wrappedFactory: IProtocolFactory,
        detectTimeout: float,
        clock: IReactorTime,
        metrics: Optional[RelayMetrics] = None,
        handshakeTimeout: float = 0.0,
    ) -> None:
        super().__init__(contextFactory, False, wrappedFactory, clock)
        self.connectionCreator = contextFactory
        self.clock: IReactorTime = clock
        self.detectTimeout = detectTimeout
        self.handshakeTimeout = handshakeTimeout
        self.metrics = metrics if metrics is not None else RelayMetrics()

    def buildProtocol(self, addr: Optional[IAddress]) -> Optional[ImplicitTLSProtocol]:  # type: ignore[override]  # None: refused
        """
        The wrapped factory's protocol inside TLS; C{None} (the connection
        is closed at once, no handshake) if the wrapped factory refuses it
        without a word.
        """
        wrapped = self.wrappedFactory.buildProtocol(addr)
        if wrapped is None:
            return None
        return self.protocol(self, wrapped)


@implementer(IStreamServerEndpoint)
@attrs.frozen
class ImplicitTLSEndpoint:
    """
    A stream server endpoint speaking implicit TLS (with plaintext
    detection, see the module) on top of another endpoint.

    @ivar wrapped: where to listen: TCP, a systemd socket, a
        L{ProxyProtocolEndpoint
        <poststack_relay.proxyprotocol.ProxyProtocolEndpoint>}...
    @ivar tls: the server's TLS settings (an
        C{IOpenSSLServerConnectionCreator}: L{poststack_relay.tls.TLSOptions}
        or L{poststack_relay.tls.ReloadableTLS}).
    @ivar clock: for C{detectTimeout} and TLS's own buffering.
    @ivar detectTimeout: seconds to wait for a client's first byte before
        telling it, in plaintext, that the port needs TLS (0: never).
    @ivar metrics: where handshake failures are counted; C{None}: nowhere
        shared.
    @ivar handshakeTimeout: seconds the whole TLS handshake may take before
        the connection is dropped (0: no limit).
    """

    wrapped: IStreamServerEndpoint
    tls: IOpenSSLServerConnectionCreator
    clock: IReactorTime
    detectTimeout: float
    metrics: Optional[RelayMetrics] = None
    handshakeTimeout: float = 0.0

    def listen(self, protocolFactory: IProtocolFactory) -> "Deferred[IListeningPort]":
        """
        Listen on the wrapped endpoint with C{protocolFactory} inside
        implicit TLS.
        """
        return self.wrapped.listen(
            ImplicitTLSFactory(
                self.tls,
                protocolFactory,
                self.detectTimeout,
                self.clock,
                metrics=self.metrics,
                handshakeTimeout=self.handshakeTimeout,
            )
        )


__all__ = [
    "ImplicitTLSEndpoint",
    "ImplicitTLSFactory",
    "ImplicitTLSProtocol",
]
