import http.server
import json
import threading
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml

from helpers import agfsync_benchmarks as bench
from helpers.scoring import ScoreCache

ROOT = Path(__file__).resolve().parents[1]

# TIFA v1.0's question_answers format: one item per question, several per caption
TIFA_ITEMS = [
    {"id": "coco_1", "caption": "a surfer carrying a white board on a beach", "question": "is this a surfer?",
     "choices": ["yes", "no"], "answer": "yes", "answer_type": "animal/human", "element": "surfer"},
    {"id": "coco_1", "caption": "a surfer carrying a white board on a beach", "question": "what color is the board?",
     "choices": ["white", "black", "red", "blue"], "answer": "white", "answer_type": "color", "element": "white"},
    {"id": "drawbench_7", "caption": "two cats on a red sofa", "question": "how many cats are there?",
     "choices": ["1", "2", "3"], "answer": "2", "answer_type": "counting", "element": "two"},
    {"id": "parti_3", "caption": "a lighthouse at dusk", "question": "is there a lighthouse?",
     "choices": ["yes", "no"], "answer": "yes", "answer_type": "object", "element": "lighthouse"},
]


@pytest.fixture
def tifa_file(tmp_path):
    path = tmp_path / "tifa_v1.0_question_answers.json"
    path.write_text(json.dumps(TIFA_ITEMS))
    return path


@pytest.fixture
def hps_folder(tmp_path):
    folder = tmp_path / "benchmark"
    folder.mkdir()
    for style in bench.HPS_STYLES:
        (folder / f"{style}.json").write_text(json.dumps([f"{style} prompt {i}" for i in range(5)]))
    return folder


def test_tifa_groups_questions_by_caption_and_keeps_choices_and_answers(tifa_file, tmp_path):
    rows = bench.load_tifa(tifa_file, tmp_path / "cache")
    assert [r["prompt_id"] for r in rows] == ["tifa:coco_1", "tifa:drawbench_7", "tifa:parti_3"]
    surfer = rows[0]
    assert surfer["prompt"] == "a surfer carrying a white board on a beach" and surfer["category"] == "TIFA"
    assert surfer["questions"][1] == {"question": "what color is the board?", "choices": ["white", "black", "red", "blue"],
                                      "answer": "white", "element_type": "color"}
    assert rows[1]["questions"][0]["choices"] == ["1", "2", "3"] and rows[1]["questions"][0]["answer"] == "2"
    sample = bench.load_tifa(tifa_file, tmp_path / "cache", limit=2, seed=3)
    assert len(sample) == 2 and sample == bench.load_tifa(tifa_file, tmp_path / "cache", limit=2, seed=3)
    assert [r["prompt_id"] for r in sample] == sorted(r["prompt_id"] for r in sample)  # source order kept


def test_tifa_refuses_an_answer_outside_its_choices_and_missing_fields(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{**TIFA_ITEMS[0], "answer": "maybe"}]))
    with pytest.raises(ValueError, match="answer 'maybe' outside its choices"):
        bench.load_tifa(bad, tmp_path)
    bad.write_text(json.dumps([{"id": "x", "caption": "c"}]))
    with pytest.raises(ValueError, match="lacks question, choices, answer"):
        bench.load_tifa(bad, tmp_path)
    with pytest.raises(FileNotFoundError, match="hf://datasets"):
        bench.load_tifa(tmp_path / "nowhere.json", tmp_path)


def test_hps_prompts_come_per_style_with_a_per_style_limit(hps_folder, tmp_path):
    rows = bench.load_hps_prompts(hps_folder, tmp_path)
    assert len(rows) == 20 and [r["category"] for r in rows[::5]] == list(bench.HPS_STYLES)
    assert rows[0] == {"prompt_id": "hps:anime:0000", "prompt": "anime prompt 0", "category": "anime",
                       "source": str(hps_folder)}
    limited = bench.load_hps_prompts(hps_folder, tmp_path, per_style=2, seed=1)
    assert len(limited) == 8 and all(sum(r["category"] == s for r in limited) == 2 for s in bench.HPS_STYLES)
    (hps_folder / "photo.json").write_text(json.dumps({"prompts": []}))
    with pytest.raises(ValueError, match="photo.json: expected a JSON list"):
        bench.load_hps_prompts(hps_folder, tmp_path)


def test_an_http_source_is_downloaded_once(tmp_path, monkeypatch):
    import helpers.http

    payload = json.dumps(TIFA_ITEMS).encode()
    seen = []
    monkeypatch.setattr(helpers.http, "backoff_delay", lambda *args: 0.0)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.path)
            # busy at first (retried), then the file; any other path is missing
            status = (503 if len(seen) == 1 else 200) if self.path.endswith("qa.json") else 404
            self.send_response(status)
            self.send_header("Content-Length", str(len(payload) if status == 200 else 0))
            self.end_headers()
            if status == 200:
                self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/tifa/qa.json"
    try:
        first = bench.load_tifa(url, tmp_path / "downloads")
        again = bench.load_tifa(url, tmp_path / "downloads")
        with pytest.raises(RuntimeError, match="answered 404"):
            bench.fetch(url.replace("qa.json", "missing.json"), tmp_path / "downloads")
    finally:
        server.shutdown()
    assert seen == ["/tifa/qa.json"] * 2 + ["/tifa/missing.json"]  # a retry; the second load read the saved copy
    saved = tmp_path / "downloads"
    assert len(list(saved.glob("*-qa.json"))) == 1 and not list(saved.glob("*.part"))  # one whole file
    assert first == again and len(first) == 3 and first[0]["source"] == url


def test_a_hub_source_names_the_dataset_repo_and_the_file(monkeypatch, hps_folder, tmp_path):
    import huggingface_hub

    asked = []

    def download(repo_id, filename, repo_type=None):
        asked.append((repo_id, filename, repo_type))
        return str(hps_folder / Path(filename).name)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    rows = bench.load_hps_prompts(bench.HPS_SOURCE, tmp_path, styles=["anime"])
    assert asked == [("zhwang/HPDv2", "benchmark/anime.json", "dataset")] and len(rows) == 5
    with pytest.raises(ValueError, match="hf://datasets/<owner>/<name>/<path>"):
        bench.fetch("hf://models/someone/thing/file.json", tmp_path)


def test_the_paper_recipe_reads_the_public_benchmarks():
    recipe = yaml.safe_load((ROOT / "configs" / "paper.yaml").read_text())
    stage = recipe["notebooks"]["13_diffusion_dpo"]
    assert stage["tifa"] == bench.TIFA_SOURCE and stage["hps_benchmark"] == bench.HPS_SOURCE
    assert stage["benchmark_limit"] == 0  # all 4,081 TIFA captions and 4 × 800 HPS v2 prompts


HELD_OUT = [{"prompt_id": "p00003", "prompt": "a red fox in snow", "category": "animals",
             "questions": ["is there a fox?", "is the fox red?"], "element_types": ["animal", "color"]}]


def test_without_sources_the_held_out_prompts_stand_in_and_say_so(tmp_path):
    sets = bench.benchmark_sets("", "", HELD_OUT, tmp_path)
    tifa, hps = sets["TIFA"], sets["HPS v2"]
    assert tifa == [{"prompt_id": "p00003", "prompt": "a red fox in snow", "category": "animals",
                     "source": bench.STAND_IN,
                     "questions": [{"question": "is there a fox?", "choices": ["yes", "no"], "answer": "yes",
                                    "element_type": "animal"},
                                   {"question": "is the fox red?", "choices": ["yes", "no"], "answer": "yes",
                                    "element_type": "color"}]}]
    assert hps == [{"prompt_id": "p00003", "prompt": "a red fox in snow", "category": "animals",
                    "source": bench.STAND_IN}]


class ScriptedVqa:
    """Answers from a script, counting the questions it was asked."""

    weights_id = "scripted@1"

    def __init__(self, answers):
        self.answers, self.asked = answers, []

    def choose(self, images, questions, choices):
        assert len(images) == len(questions) == len(choices)
        self.asked += list(questions)
        return [self.answers[q] for q in questions]


def test_tifa_score_is_the_share_of_right_choices_and_each_answer_is_cached(tifa_file, tmp_path):
    rows = bench.load_tifa(tifa_file, tmp_path)
    images = [SimpleNamespace(key=f"img{i}", image=object()) for i in range(3)]
    questions = [rows[0]["questions"], rows[1]["questions"], rows[0]["questions"]]
    scripted = ScriptedVqa({"is this a surfer?": "yes", "what color is the board?": "blue",
                            "how many cats are there?": "2"})
    cache = ScoreCache(tmp_path / "scores.jsonl")
    scores = bench.tifa_scores(images, questions, None, answering="likeliest", scorer=scripted, cache=cache,
                               images_per_batch=2)
    assert scores == [50.0, 100.0, 50.0]  # surfer right, board wrong; the cats counted right
    assert len(scripted.asked) == 5
    again = bench.tifa_scores(images, questions, None, answering="likeliest", scorer=scripted,
                              cache=ScoreCache(tmp_path / "scores.jsonl"))
    assert again == scores and len(scripted.asked) == 5  # read back from the file: nothing asked twice
    with pytest.raises(ValueError, match="at least one TIFA question"):
        bench.tifa_scores(images[:1], [[]], None, answering="likeliest", scorer=scripted, cache=cache)


class FreeVqa:
    """Free answers from a script, counting the prompts' choice lists it was shown."""

    weights_id = "free@1"

    def __init__(self, answers):
        self.answers, self.shown = answers, []

    def free_form_answers(self, images, questions, choices, **decoding):
        assert len(images) == len(questions) == len(choices)
        assert decoding == {"num_beams": 5, "max_new_tokens": 30}  # TIFA's BLIP-2 decoding
        self.shown += [list(c) for c in choices]
        return [self.answers[q] for q in questions]


class CountingEncoder:
    """A real sentence encoder that counts the texts it embeds."""

    weights_id = "minilm@test"

    def __init__(self, encoder):
        self.encoder, self.texts, self.calls = encoder, [], 0

    def encode(self, texts, **kwargs):
        self.texts += list(texts)
        self.calls += 1
        return self.encoder.encode(texts, **kwargs)


@pytest.fixture(scope="module")
def minilm():
    from helpers.models import load_text_encoder, minilm_path

    return load_text_encoder(str(minilm_path()))


def test_a_free_answer_maps_onto_the_nearest_choice_and_a_choice_stands(minilm):
    encoder = CountingEncoder(minilm)
    answers = ["pale green", "two", "yes", "a cat"]  # TIFA's own example first: "pale green" → "green"
    choices = [["black", "green", "yellow", "brown"], ["1", "2", "3"], ["yes", "no"], ["dog", "cat", "horse"]]
    assert bench.nearest_choices(answers, choices, encoder) == ["green", "2", "yes", "cat"]
    assert encoder.calls == 1  # one call; "yes" is a choice already, so neither it nor "no" is embedded
    assert sorted(encoder.texts) == sorted(set(encoder.texts)) and "no" not in encoder.texts
    assert bench.nearest_choices(["yes"], [["yes", "no"]], encoder) == ["yes"] and encoder.calls == 1
    with pytest.raises(ValueError, match="one of each per question"):
        bench.nearest_choices(answers, choices[:2], encoder)


def test_free_form_tifa_scores_map_answers_and_cache_apart_from_likeliest(tifa_file, tmp_path, minilm,
                                                                         monkeypatch):
    rows = bench.load_tifa(tifa_file, tmp_path)
    images = [SimpleNamespace(key=f"img{i}", image=object()) for i in range(2)]
    questions = [rows[0]["questions"], rows[1]["questions"]]
    free = FreeVqa({"is this a surfer?": "yes", "what color is the board?": "snow white",
                    "how many cats are there?": "three"})
    cache = ScoreCache(tmp_path / "scores.jsonl")
    encoder = CountingEncoder(minilm)
    scores = bench.tifa_scores(images, questions, None, scorer=free, encoder=encoder, cache=cache)
    assert scores == [100.0, 0.0]  # "snow white" → white (right); "three" → 3, but the answer is 2
    assert free.shown == [["yes", "no"], ["white", "black", "red", "blue"], ["1", "2", "3"]]
    assert bench.tifa_scores(images, questions, None, scorer=free, encoder=encoder, cache=cache) == scores
    assert len(free.shown) == 3  # cached: nothing asked twice
    scripted = ScriptedVqa({"is this a surfer?": "no", "what color is the board?": "white",
                            "how many cats are there?": "2"})
    likeliest = bench.tifa_scores(images, questions, None, answering="likeliest", scorer=scripted, cache=cache)
    assert likeliest == [50.0, 100.0] and len(scripted.asked) == 3  # its own cache entries, asked afresh
    key = bench.tifa_key(questions[0][0])
    monkeypatch.setitem(bench.FREE_FORM_DECODING, "num_beams", 1)
    assert bench.tifa_key(questions[0][0]) != key  # other decoding settings: other answers, asked afresh
    with pytest.raises(ValueError, match="answering='sbert' is not a TIFA answering method; use one of 'free_form'"):
        bench.tifa_scores(images, questions, None, answering="sbert", scorer=free, cache=cache)


def test_a_transcript_shows_what_was_said_the_choice_that_counts_and_the_right_answer(tifa_file, tmp_path, minilm):
    questions = bench.load_tifa(tifa_file, tmp_path)[0]["questions"]
    image = SimpleNamespace(key="img0", image=object())
    free = FreeVqa({"is this a surfer?": "no", "what color is the board?": "snow white"})
    cache = ScoreCache(tmp_path / "scores.jsonl")
    table = bench.tifa_transcript(image, questions, None, scorer=free, encoder=CountingEncoder(minilm), cache=cache)
    assert table.to_dict("records") == [
        {"question": "is this a surfer?", "choices": "yes, no", "BLIP-2 said": "no", "chosen": "no", "answer": "yes",
         "right": False},
        {"question": "what color is the board?", "choices": "white, black, red, blue", "BLIP-2 said": "snow white",
         "chosen": "white", "answer": "white", "right": True}]
    scripted = ScriptedVqa({"is this a surfer?": "yes", "what color is the board?": "red"})
    likeliest = bench.tifa_transcript(image, questions, None, answering="likeliest", scorer=scripted, cache=cache)
    assert list(likeliest.columns) == ["question", "choices", "chosen", "answer", "right"]
    assert likeliest["right"].tolist() == [True, False]


def test_the_transcript_shows_the_cached_answers_its_score_counted(tifa_file, tmp_path, minilm):
    """What BLIP-2 said is what the cache keeps (text): the transcript of a scored image asks nothing again, and
    another sentence encoder maps the same answers without asking BLIP-2 afresh."""
    questions = bench.load_tifa(tifa_file, tmp_path)[0]["questions"]
    image = SimpleNamespace(key="img0", image=object())
    free = FreeVqa({"is this a surfer?": "a surfer", "what color is the board?": "snow white"})
    cache = ScoreCache(tmp_path / "scores.jsonl")
    assert bench.tifa_scores([image], [questions], None, scorer=free, encoder=CountingEncoder(minilm),
                             cache=cache) == [100.0]
    stored = sorted(json.loads(line)["value"] for line in (tmp_path / "scores.jsonl").read_text().splitlines())
    assert stored == ["a surfer", "snow white"] and len(free.shown) == 2
    again = FreeVqa({})  # would fail on any question it is asked
    table = bench.tifa_transcript(image, questions, None, scorer=again, encoder=CountingEncoder(minilm),
                                  cache=ScoreCache(tmp_path / "scores.jsonl"))
    assert again.shown == [] and table["BLIP-2 said"].tolist() == ["a surfer", "snow white"]
    assert table["chosen"].tolist() == ["yes", "white"] and table["right"].all()

    class Paired:
        """Puts each answer next to a choice of its own choosing: "a surfer" by "no", "snow white" by "blue"."""
        weights_id = "paired@1"

        def encode(self, texts, **kwargs):
            return [[1.0, 0.0] if text in {"a surfer", "no", "snow white", "blue"} else [0.0, 1.0] for text in texts]

    other = bench.tifa_answers([image], [questions], None, scorer=again, encoder=Paired(), cache=cache)[0]
    assert [a["chosen"] for a in other] == ["no", "blue"] and again.shown == []


def test_benchmarks_drawn_in_blocks_equal_one_block_and_load_each_model_once(tiny_ctx, monkeypatch):
    from helpers.models import resolve
    from helpers.scorers import vqa
    from helpers.t2i import Executor, ModelCatalog, default_api

    sets = bench.benchmark_sets("", "", HELD_OUT + [{**HELD_OUT[0], "prompt_id": "p00004", "prompt": "a grey owl"}],
                                tiny_ctx.runs_dir / "downloads")
    systems = {"base": default_api(ModelCatalog.from_records([]).base("SD 1.5"))}
    executor = Executor.for_run(tiny_ctx, ModelCatalog.from_records([]), max_side=32, batch_size=4)
    whole = bench.evaluate(sets, systems, executor, tiny_ctx, seeds=2)
    (tiny_ctx.runs_dir / "image_cache" / "scores.jsonl").unlink()  # score everything again, three images a block
    loads, load = [], vqa.load_vqa
    monkeypatch.setattr(vqa, "load_vqa", lambda *a, **k: (loads.append(1), load(*a, **k))[1])
    blocks = bench.evaluate(sets, systems, executor, tiny_ctx, seeds=2, block_size=3)
    assert len(loads) == 1 and resolve("vqa", tiny_ctx)
    pd.testing.assert_frame_equal(blocks, whole, check_exact=False, atol=1e-9)
    assert whole.groupby("benchmark").size().to_dict() == {"HPS v2": 4, "TIFA": 4}
    # scores only: the images leave the cache once answered or scored, but the kept one; a rerun draws none
    pruning = Executor.for_run(tiny_ctx, ModelCatalog.from_records([]), max_side=32, batch_size=4)
    for key in whole["key"]:
        pruning.cache.discard([key])  # as if another run had drawn and scored them, then let them go
    keep = lambda owner: (owner["benchmark"], owner["seed"]) == ("TIFA", 0)  # noqa: E731
    pruned = bench.evaluate(sets, systems, pruning, tiny_ctx, seeds=2, block_size=3, keep=keep)
    pd.testing.assert_frame_equal(pruned, whole, check_exact=False, atol=1e-9)
    kept = whole[(whole["benchmark"] == "TIFA") & (whole["seed"] == 0)]["key"]
    assert pruning.stats["generated"] == len(kept) and all(pruning.cache.has(key) for key in kept)
    # the stand-in sets share prompts, so HPS v2 asks for TIFA's images again: found (kept) or not needed (gone)
    assert pruning.stats["not_needed"] == (~whole["key"].isin(kept)).sum() and pruning.stats["cache_hits"] == len(kept)
    assert not any(pruning.cache.has(key) for key in set(whole["key"]) - set(kept))
