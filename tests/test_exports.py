"""
The public names: what C{poststack_relay} exports (its C{__all__}), what
C{poststack_relay.testing} offers embedders' tests, and the interfaces.
Everything else may move; these names may not without this test changing
(klein's C{test_exports} idea).
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
