"""OpenAI's answers as its SDK parses them: the video object (``client.videos.retrieve``), a page
of videos (``client.videos.list``, whose pagination follows ``last_id`` while ``has_more``), and
the images answer (``client.images.generate``). This server's own fields ride along as extras
(the ``report``, ``num_frames``, ``output_format``), which the SDK keeps."""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass
from typing import Optional

from ..request import GenerationRequest, RequestError
from .openai_shapes import ImageFields, seconds_of_frames

POLL_AFTER_MS = (200, 5000)   # the bounds of openai-poll-after-ms
QUEUED_POLL_AFTER_MS = 1000


@dataclass(frozen=True)
class VideoJob:
    """What the answers read of a ``/v1/videos`` job (``SpectrumServer._video_job`` makes it from
    wherever jobs are kept)."""

    id: str
    status: str                      # queued, in_progress, completed or failed
    request: GenerationRequest
    created_at: int
    completed_at: Optional[float]
    steps_done: int
    step_seconds: Optional[float]    # mean seconds per denoising step so far, while it runs
    report: Optional[dict]           # once completed
    error: Optional[dict]            # OpenAI's error object, once failed
    remixed_from_video_id: Optional[str]


def video_object(job: VideoJob, model: str, fps: int, ttl_s: float) -> dict:
    """OpenAI's video object of ``job``; ``expires_at``: when its results are forgotten at the
    latest (``ttl_s`` after it finished; sooner if the server's ``max_result_bytes`` fill up)."""
    request = job.request
    finished = job.completed_at is not None
    body = {"id": job.id, "object": "video", "model": model, "status": job.status,
            "progress": 100 if job.status == "completed" else int(100 * job.steps_done / request.num_inference_steps),
            "created_at": job.created_at,
            "completed_at": int(job.completed_at) if finished else None,
            "expires_at": int(job.completed_at + ttl_s) if finished else None,
            "prompt": request.prompt, "seconds": seconds_of_frames(request.num_frames, fps),
            "size": f"{request.width}x{request.height}", "remixed_from_video_id": job.remixed_from_video_id,
            "error": job.error, "num_frames": request.num_frames, "output_format": request.output_format}
    if job.report is not None:
        body["report"] = job.report
    return body


def poll_after_ms(job: VideoJob) -> int:
    """When a client should ask again: about one denoising step (progress moves no faster)."""
    if job.status == "in_progress" and job.step_seconds is not None:
        least, most = POLL_AFTER_MS
        return int(min(most, max(least, 1000 * job.step_seconds)))
    return QUEUED_POLL_AFTER_MS


def page_of(ids: list[str], after: Optional[str], limit: int, order: str) -> tuple[list[str], bool]:
    """The ids of one page of a list in creation order (``order`` ``asc``, or ``desc``: newest
    first) after the id ``after``, and whether more follow."""
    ordered = ids if order == "asc" else ids[::-1]
    start = 0
    if after is not None:
        if after not in ordered:
            raise RequestError("after", f"no video {after} (deleted or expired): list again from the start", 404)
        start = ordered.index(after) + 1
    return ordered[start:start + limit], start + limit < len(ordered)


def list_page(objects: list[dict], has_more: bool) -> dict:
    return {"object": "list", "data": objects, "first_id": objects[0]["id"] if objects else None,
            "last_id": objects[-1]["id"] if objects else None, "has_more": has_more}


def images_answer(images: list[bytes], fields: ImageFields, request: GenerationRequest, reports: list[dict]) -> dict:
    """OpenAI's images answer: the images in base64, their format and size, and each one's report."""
    return {"created": int(time.time()),
            "data": [{"b64_json": base64.b64encode(image).decode("ascii")} for image in images],
            "output_format": fields.image_format, "size": f"{request.width}x{request.height}",
            "background": "opaque", "reports": reports}
