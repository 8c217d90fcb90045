"""Build the static HTML book (Jupyter Book 1) from the executed notebooks, with vendored browser code."""
from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import yaml

from .config import repo_root

VENDOR_OUT = Path("vendor") / "extra" / "vendored"  # served at <html root>/vendored/ (html_extra_path)


def _integrity(path: Path) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


def vendor_js(root: Path | None = None, force: bool = False) -> Path:
    """Fetch the pinned npm tarballs (require.js, widget manager, MathJax), verify them, unpack what the book serves."""
    root = root or repo_root()
    spec = json.loads((root / "vendor" / "packages.json").read_text())
    out = root / VENDOR_OUT
    stamp = out / ".packages.json"
    if not force and stamp.is_file() and json.loads(stamp.read_text()) == spec:
        shutil.copy2(root / "vendor" / "require-config.js", out / "require-config.js")  # ours: may have changed
        return out
    if shutil.which("npm") is None:
        raise RuntimeError("npm is not on PATH; install Node.js + npm (the book vendors its JavaScript with `npm pack`)")
    cache = root / "vendor" / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for package in spec["packages"]:
        packed = json.loads(subprocess.run(["npm", "pack", package["spec"], "--json", "--pack-destination", str(cache)],
                                           check=True, capture_output=True, text=True, cwd=cache).stdout)
        tarball = cache / packed[0]["filename"]
        if _integrity(tarball) != package["integrity"]:
            raise RuntimeError(f"{tarball.name}: integrity {_integrity(tarball)} differs from the pinned "
                               f"{package['integrity']} in vendor/packages.json; refusing to vendor it")
        with tarfile.open(tarball) as archive, tempfile.TemporaryDirectory() as unpacked:
            archive.extractall(unpacked, filter="data")
            for source, target in package["copy"].items():
                src, dst = Path(unpacked) / source, out / target
                dst.parent.mkdir(parents=True, exist_ok=True)
                if source.endswith("/"):
                    shutil.copytree(src, dst)
                else:
                    shutil.copy2(src, dst)
    shutil.copy2(root / "vendor" / "require-config.js", out / "require-config.js")
    stamp.write_text(json.dumps(spec))
    return out


def toc_files(root: Path) -> list[Path]:
    """Every page `_toc.yml` lists (root, chapters, sections), as paths without suffix."""
    toc = yaml.safe_load((root / "_toc.yml").read_text())
    pages = [toc["root"]]

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                pages.append(entry["file"])
            walk(entry.get("sections"))
            for part in entry.get("parts", []):
                walk(part.get("chapters"))

    walk(toc.get("chapters"))
    for part in toc.get("parts", []):
        walk(part.get("chapters"))
    return [Path(p) for p in pages]


def missing_pages(root: Path) -> list[str]:
    """Pages in `_toc.yml` with neither a .md nor an executed .ipynb on disk."""
    return [p.as_posix() for p in toc_files(root)
            if not any((root / p).with_suffix(s).is_file() for s in (".md", ".ipynb"))]


def build_book(root: Path | None = None, strict: bool = True) -> Path:
    """`jupyter-book build` of the repo root into `_build/html` (warnings are errors with `strict`)."""
    root = root or repo_root()
    if missing := missing_pages(root):
        raise FileNotFoundError(f"_toc.yml lists pages that do not exist yet: {missing}; run `t2ibook run` first "
                                "(executed notebooks are written to book/)")
    vendor_js(root)
    # Sphinx never overwrites an html_extra_path file already in the output, and copies none when no page is
    # out of date: drop the old copy and rebuild every page (seconds for this book) so edits always arrive.
    shutil.rmtree(root / "_build" / "html" / VENDOR_OUT.name, ignore_errors=True)
    command = [sys.executable, "-c", "from jupyter_book.cli.main import main; main()", "build", str(root),
               "--builder", "html", "--all"]
    if strict:
        command += ["-W", "-n", "--keep-going"]
    result = subprocess.run(command, cwd=root, text=True, capture_output=True)
    sys.stdout.write(result.stdout[-4000:])
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-8000:])
        raise RuntimeError(f"jupyter-book build failed (exit {result.returncode}); see the warnings above")
    return root / "_build" / "html"
