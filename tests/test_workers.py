# -*- test-case-name: tests.test_workers -*-
"""
C{--workers N} (L{poststack_relay.workers}): the setting, the supervisor's
restart, readiness and stop logic on a L{Clock} with a fake process
spawner, the workers' log lines (finished by the worker in the
supervisor's format, passed through or written directly; told again by
the supervisor only in the fallback; a stuck log dropped and counted),
readiness on the control pipe, SIGHUP held until ready, degraded service
after a worker stops starting, installed-version changes, the worker's
command as a real process (SIGHUP ignored from the start, C{-P}), the
adopted-socket hook of L{poststack_relay.service.makeRelayService}, and
C{twistd -n poststack-relay --workers 2} as real processes against the
sandbox: mail over real TLS through the shared port, a killed worker
restarted while the port keeps serving, SIGHUP passed on, SIGTERM, a
SIGKILLed supervisor (the lifeline), a bad certificate, workers that
cannot start, C{--logfile} with rotation and the C{--logger} fallback.
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
    textFileLogObserver,
)
from twisted.application.service import Application, Service
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile
from zope.interface import provider
from twisted.trial.unittest import SynchronousTestCase

import poststack_relay
from poststack_relay import tap, workers
from poststack_relay.config import ConfigError, RelayConfig
from poststack_relay.logs import (
    LogObserverService,
    event_as_json,
    event_as_json_line,
    jsonLineObserver,
    textLineObserver,
)
from poststack_relay.service import makeRelayService
from poststack_relay.testing import MemoryEmailAPI, write_certificate
from poststack_relay.workers import (
    LogOutput,
    Supervisor,
    describe_exit,
    parse_control_line,
    parse_worker_line,
    ready_line,
    supervisor_log_output,
    worker_command,
    worker_environment,
    worker_line_observer,
    worker_log_event,
    worker_log_line,
    worker_message,
    worker_metrics_listen,
    worker_output_event,
    worker_settings,
)
from tests.test_commands import DATA, ROOT, TWISTD, free_port, stop_process, wait_for_port
from tests.test_systemd import LAUNCHER, _pending, _receiver


def nonblocking_full_pipe(case: SynchronousTestCase) -> tuple[int, int]:
    """A pipe whose write end is non-blocking and full; both ends closed at cleanup."""
    read, write = os.pipe()
    case.addCleanup(os.close, read)
    case.addCleanup(os.close, write)
    os.set_blocking(write, False)
    for _ in range(1000):
        try:
            os.write(write, b"x" * 65536)
        except BlockingIOError:
            break
    for _ in range(1000):
        try:
            os.write(write, b"x")
        except BlockingIOError:
            break
    return read, write


def drain(fd: int) -> None:
    """Read everything waiting in the pipe C{fd}."""
    blocking = os.get_blocking(fd)
    os.set_blocking(fd, False)
    try:
        for _ in range(10000):
            try:
                if not os.read(fd, 65536):
                    return
            except BlockingIOError:
                return
    finally:
        os.set_blocking(fd, blocking)


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
        """Workers inherit the environment without systemd's variables and without any POSTSTACK_RELAY_* one (the service key)."""
        environ = {
            "PATH": "/bin", "NOTIFY_SOCKET": "/run/n", "LISTEN_FDS": "1", "LISTEN_PID": "7",
            "LISTEN_FDNAMES": "smtps", "WATCHDOG_USEC": "1", "POSTSTACK_RELAY_PORT": "25",
            "POSTSTACK_RELAY_SERVICE_KEY": "sk_live_secret", "PYTHONPATH": "/src",
        }
        self.assertEqual(worker_environment(environ), {"PATH": "/bin", "PYTHONPATH": "/src"})

    def test_command(self) -> None:
        """A worker is this Python, in safe-path mode (-P), running worker_main with its number and inherited descriptors; SIGHUP is ignored before any import."""
        executable, args = worker_command(3, [3, 4])
        self.assertEqual(executable, args[0])
        self.assertEqual(args[1:3], ["-P", "-c"])
        self.assertTrue(args[3].startswith("import signal; signal.signal(signal.SIGHUP, signal.SIG_IGN); "), args[3])
        self.assertIn("worker_main()", args[3])
        self.assertEqual(args[4:], ["--worker", "3", "--fds", "3,4"])
        self.assertEqual(workers._parse_arguments(args[4:]), (3, [3, 4]))
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

    def test_pass_through(self) -> None:
        """Finished lines are written in whole-line chunks as they come; a partial line waits, a too long one is cut, the rest comes at the end."""
        written: list[bytes] = []
        through = workers._PassThrough(written.append, limit=10)
        through.feed(b"a1\nb2\nc")
        self.assertEqual(written, [b"a1\nb2\n"])
        through.feed(b"3")
        through.feed(b"\nd4\n")
        self.assertEqual(written[1:], [b"c3\nd4\n"])
        through.feed(b"0123456789AB")
        self.assertEqual(written[2:], [b"0123456789AB\n"])  # cut: the buffer stays bounded
        through.feed(b"\ntail")
        self.assertEqual(written[3:], [b"\n"])
        through.flush()
        through.flush()
        self.assertEqual(written[4:], [b"tail\n"])
        self.assertTrue(all(chunk.endswith(b"\n") for chunk in written))

    def test_pass_through_survives_its_writer(self) -> None:
        """A log that cannot take a chunk (full disk) loses it, and nothing else."""
        calls: list[bytes] = []

        def write(data: bytes) -> None:
            calls.append(data)
            raise OSError("no space left")

        through = workers._PassThrough(write)
        through.feed(b"x\n")
        through.feed(b"y\n")
        self.assertEqual(calls, [b"x\n", b"y\n"])

    def test_control_lines(self) -> None:
        """The ready line is a word and a JSON object; anything else is not a control line."""
        line = ready_line(42, ["127.0.0.1:465"], "127.0.0.1:9587")
        self.assertTrue(line.endswith(b"\n"))
        self.assertEqual(
            parse_control_line(line.rstrip(b"\n")),
            ("ready", {"pid": 42, "listening": ["127.0.0.1:465"], "metrics": "127.0.0.1:9587"}),
        )
        self.assertEqual(parse_control_line(b"ready"), ("ready", {}))
        for bad in (b"", b"ready [1]", b"ready {", b'\xff {"a": 1}', b'{"event": "worker_ready"}'):
            self.assertIsNone(parse_control_line(bad), bad)

    def test_message(self) -> None:
        """A worker's stdin line holds its settings, its control descriptor and how it logs; a bad one is refused."""
        config = RelayConfig(tls_cert="c.pem", workers=3, metrics_listen="127.0.0.1:9587")
        log = {"mode": "lines", "format": "text", "time_format": "%Y", "pipe": 5, "direct": 6, "path": "/var/log/r.log"}
        message = json.loads(json.dumps(worker_message(config, 1, 4, log)))
        self.assertEqual(message["version"], poststack_relay.__version__)
        self.assertEqual(workers._read_message(message), (worker_settings(config, 1), 4, log))
        self.assertEqual(RelayConfig(**message["settings"]).metrics_listen, "127.0.0.1:9588")
        events = {"settings": {}, "control": None, "log": {"mode": "events", "pipe": 5}}
        self.assertEqual(workers._read_message(events), ({}, None, {"mode": "events", "pipe": 5}))
        for bad in (
            [1], {"settings": []}, {**events, "control": "4"}, {**events, "control": True},
            {**events, "log": {"mode": "both", "pipe": 5}}, {**events, "log": {"mode": "events"}},
            {**events, "log": {**log, "format": "xml"}}, {**events, "log": {**log, "direct": -1}},
            {**events, "log": {**log, "time_format": 3}}, {**events, "log": {**log, "path": 3}},
        ):
            self.assertRaises(ValueError, workers._read_message, bad)

    def test_line_writer(self) -> None:
        """Short lines go to the shared descriptor in one write, longer ones through the pipe to the supervisor."""
        direct_r, direct_w = os.pipe()
        pipe_r, pipe_w = os.pipe()
        for fd in (direct_r, direct_w, pipe_r, pipe_w):
            self.addCleanup(os.close, fd)
        write = workers._LineWriter(pipe_w, direct_w, atomic=8)
        write(b"short\n")
        write(b"a longer line\n")
        write(b"12345678")
        self.assertEqual(os.read(direct_r, 100), b"short\n12345678")
        self.assertEqual(os.read(pipe_r, 100), b"a longer line\n")
        only_pipe = workers._LineWriter(pipe_w, None)
        only_pipe(b"s\n")
        self.assertEqual(os.read(pipe_r, 100), b"s\n")

    def test_write_all_bounded(self) -> None:
        """A full non-blocking descriptor gives up after the wait instead of hanging; a closed pipe loses the line."""
        read, write = os.pipe()
        self.addCleanup(os.close, write)
        os.set_blocking(write, False)
        while True:
            try:
                os.write(write, b"x" * 65536)
            except BlockingIOError:
                break
        began = time.monotonic()
        self.assertFalse(workers._write_all(write, b"line\n", wait=0.05))
        self.assertLess(time.monotonic() - began, 5)
        os.close(read)
        self.assertFalse(workers._write_all(write, b"line\n", wait=0.05))

    def test_write_all_one_deadline_per_line(self) -> None:
        """The wait bounds the whole line: a reader that makes a little room now and then does not keep a long line waiting past it."""
        read, write = nonblocking_full_pipe(self)
        stop = threading.Event()

        def trickle() -> None:
            for _ in range(400):  # 20 s at most
                if stop.wait(0.05):
                    return
                os.read(read, 4096)

        reader = threading.Thread(target=trickle, daemon=True)
        reader.start()
        self.addCleanup(reader.join, 10)
        self.addCleanup(stop.set)
        began = time.monotonic()
        self.assertFalse(workers._write_all(write, b"x" * (1 << 20), wait=0.3))
        self.assertLess(time.monotonic() - began, 2.0)

    def test_line_writer_drops_then_counts(self) -> None:
        """After a line that could not be written, the next ones are tried without waiting and counted; once writing works, one log_lines_dropped line follows."""
        read, write = nonblocking_full_pipe(self)
        pipe_r, pipe_w = os.pipe()
        for fd in (pipe_r, pipe_w):
            self.addCleanup(os.close, fd)
        writer = workers._LineWriter(pipe_w, write, wait=0.3, dropped=lambda n: b"dropped %d\n" % n)
        began = time.monotonic()
        writer(b"a\n")
        self.assertGreaterEqual(time.monotonic() - began, 0.25)  # the first line waited
        began = time.monotonic()
        for line in (b"b\n", b"c\n", b"d\n"):
            writer(line)
        self.assertLess(time.monotonic() - began, 0.25)  # the next ones did not
        self.assertEqual(writer.dropped_count, 4)
        drain(read)
        writer(b"e\n")
        writer(b"f\n")
        self.assertEqual(os.read(read, 100), b"e\ndropped 4\nf\n")
        self.assertEqual(writer.dropped_count, 0)

    def test_line_writer_observer_tells_the_drops(self) -> None:
        """A worker's observer writes the drop count as a log_lines_dropped line in its format."""
        read, write = nonblocking_full_pipe(self)
        pipe_r, pipe_w = os.pipe()
        for fd in (pipe_r, pipe_w):
            self.addCleanup(os.close, fd)
        log = {"mode": "lines", "format": "json", "time_format": None, "pipe": pipe_w, "direct": write, "path": None}
        self.patch(workers, "WRITE_WAIT", 0.05)
        observer, orphaned = workers._worker_logging(1, log)
        self.assertIsNotNone(orphaned)
        observer({"log_format": "one", "log_level": LogLevel.info, "log_namespace": "t", "log_time": 0.0})
        observer({"log_format": "two", "log_level": LogLevel.info, "log_namespace": "t", "log_time": 0.0})
        drain(read)
        observer({"log_format": "three", "log_level": LogLevel.info, "log_namespace": "t", "log_time": 0.0})
        lines = [json.loads(line) for line in os.read(read, 10000).splitlines()]
        self.assertEqual(len(lines), 2)
        self.assertEqual((lines[0]["message"], lines[0]["worker"]), ("three", 1))
        self.assertEqual((lines[1]["event"], lines[1]["count"], lines[1]["worker"], lines[1]["level"]),
                         ("log_lines_dropped", 2, 1, "warn"))

    def test_line_writer_orphaned(self) -> None:
        """Once the supervisor is gone, long lines go to the shared descriptor, or, logging to a file, every line is appended to that file."""
        direct_r, direct_w = os.pipe()
        pipe_r, pipe_w = os.pipe()
        for fd in (direct_r, direct_w, pipe_w):
            self.addCleanup(os.close, fd)
        os.close(pipe_r)  # nothing reads the pipe to the supervisor any more
        writer = workers._LineWriter(pipe_w, direct_w, atomic=8, wait=0.05)
        writer.orphaned()
        writer(b"a longer line\n")
        self.assertEqual(os.read(direct_r, 100), b"a longer line\n")
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"before\n")
        writer = workers._LineWriter(pipe_w, None, wait=0.05, path=path, dropped=lambda n: b"dropped %d\n" % n)
        writer(b"lost\n")
        writer.orphaned()
        writer(b"after\n")
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"before\nafter\ndropped 1\n")
        no_file = workers._LineWriter(pipe_w, None, wait=0.05, path=os.path.join(path, "not-a-directory"))
        no_file.orphaned()
        no_file(b"lost\n")  # cannot be opened: lost, nothing raised


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


class WorkerLogLineTests(SynchronousTestCase):
    """
    A worker's finished line is, byte for byte, what the supervisor used to
    write after parsing the worker's JSON event and logging it again.
    """

    def event(self, **extra: Any) -> dict[str, Any]:
        """A transaction event as the worker logs it."""
        return {
            "log_format": "s1 relayed {who} {{braces}} é",
            "log_level": LogLevel.warn,
            "log_namespace": "poststack_relay.delivery",
            "log_time": 1748779200.123,
            "log_system": "-",
            "who": "x@example.com",
            "event": "smtp_transaction",
            "size": 67,
            **extra,
        }

    def relogged(self, event: dict[str, Any], index: int) -> dict[str, Any]:
        """The event the old path logged in the supervisor for it."""
        fields = parse_worker_line(event_as_json_line(event).encode("utf-8"))
        assert fields is not None
        return worker_log_event(fields, index, now=0.0)

    def test_json_as_before(self) -> None:
        """JSON: the worker's event as a JSON line plus "worker", the same bytes the supervisor wrote."""
        event = self.event()
        line = worker_log_line(event, 2, "json")
        self.assertEqual(line, event_as_json_line(self.relogged(event, 2)).encode("utf-8"))
        assert line is not None
        self.assertEqual(json.loads(line), {**event_as_json(event), "worker": 2})
        self.assertEqual(list(json.loads(line))[-1], "worker")

    def test_text_as_before(self) -> None:
        """Text: twistd's line with the worker in the brackets, the same bytes the supervisor wrote."""
        event = self.event()
        old_out = io.StringIO()
        old = textFileLogObserver(old_out)
        old(self.relogged(event, 0))
        line = worker_log_line(event, 0, "text")
        self.assertEqual(line, old_out.getvalue().encode("utf-8"))
        assert line is not None
        self.assertIn(b" [poststack_relay.delivery#warn worker=0] s1 relayed x@example.com {braces} \xc3\xa9\n", line)
        self.assertIsNone(worker_log_line({"log_format": "", "log_time": 0.0}, 0, "text"))

    def test_time_format(self) -> None:
        """The text line uses the supervisor's time format."""
        line = worker_log_line(self.event(), 1, "text", time_format="%Y!")
        assert line is not None
        self.assertTrue(line.startswith(b"2025! [poststack_relay.delivery#warn worker=1] "), line)

    def test_traceback(self) -> None:
        """A failure: JSON has it as "traceback", text indents it under the message, as a single relay does."""
        try:
            1 / 0
        except ZeroDivisionError:
            failure = Failure()
        fields = json.loads(worker_log_line(self.event(log_failure=failure), 1, "json") or b"")
        self.assertIn("ZeroDivisionError", fields["traceback"])
        self.assertEqual((fields["message"], fields["worker"]), ("s1 relayed x@example.com {braces} é", 1))
        text = (worker_log_line(self.event(log_failure=failure), 1, "text") or b"").decode()
        self.assertIn("worker=1] s1 relayed x@example.com {braces} é\n\tTraceback", text)
        self.assertIn("\n\tbuiltins.ZeroDivisionError: division by zero\n", text)
        self.assertTrue(text.endswith("\n"), text)
        self.assertEqual(text.count("\n"), text.count("\n\t") + 1)  # one line for a line reader

    def test_odd_events(self) -> None:
        """Odd values, lone surrogates and a broken format never raise and stay one valid UTF-8 line."""
        odd = self.event(who="\udcff", nan=float("nan"), obj=object(), log_format="{missing} {who}")
        for log_format in ("json", "text"):
            line = worker_log_line(odd, 3, log_format)
            assert line is not None
            line.decode("utf-8")
            self.assertEqual(line.count(b"\n"), 1, line)
            self.assertTrue(line.endswith(b"\n"))
        self.assertEqual(json.loads(worker_log_line(odd, 3, "json") or b"")["worker"], 3)

    def test_observer(self) -> None:
        """The worker's observer hands each finished line on, and survives a writer that fails."""
        lines: list[bytes] = []
        observer = worker_line_observer(1, "json", None, lines.append)
        observer(self.event())
        self.assertEqual(json.loads(lines[0])["worker"], 1)

        def broken(data: bytes) -> None:
            raise OSError("gone")

        worker_line_observer(1, "text", None, broken)(self.event())


@provider(ILogObserver)
def _some_observer(event: dict[str, Any]) -> None:
    """An observer the supervisor does not know."""


class SupervisorLogOutputTests(SynchronousTestCase):
    """Where the supervisor's log goes, from the observer it logs through."""

    def test_descriptor(self) -> None:
        """The relay's text or JSON observer on a descriptor (standard output): workers may write there."""
        path = self.mktemp()
        with open(path, "w") as out:
            for observer, log_format, time_format in (
                (textLineObserver(out), "text", "%Y-%m-%dT%H:%M:%S%z"),
                (textLineObserver(out, timeFormat="%H"), "text", "%H"),
                (jsonLineObserver(out), "json", None),
            ):
                output = supervisor_log_output([observer])
                assert output is not None
                self.assertEqual((output.format, output.fd, output.time_format, output.path),
                                 (log_format, out.fileno(), time_format, None))
            out.write("pending ")  # the observer's own buffered text goes first
            output.write(b"a line\n")
        with open(path) as f:
            self.assertEqual(f.read(), "pending a line\n")

    def test_log_file(self) -> None:
        """A rotating log file: no descriptor but its path; whole lines are written through it, and its size rotation falls between them."""
        log = LogFile.fromFullPath(self.mktemp(), rotateLength=30)
        self.addCleanup(log.close)
        for observer in (textLineObserver(log), jsonLineObserver(log)):
            output = supervisor_log_output([observer])
            assert output is not None
            self.assertEqual((output.fd, output.path), (None, log.path))
        for n in range(10):
            output.write(b"".join(b"line %d.%d\n" % (n, k) for k in range(3)))
        lines = []
        for name in [f"{log.path}.{i}" for i in sorted(log.listLogs(), reverse=True)] + [log.path]:
            with open(name, "rb") as f:
                content = f.read()
            self.assertTrue(content.endswith(b"\n"), name)
            lines += content.splitlines()
        self.assertGreater(len(log.listLogs()), 3)
        self.assertEqual(lines, [b"line %d.%d" % (n, k) for n in range(10) for k in range(3)])

    def test_observer_lock(self) -> None:
        """Through the relay's observers' file, the supervisor writes under the observer's own lock."""
        log = LogFile.fromFullPath(self.mktemp(), rotateLength=None)
        self.addCleanup(log.close)
        for observer in (jsonLineObserver(log), textLineObserver(log)):
            output = supervisor_log_output([observer])
            assert output is not None
            done = threading.Event()
            with observer.lock:  # type: ignore[attr-defined]
                writer = threading.Thread(target=lambda: (output.write(b"x\n"), done.set()), daemon=True)
                writer.start()
                self.assertFalse(done.wait(0.2))
            self.assertTrue(done.wait(10))

    def test_elsewhere(self) -> None:
        """Syslog, a --logger, twist's filter, twistd's own observer, several observers or none: the events are logged again (None)."""
        out = io.StringIO()
        path = self.mktemp()
        with open(path, "w") as real:
            marked_wrong = textLineObserver(real)
            marked_wrong.line_format = "xml"  # type: ignore[attr-defined]
            for observers in (
                [_some_observer],
                [FilteringLogObserver(textLineObserver(real), [LogLevelFilterPredicate()])],
                [textFileLogObserver(real)],  # not the relay's: no mark
                [textLineObserver(real), _some_observer],
                [marked_wrong],
                [],
                [textLineObserver(out)],  # no descriptor
            ):
                self.assertIsNone(supervisor_log_output(observers), observers)


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

    def supervisor(self, count: int = 2, log_output: Optional[LogOutput] = None, **kw: Any) -> Supervisor:
        config = RelayConfig(
            tls_cert="c.pem", port=0, interface="127.0.0.1", hostname="localhost",
            metrics_listen="127.0.0.1:9587", workers=count, **kw,
        )
        supervisor = Supervisor(
            config, MemoryReactor(), spawn=self.spawner, clock=self.clock, notifier=self.notifier,
            observer=None if log_output else self.worker_events.append,
            environ={"PATH": "/bin", "NOTIFY_SOCKET": "/run/n", "POSTSTACK_RELAY_SERVICE_KEY": "sk_live_secret"},
            stop=lambda: self.stops.append(True), log_output=log_output,
        )
        self.addCleanup(supervisor._close_sockets)
        return supervisor

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == name]

    def message(self, worker: int) -> dict[str, Any]:
        """What worker C{worker}'s current process read on its standard input."""
        [line] = self.spawner.last(worker)["process"].written
        value: dict[str, Any] = json.loads(line)
        return value

    def say(self, worker: int, data: bytes, fd: Any = 1) -> None:
        """Worker C{worker}'s current process writes C{data} on C{fd} (a number, "control" or "log")."""
        if fd in ("control", "log"):
            fd = self.message(worker)["control"] if fd == "control" else self.message(worker)["log"]["pipe"]
        self.spawner.last(worker)["protocol"].childDataReceived(fd, data)

    def ready(self, worker: int, metrics: str = "127.0.0.1:9587") -> None:
        """Worker C{worker}'s current process says it is ready on its control pipe."""
        self.say(worker, ready_line(2000 + worker, ["127.0.0.1:465"], metrics), "control")

    def ready_event(self, metrics: str = "127.0.0.1:9587") -> bytes:
        """The JSON line of a worker_ready log event, as a worker logs it."""
        line = json.dumps({"time": "2025-06-01T12:00:00.000Z", "level": "info", "namespace": "poststack_relay.workers",
                           "event": "worker_ready", "message": "ready", "metrics": metrics})
        return line.encode() + b"\n"

    def end(self, worker: int, reason: Any = None) -> None:
        self.spawner.last(worker)["protocol"].processEnded(Failure(reason or ProcessTerminated(signal=9)))

    def test_start(self) -> None:
        """Each worker gets the shared socket as fd 3, the environment without NOTIFY_SOCKET or the service key, and its settings and the version on stdin."""
        supervisor = self.supervisor()
        supervisor.privilegedStartService()
        port = bound_port(supervisor.sockets[0])
        self.assertEqual(self.spawner.calls, [])  # binding only: twistd drops privileges next
        supervisor.startService()
        self.assertEqual(len(self.spawner.calls), 2)
        for index, call in enumerate(self.spawner.calls):
            # 4: the control pipe, 5: the log pipe.
            self.assertEqual(call["childFDs"], {0: "w", 1: "r", 2: "r", 3: supervisor.sockets[0], 4: "r", 5: "r"})
            self.assertEqual(call["env"], {"PATH": "/bin"})
            self.assertEqual(call["args"][-4:], ["--worker", str(index), "--fds", "3"])
            [line] = call["process"].written
            self.assertTrue(line.endswith(b"\n"))
            message = json.loads(line)
            settings = message["settings"]
            self.assertEqual((settings["workers"], settings["metrics_listen"]), (1, f"127.0.0.1:{9587 + index}"))
            self.assertEqual(message["version"], poststack_relay.__version__)
            # Given an observer, the supervisor logs the workers' events again.
            self.assertEqual((message["control"], message["log"]), (4, {"mode": "events", "pipe": 5}))
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
        """READY=1 goes to systemd once, when the last worker is ready, not again after a restart: then only STATUS= changes."""
        supervisor = self.supervisor()
        supervisor.startService()
        self.ready(0)
        self.end(1, ProcessTerminated(exitCode=1))  # before READY=1: no STATUS= either
        self.clock.advance(1)
        self.assertEqual(self.notifier.sent, [])
        self.ready(1, "127.0.0.1:9588")
        where = supervisor.addresses[0]
        self.assertEqual(self.notifier.sent, [f"READY=1\nSTATUS=2 workers listening on {where}"])
        self.assertEqual(self.named("workers_ready")[0]["metrics"], ["127.0.0.1:9587", "127.0.0.1:9588"])
        self.end(0)
        self.clock.advance(1)
        self.ready(0)
        self.assertEqual(self.notifier.sent[1:], [
            f"STATUS=1 of 2 workers listening on {where}; worker 0 restarting",
            f"STATUS=2 workers listening on {where}",
        ])
        self.assertFalse(any("READY=1" in sent for sent in self.notifier.sent[1:]))
        self.assertEqual(self.worker_events, [])  # a control line is not a log event

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
        """reload_tls (what SIGHUP calls) sends SIGHUP to every ready worker; one waiting for its restart gets none."""
        supervisor = self.supervisor(count=3)
        supervisor.startService()
        self.ready(0)
        self.ready(1)
        self.end(2)
        self.assertTrue(supervisor.reload_tls("SIGHUP"))
        self.assertEqual([self.spawner.last(i)["process"].signals for i in range(3)], [["HUP"], ["HUP"], []])
        [reload] = self.named("workers_reload")
        self.assertEqual((reload["workers"], reload["held"]), ([0, 1], []))
        self.assertEqual(formatEvent(reload), "SIGHUP passed on to 2 workers")
        self.clock.advance(1)
        self.ready(2)
        self.assertEqual(self.spawner.last(2)["process"].signals, [])  # its new process loaded the files itself

    def test_sighup_held_until_ready(self) -> None:
        """A worker still starting (no SIGHUP handler yet) gets no SIGHUP until it says it is ready, then exactly one; a restart forgets it."""
        supervisor = self.supervisor(count=2)
        supervisor.startService()
        self.ready(0)
        supervisor.reload_tls("SIGHUP")
        supervisor.reload_tls("SIGHUP")
        self.assertEqual(self.spawner.last(0)["process"].signals, ["HUP", "HUP"])
        self.assertEqual(self.spawner.last(1)["process"].signals, [])
        self.assertEqual(formatEvent(self.named("workers_reload")[0]), "SIGHUP passed on to 1 workers; held for worker 1 until ready")
        self.assertEqual(self.named("workers_reload")[0]["held"], [1])
        self.ready(1)
        self.assertEqual(self.spawner.last(1)["process"].signals, ["HUP"])
        self.assertEqual(self.named("workers_reload")[-1]["workers"], [1])
        self.ready(1)  # a second ready line changes nothing
        self.assertEqual(self.spawner.last(1)["process"].signals, ["HUP"])
        # Held, then the process dies: its replacement loads the files anew and gets none.
        self.end(1)
        self.clock.advance(1)
        supervisor.reload_tls("SIGHUP")
        first = self.spawner.last(1)["process"]
        self.end(1)
        self.clock.advance(2)
        self.assertIsNot(self.spawner.last(1)["process"], first)
        self.ready(1)
        self.assertEqual(self.spawner.last(1)["process"].signals, [])
        self.assertEqual(first.signals, [])

    def test_output(self) -> None:
        """Fallback: JSON lines on the log pipe are told again with the worker's number, across chunks; anything else as worker_output."""
        supervisor = self.supervisor()
        supervisor.startService()
        line = json.dumps({"time": "2025-06-01T12:00:00.250Z", "level": "error", "namespace": "poststack_relay.api",
                           "event": "api_timeout", "message": "API timed out {x}", "attempt": 2})
        self.say(1, line[:10].encode(), "log")
        self.assertEqual(self.worker_events, [])
        self.say(1, line[10:].encode() + b"\nnot json\n", "log")
        self.say(1, line.encode() + b"\n", 1)  # on its standard output even JSON is a stray line
        self.say(0, b"Traceback (most recent call last):\n  File", fd=2)
        self.end(0)  # the unterminated line comes out too
        first, second, third, fourth, fifth = self.worker_events
        self.assertEqual((formatEvent(first), first["event"], first["attempt"], first["worker"], first["log_level"]),
                         ("API timed out {x}", "api_timeout", 2, 1, LogLevel.error))
        self.assertEqual(formatEvent(second), "worker 1 log: not json")
        self.assertEqual((third["event"], third["stream"], third["worker"]), ("worker_output", "stdout", 1))
        self.assertEqual(formatEvent(fourth), "worker 0 stderr: Traceback (most recent call last):")
        self.assertEqual(formatEvent(fifth), "worker 0 stderr:   File")

    def test_ready_only_on_the_control_pipe(self) -> None:
        """A worker_ready log event (or its text) on the log pipe or stdout is logged, never taken as ready; a bad control line is reported."""
        supervisor = self.supervisor(count=1)
        supervisor.startService()
        self.say(0, self.ready_event(), "log")
        self.say(0, self.ready_event(), 1)
        self.say(0, b"ready " + self.ready_event(), 2)
        self.say(0, b'{"event": "worker_ready"}\n', "control")
        self.clock.advance(1)
        self.assertEqual((self.notifier.sent, supervisor.slots[0].ready), ([], False))
        self.assertEqual([e["event"] for e in self.worker_events], ["worker_ready", "worker_output", "worker_output", "worker_output"])
        self.assertEqual(self.worker_events[-1]["stream"], "control")
        self.ready(0)
        self.assertEqual(len(self.notifier.sent), 1)
        self.assertEqual(supervisor.slots[0].metrics, "127.0.0.1:9587")

    def test_ready_from_a_replaced_process(self) -> None:
        """A ready line read after its process ended does not make the worker's next process ready."""
        supervisor = self.supervisor(count=1)
        supervisor.startService()
        old = self.spawner.last(0)["protocol"]
        control = self.message(0)["control"]
        self.end(0)
        self.clock.advance(1)
        old.childDataReceived(control, ready_line(1, [], None))
        self.assertEqual((self.notifier.sent, supervisor.slots[0].ready), ([], False))

    def test_lines_passed_through(self) -> None:
        """Logging to a file: workers send finished lines, written through in whole-line chunks, never parsed; stderr is still told."""
        written: list[bytes] = []
        supervisor = self.supervisor(log_output=LogOutput("text", written.append, None, "%H"))
        supervisor.startService()
        call = self.spawner.last(0)
        self.assertEqual(call["childFDs"], {0: "w", 1: "r", 2: "r", 3: supervisor.sockets[0], 4: "r", 5: "r"})
        self.assertEqual(self.message(0)["log"], {"mode": "lines", "format": "text", "time_format": "%H", "pipe": 5, "direct": None, "path": None})
        self.say(0, b"12 [x#info worker=0] one\n12 [x#info worker=0] tw", "log")
        self.say(0, b"o\n" + self.ready_event(), "log")
        self.say(1, b"12 [x#info worker=1] par", "log")
        self.say(0, b"oops\n", 2)
        self.assertEqual(written, [b"12 [x#info worker=0] one\n", b"12 [x#info worker=0] two\n" + self.ready_event()])
        self.assertEqual(self.notifier.sent, [])  # the READY event's text did not count
        self.end(1)  # a worker that died mid-line: its partial line ends the chunk
        self.assertEqual(written[2:], [b"12 [x#info worker=1] par\n"])
        self.assertEqual([(e["event"], e["line"]) for e in self.events if e.get("event") == "worker_output"], [("worker_output", "oops")])

    def test_direct(self) -> None:
        """Logging to a descriptor: each worker gets it as one more descriptor and writes there; only long lines come through the supervisor."""
        written: list[bytes] = []
        supervisor = self.supervisor(log_output=LogOutput("json", written.append, 1, None))
        supervisor.startService()
        for index in (0, 1):
            call = self.spawner.last(index)
            self.assertEqual(call["childFDs"], {0: "w", 1: "r", 2: "r", 3: supervisor.sockets[0], 4: "r", 5: "r", 6: 1})
            self.assertEqual(self.message(index)["log"], {"mode": "lines", "format": "json", "time_format": None, "pipe": 5, "direct": 6, "path": None})
        self.say(0, b'{"long": "line"}\n', "log")
        self.assertEqual(written, [b'{"long": "line"}\n'])

    def test_finds_its_log(self) -> None:
        """Without an observer or a log output, the supervisor takes the observer its LogObserverService parent made, once, and says what it chose."""
        config = RelayConfig(tls_cert="c.pem", port=0, interface="127.0.0.1", hostname="localhost", workers=2)
        log = LogFile.fromFullPath(self.mktemp(), rotateLength=None)
        self.addCleanup(log.close)
        supervisor = Supervisor(config, MemoryReactor(), spawn=self.spawner, clock=self.clock, notifier=self.notifier,
                                environ={}, stop=lambda: None)
        self.addCleanup(supervisor._close_sockets)
        wrapper = LogObserverService(supervisor, lambda: jsonLineObserver(log))
        wrapper.setServiceParent(Application("relay"))  # what twistd does: it sets the application's observer
        self.assertIs(supervisor.parent, wrapper)
        supervisor.startService()
        self.assertEqual(self.message(0)["log"], {"mode": "lines", "format": "json", "time_format": None, "pipe": 5,
                                                  "direct": None, "path": log.path})
        self.assertEqual([(e["mode"], e["line_format"]) for e in self.named("workers_logging")], [("through", "json")])
        self.end(0)
        self.clock.advance(1)
        self.assertEqual(len(self.named("workers_logging")), 1)

    def test_logs_elsewhere(self) -> None:
        """Without such a parent (twist, embedding) or when it made no observer (--syslog, --logger), the workers' events are logged again."""
        config = RelayConfig(tls_cert="c.pem", port=0, interface="127.0.0.1", hostname="localhost", workers=2)
        for parent in (None, LogObserverService(Service(), lambda: None)):
            self.events.clear()
            supervisor = Supervisor(config, MemoryReactor(), spawn=self.spawner, clock=self.clock,
                                    notifier=self.notifier, environ={}, stop=lambda: None)
            self.addCleanup(supervisor._close_sockets)
            if parent is not None:
                supervisor.setServiceParent(parent)
                parent.setServiceParent(Application("relay"))
            supervisor.startService()
            self.assertEqual(self.message(0)["log"]["mode"], "events")
            self.assertEqual([(e["mode"], e["line_format"]) for e in self.named("workers_logging")], [("events", "json")])

    def test_degraded_after_ready(self) -> None:
        """After READY=1, a worker that keeps failing to start leaves the others serving: workers_degraded once, retries every 30 s, STATUS= says so until it is ready again."""
        supervisor = self.supervisor()
        supervisor.startService()
        self.ready(0)
        self.ready(1)
        where = supervisor.addresses[0]
        self.clock.advance(100)
        self.end(0)  # a crash of a ready worker
        for _ in range(6):
            self.clock.advance(self.named("worker_exited")[-1]["restart_in"])
            self.end(0, ProcessTerminated(exitCode=1))  # then it cannot start again
        self.assertEqual((self.stops, supervisor.exit_status), ([], 0))
        self.assertEqual(self.spawner.last(1)["process"].signals, [])  # the healthy worker is left alone
        [degraded] = self.named("workers_degraded")
        self.assertEqual((degraded["worker"], degraded["failures"], degraded["status"], degraded["log_level"]),
                         (0, 3, "exit status 1", LogLevel.critical))
        self.assertEqual([e["restart_in"] for e in self.named("worker_exited")], [1.0, 2.0, 4.0, 30.0, 30.0, 30.0, 30.0])
        self.assertEqual(self.notifier.sent[-1],
                         f"STATUS=degraded: 1 of 2 workers listening on {where}; worker 0 cannot start (exit status 1)")
        self.assertEqual(self.named("workers_failed"), [])
        spawned = len(self.spawner.of(0))
        self.clock.advance(30)
        self.assertEqual(len(self.spawner.of(0)), spawned + 1)  # still tried
        self.ready(0)
        self.assertEqual(self.notifier.sent[-1], f"STATUS=2 workers listening on {where}")
        [recovered] = self.named("worker_recovered")
        self.assertEqual((recovered["worker"], recovered["failures"]), (0, 6))
        self.clock.advance(100)
        self.end(0)
        self.assertEqual(self.named("worker_exited")[-1]["restart_in"], 1.0)  # back to the usual backoff

    def test_version_changed_after_ready(self) -> None:
        """After READY=1, a worker that finds another installed version is not started again, is not a start failure, and STATUS= asks for a restart."""
        supervisor = self.supervisor()
        supervisor.startService()
        self.ready(0)
        self.ready(1)
        where = supervisor.addresses[0]
        self.end(1)
        self.clock.advance(1)
        self.end(1, ProcessTerminated(exitCode=workers.VERSION_CHANGED_EXIT))
        [changed] = self.named("worker_version_changed")
        self.assertEqual((changed["worker"], changed["log_level"], changed["version"]),
                         (1, LogLevel.critical, poststack_relay.__version__))
        self.assertIn("installed version changed: restart the service", formatEvent(changed))
        self.assertEqual(self.notifier.sent[-1], f"STATUS=degraded: 1 of 2 workers listening on {where}; "
                                                 "worker 1 stopped: installed version changed, restart the service")
        self.clock.advance(600)
        self.assertEqual(len(self.spawner.of(1)), 2)  # not started again
        self.assertEqual((self.stops, supervisor.exit_status, supervisor.slots[1].start_failures), ([], 0, 0))

    def test_version_changed_before_ready(self) -> None:
        """Before READY=1, a worker that finds another installed version stops the relay at once with status 1."""
        supervisor = self.supervisor()
        supervisor.startService()
        self.ready(0)
        self.end(1, ProcessTerminated(exitCode=workers.VERSION_CHANGED_EXIT))
        self.assertEqual((self.stops, supervisor.exit_status), ([True], 1))
        self.assertEqual(self.named("worker_version_changed")[0]["action"], "stopping the relay")
        self.assertEqual(self.named("workers_failed"), [])
        self.clock.advance(60)
        self.assertEqual(len(self.spawner.of(1)), 1)


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
    if alive(pid) and b"worker_main()" in command:
        os.kill(pid, signal.SIGKILL)


class WorkerCommandTests(SynchronousTestCase):
    """The command that starts a worker, run as a real process without a supervisor."""

    def run_worker(self, cwd: str, pythonpath: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        executable, args = worker_command(0, [3])
        env = dict(os.environ, PYTHONPATH=pythonpath)
        return subprocess.run(args, executable=executable, cwd=cwd, env=env, input=stdin, capture_output=True, timeout=60)

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
        """A worker given another version's message logs a critical line and exits with VERSION_CHANGED_EXIT."""
        message = {"version": "0.0.0+other", "settings": {}, "control": None, "log": {"mode": "events", "pipe": 1}}
        result = self.run_worker(self.mktemp_dir(), ROOT, json.dumps(message).encode() + b"\n")
        self.assertEqual(result.returncode, workers.VERSION_CHANGED_EXIT, result.stderr)
        [line] = [json.loads(line) for line in result.stdout.splitlines()]
        self.assertEqual((line["event"], line["level"], line["installed"], line["version"], line["worker"]),
                         ("worker_version_mismatch", "critical", poststack_relay.__version__, "0.0.0+other", 0))
        self.assertIn("installed version changed: restart the service", line["message"])
        # A message it cannot even read: the same status if its version differs, 2 if not.
        unreadable = {"version": "0.0.0+other", "settings": []}
        result = self.run_worker(self.mktemp_dir(), ROOT, json.dumps(unreadable).encode() + b"\n")
        self.assertEqual(result.returncode, workers.VERSION_CHANGED_EXIT, result.stderr)
        self.assertIn(b"installed version changed: restart the service", result.stderr)
        unreadable["version"] = poststack_relay.__version__
        result = self.run_worker(self.mktemp_dir(), ROOT, json.dumps(unreadable).encode() + b"\n")
        self.assertEqual(result.returncode, 2, result.stderr)

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
        notify = _receiver(self.dir)
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
        statuses = _pending(notify)
        # READY=1 only once; the restarts are told in STATUS= alone.
        self.assertIn(f"STATUS=1 of 2 workers listening on 127.0.0.1:{self.port}; worker 0 restarting".encode(), statuses)
        self.assertTrue(all(m.startswith(b"STATUS=") for m in statuses), statuses)

        # SIGTERM to the supervisor: every worker stops, status 0, the port closes.
        began = time.monotonic()
        relay.send_signal(signal.SIGTERM)
        self.assertEqual(relay.wait(timeout=30), 0, self.output("relay")[-3000:])
        self.assertLess(time.monotonic() - began, 15)
        statuses += _pending(notify)
        self.assertEqual(statuses[-2:], [f"STATUS=2 workers listening on 127.0.0.1:{self.port}".encode(),
                                         b"STOPPING=1\nSTATUS=stopping"])
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
