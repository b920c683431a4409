#!/usr/bin/env bash
# The third GPU call of 2026-11-27: issue 7's table with recur's mode="auto" as it now chooses
# (the sequential scan unrolled 8 steps for every cell not linear in its state, the chunked
# kernel for linear cells), and unroll 8 / 16 at H=1024. Same setup as gpu_session.sh.
set -u
OUT=${OUT:-runs/gpu3}
mkdir -p "$OUT"
exec > >(tee "$OUT/log") 2>&1
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.5
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
PY=${PY:-python3}
B="$PY -m experiments.bench_gpu"
t0=$(date +%s)
timeout ${T1:-120} $B --hidden 256 --cells lstm,gru,mgu,elman,lstm:cifg,gru:cho,lstm:ln --modes auto \
  --baselines torch,jax-cudnn,lax --repeats 7 --parts cells --out "$OUT/h256"
echo "part 1: $(( $(date +%s) - t0 )) s"
timeout ${T2:-45} $B --parts linear --linear-lengths 4096,16384,65536 --repeats 7 --out "$OUT/linear"
echo "parts 1-2: $(( $(date +%s) - t0 )) s"
timeout ${T3:-90} $B --hidden 1024 --cells lstm,gru --modes auto --baselines torch,jax-cudnn,lax --repeats 5 \
  --parts cells --out "$OUT/h1024"
echo "parts 1-3: $(( $(date +%s) - t0 )) s"
timeout ${T4:-45} $PY -m experiments.gpu_explore --parts cells --hidden 1024 --cells lstm --unrolls 8,16 \
  --tasks train --precisions half,fp32 --repeats 5 --out "$OUT/unroll1024"
echo "all: $(( $(date +%s) - t0 )) s"
