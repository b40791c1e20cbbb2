"""
The sandbox's credentials (C{etc/sandbox.json}) as the tests use them, the
forms a secret could leak in, and the text of a log event to look for them.
"""

from __future__ import annotations

import base64
from typing import Any

from twisted.python.failure import Failure

__all__ = ["FULL_KEY", "MAILBOX", "SCOPED_KEY", "SERVICE_KEY", "UNKNOWN_KEY", "forms", "scan"]

#: An API key with full access.
FULL_KEY = "sk_test_full_access"
#: An API key scoped to yourdomain.com.
SCOPED_KEY = "sk_test_yourdomain_only"
#: The relay's own service key (mailbox logins go through it).
SERVICE_KEY = "sk_test_relay_service"
#: An API key the sandbox does not know.
UNKNOWN_KEY = "sk_test_not_a_key_4f9c2e7d1b"
#: A mailbox and its password.
MAILBOX = ("alice@yourdomain.com", "alice-password")


def forms(secret: str, username: str) -> list[str]:
    """
    A secret as it might leak: itself, one character longer than the
    prefix logs may show, and the base64 a client sends for it in AUTH
    LOGIN and in AUTH PLAIN (with and without an authzid).
    """

    def b64(raw: str) -> str:
        return base64.b64encode(raw.encode()).decode()

    return [
        secret,
        secret[:11],
        b64(secret),
        b64(f"\0{username}\0{secret}"),
        b64(f"{username}\0{username}\0{secret}"),
    ]


def scan(value: Any) -> str:
    """Everything in a log event's values, as one string."""
    if isinstance(value, dict):
        return " ".join(scan(k) + " " + scan(v) for k, v in value.items())
    if isinstance(value, (list, tuple, set, frozenset)):
        return " ".join(scan(v) for v in value)
    if isinstance(value, Failure):
        return scan(value.value) + " " + value.getTraceback()
    if isinstance(value, BaseException):
        return repr(value) + " " + str(value) + " " + scan(value.args)
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return repr(value) + " " + str(value)
