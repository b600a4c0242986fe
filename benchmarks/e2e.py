"""End-to-end latency at real model sizes: the attention share, its Amdahl bound, and how close
compression plans get to it (issue 8).

    python benchmarks/e2e.py --device cuda --out benchmarks/results/e2e.json          # the H100/H200 run
    python benchmarks/e2e.py --device cuda --models pixart-sigma-xl-2048 --compile    # + torch.compile
    python benchmarks/e2e.py --device cuda --models dit-xl-2-512 --cuda-graphs         # + CUDA graphs
    python benchmarks/e2e.py --report benchmarks/results/e2e.json                     # Markdown + e2e.png
    python benchmarks/e2e.py --smoke                                                  # CPU, toy sizes

Each model is a real diffusers architecture at its published size with random weights (latency
does not depend on them), in bfloat16, with batch and CFG as its pipeline uses them. Per model:

* the attention share ``a`` of a transformer forward (ditlens.analyzer.amdahl: the forward timed
  as is and with every attention product a no-op) and the bound ``1 / (1 - a*s)``;
* plans at the attention-FLOPs fractions of the papers' settings, shaped like the papers' plans:
  ``v1`` (DiT, PixArt: layer-wise WA-RS, then WA-RS+ASC, DiTFastAttn's methods) and ``v2`` (SD3,
  FLUX: head-wise arrow attention plus output caching on a third of the heads, DiTFastAttnV2's
  default set), each with ``s`` = 1 - its exact attention-FLOPs fraction;
* the denoising loop (first transformer forward to last, CUDA events), the pipeline call (loop,
  scheduler and VAE decode, wall clock), the text encoders timed on their own (the pipelines get
  precomputed embeddings, so no tokenizer is needed), attention-module time (CUDA events around
  every attention module), peak memory and the plan's cache memory.

Every row of one model comes from the same process, run back to back. Below 2K (host-bound on an
H100/H200: the loop time drifts between calls) each plan's calls alternate with uncompressed calls
and its speedup is the median of the per-pair ratios (``--repeats`` pairs).

``--cuda-graphs`` adds rows where every transformer forward, uncompressed and under each plan,
is replayed from a CUDA graph (:func:`ditlens.compress.apply_cuda_graphs`; after ``--compile``,
on top of the compiled feed-forward blocks). The attention share of those rows is measured with
both variants of the forward replayed from graphs; attention-module time is not taken there
(module hooks do not run inside a replay).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from _paths import benchmarks_last  # noqa: E402

benchmarks_last()  # benchmarks/kernels.py must not shadow the `kernels` package

MODELS = ("dit-xl-2-512", "pixart-sigma-xl-1024", "pixart-sigma-xl-2048", "sd3-medium-1024", "flux-dev-1024",
          "flux-dev-2048")
# Published end-to-end figures (A100) quoted next to ours.
PAPERS = {
    "pixart-sigma-xl-2048": "DiTFastAttn (A100, 50 steps): 39.86 s -> 22.27 s = 1.79x at D6 (24 % attention FLOPs)",
    "pixart-sigma-xl-1024": "DiTFastAttn (A100, 50 steps): 12.76 s -> 10.31 s = 1.24x at D6 (37 %)",
    "dit-xl-2-512": "DiTFastAttn (A100, 50 steps): 6.66 s -> 2.66 s at D6 (34 %)",
    "flux-dev-2048": "DiTFastAttnV2: up to 1.5x end to end at 2K with 68 % less attention FLOPs",
}


@dataclass
class Timing:
    loop_s: float  # first transformer forward start -> last forward end
    pipeline_s: float  # the whole pipeline call (embeddings given): loop, scheduler, VAE decode
    attention_s: float  # summed attention-module time inside the loop
    peak_gib: float
    cache_gib: float = 0.0
    host_s: float = 0.0  # CPU time of the calling thread over the call: on CUDA the host work, whatever else runs


@dataclass
class Row:
    model: str
    plan: str
    steps: int
    core_fraction: float
    share: float
    bound: float
    loop_s: float
    pipeline_s: float
    text_s: float
    attention_s: float
    peak_gib: float
    cache_gib: float
    speedup_loop: float = 1.0
    speedup_pipeline: float = 1.0
    reach: float = 1.0  # speedup_loop / bound
    compiled: bool = False
    graphs: bool = False
    notes: str = ""
    # every pair's ratio (uncompressed / plan) of loop time and of host CPU time, for statistics beyond the median
    pair_ratios: list[float] = field(default_factory=list)
    host_pair_ratios: list[float] = field(default_factory=list)


@dataclass
class ModelResult:
    model: str
    device: str
    torch: str
    steps: int
    share: float
    step_ms: float
    text_encoders: dict[str, float] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    compiled_share: float | None = None  # attention share with the feed-forward blocks compiled
    graphs_share: float | None = None  # attention share of a forward replayed from a CUDA graph


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class LoopClock:
    """Loop time (first transformer forward's start to the last one's end) and attention-module
    time of a pipeline call, without synchronising inside it (CUDA events; CPU: perf_counter)."""

    def __init__(self, pipe, attention_modules, device: str) -> None:
        from ditlens.compress.clock import ModuleClock

        cuda = device.startswith("cuda")
        self.forwards = ModuleClock([pipe.transformer], cuda)
        self.attention = ModuleClock(attention_modules, cuda)

    def reset(self) -> None:
        self.forwards.reset()
        self.attention.reset()

    def loop_seconds(self) -> float:
        return self.forwards.first_to_last_seconds()

    def attention_seconds(self) -> float:
        return self.attention.total_seconds()

    def remove(self) -> None:
        self.forwards.remove()
        self.attention.remove()


def time_call(model, kwargs: dict, clock: LoopClock, device: str, handle=None) -> Timing:
    """One timed pipeline call (``handle``: the applied plan, whose caches are reset first)."""
    clock.reset()
    if handle is not None:
        handle.reset()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0, cpu0 = time.perf_counter(), time.thread_time()
    with torch.inference_mode():
        model.pipe(**kwargs)
    # before our own sync, which spins; the pipeline's copy of its output to the host waits inside the
    # call, but on a host-bound loop the GPU is barely behind by then
    host = time.thread_time() - cpu0
    sync(device)
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else 0.0
    cache = handle.peak_cache_bytes() / 2**30 if handle is not None else 0.0
    return Timing(clock.loop_seconds(), wall, clock.attention_seconds(), peak, cache, host)


def median_interval(ratios: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """Distribution-free confidence interval of the median of paired ratios: the order statistics
    x(k) and x(n+1-k) with k the largest rank at which P(Binomial(n, 1/2) < k) <= (1 - level) / 2.
    None below 6 pairs (no such k at 95 %). A plan is not slower, within a margin m, where the
    interval's lower end is >= 1 - m."""
    from scipy.stats import binom

    n, tail = len(ratios), (1.0 - level) / 2
    k = 0
    while k + 1 <= n // 2 and binom.cdf(k, n, 0.5) <= tail:  # P(B <= k) = P(B < k + 1)
        k += 1
    if k == 0:
        return None
    ordered = sorted(ratios)
    return ordered[k - 1], ordered[n - k]


def median_timing(samples: list[Timing]) -> Timing:
    return Timing(*(statistics.median(getattr(s, f) for s in samples)
                    for f in ("loop_s", "pipeline_s", "attention_s", "peak_gib", "cache_gib", "host_s")))


def run_pipeline(model, kwargs: dict, clock: LoopClock, device: str, repeats: int, handle=None,
                 warmup: int = 1) -> Timing:
    """``warmup`` calls, then the median of ``repeats`` timed calls."""
    for _ in range(warmup):
        time_call(model, kwargs, clock, device, handle)
    return median_timing([time_call(model, kwargs, clock, device, handle) for _ in range(repeats)])


def run_planned(model, kwargs: dict, plan, warsr_refresh: str) -> None:
    """One pipeline call with ``plan`` applied (what the in-model lowering calibration profiles)."""
    from ditlens.compress import apply_plan

    with apply_plan(model.pipe, plan, count_flops=False, warsr_refresh=warsr_refresh):
        model.pipe(**kwargs)


def run_paired(model, kwargs: dict, clock: LoopClock, device: str, repeats: int, plan,
               warmup: int = 1, warsr_refresh: str = "two-pass") -> tuple[Timing, Timing, list[float], list[float]]:
    """``repeats`` pairs of calls, one uncompressed and one under ``plan`` (which goes first alternates), after
    ``warmup`` calls of the plan (under CUDA graphs: an eager call, then the capture). ``plan=None``: both calls
    of each pair run the uncompressed model (the A/A control: how far identical work drifts between paired calls).

    On a host-bound size the loop time of one machine drifts by tens of percent between calls
    (other tenants, clocks); within a pair both calls see the same drift, so the speedup is the
    median of the per-pair ratios. Alternating the order cancels a drift from the first call of a
    pair to the second (A/A controls of 0.968x and 0.972x with the uncompressed call always first).
    Other tenants preempting this process lengthen the wall time but not the thread's CPU time, so
    the per-pair ratios of host CPU time are returned too. On the lent H100 they followed the wall-clock
    ratios within 1 % (BENCHMARKS.md §4, session 31): there the drift is the vCPU's own speed, which
    lengthens a busy thread's CPU time as much as its wall time. Returns (uncompressed median, plan median, per-pair
    loop ratios, per-pair host CPU ratios)."""
    from ditlens.compress import apply_plan

    def applied():
        if plan is None:
            return contextlib.nullcontext(None)
        return apply_plan(model.pipe, plan, count_flops=False, warsr_refresh=warsr_refresh)

    with applied() as handle:
        for _ in range(warmup):
            time_call(model, kwargs, clock, device, handle)
    plain, planned = [], []
    for i in range(repeats):  # alternate which call of a pair goes first: a drift within pairs cancels
        if i % 2 == 0:
            plain.append(time_call(model, kwargs, clock, device))
        with applied() as handle:
            planned.append(time_call(model, kwargs, clock, device, handle))
        if i % 2 == 1:
            plain.append(time_call(model, kwargs, clock, device))
    ratios = [a.loop_s / b.loop_s for a, b in zip(plain, planned)]
    host_ratios = [a.host_s / b.host_s for a, b in zip(plain, planned)]
    return median_timing(plain), median_timing(planned), ratios, host_ratios


# ------------------------------------------------------------------------------------------
# Plans shaped like the papers' (exact FLOPs fraction from ditlens.compress)
# ------------------------------------------------------------------------------------------


def _fraction(plan) -> float:
    from ditlens.compress.flops import plan_core_fraction

    return float(plan_core_fraction(plan))


def v1_plan(model, steps: int, target: float, mix: bool = False):
    """DiTFastAttn-shaped: self-attention layers (step 0 stays full: it refreshes every residual),
    taken from the last steps backwards until the attention-FLOPs fraction reaches ``target``.
    ``mix=False``: WA-RS (window 1/8 of the image tokens), then WA-RS+ASC where WA-RS alone cannot
    reach the target: every saving comes from the window kernel. ``mix=True``: the methods of the
    paper's Fig. 5 in alternation, AST (the module output of the previous step) on every other
    entry and WA-RS+ASC on the rest."""
    from ditlens.compress import Plan

    plan = Plan.uniform(model.pipe, steps, height=model.height, width=model.width, guidance=model.guidance,
                        n_text=model.n_text or None)
    grid = plan.model.tokens.grid
    w = max(1, grid[1] * grid[2] // 16)
    selfs = [i for i, layer in enumerate(plan.model.layers) if layer.kind in ("self", "joint")]
    entries = [(s, i) for s in range(steps - 1, 0, -1) for i in selfs]
    cfg = plan.run.cfg_layout != "none"
    ladder = [f"wars({w})", f"wars({w})+asc"] if cfg else [f"wars({w})"]
    if mix:
        ladder = [f"wars({w})+asc" if cfg else f"wars({w})"]

    def method(s: int, i: int, level: int) -> str:
        if mix and (s + i) % 2 == 0:
            return "ast"
        return ladder[level]

    def build(n: int, level: int):
        for s, i in entries:
            plan.set(s, i, "full")
        for k, (s, i) in enumerate(entries):
            if k < n:
                plan.set(s, i, method(s, i, level))
            elif level > 0:
                plan.set(s, i, method(s, i, level - 1))
        return _fraction(plan)

    for level in range(len(ladder)):
        lo, hi = 0, len(entries)
        if build(hi, level) > target and level + 1 < len(ladder):
            continue
        while lo < hi:  # fewest entries that reach the target
            mid = (lo + hi) // 2
            if build(mid, level) <= target:
                hi = mid
            else:
                lo = mid + 1
        build(lo, level)
        break
    plan.check_structure()
    text = str(plan.methods)
    label = "v1 AST / WA-RS+ASC" if mix else "v1 WA-RS" + ("+ASC" if "+asc" in text else "")
    return plan, f"{label} w={w}"


def null_plan(model, steps: int, target: float):
    """A plan whose every entry is ``full``: the runtime's own cost (the step hook, the first forward's
    tracking and checks, graph keys; such a plan runs a call's other forwards bare)."""
    from ditlens.compress import Plan

    plan = Plan.uniform(model.pipe, steps, height=model.height, width=model.width, guidance=model.guidance,
                        n_text=model.n_text or None, cfg_layout="none" if model.name.startswith("flux") else None)
    return plan, "all-full plan (runtime only)"


def aa_control(model, steps: int, target: float):
    """No plan: the row pairs the uncompressed model with itself (see run_paired)."""
    return None, "uncompressed again (A/A control)"


def v2_plan(model, steps: int, target: float):
    """DiTFastAttnV2-shaped: at steps >= 1, in every self/joint layer, two thirds of the heads take
    arrow attention and one third alternates output caching (odd steps) with the same arrow; the
    arrow half-width is the largest that reaches ``target``."""
    from ditlens.compress import Plan

    plan = Plan.uniform(model.pipe, steps, height=model.height, width=model.width, guidance=model.guidance,
                        n_text=model.n_text or None, cfg_layout="none" if model.name.startswith("flux") else None)
    grid = plan.model.tokens.grid
    H = plan.model.heads
    selfs = [i for i, layer in enumerate(plan.model.layers) if layer.kind in ("self", "joint")]

    def build(w: int) -> float:
        for s in range(1, steps):
            heads = [("ast" if (h % 3 == 2 and s % 2) else f"arrow({w})") for h in range(H)]
            for i in selfs:
                plan.set(s, i, heads)
        return _fraction(plan)

    lo, hi = 0, grid[1] * grid[2]
    while lo < hi:  # largest window at or under the target
        mid = (lo + hi + 1) // 2
        if build(mid) <= target:
            lo = mid
        else:
            hi = mid - 1
    build(lo)
    plan.check_structure()
    return plan, f"v2 arrow w={lo} + output cache"


# ------------------------------------------------------------------------------------------


def time_text_encoders(model, device: str, dtype, smoke: bool, cache: dict) -> dict[str, float]:
    """Median forward time of each text encoder on the prompt (and the negative prompt with CFG)."""
    from random_pipelines import text_encoder

    batch = 2 if model.guidance > 1 else 1
    out = {}
    for kind, tokens in model.encoders:
        key = (kind, tokens, batch)
        if key not in cache:
            enc = text_encoder(kind, device, dtype, smoke)
            ids = torch.randint(0, 1000, (batch, tokens), device=device)
            times = []
            with torch.inference_mode():
                for i in range(4):
                    sync(device)
                    t0 = time.perf_counter()
                    enc(ids)
                    sync(device)
                    if i:
                        times.append(time.perf_counter() - t0)
            cache[key] = statistics.median(times)
            del enc
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        out[f"{kind}x{tokens}"] = cache[key]
    return out


def compile_non_attention(transformer) -> int:
    """torch.compile every feed-forward block in place (attention modules stay eager so that the
    compression runtime can intercept them). Returns the number of modules compiled."""
    count = 0
    for module in transformer.modules():
        if type(module).__name__ == "FeedForward":
            module.compile()
            count += 1
    return count


def bench_model(name: str, args, text_cache: dict) -> ModelResult:
    from random_pipelines import e2e_model

    from ditlens.analyzer.adapters import default_registry
    from ditlens.analyzer.amdahl import measure_attention_share
    from ditlens.compress import apply_cuda_graphs, apply_plan, drop_asc
    from ditlens.compress.lowering import lower_for_device

    dtype = torch.float32 if args.smoke else torch.bfloat16
    model = e2e_model(name, args.device, dtype, smoke=args.smoke)
    steps = args.steps
    kwargs = dict(model.call_kwargs, num_inference_steps=steps, output_type="np")
    if not name.startswith("dit"):
        kwargs.update(height=model.height, width=model.width)
    adapter = default_registry().find(model.pipe.transformer)
    modules = [model.pipe.transformer.get_submodule(layer.name)
               for layer in adapter.attention_layers(model.pipe.transformer)]
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "CPU"
    text = time_text_encoders(model, args.device, dtype, args.smoke, text_cache)
    text_s = sum(text.values())
    results = []
    variants = [("", False, False)]
    if args.compile:
        variants.append((" (compiled FF)", True, False))
    if args.cuda_graphs:
        variants.append((" (compiled FF + CUDA graphs)" if args.compile else " (CUDA graphs)", args.compile, True))
    for tag, compiled, graphed in variants:
        if compiled and not graphed:
            n = compile_non_attention(model.pipe.transformer)
            print(f"  compiled {n} feed-forward blocks", flush=True)
        share = measure_attention_share(model.pipe, dict(kwargs), repeats=3, cuda_graph=graphed)
        result = ModelResult(name, device_name, torch.__version__, steps, share.share, share.step_seconds * 1e3, text)
        graphs = apply_cuda_graphs(model.pipe) if graphed else None
        warmup = 2 if graphed else 1  # under graphs: an eager call, then the capture
        clock = LoopClock(model.pipe, [] if graphed else modules, args.device)
        repeats = 1 if model.height >= 2048 else args.repeats
        base = run_pipeline(model, kwargs, clock, args.device, repeats, warmup=warmup)
        result.rows.append(Row(name, "uncompressed" + tag, steps, 1.0, share.share, 1.0, base.loop_s, base.pipeline_s,
                               text_s, base.attention_s, base.peak_gib, 0.0, compiled=compiled, graphs=graphed))
        noise = " (below this host's timing noise)" if share.below_noise else ""
        print(f"  {name}{tag}: attention share {share.share:.1%}{noise}, loop {base.loop_s:.2f} s", flush=True)
        shapes = [(v1_plan, False), (v1_plan, True)] if model.plan_style == "v1" else [(v2_plan, None)]
        in_model = None
        runs = [(sh, f) for sh in shapes for f in model.fractions]
        if args.null_plan:  # every entry full: what applying a plan costs when it changes no attention call,
            # after the A/A control (no plan on either side of a pair): the noise of the paired ratios
            runs[:0] = [((aa_control, None), 1.0), ((null_plan, None), 1.0)]
        for (shape, mix), fraction in runs:
            plan, label = shape(model, steps, fraction) if mix is None else shape(model, steps, fraction, mix)
            if plan is None and repeats == 1:
                continue  # the A/A control needs pairs
            lowered = ""
            if args.lower_unprofitable and plan is not None:  # WA-RS segments that cost more than dense run dense
                # under graphs, calibrated by one profiled call of the model (the graph runner runs a new
                # plan's first call eagerly), once per model and variant
                low = lower_for_device(plan, args.device, dtype, graphs=graphed, launches=in_model,
                                       run=(lambda p: run_planned(model, kwargs, p, args.warsr_refresh)) if graphed
                                       else None)
                in_model = in_model or low.in_model
                plan = low.plan
                print(f"    {label}: {low.summary()}", flush=True)
                if low.lowered:
                    lowered = f", {low.summary()}"
                    label += f" [{len(low.lowered)}/{len(low.lowered) + len(low.kept)} WA-RS segments dense]"
            if args.drop_asc and plan is not None:
                plan, dropped = drop_asc(plan)
                if dropped:
                    label += " [ASC dropped]"
                    lowered += f", ASC dropped on {dropped} head-steps"
            core = 1.0 if plan is None else _fraction(plan)
            bound = share.bound(1.0 - core)
            pairs, ratios, host_ratios = "", [], []
            if repeats > 1:  # host-bound sizes: alternate with uncompressed calls, compare within pairs
                ref, got, ratios, host_ratios = run_paired(model, kwargs, clock, args.device, repeats, plan, warmup,
                                                           args.warsr_refresh)
                sl, host = statistics.median(ratios), statistics.median(host_ratios)
                interval = median_interval(ratios)
                pairs = (f", pairs {min(ratios):.3f}-{max(ratios):.3f}x"
                         + (f", median's 95% interval {interval[0]:.3f}-{interval[1]:.3f}x" if interval else "")
                         + f", host CPU {host:.3f}x ({min(host_ratios):.3f}-{max(host_ratios):.3f}x)")
            else:
                with apply_plan(model.pipe, plan, count_flops=False, warsr_refresh=args.warsr_refresh) as handle:
                    got = run_pipeline(model, kwargs, clock, args.device, repeats, handle, warmup)
                ref, sl = base, base.loop_s / got.loop_s
            sp = (ref.pipeline_s + text_s) / (got.pipeline_s + text_s)
            result.rows.append(Row(name, label + tag, steps, core, share.share, bound, got.loop_s, got.pipeline_s, text_s,
                                   got.attention_s, got.peak_gib, got.cache_gib, sl, sp, sl / bound, compiled, graphed,
                                   f"target {fraction:.0%}, WA-RS refresh {args.warsr_refresh}{lowered}{pairs}",
                                   ratios, host_ratios))
            print(f"    {label}: fraction {core:.1%}, loop {got.loop_s:.2f} s = {sl:.3f}x{pairs} (bound {bound:.2f}x, "
                  f"{sl / bound:.0%} of it), pipeline {sp:.2f}x, cache {got.cache_gib:.2f} GiB", flush=True)
        clock.remove()
        if graphs is not None:
            print(f"    CUDA graphs: {graphs.captures} captured, {graphs.replays} replays", flush=True)
            graphs.remove()
        results.append((result, compiled, graphed))
    merged = results[0][0]
    for extra, compiled, graphed in results[1:]:
        merged.rows += extra.rows
        if graphed:
            merged.graphs_share = extra.share
        else:
            merged.compiled_share = extra.share
    del model
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return merged


# ------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------


def report(path: Path) -> str:
    data = json.loads(path.read_text())
    lines = ["| model | plan | attention FLOPs | attention share | bound | loop | speedup | of bound | "
             "pipeline (+text) | speedup | attention modules | peak mem | cache |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for res in data["models"]:
        for r in res["rows"]:
            lines.append(
                f"| {r['model']} | {r['plan']} | {r['core_fraction']:.1%} | {r['share']:.1%} | {r['bound']:.2f}x | "
                f"{r['loop_s']:.2f} s | {r['speedup_loop']:.2f}x | {r['reach']:.0%} | "
                f"{r['pipeline_s'] + r['text_s']:.2f} s | {r['speedup_pipeline']:.2f}x | {r['attention_s']:.2f} s | "
                f"{r['peak_gib']:.1f} GiB | {r['cache_gib']:.2f} GiB |")
    papers = [f"- {m}: {t}" for m, t in PAPERS.items()]
    plot(path.with_suffix(".png"), data)
    return "\n".join(lines + ["", "Published (A100):", *papers])


def plot(out: Path, data: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    for res in data["models"]:
        rows = [r for r in res["rows"] if not r["compiled"] and not r.get("graphs")]
        shapes = dict.fromkeys(r["plan"].split(" w=")[0] for r in rows[1:] if not r["plan"].startswith("uncompressed"))
        for k, shape in enumerate(shapes):
            line_rows = [rows[0]] + [r for r in rows[1:] if r["plan"].startswith(shape)]
            xs = [1 - r["core_fraction"] for r in line_rows]
            color = None if k == 0 else line.get_color()  # noqa: F821 - same model, same colour
            line, = ax.plot(xs, [r["speedup_loop"] for r in line_rows], "o-" if k == 0 else "s--", color=color,
                            label=f"{res['model']}: {shape}")
            if k == 0:
                ax.plot(xs, [r["bound"] for r in line_rows], ":", color=line.get_color())
    ax.set_xlabel("attention FLOPs removed")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_ylabel("denoising-loop speedup (dotted: Amdahl bound)")
    ax.set_title(f"End-to-end speedup vs. bound ({data['models'][0]['device']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per row (1 at 2K)")
    parser.add_argument("--compile", action="store_true", help="also run with torch.compile on the feed-forward blocks")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="also replay every transformer forward from CUDA graphs (uncompressed and each plan)")
    parser.add_argument("--warsr-refresh", default="two-pass", choices=["one-pass", "two-pass"],
                        help="how full steps refresh WA-RS residuals (ditlens.compress.apply_plan)")
    parser.add_argument("--null-plan", action="store_true",
                        help="also time a plan whose every entry is full (the runtime's own cost)")
    parser.add_argument("--lower-unprofitable", action="store_true",
                        help="run WA-RS segments dense where the measured kernels say they cannot save time "
                             "(ditlens.compress.lowering)")
    parser.add_argument("--drop-asc", action="store_true",
                        help="run every plan without its +asc (ditlens.compress.drop_asc; after any lowering): "
                             "what ASC costs where the loop waits on the host")
    parser.add_argument("--out", default=None, help="JSON results (written after every model)")
    parser.add_argument("--report", default=None, help="print the Markdown table of a results JSON (and write its plot)")
    parser.add_argument("--smoke", action="store_true", help="toy sizes on the CPU: checks the code path")
    args = parser.parse_args()
    if args.report:
        print(report(Path(args.report)))
        return
    if args.smoke:
        args.device, args.steps, args.repeats = "cpu", 3, 2
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    out = {"command": " ".join(sys.argv), "models": []}
    text_cache: dict = {}
    for name in names:
        t0 = time.perf_counter()
        print(f"{name}:", flush=True)
        out["models"].append(asdict(bench_model(name, args, text_cache)))
        print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
