"""FlexAttention and SDPA backends (fallbacks behind the Triton kernels).

Both build their masks from the pattern functions in :mod:`ditlens.kernels.patterns`;
skip heads are computed as empty (FlexAttention skips their blocks) and filled from the
cache afterwards.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ditlens.errors import DitlensError
from ditlens.kernels.graph_constants import graph_constant
from ditlens.kernels.patterns import HeadPlan, TokenLayout, attention_mask, headwise_mask_mod

FLEX_BLOCK = 128


FLEX_MIN_HEAD_DIM = 16  # compiled FlexAttention refuses smaller head dims (inductor "NYI")


def flex_available() -> bool:
    """Whether torch ships FlexAttention."""
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def flex_refusal(q: torch.Tensor) -> str | None:
    """Why FlexAttention cannot take ``q`` (None if it can)."""
    if not flex_available():
        return "this torch has no FlexAttention"
    if q.is_cuda and q.shape[-1] < FLEX_MIN_HEAD_DIM:
        return f"compiled FlexAttention needs head_dim >= {FLEX_MIN_HEAD_DIM}, got {q.shape[-1]}"
    return None


@functools.lru_cache(maxsize=1)
def _compiled_flex() -> Callable[..., torch.Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_function(device: torch.device) -> Callable[..., torch.Tensor]:
    """Compiled FlexAttention on CUDA; the eager (slow, reference-grade) one elsewhere."""
    if device.type == "cuda":
        return _compiled_flex()
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


@functools.lru_cache(maxsize=32)
def flex_block_mask(plan: HeadPlan, layout: TokenLayout, device: str) -> Any:
    """The FlexAttention BlockMask of a plan (cached per plan, layout and device)."""
    from torch.nn.attention.flex_attention import create_block_mask

    mask_mod = headwise_mask_mod(plan, layout, device)
    L = layout.seq_len
    with warnings.catch_warnings():
        # _compile=True keeps the [H, L, L] mask from being materialised; newer torch deprecates the flag
        warnings.simplefilter("ignore", DeprecationWarning)
        return create_block_mask(mask_mod, B=None, H=plan.n_heads, Q_LEN=L, KV_LEN=L, device=device,
                                 BLOCK_SIZE=FLEX_BLOCK, _compile=torch.device(device).type == "cuda")


def _fill_skipped(out: torch.Tensor, plan: HeadPlan, cached: torch.Tensor | None) -> torch.Tensor:
    if plan.has_skip:
        if cached is None:
            raise DitlensError("skip heads need cached=<tensor of q's shape [B, H, L, D]> holding their outputs")
        idx = [h for h, m in enumerate(plan.modes) if m == "skip"]
        out[:, idx] = cached[:, idx].to(out.dtype)
    return out


def headwise_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: HeadPlan, layout: TokenLayout,
                  scale: float, cached: torch.Tensor | None = None) -> torch.Tensor:
    """Head-wise attention through FlexAttention with the plan's block mask."""
    if not flex_available():
        raise DitlensError("this torch has no FlexAttention; use backend='sdpa'")
    fn = flex_function(q.device)
    if all(m == "full" for m in plan.modes):
        block_mask = None
    else:
        block_mask = graph_constant(flex_block_mask(plan, layout, str(q.device)))
    with warnings.catch_warnings():
        # eager flex_attention on the CPU warns that it is unfused: expected there
        warnings.simplefilter("ignore", UserWarning)
        out = fn(q, k, v, block_mask=block_mask, scale=scale)
    return _fill_skipped(out, plan, cached)


@functools.lru_cache(maxsize=8)
def _dense_mask(plan: HeadPlan, layout: TokenLayout, device: str) -> torch.Tensor:
    mask = attention_mask(plan.modes, plan.windows, layout.seq_len, n_text=layout.n_text,
                          text_first=layout.text_first, device=device)
    if plan.has_skip:
        # an all-False row would give NaN: let skip heads attend everything, then overwrite them
        skip = torch.tensor([m == "skip" for m in plan.modes], device=device)
        mask = mask | skip[:, None, None]
    return mask


def headwise_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: HeadPlan, layout: TokenLayout,
                  scale: float, cached: torch.Tensor | None = None) -> torch.Tensor:
    """Head-wise attention through SDPA with a dense boolean mask (materialises [H, L, L])."""
    if all(m == "full" for m in plan.modes):
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    else:
        mask = graph_constant(_dense_mask(plan, layout, str(q.device)))  # built once: no host-to-device copy per call
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None], scale=scale)
    return _fill_skipped(out, plan, cached)
