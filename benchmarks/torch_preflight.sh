#!/usr/bin/env bash
# Before a GPU check on a machine whose torch is not the pinned one (the project's device image holds torch 2.11,
# pyproject.toml pins 2.13): run, here on the CPU, what that check runs, under that machine's torch and
# torchvision, so an API that its torch lacks fails here and not in the GPU time. Needs PyPI (the torch wheel and
# the CUDA libraries it loads at import, ~4.5 GB, kept in the scratch folder for the next call) and .venv (make
# install). Other versions that machine holds can be layered on top: name them after the two versions.
# Usage, from the repo root:  benchmarks/torch_preflight.sh 2.11.0 0.26.0 [huggingface_hub==1.33.0 ...]
# PREFLIGHT_TESTS=all runs the whole suite (~14 min on 2 cores) instead of the GPU check's test files.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: benchmarks/torch_preflight.sh TORCH_VERSION TORCHVISION_VERSION [NAME==VERSION ...]"
  exit 2; }
torch_version=$1 vision_version=$2
shift 2
cd "$(dirname "$0")/.."
python=.venv/bin/python
[ -x "$python" ] || { echo "torch_preflight: no $python; run make install first"; exit 1; }
scratch=${PREFLIGHT_DIR:-${TMPDIR:-/tmp}/t2ibook-preflight-torch$torch_version}
pip_in() {  # pip_in FOLDER ARGS...: install into FOLDER from PyPI alone (this machine's caps and mirrors aside)
  local folder=$1; shift
  "$python" -m pip install -q --no-compile --isolated --index-url https://pypi.org/simple --target "$folder" "$@"
}
if [ ! -f "$scratch/.complete" ]; then
  rm -rf "$scratch"
  pip_in "$scratch/torch" --no-deps "torch==$torch_version" "torchvision==$vision_version"
  # torch's own requirements, CUDA libraries included (a CUDA build of torch will not import without them),
  # but not the pure-Python ones .venv has already
  mapfile -t needs < <(sed -n 's/^Requires-Dist: //p' "$scratch"/torch/torch-*.dist-info/METADATA \
    | grep -v 'extra ==' | grep -E '^(cuda|nvidia|triton)' | sed 's/ *;.*//')
  [ ${#needs[@]} -eq 0 ] || pip_in "$scratch/torch" "${needs[@]}"
  touch "$scratch/.complete"
fi
rm -rf "$scratch/extra"
[ $# -eq 0 ] || pip_in "$scratch/extra" --no-deps "$@"
export PYTHONPATH=$scratch/extra:$scratch/torch PYTHONUNBUFFERED=1
"$python" -c 'import torch, torchvision, transformers, diffusers, trl, peft, numpy, huggingface_hub as hub
print("torch_preflight: torch", torch.__version__, "torchvision", torchvision.__version__, "transformers",
transformers.__version__, "diffusers", diffusers.__version__, "numpy", numpy.__version__, "huggingface_hub",
hub.__version__)'
bench_out=$(mktemp -d)
trap 'rm -rf "$bench_out"' EXIT
"$python" -m helpers.cli bench --size tiny --out "$bench_out"
echo "torch_preflight: bench passed"
if [ "${PREFLIGHT_TESTS:-}" = all ]; then
  "$python" -m pytest -n 2 --dist loadfile --no-loadscope-reorder -p no:cacheprovider
else
  # the GPU check's test files (their CPU tests) and the benchmarks' tests
  "$python" -m pytest -p no:cacheprovider -q tests/test_distributed.py tests/test_run_dtype.py tests/test_speed.py \
    tests/test_benchmarks.py
fi
echo "torch_preflight: passed under torch $torch_version"
