# -*- test-case-name: tests.test_logs -*-
"""
The relay's log formats: C{--log-format text} (twistd's own lines, for
people) and C{--log-format json} (one flat JSON object per line, for log
shippers).  The event vocabulary is in C{docs/logging.md}.

A JSON line looks like::

    {"time": "2025-06-01T12:00:00.123Z", "level": "info",
     "namespace": "poststack_relay.delivery", "event": "smtp_transaction",
     "message": "s1c relayed client=203.0.113.9 ...", "session": "s1c", ...}

(on one line).  C{time}, C{level}, C{namespace}, C{event} and C{message}
are always present (C{event} is C{null} for events that have none, such as
Twisted's own); every other field of the event follows under its own name;
an event with a failure has a C{traceback}.

twistd builds its log observer after the plugin's C{makeService}, and uses
the application's L{ILogObserver} component when it has one: so in JSON
mode C{makeService} returns a L{JSONLogService}, which sets that component
when twistd adds it to the application (honouring twistd's C{--logfile}
and C{--nodaemon}).  Under C{twist} the observer factory is set on C{twist}'s
own options instead (L{use_json_logs}).
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from datetime import datetime, timezone
from typing import IO, Any, Callable, Mapping, MutableMapping, Optional, cast

from twisted.application.service import IService, IServiceCollection, MultiService
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import ILogObserver, LogEvent, LogLevel, eventAsText, formatEvent, formatTime, timeFormatRFC3339
from twisted.python.components import Componentized
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile
from zope.interface import provider

# The fields every JSON line starts with, in this order.
TOP_FIELDS = ("time", "level", "namespace", "event", "message")

# Field names the JSON line uses itself: an event field of the same name is
# written as "field_<name>".
_RESERVED = frozenset(TOP_FIELDS + ("traceback",))

# Keys twisted.python.log adds to its (legacy) events; their information
# is already in the top fields.
_LEGACY_KEYS = frozenset(("message", "time", "isError", "format", "failure", "why", "system"))

# How deep nested containers are converted before str() takes over.
_MAX_DEPTH = 6

# Twisted's default text file name of a daemon without --logfile.
TWISTD_DEFAULT_LOGFILE = "twistd.log"


def _text(value: str) -> str:
    """
    C{value}, with lone surrogates (undecodable input smuggled through
    C{surrogateescape}) written as backslash escapes, so the line is
    valid UTF-8.
    """
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode("utf-8")


def _str(value: object) -> str:
    """
    C{str(value)}, or C{repr}, or a placeholder: never raises.
    """
    for convert in (str, repr):
        try:
            return _text(convert(value))
        except Exception:
            pass
    try:
        name = type(value).__name__
    except Exception:
        name = "object"
    return f"<unprintable {name}>"


def json_safe(value: object, depth: int = 0) -> Any:
    """
    C{value} as something C{json.dumps} accepts, with C{allow_nan=False}:
    C{None}, booleans, integers and finite floats as they are; text with
    lone surrogates escaped; C{bytes} decoded as UTF-8 with backslash
    escapes; mappings (with text keys) and sequences converted item by
    item (to a bounded depth); anything else (NaN, infinities, objects)
    as its C{str()}.  Never raises.
    """
    try:
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            return float(value) if math.isfinite(value) else _str(value)
        if isinstance(value, str):
            return _text(str(value))
        if isinstance(value, (bytes, bytearray, memoryview)):
            return bytes(value).decode("utf-8", "backslashreplace")
        if depth < _MAX_DEPTH:
            if isinstance(value, Mapping):
                return {_str(k): json_safe(v, depth + 1) for k, v in value.items()}
            if isinstance(value, (list, tuple, set, frozenset)):
                return [json_safe(v, depth + 1) for v in value]
    except Exception:
        pass
    return _str(value)


def _timestamp(event: LogEvent) -> str:
    """
    The event's time, ISO 8601 in UTC with milliseconds:
    C{2025-06-01T12:00:00.123Z}.
    """
    when = event.get("log_time")
    if not isinstance(when, (int, float)) or not math.isfinite(when):
        when = time.time()
    stamp = datetime.fromtimestamp(when, timezone.utc)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


def _level(event: LogEvent) -> str:
    level = event.get("log_level")
    name = getattr(level, "name", None)
    return name if isinstance(name, str) else "info"


def event_as_json(event: LogEvent) -> dict[str, Any]:
    """
    The flat, JSON-safe mapping of one log event: L{TOP_FIELDS} first, then
    the event's own fields (not the C{log_*} ones; a field named like a top
    field or C{traceback} as C{field_<name>}), then C{traceback} if the
    event carries a failure.  Never raises on odd values.
    """
    # Events from twisted.python.log, or seen by a legacy observer first
    # (which adds its keys to the event), have "isError".
    legacy = "isError" in event
    failure = event.get("log_failure")
    if failure is None and legacy and isinstance(event.get("failure"), Failure):
        # twisted.python.log.err: its text would repeat the traceback.
        failure = event["failure"]
        message = _str(event.get("why") or "Unhandled Error")
    else:
        message = _str(formatEvent(event))
    fields: dict[str, Any] = {
        "time": _timestamp(event),
        "level": _level(event),
        "namespace": json_safe(event.get("log_namespace")),
        "event": json_safe(event.get("event")),
        "message": message,
    }
    for key, value in list(event.items()):
        name = _str(key)
        if name.startswith("log_") or name == "event":
            continue
        if legacy and name in _LEGACY_KEYS:
            if name == "system" and value not in (None, "-"):
                fields["system"] = json_safe(value)
            continue
        if name in _RESERVED:
            name = "field_" + name
        fields[name] = json_safe(value)
    if failure is not None:
        try:
            fields["traceback"] = _text(failure.getTraceback())
        except Exception:
            fields["traceback"] = _str(failure)
    return fields


def event_as_json_line(event: LogEvent) -> str:
    """
    One log event as one line of JSON (L{event_as_json}), with a trailing
    newline and no other: no RFC 7464 record separator, so C{jq} and log
    shippers read the stream line by line.
    """
    return json.dumps(event_as_json(event), ensure_ascii=False, allow_nan=False) + "\n"


def fallback_line(event: LogEvent, error: BaseException, **extra: Any) -> str:
    """
    The line written when an event cannot be written as it is: its time
    (C{null} if even that cannot be written) and level, what went wrong,
    and C{extra} fields (a worker's number).
    """
    try:
        when: Optional[str] = _timestamp(event)
    except (OverflowError, OSError, ValueError):
        when = None
    fields = {
        "time": when,
        "level": "error",
        "namespace": __name__,
        "event": "log_unwritable",
        "message": "a log event could not be written as JSON: " + _str(error),
        **extra,
    }
    return json.dumps(fields, ensure_ascii=True, default=repr) + "\n"


# Namespaces whose debug and info events the relay's observers leave out:
# the Redis client's reconnection attempts ("Scheduling retry ...", every
# few seconds per connection while Redis is down).  The relay logs the
# change of state itself, once each way (fleet_state_down, fleet_state_up).
QUIET_NAMESPACES = frozenset({"twisted.application._client_service.ClientService"})
_QUIET_LEVELS = (LogLevel.debug, LogLevel.info)


def quiet(event: LogEvent) -> bool:
    """
    Is C{event} one the relay's observers leave out (L{QUIET_NAMESPACES})?
    """
    return event.get("log_namespace") in QUIET_NAMESPACES and event.get("log_level") in _QUIET_LEVELS


def jsonLineObserver(outFile: IO[Any]) -> ILogObserver:
    """
    An observer writing each event to C{outFile} as one line of JSON
    (L{event_as_json_line}), flushed at once.  It never raises: an event
    that cannot be converted is replaced by a C{log_unwritable} line, and a
    file that cannot take a line (full disk, closed pipe) loses it.

    @param outFile: a text file (such as C{sys.stdout}) or a
        L{twisted.python.logfile.LogFile}.
    @return: the observer; its C{outFile} and C{lock} attributes are the
        file and the lock it writes under (a C{--workers} supervisor hands
        its workers' finished lines to the same file, L{poststack_relay.workers}),
        and its C{line_format} is C{"json"}: the mark by which the
        supervisor knows it.
    """
    lock = threading.Lock()

    def write(line: str) -> None:
        with lock:
            outFile.write(line)
            outFile.flush()

    @provider(ILogObserver)
    def observe(event: LogEvent) -> None:
        if quiet(event):
            return
        try:
            line = event_as_json_line(event)
        except Exception as e:
            line = fallback_line(event, e)
        try:
            write(line)
        except UnicodeEncodeError:
            # A file whose encoding cannot take the text: ASCII JSON can.
            try:
                write(json.dumps(json.loads(line), ensure_ascii=True) + "\n")
            except Exception:
                pass
        except Exception:
            pass

    observe.outFile = outFile
    observe.lock = lock
    observe.line_format = "json"
    return cast(ILogObserver, observe)


class TimeStamps:
    """
    C{twisted.logger.formatTime} with a memory of one second: the text of
    a time is worked out once per second of the clock, not for every line
    (with the local offset, it was a third of what a line cost to log).
    The result is the same, since the format has no field finer than a
    second and UTC offsets change on whole seconds.
    """

    def __init__(self, timeFormat: Optional[str] = timeFormatRFC3339) -> None:
        self.timeFormat = timeFormat
        self._second: Optional[int] = None
        self._text = ""

    def __call__(self, when: Any) -> str:
        """C{formatTime(when, self.timeFormat)}."""
        if type(when) is not float or self.timeFormat is None or "%f" in self.timeFormat:
            return formatTime(when, self.timeFormat)
        second = int(when // 1)
        if second != self._second:
            self._text = formatTime(when, self.timeFormat)
            self._second = second
        return self._text


def classic_text(event: LogEvent, stamp: Callable[[Any], str]) -> Optional[str]:
    """
    C{twisted.logger.formatEventAsClassicLogText} with the time formatter
    C{stamp}: C{"{time} [{system}] {text}\\n"}, C{None} when the event has no
    text.  The relay's own lines carry their text ready made, as a format
    without replacement fields (docs/logging.md): those skip Twisted's
    formatter, which gives the same text for them.
    """
    text = event.get("log_format")
    if (
        type(text) is not str
        or "{" in text
        or "}" in text
        or "log_failure" in event
        or "log_flattened" in event
    ):
        text = eventAsText(event, includeTimestamp=False, includeSystem=False)
    if not text:
        return None
    system = event.get("log_system")
    if system is None:
        level = event.get("log_level")
        system = f"{event.get('log_namespace', '-')}#{'-' if level is None else level.name}"
    else:
        try:
            system = str(system)
        except Exception:
            system = "UNFORMATTABLE"
    line = f"{stamp(event.get('log_time'))} [{system}] {text}"
    if "\n" in line:
        line = line.replace("\n", "\n\t")
    return line + "\n"


def textLineObserver(outFile: IO[Any], timeFormat: Optional[str] = timeFormatRFC3339) -> ILogObserver:
    """
    An observer writing exactly the lines of twistd's own text observer
    (C{textFileLogObserver}: C{2025-06-01T12:00:00+0000 [namespace#info]
    text}), for less CPU: the time's text is kept for a second
    (L{TimeStamps}) and the relay's ready-made texts are not formatted
    again (L{classic_text}).  Each line is written and flushed at once;
    the observer never raises (an event Twisted cannot format gets
    Twisted's "Unable to format event" text; a file that cannot take a
    line loses it).

    @param outFile: a text file (such as C{sys.stdout}) or a
        L{twisted.python.logfile.LogFile}.
    @return: the observer; its C{outFile}, C{lock} and C{timeFormat}
        attributes are the file, the lock it writes under and the time
        format, and its C{line_format} is C{"text"} (see
        L{jsonLineObserver}).
    """
    lock = threading.Lock()
    stamp = TimeStamps(timeFormat)

    @provider(ILogObserver)
    def observe(event: LogEvent) -> None:
        if quiet(event):
            return
        try:
            line = classic_text(event, stamp)
            if line:
                with lock:
                    outFile.write(line)
                    outFile.flush()
        except Exception:
            pass

    observe.outFile = outFile
    observe.lock = lock
    observe.timeFormat = timeFormat
    observe.line_format = "text"
    return cast(ILogObserver, observe)


def _rotate_on_sigusr1(logFile: LogFile) -> None:
    """
    What twistd does for its own log file: SIGUSR1 rotates it, unless the
    signal already has a handler.
    """

    def rotate(signum: int, frame: Any) -> None:
        from twisted.internet import reactor

        cast(IReactorFromThreads, reactor).callFromThread(logFile.rotate)

    try:
        if not signal.getsignal(signal.SIGUSR1):
            signal.signal(signal.SIGUSR1, rotate)
    except (ValueError, OSError, AttributeError):
        pass  # not the main thread, or no SIGUSR1 here


def twistd_json_observer(twistd_options: Mapping[str, Any]) -> Optional[ILogObserver]:
    """
    L{twistd_observer} with L{jsonLineObserver}.
    """
    return twistd_observer(twistd_options, jsonLineObserver)


def twistd_observer(
    twistd_options: Mapping[str, Any], factory: Callable[[IO[Any]], ILogObserver]
) -> Optional[ILogObserver]:
    """
    The observer C{factory} makes for twistd's logging options, written
    where twistd would write its text: standard output for C{--logfile -} or
    C{--nodaemon} without C{--logfile}, else the C{--logfile} file
    (C{twistd.log} for a daemon without one), rotated on SIGUSR1 as
    twistd does.  C{None} when twistd was told to log elsewhere
    (C{--syslog} or C{--logger}): twistd's choice is kept.

    @param twistd_options: twistd's own options (C{ServerOptions}), the
        plugin options' C{parent}; an empty mapping means standard output.
    @raise SystemExit: C{--logfile -} without C{--nodaemon}, as twistd.
    """
    if twistd_options.get("syslog") or twistd_options.get("logger"):
        return None
    logfile = twistd_options.get("logfile") or ""
    nodaemon = bool(twistd_options.get("nodaemon", True))
    if logfile == "-":
        if not nodaemon:
            raise SystemExit("Daemons cannot log to stdout, exiting!")
        return factory(sys.stdout)
    if nodaemon and not logfile:
        return factory(sys.stdout)
    logFile = LogFile.fromFullPath(logfile or TWISTD_DEFAULT_LOGFILE)  # type: ignore[no-untyped-call]  # LogFile: unannotated in Twisted
    _rotate_on_sigusr1(logFile)
    return factory(logFile)


class LogObserverService(MultiService):
    """
    A service wrapping another (C{self.service}) that, when added to a
    twistd application, makes the application log through the relay's own
    observer (JSON, or twistd's text lines written for less CPU): twistd's
    C{AppLogger} uses an application's L{ILogObserver} component instead
    of its own text observer.  Starting and stopping are the wrapped
    service's.

    @ivar service: the wrapped service.
    @ivar observer: the observer it made and set, or C{None} (not yet, or
        the application logs elsewhere): the one observer the application
        logs through (a C{--workers} supervisor writes its workers' lines
        where it writes, L{poststack_relay.workers.Supervisor}).
    """

    def __init__(
        self, service: IService, observer_factory: Callable[[], Optional[ILogObserver]]
    ) -> None:
        """
        @param service: the service to run.
        @param observer_factory: makes the observer when the service joins
            an application that has none; C{None} from it leaves the
            application's logging alone.
        """
        super().__init__()  # type: ignore[no-untyped-call]  # MultiService: unannotated in Twisted
        self.service = service
        self.observer: Optional[ILogObserver] = None
        self._observer_factory = observer_factory
        service.setServiceParent(self)  # type: ignore[no-untyped-call]  # IService: unannotated in Twisted

    def setServiceParent(self, parent: IServiceCollection) -> None:
        """
        Set the JSON observer as C{parent}'s L{ILogObserver} component
        (when C{parent} is a componentized application without one), then
        join C{parent}.
        """
        # Twisted's Componentized and MultiService are not annotated.
        if isinstance(parent, Componentized) and parent.getComponent(ILogObserver, None) is None:  # type: ignore[no-untyped-call]
            observer = self._observer_factory()
            if observer is not None:
                parent.setComponent(ILogObserver, observer)  # type: ignore[no-untyped-call]  # Componentized: unannotated
                self.observer = observer
        super().setServiceParent(parent)  # type: ignore[no-untyped-call]  # MultiService: unannotated


JSONLogService = LogObserverService
"""The name L{LogObserverService} had when it only wrote JSON."""


def use_log_observer(
    service: IService,
    runner_options: Optional[MutableMapping[str, Any]],
    factory: Callable[[IO[Any]], ILogObserver],
) -> IService:
    """
    Make the runner that runs C{service} log through the observers
    C{factory} makes (L{textLineObserver} or L{jsonLineObserver}); returns
    the service to hand to it.

      - C{twist} (its options have C{fileLogObserverFactory}): that
        factory becomes C{factory}, so C{twist --log-file} still chooses
        the file; C{service} is returned as it is.
      - C{twistd}, or no runner options: a L{LogObserverService} around
        C{service} (see L{twistd_observer}).

    @param runner_options: the plugin options' C{parent}: C{twist}'s or
        C{twistd}'s own options, or C{None}.
    """
    if runner_options is not None and "fileLogObserverFactory" in runner_options:
        runner_options["fileLogObserverFactory"] = factory
        return service
    options: Mapping[str, Any] = runner_options if runner_options is not None else {}
    return LogObserverService(service, lambda: twistd_observer(options, factory))


def use_text_logs(service: IService, runner_options: Optional[MutableMapping[str, Any]]) -> IService:
    """L{use_log_observer} with L{textLineObserver}: twistd's own lines, for less CPU."""
    return use_log_observer(service, runner_options, textLineObserver)


def use_json_logs(service: IService, runner_options: Optional[MutableMapping[str, Any]]) -> IService:
    """L{use_log_observer} with L{jsonLineObserver}: one JSON object per line."""
    return use_log_observer(service, runner_options, jsonLineObserver)
