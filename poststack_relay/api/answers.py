# -*- test-case-name: tests.test_api -*-
"""
What an API answer means: the outcome of each call (an email id, a valid
key, a mailbox address) or the error for it.

Pure functions of an L{Answer} (status, headers, content) and what the
call was; the replies themselves are in L{poststack_relay.replies}
(L{reply_for_status} and the C{API_*} replies).  Every event logged here
has its C{event} name in C{docs/logging.md}.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Optional

import attrs
from twisted.logger import Logger
from twisted.web.http_headers import Headers

from ..addresses import address_domain
from ..replies import (
    API_BAD_ANSWER,
    API_BAD_ANSWER_IDEMPOTENT,
    API_BAD_ANSWER_NO_KEY,
    API_SERVICE_KEY_REJECTED,
    api_error_text,
    reply_for_status,
    sender_domain_refused,
)
from .errors import APIError, APIUnavailable, MailboxSuspended

__all__ = [
    "Answer",
    "blames_bearer_key",
    "email_id",
    "key_check_outcome",
    "mailbox_outcome",
    "refuses_sender_domain",
    "send_outcome",
]

_log = Logger(namespace=__package__)  # every API event: "poststack_relay.api"


def _decode_json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        # RecursionError: nested too deep (a few kB of "[" do it); not
        # JSON the relay can use, like any other malformed content.
        return None


@attrs.frozen
class Answer:
    """
    One whole HTTP answer.

    @ivar status: the HTTP status.
    @ivar headers: the response's header fields.
    @ivar body: the content decoded as JSON, or C{None} if it is not JSON.
    @ivar attempts: how many requests the call made to get it.
    @ivar retry_after: seconds the answer's C{Retry-After} asked for, if
        the call ended while the API still asked to wait.
    """

    status: int
    headers: Headers
    body: Any
    attempts: int = 1
    retry_after: Optional[float] = None

    @classmethod
    def of(cls, status: int, headers: Headers, content: bytes) -> "Answer":
        """An answer from its status, headers and content (JSON or not)."""
        return cls(status, headers, _decode_json(content) if content else None)

    def header(self, name: bytes) -> Optional[str]:
        """The first value of the header field C{name}, if any."""
        values = self.headers.getRawHeaders(name)
        if not values:
            return None
        return values[0].decode("latin-1")


_EMAIL_ID = re.compile(r"[A-Za-z0-9_.:-]{1,100}")


def email_id(body: Any) -> Optional[str]:
    """
    The email id of a 2xx body, if it is one that can stand in a reply
    line as it is; anything else counts as "no email id".
    """
    found = body.get("id") if isinstance(body, dict) else None
    if isinstance(found, str) and _EMAIL_ID.fullmatch(found):
        return found
    return None


# Words by which a 401/403 from POST /mailboxes/authenticate blames the
# bearer key (the relay's service key) rather than the mailbox credentials.
_BLAMES_KEY = re.compile(r"\b(?:api|service)[ _-]?key\b|\bbearer\b|\bauthorization\b", re.I)


def blames_bearer_key(body: Any) -> Optional[bool]:
    """
    Does a 401/403 answer of C{POST /mailboxes/authenticate} refuse the
    relay's own bearer key (C{True}) or the mailbox login (C{False})?
    C{None} when the body is not an API error at all (no JSON message).

    The rule: both kinds share the status and the code (C{unauthorized},
    C{forbidden}), so only the message tells them apart.  The API (and the
    sandbox) words every bearer-key refusal around the key - "Invalid API
    key", "Missing API key", "Authorization must be 'Bearer <api key>'",
    "This API key may not authenticate mailboxes" - and mailbox refusals
    around the mailbox - "Invalid email or password", "Mailbox is
    suspended".  So a message naming an API/service key, the bearer or the
    Authorization header blames the key; any other message is about the
    mailbox.
    """
    if not isinstance(body, dict):
        return None
    m = body.get("error") or body.get("message")
    if isinstance(m, dict):
        m = m.get("message")
    if not isinstance(m, str) or not m.strip():
        return None
    return _BLAMES_KEY.search(m) is not None


def key_check_outcome(answer: Answer) -> bool:
    """
    C{GET /emails?per_page=1} with a key: 200 is valid, 401/403 invalid.

    @raise APIUnavailable: any other answer.
    """
    status = answer.status
    if status == 200:
        return True
    if status in (401, 403):
        return False
    _log.warn(
        "PostStack API key check answered HTTP {status}",
        status=status,
        event="api_key_check_unavailable",
    )
    raise APIUnavailable(f"HTTP {status}")


def mailbox_outcome(answer: Answer, email: str, service_key: str, password: str) -> Optional[str]:
    """
    C{POST /mailboxes/authenticate}: the mailbox's own address for a good
    login of an active mailbox, C{None} for a failed one; L{MailboxSuspended}
    for the right password of a mailbox that is not active (a 200 with
    another status, or a 403 about the mailbox).  A 401/403 that
    refuses the service key itself (see L{blames_bearer_key}) is the
    operator's problem, not the user's: it is logged as an error and is
    L{APIUnavailable}, so the user hears a temporary 454 rather than a
    misleading 535.

    @raise APIUnavailable: the answer cannot tell.
    """
    status, body = answer.status, answer.body
    if status == 200:
        mailbox = body.get("mailbox") if isinstance(body, dict) else None
        if not isinstance(mailbox, dict):
            _log.warn(
                "PostStack mailbox check answered 200 without a mailbox",
                event="api_mailbox_bad_answer",
            )
            raise APIUnavailable("200 without a mailbox")
        if mailbox.get("status", "active") == "active":
            address = mailbox.get("email_address")
            return address if isinstance(address, str) and address else email
        raise MailboxSuspended()
    if status in (401, 403):
        blames_key = blames_bearer_key(body)
        if blames_key is False:
            if status == 403:
                # The API answers 403 about the mailbox (not the key) only
                # after the right password: "Mailbox is suspended".
                raise MailboxSuspended()
            return None
        message, code = api_error_text(body, status, (service_key, password))
        if blames_key:
            _log.error(
                "PostStack refused the relay's service key for mailbox logins "
                "(HTTP {status} {code}: {api_message}); mailbox users cannot log "
                "in until the service key setting is fixed",
                status=status,
                code=code,
                api_message=message,
                event="api_service_key_rejected",
            )
            raise APIUnavailable(f"service key refused (HTTP {status})")
        _log.warn(
            "PostStack mailbox check answered HTTP {status} without an API error body",
            status=status,
            event="api_mailbox_bad_answer",
        )
        raise APIUnavailable(f"HTTP {status} without an error message")
    if status == 404:
        return None
    _log.warn(
        "PostStack mailbox check answered HTTP {status}",
        status=status,
        event="api_mailbox_unavailable",
    )
    raise APIUnavailable(f"HTTP {status}")


_NAMES_DOMAIN = re.compile(r"\bdomain\b", re.I)


def refuses_sender_domain(status: int, message: str, sender_domain: Optional[str]) -> bool:
    """
    Does an error answer of C{POST /emails} refuse the sender's domain for
    this credential?  A 422, 404 or 403 whose message names a domain, or
    the domain itself: "Domain not verified", "Domain not found", "API key
    is not allowed to send from example.com".  The other 4xx of those
    statuses ("Template not published", "Template not found", a key
    without sending permission) do not.
    """
    if sender_domain is None or status not in (403, 404, 422):
        return False
    return _NAMES_DOMAIN.search(message) is not None or sender_domain in message.lower()


def send_outcome(
    answer: Answer,
    api_key: str,
    service_key: Optional[str],
    retry_safe: bool,
    sender: Any = None,
) -> str:
    """
    C{POST /emails}: the email id of the final answer.

    @param api_key: the key the message was sent with (blanked out of any
        text the API echoes).
    @param service_key: the relay's own service key, if any: a 401 for it
        is the operator's problem (C{API_SERVICE_KEY_REJECTED}).
    @param retry_safe: the client's resend of the message carries the same
        idempotency key (its own or a derived one: C{EmailRequest.retry_safe}),
        so it cannot be sent twice; for the no-id reply's hint.
    @param sender: the request's C{from}: an answer that refuses its
        domain (L{refuses_sender_domain}) is answered with the C{550 5.7.1}
        naming it, and the L{APIError} carries the domain.
    @raise APIError: with the SMTP reply for any other answer.
    """
    status, body = answer.status, answer.body
    request_id = answer.header(b"x-request-id")
    if 200 <= status < 300:
        found = email_id(body)
        if found is not None:
            return found
        _log.warn(
            "PostStack API answered HTTP {status} without an email id "
            "(request id {request_id}, {attempts} attempt(s))",
            status=status,
            request_id=request_id,
            attempts=answer.attempts,
            event="api_bad_answer",
        )
        hint = API_BAD_ANSWER_IDEMPOTENT if retry_safe else API_BAD_ANSWER_NO_KEY
        raise APIError(
            API_BAD_ANSWER.with_text(API_BAD_ANSWER.text + hint),
            status=status,
            request_id=request_id,
        )
    code = None
    if isinstance(body, dict) and isinstance(body.get("code"), str):
        code = body["code"]
    if status == 401 and service_key is not None and api_key == service_key:
        message, _ = api_error_text(body, status, (api_key,))
        _log.error(
            "PostStack refused the relay's service key when sending for a mailbox "
            "(HTTP 401: {api_message}, request id {request_id}); fix the service "
            "key setting",
            api_message=message,
            request_id=request_id,
            event="api_service_key_rejected",
        )
        raise APIError(API_SERVICE_KEY_REJECTED, status=status, code=code, request_id=request_id)
    sender_domain = address_domain(sender) if isinstance(sender, str) else None
    message, _ = api_error_text(body, status, (api_key,))
    if refuses_sender_domain(status, message, sender_domain):
        assert sender_domain is not None
        raise APIError(
            sender_domain_refused(sender_domain, status, message),
            status=status, code=code, request_id=request_id, sender_domain=sender_domain,
        )
    retry_after = None
    if answer.retry_after is not None and answer.retry_after > 0:
        retry_after = str(max(1, math.ceil(answer.retry_after)))
    reply = reply_for_status(status, body, retry_after, (api_key,))
    raise APIError(
        reply, status=status, code=code, request_id=request_id, retry_after=answer.retry_after
    )
