"""What ``lower_for_device`` does to each of benchmarks/e2e.py's V1 plans of one model, without
timing the plans: per plan, the segments run dense, the in-model ratio and what the paying segments
would save of a call's GPU time (the ``min_gain`` rule).

    python benchmarks/lowering_report.py --model pixart-sigma-xl-1024
"""

from __future__ import annotations

import argparse

import torch

from _paths import benchmarks_last  # noqa: E402

benchmarks_last()  # benchmarks/kernels.py must not shadow the `kernels` package


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="pixart-sigma-xl-1024")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--min-gain", type=float, default=0.03)
    args = parser.parse_args()
    from e2e import _fraction, run_planned, v1_plan
    from random_pipelines import e2e_model

    from ditlens.compress.lowering import lower_for_device

    model = e2e_model(args.model, "cuda", torch.bfloat16)
    kwargs = dict(model.call_kwargs, num_inference_steps=args.steps, output_type="latent")
    if not args.model.startswith("dit"):
        kwargs.update(height=model.height, width=model.width)
    launches = None
    for mix in (False, True):
        for fraction in model.fractions:
            plan, label = v1_plan(model, args.steps, fraction, mix)
            if launches is None:
                run_planned(model, kwargs, plan, "two-pass")  # compile the kernels outside the profile
            low = lower_for_device(plan, "cuda", torch.bfloat16, graphs=True, launches=launches,
                                   run=lambda p: run_planned(model, kwargs, p, "two-pass"), min_gain=args.min_gain)
            launches = launches or low.in_model
            saving = f"{low.saving_s * 1e3:.2f} ms" if low.saving_s is not None else "?"
            call = f"{launches.call_s * 1e3:.1f} ms" if launches is not None else "?"
            print(f"{label} at {_fraction(plan):.1%} -> {_fraction(low.plan):.1%}: paying segments save {saving} of "
                  f"{call} GPU per call; {low.summary()}", flush=True)


if __name__ == "__main__":
    main()
