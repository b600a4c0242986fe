"""Throughput of the profiler's one-pass distance sums (``ditlens.kernels.pair_stats``).

One PixArt-Σ-XL 1024² forward under ``ditlens profile`` with the default statistics compares,
per self-attention layer, q, k, v and o (batch 2 = cond + uncond, 16 heads, 4096 tokens, head dim
72, strided per head as diffusers hands them to SDPA) three ways: cond with the previous step,
uncond with the previous step, cond with uncond. This times one launch over all of them and
reports the bytes read per second against the device's memory bandwidth.

    python benchmarks/pair_stats.py --device cuda
"""

from __future__ import annotations

import argparse

from _paths import benchmarks_last  # noqa: E402

benchmarks_last()  # benchmarks/kernels.py must not shadow the `kernels` package

import torch


def strided_heads(batch: int, tokens: int, heads: int, dim: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """[batch, heads, tokens, dim] with diffusers' layout: a transposed view of [batch, tokens, heads*dim]."""
    return torch.randn(batch, tokens, heads * dim, dtype=dtype, device=device).view(batch, tokens, heads, dim).transpose(1, 2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=72)
    args = parser.parse_args()

    import triton

    from ditlens.kernels.pair_stats import pair_sums_rows

    dtype = torch.bfloat16
    current = [strided_heads(2, args.tokens, args.heads, args.dim, dtype, args.device) for _ in range(4 * args.layers)]
    previous = [strided_heads(2, args.tokens, args.heads, args.dim, dtype, args.device) for _ in range(4 * args.layers)]
    xs, ys = [], []
    for now, before in zip(current, previous):
        xs += [(now, 0), (now, 1), (now, 0)]   # step cond, step uncond, cfg
        ys += [(before, 0), (before, 1), (now, 1)]
    read = 2 * len(xs) * args.heads * args.tokens * args.dim * 2
    print(f"{torch.cuda.get_device_name()}: {len(xs)} pairs of [{args.heads}, {args.tokens}, {args.dim}] bf16, "
          f"{read / 1e9:.2f} GB read per forward")
    # float32 reference sums of the first pair, to check every configuration
    x, y = xs[0][0][0].float(), ys[0][0][0].float()
    reference = torch.stack([(x - y).abs().sum((1, 2)), y.abs().sum((1, 2)), (x * y).sum((1, 2)),
                             (x * x).sum((1, 2)), (y * y).sum((1, 2))], dim=-1)
    print("| BLOCK_T | warps | 16-byte loads | ms per forward | GB/s | max rel. error |")
    print("| --- | --- | --- | --- | --- | --- |")
    for vectorize in (True, False):
        for block_t in (32, 64, 128):
            for warps in (4, 8):
                def run():
                    return pair_sums_rows(xs, ys, block_t=block_t, num_warps=warps, vectorize=vectorize)
                error = ((run()[0] - reference).abs() / reference.abs().clamp_min(1e-3)).max().item()
                ms = triton.testing.do_bench(run, warmup=25, rep=200)
                print(f"| {block_t} | {warps} | {'yes' if vectorize else 'no'} | {ms:.3f} | {read / ms / 1e6:.0f} | "
                      f"{error:.1e} |", flush=True)


if __name__ == "__main__":
    main()
