# -*- test-case-name: tests.test_sandbox -*-
"""
twistd plugin for the PostStack sandbox API: C{twistd -n poststack-sandbox}.

A lazy pointer only: the real code lives in L{poststack_relay.sandbox.tap}.
"""

from twisted.application.service import ServiceMaker

poststackSandbox = ServiceMaker(
    "PostStack sandbox API",
    "poststack_relay.sandbox.tap",
    "Local stand-in for the PostStack HTTP API, for tests and development",
    "poststack-sandbox",
)
