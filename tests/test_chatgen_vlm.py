"""The tiny LLaVA chat model: built from a tiny Llama, loaded through the Auto classes, images change the logits."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import models
from helpers.chatgen.vlm import (IMAGE_TOKEN, VLM_CHAT_TEMPLATE, ChatModel, build_tiny_vlm, load_chat_model,
                                 multimodal_messages, sft_batch)

CHAT = [{"role": "user", "content": "a cozy cabin like this one, but in winter"}]


def noise_image(seed: int, size=(40, 48)) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (*size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    models.build_tiny_llama(root / "llama", seed=0)
    counts = build_tiny_vlm(root / "vlm", root / "llama", seed=0, image_size=32)
    return root / "llama", root / "vlm", counts


@pytest.fixture(scope="module")
def vlm(folders):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    _, folder, _ = folders
    return AutoModelForImageTextToText.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)


def test_build_counts_card_and_config(folders, vlm):
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    _, folder, counts = folders
    model, processor = vlm
    assert isinstance(model, LlavaForConditionalGeneration) and isinstance(processor, LlavaProcessor)
    assert counts["parameters"] == sum(p.numel() for p in model.parameters())
    assert counts["parameters"] == counts["vision_parameters"] + counts["projector_parameters"] + \
        counts["language_parameters"]
    assert counts["image_seq_length"] == model.config.image_seq_length == (32 // 8) ** 2
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == \
        counts["image_token_id"] == counts["vocab_size"] - 1
    assert processor.image_token == IMAGE_TOKEN and processor.chat_template == VLM_CHAT_TEMPLATE
    assert "random-weight stand-in" in (folder / "README.md").read_text().lower()
    # the saved config names the LLM's folder, not its absolute path (which differs between clones of the book)
    saved = json.loads((folder / "config.json").read_text())
    assert saved["text_config"]["_name_or_path"] == "llama" and str(folders[0]) not in json.dumps(saved)


def test_language_model_weights_are_the_llms(folders, vlm):
    llama, _, _ = folders
    model, _ = vlm
    lm, tokenizer = models.load_causal_lm(str(llama))
    old_vocab = len(tokenizer)
    mine = model.model.language_model.state_dict()
    for key, value in lm.model.state_dict().items():
        expected = value[:old_vocab] if key == "embed_tokens.weight" else value
        got = mine[key][:old_vocab] if key == "embed_tokens.weight" else mine[key]
        assert torch.equal(got, expected), key
    assert torch.equal(model.lm_head.weight[:old_vocab], lm.lm_head.weight)
    assert model.lm_head.weight.shape[0] == old_vocab + 1  # the <image> row
    # with no image in the chat, the VLM is the LM: same logits on the old vocabulary
    ids = torch.tensor([tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits[..., :old_vocab], lm(input_ids=ids).logits, atol=1e-5)


def test_chat_template_renders_text_like_the_llm_and_places_the_image(vlm):
    _, processor = vlm
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, *CHAT]
    tokenizer = processor.tokenizer
    assert tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True) == \
        tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True,
                                      chat_template=models.CHAT_TEMPLATE)
    text = processor.apply_chat_template(multimodal_messages(history, noise_image(0)), add_generation_prompt=True)
    assert text.count(IMAGE_TOKEN) == 1
    assert f"<|im_start|>user\n{IMAGE_TOKEN}\n{CHAT[0]['content']}<|im_end|>" in text  # in the last user turn


def test_image_changes_the_logits(vlm):
    model, processor = vlm
    logits = []
    for seed in (0, 1):
        batch = processor.apply_chat_template([multimodal_messages(CHAT, noise_image(seed))], tokenize=True,
                                              return_dict=True, return_tensors="pt", add_generation_prompt=True)
        # the processor expands the one <image> to image_seq_length placeholders (CLS dropped)
        assert (batch["input_ids"] == model.config.image_token_id).sum() == model.config.image_seq_length
        assert batch["pixel_values"].shape == (1, 3, 32, 32)
        with torch.no_grad():
            logits.append(model(**batch).logits)
    assert all(torch.isfinite(item).all() for item in logits)
    assert logits[0].shape == logits[1].shape and not torch.allclose(logits[0], logits[1])


def test_chat_model_generates_text_and_text_with_image(folders):
    llama, folder, _ = folders
    chat = load_chat_model(folder)
    assert isinstance(chat, ChatModel) and chat.is_multimodal
    reply = chat.generate(CHAT, max_new_tokens=4)
    assert isinstance(reply, str)
    assert isinstance(chat.generate(CHAT, images=noise_image(0), max_new_tokens=4), str)
    # a batch mixing a chat with an image and one without, each as when generated alone (greedy)
    other = [{"role": "user", "content": "now a castle at night, please"}]
    batched = chat.generate([CHAT, other], images=[noise_image(0), None], max_new_tokens=4)
    assert isinstance(batched, list) and len(batched) == 2 and all(isinstance(r, str) for r in batched)
    assert batched[0] == chat.generate(CHAT, images=noise_image(0), max_new_tokens=4)

    text_only = load_chat_model(llama)
    assert not text_only.is_multimodal
    assert isinstance(text_only.generate(CHAT, max_new_tokens=4), str)
    with pytest.warns(UserWarning, match="text-only"):
        assert len(text_only.generate([CHAT, other], images=[noise_image(0), None], max_new_tokens=4)) == 2
    with pytest.raises(ValueError, match="one image"):
        chat.generate([CHAT, other], images=[noise_image(0)])


def test_sft_step_updates_projector_and_language_model(folders):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    _, folder, _ = folders
    model = AutoModelForImageTextToText.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    conversations = [[*CHAT, {"role": "assistant", "content": "a snowy cabin, warm light"}],
                     [{"role": "user", "content": "something calm"}, {"role": "assistant", "content": "a lake"}]]
    batch = sft_batch(processor, conversations, images=[noise_image(0), None])
    # the loss is on the assistant replies only (and their <|im_end|>), whatever the padding
    for row, conversation in zip(batch["labels"], conversations):
        reply = processor.tokenizer.decode(row[row != -100])
        assert reply == conversation[-1]["content"] + "<|im_end|>"
    projector = {k: v.clone() for k, v in model.model.multi_modal_projector.state_dict().items()}
    language = {k: v.clone() for k, v in model.model.language_model.state_dict().items()}
    model.train()
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss.backward()
    optimizer.step()
    for before, module in ((projector, model.model.multi_modal_projector), (language, model.model.language_model)):
        after = module.state_dict()
        assert all(not torch.equal(before[k], after[k]) for k in before), \
            [k for k in before if torch.equal(before[k], after[k])]


def test_saved_folder_reloads_identically(folders, vlm, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model, processor = vlm
    model.save_pretrained(tmp_path / "again")
    processor.save_pretrained(tmp_path / "again")
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "again").eval()
    reprocessor = AutoProcessor.from_pretrained(tmp_path / "again")
    conversation = [multimodal_messages(CHAT, noise_image(3))]
    kwargs = dict(tokenize=True, return_dict=True, return_tensors="pt", add_generation_prompt=True)
    batch, rebatch = processor.apply_chat_template(conversation, **kwargs), \
        reprocessor.apply_chat_template(conversation, **kwargs)
    assert all(torch.equal(batch[k], rebatch[k]) for k in batch)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reloaded(**rebatch).logits)
    # and the built folder itself gives the same logits as a second build from the same seed
    second = tmp_path / "second"
    build_tiny_vlm(second, folders[0], seed=0, image_size=32)
    with torch.no_grad():
        assert torch.equal(AutoModelForImageTextToText.from_pretrained(second).eval()(**batch).logits,
                           model(**batch).logits)


def test_tied_embeddings_stay_tied(folders, tmp_path):
    """SmolLM2 (the small profile's LM) ties input and output embeddings; the VLM keeps them one tensor."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    llama, _, _ = folders
    config = LlamaConfig.from_pretrained(llama)
    config.tie_word_embeddings = True
    torch.manual_seed(2)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "tied_llama")
    AutoTokenizer.from_pretrained(llama).save_pretrained(tmp_path / "tied_llama")
    counts = build_tiny_vlm(tmp_path / "tied_vlm", tmp_path / "tied_llama", seed=0)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "tied_vlm")
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    assert counts["parameters"] == sum(p.numel() for p in model.parameters())  # the shared tensor counted once
    lm = LlamaForCausalLM.from_pretrained(tmp_path / "tied_llama")
    assert torch.equal(model.lm_head.weight[:-1], lm.lm_head.weight)


def test_the_language_tower_is_the_chat_models_text_model(folders, vlm, tmp_path):
    from helpers.chatgen.vlm import language_tower

    llama, folder, _ = folders
    model, processor = vlm
    assert language_tower(llama, tmp_path / "unused") == str(llama)  # a causal LM is its own tower
    tower_path = language_tower(folder, tmp_path / "tower")
    tower, tokenizer = models.load_causal_lm(tower_path)
    assert len(tokenizer) == len(processor.tokenizer) and IMAGE_TOKEN in tokenizer.get_vocab()
    ids = torch.tensor([tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)["input_ids"]])
    with torch.no_grad():  # without an image, the chat model and its tower give the same logits, <image> row included
        assert torch.allclose(model(input_ids=ids).logits, tower(input_ids=ids).logits, atol=1e-5)


def test_the_language_tower_keeps_the_chat_models_dtype(vlm, tmp_path):
    from transformers import AutoModelForCausalLM

    from helpers.chatgen.vlm import language_tower

    model, processor = vlm
    half = tmp_path / "bf16"
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(half)  # the shared fixture stays in float32
    processor.save_pretrained(half)
    tower = AutoModelForCausalLM.from_pretrained(language_tower(half, tmp_path / "tower"), dtype="auto")
    assert tower.dtype == torch.bfloat16  # a 7B chat model's text model is not written out at twice its size
    assert torch.equal(tower.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))


def test_chat_replies_that_run_out_of_memory_are_answered_in_halves(folders, monkeypatch):
    llama, _, _ = folders
    chat = load_chat_model(llama)
    chats = [CHAT, [{"role": "user", "content": "now a castle at night, please"}],
             [{"role": "user", "content": "a harbour in the rain"}]]
    one_by_one = chat.generate(chats, max_new_tokens=4, batch_size=1)
    real_generate, rows = chat.model.generate, []

    def generate(**kwargs):
        rows.append(len(kwargs["input_ids"]))
        if len(kwargs["input_ids"]) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real_generate(**kwargs)

    monkeypatch.setattr(chat.model, "generate", generate)
    assert chat.generate(chats, max_new_tokens=4, batch_size=4) == one_by_one
    assert rows == [3, 1, 1, 1]
