# -*- test-case-name: tests.test_api_retry,tests.test_breaker,tests.test_breaker_recovery -*-
"""
Fail fast while the API is known to be down, and find out by itself when
it answers again: L{CircuitBreaker}.
"""

from __future__ import annotations

from typing import Callable, Optional

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["BREAKER_PROBE_TIMEOUT", "CircuitBreaker"]

_log = Logger(namespace=__package__)  # every API event: "poststack_relay.api"

#: Seconds one self-probe may take (or the attempt time-out, if shorter).
#: Short, so that a probe stuck on a request the API will never answer
#: does not keep the breaker open for long after the API is back.
BREAKER_PROBE_TIMEOUT = 1.0


class CircuitBreaker:
    """
    Fail fast while the API is known to be down.

    Closed: requests go through.  One call (every attempt of one message,
    or of one AUTH-time check) counts at most one transient failure (no
    answer, a full-length time-out, a 5xx): L{Attempts.call} records only
    its first.  C{threshold} such calls in a row open the breaker.  Any
    answer that is not a 5xx (a 2xx, a 4xx, a 429), from any request,
    resets the count and closes the breaker.

    Open: every request is refused at once, and the breaker probes the API
    by itself with C{probe} (a cheap request that fires C{True} when the
    API answered with anything but a 5xx): the first C{interval} seconds
    after opening, then every C{interval} seconds from the start of the
    previous probe, never before the previous one ended, so at most one
    probe is in flight.  The first probe answered closes the breaker and
    stops the probing.

    One event is logged when the breaker opens (C{api_breaker_open}) and
    one when it closes again (C{api_breaker_closed}); failed probes are
    counted in the upstream metrics (C{call="breaker_probe"}), not logged.

    @ivar state: C{"closed"} or C{"open"}.
    @ivar failures: the calls in a row that failed transiently.
    @ivar interval: seconds between probes while open.
    """

    def __init__(
        self,
        threshold: int,
        interval: float,
        clock: IReactorTime,
        probe: Callable[[], "Deferred[bool]"],
    ) -> None:
        if threshold and interval <= 0:
            raise ValueError(f"the probe interval must be positive, not {interval}")
        self.threshold = threshold
        self.interval = interval
        self.state = "closed"
        self.failures = 0
        self._clock = clock
        self._probe = probe
        self._opened_at = 0.0
        self._timer: Optional[IDelayedCall] = None
        self._probing: Optional[Deferred[bool]] = None

    def refuses(self) -> bool:
        """
        Is a request refused now?  While open, also makes sure a probe is
        on its way (after L{stop}, the next refused request restarts the
        probing).
        """
        if self.state == "closed":
            return False
        if self._timer is None and self._probing is None:
            self._schedule(0.0)
        return True

    def record(self, outcome: str) -> None:
        """
        The end of an attempt: C{"success"} (an answer that is not a 5xx)
        closes and resets; C{"failure"} (the first transient failure of its
        call) counts; anything else (C{"inconclusive"}: cancelled, a
        time-out cut short by the deadline, or a call's later failure)
        changes nothing.
        """
        if outcome == "success":
            self._close()
        elif outcome == "failure" and self.state == "closed":
            self.failures += 1
            if self.threshold and self.failures >= self.threshold:
                self.state = "open"
                self._opened_at = self._clock.seconds()
                _log.warn(
                    "PostStack API failed {failures} times in a row; circuit breaker "
                    "open: messages fail at once with 451 while the relay probes the "
                    "API every {interval}s",
                    failures=self.failures,
                    interval=self.interval,
                    event="api_breaker_open",
                )
                self._schedule(self.interval)

    def stop(self) -> None:
        """
        Stop probing: cancel the next probe and the one in flight (when the
        relay stops).  The state stays as it is.
        """
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        probing, self._probing = self._probing, None
        if probing is not None:
            probing.cancel()

    def _close(self) -> None:
        self.failures = 0
        if self.state == "closed":
            return
        self.state = "closed"
        self.stop()
        _log.info(
            "PostStack API answers again; circuit breaker closed after {outage}s",
            outage=round(self._clock.seconds() - self._opened_at, 1),
            event="api_breaker_closed",
        )

    def _schedule(self, delay: float) -> None:
        self._timer = self._clock.callLater(max(0.0, delay), self._send_probe)

    def _send_probe(self) -> None:
        self._timer = None
        started = self._clock.seconds()
        try:
            probing = self._probing = self._probe()
        except Exception:
            _log.failure("API breaker probe crashed", event="api_probe_crash")
            self._schedule(self.interval)
            return

        def probed(result: object) -> None:
            if self._probing is not probing:
                return  # stopped, or closed by another answer
            self._probing = None
            if result is True:
                self.record("success")
                return
            if isinstance(result, Failure) and not isinstance(result.value, CancelledError):
                _log.failure("API breaker probe crashed", result, event="api_probe_crash")
            if self.state == "open":
                self._schedule(started + self.interval - self._clock.seconds())

        probing.addBoth(probed)
