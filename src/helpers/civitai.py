"""Civitai REST client and resumable crawler (works against civitai.com and the local server alike).

The token, when there is one, is read from $CIVITAI_API_TOKEN at each request and sent only as a header:
it is never an argument, never stored on an object, never written to a file, a log or a notebook.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import requests
from tqdm.auto import tqdm

from .http import RETRY_STATUS, backoff_delay
from .manifest import atomic_write_json

TOKEN_ENV = "CIVITAI_API_TOKEN"
PUBLIC_API = "https://civitai.com/api/v1"
CRAWL_FILES = ("models.jsonl", "images.jsonl", "versions_by_hash.jsonl")


class CivitaiError(RuntimeError):
    """A request that failed for good (after retries, or with a status worth no retry)."""


class NotFound(CivitaiError):
    """404: e.g. a hash the API does not know."""


@dataclass
class RequestStats:
    requests: int = 0
    retries: int = 0
    waited_s: float = 0.0
    failures: dict[str, int] = field(default_factory=dict)


class CivitaiClient:
    """GET with timeouts, a polite minimum interval, and retries (exponential backoff with jitter, Retry-After)."""

    def __init__(self, base_url: str = PUBLIC_API, timeout: float = 30.0, max_retries: int = 8,
                 backoff_base: float = 1.0, backoff_max: float = 60.0, min_interval: float = 0.5, seed: int = 0):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.min_interval = min_interval
        self.stats = RequestStats()
        self._session = requests.Session()
        self._session.headers["User-Agent"] = "t2i-agent-book crawler (research; polite)"
        self._jitter = random.Random(seed)
        self._last_request = 0.0

    def _headers(self) -> dict[str, str]:
        token = os.environ.get(TOKEN_ENV)
        return {"Authorization": f"Bearer {token}"} if token else {}

    def _pause(self) -> None:
        wait = self._last_request + self.min_interval - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        self._last_request = time.monotonic()

    def _backoff(self, attempt: int, retry_after: str | None) -> float:
        return backoff_delay(attempt, retry_after, self.backoff_base, self.backoff_max, self._jitter)

    def get(self, path: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """JSON body of GET base_url/path; retries 429/5xx, dropped connections, timeouts and malformed JSON."""
        url = f"{self.base_url}/{path.lstrip('/')}"
        problem = ""
        for attempt in range(self.max_retries + 1):
            self._pause()
            self.stats.requests += 1
            retry_after = None
            try:
                response = self._session.get(url, params=params, headers=self._headers(), timeout=self.timeout)
                if response.status_code == 404:
                    raise NotFound(f"404 for {url} {params or ''}")
                if response.status_code == 429 and "cursor" in response.text.lower():
                    # page paging past the window: waiting will not help, the caller must switch to cursors
                    raise CivitaiError(f"HTTP 429 for {url} {params or ''}: {response.text[:200]}")
                if response.status_code in RETRY_STATUS:
                    problem, retry_after = f"HTTP {response.status_code}", response.headers.get("Retry-After")
                elif response.status_code >= 400:
                    raise CivitaiError(f"HTTP {response.status_code} for {url} {params or ''}: {response.text[:200]}")
                else:
                    return response.json()
            except requests.JSONDecodeError:
                problem = "malformed JSON"
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as error:
                problem = type(error).__name__
            self.stats.failures[problem] = self.stats.failures.get(problem, 0) + 1
            if attempt == self.max_retries:
                break
            delay = self._backoff(attempt, retry_after)
            self.stats.retries += 1
            self.stats.waited_s += delay
            time.sleep(delay)
        raise CivitaiError(f"giving up on {url} {params or ''} after {self.max_retries + 1} attempts ({problem})")

    def version_by_hash(self, file_hash: str) -> dict[str, Any] | None:
        """The model version a file hash (AutoV1/AutoV2/SHA256/…) belongs to, or None when the API does not know it."""
        try:
            return self.get(f"model-versions/by-hash/{file_hash}")
        except NotFound:
            return None


# ------------------------------------------------------------------------------------------- crawling

class JsonlById:
    """An append-only JSON-lines file of items unique by `key`; survives a kill in the middle of a write."""

    def __init__(self, path: Path, key: str = "id"):
        self.path = Path(path)
        self.key = key
        self.seen: set = set()
        if self.path.exists():
            self._repair()
            with open(self.path) as handle:
                self.seen = {json.loads(line)[key] for line in handle if line.strip()}

    def _repair(self) -> None:
        """Drop a trailing partial line left by a killed write."""
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            self.path.write_bytes(data[: data.rfind(b"\n") + 1])

    def add(self, items: list[dict[str, Any]]) -> int:
        """Append the unseen items in one write, flushed to disk; return how many were new."""
        fresh = []
        for item in items:
            if item[self.key] not in self.seen:
                self.seen.add(item[self.key])
                fresh.append(item)
        if fresh:
            with open(self.path, "a") as handle:
                handle.write("".join(json.dumps(item, sort_keys=True) + "\n" for item in fresh))
                handle.flush()
                os.fsync(handle.fileno())
        return len(fresh)


@dataclass
class CrawlState:
    """The checkpoint: where each listing stands. Seen ids live in the JSON-lines files themselves."""

    params: dict[str, Any] = field(default_factory=dict)  # what this crawl was asked for
    models_cursor: str | None = None
    models_done: bool = False
    model_pages: int = 0
    images: dict[str, dict[str, Any]] = field(default_factory=dict)  # model id -> {cursor, count, pages, done}
    hashes_done: bool = False

    @classmethod
    def load(cls, path: Path) -> "CrawlState":
        return cls(**json.loads(path.read_text())) if path.is_file() else cls()

    def save(self, path: Path) -> None:
        atomic_write_json(path, asdict(self))


def referenced_hashes(image: dict[str, Any]) -> set[str]:
    """Upper-cased file hashes an image's meta points at (`Model hash` and every resource hash)."""
    meta = image.get("meta") or {}
    hashes = {meta.get("Model hash")} | {r.get("hash") for r in meta.get("resources") or [] if isinstance(r, dict)}
    return {h.upper() for h in hashes if isinstance(h, str) and h.strip()}


def crawl(client: CivitaiClient, out: Path, max_models: int | None = None, images_per_model: int = 50,
          types: list[str] | None = None, base_models: list[str] | None = None, sort: str | None = None,
          resolve_hashes: bool = True, progress: bool = True, stop_after_requests: int | None = None,
          restart: bool = False) -> dict[str, Any]:
    """Crawl models, then each model's images (with meta), then resolve referenced hashes; resumable.

    Writes `models.jsonl`, `images.jsonl` (one served item per line, unique by id), `versions_by_hash.jsonl`,
    every raw page under `pages/`, and `checkpoint.json`. Rerunning on the same folder resumes.
    `stop_after_requests` ends the crawl early (as a kill would) for tests and demonstrations; a folder that
    holds a crawl with other parameters is an error unless `restart`, which empties it first.
    """
    out = Path(out)
    wanted = {"base_url": client.base_url, "max_models": max_models, "images_per_model": images_per_model,
              "types": types, "base_models": base_models, "sort": sort}
    state_path = out / "checkpoint.json"
    state = CrawlState.load(state_path)
    if state_path.exists() and state.params != wanted:
        if not restart:
            raise ValueError(f"{out} holds a crawl with {state.params}, not {wanted}; use another folder or restart=True "
                             "(--restart) to discard it")
        for name in (*CRAWL_FILES, "checkpoint.json"):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "pages", ignore_errors=True)
        state = CrawlState()
    state.params = wanted
    (out / "pages").mkdir(parents=True, exist_ok=True)
    models = JsonlById(out / "models.jsonl")
    images = JsonlById(out / "images.jsonl")
    hashes = JsonlById(out / "versions_by_hash.jsonl", key="hash")
    budget = _Budget(client, stop_after_requests)

    params: dict[str, Any] = {"limit": 100}
    if types:
        params["types"] = types
    if base_models:
        params["baseModels"] = base_models
    if sort:
        params["sort"] = sort
    with tqdm(total=max_models, desc="models", disable=not progress, initial=len(models.seen)) as bar:
        while not state.models_done and budget.ok():
            page = client.get("models", {**params, **({"cursor": state.models_cursor} if state.models_cursor else {})})
            state.model_pages += 1
            atomic_write_json(out / "pages" / "models" / f"{state.model_pages:05d}.json", page)
            room = None if max_models is None else max(0, max_models - len(models.seen))
            bar.update(models.add(page.get("items", [])[:room]))
            state.models_cursor = (page.get("metadata") or {}).get("nextCursor") or None
            state.models_done = state.models_cursor is None or (max_models is not None and len(models.seen) >= max_models)
            state.save(state_path)

    model_ids = [m["id"] for m in read_jsonl(out / "models.jsonl")] if models.seen else []
    image_limit = max(1, min(200, images_per_model))
    for model_id in tqdm(model_ids, desc="images per model", disable=not progress or not budget.ok()):
        progress_of = state.images.setdefault(str(model_id), {"cursor": None, "count": 0, "pages": 0, "done": False})
        while not progress_of["done"] and budget.ok():
            query = {"modelId": model_id, "withMeta": "true", "limit": image_limit}
            page = client.get("images", {**query, **({"cursor": progress_of["cursor"]} if progress_of["cursor"] else {})})
            progress_of["pages"] += 1
            atomic_write_json(out / "pages" / "images" / f"model{model_id}_{progress_of['pages']:04d}.json", page)
            items = page.get("items", [])[: images_per_model - progress_of["count"]]
            images.add(items)
            progress_of["count"] += len(items)
            progress_of["cursor"] = (page.get("metadata") or {}).get("nextCursor") or None
            progress_of["done"] = progress_of["cursor"] is None or progress_of["count"] >= images_per_model
            state.save(state_path)
        if not budget.ok():
            break

    if resolve_hashes and budget.ok() and not state.hashes_done:
        known = _local_hash_index(out / "models.jsonl")
        wanted = sorted({h for image in read_jsonl(out / "images.jsonl") for h in referenced_hashes(image)}
                        - hashes.seen) if images.seen else []
        for file_hash in tqdm(wanted, desc="hashes", disable=not progress):
            if not budget.ok():
                break
            # a hash of a crawled model needs no request: its version is in models.jsonl already
            version = known.get(file_hash) or client.version_by_hash(file_hash)
            hashes.add([{"hash": file_hash, "found": version is not None, "version": version,
                         "source": "models.jsonl" if file_hash in known else "by-hash"}])
        state.hashes_done = budget.ok()
        state.save(state_path)
    return crawl_summary(out, client, finished=budget.ok() and (state.hashes_done or not resolve_hashes))


class _Budget:
    """Stops the crawl after a number of requests (a deterministic stand-in for a kill)."""

    def __init__(self, client: CivitaiClient, limit: int | None):
        self.client, self.limit = client, limit

    def ok(self) -> bool:
        return self.limit is None or self.client.stats.requests < self.limit


def _local_hash_index(models_path: Path) -> dict[str, dict[str, Any]]:
    """{upper-case file hash: version as the by-hash endpoint serves it} from crawled models."""
    index = {}
    with open(models_path) as handle:
        for line in handle:
            model = json.loads(line)
            for version in model.get("modelVersions", []):
                served = {**version, "modelId": model["id"],
                          "model": {"name": model["name"], "type": model["type"], "nsfw": model.get("nsfw", False)}}
                for file in version.get("files") or []:
                    for value in (file.get("hashes") or {}).values():
                        index[str(value).upper()] = served
    return index


def crawl_summary(out: Path, client: CivitaiClient | None = None, finished: bool = True) -> dict[str, Any]:
    """Counts of what a crawl folder holds (and, with a client, the request statistics)."""
    counts = {name.removesuffix(".jsonl"): len(read_jsonl(out / name)) if (out / name).exists() else 0
              for name in CRAWL_FILES}
    summary = {**counts, "finished": finished, "pages": sum(1 for _ in (out / "pages").rglob("*.json"))}
    if client:
        summary.update({"requests": client.stats.requests, "retries": client.stats.retries,
                        "failures": dict(client.stats.failures)})
    return summary


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every JSON line of a file."""
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


# --------------------------------------------------------------------------------------- notebook steps

class CivitaiSource:
    """`source="local"` starts the project's server on 127.0.0.1 (stopped on exit); anything else is an API URL."""

    def __init__(self, source: str, catalog_models: int = 300, fault_rate: float = 0.0, seed: int = 0):
        self.source, self.catalog_models, self.fault_rate, self.seed = source, catalog_models, fault_rate, seed
        self.server = None

    def __enter__(self) -> "CivitaiSource":
        if self.source == "local":
            from .civitai_catalog import Catalog, CatalogSpec
            from .civitai_server import Faults, LocalCivitai

            faults = Faults(p_429=self.fault_rate, p_500=self.fault_rate, p_drop=self.fault_rate, burst=2,
                            malformed_pages=2 if self.fault_rate else 0, seed=self.seed)
            self.server = LocalCivitai(Catalog(CatalogSpec(num_models=self.catalog_models, seed=self.seed)),
                                       faults=faults).start()
        return self

    @property
    def url(self) -> str:
        return self.server.url if self.server else self.source

    def __exit__(self, *exc) -> None:
        if self.server:
            self.server.stop()

    def describe(self):
        """A small table: where the data comes from and, for the local server, what it served and injected."""
        import pandas as pd

        facts = {"source": "local Civitai-compatible server (generated catalog)" if self.server else self.source,
                 "token in $CIVITAI_API_TOKEN": "set" if os.environ.get(TOKEN_ENV) else "not set"}
        if self.server:
            facts.update({"catalog models": len(self.server.catalog.models),
                          "catalog images": len(self.server.catalog.images),
                          "requests served": self.server.stats.requests,
                          **{f"injected {k}": v for k, v in self.server.stats.injected.items()}})
        return pd.DataFrame({"value": {k: str(v) for k, v in facts.items()}}).rename_axis("what")


def run_crawl(folder: Path, base_url: str, min_interval: float = 0.5, **options) -> dict[str, Any]:
    """Stage 01: a resumable crawl into the stage folder (restarted if it holds a crawl with other parameters)."""
    client = CivitaiClient(base_url, min_interval=min_interval, backoff_base=0.05 if "127.0.0.1" in base_url else 1.0)
    summary = crawl(client, Path(folder), restart=True, **options)
    if not summary["finished"]:
        raise CivitaiError(f"the crawl stopped early: {summary}")
    (Path(folder) / "crawl_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return {k: v for k, v in summary.items() if isinstance(v, int)}


def resume_demo(base_url: str, folder: Path, stop_after_requests: int, **options):
    """Crawl, stop after N requests (a stand-in for a kill), resume; compare ids with one uninterrupted crawl."""
    import pandas as pd

    whole, broken = Path(folder) / "uninterrupted", Path(folder) / "interrupted"
    crawl(CivitaiClient(base_url, min_interval=0, backoff_base=0.01), whole, progress=False, **options)
    first = crawl(CivitaiClient(base_url, min_interval=0, backoff_base=0.01), broken, progress=False,
                  stop_after_requests=stop_after_requests, **options)
    crawl(CivitaiClient(base_url, min_interval=0, backoff_base=0.01), broken, progress=False, **options)
    rows = []
    for name, key in (("models.jsonl", "id"), ("images.jsonl", "id"), ("versions_by_hash.jsonl", "hash")):
        a, b = [r[key] for r in read_jsonl(whole / name)], [r[key] for r in read_jsonl(broken / name)]
        rows.append({"file": name, "uninterrupted": len(a), f"after stop at {first['requests']} requests": first[
            name.removesuffix(".jsonl")], "resumed": len(b), "duplicates": len(b) - len(set(b)),
            "same ids": set(a) == set(b)})
    return pd.DataFrame(rows).set_index("file")
