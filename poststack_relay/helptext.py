# -*- test-case-name: tests.test_command,tests.test_tap -*-
"""
The texts of the command line around the options: the end of C{--help}
wrapped on whole words, and the nearest option to a mistyped one.
L{poststack_relay.tap.Options} uses both.
"""

from __future__ import annotations

import difflib
import re
import textwrap
from typing import Sequence

# U+2011 NON-BREAKING HYPHEN: textwrap breaks lines after "-" but not after
# this; Options.getUsage puts it in for "-" while wrapping, then takes it out.
NO_BREAK_HYPHEN = "\u2011"


def describe(text: str, width: int) -> str:
    """
    C{text} for the end of C{--help}: its paragraphs (separated by blank
    lines) wrapped to C{width} on whole words, never at a hyphen; a
    paragraph whose lines are indented (an example command) as written.
    """
    paragraphs = []
    for paragraph in text.strip("\n").split("\n\n"):
        if paragraph.startswith(" "):
            paragraphs.append(paragraph)
        else:
            paragraphs.append(textwrap.fill(
                " ".join(paragraph.split()), width, break_on_hyphens=False, break_long_words=False
            ))
    return "\n" + "\n\n".join(paragraphs) + "\n"


def nearest_option(error: str, names: Sequence[str]) -> str:
    """
    C{"; did you mean --NAME?"} for the usage error C{error} about an
    option that does not exist (C{option --metrics-listn not recognized})
    when one of C{names} (without C{--}) is near it; else C{""}.
    """
    m = re.match(r"option --?([^ ]+) not recognized", error)
    if m is None:
        return ""
    near = difflib.get_close_matches(m.group(1), names, n=1, cutoff=0.6)
    return f"; did you mean --{near[0]}?" if near else ""
