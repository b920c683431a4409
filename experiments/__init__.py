"""Thin entry points: python -m experiments.<train|eval|sample|benchmark> ..."""
