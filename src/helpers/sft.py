"""Supervised fine-tuning of the agent (DiffAgent Sec. 3.2.1): DABench prompt → API call, loss on the answer only.

Each DABench record becomes one conversational prompt–completion example: the user turn holds the T2I prompt,
the assistant turn the API call as JSON. TRL's `SFTTrainer` computes the loss on the completion only. The
model description is left out of the answer: the executor fills it in from the catalog (`t2i.validate`),
so the agent spends its capacity on the choices that decide the image.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from trl import SFTConfig

from .generation import user_message

ANSWER_FIELDS = ("model", "type", "base_model", "width", "height", "sampling_method", "sampling_steps", "cfg_scale")


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
class AgentSFTConfig(SFTConfig):
    """TRL's SFTConfig plus the LoRA switch; defaults suit the tiny profile."""

    use_lora: bool = field(default=False, metadata={"help": "train LoRA adapters (peft) instead of every weight"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (alpha / r scales the update)"})
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
                                           metadata={"help": "module names that get adapters"})

    def __post_init__(self):
        super().__post_init__()
        if self.use_lora and self.lora_r < 1:
            raise ValueError(f"lora_r={self.lora_r} must be at least 1 when use_lora is on")
        if not self.completion_only_loss and self.completion_only_loss is not None:
            raise ValueError("completion_only_loss=False would train the agent to write prompts too; leave it None "
                             "(TRL then masks the prompt for prompt–completion data)")

    def peft_config(self):
        """The LoRA configuration, or None for full fine-tuning."""
        if not self.use_lora:
            return None
        from peft import LoraConfig

        return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, target_modules=list(self.lora_target_modules),
                          lora_dropout=0.0, task_type="CAUSAL_LM")


def train(model_path: str, dataset, config: AgentSFTConfig, output: Path) -> dict[str, Any]:
    """Fine-tune the causal LM at `model_path` on `dataset`; save model (LoRA merged) + tokenizer + card to `output`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_path)
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=config.peft_config())
    result = trainer.train()
    trained = trainer.model.merge_and_unload() if config.use_lora else trainer.model
    trained.save_pretrained(output)
    tokenizer.save_pretrained(output)
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    _model_card(Path(output), model_path, config, len(dataset), losses)
    return {"train_examples": len(dataset), "steps": result.global_step, "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None, "lora": config.use_lora}


def _model_card(folder: Path, base: str, config: AgentSFTConfig, examples: int, losses: Sequence[float]) -> None:
    (folder / "README.md").write_text(
        f"---\nlibrary_name: transformers\nbase_model: {Path(base).name}\ntags: [t2i-agent-book, diffagent, sft]\n---\n\n"
        f"# DiffAgent-SFT\n\nFine-tuned from `{Path(base).name}` with TRL's SFTTrainer on {examples} DABench "
        f"prompt → API-call chats (loss on the answer only), {config.max_steps if config.max_steps > 0 else ''} "
        f"steps, learning rate {config.learning_rate}, {'LoRA r=' + str(config.lora_r) if config.use_lora else 'all weights'}."
        f"\n\nLoss: {losses[0]:.3f} → {losses[-1]:.3f}.\n" if losses else "\n")
