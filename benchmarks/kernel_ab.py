"""A/B timing of the head-wise kernel: a git revision's ``ditlens/kernels/_triton_impl.py`` against the
working tree's, in one process, interleaved, with each launch's default config (what a user gets).

Separate runs of one kernel differ by ±3 % on the H200, more than most kernel changes gain; timing both
versions in the same process, alternating, is what tells a change from noise::

    python benchmarks/kernel_ab.py --before REV|FILE.py [--shapes FLUX-2K,PixArt-2K] [--plans mixed,sparse]
        [--sparsity 0.75] [--repeats 2] [--out FILE.json]

``--before`` takes a git revision, or the kernel file itself (``git show REV:ditlens/kernels/_triton_impl.py
> FILE.py`` where the checkout has no history, as on a machine that got a copy of the working tree).

Plans: ``dense`` (every head full), ``sparse`` (every head arrow where the shape has text tokens,
window otherwise, skipping ``--sparsity`` of all pairs) and ``mixed`` (heads in turn full, sparse,
skip). For each: both versions' times (``do_bench`` medians), the largest difference between their
outputs (0 when a change only reschedules work), and for ``mixed`` its time over its ideal (the
dense time of the working tree's kernel scaled by the attended-pair fraction). Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from small_shapes import SHAPES, arrow_window, band_window, mixed_modes  # noqa: E402

KERNEL_FILE = "ditlens/kernels/_triton_impl.py"


def kernel_at(revision: str, workdir: Path):
    """The kernel module as it was at ``revision`` (a git revision or a kernel file), imported from a copy:
    it shares nothing with ours."""
    if revision.endswith(".py") and Path(revision).is_file():
        source = Path(revision).read_text()
    else:
        source = subprocess.run(["git", "show", f"{revision}:{KERNEL_FILE}"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout
    path = workdir / f"kernel_{Path(revision).stem.replace('/', '_')}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="git revision (or .py file) of the kernel to compare against")
    parser.add_argument("--shapes", default="FLUX-2K,PixArt-2K", help=f"any of {', '.join(SHAPES)}")
    parser.add_argument("--plans", default="mixed,sparse", help="any of dense, sparse, mixed")
    parser.add_argument("--sparsity", type=float, default=0.75)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import triton
    from triton.testing import do_bench

    from ditlens.kernels import triton_backend
    from ditlens.kernels.patterns import HeadPlan, TokenLayout, head_attended_pairs

    workdir = Path(tempfile.mkdtemp(prefix="kernel_ab_"))
    versions = {"before": kernel_at(args.before, workdir), "after": triton_backend.kernel_module()}
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    bench = lambda fn: do_bench(fn, warmup=30, rep=150, return_mode="median")  # noqa: E731
    results = []
    for name in args.shapes.split(","):
        B, H, L, D, _, n_text = SHAPES[name]
        sparse = "arrow" if n_text else "window"
        w = arrow_window(L, n_text, args.sparsity) if n_text else band_window(L, args.sparsity)
        modes = {"dense": ("full",) * H, "sparse": (sparse,) * H,
                 "mixed": mixed_modes(H, sparse)}
        g = torch.Generator("cuda").manual_seed(0)
        q, k, v, cached = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, generator=g)
                           for _ in range(4))
        layout = TokenLayout(L, n_text, True)
        out = torch.empty_like(q)
        dense_ms = None
        for plan_name in args.plans.split(","):
            plan = HeadPlan(modes[plan_name], tuple(w if m == sparse else 0 for m in modes[plan_name]))
            times: dict[str, list[float]] = {"before": [], "after": []}
            outputs = {}
            for _ in range(args.repeats):
                for label, module in versions.items():
                    triton_backend.kernel_module = lambda module=module: module
                    fn = lambda: triton_backend.headwise_triton(q, k, v, plan, layout, D ** -0.5,  # noqa: E731
                                                                cached=cached, out=out)
                    fn()
                    outputs[label] = out.clone()
                    times[label].append(bench(fn))
            triton_backend.kernel_module = lambda: versions["after"]
            row = {"shape": name, "plan": plan_name, "w": w, "before_ms": times["before"],
                   "after_ms": times["after"],
                   "max_diff": (outputs["before"].float() - outputs["after"].float()).abs().max().item()}
            if plan_name == "dense":
                dense_ms = min(times["after"])
            if plan_name == "mixed":
                if dense_ms is None:
                    dense = HeadPlan(modes["dense"], (0,) * H)
                    dense_ms = bench(lambda: triton_backend.headwise_triton(q, k, v, dense, layout, D ** -0.5,
                                                                            out=out))
                pairs = sum(head_attended_pairs(m, w if m == sparse else 0, layout) for m in modes["mixed"])
                ideal = dense_ms * pairs / (H * L * L)
                row["ideal_ms"] = ideal
                row["before_over_ideal"] = min(times["before"]) / ideal
                row["after_over_ideal"] = min(times["after"]) / ideal
            results.append(row)
            extra = (f"  ÷ ideal {row['before_over_ideal']:.3f} -> {row['after_over_ideal']:.3f}"
                     if "ideal_ms" in row else "")
            print(f"{name:10s} {plan_name:7s} before " + " ".join(f"{t:.3f}" for t in times["before"])
                  + "  after " + " ".join(f"{t:.3f}" for t in times["after"])
                  + f" ms  max diff {row['max_diff']:.1e}{extra}", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "before": args.before,
                                        "rows": results}, indent=1))


if __name__ == "__main__":
    main()
