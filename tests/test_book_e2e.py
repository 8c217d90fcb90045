"""End to end, as a new user: run every notebook in the tiny profile with `t2ibook run`, rerun (all skipped),
build the HTML book, check it loads nothing from other hosts, and open a widget page in headless Chromium; a
second clone run alongside must write the same files."""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from html.parser import HTMLParser
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import REPO, copy_repo

# The module's fixture runs the book; pytest-timeout counts it against the first test. Under `make test` the rest of
# the suite runs beside it, so on a slow 2-core machine it can pass the suite-wide 1500 s: these limits only catch a
# hang, well inside CI's 90 minutes.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(4200)]
T2IBOOK = [sys.executable, "-m", "helpers.cli"]
# Fake secrets in the environment of every run: they must not reach any file the book writes.
SECRETS = {"CIVITAI_API_TOKEN": "fake-civitai-token-3b9e1d", "OPENAI_API_KEY": "sk-fake-openai-key-51c0aa"}
NOTEBOOKS = sorted(p.stem for p in (REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))


# The book runs twice, in two clones side by side (a 2-core machine would otherwise sit half idle: tiny models
# spend their time in single-threaded Python). One torch thread each keeps the two from fighting over the cores;
# both use the same setting, so the second is a bit-for-bit check of the first.
ENV = {**SECRETS, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TIMEOUT_S = 3600


def _command(root: Path, *args: str) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ, "T2IBOOK_ROOT": str(root), **ENV}
    env.pop("T2IBOOK_FORCE", None)
    return ([*T2IBOOK, *args, "--no-progress"] if args[0] == "run" else [*T2IBOOK, *args]), env


def _t2ibook(root: Path, *args: str) -> str:
    command, env = _command(root, *args)
    result = subprocess.run(command, cwd=root, env=env, text=True, capture_output=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, f"t2ibook {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def built_book(tmp_path_factory):
    root = copy_repo(tmp_path_factory.mktemp("clone") / "t2i-agent-book")
    twin = copy_repo(tmp_path_factory.mktemp("twin") / "t2i-agent-book")
    # the twin runs with the default recipe (no --config) while the first clone runs, reruns and builds
    command, env = _command(twin, "run")
    with open(twin / "run.log", "w") as log:
        twin_run = subprocess.Popen(command, cwd=twin, env=env, text=True, stdout=log, stderr=subprocess.STDOUT)
        try:
            first = _t2ibook(root, "run", "--config", "configs/tiny.yaml")
            second = _t2ibook(root, "run", "--config", "configs/tiny.yaml")
            _t2ibook(root, "book")
            twin_run.wait(timeout=TIMEOUT_S)
        finally:
            twin_run.kill()
    twin_output = (twin / "run.log").read_text()
    assert twin_run.returncode == 0, f"t2ibook run in the twin clone failed:\n{twin_output[-6000:]}"
    return {"root": root, "first": first, "second": second, "html": root / "_build" / "html", "twin": twin,
            "twin_output": twin_output}


def test_every_notebook_ran_then_a_rerun_skips_every_one(built_book):
    for stem in NOTEBOOKS:
        assert f"{stem}: done in" in built_book["first"]
        assert f"{stem}: up to date, skipped" in built_book["second"]
        assert (built_book["root"] / "book" / f"{stem}.ipynb").is_file()
    assert f"{len(NOTEBOOKS)} ran, 0 skipped" in built_book["first"]
    assert f"0 ran, {len(NOTEBOOKS)} skipped" in built_book["second"]


def test_executed_notebooks_hold_no_errors_and_stages_have_manifests(built_book):
    import nbformat

    for stem in NOTEBOOKS:
        executed = nbformat.read(built_book["root"] / "book" / f"{stem}.ipynb", as_version=4)
        errors = [o for c in executed.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, stem
    assert (built_book["root"] / "data" / "runs" / "tiny" / "00_setup" / "manifest.json").is_file()


def test_rrhf_keeps_its_showcase_images_and_removes_the_other_reward_images(built_book):
    from helpers.candidates import load_rows, showcase
    from helpers.t2i import ImageCache

    runs = built_book["root"] / "data" / "runs" / "tiny"
    counts = json.loads((runs / "07_rrhf" / "manifest.json").read_text())["counts"]
    rows = load_rows(runs / "07_rrhf" / "candidates.jsonl")
    cache = ImageCache(runs / "image_cache")
    shown = {candidate["image_keys"][0] for candidate in showcase(rows)["candidates"]}
    others = {key for row in rows for candidate in row["candidates"] for key in candidate["image_keys"]} - shown
    assert shown and all(cache.has(key) for key in shown)  # what the notebook draws its grid from
    assert counts["images_removed_once_scored"] == sum(not cache.has(key) for key in others) > len(others) / 2


def test_chatgen_evaluation_images_leave_the_cache_once_scored_and_embedded(built_book):
    import numpy as np

    from helpers.t2i import ImageCache

    runs = built_book["root"] / "data" / "runs" / "tiny"
    counts = json.loads((runs / "11_chatgen_evo" / "manifest.json").read_text())["counts"]
    cache = ImageCache(runs / "image_cache")
    embedded = set()
    for path in (runs / "image_cache" / "fid_features").rglob("*.npz"):
        embedded.update(np.load(path)["keys"].tolist())
    # every evaluation and reference image was embedded for FID; those drawn there are gone, features kept on disk
    assert len(embedded) >= counts["images"] / 2
    assert counts["images_removed_once_scored"] == sum(not cache.has(key) for key in embedded) > len(embedded) / 2


def test_agfsync_evaluation_keeps_only_the_images_its_page_shows(built_book):
    import pandas as pd

    from helpers.diffusion_dpo import grid_rows, transcript_row
    from helpers.t2i import ImageCache

    stage = built_book["root"] / "data" / "runs" / "tiny" / "13_diffusion_dpo"
    counts = json.loads((stage / "manifest.json").read_text())["counts"]
    cache = ImageCache(stage.parent / "image_cache")
    scores, bench = pd.read_csv(stage / "evaluation.csv"), pd.read_csv(stage / "benchmarks.csv")
    shown = set(grid_rows(scores)["key"]) | {transcript_row(bench)["key"]}
    assert shown and all(cache.has(key) for key in shown)  # the page's grid and TIFA transcript
    others = (set(scores["key"]) | set(bench["key"])) - shown
    assert counts["images_removed_once_scored"] == sum(not cache.has(key) for key in others) == len(others) > 0


def test_agfsync_training_sends_each_image_through_the_vae_once(built_book):
    stage = built_book["root"] / "data" / "runs" / "tiny" / "13_diffusion_dpo"
    manifest = json.loads((stage / "manifest.json").read_text())
    counts, trainer = manifest["counts"], manifest["params"]["trainer"]
    used = counts["models_trained"] * trainer["max_steps"] * trainer["train_batch_size"] * \
        trainer["gradient_accumulation_steps"] * 2  # winner and loser of every pair every model trained on
    # the models share candidate images and each crosses its pairs more than once: fewer encodes than images used
    assert 0 < counts["training_images_through_the_vae"] < used
    assert not (stage / "vae_posteriors").exists()  # gone once every model is trained


def test_cost_chapter_sizes_every_model_the_executor_can_download(built_book):
    import pandas as pd

    from helpers.t2i import ModelCatalog

    runs = built_book["root"] / "data" / "runs" / "tiny"
    catalog = ModelCatalog.from_dabench(runs / "04_build_dabench" / "dabench.jsonl")
    downloadable = {m.model_version_id for m in catalog.models if not m.is_base}
    downloadable |= {m.lora_base_version_id for m in catalog.models if m.lora_base_version_id}
    weights = pd.read_csv(runs / "14_cost_and_speed" / "catalog_weights.csv")
    assert weights["versions"].sum() == len(downloadable) > 0 and weights["GB"].gt(0).all()
    disk = pd.read_csv(runs / "14_cost_and_speed" / "disk_per_stage.csv")
    assert disk["GB"].gt(0).all() and disk["images"].sum() > 1_000_000


def test_no_secret_from_the_environment_reaches_a_file(built_book):
    written = [p for root in (built_book["root"], built_book["twin"]) for folder in ("data", "book", "_build")
               for p in (root / folder).rglob("*") if p.is_file()]
    assert len(written) > 100
    for path in written:
        content = path.read_bytes()
        for name, value in SECRETS.items():
            assert value.encode() not in content, f"{name} leaked into {path}"


def test_every_page_is_built(built_book):
    for stem in NOTEBOOKS:
        assert (built_book["html"] / "book" / f"{stem}.html").is_file()
    assert (built_book["html"] / "book" / "intro.html").is_file()


class _Assets(HTMLParser):
    """Collects every URL a page would load by itself: scripts, stylesheets, fonts, icons, images, frames."""

    def __init__(self):
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("script", "img", "iframe", "audio", "video", "source") and attrs.get("src"):
            self.urls.append(attrs["src"])
        if tag == "link" and attrs.get("href") and set((attrs.get("rel") or "").split()) & {
                "stylesheet", "preload", "icon", "modulepreload", "prefetch", "font"}:
            self.urls.append(attrs["href"])


EXTERNAL = re.compile(r"^(https?:)?//", re.IGNORECASE)
CSS_URL = re.compile(r"""(?:url\(\s*['"]?|@import\s+['"])((?:https?:)?//[^'")\s]+)""", re.IGNORECASE)


def test_no_page_or_stylesheet_loads_anything_from_another_host(built_book):
    offenders = []
    for page in built_book["html"].rglob("*.html"):
        parser = _Assets()
        parser.feed(page.read_text(errors="replace"))
        offenders += [f"{page.name}: {u}" for u in parser.urls if EXTERNAL.match(u)]
    for sheet in built_book["html"].rglob("*.css"):
        offenders += [f"{sheet.name}: {u}" for u in CSS_URL.findall(sheet.read_text(errors="replace"))]
    assert not offenders, offenders


def test_launch_buttons_open_the_source_notebooks(built_book):
    page = (built_book["html"] / "book" / "00_setup.html").read_text()
    assert "colab.research.google.com/github/" in page and "mybinder.org/v2/gh/" in page
    assert "blob/main/notebooks/00_setup.ipynb" in page and "lab/tree/notebooks/00_setup.ipynb" in page
    assert "blob/main/book/00_setup.ipynb" not in page


# Raw pages and the crawl checkpoint record the local server's address, a free port that differs per run.
ADDRESS_BOUND = re.compile(r"^(pages/|checkpoint\.json$)")


def _outputs(runs: Path) -> dict:
    """{manifest: output hashes} of every stage and model built in the tiny run (address-bound files aside)."""
    return {p.parent.relative_to(runs).as_posix(): {k: v for k, v in json.loads(p.read_text())["outputs"].items()
                                                    if not ADDRESS_BOUND.match(k)}
            for p in sorted(runs.rglob("manifest.json"))}


def test_a_second_clone_builds_the_same_files_bit_for_bit(built_book):
    assert all(f"{stem}: done in" in built_book["twin_output"] for stem in NOTEBOOKS)
    runs, twin_runs = built_book["root"] / "data" / "runs", built_book["twin"] / "data" / "runs"
    assert (twin_runs / "tiny" / "00_setup" / "manifest.json").is_file()  # the default recipe is the tiny one
    assert (twin_runs / "tiny" / "models" / "agent_llm" / "model.safetensors").is_file()
    first, twin = _outputs(runs), _outputs(twin_runs)
    assert len(twin) > len(NOTEBOOKS) and twin == first  # same seeds, same files


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs it with `apt-get install -y chromium`")
        pytest.skip("no chromium on PATH (install Debian's `chromium` to run the browser test)")
    return found


@pytest.fixture(scope="module")
def served_book(built_book):
    handler = functools.partial(_QuietHandler, directory=str(built_book["html"]))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    executable = _chromium()
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield launched
        launched.close()


def _open(browser, url):
    """Open `url`; return the page and the list of failed or non-local requests seen while it loaded."""
    page = browser.new_page()
    problems = []
    page.on("requestfailed", lambda r: problems.append(f"failed: {r.url} ({r.failure})"))
    page.on("response", lambda r: r.status >= 400 and problems.append(f"HTTP {r.status}: {r.url}"))
    page.on("request", lambda r: not r.url.startswith(("http://127.0.0.1", "data:", "blob:"))
            and problems.append(f"external: {r.url}"))
    page.goto(url, wait_until="networkidle")
    return page, problems


def test_widget_renders_from_saved_state_and_works_without_a_kernel(browser, served_book):
    from playwright.sync_api import expect

    page, problems = _open(browser, f"{served_book}/book/00_setup.html")
    buttons = page.locator(".widget-toggle-buttons button")
    expect(buttons).to_have_count(3, timeout=20000)
    expect(buttons.nth(0)).to_have_text("tiny")
    expect(page.locator(".widget-vbox .widget-html table")).to_have_count(1)  # the Stack shows its selected page
    shown = page.locator(".widget-vbox .widget-html:visible")
    expect(shown).to_contain_text("tiny:llama")
    buttons.nth(2).click()  # "paper": the jslink flips the stack in the browser, no kernel involved
    expect(shown).to_contain_text("meta-llama/Llama-2-7b-hf", timeout=10000)
    page.wait_for_load_state("networkidle")
    page.close()
    assert not problems, problems


def test_math_renders_with_the_vendored_mathjax(browser, served_book):
    page, problems = _open(browser, f"{served_book}/book/intro.html")
    page.locator("mjx-container").first.wait_for(timeout=20000)
    page.wait_for_load_state("networkidle")
    page.close()
    assert not problems, problems


_VISIBLE_IMAGE_PIXELS = """() => Array.from(document.querySelectorAll('.widget-image')).filter(e => e.offsetParent)
    .map(img => { const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
                  c.getContext('2d').drawImage(img, 0, 0); return c.toDataURL(); })"""


def test_pair_browser_flips_to_another_image_without_a_kernel(browser, served_book):
    from playwright.sync_api import expect

    page, problems = _open(browser, f"{served_book}/book/09_user_study.html")
    handle = page.locator(".widget-slider .noUi-handle")
    expect(handle).to_have_count(1, timeout=20000)
    page.wait_for_function("() => Array.from(document.querySelectorAll('.widget-image'))"
                           ".filter(e => e.offsetParent && e.complete && e.naturalWidth > 0).length >= 4")
    before = page.evaluate(_VISIBLE_IMAGE_PIXELS)[-2:]  # the browser's pair (the voting app's pair comes first)
    handle.focus()
    page.keyboard.press("ArrowRight")  # the jslink moves the Stack to the next pair in the browser itself
    page.wait_for_function("() => Array.from(document.querySelectorAll('.widget-image'))"
                           ".filter(e => e.offsetParent && e.complete && e.naturalWidth > 0).length >= 4")
    after = page.evaluate(_VISIBLE_IMAGE_PIXELS)[-2:]
    page.close()
    assert len(before) == len(after) == 2 and before != after
    assert not problems, problems
