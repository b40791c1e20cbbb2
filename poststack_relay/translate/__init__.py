# -*- test-case-name: tests.test_translate,tests.test_translate_scan,tests.test_translate_hostile,tests.test_translate_runs,tests.test_mime_corpus -*-
"""
Translate one SMTP message (raw MIME bytes plus its envelope) into the JSON
body of one ``POST /emails`` call.

The package is pure: it imports nothing from Twisted, does no I/O and keeps
no state between calls.  :func:`translate` either returns an
:class:`EmailRequest` or raises :class:`TranslationError`, which carries the
complete SMTP reply (code, enhanced code, text; the texts are in
:mod:`poststack_relay.replies`) the relay must give to the client.

One job per module:

  - :mod:`.request`: the values in and out (``Envelope``, ``EmailRequest``,
    ``TranslationError``);
  - :mod:`.parse`: the hostile-input limits and the fast parse (base64
    runs taken out before the stdlib parser and put back after);
  - :mod:`.decoding`: charsets, the one RFC 2047 decoder, header text
    cleaning;
  - :mod:`.parts`: reading a parsed MIME part (its structural headers and
    parameters, its transfer-decoded content);
  - :mod:`.body`: the walk over the MIME tree, text/html bodies,
    format=flowed;
  - :mod:`.attachments`: attachment objects (filename, type, base64);
  - :mod:`.addressing`: From/To/Cc/Reply-To/Sender addresses, the envelope
    recipients, and the sender policy applied to them;
  - :mod:`.scan`: the MIME limits followed while a message streams in
    (:class:`MimeScan`), so that a message over them is refused without a
    full parse;
  - :mod:`.fields`: the PostStack headers (tags, template, variables,
    idempotency key) and the headers passed on;
  - :mod:`.message`: :func:`translate` itself, which puts them together.

The mapping rules, and the reasons for each choice, are written down in
``docs/mime-mapping.md``.

Speed matters (this runs once per message, on the reactor thread), so the
message is parsed with the stdlib ``compat32`` policy, an order of magnitude
cheaper than ``email.policy.default``, and header values are decoded here
with small precompiled helpers.
"""

from __future__ import annotations

from .attachments import MAX_FILENAME_LENGTH
from .fields import (
    MAX_ID_LENGTH,
    MAX_PASSED_HEADER_OCTETS,
    MAX_PASSED_HEADERS,
    MAX_TAG_LENGTH,
    MAX_TAGS,
    MAX_VARIABLES_DEPTH,
)
from .message import translate
from .parse import MAX_HEADER_BYTES, MAX_HEADER_FIELDS, MAX_MIME_DEPTH, MAX_MIME_PARTS
from .request import EmailRequest, Envelope, TranslationError
from .scan import MimeScan

__all__ = [
    "MAX_FILENAME_LENGTH",
    "MAX_HEADER_BYTES",
    "MAX_HEADER_FIELDS",
    "MAX_ID_LENGTH",
    "MAX_MIME_DEPTH",
    "MAX_MIME_PARTS",
    "MAX_PASSED_HEADERS",
    "MAX_PASSED_HEADER_OCTETS",
    "MAX_TAGS",
    "MAX_TAG_LENGTH",
    "MAX_VARIABLES_DEPTH",
    "EmailRequest",
    "Envelope",
    "MimeScan",
    "TranslationError",
    "translate",
]
