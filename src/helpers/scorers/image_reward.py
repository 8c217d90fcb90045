"""ImageReward v1.0 rebuilt from transformers parts, loading the official `ImageReward.pt` state dict.

The official package (`image-reward`) pins timm 0.6.13 and fairscale, which do not fit the book's pins. Its model is
BLIP's ViT-L/16 image encoder, a BERT-base text encoder that cross-attends to the image tokens in every layer, and a
linear MLP head on the first text token. Here the image encoder is `BlipVisionModel`, the text encoder `BlipTextModel`
(BLIP's own BERT), and the official keys are renamed on load.
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
from torch import nn

from . import base

HUB_ID = "THUDM/ImageReward"
WEIGHTS_FILE = "ImageReward.pt"
MED_CONFIG_FILE = "med_config.json"
VISION_CONFIG_FILE = "vision_config.json"  # only tiny folders have one; the official model is ViT-L/16 at 224 px
TOKENIZER_HUB_ID = "bert-base-uncased"
# ImageReward's reward statistics on its training set: scores are reported as (r - mean) / std
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_TEXT_TOKENS = 35  # ImageReward truncates and pads prompts to 35 BERT tokens
HEAD_WIDTHS = (1024, 128, 64, 16, 1)  # the official MLP head after its input layer
# BLIP's `create_vit('large', 224)`: timm-style ViT-L/16 with LayerNorm eps 1e-6 and exact GELU
VIT_L16 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
               image_size=224, patch_size=16)

# (official name under blip.visual_encoder., name under BlipVisionModel); {i} is a block index. Every entry but
# the two embeddings is a module with .weight and .bias. Shapes agree: cls_token (1, 1, D) and pos_embed (1, N, D)
# are class_embedding and position_embedding as they are, and timm's fused qkv has BlipAttention's row order.
_VISION_NAMES = [
    ("cls_token", "embeddings.class_embedding"),
    ("pos_embed", "embeddings.position_embedding"),
    ("patch_embed.proj", "embeddings.patch_embedding"),
    ("blocks.{i}.norm1", "encoder.layers.{i}.layer_norm1"),
    ("blocks.{i}.attn.qkv", "encoder.layers.{i}.self_attn.qkv"),
    ("blocks.{i}.attn.proj", "encoder.layers.{i}.self_attn.projection"),
    ("blocks.{i}.norm2", "encoder.layers.{i}.layer_norm2"),
    ("blocks.{i}.mlp.fc1", "encoder.layers.{i}.mlp.fc1"),
    ("blocks.{i}.mlp.fc2", "encoder.layers.{i}.mlp.fc2"),
    ("norm", "post_layernorm"),
]
# BLIP's BERT (med.py) and transformers' BlipTextModel use the same names; these are the parameters it needs
_TEXT_PATTERN = re.compile(
    r"embeddings\.(word_embeddings|position_embeddings)\.weight|embeddings\.LayerNorm\.(weight|bias)"
    r"|encoder\.layer\.\d+\.(attention|crossattention)\.(self\.(query|key|value)|output\.(dense|LayerNorm))"
    r"\.(weight|bias)|encoder\.layer\.\d+\.(intermediate\.dense|output\.dense|output\.LayerNorm)\.(weight|bias)")
_HEAD_PATTERN = re.compile(r"layers\.(0|2|4|6|7)\.(weight|bias)")


def _rename(key: str, pairs: list[tuple[str, str]]) -> str | None:
    """`key` renamed by the first (source, target) pair whose source matches it, else None."""
    for source, target in pairs:
        pattern = re.escape(source).replace(r"\{i\}", r"(?P<i>\d+)") + r"(?P<leaf>\.weight|\.bias)?"
        found = re.fullmatch(pattern, key)
        if found:
            groups = found.groupdict()
            return target.replace("{i}", groups.get("i") or "") + (groups["leaf"] or "")
    return None


def _ours(key: str) -> str | None:
    """This module's name for an official key, or None when the scorer does not need that key."""
    if key.startswith("blip.visual_encoder."):
        name = _rename(key.removeprefix("blip.visual_encoder."), _VISION_NAMES)
        return name and f"vision.{name}"
    if key.startswith("blip.text_encoder.") and _TEXT_PATTERN.fullmatch(key.removeprefix("blip.text_encoder.")):
        return "text." + key.removeprefix("blip.text_encoder.")
    if key.startswith("mlp.") and _HEAD_PATTERN.fullmatch(key.removeprefix("mlp.")):
        return key
    return None


def _official(key: str) -> str:
    """The official name of one of this module's keys."""
    if key.startswith("vision."):
        name = _rename(key.removeprefix("vision."), [(ours, official) for official, ours in _VISION_NAMES])
        if name is None:
            raise KeyError(f"no official name for {key!r}; add it to _VISION_NAMES")
        return f"blip.visual_encoder.{name}"
    if key.startswith("text."):
        return "blip.text_encoder." + key.removeprefix("text.")
    return key


def official_to_transformers(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(state dict for `ImageRewardModel`, official keys the scorer does not use, e.g. `blip.text_proj.*`)."""
    mapped, ignored = {}, []
    for key, value in state_dict.items():
        name = _ours(key)
        if name is None:
            ignored.append(key)
        else:
            mapped[name] = value
    return mapped, ignored


def transformers_to_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`ImageRewardModel` state dict → the official key names (what the tiny builder saves)."""
    return {_official(key): value for key, value in state_dict.items()}


# ------------------------------------------------------------------------------------------------- model

def blip_configs(med_config: dict[str, Any], vision: dict[str, Any] | None = None):
    """(BlipVisionConfig, BlipTextConfig) from BLIP's med_config and the vision sizes (ViT-L/16 by default)."""
    from transformers import BlipTextConfig, BlipVisionConfig

    vision_config = BlipVisionConfig(**{**VIT_L16, **(vision or {}), "layer_norm_eps": 1e-6, "hidden_act": "gelu"})
    text_keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "max_position_embeddings", "hidden_act", "layer_norm_eps", "pad_token_id", "bos_token_id",
                 "sep_token_id", "initializer_range")
    # BLIP sets encoder_width to the ViT's width in code, whatever med_config says; is_decoder=True is how
    # BlipTextModel builds cross-attention layers (the forward pass still uses the bidirectional mask)
    text_config = BlipTextConfig(**{k: med_config[k] for k in text_keys if k in med_config},
                                 encoder_hidden_size=vision_config.hidden_size, is_decoder=True,
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return vision_config, text_config


class RewardHead(nn.Module):
    """ImageReward's MLP: five Linear layers with dropout between them and no activation (as published)."""

    def __init__(self, input_size: int):
        super().__init__()
        widths = (input_size, *HEAD_WIDTHS)
        linears = [nn.Linear(a, b) for a, b in zip(widths, widths[1:])]
        self.layers = nn.Sequential(linears[0], nn.Dropout(0.2), linears[1], nn.Dropout(0.2), linears[2],
                                    nn.Dropout(0.1), linears[3], linears[4])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


class ImageRewardModel(nn.Module):
    """BLIP ViT → BERT cross-attending to the image tokens → MLP on the first token → normalised reward."""

    def __init__(self, vision_config, text_config):
        super().__init__()
        from transformers import BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = RewardHead(text_config.hidden_size)

    def raw_reward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
        """The MLP's output before normalisation, shape (B,)."""
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device)
        text = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                         encoder_attention_mask=image_mask, is_decoder=False, use_cache=False)
        return self.mlp(text.last_hidden_state[:, 0]).squeeze(-1)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        """Normalised rewards, shape (B,)."""
        return (self.raw_reward(pixel_values, input_ids, attention_mask) - REWARD_MEAN) / REWARD_STD


def load_official_state_dict(model: ImageRewardModel, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Map and load an official state dict into `model`; returns the ignored keys, fails on missing or misshapen."""
    mapped, ignored = official_to_transformers(state_dict)
    base.load_checked(model, mapped, _official, "ImageReward state dict",
                      f"is it the official {WEIGHTS_FILE} (or a tiny one from build_tiny_image_reward)?",
                      f"check {MED_CONFIG_FILE} and {VISION_CONFIG_FILE} against the weights")
    return ignored


# ------------------------------------------------------------------------------------------------ scorer

def add_blip_tokens(tokenizer):
    """BLIP's tokenizer: bert-base-uncased plus bos `[DEC]` and the extra special `[ENC]` (vocab 30524)."""
    vocab = tokenizer.get_vocab()
    if "[DEC]" not in vocab:
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    if "[ENC]" not in vocab:
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def _load_tokenizer(source: str, tokenizer_source: str | None):
    from transformers import AutoTokenizer

    folder = base.local_file(source, "tokenizer/tokenizer_config.json")
    where = tokenizer_source or (str(folder.parent) if folder else TOKENIZER_HUB_ID)
    return add_blip_tokens(AutoTokenizer.from_pretrained(where))


@dataclass
class ImageRewardScorer:
    """ImageReward scores of (image, prompt) pairs: higher is more preferred; comparable across prompts."""

    model: ImageRewardModel
    tokenizer: Any
    weights_id: str
    image_size: int
    device: str = "cpu"
    batch_size: int = 16
    name: str = "image_reward"
    ignored_keys: tuple[str, ...] = ()

    def inputs(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The model's inputs for a batch (ImageReward's preprocessing and 35-token text)."""
        dtype = next(self.model.parameters()).dtype
        pixels = base.normalize(base.pixels_in_threads(lambda chunk: base.resize_center_crop(chunk, self.image_size),
                                                       images))
        text = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_TEXT_TOKENS,
                              return_tensors="pt")
        return {"pixel_values": pixels.to(self.device, dtype), "input_ids": text["input_ids"].to(self.device),
                "attention_mask": text["attention_mask"].to(self.device)}

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> np.ndarray:
        """One normalised reward per image (float64), each against its own prompt."""
        def batch_rewards(images, prompts):
            return self.model(**self.inputs(images, prompts))
        return np.asarray(base.in_fitting_batches(self, batch_rewards, images, prompts), dtype=np.float64)


def load_image_reward(source: str, device: str = "cpu", dtype: torch.dtype | None = None,
                      tokenizer_source: str | None = None) -> ImageRewardScorer:
    """ImageReward from a local folder or hub id `THUDM/ImageReward` (files `ImageReward.pt`, `med_config.json`)."""
    from ..device import place

    med_file, weights_file = base.fetch(source, MED_CONFIG_FILE), base.fetch(source, WEIGHTS_FILE)
    vision_file = base.local_file(source, VISION_CONFIG_FILE)
    vision = json.loads(vision_file.read_text()) if vision_file else None
    vision_config, text_config = blip_configs(json.loads(med_file.read_text()), vision)
    with base.skip_weight_init():
        model = ImageRewardModel(vision_config, text_config)
    ignored = load_official_state_dict(model, base.load_checkpoint(weights_file))
    tokenizer = _load_tokenizer(source, tokenizer_source)
    if len(tokenizer) > text_config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the text encoder only {text_config.vocab_size}; "
                         "pass the tokenizer the weights were trained with (tokenizer_source=)")
    return ImageRewardScorer(model=place(model, device, dtype or torch.float32), tokenizer=tokenizer,
                             weights_id=base.precision_id(base.weights_id(source, weights_file, med_file), dtype),
                             device=device,
                             image_size=vision_config.image_size, ignored_keys=tuple(ignored))


# ------------------------------------------------------------------------------------------------- tiny

TINY_VISION = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   image_size=32, patch_size=8)
# BlipVisionConfig's default init std is 1e-10 and BERT's 0.02: at those, the tiny model's rewards hardly depend on the
# image (ties in bf16); 0.1 spreads them enough to rank images
TINY_INIT_STD = 0.1


def train_bert_tokenizer(vocab_size: int = 1000, seed: int = 0):
    """A BERT WordPiece vocabulary (lower-cased) built from generated prompts, with BLIP's two tokens.

    Built by counting rather than with the `tokenizers` WordPiece trainer, whose tie-breaking between
    equally frequent pieces changes from run to run; this one is the same file for the same seed.
    """
    from collections import Counter

    from tokenizers import normalizers, pre_tokenizers
    from transformers import BertTokenizer

    from ..models import tokenizer_corpus

    normalizer, splitter = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = Counter(word for line in tokenizer_corpus(seed=seed) if not line.startswith("{")
                    for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(line)))
    characters = sorted({c for word in words for c in word})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *characters, *(f"##{c}" for c in characters)]
    vocab += [w for w, _ in sorted(words.items(), key=lambda item: (-item[1], item[0])) if len(w) > 1]
    return add_blip_tokens(BertTokenizer(vocab={token: i for i, token in enumerate(vocab[:vocab_size])}))


def build_tiny_image_reward(folder: Path, seed: int = 0) -> dict[str, Any]:
    """Random-weight ImageReward in the official file layout (ImageReward.pt with official keys, med_config.json)."""
    from ..models import _count_parameters, _model_card

    folder = Path(folder)
    tokenizer = train_bert_tokenizer(seed=seed)
    med_config = {"architectures": ["BertModel"], "model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "intermediate_size": 64, "vocab_size": len(tokenizer),
                  "max_position_embeddings": 64, "encoder_width": TINY_VISION["hidden_size"],
                  "add_cross_attention": True, "layer_norm_eps": 1e-12, "hidden_act": "gelu",
                  "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "initializer_range": TINY_INIT_STD,
                  "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
                  "sep_token_id": tokenizer.sep_token_id, "type_vocab_size": 2}
    vision_config, text_config = blip_configs(med_config, {**TINY_VISION, "initializer_range": TINY_INIT_STD})
    torch.manual_seed(seed)
    model = ImageRewardModel(vision_config, text_config)
    official = transformers_to_official(model.state_dict())
    # extras the official file also carries (BLIP's contrastive projections, BERT's position_ids buffer), so the
    # loader's ignore path runs on tiny weights too
    official["blip.vision_proj.weight"] = torch.randn(16, vision_config.hidden_size) * 0.02
    official["blip.text_proj.weight"] = torch.randn(16, text_config.hidden_size) * 0.02
    official["blip.text_encoder.embeddings.position_ids"] = torch.arange(text_config.max_position_embeddings)[None]
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.contiguous() for k, v in official.items()}, folder / WEIGHTS_FILE)
    (folder / MED_CONFIG_FILE).write_text(json.dumps(med_config, indent=2) + "\n")
    (folder / VISION_CONFIG_FILE).write_text(json.dumps(TINY_VISION, indent=2) + "\n")
    tokenizer.save_pretrained(folder / "tokenizer")
    _model_card(folder, "ImageReward (BLIP ViT + BERT cross-attention + MLP)", seed,
                f"Saved as the official `{WEIGHTS_FILE}` state dict (official key names) with `{MED_CONFIG_FILE}`; "
                f"`{VISION_CONFIG_FILE}` gives the tiny ViT sizes. The tokenizer is a WordPiece trained on generated "
                "prompts, plus BLIP's [DEC]/[ENC].")
    return {"parameters": _count_parameters(model), "vocab_size": len(tokenizer),
            "image_size": vision_config.image_size}
