# -*- test-case-name: tests.test_fleet_local,tests.test_fleet_wire,tests.test_fleet_redis -*-
"""
What the relays of a fleet share (L{poststack_relay.interfaces.IFleetState}):
failed-login counts per client address and per mailbox, and what the API
said about a credential (L{poststack_relay.holds}).

  - L{LocalState}: one relay's memory; the whole store without
    C{--redis-url}, and the mirror that answers every read with it;
  - L{poststack_relay.fleet.redis.RedisState}: shared through Redis
    (imported only when configured: txredisapi is an optional extra);
  - L{poststack_relay.fleet.wire}: key names, scripts, announcements;
  - L{poststack_relay.fleet.service}: the one the relay's configuration
    asks for, as a service that connects and disconnects it.

C{docs/shared-state.md} has the table of what is shared and what is not.
"""

from .local import LocalState

__all__ = ["LocalState"]
