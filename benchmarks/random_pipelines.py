"""Real diffusers architectures at published sizes with random weights, for speed benchmarks.

Latency does not depend on the weights, so the transformers use the published configs while
the text encoders are tiny (their cost is outside the denoising loop) and the tokenizers are
built locally (no hub). Used by benchmarks/profile_overhead.py and later end-to-end benches.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
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


# ------------------------------------------------------------------------------------------
# End-to-end latency models (benchmarks/e2e.py): published transformer and VAE configs, random
# weights built directly on the device; text encoders are timed on their own (encoders()) and the
# pipelines receive precomputed prompt embeddings, so no tokenizer or hub file is needed.
# ------------------------------------------------------------------------------------------

DIT_XL_2 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                sample_size=64, patch_size=2, norm_type="ada_norm_zero", num_embeds_ada_norm=1000)
SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SD3_VAE = dict(SD_VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
               scaling_factor=1.5305, shift_factor=0.0609)
FLUX_VAE = dict(SD3_VAE, scaling_factor=0.3611, shift_factor=0.1159)
# Text encoders: T5-XXL encoder, CLIP ViT-L/14 and OpenCLIP bigG/14 text towers.
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, feed_forward_proj="gated-gelu",
              vocab_size=32128)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, max_position_embeddings=77)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              projection_dim=1280, max_position_embeddings=77, hidden_act="gelu")


def _shrink(config: dict, smoke: bool, **small) -> dict:
    """``smoke``: the same architecture at toy width and depth (CPU checks of the benchmark code)."""
    return {**config, **small} if smoke else dict(config)


@dataclass
class E2EModel:
    """One benchmark model: the pipeline (random weights, on the device), how to call it with
    precomputed prompt embeddings, and which text encoders its prompts go through."""

    name: str
    pipe: object
    call_kwargs: dict
    height: int
    width: int
    guidance: float
    n_text: int
    encoders: list[tuple[str, int]]  # (encoder config name, tokens) run once per prompt (twice with CFG)
    plan_style: str  # "v1" (layer-wise WA-RS/ASC, DiT and PixArt) or "v2" (head-wise arrow + cache, MMDiT)
    fractions: tuple[float, ...]  # attention-FLOPs fractions of the papers' settings


def _on_device(device: str, dtype: torch.dtype):
    """Build modules directly on the device in ``dtype`` (random init there: seconds, not minutes)."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                yield
        finally:
            torch.set_default_dtype(old)

    return ctx()


def e2e_model(name: str, device: str = "cuda", dtype: torch.dtype = torch.bfloat16, smoke: bool = False) -> E2EModel:
    """``dit-xl-2-512``, ``pixart-sigma-xl-1024``, ``pixart-sigma-xl-2048``, ``sd3-medium-1024``,
    ``flux-dev-1024`` or ``flux-dev-2048``."""
    import diffusers as d

    torch.manual_seed(0)
    size = int(name.rsplit("-", 1)[1])
    if smoke:
        size = 128 if size <= 1024 else 256
    gen = torch.Generator("cpu").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cpu").to(device, dtype)

    # schedulers outside the device context: they keep their tables on the CPU
    dpm = d.DPMSolverMultistepScheduler()
    flow = d.FlowMatchEulerDiscreteScheduler(shift=3.0)
    flow_dynamic = d.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    with _on_device(device, dtype):
        if name.startswith("dit"):
            t = d.DiTTransformer2DModel(**_shrink(DIT_XL_2, smoke, num_layers=2, num_attention_heads=2,
                                                  attention_head_dim=16, sample_size=size // 8))
            vae = d.AutoencoderKL(**_shrink(SD_VAE, smoke, block_out_channels=(8, 8, 8, 8), norm_num_groups=4,
                                            layers_per_block=1))
            pipe = d.DiTPipeline(transformer=t, vae=vae, scheduler=dpm)
            kwargs = dict(class_labels=[207], guidance_scale=4.0)
            model = E2EModel(name, pipe, kwargs, size, size, 4.0, 0, [], "v1", (0.85, 0.69, 0.49, 0.34))
        elif name.startswith("pixart"):
            t = d.PixArtTransformer2DModel(**_shrink(
                dict(PIXART_SIGMA_XL, sample_size=size // 8, interpolation_scale=size // 512), smoke,
                num_layers=2, num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32, caption_channels=64))
            vae = d.AutoencoderKL(**_shrink(SD_VAE, smoke, block_out_channels=(8, 8, 8, 8), norm_num_groups=4,
                                            layers_per_block=1))
            pipe = d.PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=t,
                                         scheduler=dpm)
            n_text, width = 300, 64 if smoke else 4096
            kwargs = dict(prompt_embeds=randn(1, n_text, width), prompt_attention_mask=torch.ones(1, n_text, device=device),
                          negative_prompt_embeds=randn(1, n_text, width),
                          negative_prompt_attention_mask=torch.ones(1, n_text, device=device),
                          negative_prompt=None, guidance_scale=4.5, use_resolution_binning=False)
            fractions = (0.74, 0.52, 0.37) if size <= 1024 else (0.60, 0.36, 0.24)
            model = E2EModel(name, pipe, kwargs, size, size, 4.5, n_text, [("t5_xxl", 300)], "v1", fractions)
        elif name.startswith("sd3"):
            t = d.SD3Transformer2DModel(**_shrink(SD3_MEDIUM, smoke, num_layers=2, num_attention_heads=2,
                                                  attention_head_dim=16, caption_projection_dim=32,
                                                  joint_attention_dim=64, pooled_projection_dim=32))
            vae = d.AutoencoderKL(**_shrink(SD3_VAE, smoke, block_out_channels=(8, 8, 8, 8), norm_num_groups=4,
                                            layers_per_block=1))
            pipe = d.StableDiffusion3Pipeline(transformer=t, scheduler=flow,
                                              vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                              tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
            n_text, width, pooled = 333, 64 if smoke else 4096, 32 if smoke else 2048
            kwargs = dict(prompt_embeds=randn(1, n_text, width), negative_prompt_embeds=randn(1, n_text, width),
                          pooled_prompt_embeds=randn(1, pooled), negative_pooled_prompt_embeds=randn(1, pooled),
                          guidance_scale=7.0)
            model = E2EModel(name, pipe, kwargs, size, size, 7.0, n_text,
                             [("clip_l", 77), ("clip_g", 77), ("t5_xxl", 256)], "v2", (0.75, 0.5, 0.32))
        elif name.startswith("flux"):
            t = d.FluxTransformer2DModel(**_shrink(FLUX_DEV, smoke, num_layers=1, num_single_layers=2,
                                                   num_attention_heads=2, attention_head_dim=16,
                                                   axes_dims_rope=(4, 6, 6), joint_attention_dim=64,
                                                   pooled_projection_dim=32))
            vae = d.AutoencoderKL(**_shrink(FLUX_VAE, smoke, block_out_channels=(8, 8, 8, 8), norm_num_groups=4,
                                            layers_per_block=1))
            pipe = d.FluxPipeline(scheduler=flow_dynamic,
                                  vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                  transformer=t)
            n_text, width, pooled = 512, 64 if smoke else 4096, 32 if smoke else 768
            kwargs = dict(prompt_embeds=randn(1, n_text, width), pooled_prompt_embeds=randn(1, pooled),
                          guidance_scale=3.5, max_sequence_length=n_text)
            model = E2EModel(name, pipe, kwargs, size, size, 1.0, n_text, [("clip_l", 77), ("t5_xxl", 512)], "v2",
                             (0.5, 0.32))
        else:
            raise SystemExit(f"unknown e2e model {name!r}")
    pipe.set_progress_bar_config(disable=True)
    return model


def text_encoder(kind: str, device: str = "cuda", dtype: torch.dtype = torch.bfloat16, smoke: bool = False):
    """A random-weight text encoder of a published size: ``t5_xxl``, ``clip_l`` or ``clip_g``."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(0)
    with _on_device(device, dtype):
        if kind == "t5_xxl":
            cfg = dict(T5_XXL, **({"d_model": 32, "d_ff": 64, "num_heads": 2, "num_layers": 1} if smoke else {}))
            return T5EncoderModel(T5Config(**cfg)).eval()
        base = CLIP_L if kind == "clip_l" else CLIP_G
        cfg = dict(base, **({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                             "num_attention_heads": 2, "projection_dim": 32} if smoke else {}))
        return CLIPTextModelWithProjection(CLIPTextConfig(**cfg)).eval()
