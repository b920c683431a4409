"""Small CPU measurements behind docs/benchmarks.md's notes on where the LSTM's time goes.

    python -m experiments.cpu_probes layer --cell lstm   # layer fwd+bwd: fused step / generic / autodiff
    python -m experiments.cpu_probes loop                 # scanned matmul + element-wise work, us/step
    python -m experiments.cpu_probes onednn               # torch's LSTM step with and without oneDNN
    python -m experiments.cpu_probes flags                # recur's LSTM step under several XLA_FLAGS
    python -m experiments.cpu_probes fold --cell gru      # LM train / infer, folded embedding on and off
    RECUR_CPU_KERNELS=0 python -m experiments.cpu_probes fold --cell lstm   # the same on XLA's loops
    python -m experiments.cpu_probes classifier --cell lstm   # SST-2-sized BiLSTM step, CPU kernels on / off

Each prints medians of interleaved rounds (compilation excluded). Shapes are the issue-4 ones:
batch 32, T = 128, input / embedding 128, hidden 256, vocabulary 256.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time

B, T, I, H, V = 32, 128, 128, 256, 256


def _interleaved(fns: dict, rounds: int, steps: int = 3) -> dict:
    """Median ms per call of each zero-argument function, rounds interleaved."""
    import jax

    for f in fns.values():
        jax.block_until_ready(f())
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t = time.perf_counter()
            for _ in range(steps):
                out = f()
            jax.block_until_ready(out)
            times[k].append((time.perf_counter() - t) / steps * 1e3)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def layer(cell_name: str, rounds: int):
    """One recurrent layer's forward + backward with the fused backward step, without it, and autodiff."""
    import jax
    import jax.numpy as jnp

    import recur

    cell = recur.get_cell(cell_name, H)
    generic_cls = dataclasses.make_dataclass("Generic", [], bases=(type(cell),), frozen=True,
                                             namespace={"fused_backward": False, "project_in_loop": False})
    generic = generic_cls(**{f.name: getattr(cell, f.name) for f in dataclasses.fields(cell)})
    params = cell.init(jax.random.key(0), I)
    xs = jax.random.normal(jax.random.key(1), (B, T, I))

    def grad_fn(c, backward):
        def loss(p, x):
            hs, _ = recur.scan(c, p, x, backward=backward)
            return jnp.sum(hs * hs)

        f = jax.jit(jax.grad(loss, argnums=(0, 1)))
        return lambda: f(params, xs)

    fns = {"fused step": grad_fn(cell, "deferred"), "generic deferred": grad_fn(generic, "deferred"),
           "autodiff": grad_fn(cell, "autodiff")}
    res = _interleaved(fns, rounds)
    print(f"{cell_name} layer fwd+bwd, B={B} T={T} I={I} H={H}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in res.items()))


def loop(rounds: int):
    """us per step of a scanned [B, H] x [H, 4H] matmul, adding the element-wise work piece by piece."""
    import jax
    import jax.numpy as jnp

    G = 4 * H
    W = jax.random.normal(jax.random.key(0), (G, H)) / 16
    h0 = jax.random.normal(jax.random.key(1), (B, H))
    u = jax.random.normal(jax.random.key(2), (T, B, G))

    def make(tanh, store, read_u):
        def f(W, h0, u):
            def body(h, u_t):
                r = jnp.einsum("bi,gi->bg", h, W)
                z = r + u_t if read_u else r
                z = jnp.tanh(z) if tanh else z * 0.5
                return z[:, :H] * z[:, H:2 * H] + h * 0.1, (r if store else None)
            return jax.lax.scan(body, h0, u)

        f = jax.jit(f)
        return lambda: f(W, h0, u)

    fns = {f"tanh={a} store={b} read_u={c}": make(a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1)}
    for k, v in _interleaved(fns, rounds).items():
        print(f"{k}: {v * 1e3 / T:.1f} us/step")


def onednn(rounds: int):
    """torch's LSTM LM step (experiments.benchmark's) with oneDNN's fused RNN on and off."""
    import torch

    from experiments.benchmark import torch_runner

    for enabled in (True, False):
        with torch.backends.mkldnn.flags(enabled=enabled):
            run = torch_runner("lstm", V, I, H, B, T)
            run(3)
            ts = []
            for _ in range(rounds):
                t = time.perf_counter()
                run(3)
                ts.append((time.perf_counter() - t) / 3 * 1e3)
            print(f"torch nn.LSTM step, oneDNN {'on' if enabled else 'off'}: {sorted(ts)[len(ts) // 2]:.1f} ms")


FLAGS = ["", "--xla_cpu_experimental_ynn_fusion_type=", "--xla_cpu_experimental_ynn_fusion_type=-individual_dot",
         "--xla_cpu_use_xnnpack=false", "--xla_cpu_enable_concurrency_optimized_scheduler=true",
         "--xla_cpu_multi_thread_eigen=false"]


def flags(rounds: int):
    """recur's LSTM LM step in a fresh process per XLA_FLAGS setting (flags are read at start-up)."""
    for f in FLAGS:
        env = dict(os.environ, XLA_FLAGS=f)
        out = subprocess.run([sys.executable, "-m", "experiments.cpu_probes", "_step", "--rounds", str(rounds)],
                             env=env, capture_output=True, text=True)
        last = (out.stdout.strip().splitlines() or [out.stderr.strip().splitlines()[-1]])[-1]
        print(f"XLA_FLAGS={f!r}: {last}")


def _step(rounds: int):
    import jax
    import jax.numpy as jnp

    from experiments.benchmark import recur_step

    step, state, _ = recur_step("lstm", V, I, H, B, T)
    x = jax.random.randint(jax.random.key(0), (B, T), 0, V)
    y = jnp.roll(x, -1, 1)
    holder = [state]

    def one():
        holder[0], loss = step(holder[0], x, y)
        return loss

    print(f"{_interleaved({'step': one}, rounds)['step']:.1f} ms")


def fold(cell_name: str, rounds: int):
    """The LM's gradient and forward pass with fold_embedding on and off (recur.models.lm)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from recur import metrics
    from recur.models.lm import LanguageModel

    x = jax.random.randint(jax.random.key(1), (B, T), 0, V)
    y = jnp.roll(x, -1, axis=1)
    fns = {}
    for folded in (True, False):
        model = LanguageModel(V, embed_dim=I, hidden_size=H, cell=cell_name, fold_embedding=folded,
                              rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(p, g=graphdef):
            total, count = metrics.cross_entropy(nnx.merge(g, p)(x)[0], y)
            return total / count

        grad, infer = jax.jit(jax.grad(loss)), jax.jit(lambda p, g=graphdef: nnx.merge(g, p)(x)[0])
        fns[f"train fold={folded}"] = lambda f=grad, p=params: f(p)
        fns[f"infer fold={folded}"] = lambda f=infer, p=params: f(p)
    for k, v in _interleaved(fns, rounds).items():
        print(f"{cell_name} {k}: {v:.1f} ms")


def classifier(cell_name: str, rounds: int):
    """Gradient of configs/sentiment.py's classifier (embeddings 128, a bidirectional layer of 128,
    max pooling) on a padded batch of 32 sentences of 3..T=52 tokens, with the CPU kernels
    (recur/kernels/cpu.py) and without (RECUR_CPU_KERNELS=0, read when the step is traced)."""
    import jax
    import optax
    from flax import nnx

    from recur.models.classifier import Classifier

    Bc, Tc = 32, 52
    model = Classifier(16000, 2, embed_dim=128, hidden_size=128, cell=cell_name, bidirectional=True,
                       pooling="max", rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    tokens = jax.random.randint(jax.random.key(1), (Bc, Tc), 2, 16000)
    lengths = jax.random.randint(jax.random.key(2), (Bc,), 3, Tc + 1)
    labels = jax.random.randint(jax.random.key(3), (Bc,), 0, 2)

    def loss(p):
        logits = nnx.merge(graphdef, p)(tokens, lengths)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    from recur.kernels import cpu

    fns = {}
    for on in (True, False):
        with cpu.switched(on):
            grad = jax.jit(jax.grad(loss)).lower(params).compile()
        fns[f"kernels={'on' if on else 'off'}"] = lambda g=grad: g(params)
    for k, v in _interleaved(fns, rounds).items():
        print(f"classifier {cell_name} B={Bc} T={Tc} {k}: {v:.2f} ms")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("probe", choices=["layer", "loop", "onednn", "flags", "fold", "classifier", "_step"])
    p.add_argument("--cell", default="lstm")
    p.add_argument("--rounds", type=int, default=7)
    a = p.parse_args(argv)
    if a.probe == "layer":
        layer(a.cell, a.rounds)
    elif a.probe == "fold":
        fold(a.cell, a.rounds)
    elif a.probe == "classifier":
        classifier(a.cell, a.rounds)
    elif a.probe == "_step":
        _step(a.rounds)
    else:
        {"loop": loop, "onednn": onednn, "flags": flags}[a.probe](a.rounds)


if __name__ == "__main__":
    main()
