# -*- test-case-name: tests.test_smtp_stress -*-
"""
L{Stress}: when the relay is under stress, and which session makes room
for a new one (Postfix's C{smtpd_timeout = ${stress?{10}:{300}}s}, plus
shedding).

A pure policy, without transport or timers: the factory tells it about
sessions opening, logging in and closing, and asks it whether the relay
is under stress and which session to shed.  The relay is under stress
from the moment the open sessions reach the high-water mark (a
percentage of C{max_connections}) until they fall back a tenth of
C{max_connections} below it (so it does not flap at the mark).  Under
stress, sessions get the short stress time-out (as Postfix's, it bounds
the client's silence; a relay waiting on the API is not the client's
silence), and when every place is taken the oldest idle unauthenticated
session is shed for the new connection (an authenticated client, or one
in the middle of an AUTH check, is never shed).
"""

from __future__ import annotations

import math
from typing import Callable, Generic, Hashable, Optional, TypeVar

from twisted.internet.interfaces import IReactorTime

__all__ = ["Stress", "StressChange"]


_S = TypeVar("_S", bound=Hashable)


class StressChange:
    """
    The relay went under stress (C{on}) or out of it, with the open
    sessions then and how long the previous state lasted.
    """

    __slots__ = ("lasted", "on", "sessions")

    def __init__(self, on: bool, sessions: int, lasted: float) -> None:
        self.on = on
        self.sessions = sessions
        self.lasted = lasted


class Stress(Generic[_S]):
    """
    The stress state of one relay, and its sessions not known to be
    authenticated, oldest first.

    @param clock: for how long each state lasted.
    @param max_connections: the relay's connection limit.
    @param threshold: percentage of C{max_connections} at which the relay
        is under stress; 0: never.

    @ivar on: the relay is under stress.
    @ivar high: open sessions that put the relay under stress (C{None}:
        never).
    @ivar low: open sessions at or below which the stress ends.
    """

    def __init__(self, clock: IReactorTime, max_connections: int, threshold: int) -> None:
        self._clock = clock
        self.on = False
        self._since: Optional[float] = None  # when the state began (None: at the start)
        self.high: Optional[int] = None
        self.low = 0
        if threshold > 0:
            self.high = max(1, math.ceil(max_connections * threshold / 100))
            self.low = max(0, self.high - max(1, max_connections // 10))
        # Insertion order is connection order: the first is the oldest.
        self._unauthenticated: dict[_S, None] = {}

    def _change(self, on: bool, sessions: int) -> StressChange:
        now = self._clock.seconds()
        change = StressChange(on, sessions, 0.0 if self._since is None else now - self._since)
        self.on = on
        self._since = now
        return change

    def opened(self, session: _S, sessions: int) -> Optional[StressChange]:
        """
        C{session} (not authenticated yet) was opened; C{sessions} are open
        now.  The change of state, if any.
        """
        self._unauthenticated[session] = None
        if not self.on and self.high is not None and sessions >= self.high:
            return self._change(True, sessions)
        return None

    def closed(self, session: _S, sessions: int) -> Optional[StressChange]:
        """
        C{session} is gone (or shed); C{sessions} are open now.  The change
        of state, if any.
        """
        self._unauthenticated.pop(session, None)
        if self.on and sessions <= self.low:
            return self._change(False, sessions)
        return None

    def victim(
        self, authenticated: Callable[[_S], bool], idle: Callable[[_S], bool]
    ) -> Optional[_S]:
        """
        Under stress: the oldest idle unauthenticated session, to shed for
        a new connection; C{None} if there is none or no stress.

        @param authenticated: did a session log in?  One that did is never
            asked about again (it stays logged in).
        @param idle: is a session between commands (not waiting on an AUTH
            check, not in a transaction)?
        """
        if not self.on:
            return None
        logged_in = []
        found = None
        for session in self._unauthenticated:
            if authenticated(session):
                logged_in.append(session)
            elif idle(session):
                found = session
                break
        for session in logged_in:
            del self._unauthenticated[session]
        return found
