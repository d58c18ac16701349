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
    assert result["goals"][0]["concurrency"] == 2 and out.with_suffix(".png").stat().st_size > 0
    assert out.with_suffix(".md").read_text().count("| continuous | spectrum |") == 3


@pytest.mark.timeout(400)
def test_serve_load_benchmark_sends_image_requests_of_n_images(tmp_path):
    pytest.importorskip("ray.serve")
    from benchmarks import serve_load

    out = tmp_path / "load.json"
    result = serve_load.main(["--model", "tiny-flux", "--steps", "6", "--modes", "continuous", "--caches", "spectrum",
                              "--concurrency", "2", "--rounds", "1", "--images", "1", "3", "--rates",
                              "--json", str(out)])
    rows = {row["images"]: row for row in result["rows"]}
    assert set(rows) == {1, 3} and all(row["load"] == "closed" for row in rows.values())
    assert rows[1]["outputs"] == 2 and rows[3]["outputs"] == 6 and rows[3]["requests"] == 2
    # the three images of a request joined one tick together: three rows of one call, or more
    assert rows[3]["mean_block_batch"] >= 3
    assert result["goals"] == [None, None]   # no sequential server to compare with
    assert "| continuous | spectrum | c=2, n=3 |" in out.with_suffix(".md").read_text()


@pytest.mark.timeout(300)
def test_serve_load_replicas_run_counts_jobs_per_replica_404s_and_losses(tmp_path):
    """The two-replica run of asynchronous jobs, quick: every job is accounted for (completed,
    failed or lost), each completed one on a deployed replica, and the 404s counted."""
    pytest.importorskip("ray.serve")
    from benchmarks import serve_load

    out = tmp_path / "replicas.json"
    result = serve_load.main(["--replicas", "2", "--model", "tiny-wan", "--steps", "4", "--jobs", "4",
                              "--job_rate", "120", "--job_timeout", "120", "--json", str(out)])
    row = result["row"]
    assert row["jobs"] == row["created"] == 4 and row["completed"] + row["failed"] + row["lost"] == 4
    assert sum(row["jobs_per_replica"].values()) == row["completed"] and len(row["jobs_per_replica"]) == 2
    assert row["polls"] >= row["completed"] and 0 <= row["polls_404"] <= row["polls"]
    assert "a second replica cannot add throughput" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 0
