"""Local chat-completions servers for the tests of the OpenAI-compatible backend."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


def send_json(handler: BaseHTTPRequestHandler, status: int, payload: bytes, headers: dict | None = None) -> None:
    """Write one JSON response (a local server's answer)."""
    handler.send_response(status)
    for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(payload)))
    handler.end_headers()
    handler.wfile.write(payload)


@pytest.fixture
def echo_server():
    """A chat-completions server that answers each request with its user message upper-cased, after a short wait;
    it counts the requests in flight, and refuses (HTTP 400) a message that contains a word in `refuse`."""
    state = {"in_flight": 0, "most_in_flight": 0, "asked": [], "refuse": set()}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            text = body["messages"][-1]["content"]
            with lock:
                state["in_flight"] += 1
                state["most_in_flight"] = max(state["most_in_flight"], state["in_flight"])
                state["asked"].append(text)
            time.sleep(0.05)
            refused = any(word in text for word in state["refuse"])
            reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": text.upper()}}]}
            with lock:
                state["in_flight"] -= 1
            send_json(self, 400 if refused else 200, json.dumps({"error": "refused"} if refused else reply).encode())

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", state
    server.shutdown()
    server.server_close()
