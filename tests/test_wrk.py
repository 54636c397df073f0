"""The independent load client (dynamix_ray/serve/wrk.py): real wrk against
a small HTTP server on 127.0.0.1 that records what it got, so every posted
body, the method and the status counts are checked end to end."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dynamix_ray.serve.wrk import parse_wrk, run_wrk


@pytest.fixture
def server():
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            code = 503 if body["user_id"] == 3 else 200
            out = b"{}"
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *a):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/rank", seen
    httpd.shutdown()
    httpd.server_close()


def test_wrk_posts_every_body_in_turn_and_counts_statuses(server):
    url, seen = server
    bodies = [json.dumps({"user_id": u, "ts": 1}).encode() for u in (1, 2, 3)]
    r = run_wrk(url, bodies, connections=2, duration_s=1)
    assert r["requests"] > 10 and r["qps"] > 0
    # what wrk counted is what the server answered (a request cut off at
    # the end may have reached the server unanswered)
    assert r["answered"] == r["requests"]
    assert len(seen) >= r["answered"]
    assert {b["user_id"] for b in seen} == {1, 2, 3}
    assert r["codes"]["503"] > 0 and r["ok"] == r["codes"]["200"]
    assert abs(r["codes"]["503"] - r["answered"] / 3) <= 4  # round-robin
    assert 0 < r["p50_ms"] <= r["p99_ms"] <= r["max_ms"]


def test_wrk_refuses_a_non_loopback_target_and_a_multiline_body():
    with pytest.raises(ValueError, match="loopback"):
        run_wrk("http://10.1.2.3:8000/rank", [b"{}"], 1, 1)
    with pytest.raises(ValueError, match="spans lines"):
        run_wrk("http://127.0.0.1:9/rank", [b"{\n}"], 1, 1)


def test_a_failed_wrk_run_says_what_it_printed():
    with pytest.raises(RuntimeError, match="no summary:\n.*refused"):
        parse_wrk("unable to connect to 127.0.0.1:9 Connection refused\n")
