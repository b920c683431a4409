"""A time loop in one Pallas kernel: ``lax.scan``'s contract, many steps per launch.

``kernel_loop(body, consts, carry0, xs)`` computes what ``jax.lax.scan(partial(body, consts),
carry0, xs)`` computes, for a body whose batch rows are independent (every recur cell's step
is). It launches one kernel whose grid runs over blocks of ``block_b`` batch rows; each program
keeps its rows' carry on chip and runs all T steps in a ``fori_loop``: per step it reads that
step's inputs, applies ``body`` (traced into the kernel, so any cell's own ``step`` and
``recurrent`` become kernel code) and writes that step's outputs. The consts (the cell's
parameters) are read by every program from the same buffers, which stay in the GPU's L2 cache
across steps instead of being re-sent by a host-side loop; nothing is launched per step.

Layout: xs leaves [T, B, ...] (time-major) and carry leaves [B, ...] are blocked by batch rows;
consts are whole arrays; outputs ys [T, B, ...]. ``reverse=True`` runs t = T-1 .. 0 as
``lax.scan(reverse=True)`` does.

On a GPU this lowers through Pallas' Triton back end, which needs power-of-2 block shapes and
supports a subset of lax (no general slicing of values); ``recur.kernels.dispatch`` checks that
a cell's kernels lower before choosing them. Elsewhere the kernel runs in Pallas' interpret mode
(``interpret=True``), which is how the tests check it on CPU.
"""
from __future__ import annotations

import functools

import jax
from jax.experimental import pallas as pl

from recur.cells.base import kernel_trace


TRITON_MAX_NUMEL = 1 << 20  # Triton's largest array (triton.language's TRITON_MAX_TENSOR_NUMEL)


def _spec_rows(shape, block_b, time_major):
    """BlockSpec that gives program i rows [i*block_b, (i+1)*block_b) of a [T, B, ...] or [B, ...] leaf."""
    if time_major:
        block = (shape[0], block_b) + tuple(shape[2:])
        return pl.BlockSpec(block, lambda i, n=len(shape): (0, i) + (0,) * (n - 2))
    block = (block_b,) + tuple(shape[1:])
    return pl.BlockSpec(block, lambda i, n=len(shape): (i,) + (0,) * (n - 1))


def _spec_whole(shape):
    return pl.BlockSpec(tuple(shape), lambda i, n=len(shape): (0,) * n)


def _load(ref, t=None):
    return ref[...] if t is None else ref[t]


def kernel_loop(body, consts, rows, carry0, xs, *, reverse=False, block_b=None, interpret=True,
                num_warps=4, name="recur_loop"):
    """(final carry, ys) of ``lax.scan(lambda c, x: body(consts, rows, c, x), carry0, xs, reverse=reverse)``.

    consts: a pytree of arrays every program reads whole. rows: a pytree of [B, ...] arrays that
    each program reads its rows of (e.g. a reset carry). carry0: pytree of [B, ...] leaves.
    xs: pytree of [T, B, ...] leaves (None leaves allowed). block_b: batch rows per program
    (default: all B). ys's structure and shapes come from tracing body once.
    """
    r_leaves, r_def = jax.tree.flatten(rows)
    c_leaves, c_def = jax.tree.flatten(carry0)
    x_leaves, x_def = jax.tree.flatten(xs)
    k_leaves, k_def = jax.tree.flatten(consts)
    if not x_leaves:
        raise ValueError("kernel_loop: xs must have at least one array leaf (it sets T)")
    T, B = x_leaves[0].shape[:2]
    block_b = B if block_b is None else block_b
    if B % block_b:
        raise ValueError(f"kernel_loop: batch {B} is not a multiple of block_b={block_b}")

    step_x = jax.tree.unflatten(x_def, [jax.ShapeDtypeStruct(x.shape[1:], x.dtype) for x in x_leaves])
    _, y_shape = jax.eval_shape(body, consts, rows, carry0, step_x)
    y_leaves_shape, y_def = jax.tree.flatten(y_shape)
    out_shape = [jax.ShapeDtypeStruct((T,) + y.shape, y.dtype) for y in y_leaves_shape]
    out_shape += [jax.ShapeDtypeStruct(c.shape, c.dtype) for c in c_leaves]

    sizes = (len(k_leaves), len(r_leaves), len(c_leaves), len(x_leaves), len(y_leaves_shape))
    ny = sizes[-1]

    def kernel(*refs):
        groups, at = [], 0
        for n in sizes:
            groups.append(refs[at:at + n])
            at += n
        k_refs, r_refs, c_refs, x_refs, y_refs = groups
        cout_refs = refs[at:]
        k = jax.tree.unflatten(k_def, [_load(r) for r in k_refs])
        rw = jax.tree.unflatten(r_def, [_load(r) for r in r_refs])

        def step(i, carry_leaves):
            t = T - 1 - i if reverse else i
            x = jax.tree.unflatten(x_def, [_load(r, t) for r in x_refs])
            with kernel_trace():
                new, y = body(k, rw, jax.tree.unflatten(c_def, list(carry_leaves)), x)
            for r, v in zip(y_refs, jax.tree.leaves(y)):
                r[t] = v.astype(r.dtype)
            return tuple(v.astype(c.dtype) for v, c in zip(jax.tree.leaves(new), c_leaves))

        final = jax.lax.fori_loop(0, T, step, tuple(_load(r) for r in c_refs))
        for r, v in zip(cout_refs, final):
            r[...] = v

    in_specs = ([_spec_whole(x.shape) for x in k_leaves]
                + [_spec_rows(r.shape, block_b, False) for r in r_leaves]
                + [_spec_rows(c.shape, block_b, False) for c in c_leaves]
                + [_spec_rows(x.shape, block_b, True) for x in x_leaves])
    out_specs = ([_spec_rows(o.shape, block_b, True) for o in out_shape[:ny]]
                 + [_spec_rows(o.shape, block_b, False) for o in out_shape[ny:]])
    if not interpret:
        for path, x in jax.tree_util.tree_flatten_with_path(consts)[0]:
            if x.size > TRITON_MAX_NUMEL:
                raise ValueError(
                    f"recur.kernels.loop: the kernel holds {jax.tree_util.keystr(path) or 'a constant'} "
                    f"{tuple(x.shape)} whole, {x.size:,} elements, more than the {TRITON_MAX_NUMEL:,} "
                    f"Triton allows in one array")
    kwargs = {} if interpret else {"compiler_params": _triton_params(num_warps)}
    outs = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(B // block_b,), in_specs=in_specs, out_specs=out_specs,
        interpret=interpret, name=name, **kwargs,
    )(*k_leaves, *r_leaves, *c_leaves, *x_leaves)
    ys = jax.tree.unflatten(y_def, outs[:ny])
    return jax.tree.unflatten(c_def, outs[ny:]), ys


@functools.lru_cache(maxsize=None)
def _triton_params(num_warps):
    from jax.experimental.pallas import triton as pl_triton

    return pl_triton.CompilerParams(num_warps=num_warps, num_stages=1)
