"""ImageReward and HPS v2.1: official state dicts mapped into transformers, checked against independent oracles."""
import shutil
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from helpers.scorers import base, hps, image_reward

PROMPTS = ["a photo of a cat, 8k", "an oil painting of a castle at sunset"]


def _images(n: int = 2, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 56, 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="module")
def ir_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("image_reward")
    image_reward.build_tiny_image_reward(folder, seed=0)
    return folder


@pytest.fixture(scope="module")
def hps_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hps")
    hps.build_tiny_hps(folder, seed=0)
    return folder


# ------------------------------------------------------------------------------------------ preprocessing

def test_resize_center_crop_matches_torchvision_by_hand():
    left_red_right_blue = np.zeros((32, 64, 3), dtype=np.uint8)
    left_red_right_blue[:, :32, 0] = 255
    left_red_right_blue[:, 32:, 2] = 255
    pixels = base.resize_center_crop([Image.fromarray(left_red_right_blue)], 32)  # short side is already 32
    assert pixels.shape == (1, 3, 32, 32)
    assert torch.equal(pixels[0, 0, :, :16], torch.ones(32, 16))  # columns 16..47 kept: half red, half blue
    assert torch.equal(pixels[0, 2, :, 16:], torch.ones(32, 16))
    assert base.resize_center_crop([Image.new("RGBA", (50, 30))], 16).shape == (1, 3, 16, 16)  # → 26x16 → crop


def test_hps_resize_longest_pads_black_around_the_image():
    pixels = hps.resize_longest_pad([Image.new("RGB", (64, 32), (255, 255, 255))], 32)  # → 32 wide, 16 high
    assert pixels.shape == (1, 3, 32, 32)
    assert torch.equal(pixels[0, :, :8], torch.zeros(3, 8, 32))
    assert torch.equal(pixels[0, :, 24:], torch.zeros(3, 8, 32))
    assert torch.allclose(pixels[0, :, 8:24], torch.ones(3, 16, 32), atol=1e-5)


# ------------------------------------------------------------------------------------------- ImageReward

V, DEPTH, PATCH, IMAGE = 32, 2, 8, 32  # tiny ViT
T, LAYERS, FFN, VOCAB, POSITIONS = 32, 2, 64, 50, 64  # tiny BERT
MED = {"hidden_size": T, "num_hidden_layers": LAYERS, "num_attention_heads": 4, "intermediate_size": FFN,
       "vocab_size": VOCAB, "max_position_embeddings": POSITIONS, "encoder_width": 768, "add_cross_attention": True,
       "layer_norm_eps": 1e-12, "hidden_act": "gelu", "pad_token_id": 0}
VISION = {"hidden_size": V, "intermediate_size": 4 * V, "num_hidden_layers": DEPTH, "num_attention_heads": 4,
          "image_size": IMAGE, "patch_size": PATCH}
EXTRAS = {"blip.vision_proj.weight": (16, V), "blip.vision_proj.bias": (16,), "blip.text_proj.weight": (16, T),
          "blip.text_proj.bias": (16,)}


def _official_shapes() -> dict[str, tuple[int, ...]]:
    """Every key ImageReward.pt holds for the tiny sizes, written out from BLIP's naming (timm ViT + med.py BERT)."""
    shapes = {"blip.visual_encoder.cls_token": (1, 1, V),
              "blip.visual_encoder.pos_embed": (1, (IMAGE // PATCH) ** 2 + 1, V),
              "blip.visual_encoder.patch_embed.proj.weight": (V, 3, PATCH, PATCH),
              "blip.visual_encoder.patch_embed.proj.bias": (V,)}
    linear = lambda name, out, inp: {f"{name}.weight": (out, inp), f"{name}.bias": (out,)}  # noqa: E731
    norm = lambda name, width: {f"{name}.weight": (width,), f"{name}.bias": (width,)}  # noqa: E731
    for i in range(DEPTH):
        block = f"blip.visual_encoder.blocks.{i}"
        shapes |= norm(f"{block}.norm1", V) | linear(f"{block}.attn.qkv", 3 * V, V) | linear(f"{block}.attn.proj", V, V)
        shapes |= norm(f"{block}.norm2", V) | linear(f"{block}.mlp.fc1", 4 * V, V)
        shapes |= linear(f"{block}.mlp.fc2", V, 4 * V)
    shapes |= norm("blip.visual_encoder.norm", V)
    text = "blip.text_encoder"
    shapes |= {f"{text}.embeddings.word_embeddings.weight": (VOCAB, T),
               f"{text}.embeddings.position_embeddings.weight": (POSITIONS, T)}
    shapes |= norm(f"{text}.embeddings.LayerNorm", T)
    for i in range(LAYERS):
        layer = f"{text}.encoder.layer.{i}"
        for kind, width in (("attention", T), ("crossattention", V)):  # cross-attention keys/values read the image
            shapes |= linear(f"{layer}.{kind}.self.query", T, T) | linear(f"{layer}.{kind}.self.key", T, width)
            shapes |= linear(f"{layer}.{kind}.self.value", T, width) | linear(f"{layer}.{kind}.output.dense", T, T)
            shapes |= norm(f"{layer}.{kind}.output.LayerNorm", T)
        shapes |= linear(f"{layer}.intermediate.dense", FFN, T) | linear(f"{layer}.output.dense", T, FFN)
        shapes |= norm(f"{layer}.output.LayerNorm", T)
    widths = (T, 1024, 128, 64, 16, 1)
    for index, (inp, out) in zip((0, 2, 4, 6, 7), zip(widths, widths[1:])):
        shapes |= linear(f"mlp.layers.{index}", out, inp)
    return shapes


def _official_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = {**_official_shapes(), **EXTRAS}
    state = {key: torch.randn(shape, generator=generator) * 0.2 for key, shape in shapes.items()}
    for key in state:  # LayerNorm gains near 1, so activations keep their scale through the layers
        if ("norm" in key or "LayerNorm" in key) and key.endswith("weight"):
            state[key] = 1 + state[key] * 0.5
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(POSITIONS)[None]  # a buffer old files carry
    return state


def _tiny_model() -> image_reward.ImageRewardModel:
    return image_reward.ImageRewardModel(*image_reward.blip_configs(MED, VISION)).eval()


def test_official_keys_map_onto_the_model_and_back():
    official = _official_state_dict()
    mapped, ignored = image_reward.official_to_transformers(official)
    assert sorted(ignored) == sorted([*EXTRAS, "blip.text_encoder.embeddings.position_ids"])
    model = _tiny_model()
    model.load_state_dict(mapped, strict=True)  # every parameter mapped, nothing left over
    back = image_reward.transformers_to_official(model.state_dict())
    assert set(back) == set(_official_shapes())
    assert all(torch.equal(back[key], official[key]) for key in back)


def test_the_tiny_file_uses_the_official_key_names(ir_folder):
    saved = torch.load(ir_folder / image_reward.WEIGHTS_FILE)
    assert {k for k in saved if k not in EXTRAS and not k.endswith("position_ids")} == set(_official_shapes())


def _attention(x, memory, weights, prefix, heads, mask=None):
    q, k, v = (F.linear(src, weights[f"{prefix}.{n}.weight"], weights[f"{prefix}.{n}.bias"])
               for src, n in ((x, "query"), (memory, "key"), (memory, "value")))
    split = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)  # noqa: E731
    return F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask).transpose(1, 2).flatten(2)


def _reference_image_reward(w, pixels, ids, mask, heads=4):
    """ImageReward's forward written from the official modules' definitions, reading official keys."""
    p = lambda name: w[f"blip.visual_encoder.{name}"]  # noqa: E731
    x = F.conv2d(pixels, p("patch_embed.proj.weight"), p("patch_embed.proj.bias"), stride=PATCH).flatten(2).mT
    x = torch.cat([p("cls_token").expand(len(x), -1, -1), x], 1) + p("pos_embed")
    for i in range(DEPTH):  # timm Block: pre-norm, fused qkv laid out (3, heads, head_dim)
        b = f"blocks.{i}."
        h = F.layer_norm(x, (V,), p(b + "norm1.weight"), p(b + "norm1.bias"), 1e-6)
        q, k, v = F.linear(h, p(b + "attn.qkv.weight"), p(b + "attn.qkv.bias")).unflatten(-1, (3, heads, -1)).permute(
            2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        x = x + F.linear(attended, p(b + "attn.proj.weight"), p(b + "attn.proj.bias"))
        h = F.layer_norm(x, (V,), p(b + "norm2.weight"), p(b + "norm2.bias"), 1e-6)
        x = x + F.linear(F.gelu(F.linear(h, p(b + "mlp.fc1.weight"), p(b + "mlp.fc1.bias"))), p(b + "mlp.fc2.weight"),
                         p(b + "mlp.fc2.bias"))
    image = F.layer_norm(x, (V,), p("norm.weight"), p("norm.bias"), 1e-6)
    t = lambda name: w[f"blip.text_encoder.{name}"]  # noqa: E731
    ln = lambda x, name: F.layer_norm(x, (T,), t(f"{name}.weight"), t(f"{name}.bias"), 1e-12)  # noqa: E731
    x = ln(t("embeddings.word_embeddings.weight")[ids] + t("embeddings.position_embeddings.weight")[:ids.shape[1]],
           "embeddings.LayerNorm")
    keep = mask.bool()[:, None, None, :]  # BERT's padding mask: no token attends to padding
    for i in range(LAYERS):  # BERT post-norm layer with cross-attention after self-attention
        L = f"encoder.layer.{i}."
        for kind, memory, m in (("attention", x, keep), ("crossattention", image, None)):
            out = _attention(x, memory, w, f"blip.text_encoder.{L}{kind}.self", heads, m)
            x = ln(F.linear(out, t(L + kind + ".output.dense.weight"), t(L + kind + ".output.dense.bias")) + x,
                   L + kind + ".output.LayerNorm")
        h = F.gelu(F.linear(x, t(L + "intermediate.dense.weight"), t(L + "intermediate.dense.bias")))
        x = ln(F.linear(h, t(L + "output.dense.weight"), t(L + "output.dense.bias")) + x, L + "output.LayerNorm")
    reward = x[:, 0]
    for index in (0, 2, 4, 6, 7):  # the official head has no activations
        reward = F.linear(reward, w[f"mlp.layers.{index}.weight"], w[f"mlp.layers.{index}.bias"])
    return (reward.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072


def test_image_reward_forward_matches_a_reference_on_official_weights():
    official = _official_state_dict(seed=1)
    model = _tiny_model()
    image_reward.load_official_state_dict(model, official)
    pixels = torch.randn(2, 3, IMAGE, IMAGE)
    ids = torch.tensor([[2, 7, 9, 11, 3, 0, 0], [2, 5, 3, 0, 0, 0, 0]])
    with torch.no_grad():
        ours = model(pixels, ids, (ids != 0).long())
    expected = _reference_image_reward(official, pixels, ids, (ids != 0).long())
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)
    assert ours[0] != ours[1]
    assert model.vision.config.layer_norm_eps == 1e-6  # BLIP's ViT; too small a difference for the values to show


def test_tiny_image_reward_round_trip_through_the_loader(ir_folder, tmp_path):
    scorer = image_reward.load_image_reward(str(ir_folder))
    assert scorer.name == "image_reward" and "blip.text_proj.weight" in scorer.ignored_keys
    images = _images()
    scores = scorer.score(images, [PROMPTS[0]] * 2)
    assert scores.shape == (2,) and scores.dtype == np.float64 and np.isfinite(scores).all()
    assert scores[0] != scores[1]
    np.testing.assert_array_equal(scores, scorer.score(images, [PROMPTS[0]] * 2))
    image_reward.build_tiny_image_reward(tmp_path / "again", seed=0)  # same seed: same weights and scores
    np.testing.assert_array_equal(scores, image_reward.load_image_reward(str(tmp_path / "again")).score(
        images, [PROMPTS[0]] * 2))
    assert scorer.weights_id.startswith(ir_folder.name + "@")


def test_image_reward_normalises_the_head_output(ir_folder):
    scorer = image_reward.load_image_reward(str(ir_folder))
    inputs = scorer.inputs(_images(), PROMPTS)
    assert inputs["input_ids"].shape == (2, 35)  # padded and truncated to 35 tokens
    with torch.no_grad():
        image_tokens = scorer.model.vision(pixel_values=inputs["pixel_values"]).last_hidden_state
        text = scorer.model.text(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                 encoder_hidden_states=image_tokens).last_hidden_state
        raw = scorer.model.mlp(text[:, 0]).squeeze(-1)
    np.testing.assert_allclose(scorer.score(_images(), PROMPTS), ((raw - 0.16717362830052426) / 1.0333394966054072),
                               atol=1e-6)


def test_image_reward_padding_does_not_change_the_reward(ir_folder):
    scorer = image_reward.load_image_reward(str(ir_folder))
    inputs = scorer.inputs(_images(1), PROMPTS[:1])
    length = int(inputs["attention_mask"].sum())
    with torch.no_grad():
        padded = scorer.model(**inputs)
        unpadded = scorer.model(inputs["pixel_values"], inputs["input_ids"][:, :length],
                                inputs["attention_mask"][:, :length])
    torch.testing.assert_close(padded, unpadded, atol=1e-5, rtol=1e-5)


def test_image_reward_names_a_missing_key_and_a_misshapen_one(ir_folder, tmp_path):
    weights = torch.load(ir_folder / image_reward.WEIGHTS_FILE)
    for name in (image_reward.MED_CONFIG_FILE, image_reward.VISION_CONFIG_FILE):
        (tmp_path / name).write_bytes((ir_folder / name).read_bytes())
    torch.save({k: v for k, v in weights.items() if k != "blip.visual_encoder.blocks.1.attn.qkv.weight"},
               tmp_path / image_reward.WEIGHTS_FILE)
    with pytest.raises(KeyError, match=r"blip\.visual_encoder\.blocks\.1\.attn\.qkv\.weight"):
        image_reward.load_image_reward(str(tmp_path), tokenizer_source=str(ir_folder / "tokenizer"))
    torch.save({**weights, "mlp.layers.7.weight": torch.zeros(2, 16)}, tmp_path / image_reward.WEIGHTS_FILE)
    with pytest.raises(ValueError, match=r"mlp\.layers\.7\.weight: \(2, 16\)"):
        image_reward.load_image_reward(str(tmp_path), tokenizer_source=str(ir_folder / "tokenizer"))


def test_image_reward_wants_one_prompt_per_image(ir_folder):
    with pytest.raises(ValueError, match="one prompt per image"):
        image_reward.load_image_reward(str(ir_folder)).score(_images(2), PROMPTS[:1])


# --------------------------------------------------------------------------------------------------- HPS

class _Block(nn.Module):
    """OpenCLIP's ResidualAttentionBlock: pre-norm, nn.MultiheadAttention, GELU MLP named c_fc / c_proj."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=nn.GELU(),
                                             c_proj=nn.Linear(4 * width, width)))

    def forward(self, x, mask=None):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):
    def __init__(self, width: int, heads: int, layers: int):
        super().__init__()
        self.resblocks = nn.ModuleList(_Block(width, heads) for _ in range(layers))

    def forward(self, x, mask=None):
        for block in self.resblocks:
            x = block(x, mask)
        return x


class _Visual(nn.Module):
    def __init__(self, cfg: dict, embed_dim: int):
        super().__init__()
        width, grid = cfg["width"], cfg["image_size"] // cfg["patch_size"]
        self.conv1 = nn.Conv2d(3, width, cfg["patch_size"], cfg["patch_size"], bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width))
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, width))
        self.ln_pre, self.ln_post = nn.LayerNorm(width), nn.LayerNorm(width)
        self.transformer = _Transformer(width, width // cfg["head_width"], cfg["layers"])
        self.proj = nn.Parameter(torch.randn(width, embed_dim))

    def forward(self, pixels):
        x = self.conv1(pixels).flatten(2).mT
        x = torch.cat([self.class_embedding.expand(len(x), 1, -1), x], 1) + self.positional_embedding
        return self.ln_post(self.transformer(self.ln_pre(x))[:, 0]) @ self.proj


class OpenClipReference(nn.Module):
    """A small OpenCLIP CLIP written from its published structure; its state-dict keys are OpenCLIP's."""

    def __init__(self, cfg: dict):
        super().__init__()
        text = cfg["text_cfg"]
        self.visual = _Visual(cfg["vision_cfg"], cfg["embed_dim"])
        self.token_embedding = nn.Embedding(text["vocab_size"], text["width"])
        self.positional_embedding = nn.Parameter(torch.randn(text["context_length"], text["width"]))
        self.transformer = _Transformer(text["width"], text["heads"], text["layers"])
        self.ln_final = nn.LayerNorm(text["width"])
        self.text_projection = nn.Parameter(torch.randn(text["width"], cfg["embed_dim"]))
        self.logit_scale = nn.Parameter(torch.tensor(4.6052))

    def encode_text(self, ids):
        x = self.token_embedding(ids) + self.positional_embedding[:ids.shape[1]]
        causal = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)
        x = self.ln_final(self.transformer(x, causal))
        return x[torch.arange(len(ids)), ids.argmax(-1)] @ self.text_projection  # EOT has the largest id


def _reference_checkpoint(folder, seed: int = 3) -> OpenClipReference:
    """Overwrite the tiny checkpoint with a randomly initialised reference model's weights (`module.`-prefixed)."""
    vocab_size = torch.load(folder / hps.CHECKPOINT)["state_dict"]["token_embedding.weight"].shape[0]
    cfg = hps.tiny_open_clip_config(vocab_size)
    torch.manual_seed(seed)
    reference = OpenClipReference(cfg).eval()
    with torch.no_grad():
        for name, param in reference.named_parameters():  # every weight random, LayerNorm gains near 1
            param.copy_(1 + 0.3 * torch.randn_like(param) if "ln" in name and name.endswith("weight")
                        else 0.3 * torch.randn_like(param))
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, folder / hps.CHECKPOINT)
    return reference


def test_hps_keys_are_open_clip_keys_and_map_both_ways(hps_folder):
    saved = torch.load(hps_folder / hps.CHECKPOINT)["state_dict"]
    cfg = hps.tiny_open_clip_config(saved["token_embedding.weight"].shape[0])
    assert set(saved) == set(OpenClipReference(cfg).state_dict())  # the tiny file has OpenCLIP's names and only them
    mapped = hps.open_clip_to_transformers({f"module.{k}": v for k, v in saved.items()})
    back = hps.transformers_to_open_clip(mapped)
    assert set(back) == set(saved) and all(torch.equal(back[k], saved[k]) for k in saved)


def test_hps_features_match_an_open_clip_reference(hps_folder, tmp_path):
    folder = shutil.copytree(hps_folder, tmp_path / "hps")  # a private copy: the reference weights replace the file
    reference = _reference_checkpoint(folder)
    scorer = hps.load_hps(str(folder))
    images, prompts = _images(), PROMPTS
    pixels = base.normalize(hps.resize_longest_pad(images, scorer.image_size))
    ids = scorer.text_ids(prompts)
    with torch.no_grad():
        image_expected = F.normalize(reference.visual(pixels), dim=-1)
        text_expected = F.normalize(reference.encode_text(ids), dim=-1)
        eot = int(ids[0].argmax())  # padding after EOT changes nothing (causal mask)
        torch.testing.assert_close(reference.encode_text(ids[:1, :eot + 1]), reference.encode_text(ids[:1]))
    torch.testing.assert_close(scorer.image_features(images), image_expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scorer.text_features(prompts), text_expected, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(scorer.score(images, prompts), (image_expected * text_expected).sum(-1), atol=1e-5)
    assert ids[0, eot] == scorer.tokenizer.eos_token_id and (ids[0, eot + 1:] == 0).all()


def test_tiny_hps_round_trip_through_the_loader(hps_folder, tmp_path):
    scorer = hps.load_hps(str(hps_folder))
    images = _images(3)
    scores = scorer.score(images, [PROMPTS[0]] * 3)
    assert scorer.name == "hps" and scores.shape == (3,) and scores.dtype == np.float64
    assert np.isfinite(scores).all() and np.all(np.abs(scores) <= 1 + 1e-6) and len(set(scores.tolist())) == 3
    np.testing.assert_array_equal(scores, scorer.score(images, [PROMPTS[0]] * 3))
    hps.build_tiny_hps(tmp_path / "again", seed=0)
    np.testing.assert_array_equal(scores, hps.load_hps(str(tmp_path / "again")).score(images, [PROMPTS[0]] * 3))
    hps.build_tiny_hps(tmp_path / "other", seed=1)
    assert not np.array_equal(scores, hps.load_hps(str(tmp_path / "other")).score(images, [PROMPTS[0]] * 3))


def test_hps_names_a_missing_key_and_an_unknown_one(hps_folder, tmp_path):
    saved = torch.load(hps_folder / hps.CHECKPOINT)["state_dict"]
    model = hps.load_hps(str(hps_folder)).model
    missing = {k: v for k, v in saved.items() if k != "visual.transformer.resblocks.1.attn.in_proj_weight"}
    with pytest.raises(KeyError, match=r"visual\.transformer\.resblocks\.1\.attn\.in_proj_weight"):
        hps.load_open_clip_state_dict(model, missing)
    with pytest.raises(KeyError, match=r"visual\.head\.weight"):
        hps.load_open_clip_state_dict(model, {**saved, "visual.head.weight": torch.zeros(1)})
