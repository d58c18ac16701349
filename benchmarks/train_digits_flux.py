"""Train the miniature FLUX.1-architecture digits model with the rectified-flow objective.

    PYTHONPATH=. python -m benchmarks.train_digits_flux --out spectrum_xdit/models/assets/digits_flux
    PYTHONPATH=. python -m benchmarks.train_digits_flux --quick --out /tmp/digits_flux_quick   # smoke run

Objective and loop: ``benchmarks/flow_training.py`` (shared with the digits Wan model): sigmas drawn
uniformly and shifted by 3 like the sampler (``spectrum_xdit.models.digits_flux.FLOW_SHIFT``), the
transformer given ``timestep = sigma`` as FluxPipeline gives it (it scales by 1000 itself), MSE on
``noise - x0``, EMA (0.998) weights saved. The data are the still images of ``digits_data`` (an 8x8
train-split digit at one of four positions), packed by FluxPipeline's own ``_pack_latents`` with the
image ids of its ``_prepare_latent_image_ids``.

Prompts are encoded once, exactly as ``FluxPipeline.encode_prompt`` does at ``max_sequence_length``
16 (the T5 states of all 16 positions, padding included: FLUX attends jointly over them with no
mask; CLIP's pooled state). 10% of the samples get the empty prompt's embeddings, so true
classifier-free guidance (``true_cfg_scale`` with ``negative_prompt=""``) has a trained
unconditional branch; the model is not guidance-distilled (``guidance_embeds=False``), which would
need a guided teacher.

Defaults: 6000 AdamW steps of batch 32 (lr 1e-3, 150 warm-up steps, cosine to 1e-4, weight decay
0.01 on matrices, grad-norm clip 1.0), fresh samples every step. About 30 min on two quiet CPU
cores (the shipped run: ``training_info.json``, benchmarks/README.md). Run it under ``nice -n 10``,
with ``OMP_WAIT_POLICY=PASSIVE`` when the cores are busy (spinning OpenMP threads of a niced job
can be 10x slower).

Everything is seeded (``torch.use_deterministic_algorithms``); on one machine and thread count a
rerun gives the same weights.
"""

from __future__ import annotations

import json

import torch
from diffusers import FluxPipeline
from safetensors.torch import save_model

from benchmarks import digits_data as dd
from benchmarks import digits_flux_builders as builders
from benchmarks import flow_training as ft
from spectrum_xdit.models import digits_flux as df

VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=1, block_out_channels=[1], scaling_factor=1.0,
                  shift_factor=0.0)


def main(argv: list[str] | None = None) -> dict:
    ap = ft.training_parser(__doc__, df.ASSETS, 6000, "FluxTransformer2DModel", '{"num_single_layers": 2}')
    args, gen = ft.start_run(ap, argv)

    # components: the frozen text encoders from their seeds, the transformer from the training seed
    tokenizer = builders.build_tokenizer()
    clip, t5 = builders.build_clip(), builders.build_t5()
    tcfg = {**builders.TRANSFORMER_CONFIG, **args.transformer_overrides}
    transformer = builders.build_transformer(seed=args.seed, **tcfg).train()
    vae = df.PassThroughFluxVAE(**VAE_CONFIG)
    clip_tokenizer = builders.build_word_tokenizer(builders.WORDS, df.CLIP_LENGTH)
    pipe = FluxPipeline(scheduler=df.build_scheduler(), vae=vae, text_encoder=clip, tokenizer=clip_tokenizer,
                        text_encoder_2=t5, tokenizer_2=tokenizer, transformer=transformer)
    if pipe.vae_scale_factor != 1:
        raise RuntimeError(f"the pass-through VAE must give vae_scale_factor 1, got {pipe.vae_scale_factor}")

    conditions = dd.all_image_prompts()          # 40 (digit, position, prompt), index = 4*digit + position
    with torch.no_grad():
        emb, pooled, text_ids = pipe.encode_prompt(prompt=[p for _, _, p in conditions] + [""], prompt_2=None,
                                                   device=torch.device("cpu"),
                                                   max_sequence_length=df.MAX_SEQUENCE_LENGTH)
    uncond_row = len(conditions)                 # row 40: the empty prompt
    side = dd.FRAME // 2                         # packed 2x2 patches per side
    img_ids = pipe._prepare_latent_image_ids(1, side, side, torch.device("cpu"), torch.float32)

    train_x, train_y = ft.training_digits(dd.load_split())
    n_train = train_x.shape[0]
    n_params = sum(p.numel() for p in transformer.parameters())
    print(f"transformer {n_params / 1e6:.3f} M params, {side * side} image + {emb.shape[1]} text tokens; "
          f"{n_train} train digits; {args.steps} steps x batch {args.batch_size}; threads {args.threads}", flush=True)

    shift = df.FLOW_SHIFT

    def loss_at(step: int) -> torch.Tensor:
        idx, where, rows = ft.draw_rows(train_y, len(dd.POSITIONS), args.batch_size, args.cfg_dropout, uncond_row, gen)
        x0 = pipe._pack_latents(dd.make_images(train_x[idx], where), args.batch_size, 1, dd.FRAME, dd.FRAME)
        x_t, sigma, target = ft.noised(x0, shift, gen)                          # x0: (B, 64, 4)
        pred = transformer(hidden_states=x_t, timestep=sigma, pooled_projections=pooled[rows],
                           encoder_hidden_states=emb[rows], txt_ids=text_ids, img_ids=img_ids,
                           return_dict=False)[0]
        return ft.flow_loss(pred, target)

    ema, losses, wall = ft.train(transformer, loss_at, args.steps, args.lr, args.warmup, args.weight_decay, args.ema)
    summary = ft.loss_summary(losses, wall)

    out = args.out
    ft.save_transformer(out, ema, tcfg)
    (out / "vae_config.json").write_text(json.dumps(VAE_CONFIG, indent=2) + "\n")
    for name, encoder, config in (("text_encoder", clip, builders.CLIP_CONFIG),
                                  ("text_encoder_2", t5, builders.T5_CONFIG)):
        save_model(encoder, str(out / f"{name}.safetensors"), metadata={"format": "pt"})
        (out / f"{name}_config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
    info = ft.write_training_info(out, args, shift, wall, summary, n_params, n_train,
                                  max_sequence_length=df.MAX_SEQUENCE_LENGTH)
    return info


if __name__ == "__main__":
    main()
