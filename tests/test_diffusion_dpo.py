"""Diffusion-DPO: the loss against hand-worked values, and one or two steps on tiny SD and SDXL pipelines."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import said
from helpers import models
from helpers.diffusion_dpo import (DiffusionDPOConfig, DiffusionDPOTrainer, diffusion_dpo_loss, per_sample_mse,
                                   preprocess_image, require_pairs)


# ----------------------------------------------------------------------------------------------- the loss

def test_loss_is_log2_when_model_equals_reference():
    errors = torch.tensor([0.3, 1.2, 0.7])
    loss, accuracy = diffusion_dpo_loss(errors, errors.flip(0), errors, errors.flip(0))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert accuracy.item() == 0.0  # inside = 0 is not > 0


def test_loss_hand_worked():
    # inside = −2/2 · ((1 − 2) − (3 − 2)) = 2; loss = −log σ(2) = log(1 + e^−2)
    loss, accuracy = diffusion_dpo_loss(torch.tensor([1.0]), torch.tensor([3.0]), torch.tensor([2.0]),
                                        torch.tensor([2.0]), beta=2.0)
    assert loss.item() == pytest.approx(0.126928, abs=1e-6)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-2.0)), rel=1e-6)
    assert accuracy.item() == 1.0


def test_loss_is_the_batch_mean():
    model_w, model_l = torch.tensor([1.0, 3.0, 2.0]), torch.tensor([3.0, 1.0, 2.0])
    reference = torch.full((3,), 2.0)
    loss, accuracy = diffusion_dpo_loss(model_w, model_l, reference, reference, beta=2.0)
    # insides: 2 (winner denoised better), −2 (worse), 0 (tie)
    expected = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(2.0)) + math.log(2)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert accuracy.item() == pytest.approx(1 / 3)


def test_loss_gradient_rewards_denoising_the_winner():
    model_w, model_l = torch.tensor([0.5], requires_grad=True), torch.tensor([0.5], requires_grad=True)
    ref_w, ref_l = torch.tensor([0.5], requires_grad=True), torch.tensor([0.5], requires_grad=True)
    loss, _ = diffusion_dpo_loss(model_w, model_l, ref_w, ref_l, beta=2.0)
    loss.backward()
    # d loss / d model_w = β/2 · σ(−inside) = 0.5 at inside = 0: lowering the winner's error lowers the loss
    assert model_w.grad.item() == pytest.approx(0.5) and model_l.grad.item() == pytest.approx(-0.5)
    assert ref_w.grad is None and ref_l.grad is None  # the reference is a constant
    lower, _ = diffusion_dpo_loss(model_w.detach() - 0.1, model_l.detach(), ref_w.detach(), ref_l.detach(), beta=2.0)
    assert lower.item() < loss.item()


@pytest.mark.parametrize("shapes, message", [
    (((2,), (3,), (2,), (2,)), "same shape"),
    (((2, 1), (2, 1), (2, 1), (2, 1)), "1-D"),
])
def test_loss_rejects_bad_shapes(shapes, message):
    with pytest.raises(ValueError, match=message):
        diffusion_dpo_loss(*(torch.zeros(shape) for shape in shapes))


def test_loss_rejects_bad_beta():
    with pytest.raises(ValueError, match="beta=0"):
        diffusion_dpo_loss(*(torch.zeros(2) for _ in range(4)), beta=0)


def test_per_sample_mse_means_over_all_but_the_batch():
    pred = torch.zeros(2, 2, 1, 2)
    target = torch.tensor([[[[1.0, 1.0]], [[1.0, 1.0]]], [[[2.0, 0.0]], [[0.0, 0.0]]]])
    assert per_sample_mse(pred, target).tolist() == pytest.approx([1.0, 1.0])
    assert per_sample_mse(pred.bfloat16(), target).dtype == torch.float32
    with pytest.raises(ValueError, match="same shape"):
        per_sample_mse(pred, target[:1])


def test_preprocess_image_resizes_the_short_side_and_crops_the_centre():
    image = Image.fromarray(np.full((40, 60, 3), 255, dtype=np.uint8))  # height 40, width 60
    pixels, original_size, crop = preprocess_image(image, 32)
    assert pixels.shape == (3, 32, 32) and original_size == (40, 60)
    assert crop == (0, 8)  # 60 px wide → 48 after resizing; (48 − 32) / 2 from the left
    assert torch.allclose(pixels, torch.ones_like(pixels))  # white → +1


# ----------------------------------------------------------------------------------------------- config

@pytest.mark.parametrize("kwargs, message", [
    ({"beta": -1.0}, "beta=-1.0"),
    ({"learning_rate": 0.0}, "learning_rate=0.0"),
    ({"train_batch_size": 0}, "train_batch_size=0"),
    ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps=0"),
    ({"max_steps": 0}, "max_steps=0"),
    ({"logging_steps": 0}, "logging_steps=0"),
    ({"resolution": 30}, "resolution=30"),
    ({"max_grad_norm": 0.0}, "max_grad_norm=0.0"),
    ({"mixed_precision": "fp8"}, "mixed_precision='fp8'.*no, bf16, fp16"),
    ({"reference": "ema"}, "reference='ema'.*copy, lora-disabled"),
    ({"lora_r": 0}, "lora_r=0"),
    ({"prefetch": -1}, "prefetch=-1"),
    ({"save_steps": -2}, "save_steps=-2"),
])
def test_config_errors_name_the_bad_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DiffusionDPOConfig(**kwargs)


# ----------------------------------------------------------------------------------------- tiny pipelines

@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_sd")
    models.build_tiny_stable_diffusion(folder, seed=0, resolution=32)
    return folder


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_sdxl")
    models.build_tiny_stable_diffusion_xl(folder, seed=0, resolution=32)
    return folder


def load(folder):
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(folder)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def pairs(num_pairs: int = 2, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    image = lambda: Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8))  # noqa: E731
    return [{"prompt": f"a photo of a cat number {i}", "chosen": image(), "rejected": image()}
            for i in range(num_pairs)]


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def unchanged(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = module.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[name], before[name]) for name in before)


def tiny_config(tmp_path, **kwargs) -> DiffusionDPOConfig:
    defaults = dict(learning_rate=1e-3, train_batch_size=2, max_steps=1, resolution=32, logging_steps=1,
                    output_dir=str(tmp_path / "unet"))
    return DiffusionDPOConfig(**{**defaults, **kwargs})


def test_one_step_trains_the_unet_and_freezes_the_rest(sd_folder, tmp_path):
    from diffusers import UNet2DConditionModel

    pipeline = load(sd_folder)
    unet_before, vae_before = snapshot(pipeline.unet), snapshot(pipeline.vae)
    text_before = snapshot(pipeline.text_encoder)
    trainer = DiffusionDPOTrainer(pipeline, tiny_config(tmp_path), pairs())
    log = trainer.train()

    assert [row["step"] for row in log] == [1]
    assert math.isfinite(log[0]["loss"]) and 0.0 <= log[0]["implicit_accuracy"] <= 1.0
    # at step 0 the model is the reference: inside = 0 for every pair, so the loss is log 2, up to float rounding
    # of the two forwards (~1e-7 in a squared error) that β/2 = 2500 magnifies (1.5e-4 measured on one thread)
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert log[0]["model_mse_w"] == pytest.approx(log[0]["ref_mse_w"], abs=1e-6)
    assert not unchanged(pipeline.unet, unet_before)
    assert unchanged(trainer.reference_unet, unet_before)
    assert unchanged(pipeline.vae, vae_before) and unchanged(pipeline.text_encoder, text_before)

    saved = UNet2DConditionModel.from_pretrained(trainer.save())
    assert all(torch.equal(tensor, pipeline.unet.state_dict()[name]) for name, tensor in saved.state_dict().items())
    # the saved config names the base by its folder, not by an absolute path that differs between clones
    written = json.loads((Path(tiny_config(tmp_path).output_dir) / "config.json").read_text())
    assert written["_name_or_path"] == f"{Path(sd_folder).name}/unet" and str(sd_folder) not in json.dumps(written)


def test_second_step_moves_the_loss_away_from_log2(sd_folder, tmp_path):
    pipeline = load(sd_folder)
    trainer = DiffusionDPOTrainer(pipeline, tiny_config(tmp_path, max_steps=2, gradient_accumulation_steps=2,
                                                        train_batch_size=1, beta=5000.0), pairs())
    log = trainer.train()
    assert [row["step"] for row in log] == [1, 2]
    # step 1 is log 2 up to rounding, which β/2 = 2500 magnifies (the policy's forward runs with autograd, the
    # reference's without, and their float sums may differ in the last bit); step 2 moves far beyond that
    first, second = (abs(row["loss"] - math.log(2)) for row in log)
    assert first < 1e-3 and math.isfinite(log[1]["loss"]) and second > 10 * max(first, 1e-4)


def test_lora_reference_trains_only_the_adapters(sd_folder, tmp_path):
    from diffusers import UNet2DConditionModel

    pipeline = load(sd_folder)
    base_before = snapshot(pipeline.unet)
    trainer = DiffusionDPOTrainer(pipeline, tiny_config(tmp_path, reference="lora-disabled", lora_r=2,
                                                        gradient_checkpointing=True), pairs())
    assert trainer.reference_unet is None
    lora_before = {name: p.detach().clone() for name, p in pipeline.unet.named_parameters() if "lora_" in name}
    assert lora_before and all("lora_" in name for name, p in pipeline.unet.named_parameters() if p.requires_grad)
    log = trainer.train()

    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # B starts at zero: the adapter is the identity
    after = dict(pipeline.unet.named_parameters())
    assert any(not torch.equal(after[name], value) for name, value in lora_before.items())
    # base weights now sit under peft's `base_layer`; every one of them is bit-identical
    base_after = {name.replace(".base_layer", ""): tensor for name, tensor in pipeline.unet.state_dict().items()
                  if "lora_" not in name}
    assert base_after.keys() == base_before.keys()
    assert all(torch.equal(base_after[name], base_before[name]) for name in base_before)

    merged = UNet2DConditionModel.from_pretrained(trainer.save())
    assert not any("lora" in name for name in merged.state_dict())
    assert any(not torch.equal(tensor, base_before[name]) for name, tensor in merged.state_dict().items())


def test_lora_adapters_start_from_the_config_seed_whatever_ran_before(sd_folder, tmp_path):
    """A run that found its images in a cache draws fewer random numbers before training than one that drew them:
    the adapters must not depend on that, nor move the caller's random state."""
    adapters = []
    for earlier_draws, seed in ((0, 0), (5, 0), (0, 1)):
        torch.manual_seed(123)
        torch.rand(earlier_draws)
        state = torch.get_rng_state()
        pipeline = load(sd_folder)
        DiffusionDPOTrainer(pipeline, tiny_config(tmp_path, reference="lora-disabled", lora_r=2, seed=seed), pairs())
        assert torch.equal(torch.get_rng_state(), state)
        adapters.append({name: p.detach().clone() for name, p in pipeline.unet.named_parameters() if "lora_A" in name})
    assert adapters[0] and all(torch.equal(adapters[0][name], adapters[1][name]) for name in adapters[0])
    assert not all(torch.equal(adapters[0][name], adapters[2][name]) for name in adapters[0])  # the seed matters


def test_sdxl_runs_one_step(sdxl_folder, tmp_path):
    from datasets import Dataset, Features, Image as ImageFeature, Value

    pipeline = load(sdxl_folder)
    dataset = Dataset.from_list(pairs(), features=Features({"prompt": Value("string"), "chosen": ImageFeature(),
                                                            "rejected": ImageFeature()}))
    trainer = DiffusionDPOTrainer(pipeline, tiny_config(tmp_path), dataset)
    assert trainer.is_sdxl
    log = trainer.train()
    # model = reference, so log 2 up to rounding: β/2 = 2500 turns a 1-ulp difference between the UNet with
    # gradients and the frozen copy (another CPU kernel) into ~1e-4 of loss
    assert math.isfinite(log[0]["loss"]) and log[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)


def test_trainer_rejects_rows_without_pairs(sd_folder, tmp_path):
    with pytest.raises(ValueError, match="rejected"):
        DiffusionDPOTrainer(load(sd_folder), tiny_config(tmp_path), [{"prompt": "a cat", "chosen": None}])


def test_winner_and_loser_share_noise_and_timestep(sd_folder, tmp_path):
    trainer = DiffusionDPOTrainer(load(sd_folder), tiny_config(tmp_path, train_batch_size=3), pairs(3))
    batch = trainer._batch(trainer._next_rows())
    assert torch.equal(batch["timesteps"][:3], batch["timesteps"][3:])
    assert torch.equal(batch["target"][:3], batch["target"][3:])  # epsilon prediction: the target is the noise
    assert not torch.equal(batch["noisy"][:3], batch["noisy"][3:])  # ... added to different images
    hidden = batch["conditioning"]["encoder_hidden_states"]
    assert torch.equal(hidden[:3], hidden[3:])


def test_v_prediction_targets_the_velocity(sd_folder, tmp_path):
    from diffusers import DDPMScheduler

    pipeline = load(sd_folder)
    pipeline.scheduler = DDPMScheduler.from_config(pipeline.scheduler.config, prediction_type="v_prediction")
    trainer = DiffusionDPOTrainer(pipeline, tiny_config(tmp_path), pairs())
    batch = trainer._batch(trainer._next_rows())
    # v = √ᾱ·ε − √(1−ᾱ)·x0 differs between winner and loser even though ε is shared
    assert not torch.equal(batch["target"][:2], batch["target"][2:])
    assert trainer.train()[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)


def test_prefetched_micro_batches_train_exactly_as_prepared_in_turn(sd_folder, tmp_path, monkeypatch):
    """Images are read and resized in background threads ahead of the step that uses them; what each step sees,
    and so the trained weights, are the same as without prefetching, and the threads run ahead of the steps."""
    import threading

    from datasets import Dataset, Features, Image as ImageFeature, Value

    rows = Dataset.from_list(pairs(5), features=Features({"prompt": Value("string"), "chosen": ImageFeature(),
                                                         "rejected": ImageFeature()}))  # images decoded on read
    settings = dict(max_steps=3, train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-3)
    logs, weights, threads = {}, {}, {}
    prepare = DiffusionDPOTrainer._prepare
    for prefetch in (0, 2):
        names = threads.setdefault(prefetch, set())
        monkeypatch.setattr(DiffusionDPOTrainer, "_prepare",
                            lambda self, rows: names.add(threading.current_thread().name) or prepare(self, rows))
        pipeline = load(sd_folder)
        logs[prefetch] = DiffusionDPOTrainer(pipeline, tiny_config(tmp_path / str(prefetch), prefetch=prefetch,
                                                                   **settings), rows).train()
        weights[prefetch] = pipeline.unet.state_dict()
    assert logs[2] == logs[0] and len(logs[0]) == 3
    assert all(torch.equal(weights[2][name], tensor) for name, tensor in weights[0].items())
    assert threads[0] == {threading.main_thread().name}
    assert threads[2] and all(name.startswith("dpo-prefetch") for name in threads[2])


def test_each_training_image_goes_through_the_vae_once_for_every_epoch_and_model(sd_folder, tmp_path):
    """With a posterior cache, 3 pairs over ~3 epochs encode their 6 images once; a second model on the same
    images encodes none; the training is the one without a cache, and another VAE never reads those posteriors."""
    settings = dict(max_steps=4, train_batch_size=2, learning_rate=1e-3)
    plain_pipeline = load(sd_folder)
    plain = DiffusionDPOTrainer(plain_pipeline, tiny_config(tmp_path / "plain", **settings), pairs(3))
    plain_log = plain.train()
    assert plain.encoded == 4 * 2 * 2  # every pair of every step, both images, each time

    cache = tmp_path / "posteriors"
    pipeline = load(sd_folder)
    first = DiffusionDPOTrainer(pipeline, tiny_config(tmp_path / "first", posterior_cache=str(cache), **settings),
                                pairs(3))
    assert first.train() == plain_log
    for name, tensor in plain_pipeline.unet.state_dict().items():
        torch.testing.assert_close(pipeline.unet.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    written = lambda: len(list(first.posteriors.folder.glob("*/*.safetensors")))  # noqa: E731
    assert first.encoded == 6 and written() == 6

    second = DiffusionDPOTrainer(load(sd_folder), tiny_config(tmp_path / "second", posterior_cache=str(cache),
                                                              learning_rate=5e-4, max_steps=2, train_batch_size=2),
                                 pairs(3))
    second.train()
    assert second.encoded == 0 and written() == 6

    other_vae = load(sd_folder)
    with torch.no_grad():
        next(other_vae.vae.parameters()).add_(0.01)
    other = DiffusionDPOTrainer(other_vae, tiny_config(tmp_path / "other", posterior_cache=str(cache), **settings),
                                pairs(3))
    assert other.posteriors.folder != first.posteriors.folder
    other.train()
    assert other.encoded == 6


def test_an_image_in_two_pairs_of_a_micro_batch_is_encoded_once(sd_folder, tmp_path):
    """Pairs 0 and 1 share their winner: with a posterior cache the micro-batch encodes 3 images, not 4, and the
    step is the one that encodes all 4 (the same posterior, so the same latents and loss)."""
    rows = pairs(2)
    rows[1]["chosen"] = rows[0]["chosen"].copy()
    settings = dict(max_steps=1, train_batch_size=2, learning_rate=1e-3)
    plain = DiffusionDPOTrainer(load(sd_folder), tiny_config(tmp_path / "plain", **settings), rows)
    plain_log = plain.train()
    assert plain.encoded == 4
    cached = DiffusionDPOTrainer(load(sd_folder), tiny_config(tmp_path / "cached", posterior_cache=str(
        tmp_path / "posteriors"), **settings), rows)
    assert cached.train() == plain_log
    assert cached.encoded == 3 and len(list(cached.posteriors.folder.glob("*/*.safetensors"))) == 3


# ------------------------------------------------------------------------------------------ resume points

class Crash(RuntimeError):
    pass


def crash_after(trainer, steps: int) -> None:
    """Make `trainer.train()` stop (as a killed run would) once it has finished `steps` optimizer steps."""
    save = trainer.save_checkpoint

    def saving_then_crashing(*args, **kwargs):
        saved = save(*args, **kwargs)
        if trainer.global_step >= steps:
            raise Crash(f"stopped after step {trainer.global_step}")
        return saved

    trainer.save_checkpoint = saving_then_crashing


def test_a_run_resumed_from_its_resume_point_equals_one_that_never_stopped(sd_folder, tmp_path, capsys):
    # 5 pairs, 2 per step: the stream crosses an epoch (a fresh shuffle) before and after the resume point;
    # Adam's moments, the step count and the log accumulators (logged every 3 steps) must all carry over
    settings = dict(max_steps=5, train_batch_size=2, logging_steps=3, learning_rate=1e-3)
    whole_pipeline = load(sd_folder)
    whole = DiffusionDPOTrainer(whole_pipeline, tiny_config(tmp_path / "whole", **settings), pairs(5))
    whole_log = whole.train()

    config = tiny_config(tmp_path / "stopped", save_steps=2, **settings)
    first = DiffusionDPOTrainer(load(sd_folder), config, pairs(5))
    crash_after(first, 4)
    with pytest.raises(Crash):
        first.train()
    assert [p.name for p in first.checkpoints.glob("step-*")] == ["step-0000004"]  # the newest only
    pipeline = load(sd_folder)  # a new process: the base weights again, then the resume point
    again = DiffusionDPOTrainer(pipeline, config, pairs(5))
    log = again.train()
    assert "resumed from" in capsys.readouterr().out and again.global_step == 5
    assert log == whole_log and [row["step"] for row in log] == [3, 5]
    for name, tensor in whole_pipeline.unet.state_dict().items():
        torch.testing.assert_close(pipeline.unet.state_dict()[name], tensor, rtol=0, atol=0, msg=name)


def test_a_resume_point_of_other_settings_or_pairs_is_not_continued(sd_folder, tmp_path, capsys):
    config = tiny_config(tmp_path, save_steps=1, max_steps=2)
    DiffusionDPOTrainer(load(sd_folder), config, pairs(2)).train()
    assert (tmp_path / "unet" / "checkpoints" / "step-0000002").is_dir()
    longer = DiffusionDPOTrainer(load(sd_folder), tiny_config(tmp_path, save_steps=1, max_steps=3), pairs(2))
    assert len(longer.train()) == 3 and "resumed from" in capsys.readouterr().out  # more steps: the same run
    longer_config = tiny_config(tmp_path, save_steps=1, max_steps=3)
    # other pairs under the same settings, then other settings on those pairs: each starts from step 0
    for changed, rows in ((longer_config, pairs(2, seed=1)),
                          (tiny_config(tmp_path, save_steps=1, max_steps=3, learning_rate=2e-3), pairs(2, seed=1))):
        log = DiffusionDPOTrainer(load(sd_folder), changed, rows).train()
        out = said(capsys.readouterr().out)
        assert "resume points of other training" in out and "resumed from" not in out
        assert [row["step"] for row in log] == [1, 2, 3]


def test_a_finished_model_is_kept_by_a_rerun_and_its_resume_points_removed(sd_folder, tmp_path, monkeypatch,
                                                                           capsys):
    from helpers import config as book_config
    from helpers import diffusion_dpo

    ctx = book_config.setup("tiny", 0, quiet=True)
    out = tmp_path / "aligned"
    settings = tiny_config(tmp_path, output_dir=str(out), save_steps=1, max_steps=2)
    log = diffusion_dpo.train_variant(ctx, str(sd_folder), pairs(2), settings, out)
    assert (out / "trained.json").is_file() and (out / "pipeline").is_dir()
    assert not (out / "checkpoints").exists()  # done: its resume points are gone
    monkeypatch.setattr(DiffusionDPOTrainer, "train", lambda self: pytest.fail("trained again"))
    assert diffusion_dpo.train_variant(ctx, str(sd_folder), pairs(2), settings, out) == log
    assert "kept" in capsys.readouterr().out
    monkeypatch.undo()
    other = diffusion_dpo.train_variant(ctx, str(sd_folder), pairs(2), tiny_config(
        tmp_path, output_dir=str(out), save_steps=1, max_steps=2, learning_rate=5e-3), out)
    assert other != log  # other settings: trained afresh


def test_ablation_variants_without_pairs_are_named_with_their_weights():
    variants = {"VQA only": (1.0, 0.0, 0.0), "CLIP only": (0.0, 1.0, 0.0), "mix": (0.35, 0.55, 0.1)}
    require_pairs({"VQA only": [{"prompt": "a"}], "CLIP only": [{"prompt": "a"}], "mix": [{"prompt": "a"}]}, variants)
    with pytest.raises(ValueError, match=r"'VQA only' \(weights 1,0,0\), 'mix' \(weights 0.35,0.55,0.1\);.*ablation"):
        require_pairs({"VQA only": [], "CLIP only": [{"prompt": "a"}], "mix": []}, variants)


def test_training_that_runs_out_of_gpu_memory_names_the_recipe_setting_to_change(sd_folder, tmp_path, monkeypatch):
    from helpers import config as book_config
    from helpers import diffusion_dpo

    def out_of_memory(self, rows):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 6.00 GiB")
    monkeypatch.setattr(DiffusionDPOTrainer, "compute_loss", out_of_memory)
    ctx = book_config.setup("tiny", 0, quiet=True)
    settings = tiny_config(tmp_path, gradient_accumulation_steps=3)
    with pytest.raises(torch.OutOfMemoryError, match=r"Diffusion-DPO ran out of GPU memory with 2 examples per "
                                                     r"forward pass \(3 passes per optimizer step\): give the "
                                                     r"notebook 1 example per pass .* each optimizer step still "
                                                     r"sees 6, in 6 passes"):
        diffusion_dpo.train_variant(ctx, str(sd_folder), pairs(2), settings, tmp_path / "aligned")
