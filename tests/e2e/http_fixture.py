"""A local HTTP/HTTPS server for agent.http tests (started by the tests, in a thread).

Endpoints:
  /status/N          status N, body "status N"
  /headers           the request's headers as JSON; responds with X-Test and two Set-Cookie
  /header?name=N&value=V   responds with the header N: V (name sent as given)
  /echo              method, query string, body and content type of the request as JSON
  /bytes?size=N      N bytes with Content-Length
  /chunked?size=N    N bytes, chunked transfer encoding
  /redirect?n=K      302 to /redirect?n=K-1, and /status/200 at 0
  /conn              the client's port (a new port means a new connection)
  /slow?ms=N         status 200 after N milliseconds, body "slow"
  /drop-second       status 200 for the first request on a connection; a later request on the
                     same connection is read and the connection closed without an answer (a
                     client retries such a request on a new connection)
  /close             status 200, body "closing", then the server closes the connection without
                     having said so (no "Connection: close"): the client's next request on it
                     finds it dead
  /hang              reads the request and never answers
  /shut-idle?delay_ms=N&marker=PATH
                     closes the server's side (shutdown SHUT_WR: an end of stream the client
                     sees) of every connection it holds: without delay_ms the others before the
                     answer and this one with it (as /shut-after), else every one N ms after
                     answering; then writes PATH (when given)
  /shut-after        status 200, body "shut", and the end of stream in the same segment as the
                     answer (TCP_CORK, then shutdown SHUT_WR): the connection is closed unasked
A request read on a connection whose side the server closed is counted in `after_shut` and not
answered (a client must never send one: it saw the end of stream, or it retries the request on
a new connection).
"""
import json
import os
import socket
import socketserver
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive

    def log_message(self, fmt, *args):
        pass

    def setup(self):
        super().setup()
        with self.server.lock:
            self.server.connections.add(self.connection)

    def finish(self):
        with self.server.lock:
            self.server.connections.discard(self.connection)
        super().finish()

    def _send(self, status, body, ctype="text/plain", extra=()):
        data = body if isinstance(body, bytes) else body.encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _send_and_shut(self, body):
        """Answers 200 with the end of stream in the same segment as the answer."""
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
        self._send(200, body)
        with self.server.lock:
            self.server.shut.add(self.connection)
        self.connection.shutdown(socket.SHUT_WR)  # sends the corked answer and the FIN

    def _body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _route(self):
        url = urlparse(self.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        body = self._body()
        with self.server.lock:
            after_shut = self.connection in self.server.shut
            if after_shut:
                self.server.after_shut += 1
        if after_shut:
            self.close_connection = True
            return None
        self.server.requests += 1
        self.on_connection = getattr(self, "on_connection", 0) + 1  # one handler per connection
        if url.path.startswith("/status/"):
            n = int(url.path.split("/")[2])
            return self._send(n, "" if n == 204 else f"status {n}")
        if url.path == "/headers":
            return self._send(200, json.dumps(dict(self.headers.items())), "application/json",
                              [("X-Test", "yes"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")])
        if url.path == "/header":
            return self._send(200, "header", extra=[(q["name"], q["value"])])
        if url.path == "/echo":
            return self._send(200, json.dumps({
                "method": self.command, "query": url.query, "body": body.decode(),
                "content_type": self.headers.get("Content-Type")}), "application/json")
        if url.path == "/bytes":
            return self._send(200, b"x" * int(q.get("size", "0")), "application/octet-stream")
        if url.path == "/chunked":
            size = int(q.get("size", "0"))
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = b"y" * 65536
            left = size
            while left > 0:
                part = chunk[:min(left, len(chunk))]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                left -= len(part)
            self.wfile.write(b"0\r\n\r\n")
            return None
        if url.path == "/redirect":
            n = int(q.get("n", "0"))
            target = f"/redirect?n={n - 1}" if n > 0 else "/status/200"
            return self._send(302, "", extra=[("Location", target)])
        if url.path == "/slow":
            time.sleep(int(q.get("ms", "0")) / 1000)
            return self._send(200, "slow")
        if url.path == "/drop-second":
            if self.on_connection > 1:
                self.close_connection = True
                return None
            return self._send(200, "first on its connection")
        if url.path == "/close":
            self._send(200, "closing")
            self.close_connection = True
            return None
        if url.path == "/shut-idle":
            delay = int(q.get("delay_ms", "0")) / 1000
            if delay == 0:
                self.server.shut_idle(self.connection)
                return self._send_and_shut("shut")
            threading.Timer(delay, self.server.shut_idle, (None, q.get("marker"))).start()
            return self._send(200, "later")
        if url.path == "/shut-after":
            return self._send_and_shut("shut")
        if url.path == "/conn":
            return self._send(200, str(self.client_address[1]))
        if url.path == "/hang":
            self.server.hanging.set()
            self.server.release.wait(120)
            self.close_connection = True
            return None
        return self._send(404, "not found")

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = _route


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        pass  # clients that hang up early (the body cap, TLS rejections) are expected

    def __init__(self, tls_context=None):
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests = 0
        self.lock = threading.Lock()
        self.connections = set()  # the connections a handler serves
        self.shut = set()  # those whose side the server closed
        self.after_shut = 0  # requests read on one of those
        self.hanging = threading.Event()
        self.release = threading.Event()
        if tls_context is not None:
            self.socket = tls_context.wrap_socket(self.socket, server_side=True)
        self.scheme = "https" if tls_context is not None else "http"
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    def shut_idle(self, keep=None, marker=None):
        """Closes the server's side (SHUT_WR) of every connection but keep (the tests call it
        while the client's connections are idle); writes marker, if given; returns the count."""
        with self.lock:
            idle = [c for c in self.connections if c is not keep and c not in self.shut]
            for c in idle:
                self.shut.add(c)
                try:
                    c.shutdown(socket.SHUT_WR)
                except OSError:
                    pass  # the client has just closed it
        if marker:
            with open(marker, "w") as f:
                f.write(str(len(idle)))
        return len(idle)

    @property
    def base(self):
        host = "localhost" if self.scheme == "https" else "127.0.0.1"
        return f"{self.scheme}://{host}:{self.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.shutdown()
        self.server_close()


def self_signed_cert(directory):
    """A self-signed certificate for localhost; returns (cert_path, key_path)."""
    cert = os.path.join(directory, "cert.pem")
    key = os.path.join(directory, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                    "-out", cert, "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    return cert, key


def tls_context(cert, key):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx
