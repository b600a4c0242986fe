"""Host (Python) time that ``ditlens profile`` adds per transformer forward, measured without a GPU.

On a fast GPU a PixArt-Σ-XL forward at 1024² is ~40 ms of device work, and the profiler's
statistics are ~3 ms of it; whether profiling stays under 1.3x then depends on the host time its
hooks add. This builds the PixArt-Σ-XL transformer's structure (28 blocks, 16 heads, self and
cross attention) with tiny tensors, so that compute is negligible and what is timed is host
work, and runs the statistics' CUDA code path with the kernel launch itself replaced by a no-op
(``--emulate-gpu-path``, the default) so that the host work around it is counted.

    python benchmarks/profile_host.py                # ms of host time per forward: plain, profiled
    python benchmarks/profile_host.py --cprofile 25  # and where it goes
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from pathlib import Path

import torch

from _paths import benchmarks_last  # noqa: E402

benchmarks_last()  # benchmarks/kernels.py must not shadow the `kernels` package


def tiny_pixart(layers: int):
    """PixArt-Σ-XL's module structure (blocks, heads, attention kinds) at tiny widths, CPU, float32."""
    import random_pipelines

    random_pipelines.PIXART_SIGMA_XL = {**random_pipelines.PIXART_SIGMA_XL, "num_layers": layers,
                                        "attention_head_dim": 8, "sample_size": 32, "cross_attention_dim": 128}
    return random_pipelines.pixart_sigma_xl(device="cpu", dtype=torch.float32, text_len=16)


class _NoLaunch:
    """Stands in for the Triton kernel: indexing by a grid gives a callable that does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def emulate_gpu_path() -> None:
    from ditlens.analyzer import stats
    from ditlens.kernels import pair_stats

    stats.pair_sums_available = lambda x: True
    pair_stats._pair_sums_kernel = _NoLaunch()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--no-emulate-gpu-path", dest="emulate", action="store_false")
    parser.add_argument("--cprofile", type=int, default=0, metavar="N", help="print the N costliest functions")
    parser.add_argument("--sort", default="tottime", help="cProfile order: tottime or cumulative")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.emulate:
        emulate_gpu_path()

    from ditlens.analyzer import ProfileConfig, profile
    from ditlens.analyzer.profiler import Profiler

    pipe = tiny_pixart(args.layers)
    prompts = [f"prompt {i}" for i in range(args.prompts)]
    config = ProfileConfig(steps=args.steps, guidance=4.5, height=256, width=256, overwrite=True, attention_share=False)
    adapter = Profiler(pipe, config).adapter
    forwards = args.prompts * args.steps  # batched CFG: one forward per step

    def plain() -> float:
        t0 = time.perf_counter()
        for i, prompt in enumerate(prompts):
            kwargs = adapter.call_kwargs(pipe, prompt, args.steps, 4.5, 256, 256, torch.Generator().manual_seed(i))
            with torch.inference_mode():
                pipe(**kwargs)
        return time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "host.h5"

        def profiled() -> float:
            t0 = time.perf_counter()
            profile(pipe, prompts, trace, config, progress=False, log=lambda s: None)
            return time.perf_counter() - t0

        plain(), profiled()  # warm-up
        t_plain = min(plain() for _ in range(3))
        t_prof = min(profiled() for _ in range(3))
        print(f"PixArt-Σ-XL structure ({args.layers} blocks, tiny tensors), {forwards} forwards, "
              f"{'GPU statistics path emulated' if args.emulate else 'CPU statistics path'}:")
        print(f"  plain     {1e3 * t_plain / forwards:7.2f} ms per forward")
        print(f"  profiled  {1e3 * t_prof / forwards:7.2f} ms per forward "
              f"(+{1e3 * (t_prof - t_plain) / forwards:.2f} ms)")
        if args.cprofile:
            profiler = cProfile.Profile()
            profiler.enable()
            profiled()
            profiler.disable()
            pstats.Stats(profiler).sort_stats(args.sort).print_stats(args.cprofile)


if __name__ == "__main__":
    main()
