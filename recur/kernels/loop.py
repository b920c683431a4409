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
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from recur.cells.base import kernel_trace


TRITON_MAX_NUMEL = 1 << 20  # Triton's largest array (triton.language's TRITON_MAX_TENSOR_NUMEL)
MAX_STEP_VALUES = 16 * 1024  # the widest step array one program takes: [16, 4H] for an LSTM at H = 256
TILE_BYTES = 64 * 1024  # a 2-D constant larger than this is read tile by tile (WeightTiles)
MAX_TILES = 16  # tiles per matrix per step: an LSTM's W_h at H = 256 (1 MiB) compiles in seconds


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


def _pow2_floor(n):
    return 1 << (max(int(n), 1).bit_length() - 1)


def _join(parts):
    """Concatenate equal power-of-2 pieces along the last axis, in order, by pairwise stack,
    transpose and reshape (the transposes of recur.cells.base.split's halving, which Triton
    lowers; an n-way concatenate it does not). Any other count (interpret mode): concatenate."""
    if len(parts) & (len(parts) - 1):
        return jnp.concatenate(parts, axis=-1)
    while len(parts) > 1:
        nxt = []
        for a, b in zip(parts[::2], parts[1::2]):
            ab = jnp.stack([a, b], axis=-1)  # [..., m, 2]
            perm = tuple(range(ab.ndim - 2)) + (ab.ndim - 1, ab.ndim - 2)
            nxt.append(jnp.reshape(jnp.transpose(ab, perm), a.shape[:-1] + (2 * a.shape[-1],)))
        parts = nxt
    return parts[0]


class WeightTiles:
    """A [G, K] weight that the kernel reads from memory a tile of rows at a time.

    Held whole, a cell's recurrent matrix is one Triton dot operand, which Triton stages through
    shared memory: an LSTM's W_h [4H, H] in float32 outgrows an H100's 227 KiB at H ~ 120. As
    WeightTiles, ``dense(h, W)`` (recur.cells.base) becomes one dot per tile of rows read from
    the weight's buffer (global memory, served from L2 across steps), the tiles' products joined
    into the [B, G] result; its derivative for h runs over the same tiles (a custom_vjp), so no
    step ever holds the whole matrix. ``split`` / ``head`` of blocks of rows give views;
    ``whole()`` loads it all (for a step that does more with it).
    """

    def __init__(self, ref, row0=0, rows=None, *, name="a matrix", strict=True):
        self.ref, self.row0, self.name, self.strict = ref, row0, name, strict
        self.rows_n = ref.shape[0] if rows is None else rows
        self.shape = (self.rows_n, ref.shape[1])
        self.dtype = ref.dtype
        self.ndim = 2

    def rows(self, start, n):
        return WeightTiles(self.ref, self.row0 + start, n, name=self.name, strict=self.strict)

    def whole(self):
        if self.strict:
            _check_numel("the step loads", self.name, self.shape)
        return self.ref[self.row0:self.row0 + self.rows_n, :]

    def _tile(self):
        return _tile_rows(self.rows_n, self.shape[1], self.dtype)

    def _tiles(self, again=False):
        """The tiles, each loaded only when the generator reaches it, so that one at a time is live
        (Triton keeps the program's order: loading all first would hold them all). ``again``: for
        the derivative's pass, compiled for a GPU as volatile loads, so that Triton does not
        merge them with the product's loads of the same tiles (which would keep every tile live
        from one pass to the other: 320 KiB of shared memory for the MGU at H = 256)."""
        n = self._tile()
        for j in range(0, self.rows_n, n):
            tile = self.ref.at[self.row0 + j:self.row0 + j + n, :]
            if again and self.strict:
                from jax.experimental.pallas import triton as pl_triton

                yield pl_triton.load(tile, volatile=True)
            else:
                yield tile[...]

    def tile_product(self, x, dtype, acc):
        """x @ W.T [..., G], accumulated in acc, one dot per tile of W's rows (recur.cells.base
        recognises a tiled weight by this method)."""
        tiles = self.rows_n // self._tile()
        if self.strict and tiles > MAX_TILES:  # only for a matrix the step really multiplies by
            raise ValueError(
                f"recur.kernels.loop: {self.name} {self.shape} takes {tiles} tiles per step, more than "
                f"{MAX_TILES} (each is a dot unrolled into the kernel: Triton's compile time grows past minutes)")
        half = jnp.dtype(dtype).itemsize < 4

        def dot(a, w, spec):  # as recur.cells.base.dense: half x half widened, else accumulate in acc
            if half:
                return jnp.einsum(spec, a.astype(dtype), w.astype(dtype)).astype(acc)
            return jnp.einsum(spec, a.astype(dtype), w.astype(dtype), preferred_element_type=acc)

        def plain(x):
            return _join([dot(x, w, "...k,gk->...g") for w in self._tiles()])

        if not _differentiated(x):  # Triton cannot lower custom_vjp_call itself; under AD it is gone
            return plain(x)
        product = jax.custom_vjp(plain)

        def fwd(x):  # plain, not product: a nested custom_vjp_call would stay in the kernel
            return plain(x), None

        def bwd(_, g):
            from recur.cells.base import split

            dx = None
            for g_j, w in zip(split(g, self.rows_n // self._tile()), self._tiles(again=True)):
                part = dot(g_j, w, "...g,gk->...k")
                dx = part if dx is None else dx + part
            return (dx.astype(x.dtype),)

        product.defvjp(fwd, bwd)
        return product(x)


def _check_numel(holds, name, shape):
    """Refuse an array over TRITON_MAX_NUMEL, the most Triton allows in one array."""
    if math.prod(shape) > TRITON_MAX_NUMEL:
        raise ValueError(f"recur.kernels.loop: {holds} {name} {tuple(shape)} whole, {math.prod(shape):,} elements, "
                         f"more than the {TRITON_MAX_NUMEL:,} Triton allows in one array")


def _tile_rows(rows, K, dtype):
    """Rows per tile of a [rows, K] matrix: about TILE_BYTES' worth, at least 16 (Triton's
    smallest dot), a power of 2 dividing the rows (on a GPU every size is a power of 2 anyway)."""
    n = min(_pow2_floor(rows), max(16, _pow2_floor(TILE_BYTES // (K * jnp.dtype(dtype).itemsize))))
    while rows % n:
        n //= 2
    return n


def _differentiated(x) -> bool:
    """x is being differentiated (jax.vjp / jvp inside the kernel body: the backward kernel)."""
    try:
        from jax._src.interpreters import ad
    except ImportError:  # pragma: no cover - a jax without these: treat as differentiated
        return True
    return isinstance(x, tuple(t for t in (getattr(ad, "LinearizeTracer", None), getattr(ad, "JVPTracer", None)) if t))


def _tiled_shape(x) -> bool:
    """A constant of this shape and type is read tile by tile (a matrix over TILE_BYTES)."""
    return len(x.shape) == 2 and x.shape[0] * x.shape[1] * jnp.dtype(x.dtype).itemsize > TILE_BYTES


def _const(ref, name, strict):
    """A constant as the body sees it: loaded whole, or as WeightTiles when it is a large matrix
    (strict: compiled for a GPU, where the tile count and whole loads are limited)."""
    return WeightTiles(ref, name=name, strict=strict) if _tiled_shape(ref) else _load(ref)


def kernel_loop(body, consts, rows, carry0, xs, *, reverse=False, block_b=None, interpret=True,
                num_warps=None, name="recur_loop"):
    """(final carry, ys) of ``lax.scan(lambda c, x: body(consts, rows, c, x), carry0, xs, reverse=reverse)``.

    consts: a pytree of arrays every program reads (whole, except that a matrix over TILE_BYTES
    reaches the body as :class:`WeightTiles`, read tile by tile by ``dense``). rows: a pytree of [B, ...] arrays that
    each program reads its rows of (e.g. a reset carry). carry0: pytree of [B, ...] leaves.
    xs: pytree of [T, B, ...] leaves (None leaves allowed). block_b: batch rows per program
    (default: all B). ys's structure and shapes come from tracing body once.
    """
    r_leaves, r_def = jax.tree.flatten(rows)
    c_leaves, c_def = jax.tree.flatten(carry0)
    x_leaves, x_def = jax.tree.flatten(xs)
    k_leaves, k_def = jax.tree.flatten(consts)
    k_names = [jax.tree_util.keystr(p) or "a constant" for p, _ in jax.tree_util.tree_flatten_with_path(consts)[0]]
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
        k = jax.tree.unflatten(k_def, [_const(r, n, not interpret) for r, n in zip(k_refs, k_names)])
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
    row_shapes = ([x.shape[2:] for x in x_leaves] + [c.shape[1:] for c in c_leaves]
                  + [y.shape[1:] for y in y_leaves_shape])
    widest = max((block_b * math.prod(s) for s in row_shapes), default=0)
    if not interpret and widest > MAX_STEP_VALUES:
        raise ValueError(
            f"recur.kernels.loop: a step's arrays hold {widest:,} values per program ({block_b} rows), more "
            f"than the {MAX_STEP_VALUES:,} one program keeps in registers (compiled for an H100, an LSTM at "
            f"H = 512 spills ~100 KiB per thread)")
    if not interpret:
        for name, x in zip(k_names, k_leaves):
            if not _tiled_shape(x):
                _check_numel("the kernel holds", name, x.shape)
    if num_warps is None:
        num_warps = warps_for(widest)
    kwargs = {} if interpret else {"compiler_params": _triton_params(num_warps)}
    outs = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(B // block_b,), in_specs=in_specs, out_specs=out_specs,
        interpret=interpret, name=name, **kwargs,
    )(*k_leaves, *r_leaves, *c_leaves, *x_leaves)
    ys = jax.tree.unflatten(y_def, outs[:ny])
    return jax.tree.unflatten(c_def, outs[ny:]), ys


def warps_for(widest):
    """Warps per program for a step whose widest array holds ``widest`` values per program: 4, or
    8 above 4,096 ([16, 256]). Compiled for an H100 with Triton (experiments/triton_compile.py),
    an LSTM at H = 256 ([16, 1024] gate arrays) spills ~41 KiB of registers per thread with 4 warps
    and under 1 KiB with 8."""
    return 4 if widest <= 4096 else 8


@functools.lru_cache(maxsize=None)
def _triton_params(num_warps):
    from jax.experimental.pallas import triton as pl_triton

    return pl_triton.CompilerParams(num_warps=num_warps, num_stages=1)
