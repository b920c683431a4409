"""recur: recurrent neural networks in JAX.

    cell = recur.get_cell("lstm:cifg", hidden_size=128)
    params = cell.init(jax.random.key(0), input_size=32)
    hs_BxTxH, carry = recur.scan(cell, params, xs_BxTxI, lengths=lengths_B)
"""
from recur import cells
from recur.cells import get_cell, linear_cells, list_cells, register
from recur.scan import scan
from recur.layers import bidirectional, init_stack, stack

__all__ = ["cells", "get_cell", "list_cells", "linear_cells", "register", "scan", "bidirectional", "stack", "init_stack"]
