"""The agent at inference: batched greedy calls, the per-model cache, long prompts, and `t2ibook suggest`."""
import json

import pytest

from helpers import agent as agent_module, models
from helpers.agent import Agent, ApiCallCache, fit_prompt, model_identity
from helpers.sft import training_base_dtype


@pytest.fixture(scope="module")
def llm_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("agent") / "llm"
    models.build_tiny_llama(folder, seed=0)
    return folder


@pytest.fixture(scope="module")
def tiny_agent(llm_folder):
    return Agent.load(llm_folder)


def test_calls_come_back_in_order_and_repeats_are_decoded_once(tiny_agent, tmp_path, monkeypatch):
    prompts = ["a red fox", "a very long prompt about a castle on a hill at dawn", "a red fox", "cat"]
    cache = ApiCallCache(tmp_path / "calls.jsonl")
    decoded = []
    original = tiny_agent._decode
    monkeypatch.setattr(tiny_agent, "_decode", lambda todo, *a: decoded.append(len(todo)) or original(todo, *a))
    texts = tiny_agent.api_calls(prompts, max_new_tokens=8, batch_size=2, cache=cache, progress=False)
    assert len(texts) == 4 and texts[0] == texts[2] and decoded == [3]
    # one at a time gives the same answers as the length-sorted batches
    assert [tiny_agent.api_calls([p], max_new_tokens=8, progress=False)[0] for p in prompts] == texts


def test_cached_calls_are_read_back_without_decoding(tiny_agent, tmp_path, monkeypatch):
    path = tmp_path / "calls.jsonl"
    first = tiny_agent.api_calls(["a lighthouse"], max_new_tokens=8, cache=ApiCallCache(path), progress=False)
    monkeypatch.setattr(tiny_agent, "_decode", lambda *a: pytest.fail("decoded a cached prompt"))
    assert tiny_agent.api_calls(["a lighthouse"], max_new_tokens=8, cache=ApiCallCache(path), progress=False) == first
    with open(path, "a") as handle:
        handle.write('{"key": "torn')  # a crash mid-write leaves a torn last line; it is skipped
    assert len(ApiCallCache(path).texts) == 1


def test_other_decoding_settings_are_other_cache_entries(tiny_agent):
    assert ApiCallCache.key(tiny_agent.model_id, "p", {"max_new_tokens": 8}) != \
        ApiCallCache.key(tiny_agent.model_id, "p", {"max_new_tokens": 9})


def test_a_model_that_trains_next_is_loaded_in_fp32_unless_a_lora_base_outside_fsdp(monkeypatch):
    from types import SimpleNamespace

    import torch

    ctx = SimpleNamespace(dtype=torch.bfloat16)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert training_base_dtype(ctx, use_lora=True) == torch.bfloat16
    assert training_base_dtype(ctx, use_lora=False) == torch.float32
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # as `accelerate launch --config_file fsdp.yaml` sets it
    assert training_base_dtype(ctx, use_lora=True) == torch.float32


def test_a_run_loads_its_agent_in_the_runs_dtype_unless_every_weight_trains(llm_folder, tmp_path, monkeypatch):
    """On a GPU the run's dtype is bf16 (forced here on the CPU): the agent decodes in it, as `t2ibook bench`
    times decoding; one that trains in all its weights next (RRHF without LoRA) is loaded in fp32. An answer
    written in one dtype is not read back for the other."""
    import torch

    from helpers import config, device

    monkeypatch.setattr(device, "pick_dtype", lambda name: torch.bfloat16)
    ctx = config.setup("tiny", 0, quiet=True)
    assert ctx.dtype == torch.bfloat16
    decoding = Agent.for_run(llm_folder, ctx)
    training = Agent.for_run(llm_folder, ctx, dtype=training_base_dtype(ctx, use_lora=False))
    assert {p.dtype for p in decoding.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in training.model.parameters()} == {torch.float32}
    assert decoding.decoding(8) == {"strategy": "greedy", "max_new_tokens": 8, "dtype": "bfloat16"}
    cache = ApiCallCache(tmp_path / "calls.jsonl")
    written = training.api_calls(["a heron"], max_new_tokens=4, cache=cache, progress=False)
    monkeypatch.setattr(decoding, "_decode", lambda todo, *a: {key: "decoded in bf16" for key in todo})
    assert decoding.api_calls(["a heron"], max_new_tokens=4, cache=cache, progress=False) == ["decoded in bf16"]
    assert training.api_calls(["a heron"], max_new_tokens=4, cache=cache, progress=False) == written


def test_a_very_long_prompt_is_cut_to_fit_the_context(tiny_agent):
    prompt = "castle " * 5000
    budget = tiny_agent.prompt_budget(16)
    cut, truncated = fit_prompt(tiny_agent.tokenizer, prompt, budget)
    assert truncated and len(tiny_agent.tokenizer(cut, add_special_tokens=False)["input_ids"]) <= budget + 2
    assert len(tiny_agent.api_calls([prompt], max_new_tokens=16, progress=False)) == 1


def test_model_identity_follows_the_files(llm_folder, tmp_path):
    import shutil

    copy = tmp_path / "stage" / "model"
    shutil.copytree(llm_folder, copy)
    assert model_identity(copy) == model_identity(llm_folder)
    # a finished stage's manifest gives the same id without hashing the files again
    from helpers.manifest import hash_tree

    (copy.parent / "manifest.json").write_text(json.dumps({"outputs": hash_tree(copy.parent, copy.parent)}))
    assert model_identity(copy) == model_identity(llm_folder)
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    assert model_identity(llm_folder) != agent_module.sha256_json(hash_tree(copy))


# ------------------------------------------------------------------------------------------ t2ibook suggest

@pytest.fixture
def suggest_root(book_root, llm_folder):
    """A book root with a tiny DABench (three models) and the tiny LLM as the agent."""
    records = []
    for index, (name, arch) in enumerate([("AlphaMix", "SD 1.5"), ("BetaXL", "SDXL 1.0"), ("Gamma", "SD 1.5")]):
        records.append({"id": index, "split": "test", "architecture": arch, "model_id": index,
                        "model_version_id": 100 + index, "lora_base": None,
                        "api": {"model": name, "type": "Checkpoint", "model_description": f"{name} draws."}})
    dabench = book_root / "data" / "runs" / "tiny" / "04_build_dabench" / "dabench.jsonl"
    dabench.parent.mkdir(parents=True)
    dabench.write_text("".join(json.dumps(r) + "\n" for r in records))
    return book_root


@pytest.mark.parametrize("prompt", ["a cute corgi, pixel art", "un chat roux qui dort sur un canapé, peinture à l'huile",
                                    "一只在雪地里的狐狸", "🐶🌈✨ corgi party 🎉", "castle on a hill " * 2000])
def test_suggest_answers_any_prompt_without_a_traceback(suggest_root, llm_folder, prompt, capsys):
    from helpers.cli import main

    assert main(["suggest", prompt, "--model", str(llm_folder), "--max-new-tokens", "24"]) == 0
    out = capsys.readouterr().out
    assert "verdict: " in out and "Traceback" not in out
    assert ("cut to fit" in out) == (len(prompt) > 1000)


def test_suggest_rejects_an_empty_prompt_and_a_missing_agent(suggest_root, capsys):
    from helpers.cli import main

    assert main(["suggest", "   "]) == 2
    assert "the prompt is empty" in capsys.readouterr().err
    assert main(["suggest", "a fox"]) == 2  # no trained agent in this book root yet
    assert "run notebooks 06–07 first" in capsys.readouterr().err


def test_suggest_generate_writes_the_image(suggest_root, llm_folder, tmp_path, capsys):
    from PIL import Image

    from helpers.cli import main

    out = tmp_path / "img.png"
    assert main(["suggest", "a lighthouse at night", "--model", str(llm_folder), "--max-new-tokens", "16",
                 "--generate", "--out", str(out), "--max-side", "32"]) == 0
    printed = capsys.readouterr().out
    assert "generate: " in printed and out.is_file()
    with Image.open(out) as image:
        assert max(image.size) == 32
