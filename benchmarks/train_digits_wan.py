"""Train the miniature Wan2.1-architecture digits model with Wan's flow-matching objective.

    PYTHONPATH=. python -m benchmarks.train_digits_wan --out spectrum_xdit/models/assets/digits_wan
    PYTHONPATH=. python -m benchmarks.train_digits_wan --quick --out /tmp/digits_wan_quick   # smoke run

Objective (as Wan2.1 / rectified flow): for a clean latent ``x0``, noise ``e ~ N(0, I)`` and a
sigma drawn uniformly and then shifted like the sampler (``sigma = s*u / (1 + (s-1)*u)``,
``s = 3``), the model sees ``x_t = (1 - sigma) * x0 + sigma * e`` at timestep ``1000 * sigma`` and
regresses ``e - x0`` (MSE). Prompts are encoded once by the frozen tiny UMT5 exactly as
``WanPipeline.encode_prompt`` does (max_sequence_length 226, zero-padded); 10% of the samples get the
empty prompt's embedding (the pipeline's default negative prompt), so classifier-free guidance has a
trained unconditional branch. The saved transformer weights are an EMA (0.998) of the trained ones.

The loop (AdamW, schedule, EMA) is ``benchmarks/flow_training.py``, shared with the FLUX digits model.
Defaults: 5000 AdamW steps of batch 32 (lr 1e-3, 150 warm-up steps, cosine to 1e-4, weight decay
0.01 on matrices, grad-norm clip 1.0), fresh clips every step from the 1438-digit train split.
About 21 min on two shared CPU cores (0.25 s/step); run it under ``nice -n 10``.

Cost trick, exact: the pipeline always hands the transformer 226 text positions, of which all past
the prompt's 5 tokens are identical zero vectors. Training attends over the 5 real positions plus
one padding position whose logit gets ``+log(221)`` (see ``PaddedCrossAttnProcessor``), which is the
same attention; the start-up check compares it with the stock processor on the full 226 positions.
Inference uses the stock processor and the stock pipeline.

Everything is seeded (``torch.use_deterministic_algorithms``); on one machine and thread count a
rerun gives the same weights.
"""

from __future__ import annotations

import json
import math

import torch
from safetensors.torch import save_model
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from benchmarks import digits_data as dd
from benchmarks import digits_wan_builders as builders
from benchmarks import flow_training as ft
from spectrum_xdit.models import digits_wan as dw


def encode_prompts(pipe, prompts: list[str]) -> torch.Tensor:
    """Prompt embeddings exactly as ``WanPipeline`` makes them: (N, 226, D), zero past each prompt's length."""
    with torch.no_grad():
        emb, _ = pipe.encode_prompt(prompt=prompts, do_classifier_free_guidance=False,
                                    max_sequence_length=dw.MAX_SEQUENCE_LENGTH, device=torch.device("cpu"))
    return emb


class PaddedCrossAttnProcessor(WanAttnProcessor):
    """Cross-attention over a shortened text sequence that equals attention over the full padded one.

    The pipeline's text states are zero past each prompt's length, and the Wan text projection and
    key norm act per token, so all padding tokens give one and the same key and value. Attention over
    ``n`` identical keys equals attention over one of them with ``log(n)`` added to its logit. The
    training sequence keeps the ``L`` longest real length positions plus one padding position that
    stands for the remaining ``226 - L`` copies; this processor adds ``log(226 - L)`` to that last
    logit. Training-only: it changes nothing but the cost (226 -> L+1 text tokens); the equality with
    the stock processor on the full sequence is checked at start-up.
    """

    def __init__(self, bias: torch.Tensor):
        super().__init__()
        self.bias = bias

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        mask = self.bias.to(hidden_states.dtype).view(1, 1, 1, -1)
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask=mask,
                                rotary_emb=rotary_emb)


def shorten_text(emb: torch.Tensor, real_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 226, D) pipeline embeddings -> (N, real_len+1, D) and the logit bias for the processor."""
    full = emb.shape[1]
    if not torch.all(emb[:, real_len:] == 0):
        raise ValueError("expected zero padding past the longest prompt")
    bias = torch.zeros(real_len + 1)
    bias[-1] = math.log(full - real_len)
    return emb[:, :real_len + 1].clone(), bias


def set_cross_attn_processor(transformer, processor) -> None:
    for block in transformer.blocks:
        block.attn2.set_processor(processor)


def main(argv: list[str] | None = None) -> dict:
    ap = ft.training_parser(__doc__, dw.ASSETS, 5000, "WanTransformer3DModel", '{"num_layers": 6}')
    ap.add_argument("--spatial", type=int, default=builders.VAE_CONFIG["scale_factor_spatial"],
                    help="pass-through VAE space-to-depth factor (1 or 2)")
    args, gen = ft.start_run(ap, argv)

    # components: the frozen text encoder from its seed, the transformer from the training seed
    tokenizer = builders.build_tokenizer()
    text_encoder = builders.build_text_encoder()
    p = args.spatial
    z_dim = builders.VAE_CONFIG["scale_factor_temporal"] * p * p
    vae_cfg = {**builders.VAE_CONFIG, "z_dim": z_dim, "latents_mean": [0.0] * z_dim, "latents_std": [1.0] * z_dim,
               "scale_factor_spatial": p}
    tcfg = {**builders.TRANSFORMER_CONFIG, "in_channels": z_dim, "out_channels": z_dim, **args.transformer_overrides}
    transformer = builders.build_transformer(seed=args.seed, **tcfg).train()
    vae = dw.PassThroughWanVAE(**vae_cfg)
    from diffusers import WanPipeline
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                       scheduler=dw.build_scheduler(), transformer=transformer)

    conditions = dd.all_prompts()               # 40 (digit, direction, prompt), index = 4*digit + dir
    emb = encode_prompts(pipe, [p for _, _, p in conditions] + [""])  # (41, 226, D); row 40 = empty
    uncond_row = len(conditions)
    real_len = int(max(pipe.tokenizer([p for _, _, p in conditions] + [""], return_attention_mask=True)
                       .attention_mask[i].count(1) for i in range(len(conditions) + 1)))
    emb_short, bias = shorten_text(emb, real_len)

    # the shortened cross-attention must reproduce the full 226-token one (same weights, same inputs)
    with torch.no_grad():
        probe = torch.randn(3, z_dim, 3, dd.FRAME // p, dd.FRAME // p, generator=gen)
        rows = torch.tensor([0, 17, uncond_row])
        tt = torch.tensor([900.0, 400.0, 50.0])
        set_cross_attn_processor(transformer, WanAttnProcessor())
        ref = transformer(hidden_states=probe, timestep=tt, encoder_hidden_states=emb[rows], return_dict=False)[0]
        set_cross_attn_processor(transformer, PaddedCrossAttnProcessor(bias))
        got = transformer(hidden_states=probe, timestep=tt, encoder_hidden_states=emb_short[rows],
                          return_dict=False)[0]
        err = (got - ref).abs().max().item()
    print(f"text tokens for training: {real_len + 1} (bias log({emb.shape[1] - real_len}) on the last); "
          f"max |diff| vs full 226-token cross-attention: {err:.2e}", flush=True)
    if err > 1e-4:
        raise RuntimeError("shortened cross-attention does not match the full one")

    train_x, train_y = ft.training_digits(dd.load_split())
    n_train = train_x.shape[0]

    n_params = sum(p.numel() for p in transformer.parameters())
    print(f"transformer {n_params / 1e6:.3f} M params, {3 * (dd.FRAME // p // 2) ** 2} tokens per clip; {n_train} train digits; "
          f"{args.steps} steps x batch {args.batch_size}; threads {args.threads}", flush=True)

    shift = dw.FLOW_SHIFT

    def loss_at(step: int) -> torch.Tensor:
        idx, dirs, rows = ft.draw_rows(train_y, len(dd.DIRECTIONS), args.batch_size, args.cfg_dropout, uncond_row, gen)
        x0 = vae.pack(dd.make_clips(train_x[idx], dirs))                    # (B, z_dim, 3, 16/p, 16/p)
        x_t, sigma, target = ft.noised(x0, shift, gen)
        pred = transformer(hidden_states=x_t, timestep=sigma * 1000.0, encoder_hidden_states=emb_short[rows],
                           return_dict=False)[0]
        return ft.flow_loss(pred, target)

    ema, losses, wall = ft.train(transformer, loss_at, args.steps, args.lr, args.warmup, args.weight_decay, args.ema)
    summary = ft.loss_summary(losses, wall)

    out = args.out
    ft.save_transformer(out, ema, tcfg)
    (out / "vae_config.json").write_text(json.dumps(vae_cfg, indent=2) + "\n")
    save_model(text_encoder, str(out / "text_encoder.safetensors"), metadata={"format": "pt"})
    (out / "text_encoder_config.json").write_text(json.dumps(builders.TEXT_ENCODER_CONFIG, indent=2) + "\n")
    tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
    info = ft.write_training_info(out, args, shift, wall, summary, n_params, n_train)
    return info


if __name__ == "__main__":
    main()
