"""A recurrent language model: embedding -> stacked RNN -> softmax over the vocabulary.

    e_t = E x_t;   h_t = RNN(e_t, h_{t-1});   ŷ_t = softmax(U h_t + b)      (CS224N lecture 6)

The loss at step t is J_t = -log ŷ_t[x_{t+1}]; perplexity is exp(mean J). With ``tie_weights``
the output matrix U is the embedding E (Press & Wolf 2017; Inan et al. 2017), which needs the top
layer's output size to equal ``embed_dim``. Dropout follows Zaremba et al. 2014 (on the
embeddings, between layers and on the outputs), or with ``locked_dropout`` the variational form of
Gal & Ghahramani 2016 (one mask per sequence, shared by all steps).

When the vocabulary is smaller than the number of tokens in a batch (V < B*T: character models),
the first layer's input projection is computed once per vocabulary entry, P = project(E), and
gathered, u_t = P[x_t], instead of projecting B*T embedded tokens (``fold_embedding``; the same
function and gradients up to float rounding, fewer FLOPs). It is skipped in a training call with
embedding dropout, which needs the embedded tokens themselves.

Letters: B batch, T steps, V vocabulary, E embedding size, O output size of the top layer.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from recur.layers import drop
from recur.nnx import RNN, values


class LanguageModel(nnx.Module):
    def __init__(self, vocab_size: int, *, embed_dim: int, hidden_size: int, cell: str = "lstm",
                 num_layers: int = 1, tie_weights: bool = False, embed_dropout: float = 0.0,
                 dropout: float = 0.0, output_dropout: float = 0.0, locked_dropout: bool = False,
                 init_scale: float = 0.0, fold_embedding: bool = True, scan_mode: str = "sequential",
                 rngs: nnx.Rngs):
        self.vocab_size = vocab_size
        self.embed = nnx.Embed(vocab_size, embed_dim, rngs=rngs)
        self.rnn = RNN(cell, embed_dim, hidden_size=hidden_size, num_layers=num_layers,
                       dropout=dropout, locked_dropout=locked_dropout, mode=scan_mode, rngs=rngs)
        out = self.rnn.output_size
        self.tie_weights = tie_weights
        if tie_weights and out != embed_dim:
            raise ValueError(
                f"LanguageModel: tie_weights needs the RNN output size ({out}) to equal embed_dim ({embed_dim})"
            )
        self.head = None if tie_weights else nnx.Linear(out, vocab_size, use_bias=False, rngs=rngs)
        self.bias = nnx.Param(jnp.zeros((vocab_size,)))
        self.embed_dropout, self.output_dropout, self.locked = embed_dropout, output_dropout, locked_dropout
        self.fold_embedding = fold_embedding and not self.rnn.bidirectional
        if init_scale:
            # Zaremba et al. initialise every weight uniformly in [-init_scale, init_scale]
            state = nnx.state(self, nnx.Param)
            keys = iter(jax.random.split(rngs.params(), len(jax.tree.leaves(state))))
            nnx.update(self, jax.tree.map(
                lambda x: jax.random.uniform(next(keys), x.shape, x.dtype, -init_scale, init_scale), state))

    def initial_carries(self, batch_size: int):
        return [c.initial_carry(batch_size) for c in self.rnn.cells]

    def __call__(self, tokens_BxT, carries=None, *, dropout_key=None):
        """Returns (logits [B, T, V] float32, carries after the last step of each row)."""
        k_embed, k_rnn, k_out = (None,) * 3 if dropout_key is None else jax.random.split(dropout_key, 3)
        dropping = k_embed is not None and self.embed_dropout
        B, T = tokens_BxT.shape
        if self.fold_embedding and not dropping and self.vocab_size < B * T:
            # project the V embedding rows once ([1, V, E] as one sequence) and gather per token
            cell, p0 = self.rnn.cells[0], values(self.rnn.params)[0]
            table = cell.project(p0, self.embed.embedding[...][None])
            us = jax.tree.map(lambda t: jnp.take(t[0], tokens_BxT, axis=0), table)
            hs_BxTxO, carries = self.rnn(us, initial_carries=carries, dropout_key=k_rnn, projected=True)
        else:
            e_BxTxE = self.embed(tokens_BxT)
            if dropping:
                e_BxTxE = drop(k_embed, e_BxTxE, self.embed_dropout, self.locked)
            hs_BxTxO, carries = self.rnn(e_BxTxE, initial_carries=carries, dropout_key=k_rnn)
        if k_out is not None and self.output_dropout:
            hs_BxTxO = drop(k_out, hs_BxTxO, self.output_dropout, self.locked)
        if self.tie_weights:
            logits = self.embed.attend(hs_BxTxO)
        else:
            logits = self.head(hs_BxTxO)
        logits = logits.astype(jnp.float32)
        return logits + self.bias[...][None, None, :], carries
