# -*- test-case-name: tests.test_api_retry -*-
"""
Fail fast while the API is known to be down: L{CircuitBreaker}.
"""

from __future__ import annotations

from typing import Optional

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

__all__ = ["CircuitBreaker"]

_log = Logger(namespace=__package__)  # every API event: "poststack_relay.api"


class CircuitBreaker:
    """
    Fail fast while the API is known to be down.

    Closed: requests go through; C{threshold} consecutive transient
    failures (no answer, a full-length time-out, a 5xx) open it.  Open:
    every request is refused for C{cooldown} seconds.  Then half-open: one
    request (the probe) goes through and the others are still refused; if
    the probe gets an answer the breaker closes, if it fails the breaker
    opens again.  Any answer that is not a 5xx (a 2xx, a 4xx, a 429)
    closes the breaker and resets the count, wherever it comes from.

    One event is logged when the breaker opens (C{api_breaker_open}) and
    one when it closes again (C{api_breaker_closed}); re-opening after a
    failed probe logs at debug level only.

    @ivar state: C{"closed"}, C{"open"} or C{"half-open"}.
    @ivar failures: the consecutive transient failures counted.
    """

    def __init__(self, threshold: int, cooldown: float, clock: IReactorTime) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.state = "closed"
        self.failures = 0
        self._clock = clock
        self._open_until = 0.0
        self._opened_at = 0.0
        self._probing = False

    def refuses(self) -> bool:
        """
        Would a request be refused now?  (Changes nothing.)
        """
        if self.state == "closed":
            return False
        if self.state == "open" and self._clock.seconds() < self._open_until:
            return True
        return self._probing

    def admit(self) -> Optional[bool]:
        """
        Let a request through: C{None} if refused, C{True} if it is the
        half-open probe, C{False} otherwise.  Every admitted request must
        be followed by one L{record} with the same C{probe} value.
        """
        if self.state == "closed":
            return False
        if self.state == "open":
            if self._clock.seconds() < self._open_until:
                return None
            self.state = "half-open"
        if self._probing:
            return None
        self._probing = True
        return True

    def record(self, probe: bool, outcome: str) -> None:
        """
        The end of an admitted request: C{"success"} (an answer that is not
        a 5xx), C{"failure"} (a transient failure) or C{"inconclusive"}
        (cancelled, or a time-out cut short by the message's deadline).
        """
        if probe:
            self._probing = False
        if outcome == "success":
            self.failures = 0
            if self.state != "closed":
                self.state = "closed"
                _log.info(
                    "PostStack API answers again; circuit breaker closed after {outage}s",
                    outage=round(self._clock.seconds() - self._opened_at, 1),
                    event="api_breaker_closed",
                )
        elif outcome == "failure":
            if self.state == "closed":
                self.failures += 1
                if self.threshold and self.failures >= self.threshold:
                    self._opened_at = self._clock.seconds()
                    self._open()
                    _log.warn(
                        "PostStack API failed {failures} times in a row; circuit breaker "
                        "open: messages fail at once with 451 for {cooldown}s, then one "
                        "request probes the API",
                        failures=self.failures,
                        cooldown=self.cooldown,
                        event="api_breaker_open",
                    )
            elif probe:
                self._open()
                _log.debug(
                    "PostStack API probe failed; circuit breaker open for {cooldown}s more",
                    cooldown=self.cooldown,
                    event="api_breaker_probe_failed",
                )

    def _open(self) -> None:
        self.state = "open"
        self._open_until = self._clock.seconds() + self.cooldown

