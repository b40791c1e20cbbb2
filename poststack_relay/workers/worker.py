# -*- test-case-name: tests.test_workers -*-
"""
A C{--workers} worker: one relay on the listening sockets its supervisor
hands down, which stops (draining) when the supervisor is gone.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
from contextlib import suppress
from typing import Any, Callable, NoReturn, Optional, Sequence, cast

from twisted.internet.defer import gatherResults, succeed
from twisted.internet.error import ReactorNotRunning
from twisted.internet.protocol import Protocol
from twisted.internet.stdio import StandardIO
from twisted.logger import Logger, globalLogBeginner

from .._version import __version__
from ..config import RelayConfig
from ..memory import freeze_start_up_objects, return_large_blocks
from ..service import makeRelayService
from .messages import NAMESPACE, VERSION_CHANGED_EXIT, host_port, ready_line, worker_observer

_log = Logger(namespace=NAMESPACE)


def accept_fairly(port: Any, most: int = 1) -> None:
    """
    Make C{port}, a C{tcp.Port} on a socket shared with other workers, accept
    at most C{most} connections per wake-up.  Twisted's takes up to 100 at
    once: the worker that wakes first would take a whole burst.
    """
    if isinstance(getattr(port, "numberAccepts", None), int):
        read = port.doRead

        def doRead() -> Any:
            port.numberAccepts = min(port.numberAccepts, most)
            return read()

        port.doRead = doRead


class SupervisorLink(Protocol):
    """The worker's end of its standard input and control pipe: their end means the supervisor is gone."""

    def __init__(self, lost: Callable[[], None]) -> None:
        self.lost = lost

    def connectionLost(self, reason: object = None) -> None:
        self.lost()


def _where(port: Any) -> str:
    return host_port(port.getHost().host, port.getHost().port)


def run_worker(index: int, settings: dict[str, Any], fds: Sequence[int], control: int, reactor: Any,
               orphaned: Callable[[], None]) -> int:
    """
    Run worker C{index}'s relay on the sockets C{fds}: SIGTERM drains it, SIGHUP
    reloads its certificates, the end of stdin stops it after C{orphaned()};
    L{ready_line} on C{control} once its ports are bound.  Returns 0, or 1 if it
    could not start.
    """
    status: list[int] = []
    stopping: list[bool] = []

    def stop(code: int = 0) -> None:
        status.append(code)
        with suppress(ReactorNotRunning):
            reactor.stop()

    def supervisor_lost() -> None:
        if not stopping:
            orphaned()
            _log.warn("the supervisor is gone: stopping", worker=index, event="supervisor_lost")
            stop()

    def start() -> None:
        try:
            service = makeRelayService(RelayConfig(**settings), reactor, adopt=fds)
            service.announce = False  # worker_ready says it, below
            service.privilegedStartService()
            service.startService()
        except Exception as e:  # a port in use, a certificate gone since the supervisor read it
            _log.critical("worker {worker} cannot start: {error}", worker=index, error=str(e),
                          event="worker_start_failed")
            return stop(1)

        def shutting_down() -> Any:
            stopping.append(True)
            return service.stopService()

        reactor.addSystemEventTrigger("before", "shutdown", shutting_down)
        signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(service.reload_tls, "SIGHUP"))
        # mypy sees Windows' StandardIO; the POSIX one takes the descriptors.
        StandardIO(SupervisorLink(supervisor_lost), stdin=0, stdout=control, reactor=reactor)  # type: ignore[call-arg, no-untyped-call]
        metrics = getattr(service, "metrics_service", None)

        def ready(results: list[Any]) -> None:
            listening = [_where(port) for port in results[0]]
            for port in results[0]:
                accept_fairly(port)
            where = _where(results[1]) if results[1] is not None else None
            text = "worker {worker} ready, pid {pid}: listening on {where}" + ("; metrics on {metrics}" if where else "")
            _log.info(text, worker=index, pid=os.getpid(), where=", ".join(listening), listening=listening,
                      metrics=where, event="worker_ready")
            # At once, not after the rest of the start-up work: one short line into an empty pipe.
            os.write(control, ready_line(os.getpid(), listening, where))

        waits = [service.ports() or succeed([]), metrics.port() if metrics is not None else succeed(None)]
        gatherResults(waits).addCallback(ready).addErrback(
            lambda f: _log.failure("worker readiness failed", f, event="worker_ready_failed"))

    reactor.callWhenRunning(start)
    reactor.callWhenRunning(freeze_start_up_objects)
    reactor.run()
    return status[0] if status else 0


def main(argv: Optional[Sequence[str]] = None) -> NoReturn:
    """
    A worker process: its start message on stdin, its log on stdout, then L{run_worker}.
    Exit status L{VERSION_CHANGED_EXIT} for a message of another version, 2 for one it cannot read.
    """
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the relay's handler is installed
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        index = int(args[args.index("--worker") + 1])
        message = json.loads(sys.stdin.buffer.readline(1 << 20))
        if message.get("version") != __version__:
            sys.stderr.write(f"poststack-relay worker {index}: installed version {__version__}, its supervisor's "
                             f"{message.get('version')}: installed version changed: restart the service\n")
            sys.exit(VERSION_CHANGED_EXIT)
        settings, fds, control, log = dict(message["settings"]), message["fds"], message["control"], message["log"]
    except (ValueError, LookupError, TypeError, AttributeError) as e:
        sys.stderr.write(f"poststack-relay worker: not a start message: {e!r}\n")
        sys.exit(2)
    cast(io.TextIOWrapper, sys.stdout).reconfigure(encoding="utf-8", errors="backslashreplace")
    return_large_blocks()  # as a single relay does (poststack_relay.tap)
    from twisted.internet import reactor

    observer = worker_observer(index, log["format"], log["time_format"], sys.stdout)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)

    def orphaned() -> None:
        if log["path"]:  # the pipe to the supervisor's log file is gone: append to the file, if ours to open
            with suppress(OSError):
                os.dup2(os.open(log["path"], os.O_WRONLY | os.O_APPEND), 1)

    sys.exit(run_worker(index, settings, fds, control, reactor, orphaned))
