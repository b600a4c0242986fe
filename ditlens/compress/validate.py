"""Validate a plan: the same prompts and seeds with and without it.

Reports PSNR and SSIM of the final images (scikit-image's definitions, data range 1), for the
embedded models class accuracy and classifier-FID (when :mod:`ditlens.zoo` is available), the
FLOPs fractions measured from the masks executed, attention and end-to-end wall time, peak
memory, and writes a JSON report, a Markdown report and a side-by-side PNG grid. With
``cuda_graphs`` every timed transformer forward, with and without the plan, is replayed from a
CUDA graph (:func:`ditlens.compress.apply_cuda_graphs`), as a host-bound deployment would run it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ditlens.compress.clock import ModuleClock
from ditlens.compress.plan import FlopsSummary, Plan
from ditlens.compress.runtime import apply_plan
from ditlens.errors import DitlensError


@dataclass
class ValidationReport:
    model: str
    plan: str
    prompts: list[str]
    psnr: list[float]
    ssim: list[float]
    flops: dict[str, Any]
    seconds_full: float
    seconds_plan: float
    attention_seconds_full: float | None  # None under CUDA graphs: a replayed forward runs no module hooks
    attention_seconds_plan: float | None
    peak_memory_full: int | None
    peak_memory_plan: int | None
    peak_cache_bytes: int
    classifier: dict[str, Any] = field(default_factory=dict)
    # per-prompt run times, pair i timed side by side: the scatter of the pairs is the timing noise
    prompt_seconds_full: list[float] = field(default_factory=list)
    prompt_seconds_plan: list[float] = field(default_factory=list)
    cuda_graphs: bool = False  # every timed forward replayed from a CUDA graph
    graph_replays: int | None = None  # forwards replayed during the whole validation (captures' first replays too)
    # under CUDA graphs: the attention modules' share of one replayed uncompressed forward
    graph_attention_share: float | None = None

    @property
    def attention_share(self) -> float:
        """Measured fraction of the uncompressed run spent in attention modules (projections and
        products: output caching skips both, so the bound is taken at the module level). Under CUDA
        graphs, the share of a replayed forward (the modules taken out, :mod:`ditlens.analyzer.amdahl`)."""
        if self.graph_attention_share is not None:
            return self.graph_attention_share
        if self.attention_seconds_full is None or self.seconds_full <= 0:
            return 0.0
        return self.attention_seconds_full / self.seconds_full

    @property
    def amdahl_bound(self) -> float:
        """End-to-end speedup ceiling if attention time fell with the plan's attention-module FLOPs."""
        removed = 1.0 - float(self.flops["attention_module_fraction"])
        return 1.0 / (1.0 - min(1.0, self.attention_share) * removed)

    @property
    def speedup(self) -> float | None:
        """Uncompressed run time over the plan's (both after a warm-up call)."""
        return self.seconds_full / self.seconds_plan if self.seconds_plan > 0 else None

    @property
    def speedup_noise(self) -> float | None:
        """Standard error of :attr:`speedup` (a ratio of sums) from the per-prompt pairs: prompt i ran
        once without and once with the plan, side by side, so a drift of the machine from pair to
        pair cancels and only the scatter within pairs counts. None with fewer than two prompts."""
        a, b = np.asarray(self.prompt_seconds_full), np.asarray(self.prompt_seconds_plan)
        if min(len(a), len(b)) < 2 or len(a) != len(b) or self.speedup is None or b.mean() <= 0:
            return None
        ratio = a.sum() / b.sum()
        residual = a - ratio * b
        return float(np.sqrt(np.sum(residual ** 2) / (len(a) - 1) / len(a)) / b.mean())

    @property
    def speed_verdict(self) -> str:
        """One line on the plan's measured speed against its Amdahl bound."""
        sp, bound, noise = self.speedup, self.amdahl_bound, self.speedup_noise
        if sp is None:
            return "not timed"
        spread = f" ± {noise:.2f}" if noise is not None else ""
        if noise is not None and abs(sp - 1.0) <= 2 * noise:
            return (f"{sp:.2f}x{spread}: within the timing noise of {len(self.prompt_seconds_plan)} prompts "
                    f"(bound {bound:.2f}x); time more prompts, or on a quiet machine, to tell")
        if sp > 1.1 * bound + 2 * (noise or 0.0):
            # kernels faster than SDPA at equal FLOPs move a plan a few % past the bound, never this far
            return (f"{sp:.2f}x{spread}: above its {bound:.2f}x Amdahl bound, "
                    "which removing attention work cannot beat: the timing was disturbed (other work on this "
                    "machine?); validate again on a quiet one")
        if sp < 0.99:
            return (f"slower than the uncompressed model ({sp:.2f}x, bound {bound:.2f}x): the plan's extra work "
                    f"(caches, refreshes, launches) costs more than the {self.attention_share:.0%} of run time "
                    f"in attention saves; try fewer WA-RS layers, a larger resolution"
                    + ("" if self.cuda_graphs else ", or CUDA graphs on a host-bound GPU (--cuda-graphs)"))
        return f"{sp:.2f}x{spread}, {sp / bound:.0%} of its Amdahl bound ({bound:.2f}x)"

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["psnr_mean"] = float(np.mean(self.psnr))
        out["ssim_mean"] = float(np.mean(self.ssim))
        out["attention_share"] = self.attention_share
        out["amdahl_bound"] = self.amdahl_bound
        out["speedup"] = self.speedup
        out["speedup_noise"] = self.speedup_noise
        out["speed_verdict"] = self.speed_verdict
        return out

    def markdown(self) -> str:
        d = self.as_dict()
        timing = (f", every forward replayed from a CUDA graph ({self.graph_replays} replays)" if self.cuda_graphs
                  else "")
        if self.attention_seconds_full is None:
            attention = "| attention s (full / plan) | not clocked: replayed forwards run no module hooks |"
            share = "| attention-module share of a replayed forward (full) |"
        else:
            attention = (f"| attention s (full / plan) | {self.attention_seconds_full:.3f} / "
                         f"{self.attention_seconds_plan:.3f} |")
            share = "| attention-module share of run time (full) |"
        lines = [f"# ditlens validate: {self.model}", "", f"plan `{self.plan}`, {len(self.prompts)} prompts{timing}", "",
                 "| metric | value |", "| --- | --- |",
                 f"| PSNR (dB, mean) | {d['psnr_mean']:.2f} |", f"| SSIM (mean) | {d['ssim_mean']:.4f} |",
                 f"| attention-core FLOPs fraction | {self.flops['attention_core_fraction']:.4f} |",
                 f"| attention-module FLOPs fraction | {self.flops['attention_module_fraction']:.4f} |",
                 f"| end-to-end s (full / plan) | {self.seconds_full:.3f} / {self.seconds_plan:.3f} |",
                 attention, f"{share} {self.attention_share:.1%} |",
                 f"| end-to-end speedup (Amdahl bound at this plan's FLOPs) | "
                 f"{d['speedup'] or float('nan'):.2f}x ({self.amdahl_bound:.2f}x) |",
                 f"| speed | {self.speed_verdict} |",
                 ("| peak memory bytes (full / plan) | not measured off CUDA |" if self.peak_memory_full is None else
                  f"| peak memory bytes (full / plan{', both with the graphs of both' if self.cuda_graphs else ''}) | "
                  f"{self.peak_memory_full} / {self.peak_memory_plan} |"),
                 f"| peak cache bytes | {self.peak_cache_bytes} |"]
        for key, value in self.classifier.items():
            lines.append(f"| {key} | {value} |")
        return "\n".join(lines) + "\n"


def to_images(output: Any) -> np.ndarray:
    """A pipeline's images (or video frames) as float [N, H, W, C] in [0, 1]."""
    images = getattr(output, "images", None)
    if images is None:
        images = getattr(output, "frames", None)
    if images is None:
        images = output[0]
    arr = np.asarray(images, dtype=np.float64)
    if arr.ndim == 5:  # [N, F, H, W, C] video: frames side by side in the batch
        arr = arr.reshape(-1, *arr.shape[2:])
    if arr.ndim == 3:
        arr = arr[..., None]
    return np.clip(arr, 0.0, 1.0)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    side = min(a.shape[0], a.shape[1])
    win = min(7, side if side % 2 else side - 1)
    return float(structural_similarity(a, b, data_range=1.0, channel_axis=-1, win_size=win))


def steady_cpu_allocator() -> bool:
    """Stop glibc's malloc from handing freed memory back to the OS and from moving its mmap
    threshold; True when glibc took both settings.

    PyTorch's CPU tensors come from malloc. By default glibc trims the heap top after large frees
    and adapts its mmap threshold to the sizes seen so far, so whether a run's temporaries cost
    fresh page faults depends on what the process allocated before: in nine ``ditlens demo`` runs on
    the 2-core CI machine, tiny-dit's plan measured 1.02x to 1.33x (four runs above its 1.16x Amdahl
    bound, which removing attention work cannot beat). With the heap kept and the threshold fixed
    at 32 MiB: 1.05x to 1.14x in five runs. The process keeps its freed memory for reuse afterwards."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (macOS, Windows): nothing to pin
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    trim = mallopt(m_trim_threshold, 1 << 30)
    mmap = mallopt(m_mmap_threshold, 32 << 20)
    return bool(trim) and bool(mmap)


@dataclass
class _TimedRun:
    images: list  # as to_images gives them
    seconds: float
    attention_seconds: float | None
    peak_memory: int | None


def _run(pipe: Any, call: Callable[[str, int], dict], prompt: str, seed: int, clock: ModuleClock | None,
         cuda: bool) -> _TimedRun:
    """One pipeline call, timed end to end (synchronised when the model is on CUDA) and inside
    attention modules (``clock``, on those modules; None under CUDA graphs)."""
    if clock is not None:
        clock.reset()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    images = to_images(pipe(**call(prompt, seed)))
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return _TimedRun(images, seconds, clock.total_seconds() if clock is not None else None,
                     torch.cuda.max_memory_allocated() if cuda else None)


def validate(pipe: Any, plan: Plan, prompts: Sequence[str], call: Callable[[str, int], dict], *, seed: int = 0,
             model_name: str = "", plan_name: str = "", out_dir: str | Path | None = None,
             classifier_labels: Sequence[int] | None = None, cuda_graphs: bool = False) -> ValidationReport:
    """Run ``prompts`` (``call(prompt, seed)`` gives the pipeline kwargs) with and without ``plan``.

    Timing protocol: one untimed uncompressed call, one untimed call with the plan that counts its
    FLOPs (kernel compiles and first allocations stay out of the timing; a plan runs the same masks
    at every call, so one call gives its FLOPs fractions), and one untimed call with the plan
    applied without its FLOPs-counting hooks, as it is timed. Then, per prompt, one call without
    and one with the plan, in alternating order (ABBA; the plan suspended for the uncompressed
    calls, so its runtime's device constants are built once): a slow drift of the machine (clocks,
    other work) falls on both sides of every pair instead of on one whole pass, and the speedup's
    error comes from the pairs. On the CPU, :func:`steady_cpu_allocator` first keeps malloc's
    behaviour from depending on history.

    ``cuda_graphs``: the timed calls replay every forward from CUDA graphs. Both configurations
    get one more untimed call first (it captures their graphs); the attention share, which module
    clocks cannot see inside a replay, is timed apart on replayed forwards with and without the
    attention modules (:func:`ditlens.analyzer.amdahl.measure_attention_share`).
    """
    from ditlens.analyzer.adapters import default_registry

    if not prompts:
        raise DitlensError("validate needs at least one prompt (pass --prompt or --num-prompts)")
    # refuse another model's plan before the uncompressed runs (apply_plan would, after them)
    adapter = default_registry().find(pipe.transformer)
    plan.check_model(pipe.transformer, adapter, getattr(pipe, "scheduler", None), adapter.pipeline_cfg_layout(pipe))
    modules = [pipe.transformer.get_submodule(l.name) for l in plan.model.layers]
    cuda = any(p.is_cuda for p in pipe.transformer.parameters())
    if cuda_graphs and not cuda:
        raise DitlensError("CUDA graphs need the model on a CUDA device: validate with --device cuda, "
                           "or without --cuda-graphs")
    if not cuda:
        steady_cpu_allocator()
    full: list[_TimedRun] = []
    planned: list[_TimedRun] = []
    graph_share = None
    if cuda_graphs:  # before any hook is on the model; this also compiles and warms its kernels
        from ditlens.analyzer.amdahl import measure_attention_share

        graph_share = measure_attention_share(pipe, call(prompts[0], seed), cuda_graph=True, modules=modules).share
    clock = None if cuda_graphs else ModuleClock(modules, cuda)
    graphs = None
    try:
        if cuda_graphs:
            from ditlens.compress.graphs import apply_cuda_graphs

            graphs = apply_cuda_graphs(pipe)

        def run(prompt: str, prompt_seed: int) -> _TimedRun:
            return _run(pipe, call, prompt, prompt_seed, clock, cuda)

        run(prompts[0], seed)  # warm-up, so the first timed run pays no one-off costs
        with apply_plan(pipe, plan) as counting:
            run(prompts[0], seed)
            flops_total = counting.flops.as_dict()
            peak_cache = counting.peak_cache_bytes()
        with apply_plan(pipe, plan, count_flops=False) as handle:
            run(prompts[0], seed)  # this runtime's own first-use constants

            def run_full(prompt: str, prompt_seed: int) -> _TimedRun:
                with handle.suspended():
                    return run(prompt, prompt_seed)

            if cuda_graphs:  # the second call of each configuration captures its graphs
                run_full(prompts[0], seed)
                run(prompts[0], seed)
            for i, p in enumerate(prompts):
                if i % 2 == 0:
                    full.append(run_full(p, seed + i))
                    planned.append(run(p, seed + i))
                else:
                    planned.append(run(p, seed + i))
                    full.append(run_full(p, seed + i))
            peak_cache = max(peak_cache, handle.peak_cache_bytes())
    finally:
        if clock is not None:
            clock.remove()
        if graphs is not None:
            graphs.remove()
    plan.flops = FlopsSummary(flops_total["attention_core_fraction"], flops_total["attention_module_fraction"], "measured")
    pairs = [(f.images, c.images) for f, c in zip(full, planned)]
    ps = [float(np.mean([psnr(a, b) for a, b in zip(x, y)])) for x, y in pairs]
    ss = [float(np.mean([ssim(a, b) for a, b in zip(x, y)])) for x, y in pairs]
    peak_full = max(r.peak_memory for r in full) if cuda else None
    peak_plan = max(r.peak_memory for r in planned) if cuda else None
    report = ValidationReport(model_name, plan_name, list(prompts), ps, ss, flops_total, sum(r.seconds for r in full),
                              sum(r.seconds for r in planned), _total_attention(full), _total_attention(planned),
                              peak_full, peak_plan, peak_cache,
                              _classifier_metrics([r.images for r in full], [r.images for r in planned],
                                                  classifier_labels),
                              [r.seconds for r in full], [r.seconds for r in planned], cuda_graphs,
                              graphs.replays if graphs is not None else None, graph_share)
    if out_dir is not None:
        write_report(report, [r.images for r in full], [r.images for r in planned], out_dir)
    return report


def _total_attention(runs: list[_TimedRun]) -> float | None:
    return None if any(r.attention_seconds is None for r in runs) else sum(r.attention_seconds for r in runs)


def validate_pipeline(pipe: Any, plan: Plan, prompts: Sequence[str], *, seed: int = 0, model_name: str = "",
                      plan_name: str = "", out_dir: str | Path | None = None,
                      call_kwargs: dict[str, Any] | None = None, cuda_graphs: bool = False) -> ValidationReport:
    """:func:`validate` with the pipeline calls of the plan's run (steps, guidance, size, and the
    frame count of a video plan) built by the model's adapter; ``call_kwargs`` pass through to every
    call. Class-conditional prompts also give the classifier's expected labels."""
    import torch

    from ditlens.analyzer.adapters import _class_label, default_registry

    adapter = default_registry().find(pipe.transformer)
    run = plan.run
    extra = dict(call_kwargs or {})
    grid = plan.model.tokens.grid
    if grid is not None and grid[0] > 1:
        extra = {**adapter.frame_kwargs(pipe, grid[0]), **extra}

    def call(prompt: str, prompt_seed: int) -> dict[str, Any]:
        kwargs = adapter.call_kwargs(pipe, prompt, run.steps, run.guidance, run.height, run.width,
                                     torch.Generator(device="cpu").manual_seed(prompt_seed))
        kwargs.update(extra)
        kwargs["output_type"] = "np"
        return kwargs

    labels = None
    if adapter.pipeline_kind == "class" and _is_embedded_dit(pipe):  # the classifier knows its 10 classes only
        labels = [_class_label(pipe, p) for p in prompts]
    return validate(pipe, plan, prompts, call, seed=seed, model_name=model_name, plan_name=plan_name, out_dir=out_dir,
                    classifier_labels=labels, cuda_graphs=cuda_graphs)


def _is_embedded_dit(pipe: Any) -> bool:
    """The embedded Fashion-MNIST DiT (or a wrapper forwarding its attributes): the only class
    model whose classes the embedded classifier knows."""
    return getattr(pipe, "_ditlens_classifier", None) == "fashion-mnist"


def _classifier_metrics(full: list, compressed: list, labels: Sequence[int] | None) -> dict[str, Any]:
    """Class accuracy and classifier-FID with the embedded Fashion-MNIST classifier, when ditlens.zoo ships it."""
    if labels is None:
        return {}
    try:
        from ditlens.zoo import load_classifier

        classifier = load_classifier()
    except Exception:  # zoo or its weights not installed: skip these metrics
        return {}
    a = np.concatenate(full)
    b = np.concatenate(compressed)
    labels_arr = np.asarray(labels)
    out = {"accuracy_full": float((classifier.predict(a) == labels_arr).mean()),
           "accuracy_plan": float((classifier.predict(b) == labels_arr).mean())}
    if len(a) >= 2:
        from ditlens.zoo.classifier import feature_statistics, frechet_distance

        fa, fb = classifier.features(a), classifier.features(b)
        out["classifier_fid_plan_vs_full"] = float(frechet_distance(*feature_statistics(fa), *feature_statistics(fb)))
    return out


def write_report(report: ValidationReport, full: list, compressed: list, out_dir: str | Path) -> list[Path]:
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "validate.json").write_text(json.dumps(report.as_dict(), indent=1), encoding="utf-8")
    (out / "validate.md").write_text(report.markdown(), encoding="utf-8")
    rows = [np.concatenate([a[0], b[0], np.clip(np.abs(a[0] - b[0]) * 4, 0, 1)], axis=1) for a, b in zip(full, compressed)]
    grid = np.concatenate(rows, axis=0)
    if grid.shape[-1] == 1:
        grid = grid[..., 0]
    Image.fromarray((grid * 255).round().astype(np.uint8)).save(out / "grid.png")
    return [out / "validate.json", out / "validate.md", out / "grid.png"]
