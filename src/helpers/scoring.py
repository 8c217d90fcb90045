"""Scoring images: CLIP score, the unified metric (DiffAgent eq. 5–6, ChatGen eq. 6), AGFSync's weighted score,
and a score cache so no image is scored twice by the same model.

The reward models themselves live in `helpers.scorers.*`; this module turns their raw outputs into the
numbers the papers report and the rewards RRHF trains on.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Collection, Mapping, Sequence

import numpy as np
import torch

from .distributed import broadcast_from_main, is_main_process, map_sharded
from .manifest import Landed, append_jsonl
from .scorers.base import (in_fitting_batches, local_weight_files, pixels_in_threads, pooled, precision_id, rgb,
                           weights_id)
from .speed import fitting_batches
from .t2i import decoded

if TYPE_CHECKING:  # pragma: no cover
    from .config import RunContext
    from .t2i import Generated, Request

# Fixed normalisation ranges, raw units (DESIGN.md "Algorithms"): CLIP on its 0–100 scale, HPS v2 raw cosine,
# ImageReward normalised output, FID. Configuration, shown in the book with a sensitivity check.
DEFAULT_RANGES: dict[str, tuple[float, float]] = {"clip": (0.0, 100.0), "hps": (0.20, 0.30),
                                                  "image_reward": (-0.5, 0.5), "fid": (0.0, 100.0)}
LOWER_IS_BETTER = frozenset({"fid"})
DIFFAGENT_CLIP_WEIGHT = 2.5   # DiffAgent eq. 2: w · max(cos, 0), shown ×100 on the 0–100 scale
AGFSYNC_CLIP_GAMMA = 100.0    # AGFSync: γ · max(cos, 0)
AGFSYNC_WEIGHTS = (0.35, 0.55, 0.10)  # VQA, CLIP, aesthetic (paper); the released code uses (0, 0.85, 0.15)


def unified_metric(scores: Mapping[str, Any], mode: str = "fixed",
                   ranges: Mapping[str, tuple[float, float]] | None = None):
    """The 0–100 unified score: each metric min–max normalised, FID flipped, equal-weight mean × 100.

    `fixed` normalises over `ranges` (DEFAULT_RANGES); values outside a range extend past 0–100 rather than
    saturate, so rankings among very good images survive. `pooled` normalises over all values passed for a
    metric (pass every method's images together so they share one scale); a metric whose pooled values are
    all equal carries no information and counts 0.5. Scalars in → float out; arrays in → array out.
    """
    if mode not in ("fixed", "pooled"):
        raise ValueError(f"mode={mode!r} is not one of 'fixed', 'pooled'")
    if not scores:
        raise ValueError("scores is empty; pass at least one of " + ", ".join(DEFAULT_RANGES))
    ranges = {**DEFAULT_RANGES, **(ranges or {})}
    normalised = []
    for name, value in scores.items():
        if name not in ranges:
            raise ValueError(f"metric {name!r} has no normalisation range; known: {', '.join(ranges)} "
                             "(pass ranges={name: (low, high)} to add one)")
        values = np.asarray(value, dtype=np.float64)
        if not np.all(np.isfinite(values)):
            raise ValueError(f"metric {name!r} has non-finite values; drop or re-score those images first")
        low, high = ranges[name] if mode == "fixed" else (values.min(), values.max())
        if high < low or (mode == "fixed" and high == low):
            raise ValueError(f"range for {name!r} is ({low}, {high}); it needs low < high")
        share = np.full_like(values, 0.5) if high == low else (values - low) / (high - low)
        normalised.append(1.0 - share if name in LOWER_IS_BETTER else share)
    unified = 100.0 * np.mean(np.broadcast_arrays(*normalised), axis=0)
    return float(unified) if unified.ndim == 0 else unified


def clip_score(cosine, weight: float = DIFFAGENT_CLIP_WEIGHT, scale: float = 100.0):
    """scale · weight · max(cos, 0): DiffAgent's CLIP score on the 0–100 scale; AGFSync: weight=1, scale=γ=100."""
    return scale * weight * np.maximum(np.asarray(cosine, dtype=np.float64), 0.0)


def weighted_score(vqa, clip, aesthetic, weights: Sequence[float] = AGFSYNC_WEIGHTS):
    """AGFSync's combined score of 0–100 VQA, CLIP (γ = 100) and aesthetic scores, weighted 0.35 / 0.55 / 0.10."""
    if len(weights) != 3 or not np.isclose(sum(weights), 1.0):
        raise ValueError(f"weights={tuple(weights)} must be three numbers summing to 1 (VQA, CLIP, aesthetic)")
    w_vqa, w_clip, w_aesthetic = weights
    return (w_vqa * np.asarray(vqa, dtype=np.float64) + w_clip * np.asarray(clip, dtype=np.float64)
            + w_aesthetic * np.asarray(aesthetic, dtype=np.float64))


# ----------------------------------------------------------------------------------------- CLIP scorer

class ClipScorer:
    """CLIP image–text cosine through transformers' CLIPModel (tiny folder or `openai/clip-vit-base-patch16`)."""

    name = "clip"

    def __init__(self, source: str, device: str = "cpu", dtype: torch.dtype | None = None, batch_size: int = 32):
        from .models import load_clip

        self.model, self.processor = load_clip(source, device, dtype)
        self.device, self.batch_size = device, batch_size
        self.weights_id = precision_id(weights_id(source, *local_weight_files(source)), dtype)

    @classmethod
    def from_parts(cls, model, processor, weights: str, device: str = "cpu", batch_size: int = 32) -> "ClipScorer":
        """A scorer around an already-built CLIPModel and processor (benchmarks build full shapes in memory)."""
        scorer = cls.__new__(cls)
        scorer.model, scorer.processor, scorer.weights_id = model, processor, weights
        scorer.device, scorer.batch_size = device, batch_size
        return scorer

    @torch.no_grad()
    def cosine(self, images, prompts: Sequence[str]) -> np.ndarray:
        """Cosine of each image with its own prompt."""
        def batch_cosine(images, prompts):
            text = self.processor(text=prompts, return_tensors="pt", padding=True, truncation=True).to(self.device)
            pixels = pixels_in_threads(lambda chunk: self.processor(images=rgb(chunk), return_tensors="pt")[
                "pixel_values"], images)
            image = pooled(self.model.get_image_features(pixel_values=pixels.to(self.device, self.model.dtype)))
            words = pooled(self.model.get_text_features(input_ids=text["input_ids"],
                                                        attention_mask=text["attention_mask"]))
            return torch.nn.functional.cosine_similarity(image.float(), words.float())
        return np.asarray(in_fitting_batches(self, batch_cosine, images, list(prompts)), dtype=np.float64)

    def score(self, images, prompts: Sequence[str]) -> np.ndarray:
        return clip_score(self.cosine(images, prompts))


# ------------------------------------------------------------------------------------------ score cache

class ScoreCache:
    """Append-only JSON lines of (image key, scorer, weights id) → value; a torn last line is skipped on read.

    Values are numbers (scores, probabilities), or text where the costly step is a model's answer (TIFA's free
    answers: what BLIP-2 said is kept, and the cheap mapping onto a choice is done on every read).

    At paper scale the file holds millions of rows (RRHF's rewards, ChatGen's evaluation, AGFSync's candidates and
    their VQA answers). It is read 64 KB of whole lines at a time (`_json_rows`) into one dict of image → value per
    (scorer, weights), each image key one string for all its scorers: about a quarter of the memory a dict keyed by
    (image, scorer, weights) takes (`benchmarks/score_cache_memory.py`).
    `ScoreCache.shared(path)` hands every scoring run of a process one copy, reading only what others appended
    since: the rows it wrote itself it holds already, and does not parse back (3,000,000 rows written in batches of
    3,072 and looked up after each batch: 13.2 s of refreshes before, 0.11 s now, on a 2-core CPU).
    """

    _shared: dict[Path, "ScoreCache"] = {}
    READ_BYTES = 1 << 16  # whole lines read and parsed together, about this many bytes at a time

    def __init__(self, path: Path):
        self.path = Path(path)
        self._by_scorer: dict[tuple[str, str], dict[str, float | str]] = {}
        self._read_bytes = 0  # how much of the file is read: whole lines only
        self._identity: tuple[int, int] | None = None  # (device, inode) of the file read
        self._last_line = b""  # the last line read, checked to be still in place before reading on
        self.refresh()

    @classmethod
    def shared(cls, path: Path) -> "ScoreCache":
        """This process's one `ScoreCache` of `path`, brought up to date with the rows appended since it was last
        read: the scoring runs of a notebook share one copy instead of each reading millions of rows again and
        holding its own."""
        where = Path(path).resolve()
        cache = cls._shared.get(where)
        if cache is None:
            cache = cls._shared[where] = cls(path)
        else:
            cache.refresh()
        return cache

    def refresh(self) -> int:
        """Read the whole lines appended to the file since the last read (another file in its place, say one
        removed and started again, is read afresh); returns how many rows were read. A torn last line (a crashed
        run) is never read as a row: `append_jsonl` starts the next rows on a line of their own, and that score is
        recomputed."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            stat = None
        if stat is None:  # no file (yet, or removed): nothing is cached
            self._by_scorer, self._read_bytes, self._identity, self._last_line = {}, 0, None, b""
            return 0
        size, identity = stat.st_size, (stat.st_dev, stat.st_ino)
        if size == self._read_bytes and identity == self._identity:
            return 0
        read = 0
        with open(self.path, "rb") as handle:
            if identity != self._identity or size < self._read_bytes or not self._still_there(handle):
                self._by_scorer, self._read_bytes, self._last_line = {}, 0, b""  # another file now: read it all
                self._identity = identity
            handle.seek(self._read_bytes)
            while lines := handle.readlines(self.READ_BYTES):
                whole = lines if lines[-1].endswith(b"\n") else lines[:-1]  # a torn last line, or one being
                if whole:                                                      # written: read once a write ends it
                    self._read_bytes += sum(map(len, whole))
                    self._last_line = whole[-1]
                    read += self._store_rows(_json_rows(whole))
                if len(whole) < len(lines):
                    break
        return read

    def _still_there(self, handle) -> bool:
        """Whether the last line this object read is still where it read it: the file was only appended to since,
        not rewritten in place."""
        handle.seek(self._read_bytes - len(self._last_line))
        return handle.read(len(self._last_line)) == self._last_line

    def _store_rows(self, rows: list[dict[str, Any]]) -> int:
        """Holds each row (a dict as the file's lines hold them), each image key one interned string; returns how
        many (the loop runs millions of times at paper scale: lookups kept local)."""
        by_scorer, intern = self._by_scorer, sys.intern
        for row in rows:
            values = by_scorer.get((row["scorer"], row["weights"]))
            if values is None:
                values = by_scorer[row["scorer"], row["weights"]] = {}
            values[intern(row["image"])] = row["value"]
        return len(rows)

    def __len__(self) -> int:
        return sum(len(values) for values in self._by_scorer.values())

    def get(self, image_key: str, scorer: str, weights: str) -> float | str | None:
        values = self._by_scorer.get((scorer, weights))
        return None if values is None else values.get(image_key)

    def put_many(self, rows: Sequence[tuple[str, str, str, float | str]]) -> None:
        rows = [{"image": image_key, "scorer": scorer, "weights": weights, "value": cache_value(value)}
                for image_key, scorer, weights, value in rows]  # as the file holds them
        self._store_rows(rows)
        if is_main_process():  # under a multi-process launch every process holds the merged scores; one writes
            self._read_past(append_jsonl(self.path, rows))

    def _read_past(self, landed: Landed | None) -> None:
        """Count rows this object just appended, and holds already, as read: `refresh` does not parse back what it
        wrote (at paper scale millions of rows, ~3 µs each). Only where they begin exactly where reading stopped,
        in the file read, with the last line read still in place; otherwise (another writer's rows or a torn line
        came first, another file took its place) `refresh` reads them as any other rows."""
        if landed is None or landed.start != self._read_bytes:
            return
        if self._read_bytes == 0:  # a file this object found empty or missing: its rows are all there is
            same_file = self._identity in (None, landed.file)
        else:
            with open(self.path, "rb") as handle:
                same_file = self._identity == landed.file and self._still_there(handle)
        if same_file:
            self._identity, self._read_bytes, self._last_line = landed.file, landed.end, landed.last_line


def _json_rows(lines: list[bytes]) -> list[Any]:
    """The JSON value of each line (whole lines, each ending in a newline), skipping any that is not JSON: all of them
    parsed as one array, ~1.7× faster than a `json.loads` per line, and line by line only if that fails (a line torn
    by a crash and ended by the next write, which `append_jsonl` starts on a line of its own)."""
    try:
        return json.loads("[" + b",".join(lines).decode() + "]")  # a JSON text holds no raw newline: one per row
    except (json.JSONDecodeError, UnicodeDecodeError):
        pass
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line.decode()))  # decoded first: ~1.4× faster than json reading bytes
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
    return rows


def cache_value(value: Any) -> float | str:
    """A value as the score cache keeps it: text stays text, anything else becomes a float (numpy scalars too)."""
    return value if isinstance(value, str) else float(value)


def cached_answers(generated, questions: Sequence[Sequence[Any]], names: Sequence[Sequence[str]], weights: str,
                   cache: ScoreCache, *, model, answer, desc: str, images_per_batch: int) -> list[list[float | str]]:
    """Per image, one cached value per question about it: read from `cache`, the missing ones answered and added.

    Only images with a missing value are asked, `images_per_batch` images per `answer(model, images, questions)`
    call (one image per question, flattened; an image shared by its questions is one object, so a scorer can encode
    it once); a `model` that is a `LoadedOnUse` (or holds them) loads only if something is left to ask. Under a
    multi-process launch the images are split across processes; every process follows the main process's view of
    the cache, so all of them enter the split call or none does, and a value this process's own read missed comes
    from the main one.
    """
    from tqdm.auto import tqdm

    keys = [g.key for g in generated]
    values = broadcast_from_main([[cache.get(key, name, weights) for name in row] for key, row in zip(keys, names)])
    missing = [i for i, row in enumerate(values) if any(v is None for v in row)]
    # an image twice in a call, with the same questions, is asked once
    todo = first_of_each_key(missing, [(key, tuple(row)) for key, row in zip(keys, names)])
    if not todo:
        return values

    def ask_batch(batch: list[int]) -> list[list[float | str]]:
        pictures = dict(zip(batch, decoded([generated[i] for i in batch])))  # cached ones read in threads
        flat = list(answer(model, [pictures[i] for i in batch for _ in questions[i]],
                           [q for i in batch for q in questions[i]]))
        answered = []
        for i in batch:
            answered.append([cache_value(v) for v in flat[:len(questions[i])]])
            flat = flat[len(questions[i]):]
        return answered

    def ask(share: list[int]) -> list[list[float | str]]:
        # `images_per_batch` images per call, in halves where the GPU runs out of memory
        with tqdm(total=len(share), desc=desc, unit="image", disable=len(share) <= images_per_batch) as bar:
            return fitting_batches(ask_batch, share, images_per_batch, desc, bar.update)[0]

    fresh = map_sharded(ask, todo, chunk=images_per_batch)
    cache.put_many([(keys[i], name, weights, v) for i, row in zip(todo, fresh) for name, v in zip(names[i], row)])
    answered = {(keys[i], tuple(names[i])): row for i, row in zip(todo, fresh)}
    for i in missing:
        values[i] = list(answered[keys[i], tuple(names[i])])
    return values


def first_of_each_key(indices: Sequence[int], keys: Sequence[Any]) -> list[int]:
    """`indices` with only the first of those that share a key, in order (so no image is scored twice)."""
    first: dict[Any, int] = {}
    for i in indices:
        first.setdefault(keys[i], i)
    return list(first.values())


@dataclass
class ScoringRun:
    """Scores a batch of generated images with several scorers, reading and filling the score cache."""

    scorers: dict[str, Any]
    cache: ScoreCache
    computed: int = 0
    reused: int = 0

    @classmethod
    def for_run(cls, ctx: "RunContext", names: Sequence[str] = ("clip", "hps", "image_reward")) -> "ScoringRun":
        return cls({name: load_scorer(name, ctx) for name in names},
                   ScoreCache.shared(ctx.runs_dir / "image_cache" / "scores.jsonl"))

    def score(self, generated: Sequence["Generated"], prompts: Sequence[str] | None = None):
        """A DataFrame, one row per image, one column per scorer (raw units) plus `unified` (fixed ranges)."""
        import pandas as pd

        prompts = list(prompts) if prompts is not None else [g.request.prompt for g in generated]
        table = pd.DataFrame({"key": [g.key for g in generated], "prompt": prompts})
        for name, scorer in self.scorers.items():
            # the main process's view of the cache holds for every process: all enter the sharded call or none does,
            # and a value this process's own read missed (a read racing the main process's write) comes from it
            values = broadcast_from_main([self.cache.get(g.key, name, scorer.weights_id) for g in generated])
            missing = [i for i, v in enumerate(values) if v is None]
            todo = first_of_each_key(missing, [g.key for g in generated])  # an image twice in a call: scored once
            if todo:
                # split across processes under a multi-process launch (one process: a plain call)
                fresh = map_sharded(lambda share, scorer=scorer: scorer.score(decoded([generated[i] for i in share]),
                                                                              [prompts[i] for i in share]),
                                    todo, chunk=getattr(scorer, "batch_size", 32))
                self.cache.put_many([(generated[i].key, name, scorer.weights_id, v) for i, v in zip(todo, fresh)])
                by_key = {generated[i].key: float(v) for i, v in zip(todo, fresh)}
                for i in missing:
                    values[i] = by_key[generated[i].key]
            self.computed += len(todo)
            self.reused += len(values) - len(todo)
            table[name] = values
        present = {n: table[n].to_numpy() for n in ("clip", "hps", "image_reward") if n in table}
        if present:
            table["unified"] = unified_metric(present, mode="fixed")
        return table


    def scored(self, key: str) -> bool:
        """Whether every scorer's value for the image `key` is in the score cache."""
        return all(self.cache.get(key, name, scorer.weights_id) is not None for name, scorer in self.scorers.items())

    def generate_and_score(self, executor, requests: Sequence["Request"], block_size: int | None = None,
                           keep: Callable[[int], bool] | None = None, also: Sequence[Any] = ()):
        """`score(executor.generate(requests))`, one block of requests at a time (`score_in_blocks`).

        `keep` (request index → whether its image stays) is for a stage that uses the scores, not the pictures
        (`score_then_remove`): RRHF's ~240,000 reward images are ~100 GB of PNGs at paper scale. None keeps every
        image. `also`: per-image features kept by image key beside the scores, such as `scorers.fid.FidFeatures`
        with a store; each one's `add` is called with every block's images and keys before they can leave the
        cache, and with `keep` an image is drawn again only when a score or one of these rows is missing
        (`.has(key)`).
        """
        also = tuple(also)

        def score_block(indices: list[int], generated: Sequence["Generated"]):
            for features in also:
                features.add(generated, [g.key for g in generated])
            return self.score(generated)
        if keep is None:
            return score_in_blocks(executor, requests, score_block, block_size)
        keys = [executor.key(request) for request in requests]
        return score_then_remove(
            executor, requests, score_block, keep=keep, block_size=block_size, keys=keys,
            scored=lambda i: self.scored(keys[i]) and all(features.has(keys[i]) for features in also))


def score_then_remove(executor, requests: Sequence["Request"], score_block, *, scored: Callable[[int], bool],
                      keep: Callable[[int], bool], block_size: int | None = None,
                      keys: Sequence[str] | None = None, owned: Collection[str] = (),
                      spare: Collection[str] = ()):
    """`score_in_blocks` for a stage that needs the scores, not the pictures.

    An image this call draws leaves the image cache once its block is scored (`score_block` has cached what it
    needs), unless `keep(index)`; an image found in the cache stays, since another stage may show it, unless it is
    `owned` (the caller drew it earlier and kept it only for this call). An image in `spare` (keys) stays if drawn
    here, without being drawn for it (a later call asks for it too, and removes it). An image is
    drawn only when kept or when `scored(index)` is False for one of its requests, so a rerun draws only what has
    a score missing. Under a multi-process launch the main process removes the images, after the block's scores
    have reached every process; it alone counts them, in `executor.stats["removed_once_scored"]`. `keys`: the
    requests' image keys, if already computed.
    """
    keys = list(keys) if keys is not None else [executor.key(request) for request in requests]
    indices_of: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        indices_of.setdefault(key, []).append(i)
    kept = {keys[i] for i in range(len(requests)) if keep(i)}

    def block(indices: list[int], generated: Sequence["Generated"]):
        table = score_block(indices, generated)
        if is_main_process():  # every process has scored its share of the block by now
            executor.stats["removed_once_scored"] += executor.cache.discard(
                g.key for g in generated if (not g.cached or g.key in owned) and g.key not in kept
                and g.key not in spare)
        return table

    def needed(key: str) -> bool:
        return key in kept or not all(scored(i) for i in indices_of[key])
    return score_in_blocks(executor, requests, block, block_size, needed=needed)


def score_in_blocks(executor, requests: Sequence["Request"], score_block, block_size: int | None = None,
                    needed: Callable[[str], bool] | None = None):
    """One table for `requests`, in their order: `score_block(indices, images)` for each block the executor draws
    (`Executor.generate_in_blocks`; `needed` as there). At paper scale a stage's images do not fit in memory at
    once, and each block's scores reach the score cache before the next block is drawn, so a crash loses one block
    at most."""
    import pandas as pd

    blocks = executor.generate_in_blocks(requests, **({"block_size": block_size} if block_size else {}),
                                         needed=needed)
    parts = [score_block(indices, generated).set_index(pd.Index(indices)) for indices, generated in blocks]
    return pd.concat(parts).sort_index().reset_index(drop=True)


def load_scorer(name: str, ctx: "RunContext"):
    """The scorer for `name` in this run's profile, loaded through the one loader its official weights use."""
    from .models import resolve

    dtype = None if ctx.device == "cpu" else ctx.dtype
    if name == "clip":
        return ClipScorer(resolve("clip", ctx), ctx.device, dtype)
    if name == "hps":
        from .scorers.hps import load_hps

        return load_hps(resolve("hps", ctx), ctx.device, dtype)
    if name == "image_reward":
        from .scorers.image_reward import load_image_reward

        return load_image_reward(resolve("image_reward", ctx), ctx.device, dtype)
    if name == "aesthetic":
        from .scorers.aesthetic import load_aesthetic

        return load_aesthetic(resolve("aesthetic", ctx), ctx.device, dtype)
    raise ValueError(f"scorer {name!r} is not one of: clip, hps, image_reward, aesthetic")


def normalisation_sensitivity(table, variants: Mapping[str, Mapping[str, tuple[float, float]]],
                              by: str = "model"):
    """How a ranking of `by` groups by mean unified score moves when the fixed ranges change (Kendall τ vs default)."""
    import pandas as pd
    from scipy.stats import kendalltau

    metrics = [n for n in ("clip", "hps", "image_reward") if n in table]
    means = {}
    for label, ranges in {"default": {}, **variants}.items():
        unified = unified_metric({n: table[n].to_numpy() for n in metrics}, "fixed", ranges)
        means[label] = pd.Series(unified, index=table.index).groupby(table[by]).mean()
    frame = pd.DataFrame(means)
    ranks = frame.rank(ascending=False)
    tau = {label: kendalltau(ranks["default"], ranks[label]).statistic for label in frame}
    return frame, pd.Series(tau, name="kendall_tau_vs_default")


# ------------------------------------------------------------------------------------ stage 05 (notebook)

def stability_by_k(table, group: str = "api_id", value: str = "unified", seed_column: str = "seed_index"):
    """How the mean over the first k seeds approaches the mean over all seeds, per k (error, spread, rank τ)."""
    import pandas as pd
    from scipy.stats import kendalltau

    full = table.groupby(group)[value].mean()
    rows = []
    for k in range(1, int(table[seed_column].max()) + 2):
        first_k = table[table[seed_column] < k].groupby(group)[value]
        means = first_k.mean().reindex(full.index)
        rows.append({"k": k, "mean_abs_gap_to_all_seeds": float((means - full).abs().mean()),
                     "seed_std": float(first_k.std().mean()) if k > 1 else float("nan"),
                     "kendall_tau_vs_all_seeds": float(kendalltau(means, full).statistic)})
    return pd.DataFrame(rows).set_index("k")


def plot_stability(stability):
    """Two panels: the gap to the all-seed mean, and the rank agreement, against k images per API."""
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3))
    stability["mean_abs_gap_to_all_seeds"].plot(ax=left, marker="o")
    left.set(xlabel="k images per API", ylabel="|mean of k − mean of all|", title="Unified score vs k")
    stability["kendall_tau_vs_all_seeds"].plot(ax=right, marker="o", color="tab:green")
    right.set(xlabel="k images per API", ylabel="Kendall τ", title="Ranking of APIs vs k", ylim=(-1.05, 1.05))
    figure.tight_layout()
    return figure


SENSITIVITY_VARIANTS = {"HPS over [0.15, 0.35]": {"hps": (0.15, 0.35)},
                        "ImageReward over [-2, 2]": {"image_reward": (-2.0, 2.0)},
                        "CLIP over [50, 100]": {"clip": (50.0, 100.0)}}


def pick_showcase(records: Sequence[dict], count: int, seed: int = 0) -> list[dict]:
    """`count` test-split records covering both architectures and both model types where the split allows."""
    import random

    pool = [r for r in records if r["split"] == "test"] or list(records)
    rng = random.Random(seed)
    kinds: dict[tuple, list] = {}
    for record in pool:
        kinds.setdefault((record["architecture"], record["api"]["type"]), []).append(record)
    picked = []
    while len(picked) < min(count, len(pool)):
        for kind in sorted(kinds):
            left = [r for r in kinds[kind] if r not in picked]
            if left and len(picked) < count:
                picked.append(rng.choice(left))
    return picked


def run_showcase(folder: Path, ctx: "RunContext", dabench_path: Path, num_apis: int, num_seeds: int,
                 max_side: int | None, batch_size: int, scorer_names: Sequence[str],
                 num_outputs: int, max_sampling_steps: int | None = None) -> dict[str, Any]:
    """Stage 05: validate a mixed batch, run DABench APIs and their defaults over seeds, score, write tables."""
    import pandas as pd

    from . import t2i
    from .civitai import read_jsonl

    folder = Path(folder)
    records = read_jsonl(Path(dabench_path))
    catalog = t2i.ModelCatalog.from_records(records)
    planted = t2i.planted_failures(records, num_outputs, ctx.seed)
    checks = [t2i.validate(text, catalog) for text, _ in planted]
    pd.DataFrame([{"planted": p or "ok", "found": v.category or "ok", "detail": v.detail, "output": text[:90]}
                  for (text, p), v in zip(planted, checks)]).to_csv(folder / "validation.csv", index=False)
    requests, rows = [], []
    for api_id, record in enumerate(pick_showcase(records, num_apis, ctx.seed)):
        checked = t2i.validate(record["api"], catalog)
        calls = {"api": checked.api, "default": t2i.default_api(checked.model, record["api"]["width"],
                                                                record["api"]["height"])}
        for variant, call in calls.items():
            for seed_index in range(num_seeds):
                seed = ((record["seed"] or 0) + seed_index) % 2**32
                requests.append(t2i.Request(call, record["instruction"]["prompt"],
                                            record["instruction"]["negative_prompt"], seed))
                rows.append({"api_id": api_id, "record": record["id"], "variant": variant, "seed_index": seed_index,
                             "seed": seed, "model": call["model"], "type": call["type"],
                             "base_model": call["base_model"], "sampler": call["sampling_method"],
                             "steps": call["sampling_steps"], "cfg": call["cfg_scale"],
                             "size": f"{call['width']}×{call['height']}", "prompt": record["instruction"]["prompt"]})
    executor = t2i.Executor.for_run(ctx, catalog, max_side=max_side, batch_size=batch_size,
                                    max_sampling_steps=max_sampling_steps)
    scorer = ScoringRun.for_run(ctx, scorer_names)
    scores = scorer.generate_and_score(executor, requests).drop(columns=["prompt"])
    table = pd.concat([pd.DataFrame(rows), scores], axis=1)
    table.to_csv(folder / "scores.csv", index=False)
    api_rows = table[table["variant"] == "api"]
    stability_by_k(api_rows).to_csv(folder / "stability.csv")
    means, tau = normalisation_sensitivity(api_rows.assign(api=api_rows["api_id"]), SENSITIVITY_VARIANTS, by="api")
    means.to_csv(folder / "sensitivity_means.csv")
    tau.to_csv(folder / "sensitivity_tau.csv")
    return {"outputs_checked": len(checks), "hallucinations": sum(not v.ok for v in checks), "apis": num_apis,
            "images": len(requests), "images_drawn": executor.stats["generated"],
            "scores_computed": scorer.computed, "scores_reused": scorer.reused}


SCORERS = (  # name, registry role, loader, output in raw units, what the paper profile loads
    ("clip", "clip", "helpers.scoring.ClipScorer", "100 · 2.5 · max(cos, 0)", "transformers CLIPModel"),
    ("image_reward", "image_reward", "helpers.scorers.image_reward.load_image_reward",
     "(r − 0.1672) / 1.0333", "ImageReward.pt, official keys mapped onto transformers BLIP parts"),
    ("hps", "hps", "helpers.scorers.hps.load_hps", "raw cosine", "HPS_v2.1_compressed.pt, OpenCLIP keys mapped"),
    ("aesthetic", "aesthetic", "helpers.scorers.aesthetic.load_aesthetic", "LAION scale (≈1–10)",
     "sac+logos+ava1-l14-linearMSE.pth on CLIP ViT-L/14"),
    ("vqa", "vqa", "helpers.scorers.vqa.load_vqa", "P(yes); score = 100 · share of yes",
     "Blip2ForConditionalGeneration"),
    ("fid", "clip", "helpers.scorers.fid.fid_score", "FID (set level)", "Inception v3 via torch-fidelity"),
    ("bertscore", "text_similarity", "helpers.scorers.bertscore.BertScorer", "F1 of greedy token matches",
     "all-MiniLM-L6-v2 (real weights in every profile)"),
)


def scorer_table(profile: str):
    """Each scorer: the model this profile uses, the one the paper profile loads, the loader both go through."""
    import pandas as pd

    from .models import REGISTRY

    rows = [{"scorer": name, "this run": REGISTRY[role].for_profile(profile) if name != "fid" or profile == "paper"
             else f"{REGISTRY[role].for_profile(profile)} image features", "paper profile": REGISTRY[role].paper
             if name != "fid" else "Inception v3 (2048-d pool features)", "loader": loader, "units": units,
             "official weights": official} for name, role, loader, units, official in SCORERS]
    return pd.DataFrame(rows).set_index("scorer")
