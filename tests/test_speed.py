"""The fast paths give the plain paths' answers: static-cache bucketed decoding, the tuned pipeline."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers import models, speed


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llm")
    models.build_tiny_llama(folder, seed=0)
    return models.load_causal_lm(str(folder))


def _prompts(count: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 40, (count,), generator=generator)
    return [torch.randint(5, 700, (int(n),), generator=generator).tolist() for n in lengths]


def test_buckets_sort_by_length_and_keep_every_index():
    batches = speed.length_buckets([5, 1, 9, 1, 3], batch_size=2)
    assert batches == [[1, 3], [4, 0], [2]]
    assert speed.padded_width(17, 16) == 32 and speed.padded_width(16, 16) == 16 and speed.padded_width(5, 1) == 5


def test_settings_refuse_what_cannot_work():
    with pytest.raises(ValueError, match="compile=True needs static_cache=True"):
        speed.DecodeSettings(compile=True)
    with pytest.raises(ValueError, match="batch_size=0"):
        speed.DecodeSettings(batch_size=0)
    assert speed.DecodeSettings.auto("cpu") == speed.DecodeSettings(static_cache=False, compile=False)
    assert speed.DecodeSettings.auto("cuda:0", 64).static_cache and speed.DecodeSettings.auto("cuda", 64).compile


@pytest.mark.parametrize("settings", [speed.DecodeSettings(batch_size=4),
                                      speed.DecodeSettings(batch_size=4, static_cache=True, bucket=16)],
                         ids=["dynamic", "static-bucketed"])
def test_batched_decoding_equals_one_generate_per_prompt(lm, settings):
    model, tokenizer = lm
    pad = tokenizer.pad_token_id
    prompts = _prompts(9)
    one_by_one = []
    for prompt in prompts:
        with torch.inference_mode():
            out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12, pad_token_id=pad)
        one_by_one.append(out[0, len(prompt):].tolist())
    seen = []
    batched = speed.greedy_decode(model, prompts, pad_id=pad, max_new_tokens=12, settings=settings,
                                  progress=seen.append)
    strip = lambda tokens: [t for t in tokens if t != pad]  # noqa: E731  (a batch pads rows that stop early)
    assert [strip(t) for t in batched] == [strip(t) for t in one_by_one]
    assert sum(seen) == len(prompts) and len(seen) == 3  # 9 prompts in batches of 4


def test_tuned_pipeline_draws_the_plain_pipelines_images(tmp_path):
    folder = tmp_path / "sd"
    models.build_tiny_stable_diffusion(folder, seed=0)
    plain = models.load_sd_pipeline(str(folder))
    tuned = speed.optimize_pipeline(models.load_sd_pipeline(str(folder)), speed.PipelineSettings(channels_last=True))
    assert tuned.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    prompts, seeds = ["a red fox", "a blue whale", "a green owl"], [3, 4, 5]
    batched = speed.render(tuned, prompts, [""] * 3, seeds, steps=3, cfg=7.0, width=32, height=32, device="cpu")
    alone = [speed.render(plain, [p], [""], [s], steps=3, cfg=7.0, width=32, height=32, device="cpu")[0]
             for p, s in zip(prompts, seeds)]
    for got, want in zip(batched, alone):
        # NHWC convolutions sum in another order: the same image up to rounding of a few pixel levels
        assert np.abs(np.asarray(got, dtype=int) - np.asarray(want, dtype=int)).max() <= 2
    assert not np.array_equal(np.asarray(batched[0]), np.asarray(batched[1]))


def test_images_start_from_cpu_noise_whatever_device_draws_them():
    """A seed's latents are the CPU generator's on every device (a CUDA generator's stream is another one); this
    machine needs no GPU to check it: the pipeline below records the generators it is given."""
    seen = {}

    def pipeline(**kwargs):
        seen.update(kwargs)
        return SimpleNamespace(images=["drawn"] * len(kwargs["prompt"]))
    images = speed.render(pipeline, ["a red fox", "a blue whale"], ["", "blurry"], [3, 4], steps=5, cfg=6.0, width=64,
                          height=64, device="cuda")
    assert images == ["drawn", "drawn"] and seen["num_inference_steps"] == 5
    assert seen["negative_prompt"] == ["", "blurry"]
    assert [g.device.type for g in seen["generator"]] == ["cpu", "cpu"]
    for generator, seed in zip(seen["generator"], (3, 4)):
        want = torch.randn(4, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(torch.randn(4, generator=generator), want)


def _cache_lengths(model) -> list[int]:
    """The static cache length each forward of `model` sees, recorded by a hook (remove it with `.remove()`)."""
    seen: list[int] = []

    def record(module, args, kwargs):
        layers = getattr(kwargs.get("past_key_values"), "layers", None)
        if layers and hasattr(layers[0], "max_cache_len"):
            seen.append(layers[0].max_cache_len)

    return seen, model.register_forward_pre_hook(record, with_kwargs=True)


def test_static_cache_decoding_sizes_every_batch_for_the_longest_prompt(lm):
    """One cache length for all batches: each new length compiled the decoding step again (see the slow test)."""
    model, tokenizer = models.load_causal_lm(lm[0].name_or_path)  # fresh: transformers keeps a model's longest cache
    prompts = [[7] * 5, [8] * 20, [9] * 37]  # widths 16, 32 and 48 in buckets of 16
    seen, hook = _cache_lengths(model)
    try:
        out = speed.greedy_decode(model, prompts, pad_id=tokenizer.pad_token_id, max_new_tokens=6,
                                  settings=speed.DecodeSettings(1, static_cache=True, bucket=16))
    finally:
        hook.remove()
    assert set(seen) == {48 + 6} and len(seen) == 3 * 6  # 3 batches of one prefill + 5 decoding steps
    plain = speed.greedy_decode(model, prompts, pad_id=tokenizer.pad_token_id, max_new_tokens=6,
                                settings=speed.DecodeSettings(1))
    assert out == plain


def test_a_share_of_a_call_decodes_the_batches_and_cache_width_it_is_given(lm):
    """A process decoding its share of a multi-process call gets all the call's prompts and its share of the
    batches: it decodes only those batches, as given, with a cache sized for the whole call's widest prompt, and
    the tokens stay each prompt's own."""
    model, tokenizer = models.load_causal_lm(lm[0].name_or_path)
    prompts = [[7] * 5, [8] * 20, [9] * 37, [6] * 60]
    settings = speed.DecodeSettings(2, static_cache=True, bucket=16)
    seen, hook = _cache_lengths(model)
    generate, batch_rows = model.generate, []
    model.generate = lambda **kwargs: batch_rows.append(int(kwargs["input_ids"].shape[0])) or generate(**kwargs)
    try:
        shared = speed.greedy_decode(model, prompts, pad_id=tokenizer.pad_token_id, max_new_tokens=6,
                                     settings=settings, batches=[[2], [0, 1]])  # not the 4th prompt
    finally:
        hook.remove()
        del model.generate
    assert batch_rows == [1, 2]  # its own buckets would have been [0, 1] then [2, 3]
    assert set(seen) == {64 + 6}  # the 4th prompt (60 → 64 in buckets of 16) sizes it; the decoded ones give 48
    assert shared[3] is None  # not in the batches: not decoded
    alone = speed.greedy_decode(model, prompts, pad_id=tokenizer.pad_token_id, max_new_tokens=6,
                                settings=speed.DecodeSettings(1))
    strip = lambda tokens: [t for t in tokens if t != tokenizer.pad_token_id]  # noqa: E731
    assert [strip(t) for t in shared[:3]] == [strip(t) for t in alone[:3]]


@pytest.mark.slow
def test_compiled_decoding_compiles_once_for_many_prompt_widths(lm):
    """`-m slow` (torch.compile on the CPU, ~20 s): 12 prompt widths, one graph, past torch's recompile limit of 8
    without dropping to eager decoding, and the eager tokens."""
    from torch._dynamo.utils import counters

    model, tokenizer = lm
    prompts = [[5 + i] * (3 + 16 * i) for i in range(12)]
    settings = speed.DecodeSettings(1, static_cache=True, compile=True, bucket=16)
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    fast = speed.greedy_decode(model, prompts, pad_id=tokenizer.pad_token_id, max_new_tokens=4, settings=settings)
    assert settings.compile_error is None and counters["stats"]["unique_graphs"] == before + 1
    plain = speed.greedy_decode(model, prompts, pad_id=tokenizer.pad_token_id, max_new_tokens=4,
                                settings=speed.DecodeSettings(1))
    assert fast == plain


@pytest.mark.slow
def test_more_compiled_unets_than_torchs_default_limit_all_run_compiled(monkeypatch):
    """`-m slow` (~1 min): ten differently built modules of one class compiled through optimize_pipeline each get
    their graph; with torch's default limit of 8 per compiled function, the ninth and tenth ran eagerly."""
    from types import SimpleNamespace

    import torch._dynamo
    from torch._dynamo.utils import counters

    class Stack(torch.nn.Module):  # one class, as SD 1.5 and SDXL UNets are: its forward holds every graph
        def __init__(self, depth: int):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Conv2d(2, 2, 3, padding=1) for _ in range(depth))

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)
    torch._dynamo.reset()
    for depth in range(1, 11):
        unet = Stack(depth)
        speed.optimize_pipeline(SimpleNamespace(unet=unet), speed.PipelineSettings(compile_unet=True))
        before = counters["stats"]["unique_graphs"]
        unet(torch.ones(1, 2, 8, 8))
        assert counters["stats"]["unique_graphs"] == before + 1, f"module {depth} ran without its own graph"


@pytest.mark.gpu
def test_cuda_graph_decoding_equals_dynamic_batches(lm):
    model, tokenizer = lm
    model = model.to("cuda")
    prompts, pad = _prompts(12, seed=1), tokenizer.pad_token_id
    plain = speed.greedy_decode(model, prompts, pad_id=pad, max_new_tokens=16, settings=speed.DecodeSettings(4))
    fast = speed.greedy_decode(model, prompts, pad_id=pad, max_new_tokens=16,
                               settings=speed.DecodeSettings(4, static_cache=True, compile=True))
    strip = lambda tokens: [t for t in tokens if t != pad]  # noqa: E731
    assert [strip(t) for t in fast] == [strip(t) for t in plain]


@pytest.mark.gpu
def test_compiled_channels_last_unet_draws_the_eager_images(tmp_path):
    folder = tmp_path / "sd"
    models.build_tiny_stable_diffusion(folder, seed=0)
    eager = models.load_sd_pipeline(str(folder), "cuda")
    tuned = speed.optimize_pipeline(models.load_sd_pipeline(str(folder), "cuda"), speed.PipelineSettings.auto("cuda"))
    prompts, seeds = ["a red fox", "a blue whale"], [3, 4]
    want = speed.render(eager, prompts, [""] * 2, seeds, steps=3, cfg=7.0, width=64, height=64, device="cuda")
    got = speed.render(tuned, prompts, [""] * 2, seeds, steps=3, cfg=7.0, width=64, height=64, device="cuda")
    for a, b in zip(got, want):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).mean() < 2


def test_a_failed_compile_decodes_on_eagerly_with_the_same_tokens(lm, monkeypatch):
    model, tokenizer = lm
    pad, prompts = tokenizer.pad_token_id, _prompts(6, seed=2)
    want = speed.greedy_decode(model, prompts, pad_id=pad, max_new_tokens=8,
                               settings=speed.DecodeSettings(4, static_cache=True))
    real_generate, compiled_calls = model.generate, []

    def generate(**kwargs):
        if "compile_config" in kwargs:  # what a torch.compile / CUDA-graph failure looks like to the caller
            compiled_calls.append(kwargs["input_ids"].shape)
            raise RuntimeError("accessing tensor output of CUDAGraphs that has been overwritten")
        assert kwargs["disable_compile"] is True
        return real_generate(**kwargs)

    monkeypatch.setattr(model, "generate", generate)
    settings = speed.DecodeSettings(4, static_cache=True, compile=True)
    got = speed.greedy_decode(model, prompts, pad_id=pad, max_new_tokens=8, settings=settings)
    assert got == want
    assert settings.compile_error == "RuntimeError: accessing tensor output of CUDAGraphs that has been overwritten"
    assert len(compiled_calls) == 1  # tried once; the second batch and later runs go straight to eager decoding
    speed.greedy_decode(model, prompts, pad_id=pad, max_new_tokens=8, settings=settings)
    assert len(compiled_calls) == 1
    with pytest.raises(RuntimeError, match="eager failure"):  # without compile, errors are not swallowed
        monkeypatch.setattr(model, "generate", lambda **kwargs: (_ for _ in ()).throw(RuntimeError("eager failure")))
        speed.greedy_decode(model, prompts, pad_id=pad, max_new_tokens=8, settings=speed.DecodeSettings(4))


def test_a_batch_that_runs_out_of_memory_is_decoded_again_in_halves(lm, monkeypatch, caplog):
    """8 prompts at batch size 8 on a device that holds 2 rows: 8 fail, then 4, then pairs go through, and the
    tokens are those of a batch size of 2 from the start (the same batches); one row that does not fit raises."""
    model, tokenizer = lm
    pad, prompts = tokenizer.pad_token_id, _prompts(8, seed=3)
    want = speed.greedy_decode(model, prompts, pad_id=pad, max_new_tokens=6, settings=speed.DecodeSettings(2))
    real_generate, rows = model.generate, []

    def generate(**kwargs):
        rows.append(len(kwargs["input_ids"]))
        if len(kwargs["input_ids"]) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_generate(**kwargs)

    monkeypatch.setattr(model, "generate", generate)
    settings = speed.DecodeSettings(8)
    with caplog.at_level("WARNING", logger="helpers.speed"):
        got = speed.greedy_decode(model, prompts, pad_id=pad, max_new_tokens=6, settings=settings)
    assert got == want and rows == [8, 4, 2, 2, 2, 2] and settings.batch_size == 2
    assert [r.getMessage() for r in caplog.records] == [
        f"decoding ran out of accelerator memory with {n} rows at once; going on with at most {n // 2} (lower the "
        "recipe's batch size to skip the failed attempt)" for n in (8, 4)]
    monkeypatch.setattr(model, "generate", lambda **kwargs: (_ for _ in ()).throw(torch.OutOfMemoryError("CUDA")))
    with pytest.raises(torch.OutOfMemoryError):  # a single row that does not fit cannot be split
        speed.greedy_decode(model, prompts[:3], pad_id=pad, max_new_tokens=6, settings=speed.DecodeSettings(4))


def test_what_counts_as_running_out_of_memory():
    assert speed.out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert speed.out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert speed.out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't "
                                            "allocate memory: you tried to allocate 8 bytes. Error code 12 (Cannot "
                                            "allocate memory)")) is False
    assert not speed.out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not speed.out_of_memory(ValueError("out of memory"))


def test_training_that_runs_out_of_memory_says_which_recipe_setting_to_change():
    allocator = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    with pytest.raises(torch.OutOfMemoryError) as caught:
        with speed.training_memory_hint("SFT", per_pass=16, accumulation=2, checkpointing=False):
            raise allocator
    said = str(caught.value)
    assert said.startswith("SFT ran out of GPU memory with 16 examples per forward pass (2 passes per optimizer step)")
    assert "give the notebook 8 examples per pass in the recipe (06_sft and 07_rrhf: micro_batch_size;" in said
    assert "each optimizer step still sees 32, in 4 passes" in said and "activation checkpointing" in said
    assert caught.value.__cause__ is allocator  # the allocator's own report stays in the traceback
    with pytest.raises(torch.OutOfMemoryError, match="one example per pass is already the least") as caught:
        with speed.training_memory_hint("RRHF", per_pass=1, accumulation=4, checkpointing=True):
            raise RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)")
    assert "activation checkpointing" not in str(caught.value)  # already on
    with pytest.raises(ValueError, match="not memory"):  # anything else passes through untouched
        with speed.training_memory_hint("SFT", per_pass=4, accumulation=1, checkpointing=False):
            raise ValueError("not memory")


def test_fitting_batches_halve_a_part_that_runs_out_of_memory_and_keep_to_the_size_that_fitted():
    tried, done = [], []

    def squares(part):
        tried.append(len(part))
        if len(part) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return [x * x for x in part]

    results, limit = speed.fitting_batches(squares, list(range(10)), 4, "squaring", done.append)
    assert results == [x * x for x in range(10)] and limit == 2
    assert tried == [4, 2, 2, 2, 2, 2] and done == [2, 2, 2, 2, 2]  # 0-3 failed once; 4-7 was cut before it ran
    never_fits = lambda part: (_ for _ in ()).throw(torch.OutOfMemoryError("CUDA out of memory"))  # noqa: E731
    with pytest.raises(torch.OutOfMemoryError):
        speed.fitting_batches(never_fits, [1, 2, 3], 4, "failing")  # 3, then 1: nothing smaller than one item
    with pytest.raises(ValueError, match="not memory"):
        speed.fitting_batches(lambda part: (_ for _ in ()).throw(ValueError("not memory")), [1, 2], 2, "failing")
    with pytest.raises(RuntimeError, match="losing: 1 results for 2 items"):
        speed.fitting_batches(lambda part: part[:1], [1, 2], 2, "losing")
