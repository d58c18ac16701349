"""Autoscaling on the jobs replicas hold (``launch/serve/autoscaling.py``): the policy on a made-up
context, the options it is deployed with, and a real deployment of tiny-wan that a queue of
asynchronous jobs takes from one replica to two and that, idle, goes back to one."""

import math
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("ray.serve")
requests = pytest.importorskip("requests")

from serving import LONG_REQUEST, TINY_WAN_SERVER, create_video, serve_app  # noqa: E402
from spectrum_xdit.launch.serve.autoscaling import QUEUED, RUNNING, QueueDepthPolicy  # noqa: E402
from spectrum_xdit.launch.serve.settings import ServeSettings  # noqa: E402

JOBS = 8
# A replica sends its stats every 10 s (Serve 2.60), each time those of the last look_back_period_s:
# a window longer than that sees every moment of the queue.
SCALED = {**TINY_WAN_SERVER, "ulysses_degree": 1, "batching": "sequential", "min_replicas": 1, "max_replicas": 2,
          "target_queue_depth": 2.0, "upscale_delay_s": 0.0, "downscale_delay_s": 4.0, "look_back_period_s": 12.0,
          "max_queue_size": 2 * JOBS}
# a job of several seconds on one rank, so that the queue outlasts a push or two
JOB = dict(LONG_REQUEST, num_frames=17)


def context(queued: dict, running: dict, replicas=("a", "b"), target=2, least=1, most=8):
    return SimpleNamespace(aggregated_metrics={QUEUED: queued, RUNNING: running}, running_replicas=list(replicas),
                           target_num_replicas=target, capacity_adjusted_min_replicas=least,
                           capacity_adjusted_max_replicas=most)


@pytest.mark.parametrize("queued,running,expected", [
    ({"a": 5, "b": 5}, {"a": 1, "b": 1}, math.ceil(7 / 2)),    # the shared queue counts once
    ({"a": 5, "b": 4.5}, {"a": 1, "b": 1}, math.ceil(7 / 2)),  # its largest average
    ({"a": 0, "b": 0}, {"a": 0, "b": 0}, 1),                   # idle: the fewest
    ({"a": 40, "b": 40}, {"a": 1, "b": 0}, 8),                 # a long queue: the most
    ({"a": 0.4, "b": 0}, {"a": 1, "b": 0.8}, 2),               # averages over the look-back
])
def test_the_policy_asks_for_jobs_over_the_target_within_the_bounds(queued, running, expected):
    wanted, state = QueueDepthPolicy(2.0)(context(queued, running))
    assert (wanted, state) == (expected, {})


def test_the_policy_keeps_its_replicas_until_every_one_has_reported():
    policy = QueueDepthPolicy(2.0)
    assert policy(context({"a": 30}, {"a": 1}, target=3))[0] == 3
    assert policy(context({"a": 30, "b": 0}, {"a": 1, "b": 0}, target=3, most=4))[0] == 4


def test_the_policy_refuses_a_target_of_no_jobs():
    with pytest.raises(ValueError, match="target_queue_depth"):
        QueueDepthPolicy(0)


def test_the_deployment_options_give_serve_a_valid_config_with_the_policy():
    """What ``build_app`` deploys: Serve's own config accepts it and rebuilds the policy from it."""
    from ray.serve.config import AutoscalingConfig

    from spectrum_xdit.launch.serve.app import deployment_options

    settings = ServeSettings.from_flat({"model": "tiny-wan", "min_replicas": 1, "max_replicas": 3,
                                        "downscale_delay_s": 7.0, "batching": "continuous", "max_batch_size": 4})
    options = deployment_options(settings)
    config = AutoscalingConfig(**options["autoscaling_config"])
    assert (config.min_replicas, config.max_replicas, config.downscale_delay_s, config.upscale_delay_s) == (1, 3, 7.0, 30.0)
    policy = config.policy.get_policy()(**config.policy.policy_kwargs)
    assert policy.target_queue_depth == 4.0     # a full step loop by default
    assert policy(context({"a": 9, "b": 0}, {"a": 4, "b": 0}, most=3))[0] == 3
    assert options["placement_group_strategy"] == "STRICT_PACK"
    assert "num_replicas" not in options


@pytest.mark.parametrize("given,message", [
    ({"target_queue_depth": 2.0}, "target_queue_depth: needs min_replicas and max_replicas"),
    ({"min_replicas": 1, "max_replicas": 2, "downscale_delay_s": -1.0}, "downscale_delay_s: input should be greater"),
    ({"placement_strategy": "ANYWHERE"}, "placement_strategy: input should be 'STRICT_PACK'"),
])
def test_bad_autoscaling_and_placement_settings_are_named(given, message):
    with pytest.raises(ValueError, match=message):
        ServeSettings.from_flat({"model": "tiny-wan", **given})


def _finished(url: str, video_id: str, timeout: float) -> dict:
    """The job once it ends. Until the shared queue, a poll that reaches the replica that does not
    hold the job is answered 404, and is asked again."""
    deadline = time.monotonic() + timeout
    while True:
        answer = requests.get(f"{url}/v1/videos/{video_id}", timeout=30)
        assert answer.status_code in (200, 404), answer.text
        if answer.status_code == 200 and answer.json()["status"] in ("completed", "failed"):
            return answer.json()
        assert time.monotonic() < deadline, answer.text
        time.sleep(0.2)


def _replicas() -> int:
    from ray import serve

    from spectrum_xdit.launch.serve.app import APP_NAME

    (deployment,) = serve.status().applications[APP_NAME].deployments.values()
    return deployment.replica_states.get("RUNNING", 0)


def _until_replicas(count: int, timeout: float) -> float:
    """Seconds until ``count`` replicas run (fails past ``timeout``)."""
    start = time.monotonic()
    while _replicas() != count:
        assert time.monotonic() - start < timeout, f"{_replicas()} replicas, not {count}, after {timeout:.0f} s"
        time.sleep(0.25)
    return time.monotonic() - start


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_a_queue_of_jobs_adds_a_replica_and_idleness_removes_it():
    app = serve_app(SCALED, [])
    url = next(app)
    try:
        assert _replicas() == 1
        submitted = time.monotonic()
        jobs = [create_video(url, dict(JOB, seed=index)) for index in range(JOBS)]
        assert all(job.status_code == 200 for job in jobs), [job.text for job in jobs]
        up_s = _until_replicas(2, timeout=240)
        print(f"\nautoscaling: {JOBS} jobs queued -> 2 replicas in {up_s:.1f} s", flush=True)
        for job in jobs:
            assert _finished(url, job.json()["id"], timeout=400)["status"] == "completed"
        drained = time.monotonic()
        down_s = _until_replicas(1, timeout=120)
        print(f"autoscaling: idle -> 1 replica in {down_s:.1f} s (downscale_delay_s "
              f"{SCALED['downscale_delay_s']:g}); jobs ran {drained - submitted:.1f} s", flush=True)
    finally:
        app.close()
