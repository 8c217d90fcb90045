"""Diffusion-DPO (Wallace et al., 2023) as AGFSync uses it: align the UNet with best/worst image pairs.

For a pair (x_w preferred over x_l) with one noise ε and one timestep t shared by both images, the per-sample
squared errors of the trained model θ and the frozen reference give

    inside = −β/2 · ((‖ε − ε_θ(x_w,t)‖² − ‖ε − ε_ref(x_w,t)‖²) − (‖ε − ε_θ(x_l,t)‖² − ‖ε − ε_ref(x_l,t)‖²))
    loss   = −log σ(inside)

so the model is pushed to denoise the winner better (and the loser worse) than the reference does. With
v-prediction the target is the velocity instead of ε. The implicit accuracy is the share of pairs with inside > 0.

Pieces, TRL-style: pure functions (`diffusion_dpo_loss`, `per_sample_mse`, `preprocess_image`), a config
(`DiffusionDPOConfig`) and a trainer (`DiffusionDPOTrainer`) that trains only the UNet of a diffusers
StableDiffusionPipeline or StableDiffusionXLPipeline, in place. The reference is either a frozen copy of the UNet
or, with LoRA, the same UNet with its adapters switched off (as diffusers' Diffusion-DPO example does).
"""
from __future__ import annotations

import contextlib
import copy
import math
from collections import defaultdict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .display import say
from .distributed import launched_world_size, world
from .manifest import resume_point
from .speed import quiet_clip_truncation, training_memory_hint

MIXED_PRECISION = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
REFERENCES = ("copy", "lora-disabled")
# the attention projections, as in diffusers' Diffusion-DPO and text-to-image LoRA examples
LORA_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]


# ------------------------------------------------------------------------------------------- pure functions

def diffusion_dpo_loss(model_w: torch.Tensor, model_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
                       beta: float = 5000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, implicit accuracy) from per-sample squared errors of model and reference on winners and losers.

    inside = −β/2 · ((model_w − ref_w) − (model_l − ref_l)); loss = mean of −log σ(inside); accuracy = share of
    inside > 0. The reference terms are constants: no gradient flows into them.
    """
    terms = {"model_w": model_w, "model_l": model_l, "ref_w": ref_w, "ref_l": ref_l}
    for name, value in terms.items():
        if not isinstance(value, torch.Tensor) or value.dim() != 1 or value.numel() == 0:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{name} must be a non-empty 1-D tensor of per-sample errors (shape (B,)), got {shape}; "
                             "reduce each sample's error with per_sample_mse first")
    shapes = {name: tuple(value.shape) for name, value in terms.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError("model_w, model_l, ref_w and ref_l must have the same shape (one entry per pair), "
                         f"got {shapes}")
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta={beta!r} must be a finite number > 0; Diffusion-DPO uses 5000")
    inside = -0.5 * beta * ((model_w - ref_w.detach()) - (model_l - ref_l.detach()))
    loss = -F.logsigmoid(inside).mean()
    implicit_accuracy = (inside.detach() > 0).float().mean()
    return loss, implicit_accuracy


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every dim but the first (batch), in float32: shape (B,)."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
    if pred.dim() == 0:
        raise ValueError("pred and target need a batch dimension; got scalars")
    # float32 even under bf16 autocast: β = 5000 magnifies small differences between model and reference
    squared = (pred.float() - target.float()) ** 2
    return squared.reshape(squared.shape[0], -1).mean(dim=1)


def preprocess_image(image, resolution: int) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """(pixels in [−1, 1] of shape (3, r, r), original (height, width), crop (top, left)).

    The shorter side is resized to `resolution` (bilinear), then the centre is cropped: torchvision's
    Resize + CenterCrop, as the Diffusion-DPO training scripts do. SDXL conditions on the sizes and the crop.
    """
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL.Image, got {type(image).__name__}; load images with PIL (or a datasets "
                        "Image column) before training")
    image = image.convert("RGB")
    original_size = (image.height, image.width)
    short, long = sorted((image.width, image.height))
    resized_long = int(resolution * long / short)
    width, height = (resolution, resized_long) if image.width <= image.height else (resized_long, resolution)
    image = image.resize((width, height), Image.BILINEAR)
    top, left = int(round((height - resolution) / 2.0)), int(round((width - resolution) / 2.0))
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()
    return pixels, original_size, (top, left)


# ------------------------------------------------------------------------------------------------- config

@dataclass
class DiffusionDPOConfig:
    """Hyper-parameters of `DiffusionDPOTrainer`. Paper values (Wallace et al.): SD 1.x lr 5e-7, batch 128 at
    512 px; SDXL lr 1e-6, batch 64 at 1024 px; β = 5000; 1000 steps. Batch = train_batch_size × accumulation."""

    beta: float = field(default=5000.0, metadata={
        "help": "β of the DPO loss: how strongly the model may move away from the reference. The paper uses 5000."})
    learning_rate: float = field(default=5e-7, metadata={
        "help": "AdamW learning rate (constant). Paper: 5e-7 for SD 1.x, 1e-6 for SDXL; LoRA wants far more (1e-4)."})
    weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay (the DPO scripts use 1e-2)."})
    train_batch_size: int = field(default=1, metadata={"help": "Preference pairs per forward pass."})
    gradient_accumulation_steps: int = field(default=1, metadata={
        "help": "Forward passes summed into one optimizer step; effective batch = train_batch_size × this."})
    max_steps: int = field(default=1000, metadata={"help": "Optimizer steps. The paper trains 1000."})
    resolution: int = field(default=512, metadata={
        "help": "Square training size in pixels (images are resized and centre-cropped): 512 for SD 1.5, 1024 "
                "for SDXL, 32-64 for the tiny pipelines."})
    seed: int = field(default=0, metadata={
        "help": "Seeds the LoRA adapters, the pair order, the noise, the timesteps and VAE sampling."})
    logging_steps: int = field(default=10, metadata={
        "help": "Log every this many optimizer steps (values are averaged over the steps since the last log)."})
    max_grad_norm: float | None = field(default=1.0, metadata={
        "help": "Clip the gradient norm to this value; None turns clipping off."})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "Recompute UNet activations in the backward pass: less memory, about a third slower."})
    mixed_precision: str = field(default="no", metadata={
        "help": "'no', 'bf16' or 'fp16' autocast for the forward passes; only used on CUDA (CPU runs fp32). "
                "Trained weights stay float32."})
    reference: str = field(default="copy", metadata={
        "help": "'copy': train every UNet weight against a frozen deep copy of the UNet. 'lora-disabled': train "
                "LoRA adapters (peft) and use the same UNet with adapters switched off as the reference."})
    lora_r: int = field(default=8, metadata={
        "help": "LoRA rank (alpha = rank, so the adapter's scale is 1); used only with reference='lora-disabled'."})
    sample_latents: bool = field(default=True, metadata={
        "help": "Draw latents from the VAE posterior (seeded), as the DPO scripts do; False uses its mean."})
    output_dir: str = field(default="diffusion_dpo", metadata={
        "help": "Where `save()` writes the trained UNet (LoRA merged) in diffusers format."})
    prefetch: int = field(default=2, metadata={
        "help": "Micro-batches whose images are decoded and resized in background threads while the current one "
                "trains (PIL releases the GIL), so the GPU does not wait on PNG decoding; 0 prepares each in turn. "
                "Results do not depend on it."})
    posterior_cache: str = field(default="", metadata={
        "help": "Folder where each training image's VAE posterior (mean and std) goes once encoded, so later epochs, "
                "other models trained on the same images and a resumed run read it instead of encoding the image "
                "again (SD 1.5 at 512 px: 128 kB per image in float32). Empty: every pair is encoded each time."})
    save_steps: int = field(default=0, metadata={
        "help": "Keep a resume point (trained weights, optimizer, place in the pair stream) in output_dir/checkpoints "
                "every this many optimizer steps; `train()` continues from the newest one left by the same "
                "settings, data and code, so a crash loses at most this many steps. 0 keeps none."})

    def __post_init__(self):
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta={self.beta!r} must be a finite number > 0; Diffusion-DPO uses 5000")
        if not (isinstance(self.learning_rate, (int, float)) and math.isfinite(self.learning_rate)
                and self.learning_rate > 0):
            raise ValueError(f"learning_rate={self.learning_rate!r} must be > 0; "
                             "the paper uses 5e-7 (SD) and 1e-6 (SDXL)")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay={self.weight_decay!r} must be ≥ 0; use 1e-2 or 0")
        for name in ("train_batch_size", "gradient_accumulation_steps", "max_steps", "logging_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a whole number ≥ 1")
        if not isinstance(self.resolution, int) or self.resolution < 8 or self.resolution % 8:
            raise ValueError(f"resolution={self.resolution!r} must be a multiple of 8 (the VAE's downscale factor); "
                             "use 512 for SD 1.5, 1024 for SDXL, 32 or 64 for the tiny pipelines")
        if self.max_grad_norm is not None and not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"max_grad_norm={self.max_grad_norm!r} must be > 0; or None to turn clipping off")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision={self.mixed_precision!r} is not one of: {', '.join(MIXED_PRECISION)}")
        if self.reference not in REFERENCES:
            raise ValueError(f"reference={self.reference!r} is not one of: {', '.join(REFERENCES)}")
        if not isinstance(self.lora_r, int) or self.lora_r < 1:
            raise ValueError(f"lora_r={self.lora_r!r} must be a whole number ≥ 1 (e.g. 8)")
        if not isinstance(self.prefetch, int) or isinstance(self.prefetch, bool) or self.prefetch < 0:
            raise ValueError(f"prefetch={self.prefetch!r} must be a whole number ≥ 0 (0 prepares each micro-batch "
                             "in turn)")
        if not isinstance(self.save_steps, int) or isinstance(self.save_steps, bool) or self.save_steps < 0:
            raise ValueError(f"save_steps={self.save_steps!r} must be a whole number ≥ 0 (0 keeps no resume points)")

    @property
    def use_lora(self) -> bool:
        return self.reference == "lora-disabled"


# ------------------------------------------------------------------------------------------------ trainer

class DiffusionDPOTrainer:
    """Diffusion-DPO on the UNet of an SD or SDXL pipeline; text encoders and VAE stay frozen.

    `dataset` is a list or `datasets.Dataset` of {"prompt": str, "chosen": PIL.Image, "rejected": PIL.Image}.
    The pipeline's UNet is trained in place on the pipeline's device; trainable weights are cast to float32.
    `train()` returns the log (one dict per logging step); `save()` writes the UNet (LoRA merged).
    """

    def __init__(self, pipeline, config: DiffusionDPOConfig, dataset):
        from diffusers import DDPMScheduler
        from diffusers.training_utils import cast_training_params

        for part in ("unet", "vae", "scheduler", "encode_prompt"):
            if getattr(pipeline, part, None) is None:
                raise ValueError(f"the pipeline ({type(pipeline).__name__}) has no {part}; pass a "
                                 "StableDiffusionPipeline or StableDiffusionXLPipeline")
        self.pipeline, self.config, self.dataset = pipeline, config, dataset
        self.unet = pipeline.unet
        self.is_sdxl = self.unet.config.addition_embed_type == "text_time"
        if self.is_sdxl and not hasattr(pipeline, "_get_add_time_ids"):
            raise ValueError(f"the UNet expects SDXL text-time conditioning but {type(pipeline).__name__} cannot "
                             "build it; pass a StableDiffusionXLPipeline")
        factor = pipeline.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
        if config.resolution % factor:
            raise ValueError(f"resolution={config.resolution} must be a multiple of {factor} for this pipeline "
                             "(VAE downscale × UNet downsamplings)")
        self._check_dataset(dataset)
        self.device = self.unet.device
        # training needs the forward process only; DDPM's add_noise/get_velocity fit any SD-style scheduler config
        self.noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type={prediction_type!r} is not supported; use an epsilon or "
                             "v_prediction model")

        text_encoders = (getattr(pipeline, "text_encoder", None), getattr(pipeline, "text_encoder_2", None))
        for frozen in (pipeline.vae, *text_encoders):
            if frozen is not None:
                frozen.requires_grad_(False).eval()
        if config.use_lora:
            from peft import LoraConfig

            from .config import private_seed

            self.unet.requires_grad_(False)
            # gaussian A, zero B: the adapter starts as the identity, so at step 0 the model equals the reference
            with private_seed(config.seed, self.device):  # the same A whatever ran before in the process
                self.unet.add_adapter(LoraConfig(r=config.lora_r, lora_alpha=config.lora_r,
                                                 init_lora_weights="gaussian", target_modules=LORA_TARGET_MODULES))
            self.reference_unet = None  # the same UNet with adapters disabled
        else:
            # copy before any training flag or dtype change, so the reference is the pipeline's UNet as given
            self.reference_unet = copy.deepcopy(self.unet).requires_grad_(False).eval()
            self.unet.requires_grad_(True)
        cast_training_params(self.unet, torch.float32)  # AdamW on fp16/bf16 weights would lose the small updates
        if config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.unet.train()

        self.trainable = [p for p in self.unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
        # under a multi-process launch each process takes every world_size-th pair of a global micro-batch and DDP
        # averages the gradients, so a step equals one process's step over all those pairs
        self.rank, self.world_size = world() if launched_world_size() > 1 else (0, 1)
        self.policy = self.unet
        if self.world_size > 1:
            self.policy = torch.nn.parallel.DistributedDataParallel(
                self.unet, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        on_cuda = self.device.type == "cuda"
        self.autocast_dtype = MIXED_PRECISION[config.mixed_precision] if on_cuda else None
        # fp16 gradients underflow without loss scaling; bf16 and fp32 need none
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.autocast_dtype == torch.float16)
        self.generator = torch.Generator().manual_seed(config.seed)  # the pair order (the same on every process)
        self.pairs_drawn = 0  # position in the stream of pairs: seeds each pair's noise, timestep and latents
        self.global_step = 0
        self.log: list[dict[str, float]] = []
        self._order = self._pair_order()
        self._pending: deque[Future] = deque()  # micro-batches drawn from the stream and being prepared
        self._identity: dict[str, Any] | None = None  # `resume_identity`, computed on first use
        self.posteriors = (PosteriorCache(config.posterior_cache, pipeline.vae, config.resolution)
                           if config.posterior_cache else None)
        self.encoded = 0  # images this trainer ran through the VAE (the others' posteriors came from the cache)

    # -------------------------------------------------------------------------------------------- inputs

    @staticmethod
    def _check_dataset(dataset) -> None:
        if len(dataset) == 0:
            raise ValueError("the dataset is empty; give at least one {prompt, chosen, rejected} pair")
        columns = getattr(dataset, "column_names", None) or list(dataset[0])
        missing = [key for key in ("prompt", "chosen", "rejected") if key not in columns]
        if missing:
            raise ValueError(f"dataset rows lack {missing}; each row needs 'prompt', 'chosen' and 'rejected'")

    def _pair_order(self) -> Iterator[int]:
        """Row indices, a fresh seeded shuffle each epoch, forever."""
        while True:
            yield from torch.randperm(len(self.dataset), generator=self.generator).tolist()

    def _next_indices(self) -> list[tuple[int, int]]:
        """(stream position, dataset index) of this process's share of the next global micro-batch."""
        count = self.config.train_batch_size * self.world_size
        indices = [next(self._order) for _ in range(count)]
        start, self.pairs_drawn = self.pairs_drawn, self.pairs_drawn + count
        return [(start + k, indices[k]) for k in range(self.rank, count, self.world_size)]

    def _next_rows(self) -> list[tuple[int, Mapping[str, Any]]]:
        """(stream position, row) of this process's share of the next global micro-batch."""
        return [(position, self.dataset[index]) for position, index in self._next_indices()]

    def _pairs_used(self) -> int:
        """Pairs of the stream that went into finished micro-batches (`pairs_drawn` less those prefetched)."""
        return self.pairs_drawn - len(self._pending) * self.config.train_batch_size * self.world_size

    def _pair_generator(self, position: int) -> torch.Generator:
        """The random source of one pair: seeded by its place in the stream, so a pair gets the same noise,
        timestep and latent sample whichever process draws it and whatever else shares its batch."""
        return torch.Generator().manual_seed((self.config.seed * 1_000_003 + position * 7_919 + 1) % 2**63)

    @torch.no_grad()
    def _latents(self, prepared: "_Prepared", generators: Sequence[torch.Generator]) -> torch.Tensor:
        """VAE latents of the rows, each sampled from its pair's generator (winners' rows, then losers'): a row
        whose posterior the cache holds is read, the others are encoded together (and kept for next time)."""
        vae = self.pipeline.vae
        found = list(prepared.posteriors or [None] * len(prepared.pixels))
        if self.posteriors is not None:  # prepared ahead: the micro-batches since may have encoded some of these
            found = [posterior or self.posteriors.get(key) for posterior, key in zip(found, prepared.keys)]
        missing = [row for row, posterior in enumerate(found) if posterior is None]
        # an image in two of the micro-batch's pairs (same pixels, same key) is encoded once; without a posterior
        # cache there are no keys, and each row stands for itself
        keys = prepared.keys or range(len(found))
        first: dict[Any, int] = {}
        for row in missing:
            first.setdefault(keys[row], row)
        encode = list(first.values())  # in row order, as `missing` is
        if encode:
            posterior = vae.encode(prepared.pixels[encode].to(self.device, vae.dtype)).latent_dist
            self.encoded += len(encode)
            for place, row in enumerate(encode):
                found[row] = (posterior.mean[place], posterior.std[place])
                if self.posteriors is not None:
                    self.posteriors.put(prepared.keys[row], *found[row])
            for row in missing:
                found[row] = found[first[keys[row]]]
        mean = torch.stack([m.to(self.device) for m, _ in found])
        latents = mean
        if self.config.sample_latents:
            std = torch.stack([sd.to(self.device) for _, sd in found])
            eps = torch.stack([torch.randn(mean.shape[1:], generator=g) for g in generators]).to(std)
            latents = mean + std * eps
        if getattr(vae.config, "shift_factor", None) is not None:
            latents = latents - vae.config.shift_factor
        return (latents * vae.config.scaling_factor).float()

    @torch.no_grad()
    def _conditioning(self, prompts: list[str], original_sizes, crops) -> dict[str, Any]:
        """UNet keyword arguments for the prompts, from the pipeline's own encoders (no classifier-free guidance)."""
        with quiet_clip_truncation(self.pipeline):  # long prompts: CLIP reads their first 77 tokens, as in sampling
            encoded = self.pipeline.encode_prompt(prompt=prompts, device=self.device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        if not self.is_sdxl:
            return {"encoder_hidden_states": encoded[0]}
        prompt_embeds, _, pooled, _ = encoded
        text_encoder_2 = getattr(self.pipeline, "text_encoder_2", None)
        projection_dim = (text_encoder_2.config.projection_dim if text_encoder_2 is not None
                          else int(pooled.shape[-1]))
        target = (self.config.resolution, self.config.resolution)
        # SDXL micro-conditioning: each winner's original size and crop; the loser shares them (as in the DPO script)
        time_ids = torch.cat([
            self.pipeline._get_add_time_ids(tuple(size), tuple(crop), target, dtype=prompt_embeds.dtype,
                                            text_encoder_projection_dim=projection_dim)
            for size, crop in zip(original_sizes, crops)]).to(self.device)
        return {"encoder_hidden_states": prompt_embeds,
                "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}

    def _prepare(self, rows: Sequence[tuple[int, Mapping[str, Any] | int]]) -> "_Prepared":
        """The CPU half of a micro-batch: each pair's images read (a dataset index is read here), resized and
        cropped. Safe to run in a background thread: it reads the dataset and touches no trainer state."""
        pixels, sizes, crops, prompts = [], [], [], []
        for _, row in rows:
            row = self.dataset[row] if isinstance(row, int) else row
            chosen, size, crop = preprocess_image(row["chosen"], self.config.resolution)
            rejected, _, _ = preprocess_image(row["rejected"], self.config.resolution)
            pixels.append((chosen, rejected))
            sizes.append(size)
            crops.append(crop)
            prompts.append(row["prompt"])
        stacked = torch.stack([p[0] for p in pixels] + [p[1] for p in pixels])
        keys = posteriors = None
        if self.posteriors is not None:  # looked up here, off the training thread, like the images
            keys = [PosteriorCache.key(row) for row in stacked]
            posteriors = [self.posteriors.get(key) for key in keys]
        return _Prepared([position for position, _ in rows], stacked, sizes, crops, prompts, keys, posteriors)

    def _batch(self, rows: "Sequence[tuple[int, Mapping[str, Any]]] | _Prepared") -> dict[str, Any]:
        """Latents [winners; losers], shared noise and timesteps, target and conditioning for 2B UNet rows."""
        prepared = rows if isinstance(rows, _Prepared) else self._prepare(rows)
        sizes, crops, prompts = prepared.sizes, prepared.crops, prepared.prompts
        generators = [self._pair_generator(position) for position in prepared.positions]
        # each pair's draws in a fixed order: winner latent, loser latent, noise, timestep
        latents = self._latents(prepared, generators + generators)
        shape = latents.shape[1:]
        noise = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(self.device).repeat(2, 1, 1, 1)
        timesteps = torch.cat([torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (1,), generator=g)
                               for g in generators]).to(self.device).repeat(2)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        conditioning = self._conditioning(prompts, sizes, crops)
        conditioning = {key: _repeat_pairs(value) for key, value in conditioning.items()}
        return {"noisy": noisy, "timesteps": timesteps, "target": target, "conditioning": conditioning}

    # ------------------------------------------------------------------------------------------ training

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.autocast_dtype)

    def _predict(self, unet, batch: dict[str, Any]) -> torch.Tensor:
        # a frozen reference may be fp16/bf16 while the trained copy is fp32 (DDP wraps the trained one)
        dtype = getattr(unet, "module", unet).dtype
        conditioning = _cast(batch["conditioning"], dtype)
        with self._autocast():
            return unet(batch["noisy"].to(dtype), batch["timesteps"], **conditioning, return_dict=False)[0]

    def _reference_prediction(self, batch: dict[str, Any]) -> torch.Tensor:
        with torch.no_grad():
            if self.reference_unet is not None:
                return self._predict(self.reference_unet, batch)
            self.unet.disable_adapters()
            try:
                return self._predict(self.unet, batch)
            finally:
                self.unet.enable_adapters()

    def compute_loss(self, rows: "Sequence[Mapping[str, Any] | tuple[int, Mapping[str, Any]]] | _Prepared"
                     ) -> tuple[torch.Tensor, dict[str, float]]:
        """DPO loss of one batch of pairs and its metrics (implicit accuracy, mean model/reference errors).

        `rows` are dataset rows, (stream position, row) pairs, or a micro-batch the training loop prepared
        (`_prepare`); plain rows take the next positions of the stream.
        """
        if not isinstance(rows, _Prepared) and rows and not isinstance(rows[0], tuple):
            start, self.pairs_drawn = self.pairs_drawn, self.pairs_drawn + len(rows)
            rows = [(start + k, row) for k, row in enumerate(rows)]
        batch = self._batch(rows)
        num_pairs = len(rows.positions if isinstance(rows, _Prepared) else rows)
        model_mse = per_sample_mse(self._predict(self.policy, batch), batch["target"])
        ref_mse = per_sample_mse(self._reference_prediction(batch), batch["target"])
        model_w, model_l = model_mse[:num_pairs], model_mse[num_pairs:]
        ref_w, ref_l = ref_mse[:num_pairs], ref_mse[num_pairs:]
        loss, accuracy = diffusion_dpo_loss(model_w, model_l, ref_w, ref_l, beta=self.config.beta)
        metrics = {"loss": loss.item(), "implicit_accuracy": accuracy.item(),
                   "model_mse_w": model_w.mean().item(), "model_mse_l": model_l.mean().item(),
                   "ref_mse_w": ref_w.mean().item(), "ref_mse_l": ref_l.mean().item()}
        if self.world_size > 1:  # the log shows the whole global batch, not this process's share
            import torch.distributed as dist

            values = torch.tensor(list(metrics.values()), dtype=torch.float64, device=self.device)
            dist.all_reduce(values)
            metrics = dict(zip(metrics, (values / self.world_size).tolist()))
        return loss, metrics

    def _gradient_sync(self, last_micro_batch: bool):
        if self.world_size == 1 or last_micro_batch:
            return contextlib.nullcontext()
        return self.policy.no_sync()  # forward and backward both inside, as DDP requires

    def train(self) -> list[dict[str, float]]:
        """Run up to `config.max_steps` optimizer steps; return the log (also kept in `self.log`)."""
        from tqdm.auto import tqdm

        config = self.config
        totals: dict[str, float] = defaultdict(float)
        since_log = 0
        if config.save_steps:
            found = resume_point(self.checkpoints, self.resume_identity(), _newest_checkpoint)
            if found:
                totals, since_log = self.load_checkpoint(found)
        progress = tqdm(total=config.max_steps, initial=self.global_step, desc="Diffusion-DPO", unit="step")
        # the next micro-batches' images are read and resized in threads while this one trains; the stream is
        # drawn here, in order, so what a step sees does not depend on the threads
        pool = ThreadPoolExecutor(config.prefetch, thread_name_prefix="dpo-prefetch") if config.prefetch else None

        def next_micro_batch() -> _Prepared:
            if pool is None:  # anything a call with prefetching left queued comes first
                return self._pending.popleft().result() if self._pending else self._prepare(self._next_indices())
            while len(self._pending) <= config.prefetch:
                self._pending.append(pool.submit(self._prepare, self._next_indices()))
            return self._pending.popleft().result()

        try:
            self._train_steps(next_micro_batch, progress, totals, since_log)
        finally:
            if pool is not None:
                pool.shutdown(wait=True)  # what was prefetched stays queued for a later call
            progress.close()
        return self.log

    def _train_steps(self, next_micro_batch, progress, totals: dict[str, float], since_log: int) -> None:
        config = self.config
        while self.global_step < config.max_steps:
            self.optimizer.zero_grad(set_to_none=True)
            for micro in range(config.gradient_accumulation_steps):
                # under DDP gradients are averaged across processes once per optimizer step, on the last micro-batch
                with self._gradient_sync(micro == config.gradient_accumulation_steps - 1):
                    loss, metrics = self.compute_loss(next_micro_batch())
                    self.scaler.scale(loss / config.gradient_accumulation_steps).backward()
                for key, value in metrics.items():
                    totals[key] += value / config.gradient_accumulation_steps
            self.scaler.unscale_(self.optimizer)
            if config.max_grad_norm is not None:
                totals["grad_norm"] += float(torch.nn.utils.clip_grad_norm_(self.trainable, config.max_grad_norm))
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.global_step += 1
            since_log += 1
            progress.update(1)
            if self.global_step % config.logging_steps == 0 or self.global_step == config.max_steps:
                row = {"step": self.global_step, **{key: value / since_log for key, value in totals.items()}}
                self.log.append(row)
                progress.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['implicit_accuracy']:.2f}")
                totals, since_log = defaultdict(float), 0
            if config.save_steps and self.global_step % config.save_steps == 0:
                self.save_checkpoint(totals, since_log)

    # ------------------------------------------------------------------------------------- resume points

    CHECKPOINT_PREFIX = "step-"

    @property
    def checkpoints(self) -> Path:
        """Where the resume points go: `output_dir/checkpoints/step-<N>/`."""
        return Path(self.config.output_dir) / "checkpoints"

    def resume_identity(self) -> dict[str, Any]:
        """What a resume point must have been trained with to be continued: the settings that change training
        (not where it writes, how often it logs or saves, or how many steps it runs: the learning rate is
        constant, so more steps continue the same run), the base pipeline, the pairs (images as stored: PNG
        bytes or file paths, never decoded) and this module's code."""
        from dataclasses import asdict

        from .manifest import module_hashes, rows_fingerprint

        if self._identity is None:  # the pairs' hash reads every stored image once per trainer, not per call
            settings = {key: value for key, value in asdict(self.config).items()
                        if key not in ("output_dir", "logging_steps", "save_steps", "max_steps", "prefetch",
                                       "posterior_cache")}
            self._identity = {"settings": settings, "base": str(getattr(self.pipeline, "name_or_path", "") or ""),
                              "data": rows_fingerprint(self.dataset), "code": module_hashes([__name__])}
        return self._identity

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().cpu().contiguous() for name, p in self.unet.named_parameters() if p.requires_grad}

    def save_checkpoint(self, totals: Mapping[str, float] | None = None, since_log: int = 0) -> Path | None:
        """Write a resume point for the current step (the main process only; others return None) and drop older
        ones. It is written under a temporary name and renamed, so a crash mid-write leaves the last one whole."""
        import os
        import shutil

        from safetensors.torch import save_file

        from .distributed import is_main_process
        from .manifest import atomic_write_json

        if not is_main_process():
            return None
        target = self.checkpoints / f"{self.CHECKPOINT_PREFIX}{self.global_step:07d}"
        partial = self.checkpoints / f".{target.name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        save_file(self._trainable_state(), str(partial / "trainable.safetensors"))
        torch.save({"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()},
                   partial / "optimizer.pt")
        atomic_write_json(partial / "state.json", {"global_step": self.global_step, "pairs_drawn": self._pairs_used(),
                                                   "log": self.log, "totals": dict(totals or {}),
                                                   "since_log": since_log})
        shutil.rmtree(target, ignore_errors=True)
        os.replace(partial, target)
        for older in self.checkpoints.glob(f"{self.CHECKPOINT_PREFIX}*"):
            if older != target:
                shutil.rmtree(older, ignore_errors=True)
        return target

    def load_checkpoint(self, folder: str | Path) -> tuple[defaultdict, int]:
        """Continue from a resume point: the trained weights, the optimizer and loss-scaler state, the step, the
        log and the place in the pair stream (the pair order is replayed from the seed). Returns the log
        accumulators (totals since the last log line, and how many steps they hold)."""
        import json

        from safetensors.torch import load_file

        folder = Path(folder)
        state = json.loads((folder / "state.json").read_text())
        saved = load_file(str(folder / "trainable.safetensors"))
        parameters = {name: p for name, p in self.unet.named_parameters() if p.requires_grad}
        if set(saved) != set(parameters):
            raise ValueError(f"the resume point {folder} holds other trainable weights than this trainer "
                             f"({len(saved)} against {len(parameters)} tensors); remove {folder.parent} to start over")
        with torch.no_grad():
            for name, parameter in parameters.items():
                parameter.copy_(saved[name].to(parameter.device, parameter.dtype))
        optimizer = torch.load(folder / "optimizer.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(optimizer["optimizer"])
        self.scaler.load_state_dict(optimizer["scaler"])
        self.global_step, self.log = int(state["global_step"]), list(state["log"])
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self._order, self._pending = self._pair_order(), deque()
        for _ in range(int(state["pairs_drawn"])):  # the same pairs come next as in a run that never stopped
            next(self._order)
        self.pairs_drawn = int(state["pairs_drawn"])
        say(f"Diffusion-DPO: resumed from {folder} (step {self.global_step} of {self.config.max_steps})")
        return defaultdict(float, state["totals"]), int(state["since_log"])

    def save(self, output_dir: str | Path | None = None) -> Path:
        """Write the trained UNet (LoRA merged into the weights) so `UNet2DConditionModel.from_pretrained` loads it."""
        folder = Path(output_dir or self.config.output_dir)
        if self.config.use_lora:
            # merge into a copy: the trainer keeps its adapters (and the reference) for further training
            merged = copy.deepcopy(self.unet)
            merged.fuse_lora(lora_scale=1.0)
            merged.unload_lora()
        else:
            merged = self.unet
        loaded_from = merged.config.get("_name_or_path") or ""
        if Path(loaded_from).is_absolute():  # a local base: name its folder, not where this clone of the book sits
            merged.register_to_config(_name_or_path="/".join(Path(loaded_from).parts[-2:]))
        merged.save_pretrained(folder)
        self._model_card(folder)
        return folder

    def _model_card(self, folder: Path) -> None:
        config = self.config
        losses = [row["loss"] for row in self.log]
        kind = f"LoRA r={config.lora_r} merged" if config.use_lora else "all UNet weights"
        summary = f"Loss {losses[0]:.4f} → {losses[-1]:.4f}.\n" if losses else ""
        (folder / "README.md").write_text(
            "---\nlibrary_name: diffusers\ntags: [t2i-agent-book, agfsync, diffusion-dpo]\n---\n\n"
            f"# Diffusion-DPO UNet\n\nTrained with Diffusion-DPO (β={config.beta:g}) on {len(self.dataset)} "
            f"preference pairs for {self.global_step} steps at {config.resolution} px, "
            f"learning rate {config.learning_rate:g}, batch {config.train_batch_size}×{config.gradient_accumulation_steps}, {kind}.\n\n{summary}")


@dataclass
class _Prepared:
    """A micro-batch's CPU half (`DiffusionDPOTrainer._prepare`): stream positions, pixels [winners; losers],
    original sizes and crops (SDXL's micro-conditioning), prompts, and the VAE posteriors a cache already holds."""

    positions: list[int]
    pixels: torch.Tensor
    sizes: list[tuple[int, int]]
    crops: list[tuple[int, int]]
    prompts: list[str]
    keys: list[str] | None = None  # per pixel row, with a posterior cache: `PosteriorCache.key`
    posteriors: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None  # per row: (mean, std) found, or None


class PosteriorCache:
    """VAE posteriors (mean, std) of training images, one safetensors file per image, read instead of encoding.

    An image's key is a hash of the very pixels the VAE would see (after the resize and crop), and the files sit
    in a folder named by the VAE's weights, its dtype and the resolution, so a posterior is only ever reused for
    the same input to the same encoder. The values are stored as the VAE computed them (its dtype), so a read
    posterior equals the encoded one; files are written whole, then renamed into place.
    """

    def __init__(self, root: str | Path, vae, resolution: int):
        import hashlib

        digest = hashlib.sha256(f"{vae.dtype}|{resolution}".encode())
        for name, tensor in sorted(vae.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        self.folder = Path(root) / f"vae-{digest.hexdigest()[:20]}-{resolution}px"

    @staticmethod
    def key(pixels: torch.Tensor) -> str:
        """The hash of one preprocessed image (float32 pixels, as `preprocess_image` returns them)."""
        import hashlib

        return hashlib.sha256(pixels.contiguous().numpy().tobytes()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        from safetensors.torch import load_file

        path = self._path(key)
        if not path.is_file():
            return None
        stored = load_file(str(path))
        return stored["mean"], stored["std"]

    def put(self, key: str, mean: torch.Tensor, std: torch.Tensor) -> None:
        import os

        from safetensors.torch import save_file

        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(f".{path.name}.{os.getpid()}.part")  # processes may write the same image at once
        save_file({"mean": mean.detach().cpu().contiguous(), "std": std.detach().cpu().contiguous()}, str(part))
        os.replace(part, path)


def _newest_checkpoint(folder: Path) -> Path | None:
    """The resume point of the highest step in `folder` (`step-<N>` folders), or None."""
    found = sorted(Path(folder).glob(f"{DiffusionDPOTrainer.CHECKPOINT_PREFIX}*"))
    return found[-1] if found else None


def _repeat_pairs(value):
    """Repeat batch-first tensors (nested in dicts) twice along dim 0: the winners' rows, then the losers'."""
    if isinstance(value, dict):
        return {key: _repeat_pairs(item) for key, item in value.items()}
    return torch.cat([value, value])


def _cast(value, dtype: torch.dtype):
    if isinstance(value, dict):
        return {key: _cast(item, dtype) for key, item in value.items()}
    return value.to(dtype) if value.is_floating_point() else value


# ------------------------------------------------------------------------------------------ notebook 13

def pipeline_with_unet(base: str | Path, unet_folder: Path, out: Path) -> Path:
    """A pipeline folder: the trained UNet, every other component taken from `base` (relative symlinks on disk,
    a full save when `base` is a hub id)."""
    import os
    import shutil

    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    base_path = Path(base)
    if base_path.is_dir():
        for item in base_path.iterdir():
            if item.name not in ("unet", "manifest.json", "README.md"):
                os.symlink(os.path.relpath(item.resolve(), out), out / item.name)
        shutil.copytree(unet_folder, out / "unet")
    else:
        from diffusers import DiffusionPipeline, UNet2DConditionModel

        pipeline = DiffusionPipeline.from_pretrained(str(base))
        pipeline.unet = UNet2DConditionModel.from_pretrained(unet_folder)
        pipeline.save_pretrained(out)
    return out


class AlignedWeights:
    """A weights store that runs named extra models (the DPO-aligned pipelines) and defers the rest to `inner`."""

    def __init__(self, inner, extra: Mapping[str, Any]):
        self.inner, self.extra = inner, dict(extra)

    def checkpoint(self, model):
        return self.extra[model.name] if model.name in self.extra else self.inner.checkpoint(model)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def aligned_executor(ctx, architecture: str, pipelines: Mapping[str, Path], **config):
    """An executor whose catalog holds the base model plus one checkpoint per aligned pipeline folder."""
    from .manifest import hash_tree, sha256_json
    from .t2i import CatalogModel, Executor, ExecutorConfig, ImageCache, ModelCatalog, Weights, weights_store

    base = ModelCatalog.from_records([])
    extra = {name: Weights(str(folder), "folder", f"{name}@{sha256_json(hash_tree(Path(folder) / 'unet'))[:16]}")
             for name, folder in pipelines.items()}
    models = [*base.models, *(CatalogModel(name=name, type="Checkpoint", base_model=architecture,
                                           model_version_id=-(i + 1)) for i, name in enumerate(pipelines))]
    settings = {"device": ctx.device, "dtype": str(ctx.dtype).removeprefix("torch."), **config}
    return Executor(ModelCatalog(models), AlignedWeights(weights_store(ctx), extra),
                    ImageCache(ctx.runs_dir / "image_cache"), ExecutorConfig(**settings))


def train_variant(ctx, base_path: str, rows, config: DiffusionDPOConfig, out: Path) -> list[dict[str, float]]:
    """Diffusion-DPO of the base pipeline on `rows`; writes `out/unet`, `out/pipeline` and `out/log.json`.

    With `config.save_steps`, training continues from its last resume point after a crash, and a model already
    trained by the same settings, data and code (`out/trained.json`, written last) is kept, not trained again:
    a stage that stopped after some of its models loses none of them. Its resume points are removed once done.
    """
    import json
    import shutil

    from .distributed import broadcast_from_main, is_main_process
    from .manifest import atomic_write_json, sha256_json

    out = Path(out)
    pipeline = _load_base(base_path, ctx)
    trainer = DiffusionDPOTrainer(pipeline, config, rows)
    identity = sha256_json(trainer.resume_identity()) if config.save_steps else None  # hashes every pair once
    done, kept = out / "trained.json", None
    if config.save_steps and done.is_file() and (out / "pipeline").is_dir():
        record = json.loads(done.read_text())
        kept = record["log"] if record.get("identity") == identity else None
    kept = broadcast_from_main(kept)  # the main process's folder decides for every process
    if kept is not None:
        say(f"Diffusion-DPO: {out} was trained with these settings, data and code; kept")
        return kept
    done.unlink(missing_ok=True)
    with training_memory_hint("Diffusion-DPO", config.train_batch_size, config.gradient_accumulation_steps,
                              config.gradient_checkpointing):
        log = trainer.train()
    trainer.save(out / "unet")
    pipeline_with_unet(base_path, out / "unet", out / "pipeline")
    atomic_write_json(out / "log.json", log)
    if config.save_steps and is_main_process():
        atomic_write_json(done, {"identity": identity, "log": log})
        shutil.rmtree(trainer.checkpoints, ignore_errors=True)
    return log


def _load_base(path: str, ctx):
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(path)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(ctx.device)


def require_pairs(variant_rows: dict[str, list], variants: dict[str, tuple[float, ...]]) -> None:
    """Raise, naming them, if some ablation variants got no preference pairs (every prompt's candidates tie)."""
    empty = [f"{name!r} (weights {','.join(f'{w:g}' for w in variants[name])})"
             for name, rows in variant_rows.items() if not rows]
    if empty:
        raise ValueError(f"ablation variants without preference pairs: {', '.join(empty)}; under those weights every "
                         "prompt's candidates score the same. Drop them from the `ablation` parameter "
                         "(name:w_vqa,w_clip,w_aes;...)")


GRID_PROMPTS = 3  # held-out prompts notebook 13 shows before and after (seed 0, base and AGFSync)


def grid_rows(scores):
    """The held-out images notebook 13 shows: the first `GRID_PROMPTS` prompts at seed 0, AGFSync above the base
    (rows of `evaluation.csv`, or the stage's request owners as a DataFrame)."""
    first = scores["prompt_id"].unique()[:GRID_PROMPTS]
    shown = scores[(scores["seed"] == 0) & scores["prompt_id"].isin(first) & scores["system"].isin(["base", "AGFSync"])]
    return shown.sort_values(["prompt_id", "system"], ascending=[True, False])


def transcript_row(bench):
    """The benchmark image notebook 13 shows with its TIFA answers: AGFSync's first TIFA image."""
    return bench[(bench["benchmark"] == "TIFA") & (bench["system"] == "AGFSync")].iloc[0]


def run_stage(folder: Path, ctx, preferences: Path, candidates_csv: Path, prompts_jsonl: Path, *, architecture: str,
              config_kwargs: Mapping[str, Any], variants: Mapping[str, Sequence[float]], eval_seeds: int,
              max_side: int | None, batch_size: int, tifa: str = "", hps_benchmark: str = "",
              benchmark_limit: int = 0, tifa_answering: str = "free_form",
              max_sampling_steps: int | None = None, keep_images: bool = True) -> dict[str, Any]:
    """Notebook 13: Diffusion-DPO on notebook 12's pairs (and on pairs chosen by other score weights), then the
    base and every aligned model draw the held-out prompts with the same seeds, scored like the candidates; and the
    base and AGFSync models draw the TIFA and HPS v2 benchmarks (`tifa`, `hps_benchmark`: their sources; empty, the
    held-out prompts stand in; `benchmark_limit`: prompts per set, per style for HPS v2, 0 for all;
    `tifa_answering`: how BLIP-2's answers become choices, see `agfsync_benchmarks.tifa_answers`; `keep_images`
    False: the evaluation's and the benchmarks' images leave the image cache once scored, but those the notebook
    shows, `grid_rows` and `transcript_row`)."""
    import shutil

    import pandas as pd
    from datasets import load_from_disk

    from . import agfsync, agfsync_benchmarks
    from .distributed import barrier, is_main_process
    from .manifest import read_jsonl_rows, write_jsonl
    from .models import resolve
    from .t2i import ImageCache, ModelCatalog, Request, default_api

    folder = Path(folder)
    agfsync_benchmarks.check_answering(tifa_answering)  # before hours of training
    base_path = resolve("t2i_pipeline_xl" if architecture == "SDXL 1.0" else "t2i_pipeline", ctx)

    # every model trains on pairs of the same candidate images, for ~3 epochs at paper scale: each image goes
    # through the VAE once for all of them, then the folder goes (SD 1.5: 128 kB per image)
    posteriors = folder / "vae_posteriors"

    def config(name: str) -> DiffusionDPOConfig:
        return DiffusionDPOConfig(output_dir=str(folder / name), seed=ctx.seed, posterior_cache=str(posteriors),
                                  **config_kwargs)

    # the pairs stay datasets rows, each image decoded when its pair is drawn (at paper scale 45,834 pairs are
    # ~70 GB as pixels); the ablation's pairs point at the image cache's PNGs. Every variant's pairs are chosen
    # before any training, so a variant without pairs stops the stage before hours of training, not after.
    candidates, cache = pd.read_csv(candidates_csv), ImageCache(ctx.runs_dir / "image_cache")
    variant_rows = {name: agfsync.pair_rows(candidates, lambda key: str(cache.path(key)), weights)
                    for name, weights in variants.items()}
    require_pairs(variant_rows, variants)
    logs = {"AGFSync": train_variant(ctx, base_path, load_from_disk(str(preferences)), config("aligned"),
                                     folder / "aligned")}
    pipelines = {"AGFSync": folder / "aligned" / "pipeline"}
    for name, weights in variants.items():
        slug = "variants/" + "_".join(f"{w:g}" for w in weights)
        pairs = agfsync.preference_dataset(variant_rows[name])
        logs[name] = train_variant(ctx, base_path, pairs, config(slug), folder / slug)
        pipelines[name] = folder / slug / "pipeline"
    pd.DataFrame([{"model": name, **row} for name, log in logs.items() for row in log]).to_csv(
        folder / "training_log.csv", index=False)
    encoded = sum(1 for _ in posteriors.rglob("*.safetensors"))
    barrier()  # every process has finished training before the posteriors go
    if is_main_process():
        shutil.rmtree(posteriors, ignore_errors=True)
    prompts = [p for p in read_jsonl_rows(prompts_jsonl) if p["split"] == "eval"]
    base_api = default_api(ModelCatalog.from_records([]).base(architecture))
    systems = {"base": base_api, **{name: {**base_api, "model": name} for name in pipelines}}
    requests, owners = [], []
    for system, api in systems.items():
        for prompt in prompts:
            for seed in range(eval_seeds):
                requests.append(Request(api, prompt["prompt"], "", seed))
                owners.append({"system": system, "prompt_id": prompt["prompt_id"], "category": prompt["category"],
                               "prompt": prompt["prompt"], "seed": seed})
    executor = aligned_executor(ctx, architecture, pipelines, max_side=max_side, batch_size=batch_size,
                                max_sampling_steps=max_sampling_steps)
    sets = agfsync_benchmarks.benchmark_sets(tifa, hps_benchmark, prompts, ctx.runs_dir / "downloads",
                                             limit=benchmark_limit, seed=ctx.seed)
    benchmark_systems = {name: systems[name] for name in ("base", "AGFSync")}
    keep = keep_benchmark = None
    later: set[str] = set()
    if not keep_images:  # what the notebook shows stays; an image the benchmarks ask for too stays until they score it
        later = {executor.key(request) for benchmark, rows in sets.items()
                 for request in agfsync_benchmarks.benchmark_requests(benchmark, rows, benchmark_systems,
                                                                      eval_seeds)[0]}
        later -= {key for key in later if executor.cache.has(key)}  # another stage's image is not ours to remove
        shown = set(grid_rows(pd.DataFrame(owners)).index) if owners else set()
        keep = shown.__contains__
        first_tifa = sets["TIFA"][0]["prompt_id"] if sets.get("TIFA") else None
        keep_benchmark = lambda owner: (owner["benchmark"], owner["system"], owner["prompt_id"],  # noqa: E731
                                        owner["seed"]) == ("TIFA", "AGFSync", first_tifa, 0)
    table = agfsync.generate_and_score_images(executor, requests, owners,
                                              {p["prompt_id"]: p["questions"] for p in prompts}, ctx, keep=keep,
                                              spare=later)
    table.to_csv(folder / "evaluation.csv", index=False)
    shown_keys = set(table.loc[sorted(shown), "key"]) if not keep_images else set()
    benchmarks = agfsync_benchmarks.evaluate(sets, benchmark_systems, executor, ctx, eval_seeds, tifa_answering,
                                             keep=keep_benchmark, owned=later - shown_keys)
    benchmarks.to_csv(folder / "benchmarks.csv", index=False)
    write_jsonl(folder / "tifa_questions.jsonl", sets["TIFA"])  # what the benchmark asked, for the page
    first, last = logs["AGFSync"][0], logs["AGFSync"][-1]
    return {"pairs": len(load_from_disk(str(preferences))), "models_trained": len(logs),
            "steps": config_kwargs.get("max_steps"), "first_loss": first["loss"], "last_loss": last["loss"],
            "last_implicit_accuracy": last["implicit_accuracy"], "eval_prompts": len(prompts),
            "eval_images": len(requests), **{f"{name} prompts": len(rows) for name, rows in sets.items()},
            "benchmark_images": len(benchmarks), "images_drawn": executor.stats["generated"],
            "training_images_through_the_vae": encoded,
            "images_removed_once_scored": executor.stats["removed_once_scored"]}
