#!/usr/bin/env bash
# The GPU checks of issue #6, in one run on the device machine (README, 'GPU'): the CUDA tests,
# then the merging and evaluation benchmarks on the GPU. Logs go to $OUT (or ./gpu-check).
# Wheels the machine lacks travel in .whl (git-ignored; `run` with carry .whl): pydantic, duckdb,
# datasets, fusion-bench and what they need that the machine's image lacks.
set -uo pipefail
OUT=${OUT:-gpu-check}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
  # datasets 5 needs pyarrow >= 24; where the machine's is older, datasets 4.0 (pyarrow >= 15)
  if ! python3 -c "import datasets" 2>/dev/null && ls .whl/fallback/*.whl >/dev/null 2>&1; then
    python3 -c "import pyarrow; print('pyarrow', pyarrow.__version__, '- using datasets 4.0')"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/fallback/*.whl || exit 1
  fi
else
  export PYTHONPATH=$PWD
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1 PYTHONUNBUFFERED=1
export FBH_CACHE=/tmp/fbh-cache TQDM_DISABLE=1
step() { local name=$1 limit=$2; shift 2; echo "=== $name ($(date +%T))"; timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" \
  | grep -v -e 'Loading weights' -e 'Writing model' -e 'it/s]' ; echo "=== $name rc=${PIPESTATUS[0]}"; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
python3 -c "import torch, transformers, datasets, duckdb, pydantic, fusion_bench; print('torch', torch.__version__, \
'cuda', torch.version.cuda, '| transformers', transformers.__version__, '| datasets', datasets.__version__)"
# Steps to run: the arguments (default all); MERGE_METHODS narrows the float32 merge benchmark.
STEPS=${*:-pytest merge-f32 merge-bf16 eval}
want() { [[ " $STEPS " == *" $1 "* ]]; }
want pytest && step pytest 200 python3 -m pytest -q -p no:cacheprovider -k cuda tests/test_precision_devices.py -rA -s
want merge-f32 && step merge-f32 170 python3 bench/merge.py --size vit-b32 --scaling 8 --device cuda --repeat 2 \
  --methods "${MERGE_METHODS:-task_arithmetic,simple_average,ties_merging}" --workdir /tmp/fbh-bench
want merge-bf16 && step merge-bf16 110 python3 bench/merge.py --size vit-b32 --scaling 8 --device cuda --dtype bfloat16 \
  --repeat 2 --methods task_arithmetic --workdir /tmp/fbh-bench
want eval && step eval 120 python3 bench/eval.py --synthetic vit-b32 --device cuda --precision float32,bfloat16,float16 \
  --fb-workers 8 --images 1024 --repeat 3
exit 0
