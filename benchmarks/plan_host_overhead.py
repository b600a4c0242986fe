"""What applying a plan costs when it changes nothing: one benchmarks/e2e.py model, uncompressed and
under a plan whose every entry is ``full``, timed in alternating pairs, with the host side of each
call profiled (cProfile) and every host-device synchronisation listed (``torch.cuda`` sync debug
mode). Under CUDA graphs the GPU work of the two calls is the same graphs, so any difference is the
runtime's host work or a wait it adds.

    python benchmarks/plan_host_overhead.py --model dit-xl-2-512 --cuda-graphs
    python benchmarks/plan_host_overhead.py --model dit-xl-2-512 --device cpu --smoke   # the logic, on a CPU
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import pstats
import statistics
import time
import warnings
from collections import Counter

import torch

from _paths import benchmarks_last  # noqa: E402

benchmarks_last()  # benchmarks/kernels.py must not shadow the `kernels` package


def timed_call(pipe, kwargs: dict, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode():
        pipe(**kwargs)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def host_profile(pipe, kwargs: dict, top: int) -> str:
    prof = cProfile.Profile()
    with torch.inference_mode():
        prof.enable()
        pipe(**kwargs)
        prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def syncs(pipe, kwargs: dict, device: str) -> Counter:
    """Synchronising calls of one pipeline call, by the line of ditlens / diffusers code that made them."""
    if not device.startswith("cuda"):
        return Counter()
    found: Counter = Counter()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught, torch.inference_mode():
            warnings.simplefilter("always")
            pipe(**kwargs)
            torch.cuda.synchronize()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message):
            found[f"{w.filename}:{w.lineno}"] += 1
    return found


def forward_host_us(pipe, kwargs: dict, runtime=None) -> dict[str, float]:
    """Host µs per transformer forward (from its pre-hook to its hook: the diffusers hook chain, the
    plan's step tracking and the graph launch) and, with a plan, in the runtime's begin/end_forward."""
    spent = {"forward": 0.0, "begin+end_forward": 0.0}
    count = [0]
    start = [0.0]

    def pre(module, args, kw):
        start[0] = time.perf_counter()

    def post(module, args, kw, out):
        spent["forward"] += time.perf_counter() - start[0]
        count[0] += 1

    hooks = [pipe.transformer.register_forward_pre_hook(pre, with_kwargs=True),
             pipe.transformer.register_forward_hook(post, with_kwargs=True)]
    originals = None
    if runtime is not None:
        originals = runtime.begin_forward, runtime.end_forward

        def begin(*a, **k):
            t0 = time.perf_counter()
            originals[0](*a, **k)
            spent["begin+end_forward"] += time.perf_counter() - t0

        def end():
            t0 = time.perf_counter()
            originals[1]()
            spent["begin+end_forward"] += time.perf_counter() - t0

        runtime.begin_forward, runtime.end_forward = begin, end
    try:
        with torch.inference_mode():
            pipe(**kwargs)
    finally:
        for h in hooks:
            h.remove()
        if originals is not None:
            runtime.begin_forward, runtime.end_forward = originals
    return {k: v / max(count[0], 1) * 1e6 for k, v in spent.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dit-xl-2-512")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--cuda-graphs", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="the small CPU-sized model of e2e.py --smoke")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--plan", choices=("all-full", "wa-rs"), default="all-full",
                        help="the plan set against the uncompressed model: every entry full (the runtime's own "
                             "cost), or e2e.py's V1 WA-RS plan at --fraction")
    parser.add_argument("--fraction", type=float, default=0.34, help="attention-FLOPs fraction of --plan wa-rs")
    args = parser.parse_args()
    from e2e import null_plan, v1_plan
    from random_pipelines import e2e_model

    from ditlens.compress import apply_cuda_graphs, apply_plan

    dtype = torch.float32 if args.smoke else torch.bfloat16
    model = e2e_model(args.model, args.device, dtype, smoke=args.smoke)
    kwargs = dict(model.call_kwargs, num_inference_steps=args.steps, output_type="np")
    if not args.model.startswith("dit"):
        kwargs.update(height=model.height, width=model.width)
    if args.plan == "all-full":
        plan, label = null_plan(model, args.steps, 1.0)
    else:
        plan, label = v1_plan(model, args.steps, args.fraction, False)
    graphs = apply_cuda_graphs(model.pipe) if args.cuda_graphs else contextlib.nullcontext()
    with graphs:
        for _ in range(2):  # an eager call, then the capture, of each configuration
            timed_call(model.pipe, kwargs, args.device)
            with apply_plan(model.pipe, plan, count_flops=False):
                timed_call(model.pipe, kwargs, args.device)
        plain, planned = [], []
        for _ in range(args.pairs):
            plain.append(timed_call(model.pipe, kwargs, args.device))
            with apply_plan(model.pipe, plan, count_flops=False):
                planned.append(timed_call(model.pipe, kwargs, args.device))
        ratio = statistics.median(a / b for a, b in zip(plain, planned))
        print(f"{args.model}{' (CUDA graphs)' if args.cuda_graphs else ''}, {args.steps} steps: uncompressed "
              f"{statistics.median(plain) * 1e3:.1f} ms, {label} {statistics.median(planned) * 1e3:.1f} ms, "
              f"speed {ratio:.3f}x (median of {args.pairs} pairs)", flush=True)
        base_syncs = syncs(model.pipe, kwargs, args.device)
        with apply_plan(model.pipe, plan, count_flops=False):
            plan_syncs = syncs(model.pipe, kwargs, args.device)
        print(f"host-device synchronisations per call: uncompressed {sum(base_syncs.values())}, "
              f"{label} {sum(plan_syncs.values())}")
        for where, n in (plan_syncs - base_syncs).most_common(10):
            print(f"  +{n:4d} {where}")
        base_host = forward_host_us(model.pipe, kwargs)
        with apply_plan(model.pipe, plan, count_flops=False) as handle:
            plan_host = forward_host_us(model.pipe, kwargs, handle.runtime)
        print("host µs per transformer forward: uncompressed " + ", ".join(f"{k} {v:.1f}" for k, v in base_host.items())
              + f"; {label} " + ", ".join(f"{k} {v:.1f}" for k, v in plan_host.items()))
        print("host profile, uncompressed:\n" + host_profile(model.pipe, kwargs, args.top))
        with apply_plan(model.pipe, plan, count_flops=False):
            print(f"host profile, {label}:\n" + host_profile(model.pipe, kwargs, args.top))


if __name__ == "__main__":
    main()
