"""Where recur's sequential scan spends its time on a GPU: the input projection inside the loop
or before it, and lax.scan's unroll, against cuDNN (PyTorch) side by side in one run.

    python -m experiments.gpu_explore --out runs/explore      # on a GPU machine, ~3 minutes

Rows: recur's deferred scan with the input projection in the loop ("in-loop", the CPU choice)
and hoisted before it, at unroll 1, 2, 4 and 8, for the cells in --cells; PyTorch nn.LSTM / nn.GRU
(cuDNN); the plain lax.scan LSTM. Batch 64, T = 512, input size = hidden size, as bench_gpu.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util

import jax.numpy as jnp

from experiments import bench_gpu as bg


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--hidden", default="256,1024")
    p.add_argument("--cells", default="lstm")
    p.add_argument("--unrolls", default="1,2,4,8")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--precisions", default="fp32,half")
    p.add_argument("--tasks", default="train,infer")
    p.add_argument("--linear-lengths", default="", help="also time minGRU's chunked kernel at these T "
                   "(batch 8, H = 256) for each chunk length in --chunks, against lax.associative_scan")
    p.add_argument("--chunks", default="auto,32,64,128,512")
    p.add_argument("--steps", default="1", help="steps each kernel program loads at once (linear.STEP_BLOCK)")
    p.add_argument("--bare", action="store_true", help="time the bare recurrence, not minGRU's training step")
    p.add_argument("--persist-configs", default="128/8/3,128/4/1,128/8/1,256/8/1,256/8/3,512/8/1,128/8/3/x",
                   help="the persistent LSTM kernels' K_BLOCK/NUM_WARPS/NUM_STAGES settings to time; a "
                        "fourth field x runs the reverse loop as the deferred scan's lax.scan (BACKWARD=False)")
    p.add_argument("--ln-fused", action="store_true", help="cells: also time each layer-norm LSTM with its "
                   "hand-written backward step (recur.cells.lstm.LN_FUSED_BACKWARD)")
    p.add_argument("--pad-three", action="store_true", help="cells: also time each cell's persistent kernel "
                   "(mode='kernel') as it is and with 3 gate blocks as one padded window of 4 "
                   "(recur.kernels.persistent.PAD_THREE), with their errors against the sequential scan")
    p.add_argument("--poll-load", action="store_true", help="cells: also time each cell's persistent kernel "
                   "(mode='kernel') with its barriers polling by volatile loads (recur.kernels.persistent.POLL)")
    p.add_argument("--parts", default="cells,linear", help="cells, linear, persistent")
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    have_torch = importlib.util.find_spec("torch") is not None
    scan_mod = importlib.import_module("recur.scan")  # the module (recur.scan is also the function)
    default = scan_mod.projects_in_loop

    def with_switch(inside, make):
        def made():
            # the choice the scan makes on a CPU (in the loop) or on a GPU (hoisted)
            scan_mod.projects_in_loop = lambda cell, projected: default(cell, projected, "cpu" if inside else "gpu")
            try:
                f = make()
                f()  # traced and compiled while the switch holds
            finally:
                scan_mod.projects_in_loop = default
            return f
        return made
    from recur.cells import lstm
    from recur.kernels import persistent as ps

    rows = []
    for H, task, train, prec, jdt in _shapes(a) if "cells" in a.parts else []:
        fns = {}
        if have_torch:
            for kind in ("LSTM", "GRU"):
                tdt = "fp32" if prec == "fp32" else "fp16"
                fns[f"torch {kind} {tdt}"] = (lambda k=kind, d=tdt: bg.torch_fn(k, H, a.batch, a.length, d, train))
        fns["lax.scan lstm"] = lambda: bg.lax_scan_lstm_fn(H, a.batch, a.length, jdt, train)
        for cell in bg.split_specs(a.cells):
            if bg.recur.get_cell(cell, H, dtype=jdt).fused_backward:  # else nothing projects in the loop
                fns[f"recur {cell} in-loop u1"] = with_switch(
                    True, lambda c=cell: bg.recur_fn(c, H, a.batch, a.length, jdt, "sequential", train))
            for u in [int(u) for u in a.unrolls.split(",")]:
                fns[f"recur {cell} hoisted u{u}"] = with_switch(
                    False, lambda c=cell, u=u: bg.recur_fn(c, H, a.batch, a.length, jdt, "sequential", train, u))
                if a.ln_fused and getattr(bg.recur.get_cell(cell, H), "layer_norm_fusable", False):
                    fns[f"recur {cell} ln-fused hoisted u{u}"] = with_attr(lstm, "LN_FUSED_BACKWARD", True, with_switch(
                        False, lambda c=cell, u=u: bg.recur_fn(c, H, a.batch, a.length, jdt, "sequential", train, u)))
            kernel = lambda c=cell: bg.recur_fn(c, H, a.batch, a.length, jdt, "kernel", train)
            if a.pad_three or a.poll_load:
                fns[f"recur {cell} kernel"] = kernel
            if a.pad_three:
                fns[f"recur {cell} kernel pad-three"] = with_attr(ps, "PAD_THREE", True, kernel)
            if a.poll_load:
                fns[f"recur {cell} kernel poll-load"] = with_attr(ps, "POLL", "load", kernel)
        print(f"H={H} {prec} {task}", flush=True)
        first_unroll = a.unrolls.split(",")[0]
        for name, (compile_s, t) in bg._time(fns, a.repeats).items():
            # a kernel row's loss or gradients against its cell's sequential scan
            ref = bg.RESULTS.get(f"recur {name.split()[1]} hoisted u{first_unroll}") if " kernel" in name else None
            err = bg.rel_err(bg.RESULTS[name], ref) if ref is not None else ""
            rows.append(dict(part="explore", system=name, H=H, precision=prec, task=task, T=a.length, B=a.batch,
                             ms=round(t * 1e3, 3), compile_s=round(compile_s, 2), note=bg.NOTES.get(name, ""),
                             err_vs_seq=bg.fmt_err(err)))
            print(f"  {name:32s} {t * 1e3:9.3f} ms   (first call {compile_s:.1f} s)"
                  + (f"  rel. err vs sequential {err:.1e}" if err != "" else ""), flush=True)
        bg.RESULTS.clear()
        if a.out:
            bg.write(rows, a.out, bg.jax.devices()[0].device_kind)
    if "linear" in a.parts and a.linear_lengths:
        linear(a, rows)
    if "persistent" in a.parts:
        persistent(a, rows, have_torch)
    return rows


def persistent(a, rows, have_torch):
    """The plain LSTM through the persistent kernels (mode="kernel") at each K_BLOCK / warps /
    stages setting, with the backward kernel or the lax.scan reverse loop, against recur's
    sequential scan (and its values: err_vs_seq) and cuDNN."""
    from recur.kernels import persistent as ps

    configs = []
    for c in a.persist_configs.split(","):
        f = c.split("/")
        configs.append((int(f[0]), int(f[1]), int(f[2]), f[3:] != ["x"]))
    for H, task, train, prec, jdt in _shapes(a):
        fns = {}
        if have_torch:
            tdt = "fp32" if prec == "fp32" else "fp16"
            fns[f"torch LSTM {tdt}"] = lambda d=tdt: bg.torch_fn("LSTM", H, a.batch, a.length, d, train)
        ref = "recur lstm sequential"
        fns[ref] = lambda: bg.recur_fn("lstm", H, a.batch, a.length, jdt, "sequential", train)
        for kb, warps, stages, backward in configs:
            if not (train or backward):
                continue  # inference has no backward pass
            def make(kb=kb, warps=warps, stages=stages, backward=backward):
                before = ps.K_BLOCK, ps.NUM_WARPS, ps.NUM_STAGES, ps.BACKWARD
                ps.K_BLOCK, ps.NUM_WARPS, ps.NUM_STAGES, ps.BACKWARD = kb, warps, stages, backward
                try:
                    f = bg.recur_fn("lstm", H, a.batch, a.length, jdt, "kernel", train)
                    f()  # traced and compiled with these settings
                finally:
                    ps.K_BLOCK, ps.NUM_WARPS, ps.NUM_STAGES, ps.BACKWARD = before
                return f
            fns[f"recur lstm persistent K={kb} w={warps} s={stages}" + ("" if backward else " xla-bwd")] = make
        print(f"H={H} {prec} {task} (layout {ps.layout(a.batch, H, ps.sm_count())})", flush=True)
        for name, (compile_s, t) in bg._time(fns, a.repeats).items():
            err = bg.rel_err(bg.RESULTS[name], bg.RESULTS[ref]) if "persistent" in name else ""
            rows.append(dict(part="persistent", system=name, H=H, precision=prec, task=task, T=a.length,
                             B=a.batch, ms=round(t * 1e3, 3), compile_s=round(compile_s, 2),
                             note=bg.NOTES.get(name, ""), err_vs_seq=bg.fmt_err(err)))
            print(f"  {name:40s} {t * 1e3:9.3f} ms   (first call {compile_s:.1f} s)"
                  + (f"  rel. err vs sequential {err:.1e}" if err != "" else ""), flush=True)
        bg.RESULTS.clear()
        if a.out:
            bg.write(rows, a.out, bg.jax.devices()[0].device_kind)


def with_attr(obj, name, value, make):
    """make, its function traced and compiled (called once) with obj.name set to value: the
    switches recur reads while tracing (the layer-norm LSTM's hand-written backward step, the
    persistent kernels' padded three gates)."""
    def made():
        before = getattr(obj, name)
        setattr(obj, name, value)
        try:
            f = make()
            f()
            return f
        finally:
            setattr(obj, name, before)
    return made


def _shapes(a):
    """(H, task, train, precision, jax dtype) for every --hidden x --tasks x --precisions."""
    for H in [int(h) for h in a.hidden.split(",")]:
        for task in a.tasks.split(","):
            for prec in a.precisions.split(","):
                yield H, task, task == "train", prec, (jnp.float32 if prec == "fp32" else jnp.bfloat16)


def linear(a, rows):
    """minGRU's training step (or with --bare, the bare recurrence's forward + backward) with
    the associative scan and with the chunked kernel at each chunk length x steps per load."""
    from recur.kernels import linear as lin
    from recur.scan import _associative

    B, S = 8, 256
    cell = bg.recur.get_cell("mingru", S)
    params = cell.init(bg.jax.random.key(0), S)
    gpu = bg.jax.default_backend() == "gpu"
    variants = [("parallel", None, 1)] + [("kernel", None if c == "auto" else int(c), int(k))
                                          for c in a.chunks.split(",") for k in a.steps.split(",")]
    for T in [int(t) for t in a.linear_lengths.split(",")]:
        k = bg.jax.random.split(bg.jax.random.key(T), 3)
        xs = bg.jax.random.normal(k[0], (B, T, S), jnp.float32)
        coef = bg.jax.random.uniform(k[1], (B, T, S), jnp.float32, 0.5, 1.0)
        w = bg.jax.random.normal(k[2], (B, T, S), jnp.float32)
        fns = {}
        for mode, chunk, steps in variants:
            def make(mode=mode, chunk=chunk, steps=steps):
                lin.CHUNK, lin.STEP_BLOCK = chunk, steps
                try:
                    if a.bare:
                        rec = _associative if mode == "parallel" else (lambda x, y: lin.linear_recurrence(x, y, not gpu))
                        g = bg.jax.jit(bg.jax.grad(lambda x, y: jnp.sum(rec(x, y) * w), argnums=(0, 1)))
                        args = (coef, xs)
                    else:
                        g = bg.jax.jit(bg.jax.grad(lambda p, x: jnp.mean(jnp.square(bg.recur.scan(cell, p, x, mode=mode)[0])),
                                                   argnums=(0, 1)))
                        args = (params, xs)
                    g(*args)
                finally:
                    lin.CHUNK, lin.STEP_BLOCK = None, 1
                return lambda: bg._block(g(*args))
            what = "scan" if a.bare else "minGRU"
            name = f"{what} parallel" if mode == "parallel" else f"{what} kernel L={chunk or 'auto'} K={steps}"
            fns[name] = make
        ref = f"{'scan' if a.bare else 'minGRU'} parallel"
        for name, (compile_s, t) in bg._time(fns, a.repeats).items():
            err = bg.rel_err(bg.RESULTS[name], bg.RESULTS[ref]) if name != ref else ""
            gbs = bg.scan_gb(B, T, S) / t if a.bare else ""
            rows.append(dict(part="linear", system=name, H=S, precision="fp32", task="train", T=T, B=B,
                             ms=round(t * 1e3, 3), compile_s=round(compile_s, 2), GBs=round(gbs, 1) if gbs else "",
                             err_vs_seq=bg.fmt_err(err)))
            print(f"  T={T:6d} {name:28s} {t * 1e3:9.3f} ms" + (f"  {gbs:7.1f} GB/s" if gbs else "")
                  + (f"  rel. err {err:.1e}" if err != "" else ""), flush=True)
        bg.RESULTS.clear()
        if a.out:
            bg.write(rows, a.out, bg.jax.devices()[0].device_kind)


if __name__ == "__main__":
    main()
