"""Peak memory of a char-LM training step against T for each remat policy of recur.scan.

    python -m experiments.bench_memory                      # the table: XLA's estimate, nothing runs
    python -m experiments.bench_memory --lengths 1024,65536 --batch 8 --hidden 512
    python -m experiments.bench_memory --run 65536 --remat sqrt    # run one step for real: time, RSS

The step: embedding (V=65 -> E=64), one LSTM layer (E -> H) run by ``recur.scan`` over the whole
window of T characters, a softmax over V, the mean next-character cross-entropy, its gradient and
one Adam update (the char-LM of configs/char_lm.py, whole-sequence BPTT instead of 64-step windows).

Policies: remat="none" with backward="deferred" (the default: custom VJP, recur/backprop.py) and
with backward="autodiff" (jax.grad of lax.scan); remat="step" (store only the carries between
steps); remat="sqrt" (store the carry every ceil(sqrt(T)) steps, recompute each chunk); remat=N.
The table is XLA's buffer assignment for the compiled step (``compiled.memory_analysis()``:
temporaries + arguments + outputs - aliased), so it needs no memory and runs at any T. ``--run``
executes the step and reports its time (compile excluded) and the process' peak RSS
(``resource.getrusage``: everything the process touched, Python and XLA included).
"""
from __future__ import annotations

import argparse
import csv
import pathlib
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import recur
from recur import metrics
from experiments.benchmark import adam_step

POLICIES = {  # label -> (remat, backward)
    "none/deferred": ("none", "deferred"),
    "none/autodiff": ("none", "autodiff"),
    "step": ("step", "autodiff"),
    "sqrt": ("sqrt", "autodiff"),
}
GiB = 2**30


def make_step(cell_name, V, E, H, remat, backward):
    cell = recur.get_cell(cell_name, H)
    k = jax.random.split(jax.random.key(0), 3)
    params = {"embed": 0.1 * jax.random.normal(k[0], (V, E)), "rnn": cell.init(k[1], E),
              "head": 0.05 * jax.random.normal(k[2], (V, cell.output_size)), "bias": jnp.zeros((V,))}
    tx = optax.adam(1e-3)

    def loss_fn(params, x, y):
        e = params["embed"][x]
        hs, _ = recur.scan(cell, params["rnn"], e, remat=remat, backward=backward)
        logits = jnp.einsum("bth,vh->btv", hs, params["head"]) + params["bias"][None, None, :]
        total, count = metrics.cross_entropy(logits, y)
        return total / count

    return adam_step(loss_fn, tx), (params, tx.init(params))


def estimate(args, T, label):
    remat, backward = POLICIES[label] if label in POLICIES else (int(label), "autodiff")
    step, state = make_step(args.cell, args.vocab, args.embed, args.hidden, remat, backward)
    tokens = jax.ShapeDtypeStruct((args.batch, T), jnp.int32)
    t0 = time.perf_counter()
    compiled = step.lower(state, tokens, tokens).compile()
    ma = compiled.memory_analysis()
    peak = ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
    return dict(T=T, policy=label, batch=args.batch, hidden=args.hidden,
                temp_GiB=ma.temp_size_in_bytes / GiB,
                args_out_GiB=(ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes) / GiB,
                peak_GiB=peak / GiB, compile_s=time.perf_counter() - t0)


def table(args):
    rows = []
    labels = args.policies.split(",")
    print(f"{'T':>7s} " + " ".join(f"{l:>14s}" for l in labels) + "   (GiB: XLA temp + args + outputs)")
    for T in args.lengths:
        line = []
        for label in labels:
            row = estimate(args, T, label)
            rows.append(row)
            line.append(f"{row['peak_GiB']:14.3f}")
        print(f"{T:7d} " + " ".join(line), flush=True)
    if args.out:
        path = pathlib.Path(args.out).with_suffix(".csv")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        print("wrote", path)


def run(args):
    T, label = args.run, args.remat
    row = estimate(args, T, label)
    print(f"XLA estimate: peak {row['peak_GiB']:.2f} GiB (temp {row['temp_GiB']:.2f}), compile {row['compile_s']:.1f}s")
    remat, backward = POLICIES[label] if label in POLICIES else (int(label), "autodiff")
    step, state = make_step(args.cell, args.vocab, args.embed, args.hidden, remat, backward)
    tokens = jax.random.randint(jax.random.key(1), (args.batch, T + 1), 0, args.vocab)
    x, y = tokens[:, :-1], tokens[:, 1:]
    t0 = time.perf_counter()
    compiled = step.lower(state, x, y).compile()
    print(f"compiled in {time.perf_counter() - t0:.1f}s", flush=True)
    times, losses = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, loss = compiled(state, x, y)
        losses.append(float(loss))  # blocks until the step is done
        times.append(time.perf_counter() - t0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(f"{args.cell} H={args.hidden} B={args.batch} T={T} remat={label}: steps {args.steps}, "
          f"min {min(times):.1f}s median {statistics.median(times):.1f}s per step, "
          f"{args.batch * T / min(times):.0f} tokens/s, losses {[round(l, 3) for l in losses]}, "
          f"peak RSS {rss:.2f} GiB")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cell", default="lstm")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--embed", type=int, default=64)
    p.add_argument("--vocab", type=int, default=65, help="tiny Shakespeare has 65 characters")
    p.add_argument("--lengths", default="1024,4096,16384,65536")
    p.add_argument("--policies", default=",".join(POLICIES),
                   help="comma-separated: none/deferred, none/autodiff, step, sqrt or a chunk length")
    p.add_argument("--out", default="", help="also write OUT.csv")
    p.add_argument("--run", type=int, default=0, help="run one training step at this T for real")
    p.add_argument("--remat", default="sqrt", help="the policy for --run (a label of --policies)")
    p.add_argument("--steps", type=int, default=2, help="steps to time with --run")
    args = p.parse_args(argv)
    args.lengths = [int(t) for t in args.lengths.split(",")]
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}")
    if args.run:
        run(args)
    else:
        table(args)


if __name__ == "__main__":
    main()
