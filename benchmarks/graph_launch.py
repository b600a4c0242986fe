"""How long the host spends in ``cudaGraphLaunch`` for each captured transformer forward, with the
GPU idle before every launch (what a pipeline that synchronises at every step exposes), for the
uncompressed model's graphs and a plan's. Then the same after ``cuGraphUpload`` of every graph, and
in a pipeline call order (one configuration's 20 graphs after the other's).

    python benchmarks/graph_launch.py --model dit-xl-2-512 --fraction 0.34

A slow launch of an idle GPU would mean the driver uploads the graph's work to the device at launch
(uploading ahead would keep it off the path); on the H200 it does not (BENCHMARKS.md §4, session 11).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from _paths import benchmarks_last  # noqa: E402

benchmarks_last()  # benchmarks/kernels.py must not shadow the `kernels` package


def launch_us(graphs: list[torch.cuda.CUDAGraph]) -> list[float]:
    """Host µs of each ``replay()`` with the GPU idle before it."""
    times = []
    for g in graphs:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        g.replay()
        times.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    return times


def launch_after_eager_us(graphs: list[torch.cuda.CUDAGraph]) -> list[float]:
    """As :func:`launch_us`, with one small eager kernel launched (not waited for) before each replay,
    as a pipeline step launches its scheduler and input kernels before the transformer's graph."""
    scratch = torch.empty(1024, device="cuda")
    times = []
    for g in graphs:
        torch.cuda.synchronize()
        scratch.fill_(1.0)
        t0 = time.perf_counter()
        g.replay()
        times.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    return times


def _cuda_driver():
    import ctypes

    return ctypes.CDLL("libcuda.so.1")


def upload_graph(graph: torch.cuda.CUDAGraph) -> bool:
    """cuGraphUpload of a captured graph for launches on the current stream."""
    import ctypes

    fn = _cuda_driver().cuGraphUpload
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p], ctypes.c_int
    return fn(graph.raw_cuda_graph_exec(), torch.cuda.current_stream().cuda_stream) == 0


def triton_kernel_resources() -> list[str]:
    """Registers, spills, shared and local memory of every compiled ditlens Triton kernel."""
    import ctypes

    from ditlens.kernels import _triton_impl as impl

    drv = _cuda_driver()
    lines = []
    for fn in (impl.headwise_fwd_kernel, impl.warsr_fwd_kernel):
        for device_cache in getattr(fn, "device_caches", {}).values():
            for key, kernel in device_cache[0].items():
                kernel._init_handles()
                local = ctypes.c_int(-1)
                drv.cuFuncGetAttribute(ctypes.byref(local), 3, ctypes.c_void_p(kernel.function))  # LOCAL_SIZE_BYTES
                lines.append(f"  {fn.__name__}: regs {kernel.n_regs}, spills {kernel.n_spills}, shared "
                             f"{kernel.metadata.shared} B, local {local.value} B/thread, warps {kernel.metadata.num_warps}, "
                             f"stages {kernel.metadata.num_stages}")
    return lines


def set_stack_limit(bytes_per_thread: int) -> int:
    """cuCtxSetLimit(CU_LIMIT_STACK_SIZE): the local memory the context keeps reserved per thread."""
    import ctypes

    drv = _cuda_driver()
    rc = drv.cuCtxSetLimit(0x00, ctypes.c_size_t(bytes_per_thread))
    got = ctypes.c_size_t(0)
    drv.cuCtxGetLimit(ctypes.byref(got), 0x00)
    return rc, got.value


def summary(times: list[float]) -> str:
    return f"median {statistics.median(times):7.1f} us, max {max(times):7.1f} us, sum {sum(times) / 1e3:6.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="dit-xl-2-512")
    parser.add_argument("--fraction", type=float, default=0.34)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--stack-limit", type=int, default=0,
                        help="then set CU_LIMIT_STACK_SIZE to this many bytes per thread and measure again")
    args = parser.parse_args()
    from e2e import v1_plan
    from random_pipelines import e2e_model

    from ditlens.compress import apply_cuda_graphs, apply_plan

    model = e2e_model(args.model, "cuda", torch.bfloat16)
    kwargs = dict(model.call_kwargs, num_inference_steps=args.steps, output_type="latent")
    plan, label = v1_plan(model, args.steps, args.fraction, False)
    graphs = apply_cuda_graphs(model.pipe)
    with torch.inference_mode():
        for _ in range(2):  # eager, then capture: of each configuration
            model.pipe(**kwargs)
            with apply_plan(model.pipe, plan, count_flops=False):
                model.pipe(**kwargs)
    by_config: dict[str, list[torch.cuda.CUDAGraph]] = {}
    for signature, inputs in graphs.runner.state.inputs.items():
        name = "uncompressed" if signature[0] == "uncompressed" else label
        by_config[name] = [inputs.forwards[i].graph for i in sorted(inputs.forwards)]
    print(f"{args.model}: {', '.join(f'{k} {len(v)} graphs' for k, v in by_config.items())}", flush=True)
    print("host us per replay, GPU idle before each (as uploaded at capture):")
    for rnd in range(2):
        for name, gs in by_config.items():
            print(f"  round {rnd} {name:28s} {summary(launch_us(gs))}", flush=True)
    print("each replayed twice in a row:")
    for name, gs in by_config.items():
        twice = [t for g in gs for t in launch_us([g, g])[1:]]
        print(f"  second replay {name:22s} {summary(twice)}", flush=True)
    print("with one eager kernel launched before each replay:")
    for rnd in range(2):
        for name, gs in by_config.items():
            print(f"  round {rnd} {name:28s} {summary(launch_after_eager_us(gs))}", flush=True)
    print("compiled ditlens kernels:")
    print("\n".join(triton_kernel_resources()), flush=True)
    print("after cuGraphUpload of every graph:")
    for gs in by_config.values():
        for g in gs:
            upload_graph(g)
    torch.cuda.synchronize()
    for name, gs in by_config.items():
        print(f"  {name:36s} {summary(launch_us(gs))}", flush=True)
    for name, gs in by_config.items():
        print(f"  after eager {name:24s} {summary(launch_after_eager_us(gs))}", flush=True)
    pipeline_calls(model, kwargs, plan, by_config)
    if args.stack_limit:
        print(f"stack limit set: {set_stack_limit(args.stack_limit)}")
        for name, gs in by_config.items():
            print(f"  after eager {name:24s} {summary(launch_after_eager_us(gs))}", flush=True)
        pipeline_calls(model, kwargs, plan, by_config)
    graphs.remove()


def pipeline_calls(model, kwargs, plan, by_config, pairs: int = 5) -> None:
    """Whole calls in the pipeline's own order, alternating configurations (a plan applied per call,
    as benchmarks/e2e.py does), so the launches sit where a user's do."""
    from ditlens.compress import apply_plan

    walls: dict[str, list[float]] = {name: [] for name in by_config}
    with torch.inference_mode():
        for _ in range(pairs):
            for name in by_config:
                ctx = apply_plan(model.pipe, plan, count_flops=False) if name != "uncompressed" else None
                if ctx is not None:
                    ctx.__enter__()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                model.pipe(**kwargs)
                torch.cuda.synchronize()
                walls[name].append((time.perf_counter() - t0) * 1e3)
                if ctx is not None:
                    ctx.__exit__(None, None, None)
    names = list(walls)
    ratios = [a / b for a, b in zip(walls[names[0]], walls[names[1]])]
    print(f"  pipeline calls, {pairs} alternating pairs: " + ", ".join(
        f"{n} median {statistics.median(w):.1f} ms" for n, w in walls.items())
        + f"; speed {statistics.median(ratios):.3f}x (per-pair {', '.join(f'{r:.3f}' for r in ratios)})", flush=True)


if __name__ == "__main__":
    main()
