# -*- test-case-name: tests.test_sandbox -*-
"""
The names that lived here before the sandbox was split into modules of one
job each, kept for the importers that still use this path; new code
imports from L{poststack_relay.sandbox}.
"""

from .data import IN_TREE_DATA_PATH, SandboxData, load_sandbox_data
from .faults import FAULT_MODES
from .router import SandboxResource
from .service import SandboxService, makeSandboxService

__all__ = [
    "FAULT_MODES",
    "IN_TREE_DATA_PATH",
    "SandboxData",
    "SandboxResource",
    "SandboxService",
    "load_sandbox_data",
    "makeSandboxService",
]
