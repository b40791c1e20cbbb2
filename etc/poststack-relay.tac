# Embedding poststack-relay in your own Twisted application.
#
#   POSTSTACK_RELAY_TLS_CERT=fullchain.pem POSTSTACK_RELAY_TLS_KEY=privkey.pem \
#       twistd -n --pidfile= -y etc/poststack-relay.tac
#
# load_config() reads the settings exactly as the poststack-relay command
# does without options: every POSTSTACK_RELAY_* variable, the TOML file
# POSTSTACK_RELAY_CONFIG names, the defaults (docs/configuration.md).
# makeRelayService() takes that RelayConfig (attrs; attrs.evolve it to change
# a setting in code) and returns an IService: add it to any service hierarchy
# next to your own services.  The log goes to standard output in
# POSTSTACK_RELAY_LOG_FORMAT (text or json): run it with twistd -n.
from twisted.application.service import Application
from twisted.internet import reactor

from poststack_relay import ConfigError, load_config, makeRelayService
from poststack_relay.listening import report_listen_failures
from poststack_relay.tap import with_log_format

try:
    config = load_config()
except ConfigError as e:
    raise SystemExit(f"poststack-relay: error: {e}")  # one line, not twistd's traceback

application = Application("poststack-relay")
relay = makeRelayService(config, reactor)
with_log_format(relay, config).setServiceParent(application)
report_listen_failures()  # a port in use: one line and exit status 1, as the command
