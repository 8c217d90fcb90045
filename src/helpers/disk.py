"""What a run keeps on disk, measured (`t2ibook disk`): notebook 14 projects a paper run's disk; this counts it.

One row per stage folder and per shared store under `data/runs/<profile>/` (the image cache's PNGs and score
rows, the built models, the Civitai weights cache with its cap), each with its files and bytes, and the free space
of the disk that holds them.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

SHARED = {"image_cache": "images drawn (PNGs) and their scores", "models": "models built or resolved for this profile",
          "weights": "Civitai checkpoints and LoRAs", "agent_cache": "the agents' decoded API calls",
          "_runner": "t2ibook run's record of what each notebook ran with",
          "textgen_cache": "the hosted LLM's replies (OpenAI-compatible backend), one line each"}


def _measure(path: Path) -> tuple[int, int, dict[str, int]]:
    """(files, bytes, {suffix: files} for PNGs and FID feature files) under `path` (a file or a folder), links not
    followed, in one walk."""
    counted = {".png": 0, ".npz": 0}
    if path.is_file():
        return 1, path.stat().st_size, {**counted, **({path.suffix: 1} if path.suffix in counted else {})}
    files = size = 0
    for root, _, names in os.walk(path):
        for name in names:
            try:
                stat = (Path(root) / name).lstat()
            except FileNotFoundError:  # removed while walking (a running stage)
                continue
            files, size = files + 1, size + stat.st_size
            suffix = os.path.splitext(name)[1]
            if suffix in counted:
                counted[suffix] += 1
    return files, size, counted


def usage(runs_dir: Path, weights_dir: Path | None = None):
    """A DataFrame: `what`, `path`, `files`, `GB`, `note`, one row per entry of `runs_dir` (stage folders, the
    shared stores), plus the weights cache when it lives elsewhere (`T2IBOOK_WEIGHTS_CACHE`), largest first."""
    import pandas as pd

    runs_dir = Path(runs_dir)
    weights_dir = Path(weights_dir or os.environ.get("T2IBOOK_WEIGHTS_CACHE") or runs_dir / "weights")
    entries = sorted(runs_dir.iterdir()) if runs_dir.is_dir() else []
    if weights_dir.is_dir() and weights_dir.resolve().parent != runs_dir.resolve():
        entries.append(weights_dir)
    rows = []
    for path in entries:
        files, size, kinds = _measure(path)
        what = "weights" if path == weights_dir else path.name
        note = SHARED.get(what, "stage folder" if (path / "manifest.json").is_file() else "")
        if what == "image_cache":
            scores = path / "scores.jsonl"
            rows_scored = sum(1 for _ in open(scores, "rb")) if scores.is_file() else 0
            note = f"{kinds['.png']:,} PNGs, {rows_scored:,} score rows"
            if kinds[".npz"]:  # FID features kept by image key (notebook 11)
                note += f", {kinds['.npz']:,} FID feature files"
        elif what == "weights" and os.environ.get("T2IBOOK_WEIGHTS_CACHE_GB"):
            note = f"{SHARED['weights']}, capped at {os.environ['T2IBOOK_WEIGHTS_CACHE_GB']} GB"
        rows.append({"what": what, "path": str(path), "files": files, "GB": size / 1e9, "note": note})
    table = pd.DataFrame(rows, columns=["what", "path", "files", "GB", "note"])
    return table.sort_values("GB", ascending=False, kind="stable").reset_index(drop=True)


def report(runs_dir: Path, weights_dir: Path | None = None) -> str:
    """`usage` as text, with the total and the free space of the disk under `runs_dir`."""
    table = usage(runs_dir, weights_dir)
    if table.empty:
        return f"{runs_dir}: nothing yet (run the book first: t2ibook run)"
    lines = [f"{row.what:<32} {row.files:>9,} files {row.GB:>10.3f} GB  {row.note}" for row in table.itertuples()]
    free = shutil.disk_usage(runs_dir).free / 1e9
    lines.append(f"{'total':<32} {table['files'].sum():>9,} files {table['GB'].sum():>10.3f} GB  "
                 f"({free:,.1f} GB free on the disk of {runs_dir})")
    return "\n".join(lines)
