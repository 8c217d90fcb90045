"""ChatGen's step-wise metrics and its Tables 4, 6 and 7 (ChatGen, Sec. 4), from Predictions and ChatGenBench samples.

Each step is scored on its own: the written prompt by BERTScore F1 against the demonstration's prompt (on
all-MiniLM-L6-v2, so the values do not compare with the paper's encoder), the chosen model by exact-name accuracy,
the arguments by exact match per argument (numbers as numbers), averaged over the arguments. The images are scored
by CLIP, HPS v2 and ImageReward (means over images) and by FID against the images of the ground-truth calls; the
four fold into ChatGen's unified metric with the *fixed* ranges of DESIGN.md (FID enters as 1 − norm).

Per-sample metrics get 95% percentile-bootstrap intervals over samples. FID is set-level (one number per image set)
and so is the unified metric built on it: neither has an interval, and the tables say so.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import numpy as np
import pandas as pd

from ..evaluation import bootstrap_ci
from ..scorers.fid import INCEPTION, FidFeatures, frechet_distance
from ..scoring import unified_metric
from ..t2i import ModelCatalog, Request, default_api, validate
from . import ARGUMENT_FIELDS, INPUT_TYPES, SETTINGS, ChatSample, Prediction

STEP_METRICS = ("prompt_bertscore", "selection_accuracy", "argument_accuracy")
IMAGE_METRICS = ("clip", "hps", "image_reward")  # per image, raw units (ScoringRun.score columns)
PER_SAMPLE_METRICS = (*STEP_METRICS, *IMAGE_METRICS)  # the ones with bootstrap intervals
UNIFIED_METRICS = ("fid", "clip", "hps", "image_reward")  # ChatGen eq. 6, equal weights
BASELINE_ARCHITECTURE = "SD 1.5"  # an invalid call falls back to this base model with the default parameters
ALL_PREDICTED = "all predicted"
REFERENCE = "Reference"  # the `method` of the ground-truth calls' images (FID's reference set)
# Table 6: which stages each variant takes from the method; the others come from the ground truth
TABLE6_VARIANTS = {"prompt only": ("prompt",), "model only": ("model",), "arguments only": ("arguments",),
                   ALL_PREDICTED: ("prompt", "model", "arguments")}
SET_LEVEL_NOTE = "fid, unified: set-level (one value per image set), no bootstrap interval"
COLUMN_NOTES = {"fid": "set-level: one FID per row's image set against the ground-truth calls' images; no interval",
                "unified": "fixed ranges (DESIGN.md) over FID (1 − norm), CLIP, HPS v2, ImageReward means; "
                           "set-level, no interval",
                "prompt_bertscore": "BERTScore F1 on all-MiniLM-L6-v2; an empty prompt scores 0"}


class Score(NamedTuple):
    """A metric's mean over a set and its value for each sample, in input order."""

    mean: float
    per_sample: np.ndarray


class ArgumentScore(NamedTuple):
    """Argument accuracy: the mean, each sample's share of arguments right, and each argument's accuracy."""

    mean: float
    per_sample: np.ndarray
    per_field: dict[str, float]


# ------------------------------------------------------------------------------------------ step metrics

def _check_pairs(predicted: Sequence, reference: Sequence, what: str) -> None:
    if len(predicted) != len(reference):
        raise ValueError(f"got {len(predicted)} predicted {what} for {len(reference)} references; pair them one to one")
    if not len(predicted):
        raise ValueError(f"no {what} to score; pass at least one prediction")


def prompt_bertscore(predicted: Sequence[str | None], reference: Sequence[str], scorer) -> Score:
    """BERTScore F1 of each predicted prompt against its reference (`scorer`: a BertScorer); empty scores 0."""
    _check_pairs(predicted, reference, "prompts")
    values = np.zeros(len(predicted), dtype=np.float64)
    # an empty prompt wrote nothing: 0 by definition, not whatever [CLS]/[SEP] happen to match
    written = [i for i, prompt in enumerate(predicted) if prompt and str(prompt).strip()]
    if written:
        values[written] = scorer.score([predicted[i] for i in written], [reference[i] for i in written])["f1"]
    return Score(float(values.mean()), values)


def selection_accuracy(predicted_models: Sequence[str | None], reference_models: Sequence[str]) -> Score:
    """Share of samples whose chosen model has exactly the reference's name; no choice (None) is wrong."""
    _check_pairs(predicted_models, reference_models, "models")
    values = np.array([p is not None and p == r for p, r in zip(predicted_models, reference_models)], dtype=np.float64)
    return Score(float(values.mean()), values)


def _number(value: Any) -> float | None:
    """`value` as a finite float when it is a number or a numeric string (never a bool), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, numbers.Real) and math.isfinite(float(value)):
        return float(value)
    return None


def same_argument(predicted: Any, reference: Any) -> bool:
    """Exact match, numbers compared as numbers (7 == 7.0 == "7"); a missing (None) value is wrong."""
    if predicted is None or reference is None:
        return False
    predicted_number, reference_number = _number(predicted), _number(reference)
    if predicted_number is not None and reference_number is not None:
        return predicted_number == reference_number
    return isinstance(predicted, str) and isinstance(reference, str) and predicted.strip() == reference.strip()


def argument_accuracy(predicted_args: Sequence[Mapping[str, Any] | None], reference_args: Sequence[Mapping[str, Any]],
                      fields: Sequence[str] = ARGUMENT_FIELDS) -> ArgumentScore:
    """Exact match per argument (a missing one is wrong), averaged over `fields`; plus each field's accuracy."""
    _check_pairs(predicted_args, reference_args, "argument sets")
    if not fields:
        raise ValueError("fields is empty; pass the arguments to compare (default ARGUMENT_FIELDS)")
    for index, reference in enumerate(reference_args):
        missing = [name for name in fields if name not in reference]
        if missing:
            raise ValueError(f"reference arguments #{index} lack {missing}; pass ChatSample.target, which has them all")
    hits = np.array([[same_argument((predicted or {}).get(name), reference[name]) for name in fields]
                     for predicted, reference in zip(predicted_args, reference_args)], dtype=np.float64)
    per_sample = hits.mean(axis=1)
    return ArgumentScore(float(per_sample.mean()), per_sample, dict(zip(fields, hits.mean(axis=0).tolist())))


def variant_of(prediction: Prediction) -> str:
    """The Table 6 variant of a prediction: `notes["variant"]`, else `notes["predicted"]` (the one stage kept
    predicted, e.g. "model" → "model only"), else "all predicted"."""
    if "variant" in prediction.notes:
        return prediction.notes["variant"]
    kept = prediction.notes.get("predicted")
    return f"{kept} only" if kept in ("prompt", "model", "arguments") else ALL_PREDICTED


def _paired(predictions: Iterable[Prediction], samples: Iterable[ChatSample]) -> list[tuple[Prediction, ChatSample]]:
    """Each prediction with its sample; unknown samples and repeats within one (method, variant) are errors."""
    by_id = {sample.id: sample for sample in samples}
    pairs, seen = [], set()
    for prediction in predictions:
        if prediction.sample_id not in by_id:
            raise ValueError(f"prediction for sample {prediction.sample_id!r} ({prediction.method}) has no sample; "
                             "pass the samples the predictions were made for")
        key = (prediction.method, variant_of(prediction), prediction.sample_id)
        if key in seen:
            raise ValueError(f"{prediction.method} ({key[1]}) answers sample {prediction.sample_id!r} twice; "
                             "keep one prediction per method, variant and sample")
        seen.add(key)
        pairs.append((prediction, by_id[prediction.sample_id]))
    if not pairs:
        raise ValueError("no predictions to score")
    return pairs


def _step_scores(pairs: Sequence[tuple[Prediction, ChatSample]], scorer) -> tuple[Score, Score, ArgumentScore]:
    prompts = prompt_bertscore([p.prompt for p, _ in pairs], [s.target["prompt"] for _, s in pairs], scorer)
    models = selection_accuracy([p.model for p, _ in pairs], [s.target["model"] for _, s in pairs])
    arguments = argument_accuracy([p.arguments for p, _ in pairs], [s.target for _, s in pairs])
    return prompts, models, arguments


def step_metrics(predictions: Iterable[Prediction], samples: Iterable[ChatSample], scorer) -> dict[str, float]:
    """One row of step-wise metrics for one set of predictions (prompt, model, arguments, and each argument)."""
    pairs = _paired(predictions, samples)
    prompts, models, arguments = _step_scores(pairs, scorer)
    return {"samples": len(pairs), "prompt_bertscore": prompts.mean, "selection_accuracy": models.mean,
            "argument_accuracy": arguments.mean, **{f"argument_{k}": v for k, v in arguments.per_field.items()}}


def with_ground_truth(prediction: Prediction, sample: ChatSample, variant: str) -> Prediction:
    """Table 6: `prediction` with the ground truth put back for each stage `variant` does not predict."""
    if variant not in TABLE6_VARIANTS:
        raise ValueError(f"variant={variant!r} is not one of: {', '.join(TABLE6_VARIANTS)}")
    if prediction.sample_id != sample.id:
        raise ValueError(f"prediction is for sample {prediction.sample_id!r}, not {sample.id!r}")
    stages, target = TABLE6_VARIANTS[variant], sample.target
    # the negative prompt is written with the prompt, so it travels with the prompt stage
    return replace(prediction,
                   prompt=prediction.prompt if "prompt" in stages else target["prompt"],
                   negative_prompt=prediction.negative_prompt if "prompt" in stages else target["negative_prompt"],
                   model=prediction.model if "model" in stages else target["model"],
                   arguments=dict(prediction.arguments) if "arguments" in stages
                   else {name: target[name] for name in ARGUMENT_FIELDS},
                   notes={**prediction.notes, "variant": variant})


# ------------------------------------------------------------------------------------------ image requests

@dataclass
class ImagePlan:
    """Requests for the executor and, row for row, which sample, method and seed each one is."""

    requests: list[Request]
    table: pd.DataFrame

    def __len__(self) -> int:
        return len(self.requests)

    def scored(self, scores: pd.DataFrame) -> pd.DataFrame:
        """This plan's table with the per-image scores of `ScoringRun.score(executor.generate(plan.requests))`."""
        if len(scores) != len(self.table):
            raise ValueError(f"{len(scores)} score rows for {len(self.table)} requests; score every generated image")
        return pd.concat([self.table.reset_index(drop=True), scores.reset_index(drop=True)], axis=1)


def image_requests(predictions: Iterable[Prediction], samples: Iterable[ChatSample], catalog: ModelCatalog, *,
                   num_seeds: int, seed: int = 0) -> ImagePlan:
    """`num_seeds` Requests per prediction; a call `t2i.validate` rejects falls back to the baseline call."""
    if num_seeds < 1:
        raise ValueError(f"num_seeds={num_seeds} must be at least 1")
    baseline = default_api(catalog.base(BASELINE_ARCHITECTURE))
    requests, rows = [], []
    for prediction, sample in _paired(predictions, samples):
        # re-validated here whatever `prediction.valid` says: the catalog decides what can run
        checked = validate({**prediction.arguments, "model": prediction.model}, catalog)
        api = checked.api if checked.ok else baseline
        row = {"method": prediction.method, "variant": variant_of(prediction), "sample_id": sample.id,
               "setting": sample.setting, "input_type": sample.input_type, "predicted_model": prediction.model,
               "model": api["model"], "fallback": not checked.ok,
               "fallback_reason": "" if checked.ok else f"{checked.category}: {checked.detail}"}
        for seed_index in range(num_seeds):
            # the same seeds for every method and for the reference: a perfect call redraws the reference image
            requests.append(Request(api, prediction.prompt, prediction.negative_prompt, seed + seed_index))
            rows.append({**row, "seed_index": seed_index, "seed": seed + seed_index})
    return ImagePlan(requests, pd.DataFrame(rows))


def reference_requests(samples: Iterable[ChatSample], catalog: ModelCatalog, *, num_seeds: int,
                       seed: int = 0) -> ImagePlan:
    """Requests for the demonstrations' own calls (FID's reference set), with the seeds `image_requests` uses."""
    if num_seeds < 1:
        raise ValueError(f"num_seeds={num_seeds} must be at least 1")
    requests, rows = [], []
    for sample in samples:
        target = sample.target
        # through validate, so a prediction equal to the target yields the very same api dict (and image-cache key)
        checked = validate({name: target[name] for name in ("model", "type", "base_model", *ARGUMENT_FIELDS)},
                           catalog)
        if not checked.ok:
            raise ValueError(f"sample {sample.id}: its target call does not run ({checked.category}: {checked.detail});"
                             " build the catalog from the DABench records the bench was made from")
        row = {"method": REFERENCE, "variant": "ground truth", "sample_id": sample.id, "setting": sample.setting,
               "input_type": sample.input_type, "predicted_model": target["model"], "model": checked.api["model"],
               "fallback": False, "fallback_reason": ""}
        for seed_index in range(num_seeds):
            requests.append(Request(checked.api, target["prompt"], target["negative_prompt"], seed + seed_index))
            rows.append({**row, "seed_index": seed_index, "seed": seed + seed_index})
    if not requests:
        raise ValueError("no samples: the reference set needs at least one")
    return ImagePlan(requests, pd.DataFrame(rows))


# ------------------------------------------------------------------------------------------ image metrics

def unified_score(fid: float, clip: float, hps: float, image_reward: float,
                  ranges: Mapping[str, tuple[float, float]] | None = None) -> float:
    """ChatGen's unified metric of one row: fixed ranges, FID as 1 − norm, equal-weight mean × 100."""
    return unified_metric({"fid": fid, "clip": clip, "hps": hps, "image_reward": image_reward}, "fixed", ranges)


def _pil(images: Sequence) -> list:
    """PIL images from PIL images or `t2i.Generated` records (`t2i.decoded`)."""
    from ..t2i import decoded

    return decoded(images)


def image_metrics(generated_table: pd.DataFrame, generated_images: Sequence, reference_images: Sequence, *,
                  feature: str | Path = INCEPTION, ranges: Mapping[str, tuple[float, float]] | None = None,
                  batch_size: int = 32, device: str = "cpu", image_size: int = 299) -> dict[str, float]:
    """CLIP, HPS v2, ImageReward means of a method's images, their FID against the reference images, and unified.

    `generated_table` is `ScoringRun.score(...)` (or `ImagePlan.scored`) for `generated_images` (PIL images or
    `Generated`); `reference_images` are the ground-truth calls' images of the same samples (`reference_requests`).
    `feature` is what FID embeds with: Inception-v3, or a CLIP folder offline.
    """
    _check_scored(generated_table, len(generated_images), "images")
    features = FidFeatures(feature, device, image_size, batch_size)
    return set_level_metrics(generated_table, features(_pil(generated_images)), features(_pil(reference_images)),
                             ranges)


def set_level_metrics(generated_table: pd.DataFrame, generated_features, reference_features,
                      ranges: Mapping[str, tuple[float, float]] | None = None) -> dict[str, float]:
    """`image_metrics` from FID features already extracted (`scorers.fid.FidFeatures`), so a stage embeds each
    image once and computes the FID of any number of subsets from them: each side is an array (one row per image)
    or its `scorers.fid.FeatureMoments` (`FidFeatures.moments`), which never holds a set's rows at once."""
    _check_scored(generated_table, len(generated_features), "feature rows")
    means = {name: float(generated_table[name].mean()) for name in IMAGE_METRICS}
    fid = frechet_distance(reference_features, generated_features)
    return {"images": len(generated_table), "reference_images": len(reference_features), **means, "fid": fid,
            "unified": unified_score(fid, **means, ranges=ranges)}


def _check_scored(generated_table: pd.DataFrame, count: int, what: str) -> None:
    missing = [name for name in IMAGE_METRICS if name not in generated_table]
    if missing:
        raise ValueError(f"generated_table lacks {missing}; score the images with ScoringRun over "
                         f"{', '.join(IMAGE_METRICS)}")
    if count != len(generated_table):
        raise ValueError(f"{count} {what} for {len(generated_table)} score rows; pass the images the table scored, "
                         "in its order")


# ------------------------------------------------------------------------------------------ per-sample frame

def _image_scores_frame(image_scores: pd.DataFrame | Mapping[str, Any]) -> pd.DataFrame:
    """One row per image with `sample_id`, from a scored table or from {sample_id: {metric: value(s)}}."""
    if isinstance(image_scores, pd.DataFrame):
        table = image_scores
    else:
        parts = [(scores if isinstance(scores, pd.DataFrame)
                  else pd.DataFrame({k: np.atleast_1d(v) for k, v in scores.items()})).assign(sample_id=sample_id)
                 for sample_id, scores in image_scores.items()]
        table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({"sample_id": []})
    if "sample_id" not in table:
        raise ValueError("image_scores needs a sample_id column (ImagePlan.scored has one) or sample-id keys")
    if not any(name in table for name in IMAGE_METRICS):
        raise ValueError(f"image_scores has none of {', '.join(IMAGE_METRICS)}; score the images first")
    return table


def _join_image_scores(rows: pd.DataFrame, image_scores) -> pd.DataFrame:
    table = _image_scores_frame(image_scores)
    keys = [key for key in ("method", "variant", "sample_id") if key in table]
    for key in ("method", "variant"):
        if key not in keys and rows[key].nunique() > 1:
            raise ValueError(f"image_scores has no {key!r} column but the predictions span several; add it "
                             "(ImagePlan.scored has it) or pass one set at a time")
    columns = [name for name in (*IMAGE_METRICS, "fallback") if name in table]
    per_sample = table.groupby(keys, sort=False)[columns].mean().reset_index()  # mean over the seeds
    rows = rows.drop(columns=[c for c in columns if c in rows])
    return rows.merge(per_sample, on=keys, how="left", validate="many_to_one")


def per_sample_frame(predictions: Iterable[Prediction], samples: Iterable[ChatSample], scorer,
                     image_scores: pd.DataFrame | Mapping[str, Any] | None = None) -> pd.DataFrame:
    """The tidy frame the tables read: one row per prediction, keys plus each per-sample metric.

    `image_scores`: per-image scores keyed by sample id (a table with `sample_id`, and `method`/`variant` when
    several sets are passed, e.g. `ImagePlan.scored(...)`; or {sample_id: {metric: values}}); each sample gets the
    mean over its images, and a sample without images gets NaN (the tables skip NaN).
    """
    pairs = _paired(predictions, samples)
    prompts, models, arguments = _step_scores(pairs, scorer)
    rows = pd.DataFrame({"method": [p.method for p, _ in pairs], "setting": [s.setting for _, s in pairs],
                         "input_type": [s.input_type for _, s in pairs], "variant": [variant_of(p) for p, _ in pairs],
                         "sample_id": [s.id for _, s in pairs], "prompt_bertscore": prompts.per_sample,
                         "selection_accuracy": models.per_sample, "argument_accuracy": arguments.per_sample})
    for name in ARGUMENT_FIELDS:
        rows[f"argument_{name}"] = [float(same_argument((p.arguments or {}).get(name), s.target[name]))
                                   for p, s in pairs]
    return rows if image_scores is None else _join_image_scores(rows, image_scores)


# ------------------------------------------------------------------------------------------ tables

ORDERS = {"setting": SETTINGS, "input_type": INPUT_TYPES, "variant": tuple(TABLE6_VARIANTS)}


def _set_level(set_metrics: pd.DataFrame, match: Mapping[str, Any], by: Sequence[str]) -> float:
    """The FID of the one `set_metrics` row matching `match` (NaN when none does)."""
    if "fid" not in set_metrics:
        raise ValueError("set_metrics needs a 'fid' column (rows of image_metrics plus the table's key columns)")
    rows = set_metrics
    for column, value in match.items():
        if column in rows:
            rows = rows[rows[column] == value]
        elif column in by:
            raise ValueError(f"set_metrics needs a {column!r} column to match this table's rows")
    if len(rows) > 1:
        raise ValueError(f"{len(rows)} set_metrics rows match {dict(match)}; pass one FID per table row")
    return float(rows["fid"].iloc[0]) if len(rows) else float("nan")


def _aggregate(rows: pd.DataFrame, by: Sequence[str], filters: Mapping[str, Any], set_metrics: pd.DataFrame | None,
               num_resamples: int, seed: int, ranges) -> pd.DataFrame:
    """Means (with bootstrap intervals over samples) per `by` group of the rows passing `filters`."""
    missing = [c for c in (*by, *filters, "sample_id") if c not in rows]
    if missing:
        raise ValueError(f"rows lack columns {missing}; build them with per_sample_frame")
    for column, value in filters.items():
        rows = rows[rows[column] == value]
    if rows.empty:
        raise ValueError(f"no rows with {dict(filters)}; check the method / variant / setting names")
    metrics = [name for name in PER_SAMPLE_METRICS if name in rows]
    table = []
    for keys, group in rows.groupby(list(by), sort=False):
        keys = dict(zip(by, keys if isinstance(keys, tuple) else (keys,)))
        row: dict[str, Any] = {**keys, "samples": group["sample_id"].nunique()}
        for name in metrics:
            values = group[name].dropna().to_numpy(dtype=np.float64)
            mean, low, high = bootstrap_ci(values, num_resamples, seed) if values.size else (math.nan,) * 3
            row.update({name: mean, f"{name}_low": low, f"{name}_high": high})
        if "fallback" in group:
            row["fallback_rate"] = float(group["fallback"].astype(float).mean())
        if set_metrics is not None:
            row["fid"] = _set_level(set_metrics, {**filters, **keys}, by)
            means = [row.get(name, math.nan) for name in UNIFIED_METRICS]
            row["unified"] = unified_score(*means, ranges=ranges) if all(map(math.isfinite, means)) else math.nan
        table.append(row)
    table = pd.DataFrame(table)
    table = table.sort_values(list(by), key=lambda column: _rank(column), kind="stable").set_index(list(by))
    if set_metrics is not None:
        table["note"] = SET_LEVEL_NOTE
    table.attrs["column_notes"] = {k: v for k, v in COLUMN_NOTES.items() if k in table}
    return table


def _rank(column: pd.Series) -> pd.Series:
    """Sort key: the book's fixed order for settings, input types and variants; first appearance otherwise."""
    order = ORDERS.get(column.name) or tuple(dict.fromkeys(column))
    return column.map(lambda value: order.index(value) if value in order else len(order))


def table4(rows: pd.DataFrame, set_metrics: pd.DataFrame | None = None, *, num_resamples: int = 1000, seed: int = 0,
           ranges: Mapping[str, tuple[float, float]] | None = None) -> pd.DataFrame:
    """Table 4: methods × settings, every stage predicted; `set_metrics` (method, setting, fid) adds FID, unified."""
    filters = {"variant": ALL_PREDICTED} if "variant" in rows else {}
    return _aggregate(rows, ("method", "setting"), filters, set_metrics, num_resamples, seed, ranges)


def table6(rows: pd.DataFrame, set_metrics: pd.DataFrame | None = None, *, method: str = "ChatGen-Evo",
           setting: str | None = None, num_resamples: int = 1000, seed: int = 0,
           ranges: Mapping[str, tuple[float, float]] | None = None) -> pd.DataFrame:
    """Table 6: `method` with one stage predicted and the ground truth for the others (rows: TABLE6_VARIANTS)."""
    filters = {"method": method, **({"setting": setting} if setting is not None else {})}
    table = _aggregate(rows, ("variant",), filters, set_metrics, num_resamples, seed, ranges)
    unknown = [v for v in table.index if v not in TABLE6_VARIANTS]
    if unknown:
        raise ValueError(f"variants {unknown} are not Table 6's ({', '.join(TABLE6_VARIANTS)}); make them with "
                         "with_ground_truth")
    return table


def table7(rows: pd.DataFrame, set_metrics: pd.DataFrame | None = None, *, num_resamples: int = 1000, seed: int = 0,
           ranges: Mapping[str, tuple[float, float]] | None = None) -> pd.DataFrame:
    """Table 7: per method and input type (single / multimodal / history), every stage predicted."""
    filters = {"variant": ALL_PREDICTED} if "variant" in rows else {}
    return _aggregate(rows, ("method", "input_type"), filters, set_metrics, num_resamples, seed, ranges)
