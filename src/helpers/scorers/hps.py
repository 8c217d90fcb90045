"""HPS v2.1: OpenCLIP ViT-H-14 with the HPS weights, run as transformers' `CLIPModel`.

The official package (`hpsv2`) pins pytest 7.2.0 and protobuf < 4, and `open_clip` needs torchvision, which does not
import here; so the OpenCLIP state dict from `xswu/HPSv2` is renamed into `CLIPModel`'s keys. The score is the raw
cosine of the image and text features (no logit scale): it ranks images of one prompt, not prompts.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from . import base

HUB_ID = "xswu/HPSv2"
CHECKPOINT = "HPS_v2.1_compressed.pt"
OPEN_CLIP_CONFIG_FILE = "open_clip_config.json"  # only tiny folders have one; the hub checkpoint is ViT-H-14
TOKENIZER_HUB_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
# open_clip's model config for ViT-H-14 (src/open_clip/model_configs/ViT-H-14.json)
VIT_H_14 = {"embed_dim": 1024,
            "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24}}
# open_clip options this mapping does not reproduce: a config that sets them would load but compute something else
_UNSUPPORTED = ("ls_init_value", "attentional_pool", "global_average_pool", "no_ln_pre",
                "final_ln_after_pool", "hf_model_name", "timm_model_name", "proj_bias", "act_kwargs", "norm_kwargs")

# open_clip name → CLIPModel name, outside the transformer blocks; the two projections are stored transposed
# (open_clip computes x @ proj, nn.Linear computes x @ weight.T)
_TOP = {"visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        **{f"visual.ln_pre.{leaf}": f"vision_model.pre_layrnorm.{leaf}" for leaf in ("weight", "bias")},
        **{f"visual.ln_post.{leaf}": f"vision_model.post_layernorm.{leaf}" for leaf in ("weight", "bias")},
        "visual.proj": "visual_projection.weight",
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        **{f"ln_final.{leaf}": f"text_model.final_layer_norm.{leaf}" for leaf in ("weight", "bias")},
        "text_projection": "text_projection.weight",
        "logit_scale": "logit_scale"}
_TRANSPOSED = {"visual.proj", "text_projection"}
# inside block i: open_clip name → CLIPEncoderLayer name (the fused in_proj is split into q/k/v separately)
_BLOCK = {f"{ours}.{leaf}": f"{theirs}.{leaf}" for ours, theirs in
          [("ln_1", "layer_norm1"), ("attn.out_proj", "self_attn.out_proj"), ("ln_2", "layer_norm2"),
           ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")] for leaf in ("weight", "bias")}
_OPEN_CLIP_BLOCK = re.compile(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)")
_HF_BLOCK = re.compile(r"(vision_model|text_model)\.encoder\.layers\.(\d+)\.(.+)")
_IN_PROJ = {"attn.in_proj_weight": "weight", "attn.in_proj_bias": "bias"}


def _block_to_transformers(key: str, value: torch.Tensor) -> dict[str, torch.Tensor] | None:
    found = _OPEN_CLIP_BLOCK.fullmatch(key)
    if not found:
        return None
    prefix = f"{'vision_model' if found[1] else 'text_model'}.encoder.layers.{found[2]}."
    if found[3] in _IN_PROJ:  # nn.MultiheadAttention stacks the q, k and v projections row-wise, in that order
        leaf = _IN_PROJ[found[3]]
        return {f"{prefix}self_attn.{name}_proj.{leaf}": part.contiguous()
                for name, part in zip("qkv", value.chunk(3))}
    return {prefix + _BLOCK[found[3]]: value} if found[3] in _BLOCK else None


def open_clip_to_transformers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An OpenCLIP CLIP state dict (optionally `module.`-prefixed) → `CLIPModel` keys; fails on unknown keys."""
    mapped, unknown = {}, []
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key in _TOP:
            mapped[_TOP[key]] = value.T.contiguous() if key in _TRANSPOSED else value
        elif (block := _block_to_transformers(key, value)) is not None:
            mapped.update(block)
        elif not key.endswith("attn_mask"):  # the causal-mask buffer: CLIPModel builds its own
            unknown.append(key)
    if unknown:
        raise KeyError(f"{len(unknown)} OpenCLIP keys have no CLIPModel counterpart, e.g. {unknown[:3]}; this loader "
                       "handles plain OpenCLIP ViTs (no layer scale, attentional pooling or custom text tower)")
    return mapped


def open_clip_name(key: str) -> str:
    """The OpenCLIP name of a `CLIPModel` key (q/k/v projections all come from `attn.in_proj_*`)."""
    inverse_top = {ours: theirs for theirs, ours in _TOP.items()}
    if key in inverse_top:
        return inverse_top[key]
    found = _HF_BLOCK.fullmatch(key)
    if found:
        prefix = f"{'visual.' if found[1] == 'vision_model' else ''}transformer.resblocks.{found[2]}."
        qkv = re.fullmatch(r"self_attn\.[qkv]_proj\.(weight|bias)", found[3])
        if qkv:
            return f"{prefix}attn.in_proj_{qkv[1]}"
        inverse_block = {ours: theirs for theirs, ours in _BLOCK.items()}
        if found[3] in inverse_block:
            return prefix + inverse_block[found[3]]
    raise KeyError(f"no OpenCLIP name for CLIPModel key {key!r}; add it to _TOP or _BLOCK")


def transformers_to_open_clip(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`CLIPModel` state dict → OpenCLIP keys (q/k/v fused back into `in_proj`); what the tiny builder saves."""
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith("position_ids"):  # a buffer some transformers versions save; OpenCLIP has none
            continue
        name = open_clip_name(key)
        if "in_proj" in name:
            if name in mapped:
                continue
            mapped[name] = torch.cat([state_dict[re.sub(r"\.[qkv]_proj\.", f".{q}_proj.", key)] for q in "qkv"])
        else:
            mapped[name] = value.T.contiguous() if name in _TRANSPOSED else value
    return mapped


# ------------------------------------------------------------------------------------------------- model

def clip_config(open_clip_config: dict[str, Any], tokenizer):
    """A `CLIPConfig` with the architecture of an OpenCLIP model config (e.g. ViT-H-14.json)."""
    from transformers import CLIPConfig

    vision, text = open_clip_config["vision_cfg"], open_clip_config["text_cfg"]
    unsupported = [k for k in _UNSUPPORTED if vision.get(k) or text.get(k)]
    unsupported += [f"pool_type={cfg['pool_type']}" for cfg in (vision, text)
                    if cfg.get("pool_type", "tok") not in ("tok", "argmax")]  # CLIPModel pools CLS / EOT only
    if unsupported:
        raise ValueError(f"OpenCLIP options {unsupported} are not reproduced by CLIPModel; remove them from "
                         f"{OPEN_CLIP_CONFIG_FILE} or score with open_clip itself")
    # ViT-H-14 uses exact GELU; OpenAI's models (quick_gelu: true) use x * sigmoid(1.702 x)
    act = "quick_gelu" if open_clip_config.get("quick_gelu") else "gelu"
    embed_dim = open_clip_config["embed_dim"]
    vision_config = dict(hidden_size=vision["width"], num_hidden_layers=vision["layers"],
                         intermediate_size=int(vision["width"] * vision.get("mlp_ratio", 4)),
                         num_attention_heads=vision["width"] // vision.get("head_width", 64),
                         image_size=vision["image_size"], patch_size=vision["patch_size"], hidden_act=act,
                         layer_norm_eps=1e-5, projection_dim=embed_dim)
    # eos_token_id: CLIPModel pools the first EOT position; OpenCLIP pools argmax(ids). They agree because EOT is
    # the largest id and the scorer pads with 0, as OpenCLIP's tokenizer does.
    text_config = dict(vocab_size=text["vocab_size"], hidden_size=text["width"],
                       intermediate_size=int(text["width"] * text.get("mlp_ratio", 4)),
                       num_hidden_layers=text["layers"],
                       num_attention_heads=text.get("heads", 8), max_position_embeddings=text["context_length"],
                       hidden_act=act, layer_norm_eps=1e-5, projection_dim=embed_dim,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=0)
    return CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=embed_dim)


def load_open_clip_state_dict(model, state_dict: dict[str, torch.Tensor]) -> None:
    """Load an OpenCLIP state dict into a `CLIPModel`; errors name the OpenCLIP keys that are missing or misshapen."""
    base.load_checked(model, open_clip_to_transformers(state_dict), open_clip_name, "HPS checkpoint",
                      f"is it an OpenCLIP state dict such as {CHECKPOINT}?",
                      f"check {OPEN_CLIP_CONFIG_FILE} against the checkpoint")


# ------------------------------------------------------------------------------------------------ scorer

def resize_longest_pad(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """HPS's eval transform (`ResizeMaxSize`): longest side to `size` (bicubic), centred on black, (B, 3, S, S)."""
    import torch.nn.functional as F

    tensors = []
    for image in base.rgb(images):
        # like hpsv2: ToTensor first, then resize the float tensor (torchvision's bicubic with antialias)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        height, width = pixels.shape[1:]
        scale = size / max(height, width)
        new_h, new_w = round(height * scale), round(width * scale)
        if (new_h, new_w) != (height, width):
            pixels = F.interpolate(pixels[None], size=(new_h, new_w), mode="bicubic", align_corners=False,
                                   antialias=True)[0]
        pad_h, pad_w = size - new_h, size - new_w
        tensors.append(F.pad(pixels, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0))
    return torch.stack(tensors)


def _load_tokenizer(source: str):
    from transformers import AutoTokenizer

    folder = base.local_file(source, "tokenizer/tokenizer_config.json")
    return AutoTokenizer.from_pretrained(str(folder.parent) if folder else TOKENIZER_HUB_ID)


@dataclass
class HpsScorer:
    """HPS v2.1 scores: cosine of image and prompt features; compare only images of the same prompt."""

    model: Any  # transformers.CLIPModel
    tokenizer: Any
    weights_id: str
    image_size: int
    context_length: int
    device: str = "cpu"
    batch_size: int = 16
    name: str = "hps"

    def text_ids(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids as OpenCLIP makes them: SOT, tokens, EOT, zeros up to the context length."""
        text = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.context_length,
                              return_tensors="pt")
        return text["input_ids"].masked_fill(text["attention_mask"] == 0, 0)

    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """L2-normalised image embeddings, (B, embed_dim)."""
        dtype = self.model.visual_projection.weight.dtype
        pixels = base.normalize(base.pixels_in_threads(lambda chunk: resize_longest_pad(chunk, self.image_size),
                                                       images)).to(self.device, dtype)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return torch.nn.functional.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    @torch.no_grad()
    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings, (B, embed_dim); no attention mask, the causal mask hides the padding."""
        pooled = self.model.text_model(input_ids=self.text_ids(prompts).to(self.device)).pooler_output
        return torch.nn.functional.normalize(self.model.text_projection(pooled).float(), dim=-1)

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> np.ndarray:
        """One raw cosine per image (float64), each against its own prompt."""
        return np.asarray(base.in_fitting_batches(
            self, lambda images, prompts: (self.image_features(images) * self.text_features(prompts)).sum(-1),
            images, prompts), dtype=np.float64)


def load_hps(source: str, device: str = "cpu", dtype: torch.dtype | None = None,
             checkpoint: str = CHECKPOINT) -> HpsScorer:
    """HPS from a local folder or hub id `xswu/HPSv2` (`checkpoint`: the v2.1 file by default)."""
    from transformers import CLIPModel

    from ..device import place

    weights_file = base.fetch(source, checkpoint)
    config_file = base.local_file(source, OPEN_CLIP_CONFIG_FILE)
    open_clip_config = json.loads(config_file.read_text()) if config_file else VIT_H_14
    tokenizer = _load_tokenizer(source)
    with base.skip_weight_init():
        model = CLIPModel(clip_config(open_clip_config, tokenizer))
    saved = base.load_checkpoint(weights_file)
    load_open_clip_state_dict(model, saved.get("state_dict", saved))
    # a hub id names the repo, not the file; v2.0 and v2.1 must not share cached scores
    weights_id = base.weights_id(source, weights_file) if base.is_local(source) else f"{source}/{checkpoint}"
    weights_id = base.precision_id(weights_id, dtype)
    return HpsScorer(model=place(model, device, dtype or torch.float32), tokenizer=tokenizer, weights_id=weights_id,
                     image_size=open_clip_config["vision_cfg"]["image_size"],
                     context_length=open_clip_config["text_cfg"]["context_length"], device=device)


# ------------------------------------------------------------------------------------------------- tiny

def tiny_open_clip_config(vocab_size: int) -> dict[str, Any]:
    """A tiny OpenCLIP ViT config; widths all differ so a transposed or swapped weight cannot load."""
    return {"embed_dim": 24,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 48, "head_width": 12, "patch_size": 8},
            "text_cfg": {"context_length": 77, "vocab_size": vocab_size, "width": 32, "heads": 4, "layers": 2}}


def build_tiny_hps(folder: Path, seed: int = 0) -> dict[str, Any]:
    """Random-weight OpenCLIP-layout CLIP saved like the HPS checkpoint ({"state_dict": OpenCLIP keys})."""
    from transformers import CLIPModel

    from ..models import _count_parameters, _model_card, train_clip_tokenizer

    folder = Path(folder)
    tokenizer = train_clip_tokenizer(seed=seed)
    open_clip_config = tiny_open_clip_config(len(tokenizer))
    torch.manual_seed(seed)
    model = CLIPModel(clip_config(open_clip_config, tokenizer))
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": transformers_to_open_clip(model.state_dict())}, folder / CHECKPOINT)
    (folder / OPEN_CLIP_CONFIG_FILE).write_text(json.dumps(open_clip_config, indent=2) + "\n")
    tokenizer.save_pretrained(folder / "tokenizer")
    _model_card(folder, "HPS v2.1 (OpenCLIP ViT layout)", seed,
                f"Saved as `{CHECKPOINT}` = {{'state_dict': OpenCLIP keys}} with `{OPEN_CLIP_CONFIG_FILE}` in "
                "open_clip's model-config format; the tokenizer is a CLIP BPE trained on generated prompts.")
    return {"parameters": _count_parameters(model), "vocab_size": len(tokenizer),
            "image_size": open_clip_config["vision_cfg"]["image_size"]}
