"""Neutron stand-in on 127.0.0.1: enough for Nova with ``networks: "none"``.

Nova asks Neutron even for a server without networks (the server's ports for its security
groups, the ports and networks of a server being stopped, started or deleted), so it needs
something that answers:

- ``GET /`` and ``GET /v2.0``: version documents;
- ``GET /v2.0/<collection>``: ``{"<collection>": []}`` (nothing exists);
- ``GET /v2.0/<collection>/<id>``, every write: 404.

    python -m tests.nova.neutron_stub PORT
"""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _send(self, code: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = urlsplit(self.path).path.rstrip("/")
        port = self.server.server_address[1]
        if path == "":
            self._send(200, {"versions": [{"id": "v2.0", "status": "CURRENT",
                                           "links": [{"rel": "self", "href": f"http://127.0.0.1:{port}/v2.0/"}]}]})
        elif path == "/v2.0":
            self._send(200, {"resources": []})
        elif path.startswith("/v2.0/") and path.count("/") == 2:
            self._send(200, {path[6:].removesuffix(".json").replace("-", "_"): []})
        else:
            self._not_found(path)

    def _not_found(self, path: str) -> None:
        self._send(404, {"NeutronError": {"type": "NotFound", "message": f"{path}: not in the stub", "detail": ""}})

    def _refuse(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self._not_found(urlsplit(self.path).path)

    do_POST = do_PUT = do_DELETE = _refuse  # noqa: N815

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - http.server's signature
        sys.stderr.write("neutron-stub " + (format % args) + "\n")


def main() -> None:
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()


if __name__ == "__main__":
    main()
