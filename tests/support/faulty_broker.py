"""A misbehaving "broker" on loopback for the channel's network faults (mosquitto cannot do them):
it counts the connections it accepts (with the monotonic time of each) and then misbehaves.

Faults: a certificate for another host name, an expired one, a man in the middle with a chain
from another CA (for the right name), only TLS 1.1 (OpenSSL 3 offers it at @SECLEVEL=0), the
handshake dripped a byte every `drip_seconds` (a TLS record header announcing 16 KiB, then
zeros: the client waits for the record's end), a TCP reset right after the accept. Every
connection gets its own thread; stopped by closing the socket.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import socket
import ssl
import struct
import threading
import time
import warnings
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.support.ca import TestCA, key_pem, pem, utcnow

FAULTS = ("other-host", "expired-cert", "rogue-ca", "tls1.1-only", "drip-handshake", "reset")
#: a TLS handshake record header (TLS 1.2 record version) announcing 16384 bytes
_RECORD_HEADER = b"\x16\x03\x03\x40\x00"


class FaultyBroker:
    def __init__(self, directory: Path, fault: str, *, drip_seconds: float = 1.0) -> None:
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}")
        directory.mkdir(parents=True, exist_ok=True)
        self.fault = fault
        self.drip_seconds = drip_seconds
        self.ca = TestCA(name="devid test broker CA")  # what the device trusts (mqtt.ca_file)
        self.ca_file = self.ca.write_cert(directory / "broker-ca.pem")
        self.ctx = self._context(directory) if fault not in ("drip-handshake", "reset") else None
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted: list[float] = []  # time.monotonic() of each accepted connection
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._handlers: list[threading.Thread] = []

    @property
    def url(self) -> str:
        return f"mqtts://localhost:{self.port}"

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self.accepted)

    def __enter__(self) -> FaultyBroker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(5)
        for t in self._handlers:
            t.join(5)

    def _context(self, directory: Path) -> ssl.SSLContext:
        fault = self.fault
        issuer = TestCA(name="devid rogue broker CA") if fault == "rogue-ca" else self.ca
        names: list[x509.GeneralName] = [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]
        start, lifetime = utcnow() - dt.timedelta(minutes=5), dt.timedelta(days=365)
        if fault == "other-host":
            names = [x509.DNSName("mqtt.other")]
        elif fault == "expired-cert":
            start, lifetime = utcnow() - dt.timedelta(days=2), dt.timedelta(days=1)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = issuer.issue(
            key.public_key(),
            subject="mqtt.other" if fault == "other-host" else "localhost",
            eku=[ExtendedKeyUsageOID.SERVER_AUTH],
            sans=names,
            not_before=start,
            lifetime=lifetime,
        )
        # a man in the middle sends its whole chain; a broker its own without the root
        chain = [cert, *issuer.chain()] if fault == "rogue-ca" else [cert, *issuer.chain()[:-1]]
        cert_path, key_path = directory / f"{fault}.crt", directory / f"{fault}.key"
        cert_path.write_bytes(b"".join(pem(c) for c in chain))
        key_path.write_bytes(key_pem(key))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert_path, key_path)
        if fault == "tls1.1-only":
            with warnings.catch_warnings():  # "ssl.TLSVersion.TLSv1_1 is deprecated"
                warnings.simplefilter("ignore", DeprecationWarning)
                ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 offers TLS 1.1 only so
                ctx.minimum_version = ssl.TLSVersion.TLSv1_1
                ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        return ctx

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()  # blocking: the time is taken as it arrives
            except OSError:
                return
            with self._lock:
                self.accepted.append(time.monotonic())
            handler = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            self._handlers.append(handler)
            handler.start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            if self.fault == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return  # closed with linger 0: an RST
            conn.settimeout(10)
            if self.fault == "drip-handshake":
                self._drip(conn)
                return
            assert self.ctx is not None
            with self.ctx.wrap_socket(conn, server_side=True):
                pass
        except (ssl.SSLError, OSError) as e:
            self.errors.append(str(e))
        finally:
            conn.close()

    def _drip(self, conn: socket.socket) -> None:
        conn.recv(4096)  # the ClientHello
        data = _RECORD_HEADER + bytes(1 << 14)
        for i in range(len(data)):
            if self._stop.wait(self.drip_seconds):
                return
            conn.sendall(data[i : i + 1])
