"""AGFSync's data side: prompts, dedup (real MiniLM weights), QA pairs, scores, pairs, noise, dataset, Fig. 7."""
from __future__ import annotations

import json
import math

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from helpers import agfsync
from helpers.textgen import TemplateGenerator, TextGenerator

matplotlib.use("Agg")


class CannedGenerator(TextGenerator):
    """A fake LLM: replies from a list, in order, and remembers what it was asked."""

    name = "canned"

    def __init__(self, replies):
        self.replies = list(replies)
        self.asked = []

    def generate(self, messages_batch, *, max_new_tokens=128, temperature=0.0, seed=0):
        self.asked += messages_batch
        return [self.replies.pop(0) for _ in messages_batch]


# ------------------------------------------------------------------------------------------ categories

def test_the_twelve_categories_each_have_five_examples_of_varied_length():
    assert agfsync.CATEGORIES == (
        "natural landscapes", "cities and architecture", "people", "animals", "plants", "food and beverages",
        "sports and fitness", "art and culture", "technology and industry", "everyday objects", "transportation",
        "abstract and conceptual art")
    assert tuple(agfsync.IN_CONTEXT_EXAMPLES) == agfsync.CATEGORIES
    for category, examples in agfsync.IN_CONTEXT_EXAMPLES.items():
        lengths = [len(example.split()) for example in examples]
        assert len(examples) == len(set(examples)) == 5, category
        assert min(lengths) <= 8 and max(lengths) >= 40, (category, lengths)
        assert all("," in example for example in examples[1:]), category  # subject, details: the stand-in's pieces


def test_prompt_messages_ask_for_count_prompts_one_per_line():
    messages = agfsync.prompt_messages("animals", ["a cat on a wall", "a heron, river, fog"], 7)
    assert [m["role"] for m in messages] == ["system", "user"]
    user = messages[1]["content"]
    assert "Write 7 new prompts" in user and '"animals"' in user and "one per line" in user
    assert "- a cat on a wall\n- a heron, river, fog" in user
    with pytest.raises(ValueError, match="count must be at least 1"):
        agfsync.prompt_messages("animals", ["a cat"], 0)
    with pytest.raises(ValueError, match="no in-context examples"):
        agfsync.prompt_messages("animals", [], 3)


def test_parse_prompts_cleans_messy_llm_output():
    reply = "\n".join([
        "Sure! Here are 6 new prompts about animals:",
        "",
        "1. A heron standing in fog, muted colors",
        "2) \"a snail climbing a wet leaf, macro\"",
        "- **an owl in a library**, candlelight",
        "  * 'koala asleep in a eucalyptus tree',",
        "(5) Prompt 5: a whale breaching at dusk",
        "#6: 3d render of a cartoon frog",
        "Note: these vary in length.",
        "cat",
        "a " + "very " * 70 + "long line",
        "```",
        "I hope these help!",
    ])
    assert agfsync.parse_prompts(reply) == [
        "A heron standing in fog, muted colors",
        "a snail climbing a wet leaf, macro",
        "an owl in a library, candlelight",
        "koala asleep in a eucalyptus tree",
        "a whale breaching at dusk",
        "3d render of a cartoon frog",
    ]
    assert agfsync.parse_prompts(None) == []
    assert agfsync.parse_prompts("a cat\na small cat", min_words=2) == ["a cat", "a small cat"]


# ------------------------------------------------------------------------------------ prompt generation

def test_stand_in_generation_is_seeded_labelled_and_recombines_the_examples():
    template = TemplateGenerator()
    rows = agfsync.generate_prompts(template, per_category=4, seed=0)
    assert rows == agfsync.generate_prompts(template, per_category=4, seed=0)
    assert rows != agfsync.generate_prompts(template, per_category=4, seed=1)
    assert len(rows) == 4 * 12
    assert all(r["stand_in"] is True and r["backend"] == "template" for r in rows)
    assert {r["category"] for r in rows} == set(agfsync.CATEGORIES)
    for row in rows:
        examples = agfsync.IN_CONTEXT_EXAMPLES[row["category"]]
        pieces = {piece.strip() for example in examples for piece in example.split(",")}
        row_pieces = [piece.strip() for piece in row["prompt"].split(",")]
        assert row["prompt"] not in examples
        assert set(row_pieces) <= pieces and 2 <= len(row_pieces) <= 4, row["prompt"]
        assert row_pieces[0] in {example.split(",")[0] for example in examples}  # an example's subject first
    assert len({r["prompt"] for r in rows}) == len(rows)


def test_stand_in_stops_when_the_combinations_run_out():
    # one subject and one detail: a single new combination exists
    assert agfsync.stand_in_prompts("animals", 5, seed=0, examples=["a cat, at night", "a cat"]) == []
    assert agfsync.stand_in_prompts("animals", 5, seed=0, examples=["a cat, at night", "a dog"]) == ["a dog, at night"]


def test_llm_generation_parses_drops_copies_and_caps_each_category():
    categories = ("animals", "plants")
    fox = agfsync.IN_CONTEXT_EXAMPLES["animals"][0]
    replies = ["1. a heron in fog\n2. " + fox + "\n3. a heron in fog\n4. a snail on a leaf",  # animals, request 0
               "- an owl in a barn\nCities and Architecture\n- a bee on clover\n- a moth at a lamp",  # animals, req. 1
               "Here you go:\n1. a cactus in a pot\n2. a moss wall",                         # plants, request 0
               "Sorry, I cannot help with that."]                                             # plants, request 1
    generator = CannedGenerator(replies)
    rows = agfsync.generate_prompts(generator, per_category=4, seed=3, temperature=0.7, categories=categories,
                                    per_request=3)
    assert rows == [
        {"category": "animals", "prompt": "a heron in fog", "backend": "canned", "stand_in": False},
        {"category": "animals", "prompt": "a snail on a leaf", "backend": "canned", "stand_in": False},
        {"category": "animals", "prompt": "an owl in a barn", "backend": "canned", "stand_in": False},
        {"category": "animals", "prompt": "a bee on clover", "backend": "canned", "stand_in": False},
        {"category": "plants", "prompt": "a cactus in a pot", "backend": "canned", "stand_in": False},
        {"category": "plants", "prompt": "a moss wall", "backend": "canned", "stand_in": False},
    ]
    # ceil(4 / 3) = 2 requests per category, each with the examples in a different order
    assert len(generator.asked) == 4  # plants stays under-filled: its second reply was a refusal, not prompts
    assert generator.asked[0][1]["content"] != generator.asked[1][1]["content"]
    assert "Write 3 new prompts" in generator.asked[0][1]["content"]


def test_generate_prompts_rejects_unknown_category():
    with pytest.raises(ValueError, match="'pets' is not one of"):
        agfsync.generate_prompts(TemplateGenerator(), 2, categories=["pets"])


# ------------------------------------------------------------------------------------------------ dedup

@pytest.fixture(scope="module")
def minilm():
    from helpers.models import load_text_encoder, minilm_path

    return load_text_encoder(minilm_path())


DEDUP_PROMPTS = ["a red fox sleeping in the snow",                       # 0
                 "a steaming bowl of ramen with a soft boiled egg",      # 1
                 "A red fox sleeping in snow.",                          # 2 paraphrase of 0 (cos ≈ 0.99)
                 "a fox sleeping in the snow, watercolor",               # 3 near 0 (cos ≈ 0.88)
                 "a cyclist racing down a mountain road",                # 4 unrelated
                 "a bowl of hot ramen topped with a soft-boiled egg"]    # 5 paraphrase of 1 (cos ≈ 0.91)


def test_dedupe_drops_paraphrases_with_real_minilm_and_respects_the_threshold(minilm):
    from sentence_transformers.util import cos_sim

    kept, dropped = agfsync.dedupe_prompts(DEDUP_PROMPTS, minilm, threshold=0.9)
    assert kept == [DEDUP_PROMPTS[i] for i in (0, 1, 3, 4)]
    assert [(d["prompt"], d["duplicate_of"]) for d in dropped] == [(DEDUP_PROMPTS[2], DEDUP_PROMPTS[0]),
                                                                   (DEDUP_PROMPTS[5], DEDUP_PROMPTS[1])]
    # the reported similarity matches an independent cosine of the raw (unnormalised) embeddings
    raw = minilm.encode([DEDUP_PROMPTS[2], DEDUP_PROMPTS[0]], convert_to_tensor=True)
    assert dropped[0]["similarity"] == pytest.approx(float(cos_sim(raw[0], raw[1])), abs=1e-5)
    assert all(d["similarity"] >= 0.9 for d in dropped)

    looser, _ = agfsync.dedupe_prompts(DEDUP_PROMPTS, minilm, threshold=0.85)
    assert looser == [DEDUP_PROMPTS[i] for i in (0, 1, 4)]  # the watercolor fox (≈ 0.88) now goes too
    stricter, dropped_strict = agfsync.dedupe_prompts(DEDUP_PROMPTS, minilm, threshold=0.95)
    assert stricter == [DEDUP_PROMPTS[i] for i in (0, 1, 3, 4, 5)]  # the ramen pair (≈ 0.91) survives
    assert [d["prompt"] for d in dropped_strict] == [DEDUP_PROMPTS[2]]


def test_dedupe_keeps_rows_and_gives_the_same_answer_across_block_boundaries(minilm):
    rows = [{"category": "c", "prompt": p, "stand_in": False} for p in DEDUP_PROMPTS]
    kept, dropped = agfsync.dedupe_prompts(rows, minilm, threshold=0.9, batch_size=2)
    assert kept == [rows[i] for i in (0, 1, 3, 4)]
    assert dropped[0]["category"] == "c" and dropped[0]["duplicate_of"] == DEDUP_PROMPTS[0]
    assert agfsync.dedupe_prompts([], minilm) == ([], [])
    with pytest.raises(ValueError, match="threshold"):
        agfsync.dedupe_prompts(DEDUP_PROMPTS, minilm, threshold=1.5)


def test_category_counts_like_table_3():
    generated = [{"category": c} for c in ["animals"] * 3 + ["plants"] * 2 + ["people"]]
    kept = [{"category": c} for c in ["animals"] * 2 + ["plants"] * 2]
    table = agfsync.category_counts(generated, kept)
    assert list(table.index) == [*agfsync.CATEGORIES, "total"]
    assert table.loc["animals"].tolist() == [3, 2, 1]
    assert table.loc["people"].tolist() == [1, 0, 1]
    assert table.loc["transportation"].tolist() == [0, 0, 0]
    assert table.loc["total"].tolist() == [6, 4, 2]
    assert list(agfsync.category_counts(generated).columns) == ["generated"]


# ------------------------------------------------------------------------------------------- QA pairs

QA_PROMPT = "two ducks swimming under a wooden bridge"


def test_qa_messages_show_the_format_and_every_element_type():
    messages = agfsync.qa_messages("a cat on a red sofa")
    assert [m["role"] for m in messages] == ["system"] + ["user", "assistant"] * len(agfsync.QA_EXAMPLES) + ["user"]
    assert messages[-1]["content"] == "Description: a cat on a red sofa"
    assert all(t in messages[0]["content"] for t in agfsync.ELEMENT_TYPES)
    # every worked example is a reply the book itself accepts in full: each line valid, none dropped
    for question, answer in zip(messages[1:-1:2], messages[2:-1:2]):
        lines = answer["content"].splitlines()
        valid, dropped = agfsync.validate_qa(agfsync.parse_qa(answer["content"]),
                                             question["content"].removeprefix("Description: "))
        assert dropped == [] and len(valid) == len(lines) >= 5


def test_parse_qa_reads_lines_arrays_and_marks_what_is_not_json():
    reply = ('Here are the questions:\n```json\n'
             '{"question": "Are there ducks?", "answer": "yes", "element_type": "animal"},\n'
             '- {"question": "Is there a bridge?", "answer": "yes", "element_type": "object"}\n'
             '2. ["not", "an object"]\n```')
    assert agfsync.parse_qa(reply) == [
        {"unparsed": "Here are the questions:"},
        {"question": "Are there ducks?", "answer": "yes", "element_type": "animal"},
        {"question": "Is there a bridge?", "answer": "yes", "element_type": "object"},
        {"unparsed": '2. ["not", "an object"]'}]
    array = '```json\n[{"question": "Is there a bridge?", "answer": "yes", "element_type": "object"}, 3]\n```'
    assert agfsync.parse_qa(array) == [{"question": "Is there a bridge?", "answer": "yes", "element_type": "object"},
                                       {"unparsed": "3"}]
    assert agfsync.parse_qa("") == []


def test_parse_qa_reads_objects_spread_over_lines_and_several_on_one_line():
    reply = ('{\n  "question": "Are there ducks?",\n  "answer": "yes",\n  "element_type": "animal"\n},\n'
             '{"question": "Is there a bridge?", "answer": "yes", "element_type": "object"}, '
             '{"question": "Is the bridge made of wood?", "answer": "yes", "element_type": "material"} trailing words\n'
             '{\n  "question": "Are the ducks under the bridge?",\n  "answer": "y')  # cut off by max_new_tokens
    items = agfsync.parse_qa(reply)
    assert [item.get("question") for item in items[:3]] == ["Are there ducks?", "Is there a bridge?",
                                                          "Is the bridge made of wood?"]
    # the words after the third object, then each line of the cut-off object, are counted as not JSON
    assert items[3:] == [{"unparsed": "trailing words"}, {"unparsed": "{"},
                         {"unparsed": '"question": "Are the ducks under the bridge?",'}, {"unparsed": '"answer": "y'}]


def test_element_type_names_map_synonyms_and_plurals_only_onto_known_types():
    assert [agfsync.element_type_name(name) for name in ("Person", " colours ", "objects", "Spatial  Relation",
                                                         "count", "human")] == \
        ["human", "color", "object", "spatial", "counting", "human"]
    assert agfsync.element_type_name("Weather") == "weather"  # unknown: left for validation to drop
    valid, dropped = agfsync.validate_qa([{"question": "Is there a man?", "answer": "yes", "element_type": "person"},
                                          {"question": "Is it raining outside?", "answer": "yes",
                                           "element_type": "weather"}], "a man in the rain outside")
    assert [v["element_type"] for v in valid] == ["human"]
    assert [(d["reason"], d["detail"]) for d in dropped] == [("unknown element type", "'weather'")]


def test_validate_qa_keeps_well_formed_questions_and_names_each_drop_reason():
    def qa(question, answer="yes", element_type="object"):
        return {"question": question, "answer": answer, "element_type": element_type}

    long_question = "Is the bridge " + " ".join(["old"] * 25) + "?"
    items = [{"unparsed": "Here are the questions:"},
             qa("Are there two ducks?", element_type="counting"),
             qa("Is the bridge made of wood?", answer="Yes.", element_type=" Material"),
             {"answer": "yes", "element_type": "object"},
             qa("Is there a bridge"),
             qa("Are the ducks flying?", answer="no", element_type="activity"),
             qa("Are there ducks?", element_type="entity"),
             qa("Ducks?", element_type="animal"),
             qa(long_question),
             qa("Is there a castle?"),
             qa("are there  two ducks?", element_type="counting")]
    valid, dropped = agfsync.validate_qa(items, QA_PROMPT)
    assert valid == [{"question": "Are there two ducks?", "answer": "yes", "element_type": "counting"},
                     {"question": "Is the bridge made of wood?", "answer": "yes", "element_type": "material"}]
    assert [d["reason"] for d in dropped] == ["not JSON", "missing field", "no question mark", "answer not yes",
                                              "unknown element type", "too short", "too long", "off prompt",
                                              "duplicate"]
    assert sorted(d["reason"] for d in dropped) == sorted(agfsync.DROP_REASONS)
    assert dropped[1]["detail"] == "question"
    assert dropped[6]["detail"] == "28 > 25 words"


def test_template_qa_turns_a_rich_prompt_into_typed_yes_questions():
    prompt = "two brown dogs running on a sandy beach next to a red wooden boat, watercolor painting"
    questions = agfsync.template_qa(prompt)
    assert [(q["element_type"], q["question"]) for q in questions] == [
        ("animal", "Are there dogs?"), ("color", "Are the dogs brown?"), ("counting", "Are there two dogs?"),
        ("activity", "Are the dogs running?"), ("location", "Is there a beach?"),
        ("attribute", "Is the beach sandy?"), ("object", "Is there a boat?"),
        ("material", "Is the boat made of wood?"), ("color", "Is the boat red?"),
        ("spatial", "Are the dogs on the beach?"), ("spatial", "Are the dogs next to the boat?"),
        ("other", "Is this a watercolor painting?")]
    valid, dropped = agfsync.validate_qa(questions, prompt)
    assert len(valid) == 12 and dropped == []
    # a modifier does not jump over a verb: "yellow" describes the raincoat, not the oranges
    texts = [q["question"] for q in agfsync.template_qa("a woman in a yellow raincoat choosing oranges at night")]
    assert "Is the raincoat yellow?" in texts and "Are the oranges yellow?" not in texts
    assert "Is it night?" in texts


def test_build_qa_with_the_stand_in_drops_prompts_with_too_few_questions():
    rows = [{"category": "animals", "prompt": "two brown dogs running on a sandy beach next to a red wooden boat"},
            {"category": "animals", "prompt": "a cat"}]
    kept, report = agfsync.build_qa(rows, TemplateGenerator(), min_questions=5)
    assert [r["prompt"] for r in kept] == [rows[0]["prompt"]]
    assert kept[0]["qa_stand_in"] is True and kept[0]["qa_backend"] == "template" and kept[0]["category"] == "animals"
    assert len(kept[0]["questions"]) == 11  # the twelve above without the style question
    assert report["prompts"] == 2 and report["kept"] == 1 and report["dropped_prompts"] == 1
    assert report["questions_kept"] == 11 and report["questions_dropped"] == 0


def test_build_qa_with_an_llm_validates_its_replies():
    good = "\n".join(json.dumps({"question": q, "answer": "yes", "element_type": t}) for q, t in [
        ("Are there ducks?", "animal"), ("Are there two ducks?", "counting"), ("Are the ducks swimming?", "activity"),
        ("Is there a bridge?", "object"), ("Is the bridge made of wood?", "material")])
    bad = good.replace('"yes"', '"no"', 1)  # one question answered "no": four valid ones are too few
    generator = CannedGenerator([good, bad])
    kept, report = agfsync.build_qa([{"prompt": QA_PROMPT}, {"prompt": QA_PROMPT}], generator, min_questions=5)
    assert len(kept) == 1 and kept[0]["qa_stand_in"] is False and len(kept[0]["questions"]) == 5
    assert report["dropped: answer not yes"] == 1 and report["questions_kept"] == 5 and report["dropped_prompts"] == 1
    assert "Description: " + QA_PROMPT in generator.asked[0][-1]["content"]


def test_split_prompts_numbers_holds_out_and_names_why_nothing_is_left_to_train_on():
    rows = [{"prompt": f"prompt {i}", "questions": [{"question": f"Is there a thing {i}?", "element_type": "object"}]}
            for i in range(8)]
    prompts = agfsync.split_prompts(rows, 0.25, seed=3)
    assert [p["prompt_id"] for p in prompts] == [f"p{i:05d}" for i in range(8)]
    assert sum(p["split"] == "eval" for p in prompts) == 2
    assert prompts[5]["questions"] == ["Is there a thing 5?"] and prompts[5]["element_types"] == ["object"]
    assert [p["split"] for p in agfsync.split_prompts(rows, 0.25, seed=3)] == [p["split"] for p in prompts]
    assert [p["split"] for p in agfsync.split_prompts(rows, 0.25, seed=4)] != [p["split"] for p in prompts]
    # what the small profile once hit: a 135M LLM wrote no usable question, so no prompt survived
    report = {"prompts": 46, "kept": 0, "dropped: not JSON": 323, "dropped: duplicate": 0}
    with pytest.raises(ValueError, match=r"0 of 46 prompts kept at least 5 valid questions.*not JSON 323"
                                         r".*Lower min_questions"):
        agfsync.split_prompts([], 0.25, qa_report=report, min_questions=5)
    with pytest.raises(ValueError, match="1 of them are held out"):
        agfsync.split_prompts(rows[:1], 0.75)  # round(0.75) = 1: the only prompt is held out
    with pytest.raises(ValueError, match="eval_share"):
        agfsync.split_prompts(rows, 1.0)


# --------------------------------------------------------------------------------------------- scores

def test_vqa_score_is_the_share_of_yes_answers():
    assert agfsync.vqa_score([0.9, 0.2, 0.7, 0.6]) == 75.0  # 3 of 4 above 0.5
    assert agfsync.vqa_score([0.5, 0.51]) == 50.0  # exactly 0.5 is not a yes
    with pytest.raises(ValueError, match="at least one"):
        agfsync.vqa_score([])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        agfsync.vqa_score([1.2])


def test_vqa_scores_batch_images_encode_each_once_and_reuse_the_cache(tiny_ctx, monkeypatch):
    from types import SimpleNamespace

    from helpers.models import resolve
    from helpers.scorers import vqa

    scorer = vqa.load_vqa(resolve("vqa", tiny_ctx))
    rng = np.random.default_rng(3)
    generated = [SimpleNamespace(key=f"img{i}", image=Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)))
                 for i in range(3)]
    questions = [["is there a cat?", "red?"], ["a dog?", "is it night?", "blue sky?"], ["a boat?"]]
    expected = [agfsync.vqa_score(scorer.yes_probability([g.image] * len(q), q)) for g, q in zip(generated, questions)]

    calls, encoded = [], []
    ask = scorer.yes_probability
    monkeypatch.setattr(scorer, "yes_probability", lambda images, qs: (calls.append(len(qs)), ask(images, qs))[1])
    hook = scorer.model.vision_model.register_forward_hook(
        lambda module, args, kwargs, output: encoded.append(output.last_hidden_state.shape[0]), with_kwargs=True)
    try:
        scores = agfsync.vqa_scores(generated, questions, tiny_ctx, images_per_batch=2, scorer=scorer)
    finally:
        hook.remove()
    assert scores == pytest.approx(expected, abs=1e-9)
    assert calls == [5, 1] and encoded == [2, 1]  # two images (5 questions), then one; each image encoded once

    # everything is cached now: the model is not even loaded, and the scores come back the same
    monkeypatch.setattr(vqa, "load_vqa", lambda *a, **k: pytest.fail("a fully cached call loaded the VQA model"))
    assert agfsync.vqa_scores(generated, questions, tiny_ctx) == scores
    # one new question for the last image: only that image is asked, through the passed scorer
    calls.clear()
    questions[2] = ["a boat?", "is it raining?"]
    agfsync.vqa_scores(generated, questions, tiny_ctx, scorer=scorer)
    assert calls == [2]
    # a stage's open score cache is used as it is (the file is not read again) and receives the new answers
    from helpers import scoring

    shared = scoring.ScoreCache(tiny_ctx.runs_dir / "image_cache" / "scores.jsonl")
    before = len(shared)
    monkeypatch.setattr(scoring.ScoreCache, "__init__", lambda *a, **k: pytest.fail("another cache was opened"))
    questions[0] = ["is there a cat?", "red?", "is it a painting?"]
    agfsync.vqa_scores(generated, questions, tiny_ctx, scorer=scorer, cache=shared)
    assert calls == [2, 3] and len(shared) == before + 1


def test_vqa_images_that_run_out_of_memory_are_asked_again_in_halves(tiny_ctx, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from helpers import scoring
    from helpers.models import resolve
    from helpers.scorers import vqa

    scorer = vqa.load_vqa(resolve("vqa", tiny_ctx))
    rng = np.random.default_rng(5)
    generated = [SimpleNamespace(key=f"oom{i}", image=Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)))
                 for i in range(4)]
    questions = [["a cat?", "red?"], ["a dog?"], ["night?", "blue sky?"], ["a boat?"]]
    expected = agfsync.vqa_scores(generated, questions, tiny_ctx, images_per_batch=1, scorer=scorer,
                                  cache=scoring.ScoreCache(tmp_path / "one_at_a_time.jsonl"))
    ask, calls = scorer.yes_probability, []

    def short_of_memory(images, qs):
        calls.append(len(qs))
        if len(qs) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return ask(images, qs)

    monkeypatch.setattr(scorer, "yes_probability", short_of_memory)
    got = agfsync.vqa_scores(generated, questions, tiny_ctx, images_per_batch=4, scorer=scorer,
                             cache=scoring.ScoreCache(tmp_path / "halves.jsonl"))
    assert got == pytest.approx(expected, abs=1e-6)
    # 4 images (6 questions) fail, then 2 images (3 questions) fail, then one image at a time for the rest
    assert calls == [6, 3, 2, 1, 2, 1]


def test_aesthetic_clip_and_weighted_score_by_hand():
    assert agfsync.aesthetic_100(6.2) == pytest.approx(62.0)
    np.testing.assert_allclose(agfsync.aesthetic_100([1.0, 10.0]), [10.0, 100.0])
    np.testing.assert_allclose(agfsync.clip_100([0.31, -0.2]), [31.0, 0.0])
    # 0.35·75 + 0.55·31 + 0.10·62 = 26.25 + 17.05 + 6.2
    assert agfsync.agfsync_score(75.0, 31.0, 62.0) == pytest.approx(49.5)
    # released code: 0.85·31 + 0.15·62 = 26.35 + 9.3, the VQA score ignored
    assert agfsync.agfsync_score(75.0, 31.0, 62.0, agfsync.RELEASED_CODE_WEIGHTS) == pytest.approx(35.65)
    assert agfsync.PAPER_WEIGHTS == (0.35, 0.55, 0.10)
    assert agfsync.RELEASED_CODE_WEIGHTS == (0.0, 0.85, 0.15)
    np.testing.assert_allclose(agfsync.agfsync_score([100, 0], [0, 100], [0, 0]), [35.0, 55.0])
    with pytest.raises(ValueError, match="summing to 1"):
        agfsync.agfsync_score(1, 1, 1, weights=(0.5, 0.5, 0.5))


def test_select_pair_argmax_argmin_with_ties_to_the_lowest_index():
    assert agfsync.select_pair([3.0, 7.0, 1.0, 7.0, 1.0]) == (1, 2)
    assert agfsync.select_pair([5.0, 2.0]) == (0, 1)
    assert agfsync.select_pair([4.0, 4.0, 4.0]) is None
    with pytest.raises(ValueError, match="at least two"):
        agfsync.select_pair([5.0])
    with pytest.raises(ValueError, match="finite"):
        agfsync.select_pair([1.0, math.nan])


def test_pairs_from_scores_picks_best_and_worst_per_prompt():
    table = pd.DataFrame({"prompt_id": [0, 0, 0, 1, 1, 2], "candidate": [0, 1, 2, 0, 1, 0],
                          "score": [40.0, 55.0, 20.0, 30.0, 30.0, 60.0], "vqa": [50.0, 75.0, 25.0, 0.0, 0.0, 100.0]})
    pairs = agfsync.pairs_from_scores(table)
    assert pairs.to_dict("records") == [{"prompt_id": 0, "chosen_candidate": 1, "rejected_candidate": 2,
                                         "chosen_score": 55.0, "rejected_score": 20.0, "chosen_vqa": 75.0,
                                         "rejected_vqa": 25.0}]


# ---------------------------------------------------------------------------------------------- noise

def test_noise_spares_candidate_zero_and_has_the_right_spread():
    embeddings = torch.randn(8, 77, 256, generator=torch.Generator().manual_seed(0))
    embeddings[0, 0, 0] = -0.0  # adding a zero would turn -0.0 into +0.0; the copy must keep every bit
    original = embeddings.clone()
    noised = agfsync.noise_text_embeddings(embeddings, sigma=0.1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(embeddings.view(torch.int32), original.view(torch.int32))  # input untouched
    assert torch.equal(noised[0].view(torch.int32), embeddings[0].view(torch.int32))
    difference = noised[1:] - embeddings[1:]
    # a draw smaller than half a float32 step of its element rounds away, so "every element" is too strict
    assert bool(((difference != 0).float().mean(dim=(1, 2)) > 0.999).all())
    assert float(difference.std()) == pytest.approx(0.1, rel=0.02)  # 7·77·256 ≈ 138k draws
    assert float(difference.mean()) == pytest.approx(0.0, abs=0.002)
    again = agfsync.noise_text_embeddings(embeddings, sigma=0.1, generator=torch.Generator().manual_seed(1))
    other = agfsync.noise_text_embeddings(embeddings, sigma=0.1, generator=torch.Generator().manual_seed(2))
    assert torch.equal(noised, again) and not torch.equal(noised, other)


def test_noise_handles_pooled_embeddings_and_half_precision():
    embeddings = torch.zeros(3, 4, 8, dtype=torch.float16)
    pooled = torch.ones(3, 8, dtype=torch.float16)
    noised, noised_pooled = agfsync.noise_text_embeddings(embeddings, 0.5, torch.Generator().manual_seed(0), pooled)
    assert noised.dtype == noised_pooled.dtype == torch.float16
    assert torch.equal(noised_pooled[0], pooled[0]) and not torch.equal(noised_pooled[1], pooled[1])
    assert torch.equal(pooled, torch.ones(3, 8, dtype=torch.float16))
    assert torch.equal(agfsync.noise_text_embeddings(embeddings, 0.0), embeddings)
    single = torch.ones(1, 2, 3)
    assert torch.equal(agfsync.noise_text_embeddings(single), single)
    with pytest.raises(ValueError, match=r"\(N candidates, seq, dim\)"):
        agfsync.noise_text_embeddings(torch.zeros(3, 8))
    with pytest.raises(ValueError, match="pooled must be"):
        agfsync.noise_text_embeddings(embeddings, pooled=torch.zeros(2, 8))


# ------------------------------------------------------------------------------------- preference dataset

def _pair_row(index: int) -> dict:
    chosen = Image.new("RGB", (16, 16), (200, 10 * index, 0))
    rejected = Image.new("RGB", (16, 16), (0, 10 * index, 200))
    return {"prompt": f"prompt {index}", "category": "animals", "chosen": chosen, "rejected": rejected,
            "chosen_score": 60.0 + index, "rejected_score": 20.0, "chosen_vqa": 80.0, "rejected_vqa": 40.0,
            "chosen_clip": 30.0, "rejected_clip": 20.0, "chosen_aesthetic": 60.0, "rejected_aesthetic": 50.0,
            "prompt_id": index}


def test_preference_dataset_round_trips_with_images(tmp_path):
    from datasets import Image as ImageFeature
    from datasets import load_from_disk

    rows = [_pair_row(0), _pair_row(1)]
    dataset = agfsync.preference_dataset(rows)
    assert isinstance(dataset.features["chosen"], ImageFeature) and isinstance(dataset.features["rejected"],
                                                                               ImageFeature)
    assert set(agfsync.PREFERENCE_COLUMNS) | {"prompt_id"} == set(dataset.column_names)
    dataset.save_to_disk(tmp_path / "pairs")
    loaded = load_from_disk(str(tmp_path / "pairs"))
    assert loaded.features == dataset.features and len(loaded) == 2
    assert loaded[1]["prompt"] == "prompt 1" and loaded[1]["chosen_score"] == 61.0 and loaded[1]["prompt_id"] == 1
    assert np.array_equal(np.asarray(loaded[1]["chosen"]), np.asarray(rows[1]["chosen"]))
    assert np.array_equal(np.asarray(loaded[0]["rejected"]), np.asarray(rows[0]["rejected"]))
    with pytest.raises(ValueError, match="lack chosen_vqa"):
        agfsync.preference_dataset([{k: v for k, v in rows[0].items() if k != "chosen_vqa"}])


def test_pairs_from_image_paths_are_embedded_when_saved(tmp_path):
    """Notebook 12 hands the cache's PNG paths, not decoded images, to the dataset: saving embeds the files, so the
    saved pairs need no image cache, and their pixels are the cached ones."""
    from datasets import load_from_disk

    from helpers.t2i import ImageCache

    cache = ImageCache(tmp_path / "cache")
    table = pd.DataFrame({"prompt_id": ["p0"] * 3, "prompt": ["a fox"] * 3, "category": ["animals"] * 3,
                          "key": ["k0", "k1", "k2"], "vqa": [90.0, 10.0, 50.0], "clip": [30.0] * 3,
                          "aesthetic": [50.0] * 3})
    pictures = {f"k{i}": Image.new("RGB", (16, 16), (80 * i, 20, 200 - 80 * i)) for i in range(3)}
    for key, picture in pictures.items():
        cache.put(key, picture, {})
    rows = agfsync.pair_rows(table, lambda key: str(cache.path(key)))
    assert rows[0]["chosen"] == str(cache.path("k0")) and rows[0]["rejected"] == str(cache.path("k1"))
    lazy = agfsync.preference_dataset(rows)  # paths: decoded when a row is read
    assert np.array_equal(np.asarray(lazy[0]["chosen"]), np.asarray(pictures["k0"]))
    lazy.save_to_disk(tmp_path / "pairs")
    for key in pictures:
        cache.path(key).unlink()
    saved = load_from_disk(str(tmp_path / "pairs"))
    assert np.array_equal(np.asarray(saved[0]["chosen"]), np.asarray(pictures["k0"]))
    assert np.array_equal(np.asarray(saved[0]["rejected"]), np.asarray(pictures["k1"]))


def test_pairs_from_two_image_caches_get_one_fingerprint(tmp_path):
    """datasets fingerprints the in-memory table, paths included: two clones of the book saved different
    state.json files for the same pairs. The fingerprint follows the rows' content, not where the images sit."""
    def rows_in(folder, shade=0):
        folder.mkdir()
        rows = []
        for index in range(2):
            row = _pair_row(index)
            for side in ("chosen", "rejected"):
                row[side].save(folder / f"{side}{index}.png")
                row[side] = str(folder / f"{side}{index}.png")
            row["chosen_score"] += shade
            rows.append(row)
        return rows

    first = agfsync.preference_dataset(rows_in(tmp_path / "clone"))
    twin = agfsync.preference_dataset(rows_in(tmp_path / "twin"))
    changed = agfsync.preference_dataset(rows_in(tmp_path / "changed", shade=1))
    assert first._fingerprint == twin._fingerprint != changed._fingerprint
    with_pixels = [_pair_row(0)], [_pair_row(1)]
    assert agfsync.preference_dataset(with_pixels[0])._fingerprint != \
        agfsync.preference_dataset(with_pixels[1])._fingerprint
    first.save_to_disk(tmp_path / "a")
    twin.save_to_disk(tmp_path / "b")
    assert (tmp_path / "a" / "state.json").read_bytes() == (tmp_path / "b" / "state.json").read_bytes()


# ------------------------------------------------------------------------------- conversion efficiency

# p1: unequal scores, image 0 has VQA 100 / aesthetic 70; p2: equal scores; p3: unequal, no image good at both;
# p4: a single image (no pair possible), VQA 100 / aesthetic 90.
EFFICIENCY_TABLE = pd.DataFrame({
    "prompt_id": ["p1", "p1", "p2", "p2", "p3", "p3", "p3", "p4"],
    "score": [50.0, 60.0, 40.0, 40.0, 30.0, 45.0, 20.0, 70.0],
    "vqa": [100.0, 80.0, 100.0, 100.0, 60.0, 75.0, 50.0, 100.0],
    "aesthetic": [70.0, 50.0, 65.0, 65.0, 80.0, 40.0, 90.0, 90.0]})


def test_conversion_efficiency_on_a_hand_made_table():
    efficiency = agfsync.conversion_efficiency(EFFICIENCY_TABLE, {"vqa": [80, 100], "aesthetic": [60, 70]})
    assert list(efficiency.columns) == ["method", "theta_vqa", "theta_aesthetic", "prompts", "converted", "share"]
    agfsync_rows = efficiency[efficiency["method"] == "AGFSync"]
    assert agfsync_rows["converted"].tolist() == [2, 2, 2, 2]  # p1 and p3
    dreamsync = efficiency[efficiency["method"] == "DreamSync"].set_index(["theta_vqa", "theta_aesthetic"])
    # (80, 60): p1, p2, p4 · (80, 70): p1, p4 · (100, 60): p1, p2, p4 · (100, 70): p1, p4
    assert dreamsync["converted"].to_dict() == {(80.0, 60.0): 3, (80.0, 70.0): 2, (100.0, 60.0): 3,
                                                (100.0, 70.0): 2}
    assert dreamsync.loc[(80.0, 60.0), "share"] == 0.75 and set(efficiency["prompts"]) == {4}
    pairs = agfsync.conversion_efficiency(EFFICIENCY_TABLE, [(50, 85), (0, 0)])
    assert pairs[pairs["method"] == "DreamSync"]["converted"].tolist() == [2, 4]  # (50, 85): p3 and p4
    with pytest.raises(ValueError, match="lacks column"):
        agfsync.conversion_efficiency(EFFICIENCY_TABLE.drop(columns="vqa"), [(0, 0)])


def test_plot_conversion_efficiency_draws_one_line_per_aesthetic_threshold():
    import matplotlib.pyplot as plt

    efficiency = agfsync.conversion_efficiency(EFFICIENCY_TABLE, {"vqa": [60, 80, 100], "aesthetic": [60, 70]})
    figure = agfsync.plot_conversion_efficiency(efficiency)
    lines = figure.axes[0].get_lines()
    assert len(lines) == 3  # two DreamSync curves and AGFSync's reference line
    assert lines[-1].get_ydata()[0] == pytest.approx(50.0)
    plt.close(figure)


def test_block_wise_candidate_scores_equal_one_pass_with_blip2_loaded_once(tiny_ctx, monkeypatch):
    from helpers.models import resolve
    from helpers.scorers import vqa
    from helpers.t2i import Executor, ModelCatalog, Request, default_api

    api = default_api(ModelCatalog.from_records([]).base("SD 1.5"))
    prompts = {"p0": "a red kite", "p1": "a green boat"}
    questions = {"p0": ["is there a kite?", "is it red?"], "p1": ["is there a boat?"]}
    requests, owners = [], []
    for prompt_id, prompt in prompts.items():
        for seed in range(3):
            requests.append(Request(api, prompt, "", seed))
            owners.append({"prompt_id": prompt_id, "prompt": prompt, "category": "things", "candidate": seed})
    executor = Executor.for_run(tiny_ctx, ModelCatalog.from_records([]), max_side=32, batch_size=4)
    whole = agfsync.score_images(executor.generate(requests, progress=False), owners, questions, tiny_ctx)
    (tiny_ctx.runs_dir / "image_cache" / "scores.jsonl").unlink()  # the block-wise pass computes everything afresh
    loads, load = [], vqa.load_vqa
    monkeypatch.setattr(vqa, "load_vqa", lambda *a, **k: (loads.append(1), load(*a, **k))[1])
    blocks = agfsync.generate_and_score_images(executor, requests, owners, questions, tiny_ctx, block_size=4)
    assert len(loads) == 1  # one BLIP-2 for both blocks
    pd.testing.assert_frame_equal(blocks, whole, check_exact=False, atol=1e-9)
    again = agfsync.generate_and_score_images(executor, requests, owners, questions, tiny_ctx, block_size=4)
    assert len(loads) == 1  # all cached: BLIP-2 not loaded at all
    pd.testing.assert_frame_equal(again, whole, check_exact=False, atol=1e-9)
    assert resolve("vqa", tiny_ctx)  # the tiny BLIP-2 was built by the first pass
    # scores only (notebook 13's held-out images): what is drawn leaves the cache once scored, but the kept one; a
    # rerun draws nothing, and one image whose answer to a question is gone is drawn, asked and removed again
    fresh = [Request(api, prompt, "", seed) for prompt in prompts.values() for seed in (7, 8, 9)]
    pruning = Executor.for_run(tiny_ctx, ModelCatalog.from_records([]), max_side=32, batch_size=4)
    pruned = agfsync.generate_and_score_images(pruning, fresh, owners, questions, tiny_ctx, block_size=4,
                                               keep={0}.__contains__)
    cache = pruning.cache
    assert [cache.has(key) for key in pruned["key"]] == [True] + [False] * 5
    assert pruning.stats["removed_once_scored"] == 5 and pruning.stats["generated"] == 6
    rerun = Executor.for_run(tiny_ctx, ModelCatalog.from_records([]), max_side=32, batch_size=4)
    pd.testing.assert_frame_equal(agfsync.generate_and_score_images(rerun, fresh, owners, questions, tiny_ctx,
                                                                    block_size=4, keep={0}.__contains__), pruned)
    assert rerun.stats["generated"] == 0 and rerun.stats["not_needed"] == 5
    scores = tiny_ctx.runs_dir / "image_cache" / "scores.jsonl"
    asked = agfsync.vqa_names(questions["p1"])[0]
    scores.write_text("".join(line for line in scores.read_text().splitlines(keepends=True)
                              if not (pruned["key"][4] in line and asked in line)))
    third = Executor.for_run(tiny_ctx, ModelCatalog.from_records([]), max_side=32, batch_size=4)
    again = agfsync.generate_and_score_images(third, fresh, owners, questions, tiny_ctx, block_size=4,
                                              keep={0}.__contains__)
    assert third.stats["generated"] == 1 and third.stats["removed_once_scored"] == 1 and not cache.has(pruned["key"][4])
    pd.testing.assert_frame_equal(again, pruned, check_exact=False, atol=1e-6)
