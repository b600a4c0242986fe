"""Host side of the Gluon head-wise kernel (``_gluon_impl.py``): when it can run, and one launch.

The kernel covers the case the Triton launch is slowest at relative to cuDNN: head dim 128 on Hopper
(FLUX-sized heads), full, window, arrow and skip heads in one launch, text tokens first.
``backend="auto"`` gives it every call :func:`check_gluon_inputs` passes (:func:`ditlens.kernels.headwise_attention`);
``backend="gluon"`` asks for it by name. On an H100 (session 35, BENCHMARKS.md §2): 0.97-0.99x cuDNN's SDPA
dense at FLUX-2K and FLUX-1K, where the Triton launch reaches 0.83-0.85x, and 1.81x / 3.38x SDPA for arrow heads
at 50 % / 75 % sparsity at FLUX-2K (Triton 1.46x / 2.80x). Run on Triton 3.6 (the GPU machine's); it also
lowers with Triton 3.9, whose Gluon renamed the TMA copies (tested on the CPU, not yet run on a GPU there).
"""

from __future__ import annotations

import functools
import importlib
import math

import torch

from ditlens.errors import DitlensError
from ditlens.kernels.graph_constants import graph_constant
from ditlens.kernels.patterns import HeadPlan, TokenLayout
from ditlens.kernels.triton_backend import (
    SUPPORTED_DTYPES,
    _compute_capability,
    _plan_tensors,
    interpreting,
    output_like,
)

GLUON_HEAD_DIM = 128
BLOCK_M = 128  # query rows per program: two warpgroups of 64
BLOCK_N = 128  # keys per K/V block
STAGES = 3  # K/V ring depth: two stages leave the warpgroups waiting on each other (0.84x SDPA, not 0.99x)
LOADER_REGS = 24


@functools.cache
def gluon_available() -> bool:
    """Whether this triton ships Gluon with the Hopper ops the kernel uses (Triton >= 3.6)."""
    try:
        importlib.import_module("triton.experimental.gluon.language.nvidia.hopper")
        importlib.import_module("triton.experimental.gluon.nvidia.hopper")
    except ImportError:
        return False
    return True


def gluon_machine_refusal(device: torch.device | None = None) -> str | None:
    """Why this process cannot run the Gluon kernel on ``device`` (the current CUDA device by
    default); None if it can."""
    if not gluon_available():
        return "this triton has no Gluon (Triton >= 3.6 needed)"
    if not torch.cuda.is_available():
        return "no CUDA device"
    if interpreting():
        return "TRITON_INTERPRET=1 is set, and Gluon kernels have no interpreter"
    index = torch.cuda.current_device() if device is None or device.index is None else device.index
    major, minor = _compute_capability(index)  # cached: the automatic dispatch asks at every call
    if major != 9:
        return f"the Gluon kernel uses Hopper's wgmma (sm_90), this GPU is sm_{major}{minor}"
    return None


def check_gluon_inputs(q: torch.Tensor, plan: HeadPlan | None = None,
                       layout: TokenLayout | None = None) -> str | None:
    """Why the Gluon kernel cannot take ``q`` [B, H, L, D] (with ``plan`` and ``layout``, when given);
    None if it can.

    Shape and plan first, then the machine: a caller learns what to change in its input even on a
    machine that could not run the kernel anyway."""
    if q.dtype not in SUPPORTED_DTYPES:
        return f"the Gluon kernel takes float16/bfloat16, got {q.dtype}"
    if q.shape[-1] != GLUON_HEAD_DIM:
        return f"the Gluon kernel takes head_dim {GLUON_HEAD_DIM}, got {q.shape[-1]}"
    if q.shape[2] % BLOCK_M:
        return f"the Gluon kernel takes sequence lengths that are multiples of {BLOCK_M}, got {q.shape[2]}"
    banded = plan is not None and any(m in ("window", "arrow") for m in plan.modes)
    if banded and layout is not None and layout.n_text:
        if not layout.text_first:
            return "the Gluon kernel's window and arrow heads need the text tokens first (FLUX), not last"
        if layout.n_text % BLOCK_M:
            return f"the Gluon kernel's window and arrow heads need n_text a multiple of {BLOCK_M}, got {layout.n_text}"
    if not q.is_cuda:
        return f"the Gluon kernel runs on CUDA tensors, got {q.device}"
    return gluon_machine_refusal(q.device)


def _token_view(t: torch.Tensor) -> tuple[torch.Tensor, int, int, int] | None:
    """``t`` [B, H, L, D] as a 2-D [rows, columns] view the kernel's descriptors read in place, with the
    rows per batch, rows per head and columns per head; None for other memory orders (and for a start
    that is not 16-byte aligned, which TMA cannot read)."""
    B, H, L, D = t.shape

    def strides_are(*expected: int) -> bool:  # a size-1 dimension's stride is arbitrary
        return all(n == 1 or st == e for n, st, e in zip(t.shape, t.stride(), expected))

    if t.data_ptr() % 16:
        return None
    if strides_are(H * L * D, L * D, D, 1):  # contiguous [B, H, L, D]
        found = t.reshape(B * H * L, D), H * L, L, 0
    elif strides_are(L * H * D, D, H * D, 1):  # [B, L, H, D] storage: diffusers' head views
        found = t.transpose(1, 2).reshape(B * L, H * D), L, 0, D
    else:
        return None
    return found if found[0].data_ptr() == t.data_ptr() else None  # reshape gave a view, not a copy


def _views(*ts: torch.Tensor) -> list[tuple[torch.Tensor, int, int, int]]:
    """Token views of tensors that must share one memory order (K and V); contiguous copies otherwise."""
    views = [_token_view(t) for t in ts]
    if any(v is None for v in views) or len({v[1:] for v in views}) > 1:
        views = [_token_view(_fresh(t)) for t in ts]
    return views


def _fresh(t: torch.Tensor) -> torch.Tensor:
    """A new contiguous copy (``contiguous()`` would return a misaligned contiguous tensor itself)."""
    return t.clone(memory_format=torch.contiguous_format)


def _descriptor(view: torch.Tensor, block: list[int]):
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    dtype = gl.bfloat16 if view.dtype == torch.bfloat16 else gl.float16
    return TensorDescriptor.from_tensor(view, block, gl.NVMMASharedLayout.get_default_for(block, dtype))


def tile_key_blocks(mode: str, window: int, tile_r0: int, layout: TokenLayout) -> int:
    """Key blocks the kernel's 128-row query tile at ``tile_r0`` visits for a head of ``mode`` and half-width
    ``window`` (``_gluon_impl._key_blocks`` on the host): every block for full heads and arrow heads' text
    tiles, the text blocks for window heads' text tiles, else the text blocks (arrow) and the band's blocks;
    none for skip heads. Not :func:`ditlens.kernels.waves.query_block_work`: that counts the Triton launch's
    walk, which starts at the band's first key, where this kernel starts at the block boundary below it (one
    block more for an unaligned band)."""
    n_blocks = layout.seq_len // BLOCK_N
    n_text = layout.n_text if layout.text_first else 0
    text_tile = tile_r0 < n_text
    if mode == "skip":
        return 0
    if mode == "full" or (mode == "arrow" and text_tile):
        return n_blocks
    n_text_blocks = n_text // BLOCK_N if text_tile or mode == "arrow" else 0
    if text_tile:
        return n_text_blocks
    lo = max(tile_r0 - window, n_text) // BLOCK_N
    hi = min(tile_r0 + BLOCK_M - 1 + window, layout.seq_len - 1) // BLOCK_N
    return n_text_blocks + hi + 1 - lo


TILE_ORDERS = ("grid", "full-first", "longest")


@functools.lru_cache(maxsize=256)
def _tile_order(plan: HeadPlan, layout: TokenLayout, batch: int, device: torch.device,
                policy: str = "longest") -> torch.Tensor:
    """Every (batch, head, tile) of a launch, packed as (b * heads + h) * tiles + m, in the order ``policy``
    names. ``"grid"``: the packed index itself, the order of the launch grid. ``"longest"``: by decreasing
    key blocks (longest-processing-time scheduling), ties in head, batch, tile order. ``"full-first"``: the
    tiles that walk every key block (full heads, arrow heads' text tiles) first, then the rest, each group in
    grid order (batch, head, tile: one head's tiles after another, so that the programs in flight share one
    head's K/V in L2). In grid order the long tiles end a launch late (FLUX's arrow heads: 4 text tiles of
    132 key blocks beside image tiles of about 33, the last head's started near the end). Exact longest-first
    spreads the image tiles in flight over many heads instead (FLUX-2K 50 %: 14 in a list-scheduling model,
    ``benchmarks/gluon_tail_model.py``, against 2 in grid order), and their K/V bands no longer fit in L2.
    On the H100 (``benchmarks/tile_order_ab.py``, 7 interleaved rounds; BENCHMARKS.md §2, "Session 38")
    ``"longest"`` ran FLUX-2K 25 % and 50 % at 0.84x and 0.92x grid order's speed, and ``"full-first"`` ran
    every FLUX plan at 1.01-1.19x (FLUX-2K 75 % 1.04x, 90 % 1.11x, FLUX-1K 75 % 1.19x) but FLUX-1K 25 %
    (0.985x, rounds 0.95-1.01x): it is the API's order."""
    if policy not in TILE_ORDERS:
        raise DitlensError(f"tile order must be one of {TILE_ORDERS}, got {policy!r}")
    tiles = layout.seq_len // BLOCK_M
    n_blocks = layout.seq_len // BLOCK_N
    blocks = [[tile_key_blocks(mode, window, m * BLOCK_M, layout) for m in range(tiles)]
              for mode, window in zip(plan.modes, plan.windows)]

    def key(packed: int) -> tuple:
        bh, m = divmod(packed, tiles)
        b, h = divmod(bh, plan.n_heads)
        if policy == "full-first":
            return -int(blocks[h][m] == n_blocks), packed
        if policy == "longest":
            return -blocks[h][m], h, b, m
        return (packed,)

    packed = sorted(range(batch * plan.n_heads * tiles), key=key)
    return torch.tensor(packed, dtype=torch.int32, device=device)


def headwise_gluon(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: HeadPlan, layout: TokenLayout,
                   scale: float, cached: torch.Tensor | None = None, out: torch.Tensor | None = None,
                   tile_order: str = "full-first", residual: torch.Tensor | None = None,
                   subtract: bool = False) -> torch.Tensor:
    """Head-wise attention of q, k, v [B, H, L, 128] on an sm_90 GPU, every head's mode (full, window,
    arrow, skip) in one launch (``check_gluon_inputs(q, plan, layout)`` passed); skip heads copy their
    rows of ``cached`` (q's shape, needed when the plan has skip heads). ``tile_order``: the order the
    GPU starts the tiles in (``"grid"``, ``"full-first"``, ``"longest"``: :func:`_tile_order`; the results are
    bit-identical in every order, H100); the default, the API's, is ``"full-first"``. ``residual``
    (q's shape, no skip heads; read in q's dtype): added to the attention in float32 in the epilogue
    (WA-RS apply, W + R), or with ``subtract`` the result is ``residual - attention`` (WA-RS refresh,
    R = O - W); the apply launch costs what the windowed launch alone does (FLUX-2K at 50 %: 2.91 against
    2.92 ms, H100, session 36).

    Returns [B, H, L, 128] in q's dtype, in q's memory order (or ``out``, which must have that
    order): contiguous inputs and diffusers' [B, L, H, D]-stored views are read and written in
    place; other layouts (or starts TMA cannot read) are copied first.
    """
    B, H, L, D = q.shape
    q_view = _token_view(q)
    if q_view is None:
        q = _fresh(q)
        q_view = _token_view(q)
    if out is None:
        out = output_like(q)  # token-major for diffusers' views, contiguous otherwise: q's own geometry
    same_kind = out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    o_view = _token_view(out) if same_kind else None
    if o_view is None or o_view[1:] != q_view[1:]:
        raise DitlensError(f"out must be a {q.dtype} tensor of q's shape {tuple(q.shape)} on {q.device} in q's "
                           f"memory order (strides {q.stride()}); got {out.dtype} {tuple(out.shape)} on {out.device} "
                           f"with strides {out.stride()}")
    (k_view, kv_rows_b, kv_rows_h, kv_cols_h), (v_view, *_) = _views(k, v)
    if residual is not None:
        if plan.has_skip or residual.shape != q.shape:
            raise DitlensError(f"a residual launch takes a residual of q's shape {tuple(q.shape)} and no skip heads; "
                               f"got {tuple(residual.shape)} and modes {sorted(set(plan.modes))}")
        aux_view = _views(residual.to(q.dtype))[0]
    elif plan.has_skip:
        if cached is None or cached.shape != q.shape:
            raise DitlensError(f"skip heads need cached=<tensor of q's shape {tuple(q.shape)}> holding their outputs")
        aux_view = _views(cached.to(q.dtype))[0]
    else:
        aux_view = o_view  # never read
    from ditlens.kernels._gluon_impl import headwise_fwd  # Gluon is imported only where a launch follows

    per_head = graph_constant(_plan_tensors(plan, layout, q.device))  # cached; kept alive by a graph capture
    if tile_order not in TILE_ORDERS:  # checked here too: grid order and all-full launches build no order
        raise DitlensError(f"tile_order must be one of {TILE_ORDERS}, got {tile_order!r}")
    # grid order needs no table (the kernel maps its own program ids), nor does an all-full launch: its
    # tiles are all alike
    ordered = tile_order != "grid" and not plan.all_full
    order = graph_constant(_tile_order(plan, layout, B, q.device, tile_order)) if ordered else per_head.order
    half = [BLOCK_M // 2, D]
    grid = (L // BLOCK_M, B * H)
    headwise_fwd[grid](_descriptor(q_view[0], half), _descriptor(k_view, [BLOCK_N, D]),
                       _descriptor(v_view, [BLOCK_N, D]), _descriptor(o_view[0], half), _descriptor(aux_view[0], half),
                       per_head.mode, per_head.window, order, scale * math.log2(math.e), L,
                       layout.n_text if layout.text_first else 0, H, *q_view[1:], kv_rows_b, kv_rows_h, kv_cols_h,
                       *aux_view[1:], ALL_FULL=plan.all_full, HAS_SKIP=plan.has_skip,
                       HEAVY_FIRST=ordered,
                       RESIDUAL=0 if residual is None else 2 if subtract else 1, STAGES=STAGES,
                       LOADER_REGS=LOADER_REGS, num_warps=4)
    return out
