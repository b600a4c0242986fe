"""Host side of the Triton kernels: configs, per-plan metadata, launches.

CUDA tensors run the compiled kernels; CPU tensors run the same kernels under Triton's
interpreter (slow; for tests). Each call is one launch for all heads.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Iterator

import torch

from ditlens.errors import DitlensError
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


# Defaults per padded head-dim tile (D0 + D1) on CUDA; benchmarks/kernels.py --tune re-measures these.
_GPU_CONFIGS: dict[int, KernelConfig] = {
    64: KernelConfig(128, 64, 4, 3),
    80: KernelConfig(128, 64, 4, 3),
    128: KernelConfig(128, 64, 4, 3),
}
_INTERPRETER_CONFIG = KernelConfig(16, 16, 1, 1)


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


def default_config(head_dim: int, interpret: bool) -> KernelConfig:
    """The tile config used when none is given."""
    if interpret:
        return _INTERPRETER_CONFIG
    d0, d1 = split_head_dim(head_dim)
    width = d0 + d1
    for key in sorted(_GPU_CONFIGS):
        if width <= key:
            return _GPU_CONFIGS[key]
    return KernelConfig(64, 64, 4, 2)


@contextlib.contextmanager
def _interpret_env(interpret: bool) -> Iterator[None]:
    """TRITON_INTERPRET set as asked while the block runs (the interpreter also reads it mid-call)."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


@functools.lru_cache(maxsize=2)
def kernel_module(interpret: bool) -> ModuleType:
    """Load _triton_impl.py compiled (GPU) or interpreted (CPU).

    ``triton.jit`` picks the interpreter when it decorates, from TRITON_INTERPRET, so the
    module is executed once per flavour with that variable set accordingly.
    """
    name = f"ditlens.kernels._triton_impl_{'interpreted' if interpret else 'compiled'}"
    path = os.path.join(os.path.dirname(__file__), "_triton_impl.py")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise DitlensError(f"cannot load the Triton kernels from {path}; reinstall ditlens")
    module = importlib.util.module_from_spec(spec)
    with _interpret_env(interpret):
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class _PlanTensors:
    mode: torch.Tensor   # int32 [H]
    window: torch.Tensor  # int32 [H]
    order: torch.Tensor   # int32 [H], heads by decreasing work (skip heads last)


@functools.lru_cache(maxsize=256)
def _plan_tensors(plan: HeadPlan, layout: TokenLayout, device: str) -> _PlanTensors:
    cost = [head_attended_pairs(m, w, layout) for m, w in zip(plan.modes, plan.windows)]
    order = sorted(range(plan.n_heads), key=lambda h: (-cost[h], h))
    return _PlanTensors(
        mode=torch.tensor(plan.mode_codes, dtype=torch.int32, device=device),
        window=torch.tensor(plan.windows, dtype=torch.int32, device=device),
        order=torch.tensor(order, dtype=torch.int32, device=device),
    )


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
    return None


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _output(q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.shape != q.shape or out.stride(-1) != 1 or out.device != q.device:
        raise DitlensError(f"out must be a tensor of q's shape {tuple(q.shape)} on {q.device} with unit stride on D")
    return out


def _layout_args(layout: TokenLayout) -> tuple[int, int, int, int]:
    return layout.image_start, layout.image_end, layout.text_start, layout.text_end


def headwise_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: HeadPlan, layout: TokenLayout,
                    scale: float, cached: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                    config: KernelConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the head-wise kernel; ``residual`` (if given) is added in the epilogue.

    ``out`` (optional, q's shape, unit stride on D) receives the result in place.
    """
    reason = check_triton_inputs(q)
    if reason:
        raise DitlensError(f"{reason}; use backend='flex' or 'sdpa'")
    B, H, L, D = q.shape
    interpret = not q.is_cuda
    mod = kernel_module(interpret)
    cfg = config or default_config(D, interpret)
    d0, d1 = split_head_dim(D)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    out = _output(q, out)
    cache = _unit_last(cached) if (cached is not None and plan.has_skip) else out
    res = _unit_last(residual) if residual is not None else out
    meta = _plan_tensors(plan, layout, str(q.device))
    n_mblocks = triton_cdiv(L, cfg.block_m)
    img_lo, img_hi, t_lo, t_hi = _layout_args(layout)
    grid = (H * B * n_mblocks,)
    launch_env = _interpret_env(True) if interpret else contextlib.nullcontext()
    with launch_env:
        mod.headwise_fwd_kernel[grid](
            q, k, v, out, cache, res, meta.mode, meta.window, meta.order,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1), cache.stride(0), cache.stride(1), res.stride(0), res.stride(1),
            B, L, img_lo, img_hi, t_lo, t_hi, n_mblocks, scale * 1.4426950408889634,
            HEAD_DIM=D, SQ=q.stride(2), SK=k.stride(2), SV=v.stride(2), SO=out.stride(2), SC=cache.stride(2),
            SR=res.stride(2), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, D0=d0, D1=max(d1, 16), HAS_D1=d1 > 0,
            HAS_RESIDUAL=residual is not None, UPCAST=interpret,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return out


def warsr_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: HeadPlan, layout: TokenLayout,
                 scale: float, config: KernelConfig | None = None, out: torch.Tensor | None = None,
                 residual_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the WA-RS refresh kernel: (full output, residual = full - windowed)."""
    reason = check_triton_inputs(q)
    if reason:
        raise DitlensError(f"{reason}; use backend='flex' or 'sdpa'")
    B, H, L, D = q.shape
    interpret = not q.is_cuda
    mod = kernel_module(interpret)
    cfg = config or default_config(D, interpret)
    d0, d1 = split_head_dim(D)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    out = _output(q, out)
    res = _output(q, residual_out)
    meta = _plan_tensors(plan, layout, str(q.device))
    n_mblocks = triton_cdiv(L, cfg.block_m)
    img_lo, img_hi, t_lo, t_hi = _layout_args(layout)
    grid = (B * H * n_mblocks,)
    launch_env = _interpret_env(True) if interpret else contextlib.nullcontext()
    with launch_env:
        mod.warsr_fwd_kernel[grid](
            q, k, v, out, res, meta.mode, meta.window,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1), res.stride(0), res.stride(1),
            H, L, img_lo, img_hi, t_lo, t_hi, n_mblocks, scale * 1.4426950408889634,
            HEAD_DIM=D, SQ=q.stride(2), SK=k.stride(2), SV=v.stride(2), SO=out.stride(2), SR=res.stride(2),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, D0=d0, D1=max(d1, 16), HAS_D1=d1 > 0, UPCAST=interpret,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return out, res


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
