# -*- test-case-name: tests.test_sandbox -*-
"""
twistd glue for the sandbox API: C{twistd -n poststack-sandbox [options]}.

Each option can also come from the environment (C{POSTSTACK_SANDBOX_PORT},
C{POSTSTACK_SANDBOX_INTERFACE}, C{POSTSTACK_SANDBOX_DB},
C{POSTSTACK_SANDBOX_DATA}); a command-line flag wins over the environment.
"""

from __future__ import annotations

import os
from typing import Mapping

from twisted.python import usage

from .data import load_sandbox_data
from .service import SandboxService, makeSandboxService

DEFAULTS = {
    "port": "8025",
    "interface": "127.0.0.1",
    "db": "sandbox.sqlite3",
    "data": os.path.join("etc", "sandbox.json"),
}
"""Default value of each option (paths relative to the working directory)."""

ENVIRONMENT = {
    "port": "POSTSTACK_SANDBOX_PORT",
    "interface": "POSTSTACK_SANDBOX_INTERFACE",
    "db": "POSTSTACK_SANDBOX_DB",
    "data": "POSTSTACK_SANDBOX_DATA",
}
"""The environment variable read for each option."""


class Options(usage.Options):
    """
    Options of the C{poststack-sandbox} twistd plugin.

    After parsing, C{self["port"]} is an L{int}, C{self["sandbox_data"]} the
    parsed L{poststack_relay.sandbox.data.SandboxData}.
    """

    synopsis = "[--port N] [--interface ADDR] [--db FILE] [--data FILE]"
    longdesc = (
        "Run a local stand-in for the PostStack HTTP API (POST /emails,"
        " GET /emails, POST /mailboxes/authenticate, fault injection under"
        " /_sandbox/). Nothing is ever sent: accepted emails are stored in a"
        " SQLite file. Example: twistd -n poststack-sandbox --port 8025"
        " --db sandbox.sqlite3 --data etc/sandbox.json"
    )
    optParameters = [
        [
            "port",
            "p",
            None,
            "TCP port to listen on, 0 for any free one"
            f" [env {ENVIRONMENT['port']}, default {DEFAULTS['port']}]",
        ],
        [
            "interface",
            "i",
            None,
            "Address to listen on"
            f" [env {ENVIRONMENT['interface']}, default {DEFAULTS['interface']}]",
        ],
        [
            "db",
            None,
            None,
            "SQLite file for stored emails, created if missing"
            f" [env {ENVIRONMENT['db']}, default {DEFAULTS['db']}]",
        ],
        [
            "data",
            None,
            None,
            "JSON file with keys, domains, mailboxes, templates"
            f" [env {ENVIRONMENT['data']}, default {DEFAULTS['data']}]",
        ],
    ]

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        """
        @param environ: Where the C{POSTSTACK_SANDBOX_*} variables are read;
            L{os.environ} if L{None}.
        """
        super().__init__()  # type: ignore[no-untyped-call]  # Twisted's usage.Options is unannotated
        self._environ = os.environ if environ is None else environ

    def _value(self, name: str) -> str:
        given = self[name]
        if given is not None:
            return str(given)
        from_env = self._environ.get(ENVIRONMENT[name])
        if from_env:
            return from_env
        return DEFAULTS[name]

    def postOptions(self) -> None:
        """
        Fill each option from flag, environment or default, and validate.

        @raise usage.UsageError: With a one-line message on a bad port, a
            missing database directory or a missing/invalid data file.
        """
        port = self._value("port")
        try:
            port_number = int(port)
        except ValueError:
            port_number = -1
        if not 0 <= port_number <= 65535:
            raise usage.UsageError(f"--port must be a number 0-65535, not {port!r}")
        self["port"] = port_number

        interface = self._value("interface").strip()
        if not interface:
            raise usage.UsageError("--interface must not be empty")
        self["interface"] = interface

        db = self._value("db")
        directory = os.path.dirname(os.path.abspath(db))
        if not os.path.isdir(directory):
            raise usage.UsageError(
                f"--db {db!r}: directory {directory!r} does not exist"
            )
        self["db"] = db

        data = self._value("data")
        try:
            self["sandbox_data"] = load_sandbox_data(data)
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        self["data"] = data


def makeService(options: Options) -> SandboxService:
    """
    Build the sandbox service from parsed L{Options} (twistd calls this).
    """
    from twisted.internet import reactor

    return makeSandboxService(
        options["port"],
        options["interface"],
        options["db"],
        options["sandbox_data"],
        reactor,
    )
