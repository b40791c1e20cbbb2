"""
A minimal, fast stand-in for POST /emails (and the key check), for
measurements: answers 202 with a JSON id, stores nothing.

    python bench/stub_api.py PORT
"""

import itertools
import sys

from twisted.internet import reactor
from twisted.web import resource, server

_ids = itertools.count(1)


class Emails(resource.Resource):
    isLeaf = True

    def render_GET(self, request):  # the relay's key check
        request.setHeader(b"content-type", b"application/json")
        return b'{"object":"list","data":[]}'

    def render_POST(self, request):
        request.content.read()
        request.setResponseCode(202)
        request.setHeader(b"content-type", b"application/json")
        return b'{"id":"em_%020d"}' % next(_ids)


root = resource.Resource()
root.putChild(b"emails", Emails())
site = server.Site(root)
site.noisy = False
site.log = lambda request: None
reactor.listenTCP(int(sys.argv[1]), site, interface="127.0.0.1")
reactor.run()
