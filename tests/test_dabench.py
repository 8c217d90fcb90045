"""DABench filters and assembly on hand-made records, then on a crawl of the local server."""
from collections import Counter

import pytest

from helpers import civitai, dabench
from helpers.api_call import schema_errors
from helpers.civitai_catalog import Catalog, CatalogSpec
from helpers.civitai_server import LocalCivitai


def _version(vid, base, files=True):
    hashes = {"AutoV2": f"{vid:010X}"}
    return {"id": vid, "baseModel": base, "files": [{"hashes": hashes, "downloadUrl": f"https://x/{vid}"}] if files else []}


def _model(mid, kind, versions, nsfw=False, downloads=1000):
    return {"id": mid, "name": f"{kind}{mid}", "type": kind, "nsfw": nsfw, "modelVersions": versions,
            "stats": {"downloadCount": downloads, "thumbsUpCount": 9, "thumbsDownCount": 1}, "tags": ["t"],
            "description": "<p>hi</p>"}


def _image(iid, versions, width=1024, height=1536, nsfw="None", **meta):
    base = {"Size": "512x768", "sampler": "Euler a", "steps": "25", "cfgScale": 7, "seed": 5,
            "prompt": "a castle, <lora:Thing:0.7>, sunset", "negativePrompt": "blurry", "Model hash": "0000000064"}
    return {"id": iid, "modelVersionIds": versions, "width": width, "height": height, "nsfwLevel": nsfw,
            "meta": {**base, **meta} if meta.get("meta", True) is not None else None}


@pytest.fixture
def raw():
    models = [_model(1, "Checkpoint", [_version(100, "SD 1.5")]),        # hash 0000000064 (=100)
              _model(2, "LORA", [_version(200, "SD 1.5")]),
              _model(3, "LORA", [_version(300, "SDXL 1.0")]),
              _model(4, "TextualInversion", [_version(400, "SD 1.5")]),
              _model(5, "Checkpoint", [_version(500, "SD 1.5", files=False)]),
              _model(6, "Checkpoint", [_version(600, "SD 1.5")], downloads=3),
              _model(7, "Checkpoint", [_version(700, "SD 1.5")], nsfw=True)]
    images = [
        _image(1, [100], prompt="a castle, sunset"),                       # kept (checkpoint)
        _image(2, [200, 100]),                                             # kept: the LoRA, on checkpoint 100
        _image(3, [200], **{"Model hash": "FFFFFFFFFF"}),                 # LoRA base unresolved
        _image(4, [300]),                                                  # SDXL LoRA on an SD 1.5 checkpoint
        _image(5, [100], nsfw="Soft"),
        _image(6, [400]),                                                  # out of scope type
        _image(7, [500]),                                                  # no downloadable file
        _image(8, [600]),                                                  # quality
        _image(9, [700]),                                                  # NSFW model
        _image(10, [100], sampler="Restart"),
        _image(11, [100], Size="500x700"),
        _image(12, [100], Size="1024x"),                                   # malformed: quarantined
        _image(13, [999]),                                                 # not a crawled version
        {"id": 14, "modelVersionIds": [100], "meta": None},                # no meta
    ]
    raw = dabench.Raw({m["id"]: m for m in models}, {}, images,
                      {"0000000064": {"hash": "0000000064", "found": True,
                                      "version": {"id": 100, "modelId": 1, "baseModel": "SD 1.5", "model": {"name": "Checkpoint1"}}},
                       "FFFFFFFFFF": {"hash": "FFFFFFFFFF", "found": False, "version": None}})
    raw.versions = {v["id"]: (m, v) for m in models for v in m["modelVersions"]}
    return raw


def test_each_filter_removes_what_it_should_and_says_why(raw):
    result = dabench.filter_pairs(raw, dabench.FilterConfig(min_downloads=50))
    assert sorted(p["image_id"] for p in result["pairs"]) == [1, 2]
    removed = {r["image_id"]: (r["filter"], r["reason"]) for r in result["removed"]}
    assert removed == {
        3: ("availability", "LoRA base checkpoint unresolved"),
        4: ("availability", "LoRA base checkpoint of another architecture"),
        5: ("nsfw", "NSFW image"), 6: ("scope", "type out of scope"), 7: ("availability", "no downloadable file"),
        8: ("quality", "fewer than 50 downloads"), 9: ("nsfw", "NSFW model"),
        10: ("parameters", "sampler without a diffusers scheduler"),
        11: ("parameters", "size not a multiple of 8 in range"), 14: ("no_meta", "no generation metadata")}
    quarantined = {q["image_id"]: q["detail"] for q in result["quarantined"]}
    assert quarantined[12] == "meta.Size='1024x' is not WIDTHxHEIGHT" and 13 in quarantined
    report = dabench.filter_report(result, len(raw.images))
    assert report["removed"].sum() + len(result["pairs"]) == len(raw.images)
    assert report.loc["quality", "remaining"] == 2


def test_a_lora_pair_names_the_lora_its_checkpoint_and_takes_the_generation_size(raw):
    pairs = {p["image_id"]: p for p in dabench.filter_pairs(raw, dabench.FilterConfig())["pairs"]}
    lora = pairs[2]
    assert lora["api"]["model"] == "LORA2" and lora["api"]["type"] == "LORA"
    assert lora["lora_base"] == {"model_id": 1, "model_version_id": 100, "model": "Checkpoint1"}
    assert (lora["api"]["width"], lora["api"]["height"]) == (512, 768)  # meta.Size, not the 1024x1536 file
    assert lora["instruction"]["prompt"] == "a castle, sunset"  # the LoRA tag is gone
    assert lora["api"]["sampling_steps"] == 25 and lora["api"]["cfg_scale"] == 7.0 and lora["seed"] == 5


@pytest.mark.parametrize("prompt,expected", [
    ("<lora:a:0.7>, castle", "castle"),
    ("castle, <lora:a_b:1>, sunset,<LYCO:x:0.5>", "castle, sunset"),
    ("castle <hypernet:h:1> at night", "castle at night"),
    ("(masterpiece:1.2), castle", "(masterpiece:1.2), castle"),
])
def test_strip_lora_tags(prompt, expected):
    assert dabench.strip_lora_tags(prompt) == expected


def test_splits_are_8_1_1_seeded_and_stable():
    ids = [f"{i}-1" for i in range(100)]
    splits = dabench.assign_splits(ids, seed=0)
    assert Counter(splits.values()) == {"train": 80, "align": 10, "test": 10}
    assert splits == dabench.assign_splits(list(reversed(ids)), seed=0)  # input order does not matter
    assert splits != dabench.assign_splits(ids, seed=1)


def test_schema_rejects_what_the_executor_could_not_run(raw):
    pair = dabench.filter_pairs(raw, dabench.FilterConfig())["pairs"][0]
    record = dabench.assemble([pair], {pair["model_version_id"]: {"description": "A model.", "backend": "template",
                                                                  "stand_in": True, "fallback": False}})[0]
    assert schema_errors(record) == []
    bad = {**record, "api": {**record["api"], "width": 500, "sampling_method": "Restart"}}
    errors = " ".join(schema_errors(bad))
    assert "api/width" in errors and "api/sampling_method" in errors


def test_missing_description_names_the_stage(raw):
    pairs = dabench.filter_pairs(raw, dabench.FilterConfig())["pairs"]
    with pytest.raises(KeyError, match="run the rewriting stage"):
        dabench.assemble(pairs, {})


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Crawl → filter → template rewrite → DABench on a small local catalog."""
    from helpers.textgen import TemplateGenerator

    root = tmp_path_factory.mktemp("dabench")
    with LocalCivitai(Catalog(CatalogSpec(num_models=80, seed=5))) as server:
        civitai.crawl(civitai.CivitaiClient(server.url, min_interval=0), root / "raw", images_per_model=10,
                      progress=False)
    dabench.run_filter(root, root / "raw", dabench.FilterConfig())
    dabench.run_rewrite(root, root / "raw", root / "pairs.jsonl", TemplateGenerator())
    counts = dabench.run_assemble(root, root / "pairs.jsonl", root / "descriptions.jsonl", 0,
                                  {"source": "local", "backend": "template", "stand_in": True, "seed": 0})
    return root, counts


def test_every_record_validates_and_its_size_is_the_generation_size(built):
    root, counts = built
    records = civitai.read_jsonl(root / "dabench.jsonl")
    assert len(records) == counts["records"] > 50
    assert dabench.invalid_records(records) == []
    images = {i["id"]: i for i in civitai.read_jsonl(root / "raw" / "images.jsonl")}
    upscaled = 0
    for record in records:
        image = images[record["image_id"]]
        assert f"{record['api']['width']}x{record['api']['height']}" == image["meta"]["Size"]
        upscaled += (image["width"], image["height"]) != (record["api"]["width"], record["api"]["height"])
    assert upscaled > 0  # the catalog's hires upscales reached DABench, with their generation size
    assert all("<lora:" not in r["instruction"]["prompt"] for r in records)
    assert {r["architecture"] for r in records} == {"SD 1.5", "SDXL 1.0"}
    assert all(r["description_provenance"]["stand_in"] for r in records)


def test_the_dataset_loads_with_its_configs_and_splits(built):
    root, counts = built
    everything = dabench.load_saved(root / "dataset", "all")
    assert {split: len(rows) for split, rows in everything.items()} == {
        "train": counts["all_train"], "align": counts["all_align"], "test": counts["all_test"]}
    sd15 = dabench.load_saved(root / "dataset", "sd15")
    assert set(sd15["train"]["architecture"]) == {"SD 1.5"}
    card = (root / "dataset" / "README.md").read_text()
    assert "config_name: sdxl" in card and "template stand-in" in card


def test_two_saved_datasets_load_their_own_rows(built, tmp_path):
    # datasets would serve the second folder from the first one's cache entry (same name, config and patterns)
    root, counts = built
    records = civitai.read_jsonl(root / "dabench.jsonl")
    few = [r for r in records if r["split"] == "train"][:3] + [r for r in records if r["split"] == "test"][:1]
    dabench.save_dataset(few, tmp_path / "dataset", {"source": "local", "backend": "template", "stand_in": True})
    assert len(dabench.load_saved(root / "dataset", "all")["train"]) == counts["all_train"]
    assert {split: len(rows) for split, rows in dabench.load_saved(tmp_path / "dataset", "all").items()} == \
        {"train": 3, "test": 1}


def test_build_dabench_cli_matches_the_stage_functions(built, tmp_path):
    import subprocess
    import sys

    root, counts = built
    result = subprocess.run([sys.executable, "-m", "helpers.cli", "build-dabench", "--raw", str(root / "raw"),
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "dabench.jsonl").read_text() == (root / "dabench.jsonl").read_text()
