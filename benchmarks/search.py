"""Plan search: Pareto table (attention-FLOPs fraction vs PSNR, SSIM, classifier-FID) and search wall times.

Embedded models on the CPU (quality and time)::

    python benchmarks/search.py --model tiny-dit --model tiny-mmdit          # writes results/search_<model>.json
    python benchmarks/search.py --report                                      # results/search.md + search_pareto.png

PixArt-Σ-XL-sized transformer on a GPU (random weights: search wall time only)::

    python benchmarks/search.py --model pixart-sigma-xl --device cuda        # 1024², 20 steps, 8 calibration prompts

For each embedded model: a trace with per-head influence is profiled on the calibration prompts;
V2 is solved from that trace for every target attention-core FLOPs fraction (budget mode), V2 is
run online at the δ the trace solve chose for the first target, V1 greedy runs at ``--v1-delta``;
the baselines are hand-made uniform plans (``Plan.uniform``) brought as close to each target as
their granularity allows: AST at evenly spaced steps (every 2nd step at 0.5), the model's window
(arrow for joint attention) everywhere, AST at every step on a subset of layers. Every plan is
then run on the same evaluation set (seeded, one batch) as the uncompressed model, and compared
to it: PSNR and SSIM per image (scikit-image's definitions, data range 1), classifier-FID between
the plan's and the uncompressed images (Fréchet distance of the embedded Fashion-MNIST
classifier's 128-d features; for tiny-mmdit on the crops of the captioned items), and class
accuracy (tiny-mmdit: items of the caption classified as their class in their quadrant).
The FLOPs fraction is the one the runtime counted while running the plan.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _paths import benchmarks_last  # noqa: E402

benchmarks_last()  # benchmarks/kernels.py must not shadow the `kernels` package
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class ModelSettings:
    steps: int
    calibration: int
    images: int
    batch: int


# CPU settings: small enough for the whole run to stay near 15 minutes on 2 cores.
EMBEDDED_SETTINGS = {"tiny-dit": ModelSettings(steps=20, calibration=2, images=32, batch=32),
                     # 8 calibration prompts since session 4 (2 tied with the step cache at both targets)
                     "tiny-mmdit": ModelSettings(steps=10, calibration=8, images=16, batch=16)}


@dataclass
class Row:
    method: str  # v1 | v2-online | v2-trace | step-cache | window-only | ast-only | full
    target: float | None
    fraction: float  # attention-core FLOPs fraction counted by the runtime
    psnr: float
    ssim: float
    fid: float | None
    accuracy: float | None
    accuracy_full: float | None
    search_seconds: float | None = None
    notes: str = ""


@dataclass
class ModelResult:
    model: str
    device: str
    settings: dict[str, Any]
    images_for_fid: int
    profile_seconds: float | None = None
    rows: list[Row] = field(default_factory=list)
    search_times: dict[str, float] = field(default_factory=dict)
    machine: str = ""
    wall_seconds: float = 0.0


# -- evaluation -------------------------------------------------------------------------------

class Evaluator:
    """One seeded batch of evaluation prompts, uncompressed once, then each plan against it."""

    def __init__(self, name: str, pipe: Any, prompts: list[str], steps: int, batch: int, seed: int = 1000) -> None:
        from ditlens.zoo import load_classifier

        self.name, self.pipe, self.prompts, self.steps, self.batch, self.seed = name, pipe, prompts, steps, batch, seed
        self.classifier = load_classifier()
        self.scenes = scenes_for(name, prompts)
        self.full = self.generate()
        self.full_features, self.accuracy_full = self.judge(self.full)

    def generate(self) -> np.ndarray:
        return np.concatenate([self._generate_chunk(start) for start in range(0, len(self.prompts), self.batch)])

    def judge(self, images: np.ndarray) -> tuple[np.ndarray, float]:
        """(classifier features for FID, class accuracy)."""
        if self.name == "tiny-dit":
            from ditlens.zoo.data import class_index

            labels = np.array([class_index(p) for p in self.prompts])
            return self.classifier.features(images), float((self.classifier.predict(images) == labels).mean())
        from ditlens.zoo.data import REGION_NAMES, region_crops
        from ditlens.zoo.evaluate import judge_scenes

        crops = region_crops(images)
        captioned = np.stack([crops[row, REGION_NAMES.index(item.region)]
                              for row, items in enumerate(self.scenes) for item in items])
        verdict = judge_scenes(images, self.scenes, self.classifier)
        return self.classifier.features(captioned), float(verdict.class_correct.mean())

    def evaluate(self, method: str, plan: Any, target: float | None, search_seconds: float | None = None,
                 notes: str = "") -> Row:
        from ditlens.compress.runtime import apply_plan
        from ditlens.compress.validate import psnr, ssim
        from ditlens.zoo.classifier import feature_statistics, frechet_distance

        handle = apply_plan(self.pipe, plan)
        core = core_full = 0
        try:
            chunks = []
            for start in range(0, len(self.prompts), self.batch):
                chunks.append(self._generate_chunk(start))
                report = handle.flops
                core, core_full = core + report.core, core_full + report.core_full
        finally:
            handle.remove()
        images = np.concatenate(chunks)
        features, accuracy = self.judge(images)
        fid = frechet_distance(*feature_statistics(self.full_features), *feature_statistics(features))
        return Row(method, target, core / core_full if core_full else 1.0,
                   float(np.mean([psnr(a, b) for a, b in zip(self.full, images)])),
                   float(np.mean([ssim(a, b) for a, b in zip(self.full, images)])),
                   float(fid), accuracy, self.accuracy_full, search_seconds, notes)

    def _generate_chunk(self, start: int) -> np.ndarray:
        generator = torch.Generator(device="cpu").manual_seed(self.seed + start)
        key = "class_labels" if self.name == "tiny-dit" else "prompt"
        out = self.pipe(**{key: self.prompts[start:start + self.batch]}, num_inference_steps=self.steps, generator=generator,
                        output_type="np")
        return np.clip(np.asarray(out.images, dtype=np.float64), 0.0, 1.0)


def scenes_for(name: str, prompts: list[str]) -> list | None:
    """The scenes behind tiny-mmdit's default prompts (default_prompts draws them from rng(0))."""
    if name != "tiny-mmdit":
        return None
    from ditlens.zoo.data import caption_for, random_scene

    rng = np.random.default_rng(0)
    drawn = [random_scene(rng) for _ in range(len(prompts) + 64)]
    by_caption = {caption_for(s): s for s in drawn}
    missing = [p for p in prompts if p not in by_caption]
    if missing:
        raise RuntimeError(f"evaluation prompts are not default tiny-mmdit scenes: {missing[:2]}")
    return [by_caption[p] for p in prompts]


# -- baselines -----------------------------------------------------------------------------------

def uniform_like(pipe: Any, reference: Any, method: str, **kw: Any) -> Any:
    """Plan.uniform with the run and token layout of ``reference`` (so static FLOPs are exact)."""
    from ditlens.compress import Plan

    run, tokens = reference.run, reference.model.tokens
    return Plan.uniform(pipe, run.steps, method, height=run.height, width=run.width, guidance=run.guidance,
                        cfg_layout=run.cfg_layout, grid=tuple(tokens.grid), n_text=tokens.n_text or 0, **kw)


def baseline_plans(pipe: Any, reference: Any, target: float, window_kind: str) -> dict[str, tuple[Any, str]]:
    steps, n_layers = reference.run.steps, len(reference.model.layers)
    grid = reference.model.tokens.grid
    n_image = int(np.prod(grid))
    out: dict[str, tuple[Any, str]] = {}
    # AST on k evenly spaced steps of 1..T-1 (k = T/2 at 0.5: every 2nd step).
    k = int(round((1 - target) * steps))
    at = sorted({int(round(x)) for x in np.linspace(1, steps - 1, k)}) if k < steps - 1 else list(range(1, steps))
    if target == 0.5 and steps % 2 == 0:
        at = list(range(1, steps, 2))
    out["step-cache"] = (uniform_like(pipe, reference, "ast", at_steps=at), f"AST at steps {at}")
    # One window everywhere, the half-width whose static fraction is nearest the target.
    best = None
    for w in range(0, n_image):
        plan = uniform_like(pipe, reference, f"{window_kind}({w})")
        gap = abs(plan.flops.attention_core_fraction - target)
        if best is None or gap < best[0]:
            best = (gap, plan, w)
        if plan.flops.attention_core_fraction > target + 0.05:
            break
    out["window-only"] = (best[1], f"{window_kind}({best[2]}) at every layer and step")
    # AST at every step >= 1 on k layers spread over the depth.
    best = None
    for k in range(1, n_layers + 1):
        layers = sorted({int(round(x)) for x in np.linspace(0, n_layers - 1, k)})
        plan = uniform_like(pipe, reference, "ast", layers=layers)
        gap = abs(plan.flops.attention_core_fraction - target)
        if best is None or gap < best[0]:
            best = (gap, plan, layers)
    out["ast-only"] = (best[1], f"AST at steps 1..T-1 on layers {best[2]}")
    return out


# -- embedded models ------------------------------------------------------------------------------

# The finer ladder of arrow/window widths of the second budget-mode row: with only 50/75/90 %, a head
# that cannot lose half its pairs has no option short of full attention, so the budget is met by
# caching more of the others.
FINE_SPARSITIES = (0.25, 0.5, 0.75, 0.9)


def run_embedded(name: str, device: str, targets: list[float], v1_delta: float, settings: ModelSettings,
                 log: Callable[[str], None]) -> ModelResult:
    from ditlens.analyzer import ProfileConfig, profile
    from ditlens.compress.search.api import search
    from ditlens.models import default_prompts, load_pipeline

    start = time.perf_counter()
    pipe = load_pipeline(name, device=device)
    calibration = default_prompts(name, settings.calibration)
    evaluation = default_prompts(name, settings.calibration + settings.images)[settings.calibration:]
    result = ModelResult(name, device, asdict(settings), 0, machine=f"{platform.processor() or platform.machine()}, "
                         f"{torch.get_num_threads()} torch threads, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / f"{name}.h5"
        t = time.perf_counter()
        profile(pipe, calibration, trace, ProfileConfig(steps=settings.steps, overwrite=True, influence=True,
                                                        attention_share=False), progress=False)
        result.profile_seconds = time.perf_counter() - t
        log(f"{name}: profile with influence, {len(calibration)} prompts: {result.profile_seconds:.1f} s")
        trace_plans = {}
        for target in targets:
            t = time.perf_counter()
            found = search(pipe, [], method="trace", trace=str(trace), target_flops=target, steps=settings.steps,
                           progress=False)
            seconds = time.perf_counter() - t
            trace_plans[target] = (found.plan, seconds)
            result.search_times[f"v2-trace@{target:g}"] = seconds
            log(f"{name}: V2 from trace at {target:g}: {seconds:.1f} s (δ={found.plan.provenance.delta:.4g})")
    reference = trace_plans[targets[0]][0]
    delta = float(reference.provenance.delta)
    t = time.perf_counter()
    online = search(pipe, calibration, method="v2", delta=delta, steps=settings.steps, progress=False)
    result.search_times["v2-online"] = time.perf_counter() - t
    log(f"{name}: V2 online at δ={delta:.4g}: {result.search_times['v2-online']:.1f} s")
    budget_plans = {}
    for target in targets:  # online V2 at matched FLOPs: budget mode bisects δ with online searches
        t = time.perf_counter()
        found = search(pipe, calibration, method="v2", target_flops=target, steps=settings.steps, progress=False)
        budget_plans[target] = (found.plan, time.perf_counter() - t)
        result.search_times[f"v2-online-budget@{target:g}"] = budget_plans[target][1]
        log(f"{name}: V2 online, budget {target:g}: {budget_plans[target][1]:.1f} s (δ={found.plan.provenance.delta:.4g})")
    fine_plans = {}
    for target in targets:  # the same with the finer width ladder
        t = time.perf_counter()
        found = search(pipe, calibration, method="v2", target_flops=target, steps=settings.steps, progress=False,
                       sparsities=FINE_SPARSITIES)
        fine_plans[target] = (found.plan, time.perf_counter() - t)
        result.search_times[f"v2-online-budget-fine@{target:g}"] = fine_plans[target][1]
        log(f"{name}: V2 online, budget {target:g}, widths at {FINE_SPARSITIES}: {fine_plans[target][1]:.1f} s "
            f"(δ={found.plan.provenance.delta:.4g})")
    t = time.perf_counter()
    greedy = search(pipe, calibration, method="v1", delta=v1_delta, steps=settings.steps, progress=False)
    result.search_times["v1"] = time.perf_counter() - t
    log(f"{name}: V1 greedy at δ={v1_delta:g}: {result.search_times['v1']:.1f} s")

    evaluator = Evaluator(name, pipe, evaluation, settings.steps, settings.batch)
    result.images_for_fid = len(evaluator.full_features)
    log(f"{name}: uncompressed evaluation set ready ({len(evaluation)} images, {result.images_for_fid} for FID)")
    window_kind = "arrow" if any(l.kind == "joint" for l in reference.model.layers) else "window"
    jobs: list[tuple[str, Any, float | None, float | None, str]] = []
    for target in targets:
        plan, seconds = trace_plans[target]
        jobs.append(("v2-trace", plan, target, seconds, f"δ={plan.provenance.delta:.4g}"))
        plan_o, seconds_o = budget_plans[target]
        jobs.append(("v2-online-budget", plan_o, target, seconds_o, f"δ={plan_o.provenance.delta:.4g} (budget mode, online searches)"))
        plan_f, seconds_f = fine_plans[target]
        jobs.append(("v2-online-budget-fine", plan_f, target, seconds_f,
                     f"δ={plan_f.provenance.delta:.4g} (budget mode, widths at 25/50/75/90 % sparsity)"))
        for method, (plan_b, notes) in baseline_plans(pipe, reference, target, window_kind).items():
            jobs.append((method, plan_b, target, None, notes))
    jobs.append(("v2-online", online.plan, None, result.search_times["v2-online"], f"δ={delta:.4g} (trace's at {targets[0]:g})"))
    jobs.append(("v1", greedy.plan, None, result.search_times["v1"], f"δ={v1_delta:g}"))
    for method, plan, target, seconds, notes in jobs:
        row = evaluator.evaluate(method, plan, target, seconds, notes)
        result.rows.append(row)
        log(f"{name}: {method:<11} target {target if target is not None else '-'}: fraction {row.fraction:.3f} "
            f"PSNR {row.psnr:.2f} SSIM {row.ssim:.4f} FID {row.fid:.3f} acc {row.accuracy:.3f}")
    result.wall_seconds = time.perf_counter() - start
    return result


# -- PixArt-Σ-XL (GPU, timing only) ----------------------------------------------------------------

PIXART_PROMPTS = ["a photo of a cat", "a red bus in the rain", "mountains at dawn", "a bowl of soup",
                  "a lighthouse at night", "a field of sunflowers", "an old library", "a robot reading a book"]


def _pixart_v2_times(pipe, prompts: list[str], result: ModelResult, target: float, size: int, steps: int,
                     common: dict, sync: Callable[[], None], log: Callable[[str], None]) -> None:
    """Profile with influence, V2 from the trace in budget mode, V2 online at the δ it found."""
    from ditlens.analyzer import ProfileConfig, profile
    from ditlens.compress.search.api import search

    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "pixart.h5"
        t = time.perf_counter()
        profile(pipe, prompts, trace, ProfileConfig(steps=steps, guidance=4.5, height=size, width=size, overwrite=True,
                                                    influence=True, attention_share=False), progress=True)
        sync()
        result.profile_seconds = time.perf_counter() - t
        log(f"pixart: profile with influence: {result.profile_seconds:.1f} s")
        t = time.perf_counter()
        found = search(pipe, [], method="trace", trace=str(trace), target_flops=target, steps=steps, progress=False)
        result.search_times[f"v2-trace (budget {target:g}, {found.plan.provenance.notes.split('δ tried ')[-1]} solves)"] = \
            time.perf_counter() - t
        log(f"pixart: V2 from trace (budget {target:g}): {time.perf_counter() - t:.1f} s")
    delta = float(found.plan.provenance.delta)
    t = time.perf_counter()
    search(pipe, prompts, method="v2", delta=delta, steps=steps, **common)
    sync()
    result.search_times[f"v2-online (δ={delta:.3g}, one solve)"] = time.perf_counter() - t
    log(f"pixart: V2 online at δ={delta:.4g}: {time.perf_counter() - t:.1f} s")


def run_pixart(device: str, target: float, v1_delta: float, v1_steps: int, log: Callable[[str], None], *,
               size: int = 1024, steps: int = 20, n_prompts: int = 8, layers: int | None = None,
               v1_only: bool = False, v2_only: bool = False, v1_micro_batch: int = 2,
               v1_every_candidate: bool = False, v1_floor: bool = False) -> ModelResult:
    """Search wall times on a PixArt-Σ-XL-sized transformer (1024², 20 steps, 8 prompts, random weights).
    ``size``/``steps``/``n_prompts``/``layers`` shrink it for a CPU smoke run of this code path only."""
    import random_pipelines
    from random_pipelines import pixart_sigma_xl

    from ditlens.compress.search.api import search

    start = time.perf_counter()
    if layers is not None:  # smoke run: fewer blocks (the published config has 28)
        random_pipelines.PIXART_SIGMA_XL = {**random_pipelines.PIXART_SIGMA_XL, "num_layers": layers}
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    pipe = pixart_sigma_xl(device=device, dtype=dtype)
    prompts = PIXART_PROMPTS[:n_prompts]
    result = ModelResult("pixart-sigma-xl", device, {"steps": steps, "calibration": len(prompts), "height": size,
                                                     "width": size, "guidance": 4.5, "dtype": str(dtype),
                                                     "layers": layers or 28, "v1_naive_steps": v1_steps}, 0,
                         machine=torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor())

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    common = dict(guidance=4.5, height=size, width=size, progress=True)
    if not v1_only:
        _pixart_v2_times(pipe, prompts, result, target, size, steps, common, sync, log)
    if v2_only:
        result.wall_seconds = time.perf_counter() - start
        return result
    # V1 against the naive greedy (whole transformer rerun per trial) on the first v1_steps steps:
    # the naive search at 20 steps would take far longer than a device session allows.
    # Several micro-batches let a failing trial stop after the first ones that put it past the
    # threshold (early rejection); the naive search runs them all.
    # The third run is the DiTFastAttn authors' calibration loop: the naive search that also tries the
    # strategies after the first passing one (all four per step and layer), with the same decisions.
    # With v1_floor, a fourth run without early rejection records every trial's loss terms, from which
    # greedy_floor works out the least work any exact search could have done (block runs).
    from ditlens.compress.search.greedy_floor import exact_search_floor

    plans, blocks = [], {}
    variants = {"": dict(naive=False), " naive (reruns the whole model)": dict(naive=True)}
    if v1_every_candidate:
        variants[" naive, every candidate (the authors' loop)"] = dict(naive=True, every_candidate=True)
    if v1_floor:
        variants[", block reuse only"] = dict(naive=False, early_reject=False, row_split=False)
    for label, flags in variants.items():
        t = time.perf_counter()
        found_v1 = search(pipe, prompts, method="v1", delta=v1_delta, steps=v1_steps,
                          micro_batch=v1_micro_batch, **flags, **common)
        log(f"pixart: v1{label}: {found_v1.plan.provenance.notes}")
        sync()
        key = f"v1{label}, {v1_steps} steps"
        result.search_times[key] = time.perf_counter() - t
        log(f"pixart: {key}: {result.search_times[key]:.1f} s")
        plans.append(found_v1.plan.methods)
        blocks[key] = found_v1.block_runs
        blocks[f"{key}, block work"] = found_v1.block_work  # weighted by the share of rows each block ran
        if flags.get("early_reject") is False:
            floor = exact_search_floor(found_v1.trial_passes, v1_delta, found_v1.plan.n_layers)
            base = found_v1.baseline_block_runs
            blocks["oracle exact search, a micro-batch forward as the unit"] = base + floor.prompt
            blocks["oracle exact search, a batch row as the unit"] = base + floor.row
    result.settings["v1_block_runs"] = blocks
    log(f"pixart: v1 block runs: {blocks}")
    # Alg. 1's decisions must not depend on block reuse; count the (step, layer) choices that differ
    # (bf16 on a GPU can put a loss on the other side of its threshold).
    def differing(a: list, b: list) -> int:
        return sum(x != y for step_a, step_b in zip(a, b) for x, y in zip(step_a, step_b))

    differ = differing(plans[0], plans[1])
    if v1_every_candidate:
        result.settings["v1_naive_vs_every_candidate_differing_decisions"] = differing(plans[1], plans[2])
    result.settings["v1_vs_naive_differing_decisions"] = differ
    log(f"pixart: v1 and naive v1 differ in {differ} (step, layer) decisions")
    result.wall_seconds = time.perf_counter() - start
    return result


# -- report ----------------------------------------------------------------------------------------

LABELS = {"v2-trace": "V2 from trace", "v2-online": "V2 online", "v2-online-budget": "V2 online (budget mode)",
          "v2-online-budget-fine": "V2 online (budget mode, 4 widths)", "v1": "V1 greedy", "step-cache": "AST evenly spaced steps",
          "window-only": "window only", "ast-only": "AST only (layers)"}


def write_report(paths: list[Path], out_md: Path, out_png: Path) -> None:
    results = [json.loads(p.read_text()) for p in paths]
    lines = ["# Plan search: Pareto tables and search wall times", "",
             "Made by `benchmarks/search.py` (commands below). Quality is measured against the uncompressed model on "
             "the same seeded evaluation batch; FLOPs fraction = attention-core FLOPs the runtime counted / the same run "
             "with every head full (1.0 = no saving). FID = classifier-FID between the plan's and the uncompressed "
             "images (embedded Fashion-MNIST classifier, 128-d features; tiny-mmdit: crops of the captioned items).", ""]
    embedded = [r for r in results if r["rows"]]
    for r in embedded:
        s = r["settings"]
        lines += [f"## {r['model']} ({r['device']}: {r['machine']})", "",
                  f"{s['steps']} steps, {s['calibration']} calibration prompts, {s['images']} evaluation images "
                  f"({r['images_for_fid']} feature vectors for FID). Uncompressed class accuracy "
                  f"{r['rows'][0]['accuracy_full']:.3f}. Whole run {r['wall_seconds']:.0f} s.", "",
                  "| target | method | FLOPs fraction | PSNR (dB) | SSIM | classifier-FID | accuracy | plan |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        rank = {"v2-trace": 0, "v2-online-budget": 1, "v2-online-budget-fine": 2}
        for row in sorted(r["rows"], key=lambda x: (x["target"] is None, -(x["target"] or 0), rank.get(x["method"], 3))):
            target = f"{row['target']:g}" if row["target"] is not None else "—"
            name = LABELS.get(row["method"], row["method"])
            if row["method"] in rank:
                name = f"**{name}**"
            lines.append(f"| {target} | {name} | {row['fraction']:.3f} | {row['psnr']:.2f} | {row['ssim']:.4f} | "
                         f"{row['fid']:.3f} | {row['accuracy']:.3f} | {row['notes']} |")
        lines += ["", verdict(r["rows"]), "", "Search wall time (this CPU, shared with other jobs):", "",
                  "| search | seconds |", "| --- | --- |",
                  f"| profile with per-head influence ({s['calibration']} prompts; needed once for every from-trace solve) | "
                  f"{r['profile_seconds']:.1f} |"]
        lines += [f"| {k} | {v:.1f} |" for k, v in r["search_times"].items()]
        lines.append("")
    for r in results:
        if r["rows"]:
            continue
        lines += [f"## {r['model']} ({r['device']}: {r['machine']}), search wall time", "",
                  f"settings: {json.dumps(r['settings'])}", "", "| search | seconds |", "| --- | --- |",
                  f"| profile with per-head influence | {r['profile_seconds']:.1f} |"]
        lines += [f"| {k} | {v:.1f} |" for k, v in r["search_times"].items()]
        lines.append("")
    lines += ["## Commands", "", "```bash", "python benchmarks/search.py --model tiny-dit --model tiny-mmdit   # CPU",
              "python benchmarks/search.py --model pixart-sigma-xl --device cuda  # GPU, timing only",
              "python benchmarks/search.py --report", "```", "", f"Plot: `{out_png.name}` (PSNR and classifier-FID "
              "against the FLOPs fraction; up-left / down-left is better)."]
    out_md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    if embedded:
        plot(embedded, out_png)


def verdict(rows: list[dict]) -> str:
    """Does each head-wise search (V2 from the trace, V2 online in budget mode) beat every baseline
    at each target (higher PSNR and SSIM, lower FID)?"""
    out = []
    ours_methods = [m for m in ("v2-trace", "v2-online-budget", "v2-online-budget-fine") if any(r["method"] == m for r in rows)]
    for target in sorted({r["target"] for r in rows if r["target"] is not None}, reverse=True):
        for mine in ours_methods:
            ours = next(r for r in rows if r["method"] == mine and r["target"] == target)
            for base in (r for r in rows if r["target"] == target and r["method"] not in ours_methods):
                wins = [ours["psnr"] > base["psnr"], ours["ssim"] > base["ssim"], ours["fid"] < base["fid"]]
                cheaper = ours["fraction"] <= base["fraction"] + 1e-9
                word = "beats" if all(wins) else ("loses to" if not any(wins) else "ties with (mixed metrics)")
                out.append(f"at {target:g}: {LABELS[mine]} ({ours['fraction']:.3f}) {word} {LABELS[base['method']]} "
                           f"({base['fraction']:.3f}{', which computes less' if not cheaper else ''})")
    return "Matched-FLOPs verdicts (PSNR, SSIM and FID all better = beats): " + "; ".join(out) + "."


def plot(results: list[dict], out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(5.5 * len(results), 8), squeeze=False)
    markers = {"v2-trace": "o", "v2-online": "s", "v2-online-budget": "*", "v2-online-budget-fine": "P", "v1": "^", "step-cache": "x", "window-only": "+", "ast-only": "d"}
    for col, r in enumerate(results):
        for row_index, key in enumerate(("psnr", "fid")):
            ax = axes[row_index][col]
            for method, marker in markers.items():
                pts = sorted((x["fraction"], x[key]) for x in r["rows"] if x["method"] == method)
                if pts:
                    ax.plot(*zip(*pts), marker=marker, linestyle="-" if len(pts) > 1 else "", label=LABELS[method])
            ax.set_xlabel("attention-core FLOPs fraction")
            ax.set_ylabel("PSNR vs uncompressed (dB)" if key == "psnr" else "classifier-FID vs uncompressed")
            ax.set_title(f"{r['model']} ({r['settings']['steps']} steps, {r['images_for_fid']} for FID)")
            ax.grid(alpha=0.3)
            if key == "fid":
                ax.set_yscale("log")
        axes[0][col].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="tiny-dit, tiny-mmdit or pixart-sigma-xl (repeatable)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--targets", default="0.5,0.3", help="attention-core FLOPs fractions (first: online V2's δ)")
    parser.add_argument("--v1-delta", type=float, default=0.05)
    parser.add_argument("--v1-naive-steps", type=int, default=4, help="pixart: steps of the V1 vs naive V1 timing")
    parser.add_argument("--v1-only", action="store_true", help="pixart: time only V1 against the naive V1")
    parser.add_argument("--v2-only", action="store_true",
                        help="pixart: time only the profile with influence, V2 from the trace and V2 online")
    parser.add_argument("--v1-micro-batch", type=int, default=2, help="pixart: calibration prompts per V1 forward")
    parser.add_argument("--v1-floor", action="store_true",
                        help="pixart: also run V1 without early rejection and report the oracle exact-search floor")
    parser.add_argument("--v1-every-candidate", action="store_true",
                        help="pixart: also time the authors' calibration loop (naive, every candidate tried)")
    parser.add_argument("--smoke", action="store_true",
                        help="pixart: 2 layers, 256², 4 steps, 2 prompts (checks the code path on a CPU; no figures)")
    parser.add_argument("--calibration", type=int, default=None,
                        help="embedded models: calibration prompts (default: the model's setting above)")
    parser.add_argument("--report", action="store_true", help="write results/search.md and the plot from the JSONs")
    args = parser.parse_args()
    if args.v1_only and args.v2_only:
        parser.error("--v1-only and --v2-only exclude each other")
    RESULTS.mkdir(parents=True, exist_ok=True)
    targets = [float(x) for x in args.targets.split(",")]

    def log(text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    for name in args.model or []:
        if name == "pixart-sigma-xl":
            shrink = dict(size=256, steps=4, n_prompts=2, layers=2) if args.smoke else {}
            result = run_pixart(args.device, targets[0], args.v1_delta, args.v1_naive_steps if not args.smoke else 2,
                                log, v1_only=args.v1_only, v2_only=args.v2_only, v1_micro_batch=args.v1_micro_batch,
                                v1_every_candidate=args.v1_every_candidate, v1_floor=args.v1_floor, **shrink)
        elif name in EMBEDDED_SETTINGS:
            settings = EMBEDDED_SETTINGS[name]
            if args.calibration:
                settings = dataclasses.replace(settings, calibration=args.calibration)
            result = run_embedded(name, args.device, targets, args.v1_delta, settings, log)
        else:
            parser.error(f"unknown model {name!r}")
        if args.smoke:
            log(f"smoke run done: {json.dumps(result.search_times)}")
            continue
        path = RESULTS / f"search_{name}.json"
        payload = asdict(result)
        if name == "pixart-sigma-xl" and (args.v1_only or args.v2_only) and path.exists():
            # Keep the earlier run's figures of the other method; replace only this run's timings. The top
            # level describes the V2 run, "v1_run" the V1 run where they came from different runs.
            earlier = json.loads(path.read_text(encoding="utf-8"))
            ran = "v1" if args.v1_only else "v2"
            times = {k: v for k, v in earlier["search_times"].items() if not k.startswith(ran)}
            merged = {"search_times": {**times, **payload["search_times"]}}
            if args.v1_only:
                payload = {**earlier, **merged, "v1_run": {"machine": payload["machine"], "settings": payload["settings"]}}
            else:
                payload = {**payload, **merged, "v1_run": earlier.get("v1_run", {"machine": earlier["machine"],
                                                                                 "settings": earlier["settings"]})}
        path.write_text(json.dumps(payload, indent=1), encoding="utf-8")
        log(f"wrote {path}")
    if args.report:
        paths = sorted(RESULTS.glob("search_*.json"))
        write_report(paths, RESULTS / "search.md", RESULTS / "search_pareto.png")
        log(f"wrote {RESULTS / 'search.md'} from {len(paths)} result files")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
