#!/usr/bin/env bash
# The second GPU call of 2026-11-27 (see docs/benchmarks.md): where recur's sequential scan and the
# chunked linear kernel spend their time. Same setup as gpu_session.sh; each part under its own limit.
set -u
OUT=${OUT:-runs/gpu2}
mkdir -p "$OUT"
exec > >(tee "$OUT/log") 2>&1
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.5
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
PY=${PY:-python3}
E="$PY -m experiments.gpu_explore"
t0=$(date +%s)
timeout ${T1:-180} $E --parts cells --hidden 256 --cells lstm,gru,mgu --unrolls 1,4,8 --out "$OUT/cells256"
echo "part 1: $(( $(date +%s) - t0 )) s"
timeout ${T2:-80} $E --parts linear --linear-lengths 4096,16384,65536 --chunks auto,32,64,128,512 --out "$OUT/linear"
echo "parts 1-2: $(( $(date +%s) - t0 )) s"
timeout ${T3:-150} $E --parts cells --hidden 1024 --cells lstm --unrolls 1,4 --out "$OUT/cells1024"
echo "all: $(( $(date +%s) - t0 )) s"
