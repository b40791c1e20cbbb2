# -*- test-case-name: tests.test_workers -*-
"""
What passes between the C{--workers} supervisor and a worker: the start
message (standard input), the ready line (control pipe), the log lines.
"""

from __future__ import annotations

import json
from contextlib import suppress
from typing import Any, Mapping, Optional, Sequence, cast

import attrs
from twisted.logger import ILogObserver, LogEvent, LogLevel, eventFromJSON, formatEvent, jsonFileLogObserver
from zope.interface import provider

from .._version import __version__
from ..config import RelayConfig
from ..places import parse_metrics_listen
from ..logs import jsonLineObserver, textLineObserver

NAMESPACE = "poststack_relay.workers"  # of the supervisor's events, and the workers' own
# The exit status of a worker whose installed poststack_relay is not its
# supervisor's version (never change it: an old supervisor must know it).
VERSION_CHANGED_EXIT = 3


def host_port(host: str, port: int) -> str:
    """C{host:port}, or C{[host]:port} for an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def worker_metrics_listen(metrics_listen: str, index: int) -> str:
    """Where worker C{index} serves its metrics: the C{metrics-listen} port + C{index} (0 and C{off} stay)."""
    if metrics_listen.strip().lower() in ("", "off"):
        return metrics_listen
    host, port = parse_metrics_listen(metrics_listen)
    return host_port(host, port + index if port else 0)


def start_message(config: RelayConfig, index: int, fds: Sequence[int], control: int, log: Mapping[str, Any]) -> bytes:
    """
    Worker C{index}'s JSON line on standard input: C{version}, C{settings}
    (C{config} with C{workers = 1} and its metrics port; the service key is
    in them), its sockets C{fds}, its C{control} pipe and its C{log}.
    """
    settings = attrs.asdict(config, recurse=False)
    settings.update(listen=list(config.listen), workers=1,
                    metrics_listen=worker_metrics_listen(config.metrics_listen, index))
    message = {"version": __version__, "settings": settings, "fds": list(fds), "control": control, "log": dict(log)}
    return json.dumps(message).encode("ascii") + b"\n"


def ready_line(pid: int, listening: Sequence[str], metrics: Optional[str]) -> bytes:
    """The control line of a worker whose ports are all bound: C{ready} and a JSON object."""
    return b"ready " + json.dumps({"pid": pid, "listening": list(listening), "metrics": metrics}).encode("ascii") + b"\n"


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
    Worker C{index}'s observer on C{out}: the relay's C{json} or C{text}
    lines, or (C{events}) Twisted's JSON events for the supervisor to log
    again; each event with C{worker} (text: C{[namespace#level worker=K]}).
    """
    inner = (jsonLineObserver(out) if log_format == "json" else textLineObserver(out, time_format)
             if log_format == "text" else jsonFileLogObserver(out, recordSeparator=""))

    @provider(ILogObserver)
    def observe(event: LogEvent) -> None:
        event = {**event, "log_system": _system(event.get("log_namespace"), event.get("log_level"), index),
                 "worker": index}
        try:
            inner(event)
        except Exception:  # Twisted's JSON of a format it cannot fill: its text instead (the others never raise)
            with suppress(Exception):
                inner({**event, "log_format": formatEvent(event).replace("{", "{{").replace("}", "}}")})

    return cast(ILogObserver, observe)


def output_event(line: bytes, index: int, stream: str, now: float) -> LogEvent:
    """The event for a line of worker C{index} outside its log (C{stderr}: a crash) or not of its pipe."""
    level = LogLevel.warn if stream == "stderr" else LogLevel.info
    text = line.decode("utf-8", "backslashreplace").rstrip("\r")
    return {"log_format": "worker {worker} {stream}: {line}", "log_level": level, "log_namespace": NAMESPACE,
            "log_system": _system(NAMESPACE, level, index), "log_time": now, "worker": index, "stream": stream,
            "line": text, "event": "worker_output"}


def relogged_event(line: bytes, index: int, now: float) -> LogEvent:
    """The event worker C{index} wrote in C{events} mode (Twisted's JSON); any other line: L{output_event}."""
    try:
        event = eventFromJSON(line.decode("utf-8"))
        if isinstance(event, dict) and isinstance(event.get("log_format"), str):
            return {**event, "worker": index}
    except ValueError:
        pass
    return output_event(line, index, "stdout", now)
