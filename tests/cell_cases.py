"""The cells every generic test runs on: every registered name, plus switch combinations.

A new cell or variant registered in recur/cells/ is picked up by ``list_cells()``; add a line to
EXTRA only for a combination of switches worth testing on its own.
"""
import recur

EXTRA = [
    "lstm:proj_size=3",
    "lstm:peepholes,cifg",
    "lstm:peepholes,ln",
    "lstm:peepholes,fgr",
    "lstm:niaf,noaf,nog",
    "clockwork:periods=1-3",
    "dglstm:num_layers=3",
    "lru:state_size=6",
]

CASES = recur.list_cells() + EXTRA


def hidden_size(name: str) -> int:
    """A small hidden size each case accepts (clockwork needs one divisible by its modules)."""
    return 8 if name.startswith("clockwork") else 5
