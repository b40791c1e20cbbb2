# -*- test-case-name: tests.test_service,tests.test_shutdown,tests.test_tls_reload,tests.test_proxy_protocol,tests.test_listeners,tests.test_workers -*-
"""
Service assembly: from a L{RelayConfig} to a running relay.

L{makeRelayService} is the public embedding API:

    from poststack_relay import RelayConfig, makeRelayService
    makeRelayService(RelayConfig(tls_cert="fullchain.pem", tls_key="key.pem"),
                     reactor).setServiceParent(application)

Stopping the service is graceful (L{RelayService.stopService}): the
listeners close first, sessions drain (up to C{drain_timeout}), and only
then are the API client's idle connections closed.  Nothing here installs
signal handlers: C{twistd} stops services on SIGTERM, and C{tap.makeService}
makes that stop end with exit status 0 and makes SIGHUP call
L{RelayService.reload_tls}.

With C{proxy_protocol} on, the listener expects a PROXY protocol v1 or v2
header (HAProxy, cloud TCP balancers) before the TLS ClientHello:
TCP -> L{ProxyProtocolFactory} -> implicit TLS -> SMTP.

Each C{listen} spec adds a listener (L{RelayConfig.listeners}), wrapped the
same way with its own PROXY setting and certificate.  All listeners share
the one SMTP factory, so connection limits, the drain and AUTH throttling
count every listener together.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Optional, Sequence

from twisted.internet.interfaces import IAddress, IDelayedCall, IProtocol, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper, HAProxyWrappingFactory
from zope.interface import directlyProvides, providedBy
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import MultiService, Service
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, DeferredList, gatherResults, maybeDeferred
from twisted.internet.endpoints import (
    AdoptedStreamServerEndpoint,
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
)
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger

from .api import APIEndpoints, HTTPEmailAPI, IEmailAPI
from .auth import AuthThrottle, PostStackChecker, RelayRealm
from .config import ConfigError, ListenerConfig, RelayConfig, mask_secret
from .delivery import RelayDelivery
from .http11 import HTTP11Client
from .smtp import RelayFactory
from .systemd import ReadinessService, SystemdNotifier, socketEndpoint
from .tls import ImplicitTLSFactory, ReloadableTLS
from .metrics import ApiProbeService, RelayMetrics, makeMetricsService, relay_readiness

_log = Logger()


class _PoolService(Service):
    """
    Closes the API client's idle connections when the relay stops.
    """

    def __init__(self, client: HTTP11Client) -> None:
        self.client = client

    def stopService(self) -> Any:
        Service.stopService(self)
        return self.client.close_idle()


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


# Seconds between API probes when no real traffic shows the API reachable;
# /readyz fails after two missed probes and one attempt's time-out.
API_PROBE_INTERVAL = 15.0


class RelayService(MultiService):
    """
    The relay: its listeners and the API client's pool.

    @ivar factory: the SMTP factory (unwrapped), shared by every listener.
    @ivar listeners: the listening services, the main listener first, in
        the order of L{RelayConfig.listeners}; each one's
        C{_waitingForPort} Deferred fires with its C{IListeningPort} once
        bound.
    @ivar listener: the main listening service (C{listeners[0]}).
    @ivar listener_configs: the settings of each of L{listeners}.
    @ivar certificates: every distinct TLS setting the listeners use, the
        main listener's first (L{reload_tls}); listeners that serve the
        same certificate and key files share one.
    @ivar tls: the main listener's TLS settings (C{certificates[0]}).
    @ivar drain_timeout: seconds L{stopService} lets sessions finish.
    """

    factory: RelayFactory
    listener: StreamServerEndpointService
    listeners: list[StreamServerEndpointService]
    listener_configs: list[ListenerConfig]
    tls: ReloadableTLS
    certificates: list[ReloadableTLS]
    drain_timeout: float = 0.0
    readiness: Optional[ReadinessService] = None

    def privilegedStartService(self) -> None:
        """
        Bind every listener (C{twistd} calls this before it drops
        privileges).  If one cannot bind, the listeners already bound are
        closed again and the error is raised, so start-up stops with it.
        """
        try:
            super().privilegedStartService()
        except BaseException:
            self._abandon()
            raise

    def startService(self) -> None:
        """
        Start every child (binding the listeners not bound yet).  If a
        listener cannot bind, the listeners already bound are closed again
        and the error is raised, so start-up stops with it.
        """
        try:
            super().startService()
        except BaseException:
            self._abandon()
            raise

    def _abandon(self) -> None:
        """
        Undo a start that failed: close the ports already bound and stop
        the children already started.
        """
        self.running = 0
        for child in reversed(list(self)):
            # The SMTP listeners and the metrics listener bind before they run.
            bound = getattr(child, "_waitingForPort", None) is not None
            if child.running or bound:
                maybeDeferred(child.stopService).addErrback(
                    lambda f, child=child: _log.failure(
                        "stopping {child} failed", f, child=child, event="stop_child_failed"
                    )
                )

    def reload_tls(self, trigger: str = "reload_tls()") -> bool:
        """
        Load every listener's TLS certificate and key files again (C{twistd}
        calls this on SIGHUP).  New connections get the new certificates;
        sessions already open keep theirs.  If a certificate's new files
        cannot be used, its old ones stay and the reason is logged
        (C{tls_reload_failed}); the others are reloaded all the same.

        @param trigger: why, for the log.
        @return: C{True} if the new files of every certificate are in use.
        """
        results = [tls.reload(trigger) for tls in self.certificates]
        return all(results)

    def _reload_changed(self) -> None:
        """
        Reload each certificate whose files changed (the file poll).
        """
        for tls in self.certificates:
            tls.reload_if_changed()

    def stopService(self) -> "Deferred[None]":
        """
        Stop gracefully, in this order: stop listening (every listener);
        drain the sessions (idle ones get C{421 4.3.2} at once, the others
        after their current transaction is answered, and whatever is left
        after C{drain_timeout} seconds is dropped without a reply); then
        stop the other children (the API connection pool).  The Deferred
        fires when all of it is done.  Under systemd C{Type=notify},
        C{STOPPING=1} is sent first.
        """
        if self.readiness is not None and self.running:
            self.readiness.stopping()
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        stopping = [
            maybeDeferred(listener.stopService).addErrback(
                lambda f, label=label: _log.failure(
                    "stopping the listener {listener} failed",
                    f,
                    listener=label,
                    event="stop_listener_failed",
                )
            )
            for listener, label in zip(self.listeners, [c.label for c in self.listener_configs])
            if listener.running
        ]
        if stopping:
            await DeferredList(stopping)
        await self.factory.drain(self.drain_timeout)
        for child in reversed(list(self)):
            if child in self.listeners or not child.running:
                continue
            try:
                await maybeDeferred(child.stopService)
            except Exception:
                _log.failure("stopping {child} failed", child=child, event="stop_child_failed")

    def port(self) -> Any:
        """
        A Deferred firing with the main listener's port once bound (for
        tests using port 0); C{None} before L{startService}.
        """
        return self.listener._waitingForPort

    def ports(self) -> "Optional[Deferred[list[Any]]]":
        """
        A Deferred firing with every listener's C{IListeningPort}, in the
        order of L{listeners}, once all are bound; C{None} before
        L{startService}.
        """
        waiting = [listener._waitingForPort for listener in self.listeners]
        if any(d is None for d in waiting):
            return None
        return gatherResults(waiting)


def _endpoint(listener: ListenerConfig, reactor: Any) -> IStreamServerEndpoint:
    """
    Where C{listener} listens: its systemd socket, else TCP over IPv6 or
    IPv4 by the interface.

    @raise ConfigError: the systemd socket was not passed.
    """
    if listener.systemd_socket:
        try:
            return socketEndpoint(reactor, listener.systemd_socket)
        except ConfigError as e:
            if not listener.spec:
                raise
            raise ConfigError(f"listen {listener.spec!r}: {e}") from None
    if ":" in listener.interface:
        return TCP6ServerEndpoint(reactor, listener.port, interface=listener.interface)
    return TCP4ServerEndpoint(reactor, listener.port, interface=listener.interface)


def _adopted(reactor: Any, fd: int) -> IStreamServerEndpoint:
    """
    An endpoint that takes over the listening socket C{fd} (a supervisor's
    shared socket, L{poststack_relay.workers}); C{fd} is closed once the
    port has its own copy, so the port's C{stopListening} really closes
    this process's hold on the socket.
    """
    probe = socket.socket(fileno=os.dup(fd))
    try:
        family = probe.family
    finally:
        probe.close()
    return AdoptedStreamServerEndpoint(reactor, fd, family)


def makeRelayService(
    config: RelayConfig,
    reactor: Any,
    api: Optional[IEmailAPI] = None,
    endpoint: Optional[IStreamServerEndpoint] = None,
    metrics: Optional[RelayMetrics] = None,
    adopt: Optional[Sequence[int]] = None,
) -> RelayService:
    """
    Build the relay as one C{IService}.

    @param config: the settings.
    @param reactor: provides C{IReactorTCP} and C{IReactorTime} (and
        C{IReactorPluggableNameResolver} for a real API URL).
    @param api: the API client; by default an L{HTTPEmailAPI} over an
        L{HTTP11Client} (keep-alive connections, at most 64 idle) to
        C{config.api_url}.
    @param endpoint: where the main listener listens; by default the
        systemd socket named C{config.systemd_socket} if set, else TCP on
        C{config.port} and C{config.interface}.  It is wrapped in implicit
        TLS (and, with C{config.proxy_protocol}, in L{ProxyProtocolFactory}
        below TLS).  The listeners of C{config.listen} always use their own
        spec's address.
    @param metrics: where the relay counts; by default a new
        L{RelayMetrics} with its own registry (C{service.metrics}).  An
        embedder passing its own C{api} passes the same object to it.
        With C{config.metrics_listen} set, they are served on that
        address with C{/healthz} and C{/readyz} (C{service.metrics_service}).
    @param adopt: listening sockets to take over instead of binding, one
        file descriptor per listener of C{config.listeners()} in order:
        how a worker of C{--workers} (L{poststack_relay.workers}) listens
        on its supervisor's shared sockets.  Not with C{endpoint}.
    @raise poststack_relay.config.ConfigError: if a certificate or key
        cannot be used, or a systemd socket was not passed.
    @raise ValueError: C{adopt} does not have one descriptor per listener.
    """
    listeners = config.listeners()
    if adopt is not None and (len(adopt) != len(listeners) or endpoint is not None):
        raise ValueError(
            f"adopt: want one file descriptor per listener ({len(listeners)}) and no endpoint, "
            f"not {list(adopt)!r}"
        )
    if metrics is None:
        metrics = RelayMetrics()
    # One ReloadableTLS per distinct pair of files: listeners without a
    # certificate of their own share the main listener's.
    certificates: list[ReloadableTLS] = []
    by_files: dict[tuple[str, Optional[str]], ReloadableTLS] = {}
    tls_of: list[ReloadableTLS] = []
    for listener in listeners:
        files = (listener.tls_cert, listener.tls_key)
        if files not in by_files:
            try:
                by_files[files] = ReloadableTLS(*files, config.tls_profile, metrics=metrics)
            except ConfigError as e:
                if not listener.spec:
                    raise
                raise ConfigError(f"listen {listener.spec!r}: {e}") from None
            certificates.append(by_files[files])
        tls_of.append(by_files[files])
    endpoints = [
        endpoint if index == 0 and endpoint is not None
        else _adopted(reactor, adopt[index]) if adopt is not None
        else _endpoint(listener, reactor)
        for index, listener in enumerate(listeners)
    ]
    service = RelayService()
    if api is None:
        # The relay's own HTTP/1.1 client, not Twisted's agent and pool:
        # a third of the CPU per request (docs/performance.md).  Like the
        # pool before it (retryAutomatically = False), it never retries:
        # POST retries are the relay's decision.
        client = HTTP11Client(reactor, APIEndpoints(reactor, 10), max_idle_per_host=64)
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
            metrics=metrics,
        )
        _PoolService(client).setServiceParent(service)

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
    factory = RelayFactory(portal, config, reactor, throttle=throttle, metrics=metrics)
    service.factory = factory
    service.listeners = []
    service.listener_configs = list(listeners)
    for index, (listener, tls) in enumerate(zip(listeners, tls_of)):
        wrapped: Any = ImplicitTLSFactory(
            tls, factory, config.tls_detect_timeout, reactor, metrics=metrics
        )
        if listener.proxy_protocol:
            # The PROXY header comes before the TLS ClientHello.
            wrapped = ProxyProtocolFactory(wrapped, reactor)
        listening = StreamServerEndpointService(endpoints[index], wrapped)
        listening._raiseSynchronously = True  # a failed bind stops start-up
        listening.setServiceParent(service)
        service.listeners.append(listening)
    # After the listeners, so their port Deferreds exist when this starts.
    readiness = ReadinessService(SystemdNotifier(), service)
    readiness.setServiceParent(service)
    service.readiness = readiness
    if config.tls_reload_interval > 0:
        # Picks up renewed certificates (ACME) without a SIGHUP.
        poll = TimerService(config.tls_reload_interval, service._reload_changed)
        poll.clock = reactor
        poll.setServiceParent(service)
    service.metrics = metrics
    service.metrics_service = None
    if config.metrics_enabled:
        if callable(getattr(api, "probe", None)):
            # Keeps /readyz's "API reachable recently" true while idle.
            ApiProbeService(api, reactor, API_PROBE_INTERVAL).setServiceParent(service)
        readiness_check = relay_readiness(
            lambda: zip([c.label for c in service.listener_configs], service.listeners),
            factory,
            api,
            2 * API_PROBE_INTERVAL + config.api_timeout,
        )
        # Stopped after the drain (a child, not a listener): /readyz says
        # "stopping" while sessions finish, so balancers stop sending.
        service.metrics_service = makeMetricsService(
            metrics, config.metrics_listen, reactor, readiness_check
        )
        service.metrics_service.setServiceParent(service)
    service.tls = certificates[0]
    service.certificates = certificates
    service.listener = service.listeners[0]
    service.drain_timeout = config.drain_timeout
    _log_configuration(config, listeners, tls_of, certificates, injected=endpoint is not None)
    return service


def _log_configuration(
    config: RelayConfig,
    listeners: tuple[ListenerConfig, ...],
    tls_of: list[ReloadableTLS],
    certificates: list[ReloadableTLS],
    injected: bool,
) -> None:
    """
    Log C{relay_configured} once, C{listener_configured} per listener and
    C{tls_configured} per distinct certificate.
    """

    def label(index: int, listener: ListenerConfig) -> str:
        if index == 0 and injected:
            # An embedder's endpoint: only the configured port is known.
            return ListenerConfig(interface=config.interface, port=config.port).label
        return listener.label

    labels = [label(i, listener) for i, listener in enumerate(listeners)]
    _log.info(
        "poststack-relay listening on {where}, API {api_url}, service key {service_key}",
        where=", ".join(
            f"{name} (implicit TLS{' behind PROXY protocol' if listener.proxy_protocol else ''})"
            for name, listener in zip(labels, listeners)
        ),
        listeners=labels,
        interface=config.interface or "*",
        port=config.port,
        proxy=" behind PROXY protocol" if config.proxy_protocol else "",
        api_url=config.api_url,
        service_key=mask_secret(config.service_key),
        event="relay_configured",
    )
    for name, listener, tls in zip(labels, listeners, tls_of):
        _log.info(
            "listener {listener}: implicit TLS{proxy_text}, certificate {subject} from {tls_cert}",
            listener=name,
            proxy=listener.proxy_protocol,
            proxy_text=" behind PROXY protocol" if listener.proxy_protocol else "",
            tls_cert=tls.cert_path,
            tls_key=tls.key_path or tls.cert_path,
            own_certificate=tls is not certificates[0],
            spec=listener.spec,
            subject=tls.current.describe()["subject"],
            event="listener_configured",
        )
    for tls in certificates:
        users = [name for name, used in zip(labels, tls_of) if used is tls]
        _log.info(
            "TLS profile {profile}, certificate {subject} serial {serial}, "
            "valid until {not_after}, chain of {chain_length}; reload on SIGHUP{poll}{used_by}",
            profile=config.tls_profile,
            chain_length=1 + len(tls.current.extraCertChain),
            poll=(
                f" and when the files change (checked every {config.tls_reload_interval:g} s)"
                if config.tls_reload_interval > 0
                else ""
            ),
            tls_cert=tls.cert_path,
            listeners=users,
            used_by=f"; for {', '.join(users)}" if len(certificates) > 1 else "",
            event="tls_configured",
            **tls.current.describe(),
        )
