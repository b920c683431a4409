"""One training step and one forward pass per cell, for a profiler: each jitted function compiled
first and then called once, so that Nsight Compute, told to profile kernels whose names hold
"persistent", sees each of recur's persistent kernels launched once (the training step's forward
and backward kernels, the forward pass's kernel) at issue 7's shape, B = 64, T = 512, I = H:

    ncu --clock-control none --kernel-name regex:persistent --section SpeedOfLight --section WarpStateStats \\
        --log-file runs/ncu.txt python -m experiments.profile_kernels --cells lstm:ln,lstm --hidden 1024

(experiments/gpu_session.sh's ``profile`` plan). Without a profiler it prints each call's wall time
(one call: a rough figure; experiments/bench_gpu.py times properly). On a CPU it runs the sequential
scan, or, with RECUR_PALLAS_INTERPRET=1, the kernels in interpret mode (tiny shapes only).
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

import recur
from recur.cells import split_specs
from recur.kernels import dispatch


def functions(name, B, T, I, H, dtype, mode):
    """{task: (jitted function, its arguments)} for one cell: "train", the gradient of mean(h²) for
    the weights and inputs (bench_gpu's training step), and "infer", the outputs alone."""
    cell = recur.get_cell(name, H, dtype=dtype)
    params = cell.init(jax.random.key(0), I)
    xs = jax.random.normal(jax.random.key(1), (B, T, I), dtype)

    def outputs(p, x):
        return recur.scan(cell, p, x, mode=mode)[0]

    def loss(p, x):
        return jnp.mean(jnp.square(outputs(p, x).astype(jnp.float32)))

    impl = dispatch.choose(cell, mode, B, T, I, "none")[0] if mode in ("kernel", "auto") else mode
    return impl, {"train": (jax.jit(jax.grad(loss, argnums=(0, 1))), (params, xs)),
                  "infer": (jax.jit(outputs), (params, xs))}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", default="lstm:ln,lstm", help="comma-separated cell specs (lstm:cifg,ln is one)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--input", type=int, default=None, help="default: the hidden size")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--mode", default="kernel", help="recur.scan's mode (kernel: the persistent kernels where they run)")
    p.add_argument("--tasks", default="train,infer")
    a = p.parse_args(argv)
    B, T, H = a.batch, a.length, a.hidden
    I = a.input or H
    print(f"backend {jax.default_backend()}, interpret {dispatch.interpret_forced()}, B={B} T={T} I={I} H={H} "
          f"{a.dtype}, mode {a.mode}")
    for name in split_specs(a.cells):
        impl, fns = functions(name, B, T, I, H, getattr(jnp, a.dtype), a.mode)
        for task in a.tasks.split(","):
            if task not in fns:
                raise SystemExit(f"--tasks: {task!r} is not one of {sorted(fns)}")
            f, args = fns[task]
            t0 = time.perf_counter()
            compiled = f.lower(*args).compile()
            t1 = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            t2 = time.perf_counter()
            print(f"{name} {task}: {impl}, compiled in {t1 - t0:.1f} s, one call {1e3 * (t2 - t1):.2f} ms", flush=True)


if __name__ == "__main__":
    main()
