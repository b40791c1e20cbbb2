# -*- test-case-name: tests.test_endpoints -*-
"""
The C{implicittls:} server endpoint description for C{serverFromString}:
implicit TLS with plaintext-client detection over any other endpoint, for
example C{implicittls:tcp\\:465:certificate=fullchain.pem:key=privkey.pem}.

A lazy pointer, nothing more: the relay's modules are imported only when a
description with this prefix is parsed (L{poststack_relay.endpoints}).
"""

from twisted.internet.interfaces import (
    IReactorCore,
    IStreamServerEndpoint,
    IStreamServerEndpointStringParser,
)
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IPlugin, IStreamServerEndpointStringParser)
class _ImplicitTLSParser:
    prefix = "implicittls"

    def parseStreamServer(
        self, reactor: IReactorCore, *args: object, **kwargs: object
    ) -> IStreamServerEndpoint:
        from poststack_relay.endpoints import parse_implicit_tls

        # serverFromString passes strings.
        return parse_implicit_tls(
            reactor, *(str(a) for a in args), **{k: str(v) for k, v in kwargs.items()}
        )


implicitTLSEndpoint = _ImplicitTLSParser()
