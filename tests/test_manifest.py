import hashlib
import json

import pytest

from conftest import said
from helpers import display
from helpers import manifest as manifests


class Counter:
    def __init__(self):
        self.calls = 0

    def __call__(self, folder, value=1):
        self.calls += 1
        (folder / "out.txt").write_text(f"value {value}\n")
        return {"rows": value}


def _stage(root, params=None, inputs=()):
    return manifests.Stage(root / "data" / "stage", name="stage", params=params or {"n": 1}, inputs=inputs, root=root)


def test_second_run_with_same_inputs_is_skipped(tmp_path, capsys):
    compute = Counter()
    _stage(tmp_path).run(compute)
    record = _stage(tmp_path).run(compute)
    assert compute.calls == 1
    assert "up to date" in capsys.readouterr().out
    assert record["counts"] == {"rows": 1}


def test_the_done_line_names_every_count_within_the_page_width(tmp_path, capsys):
    counts = {f"count_{i}": i * 1000 for i in range(12)} | {"kept": "everything"}
    _stage(tmp_path).run(lambda folder: counts)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[stage] done in ") and len(lines) > 1
    assert all(len(line) <= display.LINE_WIDTH for line in lines) and all(line.startswith("  ") for line in lines[1:])
    said = " ".join(line.strip() for line in lines)
    assert all(f"{name}={value!r}" in said for name, value in counts.items())


def test_manifest_records_what_the_issue_asks_for(tmp_path):
    source = tmp_path / "input.txt"
    source.write_text("hello\n")
    record = _stage(tmp_path, inputs=[source]).run(Counter())
    on_disk = json.loads((tmp_path / "data" / "stage" / "manifest.json").read_text())
    assert on_disk == record
    assert record["inputs"] == {"input.txt": hashlib.sha256(b"hello\n").hexdigest()}
    assert record["outputs"] == {"out.txt": hashlib.sha256(b"value 1\n").hexdigest()}
    assert record["params"] == {"n": 1}
    assert {"torch", "transformers", "python"} <= set(record["versions"])
    assert record["git_commit"] and record["wall_time_s"] >= 0 and record["started_at"]


@pytest.mark.parametrize("change", ["params", "input", "force"])
def test_changes_recompute(tmp_path, monkeypatch, change):
    source = tmp_path / "input.txt"
    source.write_text("a")
    compute = Counter()
    _stage(tmp_path, inputs=[source]).run(compute)
    params = {"n": 1}
    if change == "params":
        params = {"n": 2}
    elif change == "input":
        source.write_text("b")
    else:
        monkeypatch.setenv("T2IBOOK_FORCE", "1")
    _stage(tmp_path, params=params, inputs=[source]).run(compute)
    assert compute.calls == 2


def test_a_crash_leaves_no_manifest_and_the_next_run_recomputes(tmp_path):
    compute = Counter()
    _stage(tmp_path).run(compute)

    def crash(folder):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        _stage(tmp_path, params={"n": 2}).run(crash)
    assert not (tmp_path / "data" / "stage" / "manifest.json").exists()
    _stage(tmp_path, params={"n": 2}).run(compute)
    assert compute.calls == 2


def test_a_file_linked_in_from_elsewhere_is_named_where_it_sits(tmp_path):
    """Tiny checkpoints link their base pipeline's files; an output's name must not be its target's absolute
    path, which differs between two clones of the book."""
    shared, stage = tmp_path / "base", tmp_path / "stage"
    shared.mkdir(), stage.mkdir()
    (shared / "model_index.json").write_text("{}")
    (stage / "model_index.json").symlink_to("../base/model_index.json")
    (stage / "own.txt").write_text("x")
    hashes = manifests.hash_tree(stage)
    assert set(hashes) == {"model_index.json", "own.txt"}
    assert hashes["model_index.json"] == hashlib.sha256(b"{}").hexdigest()


def test_missing_input_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        _stage(tmp_path, inputs=[tmp_path / "nowhere.jsonl"]).run(Counter())


def test_atomic_write_leaves_only_the_target(tmp_path):
    manifests.atomic_write_json(tmp_path / "a.json", {"b": 1})
    manifests.atomic_write_json(tmp_path / "a.json", {"b": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    assert json.loads((tmp_path / "a.json").read_text()) == {"b": 2}


def test_code_hash_changes_the_fingerprint(tmp_path, monkeypatch):
    module = tmp_path / "stage_code_probe.py"
    module.write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    stage = manifests.Stage(tmp_path / "s", name="s", params={}, code=["stage_code_probe"], root=tmp_path)
    before = stage.fingerprint()
    module.write_text("X = 2\n")
    assert stage.fingerprint() != before


def test_trainer_logs_lose_their_wall_clock_fields():
    from helpers.manifest import without_timings

    log = [{"step": 1, "loss": 0.5, "learning_rate": 1e-3},
           {"step": 2, "train_runtime": 3.2, "train_samples_per_second": 9.0, "train_steps_per_second": 1.0,
            "total_flos": 10.0, "train_loss": 0.4},
           {"step": 2, "eval_loss": 0.3, "eval_runtime": 0.1, "eval_model_preparation_time": 0.01}]
    assert without_timings(log) == [{"step": 1, "loss": 0.5, "learning_rate": 1e-3},
                                    {"step": 2, "total_flos": 10.0, "train_loss": 0.4},
                                    {"step": 2, "eval_loss": 0.3}]


def test_rows_fingerprint_reads_columns_as_stored_and_tells_datasets_apart(monkeypatch):
    import numpy as np
    from datasets import Dataset, Features, Image as ImageFeature, Value
    from PIL import Image

    rows = [{"prompt": f"a kite {i}", "score": 0.5 * i} for i in range(5)]
    plain = manifests.rows_fingerprint(rows)
    assert manifests.rows_fingerprint(Dataset.from_list(rows)) == plain  # the same cells, however they are held
    assert manifests.rows_fingerprint(rows[:4]) != plain
    assert manifests.rows_fingerprint([{**rows[0], "score": 9.0}, *rows[1:]]) != plain
    assert manifests.rows_fingerprint(rows, ["prompt"]) == manifests.rows_fingerprint(
        [{"prompt": r["prompt"]} for r in rows])
    # images: a Dataset's are hashed as their stored PNG bytes, never decoded; other pixels, another fingerprint
    pictures = [Image.fromarray(np.full((8, 8, 3), shade, dtype=np.uint8)) for shade in (10, 200)]
    features = Features({"prompt": Value("string"), "chosen": ImageFeature()})
    dataset = Dataset.from_list([{"prompt": "a", "chosen": pictures[0]}], features=features)
    other = Dataset.from_list([{"prompt": "a", "chosen": pictures[1]}], features=features)
    monkeypatch.setattr(Image, "open", lambda *a, **k: pytest.fail("an image was decoded"))
    assert manifests.rows_fingerprint(dataset) != manifests.rows_fingerprint(other)
    monkeypatch.undo()
    assert manifests.rows_fingerprint([{"prompt": "a", "chosen": pictures[0]}]) != manifests.rows_fingerprint(
        [{"prompt": "a", "chosen": pictures[1]}])


def test_a_resume_point_is_offered_only_to_the_training_that_left_it(tmp_path, capsys):
    folder = tmp_path / "checkpoints"
    newest = lambda f: max(f.glob("checkpoint-*"), default=None)  # noqa: E731
    run = {"settings": {"lr": 1e-3}, "data": "abc"}
    assert manifests.resume_point(folder, run, newest) is None  # nothing there yet
    for step in (2, 4):
        (folder / f"checkpoint-{step}").mkdir()
    assert manifests.resume_point(folder, run, newest) == str((folder / "checkpoint-4").resolve())
    assert capsys.readouterr().out == ""
    changed = {"settings": {"lr": 2e-3}, "data": "abc"}
    assert manifests.resume_point(folder, changed, newest) is None
    assert "resume points of other training" in said(capsys.readouterr().out)
    assert [p.name for p in folder.iterdir()] == [manifests.RESUME_IDENTITY]  # the old run's points are gone
    (tmp_path / "unmarked").mkdir()
    (tmp_path / "unmarked" / "checkpoint-1").mkdir()  # left by a run that wrote no identity: not continued
    assert manifests.resume_point(tmp_path / "unmarked", run, newest) is None


def test_a_main_only_stage_is_computed_once_under_a_launch_and_the_others_wait_for_it(tmp_path, monkeypatch):
    """A crawl of a public API runs on the main process only: another process of the launch neither computes it
    nor returns before the main process's manifest for the same fingerprint is there."""
    import threading
    import time

    stage = manifests.Stage(tmp_path / "data" / "crawl", name="crawl", params={"n": 1}, root=tmp_path,
                            main_only=True)
    fingerprint = stage.fingerprint()
    monkeypatch.setattr(manifests, "MANIFEST_POLL_S", 0.01)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    def main_process_finishes():
        time.sleep(0.3)
        stage.folder.mkdir(parents=True)
        manifests.atomic_write_json(stage.folder / manifests.MANIFEST, {"fingerprint": "an older run"})
        time.sleep(0.1)  # a manifest of another fingerprint is not the answer
        manifests.atomic_write_json(stage.folder / manifests.MANIFEST, {"fingerprint": fingerprint, "counts": {}})

    compute = Counter()
    threading.Thread(target=main_process_finishes, daemon=True).start()
    started = time.monotonic()
    record = stage.run(compute)
    # it waited for the main process (≥ 0.4 s) and took its manifest, not the older one written first
    assert compute.calls == 0 and record["fingerprint"] == fingerprint and time.monotonic() - started >= 0.35
    # without main_only, the other process computes the same work into a scratch folder, then takes the manifest
    beside = manifests.Stage(tmp_path / "data" / "crawl", name="crawl", params={"n": 1}, root=tmp_path)
    monkeypatch.setenv("T2IBOOK_FORCE", "1")
    assert beside.run(compute)["fingerprint"] == fingerprint and compute.calls == 1
    assert not (stage.folder / "out.txt").exists()  # it wrote nothing into the main process's folder
