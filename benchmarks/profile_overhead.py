"""Profiling overhead and trace size: wall time of ``ditlens profile`` (statistics, no raw capture)
divided by plain generation of the same prompts, and trace bytes per prompt.

    python benchmarks/profile_overhead.py --model tiny-dit                      # CPU, embedded model
    python benchmarks/profile_overhead.py --model pixart-sigma-xl --device cuda # H100, 1024², 20 steps, 4 prompts

Targets (issue 2): <= 1.3x plain generation and <= 100 MB per prompt. Per statistics variant,
plain and profiled runs alternate ``--repeats`` times and the best of each is compared.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

from _paths import benchmarks_last  # noqa: E402

benchmarks_last()  # benchmarks/kernels.py must not shadow the `kernels` package

import torch


def build(model: str, device: str):
    if model == "pixart-sigma-xl":
        from random_pipelines import pixart_sigma_xl

        pipe = pixart_sigma_xl(device=device)
        return pipe, ["a photo of a cat", "a red bus in the rain", "mountains at dawn", "a bowl of soup"], \
            {"height": 1024, "width": 1024, "guidance": 4.5}
    from ditlens.models import load_pipeline

    pipe = load_pipeline(model, device=device)
    prompts = (["0", "3", "7", "9"] if model == "tiny-dit" else
               ["a red sneaker top left and a blue bag bottom right", "a green dress top right",
                "a yellow shirt bottom left and a white boot top right", "a purple bag top left"])
    return pipe, prompts, {"guidance": None}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


VARIANTS = {
    # name: (metrics, tensors) passed to select_stat_keys
    "default": (None, None),  # l1, rel_l1, cosine of q, k, v, o; image and text; step and cfg
    "all+ssim": ("all", None),
    "o-l1": ("l1", "o"),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny-dit")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of VARIANTS")
    parser.add_argument("--out", default=None, help="append the result rows to this Markdown file")
    parser.add_argument("--torch-profile", type=int, default=0, metavar="N",
                        help="after timing, profile one prompt of each variant under torch.profiler and print the "
                             "N ops with the most device time and the N with the most host time")
    args = parser.parse_args()

    from ditlens.analyzer import ProfileConfig, profile
    from ditlens.analyzer.profiler import Profiler, select_stat_keys

    pipe, prompts, size = build(args.model, args.device)
    base = ProfileConfig(steps=args.steps, guidance=size["guidance"], height=size.get("height"),
                         width=size.get("width"), overwrite=True, attention_share=False)
    adapter = Profiler(pipe, base).adapter

    def plain() -> float:
        sync(args.device)
        t0 = time.perf_counter()
        for i, prompt in enumerate(prompts):
            gen = torch.Generator(device=torch.device(args.device).type).manual_seed(i)
            kwargs = adapter.call_kwargs(pipe, prompt, args.steps, base.guidance, base.height, base.width, gen)
            with torch.inference_mode():
                pipe(**kwargs)
        sync(args.device)
        return time.perf_counter() - t0

    device_name = (torch.cuda.get_device_name() if args.device.startswith("cuda")
                   else f"CPU ({torch.get_num_threads()} threads)")
    rows = []
    plain()  # warm-up (kernels, allocator)
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "bench.h5"
        for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
            metrics, tensors = VARIANTS[name]
            config = ProfileConfig(**{**base.__dict__, "stat_keys": select_stat_keys(metrics, tensors)})

            def profiled(subset: list[str]) -> float:
                sync(args.device)
                t0 = time.perf_counter()
                profile(pipe, subset, trace, config, progress=False, log=lambda s: None)
                sync(args.device)
                return time.perf_counter() - t0

            profiled(prompts[:1])  # warm-up
            # Plain and profiled runs alternate, best of each: a machine whose speed drifts (a shared
            # VM) then slows both sides alike instead of whichever ran later.
            t_plain, t_prof = float("inf"), float("inf")
            for _ in range(args.repeats):
                t_plain = min(t_plain, plain())
                t_prof = min(t_prof, profiled(prompts))
            size_per_prompt = trace.stat().st_size / len(prompts)
            rows.append(f"| {args.model} | {device_name} | {name} | {len(prompts)} | {args.steps} | {t_plain:.2f} s | "
                        f"{t_prof:.2f} s | {t_prof / t_plain:.2f}x | {size_per_prompt / 1e6:.2f} MB |")
            print(rows[-1], flush=True)
            if args.torch_profile:
                print_torch_profile(lambda: profiled(prompts[:1]), args.device, args.torch_profile, name)
    header = ("| model | device | statistics | prompts | steps | plain generation | profile | overhead | "
              "trace per prompt |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print(header)
    print("\n".join(rows))
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write("\n".join(rows) + "\n")


def print_torch_profile(run, device: str, top: int, name: str) -> None:
    """Where one profiled prompt spends device and host time (diagnosis, not a figure)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with torch_profile(activities=activities) as prof:
        run()
    averages = prof.key_averages()
    if device.startswith("cuda"):
        print(f"-- {name}: top {top} by device time")
        print(averages.table(sort_by="self_cuda_time_total", row_limit=top, max_name_column_width=60))
    print(f"-- {name}: top {top} by host self time")
    print(averages.table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=60))


if __name__ == "__main__":
    main()
