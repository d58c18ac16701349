"""`benchmarks.serve_load` end to end: a Ray Serve deployment under closed and Poisson load."""

import pytest

pytestmark = pytest.mark.ray


@pytest.mark.timeout(400)
def test_serve_load_benchmark_measures_both_loads_and_writes_table_and_plot(tmp_path):
    pytest.importorskip("ray.serve")
    from benchmarks import serve_load

    out = tmp_path / "load.json"
    result = serve_load.main(["--model", "tiny-wan", "--steps", "6", "--modes", "sequential", "continuous",
                              "--caches", "spectrum", "--concurrency", "1", "2", "--rounds", "1", "--rates", "4",
                              "--poisson_requests", "2", "--json", str(out)])
    rows = {(row["mode"], row["load"], row["concurrency"]): row for row in result["rows"]}
    assert set(rows) == {(mode, load, c) for mode in ("sequential", "continuous")
                         for load, c in (("closed", 1), ("closed", 2), ("poisson", None))}
    for row in rows.values():
        assert row["requests"] == 2 and row["requests_per_min"] > 0 and row["p50_s"] <= row["p99_s"]
        assert row["nfe_per_request"] < 12           # Spectrum skipped block-stack evaluations
    assert rows["sequential", "closed", 2]["mean_block_batch"] == 1.0
    assert rows["continuous", "closed", 2]["mean_block_batch"] >= 1.0
    assert result["goal"]["concurrency"] == 2 and out.with_suffix(".png").stat().st_size > 0
    assert out.with_suffix(".md").read_text().count("| continuous | spectrum |") == 3
