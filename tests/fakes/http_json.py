"""What every fake HTTP API of ours needs from http.server (tests/fakes/hub_api.py,
kaggle_api.py): the requests recorded for the tests to read, a request's body whether sized or
chunked (huggingface_hub and kaggle's clients send both), and a reply with a JSON or bytes body."""

from __future__ import annotations

import json
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any, Optional


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body or b"{}")


class JSONHandler(BaseHTTPRequestHandler):
    """A handler of one fake, `fake` (set by the fake's handler factory; it has `requests` and
    `lock`): keep-alive HTTP/1.1, quiet."""

    protocol_version = "HTTP/1.1"
    fake: Any

    def log_message(self, *args: Any) -> None:  # quiet: the tests read fake.requests
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, payload: Any = None, *, content_type: str = "application/json",
              headers: Optional[dict[str, str]] = None) -> None:
        data = payload if isinstance(payload, bytes) else b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _record(self, body: bytes) -> None:
        with self.fake.lock:
            self.fake.requests.append(Recorded(self.command, self.path, {k.lower(): v for k, v in self.headers.items()},
                                               body))
