import http.server
import json
import logging
import os
import random
import shutil
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import said
from helpers import config, t2i


def _record(name, kind, arch, version, lora_base=None, images=1):
    return {"api": {"model": name, "type": kind, "model_description": f"{name} draws things."}, "architecture": arch,
            "model_id": version // 10, "model_version_id": version,
            "lora_base": {"model_id": 1, "model_version_id": lora_base, "model": "AlphaMix"} if lora_base else None}


RECORDS = [_record("AlphaMix", "Checkpoint", "SD 1.5", 11), _record("AlphaMix", "Checkpoint", "SD 1.5", 11),
           _record("InkStyle", "LORA", "SD 1.5", 21, lora_base=11), _record("BetaXL", "Checkpoint", "SDXL 1.0", 31),
           _record("Twin", "Checkpoint", "SD 1.5", 41), _record("Twin", "Checkpoint", "SDXL 1.0", 42)]


@pytest.fixture(scope="module")
def catalog():
    return t2i.ModelCatalog.from_records(RECORDS)


@pytest.fixture(scope="module")
def run_ctx(tmp_path_factory):
    root = tmp_path_factory.mktemp("book")
    (root / "notebooks").mkdir()
    import shutil

    shutil.copytree(Path(__file__).resolve().parents[1] / "configs", root / "configs")
    (root / "_toc.yml").write_text("format: jb-book\nroot: book/intro\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("T2IBOOK_ROOT", str(root))
        patch.delenv("T2IBOOK_FORCE", raising=False)
        yield config.setup("tiny", 0, quiet=True)


@pytest.fixture(scope="module")
def executor(run_ctx, catalog):
    return t2i.Executor.for_run(run_ctx, catalog, max_side=32, batch_size=4)


def api(model="AlphaMix", base="SD 1.5", kind="Checkpoint", **overrides):
    call = {"model": model, "type": kind, "base_model": base, "width": 512, "height": 768, "sampling_method": "Euler a",
            "sampling_steps": 4, "cfg_scale": 7.0, "model_description": "x"}
    return {**call, **overrides}


# ------------------------------------------------------------------------------------------ validation

@pytest.mark.parametrize("output, category", [
    ("Sure! Here it is: ```json\n" + json.dumps(api()) + "\n```", None),
    ('{"model": "AlphaMix", "width": 512', "unparseable"),
    ("no json at all", "unparseable"),
    (json.dumps({k: v for k, v in api().items() if k != "sampling_steps"}), "unparseable"),
    (json.dumps(api(width="wide")), "unparseable"),
    (json.dumps(api(model="GammaMix")), "unknown_model"),
    (json.dumps(api(base="SDXL 1.0")), "base_model_mismatch"),
    (json.dumps(api(sampling_method="Euler z")), "unknown_sampler"),
    (json.dumps(api(width=500)), "bad_size"),
    (json.dumps(api(height=4096)), "bad_size"),
    (json.dumps(api(sampling_steps=0)), "steps_out_of_range"),
    (json.dumps(api(cfg_scale=31)), "cfg_out_of_range"),
])
def test_validate_names_the_first_failure(output, category, catalog):
    result = t2i.validate(output, catalog)
    assert result.category == category, result.detail
    assert result.ok == (category is None)


def test_validate_rebuilds_the_call_from_the_catalog(catalog):
    result = t2i.validate({**api(kind="LORA", width="512", sampling_steps=20.0), "model_description": "made up"},
                          catalog)
    assert result.ok
    assert result.api["type"] == "Checkpoint" and result.api["width"] == 512 and result.api["sampling_steps"] == 20
    assert result.api["model_description"] == "AlphaMix draws things."
    assert any("corrected" in note for note in result.notes) and any("as text" in note for note in result.notes)
    twin = t2i.validate(api(model="Twin", base="SDXL 1.0"), catalog)
    assert twin.ok and twin.model.model_version_id == 42  # same name on two architectures: the named one


def test_unknown_model_suggests_close_names(catalog):
    assert "AlphaMix" in t2i.validate(api(model="AlphaMx"), catalog).detail


def test_200_mixed_outputs_are_classified_without_raising(catalog):
    rng = random.Random(0)
    breakers = {
        "unparseable": lambda t: t[: rng.randint(0, len(t) - 2)],
        "unknown_model": lambda t: t.replace('"AlphaMix"', '"AlphaMix Ultra"'),
        "base_model_mismatch": lambda t: t.replace('"SD 1.5"', '"SDXL 1.0"'),
        "unknown_sampler": lambda t: t.replace('"Euler a"', '"Euler b"'),
        "bad_size": lambda t: t.replace('"width": 512', '"width": 513'),
        "steps_out_of_range": lambda t: t.replace('"sampling_steps": 4', '"sampling_steps": 400'),
        "cfg_out_of_range": lambda t: t.replace('"cfg_scale": 7.0', '"cfg_scale": -3'),
    }
    planted, outputs = [], []
    for _ in range(200):
        text = json.dumps(api())
        category = rng.choice([None, *breakers])
        outputs.append(breakers[category](text) if category else text)
        planted.append(category)
    outputs += ["", "null", "[1, 2]", '{"model": null}', "{" * 50, '{"cfg_scale": NaN}']
    planted += ["unparseable"] * 6
    results = [t2i.validate(o, catalog) for o in outputs]
    assert [r.category for r in results] == planted
    assert all(r.detail for r in results if not r.ok)
    table = t2i.hallucination_table(results)
    assert table["count"].sum() == len(outputs) and table.loc["ok", "count"] == planted.count(None)


# ------------------------------------------------------------------------------------------ schedulers

# Written out independently of t2i.SAMPLERS: the diffusers class and settings each A1111 name must get.
EXPECTED = {
    "Euler": ("EulerDiscreteScheduler", {"use_karras_sigmas": False}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
    "PNDM": ("PNDMScheduler", {"skip_prk_steps": True}),
    "LMS": ("LMSDiscreteScheduler", {"use_karras_sigmas": False}),
    "LMS Karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "Heun": ("HeunDiscreteScheduler", {"use_karras_sigmas": False}),
    "DPM2": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": False}),
    "DPM2 Karras": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": False}),
    "DPM2 a Karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                 "use_karras_sigmas": False}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": False}),
    "DPM++ 2M SDE Karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                            "use_karras_sigmas": True}),
    "DPM++ SDE": ("DPMSolverSDEScheduler", {"use_karras_sigmas": False}),
    "DPM++ SDE Karras": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
    "UniPC": ("UniPCMultistepScheduler", {"use_karras_sigmas": False}),
}
SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "skip_prk_steps": True,
                  "steps_offset": 1, "set_alpha_to_one": False, "use_karras_sigmas": True}


@pytest.mark.parametrize("sampler", sorted(EXPECTED))
def test_every_sampler_maps_to_its_scheduler(sampler):
    scheduler = t2i.make_scheduler(sampler, SD15_SCHEDULER)
    class_name, settings = EXPECTED[sampler]
    assert type(scheduler).__name__ == class_name
    for key, value in settings.items():
        assert scheduler.config[key] == value, (sampler, key)
    assert scheduler.config["beta_schedule"] == "scaled_linear" and scheduler.config["beta_end"] == 0.012


def test_expected_table_covers_every_known_sampler():
    from helpers.api_call import KNOWN_SAMPLERS

    assert set(EXPECTED) == set(KNOWN_SAMPLERS)


def test_unknown_sampler_error_lists_the_known_names():
    with pytest.raises(ValueError, match=r"sampler 'Euler z' is not one of: Euler, Euler a, DDIM"):
        t2i.make_scheduler("Euler z", SD15_SCHEDULER)


def test_render_size_keeps_aspect_and_multiples_of_8():
    assert t2i.render_size(512, 768, None) == (512, 768)
    assert t2i.render_size(512, 768, 64) == (40, 64)
    assert t2i.render_size(1216, 832, 64) == (64, 40)  # 43.8 rounds to 40
    assert t2i.render_size(512, 2048, 32) == (8, 32)


def test_default_api_uses_native_size_and_default_parameters(catalog):
    call = t2i.default_api(catalog.lookup("BetaXL"))
    assert (call["width"], call["sampling_method"], call["sampling_steps"], call["cfg_scale"]) == (1024, "Euler a", 20, 7.0)
    assert t2i.validate(call, catalog).ok and t2i.validate(t2i.default_api(catalog.base("SD 1.5")), catalog).ok


# ------------------------------------------------------------------------------------------- executor

def _pixels(generated):
    return np.asarray(generated.image, dtype=np.int16)


def test_cache_hit_generates_nothing(executor):
    requests = [t2i.Request(api(), "a red fox in snow", "blurry", seed) for seed in (1, 2)]
    first = executor.generate(requests + requests[:1], progress=False)  # the repeat is drawn once
    drawn = executor.stats["generated"]
    assert [g.cached for g in first] == [False, False, False] and first[0].key == first[2].key
    again = executor.generate(requests, progress=False)
    assert executor.stats["generated"] == drawn
    assert all(g.cached for g in again)
    assert all(np.array_equal(_pixels(a), _pixels(b)) for a, b in zip(first, again))
    assert first[0].image.size == (24, 32)  # 512×768 drawn at max_side 32
    assert not np.array_equal(_pixels(first[0]), _pixels(first[1]))  # seeds matter


def test_a_lora_changes_its_base_models_output(executor):
    prompt, negative = "an ink drawing of a heron", ""
    base_before = executor.generate([t2i.Request(api(), prompt, negative, 7)], progress=False)[0]
    with_lora = executor.generate([t2i.Request(api("InkStyle", kind="LORA"), prompt, negative, 7)], progress=False)[0]
    assert Path(executor.plan(api("InkStyle", kind="LORA"))[0].path).name == "11"  # runs on its base checkpoint
    assert not np.array_equal(_pixels(base_before), _pixels(with_lora))
    executor.cache.path(base_before.key).unlink()  # draw the base again, after the LoRA was loaded
    base_after = executor.generate([t2i.Request(api(), prompt, negative, 7)], progress=False)[0]
    assert not base_after.cached and np.array_equal(_pixels(base_before), _pixels(base_after))


def test_each_catalog_model_has_its_own_weights_and_sdxl_runs(executor):
    requests = [t2i.Request(api(m, b), "a lighthouse", "", 3) for m, b in
                [("AlphaMix", "SD 1.5"), ("Twin", "SD 1.5"), ("BetaXL", "SDXL 1.0"), ("Twin", "SDXL 1.0")]]
    out = executor.generate(requests, progress=False)
    assert len({g.weights_id for g in out}) == 4
    assert not np.array_equal(_pixels(out[0]), _pixels(out[1]))
    assert out[2].image.size == (24, 32)


def test_interleaved_models_load_each_pipeline_once_per_call(run_ctx, catalog):
    one_pipeline = t2i.Executor.for_run(run_ctx, catalog, max_side=32, batch_size=4, max_pipelines=1)
    one_pipeline.cache = t2i.ImageCache(run_ctx.runs_dir / "interleaved_cache")
    # groups in the order first asked (A, Twin, A with a LoRA) would load A twice with room for one pipeline
    requests = [t2i.Request(api(model, kind=kind), "a tram at night", "", seed) for seed, (model, kind) in enumerate(
        [("AlphaMix", "Checkpoint"), ("Twin", "Checkpoint"), ("InkStyle", "LORA"), ("Twin", "Checkpoint"),
         ("AlphaMix", "Checkpoint")])]
    out = one_pipeline.generate(requests, progress=False)
    assert one_pipeline.stats["pipelines_loaded"] == 2 and one_pipeline.stats["generated"] == 5
    assert [g.request.seed for g in out] == [0, 1, 2, 3, 4]  # handed back in the order asked


def test_batched_images_equal_one_at_a_time(executor, run_ctx, catalog):
    requests = [t2i.Request(api(sampling_method=s), "a bowl of ramen", "", 5) for s in ("DPM++ 2M Karras",)] * 1
    requests += [t2i.Request(api(sampling_method="DPM++ 2M Karras"), f"a bowl of ramen {i}", "", 5 + i)
                 for i in range(1, 4)]
    batched = executor.generate(requests, progress=False)
    single = t2i.Executor.for_run(run_ctx, catalog, max_side=32, batch_size=1)
    single.cache = t2i.ImageCache(run_ctx.runs_dir / "other_cache")
    alone = single.generate(requests, progress=False)
    for a, b in zip(batched, alone):
        assert np.abs(_pixels(a) - _pixels(b)).max() <= 2  # float summation order only


def test_a_step_cap_draws_what_a_call_with_that_many_steps_draws(executor, run_ctx, catalog, monkeypatch):
    capped = t2i.Executor.for_run(run_ctx, catalog, max_side=32, batch_size=4, max_sampling_steps=3)
    capped.cache = t2i.ImageCache(run_ctx.runs_dir / "capped_cache")
    drawn_steps = []
    render = t2i.render
    monkeypatch.setattr(t2i, "render", lambda *a, **k: drawn_steps.append(k["steps"]) or render(*a, **k))
    asks = [t2i.Request(api(sampling_steps=n), "a paper lantern", "", 9) for n in (20, 30, 2)]
    out = capped.generate(asks, progress=False)
    assert drawn_steps == [3, 2]  # 20 and 30 steps above the cap are one image, drawn with 3; 2 stays 2
    assert out[0].key == out[1].key and capped.stats["generated"] == 2
    plain = executor.generate([t2i.Request(api(sampling_steps=n), "a paper lantern", "", 9) for n in (3, 2)],
                              progress=False)
    assert np.array_equal(_pixels(out[0]), _pixels(plain[0]))  # capped at 3 = a 3-step call
    assert out[2].key == plain[1].key  # below the cap the key is the uncapped one: nothing is drawn twice
    with pytest.raises(ValueError, match="max_sampling_steps=0 must be at least 1"):
        t2i.ExecutorConfig(max_sampling_steps=0)


def test_batches_hold_fewer_images_as_images_grow_past_512_px(executor, monkeypatch):
    assert t2i.images_per_batch(32, 512, 512) == 32 and t2i.images_per_batch(32, 1024, 1024) == 8
    assert t2i.images_per_batch(32, 512, 768) == 21  # 32 · 262,144 / 393,216 = 21.3
    assert t2i.images_per_batch(8, 64, 64) == 8 and t2i.images_per_batch(2, 2048, 2048) == 1
    items = [(f"key{i}", i) for i in range(20)]
    group = lambda sampler, size: (None, None, "SDXL 1.0", sampler, 20, 7.0, size)  # noqa: E731
    monkeypatch.setattr(executor.config, "batch_size", 32)
    assert [len(b) for b in executor._batches(group("Euler a", (1024, 1024)), items)] == [8, 8, 4]
    assert [len(b) for b in executor._batches(group("Euler a", (512, 512)), items)] == [20]
    assert {len(b) for b in executor._batches(group("DPM++ SDE Karras", (512, 512)), items)} == {1}


def test_sde_sampler_images_depend_on_their_own_seed_only(executor):
    call = api(sampling_method="DPM++ SDE Karras")
    pair = executor.generate([t2i.Request(call, "a kite", "", 1), t2i.Request(call, "a kite", "", 2)], progress=False)
    executor.cache.path(pair[0].key).unlink()
    alone = executor.generate([t2i.Request(call, "a kite", "", 1)], progress=False)[0]
    assert not alone.cached and np.array_equal(_pixels(alone), _pixels(pair[0]))


def test_unvalidated_call_is_refused_with_a_hint(executor):
    with pytest.raises(ValueError, match="validate the API call first"):
        executor.plan(api(model="Nope"))


def test_paper_weights_download_a_single_file_lora(run_ctx, tmp_path, monkeypatch):
    """CivitaiWeights fetches by version id with the token as a header, then the file loads as a LoRA."""
    from helpers import models

    lora_folder = tmp_path / "lora"
    base = Path(t2i.TinyWeights(run_ctx).base("SD 1.5").path)
    models.build_tiny_lora(lora_folder, base, seed=3)
    payload = (lora_folder / "pytorch_lora_weights.safetensors").read_bytes()
    files = _Files(lambda path: payload)
    monkeypatch.setenv("CIVITAI_API_TOKEN", "test-token-123")
    try:
        store = t2i.CivitaiWeights(run_ctx, cache_dir=tmp_path / "weights",
                                   url=files.root + "/api/download/models/{version}")
        model = t2i.CatalogModel("InkStyle", "LORA", "SD 1.5", 21, lora_base_version_id=11)
        weights = store.lora(model)
        assert files.asked == [] and not Path(weights.path).exists()  # planning needs the id only
        pipeline = t2i.load_pipeline(t2i.TinyWeights(run_ctx).base("SD 1.5"), "SD 1.5")
        executor = t2i.Executor(t2i.ModelCatalog([]), store, t2i.ImageCache(tmp_path / "cache"))
        executor._with_lora(pipeline, weights)  # loading it fetches it
        with t2i.local_weights(store.lora(model)):  # a second use: already on disk
            pass
    finally:
        files.server.shutdown()
    assert (files.asked, files.authorization) == (["/api/download/models/21"], ["Bearer test-token-123"])
    assert weights.kind == "file" and Path(weights.path).read_bytes() == payload
    assert pipeline.get_list_adapters()["unet"] == ["lora_civitai_21"]


def _lora_weights(run_ctx, tmp_path, architecture, seeds, text_encoder=True):
    """Tiny LoRAs (UNet and text-encoder attention) for the base pipeline of `architecture`, one per seed."""
    from helpers import models

    base = Path(t2i.TinyWeights(run_ctx).base(architecture).path)
    made = []
    for seed in seeds:
        folder = tmp_path / f"lora_{architecture[:4]}_{seed}"
        models.build_tiny_lora(folder, base, seed=seed, text_encoder=text_encoder)
        made.append(t2i.Weights(str(folder), "folder", f"lora-{seed}"))
    return made


def _draw(pipeline, executor, lora, seed=4):
    executor._with_lora(pipeline, lora)
    image = t2i.render(pipeline, ["a heron in the reeds"], [""], [seed], steps=3, cfg=7.0, width=32, height=32,
                       device="cpu")[0]
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize("merge", [False, True], ids=["adapter", "merged"])
@pytest.mark.parametrize("architecture", ["SD 1.5", "SDXL 1.0"])
def test_a_kohya_format_lora_draws_what_the_same_lora_draws_in_diffusers_format(run_ctx, tmp_path, architecture,
                                                                                 merge):
    """Most Civitai LoRAs are in kohya's layout (lora_unet_…, lora_te_text_model_… or, for SDXL, lora_te1_ and
    lora_te2_, an alpha per module): loaded as an adapter or merged, it draws what the same LoRA draws from a
    diffusers file, each text encoder's part included."""
    from civitai_formats import write_kohya_lora
    from safetensors.torch import load_file, save_file

    (lora,) = _lora_weights(run_ctx, tmp_path, architecture, seeds=(5,))
    kohya = write_kohya_lora(Path(lora.path) / "pytorch_lora_weights.safetensors", tmp_path / "kohya.safetensors", 4)
    layers = load_file(kohya)
    encoders = sorted({key.split("_text_model_")[0] for key in layers if key.startswith("lora_te")})
    assert encoders == (["lora_te"] if architecture == "SD 1.5" else ["lora_te1", "lora_te2"])
    loras = {"diffusers": lora, "kohya": t2i.Weights(str(kohya), "file", "kohya"), "none": None}
    for encoder in encoders:  # the same file without one text encoder's part
        without = tmp_path / f"without_{encoder}.safetensors"
        save_file({k: v for k, v in layers.items() if not k.startswith(encoder + "_")}, without)
        loras[f"without {encoder}"] = t2i.Weights(str(without), "file", f"without-{encoder}")
    drawn = {}
    for name, weights in loras.items():
        pipeline = t2i.load_pipeline(t2i.TinyWeights(run_ctx).base(architecture), architecture)
        t2i.use_lora(pipeline, weights, merge=merge)
        drawn[name] = np.asarray(t2i.render(pipeline, ["a heron in the reeds"], [""], [4], steps=3, cfg=7.0, width=32,
                                            height=32, device="cpu")[0], dtype=np.int16)
    assert np.array_equal(drawn["kohya"], drawn["diffusers"]) and not np.array_equal(drawn["kohya"], drawn["none"])
    for encoder in encoders:  # each text encoder's part was applied
        assert not np.array_equal(drawn[f"without {encoder}"], drawn["kohya"]), encoder


def _tensors(pipeline):
    parts = [part for part in ("unet", "text_encoder", "text_encoder_2") if getattr(pipeline, part, None) is not None]
    return {f"{part}.{name}": tensor.clone() for part in parts
            for name, tensor in getattr(pipeline, part).state_dict().items()}


def test_lora_switches_print_no_bar_or_false_missing_report_and_a_broken_file_still_raises(run_ctx, tmp_path, capfd):
    """A LoRA's text-encoder part goes through transformers' loader: its progress bar printed at every switch (the
    paper profile keeps library bars on, for downloads), and beside another adapter its load report called that
    adapter's weights MISSING. Both stay quiet; the settings come back as they were; a bad tensor still raises."""
    from safetensors.torch import load_file, save_file
    from transformers.utils import logging as transformers_logging

    first, second = _lora_weights(run_ctx, tmp_path, "SD 1.5", seeds=(7, 8))
    pipeline = t2i.load_pipeline(t2i.TinyWeights(run_ctx).base("SD 1.5"), "SD 1.5")
    layers = load_file(Path(first.path) / "pytorch_lora_weights.safetensors")
    name = next(k for k in sorted(layers) if k.startswith("text_encoder."))
    layers[name] = torch.zeros(layers[name].shape[0] + 1, *layers[name].shape[1:])
    save_file(layers, tmp_path / "broken.safetensors")
    logged: list[str] = []  # what transformers' handlers print (theirs write to whichever stderr they first saw)
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.enable_progress_bar()
    transformers_logging.set_verbosity_warning()  # as a fresh session has it (other tests may have quietened it)
    logging.getLogger("transformers").addHandler(handler)
    try:
        capfd.readouterr()
        for lora in (first, second):
            t2i.use_lora(pipeline, lora, merge=False)
        assert "Loading weights" not in capfd.readouterr().err
        assert not any("LOAD REPORT" in message or "MISSING" in message for message in logged), logged
        assert transformers_logging.is_progress_bar_enabled()
        assert transformers_logging.get_verbosity() == transformers_logging.WARNING
        with pytest.raises(Exception, match="mismatch|shape"):
            t2i.use_lora(pipeline, t2i.Weights(str(tmp_path / "broken.safetensors"), "file", "broken"), merge=False)
        assert any("MISMATCH" in message for message in logged)  # the report the failure points to is shown
    finally:
        logging.getLogger("transformers").removeHandler(handler)
        transformers_logging.disable_progress_bar()
        transformers_logging.set_verbosity(verbosity)
    assert set(pipeline.get_list_adapters()) == {"unet", "text_encoder"}


@pytest.mark.parametrize("architecture", ["SD 1.5", "SDXL 1.0"])
def test_merged_loras_draw_the_adapter_images_and_leave_the_base_exactly_as_it_was(run_ctx, tmp_path, architecture):
    """merge_lora: same images as the adapters, the plain module tree kept, and no LoRA left over after a switch."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    first, second = _lora_weights(run_ctx, tmp_path, architecture, seeds=(5, 6))
    base = t2i.TinyWeights(run_ctx).base(architecture)
    config = dict(max_side=32, max_sampling_steps=3)
    adapters = t2i.Executor(t2i.ModelCatalog([]), None, None, t2i.ExecutorConfig(**config))
    merging = t2i.Executor(t2i.ModelCatalog([]), None, None, t2i.ExecutorConfig(**config, merge_loras=True))
    assert not adapters.merges_loras and merging.merges_loras
    assert t2i.Executor(t2i.ModelCatalog([]), None, None, t2i.ExecutorConfig(compile_unet=True)).merges_loras
    with_adapters, merged = (t2i.load_pipeline(base, architecture) for _ in range(2))
    original = _tensors(merged)
    modules = [type(m) for m in merged.unet.modules()]
    expected = {lora: _draw(with_adapters, adapters, lora) for lora in (first, second, None)}
    assert not np.array_equal(expected[first], expected[None])
    assert not np.array_equal(expected[first], expected[second])
    for lora in (first, second, None, second, first):  # each switch writes the base back before the next merge
        got = _draw(merged, merging, lora)
        assert np.abs(got - expected[lora]).max() <= 1, lora
        assert [type(m) for m in merged.unet.modules()] == modules  # what a compiled UNet's guards check
        assert not any(isinstance(m, BaseTunerLayer) for part in (merged.unet, merged.text_encoder)
                       for m in part.modules())
    text_weight = next(k for k in original if k.startswith("text_encoder.")
                       and k.endswith("layers.0.self_attn.q_proj.weight"))
    assert not torch.equal(_tensors(merged)[text_weight], original[text_weight])  # the text-encoder part is merged too
    # a LoRA file that breaks half-way (one tensor of the wrong shape) leaves the base weights and the plain modules
    from safetensors.torch import load_file, save_file

    layers = load_file(Path(first.path) / "pytorch_lora_weights.safetensors")
    name = sorted(layers)[-1]
    layers[name] = torch.zeros(layers[name].shape[0] + 1, *layers[name].shape[1:])
    save_file(layers, tmp_path / "broken.safetensors")
    with pytest.raises(Exception, match="size mismatch|shape"):
        merging._with_lora(merged, t2i.Weights(str(tmp_path / "broken.safetensors"), "file", "broken"))
    for _ in range(2):  # right after the failure, and after drawing with no LoRA
        after = _tensors(merged)
        assert after.keys() == original.keys() and all(torch.equal(after[k], original[k]) for k in original)
        assert [type(m) for m in merged.unet.modules()] == modules
        assert np.array_equal(_draw(merged, merging, None), expected[None])


@pytest.mark.slow
def test_a_compiled_unet_draws_one_lora_after_another_without_recompiling(run_ctx, tmp_path):
    """`-m slow` (torch.compile on the CPU, ~1 min): as adapters, every new LoRA recompiled the UNet, and past
    torch's recompile limit it ran eagerly; merged, the first draw compiles and the next LoRAs reuse its graph."""
    from torch._dynamo.utils import counters

    from helpers import speed

    loras = _lora_weights(run_ctx, tmp_path, "SD 1.5", seeds=(11, 12, 13))
    pipeline = t2i.load_pipeline(t2i.TinyWeights(run_ctx).base("SD 1.5"), "SD 1.5")
    speed.optimize_pipeline(pipeline, speed.PipelineSettings(channels_last=True, compile_unet=True))  # as on CUDA
    executor = t2i.Executor(t2i.ModelCatalog([]), None, None, t2i.ExecutorConfig(compile_unet=True))
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    _draw(pipeline, executor, loras[0])
    compiled = counters["stats"]["unique_graphs"]
    for lora in (loras[1], None, loras[2], loras[0]):
        _draw(pipeline, executor, lora)
    assert compiled > before and counters["stats"]["unique_graphs"] == compiled


def test_adapters_past_max_loras_are_dropped_least_recently_used_first(run_ctx, tmp_path):
    loras = _lora_weights(run_ctx, tmp_path, "SD 1.5", seeds=(7, 8, 9), text_encoder=False)
    base = t2i.TinyWeights(run_ctx).base("SD 1.5")
    executor = t2i.Executor(t2i.ModelCatalog([]), None, None, t2i.ExecutorConfig(max_loras=2))
    unbounded = t2i.Executor(t2i.ModelCatalog([]), None, None, t2i.ExecutorConfig(max_loras=8))
    pipeline, reference = t2i.load_pipeline(base, "SD 1.5"), t2i.load_pipeline(base, "SD 1.5")
    for lora in (loras[0], loras[1], loras[0], loras[2], loras[1]):  # 7, 8, 7 again (now newest), 9 drops 8 ...
        assert np.array_equal(_draw(pipeline, executor, lora), _draw(reference, unbounded, lora))
    assert sorted(pipeline.get_list_adapters()["unet"]) == ["lora_lora-8", "lora_lora-9"]
    assert len(reference.get_list_adapters()["unet"]) == 3
    with pytest.raises(ValueError, match="max_loras=0 must be at least 1"):
        t2i.ExecutorConfig(max_loras=0)


class _Files:
    """A local HTTP server that answers each path with `body(path)`, recording the paths and Authorization headers."""

    def __init__(self, body):
        self.asked, self.authorization = [], []
        files = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                files.asked.append(self.path)
                files.authorization.append(self.headers.get("Authorization"))
                payload = body(self.path)
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.root = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_paper_weights_are_fetched_on_first_load_only_and_not_for_cached_images(run_ctx, tmp_path):
    """Planning a run and keying its images need no download; the LoRA is fetched when it is loaded, once, and a
    rerun whose images are all cached fetches nothing, even with the weights cache emptied."""
    from helpers import models

    lora_folder = tmp_path / "lora"
    models.build_tiny_lora(lora_folder, Path(t2i.TinyWeights(run_ctx).base("SD 1.5").path), seed=3)
    files = _Files(lambda path: (lora_folder / "pytorch_lora_weights.safetensors").read_bytes())
    catalog = t2i.ModelCatalog([t2i.CatalogModel("Base", "Checkpoint", "SD 1.5", 11, is_base=True),
                                t2i.CatalogModel("InkStyle", "LORA", "SD 1.5", 21, lora_base_version_id=11)])
    requests = [t2i.Request(api("InkStyle", "SD 1.5", "LORA"), f"a fox, {i}", "", seed=i) for i in range(3)]
    weights = tmp_path / "weights"

    def executor():
        store = t2i.CivitaiWeights(run_ctx, cache_dir=weights, url=files.root + "/{version}")
        return t2i.Executor(catalog, store, t2i.ImageCache(tmp_path / "cache"),
                            t2i.ExecutorConfig(max_side=32, batch_size=4, max_sampling_steps=2))
    try:
        first = executor()
        for request in requests:
            first.plan(request.api)
        assert files.asked == []
        drawn = first.generate(requests, progress=False)
        assert files.asked == ["/21"] and first.stats["generated"] == 3
        shutil.rmtree(weights)
        again = executor()
        cached = again.generate(requests, progress=False)
    finally:
        files.server.shutdown()
    assert files.asked == ["/21"] and again.stats["cache_hits"] == 3 and not weights.exists()
    assert [g.key for g in cached] == [g.key for g in drawn]


def test_a_civitai_checkpoint_file_loads_offline_and_draws_what_the_same_weights_draw_as_a_folder(run_ctx, tmp_path,
                                                                                                     capfd):
    """A Civitai checkpoint is one file in the original (LDM) layout: it is filled in from the base model's folder,
    with no hub, and its pipeline draws pixel for pixel what the same weights draw as a diffusers folder."""
    from civitai_formats import write_ldm_checkpoint

    base = t2i.TinyWeights(run_ctx).base("SD 1.5")
    served = write_ldm_checkpoint(Path(base.path), tmp_path / "served" / "31.safetensors")
    files = _Files(lambda path: served.read_bytes())
    catalog = t2i.ModelCatalog([t2i.CatalogModel("Base", "Checkpoint", "SD 1.5", 11, is_base=True),
                                t2i.CatalogModel("RealMix", "Checkpoint", "SD 1.5", 31)])
    store = t2i.CivitaiWeights(run_ctx, cache_dir=tmp_path / "weights", url=files.root + "/{version}")
    executor = t2i.Executor(catalog, store, t2i.ImageCache(tmp_path / "cache"),
                            t2i.ExecutorConfig(max_side=32, batch_size=2, max_sampling_steps=2))
    requests = [t2i.Request(api(model), "a harbour at dawn", "", seed=2) for model in ("RealMix", "Base")]
    capfd.readouterr()
    try:
        from_file, from_folder = executor.generate(requests, progress=False)
    finally:
        files.server.shutdown()
    printed = capfd.readouterr().err
    assert files.asked == ["/31"] and executor.stats["pipelines_loaded"] == 2 and from_file.key != from_folder.key
    np.testing.assert_array_equal(np.asarray(from_file.image), np.asarray(from_folder.image))
    # a run loads hundreds of checkpoints: no bar for each, nor diffusers' note about an empty list of modules
    assert "Loading pipeline components" not in printed and "kept in float32" not in printed


def test_an_sdxl_checkpoint_file_loads_offline_as_the_same_weights(tmp_path):
    """SDXL's single file (two text encoders, the second in OpenCLIP's layout) loads, filled in from the base
    folder, into exactly the folder's weights. The encoders differ in width, as in SDXL, which is how diffusers tells
    them apart in a single file."""
    from civitai_formats import write_ldm_checkpoint
    from helpers import models

    folder = tmp_path / "sdxl"
    models.build_tiny_stable_diffusion_xl(folder, seed=1, second_encoder_width=48)
    served = write_ldm_checkpoint(folder, tmp_path / "41.safetensors")
    from_file = t2i.load_pipeline(t2i.Weights(str(served), "file", "civitai:41"), "SDXL 1.0", config=str(folder))
    from_folder = t2i.load_pipeline(t2i.Weights(str(folder), "folder", "base"), "SDXL 1.0")
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        loaded, expected = getattr(from_file, part).state_dict(), getattr(from_folder, part).state_dict()
        assert loaded.keys() == expected.keys() and not any(t.is_meta for t in loaded.values()), part
        assert all(torch.equal(loaded[name], expected[name]) for name in expected), part
    # and it draws what the folder draws, through both encoders (SDXL conditions on the second one's pooled output
    # too). Equal to float rounding, not bit for bit: a tensor read from the folder's files can sit at an address
    # that is not 64-byte aligned, and the CPU matmul then takes another kernel (~5e-7 apart on the projection)
    drawn = [pipeline("a lighthouse in a storm", negative_prompt="blurry", height=32, width=32, num_inference_steps=2,
                      generator=torch.Generator().manual_seed(5), output_type="np").images[0]
             for pipeline in (from_file, from_folder)]
    np.testing.assert_allclose(*drawn, atol=1e-5, rtol=0)
    assert drawn[0].std() > 0.01


def test_weights_cache_cap_removes_the_least_recently_used_file_not_one_in_use(run_ctx, tmp_path):
    """Files of 1, 2, 3 and 4 kB under a 6 kB cap: each download removes the least recently used files until the
    rest fit, never the file just fetched nor one a process is loading; a removed file is fetched again on use."""
    files = _Files(lambda path: bytes(1000 * int(path.strip("/"))))
    store = t2i.CivitaiWeights(run_ctx, cache_dir=tmp_path / "weights", url=files.root + "/{version}", max_gb=6e-6)
    evict, room_made = store._evict, []  # room is made for the incoming bytes before they are written
    store._evict = lambda keep, incoming=0: (room_made.append((keep.name, incoming, list(store.evicted))),
                                             evict(keep, incoming))
    model = lambda version: t2i.CatalogModel(f"M{version}", "LORA", "SD 1.5", version, lora_base_version_id=0)  # noqa: E731
    folder = tmp_path / "weights"

    def use(version, at):
        with t2i.local_weights(store.lora(model(version))) as weights:
            os.utime(weights.path, (at, at))  # last use at a known time (the clock can be coarser than the test)
    try:
        for at, version in enumerate([1, 2, 3], start=100):
            use(version, at)
        use(1, 200)  # 1 is now the most recently used: 2 is the oldest
        assert sorted(p.name for p in folder.glob("*.safetensors")) == ["1.safetensors", "2.safetensors",
                                                                        "3.safetensors"] and not store.evicted
        use(4, 300)  # 1 + 2 + 3 + 4 = 10 kB: 2 goes (8 kB), then 3 (5 kB), before 4 arrives
        assert store.evicted == ["2.safetensors", "3.safetensors"]
        assert room_made[-1] == ("4.safetensors", 4000, [])  # once, before 4's bytes: no second pass after them
        assert [name for name, _, _ in room_made].count("4.safetensors") == 1
        assert sorted(p.name for p in folder.glob("*.safetensors")) == ["1.safetensors", "4.safetensors"]
        # while another use holds 1 (a process loading it), fetching 3 again removes 4, and leaves 1 although it is
        # now the least recently used
        with t2i.local_weights(store.lora(model(1))) as held:
            os.utime(held.path, (50, 50))
            use(3, 400)
        assert store.evicted[2:] == ["4.safetensors"]
        assert sorted(p.name for p in folder.glob("*.safetensors")) == ["1.safetensors", "3.safetensors"]
    finally:
        files.server.shutdown()
    assert files.asked == ["/1", "/2", "/3", "/4", "/3"]  # 1 was never fetched twice; 3 was, after its removal


def test_weights_cache_cap_must_be_a_positive_number(run_ctx, tmp_path, monkeypatch):
    monkeypatch.setenv("T2IBOOK_WEIGHTS_CACHE_GB", "200GB")
    with pytest.raises(ValueError, match=r"T2IBOOK_WEIGHTS_CACHE_GB='200GB' is not a number"):
        t2i.CivitaiWeights(run_ctx, cache_dir=tmp_path)
    monkeypatch.setenv("T2IBOOK_WEIGHTS_CACHE_GB", "-1")
    with pytest.raises(ValueError, match="must be a positive number"):
        t2i.CivitaiWeights(run_ctx, cache_dir=tmp_path)
    monkeypatch.setenv("T2IBOOK_WEIGHTS_CACHE_GB", "250")
    assert t2i.CivitaiWeights(run_ctx, cache_dir=tmp_path).max_bytes == 250_000_000_000


@pytest.mark.parametrize("model,base", [("AlphaMix", "SD 1.5"), ("BetaXL", "SDXL 1.0")])
def test_text_noise_changes_the_image_and_zero_noise_matches_the_plain_path(executor, run_ctx, catalog, tmp_path,
                                                                            model, base):
    plain = t2i.Request(api(model, base), "a lighthouse at dusk", "", seed=5)
    zero = t2i.Request(api(model, base), "a lighthouse at dusk", "", seed=5, text_noise=0.0)
    noised = t2i.Request(api(model, base), "a lighthouse at dusk", "", seed=5, text_noise=0.5)
    # one batch mixing noised and un-noised requests (AGFSync: image 0 un-noised), then each alone
    together = executor.generate([zero, noised], progress=False)
    assert together[0].key == executor.generate([plain], progress=False)[0].key  # σ = 0 is the plain request
    assert together[1].key != together[0].key
    fresh = t2i.Executor(catalog, t2i.weights_store(run_ctx), t2i.ImageCache(tmp_path / "cache"),
                         t2i.ExecutorConfig(max_side=32, batch_size=4))
    alone = fresh.generate([plain, noised], progress=False)
    assert np.array_equal(_pixels(alone[0]), _pixels(together[0]))  # embedding path = prompt path at σ = 0
    assert np.array_equal(_pixels(alone[1]), _pixels(together[1]))  # the noise depends on the request only
    assert not np.array_equal(_pixels(together[0]), _pixels(together[1]))


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("model,base", [("AlphaMix", "SD 1.5"), ("BetaXL", "SDXL 1.0")])
def test_prompts_past_the_token_window_are_counted_once_not_warned_per_batch(run_ctx, catalog, tmp_path, capsys,
                                                                             model, base):
    long_prompt = " ".join(["a tall red lighthouse on a rocky shore"] * 12)  # 96 words: well past 77 tokens
    requests = [t2i.Request(api(model, base), long_prompt, "", seed=1),
                t2i.Request(api(model, base), long_prompt, "", seed=2, text_noise=0.3),  # the embedding path
                t2i.Request(api(model, base), "a lighthouse", "blurry", seed=3)]
    fresh = t2i.Executor(catalog, t2i.weights_store(run_ctx), t2i.ImageCache(tmp_path / "cache"),
                         t2i.ExecutorConfig(max_side=32, batch_size=4))
    collect = _Collect()
    library_loggers = [logging.getLogger(name) for name in ("diffusers", "transformers")]
    levels = [log.level for log in library_loggers]
    for log in library_loggers:
        log.addHandler(collect)
        log.setLevel(logging.WARNING)
    try:
        pipeline = fresh.pipeline(*fresh.plan(api(model, base)))
        pipeline.encode_prompt(prompt=long_prompt, device="cpu", num_images_per_prompt=1,
                               do_classifier_free_guidance=False)  # unfiltered, diffusers says it truncated
        assert any("truncated because CLIP" in m for m in collect.messages)
        collect.messages.clear()
        fresh.generate(requests, progress=False)
        fresh.generate([t2i.Request(api(model, base), long_prompt, "", seed=4)], progress=False)
        logging.getLogger(type(pipeline).__module__).warning("another warning")  # other logs still pass
    finally:
        for log, level in zip(library_loggers, levels):
            log.removeHandler(collect)
            log.setLevel(level)
    assert collect.messages == ["another warning"]
    assert fresh.stats["texts_over_token_window"] == 3  # the three long prompts; the short ones are not counted
    assert said(capsys.readouterr().out).count("longer than the text encoder's 77-token window") == 1


def test_blocks_cover_every_request_once_grouped_by_settings_and_equal_one_call(executor):
    samplers = ["Euler a", "DPM++ 2M Karras"] * 4  # interleaved settings
    requests = [t2i.Request(api(sampling_method=s), f"a paper boat {i}", "", i) for i, s in enumerate(samplers)]
    whole = executor.generate(requests, progress=False)
    blocks = list(executor.generate_in_blocks(requests, block_size=3, progress=False))
    assert [len(indices) for indices, _ in blocks] == [3, 3, 2]
    assert sorted(i for indices, _ in blocks for i in indices) == list(range(8))
    for indices, images in blocks:
        assert [g.key for g in images] == [whole[i].key for i in indices]
        assert all(np.array_equal(_pixels(g), _pixels(whole[i])) for g, i in zip(images, indices))
    # ordered by settings: the first block holds one sampler only, in the input order
    assert blocks[0][0] == [1, 3, 5] and {samplers[i] for i in blocks[0][0]} == {"DPM++ 2M Karras"}
    single = list(executor.generate_in_blocks(requests, block_size=8, progress=False))
    assert len(single) == 1 and single[0][0] == list(range(8))  # one block keeps the input order
    with pytest.raises(ValueError, match="block_size=0 must be at least 1"):
        next(executor.generate_in_blocks(requests, block_size=0))


def test_cached_images_are_decoded_only_when_their_pixels_are_used(executor, monkeypatch):
    import pickle

    requests = [t2i.Request(api(), "a lantern on a jetty", "", seed) for seed in (5, 6)]
    drawn = executor.generate(requests, progress=False)
    assert all(g.decoded and not g.cached for g in drawn)  # just drawn: in memory, never read back
    reads = []
    get = executor.cache.get
    monkeypatch.setattr(executor.cache, "get", lambda key: reads.append(key) or get(key))
    again = executor.generate(requests, progress=False)
    assert [g.key for g in again] == [g.key for g in drawn] and all(g.cached for g in again)
    assert reads == [] and not any(g.decoded for g in again)  # keys only: no PNG decoded yet
    assert np.array_equal(_pixels(again[1]), _pixels(drawn[1])) and reads == [again[1].key]
    assert again[1].image is again[1].image and reads == [again[1].key]  # decoded once, then kept
    monkeypatch.undo()
    # what travels between processes: the key, not the pixels; read back from the cache on the other side
    sent = pickle.loads(pickle.dumps(drawn[0].by_reference()))
    assert not sent.decoded and len(pickle.dumps(drawn[0].by_reference())) < len(pickle.dumps(drawn[0])) / 2
    assert np.array_equal(_pixels(sent), _pixels(drawn[0]))
    # many at once: the cached ones are read in threads, then kept
    from helpers.scorers import base

    monkeypatch.setattr(base, "PREPROCESS_WORKERS", 2)
    fresh = executor.generate(requests, progress=False)
    threads = []
    monkeypatch.setattr(executor.cache, "get", lambda key: threads.append(threading.current_thread().name) or get(key))
    pictures = t2i.decoded([drawn[0], *fresh])
    assert all(np.array_equal(np.asarray(p), _pixels(d)) for p, d in zip(pictures, [drawn[0], *drawn]))
    assert len(threads) == 2 and all(name.startswith("preprocess") for name in threads) and fresh[1].decoded
    threads.clear()
    twice = executor.generate([requests[0], requests[1], requests[0]], progress=False)  # one key twice: read once
    assert twice[0] is not twice[2] and twice[0].key == twice[2].key
    pictures = t2i.decoded(twice)
    assert len(threads) == 2 and all(g.decoded for g in twice) and pictures[0] is pictures[2]
    monkeypatch.undo()
    gone = t2i.Generated(requests[0], None, "0" * 64, True, "w", (32, 32), executor.cache)
    with pytest.raises(FileNotFoundError, match=r"not in the image cache.*\(run the stage again\)"):
        gone.image
    with pytest.raises(ValueError, match="needs its image or the ImageCache"):
        t2i.Generated(requests[0], None, "k", True, "w", (32, 32))


def test_images_put_later_are_found_at_once_and_written_in_order_by_flush(tmp_path, monkeypatch):
    import pickle

    cache = t2i.ImageCache(tmp_path / "cache")
    pictures = {f"k{i}": Image.new("RGB", (24, 16), (40 * i, 90, 200 - 40 * i)) for i in range(4)}
    writers = set()
    write = t2i.ImageCache._write_png
    monkeypatch.setattr(t2i.ImageCache, "_write_png",
                        lambda self, key, image: writers.add(threading.current_thread().name) or write(self, key, image))
    for key, picture in pictures.items():
        cache.put_later(key, picture, {"n": key})
    assert all(cache.has(key) and cache.get(key) is pictures[key] for key in pictures)  # pending: found as written
    cache.flush()
    assert writers and all(name.startswith("png-writer") for name in writers)
    assert all(np.array_equal(np.asarray(Image.open(cache.path(key))), np.asarray(picture))
               for key, picture in pictures.items())
    index = [json.loads(line)["key"] for line in (tmp_path / "cache" / "index.jsonl").read_text().splitlines()]
    assert index == list(pictures)  # in the order of the calls, whichever thread finished first
    assert not list((tmp_path / "cache" / "images").rglob("*.part.png"))
    assert pickle.loads(pickle.dumps(cache)).get("k1") is not None  # travels as its folder
    monkeypatch.setattr(t2i.ImageCache, "_write_png", lambda self, key, image: 1 / 0)
    cache.put_later("bad", pictures["k0"], {})
    with pytest.raises(ZeroDivisionError):
        cache.flush()
    assert not cache.has("bad")


def test_a_failed_batch_still_leaves_the_images_drawn_before_it_on_disk(executor, monkeypatch):
    requests = [t2i.Request(api(), "a harbour crane", "", seed) for seed in (31, 32)]
    draw, calls = executor._draw, []

    def second_fails(group, batch):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return draw(group, batch)

    monkeypatch.setattr(executor, "_draw", second_fails)
    monkeypatch.setattr(executor, "_batches", lambda group, items: [[item] for item in items])
    with pytest.raises(RuntimeError, match="out of memory"):
        executor.generate(requests, progress=False)
    monkeypatch.undo()
    again = executor.generate(requests, progress=False)
    assert [g.cached for g in again] == [True, False]  # the first one was written before the failure


def test_a_batch_that_runs_out_of_memory_is_drawn_again_in_halves(run_ctx, catalog, monkeypatch):
    """5 images at batch size 8 on a device that holds 2: the 5 fail, then 2 + 2 + 1 are drawn, exactly the images
    of batch size 2 from the start, and later batches are planned at 2 without failing first."""
    requests = [t2i.Request(api(), f"a lighthouse in fog {i}", "", 40 + i) for i in range(5)]
    small = t2i.Executor.for_run(run_ctx, catalog, max_side=32, batch_size=2)
    small.cache = t2i.ImageCache(run_ctx.runs_dir / "fits_cache")
    want = small.generate(requests, progress=False)
    executor = t2i.Executor.for_run(run_ctx, catalog, max_side=32, batch_size=8)
    executor.cache = t2i.ImageCache(run_ctx.runs_dir / "out_of_memory_cache")
    real_render, sizes = t2i.render, []

    def render(pipeline, prompts, *args, **kwargs):
        sizes.append(len(prompts))
        if len(prompts) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 6.00 GiB")
        return real_render(pipeline, prompts, *args, **kwargs)

    monkeypatch.setattr(t2i, "render", render)
    got = executor.generate(requests, progress=False)
    assert sizes == [5, 2, 2, 1] and executor.stats["out_of_memory_retries"] == 1 and executor.images_per_call == 2
    assert executor.stats["generated"] == 5 and all(not g.cached for g in got)
    for a, b in zip(got, want):
        assert np.array_equal(_pixels(a), _pixels(b))
    more = [t2i.Request(api(), f"a windmill at dusk {i}", "", 60 + i) for i in range(4)]
    executor.generate(more, progress=False)
    assert sizes[4:] == [2, 2] and executor.stats["out_of_memory_retries"] == 1


def test_after_running_out_of_memory_larger_images_come_fewer_per_call(executor, monkeypatch):
    """4 of 8 SDXL images at 1024 px fit: the setting becomes 16, which is 4 per call at 1024 px and 16 at 512."""
    group = lambda size: (None, None, "SDXL 1.0", "Euler a", 20, 7.0, size)  # noqa: E731
    monkeypatch.setattr(executor.config, "batch_size", 32)
    monkeypatch.setattr(executor, "images_per_call", None)
    monkeypatch.setattr(executor, "stats", Counter())

    def draw(group, batch):
        if len(batch) > 4:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return {key: None for key, _ in batch}

    monkeypatch.setattr(executor, "_draw", draw)
    items = [(f"key{i}", i) for i in range(8)]
    assert list(executor._draw_fitting(group((1024, 1024)), items)) == [key for key, _ in items]
    assert executor.images_per_call == 16 and executor.stats["out_of_memory_retries"] == 1
    assert [len(b) for b in executor._batches(group((1024, 1024)), items * 2)] == [4, 4, 4, 4]
    assert [len(b) for b in executor._batches(group((512, 512)), items * 3)] == [16, 8]


def test_an_image_is_cached_apart_for_each_device_kind_and_dtype_it_is_drawn_in(run_ctx, catalog, tmp_path):
    """A CPU and a CUDA generator draw other noise for one seed, and bf16 moves pixels: a cache two machines (or a
    float32 and a bf16 run) share hands neither the other's image. CPU float32 keys are the ones caches always held."""
    assert t2i.drawn_with("cpu", "float32") == "cpu/float32" and t2i.drawn_with("cpu", "bfloat16") == "cpu/bfloat16"
    assert t2i.drawn_with("cuda:1", "bfloat16") == "cuda/bfloat16"
    assert t2i.drawn_with("cuda", "float32") == "cuda/float32"
    request = t2i.Request(api(), "a fox in the snow", "", seed=3)
    # this request's key as computed before the field existed (at 34c7ddb): existing caches stay valid
    assert t2i.ImageCache.key(request, "alpha@0123456789abcdef", (24, 32), 2) == \
        t2i.ImageCache.key(request, "alpha@0123456789abcdef", (24, 32), 2, "cpu/float32") == \
        "841fb4085d90cb162507b3c9b9be9166b25853090d8368e30b3a6e8f91017784"
    assert t2i.ImageCache.key(request, "alpha@0123456789abcdef", (24, 32), 2, "cuda/bfloat16") != \
        t2i.ImageCache.key(request, "alpha@0123456789abcdef", (24, 32), 2, "cpu/bfloat16")

    cache = t2i.ImageCache(tmp_path / "cache")
    full, half = (t2i.Executor(catalog, t2i.weights_store(run_ctx), cache,
                               t2i.ExecutorConfig(max_side=32, max_sampling_steps=2, dtype=dtype))
                  for dtype in ("float32", "bfloat16"))
    drawn = full.generate([request], progress=False)[0]
    assert full.key(request) == t2i.ImageCache.key(request, drawn.weights_id, (24, 32), 2)
    in_bf16 = half.generate([request], progress=False)[0]
    assert not in_bf16.cached and half.stats["generated"] == 1 and in_bf16.key != drawn.key
    assert half.generate([request], progress=False)[0].cached  # its own image is reused
    index = [json.loads(line) for line in (tmp_path / "cache" / "index.jsonl").read_text().splitlines()]
    assert [(row["key"], row["drawn_with"]) for row in index] == [(drawn.key, "cpu/float32"),
                                                                   (in_bf16.key, "cpu/bfloat16")]


def test_the_image_index_goes_on_whole_after_a_torn_line(tmp_path):
    from helpers.manifest import read_jsonl_rows

    cache = t2i.ImageCache(tmp_path)
    cache.put("a" * 64, Image.new("RGB", (8, 8)), {"seed": 1})
    with open(tmp_path / "index.jsonl", "a") as handle:
        handle.write('{"key": "bbb')  # a crash mid-write
    cache.put("c" * 64, Image.new("RGB", (8, 8)), {"seed": 2})
    assert [(row["key"], row["seed"]) for row in read_jsonl_rows(tmp_path / "index.jsonl")] == \
        [("a" * 64, 1), ("c" * 64, 2)]
