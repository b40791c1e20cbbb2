# Embedding poststack-relay in your own Twisted application.
#
#   POSTSTACK_RELAY_TLS_CERT=fullchain.pem POSTSTACK_RELAY_TLS_KEY=privkey.pem \
#       twistd -n -y etc/poststack-relay.tac
#
# makeRelayService() takes a RelayConfig (attrs) and returns an IService;
# add it to any service hierarchy next to your own services.
import os

import attrs

from twisted.application.service import Application
from twisted.internet import reactor

from poststack_relay import RelayConfig, makeRelayService

config = RelayConfig(
    tls_cert=os.environ["POSTSTACK_RELAY_TLS_CERT"],
    tls_key=os.environ.get("POSTSTACK_RELAY_TLS_KEY"),
    port=int(os.environ.get("POSTSTACK_RELAY_PORT", "587")),
    interface=os.environ.get("POSTSTACK_RELAY_INTERFACE", ""),
    api_url=os.environ.get("POSTSTACK_RELAY_API_URL", "https://api.poststack.dev"),
    service_key=os.environ.get("POSTSTACK_RELAY_SERVICE_KEY"),
)
if os.environ.get("POSTSTACK_RELAY_HOSTNAME"):
    config = attrs.evolve(config, hostname=os.environ["POSTSTACK_RELAY_HOSTNAME"])

application = Application("poststack-relay")
makeRelayService(config, reactor).setServiceParent(application)
