# -*- test-case-name: tests.test_smtp_exports -*-
"""
The public names of L{poststack_relay.smtp}, pinned: what other modules,
tests and embedders import from the package stays there, whichever
module of the package it lives in.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

import poststack_relay.smtp as smtp
from poststack_relay import addresses
from poststack_relay.smtp import data, envelope, factory, protocol

PUBLIC = {
    "CLOSE_LINGER": protocol,
    "DATA_HOLD_LIMIT": data,
    "DataScanner": data,
    "MAX_AUTH_LINE": protocol,
    "MAX_COMMAND_LINE": protocol,
    "MAX_PENDING_INPUT": protocol,
    "REFUSAL_LINGER": factory,
    "RefusalProtocol": factory,
    "RelayFactory": factory,
    "RelaySMTP": protocol,
    "Session": smtp.session,
    "parse_path": envelope,
    "path_problem": addresses,
}


class ExportTests(SynchronousTestCase):
    def test_public_names(self) -> None:
        """C{__all__} is exactly the pinned names, each the object of the module that defines it."""
        self.assertEqual(sorted(smtp.__all__), sorted(PUBLIC))
        for name, module in PUBLIC.items():
            self.assertIs(getattr(smtp, name), getattr(module, name), name)

    def test_limits(self) -> None:
        """The documented limits keep their values (docs/design.md)."""
        self.assertEqual(
            (smtp.MAX_COMMAND_LINE, smtp.MAX_AUTH_LINE, smtp.MAX_PENDING_INPUT, smtp.DATA_HOLD_LIMIT),
            (2048, 12288, 1024 * 1024, 65536),
        )
        self.assertEqual((smtp.CLOSE_LINGER, smtp.REFUSAL_LINGER), (5.0, 10.0))

    def test_factory_builds_relay_sessions(self) -> None:
        """RelayFactory is still a Twisted SMTPFactory whose protocol is RelaySMTP."""
        from twisted.mail.smtp import SMTPFactory

        self.assertTrue(issubclass(smtp.RelayFactory, SMTPFactory))
        self.assertIs(smtp.RelayFactory.protocol, smtp.RelaySMTP)
