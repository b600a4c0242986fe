"""window2d (2D neighbourhood attention) kernel vs SDPA, FlexAttention with the same mask, and the 1D window.

For each shape and target sparsity the radius ``r`` is the one whose square neighbourhoods keep the
fraction closest to ``1 - s`` of all L^2 query-key pairs (text-text pairs included, exact counts from
``window2d_pairs``), so the ideal speedup over dense SDPA is L^2 / pairs. Times are medians of
``triton.testing.do_bench`` (bf16, forward); every launch is checked against float32 masked attention
on sampled query rows of head 0. The 1D window (``headwise_attention`` mode window / arrow) at the
same pair count is timed beside it: the same work, tiled along the flattened sequence.

Usage (repo root, CUDA): ``python benchmarks/window2d.py --out DIR [--shapes PixArt-1K,...]
[--sparsities 0.5,0.75,0.9] [--configs 16x8/8x8/4w/2s,8x8/8x16/4w/2s]``. Writes ``window2d.md``
and ``window2d.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from ditlens.kernels import TokenLayout, attended_pairs  # noqa: E402
from kernels import bench  # noqa: E402  (benchmarks/kernels.py: do_bench median, as its tables)
from ditlens.kernels.patterns import make_head_plan  # noqa: E402
from ditlens.kernels.triton_backend import headwise_triton  # noqa: E402
from ditlens.kernels.window2d import (  # noqa: E402
    Window2dConfig,
    flex_window2d_block_mask,
    default_window2d_config,
    window2d_pairs,
    window2d_pattern,
    window2d_triton,
)


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    heads: int
    rows: int
    cols: int
    n_text: int
    text_first: bool
    head_dim: int

    @property
    def seq_len(self) -> int:
        return self.rows * self.cols + self.n_text

    def layout(self) -> TokenLayout:
        return TokenLayout(self.seq_len, self.n_text, self.text_first)


SHAPES = {s.name: s for s in [
    Shape("DiT-512", 2, 16, 32, 32, 0, False, 72),
    Shape("PixArt-1K", 2, 16, 64, 64, 0, False, 72),
    Shape("PixArt-2K", 2, 16, 128, 128, 0, False, 72),
    Shape("FLUX-1K", 1, 24, 64, 64, 512, True, 128),
    Shape("FLUX-2K", 1, 24, 128, 128, 512, True, 128),
]}


def radius_for_sparsity(shape: Shape, sparsity: float) -> int:
    """The radius whose pair count is closest to (1 - sparsity) L^2."""
    target = (1 - sparsity) * shape.seq_len ** 2
    grid = (1, shape.rows, shape.cols)
    return min(range(max(shape.rows, shape.cols)),
               key=lambda r: abs(window2d_pairs(r, grid, shape.n_text) - target))


def window_for_pairs(shape: Shape, pairs: int) -> int:
    """The smallest 1D window half-width (same text rule as window2d: text attends text) whose pair
    count reaches ``pairs``."""
    lo, hi = 0, shape.rows * shape.cols
    while lo < hi:  # pair counts grow with w
        mid = (lo + hi) // 2
        if attended_pairs("window", mid, shape.seq_len, n_text=shape.n_text, text_first=shape.text_first,
                          n_heads=1)[0] < pairs:
            lo = mid + 1
        else:
            hi = mid
    return lo


def parse_config(text: str) -> Window2dConfig:
    """``QRxQC/KRxKC/Nw/Ss[/tma]``, e.g. ``16x8/8x8/4w/2s`` or ``8x8/8x16/4w/2s/tma``."""
    q, k, w, s, *rest = text.split("/")
    qr, qc = (int(x) for x in q.split("x"))
    kr, kc = (int(x) for x in k.split("x"))
    return Window2dConfig(qr, qc, kr, kc, int(w.rstrip("w")), int(s.rstrip("s")), tma=rest == ["tma"])


def label(c: Window2dConfig) -> str:
    return f"{c.q_rows}x{c.q_cols}/{c.k_rows}x{c.k_cols}/{c.num_warps}w/{c.num_stages}s" + ("/tma" if c.tma else "")


def sampled_error(out, q, k, v, radius: int, shape: Shape, n_rows: int = 512) -> float:
    """Relative error of head 0, batch 0, on sampled query rows (first and last 128 included)."""
    L = shape.seq_len
    dev = q.device
    rows = torch.unique(torch.cat([torch.linspace(0, L - 1, n_rows, device=dev).long(),
                                   torch.arange(min(128, L), device=dev), torch.arange(max(L - 128, 0), L, device=dev)]))
    mask = window2d_pattern(rows[:, None], torch.arange(L, device=dev)[None, :], radius,
                            (1, shape.rows, shape.cols), shape.layout())
    scores = (q[0, 0, rows].float() @ k[0, 0].float().T) * shape.head_dim ** -0.5
    ref = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v[0, 0].float()
    return ((out[0, 0, rows].float() - ref).norm() / ref.norm()).item()


def run_shape(shape: Shape, sparsities: list[float], configs: list[Window2dConfig | None]) -> list[dict]:
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    g = torch.Generator(device="cuda").manual_seed(0)
    size = (shape.batch, shape.heads, shape.seq_len, shape.head_dim)
    q, k, v = (torch.randn(size, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    scale = shape.head_dim ** -0.5
    layout = shape.layout()
    grid = (1, shape.rows, shape.cols)
    sdpa = bench(lambda: F.scaled_dot_product_attention(q, k, v))
    rows = []
    for s in sparsities:
        r = radius_for_sparsity(shape, s)
        pairs = window2d_pairs(r, grid, shape.n_text)
        radii = (r,) * shape.heads
        row = dict(shape=shape.name, sparsity=s, radius=r, kept=pairs / shape.seq_len ** 2, sdpa_ms=sdpa,
                   ideal=shape.seq_len ** 2 / pairs, configs={})
        for cfg in configs:
            used = cfg or default_window2d_config(False, shape.rows * shape.cols)
            out = window2d_triton(q, k, v, radii, grid, layout, scale, used)
            err = sampled_error(out, q, k, v, r, shape)
            ms = bench(lambda: window2d_triton(q, k, v, radii, grid, layout, scale, used))
            row["configs"][label(used) + (" (default)" if cfg is None else "")] = dict(ms=ms, err=err)
        mask = flex_window2d_block_mask(radii, grid, layout, "cuda")
        row["flex_ms"] = bench(lambda: flex(q, k, v, block_mask=mask, scale=scale))
        w = window_for_pairs(shape, pairs)
        plan = make_head_plan("window", w, shape.heads, shape.seq_len)
        row["window1d"] = dict(w=w, ms=bench(lambda: headwise_triton(q, k, v, plan, layout, scale)))
        best = min(c["ms"] for c in row["configs"].values())
        row["best_ms"] = best
        rows.append(row)
        print(f"{shape.name} {s:.0%} r={r}: sdpa {sdpa:.3f} ms, window2d {best:.3f} ms "
              f"({sdpa / best:.2f}x, ideal {row['ideal']:.2f}x), flex {row['flex_ms']:.3f} ms, "
              f"1D window {row['window1d']['ms']:.3f} ms", flush=True)
    return rows


def write_report(out_dir: str, rows: list[dict], command: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    device = torch.cuda.get_device_name()
    lines = [f"`{command}`", "", f"{device}, torch {torch.__version__}, {platform.python_version()}; bf16, "
             "median of do_bench; speedups over dense SDPA; err = sampled-row relative error.", "",
             "| shape | sparsity | r | ideal | window2d ms (×SDPA) | of ideal | Flex ms (×SDPA) | 1D window ms | err | "
             "per config ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        sd = row["sdpa_ms"]
        cfgs = ", ".join(f"{name} {c['ms']:.3f}" for name, c in row["configs"].items())
        err = max(c["err"] for c in row["configs"].values())
        lines.append(f"| {row['shape']} | {row['sparsity']:.0%} ({1 - row['kept']:.1%}) | {row['radius']} | "
                     f"{row['ideal']:.2f} | {row['best_ms']:.3f} ({sd / row['best_ms']:.2f}) | "
                     f"{sd / row['best_ms'] / row['ideal']:.2f} | {row['flex_ms']:.3f} ({sd / row['flex_ms']:.2f}) | "
                     f"{row['window1d']['ms']:.3f} | {err:.1e} | {cfgs} |")
    with open(os.path.join(out_dir, "window2d.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    with open(os.path.join(out_dir, "window2d.json"), "w") as fh:
        json.dump(dict(device=device, command=command, rows=rows), fh, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--sparsities", default="0.5,0.75,0.9")
    ap.add_argument("--configs", default="", help="extra tile configs QRxQC/KRxKC/Nw/Ss, comma separated")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: benchmarks/window2d.py times CUDA kernels; run it on a machine with a GPU")
    configs: list[Window2dConfig | None] = [None] + [parse_config(c) for c in args.configs.split(",") if c]
    rows = []
    for name in tqdm(args.shapes.split(","), desc="shapes"):
        if name not in SHAPES:
            sys.exit(f"error: unknown shape {name!r}; use some of {', '.join(SHAPES)}")
        rows += run_shape(SHAPES[name], [float(x) for x in args.sparsities.split(",")], configs)
    write_report(args.out, rows, "python benchmarks/window2d.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
