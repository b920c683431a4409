"""The cell zoo. Importing this package registers every cell; see ``registry.get_cell``."""
from recur.cells.base import Cell, LinearCell
from recur.cells.registry import get_cell, list_cells, register, split_specs, switches
from recur.cells.elman import Elman
from recur.cells.lstm import LSTM
from recur.cells.gru import GRU, MGU
from recur.cells.indrnn import IndRNN
from recur.cells.minrnn import MinGRU, MinLSTM
from recur.cells.lru import LRU
from recur.cells.clockwork import Clockwork
from recur.cells.depth_gated import DepthGatedLSTM


def linear_cells() -> list[str]:
    """Families whose recurrence is linear in the state (runnable with mode='parallel')."""
    return [name for name in list_cells() if ":" not in name and switches(name)[0].linear]


__all__ = [
    "Cell", "LinearCell", "get_cell", "list_cells", "register", "split_specs", "linear_cells",
    "Elman", "LSTM", "GRU", "MGU", "IndRNN", "MinGRU", "MinLSTM", "LRU", "Clockwork", "DepthGatedLSTM",
]
