"""`t2ibook bench` at tiny size (every benchmark runs; no timing is asserted) and the cost model's arithmetic."""
from __future__ import annotations

import ast
import json
import math
import re
from pathlib import Path

import pytest

from helpers import cli
from helpers.benchmarks import PLAN, cost, load_results
from helpers.benchmarks.harness import RENDER_PHASES, headline, summary_lines
from helpers.runner import declared_parameters

NAMES = ["api_generation", "image_generation", "scoring", "rrhf_step", "dpo_step", "vqa_scoring", "host_io",
         "lora_switching"]


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "cpu-tiny.json"
    assert cli.main(["bench", "--size", "tiny", "--out", str(out)]) == 0
    return load_results(out)


def test_every_benchmark_times_both_paths_and_records_what_ran(tiny_results):
    assert [b["name"] for b in tiny_results["benchmarks"]] == NAMES
    assert tiny_results["size"] == "tiny" and tiny_results["device"]["device"] == "cpu"
    assert {"torch", "transformers", "diffusers", "trl"} <= set(tiny_results["versions"])
    for bench in tiny_results["benchmarks"]:
        naive, project = headline(bench)
        for timing in (naive, project):
            assert timing["units"] > 0 and math.isfinite(timing["seconds_per_unit"]) and timing["seconds_per_unit"] > 0
            assert timing["total_s"] == pytest.approx(timing["seconds_per_unit"] * timing["units"], rel=1e-3)
        assert bench["ratio"] == pytest.approx(naive["seconds_per_unit"] / project["seconds_per_unit"], rel=1e-2)
        assert bench["shapes"]  # the shapes the numbers belong to travel with them


def test_each_benchmark_did_the_planned_work(tiny_results):
    by_name = {b["name"]: b for b in tiny_results["benchmarks"]}
    api = by_name["api_generation"]["paths"]
    assert api["naive"]["units"] == PLAN["api_generation"]["tiny"]["naive"]
    assert api["project"]["units"] == api["batched_generate"]["units"] == PLAN["api_generation"]["tiny"]["prompts"]
    assert api["project"]["settings"]["cache"] == "static"
    assert by_name["image_generation"]["paths"]["project"]["units"] == PLAN["image_generation"]["tiny"]["images"]
    phases = by_name["image_generation"]["paths"]["project"]["settings"]["phases_s_per_image"]
    assert set(phases) == set(RENDER_PHASES) and phases["denoising"] > 0 and phases["decode"] > 0
    assert min(phases.values()) >= 0
    assert set(by_name["rrhf_step"]["paths"]) == {"naive_lora", "project_lora", "naive_full", "project_full"}
    lora, full = by_name["rrhf_step"]["paths"]["project_lora"], by_name["rrhf_step"]["paths"]["project_full"]
    assert 0 < lora["settings"]["trainable_parameters"] < full["settings"]["trainable_parameters"]
    assert lora["settings"]["gradient_checkpointing"] is full["settings"]["gradient_checkpointing"] is True
    assert by_name["dpo_step"]["paths"]["project"]["settings"]["train_batch_size"] == PLAN["dpo_step"]["tiny"]["pairs"]
    vqa = by_name["vqa_scoring"]["paths"]
    assert (vqa["naive"]["units"], vqa["project"]["units"]) == (PLAN["vqa_scoring"]["tiny"]["naive"],
                                                                 PLAN["vqa_scoring"]["tiny"]["images"])
    host = by_name["host_io"]["paths"]
    assert host["naive"]["units"] == host["project"]["units"] == PLAN["host_io"]["tiny"]["images"]
    assert host["project"]["settings"]["png"].startswith("zlib 1")
    # the photograph's PNGs: zlib 6 (naive) writes fewer bytes than the cache's zlib 1, both far below raw pixels
    side = by_name["host_io"]["shapes"]["side"]
    sizes = [host[path]["settings"]["png_bytes_per_image"] for path in ("naive", "project")]
    assert 0 < sizes[0] < sizes[1] < 3 * side * side
    lora, plan = by_name["lora_switching"]["paths"], PLAN["lora_switching"]["tiny"]
    assert lora["naive"]["units"] == lora["project"]["units"] == plan["loras"] * plan["images"]
    assert (lora["naive"]["settings"]["loras"], lora["project"]["settings"]["loras"]) == ("named adapters",
                                                                                         "merged, then unmerged")
    assert all(0 < lora[path]["settings"]["switch_s"] < lora[path]["total_s"] for path in ("naive", "project"))


def test_summary_names_device_and_every_benchmark(tiny_results):
    text = "\n".join(summary_lines(tiny_results))
    assert "CPU" in text and all(name in text for name in NAMES)
    assert "image_generation, project path per image: prelude " in text and ", decode " in text
    assert cost.verdict_lines(tiny_results) == []  # tiny shapes on a CPU say nothing about the H100 targets


def test_bench_refuses_full_size_without_a_gpu_and_unknown_names(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("T2IBOOK_DEVICE", "cpu")
    assert cli.main(["bench", "--size", "full", "--out", str(tmp_path / "x.json")]) == 2
    assert "run it on a GPU" in capsys.readouterr().err
    assert cli.main(["bench", "--only", "warp_drive", "--out", str(tmp_path / "x.json")]) == 2
    assert "unknown benchmark(s) ['warp_drive']" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_the_gpu_check_script_runs_every_benchmark():
    import shlex

    from helpers.benchmarks import BENCHMARKS

    script = (Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh").read_text().replace("\\\n", " ")
    words = shlex.split(re.search(r"--only (.*?) --out", script).group(1))
    assert sorted(words) == sorted(BENCHMARKS) and len(words) == len(set(words))


def test_the_torch_preflight_runs_the_cpu_side_of_every_gpu_check_test_file():
    """benchmarks/torch_preflight.sh rehearses the GPU check under the GPU machine's torch: it must run the test
    files the GPU check runs, so one added there is not missed here."""
    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    files = {name: set(re.findall(r"tests/test_\w+\.py", (folder / name).read_text().replace("\\\n", " ")))
             for name in ("gpu_check.sh", "torch_preflight.sh")}
    assert files["gpu_check.sh"] and files["gpu_check.sh"] <= files["torch_preflight.sh"]
    assert "bench --size tiny" in (folder / "torch_preflight.sh").read_text()


def test_the_gpu_machines_wheels_are_the_pinned_versions():
    """The wheels benchmarks/README.md has a GPU machine install, and those device_wheels.sh adds to the shared
    set, are the versions pyproject.toml pins: the GPU check runs the library code CI tests."""

    root = Path(__file__).resolve().parents[1]
    pins = dict(re.findall(r'"([a-z0-9_.-]+)==([^"]+)"', (root / "pyproject.toml").read_text()))
    block = re.search(r"pip download (.*?)\n# on the GPU machine", (root / "benchmarks" / "README.md").read_text(),
                      re.S).group(1)
    named = dict(re.findall(r"([a-z0-9_.-]+)==([0-9][^\s']*)", block))
    assert {"trl", "diffusers", "datasets", "transformers", "peft"} <= set(named)
    assert {name: version for name, version in named.items() if name in pins} == \
        {name: pins[name] for name in named if name in pins}
    script = (root / "benchmarks" / "device_wheels.sh").read_text()
    assert "pin transformers" in script and "pin peft" in script


def test_committed_results_files_load():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    documents = cost.load_all(folder)
    # every benchmark either ran or is listed as failed, in every file
    assert documents and all({b["name"] for b in d["benchmarks"]} | {f["name"] for f in d.get("failed", [])} ==
                             set(NAMES) for d in documents)
    host = cost.load_host_memory(folder)  # the host-memory files notebook 14 reads, measured on a CPU
    assert set(host) == {"score_cache", "fid_sets"}
    assert all(d["device"]["device"] == "cpu" and d["naive"] and d["project"] for d in host.values())


# ------------------------------------------------------------------------------------------ cost model


def _host_documents(score_rows: int = 3_000_000, fid_rows: int = 200_000, dim: int = 2048) -> dict:
    device = {"device": "cpu", "name": "CPU (x86_64, 2 threads)"}
    return {"score_cache": {"kind": "host_memory", "name": "score_cache", "device": device, "created": "2026-12-03",
                            "shapes": {"images": score_rows // 3, "rows": score_rows, "file_mb": 531.0},
                            "naive": {"seconds": 15.0, "held_mb": 1200.0, "peak_mb": 2700.0},
                            "project": {"seconds": 14.0, "held_mb": 300.0, "peak_mb": 300.0}},
            "fid_sets": {"kind": "host_memory", "name": "fid_sets", "device": device, "created": "2026-12-03",
                         "shapes": {"images": fid_rows * 3 // 4, "dim": dim, "seeds": 4, "rows": fid_rows, "sets": 10},
                         "naive": {"seconds": 170.0, "peak_above_rows_mb": 4000.0},
                         "project": {"seconds": 85.0, "peak_above_rows_mb": 400.0}}}


def test_paper_scale_host_memory_is_the_measured_bytes_per_row_times_the_paper_counts():
    # every score row at paper scale, by hand: three scorers' scores of RRHF's 240,000 images, Table 2's 168,000,
    # the loss variants' 40,000, ChatGen's 349,536, AGFSync's 366,672 candidates, 57,888 held-out and 25,600 HPS v2
    # images; eight VQA answers for each candidate and held-out image; six TIFA answers for each of 32,648 images
    scores = 240_000 + 168_000 + 40_000 + 349_536 + 366_672 + 57_888 + 25_600
    assert cost.score_cache_rows() == 3 * scores + 8 * (366_672 + 57_888) + 6 * 32_648 == 7_335_456
    assert cost.fid_rows() == 14_564 * 7 * 4  # ChatGen's six sets and the reference, four seeds
    documents = _host_documents()
    measured = cost.host_memory_measured(documents)
    assert list(measured["measure"]) == ["s to read", "MB held after reading", "MB at the peak while reading",
                                         "s for every set's FID", "MB at the peak above the rows held"]
    assert measured["naive ÷ project"].tolist() == pytest.approx([15 / 14, 4.0, 9.0, 2.0, 10.0])
    paper = cost.host_memory_at_paper_scale(documents).set_index("what")
    score = paper.iloc[0]
    assert score["rows"] == 7_335_456 and score["project held GB"] == pytest.approx(100 * 7_335_456 / 1e9)
    assert score["naive peak GB"] == pytest.approx(900 * 7_335_456 / 1e9)  # 2,700 MB / 3M rows = 900 B a row
    fid = paper.iloc[1]
    held = 407_792 * 2048 * 4 / 1e9
    assert fid["project held GB"] == pytest.approx(held)
    # the naive peak above the rows grows with them (4,000 MB at 200,000 rows); the project's stays 400 MB
    assert fid["naive peak GB"] == pytest.approx(held + 4.0 * 407_792 / 200_000)
    assert fid["project peak GB"] == pytest.approx(held + 0.4)
    assert fid["naive ÷ project"] == pytest.approx(fid["naive peak GB"] / fid["project peak GB"])
    figure = cost.plot_host_memory(paper.reset_index())
    assert [label.get_text() for label in figure.axes[0].get_yticklabels()] == list(paper.index)
    assert cost.host_memory_at_paper_scale({}).empty and cost.host_memory_measured({}).empty

H100 = "NVIDIA H100 80GB HBM3"  # the name torch gives an H100 SXM


def _gpu_document(name: str = H100) -> dict:
    timing = lambda seconds: {"seconds_per_unit": seconds, "units": 1}  # noqa: E731
    plain = ["naive", "project"]
    return {"schema": 1, "size": "full", "device": {"device": "cuda", "name": name}, "benchmarks": [
        {"name": "api_generation", "unit": "s/API", "shapes": {}, "ratio": 500.0, "ratios": {}, "headline": plain,
         "paths": {"naive": timing(4.0), "batched_generate": timing(0.02), "project": timing(0.008)}},
        {"name": "image_generation", "unit": "s/image", "shapes": {}, "ratio": 20.0, "ratios": {}, "headline": plain,
         "paths": {"naive": timing(1.0), "project": timing(0.05)}},
        {"name": "vqa_scoring", "unit": "s/image", "shapes": {}, "ratio": 10.0, "ratios": {}, "headline": plain,
         "paths": {"naive": timing(0.5), "project": timing(0.05)}},
        {"name": "rrhf_step", "unit": "s/step", "ratio": 2.0, "ratios": {},
         "headline": ["naive_lora", "project_lora"],
         "shapes": {"candidates": 6, "prompt_tokens": 96, "response_tokens": 128},
         "paths": {"naive_lora": timing(2.688), "project_lora": timing(1.344), "naive_full": timing(4.0),
                   "project_full": timing(2.0)}}]}


def test_measured_gpu_costs_replace_the_design_figures():
    costs = cost.unit_costs(_gpu_document())
    assert costs["image"]["project"] == 0.05 and costs["image"]["source"] == f"t2ibook bench --size full on {H100}"
    # 1.344 s for 6 candidates × 224 tokens = 0.001 s per training token
    assert costs["train_token_lora"]["project"] == pytest.approx(1.344 / (6 * 224))
    assert costs["score"]["source"].startswith("FLOP estimate")  # not in this file: estimated
    assert (costs["vqa"]["naive"], costs["vqa"]["project"]) == (0.5, 0.05)  # per image with its questions
    plain = cost.unit_costs(None)
    assert plain["api"] == {"naive": 5.4, "project": 0.020, "source": cost.DESIGN_SOURCE, "label": "design notes (H100)"}


def test_unit_table_says_what_a_unit_is_and_where_its_seconds_come_from():
    units = cost.unit_table(_gpu_document()).set_index("unit")
    assert set(units.index) == {work.unit for work in cost.paper_work()} and units["one unit is"].str.len().min() > 10
    image = units.loc["image"]
    assert (image["naive s/unit"], image["project s/unit"], image["speed-up"]) == (1.0, 0.05, 20.0)
    assert image["source"] == f"measured on {H100}" and units.loc["score", "source"] == "FLOP estimate"
    assert cost.unit_table(None).set_index("unit").loc["image", "source"] == "design notes (H100)"
    # the plot hatches exactly the stages costed by a FLOP estimate, on both paths
    import matplotlib

    matplotlib.use("Agg")
    table = cost.cost_table(_gpu_document())
    figure = cost.plot_costs(table)
    bars = [bar for container in figure.axes[0].containers for bar in container]  # naive, then project
    guessed = table["cost source"].str.startswith("FLOP estimate").tolist()
    assert table["estimated"].tolist() == guessed
    assert len(bars) == 2 * len(table) and 0 < sum(guessed) < len(table)
    assert [bool(bar.get_hatch()) for bar in bars] == guessed + guessed


def test_stage_hours_are_count_times_seconds():
    table = cost.cost_table(_gpu_document())
    images = table[table["stage"] == "RRHF images"].iloc[0]
    # 4,000 prompts × 6 candidates × 10 images = 240,000 images at 0.05 s and 1.0 s
    assert images["count"] == 240_000
    assert images["project GPU-h"] == pytest.approx(240_000 * 0.05 / 3600)
    assert images["naive GPU-h"] == pytest.approx(240_000 * 1.0 / 3600)
    totals = cost.totals(table)
    diffagent = table[table["method"] == "DiffAgent"]
    assert totals.loc["DiffAgent", "project GPU-h"] == pytest.approx(diffagent["project GPU-h"].sum())
    assert list(totals.index) == ["DiffAgent", "ChatGen", "AGFSync"]
    assert cost.gpu_results([{"size": "tiny", "device": {"device": "cpu"}}, _gpu_document()])["device"]["name"] == H100


def test_cost_model_multipliers_are_the_paper_recipes():
    import yaml

    recipe = yaml.safe_load((Path(__file__).parents[1] / "configs" / "paper.yaml").read_text())["notebooks"]
    dpo = recipe["13_diffusion_dpo"]
    # the ablation's models: the recipe's list, else notebook 13's default
    notebook = Path(__file__).parents[1] / "notebooks" / "13_diffusion_dpo.ipynb"
    ablation = dpo.get("ablation") or ast.literal_eval(declared_parameters(notebook)["ablation"]["default"])
    assert cost.RECIPE_COUNTS == {
        "rrhf_images_per_candidate": recipe["07_rrhf"]["num_images"],
        "rrhf_texts_per_prompt": recipe["07_rrhf"]["num_samples"] + recipe["07_rrhf"]["num_beams"],
        "table2_seeds": recipe["08_evaluate_diffagent"]["num_seeds"],
        "table2_prompts_per_set": recipe["08_evaluate_diffagent"]["prompts_per_set"],
        "chatgen_seeds": recipe["11_chatgen_evo"]["num_seeds"],
        "agfsync_candidates": recipe["12_agfsync_preferences"]["num_candidates"],
        "dpo_steps": dpo["max_steps"], "dpo_batch": dpo["train_batch_size"] * dpo["gradient_accumulation_steps"],
        "agfsync_eval_seeds": dpo["eval_seeds"],
        "agfsync_eval_share": recipe["12_agfsync_preferences"]["eval_share"],
        "agfsync_ablation_models": len([item for item in ablation.split(";") if item.strip()]),
        "rrhf_loss_variants": len([pair for pair in recipe["07_rrhf"]["weight_variants"].split(",") if pair.strip()]),
        "diffagent_sft_epochs": recipe["06_sft"]["num_epochs"],
        "rrhf_epochs": recipe["07_rrhf"]["num_epochs"],
        "chatgen_sft_epochs": recipe["11_chatgen_evo"]["sft_epochs"],
        "chatgen_token_steps": recipe["11_chatgen_evo"]["selection_steps"],
        "chatgen_token_batch": recipe["11_chatgen_evo"]["selection_batch_size"]}
    # the epochs count only where no step limit cuts them short
    assert recipe["06_sft"]["max_steps"] == recipe["07_rrhf"]["max_steps"] == recipe["11_chatgen_evo"]["sft_steps"] == -1
    # the disk table counts one block for these stages: the paper recipe must remove their images once scored
    assert cost.SCORED_THEN_REMOVED and all(recipe[notebook]["keep_images"] is False
                                            for notebook in cost.SCORED_THEN_REMOVED.values())


def test_what_ifs_change_only_what_they_name():
    plain = cost.cost_table(None).set_index("stage")
    faster = cost.cost_table(None, project_seconds={"image": 0.055}).set_index("stage")
    assert faster.loc["RRHF images", "project GPU-h"] == pytest.approx(240_000 * 0.055 / 3600)
    assert faster.loc["RRHF images", "naive GPU-h"] == plain.loc["RRHF images", "naive GPU-h"]
    assert faster.loc["SFT (3 epochs, LoRA)", "project GPU-h"] == plain.loc["SFT (3 epochs, LoRA)", "project GPU-h"]
    # notebook 13 trains AGFSync's model and 4 ablation models with one recipe: 4 × 1,000 steps × 128 pairs more
    ablation = plain.loc["Diffusion-DPO score-weight ablation (4 models × 1,000 steps × 128 pairs)"]
    assert ablation["count"] == 512_000
    assert ablation["project GPU-h"] == pytest.approx(4 * plain.loc["Diffusion-DPO (1,000 steps × 128 pairs)",
                                                                     "project GPU-h"])
    # each training image through the VAE once for all epochs and all 5 models: ≤ 2 × 45,834 per model; the plain
    # path encodes both images of every pair it uses: 5 models × 1,000 steps × 128 pairs × 2
    vae = plain.loc["Diffusion-DPO: training images through the VAE"]
    assert (vae["count"], vae["naive count"]) == (5 * 45_834 * 2, 1_280_000)
    seconds = cost.unit_costs(None)["vae_encode"]
    assert vae["naive GPU-h"] == pytest.approx(1_280_000 * seconds["naive"] / 3600)
    assert vae["project GPU-h"] == pytest.approx(458_340 * seconds["project"] / 3600)
    # 1.08 TFLOP at 40% of 790 TFLOP/s
    assert seconds["project"] == pytest.approx(1.08e12 / (0.4 * 790e12))
    assert (plain.drop(index=vae.name)["count"] == plain.drop(index=vae.name)["naive count"]).all()
    one_seed = cost.cost_table(None, table2_seeds=1).set_index("stage")
    # 5,000 DABench test + 1,000 COCO + 1,000 PartiPrompts prompts × 6 systems, one image each (4 in the recipe)
    assert one_seed.loc["Table 2 images", "count"] == 42_000 and plain.loc["Table 2 images", "count"] == 168_000
    scenarios = cost.budget_scenarios(None, target_hours=6.0).set_index("scenario")
    both = cost.cost_table(None, project_seconds=cost.PROJECT_H100_TARGETS, table2_seeds=1)
    # the budget covers the paper's reproduction: the book's extras (RRHF loss-weight variants) are left out of it
    reproduction = lambda t: t.query("method == 'DiffAgent' and part == 'reproduction'")["project GPU-h"].sum()  # noqa: E731
    assert scenarios.loc["both", "DiffAgent project GPU-h"] == pytest.approx(reproduction(both))
    assert scenarios.loc["as recorded", "DiffAgent project GPU-h"] == pytest.approx(reproduction(plain.reset_index()))
    extras = plain.reset_index().query("method == 'DiffAgent' and part == 'book extra'")
    assert list(extras["stage"].str.startswith("RRHF loss-weight variants")) == [True] * 4
    # 2 variants × 5,000 DABench test prompts × 4 seeds, scored; each variant trained like RRHF itself
    assert extras.set_index("stage").loc["RRHF loss-weight variants: images", "count"] == 40_000
    assert extras["project GPU-h"].sum() > 0
    summed = cost.totals(plain.reset_index())
    assert summed.loc["DiffAgent", "of which book extras (project GPU-h)"] == pytest.approx(extras["project GPU-h"].sum())
    # ChatGen's and AGFSync's ablations are their papers' own (ChatGen Table 6, AGFSync Table 2)
    assert summed.loc["ChatGen", "of which book extras (project GPU-h)"] == 0.0
    assert summed.loc["AGFSync", "of which book extras (project GPU-h)"] == 0.0
    assert summed.loc["DiffAgent", "project GPU-h"] == pytest.approx(
        reproduction(plain.reset_index()) + extras["project GPU-h"].sum())
    assert list(scenarios["within budget"]) == [h <= 6.0 for h in scenarios["DiffAgent project GPU-h"]]


def test_measured_table_lists_naive_project_and_ratio(tiny_results):
    table = cost.measured_table([tiny_results])
    assert list(table["benchmark"]) == NAMES
    row = table.set_index("benchmark").loc["api_generation"]
    assert row["naive ÷ project"] == tiny_results["benchmarks"][0]["ratio"]
    assert "batched_generate/project" in row["other"]
    assert table["naive peak GiB"].isna().all() and table["project peak GiB"].isna().all()  # a CPU holds no GPU peak
    json.dumps(table.to_dict())  # plain values, ready for the chapter's CSV
    # on a GPU each path's peak memory: RRHF's LoRA step in the columns, its full fine-tune's in `other`
    document = _gpu_document()
    rrhf = next(b for b in document["benchmarks"] if b["name"] == "rrhf_step")
    for path, peak in {"naive_lora": 31.5, "project_lora": 24.25, "naive_full": 79.0, "project_full": 61.0}.items():
        rrhf["paths"][path]["peak_memory_gib"] = peak
    row = cost.measured_table([document]).set_index("benchmark").loc["rrhf_step"]
    assert (row["naive peak GiB"], row["project peak GiB"]) == (31.5, 24.25)
    assert row["other"] == "naive_full peak 79 GiB; project_full peak 61 GiB"


def test_a_failing_benchmark_is_recorded_and_the_rest_still_run_and_save(tmp_path, monkeypatch, capsys):
    from helpers.benchmarks import suite
    from helpers.benchmarks.harness import PathTiming, row

    out = tmp_path / "partial.json"

    def out_of_memory(size, device):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB\n(more lines)")

    def after_it(size, device):
        # the first benchmark's failure is on disk before this one starts: a run cut short keeps it
        assert load_results(out)["failed"] == [{"name": "api_generation",
                                               "error": "RuntimeError: CUDA out of memory. Tried to allocate 20.00 GiB"}]
        return row("scoring", "s/image", {"images": 2}, [PathTiming("naive", 2.0, 2, 4.0),
                                                         PathTiming("project", 0.5, 2, 1.0)])

    monkeypatch.setitem(suite.BENCHMARKS, "api_generation", out_of_memory)
    monkeypatch.setitem(suite.BENCHMARKS, "scoring", after_it)
    assert cli.main(["bench", "--size", "tiny", "--only", "api_generation", "scoring", "--out", str(out)]) == 1
    saved = load_results(out)
    assert [b["name"] for b in saved["benchmarks"]] == ["scoring"] and saved["benchmarks"][0]["ratio"] == 4.0
    assert [f["name"] for f in saved["failed"]] == ["api_generation"]
    printed = capsys.readouterr().out
    assert "api_generation     FAILED   RuntimeError: CUDA out of memory" in printed
    assert "Traceback" in printed  # the whole error reaches the log, the file keeps its first line
    table = cost.measured_table([saved]).set_index("benchmark")
    assert table.loc["api_generation", "other"].startswith("failed: RuntimeError") and \
        math.isnan(table.loc["api_generation", "project"])
    with pytest.raises(RuntimeError, match="out of memory"):  # --fail-fast stops at the first failure
        cli.main(["bench", "--size", "tiny", "--only", "api_generation", "--fail-fast", "--out", str(out)])
    folder = tmp_path / "results"
    folder.mkdir()
    monkeypatch.setitem(suite.BENCHMARKS, "scoring", lambda size, device: row(
        "scoring", "s/image", {"images": 1}, [PathTiming("naive", 1.0, 1, 1.0), PathTiming("project", 0.5, 1, 0.5)]))
    # --out may name a folder: the file takes the device's default name in it
    assert cli.main(["bench", "--size", "tiny", "--only", "scoring", "--out", str(folder)]) == 0
    assert [b["name"] for b in load_results(folder / "cpu-tiny.json")["benchmarks"]] == ["scoring"]
    # a path that does not exist yet is a folder to make unless it names a .json file
    assert cli.main(["bench", "--size", "tiny", "--only", "scoring", "--out", str(tmp_path / "new" / "dir")]) == 0
    assert (tmp_path / "new" / "dir" / "cpu-tiny.json").is_file()


def test_targets_table_checks_each_bound_against_the_gpu_file():
    targets = cost.targets_table(_gpu_document(), target_hours=6.0).set_index("target")
    api = targets.loc["API generation, s/API"]
    assert api["measured"] == 0.008 and api["met"] and api["bound"] == "≤ 0.008" and api["measured on"] == H100
    # 4.0 s one at a time ÷ 0.008 s = 500×, short of 600×; batched generate 0.02 ÷ 0.008 = 2.5×, just met
    assert targets.loc["API generation, naive ÷ project", "measured"] == pytest.approx(500.0)
    assert not targets.loc["API generation, naive ÷ project", "met"]
    assert targets.loc["API generation, batched generate ÷ project", "met"]
    assert targets.loc["image generation, s/image (512 px, 20 steps, CFG)", "measured"] == 0.05
    table = cost.cost_table(_gpu_document())
    hours = targets.loc["DiffAgent SD 1.5 reproduction, H100-hours"]
    reproduction = (table["method"] == "DiffAgent") & (table["part"] == "reproduction")  # not the book's extras
    assert hours["measured"] == pytest.approx(table.loc[reproduction, "project GPU-h"].sum())
    assert hours["met"] == (hours["measured"] <= 6.0)
    nothing = cost.targets_table(None)
    assert nothing["measured"].isna().all() and nothing["met"].isna().all()
    assert set(nothing["measured on"]) == {"not measured on a GPU"}


def test_a_full_size_gpu_run_prints_each_target_and_the_budget_with_its_timings(tmp_path, capsys, monkeypatch):
    """What a researcher on a cloud GPU (and the GPU check's log) sees at the end of `t2ibook bench`: notebook 14's
    targets and budget line, without building the book."""
    import helpers.device
    from helpers.benchmarks import suite

    document = {**_gpu_document(), "failed": []}
    document["benchmarks"][0]["paths"]["project"]["seconds_per_unit"] = 0.010  # 0.010 s/API: over 0.008

    def measured(size, device, names, progress, *, keep_going, on_update):
        assert (size, device) == ("full", "cuda")
        on_update(document)
        return document
    monkeypatch.setattr(helpers.device, "pick_device", lambda: "cuda")
    monkeypatch.setattr(suite, "run", measured)
    assert cli.main(["bench", "--out", str(tmp_path / "h100.json")]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert load_results(tmp_path / "h100.json") == document
    rows = {line[:50].strip(): line[50:].split() for line in printed if line[:50].strip() in set(
        cost.targets_table(None)["target"])}
    assert rows["API generation, s/API"] == ["≤", "0.008", "0.01", "0.01", "NOT", "met"]
    assert rows["API generation, naive ÷ project"] == ["≥", "600", "400", "400", "NOT", "met"]  # 4.0 ÷ 0.010
    assert rows["API generation, batched generate ÷ project"] == ["≥", "2.5", "2", "2", "NOT", "met"]
    assert rows["image generation, s/image (512 px, 20 steps, CFG)"] == ["≤", "0.055", "0.05", "0.05", "met"]
    hours = cost.reproduction_hours(cost.cost_table(document), "DiffAgent")
    assert rows["DiffAgent SD 1.5 reproduction, H100-hours"][2] == f"{hours:.4g}"
    assert f"Seconds and hours below are on the {H100}." in printed
    assert any(line.startswith(f"DiffAgent's reproduction on the project's path: {hours:.1f} H100-hours on the "
                               f"{H100} against a budget of 6") for line in printed)
    # a run that measured API calls but no images has no total to hold against the budget, and says why
    document["benchmarks"] = document["benchmarks"][:1]
    lines = cost.verdict_lines(document)
    assert lines[-1].endswith("needs api_generation and image_generation measured")
    assert [line.endswith("not measured") for line in lines[2:-1]] == [False, False, False, True, True]


def test_datasheet_speeds_next_to_an_h100():
    speeds = {name: cost.speed_next_to_h100(name) for name in (
        H100, "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe",
        "NVIDIA L40S", "NVIDIA L40", "NVIDIA L4", "Tesla V100-SXM2-32GB")}
    # dense bf16 TFLOP/s: H100 SXM 989, PCIe 756, NVL 835, H200 989, A100 312, L40S 362, L40 181, L4 121
    assert speeds == pytest.approx({H100: 1.0, "NVIDIA H100 PCIe": 756 / 989, "NVIDIA H100 NVL": 835 / 989,
                                    "NVIDIA H200": 1.0, "NVIDIA A100-SXM4-80GB": 312 / 989,
                                    "NVIDIA A100 80GB PCIe": 312 / 989, "NVIDIA L40S": 362 / 989,
                                    "NVIDIA L40": 181 / 989, "NVIDIA L4": 121 / 989, "Tesla V100-SXM2-32GB": None})


def test_an_a100_file_puts_every_hour_on_the_a100_and_the_budget_in_h100_hours():
    """A cloud A100's results file: what it does not measure is scaled from H100 figures to the A100 (989/312 =
    3.17× the seconds), so no table adds H100 hours to A100 hours; targets and budget compare as on an H100."""
    a100 = "NVIDIA A100-SXM4-80GB"
    speed = 312 / 989
    document = _gpu_document(a100)
    document["benchmarks"] = [b for b in document["benchmarks"] if b["name"] != "image_generation"]
    h100_costs, costs = cost.unit_costs(None), cost.unit_costs(document)
    assert costs["api"]["project"] == 0.008 and costs["api"]["label"] == f"measured on {a100}"  # its own, as is
    for unit in ("image", "score", "dpo_pair"):  # a design-note figure and two FLOP estimates, 3.17× the H100's
        for path in ("naive", "project"):
            assert costs[unit][path] == pytest.approx(h100_costs[unit][path] / speed)
    assert costs["image"]["label"] == f"design notes (H100), scaled to {a100}" and "×3.17" in costs["image"]["source"]
    assert costs["score"]["label"] == f"FLOP estimate, scaled to {a100}" and costs["score"]["estimated"]
    table = cost.cost_table(document)
    assert table["estimated"].tolist() == table["cost source"].str.startswith("FLOP estimate").tolist()
    hours = cost.reproduction_hours(table, "DiffAgent")
    assert cost.as_h100_hours(hours, document) == pytest.approx(hours * speed)
    # targets: the A100's 0.008 s/API is 0.0025 s as on an H100; ratios stand as measured
    targets = cost.targets_table(document, target_hours=6.0).set_index("target")
    api = targets.loc["API generation, s/API"]
    assert api["measured"] == 0.008 and api["as on an H100"] == pytest.approx(0.008 * speed) and api["met"]
    assert api["measured on"] == f"{a100} (×0.32 as on an H100, by datasheet bf16 peaks)"
    ratio = targets.loc["API generation, naive ÷ project"]
    assert ratio["as on an H100"] == ratio["measured"] == pytest.approx(500.0) and not ratio["met"]
    assert targets.loc["image generation, s/image (512 px, 20 steps, CFG)", "measured on"] == "not measured on a GPU"
    scenarios = cost.budget_scenarios(document, target_hours=6.0).set_index("scenario")
    at_targets = scenarios.loc["API calls and images at the H100 targets"]
    assert at_targets["image s/unit"] == pytest.approx(0.055 / speed)  # the H100 target, as A100 seconds
    assert scenarios.loc["as recorded", "DiffAgent project GPU-h"] == pytest.approx(hours)
    assert list(scenarios["as H100-hours"]) == pytest.approx(list(scenarios["DiffAgent project GPU-h"] * speed))
    assert list(scenarios["within budget"]) == [h <= 6.0 for h in scenarios["as H100-hours"]]
    assert cost.gpu_line(document).endswith("computes at 0.32× an H100 by datasheet bf16 peaks: the figures it did "
                                            "not measure are scaled to it.")
    assert cost.gpu_line(None) == "Seconds and hours below are on the H100."
    line = cost.budget_line(table, document, 6.0)
    assert f"{hours * speed:.1f} H100-hours on the {a100} ({hours:.1f} GPU-hours there" in line
    # an H100's file is the one costed when there are both; an A100's alone is used
    assert cost.gpu_results([document, _gpu_document()])["device"]["name"] == H100
    assert cost.gpu_results([document])["device"]["name"] == a100


def test_a_gpu_without_a_datasheet_figure_is_costed_unscaled_and_says_so():
    document = _gpu_document("Some Future GPU")
    costs, h100_costs = cost.unit_costs(document), cost.unit_costs(None)
    assert costs["score"]["project"] == h100_costs["score"]["project"]
    assert "Some Future GPU has no datasheet figure" in costs["score"]["source"]
    targets = cost.targets_table(document).set_index("target")
    api = targets.loc["API generation, s/API"]
    assert api["met"] is None and api["measured on"] == "Some Future GPU (no datasheet figure: not compared)"
    ratio = targets.loc["API generation, naive ÷ project"]
    assert ratio["met"] is not None and not ratio["met"]  # 500× < 600×: a ratio needs no conversion to compare
    assert cost.budget_scenarios(document)["within budget"].isna().all()
    assert "not compared" in cost.budget_line(cost.cost_table(document), document, 6.0)
    assert "so its totals mix two GPUs" in cost.gpu_line(document)


def test_agfsync_evaluation_counts_tifa_answering_and_hps_scoring():
    table = cost.cost_table(None).set_index("stage")
    tifa = table.loc["Evaluation: TIFA answers (free-form, 5 beams)"]
    # 4,081 TIFA texts × 4 seeds × base and aligned; HPS v2: 3,200 prompts × 4 × 2
    assert (tifa["unit"], tifa["count"]) == ("tifa", 32_648)
    assert table.loc["Evaluation: HPS v2 scores", "count"] == 25_600
    # by hand: 25,000 / 4,081 questions × (2 × 1.2e9 × 72 + 5 × 30 × 2 × 1.6e9) + 2 × 1.0e9 × 257 ≈ 4.51 TFLOP
    flop = 25_000 / 4_081 * (1.728e11 + 4.8e11) + 5.14e11
    assert tifa["project GPU-h"] == pytest.approx(32_648 * flop / (790e12 * 0.40) / 3600)
    assert "FLOP estimate" in tifa["cost source"]


# ------------------------------------------------------------------------------------------ disk

def test_photo_crops_are_distinct_squares_of_the_asked_side():
    import numpy as np

    from helpers.benchmarks.photos import photo_crops

    crops = photo_crops(512, 9)
    assert {crop.size for crop in crops} == {(512, 512)} and {crop.mode for crop in crops} == {"RGB"}
    assert len({np.asarray(crop).tobytes() for crop in crops}) == 9
    assert np.array_equal(np.asarray(crops[1]), np.asarray(crops[0])[:, ::-1])  # the odd ones are mirrored
    assert [np.asarray(c).tobytes() for c in photo_crops(512, 9)] == [np.asarray(c).tobytes() for c in crops]
    assert photo_crops(64, 3)[2].size == (64, 64)


def test_without_matplotlib_the_stand_in_is_blurred_noise_and_says_so(monkeypatch):
    import sys

    from helpers.benchmarks.photos import SOURCE, picture_like

    images, source = picture_like(32, 2)
    assert source == SOURCE and len(images) == 2
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as on a GPU machine without it: the import fails
    images, source = picture_like(32, 2)
    assert source.startswith("blurred random noise") and [image.size for image in images] == [(32, 32)] * 2


def test_png_bytes_are_measured_at_each_paths_level():
    import io

    from helpers.benchmarks.photos import photo_crops
    from helpers.t2i import ImageCache

    assert cost.PNG_LEVELS == {"project": ImageCache.COMPRESS_LEVEL, "naive": 6}  # the cache's level, PIL's default

    def by_hand(level):
        sizes = []
        for crop in photo_crops(128, 4):
            buffer = io.BytesIO()
            crop.save(buffer, "PNG", compress_level=level)
            sizes.append(len(buffer.getvalue()))
        return sum(sizes) / 4

    assert cost.png_bytes_per_image(128, 4) == {"project": by_hand(1), "naive": by_hand(6)}
    # a photograph compresses like a picture: between a quarter and three quarters of its raw 512-px pixels
    # (random noise, what a random-weight pipeline draws, does not compress at all)
    raw = 512 * 512 * 3
    assert 0.25 * raw < cost.png_bytes_per_image(512, 2)["project"] < 0.75 * raw


def test_disk_is_images_times_bytes_plus_the_dataset_copy_and_the_resume_point():
    import matplotlib

    matplotlib.use("Agg")
    table = cost.disk_table({"project": 500_000, "naive": 400_000})
    drawn = {(w.method, w.stage): w.count for w in cost.paper_work() if w.unit == "image"}
    images = {(m, s): n for m, s, n in zip(table["method"], table["stage"], table["images"])}
    assert len(images) == len(table) and set(drawn) < set(images) and all(images[k] == n for k, n in drawn.items())
    table = table.set_index("stage")
    # 4,000 prompts × 6 candidates × 10 images, each removed once scored: one block of 4,096 at 0.5 MB = 2.048 GB
    # (0.4 MB: 1.6384 GB) on disk at a time, where keeping them all would take 120 GB
    rrhf = table.loc["RRHF images"]
    assert rrhf["images"] == 240_000 and rrhf["GB"] == pytest.approx(2.048)
    assert rrhf["GB at PIL's default"] == pytest.approx(1.6384) and "120 GB if kept" in rrhf["what"]
    # 14,564 chats × (6 image sets + the reference) × 4 seeds, scored and embedded, then removed: one block again
    chatgen = table.loc["Evaluation images"]
    assert chatgen["method"] == "ChatGen" and chatgen["images"] == 407_792 and chatgen["GB"] == pytest.approx(2.048) and "11_chatgen_evo" in chatgen["what"]
    assert table.loc["Table 2 images", "GB"] == pytest.approx(table.loc["Table 2 images", "images"] * 5e5 / 1e9)
    # AGFSync's 45,834 prompts plus 5% held out: 2,412 held-out prompts × 6 models × 4 seeds, kept
    assert table.loc["Held-out evaluation images", "images"] == 57_888
    # a winner and a loser for each of the 45,834 AGFSync prompts
    pairs = table.loc["Preference dataset (winner + loser per prompt)"]
    assert pairs["images"] == 91_668 and pairs["GB"] == pytest.approx(91_668 * 5e5 / 1e9)
    # while notebook 13 trains: each training image's posterior mean and std, 2 × 4×64×64 float32 = 131,072 bytes
    posteriors = table.loc["Diffusion-DPO: VAE posteriors (while notebook 13 trains)"]
    assert posteriors["images"] == 458_340 and posteriors["GB"] == pytest.approx(458_340 * 131_072 / 1e9)
    # 859.5M UNet parameters × 4 bytes × (weights + AdamW's two moments) = 10.314 GB, whatever the PNGs weigh
    resume = table.loc["Diffusion-DPO resume point (newest only)"]
    assert resume["GB"] == resume["GB at PIL's default"] == pytest.approx(10.314)
    figure = cost.plot_disk(table.reset_index())
    assert len(figure.axes[0].patches) == len(table)
    assert f"{table['GB'].sum():,.0f} GB" in figure.axes[0].get_title()


def test_catalog_weights_sum_each_callable_version_and_each_loras_base_once(tmp_path):
    def version(version_id, size_kb=None, primary=True):
        files = [] if size_kb is None else [{"type": "Training Data", "sizeKB": 1.0, "primary": False},
                                            {"type": "Model", "sizeKB": size_kb, "primary": primary}]
        return {"id": version_id, "files": files}

    crawl = tmp_path / "01_crawl_civitai"
    crawl.mkdir()
    (crawl / "manifest.json").write_text(json.dumps({"params": {"source": "local"}}))
    models = [{"modelVersions": [version(1, 2_000_000), version(2, 6_000_000, primary=False)]},
              {"modelVersions": [version(3, 100_000), version(4)]}, {"modelVersions": [version(5, 9e9)]}]
    (crawl / "models.jsonl").write_text("".join(json.dumps(m) + "\n" for m in models))

    def pair(version_id, kind, architecture, base=None):
        return {"model_version_id": version_id, "api": {"type": kind}, "architecture": architecture,
                "lora_base": {"model_version_id": base} if base else None}

    # version 1 twice; LoRA 3 first shown on base 2, later on 5, and like t2i.ModelCatalog the first record counts,
    # so 5 is never downloaded; LoRA 4 lists no file
    dabench = tmp_path / "dabench.jsonl"
    records = [pair(1, "Checkpoint", "SD 1.5"), pair(1, "Checkpoint", "SD 1.5"), pair(3, "LORA", "SDXL 1.0", base=2),
               pair(4, "LORA", "SDXL 1.0"), pair(3, "LORA", "SDXL 1.0", base=5)]
    dabench.write_text("".join(json.dumps(r) + "\n" for r in records))
    table = cost.catalog_weights(crawl / "models.jsonl", dabench, download_mb_per_s=100.0)
    rows = {(r["type"], r["base model"]): r for r in table.to_dict("records")}
    assert set(rows) == {("Checkpoint", "SD 1.5"), ("Checkpoint", "SDXL 1.0"), ("LORA", "SDXL 1.0")}
    # sizeKB is KiB: 2,000,000 KiB = 2.048 GB; the primary file counts, else the first model file (version 2)
    assert rows[("Checkpoint", "SD 1.5")]["versions"] == 1 and rows[("Checkpoint", "SD 1.5")]["GB"] == pytest.approx(2.048)
    assert rows[("Checkpoint", "SDXL 1.0")]["GB"] == pytest.approx(6.144)
    lora = rows[("LORA", "SDXL 1.0")]
    assert (lora["versions"], lora["size unknown"]) == (2, 1) and lora["GB"] == pytest.approx(0.1024)
    # 2.048 GB at 100 MB/s = 20.48 s
    assert rows[("Checkpoint", "SD 1.5")]["hours to download"] == pytest.approx(20.48 / 3600)
    assert cost.crawl_source(crawl / "models.jsonl") == "local"
    assert cost.CATALOG_FILES == ("01_crawl_civitai/models.jsonl", "04_build_dabench/dabench.jsonl")


def test_a_path_whose_batch_runs_out_of_memory_in_the_warm_up_records_the_batch_it_was_timed_at(monkeypatch):
    """On a smaller GPU the project's batches halve in the warm-up (`speed.fitting_batches`); the results file then
    says which batch the seconds are for, and which the plan asked for. Out of memory is simulated: any batch of
    more than 8 rows (prompts, or images through a vision tower's patch embedding) fails to allocate."""
    import torch

    from helpers.benchmarks import shapes, suite

    def too_many(module, args, kwargs):
        rows = (args[0] if args else kwargs.get("input_ids", kwargs.get("inputs_embeds")))
        if rows is not None and rows.shape[0] > 8:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def limited(build):
        def built(*args, **kwargs):
            made = build(*args, **kwargs)
            for model in made.values() if isinstance(made, dict) else [made]:
                model = getattr(model, "model", model)
                hooked = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)] or [model]
                for module in hooked:
                    module.register_forward_pre_hook(too_many, with_kwargs=True)
            return made
        return built
    monkeypatch.setattr(shapes, "causal_lm", limited(shapes.causal_lm))
    monkeypatch.setattr(shapes, "unified_reward_scorers", limited(shapes.unified_reward_scorers))
    api = suite.bench_api_generation("tiny", "cpu")["paths"]  # plan: batches of 16
    assert api["naive"]["settings"].get("batch") is None  # one prompt at a time: never too many
    for name in ("batched_generate", "project"):
        assert (api[name]["settings"]["batch"], api[name]["settings"]["batch_asked"]) == (8, 16), name
    scoring = suite.bench_scoring("tiny", "cpu")
    naive, project = scoring["paths"]["naive"]["settings"], scoring["paths"]["project"]["settings"]
    assert naive["batch"] == 1 and "batch_asked" not in naive and (project["batch"], project["batch_asked"]) == (8, 16)
    # the summary and notebook 14's table say so
    document = {"device": {"device": "cpu", "name": "CPU"}, "size": "tiny", "benchmarks": [scoring]}
    assert summary_lines(document)[-1].endswith("project at batch 8 (asked 16: out of memory)")
    assert cost.measured_table([document])["other"].tolist() == ["project at batch 8 (asked 16: out of memory)"]


def test_the_flop_estimates_rest_on_what_torch_counts_for_the_paper_shapes():
    """SD 1.5's UNet at 512 px and Llama-7B, built on the meta device (no memory, no compute): the constants the
    FLOP estimates use are torch's own counts, and a Diffusion-DPO pair is hand-worked from them: winner and loser
    each trained (3 forwards) with the checkpointing recompute (1), and the frozen reference's 2 forwards."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaConfig, LlamaForCausalLM

    from helpers.benchmarks.shapes import LLAMA_7B, SD15_UNET

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
        llama = LlamaForCausalLM(LlamaConfig(**LLAMA_7B, tie_word_embeddings=False))
        latents, text = torch.zeros(1, 4, 64, 64), torch.zeros(1, 77, 768)
    with FlopCounterMode(display=False) as forward:
        unet(latents, torch.tensor([500], device="meta"), text)
    with FlopCounterMode(display=False) as trained:
        unet(latents, torch.tensor([500], device="meta"), text).sample.sum().backward()
    assert forward.get_total_flops() == pytest.approx(cost.SD15_UNET_FORWARD_FLOP, rel=0.01)
    assert trained.get_total_flops() == pytest.approx(cost.SD15_UNET_TRAIN_FLOP, rel=0.01)
    assert sum(p.numel() for p in unet.parameters()) == pytest.approx(cost.SD15_UNET_PARAMS, rel=1e-4)
    assert sum(p.numel() for p in llama.parameters()) == pytest.approx(cost.LLAMA7B_PARAMS, rel=0.01)
    flop = lambda unit: cost._flop_seconds(unit)["project"] * cost.H100_BF16_PEAK * cost.UTILISATION["project"]  # noqa
    assert flop("dpo_pair") == pytest.approx(2 * (3 + 1) * 0.80e12 + 2 * 0.80e12)  # 8.0 TFLOP
    assert flop("train_token_lora") == pytest.approx(6 * 6.7e9) and flop("train_token_full") == pytest.approx(8 * 6.7e9)


def test_the_score_cache_benchmark_reads_the_same_rows_both_ways_and_the_project_holds_less(tmp_path):
    """benchmarks/score_cache_memory.py at a small size: both reads find every row, each in its own process."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "score_cache_memory.py"
    spec = importlib.util.spec_from_file_location("score_cache_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--images", "2000", "--json", "--out", str(tmp_path / "host_memory" / "scores.json")])
    assert result["rows"] == result["naive"]["rows"] == result["project"]["rows"] == 6000
    saved = cost.load_host_memory(tmp_path)["score_cache"]  # as notebook 14 reads it
    assert saved["shapes"]["rows"] == 6000 and saved["project"] == result["project"] and saved["device"]["name"]
    assert result["project"]["held_mb"] < result["naive"]["held_mb"]  # memory, not time: no timing assertion
    assert result["project"]["peak_mb"] < result["naive"]["peak_mb"]


def test_the_fid_benchmark_finds_the_same_fids_both_ways(tmp_path, monkeypatch):
    """benchmarks/fid_memory.py at a small size: each way in its own process, the same ten FIDs (Tables 4, 6 and
    7's sets), and the project's way reads each set a chunk at a time and each row about once (checked in this
    process)."""
    import collections
    import importlib.util

    from helpers.chatgen.experiment import set_metrics
    from helpers.scorers import fid

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "fid_memory.py"
    spec = importlib.util.spec_from_file_location("fid_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "host_memory" / "fid.json"
    result = module.main(["--images", "1200", "--dim", "16", "--json", "--out", str(out)])  # checks the FIDs agree
    saved = cost.load_host_memory(tmp_path)["fid_sets"]
    # 100 samples × 4 seeds × 3 sets, less the 5 failed calls of each set (1 in 20), and one reference set
    assert saved["shapes"] == {"images": 1200, "dim": 16, "seeds": 4, "rows": 1140 + 400, "sets": 10}
    assert len(result["naive"]["fids"]) == len(result["project"]["fids"]) == 10
    assert result["project"]["peak_above_rows_mb"] >= 0 and set(result["ratio"]) == {"seconds", "peak_above_rows_mb"}

    blocks, read = [], collections.Counter()
    add = fid.FeatureMoments.add
    monkeypatch.setattr(fid.FeatureMoments, "add", lambda self, block: (blocks.append(len(block)), add(self, block))[1])
    features, scored, reference_keys = module.rows_and_table(30_000, 4, seeds=4)
    moments = features.moments
    features.moments = lambda keys, *args: (read.update(keys), moments(keys, *args))[1]
    table = set_metrics(scored, features, reference_keys)
    assert len(table) == 10 and max(blocks) == 4096  # never more than one chunk of rows at a time
    generated = set(scored["key"])
    assert len(generated) == len(scored) == 28_500 and all(read[key] == 1 for key in generated)  # not 57,000
    references = {key: read[key] for keys in reference_keys.values() for key in keys}
    # 2,500 samples × 4 references, each read once into its cell's sum and again for each table row whose set lacks
    # it: each set lacks 125 samples, in 3 table rows (ChatGen-Evo's fully predicted: Tables 4, 6, 7), 1 (its
    # "model only": Table 6) or 2 (the baseline's: Tables 4, 7). Each table row reading its own set: 57,000 rows.
    assert len(references) == 10_000 and sum(references.values()) == 10_000 + 125 * (3 + 1 + 2) * 4
    assert table["fid"].tolist() == pytest.approx(module.naive_fids(features, scored, reference_keys), rel=1e-9)
