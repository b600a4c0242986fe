"""Redundancy metrics between two per-head tensors (DESIGN.md §4).

Every torch function takes tensors shaped ``[..., N, C]`` (N tokens, C channels of one
head; the leading dims are typically ``[batch, heads]``) and returns one value per
leading index, shape ``[...]``. They run inside the capture hooks on every attention
layer at every step, so they are batched and vectorised (no Python loop over heads or
channels), never synchronise with the host, and keep their temporaries to a few copies
of the input. Inputs may be float16, bfloat16 or float32: they are computed in
``dtype`` (float32 unless told otherwise; tests use float64) and returned in ``dtype``.

Degenerate cases follow the formula (0/0 is NaN) except where documented:
``cosine`` with a zero vector is NaN, ``rel_l1`` with ``Y == 0`` is inf (NaN if also
``X == 0``), ``rse`` with a constant ``O`` is inf (NaN if ``O' == O``), and ``ssim`` of a
head whose ``Y`` is constant (data range 0, where scikit-image divides 0 by 0) is 1 if
``X`` equals ``Y`` everywhere in the head and NaN otherwise.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ditlens.errors import DitlensError

__all__ = [
    "METRIC_NAMES",
    "SSIM_K1",
    "SSIM_K2",
    "SSIM_SIGMA",
    "SSIM_TRUNCATE",
    "coefficient_of_variation",
    "cosine",
    "gaussian_filter_matrix",
    "l1",
    "pairwise_stats",
    "rel_l1",
    "rse",
    "ssim",
    "ssim_window_size",
    "v1_loss",
]

#: Names accepted by :func:`pairwise_stats`, in the order DESIGN §4 lists them.
METRIC_NAMES: tuple[str, ...] = ("l1", "rel_l1", "cosine", "ssim")

# scikit-image's structural_similarity(gaussian_weights=True, sigma=1.5): it filters with
# scipy.ndimage.gaussian_filter(sigma=1.5, truncate=3.5, mode="reflect"), i.e. an 11-tap
# kernel (radius int(3.5 * 1.5 + 0.5) = 5) whatever win_size is; win_size only sets the crop.
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03

# ssim() works on chunks of the flattened leading dims holding at most this many input
# elements, so its ~13 input-sized temporaries stay bounded for big video heads.
_SSIM_CHUNK_ELEMENTS = 1 << 24


def _check_pair(x: Tensor, y: Tensor) -> None:
    if x.shape != y.shape:
        raise DitlensError(f"metric inputs differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}; pass the same tokens and channels of one head")
    if x.dim() < 2:
        raise DitlensError(f"metric inputs need shape [..., tokens, channels], got {tuple(x.shape)}")


def l1(x: Tensor, y: Tensor, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """mean |x - y| over the last two dims (tokens, channels): ``[..., N, C] -> [...]``."""
    _check_pair(x, y)
    return (x.to(dtype) - y.to(dtype)).abs().mean(dim=(-2, -1))


def rel_l1(x: Tensor, y: Tensor, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """mean |x - y| / mean |y| over the last two dims: ``[..., N, C] -> [...]``."""
    _check_pair(x, y)
    y = y.to(dtype)
    return (x.to(dtype) - y).abs().mean(dim=(-2, -1)) / y.abs().mean(dim=(-2, -1))


def _cosine_from_sums(xy: Tensor, xx: Tensor, yy: Tensor) -> Tensor:
    # sqrt each norm separately so that xx * yy cannot overflow; clamp the rounding
    # that can push |cos| a hair above 1.
    return (xy / (xx.sqrt() * yy.sqrt())).clamp(-1.0, 1.0)


def cosine(x: Tensor, y: Tensor, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """<x, y> / (|x| |y|) over the flattened (N, C) of each head: ``[..., N, C] -> [...]``."""
    _check_pair(x, y)
    x = x.to(dtype)
    y = y.to(dtype)
    dims = (-2, -1)
    return _cosine_from_sums((x * y).sum(dim=dims), (x * x).sum(dim=dims), (y * y).sum(dim=dims))


def ssim_window_size(height: int, width: int) -> int:
    """s = min(11, the largest odd number <= min(height, width)) (DESIGN §4)."""
    side = min(int(height), int(width))
    if side < 1:
        raise DitlensError(f"SSIM needs a token grid of at least 1x1, got {height}x{width}")
    return min(11, side if side % 2 == 1 else side - 1)


def gaussian_filter_matrix(
    length: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    sigma: float = SSIM_SIGMA,
    truncate: float = SSIM_TRUNCATE,
) -> Tensor:
    """The ``[length, length]`` matrix M with ``M @ v == scipy.ndimage.gaussian_filter1d(v,
    sigma, truncate=truncate, mode="reflect")``.

    Folding the border extension into a matrix turns the separable filter into two
    small matmuls and handles kernels longer than the axis: scipy's 'reflect' (half-sample
    symmetric, ``d c b a | a b c d | d c b a``) repeats with period ``2 * length``, so a
    tap at index j reads ``j mod 2L`` mirrored into ``[0, L)``. Built on ``device`` with
    torch ops, so no host-to-device copy (and no stream synchronisation) is needed.
    """
    radius = int(truncate * sigma + 0.5)  # as scipy.ndimage computes it
    offsets = torch.arange(-radius, radius + 1, device=device)
    taps = torch.exp(-0.5 / (sigma * sigma) * offsets.to(torch.float64) ** 2)
    taps = taps / taps.sum()
    period = 2 * length
    source = torch.remainder(torch.arange(length, device=device)[:, None] + offsets[None, :], period)
    source = torch.where(source >= length, period - 1 - source, source)
    matrix = torch.zeros(length, length, device=device, dtype=torch.float64)
    matrix.scatter_add_(1, source, taps.expand(length, -1).contiguous())
    return matrix.to(dtype)


def _check_grid(tokens: int, grid: Sequence[int] | None) -> tuple[int, int, int]:
    if grid is None or len(grid) != 3:
        raise DitlensError(f"SSIM needs the token grid (frames, height, width), got {grid!r}")
    frames, height, width = (int(side) for side in grid)
    if min(frames, height, width) < 1 or frames * height * width != tokens:
        raise DitlensError(f"token grid {frames}x{height}x{width} does not hold the {tokens} tokens compared; fix the adapter's grid")
    return frames, height, width


def _ssim_chunk(x: Tensor, y: Tensor, frames: int, height: int, width: int, row_filter: Tensor, col_filter: Tensor) -> Tensor:
    """Mean SSIM of ``x, y: [B, N, C]`` (already in the compute dtype) -> ``[B]``."""
    batch, _, channels = x.shape
    # Data range and constants per head, over all tokens and channels of Y.
    y_min, y_max = y.reshape(batch, -1).aminmax(dim=1)
    data_range = y_max - y_min
    c1 = ((SSIM_K1 * data_range) ** 2).view(batch, 1, 1, 1, 1)
    c2 = ((SSIM_K2 * data_range) ** 2).view(batch, 1, 1, 1, 1)

    images = batch * frames
    x_img = x.reshape(images, height, width, channels)
    y_img = y.reshape(images, height, width, channels)
    # Variances are shift-invariant (the filter weights sum to 1): centre each image
    # so that E[x^2] - E[x]^2 does not cancel catastrophically in float32.
    x_mean = x_img.mean(dim=(1, 2), keepdim=True)
    y_mean = y_img.mean(dim=(1, 2), keepdim=True)
    x_c = x_img - x_mean
    y_c = y_img - y_mean
    stacked = torch.cat((x_c, y_c, x_c * x_c, y_c * y_c, x_c * y_c), dim=-1)  # [I, H, W, 5C]
    del x_c, y_c

    # Separable Gaussian: rows then columns, each a matmul with the border folded in;
    # the filter matrices keep only the output rows/cols that survive the crop.
    crop_h, crop_w = row_filter.shape[0], col_filter.shape[0]
    filtered = torch.matmul(row_filter, stacked.view(images, height, width * 5 * channels))
    del stacked
    filtered = torch.matmul(col_filter, filtered.view(images * crop_h, width, 5 * channels))
    filtered = filtered.view(batch, frames, crop_h, crop_w, 5 * channels)
    fx, fy, fxx, fyy, fxy = filtered.split(channels, dim=-1)

    vx = fxx - fx * fx
    vy = fyy - fy * fy
    vxy = fxy - fx * fy
    ux = fx + x_mean.view(batch, frames, 1, 1, channels)
    uy = fy + y_mean.view(batch, frames, 1, 1, channels)
    numerator = (2 * ux * uy + c1) * (2 * vxy + c2)
    denominator = (ux * ux + uy * uy + c1) * (vx + vy + c2)
    score = (numerator / denominator).mean(dim=(1, 2, 3, 4))

    # Zero data range: C1 = C2 = 0 and the formula is 0/0. Identical heads are 1.
    identical = ~(x != y).reshape(batch, -1).any(dim=1)
    undefined = torch.where(identical, torch.ones_like(score), torch.full_like(score, math.nan))
    return torch.where(data_range == 0, undefined, score)


def ssim(
    x: Tensor,
    y: Tensor,
    grid: tuple[int, int, int],
    *,
    dtype: torch.dtype = torch.float32,
    chunk_elements: int = _SSIM_CHUNK_ELEMENTS,
) -> Tensor:
    """Mean SSIM per head, ``[..., N, C] -> [...]``, exactly as DESIGN §4.

    Tokens are laid on ``grid = (frames, height, width)`` (row-major), each channel of
    each frame is an image, and the value per image is scikit-image's
    ``structural_similarity(X, Y, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=R, win_size=s)`` with R = max(Y) - min(Y)
    over the whole head and s = :func:`ssim_window_size`; the result is the mean over
    channels and frames. Y is the reference (its range sets C1, C2).

    The separable Gaussian filter runs as two small matmuls per chunk (the border
    reflection folded into the matrices); temporaries peak at about 12 float32 copies of a
    chunk of at most ``chunk_elements`` input elements. Agreement with scikit-image in
    float64 is ~1e-15, in float32 ~1e-7; with TF32 matmuls enabled globally
    (``torch.backends.cuda.matmul.allow_tf32``) ~1e-4 (3e-5 measured on an H100).
    """
    _check_pair(x, y)
    frames, height, width = _check_grid(x.shape[-2], grid)
    lead_shape = x.shape[:-2]
    tokens, channels = x.shape[-2:]
    heads = math.prod(lead_shape)
    x = x.reshape(heads, tokens, channels)
    y = y.reshape(heads, tokens, channels)

    pad = (ssim_window_size(height, width) - 1) // 2
    row_filter = gaussian_filter_matrix(height, device=x.device, dtype=dtype)[pad : height - pad]
    col_filter = gaussian_filter_matrix(width, device=x.device, dtype=dtype)[pad : width - pad]

    heads_per_chunk = max(1, chunk_elements // (tokens * channels))
    results = [
        _ssim_chunk(
            x[start : start + heads_per_chunk].to(dtype),
            y[start : start + heads_per_chunk].to(dtype),
            frames, height, width, row_filter, col_filter,
        )
        for start in range(0, heads, heads_per_chunk)
    ]
    if not results:  # empty leading dims
        return torch.empty(lead_shape, device=x.device, dtype=dtype)
    return torch.cat(results).view(lead_shape)


SUM_METRICS = frozenset({"l1", "rel_l1", "cosine"})


def metrics_from_sums(sums: Tensor, count: int) -> dict[str, Tensor]:
    """l1, rel_l1 and cosine from [..., 5] sums (Σ|x-y|, Σ|y|, Σxy, Σx², Σy²) over ``count`` elements."""
    return {"l1": sums[..., 0] / count, "rel_l1": sums[..., 0] / sums[..., 1],
            "cosine": _cosine_from_sums(sums[..., 2], sums[..., 3], sums[..., 4])}


def pair_sums_torch(x: Tensor, y: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The five sums of :func:`metrics_from_sums` in ``dtype``: ``[..., N, C]`` pair -> ``[..., 5]``
    (Σ|x-y|, Σ|y|, Σxy, Σx², Σy² over each head's N x C; the PyTorch counterpart of the Triton
    kernel in :mod:`ditlens.kernels.pair_stats`). Shapes are the caller's to check: this runs once
    per compared pair, where a few microseconds per call add up. One difference with abs in place
    and reductions over one flattened dim that make no temporaries (on the CPU, reductions over two
    dims or through elementwise products timed 2-3x slower)."""
    x, y = x.to(dtype).flatten(-2), y.to(dtype).flatten(-2)
    return torch.stack([(x - y).abs_().sum(dim=-1), y.abs().sum(dim=-1), torch.linalg.vecdot(x, y),
                        torch.linalg.vector_norm(x, dim=-1).square(), torch.linalg.vector_norm(y, dim=-1).square()],
                       dim=-1)


def pairwise_stats(
    x: Tensor,
    y: Tensor,
    metrics: Sequence[str],
    grid: tuple[int, int, int] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Tensor]:
    """Several metrics of the same pair at once, l1, rel_l1 and cosine from one set of sums.

    ``metrics`` are names from :data:`METRIC_NAMES`; ``"ssim"`` needs ``grid``. Returns
    ``{name: [...] tensor}`` in the order asked.
    """
    _check_pair(x, y)
    unknown = [name for name in metrics if name not in METRIC_NAMES]
    if unknown:
        raise DitlensError(f"unknown redundancy metric(s) {', '.join(map(repr, unknown))}; choose from {', '.join(METRIC_NAMES)}")
    wanted = set(metrics)
    if "ssim" in wanted:
        _check_grid(x.shape[-2], grid)

    computed: dict[str, Tensor] = {}
    if wanted & SUM_METRICS:
        n, c = x.shape[-2], x.shape[-1]
        sums = None
        if x.is_cuda and dtype == torch.float32 and x.numel():
            # One fused pass over the (bf16/fp16) inputs instead of several float32 passes.
            from ditlens.kernels.pair_stats import pair_sums, pair_sums_available

            if pair_sums_available(x):
                sums = pair_sums([x.reshape(-1, n, c)], [y.reshape(-1, n, c)])[0].reshape(*x.shape[:-2], 5)
        if sums is None:
            sums = pair_sums_torch(x, y, dtype)
        computed.update(metrics_from_sums(sums, n * c))
    if "ssim" in wanted:
        assert grid is not None  # checked above
        computed["ssim"] = ssim(x, y, grid, dtype=dtype)
    return {name: computed[name] for name in metrics}


def coefficient_of_variation(values: np.ndarray, axis: int = 0) -> np.ndarray:
    """std / mean over ``axis`` (ddof = 0), ignoring NaNs (e.g. the NaN of step 0).

    A slice that is all NaN gives NaN; a zero mean gives inf or NaN. No warnings.
    """
    values = np.asarray(values, dtype=np.float64)
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices
        return np.nanstd(values, axis=axis, ddof=0) / np.nanmean(values, axis=axis)


def v1_loss(
    o: Tensor,
    o_compressed: Tensor,
    dims: int | Sequence[int] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """DiTFastAttn's plan-search loss: mean of clip(|O - O'| / (max(|O|, |O'|) + 1e-6), 0, 10).

    The mean runs over ``dims`` (all dims by default, giving a 0-d tensor). As printed in
    the paper; note the ratio never exceeds 2 (|O - O'| <= 2 max(|O|, |O'|)), so the clip
    only documents the intended bound.
    """
    if o.shape != o_compressed.shape:
        raise DitlensError(f"v1_loss inputs differ in shape: {tuple(o.shape)} vs {tuple(o_compressed.shape)}")
    o = o.to(dtype)
    o_compressed = o_compressed.to(dtype)
    ratio = (o - o_compressed).abs() / (torch.maximum(o.abs(), o_compressed.abs()) + 1e-6)
    ratio = ratio.clamp(0.0, 10.0)
    if dims is None:
        return ratio.mean()
    return ratio.mean(dim=dims)


def rse(o: Tensor, o_compressed: Tensor, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """DiTFastAttnV2 influence per head: sum (O' - O)^2 / sum (O - mean(O))^2 over the
    head's (N, C), with mean(O) the mean over the head: ``[..., N, C] -> [...]``."""
    _check_pair(o, o_compressed)
    o = o.to(dtype)
    o_compressed = o_compressed.to(dtype)
    dims = (-2, -1)
    error = (o_compressed - o).pow(2).sum(dim=dims)
    spread = (o - o.mean(dim=dims, keepdim=True)).pow(2).sum(dim=dims)
    return error / spread
