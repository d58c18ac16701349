"""Writing generated frames to files a person can open."""

from __future__ import annotations

from pathlib import Path

import numpy as np

VIDEO_SUFFIXES = (".gif", ".mp4")
IMAGE_SUFFIXES = (".png",)


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
