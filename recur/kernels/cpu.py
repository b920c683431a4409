"""Recurrent time loops as compiled C++ on the CPU: XLA FFI custom calls (cpu/rnn.cc).

On the CPU back end, ``recur.scan`` with the default ``backward="deferred"`` runs the plain LSTM
and the reset-after GRU (``cell.fused_backward``; float32; no ``lengths`` or ``resets``) through
:func:`lstm` / :func:`gru` (dispatched by :func:`run`): one custom
call for the forward time loop and one for the backward one, each a small matrix product per
step (the recurrent weights packed once per call) plus one pass of element-wise work, with
nothing between the steps, and the batch cut into one block of rows per core. The recurrent weight
gradient (and the GRU's recurrent bias gradient) is one large matmul (sum) after the backward
loop, in XLA, as in recur/backprop.py. Values
and gradients are those of the plain scan up to float rounding (tests/test_cpu_kernels.py).

The extension is compiled on first use with the machine's C++ compiler (``$CXX``, else ``c++``
or ``g++``) against the FFI headers jaxlib ships and cached in ``$RECUR_CACHE_DIR`` (default
``~/.cache/recur``), keyed by the source, compiler and CPU. Without a compiler, or with
``RECUR_CPU_KERNELS=0``, the scan runs the XLA loops of recur/backprop.py instead
(:func:`unavailable` says why).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp

_SOURCE = pathlib.Path(__file__).with_name("cpu") / "rnn.cc"
_FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-ffast-math", "-fPIC", "-shared", "-std=c++17",
          "-pthread", "-w"]
_TARGETS = {"recur_lstm_forward": "RecurLstmForward", "recur_lstm_backward": "RecurLstmBackward",
            "recur_gru_forward": "RecurGruForward", "recur_gru_backward": "RecurGruBackward"}


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_name() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def _load():
    """(library, None) once built, loaded and registered with XLA; (None, why not) otherwise."""
    cxx = _compiler()
    if cxx is None:
        return None, "no C++ compiler (set CXX, or install g++)"
    include = jax.ffi.include_dir()
    source = _SOURCE.read_bytes()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(b"\0".join([source, version.encode(), " ".join(_FLAGS).encode(), include.encode(),
                                     _cpu_name().encode()])).hexdigest()[:16]
    cache = pathlib.Path(os.environ.get("RECUR_CACHE_DIR") or pathlib.Path.home() / ".cache" / "recur")
    target = cache / f"rnn-{key}.so"
    try:
        if not target.exists():
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                out = pathlib.Path(tmp) / target.name
                done = subprocess.run([cxx, *_FLAGS, "-I", include, str(_SOURCE), "-o", str(out), "-lm"],
                                      capture_output=True, text=True)
                if done.returncode != 0:
                    return None, f"compiling {_SOURCE.name} failed: {done.stderr.strip()[-500:]}"
                os.replace(out, target)  # atomic: concurrent builders each write a whole file
        lib = ctypes.CDLL(str(target))
    except OSError as e:
        return None, f"building or loading {target} failed ({e}); set RECUR_CACHE_DIR to a writable folder"
    for name, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return lib, None


def unavailable() -> str | None:
    """None if the CPU kernels can run here; else why they do not."""
    if os.environ.get("RECUR_CPU_KERNELS", "1").lower() in ("0", "false", "no", "off"):
        return "RECUR_CPU_KERNELS=0"
    if jax.default_backend() != "cpu":
        return f"the backend is {jax.default_backend()}, not cpu"
    return _load()[1]


def applies(cell, params, carry0, mask, resets) -> bool:
    """Whether recur.scan's deferred path should run this scan through :func:`run`."""
    from recur.cells.gru import GRU
    from recur.cells.lstm import LSTM

    if not (isinstance(cell, (LSTM, GRU)) and cell.fused_backward and mask is None and resets is None):
        return False
    if isinstance(cell, LSTM) and not (isinstance(carry0, dict) and set(carry0) == {"h", "c"}):
        return False
    f32 = jnp.dtype(jnp.float32)
    leaves = [params["W_h"], params["W_x"], *jax.tree.leaves(carry0)]
    if jnp.dtype(cell.dtype) != f32 or any(jnp.dtype(x.dtype) != f32 for x in leaves):
        return False
    return unavailable() is None


def run(cell, params, carry0, us_T):
    """(hs_T [T, B, H], final carry) of an LSTM or GRU for which :func:`applies` holds."""
    from recur.cells.lstm import LSTM

    if isinstance(cell, LSTM):
        hs_T, c_T = lstm(params["W_h"], carry0["h"], carry0["c"], us_T)
        return hs_T, {"h": hs_T[-1], "c": c_T}
    hs_T = gru(params["W_h"], params["b_h"], carry0, us_T)
    return hs_T, hs_T[-1]


def _call(name, outs, *args):
    lib, why = _load()
    if lib is None:
        raise RuntimeError(f"recur.kernels.cpu cannot run here: {why}")
    return jax.ffi.ffi_call(name, outs, vmap_method="sequential")(*args)


@jax.custom_vjp
def lstm(W_h, h0, c0, us_T):
    """The plain LSTM over time-major projected inputs us_T [T, B, 4H] (gates i, f, g, o; W_h
    [4H, H]); returns (hs_T [T, B, H], c_T [B, H]). float32, T >= 1."""
    return _forward(W_h, h0, c0, us_T)[0]


def _forward(W_h, h0, c0, us_T):
    T, B, G = us_T.shape
    H = G // 4
    seq = jax.ShapeDtypeStruct((T, B, H), jnp.float32)
    hs, cs, tcs, ts = _call("recur_lstm_forward", (seq, seq, seq, jax.ShapeDtypeStruct((T, B, G), jnp.float32)),
                            us_T, W_h, h0, c0)
    return (hs, cs[-1]), (W_h, h0, c0, hs, cs, tcs, ts)


def _backward(res, cts):
    W_h, h0, c0, hs, cs, tcs, ts = res
    dhs, dc_T = cts
    cs_prev = jnp.concatenate([c0[None], cs[:-1]])
    state = jax.ShapeDtypeStruct(h0.shape, jnp.float32)
    dpre, dh0, dc0 = _call("recur_lstm_backward", (jax.ShapeDtypeStruct(ts.shape, jnp.float32), state, state),
                           ts, tcs, cs_prev, dhs, W_h, jnp.zeros_like(h0), dc_T)
    h_prev = jnp.concatenate([h0[None], hs[:-1]])
    dW_h = jnp.einsum("tbg,tbh->gh", dpre, h_prev)
    return dW_h, dh0, dc0, dpre


lstm.defvjp(_forward, _backward)


@jax.custom_vjp
def gru(W_h, b_h, h0, us_T):
    """The reset-after GRU over time-major projected inputs us_T [T, B, 3H] (W_x x + b_x; gates
    r, z, n; W_h [3H, H], b_h [3H]); returns hs_T [T, B, H]. float32, T >= 1."""
    return _gru_forward(W_h, b_h, h0, us_T)[0]


def _gru_forward(W_h, b_h, h0, us_T):
    T, B, G = us_T.shape
    H = G // 3
    seq = jax.ShapeDtypeStruct((T, B, H), jnp.float32)
    hs, ts, ns, recns = _call("recur_gru_forward", (seq, jax.ShapeDtypeStruct((T, B, 2 * H), jnp.float32), seq, seq),
                              us_T, W_h, b_h, h0)
    return hs, (W_h, h0, hs, ts, ns, recns)


def _gru_backward(res, dhs):
    W_h, h0, hs, ts, ns, recns = res
    hs_prev = jnp.concatenate([h0[None], hs[:-1]])
    T, B, H = hs.shape
    full = jax.ShapeDtypeStruct((T, B, 3 * H), jnp.float32)
    du, drec, dh0 = _call("recur_gru_backward", (full, full, jax.ShapeDtypeStruct(h0.shape, jnp.float32)),
                          ts, ns, recns, hs_prev, dhs, W_h, jnp.zeros_like(h0))
    dW_h = jnp.einsum("tbg,tbh->gh", drec, hs_prev)
    return dW_h, jnp.sum(drec, axis=(0, 1)), dh0, du


gru.defvjp(_gru_forward, _gru_backward)
