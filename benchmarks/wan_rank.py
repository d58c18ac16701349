"""One rank of Wan2.1-14B under Ulysses-8 (480x832, 81 frames) on one GPU: what a real step, a
forecast step and the pieces around them cost there.

    python -m benchmarks.wan_rank --json benchmarks/results/wan_rank_<card>.json   # on a CUDA GPU
    python -m benchmarks.wan_rank --small                                          # CPU rehearsal, seconds

The model is diffusers' ``WanTransformer3DModel`` at Wan2.1-14B's configuration (40 blocks, 5120
channels, 40 heads of 128, FFN 13824) with random bf16 weights, built on the device. It runs one
rank's shard of a branch: 4095 of the 32,760 video tokens, whose self-attention takes the layout
that xDiT's Ulysses all-to-all gives a rank, all 32,760 tokens at 5 of the 40 heads
(:class:`UlyssesRankAttention`; the all-to-all itself is not run, there is one GPU). Sections, each
written to the JSON as it ends (``benchmarks.device_run``):

1. ``build``, ``setup``: the model, the versions, and the attention backend xfuser picks here (its
   runtime state in a one-process world), whose function the self-attention then calls, tried once
   at the rank's shapes (torch's SDPA instead, with the error recorded, if it fails).
2. ``calls``: a real call, and with Spectrum's hooks on (paper schedule) a real and a forecast call.
3. ``loops``: 50 steps of classifier-free guidance (two branches, an Euler step on the latents)
   with no cache, the paper schedule and ``target_nfe=14``: wall time against the NFE speedup, and
   the host synchronisations that ``torch.cuda.set_sync_debug_mode`` reports, by source line
   (scalar reads, blocking copies, stream and device synchronisations; an event wait, as the
   validation's read of its sums, may not be among them).
4. ``forecaster``: ``update``, ``forecast`` and ``score`` at the rank's F = 4095 x 5120, as
   achieved bytes per second (the bytes each must touch) against a device copy measured here.
5. ``batch``: real calls of 1, 2, 4 and 8 rows, what the step loop gains by batching requests.
6. ``vae``: a decode of the whole video's latents (21 x 60 x 104 to 81 frames of 480 x 832) by
   diffusers' ``AutoencoderKLWan`` in bf16, as xDiT's Wan runner loads it.

Each section also records its peak device memory. ``--small`` shrinks the model, the shard and the
VAE so that every section runs on a CPU in seconds: a rehearsal of the code path, not a measurement.
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from benchmarks.device_run import Clock, Sections, copy_bandwidth, device_arguments
from spectrum_xdit import SpectrumConfig, SpectrumForecaster, apply_spectrum, remove_spectrum, spectrum_stats

WAN14B = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
              text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
              qk_norm="rms_norm_across_heads", eps=1e-6)
SMALL_WAN = dict(WAN14B, num_attention_heads=4, attention_head_dim=16, ffn_dim=64, num_layers=2, text_dim=32,
                 freq_dim=32)
SMALL_VAE = dict(base_dim=8, dim_mult=[1, 2, 2, 2])
GUIDANCE = 5.0
ROWS = (1, 2, 4, 8)
# forecaster section: real steps before the timed ones, and how many of each are timed
WARM_REAL_STEPS = 5
TIMED = 5


@dataclass(frozen=True)
class RankShape:
    """The latents one rank holds (frames, height, width before the 1x2x2 patches), the Ulysses
    degree, the text tokens, the whole video's latents that the VAE decodes, and the denoising
    steps and Spectrum budget of the loops."""

    latent: tuple[int, int, int]
    degree: int
    text_tokens: int
    video_latent: tuple[int, int, int]
    steps: int = 50
    target_nfe: int = 14

    def tokens(self) -> int:
        frames, height, width = self.latent
        return frames * (height // 2) * (width // 2)


# 21 x 60 x 104 latents (480x832, 81 frames) are 32,760 tokens; an eighth of them is 21 x 30 x 26.
WAN14B_RANK = RankShape(latent=(21, 30, 26), degree=8, text_tokens=512, video_latent=(21, 60, 104))
SMALL_RANK = RankShape(latent=(2, 4, 4), degree=2, text_tokens=16, video_latent=(2, 4, 4), steps=12,
                       target_nfe=5)


class UlyssesRankAttention:
    """A Wan block's self-attention as one rank of Ulysses-``degree`` computes it.

    The rank holds its tokens with every head. Ulysses' all-to-all gives each rank all the tokens
    at ``heads / degree`` of the heads; here the rank's own tokens at each group of heads stand in
    for the other ranks' tokens, so the attention runs at exactly the shapes, and costs the work, of
    the real rank (the results mix head groups: this is for timing). ``attention`` takes and
    returns ``(batch, heads, tokens, head_dim)`` tensors.
    """

    def __init__(self, degree: int, attention: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]):
        self.degree = degree
        self.attention = attention

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query, key = _rotate(query, *rotary_emb), _rotate(key, *rotary_emb)
        out = self.attention(*(self._gather_tokens(x) for x in (query, key, value)))
        out = self._scatter_tokens(out, query.shape).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))

    def _gather_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, tokens, heads, dim) -> (batch, heads / degree, degree x tokens, dim)."""
        batch, tokens, heads, dim = x.shape
        group = heads // self.degree
        return x.unflatten(2, (self.degree, group)).permute(0, 3, 2, 1, 4).reshape(batch, group, -1, dim)

    def _scatter_tokens(self, x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """The inverse of :meth:`_gather_tokens`, back to ``shape``."""
        batch, tokens, heads, dim = shape
        return x.reshape(batch, heads // self.degree, self.degree, tokens, dim).permute(0, 3, 2, 1, 4).reshape(shape)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding: each pair of channels (2i, 2i+1) turned by the angle of its position,
    ``cos``/``sin`` as ``WanRotaryPosEmbed`` gives them (each angle's value repeated on the pair)."""
    pairs = x.unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2).type_as(x)


def build_model(config: dict, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The transformer with random weights, made on ``device`` in ``dtype`` (no host copy), with the
    parameters diffusers keeps in float32 in float32, as ``from_pretrained(torch_dtype=dtype)`` leaves them."""
    from diffusers import WanTransformer3DModel

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = WanTransformer3DModel(**config).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(previous)
    keep = set(model._keep_in_fp32_modules or ())
    for name, parameter in model.named_parameters():
        if keep.intersection(name.split(".")):
            parameter.data = parameter.data.float()
    return model


def xfuser_attention(model: torch.nn.Module, device: torch.device) -> tuple[str, Callable]:
    """The attention backend xDiT's runtime state picks here, in a one-process world, and its function."""
    import torch.distributed as dist

    from spectrum_xdit.parallel.xdit_setup import init_xdit_runtime, setup_xdit_parallel, teardown_xdit_parallel

    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        init_xdit_runtime(model, setup_xdit_parallel())
        from xfuser.core.distributed import get_runtime_state
        from xfuser.core.distributed.attention_backend import ATTENTION_FUNCTION_REGISTRY

        backend = get_runtime_state().attention_backend
        function = ATTENTION_FUNCTION_REGISTRY[backend]
    finally:
        teardown_xdit_parallel()
    return backend.name, lambda q, k, v: function(q, k, v, dropout_p=0.0, is_causal=False)[0]


def torch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


class Inputs:
    """A call's inputs at ``rows`` rows: this rank's latents, a timestep, and text embeddings."""

    def __init__(self, config: dict, shape: RankShape, rows: int, device: torch.device, dtype: torch.dtype):
        generator = torch.Generator(device).manual_seed(rows)
        self.latents = torch.randn(rows, config["in_channels"], *shape.latent, device=device, dtype=dtype,
                                   generator=generator)
        self.text = torch.randn(rows, shape.text_tokens, config["text_dim"], device=device, dtype=dtype,
                                generator=generator)
        self.negative = torch.randn_like(self.text)
        self.rows = rows

    def timestep(self, value: float) -> torch.Tensor:
        return torch.full((self.rows,), value, device=self.latents.device)


@torch.no_grad()
def call(model, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    return model(hidden_states=latents, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]


def setup(model, device: torch.device, shape: RankShape) -> dict:
    import diffusers

    row = {"cuda": torch.version.cuda, "diffusers": diffusers.__version__, "python": platform.python_version(),
           "tokens_per_rank": shape.tokens(), "ulysses_degree": shape.degree,
           "heads_per_rank": model.config.num_attention_heads // shape.degree}
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        row.update(multiprocessors=properties.multi_processor_count, memory_bytes=properties.total_memory,
                   cudnn=torch.backends.cudnn.version())
    heads, dim = row["heads_per_rank"], model.config.attention_head_dim
    probe = torch.randn(1, heads, shape.degree * shape.tokens(), dim, device=device,
                        dtype=model.blocks[0].attn1.to_q.weight.dtype)
    row["attention_backend"] = None
    try:
        row["attention_backend"], attention = xfuser_attention(model, device)
        attention(probe, probe, probe)   # at the rank's shapes, before the sections rely on it
        row["attention"] = f"xfuser {row['attention_backend']}"
    except Exception as error:  # reported; the benchmark goes on with torch's attention
        row["attention_error"] = f"{type(error).__name__}: {error}"
        row["attention"], attention = "torch scaled_dot_product_attention", torch_attention
    for block in model.blocks:
        block.attn1.set_processor(UlyssesRankAttention(shape.degree, attention))
    return row


def calls(model, inputs: Inputs, clock: Clock, steps: int) -> dict:
    """A plain real call; then, with the hooks on, the first steps of a generation until a few
    forecast steps have run, each call timed."""
    timestep = inputs.timestep(500.0)
    real = clock(lambda: call(model, inputs.latents, timestep, inputs.text), repeats=3, warmup=1)
    apply_spectrum(model, SpectrumConfig(num_inference_steps=steps))
    seconds = {}
    try:
        for step in range(steps):
            with model.cache_context("cond", step_index=step, num_inference_steps=steps):
                seconds[step] = clock.each(lambda: call(model, inputs.latents, timestep, inputs.text))
            if len(seconds) - len(spectrum_stats(model)["cond"]["real_steps"]) >= min(TIMED, steps // 4):
                break
        real_steps = spectrum_stats(model)["cond"]["real_steps"]
    finally:
        remove_spectrum(model)
    hooked = [s for step, s in seconds.items() if step in real_steps and step > 0]
    forecast = [s for step, s in seconds.items() if step not in real_steps]
    row = {"real_ms": 1e3 * real, "real_hooked_ms": 1e3 * statistics.median(hooked),
           "forecast_ms": 1e3 * statistics.median(forecast), "steps_timed": len(seconds)}
    row["forecast_share_of_real"] = row["forecast_ms"] / row["real_ms"]
    print(f"real call {row['real_ms']:.1f} ms (hooked {row['real_hooked_ms']:.1f} ms), forecast call "
          f"{row['forecast_ms']:.2f} ms = {100 * row['forecast_share_of_real']:.2f}% of a real call", flush=True)
    return row


class HostSyncs:
    """The host synchronisations ``torch.cuda.set_sync_debug_mode`` reports inside the block, by
    source line (``None`` on a CPU, where nothing is reported)."""

    def __init__(self, device: torch.device):
        self.enabled = device.type == "cuda"
        self.sites: Counter = Counter()

    def __enter__(self):
        if self.enabled:
            self._catch = warnings.catch_warnings(record=True)
            self._caught = self._catch.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        if not self.enabled:
            return
        torch.cuda.set_sync_debug_mode("default")
        self._catch.__exit__(*exc)
        for caught in self._caught:
            if "synchroniz" in str(caught.message):
                self.sites[f"{Path(caught.filename).name}:{caught.lineno}"] += 1

    @property
    def count(self) -> Optional[int]:
        return sum(self.sites.values()) if self.enabled else None


def cfg_loop(model, inputs: Inputs, steps: int, config: Optional[SpectrumConfig], device: torch.device) -> dict:
    """``steps`` steps of classifier-free guidance from the same latents, Spectrum applied if ``config``."""
    if config is not None:
        apply_spectrum(model, config)
    sigmas = [1.0 - step / steps for step in range(steps + 1)]
    latents = inputs.latents.float()
    syncs = HostSyncs(device)
    _synchronize(device)
    t0 = time.perf_counter()
    try:
        with syncs:
            for step in range(steps):
                timestep = inputs.timestep(1000.0 * sigmas[step])
                current = latents.to(inputs.latents.dtype)
                with model.cache_context("cond", step_index=step, num_inference_steps=steps):
                    cond = call(model, current, timestep, inputs.text)
                with model.cache_context("uncond", step_index=step, num_inference_steps=steps):
                    uncond = call(model, current, timestep, inputs.negative)
                velocity = uncond.float() + GUIDANCE * (cond.float() - uncond.float())
                latents = latents + (sigmas[step + 1] - sigmas[step]) * velocity
        _synchronize(device)
        wall = time.perf_counter() - t0
        nfe = len(spectrum_stats(model)["cond"]["real_steps"]) if config is not None else steps
    finally:
        if config is not None:
            remove_spectrum(model)
    return {"wall_seconds": wall, "nfe": nfe, "speedup_nfe": steps / nfe, "host_syncs": syncs.count,
            "host_sync_sites": dict(syncs.sites.most_common(8)), "finite": bool(torch.isfinite(latents).all())}


def loops(model, inputs: Inputs, shape: RankShape, device: torch.device) -> dict:
    steps = shape.steps
    configs = {"none": None, "paper": SpectrumConfig(num_inference_steps=steps),
               f"target_nfe_{shape.target_nfe}": SpectrumConfig(num_inference_steps=steps, target_nfe=shape.target_nfe)}
    rows = {}
    for name, config in configs.items():
        print(f"  {name} ...", flush=True)
        row = cfg_loop(model, inputs, steps, config, device)
        row["speedup_wall"] = rows["none"]["wall_seconds"] / row["wall_seconds"] if rows else 1.0
        rows[name] = row
        print(f"  {name}: {row['wall_seconds']:.2f} s, NFE {row['nfe']} ({row['speedup_nfe']:.2f}x), wall "
              f"{row['speedup_wall']:.2f}x, host syncs {row['host_syncs']}", flush=True)
    return rows


def forecaster(device: torch.device, clock: Clock, features: int) -> dict:
    """The forecaster's operations at ``features`` bf16 elements, timed one call each (update) or
    by the median of repeats (forecast, score), against a device copy of the same traffic."""
    config = SpectrumConfig(num_inference_steps=50, blend_weight="auto")   # both predictors kept: score works
    p = config.num_basis
    feature = torch.randn(features, device=device, dtype=torch.bfloat16)
    state = SpectrumForecaster(config)
    for step in range(WARM_REAL_STEPS):
        state.update(step, feature)
    update = statistics.median(clock.each(lambda s=step: state.update(s, feature))
                               for step in range(WARM_REAL_STEPS, WARM_REAL_STEPS + TIMED))
    target = WARM_REAL_STEPS + TIMED
    seconds = {"update": update,
               "forecast": clock(lambda: state.forecast(target, blend_weight=0.5), repeats=TIMED),
               "score": clock(lambda: state.score(target, feature), repeats=TIMED)}
    # the bytes each must touch: the bf16 feature in or out (2F), the P float32 moments (4PF each
    # way), the last two features (2F each)
    touched = {"update": (4 + 8 * p) * features, "forecast": (4 * p + 6) * features,
               "score": (4 * p + 6) * features}
    copy = copy_bandwidth(device, clock, 4 * p * features)
    row = {"features": features, "state_bytes": state.nbytes, "copy_GBps": copy / 1e9}
    for name, s in seconds.items():
        row[name] = {"ms": 1e3 * s, "GBps": touched[name] / s / 1e9, "of_copy": touched[name] / s / copy}
        print(f"  {name}: {1e3 * s:.3f} ms, {touched[name] / s / 1e9:.1f} GB/s "
              f"({100 * touched[name] / s / copy:.0f}% of a copy's {copy / 1e9:.0f} GB/s)", flush=True)
    return row


def batch(model, config: dict, shape: RankShape, clock: Clock, device: torch.device, dtype: torch.dtype) -> list:
    rows = []
    for count in ROWS:
        inputs = Inputs(config, shape, count, device, dtype)
        timestep = inputs.timestep(500.0)
        seconds = clock(lambda: call(model, inputs.latents, timestep, inputs.text), repeats=2, warmup=1)
        rows.append({"rows": count, "ms": 1e3 * seconds, "ms_per_row": 1e3 * seconds / count})
        print(f"  {count} rows: {1e3 * seconds:.1f} ms, {1e3 * seconds / count:.1f} ms a row", flush=True)
        del inputs
    for row in rows:
        row["speedup_per_row"] = rows[0]["ms_per_row"] / row["ms_per_row"]
    return rows


def vae(device: torch.device, clock: Clock, shape: RankShape, small: bool, dtype: torch.dtype) -> dict:
    """One decode of the whole video's latents, after a warm-up decode of one latent frame."""
    from diffusers import AutoencoderKLWan

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            decoder = AutoencoderKLWan(**(SMALL_VAE if small else {})).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(previous)
    frames, height, width = shape.video_latent
    latents = torch.randn(1, decoder.config.z_dim, frames, height, width, device=device, dtype=dtype)
    videos = []
    with torch.no_grad():
        clock.each(lambda: decoder.decode(latents[:, :, :1], return_dict=False))
        seconds = clock.each(lambda: videos.append(decoder.decode(latents, return_dict=False)[0]))
    frames_out, height_out, width_out = videos[0].shape[-3:]
    print(f"  {frames_out} frames of {height_out}x{width_out} in {seconds:.2f} s", flush=True)
    return {"latent": [frames, height, width], "frames": frames_out, "height": height_out, "width": width_out,
            "seconds": seconds, "dtype": str(dtype).replace("torch.", "")}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: Optional[list[str]] = None) -> dict:
    args, device = device_arguments(__doc__, argv)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config, shape = (SMALL_WAN, SMALL_RANK) if args.small else (WAN14B, WAN14B_RANK)
    clock = Clock(device)
    sections = Sections(args.json, device, "wan_rank", small=args.small)
    features = shape.tokens() * config["num_attention_heads"] * config["attention_head_dim"]
    built: list = []

    def build() -> dict:
        t0 = time.perf_counter()
        built.append(build_model(config, device, dtype))
        _synchronize(device)
        parameters = list(built[0].parameters())
        return {"params": sum(p.numel() for p in parameters), "seconds": time.perf_counter() - t0,
                "parameter_bytes": sum(p.numel() * p.element_size() for p in parameters)}

    ready = sections.run("build", build) is not None and sections.run("setup", setup, built[0], device, shape)
    inputs = Inputs(config, shape, 1, device, dtype)
    if ready:
        sections.run("calls", calls, built[0], inputs, clock, shape.steps)
        sections.run("loops", loops, built[0], inputs, shape, device)
    sections.run("forecaster", forecaster, device, clock, features)
    if ready:
        sections.run("batch", batch, built[0], config, shape, clock, device, dtype)
    built.clear()   # the model's memory, before the VAE's
    del inputs
    sections.run("vae", vae, device, clock, shape, args.small, dtype)
    return sections.finish()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:])["status"])
