"""Wall time of the offline V2 solve (``ditlens search --trace``) at PixArt-Σ-XL 1024² size, on the CPU.

    python benchmarks/solver_timing.py            # 8 prompts x 2 branches x 20 steps x 56 layers x 16 heads

The from-trace search runs no model: it reads ``/influence/rse`` and solves one HiGHS MILP per
(step, layer). This times exactly that solve (``solve_from_influence``) on influence arrays of the
PixArt-Σ-XL shape, for one δ and for budget mode's bisection over δ, with the PixArt-Σ-XL
fingerprint (built on the meta device: no weights) giving the FLOPs latency model. The values are
random (uniform), so the plans mean nothing; the HiGHS work per program is what is measured.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from _paths import benchmarks_last  # noqa: E402

benchmarks_last()  # benchmarks/kernels.py must not shadow the `kernels` package


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    from random_pipelines import e2e_model

    from ditlens.analyzer.adapters import default_registry
    from ditlens.compress.plan import model_fingerprint
    from ditlens.compress.search.common import default_candidates
    from ditlens.compress.search.from_trace import solve_from_influence
    from ditlens.compress.search.latency import build_latency

    model = e2e_model("pixart-sigma-xl-1024", device="meta", dtype=torch.bfloat16)
    t = model.pipe.transformer
    adapter = default_registry().find(t)
    fp = model_fingerprint(t, adapter, grid=(1, 64, 64), n_text=300)
    candidates = default_candidates(64 * 64, joint=False, asc=True)
    rng = np.random.default_rng(0)
    shape = (args.prompts, 2, args.steps, len(fp.layers), fp.heads, len(candidates))
    influence = rng.uniform(0, 0.02, shape).astype(np.float32)
    influence[:, :, 0, :, :, 0] = np.nan  # no output cache at step 0
    lat = build_latency("flops", list(fp.layers), candidates, (1, 64, 64), 300, fp.heads, fp.head_dim, 2)
    t0 = time.perf_counter()
    solve_from_influence(influence, candidates, ["cond", "uncond"], lat, fp.heads, 0.1, 1.5, one_step_ast=True)
    one = time.perf_counter() - t0
    t0 = time.perf_counter()
    for delta in np.geomspace(1e-3, 1.0, 11):  # what budget mode's bisection costs at most
        solve_from_influence(influence, candidates, ["cond", "uncond"], lat, fp.heads, float(delta), 1.5,
                             one_step_ast=True)
    eleven = time.perf_counter() - t0
    print(f"| PixArt-Σ-XL 1024² ({args.prompts} prompts x 2 branches x {args.steps} steps x {len(fp.layers)} layers x "
          f"{fp.heads} heads x {len(candidates)} candidates) | {platform.processor() or 'CPU'}, "
          f"{torch.get_num_threads()} threads | one δ: {one:.2f} s | 11 δ (budget mode): {eleven:.2f} s |")


if __name__ == "__main__":
    main()
