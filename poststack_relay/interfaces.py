# -*- test-case-name: tests.test_exports -*-
"""
The seams of the relay, as zope interfaces, in a module that imports no
other module of the relay at run time (so nothing that implements or uses
an interface has to import its peer: no import cycles).

L{IEmailAPI} is what the relay needs from PostStack (implemented by
L{poststack_relay.api.HTTPEmailAPI} over HTTP and by
L{poststack_relay.testing.MemoryEmailAPI} in memory);
L{IRelayDelivery} is the avatar an authenticated SMTP session gets from
the cred realm; L{IRelayReactor} names what the relay needs of a reactor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IReactorCore,
    IReactorFromThreads,
    IReactorPluggableNameResolver,
    IReactorSocket,
    IReactorTCP,
    IReactorTime,
)
from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from .replies import Reply
    from .translate import EmailRequest, Envelope, MimeScan


class IEmailAPI(Interface):
    """
    What the relay needs from PostStack.
    """

    def check_api_key(api_key: str) -> "Deferred[bool]":
        """
        Is this API key valid?  Fires C{True}/C{False}; fails with
        L{APIUnavailable} when the API cannot tell.
        """

    def authenticate_mailbox(email: str, password: str) -> "Deferred[Optional[str]]":
        """
        Check a mailbox login with the relay's service key.  Fires with the
        mailbox's own address, or C{None} for bad credentials; fails with
        L{MailboxSuspended} for the right password of a suspended mailbox,
        with L{APIUnavailable} when the API cannot tell.
        """

    def send_email(
        api_key: str, request: EmailRequest, tenant: Optional[str] = None
    ) -> "Deferred[str]":
        """
        C{POST /emails}.  Fires with the new email's id; fails with
        L{APIError} carrying the SMTP reply.

        C{tenant} names the customer the send is for (the sender's
        C{Identity.account}: one per API key, one per mailbox), so that an
        implementation can share its capacity fairly between customers;
        C{None}: nobody in particular.  It never changes what is sent.
        """


class IRelayDelivery(Interface):
    """
    The avatar of an authenticated SMTP session: it validates the envelope
    sender and delivers whole transactions.

    (Twisted's C{IMessageDelivery} hands out one message object per
    recipient and replies C{250} or C{550} itself; the relay needs one API
    call per transaction and exact replies, so it uses this interface.)
    """

    identity = Attribute("The L{Identity} that logged in.")

    def validate_sender(address: str, session: str, client: str) -> Optional[Reply]:
        """
        C{None} if C{address} may be the envelope sender, else the reply.
        C{session} and C{client} are for the log of a refusal.
        """

    def deliver(
        envelope: Envelope,
        raw: bytes,
        session: str,
        client: str,
        scan: "Optional[MimeScan]" = None,
    ) -> "Deferred[Reply]":
        """
        Translate and send one transaction; fires with the client's reply.
        C{session} and C{client} (the client's address) are for the log.
        C{scan} (given, as a keyword, for large messages only): what the
        MIME scan found while the message streamed in.
        """


class IFleetState(Interface):
    """
    What the relays of a fleet share: counters with a sliding window
    (failed logins per client address and per mailbox) and notes with a
    lifetime (what the API said about a credential).

    Every method answers at once from the relay's own memory, so no reply
    ever waits for a shared store: an implementation that shares (Redis)
    writes in the background and keeps the memory up to date with what
    the other relays write (L{poststack_relay.fleet}).
    """

    def __len__() -> int:
        """
        How many counters this relay remembers.
        """

    def counts(keys: Sequence[str]) -> list[int]:
        """
        The current count of each key (0 for one not counted, or whose
        window has passed).
        """

    def add(keys: Sequence[str], window: float) -> list[int]:
        """
        Add one to each key's count and restart its window of C{window}
        seconds; return the new counts as far as this relay knows them.
        """

    def seconds_left(keys: Sequence[str]) -> list[float]:
        """
        Seconds until each key's count is forgotten if nothing is added to
        it (0 for one not counted), as far as this relay knows: what a
        refusal tells the client about when to come back.
        """

    def remember(subject: str, value: str, seconds: float) -> None:
        """
        Note C{value} under C{subject} for C{seconds} (replacing any note).
        """

    def recall(subject: str) -> "Optional[tuple[str, float]]":
        """
        C{(value, seconds left)} of the note under C{subject}, or C{None}.
        """


class IRelayReactor(
    IReactorCore,
    IReactorTime,
    IReactorTCP,
    IReactorSocket,
    IReactorPluggableNameResolver,
    IReactorFromThreads,
):
    """
    What the relay needs of a reactor, as one type: run and stop
    (C{IReactorCore}), timers (C{IReactorTime}), TCP listeners and the API's
    connections (C{IReactorTCP}), adopted sockets from systemd or a
    supervisor (C{IReactorSocket}), name resolution for the API's host
    (C{IReactorPluggableNameResolver}) and signals handed to the reactor
    thread (C{IReactorFromThreads}).

    Twisted's default reactors provide all of them, and
    C{twisted.internet.testing.MemoryReactorClock} what the tests use; no
    reactor declares this combination itself, so the one place that takes
    the global reactor (L{poststack_relay.tap}) casts it to this type.
    """
