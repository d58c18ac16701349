"""Helpers of the step-loop tests: run requests through a :class:`StepBatcher` as a rank's worker
does (one ``agree`` before each tick), and compare each with its solo run."""

from __future__ import annotations

from spectrum_xdit.launch.step_batching import StepBatcher


def run_step_loop(rank_pipeline, requests: list, drop=None, on_tick=None) -> tuple[dict, list]:
    """Tick until every request is done. ``requests``: ``(tick it joins at, request)``; ``drop``:
    ``(tick, index)`` of one to remove; ``on_tick(tick, batcher)``: called before each tick.
    Returns the results by index and, per tick run, the rows that ran the blocks."""
    batcher = StepBatcher(rank_pipeline)
    results, rows, tick = {}, [], 0
    try:
        while tick == 0 or batcher.active or any(start >= tick for start, _ in requests):
            if drop is not None and drop[0] == tick:
                batcher.drop(str(drop[1]))
            for index, (start, request) in enumerate(requests):
                if start == tick:
                    batcher.join(str(index), request)
            if on_tick is not None:
                on_tick(tick, batcher)
            finished = {}
            if batcher.active and batcher.agree(True):
                finished, block_rows = batcher.tick()
                rows.append(block_rows)
            results.update({int(job): result for job, (_, result) in finished.items()})
            tick += 1
    finally:
        batcher.close()
    return results, rows


def relative_error(latents, reference) -> float:
    return float((latents.double() - reference.double()).norm() / reference.double().norm())


def compare_with_solo(rank_pipeline, requests: list, drop=None, on_tick=None) -> dict:
    """Each request's step-loop result against its solo run: errors, (loop, solo) real steps and
    reports, the rows of each tick, and the solo results."""
    solo = [rank_pipeline.generate(request) for _, request in requests]
    batched, rows = run_step_loop(rank_pipeline, requests, drop, on_tick)
    return {"errors": {index: relative_error(result.latents, solo[index].latents) for index, result in batched.items()},
            "real_steps": {index: (result.report["real_steps"], solo[index].report["real_steps"])
                           for index, result in batched.items()},
            "reports": {index: (result.report, solo[index].report) for index, result in batched.items()},
            "rows": rows, "solo": solo}

