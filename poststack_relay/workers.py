# -*- test-case-name: tests.test_workers -*-
"""
C{--workers N}: N relay processes sharing the listening ports, under one
supervisor.

Python runs one core per process.  With C{workers} above 1 the command's
own process (C{twistd}/C{twist}) becomes a L{Supervisor} that runs no TLS
and no SMTP:

  - it binds every listener itself (before C{twistd} drops privileges;
    a systemd-activated listener is the socket systemd passed), and keeps
    those sockets open for as long as it runs;
  - it starts N workers (L{worker_main}), each a full relay with the same
    settings (C{workers = 1}), which takes over (adopts) the shared
    sockets: the kernel hands each new connection to one worker.  A worker
    that dies loses no connection waiting in the backlog, since the
    supervisor still holds the socket;
  - one log (text or JSON, standard output or C{--logfile}) holds
    everything, each worker's lines with a C{worker} field (text:
    C{[namespace#level worker=K]}).  Each worker formats its own lines
    in the supervisor's format (L{worker_log_line}) and, when the
    supervisor logs to a descriptor (standard output: C{twistd -n}, the
    journal), writes them to that descriptor itself; when it logs to a
    rotating file (C{--logfile}) it sends the finished lines over a pipe
    and the supervisor writes the bytes through (L{_PassThrough}).
    Either way the supervisor parses no log line.  Only when it logs
    elsewhere (C{--syslog}, C{--logger}, C{twist}) does a worker send its
    events as JSON lines to be logged again (L{worker_log_event});
    L{supervisor_log_output} decides which;
  - a worker says it is ready on a control pipe of its own
    (L{ready_line}), never in its log;
  - worker K (0 to N-1) serves C{/metrics}, C{/healthz} and C{/readyz} on
    the C{metrics-listen} port + K (port 0: each its own free port);
  - a worker that exits is started again after a pause (1 s, doubling up
    to 30 s while it keeps dying within 10 s of its start).  Until every
    worker was ready once (C{READY=1}), one that dies
    L{MAX_START_FAILURES} times in a row before it was ready stops the
    whole relay with exit status 1; afterwards the relay keeps serving
    with the healthy workers (C{workers_degraded}, a degraded systemd
    C{STATUS=}) and tries that worker again every L{MAX_RESTART_DELAY}
    seconds;
  - a worker that finds another installed version than its supervisor's
    (an upgrade while the relay runs) exits with L{VERSION_CHANGED_EXIT};
    the supervisor then logs C{worker_version_changed} ("restart the
    service") and does not start that worker again (before C{READY=1} it
    stops the relay with exit status 1 instead);
  - SIGTERM stops it: every worker gets SIGTERM and drains as a single
    relay does; one still running C{drain_timeout} + 10 s later is
    killed; then the supervisor exits 0.  SIGINT (Ctrl-C) stops it the
    same way, but C{twistd} then ends itself with SIGINT, as it always
    does for that signal.  SIGHUP is passed on to every ready worker (TLS
    reload), and to a starting one as soon as it is ready.  Under systemd
    C{Type=notify}, C{READY=1} is sent once every worker is ready, a new
    C{STATUS=} whenever a worker exits or becomes ready after that, and
    C{STOPPING=1} when the stop begins; workers never talk to systemd
    themselves.

The settings go to each worker as one JSON line on its standard input
(L{worker_message}: never on its command line or in its environment; the
service key is in them, and every C{POSTSTACK_RELAY_*} variable is removed
from the workers' environment), whose pipe then stays open as a lifeline:
a worker whose supervisor vanished sees it close and stops (draining) by
itself.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import socket
import sys
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable, ContextManager, Mapping, NoReturn, Optional, Sequence

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.error import (
    CannotListenError,
    ConnectionDone,
    ProcessExitedAlready,
    ReactorNotRunning,
)
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IReadDescriptor
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import (
    ILogObserver,
    LogEvent,
    LogLevel,
    Logger,
    globalLogPublisher,
    timeFormatRFC3339,
)
from twisted.python.failure import Failure
from twisted.python.logfile import BaseLogFile
from zope.interface import implementer, provider

from ._version import __version__
from .config import ConfigError, ListenerConfig, RelayConfig
from .logs import TimeStamps, classic_text, fallback_line

_log = Logger()

RESTART_DELAY = 1.0
"""Seconds before a worker that exited is started again (the first time)."""

MAX_RESTART_DELAY = 30.0
"""The longest pause before a restart."""

STABLE_AFTER = 10.0
"""A worker that ran this many seconds is restarted after L{RESTART_DELAY}
again; one that dies sooner doubles the pause."""

MAX_START_FAILURES = 3
"""Deaths in a row of one worker before it was ready that stop the relay
(before C{READY=1}) or make it degraded (after)."""

VERSION_CHANGED_EXIT = 3
"""The exit status of a worker whose installed C{poststack_relay} version
is not its supervisor's (never change it: an old supervisor must
recognise it from a new worker)."""

START_TIMEOUT = 30.0
"""Seconds a worker has to become ready before it is killed (a failed start)."""

STOP_MARGIN = 10.0
"""Seconds beyond C{drain_timeout} a stopping worker gets before SIGKILL."""

KILL_WAIT = 5.0
"""Seconds to wait for killed workers before the supervisor stops anyway."""

LISTEN_BACKLOG = 1024
"""The backlog of the shared sockets (the kernel caps it at somaxconn)."""

MAX_LINE = 1 << 20
"""Longest line read from a worker; a longer one is cut."""

MAX_CONTROL_LINE = 1 << 16
"""Longest line read from a worker's control pipe."""

ATOMIC_WRITE = select.PIPE_BUF
"""Longest line a worker writes to the shared log descriptor itself (one
C{write}, atomic on a pipe); a longer one goes through the supervisor."""

WRITE_WAIT = 5.0
"""Seconds, at most, that writing one log line may wait for room on a
log descriptor someone made non-blocking (a blocking one simply blocks);
then the line is dropped, and the next lines are tried once each without
waiting (and counted) until one is written again (C{log_lines_dropped})."""

FIRST_FD = 3
"""A worker's first inherited listening socket; the others follow in order
(then its control pipe, its log pipe and, if any, the shared log
descriptor)."""

READY_EVENT = "worker_ready"
"""The event a worker logs once every port of it is bound (for people: the
supervisor learns it from L{READY_CONTROL} on the control pipe)."""

READY_CONTROL = "ready"
"""The control line a worker writes once every port of it is bound."""

LOG_EVENTS = "events"
"""Log mode of a worker: its events as JSON lines, logged again by the
supervisor (the supervisor logs to syslog, a C{--logger} or through
C{twist}'s filter)."""

LOG_LINES = "lines"
"""Log mode of a worker: finished lines in the supervisor's format."""

STRIPPED_ENVIRONMENT = (
    "NOTIFY_SOCKET",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
)
"""Variables a worker must not see: systemd talks to the supervisor only."""

STRIPPED_PREFIX = "POSTSTACK_RELAY_"
"""Neither may a worker see the relay's own settings variables (the service
key may be one): it takes its settings from its standard input only."""

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What a worker runs: SIGHUP ignored before anything else (the supervisor
# holds a SIGHUP for a worker that is not ready yet, but one already sent
# must not kill a process that is still importing), the package directory
# appended to sys.path (so a source tree found by twistd is found again),
# then worker_main().
_WORKER_CODE = (
    "import signal; signal.signal(signal.SIGHUP, signal.SIG_IGN); "
    "import sys; sys.path.append({root!r}); "
    "from poststack_relay.workers import worker_main; worker_main()"
)


# ---------------------------------------------------------------------------
# Pure helpers


def worker_metrics_listen(metrics_listen: str, index: int) -> str:
    """
    Where worker C{index} serves its metrics: the C{metrics-listen} port
    plus C{index}; port 0 and C{off} unchanged.

    @raise ConfigError: C{metrics_listen} is not valid.
    """
    if metrics_listen.strip().lower() in ("", "off"):
        return metrics_listen
    from .config import parse_metrics_listen

    host, port = parse_metrics_listen(metrics_listen)
    if port != 0:
        port += index
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def worker_settings(config: RelayConfig, index: int) -> dict[str, Any]:
    """
    The settings of worker C{index} as a JSON-ready mapping of
    L{RelayConfig} fields: C{config} with C{workers = 1} and its own
    metrics port.  C{RelayConfig(**worker_settings(...))} rebuilds it
    exactly (after a JSON round trip too).
    """
    settings = attrs.asdict(config, recurse=False)
    settings["listen"] = list(config.listen)
    settings["workers"] = 1
    settings["metrics_listen"] = worker_metrics_listen(config.metrics_listen, index)
    return settings


def worker_command(index: int, fds: Sequence[int]) -> tuple[str, list[str]]:
    """
    The executable and argument list that start worker C{index}, whose
    listening sockets are C{fds} (its own descriptor numbers).  C{-P}:
    the working directory is not put first on C{sys.path}, so a file
    there (C{email.py}, C{json.py}) cannot shadow a module of the worker
    (C{PYTHONPATH} still applies).
    """
    return sys.executable, [
        sys.executable,
        "-P",
        "-c",
        _WORKER_CODE.format(root=_PACKAGE_ROOT),
        "--worker",
        str(index),
        "--fds",
        ",".join(str(fd) for fd in fds),
    ]


def worker_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """
    A worker's environment: C{environ} without L{STRIPPED_ENVIRONMENT}
    and without any C{POSTSTACK_RELAY_*} variable (L{STRIPPED_PREFIX}).
    """
    return {
        k: v
        for k, v in environ.items()
        if k not in STRIPPED_ENVIRONMENT and not k.startswith(STRIPPED_PREFIX)
    }


def parse_worker_line(line: bytes) -> Optional[dict[str, Any]]:
    """
    One line of a worker's log pipe in L{LOG_EVENTS} mode as the JSON
    object (a log event) it should be; C{None} if it is not one.
    """
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def _event_time(value: object) -> Optional[float]:
    if not isinstance(value, str):
        return None
    try:
        when = datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ")
    except ValueError:
        return None
    return when.replace(tzinfo=timezone.utc).timestamp()


def worker_log_event(fields: Mapping[str, Any], index: int, now: float) -> LogEvent:
    """
    The log event that tells again, in the supervisor's log, what worker
    C{index} logged as the JSON object C{fields}
    (L{poststack_relay.logs.event_as_json}): same namespace, level, time,
    message, event name and fields, plus C{worker}; its C{log_system} is
    C{namespace#level worker=K}, what a text log shows in brackets.  A
    traceback is appended to the message.

    @param now: the time to use when C{fields} has none.
    """
    fields = dict(fields)
    message = str(fields.pop("message", ""))
    traceback = fields.pop("traceback", None)
    if traceback:
        message = f"{message}\n{traceback}"
    level_name = fields.pop("level", "info")
    try:
        level = LogLevel.levelWithName(str(level_name))
    except Exception:
        level = LogLevel.info
    namespace = str(fields.pop("namespace", None) or "poststack_relay.worker")
    when = _event_time(fields.pop("time", None))
    event: LogEvent = {k: v for k, v in fields.items() if not str(k).startswith("log_")}
    event.update(
        log_format=_escape(message),
        log_level=level,
        log_namespace=namespace,
        log_system=f"{namespace}#{level.name} worker={index}",
        log_time=now if when is None else when,
        worker=index,
    )
    return event


def worker_output_event(line: bytes, index: int, stream: str, now: float) -> LogEvent:
    """
    The log event for a line worker C{index} wrote that is not a JSON log
    event: anything on its standard error (a crash before its logging
    started), or a stray line on its standard output.
    """
    text = line.decode("utf-8", "backslashreplace").rstrip("\r")
    return {
        "log_format": "worker {worker} {stream}: {line}",
        "log_level": LogLevel.warn if stream == "stderr" else LogLevel.info,
        "log_namespace": __name__,
        "log_system": f"{__name__}#{'warn' if stream == 'stderr' else 'info'} worker={index}",
        "log_time": now,
        "worker": index,
        "stream": stream,
        "line": text,
        "event": "worker_output",
    }


def worker_message(
    config: RelayConfig, index: int, control: Optional[int], log: Mapping[str, Any]
) -> dict[str, Any]:
    """
    The JSON object worker C{index} reads as one line on its standard
    input: C{version} (the supervisor's C{poststack_relay.__version__}),
    C{settings} (L{worker_settings}), C{control} (its descriptor for
    L{ready_line}, or C{None}) and C{log}, how it logs:
    C{{"mode": "lines", "format": "json" or "text", "time_format": ...,
    "pipe": P, "direct": D or null, "path": F or null}} (L{LOG_LINES}:
    finished lines, to descriptor C{D} when short enough, else to the pipe
    C{P} to the supervisor; C{F}, the supervisor's log file, is appended to
    once the supervisor is gone) or C{{"mode": "events", "pipe": P}}
    (L{LOG_EVENTS}).
    """
    return {
        "version": __version__,
        "settings": worker_settings(config, index),
        "control": control,
        "log": dict(log),
    }


def _read_message(message: object) -> tuple[dict[str, Any], Optional[int], dict[str, Any]]:
    """
    The settings, control descriptor and log mode of a L{worker_message}.

    @raise ValueError: C{message} is not one.
    """

    def descriptor(value: object, what: str, optional: bool = True) -> Optional[int]:
        if value is None and optional:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{what} is not a descriptor: {value!r}")
        return value

    if not isinstance(message, dict) or not isinstance(message.get("settings"), dict):
        raise ValueError("the settings are not a JSON object")
    control = descriptor(message.get("control"), "control")
    log = message.get("log")
    if not isinstance(log, dict) or log.get("mode") not in (LOG_EVENTS, LOG_LINES):
        raise ValueError(f"not a log mode: {log!r}")
    descriptor(log.get("pipe"), "log pipe", optional=False)
    if log["mode"] == LOG_LINES:
        descriptor(log.get("direct"), "log descriptor")
        if log.get("format") not in ("json", "text"):
            raise ValueError(f"not a log format: {log.get('format')!r}")
        if not isinstance(log.get("time_format"), (str, type(None))):
            raise ValueError(f"not a time format: {log.get('time_format')!r}")
        if not isinstance(log.get("path"), (str, type(None))):
            raise ValueError(f"not a log file path: {log.get('path')!r}")
    return message["settings"], control, log


def ready_line(pid: int, listening: Sequence[str], metrics: Optional[str]) -> bytes:
    """
    The line a worker writes on its control pipe once every port of it is
    bound: C{ready} and a JSON object (C{pid}, C{listening}, C{metrics}).
    """
    fields = {"pid": pid, "listening": list(listening), "metrics": metrics}
    return f"{READY_CONTROL} {json.dumps(fields, ensure_ascii=True)}\n".encode("ascii")


def parse_control_line(line: bytes) -> Optional[tuple[str, dict[str, Any]]]:
    """
    A control line (L{ready_line}) as its word and its JSON object (empty
    when there is none); C{None} for anything else.
    """
    word, _, rest = line.strip().partition(b" ")
    try:
        name = word.decode("ascii")
        value = json.loads(rest) if rest.strip() else {}
    except ValueError:
        return None
    if not name or not isinstance(value, dict):
        return None
    return name, value


# One time formatter per time format (a worker has one): see TimeStamps.
_TIME_STAMPS: dict[Optional[str], TimeStamps] = {}


def worker_log_line(
    event: LogEvent, index: int, log_format: str, time_format: Optional[str] = timeFormatRFC3339
) -> Optional[bytes]:
    """
    One event of worker C{index} as the final line of the supervisor's
    log, UTF-8 with its newline: exactly what the supervisor's own
    observer would write for the event plus the worker's number.

      - C{json}: L{poststack_relay.logs.event_as_json} of the event plus
        C{"worker": index};
      - C{text}: twistd's line (C{textFileLogObserver} with
        C{time_format}), with C{namespace#level worker=K} in the brackets.

    C{None} when the text format writes nothing for the event.  Never
    raises.
    """
    if log_format == "json":
        from .logs import event_as_json

        try:
            fields = event_as_json(event)
            fields["worker"] = index
            try:
                text = json.dumps(fields, ensure_ascii=False, allow_nan=False) + "\n"
                return text.encode("utf-8")
            except UnicodeEncodeError:
                return (json.dumps(fields, ensure_ascii=True, allow_nan=False) + "\n").encode("ascii")
        except Exception as e:
            return fallback_line(event, e, worker=index).encode("ascii")
    try:
        namespace = event.get("log_namespace") or "poststack_relay.worker"
        level = getattr(event.get("log_level"), "name", "info")
        shown = dict(event)
        shown["log_system"] = f"{namespace}#{level} worker={index}"
        stamp = _TIME_STAMPS.get(time_format)
        if stamp is None:
            stamp = _TIME_STAMPS[time_format] = TimeStamps(time_format)
        line = classic_text(shown, stamp)
    except Exception as e:
        line = f"- [{__name__}#error worker={index}] a log event could not be written: {e!r}\n"
    return line.encode("utf-8", "backslashreplace") if line else None


def _write_all(fd: int, data: bytes, wait: float = WRITE_WAIT) -> bool:
    """
    Write all of C{data} to C{fd}: one C{write} when the descriptor takes
    it all (always, for a blocking pipe or file, which blocks for as long
    as its reader makes it); on a descriptor someone made non-blocking,
    wait for room, C{wait} seconds at most for all of C{data} together
    (0: no waiting at all).

    @return: whether it was all written (a closed pipe, a full disk or no
        room in time loses the rest).
    """
    view = memoryview(data)
    deadline: Optional[float] = None
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            now = time.monotonic()
            if deadline is None:
                deadline = now + wait
            if now >= deadline:
                return False
            try:
                room = select.select([], [fd], [], deadline - now)[1]
            except (OSError, ValueError):
                return False
            if not room:
                return False
            continue
        except OSError:
            return False
        if written <= 0:
            return False
        view = view[written:]
    return True


def _dropped_event(count: int) -> LogEvent:
    """
    The event a worker logs once it can write its log again after
    C{count} lines were lost.
    """
    return {
        "log_format": "{count} log lines could not be written (the log was full or gone) and were dropped",
        "log_level": LogLevel.warn,
        "log_namespace": __name__,
        "log_time": time.time(),
        "count": count,
        "event": "log_lines_dropped",
    }


class _LineWriter:
    """
    Writes a worker's finished lines, one C{write} each: to the shared log
    descriptor C{direct} when the line is at most C{atomic} bytes (so that
    it cannot interleave with another process's line on a pipe), else
    (or without C{direct}) to C{pipe}, the pipe to the supervisor.

    A line that cannot be written within C{wait} seconds (L{_write_all})
    is dropped, and the writer starts dropping: each next line is tried
    once, without waiting, and counted when it fails, so that a stuck log
    costs the worker's reactor at most C{wait} seconds in all, not per
    line.  The first line written again is followed by the line
    C{dropped(count)} (C{log_lines_dropped}).

    @ivar dropped_count: lines dropped since the last one written.
    """

    def __init__(
        self,
        pipe: int,
        direct: Optional[int],
        atomic: int = ATOMIC_WRITE,
        *,
        wait: float = WRITE_WAIT,
        dropped: Optional[Callable[[int], Optional[bytes]]] = None,
        path: Optional[str] = None,
    ) -> None:
        """
        @param dropped: makes the line telling how many lines were dropped.
        @param path: the supervisor's log file, appended to once the
            supervisor is gone (L{orphaned}).
        """
        self._pipe = pipe
        self._direct = direct
        self._atomic = atomic
        self._wait = wait
        self._dropped = dropped
        self._path = path
        self._lock = threading.Lock()
        self._dropping = False
        self.dropped_count = 0

    def _write(self, line: bytes, wait: float) -> bool:
        fd = self._direct if self._direct is not None and len(line) <= self._atomic else self._pipe
        return _write_all(fd, line, wait)

    def __call__(self, line: bytes) -> None:
        with self._lock:
            if not self._dropping:
                if not self._write(line, self._wait):
                    self._dropping = True
                    self.dropped_count = 1
                return
            if not self._write(line, 0.0):
                self.dropped_count += 1
                return
            notice = self._dropped(self.dropped_count) if self._dropped is not None else None
            if notice is None or self._write(notice, self._wait):
                self._dropping = False
                self.dropped_count = 0

    def orphaned(self) -> None:
        """
        The supervisor is gone, and nothing reads the pipe to it any more:
        from now on every line goes to the shared descriptor (whatever its
        length), or, without one, is appended to the supervisor's log file
        (C{path}; it is not rotated any more).  Without either, lines are
        lost.
        """
        with self._lock:
            if self._direct is not None:
                self._atomic = sys.maxsize
            elif self._path is not None:
                try:
                    self._pipe = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
                except OSError:
                    pass  # not ours to open (made before privileges were dropped)


def worker_line_observer(
    index: int, log_format: str, time_format: Optional[str], write: Callable[[bytes], None]
) -> ILogObserver:
    """
    The log observer of worker C{index} in L{LOG_LINES} mode: each event
    as L{worker_log_line}, handed to C{write}.  Never raises.
    """

    @provider(ILogObserver)
    def observe(event: LogEvent) -> None:
        line = worker_log_line(event, index, log_format, time_format)
        if line:
            try:
                write(line)
            except Exception:
                pass

    return observe


# ---------------------------------------------------------------------------
# Where the supervisor's log goes


@attrs.frozen
class LogOutput:
    """
    The supervisor's own log, as its workers need to know it.

    @ivar format: C{json} or C{text}: how its lines look.
    @ivar write: writes bytes made of whole lines to the log, as the
        supervisor's own observer does (through its rotating file, under
        its lock).
    @ivar fd: the descriptor the log is written to, which workers may
        write to themselves (standard output, the journal); C{None} for a
        rotating file, which only the supervisor writes.
    @ivar time_format: the text format's time format (C{strftime}).
    @ivar path: the rotating file's path (C{fd} is C{None}), which a
        worker appends to once its supervisor is gone.
    """

    format: str
    write: Callable[[bytes], None]
    fd: Optional[int] = None
    time_format: Optional[str] = timeFormatRFC3339
    path: Optional[str] = None


def _observer_file(observer: object) -> Optional[tuple[str, Any, ContextManager[Any], Optional[str]]]:
    """
    For an observer made by L{poststack_relay.logs.textLineObserver} or
    L{poststack_relay.logs.jsonLineObserver} (they say so in their
    C{line_format} attribute): the format, the file it writes to, the
    lock it writes under and the time format.  C{None} for any other
    observer.
    """
    line_format = getattr(observer, "line_format", None)
    if line_format not in ("text", "json"):
        return None
    out, lock = getattr(observer, "outFile", None), getattr(observer, "lock", None)
    time_format = getattr(observer, "timeFormat", timeFormatRFC3339) if line_format == "text" else None
    if out is None or not hasattr(lock, "__enter__") or not isinstance(time_format, (str, type(None))):
        return None
    return line_format, out, lock, time_format


def supervisor_log_output(observers: Sequence[object]) -> Optional[LogOutput]:
    """
    Where the supervisor's log goes, from the observer it logs through: a
    L{LogOutput} when the one observer is the relay's text or JSON
    observer (L{poststack_relay.logs.textLineObserver},
    L{poststack_relay.logs.jsonLineObserver}) writing to a rotating
    C{LogFile} (C{--logfile}; C{fd} is C{None}) or to a descriptor
    (standard output: C{twistd -n}, C{--logfile -}); C{None} otherwise
    (no observer of the relay's: C{--syslog}, C{--logger}, C{twist}'s
    filtering observer; or several observers): then the workers' events
    are logged again, one by one.
    """
    if len(observers) != 1:
        return None
    found = _observer_file(observers[0])
    if found is None:
        return None
    log_format, out, lock, time_format = found
    if isinstance(out, BaseLogFile):

        def write_file(data: bytes) -> None:
            with lock:
                out.write(data)
                out.flush()

        path = getattr(out, "path", None)
        return LogOutput(log_format, write_file, None, time_format, path if isinstance(path, str) else None)
    try:
        fd = out.fileno()
        os.fstat(fd)
    except (AttributeError, OSError, ValueError):
        return None

    def write_descriptor(data: bytes) -> None:
        with lock:
            try:
                out.flush()
            except Exception:
                pass
            _write_all(fd, data)

    return LogOutput(log_format, write_descriptor, fd, time_format)


def describe_exit(reason: Failure) -> tuple[str, Optional[int], Optional[int]]:
    """
    How a process ended, from C{processEnded}'s reason: a text
    (C{exit status 1}, C{signal 9 (SIGKILL)}), the exit status and the
    signal.
    """
    code = getattr(reason.value, "exitCode", None)
    number = getattr(reason.value, "signal", None)
    if number is not None:
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = "unknown"
        return f"signal {number} ({name})", code, number
    if code is not None:
        return f"exit status {code}", code, None
    return str(reason.value), None, None


def _address(name: Any) -> str:
    if isinstance(name, tuple) and len(name) >= 2:
        host, port = name[0], name[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(name)


def bind_listener(listener: ListenerConfig, backlog: int = LISTEN_BACKLOG) -> socket.socket:
    """
    A listening TCP socket for C{listener}, bound as Twisted would bind it
    (C{SO_REUSEADDR}; IPv6 for an interface with a colon, else IPv4, all
    interfaces for C{""}).

    @raise CannotListenError: it cannot be bound.
    """
    v6 = ":" in listener.interface
    family = socket.AF_INET6 if v6 else socket.AF_INET
    host = listener.interface or "0.0.0.0"
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if v6:
            address: Any = socket.getaddrinfo(host, listener.port, family, socket.SOCK_STREAM)[0][4]
        else:
            address = (host, listener.port)
        sock.bind(address)
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise CannotListenError(listener.interface, listener.port, e) from None
    return sock


class _LineBuffer:
    """
    Splits a byte stream into lines, none longer than C{limit} bytes.
    """

    def __init__(self, limit: int = MAX_LINE) -> None:
        self._limit = limit
        self._buffer = b""

    def feed(self, data: bytes) -> list[bytes]:
        """
        The lines completed by C{data}, without their newlines.
        """
        self._buffer += data
        lines = self._buffer.split(b"\n")
        self._buffer = lines.pop()
        if len(self._buffer) > self._limit:
            lines.append(self._buffer)
            self._buffer = b""
        return lines

    def flush(self) -> list[bytes]:
        """
        The last, unterminated line, if any.
        """
        rest, self._buffer = self._buffer, b""
        return [rest] if rest else []


class _PassThrough:
    """
    Hands a stream of finished log lines on to C{write} as it comes, in
    chunks of whole lines, without looking at them: only an unfinished
    last line is kept back, up to C{limit} bytes (a longer one is cut and
    ended with a newline).  Writing whole lines only, the supervisor's
    log file rotates between lines.
    """

    def __init__(self, write: Callable[[bytes], None], limit: int = MAX_LINE) -> None:
        self._write = write
        self._limit = limit
        self._pending: list[bytes] = []
        self._size = 0

    def _hand_on(self, data: bytes) -> None:
        try:
            self._write(data)
        except Exception:
            pass  # as the log observer itself: a line the log cannot take is lost

    def feed(self, data: bytes) -> None:
        """
        Take C{data}; write every line it finishes.
        """
        end = data.rfind(b"\n") + 1
        if end:
            head = data if end == len(data) else data[:end]
            if self._pending:
                head = b"".join(self._pending) + head
                self._pending, self._size = [], 0
            self._hand_on(head)
            data = data[end:]
        if data:
            self._pending.append(data)
            self._size += len(data)
            if self._size > self._limit:
                self.flush()

    def flush(self) -> None:
        """
        Write the unfinished last line, if any, ended with a newline.
        """
        if self._pending:
            rest = b"".join(self._pending)
            self._pending, self._size = [], 0
            self._hand_on(rest + b"\n")


# ---------------------------------------------------------------------------
# The supervisor


@attrs.define(eq=False)
class WorkerSlot:
    """
    One of the N workers, across its restarts.

    @ivar index: 0 to N-1.
    @ivar process: the running process (C{IProcessTransport}), or C{None}.
    @ivar protocol: its process protocol.
    @ivar pid: its process id, or C{None}.
    @ivar started: when it was started (clock seconds).
    @ivar ready: whether the running process said it is ready.
    @ivar start_failures: deaths in a row before ready.
    @ivar delay: the pause before the next restart.
    @ivar restart: the pending restart, if any.
    @ivar start_timer: the pending start time-out, if any.
    @ivar metrics: where its metrics are served (from its ready event).
    @ivar generation: how many times it was started.
    @ivar reload_pending: a SIGHUP came while the running process was not
        ready yet: it gets one once it is.
    @ivar degraded: it failed L{MAX_START_FAILURES} times in a row after
        the relay was ready (C{workers_degraded}); cleared when it is
        ready again.
    @ivar halted: it found another installed version: not started again.
    @ivar last_exit: how its last process ended (C{exit status 1}, ...).
    """

    index: int
    process: Any = None
    protocol: Optional["_WorkerProtocol"] = None
    pid: Optional[int] = None
    started: float = 0.0
    ready: bool = False
    start_failures: int = 0
    delay: float = RESTART_DELAY
    restart: Optional[IDelayedCall] = None
    start_timer: Optional[IDelayedCall] = None
    metrics: Optional[str] = None
    generation: int = 0
    reload_pending: bool = False
    degraded: bool = False
    halted: bool = False
    last_exit: str = ""


class _WorkerProtocol(ProcessProtocol):
    """
    Reads one worker process's pipes for the supervisor: its standard
    output and error and its control pipe line by line, and its log pipe
    line by line (L{LOG_EVENTS}) or passed through to C{write}
    (L{LOG_LINES}).

    @ivar control_fd: the worker's descriptor of its control pipe.
    @ivar log_fd: the worker's descriptor of its log pipe.
    """

    def __init__(
        self,
        supervisor: "Supervisor",
        slot: WorkerSlot,
        control_fd: Optional[int] = None,
        log_fd: Optional[int] = None,
        write: Optional[Callable[[bytes], None]] = None,
    ) -> None:
        self.supervisor = supervisor
        self.slot = slot
        self.control_fd = control_fd
        self.log_fd = log_fd
        self._lines = {1: _LineBuffer(), 2: _LineBuffer()}
        if control_fd is not None:
            self._lines[control_fd] = _LineBuffer(MAX_CONTROL_LINE)
        self._through: Optional[_PassThrough] = None
        if log_fd is not None:
            if write is None:
                self._lines[log_fd] = _LineBuffer()
            else:
                self._through = _PassThrough(write)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if self._through is not None and childFD == self.log_fd:
            self._through.feed(data)
            return
        buffer = self._lines.get(childFD)
        if buffer is None:
            return
        for line in buffer.feed(data):
            self.supervisor._worker_line(self, childFD, line)

    def processEnded(self, reason: Failure) -> None:
        if self._through is not None:
            self._through.flush()
        for childFD, buffer in self._lines.items():
            for line in buffer.flush():
                self.supervisor._worker_line(self, childFD, line)
        self.supervisor._worker_ended(self, reason)


SpawnProcess = Callable[..., Any]


class Supervisor(Service):
    """
    Runs C{config.workers} relay processes on shared listening sockets and
    keeps them running (see the module docstring).

    @ivar slots: one L{WorkerSlot} per worker.
    @ivar exit_status: 0, or 1 once the relay stopped because a worker
        could not start before C{READY=1} (or found another installed
        version then); the command should then exit with it.
    @ivar sockets: the listening sockets, in the order of
        C{config.listeners()}, as descriptors (C{None} before binding).
    """

    def __init__(
        self,
        config: RelayConfig,
        reactor: Any,
        *,
        spawn: Optional[SpawnProcess] = None,
        clock: Optional[IReactorTime] = None,
        notifier: Any = None,
        observer: Optional[Callable[[LogEvent], None]] = None,
        environ: Optional[Mapping[str, str]] = None,
        stop: Optional[Callable[[], None]] = None,
        log_output: Optional[LogOutput] = None,
    ) -> None:
        """
        @param config: the relay's settings; C{config.workers} workers.
        @param reactor: provides C{IReactorProcess} and C{IReactorTime}.
        @param spawn: C{spawnProcess(protocol, executable, args, env=,
            childFDs=)}; C{reactor.spawnProcess} by default.
        @param clock: for restarts and time-outs; C{reactor} by default.
        @param notifier: a L{poststack_relay.systemd.SystemdNotifier}; one
            for this process's C{NOTIFY_SOCKET} by default.
        @param observer: where the workers' log events go when they are
            logged again (L{LOG_EVENTS}); the global log publisher by
            default.
        @param environ: the environment workers inherit (without
            L{STRIPPED_ENVIRONMENT}); C{os.environ} by default.
        @param stop: stops the whole relay when workers cannot start;
            C{reactor.stop} by default.
        @param log_output: where the workers' finished lines go
            (L{LOG_LINES}); by default found when the first worker starts
            (L{supervisor_log_output} of the observer its parent service
            made, a L{poststack_relay.logs.LogObserverService} as
            L{poststack_relay.tap.makeService} makes it), unless
            C{observer} is given: then the workers' events are logged
            again through it.
        @raise ConfigError: a systemd socket of a listener was not passed.
        """
        from .systemd import SystemdNotifier, socketEndpoint

        self.config = config
        self.listener_configs = config.listeners()
        self._reactor = reactor
        self._spawn = spawn if spawn is not None else reactor.spawnProcess
        self._clock: IReactorTime = clock if clock is not None else reactor
        self.notifier = notifier if notifier is not None else SystemdNotifier()
        self._observer = observer if observer is not None else globalLogPublisher
        self._log_output = log_output
        self._log_known = log_output is not None or observer is not None
        self._environ = os.environ if environ is None else environ
        self._stop_relay = stop if stop is not None else self._stop_reactor
        self.slots = [WorkerSlot(index) for index in range(config.workers)]
        self.exit_status = 0
        self.sockets: list[Optional[int]] = [None] * len(self.listener_configs)
        self._sockets: list[socket.socket] = []
        self._systemd: dict[int, int] = {}
        self._bound = False
        self._stopping = False
        self._announced = False
        self._status = ""
        self._stopped: Optional[Deferred[None]] = None
        self._stop_timers: list[IDelayedCall] = []
        self.addresses: list[str] = []
        for index, listener in enumerate(self.listener_configs):
            if listener.systemd_socket:
                try:
                    endpoint = socketEndpoint(reactor, listener.systemd_socket)
                except ConfigError as e:
                    if not listener.spec:
                        raise
                    raise ConfigError(f"listen {listener.spec!r}: {e}") from None
                self._systemd[index] = endpoint.fileno  # type: ignore[attr-defined]

    # -- start

    def _bind(self) -> None:
        """
        Bind every listener not passed by systemd; on a failure close the
        ones already bound and raise.
        """
        if self._bound:
            return
        bound: list[socket.socket] = []
        fds: list[int] = []
        addresses: list[str] = []
        try:
            for index, listener in enumerate(self.listener_configs):
                if index in self._systemd:
                    fd = self._systemd[index]
                    probe = socket.socket(fileno=os.dup(fd))
                    try:
                        addresses.append(_address(probe.getsockname()))
                    finally:
                        probe.close()
                else:
                    sock = bind_listener(listener)
                    bound.append(sock)
                    fd = sock.fileno()
                    addresses.append(_address(sock.getsockname()))
                fds.append(fd)
        except BaseException:
            for sock in bound:
                sock.close()
            raise
        self._sockets = bound
        self.sockets = list(fds)
        self.addresses = addresses
        self._bound = True
        _log.info(
            "supervisor listening on {where} for {workers} workers (shared sockets)",
            where=", ".join(addresses),
            listeners=addresses,
            workers=len(self.slots),
            event="supervisor_listening",
        )

    def privilegedStartService(self) -> None:
        """
        Bind the listeners (C{twistd} calls this before it drops
        privileges).
        """
        self._bind()
        Service.privilegedStartService(self)

    def startService(self) -> None:
        """
        Bind the listeners if not yet done (C{twist}), then start every
        worker.
        """
        self._bind()
        Service.startService(self)
        for slot in self.slots:
            self._start(slot)

    def log_output(self) -> Optional[LogOutput]:
        """
        Where the workers' finished lines go (L{LOG_LINES}), or C{None}
        when their events are logged again (L{LOG_EVENTS}); found once,
        when the first worker starts (the runner's logging has begun by
        then), and logged as C{workers_logging}.

        The runner logs through the observer the supervisor's parent made
        (C{twistd}: L{poststack_relay.logs.LogObserverService.observer});
        without one (C{twist}, whose level filter the workers cannot
        apply; C{--syslog}, C{--logger}; no such parent) the workers'
        events are logged again.
        """
        if not self._log_known:
            self._log_known = True
            observer = getattr(self.parent, "observer", None)
            self._log_output = supervisor_log_output([observer]) if observer is not None else None
            output = self._log_output
            if output is None:
                how, text = "events", "logged again by the supervisor (its log goes to syslog, a --logger or a filter)"
            elif output.fd is None:
                how, text = "through", "finished by each worker, written through by the supervisor"
            else:
                how, text = "direct", f"finished and written to descriptor {output.fd} by each worker"
            _log.info(
                "workers' log lines: {text}",
                text=text,
                mode=how,
                line_format=output.format if output is not None else "json",
                event="workers_logging",
            )
        return self._log_output

    def _start(self, slot: WorkerSlot) -> None:
        slot.restart = None
        if self._stopping:
            return
        fds = [FIRST_FD + i for i in range(len(self.sockets))]
        executable, args = worker_command(slot.index, fds)
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        for child, fd in zip(fds, self.sockets):
            child_fds[child] = fd
        control_fd = FIRST_FD + len(fds)
        log_fd = control_fd + 1
        child_fds[control_fd] = child_fds[log_fd] = "r"
        output = self.log_output()
        log: dict[str, Any]
        if output is None:
            log = {"mode": LOG_EVENTS, "pipe": log_fd}
        else:
            direct = None
            if output.fd is not None:
                direct = log_fd + 1
                child_fds[direct] = output.fd
            log = {
                "mode": LOG_LINES,
                "format": output.format,
                "time_format": output.time_format,
                "pipe": log_fd,
                "direct": direct,
                "path": output.path,
            }
        protocol = _WorkerProtocol(
            self, slot, control_fd, log_fd, output.write if output is not None else None
        )
        slot.generation += 1
        slot.ready = False
        slot.reload_pending = False  # a new process loads the files anew
        slot.metrics = None
        slot.started = self._clock.seconds()
        try:
            process = self._spawn(
                protocol, executable, args, env=worker_environment(self._environ), childFDs=child_fds
            )
        except Exception as e:
            _log.error(
                "cannot start worker {worker}: {error}",
                worker=slot.index,
                error=str(e),
                event="worker_spawn_failed",
            )
            self._ended(slot, None, "not started", None, None)
            return
        slot.process = process
        slot.protocol = protocol
        slot.pid = getattr(process, "pid", None)
        message = worker_message(self.config, slot.index, control_fd, log)
        line = json.dumps(message, ensure_ascii=True) + "\n"
        process.write(line.encode("ascii"))
        slot.start_timer = self._clock.callLater(START_TIMEOUT, self._start_timed_out, slot, protocol)
        _log.info(
            "worker {worker} started, pid {pid}",
            worker=slot.index,
            pid=slot.pid,
            generation=slot.generation,
            event="worker_started",
        )

    def _start_timed_out(self, slot: WorkerSlot, protocol: _WorkerProtocol) -> None:
        slot.start_timer = None
        if slot.protocol is not protocol or slot.ready or slot.process is None:
            return
        _log.warn(
            "worker {worker} (pid {pid}) not ready after {timeout:g} s: killing it",
            worker=slot.index,
            pid=slot.pid,
            timeout=START_TIMEOUT,
            event="worker_start_timeout",
        )
        self._signal(slot, "KILL")

    # -- the workers' output

    def _worker_line(self, protocol: _WorkerProtocol, childFD: int, line: bytes) -> None:
        slot = protocol.slot
        now = self._clock.seconds()
        stream = "stdout" if childFD == 1 else "stderr" if childFD == 2 else "log"
        if childFD == protocol.control_fd:
            control = parse_control_line(line)
            if control is not None and control[0] == READY_CONTROL:
                if slot.protocol is protocol:
                    self._worker_ready(slot, control[1])
                return
            stream = "control"
        elif childFD == protocol.log_fd:
            fields = parse_worker_line(line)
            if fields is not None:
                self._emit(worker_log_event(fields, slot.index, now))
                return
        if line.strip():
            self._emit(worker_output_event(line, slot.index, stream, now))

    def _emit(self, event: LogEvent) -> None:
        try:
            self._observer(event)
        except Exception:
            pass  # the log publisher reports its own observers' errors

    def _worker_ready(self, slot: WorkerSlot, fields: Mapping[str, Any]) -> None:
        if slot.ready:
            return
        slot.ready = True
        failures, slot.start_failures = slot.start_failures, 0
        metrics = fields.get("metrics")
        slot.metrics = metrics if isinstance(metrics, str) else None
        if slot.start_timer is not None and slot.start_timer.active():
            slot.start_timer.cancel()
        slot.start_timer = None
        if slot.reload_pending:
            slot.reload_pending = False
            if self._signal(slot, "HUP"):
                _log.info(
                    "SIGHUP held for worker {worker} until it was ready: passed on",
                    worker=slot.index,
                    trigger="held",
                    count=1,
                    workers=[slot.index],
                    held=[],
                    event="workers_reload",
                )
        if slot.degraded:
            slot.degraded = False
            _log.info(
                "worker {worker} (pid {pid}) is ready again after {failures} failed starts",
                worker=slot.index,
                pid=slot.pid,
                failures=failures,
                event="worker_recovered",
            )
        if self._stopping:
            return
        if self._announced:
            self._notify_status()
            return
        if not all(s.ready for s in self.slots):
            return
        self._announced = True
        where = ", ".join(self.addresses)
        _log.info(
            "all {workers} workers ready, listening on {where}",
            workers=len(self.slots),
            where=where,
            pids=[s.pid for s in self.slots],
            metrics=[s.metrics for s in self.slots],
            event="workers_ready",
        )
        self._status = self._status_text()
        self.notifier.notify(f"READY=1\nSTATUS={self._status}")

    def _status_text(self) -> str:
        """
        The systemd C{STATUS=} text: C{N workers listening on ...}, or which
        workers are down and why.
        """
        count = len(self.slots)
        where = ", ".join(self.addresses)
        ready = sum(1 for slot in self.slots if slot.ready)
        if ready == count:
            return f"{count} workers listening on {where}"
        down = []
        for slot in self.slots:
            if slot.ready:
                continue
            if slot.halted:
                down.append(f"worker {slot.index} stopped: installed version changed, restart the service")
            elif slot.degraded:
                down.append(f"worker {slot.index} cannot start ({slot.last_exit})")
            else:
                down.append(f"worker {slot.index} restarting")
        degraded = any(slot.halted or slot.degraded for slot in self.slots)
        return f"{'degraded: ' if degraded else ''}{ready} of {count} workers listening on {where}; " + "; ".join(down)

    def _notify_status(self) -> None:
        """
        Tell systemd the current C{STATUS=} when it changed (only after
        C{READY=1}, and not while stopping).
        """
        if not self._announced or self._stopping:
            return
        status = self._status_text()
        if status != self._status:
            self._status = status
            self.notifier.notify(f"STATUS={status}")

    # -- exits and restarts

    def _worker_ended(self, protocol: _WorkerProtocol, reason: Failure) -> None:
        slot = protocol.slot
        if slot.protocol is not protocol:
            return
        status, code, number = describe_exit(reason)
        self._ended(slot, slot.pid, status, code, number)

    def _ended(
        self,
        slot: WorkerSlot,
        pid: Optional[int],
        status: str,
        code: Optional[int],
        number: Optional[int],
    ) -> None:
        was_ready = slot.ready
        slot.process = None
        slot.protocol = None
        slot.ready = False
        slot.last_exit = status
        if slot.start_timer is not None and slot.start_timer.active():
            slot.start_timer.cancel()
        slot.start_timer = None
        uptime = self._clock.seconds() - slot.started
        if self._stopping:
            _log.info(
                "worker {worker} (pid {pid}) stopped: {status}",
                worker=slot.index,
                pid=pid,
                status=status,
                exit_status=code,
                signal=number,
                event="worker_stopped",
            )
            self._check_stopped()
            return
        if code == VERSION_CHANGED_EXIT and not was_ready:
            self._version_changed(slot, pid)
            return
        if not was_ready:
            slot.start_failures += 1
            if slot.start_failures >= MAX_START_FAILURES:
                if not self._announced:
                    self._give_up(slot, pid, status, code, number)
                    return
                if not slot.degraded:
                    slot.degraded = True
                    _log.critical(
                        "worker {worker} (pid {pid}) exited with {status} before it was ready, "
                        "{failures} times in a row: the relay goes on with the other workers "
                        "and tries it again every {restart_in:g} s",
                        worker=slot.index,
                        pid=pid,
                        status=status,
                        exit_status=code,
                        signal=number,
                        failures=slot.start_failures,
                        restart_in=MAX_RESTART_DELAY,
                        event="workers_degraded",
                    )
        if slot.degraded:
            slot.delay = MAX_RESTART_DELAY
        elif uptime >= STABLE_AFTER:
            slot.delay = RESTART_DELAY
        delay = slot.delay
        slot.delay = min(delay * 2, MAX_RESTART_DELAY)
        _log.warn(
            "worker {worker} (pid {pid}) exited with {status} after {uptime:.1f} s{before_ready}; "
            "restarting it in {restart_in:g} s",
            worker=slot.index,
            pid=pid,
            status=status,
            exit_status=code,
            signal=number,
            uptime=round(uptime, 3),
            ready=was_ready,
            before_ready="" if was_ready else " before it was ready",
            restart_in=delay,
            event="worker_exited",
        )
        slot.restart = self._clock.callLater(delay, self._start, slot)
        self._notify_status()

    def _version_changed(self, slot: WorkerSlot, pid: Optional[int]) -> None:
        """
        Worker C{slot} exited with L{VERSION_CHANGED_EXIT}: the code on
        disk is not the supervisor's.  Starting it again cannot help:
        before C{READY=1} the relay stops (exit status 1, for systemd to
        start the new version); afterwards that worker stays down.
        """
        slot.halted = True
        before = not self._announced
        _log.critical(
            "worker {worker} (pid {pid}) runs another version of poststack-relay than the "
            "supervisor ({version}): installed version changed: restart the service; {action}",
            worker=slot.index,
            pid=pid,
            version=__version__,
            action="stopping the relay" if before else "the worker is not started again",
            exit_status=VERSION_CHANGED_EXIT,
            event="worker_version_changed",
        )
        if before:
            self.exit_status = 1
            self._stop_relay()
            return
        self._notify_status()

    def _give_up(
        self,
        slot: WorkerSlot,
        pid: Optional[int],
        status: str,
        code: Optional[int],
        number: Optional[int],
    ) -> None:
        self.exit_status = 1
        _log.critical(
            "worker {worker} (pid {pid}) exited with {status} before it was ready, "
            "{failures} times in a row: stopping the relay",
            worker=slot.index,
            pid=pid,
            status=status,
            exit_status=code,
            signal=number,
            failures=slot.start_failures,
            event="workers_failed",
        )
        self._stop_relay()

    def _stop_reactor(self) -> None:
        try:
            self._reactor.stop()
        except ReactorNotRunning:
            pass

    def _signal(self, slot: WorkerSlot, name: str) -> bool:
        if slot.process is None:
            return False
        try:
            slot.process.signalProcess(name)
        except (ProcessExitedAlready, OSError):
            return False
        return True

    # -- signals

    def reload_tls(self, trigger: str = "reload_tls()") -> bool:
        """
        Pass SIGHUP on to every ready worker: each loads its certificate
        and key files again (C{twistd}'s SIGHUP handler calls this).  A
        worker still starting gets it once it is ready (it may have loaded
        the files already, and until then it has no handler); one waiting
        for its restart loads the files when it starts.

        @return: C{True} (each worker logs its own result).
        """
        sent: list[int] = []
        held: list[int] = []
        for slot in self.slots:
            if slot.process is None:
                continue
            if not slot.ready:
                slot.reload_pending = True
                held.append(slot.index)
            elif self._signal(slot, "HUP"):
                sent.append(slot.index)
        _log.info(
            "{trigger} passed on to {count} workers{held_text}",
            trigger=trigger,
            count=len(sent),
            workers=sent,
            held=held,
            held_text=f"; held for worker {', '.join(map(str, held))} until ready" if held else "",
            event="workers_reload",
        )
        return True

    # -- stop

    def stopService(self) -> "Optional[Deferred[None]]":
        """
        Stop: close the shared sockets, SIGTERM every worker, and fire when
        all have exited (SIGKILL for those still running C{drain_timeout}
        + L{STOP_MARGIN} seconds later).  Under systemd, C{STOPPING=1}
        first.
        """
        if self.running:
            self.notifier.notify("STOPPING=1\nSTATUS=stopping")
        Service.stopService(self)
        self._stopping = True
        for slot in self.slots:
            for call in (slot.restart, slot.start_timer):
                if call is not None and call.active():
                    call.cancel()
            slot.restart = slot.start_timer = None
        self._close_sockets()
        running = [slot for slot in self.slots if slot.process is not None]
        if not running:
            return None
        _log.info(
            "stopping {count} workers",
            count=len(running),
            pids=[slot.pid for slot in running],
            event="workers_stopping",
        )
        self._stopped = Deferred()
        for slot in running:
            self._signal(slot, "TERM")
        self._stop_timers.append(
            self._clock.callLater(self.config.drain_timeout + STOP_MARGIN, self._kill_remaining)
        )
        return self._stopped

    def _close_sockets(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets = []
        for fd in self._systemd.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._systemd = {}

    def _kill_remaining(self) -> None:
        left = [slot for slot in self.slots if slot.process is not None]
        _log.warn(
            "{count} workers still running {timeout:g} s after SIGTERM: killing them",
            count=len(left),
            pids=[slot.pid for slot in left],
            timeout=self.config.drain_timeout + STOP_MARGIN,
            event="workers_killed",
        )
        for slot in left:
            self._signal(slot, "KILL")
        self._stop_timers.append(self._clock.callLater(KILL_WAIT, self._stopped_anyway))

    def _stopped_anyway(self) -> None:
        left = [slot.pid for slot in self.slots if slot.process is not None]
        _log.error(
            "workers {pids} did not exit after SIGKILL; stopping without them",
            pids=left,
            event="workers_lost",
        )
        self._fire_stopped()

    def _check_stopped(self) -> None:
        if self._stopped is not None and all(slot.process is None for slot in self.slots):
            _log.info("all workers stopped", event="workers_stopped")
            self._fire_stopped()

    def _fire_stopped(self) -> None:
        for call in self._stop_timers:
            if call.active():
                call.cancel()
        self._stop_timers = []
        stopped, self._stopped = self._stopped, None
        if stopped is not None:
            stopped.callback(None)


def exit_with(status: int) -> None:
    """
    Make this process exit with C{status} once everything else is done
    (twistd and twist have no way to set their exit status): at
    interpreter exit, after flushing standard output and error.  Nothing
    for 0.
    """
    if status == 0:
        return

    def leave() -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(status)

    atexit.register(leave)


# ---------------------------------------------------------------------------
# The worker


@implementer(IReadDescriptor)
class _Lifeline:
    """
    Watches the read end of the supervisor's pipe (standard input): it
    reaches end of file only when the supervisor is gone.
    """

    def __init__(self, fd: int, lost: Callable[[], None]) -> None:
        self._fd = fd
        self._lost = lost
        self._ended = False

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "supervisor"

    def doRead(self) -> Optional[BaseException]:
        try:
            data = os.read(self._fd, 4096)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if not data:
            self._ended = True
            return ConnectionDone()  # what the reactor expects: an exception
        return None

    def connectionLost(self, reason: Failure) -> None:
        # Also called (with ConnectionLost) when the worker's own reactor
        # shuts down: only the end of the pipe (ConnectionDone, from
        # doRead or from the poller's hang-up) means the supervisor is gone.
        if self._ended or reason.check(ConnectionDone):
            self._lost()


def _port_address(port: Any) -> str:
    host = port.getHost()
    return _address((getattr(host, "host", str(host)), getattr(host, "port", "?")))


def run_worker(
    index: int,
    fds: Sequence[int],
    settings: Mapping[str, Any],
    reactor: Any,
    control_fd: Optional[int] = None,
    orphaned: Optional[Callable[[], None]] = None,
) -> int:
    """
    Run one worker's relay until it is stopped: the relay of C{settings}
    on the inherited listening sockets C{fds}, SIGTERM and SIGINT stop it
    gracefully, SIGHUP reloads its certificates, end of file on standard
    input (the supervisor is gone) stops it too.  Once every port is
    bound it logs L{READY_EVENT} and writes L{ready_line} to
    C{control_fd}.

    @param orphaned: called when the supervisor is gone, before that is
        logged (L{_LineWriter.orphaned}: the log no longer goes through it).
    @return: the exit status: 0 after a stop, 1 if it could not start.
    """
    from . import tap
    from .service import makeRelayService

    try:
        config = RelayConfig(**settings)
        service = makeRelayService(config, reactor, adopt=fds)
    except (ConfigError, TypeError, ValueError, OSError) as e:
        _log.critical(
            "worker {worker} cannot start: {error}", worker=index, error=str(e), event="worker_start_failed"
        )
        return 1
    status = [0]

    def stop() -> None:
        try:
            reactor.stop()
        except ReactorNotRunning:
            pass

    def ready(results: list[Any]) -> None:
        listening = [_port_address(port) for port in results[0]]
        metrics = _port_address(results[1]) if results[1] is not None else None
        _log.info(
            "worker {worker} ready, pid {pid}: listening on {where}{metrics_text}",
            worker=index,
            pid=os.getpid(),
            where=", ".join(listening),
            listening=listening,
            metrics=metrics,
            metrics_text=f"; metrics on {metrics}" if metrics else "",
            event=READY_EVENT,
        )
        if control_fd is not None:
            _write_all(control_fd, ready_line(os.getpid(), listening, metrics))

    def supervisor_lost() -> None:
        if orphaned is not None:
            orphaned()
        _log.warn("the supervisor is gone: stopping", worker=index, event="supervisor_lost")
        stop()

    def start() -> None:
        try:
            service.privilegedStartService()
            service.startService()
        except Exception as e:
            _log.critical(
                "worker {worker} cannot start: {error}",
                worker=index,
                error=str(e),
                event="worker_start_failed",
            )
            status[0] = 1
            stop()
            return
        reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
        tap.stop_on_sigterm(reactor)
        tap.reload_tls_on_sighup(reactor, service)
        try:
            os.set_blocking(0, False)
            reactor.addReader(_Lifeline(0, supervisor_lost))
        except OSError:
            pass  # no standard input to watch
        ports = service.ports()
        metrics_service = getattr(service, "metrics_service", None)
        waits = [
            ports if ports is not None else succeed([]),
            metrics_service.port() if metrics_service is not None else succeed(None),
        ]
        gatherResults(waits).addCallback(ready).addErrback(
            lambda f: _log.failure("worker readiness failed", f, event="worker_ready_failed")
        )

    from .memory import freeze_start_up_objects

    reactor.callWhenRunning(start)
    reactor.callWhenRunning(freeze_start_up_objects)
    reactor.run()
    return status[0]


def _parse_arguments(argv: Sequence[str]) -> tuple[int, list[int]]:
    """
    C{--worker K --fds A,B,...} -> (K, [A, B, ...]).

    @raise ValueError: anything else.
    """
    args = list(argv)
    if len(args) != 4 or args[0] != "--worker" or args[2] != "--fds":
        raise ValueError(f"usage: --worker K --fds FD[,FD...], not {args!r}")
    return int(args[1]), [int(fd) for fd in args[3].split(",")]


def _worker_logging(index: int, log: Mapping[str, Any]) -> tuple[ILogObserver, Optional[Callable[[], None]]]:
    """
    L{worker_observer}, and what to call when the supervisor is gone
    (L{_LineWriter.orphaned}; C{None} in L{LOG_EVENTS} mode, where
    nothing but the supervisor can write the log).
    """
    if log["mode"] == LOG_LINES:
        log_format, time_format = log["format"], log.get("time_format")

        def dropped(count: int) -> Optional[bytes]:
            return worker_log_line(_dropped_event(count), index, log_format, time_format)

        writer = _LineWriter(log["pipe"], log.get("direct"), wait=WRITE_WAIT, dropped=dropped, path=log.get("path"))
        return worker_line_observer(index, log_format, time_format, writer), writer.orphaned
    from .logs import jsonLineObserver

    pipe = open(log["pipe"], "w", encoding="utf-8", errors="backslashreplace", closefd=False)
    return jsonLineObserver(pipe), None


def worker_observer(index: int, log: Mapping[str, Any]) -> ILogObserver:
    """
    The log observer of worker C{index} for the C{log} part of its
    L{worker_message}: L{worker_line_observer} writing through a
    L{_LineWriter} (L{LOG_LINES}), or JSON events on the log pipe
    (L{LOG_EVENTS}).
    """
    return _worker_logging(index, log)[0]


def _version_changed(index: int, version: object) -> None:
    """
    Log (critical) that worker C{index} runs another version than its
    supervisor's C{version}.
    """
    _log.critical(
        "worker {worker} runs poststack-relay {installed}, its supervisor {version}: "
        "installed version changed: restart the service",
        worker=index,
        installed=__version__,
        version=str(version),
        event="worker_version_mismatch",
    )


def worker_main(argv: Optional[Sequence[str]] = None) -> NoReturn:
    """
    The entry point of a worker process (see L{worker_command}): reads
    its L{worker_message} as one JSON line on standard input, logs as it
    says (L{worker_observer}), runs L{run_worker} and exits with its
    status.  A message of another C{poststack_relay} version (the
    installed one changed since the supervisor started) is logged
    (C{worker_version_mismatch}, critical) and ends it with
    L{VERSION_CHANGED_EXIT}; a message it cannot read at all, with 2.
    """
    # Until its handler is installed a SIGHUP must not kill the worker
    # (the command ignores it already: _WORKER_CODE).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        index, fds = _parse_arguments(sys.argv[1:] if argv is None else argv)
        message = json.loads(sys.stdin.buffer.readline(MAX_LINE))
    except ValueError as e:
        sys.stderr.write(f"poststack-relay worker: {e}\n")
        sys.exit(2)
    version = message.get("version") if isinstance(message, dict) else None
    try:
        settings, control_fd, log = _read_message(message)
    except ValueError as e:
        if version != __version__:
            sys.stderr.write(
                f"poststack-relay worker: installed version {__version__}, the supervisor's {version}: "
                "installed version changed: restart the service\n"
            )
            sys.exit(VERSION_CHANGED_EXIT)
        sys.stderr.write(f"poststack-relay worker: {e}\n")
        sys.exit(2)
    try:
        sys.stdout.reconfigure(encoding="utf-8", errors="backslashreplace")  # type: ignore[union-attr]
    except (AttributeError, ValueError):
        pass
    from .memory import return_large_blocks

    return_large_blocks()  # as a single relay does (poststack_relay.tap)
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner

    observer, orphaned = _worker_logging(index, log)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    if version != __version__:
        _version_changed(index, version)
        sys.exit(VERSION_CHANGED_EXIT)
    code = run_worker(index, fds, settings, reactor, control_fd, orphaned)
    sys.stdout.flush()
    sys.exit(code)


__all__ = [
    "LogOutput",
    "Supervisor",
    "VERSION_CHANGED_EXIT",
    "WorkerSlot",
    "bind_listener",
    "describe_exit",
    "exit_with",
    "parse_control_line",
    "parse_worker_line",
    "ready_line",
    "run_worker",
    "supervisor_log_output",
    "worker_command",
    "worker_environment",
    "worker_line_observer",
    "worker_log_event",
    "worker_log_line",
    "worker_main",
    "worker_message",
    "worker_metrics_listen",
    "worker_observer",
    "worker_output_event",
    "worker_settings",
]
