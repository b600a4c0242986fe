"""Redundancy maps: prompt aggregates, prompt variability, rankings and run comparison.

``analyze`` turns a trace's per-prompt statistics into maps aggregated over prompts
(``/maps/mean/...`` and ``/maps/cv/...``, written back into the trace), ranks layers and steps
by redundancy, and prints DiTCacheAnalysis's mean coefficient-of-variation table (its Table 2).
``compare`` aligns two runs of one model by normalised sampling time and rank-correlates
their maps (DiTCacheAnalysis §4.4-4.5: prompts, step counts and schedulers).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ditlens.analyzer.metrics import coefficient_of_variation
from ditlens.errors import DitlensError
from ditlens.traces.format import StatKey, stat_path

# Larger means more redundant for similarity metrics, smaller for distances.
HIGHER_IS_REDUNDANT = {"cosine": True, "ssim": True, "l1": False, "rel_l1": False}


def _nanmean(a: np.ndarray, axis) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(a, axis=axis)


@dataclass
class Ranking:
    key: StatKey
    axis: str  # "layer" or "step"
    most: list[tuple[str, float]]
    least: list[tuple[str, float]]


@dataclass
class AnalysisReport:
    path: Path
    n_prompts: int
    rankings: list[Ranking] = field(default_factory=list)
    cv_table: dict[str, dict[str, float]] = field(default_factory=dict)  # comparison/metric -> tensor -> mean CV
    stored: list[str] = field(default_factory=list)

    def render(self) -> str:
        lines = [f"{self.path}: {self.n_prompts} prompts"]
        for r in self.rankings:
            g, t, c, m = r.key
            fmt = lambda items: ", ".join(f"{name} ({value:.3g})" for name, value in items)
            lines.append(f"{g}/{t}/{c}/{m} by {r.axis}: most redundant {fmt(r.most)}; least {fmt(r.least)}")
        if self.cv_table:
            tensors = ["q", "k", "v", "o"]
            lines.append("")
            lines.append("mean coefficient of variation across prompts (over layers and steps; DiTCacheAnalysis Table 2)")
            lines.append(f"{'map':<22}" + "".join(f"{t.upper():>9}" for t in tensors))
            for name, row in self.cv_table.items():
                lines.append(f"{name:<22}" + "".join(f"{row.get(t, float('nan')):>9.3f}" for t in tensors))
        if self.stored:
            lines.append(f"\nstored {len(self.stored)} aggregated maps under /maps in {self.path}")
        return "\n".join(lines)


def prompt_mean(values: np.ndarray) -> np.ndarray:
    """Mean over the prompt axis (axis 0), ignoring NaN (step 0 has no previous step)."""
    return _nanmean(values, axis=0)


def _rank(values: np.ndarray, labels: list[str], higher_is_redundant: bool, top: int) -> tuple[list, list]:
    finite = [(labels[i], float(v)) for i, v in enumerate(values) if np.isfinite(v)]
    finite.sort(key=lambda item: item[1], reverse=higher_is_redundant)
    return finite[:top], finite[::-1][:top]


def analyze(path: str | Path, *, top: int = 3, store: bool = True,
            ranked: tuple[StatKey, ...] = (("image", "o", "step", "l1"), ("image", "o", "step", "cosine"),
                                           ("image", "o", "cfg", "cosine"), ("image", "k", "step", "l1"),
                                           ("image", "v", "step", "l1"))) -> AnalysisReport:
    """Aggregate every statistic over prompts, rank layers and steps, and tabulate prompt CV.

    Stores ``/maps/mean/<group>/<tensor>/<comparison>/<metric>`` (prompt mean) and
    ``/maps/cv/...`` (std/mean over prompts, ddof 0) in the trace unless ``store`` is False.
    """
    from ditlens.traces.reader import Trace
    from ditlens.traces.writer import open_for_append

    if top < 1:
        raise DitlensError(f"--top must be at least 1 (layers and steps to name at each end), got {top}")
    path = Path(path)
    stored: list[str] = []
    with Trace.open(path) as trace:
        if trace.n_done == 0:
            raise DitlensError(f"{path} holds no finished prompt yet: run `ditlens profile ... --resume` first")
        report = AnalysisReport(path, trace.n_done)
        maps: dict[str, tuple[np.ndarray, tuple[str, ...]]] = {}
        for key in trace.filled_stat_keys():  # an old trace's all-NaN statistics make no map
            arr = trace.stat(*key)
            data = arr.data
            axes = tuple(arr.axes[1:])
            maps["/maps/mean" + stat_path(key)[len("/stats"):]] = (prompt_mean(data).astype(np.float32), axes)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                cv = coefficient_of_variation(data, axis=0).astype(np.float32)
            maps["/maps/cv" + stat_path(key)[len("/stats"):]] = (cv, axes)
            group, tensor, comparison, metric = key
            if group == "image" and metric in ("l1", "rel_l1"):
                label = f"{comparison}/{metric}"
                report.cv_table.setdefault(label, {})[tensor] = float(_nanmean(cv, axis=None))
            if key in ranked:
                mean = prompt_mean(data)
                if comparison == "step":
                    mean = _nanmean(mean, axis=0)  # over branches
                by_layer = _nanmean(mean, axis=(0, 2))
                by_step = _nanmean(mean, axis=(1, 2))
                hi = HIGHER_IS_REDUNDANT[metric]
                most, least = _rank(by_layer, list(trace.layers), hi, top)
                report.rankings.append(Ranking(key, "layer", most, least))
                most, least = _rank(by_step, [f"step {i}" for i in range(len(by_step))], hi, top)
                report.rankings.append(Ranking(key, "step", most, least))
    if store:
        with open_for_append(path) as writer:
            for name, (data, axes) in maps.items():
                writer.write_array(name, data, axes, {"n_prompts": report.n_prompts})
                stored.append(name)
    report.stored = stored
    return report


@dataclass
class ComparisonReport:
    a: Path
    b: Path
    steps: tuple[int, int]
    rows: list[tuple[str, float, int]]  # map, Spearman rho, number of compared cells

    def render(self) -> str:
        lines = [f"{self.a} ({self.steps[0]} steps) vs {self.b} ({self.steps[1]} steps); steps aligned by normalised "
                 "sampling time", f"{'map':<28}{'spearman':>10}{'cells':>8}"]
        lines += [f"{name:<28}{rho:>10.3f}{n:>8}" for name, rho, n in self.rows]
        return "\n".join(lines)


def aligned_steps(n_a: int, n_b: int) -> np.ndarray:
    """For each step of run A, the step of run B nearest in normalised sampling time s = t/(T-1)."""
    sa = np.linspace(0.0, 1.0, n_a) if n_a > 1 else np.zeros(1)
    sb = np.linspace(0.0, 1.0, n_b) if n_b > 1 else np.zeros(1)
    return np.abs(sa[:, None] - sb[None, :]).argmin(axis=1)


def compare(path_a: str | Path, path_b: str | Path) -> ComparisonReport:
    """Spearman rank correlation of each prompt-averaged map (cond branch) of two runs of one model."""
    from scipy.stats import spearmanr

    from ditlens.traces.reader import Trace

    rows = []
    with Trace.open(path_a) as a, Trace.open(path_b) as b:
        for field_name in ("family", "transformer_class"):
            if getattr(a.header, field_name) != getattr(b.header, field_name):
                raise DitlensError(f"traces are of different models ({field_name}: {getattr(a.header, field_name)} vs "
                                   f"{getattr(b.header, field_name)}); compare runs of one model")
        if list(a.layers) != list(b.layers) or a.header.n_heads != b.header.n_heads:
            raise DitlensError("traces have different attention layers or heads; compare runs of one model")
        if a.n_done == 0 or b.n_done == 0:
            raise DitlensError("one of the traces holds no finished prompt")
        align = aligned_steps(a.header.steps, b.header.steps)
        in_b = set(b.filled_stat_keys())
        common = [k for k in a.filled_stat_keys() if k in in_b]
        for key in common:
            ma, mb = prompt_mean(a.stat(*key).data), prompt_mean(b.stat(*key).data)
            if key[2] == "step":
                ma, mb = ma[0], mb[0]  # cond branch
            mb = mb[align]
            ok = np.isfinite(ma) & np.isfinite(mb)
            if ok.sum() < 3 or np.ptp(ma[ok]) == 0 or np.ptp(mb[ok]) == 0:
                continue
            rho = float(spearmanr(ma[ok], mb[ok]).statistic)
            rows.append(("/".join(key), rho, int(ok.sum())))
        return ComparisonReport(Path(path_a), Path(path_b), (a.header.steps, b.header.steps), rows)
