"""recur: recurrent neural networks in JAX."""
