"""Host (Python) time the compression runtime adds per transformer forward, measured without a GPU.

At sizes where a GPU step is short (DiT-XL 512², PixArt-Σ 1024² on an H100/H200) the denoising
loop waits on the host, and a plan is only faster if the host time it adds stays below the GPU
time it saves (benchmarks/e2e_profile.py shows both on the device). This builds PixArt-Σ-XL's
module structure (28 blocks, 16 heads) with tiny tensors in bfloat16, applies a plan, and runs
the kernels' CUDA code path with the Triton launch replaced by a no-op, so that what is timed is
the host work of hooks, interception, dispatch and launch preparation.

    python benchmarks/runtime_host.py                   # ms per forward: plain, all-full, WA-RS, AST and ASC plans
    python benchmarks/runtime_host.py --cprofile 20     # and where the WA-RS plan's (--profiled-plan) host time goes
    python benchmarks/runtime_host.py --attend          # us per PlanRuntime.attend call of a WA-RS and an ASC step
    python benchmarks/runtime_host.py --replay          # us per forward when the forward is a graph replay

The whole-pipeline figures swing by tens of percent on a shared 2-core VM; ``--attend`` times the
runtime's own per-call path alone (best of 5 loops of 3000 calls), which is stable.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from _paths import benchmarks_last  # noqa: E402

benchmarks_last()  # benchmarks/kernels.py must not shadow the `kernels` package

from profile_host import _NoLaunch  # noqa: E402


class _NoKernels:
    headwise_fwd_kernel = _NoLaunch()
    warsr_fwd_kernel = _NoLaunch()


def emulate_gpu_kernels() -> None:
    """CPU tensors take the Triton path (as CUDA tensors would), with launches that do nothing."""
    from ditlens.compress import runtime
    from ditlens.kernels import api, triton_backend

    triton_backend.kernel_module = lambda: _NoKernels
    triton_backend.check_triton_inputs = lambda q: None
    api.check_triton_inputs = lambda q: None
    runtime.PlanRuntime._use_fast = lambda self, q: True


def time_attend() -> None:
    """Host time of one attention call under a WA-RS step and under an ASC step, with Triton launches
    emulated and SDPA replaced by a stub that returns an empty output, against the stub alone (what an
    untouched layer's call costs here): what remains is the runtime's own host work."""
    from ditlens.compress import Plan
    from ditlens.compress.plan import LayerInfo, ModelFingerprint, RunSpec, TokenInfo
    from ditlens.compress.runtime import ForwardState, PlanRuntime

    H, D, grid = 16, 72, (1, 8, 8)
    model = ModelFingerprint("host", "Host", "0" * 32, (LayerInfo("layer0", "self", "none"),), H, D,
                             TokenInfo(64, 0, "none", grid))
    base = torch.randn(2, 64, 3, H, D, dtype=torch.bfloat16)
    q, k, v = (base[:, :, i].transpose(1, 2) for i in range(3))  # diffusers' [B, L, H, D] views

    def sdpa_stub(query, key, value, **_):  # SDPA's output layout (that of q), no compute
        return torch.empty_like(query)

    def best_us(call) -> float:
        for _ in range(200):
            call()
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(3000):
                call()
            best = min(best, (time.perf_counter() - t0) / 3000)
        return best * 1e6

    print(f"SDPA stub alone (an untouched layer's call): {best_us(lambda: sdpa_stub(q, k, v)):.1f} us")
    for label, later in (("WA-RS step", "wars(4)"), ("ASC step (full+asc)", "full+asc")):
        methods = [[["full"] * H]] + [[[later] * H]] * 3
        plan = Plan(model, RunSpec(len(methods), "Host", 3.0, None, None, None, "batched_cond_first"),
                    [m[0:1] for m in methods])
        runtime = PlanRuntime(plan, adapter=None, transformer=None, scheduler=None, pipe=None, backend="kernels",
                              count_flops=False)

        def step(s: int) -> None:
            runtime.forward = ForwardState(s, grid, "all", True, True)
            runtime.attend(0, 0, runtime.schedule[s][0], sdpa_stub, (q, k, v), {})

        step(0)
        print(f"PlanRuntime.attend, {label}, 16 heads, launch emulated: {best_us(lambda: step(1)):.1f} us per call")


def time_replay(steps: int, calls: int, cprofile: int) -> None:
    """Host µs per transformer forward that the plan's hooks add when the forward itself costs nothing:
    under CUDA graphs the forward is a replay, and a pipeline that waits for the GPU at every step
    (diffusers' DiT pipeline does) pays this host time on top of the GPU's (tiny-dit, forward stubbed)."""
    from ditlens.compress import Plan, apply_plan
    from ditlens.models import load_pipeline

    pipe = load_pipeline("tiny-dit")
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append((a, kw)), with_kwargs=True)
    pipe(class_labels=[1], num_inference_steps=steps, output_type="np", guidance_scale=4.0)
    hook.remove()
    args, kwargs = seen[0]
    with torch.inference_mode():
        saved = pipe.transformer(*args, **kwargs)
    entered: list[float] = []

    def stub(*_, **__):  # where a replay would be launched
        entered.append(time.perf_counter())
        return saved

    pipe.transformer.forward = stub  # a plan's hooks wrap this stub

    def per_forward_us(n_calls: int) -> tuple[float, float]:
        """(host µs per forward, of which before the launch), each the best of n_calls calls."""
        best, best_before = float("inf"), float("inf")
        for _ in range(n_calls):
            entered.clear()
            before = 0.0
            t0 = time.perf_counter()
            for s in range(steps):
                pipe.scheduler._step_index = s if s else None  # what scheduler.step() leaves behind
                start = time.perf_counter()
                with torch.inference_mode():
                    pipe.transformer(*args, **kwargs)
                before += entered[-1] - start
            best = min(best, time.perf_counter() - t0)
            best_before = min(best_before, before)
        return best / steps * 1e6, best_before / steps * 1e6

    bare, bare_before = per_forward_us(calls)
    full = Plan.uniform(pipe, steps, "full")
    wars = Plan.uniform(pipe, steps, "full")
    for s in range(1, steps):
        for i, layer in enumerate(wars.model.layers):
            if layer.kind == "self":
                wars.set(s, i, "wars(4)")
    print(f"tiny-dit, forward stubbed: host µs per transformer forward (best of {calls} x {steps} steps);"
          " 'before launch': from the call to where a graph replay would be launched")
    print(f"  {'':<14} {'total':>7}  {'before launch':>13}")
    print(f"  {'no plan':<14} {bare:7.1f}  {bare_before:13.1f}")
    for label, plan in (("all-full plan", full), ("WA-RS plan", wars)):
        with apply_plan(pipe, plan, count_flops=False):
            per_forward_us(1)  # the first call starts the plan's call tracking; the stub runs no layer, so the
            # caches stay empty, as under graph replay (a new call clears them and replays run no hook)
            us, before = per_forward_us(calls)
            print(f"  {label:<14} {us:7.1f}  {before:13.1f}  (+{us - bare:.1f} / +{before - bare_before:.1f})")
            if cprofile and label == "WA-RS plan":
                profiler = cProfile.Profile()
                profiler.enable()
                per_forward_us(3)
                profiler.disable()
                pstats.Stats(profiler).sort_stats("tottime").print_stats(cprofile)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cprofile", type=int, default=0, metavar="N", help="print the N costliest functions")
    parser.add_argument("--profiled-plan", default="WA-RS", choices=["WA-RS", "AST", "ASC"],
                        help="the plan --cprofile profiles")
    parser.add_argument("--attend", action="store_true", help="time the runtime's per-call path alone")
    parser.add_argument("--replay", action="store_true",
                        help="host time per forward with the forward stubbed (the host side of a graph replay)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.replay:
        time_replay(50, 30, args.cprofile)
        return
    emulate_gpu_kernels()
    if args.attend:
        time_attend()
        return
    import random_pipelines

    from ditlens.compress import Plan, apply_plan

    random_pipelines.PIXART_SIGMA_XL = {**random_pipelines.PIXART_SIGMA_XL, "num_layers": args.layers,
                                        "attention_head_dim": 16, "sample_size": 8, "cross_attention_dim": 256}
    pipe = random_pipelines.pixart_sigma_xl(device="cpu", dtype=torch.bfloat16, text_len=16)
    size = 64
    emb = torch.randn(1, 16, 4096, dtype=torch.bfloat16)
    kwargs = dict(negative_prompt=None, prompt_embeds=emb, prompt_attention_mask=torch.ones(1, 16, dtype=torch.long),
                  negative_prompt_embeds=emb, negative_prompt_attention_mask=torch.ones(1, 16, dtype=torch.long),
                  num_inference_steps=args.steps, guidance_scale=4.5, height=size, width=size, output_type="latent",
                  use_resolution_binning=False)
    plans = {"all-full plan": Plan.uniform(pipe, args.steps, height=size, width=size, guidance=4.5)}
    wars = Plan.uniform(pipe, args.steps, height=size, width=size, guidance=4.5)
    grid = wars.model.tokens.grid
    w = max(1, grid[1] * grid[2] // 16)
    for i, layer in enumerate(wars.model.layers):
        if layer.kind == "self":
            for s in range(1, args.steps):
                wars.set(s, i, f"wars({w})")
    plans["WA-RS plan"] = wars
    self_layers = [i for i, layer in enumerate(wars.model.layers) if layer.kind == "self"]
    # the two methods of e2e.py's V1 "AST / WA-RS+ASC" plans once lowering runs their WA-RS dense:
    # a whole-layer AST skips the module at every other step; ASC copies the cond rows' output
    plans["AST plan"] = Plan.uniform(pipe, args.steps, "ast", at_steps=range(1, args.steps, 2), layers=self_layers,
                                     height=size, width=size, guidance=4.5)
    plans["ASC plan"] = Plan.uniform(pipe, args.steps, "full+asc", at_steps=range(1, args.steps), layers=self_layers,
                                     height=size, width=size, guidance=4.5)

    def call() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            pipe(**kwargs)
        return time.perf_counter() - t0

    call()
    results = {"plain": min(call() for _ in range(args.repeats))}
    for name, plan in plans.items():
        with apply_plan(pipe, plan, backend="kernels", count_flops=False):
            call()
            results[name] = min(call() for _ in range(args.repeats))
    print(f"PixArt-Σ-XL structure ({args.layers} blocks, tiny bf16 tensors), {args.steps} forwards, "
          "Triton launches emulated:")
    for name, t in results.items():
        extra = "" if name == "plain" else f" (+{1e3 * (t - results['plain']) / args.steps:.2f} ms, " \
            f"+{1e6 * (t - results['plain']) / args.steps / args.layers:.0f} us per block)"
        print(f"  {name:14s} {1e3 * t / args.steps:7.2f} ms per forward{extra}")
    if args.cprofile:
        with apply_plan(pipe, plans[f"{args.profiled_plan} plan"], backend="kernels", count_flops=False):
            profiler = cProfile.Profile()
            profiler.enable()
            call()
            profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.cprofile)


if __name__ == "__main__":
    main()
