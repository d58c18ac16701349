"""Two replicas on one shared job store (`launch/serve/job_store.py`): a real local Ray Serve
instance on 127.0.0.1 with two replicas of tiny Wan, one rank each, at most two jobs in each
replica's step loop, a queue of six and leases of three seconds.

Any replica answers for any job (no 404 while it lives), its content equals its solo run, a
delete is seen by every replica, a full queue answers 429; a replica SIGKILLed with jobs in hand
loses none of them (its leases expire and the other replica runs them again); a whole-server
restart on the same store keeps the finished jobs and runs the queued and interrupted ones. The
restart comes last: it replaces the server. Every request and every wait is bounded.
"""

import os
import signal
import time
from types import SimpleNamespace

import pytest
import requests

pytest.importorskip("ray.serve")

from serving import (  # noqa: E402
    LONG_REQUEST,
    STEPS,
    TINY_WAN_SERVER,
    create_video,
    fresh_latents,
    npy,
    openai_client,
    relative_error,
)
from spectrum_xdit.parallel.testing import free_port  # noqa: E402

pytestmark = pytest.mark.ray
SETTINGS = {**TINY_WAN_SERVER, "ulysses_degree": 1, "num_replicas": 2, "batching": "continuous",
            "max_batch_size": 2, "max_queue_size": 6, "lease_s": 3.0, "max_steps": 400}
# a /v1/videos body: the latents of a small video at the server's STEPS
VIDEO = {"size": "48x32", "num_frames": 5, "output_format": "npy"}
# long enough to be caught running (and killed) on CPU
SLOW = {"size": "64x64", "num_frames": 9, "num_inference_steps": 30, "output_format": "npy", "cache": {"method": "none"}}
# still running when the server is shut down
RUNNING = dict(SLOW, num_inference_steps=400)


def _deploy(settings: dict, port: int) -> None:
    import ray
    from ray import serve

    from spectrum_xdit.launch.serve.app import APP_NAME, build_app

    # a cluster of its own (never one another process started), its logs shown on failure (conftest)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(settings), name=APP_NAME, route_prefix="/", blocking=False)


def _shut_down() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("jobs")
    settings = {**SETTINGS, "broker_url": f"sqlite:///{folder}/jobs.db", "results_url": str(folder / "results")}
    port = free_port()
    _deploy(settings, port)
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", settings=settings, port=port)
    finally:
        _shut_down()


def _replicas_ready(url: str, count: int = 2, timeout: float = 300) -> dict:
    """The /healthz body of each of ``count`` replicas once each answered ready."""
    deadline, seen = time.monotonic() + timeout, {}
    while len(seen) < count:
        assert time.monotonic() < deadline, f"only {sorted(seen)} of {count} replicas became ready"
        try:
            answer = requests.get(f"{url}/healthz", timeout=30)
            if answer.status_code == 200:
                seen[answer.json()["replica"]] = answer.json()
        except requests.RequestException:
            pass
        time.sleep(0.1)
    return seen


def _poll_all(url: str, ids: list, timeout: float = 300, least_polls: int = 0) -> tuple[dict, dict]:
    """Every job once it completed or failed, polling them in turn every 0.1 s (at least
    ``least_polls`` polls), and the count of each answer's status code."""
    deadline, finished, codes = time.monotonic() + timeout, {}, {}
    while len(finished) < len(ids) or sum(codes.values()) < least_polls:
        assert time.monotonic() < deadline, (codes, {i: finished.get(i, {}).get("status") for i in ids})
        for video_id in ids:
            try:
                answer = requests.get(f"{url}/v1/videos/{video_id}", timeout=30)
            except requests.RequestException:
                codes["no answer"] = codes.get("no answer", 0) + 1
                continue
            codes[answer.status_code] = codes.get(answer.status_code, 0) + 1
            if answer.status_code == 200 and answer.json()["status"] in ("completed", "failed"):
                finished[video_id] = answer.json()
        time.sleep(0.1)
    return finished, codes


def _solo(body: dict) -> dict:
    """The /v1/generate form of a /v1/videos body, for ``fresh_latents``."""
    width, height = (int(side) for side in body["size"].split("x"))
    return {"prompt": body["prompt"], "seed": body["seed"], "width": width, "height": height,
            "num_frames": body["num_frames"], **{k: body[k] for k in ("num_inference_steps", "cache") if k in body}}


def _content(url: str, video_id: str):
    answer = requests.get(f"{url}/v1/videos/{video_id}/content", timeout=60)
    assert answer.status_code == 200, answer.text
    return npy(answer.content)


@pytest.mark.timeout(900)
def test_any_replica_answers_for_any_job_and_a_delete_reaches_them_all(server):
    url = server.url
    replicas = _replicas_ready(url)
    bodies = [dict(VIDEO, prompt=f"shared {i}", seed=i) for i in range(8)]
    created = [create_video(url, body) for body in bodies]
    assert all(answer.status_code == 200 for answer in created), [answer.text for answer in created]
    ids = [answer.json()["id"] for answer in created]
    finished, codes = _poll_all(url, ids, least_polls=100)
    ran_on = [finished[video_id]["report"]["replica"] for video_id in ids]
    print(f"\n8 jobs over 2 replicas, {sum(codes.values())} polls: answers {codes}; jobs per replica "
          f"{[ran_on.count(replica) for replica in sorted(replicas)]}")
    assert codes.get(404, 0) == 0 and sum(codes.values()) >= 100, codes
    assert all(finished[video_id]["status"] == "completed" for video_id in ids), finished
    assert set(ran_on) == set(replicas)          # both pulled jobs
    for video_id, body in zip(ids, bodies):
        assert relative_error(_content(url, video_id), fresh_latents(_solo(body), STEPS)) <= 1e-5

    # OpenAI's SDK: created through one replica, polled and fetched through any
    client = openai_client(url)
    video = client.videos.create_and_poll(prompt="shared 0", size="48x32", extra_body=dict(seed=0, num_frames=5,
                                                                                           output_format="npy"))
    assert video.status == "completed", video
    assert relative_error(npy(client.videos.download_content(video.id).read()), _content(url, ids[0])) <= 1e-6

    for video_id in [*ids, video.id]:
        assert requests.delete(f"{url}/v1/videos/{video_id}", timeout=30).status_code == 200
    gone = [requests.get(f"{url}/v1/videos/{video_id}{path}", timeout=30).status_code
            for video_id in ids for path in ("", "/content") for _ in range(3)]
    assert gone == [404] * len(gone)             # 48 lookups, routed to either replica
    assert all(video.id != job["id"] for job in requests.get(f"{url}/v1/videos", timeout=30).json()["data"])


@pytest.mark.timeout(600)
def test_a_full_shared_queue_answers_429_and_deletes_empty_it(server):
    url = server.url
    _replicas_ready(url)
    running = [create_video(url, dict(LONG_REQUEST, prompt=f"fills {i}", seed=i)).json()["id"] for i in range(4)]
    deadline = time.monotonic() + 120
    while requests.get(f"{url}/healthz", timeout=30).json()["queue_depth"] > 0:   # both replicas took two
        assert time.monotonic() < deadline
        time.sleep(0.1)
    queued = [create_video(url, dict(VIDEO, prompt=f"waits {i}", seed=i)) for i in range(6)]
    assert all(answer.json()["status"] == "queued" for answer in queued), [answer.text for answer in queued]
    full = create_video(url, dict(VIDEO, prompt="one too many", seed=9))
    assert full.status_code == 429 and full.headers["retry-after"] == "10", full.text
    assert "max_queue_size is 6" in full.json()["error"]["message"]
    for video_id in [*running, *(answer.json()["id"] for answer in queued)]:
        assert requests.delete(f"{url}/v1/videos/{video_id}", timeout=30).status_code == 200
    deadline = time.monotonic() + 120
    while True:   # the running ones stop after their current step, on whichever replica runs them
        bodies = _replicas_ready(url).values()
        if not any(body["busy"] for body in bodies) and all(body["queue_depth"] == 0 for body in bodies):
            break
        assert time.monotonic() < deadline, list(bodies)
        time.sleep(0.2)


@pytest.mark.timeout(900)
def test_a_killed_replica_loses_none_of_its_jobs(server):
    url = server.url
    _replicas_ready(url)
    bodies = [dict(SLOW, prompt=f"survives {i}", seed=i) for i in range(8)]
    ids = [create_video(url, body).json()["id"] for body in bodies]
    deadline = time.monotonic() + 120
    while True:   # a replica with jobs in its step loop
        health = requests.get(f"{url}/healthz", timeout=30).json()
        if health["batch_occupancy"] > 0:
            break
        assert time.monotonic() < deadline, health
        time.sleep(0.05)
    os.kill(health["replica_pid"], signal.SIGKILL)
    killed = time.monotonic()
    finished, codes = _poll_all(url, ids, timeout=600)
    deliveries = [finished[video_id]["report"]["deliveries"] if finished[video_id]["status"] == "completed" else None
                  for video_id in ids]
    completed = sum(finished[video_id]["status"] == "completed" for video_id in ids)
    print(f"\nreplica {health['replica']} SIGKILLed with {health['batch_occupancy']} jobs in its loop: "
          f"{completed}/8 completed {time.monotonic() - killed:.0f} s later; deliveries {deliveries}; poll answers "
          f"{codes}")
    assert completed == 8, finished
    assert codes.get(404, 0) == 0
    again = [i for i, count in enumerate(deliveries) if count > 1]
    assert len(again) >= health["batch_occupancy"], deliveries   # its jobs ran again elsewhere
    for i in again[:2]:
        assert relative_error(_content(url, ids[i]), fresh_latents(_solo(bodies[i]), STEPS)) <= 1e-5


@pytest.mark.timeout(900)
def test_a_restarted_server_keeps_finished_jobs_and_runs_the_rest(server):
    url = server.url
    _replicas_ready(url)
    done_body = dict(VIDEO, prompt="before the restart", seed=11)
    done_id = create_video(url, done_body).json()["id"]
    _poll_all(url, [done_id])
    before = _content(url, done_id)
    running = [dict(RUNNING, prompt=f"interrupted {i}", seed=20 + i) for i in range(4)]
    running_ids = [create_video(url, body).json()["id"] for body in running]
    deadline = time.monotonic() + 120
    while requests.get(f"{url}/healthz", timeout=30).json()["queue_depth"] > 0:   # all four taken
        assert time.monotonic() < deadline
        time.sleep(0.05)
    queued_ids = [create_video(url, dict(VIDEO, prompt=f"queued {i}", seed=30 + i)).json()["id"] for i in range(4)]
    statuses = [requests.get(f"{url}/v1/videos/{video_id}", timeout=30).json()["status"]
                for video_id in [*running_ids, *queued_ids]]
    stopped = time.time()
    _shut_down()
    _deploy(server.settings, server.port)
    _replicas_ready(url)
    assert relative_error(_content(url, done_id), before) == 0
    after, codes = _poll_all(url, [*running_ids, *queued_ids], timeout=600)
    outcome = [(after[video_id]["status"], after[video_id].get("report", {}).get("deliveries"),
                after[video_id]["completed_at"] - int(stopped)) for video_id in [*running_ids, *queued_ids]]
    print(f"\nrestarted with jobs {statuses}: (status, deliveries, completed s after the shutdown) {outcome}; "
          f"poll answers {codes}")
    assert statuses == ["in_progress"] * 4 + ["queued"] * 4
    assert codes.get(404, 0) == 0 and [status for status, _, _ in outcome] == ["completed"] * 8
    assert [deliveries for _, deliveries, _ in outcome] == [2] * 4 + [1] * 4   # the running ones ran again
    assert all(seconds >= 0 for _, _, seconds in outcome)
    assert relative_error(_content(url, running_ids[0]), fresh_latents(_solo(running[0]), STEPS)) <= 1e-5
