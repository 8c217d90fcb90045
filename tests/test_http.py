"""`http.download_to`, against a local server that drops connections, ignores or honours Range, and refuses."""
from __future__ import annotations

import http.server
import os
import random
import threading
import time

import pytest

from helpers.http import backoff_delay, download_to

PAYLOAD = random.Random(0).randbytes(3 * 2**20 + 17)  # three chunks and a bit: a drop lands mid-file


@pytest.fixture
def server():
    """A file server run by a script: one behaviour per request, in order (then "serve"); records each Range."""
    state = {"script": [], "ranges": [], "encodings": []}

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            asked = self.headers.get("Range")
            state["ranges"].append(asked)
            state["encodings"].append(self.headers.get("Accept-Encoding"))
            how = state["script"].pop(0) if state["script"] else "serve"
            if how in ("503", "403"):
                self.send_response(int(how))
                self.send_header("Retry-After", "0")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start = int(asked.split("=")[1].rstrip("-")) if asked and how != "ignore_range" else 0
            if start >= len(PAYLOAD):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(PAYLOAD)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = PAYLOAD[start:]
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if how == "slow":
                time.sleep(0.5)
            if how == "drop":  # half the body, then the connection goes
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                return
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    state["url"] = f"http://127.0.0.1:{httpd.server_port}/api/download/models/21"
    yield state
    httpd.shutdown()


def _fetch(server, target, **kwargs):
    waits = []
    kwargs = {"progress": False, "sleep": waits.append, **kwargs}
    return download_to(server["url"], target, **kwargs), waits


def test_a_dropped_connection_and_a_busy_server_are_retried_and_the_rest_is_asked_for(server, tmp_path):
    server["script"] = ["503", "drop"]
    target = tmp_path / "weights" / "21.safetensors"
    path, waits = _fetch(server, target)
    assert path == target and target.read_bytes() == PAYLOAD
    assert server["ranges"][:2] == [None, None] and len(server["ranges"]) == 3
    resumed_at = int(server["ranges"][2].split("=")[1].rstrip("-"))  # what had arrived before the drop
    assert 0 < resumed_at <= len(PAYLOAD) // 2
    # Retry-After 0 for the 503, then the second attempt's own schedule for the drop: 2 s · 2¹ ± 50 %
    assert waits[0] == 0.0 and 2.0 <= waits[1] <= 6.0 and len(waits) == 2
    assert os.listdir(target.parent) == ["21.safetensors"]  # no part or lock left over
    assert set(server["encodings"]) == {"identity"}  # byte counts and offsets are the file's, never a compressed body


def test_a_rerun_asks_only_for_what_the_stopped_run_did_not_fetch(server, tmp_path):
    target = tmp_path / "21.safetensors"
    target.with_name("21.safetensors.part").write_bytes(PAYLOAD[:1000])
    _fetch(server, target)
    assert server["ranges"] == ["bytes=1000-"] and target.read_bytes() == PAYLOAD
    # a part that already holds everything (the run stopped before renaming it) is renamed, nothing is sent
    again = tmp_path / "again.safetensors"
    again.with_name("again.safetensors.part").write_bytes(PAYLOAD)
    _fetch(server, again)
    assert server["ranges"][-1] == f"bytes={len(PAYLOAD)}-" and again.read_bytes() == PAYLOAD
    # once the file is there nothing is fetched
    _fetch(server, target)
    assert len(server["ranges"]) == 2


def test_two_runs_fetching_one_file_take_turns_and_the_second_finds_it(server, tmp_path):
    server["script"] = ["slow"]  # the first answer takes a while, so the second run arrives during it
    target = tmp_path / "21.safetensors"
    results = []
    runs = [threading.Thread(target=lambda: results.append(_fetch(server, target)[0])) for _ in range(2)]
    for run in runs:
        run.start()
    for run in runs:
        run.join(timeout=60)
    assert results == [target, target] and target.read_bytes() == PAYLOAD
    assert server["ranges"] == [None] and os.listdir(tmp_path) == ["21.safetensors"]


def test_a_server_that_ignores_range_sends_the_whole_file_which_replaces_the_part(server, tmp_path):
    server["script"] = ["ignore_range"]
    target = tmp_path / "21.safetensors"
    target.with_name("21.safetensors.part").write_bytes(b"x" * 5000)
    _fetch(server, target)
    assert server["ranges"] == ["bytes=5000-"] and target.read_bytes() == PAYLOAD


def test_refusal_raises_at_once_and_giving_up_keeps_the_part_for_the_next_run(server, tmp_path):
    server["script"] = ["403"]
    with pytest.raises(PermissionError, match="Civitai refused model version 21 \\(403\\); set CIVITAI_API_TOKEN"):
        _fetch(server, tmp_path / "21.safetensors",
               refused="Civitai refused model version 21 ({status}); set CIVITAI_API_TOKEN")
    assert len(server["ranges"]) == 1  # no retry
    server["script"] = ["drop", "drop", "drop"]
    target = tmp_path / "22.safetensors"
    with pytest.raises(ConnectionError, match="no complete download after 3 attempts .* a rerun asks only for the rest"):
        _fetch(server, target, attempts=3)
    kept = target.with_name("22.safetensors.part").stat().st_size
    assert 0 < kept < len(PAYLOAD) and not target.exists()
    _fetch(server, target)
    assert server["ranges"][-1] == f"bytes={kept}-" and target.read_bytes() == PAYLOAD


def test_backoff_follows_retry_after_then_doubles_with_jitter_under_the_cap():
    rng = random.Random(0)
    assert backoff_delay(3, "7", base=2.0, cap=60.0, rng=rng) == 7.0
    assert backoff_delay(0, "600", base=2.0, cap=60.0, rng=rng) == 60.0
    delays = [backoff_delay(attempt, None, base=2.0, cap=60.0, rng=rng) for attempt in range(8)]
    assert all(0.5 * min(60.0, 2.0 * 2**a) <= d <= 1.5 * min(60.0, 2.0 * 2**a) for a, d in enumerate(delays))


def test_room_is_made_for_the_whole_file_and_a_full_disk_is_refused_before_a_byte(server, tmp_path, monkeypatch):
    import errno
    import shutil
    from collections import namedtuple

    target = tmp_path / "weights" / "21.safetensors"
    target.parent.mkdir()
    (target.parent / "21.safetensors.part").write_bytes(PAYLOAD[:1000])  # a rerun: 1,000 bytes are here already
    asked_room = []
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 5000, 5000))
    with pytest.raises(OSError, match=r"21.safetensors needs 0.00 GB more and .* has 0.00 GB free: move it") as caught:
        _fetch(server, target, make_room=asked_room.append, no_room="move it")
    assert caught.value.errno == errno.ENOSPC and not target.exists()
    assert asked_room == [len(PAYLOAD)] and server["ranges"] == ["bytes=1000-"]  # room for the whole file
    assert (target.parent / "21.safetensors.part").read_bytes() == PAYLOAD[:1000]  # nothing written, nothing lost
    # with the room made (the callback freed it), the same rerun completes from the part
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 0, len(PAYLOAD) - 1000))
    path, _ = _fetch(server, target, make_room=asked_room.append)
    assert path.read_bytes() == PAYLOAD and server["ranges"][-1] == "bytes=1000-"
