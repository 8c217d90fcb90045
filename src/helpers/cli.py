"""`t2ibook`: the command-line face of the helpers (run the notebooks, build the book, ask the agent)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _run(args: argparse.Namespace) -> int:
    from .config import load_recipe
    from .runner import NotebookFailed, run_notebooks

    recipe = load_recipe(args.config)
    started = time.time()
    try:
        results = run_notebooks(recipe, first=args.first, last=args.last, force=args.force,
                                progress=not args.no_progress)
    except NotebookFailed as failure:
        print(f"t2ibook run: stopped. {failure}", file=sys.stderr)
        return 1
    ran = sum(r.status == "ran" for r in results)
    print(f"t2ibook run: {ran} ran, {len(results) - ran} skipped (up to date), {time.time() - started:.1f} s")
    return 0


def _book(args: argparse.Namespace) -> int:
    from .book import build_book

    html = build_book(strict=not args.no_strict)
    print(f"t2ibook book: open {html / 'index.html'}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from .civitai_catalog import Catalog, CatalogSpec
    from .civitai_server import Faults, LocalCivitai

    faults = Faults(p_429=args.fault_rate, p_500=args.fault_rate, p_drop=args.fault_rate, retry_after=1.0,
                    malformed_pages=3 if args.fault_rate else 0, seed=args.seed)
    server = LocalCivitai(Catalog(CatalogSpec(num_models=args.num_models, seed=args.seed)), args.host, args.port, faults)
    print(f"local Civitai API at {server.url} ({args.num_models} models, faults {'on' if faults.active else 'off'}); "
          "Ctrl-C stops it", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.stop()
    return 0


def _crawl(args: argparse.Namespace) -> int:
    import contextlib

    from .civitai import CivitaiClient, crawl
    from .civitai_server import LocalCivitai

    with contextlib.ExitStack() as stack:
        base_url = args.base_url
        if base_url == "local":  # an in-process local server, for trying the crawler without one running
            base_url = stack.enter_context(LocalCivitai()).url
        client = CivitaiClient(base_url, min_interval=args.min_interval, timeout=args.timeout)
        summary = crawl(client, Path(args.out), max_models=args.max_models, images_per_model=args.images_per_model,
                        types=args.types, base_models=args.base_models, restart=args.restart)
    print(f"t2ibook crawl: {summary}")
    return 0 if summary["finished"] else 1


def _build_dabench(args: argparse.Namespace) -> int:
    from . import dabench
    from .textgen import make_generator

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = dabench.FilterConfig(min_downloads=args.min_downloads, min_positive_share=args.min_positive_share)
    print(f"filter: {dabench.run_filter(out, Path(args.raw), cfg)}")
    options = {"model_path": args.model} if args.backend == "transformers" else (
        {"base_url": args.endpoint, "model": args.endpoint_model, "cache": out / "openai_replies.jsonl"}
        if args.backend == "openai" else {})  # a rerun after a failure does not ask the endpoint twice
    generator = make_generator(args.backend, **options)
    print(f"rewrite ({generator.name}): {dabench.run_rewrite(out, Path(args.raw), out / 'pairs.jsonl', generator)}")
    provenance = {"source": str(Path(args.raw)), "backend": generator.name, "stand_in": generator.is_stand_in,
                  "seed": args.seed}
    counts = dabench.run_assemble(out, out / "pairs.jsonl", out / "descriptions.jsonl", args.seed, provenance)
    print(f"t2ibook build-dabench: {counts}; wrote {out / 'dabench.jsonl'} and {out / 'dataset'}")
    return 0


def _suggest(args: argparse.Namespace) -> int:
    import json

    from . import config
    from .agent import Agent, default_agent_path, suggest
    from .t2i import ModelCatalog

    if not args.prompt.strip():
        print('t2ibook suggest: the prompt is empty; describe the image, e.g. t2ibook suggest "a cute corgi, pixel art"',
              file=sys.stderr)
        return 2
    ctx = config.setup(args.profile, args.seed, quiet=True)
    dabench_path = ctx.runs_dir / "04_build_dabench" / "dabench.jsonl"
    try:
        path = Path(args.model) if args.model else default_agent_path(ctx.runs_dir)
        if not dabench_path.is_file():
            raise FileNotFoundError(f"no DABench at {dabench_path} to check the call against; run notebook 04 first "
                                    f"(t2ibook run --config configs/{args.profile}.yaml --to 04)")
        catalog = ModelCatalog.from_dabench(dabench_path)
        result = suggest(Agent.for_run(path, ctx), args.prompt, catalog, args.max_new_tokens)
    except (FileNotFoundError, ValueError, OSError) as error:
        print(f"t2ibook suggest: {error}", file=sys.stderr)
        return 2
    checked = result["validation"]
    print(f"agent: {path}")
    if result["truncated"]:
        print("note: the prompt was longer than the agent's context and was cut to fit")
    print(json.dumps(checked.api, indent=2, ensure_ascii=False) if checked.ok else result["text"])
    print("verdict: ok, the executor can run this call" if checked.ok else
          f"verdict: hallucination ({checked.category}): {checked.detail}")
    if args.generate:
        return _draw_suggestion(ctx, catalog, checked, args)
    return 0


def _draw_suggestion(ctx, catalog, checked, args: argparse.Namespace) -> int:
    from .t2i import Executor, Request, default_api

    api = checked.api if checked.ok else default_api(catalog.base("SD 1.5"))
    if not checked.ok:
        print("generate: the call cannot run, so the image uses the baseline (SD 1.5, default parameters), as the "
              "paper's evaluation does")
    max_side = args.max_side if args.max_side is not None else (0 if ctx.profile == "paper" else 64)
    executor = Executor.for_run(ctx, catalog, max_side=max_side or None, batch_size=1)
    image = executor.generate([Request(api, args.prompt, "", args.seed)], progress=False)[0].image
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    print(f"generate: {api['model']} ({api['base_model']}), {api['sampling_method']}, {api['sampling_steps']} steps, "
          f"seed {args.seed}, {image.width}×{image.height} px -> {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t2ibook", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="execute notebooks/NN_*.ipynb in order with papermill into book/")
    run.add_argument("--config", default="configs/tiny.yaml", help="recipe: configs/<profile>.yaml or a path")
    run.add_argument("--from", dest="first", metavar="NN", help="first notebook number to run (e.g. 05)")
    run.add_argument("--to", dest="last", metavar="NN", help="last notebook number to run")
    run.add_argument("--force", action="store_true", help="rerun even when a stage's manifest says it is current")
    run.add_argument("--no-progress", action="store_true", help="no per-cell progress bar")
    run.set_defaults(handler=_run)

    book = commands.add_parser("book", help="build the HTML book into _build/html from the executed notebooks")
    book.add_argument("--no-strict", action="store_true", help="do not turn Sphinx warnings into errors")
    book.set_defaults(handler=_book)

    serve = commands.add_parser("civitai-serve", help="serve the generated Civitai-compatible catalog on 127.0.0.1")
    serve.add_argument("--port", type=int, default=8765)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--num-models", type=int, default=300)
    serve.add_argument("--seed", type=int, default=0)
    serve.add_argument("--fault-rate", type=float, default=0.0, help="chance of each of 429 / 500 / dropped connection")
    serve.set_defaults(handler=_serve)

    crawl = commands.add_parser("crawl", help="resumable crawl of models, images (with meta) and referenced hashes")
    crawl.add_argument("--base-url", required=True, help="https://civitai.com/api/v1, a local server's URL, or 'local'")
    crawl.add_argument("--out", required=True, help="folder for models.jsonl, images.jsonl, pages/ and the checkpoint")
    crawl.add_argument("--max-models", type=int, default=None)
    crawl.add_argument("--images-per-model", type=int, default=50)
    crawl.add_argument("--types", nargs="*", default=None, help="e.g. Checkpoint LORA (default: all)")
    crawl.add_argument("--base-models", nargs="*", default=None, help='e.g. "SD 1.5" "SDXL 1.0" (default: all)')
    crawl.add_argument("--min-interval", type=float, default=0.5, help="seconds between requests (politeness)")
    crawl.add_argument("--timeout", type=float, default=30.0)
    crawl.add_argument("--restart", action="store_true", help="discard a crawl made with other parameters")
    crawl.set_defaults(handler=_crawl)

    build = commands.add_parser("build-dabench", help="filter a crawl, rewrite descriptions, write DABench")
    build.add_argument("--raw", required=True, help="a crawl folder (t2ibook crawl --out)")
    build.add_argument("--out", required=True)
    build.add_argument("--backend", default="template", choices=["template", "transformers", "openai"])
    build.add_argument("--model", help="local model folder for --backend transformers")
    build.add_argument("--endpoint", help="OpenAI-compatible base URL for --backend openai (key: $OPENAI_API_KEY)")
    build.add_argument("--endpoint-model", help="model name at the endpoint")
    build.add_argument("--min-downloads", type=int, default=50)
    build.add_argument("--min-positive-share", type=float, default=0.0)
    build.add_argument("--seed", type=int, default=0, help="seed of the train/align/test split")
    build.set_defaults(handler=_build_dabench)
    _add_suggest(commands)
    _add_bench(commands)
    _add_disk(commands)
    return parser


def _add_bench(commands) -> None:
    bench = commands.add_parser("bench", help="time the plain and the project's paths side by side; save JSON")
    bench.add_argument("--size", choices=["tiny", "full"], default=None,
                       help="full: the paper's shapes (needs a GPU); tiny: the book's (default on CPU)")
    bench.add_argument("--only", nargs="*", default=None,
                       help="benchmark names, e.g. api_generation image_generation (default: all eight; an unknown "
                            "name lists them)")
    bench.add_argument("--out", default=None, help="a results file (*.json), or a folder, made if missing, for "
                                                    "<device>-<size>.json in it (default: benchmarks/results/)")
    bench.add_argument("--fail-fast", action="store_true",
                       help="stop at the first benchmark that fails (default: record it under `failed`, run the rest, "
                            "exit with status 1)")
    bench.set_defaults(handler=_bench)


def _bench(args: argparse.Namespace) -> int:
    from . import benchmarks
    from .benchmarks import cost
    from .benchmarks.harness import results_document, summary_lines
    from .benchmarks.suite import check_names
    from .config import repo_root
    from .device import pick_device

    device = pick_device()
    size = args.size or ("full" if device.startswith("cuda") else "tiny")
    if size == "full" and not device.startswith("cuda"):
        print("t2ibook bench: --size full builds a 7B model and SD 1.5 at 512 px; run it on a GPU (or use --size "
              "tiny on a CPU)", file=sys.stderr)
        return 2
    try:
        names = check_names(args.only)
    except ValueError as error:
        print(f"t2ibook bench: {error}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else repo_root() / "benchmarks" / "results"
    if out.is_dir() or out.suffix != ".json":  # a folder, existing or to be made
        out = out / benchmarks.default_results_name(results_document(size, device, []))
    # saved after every benchmark: a run cut short by a time limit keeps the benchmarks it finished
    document = benchmarks.run(size, device, names, progress=lambda line: print(line, flush=True),
                              keep_going=not args.fail_fast, on_update=lambda doc: benchmarks.save_results(doc, out))
    print("\n".join(summary_lines(document)))
    for line in cost.verdict_lines(document):  # full size on a GPU: the H100 targets and the budget, at once
        print(line)
    print(f"t2ibook bench: results -> {out}")
    return 1 if document["failed"] else 0


def _add_suggest(commands) -> None:
    suggest = commands.add_parser("suggest", help="the trained agent's API call for a prompt, checked; --generate draws it")
    suggest.add_argument("prompt", help='the T2I prompt, e.g. "a cute corgi, pixel art"')
    suggest.add_argument("--profile", default="tiny", choices=["tiny", "small", "paper"], help="whose run folder to use")
    suggest.add_argument("--model", help="agent folder (default: the profile's RRHF agent, else its SFT agent)")
    suggest.add_argument("--max-new-tokens", type=int, default=96)
    suggest.add_argument("--generate", action="store_true", help="also draw the image")
    suggest.add_argument("--out", default="suggestion.png", help="where --generate writes the PNG")
    suggest.add_argument("--seed", type=int, default=0)
    suggest.add_argument("--max-side", type=int, default=None,
                         help="long side of the image in pixels; 0 draws at the call's size (default: 64, paper 0)")
    suggest.set_defaults(handler=_suggest)


def _disk(args: argparse.Namespace) -> int:
    from .config import repo_root
    from .disk import report

    print(report(repo_root() / "data" / "runs" / args.profile))
    return 0


def _add_disk(commands) -> None:
    disk = commands.add_parser("disk", help="what a profile's runs keep on disk: each stage, the image and weights "
                                            "caches, the free space")
    disk.add_argument("--profile", default="tiny", choices=["tiny", "small", "paper"], help="whose run folder")
    disk.set_defaults(handler=_disk)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
