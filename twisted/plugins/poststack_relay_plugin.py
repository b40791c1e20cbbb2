"""
The twistd plugin for C{twistd poststack-relay}: a lazy pointer to
L{poststack_relay.tap}, nothing more.
"""

from twisted.application.service import ServiceMaker

poststackRelay = ServiceMaker(
    "PostStack SMTP relay",
    "poststack_relay.tap",
    "Implicit-TLS SMTP submission relay to the PostStack email API",
    "poststack-relay",
)
