"""Host side of the Triton kernels: configs, per-plan metadata, launches.

CUDA tensors run the compiled kernels; CPU tensors run the same kernels under Triton's
interpreter (slow; for tests). Each call is one launch for all heads.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
from dataclasses import dataclass, replace
from types import ModuleType

import torch

from ditlens.errors import DitlensError
from ditlens.kernels.graph_constants import graph_constant
from ditlens.kernels.launcher import LaunchCache
from ditlens.kernels.patterns import HeadPlan, TokenLayout, head_attended_pairs

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch options of the forward kernels."""

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    tma: bool = False  # K/V tiles through tensor descriptors (copy engine); used on sm_90+ and the interpreter
    # Triton's automatic warp specialization of the unmasked key loop (producer warps issue the loads,
    # consumer warp groups the dots); compiled GPU launches only, ignored by the interpreter.
    warp_specialize: bool = False
    # Pipeline depth of the masked edge loops (one or two blocks per segment); None: num_stages. One
    # stage was 3 % faster at PixArt-2K with pointer loads on an H200, but with tensor descriptors at
    # D = 72 it hit an illegal memory access (BENCHMARKS.md §2, session 13), so not by default.
    edge_stages: int | None = None
    # Each key segment in one pipelined loop, its edge blocks masked in a uniform branch, instead of three
    # loops (masked head blocks, unmasked run, masked tail blocks), each of which drains and refills the
    # copy pipeline. With K/V through descriptors it is the faster walk (H200, session 14: FLUX-2K window
    # 1-3 %, PixArt-2K 4-5 %); with pointer loads every block pays the row masks and it was 1-3 % slower.
    one_loop: bool = False
    # Cap on registers per thread (ptxas maxnreg), e.g. to fit three 4-warp programs per SM (168).
    max_registers: int | None = None
    # Split-K for full heads: each query block of a split head runs as this many programs over consecutive
    # key chunks, merged by the last to finish (fp32 partials in a workspace, one atomic ticket per query
    # block). A full head's program is a mixed launch's longest, and at short sequences (PixArt 1024²,
    # DiT-XL 512²) the last wave of them runs on while other SMs idle (BENCHMARKS.md §2, sessions 17 and
    # 19); in a dense launch whose programs make a partial last wave (FLUX 1024²: 4.36 waves at three
    # programs per SM), splitting only the heads of that wave spreads it over every SM
    # (ditlens.kernels.waves models both). 1: off.
    split_full: int = 1
    # How many full heads split, the last ones by head index (their chunks run after every unsplit full
    # head: the launch's tail); None: every full head.
    split_heads: int | None = None
    # With split heads, the full heads that do not split walk their keys in the dense loop with its
    # constant start (a runtime branch on the rank's chunk) instead of the chunk loop with runtime
    # bounds. Two copies of the loop: with more than one stage, two sets of pipeline buffers (D = 72:
    # 81 -> 141 KiB). On an H200 it did not recover the ~11 % every program of a split launch lost
    # (FLUX-1K/2K dense, session 20: BENCHMARKS.md §2), so it is off.
    split_branch: bool = False
    # Q and O of a split head dim (D = 72: 64 + 16 columns) through tensor descriptors too, when K/V go
    # through them. By pointer, their per-element addresses spill (Triton 3.6, D = 72, 128x64/4w/3s/tma/1l:
    # all-full 255 registers + 168 B spilled -> 205, mixed 255 + 208 -> 239, WA-RS 255 + 248 -> 255 + 16;
    # benchmarks/kernel_resources.py). Off until timed on a GPU (BENCHMARKS.md §2, session 20).
    qo_tma_split_dim: bool = False
    # The residual R of a WA-RS launch (added, or subtracted for R = O - W) through tensor descriptors
    # wherever O goes through them (D = 128 with tma; D = 72 with qo_tma_split_dim too). By pointer it
    # spills (Triton 3.6, windowed + R: D = 128 64x128/4w/1s/tma/1l/r168 168 registers + 360 B -> 168 + 40;
    # D = 72 with qo_tma_split_dim 255 + 16 -> 241). Off until timed on a GPU.
    residual_tma: bool = False
    # Exponentials of the last 1/poly_exp of each unmasked score tile's columns (2: half, 4: a quarter) on
    # the FMA units by a polynomial instead of the SFUs (FlashAttention-4's trick for a softmax bound by its
    # exponentials; relative error 7.5e-5 in P). On an H100 it was 3-26 % slower in every launch tried
    # (D = 128 and 72; BENCHMARKS.md §2, session 25): there the FP32 pipes, not the SFUs, bind. Not applied
    # in split-K chunks or the one-pass WA-RS kernel. 0: off.
    poly_exp: int = 0

    def __post_init__(self) -> None:
        if self.poly_exp not in (0, 2, 4):
            raise DitlensError(f"KernelConfig(poly_exp={self.poly_exp}): use 0 (off), 2 or 4")
        if self.split_full < 1 or (self.split_heads is not None and self.split_heads < 0):
            raise DitlensError(f"KernelConfig(split_full={self.split_full}, split_heads={self.split_heads}): "
                               "split_full must be >= 1 (1: no split) and split_heads None or >= 0")

# Defaults per padded head-dim tile (D0 + D1) on CUDA, from the tile sweeps of benchmarks/kernels.py
# and benchmarks/small_shapes.py (bf16, H200 unless said; BENCHMARKS.md §2): 128x64 with 4 warps for D <= 96,
# with K/V through tensor descriptors and one loop per key segment for split head dims up to 80 (PixArt's
# D = 72: 2K window 1.98x / 3.73x SDPA at 50 / 75 % against 1.89x / 3.58x with pointer loads and three
# loops); the same for D = 64 (SD3's; H100, session 25: SD3-1K dense, window, arrow, mixed and W + R 3-5 %
# faster than with pointer loads and three loops, at 50 and 75 %). D = 128: 64-row tiles with one stage,
# descriptors and one loop, capped at 168 registers so that three 4-warp programs share an SM (FLUX-1K / 2K
# windows and arrows 2-9 % faster than 128x128 with 8 warps and 3 stages; mixed plans within 1 %). Where descriptors are not available the launch falls back
# to pointer loads, and a default config then walks three loops.
_GPU_CONFIGS: dict[int, KernelConfig] = {
    64: KernelConfig(128, 64, 4, 3, tma=True, one_loop=True),
    80: KernelConfig(128, 64, 4, 3, tma=True, one_loop=True),
    96: KernelConfig(128, 64, 4, 3),
    128: KernelConfig(64, 128, 4, 1, tma=True, one_loop=True, max_registers=168),
}
_INTERPRETER_CONFIG = KernelConfig(16, 16, 1, 1)
# the kernels take the softmax scale times log2(e): their exponentials are exp2
LOG2E = math.log2(math.e)
# Launches whose every head is full compile without the window/arrow rules (ALL_FULL) and need far
# fewer registers: 64-row tiles with one stage then run two programs per SM, one's softmax overlapping
# the other's GEMMs (benchmarks/d128_schedules.py, H200, FLUX-2K dense: 0.93x cuDNN for the minimal
# kernel against 0.85x with 128x128 tiles).
_ALL_FULL_CONFIGS: dict[int, KernelConfig] = {
    128: KernelConfig(64, 128, 4, 1, tma=True),
}


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether triton imports at all."""
    return importlib.util.find_spec("triton") is not None


def split_head_dim(head_dim: int) -> tuple[int, int]:
    """(D0, D1): D0 the largest power of two <= D (at least 16), D1 the padded rest (0 or >= 16)."""
    d0 = 16
    while d0 * 2 <= head_dim:
        d0 *= 2
    rest = head_dim - d0
    if rest <= 0:
        return d0, 0
    d1 = 16
    while d1 < rest:
        d1 *= 2
    return d0, d1


# Short sequences (DiT-XL 512², PixArt 1024²) where every head is windowed: the kernel's loops are a few
# blocks long and 64-row tiles with two stages fill the GPU better (benchmarks/small_shapes.py, H200:
# window 17.6 against 21.6 µs at DiT-512, 124.9 against 128.7 µs at PixArt-1K).
_SHORT_WINDOWED_CONFIG = KernelConfig(64, 64, 4, 2)
_SHORT_SEQ_LEN = 4096
# The one-pass WA-RS refresh keeps two sets of accumulators live: 64-row tiles (half the registers).
_TWO_SOFTMAX_CONFIG = KernelConfig(64, 64, 4, 3)


def default_config(head_dim: int, interpret: bool, *, seq_len: int | None = None, windowed_only: bool = False,
                   two_softmaxes: bool = False, all_full: bool = False) -> KernelConfig:
    """The tile config used when none is given: by padded head dim and by the launch
    (``all_full``: every head full; ``windowed_only``: no full head, with ``seq_len`` <= 4096, for
    D <= 96; ``two_softmaxes``: the one-pass WA-RS refresh)."""
    if interpret:
        return _INTERPRETER_CONFIG
    d0, d1 = split_head_dim(head_dim)
    width = d0 + d1
    if all_full and width in _ALL_FULL_CONFIGS:
        return _ALL_FULL_CONFIGS[width]
    if width <= 96 and two_softmaxes:
        return _TWO_SOFTMAX_CONFIG
    if width <= 96 and windowed_only and seq_len is not None and seq_len <= _SHORT_SEQ_LEN:
        return _SHORT_WINDOWED_CONFIG
    for key in sorted(_GPU_CONFIGS):
        if width <= key:
            return _GPU_CONFIGS[key]
    return KernelConfig(64, 64, 4, 2)


@functools.lru_cache(maxsize=1)
def kernel_module() -> ModuleType:
    """The Triton kernels, imported on first use (so importing ditlens needs no triton)."""
    return importlib.import_module("ditlens.kernels._triton_impl")


def interpreting() -> bool:
    """Whether Triton runs in interpreter mode in this process.

    ``triton.jit`` (triton's own library included) picks the interpreter when it decorates, from
    ``TRITON_INTERPRET``, so the mode is fixed by the variable's value when triton was imported:
    CPU tensors need it set then, CUDA tensors need it unset.
    """
    return _jit_modes() == (True, True)


@functools.lru_cache(maxsize=1)
def _jit_modes() -> tuple[bool, bool]:
    """(triton's own library interpreted?, our kernels interpreted?): both must agree to run."""
    import triton.language.standard as tl_standard
    from triton.runtime.interpreter import InterpretedFunction

    return (isinstance(tl_standard.max, InterpretedFunction),
            isinstance(kernel_module().headwise_fwd_kernel, InterpretedFunction))


@dataclass(frozen=True)
class _PlanTensors:
    mode: torch.Tensor   # int32 [H]
    window: torch.Tensor  # int32 [H]
    # int32 [ranks]: the head of each program rank, by decreasing work (skip heads last); with split full
    # heads a split head has one rank per key chunk, and ranks = H + (split - 1) * (number of split heads)
    order: torch.Tensor
    # int32 [ranks]: f * split + chunk for a rank of a split full head (f: its index among the split heads),
    # -1 otherwise
    part: torch.Tensor


def launch_ranks(plan: HeadPlan, layout: TokenLayout, split: int = 1, n_split_heads: int = 0) -> list[tuple[int, int]]:
    """(head, part) of each program rank of a launch, heaviest first (ties by head, then chunk): the last
    ``n_split_heads`` full heads (by head index) have ``split`` ranks each, one per key chunk, with part =
    f * split + chunk (f: the head's index among the split heads); every other head one rank, part -1."""
    cost = [head_attended_pairs(m, w, layout) for m, w in zip(plan.modes, plan.windows)]
    full = [h for h, m in enumerate(plan.modes) if m == "full"]
    split_index = {h: f for f, h in enumerate(full[len(full) - n_split_heads:])} if split > 1 else {}
    ranks = [(cost[h] / split, h, c, split_index[h] * split + c) if h in split_index else (cost[h], h, 0, -1)
             for h in range(plan.n_heads) for c in range(split if h in split_index else 1)]
    ranks.sort(key=lambda r: (-r[0], r[1], r[2]))
    return [(h, part) for _, h, _, part in ranks]


@functools.lru_cache(maxsize=256)
def _plan_tensors(plan: HeadPlan, layout: TokenLayout, device: torch.device, split: int = 1,
                  n_split_heads: int = 0) -> _PlanTensors:
    ranks = launch_ranks(plan, layout, split, n_split_heads)
    return _PlanTensors(
        mode=torch.tensor(plan.mode_codes, dtype=torch.int32, device=device),
        window=torch.tensor(plan.windows, dtype=torch.int32, device=device),
        order=torch.tensor([h for h, _ in ranks], dtype=torch.int32, device=device),
        part=torch.tensor([part for _, part in ranks], dtype=torch.int32, device=device),
    )


def full_head_split(plan: HeadPlan, seq_len: int, cfg: KernelConfig) -> tuple[int, int]:
    """(key chunks per split head, number of split heads) of this launch: ``cfg.split_full`` chunks (at
    most one per key block) for ``cfg.split_heads`` full heads (all when None); (1, 0) when nothing splits."""
    n_full = plan.modes.count("full")
    split = min(cfg.split_full, triton_cdiv(seq_len, cfg.block_n))
    n_split = n_full if cfg.split_heads is None else min(cfg.split_heads, n_full)
    return (split, n_split) if split > 1 and n_split > 0 else (1, 0)


def check_triton_inputs(q: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot take ``q`` (None if they can)."""
    if not triton_available():
        return "triton is not installed"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"the Triton kernels take float16/bfloat16, got {q.dtype}"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"the Triton kernels take head_dim <= {MAX_HEAD_DIM}, got {q.shape[-1]}"
    if not (q.is_cuda or q.device.type == "cpu"):
        return f"the Triton kernels run on CUDA (or the CPU interpreter), got {q.device}"
    modes = _jit_modes()
    if q.is_cuda and modes != (False, False):
        return "TRITON_INTERPRET=1 was set when triton was imported, so nothing is compiled for the GPU"
    if not q.is_cuda and modes != (True, True):
        return "CPU tensors need TRITON_INTERPRET=1 set before triton is imported (Triton's interpreter)"
    return None


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when the kernels can read it in place: unit stride on D, every other stride a
    multiple of 8 elements and a 16-byte aligned start (the kernels assume 16-byte aligned rows);
    otherwise a contiguous copy."""
    s0, s1, s2, s3 = t.stride()
    ok = s3 == 1 and s0 % 8 == 0 and s1 % 8 == 0 and s2 % 8 == 0 and t.data_ptr() % 16 == 0
    return t if ok else t.contiguous()


def _needs_align_hint(strides: tuple[tuple[int, ...], ...]) -> bool:
    """True when a batch/head stride is a multiple of 8 but not of 16 (e.g. [B, L, H, 72] views)."""
    return any(st[0] % 16 or st[1] % 16 for st in strides)


def output_like(q: torch.Tensor, head_dim: int | None = None) -> torch.Tensor:
    """An uninitialised ``[B, H, L, head_dim]`` output (``head_dim`` defaults to q's) in ``q``'s memory
    order: ``[B, L, H, D]`` storage when ``q`` interleaves its heads per token (diffusers' views, as
    SDPA returns them), so the caller's ``transpose(1, 2).reshape(B, L, H * D)`` is a view and not a
    copy; contiguous otherwise."""
    B, H, L, D = q.shape
    D = D if head_dim is None else head_dim
    if H > 1 and L > 1 and q.stride(1) < q.stride(2):
        return torch.empty(B, L, H, D, dtype=q.dtype, device=q.device).transpose(1, 2)
    return torch.empty(B, H, L, D, dtype=q.dtype, device=q.device)


def _output(q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return output_like(q)
    if out.shape != q.shape or out.device != q.device or _unit_last(out) is not out:
        raise DitlensError(f"out must be a tensor of q's shape {tuple(q.shape)} on {q.device} with unit stride on D "
                           "and other strides multiples of 8 elements")
    return out


def _use_tma(q: torch.Tensor, cfg: KernelConfig) -> bool:
    """Whether this launch loads K/V through tensor descriptors (``cfg``: a KernelConfig, or any config
    with ``tma`` and ``num_stages`` such as the window2d kernel's): asked for by the config, supported by
    this triton, and a GPU with a copy engine for them (compute capability 9.0+) or the interpreter;
    not for a split head dim in a one-stage config on the GPU."""
    if not cfg.tma or not _triton_has_tensor_descriptors():
        return False
    if q.is_cuda and split_head_dim(q.shape[-1])[1] and cfg.num_stages == 1:
        # H200, Triton 3.6: 64x128/4w/1s with descriptors at D = 72 (PixArt-2K) hits an illegal memory
        # access; 2- and 3-stage configs run (BENCHMARKS.md §2, session 12). Pointer loads there.
        return False
    return not q.is_cuda or _compute_capability(q.device.index)[0] >= 9


@functools.lru_cache(maxsize=1)
def _triton_has_tensor_descriptors() -> bool:
    import triton.language as tl

    return hasattr(tl, "make_tensor_descriptor")


@functools.lru_cache(maxsize=16)
def _compute_capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=16)
def _scratch_allocator(device: torch.device):
    def allocate(size: int, alignment: int, stream: int | None) -> torch.Tensor:
        return torch.empty(size, dtype=torch.int8, device=device)
    return allocate


@contextlib.contextmanager
def _descriptor_scratch(device: torch.device):
    """Device-side tensor descriptors need a little global scratch per program, which triton asks
    its allocator for at launch: provide one from torch's caching allocator, and put back whatever
    allocator was set before."""
    import triton

    try:
        from triton.runtime import _allocation
        previous = _allocation._allocator.get()
    except (ImportError, AttributeError):  # another triton layout: set ours, restore nothing
        previous = None
    triton.set_allocator(_scratch_allocator(device))
    try:
        yield
    finally:
        if previous is not None:
            triton.set_allocator(previous)


def launch_config(q: torch.Tensor, plan: HeadPlan, config: KernelConfig | None = None) -> tuple[KernelConfig, bool]:
    """(config, K/V through descriptors) of a head-wise launch on q [B, H, L, D]: ``config`` as given, or
    the default for the head dim, sequence and plan; a default that loses its descriptors (no copy
    engine, or a triton without them) walks three loops per segment, the faster walk with pointer loads."""
    B, H, L, D = q.shape
    cfg = config or default_config(D, not q.is_cuda, seq_len=L, windowed_only=not plan.has_full,
                                   all_full=plan.all_full)
    use_tma = _use_tma(q, cfg)
    if config is None and cfg.one_loop and not use_tma:
        cfg = replace(cfg, one_loop=False)
    return cfg, use_tma


def _layout_args(layout: TokenLayout) -> tuple[int, int, int, int]:
    return layout.image_start, layout.image_end, layout.text_start, layout.text_end


def headwise_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: HeadPlan, layout: TokenLayout,
                    scale: float, cached: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                    config: KernelConfig | None = None, out: torch.Tensor | None = None,
                    subtract: bool = False) -> torch.Tensor:
    """Launch the head-wise kernel; ``residual`` (if given) is added in the epilogue
    (``subtract=True``: the result is ``residual - attention``).

    ``out`` (optional, q's shape, unit stride on D) receives the result in place.
    """
    reason = check_triton_inputs(q)
    if reason:
        raise DitlensError(f"{reason}; use backend='flex' or 'sdpa'")
    B, H, L, D = q.shape
    interpret = not q.is_cuda
    all_full = plan.all_full
    cfg, use_tma = launch_config(q, plan, config)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    out = _output(q, out)
    cache = _unit_last(cached) if (cached is not None and plan.has_skip) else out
    res = _unit_last(residual) if residual is not None else out
    tensors = (q, k, v, out, cache, res)
    strides = tuple([t.stride() for t in tensors])  # lists, not generators: this runs at every launch
    split, n_split_heads = full_head_split(plan, L, cfg)
    constants = _launch_constants(D, strides, cfg, interpret, residual is not None, subtract, use_tma, all_full,
                                  all_full and L % cfg.block_n == 0, split)
    meta = graph_constant(_plan_tensors(plan, layout, q.device, split, n_split_heads))
    img_lo, img_hi, t_lo, t_hi = _layout_args(layout)
    n_mblocks = triton_cdiv(L, cfg.block_m)
    partials, row_stats, tickets = _split_workspace(B * n_split_heads * n_mblocks, split, cfg.block_m, D, out)
    grid = (meta.order.numel() * B * n_mblocks,)
    args = (*tensors, meta.mode, meta.window, meta.order, meta.part, partials, row_stats, tickets,
            *_batch_head_strides(strides), B, L, img_lo, img_hi, t_lo, t_hi, n_mblocks, n_split_heads, scale * LOG2E)
    with _descriptor_scratch(q.device) if use_tma else contextlib.nullcontext():
        _launch(headwise_launches(), grid, args, constants, interpret)
    return out


def _batch_head_strides(strides: tuple[tuple[int, ...], ...]) -> list[int]:
    """The batch and head strides of every tensor, in order: the kernels' runtime stride arguments."""
    return [x for st in strides for x in st[:2]]


def _launch(launches: LaunchCache, grid: tuple[int, ...], args: tuple, constants: dict, interpret: bool) -> None:
    """Launch through the cache on a GPU; the interpreter has no compiled kernel to replay."""
    if interpret:
        launches.fn[grid](*args, **constants)
    else:
        launches(grid, args, constants)


@functools.lru_cache(maxsize=1)
def headwise_launches() -> LaunchCache:
    """The compiled head-wise kernels by launch signature (see :mod:`ditlens.kernels.launcher`)."""
    return LaunchCache(kernel_module().headwise_fwd_kernel)


def _split_workspace(n_blocks: int, split: int, block_m: int, head_dim: int,
                     out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(partial accumulators, row max and sum, tickets) of the split heads' ``n_blocks`` query blocks:
    fp32 [n_blocks * split * block_m * (D0 + D1)], fp32 [n_blocks * split * 2 * block_m] and zeroed int32
    [n_blocks], fresh for each launch. Without split heads, ``out`` stands in for all three (never read)."""
    if n_blocks == 0:
        return out, out, out
    d0, d1 = split_head_dim(head_dim)
    rows = n_blocks * split * block_m
    return (torch.empty(rows * (d0 + d1), dtype=torch.float32, device=out.device),
            torch.empty(rows * 2, dtype=torch.float32, device=out.device),
            torch.zeros(n_blocks, dtype=torch.int32, device=out.device))


@functools.lru_cache(maxsize=256)
def _launch_constants(head_dim: int, strides: tuple[tuple[int, ...], ...], cfg: KernelConfig, interpret: bool,
                      has_residual: bool, subtract: bool, use_tma: bool, all_full: bool = False,
                      keys_even: bool = False, split: int = 1) -> dict:
    """The compile-time arguments of one launch shape (worked out once: a model makes the same few
    launches thousands of times, and on a fast GPU the host time per launch shows)."""
    d0, d1 = split_head_dim(head_dim)
    token_strides = dict(zip(("SQ", "SK", "SV", "SO", "SC", "SR"), (st[2] for st in strides)))
    return dict(
        HEAD_DIM=head_dim, **token_strides, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, D0=d0, D1=max(d1, 16),
        HAS_D1=d1 > 0, HAS_RESIDUAL=has_residual, UPCAST=interpret, HINT_ALIGN=_needs_align_hint(strides),
        SUBTRACT=subtract, USE_TMA=use_tma, WARP_SPEC=cfg.warp_specialize and not interpret, ALL_FULL=all_full,
        KEYS_EVEN=keys_even, SPLIT=split, SPLIT_BRANCH=cfg.split_branch and split > 1,
        QO_SPLIT=cfg.qo_tma_split_dim, R_TMA=cfg.residual_tma, POLY_EXP=cfg.poly_exp,
        EDGE_STAGES=cfg.num_stages if cfg.edge_stages is None else cfg.edge_stages, ONE_LOOP=cfg.one_loop,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **({} if cfg.max_registers is None or interpret else {"maxnreg": cfg.max_registers}))


def warsr_two_pass_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: HeadPlan, layout: TokenLayout,
                          scale: float, config: KernelConfig | None = None, out: torch.Tensor | None = None,
                          residual_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """WA-RS refresh as two launches: full ``O``, then the windowed kernel whose epilogue writes
    ``R = O - W`` directly (no separate subtraction pass). Measured faster than the one-pass
    kernel on an H200 (BENCHMARKS.md §2)."""
    full_plan = HeadPlan(("full",) * plan.n_heads, (0,) * plan.n_heads)
    o = headwise_triton(q, k, v, full_plan, layout, scale, config=config, out=out)
    r = headwise_triton(q, k, v, plan, layout, scale, residual=o, config=config, out=residual_out, subtract=True)
    return o, r


def warsr_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: HeadPlan, layout: TokenLayout,
                 scale: float, config: KernelConfig | None = None, out: torch.Tensor | None = None,
                 residual_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the one-pass WA-RS refresh kernel: (full output, residual = full - windowed).

    The key blocks that touch the window feed both softmaxes from one score block; the others
    update ``O`` alone. On an H200 it is still slower than :func:`warsr_two_pass_triton` (two
    accumulator sets force 64-row tiles), so the public API uses the two-pass form unless asked."""
    reason = check_triton_inputs(q)
    if reason:
        raise DitlensError(f"{reason}; use backend='flex' or 'sdpa'")
    B, H, L, D = q.shape
    interpret = not q.is_cuda
    cfg = config or default_config(D, interpret, two_softmaxes=True)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    out = _output(q, out)
    res = _output(q, residual_out)
    meta = graph_constant(_plan_tensors(plan, layout, q.device))
    n_mblocks = triton_cdiv(L, cfg.block_m)
    img_lo, img_hi, t_lo, t_hi = _layout_args(layout)
    grid = (B * H * n_mblocks,)
    tensors = (q, k, v, out, res)
    strides = tuple([t.stride() for t in tensors])
    args = (*tensors, meta.mode, meta.window, *_batch_head_strides(strides),
            H, L, img_lo, img_hi, t_lo, t_hi, n_mblocks, scale * LOG2E)
    _launch(warsr_launches(), grid, args, _warsr_constants(D, strides, cfg, interpret), interpret)
    return out, res


@functools.lru_cache(maxsize=1)
def warsr_launches() -> LaunchCache:
    """The compiled one-pass WA-RS kernels by launch signature (see :mod:`ditlens.kernels.launcher`)."""
    return LaunchCache(kernel_module().warsr_fwd_kernel)


@functools.lru_cache(maxsize=64)
def _warsr_constants(head_dim: int, strides: tuple[tuple[int, ...], ...], cfg: KernelConfig, interpret: bool) -> dict:
    """The compile-time arguments of one one-pass WA-RS launch shape (one dict object per shape: the
    launch cache keys on its id)."""
    d0, d1 = split_head_dim(head_dim)
    token_strides = dict(zip(("SQ", "SK", "SV", "SO", "SR"), (st[2] for st in strides)))
    return dict(HEAD_DIM=head_dim, **token_strides, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, D0=d0,
                D1=max(d1, 16), HAS_D1=d1 > 0, UPCAST=interpret, HINT_ALIGN=_needs_align_hint(strides),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
