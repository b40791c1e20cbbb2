"""
Tests for L{poststack_relay.addresses}: the one address validator, for
envelope paths and header addresses.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from poststack_relay.addresses import (
    BAD_DOMAIN,
    MAX_ADDRESS,
    MAX_DOMAIN,
    MAX_LOCAL_PART,
    MAX_PATH,
    NOT_VALID,
    TOO_LONG,
    address_key,
    api_address,
    api_domain,
    bare_address,
    has_domain,
    has_dotted_domain,
    header_address_problem,
    is_header_address,
    path_problem,
)


def _path(address: str) -> str | None:
    return path_problem(address.encode("utf-8"), address)


class LimitsTests(SynchronousTestCase):
    """The RFC 5321 section 4.5.3.1 limits, shared by both sides."""

    def test_values(self) -> None:
        """64, 255, 256 and 254 octets."""
        self.assertEqual((MAX_LOCAL_PART, MAX_DOMAIN, MAX_PATH, MAX_ADDRESS), (64, 255, 256, 254))

    def test_counted_in_utf8_octets(self) -> None:
        """An internationalized local part is measured in UTF-8 on both sides."""
        local = "\u00e9" * 33  # 66 octets, 33 characters
        self.assertEqual(_path(local + "@example.com"), "local")
        self.assertEqual(header_address_problem(local + "@example.com"), TOO_LONG)
        local = "\u00e9" * 32
        self.assertIsNone(_path(local + "@example.com"))
        self.assertIsNone(header_address_problem(local + "@example.com"))

    def test_address_length(self) -> None:
        """254 octets fit, 255 do not (a header address; a path counts its brackets)."""
        domain = ".".join(["a" * 60] * 4)[:MAX_ADDRESS - 11 - 1]
        address = "l" * 11 + "@" + domain
        self.assertEqual(len(address), MAX_ADDRESS)
        self.assertIsNone(header_address_problem(address))
        self.assertIsNone(_path(address))
        self.assertEqual(header_address_problem("l" + address), TOO_LONG)
        self.assertEqual(_path("l" + address), "path")


class PathTests(SynchronousTestCase):
    """L{path_problem} and L{has_domain}: envelope paths (RFC 5321 Mailbox)."""

    def test_fine(self) -> None:
        """Ordinary, quoted, literal and UTF-8 paths are fine."""
        for address in ("a@b.com", '"a b"@b.com', "a@[192.0.2.1]", "j\u00f6rg@b\u00fccher.de", "a..b@c.d"):
            self.assertIsNone(_path(address), address)

    def test_problems(self) -> None:
        """Comments and bad syntax are named."""
        self.assertEqual(_path("a(x)@b.com"), "comment")
        self.assertEqual(_path("a@b(x).com"), "comment")
        self.assertIsNone(_path('"a(x)"@b.com'))
        self.assertEqual(_path("a b@c.com"), "syntax")
        self.assertEqual(_path("a@-b.com"), "syntax")
        self.assertEqual(_path("a@" + "b" * 256), "domain")

    def test_no_domain_left_to_caller(self) -> None:
        """An address without a domain has no path problem: the caller replies."""
        self.assertIsNone(_path("postmaster"))
        self.assertIsNone(_path("a b@localhost"))

    def test_has_domain(self) -> None:
        """A dotted domain or a non-empty literal."""
        self.assertTrue(has_domain("a@b.c"))
        self.assertTrue(has_domain("a@[IPv6:::1]"))
        self.assertFalse(has_domain("a@[]"))
        self.assertFalse(has_domain("a@localhost"))
        self.assertFalse(has_domain("a@.b.c"))
        self.assertFalse(has_domain("@b.c"))
        self.assertFalse(has_domain("abc"))

    def test_has_dotted_domain(self) -> None:
        """The sender rule's domain: a dot inside it, literals included."""
        self.assertTrue(has_dotted_domain("a@b.c"))
        self.assertTrue(has_dotted_domain("a@[192.0.2.1]"))
        self.assertFalse(has_dotted_domain("a@[IPv6:::1]"))
        self.assertFalse(has_dotted_domain("a@localhost."))
        self.assertFalse(has_dotted_domain("a@"))


class HeaderAddressTests(SynchronousTestCase):
    """L{header_address_problem}: addresses from header fields."""

    def test_fine(self) -> None:
        """Lenient atoms, quoted local parts, literals and bare hosts pass."""
        for address in ("a@b.com", '"a b"@b.com', "a@[192.0.2.1]", "a@localhost", "a..b@c"):
            self.assertIsNone(header_address_problem(address), address)
            self.assertTrue(is_header_address(address), address)

    def test_not_valid(self) -> None:
        """Specials, whitespace, controls and a missing part are refused."""
        for address in ("a b@c.com", "a@b c", "a@", "@b.c", "a<b@c.d", "a\t@b.c", "a\x01b@c.d", "a\x85b@c.d", "a@b\u2028c"):
            self.assertEqual(header_address_problem(address), NOT_VALID, repr(address))

    def test_syntax_only(self) -> None:
        """L{is_header_address} checks the syntax, not controls or lengths."""
        self.assertTrue(is_header_address("a\x01b@c.d"))
        self.assertTrue(is_header_address("a" * 100 + "@c.d"))

    def test_bare_address(self) -> None:
        """Whitespace and one pair of angle brackets go."""
        self.assertEqual(bare_address("  <a@b.c> "), "a@b.c")
        self.assertEqual(bare_address("< a@b.c >"), "a@b.c")
        self.assertEqual(bare_address("<<a@b.c>>"), "<a@b.c>")
        self.assertEqual(bare_address(""), "")


class InternationalTests(SynchronousTestCase):
    """The API form (A-labels) and the comparison key of internationalized addresses."""

    def test_ascii_domains_unchanged(self) -> None:
        """An ASCII domain is returned as written (the same object: no work), valid A-labels too."""
        for domain in ("yourdomain.com", "Example.COM", "my_host.example", "[192.0.2.1]", "XN--BCHER-KVA.example"):
            self.assertEqual(api_domain(domain), domain, domain)
        domain = "example.com"
        self.assertIs(api_domain(domain), domain)

    def test_u_labels_become_a_labels(self) -> None:
        """U-labels become IDNA 2008 A-labels after the UTS #46 mapping (case, full-width dot, NFC; ß kept)."""
        for domain, expected in [
            ("bücher.example", "xn--bcher-kva.example"),
            ("BÜCHER.Example", "xn--bcher-kva.example"),
            ("mail.bücher。example", "mail.xn--bcher-kva.example"),
            ("例子.example", "xn--fsqu00a.example"),
            ("faß.de", "xn--fa-hia.de"),  # IDNA 2008, not the transitional ss
            ("bécher.example", "xn--bcher-bsa.example"),
            ("be\u0301cher.example", "xn--bcher-bsa.example"),  # NFC: the same as bécher
            ("a_b.bücher.example", "a_b.xn--bcher-kva.example"),
            ("مثال.example", "xn--mgbh0fb.example"),
        ]:
            self.assertEqual(api_domain(domain), expected, domain)

    def test_invalid(self) -> None:
        """DISALLOWED code points, bad A-labels, hyphen rules and non-ASCII literals have no API form."""
        for domain in ("\u2603.example", "xn--zz.example", "a.XN--ZZ.example", "-bü.example", "bü-.example",
                       "\u0301b.example", "[1.2.3.\u0664]", "ü" * 64 + ".example"):
            self.assertIsNone(api_domain(domain), domain)

    def test_api_address(self) -> None:
        """The local part is kept as written (UTF-8 too); only the domain changes."""
        self.assertEqual(api_address("Jörg@Bücher.example"), "Jörg@xn--bcher-kva.example")
        self.assertEqual(api_address("用户@例子.example"), "用户@xn--fsqu00a.example")
        self.assertEqual(api_address("用户@example.com"), "用户@example.com")
        self.assertEqual(api_address('"a@b"@bücher.example'), '"a@b"@xn--bcher-kva.example')
        self.assertIsNone(api_address("a@\u2603.example"))
        address = "you@yourdomain.com"
        self.assertIs(api_address(address), address)

    def test_key(self) -> None:
        """One key for U-label and A-label spellings, any case, NFC or not; distinct mailboxes stay distinct."""
        same = ["jörg@bücher.example", "JÖRG@BÜCHER.EXAMPLE", "jo\u0308rg@xn--bcher-kva.example",
                "Jörg@XN--BCHER-KVA.example"]
        self.assertEqual({address_key(a) for a in same}, {"jörg@xn--bcher-kva.example"})
        self.assertEqual(address_key("You@YourDomain.com"), "you@yourdomain.com")
        self.assertNotEqual(address_key("jorg@bücher.example"), address_key("jörg@bücher.example"))
        self.assertNotEqual(address_key("a@bücher.example"), address_key("a@bucher.example"))
        # No API form: compared as written, lowercased.
        self.assertEqual(address_key("A@\u2603.Example"), "a@\u2603.example")

    def test_path_problem_idn(self) -> None:
        """A path whose domain has no A-label form is the problem "idn"; header checks are syntax only."""
        self.assertEqual(_path("a@\u2603.example"), "idn")
        self.assertEqual(_path("a@xn--zz.example"), "idn")
        self.assertIsNone(_path("jörg@bücher.example"))
        self.assertIsNone(header_address_problem("a@\u2603.example"))
        self.assertIn("IDNA 2008", BAD_DOMAIN)


_LABEL_TEXT = st.text(
    alphabet=st.sampled_from("abcXYZ09-_ßüÜéé例子δοκιμήиванمثال☃\u200d\u0301。"), min_size=1, max_size=12
)


class InternationalPropertyTests(SynchronousTestCase):
    """Properties of the A-label conversion over generated domains."""

    @settings(max_examples=300, derandomize=True, deadline=None)
    @given(st.lists(_LABEL_TEXT, min_size=1, max_size=4))
    def test_api_form(self, labels: list[str]) -> None:
        """
        The API form is ASCII (or None), a fixed point of the conversion,
        and has the same comparison key as the domain it came from.
        """
        domain = ".".join(labels)
        converted = api_domain(domain)
        if converted is None:
            return
        self.assertTrue(converted.isascii(), converted)
        self.assertEqual(api_domain(converted), converted)
        self.assertEqual(address_key("Jörg@" + domain), address_key("jörg@" + converted))
