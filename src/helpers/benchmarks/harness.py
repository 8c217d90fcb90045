"""Timing, device facts and the results file shared by the benchmarks.

A results file is JSON: {"schema", "size", "device": {...}, "versions": {...}, "benchmarks": [row, ...]} where a
row names the work, its unit and shapes, and holds one entry per path ("naive", "project", sometimes more) with
seconds per unit, how many units were timed and the peak GPU memory. `ratio` is naive ÷ project, measured in
the same process, one path right after the other.
"""
from __future__ import annotations

import gc
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

SCHEMA = 1
SIZES = ("tiny", "full")


def device_facts(device: str) -> dict[str, Any]:
    """What the numbers were measured on."""
    facts: dict[str, Any] = {"device": device, "torch_threads": torch.get_num_threads(),
                             "cpu_count": os.cpu_count(), "machine": platform.machine()}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        facts.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    else:
        facts["name"] = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return facts


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class PathTiming:
    """One path of one benchmark: seconds per unit over `units` timed units (after warm-up)."""

    path: str
    seconds_per_unit: float
    units: int
    total_s: float
    peak_memory_gib: float | None = None
    settings: dict[str, Any] = field(default_factory=dict)


def time_path(name: str, run: Callable[[], int], device: str, *, warmup: Callable[[], Any] | None = None,
              settings: dict[str, Any] | None = None) -> PathTiming:
    """Warm up (compilation, allocator, caches), then time `run()`, which returns how many units it did."""
    if warmup is not None:
        warmup()
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    synchronize(device)
    started = time.perf_counter()
    units = run()
    synchronize(device)
    total = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return PathTiming(name, total / max(units, 1), units, total,
                      round(peak, 2) if peak is not None else None, settings or {})


def ran_at(timing: PathTiming, asked: Any, ran: Any) -> PathTiming:
    """Record in `timing.settings["batch"]` the batch size its timed run used: a path whose batch ran out of GPU
    memory in the warm-up goes on at a smaller one (`speed.fitting_batches`), and then its seconds are for that
    size; `batch_asked` keeps the size the plan asked for."""
    timing.settings["batch"] = ran
    if ran != asked:
        timing.settings["batch_asked"] = asked
    return timing


def row(name: str, unit: str, shapes: dict[str, Any], paths: list[PathTiming], notes: str = "") -> dict[str, Any]:
    """A results row; `ratio` = first path ÷ second (naive ÷ project), plus every other path ÷ the project's."""
    by_name = {p.path: p.__dict__ for p in paths}
    project = by_name.get("project")
    ratios = {f"{p.path}/project": round(p.seconds_per_unit / project["seconds_per_unit"], 3)
              for p in paths if project and p.path != "project"}
    return {"name": name, "unit": unit, "shapes": shapes, "paths": by_name, "headline": ["naive", "project"],
            "ratio": ratios.get("naive/project"), "ratios": ratios, "notes": notes}


def headline(bench: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(naive, project) timings of a results row: the two paths its `ratio` compares."""
    naive, project = bench["headline"]
    return bench["paths"][naive], bench["paths"][project]


def results_document(size: str, device: str, rows: list[dict[str, Any]],
                     failed: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """`failed` lists the benchmarks that raised ({"name", "error"}); readers treat it as empty when absent."""
    from ..manifest import library_versions

    return {"schema": SCHEMA, "size": size, "device": device_facts(device), "versions": library_versions(),
            "created": time.strftime("%Y-%m-%d", time.gmtime()), "benchmarks": rows, "failed": list(failed or [])}


HOST_MEMORY = "host_memory"  # the results folder's subfolder for host-memory documents


def host_memory_document(name: str, shapes: dict[str, Any], measured: dict[str, Any]) -> dict[str, Any]:
    """A host-memory benchmark's result (`benchmarks/score_cache_memory.py`, `benchmarks/fid_memory.py`): what
    one host process holds and peaks at on each path, measured on this machine's CPU, each path in a fresh
    process. `measured` holds "naive", "project" (seconds and MB) and "ratio" (naive ÷ project)."""
    from ..manifest import library_versions

    return {"schema": SCHEMA, "kind": HOST_MEMORY, "name": name, "device": device_facts("cpu"),
            "versions": library_versions(), "created": time.strftime("%Y-%m-%d", time.gmtime()), "shapes": shapes,
            **{key: measured[key] for key in ("naive", "project", "ratio")}}


def save_results(document: dict[str, Any], path: Path) -> Path:
    from ..manifest import atomic_write_json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, document)
    return path


def load_results(path: Path) -> dict[str, Any]:
    document = json.loads(Path(path).read_text())
    if document.get("schema") != SCHEMA:
        raise ValueError(f"{path} has results schema {document.get('schema')!r}, not {SCHEMA}; rerun t2ibook bench")
    return document


def default_results_name(document: dict[str, Any]) -> str:
    """e.g. `cpu-tiny.json` or `nvidia-h100-80gb-hbm3-full.json`."""
    device = document["device"]
    label = device.get("name", "cpu") if device["device"].startswith("cuda") else "cpu"
    slug = "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    return f"{slug}-{document['size']}.json"


def _seconds(value: float) -> str:
    return f"{value:.4g} s"


def smaller_batches(bench: dict[str, Any]) -> list[str]:
    """"<path> at batch N (asked M: out of memory)" for each path of a results row timed at a smaller batch than
    its plan asked for (`ran_at`)."""
    return [f"{name} at batch {path['settings']['batch']} (asked {path['settings']['batch_asked']}: out of memory)"
            for name, path in bench["paths"].items() if "batch_asked" in path.get("settings", {})]


# the parts of a batch of images the image benchmark times apart (`suite.render_phases`), in the order they run
RENDER_PHASES = ("prelude", "denoising", "decode")


def summary_lines(document: dict[str, Any]) -> list[str]:
    """The results as a text table: benchmark, unit, every path's time per unit, naive ÷ project."""
    device = document["device"]
    lines = [f"device: {device.get('name')} ({device['device']}), size: {document['size']}",
             f"{'benchmark':<18} {'unit':<8} {'naive':>12} {'project':>12} {'ratio':>8}  other paths"]
    for bench in document["benchmarks"]:
        naive, project = headline(bench)
        others = ", ".join([f"{name} {_seconds(p['seconds_per_unit'])}" for name, p in bench["paths"].items()
                            if name not in bench["headline"]] + smaller_batches(bench))
        lines.append(f"{bench['name']:<18} {bench['unit']:<8} {_seconds(naive['seconds_per_unit']):>12} "
                     f"{_seconds(project['seconds_per_unit']):>12} {bench['ratio']:>7.2f}x  {others}")
    lines += [f"{failure['name']:<18} FAILED   {failure['error']}" for failure in document.get("failed", [])]
    for bench in document["benchmarks"]:
        phases = bench["paths"].get("project", {}).get("settings", {}).get("phases_s_per_image")
        if phases:
            lines.append(f"{bench['name']}, project path per image: " +
                         ", ".join(f"{name} {_seconds(phases[name])}" for name in RENDER_PHASES if name in phases))
    return lines
