"""One launch timed three ways: do_bench (L2 flushed before each call), back-to-back events, CUDA-graph replay.

    python benchmarks/timing_methods.py [--shapes PixArt-2K FLUX-2K] [--sparsities 0 0.25 0.5 0.75] [--out F]

Why: session 38 measured PixArt-2K window 50 % at 4.01 ms with do_bench (kernels.py) against 3.41 ms under graph
replay (session 25, small_shapes.py) with the same config and window; this separates the method from the kernel.
On the H100 one call later the three methods gave 3.409 / 3.431 / 3.618 ms (BENCHMARKS.md §2, "Session 38"):
not the method. (That graph figure came from a hand-built graph of 20 launches; the script now uses Triton's
``do_bench_cudagraph``, as ``small_shapes.py`` does.)
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton.testing

sys.path.insert(0, os.path.dirname(__file__))
from kernels import SHAPES, bench, make_inputs, window_for_pair_sparsity  # noqa: E402

from ditlens.kernels.patterns import make_head_plan  # noqa: E402
from ditlens.kernels.triton_backend import headwise_triton  # noqa: E402


def events_ms(fn, n: int = 50) -> float:
    """Mean of ``n`` back-to-back launches between two CUDA events (no cache flush between them)."""
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["PixArt-2K"])
    ap.add_argument("--sparsities", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    for shape in [s for s in SHAPES if s.name in args.shapes]:
        q, k, v, _ = make_inputs(shape)
        lay = shape.layout()
        scale = shape.head_dim ** -0.5
        out = torch.empty_like(q)
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)  # noqa: E731
        for s in args.sparsities:
            if s == 0:
                hp = make_head_plan(["full"] * shape.heads, [0] * shape.heads, shape.heads, shape.seq_len)
            else:
                w = window_for_pair_sparsity(shape, s)
                mode = "arrow" if shape.n_text else "window"
                hp = make_head_plan([mode] * shape.heads, [w] * shape.heads, shape.heads, shape.seq_len)
            fn = lambda: headwise_triton(q, k, v, hp, lay, scale, out=out)  # noqa: E731
            row = {"shape": shape.name, "sparsity": s}
            for name, f in (("sdpa", sdpa), ("ditlens", fn)):
                row[f"{name}_do_bench"] = bench(f)
                row[f"{name}_events"] = events_ms(f)
                row[f"{name}_graph"] = triton.testing.do_bench_cudagraph(f, rep=100, return_mode="median")
            rows.append(row)
            print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
