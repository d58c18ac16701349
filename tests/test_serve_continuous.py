"""`spectrum-xdit serve` with continuous step batching: a real Ray Serve instance on 127.0.0.1
with the tiny Wan model on two gloo ranks (xDiT Ulysses=2), at most three jobs in the step loop.

Requests that overlap share ticks and equal their solo runs; a job deleted in flight leaves its
batch mates unchanged; a rank death fails the jobs in the loop and the queued ones complete after
the rebuild (last: it kills a rank). Every request and every wait is bounded.
"""

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

pytest.importorskip("ray.serve")

from serving import (  # noqa: E402
    LONG_REQUEST,
    STEPS,
    TINY_WAN_SERVER,
    create_video,
    fresh_latents,
    healthz,
    npy,
    poll_video,
    relative_error,
    serve_app,
    served_latents,
    until_idle,
)

SETTINGS = {**TINY_WAN_SERVER, "batching": "continuous", "max_batch_size": 3}
# none, the paper schedule, the adaptive schedule with auto blend, guidance off, another size and
# another step count, sent at once: they share ticks in every combination.
MIXED = [
    {"prompt": "digit 1", "seed": 1, "cache": {"method": "none"}},
    {"prompt": "digit 2", "seed": 2, "num_inference_steps": 16, "cache": {"warmup_steps": 3}},
    {"prompt": "digit 3", "seed": 3, "num_inference_steps": 16,
     "cache": {"schedule": "adaptive", "blend_weight": "auto", "error_budget": 1.0, "warmup_steps": 3}},
    {"prompt": "digit 4", "seed": 4, "guidance_scale": 1.0},
    {"prompt": "digit 5", "seed": 5, "width": 48},
    {"prompt": "digit 6", "seed": 6, "num_inference_steps": 12},
]


@pytest.fixture(scope="module")
def server():
    yield from serve_app(SETTINGS, [])


def test_config_and_health_show_the_step_loop(server):
    config = requests.get(f"{server}/v1/config", timeout=30).json()
    assert config["batching"] == {"mode": "continuous", "max_batch_size": 3}
    health = healthz(server)
    assert health["batching"] == "continuous" and health["max_batch_size"] == 3 and health["batch_occupancy"] == 0


@pytest.mark.timeout(300)
def test_overlapping_requests_share_ticks_and_each_equals_its_solo_run(server):
    before = until_idle(server)
    with ThreadPoolExecutor(max_workers=len(MIXED)) as pool:
        answers = list(pool.map(lambda payload: served_latents(server, payload), MIXED))
    after = until_idle(server)
    for payload, (latents, report) in zip(MIXED, answers):
        assert relative_error(latents, fresh_latents(payload, STEPS)) <= 1e-5, payload
        assert report["num_inference_steps"] == payload.get("num_inference_steps", STEPS)
    calls = after["counters"]["block_calls"] - before["counters"]["block_calls"]
    rows = after["counters"]["block_rows"] - before["counters"]["block_rows"]
    assert rows == sum(sum(report["nfe"].values()) for _, report in answers)
    print(f"\n{len(MIXED)} overlapping requests: {rows} block-stack rows in {calls} calls "
          f"({rows / calls:.2f} per call) over {after['counters']['ticks'] - before['counters']['ticks']} ticks")
    assert rows / calls > 1.5          # the rows of several requests went through the blocks together


@pytest.mark.timeout(300)
def test_a_job_deleted_in_flight_leaves_its_batch_mates_unchanged(server):
    before = until_idle(server)
    mate_payload = {"prompt": "batch mate", "seed": 12, "num_inference_steps": 60, "output_format": "npy"}
    doomed = create_video(server, LONG_REQUEST).json()
    mate = create_video(server, mate_payload).json()
    poll_video(server, doomed["id"], until=("in_progress",))
    poll_video(server, mate["id"], until=("in_progress",))
    assert requests.delete(f"{server}/v1/videos/{doomed['id']}", timeout=30).status_code == 200
    done, seen = poll_video(server, mate["id"])
    assert done["status"] == "completed", done
    assert seen == sorted(seen)
    content = requests.get(f"{server}/v1/videos/{mate['id']}/content", timeout=30).content
    assert relative_error(npy(content), fresh_latents(mate_payload, STEPS)) <= 1e-5
    assert requests.get(f"{server}/v1/videos/{doomed['id']}", timeout=30).status_code == 404
    after = until_idle(server)
    assert after["counters"]["cancelled"] == before["counters"]["cancelled"] + 1
    assert after["counters"]["rebuilds"] == before["counters"]["rebuilds"]


@pytest.mark.timeout(400)
def test_a_rank_death_fails_the_jobs_in_the_loop_and_the_queued_ones_complete(server):
    health = until_idle(server)
    running = [create_video(server, dict(LONG_REQUEST, seed=i)).json() for i in range(3)]
    for job in running:
        poll_video(server, job["id"], until=("in_progress",))
    queued = [create_video(server, {"prompt": f"survives {i}", "seed": i, "output_format": "npy"}).json()
              for i in range(2)]
    assert all(job["status"] == "queued" for job in queued) and healthz(server)["queue_depth"] == 2
    os.kill(health["workers"][1]["pid"], signal.SIGKILL)
    killed = time.monotonic()
    for job in running:
        failed, _ = poll_video(server, job["id"])
        assert failed["status"] == "failed" and failed["error"]["code"] == "unavailable", failed
        assert "died" in failed["error"]["message"]
    for i, job in enumerate(queued):
        done, _ = poll_video(server, job["id"])
        assert done["status"] == "completed", done
        content = requests.get(f"{server}/v1/videos/{job['id']}/content", timeout=30).content
        assert relative_error(npy(content), fresh_latents({"prompt": f"survives {i}", "seed": i}, STEPS)) <= 1e-5
    print(f"\nrank killed with 3 jobs in the loop and 2 queued: the queued ones completed "
          f"{time.monotonic() - killed:.1f} s later")
    assert healthz(server)["counters"]["rebuilds"] == health["counters"]["rebuilds"] + 1
