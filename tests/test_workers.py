# -*- test-case-name: tests.test_workers -*-
"""
C{--workers N} (L{poststack_relay.workers}): the setting; the start
message, ready line and log lines between supervisor and worker; the
supervisor (Twisted's ProcessMonitor) on a fake reactor: shared sockets and
descriptors, restart back-off, C{READY=1} and C{STATUS=}, SIGHUP held until
ready, degraded service, installed-version changes, the stop; a worker's
fair accepts; the worker's command as a real process; the adopted-socket
hook of L{poststack_relay.service.makeRelayService}; and C{twistd -n
poststack-relay --workers 2} as real processes against the sandbox: mail
through the shared port, per-worker metrics, a killed worker restarted,
SIGHUP, SIGTERM, a SIGKILLed supervisor (the lifeline), systemd socket
activation, a bad certificate, workers that cannot start, C{--logfile}
with rotation and the C{--logger} fallback.
"""

from __future__ import annotations

import glob
import io
import json
import os
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from typing import Any, Callable, Optional

import attrs
from twisted.application.service import Application, Service
from twisted.internet.error import CannotListenError, ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, MemoryReactorClock
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    formatEventAsClassicLogText,
    globalLogPublisher,
    textFileLogObserver,
)
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import provider

import poststack_relay
from poststack_relay import tap
from poststack_relay.config import ConfigError, RelayConfig
from poststack_relay.logs import LogObserverService, event_as_json, jsonLineObserver, textLineObserver
from poststack_relay.service import makeRelayService
from poststack_relay.testing import MemoryEmailAPI, write_certificate
from poststack_relay.workers import VERSION_CHANGED_EXIT, Supervisor, exit_with
from poststack_relay.workers.messages import (
    output_event,
    parse_ready,
    ready_line,
    relogged_event,
    start_message,
    worker_metrics_listen,
    worker_observer,
)
from poststack_relay.workers.supervisor import describe_exit, worker_command, worker_environment, worker_log
from poststack_relay.workers.worker import accept_fairly
from tests.common.processes import DATA, ROOT, TWISTD, free_port, stop_process, wait_for_port
from tests.common.systemd import LAUNCHER, notify_receiver, pending_datagrams


def bound_port(fd: int) -> int:
    """The port the listening socket C{fd} is bound to."""
    with socket.socket(fileno=os.dup(fd)) as sock:
        return int(sock.getsockname()[1])


def parse(argv: list[str], environ: Optional[dict[str, str]] = None) -> tap.Options:
    options = tap.Options(environ=environ or {})
    options.parseOptions(argv)
    return options


# ---------------------------------------------------------------------------
# The setting


class SettingTests(SynchronousTestCase):
    def test_default_is_one(self) -> None:
        """Without the option there is one worker: the relay runs in the command's process."""
        self.assertEqual(parse(["--tls-cert", "c.pem"]).config.workers, 1)
        self.assertEqual(RelayConfig(tls_cert="c.pem").workers, 1)

    def test_sources(self) -> None:
        """--workers, POSTSTACK_RELAY_WORKERS and workers = N in the file all set it, the command line first."""
        self.assertEqual(parse(["--tls-cert", "c", "--workers", "4"]).config.workers, 4)
        options = parse(["--tls-cert", "c"], {"POSTSTACK_RELAY_WORKERS": "3"})
        self.assertEqual((options.config.workers, options.sources["workers"]), (3, "environment"))
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("workers = 2\n")
        options = parse(["--tls-cert", "c", "--config", path])
        self.assertEqual((options.config.workers, options.sources["workers"]), (2, "file"))
        options = parse(["--tls-cert", "c", "--config", path, "--workers", "5"], {"POSTSTACK_RELAY_WORKERS": "3"})
        self.assertEqual(options.config.workers, 5)

    def test_bad_values(self) -> None:
        """0, negative, too many and non-numbers are one-line errors naming the setting."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('workers = "2"\n')
        for argv, env, expected in [
            (["--workers", "0"], {}, "workers must be between 1 and 256, not 0"),
            (["--workers", "-2"], {}, "workers must be between 1 and 256, not -2"),
            (["--workers", "257"], {}, "workers must be between 1 and 256, not 257"),
            (["--workers", "abc"], {}, "--workers: not a valid int: 'abc'"),
            ([], {"POSTSTACK_RELAY_WORKERS": "two"}, "POSTSTACK_RELAY_WORKERS: not a valid int: 'two'"),
            (["--config", path], {}, "workers must be an integer, not '2'"),
        ]:
            with self.assertRaises(SystemExit) as ctx:
                parse(["--tls-cert", "c", *argv], env)
            message = str(ctx.exception.code)
            self.assertTrue(message.startswith("poststack-relay: error: "), message)
            self.assertIn(expected, message)
            self.assertNotIn("\n", message)

    def test_metrics_ports_must_fit(self) -> None:
        """Worker K serves metrics on the port + K: the last port must exist; port 0 and off are fine."""
        with self.assertRaises(ConfigError) as ctx:
            RelayConfig(tls_cert="c", workers=3, metrics_listen="127.0.0.1:65534")
        self.assertEqual(
            str(ctx.exception),
            "workers 3 need metrics ports 65534 to 65536, past 65535: lower the metrics-listen port",
        )
        RelayConfig(tls_cert="c", workers=2, metrics_listen="127.0.0.1:65534")
        RelayConfig(tls_cert="c", workers=256, metrics_listen="127.0.0.1:0")
        RelayConfig(tls_cert="c", workers=256, metrics_listen="off")

    def test_check_config_shows_it(self) -> None:
        """--check-config's settings list workers with its source."""
        options = parse(["--tls-cert", "c", "--workers", "4"])
        self.assertIn("workers = 4  # command line", tap.describe_settings(options.config, options.sources))
        options = parse(["--tls-cert", "c"])
        self.assertIn("workers = 1  # default", tap.describe_settings(options.config, options.sources))


# ---------------------------------------------------------------------------
# Between supervisor and worker


class MessageTests(SynchronousTestCase):
    def test_metrics_listen(self) -> None:
        """Worker K's metrics address is the configured one with the port + K; port 0 and off stay."""
        self.assertEqual(worker_metrics_listen("127.0.0.1:9587", 0), "127.0.0.1:9587")
        self.assertEqual(worker_metrics_listen("127.0.0.1:9587", 2), "127.0.0.1:9589")
        self.assertEqual(worker_metrics_listen("localhost:9587", 1), "127.0.0.1:9588")
        self.assertEqual(worker_metrics_listen("[::1]:9000", 3), "[::1]:9003")
        self.assertEqual(worker_metrics_listen("10.0.0.1:0", 5), "10.0.0.1:0")
        self.assertEqual(worker_metrics_listen("off", 1), "off")

    def test_start_message(self) -> None:
        """One JSON line: the version, the settings (workers 1, its metrics port) that rebuild the config, the descriptors and the log."""
        config = RelayConfig(
            tls_cert="/etc/c.pem", tls_key=None, port=2587, interface="127.0.0.1", service_key="sk_live_secret",
            hostname="smtp.example.com", idle_timeout=0.1, api_deadline=1e-3, derive_idempotency_keys=False,
            listen=("465", "127.0.0.1:2465,proxy-protocol,tls-cert=/x y.pem"), metrics_listen="127.0.0.1:9587",
            log_format="json", workers=4,
        )
        log = {"format": "text", "time_format": "%Y", "path": "/var/log/r.log"}
        line = start_message(config, 2, [3, 4, 5], 6, log)
        self.assertEqual(line.count(b"\n"), 1)
        self.assertTrue(line.endswith(b"\n"))
        message = json.loads(line)
        self.assertEqual(RelayConfig(**message["settings"]), attrs.evolve(config, workers=1, metrics_listen="127.0.0.1:9589"))
        self.assertEqual((message["version"], message["fds"], message["control"], message["log"]),
                         (poststack_relay.__version__, [3, 4, 5], 6, log))

    def test_ready_line(self) -> None:
        """The ready line is a word and a JSON object; anything else is not one."""
        line = ready_line(42, ["127.0.0.1:465"], "127.0.0.1:9587")
        self.assertTrue(line.endswith(b"\n"))
        self.assertEqual(parse_ready(line.rstrip(b"\n")),
                         {"pid": 42, "listening": ["127.0.0.1:465"], "metrics": "127.0.0.1:9587"})
        self.assertEqual(parse_ready(b"ready"), {})
        for bad in (b"", b"ready [1]", b"ready {", b'\xff {"a": 1}', b'{"event": "worker_ready"}', b"readyx {}"):
            self.assertIsNone(parse_ready(bad), bad)

    def test_environment(self) -> None:
        """Workers inherit the environment without systemd's variables and without any POSTSTACK_RELAY_* one (the service key)."""
        environ = {
            "PATH": "/bin", "NOTIFY_SOCKET": "/run/n", "LISTEN_FDS": "1", "LISTEN_PID": "7",
            "LISTEN_FDNAMES": "smtps", "WATCHDOG_USEC": "1", "POSTSTACK_RELAY_PORT": "25",
            "POSTSTACK_RELAY_SERVICE_KEY": "sk_live_secret", "PYTHONPATH": "/src",
        }
        self.assertEqual(worker_environment(environ), {"PATH": "/bin", "PYTHONPATH": "/src"})

    def test_command(self) -> None:
        """A worker is this Python in safe-path mode (-P) running the worker's main with its number; SIGHUP is ignored before any import."""
        args = worker_command(3)
        self.assertEqual(args[:3], [sys.executable, "-P", "-c"])
        self.assertTrue(args[3].startswith("import signal; signal.signal(signal.SIGHUP, signal.SIG_IGN); "), args[3])
        self.assertIn("from poststack_relay.workers.worker import main; main()", args[3])
        self.assertEqual(args[4:], ["--worker", "3"])

    def test_describe_exit(self) -> None:
        """An exit is told as its status or its signal."""
        self.assertEqual(describe_exit(Failure(ProcessDone(0))), ("exit status 0", 0, None))
        self.assertEqual(describe_exit(Failure(ProcessTerminated(exitCode=1))), ("exit status 1", 1, None))
        self.assertEqual(describe_exit(Failure(ProcessTerminated(signal=9))), ("signal 9 (SIGKILL)", None, 9))


class WorkerLogTests(SynchronousTestCase):
    """
    A worker's line is the supervisor's own line for the event plus the
    worker's number; when the supervisor logs elsewhere, a worker's JSON
    line is logged again as the same event.
    """

    def event(self, **extra: Any) -> dict[str, Any]:
        """A transaction event as the worker logs it."""
        return {
            "log_format": "s1 relayed {who} {{braces}} é", "log_level": LogLevel.warn,
            "log_namespace": "poststack_relay.delivery", "log_time": 1748779200.123, "log_system": "-",
            "who": "x@example.com", "event": "smtp_transaction", "size": 67, **extra,
        }

    def line(self, log_format: str, index: int, event: dict[str, Any], time_format: Optional[str] = None) -> bytes:
        """What worker C{index}'s observer writes for C{event}."""
        out = io.StringIO()
        worker_observer(index, log_format, time_format, out)(event)
        return out.getvalue().encode("utf-8")

    def test_json(self) -> None:
        """JSON: the relay's JSON line of the event plus "worker", last."""
        event = self.event()
        line = self.line("json", 2, event)
        self.assertEqual(line.count(b"\n"), 1)
        self.assertEqual(json.loads(line), {**event_as_json(event), "worker": 2})
        self.assertEqual(list(json.loads(line))[-1], "worker")

    def test_text(self) -> None:
        """Text: twistd's line in the supervisor's time format, the worker in the brackets."""
        line = self.line("text", 0, self.event(), "%Y!")
        self.assertEqual(line, b"2025! [poststack_relay.delivery#warn worker=0] s1 relayed x@example.com {braces} \xc3\xa9\n")
        self.assertEqual(self.line("text", 0, {"log_format": "", "log_time": 0.0}), b"")

    def test_traceback(self) -> None:
        """A failure: JSON has it as "traceback", text indents it under the message, as a single relay does."""
        try:
            1 / 0
        except ZeroDivisionError:
            failure = Failure()
        fields = json.loads(self.line("json", 1, self.event(log_failure=failure)))
        self.assertIn("ZeroDivisionError", fields["traceback"])
        self.assertEqual((fields["message"], fields["worker"]), ("s1 relayed x@example.com {braces} é", 1))
        text = self.line("text", 1, self.event(log_failure=failure)).decode()
        self.assertIn("worker=1] s1 relayed x@example.com {braces} é\n\tTraceback", text)
        self.assertEqual(text.count("\n"), text.count("\n\t") + 1)  # one line for a line reader

    def test_odd_events(self) -> None:
        """Odd values, lone surrogates and a broken format never raise and stay one line."""
        odd = self.event(who="\udcff", nan=float("nan"), obj=object(), log_format="{missing} {who}")
        for log_format in ("json", "text", "events"):
            line = self.line(log_format, 3, odd)
            self.assertEqual(line.count(b"\n"), 1, line)
        self.assertEqual(json.loads(self.line("json", 3, odd))["worker"], 3)

    def test_relogged(self) -> None:
        """A worker's event (events mode: Twisted's JSON, one line), logged again, is the same event with the worker in its system; the relay's JSON line of it is the worker's own."""
        event = self.event()
        line = self.line("events", 1, event)
        self.assertEqual(line.count(b"\n"), 1)
        again = relogged_event(line.rstrip(b"\n"), 1, now=0.0)
        self.assertEqual(formatEvent(again), "s1 relayed x@example.com {braces} é")
        self.assertEqual((again["log_level"], again["log_namespace"], again["worker"], again["size"]),
                         (LogLevel.warn, "poststack_relay.delivery", 1, 67))
        self.assertEqual(again["log_time"], 1748779200.123)
        self.assertEqual(event_as_json(again), json.loads(self.line("json", 1, event)))
        text = formatEventAsClassicLogText(again)
        assert text is not None
        self.assertIn(" [poststack_relay.delivery#warn worker=1] s1 relayed x@example.com {braces} é\n", text)

    def test_relogged_traceback(self) -> None:
        """A worker's failure comes back with its traceback, as a single relay logs it."""
        try:
            1 / 0
        except ZeroDivisionError:
            failure = Failure()
        line = self.line("events", 0, self.event(log_failure=failure)).rstrip(b"\n")
        fields = event_as_json(relogged_event(line, 0, now=0.0))
        self.assertEqual(fields["message"], "s1 relayed x@example.com {braces} é")
        self.assertIn("ZeroDivisionError", fields["traceback"])

    def test_not_json(self) -> None:
        """A line that is no event is logged as worker_output; standard error as a warning."""
        for line in (b"Traceback (most recent call last):", b"[1, 2]", b'{"event": "x"}', b"\xff"):
            event = relogged_event(line, 2, now=5.0)
            self.assertEqual((event["event"], event["stream"], event["log_level"]), ("worker_output", "stdout", LogLevel.info))
        event = output_event(b"Traceback {x}\xff", 2, "stderr", now=5.0)
        self.assertEqual(formatEvent(event), "worker 2 stderr: Traceback {x}\\xff")
        self.assertEqual((event["log_level"], event["worker"], event["event"]), (LogLevel.warn, 2, "worker_output"))


@provider(ILogObserver)
def _some_observer(event: dict[str, Any]) -> None:
    """An observer the supervisor does not know."""


class WorkerLogTargetTests(SynchronousTestCase):
    """How workers log, from the observer the supervisor logs through."""

    def test_descriptor(self) -> None:
        """The relay's text or JSON observer on a descriptor (standard output): workers write there themselves."""
        path = self.mktemp()
        with open(path, "w") as out:
            for observer, log_format, time_format in (
                (textLineObserver(out), "text", "%Y-%m-%dT%H:%M:%S%z"),
                (textLineObserver(out, timeFormat="%H"), "text", "%H"),
                (jsonLineObserver(out), "json", None),
            ):
                log = {"mode": "direct", "format": log_format, "time_format": time_format, "path": None}
                self.assertEqual(worker_log(observer), (log, out.fileno()))

    def test_log_file(self) -> None:
        """A rotating log file: lines come through the supervisor's pipe."""
        log = LogFile.fromFullPath(self.mktemp(), rotateLength=30)
        self.addCleanup(log.close)
        for observer, log_format in ((textLineObserver(log), "text"), (jsonLineObserver(log), "json")):
            settings, out = worker_log(observer)
            self.assertEqual((settings["mode"], settings["format"], settings["path"], out),
                             ("through", log_format, log.path, "r"))

    def test_elsewhere(self) -> None:
        """Syslog, a --logger, twist's filter, twistd's own observer, none, or no descriptor: Twisted's JSON events, logged again."""
        out = io.StringIO()
        events = {"mode": "events", "format": "events", "time_format": None, "path": None}
        with open(self.mktemp(), "w") as real:
            for observer in (
                _some_observer,
                FilteringLogObserver(textLineObserver(real), [LogLevelFilterPredicate()]),
                textFileLogObserver(real),  # not the relay's: no mark
                None,
                textLineObserver(out),  # no descriptor
            ):
                self.assertEqual(worker_log(observer), (events, "r"), observer)


# ---------------------------------------------------------------------------
# The supervisor, on a fake reactor


class FakeProcess:
    """What C{spawnProcess} returns: records what is written and signalled."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.written: list[bytes] = []
        self.signals: list[str] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class FakeReactor(Clock):
    """A clock that spawns no process."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[dict[str, Any]] = []
        self.fail = False

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], env: dict[str, str],
                     childFDs: dict[int, Any]) -> FakeProcess:
        if self.fail:
            raise OSError("fork failed")
        process = FakeProcess(1000 + len(self.spawned))
        self.spawned.append(dict(protocol=protocol, executable=executable, args=args, env=env, childFDs=childFDs,
                               process=process))
        protocol.makeConnection(process)
        return process

    def of(self, worker: int) -> list[dict[str, Any]]:
        """The spawns of one worker, oldest first."""
        return [c for c in self.spawned if c["args"][-1] == str(worker)]

    def last(self, worker: int) -> dict[str, Any]:
        return self.of(worker)[-1]


class FakeNotifier:
    def __init__(self) -> None:
        self.sent: list[str] = []

    def notify(self, state: str) -> bool:
        self.sent.append(state)
        return True


class SupervisorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = FakeReactor()
        self.notifier = FakeNotifier()
        self.stops: list[bool] = []
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def supervisor(self, count: int = 2, observer: Any = None, **kw: Any) -> Supervisor:
        config = RelayConfig(tls_cert="c.pem", port=0, interface="127.0.0.1", hostname="localhost",
                             metrics_listen="127.0.0.1:9587", workers=count, **kw)
        supervisor = Supervisor(
            config, self.reactor, notifier=self.notifier, stop=lambda: self.stops.append(True), observer=observer,
            environ={"PATH": "/bin", "NOTIFY_SOCKET": "/run/n", "POSTSTACK_RELAY_SERVICE_KEY": "sk_live_secret"},
        )
        self.addCleanup(supervisor._close_sockets)
        return supervisor

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == name]

    def message(self, worker: int) -> dict[str, Any]:
        """What worker C{worker}'s current process read on its standard input."""
        [line] = self.reactor.last(worker)["process"].written
        value: dict[str, Any] = json.loads(line)
        return value

    def say(self, worker: int, data: bytes, fd: Any = 1) -> None:
        """Worker C{worker}'s current process writes C{data} on C{fd} (a number or "control")."""
        if fd == "control":
            fd = self.message(worker)["control"]
        self.reactor.last(worker)["protocol"].childDataReceived(fd, data)

    def ready(self, worker: int, metrics: str = "127.0.0.1:9587") -> None:
        """Worker C{worker}'s current process says it is ready on its control pipe."""
        self.say(worker, ready_line(2000 + worker, ["127.0.0.1:465"], metrics), "control")

    def ready_event(self) -> bytes:
        """The JSON line of a worker_ready log event, as a worker logs it."""
        return json.dumps({"time": "2025-06-01T12:00:00.000Z", "level": "info", "namespace": "poststack_relay.workers",
                           "event": "worker_ready", "message": "ready", "metrics": "x"}).encode() + b"\n"

    def worker_event(self, worker: int, **event: Any) -> bytes:
        """An event as worker C{worker} writes it in events mode."""
        out = io.StringIO()
        worker_observer(worker, "events", None, out)({"log_time": 1748779200.25, **event})
        return out.getvalue().encode()

    def end(self, worker: int, reason: Any = None) -> None:
        self.reactor.last(worker)["protocol"].processEnded(Failure(reason or ProcessTerminated(signal=9)))

    def test_start(self) -> None:
        """Each worker gets the shared socket as fd 3, its control pipe as 4, the environment without NOTIFY_SOCKET or the service key, and its message on stdin."""
        supervisor = self.supervisor()
        supervisor.privilegedStartService()
        port = bound_port(supervisor.sockets[0])
        self.assertEqual(self.reactor.spawned, [])  # binding only: twistd drops privileges next
        supervisor.startService()
        self.assertEqual(len(self.reactor.spawned), 2)
        for index, call in enumerate(self.reactor.spawned):
            self.assertEqual(call["childFDs"], {0: "w", 1: "r", 2: "r", 3: supervisor.sockets[0], 4: "r"})
            self.assertEqual(call["env"], {"PATH": "/bin"})
            self.assertEqual((call["executable"], call["args"]), (sys.executable, worker_command(index)))
            message = self.message(index)
            self.assertEqual((message["settings"]["workers"], message["settings"]["metrics_listen"]),
                             (1, f"127.0.0.1:{9587 + index}"))
            self.assertEqual((message["version"], message["fds"], message["control"]), (poststack_relay.__version__, [3], 4))
            # No log of the relay's to write to: Twisted's JSON events, logged again.
            self.assertEqual(message["log"], {"mode": "events", "format": "events", "time_format": None, "path": None})
        self.assertEqual([(e["worker"], e["pid"]) for e in self.named("worker_started")], [(0, 1000), (1, 1001)])
        self.assertEqual(self.named("worker_started")[0]["log_namespace"], "poststack_relay.workers")
        # The socket listens already: a connection waits in its backlog.
        socket.create_connection(("127.0.0.1", port), timeout=5).close()

    def test_bind_failure(self) -> None:
        """A port in use fails the start with CannotListenError and starts no worker."""
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        supervisor = self.supervisor()
        supervisor.listener_configs = (attrs.evolve(supervisor.listener_configs[0], port=taken.getsockname()[1]),)
        self.assertRaises(CannotListenError, supervisor.privilegedStartService)
        self.assertEqual(self.reactor.spawned, [])

    def test_ready_once_all_are(self) -> None:
        """READY=1 goes to systemd once, when the last worker is ready, not again after a restart: then only STATUS= changes."""
        supervisor = self.supervisor()
        supervisor.startService()
        self.ready(0)
        self.end(1, ProcessTerminated(exitCode=1))  # before READY=1: no STATUS= either
        self.reactor.advance(1)
        self.assertEqual(self.notifier.sent, [])
        self.ready(1, "127.0.0.1:9588")
        where = supervisor.addresses[0]
        self.assertEqual(self.notifier.sent, [f"READY=1\nSTATUS=2 workers listening on {where}"])
        self.assertEqual(self.named("workers_ready")[0]["metrics"], ["127.0.0.1:9587", "127.0.0.1:9588"])
        self.end(0)
        self.reactor.advance(1)
        self.ready(0)
        self.assertEqual(self.notifier.sent[1:], [
            f"STATUS=1 of 2 workers listening on {where}; worker 0 restarting",
            f"STATUS=2 workers listening on {where}",
        ])
        self.assertEqual(self.named("worker_output"), [])  # a control line is not a log event

    def test_restart_backoff(self) -> None:
        """A worker that dies within 10 s of its start restarts after 1 s, doubling up to 30 s; one that ran longer restarts at once, and the pause starts again at 1 s."""
        supervisor = self.supervisor()
        supervisor.startService()
        self.ready(0)
        self.ready(1)
        waits = []
        for _ in range(7):
            self.reactor.advance(2)
            self.end(0)
            spawned = len(self.reactor.of(0))
            wait = self.named("worker_exited")[-1]["restart_in"]
            self.reactor.advance(wait - 0.01)
            self.assertEqual(len(self.reactor.of(0)), spawned, "restarted too early")
            self.reactor.advance(0.01)
            self.assertEqual(len(self.reactor.of(0)), spawned + 1)
            self.ready(0)
            waits.append(wait)
        self.assertEqual(waits, [1, 2, 4, 8, 16, 30, 30])
        self.reactor.advance(10)
        self.end(0)
        self.assertEqual(self.named("worker_exited")[-1]["restart_in"], 0)
        self.reactor.advance(0)
        self.ready(0)
        self.end(0)
        self.assertEqual(self.named("worker_exited")[-1]["restart_in"], 1)
        exited = self.named("worker_exited")[0]
        self.assertEqual((exited["worker"], exited["pid"], exited["status"], exited["signal"], exited["ready"]),
                         (0, 1000, "signal 9 (SIGKILL)", 9, True))
        self.assertEqual(self.reactor.of(1)[1:], [])  # the other worker was left alone
        self.assertEqual(self.stops, [])

    def test_never_ready_stops_the_relay(self) -> None:
        """A worker that dies before it is ready 3 times in a row stops the relay with exit status 1."""
        supervisor = self.supervisor()
        supervisor.startService()
        self.ready(1)
        for attempt in range(2):
            self.end(0, ProcessTerminated(exitCode=1))
            self.assertEqual(self.stops, [])
            self.reactor.advance(self.named("worker_exited")[-1]["restart_in"])
        self.assertEqual(len(self.reactor.of(0)), 3)
        self.end(0, ProcessTerminated(exitCode=1))
        self.assertEqual(self.stops, [True])
        self.assertEqual(supervisor.exit_status, 1)
        [failed] = self.named("workers_failed")
        self.assertEqual((failed["worker"], failed["failures"], failed["status"], failed["log_level"]),
                         (0, 3, "exit status 1", LogLevel.critical))
        self.reactor.advance(60)
        self.assertEqual(len(self.reactor.of(0)), 3)  # no respawn loop

    def test_both_never_ready(self) -> None:
        """Workers that all keep dying before they are ready stop the relay once."""
        supervisor = self.supervisor()
        supervisor.startService()
        for _ in range(3):
            self.end(0, ProcessTerminated(exitCode=1))
            self.end(1, ProcessTerminated(exitCode=1))
            self.reactor.advance(30)
        self.assertEqual((self.stops, supervisor.exit_status, len(self.named("workers_failed"))), ([True], 1, 2))

    def test_ready_resets_the_count(self) -> None:
        """Failures before ready count only in a row: a worker that got ready once starts counting again."""
        supervisor = self.supervisor()
        supervisor.startService()
        for _ in range(3):
            for _ in range(2):
                self.end(0, ProcessTerminated(exitCode=1))
                self.reactor.advance(self.named("worker_exited")[-1]["restart_in"])
            self.ready(0)
            self.reactor.advance(60)
        self.assertEqual((self.stops, supervisor.exit_status), ([], 0))

    def test_spawn_failure(self) -> None:
        """A worker that cannot even be spawned counts as a failed start and is tried again."""
        self.reactor.fail = True
        supervisor = self.supervisor(count=2)
        supervisor.startService()
        self.assertEqual(len(self.named("worker_spawn_failed")), 2)
        self.assertEqual([(e["restart_in"], e["ready"]) for e in self.named("worker_exited")], [(1, False), (1, False)])
        self.reactor.fail = False
        self.reactor.advance(1)
        self.assertEqual(len(self.reactor.spawned), 2)

    def test_stop(self) -> None:
        """Stopping: STOPPING=1, the sockets closed, SIGTERM to each worker, no restart, done when all exited."""
        supervisor = self.supervisor()
        supervisor.startService()
        port = bound_port(supervisor.sockets[0])
        self.ready(0)
        self.ready(1)
        self.end(1)  # its restart is pending
        d = supervisor.stopService()
        assert d is not None
        self.assertEqual(self.notifier.sent[-1], "STOPPING=1\nSTATUS=stopping")
        self.assertEqual(self.reactor.last(0)["process"].signals, ["TERM"])
        self.assertRaises(ConnectionRefusedError, socket.create_connection, ("127.0.0.1", port), 5)
        self.reactor.advance(10)
        self.assertEqual(len(self.reactor.of(1)), 1)  # the pending restart was cancelled
        self.assertNoResult(d)
        self.end(0, ProcessDone(0))
        self.successResultOf(d)
        self.assertEqual(self.named("worker_stopped")[0]["status"], "exit status 0")
        self.assertEqual([e["worker"] for e in self.named("worker_exited")], [1])  # not a second exit for worker 0
        self.assertEqual(len(self.named("workers_stopped")), 1)

    def test_stop_kills_late_workers(self) -> None:
        """A worker still running drain_timeout + 10 s after SIGTERM gets SIGKILL; the stop ends when it has exited."""
        supervisor = self.supervisor(drain_timeout=5.0)
        supervisor.startService()
        d = supervisor.stopService()
        assert d is not None
        self.reactor.advance(14.9)
        self.assertEqual(self.reactor.last(0)["process"].signals, ["TERM"])
        self.reactor.advance(0.1)
        self.assertEqual(self.reactor.last(0)["process"].signals, ["TERM", "KILL"])
        self.end(0)
        self.assertNoResult(d)
        self.end(1)
        self.successResultOf(d)
        self.assertEqual([e["status"] for e in self.named("worker_stopped")], ["signal 9 (SIGKILL)"] * 2)

    def test_stop_without_workers(self) -> None:
        """A stop with every worker waiting for its restart is immediate."""
        supervisor = self.supervisor(count=2)
        supervisor.startService()
        self.end(0)
        self.end(1)
        self.assertIsNone(supervisor.stopService())
        self.reactor.advance(60)
        self.assertEqual(len(self.reactor.spawned), 2)

    def test_sighup_passed_on(self) -> None:
        """reload_tls (what SIGHUP calls) sends SIGHUP to every running worker, also one still starting (it ignores it until it loaded the files); one waiting for its restart gets none."""
        supervisor = self.supervisor(count=3)
        supervisor.startService()
        self.ready(0)
        self.end(2)
        self.assertTrue(supervisor.reload_tls("SIGHUP"))
        self.assertEqual([self.reactor.last(i)["process"].signals for i in range(3)], [["HUP"], ["HUP"], []])
        [reload] = self.named("workers_reload")
        self.assertEqual((reload["workers"], reload["trigger"]), ([0, 1], "SIGHUP"))
        self.assertEqual(formatEvent(reload), "SIGHUP passed on to 2 workers")
        self.reactor.advance(1)
        self.ready(2)
        self.assertEqual(self.reactor.last(2)["process"].signals, [])  # its new process loaded the files itself

    def test_events_logged_again(self) -> None:
        """Logging elsewhere: the events on a worker's stdout are logged again with its number, across chunks; anything else as worker_output."""
        supervisor = self.supervisor()
        supervisor.startService()
        line = self.worker_event(1, log_format="API timed out {{x}}", log_level=LogLevel.error,
                                 log_namespace="poststack_relay.api", event="api_timeout", attempt=2).decode()
        self.say(1, line[:10].encode())
        self.assertEqual(self.named("api_timeout"), [])
        self.say(1, line[10:].encode() + b"\nnot json\n")
        self.say(0, b"Traceback (most recent call last):\n  File", fd=2)
        self.end(0)  # the unterminated line comes out too
        [event] = self.named("api_timeout")
        self.assertEqual((formatEvent(event), event["attempt"], event["worker"], event["log_level"]),
                         ("API timed out {x}", 2, 1, LogLevel.error))
        self.assertEqual([formatEvent(e) for e in self.named("worker_output")],
                         ["worker 1 stdout: not json", "worker 0 stderr: Traceback (most recent call last):",
                          "worker 0 stderr:   File"])

    def test_ready_only_on_the_control_pipe(self) -> None:
        """A worker_ready log event (or its text) on stdout or stderr is logged, never taken as ready; a bad control line is reported."""
        supervisor = self.supervisor(count=1)
        supervisor.startService()
        self.say(0, self.worker_event(0, log_format="ready", event="worker_ready", metrics="x"))
        self.say(0, b"ready {}\n", 2)
        self.say(0, b'{"event": "worker_ready"}\n', "control")
        self.reactor.advance(1)
        self.assertEqual((self.notifier.sent, supervisor.ready), ([], set()))
        self.assertEqual([e["event"] for e in self.events if e.get("event") in ("worker_ready", "worker_output")],
                         ["worker_ready", "worker_output", "worker_output"])
        self.assertEqual(self.named("worker_output")[-1]["stream"], "control")
        self.ready(0)
        self.assertEqual(len(self.notifier.sent), 1)
        self.assertEqual(supervisor.metrics, ["127.0.0.1:9587"])

    def test_ready_from_a_replaced_process(self) -> None:
        """A ready line read after its process ended does not make the worker's next process ready."""
        supervisor = self.supervisor(count=1)
        supervisor.startService()
        old = self.reactor.last(0)["protocol"]
        control = self.message(0)["control"]
        self.end(0)
        self.reactor.advance(1)
        old.childDataReceived(control, ready_line(1, [], None))
        self.assertEqual((self.notifier.sent, supervisor.ready), ([], set()))

    def log_files(self, log: LogFile) -> list[bytes]:
        """The lines of a rotating log file, oldest first; each file ends with a whole line."""
        lines = []
        for name in [f"{log.path}.{i}" for i in sorted(log.listLogs(), reverse=True)] + [log.path]:
            with open(name, "rb") as f:
                content = f.read()
            self.assertTrue(content.endswith(b"\n") or not content, name)
            lines += content.splitlines()
        return lines

    def test_lines_passed_through(self) -> None:
        """Logging to a file: a worker's stdout is its finished lines, written through in whole-line chunks, never parsed; stderr is still told."""
        log = LogFile.fromFullPath(self.mktemp(), rotateLength=None)
        self.addCleanup(log.close)
        supervisor = self.supervisor(observer=textLineObserver(log, timeFormat="%H"))
        supervisor.startService()
        self.assertEqual(self.reactor.last(0)["childFDs"], {0: "w", 1: "r", 2: "r", 3: supervisor.sockets[0], 4: "r"})
        self.assertEqual(self.message(0)["log"], {"mode": "through", "format": "text", "time_format": "%H", "path": log.path})
        self.say(0, b"12 [x#info worker=0] one\n12 [x#info worker=0] tw")
        self.assertEqual(self.log_files(log), [b"12 [x#info worker=0] one"])
        self.say(0, b"o\n" + self.ready_event())
        self.say(1, b"12 [x#info worker=1] par")
        self.say(0, b"oops\n", 2)
        self.assertEqual(self.log_files(log), [b"12 [x#info worker=0] one", b"12 [x#info worker=0] two",
                                               self.ready_event().rstrip(b"\n")])
        self.assertEqual(self.notifier.sent, [])  # the READY event's text did not count
        self.end(1)  # a worker that died mid-line: its partial line ends the chunk
        self.assertEqual(self.log_files(log)[-1], b"12 [x#info worker=1] par")
        self.assertEqual([e["line"] for e in self.named("worker_output")], ["oops"])

    def test_rotation_between_lines(self) -> None:
        """Lines written through land whole under the observer's lock; the file's rotation falls between them."""
        log = LogFile.fromFullPath(self.mktemp(), rotateLength=30)
        self.addCleanup(log.close)
        observer = jsonLineObserver(log)
        self.supervisor(observer=observer).startService()
        for n in range(10):
            self.say(0, b"".join(b"line %d.%d\n" % (n, k) for k in range(3)))
        self.assertGreater(len(log.listLogs()), 3)
        self.assertEqual(self.log_files(log), [b"line %d.%d" % (n, k) for n in range(10) for k in range(3)])
        done = threading.Event()
        with observer.lock:  # type: ignore[attr-defined]
            writer = threading.Thread(target=lambda: (self.say(0, b"x\n"), done.set()), daemon=True)
            writer.start()
            self.assertFalse(done.wait(0.2))
        self.assertTrue(done.wait(10))

    def test_direct(self) -> None:
        """Logging to a descriptor: it is each worker's standard output; the supervisor reads nothing of their logs."""
        with open(self.mktemp(), "w") as out:
            supervisor = self.supervisor(observer=jsonLineObserver(out))
            supervisor.startService()
            for index in (0, 1):
                self.assertEqual(self.reactor.last(index)["childFDs"],
                                 {0: "w", 1: out.fileno(), 2: "r", 3: supervisor.sockets[0], 4: "r"})
                self.assertEqual(self.message(index)["log"],
                                 {"mode": "direct", "format": "json", "time_format": None, "path": None})

    def test_finds_its_log(self) -> None:
        """Without a log output, the supervisor takes the observer its LogObserverService parent made, once, and says what it chose."""
        config = RelayConfig(tls_cert="c.pem", port=0, interface="127.0.0.1", hostname="localhost", workers=2)
        log = LogFile.fromFullPath(self.mktemp(), rotateLength=None)
        self.addCleanup(log.close)
        supervisor = Supervisor(config, self.reactor, notifier=self.notifier, environ={}, stop=lambda: None)
        self.addCleanup(supervisor._close_sockets)
        wrapper = LogObserverService(supervisor, lambda: jsonLineObserver(log))
        wrapper.setServiceParent(Application("relay"))  # what twistd does: it sets the application's observer
        supervisor.startService()
        self.assertEqual(self.message(0)["log"], {"mode": "through", "format": "json", "time_format": None, "path": log.path})
        self.assertEqual([(e["mode"], e["line_format"]) for e in self.named("workers_logging")], [("through", "json")])
        self.end(0)
        self.reactor.advance(1)
        self.assertEqual(len(self.named("workers_logging")), 1)

    def test_logs_elsewhere(self) -> None:
        """Without such a parent (twist, embedding) or when it made no observer (--syslog, --logger), the workers' events are logged again."""
        config = RelayConfig(tls_cert="c.pem", port=0, interface="127.0.0.1", hostname="localhost", workers=2)
        for parent in (None, LogObserverService(Service(), lambda: None)):
            self.events.clear()
            supervisor = Supervisor(config, self.reactor, notifier=self.notifier, environ={}, stop=lambda: None)
            self.addCleanup(supervisor._close_sockets)
            if parent is not None:
                supervisor.setServiceParent(parent)
                parent.setServiceParent(Application("relay"))
            supervisor.startService()
            self.assertEqual(self.reactor.spawned[-1]["childFDs"][1], "r")
            self.assertEqual([(e["mode"], e["line_format"]) for e in self.named("workers_logging")], [("events", "json")])

    def test_degraded_after_ready(self) -> None:
        """After READY=1, a worker that keeps failing to start leaves the others serving: workers_degraded once, retried with the back-off up to 30 s, STATUS= says so until it is ready again."""
        supervisor = self.supervisor()
        supervisor.startService()
        self.ready(0)
        self.ready(1)
        where = supervisor.addresses[0]
        self.reactor.advance(100)
        self.end(0)  # a crash of a ready worker
        for _ in range(7):
            self.reactor.advance(self.named("worker_exited")[-1]["restart_in"])
            self.end(0, ProcessTerminated(exitCode=1))  # then it cannot start again
        self.assertEqual((self.stops, supervisor.exit_status), ([], 0))
        self.assertEqual(self.reactor.last(1)["process"].signals, [])  # the healthy worker is left alone
        [degraded] = self.named("workers_degraded")
        self.assertEqual((degraded["worker"], degraded["failures"], degraded["status"], degraded["log_level"]),
                         (0, 3, "exit status 1", LogLevel.critical))
        self.assertEqual([e["restart_in"] for e in self.named("worker_exited")], [0, 1, 2, 4, 8, 16, 30, 30])
        self.assertEqual(self.notifier.sent[-1],
                         f"STATUS=degraded: 1 of 2 workers listening on {where}; worker 0 cannot start (exit status 1)")
        self.assertEqual(self.named("workers_failed"), [])
        spawned = len(self.reactor.of(0))
        self.reactor.advance(30)
        self.assertEqual(len(self.reactor.of(0)), spawned + 1)  # still tried
        self.ready(0)
        self.assertEqual(self.notifier.sent[-1], f"STATUS=2 workers listening on {where}")
        [recovered] = self.named("worker_recovered")
        self.assertEqual((recovered["worker"], recovered["failures"]), (0, 7))

    def test_version_changed(self) -> None:
        """A worker that finds another installed version (exit status 3, its reason on its standard error) is a failed start like any other: 3 in a row before READY=1 stop the relay."""
        supervisor = self.supervisor()
        supervisor.startService()
        self.ready(0)
        for _ in range(3):
            self.say(1, b"poststack-relay worker 1: installed version changed: restart the service\n", 2)
            self.end(1, ProcessTerminated(exitCode=VERSION_CHANGED_EXIT))
            self.reactor.advance(self.named("worker_exited")[-1]["restart_in"] if self.named("worker_exited") else 0)
        self.assertEqual((self.stops, supervisor.exit_status), ([True], 1))
        self.assertEqual(self.named("workers_failed")[0]["exit_status"], VERSION_CHANGED_EXIT)
        self.assertEqual([e["log_level"] for e in self.named("worker_output")], [LogLevel.warn] * 3)
        self.assertIn("installed version changed: restart the service", self.named("worker_output")[0]["line"])

    def test_exit_with(self) -> None:
        """exit_with(0) changes nothing; another status is the process's at its exit (a real process)."""
        exit_with(0)
        code = "from poststack_relay.workers import exit_with; exit_with(3); print('done')"
        result = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=ROOT),
                                capture_output=True, timeout=60)
        self.assertEqual((result.returncode, result.stdout), (3, b"done\n"))


# ---------------------------------------------------------------------------
# A worker's accepts


class FakePort:
    """A tcp.Port's accept loop: it takes up to numberAccepts, then adapts numberAccepts as Twisted's does."""

    def __init__(self) -> None:
        self.numberAccepts = 100
        self.loops: list[int] = []

    def doRead(self) -> None:
        self.loops.append(self.numberAccepts)
        self.numberAccepts += 20  # it took all it could: Twisted tries 20 more next time


class AcceptTests(SynchronousTestCase):
    def test_one_per_wakeup(self) -> None:
        """A worker's port accepts one connection per wake-up, whatever Twisted's port learnt, so a burst is left for the other workers too."""
        port = FakePort()
        accept_fairly(port)
        for _ in range(3):
            port.doRead()
        self.assertEqual(port.loops, [1, 1, 1])
        accept_fairly(object())  # not a tcp.Port: left alone

    def test_real_port(self) -> None:
        """On a real Twisted port (numberAccepts is what its accept loop reads)."""
        from twisted.internet import tcp
        from twisted.internet.protocol import Factory

        port = tcp.Port(0, Factory(), interface="127.0.0.1", reactor=MemoryReactor())
        port.startListening()
        self.addCleanup(port.socket.close)
        self.assertEqual(port.numberAccepts, 100)
        seen: list[int] = []
        port.doRead = lambda: seen.append(port.numberAccepts)  # type: ignore[method-assign]
        accept_fairly(port)
        port.doRead()
        self.assertEqual(seen, [1])


# ---------------------------------------------------------------------------
# The relay's hook


class AdoptTests(SynchronousTestCase):
    def test_adopts_the_descriptors(self) -> None:
        """With adopt, each listener takes over its inherited socket instead of binding."""
        cert, key = write_certificate(self.mktemp())
        shared = socket.socket()
        self.addCleanup(shared.close)
        shared.bind(("127.0.0.1", 0))
        shared.listen(5)
        fd = os.dup(shared.fileno())
        reactor = MemoryReactorClock()
        config = RelayConfig(tls_cert=cert, tls_key=key, hostname="localhost", metrics_listen="off")
        service = makeRelayService(config, reactor, api=MemoryEmailAPI(), adopt=[fd])
        service.startService()
        self.assertEqual(reactor.tcpServers, [])
        [(adopted, family, _)] = reactor.adoptedPorts
        self.assertEqual((adopted, family), (fd, socket.AF_INET))
        self.assertTrue(IListeningPort.providedBy(self.successResultOf(service.port())))
        self.assertRaises(OSError, os.fstat, fd)  # handed over and closed

    def test_one_per_listener(self) -> None:
        """adopt must name one descriptor per listener."""
        cert, key = write_certificate(self.mktemp())
        config = RelayConfig(tls_cert=cert, tls_key=key, hostname="localhost", metrics_listen="off", listen=("2465",))
        self.assertRaises(ValueError, makeRelayService, config, MemoryReactor(), MemoryEmailAPI(), None, None, [5])


# ---------------------------------------------------------------------------
# Real processes


def alive(pid: int) -> bool:
    """Whether process C{pid} exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def fallback_observer() -> ILogObserver:
    """
    A C{twistd --logger} factory: text lines to standard output through an
    observer the supervisor does not know, so its workers' events are
    logged again one by one.
    """
    out = sys.stdout
    lock = threading.Lock()

    @provider(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        text = formatEventAsClassicLogText(event)
        if text:
            with lock:
                out.write(text)
                out.flush()

    return observe


def kill_stray_worker(pid: int) -> None:
    """SIGKILL process C{pid} if it is still one of our workers (a failed test's orphan)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = f.read()
    except OSError:
        return
    if alive(pid) and b"poststack_relay.workers.worker" in command:
        os.kill(pid, signal.SIGKILL)


class WorkerCommandTests(SynchronousTestCase):
    """The command that starts a worker, run as a real process without a supervisor."""

    def run_worker(self, cwd: str, pythonpath: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        args = worker_command(0)
        env = dict(os.environ, PYTHONPATH=pythonpath)
        return subprocess.run(args, cwd=cwd, env=env, input=stdin, capture_output=True, timeout=60)

    def fake_package(self, text: str) -> str:
        """A directory holding a poststack_relay package whose __init__ runs C{text}."""
        root = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(root, "poststack_relay"))
        with open(os.path.join(root, "poststack_relay", "__init__.py"), "w") as f:
            f.write(text)
        return root

    def test_sighup_ignored_before_any_import(self) -> None:
        """SIGHUP is already ignored when the worker imports its first module, so a SIGHUP during start-up cannot kill it."""
        fake = self.fake_package(
            "import signal, sys\n"
            "sys.stdout.write('ignored=%s' % (signal.getsignal(signal.SIGHUP) == signal.SIG_IGN))\n"
            "raise SystemExit(7)\n"
        )
        result = self.run_worker(fake, fake)
        self.assertEqual((result.returncode, result.stdout), (7, b"ignored=True"), result.stderr)

    def test_working_directory_not_on_path(self) -> None:
        """A module in the working directory does not shadow the worker's own (python -P)."""
        cwd = self.fake_package("import sys\nsys.stdout.write('shadowed')\nraise SystemExit(7)\n")
        result = self.run_worker(cwd, ROOT)
        self.assertNotIn(b"shadowed", result.stdout)
        self.assertEqual(result.returncode, 2, result.stderr)  # the real worker: no message on stdin
        self.assertIn(b"poststack-relay worker: ", result.stderr)

    def test_other_version(self) -> None:
        """A worker given another version's message says so on its standard error (the supervisor logs it) and exits with VERSION_CHANGED_EXIT; a message it cannot read, with 2."""
        message = {"version": "0.0.0+other", "settings": {}, "fds": [3], "control": 4, "log": {}}
        result = self.run_worker(self.mktemp_dir(), ROOT, json.dumps(message).encode() + b"\n")
        self.assertEqual(result.returncode, VERSION_CHANGED_EXIT, result.stderr)
        self.assertEqual(result.stderr.decode(), f"poststack-relay worker 0: installed version {poststack_relay.__version__}, "
                         "its supervisor's 0.0.0+other: installed version changed: restart the service\n")
        unreadable = {"version": poststack_relay.__version__, "settings": []}
        result = self.run_worker(self.mktemp_dir(), ROOT, json.dumps(unreadable).encode() + b"\n")
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertIn(b"poststack-relay worker: ", result.stderr)

    def mktemp_dir(self) -> str:
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        return path


class ProcessTestCase(SynchronousTestCase):
    """Starts C{twistd -n} processes with their output in files."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="poststack-workers-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.cert, self.key = write_certificate(self.dir)

    def start(self, name: str, args: list[str], env: Optional[dict[str, str]] = None) -> subprocess.Popen[bytes]:
        environ = dict(os.environ, PYTHONPATH=ROOT)
        environ.update(env or {})
        log = open(os.path.join(self.dir, name + ".log"), "wb")
        self.addCleanup(log.close)
        proc = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", *args], cwd=self.dir, env=environ, stdout=log, stderr=subprocess.STDOUT
        )
        self.addCleanup(stop_process, proc)
        return proc

    def relay_args(self, port: int, *extra: str) -> list[str]:
        return [
            "poststack-relay", "--workers", "2", "--port", str(port), "--interface", "127.0.0.1",
            "--tls-cert", self.cert, "--tls-key", self.key, "--hostname", "localhost",
            "--api-url", f"http://127.0.0.1:{getattr(self, 'api_port', free_port())}",
            "--drain-timeout", "5", *extra,
        ]

    def output(self, name: str) -> str:
        with open(os.path.join(self.dir, name + ".log"), "rb") as f:
            return f.read().decode("utf-8", "replace")

    def events(self, name: str = "relay") -> list[dict[str, Any]]:
        """The JSON lines of a relay's log (every line must be one)."""
        found = []
        for line in self.output(name).splitlines():
            value = json.loads(line)
            self.assertIsInstance(value, dict)
            found.append(value)
        return found

    def named(self, event: str, name: str = "relay") -> list[dict[str, Any]]:
        return [e for e in self.events(name) if e.get("event") == event]

    def wait_until(self, condition: Callable[[], Any], what: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = condition()
            if result:
                return result
            if proc.poll() is not None:
                self.fail(f"relay exited with {proc.returncode} waiting for {what}: {self.output('relay')[-3000:]}")
            time.sleep(0.05)
        self.fail(f"timed out waiting for {what}: {self.output('relay')[-3000:]}")


class WorkersProcessTests(ProcessTestCase):
    """
    C{twistd -n poststack-relay --workers 2 --log-format json} against the
    sandbox, with a NOTIFY_SOCKET of ours.
    """

    def setUp(self) -> None:
        super().setUp()
        self.api_port = free_port()
        sandbox = self.start(
            "sandbox", ["poststack-sandbox", "--port", str(self.api_port), "--db", "s.sqlite3", "--data", DATA]
        )
        wait_for_port(self.api_port, sandbox)

    def send(self, subject: str) -> tuple[int, bytes]:
        """One message over a new implicit-TLS session; the reply to the final dot."""
        with smtplib.SMTP_SSL(
            "localhost", self.port, context=ssl.create_default_context(cafile=self.cert), timeout=30
        ) as s:
            s.login("poststack", "sk_test_full_access")
            s.mail("you@yourdomain.com")
            s.rcpt("user@example.com")
            return s.data(f"From: you@yourdomain.com\r\nTo: user@example.com\r\nSubject: {subject}\r\n\r\nhi\r\n".encode())

    def send_many(self, prefix: str, count: int) -> None:
        """C{count} messages over parallel sessions, each answered 250."""
        replies: list[Any] = []

        def one(i: int) -> None:
            try:
                replies.append(self.send(f"{prefix}{i}"))
            except Exception as e:  # reported by the assertion below
                replies.append(e)

        threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        self.assertEqual(len(replies), count)
        for reply in replies:
            self.assertIsInstance(reply, tuple, reply)
            self.assertEqual(reply[0], 250, reply)

    def served(self) -> dict[int, int]:
        """Messages relayed per worker, from the smtp_transaction events."""
        counts: dict[int, int] = {}
        for e in self.named("smtp_transaction"):
            counts[e["worker"]] = counts.get(e["worker"], 0) + 1
        return counts

    def scrape(self, address: str) -> float:
        """A worker's count of messages answered 250, from its own /metrics."""
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
            text = response.read().decode()
        for line in text.splitlines():
            if line.startswith('poststack_relay_messages_total{code="250"}'):
                return float(line.split()[-1])
        return 0.0

    def ready_pid(self, worker: int, after: int = 0) -> int:
        """The pid of worker C{worker}'s latest ready process, once there is one beyond the first C{after}."""
        ready = [e for e in self.named("worker_ready") if e["worker"] == worker]
        return ready[-1]["pid"] if len(ready) > after else 0

    def test_shared_port(self) -> None:
        """Two workers serve the one port over real TLS, a killed or stopped worker is replaced while the port keeps serving, and SIGTERM stops everything with status 0."""
        notify = notify_receiver(self.dir)
        self.addCleanup(notify.close)
        self.port = free_port()
        relay = self.start(
            "relay", self.relay_args(self.port, "--log-format", "json", "--metrics-listen", "127.0.0.1:0"),
            {"NOTIFY_SOCKET": notify.getsockname()},
        )
        self.wait_until(lambda: self.named("workers_ready"), "both workers ready", relay)
        # Standard output: each worker writes its finished JSON lines there itself.
        self.assertEqual([(e["mode"], e["line_format"]) for e in self.named("workers_logging")], [("direct", "json")])
        started = {e["worker"]: e["pid"] for e in self.named("worker_started")}
        self.assertEqual(sorted(started), [0, 1])
        self.assertNotEqual(started[0], started[1])
        self.assertEqual([parent_of(pid) for pid in started.values()], [relay.pid, relay.pid])
        self.assertEqual({e["worker"]: e["pid"] for e in self.named("worker_ready")}, started)
        self.assertEqual(pending_datagrams(notify), [f"READY=1\nSTATUS=2 workers listening on 127.0.0.1:{self.port}".encode()])

        # Both workers take connections from the shared port.
        for batch in range(6):
            self.send_many(f"b{batch}-", 6)
            if len(self.served()) == 2:
                break
        served = self.served()
        self.assertEqual(sorted(served), [0, 1], served)
        metrics = {e["worker"]: e["metrics"] for e in self.named("worker_ready")}
        self.assertNotEqual(metrics[0], metrics[1])
        self.assertEqual({w: self.scrape(address) for w, address in metrics.items()},
                         {w: float(n) for w, n in served.items()})

        # SIGKILL: the port keeps serving through the other worker; the dead one is replaced.
        os.kill(started[0], signal.SIGKILL)
        exited = self.wait_until(lambda: self.named("worker_exited"), "worker 0's exit", relay)
        self.assertEqual((exited[0]["worker"], exited[0]["pid"], exited[0]["signal"]), (0, started[0], 9))
        self.assertEqual(exited[0]["restart_in"], 0 if exited[0]["uptime"] >= 10 else 1)  # Twisted's back-off
        code, text = self.send("while worker 0 is down")
        self.assertEqual(code, 250, text)
        new0 = self.wait_until(lambda: self.ready_pid(0, after=1), "worker 0's replacement", relay)
        self.assertNotIn(new0, started.values())
        self.assertFalse(alive(started[0]))

        # A worker stopped on its own (SIGTERM) closes only its hold on the shared socket.
        os.kill(started[1], signal.SIGTERM)
        self.wait_until(lambda: len(self.named("worker_exited")) == 2, "worker 1's exit", relay)
        self.assertEqual(self.named("worker_exited")[1]["exit_status"], 0)
        self.send_many("after-stop-", 3)
        new1 = self.wait_until(lambda: self.ready_pid(1, after=1), "worker 1's replacement", relay)
        self.send_many("end-", 4)
        statuses = pending_datagrams(notify)
        # READY=1 only once; the restarts are told in STATUS= alone.
        self.assertIn(f"STATUS=1 of 2 workers listening on 127.0.0.1:{self.port}; worker 0 restarting".encode(), statuses)
        self.assertTrue(all(m.startswith(b"STATUS=") for m in statuses), statuses)

        # SIGTERM to the supervisor: every worker stops, status 0, the port closes.
        began = time.monotonic()
        relay.send_signal(signal.SIGTERM)
        self.assertEqual(relay.wait(timeout=30), 0, self.output("relay")[-3000:])
        self.assertLess(time.monotonic() - began, 15)
        statuses += pending_datagrams(notify)
        self.assertEqual(statuses[-2:], [f"STATUS=2 workers listening on 127.0.0.1:{self.port}".encode(),
                                         b"STOPPING=1\nSTATUS=stopping"], "\n".join(json.dumps({k: e.get(k) for k in ("time", "event", "worker", "pid", "message")}) for e in self.events()))
        for pid in (new0, new1):
            self.assertFalse(alive(pid), pid)
        self.assertEqual(sorted(e["worker"] for e in self.named("worker_stopped")), [0, 1])
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", self.port), timeout=5).close()
        stored = urllib.request.urlopen(f"http://127.0.0.1:{self.api_port}/_sandbox/emails", timeout=10)
        self.assertEqual(len(json.load(stored)["data"]), sum(self.served().values()))


    def journal_file(self, name: str) -> list[dict[str, Any]]:
        """The JSON lines of one log file (every line must be one, the last one finished)."""
        with open(name, "rb") as f:
            content = f.read()
        self.assertTrue(content.endswith(b"\n") or not content, name)
        found = []
        for line in content.splitlines():
            value = json.loads(line)
            self.assertIsInstance(value, dict)
            found.append(value)
        return found

    def journal(self) -> tuple[list[str], list[dict[str, Any]]]:
        """The files of C{--logfile journal.log}, oldest first, and their JSON lines."""
        path = os.path.join(self.dir, "journal.log")
        rotated = sorted(glob.glob(path + ".*"), key=lambda name: -int(name.rsplit(".", 1)[1]))
        files = [*rotated, path]
        return files, [event for name in files for event in self.journal_file(name)]

    def test_logfile(self) -> None:
        """With --logfile, the workers' JSON lines land in the file with their number, through the supervisor; SIGUSR1 rotations while mail flows lose and split no line."""
        self.port = free_port()
        relay = self.start(
            "relay",
            ["--logfile", "journal.log", *self.relay_args(self.port, "--log-format", "json", "--metrics-listen", "off")],
        )

        def ready() -> bool:
            try:
                return any(e.get("event") == "workers_ready" for e in self.journal()[1])
            except (OSError, ValueError, self.failureException):
                return False  # not yet written, or caught mid-write

        self.wait_until(ready, "both workers ready", relay)
        replies: list[Any] = []
        done = threading.Event()

        def mail() -> None:
            for i in range(300):
                if done.is_set():
                    break
                try:
                    replies.append(self.send(f"rotated {i}"))
                except Exception as e:  # reported by the assertion below
                    replies.append(e)

        sender = threading.Thread(target=mail, daemon=True)
        sender.start()
        try:
            # Three rotations, each after a few more messages, while mail keeps flowing.
            for rotation in range(4):
                count = len(replies)
                self.wait_until(lambda: len(replies) >= count + 4 or not sender.is_alive(), "more mail", relay, timeout=60)
                if rotation < 3:
                    relay.send_signal(signal.SIGUSR1)
        finally:
            done.set()
            sender.join(timeout=120)
        sent = len(replies)
        self.assertEqual([r[0] if isinstance(r, tuple) else r for r in replies], [250] * sent)
        relay.send_signal(signal.SIGTERM)
        self.assertEqual(relay.wait(timeout=30), 0, self.output("relay")[-3000:])
        files, events = self.journal()
        self.assertEqual(len(files), 4)  # three rotations
        [logging] = [e for e in events if e["event"] == "workers_logging"]
        self.assertEqual((logging["mode"], logging["line_format"]), ("through", "json"))
        transactions = [e for e in events if e["event"] == "smtp_transaction"]
        self.assertEqual(len(transactions), sent)
        self.assertEqual(len({e["session"] for e in transactions}), sent)
        per_file = [sum(1 for e in self.journal_file(name) if e.get("event") == "smtp_transaction") for name in files]
        self.assertGreaterEqual(sum(1 for n in per_file if n), 3, per_file)  # the rotations fell amid the mail
        self.assertTrue({e["worker"] for e in transactions} <= {0, 1})
        self.assertEqual(sorted(e["worker"] for e in events if e["event"] == "worker_ready"), [0, 1])
        self.assertEqual(sorted(e["worker"] for e in events if e["event"] == "drain_done"), [0, 1])
        self.assertEqual(events[-1]["message"], "Server Shut Down.")
        self.assertNotIn("worker", self.output("relay"))  # nothing went to standard output


class LifelineTests(ProcessTestCase):
    """A supervisor killed with SIGKILL leaves no worker behind: each sees its pipe close, drains and exits."""

    def kill_supervisor(self, relay: subprocess.Popen[bytes], pids: list[int]) -> None:
        """SIGKILL the supervisor; its workers must be gone within drain_timeout (5) + 5 s."""
        self.assertEqual(len(set(pids)), 2, pids)
        for pid in pids:
            self.addCleanup(kill_stray_worker, pid)
        self.assertTrue(all(alive(pid) for pid in pids), pids)
        relay.kill()
        relay.wait(timeout=10)
        deadline = time.monotonic() + 5 + 5
        while time.monotonic() < deadline and any(alive(pid) for pid in pids):
            time.sleep(0.05)
        self.assertEqual([pid for pid in pids if alive(pid)], [], self.output("relay")[-3000:])

    def test_supervisor_killed(self) -> None:
        """Logging to standard output: both workers stop by themselves and say so (supervisor_lost)."""
        relay = self.start("relay", self.relay_args(free_port(), "--log-format", "json", "--metrics-listen", "off"))
        self.wait_until(lambda: self.named("workers_ready"), "both workers ready", relay)
        self.kill_supervisor(relay, [e["pid"] for e in self.named("worker_started")])
        self.assertEqual(sorted(e["worker"] for e in self.named("supervisor_lost")), [0, 1])
        self.assertEqual(sorted(e["worker"] for e in self.named("drain_done")), [0, 1])

    def test_supervisor_killed_logfile(self) -> None:
        """Logging to a file through the supervisor: the orphaned workers append their last lines to the file themselves."""
        path = os.path.join(self.dir, "journal.log")

        def events() -> list[dict[str, Any]]:
            try:
                with open(path, "rb") as f:
                    return [json.loads(line) for line in f.read().splitlines()]
            except (OSError, ValueError):
                return []  # not yet written, or caught mid-write

        relay = self.start("relay", ["--logfile", "journal.log",
                                     *self.relay_args(free_port(), "--log-format", "json", "--metrics-listen", "off")])
        self.wait_until(lambda: any(e.get("event") == "workers_ready" for e in events()), "both workers ready", relay)
        self.kill_supervisor(relay, [e["pid"] for e in events() if e.get("event") == "worker_started"])
        found = events()
        self.assertTrue(found)
        self.assertEqual(sorted(e["worker"] for e in found if e.get("event") == "supervisor_lost"), [0, 1])
        self.assertEqual(sorted(e["worker"] for e in found if e.get("event") == "drain_done"), [0, 1])


class WorkersCommandTests(ProcessTestCase):
    """C{--workers 2}: SIGHUP, a bad certificate, workers that cannot start, the C{--logger} fallback."""

    def serving(self, port: int) -> bytes:
        """The DER certificate a new connection gets."""
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                der = tls.getpeercert(binary_form=True)
        assert der is not None
        return der

    def test_sighup_reaches_every_worker(self) -> None:
        """SIGHUP to the supervisor makes each worker reload its certificate; new connections get the new one."""
        port = free_port()
        relay = self.start("relay", self.relay_args(port, "--tls-reload-interval", "0", "--metrics-listen", "off"))
        self.wait_until(lambda: "all 2 workers ready" in self.output("relay"), "both workers ready", relay)
        # Text on standard output: each worker writes its finished lines there, in twistd's format.
        self.assertIn("[poststack_relay.workers#info] workers' log lines: finished and written to descriptor 1 by each worker\n",
                      self.output("relay"))
        for worker in (0, 1):
            self.assertRegex(
                self.output("relay"),
                rf"(?m)^\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{{4}} \[poststack_relay\.workers#info worker={worker}\] "
                rf"worker {worker} ready, pid \d+: listening on 127\.0\.0\.1:{port}$",
            )
        with open(self.cert) as f:
            old = ssl.PEM_cert_to_DER_cert(f.read())
        self.assertEqual(self.serving(port), old)
        new_cert, new_key = write_certificate(os.path.join(self.dir, "new"))
        for source, target in ((new_key, self.key), (new_cert, self.cert)):
            shutil.copy(source, target + ".tmp")
            os.replace(target + ".tmp", target)
        with open(self.cert) as f:
            new = ssl.PEM_cert_to_DER_cert(f.read())
        relay.send_signal(signal.SIGHUP)
        for worker in (0, 1):
            self.wait_until(
                lambda: f"#info worker={worker}] TLS certificate reloaded (SIGHUP)" in self.output("relay"),
                f"worker {worker}'s reload", relay,
            )
        # The supervisor's own line may come after the workers' (its output
        # and theirs are separate writers).
        self.wait_until(
            lambda: "SIGHUP passed on to 2 workers" in self.output("relay"), "the supervisor's line", relay
        )
        self.assertEqual({self.serving(port) for _ in range(8)}, {new})
        relay.send_signal(signal.SIGTERM)
        self.assertEqual(relay.wait(timeout=30), 0)

    def test_systemd_socket(self) -> None:
        """Under socket activation the supervisor hands the socket systemd passed to its workers and alone tells systemd READY=1."""
        notify = notify_receiver(self.dir)
        self.addCleanup(notify.close)
        listening = socket.socket()
        self.addCleanup(listening.close)
        listening.bind(("127.0.0.1", 0))
        listening.listen(16)
        port = listening.getsockname()[1]
        log = open(os.path.join(self.dir, "relay.log"), "wb")
        self.addCleanup(log.close)
        relay = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, str(listening.fileno()), TWISTD, "-n", "--pidfile=",
             *self.relay_args(0, "--systemd-socket", "smtps", "--metrics-listen", "off")],
            cwd=self.dir, env=dict(os.environ, PYTHONPATH=ROOT, NOTIFY_SOCKET=notify.getsockname()),
            stdout=log, stderr=subprocess.STDOUT, pass_fds=(listening.fileno(),),
        )
        self.addCleanup(stop_process, relay)
        listening.close()  # only the relay holds it now
        messages = self.wait_until(lambda: pending_datagrams(notify), "READY=1", relay)
        self.assertEqual(messages, [f"READY=1\nSTATUS=2 workers listening on 127.0.0.1:{port}".encode()])
        for worker in (0, 1):
            self.assertIn(f"worker={worker}] worker {worker} ready, pid", self.output("relay"))
            self.assertIn(f"listening on 127.0.0.1:{port}", self.output("relay"))
        context = ssl.create_default_context(cafile=self.cert)
        for _ in range(4):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                with context.wrap_socket(raw, server_hostname="localhost") as tls:
                    self.assertTrue(tls.recv(1024).startswith(b"220 localhost "))
        relay.send_signal(signal.SIGTERM)
        self.assertEqual(relay.wait(timeout=30), 0)
        self.assertEqual(pending_datagrams(notify), [b"STOPPING=1\nSTATUS=stopping"])

    def test_bad_certificate(self) -> None:
        """A certificate that cannot be used is one line and exit status 1 before any worker starts."""
        result = subprocess.run(
            [TWISTD, "-n", "--pidfile=", *self.relay_args(free_port()), "--tls-cert", "/nonexistent/c.pem"],
            cwd=self.dir, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=60,
        )
        self.assertEqual(result.returncode, 1)
        self.assertEqual(
            result.stderr.strip(),
            "poststack-relay: error: cannot read TLS certificate '/nonexistent/c.pem': No such file or directory",
        )
        self.assertNotIn("worker", result.stdout)

    def test_workers_that_cannot_start(self) -> None:
        """A worker's metrics port taken: the supervisor says so in one line before any worker starts, status 1.

        (Workers that die before they are ready for another reason: test_never_ready_stops_the_relay.)
        """
        metrics = free_port()
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            taken.bind(("127.0.0.1", metrics + 1))
        except OSError:
            self.skipTest("the port after a free one is in use")
        taken.listen(1)
        relay = self.start("relay", self.relay_args(free_port(), "--metrics-listen", f"127.0.0.1:{metrics}"))
        self.assertEqual(relay.wait(timeout=40), 1, self.output("relay")[-3000:])
        log = self.output("relay")
        self.assertIn(
            f"#critical] cannot listen on 127.0.0.1:{metrics + 1} (metrics listener of worker 1): "
            "Address already in use; change --metrics-listen (worker K uses its port + K)\n", log
        )
        self.assertNotIn("Traceback", log)
        self.assertNotIn("worker 0 started", log)

    def test_logger_fallback(self) -> None:
        """twistd --logger (or --syslog): the supervisor logs its workers' events again, each with its worker; ready still comes on the control pipe."""
        port = free_port()
        relay = self.start(
            "relay",
            ["--logger", "tests.test_workers.fallback_observer",
             *self.relay_args(port, "--metrics-listen", "off", "--tls-reload-interval", "0")],
        )
        self.wait_until(lambda: "all 2 workers ready" in self.output("relay"), "both workers ready", relay)
        log = self.output("relay")
        self.assertIn("[poststack_relay.workers#info] workers' log lines: logged again by the supervisor", log)
        for worker in (0, 1):
            self.assertIn(f" [poststack_relay.workers#info worker={worker}] worker {worker} ready, pid", log)
        relay.send_signal(signal.SIGTERM)
        self.assertEqual(relay.wait(timeout=30), 0)
        self.assertIn("[poststack_relay.smtp#info worker=1] drained", self.output("relay"))
