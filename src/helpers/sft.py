"""Supervised fine-tuning of the agent (DiffAgent Sec. 3.2.1): DABench prompt → API call, loss on the answer only.

Each DABench record becomes one conversational prompt–completion example: the user turn holds the T2I prompt,
the assistant turn the API call as JSON. TRL's `SFTTrainer` computes the loss on the completion only. The
model description is left out of the answer: the executor fills it in from the catalog (`t2i.validate`),
so the agent spends its capacity on the choices that decide the image.
"""
from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from transformers import TrainingArguments
from trl import SFTConfig

from .generation import user_message
from .manifest import atomic_write_json, without_timings

# The architecture comes first, then the model type and name: with the name chosen given the architecture, SmolLM2
# (small profile, 2 epochs) hallucinated 17.9% of DABench test calls instead of 23.7% (mismatches 14.1% → 11.5%).
ANSWER_FIELDS = ("base_model", "type", "model", "width", "height", "sampling_method", "sampling_steps", "cfg_scale")


def answer_text(api: dict[str, Any]) -> str:
    """The API call as the agent writes it: compact JSON of the decision fields, in a fixed order."""
    return json.dumps({key: api[key] for key in ANSWER_FIELDS}, ensure_ascii=False)


def to_example(record: dict[str, Any]) -> dict[str, Any]:
    """A DABench record as a conversational prompt–completion example for TRL."""
    return {"prompt": user_message(record["instruction"]["prompt"]),
            "completion": [{"role": "assistant", "content": answer_text(record["api"])}]}


def sft_dataset(records: Iterable[dict[str, Any]], split: str = "train", limit: int | None = None):
    """The `split` records of DABench as a `datasets.Dataset` of prompt–completion chats (first `limit`)."""
    import datasets

    chosen = [r for r in records if r["split"] == split]
    if not chosen:
        raise ValueError(f"DABench has no {split!r} records; splits are train, align, test")
    return datasets.Dataset.from_list([to_example(r) for r in chosen[:limit]])


@dataclass
class LoraArguments:
    """The LoRA switch shared by the SFT and RRHF configs (mixed into their `TrainingArguments`)."""

    use_lora: bool = field(default=False, metadata={"help": "train LoRA adapters (peft) instead of every weight"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (alpha / r scales the update)"})
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
                                           metadata={"help": "module names that get adapters"})

    def check_lora(self) -> None:
        if self.use_lora and self.lora_r < 1:
            raise ValueError(f"lora_r={self.lora_r} must be at least 1 when use_lora is on")

    def peft_config(self):
        """The LoRA configuration, or None for full fine-tuning."""
        if not self.use_lora:
            return None
        from peft import LoraConfig

        return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, target_modules=list(self.lora_target_modules),
                          lora_dropout=0.0, task_type="CAUSAL_LM")


def training_base_dtype(ctx, use_lora: bool):
    """The dtype a model that trains next is loaded in. LoRA: the run's (bf16 on a GPU), for the frozen base beside
    PEFT's fp32 adapters (a 7B base in 13.5 GB, not 27). fp32 when every weight trains (AdamW on bf16 weights
    loses small updates) and under an FSDP launch, which flattens each layer's weights into one dtype."""
    import torch

    from .distributed import fsdp_launch

    return ctx.dtype if use_lora and not fsdp_launch() else torch.float32


def training_defaults(args) -> None:
    """What the project's training configs settle before `TrainingArguments.__post_init__`: the launch's device
    (`launch_device_default`), transformers 5's name for gradient checkpointing (the old name, TRL's default on,
    keeps its value without a deprecation warning on every training page), no model checkpointing under an FSDP
    launch that checkpoints each layer itself (the Trainer refuses both at once: the paper recipe's
    `gradient_checkpointing: true` under `configs/accelerate/fsdp.yaml` stopped before its first step), and no
    pinned memory without a GPU (it only speeds up copies to one; torch warns on CPU)."""
    import torch

    from .distributed import fsdp_checkpoints_activations

    launch_device_default(args)
    if getattr(args, "activation_checkpointing", False) is None:
        args.activation_checkpointing = args.gradient_checkpointing
    if fsdp_checkpoints_activations():
        args.activation_checkpointing = args.gradient_checkpointing = False
    if not torch.cuda.is_available():
        args.dataloader_pin_memory = False


def micro_batches(batch_size: int, micro_batch_size: int = 0, *, names: tuple[str, str] = ("batch_size",
                                                                                          "micro_batch_size")
                  ) -> dict[str, int]:
    """TrainingArguments' `per_device_train_batch_size` and `gradient_accumulation_steps` for `batch_size` examples
    per optimizer step, taken `micro_batch_size` at a time (0: all at once). The same steps on the same examples
    in less GPU memory: the paper recipe's batches are sized for an 80 GB GPU. `names`: the notebook's parameters,
    for the error."""
    micro = micro_batch_size or batch_size
    if batch_size < 1 or micro < 1 or batch_size % micro:
        fits = [d for d in range(1, batch_size + 1) if batch_size % d == 0] if batch_size >= 1 else []
        raise ValueError(f"{names[1]}={micro_batch_size} must divide {names[0]}={batch_size} (one of {fits}; 0 takes "
                         f"the whole batch at once), so that every optimizer step still sees {names[0]} examples")
    return {"per_device_train_batch_size": micro, "gradient_accumulation_steps": batch_size // micro}


def memory_hint_for(work: str, args):
    """`speed.training_memory_hint` with a TrainingArguments' pass size, accumulation and checkpointing."""
    from .distributed import fsdp_checkpoints_activations
    from .speed import training_memory_hint

    checkpointing = bool(getattr(args, "activation_checkpointing", None) or args.gradient_checkpointing
                         or fsdp_checkpoints_activations())
    return training_memory_hint(work, args.per_device_train_batch_size, args.gradient_accumulation_steps,
                                checkpointing)


# TrainingArguments fields that do not change what a run trains: a resume point stays valid when they change
RESUME_FREE = frozenset({"output_dir", "logging_dir", "run_name", "logging_steps", "logging_strategy",
                         "logging_first_step", "save_steps", "save_strategy", "save_total_limit", "report_to",
                         "disable_tqdm"})


def trainer_resume_point(args, dataset, code: Sequence[str] = (__name__,)) -> str | None:
    """The checkpoint in `args.output_dir` a Trainer run resumes from: the newest one left by a run of the same
    settings, data and `code` (modules; `manifest.resume_point`: others are removed), else None. None, and nothing
    written, when the run saves no checkpoints or trains LoRA under FSDP (its checkpoints hold no adapters). Under a
    multi-process launch every process gets the main process's checkpoint."""
    from transformers.trainer_utils import get_last_checkpoint

    from .display import say
    from .distributed import fsdp_launch
    from .manifest import module_hashes, resume_point, rows_fingerprint

    if str(getattr(args.save_strategy, "value", args.save_strategy)) == "no":
        return None
    if getattr(args, "use_lora", False) and fsdp_launch():
        say(f"Note: LoRA under an FSDP launch does not resume from {args.output_dir}: the Trainer's checkpoints there "
            "hold no adapter weights (peft 0.21 looks the adapters up through FSDP's wrappers and finds none), so "
            "resuming would restart the adapters from zero under a later step's optimizer. This run starts over; "
            "LoRA runs resume under configs/accelerate/ddp.yaml.")
        return None
    settings = {key: value for key, value in args.to_dict().items() if key not in RESUME_FREE}
    return resume_point(Path(args.output_dir), {"settings": settings, "data": rows_fingerprint(dataset),
                                                "code": module_hashes(code)}, get_last_checkpoint)


def launch_device_default(args) -> None:
    """On a CPU launch of several processes, train data-parallel over gloo (`use_cpu`), as a GPU launch does over NCCL.

    Without `use_cpu` accelerate sees no GPU and no CPU backend and leaves each process to train alone on all of the
    data: the same model, computed once per process. Call before `TrainingArguments.__post_init__`.
    """
    from .distributed import cpu_launch

    if cpu_launch():
        args.use_cpu = True


@dataclass
class ProjectTrainingArguments(TrainingArguments):
    """transformers' `TrainingArguments` settled as the project's training configs are (`training_defaults`), for
    the trainers built on the plain `Trainer` (ChatGen's image-text SFT)."""

    def __post_init__(self):
        training_defaults(self)
        super().__post_init__()


@dataclass
class AgentSFTConfig(SFTConfig, LoraArguments):
    """TRL's SFTConfig plus the LoRA switch; defaults suit the tiny profile."""

    def __post_init__(self):
        training_defaults(self)
        super().__post_init__()
        self.check_lora()
        if not self.completion_only_loss and self.completion_only_loss is not None:
            raise ValueError("completion_only_loss=False would train the agent to write prompts too; leave it None "
                             "(TRL then masks the prompt for prompt–completion data)")


def train(model_path: str, dataset, config: AgentSFTConfig, output: Path, base_dtype=None) -> dict[str, Any]:
    """Fine-tune the causal LM at `model_path` on `dataset`; save model (LoRA merged) + tokenizer + card to `output`.

    `base_dtype`: the weights' dtype as loaded (None: fp32; `training_base_dtype`): bf16 only for LoRA, whose
    base stays frozen while PEFT keeps the adapters, which train, in fp32. With
    `save_steps` set, a run that stopped resumes from the last checkpoint in `config.output_dir` left by the
    same settings and data (`trainer_resume_point`).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if base_dtype not in (None, torch.float32) and not config.use_lora:
        raise ValueError(f"base_dtype={base_dtype} would train every weight in {base_dtype}, where AdamW loses small "
                         "updates; load in fp32 (base_dtype=None) or train LoRA adapters (use_lora=True)")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=base_dtype or torch.float32)
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=config.peft_config())
    with memory_hint_for("SFT", config):
        result = trainer.train(resume_from_checkpoint=trainer_resume_point(config, dataset))
    save_trained(trainer, tokenizer, Path(output), config.use_lora)
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    _model_card(Path(output), model_path, config, len(dataset), losses)
    atomic_write_json(Path(output) / "log_history.json", without_timings(trainer.state.log_history))
    return {"train_examples": len(dataset), "steps": result.global_step, "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None, "lora": config.use_lora}


def save_trained(trainer, tokenizer, output: Path, use_lora: bool) -> None:
    """Save a trainer's model as one plain causal LM (LoRA merged) plus tokenizer, under any kind of launch.

    One process or DDP: every process holds whole weights, so the adapters merge in memory. FSDP: each process holds
    a shard; every process sends its shard to the main process (`Accelerator.get_state_dict`, a collective), which
    writes the model from the gathered weights (`save_full_state_dict`). Either way the other processes then link to
    the main one's files.
    """
    from .distributed import link_main_output

    if not getattr(trainer, "is_fsdp_enabled", False):
        trained = trainer.model.merge_and_unload() if use_lora else trainer.model
        trained.save_pretrained(output)  # under a launch transformers writes on the main process only
        tokenizer.save_pretrained(output)
        link_main_output(output)
        return
    state_dict_type = str(trainer.accelerator.state.fsdp_plugin.state_dict_type)
    if "FULL_STATE_DICT" not in state_dict_type:
        raise ValueError(f"FSDP state_dict_type {state_dict_type} saves shards the agent cannot be loaded from; set "
                         "fsdp_state_dict_type: FULL_STATE_DICT (configs/accelerate/fsdp.yaml)")
    state = trainer.accelerator.get_state_dict(trainer.model)  # whole weights on the main process only
    if trainer.accelerator.is_main_process:
        save_full_state_dict(state, trainer.accelerator.unwrap_model(trainer.model), output, tokenizer, use_lora)
    link_main_output(output)


def save_full_state_dict(state: dict, model, output: Path, tokenizer, use_lora: bool) -> None:
    """Write the plain causal LM whose whole weights are `state`, keyed as `model` (a causal LM, or a PEFT model)
    names them: under FSDP the main process's gathered weights, while `model` itself is left in shards.

    LoRA: the adapters merge into a fresh copy of the PEFT model, loaded strictly (every weight named, no name
    left over), so a renamed key stops the save instead of leaving an adapter at its start (zero) and writing the
    untrained base. PEFT's own adapter files are not used here: under FSDP they come out empty (peft 0.21 looks its
    adapter names up through the FSDP and checkpoint wrappers, which the gathered names no longer carry).
    """
    import torch

    if use_lora:
        from peft import get_peft_model
        from transformers import AutoModelForCausalLM

        adapter = copy.deepcopy(model.peft_config[model.active_adapter])
        base = AutoModelForCausalLM.from_pretrained(adapter.base_model_name_or_path, dtype=torch.float32)
        fresh = get_peft_model(base, adapter)
        fresh.load_state_dict(state, strict=True)
        fresh.merge_and_unload().save_pretrained(output)
    else:
        model.save_pretrained(output, state_dict=state)
    tokenizer.save_pretrained(output)


def _model_card(folder: Path, base: str, config: AgentSFTConfig, examples: int, losses: Sequence[float]) -> None:
    (folder / "README.md").write_text(
        f"---\nlibrary_name: transformers\nbase_model: {Path(base).name}\ntags: [t2i-agent-book, diffagent, sft]\n---\n\n"
        f"# DiffAgent-SFT\n\nFine-tuned from `{Path(base).name}` with TRL's SFTTrainer on {examples} DABench "
        f"prompt → API-call chats (loss on the answer only), {config.max_steps if config.max_steps > 0 else ''} "
        f"steps, learning rate {config.learning_rate}, {'LoRA r=' + str(config.lora_r) if config.use_lora else 'all weights'}."
        f"\n\nLoss: {losses[0]:.3f} → {losses[-1]:.3f}.\n" if losses else "\n")


# ------------------------------------------------------------------------------------------ notebook 06

def named_model(text: str) -> str | None:
    """The model an answer names, valid or not (None when no JSON object with a model field is found)."""
    from .t2i import extract_json

    try:
        model = extract_json(text).get("model")
    except ValueError:
        return None
    return model if isinstance(model, str) else None


def check_agents(folder: Path, agents: dict[str, str], records: Sequence[dict[str, Any]], catalog, ctx,
                 batch_size: int = 16, max_new_tokens: int = 96) -> dict[str, float]:
    """Each agent's greedy API calls for `records`, validated; writes calls.jsonl, returns hallucination rates."""
    from .agent import Agent, ApiCallCache
    from .manifest import append_jsonl
    from .t2i import validate

    cache = ApiCallCache(ctx.runs_dir / "agent_cache" / "api_calls.jsonl")
    prompts = [record["instruction"]["prompt"] for record in records]
    rows = [{"prompt": prompt, "reference": answer_text(record["api"])} for prompt, record in zip(prompts, records)]
    rates = {}
    for name, path in agents.items():
        agent = Agent.for_run(path, ctx)
        for row, text in zip(rows, agent.api_calls(prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                                   cache=cache)):
            row[name] = text
            row[f"{name}_category"] = validate(text, catalog).category or "ok"
            row[f"{name}_model"] = named_model(text)
        rates[f"hallucination_{name}"] = sum(row[f"{name}_category"] != "ok" for row in rows) / max(len(rows), 1)
        del agent
    (folder / "calls.jsonl").unlink(missing_ok=True)
    append_jsonl(folder / "calls.jsonl", rows)
    return rates


def run_stage(folder: Path, ctx, dabench_path: Path, config: AgentSFTConfig, train_limit: int = 0,
              eval_limit: int = 0, eval_batch_size: int = 16, max_new_tokens: int = 96) -> dict[str, Any]:
    """Notebook 06: fine-tune the profile's agent LLM on DABench train, then check base vs SFT on the test split."""
    from .civitai import read_jsonl
    from .t2i import ModelCatalog

    records = read_jsonl(dabench_path)
    base = ctx.model_path("agent_llm")
    counts = train(base, sft_dataset(records, "train", train_limit or None), config, folder / "model",
                   base_dtype=training_base_dtype(ctx, config.use_lora))
    shutil.rmtree(config.output_dir, ignore_errors=True)  # resume points; the finished model is saved
    test = [record for record in records if record["split"] == "test"][:eval_limit or None]
    counts.update(check_agents(folder, {"base": base, "sft": str(folder / "model")}, test,
                               ModelCatalog.from_records(records), ctx, eval_batch_size, max_new_tokens))
    counts["test_prompts"] = len(test)
    return counts
