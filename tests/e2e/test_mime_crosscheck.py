"""
Cross-check the relay's MIME translation against an independent parser:
nodemailer's C{mailparser} (pinned in C{tests/e2e/node/package.json}), run by
C{tests/e2e/node/parse.mjs}.

For every message of C{tests/mime/}, L{translate} and mailparser must agree on
the subject, the sender, the To and Cc recipients, the text and html bodies and
the attachments (filename, type and SHA-256 of the content), after the
normalisations below, which only undo differences of representation:

  - bodies: CRLF becomes LF, trailing white space of each line and trailing
    blank lines are ignored (a parser may or may not keep the line break
    before a boundary);
  - a body is compared only where mailparser found a real part for it
    (C{hasText}/C{hasHtml}); where it found none, the relay must send none
    either, except the C{text: ""} it adds when the message has no body at
    all (the API requires text or html);
  - attachment types are compared without parameters (the relay keeps
    C{charset} and C{method}), against the part's own Content-Type (mailparser
    guesses a type from the filename for application/octet-stream);
  - a part without a filename is unnamed on mailparser's side and
    C{attachment-N.ext} on the relay's;
  - addresses compare with C{xn--} domains decoded (mailparser decodes them,
    the relay passes them on as written); To and Cc are compared when the
    headers name someone (the relay's fallback for C{To: undisclosed-
    recipients:;} puts the envelope's blind recipients into C{to}).

Where the two disagree on purpose, L{KNOWN_DIFFERENCES} says why (the same
reasons are in C{docs/mime-mapping.md}), and the test checks that exactly that
difference is still there: an entry that stops being needed fails too.

The tests are skipped when node or npm is missing, except under CI
(C{CI=true}), where that fails them.
"""

from __future__ import annotations

import base64
import re
import shutil
import tempfile
from dataclasses import dataclass
from email.utils import parseaddr
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from tests.common.processes import missing

from poststack_relay.translate import translate
from tests.common.node import ensure_node_modules, node_available, run_node_script
from tests.common.corpus import EXPECTATIONS, corpus_names, envelope, load, sha256


@dataclass(frozen=True)
class Difference:
    """
    A deliberate disagreement between the relay and mailparser on one message.

    @ivar reason: Why the relay does what it does.
    @ivar fields: Scalar fields that must differ: C{"subject"}, C{"from"},
        C{"to"}, C{"text"}, C{"html"}.
    @ivar only_relay: Attachment filenames only the relay sends.
    @ivar only_mailparser: Attachments only mailparser lists, by filename or,
        for an unnamed part, by its declared type.
    """

    reason: str
    fields: tuple[str, ...] = ()
    only_relay: tuple[str, ...] = ()
    only_mailparser: tuple[str, ...] = ()


_SIGNATURE = (
    "the detached signature of multipart/signed is dropped: it signs MIME bytes the"
    " API rebuilds, so it could only ever fail to verify"
)

KNOWN_DIFFERENCES: dict[str, Difference] = {
    "apple_mail_smime_signed.eml": Difference(_SIGNATURE, only_mailparser=("smime.p7s",)),
    "thunderbird_pgp_mime_signed.eml": Difference(
        _SIGNATURE, only_mailparser=("OpenPGP_signature.asc",)
    ),
    "gmail_amp_alternative.eml": Difference(
        "text/* alternatives other than plain, html and calendar (AMP) are other"
        " renderings of the body; the API cannot send them, so the relay drops them",
        only_mailparser=("text/x-amp-html",),
    ),
    "apple_mail_split_html.eml": Difference(
        "the first text/html part is the html body; mailparser joins all inline html"
        " parts with <br/>, the relay sends the second one as an attachment",
        fields=("html",),
        only_relay=("attachment-2.html",),
    ),
    "mutt_inline_text_attachment.eml": Difference(
        "a text/plain part with a filename is an attachment even when inline;"
        " mailparser appends it to the text body",
        fields=("text",),
        only_relay=("notes.txt",),
    ),
    "mutt_forward_inline_rfc822.eml": Difference(
        "message/rfc822 is always an .eml attachment; mailparser renders an inline"
        " one into the text body",
        fields=("text",),
        only_relay=("attachment-1.eml",),
    ),
    "mailman_mime_digest.eml": Difference(
        "a multipart/digest part without Content-Type is message/rfc822 (RFC 2046"
        " section 5.1.5), so an .eml attachment; mailparser takes it for text/plain."
        " The list footer, a second text/plain part, is an attachment too; mailparser"
        " appends both to the text body",
        fields=("text",),
        only_relay=("attachment-1.eml", "attachment-3.txt"),
    ),
    "stdlib_legacy_nonascii_headers.eml": Difference(
        "Python's legacy API encodes whole address fields as one encoded-word;"
        " the relay decodes and re-parses them, mailparser finds no address",
        fields=("from",),
    ),
    "folded_duplicate_headers.eml": Difference(
        "unfolding removes only the CRLF (RFC 5322 section 2.2.3), so the fold's"
        " white space stays; mailparser collapses it to one space",
        fields=("subject",),
    ),
}

_SYNTHETIC_NAME = re.compile(r"attachment-[0-9]+\.[a-z0-9]+")


def _body(text: str | None) -> str | None:
    """A body with LF line ends, without trailing white space on lines or at the end."""
    if text is None:
        return None
    lines = text.replace("\r\n", "\n").split("\n")
    return "\n".join(line.rstrip() for line in lines).rstrip("\n")


def _address(address: str) -> str:
    """An address with its xn-- domain labels decoded, as mailparser reports them."""
    local, at, domain = address.rpartition("@")
    labels = []
    for label in domain.split("."):
        if label.lower().startswith("xn--"):
            try:
                label = label.encode("ascii").decode("idna")
            except UnicodeError:
                pass
        labels.append(label)
    return f"{local}{at}{'.'.join(labels)}"


def _relay_mailboxes(values: list[str]) -> list[tuple[str, str]]:
    """The relay's formatted addresses as (name, address) pairs."""
    pairs = []
    for value in values:
        name, address = parseaddr(value)
        pairs.append((name, _address(address)))
    return pairs


def _mailparser_mailboxes(values: list[dict[str, str]]) -> list[tuple[str, str]]:
    """mailparser's addresses as (name, address) pairs."""
    return [(entry["name"], _address(entry["address"])) for entry in values]


def relay_view(name: str) -> dict[str, Any]:
    """What the relay sends for a corpus file, in the cross-check's terms."""
    payload = translate(load(name), envelope(name)).payload
    return {
        "subject": payload.get("subject", ""),
        "from": _relay_mailboxes([payload["from"]]),
        "to": _relay_mailboxes(payload["to"]),
        "cc": _relay_mailboxes(payload.get("cc", [])),
        "text": payload.get("text"),
        "html": payload.get("html"),
        "attachments": [
            (
                attachment["filename"],
                attachment["content_type"].partition(";")[0],
                sha256(base64.b64decode(attachment["content"])),
            )
            for attachment in payload.get("attachments", [])
        ],
    }


def mailparser_view(result: dict[str, Any]) -> dict[str, Any]:
    """What mailparser sees, in the cross-check's terms."""
    return {
        "subject": result["subject"] or "",
        "from": _mailparser_mailboxes(result["from"]),
        "to": _mailparser_mailboxes(result["to"]),
        "cc": _mailparser_mailboxes(result["cc"]),
        "text": result["text"] if result["hasText"] else None,
        "html": result["html"] if result["hasHtml"] else None,
        "attachments": [
            (
                attachment["filename"],
                attachment["declaredType"] or attachment["contentType"],
                attachment["sha256"],
            )
            for attachment in result["attachments"]
        ],
    }


class MimeCrossCheckTests(TestCase):
    """translate() and nodemailer's mailparser agree on every corpus message."""

    def setUp(self) -> None:
        reason = node_available()
        if reason is not None:
            raise missing(f"the mailparser cross-check cannot run: {reason}")
        ensure_node_modules()
        directory = tempfile.mkdtemp(prefix="poststack-crosscheck-")
        self.addCleanup(shutil.rmtree, directory, True)
        self.directory = Path(directory)

    async def mailparser(self, name: str) -> dict[str, Any]:
        """Run parse.mjs on the corpus file as it arrives in DATA (CRLF)."""
        path = self.directory / name
        path.write_bytes(load(name))
        result = await run_node_script(reactor, "parse.mjs", [str(path)], {}, timeout=60)
        self.assertTrue(result["ok"], result)
        return result

    def compare(self, name: str, ours: dict[str, Any], theirs: dict[str, Any]) -> None:
        """Assert agreement, allowing exactly the known difference of C{name}."""
        known = KNOWN_DIFFERENCES.get(name, Difference(""))
        for field in ("subject", "from"):
            self.check_field(name, field, known, ours[field], theirs[field])
        if theirs["to"] or theirs["cc"]:
            recipients = ((ours["to"], ours["cc"]), (theirs["to"], theirs["cc"]))
            self.check_field(name, "to", known, *recipients)
        if theirs["text"] is None:
            self.assertIn(ours["text"], (None, ""), f"{name}: text only on the relay's side")
        else:
            self.check_field(name, "text", known, _body(ours["text"]), _body(theirs["text"]))
        if theirs["html"] is None:
            self.assertIsNone(ours["html"], f"{name}: html only on the relay's side")
        else:
            self.check_field(name, "html", known, _body(ours["html"]), _body(theirs["html"]))
        self.check_attachments(name, known, ours["attachments"], theirs["attachments"])

    def check_field(
        self, name: str, field: str, known: Difference, ours: Any, theirs: Any
    ) -> None:
        """Equal, or different when the difference is known."""
        if field in known.fields:
            self.assertNotEqual(
                ours, theirs, f"{name}: {field} now agrees; remove it from KNOWN_DIFFERENCES"
            )
        else:
            self.assertEqual(ours, theirs, f"{name}: {field} (relay, mailparser)")

    def check_attachments(
        self,
        name: str,
        known: Difference,
        ours: list[tuple[str, str, str]],
        theirs: list[tuple[str | None, str, str]],
    ) -> None:
        """Same attachments in the same order, but for the known extra ones."""
        only_relay = [a for a in ours if a[0] in known.only_relay]
        only_mailparser = [
            a
            for a in theirs
            if (a[0] if a[0] is not None else a[1]) in known.only_mailparser
        ]
        self.assertEqual(
            sorted(a[0] for a in only_relay),
            sorted(known.only_relay),
            f"{name}: attachments expected only on the relay's side",
        )
        self.assertEqual(
            sorted(a[0] if a[0] is not None else a[1] for a in only_mailparser),
            sorted(known.only_mailparser),
            f"{name}: attachments expected only on mailparser's side",
        )
        ours = [a for a in ours if a not in only_relay]
        theirs = [a for a in theirs if a not in only_mailparser]
        # An unnamed part: attachment-N.ext on our side, no filename on theirs.
        normalised: list[tuple[str | None, str, str]] = [
            (
                None
                if theirs_name is None and _SYNTHETIC_NAME.fullmatch(ours_name)
                else ours_name,
                ours_type,
                ours_hash,
            )
            for (ours_name, ours_type, ours_hash), (theirs_name, _, _) in zip(ours, theirs)
        ]
        normalised += ours[len(theirs) :]
        self.assertEqual(normalised, theirs, f"{name}: attachments (relay, mailparser)")


def _add_tests() -> None:
    """Give L{MimeCrossCheckTests} one test per corpus file."""
    for name in corpus_names():

        async def test(self: MimeCrossCheckTests, name: str = name) -> None:
            result = await self.mailparser(name)
            self.compare(name, relay_view(name), mailparser_view(result))

        test.__name__ = "test_" + re.sub(r"\W", "_", name.removesuffix(".eml"))
        test.__doc__ = f"mailparser reads {name} as the relay translates it."
        setattr(MimeCrossCheckTests, test.__name__, test)


_add_tests()


class CrossCheckTableTests(TestCase):
    """The table of known differences stays in step with the corpus."""

    def test_known_differences_name_corpus_files(self) -> None:
        """Every KNOWN_DIFFERENCES entry names a corpus file and gives a reason."""
        for name, difference in KNOWN_DIFFERENCES.items():
            self.assertIn(name, EXPECTATIONS)
            self.assertTrue(difference.reason)
            self.assertTrue(
                difference.fields or difference.only_relay or difference.only_mailparser,
                name,
            )

    def test_normalised_bodies(self) -> None:
        """Body normalisation ignores line-end style and trailing white space only."""
        self.assertEqual(_body("a \r\nb\t\r\n\r\n"), "a\nb")
        self.assertNotEqual(_body("a\nb"), _body("a b"))
        self.assertNotEqual(_body(" a"), _body("a"))

    def test_idn_domains_decoded(self) -> None:
        """xn-- labels are compared in Unicode; other labels as written."""
        self.assertEqual(_address("info@xn--bcher-kva.example"), "info@bücher.example")
        self.assertEqual(_address("Info@Example.COM"), "Info@Example.COM")
