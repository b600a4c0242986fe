"""Float64 dense-masked references: the ground truth every fast backend is tested against.

They materialise the ``[B, H, L, L]`` score matrix, so keep ``L`` small (tests use a few
hundred tokens at most).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ditlens.errors import DitlensError
from ditlens.kernels.patterns import TokenLayout, attention_mask, make_head_plan


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise DitlensError(
            f"q, k, v must all be [B, H, L, D] of one shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )


def _dense_masked_f64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v in float64; fully masked rows give 0."""
    q64, k64, v64 = q.double(), k.double(), v.double()
    scores = torch.einsum("bhld,bhmd->bhlm", q64, k64) * scale
    scores = scores.masked_fill(~mask[None], float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    weights = weights / torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.einsum("bhlm,bhmd->bhld", weights, v64)


def headwise_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                                 modes: Sequence[str] | str, windows: Sequence[int] | int | None,
                                 n_text: int = 0, text_first: bool = False,
                                 cached: torch.Tensor | None = None, scale: float | None = None,
                                 backend: str = "reference",
                                 out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dense float64 version of :func:`ditlens.kernels.headwise_attention` (same arguments).

    ``backend`` is accepted for signature compatibility and ignored. Returns ``q.dtype``
    unless ``out_dtype`` is given (``torch.float64`` keeps the exact values).
    """
    _check_qkv(q, k, v)
    B, H, L, D = q.shape
    plan = make_head_plan(modes, windows, H, L)
    TokenLayout(L, n_text, text_first)  # validates n_text
    scale = D ** -0.5 if scale is None else float(scale)
    mask = attention_mask(plan.modes, plan.windows, L, n_text=n_text, text_first=text_first, device=q.device)
    out = _dense_masked_f64(q, k, v, mask, scale)
    if plan.has_skip:
        if cached is None or cached.shape != q.shape:
            raise DitlensError("skip heads need cached=<tensor of q's shape [B, H, L, D]> holding their outputs")
        skip = torch.tensor([m == "skip" for m in plan.modes], device=q.device)
        out[:, skip] = cached[:, skip].double()
    return out.to(out_dtype or q.dtype)


def warsr_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                              windows: Sequence[int] | int, n_text: int = 0, text_first: bool = False,
                              pattern: Sequence[str] | str = "window", scale: float | None = None,
                              out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 ``(O, R)`` with ``O`` full attention and ``R = O - W``, ``W`` the windowed output."""
    B, H, L, D = q.shape
    full = headwise_attention_reference(q, k, v, modes="full", windows=0, n_text=n_text,
                                        text_first=text_first, scale=scale, out_dtype=torch.float64)
    win = headwise_attention_reference(q, k, v, modes=pattern, windows=windows, n_text=n_text,
                                       text_first=text_first, scale=scale, out_dtype=torch.float64)
    dtype = out_dtype or q.dtype
    return full.to(dtype), (full - win).to(dtype)


def windowed_plus_residual_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                     residual: torch.Tensor, *, windows: Sequence[int] | int,
                                     n_text: int = 0, text_first: bool = False,
                                     pattern: Sequence[str] | str = "window", scale: float | None = None,
                                     out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Float64 ``W + R`` (the WA-RS apply step)."""
    win = headwise_attention_reference(q, k, v, modes=pattern, windows=windows, n_text=n_text,
                                       text_first=text_first, scale=scale, out_dtype=torch.float64)
    return (win + residual.double()).to(out_dtype or q.dtype)
