"""ChatGen's set-level FIDs at paper scale (notebook 11): the plain way (every image's feature row copied into one
float32 array, each table row's set copied out of it and converted to float64 whole, the trace term from the general
eigenvalues of Σ₁Σ₂, as torchmetrics takes it) against the project's (`chatgen.experiment.set_metrics`: each set
read as `scorers.fid.FeatureMoments`, a chunk of rows at a time, and each row about once, summed per method, setting
and input type; the trace term from symmetric eigenvalues, `scorers.fid.root_trace`), side by side on the same
rows, each in a fresh process.

    python benchmarks/fid_memory.py                   # 400,000 generated images, 2048-d (Inception) rows
    python benchmarks/fid_memory.py --images 3000 --dim 64 --json

The rows are random (memory and time do not depend on the values); the sets are Tables 4, 6 and 7's: two methods
× two settings × two input types, and a second ChatGen-Evo variant, each without the images of 1 chat in 20 (its
call failed), so that the sets' reference samples differ as in notebook 11. Prints seconds and the peak memory
above the rows already held (peak resident set size, so torch's allocations count too) for each path, their
ratios, and checks that both found the same FIDs.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

SETS = (("ChatGen-Evo", "all predicted"), ("ChatGen-Evo", "model only"), ("Baseline", "all predicted"))


def rows_and_table(images: int, dim: int, seeds: int):
    """`images` generated images' feature rows (and their reference images' rows) by key, the scored table over
    them, and the reference keys of each sample, as notebook 11 holds them before its set-level FIDs."""
    import numpy as np
    import pandas as pd

    from helpers.chatgen.experiment import reference_keys_by_sample
    from helpers.scorers.fid import FeatureRows

    samples = max(1, images // (seeds * len(SETS)))
    generator = np.random.default_rng(0)
    by_key: dict[str, np.ndarray] = {}

    def add(keys: list[str]) -> None:
        for start in range(0, len(keys), 4096):
            block = keys[start:start + 4096]
            by_key.update(zip(block, generator.standard_normal((len(block), dim), dtype=np.float32)))

    columns = {name: [] for name in ("method", "variant", "setting", "input_type", "sample_id", "key")}
    for number, (method, variant) in enumerate(SETS):
        for sample in range(samples):
            if (3 * sample + number) % 20 == 0:
                continue  # a call that failed: no images of this chat in this set (1 in 20, each set its own)
            for seed in range(seeds):
                values = (method, variant, ("supervised", "few-shot")[sample % 2],
                          ("single", "multimodal")[sample // 2 % 2], f"s{sample}", f"{method}/{variant}/{sample}/{seed}")
                for name, value in zip(columns, values):
                    columns[name].append(value)
    scored = pd.DataFrame(columns).assign(clip=0.3, hps=0.25, image_reward=0.1)
    reference_samples = [f"s{sample}" for sample in range(samples) for _ in range(seeds)]
    reference_keys = [f"reference/{sample}/{seed}" for sample in range(samples) for seed in range(seeds)]
    add(list(scored["key"]))
    add(reference_keys)
    return FeatureRows(by_key), scored, reference_keys_by_sample(reference_samples, reference_keys)


def naive_fids(features, scored, reference_keys) -> list[float]:
    """The set-level FIDs the way notebook 11 computed them before `FeatureMoments`: every row stacked, each set
    copied out of the stack and converted to float64 whole, and the general eigenvalues of Σ₁Σ₂."""
    import numpy as np
    import torch

    from helpers.chatgen.experiment import set_groups

    stacked = features.rows(list(scored["key"]), np.float32)
    reference = {sample: features.rows(keys, np.float32) for sample, keys in reference_keys.items()}
    fids = []
    for _, _, group in set_groups(scored):
        found = [reference[sample] for sample in group["sample_id"].unique() if len(reference.get(sample, ()))]
        if len(group) < 2 or sum(len(rows) for rows in found) < 2:
            continue
        stats = []
        for rows in (np.concatenate(found), stacked[group.index.to_numpy()]):
            rows = torch.as_tensor(rows, dtype=torch.float64)
            mean = rows.mean(0, keepdim=True)
            stats.append((mean[0], (rows.T @ rows - len(rows) * mean.T @ mean) / (len(rows) - 1)))
        (mu1, sigma1), (mu2, sigma2) = stats
        root_trace = torch.linalg.eigvals(sigma1 @ sigma2).sqrt().real.sum()
        fids.append(float((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * root_trace))
    return fids


def resident_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 1e6


def measure(way: str, images: int, dim: int, seeds: int) -> dict:
    """In this process: the rows set up, then one way's FIDs timed, with the peak resident memory above the rows."""
    import gc

    from helpers.chatgen.experiment import set_metrics

    features, scored, reference_keys = rows_and_table(images, dim, seeds)
    gc.collect()
    held = resident_mb()
    start = time.perf_counter()
    if way == "naive":
        fids = naive_fids(features, scored, reference_keys)
    else:
        fids = set_metrics(scored, features, reference_keys)["fid"].tolist()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # kB on Linux
    return {"rows": len(features.by_key), "rows_mb": held, "seconds": seconds, "peak_above_rows_mb": peak - held,
            "fids": fids}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400_000, help="generated images (ChatGen's evaluation ~400k)")
    parser.add_argument("--dim", type=int, default=2048, help="features per row (Inception-v3 pool: 2048)")
    parser.add_argument("--seeds", type=int, default=4, help="images per sample and set")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument("--out", type=Path, help="also save the result here, for notebook 14 (e.g. "
                        f"benchmarks/results/host_memory/{Path(__file__).stem}.json)")
    parser.add_argument("--measure", metavar="WAY", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = ["--images", str(args.images), "--dim", str(args.dim), "--seeds", str(args.seeds)]
    if args.measure:  # the child process
        print(json.dumps(measure(args.measure, args.images, args.dim, args.seeds)))
        return {}
    result = {"images": args.images, "dim": args.dim, "seeds": args.seeds}
    for way in ("naive", "project"):
        done = subprocess.run([sys.executable, __file__, "--measure", way, *sizes], check=True, capture_output=True,
                              text=True)
        result[way] = json.loads(done.stdout.strip().splitlines()[-1])
    naive, project = result["naive"], result["project"]
    if len(naive["fids"]) != len(project["fids"]) or not naive["fids"] or any(
            abs(a - b) > 1e-6 * max(1.0, abs(a)) for a, b in zip(naive["fids"], project["fids"])):
        raise AssertionError(f"the two ways found different FIDs: {naive['fids']} and {project['fids']}")
    result["ratio"] = {key: naive[key] / max(project[key], 1e-9) for key in ("seconds", "peak_above_rows_mb")}
    if args.out:
        from helpers.benchmarks.harness import host_memory_document, save_results

        shapes = {"images": args.images, "dim": args.dim, "seeds": args.seeds, "rows": project["rows"],
                  "sets": len(project["fids"])}
        save_results(host_memory_document("fid_sets", shapes, result), args.out)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"set-level FIDs: {len(project['fids'])} sets over {project['rows']:,} rows of {args.dim} features "
              f"({project['rows_mb']:.0f} MB resident with the rows held)")
        for way in ("naive", "project"):
            row = result[way]
            print(f"  {way:8s} {row['seconds']:7.2f} s  peak above the rows {row['peak_above_rows_mb']:8.1f} MB")
        ratio = result["ratio"]
        print(f"  naive / project: time {ratio['seconds']:.2f}x, peak {ratio['peak_above_rows_mb']:.2f}x; "
              "the same FIDs")
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    main()
