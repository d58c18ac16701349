"""The rectified-flow training loop both digits models share (``train_digits_wan``, ``train_digits_flux``).

Objective: for a clean latent ``x0``, noise ``e ~ N(0, I)`` and a sigma drawn uniformly and then
shifted like the sampler (``sigma = s*u / (1 + (s-1)*u)``), the model sees
``x_t = (1 - sigma) * x0 + sigma * e`` and regresses ``e - x0`` (MSE). AdamW with weight decay on
matrices only, linear warm-up then cosine to a tenth of the rate, grad-norm clip 1.0, and an EMA of
the weights (its decay ramped up over the first steps) that is what gets saved.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

SIGMA_SAMPLING = "uniform u, shifted s*u/(1+(s-1)*u)"


def training_parser(description: str, out: Path, steps: int, transformer: str, example: str) -> argparse.ArgumentParser:
    """The flags both training scripts take; ``transformer`` and ``example`` name the overrides."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=out)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--ema", type=float, default=0.998)
    ap.add_argument("--cfg-dropout", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (20 steps, batch 8)")
    ap.add_argument("--transformer-overrides", type=json.loads, default={},
                    help=f"JSON dict of {transformer} config overrides, e.g. '{example}'")
    return ap


def start_run(ap: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, torch.Generator]:
    """Parse the flags (``--quick`` shrinks the run), make torch deterministic and seeded; the
    generator that draws the batches."""
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.batch_size, args.warmup = 20, 8, 5
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    return args, torch.Generator().manual_seed(args.seed)


def training_digits(split: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The training digits and their labels of ``digits_data.load_split()``."""
    return torch.from_numpy(split["train_x"]), torch.from_numpy(split["train_y"])


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from ``base`` down to ``base / 10``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def draw_rows(labels: torch.Tensor, variants: int, batch: int, cfg_dropout: float, uncond_row: int,
              gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of training digits (indices into ``labels``), a variant of each (direction or
    position) and its prompt row ``variants * digit + variant``, or ``uncond_row`` (the empty
    prompt) for a ``cfg_dropout`` share, so that classifier-free guidance has a trained branch."""
    idx = torch.randint(0, len(labels), (batch,), generator=gen)
    variant = torch.randint(0, variants, (batch,), generator=gen)
    rows = labels[idx] * variants + variant
    drop = torch.rand(batch, generator=gen) < cfg_dropout
    return idx, variant, torch.where(drop, torch.full_like(rows, uncond_row), rows)


def noised(x0: torch.Tensor, shift: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One flow-matching sample per row of ``x0``: ``(x_t, sigma, target)``; draws the noise, then ``u``."""
    noise = torch.randn(x0.shape, generator=gen)
    u = torch.rand(x0.shape[0], generator=gen)
    sigma = shift * u / (1.0 + (shift - 1.0) * u)
    s = sigma.view(-1, *([1] * (x0.ndim - 1)))
    return (1.0 - s) * x0 + s * noise, sigma, noise - x0


def flow_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(pred, target)


def train(model: torch.nn.Module, loss_at: Callable[[int], torch.Tensor], steps: int, lr: float, warmup: int,
          weight_decay: float, ema: float) -> tuple[dict[str, torch.Tensor], list[float], float]:
    """Run ``steps`` optimizer steps on ``loss_at(step)``; returns the EMA weights, the losses and the wall seconds."""
    averaged = {k: v.detach().clone() for k, v in model.state_dict().items()}
    decay_params = [p for p in model.parameters() if p.ndim >= 2]
    other_params = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay_params, "weight_decay": weight_decay},
                             {"params": other_params, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.99))
    losses: list[float] = []
    t0 = time.time()
    bar = tqdm(range(steps), desc="train", mininterval=5.0)
    for step in bar:
        loss = loss_at(step)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

        d = min(ema, (1.0 + step) / (10.0 + step))
        with torch.no_grad():
            for k, v in model.state_dict().items():
                averaged[k].mul_(d).add_(v.detach(), alpha=1.0 - d)

        losses.append(loss.item())
        if step % 25 == 0 or step == steps - 1:
            recent = sum(losses[-100:]) / len(losses[-100:])
            bar.set_postfix(loss=f"{recent:.4f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
    bar.close()
    return averaged, losses, time.time() - t0


def loss_summary(losses: list[float], wall: float) -> dict:
    """Print how training ended; the final loss (mean of the last 200 steps) and the curve in means
    of 100 steps."""
    summary = {"final_loss_last200": round(sum(losses[-200:]) / len(losses[-200:]), 5),
               "loss_curve_per_100": [round(sum(losses[i:i + 100]) / len(losses[i:i + 100]), 5)
                                      for i in range(0, len(losses), 100)]}
    print(f"done: {len(losses)} steps in {wall:.0f} s ({wall / len(losses):.3f} s/step); "
          f"mean loss over last {min(200, len(losses))} steps {summary['final_loss_last200']:.4f}", flush=True)
    return summary


def save_transformer(out: Path, ema: dict[str, torch.Tensor], config: dict) -> None:
    """The EMA weights and the transformer's config (tuples as lists) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in ema.items()}, str(out / "transformer.safetensors"),
              metadata={"format": "pt", "weights": "ema"})
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
    (out / "transformer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def write_training_info(out: Path, args: argparse.Namespace, shift: float, wall: float, summary: dict,
                        n_params: int, n_train: int, **extra) -> dict:
    """``training_info.json``: the run's settings (``extra``: the model's own) and results."""
    info = {
        "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "warmup": args.warmup,
        "weight_decay": args.weight_decay, "ema": args.ema, "cfg_dropout": args.cfg_dropout, "seed": args.seed,
        "threads": args.threads, "flow_shift": shift, "sigma_sampling": SIGMA_SAMPLING, **extra,
        "wall_seconds": round(wall, 1), **summary,
        "transformer_params": n_params, "train_digits": n_train, "torch": torch.__version__,
    }
    (out / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"saved to {out}", flush=True)
    return info
