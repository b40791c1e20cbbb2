"""
Tests for the relay's logs (L{poststack_relay.logs} and the
C{smtp_transaction} event of L{poststack_relay.delivery}): the JSON line
observer, its wiring into twistd and twist, the fields of a transaction,
the documentation of the event vocabulary, and real C{twistd} processes
whose whole output is checked for format and secrets.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import smtplib
import ssl
import subprocess
import sys
from typing import Any, Optional

from twisted.application.service import Application, IService, MultiService, Service
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import (
    ILogObserver,
    LogEvent,
    LogLevel,
    Logger,
    capturedLogs,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
)
from twisted.python import log as legacy_log
from twisted.python.failure import Failure
from twisted.scripts.twistd import ServerOptions
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import provider

import twisted.internet
from poststack_relay import tap
from poststack_relay.api import APIError
from poststack_relay.auth import Identity
from poststack_relay.delivery import (
    IDEMPOTENCY_CLIENT,
    IDEMPOTENCY_DERIVED,
    IDEMPOTENCY_RANDOM,
    SENDER_REFUSED_EVENT,
    SENDER_REFUSED_FIELDS,
    TRANSACTION_EVENT,
    TRANSACTION_FIELDS,
    RelayDelivery,
)
from poststack_relay.logs import (
    TOP_FIELDS,
    JSONLogService,
    LogObserverService,
    TimeStamps,
    classic_text,
    event_as_json,
    jsonLineObserver,
    textLineObserver,
    twistd_json_observer,
    use_json_logs,
)
from poststack_relay.replies import Reply
from poststack_relay.service import RelayService
from poststack_relay.testing import MemoryEmailAPI, write_certificate
from poststack_relay.translate import Envelope
from tests.common.keys import FULL_KEY, MAILBOX, SERVICE_KEY, forms
from tests.common.processes import DATA, ROOT, TWISTD, free_port, stop_process, wait_for_port

TIME = re.compile(r"\A\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\Z")
SECRET_KEY = "sk_test_never_logged_0123456789"
KEY_IDENTITY = Identity("api_key", SECRET_KEY, None, "sk_test_ne\N{HORIZONTAL ELLIPSIS}", b"", "key:abc")
MAILBOX_IDENTITY = Identity("mailbox", SECRET_KEY, "alice@yourdomain.com", "alice@yourdomain.com", b"", "mailbox:alice")
ENVELOPE = Envelope("you@yourdomain.com", ("a@example.com", "b@example.com", "c@example.com"))


def lines_of(out: io.StringIO) -> list[dict[str, Any]]:
    """Each line of C{out}, parsed as JSON."""
    text = out.getvalue()
    assert text.endswith("\n"), text
    return [json.loads(line) for line in text.splitlines()]


def message(extra: bytes = b"", sender: bytes = b"you@yourdomain.com") -> bytes:
    return (
        b"From: " + sender + b"\r\nTo: a@example.com\r\nSubject: s\r\n" + extra + b"\r\nhello\r\n"
    )


class ObserverTests(SynchronousTestCase):
    """L{jsonLineObserver}: one flat JSON object per event and line, whatever the event holds."""

    def setUp(self) -> None:
        self.out = io.StringIO()
        self.observer = jsonLineObserver(self.out)

    def test_provides_interface(self) -> None:
        """The observer is an ILogObserver (twistd's AppLogger requires it)."""
        self.assertTrue(ILogObserver.providedBy(self.observer))

    def test_top_fields(self) -> None:
        """time (UTC, milliseconds), level, namespace, event and the formatted message come first, in order."""
        self.observer(
            {
                "log_time": 1700000000.1239,
                "log_level": LogLevel.warn,
                "log_namespace": "poststack_relay.smtp",
                "log_format": "hello {who}",
                "event": "greeting",
                "who": "world",
            }
        )
        [line] = lines_of(self.out)
        self.assertEqual(list(line)[:5], list(TOP_FIELDS))
        self.assertEqual(
            line,
            {
                "time": "2023-11-14T22:13:20.123Z",
                "level": "warn",
                "namespace": "poststack_relay.smtp",
                "event": "greeting",
                "message": "hello world",
                "who": "world",
            },
        )
        self.assertNotIn("\x1e", self.out.getvalue())

    def test_one_line_per_event(self) -> None:
        """Each event is exactly one line, even with newlines in its values; log_* keys are left out."""
        logger = Logger(namespace="n", observer=self.observer)
        logger.info("first {x}", x="two\nlines", event="a")
        logger.error("second", event="b")
        logger.info("third, no event")
        lines = lines_of(self.out)
        self.assertEqual(len(self.out.getvalue().splitlines()), 3)
        self.assertEqual([line["event"] for line in lines], ["a", "b", None])
        self.assertEqual([line["level"] for line in lines], ["info", "error", "info"])
        self.assertEqual(lines[0]["message"], "first two\nlines")
        self.assertEqual(lines[0]["x"], "two\nlines")
        for line in lines:
            self.assertTrue(TIME.match(line["time"]), line["time"])
            self.assertEqual(line["namespace"], "n")
            self.assertFalse([k for k in line if k.startswith("log_")])

    def test_odd_values(self) -> None:
        """Bytes, surrogates, NaN, sets, nested and self-containing containers and unprintable objects all become JSON."""

        class Unprintable:
            def __str__(self) -> str:
                raise RuntimeError("no str")

            def __repr__(self) -> str:
                raise RuntimeError("no repr")

        loop: list[Any] = [1]
        loop.append(loop)
        self.observer(
            {
                "log_format": "odd",
                "log_time": 0.0,
                "raw": b"ok \xff\xfe",
                "surrogate": "a\udcffb",
                "nan": float("nan"),
                "inf": float("inf"),
                "big": 10**30,
                "tags": frozenset(["x"]),
                "nested": {1: (b"b", None, True), "k": {"deeper": [1.5]}},
                "loop": loop,
                "unprintable": Unprintable(),
                "object": Reply(250, "2.0.0", "Ok"),
            }
        )
        [line] = lines_of(self.out)
        self.assertEqual(line["raw"], "ok \\xff\\xfe")
        self.assertEqual(line["surrogate"], "a\\udcffb")
        self.assertEqual(line["nan"], "nan")
        self.assertEqual(line["inf"], "inf")
        self.assertEqual(line["big"], 10**30)
        self.assertEqual(line["tags"], ["x"])
        self.assertEqual(line["nested"], {"1": ["b", None, True], "k": {"deeper": [1.5]}})
        self.assertEqual(line["loop"][0], 1)
        self.assertEqual(line["unprintable"], "<unprintable Unprintable>")
        self.assertEqual(line["object"], str(Reply(250, "2.0.0", "Ok")))
        self.assertEqual(line["time"], "1970-01-01T00:00:00.000Z")

    def test_reserved_names(self) -> None:
        """An event field named like a top field keeps its value under field_<name>."""
        self.observer({"log_format": "m", "log_time": 0.0, "message": "mine", "time": 5, "level": "x"})
        [line] = lines_of(self.out)
        self.assertEqual(line["message"], "m")
        self.assertEqual(line["time"], "1970-01-01T00:00:00.000Z")
        self.assertEqual((line["field_message"], line["field_time"], line["field_level"]), ("mine", 5, "x"))

    def test_failure_traceback(self) -> None:
        """Logger.failure gives the message and the failure's whole traceback as a string."""
        logger = Logger(namespace="n", observer=self.observer)
        try:
            1 / 0
        except ZeroDivisionError:
            logger.failure("it broke in {where}", where="here", event="boom")
        [line] = lines_of(self.out)
        self.assertEqual((line["level"], line["event"], line["message"]), ("critical", "boom", "it broke in here"))
        self.assertIn("Traceback", line["traceback"])
        self.assertIn("ZeroDivisionError", line["traceback"])
        self.assertIn("1 / 0", line["traceback"])

    def test_legacy_events(self) -> None:
        """twisted.python.log events: text as message, log.err's traceback in traceback, not repeated in message."""
        publisher_events: list[LogEvent] = []
        with capturedLogs() as events:
            legacy_log.msg("hello %s", "there", system="proto,1")
            legacy_log.err(Failure(ZeroDivisionError("zero")), "why it failed")
            publisher_events.extend(events)
        self.flushLoggedErrors(ZeroDivisionError)
        for event in publisher_events:
            self.observer(event)
        first, second = lines_of(self.out)
        self.assertEqual(first["message"], "hello %s there")
        self.assertEqual(first["system"], "proto,1")
        self.assertNotIn("isError", first)
        self.assertNotIn("field_message", first)
        self.assertEqual(second["message"], "why it failed")
        self.assertEqual(second["level"], "critical")
        self.assertIn("ZeroDivisionError: zero", second["traceback"])
        self.assertNotIn("failure", second)

    def test_unformattable_event(self) -> None:
        """A broken format string still gives a JSON line, with Twisted's 'Unable to format' text."""
        self.observer({"log_format": "{broken", "log_time": 0.0, "x": 1})
        [line] = lines_of(self.out)
        self.assertIn("Unable to format event", line["message"])
        self.assertEqual(line["x"], 1)

    def test_unconvertible_event(self) -> None:
        """An event that cannot be read at all is replaced by a log_unwritable line; nothing raises."""

        class Hostile(dict):  # type: ignore[type-arg]
            def items(self) -> Any:
                raise RuntimeError("hostile")

        self.observer(Hostile(log_format="x", log_time=0.0))
        [line] = lines_of(self.out)
        self.assertEqual((line["event"], line["level"]), ("log_unwritable", "error"))
        self.assertIn("hostile", line["message"])

    def test_broken_file_never_raises(self) -> None:
        """A file that refuses writes loses the line; the observer does not raise."""

        class Broken(io.StringIO):
            def write(self, text: str) -> int:
                raise OSError("disk full")

        observer = jsonLineObserver(Broken())
        observer({"log_format": "x", "log_time": 0.0})

    def test_ascii_file(self) -> None:
        """A file that cannot encode non-ASCII text gets the line with JSON escapes instead."""
        raw = io.BytesIO()
        out = io.TextIOWrapper(raw, encoding="ascii")
        observer = jsonLineObserver(out)
        observer({"log_format": "caf\N{LATIN SMALL LETTER E WITH ACUTE}", "log_time": 0.0})
        out.flush()
        [line] = raw.getvalue().decode("ascii").splitlines()
        self.assertEqual(json.loads(line)["message"], "caf\N{LATIN SMALL LETTER E WITH ACUTE}")

    def test_event_as_json_leaves_event_alone(self) -> None:
        """Converting an event does not change it (other observers see it too)."""
        event = {"log_format": "x", "log_time": 0.0, "data": [b"a"], "message": "m"}
        before = dict(event)
        event_as_json(event)
        self.assertEqual(event, before)


class TwistdObserverTests(SynchronousTestCase):
    """L{twistd_json_observer} writes where twistd would write its text."""

    def line_from(self, observer: Optional[ILogObserver]) -> None:
        assert observer is not None
        observer({"log_format": "to {where}", "where": "here", "log_time": 0.0, "event": "e"})

    def keep_sigusr1(self) -> None:
        before = signal.getsignal(signal.SIGUSR1)
        self.addCleanup(signal.signal, signal.SIGUSR1, before)
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)

    def test_nodaemon_stdout(self) -> None:
        """twistd -n without --logfile, and --logfile - with -n: standard output."""
        for options in ({"nodaemon": True}, {"nodaemon": True, "logfile": "-"}):
            out = io.StringIO()
            self.patch(sys, "stdout", out)
            self.line_from(twistd_json_observer(options))
            [line] = lines_of(out)
            self.assertEqual(line["message"], "to here")

    def test_daemon_stdout_refused(self) -> None:
        """--logfile - without -n is refused as twistd refuses it."""
        with self.assertRaises(SystemExit) as e:
            twistd_json_observer({"nodaemon": False, "logfile": "-"})
        self.assertIn("Daemons cannot log to stdout", str(e.exception))

    def test_logfile(self) -> None:
        """--logfile PATH: the lines go to that file, and SIGUSR1 is set to rotate it."""
        self.keep_sigusr1()
        path = os.path.abspath(self.mktemp())
        self.line_from(twistd_json_observer({"nodaemon": True, "logfile": path}))
        with open(path) as f:
            [line] = [json.loads(text) for text in f.read().splitlines()]
        self.assertEqual(line["event"], "e")
        self.assertTrue(callable(signal.getsignal(signal.SIGUSR1)))

    def test_daemon_default_file(self) -> None:
        """A daemon without --logfile writes twistd.log in the current directory, as twistd."""
        self.keep_sigusr1()
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(directory)
        self.line_from(twistd_json_observer({"nodaemon": False, "logfile": None}))
        with open(os.path.join(directory, "twistd.log")) as f:
            self.assertEqual(json.loads(f.read())["message"], "to here")

    def test_syslog_and_logger_kept(self) -> None:
        """--syslog or --logger: twistd's own choice stays (no JSON observer)."""
        self.assertIsNone(twistd_json_observer({"nodaemon": True, "syslog": True}))
        self.assertIsNone(twistd_json_observer({"nodaemon": True, "logger": "my.observer"}))


@provider(ILogObserver)
def _ignore(event: LogEvent) -> None:
    """An observer that drops events."""


class JSONLogServiceTests(SynchronousTestCase):
    """L{JSONLogService} sets the application's ILogObserver, which twistd's AppLogger uses."""

    def test_sets_component(self) -> None:
        """Added to an application, it sets the observer, joins it, and runs the wrapped service."""
        inner = Service()
        wrapper = JSONLogService(inner, lambda: _ignore)
        application = Application("t")
        wrapper.setServiceParent(application)
        self.assertIs(application.getComponent(ILogObserver), _ignore)
        self.assertEqual(list(IService(application)), [wrapper])
        self.assertIs(wrapper.service, inner)
        wrapper.startService()
        self.assertTrue(inner.running)
        wrapper.stopService()
        self.assertFalse(inner.running)

    def test_keeps_existing_component(self) -> None:
        """An application that already has an observer keeps it; so does one whose factory gives None."""
        application = Application("t")

        @provider(ILogObserver)
        def mine(event: LogEvent) -> None:
            """The application's own."""

        application.setComponent(ILogObserver, mine)
        JSONLogService(Service(), lambda: _ignore).setServiceParent(application)
        self.assertIs(application.getComponent(ILogObserver), mine)
        bare = Application("u")
        JSONLogService(Service(), lambda: None).setServiceParent(bare)
        self.assertIsNone(bare.getComponent(ILogObserver, None))

    def test_plain_parent(self) -> None:
        """Under a parent that is not an application it just joins."""
        parent = MultiService()
        wrapper = JSONLogService(Service(), lambda: _ignore)
        wrapper.setServiceParent(parent)
        self.assertEqual(list(parent), [wrapper])

    def test_twist_options(self) -> None:
        """Under twist the observer factory in twist's options becomes jsonLineObserver; the service is unwrapped."""
        inner = Service()
        twist_options: dict[str, Any] = {"fileLogObserverFactory": None, "logFile": io.StringIO()}
        self.assertIs(use_json_logs(inner, twist_options), inner)
        self.assertIs(twist_options["fileLogObserverFactory"], jsonLineObserver)


class MakeServiceTests(SynchronousTestCase):
    """C{tap.makeService} wires the chosen log format."""

    def make(self, args: list[str], parent: Any) -> tuple[Any, MemoryReactorClock]:
        reactor = MemoryReactorClock()
        reactor.running = False
        self.patch(twisted.internet, "reactor", reactor)
        cert, key = write_certificate(os.path.abspath(self.mktemp()))
        options = tap.Options(environ={})
        options.parseOptions(["--tls-cert", cert, "--tls-key", key, "--port", "0", *args])
        options.parent = parent
        return tap.makeService(options), reactor

    def test_json_under_twistd(self) -> None:
        """--log-format json under twistd: a JSONLogService around the RelayService; SIGHUP still reaches the relay."""
        server_options = ServerOptions()
        server_options["nodaemon"] = True
        service, reactor = self.make(["--log-format", "json"], server_options)
        self.assertIsInstance(service, JSONLogService)
        self.assertIsInstance(service.service, RelayService)
        self.assertIn((tap.reload_tls_on_sighup, (reactor, service.service), {}), reactor.whenRunningHooks)
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        application = Application("poststack-relay")
        service.setServiceParent(application)
        observer = application.getComponent(ILogObserver)
        observer({"log_format": "hi", "log_time": 0.0})
        self.assertEqual(lines_of(out)[0]["message"], "hi")

    def test_text_under_twistd(self) -> None:
        """The default text format: the relay's text observer around the RelayService, writing twistd's own lines."""
        server_options = ServerOptions()
        server_options["nodaemon"] = True
        service, reactor = self.make([], server_options)
        self.assertIsInstance(service, LogObserverService)
        self.assertIsInstance(service.service, RelayService)
        self.assertIn((tap.reload_tls_on_sighup, (reactor, service.service), {}), reactor.whenRunningHooks)
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        application = Application("poststack-relay")
        service.setServiceParent(application)
        observer = application.getComponent(ILogObserver)
        event = {"log_format": "hi", "log_time": 0.0, "log_namespace": "n", "log_level": LogLevel.info}
        observer(event)
        self.assertEqual(out.getvalue(), formatEventAsClassicLogText(event))

    def test_text_under_twist(self) -> None:
        """Under twist the text observer becomes twist's file observer factory, the service is the relay itself."""
        twist_options = {"fileLogObserverFactory": None}
        service, _ = self.make([], twist_options)
        self.assertIsInstance(service, RelayService)
        self.assertIs(twist_options["fileLogObserverFactory"], textLineObserver)


class TextLineTests(SynchronousTestCase):
    """
    L{textLineObserver}, L{classic_text} and L{TimeStamps}: exactly
    twistd's text lines (C{formatEventAsClassicLogText}), made for less.
    """

    def events(self) -> list[LogEvent]:
        captured: list[LogEvent] = []
        log = Logger(namespace="poststack_relay.x", observer=captured.append)
        log.info("s1 relayed client=203.0.113.9 size=10 reply=250 2.0.0")
        log.info("{session} auth ok user={user}", session="s2", user="a@b")
        log.info("braces {{as text}} and {n}", n=3)
        log.info("two\nlines")
        log.warn("{value!r}", value=[1, "x"])
        log.info("missing {field}")
        log.info("")
        try:
            1 / 0
        except ZeroDivisionError:
            log.failure("crashed")
        legacy: list[LogEvent] = []
        legacy_log.addObserver(legacy.append)
        try:
            legacy_log.msg("legacy message", system="HTTP11ClientProtocol,client")
        finally:
            legacy_log.removeObserver(legacy.append)
        captured.extend(e for e in legacy if "log_format" in e or "format" in e)
        captured += [
            {"log_format": "own system", "log_system": "mine", "log_time": 1700000000.25},
            {"log_format": b"bytes format", "log_time": 1700000000.0},
            {"log_format": "no time"},
            {"log_format": "int time", "log_time": 1700000000},
            {"log_time": 1700000000.0},
        ]
        return captured

    def test_same_as_twistd(self) -> None:
        """Each event gives the same line as twistd's own text formatter, including None for no text."""
        stamp = TimeStamps()
        events = self.events()
        self.assertGreater(len(events), 12)
        for event in events:
            self.assertEqual(classic_text(event, stamp), formatEventAsClassicLogText(event), event)

    def test_time_kept_for_a_second(self) -> None:
        """Times within one second share a text, the next second gets its own: all equal to formatTime's."""
        stamp = TimeStamps()
        for when in (1700000000.0, 1700000000.999, 1700000001.0, 1700000000.5, 1.5, 0.0, 1700003600.75):
            self.assertEqual(stamp(when), formatTime(when), when)
        self.assertEqual(TimeStamps(None)(1.0), "-")
        self.assertEqual(TimeStamps("%H:%M:%S.%f")(1.25), formatTime(1.25, "%H:%M:%S.%f"))

    def test_writes_and_flushes(self) -> None:
        """Each line is written and flushed; an event without text writes nothing; a failing file loses the line silently."""
        out = io.StringIO()
        flushes: list[int] = []
        out.flush = lambda: flushes.append(1)  # type: ignore[method-assign]
        observer = textLineObserver(out)
        observer({"log_format": "one", "log_time": 0.0})
        observer({"log_time": 0.0})
        self.assertEqual(out.getvalue(), formatEventAsClassicLogText({"log_format": "one", "log_time": 0.0}))
        self.assertEqual(flushes, [1])
        self.assertIs(observer.outFile, out)  # type: ignore[attr-defined]

        class Broken:
            def write(self, data: str) -> None:
                raise OSError("disk full")

            def flush(self) -> None:
                pass

        textLineObserver(Broken())({"log_format": "lost", "log_time": 0.0})

    def test_log_file(self) -> None:
        """Into a twisted LogFile (twistd --logfile) the lines are the same text."""
        from twisted.python.logfile import LogFile

        path = os.path.abspath(self.mktemp())
        log_file = LogFile.fromFullPath(path)
        observer = textLineObserver(log_file)
        event = {"log_format": "into the file é", "log_time": 0.0, "log_namespace": "n", "log_level": LogLevel.info}
        observer(event)
        log_file.close()
        with open(path, encoding="utf-8") as f:
            self.assertEqual(f.read(), formatEventAsClassicLogText(event))


class TransactionEventTests(SynchronousTestCase):
    """The smtp_transaction event: every field, for each way a transaction ends, and no secret."""

    def deliver(
        self, raw: bytes, identity: Identity = KEY_IDENTITY, api: Optional[MemoryEmailAPI] = None, derive: bool = True
    ) -> tuple[Reply, dict[str, Any]]:
        api = api if api is not None else MemoryEmailAPI()
        with capturedLogs() as events:
            reply = self.successResultOf(
                RelayDelivery(identity, api, derive).deliver(ENVELOPE, raw, "s7", client="203.0.113.9")
            )
        [event] = [e for e in events if e.get("event") == TRANSACTION_EVENT]
        fields = {name: event[name] for name in TRANSACTION_FIELDS}
        self.assertEqual(set(fields), set(TRANSACTION_FIELDS))
        out = io.StringIO()
        jsonLineObserver(out)(event)
        text = formatEvent(event) + out.getvalue()
        self.assertNotIn(SECRET_KEY, text)
        self.assertNotIn(SECRET_KEY[:11], text)
        self.assertNotIn(b"hello", out.getvalue().encode())
        fields["message"] = formatEvent(event)
        return reply, fields

    def test_relayed(self) -> None:
        """A relayed message: every field, and one readable line with the numbers."""
        raw = message(b"Message-ID: <m1@yourdomain.com>\r\n")
        reply, fields = self.deliver(raw)
        self.assertEqual(reply.code, 250)
        api_ms, total_ms = fields.pop("api_ms"), fields.pop("total_ms")
        self.assertIsInstance(api_ms, float)
        self.assertGreaterEqual(total_ms, api_ms)
        self.assertEqual(
            fields,
            {
                "session": "s7",
                "outcome": "relayed",
                "client": "203.0.113.9",
                "identity": "sk_test_ne\N{HORIZONTAL ELLIPSIS}",
                "mail_from": "you@yourdomain.com",
                "rcpt_count": 3,
                "size": len(raw),
                "api_status": 202,
                "email_id": "em_00000000000000000001",
                "idempotency": IDEMPOTENCY_DERIVED,
                "reply_code": 250,
                "reply_enhanced": "2.0.0",
                "reply_text": reply.text,
                "message": (
                    f"s7 relayed client=203.0.113.9 identity=sk_test_ne\N{HORIZONTAL ELLIPSIS} "
                    f"from=<you@yourdomain.com> rcpts=3 size={len(raw)} api=202 {api_ms}ms "
                    f"id=em_00000000000000000001 idem=derived reply=250 2.0.0 total={total_ms}ms"
                ),
            },
        )
        self.assertIn("em_00000000000000000001", reply.text)

    def test_braces_are_text(self) -> None:
        """Braces in an address or the API's reply text appear as written, never as format fields."""
        api = MemoryEmailAPI()
        api.next_error = APIError(Reply(550, "5.7.1", "Sender {domain} not verified {0} {"), 403, "forbidden")
        envelope = Envelope("{user}@yourdomain.com", ("a@example.com",))
        with capturedLogs() as events:
            self.successResultOf(
                RelayDelivery(KEY_IDENTITY, api, True).deliver(
                    envelope, message(sender=b"{user}@yourdomain.com"), "s{1}", client="203.0.113.9"
                )
            )
        [event] = [e for e in events if e.get("event") == TRANSACTION_EVENT]
        text = formatEvent(event)
        self.assertTrue(text.startswith("s{1} rejected client=203.0.113.9 "), text)
        self.assertIn(" from=<{user}@yourdomain.com> ", text)
        self.assertTrue(text.endswith(": Sender {domain} not verified {0} {"), text)
        self.assertEqual(event["mail_from"], "{user}@yourdomain.com")

    def test_idempotency_kinds(self) -> None:
        """The message's own key is 'client', one derived from its Message-ID 'derived', none 'random'."""
        own = message(b"X-PostStack-Idempotency-Key: order-42\r\nMessage-ID: <m@x.com>\r\n")
        self.assertEqual(self.deliver(own)[1]["idempotency"], IDEMPOTENCY_CLIENT)
        with_id = message(b"Message-ID: <m@x.com>\r\n")
        self.assertEqual(self.deliver(with_id)[1]["idempotency"], IDEMPOTENCY_DERIVED)
        self.assertEqual(self.deliver(with_id, derive=False)[1]["idempotency"], IDEMPOTENCY_RANDOM)
        self.assertEqual(self.deliver(message())[1]["idempotency"], IDEMPOTENCY_RANDOM)

    def test_api_rejected(self) -> None:
        """The API refused: its status, the 5xx reply and its text, no email id."""
        api = MemoryEmailAPI()
        refusal = Reply(550, "5.7.1", "Sender domain not verified")
        api.next_error = APIError(refusal, 403, "forbidden")
        reply, fields = self.deliver(message(), api=api)
        self.assertEqual(reply, refusal)
        self.assertEqual(
            {k: fields[k] for k in ("outcome", "api_status", "email_id", "reply_code", "reply_enhanced", "reply_text")},
            {
                "outcome": "rejected",
                "api_status": 403,
                "email_id": None,
                "reply_code": 550,
                "reply_enhanced": "5.7.1",
                "reply_text": "Sender domain not verified",
            },
        )
        self.assertIsInstance(fields["api_ms"], float)
        self.assertIn(f" api=403 {fields['api_ms']}ms ", fields["message"])
        self.assertNotIn(" id=", fields["message"])
        self.assertTrue(fields["message"].endswith(": Sender domain not verified"), fields["message"])

    def test_api_unreachable(self) -> None:
        """No answer from the API: outcome deferred (4xx), api_status None, and 'api=-' in the text."""
        api = MemoryEmailAPI()
        api.next_error = APIError(Reply(451, "4.4.1", "PostStack API unreachable"), None)
        reply, fields = self.deliver(message(), api=api)
        self.assertEqual(reply.code, 451)
        self.assertEqual((fields["outcome"], fields["api_status"], fields["email_id"]), ("deferred", None, None))
        self.assertIn(f" api=- {fields['api_ms']}ms ", fields["message"])
        self.assertIn("s7 deferred client=203.0.113.9 ", fields["message"])

    def test_translation_rejected(self) -> None:
        """Refused before any API call: no api_status, api_ms, email id or idempotency; the reason in the text."""
        api = MemoryEmailAPI()
        reply, fields = self.deliver(message(sender=b"not an address"), api=api)
        self.assertEqual(api.sent, [])
        self.assertEqual((reply.code, reply.enhanced), (554, "5.6.0"))
        self.assertEqual(
            {k: fields[k] for k in ("outcome", "api_status", "api_ms", "email_id", "idempotency", "reply_code")},
            {"outcome": "rejected", "api_status": None, "api_ms": None, "email_id": None, "idempotency": None, "reply_code": 554},
        )
        self.assertNotIn(" api=", fields["message"])
        self.assertTrue(fields["message"].endswith(": " + reply.text), fields["message"])

    def test_mailbox_identity(self) -> None:
        """A mailbox user shows as the mailbox; the service key it sends with does not appear."""
        reply, fields = self.deliver(message(b"Sender: someone@else.com\r\n"), identity=MAILBOX_IDENTITY)
        self.assertEqual(reply.code, 550)
        self.assertEqual((fields["identity"], fields["outcome"]), ("alice@yourdomain.com", "rejected"))
        self.assertIn(" identity=alice@yourdomain.com ", fields["message"])


class DocumentationTests(SynchronousTestCase):
    """docs/logging.md names every event the code logs and every smtp_transaction field."""

    def test_every_event_documented(self) -> None:
        """Each event= name in poststack_relay/ and each transaction field appears in docs/logging.md."""
        with open(os.path.join(ROOT, "docs", "logging.md"), encoding="utf-8") as f:
            doc = f.read()
        names: set[str] = set()
        package = os.path.join(ROOT, "poststack_relay")
        for directory, _, files in os.walk(package):
            for name in files:
                if name.endswith(".py"):
                    with open(os.path.join(directory, name), encoding="utf-8") as f:
                        names.update(re.findall(r'\bevent="([a-z_]+)"', f.read()))
        self.assertIn("auth_failed", names)
        self.assertGreater(len(names), 20)
        names.update((TRANSACTION_EVENT, SENDER_REFUSED_EVENT))
        fields = set(TRANSACTION_FIELDS) | set(SENDER_REFUSED_FIELDS)
        missing = sorted(n for n in names | fields if f"`{n}`" not in doc)
        self.assertEqual(missing, [])


class TwistdProcessTests(SynchronousTestCase):
    """
    Real C{twistd -n poststack-relay} processes against the real sandbox:
    their whole standard output, in each format, after one relayed message
    and one failed login.
    """

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        """Start C{twistd -n} with its stdout and stderr in files; stopped (by PID) at clean-up."""
        environ = {k: v for k, v in os.environ.items() if not k.startswith("POSTSTACK_RELAY_")}
        environ.update(env, PYTHONPATH=ROOT)
        stdout = open(os.path.join(self.dir, name + ".out"), "wb")
        stderr = open(os.path.join(self.dir, name + ".err"), "wb")
        self.addCleanup(stdout.close)
        self.addCleanup(stderr.close)
        proc = subprocess.Popen([TWISTD, "-n", "--pidfile=", *args], cwd=self.dir, env=environ, stdout=stdout, stderr=stderr)
        self.addCleanup(stop_process, proc)
        return proc

    def read(self, name: str) -> str:
        with open(os.path.join(self.dir, name), "rb") as f:
            return f.read().decode("utf-8")

    def run_relay(self, log_args: list[str]) -> tuple[str, str, tuple[int, bytes], bytes]:
        """
        Start sandbox and relay, send one message with the API key and try
        one wrong mailbox password, stop the relay with SIGTERM; its
        stdout, the email id, the 250 reply and the message sent.
        """
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        cert, key = write_certificate(self.dir)
        api_port = free_port()
        sandbox = self.start(
            "sandbox", ["poststack-sandbox", "--port", str(api_port), "--db", "s.sqlite3", "--data", DATA], {}
        )
        wait_for_port(api_port, sandbox)
        port = free_port()
        relay = self.start(
            "relay",
            ["poststack-relay", *log_args, "--metrics-listen", f"127.0.0.1:{free_port()}"],
            {
                "POSTSTACK_RELAY_PORT": str(port),
                "POSTSTACK_RELAY_INTERFACE": "127.0.0.1",
                "POSTSTACK_RELAY_TLS_CERT": cert,
                "POSTSTACK_RELAY_TLS_KEY": key,
                "POSTSTACK_RELAY_API_URL": f"http://127.0.0.1:{api_port}",
                "POSTSTACK_RELAY_SERVICE_KEY": SERVICE_KEY,
                "POSTSTACK_RELAY_HOSTNAME": "localhost",
            },
        )
        wait_for_port(port, relay)
        context = ssl.create_default_context(cafile=cert)
        raw = (
            b"From: you@yourdomain.com\r\nTo: a@example.com\r\nSubject: logs\r\n"
            b"Message-ID: <logs-1@yourdomain.com>\r\n\r\nthe body of the message\r\n"
        )
        with smtplib.SMTP_SSL("localhost", port, context=context, timeout=30) as client:
            client.login("poststack", FULL_KEY)
            client.mail("you@yourdomain.com")
            client.rcpt("a@example.com")
            client.rcpt("b@example.com")
            reply = client.data(raw)
        self.assertEqual(reply[0], 250, reply)
        with smtplib.SMTP_SSL("localhost", port, context=context, timeout=30) as client:
            with self.assertRaises(smtplib.SMTPAuthenticationError):
                client.login(MAILBOX[0], self.wrong_password)
        relay.send_signal(signal.SIGTERM)
        self.assertEqual(relay.wait(timeout=30), 0, self.read("relay.err")[-2000:])
        email_id = reply[1].decode().split()[-1]
        self.assertTrue(email_id.startswith("em_"), reply)
        return self.read("relay.out"), email_id, reply, raw

    wrong_password = MAILBOX[1] + "-wrong-7Hq2"

    def assert_secret_free(self, output: str) -> None:
        """No API key, service key or password, in clear or in base64, anywhere in the output."""
        for secret, username in ((FULL_KEY, "poststack"), (SERVICE_KEY, "poststack"),
                                 (self.wrong_password, MAILBOX[0]), (MAILBOX[1], MAILBOX[0])):
            for form in forms(secret, username):
                self.assertNotIn(form, output)
        self.assertNotIn("the body of the message", output)

    def test_json(self) -> None:
        """--log-format json: every stdout line is one JSON object, the transaction has every field, and no secret appears."""
        output, email_id, reply, raw = self.run_relay(["--log-format", "json"])
        lines = output.splitlines()
        self.assertGreater(len(lines), 5)
        events = [json.loads(line) for line in lines]
        for event in events:
            self.assertIsInstance(event, dict)
            self.assertEqual(list(event)[:5], list(TOP_FIELDS))
            self.assertTrue(TIME.match(event["time"]), event)
        [found] = [e for e in events if e["event"] == "smtp_transaction"]
        transaction = dict(found)
        for name in ("api_ms", "total_ms", "session"):
            self.assertTrue(transaction.pop(name), name)
        for name in ("time", "level", "namespace", "event", "message"):
            transaction.pop(name)
        self.assertEqual(
            transaction,
            {
                "outcome": "relayed",
                "client": "127.0.0.1",
                "identity": FULL_KEY[:10] + "\N{HORIZONTAL ELLIPSIS}",
                "mail_from": "you@yourdomain.com",
                "rcpt_count": 2,
                "size": len(raw),
                "api_status": 202,
                "email_id": email_id,
                "idempotency": "derived",
                "reply_code": 250,
                "reply_enhanced": reply[1].decode().split()[0],
                "reply_text": reply[1].decode().split(" ", 1)[1],
            },
        )
        failed = [e for e in events if e["event"] == "auth_failed"]
        self.assertTrue(failed)
        self.assertEqual({e["client"] for e in failed}, {"127.0.0.1"})
        self.assertIn("sigterm", [e["event"] for e in events])
        self.assert_secret_free(output)

    def test_text(self) -> None:
        """The default text format: the transaction is one readable line, and no secret appears."""
        output, email_id, _, raw = self.run_relay([])
        [line] = [line for line in output.splitlines() if email_id in line and " relayed " in line]
        for part in (
            "client=127.0.0.1",
            "identity=" + FULL_KEY[:10] + "\N{HORIZONTAL ELLIPSIS}",
            "from=<you@yourdomain.com>",
            "rcpts=2",
            f"size={len(raw)}",
            f"id={email_id}",
            "reply=250 2.0.0",
        ):
            self.assertIn(part, line)
        self.assertIn("auth failed", output)
        self.assertNotIn('"event"', output)
        self.assert_secret_free(output)


class QuietTests(SynchronousTestCase):
    """
    The relay's observers leave out the Redis client's reconnection chatter
    (the relay logs fleet_state_down/up itself), and nothing else.
    """

    def test_left_out(self) -> None:
        chatter = "twisted.application._client_service.ClientService"
        for make in (jsonLineObserver, textLineObserver):
            out = io.StringIO()
            observer = make(out)
            for namespace, level, text in (
                ("x", LogLevel.info, "kept"),
                (chatter, LogLevel.info, "Scheduling retry"),
                (chatter, LogLevel.error, "broken"),
            ):
                observer({"log_format": text, "log_level": level, "log_namespace": namespace,
                          "log_time": 0.0})
            written = out.getvalue()
            self.assertIn("kept", written)
            self.assertIn("broken", written)
            self.assertNotIn("Scheduling retry", written)
