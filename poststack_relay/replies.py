# -*- test-case-name: tests.test_replies_doc,tests.test_smtp_protocol,tests.test_auth_throttle,tests.test_senders,tests.test_api -*-
"""
Every SMTP reply the relay sends, in one table.

A reply is a three-digit code, an RFC 3463 enhanced status code and a text
that tells the user what to do.  Replies are never assembled ad hoc in the
protocol: the protocol picks one from here, or builds one with the helpers
below, which keep the text on one line and in printable ASCII.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Optional

import attrs


@attrs.frozen
class Reply:
    """
    One SMTP reply.

    @ivar code: the basic reply code, e.g. C{250}.
    @ivar enhanced: the RFC 3463 enhanced status code, e.g. C{"2.0.0"}.
    @ivar text: a single line of printable ASCII.
    """

    code: int
    enhanced: str
    text: str

    def line(self) -> bytes:
        """
        The reply as one wire line, CRLF included.
        """
        return b"%d %s %s\r\n" % (
            self.code,
            self.enhanced.encode("ascii"),
            self.text.encode("ascii", "replace"),
        )

    def with_text(self, text: str) -> "Reply":
        """
        The same codes with another text.
        """
        return Reply(self.code, self.enhanced, clean_text(text))

    @property
    def is_success(self) -> bool:
        """
        True for 2xx and 3xx replies.
        """
        return self.code < 400


_UNPRINTABLE = re.compile(r"[^\x20-\x7e]+")


def clean_text(text: str, limit: int = 400) -> str:
    """
    Make C{text} safe for one SMTP reply line: printable ASCII, no CR/LF,
    at most C{limit} characters.
    """
    text = _UNPRINTABLE.sub(" ", text).strip()
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


# Connection and session
GREETING = Reply(220, "", "")  # built by the protocol from the host name
CLOSING = Reply(221, "2.0.0", "Bye")
TIMEOUT = Reply(421, "4.4.2", "Error: timeout exceeded, closing connection")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Error: too many errors, closing connection")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_CONNECTIONS_FROM_CLIENT = Reply(
    421, "4.7.0", "Too many connections from your address, try again later"
)
TRANSACTION_TIMEOUT = Reply(
    421, "4.4.2", "Error: transaction time limit exceeded, closing connection"
)
TOO_MANY_AUTH_FAILURES = Reply(421, "4.7.0", "Error: too many authentication failures")
TOO_MANY_JUNK_COMMANDS = Reply(
    421, "4.7.0", "Error: too many commands without authentication, closing connection"
)
SHED = Reply(421, "4.7.0", "Server busy, closing idle unauthenticated session, try again later")


def connection_rate_exceeded(retry_after: int) -> Reply:
    """Too many new connections from the client's address in the last minute."""
    return Reply(
        421, "4.7.0", f"Too many connections from your address per minute, retry-after={retry_after}s"
    )


# One line (444 octets with code and CRLF, < 512) naming each common client's
# implicit-TLS setting; docs/interop.md has them in full.
NOT_TLS = Reply(
    554,
    "5.7.0",
    "This port requires TLS from the first byte (implicit TLS, RFC 8314): "
    "set secure: true (nodemailer) / use smtplib.SMTP_SSL / use_tls=True (aiosmtplib) / "
    "EMAIL_USE_SSL (Django) / ENCRYPTION_SMTPS (PHPMailer) / tls: true (Ruby, Rails) / "
    "tls.Dial (Go) / mail.smtp.ssl.enable (JavaMail) / --tlsc (swaks) / smtps:// (curl, s-nail) / "
    "tls_starttls off (msmtp) / smtp_tls_wrappermode = yes (Postfix), as for port 465; "
    "STARTTLS is not offered",
)

# Generic command replies
OK = Reply(250, "2.0.0", "Ok")
SENDER_OK = Reply(250, "2.1.0", "Ok")
RECIPIENT_OK = Reply(250, "2.1.5", "Ok")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
HELP = Reply(
    214,
    "2.0.0",
    "Commands: EHLO HELO AUTH MAIL RCPT DATA RSET NOOP QUIT; see the PostStack SMTP docs",
)
VRFY_DISABLED = Reply(502, "5.5.1", "VRFY command is disabled")
BAD_SYNTAX = Reply(500, "5.5.2", "Error: bad syntax")
UNKNOWN_COMMAND = Reply(502, "5.5.2", "Error: command not recognized")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Error: command not implemented")
LINE_TOO_LONG = Reply(500, "5.5.2", "Error: line too long")
HELO_REQUIRES_DOMAIN = Reply(501, "5.5.4", "Syntax: EHLO hostname")
HELO_HAS_CONTROLS = Reply(
    501, "5.5.4", "Syntax: EHLO hostname; control characters (NUL, TAB, ...) are not allowed"
)
SEND_HELO_FIRST = Reply(503, "5.5.1", "Error: send EHLO first")
TLS_ALREADY_ACTIVE = Reply(554, "5.5.1", "Error: TLS already active")
NO_ARGUMENTS = Reply(501, "5.5.4", "Syntax: command takes no arguments")

# AUTH
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_REQUIRED = Reply(
    530,
    "5.7.0",
    "Authentication required: log in with username poststack and your API key, "
    "or your mailbox address and mailbox password",
)
AUTH_FAILED = Reply(
    535,
    "5.7.8",
    "Authentication credentials invalid: use username poststack with an API key "
    "(sk_live_...), or your mailbox address with its mailbox password",
)
AUTH_UNAVAILABLE = Reply(
    454,
    "4.7.0",
    "Temporary authentication failure: the PostStack API could not be reached, try again later",
)
AUTH_ALREADY = Reply(503, "5.5.1", "Error: already authenticated")
AUTH_IN_TRANSACTION = Reply(503, "5.5.1", "Error: MAIL transaction in progress")
AUTH_UNKNOWN_MECHANISM = Reply(
    504, "5.5.4", "Unrecognized authentication type: use PLAIN or LOGIN"
)
AUTH_SYNTAX = Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
AUTH_BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode response: not valid base64")
AUTH_MALFORMED = Reply(501, "5.5.2", "Malformed authentication response")
AUTH_ABORTED = Reply(501, "5.7.0", "Authentication aborted")
AUTH_AUTHZID = Reply(
    535, "5.7.8", "Authentication failed: authorization identity must be empty or equal the username"
)
# An AUTH line (command or response) over RFC 4954's 12,288 octets.
AUTH_LINE_TOO_LONG = Reply(500, "5.5.6", "Authentication Exchange line is too long")
# The password was right, but PostStack has suspended the mailbox.
MAILBOX_SUSPENDED = Reply(
    535, "5.7.1", "Mailbox is suspended in PostStack: ask your PostStack administrator to reactivate it"
)
# A mailbox login on a relay started without --service-key: about the relay, not the password.
MAILBOX_LOGINS_DISABLED = Reply(
    454, "4.7.0", "Mailbox logins are not enabled on this relay: use username poststack with an API key"
)


def auth_throttled(seconds: int) -> Reply:
    """
    Too many failed logins from the client's address, or for this mailbox
    from it (AuthThrottle): refused without checking the credentials;
    C{seconds} until that count is forgotten.
    """
    return Reply(454, "4.7.0", f"Too many failed logins, try again in {seconds} s")


def auth_rate_limited(seconds: int) -> Reply:
    """
    Too many AUTH attempts from the client's address in the last minute
    (C{--max-auth-rate-per-ip}); the connection is closed.
    """
    return Reply(421, "4.7.0", f"Too many AUTH attempts from your address, retry-after={seconds}s")

# MAIL / RCPT / DATA
NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
MAIL_SYNTAX = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
RCPT_SYNTAX = Reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
NEED_RCPT = Reply(503, "5.5.1", "Error: need RCPT command")
SENDER_NO_DOMAIN = Reply(
    553,
    "5.1.7",
    "Sender address rejected: the sender must be an address on a verified domain "
    "(e.g. you@yourdomain.com); the SMTP username is not a sender address",
)
SENDER_BAD_SYNTAX = Reply(553, "5.1.7", "Sender address rejected: bad address syntax")
SENDER_NOT_OWNED = Reply(
    550,
    "5.7.1",
    "Sender address rejected: a mailbox login may only send from its own address",
)
RECIPIENT_BAD_SYNTAX = Reply(501, "5.1.3", "Bad recipient address syntax")

# RFC 5321 length limits (section 4.5.3.1, "501 Path too long") and
# comments, which SMTP paths do not allow; keyed by smtp.path_problem().
SENDER_PATH_PROBLEMS = {
    "path": Reply(
        501, "5.1.7", "Bad sender address syntax: path longer than 256 octets (RFC 5321)"
    ),
    "local": Reply(
        501, "5.1.7", "Bad sender address syntax: local part longer than 64 octets (RFC 5321)"
    ),
    "domain": Reply(
        501, "5.1.7", "Bad sender address syntax: domain longer than 255 octets (RFC 5321)"
    ),
    "comment": Reply(
        501, "5.1.7", "Bad sender address syntax: comments are not allowed in MAIL FROM"
    ),
    "idn": Reply(
        501, "5.1.7", "Bad sender address syntax: domain is not a valid IDNA 2008 domain name"
    ),
    "syntax": SENDER_BAD_SYNTAX,
}
RECIPIENT_PATH_PROBLEMS = {
    "path": Reply(
        501, "5.1.3", "Bad recipient address syntax: path longer than 256 octets (RFC 5321)"
    ),
    "local": Reply(
        501, "5.1.3", "Bad recipient address syntax: local part longer than 64 octets (RFC 5321)"
    ),
    "domain": Reply(
        501, "5.1.3", "Bad recipient address syntax: domain longer than 255 octets (RFC 5321)"
    ),
    "comment": Reply(
        501, "5.1.3", "Bad recipient address syntax: comments are not allowed in RCPT TO"
    ),
    "idn": Reply(
        501, "5.1.3", "Bad recipient address syntax: domain is not a valid IDNA 2008 domain name"
    ),
    "syntax": RECIPIENT_BAD_SYNTAX,
}
# RFC 6531 section 3.5: a non-ASCII path in a transaction that did not
# declare SMTPUTF8 (X.6.7: non-ASCII addresses not permitted).
SENDER_NEEDS_SMTPUTF8 = Reply(
    553, "5.6.7", "Sender address is not ASCII: add SMTPUTF8 to MAIL FROM (RFC 6531)"
)
RECIPIENT_NEEDS_SMTPUTF8 = Reply(
    553, "5.6.7", "Recipient address is not ASCII: add SMTPUTF8 to MAIL FROM (RFC 6531)"
)
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Error: too many recipients")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
UNSUPPORTED_PARAMETER = Reply(555, "5.5.4", "Unsupported option")
BAD_SIZE_PARAMETER = Reply(501, "5.5.4", "Bad message size syntax")
LOCAL_ERROR = Reply(451, "4.3.0", "Error: local error in processing, try again later")
HELO_SYNTAX = Reply(501, "5.5.4", "Syntax: HELO hostname")
EXPN_DISABLED = Reply(502, "5.5.1", "EXPN command is disabled")
BDAT_NOT_SUPPORTED = Reply(502, "5.5.1", "Error: BDAT (CHUNKING) is not supported, use DATA")
UNSUPPORTED_BODY = Reply(555, "5.5.4", "Unsupported BODY type: use 7BIT or 8BITMIME")


def unsupported_option(name: bytes) -> Reply:
    """An unknown MAIL parameter, or any RCPT parameter, named C{name}."""
    return UNSUPPORTED_PARAMETER.with_text("Unsupported option: " + name.decode("ascii", "replace"))


def size_over_limit(limit: int) -> Reply:
    """C{MAIL ... SIZE=} above the limit of C{limit} octets."""
    return MESSAGE_TOO_BIG.with_text("Message size exceeds fixed limit of %d octets" % limit)


def message_over_limit(limit: int) -> Reply:
    """The message itself grew past the limit of C{limit} octets."""
    return MESSAGE_TOO_BIG.with_text("Message size exceeds fixed maximum message size of %d octets" % limit)


def too_many_recipients(limit: int) -> Reply:
    """A C{RCPT} past the limit of C{limit} recipients per message."""
    return TOO_MANY_RECIPIENTS.with_text("Error: too many recipients (at most %d per message)" % limit)


def sender_header_not_owned(mailbox: str) -> Reply:
    """
    A mailbox user's message has a C{Sender:} header naming another
    address.
    """
    return Reply(
        550,
        "5.7.1",
        clean_text(
            f"Sender header must be your mailbox address <{mailbox}>; "
            "remove it or change it (Reply-To may name any address)"
        ),
    )


def queued(email_id: str) -> Reply:
    """
    The success reply after the API accepted the email.
    """
    return Reply(250, "2.0.0", "Ok: queued as " + clean_text(email_id, 100))


# ---------------------------------------------------------------------------
# Replies for the PostStack API's answers (the API client maps every
# outcome of a call to one of these; texts built from an API answer go
# through clean_text).

# No answer at all: the connection failed, was reset or was cut short.
API_NO_ANSWER = Reply(451, "4.4.1", "PostStack API unreachable: no answer, try again later")
# The attempt's time-out expired before the whole answer arrived.
API_TIMEOUT = Reply(451, "4.4.2", "PostStack API did not answer in time, try again later")
# A 2xx without a usable email id; one of the two hints below is added.
API_BAD_ANSWER = Reply(
    451,
    "4.3.0",
    "PostStack API answered without an email id; the email may have been accepted, "
    "try again later",
)
API_BAD_ANSWER_IDEMPOTENT = (
    " (its idempotency key prevents a second send if the same message is sent again)"
)
API_BAD_ANSWER_NO_KEY = " (set X-PostStack-Idempotency-Key so that a retry cannot send it twice)"
# A 401 for the relay's own service key, sending for a mailbox user.
API_SERVICE_KEY_REJECTED = Reply(
    451,
    "4.3.5",
    "Relay misconfigured: PostStack rejected the relay's service key; "
    "the message was not sent, try again later",
)
# The attempt failed in the relay's own client (an unexpected exception).
API_CLIENT_ERROR = Reply(451, "4.3.0", "PostStack API request failed unexpectedly, try again later")
# The payload cannot be encoded as JSON.
API_NOT_ENCODABLE = Reply(554, "5.6.0", "Message could not be converted to an API request")
# No request slot came free in time (too many messages waiting for the API).
API_BUSY = Reply(
    451,
    "4.3.2",
    "PostStack relay busy: too many messages waiting for the API, try again later",
)
# The circuit breaker is open.
API_DOWN = Reply(
    451,
    "4.3.0",
    "PostStack API temporarily unavailable after repeated failures, try again later",
)

# The 429 codes that mean a sending quota (waiting seconds will not help),
# as opposed to throttling.
QUOTA_CODES = frozenset(
    {
        "quota_exceeded",
        "monthly_limit_exceeded",
        "daily_limit_exceeded",
        "daily_cap_exceeded",
        "send_limit_exceeded",
    }
)

_DIGITS = re.compile(r"[0-9]{1,9}")


def rate_limited(retry_after: Optional[int]) -> Reply:
    """
    The API's rate limit for this credential is reached: after DATA (its
    429), and at C{MAIL FROM} while the relays remember it
    (L{poststack_relay.holds}), with the seconds left.
    """
    hint = f", retry-after={retry_after}s" if retry_after is not None else ""
    return Reply(451, "4.7.0", f"PostStack rate limit reached{hint}")


def quota_held(text: str) -> Reply:
    """
    At C{MAIL FROM}: the API said this credential's sending quota is
    reached (C{text} is that 429's own reply text, with the API's reason),
    and the relays remember it for a short time (L{poststack_relay.holds}).
    """
    return Reply(451, "4.7.0", clean_text(text))


def sender_domain_refused(domain: str, status: int, api_message: Optional[str] = None) -> Reply:
    """
    The API refused the sender's C{domain} for this credential with
    C{status} (422: not verified; 404: not the account's; 403: outside the
    key's scope): after DATA (with the API's C{api_message}), and at
    C{MAIL FROM} while the relays remember it (L{poststack_relay.holds}).
    550 5.7.1, a policy refusal (RFC 5321 4.2.3 and 4.3.2: 550 is valid
    after MAIL and after DATA, 553 after MAIL only; RFC 3463 X.7.1: not
    authorized), not 5.6.0 (a media error).
    """
    if status == 422:
        why = f"the domain {domain} is not verified in PostStack; verify it (PostStack dashboard, Domains)"
    elif status == 404:
        why = f"the domain {domain} is not a PostStack sending domain of this account; add and verify it"
    else:
        why = f"this API key may not send from {domain}; use a key allowed to send from it"
    said = f"PostStack API: {api_message}, HTTP {status}" if api_message else f"PostStack API said HTTP {status} recently"
    return Reply(550, "5.7.1", clean_text(f"Sender address rejected: {why}, or send from a verified domain ({said})"))


def redact(text: str, secrets: Iterable[Optional[str]]) -> str:
    """
    C{text} with every occurrence of each (non-empty) secret replaced.
    """
    for secret in secrets:
        if secret and secret in text:
            text = text.replace(secret, "[redacted]")
    return text


def api_error_text(
    body: Any, status: int, secrets: Iterable[Optional[str]] = ()
) -> tuple[str, Optional[str]]:
    """
    The API's own message and code from an error body, if it has them
    (C{"HTTP <status>"} if it has no message).  Secrets are removed before
    the text is shortened, so no part of one can survive.
    """
    message: Optional[str] = None
    code: Optional[str] = None
    if isinstance(body, dict):
        m = body.get("error") or body.get("message")
        if isinstance(m, dict):  # {"error": {"message": ..., "code": ...}}
            code = m.get("code") if isinstance(m.get("code"), str) else None
            m = m.get("message")
        if isinstance(m, str):
            message = m
        c = body.get("code")
        if isinstance(c, str):
            code = c
    if not message:
        message = f"HTTP {status}"
    return clean_text(redact(message, secrets), 200), code


def reply_for_status(
    status: int,
    body: Any,
    retry_after: Optional[str] = None,
    redact: Iterable[Optional[str]] = (),
) -> Reply:
    """
    The SMTP reply for an API error answer (the table in
    C{docs/replies.md}).

    @param status: the HTTP status (not 2xx).
    @param body: the decoded JSON body, or C{None}.
    @param retry_after: the C{Retry-After} header, if any.
    @param redact: secrets (the API key) to blank out of the API's message
        should it ever echo them.
    """
    message, code = api_error_text(body, status, redact)
    said = f"PostStack API: {message}"
    if status in (400, 404, 422):
        return Reply(554, "5.6.0", f"{said} (HTTP {status})")
    if status == 401:
        # Not 535: RFC 4954 defines 535 for the AUTH command only, and the
        # replies RFC 5321 (4.3.2) allows after DATA are 250/450/451/452/
        # 550/552/554.  5.7.8 still says "credentials invalid".
        return Reply(
            554, "5.7.8", f"{said}: the API key was rejected; check that it is valid and not revoked"
        )
    if status == 403:
        return Reply(550, "5.7.1", f"{said} (not permitted for this key or sender domain)")
    if status == 409:
        return Reply(
            554,
            "5.6.0",
            f"{said}: this idempotency key was already used for a different message",
        )
    if status == 413:
        return Reply(552, "5.3.4", f"{said}: message too large for the API")
    if status == 429:
        if code in QUOTA_CODES:
            return Reply(
                451,
                "4.7.0",
                f"{said}: PostStack sending quota reached ({code}); "
                "waiting seconds will not help, raise the quota or wait for it to reset",
            )
        seconds = None
        if retry_after and _DIGITS.fullmatch(retry_after.strip()):
            seconds = int(retry_after.strip())
        return rate_limited(seconds)
    if status >= 500:
        return Reply(451, "4.3.0", f"{said}: temporary API failure, try again later")
    # Anything else (3xx, 408, other 4xx) is not part of the contract: a
    # temporary failure is the answer that can never lose a message.
    return Reply(451, "4.3.0", f"{said}: unexpected API answer, try again later")



# ---------------------------------------------------------------------------
# Replies for messages that cannot be translated into an API request
# (translation raises these; none is written with a literal code elsewhere).
#
# (section kept apart from the previous one on purpose)
#
# Their texts may hold values from the message or the identity (a header
# name, a mailbox address, a JSON parser's reason); TranslationError, which
# carries them, makes every text printable ASCII (other characters become
# "?", see printable), and delivery then applies clean_text.

_NOT_PRINTABLE = re.compile(r"[^\x20-\x7e]+")


def printable(text: str) -> str:
    """
    C{text} in printable ASCII, stripped: every run of other characters
    (CR and LF included) becomes one C{?}.  What a translation reply's text
    is made of.
    """
    return _NOT_PRINTABLE.sub("?", text).strip()


MESSAGE_NOT_MIME = Reply(554, "5.6.0", "Message could not be parsed as MIME; check its headers")
NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "No valid recipients")
NO_FROM_EMPTY_ENVELOPE = Reply(
    554,
    "5.6.0",
    "Message has no From header and the envelope sender is empty; add a From header",
)
NO_FROM_BAD_ENVELOPE = Reply(
    554,
    "5.6.0",
    "Message has no From header and the envelope sender is not a valid address;"
    " add a From header",
)


def header_section_too_large(limit: int) -> Reply:
    """The top-level header section is over C{limit} octets."""
    return Reply(
        554,
        "5.6.0",
        f"Message header section is larger than {limit} octets; remove or shorten headers",
    )


def too_many_header_fields(limit: int) -> Reply:
    """The top-level header section has over C{limit} fields."""
    return Reply(
        554, "5.6.0", f"Message has more than {limit} header fields; remove some headers"
    )


def too_many_mime_parts(limit: int) -> Reply:
    """The MIME tree has over C{limit} parts."""
    return Reply(
        554,
        "5.6.0",
        f"Message has more than {limit} MIME parts; send fewer attachments per message",
    )


def mime_nested_too_deep(limit: int) -> Reply:
    """The MIME tree nests containers over C{limit} levels deep."""
    return Reply(
        554,
        "5.6.0",
        f"MIME parts are nested more than {limit} levels deep; flatten the message structure",
    )


def header_repeated(header: str) -> Reply:
    """A header that may appear once appears with different values."""
    return Reply(
        554, "5.6.0", f"{header} appears more than once with different values; send it once"
    )


def header_has_controls(header: str) -> Reply:
    """An X-PostStack header value holds a control character."""
    return Reply(554, "5.6.0", f"{header} must not contain control characters")


def header_value_too_long(header: str, limit: int) -> Reply:
    """An X-PostStack id header is over C{limit} characters."""
    return Reply(554, "5.6.0", f"{header} is longer than {limit} characters")


def header_not_printable_ascii(header: str) -> Reply:
    """The idempotency key header is not printable ASCII."""
    return Reply(
        554,
        "5.6.0",
        f"{header} must be printable ASCII (it is also sent as an HTTP header)",
    )


def tag_too_long(limit: int) -> Reply:
    """X-PostStack-Tags has a tag over C{limit} characters."""
    return Reply(
        554,
        "5.6.0",
        f"X-PostStack-Tags has a tag longer than {limit} characters; shorten it",
    )


def too_many_tags(limit: int) -> Reply:
    """X-PostStack-Tags has over C{limit} distinct tags."""
    return Reply(
        554, "5.6.0", f"X-PostStack-Tags has more than {limit} tags; send at most {limit}"
    )


def too_many_passed_headers(limit: int) -> Reply:
    """Over C{limit} distinct headers would be passed on to the API."""
    return Reply(
        554,
        "5.6.0",
        f"Message has more than {limit} headers to pass on (X-* and list headers); remove some",
    )


def passed_header_too_long(name: str, limit: int) -> Reply:
    """A header passed on to the API is over C{limit} octets."""
    return Reply(
        554, "5.6.0", f"Header {name} is longer than {limit} octets; shorten or remove it"
    )


def variables_not_an_object(reason: str) -> Reply:
    """X-PostStack-Variables is not one JSON object (C{reason}, cut to 120 characters)."""
    return Reply(
        554, "5.6.0", f"X-PostStack-Variables must be a JSON object: {reason[:120]}"
    )


def from_address_count(found: int) -> Reply:
    """The From header names C{found} addresses instead of one."""
    return Reply(
        554,
        "5.6.0",
        f"From header must contain exactly one address, found {found};"
        " put other authors in Reply-To",
    )


def from_address_invalid(problem: str) -> Reply:
    """The From address has a C{problem} (from L{poststack_relay.addresses})."""
    return Reply(554, "5.6.0", f"From header address is {problem}")


def from_header_not_owned(mailbox: str) -> Reply:
    """A mailbox user's message is from another address than the mailbox's."""
    return Reply(
        550,
        "5.7.1",
        f"From must be your mailbox address <{mailbox}>; change the From header",
    )


def envelope_recipient_invalid(problem: str) -> Reply:
    """An envelope recipient has a C{problem} (from L{poststack_relay.addresses})."""
    return Reply(554, "5.1.3", f"Envelope recipient address is {problem}")
