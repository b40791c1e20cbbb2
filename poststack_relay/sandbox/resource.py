# -*- test-case-name: tests.test_sandbox -*-
"""
A local stand-in for the PostStack HTTP API, as a C{twisted.web} resource.

L{SandboxResource} answers C{POST /emails}, C{GET /emails},
C{GET /emails/{id}}, C{GET /domains} and C{POST /mailboxes/authenticate}
with PostStack's semantics (see C{docs/sandbox.md}), stores every accepted
email in a L{SandboxStore}, and adds test-only C{/_sandbox/...} endpoints for
inspection and fault injection. The same object is served over real HTTP by
L{makeSandboxService} and wrapped in C{treq.testing.StubTreq} by unit tests.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import json
import os
import re
import secrets
import string
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Mapping, NoReturn

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IReactorTCP,
    IReactorTime,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from .store import SandboxStore, StoredEmail

_log = Logger()

DEFAULT_MAX_BODY_BYTES = 40 * 1024 * 1024
"""Largest request body accepted (40 MiB) unless the data file says otherwise."""

IN_TREE_DATA_PATH = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "etc",
    "sandbox.json",
)
"""Absolute path of C{etc/sandbox.json} in a source checkout (tests use it)."""

PERMISSIONS = ("full_access", "sending_access")
DOMAIN_STATUSES = ("verified", "pending", "failed")
MAILBOX_STATUSES = ("active", "suspended")

FAULT_MODES = (
    "500",
    "502",
    "503",
    "422",
    "429",
    "quota",
    "slow",
    "hang",
    "reset",
    "malformed",
    "noid",
    "accept_then_500",
)
"""Every mode accepted by L{SandboxResource.inject_fault}."""

_ID_ALPHABET = string.ascii_lowercase + string.digits


# ---------------------------------------------------------------------------
# The data file


@attrs.frozen
class SandboxKey:
    """
    One API key the sandbox accepts.

    @ivar domains: The domains this key may send from, or L{None} for any.
    @ivar service: Whether the key may call C{POST /mailboxes/authenticate}
        (the relay's own "service key").
    """

    key: str
    name: str
    permission: str
    domains: tuple[str, ...] | None = None
    service: bool = False

    def may_send_from(self, domain: str) -> bool:
        """
        Return whether this key's domain scope allows sending from C{domain}.
        """
        return self.domains is None or domain.lower() in self.domains


@attrs.frozen
class SandboxDomain:
    """A sending domain and its verification status."""

    name: str
    status: str


@attrs.frozen
class SandboxMailbox:
    """A mailbox user (plaintext password: this is a sandbox)."""

    email_address: str
    password: str
    status: str


@attrs.frozen
class SandboxTemplate:
    """An email template; only published ones may be sent."""

    id: str
    name: str
    published: bool
    subject: str = ""


@attrs.frozen
class SandboxData:
    """
    The parsed sandbox data file: keys, domains, mailboxes, templates, limits.

    Build one with L{load_sandbox_data}; tests may derive variants with
    C{attrs.evolve}.
    """

    keys: tuple[SandboxKey, ...]
    domains: tuple[SandboxDomain, ...]
    mailboxes: tuple[SandboxMailbox, ...] = ()
    templates: tuple[SandboxTemplate, ...] = ()
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES

    def find_key(self, key: str) -> SandboxKey | None:
        """Return the L{SandboxKey} whose value is C{key}, or L{None}."""
        for candidate in self.keys:
            if secrets.compare_digest(candidate.key.encode(), key.encode()):
                return candidate
        return None

    def find_domain(self, name: str) -> SandboxDomain | None:
        """Return the domain called C{name} (case-insensitive), or L{None}."""
        name = name.lower()
        for domain in self.domains:
            if domain.name == name:
                return domain
        return None

    def find_mailbox(self, email_address: str) -> SandboxMailbox | None:
        """Return the mailbox C{email_address} (case-insensitive), or L{None}."""
        email_address = email_address.lower()
        for mailbox in self.mailboxes:
            if mailbox.email_address.lower() == email_address:
                return mailbox
        return None

    def find_template(self, template_id: str) -> SandboxTemplate | None:
        """Return the template with id C{template_id}, or L{None}."""
        for template in self.templates:
            if template.id == template_id:
                return template
        return None


class _Fields:
    """
    Typed access to one JSON object of the data file, raising L{ValueError}
    that names the file and the place of the problem.
    """

    def __init__(
        self, path: str, where: str, value: object, allowed: Iterable[str]
    ) -> None:
        self._path = path
        self._where = where
        if not isinstance(value, dict):
            self.fail("must be a JSON object")
        self._obj: dict[str, Any] = value
        unknown = sorted(
            k for k in value if k not in set(allowed) and not k.startswith("_")
        )
        if unknown:
            self.fail(f"unknown field {unknown[0]!r}")

    def fail(self, problem: str, field: str | None = None) -> NoReturn:
        where = self._where if field is None else f"{self._where}.{field}"
        where = where.lstrip(".") or "top level"
        raise ValueError(f"sandbox data file {self._path!r}: {where}: {problem}")

    def string(self, name: str, default: str | None = None) -> str:
        value = self._obj.get(name, default)
        if value is None:
            self.fail("is required", name)
        if not isinstance(value, str) or not value:
            self.fail("must be a non-empty string", name)
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self._obj.get(name, default)
        if not isinstance(value, bool):
            self.fail("must be true or false", name)
        return value

    def choice(self, name: str, choices: tuple[str, ...]) -> str:
        value = self.string(name)
        if value not in choices:
            self.fail(f"must be one of {', '.join(choices)}", name)
        return value

    def items(self, name: str, required: bool) -> list[object]:
        value = self._obj.get(name)
        if value is None and not required:
            return []
        if not isinstance(value, list) or (required and not value):
            self.fail("must be a non-empty list" if required else "must be a list", name)
        return value

    def strings(self, name: str) -> list[str] | None:
        value = self._obj.get(name)
        if value is None:
            return None
        if (
            not isinstance(value, list)
            or not value
            or not all(isinstance(v, str) and v for v in value)
        ):
            self.fail("must be a non-empty list of strings", name)
        return value

    def positive_int(self, name: str, default: int) -> int:
        value = self._obj.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            self.fail("must be a positive integer", name)
        return value


def load_sandbox_data(path: str) -> SandboxData:
    """
    Read and validate the sandbox data file (format: C{docs/sandbox.md}).

    @raise ValueError: With a one-line message naming the file and the
        problem, if the file is missing, unreadable, not JSON or invalid.
    """
    try:
        with open(path, "rb") as data_file:
            raw = data_file.read()
    except OSError as e:
        raise ValueError(
            f"sandbox data file {path!r}: cannot read: {e.strerror or e}"
        ) from None
    try:
        document = json.loads(raw)
    except UnicodeDecodeError:
        raise ValueError(f"sandbox data file {path!r}: not UTF-8") from None
    except json.JSONDecodeError as e:
        raise ValueError(
            f"sandbox data file {path!r}: invalid JSON at line {e.lineno}"
            f" column {e.colno}: {e.msg}"
        ) from None
    top = _Fields(
        path,
        "",
        document,
        ("api_keys", "domains", "mailboxes", "templates", "max_body_bytes"),
    )

    domains: list[SandboxDomain] = []
    for i, item in enumerate(top.items("domains", required=True)):
        f = _Fields(path, f"domains[{i}]", item, ("name", "status"))
        name = f.string("name").lower()
        if any(d.name == name for d in domains):
            f.fail(f"duplicate domain {name!r}", "name")
        domains.append(SandboxDomain(name, f.choice("status", DOMAIN_STATUSES)))
    known_domains = {d.name for d in domains}

    keys: list[SandboxKey] = []
    for i, item in enumerate(top.items("api_keys", required=True)):
        f = _Fields(
            path,
            f"api_keys[{i}]",
            item,
            ("key", "name", "permission", "domains", "service"),
        )
        key = f.string("key")
        if not key.startswith(("sk_test_", "sk_live_")):
            f.fail("must start with sk_test_ or sk_live_", "key")
        if any(k.key == key for k in keys):
            f.fail("duplicate key", "key")
        scope = f.strings("domains")
        if scope is not None:
            scope = [d.lower() for d in scope]
            for d in scope:
                if d not in known_domains:
                    f.fail(f"unknown domain {d!r}", "domains")
        keys.append(
            SandboxKey(
                key=key,
                name=f.string("name", default=f"key{i}"),
                permission=f.choice("permission", PERMISSIONS),
                domains=None if scope is None else tuple(scope),
                service=f.boolean("service", False),
            )
        )

    mailboxes: list[SandboxMailbox] = []
    for i, item in enumerate(top.items("mailboxes", required=False)):
        f = _Fields(
            path, f"mailboxes[{i}]", item, ("email_address", "password", "status")
        )
        address = f.string("email_address")
        parsed = _parse_address(address)
        if parsed is None or parsed != address:
            f.fail("must be a bare email address", "email_address")
        if address.rpartition("@")[2].lower() not in known_domains:
            f.fail("its domain is not in 'domains'", "email_address")
        mailboxes.append(
            SandboxMailbox(
                address, f.string("password"), f.choice("status", MAILBOX_STATUSES)
            )
        )

    templates: list[SandboxTemplate] = []
    for i, item in enumerate(top.items("templates", required=False)):
        f = _Fields(
            path, f"templates[{i}]", item, ("id", "name", "published", "subject")
        )
        template_id = f.string("id")
        if any(t.id == template_id for t in templates):
            f.fail("duplicate template id", "id")
        templates.append(
            SandboxTemplate(
                id=template_id,
                name=f.string("name", default=template_id),
                published=f.boolean("published", False),
                subject=f.string("subject", default="-"),
            )
        )

    return SandboxData(
        keys=tuple(keys),
        domains=tuple(domains),
        mailboxes=tuple(mailboxes),
        templates=tuple(templates),
        max_body_bytes=top.positive_int("max_body_bytes", DEFAULT_MAX_BODY_BYTES),
    )


# ---------------------------------------------------------------------------
# Request validation helpers

_ADDRESS = re.compile(
    r"\s*(?:(?P<name>[^<>]*?)\s*<(?P<bracketed>[^<>\s]+)>|(?P<bare>[^<>\s]+))\s*"
)
_DOMAIN = re.compile(r"[^\s.@<>\"]+(?:\.[^\s.@<>\"]+)*")
_HEADER_NAME = re.compile(r"[!-9;-~]+")


def _parse_address(value: str) -> str | None:
    """
    Return the bare address in C{"Name <local@domain>"} or C{local@domain},
    or L{None} if C{value} is not of that shape.
    """
    match = _ADDRESS.fullmatch(value)
    if match is None:
        return None
    address = match.group("bracketed") or match.group("bare")
    local, at, domain = address.rpartition("@")
    if not at or not local or _DOMAIN.fullmatch(domain) is None:
        return None
    return address


class _ApiError(Exception):
    """An error answer: status, stable code, message and extra headers."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def _invalid(message: str) -> _ApiError:
    return _ApiError(400, "invalid_request", message)


def _optional_string(payload: Mapping[str, Any], name: str) -> str | None:
    value = payload.get(name)
    if value is not None and not isinstance(value, str):
        raise _invalid(f"'{name}' must be a string")
    return value


def _address_list(
    payload: Mapping[str, Any], name: str, required: bool
) -> list[str]:
    value = payload.get(name)
    if value is None:
        if required:
            raise _invalid(f"'{name}' is required")
        return []
    if not isinstance(value, list):
        raise _invalid(f"'{name}' must be a list of email addresses")
    if required and not value:
        raise _invalid(f"'{name}' must contain at least one address")
    for i, item in enumerate(value):
        if not isinstance(item, str) or _parse_address(item) is None:
            raise _invalid(f"'{name}[{i}]' is not a valid email address")
    return value


def _canonical_fingerprint(payload: Mapping[str, Any]) -> str:
    """
    Digest of the request body with keys sorted and C{idempotency_key}
    removed: two bodies that differ only in key order or whitespace match.
    """
    canonical = {k: v for k, v in payload.items() if k != "idempotency_key"}
    encoded = json.dumps(
        canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")
    return hashlib.sha256(encoded).hexdigest()


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


@attrs.frozen
class _Email:
    """The facts of a validated C{POST /emails} body the handler needs."""

    sender_domain: str
    template_id: str | None


def _validate_email(payload: Mapping[str, Any]) -> _Email:
    """
    Check the shape of a C{POST /emails} body (the 400 rules).

    @raise _ApiError: C{400 invalid_request} naming the first bad field.
    """
    sender = payload.get("from")
    if sender is None:
        raise _invalid("'from' is required")
    if not isinstance(sender, str):
        raise _invalid("'from' must be a string")
    sender_address = _parse_address(sender)
    if sender_address is None:
        raise _invalid("'from' is not a valid email address")
    _address_list(payload, "to", required=True)
    _address_list(payload, "cc", required=False)
    _address_list(payload, "bcc", required=False)
    reply_to = _optional_string(payload, "reply_to")
    if reply_to is not None and _parse_address(reply_to) is None:
        raise _invalid("'reply_to' is not a valid email address")

    template_id = _optional_string(payload, "template_id")
    if template_id is not None and not template_id:
        raise _invalid("'template_id' must not be empty")
    subject = _optional_string(payload, "subject")
    html = _optional_string(payload, "html")
    text = _optional_string(payload, "text")
    if template_id is None:
        if subject is None:
            raise _invalid("'subject' is required unless 'template_id' is given")
        if not html and not text:
            raise _invalid(
                "'html' or 'text' is required unless 'template_id' is given"
            )

    variables = payload.get("variables")
    if variables is not None and not isinstance(variables, dict):
        raise _invalid("'variables' must be an object")

    tags = payload.get("tags")
    if tags is not None and (
        not isinstance(tags, list) or not all(isinstance(t, str) for t in tags)
    ):
        raise _invalid("'tags' must be a list of strings")

    headers = payload.get("headers")
    if headers is not None:
        if not isinstance(headers, dict):
            raise _invalid("'headers' must be an object of strings")
        for name, value in headers.items():
            if not isinstance(value, str):
                raise _invalid(f"'headers.{name}' must be a string")
            if _HEADER_NAME.fullmatch(name) is None:
                raise _invalid(f"'headers' has an invalid header name {name!r}")
            if "\r" in value or "\n" in value:
                raise _invalid(f"'headers.{name}' must not contain line breaks")

    attachments = payload.get("attachments")
    if attachments is not None:
        if not isinstance(attachments, list):
            raise _invalid("'attachments' must be a list")
        for i, attachment in enumerate(attachments):
            where = f"attachments[{i}]"
            if not isinstance(attachment, dict):
                raise _invalid(f"'{where}' must be an object")
            filename = attachment.get("filename")
            if not isinstance(filename, str) or not filename:
                raise _invalid(f"'{where}.filename' is required")
            content = attachment.get("content")
            if not isinstance(content, str):
                raise _invalid(f"'{where}.content' is required (base64)")
            try:
                base64.b64decode(content, validate=True)
            except (binascii.Error, ValueError):
                raise _invalid(f"'{where}.content' is not valid base64") from None
            content_type = attachment.get("content_type")
            if content_type is not None and (
                not isinstance(content_type, str) or "/" not in content_type
            ):
                raise _invalid(f"'{where}.content_type' must be a MIME type")

    idempotency_key = payload.get("idempotency_key")
    if idempotency_key is not None and (
        not isinstance(idempotency_key, str) or not idempotency_key
    ):
        raise _invalid("'idempotency_key' must be a non-empty string")

    scheduled_at = _optional_string(payload, "scheduled_at")
    if scheduled_at is not None:
        try:
            datetime.fromisoformat(scheduled_at)
        except ValueError:
            raise _invalid("'scheduled_at' must be an ISO 8601 date-time") from None

    unsubscribe = payload.get("unsubscribe")
    if unsubscribe is not None and not isinstance(unsubscribe, bool):
        raise _invalid("'unsubscribe' must be true or false")

    return _Email(
        sender_domain=sender_address.rpartition("@")[2].lower(),
        template_id=template_id,
    )


# ---------------------------------------------------------------------------
# Faults


@attrs.define
class _Fault:
    mode: str
    remaining: int
    delay: float
    retry_after: str | None
    method: str
    path: str

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "count": self.remaining,
            "delay": self.delay,
            "retry_after": self.retry_after,
            "method": self.method,
            "path": self.path,
        }


@attrs.frozen
class _Reply:
    """A response to write: status, body bytes, content type, headers."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: Mapping[str, str] = attrs.field(factory=dict)

    @classmethod
    def json(
        cls, status: int, obj: object, headers: Mapping[str, str] | None = None
    ) -> _Reply:
        body = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        return cls(status, body, "application/json", dict(headers or {}))

    @classmethod
    def error(cls, error: _ApiError) -> _Reply:
        return cls.json(
            error.status, {"error": error.message, "code": error.code}, error.headers
        )


class _Exchange:
    """
    One request being answered; remembers whether the client went away so a
    delayed answer is not written to a closed connection.
    """

    def __init__(self, request: Request, max_body_bytes: int) -> None:
        self.request = request
        self.gone = False
        request.notifyFinish().addErrback(self._lost)
        # Read the body now: twisted.web closes request.content when the
        # connection is lost, and a delayed answer may still need it.
        content = getattr(request, "content", None)
        self.body_size = 0
        self.body: bytes | None = b""
        if content is not None:
            content.seek(0, os.SEEK_END)
            self.body_size = content.tell()
            content.seek(0)
            self.body = (
                content.read() if self.body_size <= max_body_bytes else None
            )

    def _lost(self, failure: Failure) -> None:
        self.gone = True

    def write(self, reply: _Reply) -> None:
        """Write C{reply} and finish the request, unless the client left."""
        request = self.request
        if self.gone or request.finished:
            return
        request.setResponseCode(reply.status)
        for name, value in reply.headers.items():
            request.setHeader(name.encode("latin-1"), value.encode("latin-1"))
        content_type = reply.content_type
        if content_type == "application/json":
            content_type += "; charset=utf-8"
        request.setHeader(b"content-type", content_type.encode("ascii"))
        request.setHeader(b"content-length", str(len(reply.body)).encode("ascii"))
        request.write(reply.body)
        request.finish()


def _fault_error(status: int, code: str, message: str) -> _Reply:
    return _Reply.error(_ApiError(status, code, f"{message} (sandbox fault)"))


_Handler = Callable[["_Exchange", "re.Match[str]"], _Reply]


# ---------------------------------------------------------------------------
# The resource


class SandboxResource(Resource):
    """
    The sandbox PostStack API (a leaf resource: it routes by itself).

    Works the same over a real C{Site} and inside C{treq.testing.StubTreq}.
    """

    isLeaf = True

    def __init__(
        self,
        store: SandboxStore,
        data: SandboxData,
        clock: IReactorTime | None = None,
    ) -> None:
        """
        @param store: Where accepted emails go.
        @param data: Keys, domains, mailboxes and templates.
        @param clock: Used for C{created_at} and for delayed ("slow") answers;
            the global reactor if L{None}.
        """
        super().__init__()
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        assert clock is not None
        self.store = store
        self.data = data
        self._clock: IReactorTime = clock
        self._faults: list[_Fault] = []
        self._delayed: dict[IDelayedCall, Request] = {}
        self._held: set[Request] = set()
        self._routes: list[tuple[str, re.Pattern[str], _Handler, int]] = [
            ("POST", re.compile(r"/emails"), self._post_email, 202),
            ("GET", re.compile(r"/emails"), self._list_emails, 200),
            ("GET", re.compile(r"/emails/(?P<id>[^/]+)"), self._get_email, 200),
            ("GET", re.compile(r"/domains"), self._list_domains, 200),
            (
                "POST",
                re.compile(r"/mailboxes/authenticate"),
                self._authenticate_mailbox,
                200,
            ),
            ("GET", re.compile(r"/_sandbox/emails"), self._sandbox_emails, 200),
            ("DELETE", re.compile(r"/_sandbox/emails"), self._sandbox_clear, 200),
            ("GET", re.compile(r"/_sandbox/faults"), self._sandbox_faults, 200),
            ("POST", re.compile(r"/_sandbox/faults"), self._sandbox_add_fault, 201),
            (
                "DELETE",
                re.compile(r"/_sandbox/faults"),
                self._sandbox_clear_faults,
                200,
            ),
        ]

    # -- public test API ---------------------------------------------------

    def inject_fault(
        self,
        mode: str,
        count: int = 1,
        delay: float = 0.0,
        retry_after: str | int | None = None,
        path: str = "/emails",
        method: str = "POST",
    ) -> None:
        """
        Make the next C{count} requests to C{method path} misbehave.

        Faults queue: a request consumes one count of the first fault that
        matches its method and path. C{count=-1} lasts until
        L{clear_faults}. C{delay} (seconds, on the injected clock) postpones
        the fault's answer; for C{"slow"} it is the whole point. Modes are
        listed in L{FAULT_MODES} and described in C{docs/sandbox.md}.

        @raise ValueError: On an unknown mode or a bad argument.
        """
        if mode not in FAULT_MODES:
            raise ValueError(f"unknown fault mode {mode!r}")
        if isinstance(count, bool) or not isinstance(count, int) or (
            count < 1 and count != -1
        ):
            raise ValueError("count must be a positive integer or -1")
        if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not (
            0 <= delay < 86400
        ):
            raise ValueError("delay must be a number of seconds >= 0")
        if isinstance(retry_after, int) and not isinstance(retry_after, bool):
            retry_after = str(retry_after)
        if retry_after is not None and (
            not isinstance(retry_after, str) or not retry_after.strip()
        ):
            raise ValueError("retry_after must be a string (seconds or HTTP date)")
        if not isinstance(method, str) or not isinstance(path, str):
            raise ValueError("method and path must be strings")
        method = method.upper()
        path = _normalise_path(path)
        if path.startswith("/_sandbox") or not any(
            m == method and p.fullmatch(path) for m, p, _, _ in self._routes
        ):
            raise ValueError(f"no API route {method} {path} to inject a fault into")
        self._faults.append(
            _Fault(mode, count, float(delay), retry_after, method, path)
        )

    def clear_faults(self) -> int:
        """
        Remove every pending fault; return how many there were.
        """
        count = len(self._faults)
        self._faults.clear()
        return count

    @property
    def pending(self) -> int:
        """
        How many requests are being held ("hang") or wait for a delayed answer.
        """
        return len(self._held) + len(self._delayed)

    def abort_pending(self) -> None:
        """
        Cancel delayed answers and drop held ("hang") connections; used when
        the service stops so no timer or connection outlives it.
        """
        delayed, self._delayed = self._delayed, {}
        for call, request in delayed.items():
            if call.active():
                call.cancel()
            if request.transport is not None:
                request.transport.abortConnection()
        for request in list(self._held):
            if request.transport is not None:
                request.transport.abortConnection()
        self._held.clear()

    # -- rendering -----------------------------------------------------------

    def render(self, request: Request) -> int:
        """
        Route the request, apply any pending fault, write the answer.

        Always answers through C{request.write}/C{finish} and returns
        C{NOT_DONE_YET}, so immediate and delayed answers share one path.
        """
        request.setHeader(b"x-request-id", _new_id("req_").encode("ascii"))
        exchange = _Exchange(request, self.data.max_body_bytes)
        method = request.method.decode("latin-1").upper()
        path = _normalise_path(request.path.decode("utf-8", "replace"))

        handler: _Handler | None = None
        match: re.Match[str] | None = None
        success = 200
        allowed: list[str] = []
        for route_method, pattern, route_handler, route_success in self._routes:
            found = pattern.fullmatch(path)
            if found is None:
                continue
            allowed.append(route_method)
            if route_method == method:
                handler, match, success = route_handler, found, route_success
                break
        if handler is None or match is None:
            if allowed:
                error = _ApiError(
                    405,
                    "method_not_allowed",
                    f"Method {method} not allowed on {path}",
                    {"Allow": ", ".join(allowed)},
                )
            else:
                error = _ApiError(404, "not_found", f"No such endpoint: {path}")
            exchange.write(_Reply.error(error))
            return NOT_DONE_YET

        def answer() -> _Reply:
            assert handler is not None and match is not None
            return self._dispatch(handler, exchange, match)

        fault = None if path.startswith("/_sandbox") else self._take_fault(method, path)
        if fault is None:
            exchange.write(answer())
            return NOT_DONE_YET
        _log.info(
            "sandbox fault {mode} on {method} {path}",
            mode=fault.mode,
            method=method,
            path=path,
        )
        if fault.mode == "hang":
            self._hold(request)
            return NOT_DONE_YET

        def act() -> None:
            reply = self._fault_reply(fault, request, answer, success)
            if reply is not None:
                exchange.write(reply)

        if fault.delay > 0:
            self._later(request, fault.delay, act)
        else:
            act()
        return NOT_DONE_YET

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        for fault in self._faults:
            if fault.method == method and fault.path == path:
                if fault.remaining > 0:
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        self._faults.remove(fault)
                return _Fault(
                    fault.mode,
                    1,
                    fault.delay,
                    fault.retry_after,
                    fault.method,
                    fault.path,
                )
        return None

    def _fault_reply(
        self,
        fault: _Fault,
        request: Request,
        answer: Callable[[], _Reply],
        success: int,
    ) -> _Reply | None:
        mode = fault.mode
        if mode in ("500", "502", "503"):
            return _fault_error(int(mode), "internal_error", "Internal server error")
        if mode == "422":
            return _fault_error(422, "unprocessable_entity", "Validation failed")
        if mode == "429":
            headers = {} if fault.retry_after is None else {
                "Retry-After": fault.retry_after
            }
            return _Reply.error(
                _ApiError(
                    429,
                    "rate_limit_exceeded",
                    "Too many requests (sandbox fault)",
                    headers,
                )
            )
        if mode == "quota":
            return _fault_error(429, "monthly_limit_exceeded", "Monthly limit reached")
        if mode == "slow":
            return answer()
        if mode == "reset":
            if request.transport is not None:
                request.transport.abortConnection()
            return None
        if mode == "malformed":
            return _Reply(success, b"<html>502 Bad Gateway</html>", "text/html")
        if mode == "noid":
            return _Reply.json(success, {"object": "email", "status": "queued"})
        assert mode == "accept_then_500", mode
        real = answer()
        _log.info(
            "sandbox fault accept_then_500 discarded a {status} answer",
            status=real.status,
        )
        return _fault_error(500, "internal_error", "Internal server error")

    def _hold(self, request: Request) -> None:
        self._held.add(request)
        request.notifyFinish().addBoth(lambda _: self._held.discard(request))

    def _later(self, request: Request, delay: float, act: Callable[[], None]) -> None:
        def fire() -> None:
            self._delayed.pop(call, None)
            act()

        call = self._clock.callLater(delay, fire)
        self._delayed[call] = request

    def _dispatch(
        self, handler: _Handler, exchange: _Exchange, match: re.Match[str]
    ) -> _Reply:
        try:
            return handler(exchange, match)
        except _ApiError as error:
            return _Reply.error(error)
        except Exception:
            _log.failure("sandbox handler failed")
            return _Reply.error(
                _ApiError(500, "internal_error", "Internal server error")
            )

    # -- helpers -------------------------------------------------------------

    def _authenticate(self, request: Request) -> SandboxKey:
        header = request.getHeader(b"authorization")
        if header is None:
            raise _ApiError(401, "unauthorized", "Missing API key")
        scheme, _, token = header.decode("latin-1").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise _ApiError(
                401, "unauthorized", "Authorization must be 'Bearer <api key>'"
            )
        key = self.data.find_key(token)
        if key is None:
            raise _ApiError(401, "unauthorized", "Invalid API key")
        return key

    def _json_body(self, exchange: _Exchange) -> dict[str, Any]:
        if exchange.body is None:
            raise _ApiError(
                413,
                "payload_too_large",
                f"Request body is {exchange.body_size} bytes; the limit is"
                f" {self.data.max_body_bytes}",
            )
        try:
            body = json.loads(
                exchange.body.decode("utf-8"), parse_constant=_reject_constant
            )
        except (UnicodeDecodeError, ValueError):
            raise _invalid("Request body must be valid JSON") from None
        if not isinstance(body, dict):
            raise _invalid("Request body must be a JSON object")
        return body

    def _now(self) -> str:
        moment = datetime.fromtimestamp(self._clock.seconds(), tz=timezone.utc)
        return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")

    def _require_loopback(self, request: Request) -> None:
        address = request.getClientAddress()
        host = getattr(address, "host", None)
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
            raise _ApiError(
                403, "forbidden", "/_sandbox endpoints answer loopback clients only"
            )

    # -- the API -------------------------------------------------------------

    def _post_email(self, exchange: _Exchange, match: re.Match[str]) -> _Reply:
        request = exchange.request
        key = self._authenticate(request)
        payload = self._json_body(exchange)
        email = _validate_email(payload)

        if not key.may_send_from(email.sender_domain):
            raise _ApiError(
                403,
                "forbidden",
                f"API key is not allowed to send from {email.sender_domain}",
            )
        domain = self.data.find_domain(email.sender_domain)
        if domain is None:
            raise _ApiError(404, "not_found", "Domain not found")
        if domain.status != "verified":
            raise _ApiError(422, "unprocessable_entity", "Domain not verified")
        if email.template_id is not None:
            template = self.data.find_template(email.template_id)
            if template is None:
                raise _ApiError(404, "not_found", "Template not found")
            if not template.published:
                raise _ApiError(422, "unprocessable_entity", "Template not published")

        idempotency_key = payload.get("idempotency_key")
        if idempotency_key is None:
            header = request.getHeader(b"idempotency-key")
            if header is not None and header.strip():
                idempotency_key = header.decode("latin-1").strip()
        fingerprint = _canonical_fingerprint(payload)
        if idempotency_key is not None:
            earlier = self.store.find_idempotent(key.key, idempotency_key)
            if earlier is not None:
                stored, stored_fingerprint = earlier
                if stored_fingerprint != fingerprint:
                    raise _ApiError(
                        409,
                        "conflict",
                        "Idempotency key already used with a different request body",
                    )
                return _Reply.json(
                    202, _email_created(stored), {"Idempotent-Replayed": "true"}
                )

        headers = {
            name.decode("latin-1").lower(): ", ".join(
                v.decode("latin-1") for v in values
            )
            for name, values in request.requestHeaders.getAllRawHeaders()
            if name.lower() not in (b"authorization", b"proxy-authorization")
        }
        stored = StoredEmail(
            id=_new_id("em_"),
            api_key=key.key,
            payload=payload,
            idempotency_key=idempotency_key,
            request_headers=headers,
            created_at=self._now(),
        )
        self.store.add(stored, fingerprint)
        _log.info(
            "sandbox stored {email_id} from {sender} via key {key_name}",
            email_id=stored.id,
            sender=payload["from"],
            key_name=key.name,
        )
        return _Reply.json(202, _email_created(stored))

    def _list_emails(self, exchange: _Exchange, match: re.Match[str]) -> _Reply:
        request = exchange.request
        key = self._authenticate(request)
        page = _query_int(request, "page", 1, 1, 1_000_000)
        per_page = _query_int(request, "per_page", 20, 1, 100)
        tag = _query(request, "tag")
        status = _query(request, "status")
        emails = list(reversed(self.store.emails_for_key(key.key)))
        if tag is not None:
            emails = [e for e in emails if tag in (e.payload.get("tags") or [])]
        if status is not None and status != "queued":
            emails = []
        start = (page - 1) * per_page
        chosen = emails[start : start + per_page]
        return _Reply.json(
            200,
            {
                "object": "list",
                "data": [_email_detail(e) for e in chosen],
                "page": page,
                "per_page": per_page,
                "total": len(emails),
                "has_more": start + per_page < len(emails),
            },
        )

    def _get_email(self, exchange: _Exchange, match: re.Match[str]) -> _Reply:
        request = exchange.request
        key = self._authenticate(request)
        stored = self.store.get(match.group("id"))
        if stored is None or stored.api_key != key.key:
            raise _ApiError(404, "not_found", "Email not found")
        return _Reply.json(200, _email_detail(stored))

    def _list_domains(self, exchange: _Exchange, match: re.Match[str]) -> _Reply:
        request = exchange.request
        key = self._authenticate(request)
        if key.permission != "full_access":
            raise _ApiError(
                403, "forbidden", "This API key has sending access only"
            )
        return _Reply.json(
            200,
            {
                "object": "list",
                "data": [
                    {"object": "domain", "name": d.name, "status": d.status}
                    for d in self.data.domains
                ],
            },
        )

    def _authenticate_mailbox(self, exchange: _Exchange, match: re.Match[str]) -> _Reply:
        request = exchange.request
        key = self._authenticate(request)
        if not key.service:
            raise _ApiError(
                403, "forbidden", "This API key may not authenticate mailboxes"
            )
        body = self._json_body(exchange)
        email_address = body.get("email")
        password = body.get("password")
        if not isinstance(email_address, str) or not email_address:
            raise _invalid("'email' is required")
        if not isinstance(password, str):
            raise _invalid("'password' is required")
        mailbox = self.data.find_mailbox(email_address)
        if mailbox is None or not secrets.compare_digest(
            mailbox.password.encode("utf-8"), password.encode("utf-8")
        ):
            raise _ApiError(401, "unauthorized", "Invalid email or password")
        if mailbox.status != "active":
            raise _ApiError(403, "forbidden", "Mailbox is suspended")
        return _Reply.json(
            200,
            {
                "mailbox": {
                    "email_address": mailbox.email_address,
                    "status": mailbox.status,
                }
            },
        )

    # -- test-only endpoints -------------------------------------------------

    def _sandbox_emails(self, exchange: _Exchange, match: re.Match[str]) -> _Reply:
        request = exchange.request
        self._require_loopback(request)
        return _Reply.json(
            200,
            {"object": "list", "data": [e.to_json() for e in self.store.emails()]},
        )

    def _sandbox_clear(self, exchange: _Exchange, match: re.Match[str]) -> _Reply:
        request = exchange.request
        self._require_loopback(request)
        return _Reply.json(200, {"deleted": self.store.clear()})

    def _sandbox_faults(self, exchange: _Exchange, match: re.Match[str]) -> _Reply:
        request = exchange.request
        self._require_loopback(request)
        return _Reply.json(
            200, {"object": "list", "data": [f.to_json() for f in self._faults]}
        )

    def _sandbox_add_fault(self, exchange: _Exchange, match: re.Match[str]) -> _Reply:
        request = exchange.request
        self._require_loopback(request)
        body = self._json_body(exchange)
        unknown = sorted(
            set(body) - {"mode", "count", "delay", "retry_after", "path", "method"}
        )
        if unknown:
            raise _invalid(f"unknown fault field {unknown[0]!r}")
        try:
            self.inject_fault(
                body.get("mode"),  # type: ignore[arg-type]
                count=body.get("count", 1),
                delay=body.get("delay", 0.0),
                retry_after=body.get("retry_after"),
                path=body.get("path", "/emails"),
                method=body.get("method", "POST"),
            )
        except ValueError as e:
            raise _invalid(str(e)) from None
        return _Reply.json(201, {"fault": self._faults[-1].to_json()})

    def _sandbox_clear_faults(self, exchange: _Exchange, match: re.Match[str]) -> _Reply:
        request = exchange.request
        self._require_loopback(request)
        return _Reply.json(200, {"deleted": self.clear_faults()})


def _new_id(prefix: str) -> str:
    return prefix + "".join(secrets.choice(_ID_ALPHABET) for _ in range(20))


def _normalise_path(path: str) -> str:
    if len(path) > 1:
        path = path.rstrip("/") or "/"
    return path


def _query(request: Request, name: str) -> str | None:
    values: list[bytes] | None = (request.args or {}).get(name.encode("ascii"))
    if not values:
        return None
    return values[0].decode("utf-8", "replace")


def _query_int(
    request: Request, name: str, default: int, low: int, high: int
) -> int:
    raw = _query(request, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise _invalid(f"'{name}' must be an integer from {low} to {high}")
    return value


def _email_created(stored: StoredEmail) -> dict[str, Any]:
    return {
        "id": stored.id,
        "object": "email",
        "from": stored.payload.get("from"),
        "to": stored.payload.get("to"),
        "created_at": stored.created_at,
        "status": "queued",
    }


def _email_detail(stored: StoredEmail) -> dict[str, Any]:
    detail = _email_created(stored)
    for field in (
        "cc",
        "bcc",
        "reply_to",
        "subject",
        "html",
        "text",
        "tags",
        "template_id",
        "scheduled_at",
    ):
        detail[field] = stored.payload.get(field)
    return detail


# ---------------------------------------------------------------------------
# Serving it


class SandboxService(Service):
    """
    Serves a L{SandboxResource} over HTTP on one TCP endpoint.

    @ivar port: The listening port once started (C{port.getHost().port} is
        the bound port number, useful with port 0), else L{None}.
    @ivar resource: The served L{SandboxResource} (inject faults on it).
    @ivar store: Its L{SandboxStore}; closed when the service stops.
    """

    def __init__(
        self,
        endpoint: TCP4ServerEndpoint | TCP6ServerEndpoint,
        resource: SandboxResource,
        store: SandboxStore,
    ) -> None:
        self._endpoint = endpoint
        self.resource = resource
        self.store = store
        self.site = Site(resource)
        self.site.displayTracebacks = False
        self.port: IListeningPort | None = None
        self._failure: Failure | None = None
        self._waiting: list[Deferred[IListeningPort]] = []

    def startService(self) -> None:
        """
        Start listening. A failed bind raises here, so startup fails loudly.
        """
        super().startService()
        self._failure = None
        listening = self._endpoint.listen(self.site)
        listening.addCallbacks(self._listened, self._listen_failed)
        if self._failure is not None:
            self._failure.raiseException()

    def _listened(self, port: IListeningPort) -> None:
        self.port = port
        address = port.getHost()
        _log.info(
            "PostStack sandbox API listening on http://{host}:{port}",
            host=getattr(address, "host", "?"),
            port=getattr(address, "port", "?"),
        )
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(port)

    def _listen_failed(self, failure: Failure) -> None:
        self._failure = failure
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(failure)

    def when_listening(self) -> Deferred[IListeningPort]:
        """
        Return a L{Deferred} that fires with the listening port.
        """
        if self.port is not None:
            return succeed(self.port)
        d: Deferred[IListeningPort] = Deferred()
        if self._failure is not None:
            d.errback(self._failure)
        else:
            self._waiting.append(d)
        return d

    def stopService(self) -> Deferred[None]:
        """
        Stop listening, drop pending sandbox answers, close the store.
        """
        super().stopService()
        self.resource.abort_pending()
        port, self.port = self.port, None
        stopping = port.stopListening() if port is not None else None
        stopped: Deferred[None] = (
            stopping if isinstance(stopping, Deferred) else succeed(None)
        )

        def close(result: object) -> None:
            self.store.close()

        return stopped.addBoth(close)


def makeSandboxService(
    port: int | str,
    interface: str,
    db: str,
    data: str | SandboxData,
    reactor: IReactorTCP,
) -> SandboxService:
    """
    Build the sandbox API service: HTTP on C{interface:port}, emails in the
    SQLite file C{db}, keys and domains from C{data}.

    @param port: TCP port; 0 picks a free one (read C{service.port} after
        C{startService}, or use C{service.when_listening()}).
    @param data: Path of the data file, or an already parsed L{SandboxData}.
    @param reactor: Must provide C{IReactorTCP} and C{IReactorTime}.
    @raise ValueError: If C{port} is not a port number or C{data} is invalid.
    """
    port_number = int(port)
    if not 0 <= port_number <= 65535:
        raise ValueError(f"port must be 0-65535, not {port!r}")
    sandbox_data = load_sandbox_data(data) if isinstance(data, str) else data
    store = SandboxStore(db)
    resource = SandboxResource(store, sandbox_data, clock=reactor)
    endpoint: TCP4ServerEndpoint | TCP6ServerEndpoint
    if ":" in interface:
        endpoint = TCP6ServerEndpoint(reactor, port_number, interface=interface)
    else:
        endpoint = TCP4ServerEndpoint(reactor, port_number, interface=interface)
    return SandboxService(endpoint, resource, store)
