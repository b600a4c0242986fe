"""Host time to enqueue one attention call on the GPU: SDPA; ditlens' head-wise kernel through
Triton's own dispatch (``fn[grid](...)`` binding and specializing every argument); the same launch
from ditlens' launch cache (``ditlens.kernels.launcher``); and ditlens' call with the launch left out
(its own Python and the output's allocation). In a host-bound denoising loop (DiT-XL 512² eager)
this is what each attention call costs whatever the GPU does.

    python benchmarks/launch_host.py                        # DiT-XL 512² and SD3 1024² call shapes
    python benchmarks/launch_host.py --shapes 2,16,1024,72   # B,H,L,D of diffusers' [B, L, H, D] views
    python benchmarks/launch_host.py --profile 20            # and where a cached call's host time goes (cProfile)
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import pstats
import time
from typing import Callable

import torch

from _paths import benchmarks_last  # noqa: E402

benchmarks_last()  # benchmarks/kernels.py must not shadow the `kernels` package

SHAPES = {"DiT-512": (2, 16, 1024, 72), "SD3-1K": (2, 24, 4429, 64)}


def best_host_us(call: Callable[[], object], loops: int = 5, calls: int = 200) -> float:
    """Best over ``loops`` of the mean host time per call of ``calls`` back-to-back calls (GPU idle at the start)."""
    best = float("inf")
    for _ in range(loops):
        call()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return best


def profile_lines(call: Callable[[], object], top: int, calls: int = 2000) -> list[str]:
    """cProfile of ``calls`` calls: the ``top`` functions by own time (cProfile's overhead inflates
    small functions; read the order, not the microseconds)."""
    call()
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        call()
    profiler.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return ["    " + line for line in text.getvalue().splitlines() if line.strip()]


def host_lines(B: int, H: int, L: int, D: int, profile_top: int = 0) -> list[str]:
    import torch.nn.functional as F

    from ditlens.kernels import headwise_attention
    from ditlens.kernels import triton_backend as backend
    from ditlens.kernels.launcher import launch_key

    launches_fn = backend.headwise_launches
    base = torch.randn(B, L, 3, H, D, device="cuda", dtype=torch.bfloat16)
    q, k, v = (base[:, :, i].transpose(1, 2) for i in range(3))  # [B, H, L, D] views, as diffusers passes them
    w = max(1, L // 16)
    launches = launches_fn()

    def dispatched():
        launches.launches.clear()  # every call a first launch: Triton's dispatch
        headwise_attention(q, k, v, modes="window", windows=w)

    @contextlib.contextmanager
    def launching_with(launch):  # ditlens' calls hand their launch to ``launch`` instead of the cache
        backend.headwise_launches = lambda: launch
        try:
            yield
        finally:
            backend.headwise_launches = launches_fn

    def unlaunched() -> float:
        # everything ditlens does per call but the launch itself: what is left to cut in its own Python
        with launching_with(lambda grid, args, constants: None):
            return best_host_us(lambda: headwise_attention(q, k, v, modes="window", windows=w))

    def recorded_launch() -> tuple[tuple, tuple, dict]:
        # one call's (grid, args, constants), launched through the cache so that its entry exists
        seen: list = []

        def record(grid, args, constants):
            seen.append((grid, args, constants))
            launches(grid, args, constants)

        with launching_with(record):
            headwise_attention(q, k, v, modes="window", windows=w)
        return seen[0]

    def launch_alone(grid: tuple, args: tuple, constants: dict) -> float:
        # the compiled kernel's launcher with one call's arguments (descriptor scratch allocator set once)
        entry = launches.launches[launch_key(args, constants)]
        grid3 = (*grid, 1, 1)[:3]
        with backend._descriptor_scratch(q.device):
            return best_host_us(lambda: entry.kernel[grid3](*args, *entry.tail))

    def lookup_alone(args: tuple, constants: dict) -> float:
        # the cache's key for one call's arguments and its dict lookup, as LaunchCache.__call__ makes them
        table = launches.launches
        return best_host_us(lambda: table.get(launch_key(args, constants)))

    calls = {"SDPA": lambda: F.scaled_dot_product_attention(q, k, v),
             "ditlens window, Triton's dispatch": dispatched,
             "ditlens window, cached launch": lambda: headwise_attention(q, k, v, modes="window", windows=w)}
    times = {label: best_host_us(call) for label, call in calls.items()}
    times["ditlens window, all but the launch"] = unlaunched()
    recorded = recorded_launch()  # after the dispatch timing, which empties the cache
    times["the cached launch alone (Triton's launcher)"] = launch_alone(*recorded)
    times["the cache's key and lookup alone"] = lookup_alone(*recorded[1:])
    lines = [f"  {label}: {us:.1f} us" for label, us in times.items()]
    if profile_top:
        lines.append(f"  cProfile of the cached launch, top {profile_top} by own time:")
        lines += profile_lines(calls["ditlens window, cached launch"], profile_top)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), help="names or B,H,L,D")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also profile the cached call and print its N costliest functions")
    args = parser.parse_args()
    for name in args.shapes:
        shape = SHAPES.get(name) or tuple(int(x) for x in name.split(","))
        print(f"{name} {shape}: host time per call (enqueue, best of 5 x 200 calls)")
        print("\n".join(host_lines(*shape, profile_top=args.profile)))


if __name__ == "__main__":
    main()
