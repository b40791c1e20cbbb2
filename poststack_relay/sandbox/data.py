# -*- test-case-name: tests.test_sandbox -*-
"""
The sandbox's data file (C{etc/sandbox.json}): the API keys, domains,
mailboxes and templates the sandbox knows, and the limits it applies.

L{load_sandbox_data} reads and validates the file into a frozen
L{SandboxData}; a bad file gives one L{ValueError} line naming the file and
the place of the problem (format: C{docs/sandbox.md}).
"""

from __future__ import annotations

import json
import os
import secrets
from typing import Any, Iterable, NoReturn

import attrs

from .validation import a_label_domain, parse_address

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
        # An internationalized domain may be written as U-labels; requests
        # name it by its A-labels (the relay's contract).
        name = a_label_domain(f.string("name")) or f.fail(
            "not a valid domain name (IDNA 2008)", "name"
        )
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
            scope = [a_label_domain(d) or d.lower() for d in scope]
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
        parsed = parse_address(address)
        if parsed is None or parsed != address:
            f.fail("must be a bare email address", "email_address")
        if a_label_domain(address.rpartition("@")[2]) not in known_domains:
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
