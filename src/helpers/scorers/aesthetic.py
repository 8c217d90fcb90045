"""LAION improved aesthetic predictor: an MLP on L2-normalised CLIP ViT-L/14 image embeddings (about 1–10).

AGFSync scores aesthetics with VILA, which exists only for TensorFlow; the book uses this predictor instead
(`sac+logos+ava1-l14-linearMSE.pth`, trained on SAC, LAION-Logos and AVA ratings) and says so.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..device import place
from .base import (fetch, in_fitting_batches, is_local, local_weight_files, pixels_in_threads, pooled, precision_id,
                   rgb, weights_id)

MLP_FILE = "sac+logos+ava1-l14-linearMSE.pth"
PAPER_CLIP = "openai/clip-vit-large-patch14"


class AestheticMLP(nn.Module):
    """The predictor's head; the layer indices match the official state dict (`layers.0` … `layers.7`)."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128),
                                    nn.Dropout(0.2), nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16),
                                    nn.Linear(16, 1))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)


def load_mlp(path: str | Path) -> AestheticMLP:
    """The MLP from a state-dict file; its input size is read from the first layer."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "layers.0.weight" not in state:
        raise KeyError(f"{path} is not an aesthetic-MLP state dict (no 'layers.0.weight'; keys: {list(state)[:5]}…)")
    mlp = AestheticMLP(state["layers.0.weight"].shape[1])
    mlp.load_state_dict(state)
    return mlp.eval()


class AestheticScorer:
    """CLIP image embedding → L2 normalisation → MLP, on the predictor's raw scale (prompts are not used)."""

    name = "aesthetic"

    def __init__(self, clip, processor, mlp: AestheticMLP, weights: str, batch_size: int = 32):
        self.clip, self.processor, self.mlp, self.weights_id = clip, processor, mlp, weights
        self.batch_size = batch_size

    @torch.no_grad()
    def embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """L2-normalised CLIP image embeddings (float32), as the predictor was trained on."""
        pixels = pixels_in_threads(lambda chunk: self.processor(images=rgb(chunk), return_tensors="pt")["pixel_values"],
                                   images)
        features = pooled(self.clip.get_image_features(pixel_values=pixels.to(self.clip.device, self.clip.dtype)))
        return nn.functional.normalize(features.float(), dim=-1)

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image], prompts: Sequence[str] | None = None) -> np.ndarray:
        """Aesthetic score per image (raw LAION scale, roughly 1–10 on real CLIP weights); prompts are not used."""
        def batch_scores(images, _):
            return self.mlp(self.embed(images).to(self.device))[:, 0]
        return np.asarray(in_fitting_batches(self, batch_scores, images), dtype=np.float32)

    @property
    def device(self) -> torch.device:
        return next(self.mlp.parameters()).device


def _clip_source(source: str | Path, clip_source: str | Path | None) -> str:
    if clip_source is not None:
        return str(clip_source)
    return str(Path(source) / "clip") if is_local(Path(source) / "clip") else PAPER_CLIP


def load_aesthetic(source: str | Path, device: str = "cpu", dtype: torch.dtype | None = None,
                   clip_source: str | Path | None = None) -> AestheticScorer:
    """Aesthetic scorer: MLP from `source` (folder or hub repo), CLIP from `clip_source`, `source/clip` or ViT-L/14."""
    from ..models import load_clip

    mlp_path = fetch(source, MLP_FILE)
    clip_path = _clip_source(source, clip_source)
    clip, processor = load_clip(clip_path, device, dtype)
    mlp = load_mlp(mlp_path)
    if mlp.layers[0].in_features != clip.config.projection_dim:
        raise ValueError(f"the MLP in {mlp_path} reads {mlp.layers[0].in_features}-d embeddings but the CLIP at "
                         f"{clip_path} gives {clip.config.projection_dim}-d; pass clip_source={PAPER_CLIP!r}")
    # the score depends on both parts, so the cache key names both
    ident = precision_id(f"{weights_id(source, mlp_path)}+{weights_id(clip_path, *local_weight_files(clip_path))}",
                         dtype)
    return AestheticScorer(clip, processor, place(mlp, device), ident)


def build_tiny_aesthetic(folder: Path, seed: int = 0) -> dict[str, Any]:
    """Tiny CLIP in `clip/` + a random MLP of the official layout on its embeddings, saved like the official file."""
    from transformers import CLIPConfig

    from ..models import _count_parameters, _model_card, build_tiny_clip

    folder = Path(folder)
    clip_facts = build_tiny_clip(folder / "clip", seed=seed)
    projection_dim = CLIPConfig.from_pretrained(folder / "clip").projection_dim
    torch.manual_seed(seed)
    mlp = AestheticMLP(projection_dim)
    torch.save(mlp.state_dict(), folder / MLP_FILE)
    _model_card(folder, "LAION aesthetic predictor", seed,
                f"`{MLP_FILE}`: the official MLP layout on {projection_dim}-d embeddings of the tiny CLIP in `clip/`.")
    return {"parameters": clip_facts["parameters"] + _count_parameters(mlp), "embedding_size": projection_dim}
