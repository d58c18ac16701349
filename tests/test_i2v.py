"""Wan2.1 image-to-video (`tiny-wan-i2v`): the request's ``image`` field, Spectrum on the I2V
transformer, the runner, the step loop, sequence and CFG parallelism, the CLI and the server."""

import base64
import io
import json
import re

import numpy as np
import pytest
import torch

from serving import image_base64, image_file
from step_loop import run_step_loop
from spectrum_xdit import SpectrumConfig, apply_spectrum, paper_schedule, remove_spectrum, spectrum_stats
from spectrum_xdit.launch.cli import build_parser, check_arguments
from spectrum_xdit.launch.images import MAX_IMAGE_BYTES, decode_image
from spectrum_xdit.launch.request import ParallelLayout, RequestError, model_defaults, parse_request
from spectrum_xdit.launch.validate import validate
from spectrum_xdit.models import resolve_model
from spectrum_xdit.parallel.testing import run_distributed

STEPS = 16
TOLERANCE = 1e-5
I2V = resolve_model("tiny-wan-i2v")
DEFAULTS = {**model_defaults(I2V), "num_inference_steps": STEPS}


def _request(body: dict):
    return parse_request({"prompt": "a red square", "image": image_base64(0), **body}, DEFAULTS)


def _relative(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ---- the request model ------------------------------------------------------------------------

def _gif() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="GIF")
    return buffer.getvalue()


@pytest.mark.parametrize("image,message", [
    ("not base64!", "is not valid base64"),
    ("aGVsbG8=x", "is not valid base64"),
    ("ñ", "is not valid base64"),
    (base64.b64encode(b"hello, not an image").decode(), "is not a PNG or JPEG image"),
    (base64.b64encode(_gif()).decode(), "is not a PNG or JPEG image"),
    ("", "is not a PNG or JPEG image"),
    (base64.b64encode(image_file(0)[:300]).decode(), "is a damaged PNG image"),
    (image_base64(0, size=(8, 4097)), "is 4097x8 pixels, more than 4096 on a side"),
    ("A" * (4 * (MAX_IMAGE_BYTES // 3 + 1)), f"is a file of {3 * (MAX_IMAGE_BYTES // 3 + 1)} bytes, more than"),
    (5, "input should be a valid string"),
], ids=["characters", "padding", "non-ascii", "text", "gif", "empty", "truncated", "wide", "bytes", "number"])
def test_a_bad_image_is_refused_naming_the_field(image, message):
    with pytest.raises(RequestError) as info:
        parse_request({"prompt": "x", "image": image}, DEFAULTS)
    assert info.value.field == "image" and info.value.status == 422
    assert re.search(message, info.value.message), info.value.message


def test_png_and_jpeg_are_read_and_the_model_decides_whether_an_image_belongs():
    wrapped = "\n".join(re.findall(".{1,76}", image_base64(1)))    # as `base64` wraps its lines
    for image in (image_base64(0), image_base64(2, format="JPEG"), wrapped):
        request = _request({"image": image})
        validate(request, I2V, ParallelLayout())
        decoded = decode_image(request.image)
        assert decoded.mode == "RGB" and decoded.size == (48, 40)
    with pytest.raises(RequestError, match="image: tiny-wan takes no image") as info:
        validate(_request({}), resolve_model("tiny-wan"), ParallelLayout())
    assert info.value.field == "image"
    without = parse_request({"prompt": "x"}, DEFAULTS)
    with pytest.raises(RequestError, match="image: tiny-wan-i2v makes videos from an image: give the first frame"):
        validate(without, I2V, ParallelLayout())


def test_i2v_checkpoints_are_recognised(tmp_path):
    for name, size in (("Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", (480, 832)),
                       ("Wan-AI/Wan2.1-I2V-14B-720P-Diffusers", (720, 1280))):
        spec = resolve_model(name)
        assert spec.needs_image and spec.family == "wan" and spec.num_attention_heads == 40
        assert (spec.height, spec.width, spec.num_frames) == (*size, 81)
    assert not resolve_model("Wan-AI/Wan2.1-T2V-14B-Diffusers").needs_image
    (tmp_path / "transformer").mkdir()
    (tmp_path / "vae").mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "WanImageToVideoPipeline"}))
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(
        {"num_attention_heads": 40, "patch_size": [1, 2, 2], "image_dim": 1280, "in_channels": 36}))
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"scale_factor_spatial": 8, "scale_factor_temporal": 4}))
    spec = resolve_model(str(tmp_path))
    assert spec.needs_image and spec.num_attention_heads == 40 and spec.sizes.spatial_multiple == 16


@pytest.mark.parametrize("argv,message", [
    (["--model", "tiny-wan-i2v"], "--image: tiny-wan-i2v makes videos from an image: give the first frame"),
    (["--model", "tiny-wan", "--image", "{png}"], "--image: tiny-wan takes no image"),
    (["--model", "tiny-wan-i2v", "--image", "{text}"], "--image: is not a PNG or JPEG image"),
    (["--model", "tiny-wan-i2v", "--image", "{missing}"], "--image: cannot read .*missing.png"),
])
def test_bad_image_flags_fail_before_building_a_model(argv, message, tmp_path, capsys):
    (tmp_path / "in.png").write_bytes(image_file(0))
    (tmp_path / "in.txt").write_text("not an image")
    files = {"{png}": "in.png", "{text}": "in.txt", "{missing}": "missing.png"}
    argv = [str(tmp_path / files[arg]) if arg in files else arg for arg in argv]
    parser = build_parser()
    with pytest.raises(SystemExit) as exit_info:
        check_arguments(parser.parse_args(["generate", *argv]), parser, 1)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_the_cli_hands_the_file_to_the_request_model(tmp_path):
    (tmp_path / "in.jpg").write_bytes(image_file(3, format="JPEG"))
    parser = build_parser()
    args = parser.parse_args(["generate", "--model", "tiny-wan-i2v", "--image", str(tmp_path / "in.jpg")])
    _, _, request, _ = check_arguments(args, parser, 1)
    assert base64.b64decode(request.image) == image_file(3, format="JPEG")


# ---- Spectrum on the I2V transformer, the runner, the step loop -------------------------------

@pytest.fixture(scope="module")
def rank_pipeline():
    from spectrum_xdit.launch.runner import init_rank

    built = init_rank(I2V, ParallelLayout())
    built.pipe.set_progress_bar_config(disable=True)
    return built


def _pipe_call(pipe, png: bytes):
    """WanImageToVideoPipeline called directly, the image opened by Pillow."""
    from PIL import Image

    return pipe(image=Image.open(io.BytesIO(png)), prompt="a red square", negative_prompt="blurry",
                num_inference_steps=STEPS, height=32, width=32, num_frames=5, guidance_scale=5.0,
                output_type="latent", generator=torch.Generator().manual_seed(7)).frames


def test_the_image_tokens_reach_every_block_and_spectrum_forecasts_each_branch(rank_pipeline):
    pipe = rank_pipeline.pipe
    transformer = pipe.transformer
    context = []
    handles = [block.register_forward_pre_hook(lambda module, args: context.append(args[1].shape[1]))
               for block in transformer.blocks]
    try:
        reference = _pipe_call(pipe, image_file(0))
    finally:
        for handle in handles:
            handle.remove()
    # the blocks' encoder states: the CLIP tokens (16 patches + class) before the 512 text tokens
    assert set(context) == {17 + 512} and all(block.attn2.add_k_proj is not None for block in transformer.blocks)

    apply_spectrum(transformer, SpectrumConfig(num_inference_steps=STEPS, warmup_steps=STEPS))
    try:
        assert torch.equal(_pipe_call(pipe, image_file(0)), reference)
    finally:
        remove_spectrum(transformer)
    apply_spectrum(transformer, SpectrumConfig(num_inference_steps=STEPS))
    calls = []
    handle = transformer.blocks[-1].attn1.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        forecast = _pipe_call(pipe, image_file(0))
        stats = spectrum_stats(transformer)
    finally:
        handle.remove()
        remove_spectrum(transformer)
    real = paper_schedule(STEPS, 5, 2, 0.75)
    assert set(stats) == {"cond", "uncond"} and len(calls) == 2 * len(real) < 2 * STEPS
    assert all(branch["real_steps"] == real and branch["forecasts"] == STEPS - len(real) for branch in stats.values())
    assert torch.isfinite(forecast).all() and _relative(forecast, reference) > 1e-4
    assert torch.equal(_pipe_call(pipe, image_file(0)), reference)   # removed: the original behaviour


def test_the_runner_conditions_on_the_image_and_without_cache_equals_the_pipeline(rank_pipeline):
    png = image_file(0)
    plain = rank_pipeline.generate(_request({"image": base64.b64encode(png).decode(), "seed": 7,
                                             "negative_prompt": "blurry", "cache": {"method": "none"}}))
    assert torch.equal(plain.latents, _pipe_call(rank_pipeline.pipe, png))
    first = rank_pipeline.generate(_request({"image": image_base64(0)}))
    other = rank_pipeline.generate(_request({"image": image_base64(1)}))
    assert first.report["nfe"]["cond"] < STEPS
    difference = _relative(other.latents, first.latents)
    print(f"\nanother image: the latents differ by {difference:.2f} (relative)")
    assert difference > 1e-2


def _i2v_requests():
    """(tick it joins at, request): Spectrum, none, no guidance at another size and an odd token
    count (48 x 48, one frame: 9 tokens), another image as JPEG."""
    return [(0, _request({"seed": 1})),
            (0, _request({"seed": 2, "image": image_base64(1), "cache": {"method": "none"}})),
            (2, _request({"seed": 3, "height": 48, "width": 48, "num_frames": 1, "guidance_scale": 1.0})),
            (3, _request({"seed": 4, "image": image_base64(2, format="JPEG"), "cache": {"flex_window": 3.0}}))]


def test_every_i2v_request_of_a_step_batch_equals_its_solo_run(rank_pipeline):
    requests = _i2v_requests()
    solo = [rank_pipeline.generate(request) for _, request in requests]
    batched = run_step_loop(rank_pipeline, requests)[0]
    assert sorted(batched) == list(range(len(requests)))
    for index, result in batched.items():
        assert _relative(result.latents, solo[index].latents) <= TOLERANCE, index
        assert result.report["real_steps"] == solo[index].report["real_steps"], index


def _ulysses_i2v() -> dict:
    from spectrum_xdit.launch.runner import init_rank

    sharded = init_rank(I2V, ParallelLayout(ulysses_degree=2))
    sharded.pipe.set_progress_bar_config(disable=True)
    requests = _i2v_requests()
    solo = [sharded.generate(request) for _, request in requests]
    batched = run_step_loop(sharded, requests)[0]
    return {"solo": [r.latents for r in solo], "batched": [batched[i].latents for i in range(len(requests))],
            "real_steps": [r.report["real_steps"] for r in solo]}


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_ulysses_2_equals_one_process_alone_and_in_the_step_loop(rank_pipeline):
    single = [rank_pipeline.generate(request) for _, request in _i2v_requests()]
    sharded = run_distributed(_ulysses_i2v, 2, timeout=280)
    for index, expected in enumerate(single):
        assert _relative(sharded["solo"][index], expected.latents) <= TOLERANCE, index
        assert _relative(sharded["batched"][index], expected.latents) <= TOLERANCE, index
        assert sharded["real_steps"][index] == expected.report["real_steps"], index


# ---- the CLI ----------------------------------------------------------------------------------

@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_generate_i2v_saves_evaluations_and_ulysses_and_cfg_parallel_equal_one_process(tmp_path):
    from test_cli import _generate

    (tmp_path / "in.png").write_bytes(image_file(0))
    flags = ["--model", "tiny-wan-i2v", "--image", str(tmp_path / "in.png"), "--prompt", "a red square",
             "--cache_method", "spectrum"]
    single, report = _generate(tmp_path, "single", 1, [*flags, "--output", str(tmp_path / "out.gif")])
    print(f"\ntiny-wan-i2v, 20 steps: nfe {report['nfe']}")
    assert report["model"] == "tiny-wan-i2v" and all(nfe < 20 for nfe in report["nfe"].values())
    assert set(report["nfe"]) == {"cond", "uncond"} and (tmp_path / "out.gif").read_bytes()[:6] == b"GIF89a"
    for name, layout in (("ulysses", ["--ulysses_degree", "2"]), ("cfg", ["--use_cfg_parallel"])):
        latents, parallel = _generate(tmp_path, name, 2, [*flags, *layout])
        error = np.linalg.norm(latents - single) / np.linalg.norm(single)
        print(f"{name} 2: relative error {error:.1e} from one process")
        assert error <= TOLERANCE, (name, error)
        assert parallel["real_steps"] == report["real_steps"] and parallel["world_size"] == 2


# ---- the server -------------------------------------------------------------------------------

I2V_SERVER = {"model": "tiny-wan-i2v", "ulysses_degree": 2, "num_inference_steps": 8, "device": "cpu",
              "worker_cpus": 1, "setup_timeout_s": 240, "request_timeout_s": 240, "max_queue_size": 10}


@pytest.fixture(scope="module")
def i2v_server():
    pytest.importorskip("ray.serve")
    from serving import serve_app

    yield from serve_app(I2V_SERVER, [])


@pytest.mark.timeout(400)
def test_an_i2v_server_takes_a_base64_image_and_refuses_bad_ones(i2v_server, rank_pipeline):
    import requests
    from serving import healthz, npy, post

    assert healthz(i2v_server)["batching"] == "continuous"
    body = {"prompt": "a red square", "seed": 5, "output_format": "npy"}
    answers = {}
    for name, image in (("png", image_base64(0)), ("jpeg", image_base64(1, format="JPEG"))):
        response = post(i2v_server, {**body, "image": image})
        assert response.status_code == 200, response.text
        answers[name] = torch.from_numpy(npy(response.content))
        report = json.loads(response.headers["x-spectrum-report"])
        assert report["nfe"]["cond"] < 8
        fresh = rank_pipeline.generate(parse_request({**body, "image": image}, {**DEFAULTS, "num_inference_steps": 8}))
        assert _relative(answers[name], fresh.latents) <= TOLERANCE, name
    assert _relative(answers["jpeg"], answers["png"]) > 1e-2
    video = requests.post(f"{i2v_server}/v1/videos", json={**body, "image": image_base64(2)}, timeout=60)
    assert video.status_code == 200 and video.json()["status"] in ("queued", "in_progress"), video.text

    bad = [("not base64", {"image": "a picture!"}, 422, "image", "is not valid base64"),
           ("not an image", {"image": base64.b64encode(b"hello").decode()}, 422, "image", "is not a PNG or JPEG"),
           ("a GIF", {"image": base64.b64encode(_gif()).decode()}, 422, "image", "is not a PNG or JPEG"),
           ("too wide", {"image": image_base64(0, size=(8, 4097))}, 422, "image", "more than 4096 on a side"),
           ("no image", {}, 422, "image", "give the first frame"),
           ("over max_body_bytes", {"image": "A" * (1 << 20)}, 413, "body", "max_body_bytes")]
    wrong = []
    for what, extra, status, field, message in bad:
        response = post(i2v_server, {"prompt": "x", **extra})
        answer = response.json()["error"]
        if response.status_code != status or answer["param"] != field or message not in answer["message"]:
            wrong.append((what, response.status_code, response.text[:300]))
    assert not wrong, wrong
    assert healthz(i2v_server)["counters"]["rebuilds"] == 0


@pytest.mark.timeout(300)
def test_the_sdk_s_input_reference_is_the_first_frame(i2v_server):
    """OpenAI's ``input_reference``, as a file part and as ``{image_url: a data: URL}`` (the SDK's
    bracketed form fields), gives the video that ``/v1/generate`` makes with the same ``image``."""
    import openai
    from serving import npy, openai_client, post

    client = openai_client(i2v_server)
    extras = {"seed": 5, "num_inference_steps": 4, "output_format": "npy"}
    url = "data:image/png;base64," + image_base64(3)
    as_file = client.videos.create_and_poll(prompt="a red square", input_reference=("frame.png", image_file(3),
                                                                                    "image/png"), extra_body=extras)
    as_url = client.videos.create_and_poll(prompt="a red square", extra_body={**extras, "input_reference": {
        "image_url": url}})
    assert as_file.status == as_url.status == "completed", (as_file, as_url)
    expected, other = (torch.from_numpy(npy(post(i2v_server, {"prompt": "a red square", "image": image_base64(seed),
                                                             **extras}).content)) for seed in (3, 4))
    assert _relative(other, expected) > 1e-2   # the first frame matters
    for video in (as_file, as_url):
        assert _relative(torch.from_numpy(npy(client.videos.download_content(video.id).read())), expected) <= TOLERANCE
    with pytest.raises(openai.UnprocessableEntityError) as missing:
        client.videos.create(prompt="no first frame")
    assert missing.value.param == "input_reference" and "give the first frame" in missing.value.message
