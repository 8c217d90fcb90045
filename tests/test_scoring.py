import json

import numpy as np
import pytest
from PIL import Image

from helpers import scoring


def test_unified_metric_fixed_matches_hand_worked_values():
    # clip 75/100 = .75, hps (.27-.20)/.10 = .7, image_reward (.1+.5)/1 = .6 → mean .68333
    assert scoring.unified_metric({"clip": 75, "hps": 0.27, "image_reward": 0.1}) == pytest.approx(68.3333333)
    # fid 20 over [0, 100] = .2, flipped to .8 → mean of .75 .7 .6 .8 = .7125
    assert scoring.unified_metric({"clip": 75, "hps": 0.27, "image_reward": 0.1, "fid": 20}) == pytest.approx(71.25)


def test_unified_metric_fixed_arrays_broadcast_a_set_level_fid():
    unified = scoring.unified_metric({"clip": [50, 100], "hps": [0.2, 0.3], "image_reward": [-0.5, 0.5], "fid": 50.0})
    np.testing.assert_allclose(unified, [25.0, 87.5])  # (.5+0+0+.5)/4 and (1+1+1+.5)/4


def test_unified_metric_pooled_matches_hand_worked_values():
    scores = {"clip": [60, 80, 70], "hps": [0.25, 0.21, 0.29], "image_reward": [1.0, -1.0, 0.0]}
    # normalised: clip 0, 1, .5; hps .5, 0, 1; image_reward 1, 0, .5
    np.testing.assert_allclose(scoring.unified_metric(scores, mode="pooled"), [50.0, 100 / 3, 200 / 3])


def test_unified_metric_pooled_constant_metric_counts_half_and_ranges_override():
    np.testing.assert_allclose(scoring.unified_metric({"clip": [10, 20], "hps": [0.25, 0.25]}, "pooled"), [25, 75])
    assert scoring.unified_metric({"clip": 30}, ranges={"clip": (20, 40)}) == pytest.approx(50.0)
    assert scoring.unified_metric({"clip": 120}) == pytest.approx(120.0)  # outside the range: extends, no clamp


@pytest.mark.parametrize("scores, mode, message", [
    ({"pickscore": 1.0}, "fixed", "no normalisation range"),
    ({"clip": 1.0}, "mean", "mode='mean'"),
    ({}, "fixed", "scores is empty"),
    ({"clip": [1.0, float("nan")]}, "fixed", "non-finite"),
])
def test_unified_metric_errors_name_the_problem(scores, mode, message):
    with pytest.raises(ValueError, match=message):
        scoring.unified_metric(scores, mode)


def test_clip_score_and_weighted_score():
    np.testing.assert_allclose(scoring.clip_score([0.3, -0.2]), [75.0, 0.0])  # 100 · 2.5 · max(cos, 0)
    assert scoring.clip_score(0.3, weight=1.0, scale=scoring.AGFSYNC_CLIP_GAMMA) == pytest.approx(30.0)
    assert scoring.weighted_score(80, 30, 60) == pytest.approx(0.35 * 80 + 0.55 * 30 + 0.10 * 60)
    np.testing.assert_allclose(scoring.weighted_score([100, 0], [0, 100], [0, 0], weights=(0, 0.85, 0.15)), [0, 85])
    with pytest.raises(ValueError, match="summing to 1"):
        scoring.weighted_score(1, 1, 1, weights=(0.5, 0.5, 0.5))


def test_score_cache_survives_a_torn_last_line(tmp_path):
    cache = scoring.ScoreCache(tmp_path / "scores.jsonl")
    cache.put_many([("k1", "clip", "w", 70.0), ("k2", "clip", "w", 60.0)])
    with open(tmp_path / "scores.jsonl", "a") as handle:
        handle.write('{"image": "k3", "sco')  # a crash mid-write
    reread = scoring.ScoreCache(tmp_path / "scores.jsonl")
    assert reread.get("k1", "clip", "w") == 70.0 and reread.get("k3", "clip", "w") is None
    assert reread.get("k1", "clip", "other-weights") is None


@pytest.mark.parametrize("read_bytes", [1 << 22, 1, 90, 200])  # all at once, a line at a time, chunk boundaries
def test_a_score_cache_read_many_lines_at_a_time_holds_what_reading_each_line_finds(tmp_path, monkeypatch,
                                                                                    read_bytes):
    from helpers.manifest import append_jsonl

    monkeypatch.setattr(scoring.ScoreCache, "READ_BYTES", read_bytes)
    path = tmp_path / "scores.jsonl"
    rows = [{"image": f"k{i}", "scorer": ("clip", "hps")[i % 2], "weights": "w", "value": i / 4} for i in range(9)]
    append_jsonl(path, rows[:4])
    with open(path, "a") as handle:
        handle.write('{"image": "k99", "scorer": "clip", "weights": "w", "val')  # torn by a crash ...
    append_jsonl(path, rows[4:7])  # ... and ended by the next write, in the middle of the file now
    append_jsonl(path, [{"image": "k7", "scorer": "tifa", "weights": "w", "value": "a red\nhat \u00e9"}])
    with open(path, "a") as handle:
        handle.write('{"image": "k8", "scorer": "hps", "weights": "w", "value": 2')  # torn at the end
    cache = scoring.ScoreCache(path)
    expected = {row["image"]: row["value"] for row in rows[:7]} | {"k7": "a red\nhat é"}
    assert len(cache) == 8 and cache.get("k99", "clip", "w") is None and cache.get("k8", "hps", "w") is None
    assert {key: cache.get(key, scorer, "w") for key, scorer in [(f"k{i}", ("clip", "hps")[i % 2]) for i in range(7)]
            + [("k7", "tifa")]} == expected
    torn_at = path.read_bytes().rindex(b"\n") + 1
    assert cache._read_bytes == torn_at and cache._last_line.startswith(b'{"image": "k7"')
    with open(path, "a") as handle:
        handle.write("}\n")  # the last line ended at last: read on from where the cache stopped
    assert cache.refresh() == 1 and cache.get("k8", "hps", "w") == 2


def test_rows_appended_after_a_torn_line_start_a_line_of_their_own(tmp_path):
    from helpers.manifest import append_jsonl, read_jsonl_rows

    path = tmp_path / "rows.jsonl"
    append_jsonl(path, [{"a": 1}])
    with open(path, "a") as handle:
        handle.write('{"a": 2, "b"')  # a crash mid-write
    append_jsonl(path, [{"a": 3}, {"a": 4}])
    assert read_jsonl_rows(path) == [{"a": 1}, {"a": 3}, {"a": 4}]  # only the torn row is lost


def test_append_lines_says_where_the_lines_landed(tmp_path):
    from helpers.manifest import append_lines

    path = tmp_path / "rows.jsonl"
    assert append_lines(path, []) is None and not path.exists()
    first = append_lines(path, ["a", "bc"])
    assert (first.start, first.end, first.last_line) == (0, 5, b"bc\n")
    with open(path, "ab") as handle:
        handle.write(b"tor")  # a crash mid-write: the next lines start after a newline, at byte 9
    second = append_lines(path, ["d"])
    assert (second.start, second.end) == (9, 11) and path.read_bytes()[second.start:second.end] == b"d\n"
    stat = path.stat()
    assert first.file == second.file == (stat.st_dev, stat.st_ino)


def test_a_score_cache_does_not_read_back_the_rows_it_wrote_unless_others_came_between(tmp_path):
    path = tmp_path / "scores.jsonl"
    mine, theirs = scoring.ScoreCache(path), scoring.ScoreCache(path)
    mine.put_many([("k1", "clip", "w", 1.0), ("k2", "clip", "w", 2.0)])
    mine.put_many([("k3", "clip", "w", 3.0)])
    assert mine.refresh() == 0 and len(mine) == 3  # its own rows, held already, are not parsed again
    theirs.put_many([("k4", "clip", "w", 4.0)])  # another writer's row comes before mine next
    mine.put_many([("k5", "clip", "w", 5.0)])
    assert mine.refresh() == 2 and mine.get("k4", "clip", "w") == 4.0  # read from where it stopped: both rows
    mine.put_many([("k6", "clip", "w", 6.0)])
    assert mine.refresh() == 0 and len(mine) == 6
    with open(path, "a") as handle:
        handle.write('{"image": "k7", "sco')  # a crash mid-write in another process
    mine.put_many([("k8", "clip", "w", 8.0)])
    assert mine.refresh() == 1 and mine.get("k7", "clip", "w") is None  # its row after the torn line, read back
    fresh = scoring.ScoreCache(path)
    assert len(fresh) == len(mine) == 7
    assert all(fresh.get(f"k{i}", "clip", "w") == mine.get(f"k{i}", "clip", "w") for i in range(1, 9))
    # rewritten in place to the same length (the same file): the last line read is gone, so it reads afresh
    text = path.read_text()
    path.write_text(text.replace('"k8"', '"kX"'))
    mine.put_many([("k9", "clip", "w", 9.0)])
    assert mine.refresh() == 8 and mine.get("k8", "clip", "w") is None and mine.get("kX", "clip", "w") == 8.0


def test_a_shared_score_cache_is_one_copy_that_reads_only_the_rows_appended_since(tmp_path):
    path = tmp_path / "scores.jsonl"
    shared = scoring.ScoreCache.shared(path)
    assert len(shared) == 0 and scoring.ScoreCache.shared(tmp_path / "." / "scores.jsonl") is shared
    shared.put_many([("k1", "clip", "w", 70.0), ("k1", "hps", "w", 0.25)])
    other = scoring.ScoreCache(path)  # another writer of the same file (a rerun, another notebook)
    assert len(other) == 2 and other.get("k1", "hps", "w") == 0.25
    other.put_many([("k2", "clip", "w", 60.0)])
    with open(path, "a") as handle:
        handle.write('{"image": "k3", "sco')  # a crash mid-write: not read, and not a place to stop reading at
    # the other writer's row only (its own two it holds, and is not read back); the torn line is skipped
    assert shared.refresh() == 1 and shared.get("k2", "clip", "w") == 60.0 and len(shared) == 3
    other.put_many([("k4", "clip", "w", 50.0)])
    assert scoring.ScoreCache.shared(path) is shared and shared.get("k4", "clip", "w") == 50.0
    assert shared.get("k3", "clip", "w") is None and len(shared) == 4
    assert shared.refresh() == 0  # nothing new: the file is not read again
    # the same values a fresh read gives, keyed by image, scorer and weights
    fresh = scoring.ScoreCache(path)
    assert len(fresh) == 4 and fresh.get("k1", "clip", "w") == 70.0 and fresh.get("k1", "clip", "w2") is None
    path.unlink()  # a cache started again: the old rows are gone from the shared copy too
    scoring.ScoreCache(path).put_many([("k9", "clip", "w", 10.0)])
    assert scoring.ScoreCache.shared(path) is shared and len(shared) == 1 and shared.get("k1", "clip", "w") is None
    # rewritten in place, as long as before or longer (same file, same size or more): read afresh too
    text = path.read_text()
    path.write_text(text.replace('"k9"', '"k8"') + text.replace('"k9"', '"k7"'))
    assert shared.refresh() == 2 and len(shared) == 2 and shared.get("k9", "clip", "w") is None


def test_scoring_run_scores_each_image_once(tiny_ctx):
    from helpers.t2i import Generated, Request

    images = [Image.new("RGB", (32, 32), color) for color in ("red", "blue")]
    generated = [Generated(Request({}, prompt, "", 0), image, f"key{i}", False, "w", (32, 32))
                 for i, (prompt, image) in enumerate(zip(["a red square", "a blue square"], images))]
    run = scoring.ScoringRun.for_run(tiny_ctx, names=("clip",))
    first = run.score(generated)
    assert run.computed == 2 and run.reused == 0
    assert np.all(np.isfinite(first["clip"])) and first["clip"].between(0, 250).all()
    cosines = run.scorers["clip"].cosine(images, ["a red square", "a blue square"])
    np.testing.assert_allclose(first["clip"], 250 * np.maximum(cosines, 0))
    again = scoring.ScoringRun.for_run(tiny_ctx, names=("clip",)).score(generated)  # a new process, same cache
    np.testing.assert_allclose(again["clip"], first["clip"])
    rows = [json.loads(line) for line in (tiny_ctx.runs_dir / "image_cache" / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    # one image three times in a call (methods that answered alike): scored once, one cached value for all three
    same = [Generated(Request({}, "a green square", "", 0), Image.new("RGB", (32, 32), "green"), "key2", False, "w",
                      (32, 32))] * 3
    thrice = scoring.ScoringRun.for_run(tiny_ctx, names=("clip",))
    table = thrice.score(generated[:1] + same)
    assert thrice.computed == 1 and thrice.reused == 3 and table["clip"].iloc[1:].nunique() == 1
    rows = [json.loads(line) for line in (tiny_ctx.runs_dir / "image_cache" / "scores.jsonl").read_text().splitlines()]
    assert [row["image"] for row in rows] == ["key0", "key1", "key2"]
    assert rows[2]["value"] == table["clip"].iloc[1]


def test_normalisation_sensitivity_reports_rank_agreement():
    import pandas as pd

    table = pd.DataFrame({"model": ["a", "a", "b", "b"], "clip": [80, 70, 60, 65], "hps": [0.21, 0.22, 0.29, 0.28],
                          "image_reward": [0.0, 0.1, 0.0, 0.1]})
    means, tau = scoring.normalisation_sensitivity(table, {"wide hps": {"hps": (0.0, 1.0)}})
    assert tau["default"] == pytest.approx(1.0)
    # with HPS over [0.20, 0.30], b wins; over [0, 1] HPS barely moves and CLIP decides: a wins
    assert means["default"].idxmax() == "b" and means["wide hps"].idxmax() == "a" and tau["wide hps"] < 0


def test_block_wise_scoring_equals_one_pass_and_caches_each_block_before_the_next(tiny_ctx):
    from helpers.t2i import Executor, ModelCatalog, Request, default_api

    catalog = ModelCatalog.from_records([])
    api = default_api(catalog.base("SD 1.5"))
    requests = [Request({**api, "sampling_steps": steps}, f"a kite over the sea {i}", "", i)
                for i, steps in enumerate([4, 5, 4, 5, 4])]
    executor = Executor.for_run(tiny_ctx, catalog, max_side=32, batch_size=4)
    run = scoring.ScoringRun.for_run(tiny_ctx, names=("clip",))
    cache_file = tiny_ctx.runs_dir / "image_cache" / "scores.jsonl"
    rows_when_drawn = []
    generate = executor.generate

    def counting_generate(block, progress=True, **options):
        rows_when_drawn.append(len(cache_file.read_text().splitlines()) if cache_file.exists() else 0)
        return generate(block, progress, **options)

    executor.generate = counting_generate
    blocks = run.generate_and_score(executor, requests, block_size=2)
    assert rows_when_drawn == [0, 2, 4]  # each block's scores were written before the next block was drawn
    assert blocks["key"].tolist() == [g.key for g in generate(requests, progress=False)]  # the order of requests
    whole = scoring.ScoringRun.for_run(tiny_ctx, names=("clip",)).score(generate(requests, progress=False))
    np.testing.assert_allclose(blocks["clip"], whole["clip"])
    assert run.computed == 5 and len(run.generate_and_score(executor, [])) == 0
    # a rerun with every image and score cached reads no PNG: scores are looked up by key alone
    decoded = []
    get = executor.cache.get
    executor.cache.get = lambda key: decoded.append(key) or get(key)
    rerun = scoring.ScoringRun.for_run(tiny_ctx, names=("clip",)).generate_and_score(executor, requests, block_size=2)
    np.testing.assert_allclose(rerun["clip"], blocks["clip"])
    assert decoded == []


def test_scores_only_images_leave_the_cache_once_scored_and_are_not_drawn_again(tiny_ctx):
    """`keep`: an image drawn here goes once its block is scored, but a kept one, and one found in the cache (another
    stage's), stay; a rerun draws nothing while every score is cached, and only the image whose score is missing."""
    from helpers.t2i import Executor, ImageCache, ModelCatalog, Request, default_api

    catalog = ModelCatalog.from_records([])
    api = default_api(catalog.base("SD 1.5"))
    requests = [Request({**api, "sampling_steps": 4}, f"a lantern on a pier {i}", "", i) for i in range(5)]
    requests.append(requests[1])  # the kept request, again, in another block
    executor = lambda: Executor.for_run(tiny_ctx, catalog, max_side=32, batch_size=4)  # noqa: E731
    first, cache = executor(), ImageCache(tiny_ctx.runs_dir / "image_cache")
    keys = [first.key(request) for request in requests]
    executor().generate([requests[4]], progress=False)  # another stage's image, already in the cache
    run = scoring.ScoringRun.for_run(tiny_ctx, names=("clip",))
    table = run.generate_and_score(first, requests, block_size=2, keep={1}.__contains__)
    assert table["key"].tolist() == keys and first.stats["generated"] == 5 - 1  # 4 was found, the repeat reused
    assert [cache.has(key) for key in keys] == [False, True, False, False, True, True]
    assert first.stats["removed_once_scored"] == 3
    # the same scores as a run that keeps every image, in a cache of its own
    other = tiny_ctx.runs_dir / "elsewhere"
    keeping = Executor(catalog, first.weights, ImageCache(other), first.config)
    whole = scoring.ScoringRun(run.scorers, scoring.ScoreCache(other / "scores.jsonl")).generate_and_score(
        keeping, requests, block_size=2)
    np.testing.assert_allclose(table["clip"], whole["clip"])
    assert all(ImageCache(other).has(key) for key in keys)
    # a rerun: every score is cached, so the removed images are not drawn again, and no PNG is read
    again, rerun = executor(), scoring.ScoringRun.for_run(tiny_ctx, names=("clip",))
    np.testing.assert_allclose(rerun.generate_and_score(again, requests, block_size=2, keep={1}.__contains__)["clip"],
                               table["clip"])
    assert again.stats["generated"] == 0 and again.stats["not_needed"] == 3 and rerun.computed == 0
    # a score gone from the cache (a torn last line): that image alone is drawn, scored and removed again
    scores = tiny_ctx.runs_dir / "image_cache" / "scores.jsonl"
    scores.write_text("".join(line for line in scores.read_text().splitlines(keepends=True) if keys[2] not in line))
    third, once_more = executor(), scoring.ScoringRun.for_run(tiny_ctx, names=("clip",))
    np.testing.assert_allclose(once_more.generate_and_score(third, requests, block_size=2, keep={1}.__contains__)[
        "clip"], table["clip"], rtol=1e-5)
    assert third.stats["generated"] == 1 and once_more.computed == 1 and third.stats["removed_once_scored"] == 1
    assert not cache.has(keys[2])
    with pytest.raises(FileNotFoundError, match="only its cached scores were asked for"):
        again.generate([requests[0]], progress=False, needed=lambda key: False)[0].image


def test_fid_features_kept_on_disk_let_images_go_and_a_rerun_reads_them_back(tiny_ctx):
    """`also`: FID features kept by image key beside the scores; with `keep`, each image leaves the cache once both
    are in; a rerun (new objects, as a new process) draws and embeds nothing, and reads the same rows from disk; a
    block whose features file is gone is drawn again, though its scores are cached."""
    from helpers.scorers.fid import FidFeatures
    from helpers.t2i import Executor, ImageCache, ModelCatalog, Request, default_api

    catalog = ModelCatalog.from_records([])
    api = default_api(catalog.base("SD 1.5"))
    requests = [Request({**api, "sampling_steps": 4}, f"a kite over dunes {i}", "", i) for i in range(4)]
    executor = lambda: Executor.for_run(tiny_ctx, catalog, max_side=32, batch_size=4)  # noqa: E731
    store = tiny_ctx.runs_dir / "image_cache" / "fid_features"
    features = lambda: FidFeatures(tiny_ctx.model_path("clip"), image_size=32, store=store)  # noqa: E731
    first, embedded, run = executor(), features(), scoring.ScoringRun.for_run(tiny_ctx, names=("clip",))
    table = run.generate_and_score(first, requests, block_size=2, keep=lambda i: False, also=[embedded])
    keys, cache = table["key"].tolist(), ImageCache(tiny_ctx.runs_dir / "image_cache")
    assert first.stats["generated"] == 4 and embedded.extracted == 4 and first.stats["removed_once_scored"] == 4
    assert not any(cache.has(key) for key in keys)
    files = sorted(embedded.store.glob("*.npz"))
    assert len(files) == 2 and embedded.store.parent == store  # one file per block, under the features' identity
    # the same rows as embedding the pixels of a run that keeps them (float32 rows, read back as float64)
    kept = Executor(catalog, first.weights, ImageCache(tiny_ctx.runs_dir / "elsewhere"), first.config)
    pictures = [g.image for g in kept.generate(requests, progress=False)]
    expected = FidFeatures(tiny_ctx.model_path("clip"), image_size=32)(pictures)
    rows = embedded.rows(keys)
    assert rows.dtype == np.float64 and rows.shape == expected.shape
    np.testing.assert_allclose(rows, expected, rtol=1e-5, atol=1e-6)
    # a rerun: scores and rows are on disk, so nothing is drawn or embedded, and the rows are the very same
    again, reread, rerun = executor(), features(), scoring.ScoringRun.for_run(tiny_ctx, names=("clip",))
    rerun.generate_and_score(again, requests, block_size=2, keep=lambda i: False, also=[reread])
    assert again.stats["generated"] == 0 and again.stats["not_needed"] == 4 and reread.extracted == 0
    np.testing.assert_array_equal(reread.rows(keys), rows)
    # one block's features lost: only its two images are drawn (their scores are cached), embedded and removed
    lost = next(path for path in files if keys[0] in np.load(path)["keys"].tolist())
    lost.unlink()
    third, partial, once_more = executor(), features(), scoring.ScoringRun.for_run(tiny_ctx, names=("clip",))
    once_more.generate_and_score(third, requests, block_size=2, keep=lambda i: False, also=[partial])
    assert third.stats["generated"] == 2 and partial.extracted == 2 and once_more.computed == 0
    assert third.stats["removed_once_scored"] == 2 and not any(cache.has(key) for key in keys)
    np.testing.assert_array_equal(partial.rows(keys), rows)
    # features of another size are another set, and a key never embedded is named with the fix
    assert features().features_id != FidFeatures(tiny_ctx.model_path("clip"), image_size=64, store=store).features_id
    with pytest.raises(KeyError, match="no FID features for 1 image.*embed them first"):
        partial.rows(["not-a-key"])


def test_scorers_preprocess_images_in_threads_with_the_scores_of_one_call(tiny_ctx, monkeypatch):
    """CLIP, HPS v2, ImageReward and the aesthetic predictor turn images into pixels in worker threads (a 512 px
    image is ~3 ms of CPU per scorer); every image is transformed alone, so the scores equal one call's."""
    import threading

    from PIL import Image

    from helpers.scorers import base

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (48 + 8 * i, 40, 3), dtype=np.uint8)) for i in range(7)]
    prompts = [f"a lantern {i}" for i in range(7)]
    scorers = {name: scoring.load_scorer(name, tiny_ctx) for name in ("clip", "hps", "image_reward", "aesthetic")}
    threads = set()
    transform = base.pixels_in_threads

    def watching(fn, chunk_images, workers=None):
        return transform(lambda chunk: threads.add(threading.current_thread().name) or fn(chunk), chunk_images,
                         workers)

    scores = {}
    for workers in (1, 3):
        monkeypatch.setattr(base, "PREPROCESS_WORKERS", workers)
        monkeypatch.setattr(base, "pixels_in_threads", watching)
        for module in ("helpers.scoring", "helpers.scorers.aesthetic"):
            monkeypatch.setattr(f"{module}.pixels_in_threads", watching)
        scores[workers] = {name: scorer.score(images, prompts) for name, scorer in scorers.items()}
    for name in scorers:
        np.testing.assert_array_equal(scores[3][name], scores[1][name], err_msg=name)
    assert any(name.startswith("preprocess") for name in threads) and threading.main_thread().name in threads


def test_every_scorer_scores_a_batch_that_runs_out_of_memory_in_halves_and_keeps_the_size_that_fitted(
        tiny_ctx, caplog):
    """The paper recipe's scoring batches are sized for an 80 GB GPU: on a smaller one a batch that runs out of
    memory is scored again in halves (`scorers.base.in_fitting_batches`), with the same values, and the scorer
    keeps the size that fitted. Out of memory is simulated: any image batch of more than 2 fails to allocate."""
    import torch

    from helpers.scorers.fid import FidFeatures

    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)) for _ in range(5)]
    prompts = [f"a lighthouse in a storm, {i}" for i in range(5)]
    scorers = {name: scoring.load_scorer(name, tiny_ctx) for name in ("clip", "hps", "image_reward", "aesthetic")}
    scorers["fid"] = FidFeatures(tiny_ctx.model_path("clip"), image_size=32)
    score = lambda name: np.asarray(scorers[name]._embed(images) if name == "fid" else  # noqa: E731
                                    scorers[name].score(images, prompts), dtype=np.float64)
    for name, scorer in scorers.items():
        scorer.batch_size = 2
        fitting = score(name)
        scorer.batch_size = 4
        failures = []

        def too_many(module, args):
            if args[0].shape[0] > 2:  # the patch embedding (or stem) of each image tower sees the image batch
                failures.append(args[0].shape[0])
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        modules = {id(m): m for value in vars(scorer).values() if isinstance(value, torch.nn.Module)
                   for m in value.modules() if isinstance(m, torch.nn.Conv2d)}
        hooks = [module.register_forward_pre_hook(too_many) for module in modules.values()]
        caplog.clear()
        try:
            halved = score(name)
        finally:
            for hook in hooks:
                hook.remove()
        assert failures == [4], name  # the first batch of 4 failed once; then 2, 2 and the last 1 fitted
        assert scorer.batch_size == 2, name
        np.testing.assert_allclose(halved, fitting, rtol=1e-5, atol=1e-6, err_msg=name)
        assert "ran out of accelerator memory with 4 rows at once; going on with at most 2" in caplog.text, name
