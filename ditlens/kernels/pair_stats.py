"""One-pass sums behind the profiler's distance metrics, as a Triton reduction.

For rows of two tensors X, Y viewed as [rows, n] (one row = one head of one compared pair),
:func:`pair_sums` returns, in float32, per row::

    [ Σ|X - Y|,  Σ|Y|,  Σ X·Y,  Σ X²,  Σ Y² ]

from which ``l1``, ``rel_l1`` and ``cosine`` (DESIGN §4) follow. The eager PyTorch version
upcasts both inputs and makes several float32 passes; this kernel reads each bf16/fp16 input
once, which is what keeps on-device statistics cheap next to the model's own step time.
Rows are split into ``splits`` chunks so that a handful of rows still fills the GPU.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the deployment path may run without Triton
    triton = None


if triton is not None:

    @triton.jit
    def _pair_sums_kernel(X, Y, OUT, n, chunk, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        split = tl.program_id(1)
        start = split * chunk
        stop = tl.minimum(start + chunk, n)
        base = row.to(tl.int64) * n
        abs_diff = tl.zeros([BLOCK], dtype=tl.float32)
        abs_y = tl.zeros([BLOCK], dtype=tl.float32)
        xy = tl.zeros([BLOCK], dtype=tl.float32)
        xx = tl.zeros([BLOCK], dtype=tl.float32)
        yy = tl.zeros([BLOCK], dtype=tl.float32)
        for offset in range(start, stop, BLOCK):
            idx = offset + tl.arange(0, BLOCK)
            mask = idx < stop
            x = tl.load(X + base + idx, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(Y + base + idx, mask=mask, other=0.0).to(tl.float32)
            abs_diff += tl.abs(x - y)
            abs_y += tl.abs(y)
            xy += x * y
            xx += x * x
            yy += y * y
        out = OUT + (row * tl.num_programs(1) + split) * 5
        tl.store(out + 0, tl.sum(abs_diff, axis=0))
        tl.store(out + 1, tl.sum(abs_y, axis=0))
        tl.store(out + 2, tl.sum(xy, axis=0))
        tl.store(out + 3, tl.sum(xx, axis=0))
        tl.store(out + 4, tl.sum(yy, axis=0))


def pair_sums_available(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda


def pair_sums(x: torch.Tensor, y: torch.Tensor, *, block: int = 2048) -> torch.Tensor:
    """Row sums of X and Y for the distance metrics.

    Args:
        x, y: ``[..., N, C]`` tensors of one shape and dtype on a CUDA device (leading dims are
            rows: typically [items, heads]).
    Returns:
        float32 ``[..., 5]``: Σ|x-y|, Σ|y|, Σxy, Σx², Σy² over the last two dims.
    """
    lead = x.shape[:-2]
    n = x.shape[-2] * x.shape[-1]
    rows = x.numel() // max(n, 1)
    xf = x.reshape(rows, n)
    yf = y.reshape(rows, n)
    if not xf.is_contiguous():
        xf = xf.contiguous()
    if not yf.is_contiguous():
        yf = yf.contiguous()
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    # Enough programs for a few waves over the SMs, chunks no shorter than one block.
    splits = max(1, min(triton.cdiv(n, block), triton.cdiv(4 * sms, max(rows, 1))))
    chunk = triton.cdiv(triton.cdiv(n, splits), block) * block
    splits = triton.cdiv(n, chunk)
    partial = torch.empty((rows, splits, 5), dtype=torch.float32, device=x.device)
    _pair_sums_kernel[(rows, splits)](xf, yf, partial, n, chunk, BLOCK=block, num_warps=8)
    return partial.sum(dim=1).reshape(*lead, 5)
