"""A sequence tagger: [word embedding ; char-BiRNN features] -> BiRNN -> per-token scores (-> CRF).

    model = Tagger(vocab_size, num_tags, embed_dim=100, hidden_size=100, char_vocab_size=80,
                   crf=True, embed_dropout=0.1, dropout=0.5, rngs=nnx.Rngs(0))
    loss = model.loss(batch, dropout_key=key)      # batch as made by recur.data.batching
    tags_BxT = model.predict(batch)

Shape letters: B batch, T time (padded sentence length), W padded word length in characters,
E word embedding size, Hc char RNN hidden size, H word RNN hidden size, K tags.

The architecture is Lample et al. 2016 ("Neural Architectures for Named Entity Recognition"):

    c_{b,t}  = [c→ after the last character of word t ; c← after reading back to its first]
    x_{b,t}  = [e(w_{b,t}) ; c_{b,t}]                       E + 2 Hc features
    h_{b,t}  = BiRNN(x_b)_t                                 2 H features
    s_{b,t}  = W h_{b,t} + b                                K scores (the CRF's emissions)

The character BiRNN runs over every word of the batch at once, flattened to [B * T, W] with
``word_lengths`` as lengths, so a word's features depend on its own characters only (not on
other words, nor on padding characters). Without a CRF the tags are predicted independently,
trained with token cross-entropy averaged over the valid tokens of the batch; with ``crf=True``
the scores are a linear-chain CRF's emissions (Huang, Xu & Yu 2015; see :mod:`recur.crf`),
trained with the negative log-likelihood averaged over the sentences, and decoded by Viterbi.

Dropout, only when a ``dropout_key`` is given: ``embed_dropout`` is word-level dropout on the
word embeddings (a dropped word's whole vector is zeroed, its character features are kept,
which teaches the model to tag from the spelling, as Lample et al.'s replacing of singletons by
the unknown word does); ``dropout`` is applied between recurrent layers and to the BiRNN outputs
before the scoring layer.

Scores at padded positions are 0, and predicted tags there are 0.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from recur import crf as crf_lib
from recur.layers import drop
from recur.models.classifier import check_rate, valid_mask, word_features
from recur.nnx import RNN, values


class Tagger(nnx.Module):
    """Sequence tagging: ``model(tokens_BxT, lengths_B, chars_BxTxW, word_lengths_BxT) -> [B, T, K]``.

    ``char_vocab_size=0`` leaves out the character features (then ``chars`` are not needed).
    ``cell`` is a registry name, used for both the character and the word BiRNN.
    """

    def __init__(self, vocab_size: int, num_tags: int, *, embed_dim: int, hidden_size: int,
                 cell: str = "lstm", num_layers: int = 1, char_vocab_size: int = 0,
                 char_embed_dim: int = 25, char_hidden: int = 25, crf: bool = False,
                 embed_dropout: float = 0.0, dropout: float = 0.0, scan_mode: str = "sequential",
                 rngs: nnx.Rngs):
        check_rate("embed_dropout", embed_dropout, "Tagger")
        check_rate("dropout", dropout, "Tagger")
        self.embed_dropout, self.dropout = embed_dropout, dropout
        self.embed = nnx.Embed(vocab_size, embed_dim, rngs=rngs)
        input_size = embed_dim
        if char_vocab_size:
            self.char_embed = nnx.Embed(char_vocab_size, char_embed_dim, rngs=rngs)
            self.char_rnn = RNN(cell, char_embed_dim, hidden_size=char_hidden, bidirectional=True,
                                mode=scan_mode, rngs=rngs)
            input_size += self.char_rnn.output_size
        else:
            self.char_embed = self.char_rnn = None
        self.rnn = RNN(cell, input_size, hidden_size=hidden_size, num_layers=num_layers,
                       bidirectional=True, dropout=dropout, mode=scan_mode, rngs=rngs)
        self.out = nnx.Linear(self.rnn.output_size, num_tags, rngs=rngs)
        # a dict of nnx.Param, or None without a CRF
        self.crf = nnx.data(jax.tree.map(nnx.Param, crf_lib.init(rngs.params(), num_tags))) if crf else None

    def char_features(self, chars_BxTxW, word_lengths_BxT):
        """Each word's [forward final ; backward final] char-BiRNN output, [B, T, 2 Hc]."""
        if self.char_rnn is None:
            raise ValueError("Tagger.char_features: the model was built with char_vocab_size=0")
        return word_features(self.char_embed, self.char_rnn, chars_BxTxW, word_lengths_BxT, "Tagger")

    def __call__(self, tokens_BxT, lengths_B, chars_BxTxW=None, word_lengths_BxT=None, *,
                 dropout_key=None):
        """Per-token scores [B, T, K] (0 at padded positions); dropout only with a key."""
        k_embed, k_rnn, k_out = [None] * 3 if dropout_key is None else jax.random.split(dropout_key, 3)
        xs_BxTxE = self.embed(tokens_BxT)
        if k_embed is not None and self.embed_dropout > 0.0:
            xs_BxTxE = drop(k_embed, xs_BxTxE, self.embed_dropout, whole_vectors=True)
        if self.char_rnn is not None:
            feats_BxTx2Hc = self.char_features(chars_BxTxW, word_lengths_BxT)
            xs_BxTxE = jnp.concatenate([xs_BxTxE, feats_BxTx2Hc.astype(xs_BxTxE.dtype)], axis=-1)
        hs_BxTx2H, _ = self.rnn(xs_BxTxE, lengths=lengths_B, dropout_key=k_rnn)
        if k_out is not None and self.dropout > 0.0:
            hs_BxTx2H = drop(k_out, hs_BxTx2H, self.dropout)
        scores_BxTxK = self.out(hs_BxTx2H)
        mask_BxTx1 = valid_mask(lengths_B, tokens_BxT.shape[1])[:, :, None]
        return jnp.where(mask_BxTx1, scores_BxTxK, jnp.zeros((), scores_BxTxK.dtype))

    def scores(self, batch, *, dropout_key=None):
        """``self(...)`` on a batch dict (tokens, lengths, and chars, word_lengths if used)."""
        return self(batch["tokens"], batch["lengths"], batch.get("chars"), batch.get("word_lengths"),
                    dropout_key=dropout_key)

    def crf_params(self):
        """The CRF's parameters as plain arrays (for :mod:`recur.crf`), or None without a CRF."""
        return None if self.crf is None else values(self.crf)

    def loss(self, batch, *, dropout_key=None):
        """CRF: mean over sentences of -log p(tags | x). Otherwise: mean token cross-entropy."""
        scores_BxTxK = self.scores(batch, dropout_key=dropout_key)
        tags_BxT, lengths_B = batch["tags"], batch["lengths"]
        if self.crf is not None:
            return -crf_lib.log_likelihood(self.crf_params(), scores_BxTxK, tags_BxT, lengths_B).mean()
        mask_BxT = valid_mask(lengths_B, tags_BxT.shape[1])
        ce_BxT = optax.softmax_cross_entropy_with_integer_labels(scores_BxTxK, tags_BxT)
        return jnp.sum(jnp.where(mask_BxT, ce_BxT, 0)) / jnp.maximum(jnp.sum(mask_BxT), 1)

    def predict(self, batch):
        """Predicted tags, int32 [B, T] (Viterbi with a CRF, argmax otherwise); 0 at padding."""
        scores_BxTxK = self.scores(batch)
        lengths_B = batch["lengths"]
        if self.crf is not None:
            tags_BxT, _ = crf_lib.viterbi(self.crf_params(), scores_BxTxK, lengths_B)
            return tags_BxT
        mask_BxT = valid_mask(lengths_B, scores_BxTxK.shape[1])
        return jnp.where(mask_BxT, jnp.argmax(scores_BxTxK, axis=-1), 0).astype(jnp.int32)
