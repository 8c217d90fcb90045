"""AGFSync's evaluation benchmarks (An et al., 2024, Sec. 4): TIFA v1.0 and the HPS v2 benchmark prompts.

* **TIFA v1.0** (Hu et al., 2023): 4,081 captions, each with GPT-3-written questions (yes/no and multiple choice)
  and their answers. The TIFA score of an image is the share of its caption's questions a VQA model answers
  correctly, ×100. By default the answer follows TIFA's code (`answering="free_form"`): BLIP-2 answers freely,
  the choices listed in its prompt, and an answer that is not one of the choices becomes the choice nearest to it
  by sentence embedding (`nearest_choices`; TIFA's all-mpnet-base-v2 in the paper profile, MiniLM in the small
  ones). `answering="likeliest"` takes the choice BLIP-2 finds likeliest per token instead (`VqaScorer.choose`).
* **HPS v2 benchmark** (Wu et al., 2023): 800 prompts in each of four styles (anime, concept-art, paintings,
  photo), scored with HPS v2 (reported ×100, as the benchmark does).

Sources are a local file or folder, an http(s) URL (downloaded once into `cache_dir`), or
`hf://datasets/<owner>/<name>/<path>` (through `huggingface_hub`). The paper recipe names the public ones
(`TIFA_SOURCE`, `HPS_SOURCE`). Without them — no machine here reaches the internet — notebook 13 evaluates on
AGFSync's held-out prompts written in TIFA's form (`held_out_as_tifa`), and every row says so.
"""
from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Collection, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from .manifest import sha256_json

TIFA_SOURCE = "https://raw.githubusercontent.com/Yushi-Hu/tifa/main/tifa_v1.0/tifa_v1.0_question_answers.json"
HPS_SOURCE = "hf://datasets/zhwang/HPDv2/benchmark"
HPS_STYLES = ("anime", "concept-art", "paintings", "photo")
STAND_IN = "held-out AGFSync prompts"  # the `source` of rows that stand in for a benchmark not given
ANSWERING = {"free_form": "TIFA's protocol: BLIP-2's free answer, mapped onto the nearest choice",
             "likeliest": "the choice BLIP-2 finds likeliest per token"}
FREE_FORM_DECODING = {"num_beams": 5, "max_new_tokens": 30}  # TIFA's BLIP-2 settings (LAVIS's generate defaults)


def fetch(source: str | Path, cache_dir: str | Path) -> Path:
    """The file `source` names: a local path, an http(s) URL (downloaded once into `cache_dir`), or
    `hf://datasets/<owner>/<name>/<path in the repo>`."""
    text = str(source)
    if text.startswith("hf://"):
        parts = text.removeprefix("hf://").split("/")
        if len(parts) < 4 or parts[0] != "datasets":
            raise ValueError(f"{text!r}: write a hub dataset file as hf://datasets/<owner>/<name>/<path>")
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download("/".join(parts[1:3]), "/".join(parts[3:]), repo_type="dataset"))
    if text.startswith(("http://", "https://")):
        return _download(text, Path(cache_dir))
    path = Path(text)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; give a local file, an http(s) URL or "
                                "hf://datasets/<owner>/<name>/<path>")
    return path


def _download(url: str, cache_dir: Path) -> Path:
    """`url` saved once under `cache_dir`, through retries and a lock: under a multi-GPU launch one process fetches
    it and the others find the file (`http.download_to`)."""
    import requests

    from .http import download_to

    target = cache_dir / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{url.rsplit('/', 1)[-1] or 'file'}"
    advice = "check the address, or download the file and give its local path"
    try:
        return download_to(url, target, refused="GET {url} answered {status}; " + advice, progress=False)
    except requests.HTTPError as error:
        raise RuntimeError(f"GET {url} answered {error.response.status_code}; {advice}") from error


def _join(source: str | Path, name: str) -> str:
    text = str(source)
    return f"{text.rstrip('/')}/{name}" if "://" in text else str(Path(text) / name)


def _limit(rows: list[dict], limit: int | None, seed: int) -> list[dict]:
    """At most `limit` rows, a seeded random sample kept in source order (all of them when limit is 0/None)."""
    if not limit or limit >= len(rows):
        return rows
    keep = set(random.Random(seed).sample(range(len(rows)), limit))
    return [row for i, row in enumerate(rows) if i in keep]


def load_tifa(source: str | Path, cache_dir: str | Path, limit: int | None = None, seed: int = 0) -> list[dict]:
    """TIFA v1.0's captions with their questions: one row per caption (`limit` of them, sampled with `seed`).

    Each row: prompt_id ("tifa:<id>"), prompt, category ("TIFA"), source, and questions [{question, choices,
    answer, element_type}].
    """
    with open(fetch(source, cache_dir)) as handle:
        items = json.load(handle)
    by_caption: dict[str, dict] = {}
    for number, item in enumerate(items):
        missing = [key for key in ("id", "caption", "question", "choices", "answer") if key not in item]
        if missing:
            raise ValueError(f"{source}: item {number} lacks {', '.join(missing)}; expected TIFA v1.0's "
                             "question_answers format")
        if item["answer"] not in item["choices"]:
            raise ValueError(f"{source}: item {number} ({item['question']!r}) has answer {item['answer']!r} outside "
                             f"its choices {item['choices']}")
        row = by_caption.setdefault(str(item["id"]), {"prompt_id": f"tifa:{item['id']}", "prompt": item["caption"],
                                                      "category": "TIFA", "source": str(source), "questions": []})
        row["questions"].append({"question": item["question"], "choices": [str(c) for c in item["choices"]],
                                 "answer": str(item["answer"]), "element_type": item.get("answer_type", "")})
    return _limit(list(by_caption.values()), limit, seed)


def load_hps_prompts(source: str | Path, cache_dir: str | Path, styles: Sequence[str] = HPS_STYLES,
                     per_style: int | None = None, seed: int = 0) -> list[dict]:
    """The HPS v2 benchmark prompts of each style (`<source>/<style>.json`, a JSON list of prompts)."""
    rows = []
    for style in styles:
        with open(fetch(_join(source, f"{style}.json"), cache_dir)) as handle:
            prompts = json.load(handle)
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"{_join(source, f'{style}.json')}: expected a JSON list of prompt strings")
        chosen = _limit([{"prompt_id": f"hps:{style}:{i:04d}", "prompt": p, "category": style,
                          "source": str(source)} for i, p in enumerate(prompts)], per_style, seed)
        rows.extend(chosen)
    return rows


def held_out_as_tifa(prompts: Sequence[Mapping[str, Any]]) -> list[dict]:
    """AGFSync's held-out prompts in TIFA's form: each generated question is a yes/no question answered "yes"."""
    return [{"prompt_id": p["prompt_id"], "prompt": p["prompt"], "category": p["category"], "source": STAND_IN,
             "questions": [{"question": q, "choices": ["yes", "no"], "answer": "yes", "element_type": t}
                           for q, t in zip(p["questions"], p.get("element_types") or [""] * len(p["questions"]))]}
            for p in prompts]


def benchmark_sets(tifa: str, hps: str, held_out: Sequence[Mapping[str, Any]], cache_dir: str | Path, *,
                   limit: int | None = None, seed: int = 0) -> dict[str, list[dict]]:
    """{"TIFA": rows, "HPS v2": rows}: each benchmark from its source, or the held-out prompts where none is given
    (`limit`: prompts per set, per style for HPS v2)."""
    return {"TIFA": load_tifa(tifa, cache_dir, limit, seed) if tifa else held_out_as_tifa(held_out),
            "HPS v2": (load_hps_prompts(hps, cache_dir, per_style=limit, seed=seed) if hps else
                       [{**{k: p[k] for k in ("prompt_id", "prompt", "category")}, "source": STAND_IN}
                        for p in held_out])}


def tifa_key(question: Mapping[str, Any], answering: str = "free_form") -> str:
    """The score-cache name of the VQA model's answer to one TIFA question (its text, choices and answer) under
    one answering method (free answers: with their decoding settings, so a change of them asks afresh)."""
    how = [answering, FREE_FORM_DECODING] if answering == "free_form" else [answering]
    return f"tifa-answer-{answering}:" + sha256_json([question["question"], list(question["choices"]),
                                                      question["answer"], *how])[:16]


def check_answering(answering: str) -> str:
    if answering not in ANSWERING:
        raise ValueError(f"answering={answering!r} is not a TIFA answering method; use one of "
                         + ", ".join(f"{name!r} ({what})" for name, what in ANSWERING.items()))
    return answering


def nearest_choices(answers: Sequence[str], choices: Sequence[Sequence[str]], encoder) -> list[str]:
    """TIFA's mapping of free answers onto choices: an answer that is one of its choices stands; any other becomes
    the choice whose normalised sentence embedding is nearest to the answer's (cosine similarity).

    Every distinct text (answers and choices) is embedded once, in one call to `encoder.encode`.
    """
    import numpy as np

    if len(answers) != len(choices):
        raise ValueError(f"got {len(answers)} answers for {len(choices)} choice lists; pass one of each per question")
    unseen: set[str] = set()  # the answers that are no choice, and their choices
    for answer, options in zip(answers, choices):
        if answer not in options:
            unseen.update([str(answer), *map(str, options)])
    texts = sorted(unseen)
    if not texts:
        return list(answers)
    at = {text: i for i, text in enumerate(texts)}
    embeddings = np.asarray(encoder.encode(texts, normalize_embeddings=True, convert_to_numpy=True,
                                           show_progress_bar=False), dtype=np.float32)
    mapped = []
    for answer, options in zip(answers, choices):
        if answer in options:
            mapped.append(answer)
            continue
        similarity = embeddings[[at[str(c)] for c in options]] @ embeddings[at[str(answer)]]
        mapped.append(options[int(similarity.argmax())])
    return mapped


def tifa_models(ctx, answering: str, scorer=None, encoder=None) -> tuple[Any, Any]:
    """(VQA scorer, sentence encoder or None) that answer TIFA's questions by `answering`: the given ones, else the
    run's BLIP-2 and TIFA encoder, each loaded on its first use (`LoadedOnUse`)."""
    from .models import load_text_encoder, resolve
    from .scorers.base import LoadedOnUse, local_weight_files, weights_id
    from .scorers.vqa import load_vqa_for_run

    check_answering(answering)
    if scorer is None:
        scorer = load_vqa_for_run(ctx)
    if answering == "likeliest":
        return scorer, None
    if encoder is None:
        source = resolve("tifa_sbert", ctx)
        encoder = LoadedOnUse(lambda: load_text_encoder(source, ctx.device),
                              weights_id(source, *local_weight_files(source)))
    return scorer, encoder


def _said(vqa, images, asked: Sequence[Mapping[str, Any]], answering: str) -> list[str]:
    """What the VQA model answers to each (image, question): its free answer, or the likeliest choice."""
    texts, options = [q["question"] for q in asked], [q["choices"] for q in asked]
    if answering == "likeliest":
        return vqa.choose(images, texts, options)
    return vqa.free_form_answers(images, texts, options, **FREE_FORM_DECODING)


def tifa_answers(generated, questions: Sequence[Sequence[Mapping[str, Any]]], ctx, *,
                 answering: str = "free_form", scorer=None, encoder=None, cache=None,
                 images_per_batch: int = 16) -> list[list[dict[str, Any]]]:
    """Per image, per question: what the VQA model said, the choice that counts, and whether it is right.

    `answering`: "free_form" (TIFA's protocol; `encoder`, a sentence encoder, maps a free answer that is no choice
    onto the nearest one) or "likeliest" (`VqaScorer.choose`). What the VQA model said is cached (text) like any
    score, under the method, its decoding and the VQA weights, so an image is never asked the same question twice
    and a fully cached rerun loads no VQA model; the cheap mapping onto choices runs on every call. Under a
    multi-process launch the images are split across processes.
    """
    from .scoring import ScoreCache, cached_answers

    vqa, sbert = tifa_models(ctx, answering, scorer, encoder)
    if any(not asked for asked in questions):
        raise ValueError("every image needs at least one TIFA question; a prompt without questions has no TIFA score")
    cache = cache if cache is not None else ScoreCache.shared(ctx.runs_dir / "image_cache" / "scores.jsonl")
    names = [[tifa_key(q, answering) for q in asked] for asked in questions]
    said = cached_answers(generated, questions, names, vqa.weights_id, cache, desc="TIFA",
                          images_per_batch=images_per_batch, model=vqa,
                          answer=lambda model, images, asked: _said(model, images, asked, answering))
    flat_said = [str(text) for row in said for text in row]
    flat_questions = [q for asked in questions for q in asked]
    chosen = flat_said if sbert is None else nearest_choices(flat_said, [q["choices"] for q in flat_questions], sbert)
    answered = iter([{"said": s if sbert is not None else None, "chosen": c, "right": c == q["answer"]}
                     for s, c, q in zip(flat_said, chosen, flat_questions)])
    return [[next(answered) for _ in asked] for asked in questions]


def tifa_scores(generated, questions: Sequence[Sequence[Mapping[str, Any]]], ctx, *, answering: str = "free_form",
                scorer=None, encoder=None, cache=None, images_per_batch: int = 16) -> list[float]:
    """TIFA score per image: 100 × the share of its questions the VQA model answers with the right choice
    (`tifa_answers`: how answers become choices, and what is cached)."""
    rows = tifa_answers(generated, questions, ctx, answering=answering, scorer=scorer, encoder=encoder, cache=cache,
                        images_per_batch=images_per_batch)
    return [100.0 * sum(a["right"] for a in row) / len(row) for row in rows]


def tifa_transcript(generated, questions: Sequence[Mapping[str, Any]], ctx, *, answering: str = "free_form",
                    scorer=None, encoder=None, cache=None):
    """One image's TIFA questions as a table: the choices, what BLIP-2 said, the choice that counts, the right
    answer. `generated` is the image's `t2i.Generated` (or anything with `.key` and `.image`); answers already in
    the score cache are read from it, so the table shows the very answers its TIFA score counted."""
    import pandas as pd

    answered = tifa_answers([generated], [questions], ctx, answering=answering, scorer=scorer, encoder=encoder,
                            cache=cache)[0]
    return pd.DataFrame([{"question": q["question"], "choices": ", ".join(map(str, q["choices"])),
                          **({"BLIP-2 said": a["said"]} if answering == "free_form" else {}),
                          "chosen": a["chosen"], "answer": q["answer"], "right": a["right"]}
                         for q, a in zip(questions, answered)])


def _tifa_values(asked, ctx, answering: str, vqa, sbert, cache, indices, generated) -> list[float]:
    """One block's TIFA scores: `asked` holds each request's questions, `indices` say which requests these are."""
    return tifa_scores(generated, [asked[i] for i in indices], ctx, answering=answering, scorer=vqa, encoder=sbert,
                       cache=cache)


def _hps_values(hps, indices, generated):
    """One block's HPS v2 scores, ×100."""
    return 100.0 * hps.score(generated)["hps"].to_numpy()


def benchmark_requests(benchmark: str, rows: Sequence[Mapping[str, Any]], systems: Mapping[str, Mapping[str, Any]],
                       seeds: int) -> tuple[list, list[dict[str, Any]]]:
    """(requests, owners) of one benchmark: every system draws every prompt with seeds 0..seeds-1."""
    from .t2i import Request

    requests, owners = [], []
    for system, api in systems.items():
        for row in rows:
            for seed in range(seeds):
                requests.append(Request(dict(api), row["prompt"], "", seed))
                owners.append({"benchmark": benchmark, "source": row["source"], "system": system,
                               "prompt_id": row["prompt_id"], "category": row["category"], "prompt": row["prompt"],
                               "seed": seed})
    return requests, owners


def evaluate(sets: Mapping[str, Sequence[Mapping[str, Any]]], systems: Mapping[str, Mapping[str, Any]], executor,
             ctx, seeds: int, tifa_answering: str = "free_form", block_size: int | None = None,
             keep: Callable[[Mapping[str, Any]], bool] | None = None, owned: Collection[str] = ()):
    """Each system draws each benchmark's prompts with seeds 0..seeds-1: TIFA score on TIFA (answered by
    `tifa_answering`, see `tifa_answers`), HPS v2 (×100) on HPS v2. One row per image: benchmark, source, system,
    prompt_id, category, prompt, seed, key, metric, value. Drawn and scored in blocks (`scoring.score_in_blocks`;
    at paper scale TIFA alone is 4,081 captions × systems × seeds), every model loaded once.

    `keep` (an image's row without key and value → whether its image stays): the others leave the image cache once
    their answers or scores are cached, and a rerun draws only those with one missing (`scoring.score_then_remove`;
    the count is in `executor.stats["removed_once_scored"]`; `owned`: images the caller drew and kept for these
    benchmarks, removed here too, see `scoring.score_then_remove`). None keeps them all.
    """
    import pandas as pd

    from .scoring import ScoreCache, ScoringRun, load_scorer, score_in_blocks, score_then_remove

    vqa, sbert = tifa_models(ctx, tifa_answering)  # checks the method before any image is drawn; loads on use
    cache = ScoreCache.shared(ctx.runs_dir / "image_cache" / "scores.jsonl")  # read once for every block
    hps = None
    tables = []
    plans = [(benchmark, rows, *benchmark_requests(benchmark, rows, systems, seeds))
             for benchmark, rows in sets.items()]
    all_keys = [[executor.key(request) for request in requests] for _, _, requests, _ in plans]
    owned = set(owned)
    kept = set() if keep is None else {keys[i] for keys, (*_, owners) in zip(all_keys, plans)
                                       for i in range(len(owners)) if keep(owners[i])}  # by any benchmark
    for n, (benchmark, rows, requests, owners) in enumerate(plans):
        if not requests:
            continue
        keys = all_keys[n]
        # an image a later benchmark asks for too stays until that one has scored it (stand-in sets share prompts)
        later = set().union(*all_keys[n + 1:]) if keep is not None else set()
        owned |= {key for key in later if not executor.cache.has(key)}  # what this pass draws for them is ours
        if benchmark == "TIFA":
            questions = {row["prompt_id"]: row["questions"] for row in rows}
            asked = [questions[owner["prompt_id"]] for owner in owners]
            metric, values = "TIFA score", partial(_tifa_values, asked, ctx, tifa_answering, vqa, sbert, cache)
            scored = lambda i: all(cache.get(keys[i], tifa_key(q, tifa_answering), vqa.weights_id)  # noqa: E731
                                   is not None for q in asked[i])
        else:
            hps = hps if hps is not None else ScoringRun({"hps": load_scorer("hps", ctx)}, cache)
            metric, values = "HPS v2 (×100)", partial(_hps_values, hps)
            scored = lambda i: hps.scored(keys[i])  # noqa: E731

        def score_block(indices, generated):
            return pd.DataFrame({"key": [g.key for g in generated], "value": values(indices, generated)})
        if keep is None:
            table = score_in_blocks(executor, requests, score_block, block_size)
        else:
            table = score_then_remove(executor, requests, score_block, scored=scored, keep=lambda i: keys[i] in kept,
                                      block_size=block_size, keys=keys, owned=owned, spare=later)
        tables.append(pd.DataFrame(owners).assign(key=table["key"], metric=metric, value=table["value"]))
    columns = ["benchmark", "source", "system", "prompt_id", "category", "prompt", "seed", "key", "metric", "value"]
    return pd.concat(tables, ignore_index=True)[columns] if tables else pd.DataFrame(columns=columns)
