"""A real HTTP server on 127.0.0.1 for tests, with faults a flaky download site has.

Serves bytes (``{"/path": b"..."}``) or a folder, with ETag, Last-Modified, Range and
If-Range support, and optional faults set on :class:`Faults`. Every request is
recorded in ``server.seen`` so tests can assert what the client asked for::

    with ServedFiles({"/data.bin": payload}, Faults(drop_after=1000)) as server:
        fetch_url(server.url("/data.bin"), dest, sha256=digest)
        assert server.seen[1].headers["Range"] == "bytes=1000-"
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LAST_MODIFIED = "Wed, 01 Jan 2025 00:00:00 GMT"
CHANGED = "Thu, 02 Jan 2025 00:00:00 GMT"  # Last-Modified once Faults.change has happened


def etag_of(body: bytes) -> str:
    """The strong ETag the server sends for ``body``."""
    return '"' + hashlib.sha256(body).hexdigest()[:16] + '"'


@dataclass
class Faults:
    """What to get wrong. Counters are consumed as requests arrive, so tests can say
    "the first request" simply by leaving the default of 1."""

    drop_after: int | None = None  # send this many body bytes, then close the connection
    drop_times: int = 1  # ... on this many responses
    drop_at: list[int] = field(default_factory=list)  # cut when the stream reaches these
    # file offsets, one per response, in order (offsets a response starts past are skipped)
    stall_s: float = 0.0  # before dropping, keep the connection silent this long
    fail_with: list[int] = field(default_factory=list)  # statuses to answer first, in order
    retry_after: str | None = None  # Retry-After header sent with those failures
    ignore_range: bool = False  # always answer 200 with the whole file
    redirects: dict[str, str] = field(default_factory=dict)  # path -> Location (302)
    etag: bool = True  # send ETag
    last_modified: bool = True  # send Last-Modified
    length_delta: int = 0  # Content-Length off by this much; the real bytes are sent whole
    range_shift: int = 0  # a 206 starts this many bytes after the requested start ...
    range_lie: bool = False  # ... while its Content-Range claims the requested one (the
    # bytes are then the claimed length, read from the shifted start, wrapping around)
    ignore_if_range: bool = False  # honour Range even when If-Range names an old version
    change: dict[str, bytes] = field(default_factory=dict)  # path -> new bytes (new ETag and
    change_after: int = 1  # Last-Modified), served from the request after this many requests


@dataclass(frozen=True)
class Seen:
    """One request as the server received it."""

    method: str
    path: str
    headers: dict[str, str]


class ServedFiles:
    """Context manager running a ThreadingHTTPServer on a free loopback port."""

    def __init__(self, content: dict[str, bytes] | Path, faults: Faults | None = None) -> None:
        self.content = content
        self.faults = faults or Faults()
        self.seen: list[Seen] = []
        self.answers: list[int] = []  # the status of every response, in order
        self.last_modified = LAST_MODIFIED
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self) -> ServedFiles:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def requests_for(self, path: str) -> list[Seen]:
        return [seen for seen in self.seen if seen.path == path]

    def body(self, path: str) -> bytes | None:
        """The bytes served at ``path``, or None (404)."""
        if isinstance(self.content, dict):
            return self.content.get(path)
        root = Path(self.content).resolve()
        file = (root / unquote(path).lstrip("/")).resolve()
        if root not in file.parents or not file.is_file():
            return None
        return file.read_bytes()

    def _take(self, what: str, start: int = 0) -> int | None:
        """Consume one scheduled fault: a failure status, or a connection drop (the number
        of body bytes to send for a response starting at file offset ``start``)."""
        with self._lock:
            faults = self.faults
            if what == "fail" and faults.fail_with:
                return faults.fail_with.pop(0)
            if what == "drop" and faults.drop_after is not None and faults.drop_times > 0:
                faults.drop_times -= 1
                return faults.drop_after
            if what == "drop":
                while faults.drop_at and faults.drop_at[0] <= start:
                    faults.drop_at.pop(0)
                if faults.drop_at:
                    return faults.drop_at.pop(0) - start
            return None

    def _maybe_change(self) -> None:
        """Replace the files named in ``Faults.change`` once enough requests have come."""
        with self._lock:
            faults = self.faults
            if faults.change and len(self.seen) > faults.change_after:
                assert isinstance(self.content, dict), "Faults.change needs served bytes"
                self.content = {**self.content, **faults.change}
                faults.change = {}
                self.last_modified = CHANGED


def _handler_for(server: ServedFiles) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self._serve(send_body=True)

        def do_HEAD(self) -> None:  # noqa: N802
            self._serve(send_body=False)

        def log_message(self, format: str, *args: object) -> None:  # quiet test output
            pass

        def send_response(self, code: int, message: str | None = None) -> None:
            server.answers.append(code)
            super().send_response(code, message)

        def _serve(self, send_body: bool) -> None:
            path = urlsplit(self.path).path
            server.seen.append(Seen(self.command, path, dict(self.headers.items())))
            server._maybe_change()
            faults = server.faults
            status = server._take("fail")
            if status is not None:
                self.send_response(status)
                if faults.retry_after is not None:
                    self.send_header("Retry-After", faults.retry_after)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if path in faults.redirects:
                self.send_response(302)
                self.send_header("Location", faults.redirects[path])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = server.body(path)
            if body is None:
                self.send_error(404)
                return

            etag = etag_of(body)
            start = self._range_start(etag, len(body))
            if start is not None and start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if start is None:
                self.send_response(200)
                start = 0
            else:
                self.send_response(206)
                if not faults.range_lie:  # says where it starts, just not where it was asked
                    start = min(start + faults.range_shift, len(body) - 1)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.send_header("Content-Length", str(len(body) - start + faults.length_delta))
            self.send_header("Accept-Ranges", "none" if faults.ignore_range else "bytes")
            if faults.etag:
                self.send_header("ETag", etag)
            if faults.last_modified:
                self.send_header("Last-Modified", server.last_modified)
            self.end_headers()
            if not send_body:
                return
            payload = body[start:]
            if start and faults.range_lie:  # the claimed length, from the wrong place
                payload = (body[start + faults.range_shift :] + body)[: len(body) - start]
            if faults.length_delta:
                self.close_connection = True  # the length is wrong: end the body by closing
            drop = server._take("drop", start)
            if drop is not None:
                self.wfile.write(payload[:drop])
                self.wfile.flush()
                time.sleep(faults.stall_s)
                self.close_connection = True
                return
            self.wfile.write(payload)

        def _range_start(self, etag: str, size: int) -> int | None:
            """Start of a satisfiable-or-not ``bytes=N-`` range to honour, else None."""
            match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", "").strip())
            if not match or server.faults.ignore_range:
                return None
            if_range = self.headers.get("If-Range")
            current = {
                etag if server.faults.etag else None,
                server.last_modified if server.faults.last_modified else None,
            }
            if if_range is not None and if_range not in current:
                if not server.faults.ignore_if_range:
                    return None  # the file changed: RFC 9110 says send it whole
            return int(match[1])

    return Handler
