"""Tiny Wan2.1- and FLUX.1-architecture pipelines for tests and quick runs.

Every component (transformer, text encoders, tokenizers, image encoder, VAE, scheduler) is built from a config
with seeded random weights; nothing is fetched from a model hub. The shapes follow the real
models' structure at toy width and depth.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    CLIPImageProcessorPil,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
    UMT5Config,
    UMT5EncoderModel,
)

TEXT_DIM = 32


def byte_tokenizer(model_max_length: int = 64) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with no merges: any prompt maps to its UTF-8 bytes (ids 3..258)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    vocab.update({ch: i + 3 for i, ch in enumerate(sorted(alphabet))})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=model_max_length)


def tiny_wan_transformer(seed: int = 0, num_layers: int = 2, in_channels: int = 4) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=in_channels,
        out_channels=in_channels, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=64, num_layers=num_layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ).eval()


def tiny_flux_transformer(seed: int = 0, num_layers: int = 1, num_single_layers: int = 2,
                          in_channels: int = 16) -> FluxTransformer2DModel:
    """FLUX.1-dev's kind: guidance-distilled (``guidance_embeds``), so ``guidance_scale`` conditions it."""
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=in_channels, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=TEXT_DIM, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
    ).eval()


def build_tiny_wan_pipeline(seed: int = 0, num_layers: int = 2) -> WanPipeline:
    """A complete ``WanPipeline`` (UniPC with flow prediction and flow_shift 3.0, as Wan2.1)."""
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=259, d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).eval()
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True],
                           latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=3.0, num_train_timesteps=1000)
    return WanPipeline(tokenizer=byte_tokenizer(), text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=tiny_wan_transformer(seed, num_layers=num_layers, in_channels=4))


def build_tiny_flux_pipeline(seed: int = 0, num_single_layers: int = 2) -> FluxPipeline:
    """A complete ``FluxPipeline`` with tiny CLIP and T5 text encoders and a tiny VAE."""
    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=259, hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=TEXT_DIM,
        pad_token_id=0, bos_token_id=1, eos_token_id=1)).eval()
    t5 = T5EncoderModel(T5Config(
        vocab_size=259, d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                        layers_per_block=1, latent_channels=4, norm_num_groups=4,
                        use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035).eval()
    scheduler = FlowMatchEulerDiscreteScheduler()
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=byte_tokenizer(77),
                        text_encoder_2=t5, tokenizer_2=byte_tokenizer(64),
                        transformer=tiny_flux_transformer(seed, num_single_layers=num_single_layers))


IMAGE_DIM = 32   # the tiny CLIP vision encoder's width, the I2V transformer's image_dim


def build_tiny_wan_i2v_pipeline(seed: int = 0, num_layers: int = 2) -> WanImageToVideoPipeline:
    """A complete Wan2.1 ``WanImageToVideoPipeline``: the tiny T2V pipeline's text encoder, VAE and
    scheduler, a tiny CLIP vision encoder with its (PIL) image processor, and a transformer that
    takes the noise, the VAE-encoded first frame and its mask (in_channels = 2 x latent + the
    VAE's 4x temporal factor) and attends to the image tokens through added key/value
    projections in its cross-attention."""
    t2v = build_tiny_wan_pipeline(seed, num_layers=num_layers)
    torch.manual_seed(seed + 1)
    image_encoder = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=IMAGE_DIM, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=8, projection_dim=IMAGE_DIM)).eval()
    # the PIL backend: the same preprocessing with or without torchvision installed
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    latent = t2v.vae.config.z_dim
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
        in_channels=2 * latent + t2v.vae_scale_factor_temporal, out_channels=latent, text_dim=TEXT_DIM,
        freq_dim=32, ffn_dim=64, num_layers=num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32, image_dim=IMAGE_DIM, added_kv_proj_dim=2 * 16,
    ).eval()
    return WanImageToVideoPipeline(tokenizer=t2v.tokenizer, text_encoder=t2v.text_encoder, vae=t2v.vae,
                                   scheduler=t2v.scheduler, transformer=transformer,
                                   image_encoder=image_encoder, image_processor=image_processor)


# Added to every feature of transformer_2's block stack (see build_tiny_wan22_pipeline).
WAN22_EXPERT_2_OFFSET = 10.0
WAN22_BOUNDARY_RATIO = 0.75   # 20 UniPC steps at flow_shift 3.0: steps 0-10 high noise, 11-19 low noise


def build_tiny_wan22_pipeline(seed: int = 0, num_layers: int = 2,
                              boundary_ratio: float = WAN22_BOUNDARY_RATIO) -> WanPipeline:
    """A Wan2.2-style two-expert ``WanPipeline``: ``transformer`` (the tiny Wan's) on high noise,
    ``transformer_2`` (other weights) on low noise, switching at ``boundary_ratio``.

    transformer_2's last block adds ``WAN22_EXPERT_2_OFFSET`` to every element of its output
    (the bias of its cross-attention projection, whose output Wan's block adds ungated), so a
    forecast of it that used any feature of the other expert would be far from the offset. The
    output norm (a LayerNorm without affine) removes a uniform offset again, so the samples stay
    those of the weights."""
    base = build_tiny_wan_pipeline(seed, num_layers=num_layers)
    low_noise = tiny_wan_transformer(seed + 1, num_layers=num_layers, in_channels=4)
    with torch.no_grad():
        low_noise.blocks[-1].attn2.to_out[0].bias.add_(WAN22_EXPERT_2_OFFSET)
    return WanPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae,
                       scheduler=base.scheduler, transformer=base.transformer, transformer_2=low_noise,
                       boundary_ratio=boundary_ratio)
