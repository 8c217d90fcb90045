import os

import pytest
import torch
import yaml

from helpers import config


@pytest.mark.parametrize("profile", config.PROFILES)
def test_each_profile_recipe_loads_and_injects_common_parameters(profile):
    recipe = config.load_recipe(profile)
    assert recipe.profile == profile
    parameters = recipe.parameters_for("00_setup")
    assert parameters["profile"] == profile
    assert parameters["recipe"] == f"configs/{profile}.yaml"
    assert set(config.COMMON_PARAMETERS) <= set(parameters)


def _write(root, text):
    path = root / "configs" / "custom.yaml"
    path.write_text(text)
    return str(path)


def test_unknown_top_level_key_is_named(book_root):
    with pytest.raises(ValueError, match="unknown top-level keys.*'stages'"):
        config.load_recipe(_write(book_root, "profile: tiny\nstages: {}\n"))


def test_bad_profile_is_named(book_root):
    with pytest.raises(ValueError, match="'huge' is not one of"):
        config.load_recipe(_write(book_root, "profile: huge\n"))


def test_secret_like_parameter_is_refused(book_root):
    with pytest.raises(ValueError, match="civitai_token looks like a secret"):
        config.load_recipe(_write(book_root, "profile: tiny\nnotebooks:\n  01_crawl_civitai:\n    civitai_token: x\n"))


@pytest.mark.parametrize("name,secret", [("civitai_token", True), ("openai_api_key", True), ("password", True),
                                         ("max_new_tokens", False), ("demo_new_tokens", False), ("keyword", False)])
def test_looks_like_secret(name, secret):
    assert config.looks_like_secret(name) is secret


def test_common_parameter_inside_a_notebook_section_is_refused(book_root):
    with pytest.raises(ValueError, match="'seed' is set for every notebook"):
        config.load_recipe(_write(book_root, "profile: tiny\nnotebooks:\n  00_setup:\n    seed: 3\n"))


def test_custom_recipe_keeps_its_path_and_overrides(book_root):
    path = _write(book_root, yaml.safe_dump({"profile": "tiny", "seed": 7, "models": {"agent_llm": "/m/llama"}}))
    recipe = config.load_recipe(path)
    assert recipe.seed == 7 and recipe.models == {"agent_llm": "/m/llama"}
    assert recipe.parameters_for("00_setup")["recipe"] == "configs/custom.yaml"


def test_setup_refuses_a_recipe_of_another_profile(book_root):
    with pytest.raises(ValueError, match="disagrees with recipe paper.yaml"):
        config.setup("tiny", 0, "configs/paper.yaml", quiet=True)


def test_setup_seeds_and_goes_offline(book_root, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    ctx = config.setup("tiny", 11, quiet=True)
    first = torch.rand(3)
    config.setup("tiny", 11, quiet=True)
    assert torch.equal(first, torch.rand(3))
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert ctx.runs_dir == book_root / "data" / "runs" / "tiny"


def test_repo_root_prefers_environment(book_root):
    assert config.repo_root() == book_root.resolve()


@pytest.mark.parametrize("library", ["transformers", "diffusers"])
def test_errors_only_silences_warnings_inside_and_restores_the_level_after_an_error(library):
    import importlib
    import logging

    library_logging = importlib.import_module(f"{library}.utils.logging")
    before = library_logging.get_verbosity()
    log = library_logging.get_logger(f"{library}.t2ibook_test")
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    library_logging.get_logger().addHandler(handler)  # the library's root logger (it does not propagate)
    with pytest.raises(RuntimeError, match="inside"):
        with config.errors_only(library):
            assert library_logging.get_verbosity() == logging.ERROR
            raise RuntimeError("inside")
    assert library_logging.get_verbosity() == before != logging.ERROR  # restored although the block failed
    try:
        with config.errors_only(library):
            log.warning("expected notice")
            log.error("a real error")
        log.warning("a later warning")
    finally:
        library_logging.get_logger().removeHandler(handler)
    assert seen == ["a real error", "a later warning"]
    with pytest.raises(ValueError, match="only 'transformers' and 'diffusers'"):
        with config.errors_only("torch"):
            pass


LATE_IMPORT = """
import sys
from helpers import config
ctx = config.setup("tiny", {seed}, quiet=True)
before = sorted(name for name in ("torch", "diffusers", "datasets", "transformers") if name in sys.modules)
import torch, datasets, diffusers.utils.logging, transformers.utils.logging
seeded_late = torch.rand(4).tolist()
torch.manual_seed({seed})
print(before, seeded_late == torch.rand(4).tolist(), ctx.device, ctx.dtype,
      datasets.is_progress_bar_enabled(), diffusers.utils.logging.is_progress_bar_enabled(),
      transformers.utils.logging.is_progress_bar_enabled())
"""


def test_setup_imports_no_model_library_yet_a_later_import_is_seeded_and_quiet(book_root):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", LATE_IMPORT.format(seed=7)], capture_output=True, text=True,
                            env={**os.environ, "T2IBOOK_ROOT": str(book_root)}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["[]", "True", "cpu", "torch.float32", "False", "False", "False"]


def test_when_imported_waits_for_the_import_that_runs_the_module(tmp_path, monkeypatch):
    import importlib.util
    import sys

    (tmp_path / "late_imported_module.py").write_text("value = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "late_imported_module", raising=False)
    monkeypatch.setattr(config._AfterImport, "waiting", {})  # nothing else waits (other tests' setups leave some)
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    seen = []
    config.when_imported("late_imported_module", lambda module: seen.append(module.value))
    assert importlib.util.find_spec("late_imported_module") is not None and seen == []  # looking is not importing
    module = importlib.import_module("late_imported_module")
    assert seen == [1] and not isinstance(module.__loader__, config._ThenRun)  # the real loader is back
    assert not any(isinstance(finder, config._AfterImport) for finder in sys.meta_path)  # gone once nothing waits
    config.when_imported("late_imported_module", lambda module: seen.append(2))  # imported already: runs now
    assert seen == [1, 2]
    monkeypatch.delitem(sys.modules, "late_imported_module")
