"""`t2ibook disk`: what a profile's runs keep on disk, counted file by file."""
from __future__ import annotations

from helpers import cli, disk


def _file(path, size):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(size))


def test_each_stage_and_store_is_measured_and_an_outside_weights_cache_counted(tmp_path, monkeypatch, capsys):
    runs = tmp_path / "book" / "data" / "runs" / "paper"
    _file(runs / "07_rrhf" / "manifest.json", 10)
    _file(runs / "07_rrhf" / "model" / "model.safetensors", 3_000)
    _file(runs / "image_cache" / "images" / "ab" / "ab12.png", 500)
    _file(runs / "image_cache" / "images" / "cd" / "cd34.png", 700)
    (runs / "image_cache" / "scores.jsonl").write_text('{"a": 1}\n{"a": 2}\n{"a": 3}\n')  # 27 bytes
    weights = tmp_path / "elsewhere" / "weights"
    _file(weights / "11.safetensors", 4_000)
    _file(weights / "12.safetensors", 2_000)
    monkeypatch.setenv("T2IBOOK_WEIGHTS_CACHE", str(weights))
    monkeypatch.setenv("T2IBOOK_WEIGHTS_CACHE_GB", "250")
    table = disk.usage(runs).set_index("what")
    assert list(table.index) == ["weights", "07_rrhf", "image_cache"]  # largest first
    assert table.loc["weights", "files"] == 2 and table.loc["weights", "GB"] * 1e9 == 6_000
    assert table.loc["weights", "note"].endswith("capped at 250 GB")
    assert (table.loc["07_rrhf", "files"], round(table.loc["07_rrhf", "GB"] * 1e9)) == (2, 3_010)
    assert table.loc["07_rrhf", "note"] == "stage folder"
    assert (table.loc["image_cache", "files"], round(table.loc["image_cache", "GB"] * 1e9)) == (3, 1_227)
    assert table.loc["image_cache", "note"] == "2 PNGs, 3 score rows"
    monkeypatch.setenv("T2IBOOK_ROOT", str(tmp_path / "book"))
    _file(runs / "textgen_cache" / "openai.jsonl", 5)
    assert disk.usage(runs).set_index("what").loc["textgen_cache", "note"].startswith("the hosted LLM's replies")
    _file(runs / "image_cache" / "fid_features" / "clip-64px" / "0a1b.npz", 73)
    assert disk.usage(runs).set_index("what").loc["image_cache", "note"] == "2 PNGs, 3 score rows, 1 FID feature files"
    assert cli.main(["disk", "--profile", "paper"]) == 0
    printed = capsys.readouterr().out
    assert "2 PNGs, 3 score rows" in printed and "total" in printed and "9 files" in printed
    assert "GB free on the disk of" in printed


def test_a_profile_that_has_not_run_says_so(tmp_path):
    assert "nothing yet" in disk.report(tmp_path / "data" / "runs" / "small")
