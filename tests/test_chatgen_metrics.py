"""ChatGen step-wise metrics, image requests with the baseline fallback, FID, the fixed unified metric, Tables 4/6/7."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from helpers.chatgen import ARGUMENT_FIELDS, TARGET_FIELDS, ChatSample, Prediction
from helpers.chatgen import metrics
from helpers.t2i import ImageCache, ModelCatalog, default_api

PROMPT = "anime, a sailing ship, (vibrant colors:1.2), volumetric fog, masterpiece, 8k, best quality"
NEON_CALL = {"model": "NeonMix", "type": "Checkpoint", "base_model": "SDXL 1.0", "width": 832, "height": 1216,
             "sampling_method": "Euler", "sampling_steps": 25, "cfg_scale": 5.0}


def _record(index: int, model: str, architecture: str, version: int) -> dict:
    """A DABench record of the shape ModelCatalog.from_records reads."""
    return {"id": f"{5000 + index}-{version}", "image_id": 5000 + index, "model_id": version + 1,
            "model_version_id": version, "split": "test", "architecture": architecture, "seed": 7, "lora_base": None,
            "instruction": {"prompt": PROMPT, "negative_prompt": "lowres"},
            "api": {**NEON_CALL, "model": model, "base_model": architecture,
                    "model_description": f"{model} is a checkpoint for {architecture}."}}


@pytest.fixture(scope="module")
def catalog() -> ModelCatalog:
    return ModelCatalog.from_records([_record(0, "NeonMix", "SDXL 1.0", 100), _record(1, "PaperCut", "SD 1.5", 200)])


def _sample(sample_id: str, *, input_type: str = "single", setting: str = "supervised", **target) -> ChatSample:
    full = {**{field: None for field in TARGET_FIELDS}, **NEON_CALL, "prompt": PROMPT, "negative_prompt": "lowres",
            **target}
    return ChatSample(id=sample_id, dabench_id=1, input_type=input_type, role="a retired sailor",
                      messages=[{"role": "user", "content": "draw me a ship"}], target=full,
                      image_key="img" if input_type == "multimodal" else None, split="test", setting=setting)


def _prediction(sample_id: str, method: str = "ChatGen-Evo", *, prompt: str = PROMPT, model: str | None = "NeonMix",
                **arguments) -> Prediction:
    call = {name: NEON_CALL[name] for name in ARGUMENT_FIELDS}
    return Prediction(sample_id=sample_id, method=method, prompt=prompt, negative_prompt="lowres", model=model,
                      arguments={**call, **arguments})


@pytest.fixture(scope="module")
def scorer():
    from helpers.scorers.bertscore import BertScorer

    return BertScorer()


# ------------------------------------------------------------------------------------------ step metrics

def test_prompt_bertscore_identical_unrelated_empty(scorer):
    predicted = [PROMPT, "a red sports car racing on a track at night", "", "   ", None]
    reference = [PROMPT, "please file the quarterly tax report before monday", PROMPT, PROMPT, PROMPT]
    mean, per_sample = metrics.prompt_bertscore(predicted, reference, scorer)
    assert per_sample[0] == pytest.approx(1.0, abs=1e-5)
    assert per_sample[1] < 0.9
    assert list(per_sample[2:]) == [0.0, 0.0, 0.0]  # nothing written scores 0
    assert mean == pytest.approx(per_sample.mean())
    with pytest.raises(ValueError, match="pair them one to one"):
        metrics.prompt_bertscore([PROMPT], [], scorer)


def test_selection_accuracy_counts_none_and_other_names_wrong():
    mean, per_sample = metrics.selection_accuracy(["A", "B", None, "a"], ["A", "C", "C", "A"])
    assert list(per_sample) == [1.0, 0.0, 0.0, 0.0] and mean == 0.25


def test_argument_accuracy_compares_numbers_as_numbers():
    # the brief's example: steps 20 vs 20.0 right, cfg 7 vs 7.5 wrong → (1 + 0) / 2
    score = metrics.argument_accuracy([{"sampling_steps": 20, "cfg_scale": 7}],
                                      [{"sampling_steps": 20.0, "cfg_scale": 7.5}],
                                      fields=("sampling_steps", "cfg_scale"))
    assert score.per_field == {"sampling_steps": 1.0, "cfg_scale": 0.0} and score.mean == 0.5


def test_argument_accuracy_hand_worked_over_all_five_fields():
    reference = [{"sampling_method": "Euler a", "sampling_steps": 20.0, "cfg_scale": 7.5, "width": 512, "height": 768},
                 {"sampling_method": "DPM++ 2M Karras", "sampling_steps": 30, "cfg_scale": 7, "width": 1024,
                  "height": 1024},
                 {"sampling_method": "Euler", "sampling_steps": 25, "cfg_scale": 5.0, "width": 832, "height": 1216}]
    predicted = [{"sampling_method": "Euler a", "sampling_steps": 20, "cfg_scale": 7, "width": 512, "height": 768},
                 {"sampling_steps": "30", "cfg_scale": 7.0},  # method, width, height missing: wrong
                 None]  # nothing predicted: every argument wrong
    score = metrics.argument_accuracy(predicted, reference)
    # sample 1: 4/5 (cfg wrong); sample 2: 2/5 (steps, cfg); sample 3: 0/5 → mean (0.8 + 0.4 + 0) / 3 = 0.4
    assert score.per_sample == pytest.approx([0.8, 0.4, 0.0]) and score.mean == pytest.approx(0.4)
    assert score.per_field == pytest.approx({"sampling_method": 1 / 3, "sampling_steps": 2 / 3, "cfg_scale": 1 / 3,
                                             "width": 1 / 3, "height": 1 / 3})


def test_same_argument_edge_cases():
    assert metrics.same_argument(7, 7.0) and metrics.same_argument("7", 7) and metrics.same_argument(" Euler ", "Euler")
    assert not metrics.same_argument(True, 1)  # a boolean is never a number
    assert not metrics.same_argument(None, None)  # missing is wrong even when the reference is odd
    assert not metrics.same_argument("euler a", "Euler a")
    with pytest.raises(ValueError, match="lack \\['cfg_scale'\\]"):
        metrics.argument_accuracy([{}], [{"sampling_steps": 20}], fields=("sampling_steps", "cfg_scale"))


def test_step_metrics_one_row_for_a_set(scorer):
    samples = [_sample("s1"), _sample("s2", model="PaperCut", cfg_scale=7.5)]
    predictions = [_prediction("s1"), _prediction("s2", prompt="")]  # s2: empty prompt, wrong model and cfg
    row = metrics.step_metrics(predictions, samples, scorer)
    assert row["samples"] == 2
    assert row["prompt_bertscore"] == pytest.approx(0.5, abs=1e-5)  # (1 + 0) / 2
    assert row["selection_accuracy"] == 0.5
    assert row["argument_accuracy"] == pytest.approx((1.0 + 0.8) / 2)
    assert row["argument_cfg_scale"] == 0.5 and row["argument_width"] == 1.0
    with pytest.raises(ValueError, match="twice"):
        metrics.step_metrics([_prediction("s1"), _prediction("s1")], samples, scorer)
    with pytest.raises(ValueError, match="has no sample"):
        metrics.step_metrics([_prediction("nope")], samples, scorer)


# ------------------------------------------------------------------------------------------ unified metric

def test_unified_score_fixed_ranges_with_fid_flipped():
    """Hand-worked from DESIGN.md's fixed ranges, NOT from ChatGen's Table 4 (whose numbers we could not recall with
    confidence): FID [0, 100] used as 1 − norm, CLIP [0, 100], HPS [0.20, 0.30], ImageReward [−0.5, 0.5]."""
    # (1 − 20/100) = 0.8, 30/100 = 0.3, (0.25 − 0.20)/0.10 = 0.5, (0 + 0.5)/1 = 0.5 → 100 · 2.1 / 4 = 52.5
    assert metrics.unified_score(fid=20.0, clip=30.0, hps=0.25, image_reward=0.0) == pytest.approx(52.5)
    # 0.5, 0.25, 0.7, 0.8 → 100 · 2.25 / 4 = 56.25
    assert metrics.unified_score(fid=50.0, clip=25.0, hps=0.27, image_reward=0.3) == pytest.approx(56.25)
    # FID is flipped: 10 more FID costs 100 · 0.1 / 4 = 2.5 points (unflipped it would add them)
    assert metrics.unified_score(30.0, 30.0, 0.25, 0.0) == pytest.approx(52.5 - 2.5)
    assert metrics.unified_score(20.0, 30.0, 0.25, 0.0, ranges={"fid": (0.0, 200.0)}) == pytest.approx(55.0)


# ------------------------------------------------------------------------------------------ image requests

def test_invalid_predictions_fall_back_to_the_baseline_call(catalog):
    samples = [_sample(f"s{i}") for i in range(4)]
    predictions = [_prediction("s0", prompt="a ship"), _prediction("s1", model="NeonMix Turbo", prompt="ship one"),
                   _prediction("s2", model=None, prompt="ship two"), _prediction("s3", cfg_scale=45.0, prompt="three")]
    plan = metrics.image_requests(predictions, samples, catalog, num_seeds=2, seed=10)
    assert len(plan) == 8 and len(plan.table) == 8
    assert list(plan.table["fallback"]) == [False, False] + [True] * 6
    assert [r.split(":")[0] for r in plan.table["fallback_reason"][::2]] == ["", "unknown_model", "unparseable",
                                                                             "cfg_out_of_range"]
    baseline = default_api(catalog.base("SD 1.5"))
    assert baseline["model"] == "Stable Diffusion v1.5" and baseline["sampling_method"] == "Euler a"
    assert (baseline["sampling_steps"], baseline["cfg_scale"], baseline["width"]) == (20, 7.0, 512)
    for request, prompt in zip(plan.requests[2:], ["ship one", "ship one", "ship two", "ship two", "three", "three"]):
        assert request.api == baseline and request.prompt == prompt and request.negative_prompt == "lowres"
    valid = plan.requests[0].api
    assert valid["model"] == "NeonMix" and valid["base_model"] == "SDXL 1.0" and valid["cfg_scale"] == 5.0
    assert [r.seed for r in plan.requests[:2]] == [10, 11]
    assert list(plan.table["model"]) == ["NeonMix"] * 2 + ["Stable Diffusion v1.5"] * 6
    assert pd.isna(plan.table["predicted_model"].iloc[4])  # no model chosen


def test_a_perfect_prediction_redraws_the_reference_images(catalog):
    samples = [_sample("s0")]
    perfect = _prediction("s0", cfg_scale=5, sampling_steps=25.0)  # numbers typed differently, same call
    plan = metrics.image_requests([perfect], samples, catalog, num_seeds=2)
    reference = metrics.reference_requests(samples, catalog, num_seeds=2)
    assert plan.requests == reference.requests
    assert ImageCache.key(plan.requests[1], "w", (64, 64)) == ImageCache.key(reference.requests[1], "w", (64, 64))
    assert set(reference.table["method"]) == {metrics.REFERENCE}
    with pytest.raises(ValueError, match="does not run"):
        metrics.reference_requests([_sample("bad", model="Unknown")], catalog, num_seeds=1)
    with pytest.raises(ValueError, match="num_seeds=0"):
        metrics.image_requests([perfect], samples, catalog, num_seeds=0)


def test_with_ground_truth_keeps_only_the_named_stage():
    sample = _sample("s0", model="PaperCut", cfg_scale=7.5)
    predicted = _prediction("s0", prompt="mine", model="NeonMix", cfg_scale=3.0)
    model_only = metrics.with_ground_truth(predicted, sample, "model only")
    assert (model_only.prompt, model_only.model, model_only.arguments["cfg_scale"]) == (PROMPT, "NeonMix", 7.5)
    prompt_only = metrics.with_ground_truth(predicted, sample, "prompt only")
    assert (prompt_only.prompt, prompt_only.model, prompt_only.arguments["cfg_scale"]) == ("mine", "PaperCut", 7.5)
    arguments_only = metrics.with_ground_truth(predicted, sample, "arguments only")
    assert (arguments_only.prompt, arguments_only.model, arguments_only.arguments["cfg_scale"]) == (PROMPT, "PaperCut",
                                                                                                    3.0)
    assert metrics.variant_of(model_only) == "model only" and metrics.variant_of(predicted) == "all predicted"
    assert metrics.variant_of(Prediction("s0", "m", notes={"predicted": "arguments"})) == "arguments only"
    with pytest.raises(ValueError, match="not one of"):
        metrics.with_ground_truth(predicted, sample, "prompt")


# ------------------------------------------------------------------------------------------ per-sample frame

def test_per_sample_frame_joins_image_scores_per_sample(scorer):
    samples = [_sample("s1", input_type="history"), _sample("s2", setting="few-shot", cfg_scale=7.5)]
    predictions = [_prediction("s1"), _prediction("s2"), _prediction("s1", "ChatGen-Base", model="PaperCut")]
    images = pd.DataFrame({"method": ["ChatGen-Evo"] * 4 + ["ChatGen-Base"] * 2,
                           "variant": "all predicted", "sample_id": ["s1", "s1", "s2", "s2", "s1", "s1"],
                           "clip": [30.0, 40.0, 20.0, 20.0, 10.0, 12.0], "fallback": [False] * 6})
    rows = metrics.per_sample_frame(predictions, samples, scorer, images)
    assert list(rows[["method", "setting", "input_type", "variant", "sample_id"]].itertuples(index=False, name=None)) \
        == [("ChatGen-Evo", "supervised", "history", "all predicted", "s1"),
            ("ChatGen-Evo", "few-shot", "single", "all predicted", "s2"),
            ("ChatGen-Base", "supervised", "history", "all predicted", "s1")]
    assert rows["clip"].tolist() == [35.0, 20.0, 11.0]  # mean over each sample's seeds
    assert rows["selection_accuracy"].tolist() == [1.0, 1.0, 0.0]
    assert rows["argument_accuracy"].tolist() == pytest.approx([1.0, 0.8, 1.0])
    assert rows["argument_cfg_scale"].tolist() == [1.0, 0.0, 1.0]
    by_id = metrics.per_sample_frame(predictions[:2], samples, scorer, {"s1": {"clip": [1.0, 3.0]}})
    assert by_id["clip"].iloc[0] == 2.0 and math.isnan(by_id["clip"].iloc[1])  # s2 has no images
    with pytest.raises(ValueError, match="no 'method' column"):
        metrics.per_sample_frame(predictions, samples, scorer, {"s1": {"clip": [1.0]}})


# ------------------------------------------------------------------------------------------ tables

def _rows() -> pd.DataFrame:
    """A hand-made tidy frame: method A in both settings, B supervised, plus a Table 6 variant of A."""
    columns = ["method", "setting", "input_type", "variant", "sample_id", "prompt_bertscore", "selection_accuracy",
               "argument_accuracy", "clip", "hps", "image_reward"]
    values = [("A", "few-shot", "history", "all predicted", "s3", 0.5, 1.0, 0.4, 50.0, 0.30, 0.5),
              ("A", "supervised", "single", "all predicted", "s1", 0.2, 1.0, 0.8, 30.0, 0.25, 0.1),
              ("A", "supervised", "multimodal", "all predicted", "s2", 0.4, 0.0, 0.6, 40.0, 0.27, 0.3),
              ("B", "supervised", "single", "all predicted", "s1", 0.1, 0.0, 0.2, 20.0, 0.21, -0.1),
              ("B", "supervised", "multimodal", "all predicted", "s2", 0.1, 0.0, 0.4, 22.0, 0.23, -0.3),
              ("A", "supervised", "single", "model only", "s1", 1.0, 1.0, 1.0, 99.0, 0.29, 0.4)]
    return pd.DataFrame(values, columns=columns)


SET_METRICS = pd.DataFrame({"method": ["A", "A", "B"], "setting": ["supervised", "few-shot", "supervised"],
                            "fid": [20.0, 60.0, 40.0]})


def test_table4_means_intervals_and_unified_by_hand():
    table = metrics.table4(_rows(), SET_METRICS, num_resamples=200)
    assert list(table.index) == [("A", "supervised"), ("A", "few-shot"), ("B", "supervised")]  # SETTINGS order
    a = table.loc[("A", "supervised")]  # the "model only" row of A is not Table 4's
    assert a["samples"] == 2
    assert (a["prompt_bertscore"], a["selection_accuracy"], a["argument_accuracy"]) == pytest.approx((0.3, 0.5, 0.7))
    assert (a["clip"], a["hps"], a["image_reward"]) == pytest.approx((35.0, 0.26, 0.2))
    # unified: 1 − 20/100 = 0.8, 0.35, (0.26 − 0.2)/0.1 = 0.6, 0.2 + 0.5 = 0.7 → 100 · 2.45 / 4
    assert a["fid"] == 20.0 and a["unified"] == pytest.approx(61.25)
    assert 0.2 <= a["prompt_bertscore_low"] <= 0.3 <= a["prompt_bertscore_high"] <= 0.4
    few = table.loc[("A", "few-shot")]  # one sample: the interval collapses onto it
    assert few["clip_low"] == few["clip"] == few["clip_high"] == 50.0
    # 1 − 0.6 = 0.4, 0.5, 1.0, 1.0 → 72.5
    assert few["unified"] == pytest.approx(72.5)
    assert "fid_low" not in table and "unified_low" not in table
    assert "no bootstrap interval" in table["note"].iloc[0] and "fid" in table.attrs["column_notes"]


def test_table4_without_set_metrics_and_set_metric_errors():
    plain = metrics.table4(_rows(), num_resamples=50)
    assert "fid" not in plain and "unified" not in plain and "note" not in plain
    missing = metrics.table4(_rows(), SET_METRICS.iloc[:2], num_resamples=50)
    assert math.isnan(missing.loc[("B", "supervised"), "fid"]) and math.isnan(missing.loc[("B", "supervised"),
                                                                                          "unified"])
    with pytest.raises(ValueError, match="needs a 'setting' column"):
        metrics.table4(_rows(), SET_METRICS.drop(columns="setting"), num_resamples=50)
    with pytest.raises(ValueError, match="2 set_metrics rows match"):
        metrics.table4(_rows(), pd.concat([SET_METRICS, SET_METRICS.iloc[:1]]), num_resamples=50)
    with pytest.raises(ValueError, match="per_sample_frame"):
        metrics.table4(_rows().drop(columns="setting"))


def test_table6_rows_in_the_paper_order():
    rows = _rows().assign(method=lambda frame: frame["method"].replace({"A": "ChatGen-Evo"}))
    extra = rows.iloc[[1]].assign(variant="prompt only", prompt_bertscore=0.9)
    table = metrics.table6(pd.concat([rows, extra]), num_resamples=50)
    assert list(table.index) == ["prompt only", "model only", "all predicted"]
    assert table.loc["all predicted", "samples"] == 3  # both settings of ChatGen-Evo
    assert table.loc["all predicted", "prompt_bertscore"] == pytest.approx((0.5 + 0.2 + 0.4) / 3)
    assert table.loc["prompt only", "prompt_bertscore"] == 0.9
    supervised = metrics.table6(rows, num_resamples=50, setting="supervised")
    assert supervised.loc["all predicted", "clip"] == pytest.approx(35.0)
    with pytest.raises(ValueError, match="no rows"):
        metrics.table6(rows, method="Nobody")


def test_table7_per_input_type():
    table = metrics.table7(_rows(), num_resamples=50)
    assert list(table.index) == [("A", "single"), ("A", "multimodal"), ("A", "history"), ("B", "single"),
                                 ("B", "multimodal")]
    assert table.loc[("A", "single"), "clip"] == 30.0  # the "model only" row (99) stays out
    assert table.loc[("B", "multimodal"), "argument_accuracy"] == 0.4


def test_grouping_rows_pick_one_table_and_none_where_fid_had_too_few_images(tmp_path):
    from helpers.chatgen import experiment

    # one image per group: no group reaches FID's two images, so the saved table has columns and no rows
    scored = _rows().iloc[:2].assign(variant=metrics.ALL_PREDICTED)
    empty = experiment.set_metrics(scored.assign(key=["a", "b"]), None, {"s3": [], "s1": []})  # no FID to read
    empty.to_csv(tmp_path / "set_metrics.csv", index=False)
    empty = pd.read_csv(tmp_path / "set_metrics.csv")  # as notebook 11 reads it back
    assert empty.empty and {"grouping", "fid", "method", "input_type"} <= set(empty.columns)
    assert all(experiment.grouping_rows(empty, keys) is None for keys in experiment.GROUPINGS)

    # as a small profile saves it: FID for Table 4's groups, none for Table 7's input types
    saved = pd.DataFrame(SET_METRICS.assign(grouping="method+setting", unified=1.0),
                         columns=empty.columns)
    saved.to_csv(tmp_path / "set_metrics.csv", index=False)
    saved = pd.read_csv(tmp_path / "set_metrics.csv")
    table4_rows = experiment.grouping_rows(saved, ("method", "setting"))
    assert list(table4_rows.columns) == ["method", "setting", "fid", "unified"]
    assert table4_rows["fid"].tolist() == [20.0, 60.0, 40.0]
    assert experiment.grouping_rows(saved, ("method", "input_type")) is None
    table4 = metrics.table4(_rows(), table4_rows, num_resamples=20)
    assert table4.loc[("A", "supervised"), "unified"] == pytest.approx(61.25)  # as in the table-4 test
    table7 = metrics.table7(_rows(), experiment.grouping_rows(saved, ("method", "input_type")), num_resamples=20)
    assert "fid" not in table7 and table7.loc[("A", "single"), "clip"] == 30.0
    # a grouping's FID that is NaN (FID computed but undefined) stays a column
    nan_fid = experiment.grouping_rows(saved.assign(fid=float("nan")), ("method", "setting"))
    assert "fid" in nan_fid and nan_fid["fid"].isna().all()
    with pytest.raises(ValueError, match="unknown grouping"):
        experiment.grouping_rows(saved, ("setting",))


# ------------------------------------------------------------------------------------------ FID

@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from helpers.models import build_tiny_clip

    folder = tmp_path_factory.mktemp("clip")
    build_tiny_clip(folder, seed=0, image_size=32)
    return folder


def _noise_images(count: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(count)]


def test_image_metrics_fid_zero_for_identical_sets(tiny_clip):
    images = _noise_images(8, seed=1)
    scores = pd.DataFrame({"clip": np.linspace(20, 40, 8), "hps": 0.25, "image_reward": 0.0})
    generated = [SimpleNamespace(image=image) for image in images]  # t2i.Generated records work too
    row = metrics.image_metrics(scores, generated, images, feature=tiny_clip, image_size=32)
    assert abs(row["fid"]) < 1e-3
    assert (row["clip"], row["hps"], row["image_reward"], row["images"]) == pytest.approx((30.0, 0.25, 0.0, 8))
    assert row["unified"] == pytest.approx(metrics.unified_score(row["fid"], 30.0, 0.25, 0.0))
    brighter = [Image.fromarray((np.asarray(image) // 4 + 180).astype(np.uint8)) for image in images]
    assert metrics.image_metrics(scores, brighter, images, feature=tiny_clip, image_size=32)["fid"] > 1e-2
    with pytest.raises(ValueError, match="lacks \\['hps'\\]"):
        metrics.image_metrics(scores.drop(columns="hps"), images, images, feature=tiny_clip, image_size=32)


def test_set_metrics_from_features_extracted_once_equal_image_metrics_per_group(tiny_clip):
    from helpers.chatgen import experiment
    from helpers.scorers.fid import FidFeatures

    scored = _rows().assign(key=[f"g{i}" for i in range(6)])  # groups (A, supervised), (B, supervised), …
    images = _noise_images(6, seed=7)
    references = {"s1": _noise_images(2, seed=8), "s2": _noise_images(2, seed=9), "s3": _noise_images(1, seed=10)}
    features = FidFeatures(tiny_clip, image_size=32)
    features(images, keys=list(scored["key"]))
    samples = [sample for sample, found in references.items() for _ in found]
    reference_keys = [f"{sample}-{i}" for i, sample in enumerate(samples)]
    features([image for found in references.values() for image in found], keys=reference_keys)
    by_sample = experiment.reference_keys_by_sample(samples, reference_keys)
    assert by_sample == {"s1": ["s1-0", "s1-1"], "s2": ["s2-2", "s2-3"], "s3": ["s3-4"]}
    features.rows = None  # each set is read as moments, a chunk at a time, never copied out whole
    table = experiment.set_metrics(scored, features, by_sample)
    by_group = table[table["grouping"] == "method+setting"].set_index(["method", "setting"])
    assert set(by_group.index) == {("A", "supervised"), ("B", "supervised")}  # (A, few-shot): one image only
    for method in ("A", "B"):
        group = scored[(scored["method"] == method) & (scored["setting"] == "supervised")
                       & (scored["variant"] == metrics.ALL_PREDICTED)]
        expected = metrics.image_metrics(group, [images[i] for i in group.index], references["s1"] + references["s2"],
                                         feature=tiny_clip, image_size=32)  # embeds the images again, per group
        assert by_group.loc[(method, "supervised"), "fid"] == pytest.approx(expected["fid"], rel=1e-6)  # float32 batches
        assert by_group.loc[(method, "supervised"), "unified"] == pytest.approx(expected["unified"], rel=1e-6)
