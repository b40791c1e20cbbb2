# -*- test-case-name: tests.test_service,tests.test_shutdown,tests.test_tls_reload,tests.test_listeners,tests.test_workers,tests.test_startup_lines -*-
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

The assembly, as the design card says it: for each listener (the main one,
then one per C{listen} spec, L{RelayConfig.listeners}) an endpoint ->
(a PROXY protocol header, when configured) -> implicit TLS with its
certificate (L{poststack_relay.endpoints.relay_endpoint}) -> the one
L{RelayFactory}, whose sessions log in through the cred portal
(L{PostStackChecker}, L{RelayRealm}) and deliver through the API client;
then the services around them: readiness for systemd, the certificate
file poll, metrics.  All listeners share the one SMTP factory, so
connection limits, the drain and AUTH throttling count every listener
together.
"""

from __future__ import annotations

from typing import Optional, Sequence, cast

from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, DeferredList, gatherResults, maybeDeferred, succeed
from twisted.internet.interfaces import IListeningPort, IReactorTime, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool

from .api import HTTPEmailAPI, make_http_client
from .auth import AuthThrottle, PostStackChecker, RelayRealm
from .config import ConfigError, RelayConfig, mask_secret
from .places import ListenerConfig
from .rates import RateLimit
from .delivery import RelayDelivery
from .endpoints import adopted_endpoint, listening_endpoint, relay_endpoint
from .fleet.service import make_fleet_state
from .holds import CredentialHolds
from .interfaces import IEmailAPI, IFleetState, IRelayReactor
from .listening import ListeningService, port_address, smtp_listener_name
from .metrics import RelayMetrics
from .monitoring import (
    ApiProbeService,
    MetricsService,
    Reachable,
    makeMetricsService,
    relay_readiness,
)
from .offload import TranslationPool
from .smtp import RelayFactory
from .systemd import ReadinessService, SystemdNotifier
from .tls import ReloadableTLS

_log = Logger()


class _APIClientService(Service):
    """
    When the relay stops (after the drain): stops the API client's circuit
    breaker probing, then closes the client's idle connections (when the
    relay made the pool).
    """

    def __init__(self, api: HTTPEmailAPI, pool: Optional[HTTPConnectionPool]) -> None:
        self.api = api
        self.pool = pool

    def stopService(self) -> "Deferred[None]":
        Service.stopService(self)  # type: ignore[no-untyped-call]  # Service: unannotated in Twisted
        self.api.stop()
        if self.pool is None:
            return succeed(None)
        return self.pool.closeCachedConnections()  # type: ignore[no-any-return, no-untyped-call]  # (untyped in Twisted)


# Seconds between API probes when no real traffic shows the API reachable;
# /readyz fails after two missed probes and one attempt's time-out.
API_PROBE_INTERVAL = 15.0


class RelayService(MultiService):
    """
    The relay: its listeners and the services around them.

    @ivar factory: the SMTP factory (unwrapped), shared by every listener.
    @ivar listeners: the listening services, the main listener first, in
        the order of L{RelayConfig.listeners}.
    @ivar listener: the main listening service (C{listeners[0]}).
    @ivar listener_configs: the settings of each of L{listeners}.
    @ivar certificates: every distinct TLS setting the listeners use, the
        main listener's first (L{reload_tls}); listeners that serve the
        same certificate and key files share one.
    @ivar tls: the main listener's TLS settings (C{certificates[0]}).
    @ivar drain_timeout: seconds L{stopService} lets sessions finish.
    @ivar readiness: tells systemd when the relay is ready and stopping.
    @ivar metrics: where the relay counts.
    @ivar fleet_state: what the relay shares with a fleet (its own memory
        without C{redis_url}: L{poststack_relay.fleet}).
    @ivar metrics_service: the HTTP listener of C{/metrics}, C{/healthz}
        and C{/readyz}; C{None} when C{metrics_listen} is off.
    @ivar announce: whether L{startService} logs C{relay_listening} once
        every listener is bound (a C{--workers} worker says C{worker_ready}
        instead).
    """

    announce = True

    def __init__(
        self,
        factory: RelayFactory,
        metrics: RelayMetrics,
        certificates: Sequence[ReloadableTLS],
        drain_timeout: float,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # MultiService: unannotated in Twisted
        self.factory = factory
        self.metrics = metrics
        self.certificates = list(certificates)
        self.tls = self.certificates[0]
        self.drain_timeout = drain_timeout
        self.listeners: list[ListeningService] = []
        self.listener_configs: list[ListenerConfig] = []
        self.readiness: Optional[ReadinessService] = None
        self.metrics_service: Optional[MetricsService] = None
        self.fleet_state: Optional[IFleetState] = None

    @property
    def listener(self) -> ListeningService:
        """
        The main listener's service.
        """
        return self.listeners[0]

    def add_listener(self, config: ListenerConfig, listening: ListeningService) -> None:
        """
        Add one SMTP listener (in the order of L{RelayConfig.listeners}).
        """
        self.listener_configs.append(config)
        self.listeners.append(listening)
        self.addService(listening)  # type: ignore[no-untyped-call]  # MultiService: unannotated in Twisted

    def privilegedStartService(self) -> None:
        """
        Bind every listener (C{twistd} calls this before it drops
        privileges).  If one cannot bind, the listeners already bound are
        closed again and the error is raised, so start-up stops with it.
        """
        try:
            super().privilegedStartService()  # type: ignore[no-untyped-call]  # MultiService: unannotated in Twisted
        except BaseException:
            self._abandon()
            raise

    def startService(self) -> None:
        """
        Start every child (binding the listeners not bound yet).  If a
        listener cannot bind, the listeners already bound are closed again
        and the error is raised, so start-up stops with it
        (L{poststack_relay.listening.ListenFailed}, one line, for the
        relay's own listeners).  Once every listener (SMTP and metrics) is
        bound, C{relay_listening} is logged (unless C{announce} is off).
        """
        try:
            super().startService()  # type: ignore[no-untyped-call]  # MultiService: unannotated in Twisted
        except BaseException:
            self._abandon()
            raise
        if self.announce:
            self._announce_when_listening()

    def _announce_when_listening(self) -> None:
        """
        Log C{relay_listening} once every listener is bound; nothing if
        one could not bind (that is logged as its failure).
        """
        ports: "Optional[Deferred[object]]" = cast("Optional[Deferred[object]]", self.ports())
        metrics: "Optional[Deferred[object]]" = cast(
            "Optional[Deferred[object]]",
            self.metrics_service.when_listening() if self.metrics_service is not None else succeed(None),
        )
        if ports is None or metrics is None:
            return

        def announce(results: list[object]) -> None:
            smtp, metrics_port = cast("list[Optional[IListeningPort]]", results[0]), results[1]
            if any(port is None for port in smtp) or (self.metrics_service is not None and metrics_port is None):
                return
            listeners = [port_address(cast(IListeningPort, port)) for port in smtp]
            where = ", ".join(
                f"{address} (implicit TLS{' behind PROXY protocol' if config.proxy_protocol else ''})"
                for address, config in zip(listeners, self.listener_configs)
            )
            text = "poststack-relay listening on {where}"
            metrics_address = None
            if metrics_port is not None:
                metrics_address = port_address(cast(IListeningPort, metrics_port))
                text += "; metrics, /healthz and /readyz on http://{metrics}"
            _log.info(text, where=where, listeners=listeners, metrics=metrics_address, event="relay_listening")

        gatherResults([ports, metrics]).addCallback(announce).addErrback(
            lambda f: _log.failure("announcing the listeners failed", f, event="relay_listening_crash")
        )

    def _abandon(self) -> None:
        """
        Undo a start that failed: close the ports already bound and stop
        the children already started.
        """
        self.running = 0
        for child in reversed(list(self)):
            # The SMTP listeners and the metrics listener bind before they run.
            bound = isinstance(child, ListeningService) and child.started_listening
            if child.running or bound:
                maybeDeferred(child.stopService).addErrback(self._log_stop_failure, child)

    @staticmethod
    def _log_stop_failure(failure: Failure, child: object) -> None:
        _log.failure("stopping {child} failed", failure, child=child, event="stop_child_failed")

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
        Service.stopService(self)  # type: ignore[no-untyped-call]  # Service: unannotated in Twisted
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        stopping = [
            maybeDeferred(listener.stopService).addErrback(self._log_listener_failure, config.label)
            for listener, config in zip(self.listeners, self.listener_configs)
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

    @staticmethod
    def _log_listener_failure(failure: Failure, label: str) -> None:
        _log.failure(
            "stopping the listener {listener} failed",
            failure,
            listener=label,
            event="stop_listener_failed",
        )

    def port(self) -> "Optional[Deferred[Optional[IListeningPort]]]":
        """
        A Deferred firing with the main listener's port once bound (for
        tests using port 0); C{None} before L{startService}.
        """
        return self.listener.when_listening()

    def ports(self) -> "Optional[Deferred[list[Optional[IListeningPort]]]]":
        """
        A Deferred firing with every listener's C{IListeningPort} (C{None}
        for one that could not bind), in the order of L{listeners}, once
        all are settled; C{None} before L{startService}.
        """
        waiting = [listener.when_listening() for listener in self.listeners]
        ready = [d for d in waiting if d is not None]
        if len(ready) != len(waiting):
            return None
        return gatherResults(ready)


def _certificates(
    config: RelayConfig, listeners: Sequence[ListenerConfig], metrics: RelayMetrics
) -> tuple[list[ReloadableTLS], list[ReloadableTLS]]:
    """
    One L{ReloadableTLS} per distinct pair of certificate and key files:
    listeners without a certificate of their own share the main
    listener's.

    @return: (the distinct ones, the main listener's first; the one of
        each listener, in order).
    @raise ConfigError: a certificate or key cannot be used; the message
        names the listener's spec.
    """
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
    return certificates, tls_of


def makeRelayService(
    config: RelayConfig,
    reactor: IRelayReactor,
    api: Optional[IEmailAPI] = None,
    endpoint: Optional[IStreamServerEndpoint] = None,
    metrics: Optional[RelayMetrics] = None,
    adopt: Optional[Sequence[int]] = None,
) -> RelayService:
    """
    Build the relay as one C{IService}.

    @param config: the settings.
    @param reactor: see L{IRelayReactor} (what it must provide).
    @param api: the API client; by default an L{HTTPEmailAPI} over treq
        and a persistent connection pool (at most 64 idle connections) to
        C{config.api_url} (L{poststack_relay.api.make_http_client}).
    @param endpoint: where the main listener listens; by default the
        systemd socket named C{config.systemd_socket} if set, else TCP on
        C{config.port} and C{config.interface}.  It is wrapped in implicit
        TLS (and, with C{config.proxy_protocol}, a PROXY protocol header
        first).  The listeners of C{config.listen} always use their own
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
    certificates, tls_of = _certificates(config, listeners, metrics)
    places = [
        endpoint if index == 0 and endpoint is not None
        else adopted_endpoint(reactor, adopt[index]) if adopt is not None
        else listening_endpoint(listener, reactor)
        for index, listener in enumerate(listeners)
    ]
    connections: Optional[HTTPConnectionPool] = None
    fleet_state, fleet = make_fleet_state(config, reactor, metrics)
    holds = CredentialHolds(fleet_state, config.api_quota_hold, config.sender_domain_hold)
    if api is None:
        # treq over a persistent pool that never retries by itself: POST
        # retries are the relay's decision.
        client, connections = make_http_client(reactor, connect_timeout=10)
        api = HTTPEmailAPI(
            client,
            config.api_url,
            config.api_timeout,
            config.service_key,
            clock=reactor,
            deadline=config.api_deadline,
            max_in_flight=config.api_max_in_flight,
            max_in_flight_per_credential=config.api_max_in_flight_per_credential,
            queue_timeout=config.api_queue_timeout,
            breaker_failures=config.api_breaker_failures,
            breaker_cooldown=config.api_breaker_cooldown,
            metrics=metrics,
            throttled=holds.throttled,
        )
    # Large messages are translated in threads, off the event loop.
    translator = TranslationPool(reactor, config.translate_threads, config.large_message_size)
    factory = RelayFactory(
        _portal(config, api, reactor, holds, translator),
        config,
        reactor,
        throttle=_throttle(config, fleet_state, reactor),
        metrics=metrics,
        state=fleet_state,
    )
    service = RelayService(factory, metrics, certificates, config.drain_timeout)
    service.fleet_state = fleet_state
    # Stopped after the drain: waits for translations still running.
    translator.setServiceParent(service)  # type: ignore[no-untyped-call]  # Service: unannotated in Twisted
    # From the drain deadline on (sessions told 421), no translation that
    # ends is sent: the client will send the message again.
    factory.deadline_hooks.append(translator.abandon)
    if isinstance(api, HTTPEmailAPI):
        _APIClientService(api, connections).setServiceParent(service)  # type: ignore[no-untyped-call]  # Service: unannotated in Twisted
    if fleet is not None:
        # Stopped after the drain (children stop in reverse order): a
        # transaction that ends during the drain still shares its 429.
        fleet.setServiceParent(service)  # type: ignore[no-untyped-call]  # Service: unannotated in Twisted
    for index, (place, listener, tls) in enumerate(zip(places, listeners, tls_of)):
        smtps = relay_endpoint(
            place, listener, tls, reactor, config.tls_detect_timeout, metrics,
            config.tls_handshake_timeout,
        )
        # An embedder's own endpoint: its errors are the embedder's.
        name, option = (None, "") if index == 0 and endpoint is not None else smtp_listener_name(listener)
        service.add_listener(listener, ListeningService(smtps, factory, name, option))
    # After the listeners, so their ports are known when this starts.
    service.readiness = ReadinessService(SystemdNotifier(), service)
    service.readiness.setServiceParent(service)  # type: ignore[no-untyped-call]  # Service: unannotated in Twisted
    if config.tls_reload_interval > 0:
        # Picks up renewed certificates (ACME) without a SIGHUP.
        poll = TimerService(  # type: ignore[no-untyped-call]  # TimerService: unannotated in Twisted
            config.tls_reload_interval, service._reload_changed
        )
        poll.clock = reactor
        poll.setServiceParent(service)  # type: ignore[no-untyped-call]  # Service: unannotated in Twisted
    if config.metrics_enabled:
        _add_metrics(service, config, api, reactor)
    _log_configuration(config, listeners, tls_of, certificates, injected=endpoint is not None)
    return service


def _portal(
    config: RelayConfig,
    api: IEmailAPI,
    reactor: IRelayReactor,
    holds: CredentialHolds,
    translator: Optional[TranslationPool] = None,
) -> Portal:
    """
    The cred portal: credentials checked against the API, each login's
    avatar a L{RelayDelivery} through C{api}, with the credential holds
    shared by every session (and the fleet).
    """
    checker = PostStackChecker(
        api,
        reactor,
        config.service_key,
        positive_ttl=config.auth_cache_ttl,
        negative_ttl=config.auth_negative_ttl,
    )
    realm = RelayRealm(
        lambda identity: RelayDelivery(
            identity, api, config.derive_idempotency_keys, holds, translator
        )
    )
    return Portal(realm, [checker])


def _throttle(config: RelayConfig, state: IFleetState, clock: IReactorTime) -> AuthThrottle:
    """
    The AUTH failure throttle and AUTH rate shared by every session (and
    the fleet, when C{state} is shared).
    """
    rate = config.max_auth_rate_per_ip
    return AuthThrottle(
        None,
        window=config.auth_failure_window,
        per_ip=config.auth_failures_per_ip,
        per_user=config.auth_failures_per_user,
        delay=config.auth_failure_delay,
        max_delay=config.auth_failure_max_delay,
        state=state,
        rate=RateLimit(state, clock, rate, 60.0, "auth") if rate else None,
    )


def _add_metrics(
    service: RelayService, config: RelayConfig, api: IEmailAPI, reactor: IRelayReactor
) -> None:
    """
    Serve the metrics, C{/healthz} and C{/readyz} on C{config.metrics_listen},
    with an API probe keeping C{/readyz}'s "API reachable" true while idle.
    """
    if isinstance(api, Reachable):
        probe = ApiProbeService(api, reactor, API_PROBE_INTERVAL)
        probe.setServiceParent(service)  # type: ignore[no-untyped-call]  # Service: unannotated in Twisted
    readiness_check = relay_readiness(
        lambda: zip([c.label for c in service.listener_configs], service.listeners),
        service.factory,
        api,
        2 * API_PROBE_INTERVAL + config.api_timeout,
    )
    # Stopped after the drain (a child, not a listener): /readyz says
    # "stopping" while sessions finish, so balancers stop sending.
    service.metrics_service = makeMetricsService(
        service.metrics, config.metrics_listen, reactor, readiness_check
    )
    service.metrics_service.setServiceParent(service)  # type: ignore[no-untyped-call]  # Service: unannotated in Twisted


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
    # Each text is whole; each field a value (no fragments of the text).
    _log.info(
        "poststack-relay configured: SMTP on {where}; API {api_url}, service key {service_key}",
        where=", ".join(
            f"{name} (implicit TLS{' behind PROXY protocol' if listener.proxy_protocol else ''})"
            for name, listener in zip(labels, listeners)
        ),
        listeners=labels,
        interface=config.interface or "*",
        port=config.port,
        proxy=config.proxy_protocol,
        api_url=config.api_url,
        service_key=mask_secret(config.service_key),
        event="relay_configured",
    )
    for name, listener, tls in zip(labels, listeners, tls_of):
        _log.info(
            "listener {listener}: implicit TLS"
            + (" behind PROXY protocol" if listener.proxy_protocol else "")
            + ", certificate {subject} from {tls_cert}",
            listener=name,
            proxy=listener.proxy_protocol,
            tls_cert=tls.cert_path,
            tls_key=tls.key_path or tls.cert_path,
            own_certificate=tls is not certificates[0],
            spec=listener.spec or None,
            subject=tls.current.describe()["subject"],
            event="listener_configured",
        )
    for tls in certificates:
        users = [name for name, used in zip(labels, tls_of) if used is tls]
        text = (
            "TLS profile {profile}, certificate {subject} serial {serial}, "
            "valid until {not_after}, chain of {chain_length}; reload on SIGHUP"
        )
        if config.tls_reload_interval > 0:
            text += " and when the files change (checked every {reload_interval:g} s)"
        if len(certificates) > 1:
            text += "; for {used_by}"
        _log.info(
            text,
            profile=config.tls_profile,
            chain_length=1 + len(tls.current.extraCertChain),
            reload_interval=config.tls_reload_interval,
            tls_cert=tls.cert_path,
            listeners=users,
            used_by=", ".join(users),
            event="tls_configured",
            **tls.current.describe(),
        )
