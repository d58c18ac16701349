"""Writing generated frames to files a person can open, and the previews of a video: its first
frame as a thumbnail and a sprite sheet (a grid of frames, the whole clip at a glance), as OpenAI's
video API offers them (WebP and JPEG)."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

VIDEO_SUFFIXES = (".gif", ".mp4")
IMAGE_SUFFIXES = (".png",)
IMAGE_CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
THUMBNAIL_FORMAT = "webp"
SPRITE_SHEET_FORMAT = "jpeg"
SPRITE_SHEET_TILES = 16      # at most, evenly spaced from the first frame to the last
SPRITE_SHEET_TILE_SIDE = 256  # pixels of a tile's longer side, at most


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] (as diffusers' ``output_type="np"`` gives them) to uint8."""
    return (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def write_media(path: str | Path, frames: np.ndarray, fps: int = 8) -> Path:
    """Write ``(T, H, W, C)`` video frames as .gif/.mp4, or one ``(H, W, C)`` image as .png."""
    import imageio.v3 as iio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    data = to_uint8(np.asarray(frames))
    if suffix == ".gif":
        iio.imwrite(path, data, duration=1000 / fps, loop=0)
    elif suffix == ".mp4":
        iio.imwrite(path, data, fps=fps, codec="libx264", plugin="pyav")
    elif suffix == ".png":
        iio.imwrite(path, data[0] if data.ndim == 4 else data)
    else:
        raise ValueError(f"unsupported output format {suffix!r}: use one of "
                         f"{', '.join(VIDEO_SUFFIXES + IMAGE_SUFFIXES)}")
    return path


def read_frames(media: bytes, output_format: str) -> Iterator[np.ndarray]:
    """The ``(H, W, 3)`` uint8 frames of an encoded video (``gif`` or ``mp4``), one at a time."""
    import imageio.v3 as iio

    plugin = "pyav" if output_format == "mp4" else None
    for frame in iio.imiter(media, extension=f".{output_format}", plugin=plugin):
        yield frame[..., :3]


def encode_image(pixels, image_format: str, quality: Optional[int] = None) -> bytes:
    """An image (uint8 array or Pillow image) as ``png``, ``jpeg`` or ``webp`` file bytes;
    ``quality`` (0-100) for the lossy two."""
    from PIL import Image

    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(np.asarray(pixels))
    buffer = io.BytesIO()
    options = {"quality": quality} if quality is not None and image_format != "png" else {}
    image.convert("RGB").save(buffer, format=image_format.upper(), **options)
    return buffer.getvalue()


def transcode_image(data: bytes, image_format: str, quality: Optional[int] = None) -> bytes:
    """An image file re-encoded as ``image_format`` (the same bytes when it already is PNG and
    PNG is asked for)."""
    from PIL import Image

    if image_format == "png" and data[:8] == b"\x89PNG\r\n\x1a\n":
        return data
    return encode_image(Image.open(io.BytesIO(data)), image_format, quality)


def thumbnail(media: bytes, output_format: str) -> bytes:
    """The first frame of a video, as a WebP image."""
    return encode_image(next(read_frames(media, output_format)), THUMBNAIL_FORMAT)


def sprite_sheet(media: bytes, output_format: str) -> bytes:
    """Up to ``SPRITE_SHEET_TILES`` frames of a video, evenly spaced from the first to the last
    and shrunk to ``SPRITE_SHEET_TILE_SIDE``, in rows of a near-square grid, as a JPEG image.
    Frames are shrunk as they are decoded, so a long clip never sits in memory at full size."""
    from PIL import Image

    tiles = []
    for frame in read_frames(media, output_format):
        tile = Image.fromarray(frame)
        tile.thumbnail((SPRITE_SHEET_TILE_SIDE, SPRITE_SHEET_TILE_SIDE))
        tiles.append(tile)
    picks = np.linspace(0, len(tiles) - 1, min(len(tiles), SPRITE_SHEET_TILES)).round().astype(int)
    columns = math.ceil(math.sqrt(len(picks)))
    rows = math.ceil(len(picks) / columns)
    width, height = tiles[0].size
    sheet = Image.new("RGB", (columns * width, rows * height))
    for place, index in enumerate(picks):
        sheet.paste(tiles[index], ((place % columns) * width, (place // columns) * height))
    return encode_image(sheet, SPRITE_SHEET_FORMAT)
