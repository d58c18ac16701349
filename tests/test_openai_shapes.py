"""OpenAI's side of the server without a server: the bodies the official SDK sends (captured from
the SDK itself) read as the JSON bodies do, within the form's bounds; the answers parse as the
SDK's own types; the SDK raises the exception of each status naming the field; API keys, the Ray
Serve gRPC patch, and the video previews."""

import base64
import io
import json
import os
import types
import warnings

import httpx2
import numpy as np
import openai
import pytest
from openai._models import construct_type
from openai.types import ImagesResponse, Video, VideoDeleteResponse
from PIL import Image

from spectrum_xdit.launch.media import sprite_sheet, thumbnail, write_media
from spectrum_xdit.launch.request import Limits, ParallelLayout, RequestError, model_defaults, parse_request
from spectrum_xdit.launch.serve import auth
from spectrum_xdit.launch.serve.body import MAX_FORM_FIELDS, read_payload
from spectrum_xdit.launch.serve.errors import KINDS, error_response
from spectrum_xdit.launch.serve.openai_answers import (
    VideoJob,
    images_answer,
    list_page,
    page_of,
    poll_after_ms,
    video_object,
)
from spectrum_xdit.launch.serve.openai_shapes import (
    ImageFields,
    VideoFields,
    frames_of_seconds,
    openai_names,
    renamed,
    request_body,
    seconds_of_frames,
    split_fields,
    video_request_body,
)
from spectrum_xdit.launch.serve.settings import API_KEY_ENV, ServeSettings
from spectrum_xdit.launch.validate import validate
from spectrum_xdit.models import resolve_model
from spectrum_xdit.parallel.patches import ray_serve_grpc

SPEC = resolve_model("tiny-wan")
DEFAULTS = {**model_defaults(SPEC), "num_inference_steps": 8, "output_format": "gif"}
FPS = 8


def _png(seed: int = 0) -> bytes:
    pixels = (np.random.default_rng(seed).random((24, 40, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _sent(call):
    """The HTTP request the SDK sends for ``call(client)`` (answered with a queued video)."""
    sent = []

    def answer(request):
        sent.append(request)
        return httpx2.Response(200, json={"id": "v", "object": "video", "model": "tiny-wan", "status": "queued",
                                          "progress": 0, "created_at": 1, "seconds": "1", "size": "32x32"})

    client = openai.OpenAI(base_url="http://server/v1", api_key="sk-test", max_retries=0,
                           http_client=httpx2.Client(transport=httpx2.MockTransport(answer)))
    call(client)
    return sent[0]


class _Starlette:
    """A Starlette request of ``body`` with ``headers``, as the replica receives it."""

    def __new__(cls, headers: dict, body: bytes, chunk: int = 1 << 16):
        from starlette.requests import Request

        chunks = [body[i:i + chunk] for i in range(0, len(body), chunk)] or [b""]

        async def receive():
            data = chunks.pop(0) if chunks else b""
            return {"type": "http.request", "body": data, "more_body": bool(chunks)}

        scope = {"type": "http", "method": "POST", "path": "/v1/videos",
                 "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]}
        return Request(scope, receive)


def _read(headers: dict, body: bytes, max_bytes: int = 1 << 20):
    import asyncio

    return asyncio.run(read_payload(_Starlette(headers, body), max_bytes))


def _video_request(headers: dict, body: bytes):
    """What the replica makes of a /v1/videos body: the checked request and OpenAI's fields."""
    payload, as_text = _read(headers, body)
    fields, rest = split_fields(payload, VideoFields, as_text)
    body = video_request_body(fields, rest, "tiny-wan", FPS, SPEC.sizes)
    try:
        request = parse_request(body, DEFAULTS)
        validate(request, SPEC, ParallelLayout(), Limits())
        return request, fields
    except RequestError as error:
        raise renamed(error, openai_names(fields, rest), body, FPS) from None


# ---- bodies ------------------------------------------------------------------------------------

def test_the_sdk_s_multipart_body_reads_as_the_same_json_body():
    extras = {"seed": 7, "num_inference_steps": 4, "guidance_scale": 1.5, "negative_prompt": "blurry",
              "output_format": "npy", "cache": {"method": "spectrum", "blend_weight": "auto", "degree": 3,
                                                 "reuse": True, "window_size": 2.5}}
    sent = _sent(lambda client: client.videos.create(prompt="42", seconds="1", size="48x32", extra_body=extras))
    assert sent.headers["content-type"].startswith("multipart/form-data")
    from_form, fields = _video_request(dict(sent.headers), sent.read())
    as_json = json.dumps({"prompt": "42", "seconds": "1", "size": "48x32", **extras}).encode()
    from_json, _ = _video_request({"content-type": "application/json"}, as_json)
    assert from_form == from_json
    assert (from_form.prompt, from_form.width, from_form.height, from_form.num_frames) == ("42", 48, 32, 9)
    assert from_form.cache.blend_weight == "auto" and from_form.cache.reuse is True and from_form.cache.degree == 3
    assert fields.seconds == 1.0


@pytest.mark.parametrize("reference", ["file", "data_url"])
def test_input_reference_becomes_the_first_frame(reference):
    """A file part, or ``{image_url}`` as the SDK's bracketed form fields (its ``create`` takes
    only files as ``input_reference``, so the object goes in ``extra_body``)."""
    png = _png()
    if reference == "file":
        sent = _sent(lambda client: client.videos.create(prompt="x", input_reference=("frame.png", png, "image/png")))
    else:
        url = "data:image/png;base64," + base64.b64encode(png).decode()
        sent = _sent(lambda client: client.videos.create(prompt="x", extra_body={"input_reference": {"image_url": url}}))
        assert b'name="input_reference[image_url]"' in sent.read()
    payload, as_text = _read(dict(sent.headers), sent.read())
    fields, rest = split_fields(payload, VideoFields, as_text)
    body = video_request_body(fields, rest, "tiny-wan", FPS, SPEC.sizes)
    assert base64.b64decode(body["image"]) == png


@pytest.mark.parametrize("form,field,status", [
    ({"prompt": "x", "seconds": "1", "num_frames": "9"}, "seconds", 422),
    ({"prompt": "x", "seconds": "100"}, "seconds", 422),          # 801 frames, over max_frames 129
    ({"prompt": "x", "seconds": "soon"}, "seconds", 422),
    ({"prompt": "x", "seconds": "-1"}, "seconds", 422),
    ({"prompt": "x", "seconds": "nan"}, "seconds", 422),
    ({"prompt": "x", "size": "40x32"}, "size", 422),               # width not a multiple of 16
    ({"prompt": "x", "size": "large"}, "size", 422),
    ({"prompt": "x", "size": "\u00b2x\u00b2"}, "size", 422),   # digits to str.isdigit, not to int()
    ({"prompt": "x", "size": "9" * 5000 + "x32"}, "size", 422),
    ({"prompt": "x", "seconds": "1e308"}, "seconds", 422),     # x fps would be infinite
    ({"prompt": "x", "model": "sora-2"}, "model", 422),
    ({"prompt": "x", "seed": "1.5"}, "seed", 422),
    ({"prompt": "x", "seed": "true"}, "seed", 422),
    ({"prompt": "x", "guidance_scale": "1e400"}, "guidance_scale", 422),
    ({"prompt": "x", "cache[degree]": "99"}, "cache.degree", 422),
    ({"prompt": "x", "cache[colour]": "red"}, "cache.colour", 422),
    ({"prompt": "x", "cache": "spectrum"}, "cache", 422),
    ({"prompt": "x", "negative_prompt[]": "a"}, "negative_prompt", 422),
    ({"prompt": "x", "cache[a][b]": "1"}, "cache.a.b", 422),
    ({"prompt": "x", "input_reference[file_id]": "file-1"}, "input_reference.file_id", 422),
    ({"prompt": "x", "input_reference[image_url]": "https://example.com/a.png"}, "input_reference.image_url", 422),
    ({"prompt": "x", "input_reference[image_url]": "data:image/png;base64,AAAA"}, "input_reference", 422),
    ({"prompt": "x", "a]b": "1"}, "a]b", 422),
    ({"seed": "1"}, "prompt", 422),
])
def test_bad_form_fields_are_refused_naming_the_field(form, field, status):
    import requests

    prepared = requests.Request("POST", "http://server/v1/videos", files={k: (None, v) for k, v in form.items()}).prepare()
    with pytest.raises(RequestError) as refused:
        _video_request(dict(prepared.headers), prepared.body)
    assert (refused.value.field, refused.value.status) == (field, status), str(refused.value)
    assert str(refused.value).startswith(f"{field}: ")


def test_the_form_is_bounded_and_leaves_no_file_open():
    import requests

    def form(fields=None, files=None):
        prepared = requests.Request("POST", "http://server/v1/videos", files={
            **{k: (None, v) for k, v in (fields or {}).items()}, **(files or {})}).prepare()
        return dict(prepared.headers), prepared.body

    too_many = {f"cache[f{i}]": "1" for i in range(MAX_FORM_FIELDS)} | {"prompt": "x"}
    cases = [(form(too_many), 1 << 20, 400, "Too many fields"),
             (form({"prompt": "x"}, {"a": ("a.png", b"1"), "input_reference": ("b.png", b"2")}), 1 << 20, 400,
              "Too many files"),
             (({"content-type": "multipart/form-data"}, b"--x\r\n"), 1 << 20, 400, "Missing boundary"),
             (({"content-type": "multipart/form-data; boundary=x"}, b"garbage" * 10), 1 << 20, 400, "multipart"),
             (form({"prompt": "x" * 5000}), 4096, 413, "max_body_bytes")]
    for (headers, body), max_bytes, status, message in cases:
        with pytest.raises(RequestError) as refused:
            _read(headers, body, max_bytes)
        assert refused.value.status == status and message in str(refused.value), str(refused.value)
    # a file larger than Starlette's in-memory spool (1 MB) goes to a temporary file: closed after
    open_before = len(os.listdir("/proc/self/fd"))
    large = bytes(np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8))
    payload, as_text = _read(*form({"prompt": "x"}, {"input_reference": ("big.png", large)}), max_bytes=4 << 20)
    assert as_text and payload["input_reference"].data == large
    assert len(os.listdir("/proc/self/fd")) == open_before


def test_image_fields_follow_the_written_policy():
    ignored = {"quality": "hd", "style": "vivid", "moderation": "low", "user": "u-1", "safety_identifier": "s"}
    fields, rest = split_fields({"prompt": "x", "n": "2", "size": "32x16", "output_format": "webp",
                                 "output_compression": "80", "background": "opaque", "stream": "false", **ignored},
                                ImageFields, as_text=True)
    assert (fields.n, fields.image_format, fields.output_compression) == (2, "webp", 80)
    assert request_body(fields, rest, "tiny-flux") == {"prompt": "x", "width": 32, "height": 16}
    for bad, field in (({"response_format": "url"}, "response_format"), ({"output_format": "gif"}, "output_format"),
                       ({"background": "transparent"}, "background"), ({"stream": True}, "stream"),
                       ({"partial_images": 2}, "partial_images"), ({"n": 0}, "n"), ({"output_compression": 101},
                                                                                   "output_compression")):
        with pytest.raises(RequestError) as refused:
            split_fields({"prompt": "x", **bad}, ImageFields, as_text=False)
        assert refused.value.field == field, str(refused.value)


def test_seconds_become_frames_by_the_frame_rate_and_the_model_s_rule():
    rules = SPEC.sizes
    assert [frames_of_seconds(s, 16, rules) for s in (4, 5, 8, 12)] == [65, 81, 129, 193]
    assert [frames_of_seconds(s, 8, rules) for s in (1, 0.3, 0.2, 0.01)] == [9, 5, 1, 1]
    assert all((frames_of_seconds(s, 8, rules) - 1) % 4 == 0 for s in np.linspace(0.05, 20, 97))
    assert [seconds_of_frames(n, 16) for n in (65, 81, 9)] == ["4", "5", "0.5"]


# ---- answers -----------------------------------------------------------------------------------

def _job(status, **given):
    request = parse_request({"prompt": "a video", "num_frames": 9}, DEFAULTS)
    values = dict(id="vid-1", status=status, request=request, created_at=100, completed_at=None, steps_done=0,
                  step_seconds=None, report=None, error=None, remixed_from_video_id=None)
    return VideoJob(**{**values, **given})


def test_video_objects_parse_as_the_sdk_s_video():
    states = [_job("queued"), _job("in_progress", steps_done=2, step_seconds=0.05),
              _job("completed", completed_at=110.5, steps_done=8, report={"nfe": {"cond": 5}},
                   remixed_from_video_id="vid-0"),
              _job("failed", completed_at=105.0, error={"message": "rank 1 died", "type": "server_error",
                                                        "param": None, "code": "unavailable"})]
    objects = [video_object(job, "tiny-wan", FPS, 3600) for job in states]
    # The SDK's type, validated: all but size, whose type lists Sora's sizes alone (the SDK itself
    # reads answers leniently, which takes any size: construct_type below)
    for body in objects:
        Video.model_validate({**body, "size": "1280x720"})
    videos = [construct_type(type_=Video, value=body) for body in objects]
    assert [v.progress for v in videos] == [0, 25, 100, 0]
    assert videos[2].expires_at == 3710 and videos[2].completed_at == 110 and videos[2].seconds == "1"
    assert videos[2].remixed_from_video_id == "vid-0" and videos[2].report == {"nfe": {"cond": 5}}
    assert videos[3].error.code == "unavailable" and videos[3].error.message == "rank 1 died"
    assert videos[0].size == "32x32" and videos[0].prompt == "a video" and videos[0].expires_at is None
    assert [poll_after_ms(job) for job in states[:2]] == [1000, 200]
    assert poll_after_ms(_job("in_progress", steps_done=1, step_seconds=30.0)) == 5000


def test_pages_follow_the_sdk_s_cursor():
    ids = [f"v{i}" for i in range(5)]
    assert page_of(ids, None, 2, "desc") == (["v4", "v3"], True)
    assert page_of(ids, "v3", 2, "desc") == (["v2", "v1"], True)
    assert page_of(ids, "v1", 2, "desc") == (["v0"], False)
    assert page_of(ids, "v2", 10, "asc") == (["v3", "v4"], False)
    with pytest.raises(RequestError) as unknown:
        page_of(ids, "gone", 2, "desc")
    assert (unknown.value.field, unknown.value.status) == ("after", 404)
    page = list_page([{"id": "v4"}, {"id": "v3"}], True)
    assert (page["object"], page["first_id"], page["last_id"], page["has_more"]) == ("list", "v4", "v3", True)
    assert list_page([], False)["first_id"] is None


def test_images_answers_and_deletions_parse_as_the_sdk_s_types():
    request = parse_request({"prompt": "x"}, {**model_defaults(resolve_model("tiny-flux")), "output_format": "png"})
    fields, _ = split_fields({"prompt": "x", "output_format": "jpeg"}, ImageFields, as_text=False)
    answer = ImagesResponse.model_validate(images_answer([b"a", b"b"], fields, request, [{}, {}]))
    assert [base64.b64decode(item.b64_json) for item in answer.data] == [b"a", b"b"]
    assert (answer.output_format, answer.size) == ("jpeg", "32x32")
    VideoDeleteResponse.model_validate({"id": "v", "object": "video.deleted", "deleted": True})


@pytest.mark.parametrize("status,exception", [
    (400, openai.BadRequestError), (401, openai.AuthenticationError), (404, openai.NotFoundError),
    (409, openai.ConflictError), (413, openai.APIStatusError), (422, openai.UnprocessableEntityError),
    (429, openai.RateLimitError), (500, openai.InternalServerError), (503, openai.InternalServerError)])
def test_the_sdk_raises_the_status_exception_naming_the_field(status, exception):
    assert status in KINDS
    answer = error_response(status, "size: must be \"WIDTHxHEIGHT\"", "size")

    def reply(request):
        return httpx2.Response(status, content=answer.body, headers={"content-type": "application/json"})

    client = openai.OpenAI(base_url="http://server/v1", api_key="k", max_retries=0,
                           http_client=httpx2.Client(transport=httpx2.MockTransport(reply)))
    with pytest.raises(exception) as raised:
        client.videos.retrieve("v")
    assert raised.value.status_code == status and raised.value.param == "size"
    assert "size: must be" in str(raised.value) and raised.value.code == KINDS[status][1]


# ---- API keys ----------------------------------------------------------------------------------

def _asgi(middleware, path: str, headers: dict) -> tuple[int, dict]:
    import asyncio

    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "method": "GET", "path": path, "query_string": b"",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    asyncio.run(middleware(scope, receive, send))
    body = json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body") or b"{}")
    return sent[0]["status"], body


def test_api_keys_guard_every_path_but_health():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    guarded = auth.RequireApiKey(app, keys=lambda: ["sk-one", "sk-two"])
    for path in ("/v1/videos", "/v1/generate", "/v1/config", "/v1/nowhere", "//v1/videos", "/docs"):
        for headers in ({}, {"Authorization": "Bearer sk-three"}, {"Authorization": "sk-one"},
                        {"Authorization": "Bearer "}, {"Authorization": "Basic sk-one"}):
            status, body = _asgi(guarded, path, headers)
            assert status == 401 and body["error"]["code"] == "invalid_api_key", (path, headers, body)
        for key in ("sk-one", "sk-two"):
            assert _asgi(guarded, path, {"Authorization": f"Bearer {key}"})[0] == 200
    assert _asgi(guarded, "/healthz", {})[0] == 200
    assert _asgi(auth.RequireApiKey(app, keys=lambda: []), "/v1/videos", {"Authorization": "Bearer any"})[0] == 200
    assert auth.key_matches("sk-two", ["sk-one", "sk-two"]) and not auth.key_matches("sk-tw", ["sk-two"])


def test_api_keys_come_from_flags_a_file_the_environment_and_the_yaml(tmp_path, monkeypatch):
    from spectrum_xdit.launch.cli import build_parser
    from spectrum_xdit.launch.serve.settings import settings_from_args

    monkeypatch.delenv(API_KEY_ENV, raising=False)
    keys = tmp_path / "keys"
    keys.write_text("# the team's keys\nsk-file-1\n\nsk-file-2  # rotated 2026\n")
    args = build_parser().parse_args(["serve", "--model", "tiny-wan", "--api_key", "sk-a", "--api_key", "sk-b",
                                      "--api_key_file", str(keys)])
    settings = settings_from_args(args)
    assert "sk-a" not in repr(settings)
    monkeypatch.setenv(API_KEY_ENV, "sk-env")
    assert settings.with_api_keys().api_key == ["sk-a", "sk-b", "sk-file-1", "sk-file-2", "sk-env"]
    assert ServeSettings.from_flat({"model": "tiny-wan", "api_key": "sk-yaml"}).api_key == ["sk-yaml"]
    for values, message in (({"api_key": "two words"}, "api_key: a key must be printable ASCII without spaces"),
                            ({"api_key_file": str(tmp_path / "none")}, "api_key_file: cannot read"),
                            ({"api_key": ["sk-é"]}, "printable ASCII")):
        with pytest.raises(ValueError, match=message) as refused:
            ServeSettings.from_flat({"model": "tiny-wan", **values})
        assert "two words" not in str(refused.value)


@pytest.mark.parametrize("host,keys,warns", [
    ("127.0.0.1", [], False), ("::1", [], False), ("localhost", [], False), ("0.0.0.0", [], True),
    ("::", [], True), ("10.1.2.3", [], True), ("my-host", [], True), ("0.0.0.0", ["sk-1"], False)])
def test_serving_beyond_loopback_without_a_key_warns(host, keys, warns):
    assert (auth.exposure_warning(host, keys) is not None) == warns


# ---- Ray Serve's replica gRPC server ----------------------------------------------------------

def test_the_replica_grpc_patch_binds_loopback_on_a_local_node_only():
    assert ray_serve_grpc.loopback_bind("[::]:0", "127.0.0.1") == "127.0.0.1:0"
    assert ray_serve_grpc.loopback_bind("[::]:0", "::1") == "[::1]:0"
    assert ray_serve_grpc.loopback_bind("[::]:0", "10.0.0.7") == "[::]:0"
    assert ray_serve_grpc.loopback_bind("0.0.0.0:9000", "127.0.0.1") == "0.0.0.0:9000"
    bound = []
    replica = types.SimpleNamespace(add_port_to_grpc_server=lambda server, address: bound.append(address) or 1)
    node = ["127.0.0.1"]
    ray_serve_grpc.patch_replica(replica, lambda: node[0])
    ray_serve_grpc.patch_replica(replica, lambda: node[0])   # idempotent: wrapped once
    replica.add_port_to_grpc_server(None, "[::]:0")
    node[0] = "10.0.0.7"
    replica.add_port_to_grpc_server(None, "[::]:0")
    assert bound == ["127.0.0.1:0", "[::]:0"]


def test_the_replica_grpc_patch_checks_ray_s_version_and_code(monkeypatch):
    import ray
    from ray.serve._private import replica

    original = replica.add_port_to_grpc_server
    try:
        assert ray_serve_grpc.install()["installed"] == ["ray_serve_grpc"]
        assert ray_serve_grpc.install()["installed"] == ["ray_serve_grpc"]
        assert replica.add_port_to_grpc_server.__wrapped__ is original
        monkeypatch.setattr(ray, "__version__", "2.61.0")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            record = ray_serve_grpc.install()
        assert record["installed"] == [] and "2.61.0" in record["skipped"]["ray_serve_grpc"]
        assert any("skipped" in str(w.message) for w in caught)
    finally:
        replica.add_port_to_grpc_server = original


# ---- previews ----------------------------------------------------------------------------------

@pytest.mark.parametrize("output_format", ["gif", "mp4"])
def test_thumbnail_and_sprite_sheet_of_a_video(tmp_path, output_format):
    if output_format == "mp4":
        pytest.importorskip("av")
    frames = np.zeros((21, 32, 48, 3), dtype=np.float32)
    for index in range(21):   # a bright bar moving right, one column band per frame
        frames[index, :, 2 * index:2 * index + 6] = 1.0
    media = write_media(tmp_path / f"clip.{output_format}", frames).read_bytes()
    first = Image.open(io.BytesIO(thumbnail(media, output_format)))
    assert first.format == "WEBP" and first.size == (48, 32)
    expected = (frames[0] * 255).astype(np.uint8)
    assert np.abs(np.asarray(first.convert("RGB"), dtype=float) - expected).mean() < 12
    sheet = Image.open(io.BytesIO(sprite_sheet(media, output_format)))
    assert sheet.format == "JPEG" and sheet.size == (4 * 48, 4 * 32)   # 16 of the 21 frames, 4 x 4
    pixels = np.asarray(sheet.convert("L"), dtype=float)
    bright_columns = [int(np.argmax(pixels[row * 32:(row + 1) * 32, col * 48:(col + 1) * 48].mean(axis=0)))
                      for row in range(4) for col in range(4)]
    assert bright_columns == sorted(bright_columns) and bright_columns[0] < 8 and bright_columns[-1] > 38
