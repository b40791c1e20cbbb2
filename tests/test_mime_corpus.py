"""
The MIME corpus of C{tests/mime/}: every message there, translated, must give
exactly the C{POST /emails} body written down for it in
L{tests.common.corpus.EXPECTATIONS}.

Each entry names the envelope recipients (C{rcpt}), the features of the
corpus the file stands for (C{covers}, checked against the raw bytes), and
every field of the expected payload; an attachment is C{(filename,
content_type, sha256 of the decoded content)}. A payload key that is not
listed must be absent. A file without an entry fails, and so does an entry
without a file.

The same table gives the envelopes for the cross-check against nodemailer's
mailparser in C{tests/e2e/test_mime_crosscheck.py}.
"""

from __future__ import annotations

import base64
import re
from collections import Counter
from collections.abc import Callable
from email import message_from_bytes
from email.message import Message
from email.policy import compat32
from email.utils import getaddresses
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from poststack_relay.translate import Envelope, translate
from tests.common.corpus import EXPECTATIONS, MIME_DIR, corpus_names, envelope, load, sha256

# ---------------------------------------------------------------------------
# What the corpus must cover (the list), and how each claim is checked
# on the raw bytes of a file.


def _header_lines(raw: bytes) -> list[bytes]:
    """The lines of the top-level header section."""
    end = raw.find(b"\r\n\r\n")
    head = raw if end < 0 else raw[:end]
    return head.split(b"\r\n")


def _field_names(raw: bytes) -> list[str]:
    """The names of the top-level header fields, as written."""
    return [
        line.split(b":", 1)[0].decode("ascii")
        for line in _header_lines(raw)
        if line and line[:1] not in (b" ", b"\t") and b":" in line
    ]


def _parse(raw: bytes) -> Message:
    """Parse with the stdlib (independently of translate's own parsing)."""
    return message_from_bytes(raw, policy=compat32)


def _parts(raw: bytes) -> list[Message]:
    """Every part of the message, the message itself first."""
    return list(_parse(raw).walk())


def _top_values(raw: bytes, *names: str) -> list[str]:
    """The unfolded values of top-level header fields, raw 8-bit as UTF-8."""
    values: list[str] = []
    current: bytes | None = None
    for line in [*_header_lines(raw), b"X-End: ."]:
        if line[:1] in (b" ", b"\t") and current is not None:
            current += line
            continue
        if current is not None:
            name, _, value = current.partition(b":")
            if name.decode("ascii").lower() in names:
                values.append(value.decode("utf-8", "replace").strip())
        current = line
    return values


def _addresses(raw: bytes) -> list[str]:
    """The addresses of From, To and Cc."""
    return [address for _, address in getaddresses(_top_values(raw, "from", "to", "cc"))]


def _cte(raw: bytes, encoding: str) -> bool:
    """Whether some part has this Content-Transfer-Encoding."""
    return any(
        str(part.get("content-transfer-encoding", "")).strip().lower() == encoding
        for part in _parts(raw)
    )


def _charset(label: str) -> Callable[[bytes], bool]:
    """A check for a charset label on a part or in an encoded-word."""
    pattern = re.compile(
        rb'charset="?' + re.escape(label.encode()) + rb'[";\s]|=\?' + re.escape(label.encode()) + rb"\?",
        re.IGNORECASE,
    )
    return lambda raw: pattern.search(raw) is not None


def _nested(raw: bytes, *types: str) -> bool:
    """Whether multipart types nest as given, each a direct child of the one before."""

    def down(part: Message, rest: tuple[str, ...]) -> bool:
        if part.get_content_type() != rest[0]:
            return False
        if len(rest) == 1:
            return True
        return part.is_multipart() and any(down(child, rest[1:]) for child in part.get_payload())

    return any(down(part, types) for part in _parts(raw))


def _leaves(raw: bytes) -> list[Message]:
    """The leaf parts."""
    return [part for part in _parts(raw) if not part.is_multipart()]


FEATURES: dict[str, Callable[[bytes], bool]] = {
    "charset utf-8": _charset("utf-8"),
    "charset us-ascii": _charset("us-ascii"),
    "charset iso-8859-1": _charset("iso-8859-1"),
    "charset windows-1252": _charset("windows-1252"),
    "charset shift_jis": _charset("shift_jis"),
    "charset koi8-r": _charset("koi8-r"),
    "charset iso-2022-jp": _charset("iso-2022-jp"),
    "charset gb2312": _charset("gb2312"),
    "quoted-printable": lambda raw: _cte(raw, "quoted-printable"),
    "base64": lambda raw: _cte(raw, "base64"),
    "8bit": lambda raw: _cte(raw, "8bit") and re.search(rb"[\x80-\xff]", raw) is not None,
    "RFC 2047 subject": lambda raw: any("=?" in v for v in _top_values(raw, "subject")),
    "RFC 2047 display name": lambda raw: any(
        "=?" in v for v in _top_values(raw, "from", "to", "cc", "reply-to")
    ),
    "RFC 2231 continuation": lambda raw: re.search(rb"(?:file)?name\*1\*?=", raw) is not None,
    "RFC 2231 filename": lambda raw: re.search(rb"filename\*(?:0\*)?=[\w-]+'", raw, re.I)
    is not None,
    "mixed > related > alternative": lambda raw: _nested(
        raw, "multipart/mixed", "multipart/related", "multipart/alternative"
    ),
    "html only": lambda raw: {p.get_content_type() for p in _leaves(raw)} == {"text/html"},
    "text only": lambda raw: not _parse(raw).is_multipart()
    and _parse(raw).get_content_type() == "text/plain",
    "attachment only": lambda raw: all(
        str(p.get("content-disposition", "")).lower().startswith("attachment")
        for p in _leaves(raw)
    ),
    "empty body": lambda raw: not _parse(raw).is_multipart()
    and not str(_parse(raw).get_payload()).strip(),
    "message/rfc822": lambda raw: any(
        p.get_content_type() == "message/rfc822" for p in _parts(raw)
    ),
    "multipart/digest": lambda raw: any(
        p.get_content_type() == "multipart/digest" for p in _parts(raw)
    ),
    "multipart/signed": lambda raw: any(
        p.get_content_type() == "multipart/signed" for p in _parts(raw)
    ),
    "inline image": lambda raw: any(
        p.get_content_maintype() == "image" and p.get("content-id") for p in _leaves(raw)
    ),
    "inline text attachment": lambda raw: any(
        p.get_content_type() == "text/plain"
        and str(p.get("content-disposition", "")).lower().startswith("inline")
        and p.get_filename()
        for p in _leaves(raw)
    ),
    "calendar": lambda raw: any(p.get_content_type() == "text/calendar" for p in _leaves(raw)),
    "template": lambda raw: "x-poststack-template-id" in map(str.lower, _field_names(raw)),
    "folded headers": lambda raw: any(
        line[:1] in (b" ", b"\t") for line in _header_lines(raw)[1:]
    ),
    "duplicate headers": lambda raw: max(
        Counter(name.lower() for name in _field_names(raw)).values()
    )
    > 1,
    "lower-case header names": lambda raw: any(
        name == name.lower() and re.search("[a-z]", name) for name in _field_names(raw)
    ),
    "several X-PostStack-Tags": lambda raw: [n.lower() for n in _field_names(raw)].count(
        "x-poststack-tags"
    )
    > 1,
    "no Date": lambda raw: "date" not in map(str.lower, _field_names(raw)),
    "no Message-ID": lambda raw: "message-id" not in map(str.lower, _field_names(raw)),
    "Unicode address": lambda raw: any(
        not address.rpartition("@")[0].isascii() for address in _addresses(raw)
    ),
    "IDN address": lambda raw: any(
        (domain := address.rpartition("@")[2]).startswith("xn--")
        or ".xn--" in domain
        or not domain.isascii()
        for address in _addresses(raw)
    ),
}

REQUIRED_FEATURES = frozenset(
    {
        "charset utf-8",
        "charset iso-8859-1",
        "charset windows-1252",
        "charset shift_jis",
        "charset koi8-r",
        "quoted-printable",
        "base64",
        "8bit",
        "RFC 2047 subject",
        "RFC 2047 display name",
        "RFC 2231 continuation",
        "mixed > related > alternative",
        "html only",
        "text only",
        "attachment only",
        "empty body",
        "message/rfc822",
        "multipart/signed",
        "folded headers",
        "duplicate headers",
        "lower-case header names",
        "several X-PostStack-Tags",
        "no Date",
        "no Message-ID",
        "Unicode address",
        "IDN address",
    }
)
"""The shapes the issue asks the corpus to cover."""


def _observed(name: str) -> dict[str, Any]:
    """Translate a corpus file and make its payload comparable with L{EXPECTATIONS}."""
    request = translate(load(name), envelope(name))
    payload = dict(request.payload)
    if "attachments" in payload:
        payload["attachments"] = [
            (
                attachment["filename"],
                attachment["content_type"],
                sha256(base64.b64decode(attachment["content"], validate=True)),
            )
            for attachment in payload["attachments"]
        ]
    return payload


class CorpusTests(SynchronousTestCase):
    """Each corpus message gives exactly the request written down for it."""

    def check(self, name: str) -> None:
        """Compare the translation of C{name} with its expectation, field by field."""
        expected = {
            key: value
            for key, value in EXPECTATIONS[name].items()
            if key not in ("covers", "rcpt")
        }
        observed = _observed(name)
        self.assertEqual(sorted(observed), sorted(expected), f"{name}: payload keys")
        for key, value in expected.items():
            self.assertEqual(observed[key], value, f"{name}: {key}")


def _add_corpus_tests() -> None:
    """Give L{CorpusTests} one test method per corpus file."""
    for name in EXPECTATIONS:

        def test(self: CorpusTests, name: str = name) -> None:
            self.check(name)

        test.__name__ = "test_" + re.sub(r"\W", "_", name.removesuffix(".eml"))
        test.__doc__ = f"{name} translates into exactly the API request written down for it."
        setattr(CorpusTests, test.__name__, test)


_add_corpus_tests()


class CorpusListTests(SynchronousTestCase):
    """The corpus is complete, listed and covers what the issue asks for."""

    def test_every_file_has_an_expectation(self) -> None:
        """Every .eml file in tests/mime/ has an entry in EXPECTATIONS."""
        missing = sorted(set(corpus_names()) - set(EXPECTATIONS))
        self.assertEqual(missing, [], "add an EXPECTATIONS entry for each new file")

    def test_every_expectation_has_a_file(self) -> None:
        """Every EXPECTATIONS entry names a file that exists."""
        self.assertEqual(sorted(set(EXPECTATIONS) - set(corpus_names())), [])

    def test_at_least_forty_messages(self) -> None:
        """The corpus holds at least 40 messages."""
        self.assertGreaterEqual(len(corpus_names()), 40)

    def test_readme_lists_every_file(self) -> None:
        """tests/mime/README.md describes every file of the corpus."""
        readme = (MIME_DIR / "README.md").read_text("utf-8")
        unlisted = [name for name in corpus_names() if f"`{name}`" not in readme]
        self.assertEqual(unlisted, [])

    def test_claimed_features_hold(self) -> None:
        """Each feature a file claims to cover is really in its bytes."""
        wrong = [
            (name, feature)
            for name, expectation in EXPECTATIONS.items()
            for feature in expectation["covers"]
            if not FEATURES[feature](load(name))
        ]
        self.assertEqual(wrong, [])

    def test_required_features_covered(self) -> None:
        """Every shape the issue lists is covered by at least one file."""
        covered = {f for e in EXPECTATIONS.values() for f in e["covers"]}
        self.assertEqual(sorted(REQUIRED_FEATURES - covered), [])

    def test_feature_checks_can_fail(self) -> None:
        """The feature checks reject a plain message that has none of the features."""
        plain = (
            b"From: a@yourdomain.com\r\nTo: b@example.com\r\nSubject: x\r\n"
            b"Date: Mon, 01 Apr 2024 00:00:00 +0000\r\nMessage-ID: <x@y>\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
            b"--b\r\nContent-Type: text/plain\r\n\r\nhello\r\n--b--\r\n"
        )
        self.assertEqual([f for f in REQUIRED_FEATURES if FEATURES[f](plain)], [])


# ---------------------------------------------------------------------------
# multipart/signed: the content is relayed, the detached signature dropped.


def _signed(signature_type: str, *, filename: str = "smime.p7s") -> bytes:
    """A multipart/signed message: a text part and a signature of the given type."""
    return (
        "From: a@yourdomain.com\r\nTo: b@example.com\r\nSubject: signed\r\n"
        "MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/signed; protocol="{signature_type}"; micalg=sha-256;'
        ' boundary="sig"\r\n\r\n'
        "--sig\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nSigned text.\r\n"
        f"--sig\r\nContent-Type: {signature_type}; name={filename}\r\n"
        f"Content-Disposition: attachment; filename={filename}\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\nMIIBAAYJKoZIhvcNAQcCoA==\r\n--sig--\r\n"
    ).encode("ascii")


def _signed_payload(raw: bytes) -> dict[str, Any]:
    """Translate a message for b@example.com."""
    return translate(raw, Envelope("a@yourdomain.com", ["b@example.com"])).payload


class MultipartSignedTests(SynchronousTestCase):
    """The signed content of multipart/signed is relayed; the detached signature is not."""

    def test_smime_signature_dropped(self) -> None:
        """An S/MIME application/pkcs7-signature part is not sent as an attachment."""
        payload = _signed_payload(_signed("application/pkcs7-signature"))
        self.assertEqual(payload["text"], "Signed text.")
        self.assertNotIn("attachments", payload)

    def test_legacy_smime_signature_dropped(self) -> None:
        """The pre-standard application/x-pkcs7-signature spelling is dropped too."""
        payload = _signed_payload(_signed("application/x-pkcs7-signature"))
        self.assertNotIn("attachments", payload)

    def test_openpgp_signature_dropped(self) -> None:
        """An OpenPGP application/pgp-signature part is not sent as an attachment."""
        raw = _signed("application/pgp-signature", filename="OpenPGP_signature.asc")
        payload = _signed_payload(raw)
        self.assertEqual(payload["text"], "Signed text.")
        self.assertNotIn("attachments", payload)

    def test_other_second_part_kept(self) -> None:
        """A malformed multipart/signed whose second part is no signature loses nothing."""
        payload = _signed_payload(_signed("application/octet-stream", filename="data.bin"))
        self.assertEqual(
            [(a["filename"], a["content_type"]) for a in payload["attachments"]],
            [("data.bin", "application/octet-stream")],
        )

    def test_signature_file_outside_signed_kept(self) -> None:
        """A .p7s file attached to an ordinary multipart/mixed message stays an attachment."""
        raw = _signed("application/pkcs7-signature").replace(
            b"multipart/signed", b"multipart/mixed"
        )
        payload = _signed_payload(raw)
        self.assertEqual(
            [(a["filename"], a["content_type"]) for a in payload["attachments"]],
            [("smime.p7s", "application/pkcs7-signature")],
        )

    def test_signature_as_first_part_kept(self) -> None:
        """Only parts after the signed content are taken for signatures."""
        raw = (
            b"From: a@yourdomain.com\r\nTo: b@example.com\r\nMIME-Version: 1.0\r\n"
            b'Content-Type: multipart/signed; boundary="s"\r\n\r\n'
            b"--s\r\nContent-Type: application/pgp-signature; name=a.asc\r\n\r\n"
            b"sig\r\n--s\r\nContent-Type: text/plain\r\n\r\nText.\r\n--s--\r\n"
        )
        payload = _signed_payload(raw)
        self.assertEqual(payload["text"], "Text.")
        self.assertEqual([a["filename"] for a in payload["attachments"]], ["a.asc"])
