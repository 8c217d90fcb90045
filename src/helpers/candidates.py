"""RRHF's training data for DiffAgent (Sec. 3.2.2, Fig. 3): candidate API calls per prompt and their rewards.

For each alignment prompt the SFT agent proposes candidates by multinomial sampling and by diverse (group)
beam search. Only the *model part* of a candidate is kept: the named model must exist in the catalog (on the
named architecture when that exists); its parameters are kept when the whole call validates, else the
model's defaults are used, so a candidate with a good model but a broken sampler still counts. The
demonstration's own call (RRHF ranks dataset responses next to sampled ones) and the default API (the base
model with default parameters) join the set; duplicates are dropped. Each candidate is drawn with the same
k seeds (common random numbers make the comparison fairer) and scored by the unified metric, fixed ranges;
its reward is the mean over the k images. Images and scores come from the shared caches.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from .t2i import API_FIELDS, ModelCatalog, default_api, extract_json, validate


def api_identity(api: dict[str, Any]) -> str:
    """The fields that decide the image, as one string: two candidates with equal identities are one candidate."""
    return json.dumps({key: api[key] for key in API_FIELDS if key != "model_description"}, sort_keys=True)


def rebuild_api(text: str, catalog: ModelCatalog) -> dict[str, Any] | None:
    """The full API call for a candidate's model part, or None when it names no catalog model.

    A call that validates is kept whole; otherwise the named model (on the named base model when that exists)
    gets the default parameters at its native size.
    """
    checked = validate(text, catalog)
    if checked.ok:
        return checked.api
    try:
        raw = extract_json(text)
    except ValueError:
        return None
    name, base_model = raw.get("model"), raw.get("base_model")
    if not isinstance(name, str):
        return None
    model = catalog.lookup(name.strip(), base_model if isinstance(base_model, str) else None) or \
        catalog.lookup(name.strip())
    return default_api(model) if model is not None else None


def candidate_set(texts: Sequence[str], demonstration: dict[str, Any] | None, catalog: ModelCatalog,
                  architecture: str) -> list[dict[str, Any]]:
    """Rebuilt candidates (sources recorded), plus the demonstration and the default API, without duplicates."""
    proposals = [(rebuild_api(text, catalog), "agent") for text in texts]
    if demonstration is not None:
        proposals.append((validate(demonstration, catalog).api, "demonstration"))
    proposals.append((default_api(catalog.base(architecture)), "default"))
    chosen: dict[str, dict[str, Any]] = {}
    for api, source in proposals:
        if api is None:
            continue
        key = api_identity(api)
        if key in chosen:
            chosen[key]["sources"].append(source)
        else:
            chosen[key] = {"api": api, "sources": [source]}
    return list(chosen.values())


def propose(agent, prompts: Sequence[str], *, num_samples: int, num_beams: int, num_beam_groups: int,
            diversity_penalty: float, max_new_tokens: int, temperature: float = 1.0, seed: int = 0,
            batch_size: int = 8, progress: bool = True) -> list[list[str]]:
    """The agent's raw candidate texts per prompt: `num_samples` samples, then `num_beams` diverse beams.

    Prompts are decoded `batch_size` at a time, grouped by length (a short prompt is not padded to a long one's
    width); the answers keep the prompts' order. Under a multi-process launch the batches are split across
    processes, and each sampled batch keeps its own seed, so the candidates do not depend on how many processes
    there are.
    """
    from tqdm.auto import tqdm

    from .distributed import map_sharded
    from .generation import chat_prompt, diverse_candidates_batch, sample_candidates
    from .speed import length_buckets

    texts: list[list[str]] = [[] for _ in prompts]
    chunks = length_buckets([len(chat_prompt(agent.tokenizer, prompt)) for prompt in prompts], batch_size)

    def decode(method, desc: str, options_for) -> None:
        """`method` on every batch (numbered in length order); `options_for(number)` gives its keyword arguments."""
        def run(numbered: list[tuple[int, list[int]]]) -> list[list[list[str]]]:
            return [method(agent.model, agent.tokenizer, [prompts[i] for i in chunk], max_new_tokens=max_new_tokens,
                           **options_for(number)) for number, chunk in tqdm(numbered, desc=desc, disable=not progress)]

        for chunk, found in zip(chunks, map_sharded(run, list(enumerate(chunks)))):
            for index, candidates in zip(chunk, found):
                texts[index] += candidates

    if num_samples:
        decode(sample_candidates, "sampling", lambda number: {"num_samples": num_samples, "temperature": temperature,
                                                              "seed": seed + number * batch_size})
    if num_beams:
        beam_options = {"num_beams": num_beams, "num_beam_groups": num_beam_groups,
                        "diversity_penalty": diversity_penalty}
        decode(diverse_candidates_batch, "diverse beams", lambda number: beam_options)
    return texts


def showcase(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The row notebook 07 shows: the first with the most candidates (its first image of each is kept)."""
    return max(rows, key=lambda row: len(row["candidates"]))


def reward_candidates(rows: list[dict[str, Any]], ctx, catalog: ModelCatalog, *, num_images: int,
                      max_side: int | None, batch_size: int, scorer_names: Sequence[str],
                      max_sampling_steps: int | None = None, keep_images: bool = True) -> dict[str, int]:
    """Fill `reward` (mean fixed-range unified score over `num_images` seeds) and per-image keys in every candidate.

    `keep_images=False`: the images drawn here leave the image cache once scored, but for the first image of each
    candidate of the `showcase` row; a rerun draws only images whose scores are not cached."""
    from .scoring import ScoringRun
    from .t2i import Executor, Request

    requests, owners, shown = [], [], set()
    shown_row = showcase(rows) if rows else None
    for row in rows:
        for candidate in row["candidates"]:
            for seed in range(num_images):
                if row is shown_row and seed == 0:
                    shown.add(len(requests))
                requests.append(Request(candidate["api"], row["prompt"], row["negative_prompt"], seed))
                owners.append(candidate)
    executor = Executor.for_run(ctx, catalog, max_side=max_side, batch_size=batch_size,
                                max_sampling_steps=max_sampling_steps)
    scorer = ScoringRun.for_run(ctx, scorer_names)
    # in blocks: ~240,000 images at paper scale, ~100 GB of PNGs unless they go once scored
    scores = scorer.generate_and_score(executor, requests, keep=None if keep_images else shown.__contains__)
    for candidate in {id(c): c for c in owners}.values():
        candidate["image_keys"], candidate["unified"] = [], []
    for owner, key, unified in zip(owners, scores["key"], scores["unified"]):
        owner["image_keys"].append(key)
        owner["unified"].append(float(unified))
    for owner in {id(c): c for c in owners}.values():
        owner["reward"] = sum(owner["unified"]) / len(owner["unified"])
    return {"images": len(requests), "images_drawn": executor.stats["generated"],
            "scores_computed": scorer.computed, "scores_reused": scorer.reused,
            **({} if keep_images else {"images_removed_once_scored": executor.stats["removed_once_scored"]})}


def load_rows(path: Path) -> list[dict[str, Any]]:
    """The candidates file written by notebook 07."""
    from .manifest import read_jsonl_rows

    return read_jsonl_rows(path)
