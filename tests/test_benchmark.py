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
