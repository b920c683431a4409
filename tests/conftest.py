"""Test-wide settings.

- Silent broadcasting between arrays of different rank is an error.
- After each test module, jax's caches of compiled functions are cleared. Every compiled XLA:CPU
  executable keeps its own memory mappings, and one xdist worker runs ~500 tests: without this,
  a worker reached the kernel's limit of 65,530 mappings (vm.max_map_count) late in the run,
  after which XLA's compiler segfaulted or threads could not start ("can't start new thread").
"""
import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_functions():
    yield
    jax.clear_caches()
