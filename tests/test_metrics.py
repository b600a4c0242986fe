"""ditlens.analyzer.metrics against independent references: numpy float64 formulas,
scipy's Gaussian filter and scikit-image's structural_similarity."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter1d
from skimage.metrics import structural_similarity

from ditlens.analyzer import metrics
from ditlens.errors import DitlensError

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SSIM_GRIDS = [(1, 4, 4), (1, 5, 7), (2, 8, 8), (1, 16, 16), (1, 32, 32), (3, 2, 6), (1, 1, 5), (2, 3, 3)]


# ---------------------------------------------------------------- references (numpy float64)


def ref_l1(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.abs(x - y).mean(axis=(-2, -1))


def ref_rel_l1(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.abs(x - y).mean(axis=(-2, -1)) / np.abs(y).mean(axis=(-2, -1))


def ref_cosine(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    flat_x = x.reshape(*x.shape[:-2], -1)
    flat_y = y.reshape(*y.shape[:-2], -1)
    return (flat_x * flat_y).sum(-1) / (np.linalg.norm(flat_x, axis=-1) * np.linalg.norm(flat_y, axis=-1))


def ref_rse(o: np.ndarray, o_compressed: np.ndarray) -> np.ndarray:
    out = np.empty(o.shape[:-2])
    for index in np.ndindex(*o.shape[:-2]):
        head = o[index]
        out[index] = ((o_compressed[index] - head) ** 2).sum() / ((head - head.mean()) ** 2).sum()
    return out


def ref_v1_loss(o: np.ndarray, o_compressed: np.ndarray, axis=None) -> np.ndarray:
    ratio = np.abs(o - o_compressed) / (np.maximum(np.abs(o), np.abs(o_compressed)) + 1e-6)
    return np.clip(ratio, 0, 10).mean(axis=axis)


def ref_ssim(x: np.ndarray, y: np.ndarray, grid: tuple[int, int, int]) -> np.ndarray:
    """scikit-image per (head, frame, channel) image, then the mean over frames and channels."""
    frames, height, width = grid
    win_size = metrics.ssim_window_size(height, width)
    out = np.empty(x.shape[:-2])
    for index in np.ndindex(*x.shape[:-2]):
        head_x = x[index].reshape(frames, height, width, -1)
        head_y = y[index].reshape(frames, height, width, -1)
        data_range = head_y.max() - head_y.min()
        scores = [
            structural_similarity(
                head_x[f, :, :, c], head_y[f, :, :, c], gaussian_weights=True, sigma=1.5,
                use_sample_covariance=False, data_range=data_range, win_size=win_size,
            )
            for f in range(frames)
            for c in range(head_x.shape[-1])
        ]
        out[index] = np.mean(scores)
    return out


def pair(rng: np.random.Generator, shape: tuple[int, ...], kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Random pairs: independent, correlated (y = x + noise), or correlated with an offset and
    per-channel scales (a stress test for float32 variance cancellation)."""
    x = rng.standard_normal(shape)
    if kind == "random":
        return x, rng.standard_normal(shape)
    y = x + 0.3 * rng.standard_normal(shape)
    if kind == "offset":
        scale = rng.uniform(0.2, 3.0, size=shape[-1])
        return 4.0 + scale * x, 4.0 + scale * y
    return x, y


# ---------------------------------------------------------------- checks shared by CPU and GPU


def check_elementwise_metrics(device: str) -> None:
    rng = np.random.default_rng(1)
    for shape in [(3, 5), (2, 7, 4), (2, 3, 11, 6)]:
        for kind in ("random", "correlated"):
            x, y = pair(rng, shape, kind)
            tx = torch.tensor(x, device=device)
            ty = torch.tensor(y, device=device)
            for name, fn, ref in [
                ("l1", metrics.l1, ref_l1),
                ("rel_l1", metrics.rel_l1, ref_rel_l1),
                ("cosine", metrics.cosine, ref_cosine),
                ("rse", metrics.rse, ref_rse),
            ]:
                expected = ref(x, y)
                got64 = fn(tx, ty, dtype=torch.float64)
                assert got64.dtype == torch.float64 and got64.shape == shape[:-2], name
                np.testing.assert_allclose(got64.cpu().numpy(), expected, rtol=1e-12, atol=1e-12, err_msg=name)
                got32 = fn(tx.float(), ty.float())
                assert got32.dtype == torch.float32, name
                np.testing.assert_allclose(got32.cpu().numpy(), expected, rtol=1e-5, atol=1e-6, err_msg=name)
            np.testing.assert_allclose(
                metrics.v1_loss(tx, ty, dtype=torch.float64).cpu().numpy(), ref_v1_loss(x, y), rtol=1e-12
            )
            np.testing.assert_allclose(
                metrics.v1_loss(tx.float(), ty.float(), dims=(-2, -1)).cpu().numpy(),
                ref_v1_loss(x, y, axis=(-2, -1)), rtol=1e-5,
            )


def check_ssim_against_skimage(device: str) -> None:
    rng = np.random.default_rng(2)
    for grid in SSIM_GRIDS:
        tokens = grid[0] * grid[1] * grid[2]
        for kind in ("random", "correlated", "offset"):
            x, y = pair(rng, (2, 2, tokens, 3), kind)
            expected = ref_ssim(x, y, grid)
            tx = torch.tensor(x, device=device)
            ty = torch.tensor(y, device=device)
            got64 = metrics.ssim(tx, ty, grid, dtype=torch.float64)
            assert got64.shape == (2, 2) and got64.dtype == torch.float64
            np.testing.assert_allclose(got64.cpu().numpy(), expected, atol=1e-9, err_msg=f"{grid} {kind}")
            got32 = metrics.ssim(tx.float(), ty.float(), grid)
            assert got32.dtype == torch.float32
            np.testing.assert_allclose(got32.cpu().numpy(), expected, atol=1e-5, err_msg=f"{grid} {kind}")


# ---------------------------------------------------------------- CPU tests


def test_elementwise_metrics_match_numpy() -> None:
    check_elementwise_metrics("cpu")


def test_ssim_matches_skimage() -> None:
    check_ssim_against_skimage("cpu")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_are_computed_in_float32(dtype: torch.dtype) -> None:
    rng = np.random.default_rng(3)
    x, y = pair(rng, (2, 4, 64, 8), "correlated")
    low_x = torch.tensor(x).to(dtype)
    low_y = torch.tensor(y).to(dtype)
    # The reference sees exactly the rounded values the metric sees.
    x, y = low_x.double().numpy(), low_y.double().numpy()
    for fn, ref in [(metrics.l1, ref_l1), (metrics.rel_l1, ref_rel_l1), (metrics.cosine, ref_cosine), (metrics.rse, ref_rse)]:
        got = fn(low_x, low_y)
        assert got.dtype == torch.float32
        np.testing.assert_allclose(got.numpy(), ref(x, y), rtol=1e-5, atol=1e-6)
    got = metrics.ssim(low_x, low_y, (1, 8, 8))
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), ref_ssim(x, y, (1, 8, 8)), atol=1e-5)


def test_identical_inputs() -> None:
    x = torch.randn(2, 3, 64, 5)
    for dtype, tol in [(torch.float32, 1e-6), (torch.float64, 1e-12)]:
        assert torch.equal(metrics.l1(x, x, dtype=dtype), torch.zeros(2, 3, dtype=dtype))
        assert torch.equal(metrics.rel_l1(x, x, dtype=dtype), torch.zeros(2, 3, dtype=dtype))
        assert torch.equal(metrics.rse(x, x, dtype=dtype), torch.zeros(2, 3, dtype=dtype))
        assert metrics.v1_loss(x, x, dtype=dtype).item() == 0.0
        torch.testing.assert_close(metrics.cosine(x, x, dtype=dtype), torch.ones(2, 3, dtype=dtype), atol=tol, rtol=0)
        torch.testing.assert_close(metrics.cosine(x, -x, dtype=dtype), -torch.ones(2, 3, dtype=dtype), atol=tol, rtol=0)
        torch.testing.assert_close(metrics.ssim(x, x, (1, 8, 8), dtype=dtype), torch.ones(2, 3, dtype=dtype), atol=tol, rtol=0)


def test_ssim_of_a_constant_reference() -> None:
    # R = 0 makes scikit-image divide 0 by 0; ours is 1 for identical heads, NaN otherwise.
    y = torch.full((2, 16, 2), 0.5)
    x = y.clone()
    x[1, 3, 1] = 0.7
    got = metrics.ssim(x, y, (1, 4, 4))
    assert got[0].item() == 1.0
    assert torch.isnan(got[1])
    # A constant X against a varying Y is well defined and follows scikit-image.
    y_varying = torch.randn(1, 16, 2, dtype=torch.float64)
    x_constant = torch.zeros_like(y_varying)
    np.testing.assert_allclose(
        metrics.ssim(x_constant, y_varying, (1, 4, 4), dtype=torch.float64).numpy(),
        ref_ssim(x_constant.numpy(), y_varying.numpy(), (1, 4, 4)), atol=1e-12,
    )


def test_ssim_chunking_does_not_change_the_result() -> None:
    x = torch.randn(3, 4, 36, 5)
    y = x + 0.5 * torch.randn_like(x)
    whole = metrics.ssim(x, y, (1, 6, 6))
    for chunk_elements in (1, 36 * 5 * 5, 10**9):
        torch.testing.assert_close(metrics.ssim(x, y, (1, 6, 6), chunk_elements=chunk_elements), whole, atol=1e-7, rtol=0)
    # Empty leading dims give an empty result.
    assert metrics.ssim(x[:0], y[:0], (1, 6, 6)).shape == (0, 4)


@pytest.mark.parametrize("length", range(1, 13))
def test_gaussian_filter_matrix_matches_scipy(length: int) -> None:
    # Kernel radius 5 is longer than short axes: the reflection must repeat like scipy's.
    signal = np.random.default_rng(length).standard_normal((length, 3))
    matrix = metrics.gaussian_filter_matrix(length, dtype=torch.float64).numpy()
    expected = gaussian_filter1d(signal, sigma=1.5, truncate=3.5, mode="reflect", axis=0)
    np.testing.assert_allclose(matrix @ signal, expected, atol=1e-14)


@pytest.mark.parametrize(
    ("height", "width", "expected"),
    [(1, 1, 1), (2, 2, 1), (3, 3, 3), (4, 4, 3), (5, 7, 5), (8, 6, 5), (10, 10, 9), (11, 40, 11), (32, 32, 11), (12, 100, 11)],
)
def test_ssim_window_size(height: int, width: int, expected: int) -> None:
    assert metrics.ssim_window_size(height, width) == expected


def test_rse_is_one_when_the_output_is_replaced_by_its_mean() -> None:
    o = torch.randn(2, 3, 40, 6, dtype=torch.float64) * 2 + 1
    mean_only = o.mean(dim=(-2, -1), keepdim=True).expand_as(o)
    torch.testing.assert_close(metrics.rse(o, mean_only, dtype=torch.float64), torch.ones(2, 3, dtype=torch.float64))
    torch.testing.assert_close(metrics.rse(o.float(), mean_only.float()), torch.ones(2, 3), atol=1e-5, rtol=0)


def test_v1_loss_bounds_and_reduction_dims() -> None:
    # Opposite signs reach the largest possible ratio, 2 / (1 + 1e-6) < 10: the clip never binds.
    o = torch.ones(4, 3, dtype=torch.float64)
    assert metrics.v1_loss(o, -o, dtype=torch.float64).item() == pytest.approx(2 / (1 + 1e-6), abs=1e-15)
    zeros = torch.zeros(4, 3)
    assert metrics.v1_loss(zeros, zeros).item() == 0.0
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((2, 3, 5, 7)), rng.standard_normal((2, 3, 5, 7))
    ta, tb = torch.tensor(a), torch.tensor(b)
    for dims, axis in [(None, None), (0, 0), ((-2, -1), (-2, -1)), ((1, 2, 3), (1, 2, 3))]:
        got = metrics.v1_loss(ta, tb, dims=dims, dtype=torch.float64).numpy()
        np.testing.assert_allclose(got, ref_v1_loss(a, b, axis=axis), rtol=1e-12)
    with pytest.raises(DitlensError):
        metrics.v1_loss(ta, tb[..., :3])


def test_degenerate_denominators_follow_the_formula() -> None:
    zeros = torch.zeros(1, 4, 3)
    ones = torch.ones(1, 4, 3)
    assert torch.isnan(metrics.cosine(zeros, ones)).all()
    assert torch.isinf(metrics.rel_l1(ones, zeros)).all()
    assert torch.isnan(metrics.rel_l1(zeros, zeros)).all()
    assert torch.isinf(metrics.rse(ones, zeros)).all()


def test_pairwise_stats_matches_the_single_metrics() -> None:
    x = torch.randn(2, 3, 64, 4, dtype=torch.bfloat16)
    y = (x.float() + 0.2 * torch.randn(2, 3, 64, 4)).to(torch.bfloat16)
    names = ["ssim", "cosine", "l1", "rel_l1"]
    stats = metrics.pairwise_stats(x, y, names, (1, 8, 8))
    assert list(stats) == names
    singles = {
        "l1": metrics.l1(x, y), "rel_l1": metrics.rel_l1(x, y),
        "cosine": metrics.cosine(x, y), "ssim": metrics.ssim(x, y, (1, 8, 8)),
    }
    for name in names:
        assert stats[name].dtype == torch.float32 and stats[name].shape == (2, 3)
        torch.testing.assert_close(stats[name], singles[name], atol=1e-6, rtol=1e-6)
    only_rel = metrics.pairwise_stats(x, y, ["rel_l1"], None)
    assert list(only_rel) == ["rel_l1"]
    torch.testing.assert_close(only_rel["rel_l1"], singles["rel_l1"])


def test_bad_arguments_raise_one_line_errors() -> None:
    x = torch.randn(2, 16, 3)
    with pytest.raises(DitlensError, match="unknown redundancy metric"):
        metrics.pairwise_stats(x, x, ["l1", "psnr"], None)
    with pytest.raises(DitlensError, match="grid"):
        metrics.pairwise_stats(x, x, ["ssim"], None)
    with pytest.raises(DitlensError, match="does not hold"):
        metrics.ssim(x, x, (1, 4, 5))
    with pytest.raises(DitlensError, match="shape"):
        metrics.l1(x, x[:, :8])
    with pytest.raises(DitlensError):
        metrics.ssim_window_size(0, 4)
    with pytest.raises(DitlensError) as info:
        metrics.cosine(x, x[:1])
    assert "\n" not in str(info.value)


def test_coefficient_of_variation() -> None:
    rng = np.random.default_rng(5)
    values = rng.uniform(0.5, 2.0, size=(6, 4, 3, 2))  # (prompts, steps, layers, heads)
    for axis in (0, 1, -1):
        expected = np.std(values, axis=axis, ddof=0) / np.mean(values, axis=axis)
        np.testing.assert_allclose(metrics.coefficient_of_variation(values, axis=axis), expected, rtol=1e-12)

    with_nan = values.copy()
    with_nan[0, 0] = np.nan  # step 0 of prompt 0 missing
    with_nan[:, 1, 0, 0] = np.nan  # a slice missing for every prompt
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # all-NaN slices must not warn
        got = metrics.coefficient_of_variation(with_nan, axis=0)
    assert got.shape == (4, 3, 2)
    for index in np.ndindex(*got.shape):
        column = with_nan[(slice(None), *index)]
        kept = column[~np.isnan(column)]
        if kept.size == 0:
            assert np.isnan(got[index])
        else:
            assert got[index] == pytest.approx(kept.std() / kept.mean(), rel=1e-12)


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@CUDA
def test_metrics_on_cuda() -> None:
    check_elementwise_metrics("cuda")
    check_ssim_against_skimage("cuda")
    x = torch.randn(2, 16, 4096, 72, device="cuda", dtype=torch.bfloat16)
    y = (x.float() + 0.1 * torch.randn_like(x, dtype=torch.float32)).to(torch.bfloat16)
    on_gpu = metrics.ssim(x, y, (1, 64, 64))
    on_cpu = metrics.ssim(x.cpu()[:, :2], y.cpu()[:, :2], (1, 64, 64), dtype=torch.float64)
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.float32
    torch.testing.assert_close(on_gpu[:, :2].cpu().double(), on_cpu, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_pair_sums_torch_equals_numpy_sums(dtype) -> None:
    """The CPU path of the profiler's distance sums: Σ|x-y|, Σ|y|, Σxy, Σx², Σy² per head, in float64 numpy."""
    from ditlens.analyzer.metrics import pair_sums_torch

    g = torch.Generator().manual_seed(3)
    x, y = (torch.randn(3, 4, 17, 6, generator=g).to(dtype) for _ in range(2))
    got = pair_sums_torch(x, y).double().numpy()
    a, b = x.double().numpy().reshape(3, 4, -1), y.double().numpy().reshape(3, 4, -1)
    want = np.stack([np.abs(a - b).sum(-1), np.abs(b).sum(-1), (a * b).sum(-1), (a * a).sum(-1), (b * b).sum(-1)], -1)
    assert got.shape == (3, 4, 5)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
