# -*- test-case-name: tests.test_sandbox -*-
"""
The PostStack sandbox: a local stand-in for the PostStack HTTP API.

It answers the calls the relay makes (C{POST /emails}, C{GET /emails},
C{POST /mailboxes/authenticate}) with PostStack's semantics, keeps what it
receives in a SQLite file, and can inject faults for tests. It never sends
anything anywhere. Run it with C{twistd -n poststack-sandbox}; see
C{docs/sandbox.md}.

The names below are its API; its modules, one job each:

  - L{data<poststack_relay.sandbox.data>}: the data file (keys, domains,
    mailboxes, templates, limits);
  - L{validation<poststack_relay.sandbox.validation>}: the request rules
    (C{POST /emails} fields, JSON bodies, query numbers, fingerprints);
  - L{auth<poststack_relay.sandbox.auth>}: API keys, the service key,
    mailbox logins, loopback-only endpoints;
  - L{faults<poststack_relay.sandbox.faults>}: fault modes, their queue and
    answers, held and delayed requests;
  - L{endpoints<poststack_relay.sandbox.endpoints>}: what each endpoint does;
  - L{exchange<poststack_relay.sandbox.exchange>}: one request read, one
    answer written;
  - L{router<poststack_relay.sandbox.router>}: L{SandboxResource}, routing
    thin over the above;
  - L{store<poststack_relay.sandbox.store>}: the SQLite file of emails;
  - L{service<poststack_relay.sandbox.service>} and
    L{tap<poststack_relay.sandbox.tap>}: serving it, and its twistd plugin.
"""

from .data import IN_TREE_DATA_PATH, SandboxData, load_sandbox_data
from .faults import FAULT_MODES
from .router import SandboxResource
from .service import SandboxService, makeSandboxService
from .store import SandboxStore, StoredEmail

__all__ = [
    "FAULT_MODES",
    "IN_TREE_DATA_PATH",
    "SandboxData",
    "SandboxResource",
    "SandboxService",
    "SandboxStore",
    "StoredEmail",
    "load_sandbox_data",
    "makeSandboxService",
]
