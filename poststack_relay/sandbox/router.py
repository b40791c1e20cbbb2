# -*- test-case-name: tests.test_sandbox -*-
"""
L{SandboxResource}: the sandbox as one C{twisted.web} leaf resource.

It routes each request to its endpoint (L{poststack_relay.sandbox.endpoints}),
applies a pending fault first (L{poststack_relay.sandbox.faults}), and writes
the answer; it knows no API rule itself. The same object is served over real
HTTP by L{poststack_relay.sandbox.service.makeSandboxService} and wrapped in
C{treq.testing.StubTreq} by unit tests.
"""

from __future__ import annotations

import re
from typing import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from .data import SandboxData
from .endpoints import InspectionEndpoints, PostStackEndpoints
from .exchange import ApiError, Exchange, Reply, log, new_id
from .faults import (
    Fault,
    FaultQueue,
    PendingAnswers,
    fault_reply,
    make_fault,
    normalise_path,
)
from .store import SandboxStore

_Handler = Callable[[Exchange, "re.Match[str]"], Reply]


class SandboxResource(Resource):
    """
    The sandbox PostStack API (a leaf resource: it routes by itself).

    Works the same over a real C{Site} and inside C{treq.testing.StubTreq}.

    @ivar store: Where accepted emails go.
    @ivar data: Keys, domains, mailboxes, templates and limits.
    """

    isLeaf = True

    def __init__(
        self,
        store: SandboxStore,
        data: SandboxData,
        clock: IReactorTime | None = None,
    ) -> None:
        """
        @param store: Where accepted emails go.
        @param data: Keys, domains, mailboxes and templates.
        @param clock: Used for C{created_at} and for delayed ("slow") answers;
            the global reactor if L{None}.
        """
        super().__init__()  # type: ignore[no-untyped-call]  # Twisted's Resource.__init__ is unannotated
        if clock is None:
            from twisted.internet import reactor

            clock = IReactorTime(reactor)
        self.store = store
        self.data = data
        self._faults = FaultQueue()
        self._pending = PendingAnswers(clock)
        api = PostStackEndpoints(store, data, clock)
        inspection = InspectionEndpoints(
            store, self._faults, self._add_fault, data.max_body_bytes
        )
        self._routes: list[tuple[str, re.Pattern[str], _Handler, int]] = [
            ("POST", re.compile(r"/emails"), api.post_email, 202),
            ("GET", re.compile(r"/emails"), api.list_emails, 200),
            ("GET", re.compile(r"/emails/(?P<id>[^/]+)"), api.get_email, 200),
            ("GET", re.compile(r"/domains"), api.list_domains, 200),
            (
                "POST",
                re.compile(r"/mailboxes/authenticate"),
                api.authenticate_mailbox,
                200,
            ),
            ("GET", re.compile(r"/_sandbox/emails"), inspection.emails, 200),
            ("DELETE", re.compile(r"/_sandbox/emails"), inspection.clear_emails, 200),
            ("GET", re.compile(r"/_sandbox/faults"), inspection.list_faults, 200),
            ("POST", re.compile(r"/_sandbox/faults"), inspection.add_fault, 201),
            (
                "DELETE",
                re.compile(r"/_sandbox/faults"),
                inspection.clear_faults,
                200,
            ),
        ]

    # -- public test API ---------------------------------------------------

    def inject_fault(
        self,
        mode: str,
        count: int = 1,
        delay: float = 0.0,
        retry_after: str | int | None = None,
        path: str = "/emails",
        method: str = "POST",
    ) -> None:
        """
        Make the next C{count} requests to C{method path} misbehave.

        Faults queue: a request consumes one count of the first fault that
        matches its method and path. C{count=-1} lasts until
        L{clear_faults}. C{delay} (seconds, on the injected clock) postpones
        the fault's answer; for C{"slow"} it is the whole point. Modes are
        listed in L{FAULT_MODES} and described in C{docs/sandbox.md}.

        @raise ValueError: On an unknown mode or a bad argument.
        """
        self._add_fault(make_fault(mode, count, delay, retry_after, path, method))

    def _add_fault(self, fault: Fault) -> None:
        if fault.path.startswith("/_sandbox") or not any(
            m == fault.method and p.fullmatch(fault.path) for m, p, _, _ in self._routes
        ):
            raise ValueError(
                f"no API route {fault.method} {fault.path} to inject a fault into"
            )
        self._faults.add(fault)

    def clear_faults(self) -> int:
        """
        Remove every pending fault; return how many there were.
        """
        return self._faults.clear()

    @property
    def pending(self) -> int:
        """
        How many requests are being held ("hang") or wait for a delayed answer.
        """
        return len(self._pending)

    def abort_pending(self) -> None:
        """
        Cancel delayed answers and drop held ("hang") connections; used when
        the service stops so no timer or connection outlives it.
        """
        self._pending.abort()

    # -- rendering -----------------------------------------------------------

    def _route(
        self, method: str, path: str
    ) -> tuple[_Handler, re.Match[str], int] | ApiError:
        """The handler, match and success status for C{method path}, or the
        C{404}/C{405} error."""
        allowed: list[str] = []
        for route_method, pattern, handler, success in self._routes:
            found = pattern.fullmatch(path)
            if found is None:
                continue
            allowed.append(route_method)
            if route_method == method:
                return handler, found, success
        if allowed:
            return ApiError(
                405,
                "method_not_allowed",
                f"Method {method} not allowed on {path}",
                {"Allow": ", ".join(allowed)},
            )
        return ApiError(404, "not_found", f"No such endpoint: {path}")

    def render(self, request: Request) -> int:
        """
        Route the request, apply any pending fault, write the answer.

        Always answers through C{request.write}/C{finish} and returns
        C{NOT_DONE_YET}, so immediate and delayed answers share one path.
        """
        request.responseHeaders.setRawHeaders(
            b"x-request-id", [new_id("req_").encode("ascii")]
        )
        exchange = Exchange(request, self.data.max_body_bytes)
        method = request.method.decode("latin-1").upper()
        path = normalise_path(request.path.decode("utf-8", "replace"))

        route = self._route(method, path)
        if isinstance(route, ApiError):
            exchange.write(Reply.error(route))
            return NOT_DONE_YET
        handler, match, success = route

        def answer() -> Reply:
            return _dispatch(handler, exchange, match)

        fault = None if path.startswith("/_sandbox") else self._faults.take(method, path)
        if fault is None:
            exchange.write(answer())
            return NOT_DONE_YET
        log.info(
            "sandbox fault {mode} on {method} {path}",
            mode=fault.mode,
            method=method,
            path=path,
        )
        if fault.mode == "hang":
            self._pending.hold(request)
            return NOT_DONE_YET

        def act() -> None:
            reply = fault_reply(fault, answer, success, exchange.abort)
            if reply is not None:
                exchange.write(reply)

        if fault.delay > 0:
            self._pending.later(request, fault.delay, act)
        else:
            act()
        return NOT_DONE_YET


def _dispatch(handler: _Handler, exchange: Exchange, match: re.Match[str]) -> Reply:
    """C{handler}'s reply; its L{ApiError}, or a C{500} if it failed."""
    try:
        return handler(exchange, match)
    except ApiError as error:
        return Reply.error(error)
    except Exception:
        log.failure("sandbox handler failed")
        return Reply.error(ApiError(500, "internal_error", "Internal server error"))
