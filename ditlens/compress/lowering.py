"""Run WA-RS segments dense where they cannot save time at the plan's shape on this GPU.

A WA-RS *segment* of one head of one layer is a refresh step (plain ``full`` attention, plus one
windowed launch that stores ``R = O - W``) and the ``k`` WA-RS steps that reuse its residual (one
windowed launch ``W + R`` each): one dense product and ``k + 1`` windowed launches, against
``k + 1`` dense products when the same steps run dense. So it saves time only when

    (k + 1) * t_window < k * t_dense,   i.e.   t_window / t_dense < k / (k + 1).

At long sequences a windowed launch costs a small share of a dense one and every segment pays.
At short ones (DiT-XL 512², 1,024 tokens) a windowed launch is latency-bound and costs ~0.8 of a
dense one (BENCHMARKS.md §2), so short segments make the model slower. :func:`lower_unprofitable_wars`
turns those into plain ``full`` (``asc`` kept), which is exact attention: quality can only improve,
and the plan's FLOPs fraction, recomputed from the lowered plan, says what actually runs.

A plan can pass that test segment by segment and still save next to nothing. At DiT-XL 512² the
segments of V1's WA-RS plans that pay one by one would save 1-1.5 % of a call's GPU time, yet those
plans measure 0.95-0.98x under CUDA graphs (BENCHMARKS.md §4): a WA-RS plan also costs host work per
forward (~0.1 ms on an H200, on the critical path of a pipeline that synchronises at every step),
which no kernel ratio sees. So when the in-model profile gives the call's GPU time, the paying
segments must together save at least ``min_gain`` of it (3 % by default); otherwise every segment
runs dense and the plan keeps only its other methods.

The ratio comes from :func:`measure_window_ratios` (the kernels timed at each layer's call shape,
in diffusers' ``[B, L, H, D]`` layout, by CUDA-graph replay or eagerly with the host) or from the
caller (tests, other latency models). Timed alone, a short windowed launch looks cheaper than it is
inside the model (DiT-XL 512² on an H200: 0.68 of SDPA alone, 0.81 in the model, BENCHMARKS.md §4);
:func:`calibrate_in_model` rescales the measured ratios by the device times of the windowed and the
dense launches in one profiled call of the planned pipeline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ditlens.compress.flops import layer_sequences
from ditlens.compress.methods import HeadMethod
from ditlens.compress.plan import Plan
from ditlens.errors import DitlensError

# (layer index, mask kind, window) -> t_window / t_dense for one call of that layer
WindowRatio = Callable[[int, str, int], float]


@dataclass(frozen=True)
class WarsSegment:
    """One refresh step of one head and the WA-RS steps that reuse its residual."""

    layer: int
    head: int
    refresh_step: int
    reuse_steps: tuple[int, ...]
    kind: str  # the windowed pattern (window / arrow)
    window: int
    asc: bool

    def pays(self, ratio: float) -> bool:
        """Whether ``k`` reuses save more than the refresh's extra launch costs."""
        return self.saving(ratio) > 0

    def saving(self, ratio: float) -> float:
        """Time saved, in dense launches: ``k`` dense products against ``k + 1`` windowed launches."""
        k = len(self.reuse_steps)
        return k - (k + 1) * ratio


@dataclass
class Lowering:
    """A plan with its unprofitable WA-RS segments run dense, and which segments those were."""

    plan: Plan
    lowered: list[WarsSegment] = field(default_factory=list)
    kept: list[WarsSegment] = field(default_factory=list)
    ratios: dict[tuple[int, str, int], float] = field(default_factory=dict)
    in_model: "InModelLaunches | None" = None  # the profiled call that calibrated the ratios, if any
    saving_s: float | None = None  # what the segments that pass one by one would save per call, if known
    too_small: bool = False  # they all run dense: together they would save less than the minimum gain

    def summary(self) -> str:
        total = len(self.lowered) + len(self.kept)
        if not total:
            return "no WA-RS segments"
        whole = ""
        if self.too_small and self.in_model is not None:
            whole = (f"; together the paying ones would save {self.saving_s * 1e3:.2f} ms of the call's "
                     f"{self.in_model.call_s * 1e3:.0f} ms of GPU time, too little to pay for the runtime")
        steps = sum(len(s.reuse_steps) for s in self.lowered)
        ratios = ", ".join(f"{r:.2f}" for r in sorted(set(round(v, 2) for v in self.ratios.values())))
        calibration = ""
        if self.in_model is not None:
            m = self.in_model
            calibration = (f", calibrated in the model: {m.window_s * 1e6:.1f} µs per windowed launch "
                           f"against {m.dense_s * 1e6:.1f} µs per SDPA call")
        return (f"{len(self.lowered)} of {total} WA-RS segments run dense ({steps} WA-RS head-steps; "
                f"windowed / dense launch time {ratios or 'not measured'}{calibration}{whole})")


def wars_segments(plan: Plan) -> list[WarsSegment]:
    """Every (layer, head) refresh step followed by at least one WA-RS step reusing its residual."""
    reads: dict[tuple[int, int, int], list[tuple[int, HeadMethod]]] = {}
    for i, h, s, method, refresh in plan.residual_reads():
        if refresh is not None:
            reads.setdefault((i, h, refresh), []).append((s, method))
    return [WarsSegment(i, h, refresh, tuple(s for s, _ in steps), last.mask_kind, last.window, last.asc)
            for (i, h, refresh), steps in sorted(reads.items()) for last in [steps[-1][1]]]


def lower_unprofitable_wars(plan: Plan, ratio: WindowRatio, *, dense_s: float | None = None,
                            min_saving_s: float = 0.0) -> Lowering:
    """A copy of ``plan`` in which every WA-RS segment that does not pay (see the module doc) runs
    ``full`` (``full+asc`` for WA-RS+ASC) at its reuse steps; the refresh then stores nothing.

    With ``dense_s`` (seconds of one dense launch of a layer, every head), the segments that pay must
    together save at least ``min_saving_s`` per call, or they run dense too."""
    lowered_plan = Plan.from_dict(plan.to_dict())
    result = Lowering(lowered_plan)
    segments = wars_segments(plan)
    for seg in segments:
        key = (seg.layer, seg.kind, seg.window)
        if key not in result.ratios:
            result.ratios[key] = float(ratio(*key))
    paying = [seg for seg in segments if seg.pays(result.ratios[(seg.layer, seg.kind, seg.window)])]
    if dense_s is not None:  # a segment is one head's share of its layer's launches
        per_head = dense_s / plan.model.heads
        result.saving_s = per_head * sum(seg.saving(result.ratios[(seg.layer, seg.kind, seg.window)]) for seg in paying)
        result.too_small = bool(paying) and result.saving_s < min_saving_s
        if result.too_small:
            paying = []
    kept = set(paying)
    per_entry: dict[tuple[int, int], dict[int, str]] = {}
    for seg in segments:
        if seg in kept:
            result.kept.append(seg)
            continue
        result.lowered.append(seg)
        for s in seg.reuse_steps:
            per_entry.setdefault((s, seg.layer), {})[seg.head] = "asc" if seg.asc else "full"
    for (s, i), heads in per_entry.items():
        methods = [m.to_str() for m in plan.head_methods(s, i)]
        for h, text in heads.items():
            methods[h] = text
        _set_layer(lowered_plan, plan, s, i, methods)
    if result.lowered:
        lowered_plan.provenance.add_note(f"lowered: {result.summary()}")
    lowered_plan.check_structure()
    return result


def _set_layer(target: Plan, source: Plan, step: int, layer: int, methods: list[str]) -> None:
    """Write one (step, layer) entry of ``target``, kept one string for the layer where ``source``
    wrote it so and the heads still agree."""
    whole_layer = isinstance(source.methods[step][layer], str) and len(set(methods)) == 1
    target.set(step, layer, methods[0] if whole_layer else methods)


def drop_asc(plan: Plan) -> tuple[Plan, int]:
    """A copy of ``plan`` in which every ``+asc`` is dropped (``asc`` runs ``full``, ``window(3)+asc``
    runs ``window(3)``, ``wars(2)+asc`` runs ``wars(2)``), and how many head-steps changed.

    What a plan's ASC entries cost or save, measured by running it both ways (``benchmarks/e2e.py
    --drop-asc``). In a loop that waits on the host (DiT-XL 512² eager on an H100) an ASC call saves
    GPU time the loop does not wait for; since the runtime's ASC path was shortened it costs no
    measurable host time either (BENCHMARKS.md §4, "Session 32" and "Session 33")."""
    dropped = Plan.from_dict(plan.to_dict())
    changed = 0
    for s in range(plan.steps):
        for i in range(plan.n_layers):
            methods = plan.head_methods(s, i)
            n = sum(m.asc for m in methods)
            if not n:
                continue
            changed += n
            _set_layer(dropped, plan, s, i, [HeadMethod(m.base, m.window).to_str() for m in methods])
    if changed:
        dropped.provenance.add_note(f"ASC dropped: {changed} head-steps")
    dropped.check_structure()
    return dropped, changed


def measure_window_ratios(plan: Plan, device: Any, dtype: Any = None, *, graphs: bool = True,
                          repeats: int = 20) -> WindowRatio:
    """Time one windowed WA-RS launch (``W + R``) against the dense SDPA product at each layer's call
    shape (batch = CFG rows, ``[B, L, H, D]`` storage as diffusers passes it), on ``device``.

    ``graphs=True`` times CUDA-graph replays with a cold L2 cache (kernel time as inside the model:
    the right model under :func:`ditlens.compress.apply_cuda_graphs`); ``False`` times eager calls
    back to back, the host's launch cost included (what an eager, host-bound loop pays). Results
    are cached per shape."""
    import torch

    from ditlens.kernels import windowed_plus_residual

    device = torch.device(device)
    if device.type != "cuda":
        raise DitlensError("measure_window_ratios times GPU kernels; pass a CUDA device (on the CPU, give "
                           "lower_unprofitable_wars a ratio of your own)")
    dtype = dtype or torch.bfloat16
    _token_grid(plan)  # refuse a plan without one before allocating anything
    H, D = plan.model.heads, plan.model.head_dim
    cache: dict[tuple, float] = {}
    flush = torch.empty(256 << 20, dtype=torch.int8, device=device) if graphs else None  # > any GPU's L2

    def timed(fn) -> float:
        fn()
        torch.cuda.synchronize()
        if flush is not None:
            return _graph_time_cold_l2(fn, repeats, flush)
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / repeats

    def ratio(layer: int, kind: str, window: int) -> float:
        B, lay = _layer_call(plan, layer)
        key = (B, lay.q_len, lay.n_text, lay.text_first, kind, window)
        if key not in cache:
            L = lay.q_len
            gen = torch.Generator(device=device).manual_seed(0)
            q, k, v, r = (torch.randn(B, L, H, D, device=device, dtype=dtype, generator=gen).transpose(1, 2)
                          for _ in range(4))
            dense = timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
            windowed = timed(lambda: windowed_plus_residual(q, k, v, r, windows=window, n_text=lay.n_text,
                                                            text_first=lay.text_first, pattern=kind))
            cache[key] = windowed / dense
        return cache[key]

    return ratio


def _graph_time_cold_l2(fn: Callable[[], Any], calls: int, flush: Any) -> float:
    """Seconds per ``fn()`` replayed from a CUDA graph with the L2 cache flushed (``flush``, a buffer
    larger than L2, zeroed) before each call.

    In a model the inputs of an attention call arrive from projections that have since streamed
    their weights through L2; timed hot, the short latency-bound windowed launch looks cheaper
    against SDPA than it is in the model (BENCHMARKS.md §4)."""
    import torch

    def capture(with_fn: bool) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                flush.zero_()
                if with_fn:
                    fn()
        return graph

    def replay(graph: torch.cuda.CUDAGraph) -> float:
        samples = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        return sorted(samples)[len(samples) // 2]

    both, flush_only = capture(True), capture(False)
    replay(both), replay(flush_only)  # first replays upload the graphs
    return max(replay(both) - replay(flush_only), 0.0) / calls


@dataclass(frozen=True)
class InModelLaunches:
    """Device time of the attention launches in one profiled call of a planned pipeline."""

    window_s: float  # mean of one ditlens Triton launch (the windowed W + R and R = O - W launches)
    window_launches: int
    dense_s: float  # mean of one SDPA call at a WA-RS layer's self-attention shape
    dense_launches: int
    call_s: float = 0.0  # device time of every kernel of the call

    @property
    def ratio(self) -> float:
        return self.window_s / self.dense_s


# Kernel of ditlens.kernels' Triton backend, as the profiler names it
_WINDOW_KERNEL = "headwise_fwd_kernel"


def profile_attention_launches(run: Callable[[], Any], plan: Plan) -> InModelLaunches:
    """Run ``run()`` (one call of the pipeline with ``plan`` applied, on CUDA) under torch.profiler and
    average the device time of its windowed launches and of its SDPA calls whose query, key and value
    have the shape of a WA-RS layer's self-attention call. Run it eagerly: the profiler does not see
    inside CUDA-graph replays, and a kernel's device time does not depend on who launched it."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    shapes = _self_attention_shapes(plan)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        with torch.inference_mode():
            run()
        torch.cuda.synchronize()
    window_us, windows, dense_us, dense, call_us = 0.0, 0, 0.0, 0, 0.0
    for evt in prof.key_averages(group_by_input_shape=True):
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            call_us += _device_us(evt, self_only=True)
        if evt.device_type == torch.autograd.DeviceType.CUDA and _WINDOW_KERNEL in evt.key:
            window_us += _device_us(evt, self_only=True)
            windows += evt.count
        elif evt.key == "aten::scaled_dot_product_attention" and _qkv_shape(evt.input_shapes) in shapes:
            dense_us += _device_us(evt, self_only=False)
            dense += evt.count
    if not windows or not dense or window_us <= 0 or dense_us <= 0:
        raise DitlensError(f"the profiled call ran {windows} ditlens Triton launch(es) and {dense} SDPA call(s) at "
                           f"the plan's self-attention shapes {sorted(shapes)}: calibrate with the plan applied, on "
                           "CUDA, with the Triton backend, at the plan's resolution")
    return InModelLaunches(window_us / windows * 1e-6, windows, dense_us / dense * 1e-6, dense, call_us * 1e-6)


def _device_us(evt: Any, self_only: bool) -> float:
    name = "self_device_time_total" if self_only else "device_time_total"
    legacy = "self_cuda_time_total" if self_only else "cuda_time_total"
    return float(getattr(evt, name, None) or getattr(evt, legacy, 0.0) or 0.0)


def _qkv_shape(input_shapes: Any) -> tuple[int, ...] | None:
    """The query shape when query, key and value share it (self-attention), else None."""
    if not input_shapes or len(input_shapes) < 3:
        return None
    q, k, v = (tuple(x) for x in input_shapes[:3])
    return q if q == k == v and len(q) == 4 else None


def _token_grid(plan: Plan) -> tuple[int, int, int]:
    grid = plan.model.tokens.grid
    if grid is None:
        raise DitlensError("the plan records no token grid (made without a resolution); rebuild it with height/width")
    return grid


def _layer_call(plan: Plan, layer: int) -> tuple[int, Any]:
    """(batch, token layout) of one attention call of ``layer``: batch = sequences per sample times
    the CFG rows of one forward."""
    seq = layer_sequences(plan.model.layers[layer], _token_grid(plan), plan.model.tokens.n_text or 0)
    rows = 2 if plan.run.cfg_layout.startswith("batched") else 1
    return seq.count * rows, seq.layout


def _self_attention_shapes(plan: Plan) -> set[tuple[int, ...]]:
    """[B, H, L, D] of the attention calls of the layers that hold a WA-RS segment."""
    shapes = set()
    for layer in {seg.layer for seg in wars_segments(plan)}:
        batch, layout = _layer_call(plan, layer)
        shapes.add((batch, plan.model.heads, layout.q_len, plan.model.head_dim))
    return shapes


def calibrate_in_model(ratio: WindowRatio, plan: Plan, launches: InModelLaunches) -> WindowRatio:
    """``ratio`` rescaled so that its mean over the plan's windowed launches (each segment's ``k + 1``,
    by its layer, kind and window) equals the in-model ratio of ``launches``: the shape-to-shape
    differences stay the microbenchmark's, the level comes from the model."""
    weights: dict[tuple[int, str, int], int] = {}
    for seg in wars_segments(plan):
        key = (seg.layer, seg.kind, seg.window)
        weights[key] = weights.get(key, 0) + len(seg.reuse_steps) + 1
    if not weights:
        return ratio
    measured = {key: float(ratio(*key)) for key in weights}
    mean = sum(measured[key] * n for key, n in weights.items()) / sum(weights.values())
    factor = launches.ratio / mean

    def calibrated(layer: int, kind: str, window: int) -> float:
        key = (layer, kind, window)
        return factor * (measured[key] if key in measured else float(ratio(*key)))

    return calibrated


def lower_for_device(plan: Plan, device: Any, dtype: Any = None, *, graphs: bool = True,
                     run: Callable[[Plan], Any] | None = None, launches: InModelLaunches | None = None,
                     min_gain: float = 0.03) -> Lowering:
    """:func:`lower_unprofitable_wars` with ratios measured on ``device``; the plan unchanged (every
    segment kept) off CUDA, where there is no kernel timing to go by.

    In-model calibration (:func:`calibrate_in_model`), optional: ``run(plan)`` calls the pipeline once
    with ``plan`` applied, eagerly, and that call is profiled; or ``launches`` from an earlier profile
    of the same model and shape (``Lowering.in_model`` of another plan) is used again. With it, the
    segments kept must together save ``min_gain`` of the call's GPU time (module doc)."""
    import torch

    if torch.device(device).type != "cuda":
        return Lowering(Plan.from_dict(plan.to_dict()), kept=wars_segments(plan))
    ratio = measure_window_ratios(plan, device, dtype, graphs=graphs)
    if launches is None and run is not None and wars_segments(plan):
        launches = profile_attention_launches(lambda: run(plan), plan)
    if launches is not None:
        ratio = calibrate_in_model(ratio, plan, launches)
    if launches is not None and launches.call_s > 0:
        result = lower_unprofitable_wars(plan, ratio, dense_s=launches.dense_s, min_saving_s=min_gain * launches.call_s)
    else:
        result = lower_unprofitable_wars(plan, ratio)
    result.in_model = launches
    return result
