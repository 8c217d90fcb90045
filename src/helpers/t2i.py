"""T2I API calls made runnable: parse and validate the agent's text, then execute it with diffusers, cached.

DiffAgent (Sec. 3.2.2) counts an API the executor cannot run as a *hallucination*; `validate` names the
category of every such failure and never raises on model output. `Executor` turns a clean call into
images: the checkpoint (a diffusers folder or a single file, SD 1.5 or SDXL), the LoRA on its base model,
the A1111 sampler as a diffusers scheduler, seeds, batching, a pipeline cache and an image cache keyed by
everything that decides the pixels, so no image is generated twice.
"""
from __future__ import annotations

import difflib
import json
import logging
import math
import os
import re
import threading
import warnings
from collections import Counter, OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from PIL import Image

from .api_call import API_FIELDS, ARCHITECTURES, CFG_RANGE, DEFAULT_PARAMETERS, KNOWN_SAMPLERS, SIZE_RANGE, STEPS_RANGE
from .display import say
from .manifest import append_lines, sha256_json
from .speed import (PipelineSettings, clip_overflow, fitting_batches, optimize_pipeline, quiet_clip_truncation,
                    render)

if TYPE_CHECKING:  # pragma: no cover
    from .config import RunContext

# The hallucination categories of DESIGN.md, in the order `validate` checks them (the first failure names it).
CATEGORIES = ("unparseable", "unknown_model", "base_model_mismatch", "unknown_sampler", "bad_size",
              "steps_out_of_range", "cfg_out_of_range")

# A1111 sampler name -> (diffusers scheduler class, settings). Settings are always passed explicitly so a
# base config with e.g. Karras sigmas switched on cannot leak into a sampler that should not use them.
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "Euler": ("EulerDiscreteScheduler", {"use_karras_sigmas": False}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
    "PNDM": ("PNDMScheduler", {"skip_prk_steps": True}),
    "LMS": ("LMSDiscreteScheduler", {"use_karras_sigmas": False}),
    "LMS Karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "Heun": ("HeunDiscreteScheduler", {"use_karras_sigmas": False}),
    "DPM2": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": False}),
    "DPM2 Karras": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": False}),
    "DPM2 a Karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler",
                 {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler",
                        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler",
                     {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}),
    "DPM++ 2M SDE Karras": ("DPMSolverMultistepScheduler",
                            {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "DPM++ SDE": ("DPMSolverSDEScheduler", {"use_karras_sigmas": False}),
    "DPM++ SDE Karras": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
    "UniPC": ("UniPCMultistepScheduler", {"use_karras_sigmas": False}),
}
assert set(SAMPLERS) == set(KNOWN_SAMPLERS), "api_call.KNOWN_SAMPLERS and t2i.SAMPLERS must name the same samplers"
# Samplers whose noise comes from one Brownian tree per batch rather than per-image generators: run them one
# image at a time with the tree seeded by the image's seed, so an image depends on its own seed only.
PER_IMAGE_SAMPLERS = {"DPM++ SDE", "DPM++ SDE Karras"}
BASE_MODEL_NAMES = {"SD 1.5": "Stable Diffusion v1.5", "SDXL 1.0": "Stable Diffusion XL 1.0"}


# --------------------------------------------------------------------------------------------- catalog

@dataclass(frozen=True)
class CatalogModel:
    """One runnable model: what the API names, and which weights run it."""

    name: str
    type: str
    base_model: str
    model_version_id: int
    model_id: int = 0
    description: str = ""
    lora_base_version_id: int | None = None
    images: int = 0
    is_base: bool = False


class ModelCatalog:
    """The models an API may name (from DABench), plus the two base models the baselines use."""

    def __init__(self, models: Iterable[CatalogModel]):
        self.models = list(models)
        self.by_name: dict[str, list[CatalogModel]] = {}
        for model in sorted(self.models, key=lambda m: (-m.images, m.model_version_id)):
            self.by_name.setdefault(model.name, []).append(model)

    @classmethod
    def from_records(cls, records: Iterable[dict]) -> "ModelCatalog":
        """Every model version DABench uses, with how many demonstrations it has, and the base models."""
        counts: Counter = Counter()
        first: dict[int, dict] = {}
        for record in records:
            counts[record["model_version_id"]] += 1
            first.setdefault(record["model_version_id"], record)
        models = [CatalogModel(name=r["api"]["model"], type=r["api"]["type"], base_model=r["architecture"],
                               model_version_id=version, model_id=r["model_id"],
                               description=r["api"]["model_description"],
                               lora_base_version_id=(r["lora_base"] or {}).get("model_version_id"),
                               images=counts[version]) for version, r in first.items()]
        bases = [CatalogModel(name=BASE_MODEL_NAMES[arch], type="Checkpoint", base_model=arch, model_version_id=0,
                              description=f"The {arch} base model.", is_base=True) for arch in ARCHITECTURES]
        return cls(bases + models)

    @classmethod
    def from_dabench(cls, path: Path) -> "ModelCatalog":
        from .civitai import read_jsonl

        return cls.from_records(read_jsonl(Path(path)))

    def base(self, architecture: str) -> CatalogModel:
        return self.lookup(BASE_MODEL_NAMES[architecture], architecture)

    def lookup(self, name: str, base_model: str | None = None, model_type: str | None = None) -> CatalogModel | None:
        """The model called `name` (on `base_model`, of `model_type` when given); most demonstrations wins a tie."""
        candidates = [m for m in self.by_name.get(name, []) if base_model in (None, m.base_model)]
        typed = [m for m in candidates if m.type == model_type]
        return (typed or candidates or [None])[0]

    def nearest(self, name: str, n: int = 3) -> list[str]:
        return difflib.get_close_matches(str(name), list(self.by_name), n=n)

    def __len__(self) -> int:
        return len(self.models)


# ------------------------------------------------------------------------------------------ validation

@dataclass
class Validation:
    """The outcome of checking one agent output: a clean API call, or the hallucination category."""

    category: str | None
    api: dict[str, Any] | None
    detail: str = ""
    model: CatalogModel | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.category is None


def extract_json(text: str) -> dict[str, Any]:
    """The first JSON object in `text` (the agent may wrap it in prose or a code fence); ValueError if none."""
    decoder = json.JSONDecoder()
    position = text.find("{")
    while position != -1:
        try:
            value, _ = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            position = text.find("{", position + 1)
            continue
        if isinstance(value, dict):
            return value
        position = text.find("{", position + 1)
    raise ValueError("no JSON object in the text")


def _as_int(value: Any, key: str, notes: list[str]) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{key} is a boolean")
    if isinstance(value, str):
        notes.append(f"{key} given as text {value!r}")
        value = float(value.strip())
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise ValueError(f"{key}={value!r} is not a whole number")
        value = int(value)
    if not isinstance(value, int):
        raise ValueError(f"{key}={value!r} is not a number")
    return value


def _as_float(value: Any, key: str, notes: list[str]) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{key} is a boolean")
    if isinstance(value, str):
        notes.append(f"{key} given as text {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{key}={value!r} is not finite")
    return number


def parse_api(text: str | dict) -> tuple[dict[str, Any], list[str]]:
    """The API fields read from the agent's text, with numbers coerced; ValueError says what is missing or wrong."""
    raw = dict(text) if isinstance(text, dict) else extract_json(str(text))
    notes: list[str] = []
    missing = [key for key in ("model", "width", "height", "sampling_method", "sampling_steps", "cfg_scale")
               if key not in raw]
    if missing:
        raise ValueError(f"missing fields {missing}")
    api = {key: raw.get(key) for key in API_FIELDS}
    for key in ("model", "sampling_method"):
        if not isinstance(api[key], str) or not api[key].strip():
            raise ValueError(f"{key}={api[key]!r} is not a name")
        api[key] = api[key].strip()
    for key in ("width", "height", "sampling_steps"):
        api[key] = _as_int(api[key], key, notes)
    api["cfg_scale"] = _as_float(api["cfg_scale"], "cfg_scale", notes)
    return api, notes


def validate(output: str | dict, catalog: ModelCatalog) -> Validation:
    """Check one agent output; returns the clean, complete API call or the first hallucination category."""
    try:
        api, notes = parse_api(output)
    except (ValueError, TypeError, OverflowError) as error:
        return Validation("unparseable", None, str(error))
    named = catalog.lookup(api["model"])
    if named is None:
        close = catalog.nearest(api["model"])
        return Validation("unknown_model", api, f"model {api['model']!r} is not in the catalog"
                          + (f"; close names: {close}" if close else ""), notes=notes)
    if api.get("base_model") is not None:
        model = catalog.lookup(api["model"], api["base_model"], api.get("type"))
        if model is None:
            bases = sorted({m.base_model for m in catalog.by_name[api["model"]]})
            return Validation("base_model_mismatch", api, f"{api['model']!r} runs on {bases}, not "
                              f"{api['base_model']!r}", named, notes)
    else:
        model = catalog.lookup(api["model"], model_type=api.get("type"))
        notes.append("base_model missing; taken from the catalog")
    if api["sampling_method"] not in SAMPLERS:
        close = difflib.get_close_matches(api["sampling_method"], list(SAMPLERS), n=2)
        return Validation("unknown_sampler", api, f"sampler {api['sampling_method']!r} is not known"
                          + (f"; close: {close}" if close else ""), model, notes)
    for side in ("width", "height"):
        if not SIZE_RANGE[0] <= api[side] <= SIZE_RANGE[1] or api[side] % 8:
            return Validation("bad_size", api, f"{side}={api[side]} is not a multiple of 8 in "
                              f"{SIZE_RANGE[0]}–{SIZE_RANGE[1]}", model, notes)
    if not STEPS_RANGE[0] <= api["sampling_steps"] <= STEPS_RANGE[1]:
        return Validation("steps_out_of_range", api, f"sampling_steps={api['sampling_steps']} is outside "
                          f"{STEPS_RANGE[0]}–{STEPS_RANGE[1]}", model, notes)
    if not CFG_RANGE[0] <= api["cfg_scale"] <= CFG_RANGE[1]:
        return Validation("cfg_out_of_range", api, f"cfg_scale={api['cfg_scale']} is outside "
                          f"{CFG_RANGE[0]}–{CFG_RANGE[1]}", model, notes)
    if api.get("type") not in (None, model.type):
        notes.append(f"type {api['type']!r} corrected to the catalog's {model.type!r}")
    clean = {**api, "type": model.type, "base_model": model.base_model, "model_description": model.description}
    return Validation(None, clean, "", model, notes)


def hallucination_table(validations: Sequence[Validation]):
    """Count and rate of each category (and of clean calls) over a batch of validations."""
    import pandas as pd

    counts = Counter(v.category or "ok" for v in validations)
    rows = [{"category": c, "count": counts.get(c, 0), "rate": counts.get(c, 0) / max(len(validations), 1)}
            for c in (*CATEGORIES, "ok")]
    return pd.DataFrame(rows).set_index("category")


def default_api(model: CatalogModel, width: int | None = None, height: int | None = None) -> dict[str, Any]:
    """`model` with the default parameters {Euler a, 20 steps, cfg 7} at its architecture's native size."""
    native = 1024 if model.base_model == "SDXL 1.0" else 512
    return {"model": model.name, "type": model.type, "base_model": model.base_model, "width": width or native,
            "height": height or native, **DEFAULT_PARAMETERS, "model_description": model.description}


# ------------------------------------------------------------------------------------------ schedulers

def make_scheduler(sampler: str, base_config: dict[str, Any]):
    """The diffusers scheduler for an A1111 sampler name, built on the checkpoint's own scheduler config."""
    import diffusers

    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r} is not one of: {', '.join(SAMPLERS)}")
    class_name, settings = SAMPLERS[sampler]
    return getattr(diffusers, class_name).from_config(dict(base_config), **settings)


# ------------------------------------------------------------------------------------------- weights

@dataclass(frozen=True)
class Weights:
    """Where a model's weights are (`folder` or single `file`) and an id that changes when they do.

    Remote weights (the paper profile's Civitai files) carry `fetch`, which puts the file at `path`: planning a run,
    and keying its images, needs only the id, so a file is downloaded when a pipeline or LoRA is first loaded from
    it (`local_weights`), and never for a run whose images are all cached.
    """

    path: str
    kind: str  # "folder" | "file" | "hub"
    weights_id: str
    fetch: Callable[[], None] | None = field(default=None, compare=False, repr=False)


def _use_lock(path: Path) -> Path:
    """The lock a process holds (shared) while it loads `path`, and an eviction takes (exclusive, without waiting)."""
    return path.parent / ".in-use" / f"{path.name}.lock"


@contextmanager
def local_weights(weights: Weights) -> Iterator[Weights]:
    """`weights`, on this machine's disk for the length of the block: fetched first if remote, and kept from the
    weights cache's eviction (`CivitaiWeights`, `T2IBOOK_WEIGHTS_CACHE_GB`) by any process until the block ends."""
    from .http import file_lock

    if weights.fetch is None:
        yield weights
        return
    while True:
        weights.fetch()
        with file_lock(_use_lock(Path(weights.path)), shared=True):
            if Path(weights.path).exists():
                yield weights
                return
        # removed by another process's eviction between the fetch and the lock: fetch it again


class TinyWeights:
    """Tiny profile: every catalog model maps to its own tiny checkpoint (or LoRA) on disk, built when first used."""

    def __init__(self, ctx: "RunContext"):
        self.ctx = ctx
        self._known: dict[tuple, Weights] = {}  # checked once per run, not once per request

    def base(self, architecture: str) -> Weights:
        from .models import resolve

        if ("base", architecture) not in self._known:
            role = "t2i_pipeline_xl" if architecture == "SDXL 1.0" else "t2i_pipeline"
            folder = Path(resolve(role, self.ctx))
            self._known["base", architecture] = Weights(str(folder), "folder", _folder_id(folder))
        return self._known["base", architecture]

    def checkpoint(self, model: CatalogModel) -> Weights:
        if model.is_base:
            return self.base(model.base_model)
        return self._build("checkpoints", model.model_version_id, model.base_model, "build_tiny_checkpoint")

    def lora(self, model: CatalogModel) -> Weights:
        return self._build("loras", model.model_version_id, model.base_model, "build_tiny_lora")

    def _build(self, kind: str, version: int, architecture: str, builder: str) -> Weights:
        from . import models
        from .manifest import Stage

        if (kind, version) in self._known:
            return self._known[kind, version]
        base = Path(self.base(architecture).path)
        folder = self.ctx.runs_dir / "models" / kind / str(version)
        stage = Stage(folder, name=f"models/{kind}/{version}", params={"version": version, "base": base.name},
                      inputs=[base / "unet"], code=["helpers.models"], root=self.ctx.root, profile=self.ctx.profile)
        stage.quiet = True
        stage.run(getattr(models, builder), base, seed=self.ctx.seed * 1_000_003 + version)
        self._known[kind, version] = Weights(str(folder), "folder", _folder_id(folder))
        return self._known[kind, version]


class CivitaiWeights(TinyWeights):
    """Paper profile: checkpoints and LoRAs downloaded from Civitai by version id (token from the environment).

    A file is fetched when it is first loaded (`local_weights`), by whichever process needs it; processes sharing
    the cache take turns on a lock, and the later ones find the file. `max_gb` (default: `T2IBOOK_WEIGHTS_CACHE_GB`,
    unset = no limit) caps the cache: after each download the least recently used files are removed until the
    rest fit, except the one just fetched and any a process is loading. A removed file is fetched again if a later
    stage needs it, so the cap trades disk for download time (notebook 14 sizes both).
    """

    DOWNLOAD = "https://civitai.com/api/download/models/{version}"

    def __init__(self, ctx: "RunContext", cache_dir: Path | None = None, url: str | None = None,
                 max_gb: float | None = None):
        super().__init__(ctx)
        self.cache_dir = Path(cache_dir or os.environ.get("T2IBOOK_WEIGHTS_CACHE", ctx.runs_dir / "weights"))
        self.url = url or self.DOWNLOAD
        if max_gb is None and os.environ.get("T2IBOOK_WEIGHTS_CACHE_GB"):
            try:
                max_gb = float(os.environ["T2IBOOK_WEIGHTS_CACHE_GB"])
            except ValueError:
                raise ValueError(f"T2IBOOK_WEIGHTS_CACHE_GB={os.environ['T2IBOOK_WEIGHTS_CACHE_GB']!r} is not a "
                                 "number; give the cap in GB (e.g. 200), or unset it for no limit") from None
        if max_gb is not None and not (math.isfinite(max_gb) and max_gb > 0):
            raise ValueError(f"weights cache cap {max_gb!r} GB must be a positive number; unset "
                             "T2IBOOK_WEIGHTS_CACHE_GB for no limit")
        self.max_bytes = None if max_gb is None else int(max_gb * 1e9)
        self.evicted: list[str] = []  # files this store removed to keep under the cap, in order

    def base(self, architecture: str) -> Weights:
        from .models import resolve

        role = "t2i_pipeline_xl" if architecture == "SDXL 1.0" else "t2i_pipeline"
        source = resolve(role, self.ctx)
        return Weights(source, "folder" if Path(source).exists() else "hub", source)

    def checkpoint(self, model: CatalogModel) -> Weights:
        return self.base(model.base_model) if model.is_base else self._remote(model.model_version_id)

    def lora(self, model: CatalogModel) -> Weights:
        return self._remote(model.model_version_id)

    def _remote(self, version: int) -> Weights:
        target = self.cache_dir / f"{version}.safetensors"
        return Weights(str(target), "file", f"civitai:{version}", fetch=lambda: self._fetch(version))

    def _fetch(self, version: int) -> None:
        from .http import download_to

        target = self.cache_dir / f"{version}.safetensors"
        if not target.exists():  # a checkpoint is gigabytes: a dropped connection resumes, and so does a rerun
            headers = {"Authorization": f"Bearer {token}"} if (token := os.environ.get("CIVITAI_API_TOKEN")) else {}
            room_made = []  # room is made before the bytes come when the server says how many; else after

            def make_room(incoming: int) -> None:
                room_made.append(incoming)
                self._evict(keep=target, incoming=incoming)
            download_to(self.url.format(version=version), target, headers=headers,
                        refused=f"Civitai refused model version {version} ({{status}}); set CIVITAI_API_TOKEN to a "
                                "token that may download it", make_room=make_room,
                        no_room="free space there, point T2IBOOK_WEIGHTS_CACHE at a larger disk, or cap the cache with "
                                "T2IBOOK_WEIGHTS_CACHE_GB (the least recently used files make room)")
            if not room_made:
                self._evict(keep=target)
        try:
            os.utime(target)  # its last use: the cap removes the least recently used first
        except FileNotFoundError:  # another process's eviction got there first; `local_weights` fetches again
            pass

    def _evict(self, keep: Path, incoming: int = 0) -> None:
        """Remove the least recently used files until the cache, and `incoming` bytes about to be written to `keep`,
        fit `max_bytes` (`keep` and files in use stay)."""
        from .http import file_lock

        if self.max_bytes is None:
            return
        sizes = {}
        for path in self.cache_dir.glob("*.safetensors"):
            try:
                sizes[path] = path.stat()
            except FileNotFoundError:
                continue
        total = sum(stat.st_size for stat in sizes.values()) + incoming
        for path in sorted((p for p in sizes if p != keep), key=lambda p: sizes[p].st_mtime_ns):
            if total <= self.max_bytes:
                return
            with file_lock(_use_lock(path), wait=False) as taken:
                if not taken:  # a process is loading it
                    continue
                try:
                    path.unlink()
                except FileNotFoundError:  # another process removed it first
                    pass
                else:
                    if not self.evicted:
                        say(f"The weights cache {self.cache_dir} passed its cap of {self.max_bytes / 1e9:g} GB "
                            "(T2IBOOK_WEIGHTS_CACHE_GB): the least recently used files are removed, and fetched "
                            "again if a later stage needs them (the store's `evicted` lists them).")
                    self.evicted.append(path.name)
                total -= sizes[path].st_size


def _folder_id(folder: Path) -> str:
    from .manifest import read_manifest

    manifest = read_manifest(folder) or {}
    return f"{folder.name}@{manifest.get('fingerprint', 'unversioned')[:16]}"


def weights_store(ctx: "RunContext"):
    """Tiny and small profiles run tiny catalog weights; the paper profile downloads the real ones."""
    return CivitaiWeights(ctx) if ctx.profile == "paper" else TinyWeights(ctx)


# ------------------------------------------------------------------------------------------ image cache

@dataclass(frozen=True)
class Request:
    """One image to make: a clean API call, the instruction, and a seed."""

    api: dict[str, Any]
    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    text_noise: float = 0.0  # σ of Gaussian noise added to the text-encoder output (AGFSync's candidates)


CPU_FLOAT32 = "cpu/float32"  # `drawn_with` the CPU in float32: what keys written before that field stand for


class ImageCache:
    """PNG per key under `root/images/`, plus an append-only index; key = hash(api, prompts, seed, weights, size,
    and what drew it where that is not the CPU in float32: `drawn_with`).

    `put` writes at once; `put_later` hands the PNG encoding (tens of milliseconds for a 512 px image, which PIL
    does without holding the GIL) to background threads, so a GPU draws the next batch meanwhile, and `flush`
    waits for every pending write. A pending image is found by `has` and `get` as if it were written; its index
    line is added, in the order of the `put_later` calls, once its PNG is on disk.
    """

    WRITERS = 2  # background PNG writers
    MAX_PENDING = 256  # images waiting to be written before `put_later` waits for the oldest
    # zlib level 1: a 512 px photograph encodes in ~45 ms instead of ~120 ms at PIL's default 6 on one thread of
    # a 2-core CI machine, for ~7% more bytes (428 kB against 400 kB; notebook 14 measures it on every run), next
    # to the ~83 ms an H100 takes to draw it; the pixels are the same
    COMPRESS_LEVEL = 1

    def __init__(self, root: Path):
        self.root = Path(root)
        (self.root / "images").mkdir(parents=True, exist_ok=True)
        self._pending: OrderedDict[str, tuple[Image.Image, dict[str, Any], Any]] = OrderedDict()
        self._writers = None

    @staticmethod
    def key(request: Request, weights_id: str, size: tuple[int, int], steps: int | None = None,
            draw: str = CPU_FLOAT32) -> str:
        """The image's cache key: what is drawn (the call, the drawn size and steps, the weights) and, with `draw`
        (`drawn_with`), what it is drawn on; nothing else."""
        api = {k: request.api.get(k) for k in API_FIELDS if k != "model_description"}
        if steps is not None:  # the steps actually drawn; two calls that differ only above a cap share one image
            api["sampling_steps"] = steps
        payload = {"api": api, "prompt": request.prompt, "negative_prompt": request.negative_prompt,
                   "seed": request.seed, "weights": weights_id, "size": list(size)}
        if request.text_noise:  # only noised images carry the field, so every other key stays as it was
            payload["text_noise"] = float(request.text_noise)
        if draw != CPU_FLOAT32:  # likewise: images drawn on the CPU in float32 keep the keys they always had
            payload["draw"] = draw
        return sha256_json(payload)

    def path(self, key: str) -> Path:
        return self.root / "images" / key[:2] / f"{key}.png"

    def has(self, key: str) -> bool:
        return key in self._pending or self.path(key).is_file()

    def get(self, key: str) -> Image.Image | None:
        if key in self._pending:
            return self._pending[key][0]
        path = self.path(key)
        if not path.is_file():
            return None
        with Image.open(path) as image:
            return image.copy()

    def put(self, key: str, image: Image.Image, meta: dict[str, Any]) -> Path:
        path = self._write_png(key, image)
        self._index([(key, meta)])
        return path

    def put_later(self, key: str, image: Image.Image, meta: dict[str, Any]) -> None:
        """`put`, with the PNG written by a background thread; `flush` waits for it."""
        from concurrent.futures import ThreadPoolExecutor

        if key in self._pending:
            return
        if self._writers is None:
            self._writers = ThreadPoolExecutor(self.WRITERS, thread_name_prefix="png-writer")
        self._pending[key] = (image, meta, self._writers.submit(self._write_png, key, image))
        while len(self._pending) > self.MAX_PENDING:
            self._finish_oldest()

    def flush(self) -> None:
        """Wait until every `put_later` image is on disk (with its index line); re-raises a failed write."""
        while self._pending:
            self._finish_oldest()

    def _finish_oldest(self) -> None:
        key, (_, meta, written) = next(iter(self._pending.items()))
        try:
            written.result()
        finally:
            del self._pending[key]
        self._index([(key, meta)])

    def _write_png(self, key: str, image: Image.Image) -> Path:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.stem}.{threading.get_ident()}.part.png")
        image.save(partial, compress_level=self.COMPRESS_LEVEL)
        os.replace(partial, path)  # a crash leaves no half-written PNG under the real name
        return path

    def _index(self, entries: Sequence[tuple[str, dict[str, Any]]]) -> None:
        append_lines(self.root / "index.jsonl", [json.dumps({"key": key, **meta}, sort_keys=True)
                                                 for key, meta in entries], fsync=False)

    def discard(self, keys: Iterable[str]) -> int:
        """Remove these images' PNGs, once pending writes are done (scores, cached apart, stay); the index notes
        each removal. Returns how many were removed."""
        self.flush()
        removed = []
        for key in dict.fromkeys(keys):
            try:
                self.path(key).unlink()
            except FileNotFoundError:
                continue
            removed.append((key, {"removed": True}))
        if removed:
            self._index(removed)
        return len(removed)

    def __len__(self) -> int:
        return sum(1 for _ in (self.root / "images").rglob("*.png"))

    def __getstate__(self) -> dict[str, Any]:
        # a cache travels between processes (inside `Generated.by_reference`) as its folder; writes stay here
        return {"root": self.root}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.root, self._pending, self._writers = state["root"], OrderedDict(), None


# ------------------------------------------------------------------------------------------- executor

@dataclass
class ExecutorConfig:
    """How the executor renders. `max_side` scales sizes down (tiny models draw at 32–64 px), keeping aspect;
    `max_sampling_steps` caps the steps drawn (a random-weight tiny UNet gains nothing from 30 steps over 10, and its
    per-step cost, mostly Python overhead, is most of the tiny book's time). The API call keeps its own values."""

    max_side: int | None = None
    max_sampling_steps: int | None = None
    batch_size: int = 8  # images per diffusers call up to 512×512; larger images come proportionally fewer at a time
    max_pipelines: int = 4
    device: str = "cpu"
    dtype: str = "float32"
    channels_last: bool = False  # helpers.speed: NHWC UNet/VAE (on by default on CUDA)
    compile_unet: bool = False  # helpers.speed: torch.compile the UNet (paper profile on CUDA)
    # LoRAs merged into the weights (one at a time) instead of loaded as adapters; None: when the UNet is compiled,
    # where each adapter would change the module tree and recompile the UNet (`merge_lora`)
    merge_loras: bool | None = None
    max_loras: int = 8  # adapters kept loaded per pipeline when not merged (least recently used ones are dropped)

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be at least 1")
        if self.max_loras < 1:
            raise ValueError(f"max_loras={self.max_loras} must be at least 1")
        if self.max_side is not None and (self.max_side < 16 or self.max_side % 8):
            raise ValueError(f"max_side={self.max_side} must be a multiple of 8, at least 16 (or None for native)")
        if self.max_sampling_steps is not None and self.max_sampling_steps < 1:
            raise ValueError(f"max_sampling_steps={self.max_sampling_steps} must be at least 1 (or None for the API "
                             "call's own steps)")


class Generated:
    """An image for a request, with its cache key and whether it came from the cache.

    An image read from the cache is decoded only when `.image` is first used (then kept): a stage that needs only
    keys, or whose scores are all cached, reads no PNG, and under a multi-process launch the images one process
    drew reach the others as keys into the shared cache, not as pixels sent between processes.
    """

    __slots__ = ("request", "key", "cached", "weights_id", "size", "_image", "_cache")

    def __init__(self, request: Request, image: Image.Image | None, key: str, cached: bool, weights_id: str,
                 size: tuple[int, int], cache: ImageCache | None = None):
        if image is None and cache is None:
            raise ValueError(f"Generated {key!r} needs its image or the ImageCache that holds it")
        self.request, self.key, self.cached, self.weights_id, self.size = request, key, cached, weights_id, size
        self._image, self._cache = image, cache

    @property
    def image(self) -> Image.Image:
        if self._image is None:
            self._image = self._cache.get(self.key)
            if self._image is None:
                raise FileNotFoundError(f"image {self.key} is not in the image cache ({self._cache.path(self.key)}): "
                                        "it was removed after this run found it there (run the stage again), or it "
                                        "was not drawn because only its cached scores were asked for (draw it with "
                                        "Executor.generate)")
        return self._image

    @property
    def decoded(self) -> bool:
        """Whether the pixels are in memory (drawn here, or read from the cache already)."""
        return self._image is not None

    def by_reference(self) -> "Generated":
        """The same image without its pixels, which are read from the cache on use (it must be there)."""
        if self._cache is None:
            raise ValueError(f"Generated {self.key!r} has no ImageCache to be read back from")
        return Generated(self.request, None, self.key, self.cached, self.weights_id, self.size, self._cache)

    def __repr__(self) -> str:
        return (f"Generated(key={self.key!r}, cached={self.cached}, weights_id={self.weights_id!r}, "
                f"size={self.size}, decoded={self.decoded})")


def decoded(generated: Sequence[Generated]) -> list[Image.Image]:
    """The pixels of each image, those still in the cache read in threads (PNG decoding runs without the GIL;
    ~5 ms for a 512 px image), then kept on their `Generated` as `.image` keeps them. A key that comes more than
    once (the same request twice in one call) is read once. Anything else with an `.image` gives that; a PIL image
    is itself."""
    from .scorers.base import chunks_in_threads

    pending: dict[tuple[int, str], list[Generated]] = {}
    for g in generated:
        if not getattr(g, "decoded", True):
            pending.setdefault((id(g._cache), g.key), []).append(g)

    def read(chunk: list[list[Generated]]) -> None:
        for first, *same in chunk:
            image = first.image
            for other in same:
                other._image = image

    chunks_in_threads(read, list(pending.values()))
    return [getattr(g, "image", g) for g in generated]


BATCH_REFERENCE_PIXELS = 512 * 512
# requests drawn (and, by the callers, scored) per block in `Executor.generate_in_blocks`: about 3 GB of 512 px
# images in memory, 13 GB at 1024 px, whatever the run's size (RRHF at paper scale draws ~240,000 images)
IMAGE_BLOCK = 4096


def images_per_batch(batch_size: int, width: int, height: int) -> int:
    """Images per diffusers call at `width`×`height`: `batch_size` up to 512×512, fewer in proportion above it.

    UNet activations and the batched VAE decode grow with pixels × images, so one setting suits a whole run that
    mixes SD 1.5 at 512 px with SDXL at 1024 px: 32 at 512×512 is 8 at 1024×1024 (where 32 would not fit in 80 GB).
    """
    return max(1, min(batch_size, batch_size * BATCH_REFERENCE_PIXELS // (width * height)))


def drawn_with(device: str, dtype: str) -> str:
    """What, besides the request and the weights, decides an image's pixels: the kind of device, whose generators
    draw the noise (a CPU and a CUDA generator give other numbers for one seed), and the dtype the pipeline computes
    in (bf16 moves pixels by a few grey levels), e.g. "cuda/bfloat16". Part of the image cache key (`ImageCache.key`),
    so a cache that two machines share never hands one run's image to the other, and a run's tables come from its
    own setting."""
    return f"{torch.device(device).type}/{dtype}"


def drawn_steps(steps: int, max_sampling_steps: int | None) -> int:
    """The sampling steps actually drawn: the call's own, or the cap when it asks for more."""
    return steps if max_sampling_steps is None or steps <= max_sampling_steps else max_sampling_steps


def render_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """The size actually drawn: native, or scaled so the long side is `max_side`, each side a multiple of 8."""
    if max_side is None:
        return width, height
    scale = max_side / max(width, height)
    return tuple(max(8, int(round(side * scale / 8)) * 8) for side in (width, height))


class Executor:
    """API call → images through diffusers, with pipelines cached per checkpoint and images cached per key."""

    def __init__(self, catalog: ModelCatalog, weights, cache: ImageCache, config: ExecutorConfig | None = None):
        self.catalog, self.weights, self.cache = catalog, weights, cache
        self.config = config or ExecutorConfig()
        self.pipelines: OrderedDict[str, Any] = OrderedDict()
        self.stats = Counter()
        # images per call up to 512×512 once a batch ran out of accelerator memory (None: `config.batch_size`)
        self.images_per_call: int | None = None

    @classmethod
    def for_run(cls, ctx: "RunContext", catalog: ModelCatalog, **config) -> "Executor":
        """The executor a notebook uses: profile's weights, the run's shared image cache, its device."""
        on_cuda = ctx.device.startswith("cuda")
        settings = {"device": ctx.device, "dtype": str(ctx.dtype).removeprefix("torch."), "channels_last": on_cuda,
                    "compile_unet": on_cuda and ctx.profile == "paper", **config}
        return cls(catalog, weights_store(ctx), ImageCache(ctx.runs_dir / "image_cache"), ExecutorConfig(**settings))

    # -- weights and pipelines
    def plan(self, api: dict[str, Any]) -> tuple[Weights, Weights | None]:
        """(checkpoint weights, LoRA weights or None) that run `api`."""
        model = self.catalog.lookup(api["model"], api.get("base_model"), api.get("type"))
        if model is None:
            raise ValueError(f"model {api['model']!r} ({api.get('base_model')}) is not in the catalog; validate the "
                             "API call first (helpers.t2i.validate)")
        if model.type != "LORA":
            return self.weights.checkpoint(model), None
        base = next((m for m in self.catalog.models if m.model_version_id == model.lora_base_version_id), None)
        base = base or CatalogModel(name=f"base of {model.name}", type="Checkpoint", base_model=model.base_model,
                                    model_version_id=model.lora_base_version_id or 0,
                                    is_base=model.lora_base_version_id is None)
        return self.weights.checkpoint(base), self.weights.lora(model)

    def pipeline(self, checkpoint: Weights, architecture: str):
        """The pipeline for a checkpoint, loaded once and kept (least recently used ones are dropped)."""
        if checkpoint.weights_id in self.pipelines:
            self.pipelines.move_to_end(checkpoint.weights_id)
            return self.pipelines[checkpoint.weights_id]
        base = self.weights.base(architecture) if checkpoint.kind == "file" else None
        # a Civitai checkpoint is filled in from the base model's folder when there is one (no hub needed)
        pipeline = load_pipeline(checkpoint, architecture, self.config.device, getattr(torch, self.config.dtype),
                                 config=base.path if base is not None and base.kind == "folder" else None)
        optimize_pipeline(pipeline, PipelineSettings(self.config.channels_last, self.config.compile_unet))
        self.stats["pipelines_loaded"] += 1
        self.pipelines[checkpoint.weights_id] = pipeline
        while len(self.pipelines) > self.config.max_pipelines:
            self.pipelines.popitem(last=False)
        return pipeline

    @property
    def merges_loras(self) -> bool:
        return self.config.compile_unet if self.config.merge_loras is None else self.config.merge_loras

    def _with_lora(self, pipeline, lora: Weights | None):
        use_lora(pipeline, lora, merge=self.merges_loras, max_loras=self.config.max_loras)

    # -- generation
    def key(self, request: Request) -> str:
        """The image cache key `request` is drawn (or found) under."""
        return self._planned(request)[1]

    def _planned(self, request: Request) -> tuple[tuple[Weights, Weights | None], str, str, tuple[int, int], int]:
        checkpoint, lora = self.plan(request.api)
        weights_id = checkpoint.weights_id + (f"+{lora.weights_id}" if lora else "")
        size = render_size(request.api["width"], request.api["height"], self.config.max_side)
        steps = drawn_steps(request.api["sampling_steps"], self.config.max_sampling_steps)
        key = self.cache.key(request, weights_id, size, steps, self.drawn_on)
        return (checkpoint, lora), key, weights_id, size, steps

    @property
    def drawn_on(self) -> str:
        """What this executor draws on (`drawn_with`): part of each image's key and index row."""
        return drawn_with(self.config.device, self.config.dtype)

    def generate(self, requests: Sequence[Request], progress: bool = True,
                 needed: Callable[[str], bool] | None = None) -> list[Generated]:
        """Images for `requests` in order: cached ones read back, the rest drawn in batches of like settings.

        `needed(key)` False for an image not in the cache: it is not drawn, and comes back without pixels (a caller
        that needs only its cached scores). Under a multi-process launch the main process's batches are shared out
        whole (`helpers.distributed.map_sharded`), each drawn into the shared image cache exactly as one process
        would draw it, and every process gets all the images back: its own drawn ones in memory, the others' as
        cache keys read on use.
        """
        from .distributed import broadcast_from_main, launched_world_size, map_sharded

        if launched_world_size() == 1:
            planned, batches = self._plan(requests, needed)
            drawn = self._draw_batches(planned, batches, progress)
            return self._results(planned, drawn, set(drawn))
        requests = broadcast_from_main(list(requests))
        for request in requests:  # weights are built (a stage each) by every process together, before sharding
            self.plan(request.api)
        planned, batches = self._plan(requests, needed)
        # whole batches are shared out, as the main process planned them: each image is drawn in the batch one
        # process would draw it in, so the images do not depend on how many processes draw them. Each process
        # takes one run of consecutive batches (weights order) of about equal drawing cost, so it loads about its
        # share of the pipelines, where turns would have every process load nearly every one
        own: dict[str, Image.Image] = {}

        def here(share: list[list[tuple[str, int]]]) -> list[list[str]]:
            own.update(self._draw_batches(planned, share, progress))
            return [[key for key, _ in batch] for batch in share]  # keys travel between processes, pixels stay

        def cost(batch: list[tuple[str, int]]) -> float:  # denoiser work: images × steps × pixels
            request, _, _, (width, height) = planned[batch[0][1]]
            steps = drawn_steps(request.api["sampling_steps"], self.config.max_sampling_steps)
            return len(batch) * steps * width * height

        drawn_anywhere = {key for keys in map_sharded(here, batches, cost=cost) for key in keys}
        return self._results(planned, own, drawn_anywhere)

    def generate_in_blocks(self, requests: Sequence[Request], block_size: int = IMAGE_BLOCK, progress: bool = True,
                           needed: Callable[[str], bool] | None = None) -> Iterator[tuple[list[int], list[Generated]]]:
        """(indices into `requests`, their images) one block of at most `block_size` requests at a time.

        For runs too large to hold every image in memory: a caller scores (and caches the scores of) one block
        before the next is drawn, so memory stays bounded and a crash loses one block's work at most. Requests are
        ordered by their drawing settings (stably) before blocking, so a block holds few pipeline switches and full
        batches. One block (the whole run when it fits) keeps the input order. `needed`: as in `generate`.
        """
        from tqdm.auto import tqdm

        if block_size < 1:
            raise ValueError(f"block_size={block_size} must be at least 1")
        if len(requests) <= block_size:
            yield list(range(len(requests))), self.generate(requests, progress, needed=needed)
            return

        def settings(index: int) -> tuple[str, ...]:
            api = requests[index].api
            return tuple(str(api.get(name)) for name in ("base_model", "model", "type", "sampling_method",
                                                         "sampling_steps", "cfg_scale", "width", "height"))

        order = sorted(range(len(requests)), key=settings)
        bar = tqdm(total=len(requests), desc=f"images (blocks of {block_size})", unit="image", disable=not progress)
        try:
            for start in range(0, len(order), block_size):
                indices = order[start:start + block_size]
                yield indices, self.generate([requests[i] for i in indices], progress=False, needed=needed)
                bar.update(len(indices))
        finally:
            bar.close()

    def _plan(self, requests: Sequence[Request], needed: Callable[[str], bool] | None = None
              ) -> tuple[list[tuple[Request, str, str, tuple[int, int]]], list[list[tuple[str, int]]]]:
        """(request, key, weights id, size) per request, and the batches to draw as (key, request index) lists, in
        drawing order: images of like settings together, a checkpoint's together and its LoRAs in turn (each
        pipeline loads once); a cached image, one not `needed`, or a key asked for twice is not drawn (again)."""
        planned, todo, cached = [], {}, set()
        for index, request in enumerate(requests):
            plan = self._planned(request)
            _, key, weights_id, size, _ = plan
            planned.append((request, key, weights_id, size))
            if key in cached or self.cache.has(key):  # decoded only when its pixels are used (`Generated.image`)
                cached.add(key)
                self.stats["cache_hits"] += 1
                continue
            if needed is not None and not needed(key):
                self.stats["not_needed"] += 1
                continue
            # the same key twice in one call is drawn once
            todo.setdefault(self._group(request, plan), {}).setdefault(key, index)

        def weights_order(item):
            checkpoint, lora = item[0][:2]
            return checkpoint.weights_id, lora.weights_id if lora else ""

        return planned, [batch for group, keys in sorted(todo.items(), key=weights_order)
                         for batch in self._batches(group, list(keys.items()))]

    def _group(self, request: Request, plan: tuple | None = None) -> tuple:
        """What the images of one batch share: checkpoint, LoRA, architecture, sampler, steps, CFG, size (`plan`:
        the request's `_planned`, when known)."""
        (checkpoint, lora), _, _, size, steps = plan or self._planned(request)
        return (checkpoint, lora, request.api["base_model"], request.api["sampling_method"], steps,
                float(request.api["cfg_scale"]), size)

    def _draw_batches(self, planned, batches: Sequence[Sequence[tuple[str, int]]], progress: bool
                      ) -> dict[str, Image.Image]:
        """Draw `batches` of `_plan`; every PNG is on disk when this returns, also after a failed batch."""
        from tqdm.auto import tqdm

        drawn: dict[str, Image.Image] = {}
        bar = tqdm(total=sum(len(batch) for batch in batches), desc="images", disable=not progress or not batches)
        try:
            for batch in batches:
                group = self._group(planned[batch[0][1]][0])
                drawn.update(self._draw_fitting(group, [(key, planned[index]) for key, index in batch]))
                bar.update(len(batch))
        finally:  # what was drawn before a failure reaches the disk; other processes read the PNGs
            bar.close()
            self.cache.flush()
        return drawn

    def _results(self, planned, drawn: Mapping[str, Image.Image], drawn_anywhere: set[str]) -> list[Generated]:
        """One `Generated` per request: pixels in memory when drawn here, else read from the cache on use."""
        return [Generated(request, drawn.get(key), key, key not in drawn_anywhere, weights_id, size, self.cache)
                for request, key, weights_id, size in planned]

    def _note_overflow(self, pipeline, texts: list[str]) -> None:
        """Counts prompts past the text window in `stats["texts_over_token_window"]`; says so once per executor."""
        over = clip_overflow(pipeline, texts)
        if over and not self.stats["texts_over_token_window"]:
            say(f"Note: a prompt or negative prompt is longer than the text encoder's "
                f"{pipeline.tokenizer.model_max_length}-token window; only its start conditions the image, as in "
                "diffusers. The executor counts them in stats['texts_over_token_window'].")
        self.stats["texts_over_token_window"] += over

    def _batches(self, group, items):
        limit = self.config.batch_size if self.images_per_call is None else \
            min(self.config.batch_size, self.images_per_call)
        size = 1 if group[3] in PER_IMAGE_SAMPLERS else images_per_batch(limit, *group[-1])
        return [items[i:i + size] for i in range(0, len(items), size)]

    def _draw_fitting(self, group, batch) -> dict[str, Image.Image]:
        """`_draw` a batch, in parts where the accelerator runs out of memory (`speed.fitting_batches`): a part that
        does not fit is drawn again in halves, and later batches are planned at the size that fitted
        (`images_per_call`), so a long run goes on. Each image keeps its own seed's noise; only the batch it shares
        its arithmetic with changes."""
        fits = len(self._batches(group, batch)[0])  # images per call at this size, as things stand
        drawn, fitted = fitting_batches(lambda part: list(self._draw(group, part).items()), batch, fits,
                                        "image drawing")
        if fitted < fits:  # the setting that gives `fitted` images per call at this size
            width, height = group[-1]
            setting = fitted * max(BATCH_REFERENCE_PIXELS, width * height) // BATCH_REFERENCE_PIXELS
            self.images_per_call = max(1, min(self.images_per_call or setting, setting))
            self.stats["out_of_memory_retries"] += 1
        return dict(drawn)

    def _draw(self, group, batch) -> dict[str, Image.Image]:
        checkpoint, lora, architecture, sampler, steps, cfg, (width, height) = group
        pipeline = self.pipeline(checkpoint, architecture)
        self._with_lora(pipeline, lora)
        scheduler = make_scheduler(sampler, pipeline.scheduler.config)
        if sampler in PER_IMAGE_SAMPLERS:
            scheduler.register_to_config(noise_sampler_seed=batch[0][1][0].seed)
            scheduler.noise_sampler_seed = batch[0][1][0].seed
        pipeline.scheduler = scheduler
        requests = [planned[0] for _, planned in batch]
        self._note_overflow(pipeline, [text for r in requests for text in (r.prompt, r.negative_prompt) if text])
        with torch.inference_mode():
            conditioning = text_conditioning(pipeline, requests, architecture, self.config.device) \
                if any(r.text_noise for r in requests) else {}
        images = render(pipeline, [r.prompt for r in requests], [r.negative_prompt for r in requests],
                        [r.seed for r in requests], steps=steps, cfg=cfg, width=width, height=height,
                        device=self.config.device, **conditioning)
        self.stats["generated"] += len(images)
        self.stats["batches"] += 1
        for (key, (request, _, weights_id, size)), image in zip(batch, images):
            # encoded and written by background threads while the next batch is drawn (`_draw_batches` flushes)
            self.cache.put_later(key, image, {"model": request.api["model"], "weights": weights_id,
                                              "seed": request.seed, "prompt": request.prompt, "size": list(size),
                                              "sampler": sampler, "drawn_with": self.drawn_on})
        return {key: image for (key, _), image in zip(batch, images)}


def text_conditioning(pipeline, requests: Sequence[Request], architecture: str, device: str) -> dict[str, Any]:
    """Prompt embeddings for a batch, each request's with N(0, σ²) noise added (σ = its `text_noise`).

    AGFSync varies the candidates of one prompt by noising the text-encoder output; the noise of a request is
    drawn from its own seed, so an image depends only on its request. SDXL's pooled embedding gets the same σ.
    """
    prompts, negatives = [r.prompt for r in requests], [r.negative_prompt for r in requests]
    with quiet_clip_truncation(pipeline):
        if architecture == "SDXL 1.0":
            embeds, negative_embeds, pooled, negative_pooled = pipeline.encode_prompt(
                prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True,
                negative_prompt=negatives)
        else:
            embeds, negative_embeds = pipeline.encode_prompt(prompts, device, 1, True, negative_prompt=negatives)
            pooled = negative_pooled = None
    embeds = embeds.clone()
    pooled = pooled.clone() if pooled is not None else None
    for row, request in enumerate(requests):
        if request.text_noise:
            noise = torch.Generator().manual_seed((request.seed * 1_000_003 + 17) % 2**63)
            embeds[row] += request.text_noise * torch.randn(embeds[row].shape, generator=noise).to(embeds)
            if pooled is not None:
                pooled[row] += request.text_noise * torch.randn(pooled[row].shape, generator=noise).to(pooled)
    conditioning = {"prompt_embeds": embeds, "negative_prompt_embeds": negative_embeds}
    if pooled is not None:
        conditioning.update(pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=negative_pooled)
    return conditioning


def use_lora(pipeline, lora: Weights | None, *, merge: bool, max_loras: int = 8) -> None:
    """Switch `pipeline` to this LoRA alone, or to no LoRA: merged into the weights (`merge_lora`, what a compiled
    UNet needs) or as a named adapter, loaded once and kept while it is among the `max_loras` most recently used."""
    if merge:
        merge_lora(pipeline, lora)
        return
    loaded: OrderedDict[str, None] = pipeline.__dict__.setdefault("_t2i_loras", OrderedDict())
    if lora is None:
        if loaded:
            pipeline.disable_lora()
        return
    name = "lora_" + lora.weights_id.replace("@", "_").replace(":", "_").replace(".", "_")
    if name in loaded:
        loaded.move_to_end(name)
    else:
        load_lora(pipeline, lora, name)
        loaded[name] = None
        while len(loaded) > max_loras:  # a paper-scale run meets hundreds of LoRAs, ~0.1 GB each
            pipeline.delete_adapters(loaded.popitem(last=False)[0])
    pipeline.enable_lora()
    pipeline.set_adapters([name], adapter_weights=[1.0])


class _OnlyMissingReport(logging.Filter):
    """Drops a transformers load report that lists nothing but MISSING weights: loading a LoRA beside other adapters,
    those are the other adapters' weights, which are not in this file. A report of anything else still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "LOAD REPORT" not in message:
            return True
        statuses = {re.sub(r"\x1b\[[0-9;]*m", "", line.split("|")[1]).strip()
                    for line in message.splitlines() if line.count("|") >= 2}
        return not statuses <= {"Status", "MISSING"}


class _EmptyFloat32Note(logging.Filter):
    """Drops diffusers' note that a model has modules to keep in float32 when it lists none (a single-file load
    casts each component with `.to(dtype)`): there is nothing to act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


@contextmanager
def _quiet_load(filters: dict[str, logging.Filter]) -> Iterator[None]:
    """No diffusers or transformers progress bars, and `filters` on the named libraries' log handlers, for the
    length of the block; the caller's settings come back afterwards. A paper run loads hundreds of checkpoints and
    switches LoRAs thousands of times: a bar each would bury the run's own."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    bars = [(library, library.is_progress_bar_enabled()) for library in (diffusers_logging, transformers_logging)]
    for library, _ in bars:
        library.disable_progress_bar()
    attached = [(handler, found) for name, found in filters.items() for handler in logging.getLogger(name).handlers]
    for handler, found in attached:
        handler.addFilter(found)
    try:
        yield
    finally:
        for handler, found in attached:
            handler.removeFilter(found)
        for library, enabled in bars:
            if enabled:
                library.enable_progress_bar()


def load_lora(pipeline, lora: Weights, name: str) -> None:
    """Load a LoRA (a diffusers folder or a single file) into `pipeline` as the adapter `name`."""
    from .config import errors_only

    path = Path(lora.path)
    # Civitai LoRAs often train the UNet only: not worth a warning
    with _quiet_load({"transformers": _OnlyMissingReport()}), errors_only("diffusers"), warnings.catch_warnings():
        # every LoRA is its own named adapter, on purpose; peft warns each time a second one is added
        warnings.filterwarnings("ignore", message=r"Already found a `peft_config` attribute")
        with local_weights(lora):
            if lora.kind == "file":
                pipeline.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
            else:
                pipeline.load_lora_weights(str(path), adapter_name=name)


def merge_lora(pipeline, lora: Weights | None) -> None:
    """Give `pipeline` this LoRA merged into its weights (W + scale·BA), or no LoRA, keeping its module tree.

    A LoRA loaded as an adapter wraps each layer it touches, and a compiled UNet guards on its modules: every new
    adapter recompiled it, and after torch's recompile limit (8) the UNet ran eagerly for the rest of the run. Here
    the LoRA is loaded, fused and unloaded again, so the plain layers (and their compiled graph) stay, and eager
    layers pay no LoRA matmuls. The first time a weight is changed it is copied; switching to another LoRA (or to
    none) writes the copies back first, so LoRAs never accumulate and the base is restored exactly.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    state = pipeline.__dict__.setdefault("_t2i_merged", {"lora": None, "original": {}})
    wanted = lora.weights_id if lora is not None else None
    if state["lora"] == wanted:
        return

    def restore() -> None:
        with torch.no_grad():
            for parameter, original in state["original"].values():
                parameter.copy_(original)
        state["lora"] = None

    if state["lora"] is not None:
        restore()
    if lora is None:
        return
    components = [name for name in pipeline._lora_loadable_modules if getattr(pipeline, name, None) is not None]
    try:
        load_lora(pipeline, lora, "merging")
        for component in components:
            for module in getattr(pipeline, component).modules():
                if isinstance(module, BaseTunerLayer):
                    for parameter in module.get_base_layer().parameters(recurse=False):
                        state["original"].setdefault(id(parameter), (parameter, parameter.detach().clone()))
        pipeline.fuse_lora(components=components, lora_scale=1.0, adapter_names=["merging"])
    except BaseException:  # a LoRA file that fails to load or fuse leaves the base weights
        restore()
        raise
    finally:  # either way the plain layers come back
        pipeline.unload_lora_weights()
        pipeline._merged_adapters = set()  # unloaded: nothing is left for diffusers to unfuse
    state["lora"] = wanted


def load_pipeline(checkpoint: Weights, architecture: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
                  config: str | None = None):
    """A text-to-image pipeline from a diffusers folder / hub id, or a single .safetensors/.ckpt file.

    A single file (a Civitai checkpoint, in the original layout) holds weights only: `config`, a diffusers folder of
    the same architecture, gives the components' configs, tokenizer and scheduler, offline; without it diffusers
    infers the model type from the file's keys and fetches that configuration from the Hugging Face Hub.
    """
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    pipeline_class = StableDiffusionXLPipeline if architecture == "SDXL 1.0" else StableDiffusionPipeline
    extra = {"add_watermarker": False} if architecture == "SDXL 1.0" else {"safety_checker": None,
                                                                          "requires_safety_checker": False}
    with local_weights(checkpoint), _quiet_load({"diffusers": _EmptyFloat32Note()}):
        if checkpoint.kind == "file":
            pipeline = pipeline_class.from_single_file(checkpoint.path, dtype=dtype, **extra,
                                                       **({"config": config} if config else {}))
        else:
            pipeline = DiffusionPipeline.from_pretrained(checkpoint.path, dtype=dtype, **extra)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def planted_failures(records: Sequence[dict], count: int, seed: int = 0) -> list[tuple[str, str | None]]:
    """`count` agent-like outputs built from real API calls, each clean or broken in one known way (for demos)."""
    import random

    rng = random.Random(seed)
    breakers = {
        "unparseable": lambda call: json.dumps(call)[: rng.randint(1, 40)],
        "unknown_model": lambda call: json.dumps({**call, "model": call["model"] + " Turbo XL"}),
        "base_model_mismatch": lambda call: json.dumps(
            {**call, "base_model": "SDXL 1.0" if call["base_model"] == "SD 1.5" else "SD 1.5"}),
        "unknown_sampler": lambda call: json.dumps({**call, "sampling_method": rng.choice(["Euler b", "DPM 3M",
                                                                                          "karras"])}),
        "bad_size": lambda call: json.dumps({**call, "width": rng.choice([500, 4096, 100])}),
        "steps_out_of_range": lambda call: json.dumps({**call, "sampling_steps": rng.choice([0, 500])}),
        "cfg_out_of_range": lambda call: json.dumps({**call, "cfg_scale": rng.choice([0.0, 45.0])}),
    }
    outputs = []
    for _ in range(count):
        call = dict(rng.choice(records)["api"])
        category = rng.choice([None, None, *breakers])  # about a quarter clean
        text = json.dumps(call) if category is None else breakers[category](call)
        outputs.append((f"Here is the API call: {text}", category))
    return outputs
