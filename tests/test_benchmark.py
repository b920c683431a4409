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


def test_gpu_benchmark_smoke_runs_every_row(tmp_path):
    """experiments/bench_gpu.py at tiny shapes: every recur row and both linear rows are measured."""
    import warnings

    from experiments import bench_gpu

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mode="kernel" falls back on CPU, with a notice
        rows = bench_gpu.main(["--smoke", "--out", str(tmp_path / "gpu")])
    got = {(r["part"], r["system"], r["precision"], r["task"]) for r in rows}
    for prec in ("fp32", "half"):
        for task in ("train", "infer"):
            for system in ("recur lstm sequential", "recur lstm kernel", "recur gru kernel", "lax.scan lstm"):
                assert ("cells", system, prec, task) in got
    assert {r["T"] for r in rows if r["system"] == "minGRU kernel"} == {16, 64}
    assert all(r["ms"] > 0 for r in rows)
    with open(tmp_path / "gpu.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
