"""DiffAgent's evaluation (Sec. 4, Tables 1–2) with the statistics the paper leaves out.

Table 1 counts hallucinations (API calls the executor could not run) per category, for the SFT and the RRHF
agent, on each prompt set. Table 2 compares what the images score when the API call comes from:

| system | model | parameters |
|---|---|---|
| Baseline | the base SD model | defaults (Euler a, 20 steps, CFG 7, native size) |
| Baseline* | the base model of the architecture the agent chose | the agent's |
| DiffAgent# | the agent's | defaults |
| Retrieval | the catalog model whose description is nearest to the prompt (MiniLM) | defaults |
| DiffAgent-SFT / -RRHF | the agent's | the agent's |

Baseline* and DiffAgent# take the RRHF agent's calls. A hallucinated call falls back to the Baseline (as the
paper does), so every system has an image for every prompt. Scores are CLIP, ImageReward, HPS v2 and the
unified metric with *pooled* normalisation (min–max over every image of one prompt set, all systems
together). Each mean has a 95% percentile-bootstrap interval over prompts; paired comparisons resample the
same prompts for both systems and add a Wilcoxon signed-rank test.
"""
from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np


METRICS = ("clip", "image_reward", "hps")
SYSTEMS = ("Baseline", "Baseline*", "DiffAgent#", "Retrieval", "DiffAgent-SFT", "DiffAgent-RRHF")
PROMPT_FILES = {"coco_style": "data/prompts/coco_style.txt", "parti_style": "data/prompts/parti_style.txt"}


# ------------------------------------------------------------------------------------------- prompt sets

def read_prompt_file(path: Path) -> list[str]:
    """Prompts from a text file, one per line; blank lines and lines starting with # are skipped."""
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise ValueError(f"{path} holds no prompts; write one prompt per line")
    return prompts


def hub_prompts(dataset_id: str, split: str, column: str, limit: int, seed: int) -> list[str]:
    """`limit` random prompts (seeded) from a column of a hub dataset; a list-valued column gives its first item."""
    import datasets

    table = datasets.load_dataset(dataset_id, split=split)
    if column not in table.column_names:
        raise ValueError(f"{dataset_id} ({split}) has no column {column!r}; its columns: {table.column_names}")
    table = table.shuffle(seed=seed).select(range(min(limit, len(table))))
    values = [value[0] if isinstance(value, list) else value for value in table[column]]
    return [str(value).strip() for value in values if str(value).strip()]


def prompt_sets(records: Sequence[dict[str, Any]], root: Path, *, limit: int, seed: int,
                sources: Mapping[str, str] | None = None) -> dict[str, list[dict[str, str]]]:
    """DABench test plus the COCO-style and Parti-style sets, each at most `limit` prompts (0: all).

    `sources` maps a set name to `file:<path>` (the project's prompt files) or `hub:<id>|<split>|<column>`.
    """
    sources = dict(sources or {name: f"file:{path}" for name, path in PROMPT_FILES.items()})
    test = [r for r in records if r["split"] == "test"]
    sets = {"dabench_test": [{"prompt": r["instruction"]["prompt"], "negative_prompt": r["instruction"]["negative_prompt"]}
                             for r in test[:limit or None]]}
    for name, source in sources.items():
        kind, _, spec = source.partition(":")
        if kind == "file":
            prompts = read_prompt_file(root / spec)
            prompts = random.Random(seed).sample(prompts, min(limit, len(prompts))) if limit else prompts
        elif kind == "hub":
            dataset_id, split, column = (spec.split("|") + ["", ""])[:3]
            prompts = hub_prompts(dataset_id, split or "train", column or "prompt", limit or 1000, seed)
        else:
            raise ValueError(f"prompt source {source!r} for {name} must start with 'file:' or 'hub:'")
        sets[name] = [{"prompt": prompt, "negative_prompt": ""} for prompt in prompts]
    return sets


# ------------------------------------------------------------------------------------------- systems

def retrieval_models(prompts: Sequence[str], catalog, encoder, device: str = "cpu") -> list:
    """For each prompt, the catalog model (base models excluded) whose description is nearest in MiniLM space.

    `encoder` is a loaded sentence encoder, or the folder / hub id to load one from (once per call).
    """
    from .models import load_text_encoder

    models = [model for model in catalog.models if not model.is_base]
    if isinstance(encoder, (str, Path)):
        encoder = load_text_encoder(encoder, device)
    described = encoder.encode([model.description or model.name for model in models], normalize_embeddings=True,
                               show_progress_bar=False)
    asked = encoder.encode(list(prompts), normalize_embeddings=True, show_progress_bar=False)
    return [models[i] for i in np.argmax(asked @ described.T, axis=1)]


def system_calls(sft, rrhf, retrieved, catalog, baseline_architecture: str = "SD 1.5") -> dict[str, list[dict]]:
    """Each system's API call per prompt, from the agents' validations; a hallucination falls back to Baseline.

    Returns {system: [{"api": ..., "fallback": bool}, ...]} in prompt order.
    """
    from .t2i import default_api

    baseline = default_api(catalog.base(baseline_architecture))

    def baseline_star(checked):  # the base model of the chosen architecture, run with the agent's parameters
        base = default_api(catalog.base(checked.api["base_model"]))
        keep = ("width", "height", "sampling_method", "sampling_steps", "cfg_scale")
        return {**base, **{key: checked.api[key] for key in keep}}

    return {
        "Baseline": [{"api": baseline, "fallback": False} for _ in sft],
        "Baseline*": agent_calls(rrhf, baseline, baseline_star),
        "DiffAgent#": agent_calls(rrhf, baseline, lambda checked: default_api(checked.model)),
        "Retrieval": [{"api": default_api(model), "fallback": False} for model in retrieved],
        "DiffAgent-SFT": agent_calls(sft, baseline),
        "DiffAgent-RRHF": agent_calls(rrhf, baseline),
    }


def agent_calls(validations, baseline: dict[str, Any], build=lambda checked: checked.api) -> list[dict[str, Any]]:
    """`build(validation)` for each clean call, the baseline call for each hallucinated one (flagged `fallback`)."""
    return [{"api": build(v), "fallback": False} if v.ok else {"api": baseline, "fallback": True} for v in validations]


# ------------------------------------------------------------------------------------------- statistics

def bootstrap_ci(values: Sequence[float], num_resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its percentile-bootstrap interval over the values."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no values to bootstrap; every system needs at least one prompt")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(num_resamples, values.size))].mean(axis=1)
    tail = (1 - level) / 2
    return float(values.mean()), float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def paired_comparison(system: Sequence[float], reference: Sequence[float], num_resamples: int = 1000,
                      seed: int = 0) -> dict[str, float]:
    """Per-prompt scores of two systems on the same prompts: mean difference with its bootstrap interval,
    win rate (ties count half) and the Wilcoxon signed-rank p-value (1.0 when every difference is 0)."""
    from scipy.stats import wilcoxon

    system, reference = np.asarray(system, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if system.shape != reference.shape:
        raise ValueError(f"paired scores need equal lengths, got {system.shape} and {reference.shape}")
    difference = system - reference
    mean, low, high = bootstrap_ci(difference, num_resamples, seed)
    wins = float(np.mean((difference > 0) + 0.5 * (difference == 0)))
    p_value = 1.0 if np.all(difference == 0) else float(wilcoxon(system, reference, zero_method="zsplit").pvalue)
    return {"mean_difference": mean, "ci_low": low, "ci_high": high, "win_rate": wins, "wilcoxon_p": p_value,
            "prompts": int(difference.size)}


def with_pooled_unified(images, metrics: Sequence[str] = METRICS, by: str = "prompt_set",
                        column: str = "unified_pooled"):
    """`images` plus the unified score normalised over every image of each `by` group (all systems pooled)."""
    from .scoring import unified_metric  # (here, not at the top: the user study reads tables and needs no torch)

    images = images.copy()
    images[column] = np.nan
    for _, group in images.groupby(by):
        images.loc[group.index, column] = unified_metric({m: group[m].to_numpy() for m in metrics}, "pooled")
    return images


def per_prompt(images, column: str):
    """Mean of `column` over the seeds: one value per (prompt set, system, prompt)."""
    return images.groupby(["prompt_set", "system", "prompt_index"])[column].mean()


def results_table(images, metrics: Sequence[str] = (*METRICS, "unified_pooled"), num_resamples: int = 1000,
                  seed: int = 0):
    """Table 2: per prompt set and system, each metric's mean with its 95% bootstrap interval (over prompts)."""
    import pandas as pd

    rows = []
    for (prompt_set, system), group in images.groupby(["prompt_set", "system"], sort=False):
        row = {"prompt_set": prompt_set, "system": system, "prompts": group["prompt_index"].nunique(),
               "fallback_rate": group.groupby("prompt_index")["fallback"].first().mean()}
        for metric in metrics:
            mean, low, high = bootstrap_ci(group.groupby("prompt_index")[metric].mean(), num_resamples, seed)
            row.update({metric: mean, f"{metric}_low": low, f"{metric}_high": high})
        rows.append(row)
    return pd.DataFrame(rows).set_index(["prompt_set", "system"])


def comparisons(images, pairs: Sequence[tuple[str, str]], column: str = "unified_pooled",
                num_resamples: int = 1000, seed: int = 0):
    """Paired comparisons (system vs reference) per prompt set on `column`."""
    import pandas as pd

    scores = per_prompt(images, column)
    rows = []
    for prompt_set in scores.index.get_level_values("prompt_set").unique():
        table = scores.loc[prompt_set].unstack("system")
        for system, reference in pairs:
            if system in table and reference in table:
                rows.append({"prompt_set": prompt_set, "comparison": f"{system} vs {reference}",
                             **paired_comparison(table[system], table[reference], num_resamples, seed)})
    return pd.DataFrame(rows).set_index(["prompt_set", "comparison"])


def component_ablation(images, metrics: Sequence[str] = METRICS):
    """Mean pooled unified score per system when the metric is built from each non-empty subset of `metrics`."""
    import pandas as pd

    columns = {}
    for size in range(1, len(metrics) + 1):
        for subset in itertools.combinations(metrics, size):
            scored = with_pooled_unified(images, subset, column="variant")
            columns[" + ".join(subset)] = scored.groupby(["prompt_set", "system"], sort=False)["variant"].mean()
    return pd.DataFrame(columns)


def plot_results(table, metric: str = "unified_pooled"):
    """Bars of one metric per system, one panel per prompt set, with the 95% intervals as error bars."""
    import matplotlib.pyplot as plt

    sets = table.index.get_level_values("prompt_set").unique()
    figure, axes = plt.subplots(1, len(sets), figsize=(4.2 * len(sets), 3.2), squeeze=False, sharey=True)
    for axis, prompt_set in zip(axes.flat, sets):
        part = table.loc[prompt_set]
        errors = np.vstack([part[metric] - part[f"{metric}_low"], part[f"{metric}_high"] - part[metric]])
        axis.bar(range(len(part)), part[metric], yerr=errors, capsize=3,
                 color=["tab:gray" if s.startswith("Baseline") else "tab:blue" for s in part.index])
        axis.set_xticks(range(len(part)), part.index, rotation=40, ha="right", fontsize=8)
        axis.set_title(prompt_set, fontsize=9)
    axes.flat[0].set_ylabel(metric.replace("_", " "))
    figure.tight_layout()
    return figure


# ------------------------------------------------------------------------------------------ notebook 08

def run_stage(folder: Path, ctx, dabench_path: Path, agents: Mapping[str, Path], variants: Mapping[str, Path],
              sets: Mapping[str, list[dict[str, str]]], *, num_seeds: int, max_side: int | None, batch_size: int,
              scorer_names: Sequence[str], baseline_architecture: str, decode_batch_size: int,
              max_new_tokens: int, max_sampling_steps: int | None = None) -> dict[str, Any]:
    """Notebook 08: agents' calls on every prompt set, the six systems' images and scores, written as CSV."""
    import pandas as pd

    from .agent import Agent, ApiCallCache
    from .civitai import read_jsonl
    from .models import load_text_encoder
    from .scoring import ScoringRun
    from .t2i import Executor, ModelCatalog, Request, validate

    records = read_jsonl(dabench_path)
    catalog = ModelCatalog.from_records(records)
    cache = ApiCallCache(ctx.runs_dir / "agent_cache" / "api_calls.jsonl")
    texts: dict[str, dict[str, list[str]]] = {}
    for name, path in {**agents, **variants}.items():
        agent = Agent.for_run(path, ctx)
        chosen = sets if name in agents else {"dabench_test": sets["dabench_test"]}  # variants: DABench test only
        texts[name] = {s: agent.api_calls([p["prompt"] for p in items], batch_size=decode_batch_size,
                                          max_new_tokens=max_new_tokens, cache=cache) for s, items in chosen.items()}
        del agent
    calls, requests, owners = [], [], []
    encoder = load_text_encoder(ctx.model_path("text_similarity"), ctx.device)  # once for the three prompt sets
    for prompt_set, items in sets.items():
        checked = {name: [validate(t, catalog) for t in by_set[prompt_set]] for name, by_set in texts.items()
                   if prompt_set in by_set}
        calls += [{"prompt_set": prompt_set, "agent": name, "prompt_index": i, "prompt": items[i]["prompt"],
                   "text": texts[name][prompt_set][i], "category": v.category or "ok"}
                  for name, validations in checked.items() for i, v in enumerate(validations)]
        retrieved = retrieval_models([p["prompt"] for p in items], catalog, encoder)
        systems = system_calls(checked["sft"], checked["rrhf"], retrieved, catalog, baseline_architecture)
        baseline = systems["Baseline"][0]["api"]
        systems.update({f"RRHF {name}": agent_calls(checked[name], baseline) for name in variants if name in checked})
        for system, per_prompt_calls in systems.items():
            for i, call in enumerate(per_prompt_calls):
                for seed in range(num_seeds):
                    requests.append(Request(call["api"], items[i]["prompt"], items[i]["negative_prompt"], seed))
                    owners.append({"prompt_set": prompt_set, "system": system, "prompt_index": i, "seed": seed,
                                   "model": call["api"]["model"], "base_model": call["api"]["base_model"],
                                   "sampler": call["api"]["sampling_method"], "fallback": call["fallback"]})
    executor = Executor.for_run(ctx, catalog, max_side=max_side, batch_size=batch_size,
                                max_sampling_steps=max_sampling_steps)
    scorer = ScoringRun.for_run(ctx, scorer_names)
    images = pd.concat([pd.DataFrame(owners), scorer.generate_and_score(executor, requests)], axis=1)
    images.to_csv(Path(folder) / "images.csv", index=False)
    pd.DataFrame(calls).to_csv(Path(folder) / "calls.csv", index=False)
    return {"prompt_sets": len(sets), "prompts": sum(len(items) for items in sets.values()),
            "api_calls": len(calls), "hallucinated_calls": sum(c["category"] != "ok" for c in calls),
            "images": len(requests), "images_drawn": executor.stats["generated"],
            "scores_computed": scorer.computed, "scores_reused": scorer.reused}
