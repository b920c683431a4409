"""A sentence classifier: embeddings -> recurrent encoder -> pooled sentence vector -> MLP.

    model = Classifier(vocab_size, num_classes, embed_dim=100, hidden_size=128, cell="lstm",
                       bidirectional=True, pooling="max", embed_dropout=0.1, dropout=0.3,
                       rngs=nnx.Rngs(0))
    logits_BxC = model(tokens_BxT, lengths_B, dropout_key=key)   # a key only when training

Shape letters: B batch, T time (padded sentence length), E embedding size, O the encoder's
output features per step (H, or 2H when bidirectional), D the sentence embedding (O, or 2O for
"mean_max" pooling), C classes.

Pooling turns the encoder outputs h_1 .. h_L of a sentence of L words into one vector
(Conneau et al. 2017, "Supervised Learning of Universal Sentence Representations", compare the
three on the same encoders):

    "last":  [h→_L ; h←_1]         the forward state after the last word and the backward state
                                   after reading back to the first (just h_L if unidirectional)
    "mean":  (1 / L) sum_t h_t     over the L valid steps only
    "max":   max_t h_t             per feature, over the L valid steps only (padding is -inf)
    "mean_max": [mean ; max]       both, concatenated (2O features)

A sentence of length 0 pools to zeros with each of them.

"last" reads the outputs at steps L - 1 (forward) and 0 (backward) rather than the final
carries the RNN returns: the two agree for cells whose carry holds the output (LSTM's "h", GRU,
Elman; the tests check it against the carries), but not every cell's carry is its output (the
LRU's carry is a complex state read out through C and D; the depth-gated LSTM's holds every
inner layer), and the outputs are there for every cell.

Character features (``char_vocab_size > 0``, as in :class:`recur.models.tagger.Tagger`, Lample
et al. 2016): each word's [forward final ; backward final] character-BiRNN state is concatenated
to its word embedding, so words seen rarely or never in training (``<unk>``: "unwatchable",
"delightfully") still bring their prefixes and suffixes. Batches then carry ``chars`` [B, T, W]
and ``word_lengths`` [B, T].

Dropout is applied only when a ``dropout_key`` is given (training), in three places:
- ``embed_dropout``: word-level dropout (Iyyer et al. 2015, "Deep Unordered Composition Rivals
  Syntactic Methods"; Dai & Le 2015): each word's whole embedding vector is zeroed with
  probability p and the kept ones scaled by 1 / (1 - p), so the encoder learns not to rely on
  any single word. (Feature-wise dropout on embeddings mostly adds noise to every word alike.)
  With ``word_dropout_to="unk"`` a dropped word is read as ``<unk>`` instead (its embedding is
  that of the unknown word, unscaled; Kiperwasser & Goldberg 2016), which also trains ``<unk>``
  on every kind of context that test-time unknown words appear in. Character features are kept
  either way.
- ``dropout`` between recurrent layers (``locked_dropout=True``: one mask per sentence shared by
  every step, Gal & Ghahramani 2016), on the sentence embedding before the MLP, and on the
  encoder outputs before the language-model heads.
- ``weight_dropout``: DropConnect on the recurrent matrices W_h (one mask per batch; see
  :func:`recur.layers.stack`).

Language modelling as a second task (``lm_vocab > 0``; after Dai & Le 2015, "Semi-supervised
Sequence Learning", and Rei 2017, "Semi-supervised Multitask Learning for Sequence Labeling"):
the encoder also predicts each sentence's words from its own states, which needs no labels and
makes the embeddings and the RNN learn from every word, not only through the one label per
sentence. The forward output at step t predicts word t+1 and the backward output word t-1
(a bidirectional encoder must then have one layer: a second layer would see the word it
predicts); the word past either end is the boundary class 0:

    lm_loss = mean over valid (b, t) and directions of  -log p(w_{t±1} | h_t),
    p(. | h_t) = softmax(W_dir h_t + b_dir) over lm_vocab classes

Ids are those of ``Vocab.build`` (<pad> 0, <unk> ``unk_id``, then words by decreasing count), so
classes 2 .. lm_vocab - 1 are the most frequent words and rarer ones count as <unk>.
:meth:`loss` adds ``lm_weight * lm_loss``; :meth:`lm_loss` alone serves to pretrain.

Adversarial training (``adv_eps > 0``; Goodfellow et al. 2015, and Miyato et al. 2017,
"Adversarial Training Methods for Semi-Supervised Text Classification", who perturb the word
embeddings of an LSTM classifier): the training loss adds the classification loss of the same
sentences with their encoder inputs x (embeddings after word dropout, with the character
features) moved a small step in the direction that raises that loss most,

    r = adv_eps * ||x||_F * g / ||g||_F,   g = d ce(x) / d x,   per sentence, r held constant
    loss = ce(x) + ce(x + r)

Miyato et al. fix ||r|| on embeddings normalised to unit variance; here the step is relative to
the sentence's own input norm (over its valid words), which the model cannot shrink by scaling
its embeddings up. The same dropout masks serve both passes. The encoder then runs three times
per training step (ce(x), its gradient g, ce(x + r)) and backpropagates through two of them:
about 2-2.5x the step time (2.4 min instead of 1.2 for a default SST-2 run). Evaluation is
unchanged.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from recur import metrics
from recur.layers import drop
from recur.nnx import RNN

POOLINGS = ("last", "mean", "max", "mean_max")
WORD_DROPOUT_TO = ("zero", "unk")


def valid_mask(lengths_B, T: int):
    """[B, T] bools, True at the first lengths[b] steps of row b."""
    return jnp.arange(T)[None, :] < lengths_B[:, None]


def pool_last(hs_BxTxO, lengths_B, bidirectional: bool):
    """[forward output at step L - 1 ; backward output at step 0] per row (padded steps are zero).

    ``hs`` is a (concatenated, when bidirectional) recur RNN output whose padded steps are zero,
    so a length-0 row gives zeros. Unidirectional: the output at step L - 1.
    """
    last_B = jnp.maximum(lengths_B - 1, 0)
    at_last_BxO = jnp.take_along_axis(hs_BxTxO, last_B[:, None, None], axis=1)[:, 0]
    if not bidirectional:
        return at_last_BxO
    half = hs_BxTxO.shape[-1] // 2
    return jnp.concatenate([at_last_BxO[:, :half], hs_BxTxO[:, 0, half:]], axis=-1)


def pool(hs_BxTxO, lengths_B, pooling: str, bidirectional: bool):
    """The sentence vector [B, D] from the encoder outputs (see the module docstring)."""
    if pooling == "mean_max":
        return jnp.concatenate([pool(hs_BxTxO, lengths_B, "mean", bidirectional),
                                pool(hs_BxTxO, lengths_B, "max", bidirectional)], axis=-1)
    if pooling == "last":
        return pool_last(hs_BxTxO, lengths_B, bidirectional)
    mask_BxTx1 = valid_mask(lengths_B, hs_BxTxO.shape[1])[:, :, None]
    if pooling == "mean":
        total_BxO = jnp.sum(jnp.where(mask_BxTx1, hs_BxTxO, 0), axis=1)
        count_Bx1 = jnp.maximum(lengths_B, 1)[:, None].astype(total_BxO.dtype)
        return total_BxO / count_Bx1
    if pooling == "max":
        top_BxO = jnp.max(jnp.where(mask_BxTx1, hs_BxTxO, -jnp.inf), axis=1)
        return jnp.where(lengths_B[:, None] > 0, top_BxO, 0)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


def check_rate(name: str, rate: float, where: str):
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"{where}: {name} must be a rate in [0, 1), got {rate}")


class CharFeatures(nnx.Module):
    """Each word's [forward final ; backward final] character-BiRNN output (Lample et al. 2016).

    ``features(chars [B, T, W], word_lengths [B, T]) -> [B, T, 2 Hc]``: the BiRNN runs over
    every word of the batch at once, flattened to [B * T, W] with the word lengths as lengths,
    so a word's features depend on its own characters only.
    """

    def __init__(self, char_vocab_size: int, cell: str, char_embed_dim: int, char_hidden: int, rngs: nnx.Rngs,
                 scan_mode: str = "sequential"):
        self.embed = nnx.Embed(char_vocab_size, char_embed_dim, rngs=rngs)
        self.rnn = RNN(cell, char_embed_dim, hidden_size=char_hidden, bidirectional=True, mode=scan_mode, rngs=rngs)

    @property
    def output_size(self) -> int:
        """2 Hc, the features per word."""
        return self.rnn.output_size

    def __call__(self, chars_BxTxW, word_lengths_BxT, where: str = "CharFeatures"):
        return word_features(self.embed, self.rnn, chars_BxTxW, word_lengths_BxT, where)


def word_features(char_embed, char_rnn, chars_BxTxW, word_lengths_BxT, where: str):
    """[B, T, 2 Hc]: ``char_rnn`` (bidirectional) over ``char_embed(chars)`` of every word."""
    if chars_BxTxW is None or word_lengths_BxT is None:
        raise ValueError(f"{where}: the model has character features (char_vocab_size > 0), "
                         "so chars [B, T, W] and word_lengths [B, T] are required")
    B, T, W = chars_BxTxW.shape
    xs_NxWxC = char_embed(jnp.reshape(chars_BxTxW, (B * T, W)))
    lengths_N = jnp.reshape(word_lengths_BxT, (B * T,))
    hs_NxWx2Hc, _ = char_rnn(xs_NxWxC, lengths=lengths_N)
    feats_Nx2Hc = pool_last(hs_NxWx2Hc, lengths_N, bidirectional=True)
    return jnp.reshape(feats_Nx2Hc, (B, T, feats_Nx2Hc.shape[-1]))


class Classifier(nnx.Module):
    """Sentence classification: ``model(tokens_BxT, lengths_B) -> logits [B, num_classes]``.

    ``cell`` is a registry name (``"lstm"``, ``"gru"``, ``"lstm:cifg"`` ...). ``mlp_hidden=0`` puts
    a single linear layer on the sentence embedding; otherwise Linear -> ReLU -> Linear.
    """

    def __init__(self, vocab_size: int, num_classes: int, *, embed_dim: int, hidden_size: int,
                 cell: str = "lstm", num_layers: int = 1, bidirectional: bool = False,
                 pooling: str = "last", mlp_hidden: int = 0, embed_dropout: float = 0.0,
                 dropout: float = 0.0, locked_dropout: bool = False, lm_vocab: int = 0,
                 lm_weight: float = 0.0, unk_id: int = 1, word_dropout_to: str = "zero",
                 char_vocab_size: int = 0, char_embed_dim: int = 25, char_hidden: int = 25,
                 adv_eps: float = 0.0, weight_dropout: float = 0.0, scan_mode: str = "sequential",
                 rngs: nnx.Rngs):
        if pooling not in POOLINGS:
            raise ValueError(f"Classifier: pooling must be one of {POOLINGS}, got {pooling!r}")
        if lm_vocab and bidirectional and num_layers > 1:
            raise ValueError(f"Classifier: a language-model head (lm_vocab={lm_vocab}) on a bidirectional "
                             f"encoder needs num_layers=1 (got {num_layers}): a second layer sees the word "
                             "each direction predicts")
        if lm_weight and not lm_vocab:
            raise ValueError(f"Classifier: lm_weight={lm_weight} needs a language-model head (lm_vocab > 0)")
        if lm_vocab and not unk_id < lm_vocab <= vocab_size:
            raise ValueError(f"Classifier: lm_vocab must be in ({unk_id}, vocab_size={vocab_size}], got {lm_vocab}")
        if word_dropout_to not in WORD_DROPOUT_TO:
            raise ValueError(f"Classifier: word_dropout_to must be one of {WORD_DROPOUT_TO}, got {word_dropout_to!r}")
        if not (adv_eps >= 0.0 and adv_eps < float("inf")):
            raise ValueError(f"Classifier: adv_eps must be a finite number >= 0, got {adv_eps!r}")
        check_rate("embed_dropout", embed_dropout, "Classifier")
        check_rate("dropout", dropout, "Classifier")
        self.pooling, self.bidirectional = pooling, bidirectional
        self.embed_dropout, self.dropout = embed_dropout, dropout
        self.lm_vocab, self.lm_weight, self.unk_id = lm_vocab, lm_weight, unk_id
        self.word_dropout_to, self.adv_eps = word_dropout_to, adv_eps
        self.embed = nnx.Embed(vocab_size, embed_dim, rngs=rngs)
        self.chars = CharFeatures(char_vocab_size, cell, char_embed_dim, char_hidden, rngs,
                                   scan_mode) if char_vocab_size else None
        input_size = embed_dim + (self.chars.output_size if self.chars is not None else 0)
        self.rnn = RNN(cell, input_size, hidden_size=hidden_size, num_layers=num_layers,
                       bidirectional=bidirectional, dropout=dropout, locked_dropout=locked_dropout,
                       weight_dropout=weight_dropout, mode=scan_mode, rngs=rngs)
        D = self.sentence_size
        if mlp_hidden:
            self.hidden = nnx.Linear(D, mlp_hidden, rngs=rngs)
            self.out = nnx.Linear(mlp_hidden, num_classes, rngs=rngs)
        else:
            self.hidden = None
            self.out = nnx.Linear(D, num_classes, rngs=rngs)
        H = self.rnn.output_size // (2 if bidirectional else 1)
        self.lm_heads = nnx.List([nnx.Linear(H, lm_vocab, rngs=rngs)
                                  for _ in range(2 if bidirectional else 1)]) if lm_vocab else None

    @property
    def sentence_size(self) -> int:
        """D, the features of :meth:`embed_sentence`."""
        return self.rnn.output_size * (2 if self.pooling == "mean_max" else 1)

    def encode(self, tokens_BxT, lengths_B, chars_BxTxW=None, word_lengths_BxT=None, *, dropout_key=None):
        """The encoder's outputs and final carries: (hs [B, T, D], [carry per layer])."""
        k_embed, k_rnn = (None, None) if dropout_key is None else jax.random.split(dropout_key)
        xs_BxTxE = self._encoder_inputs(tokens_BxT, chars_BxTxW, word_lengths_BxT, k_embed)
        return self.rnn(xs_BxTxE, lengths=lengths_B, dropout_key=k_rnn)

    def _encoder_inputs(self, tokens_BxT, chars_BxTxW, word_lengths_BxT, k_embed):
        """The recurrent encoder's inputs [B, T, E (+ char features)], word dropout applied."""
        dropping = k_embed is not None and self.embed_dropout > 0.0
        if dropping and self.word_dropout_to == "unk":
            dropped_BxT = jax.random.bernoulli(k_embed, self.embed_dropout, tokens_BxT.shape)
            # padding stays padding; only real words become <unk>
            tokens_BxT = jnp.where(dropped_BxT & (tokens_BxT != 0), self.unk_id, tokens_BxT)
        xs_BxTxE = self.embed(tokens_BxT)
        if dropping and self.word_dropout_to == "zero":
            xs_BxTxE = drop(k_embed, xs_BxTxE, self.embed_dropout, whole_vectors=True)
        if self.chars is not None:
            xs_BxTxE = jnp.concatenate([xs_BxTxE, self.chars(chars_BxTxW, word_lengths_BxT, "Classifier")
                                        .astype(xs_BxTxE.dtype)], axis=-1)
        return xs_BxTxE

    def embed_sentence(self, tokens_BxT, lengths_B, chars_BxTxW=None, word_lengths_BxT=None, *, dropout_key=None):
        """The pooled sentence embedding [B, D]."""
        hs_BxTxD, _ = self.encode(tokens_BxT, lengths_B, chars_BxTxW, word_lengths_BxT, dropout_key=dropout_key)
        return pool(hs_BxTxD, lengths_B, self.pooling, self.bidirectional)

    def _classify(self, s_BxD, key):
        if key is not None and self.dropout > 0.0:
            s_BxD = drop(key, s_BxD, self.dropout)
        if self.hidden is not None:
            s_BxD = jax.nn.relu(self.hidden(s_BxD))
        return self.out(s_BxD)

    def _forward(self, tokens_BxT, lengths_B, chars_BxTxW, word_lengths_BxT, dropout_key):
        """(logits [B, C], the encoder outputs, the classifier head's dropout key)."""
        k_encode, k_head = (None, None) if dropout_key is None else jax.random.split(dropout_key)
        hs_BxTxO, _ = self.encode(tokens_BxT, lengths_B, chars_BxTxW, word_lengths_BxT, dropout_key=k_encode)
        return self._head(hs_BxTxO, lengths_B, k_head), hs_BxTxO, k_head

    def _head(self, hs_BxTxO, lengths_B, k_head):
        """Logits [B, C] from the encoder outputs: pooling, then the classifier."""
        return self._classify(pool(hs_BxTxO, lengths_B, self.pooling, self.bidirectional), k_head)

    def __call__(self, tokens_BxT, lengths_B, chars_BxTxW=None, word_lengths_BxT=None, *, dropout_key=None):
        """Logits [B, num_classes]; dropout only when ``dropout_key`` is given. ``chars`` and
        ``word_lengths`` are needed (only) when the model has character features."""
        return self._forward(tokens_BxT, lengths_B, chars_BxTxW, word_lengths_BxT, dropout_key)[0]

    def _inputs(self, batch):
        return batch["tokens"], batch["lengths"], batch.get("chars"), batch.get("word_lengths")

    def _lm_loss(self, hs_BxTxO, tokens_BxT, lengths_B, key):
        """The language-model loss (module docstring) from the encoder outputs."""
        T = tokens_BxT.shape[1]
        mask_BxT = valid_mask(lengths_B, T)
        if key is not None and self.dropout > 0.0:
            hs_BxTxO = drop(key, hs_BxTxO, self.dropout)
        t_1xT = jnp.arange(T)[None, :]
        zeros_Bx1 = jnp.zeros_like(tokens_BxT[:, :1])
        next_BxT = jnp.where(t_1xT + 1 < lengths_B[:, None],
                             jnp.concatenate([tokens_BxT[:, 1:], zeros_Bx1], axis=1), 0)
        prev_BxT = jnp.where(t_1xT >= 1, jnp.concatenate([zeros_Bx1, tokens_BxT[:, :-1]], axis=1), 0)
        H = hs_BxTxO.shape[-1] // len(self.lm_heads)
        total = 0.0
        for i, (head, targets_BxT) in enumerate(zip(self.lm_heads, (next_BxT, prev_BxT))):
            targets_BxT = jnp.where(targets_BxT >= self.lm_vocab, self.unk_id, targets_BxT)
            nll, count = metrics.cross_entropy(head(hs_BxTxO[..., i * H:(i + 1) * H]), targets_BxT, mask_BxT)
            total = total + nll / jnp.maximum(count, 1)
        return total / len(self.lm_heads)

    def lm_loss(self, batch, *, dropout_key=None):
        """The language-model loss of ``batch`` (labels unused), a scalar: for pretraining."""
        if self.lm_heads is None:
            raise ValueError("Classifier.lm_loss needs a language-model head (lm_vocab > 0)")
        k_encode, k_lm = (None, None) if dropout_key is None else jax.random.split(dropout_key)
        hs_BxTxO, _ = self.encode(*self._inputs(batch), dropout_key=k_encode)
        return self._lm_loss(hs_BxTxO, batch["tokens"], batch["lengths"], k_lm)

    def loss(self, batch, *, dropout_key=None):
        """Mean cross-entropy of ``batch["labels"]`` over the batch (plus ``lm_weight`` times the
        language-model loss), a scalar."""
        tokens_BxT, lengths_B = batch["tokens"], batch["lengths"]
        if self.adv_eps and dropout_key is not None:
            ce, hs_BxTxO, k_head = self._adversarial_loss(batch, dropout_key)
        else:
            logits_BxC, hs_BxTxO, k_head = self._forward(*self._inputs(batch), dropout_key)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, batch["labels"]).mean()
        if not self.lm_weight:
            return ce
        k_lm = None if k_head is None else jax.random.fold_in(k_head, 1)
        return ce + self.lm_weight * self._lm_loss(hs_BxTxO, tokens_BxT, lengths_B, k_lm)

    def _adversarial_loss(self, batch, dropout_key):
        """(ce(x) + ce(x + r), the clean encoder outputs, the head's key): module docstring."""
        tokens_BxT, lengths_B, chars_BxTxW, word_lengths_BxT = self._inputs(batch)
        k_encode, k_head = jax.random.split(dropout_key)  # the keys _forward and encode use
        k_embed, k_rnn = jax.random.split(k_encode)
        xs_BxTxE = self._encoder_inputs(tokens_BxT, chars_BxTxW, word_lengths_BxT, k_embed)

        def ce_of(xs_BxTxE, model=self):
            hs_BxTxO, _ = model.rnn(xs_BxTxE, lengths=lengths_B, dropout_key=k_rnn)
            logits_BxC = model._head(hs_BxTxO, lengths_B, k_head)
            return optax.softmax_cross_entropy_with_integer_labels(logits_BxC, batch["labels"]).mean(), hs_BxTxO

        ce, hs_BxTxO = ce_of(xs_BxTxE)
        x_BxTxE = jax.lax.stop_gradient(xs_BxTxE)
        # r is a constant of the training gradient, so its direction g comes from a copy of the
        # model outside that differentiation: no gradient of a gradient is traced (the CPU
        # kernels' backward pass, recur/kernels/cpu.py, has no derivative of its own)
        graphdef, state = nnx.split(self)
        frozen = nnx.merge(graphdef, jax.lax.stop_gradient(state))
        g_BxTxE = jax.grad(lambda x: ce_of(x, frozen)[0])(x_BxTxE)
        mask_BxTx1 = valid_mask(lengths_B, tokens_BxT.shape[1])[..., None]
        x_norm_Bx1x1 = jnp.sqrt(jnp.sum(jnp.square(x_BxTxE * mask_BxTx1), axis=(1, 2), keepdims=True))
        g_BxTxE = g_BxTxE * mask_BxTx1
        g_norm_Bx1x1 = jnp.sqrt(jnp.sum(jnp.square(g_BxTxE), axis=(1, 2), keepdims=True))
        r_BxTxE = jax.lax.stop_gradient(self.adv_eps * x_norm_Bx1x1 * g_BxTxE / jnp.maximum(g_norm_Bx1x1, 1e-12))
        return ce + ce_of(xs_BxTxE + r_BxTxE)[0], hs_BxTxO, k_head

    def probabilities(self, batch):
        """The predicted distribution over classes of each sentence, float [B, C]."""
        return jax.nn.softmax(self(*self._inputs(batch)), axis=-1)

    def predict(self, batch):
        """The most likely class of each sentence, int32 [B]."""
        return jnp.argmax(self(*self._inputs(batch)), axis=-1).astype(jnp.int32)
