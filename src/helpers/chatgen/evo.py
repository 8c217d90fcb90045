"""ChatGen-Base and ChatGen-Evo as functions a notebook calls: formats, training, inference in stage order.

ChatGen (Sec. 4) turns a freestyle chat into a T2I call two ways:

* **ChatGen-Base**: one SFT model answers everything at once, a JSON object of prompt, negative prompt, model and
  arguments (`base_example`, `train_base`, `run_base`);
* **ChatGen-Evo**: three stages, each feeding the next —
  1. prompt writing: SFT on chat → {prompt, negative_prompt}, the last user turn prefixed with
     `TASK_PREFIXES["prompt"]` (`prompt_writing_example`, `train_stage1`, `write_prompts`);
  2. model selection: ModelTokens on chat + the stage-1 prompt, added to the stage-1 model's text model
     (`vlm.language_tower`; `model_tokens`, called by `select_models_for`);
  3. argument configuration, training-free: an in-context prompt with the selected model's description (the
     rewritten one from DABench) and k demonstrations of *that model* from DABench train (prompt → arguments),
     then the written prompt (`configure_arguments`).
  `run_evo` chains 1 → 2 → 3.

The baseline (`run_baseline`) rewrites the chat into a prompt in context and always runs one SD base model with the
default parameters. The Table 6 variants (one stage predicted, the others the target's) are
`chatgen.metrics.with_ground_truth`.

What reads the reference image of a multimodal sample: stage 1 and ChatGen-Base, when their model is an
image-text-to-text one. Stage 2 (the ModelTokens head sits on a causal LM) and stage 3 (prompt → arguments) read
text by design. A text-only stage-1/Base model gets the chat's text only, and its Prediction says so in
`notes["text_only"]`.

Every call a method returns is checked with `t2i.validate`. Arguments are repaired field by field: a missing or
invalid argument takes the model's default (`t2i.default_api`), `fallback=True`, and `notes["fallback"]` says why
({field: reason}; `notes["fallback_reason"]` when the answer had no JSON at all). A model that is not in the catalog
is never replaced: `model=None`, `valid=False`, and `notes["invalid"]` says why. Other notes: `prompt_problem` (no
usable prompt in the answer: `prompt=""`), `text_only`, `selected_model`, `demonstrations` (DABench record ids shown
in stage 3), `raw_prompt_writing` / `raw_arguments` (each stage's raw text; `raw` joins them).
"""
from __future__ import annotations

import copy
import json
import math
import re
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..distributed import link_main_output
from ..manifest import atomic_write_json, without_timings
from ..t2i import ModelCatalog, default_api, extract_json, validate
from . import ARGUMENT_FIELDS, TARGET_FIELDS, TASK_PREFIXES, ChatSample, Prediction
from . import model_tokens

# ChatGen-Base writes everything but the model's type and base model: the catalog knows those (`t2i.validate`)
BASE_FIELDS = tuple(key for key in TARGET_FIELDS if key not in ("type", "base_model"))
PROMPT_FIELDS = ("prompt", "negative_prompt")
METHODS = {"base": "ChatGen-Base", "evo": "ChatGen-Evo", "baseline": "Baseline"}
ARGUMENTS_SYSTEM = ("You configure Stable Diffusion. Given the model and a prompt, answer with one JSON object with "
                    f"the keys {', '.join(ARGUMENT_FIELDS)}, as in the examples.")
BASELINE_SYSTEM = ("You rewrite what a person asks an image assistant into one Stable Diffusion prompt: "
                   "comma-separated phrases for the subject, style, lighting and details. Answer with the prompt only.")

ImageFor = Callable[[str], Any]  # image-cache key -> PIL image (the reference image of a multimodal sample)


# ------------------------------------------------------------------------------------------- formats

def answer_json(values: Mapping[str, Any], fields: Sequence[str]) -> str:
    """`fields` of `values` as one compact JSON object, in that order (what the SFT models learn to write)."""
    return json.dumps({key: values[key] for key in fields}, ensure_ascii=False)


def task_messages(messages: Sequence[Mapping[str, str]], task: str) -> list[dict[str, str]]:
    """A copy of the chat with `TASK_PREFIXES[task]` in front of the last user turn (Evo's multi-task training)."""
    if task not in TASK_PREFIXES:
        raise ValueError(f"task={task!r} is not one of {list(TASK_PREFIXES)}")
    if not messages or messages[-1].get("role") != "user":
        raise ValueError("messages must end with the user's turn (the chat ChatGen answers)")
    copied = [dict(m) for m in messages]
    copied[-1]["content"] = f"{TASK_PREFIXES[task]} {copied[-1]['content']}"
    return copied


def _example(sample: ChatSample, prompt: list[dict[str, str]], answer: str, image_for: ImageFor | None) -> dict:
    example: dict[str, Any] = {"prompt": prompt, "completion": [{"role": "assistant", "content": answer}]}
    if image_for is not None and sample.image_key:
        example["images"] = [image_for(sample.image_key)]  # TRL's key for the images of a vision example
    return example


def base_example(sample: ChatSample, image_for: ImageFor | None = None) -> dict[str, Any]:
    """ChatGen-Base: the chat → one assistant message, compact JSON of BASE_FIELDS (TRL prompt–completion).

    With `image_for`, a multimodal sample's reference image is added as `images: [PIL image]`.
    """
    return _example(sample, [dict(m) for m in sample.messages], answer_json(sample.target, BASE_FIELDS), image_for)


def prompt_writing_example(sample: ChatSample, image_for: ImageFor | None = None) -> dict[str, Any]:
    """Evo stage 1: the chat, its last user turn prefixed with `[Prompt writing]` → {prompt, negative_prompt}."""
    return _example(sample, task_messages(sample.messages, "prompt"), answer_json(sample.target, PROMPT_FIELDS),
                    image_for)


# ------------------------------------------------------------------------------------------- training

def train_text_sft(model_path: str | Path, examples: Sequence[Mapping[str, Any]], config, output: str | Path,
                   title: str = "ChatGen SFT", unseen_images: int = 0) -> dict[str, Any]:
    """SFT of a text-only causal LM on prompt–completion chats with TRL (`helpers.sft.train`: loss on the completion
    only, LoRA when `config.use_lora`). Images in the examples are dropped (a text-only model reads text); they and
    `unseen_images` (reference images never loaded) are counted as `images_dropped`."""
    import datasets

    from ..sft import train

    if not examples:
        raise ValueError("no training examples; pass the train split's samples")
    rows = [{"prompt": list(e["prompt"]), "completion": list(e["completion"])} for e in examples]
    dropped = sum(bool(e.get("images")) for e in examples) + unseen_images
    result = train(str(model_path), datasets.Dataset.from_list(rows), config, Path(output))
    _card(Path(output), title, model_path, len(rows), result,
          f"text only: the reference images of {dropped} multimodal examples were left out" if dropped else "")
    return {**result, "images_dropped": dropped, "multimodal": False}


def final_reply_batch(processor, conversations: Sequence[Sequence[Mapping[str, Any]]], images=None):
    """`vlm.sft_batch` with the loss on each chat's final assistant reply only.

    `sft_batch` labels every assistant turn; the earlier assistant turns of a history chat are input here, as TRL's
    prompt–completion masking treats them on the text path, so both paths learn the same thing.
    """
    from .vlm import sft_batch

    batch = sft_batch(processor, conversations, images)
    for row in batch["labels"]:
        labelled = (row != -100).nonzero().flatten()
        if len(labelled) == 0:
            continue
        # each assistant turn is one run of labelled positions; the last run is the final reply
        breaks = ((labelled[1:] - labelled[:-1]) > 1).nonzero().flatten()
        row[:labelled[breaks[-1] + 1] if len(breaks) else labelled[0]] = -100
    return batch


def train_vlm_sft(vlm_path: str | Path, conversations: Sequence[Sequence[Mapping[str, Any]]], images: Sequence[Any],
                  output: str | Path, *, steps: int, lr: float, batch_size: int, seed: int = 0,
                  report_to: str | list[str] = "none", title: str = "ChatGen SFT",
                  image_for: ImageFor | None = None, checkpoints: str | Path | None = None, save_steps: int = 0,
                  **training_arguments) -> dict[str, Any]:
    """SFT of an image-text-to-text model on whole chats (ending with the assistant's reply), loss on the reply only.

    transformers' `Trainer` with `final_reply_batch` (`vlm.sft_batch`) as the collator, not TRL's SFTTrainer, although
    TRL 1.x does train LLaVA models offline: (1) TRL's `prepare_multimodal_messages` puts the image into the *first*
    user turn, while `ChatModel` (inference) puts the reference image into the *last* one, so a multi-turn chat would
    be trained in another layout than it is read in; (2) `sft_batch` and `ChatModel.inputs` render through the same
    `vlm.multimodal_messages`, and `sft_batch` is tested on batches that mix chats with and without an image.
    `images`: one PIL image, image-cache key (read with `image_for` when its batch is built, so a paper-scale run
    never holds every reference image in memory) or None per chat.
    With `save_steps`, a checkpoint is kept in `checkpoints` every that many steps, and a run that stopped resumes
    from the newest one left by the same settings, chats and code (`sft.trainer_resume_point`).
    `training_arguments` go to `TrainingArguments` (e.g. gradient_accumulation_steps, use_cpu).
    """
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor, Trainer

    from ..sft import ProjectTrainingArguments, memory_hint_for, trainer_resume_point

    if steps < 1 or batch_size < 1 or not conversations:
        raise ValueError(f"steps={steps} and batch_size={batch_size} must be >= 1 and conversations non-empty")
    if len(images) != len(conversations):
        raise ValueError(f"{len(images)} images for {len(conversations)} conversations; pass one image (or None) "
                         "per conversation")
    if image_for is None and any(isinstance(i, str) for i in images):
        raise ValueError("images holds image-cache keys; pass image_for(key) -> PIL image to read them")
    if save_steps and checkpoints is None:
        raise ValueError(f"save_steps={save_steps} needs a checkpoints folder to keep them in")
    processor = AutoProcessor.from_pretrained(vlm_path)
    model = AutoModelForImageTextToText.from_pretrained(vlm_path, dtype=torch.float32)
    rows = [{"messages": list(c), "image": i} for c, i in zip(conversations, images)]

    def pictures(batch: Sequence[Mapping[str, Any]]) -> list:
        return [image_for(r["image"]) if isinstance(r["image"], str) else r["image"] for r in batch]

    with tempfile.TemporaryDirectory() as scratch:  # without save_steps the Trainer writes nothing to keep
        # the launch's device (data-parallel over gloo on a CPU launch), FSDP's own checkpointing under fsdp.yaml
        args = ProjectTrainingArguments(
            output_dir=str(checkpoints) if save_steps else scratch, max_steps=steps, learning_rate=lr,
            per_device_train_batch_size=batch_size, seed=seed, report_to=report_to,
            save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
            logging_steps=training_arguments.pop("logging_steps", 1),
            # the rows are chats and images, not model inputs: the collator turns them into both
            remove_unused_columns=False, **training_arguments)
        trainer = _resuming_trainer(Trainer)(model=model, args=args, train_dataset=rows,
                          data_collator=lambda batch: final_reply_batch(processor, [r["messages"] for r in batch],
                                                                        pictures(batch)))
        with memory_hint_for(title, args):
            trained = trainer.train(resume_from_checkpoint=trainer_resume_point(args, rows, code=(__name__,)))
    output = Path(output)
    trainer.model.save_pretrained(output)  # under a launch transformers writes on the main process only
    processor.save_pretrained(output)
    link_main_output(output)
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    atomic_write_json(output / "log_history.json", without_timings(trainer.state.log_history))  # as sft.train does
    result = {"train_examples": len(rows), "steps": trained.global_step, "first_loss": losses[0] if losses else None,
              "last_loss": losses[-1] if losses else None, "lora": False}
    with_images = sum(i is not None for i in images)
    _card(output, title, vlm_path, len(rows), result, f"{with_images} examples carry their reference image")
    return {**result, "images_dropped": 0, "multimodal": True}


def _resuming_trainer(trainer_class):
    """`trainer_class` whose resume reads the checkpoint through the model's `from_pretrained`.

    transformers 5 saves LLaVA-style models under their legacy weight names; the Trainer's own resume loads the
    file with strict=False, finds none of the names it expects and goes on from the base weights with only a
    warning. Loading through `from_pretrained` maps the names, and a strict `load_state_dict` makes any other
    mismatch an error.
    """
    class ResumingTrainer(trainer_class):
        def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
            model = model if model is not None else self.model
            saved = type(model).from_pretrained(resume_from_checkpoint, dtype=next(model.parameters()).dtype)
            model.load_state_dict(saved.state_dict(), strict=True)

    return ResumingTrainer


def _card(folder: Path, title: str, base: str | Path, examples: int, result: Mapping[str, Any], extra: str) -> None:
    name = Path(str(base)).name
    lines = [f"Fine-tuned from `{name}` on {examples} ChatGenBench chats, {result.get('steps')} steps, loss on the "
             f"assistant's answer only{' (LoRA, merged)' if result.get('lora') else ''}."]
    if result.get("first_loss") is not None:
        lines.append(f"Loss {result['first_loss']:.3f} → {result['last_loss']:.3f}.")
    if extra:
        lines.append(f"{extra[0].upper()}{extra[1:]}.")
    (folder / "README.md").write_text(f"---\nlibrary_name: transformers\nbase_model: {name}\n"
                                      f"tags: [t2i-agent-book, chatgen, sft]\n---\n\n# {title}\n\n{' '.join(lines)}\n")


def _train(make_example: Callable, model_path: str | Path, samples: Sequence[ChatSample], config,
           output: str | Path, image_for: ImageFor | None, title: str) -> dict[str, Any]:
    """Text path (TRL) or VLM path (Trainer + sft_batch), chosen by the model at `model_path`. Each trained model
    keeps its checkpoints (with `save_steps`) in a folder of its own under `config.output_dir`."""
    from .vlm import is_image_text_to_text

    config = copy.copy(config)  # the caller's config serves the next model too
    config.output_dir = str(Path(config.output_dir) / re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-"))
    if not is_image_text_to_text(model_path):
        return train_text_sft(model_path, [make_example(s) for s in samples], config, output, title,
                              unseen_images=sum(bool(s.image_key) for s in samples))
    if config.use_lora:
        raise ValueError("LoRA is wired for the text-only path (TRL) only; set use_lora=False to fine-tune the "
                         f"image-text-to-text model at {model_path}")
    missing = [s.id for s in samples if s.image_key and image_for is None]
    if missing:
        raise ValueError(f"samples {missing[:3]} carry a reference image; pass image_for(key) -> PIL image so the "
                         "multimodal model trains on it")
    examples = [make_example(s) for s in samples]  # the chats; each reference image is read with its batch
    batch_size = config.per_device_train_batch_size
    # without a step limit, the epochs count as transformers' Trainer (and so the text path) counts them
    per_epoch = max(math.ceil(len(examples) / batch_size) // config.gradient_accumulation_steps, 1)
    steps = config.max_steps if config.max_steps > 0 else math.ceil(config.num_train_epochs * per_epoch)
    saving = str(getattr(config.save_strategy, "value", config.save_strategy)) != "no"
    return train_vlm_sft(model_path, [e["prompt"] + e["completion"] for e in examples],
                         [s.image_key or None for s in samples], output, steps=steps, image_for=image_for,
                         lr=config.learning_rate, batch_size=batch_size, seed=config.seed, report_to=config.report_to,
                         title=title, gradient_accumulation_steps=config.gradient_accumulation_steps,
                         # mixed precision and activation checkpointing as the text path's TRL trainer takes them. At
                         # the paper recipe's 8 × 1,024 tokens the 2B model's weights, gradients and Adam states are
                         # ~35 GB; fp32 activations without checkpointing add ~27 GB and the logits ~9 GB, bf16 with
                         # checkpointing ~5 GB in all (and bf16 matmuls run several times faster than fp32's)
                         bf16=config.bf16, activation_checkpointing=bool(config.activation_checkpointing),
                         lr_scheduler_type=config.lr_scheduler_type, weight_decay=config.weight_decay,
                         use_cpu=config.use_cpu, logging_steps=config.logging_steps,
                         checkpoints=config.output_dir, save_steps=config.save_steps if saving else 0)


def train_base(model_path: str | Path, samples: Sequence[ChatSample], config, output: str | Path,
               image_for: ImageFor | None = None) -> dict[str, Any]:
    """ChatGen-Base: SFT on `base_example`s. `config` is an `sft.AgentSFTConfig`; the VLM path takes its steps,
    learning rate, batch size, seed and reporting from it."""
    return _train(base_example, model_path, samples, config, output, image_for, "ChatGen-Base")


def train_stage1(model_path: str | Path, samples: Sequence[ChatSample], config, output: str | Path,
                 image_for: ImageFor | None = None) -> dict[str, Any]:
    """ChatGen-Evo stage 1: SFT on `prompt_writing_example`s (same paths and config as `train_base`)."""
    return _train(prompt_writing_example, model_path, samples, config, output, image_for,
                  "ChatGen-Evo stage 1 (prompt writing)")


# ------------------------------------------------------------------------------------------- parsing

def parse_prompt_answer(text: str) -> tuple[str, str, str | None]:
    """(prompt, negative prompt, problem) from a stage-1 answer; problem is None when the prompt was found."""
    try:
        answer = extract_json(text or "")
    except ValueError as error:
        return "", "", f"unparseable: {error}"
    prompt, negative = answer.get("prompt"), answer.get("negative_prompt", "")
    negative = negative if isinstance(negative, str) else ""
    if not isinstance(prompt, str) or not prompt.strip():
        return "", negative.strip(), f"no prompt in the answer (prompt={prompt!r})"
    return prompt.strip(), negative.strip(), None


def checked_arguments(model: str, answer: Mapping[str, Any], catalog: ModelCatalog) -> tuple[dict, dict, Any]:
    """(arguments, fallback reasons per field, final Validation) for `model` with the arguments an answer gave.

    Each field is checked on its own (with every other field at the model's default, so one bad field cannot hide
    another); a missing or invalid field takes the default. The final call is validated as a whole.
    """
    entry = catalog.lookup(model)
    if entry is None:
        raise ValueError(f"model {model!r} is not in the catalog; close names: {catalog.nearest(model)}")
    defaults = {key: default_api(entry)[key] for key in ARGUMENT_FIELDS}
    arguments, fallback = {}, {}
    for key in ARGUMENT_FIELDS:
        if key not in answer:
            arguments[key], fallback[key] = defaults[key], "missing"
            continue
        check = validate({"model": model, **defaults, key: answer[key]}, catalog)
        if check.ok:
            arguments[key] = check.api[key]
        else:
            arguments[key], fallback[key] = defaults[key], f"{check.category}: {check.detail}"
    final = validate({"model": model, **arguments}, catalog)
    if final.ok:
        arguments = {key: final.api[key] for key in ARGUMENT_FIELDS}
    return arguments, fallback, final


def _settle(prediction: Prediction, model: str | None, answer: Mapping[str, Any] | None,
            catalog: ModelCatalog) -> Prediction:
    """Fill model, arguments, valid and fallback from a named model and an answer's argument fields."""
    if model is None:
        return prediction
    if catalog.lookup(model) is None:
        close = catalog.nearest(model)
        prediction.notes["invalid"] = (f"unknown_model: {model!r} is not in the catalog"
                                       + (f"; close names: {close}" if close else ""))
        prediction.notes["named_model"] = model
        return prediction
    if answer is None:
        answer = {}
        prediction.notes.setdefault("fallback_reason", "no JSON object in the answer: every argument is the default")
    arguments, fallback, final = checked_arguments(model, answer, catalog)
    prediction.model, prediction.arguments = model, arguments
    prediction.valid, prediction.fallback = final.ok, bool(fallback)
    if fallback:
        prediction.notes["fallback"] = fallback
    if not final.ok:
        prediction.notes["invalid"] = f"{final.category}: {final.detail}"
    return prediction


def prediction_api(prediction: Prediction, catalog: ModelCatalog) -> dict[str, Any] | None:
    """The full API call of a prediction (type, base model, description filled from the catalog), or None."""
    if prediction.model is None:
        return None
    check = validate({"model": prediction.model, **prediction.arguments}, catalog)
    return check.api if check.ok else None


# ------------------------------------------------------------------------------------------- generation

def _images(chat_model, samples: Sequence[ChatSample], image_for: ImageFor | None) -> tuple[list, str]:
    """(one image or None per sample, the note for samples whose image is not read)."""
    if not chat_model.is_multimodal:
        return [None] * len(samples), f"reference image not seen: {chat_model.path or 'the model'} is text-only"
    missing = [s.id for s in samples if s.image_key and image_for is None]
    if missing:
        raise ValueError(f"samples {missing[:3]} carry a reference image; pass image_for(key) -> PIL image")
    return [image_for(s.image_key) if s.image_key else None for s in samples], ""


def _generate(chat_model, conversations: list, images: list, max_new_tokens: int, batch_size: int, desc: str,
              progress: bool) -> list[str]:
    """Greedy replies in input order, `batch_size` chats per `generate` call, with a progress bar over the batches.

    Chats of similar length share a batch (a one-line request is not padded out to a long history's width). Under
    a multi-process launch the batches are shared out whole, so each process answers its share and every reply
    comes from the batch one process would put it in.
    """
    from tqdm.auto import tqdm

    from ..distributed import map_sharded
    from ..speed import length_buckets

    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")

    def here(share: list[list[int]]) -> list[list[str]]:
        found = []
        for chunk in tqdm(share, desc=desc, disable=not progress):
            texts = chat_model.generate([conversations[i] for i in chunk], images=[images[i] for i in chunk],
                                        max_new_tokens=max_new_tokens, batch_size=batch_size)
            if len(texts) != len(chunk):
                raise RuntimeError(f"{len(texts)} replies for {len(chunk)} chats")
            found.append(texts)
        return found

    replies: list[str | None] = [None] * len(conversations)
    lengths = [sum(len(str(message.get("content") or "")) for message in chat) for chat in conversations]
    batches = length_buckets(lengths, batch_size)
    for chunk, texts in zip(batches, map_sharded(here, batches)):
        for i, text in zip(chunk, texts):
            replies[i] = text
    return replies  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------- Evo stage 1

def write_prompts(chat_model, samples: Sequence[ChatSample], image_for: ImageFor | None = None, *,
                  prefix: bool = True, max_new_tokens: int = 96, batch_size: int = 8, method: str = METHODS["evo"],
                  progress: bool = True) -> list[Prediction]:
    """Stage 1: the prompt and negative prompt for each chat (the task prefix in the last user turn if `prefix`).

    An answer without a usable JSON prompt gives `prompt=""` and `notes["prompt_problem"]`.
    """
    images, unseen = _images(chat_model, samples, image_for)
    conversations = [task_messages(s.messages, "prompt") if prefix else [dict(m) for m in s.messages]
                     for s in samples]
    replies = _generate(chat_model, conversations, images, max_new_tokens, batch_size, "prompt writing", progress)
    predictions = []
    for sample, reply in zip(samples, replies):
        prompt, negative, problem = parse_prompt_answer(reply)
        notes: dict[str, Any] = {"raw_prompt_writing": reply}
        if problem:
            notes["prompt_problem"] = problem
        if sample.image_key and unseen:
            notes["text_only"] = unseen
        predictions.append(Prediction(sample.id, method, prompt=prompt, negative_prompt=negative, raw=reply,
                                      notes=notes))
    return predictions


def _prompt_text(prompt: str | Prediction) -> str:
    return prompt.prompt if isinstance(prompt, Prediction) else str(prompt)


# ------------------------------------------------------------------------------------------- Evo stage 2

def select_models_for(head, tokenizer, samples: Sequence[ChatSample], prompts: Sequence[str | Prediction], *,
                      max_new_tokens: int = 0, batch_size: int = 16) -> list[str]:
    """Stage 2: the catalog model for each sample from its chat plus its stage-1 prompt (ModelTokens)."""
    if len(prompts) != len(samples):
        raise ValueError(f"{len(prompts)} prompts for {len(samples)} samples; pass stage 1's output for every sample")
    contexts = [{"messages": s.messages, "prompt": _prompt_text(p)} for s, p in zip(samples, prompts)]
    return model_tokens.select_models(head, tokenizer, contexts, max_new_tokens=max_new_tokens,
                                      batch_size=batch_size)


# ------------------------------------------------------------------------------------------- Evo stage 3

def demonstration(record: Mapping[str, Any]) -> dict[str, Any]:
    """A DABench record as a stage-3 demonstration: its prompt and its arguments."""
    return {"id": record.get("id"), "prompt": record["instruction"]["prompt"],
            "arguments": {key: record["api"][key] for key in ARGUMENT_FIELDS}}


def demonstrations_for(model: str, records: Sequence[Mapping[str, Any]], k: int = 3,
                       sample: ChatSample | None = None, split: str | None = "train") -> list[dict[str, Any]]:
    """The first `k` records of `model` (of `split`, if records carry one), leaving out the record `sample` was
    role-played from, so a test chat never sees its own answer."""
    own_id = (sample.notes or {}).get("dabench_record_id") if sample is not None else None
    own_image = sample.dabench_id if sample is not None else None
    chosen = []
    for record in records:
        if record["api"]["model"] != model or (split is not None and record.get("split", split) != split):
            continue
        if (own_id is not None and record.get("id") == own_id) or \
                (own_image is not None and record.get("image_id") == own_image):
            continue
        chosen.append(demonstration(record))
        if len(chosen) == k:
            break
    return chosen


def argument_messages(prompt: str, model: str, demonstrations: Sequence[Mapping[str, Any]],
                      description: str = "") -> list[dict[str, str]]:
    """Stage 3's in-context prompt: the selected model and its description, its demonstrations (prompt →
    arguments), the written prompt."""
    lines = [f"{TASK_PREFIXES['arguments']} Model: {model}"]
    if description:
        lines.append(f"About {model}: {' '.join(description.split())}")
    lines.append("")
    if demonstrations:
        lines.append(f"Examples of {model}:")
        for shown in demonstrations:
            lines += [f"Prompt: {shown['prompt']}", f"Arguments: {answer_json(shown['arguments'], ARGUMENT_FIELDS)}",
                      ""]
    lines += [f"Prompt: {prompt}", "Arguments:"]
    return [{"role": "system", "content": ARGUMENTS_SYSTEM}, {"role": "user", "content": "\n".join(lines)}]


def configure_arguments(chat_model, samples: Sequence[ChatSample], prompts: Sequence[str | Prediction],
                        models: Sequence[str | None], demonstrations: Sequence[Mapping[str, Any]],
                        catalog: ModelCatalog, *, k: int = 3, split: str | None = "train", max_new_tokens: int = 64,
                        batch_size: int = 8, method: str = METHODS["evo"], progress: bool = True) -> list[Prediction]:
    """Stage 3 (training-free): arguments for each sample's written prompt on its selected model, in context.

    `demonstrations` are DABench records; each sample gets the first k of its selected model (`demonstrations_for`)
    and the model's description from `catalog` (DABench's rewritten one).
    Stage-1 Predictions passed as `prompts` carry over (negative prompt, notes). The answer's argument fields are
    validated with the selected model; missing or invalid ones take the model's defaults (`fallback=True`).
    """
    if not len(samples) == len(prompts) == len(models):
        raise ValueError(f"{len(samples)} samples, {len(prompts)} prompts and {len(models)} models; stages 1 and 2 "
                         "must give one of each per sample")
    shown = [demonstrations_for(m, demonstrations, k, s, split) if m else [] for s, m in zip(samples, models)]
    asked = [i for i, m in enumerate(models) if m]
    conversations = [argument_messages(_prompt_text(prompts[i]), models[i], shown[i],
                                       _description(models[i], catalog)) for i in asked]
    replies = dict(zip(asked, _generate(chat_model, conversations, [None] * len(asked), max_new_tokens, batch_size,
                                        "argument configuration", progress)))
    predictions = []
    for i, (sample, prompt, model) in enumerate(zip(samples, prompts, models)):
        if isinstance(prompt, Prediction):
            prediction = replace(prompt, method=method, notes=dict(prompt.notes))
        else:
            prediction = Prediction(sample.id, method, prompt=str(prompt))
        reply = replies.get(i, "")
        prediction.raw = "\n".join(part for part in (prediction.raw, reply) if part)
        prediction.notes["raw_arguments"] = reply
        prediction.notes["demonstrations"] = [d["id"] for d in shown[i]]
        if not shown[i] and model:
            prediction.notes["no_demonstrations"] = f"DABench has no {split or ''} records of {model!r}: zero-shot"
        if not model:
            prediction.notes["invalid"] = "stage 2 chose no model"
            predictions.append(prediction)
            continue
        try:
            answer = extract_json(reply)
        except ValueError as error:
            answer = None
            prediction.notes["fallback_reason"] = f"unparseable arguments ({error}): every argument is the default"
        predictions.append(_settle(prediction, model, answer, catalog))
    return predictions


def _description(model: str, catalog: ModelCatalog) -> str:
    found = catalog.lookup(model)
    return found.description if found is not None else ""


def run_evo(chat_model, head, tokenizer, samples: Sequence[ChatSample], catalog: ModelCatalog,
            demonstrations: Sequence[Mapping[str, Any]], image_for: ImageFor | None = None, *, k: int = 3,
            argument_model=None, prompt_tokens: int = 96, selection_tokens: int = 0, argument_tokens: int = 64,
            batch_size: int = 8, progress: bool = True) -> list[Prediction]:
    """ChatGen-Evo: stage 1 (`chat_model` writes prompts) → stage 2 (`head` picks models from chat + prompt) →
    stage 3 (`argument_model`, default `chat_model`, configures arguments from the selected model's demonstrations).
    """
    prompts = write_prompts(chat_model, samples, image_for, max_new_tokens=prompt_tokens, batch_size=batch_size,
                            progress=progress)
    models = select_models_for(head, tokenizer, samples, prompts, max_new_tokens=selection_tokens,
                               batch_size=batch_size)
    for prediction, model in zip(prompts, models):
        prediction.notes["selected_model"] = model
    return configure_arguments(argument_model or chat_model, samples, prompts, models, demonstrations, catalog, k=k,
                               max_new_tokens=argument_tokens, batch_size=batch_size, progress=progress)


# ------------------------------------------------------------------------------------------- ChatGen-Base

def parse_base_answer(sample_id: str, text: str, catalog: ModelCatalog, method: str = METHODS["base"]) -> Prediction:
    """A Prediction from ChatGen-Base's one JSON answer: prompts, model (None unless in the catalog), arguments."""
    prediction = Prediction(sample_id, method, raw=text)
    try:
        answer = extract_json(text or "")
    except ValueError as error:
        prediction.notes["invalid"] = f"unparseable: {error}"
        return prediction
    prompt, negative = answer.get("prompt"), answer.get("negative_prompt", "")
    if isinstance(prompt, str) and prompt.strip():
        prediction.prompt = prompt.strip()
    else:
        prediction.notes["prompt_problem"] = f"no prompt in the answer (prompt={prompt!r})"
    prediction.negative_prompt = negative.strip() if isinstance(negative, str) else ""
    model = answer.get("model")
    if not isinstance(model, str) or not model.strip():
        prediction.notes["invalid"] = f"no model named (model={model!r})"
        return prediction
    return _settle(prediction, model.strip(), answer, catalog)


def run_base(chat_model, samples: Sequence[ChatSample], catalog: ModelCatalog, image_for: ImageFor | None = None, *,
             max_new_tokens: int = 160, batch_size: int = 8, progress: bool = True) -> list[Prediction]:
    """ChatGen-Base: one answer per chat, parsed and validated like Evo's (see `parse_base_answer`)."""
    images, unseen = _images(chat_model, samples, image_for)
    replies = _generate(chat_model, [[dict(m) for m in s.messages] for s in samples], images, max_new_tokens,
                        batch_size, "ChatGen-Base", progress)
    predictions = []
    for sample, reply in zip(samples, replies):
        prediction = parse_base_answer(sample.id, reply, catalog)
        if sample.image_key and unseen:
            prediction.notes["text_only"] = unseen
        predictions.append(prediction)
    return predictions


# ------------------------------------------------------------------------------------------- baseline

def chat_transcript(messages: Sequence[Mapping[str, str]]) -> str:
    """A chat as "User: ..." / "Assistant: ..." lines (a few-shot example must fit in one turn)."""
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def baseline_messages(sample: ChatSample, examples: Sequence[ChatSample]) -> list[dict[str, str]]:
    """Few-shot prompt rewriting: each example's chat → its target prompt, then the sample's chat."""
    messages = [{"role": "system", "content": BASELINE_SYSTEM}]
    for example in examples:
        messages += [{"role": "user", "content": chat_transcript(example.messages)},
                     {"role": "assistant", "content": example.target["prompt"]}]
    return messages + [{"role": "user", "content": chat_transcript(sample.messages)}]


def parse_baseline_answer(text: str) -> tuple[str, str, str | None]:
    """(prompt, negative prompt, problem): a JSON prompt if the model wrote one, else its first non-empty line."""
    prompt, negative, problem = parse_prompt_answer(text)
    if problem is None:
        return prompt, negative, None
    line = next((line.strip() for line in (text or "").splitlines() if line.strip()), "")
    return (line, "", None) if line else ("", "", "empty answer")


def run_baseline(chat_model, samples: Sequence[ChatSample], catalog: ModelCatalog, *, examples: Sequence[ChatSample],
                 base_architecture: str = "SD 1.5", image_for: ImageFor | None = None, max_new_tokens: int = 96,
                 batch_size: int = 8, progress: bool = True) -> list[Prediction]:
    """ChatGen's baseline: in-context prompt rewriting, then one SD base model with the default parameters.

    The model and arguments are the method's fixed choice, not a repair, so `fallback` stays False.
    """
    examples = list(examples)
    leaked = {s.id for s in samples} & {e.id for e in examples}
    if leaked:
        raise ValueError(f"few-shot examples {sorted(leaked)[:3]} are also evaluated; take examples from the train "
                         "split")
    try:
        base = catalog.base(base_architecture)
    except KeyError:
        base = None
    if base is None:
        raise ValueError(f"the catalog has no base model for {base_architecture!r}; use 'SD 1.5' or 'SDXL 1.0' with "
                         "a catalog from ModelCatalog.from_records")
    images, unseen = _images(chat_model, samples, image_for)
    replies = _generate(chat_model, [baseline_messages(s, examples) for s in samples], images, max_new_tokens,
                        batch_size, "baseline rewriting", progress)
    defaults = default_api(base)
    predictions = []
    for sample, reply in zip(samples, replies):
        prompt, negative, problem = parse_baseline_answer(reply)
        notes: dict[str, Any] = {"examples": [e.id for e in examples]}
        if problem:
            notes["prompt_problem"] = problem
        if sample.image_key and unseen:
            notes["text_only"] = unseen
        prediction = Prediction(sample.id, METHODS["baseline"], prompt=prompt, negative_prompt=negative, raw=reply,
                                notes=notes)
        predictions.append(_settle(prediction, base.name, defaults, catalog))
    return predictions


# ------------------------------------------------------------------------------------------- Table 6
