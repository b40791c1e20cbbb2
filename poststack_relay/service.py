# -*- test-case-name: tests.test_service,tests.test_shutdown,tests.test_tls_reload,tests.test_proxy_protocol -*-
"""
Service assembly: from a L{RelayConfig} to a running relay.

L{makeRelayService} is the public embedding API:

    from poststack_relay import RelayConfig, makeRelayService
    makeRelayService(RelayConfig(tls_cert="fullchain.pem", tls_key="key.pem"),
                     reactor).setServiceParent(application)

Stopping the service is graceful (L{RelayService.stopService}): the
listener closes first, sessions drain (up to C{drain_timeout}), and only
then is the API connection pool closed.  Nothing here installs signal
handlers: C{twistd} stops services on SIGTERM, and C{tap.makeService}
makes that stop end with exit status 0 and makes SIGHUP call
L{RelayService.reload_tls}.

With C{proxy_protocol} on, the listener expects a PROXY protocol v1 or v2
header (HAProxy, cloud TCP balancers) before the TLS ClientHello:
TCP -> L{ProxyProtocolFactory} -> implicit TLS -> SMTP.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.interfaces import IAddress, IDelayedCall, IProtocol, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper, HAProxyWrappingFactory
from zope.interface import directlyProvides, providedBy
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import IService, MultiService, Service
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory

from .api import HTTPEmailAPI, IEmailAPI
from .auth import AuthThrottle, PostStackChecker, RelayRealm
from .config import RelayConfig, mask_secret
from .delivery import RelayDelivery
from .smtp import RelayFactory
from .systemd import ReadinessService, SystemdNotifier, socketEndpoint
from .tls import ImplicitTLSFactory, ReloadableTLS

_log = Logger()


class _QuietHTTP11ClientFactory(_HTTP11ClientFactory):
    """
    The pool's connection factory without "Starting factory" log lines.
    """

    noisy = False


class _PoolService(Service):
    """
    Closes the API connection pool when the relay stops.
    """

    def __init__(self, pool: HTTPConnectionPool) -> None:
        self._pool = pool

    def stopService(self) -> Any:
        Service.stopService(self)
        return self._pool.closeCachedConnections()


# Seconds a connection may take to send its PROXY header (a balancer sends it
# at once, with the connection).
PROXY_HEADER_TIMEOUT = 10.0


class _ProxiedConnection(HAProxyProtocolWrapper):
    """
    Reads the PROXY header, and only then builds the wrapped protocol with
    the client's address and connects it.

    Twisted's own wrapper builds and connects the wrapped protocol as soon
    as TCP connects, so the factory's per-address limits and the session's
    C{connectionMade} would see the balancer's address; here neither runs
    before the header is parsed.  A connection whose first bytes are not a
    valid v1 or v2 header, or that sends none within the factory's
    C{headerTimeout}, is dropped without a reply.
    """

    factory: "ProxyProtocolFactory"

    def __init__(self, factory: "ProxyProtocolFactory") -> None:
        super().__init__(factory, Protocol())  # placeholder until the header
        self._buffer = b""
        self._started = False
        self._headerCall: Optional[IDelayedCall] = None

    def makeConnection(self, transport: Any) -> None:
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        if self.factory.headerTimeout > 0:
            self._headerCall = self.factory.clock.callLater(
                self.factory.headerTimeout, self._drop, "no PROXY header in time"
            )

    def _drop(self, reason: str) -> None:
        self._headerCall = None
        peer = self.transport.getPeer()
        _log.info(
            "dropped connection from {balancer}: {reason}",
            balancer=getattr(peer, "host", str(peer)),
            reason=reason,
            event="proxy_header_invalid",
        )
        self.disconnecting = 1
        self.transport.abortConnection()

    def _stopTimer(self) -> None:
        if self._headerCall is not None and self._headerCall.active():
            self._headerCall.cancel()
        self._headerCall = None

    def dataReceived(self, data: bytes) -> None:
        if self._started:
            self.wrappedProtocol.dataReceived(data)
            return
        if self.disconnecting:
            return
        if self._parser is None:
            self._buffer += data
            head = self._buffer
            if head.startswith(V1Parser.PROXYSTR):
                self._parser = V1Parser()
            elif len(head) < 13 and (
                V2Parser.PREFIX.startswith(head) or V1Parser.PROXYSTR.startswith(head)
            ):
                return  # not enough bytes yet to tell what this is
            elif head[:12] == V2Parser.PREFIX and head[12] & 0xF0 == 0x20:
                self._parser = V2Parser()
            else:
                self._stopTimer()
                self._drop("no PROXY protocol header")
                return
            data, self._buffer = head, b""
        try:
            info, remaining = self._parser.feed(data)
        except InvalidProxyHeader:
            self._stopTimer()
            self._drop("invalid PROXY protocol header")
            return
        if info is None:
            return
        self._proxyInfo = info
        self._stopTimer()
        protocol = self.factory.wrappedFactory.buildProtocol(self.getPeer())
        if protocol is None:
            self.transport.loseConnection()
            return
        self.wrappedProtocol = protocol
        self._started = True
        protocol.makeConnection(self)
        if remaining:
            protocol.dataReceived(remaining)

    def connectionLost(self, reason: Any = None) -> None:
        self._stopTimer()
        super().connectionLost(reason)


class ProxyProtocolFactory(HAProxyWrappingFactory):
    """
    Wraps a server factory so each connection starts with a PROXY protocol
    v1 or v2 header; the wrapped factory's C{buildProtocol} and its
    protocol's transport (C{getPeer}, C{getHost}) see the addresses from the
    header.  A v2 C{LOCAL} header (a balancer's health check) keeps the
    real TCP addresses.

    @ivar headerTimeout: seconds a connection may take to send the header
        (0: no limit).
    """

    protocol = _ProxiedConnection  # type: ignore[assignment]
    noisy = False

    def __init__(
        self,
        wrappedFactory: Any,
        clock: IReactorTime,
        headerTimeout: float = PROXY_HEADER_TIMEOUT,
    ) -> None:
        super().__init__(wrappedFactory)
        self.clock = clock
        self.headerTimeout = headerTimeout

    def buildProtocol(self, addr: IAddress | None) -> IProtocol:  # type: ignore[override]
        """
        A connection that waits for its PROXY header.
        """
        return _ProxiedConnection(self)


class RelayService(MultiService):
    """
    The relay: a listener and the API client's pool.

    @ivar factory: the SMTP factory (unwrapped).
    @ivar listener: the listening service; its C{_waitingForPort} Deferred
        fires with the C{IListeningPort} once bound.
    @ivar drain_timeout: seconds L{stopService} lets sessions finish.
    @ivar tls: the listener's TLS settings (L{reload_tls}).
    """

    factory: RelayFactory
    listener: StreamServerEndpointService
    tls: ReloadableTLS
    drain_timeout: float = 0.0
    readiness: Optional[ReadinessService] = None

    def reload_tls(self, trigger: str = "reload_tls()") -> bool:
        """
        Load the TLS certificate and key files again (C{twistd} calls this on
        SIGHUP).  New connections get the new certificate; sessions already
        open keep theirs.  If the new files cannot be used, the old ones
        stay and the reason is logged (C{tls_reload_failed}).

        @param trigger: why, for the log.
        @return: C{True} if the new files are in use.
        """
        return self.tls.reload(trigger)

    def stopService(self) -> "Deferred[None]":
        """
        Stop gracefully, in this order: stop listening; drain the sessions
        (idle ones get C{421 4.3.2} at once, the others after their
        current transaction is answered, and whatever is left after
        C{drain_timeout} seconds is dropped without a reply); then stop
        the other children (the API connection pool).  The Deferred fires
        when all of it is done.  Under systemd C{Type=notify}, C{STOPPING=1}
        is sent first.
        """
        if self.readiness is not None and self.running:
            self.readiness.stopping()
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self.listener.running:
            try:
                await maybeDeferred(self.listener.stopService)
            except Exception:
                _log.failure("stopping the listener failed", event="stop_listener_failed")
        await self.factory.drain(self.drain_timeout)
        for child in reversed(list(self)):
            if child is self.listener or not child.running:
                continue
            try:
                await maybeDeferred(child.stopService)
            except Exception:
                _log.failure("stopping {child} failed", child=child, event="stop_child_failed")

    def port(self) -> Any:
        """
        A Deferred firing with the listening port (for tests using port 0).
        """
        return self.listener._waitingForPort


def _endpoint(config: RelayConfig, reactor: Any) -> IStreamServerEndpoint:
    if config.systemd_socket:
        return socketEndpoint(reactor, config.systemd_socket)
    if ":" in config.interface:
        return TCP6ServerEndpoint(reactor, config.port, interface=config.interface)
    return TCP4ServerEndpoint(reactor, config.port, interface=config.interface)


def makeRelayService(
    config: RelayConfig,
    reactor: Any,
    api: Optional[IEmailAPI] = None,
    endpoint: Optional[IStreamServerEndpoint] = None,
) -> RelayService:
    """
    Build the relay as one C{IService}.

    @param config: the settings.
    @param reactor: provides C{IReactorTCP} and C{IReactorTime} (and
        C{IReactorPluggableNameResolver} for a real API URL).
    @param api: the API client; by default an L{HTTPEmailAPI} over a
        persistent treq connection pool to C{config.api_url}.
    @param endpoint: where to listen; by default the systemd socket named
        C{config.systemd_socket} if set, else TCP on C{config.port} and
        C{config.interface}.  It is wrapped in implicit TLS (and, with
        C{config.proxy_protocol}, in L{ProxyProtocolFactory} below TLS).
    @raise poststack_relay.config.ConfigError: if the certificate or key
        cannot be used.
    """
    tls = ReloadableTLS(config.tls_cert, config.tls_key, config.tls_profile)
    service = RelayService()
    if api is None:
        import treq.client

        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 64
        pool.retryAutomatically = False  # POST retries are the relay's decision
        pool._factory = _QuietHTTP11ClientFactory
        client = treq.client.HTTPClient(Agent(reactor, pool=pool, connectTimeout=10))
        api = HTTPEmailAPI(
            client,
            config.api_url,
            config.api_timeout,
            config.service_key,
            clock=reactor,
            deadline=config.api_deadline,
            max_in_flight=config.api_max_in_flight,
            queue_timeout=config.api_queue_timeout,
            breaker_failures=config.api_breaker_failures,
            breaker_cooldown=config.api_breaker_cooldown,
        )
        _PoolService(pool).setServiceParent(service)

    checker = PostStackChecker(
        api,
        reactor,
        config.service_key,
        positive_ttl=config.auth_cache_ttl,
        negative_ttl=config.auth_negative_ttl,
    )
    portal = Portal(
        RelayRealm(lambda identity: RelayDelivery(identity, api, config.derive_idempotency_keys)),
        [checker],
    )
    throttle = AuthThrottle(
        reactor,
        window=config.auth_failure_window,
        per_ip=config.auth_failures_per_ip,
        per_user=config.auth_failures_per_user,
        delay=config.auth_failure_delay,
        max_delay=config.auth_failure_max_delay,
    )
    factory = RelayFactory(portal, config, reactor, throttle=throttle)
    wrapped: Any = ImplicitTLSFactory(tls, factory, config.tls_detect_timeout, reactor)
    if config.proxy_protocol:
        # The PROXY header comes before the TLS ClientHello.
        wrapped = ProxyProtocolFactory(wrapped, reactor)
    listener = StreamServerEndpointService(endpoint or _endpoint(config, reactor), wrapped)
    listener._raiseSynchronously = True  # a failed bind stops start-up
    listener.setServiceParent(service)
    # After the listener, so its port Deferred exists when this starts.
    readiness = ReadinessService(SystemdNotifier(), service)
    readiness.setServiceParent(service)
    service.readiness = readiness
    if config.tls_reload_interval > 0:
        # Picks up renewed certificates (ACME) without a SIGHUP.
        poll = TimerService(config.tls_reload_interval, tls.reload_if_changed)
        poll.clock = reactor
        poll.setServiceParent(service)
    service.tls = tls
    service.factory = factory
    service.listener = listener
    service.drain_timeout = config.drain_timeout
    _log.info(
        "poststack-relay listening on {where} (implicit TLS{proxy}), API {api_url}, "
        "service key {service_key}",
        where=(
            f"systemd socket {config.systemd_socket!r}"
            if config.systemd_socket and endpoint is None
            else f"{config.interface or '*'}:{config.port}"
        ),
        interface=config.interface or "*",
        port=config.port,
        proxy=" behind PROXY protocol" if config.proxy_protocol else "",
        api_url=config.api_url,
        service_key=mask_secret(config.service_key),
        event="relay_configured",
    )
    _log.info(
        "TLS profile {profile}, certificate {subject} serial {serial}, valid until {not_after}, "
        "chain of {chain_length}; reload on SIGHUP{poll}",
        profile=config.tls_profile,
        chain_length=1 + len(tls.current.extraCertChain),
        poll=(
            f" and when the files change (checked every {config.tls_reload_interval:g} s)"
            if config.tls_reload_interval > 0
            else ""
        ),
        event="tls_configured",
        **tls.current.describe(),
    )
    return service
