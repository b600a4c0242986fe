"""One-pass sums behind the profiler's distance metrics, as a Triton reduction.

For pairs of per-head tensors X, Y (one pair = one comparison of one layer), :func:`pair_sums`
returns, in float32, per pair and head::

    [ Σ|X - Y|,  Σ|Y|,  Σ X·Y,  Σ X²,  Σ Y² ]

from which ``l1``, ``rel_l1`` and ``cosine`` (DESIGN §4) follow. The pairs are passed as a list
of tensors that may live anywhere in memory with their own strides (the q/k/v views diffusers
hands to SDPA are strided per head): the kernel reads them through a table of addresses, so the
profiler never copies them into one stacked tensor, and each bf16/fp16 input is read exactly once.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the deployment path may run without Triton
    triton = None

_TRITON_DTYPES: dict = {}


if triton is not None:

    @triton.jit
    def _pair_sums_kernel(BASE, META, OUT, heads, tokens, rows_per_split,
                          DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, VEC: tl.constexpr):
        item = tl.program_id(0)
        head = tl.program_id(1)
        split = tl.program_id(2)
        # META row, in elements of BASE's dtype: x offset from BASE, x head stride, x token stride,
        # then the same for y (channels are contiguous). Offsets from one real pointer argument
        # (rather than raw addresses) keep BASE's alignment known to the compiler; VEC > 1 says
        # every offset and stride is a multiple of VEC, which turns the loads into 16-byte vectors.
        x_off = tl.multiple_of(tl.load(META + item * 6 + 0), VEC)
        xs_h = tl.multiple_of(tl.load(META + item * 6 + 1), VEC)
        xs_t = tl.multiple_of(tl.load(META + item * 6 + 2), VEC)
        y_off = tl.multiple_of(tl.load(META + item * 6 + 3), VEC)
        ys_h = tl.multiple_of(tl.load(META + item * 6 + 4), VEC)
        ys_t = tl.multiple_of(tl.load(META + item * 6 + 5), VEC)
        x_base = BASE + x_off + head * xs_h
        y_base = BASE + y_off + head * ys_h
        t0 = split * rows_per_split
        t1 = tl.minimum(t0 + rows_per_split, tokens)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < DIM
        # Accumulators are per-token vectors, reduced over channels every tile: five [T, D] float32
        # accumulators would need ~320 registers per thread at T=64, D=128 and spill to local memory.
        abs_diff = tl.zeros([BLOCK_T], dtype=tl.float32)
        abs_y = tl.zeros([BLOCK_T], dtype=tl.float32)
        xy = tl.zeros([BLOCK_T], dtype=tl.float32)
        xx = tl.zeros([BLOCK_T], dtype=tl.float32)
        yy = tl.zeros([BLOCK_T], dtype=tl.float32)
        for start in range(t0, t1, BLOCK_T):
            t = start + tl.arange(0, BLOCK_T)
            ok = (t < t1)[:, None] & d_ok[None, :]
            x = tl.load(x_base + t[:, None] * xs_t + d[None, :], mask=ok, other=0.0).to(tl.float32)
            y = tl.load(y_base + t[:, None] * ys_t + d[None, :], mask=ok, other=0.0).to(tl.float32)
            abs_diff += tl.sum(tl.abs(x - y), axis=1)
            abs_y += tl.sum(tl.abs(y), axis=1)
            xy += tl.sum(x * y, axis=1)
            xx += tl.sum(x * x, axis=1)
            yy += tl.sum(y * y, axis=1)
        out = OUT + ((item * heads + head) * tl.num_programs(2) + split) * 5
        tl.store(out + 0, tl.sum(abs_diff, axis=0))
        tl.store(out + 1, tl.sum(abs_y, axis=0))
        tl.store(out + 2, tl.sum(xy, axis=0))
        tl.store(out + 3, tl.sum(xx, axis=0))
        tl.store(out + 4, tl.sum(yy, axis=0))

    _TRITON_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}



def interpreted() -> bool:
    """Whether these kernels run under Triton's CPU interpreter: both triton's own library and our
    kernel must have been decorated with TRITON_INTERPRET=1 (the variable counts when triton and
    this module were imported; setting it later mixes interpreted and compiled functions)."""
    return _jit_modes() == (True, True)


def _jit_modes() -> tuple[bool, bool]:
    if triton is None:
        return False, False
    import triton.language.standard as tl_standard
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl_standard.max, InterpretedFunction), isinstance(_pair_sums_kernel, InterpretedFunction)


def pair_sums_available(x: torch.Tensor) -> bool:
    if triton is None or x.dtype not in _TRITON_DTYPES:
        return False
    return _jit_modes() == ((False, False) if x.is_cuda else (True, True))


def _as_heads(t: torch.Tensor) -> torch.Tensor:
    """[heads, tokens, channels] with unit channel stride (a copy only if needed)."""
    if t.dim() != 3:
        t = t.reshape(-1, t.shape[-2], t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def pair_sums_rows(xs: Sequence[tuple[torch.Tensor, int]], ys: Sequence[tuple[torch.Tensor, int]], *,
                   block_t: int = 32, num_warps: int = 8, vectorize: bool = True) -> torch.Tensor:
    """:func:`pair_sums` of batch rows given as (tensor ``[batch, heads, tokens, channels]``, row),
    addressed by pointer arithmetic: no view is made per pair, and each tensor's address and
    strides are read once however many pairs use it (host time matters here)."""
    x0 = xs[0][0]
    heads, tokens, dim = x0.shape[1:]
    size, origin = x0.element_size(), x0.data_ptr()
    known: dict[int, tuple[int, int, int, int]] = {}  # id(tensor) -> (byte offset, row bytes, head, token stride)
    keep: list[torch.Tensor] = []  # copies must outlive the launch that reads them

    def entry(ref: tuple[torch.Tensor, int]) -> tuple[int, int, int]:
        t, row = ref
        got = known.get(id(t))
        if got is None:
            if t.dtype != x0.dtype:
                raise ValueError(f"pair_sums: pairs mix {t.dtype} and {x0.dtype}")
            if t.stride(-1) != 1:  # channels must be contiguous: copy this row (rare)
                copy = t[row:row + 1].contiguous()
                keep.append(copy)
                return copy.data_ptr() - origin, copy.stride(1), copy.stride(2)
            got = known[id(t)] = (t.data_ptr() - origin, t.stride(0) * size, t.stride(1), t.stride(2))
        offset, row_bytes, head_stride, token_stride = got
        return offset + row * row_bytes, head_stride, token_stride

    rows = [entry(x) + entry(y) for x, y in zip(xs, ys)]
    return _launch(x0, rows, heads, tokens, dim, block_t, num_warps, vectorize)


def pair_sums(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], *, block_t: int = 32) -> torch.Tensor:
    """Sums of many (X, Y) pairs in one launch.

    Args:
        xs, ys: equally long lists; pair i is ``xs[i]``, ``ys[i]``, each ``[heads, tokens, channels]``
            (any strides with contiguous channels), all of one shape, dtype and CUDA device.
    Returns:
        float32 ``[pairs, heads, 5]``: Σ|x-y|, Σ|y|, Σxy, Σx², Σy² over tokens and channels.
    """
    # Each as a batch of one: the same address table as batch rows (the list keeps any copy alive).
    return pair_sums_rows([(_as_heads(x)[None], 0) for x in xs], [(_as_heads(y)[None], 0) for y in ys],
                          block_t=block_t)


def _launch(base: torch.Tensor, rows: list[tuple[int, int, int, int, int, int]], heads: int, tokens: int, dim: int,
            block_t: int, num_warps: int, vectorize: bool) -> torch.Tensor:
    """rows: per pair (x byte offset from ``base``, x head stride, x token stride, y byte offset,
    y head stride, y token stride), strides in elements; every tensor of ``base``'s dtype."""
    size = base.element_size()
    table = np.array(rows, dtype=np.int64).reshape(-1, 6)
    offsets = table[:, [0, 3]]
    if (offsets % size).any():
        raise ValueError("pair_sums: a tensor is not aligned to its element size")
    table[:, [0, 3]] = offsets // size
    # 16-byte vectors where every offset, stride and the channel count allow them.
    vec = max(1, 16 // size)
    aligned = vectorize and base.data_ptr() % 16 == 0 and dim % vec == 0 and not (table % vec).any()
    device = base.device
    meta = torch.from_numpy(table)  # [pairs, 6]
    if device.type == "cuda":
        # Pinned staging keeps the copy asynchronous: the model never waits for the host.
        meta = meta.pin_memory().to(device, non_blocking=True)
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:  # Triton's CPU interpreter (tests)
        sms = 4
    n_pairs = len(rows)
    splits = max(1, min(triton.cdiv(tokens, block_t * 4), triton.cdiv(4 * sms, n_pairs * heads)))
    rows_per_split = triton.cdiv(triton.cdiv(tokens, splits), block_t) * block_t
    splits = triton.cdiv(tokens, rows_per_split)
    partial = torch.empty((n_pairs, heads, splits, 5), dtype=torch.float32, device=device)
    _pair_sums_kernel[(n_pairs, heads, splits)](
        base, meta, partial, heads, tokens, rows_per_split,
        DIM=dim, BLOCK_T=block_t, BLOCK_D=triton.next_power_of_2(dim), VEC=vec if aligned else 1, num_warps=num_warps)
    return partial.sum(dim=2)
