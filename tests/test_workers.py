# -*- test-case-name: tests.test_workers -*-
"""
C{--workers N} (L{poststack_relay.workers}): the setting, the supervisor's
restart, readiness and stop logic on a L{Clock} with a fake process
spawner, the worker's log lines told again by the supervisor, the
adopted-socket hook of L{poststack_relay.service.makeRelayService}, and
C{twistd -n poststack-relay --workers 2} as real processes against the
sandbox: mail over real TLS through the shared port, a killed worker
restarted while the port keeps serving, SIGHUP passed on, SIGTERM, a bad
certificate and workers that cannot start.
"""

from __future__ import annotations

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
from twisted.internet.error import CannotListenError, ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, MemoryReactorClock
from twisted.logger import LogLevel, formatEvent, formatEventAsClassicLogText
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from poststack_relay import tap, workers
from poststack_relay.config import ConfigError, RelayConfig
from poststack_relay.logs import event_as_json, event_as_json_line
from poststack_relay.service import makeRelayService
from poststack_relay.testing import MemoryEmailAPI, write_certificate
from poststack_relay.workers import (
    Supervisor,
    describe_exit,
    parse_worker_line,
    worker_command,
    worker_environment,
    worker_log_event,
    worker_metrics_listen,
    worker_output_event,
    worker_settings,
)
from tests.test_commands import DATA, ROOT, TWISTD, free_port, stop_process, wait_for_port
from tests.test_systemd import LAUNCHER, _pending, _receiver


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
# Pure helpers


class HelperTests(SynchronousTestCase):
    def test_metrics_listen(self) -> None:
        """Worker K's metrics address is the configured one with the port + K; port 0 and off stay."""
        self.assertEqual(worker_metrics_listen("127.0.0.1:9587", 0), "127.0.0.1:9587")
        self.assertEqual(worker_metrics_listen("127.0.0.1:9587", 2), "127.0.0.1:9589")
        self.assertEqual(worker_metrics_listen("localhost:9587", 1), "127.0.0.1:9588")
        self.assertEqual(worker_metrics_listen("[::1]:9000", 3), "[::1]:9003")
        self.assertEqual(worker_metrics_listen("10.0.0.1:0", 5), "10.0.0.1:0")
        self.assertEqual(worker_metrics_listen("off", 1), "off")

    def test_settings_round_trip(self) -> None:
        """A worker's settings, through JSON, rebuild the same config with workers 1 and its metrics port."""
        config = RelayConfig(
            tls_cert="/etc/c.pem",
            tls_key=None,
            port=2587,
            interface="127.0.0.1",
            service_key="sk_live_secret",
            hostname="smtp.example.com",
            idle_timeout=0.1,
            api_deadline=1e-3,
            derive_idempotency_keys=False,
            listen=("465", "127.0.0.1:2465,proxy-protocol,tls-cert=/x y.pem"),
            metrics_listen="127.0.0.1:9587",
            log_format="json",
            workers=4,
        )
        settings = json.loads(json.dumps(worker_settings(config, 2)))
        self.assertEqual(
            RelayConfig(**settings),
            attrs.evolve(config, workers=1, metrics_listen="127.0.0.1:9589"),
        )

    def test_environment(self) -> None:
        """Workers inherit the environment without systemd's variables."""
        environ = {
            "PATH": "/bin", "NOTIFY_SOCKET": "/run/n", "LISTEN_FDS": "1", "LISTEN_PID": "7",
            "LISTEN_FDNAMES": "smtps", "WATCHDOG_USEC": "1", "POSTSTACK_RELAY_PORT": "25",
        }
        self.assertEqual(worker_environment(environ), {"PATH": "/bin", "POSTSTACK_RELAY_PORT": "25"})

    def test_command(self) -> None:
        """A worker is this Python running worker_main with its number and inherited descriptors."""
        executable, args = worker_command(3, [3, 4])
        self.assertEqual(executable, args[0])
        self.assertEqual(args[1], "-c")
        self.assertIn("worker_main()", args[2])
        self.assertEqual(args[3:], ["--worker", "3", "--fds", "3,4"])
        self.assertEqual(workers._parse_arguments(args[3:]), (3, [3, 4]))
        self.assertRaises(ValueError, workers._parse_arguments, ["--fds", "3"])

    def test_describe_exit(self) -> None:
        """An exit is told as its status or its signal."""
        self.assertEqual(describe_exit(Failure(ProcessDone(0))), ("exit status 0", 0, None))
        self.assertEqual(
            describe_exit(Failure(ProcessTerminated(exitCode=1))), ("exit status 1", 1, None)
        )
        self.assertEqual(
            describe_exit(Failure(ProcessTerminated(signal=9))), ("signal 9 (SIGKILL)", None, 9)
        )

    def test_line_buffer(self) -> None:
        """Lines are split across chunks, the last one comes at the end, and none grows unbounded."""
        buffer = workers._LineBuffer(limit=10)
        self.assertEqual(buffer.feed(b'{"a"'), [])
        self.assertEqual(buffer.feed(b': 1}\nx\n{"b'), [b'{"a": 1}', b"x"])
        self.assertEqual(buffer.feed(b'": 2}\n'), [b'{"b": 2}'])
        self.assertEqual(buffer.feed(b"0123456789AB"), [b"0123456789AB"])
        self.assertEqual(buffer.feed(b"tail"), [])
        self.assertEqual(buffer.flush(), [b"tail"])
        self.assertEqual(buffer.flush(), [])


class WorkerLogEventTests(SynchronousTestCase):
    """
    A worker's JSON line, told again by the supervisor, is the same event
    with a C{worker} field.
    """

    def worker_line(self, **extra: Any) -> bytes:
        """The JSON line a worker writes for a real event logged with C{extra}."""
        event = {
            "log_format": "s1 relayed {who} {{braces}}",
            "log_level": LogLevel.warn,
            "log_namespace": "poststack_relay.delivery",
            "log_time": 1748779200.123,
            "who": "x@example.com",
            "event": "smtp_transaction",
            "size": 67,
            **extra,
        }
        return event_as_json_line(event).encode("utf-8").rstrip(b"\n")

    def test_same_event(self) -> None:
        """Message, level, namespace, time, event name and fields survive, and worker is added."""
        fields = parse_worker_line(self.worker_line())
        assert fields is not None
        event = worker_log_event(fields, 1, now=0.0)
        self.assertEqual(formatEvent(event), "s1 relayed x@example.com {braces}")
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertEqual(event["log_namespace"], "poststack_relay.delivery")
        self.assertAlmostEqual(event["log_time"], 1748779200.123, places=3)
        self.assertEqual((event["event"], event["size"], event["who"], event["worker"]), ("smtp_transaction", 67, "x@example.com", 1))

    def test_as_json_line(self) -> None:
        """In a JSON log the line is the worker's own plus "worker"."""
        line = self.worker_line()
        fields = parse_worker_line(line)
        assert fields is not None
        again = event_as_json(worker_log_event(fields, 1, now=0.0))
        self.assertEqual(again, {**json.loads(line), "worker": 1})

    def test_as_text_line(self) -> None:
        """In a text log the system in brackets names the worker."""
        fields = parse_worker_line(self.worker_line())
        assert fields is not None
        text = formatEventAsClassicLogText(worker_log_event(fields, 0, now=0.0))
        assert text is not None
        self.assertIn(" [poststack_relay.delivery#warn worker=0] s1 relayed x@example.com {braces}\n", text)

    def test_traceback(self) -> None:
        """A worker's traceback follows its message."""
        try:
            1 / 0
        except ZeroDivisionError:
            failure = Failure()
        fields = parse_worker_line(self.worker_line(log_failure=failure))
        assert fields is not None
        message = formatEvent(worker_log_event(fields, 0, now=0.0))
        self.assertTrue(message.startswith("s1 relayed x@example.com {braces}\nTraceback"), message)
        self.assertIn("ZeroDivisionError", message)

    def test_not_json(self) -> None:
        """A line that is not a JSON object is logged as worker_output, warn for stderr."""
        self.assertIsNone(parse_worker_line(b"Traceback (most recent call last):"))
        self.assertIsNone(parse_worker_line(b"[1, 2]"))
        event = worker_output_event(b"Traceback {x}\xff", 2, "stderr", now=5.0)
        self.assertEqual(formatEvent(event), "worker 2 stderr: Traceback {x}\\xff")
        self.assertEqual((event["log_level"], event["worker"], event["event"]), (LogLevel.warn, 2, "worker_output"))


# ---------------------------------------------------------------------------
# The supervisor, with fake processes


class FakeProcess:
    """What C{spawnProcess} returns: records writes and signals."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.written: list[bytes] = []
        self.signals: list[str] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class FakeSpawner:
    """A C{spawnProcess} that starts nothing."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.fail = False

    def __call__(self, protocol: Any, executable: str, args: list[str], env: dict[str, str], childFDs: dict[int, Any]) -> FakeProcess:
        if self.fail:
            raise OSError("fork failed")
        process = FakeProcess(1000 + len(self.calls))
        self.calls.append(dict(protocol=protocol, executable=executable, args=args, env=env, childFDs=childFDs, process=process))
        protocol.makeConnection(process)
        return process

    def of(self, worker: int) -> list[dict[str, Any]]:
        """The spawns of one worker, oldest first."""
        return [c for c in self.calls if c["args"][c["args"].index("--worker") + 1] == str(worker)]

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
        self.clock = Clock()
        self.spawner = FakeSpawner()
        self.notifier = FakeNotifier()
        self.worker_events: list[dict[str, Any]] = []
        self.stops: list[bool] = []
        self.events: list[dict[str, Any]] = []
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def supervisor(self, count: int = 2, **kw: Any) -> Supervisor:
        config = RelayConfig(
            tls_cert="c.pem", port=0, interface="127.0.0.1", hostname="localhost",
            metrics_listen="127.0.0.1:9587", workers=count, **kw,
        )
        supervisor = Supervisor(
            config, MemoryReactor(), spawn=self.spawner, clock=self.clock, notifier=self.notifier,
            observer=self.worker_events.append, environ={"PATH": "/bin", "NOTIFY_SOCKET": "/run/n"},
            stop=lambda: self.stops.append(True),
        )
        self.addCleanup(supervisor._close_sockets)
        return supervisor

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == name]

    def say(self, worker: int, data: bytes, fd: int = 1) -> None:
        """Worker C{worker}'s current process writes C{data}."""
        self.spawner.last(worker)["protocol"].childDataReceived(fd, data)

    def ready(self, worker: int, metrics: str = "127.0.0.1:9587") -> None:
        line = json.dumps({"time": "2025-06-01T12:00:00.000Z", "level": "info", "namespace": "poststack_relay.workers",
                           "event": "worker_ready", "message": "ready", "metrics": metrics})
        self.say(worker, line.encode() + b"\n")

    def end(self, worker: int, reason: Any = None) -> None:
        self.spawner.last(worker)["protocol"].processEnded(Failure(reason or ProcessTerminated(signal=9)))

    def test_start(self) -> None:
        """Each worker gets the shared socket as fd 3, the environment without NOTIFY_SOCKET and its settings on stdin."""
        supervisor = self.supervisor()
        supervisor.privilegedStartService()
        port = bound_port(supervisor.sockets[0])
        self.assertEqual(self.spawner.calls, [])  # binding only: twistd drops privileges next
        supervisor.startService()
        self.assertEqual(len(self.spawner.calls), 2)
        for index, call in enumerate(self.spawner.calls):
            self.assertEqual(call["childFDs"], {0: "w", 1: "r", 2: "r", 3: supervisor.sockets[0]})
            self.assertEqual(call["env"], {"PATH": "/bin"})
            self.assertEqual(call["args"][-4:], ["--worker", str(index), "--fds", "3"])
            [line] = call["process"].written
            self.assertTrue(line.endswith(b"\n"))
            settings = json.loads(line)
            self.assertEqual((settings["workers"], settings["metrics_listen"]), (1, f"127.0.0.1:{9587 + index}"))
        self.assertEqual([(e["worker"], e["pid"]) for e in self.named("worker_started")], [(0, 1000), (1, 1001)])
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
        self.assertEqual(self.spawner.calls, [])

    def test_ready_once_all_are(self) -> None:
        """READY=1 goes to systemd once, when the last worker is ready, not again after a restart."""
        supervisor = self.supervisor()
        supervisor.startService()
        self.ready(0)
        self.assertEqual(self.notifier.sent, [])
        self.ready(1, "127.0.0.1:9588")
        where = supervisor.addresses[0]
        self.assertEqual(self.notifier.sent, [f"READY=1\nSTATUS=2 workers listening on {where}"])
        self.assertEqual(self.named("workers_ready")[0]["metrics"], ["127.0.0.1:9587", "127.0.0.1:9588"])
        self.end(0)
        self.clock.advance(1)
        self.ready(0)
        self.assertEqual(len(self.notifier.sent), 1)
        # The workers' own events went to the log, with their number.
        self.assertEqual([e["worker"] for e in self.worker_events], [0, 1, 0])

    def test_restart_backoff(self) -> None:
        """A dead worker restarts after 1 s, doubling while it dies within 10 s of its start, up to 30 s; a long run resets it."""
        supervisor = self.supervisor()
        supervisor.startService()
        self.ready(0)
        self.ready(1)
        waits = []
        for _ in range(7):
            self.clock.advance(2)
            self.end(0)
            spawned = len(self.spawner.of(0))
            wait = self.named("worker_exited")[-1]["restart_in"]
            self.clock.advance(wait - 0.01)
            self.assertEqual(len(self.spawner.of(0)), spawned, "restarted too early")
            self.clock.advance(0.01)
            self.assertEqual(len(self.spawner.of(0)), spawned + 1)
            self.ready(0)
            waits.append(wait)
        self.assertEqual(waits, [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0])
        self.clock.advance(10)
        self.end(0)
        self.assertEqual(self.named("worker_exited")[-1]["restart_in"], 1.0)
        exited = self.named("worker_exited")[0]
        self.assertEqual((exited["worker"], exited["pid"], exited["status"], exited["signal"], exited["ready"]),
                         (0, 1000, "signal 9 (SIGKILL)", 9, True))
        self.assertEqual(self.spawner.of(1)[1:], [])  # the other worker was left alone
        self.assertEqual(self.stops, [])

    def test_never_ready_stops_the_relay(self) -> None:
        """A worker that dies before it is ready 3 times in a row stops the relay with exit status 1."""
        supervisor = self.supervisor()
        supervisor.startService()
        self.ready(1)
        for attempt in range(2):
            self.end(0, ProcessTerminated(exitCode=1))
            self.assertEqual(self.stops, [])
            self.clock.advance(self.named("worker_exited")[-1]["restart_in"])
        self.assertEqual(len(self.spawner.of(0)), 3)
        self.end(0, ProcessTerminated(exitCode=1))
        self.assertEqual(self.stops, [True])
        self.assertEqual(supervisor.exit_status, 1)
        [failed] = self.named("workers_failed")
        self.assertEqual((failed["worker"], failed["failures"], failed["status"], failed["log_level"]),
                         (0, 3, "exit status 1", LogLevel.critical))
        self.clock.advance(60)
        self.assertEqual(len(self.spawner.of(0)), 3)  # no respawn loop

    def test_ready_resets_the_count(self) -> None:
        """Failures before ready count only in a row: a worker that got ready once starts counting again."""
        supervisor = self.supervisor()
        supervisor.startService()
        for _ in range(3):
            for _ in range(2):
                self.end(0, ProcessTerminated(exitCode=1))
                self.clock.advance(self.named("worker_exited")[-1]["restart_in"])
            self.ready(0)
            self.clock.advance(60)
        self.assertEqual((self.stops, supervisor.exit_status), ([], 0))

    def test_spawn_failure(self) -> None:
        """A worker that cannot even be spawned counts as a failed start and is tried again."""
        self.spawner.fail = True
        supervisor = self.supervisor(count=2)
        supervisor.startService()
        self.assertEqual(len(self.named("worker_spawn_failed")), 2)
        self.assertEqual([e["restart_in"] for e in self.named("worker_exited")], [1.0, 1.0])
        self.spawner.fail = False
        self.clock.advance(1)
        self.assertEqual(len(self.spawner.calls), 2)

    def test_start_timeout(self) -> None:
        """A worker not ready 30 s after its start is killed, which counts as a failed start."""
        supervisor = self.supervisor()
        supervisor.startService()
        self.ready(1)
        self.clock.advance(29.9)
        self.assertEqual(self.spawner.last(0)["process"].signals, [])
        self.clock.advance(0.1)
        self.assertEqual(self.spawner.last(0)["process"].signals, ["KILL"])
        self.assertEqual(self.spawner.last(1)["process"].signals, [])
        self.end(0)
        self.assertEqual(self.named("worker_exited")[-1]["ready"], False)

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
        self.assertEqual(self.spawner.last(0)["process"].signals, ["TERM"])
        self.assertRaises(ConnectionRefusedError, socket.create_connection, ("127.0.0.1", port), 5)
        self.clock.advance(60)
        self.assertEqual(len(self.spawner.of(1)), 1)  # the pending restart was cancelled
        self.assertNoResult(d)
        self.end(0, ProcessDone(0))
        self.successResultOf(d)
        self.assertEqual(self.named("worker_stopped")[0]["status"], "exit status 0")
        self.assertEqual(self.named("worker_exited")[-1]["worker"], 1)  # not a second exit for worker 0

    def test_stop_kills_late_workers(self) -> None:
        """A worker still running drain_timeout + 10 s after SIGTERM gets SIGKILL; the stop ends even if it never exits."""
        supervisor = self.supervisor(drain_timeout=5.0)
        supervisor.startService()
        d = supervisor.stopService()
        assert d is not None
        self.clock.advance(14.9)
        self.assertEqual(self.spawner.last(0)["process"].signals, ["TERM"])
        self.clock.advance(0.1)
        self.assertEqual(self.spawner.last(0)["process"].signals, ["TERM", "KILL"])
        self.end(0)
        self.assertNoResult(d)
        self.clock.advance(workers.KILL_WAIT)
        self.successResultOf(d)
        self.assertEqual(self.named("workers_lost")[0]["pids"], [1001])

    def test_stop_without_workers(self) -> None:
        """A stop with every worker waiting for its restart is immediate."""
        supervisor = self.supervisor(count=2)
        supervisor.startService()
        self.end(0)
        self.end(1)
        self.assertIsNone(supervisor.stopService())
        self.clock.advance(60)
        self.assertEqual(len(self.spawner.calls), 2)

    def test_sighup_passed_on(self) -> None:
        """reload_tls (what SIGHUP calls) sends SIGHUP to every running worker."""
        supervisor = self.supervisor(count=3)
        supervisor.startService()
        self.end(2)
        self.assertTrue(supervisor.reload_tls("SIGHUP"))
        self.assertEqual([self.spawner.last(i)["process"].signals for i in range(3)], [["HUP"], ["HUP"], []])
        self.assertEqual(self.named("workers_reload")[0]["workers"], [0, 1])

    def test_output(self) -> None:
        """JSON lines are told again with the worker's number, across chunks; anything else as worker_output."""
        supervisor = self.supervisor()
        supervisor.startService()
        line = json.dumps({"time": "2025-06-01T12:00:00.250Z", "level": "error", "namespace": "poststack_relay.api",
                           "event": "api_timeout", "message": "API timed out {x}", "attempt": 2})
        self.say(1, line[:10].encode())
        self.assertEqual(self.worker_events, [])
        self.say(1, line[10:].encode() + b"\nnot json\n")
        self.say(0, b"Traceback (most recent call last):\n  File", fd=2)
        self.end(0)  # the unterminated line comes out too
        first, second, third, fourth = self.worker_events
        self.assertEqual((formatEvent(first), first["event"], first["attempt"], first["worker"], first["log_level"]),
                         ("API timed out {x}", "api_timeout", 2, 1, LogLevel.error))
        self.assertEqual(formatEvent(second), "worker 1 stdout: not json")
        self.assertEqual(formatEvent(third), "worker 0 stderr: Traceback (most recent call last):")
        self.assertEqual(formatEvent(fourth), "worker 0 stderr:   File")


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
        notify = _receiver(self.dir)
        self.addCleanup(notify.close)
        self.port = free_port()
        relay = self.start(
            "relay", self.relay_args(self.port, "--log-format", "json", "--metrics-listen", "127.0.0.1:0"),
            {"NOTIFY_SOCKET": notify.getsockname()},
        )
        self.wait_until(lambda: self.named("workers_ready"), "both workers ready", relay)
        started = {e["worker"]: e["pid"] for e in self.named("worker_started")}
        self.assertEqual(sorted(started), [0, 1])
        self.assertNotEqual(started[0], started[1])
        self.assertEqual([parent_of(pid) for pid in started.values()], [relay.pid, relay.pid])
        self.assertEqual({e["worker"]: e["pid"] for e in self.named("worker_ready")}, started)
        self.assertEqual(_pending(notify), [f"READY=1\nSTATUS=2 workers listening on 127.0.0.1:{self.port}".encode()])

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
        self.assertEqual((exited[0]["worker"], exited[0]["pid"], exited[0]["signal"], exited[0]["restart_in"]),
                         (0, started[0], 9, 1.0))
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
        self.assertEqual(_pending(notify), [])  # READY=1 only once

        # SIGTERM to the supervisor: every worker stops, status 0, the port closes.
        began = time.monotonic()
        relay.send_signal(signal.SIGTERM)
        self.assertEqual(relay.wait(timeout=30), 0, self.output("relay")[-3000:])
        self.assertLess(time.monotonic() - began, 15)
        self.assertEqual(_pending(notify), [b"STOPPING=1\nSTATUS=stopping"])
        for pid in (new0, new1):
            self.assertFalse(alive(pid), pid)
        self.assertEqual(sorted(e["worker"] for e in self.named("worker_stopped")), [0, 1])
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", self.port), timeout=5).close()
        stored = urllib.request.urlopen(f"http://127.0.0.1:{self.api_port}/_sandbox/emails", timeout=10)
        self.assertEqual(len(json.load(stored)["data"]), sum(self.served().values()))


class WorkersCommandTests(ProcessTestCase):
    """C{--workers 2}: SIGHUP, a bad certificate, workers that cannot start."""

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
        self.assertIn("SIGHUP passed on to 2 workers", self.output("relay"))
        self.assertEqual({self.serving(port) for _ in range(8)}, {new})
        relay.send_signal(signal.SIGTERM)
        self.assertEqual(relay.wait(timeout=30), 0)

    def test_systemd_socket(self) -> None:
        """Under socket activation the supervisor hands the socket systemd passed to its workers and alone tells systemd READY=1."""
        notify = _receiver(self.dir)
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
        messages = self.wait_until(lambda: _pending(notify), "READY=1", relay)
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
        self.assertEqual(_pending(notify), [b"STOPPING=1\nSTATUS=stopping"])

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
        """A worker that keeps dying before it is ready (its metrics port is taken) stops the relay with status 1."""
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
            f"worker 1 cannot start: Couldn't listen on 127.0.0.1:{metrics + 1}: [Errno 98] Address already in use.", log
        )
        self.assertIn("before it was ready, 3 times in a row: stopping the relay", log)
        self.assertEqual(log.count("#info] worker 1 started, pid"), 3)
        self.assertIn("worker 0 (pid", log)
        self.assertIn(") stopped: exit status 0", log)
