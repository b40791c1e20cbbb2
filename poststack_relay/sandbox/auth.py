# -*- test-case-name: tests.test_sandbox -*-
"""
Who may call the sandbox: the bearer API key of every API call, the service
key that alone may authenticate mailboxes, a mailbox's email and password,
and the loopback-only rule of the test-only C{/_sandbox} endpoints.

Each check returns what it found or raises the L{ApiError} PostStack
answers (C{401 unauthorized}, C{403 forbidden}, C{400 invalid_request}).
Secrets are compared in constant time and never appear in a message.
"""

from __future__ import annotations

import ipaddress
import secrets
from typing import Any, Mapping

from .data import SandboxData, SandboxKey, SandboxMailbox
from .exchange import ApiError, invalid


def authenticate_key(data: SandboxData, authorization: bytes | None) -> SandboxKey:
    """
    The API key of an C{Authorization: Bearer <key>} header.

    @param authorization: The header's value, or L{None} if absent.
    @raise ApiError: C{401 unauthorized} if the header is missing, not a
        Bearer token, or names no known key.
    """
    if authorization is None:
        raise ApiError(401, "unauthorized", "Missing API key")
    scheme, _, token = authorization.decode("latin-1").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise ApiError(
            401, "unauthorized", "Authorization must be 'Bearer <api key>'"
        )
    key = data.find_key(token)
    if key is None:
        raise ApiError(401, "unauthorized", "Invalid API key")
    return key


def require_full_access(key: SandboxKey) -> None:
    """
    @raise ApiError: C{403 forbidden} unless C{key} has C{full_access}.
    """
    if key.permission != "full_access":
        raise ApiError(403, "forbidden", "This API key has sending access only")


def require_sender_scope(key: SandboxKey, domain: str) -> None:
    """
    @raise ApiError: C{403 forbidden} if C{key}'s domain scope does not
        include C{domain} (checked before the domain's existence, so a
        scoped key learns nothing about other domains).
    """
    if not key.may_send_from(domain):
        raise ApiError(
            403, "forbidden", f"API key is not allowed to send from {domain}"
        )


def require_service_key(key: SandboxKey) -> None:
    """
    @raise ApiError: C{403 forbidden} unless C{key} is a service key (the
        only kind that may call C{POST /mailboxes/authenticate}).
    """
    if not key.service:
        raise ApiError(
            403, "forbidden", "This API key may not authenticate mailboxes"
        )


def authenticate_mailbox(data: SandboxData, body: Mapping[str, Any]) -> SandboxMailbox:
    """
    The active mailbox that C{body} (C{{"email": ..., "password": ...}})
    names.

    @raise ApiError: C{400} if the email or password is missing; C{401
        "Invalid email or password"} (the same for an unknown email and a
        wrong password); C{403 "Mailbox is suspended"} only after the right
        password.
    """
    email_address = body.get("email")
    password = body.get("password")
    if not isinstance(email_address, str) or not email_address:
        raise invalid("'email' is required")
    if not isinstance(password, str):
        raise invalid("'password' is required")
    mailbox = data.find_mailbox(email_address)
    if mailbox is None or not secrets.compare_digest(
        mailbox.password.encode("utf-8"), password.encode("utf-8")
    ):
        raise ApiError(401, "unauthorized", "Invalid email or password")
    if mailbox.status != "active":
        raise ApiError(403, "forbidden", "Mailbox is suspended")
    return mailbox


def require_loopback(host: object) -> None:
    """
    @param host: The client address's C{host} (L{None} if it has none).
    @raise ApiError: C{403 forbidden} unless C{host} is a loopback address
        (127.0.0.0/8, ::1, or ::ffff:127.x).
    """
    loopback = False
    if isinstance(host, str):
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            mapped = getattr(ip, "ipv4_mapped", None)
            loopback = ip.is_loopback or bool(mapped and mapped.is_loopback)
    if not loopback:
        raise ApiError(
            403, "forbidden", "/_sandbox endpoints answer loopback clients only"
        )
