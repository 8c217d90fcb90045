"""Reading the score cache at paper scale: the plain way (the whole file read at once, one dict keyed by
(image, scorer, weights)) against `scoring.ScoreCache` (64 KB of lines at a time, one dict per scorer, each image
key one string), side by side on the same file, each in a fresh process so neither reuses the other's strings.

    python benchmarks/score_cache_memory.py              # 1,000,000 images x 3 scorers, ~510 MB of JSON lines
    python benchmarks/score_cache_memory.py --images 1000 --json

Prints seconds, memory held and peak memory while reading (tracemalloc) for each path, and their ratios.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

SCORERS = (("clip", "openai/clip-vit-base-patch16#bfloat16"), ("hps", "xswu/HPSv2/HPS_v2_compressed.pt#bfloat16"),
           ("image_reward", "THUDM/ImageReward#bfloat16"))


def write_rows(path: Path, images: int) -> None:
    """`images` image keys (sha256 hex, as `ImageCache.key`) with a score from each of the unified reward's scorers,
    written as `ScoreCache.put_many` writes them."""
    from helpers.manifest import append_jsonl

    for start in range(0, images, 10_000):
        keys = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(start, min(images, start + 10_000))]
        append_jsonl(path, [{"image": key, "scorer": scorer, "weights": weights, "value": (i % 997) / 997}
                            for i, key in enumerate(keys) for scorer, weights in SCORERS])


def read(path: Path, way: str):
    from helpers.manifest import read_jsonl_rows
    from helpers.scoring import ScoreCache

    if way == "naive":
        return {(row["image"], row["scorer"], row["weights"]): row["value"] for row in read_jsonl_rows(path)}
    return ScoreCache(path)


def measure(path: Path, way: str) -> dict:
    """In this process: the read timed, then again under tracemalloc for the memory it holds and its peak."""
    start = time.perf_counter()
    cache = read(path, way)
    seconds = time.perf_counter() - start
    rows = len(cache)
    del cache
    tracemalloc.start()
    cache = read(path, way)
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    if len(cache) != rows:
        raise AssertionError(f"the second read found {len(cache)} rows, the first {rows}")
    return {"rows": rows, "seconds": seconds, "held_mb": held / 1e6, "peak_mb": peak / 1e6}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1_000_000, help="images in the cache (3 scores each)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument("--out", type=Path, help="also save the result here, for notebook 14 (e.g. "
                        f"benchmarks/results/host_memory/{Path(__file__).stem}.json)")
    parser.add_argument("--measure", nargs=2, metavar=("FILE", "WAY"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:  # the child process
        print(json.dumps(measure(Path(args.measure[0]), args.measure[1])))
        return {}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "scores.jsonl"
        write_rows(path, args.images)
        result = {"rows": 3 * args.images, "file_mb": path.stat().st_size / 1e6}
        for way in ("naive", "project"):
            done = subprocess.run([sys.executable, __file__, "--measure", str(path), way], check=True,
                                  capture_output=True, text=True)
            result[way] = json.loads(done.stdout.strip().splitlines()[-1])
    naive, project = result["naive"], result["project"]
    if naive["rows"] != project["rows"] or naive["rows"] != result["rows"]:
        raise AssertionError(f"the two reads found {naive['rows']} and {project['rows']} rows of {result['rows']}")
    result["ratio"] = {key: naive[key] / max(project[key], 1e-9) for key in ("seconds", "held_mb", "peak_mb")}
    if args.out:
        from helpers.benchmarks.harness import host_memory_document, save_results

        shapes = {"images": args.images, "rows": result["rows"], "file_mb": result["file_mb"]}
        save_results(host_memory_document("score_cache", shapes, result), args.out)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"score cache: {result['rows']:,} rows, {result['file_mb']:.0f} MB of JSON lines")
        for way in ("naive", "project"):
            row = result[way]
            print(f"  {way:8s} {row['seconds']:7.2f} s  holds {row['held_mb']:8.1f} MB  peak {row['peak_mb']:8.1f} MB")
        ratio = result["ratio"]
        print(f"  naive / project: time {ratio['seconds']:.2f}x, held {ratio['held_mb']:.2f}x, "
              f"peak {ratio['peak_mb']:.2f}x")
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    main()
