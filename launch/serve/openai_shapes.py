"""OpenAI's request fields, as its SDK sends them, translated into this API's request, whose model
then checks the rest of the body (every field of ``/v1/generate`` works beside OpenAI's, as the
SDK's ``extra_body``).

- ``/v1/videos`` (and a remix): ``model``, ``size`` (``"WIDTHxHEIGHT"``), ``seconds`` (the
  duration: ``num_frames`` by the served frame rate and the model's frame rule) and
  ``input_reference`` (the first frame of an image-to-video model: a file part, or
  ``{"image_url": "data:..."}``);
- ``/v1/images/generations``: ``model``, ``size``, ``n``, ``response_format``, ``output_format``,
  ``output_compression``, and the fields accepted and ignored or refused by the policy of
  docs/serving.md.

An error about a request field the client gave as an OpenAI field names the OpenAI field
(``seconds``, not ``num_frames``).
"""

from __future__ import annotations

import base64
import re
from typing import Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ...models import SizeRules
from ..request import RequestError, from_text
from .body import FilePart

_FIELDS = ConfigDict(strict=True, extra="forbid", frozen=True)
_SIZE = re.compile(r"([0-9]{1,6})x([0-9]{1,6})")
# a day: far beyond any server's max_frames, and seconds x fps stays a finite count
MAX_SECONDS = 86_400


class _OpenAIFields(BaseModel):
    """The fields OpenAI's video and image endpoints share."""

    model_config = _FIELDS

    model: Optional[str] = Field(None, description="the served model's name (as GET /v1/config shows it)")
    size: Optional[str] = Field(None, description='"WIDTHxHEIGHT", or "auto" for the server\'s default')

    @field_validator("size")
    @classmethod
    def _width_x_height(cls, size: Optional[str]) -> Optional[str]:
        if size not in (None, "auto") and _SIZE.fullmatch(size) is None:
            raise ValueError(f'must be "WIDTHxHEIGHT" such as "832x480", or "auto", got {size[:40]!r}')
        return size


class ImageReference(BaseModel):
    """``input_reference`` as an object: an image by URL (this server takes ``data:`` URLs)."""

    model_config = _FIELDS

    image_url: Optional[str] = None
    file_id: Optional[str] = None


class VideoFields(_OpenAIFields):
    """OpenAI's own fields of ``POST /v1/videos`` and of a remix."""

    seconds: Optional[float] = Field(None, gt=0, le=MAX_SECONDS, allow_inf_nan=False, description=(
        "the duration: num_frames by the served frame rate, to the nearest count the model takes"))
    input_reference: Optional[Union[FilePart, dict]] = Field(None, description=(
        "image-to-video models: the first frame, a file part or {image_url: a data: URL}"))

    @field_validator("input_reference", mode="plain")
    @classmethod
    def _file_or_object(cls, value):
        if value is not None and not isinstance(value, (FilePart, dict)):
            raise ValueError(f"must be an image file part, or {{image_url: a data: URL}}, got {type(value).__name__}")
        return value

    @field_validator("seconds", mode="before")
    @classmethod
    def _a_duration(cls, value):
        """OpenAI's seconds are text (``"4"``); a number is taken too."""
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise ValueError(f'must be a duration in seconds such as "4", got {value!r}') from None
        return value


# What /v1/images/generations does with each OpenAI field that is not the request's (docs/serving.md)
IGNORED_IMAGE_FIELDS = ("quality", "style", "moderation", "user", "safety_identifier")


class ImageFields(_OpenAIFields):
    """OpenAI's own fields of ``POST /v1/images/generations``."""

    n: Optional[int] = Field(None, ge=1, description="images, of seeds seed .. seed + n - 1 (default 1)")
    response_format: Optional[str] = Field(None, description="b64_json (this server keeps no files for url)")
    output_format: Optional[str] = Field(None, description="png (default), jpeg or webp")
    output_compression: Optional[int] = Field(None, ge=0, le=100, description="jpeg and webp: the quality")
    background: Optional[str] = Field(None, description="auto or opaque (the images have no alpha)")
    stream: Optional[bool] = Field(None, description="false (no streaming)")
    partial_images: Optional[int] = Field(None, description="0 (no streaming)")
    quality: Optional[str] = Field(None, description="accepted and ignored")
    style: Optional[str] = Field(None, description="accepted and ignored")
    moderation: Optional[str] = Field(None, description="accepted and ignored")
    user: Optional[str] = Field(None, description="accepted and ignored")
    safety_identifier: Optional[str] = Field(None, description="accepted and ignored")

    @field_validator("response_format")
    @classmethod
    def _b64_json(cls, value: Optional[str]) -> Optional[str]:
        if value not in (None, "b64_json"):
            raise ValueError(f"must be b64_json (this server keeps no files to link to), got {value!r}")
        return value

    @field_validator("output_format")
    @classmethod
    def _image_format(cls, value: Optional[str]) -> Optional[str]:
        if value not in (None, "png", "jpeg", "webp"):
            raise ValueError(f"must be png, jpeg or webp, got {value!r}")
        return value

    @field_validator("background")
    @classmethod
    def _opaque(cls, value: Optional[str]) -> Optional[str]:
        if value not in (None, "auto", "opaque"):
            raise ValueError(f"must be auto or opaque (the images have no alpha channel), got {value!r}")
        return value

    @field_validator("stream")
    @classmethod
    def _not_streamed(cls, value: Optional[bool]) -> Optional[bool]:
        if value:
            raise ValueError("is not served: the answer comes whole")
        return value

    @field_validator("partial_images")
    @classmethod
    def _no_partial_images(cls, value: Optional[int]) -> Optional[int]:
        if value:
            raise ValueError(f"is not served (no streaming): give 0, got {value}")
        return value

    @property
    def image_format(self) -> str:
        return self.output_format or "png"


def split_fields(body, fields: type[_OpenAIFields], as_text: bool) -> tuple[_OpenAIFields, dict]:
    """OpenAI's ``fields`` of a body, checked, and the rest (this API's request); ``as_text``: the
    values are a form's text, read by each field's type."""
    if not isinstance(body, dict):
        raise RequestError("body", f"must be a JSON object, got {type(body).__name__}", status=400)
    rest = dict(body)
    given = {name: rest.pop(name) for name in fields.model_fields if name in rest}
    if as_text:
        given, rest = from_text(given, fields), from_text(rest)
    try:
        return fields.model_validate({name: value for name, value in given.items() if value is not None}), rest
    except ValidationError as error:
        raise RequestError.from_validation(error) from None


def request_body(fields: _OpenAIFields, rest: dict, served_model: str) -> dict:
    """This API's request of a body: ``rest`` with ``size`` as ``width`` and ``height``, once
    ``model`` names the served one."""
    if fields.model is not None and fields.model != served_model:
        raise RequestError("model", f"this server serves {served_model!r}, not {fields.model!r}")
    body = dict(rest)
    if fields.size not in (None, "auto"):
        if "width" in rest or "height" in rest:
            raise RequestError("size", "give size or width and height, not both")
        width, height = _SIZE.fullmatch(fields.size).groups()
        body.update(width=int(width), height=int(height))
    return body


def video_request_body(fields: VideoFields, rest: dict, served_model: str, fps: int, rules: SizeRules) -> dict:
    """:func:`request_body` with ``seconds`` as ``num_frames`` and ``input_reference`` as ``image``."""
    body = request_body(fields, rest, served_model)
    if fields.seconds is not None:
        if "num_frames" in rest:
            raise RequestError("seconds", "give seconds or num_frames, not both")
        body["num_frames"] = frames_of_seconds(fields.seconds, fps, rules)
    if fields.input_reference is not None:
        if "image" in rest:
            raise RequestError("input_reference", "give input_reference or image, not both")
        body["image"] = _reference_image(fields.input_reference)
    return body


def frames_of_seconds(seconds: float, fps: int, rules: SizeRules) -> int:
    """The frame count nearest ``seconds`` at ``fps`` that the model takes: ``seconds x fps``
    intervals, rounded to the model's frame rule (Wan: a multiple of 4, so 4k + 1 frames)."""
    step = rules.temporal_multiple
    return step * round(seconds * fps / step) + 1


def seconds_of_frames(num_frames: int, fps: int) -> str:
    """A video's duration as OpenAI's ``seconds`` text: its frame intervals at ``fps``."""
    return f"{(num_frames - 1) / fps:g}"


def _reference_image(reference: Union[FilePart, dict]) -> str:
    """The request's ``image`` (a file in base64) of an ``input_reference``."""
    if isinstance(reference, FilePart):
        return base64.b64encode(reference.data).decode("ascii")
    try:
        reference = ImageReference.model_validate(reference)
    except ValidationError as error:
        problem = RequestError.from_validation(error)
        raise RequestError(f"input_reference.{problem.field}", problem.message) from None
    if reference.file_id is not None:
        raise RequestError("input_reference.file_id", "this server keeps no files: upload the image as a file "
                           "part, or give image_url as a data: URL")
    url = reference.image_url
    if url is None:
        raise RequestError("input_reference", "give the image as a file part, or as {image_url: a data: URL}")
    header, comma, data = url.partition(",")
    if not (url.startswith("data:") and header.endswith(";base64") and comma):
        raise RequestError("input_reference.image_url", "must be a data: URL with base64 data "
                           "(data:image/png;base64,...): this server fetches nothing")
    return data


def openai_names(fields: _OpenAIFields, rest: dict) -> dict[str, str]:
    """The request fields that OpenAI's ``fields`` set, by the OpenAI field: an error about one of
    them names that field (``seconds`` for ``num_frames``); on ``/v1/videos`` the first frame is
    ``input_reference`` unless the body gave ``image``."""
    names = {}
    if fields.size not in (None, "auto"):
        names.update(width="size", height="size")
    if getattr(fields, "seconds", None) is not None:
        names["num_frames"] = "seconds"
    if isinstance(fields, VideoFields) and "image" not in rest:
        names["image"] = "input_reference"
    return names


def renamed(error: RequestError, names: dict[str, str], body: dict, fps: int) -> RequestError:
    """``error`` naming the OpenAI field the client gave for its request field."""
    name = names.get(error.field)
    if name is None:
        return error
    if name == "seconds":
        frames = body["num_frames"]
        return RequestError(name, f"{seconds_of_frames(frames, fps)} s at {fps} frames per second is {frames} "
                            f"frames, and num_frames {error.message}", error.status)
    return RequestError(name, f"{error.field} {error.message}", error.status)
