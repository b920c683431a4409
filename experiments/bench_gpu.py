"""Issue 7's GPU table: recur's kernels against cuDNN (PyTorch, jax.experimental.rnn), lax.scan and Flax.

    python -m experiments.bench_gpu --out docs/bench_gpu        # on a GPU machine: the full table
    python -m experiments.bench_gpu --smoke                      # tiny shapes, any backend (CI)

Where one command may run only so long (the lent GPU machines: 10 minutes a call), split it:
``--hidden 256 --parts cells``, ``--hidden 1024 --parts cells``, ``--parts linear``, each with
its own --out. OUT is rewritten after every shape, so a run cut short keeps what it measured.

Part 1, recurrent cells: forward + backward of mean(h^2) with respect to the weights and the
inputs, batch 64, T = 512, input size = hidden size, H = 256 and 1024, fp32 (PyTorch with TF32
on) and half precision (recur and lax.scan in bfloat16 with float32 state; cuDNN in fp16 and
bf16), and the forward pass alone ("infer"). Systems: PyTorch nn.LSTM / nn.GRU (cuDNN),
jax.experimental.rnn.lstm (cuDNN, fp32), Flax nn.RNN(OptimizedLSTMCell), recur's sequential scan
(``mode="sequential"``; unrolled 8 steps on a GPU) and recur's loop kernel (``mode="kernel"``,
which falls back to the sequential scan with a printed notice where the kernel does not lower)
for every cell in --cells, and ``mode="auto"`` for the plain LSTM; --modes picks others.
Part 2, linear cells (--linear-cells: minGRU, and the LRU, whose complex numbers the kernel takes
as their two parts): the scan at T = 512 .. 65,536 (batch 8, H = 256), lax.associative_scan
against recur's chunked kernel, forward + backward, with the achieved bandwidth (the bytes the
kernel must move: a, b and g read, s, da and db written, over the time) next to the GPU's peak.
For the minGRU, minLSTM and LRU the kernel row is recur/kernels/gated.py (coefficients inside
the kernels; bandwidth over its own traffic: 13 arrays for the minGRU, 7 for the LRU) and
"kernel, XLA's gates" is linear.py on the (a, b) that XLA computes (gated.ENABLED off), side by
side.

Each recur row's err_vs_seq is its result's largest relative error (loss, or each gradient)
against recur's sequential scan of the same cell (minGRU: against the associative scan), so a
kernel that runs fast but wrong shows. The sequential row's own err_vs_seq is how far its result
moves when its weights move by one rounding unit (2^-11 relative in fp32, TF32's; 2^-8 in bf16;
recur.kernels.autotune.nudge): a kernel's error near or under it is rounding, far over it a bug
(where it is large, as for a layer-norm LSTM's gradients at T = 512, the comparison says little). ``--baselines`` picks the comparison systems.

Part 3, the bare recurrence (no cell): lax.associative_scan against the chunked kernel at the
same lengths, forward + backward, with the bandwidth over the fewest bytes it must move (8 arrays
of B*T*S float32) and, beside them, a copy of that many bytes: the bandwidth the GPU reaches.

Every figure is the median of --repeats timed calls after a warm-up call; systems are
interleaved call by call so that machine noise hits them alike. Compile times (the first call)
are reported on their own. Writes OUT.md and OUT.csv.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import pathlib
import statistics
import time
import warnings

import jax
import jax.numpy as jnp

import recur
from recur.cells import split_specs
from recur.kernels import autotune
from recur.kernels.dispatch import KernelFallback, first_line

PEAK_GBS = {"H100": 3350.0, "H200": 4800.0}  # HBM bandwidth (SXM parts), GB/s


def peak_gbs():
    """This GPU's peak memory bandwidth (PEAK_GBS, by device kind), or None."""
    return next((v for k, v in PEAK_GBS.items() if k in jax.devices()[0].device_kind), None)


def scan_gb(B, T, S):
    """The fewest GB the bare recurrence's forward + backward moves: 8 arrays of B*T*S float32
    (forward reads a, b and writes s; backward reads a, s and the cotangent, writes da, db)."""
    return B * T * S * 4 * 8 / 1e9


def fmt_err(err):
    """err_vs_seq's table entry: the error, or "" where there is no reference to compare with."""
    return f"{err:.1e}" if err != "" else ""


def _block(x):
    return jax.tree.map(lambda a: a.block_until_ready(), x)


def recur_fn(cell_name, H, B, T, dtype, mode, train, unroll=None):
    """mode: a recur.scan mode, or MODE+REMAT (kernel+step: the persistent kernels recomputing the
    gates in the reverse loop)."""
    mode, _, remat = mode.partition("+")
    cell = recur.get_cell(cell_name, H, dtype=dtype)
    params = cell.init(jax.random.key(0), H)
    xs = jax.random.normal(jax.random.key(1), (B, T, H), dtype)

    def loss(p, x):
        hs, _ = recur.scan(cell, p, x, mode=mode, unroll=unroll, remat=remat or "none")
        return jnp.mean(jnp.square(hs.astype(jnp.float32)))

    f = jax.jit(jax.grad(loss, argnums=(0, 1)) if train else loss)
    run = lambda p=params: _block(f(p, xs))
    run.nudged = lambda: run(autotune.nudge(params, dtype))  # the same step, weights moved by one rounding
    return run


def lax_scan_lstm_fn(H, B, T, dtype, train):
    """The plain lax.scan LSTM with the input matmul hoisted (the issue's baseline row)."""
    k = jax.random.split(jax.random.key(0), 3)
    W = jax.random.normal(k[0], (H, 4 * H), dtype) / H ** 0.5
    U = jax.random.normal(k[1], (H, 4 * H), dtype) / H ** 0.5
    xs = jax.random.normal(k[2], (T, B, H), dtype)

    def loss(W, U, xs):
        us = (xs @ W).astype(jnp.float32)

        def step(hc, u):
            h, c = hc
            i, f, g, o = jnp.split(u + (h.astype(dtype) @ U).astype(jnp.float32), 4, axis=-1)
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
            return (h, c), h

        z = jnp.zeros((B, H), jnp.float32)
        _, hs = jax.lax.scan(step, (z, z), us)
        return jnp.mean(jnp.square(hs))

    f = jax.jit(jax.grad(loss, argnums=(0, 1, 2)) if train else loss)
    return lambda: _block(f(W, U, xs))


def flax_lstm_fn(H, B, T, dtype, train):
    from flax import linen as nn

    model = nn.RNN(nn.OptimizedLSTMCell(H, dtype=dtype))
    xs = jax.random.normal(jax.random.key(1), (B, T, H), dtype)
    params = model.init(jax.random.key(0), xs)

    def loss(p, x):
        return jnp.mean(jnp.square(model.apply(p, x).astype(jnp.float32)))

    f = jax.jit(jax.grad(loss, argnums=(0, 1)) if train else loss)
    return lambda: _block(f(params, xs))


def jax_cudnn_lstm_fn(H, B, T, train):
    from jax.experimental import rnn

    k = jax.random.split(jax.random.key(0), 2)
    n = rnn.get_num_params_in_lstm(H, H, 1, False)
    w = jax.random.normal(k[0], (n,), jnp.float32) * 0.05
    xs = jax.random.normal(k[1], (B, T, H), jnp.float32)
    z = jnp.zeros((1, B, H), jnp.float32)
    lengths = jnp.full((B,), T, jnp.int32)

    def loss(w, x):
        y, _, _ = rnn.lstm(x, z, z, w, lengths, H, H, 1, 0.0, False)
        return jnp.mean(jnp.square(y))

    f = jax.jit(jax.grad(loss, argnums=(0, 1)) if train else loss)
    return lambda: _block(f(w, xs))


def torch_fn(kind, H, B, T, dtype_name, train):
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    net = getattr(torch.nn, kind)(H, H, batch_first=True).to(dev, dt)
    x = torch.randn(B, T, H, device=dev, dtype=dt, requires_grad=train)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def run():
        if train:
            net.zero_grad(set_to_none=True)
            y, _ = net(x)
            y.float().pow(2).mean().backward()
        else:
            with torch.no_grad():
                net(x)
        sync()

    return run


NOTES = {}  # system name -> the fallback notices its first call raised (what actually ran)
RESULTS = {}  # system name -> what its first call returned (recur rows are checked against the sequential scan)


def rel_err(got, ref):
    """The largest ||got - ref|| / ||ref|| over the leaves (loss, or gradients of params and inputs)."""
    errs = [float(jnp.linalg.norm((a.astype(jnp.float32) - b.astype(jnp.float32)).ravel())
                  / (jnp.linalg.norm(b.astype(jnp.float32).ravel()) + 1e-30))
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref))]
    return max(errs)


def _time(fns, repeats):
    """{name: (compile_s, median_s)}, interleaving the systems call by call."""
    first, times = {}, {n: [] for n in fns}
    for name, make in list(fns.items()):
        t = time.perf_counter()
        decided = len(autotune.DECISIONS)
        try:
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.simplefilter("always", KernelFallback)
                fns[name] = make()
                RESULTS[name] = fns[name]()
            # what ran: the fallback notices, and what mode="auto" measured and took
            NOTES[name] = "; ".join([str(w.message) for w in seen if issubclass(w.category, KernelFallback)]
                                    + autotune.DECISIONS[decided:])
            if NOTES[name]:
                print(f"  {name}: {NOTES[name]}")
        except Exception as e:  # a system that does not run here (no cuDNN, bf16 unsupported...)
            print(f"  {name}: skipped ({type(e).__name__}: {first_line(e)})")
            fns[name] = None
        first[name] = time.perf_counter() - t
    for _ in range(repeats):
        for name, f in fns.items():
            if f is not None:
                t = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t)
    return {n: (first[n], statistics.median(v)) for n, v in times.items() if v}


def part1(args, have_torch, gpu, rows, save):
    for H in args.hidden:
        for train in (True, False):
            for prec in ("fp32", "half"):
                jdt = jnp.float32 if prec == "fp32" else jnp.bfloat16
                task = "train" if train else "infer"
                fns = {}
                if have_torch and "torch" in args.baselines:
                    for kind in ("LSTM", "GRU"):
                        for tdt in (["fp32"] if prec == "fp32" else ["fp16", "bf16"]):
                            fns[f"torch {kind} {tdt}"] = (lambda k=kind, d=tdt: torch_fn(k, H, args.batch, args.length, d, train))
                if gpu and prec == "fp32" and "jax-cudnn" in args.baselines:
                    fns["jax.experimental.rnn lstm (cuDNN)"] = lambda: jax_cudnn_lstm_fn(H, args.batch, args.length, train)
                if "lax" in args.baselines:
                    fns["lax.scan lstm"] = lambda: lax_scan_lstm_fn(H, args.batch, args.length, jdt, train)
                if "flax" in args.baselines:
                    fns["flax OptimizedLSTMCell"] = lambda: flax_lstm_fn(H, args.batch, args.length, jdt, train)
                for cell in args.cells:
                    for mode in args.modes or ("sequential", "kernel") + (("auto",) if cell == "lstm" else ()):
                        if "+" in mode and not train:  # a remat changes only the training step
                            continue
                        fns[f"recur {cell} {mode}"] = (lambda c=cell, m=mode: recur_fn(c, H, args.batch, args.length, jdt, m, train))
                print(f"H={H} {prec} {task}")
                RESULTS.clear()
                for name, (compile_s, t) in _time(fns, args.repeats).items():
                    # a recur kernel / auto row's loss or gradients against the sequential scan's; the
                    # sequential row's own when its weights move by one rounding unit: what a correct
                    # kernel's error may reach (a long layer-norm LSTM's gradients move ~100%)
                    ref = RESULTS.get(name.rsplit(" ", 1)[0] + " sequential")
                    if name.startswith("recur") and name.endswith(" sequential"):
                        err = rel_err(fns[name].nudged(), RESULTS[name])
                    else:
                        err = rel_err(RESULTS[name], ref) if name.startswith("recur") and ref is not None else ""
                    rows.append(dict(part="cells", system=name, note=NOTES.get(name, ""), H=H, precision=prec, task=task, T=args.length,
                                     B=args.batch, ms=round(t * 1e3, 3), compile_s=round(compile_s, 2),
                                     err_vs_seq=fmt_err(err)))
                    print(f"  {name:40s} {t * 1e3:9.3f} ms   (first call {compile_s:.1f} s)"
                          + (f"  rel. err vs sequential {err:.1e}" if err != "" else ""))
                RESULTS.clear()
                save()


LINEAR_NAMES = {"mingru": "minGRU", "minlstm": "minLSTM", "lru": "LRU"}


def part2(args, rows, save):
    B, S = args.linear_batch, args.linear_hidden
    peak = peak_gbs()
    for cell_name in args.linear_cells.split(","):
        cell = recur.get_cell(cell_name, S)
        params = cell.init(jax.random.key(0), S)
        label = LINEAR_NAMES.get(cell_name, cell_name)
        # bytes per state value (complex: twice; the LRU's state size is H)
        width = 8 if jnp.issubdtype(jax.eval_shape(lambda: cell.initial_carry(1)).dtype, jnp.complexfloating) else 4
        # arrays of [B, T, S] the recurrence moves per training step (not counted: the split of
        # complex arrays into parts before the kernels and the join after):
        # - on (a, b): forward reads a, b (x2 when chunked), writes s; backward reads a, g, s (x2
        #   a, g when chunked), writes da, db: 12 (XLA's gates and their backward not counted);
        # - gated.py (k gate blocks in us): forward reads us (x2), writes s: 2k + 1; backward
        #   reads us's k - 1 gate blocks and g, then us, g, s, writes d us: k + 2k + 2 (minGRU
        #   13, minLSTM 18); the LRU (a = λ, no reads; b = the input): 3 + 1 + 3 = 7.
        systems = {"parallel": ("parallel", True, 12), "kernel": ("kernel", True, 12)}
        if cell.gate_operands(params, jax.eval_shape(lambda: cell.project(params, jnp.zeros((1, 1, S))))) is not None:
            # recur/kernels/gated.py, beside linear.py on XLA's (a, b)
            systems["kernel"] = ("kernel", True, 7 if cell_name == "lru" else 5 * cell.n_blocks + 3)
            systems["kernel, XLA's gates"] = ("kernel", False, 12)
        for T in args.linear_lengths:
            xs = jax.random.normal(jax.random.key(1), (B, T, S), jnp.float32)
            fns = {}
            for system, (mode, gates_inside, _) in systems.items():
                def make(mode=mode, gates_inside=gates_inside):
                    from recur.kernels import gated

                    g = jax.jit(jax.grad(lambda p, x: jnp.mean(jnp.square(recur.scan(cell, p, x, mode=mode)[0])),
                                         argnums=(0, 1)))
                    before, gated.ENABLED = gated.ENABLED, gates_inside
                    try:
                        _block(g(params, xs))  # traced here, with the switch as asked
                    finally:
                        gated.ENABLED = before
                    return lambda: _block(g(params, xs))
                fns[f"{label} {system}"] = make
            RESULTS.clear()
            ref = f"{label} parallel"
            for name, (compile_s, t) in _time(fns, args.repeats).items():
                err = rel_err(RESULTS[name], RESULTS[ref]) if name != ref and ref in RESULTS else ""
                arrays = systems[name[len(label) + 1:]][2]
                gb = B * T * S * width * arrays / 1e9
                bw = gb / t
                rows.append(dict(part="linear", system=name, H=S, precision="fp32", task="train", T=T, B=B,
                                 ms=round(t * 1e3, 3), compile_s=round(compile_s, 2), GBs=round(bw, 1),
                                 err_vs_seq=fmt_err(err), note=f"GB/s over {arrays} arrays of [B, T, S]",
                                 peak_frac=round(bw / peak, 3) if peak else ""))
                print(f"  T={T:6d} {name:28s} {t * 1e3:9.3f} ms  {bw:8.1f} GB/s of recurrence traffic ({arrays} arrays)")
            save()


def part3(args, gpu, rows, save):
    """The bare recurrence s_t = a_t * s_{t-1} + b_t (no cell around it), forward + backward of
    sum(s * w): lax.associative_scan against recur's chunked kernel, and a copy of the same bytes
    (the bandwidth this GPU reaches, measured beside them), with GB/s over :func:`scan_gb`."""
    from recur.kernels.linear import linear_recurrence
    from recur.scan import _associative

    B, S = args.linear_batch, args.linear_hidden
    peak = peak_gbs()
    interpret = not gpu
    for T in args.linear_lengths:
        k = jax.random.split(jax.random.key(T), 3)
        a = jax.random.uniform(k[0], (B, T, S), jnp.float32, 0.5, 1.0)
        b = jax.random.normal(k[1], (B, T, S), jnp.float32)
        w = jax.random.normal(k[2], (B, T, S), jnp.float32)
        copy_src = jnp.concatenate([a.ravel(), b.ravel(), w.ravel(), a.ravel()])  # 4 arrays read, 4 written
        systems = {"scan: lax.associative_scan": _associative,
                   "scan: recur chunked kernel": lambda a, b: linear_recurrence(a, b, interpret)}
        fns = {}
        for name, rec in systems.items():
            def make(rec=rec):
                g = jax.jit(jax.grad(lambda a, b: jnp.sum(rec(a, b) * w), argnums=(0, 1)))
                return lambda: _block(g(a, b))
            fns[name] = make
        fns["copy (4 arrays in, 4 out)"] = lambda: (lambda f: lambda: _block(f(copy_src)))(jax.jit(lambda x: x * 1.0001))
        RESULTS.clear()
        for name, (compile_s, t) in _time(fns, args.repeats).items():
            ref = RESULTS.get("scan: lax.associative_scan")
            err = rel_err(RESULTS[name], ref) if name == "scan: recur chunked kernel" and ref is not None else ""
            bw = scan_gb(B, T, S) / t
            rows.append(dict(part="scan", system=name, H=S, precision="fp32", task="train", T=T, B=B,
                             ms=round(t * 1e3, 3), compile_s=round(compile_s, 2), GBs=round(bw, 1),
                             err_vs_seq=fmt_err(err),
                             peak_frac=round(bw / peak, 3) if peak else ""))
            print(f"  T={T:6d} {name:28s} {t * 1e3:9.3f} ms  {bw:8.1f} GB/s" + (f"  rel. err {err:.1e}" if err != "" else ""))
        RESULTS.clear()
        save()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", default="lstm,lstm:peepholes,lstm:ln,lstm:cifg,gru,gru:cho,mgu,elman")
    p.add_argument("--hidden", default="256,1024")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--linear-lengths", default="512,4096,16384,65536")
    p.add_argument("--linear-batch", type=int, default=8)
    p.add_argument("--linear-hidden", type=int, default=256)
    p.add_argument("--linear-cells", default="mingru,lru", help="part 2's cells (linear in their state)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--modes", default="", help="recur.scan modes timed for every cell (default: sequential "
                                               "and kernel, and auto for the LSTM); MODE+REMAT adds a remat, "
                                               "e.g. kernel+step")
    p.add_argument("--baselines", default="torch,jax-cudnn,lax,flax",
                   help="the comparison systems of part 1: torch (cuDNN), jax-cudnn, lax, flax")
    p.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script, measures nothing")
    p.add_argument("--parts", default="cells,linear,scan",
                   help="cells (part 1), linear (part 2: the linear cells' training step), scan (part 3: the bare recurrence)")
    p.add_argument("--out", default="", help="write OUT.md and OUT.csv (rewritten after every shape, so a run "
                                              "cut short keeps what it measured)")
    args = p.parse_args(argv)
    if args.smoke:
        args.cells, args.hidden, args.batch, args.length = "lstm,gru", "16", 4, 8
        args.linear_lengths, args.linear_batch, args.linear_hidden, args.repeats = "16,64", 2, 16, 2
    args.cells = split_specs(args.cells)
    args.baselines = args.baselines.split(",")
    args.modes = tuple(m for m in args.modes.split(",") if m)
    args.hidden = [int(h) for h in args.hidden.split(",")]
    args.linear_lengths = [int(t) for t in args.linear_lengths.split(",")]
    have_torch = importlib.util.find_spec("torch") is not None
    gpu = jax.default_backend() == "gpu"
    device = jax.devices()[0].device_kind
    print(f"device: {device}; jax {jax.__version__}; torch {'yes' if have_torch else 'absent'}")
    rows = []
    save = (lambda: write(rows, args.out, device)) if args.out else (lambda: None)
    parts = args.parts.split(",")
    if "cells" in parts:
        part1(args, have_torch, gpu, rows, save)
    if "linear" in parts:
        part2(args, rows, save)
    if "scan" in parts:
        part3(args, gpu, rows, save)
    return rows


def write(rows, out, device):
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    keys = ["part", "system", "H", "precision", "task", "B", "T", "ms", "compile_s", "err_vs_seq", "GBs", "peak_frac", "note"]
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(rows)
    lines = [f"Device: {device}; jax {jax.__version__}. Milliseconds per call (median).", "",
             "| " + " | ".join(keys[1:]) + " |", "|" + "---|" * (len(keys) - 1)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys[1:]) + " |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
