"""
The public names: what C{poststack_relay} exports (its C{__all__}), what
C{poststack_relay.testing} offers embedders' tests, the interfaces, and the
C{__all__} of each sub-package (C{smtp}, C{api}, C{translate} with the rule
modules, C{sandbox}, C{workers}). Everything else may move; these names
may not without this test changing (klein's C{test_exports} idea).
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

import poststack_relay.smtp as smtp
from poststack_relay import addresses
from poststack_relay.smtp import data, envelope, factory, protocol


class PublicNamesTests(SynchronousTestCase):
    def test_package(self) -> None:
        """poststack_relay exports exactly the embedding API, the same objects as their home modules."""
        import poststack_relay
        from poststack_relay import _version, config, service

        self.assertEqual(
            sorted(poststack_relay.__all__),
            ["ConfigError", "RelayConfig", "__version__", "load_config", "makeRelayService"],
        )
        from poststack_relay import tap

        self.assertIs(poststack_relay.load_config, tap.load_config)
        self.assertIs(poststack_relay.RelayConfig, config.RelayConfig)
        self.assertIs(poststack_relay.ConfigError, config.ConfigError)
        self.assertIs(poststack_relay.makeRelayService, service.makeRelayService)
        self.assertEqual(poststack_relay.__version__, _version.__version__)
        for name in poststack_relay.__all__:
            self.assertTrue(hasattr(poststack_relay, name), name)

    def test_testing(self) -> None:
        """poststack_relay.testing exports exactly the in-memory API and the test certificates."""
        from poststack_relay import testing
        from poststack_relay.interfaces import IEmailAPI

        self.assertEqual(
            sorted(testing.__all__),
            ["MemoryEmailAPI", "PrivateKey", "make_certificate", "write_certificate"],
        )
        for name in ("MemoryEmailAPI", "make_certificate", "write_certificate"):
            self.assertTrue(callable(getattr(testing, name, None)), name)
        self.assertTrue(IEmailAPI.implementedBy(testing.MemoryEmailAPI))

    def test_interfaces(self) -> None:
        """The seams are zope interfaces in poststack_relay.interfaces."""
        from zope.interface.interface import InterfaceClass

        from poststack_relay import interfaces

        for name in ("IEmailAPI", "IRelayDelivery", "IRelayReactor"):
            self.assertIsInstance(getattr(interfaces, name), InterfaceClass, name)


class CommandNamesTests(SynchronousTestCase):
    """The console command's entry point: installed scripts name it, so it may not move."""

    def test_entry_point(self) -> None:
        """setup.cfg's poststack-relay script is poststack_relay.command:main, a function."""
        import configparser
        import os

        from poststack_relay import command

        parser = configparser.ConfigParser()
        parser.read(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.cfg"))
        scripts = parser["options.entry_points"]["console_scripts"].strip().splitlines()
        self.assertEqual(scripts, ["poststack-relay = poststack_relay.command:main"])
        self.assertTrue(callable(command.main))


class TranslateNamesTests(SynchronousTestCase):
    """The names of translation and the rule modules that other modules and embedders import."""

    def test_translate_package(self) -> None:
        """poststack_relay.translate exports the function, its values, its error and its limits."""
        import poststack_relay.translate as package

        self.assertEqual(
            sorted(package.__all__),
            sorted(
                [
                    "MAX_FILENAME_LENGTH", "MAX_HEADER_BYTES", "MAX_HEADER_FIELDS", "MAX_ID_LENGTH",
                    "MAX_MIME_DEPTH", "MAX_MIME_PARTS", "MAX_PASSED_HEADERS", "MAX_PASSED_HEADER_OCTETS",
                    "MAX_TAGS", "MAX_TAG_LENGTH", "MAX_VARIABLES_DEPTH",
                    "EmailRequest", "Envelope", "MimeScan", "TranslationError", "translate",
                ]
            ),
        )
        for name in package.__all__:
            self.assertTrue(hasattr(package, name), name)

    def test_rule_modules(self) -> None:
        """The one address validator, the one sender policy and the one idempotency decision."""
        from poststack_relay import addresses, idempotency, policy

        self.assertEqual(
            sorted(policy.__all__), ["envelope_sender_reply", "from_header_reply", "owns", "sender_header_reply"]
        )
        self.assertEqual(
            sorted(idempotency.__all__),
            ["IDEMPOTENCY_CLIENT", "IDEMPOTENCY_DERIVED", "IDEMPOTENCY_RANDOM", "derived_idempotency_key",
             "keyed", "random_idempotency_key"],
        )
        self.assertEqual(
            sorted(addresses.__all__),
            ["BAD_DOMAIN", "MAX_ADDRESS", "MAX_DOMAIN", "MAX_LOCAL_PART", "MAX_PATH", "address_domain", "address_key",
             "api_address", "api_domain", "bare_address", "has_domain",
             "has_dotted_domain", "header_address_problem", "is_header_address", "path_problem"],
        )
        for module in (addresses, idempotency, policy):
            for name in module.__all__:
                self.assertTrue(hasattr(module, name), name)


SMTP_PUBLIC = {
    "CLOSE_LINGER": protocol,
    "DATA_HOLD_LIMIT": data,
    "DataScanner": data,
    "DRAIN_FAREWELL": factory,
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


class SMTPNamesTests(SynchronousTestCase):
    """
    The public names of L{poststack_relay.smtp}: what other modules, tests
    and embedders import from the package stays there, whichever module of
    the package it lives in.
    """

    def test_public_names(self) -> None:
        """C{__all__} is exactly the pinned names, each the object of the module that defines it."""
        self.assertEqual(sorted(smtp.__all__), sorted(SMTP_PUBLIC))
        for name, module in SMTP_PUBLIC.items():
            self.assertIs(getattr(smtp, name), getattr(module, name), name)

    def test_limits(self) -> None:
        """The documented limits keep their values (docs/design.md)."""
        self.assertEqual(
            (smtp.MAX_COMMAND_LINE, smtp.MAX_AUTH_LINE, smtp.MAX_PENDING_INPUT, smtp.DATA_HOLD_LIMIT),
            (2048, 12288, 1024 * 1024, 65536),
        )
        self.assertEqual((smtp.CLOSE_LINGER, smtp.REFUSAL_LINGER, smtp.DRAIN_FAREWELL), (5.0, 10.0, 2.0))

    def test_factory_builds_relay_sessions(self) -> None:
        """RelayFactory is still a Twisted SMTPFactory whose protocol is RelaySMTP."""
        from twisted.mail.smtp import SMTPFactory

        self.assertTrue(issubclass(smtp.RelayFactory, SMTPFactory))
        self.assertIs(smtp.RelayFactory.protocol, smtp.RelaySMTP)


class APINamesTests(SynchronousTestCase):
    """
    The names C{poststack_relay.api} exports: the client, its errors and
    parts other modules and embedders use; the modules inside may move.
    """

    def test_names(self) -> None:
        """The package exports exactly these names, the same objects as their homes."""
        from poststack_relay import api, interfaces
        from poststack_relay.api import body, breaker, client, errors, retry, slots, transport

        self.assertEqual(
            sorted(api.__all__),
            sorted(
                [
                    "APIEndpoints", "APIError", "APIUnavailable", "Answer", "BodyProducer",
                    "CircuitBreaker", "DEFAULT_BACKOFF_BASE", "DEFAULT_BACKOFF_CAP",
                    "DEFAULT_MAX_ATTEMPTS", "HTTPEmailAPI", "IEmailAPI", "MAX_ANSWER", "MailboxSuspended",
                    "NETWORK_ERRORS", "PreparedURL", "RequestSlots", "RetryPolicy",
                    "STREAM_MIN_CONTENT", "USER_AGENT", "body_bytes", "json_body",
                    "make_http_client", "parse_retry_after",
                ]
            ),
        )
        for name in api.__all__:
            self.assertTrue(hasattr(api, name), name)
        self.assertIs(api.IEmailAPI, interfaces.IEmailAPI)
        self.assertIs(api.HTTPEmailAPI, client.HTTPEmailAPI)
        self.assertIs(api.APIError, errors.APIError)
        self.assertIs(api.CircuitBreaker, breaker.CircuitBreaker)
        self.assertIs(api.RequestSlots, slots.RequestSlots)
        self.assertIs(api.parse_retry_after, retry.parse_retry_after)
        self.assertIs(api.json_body, body.json_body)
        self.assertIs(api.make_http_client, transport.make_http_client)


class SandboxNamesTests(SynchronousTestCase):
    """
    The names C{poststack_relay.sandbox} exports are its API; the modules
    behind them may move.
    """

    def test_all(self) -> None:
        """The package exports exactly these names, each importable."""
        import poststack_relay.sandbox as sandbox

        self.assertEqual(
            sorted(sandbox.__all__),
            [
                "FAULT_MODES",
                "IN_TREE_DATA_PATH",
                "SandboxData",
                "SandboxResource",
                "SandboxService",
                "SandboxStore",
                "StoredEmail",
                "load_sandbox_data",
                "makeSandboxService",
            ],
        )
        for name in sandbox.__all__:
            self.assertIsNotNone(getattr(sandbox, name))


class WorkersNamesTests(SynchronousTestCase):
    """The names of L{poststack_relay.workers} that C{tap} and embedders import."""

    def test_names(self) -> None:
        """The package exports exactly the supervisor, its exit helper and the version-skew status."""
        from poststack_relay import workers
        from poststack_relay.workers import messages, supervisor

        self.assertEqual(sorted(workers.__all__), ["Supervisor", "VERSION_CHANGED_EXIT", "exit_with"])
        self.assertIs(workers.Supervisor, supervisor.Supervisor)
        self.assertIs(workers.exit_with, supervisor.exit_with)
        self.assertEqual(workers.VERSION_CHANGED_EXIT, messages.VERSION_CHANGED_EXIT)
