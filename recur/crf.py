"""A linear-chain conditional random field, as pure functions over an explicit params dict.

Shape letters: B batch, T time (padded length), K tags.

A linear-chain CRF (Lafferty, McCallum & Pereira 2001, "Conditional Random Fields"), used as the
output layer of a tagger as in Huang, Xu & Yu 2015 ("Bidirectional LSTM-CRF Models for Sequence
Tagging"), scores a tag path y = (y_0, ..., y_{L-1}) of a sequence of length L as

    s(x, y) = start[y_0] + sum_{t=0}^{L-1} E[t, y_t]
              + sum_{t=1}^{L-1} A[y_{t-1}, y_t] + end[y_{L-1}],

with E the emission scores [T, K] (the network's outputs) and A = ``transitions`` [K, K], where
A[i, j] scores moving from tag i to tag j. The model is p(y | x) = exp s(x, y) / Z(x) with
Z(x) = sum over all K^L paths y' of exp s(x, y'). log Z comes from the forward algorithm in
log space,

    alpha_0[j] = start[j] + E[0, j]
    alpha_t[j] = logsumexp_i (alpha_{t-1}[i] + A[i, j]) + E[t, j]          t = 1 .. L-1
    log Z      = logsumexp_j (alpha_{L-1}[j] + end[j]),

and the best path from the Viterbi recursion, the same with max in place of logsumexp:

    delta_t[j] = max_i (delta_{t-1}[i] + A[i, j]) + E[t, j],  bp_t[j] = argmax_i (...)
    y*_{L-1}   = argmax_j (delta_{L-1}[j] + end[j]),          y*_{t-1} = bp_t[y*_t].

Padding: a batch is padded to T; ``lengths_B`` gives each sequence's true length L. Positions
t >= L are ignored: their emissions and tags may hold anything (even NaN), they change neither
the outputs nor the gradients, and the gradient with respect to them is exactly zero. In the
recursions a padded step carries alpha (delta) over unchanged, with an identity backpointer.

Length 0: the only path is the empty one, so log p = 0, Viterbi's best score is 0 and its tags
are all 0. Lengths must lie in [0, T]; this is checked when ``lengths_B`` is a concrete array
(outside ``jit``), and is the caller's responsibility under ``jit``.

Computation runs in promote(dtype of emissions and params, float32), so bfloat16 emissions are
handled in float32; under ``jax.enable_x64`` with float64 inputs it runs in float64.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Params = dict[str, Array]


def init(key: Array, num_tags: int, scale: float = 0.1) -> Params:
    """Parameters drawn uniformly from [-scale, scale] (as pytorch-crf does).

    Returns {"transitions": [K, K] (A[i, j] scores tag i -> tag j), "start": [K], "end": [K]}.
    """
    k_trans, k_start, k_end = jax.random.split(key, 3)
    uniform = lambda k, shape: jax.random.uniform(k, shape, jnp.float32, -scale, scale)
    return {
        "transitions": uniform(k_trans, (num_tags, num_tags)),
        "start": uniform(k_start, (num_tags,)),
        "end": uniform(k_end, (num_tags,)),
    }


def log_likelihood(params: Params, emissions_BxTxK: Array, tags_BxT: Array,
                   lengths_B: Array) -> Array:
    """log p(tags | x) = s(x, tags) - log Z(x) for each sequence, [B]. Differentiable.

    The training loss is ``-log_likelihood(...).mean()`` (or a sum divided by the tag count).
    """
    _check_shapes(params, emissions_BxTxK, lengths_B)
    if jnp.shape(tags_BxT) != emissions_BxTxK.shape[:2]:
        raise ValueError(f"tags have shape {jnp.shape(tags_BxT)}; expected [B, T] = "
                         f"{emissions_BxTxK.shape[:2]} to match the emissions")
    return _log_likelihood(params, emissions_BxTxK, jnp.asarray(tags_BxT), jnp.asarray(lengths_B))


def viterbi(params: Params, emissions_BxTxK: Array, lengths_B: Array) -> tuple[Array, Array]:
    """The highest-scoring tag path and its score s(x, y*): (tags_BxT int32, best_score_B).

    Padded positions (t >= length) hold tag 0. Ties go to the lowest tag index.
    """
    _check_shapes(params, emissions_BxTxK, lengths_B)
    return _viterbi(params, emissions_BxTxK, jnp.asarray(lengths_B))


# The checks above run in Python on every call; the computations below are jitted once per
# shape (they also nest inside a caller's jit, grad or vmap).

@jax.jit
def _log_likelihood(params, emissions_BxTxK, tags_BxT, lengths_B):
    emissions_BxTxK, mask_BxT, trans_KxK, start_K, end_K = _prepare(params, emissions_BxTxK,
                                                                    lengths_B)
    return _path_score(emissions_BxTxK, tags_BxT, mask_BxT, lengths_B, trans_KxK, start_K,
                       end_K) - _log_partition(emissions_BxTxK, mask_BxT, trans_KxK, start_K,
                                               end_K, lengths_B)


@jax.jit
def _viterbi(params, emissions_BxTxK, lengths_B):
    emissions_BxTxK, mask_BxT, trans_KxK, start_K, end_K = _prepare(params, emissions_BxTxK,
                                                                    lengths_B)
    emissions_TxBxK = jnp.swapaxes(emissions_BxTxK, 0, 1)
    mask_TxB = mask_BxT.T
    num_tags = trans_KxK.shape[0]
    identity_BxK = jnp.broadcast_to(jnp.arange(num_tags, dtype=jnp.int32)[None, :],
                                    emissions_TxBxK.shape[1:])

    def forward(delta_BxK, inputs):
        e_BxK, m_B = inputs
        cand_BxKxK = delta_BxK[:, :, None] + trans_KxK[None, :, :]  # [b, from i, to j]
        bp_BxK = jnp.argmax(cand_BxKxK, axis=1).astype(jnp.int32)
        new_BxK = jnp.max(cand_BxKxK, axis=1) + e_BxK
        delta_BxK = jnp.where(m_B[:, None], new_BxK, delta_BxK)
        return delta_BxK, jnp.where(m_B[:, None], bp_BxK, identity_BxK)

    delta0_BxK = start_K[None, :] + emissions_TxBxK[0]
    delta_BxK, bp_TmxBxK = jax.lax.scan(forward, delta0_BxK,
                                        (emissions_TxBxK[1:], mask_TxB[1:]))
    final_BxK = delta_BxK + end_K[None, :]
    last_B = jnp.argmax(final_BxK, axis=1).astype(jnp.int32)
    best_B = jnp.max(final_BxK, axis=1)

    def backward(tag_B, bp_BxK):
        # tag_B is y*_t; the backpointer at step t gives y*_{t-1}.
        prev_B = jnp.take_along_axis(bp_BxK, tag_B[:, None], axis=1)[:, 0]
        return prev_B, tag_B

    first_B, rest_TmxB = jax.lax.scan(backward, last_B, bp_TmxBxK, reverse=True)
    tags_TxB = jnp.concatenate([first_B[None, :], rest_TmxB], axis=0)
    tags_BxT = jnp.where(mask_BxT, tags_TxB.T, 0)
    best_B = jnp.where(lengths_B > 0, best_B, 0)
    return tags_BxT, best_B


def _log_partition(emissions_BxTxK, mask_BxT, trans_KxK, start_K, end_K, lengths_B):
    """log Z(x) by the forward algorithm, [B]; 0 for length-0 sequences."""

    def forward(alpha_BxK, inputs):
        e_BxK, m_B = inputs
        new_BxK = jax.nn.logsumexp(alpha_BxK[:, :, None] + trans_KxK[None, :, :], axis=1) + e_BxK
        return jnp.where(m_B[:, None], new_BxK, alpha_BxK), None

    emissions_TxBxK = jnp.swapaxes(emissions_BxTxK, 0, 1)
    alpha0_BxK = start_K[None, :] + emissions_TxBxK[0]
    alpha_BxK, _ = jax.lax.scan(forward, alpha0_BxK, (emissions_TxBxK[1:], mask_BxT.T[1:]))
    log_z_B = jax.nn.logsumexp(alpha_BxK + end_K[None, :], axis=1)
    return jnp.where(lengths_B > 0, log_z_B, 0)


def _path_score(emissions_BxTxK, tags_BxT, mask_BxT, lengths_B, trans_KxK, start_K, end_K):
    """s(x, y) of the given tag paths, [B]; 0 for length-0 sequences."""
    tags_BxT = jnp.where(mask_BxT, tags_BxT, 0).astype(jnp.int32)
    emit_BxT = jnp.take_along_axis(emissions_BxTxK, tags_BxT[:, :, None], axis=2)[:, :, 0]
    emit_B = jnp.sum(jnp.where(mask_BxT, emit_BxT, 0), axis=1)
    trans_BxTm = trans_KxK[tags_BxT[:, :-1], tags_BxT[:, 1:]]
    trans_B = jnp.sum(jnp.where(mask_BxT[:, 1:], trans_BxTm, 0), axis=1)
    last_B = jnp.take_along_axis(tags_BxT, jnp.maximum(lengths_B - 1, 0)[:, None], axis=1)[:, 0]
    ends_B = start_K[tags_BxT[:, 0]] + end_K[last_B]
    return emit_B + trans_B + jnp.where(lengths_B > 0, ends_B, 0)


def _prepare(params, emissions_BxTxK, lengths_B):
    """Casts to the compute dtype and zeroes padded emissions, so NaN there cannot leak."""
    dtype = jnp.promote_types(jnp.result_type(emissions_BxTxK, params["transitions"]),
                              jnp.float32)
    mask_BxT = jnp.arange(emissions_BxTxK.shape[1])[None, :] < lengths_B[:, None]
    emissions_BxTxK = jnp.where(mask_BxT[:, :, None], emissions_BxTxK.astype(dtype), 0)
    return (emissions_BxTxK, mask_BxT, params["transitions"].astype(dtype),
            params["start"].astype(dtype), params["end"].astype(dtype))


def _check_shapes(params, emissions_BxTxK, lengths_B):
    if emissions_BxTxK.ndim != 3:
        raise ValueError(f"emissions have shape {emissions_BxTxK.shape}; expected [B, T, K]")
    B, T, K = emissions_BxTxK.shape
    if T == 0:
        raise ValueError("emissions have T = 0 time steps; pad to at least one step")
    if params["transitions"].shape != (K, K) or params["start"].shape != (K,) or \
            params["end"].shape != (K,):
        raise ValueError(f"CRF params have transitions {params['transitions'].shape}, start "
                         f"{params['start'].shape}, end {params['end'].shape}; expected "
                         f"({K}, {K}), ({K},), ({K},) for K = {K} tags in the emissions")
    if jnp.shape(lengths_B) != (B,):
        raise ValueError(f"lengths have shape {jnp.shape(lengths_B)}; expected [B] = ({B},)")
    if not isinstance(lengths_B, jax.core.Tracer):
        lengths = np.asarray(lengths_B)
        if lengths.size and (lengths.min() < 0 or lengths.max() > T):
            raise ValueError(f"lengths must lie in [0, T = {T}]; got {lengths.tolist()}")
