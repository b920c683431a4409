"""Compile recur's GPU loop kernels for an H100 without a GPU: shared memory and register spills.

    python -m experiments.triton_compile --cells lstm --hidden 128,256 --warps auto,4
    python -m experiments.triton_compile --cells lstm --hidden 128 --whole     # W_h held whole
    python -m experiments.triton_compile --cells mingru,minlstm,lru --hidden 256 # the linear kernels
    python -m experiments.triton_compile --cells lstm,gru,elman --hidden 1024 --dtype bfloat16 \
        --persistent 128/4/1,256/8/3                    # the persistent kernels (B = 64)

jax lowers the training step's two Pallas kernels (forward and backward time loop) to Triton IR
for CUDA (the GPU query patched to an H100, as tests/test_kernels.py does); the ``triton``
package (a dev dependency) compiles that IR for sm_90 and its bundled ``ptxas -v`` reports
registers and spills. On a GPU, XLA compiles the same IR with jaxlib's own Triton, so the
figures are the pip compiler's, close to but not necessarily equal to what runs there.
Batch 16 rows per program, T = 4 (the loop body, not T, sets the kernel's size). Cells linear
in their state: their chunked kernels (four: forward and backward, each a summary pass and a
final pass), B = 8, T = 4,096, with a padding mask, 4 warps.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import tempfile
import warnings

import jax
import jax.numpy as jnp

import recur
from recur.cells import split_specs
from recur.kernels import dispatch, loop
from recur.kernels.pad import padded


@contextlib.contextmanager
def triton_modules():
    """Within: jax lowers Pallas kernels for an H100 (the GPU query patched) and the yielded list
    collects the Triton IR text of each kernel lowered."""
    from jax._src.pallas.triton import gpu_info
    from jax._src.pallas.triton import pallas_call_registration as reg

    modules = []
    lower, info = reg.lowering.lower_jaxpr_to_triton_module, reg.gpu_info_lib.get_gpu_info

    def capture(*a, **k):
        out = lower(*a, **k)
        modules.append(out.module.operation.get_asm(enable_debug_info=False))
        return out

    reg.lowering.lower_jaxpr_to_triton_module = capture
    reg.gpu_info_lib.get_gpu_info = lambda: gpu_info._get_gpu_info_impl(gpu_info.GpuVersion.H100)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # Pallas' Triton back end is deprecated
            yield modules
    finally:
        reg.lowering.lower_jaxpr_to_triton_module = lower
        reg.gpu_info_lib.get_gpu_info = info


def loop_step(cell, B, T, I, dtype=None):
    """(jitted training step, its argument shapes): the gradient of sum(hs) for params and xs
    [B, T, I] (in ``dtype``, default the cell's) of the loop kernel as a GPU runs it (3 gate blocks
    padded to 4), to be lowered for CUDA."""
    from recur.backprop import deferred_scan

    params = jax.eval_shape(lambda: cell.init(jax.random.key(0), I))
    xs = jax.ShapeDtypeStruct((B, T, I), cell.dtype if dtype is None else dtype)

    def run(p, x):
        cell_k, p_k, us = padded(cell, p, cell.project(p, jnp.swapaxes(x, 0, 1)))
        return deferred_scan(cell_k, 1, dispatch.loop_fn(B, interpret=False))(
            p_k, cell.initial_carry(B), us, None, None, None)[0]

    return jax.jit(jax.grad(lambda p, x: jnp.sum(run(p, x).astype(jnp.float32)), argnums=(0, 1))), (params, xs)


def kernels_ir(cell, I):
    """[(Triton IR text, num_warps)] of the forward and backward loop kernels of a training step."""
    warps, params_of = [], loop._triton_params
    loop._triton_params = lambda n: warps.append(n) or params_of(n)
    try:
        step, args = loop_step(cell, dispatch.GPU_BLOCK_B, 4, I)
        with triton_modules() as modules:
            step.trace(*args).lower(lowering_platforms=("cuda",))
    finally:
        loop._triton_params = params_of
    return list(zip(modules, warps))


@contextlib.contextmanager
def chosen_as_on_a_gpu(programs=132):
    """Within: recur.scan(mode="kernel") chooses its kernel as on a GPU of ``programs`` SMs,
    without probing the lowering (there is no GPU here to compile for)."""
    import recur.kernels.persistent as ps

    on_gpu, sms = dispatch._on_gpu, ps.sm_count
    dispatch._on_gpu, ps.sm_count = (lambda: True), (lambda: programs)
    try:
        with dispatch._probing():
            yield
    finally:
        dispatch._on_gpu, ps.sm_count = on_gpu, sms


def linear_ir(cell, B=8, T=4096, resets=False):
    """[(Triton IR text, num_warps)] of the chunked linear kernels of a training step of a cell
    linear in its state, as recur.scan(mode="kernel") runs it on a GPU (recur/kernels/gated.py
    for the minGRU, minLSTM and LRU, else linear.py on XLA's (a, b)): forward and backward, each
    a summary pass and a final pass, with lengths (a padding mask) and, with resets, restarts
    from the initial carry. The state size is the cell's hidden size."""
    params = jax.eval_shape(lambda: cell.init(jax.random.key(0), cell.hidden_size))
    xs = jax.ShapeDtypeStruct((B, T, cell.hidden_size), cell.dtype)
    lengths = jax.ShapeDtypeStruct((B,), jnp.int32)
    flags = jax.ShapeDtypeStruct((B, T), bool) if resets else None

    def loss(p, x, n, r):
        hs, _ = recur.scan(cell, p, x, mode="kernel", lengths=n, resets=r)
        return jnp.sum(hs.astype(jnp.float32))

    with triton_modules() as modules, chosen_as_on_a_gpu():
        jax.jit(jax.grad(loss, argnums=(0, 1))).trace(params, xs, lengths, flags).lower(lowering_platforms=("cuda",))
    return [(m, 4) for m in modules]


def persistent_ir(H, dtype, B=64, programs=132, cell="lstm", remat="none"):
    """[Triton IR text] of the persistent kernels of a training step (forward, backward) of a cell
    they run (recur.kernels.persistent.rule_for) at batch B, hidden size H, for a GPU of
    ``programs`` SMs; remat="step": the backward kernel that recomputes the gates."""
    cell = recur.get_cell(cell, H, dtype=dtype)
    params = jax.eval_shape(lambda: cell.init(jax.random.key(0), H))
    xs = jax.ShapeDtypeStruct((B, 4, H), dtype)

    def loss(p, x):
        hs, _ = recur.scan(cell, p, x, mode="kernel", remat=remat)
        return jnp.sum(hs.astype(jnp.float32))

    with triton_modules() as modules, chosen_as_on_a_gpu(programs):
        jax.jit(jax.grad(loss, argnums=(0, 1))).trace(params, xs).lower(lowering_platforms=("cuda",))
    return modules


def sm90(text, num_warps, num_stages=1):
    """One kernel's Triton IR compiled for sm_90: triton's CompiledKernel (its .asm["ptx"], ...)."""
    import triton
    from triton.backends.compiler import GPUTarget

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "recur_loop.ttir")
        with open(path, "w") as f:
            f.write(text)
        return triton.compile(path, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})


def compile_sm90(text, num_warps, num_stages=1):
    """(shared bytes, registers, spill store bytes, spill load bytes) of one kernel for sm_90."""
    import triton

    kernel = sm90(text, num_warps, num_stages)
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
        info = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx, "-o", os.devnull], capture_output=True,
                              text=True).stderr
    num = lambda pattern: int(m.group(1)) if (m := re.search(pattern, info)) else -1
    return (kernel.metadata.shared, num(r"Used (\d+) registers"), num(r"(\d+) bytes spill stores"),
            num(r"(\d+) bytes spill loads"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", default="lstm,gru")
    p.add_argument("--hidden", default="128,256")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--warps", default="auto", help="comma-separated: auto (recur's choice) or a count")
    p.add_argument("--whole", action="store_true", help="hold every matrix whole (no tiles), as before tiling")
    p.add_argument("--persistent", default="", help="instead: the persistent kernels of --cells (B = 64) at these "
                   "K_BLOCK/warps/stages settings, e.g. 128/4/1,256/8/3")
    p.add_argument("--remat", default="none", choices=["none", "step"],
                   help="with --persistent: step compiles the backward kernel that recomputes the gates")
    args = p.parse_args(argv)
    if args.persistent:
        return persistent_table(args)
    if args.whole:
        loop.TILE_BYTES = 1 << 40
    loop.MAX_STEP_VALUES = 1 << 40  # measure wide steps too (the kernel refuses them on a GPU)
    print("cell | H | warps | kernel | shared KiB | registers | spill stores / loads (bytes per thread)")
    for name in split_specs(args.cells):
        for H in (int(h) for h in args.hidden.split(",")):
            cell = recur.get_cell(name, H, dtype=getattr(jnp, args.dtype))
            irs = linear_ir(cell) if cell.linear else kernels_ir(cell, H)
            which_ = (("forward summary", "forward", "backward summary", "backward") if cell.linear
                      else ("forward", "backward"))
            for w in args.warps.split(","):
                for which, (text, auto) in zip(which_, irs):
                    n = auto if w == "auto" else int(w)
                    shared, regs, st, ld = compile_sm90(text, n)
                    print(f"{name} | {H} | {n} | {which} | {shared / 1024:.0f} | {regs} | {st} / {ld}", flush=True)


def persistent_table(args):
    import recur.kernels.persistent as ps

    print("cell | H | dtype | K_BLOCK | warps | stages | kernel | shared KiB | registers | spill stores / loads")
    for name, H in ((c, int(h)) for c in split_specs(args.cells) for h in args.hidden.split(",")):
        for setting in args.persistent.split(","):
            kb, warps, stages = (int(v) for v in setting.split("/"))
            before = ps.K_BLOCK
            ps.K_BLOCK = kb
            try:
                irs = persistent_ir(H, getattr(jnp, args.dtype), cell=name, remat=args.remat)
            finally:
                ps.K_BLOCK = before
            for which, text in zip(("forward", "backward"), irs):
                shared, regs, st, ld = compile_sm90(text, warps, stages)
                print(f"{name} | {H} | {args.dtype} | {kb} | {warps} | {stages} | {which} | {shared / 1024:.0f} | {regs} | "
                      f"{st} / {ld}", flush=True)


if __name__ == "__main__":
    main()
