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
from typing import Any, Callable, Mapping, Optional, cast

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import AdoptedStreamServerEndpoint
from twisted.internet.error import CannotListenError, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, globalLogPublisher
from twisted.python.failure import Failure
from twisted.python.logfile import BaseLogFile
from twisted.runner.procmon import LoggingProtocol, ProcessMonitor

from ..config import ConfigError, ListenerConfig, RelayConfig
from ..systemd import SystemdNotifier, socketEndpoint
from .messages import NAMESPACE, output_event, parse_ready, relogged_event, start_message

_log = Logger(namespace=NAMESPACE)

RESTART_DELAY = 1  # the first pause before restarting a worker that died young; it doubles ...
MAX_RESTART_DELAY = 30  # ... up to this while the worker keeps dying within
STABLE_AFTER = 10  # this many seconds of its start (one that ran longer is restarted at once)
MAX_START_FAILURES = 3  # deaths in a row before ready: the relay stops (before READY=1) or is degraded
STOP_MARGIN = 10.0  # seconds beyond drain_timeout before a stopping worker gets SIGKILL
MAX_LINE = 1 << 20  # the longest line kept from a worker's pipe; a longer one is cut
FIRST_FD = 3  # a worker's first inherited listening socket; the others, then its control pipe, follow
# Not for a worker's environment: systemd talks to the supervisor only, and
# the relay's own variables (the service key) reach a worker on its stdin.
STRIPPED_ENVIRONMENT = ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_USEC", "WATCHDOG_PID")
STRIPPED_PREFIX = "POSTSTACK_RELAY_"
# SIGHUP ignored before any import (a starting worker has no handler yet), the
# package's directory on sys.path (a source tree twistd found), -P: a file in
# the working directory cannot shadow a module; --worker K is for ps.
_CODE = ("import signal; signal.signal(signal.SIGHUP, signal.SIG_IGN); import sys; sys.path.append({root!r}); "
         "from poststack_relay.workers.worker import main; main()")
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def worker_command(index: int) -> list[str]:
    """The arguments that start worker C{index}."""
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
    """
    A socket listening for C{listener} as Twisted binds one.

    @raise CannotListenError: it cannot be bound.
    """
    family = socket.AF_INET6 if ":" in listener.interface else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(socket.getaddrinfo(listener.interface or "0.0.0.0", listener.port, family)[0][4])
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise CannotListenError(listener.interface, listener.port, e) from None  # type: ignore[no-untyped-call]  # unannotated
    return sock


@attrs.frozen
class LogOutput:
    """
    The supervisor's log as workers write it, in C{format} (C{json} or
    C{text} with C{time_format}): to C{fd} themselves (standard output,
    the journal), or through their standard output, handed in whole lines
    to C{write} (the supervisor's rotating file, C{path}).
    """

    format: str
    time_format: Optional[str]
    fd: Optional[int] = None
    write: Optional[Callable[[bytes], None]] = None
    path: Optional[str] = None


def supervisor_log_output(observer: object) -> Optional[LogOutput]:
    """
    The L{LogOutput} of the relay's own observer (L{poststack_relay.logs})
    on a descriptor or a rotating file; C{None} for any other observer
    (C{--syslog}, C{--logger}, C{twist}): then workers send JSON events.
    """
    line_format = getattr(observer, "line_format", None)
    out, lock = getattr(observer, "outFile", None), getattr(observer, "lock", None)
    if line_format not in ("text", "json") or out is None or lock is None:
        return None
    time_format = getattr(observer, "timeFormat", None)
    if isinstance(out, BaseLogFile):
        log_file: Any = out

        def write(data: bytes) -> None:
            with lock:
                log_file.write(data)
                log_file.flush()

        return LogOutput(line_format, time_format, write=write, path=getattr(out, "path", None))
    try:
        return LogOutput(line_format, time_format, fd=os.fstat(out.fileno()) and out.fileno())
    except (AttributeError, OSError, ValueError):
        return None


def exit_with(status: int) -> None:
    """Make this process exit with C{status} (twistd cannot) once all else is done; nothing for 0."""
    if status:
        atexit.register(lambda: (sys.stdout.flush(), sys.stderr.flush(), os._exit(status)))


class WorkerProtocol(LoggingProtocol):
    """
    A worker's pipes, line by line: its standard output (its log: written
    through to the supervisor's file, or JSON events logged again), its
    standard error and its control pipe.
    """

    def __init__(self, supervisor: Supervisor, index: int, control: int, output: Optional[LogOutput]) -> None:
        self.service = self.supervisor = supervisor
        self.name, self.index, self.control = str(index), index, control
        self.write = output.write if output is not None else None
        self._rest: dict[int, bytes] = {}

    def childDataReceived(self, childFD: int, data: bytes, end: bool = False) -> None:
        lines = (self._rest.pop(childFD, b"") + data).split(b"\n")
        rest = lines.pop()
        if rest and (end or len(rest) > MAX_LINE):
            lines.append(rest)
        elif rest:
            self._rest[childFD] = rest
        if childFD == 1 and self.write is not None:
            try:
                if lines:
                    self.write(b"".join(line + b"\n" for line in lines))
            except Exception:
                pass  # as the log observer itself: a line the log cannot take is lost
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
    Runs C{config.workers} relay processes on shared listening sockets with
    Twisted's restart back-off; tells systemd once all are ready, passes
    SIGHUP on, and stops them all (draining) on stop.

    @ivar exit_status: 1 once the relay stopped because workers could not start.
    @ivar sockets: the shared listening sockets' descriptors, one per listener.
    """

    threshold, minRestartDelay, maxRestartDelay = STABLE_AFTER, RESTART_DELAY, MAX_RESTART_DELAY

    def __init__(self, config: RelayConfig, reactor: Any, *, notifier: Any = None,
                 environ: Optional[Mapping[str, str]] = None, stop: Optional[Callable[[], None]] = None,
                 log_output: Optional[LogOutput] = None) -> None:
        """
        @param reactor: provides C{IReactorProcess} and C{IReactorTime}.
        @param notifier, environ, stop, log_output: by default C{NOTIFY_SOCKET}'s
            L{SystemdNotifier}, C{os.environ}, C{reactor.stop}, and that of
            the parent's observer (L{poststack_relay.logs.LogObserverService}).
        @raise ConfigError: a systemd socket of a listener was not passed.
        """
        super().__init__(reactor)
        self.config, self.reactor, self.clock = config, reactor, cast(IReactorTime, reactor)
        self.killTime = config.drain_timeout + STOP_MARGIN  # type: ignore[assignment]  # procmon says int; any number works
        self.notifier = notifier if notifier is not None else SystemdNotifier()
        self.stop_relay = stop if stop is not None else reactor.stop
        self._log_output, self._log_known = log_output, log_output is not None
        self.exit_status = 0
        self.listener_configs = config.listeners()
        self.sockets: list[int] = []
        self.addresses: list[str] = []
        self._bound: list[socket.socket] = []
        self._systemd: dict[int, int] = {}
        for index, listener in enumerate(self.listener_configs):
            if listener.systemd_socket:
                try:
                    endpoint = socketEndpoint(reactor, listener.systemd_socket)
                except ConfigError as e:
                    raise (ConfigError(f"listen {listener.spec!r}: {e}") if listener.spec else e) from None
                self._systemd[index] = cast(AdoptedStreamServerEndpoint, endpoint).fileno
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
                if index in self._systemd:
                    with socket.socket(fileno=os.dup(self._systemd[index])) as probe:
                        fd, name = self._systemd[index], probe.getsockname()
                else:
                    self._bound.append(bind_listener(listener))
                    fd, name = self._bound[-1].fileno(), self._bound[-1].getsockname()
                self.sockets.append(fd)
                self.addresses.append(f"[{name[0]}]:{name[1]}" if ":" in name[0] else f"{name[0]}:{name[1]}")
        except BaseException:
            self._close_sockets()
            raise
        _log.info("supervisor listening on {where} for {workers} workers (shared sockets)", event="supervisor_listening",
                  where=", ".join(self.addresses), listeners=self.addresses, workers=self.config.workers)

    def startService(self) -> None:
        """Bind the listeners if not yet done, then start every worker."""
        self.privilegedStartService()
        super().startService()

    def log_output(self) -> Optional[LogOutput]:
        """Where the workers' lines go: found once (the runner logs by then), and logged."""
        if not self._log_known:
            self._log_known = True
            output = self._log_output = supervisor_log_output(getattr(self.parent, "observer", None))
            mode, text = (("events", "logged again by the supervisor (its log goes to syslog, a --logger or a filter)")
                          if output is None else ("through", "finished by each worker, written through by the "
                                                  "supervisor") if output.fd is None else
                          ("direct", f"finished and written to descriptor {output.fd} by each worker"))
            _log.info("workers' log lines: {text}", text=text, mode=mode, event="workers_logging",
                      line_format=output.format if output is not None else "json")
        return self._log_output

    def startProcess(self, name: str) -> None:
        """
        Start worker C{name} as L{ProcessMonitor.startProcess} does, with the
        shared sockets and a control pipe as inherited descriptors, its log
        as its standard output and its start message on its standard input.
        """
        if name in self.protocols:
            return
        index, output = int(name), self.log_output()
        fds = list(range(FIRST_FD, FIRST_FD + len(self.sockets)))
        control = FIRST_FD + len(fds)
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r", control: "r", **dict(zip(fds, self.sockets))}
        log: dict[str, Any] = {"format": "json", "time_format": None, "path": None}
        if output is not None:
            log = {"format": output.format, "time_format": output.time_format, "path": output.path}
            child_fds[1] = output.fd if output.fd is not None else "r"
        protocol = self.protocols[name] = WorkerProtocol(self, index, control, output)
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
        Worker C{protocol.index} exited; the monitor scheduled its restart
        (C{self.restart}) unless the relay is stopping.  Deaths before ready
        count: L{MAX_START_FAILURES} in a row stop the relay before
        C{READY=1}, and make it degraded after.
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
        if failures >= MAX_START_FAILURES and not self._announced:
            restart.cancel()
            _log.critical("worker {worker} (pid {pid}) exited with {status} before it was ready, {failures} times "
                          "in a row: stopping the relay", failures=failures, event="workers_failed", **fields)
            if not self.exit_status:  # once: another worker may fail before the reactor stops
                self.exit_status = 1
                self.stop_relay()
            return
        restart_in = round(max(0.0, restart.getTime() - self.clock.seconds()), 3)
        if failures >= MAX_START_FAILURES and index not in self.degraded:
            self.degraded.add(index)
            _log.critical("worker {worker} (pid {pid}) exited with {status} before it was ready, {failures} times "
                          "in a row: the relay goes on with the other workers and tries it again, next in "
                          "{restart_in:g} s", failures=failures, restart_in=restart_in, event="workers_degraded",
                          **fields)
        _log.warn("worker {worker} (pid {pid}) exited with {status} after {uptime:.1f} s{before_ready}; restarting "
                  "it in {restart_in:g} s", uptime=round(self.clock.seconds() - self.timeStarted[name], 3),
                  ready=was_ready, before_ready="" if was_ready else " before it was ready", restart_in=restart_in,
                  event="worker_exited", **fields)
        self._notify_status()

    def _signal(self, index: int, name: str) -> bool:
        protocol = self.protocols.get(str(index))
        if protocol is None or protocol.transport is None:
            return False
        try:
            protocol.transport.signalProcess(name)
        except (ProcessExitedAlready, OSError):
            return False
        return True

    def reload_tls(self, trigger: str = "reload_tls()") -> bool:
        """
        Pass SIGHUP on to every worker (C{twistd}'s SIGHUP handler calls
        this): each loads its certificate and key again; one still starting
        ignores it, and loads the files as it starts.
        """
        sent = [i for i in sorted(int(name) for name in self.protocols) if self._signal(i, "HUP")]
        _log.info("{trigger} passed on to {count} workers", trigger=trigger, count=len(sent), workers=sent,
                  event="workers_reload")
        return True

    def _close_sockets(self) -> None:
        for sock in self._bound:
            sock.close()
        for fd in self._systemd.values():
            os.close(fd)
        self._bound, self._systemd = [], {}

    def stopService(self) -> Optional[Deferred[None]]:  # type: ignore[override]  # procmon's waits for nothing
        """
        Stop: C{STOPPING=1}, close the shared sockets, SIGTERM every worker
        (SIGKILL C{killTime}, C{drain_timeout} + L{STOP_MARGIN}, s later),
        and fire once all have exited.
        """
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
