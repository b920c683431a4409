#!/usr/bin/env bash
# Issue 7's GPU table in one call on a lent GPU machine (10 minutes a call; see the device notes):
#   run: bash experiments/gpu_session.sh      with .whl carried (ml_collections, tensorboardX wheels)
# Each part has its own time limit and writes its table under $OUT as it goes, so a part that
# runs long loses only its own unmeasured rows. Locally: OUT=runs/gpu bash experiments/gpu_session.sh
set -u
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
exec > >(tee "$OUT/log") 2>&1
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.5
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
PY=${PY:-python3}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv 2>/dev/null
$PY -c "import jax, recur; print(jax.devices(), jax.__version__)" || exit 1
B="$PY -m experiments.bench_gpu"
t0=$(date +%s)
# 1. H=256: every fused cell against cuDNN, fp32 and half, training step and inference
timeout ${T1:-330} $B --hidden 256 --cells lstm,gru,mgu,elman,lstm:cifg --baselines torch,jax-cudnn,lax \
  --repeats 7 --parts cells --out "$OUT/h256"
echo "part 1: $(( $(date +%s) - t0 )) s"
# 2. the chunked linear scan (minGRU) against lax.associative_scan, with achieved bandwidth
timeout ${T2:-100} $B --parts linear --linear-lengths 4096,16384,65536 --repeats 7 --out "$OUT/linear"
echo "parts 1-2: $(( $(date +%s) - t0 )) s"
# 3. H=1024 (recur's LSTM goes to cuDNN under auto; the fused kernels refuse a step this wide)
timeout ${T3:-100} $B --hidden 1024 --cells lstm,gru --baselines torch,jax-cudnn --repeats 5 --parts cells \
  --out "$OUT/h1024"
echo "all: $(( $(date +%s) - t0 )) s"
