"""Profiles, recipes and the per-notebook run context (paths, seed, device)."""
from __future__ import annotations

import importlib
import importlib.abc
import os
import random
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import yaml

from . import distributed

PROFILES = ("tiny", "small", "paper")
# Parameters every notebook declares; the runner passes them to all notebooks.
COMMON_PARAMETERS = ("profile", "seed", "recipe")
# Secrets travel only through the environment; a recipe key that looks like one is refused.
SECRET_WORDS = {"token", "apikey", "key", "secret", "password", "credentials"}


def repo_root() -> Path:
    """The book's root: $T2IBOOK_ROOT, else the nearest parent of the cwd holding `_toc.yml`, else the source checkout."""
    if env := os.environ.get("T2IBOOK_ROOT"):
        return Path(env).resolve()
    for folder in (Path.cwd(), *Path.cwd().parents):
        if (folder / "_toc.yml").is_file() and (folder / "notebooks").is_dir():
            return folder
    return Path(__file__).resolve().parents[2]


def recipe_path(profile_or_path: str, root: Path | None = None) -> Path:
    """`tiny` → configs/tiny.yaml; a path is taken as it is (relative to the root)."""
    root = root or repo_root()
    if profile_or_path in PROFILES:
        return root / "configs" / f"{profile_or_path}.yaml"
    path = Path(profile_or_path)
    return path if path.is_absolute() else root / path


@dataclass
class Recipe:
    """A papermill recipe: the profile, the seed, model overrides and per-notebook parameters."""

    path: Path
    profile: str
    seed: int = 0
    models: dict[str, str] = field(default_factory=dict)
    notebooks: dict[str, dict[str, Any]] = field(default_factory=dict)

    def parameters_for(self, stem: str, root: Path | None = None) -> dict[str, Any]:
        """The parameters the runner injects into notebook `stem` (e.g. `00_setup`)."""
        root = root or repo_root()
        try:
            shown = self.path.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            shown = str(self.path)
        return {"profile": self.profile, "seed": self.seed, "recipe": shown, **self.notebooks.get(stem, {})}


def load_recipe(profile_or_path: str = "tiny", root: Path | None = None) -> Recipe:
    """Read and validate a recipe file (`configs/<profile>.yaml` or any path)."""
    path = recipe_path(profile_or_path, root)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} does not exist; use one of configs/{{{','.join(PROFILES)}}}.yaml or a path")
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = set(raw) - {"profile", "seed", "models", "notebooks"}
    if unknown:
        raise ValueError(f"recipe {path.name} has unknown top-level keys {sorted(unknown)}; "
                         "allowed: profile, seed, models, notebooks")
    profile = raw.get("profile")
    if profile not in PROFILES:
        raise ValueError(f"recipe {path.name}: profile {profile!r} is not one of {PROFILES}")
    notebooks = {str(k): dict(v or {}) for k, v in (raw.get("notebooks") or {}).items()}
    for stem, params in notebooks.items():
        for key in params:
            if key in COMMON_PARAMETERS:
                raise ValueError(f"recipe {path.name}: '{key}' is set for every notebook by the top level; "
                                 f"remove it from notebooks.{stem}")
            if looks_like_secret(key):
                raise ValueError(f"recipe {path.name}: notebooks.{stem}.{key} looks like a secret; secrets come "
                                 "from environment variables only (e.g. CIVITAI_API_TOKEN), never from a recipe")
    return Recipe(path=path, profile=profile, seed=int(raw.get("seed", 0)),
                  models={str(k): str(v) for k, v in (raw.get("models") or {}).items()}, notebooks=notebooks)


def looks_like_secret(name: str) -> bool:
    """`civitai_token`, `api_key`, `openai_secret` … (but not `max_new_tokens`): names that must not be parameters."""
    return bool(SECRET_WORDS & set(name.lower().split("_")))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) so reruns give the same tables. A process that has not imported
    torch yet gets it seeded right after its first import (see `when_imported`), which leaves it in the same state."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    when_imported("torch", lambda torch: torch.manual_seed(seed))


@contextmanager
def private_seed(seed: int, device=None):
    """torch's random state seeded with `seed` inside the block and restored after it (CPU, and `device` when it is
    a GPU): random draws in the block (sampling, a LoRA adapter's initial weights) do not depend on what ran before
    in the process, such as images drawn or found in a cache, and leave the caller's random state as it was."""
    import torch

    devices = [device] if device is not None and torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def when_imported(name: str, action: Callable[[ModuleType], Any]) -> None:
    """Call `action(module)` now when module `name` is imported already, else right after its first import.

    Notebooks that never touch a model (crawling, filtering, the user study) then never pay for importing torch,
    diffusers and datasets (about 8 s on a 2-core machine), yet a later import still finds them seeded and
    quiet. One action waits per module name: a later call replaces the one before."""
    if name in sys.modules:
        action(sys.modules[name])
        return
    _AfterImport.waiting[name] = action
    if not any(isinstance(finder, _AfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for a module with a waiting action it asks the finders after it and wraps the loader
    they return, so that the action runs once the module has executed. (A spec that is only looked at, as
    `importlib.util.find_spec` does to test whether a library is installed, leaves the action waiting.)"""

    waiting: dict[str, Callable[[ModuleType], Any]] = {}

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.waiting:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None) if finder is not self else None
            spec = find(fullname, path, target) if find else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _ThenRun(spec.loader)
                return spec
        return None


class _ThenRun(importlib.abc.Loader):
    """A loader that runs its module with the real loader, puts the real loader back on it, then runs the action
    waiting for it."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        action = _AfterImport.waiting.pop(module.__name__, None)
        if not _AfterImport.waiting:  # nothing left to wait for: later imports skip the finder
            sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _AfterImport)]
        if action is not None:
            action(module)


@dataclass
class RunContext:
    """What a notebook needs to know about its run: profile, seed, paths, device and model overrides."""

    profile: str
    seed: int
    recipe: Recipe
    root: Path
    _device: str | None = field(default=None, repr=False)

    @property
    def device(self) -> str:
        """`cuda` (or `cuda:<rank>`) or `cpu`, picked on first use (picking imports torch; see `helpers.device`)."""
        if self._device is None:
            from .device import pick_device

            self._device = pick_device()
        return self._device

    @property
    def dtype(self):
        """The torch dtype models run in on `device`: bf16 (fp16 on older GPUs) or fp32 on CPU."""
        from .device import pick_dtype

        return pick_dtype(self.device)

    @property
    def runs_dir(self) -> Path:
        """`data/runs/<profile>/`, where every stage writes its artifacts."""
        return self.root / "data" / "runs" / self.profile

    def stage(self, name: str, params: dict[str, Any] | None = None, inputs=(), code=(), main_only: bool = False):
        """A `Stage` under this run's folder (see `helpers.manifest`; `main_only`: see `Stage`)."""
        from .manifest import Stage

        return Stage(self.runs_dir / name, name=name, params=params or {}, inputs=inputs, code=code,
                     root=self.root, profile=self.profile, main_only=main_only)

    def relative(self, path: str | Path) -> str:
        """`path` relative to the book root when it lies inside it (so records do not depend on the clone's place)."""
        try:
            return Path(path).resolve().relative_to(self.root.resolve()).as_posix()
        except (ValueError, OSError):
            return str(path)

    def model_path(self, role: str) -> str:
        """Local folder or hub id of the model that plays `role` in this profile (tiny models are built on demand)."""
        from .models import resolve

        return resolve(role, self)


def setup(profile: str = "tiny", seed: int = 0, recipe: str = "", quiet: bool = False) -> RunContext:
    """One call at the top of every notebook: load the recipe, seed, set display defaults. Nothing here imports
    torch: the device is picked when first asked for, and the setup line names it only when torch is loaded."""
    root = repo_root()
    loaded = load_recipe(recipe or profile, root)
    if loaded.profile != profile:
        raise ValueError(f"notebook profile {profile!r} disagrees with recipe {loaded.path.name} "
                         f"(profile {loaded.profile!r}); pass the matching recipe or profile")
    if profile != "paper":
        # tiny and small never touch a hub: fail fast instead of waiting on a network that is not there
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        _quiet_library_progress_bars()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if distributed.launched_world_size() > 1:
        distributed.leave_group_at_exit()  # a kernel that joins the launch's process group leaves it as it ends
    seed_everything(seed)
    _display_defaults()
    ctx = RunContext(profile=profile, seed=seed, recipe=loaded, root=root)
    if not quiet:
        device = (f" device={ctx.device} dtype={str(ctx.dtype).replace('torch.', '')}" if "torch" in sys.modules
                  else "")
        print(f"profile={profile} seed={seed}{device} recipe={loaded.parameters_for('')['recipe']}")
    return ctx


def _quiet_library_progress_bars() -> None:
    """Loading a tiny model takes milliseconds; its library progress bars would only clutter the page. Each
    library is quietened when it is (or once it gets) imported."""
    when_imported("datasets", lambda datasets: datasets.disable_progress_bars())
    for library in ("transformers", "diffusers"):
        when_imported(library, lambda module: importlib.import_module(f"{module.__name__}.utils.logging")
                      .disable_progress_bar())
    # (CLIP's per-batch "input was truncated" notices are filtered where prompts are encoded and counted instead:
    # helpers.speed.quiet_clip_truncation; every other diffusers warning still shows)


@contextmanager
def errors_only(library: str):
    """Inside: `library` ("transformers" or "diffusers") logs errors only, for a notice the caller expects and has
    no use for; the library's level before is restored afterwards, also on an exception."""
    if library not in ("transformers", "diffusers"):
        raise ValueError(f"errors_only({library!r}): only 'transformers' and 'diffusers' have a verbosity to set")
    library_logging = importlib.import_module(f"{library}.utils.logging")
    level = library_logging.get_verbosity()
    library_logging.set_verbosity_error()
    try:
        yield
    finally:
        library_logging.set_verbosity(level)


def _display_defaults() -> None:
    """Tables and figures that read well in the book."""
    try:
        import matplotlib

        matplotlib.rcParams.update({"figure.dpi": 100, "savefig.dpi": 100, "figure.figsize": (6, 3.5),
                                    "svg.hashsalt": "t2ibook"})
        import pandas as pd

        pd.set_option("display.max_colwidth", 80)
        pd.set_option("display.precision", 4)
    except ImportError:  # display niceties only
        pass
