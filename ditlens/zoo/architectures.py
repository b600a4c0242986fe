"""The architectures and noise schedules of the embedded models, shared by training and loading."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from diffusers import (
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
)

from .data import CANVAS_SIZE, NUM_CLASSES
from .text import TinyTextEncoder, WordTokenizer, default_vocabulary

DIT_IMAGE_SIZE = 32  # Fashion-MNIST's 28x28 padded by 2 pixels on each side


@dataclass(frozen=True)
class TinyDiTArchitecture:
    """DiT-style, pixel space: 32x32x1, patch 2 -> 256 image tokens."""

    num_attention_heads: int = 6
    attention_head_dim: int = 32
    num_layers: int = 6
    patch_size: int = 2
    in_channels: int = 1
    sample_size: int = DIT_IMAGE_SIZE
    num_classes: int = NUM_CLASSES


@dataclass(frozen=True)
class TinyMMDiTArchitecture:
    """SD3-style, pixel space: 64x64x3, patch 2 -> 1024 image tokens, + up to 32 text tokens."""

    num_attention_heads: int = 4
    attention_head_dim: int = 48
    num_layers: int = 5
    patch_size: int = 2
    in_channels: int = 3
    sample_size: int = CANVAS_SIZE
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_max_length: int = 32
    joint_attention_dim: int = 128
    pooled_projection_dim: int = 128


def build_tiny_dit_transformer(arch: TinyDiTArchitecture = TinyDiTArchitecture()) -> DiTTransformer2DModel:
    return DiTTransformer2DModel(
        num_attention_heads=arch.num_attention_heads,
        attention_head_dim=arch.attention_head_dim,
        in_channels=arch.in_channels,
        out_channels=arch.in_channels,  # epsilon only: no learned variance
        num_layers=arch.num_layers,
        sample_size=arch.sample_size,
        patch_size=arch.patch_size,
        num_embeds_ada_norm=arch.num_classes,  # the label table gets one more row: the null class
        norm_type="ada_norm_zero",
    )


def build_tiny_dit_scheduler() -> DPMSolverMultistepScheduler:
    """DPM-Solver++(2M) over DDPM's linear beta schedule (the one training noises with)."""
    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="epsilon",
        algorithm_type="dpmsolver++",
        solver_order=2,
        lower_order_final=True,
    )


def build_tiny_mmdit_transformer(arch: TinyMMDiTArchitecture = TinyMMDiTArchitecture()) -> SD3Transformer2DModel:
    inner = arch.num_attention_heads * arch.attention_head_dim
    return SD3Transformer2DModel(
        sample_size=arch.sample_size,
        patch_size=arch.patch_size,
        in_channels=arch.in_channels,
        out_channels=arch.in_channels,
        num_layers=arch.num_layers,
        attention_head_dim=arch.attention_head_dim,
        num_attention_heads=arch.num_attention_heads,
        joint_attention_dim=arch.joint_attention_dim,
        caption_projection_dim=inner,
        pooled_projection_dim=arch.pooled_projection_dim,
        pos_embed_max_size=arch.sample_size // arch.patch_size,
        qk_norm="rms_norm",
    )


def build_tiny_mmdit_text(arch: TinyMMDiTArchitecture = TinyMMDiTArchitecture()) -> tuple[WordTokenizer, TinyTextEncoder]:
    tokenizer = WordTokenizer(default_vocabulary(), max_length=arch.text_max_length)
    encoder = TinyTextEncoder(
        vocab_size=tokenizer.vocab_size,
        max_length=arch.text_max_length,
        width=arch.text_width,
        num_layers=arch.text_layers,
        num_heads=arch.text_heads,
        joint_attention_dim=arch.joint_attention_dim,
        pooled_projection_dim=arch.pooled_projection_dim,
    )
    return tokenizer, encoder


# Flow-matching shift: >1 spends more of the 20 steps at high noise, where layout is decided.
MMDIT_FLOW_SHIFT = 2.0


def build_tiny_mmdit_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=MMDIT_FLOW_SHIFT)


def architecture_dict(arch: TinyDiTArchitecture | TinyMMDiTArchitecture) -> dict[str, int]:
    return asdict(arch)
