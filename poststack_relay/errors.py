# -*- test-case-name: tests.test_config_file -*-
"""
The one error a configuration value raises when it cannot be used.
"""

from __future__ import annotations


class ConfigError(Exception):
    """
    A configuration value cannot be used; the message is one line for the
    operator.
    """
