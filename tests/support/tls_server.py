"""A TLS server on loopback that requires a client certificate and reports who connected."""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path


class MutualTlsServer:
    """Accepts TLS connections, requires a client cert chaining to `client_ca`, answers with
    the negotiated protocol and the client's subject, then closes. Runs in a thread."""

    def __init__(
        self,
        *,
        cert: Path,
        key: Path,
        client_ca: Path,
        tls_version: ssl.TLSVersion | None = None,
    ) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        ctx.load_verify_locations(cafile=str(client_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
        if tls_version is not None:
            ctx.minimum_version = ctx.maximum_version = tls_version
        self.ctx = ctx
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> MutualTlsServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(5)

    def _serve(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                raw, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            raw.settimeout(5)
            try:
                with self.ctx.wrap_socket(raw, server_side=True) as tls:
                    peer = tls.getpeercert() or {}
                    subject = dict(x[0] for x in peer.get("subject", ()))
                    reply = f"{tls.version()} {subject.get('commonName', '?')}\n"
                    tls.sendall(reply.encode())
            except (ssl.SSLError, OSError) as e:
                self.errors.append(str(e))
                raw.close()


def handshake(ctx: ssl.SSLContext, port: int, host: str = "localhost") -> str:
    """Connect with `ctx`, return the server's one-line reply."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname=host) as tls,
    ):
        data = b""
        while not data.endswith(b"\n"):
            chunk = tls.recv(256)
            if not chunk:
                break
            data += chunk
    return data.decode().strip()
