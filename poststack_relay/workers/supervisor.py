# -*- test-case-name: tests.test_workers -*-
"""
The C{--workers} supervisor: Twisted's L{ProcessMonitor} running N relay
processes on listening sockets it binds once and hands down.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import sys
from contextlib import suppress
from typing import Any, Callable, Mapping, Optional, cast

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import AdoptedStreamServerEndpoint
from twisted.internet.error import CannotListenError, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, globalLogPublisher
from twisted.python.failure import Failure
from twisted.python.logfile import BaseLogFile
from twisted.runner.procmon import LoggingProtocol, ProcessMonitor

from ..config import ConfigError, RelayConfig
from ..listening import ListenFailed, smtp_listener_name
from ..places import ListenerConfig, parse_metrics_listen
from ..systemd import SystemdNotifier, socketEndpoint
from .messages import (NAMESPACE, host_port, output_event, parse_ready, relogged_event, start_message,
                       worker_metrics_listen)

_log = Logger(namespace=NAMESPACE)

RESTART_DELAY = 1  # the first pause before restarting a worker that died young; it doubles ...
MAX_RESTART_DELAY = 30  # ... up to this while the worker keeps dying within
STABLE_AFTER = 10  # this many seconds of its start (one that ran longer is restarted at once)
MAX_START_FAILURES = 3  # deaths in a row before ready: the relay stops (before READY=1) or is degraded
STOP_MARGIN = 10.0  # seconds beyond drain_timeout before a stopping worker gets SIGKILL
MAX_LINE = 1 << 20  # the longest line kept from a worker's pipe; a longer one is cut
FIRST_FD = 3  # a worker's first inherited listening socket; the others, then its control pipe, follow
# systemd talks to the supervisor only; the relay's own variables (the service key) go on stdin.
STRIPPED_ENVIRONMENT = ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_USEC", "WATCHDOG_PID")
STRIPPED_PREFIX = "POSTSTACK_RELAY_"
# SIGHUP ignored before any import (no handler yet), the package's directory on
# sys.path (a source tree twistd found), -P: the working directory shadows nothing.
_CODE = ("import signal; signal.signal(signal.SIGHUP, signal.SIG_IGN); import sys; sys.path.append({root!r}); "
         "from poststack_relay.workers.worker import main; main()")
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def worker_command(index: int) -> list[str]:
    """The arguments that start worker C{index} (C{--worker K} is for C{ps})."""
    return [sys.executable, "-P", "-c", _CODE.format(root=_ROOT), "--worker", str(index)]


def worker_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """C{environ} without L{STRIPPED_ENVIRONMENT} and C{POSTSTACK_RELAY_*} variables."""
    return {k: v for k, v in environ.items() if k not in STRIPPED_ENVIRONMENT and not k.startswith(STRIPPED_PREFIX)}


def describe_exit(reason: Failure) -> tuple[str, Optional[int], Optional[int]]:
    """How a process ended: a text (C{exit status 1}, C{signal 9 (SIGKILL)}), its status and signal."""
    code, number = getattr(reason.value, "exitCode", None), getattr(reason.value, "signal", None)
    if number is not None:
        name = signal.Signals(number).name if number in signal.valid_signals() else "unknown"
        return f"signal {number} ({name})", code, number
    return (f"exit status {code}" if code is not None else str(reason.value)), code, None


def bind_listener(listener: ListenerConfig, backlog: int = 1024) -> socket.socket:
    """A socket listening for C{listener} as Twisted binds one, or L{ListenFailed} (a L{CannotListenError}: one line)."""
    v6 = ":" in listener.interface
    try:  # SO_REUSEADDR; "::" takes IPv4 too, as with Twisted
        return socket.create_server((listener.interface or "0.0.0.0", listener.port), backlog=backlog,
                                    family=socket.AF_INET6 if v6 else socket.AF_INET, dualstack_ipv6=v6)
    except OSError as e:
        error = CannotListenError(listener.interface, listener.port, e)  # type: ignore[no-untyped-call]  # unannotated
        raise ListenFailed(*smtp_listener_name(listener), error) from None


def check_metrics_ports(config: RelayConfig) -> None:
    """
    L{ListenFailed} (one line) if a worker's metrics port (the
    C{metrics-listen} port + K) cannot be bound now: the relay stops at
    once rather than after that worker failed to start three times.
    """
    if not config.metrics_enabled:
        return
    for index in range(config.workers):
        host, port = parse_metrics_listen(worker_metrics_listen(config.metrics_listen, index))
        if port == 0:
            return
        try:
            socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET).close()
        except OSError as e:
            error = CannotListenError(host, port, e)  # type: ignore[no-untyped-call]  # unannotated
            raise ListenFailed(f"metrics listener of worker {index}", "--metrics-listen (worker K uses its port + K)",
                               error) from None


def worker_log(observer: Any) -> tuple[dict[str, Any], Any]:
    """
    How workers log under the supervisor's C{observer}: the C{log} of their start
    message, and their stdout: the relay's observer's descriptor (C{direct}), or a
    pipe written through to its rotating file C{path} (C{through}) or, for any
    other observer, of events the supervisor logs again (C{events}).
    """
    line_format, out = getattr(observer, "line_format", None), cast(Any, getattr(observer, "outFile", None))
    if line_format in ("text", "json") and hasattr(observer, "lock"):
        log = {"mode": "direct", "format": line_format, "time_format": getattr(observer, "timeFormat", None)}
        if isinstance(out, BaseLogFile):
            return {**log, "mode": "through", "path": getattr(out, "path", None)}, "r"
        try:
            return {**log, "path": None}, os.fstat(out.fileno()) and out.fileno()
        except (AttributeError, OSError, ValueError):
            pass
    return {"mode": "events", "format": "events", "time_format": None, "path": None}, "r"


def exit_with(status: int) -> None:
    """Make this process exit with C{status} (twistd cannot) once all else is done; nothing for 0."""
    if status:
        atexit.register(lambda: (sys.stdout.flush(), sys.stderr.flush(), os._exit(status)))


class WorkerProtocol(LoggingProtocol):
    """A worker's pipes, line by line: its log (written through, or events logged again), stderr, control."""

    def __init__(self, supervisor: Supervisor, index: int, control: int, through: Any) -> None:
        self.service = self.supervisor = supervisor
        self.name, self.index, self.control, self.through = str(index), index, control, through
        self._rest: dict[int, bytes] = {}

    def childDataReceived(self, childFD: int, data: bytes, end: bool = False) -> None:
        lines = (self._rest.pop(childFD, b"") + data).split(b"\n")
        rest = lines.pop()
        if rest and (end or len(rest) > MAX_LINE):
            lines.append(rest)
        elif rest:
            self._rest[childFD] = rest
        if childFD == 1 and self.through is not None:
            # Whole lines, between the supervisor's own; as the observer: one the log cannot take is lost.
            with self.through.lock, suppress(Exception):
                self.through.outFile.write(b"".join(line + b"\n" for line in lines))
                self.through.outFile.flush()
            return
        now = self.supervisor.clock.seconds()
        for line in lines:
            fields = parse_ready(line) if childFD == self.control else None
            if fields is not None:
                if self.supervisor.protocols.get(self.name) is self:
                    self.supervisor.worker_ready(self.index, fields)
            elif line.strip():
                stream = {1: "stdout", 2: "stderr"}.get(childFD, "control")
                globalLogPublisher(relogged_event(line, self.index, now) if childFD == 1
                                   else output_event(line, self.index, stream, now))

    def processEnded(self, reason: Failure) -> None:
        for fd in list(self._rest):
            self.childDataReceived(fd, b"", end=True)
        super().processEnded(reason)  # the monitor schedules the restart
        self.supervisor.worker_ended(self, reason)


class Supervisor(ProcessMonitor):
    """
    Runs C{config.workers} relays on shared listening sockets (C{sockets}) with
    Twisted's back-off; tells systemd once all are ready, passes SIGHUP on, stops
    them all (draining).  C{exit_status} is 1 once failed starts stopped the relay.
    """

    threshold, minRestartDelay, maxRestartDelay = STABLE_AFTER, RESTART_DELAY, MAX_RESTART_DELAY

    def __init__(self, config: RelayConfig, reactor: Any, *, notifier: Any = None,
                 environ: Optional[Mapping[str, str]] = None, stop: Optional[Callable[[], None]] = None,
                 observer: Any = None) -> None:
        """
        By default C{notifier} is C{NOTIFY_SOCKET}'s, C{environ} C{os.environ}, C{stop}
        C{reactor.stop}, C{observer} the parent's.  L{ConfigError}: a systemd socket not passed.
        """
        super().__init__(reactor)
        self.config, self.reactor, self.clock = config, reactor, cast(IReactorTime, reactor)
        self.killTime = config.drain_timeout + STOP_MARGIN  # type: ignore[assignment]  # procmon says int; any number works
        self.notifier = notifier if notifier is not None else SystemdNotifier()
        self.stop_relay = stop if stop is not None else reactor.stop
        self.observer, self._log = observer, cast(Optional[tuple[dict[str, Any], Any]], None)
        self.exit_status = 0
        self.listener_configs = config.listeners()
        self.sockets: list[int] = []
        self.addresses: list[str] = []
        self._bound: list[socket.socket] = []
        self._systemd: dict[int, socket.socket] = {}
        for index, listener in enumerate(self.listener_configs):
            if listener.systemd_socket:
                try:
                    endpoint = socketEndpoint(reactor, listener.systemd_socket)
                except ConfigError as e:
                    raise (ConfigError(f"listen {listener.spec!r}: {e}") if listener.spec else e) from None
                self._systemd[index] = socket.socket(fileno=cast(AdoptedStreamServerEndpoint, endpoint).fileno)
        count = config.workers
        self.failures, self.starts, self.last_exit = [0] * count, [0] * count, [""] * count
        self.pids: list[Optional[int]] = [None] * count
        self.metrics: list[Optional[str]] = [None] * count
        self.ready: set[int] = set()
        self.degraded: set[int] = set()
        self._announced, self._status = False, ""
        self._stopped: Optional[Deferred[None]] = None
        self.environment = worker_environment(os.environ if environ is None else environ)
        for index in range(count):
            self.addProcess(str(index), worker_command(index), env=self.environment)

    def privilegedStartService(self) -> None:
        """Bind the listeners (C{twistd} calls this before it drops privileges; C{twist} does not)."""
        if self.sockets:
            return
        try:
            for index, listener in enumerate(self.listener_configs):
                self._bound.append(self._systemd.pop(index) if index in self._systemd else bind_listener(listener))
            check_metrics_ports(self.config)
        except BaseException:
            self._close_sockets()
            raise
        self.sockets = [sock.fileno() for sock in self._bound]
        self.addresses = [host_port(*sock.getsockname()[:2]) for sock in self._bound]
        _log.info("supervisor listening on {where} for {workers} workers (shared sockets)", event="supervisor_listening",
                  where=", ".join(self.addresses), listeners=self.addresses, workers=self.config.workers)

    def startService(self) -> None:
        self.privilegedStartService()
        super().startService()

    def worker_log(self) -> tuple[dict[str, Any], Any]:
        """L{worker_log} for the observer (the parent's, by then the runner logs), found once and logged."""
        if self._log is None:
            if self.observer is None:
                self.observer = getattr(self.parent, "observer", None)
            log, out = self._log = worker_log(self.observer)
            text = {"events": "logged again by the supervisor (its log goes to syslog, a --logger or a filter)",
                    "through": "finished by each worker, written through by the supervisor",
                    "direct": f"finished and written to descriptor {out} by each worker"}[log["mode"]]
            _log.info("workers' log lines: {text}", text=text, mode=log["mode"], event="workers_logging",
                      line_format="json" if log["mode"] == "events" else log["format"])
        return self._log

    def startProcess(self, name: str) -> None:
        """L{ProcessMonitor.startProcess} with the sockets and a control pipe inherited, the settings on stdin."""
        if name in self.protocols:
            return
        (index, (log, out)), fds = (int(name), self.worker_log()), list(range(FIRST_FD, FIRST_FD + len(self.sockets)))
        control = FIRST_FD + len(fds)
        child_fds: dict[int, Any] = {0: "w", 1: out, 2: "r", control: "r", **dict(zip(fds, self.sockets))}
        through = self.observer if log["mode"] == "through" else None
        protocol = self.protocols[name] = WorkerProtocol(self, index, control, through)
        self.timeStarted[name] = self.clock.seconds()
        self.ready.discard(index)
        self.starts[index] += 1
        try:
            process = self.reactor.spawnProcess(protocol, sys.executable, worker_command(index),
                                                env=self.environment, childFDs=child_fds)
        except OSError as e:
            _log.error("cannot start worker {worker}: {error}", worker=index, error=str(e), event="worker_spawn_failed")
            protocol.connectionMade()  # it ends at once: the monitor restarts it with its back-off
            protocol.processEnded(Failure(ProcessTerminated()))  # type: ignore[no-untyped-call]  # unannotated
            return
        process.write(start_message(self.config, index, fds, control, log))
        self.pids[index] = process.pid
        _log.info("worker {worker} started, pid {pid}", worker=index, pid=process.pid, generation=self.starts[index],
                  event="worker_started")

    def worker_ready(self, index: int, fields: Mapping[str, Any]) -> None:
        """Worker C{index} said it is ready: C{READY=1} once all are, else a new C{STATUS=}."""
        if index in self.ready:
            return
        self.ready.add(index)
        failures, self.failures[index] = self.failures[index], 0
        self.metrics[index] = fields["metrics"] if isinstance(fields.get("metrics"), str) else None
        if index in self.degraded:
            self.degraded.discard(index)
            _log.info("worker {worker} (pid {pid}) is ready again after {failures} failed starts", worker=index,
                      pid=self.pids[index], failures=failures, event="worker_recovered")
        if self._announced or len(self.ready) < self.config.workers or not self.running:
            return self._notify_status()
        self._announced = True
        _log.info("all {workers} workers ready, listening on {where}", workers=self.config.workers,
                  where=", ".join(self.addresses), pids=self.pids, metrics=self.metrics, event="workers_ready")
        self._status = self._status_text()
        self.notifier.notify(f"READY=1\nSTATUS={self._status}")

    def _status_text(self) -> str:
        count, where = self.config.workers, ", ".join(self.addresses)
        if len(self.ready) == count:
            return f"{count} workers listening on {where}"
        down = [f"worker {i} cannot start ({self.last_exit[i]})" if i in self.degraded else f"worker {i} restarting"
                for i in range(count) if i not in self.ready]
        degraded = "degraded: " if self.degraded else ""
        return f"{degraded}{len(self.ready)} of {count} workers listening on {where}; " + "; ".join(down)

    def _notify_status(self) -> None:
        status = self._status_text()
        if self._announced and self.running and status != self._status:
            self._status = status
            self.notifier.notify(f"STATUS={status}")

    def worker_ended(self, protocol: WorkerProtocol, reason: Failure) -> None:
        """
        Worker C{protocol.index} exited (the monitor scheduled its restart unless
        stopping).  L{MAX_START_FAILURES} deaths in a row before ready stop the
        relay before C{READY=1}, and make it degraded after.
        """
        index, name = protocol.index, protocol.name
        was_ready = index in self.ready
        self.ready.discard(index)
        status, code, number = describe_exit(reason)
        self.last_exit[index] = status
        fields = dict(worker=index, pid=self.pids[index], status=status, exit_status=code, signal=number)
        if not self.running:
            _log.info("worker {worker} (pid {pid}) stopped: {status}", event="worker_stopped", **fields)
            if not self.protocols and self._stopped is not None:
                _log.info("all workers stopped", event="workers_stopped")
                self._stopped.callback(None)
            return
        restart = self.restart[name]
        self.failures[index] += 0 if was_ready else 1
        failures = self.failures[index]
        streak = "worker {worker} (pid {pid}) exited with {status} before it was ready, {failures} times in a row: "
        if failures >= MAX_START_FAILURES and not self._announced:
            restart.cancel()
            _log.critical(streak + "stopping the relay", failures=failures, event="workers_failed", **fields)
            if not self.exit_status:  # once: another worker may fail before the reactor stops
                self.exit_status = 1
                self.stop_relay()
            return
        restart_in = round(max(0.0, restart.getTime() - self.clock.seconds()), 3)
        if failures >= MAX_START_FAILURES and index not in self.degraded:
            self.degraded.add(index)
            _log.critical(streak + "the relay goes on with the other workers and tries it again, next in {restart_in:g} s",
                          failures=failures, restart_in=restart_in, event="workers_degraded", **fields)
        _log.warn("worker {worker} (pid {pid}) exited with {status} after {uptime:.1f} s{before_ready}; restarting "
                  "it in {restart_in:g} s", uptime=round(self.clock.seconds() - self.timeStarted[name], 3),
                  ready=was_ready, before_ready="" if was_ready else " before it was ready", restart_in=restart_in,
                  event="worker_exited", **fields)
        self._notify_status()

    def reload_tls(self, trigger: str = "reload_tls()") -> bool:
        """Pass SIGHUP on to every running worker (C{twistd}'s SIGHUP calls this); a starting one ignores it."""
        sent = []
        for name, protocol in sorted(self.protocols.items(), key=lambda item: int(item[0])):
            with suppress(ProcessExitedAlready, OSError, AttributeError):
                cast(Any, protocol.transport).signalProcess("HUP")
                sent.append(int(name))
        _log.info("{trigger} passed on to {count} workers", trigger=trigger, count=len(sent), workers=sent,
                  event="workers_reload")
        return True

    def _close_sockets(self) -> None:
        for sock in [*self._bound, *self._systemd.values()]:
            sock.close()
        self._bound, self._systemd = [], {}

    def stopService(self) -> Optional[Deferred[None]]:  # type: ignore[override]  # procmon's waits for nothing
        """C{STOPPING=1}, sockets closed, SIGTERM to each worker (SIGKILL after C{killTime}); fires once all exited."""
        if self.running:
            self.notifier.notify("STOPPING=1\nSTATUS=stopping")
        self._close_sockets()
        running = sorted(int(name) for name in self.protocols)
        super().stopService()
        if not running:
            return None
        _log.info("stopping {count} workers", count=len(running), pids=[self.pids[i] for i in running],
                  event="workers_stopping")
        self._stopped = Deferred()
        return self._stopped
