"""A tiny digit classifier for 16x16 frames, and the recognition benchmark of the digits models.

    PYTHONPATH=. python -m benchmarks.digits_classifier train   # ~1 min on 2 busy cores; writes the weights
    PYTHONPATH=. python -m benchmarks.digits_classifier eval    # 40 guided 50-step samples, frame recognition
    PYTHONPATH=. python -m benchmarks.digits_classifier eval --model digits-flux --true-cfg 1 2 3.5 5

The classifier is a small CNN (three 3x3 convolutions, global max pool, linear; ~24k parameters)
trained on the *train* split of ``load_digits`` (the split the generator trains on), with each digit
pasted at a random offset on the dark 16x16 canvas, so it recognises a digit anywhere a clip can put
it. Its test accuracy is measured on the held-out test split placed at every one of the 81 offsets.
Training is seeded and deterministic; the weights ship in ``spectrum_xdit/models/assets/digits_wan/
classifier.safetensors`` (~100 KB).

``eval`` generates one clip per condition (10 digits x 4 directions, seed = condition index) with the
shipped ``WanPipeline`` at full compute (50 UniPC steps, guidance 5.0), classifies every one of the
9 frames and reports the fraction recognised as the conditioned digit. It also checks that the ink
centroid moves in the prompted direction.

``eval --model digits-flux`` does the same for the FLUX digits model's still images (50 FLUX Euler
steps; ``--samples`` seeds per condition, seed = ``samples * condition + k``) at each true CFG
scale given (1: one branch, no guidance), recognising the image and checking that the ink centroid
sits on the prompted side; ``--json`` writes every scale's result.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from benchmarks import digits_data as dd

WEIGHTS = "classifier.safetensors"


class DigitCNN(nn.Module):
    """(B, 16, 16) frames in [-1, 1] -> (B, 10) logits."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1)
        self.c3 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.unsqueeze(1) if x.ndim == 3 else x
        x = F.relu(self.c1(x))
        x = F.max_pool2d(F.relu(self.c2(x)), 2)          # 8x8
        x = F.relu(self.c3(x))
        x = x.amax(dim=(2, 3))                           # translation invariant
        return self.fc(x)


def _assets() -> Path:
    from spectrum_xdit.models.digits_wan import ASSETS
    return ASSETS


def load_classifier(path: str | Path | None = None) -> DigitCNN:
    path = Path(path) if path is not None else _assets() / WEIGHTS
    model = DigitCNN()
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()


def all_offsets(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image at every one of the 81 offsets: (81*N, 16, 16) frames and the image index of each."""
    frames, owners = [], []
    n = images.shape[0]
    for y in range(dd.TRAVEL + 1):
        for x in range(dd.TRAVEL + 1):
            frames.append(dd.place(images, torch.full((n,), y), torch.full((n,), x)))
            owners.append(torch.arange(n))
    return torch.cat(frames), torch.cat(owners)


@torch.no_grad()
def accuracy(model: DigitCNN, frames: torch.Tensor, labels: torch.Tensor) -> float:
    pred = torch.cat([model(frames[i:i + 2048]).argmax(1) for i in range(0, len(frames), 2048)])
    return (pred == labels).float().mean().item()


def train(out: Path, steps: int = 1500, batch: int = 128, seed: int = 0, threads: int = 2) -> dict:
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    split = dd.load_split()
    tx, ty = torch.from_numpy(split["train_x"]), torch.from_numpy(split["train_y"])
    model = DigitCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(tx), (batch,), generator=gen)
        ys = torch.randint(0, dd.TRAVEL + 1, (batch,), generator=gen)
        xs = torch.randint(0, dd.TRAVEL + 1, (batch,), generator=gen)
        img = tx[idx]
        # mild contrast / noise jitter so slightly imperfect generated frames stay in distribution
        gain = 0.8 + 0.4 * torch.rand(batch, 1, 1, generator=gen)
        img = ((img + 1.0) * gain - 1.0).clamp(-1.0, 1.0)
        frames = dd.place(img, ys, xs)
        frames = (frames + 0.1 * torch.randn(frames.shape, generator=gen)).clamp(-1.0, 1.0)
        loss = F.cross_entropy(model(frames), ty[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    wall = time.time() - t0
    model.eval()
    test_frames, owners = all_offsets(torch.from_numpy(split["test_x"]))
    test_acc = accuracy(model, test_frames, torch.from_numpy(split["test_y"])[owners])
    train_frames, towners = all_offsets(tx)
    train_acc = accuracy(model, train_frames, ty[towners])
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / WEIGHTS))
    info = {"steps": steps, "batch": batch, "seed": seed, "wall_seconds": round(wall, 1),
            "params": sum(p.numel() for p in model.parameters()),
            "train_digits": len(tx), "test_digits": len(split["test_y"]),
            "train_accuracy_all_offsets": round(train_acc, 4), "test_accuracy_all_offsets": round(test_acc, 4)}
    (out / "classifier_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))
    return info


def centroid_direction(frames: np.ndarray) -> str:
    """The direction of the ink centroid's motion from the first to the last frame; frames (F, H, W) in [0, 1]."""
    ink = frames.astype(np.float64)
    yy, xx = np.mgrid[0:ink.shape[1], 0:ink.shape[2]]
    w = ink.sum(axis=(1, 2)) + 1e-9
    cy = (ink * yy).sum(axis=(1, 2)) / w
    cx = (ink * xx).sum(axis=(1, 2)) / w
    dy, dx = cy[-1] - cy[0], cx[-1] - cx[0]
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def evaluate_generator(pipe=None, steps: int = 50, guidance: float = 5.0, threads: int = 2,
                       classifier: DigitCNN | None = None, verbose: bool = True) -> dict:
    """Frame recognition of full-compute guided samples: one clip per (digit, direction), seed = index."""
    from spectrum_xdit.models.digits_wan import GENERATION_KWARGS, build_digits_wan_pipeline

    torch.set_num_threads(threads)
    pipe = pipe if pipe is not None else build_digits_wan_pipeline()
    classifier = classifier if classifier is not None else load_classifier()
    conditions = dd.all_prompts()
    correct_frames, total_frames, clip_majority, direction_ok = 0, 0, 0, 0
    per_digit = {d: [0, 0] for d in range(10)}
    times = []
    for i, (digit, direction, prompt) in enumerate(conditions):
        t0 = time.time()
        video = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance,
                     generator=torch.Generator().manual_seed(i), output_type="np",
                     **GENERATION_KWARGS).frames[0]                     # (F, H, W, 3) in [0, 1]
        times.append(time.time() - t0)
        grey = video.mean(axis=-1)                                      # (F, H, W)
        with torch.no_grad():
            pred = classifier(torch.from_numpy(grey * 2.0 - 1.0).float()).argmax(1).numpy()
        hits = int((pred == digit).sum())
        correct_frames += hits
        total_frames += len(pred)
        per_digit[digit][0] += hits
        per_digit[digit][1] += len(pred)
        clip_majority += int(np.bincount(pred, minlength=10).argmax() == digit)
        moved = centroid_direction(grey)
        direction_ok += int(moved == direction)
        if verbose:
            print(f"{prompt:24s} frames recognised {hits}/{len(pred)}  pred={pred.tolist()}  "
                  f"motion={moved}  {times[-1]:.2f}s", flush=True)
    result = {
        "samples": len(conditions), "steps": steps, "guidance_scale": guidance,
        "frames": total_frames, "frames_recognised": correct_frames,
        "frame_recognition_rate": round(correct_frames / total_frames, 4),
        "clip_majority_rate": round(clip_majority / len(conditions), 4),
        "motion_direction_rate": round(direction_ok / len(conditions), 4),
        "per_digit_rate": {d: round(c / t, 3) for d, (c, t) in per_digit.items()},
        "seconds_per_sample_median": round(float(np.median(times)), 2),
        "threads": threads,
    }
    if verbose:
        print(json.dumps(result, indent=2))
    return result


def centroid_side(image: np.ndarray) -> str:
    """The side of the frame centre the ink centroid lies on; image (H, W) in [0, 1]."""
    ink = image.astype(np.float64)
    yy, xx = np.mgrid[0:ink.shape[0], 0:ink.shape[1]]
    w = ink.sum() + 1e-9
    dy = (ink * yy).sum() / w - (ink.shape[0] - 1) / 2
    dx = (ink * xx).sum() / w - (ink.shape[1] - 1) / 2
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "bottom" if dy > 0 else "top"


def evaluate_image_generator(pipe=None, steps: int = 50, true_cfg_scale: float | None = None, samples: int = 2,
                             threads: int = 2, classifier: DigitCNN | None = None, verbose: bool = True) -> dict:
    """Recognition of the FLUX digits model's full-compute images: ``samples`` seeds per (digit, position),
    at ``true_cfg_scale`` (default: the model's ``TRUE_CFG_SCALE``)."""
    from spectrum_xdit.models.digits_flux import GENERATION_KWARGS, TRUE_CFG_SCALE, build_digits_flux_pipeline

    torch.set_num_threads(threads)
    true_cfg_scale = TRUE_CFG_SCALE if true_cfg_scale is None else true_cfg_scale
    pipe = pipe if pipe is not None else build_digits_flux_pipeline()
    classifier = classifier if classifier is not None else load_classifier()
    guided = {"negative_prompt": "", "true_cfg_scale": true_cfg_scale} if true_cfg_scale > 1 else {}
    correct, placed, total = 0, 0, 0
    per_digit = {d: [0, 0] for d in range(10)}
    times = []
    for i, (digit, position, prompt) in enumerate(dd.all_image_prompts()):
        for k in range(samples):
            t0 = time.time()
            image = pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(samples * i + k),
                         output_type="np", **guided, **GENERATION_KWARGS).images[0].mean(axis=-1)   # (H, W)
            times.append(time.time() - t0)
            with torch.no_grad():
                pred = int(classifier(torch.from_numpy(image * 2.0 - 1.0).float()[None]).argmax(1))
            side = centroid_side(image)
            correct += int(pred == digit)
            placed += int(side == position)
            total += 1
            per_digit[digit][0] += int(pred == digit)
            per_digit[digit][1] += 1
            if verbose:
                print(f"cfg {true_cfg_scale:g} {prompt:20s} seed {samples * i + k:3d}: pred {pred} at {side}  "
                      f"{times[-1]:.2f}s", flush=True)
    result = {
        "images": total, "steps": steps, "true_cfg_scale": true_cfg_scale, "samples_per_condition": samples,
        "recognition_rate": round(correct / total, 4), "position_rate": round(placed / total, 4),
        "per_digit_rate": {d: round(c / t, 3) for d, (c, t) in per_digit.items()},
        "seconds_per_sample_median": round(float(np.median(times)), 3), "threads": threads,
    }
    if verbose:
        print(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["train", "eval"])
    ap.add_argument("--model", choices=["digits-wan", "digits-flux"], default="digits-wan", help="eval: the generator")
    ap.add_argument("--out", type=Path, default=None,
                    help="train: where the weights go; eval: the generator's assets (default: the shipped ones)")
    ap.add_argument("--steps", type=int, default=None, help="train: optimizer steps; eval: sampling steps")
    ap.add_argument("--guidance", type=float, default=5.0, help="eval digits-wan: guidance_scale")
    ap.add_argument("--true-cfg", type=float, nargs="+", default=[None],
                    help="eval digits-flux: true_cfg_scale(s) (default: the model's TRUE_CFG_SCALE)")
    ap.add_argument("--samples", type=int, default=2, help="eval digits-flux: seeds per condition")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="eval: also write the result here")
    args = ap.parse_args(argv)
    if args.command == "train":
        train(args.out if args.out is not None else _assets(), steps=args.steps or 1500, threads=args.threads)
        return
    if args.model == "digits-flux":
        from spectrum_xdit.models.digits_flux import build_digits_flux_pipeline
        pipe = build_digits_flux_pipeline(assets=args.out)
        result = {"evaluations": [evaluate_image_generator(pipe, steps=args.steps or 50, true_cfg_scale=scale,
                                                           samples=args.samples, threads=args.threads)
                                  for scale in args.true_cfg]}
    else:
        from spectrum_xdit.models.digits_wan import build_digits_wan_pipeline
        out = args.out if args.out is not None else _assets()
        pipe = build_digits_wan_pipeline(assets=out)
        clf = load_classifier(out / WEIGHTS) if (out / WEIGHTS).exists() else load_classifier()
        result = evaluate_generator(pipe, steps=args.steps or 50, guidance=args.guidance, threads=args.threads,
                                    classifier=clf)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
