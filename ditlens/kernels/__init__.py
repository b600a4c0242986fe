"""Head-wise sparse attention kernels, their float64 references and the backend dispatch.

Main entry point, used by the compression runtime::

    out = headwise_attention(q, k, v, modes=["full", "arrow", "skip", ...], windows=[0, 512, 0, ...],
                             n_text=512, text_first=True, cached=prev_out)   # q, k, v, out: [B, H, L, D]

Patterns (DESIGN.md §5; details in :mod:`ditlens.kernels.patterns`): ``full``; ``window(w)`` =
image-image pairs with ``|i - j| <= w`` plus text-text pairs; ``arrow(w)`` = the band plus every
pair with a text query or a text key; ``skip`` = copy the head's output from ``cached``.
2D neighbourhoods on the token grid (``window2d(r)``) have their own call and kernel::

    out = window2d_attention(q, k, v, radius=[8, 16, ...], grid=(64, 64), n_text=512, text_first=True)

Backends: ``triton`` (one fused launch for all heads, block-sparse with analytic per-head key
ranges; CUDA, or the CPU interpreter with ``TRITON_INTERPRET=1``), ``flex`` (FlexAttention with
a block mask from the same pattern functions), ``sdpa`` (dense boolean mask), ``reference``
(float64). ``backend="auto"`` picks the first that fits. ``gluon``: every head mode at head dim 128 on a
Hopper GPU, FlashAttention-3's warp-group schedule written in Gluon (0.97-0.99x cuDNN dense at FLUX-2K and
FLUX-1K where the Triton launch reaches 0.83-0.85x); ``"auto"`` hands it the Triton calls it can take.
"""

from ditlens.kernels.api import (
    BACKENDS,
    available_backends,
    headwise_attention,
    resolve_backend,
    warsr_attention,
    windowed_plus_residual,
)
from ditlens.kernels.patterns import (
    MODES,
    HeadPlan,
    TokenLayout,
    arrow_pattern,
    attended_pairs,
    attention_mask,
    band_pairs,
    full_pattern,
    headwise_mask_mod,
    skip_pattern,
    window_for_sparsity,
    window_pattern,
)
from ditlens.kernels.reference import (
    headwise_attention_reference,
    warsr_attention_reference,
    windowed_plus_residual_reference,
)
from ditlens.kernels.triton_backend import KernelConfig
from ditlens.kernels.window2d import (
    Window2dConfig,
    window2d_attention,
    window2d_attention_reference,
    window2d_mask,
    window2d_pairs,
)

__all__ = [
    "BACKENDS",
    "MODES",
    "HeadPlan",
    "KernelConfig",
    "TokenLayout",
    "Window2dConfig",
    "arrow_pattern",
    "attended_pairs",
    "attention_mask",
    "available_backends",
    "band_pairs",
    "full_pattern",
    "headwise_attention",
    "headwise_attention_reference",
    "headwise_mask_mod",
    "resolve_backend",
    "skip_pattern",
    "warsr_attention",
    "warsr_attention_reference",
    "window_for_sparsity",
    "window_pattern",
    "windowed_plus_residual",
    "window2d_attention",
    "window2d_attention_reference",
    "window2d_mask",
    "window2d_pairs",
    "windowed_plus_residual_reference",
]
