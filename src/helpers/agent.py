"""The agent at work: T2I prompts in, API-call text out, by batched greedy decoding, cached per model.

Notebooks 06–08 and `t2ibook suggest` ask the same model for the same prompts more than once (the SFT check,
the Table 1 and Table 2 evaluations, a rerun); the answers are kept in an append-only cache keyed by the
model's identity, the prompt and the decoding settings, so each is decoded once.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .generation import _pad_id, chat_prompt
from .manifest import MANIFEST, append_jsonl, hash_tree, read_jsonl_rows, sha256_json

DEFAULT_MAX_NEW_TOKENS = 96  # a compact API call is 50–80 tokens with the tokenizers in this book


def model_identity(path: str | Path) -> str:
    """A stable id for the weights in `path`: the hash of {file: sha256}, read from its stage manifest if it has one.

    A finished stage's manifest already lists the hashes of its files, so a 7B model is not hashed again on
    every load; without one (or mid-stage, before the manifest is written) the files are hashed.
    """
    path = Path(path)
    if not path.is_dir():
        return sha256_json({"hub_id": str(path)})
    stage_manifest = path.parent / MANIFEST
    if stage_manifest.is_file():
        prefix = path.name + "/"
        outputs = json.loads(stage_manifest.read_text()).get("outputs", {})
        mine = {name[len(prefix):]: digest for name, digest in outputs.items() if name.startswith(prefix)}
        if mine:
            return sha256_json(mine)
    return sha256_json(hash_tree(path))


def fit_prompt(tokenizer, prompt: str, max_tokens: int) -> tuple[str, bool]:
    """`prompt` cut to its first `max_tokens` tokens (so a very long prompt still fits the context); was it cut?"""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return prompt, False
    return tokenizer.decode(ids[:max_tokens], skip_special_tokens=True), True


class ApiCallCache:
    """Append-only JSON lines of (model id, prompt, decoding settings) → the agent's text."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.texts = {row["key"]: row["text"] for row in read_jsonl_rows(self.path)}

    @staticmethod
    def key(model_id: str, prompt: str, decoding: dict[str, Any]) -> str:
        return sha256_json({"model": model_id, "prompt": prompt, "decoding": decoding})

    def get(self, key: str) -> str | None:
        return self.texts.get(key)

    def put_many(self, rows: Sequence[tuple[str, str]]) -> None:
        from .distributed import is_main_process

        if is_main_process():  # under a multi-process launch every process holds the merged answers; one writes
            append_jsonl(self.path, [{"key": key, "text": text} for key, text in rows])
        self.texts.update(rows)


@dataclass
class Agent:
    """A causal LM that writes API calls, with its tokenizer and the id of its weights."""

    model: Any
    tokenizer: Any
    model_id: str
    path: str = ""
    decode_settings: Any = None  # a helpers.speed.DecodeSettings; None: static cache + CUDA graphs on a GPU only

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None) -> "Agent":
        from .models import load_causal_lm

        if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"{path} holds no model (no config.json); train one with notebook 06 or 07, "
                                    "or pass the folder of a saved causal LM")
        model, tokenizer = load_causal_lm(str(path), device, dtype)
        return cls(model, tokenizer, model_identity(path), str(path))

    @classmethod
    def for_run(cls, path: str | Path, ctx, *, dtype: torch.dtype | None = None) -> "Agent":
        """`load` on the run's device in its dtype: bf16 on a GPU, the precision `t2ibook bench` times decoding
        in (fp32 doubles the weights' and the static cache's memory: a 7B agent and its cache for 128 prompts no
        longer fit 80 GB). `dtype` instead for an agent that trains next (`sft.training_base_dtype`)."""
        return cls.load(path, ctx.device, dtype or ctx.dtype)

    def decoding(self, max_new_tokens: int) -> dict[str, Any]:
        """What, besides the model and the prompt, decides a greedy answer (part of its `ApiCallCache` key): an
        answer written in fp32 is not reused for the same agent decoding in bf16."""
        return {"strategy": "greedy", "max_new_tokens": max_new_tokens,
                "dtype": str(self.model.dtype).removeprefix("torch.")}

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)

    def prompt_budget(self, max_new_tokens: int) -> int:
        """How many tokens of user prompt fit next to the system instruction and the answer."""
        overhead = len(chat_prompt(self.tokenizer, ""))
        return max(8, self.context_length - max_new_tokens - overhead)

    def api_calls(self, prompts: Sequence[str], *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                  batch_size: int = 16, cache: ApiCallCache | None = None, progress: bool = True) -> list[str]:
        """The agent's greedy answer to each prompt, decoded in length-sorted batches; cached answers are reused."""
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        decoding = self.decoding(max_new_tokens)
        budget = self.prompt_budget(max_new_tokens)
        keys = [ApiCallCache.key(self.model_id, prompt, decoding) for prompt in prompts]
        answers: dict[str, str] = {}
        if cache is not None:
            answers = {key: cache.get(key) for key in keys if cache.get(key) is not None}
        todo: dict[str, str] = {}  # key -> prompt, each distinct prompt decoded once
        for key, prompt in zip(keys, prompts):
            if key not in answers:
                todo.setdefault(key, fit_prompt(self.tokenizer, prompt, budget)[0])
        from .distributed import launched_world_size

        if launched_world_size() > 1:
            return self._api_calls_launched(keys, answers, todo, max_new_tokens, batch_size, cache, progress)
        if todo:
            fresh = self._decode(todo, max_new_tokens, batch_size, progress)
            answers.update(fresh)
            if cache is not None:
                cache.put_many(list(fresh.items()))
        return [answers[key] for key in keys]

    def _api_calls_launched(self, keys: list[str], answers: dict[str, str], todo: dict[str, str],
                            max_new_tokens: int, batch_size: int, cache: ApiCallCache | None,
                            progress: bool) -> list[str]:
        """`api_calls` under a multi-process launch (see helpers.distributed): the main process's cache decides what
        is decoded, its prompts are split across the processes, and every process returns the main one's answers.

        The other processes' caches (scratch folders) and model ids (links to the main folder's files hash unlike
        the files) may differ from the main one's, so only prompt texts and positions cross between processes.
        """
        from .distributed import broadcast_from_main, is_main_process, map_sharded
        from .speed import length_buckets

        # the batches one process would decode, shared out whole: each process decodes its share of them among all
        # the prompts (so with the whole call's cache width), each prompt in the batch it gets on one process
        prompts = broadcast_from_main(list(todo.values()))
        encoded = [chat_prompt(self.tokenizer, prompt) for prompt in prompts]

        def here(share: list[list[int]]) -> list[list[tuple[str, str]]]:
            texts = self._decode_tokens(encoded, max_new_tokens, batch_size, progress, batches=share)
            return [[(prompts[p], texts[p]) for p in batch] for batch in share]

        pairs = [pair for batch in map_sharded(here, length_buckets([len(t) for t in encoded], batch_size))
                 for pair in batch]
        final = None
        if is_main_process():
            by_prompt = dict(pairs)
            fresh = {key: by_prompt[prompt] for key, prompt in todo.items()}
            answers.update(fresh)
            if cache is not None:
                cache.put_many(list(fresh.items()))
            final = [answers[key] for key in keys]
        return broadcast_from_main(final)

    def _decode(self, todo: dict[str, str], max_new_tokens: int, batch_size: int, progress: bool) -> dict[str, str]:
        keys = list(todo)
        encoded = [chat_prompt(self.tokenizer, todo[key]) for key in keys]
        return dict(zip(keys, self._decode_tokens(encoded, max_new_tokens, batch_size, progress)))

    def _decode_tokens(self, encoded: list[list[int]], max_new_tokens: int, batch_size: int, progress: bool,
                       batches: list[list[int]] | None = None) -> list[str | None]:
        """The agent's text after each encoded prompt; with `batches` (see `speed.greedy_decode`) only theirs."""
        from tqdm.auto import tqdm

        from .speed import DecodeSettings, greedy_decode

        settings = self.decode_settings or DecodeSettings.auto(self.model.device, batch_size)
        settings = dataclasses.replace(settings, batch_size=batch_size)
        total = len(encoded) if batches is None else sum(map(len, batches))
        with tqdm(total=total, desc="API calls", unit="prompt", disable=not progress) as bar:
            tokens = greedy_decode(self.model, encoded, pad_id=_pad_id(self.tokenizer), max_new_tokens=max_new_tokens,
                                   settings=settings, progress=bar.update, batches=batches)
        decoded = [i for i, row in enumerate(tokens) if row is not None]
        found = self.tokenizer.batch_decode([tokens[i] for i in decoded], skip_special_tokens=True)
        texts: list[str | None] = [None] * len(encoded)
        for i, text in zip(decoded, found):
            texts[i] = text.strip()
        return texts


def default_agent_path(runs_dir: Path) -> Path:
    """The profile's most trained agent: the RRHF model of notebook 07, else the SFT model of notebook 06."""
    for stage in ("07_rrhf", "06_sft"):
        folder = Path(runs_dir) / stage / "model"
        if (folder / "config.json").is_file():
            return folder
    raise FileNotFoundError(f"no trained agent under {runs_dir}; run notebooks 06–07 first "
                            "(t2ibook run --from 06 --to 07) or pass --model FOLDER")


def suggest(agent: Agent, prompt: str, catalog, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> dict[str, Any]:
    """The agent's call for one prompt: its text, the validation verdict and whether the prompt was cut to fit."""
    from .t2i import validate

    if not prompt.strip():
        raise ValueError("the prompt is empty; describe the image, e.g. \"a cute corgi, pixel art\"")
    _, truncated = fit_prompt(agent.tokenizer, prompt, agent.prompt_budget(max_new_tokens))
    text = agent.api_calls([prompt], max_new_tokens=max_new_tokens, batch_size=1, progress=False)[0]
    return {"text": text, "validation": validate(text, catalog), "truncated": truncated}
