"""The eight benchmarks of `t2ibook bench`: each times the plain ("naive") path and the project's path side by side.

(a) API generation, (b) image generation, (c) unified-reward scoring, (d) one RRHF optimizer step, (e) one
Diffusion-DPO step, (f) AGFSync's VQA scoring, (g) the CPU work around each drawn image (PNG, scorer pixels),
(h) images drawn with one LoRA after another. `full` uses the paper's shapes (a 7B Llama, SD 1.5 at 512 px,
CLIP B/16 + BLIP-L + ViT-H/14, BLIP-2 Flan-T5-XL); `tiny` the book's tiny shapes, so CI runs every line of every
benchmark on a CPU in about a minute.
"""
from __future__ import annotations

import copy
import gc
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from .. import speed
from . import photos, shapes
from .harness import RENDER_PHASES, PathTiming, ran_at, row, synchronize, time_path

# work per benchmark and size: enough units that the timed part dominates, little enough for CI on two cores
PLAN: dict[str, dict[str, dict[str, Any]]] = {
    "api_generation": {"full": dict(naive=4, prompts=512, batch=256, prompt_tokens=96, new_tokens=128),
                       "tiny": dict(naive=4, prompts=32, batch=16, prompt_tokens=96, new_tokens=128)},
    "image_generation": {"full": dict(naive=4, images=64, batch=32, steps=20, cfg=7.5),
                         "tiny": dict(naive=4, images=16, batch=8, steps=20, cfg=7.5)},
    "scoring": {"full": dict(naive=16, images=256, batch=64), "tiny": dict(naive=8, images=32, batch=16)},
    "rrhf_step": {"full": dict(candidates=6, prompt_tokens=96, response_tokens=128, steps=2, lora_r=64),
                  "tiny": dict(candidates=6, prompt_tokens=96, response_tokens=128, steps=2, lora_r=8)},
    "dpo_step": {"full": dict(pairs=4, steps=2), "tiny": dict(pairs=4, steps=2)},
    # AGFSync's VQA score: ~8 generated questions per candidate image, 16 images per BLIP-2 call (agfsync.vqa_scores)
    "vqa_scoring": {"full": dict(naive=4, images=64, questions=8, batch=16),
                    "tiny": dict(naive=2, images=16, questions=8, batch=8)},
    # the CPU's share of every drawn and scored image: its PNG written to the cache, its three scorers' pixels
    "host_io": {"full": dict(images=64, scorer_side=224), "tiny": dict(images=32, scorer_side=224)},
    # a Civitai LoRA per batch, as a run sorted by model meets them: the batch is image_generation's, so a compiled
    # UNet reuses that benchmark's graph; rank 64 on the UNet's and the text encoder's attention
    "lora_switching": {"full": dict(loras=4, images=32, steps=20, cfg=7.5, rank=64),
                       "tiny": dict(loras=4, images=4, steps=10, cfg=7.5, rank=4)},
}


def _noise_images(size: str, count: int) -> list:
    """`count` random RGB images at the benchmark size's side (512 px full, 64 px tiny), seed 0."""
    return photos.noise_images(shapes.IMAGE_SIZE[size], count)


def _on_cuda(device: str) -> bool:
    return device.startswith("cuda")


def _half(device: str) -> torch.dtype:
    """The project's dtype: bf16 on GPUs, fp32 on CPU (where bf16 matmuls are slow)."""
    return torch.bfloat16 if _on_cuda(device) else torch.float32


# ------------------------------------------------------------------------------------- (a) API generation

def bench_api_generation(size: str, device: str) -> dict[str, Any]:
    plan = PLAN["api_generation"][size]
    model = shapes.causal_lm(size, device, _half(device))
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (plan["prompt_tokens"],), generator=generator).tolist()
               for _ in range(plan["prompts"])]
    new = plan["new_tokens"]
    fixed_length = {"min_new_tokens": new}  # random weights may write EOS early; every path writes all 128 tokens

    def one_at_a_time() -> int:
        for prompt in prompts[:plan["naive"]]:
            with torch.inference_mode():
                model.generate(torch.tensor([prompt], device=device), do_sample=False, max_new_tokens=new,
                               pad_token_id=0, disable_compile=True, **fixed_length)
        return plan["naive"]

    def batched(settings: speed.DecodeSettings) -> Callable[[], int]:
        def run() -> int:
            speed.greedy_decode(model, prompts, pad_id=0, max_new_tokens=new, settings=settings, **fixed_length)
            return len(prompts)
        return run

    dynamic = speed.DecodeSettings(batch_size=plan["batch"])
    project = speed.DecodeSettings(batch_size=plan["batch"], static_cache=True, compile=_on_cuda(device))
    warm = lambda settings: speed.greedy_decode(model, prompts[:settings.batch_size], pad_id=0,  # noqa: E731
                                                max_new_tokens=new, settings=settings, **fixed_length)
    paths = [time_path("naive", one_at_a_time, device, warmup=lambda: model.generate(
                 torch.tensor([prompts[0]], device=device), max_new_tokens=4, do_sample=False, pad_token_id=0),
                       settings={"path": "model.generate per prompt, dynamic cache"}),
             time_path("batched_generate", batched(dynamic), device, warmup=lambda: warm(dynamic),
                       settings={"batch": plan["batch"], "cache": "dynamic"}),
             time_path("project", batched(project), device, warmup=lambda: warm(project),
                       settings={"batch": plan["batch"], "cache": "static", "bucket": project.bucket})]
    # what ran, not what was asked: greedy_decode decodes eagerly if compiling failed in the warm-up, and in
    # smaller batches if a batch ran out of memory there
    paths[-1].settings.update(cuda_graphs=project.compile and project.compile_error is None,
                              compile_error=project.compile_error)
    for timing, settings in zip(paths[1:], (dynamic, project)):
        ran_at(timing, plan["batch"], settings.batch_size)
    params = sum(p.numel() for p in model.parameters())
    return row("api_generation", "s/API", {"parameters": params, "dtype": str(_half(device)), **plan}, paths,
               "greedy decoding; project = helpers.speed.greedy_decode as helpers.agent uses it")


# ------------------------------------------------------------------------------------- (b) image generation

def bench_image_generation(size: str, device: str) -> dict[str, Any]:
    plan = PLAN["image_generation"][size]
    side = shapes.IMAGE_SIZE[size]
    naive_dtype = torch.float16 if _on_cuda(device) else torch.float32
    prompts = [f"a watercolour painting of a lighthouse, variant {i}" for i in range(plan["images"])]
    naive_pipe = shapes.sd15_pipeline(size, device, naive_dtype)

    def per_image() -> int:
        for i in range(plan["naive"]):
            naive_pipe(prompts[i], num_inference_steps=plan["steps"], guidance_scale=plan["cfg"], width=side,
                       height=side, generator=torch.Generator(device).manual_seed(i))
        return plan["naive"]

    naive = time_path("naive", per_image, device,
                      warmup=lambda: naive_pipe(prompts[0], num_inference_steps=2, width=side, height=side),
                      settings={"batch": 1, "dtype": str(naive_dtype)})
    naive_pipe = None  # frees it (the closures above share this variable): the GPU holds one pipeline at a time
    settings = speed.PipelineSettings.auto(device)
    pipeline = speed.optimize_pipeline(shapes.sd15_pipeline(size, device, _half(device)), settings)

    def draw(count: int) -> Callable[[], int]:
        def run() -> int:
            for start in range(0, count, plan["batch"]):
                chunk = range(start, min(start + plan["batch"], count))
                speed.render(pipeline, [prompts[i] for i in chunk], [""] * len(chunk), list(chunk),
                             steps=plan["steps"], cfg=plan["cfg"], width=side, height=side, device=device)
            return count
        return run

    project = time_path("project", draw(plan["images"]), device, warmup=draw(plan["batch"]),
                        settings={"batch": plan["batch"], "dtype": str(_half(device)), **settings.__dict__})
    project.settings["phases_s_per_image"] = render_phases(pipeline, prompts[:plan["batch"]], plan, side, device)
    return row("image_generation", "s/image", {"resolution": side, **plan}, [naive, project],
               "SD 1.5 shapes, CFG; project = helpers.speed.render on an optimize_pipeline pipeline "
               "(the executor's path)")


def render_phases(pipeline, prompts: list[str], plan: dict[str, Any], side: int, device: str) -> dict[str, float]:
    """Where one more batch's seconds go, per image: `prelude` (the prompts' encoding and the starting latents: up
    to the first step's end, less one step), `denoising` (the steps: UNet passes with CFG and the scheduler) and
    `decode` (after the last step: the VAE decode and the images to PIL). Every step's end waits for the device,
    which costs the overlap the timed run keeps (the next step's noise drawn while the device works), so the three
    add up to a little more than the project's time per image."""
    ends: list[float] = []

    def step_end(pipe, step, timestep, tensors):
        synchronize(device)
        ends.append(time.perf_counter())
        return tensors

    synchronize(device)
    started = time.perf_counter()
    speed.render(pipeline, prompts, [""] * len(prompts), list(range(len(prompts))), steps=plan["steps"],
                 cfg=plan["cfg"], width=side, height=side, device=device, step_end=step_end)
    synchronize(device)
    done = time.perf_counter()
    step = (ends[-1] - ends[0]) / (len(ends) - 1) if len(ends) > 1 else ends[0] - started
    seconds = (max(ends[0] - started - step, 0.0), step * len(ends), done - ends[-1])
    return {name: round(part / len(prompts), 6) for name, part in zip(RENDER_PHASES, seconds)}


# --------------------------------------------------------------------------------------------- (c) scoring

def bench_scoring(size: str, device: str) -> dict[str, Any]:
    plan = PLAN["scoring"][size]
    images = _noise_images(size, plan["images"])
    prompts = [f"a red fox in the snow, detail {i}" for i in range(plan["images"])]

    naive_scorers = shapes.unified_reward_scorers(size, device, torch.float32, batch_size=1)

    def one_at_a_time() -> int:
        for image, prompt in zip(images[:plan["naive"]], prompts[:plan["naive"]]):
            for scorer in naive_scorers.values():
                scorer.score([image], [prompt])
        return plan["naive"]

    naive = time_path("naive", one_at_a_time, device, warmup=lambda: [s.score(images[:1], prompts[:1])
                                                                      for s in naive_scorers.values()],
                      settings={"batch": 1, "dtype": "torch.float32"})
    naive_scorers = None  # frees them, closures included
    scorers = shapes.unified_reward_scorers(size, device, _half(device), batch_size=plan["batch"])

    def batched() -> int:
        for scorer in scorers.values():
            scorer.score(images, prompts)
        return len(images)

    project = time_path("project", batched, device, warmup=lambda: [s.score(images[:plan["batch"]],
                                                                            prompts[:plan["batch"]])
                                                                    for s in scorers.values()],
                        settings={"batch": plan["batch"], "dtype": str(_half(device))})
    ran = {name: scorer.batch_size for name, scorer in scorers.items()}  # smaller where the warm-up ran out of memory
    ran_at(project, plan["batch"], ran.popitem()[1] if len(set(ran.values())) == 1 else ran)
    params = {name: sum(p.numel() for p in s.model.parameters()) for name, s in scorers.items()}
    return row("scoring", "s/image", {"parameters": params, **plan}, [naive, project],
               "CLIP + ImageReward + HPS v2 per image (the unified reward's three scorers)")


# -------------------------------------------------------------------------------------------- (d) RRHF step

def _rrhf_inputs(plan: dict[str, Any], vocab: int, device: str) -> dict[str, torch.Tensor]:
    n, length = plan["candidates"], plan["prompt_tokens"] + plan["response_tokens"]
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, vocab, (n, length), generator=generator)
    labels = input_ids.clone()
    labels[:, :plan["prompt_tokens"]] = -100
    return {"input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids).to(device),
            "labels": labels.to(device), "rewards": torch.rand(1, n, generator=generator).to(device),
            "candidate_mask": torch.ones(1, n, dtype=torch.bool, device=device)}


def _per_candidate_loss(model, inputs: dict[str, torch.Tensor], trainer) -> torch.Tensor:
    """RRHF's loss with one forward per candidate (how a loop over candidates would do it)."""
    from ..rrhf import _response_token_logps, rrhf_loss

    row_logps, ce_terms = [], []
    for i in range(inputs["input_ids"].shape[0]):
        logits = model(input_ids=inputs["input_ids"][i:i + 1], attention_mask=inputs["attention_mask"][i:i + 1],
                       use_cache=False).logits
        token_logps, response = _response_token_logps(logits, inputs["labels"][i:i + 1])
        row_logps.append(token_logps.sum() / response.sum().clamp(min=1))
        ce_terms.append((token_logps.sum(), response.sum()))
    logps = torch.stack(row_logps).view(1, -1)
    best = int(inputs["rewards"].argmax())
    ce = -ce_terms[best][0] / ce_terms[best][1].clamp(min=1)
    return trainer.args.rank_loss_weight * rrhf_loss(logps, inputs["rewards"], inputs["candidate_mask"]) + \
        trainer.args.ce_loss_weight * ce


def bench_rrhf_step(size: str, device: str) -> dict[str, Any]:
    from ..rrhf import RRHFConfig, RRHFTrainer

    plan = PLAN["rrhf_step"][size]
    paths: list[PathTiming] = []
    for mode in ("lora", "full"):
        model = shapes.causal_lm(size, device, _half(device))
        model.config.use_cache = False
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if mode == "lora":
            from peft import LoraConfig, get_peft_model

            model.enable_input_require_grads()
            model = get_peft_model(model, LoraConfig(r=plan["lora_r"], lora_alpha=plan["lora_r"],
                                                     target_modules="all-linear", task_type="CAUSAL_LM"))
        model.train()
        with tempfile.TemporaryDirectory() as scratch:
            trainer = RRHFTrainer(model=model, args=RRHFConfig(output_dir=scratch, report_to="none",
                                                               use_cpu=not _on_cuda(device)),
                                  data_collator=lambda rows: rows)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        inputs = _rrhf_inputs(plan, model.config.vocab_size, device)

        def steps(loss_fn) -> Callable[[], int]:
            def run() -> int:
                for _ in range(plan["steps"]):
                    loss_fn().backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                return plan["steps"]
            return run

        batched = lambda: trainer.compute_loss(model, inputs)  # noqa: E731
        looped = lambda: _per_candidate_loss(model, inputs, trainer)  # noqa: E731
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        # read back from the model (a PEFT model passes it through), after the trainer has seen it: the 80 GB
        # memory figure assumes it is on
        common = {"mode": mode, "trainable_parameters": trainable,
                  "gradient_checkpointing": model.is_activation_checkpointing}
        paths.append(time_path(f"naive_{mode}", steps(looped), device, warmup=steps(looped),
                               settings={**common, "forward": "one candidate at a time"}))
        paths.append(time_path(f"project_{mode}", steps(batched), device, warmup=steps(batched),
                               settings={**common, "forward": "all candidates in one batch (RRHFTrainer)"}))
        trainer = optimizer = model = None  # frees them, closures included, before the next mode
    document = row("rrhf_step", "s/step", plan, paths, "one AdamW step on one prompt with n candidates")
    # the headline pair is LoRA (the paper recipe); the full fine-tune pair is in `ratios`
    seconds = {p.path: p.seconds_per_unit for p in paths}
    for mode in ("lora", "full"):
        document["ratios"][f"naive/project ({mode})"] = round(seconds[f"naive_{mode}"] / seconds[f"project_{mode}"], 3)
    document["headline"] = ["naive_lora", "project_lora"]
    document["ratio"] = document["ratios"]["naive/project (lora)"]
    return document


# -------------------------------------------------------------------------------------- (e) Diffusion-DPO step

def bench_dpo_step(size: str, device: str) -> dict[str, Any]:
    from ..diffusion_dpo import DiffusionDPOConfig, DiffusionDPOTrainer

    plan = PLAN["dpo_step"][size]
    side = shapes.IMAGE_SIZE[size]
    pictures = _noise_images(size, 2 * plan["pairs"])
    rows = [{"prompt": f"a castle on a hill, {i}", "chosen": pictures[2 * i], "rejected": pictures[2 * i + 1]}
            for i in range(plan["pairs"])]
    base = shapes.sd15_pipeline(size, device, torch.float32)
    paths = []
    variants = {"naive": dict(train_batch_size=1, mixed_precision="no", gradient_checkpointing=False),
                "project": dict(train_batch_size=plan["pairs"], mixed_precision="bf16" if _on_cuda(device) else "no",
                                gradient_checkpointing=True)}
    # the unit is a pair from its latents: both paths read the posteriors the warm-up step encoded, and the cost
    # model counts the VAE encodes apart (the plain path encodes every pair it uses, the project each image once)
    posteriors = tempfile.TemporaryDirectory(prefix="dpo-posteriors-")
    for name, options in variants.items():
        pipeline = copy.deepcopy(base)
        trainer = DiffusionDPOTrainer(pipeline, DiffusionDPOConfig(resolution=side, max_steps=plan["steps"],
                                                                   output_dir=tempfile.gettempdir(),
                                                                   posterior_cache=posteriors.name, **options), rows)
        per_forward = options["train_batch_size"]

        def step() -> int:
            for _ in range(plan["steps"]):
                for start in range(0, len(rows), per_forward):
                    loss, _ = trainer.compute_loss(rows[start:start + per_forward])
                    (loss * per_forward / len(rows)).backward()
                trainer.optimizer.step()
                trainer.optimizer.zero_grad(set_to_none=True)
            return plan["steps"]

        paths.append(time_path(name, step, device, warmup=step, settings={**options, "pairs_per_step": len(rows)}))
        trainer = pipeline = None  # frees them, closures included, before the next path
    posteriors.cleanup()
    return row("dpo_step", "s/step", {"resolution": side, **plan}, paths,
               "one AdamW step of Diffusion-DPO on the UNet against a frozen copy (helpers.diffusion_dpo), the "
               "images' VAE posteriors read from the cache the warm-up step filled")


# -------------------------------------------------------------------------------------- (f) VQA scoring

def bench_vqa_scoring(size: str, device: str) -> dict[str, Any]:
    plan = PLAN["vqa_scoring"][size]
    images = _noise_images(size, plan["images"])
    things = ["a fox", "snow", "a tree", "a red scarf", "two birds", "a frozen lake", "mountains", "sunset light"]
    questions = [f"is there {thing} in the picture?" for thing in things][:plan["questions"]]
    naive_scorer = shapes.blip2_vqa(size, device, torch.float32)

    def one_question_at_a_time() -> int:
        for image in images[:plan["naive"]]:
            for question in questions:
                naive_scorer.yes_probability([image], [question])
        return plan["naive"]

    naive = time_path("naive", one_question_at_a_time, device,
                      warmup=lambda: naive_scorer.yes_probability(images[:1], questions[:1]),
                      settings={"batch": "one question, its image encoded for it", "dtype": "torch.float32"})
    naive_scorer = None  # frees it, closures included
    gc.collect()
    scorer = shapes.blip2_vqa(size, device, _half(device))

    def ask(chunk: list) -> None:  # as agfsync.vqa_scores: several images per call, each with all its questions
        scorer.yes_probability([image for image in chunk for _ in questions], questions * len(chunk))

    def batched() -> int:
        for start in range(0, len(images), plan["batch"]):
            ask(images[start:start + plan["batch"]])
        return len(images)

    project = time_path("project", batched, device, warmup=lambda: ask(images[:plan["batch"]]),
                        settings={"batch": f"{plan['batch']} images × {len(questions)} questions, each image encoded "
                                           "once", "dtype": str(_half(device))})
    parameters = sum(p.numel() for p in scorer.model.parameters())
    return row("vqa_scoring", "s/image", {"parameters": parameters, **plan}, [naive, project],
               f"AGFSync's VQA score: BLIP-2 (Flan-T5-XL shapes at full size) answers {len(questions)} yes/no "
               "questions per image")


# ---------------------------------------------------------------------------------- (g) host work per image

def bench_host_io(size: str, device: str) -> dict[str, Any]:
    """The CPU work around each image a stage draws and scores: the PNG written to the image cache and the pixels
    of CLIP, HPS v2 and ImageReward made from it. Naive: PIL's default PNG level, written in turn, and each
    scorer's preprocessing on one thread. Project: `ImageCache.put_later` (zlib level 1, writer threads,
    `flush`) and `scorers.base.pixels_in_threads`. Both make the same pixels; the GPU is idle here."""
    from transformers import CLIPImageProcessor

    from ..config import errors_only
    from ..scorers import base, hps
    from ..t2i import ImageCache

    plan = PLAN["host_io"][size]
    # a photograph, which compresses like a drawn picture (the noise a random-weight pipeline draws is ~2x larger)
    images, source = photos.picture_like(shapes.IMAGE_SIZE[size], plan["images"])
    side = plan["scorer_side"]
    with errors_only("transformers"):  # without torchvision it says it falls back to PIL, which is what it should do
        clip = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    transforms = [lambda chunk: clip(images=base.rgb(chunk), return_tensors="pt")["pixel_values"],
                  lambda chunk: hps.resize_longest_pad(chunk, side),
                  lambda chunk: base.normalize(base.resize_center_crop(chunk, side))]
    made: dict[str, list] = {}

    def in_turn(folder: str) -> int:
        for i, image in enumerate(images):
            image.save(f"{folder}/{i}.png")  # PIL's default zlib level (6)
        made["naive"] = [transform(images) for transform in transforms]
        return len(images)

    def overlapped(folder: str) -> int:
        cache = ImageCache(folder)
        for i, image in enumerate(images):
            cache.put_later(f"{i:064d}", image, {})
        made["project"] = [base.pixels_in_threads(transform, images) for transform in transforms]
        cache.flush()
        return len(images)

    paths = []
    for name, work, settings in (
            ("naive", in_turn, {"png": "PIL default (zlib 6), in turn", "preprocessing": "one thread"}),
            ("project", overlapped, {"png": f"zlib {ImageCache.COMPRESS_LEVEL}, {ImageCache.WRITERS} writer threads",
                                     "preprocessing": f"{base.PREPROCESS_WORKERS} threads"})):
        with tempfile.TemporaryDirectory() as warm, tempfile.TemporaryDirectory() as timed:
            paths.append(time_path(name, lambda: work(timed), "cpu", warmup=lambda: work(warm), settings=settings))
            written = sorted(Path(timed).rglob("*.png"))
            paths[-1].settings["png_bytes_per_image"] = sum(p.stat().st_size for p in written) / len(written)
    if not all(torch.equal(a, b) for a, b in zip(made["naive"], made["project"])):
        raise AssertionError("the threaded preprocessing made other pixels than one thread")
    return row("host_io", "s/image", {"side": shapes.IMAGE_SIZE[size], "images_from": source, **plan}, paths,
               "CPU work per drawn image: PNG to the image cache and the three unified-reward scorers' pixels")


# ----------------------------------------------------------------------------------- (h) LoRA switching

def bench_lora_switching(size: str, device: str) -> dict[str, Any]:
    """A batch of images with each of several LoRAs in turn, the switch included. Naive: each LoRA a named adapter
    on an eager UNet (the executor without compilation). Project: each LoRA merged into the weights and unmerged
    again (`t2i.merge_lora`) on the executor's optimised pipeline, whose UNet is compiled on a GPU: adapters there
    recompiled it for every new LoRA, and ran it eagerly past torch's limit of 8 graphs."""
    from ..t2i import Weights, use_lora

    plan = PLAN["lora_switching"][size]
    side = shapes.IMAGE_SIZE[size]
    prompts = [f"a portrait of a knight in ornate armour, variant {i}" for i in range(plan["images"])]
    paths, loras = [], []
    with tempfile.TemporaryDirectory() as folder:
        for name, merge, settings in (("naive", False, speed.PipelineSettings.auto(device, compile_unet=False)),
                                      ("project", True, speed.PipelineSettings.auto(device))):
            pipeline = speed.optimize_pipeline(shapes.sd15_pipeline(size, device, _half(device)), settings)
            if not loras:  # the files depend on the layer shapes alone: made once, one for the warm-up and the rest
                loras = [Weights(shapes.random_lora(pipeline, Path(folder) / f"lora_{i}", plan["rank"], seed=i),
                                 "file", f"lora_{i}") for i in range(plan["loras"] + 1)]
            switches: list[float] = []

            def with_lora(lora: Weights) -> int:
                synchronize(device)
                started = time.perf_counter()
                use_lora(pipeline, lora, merge=merge)
                synchronize(device)
                switches.append(time.perf_counter() - started)
                speed.render(pipeline, prompts, [""] * len(prompts), list(range(len(prompts))), steps=plan["steps"],
                             cfg=plan["cfg"], width=side, height=side, device=device)
                return len(prompts)

            paths.append(time_path(name, lambda: sum(with_lora(lora) for lora in loras[1:]), device,
                                   warmup=lambda: with_lora(loras[0]),
                                   settings={"loras": "merged, then unmerged" if merge else "named adapters",
                                             "dtype": str(_half(device)), **settings.__dict__}))
            paths[-1].settings["switch_s"] = sum(switches[1:]) / len(switches[1:])  # the warm-up's first load aside
            pipeline = None  # frees it, closures included, before the next path
            gc.collect()
    return row("lora_switching", "s/image", {"resolution": side, **plan}, paths,
               f"SD 1.5 shapes, CFG: {plan['loras']} LoRAs in turn, a batch of {plan['images']} images each, the "
               "switch included (settings: switch_s)")


BENCHMARKS: dict[str, Callable[[str, str], dict[str, Any]]] = {
    "api_generation": bench_api_generation, "image_generation": bench_image_generation, "scoring": bench_scoring,
    "rrhf_step": bench_rrhf_step, "dpo_step": bench_dpo_step, "vqa_scoring": bench_vqa_scoring,
    "host_io": bench_host_io, "lora_switching": bench_lora_switching}


def check_names(names: list[str] | None) -> list[str]:
    """The benchmarks to run, in order (all when `names` is empty); unknown names are refused with the choices."""
    names = names or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    return names


def run(size: str, device: str, names: list[str] | None = None, progress: Callable[[str], None] = print, *,
        keep_going: bool = False, on_update: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the chosen benchmarks (all by default, in the order given) and return the results document.

    `on_update` receives the document after every benchmark (the CLI saves it, so a run stopped by a time limit
    keeps what it finished). With `keep_going`, a benchmark that raises is listed under `failed` with its error
    and the next one runs: one out-of-memory at 7B shapes should not cost the other four measurements.
    """
    from .harness import results_document

    names = check_names(names)
    rows, failed = [], []
    for name in names:
        progress(f"bench {name} ({size}, {device}) ...")
        started = time.perf_counter()
        try:
            rows.append(BENCHMARKS[name](size, device))
        except Exception as error:  # noqa: BLE001 - recorded, and re-raised unless keep_going
            if not keep_going:
                raise
            progress("".join(traceback.format_exception(error)).rstrip())
            failed.append({"name": name, "error": f"{type(error).__name__}: {error}".splitlines()[0][:500]})
            del error  # its traceback holds the benchmark's frames and, on a GPU, their tensors
        gc.collect()
        if _on_cuda(device):
            torch.cuda.empty_cache()
        progress(f"bench {name}: {time.perf_counter() - started:.0f} s")
        document = results_document(size, device, rows, failed)
        if on_update is not None:
            on_update(document)
    return document
