"""Notebook 11: train ChatGen-Base and ChatGen-Evo on ChatGenBench, run them and the baseline on its test split,
draw and score every answer, and write the per-sample table the paper's Tables 4, 6 and 7 are read from."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from . import ChatSample
from ..scorers.fid import FeatureMoments
from .bench import load_bench
from .metrics import (ALL_PREDICTED, TABLE6_VARIANTS, image_requests, per_sample_frame, reference_requests,
                      set_level_metrics, with_ground_truth)


STAGE2_BASE = "stage1_language_model"  # the stage-1 chat model's text model, when stage 1 trained a LLaVA


def stage2_base(folder: Path) -> str:
    """The causal LM the ModelTokens sit on: the stage-1 model's text model (or the stage-1 model, if text only)."""
    tower = Path(folder) / STAGE2_BASE
    return str(tower if tower.is_dir() else Path(folder) / "stage1")


def ensure_chat_model(ctx, source: str) -> str:
    """The multimodal chat model: `source` (a folder or hub id), or the LLaVA-style stand-in built from the
    profile's agent LLM (a CLIP vision tower projected into it, random vision weights) when `source` is empty."""
    if source:
        return source
    from ..manifest import Stage
    from .vlm import build_tiny_vlm

    llm = ctx.model_path("agent_llm")
    folder = ctx.runs_dir / "models" / "chat_vlm"
    stage = Stage(folder, name="models/chat_vlm", params={"llm": ctx.relative(llm), "seed": ctx.seed},
                  inputs=[Path(llm)], code=["helpers.chatgen.vlm"], root=ctx.root, profile=ctx.profile)
    stage.quiet = True
    stage.run(lambda out: build_tiny_vlm(out, llm, seed=ctx.seed))
    return str(folder)


def train(folder: Path, ctx, samples: list[ChatSample], chat_source: str, sft_config, *, token_steps: int,
          token_lr: float, token_batch_size: int, image_for) -> dict[str, Any]:
    """ChatGen-Base (one SFT model answering everything), Evo stage 1 (prompt writing) and Evo stage 2 (ModelTokens
    on the text model of the stage-1 model, only the new rows train). Stage 3 needs no training."""
    from ..distributed import is_main_process
    from ..manifest import atomic_write_json
    from .evo import train_base, train_stage1
    from .model_tokens import ModelTokenHead, selection_example, train_model_tokens
    from .vlm import language_tower

    train_samples = [s for s in samples if s.split == "train"]
    counts = {f"base_{k}": v for k, v in train_base(chat_source, train_samples, sft_config, folder / "base",
                                                    image_for).items() if isinstance(v, (int, float))}
    counts.update({f"stage1_{k}": v for k, v in train_stage1(chat_source, train_samples, sft_config,
                                                             folder / "stage1", image_for).items()
                   if isinstance(v, (int, float))})
    if is_main_process():  # both SFT runs are done: their resume points go (the other processes share the folder)
        shutil.rmtree(sft_config.output_dir, ignore_errors=True)
    shutil.rmtree(folder / STAGE2_BASE, ignore_errors=True)  # a text-only stage 1 leaves none: no stale copy either
    tower = language_tower(folder / "stage1", folder / STAGE2_BASE)
    names = sorted({s.target["model"] for s in samples})
    # on the run's device: at paper scale stage 2 runs ~38 million tokens through the frozen 2B LM (cost model)
    head, tokenizer = ModelTokenHead.from_base(tower, names, ctx.device, ctx.dtype)
    log = train_model_tokens(head, tokenizer, [selection_example(s) for s in train_samples], steps=token_steps,
                             lr=token_lr, batch_size=token_batch_size, seed=ctx.seed)
    head.save(folder / "model_tokens")
    atomic_write_json(folder / "model_tokens" / "log.json", log)
    counts.update({"model_tokens": len(names), "token_steps": token_steps,
                   "token_first_loss": log[0]["loss"] if log else None,
                   "token_last_loss": log[-1]["loss"] if log else None})
    return counts


def predict(folder: Path, ctx, samples: list[ChatSample], records, catalog, chat_source: str, *, k: int,
            baseline_examples: int, image_for, max_new_tokens: int) -> list:
    """Every method's Predictions on the test split (and Evo's Table 6 variants)."""
    from .evo import run_base, run_baseline, run_evo
    from .model_tokens import ModelTokenHead
    from .vlm import load_chat_model

    test = [s for s in samples if s.split == "test"]
    train_samples = [s for s in samples if s.split == "train"]
    demonstrations = [r for r in records if r["split"] == "train"]
    head, tokenizer = ModelTokenHead.load(folder / "model_tokens", stage2_base(folder), ctx.device, ctx.dtype)
    evo = run_evo(load_chat_model(folder / "stage1", ctx.device, ctx.dtype), head, tokenizer, test, catalog,
                  demonstrations, image_for, k=k, prompt_tokens=max_new_tokens)
    base = run_base(load_chat_model(folder / "base", ctx.device, ctx.dtype), test, catalog, image_for,
                    max_new_tokens=max_new_tokens + 64)
    baseline = run_baseline(load_chat_model(chat_source, ctx.device, ctx.dtype), test, catalog,
                            examples=train_samples[:baseline_examples], image_for=image_for,
                            max_new_tokens=max_new_tokens)
    by_id = {s.id: s for s in test}
    variants = [with_ground_truth(p, by_id[p.sample_id], v) for p in evo for v in TABLE6_VARIANTS
                if v != ALL_PREDICTED]
    return [*evo, *base, *baseline, *variants]


def run_stage(folder: Path, ctx, bench_folder: Path, records, *, chat_source: str, sft_config,
              token_steps: int, token_lr: float, token_batch_size: int, k: int, baseline_examples: int,
              max_new_tokens: int, num_seeds: int, max_side: int | None, batch_size: int,
              fid_feature: str, max_sampling_steps: int | None = None, keep_images: bool = True) -> dict[str, Any]:
    """Notebook 11 end to end; writes predictions.jsonl, rows.csv (per sample) and set_metrics.csv (FID, per set)."""
    from ..distributed import broadcast_from_main, main_alone_threads
    from ..manifest import append_jsonl
    from ..scorers.bertscore import BertScorer
    from ..scorers.fid import FidFeatures
    from ..scoring import ScoringRun
    from ..t2i import Executor, ImageCache, ModelCatalog

    folder = Path(folder)
    samples = load_bench(bench_folder)
    catalog = ModelCatalog.from_records(records)
    cache = ImageCache(ctx.runs_dir / "image_cache")
    counts = train(folder, ctx, samples, chat_source, sft_config, token_steps=token_steps, token_lr=token_lr,
                   token_batch_size=token_batch_size, image_for=cache.get)
    predictions = predict(folder, ctx, samples, records, catalog, chat_source, k=k,
                          baseline_examples=baseline_examples, image_for=cache.get, max_new_tokens=max_new_tokens)
    (folder / "predictions.jsonl").unlink(missing_ok=True)
    append_jsonl(folder / "predictions.jsonl", [p.to_dict() for p in predictions])
    test = [s for s in samples if s.split == "test"]
    executor = Executor.for_run(ctx, catalog, max_side=max_side, batch_size=batch_size,
                                max_sampling_steps=max_sampling_steps)
    scoring = ScoringRun.for_run(ctx, ("clip", "hps", "image_reward"))
    # each image's FID features are extracted once, in the block that draws it, and kept on disk by image key: FIDs
    # of subsets come from the rows, and once an image's scores and features are in, its PNG can go (`keep_images`)
    # under a multi-process launch only the main process holds the rows (~3.3 GB at paper scale) and computes the
    # FIDs; the others know which images have theirs, so all agree on what is left to draw
    features = FidFeatures(ctx.model_path("clip") if fid_feature == "clip" else fid_feature, ctx.device,
                           image_size=None, store=cache.root / "fid_features",  # Inception: 299 px, as FID is defined
                           rows_on_main_only=True)
    plan = image_requests(predictions, test, catalog, num_seeds=num_seeds)
    keep = None if keep_images else (lambda index: False)
    scored = plan.scored(scoring.generate_and_score(executor, plan.requests, keep=keep, also=[features]))
    reference = reference_requests(test, catalog, num_seeds=num_seeds)
    embedding = ScoringRun({}, scoring.cache)  # the reference set is embedded, not scored
    reference_keys = list(embedding.generate_and_score(executor, reference.requests, keep=keep, also=[features])["key"])
    rows = per_sample_frame(predictions, test, BertScorer(ctx.model_path("text_similarity"), device=ctx.device),
                            scored)
    rows.to_csv(folder / "rows.csv", index=False)
    set_level = None
    if features.holds_rows:  # the main process alone, on the cores the waiting processes leave idle
        with main_alone_threads():
            set_level = set_metrics(scored, features, reference_keys_by_sample(reference.table["sample_id"],
                                                                                reference_keys))
    set_level = broadcast_from_main(set_level)
    set_level.to_csv(folder / "set_metrics.csv", index=False)
    counts.update({"test_samples": len(test), "predictions": len(predictions), "images": len(plan.requests),
                   "images_drawn": executor.stats["generated"],
                   "images_removed_once_scored": executor.stats["removed_once_scored"],
                   "valid_calls": sum(p.valid for p in predictions)})
    return counts


GROUPINGS = (("method", "setting"), ("variant",), ("method", "input_type"))  # Tables 4, 6, 7


def reference_keys_by_sample(samples: Sequence[str], keys: Sequence[str]) -> dict[str, list[str]]:
    """The reference images' keys of each sample, from the reference table's `sample_id` column and its keys."""
    found: dict[str, list[str]] = {}
    for sample, key in zip(samples, keys, strict=True):
        found.setdefault(sample, []).append(key)
    return found


def set_groups(scored: pd.DataFrame):
    """(grouping keys, their values, the rows) of each image set a table row's FID is computed over: Table 4's
    (method, setting) and Table 7's (method, input type) over fully predicted calls, Table 6's variants of
    ChatGen-Evo."""
    keyed = scored.assign(variant=scored.get("variant", ALL_PREDICTED)).reset_index(drop=True)
    for keys in GROUPINGS:
        chosen = keyed if keys == ("variant",) else keyed[keyed["variant"] == ALL_PREDICTED]
        if keys == ("variant",):
            chosen = chosen[chosen["method"] == "ChatGen-Evo"]
        for values, group in chosen.groupby(list(keys)):
            yield keys, values if isinstance(values, tuple) else (values,), group


SAMPLE_COLUMNS = ("setting", "input_type")  # a chat's own: the same for every method's images of it


def set_metrics(scored: pd.DataFrame, features, reference_keys: Mapping[str, Sequence[str]]) -> pd.DataFrame:
    """FID (and the unified metric) of each table row's image set against the same samples' reference images,
    from FID features extracted once per image: `features` (`scorers.fid.FidFeatures`) holds a row for each
    `scored` image (its `key` column) and each reference image, `reference_keys` the reference keys of each sample.

    Each FID reads its two sets as `FeatureMoments`, a chunk of rows at a time, so no set's rows are ever copied
    out whole (at paper scale ChatGen's ~400,000 Inception rows would be 3.3 GB as float32, twice that as the
    float64 FID computes in). Each row is read about once, though Tables 4 and 7 both take every fully predicted
    image: the rows of one method, setting and input type are summed once and added into both tables' rows
    (`_moments_per_group`), and a reference set is the sums of its settings and input types less the samples it
    lacks (`_ReferenceSums`)."""
    groups = [(keys, values, group) for keys, values, group in set_groups(scored)
              if len(group) >= 2 and sum(len(reference_keys.get(sample, ()))
                                         for sample in group["sample_id"].unique()) >= 2]  # FID: ≥ 2 on each side
    keyed = scored.reset_index(drop=True)  # the row positions `set_groups` indexes by
    references = _ReferenceSums(features, reference_keys, keyed)
    found: dict[int, dict[str, Any]] = {}
    for number, generated in _moments_per_group(features, list(keyed["key"]), [group for *_, group in groups]):
        keys, values, group = groups[number]
        metrics = set_level_metrics(group, generated, references.of(group["sample_id"].unique()))
        found[number] = {**dict(zip(keys, values)), "grouping": "+".join(keys), "fid": metrics["fid"],
                         "unified": metrics["unified"]}
    # fixed columns, so that a run where no group had enough images still saves (and reads back) a table
    return pd.DataFrame([found[number] for number in range(len(groups))],
                        columns=[*dict.fromkeys(k for keys in GROUPINGS for k in keys), "grouping", "fid", "unified"])


def _moments_per_group(features, keys: Sequence[str], groups: Sequence[pd.DataFrame]):
    """(group number, the `FeatureMoments` of its rows) for each group (rows indexed by position in `keys`), each row
    read once: rows in the same groups are summed together and that sum added into each of them. Groups are
    taken one method at a time and a sum no later group needs is let go, so one method's sums are held at most
    (at paper scale 2 settings × 3 input types, 32 MB each for Inception rows)."""
    membership: dict[int, list[int]] = {}
    for number, group in enumerate(groups):
        for row in group.index.tolist():
            membership.setdefault(row, []).append(number)
    parts: dict[tuple[int, ...], list[int]] = {}  # the groups a row is in → those rows
    for row, numbers in membership.items():
        parts.setdefault(tuple(numbers), []).append(row)
    order = sorted(range(len(groups)), key=lambda number: str(groups[number]["method"].iloc[0]))
    position = {number: at for at, number in enumerate(order)}
    last_use = {part: max(position[number] for number in part) for part in parts}
    parts_of: dict[int, list[tuple[int, ...]]] = {}
    for part in parts:
        for number in part:
            parts_of.setdefault(number, []).append(part)
    held: dict[tuple[int, ...], Any] = {}
    for at, number in enumerate(order):
        for part in parts_of[number]:
            if part not in held:
                held[part] = features.moments([keys[row] for row in parts[part]])
        sums = [held.pop(part) if last_use[part] == at else held[part] for part in parts_of[number]]
        yield number, sums[0] if len(sums) == 1 else FeatureMoments.summed(sums)


class _ReferenceSums:
    """The `FeatureMoments` of any samples' reference images, each image read about once: the references are
    summed per cell of SAMPLE_COLUMNS (a chat's setting and input type), and a set is the sums of the cells its
    samples are in, less the samples of those cells it lacks (a method whose call failed for a chat has no image
    of it); read directly where it lacks more than it holds."""

    def __init__(self, features, reference_keys: Mapping[str, Sequence[str]], scored: pd.DataFrame):
        self.features, self.reference_keys = features, reference_keys
        first = scored.drop_duplicates("sample_id")
        self.cell_of = dict(zip(first["sample_id"], zip(*(first[column] for column in SAMPLE_COLUMNS))))
        self.cells: dict[tuple, list[str]] = {}
        for sample, cell in self.cell_of.items():
            if reference_keys.get(sample):
                self.cells.setdefault(cell, []).append(sample)
        self.sums: dict[tuple, Any] = {}  # at most one per cell (6 at paper scale, 32 MB each)

    def _keys(self, samples) -> list[str]:
        return [key for sample in samples for key in self.reference_keys[sample]]

    def of(self, samples: Sequence[str]):
        chosen = sorted(sample for sample in set(samples) if self.reference_keys.get(sample))
        members = set(chosen)
        touched = sorted({self.cell_of[sample] for sample in chosen})
        own = self._keys(chosen)
        lacking = self._keys(sample for cell in touched for sample in self.cells[cell] if sample not in members)
        if len(lacking) >= len(own):
            return self.features.moments(own)
        for cell in touched:
            if cell not in self.sums:
                self.sums[cell] = self.features.moments(self._keys(self.cells[cell]))
        total = self.sums[touched[0]] if len(touched) == 1 else FeatureMoments.summed([self.sums[c] for c in touched])
        return total - self.features.moments(lacking) if lacking else total


def grouping_rows(set_level: pd.DataFrame, keys: tuple[str, ...]) -> pd.DataFrame | None:
    """The rows of `set_metrics`' output for one of GROUPINGS, with only that grouping's key columns and the
    set-level metrics, ready for metrics.table4/6/7; None when the grouping has no row (FID had too few images
    in every group, as with a small profile's few test chats), so the table is built without FID."""
    if keys not in GROUPINGS:
        raise ValueError(f"unknown grouping {keys!r}; choose one of {GROUPINGS}")
    chosen = set_level[set_level["grouping"] == "+".join(keys)]
    if chosen.empty:
        return None
    return chosen[[*keys, *(c for c in ("fid", "unified") if c in chosen)]].reset_index(drop=True)
