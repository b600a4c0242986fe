"""ditlens.compress: methods against float64 references, plans, refusals, apply/remove, FLOPs."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ditlens.compress import Plan, apply_plan, parse_method, plan_flops, projection_flops, remove_plan
from ditlens.compress.methods import CallLayout, HeadMethod, attended_pairs, dense_mask, removes_pairs, widest_window
from ditlens.compress.plan import LayerInfo, ModelFingerprint, RunSpec, TokenInfo
from ditlens.compress.runtime import ForwardState, PlanRuntime
from ditlens.errors import DitlensError, PlanMismatchError

from tiny_models import DIMS, FAMILIES, build_tiny, build_tiny_pipeline, pipeline_call_kwargs

# --------------------------------------------------------------------------------------------
# Independent references (numpy float64, explicit loops)
# --------------------------------------------------------------------------------------------


def ref_mask(kind: str, w: int, L: int, n_text: int, text_first: bool, grid: tuple[int, int, int] | None) -> np.ndarray:
    start = n_text if text_first else 0
    image = set(range(start, start + L - n_text))
    cols = grid[2] if grid else L
    rows = grid[1] if grid else 1
    mask = np.zeros((L, L), dtype=bool)
    for i in range(L):
        for j in range(L):
            qi, kj = i in image, j in image
            if kind == "full":
                mask[i, j] = True
            elif not qi or not kj:
                mask[i, j] = (not qi and not kj) or kind == "arrow"
            else:
                a, b = i - start, j - start
                if kind in ("window", "arrow"):
                    mask[i, j] = abs(a - b) <= w
                else:  # window2d: same rule in every frame pair
                    a, b = a % (rows * cols), b % (rows * cols)
                    mask[i, j] = abs(a // cols - b // cols) <= w and abs(a % cols - b % cols) <= w
    return mask


def ref_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray) -> np.ndarray:
    scores = q @ k.T / np.sqrt(q.shape[-1])
    scores = np.where(mask, scores, -np.inf)
    scores = scores - scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores)
    return (weights / weights.sum(axis=-1, keepdims=True)) @ v


def make_plan(kind: str, heads: int, head_dim: int, methods: list, cfg_layout: str, grid, n_text=0,
              text_position="none") -> Plan:
    layer = LayerInfo("layer0", kind, text_position)
    n_image = grid[0] * grid[1] * grid[2]
    model = ModelFingerprint("test", "TestTransformer", "0" * 32, (layer,), heads, head_dim,
                             TokenInfo(n_image, n_text, text_position, grid))
    run = RunSpec(len(methods), "TestScheduler", 3.0, None, None, None, cfg_layout)
    plan = Plan(model, run, [[m] for m in methods])
    plan.check_structure()
    return plan


def run_and_reference(plan: Plan, seed: int = 0, backend: str = "dense", device: str = "cpu",
                      dtype: torch.dtype = torch.float32, warsr_refresh: str = "one-pass"):
    """Drive the runtime's attention over every step with random q, k, v (rounded to ``dtype``,
    on ``device``); return runtime outputs, float64 reference outputs and brute-force executed /
    full pair counts."""
    model, layout_name = plan.model, plan.run.cfg_layout
    H, D = model.heads, model.head_dim
    grid, n_text = model.tokens.grid, model.tokens.n_text
    L = grid[0] * grid[1] * grid[2] + n_text
    text_first = model.layers[0].text_position == "first"
    runtime = PlanRuntime(plan, adapter=None, transformer=None, scheduler=None, pipe=None, backend=backend,
                          warsr_refresh=warsr_refresh)
    gen = torch.Generator().manual_seed(seed)
    separate = layout_name == "separate_cond_first"
    batched = layout_name.startswith("batched")
    cond_row = 0 if layout_name in ("batched_cond_first", "separate_cond_first", "none") else 1
    branches = ["cond", "uncond"] if (batched or separate) else ["cond"]
    masks: dict = {}

    def mask_of(kind, w):
        if (kind, w) not in masks:
            masks[(kind, w)] = ref_mask(kind, w, L, n_text, text_first, grid)
        return masks[(kind, w)]

    last: dict = {}      # (branch, head) -> latest computed output
    source: dict = {}    # (branch, head) -> q, k, v of the latest pure-full step
    residual: dict = {}  # (branch, head, refresh step) -> R
    executed = full_pairs = 0
    got, want = [], []
    for s in range(plan.steps):
        methods = plan.head_methods(s, 0)
        n_rows = len(branches)
        q, k, v = (torch.randn(n_rows, H, L, D, generator=gen).to(dtype).float() for _ in range(3))
        rows = {b: (cond_row if b == "cond" else 1 - cond_row) if batched else i for i, b in enumerate(branches)}
        outs: dict = {}
        for b in ["cond", "uncond"] if n_rows == 2 else ["cond"]:
            r = rows[b]
            for h, m in enumerate(methods):
                qq, kk, vv = (x[r, h].double().numpy() for x in (q, k, v))
                full_pairs += L * L
                if m.base == "ast":
                    o = last[(b, h)]
                elif m.asc and b == "uncond":
                    o = outs[("cond", h)]
                else:
                    kind = "window" if m.base == "wars" else m.base
                    mask = mask_of(kind, m.window)
                    executed += int(mask.sum())
                    o = ref_attention(qq, kk, vv, mask)
                    if m.base == "wars":
                        src_step, (sq, sk, sv) = source[(b, h)]
                        rkey = (b, h, src_step)
                        if rkey not in residual:
                            wmask = mask_of("window", m.window)
                            executed += int(wmask.sum())  # the refresh step runs the window once
                            residual[rkey] = ref_attention(sq, sk, sv, mask_of("full", 0)) - ref_attention(sq, sk, sv, wmask)
                        o = o + residual[rkey]
                    if m == HeadMethod("full"):
                        source[(b, h)] = (s, (qq, kk, vv))
                if m.base != "ast":
                    last[(b, h)] = o
                outs[(b, h)] = o
        # the runtime, the same step
        step_out = torch.empty(n_rows, H, L, D, dtype=torch.float64)
        if separate:
            for i, b in enumerate(branches):
                runtime.forward = ForwardState(s, grid, b, False, True)
                o = runtime.attend(0, 0, runtime.schedule[s][0], F.scaled_dot_product_attention,
                                   tuple(x[i:i + 1].to(device, dtype) for x in (q, k, v)), {})
                step_out[i] = o[0].double().cpu()
        else:
            runtime.forward = ForwardState(s, grid, "all", batched, cond_row == 0)
            step_out[:] = runtime.attend(0, 0, runtime.schedule[s][0], F.scaled_dot_product_attention,
                                         tuple(x.to(device, dtype) for x in (q, k, v)), {}).double().cpu()
        expected = torch.empty_like(step_out)
        for (b, h), o in outs.items():
            expected[rows[b], h] = torch.from_numpy(o)
        got.append(step_out)
        want.append(expected)
    return got, want, runtime, executed, full_pairs


MIXED = [
    ["full", "full", "full", "full"],
    ["wars(2)", "ast", "window(1)", "window2d(1)"],
    ["wars(2)+asc", "ast", "full", "asc"],
    ["full", "window(3)+asc", "ast", "wars(0)"],
    ["wars(1)+asc", "arrow(2)", "wars(3)", "ast"],
    ["asc", "asc", "asc", "asc"],  # whole-layer ASC: one product on the cond rows, copied to both halves
]


# Layers the fused path (one ditlens.kernels launch for all heads) takes: full / window / arrow /
# AST heads, +asc on all heads or none; the rest falls back to one product per method group.
FUSED = [
    ["full", "full", "full", "full"],
    ["arrow(2)", "window(1)", "full", "window(0)"],
    ["ast", "arrow(3)", "window(2)", "ast"],
    ["window(1)+asc", "asc", "arrow(2)+asc", "window(5)+asc"],
    ["ast", "ast", "full", "arrow(1)"],
]


@pytest.mark.parametrize("cfg_layout", ["batched_cond_first", "batched_uncond_first", "separate_cond_first"])
@pytest.mark.parametrize("backend", ["dense", "kernels"])
def test_headwise_mix_matches_float64_reference(cfg_layout, backend):
    plan = make_plan("self", 4, 8, MIXED, cfg_layout, (1, 4, 4))
    got, want, runtime, executed, full_pairs = run_and_reference(plan, backend=backend)
    for s, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-5, msg=f"step {s}")
    # FLOPs: what ran equals the brute-force count of attended pairs, and the static count agrees
    d = plan.model.head_dim
    assert runtime.flops.core == 4 * d * executed
    assert runtime.flops.core_full == 4 * d * full_pairs
    assert plan_flops(plan).core_fraction == pytest.approx(executed / full_pairs, rel=0, abs=1e-15)


# WA-RS on every head of a layer (V1's plans): the refresh runs one windowed launch subtracting from
# the full output, each reuse step one launch adding the residual in the epilogue.
WARS_LAYERS = [
    ["full", "full", "full", "full"],
    ["wars(2)", "wars(0)", "wars(5)", "wars(1)"],
    ["wars(2)", "wars(0)", "wars(5)", "wars(1)"],
    ["full", "full", "full", "full"],
    ["wars(3)+asc", "wars(1)+asc", "wars(0)+asc", "wars(2)+asc"],
    ["wars(3)+asc", "wars(1)+asc", "wars(0)+asc", "wars(2)+asc"],
]


@pytest.mark.parametrize("cfg_layout", ["batched_cond_first", "batched_uncond_first", "separate_cond_first"])
@pytest.mark.parametrize("methods", [FUSED, WARS_LAYERS], ids=["fused", "wars"])
def test_fused_layers_match_float64_reference(cfg_layout, methods, monkeypatch):
    import ditlens.kernels as kernels

    calls = {"warsr_attention": 0, "windowed_plus_residual": 0}
    for name in calls:
        def counted(*args, _f=getattr(kernels, name), _name=name, **kwargs):
            calls[_name] += 1
            return _f(*args, **kwargs)
        monkeypatch.setattr(kernels, name, counted)
    plan = make_plan("joint", 4, 8, methods, cfg_layout, (1, 4, 5), n_text=3, text_position="first")
    got, want, runtime, executed, full_pairs = run_and_reference(plan, seed=7, backend="kernels")
    for s, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-5, msg=f"step {s}")
    assert runtime.flops.core == 4 * 8 * executed
    if methods is WARS_LAYERS:  # the one-launch paths ran (separate forwards: the +asc steps stay grouped)
        assert calls == {"warsr_attention": 2, "windowed_plus_residual": 4}


CUDA_BACKENDS = [pytest.param(b, marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                            reason="needs a CUDA device")])
                 for b in ("kernels", "flex", "auto")]


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("text_position", ["first", "last"])
def test_runtime_on_cuda_matches_float64_reference(backend, dtype, text_position, monkeypatch):
    """The CUDA paths of the runtime (Triton kernels, FlexAttention) against float64, head dim 64."""
    import ditlens.kernels as kernels

    one_pass = []
    monkeypatch.setattr(kernels, "warsr_attention",
                        lambda *a, _f=kernels.warsr_attention, **kw: one_pass.append(kw.get("fused")) or _f(*a, **kw))
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    for methods, layout, refresh in ((FUSED, "batched_uncond_first", "one-pass"),
                                     (MIXED, "batched_cond_first", "one-pass"),
                                     (FUSED, "separate_cond_first", "one-pass"),
                                     (WARS_LAYERS, "batched_uncond_first", "one-pass"),
                                     (WARS_LAYERS, "separate_cond_first", "two-pass")):
        plan = make_plan("joint", 4, 64, methods, layout, (1, 9, 11), n_text=13, text_position=text_position)
        got, want, runtime, executed, _ = run_and_reference(plan, seed=11, backend=backend, device="cuda", dtype=dtype,
                                                            warsr_refresh=refresh)
        for s, (g, w) in enumerate(zip(got, want)):
            torch.testing.assert_close(g, w, atol=tol, rtol=tol, msg=f"{layout} {refresh} step {s}")
        assert runtime.flops.core == 4 * 64 * executed
    # WA-RS's batched refresh without +asc (step 0 of WARS_LAYERS) runs in one launch on Triton; the
    # +asc refresh (step 3) and the two-pass run use the model's attention (flex: the grouped path)
    assert one_pass.count(True) == (0 if backend == "flex" else 1)


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9),
                    reason="needs a Hopper GPU")
@pytest.mark.parametrize("layout", ["batched_uncond_first", "separate_cond_first"])
def test_runtime_wars_on_the_gluon_launch_matches_float64_reference(layout, monkeypatch):
    """FLUX-shaped calls (head dim 128, 128 text tokens first, 256 tokens): under ``auto`` the runtime's
    WA-RS refresh (R = O - W) and apply (W + R) launches run on the Gluon kernel, and match float64."""
    from ditlens.kernels import api
    from ditlens.kernels.gluon_backend import gluon_available

    if not gluon_available():
        pytest.skip("needs Triton with Gluon")
    epilogues = []  # "subtract" per Gluon launch with a residual
    monkeypatch.setattr(api, "headwise_gluon", lambda *a, _f=api.headwise_gluon, **kw: (
        kw.get("residual") is not None and epilogues.append(kw.get("subtract", False))) or _f(*a, **kw))
    plan = make_plan("joint", 4, 128, WARS_LAYERS, layout, (1, 8, 16), n_text=128, text_position="first")
    got, want, runtime, executed, _ = run_and_reference(plan, seed=13, backend="auto", device="cuda",
                                                        dtype=torch.bfloat16, warsr_refresh="two-pass")
    for s, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, atol=2e-2, rtol=2e-2, msg=f"{layout} step {s}")
    assert runtime.flops.core == 4 * 128 * executed
    assert True in epilogues and False in epilogues, epilogues  # both WA-RS launches ran on Gluon


@pytest.mark.parametrize("text_position", ["first", "last"])
def test_joint_layer_methods_match_reference(text_position):
    methods = [
        ["full", "full", "full"],
        ["arrow(2)", "window(1)+asc", "wars(3)"],
        ["ast", "window2d(1)", "wars(3)+asc"],
        ["arrow(0)+asc", "ast", "full"],
    ]
    plan = make_plan("joint", 3, 8, methods, "batched_uncond_first", (2, 2, 3), n_text=5, text_position=text_position)
    got, want, runtime, executed, full_pairs = run_and_reference(plan, seed=3)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-5)
    assert runtime.flops.core == 4 * 8 * executed
    assert plan_flops(plan).core_fraction == pytest.approx(executed / full_pairs, abs=1e-15)


def test_no_cfg_plan_matches_reference():
    methods = [["full", "full"], ["wars(1)", "ast"], ["window(2)", "ast"], ["wars(1)", "full"]]
    plan = make_plan("self", 2, 4, methods, "none", (1, 3, 3))
    got, want, *_ = run_and_reference(plan, seed=5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,w", [("window", 0), ("window", 3), ("arrow", 2), ("window2d", 1), ("window2d", 0)])
@pytest.mark.parametrize("n_text,text_first", [(0, False), (4, True), (4, False)])
def test_masks_and_pair_counts_brute_force(kind, w, n_text, text_first):
    grid = (2, 3, 4)
    L = 24 + n_text
    layout = CallLayout(L, L, n_text, text_first, grid)
    mask = dense_mask(kind, w, layout).numpy()
    ref = ref_mask(kind, w, L, n_text, text_first, grid)
    np.testing.assert_array_equal(mask, ref)
    assert attended_pairs(HeadMethod(kind, w), layout) == int(ref.sum())


def test_method_strings_round_trip_and_refuse_garbage():
    for text in ["full", "asc", "ast", "window(8)", "arrow(3)+asc", "wars(16)+asc", "window2d(2)"]:
        assert parse_method(text).to_str() == text
    for bad in ["window", "ast+asc", "full(3)", "blur(2)", "wars(-1)"]:
        with pytest.raises(Exception):
            parse_method(bad)


# --------------------------------------------------------------------------------------------
# Plan structure refusals and JSON
# --------------------------------------------------------------------------------------------


def test_structure_refusals_name_the_problem():
    with pytest.raises(PlanMismatchError, match=r"methods\[1\]\[0\].*WA-RS.*no"):
        make_plan("self", 2, 4, [["asc", "full"], ["wars(2)", "full"]], "batched_cond_first", (1, 2, 2))
    with pytest.raises(PlanMismatchError, match=r"ASC.*cfg_layout is 'none'"):
        make_plan("self", 2, 4, [["full", "full"], ["asc", "full"]], "none", (1, 2, 2))
    with pytest.raises(PlanMismatchError, match=r"methods\[0\]\[0\].*AST at step 0"):
        make_plan("self", 2, 4, [["ast", "full"]], "none", (1, 2, 2))
    with pytest.raises(PlanMismatchError, match="not defined on cross"):
        make_plan("cross", 2, 4, [["window(2)", "full"]], "none", (1, 2, 2))
    with pytest.raises(PlanMismatchError, match="one window per refresh"):
        make_plan("self", 1, 4, [["full"], ["wars(1)"], ["wars(2)"]], "none", (1, 2, 2))


@pytest.mark.parametrize("kind", ["window", "arrow", "window2d"])
@pytest.mark.parametrize("n_text,text_first,grid", [(0, False, (1, 3, 5)), (4, True, (2, 3, 4)), (3, False, (2, 2, 3))])
def test_widest_window_is_where_the_mask_keeps_every_pair(kind, n_text, text_first, grid):
    L = grid[0] * grid[1] * grid[2] + n_text
    layout = CallLayout(L, L, n_text, text_first, grid)
    keep_all = ref_mask(kind, 10 * L, L, n_text, text_first, grid)
    first = min(w for w in range(L + 1) if (ref_mask(kind, w, L, n_text, text_first, grid) == keep_all).all())
    assert widest_window(kind, layout) == first
    for w in range(first + 3):
        assert removes_pairs(HeadMethod(kind, w), layout) == (w < first)


def test_window_wider_than_the_sequence_is_refused():
    # 3x3 tokens: window(8) already keeps every pair and is accepted; window(9) is wider than the sequence
    make_plan("self", 2, 4, [["full", "full"], ["window(8)", "full"]], "none", (1, 3, 3))
    with pytest.raises(PlanMismatchError, match=r"methods\[1\]\[0\] \(layer0\): window\(9\) is wider than the self "
                       r"attention's sequence of 9 image tokens.*below 8"):
        make_plan("self", 2, 4, [["full", "full"], ["window(9)", "full"]], "none", (1, 3, 3))
    with pytest.raises(PlanMismatchError, match=r"wars\(12\).*12 image tokens"):  # joint: frames x rows x cols
        make_plan("joint", 1, 4, [["full"], ["wars(12)"]], "none", (2, 2, 3), n_text=5, text_position="first")
    make_plan("joint", 1, 4, [["full"], ["wars(11)"]], "none", (2, 2, 3), n_text=5, text_position="first")
    with pytest.raises(PlanMismatchError, match=r"window2d\(3\).*a 3x2 token grid.*below 2"):
        make_plan("self", 1, 4, [["window2d(3)"]], "none", (1, 3, 2))
    with pytest.raises(PlanMismatchError, match=r"temporal attention's sequence of 3 image tokens"):  # over frames
        make_plan("temporal", 1, 4, [["window(3)"]], "none", (3, 2, 2))


def test_json_round_trip_and_schema_errors(tmp_path):
    plan = make_plan("self", 4, 8, MIXED, "batched_cond_first", (1, 4, 4))
    path = plan.save(tmp_path / "p.json")
    again = Plan.load(path)
    assert again.to_dict() == plan.to_dict()
    data = json.loads(path.read_text())
    data["methods"][1][0][0] = "wndow(2)"
    with pytest.raises(PlanMismatchError, match=r"plan methods at step 1, layer 0, head 0: unknown method 'wndow'; "
                                                r"use one of full, window"):
        Plan.from_dict(data)
    data["methods"][1][0] = "arrow"
    with pytest.raises(PlanMismatchError, match=r"at step 1, layer 0: method 'arrow' needs a half-width"):
        Plan.from_dict(data)
    data["methods"][1][0] = 7
    with pytest.raises(PlanMismatchError, match=r"at step 1, layer 0: a method is a string"):
        Plan.from_dict(data)
    data = json.loads(path.read_text())
    data["model"]["heads"] = "many"
    with pytest.raises(PlanMismatchError, match=r"plan field model\.heads"):
        Plan.from_dict(data)
    data = json.loads(path.read_text())
    data["schema_version"] = 2
    with pytest.raises(PlanMismatchError, match="upgrade ditlens"):
        Plan.from_dict(data)
    (tmp_path / "bin.json").write_bytes(b"\x80\x04\x95pickle")
    with pytest.raises(PlanMismatchError, match="pickle"):
        Plan.load(tmp_path / "bin.json")
    (tmp_path / "cut.json").write_text(path.read_text()[:-20])  # a plan cut short, e.g. by a full disk
    with pytest.raises(PlanMismatchError, match=r"^\S*cut\.json: plan is not valid JSON"):
        Plan.load(tmp_path / "cut.json")
    data["schema_version"] = 1
    data["model"]["heads"] = "many"
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(PlanMismatchError, match=r"^\S*bad\.json: plan field model\.heads"):
        Plan.load(tmp_path / "bad.json")


# --------------------------------------------------------------------------------------------
# Real tiny pipelines
# --------------------------------------------------------------------------------------------


def _no_ditlens_left(pipe) -> None:
    t = pipe.transformer
    for name, module in t.named_modules():
        assert not hasattr(module, "_diffusers_hook"), name
        assert "forward" not in module.__dict__, name
        assert not module._forward_hooks, name
        assert not module._forward_pre_hooks, name


def _uniform(pipe, family, steps, method="full", **kw):
    d = DIMS[family]
    return Plan.uniform(pipe, steps, method, height=d.height, width=d.width, guidance=3.0, grid=d.grid,
                        n_text=d.text_len, **kw)


@pytest.fixture(scope="module")
def dit_pipe():
    return build_tiny_pipeline("dit")


def test_all_full_plan_is_bit_identical_and_removal_restores(dit_pipe):
    kw = lambda: pipeline_call_kwargs("dit", "class3", 2, 3.0, 0)
    before = dit_pipe(**kw()).images
    plan = _uniform(dit_pipe, "dit", 2)
    handle = apply_plan(dit_pipe, plan)
    with_plan = dit_pipe(**kw()).images
    assert handle.flops.core_fraction == 1.0
    handle.remove()
    after = dit_pipe(**kw()).images
    np.testing.assert_array_equal(with_plan, before)
    np.testing.assert_array_equal(after, before)
    _no_ditlens_left(dit_pipe)
    # a compressing plan changes the images, and removal still restores them exactly
    handle = apply_plan(dit_pipe, _uniform(dit_pipe, "dit", 2, "window(1)"))
    assert np.abs(dit_pipe(**kw()).images - before).max() > 0
    assert remove_plan(dit_pipe) is True and remove_plan(dit_pipe) is False
    np.testing.assert_array_equal(dit_pipe(**kw()).images, before)
    _no_ditlens_left(dit_pipe)


@pytest.mark.parametrize("count_flops", [False, True])
def test_a_suspended_plan_leaves_the_model_as_removal_does(dit_pipe, count_flops):
    """Inside ``handle.suspended()`` the pipeline is exactly the uncompressed one (same images, no
    ditlens attribute or hook left); afterwards the same plan runs again with the same runtime, its
    images and FLOPs those of a freshly applied plan."""
    kw = lambda: pipeline_call_kwargs("dit", "class3", 2, 3.0, 0)
    before = dit_pipe(**kw()).images
    plan = _uniform(dit_pipe, "dit", 2, "window(1)")
    with apply_plan(dit_pipe, plan, count_flops=count_flops) as fresh:
        want = dit_pipe(**kw()).images
        want_core = fresh.flops.core
    handle = apply_plan(dit_pipe, plan, count_flops=count_flops)
    runtime = handle.runtime
    dit_pipe(**kw())
    with handle.suspended():
        np.testing.assert_array_equal(dit_pipe(**kw()).images, before)
        _no_ditlens_left(dit_pipe)
    np.testing.assert_array_equal(dit_pipe(**kw()).images, want)
    assert handle.runtime is runtime
    if count_flops:
        assert handle.flops.core == want_core and 0 < want_core < handle.flops.core_full
    handle.remove()
    _no_ditlens_left(dit_pipe)
    with pytest.raises(DitlensError, match="removed"):
        with handle.suspended():
            pass
    handle = apply_plan(dit_pipe, plan, count_flops=count_flops)
    with handle.suspended():
        handle.remove()  # removed while suspended: nothing comes back on
    _no_ditlens_left(dit_pipe)


def test_untouched_layers_carry_no_hook_and_checks_still_run(dit_pipe):
    """Without FLOPs counting, a layer the plan never changes gets no hook (host time per forward); the
    step bookkeeping then runs after the forward, and its run checks still refuse a mismatch."""
    from ditlens.analyzer import hooks
    from ditlens.compress.runtime import LAYER_HOOK

    kw = lambda steps=3: pipeline_call_kwargs("dit", "class2", steps, 3.0, 0)
    before = dit_pipe(**kw()).images
    modules = lambda plan: [dit_pipe.transformer.get_submodule(layer.name) for layer in plan.model.layers]
    plan = _uniform(dit_pipe, "dit", 3)
    with apply_plan(dit_pipe, plan, count_flops=False) as handle:
        assert handle.modules == [] and not any(hooks.has_hook(m, LAYER_HOOK) for m in modules(plan))
        np.testing.assert_array_equal(dit_pipe(**kw()).images, before)
        with pytest.raises(PlanMismatchError, match=r"3 steps.*runs 2"):
            dit_pipe(**kw(2))
        with pytest.raises(PlanMismatchError, match=r"run\.cfg_layout"):
            dit_pipe(**pipeline_call_kwargs("dit", "class2", 3, 1.0, 0))
        np.testing.assert_array_equal(dit_pipe(**kw()).images, before)  # the refused calls left no state
    _no_ditlens_left(dit_pipe)
    # one layer compressed at steps 1-2: only it is hooked, and the images equal those with every layer hooked
    plan.set(1, 0, "wars(1)")
    plan.set(2, 0, "ast")
    with apply_plan(dit_pipe, plan) as handle:
        assert handle.modules == modules(plan)
        counted = dit_pipe(**kw()).images
    with apply_plan(dit_pipe, plan, count_flops=False) as handle:
        assert handle.modules == modules(plan)[:1]
        np.testing.assert_array_equal(dit_pipe(**kw()).images, counted)
    assert np.abs(counted - before).max() > 0
    _no_ditlens_left(dit_pipe)


def test_lowering_runs_unpaying_wars_segments_dense(dit_pipe):
    from ditlens.compress.flops import plan_core_fraction
    from ditlens.compress.lowering import WarsSegment, lower_unprofitable_wars, wars_segments

    plan = _uniform(dit_pipe, "dit", 5)
    H = plan.model.heads
    for s, m in enumerate(["full", "wars(2)", "full", "wars(2)", "wars(2)"]):  # layer 0: segments of 1 and 2 reuses
        plan.set(s, 0, m)
    for s in range(1, 5):  # layer 1: head 0 reuses its step-0 residual four times, with ASC
        plan.set(s, 1, ["wars(1)+asc"] + ["full"] * (H - 1))
    plan.check_structure()
    original = plan.to_dict()
    layer0 = [seg for h in range(H) for seg in (WarsSegment(0, h, 0, (1,), "window", 2, False),
                                                WarsSegment(0, h, 2, (3, 4), "window", 2, False))]
    assert wars_segments(plan) == layer0 + [WarsSegment(1, 0, 0, (1, 2, 3, 4), "window", 1, True)]

    # windowed launch at 0.6 of a dense one: 1 reuse costs 2 x 0.6 > 1 dense, 2 reuses 3 x 0.6 < 2
    low = lower_unprofitable_wars(plan, lambda layer, kind, w: 0.6)
    assert plan.to_dict() == original  # the input plan is left alone
    assert low.plan.methods[1][0] == "full" and low.plan.methods[3][0] == "wars(2)" == low.plan.methods[4][0]
    assert [seg.reuse_steps for seg in low.lowered] == [(1,)] * H
    assert low.plan.methods[2][1][0] == "wars(1)+asc"
    assert plan_core_fraction(plan) < plan_core_fraction(low.plan) < 1.0
    # at 0.7, two reuses no longer pay (3 x 0.7 > 2) but four do (5 x 0.7 < 4)
    low = lower_unprofitable_wars(plan, lambda layer, kind, w: 0.7)
    assert all(low.plan.methods[s][0] == "full" for s in range(5))
    assert low.plan.methods[4][1] == ["wars(1)+asc"] + ["full"] * (H - 1)
    # a window as slow as dense attention: every segment runs dense (WA-RS+ASC keeps its ASC)
    low = lower_unprofitable_wars(plan, lambda layer, kind, w: 1.0)
    assert low.plan.methods[3][1] == ["asc"] + ["full"] * (H - 1) and "lowered" in low.plan.provenance.notes

    # lowered without ASC, the plan is the uncompressed model: bit-identical images
    for s in range(1, 5):
        plan.set(s, 1, "full")
    kw = lambda: pipeline_call_kwargs("dit", "class3", 5, 3.0, 0)
    before = dit_pipe(**kw()).images
    with apply_plan(dit_pipe, plan):
        assert np.abs(dit_pipe(**kw()).images - before).max() > 0
    low = lower_unprofitable_wars(plan, lambda layer, kind, w: 0.99)
    with apply_plan(dit_pipe, low.plan) as handle:
        np.testing.assert_array_equal(dit_pipe(**kw()).images, before)
        assert handle.flops.core_fraction == 1.0


@pytest.mark.parametrize("cfg_layout", ["batched_cond_first", "separate_cond_first"])
def test_drop_asc_runs_each_head_without_its_asc(cfg_layout):
    """Every +asc goes, nothing else changes, and the runtime runs the result as written."""
    from ditlens.compress import drop_asc

    plan = make_plan("self", 4, 8, MIXED, cfg_layout, (1, 4, 4))
    plan.set(5, 0, "asc")  # the last step's whole-layer ASC written as one method for the layer
    original = plan.to_dict()
    dropped, changed = drop_asc(plan)
    assert plan.to_dict() == original  # the input plan is left alone
    assert changed == sum(m.asc for s in range(plan.steps) for m in plan.head_methods(s, 0)) == 8
    for s in range(plan.steps):
        assert dropped.head_methods(s, 0) == tuple(HeadMethod(m.base, m.window) for m in plan.head_methods(s, 0))
    assert dropped.methods[5][0] == "full" and dropped.methods[2][0] == ["wars(2)", "ast", "full", "full"]
    assert "ASC dropped: 8 head-steps" in dropped.provenance.notes
    assert plan_flops(plan).core_fraction < plan_flops(dropped).core_fraction < 1.0
    got, want, *_ = run_and_reference(dropped)
    for s, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-5, msg=f"step {s}")
    assert drop_asc(dropped)[1] == 0


def test_lowering_runs_every_segment_dense_when_together_they_save_too_little(dit_pipe):
    """Segments that pay one by one must also save ``min_saving_s`` together, or all run dense."""
    from ditlens.compress.lowering import lower_unprofitable_wars

    plan = _uniform(dit_pipe, "dit", 5)
    H = plan.model.heads
    for s, m in enumerate(["full", "wars(2)", "full", "wars(2)", "wars(2)"]):
        plan.set(s, 0, m)  # per head: a 1-reuse segment (does not pay at 0.6) and a 2-reuse one (saves 0.2)
    for s in range(1, 5):
        plan.set(s, 1, ["wars(1)+asc"] + ["full"] * (H - 1))  # one 4-reuse segment: saves 4 - 5 x 0.6 = 1.0
    plan.check_structure()
    ratio = lambda layer, kind, w: 0.6  # noqa: E731
    dense_s = 1e-3
    saving = dense_s / H * (0.2 * H + 1.0)  # the paying segments' saving (each one head's share), by hand
    enough = lower_unprofitable_wars(plan, ratio, dense_s=dense_s, min_saving_s=saving * 0.99)
    alone = lower_unprofitable_wars(plan, ratio)
    assert enough.saving_s == pytest.approx(saving) and not enough.too_small
    assert enough.plan.to_dict()["methods"] == alone.plan.to_dict()["methods"] and len(enough.kept) == H + 1
    short = lower_unprofitable_wars(plan, ratio, dense_s=dense_s, min_saving_s=saving * 1.01)
    assert short.too_small and not short.kept and len(short.lowered) == 2 * H + 1
    assert all(short.plan.methods[s][0] == "full" for s in range(5))
    assert short.plan.methods[3][1] == ["asc"] + ["full"] * (H - 1)  # WA-RS+ASC keeps its ASC


def test_a_plan_that_changes_nothing_tracks_only_the_first_forward_of_a_call(dit_pipe, monkeypatch):
    """Without FLOPs counting, an all-full plan (what lowering leaves where no WA-RS segment pays)
    changes nothing a forward computes: only the first forward of each call runs the step bookkeeping
    and the run checks, the rest run bare (host time per forward in a host-bound loop). A plan that
    changes one layer, or counts FLOPs, tracks every forward."""
    from ditlens.compress.runtime import PlanRuntime

    tracked: list[int] = []
    begin_forward = PlanRuntime.begin_forward

    def spy(self, *args):
        begin_forward(self, *args)
        tracked.append(self.state.step)

    monkeypatch.setattr(PlanRuntime, "begin_forward", spy)
    kw = lambda: pipeline_call_kwargs("dit", "class4", 3, 3.0, 0)
    before = dit_pipe(**kw()).images
    plan = _uniform(dit_pipe, "dit", 3)
    with apply_plan(dit_pipe, plan, count_flops=False) as handle:
        assert handle.runtime.idle
        for _ in range(2):
            np.testing.assert_array_equal(dit_pipe(**kw()).images, before)
        assert tracked == [0, 0]
        with pytest.raises(PlanMismatchError, match=r"3 steps.*runs 2"):  # each call is still checked
            dit_pipe(**pipeline_call_kwargs("dit", "class4", 2, 3.0, 0))
    tracked.clear()
    with apply_plan(dit_pipe, plan) as handle:  # counting FLOPs: every forward
        assert not handle.runtime.idle
        dit_pipe(**kw())
        assert tracked == [0, 1, 2]
    # a pipeline that passes the transformer an affine map of the schedule (1000 - t): the schedule
    # cannot check the later steps at the first forward, so every forward is tracked and checked
    import dataclasses

    def reversed_time(module, args, kwargs):
        return args, {**kwargs, "timestep": 1000 - kwargs["timestep"]}

    hook = dit_pipe.transformer.register_forward_pre_hook(reversed_time, with_kwargs=True)
    try:
        seen = _recorded_timesteps(dit_pipe, 3)
        for wrong in (None, 2):
            timesteps = list(seen)
            if wrong is not None:
                timesteps[wrong] += 50.0
            plan.run = dataclasses.replace(plan.run, timesteps=timesteps)
            tracked.clear()
            with apply_plan(dit_pipe, plan, count_flops=False) as handle:
                assert handle.runtime.idle
                if wrong is None:
                    dit_pipe(**kw())
                else:
                    with pytest.raises(PlanMismatchError, match=r"step 2 runs timestep"):
                        dit_pipe(**kw())
            assert tracked == ([0, 1, 2] if wrong is None else [0, 1])  # (step 2 raised in its bookkeeping)
    finally:
        hook.remove()
    plan.run = dataclasses.replace(plan.run, timesteps=None)
    tracked.clear()
    plan.set(2, 0, "window(1)")
    with apply_plan(dit_pipe, plan, count_flops=False) as handle:
        assert not handle.runtime.idle
        dit_pipe(**kw())
        assert tracked == [0, 1, 2]
    _no_ditlens_left(dit_pipe)


def _recorded_timesteps(pipe, steps: int) -> list[float]:
    """The timestep each transformer forward of one uncompressed tiny-dit call received."""
    seen: list[float] = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: seen.append(float(torch.as_tensor(k["timestep"]).flatten()[0])), with_kwargs=True)
    try:
        pipe(**pipeline_call_kwargs("dit", "class1", steps, 3.0, 0))
    finally:
        hook.remove()
    return seen


@pytest.mark.parametrize("count_flops", [True, False])
def test_timestep_mismatch_is_refused_at_any_step(dit_pipe, count_flops):
    """Timesteps are read back from the device at steps 0 and 1 and the rest at the last step (no
    host-device wait at every step): a mismatch at step 0 or at a later step is refused either way,
    also where no layer carries a hook (an all-full plan without FLOPs counting tracks only the first
    forward of a call, which checks the later steps against the scheduler's schedule)."""
    import dataclasses

    steps = 5
    seen = _recorded_timesteps(dit_pipe, steps)
    plan = _uniform(dit_pipe, "dit", steps)
    for wrong_step in (0, 3):
        timesteps = list(seen)
        timesteps[wrong_step] += 50.0
        plan.run = dataclasses.replace(plan.run, timesteps=timesteps)
        with apply_plan(dit_pipe, plan, count_flops=count_flops):
            with pytest.raises(PlanMismatchError, match=rf"step {wrong_step} runs timestep .*run\.timesteps"):
                dit_pipe(**pipeline_call_kwargs("dit", "class1", steps, 3.0, 0))
    plan.run = dataclasses.replace(plan.run, timesteps=list(seen))
    with apply_plan(dit_pipe, plan, count_flops=count_flops):
        dit_pipe(**pipeline_call_kwargs("dit", "class1", steps, 3.0, 0))
    _no_ditlens_left(dit_pipe)


def test_timestep_tensor_reused_in_place_is_not_a_mismatch(dit_pipe):
    """The runtime keeps the pipeline's own timestep tensors (no copy per step) and reads the middle
    steps back at the last one: a pipeline that writes every step's timestep into one tensor in place
    must not be refused for the values that tensor held earlier, and a wrong step 0 is still refused."""
    import dataclasses

    steps = 5
    seen = _recorded_timesteps(dit_pipe, steps)
    shared = torch.zeros(2)

    def in_place(module, args, kwargs):
        shared.copy_(torch.as_tensor(kwargs["timestep"], dtype=shared.dtype).expand(2))
        return args, {**kwargs, "timestep": shared}

    hook = dit_pipe.transformer.register_forward_pre_hook(in_place, with_kwargs=True)
    try:
        plan = _uniform(dit_pipe, "dit", steps)
        plan.run = dataclasses.replace(plan.run, timesteps=list(seen))
        with apply_plan(dit_pipe, plan):
            dit_pipe(**pipeline_call_kwargs("dit", "class1", steps, 3.0, 0))
        wrong = list(seen)
        wrong[0] += 50.0
        plan.run = dataclasses.replace(plan.run, timesteps=wrong)
        with apply_plan(dit_pipe, plan):
            with pytest.raises(PlanMismatchError, match=r"step 0 runs timestep"):
                dit_pipe(**pipeline_call_kwargs("dit", "class1", steps, 3.0, 0))
    finally:
        hook.remove()
    _no_ditlens_left(dit_pipe)


def test_caches_reset_between_calls_and_memory_reported(dit_pipe):
    kw = lambda: pipeline_call_kwargs("dit", "class5", 3, 3.0, 1)
    with apply_plan(dit_pipe, _uniform(dit_pipe, "dit", 3, "wars(2)+asc", at_steps=[1, 2])) as handle:
        first = dit_pipe(**kw()).images
        assert handle.peak_cache_bytes() > 0
        second = dit_pipe(**kw()).images  # a stale residual from the first call would change this
        np.testing.assert_array_equal(first, second)
    _no_ditlens_left(dit_pipe)


def test_run_mismatches_are_refused(dit_pipe):
    plan = _uniform(dit_pipe, "dit", 3)
    with apply_plan(dit_pipe, plan):
        with pytest.raises(PlanMismatchError, match=r"3 steps.*runs 2.*run\.steps"):
            dit_pipe(**pipeline_call_kwargs("dit", "class1", 2, 3.0, 0))
        with pytest.raises(PlanMismatchError, match=r"run\.cfg_layout"):
            dit_pipe(**pipeline_call_kwargs("dit", "class1", 3, 1.0, 0))
    d = DIMS["dit"]
    other = Plan.uniform(dit_pipe, 3, height=d.height, width=d.width, guidance=3.0, grid=(1, 2, 2))
    with apply_plan(dit_pipe, other):
        with pytest.raises(PlanMismatchError, match=r"run\.height/width"):
            dit_pipe(**pipeline_call_kwargs("dit", "class1", 3, 3.0, 0))
    tampered = _uniform(dit_pipe, "dit", 3)
    tampered.model = ModelFingerprint(**{**tampered.model.__dict__, "config_hash": "f" * 32})
    with pytest.raises(PlanMismatchError, match="config_hash"):
        apply_plan(dit_pipe, tampered)
    _no_ditlens_left(dit_pipe)


def test_window_wider_than_the_sequence_is_refused_at_run_time_for_a_plan_without_grid(dit_pipe):
    d = DIMS["dit"]
    n_image = d.grid[1] * d.grid[2]
    plan = Plan.uniform(dit_pipe, 3, f"window({n_image})", guidance=3.0)  # no resolution given: no grid to check
    assert plan.model.tokens.grid is None
    with apply_plan(dit_pipe, plan):
        with pytest.raises(PlanMismatchError, match=rf"window\({n_image}\) is wider than .*below {n_image - 1}"):
            dit_pipe(**pipeline_call_kwargs("dit", "class1", 3, 3.0, 0))
    _no_ditlens_left(dit_pipe)
    with apply_plan(dit_pipe, Plan.uniform(dit_pipe, 3, f"window({n_image - 1})", guidance=3.0)):
        dit_pipe(**pipeline_call_kwargs("dit", "class1", 3, 3.0, 0))  # keeps every pair, but fits: runs


def test_plan_for_another_model_is_refused(dit_pipe):
    sd3 = build_tiny_pipeline("sd3")
    plan = _uniform(sd3, "sd3", 2)
    with pytest.raises(PlanMismatchError, match=r"family 'sd3'.*'dit'"):
        apply_plan(dit_pipe, plan)
    with pytest.raises(PlanMismatchError, match="ASC.*'none'"):
        _uniform(sd3, "sd3", 2, "asc", cfg_layout="none")


def _run_steps(transformer, inputs_per_step, apply=None):
    """Call the transformer once per step; return per-step outputs and per-step attention-module outputs."""
    layer_out: dict = {}
    names = [n for n, _ in transformer.named_modules() if n.endswith(("attn", "attn1", "attn2"))]
    hooks = []
    for name in names:
        module = transformer.get_submodule(name)

        def grab(mod, args, out, name=name):
            first = out[0] if isinstance(out, tuple) else out
            layer_out.setdefault(name, []).append(first.detach().clone())

        hooks.append(module.register_forward_hook(grab))
    outs = []
    try:
        for inputs in inputs_per_step:
            with torch.no_grad():
                outs.append(transformer(**inputs, return_dict=False)[0].clone())
    finally:
        for h in hooks:
            h.remove()
    return outs, layer_out


def test_ast_at_one_layer_and_step_changes_exactly_that():
    tiny = build_tiny("sd3")
    t = tiny.transformer
    gen = torch.Generator().manual_seed(0)
    base_inputs = tiny.make_inputs(1, gen)
    steps = [dict(base_inputs, hidden_states=torch.randn_like(base_inputs["hidden_states"]),
                  timestep=torch.tensor([900.0 - 300 * s])) for s in range(3)]
    fake_pipe = SimpleNamespace(transformer=t, scheduler=None)
    plan = Plan.uniform(fake_pipe, 3, "full", cfg_layout="none", grid=DIMS["sd3"].grid, n_text=DIMS["sd3"].text_len)
    layer = plan.model.layers[1].name  # transformer_blocks.0.attn2 (image self attention)
    plan.set(2, 1, "ast")
    base, base_layers = _run_steps(t, steps)
    with apply_plan(fake_pipe, plan):
        got, got_layers = _run_steps(t, steps)
    for s in (0, 1):
        torch.testing.assert_close(got[s], base[s], rtol=0, atol=0)
    assert not torch.equal(got[2], base[2])
    # the layer's module output at step 2 is exactly its step-1 output; the earlier layer is untouched
    torch.testing.assert_close(got_layers[layer][2], base_layers[layer][1], rtol=0, atol=0)
    first = plan.model.layers[0].name
    torch.testing.assert_close(got_layers[first][2], base_layers[first][2], rtol=0, atol=0)
    _no_ditlens_left(SimpleNamespace(transformer=t))


@pytest.mark.parametrize("family", FAMILIES)
def test_projection_flops_static_equals_measured(family):
    tiny = build_tiny(family)
    t = tiny.transformer
    fake_pipe = SimpleNamespace(transformer=t, scheduler=None)
    d = DIMS[family]
    n_text = tiny.expected.get("n_text", d.text_len)
    plan = Plan.uniform(fake_pipe, 1, "full", cfg_layout="none", grid=d.grid, n_text=n_text)
    with apply_plan(fake_pipe, plan) as handle:
        with torch.no_grad():
            t(**tiny.make_inputs(1, torch.Generator().manual_seed(0)), return_dict=False)
        measured = handle.flops
    static = projection_flops(t, list(plan.model.layers), d.grid, n_text)
    assert measured.projections == sum(static)
    assert measured.core == measured.core_full > 0


def test_import_without_h5py_dash_plotly():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('h5py', 'dash', 'plotly'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import ditlens.compress\n"
        "from ditlens.compress import Plan, apply_plan\n"
        "assert not any(m.split('.')[0] in ('h5py', 'dash', 'plotly') for m in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_validate_and_export(dit_pipe, tmp_path):
    from ditlens.compress.export import export_plan
    from ditlens.compress.validate import to_images, validate

    runs = []
    call = lambda prompt, seed: runs.append(prompt) or pipeline_call_kwargs("dit", prompt, 2, 3.0, seed)
    plan = _uniform(dit_pipe, "dit", 2, "window(2)")
    report = validate(dit_pipe, plan, ["class1", "class2"], call, out_dir=tmp_path / "v")
    # untimed calls (kernel compiles, first allocations; the first with the plan counts its FLOPs),
    # then each prompt with and without the plan side by side
    assert runs == ["class1", "class1", "class1", "class1", "class1", "class2", "class2"]
    full = to_images(dit_pipe(**call("class2", 1)))
    with apply_plan(dit_pipe, plan):
        comp = to_images(dit_pipe(**call("class2", 1)))
    assert report.psnr[1] == pytest.approx(10 * np.log10(1 / np.mean((full - comp) ** 2)))
    assert 0 < report.flops["attention_core_fraction"] < 1
    assert report.flops["attention_core_fraction"] == pytest.approx(plan_flops(plan).core_fraction)
    for name in ("validate.json", "validate.md", "grid.png"):
        assert (tmp_path / "v" / name).is_file()
    written = export_plan(plan, tmp_path / "deploy")
    assert Plan.load(written[0]).to_dict() == plan.to_dict()
    _no_ditlens_left(dit_pipe)


def test_validate_times_the_plan_without_its_flops_counters(dit_pipe):
    """FLOPs are counted in the plan's untimed call only: a hook on every projection costs host
    time at every forward, which the timed calls must not pay (the uncompressed ones do not)."""
    from ditlens.analyzer import hooks
    from ditlens.compress.runtime import STEP_HOOK
    from ditlens.compress.validate import validate

    linears = [m for m in dit_pipe.transformer.modules() if isinstance(m, torch.nn.Linear)]
    seen = []

    def call(prompt: str, seed: int) -> dict:
        counters = sum(len(m._forward_hooks) for m in linears)
        seen.append((hooks.has_hook(dit_pipe.transformer, STEP_HOOK), counters > 0))
        return pipeline_call_kwargs("dit", prompt, 2, 3.0, seed)

    plan = _uniform(dit_pipe, "dit", 2, "window(2)")
    report = validate(dit_pipe, plan, ["class1", "class2", "class3"], call)
    # warm-ups (full, plan counting FLOPs, plan as timed), then pairs in ABBA order, the plan never counting
    assert seen == [(False, False), (True, True), (True, False), (False, False), (True, False), (True, False),
                    (False, False), (False, False), (True, False)]
    assert report.flops["attention_core_fraction"] == pytest.approx(plan_flops(plan).core_fraction)
    assert len(report.prompt_seconds_full) == len(report.prompt_seconds_plan) == 3
    with pytest.raises(DitlensError, match="at least one prompt"):
        validate(dit_pipe, plan, [], call)
    _no_ditlens_left(dit_pipe)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_validate_on_cuda_times_attention_with_events():
    """On CUDA the attention timer reads events after each call (no synchronise per module): the
    attention time is positive, below the call's own time, and the plan's images match a plain
    run of the plan."""
    from ditlens.compress.validate import to_images, validate

    pipe = build_tiny_pipeline("pixart").to("cuda", torch.float16)
    pipe.set_progress_bar_config(disable=True)

    def call(prompt: str, seed: int) -> dict:
        kw = pipeline_call_kwargs("pixart", prompt, 3, 3.0, seed)
        kw["generator"] = torch.Generator("cuda").manual_seed(seed)
        return kw

    plan = _uniform(pipe, "pixart", 3, "window(2)")
    report = validate(pipe, plan, ["a cat", "a dog"], call)
    for attention, seconds in ((report.attention_seconds_full, report.seconds_full),
                               (report.attention_seconds_plan, report.seconds_plan)):
        assert 0 < attention < seconds
    assert report.peak_memory_full is not None and report.peak_memory_plan is not None
    with apply_plan(pipe, plan):
        again = to_images(pipe(**call("a dog", 1)))
    full = to_images(pipe(**call("a dog", 1)))
    assert report.psnr[1] == pytest.approx(10 * np.log10(1 / np.mean((full - again) ** 2)), rel=1e-3)
    _no_ditlens_left(pipe)


def test_validate_under_cuda_graphs_needs_cuda(dit_pipe, tmp_path, capsys):
    from ditlens.cli import main
    from ditlens.compress.validate import validate

    plan = _uniform(dit_pipe, "dit", 2, "window(2)")
    with pytest.raises(DitlensError, match="CUDA device"):
        validate(dit_pipe, plan, ["class1"], lambda p, s: pipeline_call_kwargs("dit", p, 2, 3.0, s), cuda_graphs=True)
    path = plan.save(tmp_path / "p.json")
    assert main(["validate", "--model", "tiny-dit", "--plan", str(path), "--cuda-graphs"]) == 2
    assert "--cuda-graphs needs --device cuda" in capsys.readouterr().err
    _no_ditlens_left(dit_pipe)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_validate_under_cuda_graphs_replays_the_timed_calls_and_keeps_the_images():
    """With cuda_graphs every timed forward is a replay: the images (so PSNR) are those of the
    eager validation, the replays cover all timed calls, and the attention share comes from the
    graph timing of the modules (no module clock runs inside a replay)."""
    from ditlens.compress.validate import validate

    pipe = build_tiny_pipeline("pixart").to("cuda", torch.float16)
    pipe.set_progress_bar_config(disable=True)
    steps, prompts = 3, ["a cat", "a dog"]

    def call(prompt: str, seed: int) -> dict:
        kw = pipeline_call_kwargs("pixart", prompt, steps, 3.0, seed)
        kw["generator"] = torch.Generator("cuda").manual_seed(seed)
        return kw

    plan = _uniform(pipe, "pixart", steps, "window(2)")
    eager = validate(pipe, plan, prompts, call)
    graphed = validate(pipe, plan, prompts, call, cuda_graphs=True)
    assert graphed.psnr == pytest.approx(eager.psnr, rel=1e-3)
    assert graphed.flops == eager.flops
    # captures replay once each (2 calls), then 2 timed calls per prompt, one forward per step
    assert graphed.graph_replays == (2 + 2 * len(prompts)) * steps
    assert graphed.attention_seconds_full is None and eager.attention_seconds_full is not None
    assert 0.0 <= graphed.attention_share < 1.0 and graphed.amdahl_bound >= 1.0
    assert "replayed from a CUDA graph" in graphed.markdown()
    _no_ditlens_left(pipe)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc settings")
def test_validate_can_pin_glibc_malloc():
    """glibc takes both settings that keep CPU timings from depending on earlier allocations."""
    from ditlens.compress.validate import steady_cpu_allocator

    assert steady_cpu_allocator()


def test_validate_refuses_another_models_plan_before_running_anything(dit_pipe):
    """Another model's plan is refused by name before the two uncompressed runs (it used to fail
    inside them, or after them, with an AttributeError from a missing submodule)."""
    from ditlens.compress.validate import validate

    runs = []
    sd3 = build_tiny_pipeline("sd3")
    plan = _uniform(dit_pipe, "dit", 2, "window(2)")
    call = lambda prompt, seed: runs.append(prompt) or pipeline_call_kwargs("sd3", prompt, 2, 3.0, seed)
    with pytest.raises(PlanMismatchError, match="plan is for model family 'dit' but the pipeline is 'sd3'"):
        validate(sd3, plan, ["a cat"], call)
    assert runs == []


@pytest.mark.parametrize("family", ["cogvideox", "latte", "mochi"])
def test_validate_pipeline_runs_a_video_plan_at_its_frame_count(family, tmp_path):
    """validate_pipeline asks the pipeline for the plan's frame count (each pipeline's default is
    another length), passes the caller's pipeline arguments through, and a run at another length is
    refused naming the frame count."""
    from ditlens.compress.validate import validate_pipeline

    pipe = build_tiny_pipeline(family)
    pipe.set_progress_bar_config(disable=True)
    kw = pipeline_call_kwargs(family, "a cat", 2, 3.0, 0)
    frames_arg = "video_length" if family == "latte" else "num_frames"
    extra = {k: v for k, v in kw.items() if k not in ("num_inference_steps", "generator", "prompt", "guidance_scale",
                                                       "height", "width", "output_type", frames_arg)}
    plan = _uniform(pipe, family, 2, "ast", frames=DIMS[family].latent_frames)
    assert plan.model.tokens.grid[0] > 1
    report = validate_pipeline(pipe, plan, ["a cat"], call_kwargs=extra)
    assert 0 < report.flops["attention_core_fraction"] < 1
    if family == "latte":
        return  # Latte's temporal position embedding is made for one length: another cannot run at all
    longer = {**extra, frames_arg: kw[frames_arg] + {"cogvideox": 8, "mochi": 12}[family]}
    with pytest.raises(PlanMismatchError, match=r"another frame count \(run.frames\)"):
        validate_pipeline(pipe, plan, ["a cat"], call_kwargs=longer)


def test_validate_pipeline_takes_numeric_class_labels():
    """Class labels given as numbers (as profile and search take them) reach the classifier metrics."""
    from ditlens.compress.validate import validate_pipeline
    from ditlens.models import load_pipeline

    pipe = load_pipeline("tiny-dit")
    report = validate_pipeline(pipe, Plan.uniform(pipe, 2, "full"), ["1", "7"])
    assert report.classifier.get("accuracy_full") is not None


def test_validate_pipeline_skips_the_embedded_classifier_on_another_dit():
    """The Fashion-MNIST classifier only knows the embedded model's classes: another class-conditional
    DiT (here diffusers' DiTPipeline, tiny) gets no classifier rows rather than meaningless ones."""
    from tiny_models import build_tiny_pipeline

    from ditlens.compress.validate import validate_pipeline

    pipe = build_tiny_pipeline("dit")
    pipe.set_progress_bar_config(disable=True)
    report = validate_pipeline(pipe, Plan.uniform(pipe, 2, "full"), ["1", "2"])
    assert report.classifier == {} and len(report.psnr) == 2


def test_validate_reports_a_plan_slower_than_the_model():
    from ditlens.compress.validate import ValidationReport

    flops = {"attention_core_fraction": 0.5, "attention_module_fraction": 0.6}

    def report(seconds_plan: float) -> ValidationReport:
        return ValidationReport("m", "p", ["a"], [30.0], [0.9], flops, 1.0, seconds_plan, 0.5, 0.3, None, None, 0)

    slow, fast = report(1.05), report(0.8)
    assert slow.amdahl_bound == pytest.approx(1 / (1 - 0.5 * 0.4))
    assert slow.speed_verdict.startswith("slower than the uncompressed model (0.95x, bound 1.25x)")
    assert fast.speed_verdict == "1.25x, 100% of its Amdahl bound (1.25x)"
    assert f"| speed | {slow.speed_verdict} |" in slow.markdown()
    assert "| peak memory bytes (full / plan) | not measured off CUDA |" in slow.markdown()
    assert slow.as_dict()["speed_verdict"] == slow.speed_verdict
    assert slow.speed_verdict.endswith("or CUDA graphs on a host-bound GPU (--cuda-graphs)")
    # timed under CUDA graphs already: the share comes from the replayed forward, and graphs are not advised again
    graphed = ValidationReport("m", "p", ["a"], [30.0], [0.9], flops, 1.0, 1.05, None, None, None, None, 0,
                               cuda_graphs=True, graph_replays=8, graph_attention_share=0.5)
    assert graphed.amdahl_bound == pytest.approx(slow.amdahl_bound)
    assert graphed.speed_verdict.startswith("slower than") and "CUDA graphs" not in graphed.speed_verdict
    assert "| attention s (full / plan) | not clocked" in graphed.markdown()


def test_validate_speed_verdict_names_timing_noise():
    """Per-prompt pairs give the speedup a standard error (of a ratio of sums); a speedup within two
    of them of 1x is called noise, not a gain or a loss. A machine that slows down from pair to pair
    adds no noise: each pair ran side by side."""
    from ditlens.compress.validate import ValidationReport

    flops = {"attention_core_fraction": 0.5, "attention_module_fraction": 0.6}

    def report(full: list[float], plan: list[float]) -> ValidationReport:
        # half of the uncompressed time in attention: bound 1 / (1 - 0.5 * 0.4) = 1.25x
        return ValidationReport("m", "p", ["a"] * len(full), [30.0], [0.9], flops, sum(full), sum(plan), sum(full) / 2,
                                0.3, None, None, 0, prompt_seconds_full=full, prompt_seconds_plan=plan)

    noisy = report([1.0, 1.4, 0.8, 1.2], [1.1, 0.9, 1.3, 0.8])
    a, b = np.array(noisy.prompt_seconds_full), np.array(noisy.prompt_seconds_plan)
    ratio = a.sum() / b.sum()
    expected = np.sqrt(sum((x - ratio * y) ** 2 for x, y in zip(a, b)) / 3 / 4) / b.mean()
    assert noisy.speedup_noise == pytest.approx(expected)
    assert "within the timing noise of 4 prompts" in noisy.speed_verdict
    steady = report([1.0, 1.02, 0.98, 1.0], [0.8, 0.8, 0.8, 0.8])
    assert steady.speed_verdict == "1.25x ± 0.01, 100% of its Amdahl bound (1.25x)"
    drifting = report([1.0, 2.0, 3.0, 4.0], [0.8, 1.6, 2.4, 3.2])  # the machine slows, each pair alike
    assert drifting.speedup_noise == pytest.approx(0.0, abs=1e-12)
    assert drifting.speed_verdict == "1.25x ± 0.00, 100% of its Amdahl bound (1.25x)"
    slow = report([1.0, 1.01, 0.99, 1.0], [1.2, 1.21, 1.19, 1.2])
    assert slow.speed_verdict.startswith("slower than the uncompressed model")
    assert report([1.0], [0.9]).speedup_noise is None
    disturbed = report([4.0, 4.1, 3.9, 4.0], [1.0, 1.01, 0.99, 1.0])  # 4x against the 1.25x bound
    assert "above its 1.25x Amdahl bound" in disturbed.speed_verdict and "disturbed" in disturbed.speed_verdict


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["pixart", "sd3", "flux"])
def test_pipeline_on_cuda_kernels_agree_with_dense(family):
    """A whole pipeline in float16 on CUDA: the plan run through the Triton kernels (and
    FlexAttention) gives the images of the same plan run with dense masks."""
    pipe = build_tiny_pipeline(family).to("cuda", torch.float16)
    steps, d = 4, DIMS[family]
    plan = _uniform(pipe, family, steps)
    asc = "" if plan.run.cfg_layout == "none" else "+asc"  # FLUX plans run without CFG
    for s in range(1, steps):
        for i, layer in enumerate(plan.model.layers):
            if layer.kind in ("self", "joint"):
                cycle = (["window(2)", "arrow(3)", "ast", "window2d(1)"] if s % 2
                         else ["arrow(1)", "window(0)", "full", "full" + asc])
                plan.set(s, i, [cycle[h % 4].replace("full+asc", "asc") for h in range(d.heads)] if s < 3
                         else "window(1)" + asc)
    plan.check_structure()
    images = {}
    for backend in ("dense", "kernels", "flex"):
        kw = pipeline_call_kwargs(family, "a red bag", steps, 3.0 if asc else 1.0, 0)
        kw["generator"] = torch.Generator("cuda").manual_seed(0)
        with apply_plan(pipe, plan, backend=backend):
            images[backend] = pipe(**kw).images
    for backend in ("kernels", "flex"):
        np.testing.assert_allclose(images[backend], images["dense"], atol=2e-2, err_msg=backend)
    _no_ditlens_left(pipe)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("graphs", [True, False])
def test_lowering_measures_the_kernels_on_cuda(graphs):
    """The measured ratio drives the same rule as a given one: the plan lowered with the measured
    ratios equals the plan lowered with those ratios passed in by hand."""
    from ditlens.compress.lowering import lower_for_device, lower_unprofitable_wars, wars_segments

    pipe = build_tiny_pipeline("pixart")
    plan = _uniform(pipe, "pixart", 6)
    selfs = [i for i, layer in enumerate(plan.model.layers) if layer.kind == "self"]
    for i in selfs:
        for s in range(1, 6):
            plan.set(s, i, "wars(3)" if s != 3 else "full")  # segments of 2 reuses (steps 1-2, 4-5)
    plan.check_structure()
    low = lower_for_device(plan, "cuda", torch.float16, graphs=graphs)
    assert low.ratios and all(0 < r < float("inf") for r in low.ratios.values())
    assert len(low.lowered) + len(low.kept) == len(wars_segments(plan))
    again = lower_unprofitable_wars(plan, lambda layer, kind, w: low.ratios[(layer, kind, w)])
    assert again.plan.to_dict()["methods"] == low.plan.to_dict()["methods"]
    assert low.plan.to_dict()["methods"] != plan.to_dict()["methods"] or not low.lowered


def test_in_model_calibration_matches_the_launch_weighted_mean():
    """The calibrated ratios keep the microbenchmark's shape-to-shape proportions and average, over the
    plan's windowed launches (k + 1 per segment), to the ratio measured in the model."""
    from ditlens.compress.lowering import InModelLaunches, calibrate_in_model, wars_segments

    plan = Plan.uniform(build_tiny_pipeline("dit"), 8, "full")
    for s in (1, 2, 3):
        plan.set(s, 0, "wars(4)")  # one segment of 3 reuses per head at layer 0
    for s in (5, 6):
        plan.set(s, 1, "wars(2)")  # one of 2 reuses at layer 1
    plan.check_structure()
    micro = {(0, "window", 4): 0.5, (1, "window", 2): 0.8}
    launches = InModelLaunches(window_s=30e-6, window_launches=7, dense_s=40e-6, dense_launches=2)
    got = calibrate_in_model(lambda *key: micro[key], plan, launches)
    heads = plan.model.heads
    weights = {(0, "window", 4): 4 * heads, (1, "window", 2): 3 * heads}
    assert len(wars_segments(plan)) == 2 * heads
    mean = sum(micro[k] * n for k, n in weights.items()) / sum(weights.values())
    for key in micro:
        assert got(*key) == pytest.approx(micro[key] * 0.75 / mean)
    assert sum(got(*k) * n for k, n in weights.items()) / sum(weights.values()) == pytest.approx(0.75)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lowering_calibrates_in_the_model_on_cuda():
    """One profiled call of the planned pipeline finds every windowed launch and every SDPA call at
    the WA-RS layers' shape, and rescales the microbenchmark's ratios to its in-model level."""
    from ditlens.compress.lowering import (calibrate_in_model, lower_for_device, lower_unprofitable_wars,
                                           measure_window_ratios, profile_attention_launches, wars_segments)

    family, steps = "pixart", 6
    pipe = build_tiny_pipeline(family).to("cuda", torch.float16)
    plan = _uniform(pipe, family, steps)
    selfs = [i for i, layer in enumerate(plan.model.layers) if layer.kind == "self"]
    for i in selfs:
        for s in range(1, steps):
            plan.set(s, i, "wars(3)" if s != 3 else "full")  # refreshes at steps 0 and 3, reuses 1-2 and 4-5
    plan.check_structure()

    def run(p):
        kw = pipeline_call_kwargs(family, "a red bag", steps, 3.0, 0)
        with apply_plan(pipe, p, warsr_refresh="two-pass"):
            pipe(**kw)

    run(plan)  # compile the kernels outside the profile
    launches = profile_attention_launches(lambda: run(plan), plan)
    # per self layer: one R = O - W launch per refresh (2) and one W + R launch per reuse (4); the
    # model's own SDPA at the two refresh steps (one batched CFG forward per step)
    assert launches.window_launches == 6 * len(selfs)
    assert launches.dense_launches == 2 * len(selfs)
    assert 0 < launches.window_s < 1 and 0 < launches.dense_s < 1
    attention_s = launches.window_s * launches.window_launches + launches.dense_s * launches.dense_launches
    assert attention_s < launches.call_s < 10  # the call's GPU time holds its attention launches
    micro = measure_window_ratios(plan, "cuda", torch.float16)
    calibrated = calibrate_in_model(micro, plan, launches)
    keys = {(seg.layer, seg.kind, seg.window) for seg in wars_segments(plan)}
    # every key here has the same shape and weight: the calibrated mean is the in-model ratio
    assert sum(calibrated(*key) for key in keys) / len(keys) == pytest.approx(launches.ratio, rel=1e-9)
    low = lower_for_device(plan, "cuda", torch.float16, launches=launches)
    assert low.in_model is launches and "calibrated in the model" in low.summary()
    by_hand = lower_unprofitable_wars(plan, lambda layer, kind, w: low.ratios[(layer, kind, w)],
                                      dense_s=launches.dense_s, min_saving_s=0.03 * launches.call_s)
    assert by_hand.plan.to_dict()["methods"] == low.plan.to_dict()["methods"]
    assert by_hand.too_small == low.too_small and by_hand.saving_s == pytest.approx(low.saving_s)
    assert all(r == pytest.approx(launches.ratio * micro(*key) / (sum(micro(*k) for k in keys) / len(keys)))
               for key, r in low.ratios.items())


def test_validate_cli_lowering_leaves_the_plan_alone_off_cuda(tmp_path, capsys):
    from ditlens.cli import main
    from ditlens.models import load_pipeline

    plan = Plan.uniform(load_pipeline("tiny-dit"), 4, "full")
    for s in (1, 2, 3):
        plan.set(s, 0, "wars(4)")
    path = plan.save(tmp_path / "plan.json")
    out = tmp_path / "out"
    assert main(["validate", "--model", "tiny-dit", "--plan", str(path), "--num-prompts", "1", "--out", str(out),
                 "--lower-unprofitable"]) == 0
    printed = capsys.readouterr().out
    from ditlens.compress.lowering import wars_segments

    n = len(wars_segments(plan))
    assert n == plan.model.heads and f"lowering: 0 of {n} WA-RS segments run dense" in printed
    assert "no kernel timings off CUDA" in printed
    assert Plan.load(out / "plan_lowered.json").to_dict()["methods"] == plan.to_dict()["methods"]
    assert (out / "validate.json").exists()
