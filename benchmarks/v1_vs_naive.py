"""V1 greedy search (Alg. 1) against the naive implementation that reruns the whole transformer on
every calibration prompt for every trial: wall time, transformer blocks run, forwards, trials.
All three variants must choose the same plan; the script checks it.

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
    from ditlens.models import load_pipeline

    pipe = load_pipeline(args.model, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    prompts = ([str(i % 10) for i in range(args.prompts)] if args.model == "tiny-dit" else
               [f"a red sneaker top left and a blue bag bottom right {i}" for i in range(args.prompts)])
    engine = EngineConfig(steps=args.steps, micro_batch=args.micro_batch, progress=False)
    variants = {"V1 (block reuse + early rejection)": GreedyConfig(delta=args.delta, engine=engine),
                "V1, block reuse only": GreedyConfig(delta=args.delta, early_reject=False, engine=engine),
                "naive, every candidate (the DiTFastAttn authors' loop)": GreedyConfig(
                    delta=args.delta, naive=True, every_candidate=True, engine=engine),
                "naive (whole model, every prompt, every trial)": GreedyConfig(delta=args.delta, naive=True,
                                                                               engine=engine)}
    rows, plans = [], []
    for name, config in variants.items():
        t0 = time.perf_counter()
        result = search_greedy(pipe, prompts, config)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        plans.append(result.plan.methods)
        notes = dict(part.split("=", 1) for part in result.plan.provenance.notes.split("; ") if "=" in part)
        rows.append((name, seconds, result.block_runs, result.forward_passes, notes.get("trials"),
                     notes.get("rejected_early", "0")))
    assert all(p == plans[0] for p in plans), "the variants chose different plans"
    naive_s, naive_blocks = rows[-1][1], rows[-1][2]
    authors_s = rows[-2][1]
    print(f"{args.model}, {args.prompts} prompts, {args.steps} steps, micro-batch {args.micro_batch}, δ={args.delta:g}, "
          f"{args.device}; same plan from every variant")
    print("| search | seconds | ÷ naive | ÷ authors' loop | blocks run | ÷ naive | forwards | trials | rejected early |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, seconds, blocks, forwards, trials, early in rows:
        print(f"| {name} | {seconds:.1f} | {seconds / naive_s:.2f} | {seconds / authors_s:.2f} | {blocks} | "
              f"{blocks / naive_blocks:.2f} | {forwards} | {trials} | {early} |")

if __name__ == "__main__":
    main()
