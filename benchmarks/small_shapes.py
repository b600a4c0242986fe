"""GPU time of the head-wise kernels at the short sequences where DiT-XL 512² and PixArt 1024² run,
per tile config: what a plan costs there once CUDA graphs remove the host (the e2e rows under
graphs). Each variant is timed with ``triton.testing.do_bench_cudagraph`` (launches replayed from
a graph: kernel time only), bf16, against SDPA in the same run.

    python benchmarks/small_shapes.py --out DIR        # writes small_shapes.json and prints a table

Variants: dense; ``window(w)`` on every head; the WA-RS apply step ``W + R`` (residual added in the
epilogue); the WA-RS refresh's extra launch ``R = O - W`` (subtracting from a given ``O``, which
the model's SDPA computed); the one-pass refresh that computes ``O`` and ``R`` together.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {"DiT-512": (2, 16, 1024, 72, 64), "PixArt-1K": (2, 16, 4096, 72, 256)}  # B, H, L, D, e2e window w
CONFIGS = [(128, 64, 4, 3), (64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 2), (128, 32, 4, 3), (32, 32, 2, 2)]


def _parse_config(text: str) -> tuple[int, int, int, int]:
    """``"128x64/8w/3s"`` -> (128, 64, 8, 3)."""
    tiles, warps, stages = text.strip().split("/")
    bm, bn = tiles.split("x")
    return int(bm), int(bn), int(warps.rstrip("w")), int(stages.rstrip("s"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--configs", default=None,
                        help="tile configs to time, e.g. 128x64/8w/3s,64x64/4w/2s (default: the built-in list)")
    args = parser.parse_args()
    configs = CONFIGS if args.configs is None else [_parse_config(c) for c in args.configs.split(",")]
    from triton.testing import do_bench_cudagraph

    from ditlens.kernels.patterns import HeadPlan, TokenLayout
    from ditlens.kernels.triton_backend import KernelConfig, headwise_triton, warsr_triton

    def bench(fn) -> float:
        fn()
        return float(do_bench_cudagraph(fn, rep=50, return_mode="median")) * 1e3  # µs

    rows = []
    for name, (B, H, L, D, w) in SHAPES.items():
        g = torch.Generator("cuda").manual_seed(0)
        q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
        residual = torch.randn_like(q)
        layout = TokenLayout(L, 0, False)
        dense = HeadPlan(("full",) * H, (0,) * H)
        window = HeadPlan(("window",) * H, (w,) * H)
        scale = D ** -0.5
        sdpa = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
        print(f"{name}: SDPA {sdpa:.1f} µs", flush=True)
        for bm, bn, warps, stages in configs:
            cfg = KernelConfig(bm, bn, warps, stages)
            out, r_out = torch.empty_like(q), torch.empty_like(q)
            times = {
                "dense": bench(lambda: headwise_triton(q, k, v, dense, layout, scale, config=cfg, out=out)),
                "window": bench(lambda: headwise_triton(q, k, v, window, layout, scale, config=cfg, out=out)),
                "W+R": bench(lambda: headwise_triton(q, k, v, window, layout, scale, residual=residual, config=cfg,
                                                     out=out)),
                "R=O-W": bench(lambda: headwise_triton(q, k, v, window, layout, scale, residual=residual, config=cfg,
                                                       out=out, subtract=True)),
                "O,R fused": bench(lambda: warsr_triton(q, k, v, window, layout, scale, config=cfg, out=out,
                                                        residual_out=r_out)),
            }
            rows.append({"shape": name, "w": w, "config": f"{bm}x{bn}/{warps}w/{stages}s", "sdpa_us": sdpa,
                         **{f"{key}_us": t for key, t in times.items()}})
            print(f"  {rows[-1]['config']:<14} " + "  ".join(f"{key} {t:6.1f}" for key, t in times.items()), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "small_shapes.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows},
                                                           indent=1))
    print("| shape | config | SDPA µs | dense µs | window(w) µs | W + R µs | R = O - W µs | refresh: SDPA, then "
          "R = O - W µs | refresh: O and R in one pass µs |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['shape']} (w={r['w']}) | {r['config']} | {r['sdpa_us']:.1f} | {r['dense_us']:.1f} | "
              f"{r['window_us']:.1f} | {r['W+R_us']:.1f} | {r['R=O-W_us']:.1f} | "
              f"{r['sdpa_us'] + r['R=O-W_us']:.1f} | {r['O,R fused_us']:.1f} |")


if __name__ == "__main__":
    main()
