"""Run the numbered notebooks in order with papermill, incrementally, stopping at the first failure."""
from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat

from .config import Recipe, repo_root
from .distributed import is_main_process, launched_rank, launched_world_size
from .manifest import MANIFEST, atomic_write_json, hash_tree, sha256_file, sha256_json

NOTEBOOK_NAME = re.compile(r"^(\d\d)_[a-z0-9_]+\.ipynb$")
STATE_DIR = "_runner"


class NotebookFailed(RuntimeError):
    """A notebook raised: names the executed copy and the failing cell."""


@dataclass
class NotebookResult:
    stem: str
    status: str  # "ran" or "skipped"
    seconds: float
    output: Path


def discover(root: Path, first: str | None = None, last: str | None = None) -> list[Path]:
    """`notebooks/NN_*.ipynb` in numeric order, limited to NN in [first, last]."""
    found = sorted(p for p in (root / "notebooks").glob("*.ipynb") if NOTEBOOK_NAME.match(p.name))
    if not found:
        raise FileNotFoundError(f"no notebooks matching NN_name.ipynb under {root / 'notebooks'}")
    numbers = {p.name[:2] for p in found}
    for bound in (first, last):
        if bound is not None and f"{int(bound):02d}" not in numbers:
            raise ValueError(f"no notebook numbered {bound!r}; available: {', '.join(sorted(numbers))}")
    lo = f"{int(first):02d}" if first is not None else "00"
    hi = f"{int(last):02d}" if last is not None else "99"
    return [p for p in found if lo <= p.name[:2] <= hi]


def parameters_cell(path: Path) -> nbformat.NotebookNode:
    """The one cell tagged `parameters` (an error if there is none or more than one)."""
    notebook = nbformat.read(path, as_version=4)
    cells = [c for c in notebook.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"{path.name} has {len(cells)} cells tagged 'parameters'; it needs exactly one")
    return cells[0]


def declared_parameters(path: Path) -> dict[str, Any]:
    """{name: papermill's description} for the parameters a notebook declares."""
    import papermill

    parameters_cell(path)
    return papermill.inspect_notebook(str(path))


def check_parameters(path: Path, parameters: dict[str, Any], recipe: Recipe) -> None:
    """Refuse parameters the notebook does not declare (papermill would only warn and ignore them)."""
    declared = declared_parameters(path)
    unknown = sorted(set(parameters) - set(declared))
    if unknown:
        raise ValueError(f"{recipe.path.name} passes {unknown} to {path.name}, whose parameters cell declares only "
                         f"{sorted(declared)}; fix the recipe's notebooks.{path.stem} section or add the parameter")


def _source_hash(path: Path) -> str:
    """Hash of a notebook's cells (type, source, tags): what decides its outputs, not its saved outputs."""
    notebook = nbformat.read(path, as_version=4)
    return sha256_json([(c.cell_type, c.source, c.get("metadata", {}).get("tags", [])) for c in notebook.cells])


def _helpers_hash() -> str:
    package = Path(__file__).resolve().parent
    return sha256_json(hash_tree(package, package))


def _owned_manifests(runs_dir: Path, number: str) -> dict[str, str]:
    """{relative path: sha256} of the manifests notebook NN owns: everything under `data/runs/<profile>/NN_*/`."""
    return {p.relative_to(runs_dir).as_posix(): sha256_file(p)
            for p in sorted(runs_dir.glob(f"{number}_*/**/{MANIFEST}"))}


def _upstream(runs_dir: Path, number: str) -> dict[str, Any]:
    """What earlier numbered stages produced (fingerprints and output hashes), so a change there reruns this one."""
    upstream = {}
    for manifest_path in sorted(runs_dir.glob(f"[0-9][0-9]_*/{MANIFEST}")):
        if manifest_path.parent.name[:2] < number:
            manifest = json.loads(manifest_path.read_text())
            upstream[manifest_path.parent.name] = [manifest.get("fingerprint"), manifest.get("outputs")]
    return upstream


def run_key(path: Path, parameters: dict[str, Any], runs_dir: Path) -> str:
    """Everything that decides a notebook's result: its cells, its parameters, the helpers, upstream stages."""
    return sha256_json({"notebook": _source_hash(path), "parameters": parameters, "helpers": _helpers_hash(),
                        "upstream": _upstream(runs_dir, path.name[:2])})


def is_up_to_date(state_file: Path, key: str, output: Path, runs_dir: Path) -> bool:
    """The last run had this key, its executed copy is untouched and the manifests it left are intact."""
    if not (state_file.is_file() and output.is_file()):
        return False
    state = json.loads(state_file.read_text())
    if state.get("key") != key or state.get("executed_sha256") != sha256_file(output):
        return False
    for relative, digest in state.get("manifests", {}).items():
        manifest = runs_dir / relative
        if not manifest.is_file() or sha256_file(manifest) != digest:
            return False
    return True


def _finalise(output: Path, root: Path) -> None:
    """Tag papermill's injected cell `remove-cell` (the book shows the notebook, not the injection) and keep
    only repo-relative paths in the metadata, so executed copies do not depend on where the clone lives."""
    notebook = nbformat.read(output, as_version=4)
    papermill_meta = notebook.metadata.get("papermill", {})
    for key in ("input_path", "output_path"):
        if papermill_meta.get(key):
            papermill_meta[key] = Path(papermill_meta[key]).resolve().relative_to(root).as_posix()
    for cell in notebook.cells:
        tags = cell.get("metadata", {}).get("tags", [])
        if "injected-parameters" in tags and "remove-cell" not in tags:
            cell.metadata["tags"] = [*tags, "remove-cell"]
    nbformat.write(notebook, output)


def _failure_message(path: Path, output: Path, error: Exception, root: Path) -> str:
    cell = getattr(error, "exec_count", None)
    source = (getattr(error, "source", "") or "").strip().splitlines()
    first_line = source[0] if source else ""
    what = f"{getattr(error, 'ename', type(error).__name__)}: {getattr(error, 'evalue', error)}"
    # a non-main process of a launch keeps its executed copy in a scratch folder outside the book
    shown = output.relative_to(root) if output.is_relative_to(root) else output
    return (f"{path.name} failed in cell [{cell}] ({first_line!r}): {what}\n"
            f"executed copy with the full traceback: {shown}")


def ipc_kernel_manager(folder: Path):
    """A kernel-manager class whose kernels talk over Unix sockets in `folder` (a private temporary folder), not
    over unencrypted local TCP ports, which the kernel warns about on every start."""
    from jupyter_client.manager import AsyncKernelManager

    class IpcKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs):
            super().__init__(transport="ipc", ip=str(folder / "kernel"), **kwargs)

    return IpcKernelManager


def _process_group_env(index: int) -> dict[str, str]:
    """Under a multi-process launch: a rendezvous of its own for each notebook's kernels.

    Every notebook runs in a fresh kernel per process, and each kernel joins a process group when it first
    shards work. A store left from the previous notebook's kernels (torchrun keeps one in its agent) would
    hold their keys, so each notebook gets the next port and rank 0's kernel hosts the store.
    """
    if launched_world_size() == 1:
        return {}
    base = int(os.environ.get("T2IBOOK_BASE_MASTER_PORT") or os.environ.get("MASTER_PORT") or 29500)
    os.environ.setdefault("T2IBOOK_BASE_MASTER_PORT", str(base))
    return {"MASTER_PORT": str(base + index), "TORCHELASTIC_USE_AGENT_STORE": "False"}


def run_notebooks(recipe: Recipe, first: str | None = None, last: str | None = None, force: bool = False,
                  root: Path | None = None, out_dir: Path | None = None, progress: bool = True) -> list[NotebookResult]:
    """Execute notebooks [first, last] in order into `book/`, skipping those whose inputs are unchanged."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    root = (root or repo_root()).resolve()
    out_dir = out_dir or root / "book"
    runs_dir = root / "data" / "runs" / recipe.profile
    notebooks = discover(root, first, last)
    planned = [(path, recipe.parameters_for(path.stem, root)) for path in notebooks]
    for path, parameters in planned:  # validate every notebook before running any
        check_parameters(path, parameters, recipe)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {"T2IBOOK_ROOT": str(root), "PYTHONHASHSEED": "0", **({"T2IBOOK_FORCE": "1"} if force else {})}
    results = []
    # under `accelerate launch` every process runs every notebook (see helpers.distributed); the others decide
    # what to skip from the main process's files and write their executed copies into a scratch folder
    main = is_main_process()
    scratch = None if main else Path(tempfile.mkdtemp(prefix=f"t2ibook-rank{launched_rank()}-"))
    for index, (path, parameters) in enumerate(planned, 1):
        book_copy = out_dir / path.name
        output = book_copy if main else scratch / path.name
        state_file = runs_dir / STATE_DIR / f"{path.stem}.json"
        key = run_key(path, parameters, runs_dir)
        label = f"[{index}/{len(planned)}] {path.stem}"
        if not force and is_up_to_date(state_file, key, book_copy, runs_dir):
            print(f"{label}: up to date, skipped", flush=True)
            results.append(NotebookResult(path.stem, "skipped", 0.0, output))
            continue
        print(f"{label}: running ({recipe.profile} profile)", flush=True)
        started = time.time()
        kernel_env = {**env, **_process_group_env(index)}
        before = {k: os.environ.get(k) for k in kernel_env}
        os.environ.update(kernel_env)  # the kernel inherits the runner's environment
        try:
            with tempfile.TemporaryDirectory(prefix="t2ibook-kernel-") as sockets:
                papermill.execute_notebook(str(path), str(output),
                                           parameters=parameters, kernel_name="python3", cwd=str(root / "notebooks"),
                                           progress_bar={"desc": path.stem, "leave": False} if progress else False,
                                           request_save_on_cell_execute=True,
                                           kernel_manager_class=ipc_kernel_manager(Path(sockets)))
        except PapermillExecutionError as error:
            raise NotebookFailed(_failure_message(path, output, error, root)) from None
        finally:
            for name, value in before.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        seconds = time.time() - started
        if not main:
            results.append(NotebookResult(path.stem, "ran", seconds, output))
            continue
        _finalise(output, root)
        atomic_write_json(state_file, {"key": key, "executed_sha256": sha256_file(output), "seconds": round(seconds, 2),
                                       "manifests": _owned_manifests(runs_dir, path.name[:2])})
        print(f"{label}: done in {seconds:.1f} s -> {output.relative_to(root)}", flush=True)
        results.append(NotebookResult(path.stem, "ran", seconds, output))
    return results
