"""Stage manifests: what a stage computed from what, so a rerun with the same inputs is skipped."""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Sequence

from .display import say
from .distributed import in_shard, is_main_process, launched_rank, launched_world_size

MANIFEST = "manifest.json"
MANIFEST_POLL_S = 0.2  # how often a non-main process looks for the main process's manifest
# Libraries whose version changes what a stage computes; part of the fingerprint.
KEY_LIBRARIES = ("torch", "transformers", "diffusers", "trl", "datasets", "peft", "accelerate", "tokenizers")
_HASH_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_json(value: Any) -> str:
    """Hex SHA-256 of a JSON-serialisable value with sorted keys (stable across runs)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def hash_tree(path: Path, root: Path | None = None, skip: Iterable[str] = (MANIFEST,)) -> dict[str, str]:
    """{relative path: sha256} for a file, or for every file under a folder (sorted, `skip` names left out)."""
    path = Path(path)
    root = Path(root) if root else (path if path.is_dir() else path.parent)
    if not path.exists():
        raise FileNotFoundError(f"stage input {path} does not exist; run the stage that writes it first")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {_relative(p, root): sha256_file(p) for p in files if p.name not in skip and "__pycache__" not in p.parts}


def _relative(path: Path, root: Path) -> str:
    # the link's own place first: a file linked in from another stage's folder (tiny checkpoints share their
    # base pipeline's files) is named where it sits, not by its target's absolute path, which differs per clone
    for leaf, base in ((path.absolute(), root.absolute()), (path.resolve(), root.resolve())):
        try:
            return leaf.relative_to(base).as_posix()
        except ValueError:
            continue
    return path.as_posix()


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so a crash leaves either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Rows as JSON lines (sorted keys, so equal rows give equal bytes), written atomically."""
    atomic_write_text(Path(path), "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))


def atomic_write_json(path: Path, value: Any) -> None:
    """`atomic_write_text` for JSON (indented, sorted keys, trailing newline)."""
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")


class Landed(NamedTuple):
    """Where `append_lines` put its lines: the file (device, inode), the offsets of their first byte and of the byte
    after the last, and the last line as bytes (newline included)."""
    file: tuple[int, int]
    start: int
    end: int
    last_line: bytes


def append_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> Landed | None:
    """Append rows as JSON lines in one write, flushed and fsynced: a crash loses at most the row being written.
    After such a crash the file ends in a torn line; the rows appended next start on a line of their own, so that
    only the torn row is lost, not also the first row written after it (readers skip the torn line).
    Returns where the rows landed (`append_lines`)."""
    return append_lines(path, [json.dumps(row, sort_keys=True) for row in rows])


def append_lines(path: Path, lines: Iterable[str], fsync: bool = True) -> Landed | None:
    """Append lines in one write, after a newline where the file ends in a torn line (`append_jsonl`); flushed,
    and fsynced unless `fsync` is False (a record people read, written for every image drawn). Returns where the
    lines landed, so that a reader that wrote them need not read them back (`scoring.ScoreCache`); None when there
    was nothing to write."""
    lines = [line + "\n" for line in lines]
    if not lines:
        return None
    data = "".join(lines).encode()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:  # every write goes to the end; reading checks the last byte
        end = handle.seek(0, os.SEEK_END)
        torn = False
        if end:
            handle.seek(end - 1)
            torn = handle.read(1) != b"\n"
        handle.write(b"\n" + data if torn else data)  # one write
        handle.flush()
        if fsync:
            os.fsync(handle.fileno())
        after = handle.tell()  # the end of this write, even where another writer appended in between
        stat = os.fstat(handle.fileno())
    return Landed((stat.st_dev, stat.st_ino), after - len(data), after, lines[-1].encode())


def without_timings(log_history: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """A Trainer's log without wall-clock fields (runtime, per-second rates), so reruns write identical files."""
    return [{k: v for k, v in row.items() if not k.endswith(("runtime", "_per_second", "_time"))}
            for row in log_history]


RESUME_IDENTITY = "resume_identity.json"


def _cell_bytes(value: Any) -> bytes:
    """A dataset cell as bytes for a fingerprint: a PIL image's pixels, an undecoded `datasets` Image cell's
    file bytes (or its path), anything else as JSON."""
    if hasattr(value, "tobytes") and hasattr(value, "mode"):  # a PIL image
        return f"{value.mode}{value.size}".encode() + value.tobytes()
    if isinstance(value, dict) and set(value) == {"bytes", "path"}:  # a datasets Image cell, not decoded
        return value["bytes"] if value["bytes"] is not None else str(value["path"]).encode()
    return json.dumps(value, sort_keys=True, default=str).encode()


def rows_fingerprint(rows, columns: Sequence[str] | None = None, batch_size: int = 256) -> str:
    """SHA-256 of a dataset's `columns` (all of them by default): a `datasets.Dataset`, read as Arrow batches so
    images are hashed as their stored bytes, never decoded, and memory stays flat; or a list of dicts."""
    is_dataset = hasattr(rows, "column_names") and hasattr(rows, "with_format")
    names = list(columns) if columns is not None else (
        sorted(rows.column_names) if is_dataset else sorted(rows[0]) if len(rows) else [])
    digest = hashlib.sha256(json.dumps([len(rows), names]).encode())

    def add(value: Any) -> None:
        data = _cell_bytes(value)
        digest.update(len(data).to_bytes(8, "little") + data)

    if is_dataset:
        for batch in rows.with_format("arrow").iter(batch_size=batch_size):
            for row in batch.select(names).to_pylist():
                for name in names:
                    add(row[name])
    else:
        for row in rows:
            for name in names:
                add(row[name])
    return digest.hexdigest()


def resume_point(folder: Path, identity: Any, find: Callable[[Path], Path | str | None]) -> str | None:
    """Where a training run continues after a crash: `find(folder)`, the newest resume point in `folder`, if the
    resume points there were left by the same training; else None (start from step 0).

    `identity` is what decides the training: its settings and a fingerprint of its data (JSON-serialisable).
    Resume points of other training (a setting or the data changed since) are removed with a note, so a changed
    run never continues an old one. Under a multi-process launch the main process's folder decides (only the main
    process writes checkpoints) and every process gets its answer; every process must call this.
    """
    from .distributed import broadcast_from_main

    found = None
    if is_main_process():
        folder, wanted = Path(folder), sha256_json(identity)
        marker = folder / RESUME_IDENTITY
        if folder.is_dir() and any(item.name != RESUME_IDENTITY for item in folder.iterdir()):
            left = json.loads(marker.read_text()).get("identity") if marker.is_file() else None
            if left != wanted:
                say(f"Note: {folder} holds resume points of other training (its settings or data differ from "
                    "this run's); they are removed and training starts from step 0.")
                shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(marker, {"identity": wanted, "settings": identity})
        hit = find(folder)
        found = str(Path(hit).resolve()) if hit else None
    return broadcast_from_main(found)


def read_jsonl_rows(path: Path) -> list[dict[str, Any]]:
    """The readable JSON lines of an append-only file; a torn last line (a crash mid-write) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    with open(path) as handle:  # line by line: a file of replies or votes is never held whole beside its rows
        for line in handle:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that shape results, plus Python's."""
    versions = {"python": platform.python_version()}
    for name in KEY_LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def git_commit(root: Path) -> str:
    """`<sha>` of HEAD, with `+dirty` when the tree has changes; `unknown` outside a checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def module_hashes(modules: Iterable[str]) -> dict[str, str]:
    """{module: sha256 of its source file}: a stage names the code whose change must recompute it."""
    hashes = {}
    for name in modules:
        source = importlib.import_module(name).__file__
        hashes[name] = sha256_file(Path(source))
    return hashes


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest in `folder`, or None when there is none (never run, or it crashed before finishing)."""
    path = Path(folder) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


class Stage:
    """One stage's folder and manifest.

    The fingerprint covers the parameters, the input files' hashes, the named code and the versions of
    the key libraries; the git commit and the wall time are recorded but do not invalidate a stage.
    """

    def __init__(self, folder: Path, name: str, params: dict[str, Any], inputs: Iterable[Path] = (),
                 code: Iterable[str] = (), root: Path | None = None, profile: str = "", main_only: bool = False):
        self.folder = Path(folder)
        # under a multi-process launch the other processes wait for the main one's result instead of computing it
        # too: for a stage with no sharded step whose work must happen once (a crawl of a public API: one client,
        # not one per GPU)
        self.main_only = main_only
        self.name = name
        self.params = dict(params)
        self.inputs = [Path(p) for p in inputs]
        self.code = list(code)
        self.root = Path(root) if root else self.folder.parent
        self.profile = profile

    def _parts(self) -> dict[str, Any]:
        """What the fingerprint covers: parameters, input hashes, code hashes, key library versions."""
        inputs: dict[str, str] = {}
        for path in self.inputs:
            inputs.update(hash_tree(path, self.root))
        versions = {k: v for k, v in library_versions().items() if k != "python"}
        return {"params": self.params, "inputs": inputs, "code": module_hashes(self.code), "versions": versions}

    def fingerprint(self) -> str:
        """Hash of everything that decides what this stage computes."""
        return sha256_json(self._parts())

    @property
    def manifest(self) -> dict[str, Any] | None:
        return read_manifest(self.folder)

    def is_current(self, fingerprint: str | None = None) -> bool:
        """True when a finished manifest matches the current fingerprint and `T2IBOOK_FORCE` is not set."""
        if os.environ.get("T2IBOOK_FORCE") == "1":
            return False
        manifest = self.manifest
        return bool(manifest) and manifest.get("fingerprint") == (fingerprint or self.fingerprint())

    quiet = False  # model builds set this: a reader needs no line per model built or found up to date

    def run(self, compute: Callable[..., dict[str, Any] | None], *args, **kwargs) -> dict[str, Any]:
        """Call `compute(folder, *args, **kwargs)` unless the stage is current; return the manifest.

        `compute` writes its files into `folder` and returns counts for the manifest (e.g. `{"models": 3}`).
        The old manifest is removed first, so a crash never leaves a manifest that claims finished work.
        """
        parts = self._parts()  # inputs and code are hashed once per run
        fingerprint = sha256_json(parts)
        if self.is_current(fingerprint):
            if self.quiet:
                return self.manifest
            say(f"[{self.name}] up to date (manifest {_relative(self.folder / MANIFEST, self.root)}), skipped")
            return self.manifest
        if launched_world_size() > 1 and in_shard():
            raise RuntimeError(f"stage {self.name} started inside one process's share of sharded work; the other "
                               "processes would not join it. Run it before sharding (see helpers.distributed)")
        if not is_main_process():
            if self.main_only:
                return self._main_manifest(fingerprint)
            return self._run_beside_main(fingerprint, compute, *args, **kwargs)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / MANIFEST).unlink(missing_ok=True)
        started = time.time()
        counts = compute(self.folder, *args, **kwargs) or {}
        manifest = {
            "stage": self.name,
            "profile": self.profile,
            "fingerprint": fingerprint,
            "params": self.params,
            "inputs": parts["inputs"],
            "code": parts["code"],
            "versions": library_versions(),
            "git_commit": git_commit(self.root),
            "started_at": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
            "wall_time_s": round(time.time() - started, 3),
            "counts": counts,
            "outputs": hash_tree(self.folder, self.folder),
        }
        # under a multi-process launch the other processes wait for this file (not at a barrier: one that reaches
        # the stage after it was written takes the stage as current and never arrives at a barrier)
        atomic_write_json(self.folder / MANIFEST, manifest)
        if not self.quiet:
            say(f"[{self.name}] done in {manifest['wall_time_s']:.1f} s: "
                + ", ".join(f"{name}={value!r}" for name, value in counts.items()))
        return manifest

    def _run_beside_main(self, fingerprint: str, compute: Callable[..., dict[str, Any] | None], *args,
                         **kwargs) -> dict[str, Any]:
        """A non-main process of a multi-process launch: compute the same work (its share of every sharded step)
        into a scratch folder, then return the manifest the main process writes for this fingerprint.

        The wait has no time limit: the main process may have work of its own left, and if it dies the launcher
        (torchrun, accelerate launch) stops every process.
        """
        with tempfile.TemporaryDirectory(prefix=f"{self.folder.name}-rank{launched_rank()}-") as scratch:
            compute(Path(scratch), *args, **kwargs)
        return self._main_manifest(fingerprint)

    def _main_manifest(self, fingerprint: str) -> dict[str, Any]:
        """The manifest the main process writes for `fingerprint`, once it is there (no time limit, see above)."""
        while True:
            manifest = self.manifest
            if manifest and manifest.get("fingerprint") == fingerprint:
                return manifest
            time.sleep(MANIFEST_POLL_S)


def summary(manifest: dict[str, Any]):
    """The headline fields of a manifest as a one-column DataFrame."""
    import pandas as pd

    rows = {"stage": manifest["stage"], "profile": manifest.get("profile", ""),
            "git commit": manifest["git_commit"][:12] + ("+dirty" if manifest["git_commit"].endswith("+dirty") else ""),
            "wall time (s)": manifest["wall_time_s"], "counts": manifest["counts"],
            "outputs": len(manifest["outputs"]), "parameters": manifest["params"],
            "versions": ", ".join(f"{k} {v}" for k, v in manifest["versions"].items())}
    return pd.DataFrame({"value": {k: str(v) for k, v in rows.items()}}).rename_axis("field")


def models_table(paths: dict[str, str], root: Path):
    """One row per model role: where it lives and what its build manifest recorded (hub ids have none)."""
    import pandas as pd

    rows = []
    for role, where in paths.items():
        built = read_manifest(Path(where)) if Path(where).is_dir() else None
        counts = (built or {}).get("counts", {})
        rows.append({"role": role, "location": _relative(Path(where), root) if Path(where).exists() else where,
                     "parameters": counts.get("parameters"), "build time (s)": (built or {}).get("wall_time_s"),
                     "files": len((built or {}).get("outputs", {})) or None})
    return pd.DataFrame(rows).set_index("role")
