"""ChatGen-Evo stage 2 (ModelTokens): one new output row per catalog model; only those rows train.

After stage 1 has written the prompt, ChatGen-Evo picks the T2I model by predicting a *model token*: each catalog
model is one extra row of the LM head, and the frozen LLM scores it exactly as it scores a vocabulary token. This is
ToolkenGPT's recipe (Hao et al. 2023) applied to model selection:

* the LLM's own weights never change: every LM parameter gets `requires_grad=False` (tied input/output embeddings
  included: they are one tensor), and the optimiser only ever sees `rows`;
* the model tokens live only in the output layer. The tokenizer and the embedding matrix stay as they are, because
  nothing needs to *read* a model token: decoding stops at the first one;
* the logits over vocabulary + model tokens are `[LM logits, h @ rows.T]`, where `h = hidden_states[-1]` is the
  final (normed) hidden state that feeds `lm_head` (true for Llama/SmolLM2 in transformers; a test checks it);
* each row starts as the mean of the LM-head rows of its model name's tokens (`init="names"`), so the untrained
  rows already sit on the vocabulary's logit scale and differ from each other; `init="mean"` starts every row at
  the mean LM-head row (a neutral, identical start).

The context is the chat plus the stage-1 prompt: the last user turn opens with the task prefix
`TASK_PREFIXES["model"]` and ends with the prompt, and the tokenizer's chat template writes it up to the start of
the assistant's reply, where the model token is predicted.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..generation import _left_padded, _pad_id
from . import TASK_PREFIXES, ChatSample

ROWS_FILE = "model_tokens.safetensors"
FEATURE_CACHE_BYTES = 2 * 2**30  # the most that training keeps of the frozen LM's features, to reuse them
NAMES_FILE = "model_tokens.json"
INITS = ("names", "mean")


# ------------------------------------------------------------------------------------------- context

def selection_messages(messages: Sequence[Mapping[str, str]], prompt: str) -> list[dict[str, str]]:
    """The chat as stage 2 reads it: the last user turn gets the task prefix in front and the prompt behind."""
    if not messages or messages[-1].get("role") != "user":
        raise ValueError("messages must end with the user's turn (the chat ChatGen answers)")
    last = messages[-1]
    if not isinstance(last.get("content"), str):
        raise TypeError(f"the last user turn's content is {type(last.get('content')).__name__}, not text; model "
                        "selection reads text chats (pass the text of a multimodal turn)")
    content = f"{TASK_PREFIXES['model']} {last['content']}\nPrompt: {prompt}"
    return [dict(m) for m in messages[:-1]] + [{"role": "user", "content": content}]


def selection_example(sample: ChatSample, prompt: str | None = None) -> dict[str, Any]:
    """A ChatGenBench sample as a stage-2 example; `prompt` defaults to the target prompt (teacher forcing)."""
    return {"messages": sample.messages, "prompt": sample.target["prompt"] if prompt is None else prompt,
            "model": sample.target["model"]}


def context_ids(tokenizer, context: Mapping[str, Any]) -> list[int]:
    """Token ids of a context ({messages, prompt}) in the chat template, up to where the model token goes."""
    text = tokenizer.apply_chat_template(selection_messages(context["messages"], context["prompt"]),
                                         add_generation_prompt=True, tokenize=False)
    # the chat template already writes any BOS token; adding special tokens again would double it
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------- the head

def initial_rows(model, model_names: Sequence[str], tokenizer=None, init: str = "names") -> torch.Tensor:
    """[num_models, hidden] starting rows: mean LM-head row of each name's tokens ("names") or of all ("mean")."""
    weight = model.get_output_embeddings().weight.detach().float()
    if init == "mean":
        return weight.mean(0, keepdim=True).repeat(len(model_names), 1)
    if init != "names":
        raise ValueError(f"init={init!r} is not one of {INITS} (or a tensor of rows)")
    if tokenizer is None:
        raise ValueError("init='names' reads each model name's tokens; pass the tokenizer (or use init='mean')")
    rows = []
    for name in model_names:
        ids = tokenizer(name, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"model name {name!r} has no tokens; give it a non-empty name or use init='mean'")
        rows.append(weight[ids].mean(0))
    return torch.stack(rows)


class ModelTokenHead(torch.nn.Module):
    """A frozen causal LM plus one trainable output row per catalog model (ChatGen-Evo's ModelTokens)."""

    def __init__(self, model, model_names: Sequence[str], tokenizer=None, init: str | torch.Tensor = "names"):
        super().__init__()
        names = list(model_names)
        if not names or len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"model_names must be distinct non-empty strings; got {names!r}")
        self.model = model
        self.model.requires_grad_(False)  # THE FREEZE: shared (tied) tensors are frozen once, through either name
        self.model.eval()
        self.model_names = names
        rows = init if isinstance(init, torch.Tensor) else initial_rows(model, names, tokenizer, init)
        if rows.shape != (len(names), self.hidden_size):
            raise ValueError(f"rows of shape {tuple(rows.shape)} do not fit {len(names)} models × hidden size "
                             f"{self.hidden_size}")
        self.init = init if isinstance(init, str) else "given"
        device = model.get_output_embeddings().weight.device
        # float32 rows even under a bf16 LM: the only trained numbers keep full precision
        self.rows = torch.nn.Parameter(rows.detach().to(device=device, dtype=torch.float32).clone())

    @property
    def vocab_size(self) -> int:
        """Rows of the LM's own output layer; model token i has id vocab_size + i."""
        return self.model.get_output_embeddings().weight.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[1]

    def model_index(self, name: str) -> int:
        """Position of a catalog model among the model tokens."""
        if name not in self.model_names:
            raise ValueError(f"model {name!r} has no model token; known models: {', '.join(self.model_names)}")
        return self.model_names.index(name)

    def train(self, mode: bool = True):
        # the LM stays in eval mode: it is frozen, and dropout would give features that selection never sees
        super().train(mode)
        self.model.eval()
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, logits_to_keep: int = 0,
                **model_kwargs) -> torch.Tensor:
        """[batch, positions, vocab_size + num_models] logits; `logits_to_keep=1` keeps only the last position."""
        logits, _ = self._logits(input_ids, attention_mask, None, logits_to_keep, **model_kwargs)
        return logits

    def _logits(self, input_ids, attention_mask, cache, logits_to_keep: int = 0, **model_kwargs):
        vocab_logits, hidden, cache = self._lm(input_ids, attention_mask, cache, logits_to_keep, **model_kwargs)
        return self.logits_from_features(vocab_logits, hidden), cache

    def _lm(self, input_ids, attention_mask, cache, logits_to_keep: int = 0, **model_kwargs):
        """The LM's own part: its vocabulary logits and the final hidden states (float32, as the rows), the cache."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # positions count only real tokens, so a left-padded context is placed exactly like an unpadded one
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
        if logits_to_keep:
            model_kwargs["logits_to_keep"] = logits_to_keep
        # no graph through a frozen LM: only h @ rows.T needs gradients
        lm_trainable = any(p.requires_grad for p in self.model.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and lm_trainable):
            output = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                                past_key_values=cache, use_cache=cache is not None, output_hidden_states=True,
                                **model_kwargs)
        hidden = output.hidden_states[-1]
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return output.logits.to(self.rows.dtype), hidden.to(self.rows.dtype), output.past_key_values

    @torch.no_grad()
    def context_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[batch, hidden_size + 2]: what training needs of the frozen LM at the position after each context.

        The final hidden state, then the logsumexp and the max of the vocabulary logits. The loss over vocabulary
        + model tokens needs no more of the vocabulary than those two numbers (`selection_from_features`), and
        none of it depends on the rows, so training keeps and shares these rows instead of [vocab_size] logits.
        """
        vocab_logits, hidden, _ = self._lm(input_ids, attention_mask, None, logits_to_keep=1)
        last = vocab_logits[:, -1]
        return torch.cat([hidden[:, -1], last.logsumexp(-1, keepdim=True), last.amax(-1, keepdim=True)], dim=-1)

    def logits_from_features(self, vocab_logits: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over vocabulary + model tokens: the LM's own, then h @ rows.T."""
        return torch.cat([vocab_logits, hidden @ self.rows.T], dim=-1)

    def selection_from_features(self, features: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Stage 2's loss and accuracies from `context_features` rows, equal to those of the full logits.

        With model logits m = h @ rows.T and target y, the cross-entropy over [vocabulary, m] is
        logaddexp(logsumexp(vocabulary), logsumexp(m)) - m_y. Greedy decoding writes the target model token only
        where m_y is the first largest model logit and beats every vocabulary logit (argmax keeps the first of
        equal values, and the vocabulary comes first): that is `accuracy`; `model_accuracy` looks at m alone.
        """
        hidden, vocab_lse, vocab_max = features[:, :-2], features[:, -2], features[:, -1]
        model_logits = hidden @ self.rows.T
        target = model_logits.gather(1, labels[:, None])[:, 0]
        loss = (torch.logaddexp(vocab_lse, model_logits.logsumexp(-1)) - target).mean()
        with torch.no_grad():
            right_model = model_logits.argmax(-1) == labels
            return {"loss": loss, "accuracy": (right_model & (target > vocab_max)).float().mean(),
                    "model_accuracy": right_model.float().mean()}

    # ------------------------------------------------------------------------------------ save / load

    def save(self, folder: str | Path) -> Path:
        """Write the rows (safetensors), the names (JSON) and a short card; the LM itself is not copied."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"rows": self.rows.detach().cpu().contiguous()}, folder / ROWS_FILE)
        base = str(getattr(self.model.config, "_name_or_path", ""))
        if base and Path(base).is_absolute() and Path(base).exists():  # a local LM: where it lies from `folder`, so
            base = os.path.relpath(base, folder)                       # the run folder can move as one piece
        meta = {"model_names": self.model_names, "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
                "init": self.init, "base_model": base}
        (folder / NAMES_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        (folder / "README.md").write_text(
            "# ChatGen-Evo ModelTokens\n\nOne output row per catalog model for the frozen causal LM "
            f"`{base}` (vocabulary {self.vocab_size}, hidden size {self.hidden_size}); model token i has id "
            f"{self.vocab_size} + i. Load with `helpers.chatgen.model_tokens.ModelTokenHead.load(folder)` (a local "
            f"base model is named relative to this folder) or pass another `base_model_path`.\n\nModels: {', '.join(self.model_names)}\n")
        return folder

    @classmethod
    def from_base(cls, base_model_path: str | Path, model_names: Sequence[str], device: str = "cpu",
                  dtype: torch.dtype | None = None):
        """(head, tokenizer): new rows, initialised from the model names, on the causal LM at `base_model_path`,
        loaded on `device` in `dtype`. The frozen LM may run in bf16 on a GPU; the rows, the only weights that
        train, stay fp32, and the features they train on are computed in fp32 (`_lm`)."""
        from ..models import load_causal_lm

        model, tokenizer = load_causal_lm(str(base_model_path), device=device, dtype=dtype)
        return cls(model, model_names, tokenizer), tokenizer

    @classmethod
    def load(cls, folder: str | Path, base_model_path: str | Path | None = None, device: str = "cpu",
             dtype: torch.dtype | None = None):
        """(head, tokenizer): the base causal LM from `base_model_path` with the saved rows on top. Without
        `base_model_path`, the base model the rows were saved with: a hub id, or a folder relative to `folder`."""
        from safetensors.torch import load_file

        from ..models import load_causal_lm

        folder = Path(folder)
        meta = json.loads((folder / NAMES_FILE).read_text())
        if base_model_path is None:
            if not meta.get("base_model"):
                raise ValueError(f"{folder / NAMES_FILE} names no base model; pass base_model_path")
            recorded = Path(meta["base_model"])
            base_model_path = (folder / recorded).resolve() if (folder / recorded).exists() else meta["base_model"]
        rows = load_file(folder / ROWS_FILE)["rows"]
        model, tokenizer = load_causal_lm(str(base_model_path), device=device, dtype=dtype)
        head = cls(model, meta["model_names"], init=rows)
        if head.vocab_size != meta["vocab_size"]:
            raise ValueError(f"{folder} was trained on a LM with vocabulary {meta['vocab_size']}, but "
                             f"{base_model_path} has {head.vocab_size}; load it with its own base model "
                             f"({meta['base_model']!r})")
        head.init = meta.get("init", "given")
        return head, tokenizer


# ------------------------------------------------------------------------------------------- loss

def selection_batch(head: ModelTokenHead, tokenizer, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Left-padded contexts and the index of each example's target model ({messages, prompt, model} rows)."""
    token_lists = [context_ids(tokenizer, example) for example in examples]
    batch = _left_padded(token_lists, _pad_id(tokenizer), head.rows.device)
    batch["labels"] = torch.tensor([head.model_index(e["model"]) for e in examples], device=head.rows.device)
    return batch


def _next_logits(head: ModelTokenHead, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """[batch, vocab_size + num_models] logits at the position right after each context (left padding)."""
    return head(batch["input_ids"], batch["attention_mask"], logits_to_keep=1)[:, -1]


def model_selection_loss(head: ModelTokenHead, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Stage 2's loss: CE of the target model token (id vocab_size + label) at the position after the context, over
    the full logits (training computes the same from `context_features`)."""
    return torch.nn.functional.cross_entropy(_next_logits(head, batch).float(), batch["labels"] + head.vocab_size)


def train_model_tokens(head: ModelTokenHead, tokenizer, examples: Sequence[Mapping[str, Any]], *, steps: int = 100,
                       lr: float = 1e-3, batch_size: int = 8, seed: int = 0, weight_decay: float = 0.0,
                       progress: bool = True) -> list[dict[str, float]]:
    """AdamW on `head.rows` only; a log row per step: loss, accuracy (argmax over vocabulary + model tokens is the
    target: what greedy decoding needs) and model_accuracy (argmax among the model tokens only)."""
    from tqdm.auto import tqdm

    if steps < 1 or batch_size < 1 or not examples:
        raise ValueError(f"steps={steps} and batch_size={batch_size} must be >= 1 and examples non-empty")
    encoded = [context_ids(tokenizer, e) for e in examples]
    labels = torch.tensor([head.model_index(e["model"]) for e in examples])
    # Only the rows train, so a context's LM features never change. When examples come round again (more steps
    # than one epoch) and all their features fit in FEATURE_CACHE_BYTES, each context runs through the LM once.
    feature_bytes = len(examples) * (head.hidden_size + 2) * head.rows.element_size()
    reuse = steps * batch_size > len(examples) and feature_bytes <= FEATURE_CACHE_BYTES
    features: dict[int, torch.Tensor] = {}
    # weight decay 0 by default: decay would pull the rows (and so the model tokens' logits) towards zero
    optimizer = torch.optim.AdamW([head.rows], lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    log = []
    head.train()
    for step in tqdm(range(steps), desc="model tokens", disable=not progress):
        if len(order) < batch_size:  # a new epoch: every example once before any repeats
            order += torch.randperm(len(examples), generator=generator).tolist()
        chosen, order = order[:batch_size], order[batch_size:]
        missing = [i for i in dict.fromkeys(chosen) if i not in features]
        if missing:
            features.update(zip(missing, _shared_features(head, tokenizer, encoded, missing)))
        rows = torch.stack([features[i] for i in chosen])
        if not reuse:
            features.clear()
        result = head.selection_from_features(rows, labels[chosen].to(head.rows.device))
        optimizer.zero_grad(set_to_none=True)
        result["loss"].backward()
        optimizer.step()
        log.append({"step": step + 1, **{name: value.item() for name, value in result.items()}})
    head.eval()
    return log


def _shared_features(head: ModelTokenHead, tokenizer, encoded: Sequence[list[int]],
                     wanted: Sequence[int]) -> list[torch.Tensor]:
    """`context_features` of the contexts `encoded[i]` for i in `wanted`, on the rows' device. Under a launch each
    process runs one cost-balanced run of them (longest first, so each run pads little) through the LM, and
    every process gets every row: each then takes the same optimiser step, as data-parallel training would."""
    from ..distributed import launched_world_size, map_sharded

    apart = launched_world_size() > 1

    def here(share: list[int]) -> list[torch.Tensor]:
        batch = _left_padded([encoded[i] for i in share], _pad_id(tokenizer), head.rows.device)
        rows = head.context_features(batch["input_ids"], batch["attention_mask"])
        return list(rows.cpu() if apart else rows)  # the rows travel between processes as CPU tensors

    by_length = sorted(wanted, key=lambda i: -len(encoded[i]))
    found = dict(zip(by_length, map_sharded(here, by_length, cost=lambda i: len(encoded[i]))))
    return [found[i].to(head.rows.device) for i in wanted]


# ------------------------------------------------------------------------------------------- selection

@torch.no_grad()
def _greedy_choice(head: ModelTokenHead, input_ids, attention_mask, max_new_tokens: int,
                   eos_ids: set[int]) -> tuple[list[int], list[list[int]]]:
    """Per row: the chosen model index and the vocabulary tokens written before it.

    Greedy over vocabulary + model tokens; a row stops at its first model token. Where a row would write an eos
    token, or has written `max_new_tokens` tokens, the best model token is taken at that position instead: a
    selection always names a catalog model. max_new_tokens=0 is the argmax over the model-token rows directly.
    """
    batch_size = input_ids.shape[0]
    vocab_size = head.vocab_size
    choice = [-1] * batch_size
    written: list[list[int]] = [[] for _ in range(batch_size)]
    tokens, mask = input_ids, attention_mask
    cache = _new_cache(head.model) if max_new_tokens else None
    for step in range(max_new_tokens + 1):
        logits, cache = head._logits(tokens, mask, cache, logits_to_keep=1)
        logits = logits[:, -1]
        best_model = logits[:, vocab_size:].argmax(-1).tolist()
        best_any = logits.argmax(-1).tolist()
        for row in range(batch_size):
            if choice[row] >= 0:
                continue
            if best_any[row] >= vocab_size:
                choice[row] = best_any[row] - vocab_size
            elif step == max_new_tokens or best_any[row] in eos_ids:
                choice[row] = best_model[row]
            else:
                written[row].append(best_any[row])
        if min(choice) >= 0:
            break
        # a decided row is fed a vocabulary token only to keep the batch rectangular; its choice is already fixed
        next_tokens = torch.tensor([t if t < vocab_size else 0 for t in best_any], device=input_ids.device)
        tokens = next_tokens[:, None]
        mask = torch.cat([mask, mask.new_ones(batch_size, 1)], dim=1)
    return choice, written


def _new_cache(model):
    """An empty KV cache for step-by-step decoding (the cache type transformers' generate would start with)."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older signatures take no config
        return DynamicCache()


def _eos_ids(head: ModelTokenHead, tokenizer) -> set[int]:
    ids = set()
    for token_id in (tokenizer.eos_token_id, getattr(head.model.generation_config, "eos_token_id", None)):
        if token_id is not None:
            ids |= {token_id} if isinstance(token_id, int) else set(token_id)
    return ids


def select_models(head: ModelTokenHead, tokenizer, contexts: Sequence[Mapping[str, Any]], *,
                  max_new_tokens: int = 0, batch_size: int = 16,
                  return_written: bool = False) -> list[str] | list[tuple[str, str]]:
    """The catalog model chosen for each context ({messages, prompt}); with `return_written`, (name, text the model
    wrote before its model token) pairs. A batch that runs out of GPU memory is decoded again in halves, and the
    later batches keep to the size that fitted (`speed.fitting_batches`)."""
    if max_new_tokens < 0 or batch_size < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0 and batch_size={batch_size} >= 1")
    from ..distributed import map_sharded
    from ..speed import fitting_batches, length_buckets

    head.eval()
    eos_ids = _eos_ids(head, tokenizer)
    encoded = [context_ids(tokenizer, c) for c in contexts]
    fits = batch_size

    def decode(part: list[int]) -> list[tuple[int, list[int]]]:
        batch = _left_padded([encoded[i] for i in part], _pad_id(tokenizer), head.rows.device)
        return list(zip(*_greedy_choice(head, batch["input_ids"], batch["attention_mask"], max_new_tokens, eos_ids)))

    def here(share: list[list[int]]) -> list[list[tuple[int, list[int]]]]:
        nonlocal fits
        found = []
        for chunk in share:
            picks, fits = fitting_batches(decode, chunk, fits, "ChatGen model selection")
            found.append(picks)
        return found

    # contexts of like length batched together; under a launch each process decodes its share of whole batches
    batches = length_buckets([len(ids) for ids in encoded], batch_size)
    results: list[Any] = [None] * len(contexts)
    for chunk, picks in zip(batches, map_sharded(here, batches)):
        for i, (index, tokens) in zip(chunk, picks):
            name = head.model_names[index]
            results[i] = (name, tokenizer.decode(tokens)) if return_written else name
    return results


def select_model(head: ModelTokenHead, tokenizer, context: Mapping[str, Any], max_new_tokens: int = 0) -> str:
    """The catalog model chosen for one context ({messages, prompt})."""
    return select_models(head, tokenizer, [context], max_new_tokens=max_new_tokens)[0]
