"""Benchmarks (`t2ibook bench`), their results files and the cost-to-reproduce model of notebook 14.

The names below load their module on first use, so that notebook 14, which only reads results files through
`cost`, does not import torch."""
import importlib

_HOME = {"default_results_name": "harness", "load_results": "harness", "save_results": "harness",
         "BENCHMARKS": "suite", "PLAN": "suite", "run": "suite"}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
