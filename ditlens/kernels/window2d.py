"""2D neighbourhood attention (``window2d``): one call, every backend, its mask and its exact pair count.

DESIGN §5: image query (row r, col c) attends image key (r', c') iff ``|r - r'| <= radius`` and
``|c - c'| <= radius`` on the token grid, in every frame (frames unrestricted); with text tokens in
the sequence (joint attention) text attends text and no pair mixes text and image, as for ``window``.

Image tokens are laid out frame-major then row-major (``token = image_start + (f * rows + r) *
cols + c``), as diffusers' patch embeddings flatten them. The Triton kernel reads them as tiles
of the grid (:mod:`ditlens.kernels._triton_window2d`); FlexAttention and SDPA run the same mask
function; the float64 reference materialises it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ditlens.errors import DitlensError
from ditlens.kernels.graph_constants import graph_constant
from ditlens.kernels.patterns import TokenLayout, band_pairs
from ditlens.kernels.reference import _dense_masked_f64

Grid = tuple[int, int, int]


@dataclass(frozen=True)
class Window2dConfig:
    """Tiles of the Triton kernel: a query block is a ``q_rows x q_cols`` tile of the grid, a key block
    ``k_rows x k_cols`` (each product a power of two, at least 16)."""

    q_rows: int = 16
    q_cols: int = 8
    k_rows: int = 8
    k_cols: int = 8
    num_warps: int = 4
    num_stages: int = 2
    # image K/V tiles through 3D tensor descriptors (Hopper's copy engine; the interpreter too): no per-thread
    # addresses for the gathers, which spill registers at D = 128 (benchmarks/kernel_resources.py)
    tma: bool = False

    @property
    def block_m(self) -> int:
        return self.q_rows * self.q_cols

    @property
    def block_n(self) -> int:
        return self.k_rows * self.k_cols


# Chosen from `bash benchmarks/gpu_checks.sh OUT window2d` (H200, Triton 3.6, session 16; BENCHMARKS.md §2):
# 128-query tiles (16 x 8) against 8 x 8 key tiles through descriptors were fastest at 1,024 x 1,024
# images for D = 72 and 128 (FLUX-2K 75 %: 2.90 ms against 3.75 ms for the earlier 8x8 / 8x16 guess);
# grids of <= 32 x 32 tokens (DiT-512) run 64-query tiles with gathers and three stages.
_GPU_CONFIG = Window2dConfig(16, 8, 8, 8, 4, 2, tma=True)
_SHORT_GPU_CONFIG = Window2dConfig(8, 8, 8, 8, 4, 3)
_SHORT_IMAGE_TOKENS = 32 * 32
_INTERPRETER_CONFIG = Window2dConfig(4, 4, 4, 4, 1, 1)


def normalize_grid(grid: Sequence[int], n_image: int) -> Grid:
    """``(frames, rows, cols)`` from a 2- or 3-entry grid, checked against the image tokens."""
    g = tuple(int(x) for x in grid)
    if len(g) == 2:
        g = (1, *g)
    if len(g) != 3 or min(g) < 1:
        raise DitlensError(f"grid must be (rows, cols) or (frames, rows, cols) of positive sizes, got {tuple(grid)}")
    if g[0] * g[1] * g[2] != n_image:
        raise DitlensError(f"grid {g} holds {g[0] * g[1] * g[2]} image tokens but the sequence has {n_image} "
                           "(seq_len - n_text); pass the grid of this call")
    return g  # type: ignore[return-value]


def _radii(radius: Sequence[int] | int, n_heads: int) -> tuple[int, ...]:
    out = (int(radius),) * n_heads if isinstance(radius, int) else tuple(int(r) for r in radius)
    if len(out) != n_heads:
        raise DitlensError(f"radius has {len(out)} entries but the input has {n_heads} heads; pass one per head")
    if min(out) < 0:
        raise DitlensError(f"window2d radius must be >= 0, got {min(out)}")
    return out


def window2d_pattern(q_idx: torch.Tensor, kv_idx: torch.Tensor, radius: int | torch.Tensor, grid: Grid,
                     layout: TokenLayout) -> torch.Tensor:
    """True where token ``q_idx`` attends token ``kv_idx`` (broadcastable index tensors)."""
    _, rows, cols = grid
    lo, hi = layout.image_start, layout.image_end
    q_img = (q_idx >= lo) & (q_idx < hi)
    k_img = (kv_idx >= lo) & (kv_idx < hi)
    qi, ki = (q_idx - lo) % (rows * cols), (kv_idx - lo) % (rows * cols)
    near = ((qi // cols - ki // cols).abs() <= radius) & ((qi % cols - ki % cols).abs() <= radius)
    return (q_img & k_img & near) | (~q_img & ~k_img)


def window2d_mask(radius: Sequence[int] | int, grid: Sequence[int], seq_len: int, *, n_text: int = 0,
                  text_first: bool = False, n_heads: int | None = None,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """The dense boolean mask ``[H, L, L]`` (``n_heads`` needed when ``radius`` is one int)."""
    if n_heads is None:
        if isinstance(radius, int):
            raise DitlensError("window2d_mask needs n_heads when radius is a single int")
        n_heads = len(radius)
    layout = TokenLayout(seq_len, n_text, text_first)
    g = normalize_grid(grid, layout.n_image)
    idx = torch.arange(seq_len, device=device)
    return torch.stack([window2d_pattern(idx[:, None], idx[None, :], r, g, layout)
                        for r in _radii(radius, n_heads)])


def window2d_pairs(radius: int, grid: Sequence[int], n_text: int = 0) -> int:
    """Exact attended pairs of one head: ``F^2 * band(rows, r) * band(cols, r) + n_text^2``."""
    frames, rows, cols = (1, *grid) if len(grid) == 2 else grid
    return frames * frames * band_pairs(rows, radius) * band_pairs(cols, radius) + n_text * n_text


def window2d_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                                 radius: Sequence[int] | int, grid: Sequence[int], n_text: int = 0,
                                 text_first: bool = False, scale: float | None = None,
                                 out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Float64 dense-masked :func:`window2d_attention` (same arguments; ``out_dtype`` defaults to q's)."""
    _, H, L, D = q.shape
    mask = window2d_mask(radius, grid, L, n_text=n_text, text_first=text_first, n_heads=H, device=q.device)
    out = _dense_masked_f64(q, k, v, mask, D ** -0.5 if scale is None else float(scale))
    return out.to(out_dtype or q.dtype)


def window2d_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, radius: Sequence[int] | int,
                       grid: Sequence[int], n_text: int = 0, text_first: bool = False, scale: float | None = None,
                       backend: str = "auto", config: Window2dConfig | None = None) -> torch.Tensor:
    """2D neighbourhood attention of tokens on a grid, per head radius, in one launch.

    Parameters:
        q, k, v: ``[batch, heads, seq_len, head_dim]``, one dtype and device (as
            :func:`ditlens.kernels.headwise_attention`; diffusers' ``[B, L, H, D]`` views run in place).
        radius: Half-width ``r >= 0`` on the grid per head (or one int): query (row, col) attends keys
            with ``|row - row'| <= r`` and ``|col - col'| <= r``. A radius that covers the grid is full
            image attention.
        grid: ``(rows, cols)`` or ``(frames, rows, cols)`` of the image tokens, with
            ``frames * rows * cols == seq_len - n_text``, tokens frame-major then row-major. Frames are
            unrestricted (every frame's keys within the radius).
        n_text, text_first: ``n_text`` text tokens at the start (True) or end of the sequence; text
            attends text only.
        scale: Softmax scale; defaults to ``head_dim ** -0.5``.
        backend: ``"auto"`` (Triton -> FlexAttention -> SDPA, as :func:`ditlens.kernels.resolve_backend`),
            ``"triton"``, ``"flex"``, ``"sdpa"`` or ``"reference"`` (float64 dense, slow).
        config: Triton tiles (:class:`Window2dConfig`); default by grid size.

    Returns:
        ``[batch, heads, seq_len, head_dim]`` in q's dtype (Triton: laid out like q).
    """
    from ditlens.kernels.api import _prepare, resolve_backend

    _prepare(q, k, v, "full", 0, n_text, text_first, scale)
    _, H, L, D = q.shape
    layout = TokenLayout(L, int(n_text), bool(text_first))
    g = normalize_grid(grid, layout.n_image)
    radii = _radii(radius, H)
    scale_f = D ** -0.5 if scale is None else float(scale)
    chosen = resolve_backend(q, backend)
    if chosen == "triton":
        return window2d_triton(q, k, v, radii, g, layout, scale_f, config)
    if chosen == "reference":
        return window2d_attention_reference(q, k, v, radius=radii, grid=g, n_text=n_text, text_first=text_first,
                                            scale=scale_f)
    if chosen == "flex":
        from ditlens.kernels.torch_backends import flex_function

        block_mask = graph_constant(flex_window2d_block_mask(radii, g, layout, str(q.device)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # eager (unfused) FlexAttention off CUDA: expected
            return flex_function(q.device)(q, k, v, block_mask=block_mask, scale=scale_f)
    mask = graph_constant(_dense_mask(radii, g, layout, str(q.device)))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None], scale=scale_f)


@functools.lru_cache(maxsize=8)
def _dense_mask(radii: tuple[int, ...], grid: Grid, layout: TokenLayout, device: str) -> torch.Tensor:
    return window2d_mask(radii, grid, layout.seq_len, n_text=layout.n_text, text_first=layout.text_first,
                         device=device)


@functools.lru_cache(maxsize=32)
def flex_window2d_block_mask(radii: tuple[int, ...], grid: Grid, layout: TokenLayout, device: str):
    """FlexAttention BlockMask of per-head radii on a grid (cached: building it costs a compile on CUDA)."""
    from torch.nn.attention.flex_attention import create_block_mask

    from ditlens.kernels.torch_backends import FLEX_BLOCK

    rad = torch.tensor(radii, dtype=torch.int64, device=device)

    def mask_mod(b, h, q_idx, kv_idx):
        return window2d_pattern(q_idx, kv_idx, rad[h], grid, layout)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return create_block_mask(mask_mod, B=None, H=len(radii), Q_LEN=layout.seq_len, KV_LEN=layout.seq_len,
                                 device=device, BLOCK_SIZE=FLEX_BLOCK, _compile=torch.device(device).type == "cuda")


def default_window2d_config(interpret: bool, n_image: int | None = None) -> Window2dConfig:
    """The tile config a launch uses when none is given. ``n_image``: image tokens per frame (rows x cols).
    The same tiles were fastest at D = 72 and 128, so the head dim picks nothing."""
    if interpret:
        return _INTERPRETER_CONFIG
    if n_image is not None and n_image <= _SHORT_IMAGE_TOKENS:
        return _SHORT_GPU_CONFIG
    return _GPU_CONFIG


def window2d_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, radii: tuple[int, ...], grid: Grid,
                    layout: TokenLayout, scale: float, config: Window2dConfig | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the window2d kernel: one program per query tile (and per text block) per (batch, head);
    ``out`` (optional, q's shape, unit stride on D) receives the result in place."""
    from ditlens.kernels.triton_backend import (LOG2E, _descriptor_scratch, _output, _unit_last, _use_tma,
                                                check_triton_inputs, triton_cdiv)

    reason = check_triton_inputs(q)
    if reason:
        raise DitlensError(f"{reason}; use backend='flex' or 'sdpa'")
    B, H, L, D = q.shape
    interpret = not q.is_cuda
    cfg = config or default_window2d_config(interpret, grid[1] * grid[2])
    frames, rows, cols = grid
    n_tr, n_tc = triton_cdiv(rows, cfg.q_rows), triton_cdiv(cols, cfg.q_cols)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    out = _output(q, out)
    rad = graph_constant(_radius_tensor(radii, q.device))
    tensors = (q, k, v, out)
    strides = tuple(t.stride() for t in tensors)
    n_tiles = frames * n_tr * n_tc + triton_cdiv(layout.n_text, cfg.block_m)
    use_tma = _use_tma(q, cfg)
    constants = window2d_launch_constants(D, strides, cfg, interpret, use_tma, layout.n_text > 0)
    with _descriptor_scratch(q.device) if use_tma else contextlib.nullcontext():
        _window2d_kernel()[(n_tiles, B * H)](
            *tensors, rad, *(x for st in strides for x in st[:2]),
            H, L, layout.image_start, layout.text_start, layout.text_end, frames, rows, cols, n_tr, n_tc,
            scale * LOG2E, **constants)
    return out


@functools.lru_cache(maxsize=1)
def _window2d_kernel():
    """The Triton kernel, imported on first use (so importing ditlens needs no triton)."""
    return importlib.import_module("ditlens.kernels._triton_window2d").window2d_fwd_kernel


@functools.lru_cache(maxsize=128)
def window2d_launch_constants(head_dim: int, strides: tuple[tuple[int, ...], ...], cfg: Window2dConfig,
                              interpret: bool, use_tma: bool, has_text: bool) -> dict:
    """The compile-time arguments of one window2d launch shape (``strides``: of q, k, v, out), worked out
    once per shape as the head-wise launch's are (host time per launch shows on a fast GPU)."""
    from ditlens.kernels.triton_backend import _needs_align_hint, split_head_dim

    for name, size in (("query", cfg.block_m), ("key", cfg.block_n)):
        if size < 16 or size & (size - 1):
            raise DitlensError(f"window2d {name} tiles must hold a power of two >= 16 tokens, got {size}")
    d0, d1 = split_head_dim(head_dim)
    return dict(HEAD_DIM=head_dim, SQ=strides[0][2], SK=strides[1][2], SV=strides[2][2], SO=strides[3][2],
                TQ_R=cfg.q_rows, TQ_C=cfg.q_cols, TK_R=cfg.k_rows, TK_C=cfg.k_cols, D0=d0, D1=max(d1, 16),
                HAS_D1=d1 > 0, UPCAST=interpret, HINT_ALIGN=_needs_align_hint(strides), USE_TMA=use_tma,
                HAS_TEXT=has_text, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


@functools.lru_cache(maxsize=64)
def _radius_tensor(radii: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(radii, dtype=torch.int32, device=device)
