"""
Hostile input for L{poststack_relay.translate}: header injection, control
characters, 8-bit bytes, volume limits, odd addresses, and property tests
that check every payload against a strict schema.

The rules tested here are written down in docs/mime-mapping.md, section
"Hostile input".
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any, Callable
from urllib.parse import quote

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from poststack_relay.translate import (
    MAX_FILENAME_LENGTH,
    MAX_HEADER_BYTES,
    MAX_HEADER_FIELDS,
    MAX_ID_LENGTH,
    MAX_MIME_DEPTH,
    MAX_PASSED_HEADER_OCTETS,
    MAX_PASSED_HEADERS,
    MAX_TAG_LENGTH,
    MAX_TAGS,
    MAX_VARIABLES_DEPTH,
    EmailRequest,
    Envelope,
    TranslationError,
    translate,
)
from tests.common.corpus import corpus_names, load

_SAMPLES = {name: load(name) for name in corpus_names()}

# Every character str.splitlines() breaks a line at.
_LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
# What must never be in a value that ends up in a header of the sent mail.
_HEADER_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
_ANY_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")
_CONTENT_TYPE = re.compile(
    r"[a-z0-9!#$&^_.+-]{1,127}/[a-z0-9!#$&^_.+-]{1,127}"
    r"(?:; charset=[A-Za-z0-9!#$%&'*+.^_`{|}~-]{1,64})?"
    r"(?:; method=[A-Z0-9!#$%&'*+.^_`{|}~-]{1,64})?"
)
_JSON_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f]")
_PAYLOAD_KEYS = frozenset(
    {
        "from",
        "to",
        "cc",
        "bcc",
        "reply_to",
        "subject",
        "text",
        "html",
        "headers",
        "tags",
        "attachments",
        "template_id",
        "variables",
        "idempotency_key",
    }
)

SENDER = "s@yourdomain.com"
RCPT = "user@example.com"
ENVELOPE = Envelope("bounce@yourdomain.com", (RCPT,))


def _message(*headers: str | bytes, body: bytes | str = "Hello.\r\n") -> bytes:
    """Raw message bytes from header lines (str as UTF-8, or raw bytes) and a body."""
    head = b"".join(
        (line if isinstance(line, bytes) else line.encode("utf-8")) + b"\r\n"
        for line in headers
    )
    if isinstance(body, str):
        body = body.encode("utf-8")
    return head + b"\r\n" + body


def _simple(*headers: str | bytes, body: bytes | str = "Hello.\r\n") -> bytes:
    """A message from SENDER to RCPT with extra header lines."""
    return _message(f"From: {SENDER}", f"To: {RCPT}", *headers, body=body)


def _payload(raw: bytes, envelope: Envelope = ENVELOPE, **kwargs: Any) -> dict[str, Any]:
    """Translate and return the payload."""
    return translate(raw, envelope, **kwargs).payload


def _encoded(data: bytes) -> str:
    """An RFC 2047 B encoded-word carrying ``data`` as UTF-8."""
    return "=?utf-8?b?" + base64.b64encode(data).decode("ascii") + "?="


class _RefusalMixin:
    """Assert helpers for refused messages."""

    assertRaises: Callable[..., Any]
    assertEqual: Callable[..., None]

    def _refused(
        self, raw: bytes, envelope: Envelope = ENVELOPE, **kwargs: Any
    ) -> TranslationError:
        """Translate, expect a TranslationError, and return it."""
        error: TranslationError = self.assertRaises(
            TranslationError, translate, raw, envelope, **kwargs
        )
        return error

    def _assert_refused(
        self, raw: bytes, reply: str, envelope: Envelope = ENVELOPE
    ) -> None:
        """Assert the message is refused with exactly ``reply`` ("554 5.6.0 text")."""
        error = self._refused(raw, envelope)
        self.assertEqual(f"{error.code} {error.enhanced} {error.text}", reply)


# ---------------------------------------------------------------------------
# The payload schema used by every property test.


def _check_header_string(
    testcase: SynchronousTestCase, value: object, what: str
) -> None:
    """A string that becomes (part of) a header of the sent mail."""
    testcase.assertIsInstance(value, str, what)
    assert isinstance(value, str)
    testcase.assertIsNone(_HEADER_UNSAFE.search(value), f"{what}: {value!r}")
    testcase.assertEqual(len(value.splitlines() or [""]), 1, f"{what}: {value!r}")


def _check_json_controls(testcase: SynchronousTestCase, value: Any, depth: int) -> None:
    """Variables: no control but TAB/LF/CR in keys or strings, depth bounded."""
    testcase.assertLessEqual(depth, MAX_VARIABLES_DEPTH)
    if isinstance(value, str):
        testcase.assertIsNone(_JSON_CONTROL.search(value), repr(value))
    elif isinstance(value, dict):
        for key, item in value.items():
            testcase.assertIsInstance(key, str)
            testcase.assertIsNone(_JSON_CONTROL.search(key), repr(key))
            _check_json_controls(testcase, item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_json_controls(testcase, item, depth + 1)
    else:
        testcase.assertIsInstance(value, (int, float, bool, type(None)))


def assert_valid_request(
    testcase: SynchronousTestCase, request: EmailRequest, envelope: Envelope
) -> None:
    """
    Assert ``request`` is a complete, safe ``POST /emails`` body: known keys
    only, every field of its documented type, header-bound strings free of
    line breaks and controls, bounded lists, strict base64 attachments, and
    JSON that encodes as UTF-8 and reads back equal.
    """
    payload = request.payload
    testcase.assertIsInstance(payload, dict)
    testcase.assertLessEqual(set(payload), _PAYLOAD_KEYS)
    try:
        encoded = json.dumps(payload, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError) as error:  # UnicodeEncodeError is a ValueError
        testcase.fail(f"payload is not UTF-8 JSON: {error}")
    testcase.assertEqual(json.loads(encoded), payload)

    _check_header_string(testcase, payload["from"], "from")
    testcase.assertIn("@", payload["from"])
    envelope_addresses = {r.strip().strip("<>").strip().lower() for r in envelope.rcpt_to}
    testcase.assertIsInstance(payload["to"], list)
    testcase.assertTrue(payload["to"])
    seen: set[str] = set()
    for field in ("to", "cc", "bcc"):
        testcase.assertIsInstance(payload.get(field, []), list)
        if field in payload:
            testcase.assertTrue(payload[field], f"empty {field} is left out")
        for entry in payload.get(field, []):
            _check_header_string(testcase, entry, field)
            address = entry.rpartition("<")[2].rstrip(">") if entry.endswith(">") else entry
            testcase.assertIn(address.lower(), envelope_addresses, entry)
            testcase.assertNotIn(address.lower(), seen, entry)
            seen.add(address.lower())
    for field in ("reply_to", "subject"):
        if field in payload:
            _check_header_string(testcase, payload[field], field)
    for field in ("text", "html"):
        if field in payload:
            testcase.assertIsInstance(payload[field], str)
    if "text" not in payload and "html" not in payload:
        testcase.assertIn("template_id", payload)

    headers = payload.get("headers", {})
    testcase.assertIsInstance(headers, dict)
    if "headers" in payload:
        testcase.assertTrue(headers)
    testcase.assertLessEqual(len(headers), MAX_PASSED_HEADERS)
    for name, value in headers.items():
        testcase.assertIsNotNone(_FIELD_NAME.fullmatch(name), repr(name))
        testcase.assertFalse(name.lower().startswith("x-poststack-"), name)
        _check_header_string(testcase, value, f"headers[{name!r}]")
        testcase.assertTrue(value.strip())
        testcase.assertLessEqual(len(value.encode("utf-8")), MAX_PASSED_HEADER_OCTETS)

    tags = payload.get("tags", [])
    testcase.assertIsInstance(tags, list)
    testcase.assertLessEqual(len(tags), MAX_TAGS)
    testcase.assertEqual(len(set(tags)), len(tags))
    for tag in tags:
        testcase.assertIsInstance(tag, str)
        testcase.assertTrue(tag)
        testcase.assertNotIn(",", tag)
        testcase.assertLessEqual(len(tag), MAX_TAG_LENGTH)
        testcase.assertIsNone(_ANY_CONTROL.search(tag), repr(tag))

    if "template_id" in payload:
        template_id = payload["template_id"]
        testcase.assertIsInstance(template_id, str)
        testcase.assertTrue(template_id)
        testcase.assertLessEqual(len(template_id), MAX_ID_LENGTH)
        testcase.assertIsNone(_ANY_CONTROL.search(template_id), repr(template_id))
    testcase.assertEqual(request.idempotency_key, payload.get("idempotency_key"))
    if request.idempotency_key is not None:
        testcase.assertRegex(request.idempotency_key, r"^[\x20-\x7e]{1,%d}$" % MAX_ID_LENGTH)
    if "variables" in payload:
        testcase.assertIsInstance(payload["variables"], dict)
        _check_json_controls(testcase, payload["variables"], 1)

    attachments = payload.get("attachments", [])
    testcase.assertIsInstance(attachments, list)
    for attachment in attachments:
        testcase.assertIsInstance(attachment, dict)
        testcase.assertEqual(sorted(attachment), ["content", "content_type", "filename"])
        filename = attachment["filename"]
        _check_header_string(testcase, filename, "filename")
        testcase.assertTrue(filename.strip())
        testcase.assertLessEqual(len(filename), MAX_FILENAME_LENGTH)
        testcase.assertNotIn("/", filename)
        testcase.assertNotIn("\\", filename)
        testcase.assertIsNotNone(
            _CONTENT_TYPE.fullmatch(attachment["content_type"]), attachment["content_type"]
        )
        content = attachment["content"]
        testcase.assertIsInstance(content, str)
        try:
            decoded = base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError) as error:
            testcase.fail(f"attachment content is not base64: {error}")
        # Canonical: strict decoders also refuse non-zero unused bits.
        testcase.assertEqual(base64.b64encode(decoded).decode("ascii"), content)


def assert_valid_error(testcase: SynchronousTestCase, error: TranslationError) -> None:
    """Assert a refusal is a complete permanent SMTP reply in printable ASCII."""
    testcase.assertIsInstance(error.code, int)
    testcase.assertTrue(500 <= error.code <= 599, error.code)
    testcase.assertRegex(error.enhanced, r"^5\.\d{1,3}\.\d{1,3}$")
    testcase.assertRegex(error.text, r"^[\x20-\x7e]+$")
    testcase.assertEqual(str(error), f"{error.code} {error.enhanced} {error.text}")


def check_translation(
    testcase: SynchronousTestCase,
    raw: bytes,
    envelope: Envelope,
    mailbox: str | None = None,
) -> EmailRequest | TranslationError:
    """
    Translate; assert the outcome is a valid request or a valid refusal
    (any other exception fails the test) and return it.
    """
    try:
        request = translate(raw, envelope, mailbox=mailbox)
    except TranslationError as error:
        assert_valid_error(testcase, error)
        event(f"refused: {error.text[:40]}")
        return error
    assert_valid_request(testcase, request, envelope)
    event("accepted")
    return request


class SchemaSelfTests(SynchronousTestCase):
    """The schema validator itself rejects what it must (so it cannot pass vacuously)."""

    def test_rejects_unsafe_payloads(self) -> None:
        """Each kind of broken payload fails the validator."""
        good = translate(_simple("X-A: b", "X-PostStack-Tags: t"), ENVELOPE)
        assert_valid_request(self, good, ENVELOPE)
        broken: list[dict[str, Any]] = [
            {"headers": {"X-A": "b\r\nBcc: x@example.com"}},
            {"headers": {"X A": "b"}},
            {"headers": {"X-A": "b\u2028c"}},
            {"subject": "a\x00b"},
            {"from": "Evil\x85 <s@yourdomain.com>"},
            {"to": ["other@example.com"]},
            {"tags": ["a\tb"]},
            {"template_id": "t\x00"},
            {"variables": {"a": "\x00"}},
            {"attachments": [{"filename": "a", "content": "QQ", "content_type": "a/b"}]},
            {"unknown": 1},
            {"subject": "\udcff"},
        ]
        for change in broken:
            request = EmailRequest({**good.payload, **change}, None)
            self.assertRaises(
                self.failureException, assert_valid_request, self, request, ENVELOPE
            )


# ---------------------------------------------------------------------------
# Header injection and control characters.


class HeaderInjectionTests(_RefusalMixin, SynchronousTestCase):
    """No line break or control character reaches a header of the sent mail."""

    def test_every_line_break_in_passed_headers(self) -> None:
        """Each character splitlines() breaks at becomes a space in passed headers, encoded or raw."""
        for char in _LINE_BREAKS:
            data = f"a{char}Bcc: evil@example.com".encode("utf-8")
            for line in (f"X-Note: {_encoded(data)}".encode("ascii"), b"X-Note: " + data):
                if b"\r" in line or b"\n" in line:
                    continue  # a raw CR or LF ends the header line itself
                payload = _payload(_simple(line))
                self.assertEqual(
                    payload["headers"], {"X-Note": "a Bcc: evil@example.com"}, repr(char)
                )

    def test_controls_removed_from_header_values(self) -> None:
        """NUL, other C0 controls, DEL and C1 controls are removed; TAB is kept."""
        data = "a\x00b\x01c\x1fd\x7fe\x80f\x9fg\th".encode("utf-8")
        payload = _payload(
            _simple(
                f"Subject: {_encoded(data)}",
                f"X-Note: {_encoded(data)}",
                f"Organization: {_encoded(data)}",
            )
        )
        self.assertEqual(payload["subject"], "abcdefg\th")
        self.assertEqual(
            payload["headers"], {"X-Note": "abcdefg\th", "Organization": "abcdefg\th"}
        )

    def test_encoded_line_breaks_in_display_names(self) -> None:
        """Encoded CR/LF/NUL/U+2028 in From, To and Cc names never break the name out."""
        evil = _encoded("Eve\r\nBcc: x@example.com\x00\u2028".encode("utf-8"))
        payload = _payload(
            _message(
                f"From: {evil} <{SENDER}>",
                f"To: {evil} <{RCPT}>",
                f"Cc: {evil} <cc@example.com>",
                f"Reply-To: {evil} <reply@example.com>",
            ),
            Envelope(SENDER, (RCPT, "cc@example.com")),
        )
        name = '"Eve Bcc: x@example.com"'
        self.assertEqual(payload["from"], f"{name} <{SENDER}>")
        self.assertEqual(payload["to"], [f"{name} <{RCPT}>"])
        self.assertEqual(payload["cc"], [f"{name} <cc@example.com>"])
        self.assertEqual(payload["reply_to"], f"{name} <reply@example.com>")

    def test_header_names_are_field_names(self) -> None:
        """Lines that are not RFC 5322 fields never become passed header names."""
        raw = _simple(
            b"X-Good: 1",
            b"X-Sp ace: 2",
            b"X-\xc3\xa9: 3",
            b"X-N\x00L: 4",
            b": 5",
            body="body\r\n",
        )
        payload = _payload(raw)
        # The first line that is not a field ends the header section.
        self.assertEqual(payload["headers"], {"X-Good": "1"})
        self.assertIn("X-Sp ace: 2", payload["text"])

    def test_filename_controls_removed(self) -> None:
        """Encoded CR/LF and controls in filenames are cleaned, paths dropped."""
        evil = _encoded(b"../../etc/pa\r\nss\x00wd\xc2\x85.txt")
        payload = _payload(
            _simple(
                "Content-Type: multipart/mixed; boundary=b",
                body=(
                    "--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
                    "--b\r\nContent-Type: application/pdf\r\n"
                    f'Content-Disposition: attachment; filename="{evil}"\r\n\r\nx\r\n'
                    "--b--\r\n"
                ),
            )
        )
        self.assertEqual(payload["attachments"][0]["filename"], "pa sswd .txt")

    def test_template_id_controls_refused(self) -> None:
        """A template id with a control character, raw or encoded, is refused."""
        reply = "554 5.6.0 X-PostStack-Template-Id must not contain control characters"
        for line in (
            b"X-PostStack-Template-Id: tpl\x00abc",
            b"X-PostStack-Template-Id: tpl\tabc",
            b"X-PostStack-Template-Id: tpl\x1babc",
            b"X-PostStack-Template-Id: tpl\xc2\x85abc",
            b"X-PostStack-Template-Id: tpl\xe2\x80\xa8abc",
            b"X-PostStack-Template-Id: "
            + _encoded(b"tpl_x").encode()
            + _encoded(b"\r\nBcc: y").encode(),
            b"X-PostStack-Template-Id: " + _encoded(b"tpl\x00").encode(),
        ):
            self._assert_refused(_simple(line), reply)

    def test_template_id_surrounding_blanks_allowed(self) -> None:
        """Spaces, tabs and folding around a template id are not part of it."""
        payload = _payload(_simple(b"X-PostStack-Template-Id:\r\n\t tpl_abc \t"))
        self.assertEqual(payload["template_id"], "tpl_abc")

    def test_idempotency_key_refusals(self) -> None:
        """An idempotency key must be printable ASCII without controls, at most 256 characters."""
        header = "X-PostStack-Idempotency-Key"
        for line, reply in [
            (b"k\x00ey", f"554 5.6.0 {header} must not contain control characters"),
            (
                _encoded(b"k\r\nX-Evil: 1").encode(),
                f"554 5.6.0 {header} must not contain control characters",
            ),
            (
                "clé".encode(),
                f"554 5.6.0 {header} must be printable ASCII (it is also sent as an HTTP header)",
            ),
            (
                b"k" * (MAX_ID_LENGTH + 1),
                f"554 5.6.0 {header} is longer than {MAX_ID_LENGTH} characters",
            ),
        ]:
            self._assert_refused(_simple(header.encode() + b": " + line), reply)
        key = "order 17/x" + "k" * (MAX_ID_LENGTH - 10)
        request = translate(_simple(f"{header}: {key}"), ENVELOPE)
        self.assertEqual(request.idempotency_key, key)

    def test_tags_with_controls_refused(self) -> None:
        """A tag with a control character is refused; blanks around tags are trimmed."""
        reply = "554 5.6.0 X-PostStack-Tags must not contain control characters"
        for line in (
            b"X-PostStack-Tags: a, b\x00c",
            b"X-PostStack-Tags: a, b\tc",
            b"X-PostStack-Tags: a, " + _encoded(b"b\nc").encode(),
        ):
            self._assert_refused(_simple(line), reply)
        payload = _payload(_simple(b"X-PostStack-Tags: \ta ,\r\n\tb\t, c"))
        self.assertEqual(payload["tags"], ["a", "b", "c"])

    def test_variables_controls(self) -> None:
        """Variables strings may hold TAB, LF and CR, but no other control character."""
        payload = _payload(
            _simple('X-PostStack-Variables: {"address": "1 Road\\nTown\\r\\n\\tUK"}')
        )
        self.assertEqual(payload["variables"], {"address": "1 Road\nTown\r\n\tUK"})
        for value, char in [
            ('{"a": "x\\u0000"}', "U+0000"),
            ('{"a": ["x", {"b": "\\u001b[31m"}]}', "U+001B"),
            ('{"k\\u0007": 1}', "U+0007"),
        ]:
            error = self._refused(_simple(f"X-PostStack-Variables: {value}"))
            self.assertEqual(
                error.text,
                f"X-PostStack-Variables must be a JSON object: a string holds the control"
                f" character {char} (only TAB, LF and CR are allowed)",
            )

    def test_variables_raw_controls_refused(self) -> None:
        """Raw control bytes in the Variables header are refused, not silently dropped."""
        for line in (
            b'X-PostStack-Variables: {"a": "x\x00y"}',
            b'X-PostStack-Variables: {"a":\x00 1}',
            b'X-PostStack-Variables: {"a": "x\x1by"}',
        ):
            error = self._refused(_simple(line))
            self.assertEqual((error.code, error.enhanced), (554, "5.6.0"))
            self.assertTrue(
                error.text.startswith("X-PostStack-Variables must be a JSON object: "),
                error.text,
            )


class EightBitHeaderTests(SynchronousTestCase):
    """Raw 8-bit and invalid UTF-8 header bytes decode, never crash, never leave surrogates."""

    def test_windows_1252_fallback(self) -> None:
        """Header bytes that are not UTF-8 are windows-1252; its undefined bytes are dropped."""
        payload = _payload(
            _simple(b"Subject: \x93quoted\x94 \x80 caf\xe9 \x81\x8d\x8f\x90\x9dend")
        )
        self.assertEqual(payload["subject"], "\u201cquoted\u201d \u20ac caf\u00e9 end")

    def test_invalid_utf8_everywhere(self) -> None:
        """Invalid UTF-8 in names, subject, passed headers, tags and filenames gives UTF-8 JSON."""
        bad = b"\xff\xc3\xed\xa0\x80\xf8\x88\x80\x80\x80"
        raw = _message(
            b"From: N" + bad + b" <" + SENDER.encode() + b">",
            b"To: N" + bad + b" <" + RCPT.encode() + b">",
            b"Subject: " + bad,
            b"X-Raw: " + bad,
            b"X-PostStack-Tags: t" + bad,
            b"Content-Type: multipart/mixed; boundary=b",
            body=(
                b"--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n--b\r\n"
                b'Content-Disposition: attachment; filename="f' + bad + b'.bin"\r\n\r\n'
                b"x\r\n--b--\r\n"
            ),
        )
        request = translate(raw, ENVELOPE)
        assert_valid_request(self, request, ENVELOPE)
        self.assertEqual(
            request.payload["subject"],
            "\u00ff\u00c3\u00ed\u00a0\u20ac\u00f8\u02c6\u20ac\u20ac\u20ac",
        )
        json.dumps(request.payload, ensure_ascii=False).encode("utf-8")

    def test_raw_utf8_kept(self) -> None:
        """Valid raw UTF-8 (RFC 6532) in headers is read as UTF-8, not windows-1252."""
        payload = _payload(_simple("Subject: Zoë ☃ 😀", "X-PostStack-Tags: café"))
        self.assertEqual((payload["subject"], payload["tags"]), ("Zoë ☃ 😀", ["café"]))


# ---------------------------------------------------------------------------
# Volume limits.


class HeaderVolumeTests(_RefusalMixin, SynchronousTestCase):
    """The header section, the passed headers and the custom fields are bounded."""

    def test_header_field_count(self) -> None:
        """MAX_HEADER_FIELDS fields pass; one more, or 10,000 X-* headers, are refused."""
        base = [f"From: {SENDER}", f"To: {RCPT}"]
        fits = base + [f"Received: from h{i}" for i in range(MAX_HEADER_FIELDS - 2)]
        self.assertEqual(_payload(_message(*fits))["to"], [RCPT])
        reply = (
            f"554 5.6.0 Message has more than {MAX_HEADER_FIELDS} header fields;"
            " remove some headers"
        )
        self._assert_refused(_message(*fits, "Received: one more"), reply)
        self._assert_refused(
            _message(*base, *(f"X-Foo-{i}: v" for i in range(10000))), reply
        )

    def test_header_count_with_bare_cr_lines(self) -> None:
        """Header lines ended by bare CRs count as the parser reads them."""
        raw = b"From: s@yourdomain.com\r" + b"Received: x\r" * MAX_HEADER_FIELDS + b"\r\nbody"
        error = self._refused(raw)
        self.assertIn("header fields", error.text)

    def test_header_section_size(self) -> None:
        """A header section of MAX_HEADER_BYTES passes; one octet more is refused, whatever the line ends."""
        reply = (
            f"554 5.6.0 Message header section is larger than {MAX_HEADER_BYTES} octets;"
            " remove or shorten headers"
        )
        for eol in (b"\r\n", b"\n", b"\r"):
            head = f"From: {SENDER}".encode() + eol + b"Received: "
            filler = MAX_HEADER_BYTES - len(head) - len(eol)
            fits = head + b"a" * filler + eol
            self.assertEqual(len(fits), MAX_HEADER_BYTES)
            self.assertEqual(_payload(fits + eol + b"body")["text"], "body")
            too_big = head + b"a" * (filler + 1) + eol
            self._assert_refused(too_big + eol + b"body", reply)

    def test_huge_single_header_line(self) -> None:
        """One header line of several MiB is refused quickly, with or without a line end."""
        reply = (
            f"554 5.6.0 Message header section is larger than {MAX_HEADER_BYTES} octets;"
            " remove or shorten headers"
        )
        line = b"X-Huge: " + b"a" * (3 * MAX_HEADER_BYTES)
        self._assert_refused(_simple(line), reply)
        self._assert_refused(f"From: {SENDER}\r\n".encode() + line, reply)
        self._assert_refused(
            _simple(b"X-Folded: a\r\n" + b" b\r\n" * MAX_HEADER_BYTES), reply
        )

    def test_big_body_is_not_a_header(self) -> None:
        """A body (or header-less text) longer than the limit is not mistaken for headers."""
        long_line = b"x" * (2 * MAX_HEADER_BYTES)
        self.assertEqual(len(_payload(_simple(body=long_line))["text"]), len(long_line))
        # No blank line: the body starts at the first line that is no field.
        raw = f"From: {SENDER}\r\n".encode() + b"Body text " + long_line
        self.assertTrue(_payload(raw)["text"].startswith("Body text x"))

    def test_passed_header_count(self) -> None:
        """MAX_PASSED_HEADERS distinct passed headers pass; one more is refused."""
        fits = [f"X-H{i}: v" for i in range(MAX_PASSED_HEADERS)]
        self.assertEqual(len(_payload(_simple(*fits))["headers"]), MAX_PASSED_HEADERS)
        self._assert_refused(
            _simple(*fits, "List-Id: <one.more>"),
            f"554 5.6.0 Message has more than {MAX_PASSED_HEADERS} headers to pass on"
            " (X-* and list headers); remove some",
        )
        # Repeats of one name are one header, and X-PostStack-* are not passed.
        repeated = ["X-Same: v"] * 10 + ["X-PostStack-Something: s"] * 10
        self.assertEqual(_payload(_simple(*fits[:-1], *repeated))["headers"]["X-Same"], ", ".join(["v"] * 10))

    def test_passed_header_value_octets(self) -> None:
        """Passed values are limited in UTF-8 octets, after unfolding and joining."""
        half = MAX_PASSED_HEADER_OCTETS // 2
        self.assertEqual(
            _payload(_simple(f"X-Long: {'é' * half}"))["headers"]["X-Long"], "é" * half
        )
        reply = (
            f"554 5.6.0 Header X-Long is longer than {MAX_PASSED_HEADER_OCTETS} octets;"
            " shorten or remove it"
        )
        self._assert_refused(_simple(f"X-Long: {'é' * (half + 1)}"), reply)
        self._assert_refused(
            _simple(*["X-Long: " + "v" * 100] * 10), reply
        )

    def test_references_trimmed(self) -> None:
        """A long References keeps the thread root and the newest ids that fit."""
        ids = [f"<{i:04d}.abcdefghijklmnop@mail.example.com>" for i in range(200)]
        payload = _payload(
            _simple("References: " + "\r\n ".join(ids), f"In-Reply-To: {ids[-1]}")
        )
        references = payload["headers"]["References"].split(" ")
        self.assertLessEqual(
            len(payload["headers"]["References"].encode()), MAX_PASSED_HEADER_OCTETS
        )
        self.assertEqual(references[0], ids[0])
        kept = len(references) - 1
        self.assertEqual(references[1:], ids[-kept:])
        self.assertEqual(kept, (MAX_PASSED_HEADER_OCTETS - len(ids[0])) // (len(ids[0]) + 1))
        self.assertEqual(payload["headers"]["In-Reply-To"], ids[-1])

    def test_unusable_long_in_reply_to_refused(self) -> None:
        """A References value longer than the limit with no usable message id is refused."""
        self._assert_refused(
            _simple("In-Reply-To: <" + "a" * MAX_PASSED_HEADER_OCTETS + "@x>"),
            f"554 5.6.0 Header In-Reply-To is longer than {MAX_PASSED_HEADER_OCTETS}"
            " octets; shorten or remove it",
        )
        self._assert_refused(
            _simple("References: " + "junk " * 300),
            f"554 5.6.0 Header References is longer than {MAX_PASSED_HEADER_OCTETS}"
            " octets; shorten or remove it",
        )

    def test_tag_limits(self) -> None:
        """MAX_TAGS distinct tags of MAX_TAG_LENGTH pass; more tags or longer ones are refused."""
        tags = [f"{i:03d}" + "t" * (MAX_TAG_LENGTH - 3) for i in range(MAX_TAGS)]
        payload = _payload(
            _simple(
                "X-PostStack-Tags: " + ",\r\n ".join(tags),
                "X-PostStack-Tags: " + ", ".join(tags[:5]),
            )
        )
        self.assertEqual(payload["tags"], tags)
        too_many = f"554 5.6.0 X-PostStack-Tags has more than {MAX_TAGS} tags; send at most {MAX_TAGS}"
        self._assert_refused(
            _simple("X-PostStack-Tags: " + ",".join(tags[1:]), "X-PostStack-Tags: extra, " + tags[0]),
            too_many,
        )
        self._assert_refused(
            _simple("X-PostStack-Tags: " + ",".join(f"t{i}" for i in range(10000))),
            too_many,
        )
        self._assert_refused(
            _simple("X-PostStack-Tags: ok, " + "t" * (MAX_TAG_LENGTH + 1)),
            f"554 5.6.0 X-PostStack-Tags has a tag longer than {MAX_TAG_LENGTH}"
            " characters; shorten it",
        )

    def test_template_id_length(self) -> None:
        """A template id of MAX_ID_LENGTH characters passes; one more is refused."""
        fits = "t" * MAX_ID_LENGTH
        self.assertEqual(_payload(_simple(f"X-PostStack-Template-Id: {fits}"))["template_id"], fits)
        self._assert_refused(
            _simple(f"X-PostStack-Template-Id: {fits}x"),
            f"554 5.6.0 X-PostStack-Template-Id is longer than {MAX_ID_LENGTH} characters",
        )

    def test_long_filename_shortened(self) -> None:
        """Filenames are cut to MAX_FILENAME_LENGTH characters, keeping a short extension."""
        for filename, expected in [
            ("a" * 300 + ".pdf", "a" * (MAX_FILENAME_LENGTH - 4) + ".pdf"),
            ("b" * 300, "b" * MAX_FILENAME_LENGTH),
            ("c.d" + "e" * 300, ("c.d" + "e" * 300)[:MAX_FILENAME_LENGTH]),
            ("f" * MAX_FILENAME_LENGTH, "f" * MAX_FILENAME_LENGTH),
        ]:
            payload = _payload(
                _simple(
                    f'Content-Type: application/octet-stream; name="{filename}"',
                    "Content-Transfer-Encoding: base64",
                    body="QUJD\r\n",
                )
            )
            self.assertEqual(payload["attachments"][0]["filename"], expected)

    def test_long_content_type(self) -> None:
        """Names over 127 characters (RFC 6838) become octet-stream; parameters over 64 are dropped."""
        for content_type, expected in [
            ("application/" + "x" * 127, "application/" + "x" * 127),
            ("application/" + "x" * 128, "application/octet-stream"),
            ("x" * 128 + "/pdf", "application/octet-stream"),
            ("text/plain; charset=" + "c" * 64, "text/plain; charset=" + "c" * 64),
            ("text/plain; charset=" + "c" * 65, "text/plain"),
            (
                "text/calendar; method=" + "m" * 65 + "; charset=utf-8",
                "text/calendar; charset=utf-8",
            ),
        ]:
            payload = _payload(
                _simple(f"Content-Type: {content_type}", "Content-Disposition: attachment")
            )
            self.assertEqual(payload["attachments"][0]["content_type"], expected)


# ---------------------------------------------------------------------------
# MIME structure.


class StructureTests(SynchronousTestCase):
    """Broken MIME structure still gives whole, valid fields."""

    def test_mixed_nesting_limit(self) -> None:
        """Alternating multipart and message/rfc822 containers count together towards the depth limit."""
        for depth, refused in [(MAX_MIME_DEPTH, False), (MAX_MIME_DEPTH + 1, True)]:
            inner = "Content-Type: text/plain\r\n\r\ncore\r\n"
            for level in range(depth):
                if level % 2:
                    inner = "Content-Type: message/rfc822\r\n\r\n" + inner
                else:
                    inner = (
                        f"Content-Type: multipart/mixed; boundary=b{level}\r\n\r\n"
                        f"--b{level}\r\n{inner}\r\n--b{level}--\r\n"
                    )
            raw = f"From: {SENDER}\r\n{inner}".encode()
            if refused:
                error = self.assertRaises(TranslationError, translate, raw, ENVELOPE)
                self.assertEqual(
                    str(error),
                    f"554 5.6.0 MIME parts are nested more than {MAX_MIME_DEPTH} levels"
                    " deep; flatten the message structure",
                )
            else:
                assert_valid_request(self, translate(raw, ENVELOPE), ENVELOPE)

    def test_truncated_attachment_without_closing_boundary(self) -> None:
        """A multipart cut off inside a base64 attachment keeps what arrived, as strict base64."""
        content = base64.encodebytes(bytes(range(256)) * 4).decode("ascii")
        cut = content[: len(content) // 2 + 3]  # mid-line, not a multiple of 4
        raw = _simple(
            "Content-Type: multipart/mixed; boundary=b",
            body=(
                "--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
                "--b\r\nContent-Type: application/octet-stream\r\n"
                "Content-Transfer-Encoding: base64\r\n\r\n" + cut
            ),
        )
        request = translate(raw, ENVELOPE)
        assert_valid_request(self, request, ENVELOPE)
        data = base64.b64decode(request.payload["attachments"][0]["content"])
        self.assertTrue((bytes(range(256)) * 4).startswith(data))
        self.assertGreater(len(data), 400)

    def test_base64_garbage_attachments(self) -> None:
        """Non-canonical base64 is never passed through: the API always gets strict base64."""
        for encoded in [
            b"QQ=",
            b"QQ===",
            b"Q===",
            b"QQ==QQ==",
            b"QUJD\x00REVG",
            b"QU JD RE VG",
            b"!!!!",
            b"=",
            b"QUJDRA",
            b"\xff\xfe",
            b"4pyTIMOgIGxhIG1vZGU=\r\n=\r\n",
            b"QR==",
            b"QUJ=",
            b"QUJDRB==",
        ]:
            raw = _simple(
                "Content-Type: application/octet-stream",
                "Content-Transfer-Encoding: base64",
                body=encoded + b"\r\n",
            )
            content = _payload(raw)["attachments"][0]["content"]
            try:
                decoded = base64.b64decode(content, validate=True)
            except binascii.Error:  # pragma: no cover - the assertion below reports it
                self.fail(f"{encoded!r} gave invalid base64 {content!r}")
            self.assertEqual(base64.b64encode(decoded).decode(), content, encoded)


# ---------------------------------------------------------------------------
# Addresses.


class AddressTests(_RefusalMixin, SynchronousTestCase):
    """Quoted, commented, routed, internationalized and over-long addresses."""

    def test_quoted_and_commented_addresses(self) -> None:
        """Quoted names, comments and bare angle addresses in From/To/Cc parse as expected."""
        envelope = Envelope(SENDER, ("jane@example.com", "john@example.com", "ann@example.com"))
        payload = _payload(
            _message(
                f'From: "Doe, Sender" <{SENDER}>',
                "To: jane@example.com (Jane Doe), <john@example.com>",
                'Cc: "ann \\"the\\" dev" (work) <ann@example.com>',
            ),
            envelope,
        )
        self.assertEqual(payload["from"], f'"Doe, Sender" <{SENDER}>')
        self.assertEqual(payload["to"], ["Jane Doe <jane@example.com>", "john@example.com"])
        self.assertEqual(payload["cc"], ['"ann \\"the\\" dev (work)" <ann@example.com>'])

    def test_comment_only_from(self) -> None:
        """From: addr (Name) gives Name <addr>."""
        self.assertEqual(_payload(_message(f"From: {SENDER} (Jane)"))["from"], f"Jane <{SENDER}>")

    def test_route_syntax_ignored(self) -> None:
        """Source routes in header addresses are dropped; their commas do not split the list."""
        envelope = Envelope(SENDER, (RCPT, "cc@example.com"))
        payload = _payload(
            _message(
                f"From: Jane <@relay.example,@hop.example:{SENDER}>",
                f"To: <@relay.example:{RCPT}>",
                "Cc: Cee < @a.example , @b.example :cc@example.com>",
            ),
            envelope,
        )
        self.assertEqual(
            (payload["from"], payload["to"], payload["cc"]),
            (f"Jane <{SENDER}>", [RCPT], ["Cee <cc@example.com>"]),
        )

    def test_quoted_local_part(self) -> None:
        """A quoted local part is a valid From address and is kept as written."""
        self.assertEqual(
            _payload(_message('From: "john doe"@yourdomain.com'))["from"],
            '"john doe"@yourdomain.com',
        )

    def test_idn_domains_become_a_labels(self) -> None:
        """
        U-label domains (raw in headers or in the envelope) reach the API as
        A-labels, local parts and names as UTF-8; an A-label stays as sent;
        the To spelling in any case matches the envelope's (no Bcc).
        """
        envelope = Envelope(SENDER, ("jörg@bücher.example", "x@xn--bcher-kva.example", "y@例子.example"))
        payload = _payload(
            _message(
                "From: Jörg <jörg@bücher.example>",
                "To: JÖRG@BÜCHER.example, x@bücher.example",
                "Cc: =?utf-8?q?Y_=E4=BE=8B?= <y@xn--fsqu00a.EXAMPLE>",
                "Reply-To: \"Müller, Jörg\" <jörg@bücher.example>, bad@\u2603.example",
            ),
            envelope,
        )
        self.assertEqual(payload["from"], "Jörg <jörg@xn--bcher-kva.example>")
        self.assertEqual(payload["to"], ["JÖRG@xn--bcher-kva.example", "x@xn--bcher-kva.example"])
        self.assertEqual(payload["cc"], ["Y 例 <y@xn--fsqu00a.EXAMPLE>"])
        self.assertNotIn("bcc", payload)
        # An address whose domain has no A-label is dropped from Reply-To, as other non-addresses are.
        self.assertEqual(payload["reply_to"], '"Müller, Jörg" <jörg@xn--bcher-kva.example>')

    def test_bad_idn_refused(self) -> None:
        """A From or envelope address whose domain is not IDNA 2008 is refused before the API."""
        self._assert_refused(
            _message("From: a@\u2603.example", "To: user@example.com"),
            "554 5.6.0 From header address is not valid: its domain is not a valid"
            " internationalized domain name (IDNA 2008)",
            Envelope(SENDER, ("user@example.com",)),
        )
        error = self._refused(
            _message("From: you@yourdomain.com", "To: a@xn--zz.example"),
            Envelope(SENDER, ("a@xn--zz.example",)),
        )
        self.assertEqual((error.code, error.enhanced), (554, "5.1.3"))
        self.assertIn("IDNA 2008", error.text)

    def test_from_length_limits(self) -> None:
        """From addresses follow RFC 5321: local part 64, domain 255, address 254 octets."""
        reply = (
            "554 5.6.0 From header address is too long (RFC 5321: local part at most"
            " 64 octets, domain at most 255, address at most 254)"
        )
        label = "d" * 60 + "."
        for address, ok in [
            ("a" * 64 + "@yourdomain.com", True),
            ("a" * 65 + "@yourdomain.com", False),
            ("é" * 32 + "@yourdomain.com", True),
            ("é" * 33 + "@yourdomain.com", False),  # 66 octets in UTF-8
            ("a@" + label * 3 + "d" * 58 + ".com", True),  # 245 octets
            ("a" * 64 + "@" + label * 3 + "d" * 5 + ".com", False),  # 254 < 257
        ]:
            raw = _message(f"From: {address}")
            if ok:
                self.assertEqual(_payload(raw)["from"], address)
            else:
                self._assert_refused(raw, reply)

    def test_bad_envelope_recipients_refused(self) -> None:
        """Envelope recipients with controls, spaces or over-long parts never reach the API."""
        for recipient, problem in [
            ("us\x00er@example.com", "not valid; use name@domain"),
            ("a\rb@example.com", "not valid; use name@domain"),
            ("a\u2028b@example.com", "not valid; use name@domain"),
            ("a b@example.com", "not valid; use name@domain"),
            ("a" * 65 + "@example.com", "too long"),
        ]:
            error = self._refused(
                _message(f"From: {SENDER}"), Envelope(SENDER, (RCPT, recipient))
            )
            self.assertEqual((error.code, error.enhanced), (554, "5.1.3"))
            self.assertTrue(
                error.text.startswith(f"Envelope recipient address is {problem}"),
                error.text,
            )

    def test_bad_envelope_sender_fallback_refused(self) -> None:
        """Without From, an envelope sender with control characters is refused."""
        self._assert_refused(
            _message("To: user@example.com"),
            "554 5.6.0 Message has no From header and the envelope sender is not a"
            " valid address; add a From header",
            Envelope("s\x00@yourdomain.com", (RCPT,)),
        )

    def test_mailbox_checks_what_is_sent(self) -> None:
        """With control characters in From, the address the mailbox rule checked is the one sent."""
        raw = _message(b"From: Me <s\x00@your\x7fdomain.com\x1b>")
        self.assertEqual(_payload(raw, mailbox=SENDER)["from"], f"Me <{SENDER}>")
        error = self._refused(
            _message(b"From: <other\x00@yourdomain.com>"), mailbox=SENDER
        )
        self.assertEqual((error.code, error.enhanced), (550, "5.7.1"))


# ---------------------------------------------------------------------------
# Property tests.

_PROPERTY = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _examples(count: int) -> settings:
    """Deterministic settings (fixed derivation, no example database) with ``count`` examples."""
    return settings(_PROPERTY, max_examples=count)

_HOSTILE_PIECES = [
    b"\r\n",
    b"\n",
    b"\r",
    b"\x00",
    b"\t",
    b" ",
    b":",
    b",",
    b";",
    b"<",
    b">",
    b"@",
    b'"',
    b"(",
    b")",
    b"\\",
    b"=?utf-8?b?",
    b"=?utf-8?q?",
    b"?=",
    b"=0D=0A",
    b"=00",
    b"DQo=",
    b"\xc2\x85",
    b"\xe2\x80\xa8",
    b"\x85",
    b"\x1b",
    b"\x7f",
    b"\xff",
    b"\xed\xa0\x80",
    b"From: ",
    b"To: ",
    b"Cc: ",
    b"Subject: ",
    b"X-A: ",
    b"X-PostStack-Tags: ",
    b"X-PostStack-Template-Id: ",
    b"X-PostStack-Idempotency-Key: ",
    b"X-PostStack-Variables: ",
    b"References: ",
    b"Content-Type: multipart/mixed; boundary=z",
    b"Content-Disposition: attachment; filename=",
    b"\r\n--z\r\n",
    b"\r\n--z--\r\n",
    b'{"a": "',
    b'"}',
    b"\\u0000",
    b"s@yourdomain.com",
    b"user@example.com",
    b"other@example.com",
]

_PROPERTY_ENVELOPE = Envelope(SENDER, (RCPT, "other@example.com"))

_hostile_bytes = st.lists(
    st.one_of(st.sampled_from(_HOSTILE_PIECES), st.binary(min_size=1, max_size=6)),
    max_size=80,
).map(b"".join)


# Generated MIME trees.  A tree is serialized by _render.

_BOUNDARY_CHARS = "abcz019'()+_,-./:=? "
_FILENAMES = st.one_of(
    st.text(max_size=20),
    st.sampled_from(
        [
            "../../etc/passwd",
            "C:\\Windows\\evil.exe",
            "a\r\nContent-Type: text/html",
            "a\x00b.txt",
            '"quoted".pdf',
            "a;b=c.txt",
            "=?utf-8?b?Li4vLi4vZXZpbA0KLnR4dA==?=",
            "\u202eexe.pdf",
            "..",
            ".",
            "x" * 400 + ".pdf",
            "  ",
        ]
    ),
)
_CHARSETS = st.sampled_from(
    ["utf-8", "us-ascii", "iso-8859-1", "koi8-r", "utf-7", "utf-16", "undefined", "rot13", "", "x" * 50]
)
_ENCODINGS = st.sampled_from(["", "7bit", "8bit", "binary", "base64", "quoted-printable", "x-uuencode"])


def _leaf() -> st.SearchStrategy[dict[str, Any]]:
    """A leaf part: type, charset, encoding, filename, disposition, content."""
    return st.fixed_dictionaries(
        {
            "type": st.sampled_from(
                [
                    "text/plain",
                    "text/html",
                    "text/calendar",
                    "application/pdf",
                    "image/png",
                    "text/x-amp-html",
                    "bogus",
                    "",
                ]
            ),
            "charset": _CHARSETS,
            "encoding": _ENCODINGS,
            "filename": st.one_of(st.none(), _FILENAMES),
            "rfc2231": st.booleans(),
            "disposition": st.sampled_from([None, "attachment", "inline", "bogus"]),
            "content": st.one_of(
                st.binary(max_size=60), st.text(max_size=40).map(lambda t: t.encode("utf-8"))
            ),
            "garble": st.booleans(),
        }
    )


def _container(children: st.SearchStrategy[list[dict[str, Any]]]) -> st.SearchStrategy[dict[str, Any]]:
    """A multipart or message/rfc822 container of generated children."""
    return st.fixed_dictionaries(
        {
            "type": st.sampled_from(
                ["multipart/mixed", "multipart/alternative", "multipart/related", "message/rfc822"]
            ),
            "boundary": st.text(alphabet=_BOUNDARY_CHARS, min_size=0, max_size=12),
            "children": children,
            "close": st.booleans(),
            "preamble": st.sampled_from([b"", b"preamble\r\n", b"--\r\n"]),
        }
    )


_TREES = st.recursive(
    _leaf(), lambda children: _container(st.lists(children, max_size=4)), max_leaves=12
)


def _quote(value: str) -> str:
    """A quoted-string parameter value (as clients write them, escapes included)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _render(tree: dict[str, Any]) -> bytes:
    """Serialize a generated MIME tree (headers of the part, blank line, body)."""
    if "children" in tree:
        if tree["type"] == "message/rfc822":
            head = b"Content-Type: message/rfc822\r\n\r\nSubject: inner\r\n"
            if not tree["children"]:
                return head + b"\r\n"
            return head + _render(tree["children"][0])
        boundary = tree["boundary"]
        head = f"Content-Type: {tree['type']}; boundary={_quote(boundary)}\r\n\r\n".encode()
        body = tree["preamble"]
        for child in tree["children"]:
            body += b"--" + boundary.encode() + b"\r\n" + _render(child) + b"\r\n"
        if tree["close"]:
            body += b"--" + boundary.encode() + b"--\r\n"
        return head + body
    lines = []
    content_type = tree["type"]
    if content_type:
        line = f"Content-Type: {content_type}"
        if tree["charset"]:
            line += f"; charset={_quote(tree['charset'])}"
        lines.append(line)
    if tree["encoding"]:
        lines.append(f"Content-Transfer-Encoding: {tree['encoding']}")
    filename = tree["filename"]
    if tree["disposition"] is not None or filename is not None:
        line = f"Content-Disposition: {tree['disposition'] or 'attachment'}"
        if filename is not None:
            if tree["rfc2231"]:
                encoded = quote(filename.encode("utf-8", "surrogatepass"), safe="")
                line += "; filename*=utf-8''" + encoded
            else:
                line += f"; filename={_quote(filename)}"
        lines.append(line)
    content: bytes = tree["content"]
    if tree["encoding"] == "base64" and not tree["garble"]:
        content = base64.encodebytes(content)
    elif tree["encoding"] == "quoted-printable" and not tree["garble"]:
        content = binascii.b2a_qp(content)
    head = "".join(line + "\r\n" for line in lines).encode("utf-8", "surrogatepass")
    return head + b"\r\n" + content


class PropertyTests(SynchronousTestCase):
    """For any input: a request that passes the schema, or a well-formed refusal."""

    @_examples(1500)
    @given(raw=_hostile_bytes, mailbox=st.sampled_from([None, SENDER]))
    def test_any_hostile_bytes(self, raw: bytes, mailbox: str | None) -> None:
        """Any bytes drawn from a header-injection alphabet give a valid request or a refusal."""
        check_translation(self, raw, _PROPERTY_ENVELOPE, mailbox)

    @_examples(800)
    @given(
        headers=st.lists(
            st.tuples(
                st.sampled_from(
                    [
                        b"Subject",
                        b"From",
                        b"To",
                        b"Cc",
                        b"Reply-To",
                        b"X-Custom",
                        b"References",
                        b"Organization",
                        b"X-PostStack-Tags",
                        b"X-PostStack-Template-Id",
                        b"X-PostStack-Idempotency-Key",
                        b"X-PostStack-Variables",
                    ]
                ),
                _hostile_bytes,
            ),
            max_size=8,
        ),
    )
    def test_hostile_header_values(self, headers: list[tuple[bytes, bytes]]) -> None:
        """Hostile values in every header the relay reads give a valid request or a refusal."""
        raw = (
            b"From: s@yourdomain.com\r\nTo: user@example.com\r\n"
            + b"".join(name + b": " + value + b"\r\n" for name, value in headers)
            + b"\r\nbody\r\n"
        )
        check_translation(self, raw, _PROPERTY_ENVELOPE)

    @_examples(500)
    @given(tree=_TREES, cut=st.one_of(st.none(), st.integers(min_value=0, max_value=4000)))
    def test_random_mime_trees(self, tree: dict[str, Any], cut: int | None) -> None:
        """Random MIME trees (odd boundaries, encodings, charsets, filenames), whole or cut, give a valid result."""
        raw = f"From: {SENDER}\r\nTo: {RCPT}\r\nMIME-Version: 1.0\r\n".encode() + _render(tree)
        if cut is not None:
            raw = raw[:cut]
        check_translation(self, raw, _PROPERTY_ENVELOPE)

    @_examples(500)
    @given(
        name=st.sampled_from(sorted(_SAMPLES)),
        edits=st.lists(
            st.tuples(
                st.sampled_from(
                    ["truncate", "drop_line", "duplicate_line", "insert", "line_ends", "boundary"]
                ),
                st.integers(min_value=0, max_value=2**16),
                st.sampled_from(_HOSTILE_PIECES),
            ),
            min_size=1,
            max_size=4,
        ),
        mailbox=st.sampled_from([None, "you@yourdomain.com"]),
    )
    def test_mutated_corpus(
        self, name: str, edits: list[tuple[str, int, bytes]], mailbox: str | None
    ) -> None:
        """Real client messages with lines dropped, repeated, injected or cut give a valid result."""
        raw = _SAMPLES[name]
        for operation, position, piece in edits:
            lines = raw.split(b"\r\n")
            index = position % len(lines)
            if operation == "truncate":
                raw = raw[: position % (len(raw) + 1)]
            elif operation == "drop_line":
                del lines[index]
                raw = b"\r\n".join(lines)
            elif operation == "duplicate_line":
                lines.insert(index, lines[index])
                raw = b"\r\n".join(lines)
            elif operation == "insert":
                lines.insert(index, b"X-Injected: " + piece + b"Bcc: evil@example.com")
                raw = b"\r\n".join(lines)
            elif operation == "line_ends":
                raw = raw.replace(b"\r\n", piece if piece in (b"\n", b"\r") else b"\n")
            else:
                boundaries = re.findall(rb'boundary="?([^";\r\n]+)', raw)
                if boundaries:
                    raw = raw.replace(boundaries[position % len(boundaries)], piece)
        envelope = Envelope(
            "you@yourdomain.com", (RCPT, "other@example.com", "tanaka@example.jp")
        )
        check_translation(self, raw, envelope, mailbox)
