"""The micro-benchmark runs end to end at a toy size and reports the state it measured."""

import json

import pytest

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


def test_reference_style_forecaster_works_where_its_history_is():
    """Its design matrices go to the history's device (a GPU's; here the meta device, which
    refuses to meet a host tensor as a GPU does)."""
    import torch

    forecaster = bench.ReferenceStyleForecaster(SpectrumConfig())
    for step in bench.REAL_STEPS:
        forecaster.update(step, torch.empty(1000, device="meta", dtype=torch.bfloat16))
    forecast = forecaster.forecast(bench.FORECAST_STEPS[0])
    assert forecast.device.type == "meta" and forecast.shape == (1000,) and forecast.dtype == torch.bfloat16


@pytest.mark.parametrize("model", ["digits-wan", "digits-flux"])
def test_quality_benchmark_quick(tmp_path, model):
    """`benchmarks.quality --quick` end to end on each trained model (Wan2.1: one block list;
    FLUX.1: double- and single-stream blocks): every method, counted NFE, real metrics, all outputs."""
    from benchmarks import quality

    out = tmp_path / "quality.json"
    result = quality.main(["--quick", "--model", model, "--threads", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == result
    for suffix in (".md", ".png"):
        assert out.with_suffix(suffix).stat().st_size > 0
    assert (tmp_path / "quality_frames.png").stat().st_size > 0
    rows = {(r["method"], r["setting"]): r for r in result["rows"] if not r.get("dropped")}
    families = {r["method"] for r in result["rows"]}
    assert families == {"full", "plain", "reuse", "spectrum", "spectrum-auto", "spectrum-auto-reuse",
                        "spectrum-adaptive", "spectrum-budget", "spectrum-budget-reuse", "spectrum-default",
                        "taylorseer", "fbcache", "magcache",
                        "cache-dit", *(("cache-dit-steps",) if model == "digits-wan" else ())}
    assert result["meta"]["pairs"] == 2 and result["meta"]["model"].startswith(model)
    for row in result["rows"]:
        if row.get("dropped"):   # a method that cannot run here, with the reason as its setting
            assert row["setting"].startswith(("dropped", "skipped")) and len(row["setting"]) > 10
            continue
        assert set(row) >= {"method", "setting", "nfe", "psnr", "ssim", "accuracy", "speedup_wall", "speedup_nfe"}
        assert 0.0 <= row["accuracy"] <= 1.0
        assert row["speedup_wall"] > 0
        if row["method"] == "full":
            assert row["nfe"] == 50 and row["psnr"] is None
            continue
        # every method skips work and so differs from the reference, but stays a recognisable sample
        assert 10.0 < row["psnr"] < 80.0 and 0.3 < row["ssim"] <= 1.0   # cache-dit-steps rounds to 1.0
        assert row["speedup_nfe"] == round(50 / row["nfe"], 3)
    assert rows[("plain", "14 steps")]["nfe"] == 14
    for (method, setting), row in rows.items():
        if method in ("spectrum", "spectrum-auto", "spectrum-auto-reuse", "reuse"):
            # counted evaluations of the block stack equal the schedule's real steps
            assert row["nfe"] == row["block_nfe"] == len(row["real_steps"]) == 14
            assert "forecast_ms" in row and "update_ms" in row
        if method.startswith("spectrum-"):
            assert row["validation_ms"] > 0
        if method == "spectrum-adaptive":
            assert len(row["real_steps_per_clip"]) == 2 and row["error_budget"] > 0
            assert row["nfe"] == sum(map(len, row["real_steps_per_clip"])) / 2
        if method.startswith("spectrum-budget") or method == "spectrum-default":
            # the budget schedule spends exactly target_nfe real steps on every clip
            assert row["nfe"] == row["nfe_max"] == row["block_nfe"] == 14
            assert [len(steps) for steps in row["real_steps_per_clip"]] == [14, 14]
        if method == "taylorseer":
            assert row["nfe"] == 14
        if method in ("fbcache", "cache-dit", "cache-dit-steps"):
            # the first block runs on every step, so it costs more than its stack count says
            assert row["block_nfe"] > row["nfe"] and row["threshold"] > 0
    spectrum = [r for r in result["rows"] if r["method"] in ("spectrum", "spectrum-auto", "spectrum-auto-reuse")]
    reuse = rows[("reuse", "flex 0.75, warmup 5, window 2")]
    assert all(r["real_steps"] == reuse["real_steps"] for r in spectrum)
    # different predictors at the same real steps give different outputs
    assert len({r["psnr"] for r in spectrum} | {reuse["psnr"]}) == len(spectrum) + 1


def test_defaults_protocol_quick(tmp_path):
    """`benchmarks.defaults --quick`: one cell per model through the choice and the scores; where the
    one-flag default runs the plain grid it is the plain sampler, sample for sample."""
    from benchmarks import defaults

    assert len(defaults.matrix()) == 48
    out = tmp_path / "defaults.json"
    result = defaults.main(["--quick", "--threads", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == result
    for suffix in (".md", ".png"):
        assert out.with_suffix(suffix).stat().st_size > 0
    assert {c["model"] for c in result["cells"]} == {"digits-wan", "digits-flux"}
    chosen = result["choices"]["all"]
    for cell in result["cells"]:
        scored = cell["scored"]
        for budget in defaults.BUDGETS:
            nfe, run = defaults.target_nfe(cell["steps"], budget), scored["default steps run"][str(budget)]
            assert run == (nfe if nfe < chosen["plain_grid_below_nfe"] else cell["steps"])
            if run == nfe:
                assert scored["default"][str(budget)] == scored["plain"][str(budget)]
            assert 10.0 < scored["default"][str(budget)] < 80.0
    assert result["goals"]["cells"] == 2 and set(result["goals"]) >= {"14", "10", "7"}


def test_state_memory_measures_true_per_rank_state():
    from benchmarks import state_memory as sm

    assert sm.wan_tokens(480, 832, 81) == 32760 and sm.wan_tokens(720, 1280, 81) == 75600
    config = SpectrumConfig()
    # the allocated forecasters hold exactly the bytes the table's formula gives (bf16, 2 branches)
    assert sm.measure(7, config) == 2 * sm.ours_bytes(7 * sm.HIDDEN, config, 2) == 2 * 7 * sm.HIDDEN * 24
    rows = sm.table(0.0, config)
    assert len(rows) == 8 and all(r["ours_source"] == "analytic" for r in rows)
    by_degree = {r["sp_degree"]: r for r in rows if r["resolution"] == "480x832"}
    assert by_degree[8]["tokens_per_rank"] == 4095 and by_degree[1]["ours_bytes"] == 8 * by_degree[8]["ours_bytes"]
    # the reference keeps K = 14 bf16 snapshots plus their float32 copy and the coefficients
    assert by_degree[1]["reference_peak_bytes"] == 2 * 32760 * 5120 * (14 * 2 + 14 * 4 + 5 * 4)


@pytest.mark.distributed
def test_throughput_benchmark_launches_and_reports(tmp_path):
    from benchmarks import throughput

    out = tmp_path / "throughput.json"
    result = throughput.main(["--worlds", "1", "--repeats", "1", "--model", "tiny-wan",
                              "--num_inference_steps", "12", "--json", str(out), "--timeout", "300"])
    rows = {r["cache_method"]: r for r in result["rows"]}
    assert set(rows) == {"none", "spectrum", "spectrum-adaptive"}
    assert rows["spectrum-adaptive"]["validation_ms_per_real_step"] > 0 and rows["spectrum-adaptive"]["real_step_ms"] > 0
    assert "validation_ms_per_real_step" not in rows["spectrum"]
    assert rows["none"]["nfe"] == {"cond": 12, "uncond": 12} and rows["none"]["state_bytes_per_rank"] == 0
    assert rows["spectrum"]["nfe"]["cond"] < 12 and rows["spectrum"]["state_bytes_per_rank"] > 0
    assert rows["none"]["speedup_vs_none"] == 1.0 and rows["spectrum"]["speedup_vs_none"] > 0
    assert out.with_suffix(".md").read_text().count("| 1 | single |") == 3


def test_gpu_check_rehearses_every_section_on_cpu(tmp_path):
    """The GPU validation script (issue 7) runs end to end at CPU sizes, so a session with a
    device can run it in one go; the accuracy figures are real even here."""
    from benchmarks import gpu_check

    result = gpu_check.main(["--small", "--json", str(tmp_path / "gpu.json")])
    errors = result["accuracy_max_relative_error"]
    assert errors["float32"] < 1e-4 and errors["bf16"] < 1e-2
    assert [r["sp_degree"] for r in result["speed"]] == [1, 2, 4, 8]
    assert all(r["forecast_ms"] > 0 and r["state_bytes"] > 0 for r in result["speed"])
    assert result["copy_GBps"] > 0 and result["status"] == 0
    written = json.loads((tmp_path / "gpu.json").read_text())
    assert written["small"] is True and set(written["seconds"]) == {"accuracy_max_relative_error", "copy_GBps",
                                                                    "speed", "memory"}


def test_a_failing_section_is_recorded_and_the_next_still_runs(tmp_path):
    """A device run keeps every figure measured before (and after) a section that fails."""
    import torch

    from benchmarks.device_run import Sections

    path = tmp_path / "run.json"
    sections = Sections(path, torch.device("cpu"), "test", small=True)
    assert sections.run("first", lambda: {"value": 1}) == {"value": 1}
    assert json.loads(path.read_text())["first"] == {"value": 1}
    assert sections.run("broken", lambda: 1 / 0) is None
    sections.run("after", lambda: 2)
    result = json.loads(path.read_text())
    assert result["broken"] == {"error": "ZeroDivisionError: division by zero"} and result["after"] == 2
    assert sections.finish()["status"] == 1 and json.loads(path.read_text())["status"] == 1


def test_frontier_grid_and_paper_schedules_land_on_the_budget():
    from benchmarks import frontier
    from spectrum_xdit.schedule import paper_schedule

    assert frontier.steps_grid(7, None) == [7, 11, 14, 21, 50]
    assert frontier.steps_grid(14, None) == [14, 21, 28, 42, 50]
    assert frontier.steps_grid(10, [30, 10, 8, 20]) == [10, 20, 30]
    for steps, budget in ((11, 7), (50, 7), (21, 14)):
        candidates = frontier.paper_candidates(steps, budget)
        assert [w for w, _ in candidates] == sorted({w for w, _ in candidates})   # one window per warm-up
        for warmup, window in candidates:
            assert len(paper_schedule(steps, warmup, window, frontier.FLEX)) == budget
            assert window == 1 or len(paper_schedule(steps, warmup, window - 1, frontier.FLEX)) != budget
    # quality's hand-picked schedule at 7 of 50 is one of them
    assert (1, 6) in frontier.paper_candidates(50, 7)


@pytest.mark.parametrize("argv, flag", [(["--budgets", "0"], "--budgets"), (["--budgets", "7", "--steps", "7"], "--steps"),
                                        (["--calibration_pairs", "0"], "--calibration_pairs"), (["--pairs", "0"], "--pairs")])
def test_frontier_rejects_bad_flags_before_any_sampling(argv, flag, tmp_path):
    from benchmarks import frontier

    with pytest.raises(ValueError, match=flag):
        frontier.main([*argv, "--json", str(tmp_path / "f.json")])


def test_frontier_benchmark_quick(tmp_path):
    """`benchmarks.frontier --quick` on one pair: budget 7 as 7 plain steps or 7 real of 14, counted."""
    from benchmarks import frontier

    out = tmp_path / "frontier.json"
    result = frontier.main(["--quick", "--pairs", "1", "--threads", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == result
    for suffix in (".md", ".png"):
        assert out.with_suffix(suffix).stat().st_size > 0
    rows = result["rows"]
    assert [(r["method"], r["steps"]) for r in rows] == [("full", 50), ("plain", 7)] + [
        (family, 14) for family in ("spectrum-budget", "spectrum-budget-reuse", "spectrum", "spectrum-auto", "reuse")]
    assert result["meta"]["steps"] == {"7": [7, 14]} and result["meta"]["off_budget"] == []
    for row in rows[1:]:
        # B real steps per branch, counted, on every clip, whatever N
        assert row["nfe"] == row["nfe_max"] == row["block_nfe"] == 7 and not row["off_budget"]
        assert 10.0 < row["psnr"] < 80.0 and 10.0 < row["psnr_calibration"] < 80.0
        assert 0.0 <= row["accuracy"] <= 1.0 and row["speedup_wall"] > 0
    by_family = {r["method"]: r for r in rows}
    assert [len(s) for s in by_family["spectrum-budget"]["real_steps_per_clip"]] == [7]
    paper = by_family["spectrum"]
    assert len(paper["real_steps"]) == 7 and paper["real_steps"][-1] < 14
    # the comparators run at exactly the paper rows' real steps, so only the predictor differs
    assert by_family["spectrum-auto"]["real_steps"] == by_family["reuse"]["real_steps"] == paper["real_steps"]
    assert len({r["psnr"] for r in rows[1:]}) == len(rows) - 1
    # the recommendation: the best user setting on the held-out seeds, not on the pairs
    recommended = [r for r in rows if r.get("recommended")]
    assert recommended == [max((r for r in rows[1:] if r["method"] != "reuse"), key=lambda r: r["psnr_calibration"])]
    [best] = result["summary"]
    assert best["psnr"] == max(r["psnr"] for r in rows[2:-1]) and best["plain_psnr"] == by_family["plain"]["psnr"]
    assert best["reuse_psnr"] == by_family["reuse"]["psnr"]
    assert "| 7 | 14 |" in out.with_suffix(".md").read_text()


def test_gap_error_benchmark_fits_an_exponent_per_predictor(tmp_path):
    """`benchmarks.gap_error` on one held-out pair of digits-wan: every predictor gets a finite
    exponent per third, and the best combination is never worse than a predictor it combines."""
    from benchmarks import gap_error

    out = tmp_path / "gap.json"
    result = gap_error.main(["--models", "digits-wan", "--pairs", "1", "--threads", "1", "--json", str(out)])
    assert json.loads(out.read_text())["meta"]["pairs"] == 1
    for suffix in (".md", ".png"):
        assert out.with_suffix(suffix).stat().st_size > 0
    part = result["models"]["digits-wan"]
    assert [(r["anchors"], r["predictor"]) for r in part["exponents"]] == [
        (list(third), name) for third in gap_error.THIRDS for name in gap_error.PREDICTORS]
    for row in part["exponents"]:
        assert 0.0 < row["exponent"] < 4.0 and list(row["mean_error_by_gap"]) == list(range(1, gap_error.MAX_GAP + 1))
    by_name = {(tuple(r["anchors"]), r["predictor"]): r["mean_error_by_gap"] for r in part["exponents"]}
    for third in gap_error.THIRDS:
        best = by_name[(third, "best combination")]
        for name in ("linear", "chebyshev", "reuse", "blend 0.5"):
            assert all(best[g] <= by_name[(third, name)][g] + 1e-9 for g in best), (third, name)
    assert len(part["degree_ridge"]) == len(gap_error.DEGREES) * len(gap_error.RIDGES)


def test_budget_tail_benchmark_scores_each_share_on_held_out_seeds(tmp_path):
    """`benchmarks.budget_tail`: each share keeps the budget and ends on that many consecutive real steps."""
    from benchmarks import budget_tail

    out = tmp_path / "tail.json"
    result = budget_tail.main(["--pairs", "1", "--budgets", "10", "--shares", "0", "0.3", "--threads", "1",
                               "--json", str(out)])
    assert json.loads(out.read_text()) == result and out.with_suffix(".md").stat().st_size > 0
    assert result["meta"]["seeds"][0] >= 1000          # held out from the quality benchmark's pairs
    for row, tail in zip(result["rows"], (1, 3)):
        steps = row["real_steps_first_pair"]
        assert row["nfe_max"] == 10 and len(steps) == 10 and 10.0 < row["psnr"] < 80.0
        assert steps[-tail:] == list(range(50 - tail, 50)) and steps[-tail - 1] < 50 - tail - 1, steps
