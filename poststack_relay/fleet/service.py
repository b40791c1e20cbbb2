# -*- test-case-name: tests.test_fleet_redis,tests.test_service -*-
"""
The fleet state a relay's configuration asks for (L{make_fleet_state}),
and the service that connects it when the relay starts and closes it when
the relay has drained (L{FleetStateService}).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred

from ..config import ConfigError, RelayConfig
from ..interfaces import IFleetState
from ..metrics import RelayMetrics
from ..tls import trust_root
from .local import LocalState
from .wire import FleetKeys, fleet_secret

if TYPE_CHECKING:
    from .redis import RedisState

__all__ = ["FleetStateService", "make_fleet_state"]


class FleetStateService(Service):
    """
    Starts and stops a L{RedisState <poststack_relay.fleet.redis.RedisState>}.
    """

    def __init__(self, state: "RedisState") -> None:
        self.state = state

    def startService(self) -> None:
        Service.startService(self)  # type: ignore[no-untyped-call]  # Service: unannotated in Twisted
        self.state.start()

    def stopService(self) -> "Deferred[object]":
        Service.stopService(self)  # type: ignore[no-untyped-call]  # Service: unannotated in Twisted
        return self.state.stop()


def make_fleet_state(
    config: RelayConfig, reactor: Any, metrics: RelayMetrics
) -> tuple[IFleetState, Optional[FleetStateService]]:
    """
    The relay's fleet state: a L{LocalState} without C{redis_url}, else a
    L{RedisState <poststack_relay.fleet.redis.RedisState>} and the service
    that connects it.

    @raise ConfigError: C{redis_url} is set but txredisapi is not installed
        (the C{redis} extra), or the URL cannot be used.
    """
    url = config.redis()
    if url is None:
        return LocalState(reactor), None
    try:
        from .redis import RedisState
    except ImportError:
        raise ConfigError(
            "redis-url needs the txredisapi package: pip install 'poststack-relay[redis]'"
        ) from None
    trust = trust_root(config.redis_tls_ca) if url.tls and config.redis_tls_ca else None
    state = RedisState(
        url,
        reactor,
        FleetKeys(fleet_secret(url.password)),
        config.redis_timeout,
        metrics,
        trust=trust,
    )
    return state, FleetStateService(state)

