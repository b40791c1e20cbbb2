"""
The public names: what C{poststack_relay} exports (its C{__all__}), what
C{poststack_relay.testing} offers embedders' tests, the interfaces, and the
C{__all__} of each sub-package (C{smtp}, C{api}, C{translate} with the rule
modules, C{sandbox}, C{workers}). Everything else may move; these names
may not without this test changing (klein's C{test_exports} idea).
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase


class PublicNamesTests(SynchronousTestCase):
    def test_package(self) -> None:
        """poststack_relay exports exactly the embedding API, the same objects as their home modules."""
        import poststack_relay
        from poststack_relay import _version, config, service

        self.assertEqual(
            sorted(poststack_relay.__all__),
            ["ConfigError", "RelayConfig", "__version__", "makeRelayService"],
        )
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
                    "EmailRequest", "Envelope", "TranslationError", "translate",
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
            ["MAX_ADDRESS", "MAX_DOMAIN", "MAX_LOCAL_PART", "MAX_PATH", "bare_address", "has_domain",
             "has_dotted_domain", "header_address_problem", "is_header_address", "path_problem"],
        )
        for module in (addresses, idempotency, policy):
            for name in module.__all__:
                self.assertTrue(hasattr(module, name), name)
