"""Shared fixtures: a throw-away book root so tests never write into the checkout's data/ or book/."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two worker processes beside the end-to-end test's two single-threaded book runs, on a 2-core
    # machine: one torch thread per worker (set before torch is first imported), else OpenMP threads spin waiting
    # for cores the others hold (a small matmul loop ran 4.6x slower on two threads than on one beside two busy
    # processes; the tiny benchmarks' fixture took 401 s instead of 60)
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, "1")

REPO = Path(__file__).resolve().parents[1]
# what a fresh clone holds, minus what is generated
COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", "_build", "runs", "*.egg-info", "__pycache__", ".pytest_cache",
                                     "cache", "extra", "node_modules", "[0-9][0-9]_*.ipynb.bak")


def pytest_collection_modifyitems(config, items):
    """The end-to-end book run is the longest test by far: it goes first, so that under `make test` (pytest-xdist,
    one test file per worker at a time, files in this order) every other file runs beside it."""
    items.sort(key=lambda item: item.get_closest_marker("e2e") is None)


def copy_repo(destination: Path) -> Path:
    """A copy of the checkout's sources (no venv, no runs, no executed notebooks, no build)."""
    shutil.copytree(REPO, destination, ignore=COPY_IGNORE)
    for executed in (destination / "book").glob("[0-9][0-9]_*.ipynb"):
        executed.unlink()
    return destination


@pytest.fixture
def book_root(tmp_path, monkeypatch) -> Path:
    """A minimal book root (configs, _toc.yml, empty notebooks/) set as T2IBOOK_ROOT."""
    root = tmp_path / "book_root"
    (root / "notebooks").mkdir(parents=True)
    shutil.copytree(REPO / "configs", root / "configs")
    (root / "_toc.yml").write_text("format: jb-book\nroot: book/intro\n")
    monkeypatch.setenv("T2IBOOK_ROOT", str(root))
    monkeypatch.delenv("T2IBOOK_FORCE", raising=False)
    return root


@pytest.fixture
def tiny_ctx(book_root):
    """A tiny-profile run context rooted in the throw-away book root."""
    from helpers import config

    return config.setup("tiny", 0, quiet=True)


class Killed(RuntimeError):
    """A training process that died (resume tests): raised right after a checkpoint reached the disk."""


def kill_after_checkpoint(monkeypatch, trainer_class, step: int) -> None:
    """Make `trainer_class` (a transformers Trainer) raise `Killed` once its step-`step` checkpoint is written."""
    save = trainer_class._save_checkpoint

    def save_then_die(self, *args, **kwargs):
        save(self, *args, **kwargs)
        if self.state.global_step == step:
            raise Killed

    monkeypatch.setattr(trainer_class, "_save_checkpoint", save_then_die)


def steps_run(monkeypatch, trainer_class) -> list[int]:
    """The global step at each `training_step` call of `trainer_class` from now on (filled as it trains)."""
    ran, step = [], trainer_class.training_step
    monkeypatch.setattr(trainer_class, "training_step",
                        lambda self, *a, **k: ran.append(self.state.global_step) or step(self, *a, **k))
    return ran


def said(printed: str) -> str:
    """Printed text with its line wrapping undone (`display.say` wraps messages to the page width)."""
    return " ".join(printed.split())
