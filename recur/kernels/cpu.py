"""Recurrent time loops as compiled C++ on the CPU: XLA FFI custom calls (cpu/rnn.cc).

Two families: the LSTM / GRU loops below, and the linear recurrence s_t = a_t s_{t-1} + b_t
that ``recur.scan(mode="parallel")`` runs on the CPU (:func:`linear_recurrence` on any float32
(a, b); :func:`gated` for a float32 minGRU / minLSTM, with the gates computed inside the loop
from the projected inputs and recomputed in the backward pass). The linear kernels cut each
batch row's time axis into chunks when there are fewer rows than cores, fold every chunk into an
affine map in parallel, combine the maps in order and rerun every chunk from its true entering
state (the GPU kernel's scheme, recur/kernels/linear.py); with enough rows each row is one chunk
and the data is streamed once. The backward pass is the same scan read from the end.

On the CPU back end, ``recur.scan`` with the default ``backward="deferred"`` runs the plain LSTM
and the reset-after GRU (``cell.plain`` / ``cell.fused_backward``; float32; ``lengths`` allowed, no ``resets``) through
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
(:func:`unavailable` says why). The kernels' backward pass has no derivative of its own: a
gradient of a gradient through such a scan raises NotImplementedError saying what to do.
"""
from __future__ import annotations

import contextlib
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
import numpy as np

_SOURCE = pathlib.Path(__file__).with_name("cpu") / "rnn.cc"
_FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-ffast-math", "-fPIC", "-shared", "-std=c++17",
          "-pthread", "-w"]
_TARGETS = {"recur_lstm_forward": "RecurLstmForward", "recur_lstm_backward": "RecurLstmBackward",
            "recur_lstm_infer": "RecurLstmInfer", "recur_gru_infer": "RecurGruInfer",
            "recur_gru_forward": "RecurGruForward", "recur_gru_backward": "RecurGruBackward",
            "recur_linear_forward": "RecurLinearForward", "recur_linear_backward": "RecurLinearBackward",
            "recur_gated_forward": "RecurGatedForward", "recur_gated_backward": "RecurGatedBackward"}


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


@contextlib.contextmanager
def switched(on: bool):
    """The kernels on (``RECUR_CPU_KERNELS=1``) or off (``=0``) for the duration, the variable
    restored after. The switch is read when a computation is traced, so what is traced inside
    keeps it: ``with switched(False): compiled = jax.jit(f).lower(x).compile()``."""
    old = os.environ.get("RECUR_CPU_KERNELS")
    os.environ["RECUR_CPU_KERNELS"] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("RECUR_CPU_KERNELS", None)
        else:
            os.environ["RECUR_CPU_KERNELS"] = old


def float_mask(mask, B, T):
    """mask [B, T] as the kernels take it: float32, 1. at a real step and 0. at padding (None:
    every step is real)."""
    return jnp.ones((B, T), jnp.float32) if mask is None else mask.astype(jnp.float32)


def applies(cell, params, carry0, mask, resets) -> bool:
    """Whether recur.scan's deferred path should run this scan through :func:`run`."""
    from recur.cells.gru import GRU
    from recur.cells.lstm import LSTM

    if not (isinstance(cell, (LSTM, GRU)) and cell.fused_backward and resets is None):
        return False
    if isinstance(cell, LSTM) and not cell.plain:  # the layer-norm LSTM's fused step is XLA's
        return False
    if isinstance(cell, LSTM) and not (isinstance(carry0, dict) and set(carry0) == {"h", "c"}):
        return False
    f32 = jnp.dtype(jnp.float32)
    leaves = [params["W_h"], params["W_x"], *jax.tree.leaves(carry0)]
    if jnp.dtype(cell.dtype) != f32 or any(jnp.dtype(x.dtype) != f32 for x in leaves):
        return False
    return unavailable() is None


def linear_applies(a, b) -> bool:
    """Whether recur.scan's parallel mode should run s_t = a_t s_{t-1} + b_t through
    :func:`linear_recurrence`: float32 coefficients, and the kernels available here."""
    f32 = jnp.dtype(jnp.float32)
    return jnp.dtype(a.dtype) == f32 and jnp.dtype(b.dtype) == f32 and unavailable() is None


def run(cell, params, carry0, us, mask=None):
    """(hs [B, T, H], final carry) of an LSTM or GRU for which :func:`applies` holds, from the
    batch-major projected inputs us [B, T, G] and mask [B, T] (None: every step is real).

    At a padded step (mask false) the carry passes through and hs holds it; recur.scan zeroes
    those outputs."""
    from recur.cells.lstm import LSTM

    m = float_mask(mask, *us.shape[:2])
    if isinstance(cell, LSTM):
        hs, c_T = lstm(params["W_h"], carry0["h"], carry0["c"], us, m)
        return hs, {"h": hs[:, -1], "c": c_T}
    hs = gru(params["W_h"], params["b_h"], carry0, us, m)
    return hs, hs[:, -1]


def _call(name, outs, *args, **attrs):
    lib, why = _load()
    if lib is None:
        raise RuntimeError(f"recur.kernels.cpu cannot run here: {why}")
    call = jax.ffi.ffi_call(name, outs, vmap_method="sequential")

    @jax.custom_jvp
    def kernel(*a):
        return call(*a, **attrs)

    @kernel.defjvp
    def _no_derivative(primals, tangents):
        raise NotImplementedError(
            f"recur's CPU kernel {name} has no derivative of its own, so a gradient of a gradient "
            f"through recur.scan cannot pass through it; for that computation set RECUR_CPU_KERNELS=0 "
            f"(or, for a sequential scan, call recur.scan(..., backward='autodiff'))")

    return kernel(*args)


@jax.custom_vjp
def lstm(W_h, h0, c0, us, mask):
    """The plain LSTM over batch-major projected inputs us [B, T, 4H] (gates i, f, g, o; W_h
    [4H, H]) with mask [B, T] (1. real, 0. padding); returns (hs [B, T, H], c_T [B, H]).
    float32, T >= 1. Not differentiated (inference), it runs the forward loop without writing
    the residuals the backward pass reads."""
    B, T, G = us.shape
    return _call("recur_lstm_infer", (jax.ShapeDtypeStruct((B, T, G // 4), jnp.float32),
                                      jax.ShapeDtypeStruct((B, G // 4), jnp.float32)), us, W_h, h0, c0, mask)


def _previous(first, seq):
    """[B, T, H]: first [B, H] at step 0, then seq's steps 0 .. T-2 (the carry entering each step)."""
    return jnp.concatenate([first[:, None], seq[:, :-1]], axis=1)


def _weight_gradient(d_BxTxG, x_BxTxH):
    """sum over b, t of d[b, t]^T x[b, t]: [G, H]. Written as a transpose and a plain dot, which
    XLA:CPU runs ~30% faster than the einsum contracting both leading axes (8.4 vs 11.9 ms at
    B=32, T=128, G=1024, H=256)."""
    G, H = d_BxTxG.shape[-1], x_BxTxH.shape[-1]
    return jnp.dot(jnp.transpose(d_BxTxG.reshape(-1, G)), x_BxTxH.reshape(-1, H))


def _forward(W_h, h0, c0, us, mask):
    B, T, G = us.shape
    H = G // 4
    seq = jax.ShapeDtypeStruct((B, T, H), jnp.float32)
    hs, cs, tcs, ts = _call("recur_lstm_forward", (seq, seq, seq, jax.ShapeDtypeStruct((B, T, G), jnp.float32)),
                            us, W_h, h0, c0, mask)
    return (hs, cs[:, -1]), (W_h, h0, c0, hs, cs, tcs, ts, mask)


def _backward(res, cts):
    W_h, h0, c0, hs, cs, tcs, ts, mask = res
    dhs, dc_T = cts
    state = jax.ShapeDtypeStruct(h0.shape, jnp.float32)
    dpre, dh0, dc0 = _call("recur_lstm_backward", (jax.ShapeDtypeStruct(ts.shape, jnp.float32), state, state),
                           ts, tcs, _previous(c0, cs), dhs, W_h, jnp.zeros_like(h0), dc_T, mask)
    dW_h = _weight_gradient(dpre, _previous(h0, hs))
    return dW_h, dh0, dc0, dpre, jnp.zeros_like(mask)


lstm.defvjp(_forward, _backward)


@jax.custom_vjp
def gru(W_h, b_h, h0, us, mask):
    """The reset-after GRU over batch-major projected inputs us [B, T, 3H] (W_x x + b_x; gates
    r, z, n; W_h [3H, H], b_h [3H]) with mask [B, T] (1. real, 0. padding); returns hs
    [B, T, H]. float32, T >= 1. Not differentiated (inference), it runs the forward loop without
    writing the residuals the backward pass reads."""
    return _call("recur_gru_infer", jax.ShapeDtypeStruct((*us.shape[:2], us.shape[2] // 3), jnp.float32),
                 us, W_h, b_h, h0, mask)


def _gru_forward(W_h, b_h, h0, us, mask):
    B, T, G = us.shape
    H = G // 3
    seq = jax.ShapeDtypeStruct((B, T, H), jnp.float32)
    hs, ts, ns, recns = _call("recur_gru_forward", (seq, jax.ShapeDtypeStruct((B, T, 2 * H), jnp.float32), seq, seq),
                              us, W_h, b_h, h0, mask)
    return hs, (W_h, h0, hs, ts, ns, recns, mask)


def _gru_backward(res, dhs):
    W_h, h0, hs, ts, ns, recns, mask = res
    hs_prev = _previous(h0, hs)
    B, T, H = hs.shape
    full = jax.ShapeDtypeStruct((B, T, 3 * H), jnp.float32)
    du, drec, dh0 = _call("recur_gru_backward", (full, full, jax.ShapeDtypeStruct(h0.shape, jnp.float32)),
                          ts, ns, recns, hs_prev, dhs, W_h, jnp.zeros_like(h0), mask)
    dW_h = _weight_gradient(drec, hs_prev)
    return dW_h, jnp.sum(drec, axis=(0, 1)), dh0, du, jnp.zeros_like(mask)


gru.defvjp(_gru_forward, _gru_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def linear_recurrence(a, b, chunks=0):
    """States s [B, T, S] of s_t = a_t * s_{t-1} + b_t, s_{-1} = 0, for float32 a, b [B, T, S]
    (the CPU counterpart of recur.kernels.linear.linear_recurrence).

    chunks: time chunks per batch row, scanned in parallel (three passes, cpu/rnn.cc); 0 lets
    the kernel choose (one chunk when there are at least as many rows as cores)."""
    return _linear_forward(a, b, chunks)[0]


def _linear_forward(a, b, chunks):
    s = _call("recur_linear_forward", jax.ShapeDtypeStruct(b.shape, jnp.float32), a, b, chunks=np.int64(chunks))
    return s, (a, s)


def _linear_backward(chunks, res, g):
    a, s = res
    out = jax.ShapeDtypeStruct(a.shape, jnp.float32)
    da, db = _call("recur_linear_backward", (out, out), a, s, g.astype(jnp.float32), chunks=np.int64(chunks))
    return da, db


linear_recurrence.defvjp(_linear_forward, _linear_backward)


def gated_cell(cell) -> bool:
    """Whether recur.scan(cell, ..., mode="parallel") with float32 inputs and no resets runs
    :func:`gated` here: a float32 minGRU / minLSTM, and the kernels available."""
    from recur.cells.minrnn import MinGRU, MinLSTM

    f32 = jnp.dtype(jnp.float32)
    return (type(cell) in (MinGRU, MinLSTM) and jnp.dtype(cell.dtype) == f32
            and jnp.dtype(cell.state_dtype) == f32 and unavailable() is None)


def gated_kind(cell, carry0, us) -> int:
    """The gated kernel's kind for this scan (1 minGRU, 2 minGRU identity, 3 minLSTM, 4 minLSTM
    identity; cpu/rnn.cc), or 0 when it does not apply: another cell, anything but float32, or
    the kernels unavailable."""
    from recur.cells.minrnn import MinGRU

    f32 = jnp.dtype(jnp.float32)
    if not gated_cell(cell) or any(jnp.dtype(x.dtype) != f32 for x in (carry0, us)):
        return 0
    return (1 if isinstance(cell, MinGRU) else 3) + (cell.candidate == "identity")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def gated(us, s0, mask, kind, chunks=0):
    """States s [B, T, S] of a minGRU / minLSTM (``kind``, see :func:`gated_kind`) from its
    projected inputs us [B, T, k S], the initial state s0 [B, S] and mask [B, T] (1. real step,
    0. padding, where the state passes through). float32. chunks as in :func:`linear_recurrence`."""
    return _gated_forward(us, s0, mask, kind, chunks)[0]


def _gated_forward(us, s0, mask, kind, chunks):
    B, T = us.shape[:2]
    out = jax.ShapeDtypeStruct((B, T, s0.shape[-1]), jnp.float32)
    s = _call("recur_gated_forward", out, us, s0, mask, kind=np.int64(kind), chunks=np.int64(chunks))
    return s, (us, s0, s, mask)


def _gated_backward(kind, chunks, res, g):
    us, s0, s, mask = res
    du, ds0 = _call("recur_gated_backward", (jax.ShapeDtypeStruct(us.shape, jnp.float32),
                                             jax.ShapeDtypeStruct(s0.shape, jnp.float32)),
                    us, s0, s, g.astype(jnp.float32), mask, kind=np.int64(kind), chunks=np.int64(chunks))
    return du, ds0, jnp.zeros_like(mask)


gated.defvjp(_gated_forward, _gated_backward)
