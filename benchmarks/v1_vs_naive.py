"""V1 greedy search (Alg. 1) against the naive implementation that reruns the whole transformer on
every calibration prompt for every trial: wall time, transformer blocks run, forwards, trials.
Every variant must choose the same plan; the script checks it.

Two more rows bound what any exact implementation could reach (``greedy_floor``, computed from the
loss terms the block-reuse-only variant recorded for every row of every trial): the uncompressed
output of each step, plus the oracle's trial work, with a micro-batch forward or a batch row as the
unit.

    python benchmarks/v1_vs_naive.py --model tiny-dit --prompts 8 --steps 20 --micro-batch 1
"""

from __future__ import annotations

import argparse
import time

from _paths import benchmarks_last  # noqa: E402

benchmarks_last()  # benchmarks/kernels.py must not shadow the `kernels` package

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-dit")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--delta", type=float, default=0.05)
    args = parser.parse_args()

    from ditlens.compress.search.engine import EngineConfig
    from ditlens.compress.search.greedy import GreedyConfig, search_greedy
    from ditlens.compress.search.greedy_floor import exact_search_floor
    from ditlens.models import load_pipeline

    pipe = load_pipeline(args.model, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    prompts = ([str(i % 10) for i in range(args.prompts)] if args.model == "tiny-dit" else
               [f"a red sneaker top left and a blue bag bottom right {i}" for i in range(args.prompts)])
    engine = EngineConfig(steps=args.steps, micro_batch=args.micro_batch, progress=False)
    variants = {"V1 (block reuse + early rejection + row split)": GreedyConfig(delta=args.delta, engine=engine),
                "V1 without the row split": GreedyConfig(delta=args.delta, row_split=False, engine=engine),
                "V1, block reuse only": GreedyConfig(delta=args.delta, early_reject=False, row_split=False,
                                                     engine=engine),
                "naive, every candidate (the DiTFastAttn authors' loop)": GreedyConfig(
                    delta=args.delta, naive=True, every_candidate=True, engine=engine),
                "naive (whole model, every prompt, every trial)": GreedyConfig(delta=args.delta, naive=True,
                                                                               engine=engine)}
    rows, plans, floor, baseline_blocks = [], [], None, 0
    for name, config in variants.items():
        t0 = time.perf_counter()
        result = search_greedy(pipe, prompts, config)
        if not config.early_reject and not config.naive and not config.row_split:
            floor = exact_search_floor(result.trial_passes, args.delta, result.plan.n_layers)
            baseline_blocks = result.baseline_block_runs
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        plans.append(result.plan.methods)
        notes = dict(part.split("=", 1) for part in result.plan.provenance.notes.split("; ") if "=" in part)
        rows.append((name, seconds, result.block_runs, result.block_work, result.forward_passes, notes.get("trials"),
                     notes.get("rejected_early", "0")))
    assert all(p == plans[0] for p in plans), "the variants chose different plans"
    naive_s, naive_work = rows[-1][1], rows[-1][3]
    authors_s, authors_work = rows[-2][1], rows[-2][3]
    print(f"{args.model}, {args.prompts} prompts, {args.steps} steps, micro-batch {args.micro_batch}, δ={args.delta:g}, "
          f"{args.device}; same plan from every variant")
    print("block work: block runs, each weighted by the share of its micro-batch's rows it ran (row split)")
    print("| search | seconds | ÷ naive | ÷ authors' loop | blocks run | block work | ÷ naive | ÷ authors' loop | "
          "forwards | trials | rejected early |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, seconds, blocks, work, forwards, trials, early in rows:
        print(f"| {name} | {seconds:.1f} | {seconds / naive_s:.2f} | {seconds / authors_s:.2f} | {blocks} | {work:.0f} | "
              f"{work / naive_work:.2f} | {work / authors_work:.2f} | {forwards} | {trials} | {early} |")
    assert floor is not None
    for name, work in (("oracle exact search, a micro-batch forward as the unit", floor.prompt),
                       ("oracle exact search, a batch row as the unit (known cond rows free)", floor.row)):
        work += baseline_blocks
        print(f"| {name} | — | — | — | — | {work:.0f} | {work / naive_work:.2f} | {work / authors_work:.2f} | — | "
              f"{floor.trials} | — |")
    print(f"uncompressed output of every step: {baseline_blocks} block runs; trials of the block-reuse-only "
          f"variant: {floor.recorded:.0f} block runs (oracle {floor.prompt:.0f} / {floor.row:.0f}; row unit with no "
          f"row known: {floor.row_all_unknown:.0f})")
    import numpy as np

    ratios = np.array(floor.failing_loss_ratios)
    if len(ratios):
        print(f"failing trials: {len(ratios)}, loss / threshold quantiles 10/25/50/75/90 %: "
              f"{', '.join(f'{q:.2f}' for q in np.quantile(ratios, [0.1, 0.25, 0.5, 0.75, 0.9]))}; the row oracle "
              f"runs {floor.failing_row_fraction:.0%} of their unknown rows before rejecting them")

if __name__ == "__main__":
    main()
