# -*- test-case-name: tests.test_service,tests.test_shutdown,tests.test_tls_reload -*-
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
"""

from __future__ import annotations

from typing import Any, Optional

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
        when all of it is done.
        """
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
    @param endpoint: where to listen; by default TCP on C{config.port} and
        C{config.interface}.  It is wrapped in implicit TLS.
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
    wrapped = ImplicitTLSFactory(tls, factory, config.tls_detect_timeout, reactor)
    listener = StreamServerEndpointService(endpoint or _endpoint(config, reactor), wrapped)
    listener._raiseSynchronously = True  # a failed bind stops start-up
    listener.setServiceParent(service)
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
        "poststack-relay listening on {interface}:{port} (implicit TLS), API {api_url}, "
        "service key {service_key}",
        interface=config.interface or "*",
        port=config.port,
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
