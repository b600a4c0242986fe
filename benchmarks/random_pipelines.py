"""Real diffusers architectures at published sizes with random weights, for speed benchmarks.

Latency does not depend on the weights, so the transformers use the published configs while
the text encoders are tiny (their cost is outside the denoising loop) and the tokenizers are
built locally (no hub). Used by benchmarks/profile_overhead.py and later end-to-end benches.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

# PixArt-Sigma-XL-2-1024-MS transformer config (diffusers), 1024x1024 -> 128x128 latents -> 4096 tokens.
PIXART_SIGMA_XL = dict(
    sample_size=128, num_layers=28, attention_head_dim=72, num_attention_heads=16, in_channels=4, out_channels=8,
    caption_channels=4096, cross_attention_dim=1152, norm_type="ada_norm_single", use_additional_conditions=False,
    patch_size=2, interpolation_scale=2, norm_elementwise_affine=False, norm_eps=1e-6, activation_fn="gelu-approximate",
    num_embeds_ada_norm=1000, attention_bias=True, upcast_attention=False, dropout=0.0,
)


def pixart_sigma_xl(device: str = "cuda", dtype: torch.dtype = torch.bfloat16, text_len: int = 300):
    """PixArtSigmaPipeline with the PixArt-Σ-XL transformer (random weights) and a tiny T5."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from tiny_models import _build_t5_tokenizer

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(**PIXART_SIGMA_XL)
    tokenizer = _build_t5_tokenizer(text_len)
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=4096, d_ff=64, d_kv=8, num_layers=1,
                                           num_heads=2, pad_token_id=tokenizer.pad_token_id))
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        norm_num_groups=4)
    pipe = PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)
