"""DABench from a Civitai crawl: filters (DiffAgent Sec. 3.1), instruction–API pairs, splits, the HF dataset."""
from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from .api_call import ARCHITECTURES, CFG_RANGE, KNOWN_SAMPLERS, MODEL_TYPES, SIZE_RANGE, STEPS_RANGE, schema_errors
from .civitai import read_jsonl
from .manifest import write_jsonl

LORA_TAG = re.compile(r"<(?:lora|lyco|hypernet):[^>]*>", re.IGNORECASE)
SIZE = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")
SPLITS = (("train", 0.8), ("align", 0.1), ("test", 0.1))
ARCH_SUBSETS = {"SD 1.5": "sd15", "SDXL 1.0": "sdxl"}


@dataclass
class FilterConfig:
    """The paper's filters; the quality thresholds are parameters (the paper does not publish its values)."""

    architectures: tuple[str, ...] = ARCHITECTURES
    types: tuple[str, ...] = MODEL_TYPES
    min_downloads: int = 50  # model-level community stat
    min_positive_share: float = 0.0  # thumbs up / (up + down); older responses: rating / 5
    allow_nsfw: bool = False

    def __post_init__(self):
        unknown = set(self.architectures) - set(ARCHITECTURES)
        if unknown:
            raise ValueError(f"architectures {sorted(unknown)} are not supported; choose from {ARCHITECTURES}")
        if not 0 <= self.min_positive_share <= 1:
            raise ValueError(f"min_positive_share={self.min_positive_share} must lie in [0, 1]")


@dataclass
class Raw:
    """A crawl folder, indexed."""

    models: dict[int, dict[str, Any]]
    versions: dict[int, tuple[dict[str, Any], dict[str, Any]]]  # version id -> (model, version)
    images: list[dict[str, Any]]
    by_hash: dict[str, dict[str, Any]]  # upper-case hash -> {"found": bool, "version": ...}

    @classmethod
    def load(cls, folder: Path) -> "Raw":
        folder = Path(folder)
        models = {m["id"]: m for m in read_jsonl(folder / "models.jsonl")}
        versions = {v["id"]: (m, v) for m in models.values() for v in m.get("modelVersions") or []}
        hashes_path = folder / "versions_by_hash.jsonl"
        by_hash = {h["hash"]: h for h in read_jsonl(hashes_path)} if hashes_path.exists() else {}
        return cls(models, versions, read_jsonl(folder / "images.jsonl"), by_hash)


def positive_share(stats: dict[str, Any]) -> float:
    """Share of positive votes, from new (thumbs) or legacy (rating out of 5) stats."""
    up, down = stats.get("thumbsUpCount"), stats.get("thumbsDownCount")
    if up is not None:
        return up / (up + (down or 0)) if (up + (down or 0)) else 0.0
    return float(stats.get("rating") or 0.0) / 5.0


def strip_lora_tags(prompt: str) -> str:
    """Remove `<lora:name:0.7>`-style tags (the API names the LoRA instead) and tidy the commas left behind."""
    text = LORA_TAG.sub("", prompt)
    text = re.sub(r"\s*,\s*(,\s*)+", ", ", text)
    return re.sub(r"\s+", " ", text).strip(" ,")


def has_download(version: dict[str, Any]) -> bool:
    """A version is available when one of its files can be downloaded."""
    return any(f.get("downloadUrl") for f in version.get("files") or [])


class Malformed(ValueError):
    """A record the filters cannot read: quarantined with the reason, never a crash."""


def _number(value: Any, kind: type, name: str):
    try:
        number = kind(float(value)) if kind is int else kind(value)
    except (TypeError, ValueError):
        raise Malformed(f"meta.{name}={value!r} is not a number") from None
    if kind is int and float(value) != number:
        raise Malformed(f"meta.{name}={value!r} is not an integer")
    return number


def attribute(image: dict[str, Any], raw: Raw) -> tuple[dict, dict] | None:
    """The crawled (model, version) an image is a demonstration of: a LoRA it used if any, else its checkpoint."""
    found = [raw.versions[v] for v in image.get("modelVersionIds") or [] if v in raw.versions]
    found.sort(key=lambda mv: mv[0].get("type") != "LORA")
    return found[0] if found else None


def parse_parameters(meta: dict[str, Any]) -> dict[str, Any]:
    """Generation parameters from `meta`, typed; size from `meta.Size` (the generation size, not the file's)."""
    if not isinstance(meta, dict):
        raise Malformed(f"meta is a {type(meta).__name__}, not an object")
    size = meta.get("Size")
    match = SIZE.match(size) if isinstance(size, str) else None
    if size is not None and not match:
        raise Malformed(f"meta.Size={size!r} is not WIDTHxHEIGHT")
    prompt = meta.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise Malformed(f"meta.prompt is a {type(prompt).__name__}")
    return {
        "width": int(match.group(1)) if match else None, "height": int(match.group(2)) if match else None,
        "sampling_method": meta.get("sampler"),
        "sampling_steps": _number(meta["steps"], int, "steps") if meta.get("steps") is not None else None,
        "cfg_scale": _number(meta["cfgScale"], float, "cfgScale") if meta.get("cfgScale") is not None else None,
        "prompt": prompt, "negative_prompt": meta.get("negativePrompt") or "",
        "seed": _number(meta["seed"], int, "seed") if meta.get("seed") is not None else None,
    }


# Each filter looks at one candidate and returns why it goes, as (kind, detail), or None to keep it.
# The availability filter also records the LoRA's resolved base checkpoint. Order matters for the report.
def _no_meta(c, raw, cfg):
    return ("no generation metadata", "") if not c["image"].get("meta") else None


def _nsfw(c, raw, cfg):
    if cfg.allow_nsfw:
        return None
    if c["model"].get("nsfw"):
        return ("NSFW model", "")
    level = c["image"].get("nsfwLevel", "None")
    return ("NSFW image", f"nsfwLevel {level}") if level not in ("None", None) or c["image"].get("nsfw") is True else None


def _scope(c, raw, cfg):
    if c["model"].get("type") not in cfg.types:
        return ("type out of scope", str(c["model"].get("type")))
    if c["version"].get("baseModel") not in cfg.architectures:
        return ("base model out of scope", str(c["version"].get("baseModel")))
    return None


def _availability(c, raw, cfg):
    if not has_download(c["version"]):
        return ("no downloadable file", "")
    if c["model"].get("type") == "LORA":
        base_hash = str(c["image"]["meta"].get("Model hash") or "").upper()
        resolved = raw.by_hash.get(base_hash)
        if not resolved or not resolved.get("found"):
            return ("LoRA base checkpoint unresolved", base_hash or "no Model hash")
        base = resolved["version"]
        if base.get("baseModel") != c["version"].get("baseModel"):
            return ("LoRA base checkpoint of another architecture",
                    f"{c['version'].get('baseModel')} LoRA on {base.get('baseModel')}")
        c["lora_base"] = {"model_id": base["modelId"], "model_version_id": base["id"], "model": base["model"]["name"]}
    return None


def _parameters(c, raw, cfg):
    p = c["parameters"]
    missing = [k for k in ("width", "height", "sampling_method", "sampling_steps", "cfg_scale", "prompt") if p[k] is None]
    if missing:
        return ("missing parameters", ", ".join(missing))
    if p["sampling_method"] not in KNOWN_SAMPLERS:
        return ("sampler without a diffusers scheduler", str(p["sampling_method"]))
    if not (SIZE_RANGE[0] <= p["width"] <= SIZE_RANGE[1] and SIZE_RANGE[0] <= p["height"] <= SIZE_RANGE[1]) \
            or p["width"] % 8 or p["height"] % 8:
        return ("size not a multiple of 8 in range", f"{p['width']}x{p['height']}")
    if not STEPS_RANGE[0] <= p["sampling_steps"] <= STEPS_RANGE[1]:
        return ("steps out of range", str(p["sampling_steps"]))
    if not CFG_RANGE[0] <= p["cfg_scale"] <= CFG_RANGE[1]:
        return ("cfg out of range", str(p["cfg_scale"]))
    if not strip_lora_tags(p["prompt"]):
        return ("empty prompt without LoRA tags", "")
    return None


def _quality(c, raw, cfg):
    stats = c["model"].get("stats") or {}
    if stats.get("downloadCount", 0) < cfg.min_downloads:
        return (f"fewer than {cfg.min_downloads} downloads", str(stats.get("downloadCount", 0)))
    if positive_share(stats) < cfg.min_positive_share:
        return (f"positive share below {cfg.min_positive_share}", f"{positive_share(stats):.2f}")
    return None


FILTERS: list[tuple[str, Callable]] = [("no_meta", _no_meta), ("nsfw", _nsfw), ("scope", _scope),
                                       ("availability", _availability), ("parameters", _parameters),
                                       ("quality", _quality)]


def filter_pairs(raw: Raw, cfg: FilterConfig) -> dict[str, Any]:
    """Run every filter over every crawled image; return kept pairs, removals and quarantined records with reasons."""
    kept, removed, quarantined = [], [], []
    for image in raw.images:
        owner = attribute(image, raw)
        if owner is None:
            quarantined.append({"image_id": image.get("id"), "reason": "no crawled model version",
                                "detail": str(image.get("modelVersionIds"))})
            continue
        candidate = {"image": image, "model": owner[0], "version": owner[1], "lora_base": None}
        try:
            candidate["parameters"] = parse_parameters(image["meta"]) if image.get("meta") else None
            reason = None
            for name, check in FILTERS:
                if reason := check(candidate, raw, cfg):
                    removed.append({"image_id": image["id"], "model_version_id": owner[1]["id"], "filter": name,
                                    "reason": reason[0], "detail": reason[1]})
                    break
        except (Malformed, KeyError, TypeError, AttributeError) as error:
            quarantined.append({"image_id": image.get("id"), "reason": type(error).__name__, "detail": str(error)})
            continue
        if reason is None:
            kept.append(_pair(candidate))
    return {"pairs": kept, "removed": removed, "quarantined": quarantined}


def _pair(c: dict[str, Any]) -> dict[str, Any]:
    p = c["parameters"]
    return {"id": f"{c['image']['id']}-{c['version']['id']}", "image_id": c["image"]["id"], "model_id": c["model"]["id"],
            "model_version_id": c["version"]["id"], "architecture": c["version"]["baseModel"],
            "instruction": {"prompt": strip_lora_tags(p["prompt"]), "negative_prompt": p["negative_prompt"]},
            "api": {"model": c["model"]["name"], "type": c["model"]["type"], "base_model": c["version"]["baseModel"],
                    "width": p["width"], "height": p["height"], "sampling_method": p["sampling_method"],
                    "sampling_steps": p["sampling_steps"], "cfg_scale": p["cfg_scale"]},
            "lora_base": c["lora_base"], "seed": p["seed"]}


def filter_report(result: dict[str, Any], total: int) -> "Any":
    """One row per step: how many records it removed, how many remain, and its most common reasons."""
    import pandas as pd

    def top(rows):
        return "; ".join(f"{kind} ({n})" for kind, n in Counter(r["reason"] for r in rows).most_common(3))

    rows = [{"step": "quarantine (unreadable)", "removed": len(result["quarantined"]), "top reasons": top(result["quarantined"])}]
    rows += [{"step": name, "removed": sum(r["filter"] == name for r in result["removed"]),
              "top reasons": top([r for r in result["removed"] if r["filter"] == name])} for name, _ in FILTERS]
    table = pd.DataFrame(rows).set_index("step")
    table.insert(1, "remaining", total - table["removed"].cumsum())
    return table


# ------------------------------------------------------------------------------------ Fig. 2 distributions

def distributions(raw: Raw, pairs: list[dict[str, Any]] | None = None) -> "Any":
    """Counts by type, base model, NSFW and availability: over crawled models, or over the kept pairs' models."""
    import pandas as pd

    if pairs is None:
        rows = [{"type": m.get("type"), "base model": v.get("baseModel"), "NSFW": bool(m.get("nsfw")),
                 "available": has_download(v)} for m in raw.models.values() for v in m.get("modelVersions") or []]
    else:
        kept = {p["model_version_id"] for p in pairs}
        rows = [{"type": raw.versions[v][0]["type"], "base model": raw.versions[v][1]["baseModel"],
                 "NSFW": bool(raw.versions[v][0].get("nsfw")), "available": has_download(raw.versions[v][1])}
                for v in sorted(kept)]
    return pd.DataFrame(rows)


def plot_distributions(before, after, title: str = ""):
    """The paper's Fig. 2 panels: model versions by type, base model, NSFW and availability, before vs after."""
    import matplotlib.pyplot as plt
    import pandas as pd

    columns = ["type", "base model", "NSFW", "available"]
    figure, axes = plt.subplots(1, len(columns), figsize=(14, 3.4))
    for axis, column in zip(axes, columns):
        table = pd.DataFrame({"crawled": before[column].astype(str).value_counts(),
                              "in DABench": after[column].astype(str).value_counts()}).fillna(0)
        table.sort_values("crawled", ascending=False).plot.bar(ax=axis, width=0.8, legend=axis is axes[0])
        axis.set_title(column)
        axis.set_xlabel("")
        axis.tick_params(axis="x", labelrotation=45)
    figure.suptitle(title or "Model versions before and after filtering", fontsize=10)
    figure.tight_layout()
    return figure


# --------------------------------------------------------------------------------------------- assembly

def assign_splits(ids: list[str], seed: int = 0) -> dict[str, str]:
    """8:1:1 train/align/test by a seeded shuffle of the sorted ids (the same ids always get the same splits)."""
    order = sorted(ids)
    random.Random(seed).shuffle(order)
    start, splits = 0, {}
    for index, (name, share) in enumerate(SPLITS):
        end = len(order) if index == len(SPLITS) - 1 else start + round(share * len(order))
        splits.update({i: name for i in order[start:end]})
        start = end
    return splits


def assemble(pairs: list[dict[str, Any]], descriptions: dict[int, dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """DABench records: each pair gets its model's rewritten description (with provenance) and a split."""
    splits = assign_splits([p["id"] for p in pairs], seed)
    records = []
    for pair in sorted(pairs, key=lambda p: p["id"]):
        rewritten = descriptions.get(pair["model_version_id"])
        if rewritten is None:
            raise KeyError(f"no rewritten description for model version {pair['model_version_id']}; "
                           "run the rewriting stage (notebook 03) on the same pairs")
        records.append({**pair, "api": {**pair["api"], "model_description": rewritten["description"]},
                        "description_provenance": {"backend": rewritten["backend"], "stand_in": rewritten["stand_in"],
                                                   "fallback": rewritten["fallback"]},
                        "split": splits[pair["id"]]})
    return records


def invalid_records(records: list[dict[str, Any]]) -> list[str]:
    """Schema violations across records, `id: problem` lines (empty when every record validates)."""
    return [f"{r.get('id')}: {problem}" for r in records for problem in schema_errors(r)]


def api_key(record: dict[str, Any]) -> tuple:
    """What makes two API calls the same call (the description aside)."""
    api = record["api"]
    return tuple(api[k] for k in ("model", "type", "base_model", "width", "height", "sampling_method",
                                  "sampling_steps", "cfg_scale"))


def statistics(records: list[dict[str, Any]]) -> "Any":
    """Per architecture and split: pairs, distinct models, distinct API calls (the DABench statistics table)."""
    import pandas as pd

    frame = pd.DataFrame([{"architecture": r["architecture"], "split": r["split"], "model": r["model_version_id"],
                           "api": api_key(r)} for r in records])
    table = frame.groupby(["architecture", "split"]).agg(pairs=("api", "size"), models=("model", "nunique"),
                                                         distinct_apis=("api", "nunique"))
    return table.unstack("split").swaplevel(axis=1).sort_index(axis=1)


def save_dataset(records: list[dict[str, Any]], folder: Path, provenance: dict[str, Any]) -> dict[str, int]:
    """HF dataset as parquet (splits train/align/test; configs `all`, `sd15`, `sdxl`) with a dataset card.

    File names carry a hash of their rows: `datasets` keys its cache on file names, so a rebuilt DABench
    with the same names would load stale rows from the cache.
    """
    import shutil

    import datasets

    folder = Path(folder)
    shutil.rmtree(folder / "data", ignore_errors=True)
    counts = {}
    flat = [{**r, "instruction": json.dumps(r["instruction"]), "api": json.dumps(r["api"]),
             "lora_base": json.dumps(r["lora_base"]), "description_provenance": json.dumps(r["description_provenance"])}
            for r in records]
    for config, architecture in [("all", None), *((v, k) for k, v in ARCH_SUBSETS.items())]:
        for split, _ in SPLITS:
            rows = [f for f in flat if f["split"] == split and architecture in (None, f["architecture"])]
            if rows:
                digest = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:12]
                path = folder / "data" / config / f"{split}-{digest}.parquet"
                path.parent.mkdir(parents=True, exist_ok=True)
                datasets.Dataset.from_list(rows).to_parquet(str(path))
            counts[f"{config}/{split}"] = len(rows)
    (folder / "README.md").write_text(dataset_card(counts, provenance))
    return counts


def load_saved(folder: Path, config: str = "all"):
    """The DatasetDict `save_dataset` wrote to `folder`, read through its card's configs like a hub dataset.

    Read into memory through a cache of its own that is dropped afterwards: `datasets` keys its shared cache of a
    local folder by the folder's name, the config and the card's file patterns, so every DABench (all named
    `dataset`, with the same patterns) would share one entry, and a rebuilt or another profile's DABench would load
    the first one's rows.
    """
    import tempfile

    import datasets

    with tempfile.TemporaryDirectory(prefix="dabench-load-") as cache:
        return datasets.load_dataset(str(folder), config, cache_dir=cache, keep_in_memory=True)


def dataset_card(counts: dict[str, int], provenance: dict[str, Any]) -> str:
    """The dataset card: configs for `datasets.load_dataset`, counts, fields, provenance, licences."""
    configs = []
    for config in ["all", *ARCH_SUBSETS.values()]:
        files = [f"    - split: {s}\n      path: data/{config}/{s}-*.parquet" for s, _ in SPLITS if counts.get(f"{config}/{s}")]
        configs.append(f"- config_name: {config}\n  data_files:\n" + "\n".join(files))
    table = "\n".join(f"| {key} | {value} |" for key, value in counts.items())
    stand_in = provenance.get("stand_in")
    return f"""---
configs:
{chr(10).join(configs)}
---

# DABench (rebuilt by the T2I Agent Book)

Instruction–API pairs for text-to-image API selection, rebuilt as DiffAgent (CVPR 2024, Sec. 3.1) describes
from the Civitai REST API: each record pairs an image's prompt (LoRA tags removed) with the API call that
made it — model, type, base model, the generation size from `meta.Size`, sampler, steps, CFG scale — and a
rewritten description of the model.

- source: {provenance.get('source')}
- description backend: {provenance.get('backend')}{' (a deterministic template stand-in, not an LLM)' if stand_in else ''}
- splits: train/align/test 8:1:1 by a seeded shuffle (seed {provenance.get('seed')})
- configs: `all`, and per architecture `sd15` (SD 1.5) and `sdxl` (SDXL 1.0)

| config/split | records |
|---|---|
{table}

Fields: `id`, `image_id`, `model_id`, `model_version_id`, `architecture`, `instruction` (JSON: prompt,
negative_prompt), `api` (JSON: {', '.join(['model', 'type', 'base_model', 'width', 'height', 'sampling_method',
'sampling_steps', 'cfg_scale', 'model_description'])}), `lora_base` (JSON: the checkpoint a LoRA ran on),
`seed`, `description_provenance` (JSON), `split`.

Licences: prompts, parameters and descriptions come from public Civitai pages and stay under the terms of
their authors and of Civitai; model weights are not redistributed. {'This copy was built from the project' + chr(39) + 's local, generated Civitai catalog: it contains no real user content.' if 'local' in str(provenance.get('source')) else ''}
"""


# ------------------------------------------------------------------------------------------- stage steps

def run_filter(folder: Path, raw_dir: Path, cfg: FilterConfig) -> dict[str, int]:
    """Stage 02: filter a crawl into `pairs.jsonl`, with `removed.jsonl`, `quarantine.jsonl` and the report."""
    raw = Raw.load(raw_dir)
    result = filter_pairs(raw, cfg)
    for name in ("pairs", "removed", "quarantined"):
        write_jsonl(Path(folder) / f"{name}.jsonl", result[name])
    report = filter_report(result, len(raw.images))
    report.to_csv(Path(folder) / "filter_report.csv")
    (Path(folder) / "filter_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    return {"images": len(raw.images), "pairs": len(result["pairs"]), "removed": len(result["removed"]),
            "quarantined": len(result["quarantined"])}


def description_inputs(raw: Raw, pairs: list[dict[str, Any]], samples: int = 5) -> list[dict[str, Any]]:
    """One rewriting input per model version in the pairs: its Civitai description, tags and sample prompts."""
    prompts: dict[int, list[str]] = {}
    for pair in sorted(pairs, key=lambda p: p["id"]):
        prompts.setdefault(pair["model_version_id"], []).append(pair["instruction"]["prompt"])
    inputs = []
    for version_id, examples in sorted(prompts.items()):
        model, version = raw.versions[version_id]
        inputs.append({"model_version_id": version_id, "model_name": model["name"], "model_type": model["type"],
                       "base_model": version["baseModel"], "description_html": model.get("description") or "",
                       "sample_prompts": examples[:samples], "tags": list(model.get("tags") or [])})
    return inputs


def run_rewrite(folder: Path, raw_dir: Path, pairs_path: Path, generator, **options) -> dict[str, int]:
    """Stage 03: rewrite every paired model's description with `generator`; `descriptions.jsonl` keeps provenance."""
    from .textgen import rewrite_descriptions

    inputs = description_inputs(Raw.load(raw_dir), read_jsonl(pairs_path))
    results = rewrite_descriptions(inputs, generator, **options)
    names = {i["model_version_id"]: i["model_name"] for i in inputs}
    # a fallback's text is the template's: say so, rather than crediting the generator that failed
    rows = [{**r, "model_name": names[r["model_version_id"]],
             **({"backend": "template", "stand_in": True, "fallback_from": r["backend"]} if r["fallback"] else {})}
            for r in results]
    write_jsonl(Path(folder) / "descriptions.jsonl", rows)
    return {"models": len(rows), "valid": sum(r["valid"] for r in rows), "fallback": sum(r["fallback"] for r in rows)}


def run_assemble(folder: Path, pairs_path: Path, descriptions_path: Path, seed: int,
                 provenance: dict[str, Any]) -> dict[str, int]:
    """Stage 04: records with descriptions and splits → `dabench.jsonl` and the HF dataset; every record validated."""
    descriptions = {d["model_version_id"]: d for d in read_jsonl(descriptions_path)}
    records = assemble(read_jsonl(pairs_path), descriptions, seed)
    if problems := invalid_records(records):
        raise ValueError(f"{len(problems)} DABench records break the schema, e.g. {problems[:3]}")
    write_jsonl(Path(folder) / "dabench.jsonl", records)
    counts = save_dataset(records, Path(folder) / "dataset", provenance)
    return {"records": len(records), **{k.replace("/", "_"): v for k, v in counts.items() if k.startswith("all/")}}


# ----------------------------------------------------------------------------------------- what to look at

def size_mismatches(raw: Raw):
    """How often the stored file size differs from `meta.Size` (hires upscales), with examples."""
    import pandas as pd

    rows = []
    for image in raw.images:
        match = SIZE.match(str((image.get("meta") or {}).get("Size") or ""))
        if match:
            generated = (int(match.group(1)), int(match.group(2)))
            rows.append({"image": image["id"], "meta.Size": f"{generated[0]}x{generated[1]}",
                         "file": f"{image.get('width')}x{image.get('height')}",
                         "scale": round((image.get("width") or 0) / generated[0], 2)})
    frame = pd.DataFrame(rows)
    return frame[frame["meta.Size"] != frame["file"]]


def plot_parameters(records: list[dict[str, Any]]):
    """DABench's parameter distributions per architecture: sampler, steps, CFG scale, generation size."""
    import matplotlib.pyplot as plt
    import pandas as pd

    frame = pd.DataFrame([{**r["api"], "architecture": r["architecture"]} for r in records])
    figure, axes = plt.subplots(1, 4, figsize=(15, 3.4))
    samplers = frame.groupby(["sampling_method", "architecture"]).size().unstack(fill_value=0)
    samplers.loc[samplers.sum(axis=1).sort_values(ascending=False).index].plot.bar(ax=axes[0], width=0.8)
    axes[0].set_title("sampler")
    axes[0].set_xlabel("")
    for axis, column in zip(axes[1:3], ["sampling_steps", "cfg_scale"]):
        for architecture, group in frame.groupby("architecture"):
            axis.hist(group[column], bins=12, alpha=0.6, label=architecture)
        axis.set_title(column.replace("_", " "))
        axis.legend(fontsize=7)
    for architecture, group in frame.groupby("architecture"):
        sizes = group.groupby(["width", "height"]).size().reset_index(name="n")
        axes[3].scatter(sizes["width"], sizes["height"], s=8 + sizes["n"], alpha=0.6, label=architecture)
    axes[3].set_title("generation size (meta.Size)")
    axes[3].set_xlabel("width")
    axes[3].set_ylabel("height")
    axes[3].legend(fontsize=7)
    figure.tight_layout()
    return figure


def examples(records: list[dict[str, Any]], count: int = 5, seed: int = 0):
    """A few records as a flat table (prompt, model, type, base, size, sampler, steps, CFG, description)."""
    import pandas as pd

    picked = random.Random(seed).sample(records, min(count, len(records)))
    return pd.DataFrame([{"prompt": r["instruction"]["prompt"], "model": r["api"]["model"], "type": r["api"]["type"],
                          "base": r["api"]["base_model"], "size": f"{r['api']['width']}x{r['api']['height']}",
                          "sampler": r["api"]["sampling_method"], "steps": r["api"]["sampling_steps"],
                          "cfg": r["api"]["cfg_scale"], "description": r["api"].get("model_description", "")}
                         for r in picked])


def provenance(runs_dir: Path, split_seed: int) -> dict[str, Any]:
    """Where a DABench build comes from: the crawl's source (from its manifest) and the description backend."""
    from .manifest import read_manifest

    crawl = read_manifest(Path(runs_dir) / "01_crawl_civitai") or {}
    source = crawl.get("params", {}).get("source", "unknown")
    first = read_jsonl(Path(runs_dir) / "03_rewrite_descriptions" / "descriptions.jsonl")[0]
    return {"source": "the project's local Civitai catalog" if source == "local" else source,
            "backend": first.get("fallback_from", first["backend"]), "stand_in": first["stand_in"],
            "seed": split_seed}
