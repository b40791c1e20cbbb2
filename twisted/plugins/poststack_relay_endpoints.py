# -*- test-case-name: tests.test_endpoints -*-
"""
The C{implicittls:} server endpoint description for C{serverFromString}:
implicit TLS with plaintext-client detection over any other endpoint, for
example C{implicittls:tcp\\:465:certificate=fullchain.pem:key=privkey.pem}.

A lazy pointer, nothing more: the relay's modules are imported only when a
description with this prefix is parsed (L{poststack_relay.endpoints}).
"""

from twisted.internet.interfaces import IStreamServerEndpointStringParser
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IPlugin, IStreamServerEndpointStringParser)
class _ImplicitTLSParser:
    prefix = "implicittls"

    def parseStreamServer(self, reactor, *args, **kwargs):  # type: ignore[no-untyped-def]  # Twisted's own signature
        from poststack_relay.endpoints import parse_implicit_tls

        return parse_implicit_tls(reactor, *args, **kwargs)


implicitTLSEndpoint = _ImplicitTLSParser()
