"""Side-by-side throughput of recurrent LM training steps: recur vs Flax linen nn.RNN vs PyTorch.

    python -m experiments.benchmark                                  # the issue-4 shape, every cell
    python -m experiments.benchmark --cells lstm,gru --batch 32 --length 128 --hidden 256
    python -m experiments.benchmark --out docs/bench                 # also writes .md and .csv

One task for every system: an embedding (V -> E), one recurrent layer (E -> H), a softmax over V,
the mean next-token cross-entropy, its gradient and one Adam update, on random tokens. Each
measurement is compiled and warmed up first (compile time is reported on its own), then timed
over ``--repeats`` rounds of ``--steps`` steps, interleaving the systems round by round so that
machine noise hits them alike; the median round counts. Ratios are against PyTorch when it is
installed (``pip install torch``), else against Flax. Peak memory is XLA's buffer estimate
(``compiled.memory_analysis()``: arguments + outputs + temporaries) for the JAX systems and
``torch.cuda.max_memory_allocated`` on a GPU.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from recur.models.lm import LanguageModel

TORCH_CELLS = {"lstm": "LSTM", "gru": "GRU", "elman": "RNN"}
FLAX_CELLS = {"lstm": "OptimizedLSTMCell", "gru": "GRUCell", "elman": "SimpleCell"}


def recur_step(cell: str, V: int, E: int, H: int, B: int, T: int):
    from flax import nnx

    from recur import metrics

    model = LanguageModel(V, embed_dim=E, hidden_size=H, cell=cell, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.adam(1e-3)
    state = (params, tx.init(params))

    def loss_fn(params, x, y):
        logits, _ = nnx.merge(graphdef, params)(x)
        total, count = metrics.cross_entropy(logits, y)
        return total / count

    def step(state, x, y):
        params, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return jax.jit(step, donate_argnums=0), state


def flax_step(cell: str, V: int, E: int, H: int, B: int, T: int):
    import flax.linen as nn

    cell_cls = getattr(nn, FLAX_CELLS[cell])

    class LM(nn.Module):
        @nn.compact
        def __call__(self, x):
            e = nn.Embed(V, E)(x)
            h = nn.RNN(cell_cls(H))(e)
            return nn.Dense(V)(h)

    model = LM()
    params = model.init(jax.random.key(0), jnp.zeros((B, T), jnp.int32))
    tx = optax.adam(1e-3)
    state = (params, tx.init(params))

    def step(state, x, y):
        params, opt_state = state

        def loss_fn(p):
            logits = model.apply(p, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return jax.jit(step, donate_argnums=0), state


def torch_runner(cell: str, V: int, E: int, H: int, B: int, T: int):
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rnn_cls = getattr(torch.nn, TORCH_CELLS[cell])
    embed, rnn, head = torch.nn.Embedding(V, E), rnn_cls(E, H, batch_first=True), torch.nn.Linear(H, V)
    modules = torch.nn.ModuleList([embed, rnn, head]).to(device)
    opt = torch.optim.Adam(modules.parameters(), 1e-3)
    x = torch.randint(0, V, (B, T), device=device)
    y = torch.randint(0, V, (B, T), device=device)

    def run(steps):
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            out, _ = rnn(embed(x))
            loss = torch.nn.functional.cross_entropy(head(out).reshape(-1, V), y.reshape(-1))
            loss.backward()
            opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        return float(loss)

    return run


def jax_runner(make, cell, V, E, H, B, T):
    step, state = make(cell, V, E, H, B, T)
    x = jax.random.randint(jax.random.key(1), (B, T), 0, V)
    y = jax.random.randint(jax.random.key(2), (B, T), 0, V)
    t0 = time.perf_counter()
    compiled = step.lower(state, x, y).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    peak = None if mem is None else (mem.argument_size_in_bytes + mem.output_size_in_bytes
                                     + mem.temp_size_in_bytes)
    box = [state]

    def run(steps):
        s = box[0]
        for _ in range(steps):
            s, loss = compiled(s, x, y)
        box[0] = s
        return float(loss)

    return run, compile_s, peak


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", default="lstm,gru,elman")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--embed", type=int, default=128)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="steps per timed round")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (median counts)")
    p.add_argument("--out", default="", help="write OUT.md and OUT.csv")
    a = p.parse_args(argv)
    have_torch = importlib.util.find_spec("torch") is not None
    V, E, H, B, T = a.vocab, a.embed, a.hidden, a.batch, a.length
    rows = []
    for cell in a.cells.split(","):
        systems = {}
        run, c, m = jax_runner(recur_step, cell, V, E, H, B, T)
        systems[f"recur {cell}"] = (run, c, m)
        base_cell = cell.split(":")[0]
        if base_cell in FLAX_CELLS:
            run, c, m = jax_runner(flax_step, base_cell, V, E, H, B, T)
            systems[f"flax nn.RNN({FLAX_CELLS[base_cell]})"] = (run, c, m)
        if have_torch and base_cell in TORCH_CELLS:
            systems[f"torch nn.{TORCH_CELLS[base_cell]}"] = (torch_runner(base_cell, V, E, H, B, T), None, None)
        for run, _, _ in systems.values():
            run(2)  # warm up
        times = {name: [] for name in systems}
        for _ in range(a.repeats):
            for name, (run, _, _) in systems.items():
                t0 = time.perf_counter()
                run(a.steps)
                times[name].append((time.perf_counter() - t0) / a.steps)
        ref = next((n for n in systems if n.startswith("torch")), None) or next(
            (n for n in systems if n.startswith("flax")), None)
        for name, (_, compile_s, peak) in systems.items():
            sec = statistics.median(times[name])
            rows.append({
                "cell": cell, "system": name, "ms_per_step": 1e3 * sec, "tokens_per_s": B * T / sec,
                "ratio_vs_" + ("torch" if have_torch else "flax"):
                    statistics.median(times[ref]) / sec if ref else float("nan"),
                "compile_s": compile_s, "peak_MiB": None if peak is None else peak / 2**20,
            })
    header = (f"{platform.processor() or platform.machine()}, {jax.devices()[0].platform}, jax {jax.__version__}; "
              f"B={B} T={T} E={E} H={H} V={V}, Adam, median of {a.repeats} rounds x {a.steps} steps")
    keys = list(rows[0])
    lines = [header, "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r[k]) for k in keys) + " |")
    print("\n".join(lines))
    if a.out:
        out = pathlib.Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text("\n".join(lines) + "\n")
        with open(out.with_suffix(".csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
    return rows


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.2f}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


if __name__ == "__main__":
    main()
