"""
The SMTP test helpers under their former name: C{tests.test_metrics}
imports C{KEY}, C{MESSAGE}, C{Harness} and C{plain} from here.  The SMTP
tests themselves live in the C{test_smtp_*} modules, their helpers in
L{tests.smtp_harness}.
"""

from tests.smtp_harness import KEY, MESSAGE, Harness, plain

__all__ = ["KEY", "MESSAGE", "Harness", "plain"]
