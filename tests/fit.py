"""A minimal Adam training loop for model tests: ``fit(model, batch)``."""
import jax
import optax
from flax import nnx


def fit(model, batch, steps: int = 100, lr: float = 1e-2):
    """Trains ``model`` (with a ``loss(batch, dropout_key=...)`` method) on one batch, in place."""
    optimizer = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, batch, key):
        loss, grads = nnx.value_and_grad(lambda m: m.loss(batch, dropout_key=key))(model)
        optimizer.update(model, grads)
        return loss

    for key in jax.random.split(jax.random.key(0), steps):
        loss = train_step(model, optimizer, batch, key)
    return loss
