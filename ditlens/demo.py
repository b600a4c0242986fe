"""``ditlens demo``: the whole loop on an embedded model, in one command.

profile (with per-head influence) → analyze → search (V2 program solved from the trace, for an
attention-FLOPs budget; optionally V2 online at the same δ, for comparison) → validate (seeded
prompts with and without the plan) → export, then a short table of what the plan costs and saves
and the paths of everything written.

Classifier accuracy: for tiny-dit ``validate`` reports the class accuracy itself; for tiny-mmdit
the demo judges the captioned items of the validation scenes (class of each item in its
quadrant, the zoo's scene judge) on the images ``validate`` generated.
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
    online: dict[str, Any] | None = None  # V2 online at the trace's δ: plan path, fraction, seconds

    def table(self) -> str:
        m = self.metrics
        rows = [("attention-core FLOPs fraction", f"{m['attention_core_fraction']:.3f}"),
                ("attention-module FLOPs fraction", f"{m['attention_module_fraction']:.3f}"),
                ("PSNR vs uncompressed (dB)", f"{m['psnr']:.2f}"),
                ("SSIM vs uncompressed", f"{m['ssim']:.4f}")]
        if m.get("accuracy_full") is not None:
            rows.append((f"classifier accuracy, {m['accuracy_kind']} (full / plan)",
                         f"{m['accuracy_full']:.3f} / {m['accuracy_plan']:.3f}"))
        noise = f" ± {m['speedup_noise']:.2f}" if m.get("speedup_noise") is not None else ""
        rows.append(("end-to-end speedup (Amdahl bound)", f"{m['speedup']:.2f}x{noise} ({m['bound']:.2f}x)"))
        if self.online is not None:
            rows.append(("V2 online at the same δ: static FLOPs fraction",
                         f"{self.online['attention_core_fraction']:.3f} (search {self.online['seconds']:.1f} s)"))
        rows += [(f"time: {stage}", f"{seconds:.1f} s") for stage, seconds in self.seconds.items()]
        width = max(len(name) for name, _ in rows)
        lines = [f"{name:<{width}}  {value}" for name, value in rows]
        lines += ["", f"trace   {self.trace}", f"plan    {self.plan}", f"report  {self.report_md} ({self.report_json.name})",
                  f"grid    {self.grid}", f"deploy  {self.deploy}"]
        if self.online is not None:
            lines.append(f"online  {self.online['plan']}")
        return "\n".join(lines)


class _RecordingPipeline:
    """Forwards everything to the pipeline and keeps the images of each call, so the demo can
    judge tiny-mmdit's scenes on exactly the images ``validate`` made (no extra generation)."""

    def __init__(self, pipe: Any) -> None:
        object.__setattr__(self, "_pipe", pipe)
        object.__setattr__(self, "images", [])

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)

    def __call__(self, **kwargs: Any) -> Any:
        from ditlens.compress.validate import to_images

        output = self._pipe(**kwargs)
        self.images.append(to_images(output))
        return output


def _scene_accuracy(model: str, prompts: list[str], recorded: list, n: int) -> dict[str, Any]:
    """tiny-mmdit: fraction of captioned items classified as their class in their quadrant, for
    the uncompressed and the compressed images (validate runs: warm-up, n full, n with the plan)."""
    if model != "tiny-mmdit" or len(recorded) != 1 + 2 * n:
        return {}
    import numpy as np

    from ditlens.zoo import load_classifier
    from ditlens.zoo.data import caption_for, random_scene
    from ditlens.zoo.evaluate import judge_scenes

    rng = np.random.default_rng(0)  # default_prompts draws tiny-mmdit's scenes from this generator
    scenes = [random_scene(rng) for _ in range(n)]
    if [caption_for(s) for s in scenes] != list(prompts):
        return {}
    classifier = load_classifier()
    full = np.concatenate(recorded[1:1 + n])
    plan = np.concatenate(recorded[1 + n:])
    return {"accuracy_full": float(judge_scenes(full, scenes, classifier).class_correct.mean()),
            "accuracy_plan": float(judge_scenes(plan, scenes, classifier).class_correct.mean())}


def run_demo(model: str = "tiny-dit", out_dir: str | Path = "ditlens-demo", *, device: str = "cpu",
             target_flops: float = 0.5, n_profile: int = 2, n_validate: int = 6, steps: int = 20,
             latency: str = "measured", online: bool = False, log: Callable[[str], None] = print) -> DemoResult:
    """Run the loop on ``model`` (``tiny-dit`` or ``tiny-mmdit``), writing into ``out_dir``.

    ``online``: also run V2 on the model at the δ the trace solve chose (same programs, on the
    compressed trajectory) and save that plan beside the other, for comparison."""
    from ditlens.analyzer import ProfileConfig, analyze, profile
    from ditlens.compress.export import export_plan
    from ditlens.compress.search.api import search
    from ditlens.compress.validate import validate_pipeline
    from ditlens.models import default_prompts, embedded_models, load_pipeline

    if model not in embedded_models():
        known = ", ".join(embedded_models()) or "none installed"
        raise DitlensError(f"the demo runs on an embedded model ({known}), not {model!r}; pick one with --model")
    if not 0 < target_flops < 1:
        raise DitlensError(f"--target-flops {target_flops} must be a fraction between 0 and 1 (e.g. 0.5)")
    if n_profile < 1 or n_validate < 1 or steps < 2:
        raise DitlensError("the demo needs at least 1 profile prompt, 1 validation prompt and 2 steps")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise DitlensError(f"--device {device} but torch sees no CUDA device; use --device cpu")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DitlensError(f"cannot create the output folder {out} ({err.strerror}); pass another --out") from None
    seconds: dict[str, float] = {}
    n_stages = 6 if online else 5

    def stage(name: str) -> float:
        log(f"[{len(seconds) + 1}/{n_stages}] {name} ...")
        return time.perf_counter()

    t = stage(f"profile ({n_profile} prompts, {steps} steps: statistics and per-head influence)")
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

    t = stage(f"search (head-wise program from the trace, {latency} latencies, target {target_flops:.0%} "
              "attention FLOPs)")
    # Measured latencies (default): on a CPU, masked attention is no faster than dense, so the
    # program prefers the methods that really save time on this device (output caching).
    result = search(pipe, [], method="trace", trace=str(trace), target_flops=target_flops, steps=steps,
                    latency=latency, progress=False)
    plan_path = out / "plan.json"
    result.plan.save(plan_path)
    log(f"      δ={result.plan.provenance.delta:.4g}; {result.plan.provenance.notes}")
    seconds["search"] = time.perf_counter() - t

    online_info = None
    if online:
        t = stage(f"search online (V2 on the model, {n_profile} prompts, at the trace's δ)")
        online_result = search(pipe, prompts, method="v2", delta=result.plan.provenance.delta, steps=steps,
                               latency=latency, progress=True)
        online_path = out / "plan_online.json"
        online_result.plan.save(online_path)
        seconds["search online"] = time.perf_counter() - t
        online_info = {"plan": online_path, "seconds": seconds["search online"],
                       "attention_core_fraction": online_result.plan.flops.attention_core_fraction}

    t = stage(f"validate ({n_validate} seeded prompts with and without the plan)")
    report_dir = out / "report"
    validation_prompts = default_prompts(model, n_validate)
    recorder = _RecordingPipeline(pipe)
    validation = validate_pipeline(recorder, result.plan, validation_prompts, seed=1000,
                                   model_name=model, plan_name=str(plan_path), out_dir=report_dir)
    seconds["validate"] = time.perf_counter() - t

    t = stage("export")
    deploy = out / "deploy"
    export_plan(plan_path, deploy)
    seconds["export"] = time.perf_counter() - t

    d = validation.as_dict()
    accuracy = dict(validation.classifier or {})
    kind = "classes"
    if accuracy.get("accuracy_full") is None:
        accuracy = _scene_accuracy(model, validation_prompts, recorder.images, n_validate)
        kind = "captioned items"
    metrics = {"attention_core_fraction": validation.flops["attention_core_fraction"],
               "attention_module_fraction": validation.flops["attention_module_fraction"],
               "psnr": d["psnr_mean"], "ssim": d["ssim_mean"], "accuracy_kind": kind,
               "accuracy_full": accuracy.get("accuracy_full"), "accuracy_plan": accuracy.get("accuracy_plan"),
               "speedup": d["speedup"] or float("nan"), "speedup_noise": d["speedup_noise"], "bound": d["amdahl_bound"]}
    return DemoResult(model, out, trace, plan_path, report_dir / "validate.json", report_dir / "validate.md",
                      report_dir / "grid.png", deploy, seconds, metrics, online_info)


def cmd_demo(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    result = run_demo(args.model, args.out, device=args.device, target_flops=args.target_flops,
                      n_profile=args.profile_prompts, n_validate=args.validate_prompts, steps=args.steps,
                      latency=args.latency, online=args.online)
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
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--profile-prompts", type=int, default=2, help="calibration prompts profiled (default 2)")
    p.add_argument("--validate-prompts", type=int, default=6, help="seeded prompts validated (default 6)")
    p.add_argument("--latency", choices=("measured", "flops"), default="measured",
                   help="cost of each method in the program: timed on this device (default) or its FLOPs")
    p.add_argument("--online", action="store_true", help="also run V2 online at the trace's δ and save that plan")
    p.set_defaults(func=cmd_demo)
