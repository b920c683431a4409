"""Test-wide settings: silent broadcasting between arrays of different rank is an error."""
import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
