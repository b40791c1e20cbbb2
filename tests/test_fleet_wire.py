"""
L{poststack_relay.fleet.wire}: key names, announcements; and
C{--redis-url} (L{poststack_relay.places.parse_redis_url}).
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from poststack_relay.config import ConfigError, RelayConfig
from poststack_relay.places import parse_redis_url
from poststack_relay.fleet.wire import (
    CountEvent,
    FleetKeys,
    NoteEvent,
    fleet_secret,
    loaded_notes,
    milliseconds,
    parse_event,
)


class KeysTests(SynchronousTestCase):
    def test_digests_hide_names(self) -> None:
        """
        Key names are keyed digests: no address, mailbox or key shows, and
        another secret gives other names.
        """
        keys = FleetKeys(fleet_secret("pw"))
        name = keys.counter("ip:192.0.2.1")
        self.assertTrue(name.startswith("psr:c:"))
        self.assertNotIn("192.0.2.1", name)
        self.assertEqual(len(name), len("psr:c:") + 32)
        self.assertEqual(name, FleetKeys(fleet_secret("pw")).counter("ip:192.0.2.1"))
        self.assertNotEqual(name, FleetKeys(fleet_secret("other")).counter("ip:192.0.2.1"))
        self.assertNotEqual(keys.note("x"), keys.counter("x"))
        self.assertTrue(keys.note("x").startswith("psr:n:"))
        self.assertEqual(keys.channel, "psr:events")
        self.assertNotIn("pw", repr(keys))


class EventTests(SynchronousTestCase):
    def test_count(self) -> None:
        self.assertEqual(
            parse_event(b"c 300000 psr:c:aa 3 psr:c:bb 1"),
            CountEvent(300.0, (("psr:c:aa", 3), ("psr:c:bb", 1))),
        )

    def test_note(self) -> None:
        self.assertEqual(
            parse_event("n 5000 psr:n:aa quota PostStack API: over quota"),
            NoteEvent("psr:n:aa", "quota PostStack API: over quota", 5.0),
        )

    def test_malformed(self) -> None:
        for message in (
            b"",
            b"x 1 2",
            b"c 300000",
            b"c 300000 psr:c:aa",
            b"c abc psr:c:aa 1",
            b"c 300000 psr:c:aa -1",
            b"c 0 psr:c:aa 1",
            b"n 0 psr:n:aa v",
            b"n 10 psr:n:aa",
            b"n x psr:n:aa v",
            b"\xff\xfe",
        ):
            self.assertIsNone(parse_event(message), message)

    def test_loaded_notes(self) -> None:
        self.assertEqual(
            loaded_notes([b"psr:n:a", 1500, b"rate", b"psr:n:b", 0, b"rate", b"psr:n:c", 10]),
            [NoteEvent("psr:n:a", "rate", 1.5)],
        )

    def test_milliseconds(self) -> None:
        self.assertEqual(milliseconds(300), "300000")
        self.assertEqual(milliseconds(0.0001), "1")


class RedisURLTests(SynchronousTestCase):
    def test_plain(self) -> None:
        url = parse_redis_url("redis://127.0.0.1:6380/2")
        self.assertEqual((url.host, url.port, url.db, url.tls), ("127.0.0.1", 6380, 2, False))
        self.assertEqual(str(url), "redis://127.0.0.1:6380/2")

    def test_defaults_and_tls(self) -> None:
        url = parse_redis_url("rediss://redis.internal")
        self.assertEqual((url.port, url.db, url.tls), (6379, 0, True))

    def test_password_never_shown(self) -> None:
        """
        The environment's password wins; neither shows in the text or repr.
        """
        url = parse_redis_url("redis://user:inurl@[::1]:6379/0", "fromenv")
        self.assertEqual(url.password, "fromenv")
        self.assertEqual(url.username, "user")
        self.assertEqual(str(url), "redis://user@[::1]:6379/0")
        for text in (str(url), repr(url)):
            self.assertNotIn("inurl", text)
            self.assertNotIn("fromenv", text)
        self.assertEqual(parse_redis_url("redis://:p%40ss@h/0").password, "p@ss")

    def test_refused(self) -> None:
        for bad in (
            "http://h:6379",
            "redis://",
            "redis://h:notaport",
            "redis://h/abc",
            "redis://h/0?x=1",
            "redis://h:99999",
        ):
            with self.assertRaises(ConfigError, msg=bad) as caught:
                parse_redis_url(bad + "")
            self.assertIn("redis-url", str(caught.exception))

    def test_config(self) -> None:
        config = RelayConfig(tls_cert="c.pem", redis_url="redis://h:1/0", redis_password="s3cret")
        redis = config.redis()
        assert redis is not None
        self.assertEqual(redis.password, "s3cret")
        self.assertIsNone(RelayConfig(tls_cert="c.pem").redis())
        self.assertNotIn("s3cret", repr(config))
        with self.assertRaises(ConfigError):
            RelayConfig(tls_cert="c.pem", redis_url="mysql://h")


class RedisURLReprTests(SynchronousTestCase):
    def test_url_password_hidden(self) -> None:
        config = RelayConfig(tls_cert="c.pem", redis_url="redis://:hunter2@h:1/0")
        self.assertNotIn("hunter2", repr(config))
        self.assertIn("redis://h:1/0", repr(config))
