"""Moving-digit clips built from scikit-learn's bundled ``load_digits`` (8x8 real handwriting).

A clip is one 8x8 digit pasted, at its native resolution, onto a ``FRAME`` x ``FRAME`` (16x16) dark
canvas and moved by one pixel per frame for ``NUM_FRAMES`` (9 = 4*2+1, as Wan wants) frames, so it
crosses the whole free range of the canvas (offset 0..8) in one of four directions:

- ``left``:  x goes 8 -> 0, y centred (4)
- ``right``: x goes 0 -> 8, y centred
- ``up``:    y goes 8 -> 0, x centred
- ``down``:  y goes 0 -> 8, x centred

Pixel values are mapped from the data set's 0..16 ink scale to [-1, 1] (background -1), which is
the range diffusers' ``VideoProcessor`` expects from a VAE decode. Clips are laid out as Wan
latents: ``(channels=1, frames, height, width)``.

The prompt of a clip is ``"digit {d} moving {direction}"``. The still images of the FLUX digits
model are single ``FRAME`` x ``FRAME`` frames with the digit at one of four ``POSITIONS`` (centred
on the other axis), prompted ``"digit {d} at {position}"``: 40 conditions, like the clips. The data
set is split once, stratified by digit and seeded, into a train split (the generators and the
classifier train on it) and a held-out test split (used only to measure the classifier).
"""

from __future__ import annotations

import numpy as np
import torch

FRAME = 16          # canvas side in pixels
DIGIT = 8           # native load_digits side
NUM_FRAMES = 9      # 4k+1 frames, one pixel of motion per frame
TRAVEL = FRAME - DIGIT  # 8: offsets 0..8
CENTER = TRAVEL // 2    # 4: the fixed offset on the axis across the motion
DIRECTIONS = ("left", "right", "up", "down")
# the still images' positions: (y, x) of the digit's top-left corner
POSITIONS = {"left": (CENTER, 0), "right": (CENTER, TRAVEL), "top": (0, CENTER), "bottom": (TRAVEL, CENTER)}
SPLIT_SEED = 0
TEST_FRACTION = 0.2


def prompt_for(digit: int, direction: str) -> str:
    return f"digit {int(digit)} moving {direction}"


def all_prompts() -> list[tuple[int, str, str]]:
    """(digit, direction, prompt) for the 40 conditions, digit-major."""
    return [(d, r, prompt_for(d, r)) for d in range(10) for r in DIRECTIONS]


def image_prompt_for(digit: int, position: str) -> str:
    return f"digit {int(digit)} at {position}"


def all_image_prompts() -> list[tuple[int, str, str]]:
    """(digit, position, prompt) for the 40 still-image conditions, digit-major."""
    return [(d, p, image_prompt_for(d, p)) for d in range(10) for p in POSITIONS]


def load_split() -> dict[str, np.ndarray]:
    """The seeded, stratified split of ``load_digits``: images in [-1, 1] as (N, 8, 8) float32.

    Returns ``{"train_x", "train_y", "test_x", "test_y"}``. Deterministic: a fixed permutation per
    class, the last ``TEST_FRACTION`` of each class held out.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images.astype(np.float32) / 16.0) * 2.0 - 1.0
    labels = data.target.astype(np.int64)
    rng = np.random.default_rng(SPLIT_SEED)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_test = int(round(len(idx) * TEST_FRACTION))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    train_idx = np.sort(np.concatenate(train_idx))
    test_idx = np.sort(np.concatenate(test_idx))
    return {"train_x": images[train_idx], "train_y": labels[train_idx],
            "test_x": images[test_idx], "test_y": labels[test_idx]}


def trajectory(direction: str) -> list[tuple[int, int]]:
    """(y, x) top-left offset of the digit in each frame."""
    steps = range(NUM_FRAMES)
    if direction == "left":
        return [(CENTER, TRAVEL - i) for i in steps]
    if direction == "right":
        return [(CENTER, i) for i in steps]
    if direction == "up":
        return [(TRAVEL - i, CENTER) for i in steps]
    if direction == "down":
        return [(i, CENTER) for i in steps]
    raise ValueError(f"unknown direction {direction!r}; expected one of {DIRECTIONS}")


def make_clip(image: np.ndarray | torch.Tensor, direction: str) -> torch.Tensor:
    """One clip ``(1, NUM_FRAMES, FRAME, FRAME)`` in [-1, 1] from one 8x8 image in [-1, 1]."""
    img = torch.as_tensor(image, dtype=torch.float32)
    clip = torch.full((1, NUM_FRAMES, FRAME, FRAME), -1.0)
    for f, (y, x) in enumerate(trajectory(direction)):
        clip[0, f, y:y + DIGIT, x:x + DIGIT] = img
    return clip


def make_clips(images: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Batched ``make_clip``: images (B, 8, 8), direction indices (B,) -> (B, 1, F, H, W)."""
    b = images.shape[0]
    clips = torch.full((b, 1, NUM_FRAMES, FRAME, FRAME), -1.0, dtype=images.dtype)
    for r, name in enumerate(DIRECTIONS):
        sel = (directions == r).nonzero(as_tuple=True)[0]
        if sel.numel() == 0:
            continue
        for f, (y, x) in enumerate(trajectory(name)):
            clips[sel, 0, f, y:y + DIGIT, x:x + DIGIT] = images[sel]
    return clips


def place(images: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """Single frames: 8x8 images (B, 8, 8) pasted at offsets (ys, xs) on dark canvases (B, H, W)."""
    b = images.shape[0]
    out = torch.full((b, FRAME, FRAME), -1.0, dtype=images.dtype)
    for i in range(b):
        y, x = int(ys[i]), int(xs[i])
        out[i, y:y + DIGIT, x:x + DIGIT] = images[i]
    return out


def make_images(images: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Still images: 8x8 digits (B, 8, 8) at position indices (B,) into ``POSITIONS`` -> (B, 1, H, W)."""
    offsets = torch.tensor(list(POSITIONS.values()))[positions]
    return place(images, offsets[:, 0], offsets[:, 1]).unsqueeze(1)
