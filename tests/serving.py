"""Helpers of the tests that drive a real local Ray Serve instance over HTTP (`test_serve*.py`)."""

import base64
import io
import json
import tempfile
import time

import numpy as np
import requests
import torch

from spectrum_xdit.launch.request import ParallelLayout, model_defaults, parse_request
from spectrum_xdit.launch.runner import init_rank
from spectrum_xdit.models import resolve_model
from spectrum_xdit.parallel.testing import free_port

REQUEST_TIMEOUT = 240
STEPS = 8
# The test servers: tiny-wan on two gloo ranks (Ulysses=2), short requests, quick probes.
TINY_WAN_SERVER = {"model": "tiny-wan", "ulysses_degree": 2, "num_inference_steps": STEPS, "device": "cpu",
                   "worker_cpus": 1, "max_steps": 100, "setup_timeout_s": 240, "request_timeout_s": 240,
                   "probe_interval_s": 1.0, "max_queue_size": 10, "debug": True}
# A request long enough to hang up on, or to be killed half-way: 100 full-compute steps.
LONG_REQUEST = {"prompt": "x", "num_inference_steps": 100, "height": 64, "width": 64, "num_frames": 9,
                "cache": {"method": "none"}, "output_format": "npy"}


def image_file(seed: int = 0, size: tuple[int, int] = (40, 48), format: str = "PNG") -> bytes:
    """An image file of seeded random pixels, ``size`` (height, width): the first frame of an
    image-to-video request; its size differs from the requests' so that resizing is exercised."""
    from PIL import Image

    pixels = (np.random.default_rng(seed).random((*size, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=format)
    return buffer.getvalue()


def image_base64(seed: int = 0, size: tuple[int, int] = (40, 48), format: str = "PNG") -> str:
    """:func:`image_file` as a request's ``image`` field."""
    return base64.b64encode(image_file(seed, size, format)).decode("ascii")


# the job stores of this process's test servers, removed when it exits (its finalizer)
_STORES = tempfile.TemporaryDirectory(prefix="spectrum-xdit-jobs-")


def with_own_store(settings: dict) -> dict:
    """``settings`` on a job store of their own (unless they name one): no jobs left by another run."""
    return {"broker_url": f"sqlite:///{tempfile.mkdtemp(dir=_STORES.name)}/jobs.db", **settings}


def serve_app(settings: dict, metrics_port: list):
    """Start Ray and the app of ``settings`` on a free port of 127.0.0.1, yield its URL, and shut
    both down (a generator for a module-scoped fixture); Ray's metrics port goes into ``metrics_port``."""
    import ray
    from ray import serve

    from spectrum_xdit.launch.serve.app import APP_NAME, build_app
    from spectrum_xdit.launch.serve.main import wait_until_ready

    port = free_port()
    settings = with_own_store(settings)
    # a cluster of its own (never one another process started), its logs shown on failure (conftest)
    context = ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(settings), name=APP_NAME, route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        wait_until_ready(url, timeout=300)
        metrics_port.append(context.address_info["metrics_export_port"])
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def post(url, payload, accept=None, data=None):
    headers = {"Accept": accept} if accept else {}
    if data is not None:
        return requests.post(f"{url}/v1/generate", data=data, headers=headers, timeout=REQUEST_TIMEOUT)
    return requests.post(f"{url}/v1/generate", json=payload, headers=headers, timeout=REQUEST_TIMEOUT)


def healthz(url):
    return requests.get(f"{url}/healthz", timeout=30).json()


def npy(content: bytes) -> np.ndarray:
    return np.load(io.BytesIO(content), allow_pickle=False)


def served_latents(url, payload):
    response = post(url, dict(payload, output_format="npy"))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/x-npy"
    return npy(response.content), json.loads(response.headers["x-spectrum-report"])


def fresh_latents(payload, steps: int) -> np.ndarray:
    """The same request on a freshly built tiny-wan pipeline, in this process, one rank
    (``steps``: the server's default num_inference_steps)."""
    spec = resolve_model("tiny-wan")
    request = parse_request(dict(payload, output_format="npy"), {**model_defaults(spec), "num_inference_steps": steps})
    rank_pipeline = init_rank(spec, ParallelLayout())
    rank_pipeline.pipe.set_progress_bar_config(disable=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank of the server
    try:
        return rank_pipeline.generate(request).latents.float().numpy()
    finally:
        torch.set_num_threads(threads)


def relative_error(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def until_idle(url, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = healthz(url)
        if not body["busy"] and body["queue_depth"] == 0:
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.2)


def openai_client(url, key: str = "sk-where-none-is-configured", asynchronous: bool = False):
    """OpenAI's official SDK pointed at the server, without retries (a test sees each answer)."""
    import openai

    kind = openai.AsyncOpenAI if asynchronous else openai.OpenAI
    return kind(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=REQUEST_TIMEOUT)


def create_video(url, payload):
    return requests.post(f"{url}/v1/videos", json=payload, timeout=REQUEST_TIMEOUT)


def poll_video(url, video_id, until=("completed", "failed"), timeout=240) -> tuple[dict, list]:
    """The job once its status is one of ``until``, and every progress value seen on the way."""
    deadline, seen = time.monotonic() + timeout, []
    while True:
        job = requests.get(f"{url}/v1/videos/{video_id}", timeout=30).json()
        seen.append(job["progress"])
        if job["status"] in until:
            return job, seen
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
