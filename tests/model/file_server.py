"""Test helper: a real HTTP file server on loopback with Range support, request log and faults.

    with FileServer({"/net.pkl": blob}) as server:
        server.url("/net.pkl")
        server.drop_after["/net.pkl"] = 1000   # the next GET of it sends 1000 bytes, then closes
        server.fail_next["/net.pkl"] = 503     # the next GET of it answers 503
        server.delay_s = 0.2                   # a pause per chunk (to make concurrent starters overlap)
        server.requests                         # [(path, range header or None)], in order
        server.sent_bytes                       # body bytes written, all requests together
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FileServer:
    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = dict(files)
        self.drop_after: dict[str, int] = {}
        self.fail_next: dict[str, int] = {}  # path -> HTTP status of its next answer
        self.delay_s = 0.0
        self.chunk = 1 << 14
        self.requests: list[tuple[str, str | None]] = []
        self.sent_bytes = 0
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}{path}"

    def full_gets(self, path: str) -> int:
        return sum(1 for p, r in self.requests if p == path and r is None)

    def __enter__(self) -> FileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                path = self.path.split("?", 1)[0]
                range_header = self.headers.get("Range")
                with server.lock:
                    server.requests.append((path, range_header))
                    drop = server.drop_after.pop(path, None)
                    fail = server.fail_next.pop(path, None)
                if fail is not None:
                    self.send_error(fail)
                    return
                blob = server.files.get(path)
                if blob is None:
                    self.send_error(404)
                    return
                etag = '"' + hashlib.sha256(blob).hexdigest()[:16] + '"'
                start = 0
                match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
                if match and self.headers.get("If-Range", etag) == etag:
                    start = int(match.group(1))
                    if start >= len(blob):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(blob)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(blob) - 1}/{len(blob)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(blob) - start))
                self.send_header("ETag", etag)
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                end = len(blob) if drop is None else min(len(blob), start + drop)
                pos = start
                try:
                    while pos < end:
                        piece = blob[pos:min(end, pos + server.chunk)]
                        self.wfile.write(piece)
                        pos += len(piece)
                        with server.lock:
                            server.sent_bytes += len(piece)
                        if server.delay_s:
                            time.sleep(server.delay_s)
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    return
                if drop is not None:
                    self.close_connection = True
                    self.connection.shutdown(2)  # the peer sees the body end early

        return Handler
