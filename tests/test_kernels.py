"""ditlens.kernels against float64 dense references and brute-force mask definitions.

On the CPU the Triton kernels run under Triton's interpreter (TRITON_INTERPRET=1); the same
tests marked ``gpu`` run the compiled kernels on CUDA with longer sequences and the
production tile sizes.
"""

import os

import torch

if not torch.cuda.is_available():
    # CPU-only machine: backend="auto" routes CPU tensors to Triton's interpreter. (Explicit
    # backend="triton" on CPU tensors interprets regardless; on a CUDA machine the variable
    # would also push torch.compile's own Triton kernels into the interpreter.)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import itertools  # noqa: E402
import random  # noqa: E402
from dataclasses import replace  # noqa: E402

import pytest  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from ditlens.errors import DitlensError  # noqa: E402
from ditlens.kernels import (  # noqa: E402
    KernelConfig,
    TokenLayout,
    attended_pairs,
    attention_mask,
    available_backends,
    band_pairs,
    headwise_attention,
    headwise_attention_reference,
    resolve_backend,
    warsr_attention,
    warsr_attention_reference,
    window_for_sparsity,
    windowed_plus_residual,
)
from ditlens.kernels._triton_impl import _exp2_tile  # noqa: E402
from ditlens.kernels.gluon_backend import (  # noqa: E402
    _token_view,
    _views,
    check_gluon_inputs,
    gluon_available,
    headwise_gluon,
)
from ditlens.kernels.patterns import make_head_plan  # noqa: E402
from ditlens.kernels.triton_backend import (  # noqa: E402
    default_config,
    headwise_triton,
    interpreting,
    split_head_dim,
    warsr_triton,
    warsr_two_pass_triton,
)

HAS_CUDA = torch.cuda.is_available()
# Triton fixes interpreter mode when it is imported; if something imported it before this module
# could set TRITON_INTERPRET, the CPU kernel tests run in a subprocess instead (last test).
INTERPRETER = interpreting()
GPU_PARAM = pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu,
                                                   pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")])
DEVICES = [pytest.param("cpu", id="cpu"), GPU_PARAM]
TRITON_DEVICES = [
    pytest.param("cpu", id="cpu-interpreter", marks=pytest.mark.skipif(
        not INTERPRETER, reason="Triton is not in interpreter mode here (see test_interpreter_tests_in_subprocess)")),
    GPU_PARAM,
]
# CPU: tiny tiles so short sequences still span several blocks; CUDA: production tiles.
CPU_TILES = [KernelConfig(16, 16, 1, 1), KernelConfig(32, 16, 1, 1), KernelConfig(16, 32, 1, 1)]


def _tol(dtype: torch.dtype) -> float:
    return {torch.float16: 4e-3, torch.bfloat16: 2.5e-2, torch.float32: 1e-4}[dtype]


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _qkv(B, H, L, D, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, D, generator=g).to(dtype=dtype, device=device) for _ in range(3)]


def _scaled_len(L: int, device: str) -> int:
    # on CUDA, longer sequences exercise the 128-row tiles at several block boundaries
    return L if device == "cpu" else L * 9 + 3


# --------------------------------------------------------------------------------------
# Patterns and pair counts (pure, independent brute force)
# --------------------------------------------------------------------------------------

def _brute_allowed(mode, w, qi, ki, L, n_text, text_first):
    text = set(range(n_text)) if text_first else set(range(L - n_text, L))
    q_txt, k_txt = qi in text, ki in text
    if mode == "full":
        return True
    if mode == "skip":
        return False
    band = (not q_txt) and (not k_txt) and abs(qi - ki) <= w
    if mode == "window":
        return band or (q_txt and k_txt)
    return band or q_txt or k_txt  # arrow


@pytest.mark.parametrize("L,n_text,text_first", [(13, 0, False), (13, 4, True), (13, 4, False), (9, 9, True)])
def test_attention_mask_matches_brute_force_definition(L, n_text, text_first):
    modes = ["full", "window", "arrow", "skip", "window", "arrow"]
    windows = [0, 2, 1, 0, 50, 0]
    mask = attention_mask(modes, windows, L, n_text=n_text, text_first=text_first)
    assert mask.shape == (len(modes), L, L) and mask.dtype == torch.bool
    for h, (m, w) in enumerate(zip(modes, windows)):
        for qi, ki in itertools.product(range(L), range(L)):
            assert bool(mask[h, qi, ki]) == _brute_allowed(m, w, qi, ki, L, n_text, text_first), (m, w, qi, ki)


def test_attended_pairs_equal_mask_sum():
    rng = random.Random(0)
    for _ in range(60):
        L = rng.randint(1, 70)
        n_text = rng.randint(0, L)
        text_first = rng.random() < 0.5
        modes = [rng.choice(["full", "window", "arrow", "skip"]) for _ in range(4)]
        windows = [rng.choice([0, 1, 3, rng.randint(0, 80), 10**6]) for _ in range(4)]
        mask = attention_mask(modes, windows, L, n_text=n_text, text_first=text_first)
        pairs = attended_pairs(modes, windows, L, n_text=n_text, text_first=text_first)
        assert pairs == mask.sum(dim=(1, 2)).tolist()


def test_window_for_sparsity_hits_the_target_density():
    for n in (1024, 4096, 16384):
        for s in (0.25, 0.5, 0.75, 0.9):
            w = window_for_sparsity(n, s)
            kept = band_pairs(n, w) / n**2
            assert abs(kept - (1 - s)) <= (2 * n) / n**2, (n, s, w, kept)
    # band_pairs against brute force
    for n, w in [(7, 0), (7, 2), (7, 6), (7, 100), (1, 3)]:
        assert band_pairs(n, w) == sum(abs(i - j) <= w for i in range(n) for j in range(n))


def test_split_head_dim_pays_less_than_next_power_of_two():
    assert split_head_dim(64) == (64, 0)
    assert split_head_dim(128) == (128, 0)
    assert split_head_dim(72) == (64, 16)
    assert split_head_dim(96) == (64, 32)
    assert split_head_dim(8) == (16, 0)


def test_launch_configs_by_head_dim_and_plan():
    from types import SimpleNamespace

    from ditlens.kernels.triton_backend import _use_tma

    # all-full launches at D = 128: 64-row tiles, one stage, descriptors (two programs per SM on Hopper)
    assert default_config(128, interpret=False, all_full=True) == KernelConfig(64, 128, 4, 1, tma=True)
    # windowed launches with descriptors walk each key segment in one loop (D = 128, 64 and the split D = 72)
    assert default_config(128, interpret=False) == KernelConfig(64, 128, 4, 1, tma=True, one_loop=True,
                                                                max_registers=168)
    assert default_config(72, interpret=False) == KernelConfig(128, 64, 4, 3, tma=True, one_loop=True)
    assert default_config(72, interpret=False, all_full=True) == default_config(72, interpret=False)
    assert default_config(64, interpret=False) == KernelConfig(128, 64, 4, 3, tma=True, one_loop=True)
    # a split head dim in a one-stage config loads through pointers on the GPU (illegal access seen on
    # an H200), and keeps descriptors in the interpreter, where the tests cover that path
    gpu_72 = SimpleNamespace(is_cuda=True, shape=(1, 1, 8, 72), device=SimpleNamespace(index=0))
    assert not _use_tma(gpu_72, KernelConfig(64, 128, 4, 1, tma=True))
    import triton.language as tl

    if hasattr(tl, "make_tensor_descriptor"):
        assert _use_tma(torch.zeros(1, 1, 8, 72), KernelConfig(16, 16, 1, 1, tma=True))


def test_default_launch_without_descriptors_walks_three_loops(monkeypatch):
    # one loop per segment pays off with descriptor loads only: a default config that loses them (an
    # Ampere GPU, an old triton) falls back to three loops, while a config the caller gave is kept
    from types import SimpleNamespace

    from ditlens.kernels import triton_backend

    plan = make_head_plan(["window", "arrow"], [3, 5], 2, 16384)
    ampere = SimpleNamespace(is_cuda=True, shape=(1, 2, 16384, 72), device=SimpleNamespace(index=0))
    monkeypatch.setattr(triton_backend, "_compute_capability", lambda index: (8, 0))
    cfg, use_tma = triton_backend.launch_config(ampere, plan)
    assert not use_tma and not cfg.one_loop and cfg.block_m == 128 and cfg.block_n == 64
    given = KernelConfig(128, 64, 4, 3, tma=True, one_loop=True)
    assert triton_backend.launch_config(ampere, plan, given) == (given, False)
    if triton_backend._triton_has_tensor_descriptors():
        monkeypatch.setattr(triton_backend, "_compute_capability", lambda index: (9, 0))
        cfg, use_tma = triton_backend.launch_config(ampere, plan)
        assert use_tma and cfg.one_loop


# --------------------------------------------------------------------------------------
# Triton kernels vs the float64 reference
# --------------------------------------------------------------------------------------

MIXED = (["full", "window", "arrow", "skip", "arrow", "window"], [0, 3, 5, 0, 0, 10**6])
KERNEL_CASES = [
    # (B, L, D, n_text, text_first, dtype, modes, windows)
    (2, 37, 72, 5, True, torch.bfloat16, *MIXED),
    (1, 37, 64, 5, False, torch.float16, *MIXED),
    (2, 50, 16, 0, False, torch.float16, ["window", "full", "skip", "window", "arrow", "window"],
     [0, 0, 0, 7, 2, 100]),
    (1, 45, 128, 20, True, torch.bfloat16, ["arrow", "arrow", "window", "full", "skip", "skip"],
     [1, 30, 4, 0, 0, 0]),
]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("case", range(len(KERNEL_CASES)))
def test_triton_headwise_matches_reference_and_writes_every_element(device, case):
    B, L, D, n_text, text_first, dtype, modes, windows = KERNEL_CASES[case]
    L = _scaled_len(L, device)
    n_text = n_text if device == "cpu" else n_text * 7
    H = len(modes)
    q, k, v = _qkv(B, H, L, D, dtype, device, seed=case)
    cached = torch.randn(B, H, L, D, device=device).to(dtype)
    plan = make_head_plan(modes, windows, H, L)
    layout = TokenLayout(L, n_text, text_first)
    ref = headwise_attention_reference(q, k, v, modes=modes, windows=windows, n_text=n_text,
                                       text_first=text_first, cached=cached, out_dtype=torch.float64)
    # two tile shapes per case on the CPU (all three across the cases; the second loads K/V through
    # tensor descriptors), on CUDA the default tiles and the same tiles with the other K/V load path
    if device == "cpu":
        configs = [CPU_TILES[case % 3], replace(CPU_TILES[(case + 1) % 3], tma=True)]
    else:
        default = default_config(D, interpret=False)
        configs = [None, replace(default, tma=not default.tma)]
    if split_head_dim(D)[1]:  # a split head dim: its Q and O through descriptors as well
        configs.append(replace(configs[1] if device == "cpu" else default, tma=True, qo_tma_split_dim=True))
    for cfg in configs:
        out = torch.full_like(q, float("nan"))
        headwise_triton(q, k, v, plan, layout, D ** -0.5, cached=cached, config=cfg, out=out)
        assert not torch.isnan(out).any(), f"unwritten or NaN output elements with {cfg}"
        for h in range(H):
            if modes[h] == "skip":
                assert torch.equal(out[:, h], cached[:, h]), "skip heads must copy the cache bit for bit"
            else:
                err = _rel_err(out[:, h], ref[:, h])
                assert err < _tol(dtype), (cfg, h, modes[h], windows[h], err)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("L, D", [(37, 72), (32, 128), (45, 64)])
def test_all_full_launch_matches_reference(device, L, D):
    # every head full: the kernel compiles without the window/arrow rules (one key range, only the last
    # block masked at L); a partial and an exact last block, both K/V load paths, a split head dim
    B, H = 2, 3
    L = _scaled_len(L, device) if L % 16 else (L if device == "cpu" else L * 32)
    q, k, v = _qkv(B, H, L, D, torch.bfloat16, device, seed=L + D)
    modes = ["full"] * H
    plan, layout = make_head_plan(modes, [0] * H, H, L), TokenLayout(L, 0, False)
    assert plan.all_full
    ref = headwise_attention_reference(q, k, v, modes=modes, windows=[0] * H, out_dtype=torch.float64)
    base = CPU_TILES[1] if device == "cpu" else default_config(D, interpret=False, all_full=True)
    for tma, qo in ((False, False), (True, False), (True, True)):  # qo: Q and O of a split head dim too
        cfg = replace(base, tma=tma, qo_tma_split_dim=qo)
        if qo and (not split_head_dim(D)[1] or (device == "cuda" and cfg.num_stages == 1)):
            continue  # nothing to split, or a one-stage launch, where D = 72 runs by pointer anyway
        out = torch.full_like(q, float("nan"))
        headwise_triton(q, k, v, plan, layout, D ** -0.5, config=cfg, out=out)
        assert not torch.isnan(out).any(), cfg
        assert _rel_err(out, ref) < _tol(torch.bfloat16), cfg
    sdpa = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert torch.allclose(ref, sdpa, atol=1e-9), "the reference itself"


@triton.jit
def _exp2_tile_kernel(X, Y, POLY: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    offs = tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :]
    tl.store(Y + offs, _exp2_tile(tl.load(X + offs), POLY))


def test_poly_exp2_tile_matches_numpy():
    # KernelConfig.poly_exp's exponentials: the emulated columns within 1e-4 of exp2 (numpy, float64),
    # exactly 0 at -inf and below -125 (masked scores), and the SFU columns untouched
    import numpy as np

    if not INTERPRETER:
        pytest.skip("Triton is not in interpreter mode here (see test_interpreter_tests_in_subprocess)")
    g = torch.Generator().manual_seed(0)
    x = -torch.rand(16, 32, generator=g) * 140  # down to -140: below the -125 clamp too
    x[::3] = -torch.rand(32, generator=g) * 3  # rows of large exponentials
    x[:, 24:28] = torch.tensor([0.0, -0.5, float("-inf"), -125.0])  # the emulated quarter's edge cases
    x[:, 8:10] = float("-inf")
    ref = np.exp2(x.double().numpy())
    for poly, emulated in ((0, []), (2, range(16, 32)), (4, range(24, 32))):
        y = torch.empty_like(x)
        _exp2_tile_kernel[(1,)](x, y, poly, 16, 32)
        y = y.double().numpy()
        sfu = [c for c in range(32) if c not in emulated]
        assert np.array_equal(y[:, sfu], np.exp2(x[:, sfu].numpy()).astype(np.float64)), poly
        if emulated:
            cols = list(emulated)
            big = ref[:, cols] >= 2.0 ** -125
            rel = np.abs(y[:, cols] - ref[:, cols]) / np.where(big, ref[:, cols], 1.0)
            assert rel[big].max() < 1e-4, (poly, rel[big].max())
            assert np.all(y[:, cols][~big] == 0.0), poly


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("poly_exp", [2, 4])
def test_poly_exp_launches_match_reference(device, poly_exp):
    # ½ or ¼ of the unmasked exponentials by polynomial: the all-full launch, the one-loop and the
    # three-loop windowed walks (edge blocks keep exp2), text first, fp16 at its tight tolerance
    B, L, D, n_text = 2, _scaled_len(70, device), 128, (9 if device == "cpu" else 63)
    modes, windows = ["full", "window", "arrow", "skip", "full"], [0, 6, 3, 0, 0]
    H = len(modes)
    q, k, v = _qkv(B, H, L, D, torch.float16, device, seed=poly_exp)
    cached = torch.randn(B, H, L, D).to(dtype=torch.float16, device=device)
    layout = TokenLayout(L, n_text, True)
    base = CPU_TILES[1] if device == "cpu" else default_config(D, interpret=False)
    for mixed in (True, False):
        m = modes if mixed else ["full"] * H
        w = windows if mixed else [0] * H
        plan = make_head_plan(m, w, H, L)
        ref = headwise_attention_reference(q, k, v, modes=m, windows=w, n_text=n_text, text_first=True,
                                           cached=cached, out_dtype=torch.float64)
        for one_loop in (True, False):
            cfg = replace(base, tma=True, one_loop=one_loop, poly_exp=poly_exp)
            out = torch.full_like(q, float("nan"))
            headwise_triton(q, k, v, plan, layout, D ** -0.5, cached=cached, config=cfg, out=out)
            assert not torch.isnan(out).any(), cfg
            assert _rel_err(out, ref) < _tol(torch.float16), (cfg, m, _rel_err(out, ref))
    with pytest.raises(DitlensError, match="poly_exp"):
        KernelConfig(poly_exp=3)


# Launches whose full heads run as key chunks merged by the last one to finish (KernelConfig.split_full):
# (L, n_text, text_first) with text first, last and none; L not a multiple of the key block; the
# largest split has more chunks than key blocks (empty chunks)
SPLIT_LAYOUTS = [(45, 0, False), (70, 9, True), (61, 7, False)]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("geometry", SPLIT_LAYOUTS, ids=lambda g: f"L{g[0]}-t{g[1]}{'first' if g[2] else 'last'}")
def test_split_full_heads_match_reference(device, geometry):
    L, n_text, text_first = geometry
    L = _scaled_len(L, device)
    n_text = n_text if device == "cpu" else n_text * 7
    B, D = 2, (72 if n_text else 128)
    modes, windows = ["full", "window", "skip", "arrow", "full"], [0, 5, 0, 3, 0]
    H = len(modes)
    q, k, v = _qkv(B, H, L, D, torch.bfloat16, device, seed=L)
    # the later keys score far higher than the earlier ones: the chunks' row maxima differ by a lot, so a
    # merge that did not rescale the chunks by 2^(m_c - max) would be far off
    k[:, :, L // 2:] *= 4
    cached, residual = (torch.randn(B, H, L, D, device=device).to(torch.bfloat16) for _ in range(2))
    plan, layout = make_head_plan(modes, windows, H, L), TokenLayout(L, n_text, text_first)
    ref = headwise_attention_reference(q, k, v, modes=modes, windows=windows, n_text=n_text, text_first=text_first,
                                       cached=cached, out_dtype=torch.float64)
    base = CPU_TILES[0] if device == "cpu" else default_config(D, interpret=False)
    n_key_blocks = -(-L // base.block_n)
    # every full head split, then only the last one (the other runs whole in the same launch: through the
    # chunk loop with every key block, or with split_branch through the dense loop); the merge reads the
    # partials through tensor descriptors when K/V go through them (tma)
    for split, split_heads, branch, tma in ((2, None, False, False), (3, None, False, True),
                                            (n_key_blocks + 2, None, False, False), (3, 1, False, False),
                                            (3, 1, True, True)):
        cfg = replace(base, split_full=split, split_heads=split_heads, split_branch=branch, tma=base.tma or tma)
        out = torch.full_like(q, float("nan"))
        headwise_triton(q, k, v, plan, layout, D ** -0.5, cached=cached, config=cfg, out=out)
        assert not torch.isnan(out).any(), f"unwritten or NaN output elements with {cfg}"
        for h in range(H):
            if modes[h] == "skip":
                assert torch.equal(out[:, h], cached[:, h]), split
            else:
                assert _rel_err(out[:, h], ref[:, h]) < _tol(torch.bfloat16), (cfg, h, modes[h])
    # the epilogue of a merged chunk: residual added (WA-RS apply) and subtracted (R = O - W)
    cfg = replace(base, split_full=2)
    full = [h for h in range(H) if modes[h] == "full"]
    for subtract in (False, True):
        out = torch.full_like(q, float("nan"))
        headwise_triton(q, k, v, plan, layout, D ** -0.5, cached=cached, residual=residual, config=cfg, out=out,
                        subtract=subtract)
        expected = residual[:, full].double() - ref[:, full] if subtract else ref[:, full] + residual[:, full].double()
        assert _rel_err(out[:, full], expected) < _tol(torch.bfloat16), subtract
    # an all-full launch whose last heads split (a dense launch's partial last wave)
    dense = make_head_plan(["full"] * H, [0] * H, H, L)
    ref_dense = headwise_attention_reference(q, k, v, modes=["full"] * H, windows=[0] * H, out_dtype=torch.float64)
    base = CPU_TILES[0] if device == "cpu" else default_config(D, interpret=False, all_full=True)
    for branch in (False, True):
        out = torch.full_like(q, float("nan"))
        headwise_triton(q, k, v, dense, layout, D ** -0.5, out=out,
                        config=replace(base, split_full=3, split_heads=2, split_branch=branch))
        assert not torch.isnan(out).any(), branch
        assert _rel_err(out, ref_dense) < _tol(torch.bfloat16), branch


def test_split_full_heads_program_ranks():
    from ditlens.kernels.patterns import head_attended_pairs
    from ditlens.kernels.triton_backend import _plan_tensors, full_head_split

    modes, windows, L = ["window", "full", "skip", "full", "arrow", "full"], [4, 0, 0, 0, 2, 0], 100
    plan, layout = make_head_plan(modes, windows, len(modes), L), TokenLayout(L, 10, True)
    for n_split, split_heads in ((3, [1, 3, 5]), (2, [3, 5])):
        meta = _plan_tensors(plan, layout, torch.device("cpu"), 3, n_split)
        order, part = meta.order.tolist(), meta.part.tolist()
        # a split head once per chunk, every other head once; parts f * 3 + chunk, f counting the split
        # heads in head order, -1 for the rest
        assert sorted(order) == sorted(list(range(len(modes))) + split_heads * 2)
        assert sorted(p for p in part if p >= 0) == list(range(3 * n_split))
        for f, h in enumerate(split_heads):
            assert {p // 3 for g, p in zip(order, part) if g == h} == {f}
        assert all(p == -1 for g, p in zip(order, part) if g not in split_heads)
        # programs by decreasing work: a chunk weighs a third of its head, so unsplit full heads run first
        work = [head_attended_pairs(modes[h], windows[h], layout) / (3 if p >= 0 else 1) for h, p in zip(order, part)]
        assert work == sorted(work, reverse=True) and order[-1] == 2
    cfg = KernelConfig(16, 16, 1, 1, split_full=4)
    assert full_head_split(plan, L, cfg) == (4, 3)
    assert full_head_split(plan, L, replace(cfg, split_heads=2)) == (4, 2)
    assert full_head_split(plan, 20, cfg) == (2, 3)  # at most one key block per chunk
    assert full_head_split(make_head_plan(["full"] * 2, [0, 0], 2, L), L, cfg) == (4, 2)
    assert full_head_split(make_head_plan(["window", "skip"], [3, 0], 2, L), L, cfg) == (1, 0)
    assert full_head_split(plan, L, KernelConfig(16, 16, 1, 1)) == (1, 0)
    assert full_head_split(plan, L, replace(cfg, split_heads=0)) == (1, 0)
    with pytest.raises(DitlensError, match="split_full must be >= 1"):
        KernelConfig(split_full=0)
    with pytest.raises(DitlensError, match="split_heads None or >= 0"):
        KernelConfig(split_full=2, split_heads=-1)


# (L, n_text, text_first, boundary on a block edge): text/image boundary on a multiple of the query
# block (16 rows on the CPU, 128 on CUDA) with text first and last, no text, and boundaries inside a
# query block, whose rows then follow different rules in the same edge block
ROW_INTERVAL_LAYOUTS = [(80, 32, True, True), (80, 16, False, True), (70, 0, False, True), (80, 20, True, False),
                        (77, 11, False, False)]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("loops", [dict(edge_stages=None), dict(edge_stages=1), dict(one_loop=True)],
                         ids=["edges-pipelined", "edges-1-stage", "one-loop"])
@pytest.mark.parametrize("geometry", ROW_INTERVAL_LAYOUTS,
                         ids=lambda g: f"L{g[0]}-t{g[1]}{'first' if g[2] else 'last'}")
def test_row_interval_masks_are_exact_for_every_mode_and_boundary(device, geometry, loops):
    L, n_text, text_first, aligned = geometry
    if device != "cpu":
        L, n_text = L * 32, n_text * 32 + (not aligned) * 3
    modes = ["full", "window", "arrow", "skip", "arrow", "window"]
    windows = [0, 3, 5, 0, 0, L // 3]
    B, H, D = 1, len(modes), 24
    q, k, v = _qkv(B, H, L, D, torch.float16, device, seed=L + n_text)
    cached = torch.randn(B, H, L, D, device=device).to(torch.float16)
    plan, layout = make_head_plan(modes, windows, H, L), TokenLayout(L, n_text, text_first)
    ref = headwise_attention_reference(q, k, v, modes=modes, windows=windows, n_text=n_text, text_first=text_first,
                                       cached=cached, out_dtype=torch.float64)
    base = CPU_TILES[0] if device == "cpu" else default_config(D, interpret=False)
    cfg = replace(base, **loops)
    boundary = layout.image_start if text_first else layout.image_end
    assert (n_text == 0 or boundary % cfg.block_m == 0) == aligned, "the geometry tests what it says"
    out = torch.full_like(q, float("nan"))
    headwise_triton(q, k, v, plan, layout, D ** -0.5, cached=cached, config=cfg, out=out)
    assert not torch.isnan(out).any()
    for h in range(H):
        err = _rel_err(out[:, h], ref[:, h])
        assert err < _tol(torch.float16), (h, modes[h], err)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("D", [40, 72])
def test_public_api_on_strided_inputs_and_custom_scale(device, D):
    # [B, L, H, D] storage viewed as [B, H, L, D], as diffusers' attention processors produce it
    B, H, L = 1, 3, _scaled_len(29, device)
    g = torch.Generator().manual_seed(7)
    q, k, v = [torch.randn(B, L, H, D, generator=g).to(torch.float16).to(device).transpose(1, 2) for _ in range(3)]
    assert not q.is_contiguous()
    modes, windows = ["window", "full", "arrow"], [2, 0, 4]
    out = headwise_attention(q, k, v, modes=modes, windows=windows, n_text=3, scale=0.3, backend="triton")
    ref = headwise_attention_reference(q, k, v, modes=modes, windows=windows, n_text=3, scale=0.3,
                                       out_dtype=torch.float64)
    assert out.shape == (B, H, L, D)
    assert _rel_err(out, ref) < _tol(torch.float16)
    # the output keeps q's token-major storage, so diffusers' transpose(1, 2).reshape(B, L, H * D) is a view
    assert out.transpose(1, 2).is_contiguous()
    assert out.transpose(1, 2).reshape(B, L, H * D).data_ptr() == out.data_ptr()
    contiguous = headwise_attention(q.contiguous(), k.contiguous(), v.contiguous(), modes=modes, windows=windows,
                                    n_text=3, scale=0.3, backend="triton")
    assert contiguous.is_contiguous() and torch.equal(contiguous, out)
    # both K/V load paths read the strided views in place (tensor descriptors with row stride H * D)
    plan, layout = make_head_plan(modes, windows, H, L), TokenLayout(L, 3, False)
    for tma in (False, True):
        cfg = KernelConfig(16, 16, 1, 1, tma=tma) if device == "cpu" else replace(default_config(D, False), tma=tma)
        out = torch.full_like(q, float("nan"))
        headwise_triton(q, k, v, plan, layout, 0.3, config=cfg, out=out)
        assert _rel_err(out, ref) < _tol(torch.float16), tma


# (L, n_text, text_first, modes, windows): windowed key ranges that are disjoint with full-only
# blocks before, between and after them, that merge, that are empty (no text), a partial last block
WARSR_GEOMETRIES = [
    (100, 20, True, ["arrow", "window", "arrow", "window"], [3, 3, 20, 40]),
    (100, 20, False, ["arrow", "window", "arrow", "window"], [3, 3, 20, 40]),
    (97, 0, False, ["window", "window", "arrow", "window"], [0, 5, 17, 96]),
    (64, 33, True, ["window", "arrow", "arrow", "window"], [1, 2, 0, 8]),
]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("geometry", WARSR_GEOMETRIES, ids=lambda g: f"L{g[0]}-t{g[1]}{'first' if g[2] else 'last'}")
def test_warsr_one_pass_visits_every_key_block_once(device, geometry):
    """The one-pass refresh splits keys into windowed blocks (both softmaxes) and full-only blocks;
    a block visited twice or skipped shows as a row far off the float64 reference."""
    L, n_text, text_first, modes, windows = geometry
    if device != "cpu":
        L, n_text, windows = L * 9 + 3, n_text * 9, [w * 9 for w in windows]
    B, H, D = 2, len(modes), 24 if device == "cpu" else 72
    q, k, v = _qkv(B, H, L, D, torch.float16, device, seed=L + n_text)
    plan, layout = make_head_plan(modes, windows, H, L), TokenLayout(L, n_text, text_first)
    ref_full, ref_res = warsr_attention_reference(q, k, v, windows=windows, n_text=n_text, text_first=text_first,
                                                  pattern=modes, out_dtype=torch.float64)
    configs = CPU_TILES if device == "cpu" else [None, KernelConfig(64, 64, 4, 2), KernelConfig(64, 32, 4, 2)]
    for cfg in configs:
        full, res = torch.full_like(q, float("nan")), torch.full_like(q, float("nan"))
        warsr_triton(q, k, v, plan, layout, D ** -0.5, config=cfg, out=full, residual_out=res)
        scale = ref_full.abs().max().item()
        assert (full.double() - ref_full).abs().max().item() < 4 * _tol(torch.float16) * scale, cfg
        assert (res.double() - ref_res).abs().max().item() < 4 * _tol(torch.float16) * scale, cfg


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("text_first, D", [(True, 24), (False, 24), (False, 32)])
def test_warsr_residual_and_fused_apply(device, text_first, D):
    B, H, L = 1, 3, _scaled_len(41, device)
    n_text = 6 if device == "cpu" else 50
    dtype = torch.float16
    q, k, v = _qkv(B, H, L, D, dtype, device, seed=11)
    pattern, windows = ["window", "arrow", "arrow"], [2, 0, 9]
    plan = make_head_plan(pattern, windows, H, L)
    layout = TokenLayout(L, n_text, text_first)
    cfg = KernelConfig(16, 16, 1, 1) if device == "cpu" else None
    full = torch.full_like(q, float("nan"))
    res = torch.full_like(q, float("nan"))
    warsr_triton(q, k, v, plan, layout, D ** -0.5, config=cfg, out=full, residual_out=res)
    assert not torch.isnan(full).any() and not torch.isnan(res).any()
    ref_full, ref_res = warsr_attention_reference(q, k, v, windows=windows, n_text=n_text, text_first=text_first,
                                                  pattern=pattern, out_dtype=torch.float64)
    assert _rel_err(full, ref_full) < _tol(dtype)
    # residual error measured against the size of the output it corrects
    assert ((res.double() - ref_res).norm() / ref_full.norm()).item() < _tol(dtype)
    # two-pass refresh (full launch, then R = O - W in the windowed kernel's epilogue)
    full2 = torch.full_like(q, float("nan"))
    res2 = torch.full_like(q, float("nan"))
    warsr_two_pass_triton(q, k, v, plan, layout, D ** -0.5, config=cfg, out=full2, residual_out=res2)
    assert not torch.isnan(full2).any() and not torch.isnan(res2).any()
    assert _rel_err(full2, ref_full) < _tol(dtype)
    assert ((res2.double() - ref_res).norm() / ref_full.norm()).item() < _tol(dtype)
    # apply step on the same inputs: W + R must give back O, with Q/K/V/O by pointer and by descriptor
    # (D = 24 splits into 16 + 8 columns: with qo its Q and O go through descriptors as well, and with rt the
    # residual wherever O does: at D = 32 whenever K/V do)
    base = cfg or default_config(D, interpret=False)
    for tma, qo, rt in ((False, False, False), (True, False, False), (True, True, False), (True, False, True),
                        (True, True, True)):
        applied = torch.full_like(q, float("nan"))
        apply_cfg = replace(base, tma=tma, qo_tma_split_dim=qo, residual_tma=rt)
        headwise_triton(q, k, v, plan, layout, D ** -0.5, residual=res, config=apply_cfg, out=applied)
        assert not torch.isnan(applied).any(), apply_cfg
        assert _rel_err(applied, ref_full) < 2 * _tol(dtype), apply_cfg
        r_tma = torch.full_like(q, float("nan"))
        headwise_triton(q, k, v, plan, layout, D ** -0.5, residual=full2, config=apply_cfg, out=r_tma, subtract=True)
        assert not torch.isnan(r_tma).any(), apply_cfg
        assert ((r_tma.double() - ref_res).norm() / ref_full.norm()).item() < _tol(dtype), apply_cfg
    if not text_first:
        return
    # public wrappers (two-pass default and the one-pass kernel) agree with the reference
    for fused in (False, True):
        f2, r2 = warsr_attention(q, k, v, windows=windows, n_text=n_text, text_first=text_first, pattern=pattern,
                                 backend="triton", fused=fused)
        assert _rel_err(f2, ref_full) < _tol(dtype)
        assert ((r2.double() - ref_res).norm() / ref_full.norm()).item() < _tol(dtype)
    # the full output given (the runtime's refresh after the model's own attention): one windowed launch
    f3, r3 = warsr_attention(q, k, v, windows=windows, n_text=n_text, text_first=text_first, pattern=pattern,
                             backend="triton", full=full2)
    assert f3 is full2 and ((r3.double() - ref_res).norm() / ref_full.norm()).item() < _tol(dtype)
    a2 = windowed_plus_residual(q, k, v, r2, windows=windows, n_text=n_text, text_first=text_first,
                                pattern=pattern, backend="triton")
    assert _rel_err(a2, ref_full) < 2 * _tol(dtype)


def test_launch_cache_replays_triton_dispatch_per_signature(monkeypatch):
    """The first launch of a signature goes through Triton (``fn[grid](*args, **constants)``); a later
    one with the same pointer dtypes and 16-byte alignment, int values and constants object goes to the
    compiled kernel with every argument in signature order, defaults included. Anything else that
    Triton specializes on (alignment, an int, the constants, the device) is a new signature."""
    import inspect

    from ditlens.kernels.launcher import LaunchCache

    triton_calls, replays = [], []

    class Compiled:
        def __init__(self, index):
            self.index = index

        def __getitem__(self, grid):
            return lambda *args: replays.append((self.index, grid, args))

    def kernel(X, n, scale, A, B=7, C=False):
        pass

    class Fn:
        arg_names = ["X", "n", "scale", "A", "B", "C"]
        signature = inspect.signature(kernel)

        def __getitem__(self, grid):
            def dispatch(*args, **constants):
                triton_calls.append((grid, args, constants))
                return Compiled(len(triton_calls) - 1)
            return dispatch

    device = [0]
    monkeypatch.setattr(torch.cuda, "current_device", lambda: device[0])
    cache = LaunchCache(Fn())
    base = torch.zeros(64, dtype=torch.float16)
    x, shifted = base[:32], base[1:33]  # 2-byte offset: no longer 16-byte aligned
    constants = {"A": 3, "C": True, "num_warps": 4}
    cache((5,), (x, 10, 0.5), constants)
    cache((6,), (x, 10, 0.25), constants)  # floats are not specialized: a replay
    assert len(triton_calls) == 1 and triton_calls[0][2] == constants
    assert replays == [(0, (6, 1, 1), (x, 10, 0.25, 3, 7, True))]  # num_warps is an option, not an argument
    cache((6,), (shifted, 10, 0.25), constants)
    cache((6,), (x, 11, 0.25), constants)
    cache((6,), (x, 10, 0.25), dict(constants))  # equal, but another object: no id to trust
    device[0] = 1
    cache((6,), (x, 10, 0.25), constants)
    assert len(triton_calls) == 5 and cache.hits == 1
    device[0] = 0
    cache((7, 2), (shifted, 10, 1.0), constants)
    assert replays[-1] == (1, (7, 2, 1), (shifted, 10, 1.0, 3, 7, True)) and cache.hits == 2
    with pytest.raises(TypeError, match="no value for A"):
        cache((1,), (x, 12, 0.5), {"C": True})
    # a launcher that refuses a replay (another Triton): one warning, then Triton's dispatch for good
    Compiled.__getitem__ = lambda self, grid: (lambda *args: (_ for _ in ()).throw(TypeError("expected 9 arguments")))
    with pytest.warns(RuntimeWarning, match="refused a replayed launch.*expected 9 arguments"):
        cache((6,), (x, 10, 0.25), constants)
    cache((6,), (x, 10, 0.25), constants)
    assert len(triton_calls) == 7 and cache.hits == 2 and cache.launches == {}


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cached_launches_equal_tritons_own_dispatch():
    """On CUDA a repeated head-wise launch skips Triton's dispatch: bit for bit the output of the
    first launch (dispatched by Triton), for a mixed plan at every call, into other output buffers,
    and under a CUDA graph."""
    from ditlens.kernels.triton_backend import headwise_launches

    B, H, L, D = 2, 6, 1000, 72
    q, k, v = _qkv(B, H, L, D, torch.bfloat16, "cuda", seed=3)
    cached = torch.randn(B, H, L, D, device="cuda").to(torch.bfloat16)
    modes, windows = ["full", "window", "arrow", "skip", "window", "full"], [0, 40, 17, 0, 300, 0]
    plan, layout = make_head_plan(modes, windows, H, L), TokenLayout(L, 77, False)
    launches = headwise_launches()
    hits = launches.hits
    first = headwise_triton(q, k, v, plan, layout, D ** -0.5, cached=cached)
    for _ in range(3):
        assert torch.equal(headwise_triton(q, k, v, plan, layout, D ** -0.5, cached=cached), first)
    assert launches.hits >= hits + 3
    ref = headwise_attention_reference(q, k, v, modes=modes, windows=windows, n_text=77, text_first=False,
                                       cached=cached, out_dtype=torch.float64)
    assert _rel_err(first, ref) < _tol(torch.bfloat16)
    for offset in (0, 8):  # replays take this call's pointers: fresh buffers, one 16 bytes into its storage
        out = torch.full((B * H * L * D + offset,), float("nan"), dtype=q.dtype, device="cuda")[offset:]
        headwise_triton(q, k, v, plan, layout, D ** -0.5, cached=cached, out=out.view(B, H, L, D))
        assert torch.equal(out.view(B, H, L, D), first)
    graph, static = torch.cuda.CUDAGraph(), torch.empty_like(first)
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        headwise_triton(q, k, v, plan, layout, D ** -0.5, cached=cached, out=static)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static, first)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cached_one_pass_warsr_launches_equal_the_first():
    """The one-pass WA-RS refresh replays its compiled kernel too: bit for bit the first (dispatched)
    launch's full output and residual, into fresh buffers, and still within the float64 reference."""
    from ditlens.kernels.triton_backend import warsr_launches

    B, H, L, D = 2, 3, 1000, 72
    q, k, v = _qkv(B, H, L, D, torch.bfloat16, "cuda", seed=5)
    modes, windows = ["window", "arrow", "window"], [40, 17, 300]
    plan, layout = make_head_plan(modes, windows, H, L), TokenLayout(L, 77, True)
    launches = warsr_launches()
    hits = launches.hits
    first = warsr_triton(q, k, v, plan, layout, D ** -0.5)
    for _ in range(3):
        full, res = torch.full_like(q, float("nan")), torch.full_like(q, float("nan"))
        warsr_triton(q, k, v, plan, layout, D ** -0.5, out=full, residual_out=res)
        assert torch.equal(full, first[0]) and torch.equal(res, first[1])
    assert launches.hits >= hits + 3
    ref_full, ref_res = warsr_attention_reference(q, k, v, windows=windows, n_text=77, text_first=True,
                                                  pattern=modes, out_dtype=torch.float64)
    assert _rel_err(first[0], ref_full) < _tol(torch.bfloat16)
    assert (first[1].double() - ref_res).abs().max().item() < 4 * _tol(torch.bfloat16) * ref_full.abs().max().item()


@pytest.mark.skipif(not INTERPRETER, reason="Triton is not in interpreter mode here")
def test_random_plans_against_reference():
    rng = random.Random(3)
    for trial in range(6):
        B, H = rng.choice([1, 2]), rng.choice([2, 3])
        L = rng.choice([1, 17, 33, 48])
        D = rng.choice([16, 32, 48])
        dtype = rng.choice([torch.float16, torch.bfloat16])
        n_text = rng.randint(0, L)
        text_first = rng.random() < 0.5
        modes = [rng.choice(["full", "window", "arrow", "skip"]) for _ in range(H)]
        windows = [rng.choice([0, 1, 6, 40]) for _ in range(H)]
        q, k, v = _qkv(B, H, L, D, dtype, "cpu", seed=100 + trial)
        cached = torch.randn(B, H, L, D).to(dtype)
        cfg = rng.choice(CPU_TILES)
        out = torch.full_like(q, float("nan"))
        headwise_triton(q, k, v, make_head_plan(modes, windows, H, L), TokenLayout(L, n_text, text_first),
                        D ** -0.5, cached=cached, config=cfg, out=out)
        ref = headwise_attention_reference(q, k, v, modes=modes, windows=windows, n_text=n_text,
                                           text_first=text_first, cached=cached, out_dtype=torch.float64)
        assert not torch.isnan(out).any()
        assert _rel_err(out, ref) < _tol(dtype), (B, H, L, D, dtype, n_text, text_first, modes, windows, cfg)


# --------------------------------------------------------------------------------------
# Other backends and dispatch
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["flex", "sdpa"])
def test_torch_backends_match_reference(device, backend):
    B, H, L, D = 1, 4, _scaled_len(37, device), 32
    n_text = 5 if device == "cpu" else 77
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q, k, v = _qkv(B, H, L, D, dtype, device, seed=5)
    cached = torch.randn(B, H, L, D, device=device).to(dtype)
    modes, windows = ["arrow", "window", "skip", "full"], [3, 8, 0, 0]
    for text_first in ((False,) if device == "cpu" and backend == "flex" else (True, False)):
        out = headwise_attention(q, k, v, modes=modes, windows=windows, n_text=n_text, text_first=text_first,
                                 cached=cached, backend=backend)
        ref = headwise_attention_reference(q, k, v, modes=modes, windows=windows, n_text=n_text,
                                           text_first=text_first, cached=cached, out_dtype=torch.float64)
        assert torch.equal(out[:, 2], cached[:, 2])
        assert _rel_err(out, ref) < _tol(dtype), (backend, text_first)
    full, res = warsr_attention(q, k, v, windows=4, n_text=n_text, pattern="arrow", backend=backend)
    rf, rr = warsr_attention_reference(q, k, v, windows=4, n_text=n_text, pattern="arrow", out_dtype=torch.float64)
    assert _rel_err(full, rf) < _tol(dtype) and ((res.double() - rr).norm() / rf.norm()).item() < _tol(dtype)
    _, res2 = warsr_attention(q, k, v, windows=4, n_text=n_text, pattern="arrow", backend=backend, full=full)
    assert ((res2.double() - rr).norm() / rf.norm()).item() < _tol(dtype)


def test_dispatch_and_errors():
    q, k, v = _qkv(1, 2, 8, 16, torch.float16, "cpu", seed=0)
    assert {"sdpa", "reference"} <= set(available_backends())
    # CPU tensors go to Triton's interpreter only when triton was imported with TRITON_INTERPRET=1
    assert resolve_backend(q, "auto") == ("triton" if INTERPRETER else "sdpa")
    assert resolve_backend(q.float(), "auto") == "sdpa"
    with pytest.raises(DitlensError):
        resolve_backend(q, "cuda-magic")
    with pytest.raises(DitlensError):
        headwise_attention(q.float(), k.float(), v.float(), modes="full", windows=0, backend="triton")
    with pytest.raises(DitlensError, match="cached"):
        headwise_attention(q, k, v, modes=["skip", "full"], windows=0)
    with pytest.raises(DitlensError, match="one mode per head"):
        headwise_attention(q, k, v, modes=["full"], windows=0)
    with pytest.raises(DitlensError, match="unknown attention mode"):
        headwise_attention(q, k, v, modes=["full", "banana"], windows=0)
    with pytest.raises(DitlensError, match="n_text"):
        headwise_attention(q, k, v, modes="full", windows=0, n_text=9)
    with pytest.raises(DitlensError, match=">= 0"):
        headwise_attention(q, k, v, modes="window", windows=-1)
    with pytest.raises(DitlensError, match="WA-RS"):
        warsr_attention(q, k, v, windows=1, pattern="full")
    with pytest.raises(DitlensError, match="full must have"):
        warsr_attention(q, k, v, windows=1, full=q[:, :1])
    # reference backend through the public entry point
    out = headwise_attention(q, k, v, modes=["full", "window"], windows=[0, 1], backend="reference")
    ref = headwise_attention_reference(q, k, v, modes=["full", "window"], windows=[0, 1])
    assert torch.equal(out, ref)


@pytest.mark.skipif(HAS_CUDA or INTERPRETER, reason="the interpreter tests ran in this process")
def test_interpreter_tests_in_subprocess():
    from interpreter_support import rerun_under_interpreter

    rerun_under_interpreter(__file__)


# ---- the Gluon dense kernel (Hopper, head dim 128) ----

HAS_HOPPER = HAS_CUDA and torch.cuda.get_device_capability()[0] == 9


def _layouts(B, H, L, D, dtype, device, seed):
    """The same q, k, v values in three memory orders: contiguous [B, H, L, D], diffusers' views of
    [B, L, H, D] storage, and an order the kernel cannot read in place ([L, B, H, D] storage)."""
    q, k, v = _qkv(B, H, L, D, dtype, device, seed=seed)
    tokens = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
    odd = [t.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3) for t in (q, k, v)]
    return {"contiguous": (q, k, v), "token-major": tokens, "other": odd}


def test_gluon_token_views_address_every_head_row():
    # the kernel reads row (rows_b * b + rows_h * h + l), columns (cols_h * h ...) of the 2-D view:
    # checked element by element against indexing the [B, H, L, D] tensor itself
    for name, (q, _, _) in _layouts(2, 3, 8, 4, torch.float32, "cpu", seed=1).items():
        got = _token_view(q)
        if name == "other":
            assert got is None
            continue
        view, rows_b, rows_h, cols_h = got
        assert view.data_ptr() == q.data_ptr(), name  # a view, not a copy
        for b, h, pos in itertools.product(range(2), range(3), range(8)):
            row = view[rows_b * b + rows_h * h + pos, cols_h * h: cols_h * h + 4]
            assert torch.equal(row, q[b, h, pos]), (name, b, h, pos)
    # one batch: the batch stride is arbitrary and must not send the tensor to the copy path
    one = torch.randn(1, 6, 3, 4).transpose(1, 2)  # [1, 3, 6, 4] view of [1, 6, 3, 4] storage
    one = one.as_strided(one.shape, (999, *one.stride()[1:]))
    assert _token_view(one) is not None and _token_view(one)[0].data_ptr() == one.data_ptr()
    misaligned = torch.randn(2 * 3 * 8 * 4 + 1)[1:].view(2, 3, 8, 4)
    assert _token_view(misaligned) is None  # a start TMA cannot read: copied, and the copy is readable
    assert _views(misaligned, misaligned)[0][1:] == (24, 8, 0)


def test_gluon_tile_orders_over_the_blocks_each_tile_attends():
    # the host's count of a tile's key blocks is the number of 128-key blocks holding at least one pair of
    # the dense mask in the tile's rows (the kernel visits exactly those); the order lists every (batch,
    # head, tile) once, by decreasing count, ties in head, batch, tile order
    from ditlens.kernels.gluon_backend import BLOCK_M, BLOCK_N, _tile_order, tile_key_blocks

    L, n_text, B = 1280, 256, 2
    modes, windows = ["full", "window", "arrow", "skip", "arrow", "window"], [0, 100, 300, 0, 10, 700]
    layout = TokenLayout(L, n_text, True)
    mask = attention_mask(modes, windows, L, n_text=n_text, text_first=True)
    tiles = L // BLOCK_M
    blocks = mask.view(len(modes), tiles, BLOCK_M, L // BLOCK_N, BLOCK_N).any(dim=(2, 4)).sum(-1)  # [H, tiles]
    for h, (m, w) in enumerate(zip(modes, windows)):
        assert [tile_key_blocks(m, w, t * BLOCK_M, layout) for t in range(tiles)] == blocks[h].tolist(), m
    plan = make_head_plan(modes, windows, len(modes), L)
    order = _tile_order(plan, layout, B, torch.device("cpu")).tolist()
    bh, tile = [p // tiles for p in order], [p % tiles for p in order]
    assert sorted(order) == list(range(B * len(modes) * tiles))
    key = [(-blocks[x % len(modes), t].item(), x % len(modes), x // len(modes), t) for x, t in zip(bh, tile)]
    assert key == sorted(key)
    # full first: the tiles that visit every key block (full heads, arrow heads' text tiles), then the rest,
    # each group in grid order (packed index increasing); a policy that does not exist is refused
    first = _tile_order(plan, layout, B, torch.device("cpu"), "full-first").tolist()
    walks_all = [blocks[(p // tiles) % len(modes), p % tiles].item() == L // BLOCK_N
                 for p in range(B * len(modes) * tiles)]
    assert first == [p for p, a in enumerate(walks_all) if a] + [p for p, a in enumerate(walks_all) if not a]
    assert 0 < sum(walks_all) < len(walks_all)
    with pytest.raises(DitlensError, match="tile order"):
        _tile_order(plan, layout, B, torch.device("cpu"), "shortest")


def test_gluon_refusals_name_the_input_to_change():
    plan_full = make_head_plan("full", 0, 2, 256)
    plan_band = make_head_plan(["full", "window"], [8, 8], 2, 256)
    q = torch.zeros(1, 2, 256, 128, dtype=torch.bfloat16)
    assert "head_dim 128" in check_gluon_inputs(q[..., :64])
    assert "multiples of 128" in check_gluon_inputs(q[:, :, :200])
    assert "float16/bfloat16" in check_gluon_inputs(q.float())
    assert check_gluon_inputs(q, make_head_plan(["full", "skip"], [0, 0], 2, 256),
                              TokenLayout(256, 77, False)) == check_gluon_inputs(q)  # no band: any text layout
    assert "text tokens first" in check_gluon_inputs(q, plan_band, TokenLayout(256, 128, False))
    assert "multiple of 128, got 77" in check_gluon_inputs(q, plan_band, TokenLayout(256, 77, True))
    for plan, layout in ((plan_full, TokenLayout(256, 77, False)), (plan_band, TokenLayout(256, 128, True))):
        machine = check_gluon_inputs(q, plan, layout)  # shape and plan pass: what is left is this CPU tensor
        assert machine is not None and ("CUDA" in machine or "Gluon" in machine)
    with pytest.raises(DitlensError, match="backend='gluon' cannot run this input"):
        headwise_attention(q, q, q, modes="full", windows=None, backend="gluon")
    with pytest.raises(DitlensError, match="unknown backend"):
        resolve_backend(q, "gluon2")
    with pytest.raises(DitlensError, match="in q's memory order"):  # before any launch: checked on the host
        headwise_gluon(q, q, q, plan_full, TokenLayout(256), 0.1,
                       out=torch.empty(1, 256, 2, 128, dtype=torch.bfloat16).transpose(1, 2))
    with pytest.raises(DitlensError, match="skip heads need cached"):
        headwise_gluon(q, q, q, make_head_plan(["full", "skip"], [0, 0], 2, 256), TokenLayout(256), 0.1)


_GLUON_COMPILE = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from ditlens.kernels._gluon_impl import headwise_fwd
from ditlens.kernels.gluon_backend import BLOCK_M, BLOCK_N, GLUON_HEAD_DIM, LOADER_REGS, STAGES

def desc(rows):
    layout = gl.NVMMASharedLayout.get_default_for([rows, GLUON_HEAD_DIM], gl.bfloat16)
    return f"tensordesc<bf16[{rows}, {GLUON_HEAD_DIM}],{layout!r}>"

names = headwise_fwd.arg_names
variants = ((True, False, False, 0), (False, False, False, 0), (False, False, True, 0), (False, True, True, 0),
            (False, False, True, 1), (False, False, True, 2))
for all_full, has_skip, heavy_first, residual in variants:
    values = dict(ALL_FULL=all_full, HAS_SKIP=has_skip, HEAVY_FIRST=heavy_first, RESIDUAL=residual, STAGES=STAGES,
                  LOADER_REGS=LOADER_REGS)
    sig = {n: (desc(BLOCK_M // 2) if n in ("q_desc", "o_desc", "aux_desc") else desc(BLOCK_N) if n.endswith("_desc")
               else "*i32" if n.endswith("_ptr") else "fp32" if n == "qk_scale" else "constexpr" if n in values
               else "i32") for n in names}
    src = GluonASTSource(headwise_fwd, sig, {(names.index(n),): v for n, v in values.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    ptx = kernel.asm["ptx"]
    assert "wgmma.mma_async" in ptx and "cp.async.bulk.tensor" in ptx, values
    print(kernel.metadata.shared)
"""


@pytest.mark.skipif(not gluon_available(), reason="this triton has no Gluon")
def test_gluon_kernel_compiles_for_hopper_with_this_triton():
    # no GPU needed: the kernel lowers to sm_90a PTX with wgmma and TMA for every launch variant (dense,
    # banded in every tile order, skip heads, residual added and subtracted) and
    # fits Hopper's shared memory. Guards Triton's Gluon API, which renames ops between releases (3.6's
    # async_copy_* became async_load / async_store). A subprocess: Gluon does not compile under the
    # interpreter mode this file may have set.
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _GLUON_COMPILE], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    shared = [int(line.split()[-1]) for line in done.stdout.splitlines()]
    assert len(shared) == 6 and max(shared) <= 227 * 1024, shared


def test_auto_hands_gluon_the_calls_it_takes(monkeypatch):
    # backend="auto" resolves to Triton, then gives a call to Gluon exactly when check_gluon_inputs
    # passes it (on this CPU it never does: faked here); backend="triton" keeps the Triton launch
    from ditlens.kernels import api

    calls = []
    monkeypatch.setattr(api, "check_gluon_inputs", lambda q, plan=None, layout=None: None)
    monkeypatch.setattr(api, "headwise_gluon", lambda q, k, v, plan, layout, scale, cached=None, tile_order="full-first":
                        calls.append((plan.modes, layout.n_text, scale, cached, tile_order)) or torch.zeros_like(q))
    q, k, v = _qkv(1, 2, 64, 16, torch.float16, "cpu", seed=0)
    cached = torch.ones_like(q)
    out = headwise_attention(q, k, v, modes=["arrow", "skip"], windows=[8, 0], n_text=16, text_first=True,
                             cached=cached, scale=0.5)
    assert calls == [(("arrow", "skip"), 16, 0.5, cached, "full-first")] and not out.any()
    ref = headwise_attention_reference(q, k, v, modes=["arrow", "skip"], windows=[8, 0], n_text=16, text_first=True,
                                       cached=cached, scale=0.5, out_dtype=torch.float64)
    triton_out = headwise_attention(q, k, v, modes=["arrow", "skip"], windows=[8, 0], n_text=16, text_first=True,
                                    cached=cached, scale=0.5, backend="triton")
    assert len(calls) == 1 and _rel_err(triton_out, ref) < _tol(torch.float16)


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_HOPPER and gluon_available()), reason="needs a Hopper GPU and Triton with Gluon")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gluon_headwise_matches_reference_in_every_layout(dtype):
    # dense, then FLUX-like plans (text first, 128 text tokens): windows narrower than a block (rows
    # whose first visited block holds none of their keys), wider than the tiles, arrow heads, and skip
    # heads copying a cache stored in another memory order than q's
    B, H, L, D, n_text = 2, 3, 640, 128, 128
    plans = [(["full"] * H, [0] * H, 0),
             (["window", "arrow", "full"], [5, 200, 0], n_text),
             (["arrow", "window", "arrow"], [40, 1000, 0], n_text),
             (["window"] * H, [0, 130, 64], 0),
             (["skip", "arrow", "skip"], [0, 100, 0], n_text)]
    cached = torch.randn(B, L, H, D, device="cuda", dtype=dtype).transpose(1, 2)
    for name, (q, k, v) in _layouts(B, H, L, D, dtype, "cuda", seed=7).items():
        for modes, windows, n_txt in plans:
            ref = headwise_attention_reference(q, k, v, modes=modes, windows=windows, n_text=n_txt, text_first=True,
                                               cached=cached, out_dtype=torch.float64)
            out = headwise_attention(q, k, v, modes=modes, windows=windows, n_text=n_txt, text_first=True,
                                     cached=cached, backend="gluon")
            assert out.stride() == (q if name != "other" else q.contiguous()).stride(), name  # q's order kept
            for h in range(H):
                assert _rel_err(out[:, h], ref[:, h]) < _tol(dtype), (name, modes[h], windows[h])
            if name != "other":  # into a NaN-filled output of q's order: every element written, same values
                plan = make_head_plan(modes, windows, H, L)
                poisoned = torch.full_like(out, float("nan"))
                headwise_gluon(q, k, v, plan, TokenLayout(L, n_txt, True), D ** -0.5, cached=cached, out=poisoned)
                assert not torch.isnan(poisoned).any(), (name, modes)
                assert torch.equal(poisoned, out), (name, modes)
            for h in (h for h in range(H) if modes[h] == "skip"):  # copied exactly
                assert torch.equal(out[:, h], cached[:, h]), (name, h)
            auto = headwise_attention(q, k, v, modes=modes, windows=windows, n_text=n_txt, text_first=True,
                                      cached=cached)
            assert torch.equal(auto, out), (name, modes)  # what "auto" runs here
            for order in ("grid", "longest"):  # programs in another order, the same results
                ordered = headwise_gluon(q, k, v, make_head_plan(modes, windows, H, L), TokenLayout(L, n_txt, True),
                                         D ** -0.5, cached=cached, tile_order=order)
                assert torch.equal(ordered, out), (name, modes, order)


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_HOPPER and gluon_available()), reason="needs a Hopper GPU and Triton with Gluon")
def test_gluon_launch_replays_in_a_cuda_graph():
    # the runtime's --cuda-graphs path captures FLUX's attention calls, which "auto" gives the Gluon
    # launch: captured once, replayed on new inputs copied into the captured buffers, each replay equal
    # to an eager launch on those inputs
    B, H, L, D, n_text = 1, 4, 512, 128, 128
    modes, windows = ["full", "arrow", "skip", "window"], [0, 64, 0, 100]
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2)  # diffusers' token-major views
               for t in _qkv(B, H, L, D, torch.bfloat16, "cuda", seed=3))
    cached = torch.randn_like(q)
    kw = dict(modes=modes, windows=windows, n_text=n_text, text_first=True, cached=cached)
    for _ in range(2):  # compile and fill the launch caches outside the capture
        headwise_attention(q, k, v, **kw)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = headwise_attention(q, k, v, **kw)
    for seed in (11, 12):
        fresh = _qkv(B, H, L, D, torch.bfloat16, "cuda", seed=seed)
        for static, new in zip((q, k, v), fresh):
            static.copy_(new)
        cached.copy_(torch.randn_like(cached))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, headwise_attention(q, k, v, **kw)), seed
        ref = headwise_attention_reference(q, k, v, out_dtype=torch.float64, **kw)
        assert _rel_err(out, ref) < _tol(torch.bfloat16), seed


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_HOPPER and gluon_available()), reason="needs a Hopper GPU and Triton with Gluon")
def test_gluon_wars_epilogues_match_reference():
    # WA-RS on the Gluon kernel: refresh R = O - W with O computed or given (the
    # residual subtracted in the epilogue) and apply W + R (added there), window and arrow heads
    B, H, L, D, n_text = 2, 3, 640, 128, 128
    dtype = torch.bfloat16
    pattern, windows = ["window", "arrow", "arrow"], [5, 100, 300]
    kw = dict(windows=windows, n_text=n_text, text_first=True, pattern=pattern)
    for name, (q, k, v) in _layouts(B, H, L, D, dtype, "cuda", seed=5).items():
        ref_full, ref_res = warsr_attention_reference(q, k, v, out_dtype=torch.float64, **kw)
        full, res = warsr_attention(q, k, v, backend="gluon", **kw)
        assert _rel_err(full, ref_full) < _tol(dtype), name
        assert ((res.double() - ref_res).norm() / ref_full.norm()).item() < _tol(dtype), name
        given, res_given = warsr_attention(q, k, v, backend="gluon", full=full, **kw)
        assert given is full and torch.equal(res_given, res), name  # the same windowed launch
        applied = windowed_plus_residual(q, k, v, res, backend="gluon", **kw)
        assert _rel_err(applied, ref_full) < 2 * _tol(dtype), name
        assert torch.equal(applied, windowed_plus_residual(q, k, v, res.float(), backend="gluon", **kw)), name
        # "auto" hands both WA-RS launches to Gluon: the same bits as asking for it by name
        assert torch.equal(windowed_plus_residual(q, k, v, res, **kw), applied), name
        assert torch.equal(warsr_attention(q, k, v, full=full, **kw)[1], res), name
