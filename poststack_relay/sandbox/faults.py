# -*- test-case-name: tests.test_sandbox -*-
"""
Fault injection: the modes the sandbox can misbehave in, the queue of
pending faults, the answer each mode gives, and the requests a fault keeps
waiting (held forever by C{hang}, or answered after a C{delay}).

A request takes one count of the first pending fault that matches its
method and path (L{FaultQueue.take}); L{fault_reply} then says what to
answer. The modes are described in C{docs/sandbox.md}.
"""

from __future__ import annotations

from typing import Any, Callable

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.web.server import Request

from .exchange import ApiError, Reply, abort_connection, log

FAULT_MODES = (
    "500",
    "502",
    "503",
    "422",
    "429",
    "quota",
    "slow",
    "hang",
    "reset",
    "malformed",
    "noid",
    "accept_then_500",
)
"""Every mode accepted by L{SandboxResource.inject_fault}."""


def normalise_path(path: str) -> str:
    """C{path} without a trailing slash (C{/emails/} is C{/emails})."""
    if len(path) > 1:
        path = path.rstrip("/") or "/"
    return path


@attrs.define
class Fault:
    """
    One pending fault: its mode, how many requests it still hits (C{-1}:
    until cleared), its delay, its C{Retry-After} and the route it hits.
    """

    mode: str
    remaining: int
    delay: float
    retry_after: str | None
    method: str
    path: str

    def to_json(self) -> dict[str, Any]:
        """The fault as C{GET /_sandbox/faults} lists it."""
        return {
            "mode": self.mode,
            "count": self.remaining,
            "delay": self.delay,
            "retry_after": self.retry_after,
            "method": self.method,
            "path": self.path,
        }


def make_fault(
    mode: object,
    count: object = 1,
    delay: object = 0.0,
    retry_after: object = None,
    path: object = "/emails",
    method: object = "POST",
) -> Fault:
    """
    Check the arguments of a fault (from Python or from a JSON body) and
    build it, method upper-cased and path normalised.

    @raise ValueError: On an unknown mode or a bad argument.
    """
    if mode not in FAULT_MODES:
        raise ValueError(f"unknown fault mode {mode!r}")
    assert isinstance(mode, str)
    if isinstance(count, bool) or not isinstance(count, int) or (
        count < 1 and count != -1
    ):
        raise ValueError("count must be a positive integer or -1")
    if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not (
        0 <= delay < 86400
    ):
        raise ValueError("delay must be a number of seconds >= 0")
    if isinstance(retry_after, int) and not isinstance(retry_after, bool):
        retry_after = str(retry_after)
    if retry_after is not None and (
        not isinstance(retry_after, str) or not retry_after.strip()
    ):
        raise ValueError("retry_after must be a string (seconds or HTTP date)")
    if not isinstance(method, str) or not isinstance(path, str):
        raise ValueError("method and path must be strings")
    return Fault(
        mode, count, float(delay), retry_after, method.upper(), normalise_path(path)
    )


class FaultQueue:
    """
    The pending faults, in the order they were added.
    """

    def __init__(self) -> None:
        self._faults: list[Fault] = []

    def add(self, fault: Fault) -> None:
        """Queue C{fault} behind the pending ones."""
        self._faults.append(fault)

    def clear(self) -> int:
        """Remove every pending fault; return how many there were."""
        count = len(self._faults)
        self._faults.clear()
        return count

    def to_json(self) -> list[dict[str, Any]]:
        """The pending faults, as C{GET /_sandbox/faults} lists them."""
        return [f.to_json() for f in self._faults]

    def take(self, method: str, path: str) -> Fault | None:
        """
        Take one count of the first fault matching C{method path}; return a
        one-shot copy of it, or L{None} if no fault matches.
        """
        for fault in self._faults:
            if fault.method == method and fault.path == path:
                if fault.remaining > 0:
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        self._faults.remove(fault)
                return Fault(
                    fault.mode,
                    1,
                    fault.delay,
                    fault.retry_after,
                    fault.method,
                    fault.path,
                )
        return None


def _fault_error(status: int, code: str, message: str) -> Reply:
    return Reply.error(ApiError(status, code, f"{message} (sandbox fault)"))


def fault_reply(
    fault: Fault,
    answer: Callable[[], Reply],
    success: int,
    abort: Callable[[], None],
) -> Reply | None:
    """
    What to answer for C{fault} (any mode but C{hang}).

    @param answer: Processes the request normally and gives its answer
        (C{slow} and C{accept_then_500} call it).
    @param success: The route's success status (C{malformed}, C{noid}).
    @param abort: Drops the connection (C{reset}).
    @return: The reply to write, or L{None} when nothing is to be written.
    """
    mode = fault.mode
    if mode in ("500", "502", "503"):
        return _fault_error(int(mode), "internal_error", "Internal server error")
    if mode == "422":
        return _fault_error(422, "unprocessable_entity", "Validation failed")
    if mode == "429":
        headers = {} if fault.retry_after is None else {
            "Retry-After": fault.retry_after
        }
        return Reply.error(
            ApiError(
                429,
                "rate_limit_exceeded",
                "Too many requests (sandbox fault)",
                headers,
            )
        )
    if mode == "quota":
        return _fault_error(429, "monthly_limit_exceeded", "Monthly limit reached")
    if mode == "slow":
        return answer()
    if mode == "reset":
        abort()
        return None
    if mode == "malformed":
        return Reply(success, b"<html>502 Bad Gateway</html>", "text/html")
    if mode == "noid":
        return Reply.json(success, {"object": "email", "status": "queued"})
    assert mode == "accept_then_500", mode
    real = answer()
    log.info(
        "sandbox fault accept_then_500 discarded a {status} answer",
        status=real.status,
    )
    return _fault_error(500, "internal_error", "Internal server error")


class PendingAnswers:
    """
    The requests a fault keeps waiting: held forever (C{hang}) or answered
    after a delay on the clock.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._delayed: dict[IDelayedCall, Request] = {}
        self._held: set[Request] = set()

    def __len__(self) -> int:
        return len(self._held) + len(self._delayed)

    def hold(self, request: Request) -> None:
        """Keep C{request} unanswered until its client leaves."""
        self._held.add(request)
        request.notifyFinish().addBoth(lambda _: self._held.discard(request))

    def later(self, request: Request, delay: float, act: Callable[[], None]) -> None:
        """Call C{act} to answer C{request} after C{delay} seconds."""

        def fire() -> None:
            self._delayed.pop(call, None)
            act()

        call = self._clock.callLater(delay, fire)
        self._delayed[call] = request

    def abort(self) -> None:
        """
        Cancel the delayed answers and drop their and the held connections.
        """
        delayed, self._delayed = self._delayed, {}
        for call, request in delayed.items():
            if call.active():
                call.cancel()
            abort_connection(request)
        for request in list(self._held):
            abort_connection(request)
        self._held.clear()
