"""The Gluon launch's tile orders against each other, in interleaved rounds on one GPU.

Each plan of ``kernels.py`` (FLUX shapes: every head arrow at 25 / 50 / 75 / 90 %, and the mixed plan) runs in
every order ``headwise_gluon`` knows (``grid``, ``full-first``, ``longest``; ``gluon_backend._tile_order``), with
dense SDPA beside them. A round times every arm once (``do_bench`` median), in an order rotated from round
to round, so that drift of the card's clock between arms cancels in each round's ratios; the table gives each
arm's median time, its speedup over SDPA and over grid order (median of the rounds' ratios, with their range).
The outputs of every order are checked bit-identical first::

    python benchmarks/tile_order_ab.py --out DIR [--shapes FLUX-2K FLUX-1K] [--rounds 7]

Needs an sm_90 GPU and Triton >= 3.6 (Gluon).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import SHAPES, interleaved_rounds, make_inputs, make_plans  # noqa: E402

from ditlens.kernels.gluon_backend import TILE_ORDERS, check_gluon_inputs, headwise_gluon  # noqa: E402
from ditlens.kernels.patterns import make_head_plan  # noqa: E402


def time_plan(shape, plan, rounds: int, q, k, v, cached) -> dict:
    lay = shape.layout()
    hp = make_head_plan(plan.modes, plan.windows, shape.heads, shape.seq_len)
    scale = shape.head_dim ** -0.5
    outs = {o: headwise_gluon(q, k, v, hp, lay, scale, cached=cached, tile_order=o) for o in TILE_ORDERS}
    identical = all(torch.equal(outs["grid"], outs[o]) for o in TILE_ORDERS)
    arms = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v)}
    for o in TILE_ORDERS:
        arms[o] = lambda o=o: headwise_gluon(q, k, v, hp, lay, scale, cached=cached, tile_order=o)
    times = interleaved_rounds(arms, rounds)
    row = {"shape": shape.name, "plan": plan.label, "identical": identical, "times_ms": times}
    for o in TILE_ORDERS:
        row[o] = {"ms": statistics.median(times[o]),
                  "x_sdpa": statistics.median(s / t for s, t in zip(times["sdpa"], times[o])),
                  "x_grid": [statistics.median(g / t for g, t in zip(times["grid"], times[o])),
                             min(g / t for g, t in zip(times["grid"], times[o])),
                             max(g / t for g, t in zip(times["grid"], times[o]))]}
    row["sdpa_ms"] = statistics.median(times["sdpa"])
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", nargs="+", default=["FLUX-2K", "FLUX-1K"])
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for shape in (s for s in SHAPES if s.name in args.shapes):
        q, k, v, cached = make_inputs(shape)
        for plan in make_plans(shape):
            hp = make_head_plan(plan.modes, plan.windows, shape.heads, shape.seq_len)
            if hp.all_full or check_gluon_inputs(q, hp, shape.layout()) is not None:
                continue  # one order only, or not a Gluon launch
            row = time_plan(shape, plan, args.rounds, q, k, v, cached)
            rows.append(row)
            print(f"{shape.name:8s} {plan.label:34s} sdpa {row['sdpa_ms']:.3f} " + "  ".join(
                f"{o} {row[o]['ms']:.3f} ms x{row[o]['x_sdpa']:.2f} ({row[o]['x_grid'][0]:.3f} of grid)"
                for o in TILE_ORDERS) + ("" if row["identical"] else "  OUTPUTS DIFFER"), flush=True)
    lines = ["| shape | plan | SDPA ms | " + " | ".join(f"{o} ms (x SDPA)" for o in TILE_ORDERS) + " | "
             + " | ".join(f"{o} / grid (range)" for o in TILE_ORDERS[1:]) + " | bit-identical |",
             "| --- | --- | ---: | " + " | ".join("---:" for _ in TILE_ORDERS) + " | "
             + " | ".join("---:" for _ in TILE_ORDERS[1:]) + " | --- |"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['plan']} | {r['sdpa_ms']:.3f} | "
                     + " | ".join(f"{r[o]['ms']:.3f} ({r[o]['x_sdpa']:.2f})" for o in TILE_ORDERS) + " | "
                     + " | ".join(f"{r[o]['x_grid'][0]:.3f} ({r[o]['x_grid'][1]:.3f}-{r[o]['x_grid'][2]:.3f})"
                                  for o in TILE_ORDERS[1:]) + f" | {'yes' if r['identical'] else 'NO'} |")
    (out / "tile_order_ab.md").write_text("\n".join(lines) + "\n")
    (out / "tile_order_ab.json").write_text(json.dumps({"rounds": args.rounds, "rows": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
