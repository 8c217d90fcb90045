"""Fréchet distance between real and generated images with torchmetrics' `FrechetInceptionDistance`.

Paper profile: the standard Inception-v3 pool features (2048-d; needs `torch-fidelity`, which downloads the
Inception weights once). Offline: CLIP image embeddings from a local CLIP folder. The two are different metrics
on different scales; a table says which features it used.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from .base import pixels_in_threads, pooled

INCEPTION = "inception"


class ClipFeatureExtractor(nn.Module):
    """CLIP image embeddings as FID features; takes uint8 (N, 3, H, W) tensors, as torchmetrics passes them."""

    def __init__(self, source: str | Path, device: str = "cpu"):
        super().__init__()
        from ..models import load_clip

        self.clip, processor = load_clip(str(source), device)
        image_processor = processor.image_processor
        crop = getattr(image_processor, "crop_size", None) or image_processor.size
        self.size = (crop["height"], crop["width"]) if "height" in crop else (crop["shortest_edge"],) * 2
        self.register_buffer("mean", torch.tensor(image_processor.image_mean).view(1, 3, 1, 1).to(device))
        self.register_buffer("std", torch.tensor(image_processor.image_std).view(1, 3, 1, 1).to(device))
        self.num_features = int(self.clip.config.projection_dim)  # torchmetrics reads this to size its statistics

    def train(self, mode: bool = True) -> "ClipFeatureExtractor":
        # torchmetrics' Metric starts in training mode and would switch CLIP's dropout on; features stay eval-mode
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"expected uint8 images in [0, 255], got {images.dtype}; convert with (x * 255).byte()")
        pixels = images.to(self.mean.device, torch.float32) / 255
        # resize the whole image (no crop) so every pixel counts, as Inception's FID resize does
        pixels = nn.functional.interpolate(pixels, size=self.size, mode="bicubic", antialias=True).clamp(0, 1)
        pixels = ((pixels - self.mean) / self.std).to(self.clip.dtype)
        return pooled(self.clip.get_image_features(pixel_values=pixels)).float()


def fid_metric(feature: str | Path = INCEPTION, device: str = "cpu"):
    """A torchmetrics FrechetInceptionDistance on Inception-v3 (2048-d) or on the CLIP at path/hub id `feature`."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if str(feature) != INCEPTION:
        return FrechetInceptionDistance(feature=ClipFeatureExtractor(feature, device)).to(device)
    if importlib.util.find_spec("torch_fidelity") is None:
        raise ModuleNotFoundError("feature='inception' needs the Inception-v3 weights from torch-fidelity: run "
                                  "`pip install torch-fidelity`, or pass a CLIP folder as `feature` to work offline")
    return FrechetInceptionDistance(feature=2048).to(device)


def as_uint8(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """RGB images resized to size × size, as one uint8 (N, 3, size, size) tensor."""
    arrays = [np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC)) for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


class FidFeatures:
    """The features FID compares, from the very network torchmetrics' FID runs (Inception-v3 pool, or a CLIP's
    image embeddings), one float64 row per image. With keys, an image already embedded is not embedded again, so a
    stage computes each image's features once and any number of FIDs over subsets from them. Under a
    multi-process launch the images still to embed are split across processes and every process gets every row;
    `extracted` counts the images this process embedded."""

    def __init__(self, feature: str | Path = INCEPTION, device: str = "cpu", image_size: int = 299,
                 batch_size: int = 32):
        self.extractor = fid_metric(feature, device).inception
        self.device, self.image_size, self.batch_size = device, image_size, batch_size
        self.by_key: dict[str, np.ndarray] = {}
        self.extracted = 0

    def _embed(self, images: Sequence[Image.Image]) -> list[np.ndarray]:
        rows = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start:start + self.batch_size]
            with torch.no_grad():
                found = self.extractor(pixels_in_threads(lambda chunk: as_uint8(chunk, self.image_size),
                                                         batch).to(self.device))
            rows.extend(found.double().cpu().numpy().reshape(len(batch), -1))
        self.extracted += len(images)
        return rows

    def __call__(self, images: Sequence, keys: Sequence[str] | None = None) -> np.ndarray:
        """One row per image (PIL images, or anything with a `.image`, such as `t2i.Generated`)."""
        from ..distributed import map_sharded
        from ..t2i import decoded

        if keys is not None and len(keys) != len(images):
            raise ValueError(f"got {len(keys)} keys for {len(images)} images; pass one key per image (or none)")
        todo = [i for i in range(len(images)) if keys is None or keys[i] not in self.by_key]
        # every process holds the same images and keys, so they agree on what is left to embed; `t2i.Generated`
        # records still in the cache are decoded in threads
        rows = map_sharded(lambda share: self._embed(decoded([images[i] for i in share])), todo, chunk=self.batch_size)
        fresh = dict(zip(todo, rows))
        if keys is not None:
            self.by_key.update((keys[i], row) for i, row in fresh.items())
        found = [fresh[i] if i in fresh else self.by_key[keys[i]] for i in range(len(images))]
        return np.stack(found) if found else np.zeros((0, 0))


def frechet_distance(real: np.ndarray, generated: np.ndarray) -> float:
    """FID from two feature sets (rows = images, ≥ 2 each), as torchmetrics computes it: float64 means, unbiased
    covariances, ‖μ_r − μ_g‖² + Tr(Σ_r) + Tr(Σ_g) − 2 Σ √eig(Σ_r Σ_g)."""
    for side, rows in (("real", real), ("generated", generated)):
        if len(rows) < 2:
            raise ValueError(f"FID needs at least 2 images per set (a covariance), got {len(rows)} {side}_images; "
                             "pass more images")
    stats = []
    for rows in (real, generated):
        rows = torch.as_tensor(np.asarray(rows), dtype=torch.float64)
        mean = rows.mean(0, keepdim=True)
        stats.append((mean[0], (rows.T @ rows - len(rows) * mean.T @ mean) / (len(rows) - 1)))
    (mu1, sigma1), (mu2, sigma2) = stats
    root_trace = torch.linalg.eigvals(sigma1 @ sigma2).sqrt().real.sum()
    return float((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * root_trace)


def fid_score(real_images: Sequence[Image.Image], generated_images: Sequence[Image.Image],
              feature: str | Path = INCEPTION, batch_size: int = 32, device: str = "cpu",
              image_size: int = 299) -> float:
    """FID between two image sets (each ≥ 2 images), on Inception-v3 features or those of a CLIP `feature`."""
    features = FidFeatures(feature, device, image_size, batch_size)
    return frechet_distance(features(real_images), features(generated_images))
