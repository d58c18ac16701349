"""`spectrum-xdit serve` as a user starts it, a local Ray instance in a subprocess: everything it
starts listens on loopback only (but for the one listener Ray Serve 2.60 hard-codes, below), and a
request that runs past ``--request_timeout_s`` is stopped at a step boundary with a 504, without a
rebuild."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

psutil = pytest.importorskip("psutil")
requests = pytest.importorskip("requests")
pytestmark = pytest.mark.ray

from spectrum_xdit.launch.serve.main import wait_until_ready  # noqa: E402
from spectrum_xdit.parallel.testing import free_port  # noqa: E402

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
TIMEOUT_S = 4.0
# 100 full-compute steps (the server's max_steps) of 256 x 256 x 33 (2,304 tokens; 200 steps of a
# quarter of them took 13.6 s in one process on this machine's two cores, which serve an 8-step
# request of the default size in about a second): far past TIMEOUT_S however fast the day's CPU
# is (100 steps of 96 x 96 x 17 came in under it on 2026-12-02).
RUNAWAY = {"prompt": "x", "num_inference_steps": 100, "height": 256, "width": 256, "num_frames": 33,
           "cache": {"method": "none"}, "output_format": "npy"}


def _ray_serve_replica_grpc(ip: str, name: str) -> bool:
    """Ray Serve 2.60 starts each replica's inter-deployment gRPC server on ``[::]:0``, not
    configurable (``ray/serve/_private/replica.py``, ``ReplicaBase._on_initialized``)."""
    return ip == "::" and name.startswith("ray::ServeReplica")


def _listeners(root: psutil.Process) -> list[tuple[str, int, str]]:
    found = []
    for process in [root, *root.children(recursive=True)]:
        try:
            connections = process.net_connections(kind="inet")
            name = process.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        found += [(c.laddr.ip, c.laddr.port, name) for c in connections if c.status == psutil.CONN_LISTEN]
    return found


@pytest.mark.timeout(600)
def test_a_local_server_listens_on_loopback_only_and_stops_a_runaway_at_a_step_boundary(tmp_path):
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "spectrum_xdit.launch.cli", "serve", "--model", "tiny-wan", "--ulysses_degree", "2",
         "--port", str(port), "--num_cpus", "4", "--device", "cpu", "--num_inference_steps", "8",
         "--request_timeout_s", str(TIMEOUT_S), "--setup_timeout_s", "300"],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, timeout=300, interval=0.5)
        listeners = _listeners(psutil.Process(server.pid))
        print(f"\n{len(listeners)} listening sockets: "
              f"{sorted({(ip, name) for ip, _, name in listeners})}")
        open_ = [(ip, port, name) for ip, port, name in listeners if ip not in LOOPBACK]
        assert listeners and all(_ray_serve_replica_grpc(ip, name) for ip, _, name in open_), open_
        assert len(open_) <= 1, open_
        health = requests.get(f"{url}/healthz", timeout=30).json()
        assert "pid" not in health["workers"][0] and "replica_pid" not in health   # no --debug

        started = time.monotonic()
        response = requests.post(f"{url}/v1/generate", json=RUNAWAY, timeout=120)
        seconds = time.monotonic() - started
        assert response.status_code == 504, response.text
        assert "stopped after step" in response.json()["error"], response.text
        assert seconds < TIMEOUT_S + 15, seconds
        after = requests.get(f"{url}/healthz", timeout=30).json()
        assert after["counters"]["rebuilds"] == 0 and after["status"] == "ready"
        quick = requests.post(f"{url}/v1/generate", json={"prompt": "digit 2", "output_format": "npy"}, timeout=120)
        assert quick.status_code == 200, quick.text
        report = json.loads(quick.headers["x-spectrum-report"])
        print(f"runaway answered 504 after {seconds:.1f} s ({response.json()['error']}); "
              f"next request {report['request_seconds']:.2f} s")
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.mark.timeout(400)
def test_openai_image_generations_on_an_image_model(tmp_path):
    """tiny-flux in one process: ``n`` PNGs of consecutive seeds, as ``b64_json``; FLUX.1's guidance
    conventions over HTTP (distilled 3.5 by default, one branch; true CFG on request, two)."""
    import base64
    import io

    import imageio.v3 as iio

    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "spectrum_xdit.launch.cli", "serve", "--model", "tiny-flux", "--port", str(port),
         "--num_cpus", "2", "--device", "cpu", "--num_inference_steps", "6", "--setup_timeout_s", "300"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, timeout=300, interval=0.5)
        answer = requests.post(f"{url}/v1/images/generations", timeout=120,
                               json={"model": "tiny-flux", "prompt": "a red square", "n": 2, "size": "32x32",
                                     "response_format": "b64_json", "seed": 5})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        images = [iio.imread(io.BytesIO(base64.b64decode(item["b64_json"]))) for item in body["data"]]
        assert len(images) == 2 and images[0].shape == (32, 32, 3) and not (images[0] == images[1]).all()
        assert [report["seed"] for report in body["reports"]] == [5, 6] and isinstance(body["created"], int)
        defaults = requests.get(f"{url}/v1/config", timeout=30).json()["defaults"]
        assert (defaults["guidance_scale"], defaults["true_cfg_scale"]) == (3.5, 1.0)
        for report in body["reports"]:
            assert (report["guidance_scale"], report["true_cfg_scale"]) == (3.5, 1.0) and set(report["nfe"]) == {"cond"}
        true_cfg = requests.post(f"{url}/v1/images/generations", timeout=120,
                                 json={"prompt": "a red square", "size": "32x32", "true_cfg_scale": 4})
        assert true_cfg.status_code == 200, true_cfg.text
        assert set(true_cfg.json()["reports"][0]["nfe"]) == {"cond", "uncond"}
        for bad, field in (({"prompt": "x", "response_format": "url"}, "response_format"),
                           ({"prompt": "x", "n": 5}, "n"), ({"prompt": "x", "n": 0}, "n"),
                           ({"prompt": "x", "size": "32"}, "size"), ({"prompt": "x", "output_format": "npy"},
                                                                     "output_format")):
            refused = requests.post(f"{url}/v1/images/generations", json=bad, timeout=60)
            assert refused.status_code == 422 and refused.json()["field"] == field, refused.text
        assert requests.post(f"{url}/v1/videos", json={"prompt": "x"}, timeout=60).status_code == 404
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.mark.timeout(500)
def test_two_replicas_share_the_requests_and_one_losing_a_rank_leaves_the_other_serving(tmp_path):
    """--num_replicas 2, one rank each: two rank groups. Requests spread over both; a killed rank
    in one rebuilds that group alone while the other keeps answering."""
    from concurrent.futures import ThreadPoolExecutor

    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "spectrum_xdit.launch.cli", "serve", "--model", "tiny-wan", "--num_replicas", "2",
         "--port", str(port), "--num_cpus", "4", "--device", "cpu", "--num_inference_steps", "4",
         "--setup_timeout_s", "300", "--probe_interval_s", "1", "--debug"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def generate(seed: int) -> dict:
        answer = requests.post(f"{url}/v1/generate", json={"prompt": "two replicas", "seed": seed,
                                                           "output_format": "npy"}, timeout=240)
        assert answer.status_code == 200, answer.text
        return json.loads(answer.headers["x-spectrum-report"])

    try:
        wait_until_ready(url, timeout=300, interval=0.5)
        health = {}
        deadline = time.monotonic() + 120
        while len(health) < 2:   # both replicas' groups ready, each seen through /healthz
            body = requests.get(f"{url}/healthz", timeout=30).json()
            if body["status"] == "ready":
                health[body["replica"]] = body
            assert time.monotonic() < deadline, health
        with ThreadPoolExecutor(max_workers=8) as pool:
            replicas = {report["replica"] for report in pool.map(generate, range(12))}
        assert replicas == set(health), (replicas, set(health))
        lost, kept = sorted(health)
        os.kill(health[lost]["workers"][0]["pid"], signal.SIGKILL)
        killed = time.monotonic()
        served_by_kept = None
        while time.monotonic() - killed < 60 and served_by_kept is None:
            if generate(100 + int(time.monotonic()))["replica"] == kept:
                served_by_kept = time.monotonic() - killed
        assert served_by_kept is not None
        rebuilt = {}   # the latest rebuild count /healthz showed of each replica
        while not (len(rebuilt) == 2 and rebuilt[lost] >= 1) and time.monotonic() - killed < 120:
            body = requests.get(f"{url}/healthz", timeout=30).json()
            rebuilt[body["replica"]] = body["counters"]["rebuilds"]
            time.sleep(0.2)
        assert rebuilt == {lost: 1, kept: 0}, rebuilt
        print(f"\n12 requests over replicas {sorted(replicas)}; after a rank of {lost} was killed, {kept} "
              f"answered {served_by_kept:.1f} s later and only {lost} rebuilt")
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
