"""Where a compressed denoising loop spends its time: one pipeline call of a benchmarks/e2e.py model,
uncompressed and under one plan, each under torch.profiler; GPU time per kernel family and the
host time per step, side by side. Answers "why is this plan not faster?" on the machine at hand.

    python benchmarks/e2e_profile.py --model pixart-sigma-xl-1024 --fraction 0.52
    python benchmarks/e2e_profile.py --model dit-xl-2-512 --fraction 0.49 --mix   # AST / WA-RS+ASC plan

Per call it also lists what can hold the host: CUDA runtime synchronisations, device allocations
and copies (torch.profiler), the caching allocator's device allocations and retries, and the torch
operations that synchronised (torch's sync debug mode) with the Python line that called them.

It also times the attention kernels alone on the model's real layout (diffusers' ``[B, L, H, D]``
views) against contiguous ``[B, H, L, D]`` tensors, so a slow strided path shows.
"""

from __future__ import annotations

import argparse
import contextlib
import time
import warnings
from collections import Counter, defaultdict

import torch

from _paths import benchmarks_last  # noqa: E402

benchmarks_last()  # benchmarks/kernels.py must not shadow the `kernels` package


def family(name: str) -> str:
    """Group kernel names into a few families that say what the GPU is doing."""
    n = name.lower()
    for key, label in (("headwise_fwd", "ditlens attention"), ("flash", "sdpa (flash)"), ("fmha", "sdpa (fmha)"),
                       ("cudnn", "sdpa (cudnn)"), ("gemm", "matmul"), ("sm90", "matmul"), ("nvjet", "matmul"),
                       ("cutlass", "matmul"), ("triton", "compiled/triton"), ("copy", "copies"),
                       ("elementwise", "elementwise"), ("reduce", "reductions"), ("norm", "norms")):
        if key in n:
            return label
    return "other"


ALLOCATOR_COUNTERS = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")
STALL_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMalloc", "cudaFree",
               "cudaMemcpy")


def profile_call(model, kwargs: dict, steps: int, timed_calls: int = 3) -> dict:
    """``timed_calls`` plain calls (median wall time; the caching allocator's device allocations,
    frees and retries per call), then one call under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    plain = []
    before = torch.cuda.memory_stats()
    for _ in range(timed_calls):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.pipe(**kwargs)
        torch.cuda.synchronize()
        plain.append(time.perf_counter() - t0)
    after = torch.cuda.memory_stats()
    allocator = {k: (after.get(k, 0) - before.get(k, 0)) / timed_calls for k in ALLOCATOR_COUNTERS}
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.pipe(**kwargs)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    by_family: dict[str, float] = defaultdict(float)
    by_kernel: dict[str, list[float]] = {}
    launches = 0
    for evt in prof.key_averages():
        gpu_us = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0)
        if gpu_us and evt.device_type == torch.autograd.DeviceType.CUDA:
            by_family[family(evt.key)] += gpu_us / 1e3
            by_kernel[evt.key] = [gpu_us / 1e3, evt.count]
            launches += evt.count
    return {"wall_ms": wall * 1e3, "plain_ms": sorted(plain)[len(plain) // 2] * 1e3, "gpu_ms": dict(by_family),
            "gpu_total_ms": sum(by_family.values()),
            "kernels_per_step": launches / steps, "kernels": by_kernel, "idle": idle_gaps(prof),
            "longest_gap": longest_gap(prof), "allocator": allocator, "stalls": host_stalls(prof),
            "sync_ops": synchronising_ops(model, kwargs)}


def host_stalls(prof) -> dict[str, list]:
    """CUDA runtime calls of a profiled call that can hold the host (synchronisations, device
    allocations and frees, copies): count and host ms of each. An eager loop slower than both its
    GPU time and its host's launch rate has its cause here."""
    cuda = torch.autograd.DeviceType.CUDA
    found: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type != cuda and e.name.startswith(STALL_CALLS):
            found[e.name][0] += 1
            found[e.name][1] += (e.time_range.end - e.time_range.start) / 1e3
    return dict(found)


def synchronising_ops(model, kwargs: dict, top: int = 8) -> list[tuple[int, str]]:
    """The torch operations that synchronised the host with the GPU during one call (torch's sync
    debug mode), counted by the Python line that called them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with torch.inference_mode():
                model.pipe(**kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    where = Counter(f"{w.filename.rsplit('/', 3)[-1]}:{w.lineno} {str(w.message).splitlines()[0][:60]}"
                    for w in caught if "synchroniz" in str(w.message).lower())
    return [(n, line) for line, n in where.most_common(top)]


def longest_gap(prof, around: int = 3) -> list[str]:
    """The longest GPU idle gap of a profiled call: the kernels just before and after it, and every
    host-side event (torch ops, CUDA runtime calls) that started while the GPU waited. Says whether
    the host was busy (and with what) or had already launched the work the GPU was late to start."""
    cuda = torch.autograd.DeviceType.CUDA
    kernels = sorted((e for e in prof.events() if e.device_type == cuda), key=lambda e: e.time_range.start)
    if len(kernels) < 2:
        return []
    # the once-per-call gaps around the host-to-device copies of the pipeline's set-up are not the question
    best, busy_end, last = (0.0, 0), kernels[0].time_range.end, kernels[0]
    for k, e in enumerate(kernels[1:], 1):
        gap = e.time_range.start - busy_end
        if gap > best[0] and "HtoD" not in e.name and "HtoD" not in last.name:
            best = (gap, k)
        if e.time_range.end >= busy_end:
            busy_end, last = e.time_range.end, e
    gap, k = best
    t0 = kernels[k].time_range.start - gap
    lines = [f"longest GPU gap {gap:.0f} us, at {t0 / 1e3:.3f} ms:"]
    for e in kernels[max(0, k - around):k + around]:
        lines.append(f"  gpu  {e.time_range.start / 1e3:10.3f} +{e.time_range.end - e.time_range.start:7.1f} us  {e.name[:80]}")
    host = sorted((e for e in prof.events() if e.device_type != cuda and t0 - 50 <= e.time_range.start <= t0 + gap),
                  key=lambda e: e.time_range.start)
    for e in host[:60]:
        lines.append(f"  host {e.time_range.start / 1e3:10.3f} +{e.time_range.end - e.time_range.start:7.1f} us  {e.name[:80]}")
    return lines


GAP_BUCKETS_US = (2.0, 10.0, 100.0)  # launch gaps inside a graph | bubbles | host waits between steps


def idle_gaps(prof) -> dict:
    """GPU idle time of a profiled call: the gaps between consecutive kernels (after merging
    overlaps), bucketed by length, and the kernel pairs around the mid-sized gaps. Under CUDA
    graphs a gap of a few µs is a kernel launch inside a replay; one of 100 µs and more is the
    GPU waiting for the host (a sync per step); what lies between is a bubble worth explaining."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    buckets = {b: [0, 0.0] for b in (*GAP_BUCKETS_US, float("inf"))}
    pairs: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0])
    long_pairs: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0])  # where the host waits fall
    if not spans:
        return {"span_ms": 0.0, "idle_ms": 0.0, "buckets": {}, "pairs": []}
    busy_end, last_name = spans[0][1], spans[0][2]
    for start, end, name in spans[1:]:
        gap = start - busy_end
        if gap > 0:
            bucket = next(b for b in buckets if gap < b)
            buckets[bucket][0] += 1
            buckets[bucket][1] += gap / 1e3
            if gap >= GAP_BUCKETS_US[0]:
                pair = (pairs if gap < GAP_BUCKETS_US[-1] else long_pairs)[(last_name[:48], name[:48])]
                pair[0] += 1
                pair[1] += gap / 1e3
        if end >= busy_end:
            busy_end, last_name = end, name
    span = (busy_end - spans[0][0]) / 1e3
    def top(found: dict) -> list:
        return [(a, b, n, ms) for (a, b), (n, ms) in sorted(found.items(), key=lambda kv: -kv[1][1])[:8]]

    return {"span_ms": span, "idle_ms": sum(v[1] for v in buckets.values()),
            "buckets": {f"< {b:g} us": v for b, v in buckets.items()},
            "pairs": top(pairs), "long_pairs": top(long_pairs)}


def idle_report(results: dict) -> list[str]:
    """The idle-gap table of each profiled call, side by side, and the bubbles' kernel pairs."""
    lines = ["GPU idle time between kernels (gaps after merging overlaps; count / ms over the call):"]
    for name, r in results.items():
        idle = r["idle"]
        cells = "  ".join(f"{k}: {n} / {ms:.2f}" for k, (n, ms) in idle["buckets"].items())
        lines.append(f"  {name:20s} span {idle['span_ms']:.1f} ms, idle {idle['idle_ms']:.2f} ms  ({cells})")
    for name, r in results.items():
        lines.append(f"  {name}: kernel pairs around {GAP_BUCKETS_US[0]:g}-{GAP_BUCKETS_US[-1]:g} us gaps (count, ms):")
        lines += [f"    {n:5d} {ms:7.2f}  {a} -> {b}" for a, b, n, ms in r["idle"]["pairs"]]
        lines.append(f"  {name}: kernel pairs around gaps of {GAP_BUCKETS_US[-1]:g} us and more (count, ms):")
        lines += [f"    {n:5d} {ms:7.2f}  {a} -> {b}" for a, b, n, ms in r["idle"]["long_pairs"]]
    return lines


def kernel_differences(base: dict, other: dict, top: int) -> list[str]:
    """The ``top`` kernels whose GPU time differs most between two profiled calls (ms and launches)."""
    names = set(base["kernels"]) | set(other["kernels"])
    zero = [0.0, 0]
    diffs = sorted(names, key=lambda n: -abs(other["kernels"].get(n, zero)[0] - base["kernels"].get(n, zero)[0]))
    lines = ["kernels that differ most (uncompressed -> plan: ms over the call, launches):"]
    for n in diffs[:top]:
        a, b = base["kernels"].get(n, zero), other["kernels"].get(n, zero)
        lines.append(f"  {a[0]:8.2f} ms {a[1]:6d} -> {b[0]:8.2f} ms {b[1]:6d}  {n[:110]}")
    return lines


def kernel_layouts(model) -> list[str]:
    """The window kernel and SDPA on the model's self-attention shape, strided vs contiguous."""
    import torch.nn.functional as F
    from triton.testing import do_bench

    from ditlens.kernels import headwise_attention

    tr = model.pipe.transformer
    cfg = tr.config
    heads, dim = cfg.num_attention_heads, cfg.attention_head_dim
    side = model.height // 8 // cfg.patch_size
    L = side * side
    B = 2  # CFG batch
    w = max(1, L // 16)
    lines = [f"attention alone, B={B} H={heads} L={L} D={dim}, window w={w} (ms, median of do_bench):"]
    base = torch.randn(B, L, 3, heads, dim, device="cuda", dtype=torch.bfloat16)
    strided = [base[:, :, i].transpose(1, 2) for i in range(3)]  # [B, H, L, D] views of [B, L, H, D]
    contiguous = [t.contiguous() for t in strided]
    for label, (q, k, v) in (("strided [B,L,H,D] views", strided), ("contiguous [B,H,L,D]", contiguous)):
        sdpa = do_bench(lambda: F.scaled_dot_product_attention(q, k, v), return_mode="median")
        full = do_bench(lambda: headwise_attention(q, k, v, modes="full", windows=0), return_mode="median")
        win = do_bench(lambda: headwise_attention(q, k, v, modes="window", windows=w), return_mode="median")
        lines.append(f"  {label}: SDPA {sdpa:.3f}, ditlens full {full:.3f}, ditlens window {win:.3f}")
    # host time of one call: what the launch path costs before the GPU sees any work
    from launch_host import host_lines

    lines.append("host time per call (enqueue, best of 5 x 200 calls):")
    return lines + host_lines(B, heads, L, dim)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="pixart-sigma-xl-1024")
    parser.add_argument("--fraction", type=float, default=0.52, help="attention-FLOPs fraction of the plan")
    parser.add_argument("--mix", action="store_true", help="the AST / WA-RS+ASC plan instead of WA-RS")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="replay each forward as a CUDA graph (apply_cuda_graphs): GPU time without the host")
    parser.add_argument("--top", type=int, default=12, help="kernels listed by their change in GPU time")
    args = parser.parse_args()
    from e2e import _fraction, v1_plan, v2_plan
    from random_pipelines import e2e_model

    from ditlens.compress import apply_cuda_graphs, apply_plan

    model = e2e_model(args.model, "cuda", torch.bfloat16)
    kwargs = dict(model.call_kwargs, num_inference_steps=args.steps, output_type="latent")
    if not args.model.startswith("dit"):
        kwargs.update(height=model.height, width=model.width)
    if model.plan_style == "v1":
        plan, label = v1_plan(model, args.steps, args.fraction, args.mix)
    else:
        plan, label = v2_plan(model, args.steps, args.fraction)
    print(f"{args.model}: plan {label}, attention-FLOPs fraction {_fraction(plan):.1%}", flush=True)
    graphs = apply_cuda_graphs(model.pipe) if args.cuda_graphs else None
    warmups = 2 if graphs is not None else 1  # under graphs: an eager call, then the capture
    results = {}
    for name in ("uncompressed", "plan", "uncompressed again"):
        with apply_plan(model.pipe, plan, count_flops=False) if name == "plan" else contextlib.nullcontext():
            with torch.inference_mode():
                for _ in range(warmups):
                    model.pipe(**kwargs)  # warm-up (kernel compiles, graph capture)
            results[name] = profile_call(model, kwargs, args.steps)
    families = sorted({f for r in results.values() for f in r["gpu_ms"]},
                      key=lambda f: -results["uncompressed"]["gpu_ms"].get(f, 0))
    print(f"{'':24s}" + "".join(f"{n:>20s}" for n in results))
    for f in families:
        print(f"{f:24s}" + "".join(f"{r['gpu_ms'].get(f, 0):17.1f} ms" for r in results.values()))
    for key, label in (("gpu_total_ms", "GPU kernels, total"), ("wall_ms", "wall (profiled)"),
                       ("plain_ms", "wall (median, plain)")):
        print(f"{label:24s}" + "".join(f"{r[key]:17.1f} ms" for r in results.values()))
    print(f"{'kernels per step':24s}" + "".join(f"{r['kernels_per_step']:20.0f}" for r in results.values()))
    print("\n".join(kernel_differences(results["uncompressed again"], results["plan"], args.top)))
    print("\n".join(idle_report(results)))
    for name, r in results.items():
        print(f"{name}: " + "\n".join(r["longest_gap"]))
    print("host stalls per call (CUDA runtime calls that can hold the host: count / host ms; allocator per call):")
    for name, r in results.items():
        stalls = ", ".join(f"{k} {n} / {ms:.2f}" for k, (n, ms) in sorted(r["stalls"].items())) or "none"
        alloc = ", ".join(f"{k} {v:g}" for k, v in r["allocator"].items())
        print(f"  {name:20s} {stalls}\n  {'':20s} {alloc}")
        for n, line in r["sync_ops"]:
            print(f"  {'':20s} {n:5d} synchronising op at {line}")
    print("\n".join(kernel_layouts(model)))


if __name__ == "__main__":
    main()
