"""A race detector for the persistent kernels' grid barriers.

On a GPU the programs of a persistent kernel run side by side and meet at grid barriers; a value
one program writes may be read by another only in a later barrier interval, and a location one
program reads may not be written by another in the same interval. Interpret mode (the value tests
in test_persistent.py) runs the (row, unit) blocks one after another within each phase of the
kernel's Python code, so a missing or misplaced barrier still gives the right numbers there.

Here each kernel runs eagerly in Python instead of through pallas_call: its refs are NumPy arrays
that log every read and write (buffer, region, the block that made it, the barrier interval),
its barrier only counts intervals, and its loops are Python loops (concrete time steps and
indices). Then no interval may hold a write by one block and a read or write by another of the
same location (writes of the same values by several blocks, such as the layer-norm kernels'
per-row 1 / std, excepted), nor a block's read of what it wrote earlier in the interval.
"""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import indexing

import recur
from recur.kernels import persistent

B, T, I, H = 32, 3, 8, 32  # 2 row blocks x 2 unit blocks of 16


class _Log:
    def __init__(self):
        self.interval, self.block, self.events, self.fresh = 0, None, [], 0
        # a give-up (see _eager_launch): the block that gave up, the launch's first event, the
        # stale reads served and each launch's barrier count
        self.giver, self.start, self.stale, self.arrivals = None, 0, 0, {}


class _GaveUp:
    """The gave_up flag a barrier returns to the program that gives up: true only while that
    block's code runs (the eager kernel runs every block's in turn); jnp.where, patched, reads it."""

    def __init__(self, block):
        self.block = block


def _index(shape, idx):
    """[(lo, hi, kept)] per axis of ref[idx] (idx of ints, slices, pl.ds and Ellipsis); kept:
    the axis stays (an int index drops it)."""
    idx = idx if isinstance(idx, tuple) else (idx,)
    if any(e is Ellipsis for e in idx):
        k = idx.index(Ellipsis)
        idx = idx[:k] + (slice(None),) * (len(shape) - len(idx) + 1) + idx[k + 1:]
    idx = idx + (slice(None),) * (len(shape) - len(idx))
    out = []
    for e, n in zip(idx, shape):
        if isinstance(e, indexing.Slice):
            out.append((int(e.start), int(e.start) + int(e.size), True))
        elif isinstance(e, slice):
            lo, hi, _ = e.indices(n)
            out.append((lo, hi, True))
        else:
            out.append((int(e), int(e) + 1, False))
    return out


class _Ref:
    """A NumPy-backed ref (or an ``at`` view of one) that logs its reads and writes: the region
    of the whole buffer, the block that made it and the barrier interval."""

    def __init__(self, name, storage, log, view=None):
        self.name, self.storage, self.log = name, storage, log
        self.view = view or [(0, n, True) for n in storage.shape]  # [(lo, hi, kept)] per axis of storage

    @property
    def shape(self):
        return tuple(hi - lo for lo, hi, kept in self.view if kept)

    def _resolve(self, idx):
        """(the new view of the storage's axes, the region [(lo, hi)])."""
        visible = [k for k, (_, _, kept) in enumerate(self.view) if kept]
        sub = _index([self.view[k][1] - self.view[k][0] for k in visible], idx)
        view = list(self.view)
        for k, (lo, hi, kept) in zip(visible, sub):
            view[k] = (self.view[k][0] + lo, self.view[k][0] + hi, kept)
        return view, [(lo, hi) for lo, hi, _ in view]

    def _slices(self, view):
        return tuple(slice(lo, hi) for lo, hi, _ in view)

    def __getitem__(self, idx):
        view, region = self._resolve(idx)
        log = self.log
        # a read's last field: "fresh" within persistent._load_fresh (a volatile load on a GPU)
        log.events.append((log.interval, log.block, "get", self.name, region, "fresh" if log.fresh else None))
        value = self.storage[self._slices(view)]
        value = jnp.asarray(np.squeeze(value, axis=tuple(k for k, v in enumerate(view) if not v[2])))
        if log.giver is not None and log.block == log.giver and any(
                e[2] == "put" and e[3] == self.name and e[1] != log.block and _overlap(e[4], region)
                for e in log.events[log.start:]):
            log.stale += 1  # a program that gave up may read another's value from before its store
            value = value + jnp.asarray(0.5, value.dtype)
        return value

    def __setitem__(self, idx, value):
        view, region = self._resolve(idx)
        target = self._slices(view)
        value = np.asarray(value, self.storage.dtype).reshape(self.storage[target].shape)
        self.log.events.append((self.log.interval, self.log.block, "put", self.name, region, value.tobytes()))
        self.storage[target] = value

    @property
    def at(self):
        ref = self

        class _At:
            def __getitem__(self, idx):
                return _Ref(ref.name, ref.storage, ref.log, ref._resolve(idx)[0])

        return _At()


class _Blocks(list):
    """grid.blocks(): iterating it marks which block the code that follows runs for."""

    def __init__(self, items, log):
        super().__init__(items)
        self.log = log

    def __iter__(self):
        for b in list.__iter__(self):
            self.log.block = b
            yield b


def _eager_launch(log, drop=None, give_up=None):
    """_Grid.launch, eagerly on logged NumPy refs; drop(k): the k-th barrier call (from 0) is not one.
    give_up (launch name's ending, k, block): in that launch, the block gives up at the k-th
    barrier call: the barrier returns it a _GaveUp, and its reads of what other blocks wrote in the
    launch are stale from then on."""
    def launch(self, kernel, inputs, out_shape, name, arrivals):
        log.interval += 1  # a launch boundary orders everything before it
        log.start, log.arrivals[name] = len(log.events), arrivals
        ins = [_Ref(f"{name}:in{j}", np.array(x), log) for j, x in enumerate(inputs)]
        outs = [_Ref(f"{name}:out{j}", np.zeros(s.shape, s.dtype), log) for j, s in enumerate(out_shape)]

        calls = []

        def barrier(n, gave_up):
            calls.append(n)
            assert n == len(calls), (name, calls)  # the k-th barrier waits for k arrivals per program
            if drop is None or not drop(len(calls) - 1):
                log.interval += 1
            if give_up is not None and name.endswith(give_up[0]) and len(calls) > give_up[1]:
                log.giver = give_up[2]
                return _GaveUp(log.giver)
            return gave_up

        start = log.interval
        kernel(ins, outs, barrier)
        log.giver = None
        assert len(calls) == arrivals, (name, len(calls), arrivals)  # the launch's barrier count
        assert drop is not None or log.interval - start == arrivals
        return [jnp.asarray(o.storage) for o in outs], jnp.bool_(True)

    return launch


def _overlap(r1, r2):
    return all(a0 < b1 and b0 < a1 for (a0, a1), (b0, b1) in zip(r1, r2))


def races(events):
    """(interval, buffer, kind, block, other block) of every conflicting pair of overlapping
    regions in one interval: a write and a read, or two writes of different values, by different
    blocks; or a block's read of what it wrote earlier in the interval (its threads hold different
    elements, and Triton orders their global stores and loads only at a barrier)."""
    found = []
    key = lambda e: (e[1][0], e[1][3])
    for (interval, name), group in itertools.groupby(sorted(enumerate(events), key=key), key=key):
        group = list(group)
        for i, p in group:
            if p[2] != "put":
                continue
            for j, e in group:
                if not _overlap(p[4], e[4]):
                    continue
                if e[1] != p[1] and (e[2] == "get" or e[5] != p[5]) or e[1] == p[1] and e[2] == "get" and j > i:
                    found.append((interval, name, e[2], p[1], e[1]))
    return found


def stale_reads(events):
    """(buffer, reading block, writing block) of every read that is not a fresh (volatile) load of
    a region another block wrote in the same launch: on a GPU it could be served from a copy in
    the reading SM's L1 from before the writer's store (the barrier orders the store, not the
    reader's cache)."""
    writes = {}
    for e in events:
        if e[2] == "put":
            writes.setdefault(e[3], []).append(e)
    return sorted({(e[3], e[1], p[1]) for e in events if e[2] == "get" and e[5] != "fresh"
                   for p in writes.get(e[3], ()) if p[1] != e[1] and _overlap(p[4], e[4])})


def _run(monkeypatch, fn, drop=None, give_up=None, log=None):
    log = log or _Log()

    def fresh(ref, interpret):
        log.fresh += 1
        try:
            return ref[...]
        finally:
            log.fresh -= 1

    monkeypatch.setattr(persistent, "_load_fresh", fresh)
    monkeypatch.setattr(persistent._Grid, "launch", _eager_launch(log, drop, give_up))
    where = jnp.where
    monkeypatch.setattr(jnp, "where", lambda c, *a, **kw: where(
        jnp.bool_(log.block == c.block) if isinstance(c, _GaveUp) else c, *a, **kw))
    blocks = persistent._Grid.blocks
    monkeypatch.setattr(persistent._Grid, "blocks", lambda self: _Blocks(blocks(self), log))
    monkeypatch.setattr(jax.lax, "fori_loop",
                        lambda lo, hi, body, init: functools.reduce(lambda c, i: body(i, c), range(lo, hi), init))
    with jax.disable_jit():
        fn()
    return log.events


# lstmp: 16 columns of h (one P block, computed by both unit blocks) and 64 (two of 32)
CELLS = ["lstm", "gru", "elman", "lstm:peepholes,cifg", "gru:cho", "mgu", "lstm:ln", "lstm:peepholes,cifg,ln,proj_size=64",
         "lstm:proj_size=16", "lstm:proj_size=64,peepholes,cifg", "lstm:fgr,peepholes"]


# bfloat16: the reverse loops share d rec through a separate copy in the compute dtype
@pytest.mark.parametrize("name,remat,dtype", [(c, r, jnp.float32) for r in ("none", "step") for c in CELLS] + [
    (c, "none", jnp.bfloat16) for c in ("lstm", "gru:cho", "lstm:peepholes,cifg,ln", "lstm:peepholes,cifg,ln,proj_size=16", "lstm:proj_size=64,peepholes,cifg",
                                        "lstm:fgr,peepholes")])
def test_no_program_reads_or_overwrites_what_another_writes_between_the_same_barriers(monkeypatch, name, remat,
                                                                                      dtype):
    """Every persistent kernel of a training step (forward with what the backward reads, then the
    backward; remat="step": the recomputing backward), with lengths, eagerly with logged refs; and
    every read of what another program wrote in the launch is a fresh (volatile) load."""
    cell = recur.get_cell(name, H, dtype=dtype)
    assert persistent.problem(cell, B, remat=remat) is None
    params = cell.init(jax.random.key(0), I)
    xs = jax.random.normal(jax.random.key(1), (B, T, I))
    lengths = jnp.arange(B) % (T + 1)
    loss = lambda p: jnp.sum(recur.scan(cell, p, xs, lengths=lengths, mode="kernel", remat=remat)[0])
    monkeypatch.setenv("RECUR_PALLAS_INTERPRET", "1")
    events = _run(monkeypatch, lambda: jax.grad(loss)(params))
    gets = {(e[3], e[1]) for e in events if e[2] == "get"}
    assert len({b for _, b in gets}) == 4  # every block read something (the log sees the kernels' work)
    assert not races(events), races(events)[:5]
    assert not stale_reads(events), stale_reads(events)[:5]


def test_the_detector_finds_a_missing_or_misplaced_barrier(monkeypatch):
    """The LSTM's forward kernel with every other step's barrier dropped: blocks read h_t for the
    next step's product in the interval in which the others write it; the layer-norm kernel with
    the barrier after W_h h's partial sums dropped: they are read where they are written."""
    cell = recur.get_cell("lstm", H)
    params = cell.init(jax.random.key(0), I)
    us = cell.project(params, jax.random.normal(jax.random.key(1), (T, B, I)))
    z = jnp.zeros((B, H))
    events = _run(monkeypatch, lambda: persistent.run_forward(persistent.LSTM_RULE, us, params["W_h"], None,
                                                              {"h": z, "c": z}, dtype=jnp.float32, interpret=True),
                  drop=lambda k: k % 2 == 0)
    assert {e[1] for e in races(events)} == {"recur_lstm_persistent:out0"}  # hq, the [T + 1, B, H] buffer of h
    from recur.kernels import persistent_ln

    cell = recur.get_cell("lstm:ln", H)
    params = cell.init(jax.random.key(0), I)
    events = _run(monkeypatch, lambda: persistent_ln.run_forward(us, params["W_h"], params, z, z,
                                                                 dtype=jnp.float32, interpret=True),
                  drop=lambda k: k == 1)  # the first step's first barrier
    # the sum and squared deviation of W_h h
    assert {e[1] for e in races(events)} == {"recur_lstm_ln_persistent:out3", "recur_lstm_ln_persistent:out4"}


def test_the_detector_finds_a_plain_read_of_another_programs_writes(monkeypatch):
    """The FGR LSTM's forward kernel with its gates' product read through the caches (fresh=False):
    the blocks read the other blocks' i, f, o of the step before with plain loads."""
    from recur.kernels import persistent_fgr

    cell = recur.get_cell("lstm:fgr", H)
    params = cell.init(jax.random.key(0), I)
    us = cell.project(params, jax.random.normal(jax.random.key(1), (T, B, I)))
    z = jnp.zeros((B, H))
    run = lambda: persistent_fgr.run_forward(us, params["W_h"], params["R_gates"], z, z, jnp.zeros((B, 3 * H)),
                                             dtype=jnp.float32, interpret=True)
    assert not stale_reads(_run(monkeypatch, run))
    gate_product = persistent._Grid.gate_product
    monkeypatch.setattr(persistent._Grid, "gate_product", lambda self, *a, **kw: gate_product(
        self, *a, **dict(kw, fresh=kw.get("src_col", 0) == 0)))  # the second product's loads plain
    assert {s[0] for s in stale_reads(_run(monkeypatch, run))} == {"recur_lstm_fgr_persistent:out0"}


def test_what_counts_as_a_race():
    put = lambda interval, block, lo, hi, value=b"a": (interval, block, "put", "x", [(lo, hi)], value)
    get = lambda interval, block, lo, hi: (interval, block, "get", "x", [(lo, hi)], None)
    assert races([put(0, 0, 0, 4), get(0, 1, 3, 5)])  # another block reads what is being written
    assert not races([put(0, 0, 0, 4), get(1, 1, 3, 5)])  # a barrier later
    assert not races([put(0, 0, 0, 4), get(0, 1, 4, 8)])  # no overlap
    assert races([put(0, 0, 0, 4), get(0, 0, 1, 2)])  # its own write, read back before a barrier
    assert not races([get(0, 0, 1, 2), put(0, 0, 0, 4)])  # read, then written: program order
    assert not races([put(0, 0, 0, 4), put(0, 1, 2, 6)])  # the same values from two blocks
    assert races([put(0, 0, 0, 4), put(0, 1, 2, 6, b"b")])


@pytest.mark.parametrize("name,remat", [(c, "none") for c in CELLS] + [("lstm:fgr,peepholes", "step")])
def test_a_program_that_gives_up_leaves_nan_never_a_wrong_number(monkeypatch, name, remat):
    """On a GPU a program gives up at a grid barrier after MAX_SPINS polls without the others
    arriving; from then on, what it reads of their values may be stale. Here one program gives up
    at each barrier of the last two steps (each guards other reads: W_h h, layer norm's statistics,
    m_t, d m_t, ...; in the last, no later step's NaN covers a finite wrong value) of the forward
    kernel, then of the backward kernel, and
    its reads of what the others wrote in that launch are off by 0.5 from then on: every result
    of the training step (outputs, final carry, the gradients of the weights, inputs and initial
    carry) is NaN or what it is without the give-up, never a finite wrong number, and some are NaN."""
    cell = recur.get_cell(name, H)
    params = cell.init(jax.random.key(0), I)
    xs = jax.random.normal(jax.random.key(1), (B, T, I))
    c0 = jax.tree.map(lambda a: jax.random.normal(jax.random.key(3), a.shape, a.dtype), cell.initial_carry(B))
    lengths = jnp.arange(B) % (T + 1)
    w = jax.random.normal(jax.random.key(2), (B, T, cell.output_size))

    def loss(p, x, c):  # linear in the outputs: their cotangent is w even where they are NaN
        hs, carry = recur.scan(cell, p, x, initial_carry=c, lengths=lengths, mode="kernel", remat=remat)
        return jnp.sum(hs * w) + sum(jnp.sum(v) for v in jax.tree.leaves(carry)), (hs, carry)

    def step(give_up=None):
        log, out = _Log(), []
        run = lambda: out.append(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(params, xs, c0))
        with monkeypatch.context() as patches:  # undone after each run: _run's wrappers do not pile up
            _run(patches, run, give_up=give_up, log=log)
        return jax.tree.leaves(out), log

    monkeypatch.setenv("RECUR_PALLAS_INTERPRET", "1")
    want, log = step()
    launches = sorted(log.arrivals)
    assert len(launches) == 2 and launches[1].endswith("_backward"), launches
    for launch in launches:
        n = log.arrivals[launch]
        per = n // T  # the barriers per step (and one before the first, or none)
        nan = stale = 0
        for k in range(n - 2 * per, n):  # the last step but one's and the last's
            got, run_log = step((launch, k, (0, 1)))
            stale += run_log.stale
            for a, b in zip(want, got):
                a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
                wrong = ~np.isnan(b) & ~np.isclose(a, b, rtol=1e-5, atol=1e-6)
                assert not wrong.any(), (launch, k, int(wrong.sum()), b.shape)
                nan += int(np.isnan(b).sum())
        assert stale and nan, (launch, stale, nan)


def test_a_program_that_gave_up_no_longer_arrives(monkeypatch):
    """_grid_barrier's GPU path on a simulated counter (Triton's atomics as Python on an array),
    three programs, the third never arriving: the first gives up at barrier 1 after MAX_SPINS
    polls and goes on to barrier 2. Had it arrived there, the counter would reach barrier 1's
    target of 3 for the second program, which would pass although the third never arrived; it
    adds nothing, so the second gives up too, and the launch's final count is not programs x
    arrivals (its ok is false)."""
    from jax.experimental.pallas import triton as pl_triton

    counter = np.zeros(1, np.int64)

    def atomic_add(ref, idx, val, mask=None):
        old = int(ref[idx])
        ref[idx] = old + int(val)
        return jnp.int32(old)

    def while_loop(cond, body, state):
        while bool(cond(state)):
            state = body(state)
        return state

    monkeypatch.setattr(pl_triton, "atomic_add", atomic_add)
    monkeypatch.setattr(pl_triton, "debug_barrier", lambda: None)
    monkeypatch.setattr(persistent, "MAX_SPINS", 4)
    monkeypatch.setattr(jax.lax, "while_loop", while_loop)
    barrier = lambda k, gave_up: bool(persistent._grid_barrier(counter, 3, k, jnp.bool_(gave_up), gpu=True))
    assert barrier(1, False)  # program 0: programs 1 and 2 not there after 4 polls
    assert barrier(2, True) and counter[0] == 1  # it goes on, without arriving
    assert barrier(1, False)  # program 1 at barrier 1: 2 arrivals of 3
    assert counter[0] == 2 != 3 * 2
