"""Time sampling of the embedded models on the CPU and write a markdown table.

    python -m training.bench_zoo_sampling --threads 2 --out training/records/cpu_sampling.md

tiny-dit: 8 images, default steps (20) and guidance (batched CFG: 16 rows per transformer call).
tiny-mmdit: 1 and 4 scenes, same defaults. Each row is the median of ``--repeats`` timed calls
after one warm-up call; the pipelines are loaded from package data in float32.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from ditlens.zoo import load_pipeline


def _time_call(call, repeats: int) -> list[float]:
    call()  # warm-up: first-call allocations and kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]

    rows = []
    dit = load_pipeline("tiny-dit")
    dit.set_progress_bar_config(disable=True)
    labels = [0, 1, 2, 3, 5, 7, 8, 9]
    times = _time_call(lambda: dit(class_labels=labels, generator=torch.Generator().manual_seed(0), output_type="np"),
                       args.repeats)
    rows.append(("tiny-dit", "8 images, 20 steps, CFG", times))

    mmdit = load_pipeline("tiny-mmdit")
    mmdit.set_progress_bar_config(disable=True)
    for count in (1, 4):
        prompts = ["a red sneaker top left and a blue bag bottom right"] * count
        times = _time_call(lambda: mmdit(prompt=prompts, generator=torch.Generator().manual_seed(0), output_type="np"),
                           args.repeats)
        rows.append(("tiny-mmdit", f"{count} scene(s), 20 steps, CFG", times))

    command = "python -m training.bench_zoo_sampling " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        f"Command: `{command.strip()}`  ",
        f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} threads, float32, median of {args.repeats} after a warm-up; "
        f"1-minute load average {load_before:.2f} before and {os.getloadavg()[0]:.2f} after (other work on the machine slows it)",
        "",
        "| model | work | median s | min s | max s |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for model, work, times in rows:
        lines.append(f"| {model} | {work} | {statistics.median(times):.2f} | {min(times):.2f} | {max(times):.2f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
