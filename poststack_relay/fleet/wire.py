# -*- test-case-name: tests.test_fleet_wire -*-
"""
What the relays of a fleet write in Redis and tell each other: key names
(keyed digests, never a secret, an address or a raw key), the server-side
scripts that change state atomically and announce it on one channel, and
the parsing of those announcements.  Pure: no connection here.

Keys (C{<p>} is the prefix, C{psr:} by default):

  - C{<p>c:<digest>}: a counter (failed logins of a client address or a
    mailbox), with the window as its time to live;
  - C{<p>n:<digest>}: a note (what the API said about a credential), its
    value the note, its lifetime the time to live;
  - C{<p>events}: the channel every change is announced on (C{<p>events:N}
    in database C{N}: Redis's channels are per server, not per database;
    L{poststack_relay.fleet.redis.RedisState} adds the number).
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Optional, Sequence, Union

import attrs

__all__ = [
    "ADD_SCRIPT",
    "CountEvent",
    "FleetKeys",
    "LOAD_NOTES_SCRIPT",
    "NoteEvent",
    "REMEMBER_SCRIPT",
    "fleet_secret",
    "parse_event",
]

# KEYS: counters; ARGV: window in ms, channel.  Adds one to each, restarts
# its window, announces "c <window ms> <key> <count> ..." and returns the
# counts.
ADD_SCRIPT = """
local out = {}
local event = 'c ' .. ARGV[1]
for i, key in ipairs(KEYS) do
  local n = redis.call('INCR', key)
  redis.call('PEXPIRE', key, ARGV[1])
  out[i] = n
  event = event .. ' ' .. key .. ' ' .. n
end
redis.call('PUBLISH', ARGV[2], event)
return out
"""

# KEYS: one note; ARGV: value, lifetime in ms, channel.  Sets it and
# announces "n <ms> <key> <value>".
REMEMBER_SCRIPT = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('PUBLISH', ARGV[3], 'n ' .. ARGV[2] .. ' ' .. KEYS[1] .. ' ' .. ARGV[1])
return 1
"""

# ARGV: key pattern, most notes.  Returns key, ms left, value for each
# live note (a relay that (re)connects loads what it missed).  Notes are
# few (one per throttled credential); the scan is bounded anyway.
LOAD_NOTES_SCRIPT = """
local out = {}
local cursor = '0'
local found = 0
local rounds = 0
repeat
  local r = redis.call('SCAN', cursor, 'MATCH', ARGV[1], 'COUNT', 1000)
  cursor = r[1]
  rounds = rounds + 1
  for _, key in ipairs(r[2]) do
    local ttl = redis.call('PTTL', key)
    local value = redis.call('GET', key)
    if ttl > 0 and value then
      out[#out + 1] = key
      out[#out + 1] = ttl
      out[#out + 1] = value
      found = found + 1
    end
  end
until cursor == '0' or found >= tonumber(ARGV[2]) or rounds >= 100
return out
"""


def fleet_secret(password: Optional[str]) -> bytes:
    """
    The key of the fleet's digests, derived from the Redis password (every
    relay of a fleet has the same), so the key names in Redis cannot be
    turned back into addresses by someone who sees only them (without a
    password, anyone who can read Redis could try every IPv4 address).
    """
    material = password or ""
    return hashlib.sha256(b"poststack-relay fleet keys v1\0" + material.encode("utf-8")).digest()


@attrs.frozen
class FleetKeys:
    """
    Names in Redis.

    @ivar secret: the digest key (L{fleet_secret}).
    @ivar prefix: put before every key and the channel.
    """

    secret: bytes = attrs.field(repr=False)
    prefix: str = "psr:"

    @property
    def channel(self) -> str:
        """The channel every change is announced on."""
        return self.prefix + "events"

    @property
    def note_pattern(self) -> str:
        """The pattern that matches every note."""
        return self.prefix + "n:*"

    def _digest(self, name: str) -> str:
        return hmac.new(self.secret, name.encode("utf-8"), hashlib.sha256).hexdigest()[:32]

    def counter(self, key: str) -> str:
        """The Redis key of a counter."""
        return self.prefix + "c:" + self._digest(key)

    def note(self, subject: str) -> str:
        """The Redis key of a note."""
        return self.prefix + "n:" + self._digest(subject)


@attrs.frozen
class CountEvent:
    """
    Counters a relay changed: C{(key, count)} pairs, each for C{window}
    seconds.
    """

    window: float
    counts: tuple[tuple[str, int], ...]


@attrs.frozen
class NoteEvent:
    """
    A note a relay set.
    """

    key: str
    value: str
    seconds: float


def parse_event(message: Union[str, bytes]) -> Optional[Union[CountEvent, NoteEvent]]:
    """
    An announcement on the channel, or C{None} for anything malformed (the
    channel is the relays' own, but a bad message must not break one).
    """
    if isinstance(message, bytes):
        try:
            message = message.decode("utf-8")
        except UnicodeDecodeError:
            return None
    try:
        if message.startswith("c "):
            parts = message.split(" ")
            window = int(parts[1]) / 1000.0
            pairs = parts[2:]
            if not pairs or len(pairs) % 2:
                return None
            counts = tuple((pairs[i], int(pairs[i + 1])) for i in range(0, len(pairs), 2))
            if window <= 0 or any(n < 0 for _, n in counts):
                return None
            return CountEvent(window, counts)
        if message.startswith("n "):
            _, ms, key, value = message.split(" ", 3)
            seconds = int(ms) / 1000.0
            if seconds <= 0:
                return None
            return NoteEvent(key, value, seconds)
    except ValueError:
        return None
    return None


def milliseconds(seconds: float) -> str:
    """Seconds as whole milliseconds (at least 1), as the scripts take them."""
    return str(max(1, int(round(seconds * 1000))))


def loaded_notes(reply: Sequence[object]) -> list[NoteEvent]:
    """
    The notes in L{LOAD_NOTES_SCRIPT}'s reply (malformed entries skipped).
    """
    out = []
    for i in range(0, len(reply) - 2, 3):
        key, ms, value = reply[i], reply[i + 1], reply[i + 2]
        if isinstance(key, bytes):
            key = key.decode("utf-8", "replace")
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if isinstance(key, str) and isinstance(value, str) and isinstance(ms, int) and ms > 0:
            out.append(NoteEvent(key, value, ms / 1000.0))
    return out
