"""RRHF (Yuan et al., 2023) as DiffAgent uses it: rank several API-call candidates per prompt by reward.

For one prompt with candidates y_1..y_n and rewards s_1..s_n, p_i is the length-normalised log-probability of
y_i; the loss is L = L_rank + L_ce with L_rank = Σ_{s_i < s_j} max(0, p_i − p_j) (a worse candidate must not be
more likely than a better one) and L_ce the SFT loss on the best candidate, argmax_i s_i.

Pieces, TRL-style: pure functions (`rrhf_loss`, `length_normalised_logps`, `ranking_accuracy`), a data format
(`build_rrhf_dataset`) and its collator (`RRHFCollator`), a config (`RRHFConfig`) and a trainer (`RRHFTrainer`).
Unlike the reference implementation, a batch may hold several prompts, each with its own number of candidates.
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer

from .generation import user_message
from .sft import LoraArguments, ProjectTrainingArguments, memory_hint_for, save_trained, trainer_resume_point

IGNORE_INDEX = -100


# ------------------------------------------------------------------------------------------- pure functions

def _ordered_pairs(rewards: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[batch, n, n] bool: True at (i, j) when candidates i and j are real and reward_i < reward_j."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [batch, num_candidates], got shape {tuple(rewards.shape)}")
    pairs = rewards.unsqueeze(2) < rewards.unsqueeze(1)  # ties are never ordered, so they never count
    if mask is not None:
        mask = mask.to(torch.bool)
        pairs = pairs & mask.unsqueeze(2) & mask.unsqueeze(1)
    return pairs


def rrhf_loss(logps: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """RRHF ranking loss: per prompt Σ_{reward_i < reward_j} max(0, logp_i − logp_j), averaged over prompts."""
    if logps.shape != rewards.shape:
        raise ValueError(f"logps {tuple(logps.shape)} and rewards {tuple(rewards.shape)} must have the same shape")
    pairs = _ordered_pairs(rewards, mask)
    margins = (logps.unsqueeze(2) - logps.unsqueeze(1)).clamp(min=0)
    # `where`, not multiplication: a padded slot may hold any value (even nan) and must add neither loss nor grad
    per_prompt = torch.where(pairs, margins, torch.zeros_like(margins)).sum(dim=(1, 2))
    return per_prompt.mean()


def ranking_accuracy(logps: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Share of pairs with reward_i < reward_j whose log-probs agree (logp_i < logp_j); nan if no such pair."""
    correct, total = _ranking_counts(logps, rewards, mask)
    return correct / total if total else math.nan


def _ranking_counts(logps: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor | None) -> tuple[int, int]:
    pairs = _ordered_pairs(rewards, mask)
    agree = logps.detach().unsqueeze(2) < logps.detach().unsqueeze(1)
    return int((pairs & agree).sum()), int(pairs.sum())


def _response_token_logps(logits: torch.Tensor, labels: torch.Tensor,
                          ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each label token under the logits one position earlier (causal shift) and the response mask."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    response = labels != ignore_index
    targets = torch.where(response, labels, torch.zeros_like(labels))
    logits = logits.float()  # log-probs in float32 even when the model runs in bf16
    # gather − logsumexp: the same values as log_softmax + gather without a second [rows, tokens, vocab] tensor
    token_logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return torch.where(response, token_logps, torch.zeros_like(token_logps)), response


def length_normalised_logps(logits: torch.Tensor, labels: torch.Tensor,
                            ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean log-prob of the response tokens (labels ≠ ignore_index) of each row: RRHF's p_i, shape [rows]."""
    token_logps, response = _response_token_logps(logits, labels, ignore_index)
    return token_logps.sum(-1) / response.sum(-1).clamp(min=1)  # a row without response tokens scores 0


# ---------------------------------------------------------------------------------------------- data format

def build_rrhf_dataset(rows: Iterable[Mapping[str, Any]]):
    """A `datasets.Dataset` of {prompt, candidates, rewards} rows, each checked; errors name the bad row."""
    from datasets import Dataset

    checked = []
    for index, row in enumerate(rows):
        missing = [key for key in ("prompt", "candidates", "rewards") if key not in row]
        if missing:
            raise ValueError(f"row {index} lacks {missing}; each row needs 'prompt', 'candidates' and 'rewards'")
        prompt, candidates, rewards = row["prompt"], list(row["candidates"]), list(row["rewards"])
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"row {index}: prompt must be a non-empty string, got {prompt!r}")
        if not all(isinstance(candidate, str) for candidate in candidates):
            raise ValueError(f"row {index}: candidates must be strings (API-call JSON), got {candidates!r}")
        if len(candidates) != len(rewards):
            raise ValueError(f"row {index}: {len(candidates)} candidates but {len(rewards)} rewards; "
                             "give exactly one reward per candidate")
        if len(candidates) < 2:
            raise ValueError(f"row {index}: {len(candidates)} candidate(s); RRHF ranks candidates, so give at least 2")
        try:
            rewards = [float(reward) for reward in rewards]
        except (TypeError, ValueError):
            raise ValueError(f"row {index}: rewards must be numbers, got {rewards!r}") from None
        if not all(math.isfinite(reward) for reward in rewards):
            raise ValueError(f"row {index}: rewards must be finite, got {rewards!r}; drop or re-score that row")
        checked.append({**row, "prompt": prompt, "candidates": candidates, "rewards": rewards})
    if not checked:
        raise ValueError("no rows given; an RRHF dataset needs at least one prompt with candidates")
    return Dataset.from_list(checked)


_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


class RRHFCollator:
    """B examples with up to n candidates → B·n right-padded rows (labels = the response only) + [B, n] tensors.

    Row b·n + i is candidate i of example b. Slots beyond an example's own candidates are padding rows
    (attention 0, labels ignored) and `candidate_mask[b, i]` is False there.
    """

    def __init__(self, tokenizer, max_length: int = 512, num_candidates: int | None = None):
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token first")
        if tokenizer.chat_template is None:
            raise ValueError("the tokenizer has no chat template; set tokenizer.chat_template (RRHF trains chats)")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.num_candidates = num_candidates
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # {% generation %} blocks let the template itself say which tokens the assistant wrote
        self.uses_generation_blocks = bool(_GENERATION_BLOCK.search(tokenizer.chat_template))

    def tokenize(self, prompt: str, candidate: str) -> tuple[list[int], list[int]]:
        """input_ids and labels (IGNORE_INDEX outside the assistant's response) of one chat, truncated."""
        messages = [*user_message(prompt), {"role": "assistant", "content": candidate}]
        if self.uses_generation_blocks:
            encoded = self.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                         return_assistant_tokens_mask=True)
            input_ids, response = list(encoded["input_ids"]), list(encoded["assistant_masks"])
        else:
            input_ids, response = self._tokenize_by_prefix(messages)
        labels = [token if keep else IGNORE_INDEX for token, keep in zip(input_ids, response)]
        input_ids, labels = input_ids[:self.max_length], labels[:self.max_length]
        if all(label == IGNORE_INDEX for label in labels):
            raise ValueError(f"prompt {prompt[:60]!r} leaves no response token within max_length={self.max_length}; "
                             "raise max_length or shorten the prompt")
        return input_ids, labels

    def _tokenize_by_prefix(self, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
        """Response = the characters after the generation prompt (trailing whitespace excluded), mapped to tokens."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        prefix = self.tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        if not text.startswith(prefix):
            raise ValueError("the chat template renders the user turn differently with and without the reply; "
                             "add {% generation %} markers to the template so the response can be found")
        end = len(text.rstrip())
        # the template text already holds its special tokens (bos, role markers): add none
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        response = [int(start >= len(prefix) and start < end) for start, _ in encoded["offset_mapping"]]
        return list(encoded["input_ids"]), response

    def __call__(self, examples: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        most = max(len(example["candidates"]) for example in examples)
        num_candidates = self.num_candidates or most
        if most > num_candidates:
            raise ValueError(f"an example has {most} candidates but num_candidates={num_candidates}; "
                             "raise num_candidates or drop candidates")
        rows: list[tuple[list[int], list[int]] | None] = []
        rewards = torch.zeros(len(examples), num_candidates)
        candidate_mask = torch.zeros(len(examples), num_candidates, dtype=torch.bool)
        for b, example in enumerate(examples):
            for i, candidate in enumerate(example["candidates"]):
                rows.append(self.tokenize(example["prompt"], candidate))
                rewards[b, i] = float(example["rewards"][i])
                candidate_mask[b, i] = True
            rows += [None] * (num_candidates - len(example["candidates"]))
        length = max(len(row[0]) for row in rows if row is not None)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for r, row in enumerate(rows):
            if row is not None:  # right padding: training needs no generation-style left alignment
                ids, row_labels = row
                input_ids[r, :len(ids)] = torch.tensor(ids)
                labels[r, :len(ids)] = torch.tensor(row_labels)
                attention_mask[r, :len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                "rewards": rewards, "candidate_mask": candidate_mask}


# ------------------------------------------------------------------------------------------------- config

@dataclass
class RRHFConfig(ProjectTrainingArguments, LoraArguments):
    """Training arguments for `RRHFTrainer`: the usual `TrainingArguments` plus RRHF's loss weights and sizes."""

    rank_loss_weight: float = field(default=1.0, metadata={
        "help": "Weight of the ranking loss Σ_{s_i<s_j} max(0, p_i − p_j). RRHF and DiffAgent use 1."})
    ce_loss_weight: float = field(default=1.0, metadata={
        "help": "Weight of the cross-entropy (SFT) loss on each prompt's best candidate. RRHF and DiffAgent use 1."})
    max_length: int = field(default=512, metadata={
        "help": "Longest prompt + candidate in tokens; longer rows are cut from the right."})
    num_candidates: int | None = field(default=None, metadata={
        "help": "Candidates per prompt in every batch (fewer are padded and masked, more is an error); "
                "None: the most any prompt in the batch has."})
    # Changed default: the collator needs the `prompt`, `candidates` and `rewards` columns, which the model's
    # forward does not take; the Trainer's default (True) would drop them before they reach the collator.
    remove_unused_columns: bool = field(default=False, metadata={
        "help": "Keep False: RRHFCollator reads the 'prompt', 'candidates' and 'rewards' columns itself."})

    def __post_init__(self):
        super().__post_init__()  # the project's training defaults, then TrainingArguments'
        self.check_lora()
        for name in ("rank_loss_weight", "ce_loss_weight"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}={value!r} must be a finite number ≥ 0; use 1.0 for the paper's loss")
        if self.rank_loss_weight == 0 and self.ce_loss_weight == 0:
            raise ValueError("rank_loss_weight and ce_loss_weight are both 0, so nothing would train; "
                             "set at least one above 0 (the paper uses 1 and 1)")
        if self.max_length < 2:
            raise ValueError(f"max_length={self.max_length} is too short for a prompt and a reply; use e.g. 512")
        if self.num_candidates is not None and self.num_candidates < 2:
            raise ValueError(f"num_candidates={self.num_candidates}: ranking needs at least 2; "
                             "or leave it None to use the most candidates in each batch")


# ------------------------------------------------------------------------------------------------ trainer

class RRHFTrainer(Trainer):
    """`Trainer` with RRHF's loss over batches of several prompts, each with its candidates.

    Pass the tokenizer as `processing_class`; without a `data_collator` an `RRHFCollator` is built from it.
    Logs `rank_loss`, `ce_loss` and `ranking_accuracy` (averaged since the last log) next to `loss`.
    """

    # compute_loss returns a per-batch mean, so the Trainer must divide it by the gradient accumulation steps
    # (it would not, for a model whose forward takes loss kwargs, if left to guess)
    loss_is_scaled_for_ga = False

    def __init__(self, model=None, args: RRHFConfig | None = None, data_collator=None, processing_class=None,
                 **kwargs):
        if args is None:
            args = RRHFConfig(output_dir="rrhf")
        if not isinstance(args, RRHFConfig):
            raise TypeError(f"args must be an RRHFConfig, got {type(args).__name__}; build one with RRHFConfig(...)")
        if data_collator is None:
            if processing_class is None:
                raise ValueError("pass the tokenizer as processing_class (or a data_collator) to RRHFTrainer")
            data_collator = RRHFCollator(processing_class, args.max_length, args.num_candidates)
        super().__init__(model=model, args=args, data_collator=data_collator, processing_class=processing_class,
                         **kwargs)
        # [sum, count] per metric since the last log, kept apart for training and evaluation
        self._metric_sums: dict[str, dict[str, list[float]]] = {"train": defaultdict(lambda: [0.0, 0.0]),
                                                                "eval": defaultdict(lambda: [0.0, 0.0])}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Overridden because RRHF's loss couples the candidates of a prompt; num_items_in_batch is unused as both
        # terms are means over this batch (see loss_is_scaled_for_ga).
        rewards, candidate_mask = inputs["rewards"], inputs["candidate_mask"]
        batch, n = rewards.shape
        real = candidate_mask.reshape(-1)
        # one forward over the real rows only: padded candidate slots would cost compute and add nothing
        outputs = model(input_ids=inputs["input_ids"][real], attention_mask=inputs["attention_mask"][real],
                        use_cache=False)
        labels = inputs["labels"][real]
        token_logps, response = _response_token_logps(outputs.logits, labels)
        row_logps = token_logps.sum(-1) / response.sum(-1).clamp(min=1)
        logps = row_logps.new_zeros(batch * n).masked_scatter(real, row_logps).view(batch, n)
        rank_loss = rrhf_loss(logps, rewards, candidate_mask)

        # SFT on each prompt's best real candidate: its token-mean CE (= −p_best), averaged over prompts like the
        # ranking term. Per prompt, not per token of the whole batch: then a batch split across processes (or into
        # accumulated micro-batches) of equal prompt counts averages to exactly the whole batch's loss
        best = rewards.masked_fill(~candidate_mask, -math.inf).argmax(dim=1)
        best_rows = (torch.cumsum(real, 0) - 1).view(batch, n).gather(1, best.unsqueeze(1)).squeeze(1)
        ce_loss = -row_logps[best_rows].mean()

        loss = self.args.rank_loss_weight * rank_loss + self.args.ce_loss_weight * ce_loss
        correct, total = _ranking_counts(logps, rewards, candidate_mask)
        self._record("train" if model.training else "eval", rank_loss=(rank_loss.item(), 1),
                     ce_loss=(ce_loss.item(), 1), ranking_accuracy=(correct, total))
        return (loss, {"logps": logps.detach()}) if return_outputs else loss

    def _record(self, mode: str, **sums: tuple[float, float]) -> None:
        names = list(sums)
        stats = torch.tensor([value for name in names for value in sums[name]], device=self.accelerator.device,
                             dtype=torch.float64)
        stats = self.accelerator.reduce(stats, reduction="sum")  # the whole batch across processes
        for k, name in enumerate(names):
            self._metric_sums[mode][name][0] += stats[2 * k].item()
            self._metric_sums[mode][name][1] += stats[2 * k + 1].item()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Overridden to add the RRHF terms, averaged since the last log, to the Trainer's own log entry
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        for name, (total, count) in self._metric_sums[mode].items():
            if count:
                logs[prefix + name] = total / count
        self._metric_sums[mode].clear()
        super().log(logs, start_time)


# ------------------------------------------------------------------------------------------ notebook 07

def train_agent(model, tokenizer, dataset, output: Path, **config_kwargs) -> dict[str, Any]:
    """RRHF-train `model` on `dataset`; save model + tokenizer (and the log) to `output`.

    The ranking accuracy on the training candidates is measured before and after: how often the model already
    prefers the better of two candidates, and how often it does once trained. With `save_steps` (and a save
    strategy) set, a run that stopped resumes from its last checkpoint (`sft.trainer_resume_point`).
    """
    from .manifest import atomic_write_json, without_timings

    # each trained model its own resume points (the loss-weight variants share a parent folder)
    config = RRHFConfig(output_dir=str(Path(output).parent / "checkpoints" / Path(output).name),
                        **{**config_kwargs, "eval_on_start": True})
    if config.use_lora:
        from peft import get_peft_model

        if config.gradient_checkpointing:
            model.enable_input_require_grads()  # checkpointed blocks need a graph from the (frozen) embeddings
        from .config import private_seed

        with private_seed(config.seed, model.device):  # the adapters' initial weights, as TRL's SFTTrainer seeds them
            model = get_peft_model(model, config.peft_config())
    trainer = RRHFTrainer(model=model, args=config, train_dataset=dataset, eval_dataset=dataset,
                          processing_class=tokenizer)
    with memory_hint_for("RRHF", config):
        result = trainer.train(resume_from_checkpoint=trainer_resume_point(config, dataset, code=(__name__,)))
        after = trainer.evaluate()
    # the accuracy before training: `eval_on_start`'s evaluation, the first in the log (a resumed run's log comes
    # from its checkpoint). Not `trainer.evaluate()` before `train`: evaluating marks the model prepared for
    # accelerate, and `train` then leaves a prepared model out of DDP (and an FSDP one unsharded): every process
    # would train alone on its share of the prompts (tests/test_distributed.py compares with one process)
    before = next(row for row in trainer.state.log_history if "eval_ranking_accuracy" in row)
    save_trained(trainer, tokenizer, Path(output), config.use_lora)
    atomic_write_json(Path(output) / "log_history.json", without_timings(trainer.state.log_history))
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return {"steps": result.global_step, "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None,
            "ranking_accuracy_before": before.get("eval_ranking_accuracy"),
            "ranking_accuracy_after": after.get("eval_ranking_accuracy")}


def variant_name(rank_loss_weight: float, ce_loss_weight: float) -> str:
    """Folder name of a loss-weight variant, e.g. rank1_ce0.5."""
    return f"rank{rank_loss_weight:g}_ce{ce_loss_weight:g}"


def run_stage(folder: Path, ctx, dabench_path: Path, sft_model: Path, proposal: dict[str, Any],
              rewards: dict[str, Any], trainer_kwargs: dict[str, Any], num_prompts: int = 0,
              weight_variants: Sequence[tuple[float, float]] = ()) -> dict[str, Any]:
    """Notebook 07: candidates from the SFT agent, rewards from images, RRHF training (and loss-weight variants)."""
    import shutil

    from .agent import Agent
    from .candidates import candidate_set, propose, reward_candidates
    from .civitai import read_jsonl
    from .manifest import append_jsonl
    from .sft import answer_text, training_base_dtype
    from .t2i import ModelCatalog

    folder = Path(folder)
    records = read_jsonl(dabench_path)
    catalog = ModelCatalog.from_records(records)
    align = [record for record in records if record["split"] == "align"][:num_prompts or None]
    dtype = training_base_dtype(ctx, trainer_kwargs.get("use_lora", False))  # the proposing agent trains next
    agent = Agent.for_run(sft_model, ctx, dtype=dtype)
    texts = propose(agent, [r["instruction"]["prompt"] for r in align], seed=ctx.seed, **proposal)
    rows = [{"record": r["id"], "prompt": r["instruction"]["prompt"], "negative_prompt": r["instruction"]["negative_prompt"],
             "architecture": r["architecture"], "raw": raw,
             "candidates": candidate_set(raw, r["api"], catalog, r["architecture"])} for r, raw in zip(align, texts)]
    counts = reward_candidates(rows, ctx, catalog, **rewards)
    (folder / "candidates.jsonl").unlink(missing_ok=True)
    append_jsonl(folder / "candidates.jsonl", rows)
    usable = [{"prompt": row["prompt"], "candidates": [answer_text(c["api"]) for c in row["candidates"]],
               "rewards": [c["reward"] for c in row["candidates"]]} for row in rows if len(row["candidates"]) >= 2]
    counts.update({"prompts": len(rows), "prompts_ranked": len(usable),
                   "candidates": sum(len(row["candidates"]) for row in rows),
                   "agent_texts": sum(len(raw) for raw in texts),
                   "agent_texts_kept": sum("agent" in c["sources"] for row in rows for c in row["candidates"])})
    dataset = build_rrhf_dataset(usable)
    counts.update(train_agent(agent.model, agent.tokenizer, dataset, folder / "model", **trainer_kwargs))
    del agent
    for rank_weight, ce_weight in weight_variants:
        variant = Agent.for_run(sft_model, ctx, dtype=dtype)
        name = variant_name(rank_weight, ce_weight)
        kwargs = {**trainer_kwargs, "rank_loss_weight": rank_weight, "ce_loss_weight": ce_weight}
        counts[f"variant_{name}_last_loss"] = train_agent(variant.model, variant.tokenizer, dataset,
                                                          folder / "variants" / name, **kwargs)["last_loss"]
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    shutil.rmtree(folder / "variants" / "checkpoints", ignore_errors=True)
    return counts
