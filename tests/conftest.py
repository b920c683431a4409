"""Test-wide settings.

- Silent broadcasting between arrays of different rank is an error.
- After each test module, jax's caches of compiled functions are cleared. Every compiled XLA:CPU
  executable keeps its own memory mappings, and one xdist worker runs ~500 tests: without this,
  a worker reached the kernel's limit of 65,530 mappings (vm.max_map_count) late in the run,
  after which XLA's compiler segfaulted or threads could not start ("can't start new thread").
- XLA optimises little (jax_disable_most_optimizations, also for the subprocesses that tests
  start): the suite's time is mostly compiling small programs that then run once, and this cuts
  it by about a third (XLA's HLO passes still run; LLVM's expensive passes do not, so the CPU code
  tested is not the optimised code users run). Set JAX_DISABLE_MOST_OPTIMIZATIONS=0 to test that.
- recur.scan(mode="auto") does not measure (RECUR_AUTOTUNE is unset: a developer's setting would
  change what the fixed-table tests see); the autotuner's own tests turn it on.
"""
import os

os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
os.environ.pop("RECUR_AUTOTUNE", None)

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_disable_most_optimizations",
                  os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"].lower() not in ("0", "false", "no", "off", "n", "f"))


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_functions():
    yield
    jax.clear_caches()
