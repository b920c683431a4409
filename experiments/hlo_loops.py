"""What each step of recur's time loop costs in launches: the optimized HLO of a training step
(or the forward pass), per while loop, counted by instruction kind.

    python -m experiments.hlo_loops --cell lstm --hidden 1024 --dtype bfloat16 --unroll 1,8

On a GPU each top-level fusion, custom call (a cuBLAS matmul, a Triton kernel) and copy in a
loop body is a kernel launched every iteration; with unroll k an iteration runs k steps. The
loop's trip count comes from XLA's known_trip_count. Compiling needs no timing, so this runs on
a CPU too, where it shows the CPU back end's program (not the GPU's fusion decisions).
"""
from __future__ import annotations

import argparse
import collections
import re

import jax
import jax.numpy as jnp

import recur

_SKIP = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast"}


def computations(hlo: str) -> dict[str, list[str]]:
    """{computation name: its instruction lines} of an HLO module's text."""
    out, name = {}, None
    for line in hlo.splitlines():
        m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if m and not line.startswith(" "):
            name = m.group(1)
            out[name] = []
        elif line.startswith("}"):
            name = None
        elif name is not None and "=" in line:
            out[name].append(line.strip())
    return out


def kind(line: str) -> str:
    """The instruction's opcode; a custom call with its target, a fusion with its kind."""
    m = re.search(r"=\s*[^=]*?\s([a-z][\w\-]*)\(", line)
    op = m.group(1) if m else "?"
    if op == "custom-call":
        t = re.search(r'custom_call_target="([^"]+)"', line)
        return f"custom-call {t.group(1) if t else '?'}"
    if op == "fusion":
        k = re.search(r"kind=(k\w+)", line)
        return f"fusion {k.group(1) if k else ''}".strip()
    return op


def loops(hlo: str) -> list[dict]:
    """Per while loop: its body's name, trip count and instruction kinds (top level)."""
    comps, found = computations(hlo), []
    for lines in comps.values():
        for line in lines:
            if " while(" not in line:
                continue
            body = re.search(r"body=%?([\w.\-]+)", line).group(1)
            trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
            counts = collections.Counter(kind(x) for x in comps.get(body, []))
            for k in list(counts):
                if k in _SKIP:
                    del counts[k]
            found.append(dict(body=body, trips=int(trips.group(1)) if trips else None, kinds=counts))
    return found


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cell", default="lstm")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--unroll", default="1,8")
    p.add_argument("--mode", default="sequential")
    p.add_argument("--infer", action="store_true", help="the forward pass alone")
    a = p.parse_args(argv)
    dtype = jnp.dtype(a.dtype)
    cell = recur.get_cell(a.cell, a.hidden, dtype=dtype)
    params = cell.init(jax.random.key(0), a.hidden)
    xs = jnp.zeros((a.batch, a.length, a.hidden), dtype)
    print(f"device: {jax.devices()[0].device_kind}; {a.cell} H={a.hidden} B={a.batch} T={a.length} {a.dtype} "
          f"{'infer' if a.infer else 'train'} mode={a.mode}")
    result = {}
    for u in [int(u) for u in a.unroll.split(",")]:
        def loss(p, x, u=u):
            return jnp.mean(jnp.square(recur.scan(cell, p, x, mode=a.mode, unroll=u)[0].astype(jnp.float32)))

        f = jax.jit(loss if a.infer else jax.grad(loss, argnums=(0, 1)))
        hlo = f.lower(params, xs).compile().as_text()
        result[u] = loops(hlo)
        print(f"unroll {u}:")
        for lp in result[u]:
            launches = sum(n for k, n in lp["kinds"].items() if k.startswith(("fusion", "custom-call", "copy")))
            print(f"  loop {lp['body']}: {lp['trips']} iterations, {launches} fusions / custom calls / copies each")
            for k, n in lp["kinds"].most_common():
                print(f"    {n:3d} {k}")
    return result


if __name__ == "__main__":
    main()
