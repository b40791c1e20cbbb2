# -*- test-case-name: tests.test_offload -*-
"""
Translation off the event loop, for large messages.

Translating a message is CPU work: about 10 ms per MB of attachment, and
seconds for a hostile message the MIME scan cannot refuse early.  On the
reactor thread that time is taken from every other session of the relay.
L{TranslationPool} runs the translation of a message of at least
C{large} octets in a small thread pool of the relay's own (C{threads}
threads; more messages wait their turn in its queue), and a smaller one at
once, where the hand-over would cost more than the work.  The choice, and
the figures behind it, are in C{docs/operations.md} ("One large or hostile
message").

A thread still competes with the event loop for the interpreter lock:
each time the loop wakes (a read, a write, a timer) it may wait for the
lock for up to the interpreter's switch interval (5 ms), and a NOOP's round
trip takes the lock several times.  While translations run, the pool
shortens the switch interval to L{SWITCH_INTERVAL} (and puts it back when
they are done); the translation code keeps each call into C short
(windows of 64 KiB to 256 KiB) for the same reason.

It is a service: started, it runs work in its threads; stopping (after the
relay's drain), it waits for the work it runs (bounded: a translation
always ends) and then stops its threads.  Work that ends after stopping
began fails with L{CancelledError}: its session was already told
C{421} by the drain, so its message must not be sent.  The same from the
drain's deadline on (L{abandon}), which comes before the pool stops.  Not
running, it runs everything at once.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.python.failure import Failure
from twisted.internet.interfaces import IReactorCore
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

__all__ = ["TranslationPool"]

_T = TypeVar("_T")

#: Seconds: the interpreter's switch interval while translations run in
#: the threads (the default is 0.005).
SWITCH_INTERVAL = 0.0005


class TranslationPool(Service):
    """
    Where translations run: large ones in a bounded thread pool.

    @ivar large: octets from which work is sent to the threads.
    @ivar busy: work running or queued in the threads.
    """

    def __init__(self, reactor: Any, threads: int, large: int) -> None:
        self._reactor = reactor
        self.large = large
        self._threads = threads
        self._pool: Optional[ThreadPool] = None
        self._trigger: Any = None
        self.busy = 0
        self._stopping = False
        self._switch = sys.getswitchinterval()
        self._idle: list[Deferred[None]] = []

    def offloads(self, size: int) -> bool:
        """Whether work for a message of C{size} octets goes to the threads."""
        return self._pool is not None and size >= self.large

    def run(self, work: Callable[..., _T], *args: Any) -> "Deferred[_T]":
        """
        C{work(*args)} in a thread (C{work} must not touch Twisted); its
        result or its exception, on the reactor thread.  Not running: at
        once, here.
        """
        pool = self._pool
        if pool is None:
            try:
                return succeed(work(*args))
            except BaseException:
                return fail()
        d: Deferred[_T] = deferToThreadPool(self._reactor, pool, work, *args)
        if not self.busy:
            self._switch = sys.getswitchinterval()
            sys.setswitchinterval(min(self._switch, SWITCH_INTERVAL))
        self.busy += 1
        d.addBoth(self._finished)
        return d

    def _finished(self, result: Any) -> Any:
        self.busy -= 1
        if not self.busy:
            sys.setswitchinterval(self._switch)
            waiters, self._idle = self._idle, []
            for waiter in waiters:
                waiter.callback(None)
        if self._stopping and not isinstance(result, Failure):
            raise CancelledError("the relay stopped while this was translated")
        return result

    def abandon(self) -> None:
        """
        The drain deadline passed: every session was told C{421 4.3.2}, so
        work that ends from now on fails with L{CancelledError} (its
        message must not be sent); the threads run on until L{stopService}.
        """
        self._stopping = True

    @property
    def abandoned(self) -> bool:
        """Work that ends now fails with L{CancelledError} (L{abandon}, or stopping)."""
        return self._stopping

    def startService(self) -> None:
        """Start the pool (its threads start as work comes)."""
        Service.startService(self)  # type: ignore[no-untyped-call]  # Service: unannotated in Twisted
        self._stopping = False
        pool = ThreadPool(minthreads=0, maxthreads=self._threads, name="poststack-translate")
        pool.start()
        self._pool = pool
        # If the reactor stops without stopping this service, the threads
        # must still end (they would keep the process alive).
        if IReactorCore.providedBy(self._reactor):
            core: IReactorCore = self._reactor
            self._trigger = core.addSystemEventTrigger("during", "shutdown", self._stop_pool)

    def stopService(self) -> "Deferred[None]":
        """Wait for the work running and queued in the threads, then stop them."""
        Service.stopService(self)  # type: ignore[no-untyped-call]  # Service: unannotated in Twisted
        self._stopping = True
        idle: Deferred[None] = Deferred()
        if self.busy:
            self._idle.append(idle)
        else:
            idle.callback(None)

        def stop(_: object) -> None:
            self._stop_pool()
            if self._trigger is not None:
                core: IReactorCore = self._reactor
                core.removeSystemEventTrigger(self._trigger)
                self._trigger = None

        return idle.addCallback(stop)

    def _stop_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()
