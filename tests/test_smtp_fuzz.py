# -*- test-case-name: tests.test_smtp_fuzz -*-
"""
Protocol fuzz for L{poststack_relay.smtp.RelaySMTP}: random sequences of
valid and invalid commands, AUTH exchanges, DATA bodies with dots, CR and
LF, pipelined input cut at random points, clock advances, API stalls and
failures, shutdown and connection loss, over a StringTransport (the
L{tests.common.smtp.Harness}: an in-memory API and a Clock).

After every step the session must be consistent: nothing raised or was
logged as an error, every reply line is well formed and carries the
enhanced status code RFC 2034 requires, each "queued as" reply matches
exactly one API send, nothing is said after a closing 221/421, and the
session is in one of its known modes (and, when waiting, has something to
wait for).  At the end, with the API answered and time run out, every
session is closed.

Hypothesis runs derandomized with no example database, so every run
checks the same sequences.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from poststack_relay.api import APIError
from poststack_relay.replies import Reply
from tests.common.smtp import KEY, MESSAGE, Harness, plain

CRLF = b"\r\n"
KNOWN_MODES = frozenset({"command", "auth", "data", "wait", "closed"})
HOST = b"relay.test"
IDLE_TIMEOUT = 300.0
MAX_MESSAGE_SIZE = 4000

_REPLY_LINE = re.compile(rb"^[2-5]\d\d[ -][\x20-\x7e]*$")
_ENHANCED = re.compile(rb"^([245])\d\d[ -]([245])\.\d{1,3}\.\d{1,3}(?: |$)")
_QUEUED = re.compile(rb"^250 2\.0\.0 Ok: queued as (em_\d{20})$")


def _b64(text: str) -> bytes:
    """Base64 of UTF-8 text, as an AUTH response line."""
    return base64.b64encode(text.encode("utf-8"))


_TRANSACTION = (
    b"MAIL FROM:<you@yourdomain.com>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n"
    + MESSAGE
    + b".\r\n"
)

# Pieces of client input: whole commands, AUTH responses, DATA content and
# junk.  Earlier entries are what hypothesis shrinks towards.
PIECES: list[bytes] = [
    b"EHLO client.test\r\n",
    b"AUTH PLAIN " + plain("poststack", KEY) + CRLF,
    _TRANSACTION,
    b"EHLO client.test\r\nAUTH PLAIN " + plain("poststack", KEY) + CRLF + _TRANSACTION,
    b"MAIL FROM:<you@yourdomain.com>\r\n",
    b"RCPT TO:<user@example.com>\r\n",
    b"DATA\r\n",
    MESSAGE + b".\r\n",
    b"QUIT\r\n",
    b"HELO client.test\r\n",
    b"EHLO\r\n",
    b"AUTH PLAIN " + plain("poststack", "sk_test_wrong") + CRLF,
    b"AUTH PLAIN " + plain("alice@yourdomain.com", "mbpass") + CRLF,
    b"AUTH PLAIN " + plain("poststack", KEY, authzid="admin") + CRLF,
    b"AUTH PLAIN " + plain("poststack", "") + CRLF,
    b"AUTH PLAIN\r\n",
    plain("poststack", KEY) + CRLF,
    b"AUTH LOGIN\r\n",
    _b64("poststack") + CRLF,
    _b64(KEY) + CRLF,
    b"AUTH LOGIN " + _b64("poststack") + CRLF,
    b"*\r\n",
    b"AUTH PLAIN !!!notbase64\r\n",
    b"AUTH PLAIN =\r\n",
    b"AUTH CRAM-MD5\r\n",
    b"AUTH\r\n",
    b"MAIL FROM:<alice@yourdomain.com> SIZE=100 BODY=8BITMIME\r\n",
    b"MAIL FROM:<>\r\n",
    b"MAIL FROM:<you@yourdomain.com> SIZE=99999999\r\n",
    b"MAIL FROM:<you@yourdomain.com> SIZE=abc\r\n",
    b"MAIL FROM:<you@yourdomain.com> BODY=BINARYMIME\r\n",
    b"MAIL FROM:<@relay.example:you@yourdomain.com>\r\n",
    b"MAIL FROM:you\r\n",
    b"MAIL FROM:<poststack>\r\n",
    b"mail from:<you@yourdomain.com>\r\n",
    b"RCPT TO:<other@example.com>\r\n",
    b"RCPT TO:<third@example.com>\r\n",
    b"RCPT TO:<fourth@example.com>\r\n",
    b"RCPT TO:<user@example.com> NOTIFY=NEVER\r\n",
    b"RCPT TO:<a\x00b@example.com>\r\n",
    b"RCPT TO:<a\rb@example.com>\r\n",
    b"RCPT TO:<" + b"l" * 70 + b"@example.com>\r\n",
    "RCPT TO:<jörg@bücher.example>\r\n".encode("utf-8"),
    b"RCPT TO:<\xff@example.com>\r\n",
    b"RCPT TO:user\r\n",
    b"DATA now\r\n",
    b".\r\n",
    b"..\r\n",
    b"..leading dot\r\n",
    b"\r\n.\r\n",
    b"\n.\n",
    b"\r.\r\n",
    b".\r",
    b"\n",
    b"\r",
    b"\r\n",
    b"From: You <you@yourdomain.com>\r\nX-PostStack-Tags: a\x00b\r\n\r\nbody\r\n.\r\n",
    b"Subject: =?utf-8?q?a=0D=0ABcc:_x?=\r\n\r\n\xff\xfe\x00\r\n.\r\n",
    b"x" * 1500 + b"\r\n",
    b"RSET\r\n",
    b"NOOP\r\n",
    b"noop\r\n",
    b" NOOP\r\n",
    b"VRFY root\r\n",
    b"EXPN staff\r\n",
    b"HELP\r\n",
    b"STARTTLS\r\n",
    b"BDAT 10 LAST\r\n",
    b"BOGUS\r\n",
    b"\x00\r\n",
    b"\xff\xfe\r\n",
    b"X" * 3000 + b"\r\n",
    b"A" * 13000 + b"\r\n",
    b"NOOP\n",
]

# The first nine pieces make up whole transactions; they are drawn more often.
_piece = st.one_of(
    st.sampled_from(PIECES[:9]),
    st.sampled_from(PIECES),
    st.binary(max_size=16),
    st.binary(max_size=16).map(lambda b: b + CRLF),
)

_send = st.tuples(
    st.just("send"),
    st.lists(_piece, min_size=1, max_size=8),
    st.lists(st.integers(min_value=0, max_value=20000), max_size=4),
)
_body_piece = st.one_of(
    st.sampled_from(
        [b".", b"..", b"\r", b"\n", b"\r\n", b".\r\n", b"\n.\n", b"\r.\r\n", b"\x00", b"\xff", MESSAGE]
    ),
    st.binary(max_size=12),
)
# A whole transaction whose content is hostile, cut anywhere.
_transaction = st.tuples(
    st.just("send"),
    st.lists(_body_piece, max_size=12).map(
        lambda body: [
            b"MAIL FROM:<you@yourdomain.com>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n",
            *body,
            b"\r\n.\r\n",
        ]
    ),
    st.lists(st.integers(min_value=0, max_value=20000), max_size=4),
)
# Steps: ("send", pieces, cut points), ("advance", seconds), ("fire", index),
# ("api", change), ("lose",), ("drain",).
_STEP_KINDS: dict[str, st.SearchStrategy[Any]] = {
    "api": st.tuples(
        st.just("api"), st.sampled_from(["hold", "release", "down", "up", "reject", "defer"])
    ),
    "fire": st.tuples(st.just("fire"), st.integers(min_value=0, max_value=3)),
    "advance": st.tuples(
        st.just("advance"), st.sampled_from([0.5, 1.0, 10.0, 299.0, 301.0, 601.0])
    ),
    "lose": st.just(("lose",)),
    "drain": st.just(("drain",)),
    "send": _send,
    "transaction": _transaction,
}
# Input is the common step; the others are rarer events.
_KINDS = ["send"] * 6 + ["transaction"] * 4 + ["api"] * 2 + ["fire"] * 2 + ["advance", "lose", "drain"]
_steps = st.lists(
    st.sampled_from(_KINDS).flatmap(lambda kind: _STEP_KINDS[kind]), min_size=1, max_size=14
)


def _note(text: str) -> None:
    """Record a hypothesis event (for --hypothesis-show-statistics), if inside a test."""
    try:
        event(text)
    except InvalidArgument:
        pass  # called from a plain (non-hypothesis) test


class _Session:
    """One fuzzed session and the bookkeeping its invariants need."""

    def __init__(self, testcase: SynchronousTestCase) -> None:
        self.testcase = testcase
        self.harness = Harness(
            idle_timeout=IDLE_TIMEOUT,
            max_message_size=MAX_MESSAGE_SIZE,
            max_recipients=3,
            max_errors=10,
            max_auth_failures=3,
            transaction_timeout=600.0,
        )
        self.factory = self.harness.factory
        self.proto = self.harness.proto
        self.transport = self.harness.transport
        self.api = self.harness.api
        self.lost = False
        self.output_at_loss = 0
        # API sends whose Deferred fired after the session had closed: the
        # relay cannot answer those.
        self.unanswerable = 0
        self.exempt = {
            line for line in self.factory.ehlo_reply.split(CRLF) if line
        } | {b"250 " + HOST}
        self.log: list[str] = []
        self.modes: set[str] = set()

    # -- steps -------------------------------------------------------------

    def run(self, step: Any) -> None:
        """Apply one step, with no exception allowed to escape."""
        self.log.append(repr(step)[:300])
        kind = step[0]
        if kind == "send":
            self._send(step[1], step[2])
        elif kind == "advance":
            self._advance(step[1])
        elif kind == "fire":
            self._fire(step[1])
        elif kind == "api":
            self._api(step[1])
        elif kind == "lose":
            self._lose()
        elif kind == "drain":
            self.factory.drain(30.0)

    def _send(self, pieces: list[bytes], cuts: list[int]) -> None:
        """Feed the pieces as one byte stream cut into chunks."""
        if self.lost:
            return  # a lost connection delivers nothing more
        data = b"".join(pieces)
        positions = sorted({cut % (len(data) + 1) for cut in cuts} | {0, len(data)})
        for start, end in zip(positions, positions[1:]):
            self.proto.dataReceived(data[start:end])
            self.check()

    def _advance(self, seconds: float) -> None:
        """
        Let time pass in ticks of at most a second.  A session that is
        waiting on the API at the start of a tick must not be timed out
        during it: the client is silent because it waits for the relay.
        """
        clock = self.harness.clock
        remaining = seconds
        while remaining > 0:
            tick = min(remaining, 1.0)
            remaining -= tick
            waiting = self.proto.state.mode == "wait"
            before = len(self.transport.value())
            clock.advance(tick)
            if waiting:
                said = self.transport.value()[before:]
                self.testcase.assertNotIn(
                    b"421 4.4.2 ", said, "timed out while waiting on the API" + self.describe()
                )

    def _fire(self, index: int) -> None:
        """Let the API answer one of the held sends."""
        waiting = [d for d in self.api.pending if not d.called]
        if not waiting:
            return
        if self.proto.state.mode == "closed":
            self.unanswerable += 1
        waiting[index % len(waiting)].callback(None)

    def _api(self, change: str) -> None:
        """Change how the in-memory API behaves for later calls."""
        if change == "hold":
            self.api.hold = True
        elif change == "release":
            self.api.hold = False
        elif change == "down":
            self.api.unavailable = True
        elif change == "up":
            self.api.unavailable = False
        elif change == "reject":
            self.api.next_error = APIError(
                Reply(554, "5.6.0", "PostStack API: Domain not verified (HTTP 422)")
            )
        else:
            self.api.next_error = APIError(
                Reply(451, "4.3.0", "PostStack API unavailable, try again later")
            )

    def _lose(self) -> None:
        """The client goes away."""
        if self.lost:
            return
        self.lost = True
        self.proto.connectionLost(Failure(ConnectionDone("fuzz")))
        self.output_at_loss = len(self.transport.value())

    def finish(self) -> None:
        """Answer every held send and let time run out: the session must end closed."""
        for _ in range(10):
            waiting = [d for d in self.api.pending if not d.called]
            if not waiting:
                break
            self._fire(0)
            self.check()
        self._advance(IDLE_TIMEOUT + 1)
        self.check()
        self.harness.clock.advance(3600)
        self.check()
        self.testcase.assertEqual(self.proto.state.mode, "closed", self.describe())
        self.testcase.assertTrue(
            self.lost or self.transport.disconnecting, self.describe()
        )
        # The transport goes away: the factory forgets the session.
        self._lose()
        self.check()
        self.testcase.assertEqual(self.factory.sessions, set())
        self.testcase.assertEqual(self.factory.connections_from("127.0.0.1"), 0)
        _note(f"API sends: {min(len(self.api.sent), 3)}")
        for mode in sorted(self.modes):
            _note(f"reached mode {mode}")
        last = self.transport.value().split(CRLF)[-2]
        _note(f"last reply {last[:9].decode('ascii')}")

    # -- invariants --------------------------------------------------------

    def describe(self) -> str:
        """The steps so far and the output, for a failure message."""
        return "\nsteps:\n  " + "\n  ".join(self.log) + "\noutput:\n" + repr(
            self.transport.value()[-3000:]
        )

    def check(self) -> None:
        """Assert every invariant on the session and on all output so far."""
        tc = self.testcase
        output = self.transport.value()
        tc.assertTrue(output == b"" or output.endswith(CRLF), self.describe())
        lines = output.split(CRLF)[:-1]
        tc.assertTrue(lines and lines[0] == b"220 relay.test ESMTP PostStack relay", self.describe())
        closing = None
        queued: list[bytes] = []
        for number, line in enumerate(lines):
            tc.assertIsNotNone(_REPLY_LINE.match(line), f"bad reply line {line!r}" + self.describe())
            code = line[:3]
            if closing is not None:
                tc.fail(f"reply {line!r} after closing reply {closing!r}" + self.describe())
            if code in (b"221", b"421"):
                closing = line
            if number == 0 or code[:1] == b"3" or line in self.exempt:
                continue
            match = _ENHANCED.match(line)
            tc.assertIsNotNone(match, f"no enhanced status code in {line!r}" + self.describe())
            assert match is not None
            tc.assertEqual(match.group(1), match.group(2), line)
            found = _QUEUED.match(line)
            if found is not None:
                queued.append(found.group(1))
        mode = self.proto.state.mode
        tc.assertIn(mode, KNOWN_MODES)
        self.modes.add(mode)
        if closing is not None:
            tc.assertEqual(mode, "closed", self.describe())
            tc.assertTrue(self.transport.disconnecting or self.lost, self.describe())
        if self.lost:
            tc.assertEqual(mode, "closed")
            tc.assertEqual(
                len(output), self.output_at_loss, "output after connection loss" + self.describe()
            )

        # One "queued as" per answered API send, each id once and one the API issued.
        waiting = sum(1 for d in self.api.pending if not d.called)
        expected = len(self.api.sent) - waiting - self.unanswerable
        tc.assertEqual(len(queued), expected, self.describe())
        tc.assertEqual(len(set(queued)), len(queued), self.describe())
        issued = {b"em_%020d" % n for n in range(1, len(self.api.sent) + 1)}
        tc.assertLessEqual(set(queued), issued, self.describe())
        for _, request in self.api.sent:
            payload = request.payload
            json.dumps(payload, ensure_ascii=False).encode("utf-8")
            tc.assertTrue(payload["from"] and payload["to"])

        if mode == "wait":
            # Waiting is only allowed with something that can end the wait.
            tc.assertTrue(
                waiting or any(call.active() for call in self.harness.clock.getDelayedCalls()),
                "waiting on nothing" + self.describe(),
            )
        errors = self.testcase.flushLoggedErrors()
        tc.assertEqual(errors, [], self.describe())


_FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class ProtocolFuzzTests(SynchronousTestCase):
    """Random client behaviour never breaks the session's invariants."""

    @settings(_FUZZ, max_examples=1000)
    @given(login=st.booleans(), held=st.booleans(), steps=_steps)
    def test_random_sessions(self, login: bool, held: bool, steps: list[Any]) -> None:
        """Any sequence of input, time, API behaviour, shutdown and loss keeps the session consistent."""
        session = _Session(self)
        if held:
            steps = [("api", "hold"), *steps]
        if login:
            steps = [("send", [PIECES[0], PIECES[1]], []), *steps]
        for step in steps:
            try:
                session.run(step)
            except Exception as error:  # noqa: BLE001 - any escape is the bug
                self.fail(f"{type(error).__name__}: {error}" + session.describe())
            session.check()
        session.finish()

    @settings(_FUZZ, max_examples=300)
    @given(
        prefix=st.lists(st.sampled_from(PIECES[:9]), min_size=1, max_size=6),
        body=st.lists(st.one_of(_body_piece, st.just(b"\r\n.\r\n")), max_size=20),
        cuts=st.lists(st.integers(min_value=0, max_value=5000), max_size=6),
    )
    def test_authenticated_data(self, prefix: list[bytes], body: list[bytes], cuts: list[int]) -> None:
        """Logged-in sessions fed hostile DATA content cut anywhere keep every invariant."""
        session = _Session(self)
        login = b"EHLO client.test\r\nAUTH PLAIN " + plain("poststack", KEY) + CRLF
        steps: list[Any] = [
            (
                "send",
                [
                    login,
                    *prefix,
                    b"MAIL FROM:<you@yourdomain.com>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n",
                    *body,
                    b"\r\n.\r\nQUIT\r\n",
                ],
                cuts,
            )
        ]
        for step in steps:
            try:
                session.run(step)
            except Exception as error:  # noqa: BLE001 - any escape is the bug
                self.fail(f"{type(error).__name__}: {error}" + session.describe())
            session.check()
        session.finish()


class InvariantSelfTests(SynchronousTestCase):
    """The invariant checker catches what it must (so the fuzz cannot pass vacuously)."""

    def _broken(self, output: bytes) -> None:
        """Assert check() fails on a session whose transport shows C{output}."""
        session = _Session(self)
        session.transport.clear()
        session.transport.write(output)
        self.assertRaises(self.failureException, session.check)

    def test_catches_bad_output(self) -> None:
        """Malformed lines, missing enhanced codes, talk after 421 and phantom sends all fail."""
        greeting = b"220 relay.test ESMTP PostStack relay\r\n"
        self._broken(greeting + b"250 Ok\r\n")
        self._broken(greeting + b"550 5.1.1 x\r\n250 2.0.0 Ok\r\n421 4.7.0 x\r\n250 2.0.0 Ok\r\n")
        self._broken(greeting + b"550 4.1.1 wrong class\r\n")
        self._broken(greeting + b"250 2.0.0 Ok\nNOOP\r\n")
        self._broken(greeting + b"250 2.0.0 Ok: queued as em_00000000000000000001\r\n")
        self._broken(greeting + b"250 2.0.0 Ok")

    def test_catches_logged_errors(self) -> None:
        """A logged failure fails the check."""
        from twisted.logger import Logger

        session = _Session(self)
        try:
            raise ValueError("boom")
        except ValueError:
            Logger().failure("test")
        self.assertRaises(self.failureException, session.check)

    def test_catches_a_hang(self) -> None:
        """A session waiting with nothing to wake it fails the check."""
        session = _Session(self)
        session.proto.set_idle_timer(None)
        session.proto.state.mode = "wait"
        self.assertRaises(self.failureException, session.check)
        session.proto.state.mode = "command"

    def test_good_session_passes(self) -> None:
        """A normal pipelined session passes every check and ends closed."""
        session = _Session(self)
        session.run(("send", [PIECES[3], b"QUIT\r\n"], [7, 100]))
        session.check()
        session.finish()
        self.assertEqual(len(session.api.sent), 1)
        self.assertTrue(session.transport.value().endswith(b"221 2.0.0 Bye\r\n"))

    def test_held_send_answered_once(self) -> None:
        """A held send answered after the client left counts as unanswerable, not as a lost reply."""
        session = _Session(self)
        session.run(("api", "hold"))
        session.run(("send", [PIECES[3]], []))
        session.check()
        self.assertEqual(session.proto.state.mode, "wait")
        session.run(("lose",))
        session.run(("fire", 0))
        session.check()
        self.assertEqual(session.unanswerable, 1)
        session.finish()
