"""`t2ibook`: the command-line face of the helpers (run the notebooks, build the book)."""
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
