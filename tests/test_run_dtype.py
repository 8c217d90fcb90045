"""The precision a GPU run works in: every model that only answers runs in bf16 (the run's dtype there), every
weight that trains stays fp32. Each test runs in bf16 on the CPU (always) and on the GPU (with `-m gpu`, which
`benchmarks/gpu_check.sh` runs), so the bf16 paths a paper-scale run takes are exercised without a GPU too."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import models

BF16 = torch.bfloat16
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]
ADAPTED = ("q_proj.weight", "v_proj.weight")


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def llm(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("llm")
    models.build_tiny_llama(folder, seed=0)
    return str(folder)


def _trainer_settings(device: str, tmp_path) -> dict:
    """TrainingArguments as the notebooks pass them on a GPU (bf16 autocast), on `device`."""
    return dict(output_dir=str(tmp_path / "trainer"), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                report_to="none", save_strategy="no", use_cpu=device == "cpu", logging_steps=1, disable_tqdm=True,
                seed=0, bf16=True)


def _saved_changes(folder, base: dict[str, torch.Tensor]) -> tuple[set[torch.dtype], list[str]]:
    """The dtypes of a saved model's tensors and the names of those that differ from `base` (cast to them)."""
    from safetensors.torch import load_file

    saved = load_file(folder / "model.safetensors")
    assert not any("lora" in name for name in saved)  # adapters merged
    return ({t.dtype for t in saved.values()},
            [name for name, t in saved.items() if not torch.equal(t.cpu(), base[name].to(t.dtype))])


def _dtypes_while_training(monkeypatch) -> dict:
    """Patch `Trainer.train` to record, as training starts, each parameter's dtype and which ones train."""
    from transformers import Trainer

    seen: dict = {}
    train = Trainer.train

    def record(trainer, *args, **kwargs):
        seen["trainable"] = {p.dtype for p in trainer.model.parameters() if p.requires_grad}
        seen["frozen"] = {p.dtype for p in trainer.model.parameters() if not p.requires_grad}
        seen["device"] = next(trainer.model.parameters()).device.type
        return train(trainer, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train", record)
    return seen


def test_lora_sft_trains_fp32_adapters_on_a_bf16_base(llm, device, tmp_path, monkeypatch):
    from helpers import sft

    records = [{"split": "train", "instruction": {"prompt": f"a {animal} at dawn", "negative_prompt": ""},
                "api": {"model": "AlphaMix", "type": "Checkpoint", "base_model": "SD 1.5", "width": 512,
                        "height": 512, "sampling_method": "Euler a", "sampling_steps": 20 + i, "cfg_scale": 7.0}}
               for i, animal in enumerate(["fox", "owl", "hare", "wolf"])]
    base = models.load_causal_lm(llm)[0].state_dict()
    seen = _dtypes_while_training(monkeypatch)
    config = sft.AgentSFTConfig(**_trainer_settings(device, tmp_path), max_length=256, use_lora=True, lora_r=4,
                                lora_target_modules=["q_proj", "v_proj"])
    result = sft.train(llm, sft.sft_dataset(records), config, tmp_path / "agent", base_dtype=BF16)
    assert seen == {"trainable": {torch.float32}, "frozen": {BF16}, "device": device}
    assert result["steps"] == 2 and math.isfinite(result["first_loss"]) and math.isfinite(result["last_loss"])
    dtypes, changed = _saved_changes(tmp_path / "agent", base)
    assert dtypes == {BF16} and changed and all(name.endswith(ADAPTED) for name in changed)


def test_all_weights_are_not_trained_in_bf16(llm, tmp_path):
    from helpers import sft

    config = sft.AgentSFTConfig(**_trainer_settings("cpu", tmp_path))
    with pytest.raises(ValueError, match="use_lora=True"):
        sft.train(llm, None, config, tmp_path / "agent", base_dtype=BF16)


def test_rrhf_trains_fp32_adapters_on_the_bf16_agent_it_proposed_with(llm, device, tmp_path, monkeypatch):
    from helpers.agent import Agent
    from helpers.rrhf import build_rrhf_dataset, train_agent

    rows = [{"prompt": f"a {animal} in the rain", "rewards": [0.1, 0.9, 0.5],
             "candidates": [f"model: Alpha{i}, steps: {20 + i}" for i in range(3)]} for animal in ["cat", "elk"]]
    agent = Agent.load(llm, device, BF16)  # as notebook 07 loads it for proposals, then trains it with LoRA
    base = {name: t.detach().to("cpu", copy=True) for name, t in agent.model.state_dict().items()}
    seen = _dtypes_while_training(monkeypatch)
    settings = {key: value for key, value in _trainer_settings(device, tmp_path).items() if key != "output_dir"}
    counts = train_agent(agent.model, agent.tokenizer, build_rrhf_dataset(rows), tmp_path / "model", **settings,
                         use_lora=True, lora_r=4, lora_alpha=8,
                         lora_target_modules=["q_proj", "v_proj"], gradient_checkpointing=True)
    assert seen == {"trainable": {torch.float32}, "frozen": {BF16}, "device": device}
    assert counts["steps"] == 2 and math.isfinite(counts["first_loss"]) and math.isfinite(counts["last_loss"])
    dtypes, changed = _saved_changes(tmp_path / "model", base)
    assert dtypes == {BF16} and changed and all(name.endswith(ADAPTED) for name in changed)


def test_an_agent_answers_in_bf16_on_the_runs_device(llm, device, tmp_path):
    from helpers.agent import Agent, ApiCallCache

    agent = Agent.load(llm, device, BF16)
    assert {p.dtype for p in agent.model.parameters()} == {BF16}
    assert {p.device.type for p in agent.model.parameters()} == {device}
    cache = ApiCallCache(tmp_path / "calls.jsonl")
    answers = agent.api_calls(["a fox", "a heron over a lake at dusk"], max_new_tokens=6, batch_size=2, cache=cache,
                              progress=False)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert agent.api_calls(["a fox"], max_new_tokens=6, cache=cache, progress=False) == answers[:1]  # cached


def test_model_tokens_train_fp32_rows_on_a_frozen_bf16_lm(llm, device):
    from helpers.chatgen.model_tokens import ModelTokenHead, select_models, train_model_tokens

    names = ["RealPhoto XL", "AnimeMix"]
    examples = [{"messages": [{"role": "user", "content": f"{opener} {style} of a cat"}], "prompt": "a cat",
                 "model": model}
                for opener in ["please make", "show me", "i want"]
                for style, model in [("a photo", "RealPhoto XL"), ("an anime drawing", "AnimeMix")]]
    head, tokenizer = ModelTokenHead.from_base(llm, names, device, BF16)
    frozen = {name: t.detach().clone() for name, t in head.model.state_dict().items()}
    assert head.rows.dtype == torch.float32 and head.rows.device.type == device
    assert {p.dtype for p in head.model.parameters()} == {BF16}
    rows = head.rows.detach().clone()
    log = train_model_tokens(head, tokenizer, examples, steps=3, lr=0.05, batch_size=4, seed=0, progress=False)
    assert all(math.isfinite(row["loss"]) for row in log)
    assert not torch.equal(head.rows.detach(), rows)
    assert all(torch.equal(t, frozen[name]) for name, t in head.model.state_dict().items())
    assert set(select_models(head, tokenizer, examples, batch_size=3)) <= set(names)


def test_diffusion_dpo_trains_an_fp32_unet_under_bf16_autocast_with_checkpointing(device, tmp_path):
    from diffusers import DiffusionPipeline

    from helpers.diffusion_dpo import DiffusionDPOConfig, DiffusionDPOTrainer

    models.build_tiny_stable_diffusion(tmp_path / "sd", seed=0, resolution=32)
    pipeline = DiffusionPipeline.from_pretrained(tmp_path / "sd").to(device)  # as notebook 13 loads its base
    pipeline.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    image = lambda: Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8))  # noqa: E731
    pairs = [{"prompt": f"a cat number {i}", "chosen": image(), "rejected": image()} for i in range(2)]
    before = {name: t.detach().clone() for name, t in pipeline.unet.state_dict().items()}
    config = DiffusionDPOConfig(learning_rate=1e-3, train_batch_size=2, max_steps=2, resolution=32, logging_steps=1,
                                output_dir=str(tmp_path / "unet"), mixed_precision="bf16",
                                gradient_checkpointing=True)
    trainer = DiffusionDPOTrainer(pipeline, config, pairs)
    assert trainer.autocast_dtype == (BF16 if device == "cuda" else None)  # CPU: no autocast, fp32 throughout
    log = trainer.train()
    assert len(log) == 2 and all(math.isfinite(row["loss"]) for row in log)
    assert {p.dtype for p in trainer.trainable} == {torch.float32}
    assert any(not torch.equal(t, before[name]) for name, t in pipeline.unet.state_dict().items())
    assert all(torch.equal(t, before[name]) for name, t in trainer.reference_unet.state_dict().items())


@pytest.mark.parametrize("name", ["clip", "hps", "image_reward", "aesthetic"])
def test_reward_scores_in_bf16_are_the_fp32_scores_to_bf16_precision(device, name, tmp_path):
    """The scorers `scoring.load_scorer` loads in the run's dtype on a GPU (cosines and rewards of order 0.1-1)."""
    from helpers.scorers import aesthetic, hps, image_reward
    from helpers.scoring import ClipScorer

    build, load = {"clip": (models.build_tiny_clip, lambda *a: ClipScorer(*a).cosine),
                   "hps": (hps.build_tiny_hps, lambda *a: hps.load_hps(*a).score),
                   "image_reward": (image_reward.build_tiny_image_reward,
                                    lambda *a: image_reward.load_image_reward(*a).score),
                   "aesthetic": (aesthetic.build_tiny_aesthetic,
                                 lambda *a: lambda images, _: aesthetic.load_aesthetic(*a).score(images))}[name]
    build(tmp_path / name, seed=0)
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(4)]
    prompts = ["a red fox", "a blue whale", "a castle", "a bowl of soup"]
    full = load(str(tmp_path / name), device, torch.float32)(images, prompts)
    half = load(str(tmp_path / name), device, BF16)(images, prompts)
    assert half.shape == full.shape == (4,) and np.isfinite(half).all()
    np.testing.assert_allclose(half, full, atol=0.02)  # bf16 keeps ~3 significant digits


@pytest.mark.parametrize("text_model", ["llama", "t5"])  # t5: encoder-decoder, as the paper's Flan-T5 BLIP-2
def test_blip2_answers_in_bf16_as_in_fp32_to_bf16_precision(device, text_model, tmp_path):
    from helpers.scorers import vqa

    vqa.build_tiny_vqa(tmp_path / "vqa", seed=0, text_model=text_model)
    rng = np.random.default_rng(2)
    images = [Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)) for _ in range(3)]
    questions = ["is there a cat?", "is the sky blue?", "red?"]
    assert vqa.vqa_dtype(BF16) == BF16 and vqa.vqa_dtype(torch.float16) == torch.float32
    full = vqa.load_vqa(tmp_path / "vqa", device, torch.float32).yes_probability(images, questions)
    half = vqa.load_vqa(tmp_path / "vqa", device, BF16).yes_probability(images, questions)
    assert np.isfinite(half).all()
    np.testing.assert_allclose(half, full, atol=0.03)


def test_chatgen_image_text_sft_trains_fp32_weights_under_bf16_autocast_with_checkpointing(llm, device, tmp_path):
    from safetensors.torch import load_file

    from helpers.chatgen import evo
    from helpers.chatgen.vlm import build_tiny_vlm

    build_tiny_vlm(tmp_path / "vlm", llm, seed=0)
    before = load_file(tmp_path / "vlm" / "model.safetensors")
    rng = np.random.default_rng(3)
    chats = [[{"role": "user", "content": f"make it look like this, with a {animal}"},
              {"role": "assistant", "content": f"a {animal}, watercolour, soft light"}] for animal in ["fox", "owl"]]
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)), None]
    result = evo.train_vlm_sft(str(tmp_path / "vlm"), chats, images, tmp_path / "model", steps=2, lr=1e-2,
                               batch_size=2, use_cpu=device == "cpu", disable_tqdm=True, bf16=True,
                               gradient_checkpointing=True)
    assert result["steps"] == 2 and math.isfinite(result["first_loss"]) and math.isfinite(result["last_loss"])
    after = load_file(tmp_path / "model" / "model.safetensors")
    assert {t.dtype for t in after.values()} == {torch.float32}  # AdamW updated fp32 weights
    assert any(not torch.equal(t, before[name]) for name, t in after.items() if name in before)


def test_images_drawn_in_bf16_are_the_fp32_images_to_within_a_level(device, tmp_path):
    """From the same starting noise (drawn in fp32: torch 2.11's CPU randn draws other numbers in bf16) and the tiny
    pipeline's deterministic PNDM sampler."""
    models.build_tiny_stable_diffusion(tmp_path / "sd", seed=0)
    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    drawn = {}
    for dtype in (torch.float32, BF16):
        pipeline = models.load_sd_pipeline(str(tmp_path / "sd"), device, dtype)
        pipeline.set_progress_bar_config(disable=True)
        with torch.inference_mode():
            drawn[dtype] = pipeline(["a red fox", "a blue whale"], negative_prompt=[""] * 2, num_inference_steps=3,
                                    guidance_scale=7.0, width=64, height=64,
                                    latents=noise.to(device, dtype)).images
    for full, half in zip(drawn[torch.float32], drawn[BF16]):
        full, half = np.asarray(full, dtype=int), np.asarray(half, dtype=int)
        assert full.std() > 10 and np.abs(full - half).mean() < 3  # a picture, not a flat or NaN-black one


def test_scores_in_bf16_are_cached_apart_from_fp32_scores(tmp_path):
    """Every scorer's cache identity names the dtype it scores in where that is not fp32, so a score cache that a
    fp32 and a bf16 run share never hands one the other's values; fp32 ids are the bare weights ids caches always
    held; a BLIP-2 loaded on first use is cached under the id the loaded one has."""
    from helpers.scorers import aesthetic, base, hps, image_reward, vqa
    from helpers.scoring import ClipScorer, ScoreCache

    assert base.precision_id("clip@abc", None) == base.precision_id("clip@abc", torch.float32) == "clip@abc"
    assert base.precision_id("clip@abc", BF16) == "clip@abc#bfloat16"
    builds = {"clip": (models.build_tiny_clip, ClipScorer), "hps": (hps.build_tiny_hps, hps.load_hps),
              "image_reward": (image_reward.build_tiny_image_reward, image_reward.load_image_reward),
              "aesthetic": (aesthetic.build_tiny_aesthetic, aesthetic.load_aesthetic),
              "vqa": (vqa.build_tiny_vqa, vqa.load_vqa)}
    ids = {}
    for name, (build, load) in builds.items():
        build(tmp_path / name, seed=0)
        ids[name] = [load(str(tmp_path / name), "cpu", dtype).weights_id for dtype in (None, torch.float32, BF16)]
        assert ids[name][0] == ids[name][1] and ids[name][2] == ids[name][0] + "#bfloat16", name
    assert ids["vqa"][0] == vqa.vqa_weights_id(tmp_path / "vqa")
    deferred = [vqa.load_vqa_on_use(tmp_path / "vqa", "cpu", dtype) for dtype in (torch.float32, BF16)]
    assert [lazy.weights_id for lazy in deferred] == ids["vqa"][1:] and not any(lazy.loaded for lazy in deferred)
    cache = ScoreCache(tmp_path / "scores.jsonl")
    cache.put_many([("image", "clip", ids["clip"][1], 31.5)])
    assert ScoreCache(tmp_path / "scores.jsonl").get("image", "clip", ids["clip"][2]) is None
