# -*- test-case-name: tests.test_smtp_commands,tests.test_smtp_session -*-
"""
The SMTP commands, one function each: given the L{Session} and the
command's argument, check the command against the session's state and
its syntax, and reply or make the state change (the session's methods).

L{COMMANDS} maps each verb (upper case) to its function.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Callable

from .. import replies
from ..addresses import address_key
from ..replies import Reply
from .envelope import parse_mail, parse_rcpt
from .sasl import MECHANISMS

if TYPE_CHECKING:
    from .session import Session


# C0 controls and DEL: never part of a host name or address literal (RFC
# 5321 4.1.1.1); NUL in particular ends the name for C-string code.
_CONTROLS = re.compile(rb"[\x00-\x1f\x7f]")


def helo(session: Session, arg: bytes) -> None:
    if not arg:
        session.reply(replies.HELO_SYNTAX)
    elif _CONTROLS.search(arg):
        session.reply(replies.HELO_HAS_CONTROLS)
    else:
        session.greeted(arg, extended=False)


def ehlo(session: Session, arg: bytes) -> None:
    if not arg:
        session.reply(replies.HELO_REQUIRES_DOMAIN)
    elif _CONTROLS.search(arg):
        session.reply(replies.HELO_HAS_CONTROLS)
    else:
        session.greeted(arg, extended=True)


def auth(session: Session, arg: bytes) -> None:
    if session.helo is None:
        session.reply(replies.SEND_HELO_FIRST)
    elif session.delivery is not None:
        session.reply(replies.AUTH_ALREADY)
    elif session.mail_from is not None:
        session.reply(replies.AUTH_IN_TRANSACTION)
    else:
        parts = arg.split()
        if not parts or len(parts) > 2:
            session.reply(replies.AUTH_SYNTAX)
        elif parts[0].upper() not in MECHANISMS:
            session.reply(replies.AUTH_UNKNOWN_MECHANISM)
        else:
            session.start_auth(parts[0].upper(), parts[1] if len(parts) == 2 else None)


def mail(session: Session, arg: bytes) -> None:
    delivery = session.delivery
    if delivery is None:
        session.reply(replies.AUTH_REQUIRED)
        return
    if session.mail_from is not None:
        session.reply(replies.NESTED_MAIL)
        return
    sender = parse_mail(arg, session.config.max_message_size)
    if isinstance(sender, Reply):
        session.reply(sender)
        return
    # Whether this identity may send as this address: the avatar's policy.
    rejection = delivery.validate_sender(sender.address, session.id, session.client)
    if rejection is not None:
        session.reply(rejection)
    else:
        session.open_transaction(sender.address, sender.smtputf8)


def rcpt(session: Session, arg: bytes) -> None:
    if session.mail_from is None:
        session.reply(replies.NEED_MAIL if session.delivery else replies.AUTH_REQUIRED)
        return
    address = parse_rcpt(arg, session.smtputf8)
    if isinstance(address, Reply):
        session.reply(address)
        return
    key = address_key(address)
    if key not in session.rcpt_keys:
        limit = session.config.max_recipients
        if len(session.rcpts) >= limit:
            # Not counted as an error (nor by Postfix, below its
            # smtpd_recipient_overshoot_limit): a client that pipelines
            # more RCPTs than allowed still sends to the accepted ones.
            session.reply(replies.too_many_recipients(limit), error=False)
            return
        session.rcpt_keys.add(key)
        session.rcpts.append(address)
    session.reply(replies.RECIPIENT_OK)


def data(session: Session, arg: bytes) -> None:
    if arg:
        session.reply(replies.NO_ARGUMENTS)
    elif session.mail_from is None:
        session.reply(replies.NEED_MAIL if session.delivery else replies.AUTH_REQUIRED)
    elif not session.rcpts:
        session.reply(replies.NEED_RCPT)
    else:
        session.start_data()


def bdat(session: Session, arg: bytes) -> None:
    session.reply(replies.BDAT_NOT_SUPPORTED)


def rset(session: Session, arg: bytes) -> None:
    session.reset_transaction()
    session.reply(replies.OK)


def noop(session: Session, arg: bytes) -> None:
    session.reply(replies.OK)


def quit_(session: Session, arg: bytes) -> None:
    session.quit()


def help_(session: Session, arg: bytes) -> None:
    session.reply(replies.HELP)


def vrfy(session: Session, arg: bytes) -> None:
    session.reply(replies.VRFY_DISABLED)


def expn(session: Session, arg: bytes) -> None:
    session.reply(replies.EXPN_DISABLED)


def starttls(session: Session, arg: bytes) -> None:
    session.reply(replies.TLS_ALREADY_ACTIVE)


COMMANDS: dict[bytes, Callable[[Session, bytes], None]] = {
    b"HELO": helo,
    b"EHLO": ehlo,
    b"AUTH": auth,
    b"MAIL": mail,
    b"RCPT": rcpt,
    b"DATA": data,
    b"BDAT": bdat,
    b"RSET": rset,
    b"NOOP": noop,
    b"QUIT": quit_,
    b"HELP": help_,
    b"VRFY": vrfy,
    b"EXPN": expn,
    b"STARTTLS": starttls,
}
