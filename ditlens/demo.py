"""``ditlens demo``: the whole loop on an embedded model, in one command.

profile (with per-head influence) → analyze → search (V2 program solved from the trace, for an
attention-FLOPs budget) → validate (seeded prompts with and without the plan) → export, then a
short table of what the plan costs and saves and the paths of everything written.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ditlens.errors import DitlensError


@dataclass
class DemoResult:
    model: str
    out_dir: Path
    trace: Path
    plan: Path
    report_json: Path
    report_md: Path
    grid: Path
    deploy: Path
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> wall seconds
    metrics: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        m = self.metrics
        rows = [("attention-core FLOPs fraction", f"{m['attention_core_fraction']:.3f}"),
                ("attention-module FLOPs fraction", f"{m['attention_module_fraction']:.3f}"),
                ("PSNR vs uncompressed (dB)", f"{m['psnr']:.2f}"),
                ("SSIM vs uncompressed", f"{m['ssim']:.4f}")]
        if m.get("accuracy_full") is not None:
            rows.append(("classifier accuracy (full / plan)", f"{m['accuracy_full']:.3f} / {m['accuracy_plan']:.3f}"))
        rows.append(("end-to-end speedup (Amdahl bound)", f"{m['speedup']:.2f}x ({m['bound']:.2f}x)"))
        rows += [(f"time: {stage}", f"{seconds:.1f} s") for stage, seconds in self.seconds.items()]
        width = max(len(name) for name, _ in rows)
        lines = [f"{name:<{width}}  {value}" for name, value in rows]
        lines += ["", f"trace   {self.trace}", f"plan    {self.plan}", f"report  {self.report_md} ({self.report_json.name})",
                  f"grid    {self.grid}", f"deploy  {self.deploy}"]
        return "\n".join(lines)


def run_demo(model: str = "tiny-dit", out_dir: str | Path = "ditlens-demo", *, device: str = "cpu",
             target_flops: float = 0.5, n_profile: int = 4, n_validate: int = 8, steps: int = 20,
             log: Callable[[str], None] = print) -> DemoResult:
    """Run the loop on ``model`` (``tiny-dit`` or ``tiny-mmdit``), writing into ``out_dir``."""
    from ditlens.analyzer import ProfileConfig, analyze, profile
    from ditlens.compress.export import export_plan
    from ditlens.compress.search.api import search
    from ditlens.compress.validate import validate_pipeline
    from ditlens.models import default_prompts, embedded_models, load_pipeline

    if model not in embedded_models():
        raise DitlensError(f"the demo runs on an embedded model ({', '.join(embedded_models())}), not {model!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    def stage(name: str):
        log(f"[{len(seconds) + 1}/5] {name} ...")
        return time.perf_counter()

    t = stage("profile (statistics and per-head influence)")
    pipe = load_pipeline(model, device=device)
    trace = out / f"{model}.h5"
    prompts = default_prompts(model, n_profile)
    profile(pipe, prompts, trace, ProfileConfig(steps=steps, overwrite=True, influence=True),
            progress=True, log=lambda s: log(f"      {s}"))
    seconds["profile"] = time.perf_counter() - t

    t = stage("analyze")
    report = analyze(trace, top=2)
    for line in report.render().splitlines()[1:4]:
        log(f"      {line}")
    seconds["analyze"] = time.perf_counter() - t

    t = stage(f"search (head-wise program from the trace, measured latencies, target {target_flops:.0%} "
              "attention FLOPs)")
    # Latencies measured on this device: on a CPU, masked attention is no faster than dense,
    # so the program prefers methods that really save time here (output caching).
    result = search(pipe, [], method="trace", trace=str(trace), target_flops=target_flops, steps=steps,
                    latency="measured", progress=False)
    plan_path = out / "plan.json"
    result.plan.save(plan_path)
    seconds["search"] = time.perf_counter() - t

    t = stage(f"validate ({n_validate} seeded prompts with and without the plan)")
    report_dir = out / "report"
    validation = validate_pipeline(pipe, result.plan, default_prompts(model, n_validate), seed=1000,
                                   model_name=model, plan_name=str(plan_path), out_dir=report_dir)
    seconds["validate"] = time.perf_counter() - t

    t = stage("export")
    deploy = out / "deploy"
    export_plan(plan_path, deploy)
    seconds["export"] = time.perf_counter() - t

    d = validation.as_dict()
    classifier = validation.classifier or {}
    metrics = {"attention_core_fraction": validation.flops["attention_core_fraction"],
               "attention_module_fraction": validation.flops["attention_module_fraction"],
               "psnr": d["psnr_mean"], "ssim": d["ssim_mean"],
               "accuracy_full": classifier.get("accuracy_full"), "accuracy_plan": classifier.get("accuracy_plan"),
               "speedup": d["speedup"] or float("nan"), "bound": d["amdahl_bound"]}
    return DemoResult(model, out, trace, plan_path, report_dir / "validate.json", report_dir / "validate.md",
                      report_dir / "grid.png", deploy, seconds, metrics)


def cmd_demo(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    result = run_demo(args.model, args.out, device=args.device, target_flops=args.target_flops)
    print()
    print(result.table())
    print(f"\ndemo finished in {time.perf_counter() - start:.1f} s; explore it with: "
          f"ditlens dash {result.trace} --plan {result.plan} --report {result.report_json.parent}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="the whole loop on an embedded model: profile, analyze, search, validate, export")
    p.add_argument("--model", default="tiny-dit", help="tiny-dit (default) or tiny-mmdit")
    p.add_argument("--out", default="ditlens-demo", help="folder for the trace, plan, report and export")
    p.add_argument("--device", default="cpu")
    p.add_argument("--target-flops", type=float, default=0.5, help="attention-core FLOPs fraction the plan aims at")
    p.set_defaults(func=cmd_demo)
