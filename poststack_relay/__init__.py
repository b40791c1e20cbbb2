# -*- test-case-name: tests.test_exports -*-
"""
poststack-relay: an implicit-TLS SMTP submission gateway to the PostStack
email API.

The public surface is small: L{RelayConfig}, L{load_config} (the settings
from the C{POSTSTACK_RELAY_*} environment and config file, as the command
reads them) and L{makeRelayService} for embedding, the C{poststack-relay} command (L{poststack_relay.command}) and
the twistd plugin of the same name for running, and the
C{implicittls:} server endpoint description (L{poststack_relay.endpoints})
for listening with implicit TLS anywhere C{serverFromString} is used.
C{tests/test_exports.py} pins these names; every other module may move.
"""

from ._version import __version__
from .config import ConfigError, RelayConfig
from .service import makeRelayService
from .tap import load_config

__all__ = ["__version__", "ConfigError", "RelayConfig", "load_config", "makeRelayService"]
