# -*- test-case-name: tests.test_replies_doc -*-
"""
docs/replies.md lists every SMTP reply the relay can send.

Each reply in the doc is an inline code span written as on the wire:
C{<code> <enhanced> <text>}, with placeholders where the text varies.  The
tests read the replies out of the code (the L{Reply} constants of
L{poststack_relay.replies}, the one home of every reply, and every
C{Reply(...)} or C{.with_text(...)} built anywhere in the package, found
with L{ast}, the translation replies of C{replies.py} among them) and look for
each one among those spans.  A reply added to the code without a row in the
doc makes them fail.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from types import ModuleType
from typing import Iterator

from twisted.trial.unittest import SynchronousTestCase

from poststack_relay import replies
from poststack_relay.replies import Reply

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "replies.md"
PACKAGE = ROOT / "poststack_relay"
REPLIES = PACKAGE / "replies.py"
TRANSLATE = PACKAGE / "translate"

# Modules whose module-level Reply constants must all be documented (a
# Reply made with literal codes anywhere else is found by built_replies).
REPLY_MODULES: tuple[ModuleType, ...] = (replies,)

# What a part of a reply text that varies (an f-string field, a %d, a
# variable) may stand for in the doc: a placeholder, a number, or nothing.
_VARIES = "(?:.*?)"
_INLINE_CODE = re.compile(r"`([^`\n]+)`")
_PERCENT = re.compile(r"%[sdr]")


def doc_spans(doc: str) -> list[str]:
    """
    The inline code spans of C{doc} that are replies with an enhanced
    status code (C{"550 5.7.1 ..."}).
    """
    return [
        span
        for span in _INLINE_CODE.findall(doc)
        if re.match(r"[2-5]\d\d [245]\.\d{1,3}\.\d{1,3} ", span)
    ]


def reply_constants() -> Iterator[tuple[str, Reply]]:
    """
    Every L{Reply} with an enhanced code among the module attributes of
    L{REPLY_MODULES}, also inside dicts (C{SENDER_PATH_PROBLEMS}), with a
    name for messages.
    """
    for module in REPLY_MODULES:
        for name, value in sorted(vars(module).items()):
            if isinstance(value, Reply):
                found = [(f"{module.__name__}.{name}", value)]
            elif isinstance(value, dict):
                found = [
                    (f"{module.__name__}.{name}[{key!r}]", item)
                    for key, item in value.items()
                    if isinstance(item, Reply)
                ]
            else:
                continue
            for label, reply in found:
                if reply.enhanced:
                    yield label, reply


def missing_constants(doc: str) -> list[str]:
    """
    The L{reply_constants} that no reply span of C{doc} starts with (code,
    enhanced code, then the constant's text, which may go on in the doc as
    in C{"Unsupported option: <NAME>"}).
    """
    spans = doc_spans(doc)
    missing: list[str] = []
    for label, reply in reply_constants():
        wanted = f"{reply.code} {reply.enhanced} {reply.text}"
        if not any(span.startswith(wanted) for span in spans):
            missing.append(f"{label}: {wanted}")
    return missing


def _known_reply(node: ast.expr) -> Reply | None:
    """
    The L{Reply} constant that C{node} names (C{NAME} or C{replies.NAME}),
    if any.
    """
    if isinstance(node, ast.Name):
        name = node.id
    elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        name = node.attr
    else:
        return None
    for module in REPLY_MODULES:
        value = getattr(module, name, None)
        if isinstance(value, Reply):
            return value
    return None


def text_pattern(node: ast.expr) -> str:
    """
    A regular expression for the reply texts the expression C{node} can
    build: its literal parts as they are, every part that varies as
    L{_VARIES}.
    """
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return re.escape(node.value)
    if isinstance(node, ast.JoinedStr):
        return "".join(text_pattern(part) for part in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return text_pattern(node.left) + text_pattern(node.right)
    if (
        isinstance(node, ast.BinOp)
        and isinstance(node.op, ast.Mod)
        and isinstance(node.left, ast.Constant)
        and isinstance(node.left.value, str)
    ):
        return _VARIES.join(re.escape(part) for part in _PERCENT.split(node.left.value))
    if isinstance(node, ast.Call) and node.args:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name == "clean_text":
            return text_pattern(node.args[0])
    if isinstance(node, ast.Attribute) and node.attr == "text":
        known = _known_reply(node.value)
        if known is not None:
            return re.escape(known.text)
    return _VARIES


def _call_name(call: ast.Call) -> str | None:
    func = call.func
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def _is_str_literal(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def _literal_codes(call: ast.Call) -> tuple[int, str] | None:
    """
    The code and enhanced code of a C{Reply(...)} or
    C{TranslationError(...)} call when both are literals.
    """
    if len(call.args) < 3:
        return None
    code, enhanced = call.args[0], call.args[1]
    if (
        isinstance(code, ast.Constant)
        and type(code.value) is int
        and isinstance(enhanced, ast.Constant)
        and isinstance(enhanced.value, str)
    ):
        return code.value, enhanced.value
    return None


def built_replies(
    path: Path, names: frozenset[str]
) -> Iterator[tuple[str, str, bool]]:
    """
    The replies built in the source file C{path}: for each call of one of
    C{names} (C{"Reply"}, C{"TranslationError"}) with a literal code and
    a literal, non-empty enhanced code, and each C{.with_text(...)} on a
    known L{Reply} constant, a label (file and line), the pattern of the
    wire line, and whether a doc span must match it as a whole.  A text
    that is one string literal need only start a span (as for
    L{missing_constants}): C{MESSAGE_TOO_BIG} is documented in the
    longer forms C{with_text} gives it.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        label = f"{path.name}:{node.lineno}"
        name = _call_name(node)
        if name in names:
            codes = _literal_codes(node)
            if codes is not None and codes[1]:
                code, enhanced = codes
                text = node.args[2]
                yield (
                    label,
                    f"{code} {re.escape(enhanced)} {text_pattern(text)}",
                    not _is_str_literal(text),
                )
        elif name == "with_text" and isinstance(node.func, ast.Attribute) and node.args:
            base = _known_reply(node.func.value)
            if base is not None and base.enhanced:
                text = node.args[0]
                yield (
                    label,
                    f"{base.code} {re.escape(base.enhanced)} {text_pattern(text)}",
                    not _is_str_literal(text),
                )


def missing_built(doc: str, path: Path, names: frozenset[str]) -> tuple[int, list[str]]:
    """
    How many replies L{built_replies} finds in C{path}, and those of them
    that no reply span of C{doc} matches as a whole.
    """
    spans = doc_spans(doc)
    found = list(built_replies(path, names))
    missing: list[str] = []
    for label, pattern, whole in found:
        match = re.fullmatch if whole else re.match
        if not any(match(pattern, span) for span in spans):
            missing.append(f"{label}: /{pattern}/")
    return len(found), missing


def _without_row(doc: str, needle: str) -> str:
    """
    C{doc} without the table rows that contain C{needle} (there must be
    one).
    """
    lines = doc.splitlines(keepends=True)
    kept = [line for line in lines if not (line.startswith("|") and needle in line)]
    assert len(kept) < len(lines), needle
    return "".join(kept)


class RepliesDocTests(SynchronousTestCase):
    """
    docs/replies.md against the replies in the code.
    """

    def setUp(self) -> None:
        self.doc = DOC.read_text(encoding="utf-8")

    def test_every_reply_constant_is_documented(self) -> None:
        """Every Reply constant of replies.py is in the doc with its codes and text."""
        self.assertGreater(len(list(reply_constants())), 50)
        self.assertEqual(missing_constants(self.doc), [])

    def test_every_translation_error_is_documented(self) -> None:
        """Every reply of replies.py (the translation replies among them: Reply(code, "x.y.z", text)) is in the doc."""
        count, missing = missing_built(self.doc, REPLIES, frozenset({"Reply"}))
        self.assertGreater(count, 20)
        self.assertEqual(missing, [])

    def test_translation_errors_are_all_literal(self) -> None:
        """translate/ writes no reply itself: every TranslationError is made of a reply of replies.py."""
        paths = sorted(TRANSLATE.rglob("*.py")) if TRANSLATE.is_dir() else [TRANSLATE.with_suffix(".py")]
        built: list[str] = []
        for path in paths:
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Call) and _call_name(node) in ("TranslationError", "Reply"):
                    if node.args and isinstance(node.args[0], ast.Constant):  # a literal code
                        built.append(f"{path.name}:{node.lineno}")
        self.assertGreater(len(paths), 0)
        self.assertEqual(built, [])

    def test_every_built_reply_is_documented(self) -> None:
        """Every Reply(...) and .with_text(...) built in the package is in the doc."""
        total = 0
        missing: list[str] = []
        for path in sorted(PACKAGE.rglob("*.py")):
            count, gone = missing_built(self.doc, path, frozenset({"Reply"}))
            total += count
            missing += gone
        self.assertGreater(total, 80)
        self.assertEqual(missing, [])

    def test_undocumented_constant_is_caught(self) -> None:
        """A Reply constant whose row is missing from the doc is reported."""
        doc = _without_row(self.doc, replies.MAILBOX_SUSPENDED.text)
        self.assertEqual(
            missing_constants(doc),
            ["poststack_relay.replies.MAILBOX_SUSPENDED: 535 5.7.1 " + replies.MAILBOX_SUSPENDED.text],
        )

    def test_undocumented_translation_error_is_caught(self) -> None:
        """A TranslationError whose row is missing from the doc is reported."""
        doc = _without_row(self.doc, "header fields; remove some headers")
        _, missing = missing_built(doc, REPLIES, frozenset({"Reply"}))
        self.assertEqual(len(missing), 1)
        self.assertIn("header\\ fields", missing[0])

    def test_changed_text_is_caught(self) -> None:
        """A documented reply whose code or text no longer matches the code is reported."""
        doc = self.doc.replace("421 4.3.2 Service shutting down", "421 4.3.0 Service shutting down")
        self.assertEqual(
            missing_constants(doc),
            ["poststack_relay.replies.SHUTTING_DOWN: 421 4.3.2 " + replies.SHUTTING_DOWN.text],
        )
        doc = self.doc.replace("send fewer attachments per message", "send fewer parts")
        _, missing = missing_built(doc, REPLIES, frozenset({"Reply"}))
        self.assertEqual(len(missing), 1)

    def test_text_pattern(self) -> None:
        """Literal parts of a reply text are kept and parts that vary become wildcards."""
        pattern = text_pattern(ast.parse('f"Has more than {N} parts; x"', mode="eval").body)
        self.assertIsNotNone(re.fullmatch(pattern, "Has more than 1000 parts; x"))
        self.assertIsNone(re.fullmatch(pattern, "Has more than 1000 headers; x"))
        pattern = text_pattern(ast.parse('"limit of %d octets" % n', mode="eval").body)
        self.assertIsNotNone(re.fullmatch(pattern, "limit of N octets"))
        self.assertIsNone(re.fullmatch(pattern, "limit of N bytes"))
