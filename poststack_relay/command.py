# -*- test-case-name: tests.test_command -*-
"""
The C{poststack-relay} console command: C{twistd -n --pidfile= poststack-relay}
under a name of its own.

It takes exactly the options of C{twistd poststack-relay}
(L{poststack_relay.tap.Options}, with their C{POSTSTACK_RELAY_*} variables
and C{--config} file) and runs the relay the way C{twistd -n} does: in the
foreground, no pidfile, logging to standard output.  Everything else is
C{tap.makeService}'s, as under twistd: SIGTERM drains and exits 0, SIGHUP
reloads the TLS certificate, C{--workers N} supervises N relay processes,
C{--log-format json}.

How: twistd's own runner (L{twisted.scripts.twistd.runApp}) with twistd's
options fixed to C{--nodaemon --pidfile=} and one subcommand, the relay's
plugin object, instead of every plugin found on the path.  So the command
does not scan for plugins (nor tries to write Twisted's plugin cache, which
a read-only root file system or a venv owned by root refuses), and its
C{--help} says C{Usage: poststack-relay [options]}.
"""

from __future__ import annotations

import sys
from typing import Any, Iterator, Optional, Sequence

from twisted.python import usage
from twisted.scripts import twistd

COMMAND = "poststack-relay"
# What twistd -n --pidfile= does: the foreground, standard output, no pidfile.
TWISTD_OPTIONS = ("--nodaemon", "--pidfile=")


# twistd.ServerOptions is this platform's (twistd.runApp's) options class;
# the module imports it without listing it in __all__.
class CommandOptions(twistd.ServerOptions):  # type: ignore[name-defined,misc]  # see above; Any to mypy
    """
    twistd's options with the relay as its only subcommand: the relay's
    options follow it (L{twistd_arguments}).
    """

    # The subcommand's usage line is this, the subcommand's name, and its
    # own synopsis ("[options]"): "Usage: poststack-relay [options]".
    synopsis = "Usage:"

    @property
    def subCommands(self) -> Iterator[tuple[str, None, Any, str]]:
        """
        The relay's plugin only; twistd's runner finds it again in
        C{loadedPlugins} by its name to call its C{makeService}.
        """
        from twisted.plugins.poststack_relay_plugin import poststackRelay

        self.loadedPlugins = {poststackRelay.tapname: poststackRelay}
        yield (poststackRelay.tapname, None, poststackRelay.options, poststackRelay.description)


def twistd_arguments(args: Sequence[str]) -> list[str]:
    """
    twistd's arguments for the command's C{args}: the foreground options,
    the subcommand, then C{args} (all of them the relay's).
    """
    return [*TWISTD_OPTIONS, COMMAND, *args]


def parse(args: Sequence[str]) -> CommandOptions:
    """
    The command line C{args} parsed as twistd would parse
    C{twistd -n --pidfile= poststack-relay ARGS}.

    @raise SystemExit: C{--help}, C{--version}, C{--check-config}, or a
        bad option or setting (one line, status 1).
    """
    options = CommandOptions()
    try:
        options.parseOptions(twistd_arguments(args))
    except usage.UsageError as e:
        # One line, as the relay's own setting errors (tap.Options).
        raise SystemExit(f"{COMMAND}: error: {e} ({COMMAND} --help lists the options)")
    return options


def main(argv: Optional[Sequence[str]] = None) -> None:
    """
    The console entry point: run the relay with the options C{argv}
    (default: this process's command line) until it stops.  Exit status:
    0 after SIGTERM, 1 for bad settings or workers that could not start.
    """
    args = sys.argv[1:] if argv is None else argv
    twistd.runApp(parse(args))  # type: ignore[no-untyped-call]  # twistd: unannotated
