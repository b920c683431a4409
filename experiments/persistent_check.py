"""The persistent kernels (recur/kernels/persistent.py, persistent_reset.py, persistent_ln.py) against the sequential
scan: the largest relative error over the outputs, the final carry and the gradients for the
weights, the inputs and the initial carry, per cell and precision, without and with lengths (one
of them 0) and reverse reading; beside them the sequential scan's own change when its weights move
by one rounding unit (recur.kernels.autotune.nudge): a kernel's error near it is rounding (on a
GPU the kernels' float32 dots are TF32), one far over it a bug.

    RECUR_PALLAS_INTERPRET=1 python -m experiments.persistent_check --cells gru elman lstm:peepholes,cifg
    RECUR_PALLAS_INTERPRET=1 python -m experiments.persistent_check --cells lstm gru elman --remat step
    python -m experiments.persistent_check --batch 64 --hidden 1024 --length 64   # on a GPU

On a CPU the kernels run in Pallas' interpret mode (one program walks every block); on a GPU they
run as they do in training, so this is the first check to make there.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import recur
from recur.kernels import autotune, dispatch, persistent


def check(name, dtype, B, T, I, H, remat="none"):
    """{option: max relative error} of mode="kernel" (with ``remat``) against mode="sequential"."""
    cell = recur.get_cell(name, H, dtype=dtype)
    impl = dispatch.choose(cell, "kernel", B, T, I, remat)[0]
    if impl != "persistent":
        raise SystemExit(f"{name}: mode='kernel' runs {impl!r} here, not the persistent kernels")
    # weights moved off their initial values (biases and gains not 0 / 1), by 0.2 at H = 32 and less
    # as the layer widens: 0.2 at H = I = 1024 makes the recurrence chaotic (the sequential scan's own
    # gradients then move ~100% under a 2^-11 change of its weights; see the "rounding" column)
    spread = 0.2 * min(1.0, 32 / max(H, I))
    params = jax.tree.map(lambda p: p + spread * jax.random.normal(jax.random.key(7), p.shape, p.dtype),
                          cell.init(jax.random.key(0), I))
    xs = jax.random.normal(jax.random.key(1), (B, T, I))
    c0 = jax.tree.map(lambda c: 0.5 * jax.random.normal(jax.random.key(2), c.shape, c.dtype), cell.initial_carry(B))
    w = jax.random.normal(jax.random.key(4), (B, T, cell.output_size))

    def run(mode, p=params, **kw):
        def loss(p, x, c):
            hs, carry = recur.scan(cell, p, x, initial_carry=c, mode=mode, **kw)
            return (jnp.sum(hs.astype(jnp.float32) * w) + sum(jnp.sum(jnp.sin(v)) for v in jax.tree.leaves(carry)),
                    (hs, carry))

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(p, xs, c0)

    def error(want, got):
        errs = []
        # ((loss, (hs, carry)), grads): not the loss, a sum that nearly cancels (its relative error is
        # the sum's, not the kernel's)
        leaves = lambda r: jax.tree.leaves((r[0][1], r[1]))
        for a, b in zip(leaves(want), leaves(got)):
            a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
            errs.append(float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(a))), 1e-30)))
        return max(errs)

    errors = {}
    for option, kw in (("plain", {}), ("lengths, reverse", {"lengths": jnp.arange(B) % (T + 1), "reverse": True})):
        want = run("sequential", **kw)
        errors[option] = error(want, run("kernel", remat=remat, **kw))
        if option == "plain":  # the sequential scan against itself with its weights moved by one rounding
            errors["rounding"] = error(want, run("sequential", p=autotune.nudge(params, dtype), **kw))
    return errors


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", nargs="+", default=["lstm", "gru", "elman", "elman:relu", "lstm:peepholes",
                                                   "lstm:cifg", "lstm:nig,noaf", "gru:cho", "mgu", "lstm:ln",
                                                   "lstm:cifg,ln", "lstm:fgr,peepholes", "lstm:proj_size=16",
                                                   "lstm:proj_size=16,peepholes", "lstm:ln,proj_size=16"])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--length", type=int, default=7)
    p.add_argument("--input", type=int, default=8)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--remat", default="none", choices=["none", "step"],
                   help="step: the backward kernels recompute the gates")
    p.add_argument("--poll", default=None, choices=["atomic", "load"],
                   help="how the barriers poll their counter (recur.kernels.persistent.POLL; default: its value)")
    a = p.parse_args(argv)
    if a.poll:
        persistent.POLL = a.poll  # read while the kernels are traced
    print(f"backend {jax.default_backend()}, interpret {dispatch.interpret_forced()}, B={a.batch}, T={a.length}, "
          f"I={a.input}, H={a.hidden}, remat {a.remat}, barriers poll by {persistent.POLL}")
    print("cell | dtype | plain | lengths, reverse | rounding (sequential vs itself, weights moved 2^-11 / 2^-8)")
    for name in a.cells:
        for dt in a.dtypes:
            errs = check(name, getattr(jnp, dt), a.batch, a.length, a.input, a.hidden, a.remat)
            print(f"{name} | {dt} | {errs['plain']:.1e} | {errs['lengths, reverse']:.1e} | {errs['rounding']:.1e}",
                  flush=True)


if __name__ == "__main__":
    main()
