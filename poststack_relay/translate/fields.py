# -*- test-case-name: tests.test_translate,tests.test_translate_hostile -*-
"""
The PostStack headers and the headers passed on: X-PostStack-Tags,
-Template-Id, -Variables and -Idempotency-Key (read, checked, refused with
their replies) and the X-* and list headers copied into
C{payload["headers"]}, each within its limit.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any, Final

import attrs

from .. import replies
from .decoding import clean, decode_words, raw_header_text, unstructured
from .request import TranslationError


#: Deepest allowed nesting of objects and arrays in X-PostStack-Variables.
MAX_VARIABLES_DEPTH: Final = 32

#: Most distinct headers passed on to the API in ``payload["headers"]``.
MAX_PASSED_HEADERS: Final = 100

#: Longest value (UTF-8 octets, after unfolding and joining) of a header
#: passed on; the RFC 5322 line-length limit.
MAX_PASSED_HEADER_OCTETS: Final = 998

#: Most distinct tags in X-PostStack-Tags (all such headers together).
MAX_TAGS: Final = 50

#: Longest tag, in characters.
MAX_TAG_LENGTH: Final = 256

#: Longest X-PostStack-Template-Id and X-PostStack-Idempotency-Key, in characters.
MAX_ID_LENGTH: Final = 256

# Control characters refused in X-PostStack-Tags, -Template-Id and
# -Idempotency-Key: any of the above, and TAB.
_ID_CONTROLS: Final = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")

# Control characters refused in X-PostStack-Variables strings (TAB, LF and
# CR are text); NUL also cannot be stored by common databases.
_JSON_CONTROLS: Final = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f]")
_PRINTABLE_ASCII: Final = re.compile(r"[\x20-\x7e]+")
_MSG_ID: Final = re.compile(r"<[^<>]*>")
HEADER_NAME: Final = re.compile(r"[!-9;-~]+")
_JSON_KINDS: Final[dict[type, str]] = {
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}

HEADER_TAGS: Final = "x-poststack-tags"
HEADER_TEMPLATE: Final = "x-poststack-template-id"
HEADER_VARIABLES: Final = "x-poststack-variables"
HEADER_IDEMPOTENCY: Final = "x-poststack-idempotency-key"

# Headers (besides X-*) copied into payload["headers"]: the ones that matter
# to recipients and that the API would not produce itself.  The values of
# structured ones are passed through as written (unfolded, never RFC 2047
# decoded: encoded-words are not allowed in them); unstructured ones are
# decoded like X-* headers.
PASSED_STRUCTURED: Final = frozenset(
    {
        "in-reply-to",
        "references",
        "list-id",
        "list-unsubscribe",
        "list-unsubscribe-post",
        "list-help",
        "list-subscribe",
        "list-post",
        "list-owner",
        "list-archive",
        "auto-submitted",
        "precedence",
        "importance",
        "priority",
        "sensitivity",
        "disposition-notification-to",
        "thread-index",
        "feedback-id",
    }
)

PASSED_UNSTRUCTURED: Final = frozenset(
    {"comments", "keywords", "organization", "thread-topic"}
)

# Duplicates of these are joined with a space (they are lists of msg-ids);
# duplicates of every other passed header are joined with ", ".
_SPACE_JOINED: Final = frozenset({"in-reply-to", "references"})


def single_value(values: list[str], header: str) -> str | None:
    """The one value of a header that may appear once; ``None`` if absent."""
    distinct = list(dict.fromkeys(value for value in values if value))
    if len(distinct) > 1:
        raise TranslationError.of(replies.header_repeated(header))
    return distinct[0] if distinct else None


def checked_id(text: str, header: str, *, ascii_only: bool = False) -> str:
    """
    Check an X-PostStack-Template-Id or -Idempotency-Key value (decoded and
    trimmed): no control characters, at most ``MAX_ID_LENGTH`` characters,
    and for the idempotency key printable ASCII only (it is also sent as
    the HTTP ``Idempotency-Key`` header).
    """
    if _ID_CONTROLS.search(text) is not None:
        raise TranslationError.of(replies.header_has_controls(header))
    if len(text) > MAX_ID_LENGTH:
        raise TranslationError.of(replies.header_value_too_long(header, MAX_ID_LENGTH))
    if ascii_only and text and _PRINTABLE_ASCII.fullmatch(text) is None:
        raise TranslationError.of(replies.header_not_printable_ascii(header))
    return text


def add_tags(tags: dict[str, None], text: str) -> None:
    """
    Add the tags of one X-PostStack-Tags value (decoded) to ``tags``.

    Tags are split on commas and trimmed; empty ones are skipped and
    repeated ones kept once.  A tag with a control character, a tag longer
    than ``MAX_TAG_LENGTH`` and more than ``MAX_TAGS`` distinct tags are
    refused.
    """
    for tag in text.split(","):
        tag = tag.strip(" \t")
        if not tag:
            continue
        if _ID_CONTROLS.search(tag) is not None:
            raise TranslationError.of(replies.header_has_controls("X-PostStack-Tags"))
        if len(tag) > MAX_TAG_LENGTH:
            raise TranslationError.of(replies.tag_too_long(MAX_TAG_LENGTH))
        tags.setdefault(tag, None)
        if len(tags) > MAX_TAGS:
            raise TranslationError.of(replies.too_many_tags(MAX_TAGS))


def pass_header(
    passed: dict[str, tuple[str, list[str]]], key: str, name: str, text: str
) -> None:
    """Collect one header value to pass on; refuse too many distinct headers."""
    entry = passed.get(key)
    if entry is None:
        if len(passed) >= MAX_PASSED_HEADERS:
            raise TranslationError.of(replies.too_many_passed_headers(MAX_PASSED_HEADERS))
        entry = passed[key] = (name, [])
    entry[1].append(text)


def _trim_msg_ids(value: str) -> str | None:
    """
    Shorten a References/In-Reply-To value to ``MAX_PASSED_HEADER_OCTETS``:
    keep the first message id (the thread's root) and as many of the most
    recent ones as fit, as news software does (RFC 5537 section 3.4.4).
    ``None`` if even the first id alone does not fit, or there is none.
    """
    ids = _MSG_ID.findall(value)
    if not ids:
        return None
    size = len(ids[0].encode("utf-8"))
    if size > MAX_PASSED_HEADER_OCTETS:
        return None
    recent: list[str] = []
    for msg_id in reversed(ids[1:]):
        size += 1 + len(msg_id.encode("utf-8"))
        if size > MAX_PASSED_HEADER_OCTETS:
            break
        recent.append(msg_id)
    return " ".join([ids[0], *reversed(recent)])


def passed_headers(passed: dict[str, tuple[str, list[str]]]) -> dict[str, str]:
    """
    Join the collected header values (``", "``, or a space for lists of
    message ids) and bound each to ``MAX_PASSED_HEADER_OCTETS``: References
    and In-Reply-To are trimmed, any other longer value is refused.
    """
    headers: dict[str, str] = {}
    for key, (name, values) in passed.items():
        value = (" " if key in _SPACE_JOINED else ", ").join(values)
        if len(value) * 4 > MAX_PASSED_HEADER_OCTETS and (
            len(value.encode("utf-8")) > MAX_PASSED_HEADER_OCTETS
        ):
            trimmed = _trim_msg_ids(value) if key in _SPACE_JOINED else None
            if trimmed is None:
                raise TranslationError.of(
                    replies.passed_header_too_long(name, MAX_PASSED_HEADER_OCTETS)
                )
            value = trimmed
        headers[name] = value
    return headers


def _json_depth_exceeds(value: Any, limit: int) -> bool:
    """Whether a parsed JSON value nests containers deeper than ``limit``."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Iterable[Any] = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _json_control(value: Any) -> str | None:
    """The first refused control character in any key or string of ``value``."""
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            found = _JSON_CONTROLS.search(item)
            if found is not None:
                return found.group()
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def parse_variables(value: str) -> dict[str, Any]:
    """Parse X-PostStack-Variables, which must hold one JSON object."""

    def refuse_constant(name: str) -> Any:
        """Refuse NaN and Infinity, which json accepts but JSON forbids."""
        raise ValueError(f"{name} is not valid JSON")

    try:
        variables = json.loads(value, parse_constant=refuse_constant)
    except RecursionError:
        reason = "nested too deeply"
    except ValueError as error:  # includes json.JSONDecodeError
        reason = str(error)
    else:
        if not isinstance(variables, dict):
            kind = _JSON_KINDS.get(type(variables), "value")
            reason = f"got a JSON {kind}"
        elif _json_depth_exceeds(variables, MAX_VARIABLES_DEPTH):
            reason = f"nested more than {MAX_VARIABLES_DEPTH} levels deep"
        elif (control := _json_control(variables)) is not None:
            reason = (
                f"a string holds the control character U+{ord(control):04X}"
                " (only TAB, LF and CR are allowed)"
            )
        else:
            try:
                json.dumps(variables, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                reason = "it contains invalid Unicode"
            else:
                return variables
    raise TranslationError.of(replies.variables_not_an_object(reason))


#: The lowercased names of the headers (besides X-*) passed on.
PASSED_NAMES: Final = PASSED_STRUCTURED | PASSED_UNSTRUCTURED


@attrs.define
class PostStackFields:
    """
    What the message's X-PostStack headers and its headers to pass on say,
    read one header field at a time (L{read}) and then settled (L{settle},
    L{headers}).  A value the relay refuses raises L{TranslationError} as
    soon as it is read.
    """

    tags: dict[str, None] = attrs.field(factory=dict)
    template_values: list[str] = attrs.field(factory=list)
    variables_values: list[str] = attrs.field(factory=list)
    idempotency_values: list[str] = attrs.field(factory=list)
    passed: dict[str, tuple[str, list[str]]] = attrs.field(factory=dict)

    def read(self, key: str, name: str, value: object) -> None:
        """
        Read one header field named C{name} (C{key} lowercased) that is an
        X-* header or one of L{PASSED_NAMES}, with its raw C{value}.
        """
        if key.startswith("x-poststack-"):
            # Not cleaned like other headers: a control character in one of
            # these values is refused rather than silently removed.
            text = decode_words(raw_header_text(value)).strip(" \t")
            if key == HEADER_TAGS:
                add_tags(self.tags, text)
            elif key == HEADER_TEMPLATE:
                self.template_values.append(checked_id(text, "X-PostStack-Template-Id"))
            elif key == HEADER_VARIABLES:
                self.variables_values.append(text)
            elif key == HEADER_IDEMPOTENCY:
                self.idempotency_values.append(
                    checked_id(text, "X-PostStack-Idempotency-Key", ascii_only=True)
                )
            # Any other X-PostStack-* header is ours and is not passed on.
        elif (key.startswith("x-") or key in PASSED_UNSTRUCTURED) and HEADER_NAME.fullmatch(name):
            text = unstructured(value)
            if text:
                pass_header(self.passed, key, name, text)
        elif key in PASSED_STRUCTURED:
            text = clean(raw_header_text(value)).strip()
            if text:
                pass_header(self.passed, key, name, text)

    def settle(self) -> tuple[str | None, dict[str, Any] | None, str | None]:
        """
        The template id, the variables and the client's idempotency key
        (each C{None} when absent); refused when one appears more than once
        with different values, or the variables are not one JSON object.
        """
        template_id = single_value(self.template_values, "X-PostStack-Template-Id")
        variables_text = single_value(self.variables_values, "X-PostStack-Variables")
        idempotency_key = single_value(self.idempotency_values, "X-PostStack-Idempotency-Key")
        variables = parse_variables(variables_text) if variables_text is not None else None
        return template_id, variables, idempotency_key

    def headers(self) -> dict[str, str]:
        """The headers to pass on (L{passed_headers}), joined and bounded."""
        return passed_headers(self.passed)
