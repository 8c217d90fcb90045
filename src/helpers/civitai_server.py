"""A local Civitai-compatible REST server over a generated catalog, with optional fault injection.

It answers the endpoints the crawler uses with the real API's shapes: `/api/v1/models`, `/api/v1/images`
(no `meta` unless `withMeta=true`), `/api/v1/model-versions/{id}` and `/api/v1/model-versions/by-hash/{hash}`;
cursor pagination, page pagination refused with 429 past page×limit > 1000. Faults (429 bursts with
`Retry-After`, 500s, dropped connections, a malformed page) are drawn from a seeded generator.
"""
from __future__ import annotations

import json
import random
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlencode, urlparse

from .civitai_catalog import Catalog, CatalogSpec

PAGE_WINDOW = 1000  # page × limit beyond this answers 429, as the real API does
MODEL_SORTS = {"Highest Rated": lambda m: -m["stats"].get("thumbsUpCount", m["stats"].get("favoriteCount", 0)),
               "Most Downloaded": lambda m: -m["stats"]["downloadCount"], "Newest": lambda m: -m["id"]}


@dataclass
class Faults:
    """What goes wrong, how often. Off by default; tests switch it on."""

    p_429: float = 0.0  # chance a request starts a burst of 429s
    burst: int = 2  # 429s in a row once a burst starts
    retry_after: float = 0.0  # seconds sent in Retry-After
    p_500: float = 0.0
    p_drop: float = 0.0  # close the connection without answering
    malformed_pages: int = 0  # listing pages answered once with truncated JSON
    initial_burst: int = 0  # 429s answered to the very first requests
    seed: int = 0

    @property
    def active(self) -> bool:
        return any([self.p_429, self.p_500, self.p_drop, self.malformed_pages, self.initial_burst])


@dataclass
class ServerStats:
    requests: int = 0
    injected: dict[str, int] = field(default_factory=lambda: {"429": 0, "500": 0, "drop": 0, "malformed": 0})
    authorized: int = 0  # requests that carried an Authorization header


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"
    # one buffered write per response and no Nagle: otherwise keep-alive requests wait on delayed ACKs (~40 ms)
    wbufsize = 1 << 16
    disable_nagle_algorithm = True

    def log_message(self, *args):  # quiet: tests and notebooks read counters instead
        pass

    def do_GET(self):  # noqa: N802 (http.server's naming)
        parsed = urlparse(self.path)
        query = {k: v for k, v in parse_qs(parsed.query, keep_blank_values=True).items()}
        owner = self.server.owner
        with owner.lock:
            owner.stats.requests += 1
            owner.stats.authorized += bool(self.headers.get("Authorization"))
            fault = owner.draw_fault(parsed.path)
        if fault == "drop":
            self.close_connection = True
            return  # nothing written: the client sees the connection close
        if fault == "429":
            return self._json(429, {"error": "Too Many Requests"}, {"Retry-After": f"{owner.faults.retry_after:g}"})
        if fault == "500":
            return self._json(500, {"error": "Internal Server Error"})
        try:
            status, body = owner.route(parsed.path, query, f"http://{self.headers.get('Host')}{parsed.path}")
        except ValueError as error:
            status, body = 400, {"error": str(error)}
        if fault == "malformed" and status == 200:
            text = json.dumps(body)
            return self._raw(200, text[: len(text) // 2].encode())
        self._json(status, body)

    def _json(self, status: int, body: Any, headers: dict[str, str] | None = None):
        self._raw(status, json.dumps(body).encode(), headers)

    def _raw(self, status: int, payload: bytes, headers: dict[str, str] | None = None):
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(payload)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: "LocalCivitai"


def _one(query: dict[str, list[str]], key: str, default: str | None = None) -> str | None:
    values = query.get(key)
    return values[-1] if values else default


def _many(query: dict[str, list[str]], key: str) -> list[str]:
    return [part for value in query.get(key, []) for part in value.split(",") if part]


def _int(query: dict[str, list[str]], key: str, default: int, low: int, high: int) -> int:
    raw = _one(query, key)
    try:
        value = default if raw in (None, "") else int(raw)
    except ValueError:
        raise ValueError(f"{key}={raw!r} is not an integer") from None
    if not low <= value <= high:
        raise ValueError(f"{key}={value} is out of range [{low}, {high}]")
    return value


class LocalCivitai:
    """The server: `with LocalCivitai() as server: crawl(server.url)`; `server.stats` counts requests and faults."""

    def __init__(self, catalog: Catalog | None = None, host: str = "127.0.0.1", port: int = 0,
                 faults: Faults | None = None):
        self.catalog = catalog or Catalog(CatalogSpec())
        self.faults = faults or Faults()
        self.stats = ServerStats()
        self.lock = threading.Lock()
        self._rng = random.Random(self.faults.seed)
        self._burst_left = self.faults.initial_burst
        self._malformed_left = self.faults.malformed_pages
        self._httpd = _Server((host, port), _Handler)
        self._httpd.owner = self
        self._thread: threading.Thread | None = None
        self._models_by_id = {m["id"]: m for m in self.catalog.models}

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/api/v1"

    def start(self) -> "LocalCivitai":
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="local-civitai", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def serve_forever(self) -> None:
        self._httpd.serve_forever()

    def __enter__(self) -> "LocalCivitai":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------------ faults
    def draw_fault(self, path: str) -> str | None:
        """Which fault (if any) this request gets; called under the lock so the sequence is reproducible."""
        if not self.faults.active:
            return None
        if self._burst_left:
            self._burst_left -= 1
            return self._count("429")
        roll = self._rng.random()
        if roll < self.faults.p_429:
            self._burst_left = max(0, self.faults.burst - 1)
            return self._count("429")
        roll -= self.faults.p_429
        if roll < self.faults.p_500:
            return self._count("500")
        roll -= self.faults.p_500
        if roll < self.faults.p_drop:
            return self._count("drop")
        if self._malformed_left and path.rstrip("/").endswith(("/models", "/images")) and self._rng.random() < 0.5:
            self._malformed_left -= 1
            return self._count("malformed")
        return None

    def _count(self, kind: str) -> str:
        self.stats.injected[kind] += 1
        return kind

    # ------------------------------------------------------------------------------------------ routes
    def route(self, path: str, query: dict[str, list[str]], self_url: str) -> tuple[int, Any]:
        parts = [p for p in path.split("/") if p]
        if parts[:2] != ["api", "v1"]:
            return 404, {"error": f"no route {path}"}
        rest = parts[2:]
        if rest == ["models"]:
            return self._list(self._models(query), query, self_url, default_limit=100, max_limit=100)
        if rest == ["images"]:
            return self._list(self._images(query), query, self_url, default_limit=50, max_limit=200, low=0)
        if len(rest) == 3 and rest[:2] == ["model-versions", "by-hash"]:
            version_id = self.catalog.by_hash.get(rest[2].upper())
            return (200, self._version(version_id)) if version_id else (404, {"error": "Model not found"})
        if len(rest) == 2 and rest[0] == "model-versions" and rest[1].isdigit():
            version_id = int(rest[1])
            return (200, self._version(version_id)) if version_id in self.catalog.versions else (
                404, {"error": f"No model version with id {version_id}"})
        return 404, {"error": f"no route {path}"}

    def _version(self, version_id: int) -> dict[str, Any]:
        return self.catalog.versions[version_id]

    def _models(self, query: dict[str, list[str]]) -> list[dict[str, Any]]:
        models = self.catalog.models
        if types := _many(query, "types"):
            models = [m for m in models if m["type"] in types]
        if bases := _many(query, "baseModels"):
            models = [m for m in models if any(v["baseModel"] in bases for v in m["modelVersions"])]
        if (nsfw := _one(query, "nsfw")) in ("true", "false"):
            models = [m for m in models if m["nsfw"] == (nsfw == "true")]
        if text := _one(query, "query"):
            models = [m for m in models if text.lower() in m["name"].lower()]
        if sort := _one(query, "sort"):
            if sort not in MODEL_SORTS:
                raise ValueError(f"sort={sort!r} is not one of {sorted(MODEL_SORTS)}")
            models = sorted(models, key=MODEL_SORTS[sort])
        return [Catalog.served_model(m) for m in models]

    def _images(self, query: dict[str, list[str]]) -> list[dict[str, Any]]:
        model_id = _one(query, "modelId")
        version_id = _one(query, "modelVersionId")
        images = self.catalog.images_for(int(model_id) if model_id else None, int(version_id) if version_id else None)
        if (level := _one(query, "nsfw")) is not None and level != "":
            allowed = {"false": {"None"}, "None": {"None"}, "Soft": {"None", "Soft"},
                       "Mature": {"None", "Soft", "Mature"}}.get(level)
            if allowed is not None:
                images = [i for i in images if i["nsfwLevel"] in allowed]
        with_meta = _one(query, "withMeta", "false") == "true"
        return [image if with_meta else {k: v for k, v in image.items() if k != "meta"} for image in images]

    def _list(self, items: list[dict[str, Any]], query: dict[str, list[str]], self_url: str, default_limit: int,
              max_limit: int, low: int = 1) -> tuple[int, Any]:
        limit = _int(query, "limit", default_limit, low, max_limit)
        cursor = _one(query, "cursor")
        page = _one(query, "page")
        plain = {k: v for k, v in query.items() if k not in ("cursor", "page")}
        if cursor is not None and cursor != "":
            try:
                start = int(cursor)
            except ValueError:
                raise ValueError(f"cursor={cursor!r} is not a cursor this server issued") from None
            metadata: dict[str, Any] = {}
        else:
            number = _int(query, "page", 1, 1, 10**6) if page else 1
            if number * limit > PAGE_WINDOW:
                return 429, {"error": f"page {number} × limit {limit} is past the first {PAGE_WINDOW} items; "
                                      "use cursors instead"}
            start = (number - 1) * limit
            metadata = {"currentPage": number, "pageSize": limit}
        chunk = items[start:start + limit]
        end = start + len(chunk)
        if end < len(items) and limit:
            metadata["nextCursor"] = str(end)
            metadata["nextPage"] = f"{self_url}?{urlencode({**{k: v[-1] for k, v in plain.items()}, 'cursor': end})}"
        if "currentPage" in metadata:
            metadata["totalItems"] = len(items)
        return 200, {"items": chunk, "metadata": metadata}
