# -*- test-case-name: tests.test_tls,tests.test_tls_scan,tests.test_tls_reload -*-
"""
The listener's TLS settings: Mozilla's server profiles, certificates and
keys from PEM files, and their reload without restart.

The wrapping itself (implicit TLS on any endpoint, refusing plaintext
clients politely) is L{poststack_relay.implicittls}'s.

The TLS settings follow Mozilla's server side TLS recommendations
(U{https://wiki.mozilla.org/Security/Server_Side_TLS}), version 6.0, and
also meet version 5.7, the one sslyze 6 checks against:

  - C{"intermediate"}: TLS 1.2 and 1.3; for TLS 1.2 only ECDHE key exchange
    with AES-GCM or ChaCha20-Poly1305 (exactly Mozilla 6.0's list; 5.7 also
    allowed three DHE-RSA suites).
  - C{"modern"}: TLS 1.3 only.

Both: key exchange groups X25519MLKEM768 (post-quantum hybrid, TLS 1.3,
when the OpenSSL linked to pyOpenSSL has it), X25519, P-256 and P-384
only; no compression; no renegotiation; no stateless session tickets; the
client's cipher order wins (every suite offered is strong, and a client
without AES hardware then gets ChaCha20), as in Mozilla's generated
configurations.

L{ReloadableTLS} holds the current settings and hands each I{new}
connection the current C{SSL.Context}; a reload builds a new context and
swaps it in, and connections already open keep the context they were made
with.
"""

from __future__ import annotations

import os
import re
from typing import Any, Optional, Union

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric import dsa, ed448, ed25519, rsa
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.ssl import Certificate, trustRootFromCertificates
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.randbytes import secureRandom
from zope.interface import implementer

from .config import TLS_PROFILES, ConfigError
from .metrics import RelayMetrics

_log = Logger()

# Mozilla intermediate, TLS 1.2: ECDHE with AEAD ciphers, in Mozilla's order.
TLS12_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)
# TLS 1.3 (both profiles): the three suites every TLS 1.3 stack implements.
TLS13_CIPHERSUITES = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
# Key exchange groups (ECDHE in TLS 1.2, key shares in TLS 1.3), most
# preferred first; the first list needs OpenSSL 3.5 or later.
TLS_GROUPS = "X25519MLKEM768:X25519:P-256:P-384"
TLS_GROUPS_CLASSIC = "X25519:P-256:P-384"

_MINIMUM_VERSION = {"intermediate": SSL.TLS1_2_VERSION, "modern": SSL.TLS1_3_VERSION}


# The private keys OpenSSL can sign a handshake with.
_ServerKey = Union[
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
    dsa.DSAPrivateKey,
]


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path!r}: {e.strerror or e}") from None


def trust_root(path: str) -> Any:
    """
    A trust root for C{optionsForClientTLS} from a PEM file of one or more
    CA certificates (for C{rediss://} with a private CA).

    @raise ConfigError: the file cannot be read or holds no certificate.
    """
    data = _read(path, "redis-tls-ca")
    try:
        certificates = [
            Certificate.loadPEM(block)
            for block in re.findall(
                rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", data, re.S
            )
        ]
    except Exception:
        raise ConfigError(f"redis-tls-ca {path}: not a PEM certificate file") from None
    if not certificates:
        raise ConfigError(f"redis-tls-ca {path}: no PEM certificate in it")
    return trustRootFromCertificates(certificates)  # type: ignore[no-untyped-call]  # (unannotated in Twisted)


def _openssl_reason(error: Exception) -> str:
    """
    The last OpenSSL reason of an C{SSL.Error}, on one line.
    """
    details = error.args[0] if error.args else None
    if isinstance(details, list) and details and isinstance(details[-1], tuple):
        return str(details[-1][-1])
    return " ".join(str(error).split()) or error.__class__.__name__


def _set_groups(context: SSL.Context) -> None:
    """
    Limit the key exchange groups of C{context} to L{TLS_GROUPS}, or to
    L{TLS_GROUPS_CLASSIC} if this OpenSSL has no X25519MLKEM768.

    pyOpenSSL has no public call for this (OpenSSL's
    C{SSL_CTX_set1_groups_list}), so this calls the OpenSSL binding that
    pyOpenSSL itself uses, the way Twisted's C{CertificateOptions} calls
    C{SSL_CTX_set_ecdh_auto}.  It is the one private name the relay uses
    (pyOpenSSL's C{_util.lib} and C{Context._context}), and only here.
    Should either go away in a pyOpenSSL release, the context falls back to
    P-256 alone (public API): still within Mozilla's profiles, but without
    X25519 and the post-quantum hybrid (tests/test_tls_scan.py checks the
    groups offered, so such an upgrade fails the tests rather than
    passing silently).
    """
    try:
        from OpenSSL._util import lib

        set_list = lib.SSL_CTX_set1_curves_list  # the old name of set1_groups_list
        handle = context._context
    except (ImportError, AttributeError):  # pragma: no cover - depends on pyOpenSSL
        context.set_tmp_ecdh(ec.SECP256R1())
        return
    for groups in (TLS_GROUPS, TLS_GROUPS_CLASSIC):
        if set_list(handle, groups.encode("ascii")) == 1:
            return
    raise ConfigError(f"OpenSSL refused the TLS groups {TLS_GROUPS_CLASSIC!r}")


@implementer(IOpenSSLServerConnectionCreator)
class TLSOptions:
    """
    One certificate chain and key under one profile, as an C{SSL.Context}.

    @ivar certificate: the leaf certificate.
    @ivar extraCertChain: the certificates served after the leaf
        (intermediates), in the order of the PEM file.
    @ivar profile: C{"intermediate"} or C{"modern"}.
    """

    def __init__(
        self,
        context: SSL.Context,
        certificate: x509.Certificate,
        extraCertChain: list[x509.Certificate],
        profile: str,
    ) -> None:
        self._context = context
        self.certificate = certificate
        self.extraCertChain = extraCertChain
        self.profile = profile

    def getContext(self) -> SSL.Context:
        """
        The context every connection made from these options shares.
        """
        return self._context

    def serverConnectionForTLS(self, protocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        """
        A new server connection (L{IOpenSSLServerConnectionCreator}).
        """
        return SSL.Connection(self._context, None)

    def describe(self) -> dict[str, str]:
        """
        The leaf certificate's subject, serial (hex) and end of validity
        (ISO 8601, UTC), for log events.
        """
        return describe_certificate(self.certificate)


def describe_certificate(certificate: x509.Certificate) -> dict[str, str]:
    """
    C{subject}, C{serial} (hex) and C{not_after} (ISO 8601, UTC) of a
    certificate, for log events.
    """
    return {
        "subject": certificate.subject.rfc4514_string(),
        "serial": format(certificate.serial_number, "x"),
        "not_after": certificate.not_valid_after_utc.isoformat(),
    }


def _make_context(
    profile: str, leaf: x509.Certificate, chain: list[x509.Certificate], key: _ServerKey
) -> SSL.Context:
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(_MINIMUM_VERSION[profile])
    # No compression (CRIME), no renegotiation, no stateless session tickets
    # (their key would live as long as the process).  OP_CIPHER_SERVER_PREFERENCE
    # is deliberately not set: Mozilla's profiles let the client choose.
    context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION | SSL.OP_NO_TICKET)
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    context.set_cipher_list(TLS12_CIPHERS.encode("ascii"))
    context.set_tls13_ciphersuites(TLS13_CIPHERSUITES.encode("ascii"))
    _set_groups(context)
    context.use_certificate(leaf)
    context.use_privatekey(key)
    for extra in chain:
        context.add_extra_chain_cert(extra)
    context.check_privatekey()
    context.set_verify(SSL.VERIFY_NONE)
    # No server-side session cache either: it held two sessions (~0.9 KB)
    # per handshake of the last 300 s, up to 20,480, in each process, while
    # a resumed TLS 1.3 handshake still pays the key exchange (it saves
    # only the signature), and a session is only found again by the same
    # process: not by another --workers worker nor another instance behind
    # a load balancer (docs/tls.md, docs/performance.md S3).
    context.set_session_id(secureRandom(8).hex().encode("ascii"))
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    return context


def load_certificate_options(
    cert_path: str, key_path: Optional[str], profile: str = "intermediate"
) -> TLSOptions:
    """
    Build the server's TLS settings from PEM files.

    @param cert_path: the certificate, optionally followed by its chain
        (leaf first, as ACME clients write C{fullchain.pem}); the whole
        chain is served.
    @param key_path: the private key; C{None} if it is in C{cert_path}.
    @param profile: C{"intermediate"} or C{"modern"} (see the module).
    @raise ConfigError: with a one-line reason when a file is missing,
        unreadable, not PEM, the key does not match the certificate, or
        OpenSSL refuses them.
    """
    if profile not in TLS_PROFILES:
        raise ConfigError(f"tls-profile must be one of {', '.join(TLS_PROFILES)}, not {profile!r}")
    cert_pem = _read(cert_path, "TLS certificate")
    key_pem = _read(key_path, "TLS key") if key_path else cert_pem
    try:
        certs = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise ConfigError(f"TLS certificate {cert_path!r} holds no PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        where = key_path or cert_path
        raise ConfigError(
            f"TLS key {where!r} holds no usable unencrypted PEM private key ({e.__class__.__name__})"
        ) from None
    where = key_path or cert_path
    if not isinstance(
        key,
        (
            rsa.RSAPrivateKey,
            ec.EllipticCurvePrivateKey,
            ed25519.Ed25519PrivateKey,
            ed448.Ed448PrivateKey,
            dsa.DSAPrivateKey,
        ),
    ):
        raise ConfigError(
            f"TLS key {where!r} is a {key.__class__.__name__}, not a key a TLS server can sign with"
        )
    leaf = certs[0]
    if leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise ConfigError(
            f"TLS key does not match the first certificate in {cert_path!r}"
        )
    try:
        context = _make_context(profile, leaf, list(certs[1:]), key)
    except SSL.Error as e:
        raise ConfigError(
            f"OpenSSL refused the TLS certificate {cert_path!r}: {_openssl_reason(e)}"
        ) from None
    return TLSOptions(context, leaf, list(certs[1:]), profile)


_Stamp = Optional[tuple[int, int, int, int]]


def _stamp(path: Optional[str]) -> _Stamp:
    """
    (device, inode, mtime in ns, size) of a file, following symlinks;
    C{None} if it cannot be read.  A change of any of them (a rewrite, or a
    new file renamed over the old one, as ACME clients do) means reload.
    """
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


@implementer(IOpenSSLServerConnectionCreator)
class ReloadableTLS:
    """
    The listener's TLS settings, replaceable while it runs.

    Each new connection gets the context of L{current}; L{reload} loads the
    files again and, if they are good, makes the new settings current.
    Connections already open keep the context they started with.  A bad
    new file leaves L{current} as it was and logs why
    (C{tls_reload_failed}); a good one logs C{tls_reloaded} with the new
    certificate's subject, serial and end of validity.

    Everything runs on the reactor thread.

    The metrics' C{tls_certificate_expiry_timestamp_seconds} (labelled with
    the certificate file's path) follows the certificate in use, and
    C{tls_reloads_total} counts reloads by result.

    @ivar current: the settings new connections get.
    @ivar metrics: the L{RelayMetrics} updated on each load.
    """

    def __init__(
        self,
        cert_path: str,
        key_path: Optional[str],
        profile: str = "intermediate",
        metrics: Optional[RelayMetrics] = None,
    ) -> None:
        """
        Load the files for the first time.

        @raise ConfigError: if they cannot be used.
        """
        self.cert_path = cert_path
        self.key_path = key_path
        self.profile = profile
        self.metrics = metrics if metrics is not None else RelayMetrics()
        stamp = self._stamps()
        self.current: TLSOptions = load_certificate_options(cert_path, key_path, profile)
        self._loaded = stamp
        self._failed: Optional[tuple[_Stamp, _Stamp]] = None
        # Labelled only once a certificate loaded: never a 0 expiry.
        self._expiry = self.metrics.tls_certificate_expiry_timestamp_seconds.labels(cert_path)
        self._set_expiry()

    def _set_expiry(self) -> None:
        self._expiry.set(self.current.certificate.not_valid_after_utc.timestamp())

    def _stamps(self) -> tuple[_Stamp, _Stamp]:
        return (_stamp(self.cert_path), _stamp(self.key_path))

    def serverConnectionForTLS(self, protocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        """
        A connection with the current settings (L{IOpenSSLServerConnectionCreator}).
        """
        return self.current.serverConnectionForTLS(protocol)

    def getContext(self) -> SSL.Context:
        """
        The current C{SSL.Context}.
        """
        return self.current.getContext()

    def reload(self, trigger: str = "request") -> bool:
        """
        Load the certificate and key files again.

        @param trigger: why, for the log (C{"SIGHUP"}, C{"files changed"}...).
        @return: C{True} if the new files are now used for new connections,
            C{False} if they could not be used (the old ones stay).
        """
        stamp = self._stamps()
        try:
            options = load_certificate_options(self.cert_path, self.key_path, self.profile)
        except Exception as e:
            self._failed = stamp
            self.metrics.tls_reloads_total.labels("failed").inc()
            reason = str(e) if isinstance(e, ConfigError) else f"{e.__class__.__name__}: {e}"
            old = self.current.describe()
            _log.error(
                "TLS certificate reload ({trigger}) failed, still using {old_subject} "
                "serial {old_serial}: {reason}",
                trigger=trigger,
                reason=" ".join(reason.split()),
                old_subject=old["subject"],
                old_serial=old["serial"],
                event="tls_reload_failed",
            )
            return False
        self.current = options
        self._loaded = stamp
        self._failed = None
        self.metrics.tls_reloads_total.labels("ok").inc()
        self._set_expiry()
        described = options.describe()
        _log.info(
            "TLS certificate reloaded ({trigger}): {subject} serial {serial}, "
            "valid until {not_after}, chain of {chain_length}",
            trigger=trigger,
            chain_length=1 + len(options.extraCertChain),
            event="tls_reloaded",
            **described,
        )
        return True

    def reload_if_changed(self) -> bool:
        """
        Reload if the certificate or key file changed (device, inode, mtime
        or size) since the last load or the last failed attempt.  Never
        raises, so it can run from a C{LoopingCall}.

        @return: C{True} if new settings were loaded.
        """
        try:
            stamp = self._stamps()
            if stamp == self._loaded or stamp == self._failed:
                return False
            return self.reload("files changed")
        except Exception:
            _log.failure("TLS certificate check failed", event="tls_reload_crash")
            return False


__all__ = [
    "ReloadableTLS",
    "TLSOptions",
    "describe_certificate",
    "load_certificate_options",
]
