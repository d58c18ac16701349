"""What training the digits model builds from scratch (``benchmarks/train_digits_wan.py``): its
tokenizer, the frozen tiny UMT5 text encoder from its seed and the untrained transformer. The
shipped model is loaded by ``spectrum_xdit.models.digits_wan`` from the files these produced."""

from __future__ import annotations

import torch
from diffusers import WanTransformer3DModel
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from spectrum_xdit.models.digits_wan import MAX_SEQUENCE_LENGTH

WORDS = ("digit", "moving", "left", "right", "up", "down") + tuple(str(d) for d in range(10))
SPECIAL = ("<pad>", "</s>", "<unk>")

TEXT_ENCODER_CONFIG = dict(
    vocab_size=32, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
    relative_attention_num_buckets=16, relative_attention_max_distance=32, dropout_rate=0.0,
    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
)
TEXT_ENCODER_SEED = 1234

VAE_CONFIG = dict(z_dim=16, latents_mean=[0.0] * 16, latents_std=[1.0] * 16, scale_factor_temporal=4,
                  scale_factor_spatial=2)

TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=6, attention_head_dim=32, in_channels=16, out_channels=16,
    text_dim=TEXT_ENCODER_CONFIG["d_model"], freq_dim=64, ffn_dim=768, num_layers=4,
    cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64,
)


def build_tokenizer(words: tuple[str, ...] = WORDS,
                    model_max_length: int = MAX_SEQUENCE_LENGTH) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over a prompt vocabulary (ids: ``SPECIAL``, then ``words``); appends
    ``</s>`` like T5/UMT5. The defaults are the digits Wan model's."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=model_max_length)


def build_text_encoder(seed: int = TEXT_ENCODER_SEED) -> UMT5EncoderModel:
    """The frozen tiny UMT5 encoder from its seed (training builds it once and ships its weights)."""
    torch.manual_seed(seed)
    model = UMT5EncoderModel(UMT5Config(**TEXT_ENCODER_CONFIG)).eval()
    model.requires_grad_(False)
    return model


def build_transformer(seed: int = 0, **overrides) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(**{**TRANSFORMER_CONFIG, **overrides})
