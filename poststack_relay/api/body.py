# -*- test-case-name: tests.test_api -*-
"""
Request bodies: a payload as JSON, and the producer that writes it.

L{json_body} encodes a payload; for a message with large attachments it
keeps their base64 text out of the JSON text (a list of pieces), so a
13 MB message is not copied into one big JSON string.  L{BodyProducer}
writes a body (bytes or pieces) a slice at a time, only as fast as the
connection takes it.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Iterator, Mapping, Optional, Union

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

__all__ = ["STREAM_MIN_CONTENT", "Body", "BodyProducer", "body_bytes", "json_body"]

STREAM_MIN_CONTENT = 256 * 1024
"""Characters: an attachment content at least this long is not copied into
the JSON text but written from its own string (L{json_body})."""

_SLICE = 64 * 1024
"""Bytes: the most one write of a L{BodyProducer} takes."""

Body = Union[bytes, "list[bytes | str]"]
"""A request body: bytes, or pieces (bytes, and ASCII C{str}) to write one
after the other."""

_BASE64_TEXT = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="


def _is_base64_text(text: str) -> bool:
    """Only base64 characters (so it stands in JSON as it is), checked a slice at a time."""
    if not text.isascii():
        return False
    step = 1024 * 1024
    return not any(
        text[i : i + step].encode("ascii").translate(None, _BASE64_TEXT)
        for i in range(0, len(text), step)
    )


def json_body(payload: Mapping[str, Any]) -> Body:
    """
    The JSON request body of C{payload}: bytes, or for a payload with large
    attachments, a list of pieces: UTF-8 bytes of JSON text, and between
    them the attachments' base64 contents as the very C{str} objects of the
    payload, written a slice at a time by L{BodyProducer}.  Joined, the
    pieces are exactly the bytes of the plain encoding; but a 10 MB
    attachment is not copied three more times (into the JSON text, into
    its UTF-8 encoding, into the transport's buffer).

    @raise ValueError: (or C{TypeError}, C{UnicodeEncodeError}) if the
        payload cannot be encoded.
    """
    attachments = payload.get("attachments")
    large: list[str] = []
    if isinstance(attachments, list):
        for attachment in attachments:
            content = attachment.get("content") if isinstance(attachment, dict) else None
            if (
                isinstance(content, str)
                and len(content) >= STREAM_MIN_CONTENT
                and _is_base64_text(content)
            ):
                large.append(content)
    if not large or not isinstance(attachments, list):
        return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    marker = "\x00" + uuid.uuid4().hex
    slots: dict[int, int] = {id(content): index for index, content in enumerate(large)}
    stand_in = dict(payload)
    stand_in["attachments"] = [
        dict(a, content=f"{marker}{slots[id(a['content'])]}\x00")
        if isinstance(a, dict) and id(a.get("content")) in slots
        else a
        for a in attachments
    ]
    text = json.dumps(stand_in, ensure_ascii=False, separators=(",", ":"))
    escaped = json.dumps(marker)[1:-1]  # the marker as it stands in the JSON text
    pieces: list[bytes | str] = []
    rest = text
    while True:
        head, found, rest = rest.partition(escaped)
        pieces.append(head.encode("utf-8"))
        if not found:
            break
        index, _, rest = rest.partition("\\u0000")
        pieces.append(large[int(index)])
    return pieces


def body_bytes(body: Body) -> bytes:
    """C{body} as one bytes object."""
    if isinstance(body, bytes):
        return body
    return b"".join(p if isinstance(p, bytes) else p.encode("ascii") for p in body)


@implementer(IBodyProducer)
class BodyProducer:
    """
    Writes a body (bytes, or the pieces of L{json_body}) a slice of at most
    64 KiB at a time, and only while the consumer (the connection) has not
    paused it.  A small body goes out in one write, at once.

    @ivar length: the body's length in bytes (C{str} pieces are ASCII).
    """

    def __init__(self, body: Body) -> None:
        self._pieces: list[bytes | str] = [body] if isinstance(body, bytes) else body
        self.length: int = sum(len(p) for p in self._pieces)
        self._slices: Optional[Iterator[bytes]] = None
        self._consumer: Optional[IConsumer] = None
        self._done: Optional[Deferred[None]] = None
        self._paused = False
        self._producing = False

    def _each(self) -> Iterator[bytes]:
        for piece in self._pieces:
            for start in range(0, len(piece), _SLICE):
                chunk = piece[start : start + _SLICE]
                yield chunk if isinstance(chunk, bytes) else chunk.encode("ascii")

    def startProducing(self, consumer: IConsumer) -> "Deferred[None]":
        """Start writing to C{consumer}; fires once all is written."""
        self._consumer = consumer
        self._slices = self._each()
        done: Deferred[None] = Deferred()
        self._done = done
        self._produce()  # may finish at once, and fire it
        return done

    def _produce(self) -> None:
        if self._producing:
            return
        self._producing = True
        try:
            while not self._paused and self._slices is not None and self._consumer is not None:
                chunk = next(self._slices, None)
                if chunk is None:
                    self._release()
                    done, self._done = self._done, None
                    if done is not None:
                        done.callback(None)
                    return
                self._consumer.write(chunk)
        finally:
            self._producing = False

    def pauseProducing(self) -> None:
        """The connection's buffer is full: write nothing until resumed."""
        self._paused = True

    def resumeProducing(self) -> None:
        """Write again."""
        self._paused = False
        self._produce()

    def stopProducing(self) -> None:
        """
        The request is abandoned: write nothing more, and (as the interface
        asks) never fire the Deferred.
        """
        self._release()
        self._done = None

    def _release(self) -> None:
        # Written or abandoned: let go of the body and the consumer at
        # once.  The request, its consumer and Deferreds can end up in a
        # reference cycle (a Failure's frames) that only the cyclic garbage
        # collector frees, and with them a large message's body (S4 in
        # docs/performance.md).
        self._slices = None
        self._pieces = []
        self._consumer = None

