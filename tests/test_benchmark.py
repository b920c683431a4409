"""The benchmark harness runs end to end at a tiny shape and writes its table (no timing asserted)."""
import csv

from experiments import benchmark


def test_benchmark_writes_markdown_and_csv(tmp_path):
    rows = benchmark.main(["--cells", "gru,lstm:cifg", "--batch", "2", "--length", "3,5", "--hidden", "8",
                           "--embed", "4", "--vocab", "11", "--repeats", "1", "--steps", "1",
                           "--out", str(tmp_path / "bench")])
    systems = {(r["mode"], r["T"], r["system"]) for r in rows}
    for mode in ("train", "infer"):
        for T in (3, 5):
            assert (mode, T, "recur gru") in systems and (mode, T, "recur lstm:cifg") in systems
            assert (mode, T, "flax nn.RNN(GRUCell)") in systems
    assert all(r["ms_per_step"] > 0 for r in rows)
    table = (tmp_path / "bench.md").read_text()
    assert "| recur gru |" in table
    with open(tmp_path / "bench.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)


def test_gpu_benchmark_smoke_runs_every_row(tmp_path, monkeypatch):
    """experiments/bench_gpu.py at tiny shapes: every recur row, the bare-scan rows and (with
    --parts linear alone, the kernels in interpret mode) the rows of minGRU and the LRU (the gated
    kernel and the kernel on XLA's (a, b)) are measured."""
    import warnings

    from experiments import bench_gpu
    from recur.kernels import dispatch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mode="kernel" falls back on CPU, with a notice
        rows = bench_gpu.main(["--smoke", "--parts", "cells,scan", "--out", str(tmp_path / "gpu")])
    got = {(r["part"], r["system"], r["precision"], r["task"]) for r in rows}
    for prec in ("fp32", "half"):
        for task in ("train", "infer"):
            for system in ("recur lstm sequential", "recur lstm kernel", "recur gru kernel", "lax.scan lstm"):
                assert ("cells", system, prec, task) in got
    # each recur row says what ran: on CPU the kernel rows fell back, the sequential ones did not
    notes = {r["system"]: r["note"] for r in rows if r["part"] == "cells" and r["system"].startswith("recur")}
    assert "needs a GPU" in notes["recur lstm kernel"] and notes["recur lstm sequential"] == ""
    # kernel rows are checked against the sequential scan (here the same program: tiny error)
    errs = {r["system"]: r["err_vs_seq"] for r in rows if r["part"] == "cells"}
    assert float(errs["recur gru kernel"]) < 1e-6 and errs["lax.scan lstm"] == ""
    # and the sequential rows say how far rounding-sized changes of the weights move them
    assert all(0 < float(r["err_vs_seq"]) < 0.1 for r in rows if r["system"] == "recur gru sequential")
    # the bare recurrence: the kernel (interpret mode here) against the associative scan, and a copy
    scan = [r for r in rows if r["part"] == "scan"]
    assert {(r["system"], r["T"]) for r in scan} == {(n, T) for T in (16, 64) for n in (
        "scan: lax.associative_scan", "scan: recur chunked kernel", "copy (4 arrays in, 4 out)")}
    assert all(float(r["err_vs_seq"]) < 1e-5 for r in scan if r["system"] == "scan: recur chunked kernel")
    assert all(r["ms"] > 0 for r in rows)
    with open(tmp_path / "gpu.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    monkeypatch.setenv("RECUR_PALLAS_INTERPRET", "1")  # the linear part's kernels really run
    with warnings.catch_warnings():
        warnings.simplefilter("error", dispatch.KernelFallback)
        rows = bench_gpu.main(["--smoke", "--parts", "linear", "--out", str(tmp_path / "lin")])
    assert {r["part"] for r in rows} == {"linear"}
    kernels = ("minGRU kernel", "minGRU kernel, XLA's gates", "LRU kernel", "LRU kernel, XLA's gates")
    for system in kernels:
        assert {r["T"] for r in rows if r["system"] == system} == {16, 64}
        # each against its cell's associative scan
        assert all(float(r["err_vs_seq"]) < 1e-5 for r in rows if r["system"] == system), system
    notes = {r["system"]: r["note"] for r in rows}
    assert notes["minGRU kernel"] == "GB/s over 13 arrays of [B, T, S]" and "7 arrays" in notes["LRU kernel"]
    assert "12 arrays" in notes["LRU kernel, XLA's gates"]
    with open(tmp_path / "lin.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows) == 12


def test_parallel_benchmark_measures_every_mode_and_agrees(tmp_path):
    """experiments/bench_parallel.py at a tiny shape, on the layer and on projected inputs: every
    mode is timed and its outputs and gradients match the sequential scan's."""
    from experiments import bench_parallel

    for extra in ([], ["--projected"]):
        rows = bench_parallel.main(["--batch", "2", "--hidden", "4", "--input", "3", "--lengths", "5,9",
                                    "--chunk", "4", "--rounds", "1", "--out", str(tmp_path / "par"), *extra])
        assert {(r["T"], r["mode"]) for r in rows} == {(T, m) for T in (5, 9) for m in bench_parallel.MODES}
        assert all(r["median_s"] > 0 and r["max_abs_diff_hs"] < 1e-5 and r["max_abs_diff_grad"] < 1e-5
                   for r in rows)
        assert all(r["projected"] == int(bool(extra)) for r in rows)
        with open(tmp_path / "par.csv") as f:
            assert len(list(csv.DictReader(f))) == len(rows)


def test_hlo_loops_counts_each_loops_launches(monkeypatch):
    """experiments/hlo_loops.py finds the forward and backward time loops of a training step, with
    their trip counts (T / unroll) and the fusions each iteration launches (more when unrolled)."""
    from experiments import hlo_loops

    monkeypatch.setenv("RECUR_CPU_KERNELS", "0")  # XLA's loops, not the compiled C++ ones
    got = hlo_loops.main(["--cell", "gru", "--hidden", "8", "--batch", "2", "--length", "12", "--unroll", "1,4"])
    assert sorted(lp["trips"] for lp in got[1]) == [12, 12]
    assert sorted(lp["trips"] for lp in got[4]) == [3, 3]
    fusions = lambda lp: sum(n for k, n in lp["kinds"].items() if k.startswith("fusion"))
    assert all(fusions(lp) > 0 for lp in got[1])
    assert sum(map(fusions, got[4])) > sum(map(fusions, got[1]))


def test_gpu_benchmark_notes_say_what_auto_measured_and_took(monkeypatch):
    """A row's note carries the autotuner's decisions made while its first call was traced (and
    only that row's), beside the fallback notices."""
    from experiments import bench_gpu
    from recur.kernels import autotune

    monkeypatch.setattr(autotune, "DECISIONS", ["an earlier row's"])

    def tuned():
        autotune.DECISIONS.append("auto measured sequential 2.000 ms, kernel 1.000 ms: took kernel")
        return lambda: 1

    out = bench_gpu._time({"recur lstm auto": tuned, "recur lstm sequential": lambda: (lambda: 2)}, 2)
    assert set(out) == {"recur lstm auto", "recur lstm sequential"}
    assert bench_gpu.NOTES["recur lstm auto"] == "auto measured sequential 2.000 ms, kernel 1.000 ms: took kernel"
    assert bench_gpu.NOTES["recur lstm sequential"] == ""


def test_profile_kernels_compiles_then_calls_each_kernel_once(monkeypatch, capsys):
    """experiments/profile_kernels.py (for Nsight Compute): each task's function compiled, then
    called once, through the persistent kernel (interpret mode here); an unknown task is an error."""
    import pytest

    from experiments import profile_kernels

    monkeypatch.setenv("RECUR_PALLAS_INTERPRET", "1")
    calls = []
    real = profile_kernels.functions

    def counting(*a):
        impl, fns = real(*a)
        for task, (f, args) in fns.items():
            fns[task] = (_Counted(f, task, calls), args)
        return impl, fns

    monkeypatch.setattr(profile_kernels, "functions", counting)
    profile_kernels.main(["--cells", "gru", "--batch", "16", "--length", "3", "--hidden", "16"])
    out = capsys.readouterr().out
    assert "gru train: persistent" in out and "gru infer: persistent" in out
    assert calls == ["train", "infer"]  # one call each, after its compilation
    with pytest.raises(SystemExit, match="'bwd' is not one of"):
        profile_kernels.main(["--cells", "gru", "--batch", "16", "--length", "3", "--hidden", "16", "--tasks", "bwd"])


class _Counted:
    """A jitted function whose compiled form records each call."""

    def __init__(self, f, task, calls):
        self.f, self.task, self.calls = f, task, calls

    def lower(self, *args):
        lowered, task, calls = self.f.lower(*args), self.task, self.calls

        class Compiled:
            def __init__(self):
                self.c = lowered.compile()

            def __call__(self, *a):
                calls.append(task)
                return self.c(*a)

        return type("Lowered", (), {"compile": lambda _: Compiled()})()
