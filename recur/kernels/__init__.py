"""Pallas kernels behind recur.scan(mode="kernel" | "auto"); see docs/kernels.md."""
