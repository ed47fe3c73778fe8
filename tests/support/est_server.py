"""An RFC 7030 EST server for tests, benchmarks and the demo: real HTTPS on 127.0.0.1.

It speaks /cacerts, /csrattrs, /simpleenroll and /simplereenroll (with or without a CA label) the
way deployed servers do, variations included: /cacerts without `smime-type`, /csrattrs with
trailing garbage, base64 bodies in 76-character lines, 202 without Content-Length. Modes select
the authentication (Basic with a 401 challenge, client certificate, or both), TLS 1.2 only,
proof-of-possession, 202 Retry-After, short-lived certificates; `fault` makes it misbehave.

In-process: `with EstServer(tmp_path, EstOptions(auth="basic")) as est: est.url ...` (options
may be changed between requests). Standalone:
`python -m tests.support.est_server --dir DIR --auth basic --pop-required` prints one JSON line
(url, CA file, fingerprint) when it is ready and serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import dataclasses
import hashlib
import json
import os
import signal
import socket
import ssl
import struct
import sys
import threading
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import AttributeOID, ExtendedKeyUsageOID
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.codec.der import encoder as der_encoder
from pyasn1.type import univ
from pyasn1_modules import rfc5280, rfc7030

from tests.support.ca import CaShape, LeafProfile, TestCA, key_pem, pem, utcnow

FAULTS = (
    "5xx",  # HTTP 500
    "garbage",  # 200 with a body that is not base64 PKCS#7
    "other-key",  # a certificate for a key that is not the CSR's
    "wrong-issuer",  # a certificate from a CA that is not in /cacerts
    "truncated",  # Content-Length larger than the body, then the connection closes
    "hang",  # reads the request, never answers
    "oversized",  # a 4 MiB body with Content-Length
    "oversized-stream",  # a 4 MiB body without Content-Length
    "ca-cert",  # the issued certificate is a CA certificate
    "expired",  # the issued certificate expired yesterday
    "html",  # 200 text/html (a proxy's login page)
    "redirect",  # 302 to another server (EST redirects are not followed)
    "empty",  # a PKCS#7 certs-only message holding no certificate
    "not-pkcs7",  # valid base64 of DER that is not PKCS#7
    "not-yet-valid",  # the issued certificate starts the day after tomorrow
    "no-digital-signature",  # keyUsage without digitalSignature
    "bad-extensions",  # the issued certificate carries an extension twice
    "drip",  # the body one byte at a time, each well within the read timeout
    "drip-headers",  # the same with the header lines
    "server-eku",  # the issued certificate's extendedKeyUsage is serverAuth only
    "issuer-not-ca",  # signed by a certificate with basicConstraints cA=FALSE (sent along)
    "pop-401",  # 401 "Proof of Possession Mismatch." with a Basic challenge, like some servers
    "pop-403",  # 403 naming proof-of-possession in the body
    "csr-attribute-400",  # 400 naming a missing CSR attribute
    "policy-403",  # 403 naming a policy refusal
    "reset",  # headers and half the body, then a TCP reset (SO_LINGER 0 close)
)
#: faults of the TLS layer, on every connection (`EstOptions.tls_fault`)
TLS_FAULTS = (
    "other-host",  # the server certificate is for est.other, not localhost/127.0.0.1
    "expired-cert",  # the server certificate expired yesterday
    "rogue-ca",  # a man in the middle: a chain from another CA, for the right name
    "tls1.1-only",  # only TLS 1.1 is offered (OpenSSL 3 needs @SECLEVEL=0 to offer it)
    "drip-handshake",  # the server's handshake bytes one at a time, every `drip_seconds`
)
AUTH_MODES = ("none", "basic", "cert", "both")
#: a degenerate SignedData without certificates (cryptography will not serialize one)
EMPTY_CERTS_ONLY = bytes.fromhex(
    "302306092a864886f70d010702a01630140201013100300b06092a864886f70d0107013100"
)
ENROLL_OPS = ("simpleenroll", "simplereenroll")
OIDS = {
    "ecPublicKey": "1.2.840.10045.2.1",
    "secp256r1": "1.2.840.10045.3.1.7",
    "secp384r1": "1.3.132.0.34",
    "ecdsaWithSHA256": "1.2.840.10045.4.3.2",
    "ecdsaWithSHA384": "1.2.840.10045.4.3.3",
    "challengePassword": "1.2.840.113549.1.9.7",
    "serialNumber": "2.5.4.5",
    "macAddress": "1.3.6.1.1.1.1.22",
}


def csrattrs_der(
    *, curve: str | None = "secp256r1", oids: tuple[str, ...] = ("challengePassword",)
) -> bytes:
    """A DER CsrAttrs: an ecPublicKey attribute naming `curve`, plus bare OIDs (names in OIDS)."""
    attrs = rfc7030.CsrAttrs()
    for name in oids:
        item = rfc7030.AttrOrOID()
        item["oid"] = univ.ObjectIdentifier(OIDS.get(name, name))
        attrs.append(item)
    if curve is not None:
        item = rfc7030.AttrOrOID()
        attribute = item["attribute"]
        attribute["attrType"] = univ.ObjectIdentifier(OIDS["ecPublicKey"])
        attribute["attrValues"].append(der_encoder.encode(univ.ObjectIdentifier(OIDS[curve])))
        attrs.append(item)
    return bytes(der_encoder.encode(attrs))


def b64_lines(der: bytes) -> bytes:
    """base64 in 76-character lines, as RFC 2045 writes it."""
    return base64.encodebytes(der).replace(b"\n", b"\r\n")


@dataclass
class EstOptions:
    auth: str = "none"  # AUTH_MODES: what /simpleenroll demands
    username: str = "device"
    password: str = "enroll-secret"
    tls12_only: bool = False
    pop_required: bool = False
    pending: int = 0  # answer 202 this many times per key before issuing
    retry_after: str | None = "1"  # the 202's Retry-After (None: no header)
    cert_lifetime_seconds: int = 30 * 86400
    fault: str | None = None  # FAULTS, on the enroll operations
    hang_seconds: float = 20.0
    csrattrs: bytes | None = field(default_factory=csrattrs_der)  # None: 404
    csrattrs_trailing_garbage: bool = True
    csrattrs_status: int = 200  # answer /csrattrs with this status instead (500, 403, ...)
    csrattrs_suffix: bytes = b""  # appended after the base64 text (b"\x00", b"\r\n  ", ...)
    copy_san: bool = True  # copy subjectAltName from the CSR (False: drop CSR extensions)
    label: str | None = None  # when set, only /.well-known/est/<label>/ is served
    content_length: str | None = None  # sent as the issuing 200's Content-Length (e.g. "²")
    retry_after_503: str | None = None  # with fault 5xx: answer 503 with this Retry-After
    keep_alive: bool = False  # HTTP/1.1 persistent connections (else Connection: close)
    #: with keep_alive: after this many requests a connection is closed without saying so
    #: (as servers close idle connections)
    keep_alive_requests: int | None = None
    reject_client_certs: bool = False  # trust no client CA: a presented certificate gets UNKNOWN_CA
    tls_fault: str | None = None  # TLS_FAULTS
    drip_seconds: float = 0.05  # faults drip, drip-headers, drip-handshake: the pause per byte


@dataclass
class Pki:
    """The CA hierarchy behind the server: `issuing` (with its `parent`s) signs the device
    certificates, `tls_issuer` the server's TLS certificate (default: `issuing`); the agent is
    given the root above `tls_issuer` as anchor (`EstServer.ca_file`), and /cacerts sends
    `issuing` and the CAs above it. A `tls_issuer` under another root than `issuing` is an EST
    server authenticated by one CA for a PKI whose root is another (RFC 7030 3.6.1)."""

    issuing: TestCA
    tls_issuer: TestCA | None = None
    leaf: LeafProfile = field(default_factory=LeafProfile)


@dataclass
class Record:
    method: str
    path: str
    operation: str
    status: int
    authorization: bool
    client_cert: str | None  # subject of the verified client certificate
    tls_version: str
    challenge_password: str | None = None
    csr: bytes | None = None  # DER of the CSR received
    connection: int = 0  # which TLS connection carried it (1, 2, ... per server)
    at: datetime = field(default_factory=utcnow)  # when its request line arrived


class EstServer:
    """The EST CA (`ca`), the IDevID manufacturer CA (`idevid_ca`), and an HTTPS server."""

    def __init__(
        self,
        directory: Path,
        options: EstOptions | None = None,
        *,
        port: int = 0,
        pki: Pki | None = None,
    ) -> None:
        self.directory = directory
        self.options = options or EstOptions()
        self.pki = pki or Pki(issuing=TestCA(name="devid test EST CA"))
        self.ca = self.pki.issuing  # issues the device certificates
        self.root = self.ca.root()  # the root of the device PKI
        #: the anchor the agent is given (ca_file): the root above the TLS issuer, which is
        #: `root` unless `pki.tls_issuer` is under another
        self.tls_root = (self.pki.tls_issuer or self.ca).root()
        self.idevid_ca = TestCA(name="devid test manufacturer CA")
        self.rogue_ca = TestCA(name="devid rogue CA")
        #: a certificate the EST CA issued with cA=FALSE, signing anyway (fault issuer-not-ca)
        self.not_a_ca = TestCA(name="devid not a CA", parent=self.ca, shape=CaShape(bc_ca=False))
        directory.mkdir(parents=True, exist_ok=True)
        self.ca_file = self.tls_root.write_cert(directory / "est-ca.pem")
        self.idevid_ca_file = self.idevid_ca.write_cert(directory / "idevid-ca.pem")
        tls_issuer = self.pki.tls_issuer or self.ca
        self.server_cert, self.server_key = tls_issuer.server_identity(directory)
        if tls_issuer is not self.root:  # the server sends its chain, as servers do
            with open(self.server_cert, "ab") as f:
                f.write(b"".join(pem(c) for c in tls_issuer.chain()[:-1]))
        self._fault_identities: dict[str, tuple[Path, Path]] = {}
        #: when set, /cacerts answers these instead of the issuing CA's chain (a test's set)
        self.cacerts_answer: list[x509.Certificate] | None = None
        #: CAs rolled over from (rollover()): their identities still authenticate
        self.previous_cas: list[TestCA] = []
        self.records: list[Record] = []
        #: serial numbers for the next certificates issued, in order (then random ones)
        self.next_serials: list[int] = []
        #: set when a request starts hanging (fault "hang"): tests wait on it, not on time
        self.hang_started = threading.Event()
        self.connections = 0  # TLS connections accepted
        self.issued: list[x509.Certificate] = []
        self._pending_counts: dict[bytes, int] = {}
        self._lock = threading.Lock()
        self.stopping = threading.Event()
        self._httpd = _HttpServer(("127.0.0.1", port), self)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    @property
    def ca_fingerprint(self) -> str:
        return hashlib.sha256(self.root.cert.public_bytes(serialization.Encoding.DER)).hexdigest()

    def start(self) -> EstServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)

    def __enter__(self) -> EstServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(*self._tls_identity(self.options.tls_fault))
        if self.options.reject_client_certs:
            ctx.load_verify_locations(cadata=pem(self.rogue_ca.cert).decode())
        else:
            cas = [*self.ca.chain(), *(c.cert for c in self.previous_cas), self.idevid_ca.cert]
            anchors = b"".join(pem(c) for c in cas)
            ctx.load_verify_locations(cadata=anchors.decode())
            ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        ctx.verify_mode = ssl.CERT_OPTIONAL
        if self.options.tls12_only:
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        if self.options.tls_fault == "tls1.1-only":
            with warnings.catch_warnings():  # "ssl.TLSVersion.TLSv1_1 is deprecated"
                warnings.simplefilter("ignore", DeprecationWarning)
                ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 offers TLS 1.1 only so
                ctx.minimum_version = ssl.TLSVersion.TLSv1_1
                ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        return ctx

    def _tls_identity(self, fault: str | None) -> tuple[Path, Path]:
        """The server certificate (with its chain) and key files for a TLS fault."""
        if fault not in ("other-host", "expired-cert", "rogue-ca"):
            return self.server_cert, self.server_key
        with self._lock:
            if fault not in self._fault_identities:
                self._fault_identities[fault] = self._make_tls_identity(fault)
            return self._fault_identities[fault]

    def _make_tls_identity(self, fault: str) -> tuple[Path, Path]:
        import ipaddress

        issuer = self.rogue_ca if fault == "rogue-ca" else (self.pki.tls_issuer or self.ca)
        names: list[x509.GeneralName] = [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]
        start, lifetime = utcnow() - timedelta(minutes=5), timedelta(days=365)
        if fault == "other-host":
            names = [x509.DNSName("est.other")]
        elif fault == "expired-cert":
            start, lifetime = utcnow() - timedelta(days=2), timedelta(days=1)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = issuer.issue(
            key.public_key(),
            subject="est.other" if fault == "other-host" else "localhost",
            eku=[ExtendedKeyUsageOID.SERVER_AUTH],
            sans=names,
            not_before=start,
            lifetime=lifetime,
        )
        # a man in the middle sends its whole chain; the server sends its own without the root
        chain = [cert, *issuer.chain()] if fault == "rogue-ca" else [cert, *issuer.chain()[:-1]]
        cert_path = self.directory / f"tls-{fault}.crt"
        key_path = self.directory / f"tls-{fault}.key"
        cert_path.write_bytes(b"".join(pem(c) for c in chain))
        key_path.write_bytes(key_pem(key))
        return cert_path, key_path

    # -- helpers for tests ---------------------------------------------------------------------

    def issue_idevid(self, public_key: Any, serial: str = "SN-0001") -> x509.Certificate:
        """A manufacturer IDevID certificate for `public_key` (TLS client auth)."""
        return self.idevid_ca.issue(
            public_key,
            subject=f"idevid {serial}",
            eku=[ExtendedKeyUsageOID.CLIENT_AUTH],
            lifetime=timedelta(days=3650),
        )

    def rollover(self) -> tuple[x509.Certificate, x509.Certificate, x509.Certificate]:
        """RFC 7030 4.1.3 / RFC 4210 4.4 root CA key update of the issuing root: a new key
        under the same name. From now on the new root issues, and /cacerts answers
        NewWithNew, NewWithOld, OldWithNew and OldWithOld. The server's TLS certificate stays
        under the old root (the agent's explicit anchor). Returns (NewWithNew, NewWithOld,
        OldWithNew)."""
        old = self.ca
        if old.parent is not None:
            raise ValueError("rollover() rolls a root: the issuing CA must be the root")
        new = TestCA(name=old.name)
        link = {"subject": old.cert.subject, "ca": True, "lifetime": timedelta(days=3650)}
        new_with_old = old.issue(new.key.public_key(), **link)  # type: ignore[arg-type]
        old_with_new = new.issue(old.key.public_key(), **link)  # type: ignore[arg-type]
        with self._lock:
            self.previous_cas.append(old)
            self.ca = new
            self.cacerts_answer = [new.cert, new_with_old, old_with_new, old.cert]
        return new.cert, new_with_old, old_with_new

    def switch_ca(self, ca: TestCA) -> None:
        """From now on `ca` issues, and /cacerts sends its chain (unless `cacerts_answer` says
        otherwise); identities the CA before issued still authenticate a re-enrollment."""
        with self._lock:
            self.previous_cas.append(self.ca)
            self.ca = ca

    def cacerts(self) -> list[x509.Certificate]:
        """What /cacerts answers now."""
        answer = self.cacerts_answer
        return list(answer) if answer is not None else self.ca.chain()

    def operations(self) -> list[str]:
        return [r.operation for r in self.records]

    # -- issuing -------------------------------------------------------------------------------

    def issue_for(self, csr: x509.CertificateSigningRequest) -> x509.Certificate:
        options = self.options
        key = csr.public_key()
        ca = self.ca
        if options.fault == "other-key":
            key = ec.generate_private_key(ec.SECP256R1()).public_key()
        elif options.fault == "wrong-issuer":
            ca = self.rogue_ca
        sans = None
        if options.copy_san:
            try:
                ext = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
                sans = list(ext.value)
            except x509.ExtensionNotFound:
                pass
        now = utcnow()
        lifetime = timedelta(seconds=options.cert_lifetime_seconds)
        not_before = now - timedelta(minutes=1)
        if options.fault == "expired":
            not_before = now - timedelta(days=2)
            lifetime = timedelta(days=1)
        elif options.fault == "not-yet-valid":
            not_before = now + timedelta(days=2)
        if options.fault in ("no-digital-signature", "bad-extensions"):
            return self._issue_odd(csr, options.fault)
        profile = self.pki.leaf
        if options.fault == "server-eku":
            profile = dataclasses.replace(profile, eku=(ExtendedKeyUsageOID.SERVER_AUTH,))
        elif options.fault == "issuer-not-ca":
            ca = self.not_a_ca
        with self._lock:  # a test may fix the serial of the next one (to revoke it ahead)
            serial = self.next_serials.pop(0) if self.next_serials else None
        cert = ca.issue(
            key,  # type: ignore[arg-type]
            subject=csr.subject,
            profile=profile,
            sans=sans,
            ca=options.fault == "ca-cert",
            not_before=not_before,
            lifetime=lifetime,
            serial=serial,
        )
        with self._lock:
            self.issued.append(cert)
        return cert

    def _issue_odd(self, csr: x509.CertificateSigningRequest, fault: str) -> x509.Certificate:
        """A certificate for the CSR's key that TestCA.issue cannot make."""
        now = utcnow()
        builder = (
            x509.CertificateBuilder()
            .subject_name(csr.subject)
            .issuer_name(self.ca.cert.subject)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=1))
            .not_valid_after(now + timedelta(days=1))
        )
        if fault == "no-digital-signature":
            builder = builder.add_extension(
                x509.KeyUsage(
                    digital_signature=False, content_commitment=False, key_encipherment=True,
                    data_encipherment=False, key_agreement=False, key_cert_sign=False,
                    crl_sign=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )  # fmt: skip
            return builder.sign(self.ca.key, hashes.SHA256())
        # cryptography refuses to build a duplicate extension: build it, then copy the
        # extension in the DER (the signature no longer matches; the agent must not get there)
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), False)
        good = rfc5280_decode(builder.sign(self.ca.key, hashes.SHA256()))
        extensions = good["tbsCertificate"]["extensions"]
        extensions.append(extensions[0])
        return x509.load_der_x509_certificate(der_encoder.encode(good))

    def pending_check(self, csr: x509.CertificateSigningRequest) -> bool:
        """True when this request should get (another) 202."""
        key = csr.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        with self._lock:
            count = self._pending_counts.get(key, 0)
            if count < self.options.pending:
                self._pending_counts[key] = count + 1
                return True
        return False


def _drain(sock: socket.socket) -> None:
    """After a failed handshake (its alert already sent), read until the client closes: closing
    with its unread request in the buffer would send a RST, and the client could lose the alert
    (in TLS 1.3 the client's request is on its way before the server rejects the certificate)."""
    with contextlib.suppress(OSError):  # the plain socket's calls: no TLS state is left
        socket.socket.shutdown(sock, socket.SHUT_WR)
        sock.settimeout(5)
        while socket.socket.recv(sock, 65536):
            pass


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], est: EstServer) -> None:
        self.est = est
        super().__init__(address, _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The TLS handshake runs in the request's thread, so a stuck client blocks no one else.
        request.settimeout(10)
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no 40 ms delayed-ACK stalls
        if self.est.options.tls_fault == "drip-handshake":
            self._drip_handshake(request)
            return
        try:
            tls = self.est.ssl_context().wrap_socket(
                request, server_side=True, do_handshake_on_connect=False
            )
        except (ssl.SSLError, OSError):
            return
        try:
            tls.do_handshake()
        except (ssl.SSLError, OSError):
            _drain(tls)
            tls.close()
            return
        with self.est._lock:
            self.est.connections += 1
            number = self.est.connections
        try:
            _Handler(tls, client_address, self, number)
        finally:
            tls.close()

    def _drip_handshake(self, request: socket.socket) -> None:
        """A real TLS handshake whose every byte from the server comes `drip_seconds` after the
        one before: each recv of the client returns within its timeout; the whole never ends
        in time (a ServerHello with its certificates is over a kilobyte)."""
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = self.est.ssl_context().wrap_bio(incoming, outgoing, server_side=True)
        with contextlib.suppress(OSError, ssl.SSLError):
            while not self.est.stopping.is_set():
                with contextlib.suppress(ssl.SSLWantReadError):
                    tls.do_handshake()
                for byte in outgoing.read():
                    if self.est.stopping.wait(self.est.options.drip_seconds):
                        return
                    request.sendall(bytes([byte]))
                if tls.version() is not None and not outgoing.pending:
                    return  # done (a client slower than the drip): nothing more to say
                data = request.recv(65536)
                if not data:
                    return
                incoming.write(data)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HttpServer
    _record: Record

    def __init__(self, request: Any, client_address: Any, server: _HttpServer, number: int) -> None:
        self.number = number
        self.served = 0
        super().__init__(request, client_address, server)

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # -- dispatch ------------------------------------------------------------------------------

    @property
    def est(self) -> EstServer:
        return self.server.est

    def _operation(self) -> str | None:
        parts = self.path.split("?")[0].strip("/").split("/")
        if parts[:2] != [".well-known", "est"]:
            return None
        rest = parts[2:]
        label = self.est.options.label
        if label is not None:
            if len(rest) != 2 or rest[0] != label:
                return None
            return rest[1]
        return rest[0] if len(rest) == 1 else (rest[1] if len(rest) == 2 else None)

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        self.close_connection = not self.est.options.keep_alive
        operation = self._operation() or "?"
        tls: ssl.SSLSocket = self.connection  # type: ignore[assignment]
        peer = tls.getpeercert()
        subject = None
        if peer:
            subject = ", ".join(f"{k}={v}" for rdn in peer.get("subject", ()) for k, v in rdn)
        record = Record(
            method=self.command,
            path=self.path,
            operation=operation,
            status=0,
            authorization="Authorization" in self.headers,
            client_cert=subject,
            tls_version=tls.version() or "?",
            connection=self.number,
        )
        self._record = record
        with self.est._lock:
            self.est.records.append(record)
        body = b""
        length = self.headers.get("Content-Length")
        if length:
            body = self.rfile.read(int(length))
        handler = {
            ("GET", "cacerts"): self._cacerts,
            ("GET", "csrattrs"): self._csrattrs,
            ("POST", "simpleenroll"): self._enroll,
            ("POST", "simplereenroll"): self._enroll,
        }.get((self.command, operation))
        if handler is None:
            self._send(404, b"not found\n", "text/plain")
            return
        handler(operation, body, record)

    # -- responses -----------------------------------------------------------------------------

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str | None,
        headers: dict[str, str] | None = None,
        *,
        length: int | None = None,
    ) -> int:
        self._record.status = status  # before the client can see the answer
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        keep = self.est.options.keep_alive and status != 202  # a 202 without length ends at close
        if length is not None or body or keep:
            self.send_header("Content-Length", str(len(body) if length is None else length))
        if not keep:
            self.close_connection = True
            self.send_header("Connection", "close")
        self.served += 1
        limit = self.est.options.keep_alive_requests
        if keep and limit is not None and self.served >= limit:
            self.close_connection = True  # silently: the client learns it on its next request
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(body)
        return status

    def _certs(self, certs: list[x509.Certificate], smime: bool) -> int:
        der = pkcs7.serialize_certificates(certs, serialization.Encoding.DER)
        content_type = "application/pkcs7-mime" + ("; smime-type=certs-only" if smime else "")
        return self._send(
            200, b64_lines(der), content_type, {"Content-Transfer-Encoding": "base64"}
        )

    def _issued(self, certs: list[x509.Certificate]) -> int:
        """The 200 of an enroll operation, with the Content-Length the options ask for."""
        override = self.est.options.content_length
        if override is None:
            return self._certs(certs, smime=True)
        body = b64_lines(pkcs7.serialize_certificates(certs, serialization.Encoding.DER))
        self._record.status = 200
        self.send_response(200)
        self.send_header("Content-Type", "application/pkcs7-mime; smime-type=certs-only")
        self.send_header("Content-Transfer-Encoding", "base64")
        self.send_header("Content-Length", override)
        self.close_connection = True
        self.send_header("Connection", "close")
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(body)
        return 200

    def _cacerts(self, operation: str, body: bytes, record: Record) -> int:
        # A real-server variation: no smime-type parameter on /cacerts.
        return self._certs(self.est.cacerts(), smime=False)

    def _csrattrs(self, operation: str, body: bytes, record: Record) -> int:
        der = self.est.options.csrattrs
        if self.est.options.csrattrs_status != 200:
            return self._send(self.est.options.csrattrs_status, b"no\n", "text/plain")
        if der is None:
            return self._send(404, b"no csrattrs\n", "text/plain")
        payload = b64_lines(der)
        if self.est.options.csrattrs_trailing_garbage:
            payload = b64_lines(der + b"\x00\x00garbage")
        payload += self.est.options.csrattrs_suffix
        return self._send(
            200, payload, "application/csrattrs", {"Content-Transfer-Encoding": "base64"}
        )

    def _authenticate(self, operation: str, record: Record) -> int | None:
        """None when the client may enroll, else the status already sent."""
        options = self.est.options
        cert = record.client_cert
        if operation == "simplereenroll":
            tls: ssl.SSLSocket = self.connection  # type: ignore[assignment]
            der = tls.getpeercert(binary_form=True)
            issuers = {c.cert.subject for c in (self.est.ca, *self.est.previous_cas)}
            issued_by_est = (
                der is not None and x509.load_der_x509_certificate(der).issuer in issuers
            )
            if not issued_by_est:
                return self._send(403, b"re-enroll needs the current identity\n", "text/plain")
        elif options.auth in ("cert", "both") and cert is None:
            return self._send(403, b"client certificate required\n", "text/plain")
        if options.auth in ("basic", "both"):
            expected = base64.b64encode(f"{options.username}:{options.password}".encode()).decode()
            given = self.headers.get("Authorization", "")
            if given != f"Basic {expected}":
                return self._send(
                    401,
                    b"authentication required\n",
                    "text/plain",
                    {"WWW-Authenticate": 'Basic realm="estrealm"'},
                )
        return None

    def _enroll(self, operation: str, body: bytes, record: Record) -> int:
        options = self.est.options
        refused = self._authenticate(operation, record)
        if refused is not None:
            return refused
        try:
            der = base64.b64decode(b"".join(body.split()), validate=True)
            csr = x509.load_der_x509_csr(der)
        except (binascii.Error, ValueError):
            return self._send(400, b"bad CSR encoding\n", "text/plain")
        if not csr.is_signature_valid:
            return self._send(400, b"CSR signature invalid\n", "text/plain")
        try:
            challenge = csr.attributes.get_attribute_for_oid(
                AttributeOID.CHALLENGE_PASSWORD
            ).value.decode()
        except x509.AttributeNotFound:
            challenge = None
        record.challenge_password = challenge
        record.csr = der
        if options.pop_required:
            tls: ssl.SSLSocket = self.connection  # type: ignore[assignment]
            unique = tls.get_channel_binding("tls-unique")
            if unique is None or challenge != base64.b64encode(unique).decode():
                return self._send(400, b"proof-of-possession failed\n", "text/plain")
        if operation == "simplereenroll":
            tls = self.connection  # type: ignore[assignment]
            current = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True) or b"")
            if current.subject != csr.subject:
                return self._send(400, b"re-enroll subject differs\n", "text/plain")
        if self.est.pending_check(csr):
            headers = {"Retry-After": options.retry_after} if options.retry_after else {}
            return self._send(202, b"", None, headers)  # no Content-Length, like some servers
        return self._fault_or_issue(csr)

    def _fault_or_issue(self, csr: x509.CertificateSigningRequest) -> int:
        fault = self.est.options.fault
        if fault == "pop-401":  # what a deployed server answers, credentials accepted or not
            challenge = {"WWW-Authenticate": 'Basic realm="estrealm"'}
            return self._send(401, b"401 Unauthorized\nProof of Possession Mismatch.\n",
                              "text/plain", challenge)  # fmt: skip
        if fault == "pop-403":
            return self._send(403, b"proof-of-possession required: the CSR has no "
                              b"challengePassword bound to this TLS session\n", "text/plain")  # fmt: skip
        if fault == "csr-attribute-400":
            return self._send(400, b"CSR attribute missing: serialNumber (2.5.4.5) is required"
                              b" in the subject\n", "text/plain")  # fmt: skip
        if fault == "policy-403":
            return self._send(403, b"Request denied by policy: end entity profile does not "
                              b"allow this subject\n", "text/plain")  # fmt: skip
        if fault == "5xx":
            retry = self.est.options.retry_after_503
            if retry is not None:
                return self._send(503, b"busy\n", "text/plain", {"Retry-After": retry})
            return self._send(500, b"internal error\n", "text/plain")
        if fault == "redirect":
            headers = {"Location": "https://elsewhere.example/.well-known/est/simpleenroll"}
            return self._send(302, b"moved\n", "text/plain", headers)
        if fault == "empty":
            return self._send(200, b64_lines(EMPTY_CERTS_ONLY), "application/pkcs7-mime")
        if fault == "not-pkcs7":
            return self._send(200, b64_lines(b"\x30\x03\x02\x01\x01"), "application/pkcs7-mime")
        if fault in ("drip", "drip-headers"):
            return self._drip(headers=fault == "drip-headers")
        if fault == "garbage":
            return self._send(200, b"\x00\xffnot base64 at all!!", "application/pkcs7-mime")
        if fault == "html":
            return self._send(200, b"<html>login</html>", "text/html")
        if fault == "hang":
            self.est.hang_started.set()
            self.est.stopping.wait(self.est.options.hang_seconds)
            return 0
        if fault in ("oversized", "oversized-stream"):
            chunk = b"A" * 65536
            self._record.status = 200
            self.send_response(200)
            self.send_header("Content-Type", "application/pkcs7-mime")
            if fault == "oversized":
                self.send_header("Content-Length", str(64 * len(chunk)))
            self.close_connection = True
            self.send_header("Connection", "close")
            self.end_headers()
            try:
                for _ in range(64):
                    self.wfile.write(chunk)
            except OSError:
                pass
            return 200
        cert = self.est.issue_for(csr)
        if fault == "truncated":
            der = pkcs7.serialize_certificates([cert], serialization.Encoding.DER)
            body = b64_lines(der)
            return self._send(
                200,
                body[: len(body) // 2],
                "application/pkcs7-mime; smime-type=certs-only",
                length=len(body),
            )
        if fault == "reset":
            return self._reset(
                b64_lines(pkcs7.serialize_certificates([cert], serialization.Encoding.DER))
            )
        if fault == "issuer-not-ca":
            return self._issued([cert, self.est.not_a_ca.cert])
        return self._issued([cert])

    def _reset(self, body: bytes) -> int:
        """The headers and half of `body`, then a TCP reset: SO_LINGER 0 and close (the socket
        is detached from the TLS and HTTP objects first, so nothing holds it open)."""
        self._record.status = 200
        self.send_response(200)
        self.send_header("Content-Type", "application/pkcs7-mime; smime-type=certs-only")
        self.send_header("Content-Transfer-Encoding", "base64")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.close_connection = True
        tls: ssl.SSLSocket = self.connection  # type: ignore[assignment]
        with contextlib.suppress(OSError):
            self.wfile.write(body[: len(body) // 2])
            tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            os.close(tls.detach())
        return 200

    def _drip(self, *, headers: bool) -> int:
        """200 with a Content-Length, then one byte every `drip_seconds` (of a header line, or of
        the body): every read returns within the socket timeout, the whole never in time."""
        self._record.status = 200
        self.send_response(200)
        self.send_header("Content-Type", "application/pkcs7-mime")
        if headers:
            self.flush_headers()
            trickle = b"X-Padding: " + b"A" * 1200 + b"\r\n"
        else:
            self.send_header("Content-Length", "1200")
            self.close_connection = True
            self.send_header("Connection", "close")
            self.end_headers()
            trickle = b"A" * 1200
        for byte in trickle:
            if self.est.stopping.wait(self.est.options.drip_seconds):
                break
            try:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
            except OSError:
                break
        return 200


def rfc5280_decode(cert: x509.Certificate) -> Any:
    der = cert.public_bytes(serialization.Encoding.DER)
    decoded, _rest = der_decoder.decode(der, asn1Spec=rfc5280.Certificate())
    return decoded


# ---------------------------------------------------------------------------------------------
# Standalone


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, required=True, help="where CA and server files go")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--auth", choices=AUTH_MODES, default="none")
    parser.add_argument("--username", default="device")
    parser.add_argument("--password", default="enroll-secret")
    parser.add_argument("--tls12-only", action="store_true")
    parser.add_argument("--pop-required", action="store_true")
    parser.add_argument("--pending", type=int, default=0, help="202 answers per key first")
    parser.add_argument("--retry-after", default="1")
    parser.add_argument("--lifetime", type=int, default=30 * 86400, help="seconds")
    parser.add_argument("--fault", choices=FAULTS)
    parser.add_argument("--label")
    args = parser.parse_args(argv)
    options = EstOptions(
        auth=args.auth,
        username=args.username,
        password=args.password,
        tls12_only=args.tls12_only,
        pop_required=args.pop_required,
        pending=args.pending,
        retry_after=args.retry_after or None,
        cert_lifetime_seconds=args.lifetime,
        fault=args.fault,
        label=args.label,
    )
    server = EstServer(args.dir, options, port=args.port)
    idevid_key = args.dir / "idevid-ca.key"
    idevid_key.write_bytes(key_pem(server.idevid_ca.key))
    os.chmod(idevid_key, 0o600)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server.start()
    info = {
        "url": server.url,
        "port": server.port,
        "ca_file": str(server.ca_file),
        "fingerprint": server.ca_fingerprint,
        "idevid_ca_file": str(server.idevid_ca_file),
        "idevid_ca_key": str(idevid_key),
        "pid": os.getpid(),
    }
    (args.dir / "server.json").write_text(json.dumps(info))
    print(json.dumps(info), flush=True)
    while not stop.wait(0.5):
        pass
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
