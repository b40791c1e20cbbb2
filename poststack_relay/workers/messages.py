# -*- test-case-name: tests.test_workers -*-
"""
What passes between the C{--workers} supervisor and a worker: the start
message (standard input), the ready line (control pipe), the log lines.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Mapping, Optional, Sequence, cast

import attrs
from twisted.logger import ILogObserver, LogEvent, LogLevel
from zope.interface import provider

from .._version import __version__
from ..config import RelayConfig, parse_metrics_listen
from ..logs import jsonLineObserver, textLineObserver

NAMESPACE = "poststack_relay.workers"  # of the supervisor's events, and the workers' own
# The exit status of a worker whose installed poststack_relay is not its
# supervisor's version (never change it: an old supervisor must know it).
VERSION_CHANGED_EXIT = 3


def worker_metrics_listen(metrics_listen: str, index: int) -> str:
    """Where worker C{index} serves its metrics: the C{metrics-listen} port + C{index} (0 and C{off} stay)."""
    if metrics_listen.strip().lower() in ("", "off"):
        return metrics_listen
    host, port = parse_metrics_listen(metrics_listen)
    port += index if port else 0
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def start_message(
    config: RelayConfig, index: int, fds: Sequence[int], control: int, log: Mapping[str, Any]
) -> bytes:
    """
    The JSON line worker C{index} reads on its standard input: C{version};
    C{settings}, C{config} with C{workers = 1} and its metrics port (the
    service key is in them: they go on no command line, in no environment);
    its listening sockets C{fds}, its C{control} pipe and its C{log}
    (C{format}, C{time_format}, C{path}: the supervisor's log file or None).
    """
    settings = attrs.asdict(config, recurse=False)
    settings.update(listen=list(config.listen), workers=1,
                    metrics_listen=worker_metrics_listen(config.metrics_listen, index))
    message = {"version": __version__, "settings": settings, "fds": list(fds), "control": control, "log": dict(log)}
    return json.dumps(message, ensure_ascii=True).encode("ascii") + b"\n"


def ready_line(pid: int, listening: Sequence[str], metrics: Optional[str]) -> bytes:
    """The control line of a worker whose ports are all bound: C{ready} and a JSON object."""
    fields = {"pid": pid, "listening": list(listening), "metrics": metrics}
    return b"ready " + json.dumps(fields, ensure_ascii=True).encode("ascii") + b"\n"


def parse_ready(line: bytes) -> Optional[dict[str, Any]]:
    """The JSON object of a L{ready_line}; C{None} for any other line."""
    word, _, rest = line.strip().partition(b" ")
    try:
        fields = json.loads(rest) if rest.strip() else {}
    except ValueError:
        return None
    return fields if word == b"ready" and isinstance(fields, dict) else None


def _system(namespace: object, level: object, index: int) -> str:
    return f"{namespace or '-'}#{getattr(level, 'name', 'info')} worker={index}"


def worker_observer(index: int, log_format: str, time_format: Optional[str], out: Any) -> ILogObserver:
    """
    Worker C{index}'s observer: the relay's JSON or text one on C{out}, each
    event with C{worker} (text: C{[namespace#level worker=K]}).
    """
    inner = jsonLineObserver(out) if log_format == "json" else textLineObserver(out, time_format)

    @provider(ILogObserver)
    def observe(event: LogEvent) -> None:
        inner({**event, "log_system": _system(event.get("log_namespace"), event.get("log_level"), index),
               "worker": index})

    return cast(ILogObserver, observe)


def output_event(line: bytes, index: int, stream: str, now: float) -> LogEvent:
    """The event for a line of worker C{index} outside its log (C{stderr}: a crash) or not of its pipe."""
    level = LogLevel.warn if stream == "stderr" else LogLevel.info
    text = line.decode("utf-8", "backslashreplace").rstrip("\r")
    return {"log_format": "worker {worker} {stream}: {line}", "log_level": level, "log_namespace": NAMESPACE,
            "log_system": _system(NAMESPACE, level, index), "log_time": now, "worker": index, "stream": stream,
            "line": text, "event": "worker_output"}


def relogged_event(line: bytes, index: int, now: float) -> LogEvent:
    """
    The event that logs again a JSON line of worker C{index} (the supervisor
    logs to syslog, a C{--logger}, C{twist}): its namespace, level, time,
    message (and traceback) and fields.  Any other line: L{output_event}.
    """
    try:
        fields = json.loads(line)
        if not isinstance(fields, dict):
            raise ValueError(line)
    except ValueError:
        return output_event(line, index, "stdout", now)
    message, traceback = str(fields.pop("message", "")), fields.pop("traceback", None)
    try:
        level = LogLevel.levelWithName(str(fields.pop("level", "info")))
    except Exception:
        level = LogLevel.info
    namespace = str(fields.pop("namespace", None) or NAMESPACE)
    try:
        when = datetime.fromisoformat(str(fields.pop("time", None))).timestamp()
    except ValueError:
        when = now
    event: LogEvent = {k: v for k, v in fields.items() if not str(k).startswith("log_")}
    event.update(log_format="{log_text}", log_text=f"{message}\n{traceback}" if traceback else message,
                 log_level=level, log_namespace=namespace, log_system=_system(namespace, level, index),
                 log_time=when, worker=index)
    return event
