"""`spectrum-xdit serve` as a user starts it, a local Ray instance in a subprocess: everything it
starts listens on loopback only (Ray Serve's replica gRPC server too, through the
``ray_serve_grpc`` patch), a request that runs past ``--request_timeout_s`` is stopped at a step
boundary with a 504, without a rebuild, and a server with API keys answers nothing without one."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
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
        [sys.executable, "-m", "spectrum_xdit.launch.cli", "serve", "--broker_url", f"sqlite:///{tmp_path}/jobs.db",
         "--model", "tiny-wan", "--ulysses_degree", "2",
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
        print(f"{len(open_)} beyond loopback")
        assert listeners and not open_, open_
        health = requests.get(f"{url}/healthz", timeout=30).json()
        assert "pid" not in health["workers"][0] and "replica_pid" not in health   # no --debug
        assert health["ray_patches"]["installed"] == ["ray_serve_grpc"]

        started = time.monotonic()
        response = requests.post(f"{url}/v1/generate", json=RUNAWAY, timeout=120)
        seconds = time.monotonic() - started
        assert response.status_code == 504, response.text
        assert "stopped after step" in response.json()["error"]["message"], response.text
        assert seconds < TIMEOUT_S + 15, seconds
        after = requests.get(f"{url}/healthz", timeout=30).json()
        assert after["counters"]["rebuilds"] == 0 and after["status"] == "ready"
        quick = requests.post(f"{url}/v1/generate", json={"prompt": "digit 2", "output_format": "npy"}, timeout=120)
        assert quick.status_code == 200, quick.text
        report = json.loads(quick.headers["x-spectrum-report"])
        print(f"runaway answered 504 after {seconds:.1f} s ({response.json()['error']['message']}); "
              f"next request {report['request_seconds']:.2f} s")
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.mark.timeout(400)
def test_openai_images_through_the_sdk_and_api_keys_on_an_image_model(tmp_path):
    """tiny-flux in one process, with API keys from the flag, a file and the environment: without
    a valid key no endpoint but /healthz answers; with one, ``client.images.generate`` gives ``n``
    images of consecutive seeds in the format asked, FLUX.1's guidance conventions hold (distilled
    3.5 by default, one branch; true CFG on request, two), and bad input raises the SDK's
    exception naming the field."""
    import base64
    import io

    import openai
    from PIL import Image
    from serving import openai_client

    from spectrum_xdit.launch.media import transcode_image
    from spectrum_xdit.launch.serve.app import api

    keys = tmp_path / "keys"
    keys.write_text("sk-from-the-file\n")
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "spectrum_xdit.launch.cli", "serve", "--broker_url", f"sqlite:///{tmp_path}/jobs.db",
         "--model", "tiny-flux", "--port", str(port),
         "--num_cpus", "2", "--device", "cpu", "--num_inference_steps", "6", "--setup_timeout_s", "300",
         "--api_key", "sk-from-a-flag", "--api_key", "sk-from-another", "--api_key_file", str(keys)],
        stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, SPECTRUM_XDIT_API_KEY="sk-from-the-env"))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, timeout=300, interval=0.5)
        endpoints = [(method.upper(), path.replace("{video_id}", "some-id"))
                     for path, methods in api.openapi()["paths"].items() for method in methods]
        answered = {}
        for method, path in endpoints:
            for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": "sk-from-a-flag"}):
                response = requests.request(method, f"{url}{path}", headers=headers, json={"prompt": "x"}, timeout=60)
                answered[(method, path, str(headers))] = (response.status_code, response.json())
        v1 = {key: answer for key, answer in answered.items() if key[1].startswith("/v1")}
        print(f"\nwith keys: {sum(status != 401 for status, _ in v1.values())} of {len(v1)} requests to the "
              f"{len({key[:2] for key in v1})} /v1 endpoints answered without a valid key")
        assert len({key[:2] for key in v1}) == 9   # every /v1 route of the app
        assert all(status == 401 and body["error"]["code"] == "invalid_api_key" for status, body in v1.values()), v1
        assert {status for (_, path, _), (status, _) in answered.items() if path == "/healthz"} == {200}

        for key in ("sk-from-a-flag", "sk-from-another", "sk-from-the-file", "sk-from-the-env"):
            config = requests.get(f"{url}/v1/config", headers={"Authorization": f"Bearer {key}"}, timeout=30)
            assert config.status_code == 200 and config.json()["model"] == "tiny-flux"
        with pytest.raises(openai.AuthenticationError) as refused:
            openai_client(url, key="sk-wrong").images.generate(prompt="x")
        assert refused.value.code == "invalid_api_key"

        client = openai_client(url, key="sk-from-the-file")
        answer = client.images.generate(prompt="a red square", n=2, size="32x32", response_format="b64_json",
                                        extra_body={"seed": 5})
        images = [Image.open(io.BytesIO(base64.b64decode(item.b64_json))) for item in answer.data]
        assert [image.format for image in images] == ["PNG", "PNG"] and images[0].size == (32, 32)
        assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))
        assert (answer.output_format, answer.size) == ("png", "32x32") and isinstance(answer.created, int)
        reports = answer.model_extra["reports"]
        assert [report["seed"] for report in reports] == [5, 6]
        for report in reports:
            assert (report["guidance_scale"], report["true_cfg_scale"]) == (3.5, 1.0) and set(report["nfe"]) == {"cond"}
        ignored = {"quality": "hd", "style": "vivid", "user": "someone", "moderation": "low"}
        for image_format, pillow in (("jpeg", "JPEG"), ("webp", "WEBP")):
            encoded = client.images.generate(prompt="a red square", size="32x32", output_format=image_format,
                                             output_compression=90, extra_body={"seed": 5}, **ignored)
            data = base64.b64decode(encoded.data[0].b64_json)
            assert Image.open(io.BytesIO(data)).format == pillow and encoded.output_format == image_format
            assert data == transcode_image(base64.b64decode(answer.data[0].b64_json), image_format, 90)   # seed 5's
        true_cfg = client.images.generate(prompt="a red square", size="32x32", extra_body={"true_cfg_scale": 4})
        assert set(true_cfg.model_extra["reports"][0]["nfe"]) == {"cond", "uncond"}
        for bad, field in (({"response_format": "url"}, "response_format"), ({"n": 5}, "n"), ({"n": 0}, "n"),
                           ({"size": "32"}, "size"), ({"output_format": "npy"}, "output_format"),
                           ({"background": "transparent"}, "background"), ({"extra_body": {"strength": 1}},
                                                                          "strength")):
            with pytest.raises(openai.UnprocessableEntityError) as refused:
                client.images.generate(prompt="x", **bad)
            assert refused.value.param == field and field in refused.value.message
        with pytest.raises(openai.NotFoundError):
            client.videos.create(prompt="x")
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
        [sys.executable, "-m", "spectrum_xdit.launch.cli", "serve", "--broker_url", f"sqlite:///{tmp_path}/jobs.db",
         "--model", "tiny-wan", "--num_replicas", "2",
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
