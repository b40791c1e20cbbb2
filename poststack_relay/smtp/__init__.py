# -*- test-case-name: tests.test_smtp_protocol,tests.test_smtp_session,tests.test_exports -*-
"""
The SMTP side: an ESMTP submission server that only relays for
authenticated users, one transaction at a time, with exact replies.

L{RelayFactory} is a C{twisted.mail.smtp.SMTPFactory} (it holds the cred
portal), but L{RelaySMTP} is a plain C{Protocol}, not Twisted's C{ESMTP}:
it used to subclass it and replaced every part of it, because C{ESMTP}
(see docs/design.md):

  - builds one message object per recipient and answers C{250 Delivery in
    progress} or C{550} by itself, where the relay needs one API call per
    transaction and the API's own outcome in the reply;
  - has no enhanced status codes, answers malformed AUTH with an exception,
    and tries an anonymous login when nobody authenticated;
  - feeds DATA line by line through Python, where the relay scans chunks
    for the one terminator RFC 5321 allows (C{<CRLF>.<CRLF>}).

The parts, each with one job:

  - L{protocol}: L{RelaySMTP}, the thin shell (bytes, lines, pipelined
    input, timers, calls to the authenticator and the delivery);
  - L{session}: the session and transaction state machine (commands,
    limits, error counting), without a transport;
  - L{commands}: one function per command (checks, replies);
  - L{envelope}: C{MAIL}/C{RCPT} arguments (paths, parameters; the
    address syntax is L{poststack_relay.addresses});
  - L{sasl}: SASL PLAIN/LOGIN decoding;
  - L{data}: the DATA scanner (terminator, dot-unstuffing, size);
  - L{login}: the credential check (throttle, portal, its log lines);
  - L{factory}: L{RelayFactory} (connection limits, live sessions,
    draining) and L{RefusalProtocol}.

In the message content a bare LF is normalised to CRLF; a lone CR is
data.  Neither ever ends DATA (see docs/design.md, "SMTP smuggling").
"""

from ..addresses import path_problem
from .data import DATA_HOLD_LIMIT, DataScanner
from .envelope import parse_path
from .factory import DRAIN_FAREWELL, REFUSAL_LINGER, RefusalProtocol, RelayFactory
from .protocol import CLOSE_LINGER, MAX_AUTH_LINE, MAX_COMMAND_LINE, MAX_PENDING_INPUT, RelaySMTP
from .session import Session

__all__ = [
    "CLOSE_LINGER",
    "DATA_HOLD_LIMIT",
    "DRAIN_FAREWELL",
    "DataScanner",
    "MAX_AUTH_LINE",
    "MAX_COMMAND_LINE",
    "MAX_PENDING_INPUT",
    "REFUSAL_LINGER",
    "RefusalProtocol",
    "RelayFactory",
    "RelaySMTP",
    "Session",
    "parse_path",
    "path_problem",
]
