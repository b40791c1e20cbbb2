# -*- test-case-name: tests.test_sandbox -*-
"""
The PostStack sandbox: a local stand-in for the PostStack HTTP API.

It answers the calls the relay makes (C{POST /emails}, C{GET /emails},
C{POST /mailboxes/authenticate}) with PostStack's semantics, keeps what it
receives in a SQLite file, and can inject faults for tests. It never sends
anything anywhere. Run it with C{twistd -n poststack-sandbox}; see
C{docs/sandbox.md}.
"""

from .resource import (
    FAULT_MODES,
    IN_TREE_DATA_PATH,
    SandboxData,
    SandboxResource,
    SandboxService,
    load_sandbox_data,
    makeSandboxService,
)
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
