"""Side-by-side throughput of recurrent LM training steps: recur vs Flax linen nn.RNN vs PyTorch.

    python -m experiments.benchmark                                  # the issue-4 shape, every cell
    python -m experiments.benchmark --cells lstm,gru --batch 32 --length 128 --hidden 256
    python -m experiments.benchmark --cells lstm --length 64,256 --hidden 128,512 --modes train   # a grid
    python -m experiments.benchmark --out docs/bench                 # also writes .md and .csv

One task for every system: an embedding (V -> E), one recurrent layer (E -> H), a softmax over V,
the mean next-token cross-entropy, its gradient and one Adam update, on random tokens ("train");
and the forward pass to the logits alone ("infer"). Each
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

from recur.cells import split_specs
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

    def infer(state, x):
        return nnx.merge(graphdef, state[0])(x)[0]

    return adam_step(loss_fn, tx), state, jax.jit(infer)


def adam_step(loss_fn, tx):
    """jit(step)(state=(params, opt_state), x, y) -> (state, loss): one optax update, state donated."""

    def step(state, x, y):
        params, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return jax.jit(step, donate_argnums=0)


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

    def infer(state, x):
        return model.apply(state[0], x)

    return jax.jit(step, donate_argnums=0), state, jax.jit(infer)


def torch_runner(cell: str, V: int, E: int, H: int, B: int, T: int, train: bool = True):
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
        return float(loss.detach())

    @torch.no_grad()
    def infer(steps):
        for _ in range(steps):
            out, _ = rnn(embed(x))
            logits = head(out)
        if device == "cuda":
            torch.cuda.synchronize()
        return float(logits[0, 0, 0])

    return run if train else infer


def jax_runner(make, cell, V, E, H, B, T, train=True):
    step, state, infer = make(cell, V, E, H, B, T)
    x = jax.random.randint(jax.random.key(1), (B, T), 0, V)
    y = jax.random.randint(jax.random.key(2), (B, T), 0, V)
    t0 = time.perf_counter()
    if not train:
        compiled = infer.lower(state, x).compile()
        compile_s = time.perf_counter() - t0

        def run_infer(steps):
            for _ in range(steps):
                out = compiled(state, x)
            return float(out[0, 0, 0])

        return run_infer, compile_s, None
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


def _ints(text):
    return [int(v) for v in str(text).split(",")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", default="lstm,gru,elman")
    p.add_argument("--batch", default="32", help="one size or a comma list (a grid)")
    p.add_argument("--length", default="128", help="one size or a comma list")
    p.add_argument("--embed", type=int, default=128)
    p.add_argument("--hidden", default="256", help="one size or a comma list")
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--modes", default="train,infer", help="train (step with Adam) and/or infer (forward)")
    p.add_argument("--steps", type=int, default=5, help="steps per timed round")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (median counts)")
    p.add_argument("--out", default="", help="write OUT.md and OUT.csv")
    a = p.parse_args(argv)
    have_torch = importlib.util.find_spec("torch") is not None
    V, E = a.vocab, a.embed
    rows = []
    for B in _ints(a.batch):
        for T in _ints(a.length):
            for H in _ints(a.hidden):
                for mode in a.modes.split(","):
                    if mode not in ("train", "infer"):
                        raise SystemExit(f"benchmark: --modes takes train and/or infer, got {mode!r}")
                    for cell in split_specs(a.cells):
                        rows += _measure(cell, mode, V, E, H, B, T, a.steps, a.repeats, have_torch)
    header = (f"{platform.processor() or platform.machine()}, {jax.devices()[0].platform}, jax {jax.__version__}"
              + (f", torch {__import__('torch').__version__}" if have_torch else "")
              + f"; E={E} V={V}, Adam; median of {a.repeats} rounds x {a.steps} steps, systems interleaved")
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


def _measure(cell, mode, V, E, H, B, T, steps, repeats, have_torch):
    """One cell at one shape: every system side by side, rounds interleaved."""
    train = mode == "train"
    systems = {f"recur {cell}": jax_runner(recur_step, cell, V, E, H, B, T, train)}
    base_cell = cell.split(":")[0]
    if base_cell in FLAX_CELLS:
        systems[f"flax nn.RNN({FLAX_CELLS[base_cell]})"] = jax_runner(flax_step, base_cell, V, E, H, B, T, train)
    if have_torch and base_cell in TORCH_CELLS:
        systems[f"torch nn.{TORCH_CELLS[base_cell]}"] = (torch_runner(base_cell, V, E, H, B, T, train), None, None)
    for run, _, _ in systems.values():
        run(2)  # warm up
    times = {name: [] for name in systems}
    for _ in range(repeats):
        for name, (run, _, _) in systems.items():
            t0 = time.perf_counter()
            run(steps)
            times[name].append((time.perf_counter() - t0) / steps)
    ref = next((n for n in systems if n.startswith("torch")), None) or next(
        (n for n in systems if n.startswith("flax")), None)
    rows = []
    for name, (_, compile_s, peak) in systems.items():
        sec = statistics.median(times[name])
        rows.append({
            "mode": mode, "B": B, "T": T, "H": H, "cell": cell, "system": name,
            "ms_per_step": 1e3 * sec, "tokens_per_s": B * T / sec,
            "ratio_vs_" + ("torch" if have_torch else "flax"):
                statistics.median(times[ref]) / sec if ref else float("nan"),
            "compile_s": compile_s, "peak_MiB": None if peak is None else peak / 2**20,
        })
    return rows


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.2f}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


if __name__ == "__main__":
    main()
