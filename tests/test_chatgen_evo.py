"""ChatGen-Base / ChatGen-Evo on tiny random models: formats, SFT paths, stage order, junk answers, end to end."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Killed, kill_after_checkpoint, steps_run
from PIL import Image

from helpers import models
from helpers.api_call import DEFAULT_PARAMETERS
from helpers.chatgen import ARGUMENT_FIELDS, TASK_PREFIXES, ChatSample, Prediction, target_from_record
from helpers.chatgen import evo
from helpers.chatgen.model_tokens import ModelTokenHead
from helpers.chatgen.vlm import build_tiny_vlm, load_chat_model
from helpers.t2i import ModelCatalog

MODELS = {"AnimeMix v2": ("SD 1.5", "Checkpoint", "anime"), "RealPhoto XL": ("SDXL 1.0", "Checkpoint", "photo"),
          "OilCanvas v1": ("SD 1.5", "LORA", "oil painting")}
SUBJECTS = ["a fox in the snow", "a castle on a hill", "a robot in the rain", "a bowl of ramen"]


def dabench_record(model: str, version: int, i: int, split: str = "train") -> dict:
    architecture, model_type, style = MODELS[model]
    side = 1024 if architecture == "SDXL 1.0" else 512
    return {"id": f"{version}-{i}", "image_id": 100 * version + i, "model_id": version, "model_version_id": version,
            "architecture": architecture, "lora_base": None, "seed": i, "split": split,
            "instruction": {"prompt": f"{SUBJECTS[i % 4]}, {style} style, {model} demo {i}",
                            "negative_prompt": "blurry"},
            "api": {"model": model, "type": model_type, "base_model": architecture, "width": side,
                    "height": side + 64 * (i % 2), "sampling_method": "DPM++ 2M Karras", "sampling_steps": 20 + i,
                    "cfg_scale": 5.0 + i, "model_description": f"{model} makes {style} pictures"},
            "description_provenance": {"backend": "template", "stand_in": True, "fallback": False}}


RECORDS = [dabench_record(name, version, i, "test" if i == 3 else "train")
           for version, name in enumerate(MODELS, 1) for i in range(4)]
CATALOG = ModelCatalog.from_records(RECORDS)
NAMES = list(MODELS)


def chat_sample(record: dict, input_type: str, split: str = "test") -> ChatSample:
    wish = f"I'd love a picture of {SUBJECTS[int(record['id'].split('-')[1]) % 4]}"
    messages = {"single": [{"role": "user", "content": f"Hi! {wish}, please."}],
                "multimodal": [{"role": "user", "content": f"Like the picture I attached: {wish}."}],
                "history": [{"role": "user", "content": wish}, {"role": "assistant", "content": "Any style?"},
                            {"role": "user", "content": "Make it look nice and calm."}]}[input_type]
    return ChatSample(id=f"{record['id']}-{input_type}", dabench_id=record["image_id"], input_type=input_type,
                      role="a retired sailor", messages=messages, target=target_from_record(record),
                      image_key=f"img-{record['id']}" if input_type == "multimodal" else None, split=split,
                      notes={"dabench_record_id": record["id"]})


# test chats from each model's test record, one per input type; training chats from train records
TEST = [chat_sample(RECORDS[3], "single"), chat_sample(RECORDS[7], "multimodal"), chat_sample(RECORDS[11], "history")]
TRAIN = [chat_sample(RECORDS[0], "single", "train"), chat_sample(RECORDS[4], "multimodal", "train"),
         chat_sample(RECORDS[8], "history", "train")]
IMAGES = {s.image_key: Image.fromarray(np.random.RandomState(i).randint(0, 256, (40, 48, 3), dtype=np.uint8))
          for i, s in enumerate(TEST + TRAIN) if s.image_key}
image_for = IMAGES.__getitem__


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("evo")
    models.build_tiny_llama(root / "llama", seed=0)
    build_tiny_vlm(root / "vlm", root / "llama", seed=0, image_size=32)
    return root / "llama", root / "vlm"


@pytest.fixture(scope="module")
def text_chat(folders):
    return load_chat_model(folders[0])


@pytest.fixture(scope="module")
def head(folders):
    model, tokenizer = models.load_causal_lm(str(folders[0]))
    return ModelTokenHead(model, NAMES, tokenizer), tokenizer


def sft_config(tmp_path, **overrides):
    from helpers.sft import AgentSFTConfig

    settings = dict(output_dir=str(tmp_path / "trainer"), max_steps=2, per_device_train_batch_size=3,
                    learning_rate=1e-2, report_to="none", save_strategy="no", use_cpu=True, logging_steps=1,
                    max_length=256, disable_tqdm=True, seed=0)
    return AgentSFTConfig(**{**settings, **overrides})


class Spy:
    """Stands in for ChatModel.generate: records every batch of chats and answers with `answer(chat)`."""

    def __init__(self, answer):
        self.answer, self.calls = answer, []

    def __call__(self, conversations, images=None, max_new_tokens=64, batch_size=8, **kwargs):
        self.calls.append({"conversations": conversations, "images": images})
        return [self.answer(c) for c in conversations]


# ------------------------------------------------------------------------------------------- formats

@pytest.mark.parametrize("sample", TEST, ids=lambda s: s.input_type)
def test_base_example_is_a_trl_prompt_completion(sample, folders):
    from transformers import AutoTokenizer
    from trl.data_utils import apply_chat_template, is_conversational

    example = evo.base_example(sample)
    assert set(example) == {"prompt", "completion"} and is_conversational(example)
    assert example["prompt"] == sample.messages and example["prompt"] is not sample.messages
    assert example["completion"][0]["role"] == "assistant" and len(example["completion"]) == 1
    answer = json.loads(example["completion"][0]["content"])
    assert list(answer) == list(evo.BASE_FIELDS)
    assert "type" not in answer and "base_model" not in answer
    assert answer == {key: sample.target[key] for key in evo.BASE_FIELDS}
    # TRL renders it: the completion is the answer and the end-of-turn token
    rendered = apply_chat_template(example, AutoTokenizer.from_pretrained(folders[0]))
    assert rendered["prompt"].endswith("<|im_start|>assistant\n")
    assert rendered["completion"].startswith(example["completion"][0]["content"] + "<|im_end|>")
    with_image = evo.base_example(sample, image_for)
    if sample.image_key:
        assert with_image["images"] == [IMAGES[sample.image_key]]
    else:
        assert "images" not in with_image


def test_prompt_writing_example_prefixes_the_last_user_turn_only():
    sample = TEST[2]  # history: three turns
    example = evo.prompt_writing_example(sample)
    assert example["prompt"][:-1] == sample.messages[:-1]
    assert example["prompt"][-1]["content"] == f"{TASK_PREFIXES['prompt']} {sample.messages[-1]['content']}"
    assert not sample.messages[-1]["content"].startswith("[")  # the sample itself is untouched
    assert json.loads(example["completion"][0]["content"]) == {"prompt": sample.target["prompt"],
                                                               "negative_prompt": sample.target["negative_prompt"]}
    with pytest.raises(ValueError, match="task="):
        evo.task_messages(sample.messages, "drawing")


# ------------------------------------------------------------------------------------------- training

def test_text_sft_trains_and_saves_a_loadable_model(folders, tmp_path):
    llama, _ = folders
    before = {k: v.clone() for k, v in models.load_causal_lm(str(llama))[0].state_dict().items()}
    result = evo.train_base(str(llama), TRAIN, sft_config(tmp_path), tmp_path / "base", image_for=image_for)
    assert result["steps"] == 2 and math.isfinite(result["last_loss"]) and not result["multimodal"]
    assert result["images_dropped"] == 1  # the multimodal training chat went in as text
    trained = load_chat_model(tmp_path / "base")
    assert not trained.is_multimodal
    unchanged = [k for k, v in trained.model.state_dict().items() if torch.equal(v, before[k])]
    assert unchanged == []
    card = (tmp_path / "base" / "README.md").read_text()
    assert "ChatGen-Base" in card and "left out" in card
    assert isinstance(trained.generate(TEST[0].messages, max_new_tokens=4), str)


def test_vlm_loss_is_on_the_final_reply_only(folders):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folders[1])
    examples = [evo.prompt_writing_example(s, image_for) for s in (TRAIN[2], TRAIN[1])]  # history, multimodal
    batch = evo.final_reply_batch(processor, [e["prompt"] + e["completion"] for e in examples],
                                  [None, examples[1]["images"][0]])
    assert "pixel_values" in batch
    for row, example in zip(batch["labels"], examples):
        # the history chat's earlier assistant turn ("Any style?") is input, not a target
        assert processor.tokenizer.decode(row[row != -100]) == example["completion"][0]["content"] + "<|im_end|>"


def test_vlm_sft_trains_with_the_image_and_saves_a_loadable_model(folders, tmp_path):
    from transformers import AutoModelForImageTextToText

    _, vlm = folders
    before = AutoModelForImageTextToText.from_pretrained(vlm).state_dict()
    before = {k: v.clone() for k, v in before.items()}
    with pytest.raises(ValueError, match="image_for"):
        evo.train_stage1(str(vlm), TRAIN, sft_config(tmp_path), tmp_path / "stage1")
    # batch of 3 = every training chat in every step, so the image (and the projector) is in each step
    result = evo.train_stage1(str(vlm), TRAIN, sft_config(tmp_path), tmp_path / "stage1", image_for=image_for)
    assert result["multimodal"] and result["steps"] == 2 and math.isfinite(result["last_loss"])
    trained = load_chat_model(tmp_path / "stage1")
    assert trained.is_multimodal
    after = trained.model.state_dict()
    for part in ("multi_modal_projector", "language_model"):
        keys = [k for k in before if part in k]
        assert keys and all(not torch.equal(before[k], after[k]) for k in keys), part
    assert "prompt writing" in (tmp_path / "stage1" / "README.md").read_text()
    assert isinstance(trained.generate(TEST[1].messages, images=image_for(TEST[1].image_key), max_new_tokens=4), str)


@pytest.mark.parametrize("path", ["text", "vlm"])
def test_without_a_step_limit_both_paths_train_for_the_epochs_asked(folders, tmp_path, path):
    """The paper recipe trains ChatGen-Base and Evo stage 1 for one epoch (sft_steps -1): 3 chats in batches of 2
    are 2 steps an epoch, so 2 epochs are 4 steps on either path (a last, short batch is a step of its own)."""
    model = folders[0] if path == "text" else folders[1]
    config = sft_config(tmp_path, max_steps=-1, num_train_epochs=2, per_device_train_batch_size=2)
    result = evo.train_base(str(model), TRAIN, config, tmp_path / "base", image_for=image_for)
    assert result["multimodal"] == (path == "vlm")
    assert result["steps"] == 4 and math.isfinite(result["last_loss"])


def test_the_vlm_path_trains_in_the_precision_and_with_the_checkpointing_its_config_asks_for(folders, tmp_path,
                                                                                              monkeypatch):
    """The image-text path builds its own TrainingArguments from the SFT config: bf16 and activation checkpointing
    reach it as they reach the text path (the paper recipe's 2B model needs ~75 GB in fp32 without them, ~41 GB
    with both)."""
    from transformers import Trainer

    _, vlm = folders
    seen = []
    train = Trainer.train

    def spy(self, *args, **kwargs):
        result = train(self, *args, **kwargs)
        seen.append((self.args.bf16, self.model.is_activation_checkpointing))
        return result
    monkeypatch.setattr(Trainer, "train", spy)
    for bf16, checkpointing in ((True, True), (False, False)):
        config = sft_config(tmp_path, max_steps=1, bf16=bf16, gradient_checkpointing=checkpointing)
        result = evo.train_stage1(str(vlm), TRAIN, config, tmp_path / f"stage1-{bf16}", image_for=image_for)
        assert result["multimodal"] and math.isfinite(result["last_loss"])
    assert seen == [(True, True), (False, False)]


def test_vlm_sft_reads_images_with_their_batches_and_resumes_from_its_checkpoint(folders, tmp_path, monkeypatch):
    """Reference images given as cache keys are read batch by batch (never all at once), train exactly as the
    images themselves, and a run killed after its step-2 checkpoint ends where an unbroken run ends."""
    from safetensors.torch import load_file
    from transformers import Trainer

    _, vlm = folders
    chats = [e["prompt"] + e["completion"] for e in (evo.prompt_writing_example(s) for s in TRAIN)]
    keys = [s.image_key or None for s in TRAIN]
    assert any(keys)
    common = dict(steps=4, lr=1e-2, batch_size=1, use_cpu=True, disable_tqdm=True, seed=0)
    evo.train_vlm_sft(str(vlm), chats, [image_for(k) if k else None for k in keys], tmp_path / "whole", **common)
    with pytest.raises(ValueError, match="pass image_for"):
        evo.train_vlm_sft(str(vlm), chats, keys, tmp_path / "model", **common)

    reads = []

    def read(key):
        reads.append(key)
        return image_for(key)

    lazily = dict(image_for=read, checkpoints=tmp_path / "checkpoints", save_steps=2, **common)
    kill_after_checkpoint(monkeypatch, Trainer, 2)
    with pytest.raises(Killed):
        evo.train_vlm_sft(str(vlm), chats, keys, tmp_path / "model", **lazily)
    monkeypatch.undo()
    assert 0 < len(reads) <= 2  # two steps of one chat each: only the batches' own images were read
    ran = steps_run(monkeypatch, Trainer)
    assert evo.train_vlm_sft(str(vlm), chats, keys, tmp_path / "model", **lazily)["steps"] == 4
    assert ran == [2, 3]  # went on from the step-2 checkpoint
    ended, unbroken = (load_file(tmp_path / name / "model.safetensors") for name in ("model", "whole"))
    for name, tensor in unbroken.items():
        torch.testing.assert_close(ended[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_generation_batches_chats_of_similar_length_and_answers_in_input_order(text_chat, monkeypatch):
    spy = Spy(lambda chat: f"reply to {len(chat[-1]['content'])} characters")
    monkeypatch.setattr(text_chat, "generate", spy)
    chats = [[{"role": "user", "content": "x" * n}] for n in (50, 1, 40, 2, 45)]
    replies = evo._generate(text_chat, chats, [None] * 5, 8, batch_size=2, desc="", progress=False)
    assert replies == [f"reply to {n} characters" for n in (50, 1, 40, 2, 45)]
    assert [[len(c[-1]["content"]) for c in call["conversations"]] for call in spy.calls] == [[1, 2], [40, 45], [50]]


# ------------------------------------------------------------------------------------------- stage order

STAGE1_PROMPTS = {s.id: f"written prompt number {i}, golden light" for i, s in enumerate(TEST)}


def stage_answers(chat):
    """Stage 1 answers a JSON prompt per chat; stage 3 answers only sampling_steps."""
    last = chat[-1]["content"]
    if last.startswith(TASK_PREFIXES["prompt"]):
        sample = next(s for s in TEST if last.endswith(s.messages[-1]["content"]))
        return json.dumps({"prompt": STAGE1_PROMPTS[sample.id], "negative_prompt": "ugly"})
    assert last.startswith(TASK_PREFIXES["arguments"])
    return 'Sure: {"sampling_steps": 33}'


def stage3_content(spy, sample_index: int) -> str:
    """TEST[sample_index]'s stage-3 chat, found by its stage-1 prompt (a batch holds chats in length order)."""
    marker = f"Prompt: {STAGE1_PROMPTS[TEST[sample_index].id]}\n"
    [content] = [text for text in ("\n".join(m["content"] for m in chat) for chat in spy.calls[-1]["conversations"])
                 if marker in text]
    return content


def test_stage3_sees_the_stage1_prompt_and_the_stage2_models_demonstrations(text_chat, head, monkeypatch):
    model_head, tokenizer = head
    spy = Spy(stage_answers)
    monkeypatch.setattr(text_chat, "generate", spy)
    contexts = []
    real_select = evo.model_tokens.select_models

    def select_spy(head, tokenizer, given, **kwargs):
        contexts.extend(given)
        return real_select(head, tokenizer, given, **kwargs)

    monkeypatch.setattr(evo.model_tokens, "select_models", select_spy)
    predictions = evo.run_evo(text_chat, model_head, tokenizer, TEST, CATALOG, RECORDS, image_for, k=2,
                              progress=False)
    assert len(spy.calls) == 2  # stage 1, then stage 3
    # stage 2 read each chat with its stage-1 prompt
    assert [c["prompt"] for c in contexts] == [STAGE1_PROMPTS[s.id] for s in TEST]
    assert [c["messages"] for c in contexts] == [s.messages for s in TEST]
    for i, (sample, prediction) in enumerate(zip(TEST, predictions)):
        chosen = prediction.model
        assert chosen in NAMES and prediction.notes["selected_model"] == chosen
        content = stage3_content(spy, i)
        assert f"Prompt: {STAGE1_PROMPTS[sample.id]}\nArguments:" in content and f"Model: {chosen}" in content
        description = CATALOG.lookup(chosen).description  # the paper loads the model's description too
        assert f"About {chosen}: {description}" in content and description.startswith(chosen)
        assert all(m.description not in content for m in CATALOG.models if m.name != chosen and m.description)
        shown = [r for r in RECORDS if r["api"]["model"] == chosen and r["split"] == "train"][:2]
        assert prediction.notes["demonstrations"] == [r["id"] for r in shown]
        for record in RECORDS:  # the selected model's train demonstrations, and nothing else
            assert (record["instruction"]["prompt"] in content) == (record in shown)
        assert prediction.prompt == STAGE1_PROMPTS[sample.id] and prediction.negative_prompt == "ugly"
        assert prediction.arguments["sampling_steps"] == 33 and prediction.valid and prediction.fallback
        assert set(prediction.notes["fallback"]) == set(ARGUMENT_FIELDS) - {"sampling_steps"}


def test_a_different_stage2_choice_changes_the_demonstrations(text_chat, head, monkeypatch):
    model_head, tokenizer = head
    seen = {}
    for forced in ("AnimeMix v2", "RealPhoto XL"):
        spy = Spy(stage_answers)
        monkeypatch.setattr(text_chat, "generate", spy)
        monkeypatch.setattr(evo, "select_models_for", lambda *args, forced=forced, **kwargs: [forced] * len(TEST))
        predictions = evo.run_evo(text_chat, model_head, tokenizer, TEST, CATALOG, RECORDS, k=3, progress=False,
                                  image_for=image_for)
        seen[forced] = (stage3_content(spy, 0), predictions[0])
    (anime_text, anime), (photo_text, photo) = seen["AnimeMix v2"], seen["RealPhoto XL"]
    assert anime.model == "AnimeMix v2" and photo.model == "RealPhoto XL"
    assert set(anime.notes["demonstrations"]).isdisjoint(photo.notes["demonstrations"])
    assert "anime style" in anime_text and "anime style" not in photo_text and "photo style" in photo_text
    # the defaults that fill the missing fields are the selected model's (SDXL: 1024 px)
    assert anime.arguments["width"] == 512 and photo.arguments["width"] == 1024


def test_demonstrations_leave_out_the_samples_own_record_and_other_splits():
    sample = chat_sample(RECORDS[1], "single", "train")  # made from a train record
    shown = evo.demonstrations_for("AnimeMix v2", RECORDS, k=5, sample=sample)
    assert [d["id"] for d in shown] == ["1-0", "1-2"]  # 1-1 is its own record, 1-3 is test
    assert shown[0]["arguments"] == {key: RECORDS[0]["api"][key] for key in ARGUMENT_FIELDS}
    assert evo.demonstrations_for("AnimeMix v2", RECORDS, k=1) == shown[:1]
    assert evo.demonstrations_for("Nobody v0", RECORDS) == []


# ------------------------------------------------------------------------------------------- junk answers

def test_junk_answers_give_empty_prompts_defaults_and_reasons(text_chat, monkeypatch):
    monkeypatch.setattr(text_chat, "generate", Spy(lambda chat: "}{ no json here ]]"))
    stage1 = evo.write_prompts(text_chat, TEST, image_for, progress=False)
    assert all(p.prompt == "" and "unparseable" in p.notes["prompt_problem"] and not p.valid for p in stage1)
    assert "text-only" in stage1[1].notes["text_only"] and "text_only" not in stage1[0].notes
    stage3 = evo.configure_arguments(text_chat, TEST, stage1, ["AnimeMix v2", "RealPhoto XL", None], RECORDS,
                                     CATALOG, progress=False)
    for prediction in stage3[:2]:
        assert prediction.valid and prediction.fallback and "unparseable" in prediction.notes["fallback_reason"]
        assert prediction.arguments == {**{k: v for k, v in DEFAULT_PARAMETERS.items()},
                                        "width": prediction.arguments["width"], "height": prediction.arguments["width"]}
    assert stage3[2].model is None and not stage3[2].valid and stage3[2].notes["invalid"]
    base = evo.run_base(text_chat, TEST, CATALOG, progress=False)
    assert all(p.model is None and not p.valid and p.notes["invalid"].startswith("unparseable") for p in base)


def test_base_answers_are_validated_field_by_field():
    target = TEST[0].target
    good = evo.answer_json(target, evo.BASE_FIELDS)
    parsed = evo.parse_base_answer("s", f"Here you go: {good}", CATALOG)
    assert parsed.valid and not parsed.fallback and parsed.model == target["model"]
    assert parsed.prompt == target["prompt"] and parsed.arguments == {k: target[k] for k in ARGUMENT_FIELDS}
    assert evo.prediction_api(parsed, CATALOG)["base_model"] == "SD 1.5"

    bad_steps = evo.parse_base_answer("s", good.replace('"sampling_steps": 23', '"sampling_steps": 500'), CATALOG)
    assert bad_steps.valid and bad_steps.fallback and list(bad_steps.notes["fallback"]) == ["sampling_steps"]
    assert "steps_out_of_range" in bad_steps.notes["fallback"]["sampling_steps"]
    assert bad_steps.arguments["sampling_steps"] == DEFAULT_PARAMETERS["sampling_steps"]
    assert bad_steps.arguments["cfg_scale"] == target["cfg_scale"]  # the good fields are kept

    unknown = evo.parse_base_answer("s", good.replace("AnimeMix v2", "AnimeMix v9"), CATALOG)
    assert unknown.model is None and not unknown.valid and "unknown_model" in unknown.notes["invalid"]
    assert unknown.notes["named_model"] == "AnimeMix v9" and "AnimeMix v2" in unknown.notes["invalid"]
    no_model = evo.parse_base_answer("s", '{"prompt": "a cat"}', CATALOG)
    assert no_model.model is None and no_model.prompt == "a cat" and "no model" in no_model.notes["invalid"]


# ------------------------------------------------------------------------------------------- end to end

def test_every_input_type_goes_end_to_end(folders, text_chat, head):
    model_head, tokenizer = head
    vlm_chat = load_chat_model(folders[1])
    names = {m.name for m in CATALOG.models}
    for chat in (vlm_chat, text_chat):
        evo_predictions = evo.run_evo(chat, model_head, tokenizer, TEST, CATALOG, RECORDS, image_for,
                                      prompt_tokens=8, argument_tokens=8, progress=False)
        base_predictions = evo.run_base(chat, TEST, CATALOG, image_for, max_new_tokens=8, progress=False)
        for predictions, method in ((evo_predictions, "ChatGen-Evo"), (base_predictions, "ChatGen-Base")):
            assert [p.sample_id for p in predictions] == [s.id for s in TEST]
            assert all(isinstance(p, Prediction) and p.method == method for p in predictions)
            assert all(p.model is None or p.model in names for p in predictions)
            assert all(p.valid or p.notes.get("invalid") for p in predictions)
            assert all(not p.fallback or p.notes.get("fallback") for p in predictions)
            assert ("text_only" in predictions[1].notes) == (not chat.is_multimodal)
        assert all(p.model in NAMES for p in evo_predictions)  # stage 2 always names a catalog model
    baseline = evo.run_baseline(text_chat, TEST, CATALOG, examples=TRAIN[:2], max_new_tokens=8, progress=False)
    assert all(p.model == "Stable Diffusion v1.5" and p.valid and not p.fallback for p in baseline)
    assert all(p.arguments == {**DEFAULT_PARAMETERS, "width": 512, "height": 512} for p in baseline)
    with pytest.raises(ValueError, match="also evaluated"):
        evo.run_baseline(text_chat, TEST, CATALOG, examples=TEST[:1], progress=False)


def test_baseline_prompt_is_few_shot(text_chat, monkeypatch):
    spy = Spy(lambda chat: "\n a red fox, oil painting, soft light\nmore text")
    monkeypatch.setattr(text_chat, "generate", spy)
    [prediction] = evo.run_baseline(text_chat, TEST[2:], CATALOG, examples=TRAIN[:2], base_architecture="SDXL 1.0",
                                    progress=False)
    assert prediction.prompt == "a red fox, oil painting, soft light" and prediction.model == "Stable Diffusion XL 1.0"
    assert prediction.arguments["width"] == 1024 and prediction.valid
    conversation = spy.calls[0]["conversations"][0]
    assert [m["role"] for m in conversation] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert conversation[2]["content"] == TRAIN[0].target["prompt"]
    assert conversation[-1]["content"] == evo.chat_transcript(TEST[2].messages)
    assert conversation[-1]["content"].count("User:") == 2


# ------------------------------------------------------------------------------------------- Table 6


def test_vlm_micro_batches_train_the_same_steps_as_the_whole_batch(folders, tmp_path):
    """3 chats a step as 3 passes of 1 (notebook 11's sft_micro_batch_size): the same losses and weight updates as
    3 at once; the Trainer normalises the reply-token loss over the whole step. Plain SGD without clipping, in
    fp32, so the weights move by the gradient itself: a wrongly scaled one (3x) would show."""
    from safetensors.torch import load_file

    from helpers.sft import micro_batches

    _, vlm = folders
    losses, saved = [], []
    for micro in (0, 1):
        config = sft_config(tmp_path / str(micro), max_steps=2, optim="sgd", max_grad_norm=0.0, bf16=False,
                            **micro_batches(3, micro))
        result = evo.train_stage1(str(vlm), TRAIN, config, tmp_path / f"stage1-{micro}", image_for=image_for)
        assert result["steps"] == 2
        losses.append([row["loss"] for row in json.loads((tmp_path / f"stage1-{micro}" / "log_history.json")
                                                         .read_text()) if "loss" in row])
        saved.append(load_file(tmp_path / f"stage1-{micro}" / "model.safetensors"))
    assert len(losses[0]) == 2 and losses[0] == pytest.approx(losses[1], rel=1e-5)
    before = load_file(next(Path(vlm).glob("*.safetensors")))
    compared = 0
    for name, tensor in saved[0].items():
        whole, split = tensor - before[name], saved[1][name] - before[name]
        if name.endswith("self_attn.k_proj.bias"):  # softmax ignores a key bias: its gradient is float noise
            continue
        if whole.norm() == 0:  # the vision tower's last layer: LLaVA reads the features of the one before
            assert split.norm() == 0, name
            continue
        assert (split - whole).norm() / whole.norm() < 1e-2, name
        compared += 1
    assert compared > len(saved[0]) // 2
