"""The Gluon launch's end-of-launch tail, modelled: grid order, full-first and longest-first tile orders.

One program per SM at a time (the launch's 229.7 KB of shared memory allows no second), programs handed out in
launch order to the SM that frees first (:func:`ditlens.kernels.waves.makespan`); a tile takes its key blocks
(:func:`ditlens.kernels.gluon_backend.tile_key_blocks`) times the dense per-block time plus a fixed cost
(Q load, filling the K/V ring, the epilogue). The defaults come from the H100's measurements: FLUX-2K dense
5.68 ms over 24 heads x 132 tiles x 132 blocks on 132 SMs is 1.77 µs a block, and a 3 µs fixed cost makes the
model give the measured 1.68 ms for the 75 % arrow launch in grid order (BENCHMARKS.md §2, "Session 36"). Plans as
in ``kernels.py``: every head arrow with 512 text tokens first at sparsity S, and the mixed plan (heads in turn
full, arrow at 75 %, skip). Beside each order's makespan, the mean number of heads among the programs in
flight (their K/V bands share L2 only within a head). Measured on the H100 against grid order
(``benchmarks/tile_order_ab.py``, BENCHMARKS.md §2, "Session 38"): longest first FLUX-2K 50 % 0.92x (modelled
1.01x, but 14 heads in flight against 2), 75 % 1.00x (modelled 1.08x); full-first 1.02x / 1.04x (modelled 1.00x /
1.08x, 4 / 5 heads), FLUX-2K 90 % 1.11x and FLUX-1K 75 % 1.19x (modelled 1.23x / 1.25x). No GPU needed::

    python benchmarks/gluon_tail_model.py [--block-us 1.77] [--fixed-us 3] [--sms 132]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ditlens.kernels.gluon_backend import BLOCK_M, TILE_ORDERS, _tile_order, tile_key_blocks  # noqa: E402
from ditlens.kernels.patterns import TokenLayout, make_head_plan  # noqa: E402
from ditlens.kernels.waves import makespan, program_starts  # noqa: E402

SHAPES = {"FLUX-2K": 16896, "FLUX-1K": 4608}  # 24 heads, 512 text tokens first
HEADS, N_TEXT = 24, 512


def heads_in_flight(times: list[float], heads: list[int], sms: int, samples: int = 400) -> float:
    """Mean number of distinct heads among the running programs (started as :func:`program_starts` has
    them), sampled at ``samples`` even times over the launch."""
    spans = [(s, s + t, h) for s, t, h in zip(program_starts(times, sms), times, heads)]
    end = max(e for _, e, _ in spans)
    points = [end * (i + 0.5) / samples for i in range(samples)]
    return sum(len({h for s, e, h in spans if s <= x < e}) for x in points) / samples


def model_rows(block_us: float, fixed_us: float, sms: int) -> list[dict]:
    from small_shapes import arrow_window, mixed_modes  # benchmarks/ is on sys.path: this script's folder

    rows = []
    for shape, L in SHAPES.items():
        layout, tiles = TokenLayout(L, N_TEXT, True), L // BLOCK_M
        for plan_name in ("arrow 25%", "arrow 50%", "arrow 75%", "arrow 90%", "mixed"):
            s = 0.75 if plan_name == "mixed" else int(plan_name.split()[1][:-1]) / 100
            w = arrow_window(L, N_TEXT, s)
            if w is None:  # the text pairs alone keep more than 1 - s
                continue
            modes = mixed_modes(HEADS, "arrow") if plan_name == "mixed" else ("arrow",) * HEADS
            plan = make_head_plan(modes, [w if m == "arrow" else 0 for m in modes], HEADS, L)
            time = [tile_key_blocks(plan.modes[p // tiles], plan.windows[p // tiles], (p % tiles) * BLOCK_M, layout)
                    * block_us + fixed_us for p in range(HEADS * tiles)]  # packed (b * heads + h) * tiles + m, b = 0
            row = {"shape": shape, "plan": plan_name, "w": w, "ideal_ms": sum(time) / sms / 1e3}
            for order in TILE_ORDERS:
                seq = _tile_order(plan, layout, 1, torch.device("cpu"), order).tolist()
                row[order] = (makespan([time[p] for p in seq], sms) / 1e3,
                              heads_in_flight([time[p] for p in seq], [p // tiles for p in seq], sms))
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block-us", type=float, default=1.77, help="µs per 128 x 128 key block (the dense rate)")
    ap.add_argument("--fixed-us", type=float, default=3.0, help="µs of fixed work per tile")
    ap.add_argument("--sms", type=int, default=132)
    args = ap.parse_args()
    print("| shape | plan | w | work / SMs ms | " + " | ".join(f"{o} ms (heads in flight)" for o in TILE_ORDERS)
          + " | " + " | ".join(f"{o} gain" for o in TILE_ORDERS[1:]) + " |")
    print("| --- | --- | ---: | ---: | " + " | ".join("---:" for _ in TILE_ORDERS) + " | "
          + " | ".join("---:" for _ in TILE_ORDERS[1:]) + " |")
    for r in model_rows(args.block_us, args.fixed_us, args.sms):
        print(f"| {r['shape']} | {r['plan']} | {r['w']} | {r['ideal_ms']:.3f} | "
              + " | ".join(f"{r[o][0]:.3f} ({r[o][1]:.1f})" for o in TILE_ORDERS) + " | "
              + " | ".join(f"{r['grid'][0] / r[o][0]:.2f}x" for o in TILE_ORDERS[1:]) + " |")


if __name__ == "__main__":
    main()
