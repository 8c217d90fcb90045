"""Fast paths for paper-scale runs: length-bucketed static-cache decoding and a tuned diffusers pipeline.

At paper scale the book decodes tens of thousands of API calls and draws ~240,000 images (notebook 07). The
plain paths (one `generate` per prompt; one image per pipeline call in fp16) would take ~90 H100-hours; the paths
here batch, pad to a few fixed shapes, keep the KV cache static and compile the hot modules on CUDA.
Notebook 14 and `t2ibook bench` measure both side by side.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

logger = logging.getLogger(__name__)


@dataclass
class DecodeSettings:
    """How greedy decoding is batched. `auto()` picks the fast path on CUDA and plain eager batching on CPU."""

    batch_size: int = 16
    static_cache: bool = False  # a preallocated KV cache: fixed shapes, no per-step concatenation
    compile: bool = False  # CUDA graphs through transformers' auto-compile (needs static_cache)
    bucket: int = 16  # prompt widths are padded up to a multiple of this, so compiled shapes repeat
    # why compiled decoding was dropped for the rest of the run (set by greedy_decode, None while it works)
    compile_error: str | None = field(default=None, init=False, compare=False)

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be at least 1")
        if self.bucket < 1:
            raise ValueError(f"bucket={self.bucket} must be at least 1 (1 pads to the longest prompt only)")
        if self.compile and not self.static_cache:
            raise ValueError("compile=True needs static_cache=True (a dynamic cache changes shape every step)")

    @classmethod
    def auto(cls, device: str | torch.device, batch_size: int = 16) -> "DecodeSettings":
        on_cuda = torch.device(device).type == "cuda"
        return cls(batch_size=batch_size, static_cache=on_cuda, compile=on_cuda)


def length_buckets(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (sorted, stable), so little compute goes to padding."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def padded_width(longest: int, bucket: int) -> int:
    """`longest` rounded up to a multiple of `bucket`."""
    return -(-longest // bucket) * bucket


def left_pad(rows: Sequence[Sequence[int]], width: int, pad_id: int, device) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask, each row right-aligned in `width` columns (decoder-only generation)."""
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, width - len(row):] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}


def out_of_memory(error: BaseException) -> bool:
    """Whether `error` is the accelerator running out of memory: torch's OutOfMemoryError, or an allocation failure
    of a library kernel that reaches Python as a plain RuntimeError."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text.lower() or "ALLOC_FAILED" in text)


def fewer_rows(failed: int, work: str, limit: int) -> int:
    """The batch limit after a batch of `failed` rows ran out of memory: half of it (and never above `limit`). Frees
    the allocator's cached blocks and says so; a run of hours goes on at the smaller size instead of stopping."""
    import gc

    smaller = min(limit, max(1, failed // 2))
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    logger.warning("%s ran out of accelerator memory with %d rows at once; going on with at most %d (lower the "
                   "recipe's batch size to skip the failed attempt)", work, failed, smaller)
    return smaller


def fitting_batches(run: Callable[[list], Sequence], items: Sequence, limit: int, work: str,
                    progress: Callable[[int], Any] | None = None) -> tuple[list, int]:
    """`run(part)` over consecutive parts of `items`, at most `limit` at a time; (the results in order, the limit
    it ended with). A part that runs out of accelerator memory is run again in halves, and the parts after it keep
    to the size that fitted (`fewer_rows`). `progress(n)` after each part that ran."""
    if limit < 1:
        raise ValueError(f"limit={limit} must be at least 1")
    results: list = []
    pending = [list(items[start:start + limit]) for start in range(0, len(items), limit)]
    while pending:
        part = pending.pop(0)
        if len(part) > limit:  # cut before a part ran out of memory
            pending[:0] = [part[start:start + limit] for start in range(0, len(part), limit)]
            continue
        out_of_room = False
        try:
            found = list(run(part))
        except Exception as error:  # noqa: BLE001 - only running out of memory is retried, with fewer items
            if not out_of_memory(error) or len(part) == 1:
                raise
            out_of_room = True
        if out_of_room:  # outside `except`, so the failed part's tensors can be freed first
            limit = fewer_rows(len(part), work, limit)
            pending.insert(0, part)
            continue
        if len(found) != len(part):
            raise RuntimeError(f"{work}: {len(found)} results for {len(part)} items")
        results += found
        if progress is not None:
            progress(len(part))
    return results, limit


# the recipe parameters that set a trainer's forward-pass size and its activation checkpointing, per notebook
MICRO_BATCH_SETTINGS = ("06_sft and 07_rrhf: micro_batch_size; 11_chatgen_evo: sft_micro_batch_size; "
                        "13_diffusion_dpo: train_batch_size, with gradient_accumulation_steps raised to match")
CHECKPOINTING_SETTINGS = "06_sft, 07_rrhf, 13_diffusion_dpo: gradient_checkpointing; 11_chatgen_evo: " \
                         "sft_gradient_checkpointing"


@contextmanager
def training_memory_hint(work: str, per_pass: int, accumulation: int, checkpointing: bool):
    """Inside: training that runs out of accelerator memory stops with what to change in the recipe, instead of
    the allocator's report alone (kept as the cause). A trainer is not retried in halves as decoding is: a
    smaller pass changes the step unless accumulation makes up for it, and the recipe should say so for a rerun."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - only running out of memory gets the hint
        if not out_of_memory(error):
            raise
        if per_pass > 1:
            half = per_pass // 2
            fix = (f"give the notebook {half} example{'s' * (half > 1)} per pass in the recipe "
                   f"({MICRO_BATCH_SETTINGS}): each optimizer step still sees {per_pass * accumulation}, in "
                   f"{2 * accumulation} passes")
        else:
            fix = "one example per pass is already the least; a shorter max_length, LoRA or a larger GPU is left"
        if not checkpointing:
            fix += f"; turning on activation checkpointing saves more ({CHECKPOINTING_SETTINGS})"
        raise torch.OutOfMemoryError(
            f"{work} ran out of GPU memory with {per_pass} examples per forward pass ({accumulation} passes per "
            f"optimizer step): {fix}. Checkpoints of other settings are not resumed: the run trains from step 0."
        ) from error


def greedy_decode(model, prompts: Sequence[Sequence[int]], *, pad_id: int, max_new_tokens: int,
                  settings: DecodeSettings | None = None, progress=None, batches: Sequence[Sequence[int]] | None = None,
                  **generate_kwargs) -> list[list[int]]:
    """The new tokens `model` writes greedily after each prompt (token ids in, token ids out, input order kept).

    Prompts are decoded in length-sorted batches padded to a multiple of `settings.bucket`, with one static cache
    length for the whole call (the longest prompt's width + `max_new_tokens`). With `compile` every batch is also
    filled up to `batch_size` (repeating its last prompt), so the decoding step has one shape: its CUDA graph is
    captured once and replayed for the rest of the run. `progress` is called with the batch size after each.
    `generate_kwargs` go to `generate` last, so `do_sample=True, temperature=...` samples instead (seed first).
    A batch that runs out of accelerator memory is decoded again in halves, and `settings.batch_size` stays at the
    size that fitted for the rest of the call (`fewer_rows`).

    `batches` (positions into `prompts`): decode only these batches, as given, and leave None for the prompts
    they do not name. The cache is still sized for the longest of all `prompts`, so a process decoding its share
    of a multi-process call (the whole call's prompts, its share of the whole call's buckets) decodes each batch
    exactly as one process decodes it.
    """
    settings = settings or DecodeSettings()
    options: dict[str, Any] = {"do_sample": False, "max_new_tokens": max_new_tokens, "pad_token_id": pad_id,
                               **generate_kwargs}
    if settings.static_cache:
        options["cache_implementation"] = "static"
        # one cache length for every batch: a cache sized per batch changes the compiled decoding step's shapes, so
        # each new prompt width compiled again, and past torch's recompile limit (8) the rest of the run ran eagerly
        options["max_cache_len"] = padded_width(max((len(p) for p in prompts), default=1), settings.bucket) \
            + max_new_tokens
    compiled = settings.compile and settings.compile_error is None
    if compiled:
        from transformers import CompileConfig

        on_cuda = model.device.type == "cuda"
        config = CompileConfig(fullgraph=True, dynamic=False, mode="reduce-overhead" if on_cuda else "default")
        config._compile_all_devices = True  # transformers compiles on accelerators only unless told (CPU: no graphs)
        options["compile_config"] = config
    else:
        options["disable_compile"] = True
    results: list[list[int] | None] = [None] * len(prompts)
    planned = batches if batches is not None else length_buckets([len(p) for p in prompts], settings.batch_size)
    pending = [list(chunk) for chunk in planned]
    while pending:
        chunk = pending.pop(0)
        if len(chunk) > settings.batch_size:  # planned before an out-of-memory retry lowered the batch size
            pending[:0] = [chunk[i:i + settings.batch_size] for i in range(0, len(chunk), settings.batch_size)]
            continue
        rows = [prompts[i] for i in chunk]
        if compiled:
            rows += [rows[-1]] * (settings.batch_size - len(rows))
        width = padded_width(max(len(r) for r in rows), settings.bucket)
        batch = left_pad(rows, width, pad_id, model.device)
        output, out_of_room, failure = None, False, None
        try:
            with torch.inference_mode():
                output = model.generate(**batch, **options)
        except Exception as error:  # noqa: BLE001 - out of memory, or a compiler or CUDA-graph failure
            if out_of_memory(error) and len(rows) > 1:
                out_of_room = True
            elif compiled and not out_of_memory(error):
                failure = f"{type(error).__name__}: {error}".splitlines()[0][:500]
            else:
                raise
        if out_of_room:  # handled once outside `except`, where the failed batch's tensors can be freed
            del batch
            settings.batch_size = fewer_rows(len(rows), "decoding", settings.batch_size)
            pending.insert(0, chunk)
            continue
        if failure is not None:
            # a failed compile (or a CUDA graph whose output was overwritten) costs speed, not the run: this
            # batch and every later one decode eagerly with the same static cache, so the tokens are the same
            settings.compile_error = failure
            logger.warning("compiled decoding failed (%s); decoding on without CUDA graphs", failure)
            compiled = False
            options.pop("compile_config")
            options["disable_compile"] = True
            with torch.inference_mode():
                output = model.generate(**batch, **options)
        # a row that ends early is filled with pad ids; the caller's decode skips them
        for index, tokens in zip(chunk, output[:, width:].tolist()):
            results[index] = tokens
        if progress is not None:
            progress(len(chunk))
    return results  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------- image pipeline

@dataclass
class PipelineSettings:
    """Speed settings for a diffusers text-to-image pipeline (numerics unchanged apart from the dtype)."""

    channels_last: bool = False  # NHWC convolutions: faster cuDNN kernels for the UNet and VAE
    compile_unet: bool = False  # torch.compile the UNet (once per shape; other UNets of one class reuse it)
    compile_mode: str = "default"  # max-autotune searches kernels for minutes per shape (> 8 min for SD 1.5)

    @classmethod
    def auto(cls, device: str | torch.device, compile_unet: bool | None = None) -> "PipelineSettings":
        on_cuda = torch.device(device).type == "cuda"
        return cls(channels_last=on_cuda, compile_unet=on_cuda if compile_unet is None else compile_unet)


# Graphs torch keeps per compiled function before it runs the rest eagerly (torch's default is 8). SD 1.5 and SDXL
# UNets are one class, so their forward holds the graphs of both, and of each image size and batch length that
# automatic dynamic shapes does not absorb: a tiny SD + SDXL run used up 8 after nine shapes and drew the next ones
# eagerly. Each graph compiles once per run.
COMPILED_GRAPHS_LIMIT = 64


def optimize_pipeline(pipeline, settings: PipelineSettings):
    """Apply `settings` to `pipeline` in place and return it.

    Attention already runs through PyTorch's SDPA (diffusers' default processor on torch 2), and a batch is
    decoded by the VAE in one call (slicing stays off), so those need nothing here.
    """
    if settings.channels_last:
        pipeline.unet.to(memory_format=torch.channels_last)
        pipeline.vae.to(memory_format=torch.channels_last)
    if settings.compile_unet and not getattr(pipeline.unet, "_t2i_compiled", False):
        from torch import _dynamo

        _dynamo.config.recompile_limit = max(_dynamo.config.recompile_limit, COMPILED_GRAPHS_LIMIT)
        # compile the forward in place (the module object stays the same, so LoRA loading still finds its layers)
        pipeline.unet.compile(mode=settings.compile_mode, fullgraph=False)
        pipeline.unet._t2i_compiled = True
    return pipeline


def render(pipeline, prompts: Sequence[str], negative_prompts: Sequence[str], seeds: Sequence[int], *, steps: int,
           cfg: float, width: int, height: int, device: str, step_end=None, **conditioning) -> list:
    """One batch of images, one `torch.Generator` per image seeded with its own seed (batch-independent noise).

    The generators are CPU ones whatever `device` draws: diffusers makes the noise on the CPU and moves it, so a seed
    starts from the same latents on a laptop and on a GPU, and an image cache key (prompt, seed, weights) names the
    same picture up to the devices' rounding, where a CUDA generator's stream differs from the CPU's. The cost: one
    draw and copy per batch, and per step for an ancestral sampler (32 512-px latents take ~4 ms on one core of this
    project's CI host), made while the GPU still runs the step's UNet pass (~0.1 s for such a batch on an H100).
    `step_end`: called as diffusers' `callback_on_step_end` (pipeline, step, timestep, tensors) after every step."""
    generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
    if not conditioning:
        conditioning = {"prompt": list(prompts), "negative_prompt": list(negative_prompts)}
    with torch.inference_mode(), quiet_clip_truncation(pipeline):
        hooks = {"callback_on_step_end": step_end} if step_end is not None else {}
        return pipeline(**conditioning, num_inference_steps=steps, guidance_scale=cfg, width=width, height=height,
                        generator=generators, **hooks).images


# What transformers and diffusers log for every batch with a prompt longer than CLIP's window. CLIP reads the first
# 77 tokens either way (as the papers' pipelines did); callers count such prompts with `clip_overflow` instead.
_TRUNCATION_NOTICES = ("Token indices sequence length is longer than",
                       "The following part of your input was truncated because CLIP")


class _DropTruncationNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_TRUNCATION_NOTICES)


@contextmanager
def quiet_clip_truncation(pipeline):
    """Inside: the tokenizer's and the pipeline's "input was truncated" warnings are not logged (other logs are)."""
    loggers = [logging.getLogger(name) for name in ("transformers.tokenization_utils_base", type(pipeline).__module__)]
    notice_filter = _DropTruncationNotices()
    for log in loggers:
        log.addFilter(notice_filter)
    try:
        yield
    finally:
        for log in loggers:
            log.removeFilter(notice_filter)


def clip_overflow(pipeline, texts: Sequence[str]) -> int:
    """How many of `texts` are longer than the pipeline's text window (77 tokens for CLIP), so only their start
    conditions the image. 0 for a pipeline without a tokenizer."""
    tokenizer = getattr(pipeline, "tokenizer", None)
    if tokenizer is None or not texts:
        return 0
    window = tokenizer.model_max_length
    with quiet_clip_truncation(pipeline):
        lengths = [len(ids) for ids in tokenizer(list(texts), truncation=False)["input_ids"]]
    return sum(length > window for length in lengths)
