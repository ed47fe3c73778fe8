"""A download server for firmware tests and benches: HTTPS (or plain HTTP) on 127.0.0.1, a
free port, serving routes that behave well or badly on purpose.

Routes (`server.routes[path] = Route(...)`): a body served whole, cut short after `cut` bytes
(Content-Length still names the whole body), trickled one byte every `trickle_seconds`, a
redirect, or an error status. Files are served from disk in chunks (large bundles for the
bench). Runs in a thread (`with FwServer(...) as s:`), or as a process for the bench:
`python -m tests.support.fw_http_server CERT KEY FILE` prints the port, serves FILE at /bundle.fw.
"""

from __future__ import annotations

import socket
import ssl
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


@dataclass
class Route:
    body: bytes = b""
    file: Path | None = None
    status: int = 200
    location: str = ""
    #: send only this many body bytes, then close (Content-Length names the whole body)
    cut: int | None = None
    #: send the body one byte at a time with this pause between bytes
    trickle_seconds: float = 0.0
    #: no Content-Length: the body ends when the connection closes
    no_length: bool = False


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, owner: FwServer) -> None:
        self.owner = owner
        super().__init__(("127.0.0.1", 0), _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        request.settimeout(10)
        ctx = self.owner.ctx
        if ctx is not None:
            try:
                request = ctx.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError):
                request.close()
                return  # e.g. the client did not trust us
        try:
            _Handler(request, client_address, self)
        except (ssl.SSLError, OSError):
            pass
        finally:
            request.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        owner = self.server.owner
        owner.requests.append(self.path)
        route = owner.routes.get(self.path.split("?", 1)[0])
        if route is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if route.location:
            self.send_response(route.status or 302)
            self.send_header("Location", route.location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        size = route.file.stat().st_size if route.file else len(route.body)
        self.send_response(route.status)
        if not route.no_length:
            self.send_header("Content-Length", str(size))
        else:
            self.send_header("Connection", "close")
        self.end_headers()
        if route.status != 200:
            return
        if route.trickle_seconds:
            for i in range(size):
                if owner.stopping.wait(route.trickle_seconds):
                    return
                self.wfile.write(route.body[i : i + 1])
                self.wfile.flush()
            return
        limit = size if route.cut is None else route.cut
        if route.file is not None:
            with open(route.file, "rb") as f:
                sent = 0
                while sent < limit and (chunk := f.read(min(1 << 20, limit - sent))):
                    self.wfile.write(chunk)
                    sent += len(chunk)
        else:
            self.wfile.write(route.body[:limit])
        if route.cut is not None or route.no_length:
            self.close_connection = True


class FwServer:
    """`tls=(cert, key)` for HTTPS, None for plain HTTP."""

    def __init__(self, tls: tuple[Path, Path] | None) -> None:
        self.ctx: ssl.SSLContext | None = None
        if tls is not None:
            self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.ctx.load_cert_chain(*tls)
        self.routes: dict[str, Route] = {}
        self.requests: list[str] = []
        self.stopping = threading.Event()
        self.httpd = _Server(self)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str, host: str = "localhost") -> str:
        scheme = "https" if self.ctx is not None else "http"
        return f"{scheme}://{host}:{self.port}{path}"

    def __enter__(self) -> FwServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)


def main(argv: list[str]) -> int:
    cert, key, file = (Path(a) for a in argv)
    server = FwServer((cert, key))
    server.routes["/bundle.fw"] = Route(file=file)
    with server:
        print(server.port, flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
