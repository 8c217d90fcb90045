"""Scoring images: CLIP score, the unified metric (DiffAgent eq. 5–6, ChatGen eq. 6), AGFSync's weighted score,
and a score cache so no image is scored twice by the same model.

The reward models themselves live in `helpers.scorers.*`; this module turns their raw outputs into the
numbers the papers report and the rewards RRHF trains on.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch

from .scorers.base import rgb, weights_id

if TYPE_CHECKING:  # pragma: no cover
    from .config import RunContext
    from .t2i import Generated

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
        local = Path(source)
        self.weights_id = weights_id(source, *sorted(local.glob("*.safetensors"))) if local.exists() else source

    @torch.no_grad()
    def cosine(self, images, prompts: Sequence[str]) -> np.ndarray:
        """Cosine of each image with its own prompt."""
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = self.processor(text=list(prompts[start:start + self.batch_size]),
                                   images=rgb(images[start:start + self.batch_size]), return_tensors="pt",
                                   padding=True, truncation=True).to(self.device)
            image = self.model.get_image_features(pixel_values=batch["pixel_values"])
            text = self.model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            image, text = (_features(x) for x in (image, text))
            out.append(torch.nn.functional.cosine_similarity(image.float(), text.float()).cpu().numpy())
        return np.concatenate(out).astype(np.float64)

    def score(self, images, prompts: Sequence[str]) -> np.ndarray:
        return clip_score(self.cosine(images, prompts))


def _features(output) -> torch.Tensor:
    """Projected features whether transformers returns a tensor or an output object holding them."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


# ------------------------------------------------------------------------------------------ score cache

class ScoreCache:
    """Append-only JSON lines of (image key, scorer, weights id) → value; a torn last line is skipped on read."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.values: dict[tuple[str, str, str], float] = {}
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the last line of a crashed run; that score is simply recomputed
                self.values[row["image"], row["scorer"], row["weights"]] = row["value"]

    def get(self, image_key: str, scorer: str, weights: str) -> float | None:
        return self.values.get((image_key, scorer, weights))

    def put_many(self, rows: Sequence[tuple[str, str, str, float]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            for image_key, scorer, weights, value in rows:
                handle.write(json.dumps({"image": image_key, "scorer": scorer, "weights": weights,
                                         "value": float(value)}) + "\n")
                self.values[image_key, scorer, weights] = float(value)
            handle.flush()
            os.fsync(handle.fileno())


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
                   ScoreCache(ctx.runs_dir / "image_cache" / "scores.jsonl"))

    def score(self, generated: Sequence["Generated"], prompts: Sequence[str] | None = None):
        """A DataFrame, one row per image, one column per scorer (raw units) plus `unified` (fixed ranges)."""
        import pandas as pd

        prompts = list(prompts) if prompts is not None else [g.request.prompt for g in generated]
        table = pd.DataFrame({"key": [g.key for g in generated], "prompt": prompts})
        for name, scorer in self.scorers.items():
            values = [self.cache.get(g.key, name, scorer.weights_id) for g in generated]
            todo = [i for i, v in enumerate(values) if v is None]
            if todo:
                fresh = scorer.score([generated[i].image for i in todo], [prompts[i] for i in todo])
                self.cache.put_many([(generated[i].key, name, scorer.weights_id, v) for i, v in zip(todo, fresh)])
                for i, v in zip(todo, fresh):
                    values[i] = float(v)
            self.computed += len(todo)
            self.reused += len(values) - len(todo)
            table[name] = values
        present = {n: table[n].to_numpy() for n in ("clip", "hps", "image_reward") if n in table}
        if present:
            table["unified"] = unified_metric(present, mode="fixed")
        return table


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
