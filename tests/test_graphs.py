"""ditlens.compress.graphs: transformer forwards replayed from CUDA graphs, with and without a plan."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ditlens.compress import CudaGraphConfig, Plan, apply_cuda_graphs, apply_plan
from ditlens.compress.runtime import STEP_HOOK
from ditlens.errors import DitlensError

from test_compress import _no_ditlens_left
from tiny_models import DIMS, build_tiny_pipeline, pipeline_call_kwargs

def test_graphs_refuse_a_cpu_pipeline_and_bad_config():
    pipe = build_tiny_pipeline("dit")
    with pytest.raises(DitlensError, match="CUDA device"):
        apply_cuda_graphs(pipe)
    with pytest.raises(DitlensError, match="eager_calls"):
        CudaGraphConfig(eager_calls=0)
    _no_ditlens_left(pipe)


def test_hook_taken_off_and_put_back_keeps_behaviour_and_removal_exact():
    """apply_cuda_graphs moves the plan's step hook outside its own (take_off, attach, attach):
    the plan still runs the same, and removing both, in either order, leaves the module as found."""
    # imported here, not at collection: diffusers imports triton, which fixes the interpreter mode
    # before test_kernels can set TRITON_INTERPRET for the CPU kernel tests
    from diffusers.hooks import ModelHook

    from ditlens.analyzer import hooks

    pipe = build_tiny_pipeline("dit")
    steps = 3
    plan = Plan.uniform(pipe, steps, "full", height=DIMS["dit"].height, width=DIMS["dit"].width, guidance=3.0,
                        grid=DIMS["dit"].grid)
    for s in range(1, steps):
        plan.set(s, 0, "ast")
        plan.set(s, 1, "wars(1)+asc")
    plan.check_structure()
    kw = lambda: pipeline_call_kwargs("dit", "class3", steps, 3.0, 0)  # noqa: E731
    for first_off in ("inner", "plan"):
        handle = apply_plan(pipe, plan, backend="dense")
        expected = pipe(**kw()).images
        step_hook = hooks.take_off(pipe.transformer, STEP_HOOK)
        hooks.attach(pipe.transformer, ModelHook(), "inner")  # stands in for the graph hook
        hooks.attach(pipe.transformer, step_hook, STEP_HOOK)
        assert pipe.transformer._diffusers_hook._hook_order == ["inner", STEP_HOOK]
        np.testing.assert_array_equal(pipe(**kw()).images, expected)
        if first_off == "inner":
            hooks.detach(pipe.transformer, "inner")
            handle.remove()
        else:
            handle.remove()
            hooks.detach(pipe.transformer, "inner")
        _no_ditlens_left(pipe)


def _plan(pipe, family: str, steps: int, cfg_layout: str | None) -> Plan:
    d = DIMS[family]
    plan = Plan.uniform(pipe, steps, "full", height=d.height, width=d.width, guidance=3.0, grid=d.grid,
                        n_text=d.text_len, cfg_layout=cfg_layout)
    asc = "+asc" if plan.run.cfg_layout != "none" else ""
    for s in range(1, steps):
        for i, layer in enumerate(plan.model.layers):
            if layer.kind not in ("self", "joint"):
                continue
            if (s + i) % 3 == 0:
                plan.set(s, i, "ast")  # whole-layer output cache: the module is skipped
            elif (s + i) % 3 == 1:
                plan.set(s, i, f"wars(2){asc}")
            else:
                kinds = ["window(1)", "ast", "full", "arrow(2)" if layer.kind == "joint" else "window(3)"]
                plan.set(s, i, [kinds[h % 4] for h in range(d.heads)])
    plan.check_structure()
    return plan


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family, cfg_layout", [("dit", None), ("pixart", None), ("flux", "separate_cond_first")])
def test_graph_replays_give_the_eager_images_with_and_without_a_plan(family, cfg_layout):
    """Eager call, capture call and replay calls agree with the eager pipeline (plan and uncompressed,
    alternating); the plan's FLOPs and cache report survive replays; removal leaves nothing."""
    pipe = build_tiny_pipeline(family).to("cuda", torch.float16)
    steps = 4
    plan = _plan(pipe, family, steps, cfg_layout)
    forwards = steps * (2 if plan.run.cfg_layout == "separate_cond_first" else 1)

    noise_preds: list[torch.Tensor] = []  # the transformer's outputs of one call: the plan's effect is visible
    recorder = pipe.transformer.register_forward_hook(lambda m, a, out: noise_preds.append(out[0].float().cpu()))

    def call() -> tuple[np.ndarray, np.ndarray]:
        noise_preds.clear()
        kw = pipeline_call_kwargs(family, "a red bag", steps, 3.0, 0)
        kw["generator"] = torch.Generator("cuda").manual_seed(0)
        images = pipe(**kw).images
        return images, torch.stack(noise_preds).numpy()

    def assert_close(got, want, msg: str = "") -> None:
        # Replays run the captured kernels; cuBLAS may pick another algorithm under capture, so allow
        # about an fp16 ulp of the outputs rather than demanding bit equality.
        np.testing.assert_allclose(got[0], want[0], atol=2e-3, err_msg=f"images {msg}")
        np.testing.assert_allclose(got[1], want[1], atol=1e-3, rtol=1e-3, err_msg=f"transformer outputs {msg}")

    plain = call()
    with apply_plan(pipe, plan) as handle:
        planned = call()
        eager_flops, eager_cache = handle.flops, handle.peak_cache_bytes()
    # The plan changes what the transformer returns by far more than the tolerance (tiny PixArt's images
    # barely move: its two layers' attention is a small part of each output), so the comparisons can fail.
    assert np.abs(planned[1] - plain[1]).max() > 1e-2

    graphs = apply_cuda_graphs(pipe)
    first = call()  # first call: eager
    np.testing.assert_array_equal(first[0], plain[0])
    np.testing.assert_array_equal(first[1], plain[1])
    assert graphs.captures == 0
    captured = call()  # second call: captured, then replayed
    assert graphs.captures == forwards
    assert_close(captured, plain, "captured call")
    handle = apply_plan(pipe, plan)  # applied after the graphs: its step hook is the outer one
    for i in range(3):  # eager, capture, replay
        handle.reset()
        assert_close(call(), planned, f"plan call {i}")
    assert graphs.captures == 2 * forwards
    assert handle.flops == eager_flops
    assert handle.peak_cache_bytes() == eager_cache
    handle.remove()
    again_plain = call()  # the uncompressed graphs again, no new capture
    np.testing.assert_array_equal(again_plain[0], captured[0])
    np.testing.assert_array_equal(again_plain[1], captured[1])
    with apply_plan(pipe, plan):  # the same plan applied again: its graphs replay at once
        again = call()
    assert graphs.captures == 2 * forwards
    assert_close(again, planned, "plan applied again")
    graphs.remove()
    recorder.remove()
    if family == "flux":  # FluxPipeline's cache_context gives the transformer diffusers' own registry in any call
        for module in pipe.transformer.modules():
            names = getattr(getattr(module, "_diffusers_hook", None), "hooks", {})
            assert not any(n.startswith("ditlens") for n in names), names
    else:
        _no_ditlens_left(pipe)



def test_graph_constants_are_recorded_only_during_a_capture():
    from ditlens.kernels.graph_constants import graph_constant, record_graph_constants

    marker = object()
    assert graph_constant(marker) is marker
    with record_graph_constants() as outer:
        graph_constant(1)
        with record_graph_constants() as inner:
            graph_constant(2)
        graph_constant(3)
    graph_constant(4)
    assert (outer, inner) == ([1, 3], [2])


def test_the_runtime_hands_its_device_constants_to_a_recording_capture():
    """What a graph must keep alive reaches the capture's list: the head-index tensors of a mixed
    layer and the cached dense masks of its windowed groups."""
    from ditlens.kernels.graph_constants import record_graph_constants

    family = "dit"
    pipe = build_tiny_pipeline(family)
    plan = _plan(pipe, family, 2, None)
    with apply_plan(pipe, plan, backend="dense"), record_graph_constants() as kept:
        pipe(**pipeline_call_kwargs(family, "a red bag", 2, 3.0, 0))
    masks = [x for x in kept if isinstance(x, torch.Tensor) and x.dtype == torch.bool]
    indices = [x for x in kept if isinstance(x, torch.Tensor) and x.dtype == torch.int64]
    assert masks and indices
    heads = DIMS[family].heads
    assert all(0 <= int(x.min()) and int(x.max()) < heads for x in indices)
    assert all(m.shape[-1] == masks[0].shape[-1] for m in masks)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_replays_survive_evicted_constants_and_a_dropped_runtime():
    """A graph reads per-plan head tensors and head indices from caches that evict and from the
    runtime that removal drops: after both are gone and their memory is handed out again, replays
    still give the plan's images (the graph keeps what it read alive)."""
    import gc

    from ditlens.kernels import triton_backend

    family = "dit"
    pipe = build_tiny_pipeline(family).to("cuda", torch.float16)
    steps = 4
    plan = _plan(pipe, family, steps, None)

    def call():
        kw = pipeline_call_kwargs(family, "a red bag", steps, 3.0, 0)
        kw["generator"] = torch.Generator("cuda").manual_seed(0)
        return pipe(**kw).images

    graphs = apply_cuda_graphs(pipe)
    with apply_plan(pipe, plan):
        planned = call()  # eager
        call()  # captured
    triton_backend._plan_tensors.cache_clear()
    gc.collect()
    # Small blocks freed above are handed out again: fill them with indices no head has.
    junk = [torch.full((64,), 1 << 20, dtype=torch.int32, device="cuda") for _ in range(4096)]
    with apply_plan(pipe, plan):  # a new runtime; the graphs replay at once
        again = call()
    del junk
    graphs.remove()
    np.testing.assert_allclose(again, planned, atol=2e-3)
