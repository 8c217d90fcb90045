"""The Civitai client and crawler against the local server, over real HTTP on 127.0.0.1."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import civitai
from helpers.civitai_catalog import Catalog, CatalogSpec
from helpers.civitai_server import Faults, LocalCivitai

SMALL = CatalogSpec(num_models=60, images_per_version=(2, 6), seed=3)
FAULTS = Faults(p_429=0.06, burst=3, retry_after=0, p_500=0.05, p_drop=0.05, malformed_pages=3, seed=11)


@pytest.fixture(scope="module")
def catalog():
    return Catalog(SMALL)


def _client(server, **kw):
    return civitai.CivitaiClient(server.url, min_interval=0, backoff_base=0.001, **kw)


def _ids(folder: Path) -> dict[str, list]:
    return {name: [r["hash" if name.startswith("versions") else "id"] for r in civitai.read_jsonl(folder / name)]
            for name in civitai.CRAWL_FILES}


@pytest.fixture(scope="module")
def reference(catalog, tmp_path_factory):
    """A fault-free crawl: the ids every other crawl must reproduce."""
    folder = tmp_path_factory.mktemp("reference")
    with LocalCivitai(catalog) as server:
        summary = civitai.crawl(_client(server), folder, images_per_model=8, progress=False)
    assert summary["finished"] and summary["retries"] == 0
    return _ids(folder)


def test_reference_crawl_is_complete_and_unique(reference, catalog):
    assert sorted(reference["models.jsonl"]) == sorted(m["id"] for m in catalog.models)
    for ids in reference.values():
        assert len(ids) == len(set(ids)) > 0


def test_faults_change_nothing_in_what_is_crawled(catalog, reference, tmp_path):
    with LocalCivitai(catalog, faults=FAULTS) as server:
        client = _client(server)
        summary = civitai.crawl(client, tmp_path, images_per_model=8, progress=False)
        injected = dict(server.stats.injected)
    assert summary["finished"]
    assert all(count > 0 for count in injected.values()), injected  # every kind of fault really happened
    assert client.stats.retries == sum(injected.values())
    assert {"HTTP 429", "HTTP 500", "ConnectionError", "malformed JSON"} <= set(client.stats.failures)
    assert _ids(tmp_path) == reference  # same ids, same order, no loss, no duplicates


@pytest.mark.parametrize("stop_after", [3, 41, 97])
def test_a_stopped_crawl_resumes_to_the_same_ids(catalog, reference, tmp_path, stop_after):
    with LocalCivitai(catalog, faults=FAULTS) as server:
        first = civitai.crawl(_client(server), tmp_path, images_per_model=8, progress=False,
                              stop_after_requests=stop_after)
        assert not first["finished"]
        assert civitai.crawl(_client(server), tmp_path, images_per_model=8, progress=False)["finished"]
    assert _ids(tmp_path) == reference


def test_a_killed_crawl_process_resumes_to_the_same_ids(catalog, reference, tmp_path):
    """SIGKILL a real `t2ibook crawl` midway (no chance to clean up), then resume it."""
    env = {k: v for k, v in os.environ.items() if k != civitai.TOKEN_ENV}
    with LocalCivitai(catalog) as server:
        command = [sys.executable, "-m", "helpers.cli", "crawl", "--base-url", server.url, "--out", str(tmp_path),
                   "--images-per-model", "8", "--min-interval", "0.01"]
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline and len(json.loads((tmp_path / "checkpoint.json").read_text()).get(
                "images", {}) if (tmp_path / "checkpoint.json").exists() else {}) < 15:
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
        state = json.loads((tmp_path / "checkpoint.json").read_text())
        assert not state["hashes_done"], "the crawl finished before it could be killed"
        resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _ids(tmp_path) == reference


def test_a_torn_last_line_is_dropped_on_resume(tmp_path):
    path = tmp_path / "images.jsonl"
    path.write_text('{"id": 1}\n{"id": 2}\n{"id": 3, "ur')
    lines = civitai.JsonlById(path)
    assert lines.seen == {1, 2}
    assert lines.add([{"id": 2}, {"id": 3}]) == 1
    assert [r["id"] for r in civitai.read_jsonl(path)] == [1, 2, 3]


def test_other_parameters_need_a_restart(catalog, tmp_path):
    with LocalCivitai(catalog) as server:
        civitai.crawl(_client(server), tmp_path, images_per_model=2, max_models=5, progress=False)
        with pytest.raises(ValueError, match="holds a crawl with"):
            civitai.crawl(_client(server), tmp_path, images_per_model=3, max_models=5, progress=False)
        summary = civitai.crawl(_client(server), tmp_path, images_per_model=3, max_models=5, progress=False,
                                restart=True)
    assert summary["models"] == 5 and summary["finished"]


def test_retry_after_is_honoured(catalog):
    with LocalCivitai(catalog, faults=Faults(initial_burst=3, retry_after=0.2)) as server:
        client = _client(server)
        started = time.monotonic()
        client.get("models", {"limit": 1})
    assert client.stats.retries == 3
    assert client.stats.waited_s == pytest.approx(0.6)
    assert time.monotonic() - started >= 0.6


def test_backoff_grows_exponentially_with_jitter_and_a_cap():
    client = civitai.CivitaiClient("http://127.0.0.1:9", backoff_base=1.0, backoff_max=10.0)
    delays = [client._backoff(attempt, None) for attempt in range(6)]
    for attempt, delay in enumerate(delays[:3]):
        assert 0.5 * 2 ** attempt <= delay <= 1.5 * 2 ** attempt
    assert max(delays) <= 15.0 and client._backoff(0, "7") == 7.0


def test_gives_up_with_a_clear_message(catalog):
    with LocalCivitai(catalog, faults=Faults(p_500=1.0)) as server:
        with pytest.raises(civitai.CivitaiError, match=r"after 3 attempts \(HTTP 500\)"):
            _client(server, max_retries=2).get("models")


def test_page_paging_past_the_window_answers_429_and_is_not_retried(catalog):
    with LocalCivitai(catalog) as server:
        client = _client(server)
        assert client.get("models", {"page": 10, "limit": 100})["metadata"]["currentPage"] == 10
        with pytest.raises(civitai.CivitaiError, match="use cursors instead"):
            client.get("models", {"page": 11, "limit": 100})
    assert client.stats.retries == 0


def test_cursor_pages_cover_every_model_once(catalog):
    with LocalCivitai(catalog) as server:
        client, cursor, seen = _client(server), None, []
        while True:
            page = client.get("models", {"limit": 7, **({"cursor": cursor} if cursor else {})})
            seen += [m["id"] for m in page["items"]]
            cursor = page["metadata"].get("nextCursor")
            if not cursor:
                break
    assert sorted(seen) == sorted(m["id"] for m in catalog.models) and len(seen) == len(set(seen))


def test_meta_only_with_with_meta_and_hashes_resolve_case_insensitively(catalog):
    model = next(m for m in catalog.models if m["modelVersions"][0]["files"])
    file_hash = model["modelVersions"][0]["files"][0]["hashes"]["AutoV2"]
    with LocalCivitai(catalog) as server:
        client = _client(server)
        plain = client.get("images", {"modelId": model["id"], "limit": 5})["items"]
        rich = client.get("images", {"modelId": model["id"], "limit": 5, "withMeta": "true"})["items"]
        assert plain and all("meta" not in image for image in plain)
        assert all("meta" in image for image in rich)
        assert client.version_by_hash(file_hash.lower())["id"] == model["modelVersions"][0]["id"]
        assert client.version_by_hash("0123456789") is None


def test_token_goes_in_a_header_and_nowhere_else(catalog, tmp_path, monkeypatch):
    secret = "civitai-fake-token-7f3a9c"
    monkeypatch.setenv(civitai.TOKEN_ENV, secret)
    with LocalCivitai(catalog) as server:
        civitai.crawl(_client(server), tmp_path, images_per_model=3, max_models=10, progress=False)
        assert server.stats.authorized == server.stats.requests > 0
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret not in path.read_text(errors="replace"), path
