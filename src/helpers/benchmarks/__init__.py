"""Benchmarks (`t2ibook bench`), their results files and the cost-to-reproduce model of notebook 14."""
from .harness import default_results_name, load_results, save_results
from .suite import BENCHMARKS, PLAN, run

__all__ = ["BENCHMARKS", "PLAN", "default_results_name", "load_results", "run", "save_results"]
