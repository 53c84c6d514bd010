#!/usr/bin/env python3
"""A stand-in for Heap's API on this machine, for trying the relay without a Heap account.

Answers 200 to every POST (as Heap does) and prints each request as one JSON line on standard
output: {"path": "/api/track", "body": {...}}. Nothing leaves the machine.

    python3 scripts/heap-sink.py [PORT]        (default 8081, on 127.0.0.1)
"""

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Sink(BaseHTTPRequestHandler):
    def do_POST(self):
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw.decode("utf-8", "replace")
        print(json.dumps({"path": self.path, "body": body}), flush=True)
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass  # one line per request on stdout is enough


def main():
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8081
    server = ThreadingHTTPServer(("127.0.0.1", port), Sink)
    print(f"heap-sink: listening on http://127.0.0.1:{port}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
