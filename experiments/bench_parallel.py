"""Sequential vs parallel vs chunked scans of a linear cell (minGRU): training-step time against T.

    pip install -e .[bench]          # matplotlib for the plot
    python -m experiments.bench_parallel --out docs/bench_parallel        # writes .csv and .png
    python -m experiments.bench_parallel --lengths 8192,16384 --append --out docs/bench_parallel
    python -m experiments.bench_parallel --accuracy --accuracy-length 16384   # float32 vs float64

Timing: one layer ``recur.scan(mingru, params, xs, mode=...)`` with xs [B, T, I]; the step is
jax.value_and_grad of mean(hs**2) with respect to the params and xs (a layer inside a network),
jitted; compile time is measured on its own and excluded. With ``--projected`` the input
projection us = W_x xs + b is computed once outside the step and the step is the scan alone,
``recur.scan(..., us, projected=True)``, differentiated with respect to the params and us (the
recurrence and the gates, which is what the modes differ in). The modes run interleaved, one
step each per round, for ``--rounds`` rounds; min and median are reported. Each mode's outputs
and gradients are compared with the sequential scan's (max abs difference).

Modes: ``sequential``, ``parallel`` and ``chunked`` are recur.scan's; ``associative`` is
``mode="parallel"`` traced with ``RECUR_CPU_KERNELS=0``, i.e. ``lax.associative_scan`` (on the
CPU, ``parallel`` runs the compiled chunked scan of recur/kernels/cpu.py instead; elsewhere the
two are the same computation).

Accuracy (``--accuracy``): float32 sequential, parallel and chunked scans (and two closed forms
for reference: the plain cumulative-product form s_t = A_t (s_0 + sum_k b_k / A_k) and the
log-space form of Feng et al. / Heinsen with logcumsumexp) against a float64 sequential scan.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import recur
from recur.kernels import cpu as cpu_kernels

MODES = ("sequential", "parallel", "chunked", "associative")


def _tracing(mode):
    """While tracing "associative": the CPU kernels off, so mode="parallel" is lax.associative_scan."""
    return cpu_kernels.switched(False) if mode == "associative" else contextlib.nullcontext()


def make_step(cell, mode, chunk, projected=False):
    scan_mode = "parallel" if mode == "associative" else mode

    def loss(params, xs):
        hs, _ = recur.scan(cell, params, xs, mode=scan_mode, chunk=chunk, projected=projected)
        return jnp.mean(jnp.square(hs.astype(jnp.float32))), hs

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def max_abs(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def bench(args):
    cell = recur.get_cell(args.cell, args.hidden)
    params = cell.init(jax.random.key(0), args.input)
    rows = []
    for T in args.lengths:
        xs = jax.random.normal(jax.random.key(1), (args.batch, T, args.input))
        if args.projected:
            xs = jax.jit(cell.project)(params, xs)
        steps, compile_s, outs = {}, {}, {}
        for mode in MODES:
            f = make_step(cell, mode, args.chunk, args.projected)
            t0 = time.perf_counter()
            with _tracing(mode):
                compiled = f.lower(params, xs).compile()
            compile_s[mode] = time.perf_counter() - t0
            steps[mode] = compiled
            outs[mode] = jax.block_until_ready(compiled(params, xs))  # warm-up, and the results
        times = {m: [] for m in MODES}
        for _ in range(args.rounds):
            for mode in MODES:
                t0 = time.perf_counter()
                jax.block_until_ready(steps[mode](params, xs))
                times[mode].append(time.perf_counter() - t0)
        (_, hs_ref), g_ref = outs["sequential"]
        for mode in MODES:
            (_, hs), g = outs[mode]
            row = dict(T=T, mode=mode, batch=args.batch, hidden=args.hidden, input=args.input,
                       projected=int(args.projected), chunk=args.chunk if mode == "chunked" else "",
                       min_s=min(times[mode]), median_s=statistics.median(times[mode]),
                       compile_s=compile_s[mode], max_abs_diff_hs=max_abs(hs, hs_ref),
                       max_abs_diff_grad=max_abs(g, g_ref),
                       max_abs_grad=max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(g_ref)))
            rows.append(row)
            print(f"T={T:6d} {mode:10s} min {row['min_s']:.4f}s  median {row['median_s']:.4f}s  "
                  f"compile {row['compile_s']:.1f}s  |dhs| {row['max_abs_diff_hs']:.1e}  "
                  f"|dgrad| {row['max_abs_diff_grad']:.1e} (max |grad| {row['max_abs_grad']:.1e})",
                  flush=True)
        seq = statistics.median(times["sequential"])
        print(f"T={T:6d} " + "  ".join(f"sequential/{m} {seq / statistics.median(times[m]):.2f}x"
                                       for m in MODES[1:]), flush=True)
    return rows


def write(rows, out, append):
    csv_path = pathlib.Path(out).with_suffix(".csv")
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    old = []
    if append and csv_path.exists():
        with open(csv_path) as f:
            old = [r for r in csv.DictReader(f)]
        new_keys = {(str(r["T"]), r["mode"]) for r in rows}
        old = [r for r in old if (r["T"], r["mode"]) not in new_keys]
    rows = old + rows
    rows.sort(key=lambda r: (int(r["T"]), MODES.index(r["mode"])))
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print("wrote", csv_path)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e .[bench]): no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for mode in MODES:
        pts = sorted((int(r["T"]), float(r["median_s"])) for r in rows if r["mode"] == mode)
        label = mode
        if mode == "chunked":
            label = "chunked (chunk=" + next(str(r["chunk"]) for r in rows if r["mode"] == "chunked") + ")"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    r0 = rows[0]
    what = "scan of projected inputs" if int(r0.get("projected") or 0) else f"layer, I={r0['input']}"
    ax.set(xscale="log", yscale="log", xlabel="sequence length T", ylabel="training step, median s",
           title=f"minGRU H={r0['hidden']} B={r0['batch']} {what}, {platform.machine()} CPU")
    ax.set_xscale("log", base=2)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = csv_path.with_suffix(".png")
    fig.savefig(png)
    print("wrote", png)


def accuracy(args):
    """Max abs error of float32 scans against a float64 sequential scan at one long T."""
    T, B, H, I = args.accuracy_length, 4, 64, 16
    cell32 = recur.get_cell(args.cell, H)
    params = cell32.init(jax.random.key(0), I)
    xs = jax.random.normal(jax.random.key(1), (B, T, I))
    w = jax.random.normal(jax.random.key(2), (B, T, H))

    def loss(cell, mode):
        def f(p, x):
            hs, _ = recur.scan(cell, p, x, mode=mode, chunk=args.chunk)
            return jnp.sum(hs * w.astype(hs.dtype)), hs
        return jax.jit(jax.grad(f, has_aux=True))

    with jax.enable_x64(True):
        cell64 = recur.get_cell(args.cell, H, dtype=jnp.float64, param_dtype=jnp.float64)
        p64 = jax.tree.map(lambda x: jnp.asarray(np.asarray(x), jnp.float64), params)
        g64, hs64 = loss(cell64, "sequential")(p64, jnp.asarray(np.asarray(xs), jnp.float64))
        g64, hs64 = jax.tree.map(np.asarray, (g64, hs64))
    a, b = cell32.coefficients(params, cell32.project(params, xs))
    log_a = np.log(np.asarray(a, np.float64))
    print(f"{args.cell} T={T} B={B} H={H}: a_t in [{float(a.min()):.3g}, {float(a.max()):.3g}], "
          f"products of a over the whole sequence down to exp({log_a.sum(1).min():.0f}), "
          f"float32 underflows below exp(-103)")
    print(f"{'float32 form':40s} {'max |hs - hs64|':>16s} {'max |grad - grad64|':>20s}  (max |hs64| "
          f"{np.abs(hs64).max():.3g}, max |grad64| {max(np.abs(x).max() for x in jax.tree.leaves(g64)):.3g})")
    for mode in MODES:
        with _tracing(mode):
            g, hs = loss(cell32, "parallel" if mode == "associative" else mode)(params, xs)
        err_g = max(float(np.abs(np.asarray(x) - y).max()) for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(g64)))
        print(f"{'recur.scan mode=' + mode:40s} {float(np.abs(np.asarray(hs) - hs64).max()):16.2e} {err_g:20.2e}")
    # the closed forms, for reference (s_0 = 0; outputs are the states for minGRU)
    A = jnp.cumprod(a, axis=1)
    plain = A * jnp.cumsum(b / A, axis=1)
    finite = bool(jnp.isfinite(plain).all())
    print(f"{'closed form A_t * cumsum(b / A) (plain)':40s} {float(jnp.nanmax(jnp.abs(plain - hs64))):16.2e}"
          f" {'':20s}  finite everywhere: {finite}; first non-finite step: "
          f"{int(jnp.argmax(~jnp.isfinite(plain).all(axis=(0, 2)))) if not finite else '-'}")
    if bool((b > 0).all()):
        a_star = jnp.cumsum(jnp.log(a), axis=1)
        log_s = a_star + jax.lax.cumlogsumexp(jnp.log(b) - a_star, axis=1)
        print(f"{'log space: exp(a* + logcumsumexp(log b - a*))':40s} "
              f"{float(jnp.max(jnp.abs(jnp.exp(log_s) - hs64))):16.2e}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cell", default="mingru")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--input", type=int, default=256, help="input features per step (I)")
    p.add_argument("--lengths", default="128,256,512,1024,2048,4096",
                   help="comma-separated T values")
    p.add_argument("--chunk", type=int, default=256, help="steps per chunk of mode='chunked'")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="docs/bench_parallel", help="writes OUT.csv and OUT.png")
    p.add_argument("--append", action="store_true", help="merge into an existing OUT.csv")
    p.add_argument("--projected", action="store_true",
                   help="time the scan of precomputed projected inputs (no input projection in the step)")
    p.add_argument("--accuracy", action="store_true", help="only the float32-vs-float64 check")
    p.add_argument("--accuracy-length", type=int, default=16384)
    args = p.parse_args(argv)
    args.lengths = [int(t) for t in args.lengths.split(",")]
    print(f"jax {jax.__version__}, {platform.machine()}, {jax.devices()[0].device_kind}")
    if args.accuracy:
        accuracy(args)
        return
    rows = bench(args)
    write(rows, args.out, args.append)
    return rows


if __name__ == "__main__":
    main()
