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


def _distinct(names):
    """Each configuration once: an alias builds the same cell as a name before it (lstm:peepholes
    is lstm:vanilla, gru:reset_before is gru:cho, lstm:np is lstm, ...), and running every generic
    test on it again would test nothing new. ALIASES keeps the names left out, for the test that
    they resolve to the cell they stand for."""
    seen, kept, aliases = {}, [], {}
    for name in names:
        key = repr(recur.get_cell(name, hidden_size(name)))
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            kept.append(name)
    return kept, aliases


def hidden_size(name: str) -> int:
    """A small hidden size each case accepts (clockwork needs one divisible by its modules)."""
    return 8 if name.startswith("clockwork") else 5


CASES, ALIASES = _distinct(recur.list_cells() + EXTRA)
