#!/usr/bin/env bash
# The GPU measurements in one call on a machine without internet access (the wheels it lacks in .whl/, from
# benchmarks/device_wheels.sh): the full-size benchmarks, each saved the moment it finishes, then the GPU tests
# of the fast paths, the run's bf16 paths and the FSDP recipe.
# Usage, from the repo root on the GPU machine:  benchmarks/gpu_check.sh OUT_FOLDER [SECONDS]
# SECONDS (default 540) bounds the whole script, so it ends, with its log and results, inside a caller's limit.
# GPU_CHECK_SIZE=tiny rehearses the script on a CPU in a minute (its GPU tests then fail: there is no GPU).
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUT_FOLDER [SECONDS]}
budget=${2:-540}
mkdir -p "$out"
exec > >(tee "$out/gpu_check.log") 2>&1
if [ -d .whl ]; then
  site=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
    || { echo "gpu_check: installing .whl/ failed"; exit 1; }
  export PYTHONPATH=$site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
python3 -c 'import torch, transformers, diffusers, trl, peft, accelerate; print("torch", torch.__version__, "cuda",
torch.version.cuda, "| transformers", transformers.__version__, "| diffusers", diffusers.__version__, "| trl",
trl.__version__, "| peft", peft.__version__, "| accelerate", accelerate.__version__)' || exit 1
# datasets (the trainers import it) wants pyarrow >= 24 and fsspec <= 2026.9.0, which the image may not hold: say so
# here, without stopping the image and API benchmarks, which do not need it
python3 -c 'import pyarrow, fsspec; print("pyarrow", pyarrow.__version__, "| fsspec", fsspec.__version__)
import datasets; print("datasets", datasets.__version__, "imports")' \
  || echo "gpu_check: datasets does not import here: the benchmarks and tests that build a trainer will fail"
# the pins CI tests (pyproject.toml): another version here runs other library code (benchmarks/device_wheels.sh)
python3 - <<'PINS'
import importlib.metadata as md, re
pins = dict(re.findall(r'"([A-Za-z0-9_.-]+)==([^"]+)"', open("pyproject.toml").read()))
off = [f"{name} {md.version(name)} (pinned {pin})" for name, pin in pins.items()
       if name in ("transformers", "peft", "accelerate", "diffusers", "trl") and md.version(name) != pin]
print("gpu_check: versions differ from pyproject.toml: " + "; ".join(off) if off else "gpu_check: library pins match")
PINS
# the benchmarks the targets and the cost model need most come first; the tests get the last 150 s
timeout --signal=INT --kill-after=20 $((budget - 150 - SECONDS)) python3 -m helpers.cli bench --size "${GPU_CHECK_SIZE:-full}" \
  --only image_generation api_generation scoring dpo_step rrhf_step vqa_scoring host_io \
  lora_switching --out "$out"
echo "gpu_check: bench exit $? after ${SECONDS} s"
left=$((budget - SECONDS - 5))
if [ "$left" -gt 30 ]; then
  # the FSDP recipe first (an accelerate launch per test; accelerate builds FSDP only on GPUs, so nothing else
  # runs it), then the run's bf16 paths (quick; CI runs them on the CPU), then the compiled fast paths
  timeout --kill-after=10 "$left" python3 -m pytest -m gpu tests/test_distributed.py tests/test_run_dtype.py \
    tests/test_speed.py -q -p no:cacheprovider -o addopts="" --timeout "$left"
  echo "gpu_check: gpu tests exit $? after ${SECONDS} s"
else
  echo "gpu_check: no time left for the gpu tests"
fi
