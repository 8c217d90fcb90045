#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.sh needs on a GPU machine that cannot reach PyPI, into .whl/ at the repo root:
# the set ../shared/device/wheels.sh downloads (trl, diffusers, datasets and theirs) plus this project's pins of
# the libraries that machine holds at other versions (transformers 5.17 and its own peft there), so the GPU check
# runs the library versions CI tests; transformers 5.23 also wants a newer regex than some images carry.
# Usage, here:  benchmarks/device_wheels.sh   (then carry .whl and run benchmarks/gpu_check.sh there)
set -euo pipefail
cd "$(dirname "$0")/.."
pin() { grep -oE "\"$1==[^\"]+\"" pyproject.toml | tr -d '"'; }
transformers=$(pin transformers) peft=$(pin peft)
[ -n "$transformers" ] && [ -n "$peft" ] || { echo "device_wheels: no transformers/peft pin in pyproject.toml"; exit 1; }
shared=../shared/device/wheels.sh
[ -f "$shared" ] || { echo "device_wheels: no $shared (the project workplace's script); elsewhere use the pip" \
  "download line in benchmarks/README.md"; exit 1; }
exec bash "$shared" "$transformers" "$peft" "regex>=2025.10.22"
