"""What training the FLUX digits model builds from scratch (``benchmarks/train_digits_flux.py``): its
tokenizer, the frozen tiny CLIP and T5 text encoders from their seeds and the untrained transformer.
The shipped model is loaded by ``spectrum_xdit.models.digits_flux`` from the files these produced."""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

from benchmarks import digits_data as dd
from benchmarks.digits_wan_builders import SPECIAL, build_tokenizer as build_word_tokenizer
from spectrum_xdit.models.digits_flux import MAX_SEQUENCE_LENGTH

WORDS = ("digit", "at") + tuple(dd.POSITIONS) + tuple(str(d) for d in range(10))
EOS_ID = SPECIAL.index("</s>")

# CLIP gives the pooled embedding (its hidden state at the first ``</s>``, which the causal mask lets
# see the whole prompt); T5 the per-token ones. Both frozen at their seeds' random weights.
TEXT_DIM = 64
CLIP_CONFIG = dict(
    vocab_size=32, hidden_size=TEXT_DIM, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=8, hidden_act="quick_gelu", pad_token_id=0, bos_token_id=EOS_ID, eos_token_id=EOS_ID,
)
T5_CONFIG = dict(
    vocab_size=32, d_model=TEXT_DIM, d_kv=16, d_ff=128, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=16, relative_attention_max_distance=32, dropout_rate=0.0,
    pad_token_id=0, eos_token_id=EOS_ID, decoder_start_token_id=0,
)
CLIP_SEED = 1234
T5_SEED = 1235

# 2 double-stream + 4 single-stream blocks of 4 heads x 32; head_dim 32 = the three rotary axes (8, 12, 12)
TRANSFORMER_CONFIG = dict(
    patch_size=1, in_channels=4, num_layers=2, num_single_layers=4, attention_head_dim=32, num_attention_heads=4,
    joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM, guidance_embeds=False, axes_dims_rope=(8, 12, 12),
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The word-level tokenizer over the still-image prompts (both encoders read its ids)."""
    return build_word_tokenizer(WORDS, MAX_SEQUENCE_LENGTH)


def build_clip(seed: int = CLIP_SEED) -> CLIPTextModel:
    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(**CLIP_CONFIG)).eval().requires_grad_(False)


def build_t5(seed: int = T5_SEED) -> T5EncoderModel:
    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(**T5_CONFIG)).eval().requires_grad_(False)


def build_transformer(seed: int = 0, **overrides) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    return FluxTransformer2DModel(**{**TRANSFORMER_CONFIG, **overrides})
