"""window2d (2D neighbourhood attention) against a brute-force mask and a float64 dense reference.

The Triton kernel runs under Triton's interpreter on the CPU (tiny tiles, grids that are not
multiples of the tiles, text first and last, frames) and compiled on CUDA (``gpu`` tests, the
production tiles and head dims 64, 72 and 128).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # see tests/test_kernels.py


import numpy as np  # noqa: E402
import pytest  # noqa: E402

from ditlens.errors import DitlensError  # noqa: E402
from ditlens.kernels.triton_backend import interpreting  # noqa: E402
from ditlens.kernels.window2d import (  # noqa: E402
    Window2dConfig,
    window2d_attention,
    window2d_attention_reference,
    window2d_mask,
    window2d_pairs,
    window2d_triton,
)
from ditlens.kernels.patterns import TokenLayout  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
INTERPRETER = interpreting()
GPU = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]
CPU_INTERPRETER = pytest.mark.skipif(not INTERPRETER, reason="Triton is not in interpreter mode here "
                                                            "(see test_interpreter_tests_in_subprocess)")


def _brute_mask(radius: int, grid: tuple[int, int, int], n_text: int, text_first: bool) -> np.ndarray:
    """The DESIGN §5 rule, pair by pair, from explicit (frame, row, col) coordinates."""
    frames, rows, cols = grid
    coords = [(f, r, c) for f in range(frames) for r in range(rows) for c in range(cols)]
    kinds = (["text"] * n_text + coords) if text_first else (coords + ["text"] * n_text)
    L = len(kinds)
    out = np.zeros((L, L), dtype=bool)
    for i, a in enumerate(kinds):
        for j, b in enumerate(kinds):
            if a == "text" or b == "text":
                out[i, j] = a == b
            else:
                out[i, j] = abs(a[1] - b[1]) <= radius and abs(a[2] - b[2]) <= radius
    return out


@pytest.mark.parametrize("grid,n_text,text_first,radius", [
    ((1, 4, 6), 0, False, 1), ((2, 3, 5), 2, True, 1), ((1, 5, 3), 3, False, 0), ((3, 2, 2), 1, False, 4)])
def test_mask_and_pair_count_match_the_rule(grid, n_text, text_first, radius):
    L = grid[0] * grid[1] * grid[2] + n_text
    mask = window2d_mask([radius, radius + 1], grid, L, n_text=n_text, text_first=text_first)
    for h, r in enumerate([radius, radius + 1]):
        expect = _brute_mask(r, grid, n_text, text_first)
        np.testing.assert_array_equal(mask[h].numpy(), expect)
        assert window2d_pairs(r, grid, n_text) == int(expect.sum())


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _qkv(B, H, L, D, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, D, generator=g).to(dtype=dtype, device=device) for _ in range(3)]


CASES = [  # grid, n_text, text_first, per-head radii, head dim
    ((1, 5, 7), 0, False, [1, 2], 16),
    ((2, 6, 5), 3, True, [0, 3], 24),        # frames, text first, radius 0
    ((1, 9, 8), 5, False, [2, 20], 72),      # text last, split head dim, a radius covering the grid
    ((1, 12, 16), 0, False, [6, 3], 16),     # interior key tiles (no mask) next to edge tiles one column out
]
CPU_TILES = [Window2dConfig(4, 4, 4, 4, 1, 1), Window2dConfig(2, 8, 8, 2, 1, 1), Window2dConfig(4, 4, 4, 4, 1, 1, tma=True)]


@CPU_INTERPRETER
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("config", CPU_TILES, ids=["4x4-4x4", "2x8-8x2", "4x4-4x4-tma"])
def test_triton_matches_float64_reference(case, dtype, config):
    grid, n_text, text_first, radii, D = case
    L = grid[0] * grid[1] * grid[2] + n_text
    q, k, v = _qkv(2, len(radii), L, D, dtype, "cpu")
    layout = TokenLayout(L, n_text, text_first)
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    window2d_triton(q, k, v, tuple(radii), grid, layout, D ** -0.5, config, out=out)
    ref = window2d_attention_reference(q, k, v, radius=radii, grid=grid, n_text=n_text, text_first=text_first,
                                       out_dtype=torch.float64)
    assert not out.isnan().any()
    assert _rel_err(out, ref) < (2.5e-2 if dtype == torch.bfloat16 else 4e-3)


@CPU_INTERPRETER
def test_triton_reads_diffusers_views_in_place():
    """q, k, v as [B, L, H, D] storage viewed [B, H, L, D] (as diffusers passes them): same result."""
    grid, n_text, radius = (1, 6, 6), 4, 2
    L = 36 + n_text
    base = [torch.randn(1, L, 2, 32).to(torch.float16) for _ in range(3)]
    q, k, v = (t.transpose(1, 2) for t in base)
    out = window2d_attention(q, k, v, radius=radius, grid=grid[1:], n_text=n_text, backend="triton")
    ref = window2d_attention_reference(q, k, v, radius=radius, grid=grid, n_text=n_text, out_dtype=torch.float64)
    assert _rel_err(out, ref) < 4e-3
    assert out.stride(1) < out.stride(2), "the output keeps q's [B, L, H, D] storage"


@pytest.mark.parametrize("backend", ["flex", "sdpa"])
def test_torch_backends_match_reference(backend):
    grid, n_text = (2, 4, 5), 3
    L = 40 + n_text
    q, k, v = _qkv(1, 2, L, 16, torch.float32, "cpu")
    out = window2d_attention(q, k, v, radius=[1, 2], grid=grid, n_text=n_text, text_first=True, backend=backend)
    ref = window2d_attention_reference(q, k, v, radius=[1, 2], grid=grid, n_text=n_text, text_first=True,
                                       out_dtype=torch.float64)
    assert _rel_err(out, ref) < 1e-5


def test_bad_input_is_one_clear_error():
    q, k, v = _qkv(1, 2, 20, 16, torch.float32, "cpu")
    with pytest.raises(DitlensError, match="grid .* holds 16 image tokens but the sequence has 20"):
        window2d_attention(q, k, v, radius=1, grid=(4, 4), backend="sdpa")
    with pytest.raises(DitlensError, match="radius must be >= 0"):
        window2d_attention(q, k, v, radius=-1, grid=(4, 5), backend="sdpa")
    with pytest.raises(DitlensError, match="radius has 3 entries but the input has 2 heads"):
        window2d_attention(q, k, v, radius=[1, 1, 1], grid=(4, 5), backend="sdpa")
    with pytest.raises(DitlensError, match="grid must be"):
        window2d_attention(q, k, v, radius=1, grid=(20,), backend="sdpa")


@CPU_INTERPRETER
@pytest.mark.parametrize("kind,text_position,grid,n_text", [("self", "none", (1, 5, 6), 0),
                                                            ("joint", "first", (1, 4, 5), 3)])
def test_runtime_runs_window2d_layers_on_the_kernel(kind, text_position, grid, n_text, monkeypatch):
    """A plan's window2d heads go to the window2d kernel (float16 under the interpreter) and match the
    float64 reference of the plan, step by step; FLOPs count the exact 2D pairs."""
    import ditlens.kernels.window2d as w2d
    from test_compress import make_plan, run_and_reference

    calls = []
    monkeypatch.setattr(w2d, "window2d_attention", lambda *a, _f=w2d.window2d_attention, **kw: calls.append(
        (kw["radius"], kw["grid"])) or _f(*a, **kw))
    methods = [["full"] * 4, ["window2d(1)"] * 4, ["window2d(2)", "window2d(2)", "ast", "full"]]
    plan = make_plan(kind, 4, 16, methods, "batched_cond_first", grid, n_text=n_text, text_position=text_position)
    got, want, runtime, executed, _ = run_and_reference(plan, backend="kernels", dtype=torch.float16)
    for s, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, atol=4e-3, rtol=1e-2, msg=f"step {s}")
    assert calls == [(1, grid), (2, grid)]
    assert runtime.flops.core == 4 * 16 * executed


GPU_CASES = [  # grid, n_text, text_first, radii, head dim
    ((1, 32, 32), 0, False, [3, 8, 31], 72),       # DiT-512-like, split head dim
    ((1, 64, 64), 0, False, [4, 16], 72),          # PixArt-1K grid
    ((1, 64, 64), 512, True, [8, 16], 128),        # FLUX-1K: text first
    ((1, 64, 64), 333, False, [6, 64], 64),        # SD3-like: text last, odd text count
    ((3, 20, 36), 0, False, [5, 0], 64),           # video-like frames, grid not a multiple of the tiles
]


@pytest.mark.parametrize("tma", [False, True], ids=["gather", "tma"])
@pytest.mark.parametrize("n_image", [64 * 64, 32 * 32], ids=["long-tiles", "short-tiles"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", GPU_CASES)
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_triton_matches_reference_on_gpu(case, dtype, n_image, tma):
    from dataclasses import replace

    from ditlens.kernels.window2d import default_window2d_config

    grid, n_text, text_first, radii, D = case
    L = grid[0] * grid[1] * grid[2] + n_text
    q, k, v = _qkv(2, len(radii), L, D, dtype, "cuda")
    layout = TokenLayout(L, n_text, text_first)
    out = torch.full_like(q, float("nan"))
    config = replace(default_window2d_config(False, n_image), tma=tma)  # both GPU defaults, either load path
    window2d_triton(q, k, v, tuple(radii), grid, layout, D ** -0.5, config, out=out)
    ref = window2d_attention_reference(q, k, v, radius=radii, grid=grid, n_text=n_text, text_first=text_first,
                                       out_dtype=torch.float64)
    assert not out.isnan().any()
    assert _rel_err(out, ref) < (2.5e-2 if dtype == torch.bfloat16 else 4e-3)


@pytest.mark.skipif(HAS_CUDA or INTERPRETER, reason="the interpreter tests ran in this process")
def test_interpreter_tests_in_subprocess():
    from interpreter_support import rerun_under_interpreter

    rerun_under_interpreter(__file__)
