#!/usr/bin/env bash
# Issue 7's GPU measurements, each plan sized for one 10-minute call on a lent GPU machine:
#   bash experiments/gpu_session.sh table     # recur's auto (which measures its candidates per shape first: each
#                                             # row's note says what it measured and took) against cuDNN; the
#                                             # linear scans: minGRU (gates in the kernel or XLA's) and LRU (~8 min)
#   bash experiments/gpu_session.sh kernels   # recur's sequential scan against its loop kernel (~4.5 min)
#   bash experiments/gpu_session.sh explore   # projection in / out of the loop, unroll; the linear
#                                             # kernel's chunk length and steps per load (~5 min)
#   bash experiments/gpu_session.sh remaining # not yet measured: the bare linear scan's bandwidth, the
#                                             # other cells at H=1024, the layer-norm LSTM's hand-written
#                                             # backward, each loop's launches, XLA command buffers (~8 min;
#                                             # auto there is the fixed table: RECUR_AUTOTUNE=0)
#   bash experiments/gpu_session.sh persistent # the persistent kernels (mode="kernel": LSTM, GRU, MGU, Elman,
#                                             # the layer-norm LSTM, LSTMP; kernel+step: remat="step")
#                                             # against the sequential scan and cuDNN, then the LSTM's
#                                             # Triton settings (~9 min)
#   bash experiments/gpu_session.sh lent      # the first call of a session: persistent_check, then the
#                                             # persistent kernels against cuDNN at both sizes (~9 min)
#   bash experiments/gpu_session.sh next      # after lent: lstm:ln's fused backward and polling barriers,
#                                             # the linear scans, auto's inference apart, the padded 3-gate
#                                             # kernels, the LSTM variants not yet timed (~10 min; the last
#                                             # part is cut first)
#   bash experiments/gpu_session.sh profile   # Nsight Compute on lstm:ln's float32 kernels and the LSTM's
#                                             # bfloat16 ones, where issue 7 is short (~3.5 min)
#   bash experiments/gpu_session.sh variants  # the persistent kernels of the LSTM with gate recurrence,
#                                             # Greff's variants with layer norm, Sak's LSTMP with
#                                             # peepholes and LSTMP with layer norm, H=1024 (~5 min)
# with .whl carried (the ml_collections and tensorboardX wheels; see docs/benchmarks.md). Each part
# has its own time limit and writes its table under $OUT as it goes, so a part that runs long
# loses only its own unmeasured rows. On a CPU (tiny checks): OUT=runs/gpu PY=.venv/bin/python ...
set -u
plan=${1:-table}
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
E="$PY -m experiments.gpu_explore"
t0=$(date +%s)
# each part's tables go into $OUT/results.tar as soon as it ends (a call returns at most 8 files)
part() {
  local limit=$1; shift; timeout "$limit" "$@"; echo "($(( $(date +%s) - t0 )) s)"
  (cd "$OUT" && ls ./*.csv ./*.md 2>/dev/null | xargs -r tar rf results.tar && rm -f ./*.csv ./*.md)
}
case $plan in
  table)
    part 240 $B --hidden 256 --cells lstm,gru,mgu,elman,lstm:cifg,gru:cho,lstm:ln --modes auto \
      --baselines torch,jax-cudnn,lax --repeats 7 --parts cells --out "$OUT/h256"
    part 100 $B --parts linear,scan --linear-lengths 512,4096,16384,65536 --repeats 7 --out "$OUT/linear"
    part 150 $B --hidden 1024 --cells lstm,gru --modes auto --baselines torch,jax-cudnn,lax --repeats 5 \
      --parts cells --out "$OUT/h1024" ;;
  kernels)
    part 330 $B --hidden 256 --cells lstm,gru,mgu,elman,lstm:cifg --baselines torch,jax-cudnn,lax \
      --modes sequential,kernel --repeats 7 --parts cells --out "$OUT/h256"
    part 100 $B --hidden 1024 --cells lstm,gru --baselines torch,jax-cudnn --modes sequential,kernel \
      --repeats 5 --parts cells --out "$OUT/h1024" ;;
  explore)
    part 180 $E --parts cells --hidden 256 --cells lstm,gru,mgu --unrolls 1,4,8 --out "$OUT/cells256"
    part 90 $E --parts linear --linear-lengths 4096,65536 --chunks auto,32,128 --steps 1,8,16 --bare --out "$OUT/scan"
    part 60 $E --parts linear --linear-lengths 4096,65536 --chunks auto --steps 1,8,16 --out "$OUT/linear"
    part 120 $E --parts cells --hidden 1024 --cells lstm --unrolls 1,8,16 --out "$OUT/cells1024" ;;
  remaining)
    export RECUR_AUTOTUNE=0  # auto as the fixed table: these parts measure the sequential scan
    part 60 $B --parts scan --linear-lengths 512,4096,16384,65536 --repeats 7 --out "$OUT/scan"
    part 150 $B --hidden 1024 --cells mgu,elman,lstm:cifg,gru:cho,lstm:ln,lstm:peepholes --modes auto \
      --baselines torch --repeats 5 --parts cells --out "$OUT/h1024"
    part 90 $E --parts cells --hidden 1024 --cells lstm:ln --unrolls 8 --ln-fused --tasks train --out "$OUT/ln"
    for dt in float32 bfloat16; do
      part 40 $PY -m experiments.hlo_loops --cell lstm --hidden 1024 --dtype $dt --unroll 1,8
    done
    # XLA's command buffers (CUDA graphs) for the loops too: fewer launches per step? PyTorch's
    # rows (which XLA_FLAGS does not touch) tie the two runs together
    for flags in "" "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"; do
      part 60 env XLA_FLAGS="$flags" $B --hidden 1024 --cells lstm --modes auto --baselines torch --repeats 5 \
        --parts cells --out "$OUT/lstm1024_flags${#flags}"
    done ;;
  persistent)
    # correctness first (err_vs_seq) at the shapes; a grid that is not resident ends in NaN
    # after MAX_SPINS polls (about a second per call), never a hang
    part 240 $B --hidden 1024 --cells lstm,gru,elman --modes sequential,kernel,kernel+step --baselines torch --repeats 5 \
      --parts cells --out "$OUT/h1024"
    part 80 $B --hidden 256 --cells lstm,gru --modes sequential,kernel --baselines torch --repeats 5 \
      --parts cells --out "$OUT/h256"
    part 170 $B --hidden 1024 --cells lstm:peepholes,lstm:cifg,gru:cho,mgu,lstm:ln,lstm:proj_size=512 --modes sequential,kernel \
      --baselines none \
      --repeats 5 --parts cells --out "$OUT/variants"
    part 80 $E --parts persistent --hidden 1024 --repeats 5 \
      --persist-configs 128/8/3,128/4/1,256/8/1,128/8/3/x --out "$OUT/sweep" ;;
  lent)
    # one call on a freshly lent machine (15 device-minutes a session): the persistent kernels'
    # correctness with lengths and reverse reading, then their speed against cuDNN (~9 min)
    part 90 $PY -m experiments.persistent_check --batch 64 --hidden 1024 --length 64 --cells lstm gru elman
    part 240 $B --hidden 1024 --cells lstm,gru,elman --modes sequential,kernel --baselines torch --repeats 5 \
      --parts cells --out "$OUT/h1024"
    part 80 $B --hidden 256 --cells lstm,gru --modes sequential,kernel --baselines torch --repeats 5 \
      --parts cells --out "$OUT/h256"
    part 110 $B --hidden 1024 --cells mgu,lstm:cifg,lstm:ln,gru:cho --modes sequential,kernel --baselines none \
      --repeats 5 --parts cells --out "$OUT/variants" ;;
  next)
    # what call 4 left, most decisive first: the layer-norm LSTM's float32 shortfall (its
    # hand-written backward step; its kernel, three barriers a step, with the barriers polling by
    # volatile loads); the linear scans at the lengths of issue 7's 2x target (never yet measured on
    # the bare scan); auto's inference measured apart from training (never yet on a GPU: the GRU's
    # half-precision inference should take the sequential scan, 4.31 against 5.85 ms in call 4, and
    # its training the kernel); the 3-gate kernels as one padded window (the GRU's and lstm:cifg's
    # float32 kernels ran 3.4x the LSTM's); the untimed LSTM variants (~10 min: run with timeout_s
    # 590; the last part is cut first)
    # the polling barriers' correctness first, at T = 64, where lstm:ln's gradients are not chaotic
    # (at T = 512 rounding alone moves them ~100%, which would hide a barrier passed early)
    part 60 $PY -m experiments.persistent_check --batch 64 --hidden 1024 --length 64 --cells lstm lstm:ln \
      --dtypes float32 --poll load
    part 130 $E --parts cells --hidden 1024 --cells lstm:ln --unrolls 8 --ln-fused --poll-load --tasks train \
      --out "$OUT/ln"
    part 90 $B --parts linear,scan --linear-lengths 4096,16384,65536 --repeats 7 --out "$OUT/linear"
    part 100 $B --hidden 1024 --cells gru --modes auto --baselines none --repeats 3 --parts cells --out "$OUT/auto"
    part 120 $E --parts cells --hidden 1024 --cells gru,lstm:cifg --unrolls 8 --pad-three --out "$OUT/pad3"
    part 170 $B --hidden 1024 --cells lstm:fgr,lstm:cifg,ln,lstm:peepholes,ln,lstm:proj_size=512,lstm:ln,proj_size=512 \
      --modes sequential,kernel --baselines none --repeats 5 --parts cells --out "$OUT/variants2" ;;
  profile)
    # Nsight Compute on the persistent kernels where issue 7 is short: lstm:ln in float32 (training
    # and inference), and the LSTM's bfloat16 training step (0.89x cuDNN fp16). Each kernel launched once,
    # profiled by replay. ncu cannot read the counters in a gVisor sandbox: there the parts fail
    # at once (~3.5 min with counters)
    NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
    [ -n "$NCU" ] || { echo "no ncu on this machine"; exit 0; }
    S="--section SpeedOfLight --section MemoryWorkloadAnalysis --section LaunchStats --section Occupancy"
    S="$S --section WarpStateStats --section SchedulerStats --section SourceCounters --print-units base"
    part 120 "$NCU" --clock-control none --kernel-name regex:persistent $S --log-file "$OUT/ncu_fp32.md" \
      $PY -m experiments.profile_kernels --cells lstm:ln --hidden 1024 --dtype float32
    part 90 "$NCU" --clock-control none --kernel-name regex:persistent $S --log-file "$OUT/ncu_bf16.md" \
      $PY -m experiments.profile_kernels --cells lstm --hidden 1024 --dtype bfloat16 --tasks train ;;
  variants)
    part 280 $B --hidden 1024 --cells lstm:fgr,lstm:cifg,ln,lstm:peepholes,ln,lstm:nig,noaf,ln,lstm:proj_size=512,peepholes,lstm:ln,proj_size=512 --modes sequential,kernel \
      --baselines none --repeats 5 --parts cells --out "$OUT/variants2" ;;
  *) echo "plan must be table, kernels, explore, remaining, persistent, lent, next, profile or variants, got $plan" >&2
     exit 2 ;;
esac
