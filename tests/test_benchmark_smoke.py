"""The micro-benchmark runs end to end at a toy size and reports the state it measured."""

import json

from benchmarks import forecaster as bench
from spectrum_xdit import SpectrumConfig


def test_forecaster_benchmark_runs(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--sizes", "2e4", "--dtypes", "float32", "bf16", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert {(r["impl"], r["dtype"]) for r in rows} == {
        ("spectrum", "float32"), ("spectrum", "bf16"), ("reference", "float32"), ("reference", "bf16")}
    config = SpectrumConfig()
    for row in rows:
        if row["impl"] == "spectrum":
            itemsize = 4 if row["dtype"] == "float32" else 2
            assert row["state_bytes"] == row["F"] * (config.num_basis * 4 + 2 * itemsize)
        else:
            assert row["peak_bytes"] > row["state_bytes"] == row["F"] * len(bench.REAL_STEPS) * (
                4 if row["dtype"] == "float32" else 2)
    assert "copy bandwidth" in capsys.readouterr().out
