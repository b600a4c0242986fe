"""What the plan and validation views show: method maps, per-head breakdowns, FLOPs per step
and layer, validation reports (``validate.json`` + ``grid.png``).

Plans are read with :meth:`ditlens.compress.plan.Plan.load`, so a dashboard refuses exactly the
files the runtime refuses, with the same one-line message.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ditlens.errors import DitlensError

if TYPE_CHECKING:
    from ditlens.traces.format import TraceHeader

# Each method family has its own colour ramp (plotly's sequential scales); the variants of a
# family (windows, +asc) take evenly spaced shades of it. "full" is a quiet grey.
FAMILY_RAMPS: dict[str, str] = {
    "full": "Greys", "window": "Blues", "arrow": "Greens", "window2d": "Purples", "wars": "Oranges", "ast": "Reds",
}
FAMILY_ORDER = ("full", "window", "arrow", "window2d", "wars", "ast")


@dataclass
class LoadedPlan:
    name: str  # file name shown in the app
    path: Path
    plan: Any  # ditlens.compress.plan.Plan


def load_plans(paths: Sequence[str | Path]) -> list[LoadedPlan]:
    """Load every plan; a file that is not a valid plan raises its one-line error."""
    if not paths:
        return []
    from ditlens.compress.plan import Plan  # imports torch: only when there are plans

    loaded: list[LoadedPlan] = []
    names: Counter[str] = Counter()
    for raw in paths:
        path = Path(raw)
        plan = Plan.load(path)
        names[path.name] += 1
        name = path.name if names[path.name] == 1 else f"{path.name} ({names[path.name]})"
        loaded.append(LoadedPlan(name, path, plan))
    return loaded


def method_key(text: str) -> tuple[int, int, bool]:
    """Sort key of a method string: family order, window, +asc."""
    from ditlens.compress.methods import parse_method

    method = parse_method(text)
    return (FAMILY_ORDER.index(method.base), method.window, method.asc)


def cell_label(entry: str | list[str]) -> str:
    """Colour label of a (step, layer): its method; for a per-head entry the method most heads
    use besides ``full`` (ties: the more compressive), ``full`` when every head is full."""
    from ditlens.compress.methods import parse_method

    if isinstance(entry, str):
        return parse_method(entry).to_str()
    counts = Counter(parse_method(m).to_str() for m in entry)
    compressed = {m: n for m, n in counts.items() if m != "full"}
    if not compressed:
        return "full"
    return max(compressed, key=lambda m: (compressed[m], method_key(m)))


def cell_text(entry: str | list[str]) -> str:
    """Text drawn in a (step, layer) cell whose heads differ: compressed heads / heads."""
    from ditlens.compress.methods import parse_method

    if isinstance(entry, str):
        return ""
    labels = [parse_method(m).to_str() for m in entry]
    if len(set(labels)) == 1:
        return ""
    return f"{sum(m != 'full' for m in labels)}/{len(labels)}"


def head_breakdown(entry: str | list[str]) -> str:
    """Hover text of a (step, layer): ``2 x full, 1 x ast`` for a per-head entry."""
    from ditlens.compress.methods import parse_method

    if isinstance(entry, str):
        return f"all heads: {parse_method(entry).to_str()}"
    counts = Counter(parse_method(m).to_str() for m in entry)
    return ", ".join(f"{n} x {m}" for m, n in sorted(counts.items(), key=lambda kv: method_key(kv[0])))


def category_colours(categories: Sequence[str]) -> list[str]:
    """One colour per method label: a family's variants get distinct shades of its ramp."""
    import plotly.colors as pc
    from ditlens.compress.methods import parse_method

    by_family: dict[str, list[str]] = {}
    for label in categories:
        by_family.setdefault(parse_method(label).base, []).append(label)
    colours = []
    for label in categories:
        family = parse_method(label).base
        ramp = getattr(pc.sequential, FAMILY_RAMPS[family])  # 9 shades, light to dark
        variants = by_family[family]
        if family == "full":
            shades = [2, 4, 6]
        else:
            shades = np.linspace(3, 8, len(variants)).round().astype(int).tolist() if len(variants) > 1 else [5]
        colours.append(ramp[shades[min(variants.index(label), len(shades) - 1)]])
    return colours


@dataclass
class CategoryMap:
    """A categorical map: ``codes[row, col]`` index into ``categories``."""

    codes: np.ndarray
    categories: list[str]
    colours: list[str]
    rows: list[str]
    cols: list[str]
    hover: list[list[str]]
    row_title: str
    col_title: str
    title: str
    text: list[list[str]] = field(default_factory=list)  # drawn in the cells (may be empty)


def _categories(labels: Sequence[str]) -> tuple[list[str], list[str]]:
    categories = sorted(set(labels), key=method_key)
    return categories, category_colours(categories)


def plan_layer_map(loaded: LoadedPlan) -> CategoryMap:
    """Layer x step map: the method of each (step, layer), per-head entries marked."""
    plan = loaded.plan
    layers = [l.name for l in plan.model.layers]
    labels = [[cell_label(plan.methods[s][i]) for s in range(plan.steps)] for i in range(len(layers))]
    categories, colours = _categories([x for row in labels for x in row])
    codes = np.asarray([[categories.index(x) for x in row] for row in labels], dtype=np.int64)
    hover = [[f"step {s}, {layers[i]}: {head_breakdown(plan.methods[s][i])}" for s in range(plan.steps)]
             for i in range(len(layers))]
    text = [[cell_text(plan.methods[s][i]) for s in range(plan.steps)] for i in range(len(layers))]
    return CategoryMap(codes, categories, colours, layers, [str(s) for s in range(plan.steps)], hover,
                       "attention layer", "step (0 = noisiest)",
                       f"{loaded.name}: method per step and layer (k/H: k of H heads compressed)", text)


def plan_head_map(loaded: LoadedPlan, layer: int) -> CategoryMap:
    """Head x step map of one layer's per-head methods."""
    plan = loaded.plan
    if not 0 <= layer < plan.n_layers:
        raise DitlensError(f"layer {layer} is out of range: {loaded.name} has {plan.n_layers} attention layers")
    heads = plan.model.heads
    labels = [[plan.head_methods(s, layer)[h].to_str() for s in range(plan.steps)] for h in range(heads)]
    skipped = [plan.skips_module(s, layer) for s in range(plan.steps)]
    categories, colours = _categories([x for row in labels for x in row])
    codes = np.asarray([[categories.index(x) for x in row] for row in labels], dtype=np.int64)
    hover = [[f"step {s}, head {h}: {labels[h][s]}" + (" (whole module skipped)" if skipped[s] else "")
              for s in range(plan.steps)] for h in range(heads)]
    name = plan.model.layers[layer].name
    return CategoryMap(codes, categories, colours, [str(h) for h in range(heads)],
                       [str(s) for s in range(plan.steps)], hover, "head", "step (0 = noisiest)",
                       f"{loaded.name}: heads of {name} ({plan.model.layers[layer].kind} attention)")


def method_shares(loaded: LoadedPlan) -> dict[str, float]:
    """Fraction of (step, layer, head) cells that use each method."""
    plan = loaded.plan
    counts: Counter[str] = Counter()
    for s in range(plan.steps):
        for i in range(plan.n_layers):
            counts.update(m.to_str() for m in plan.head_methods(s, i))
    total = sum(counts.values())
    return {m: counts[m] / total for m in sorted(counts, key=method_key)}


@dataclass
class PlanFlops:
    """Static attention-core FLOPs per (step, layer) of a plan and of the all-full run."""

    core: np.ndarray  # step, layer
    core_full: np.ndarray  # step, layer

    @property
    def fraction(self) -> float:
        return float(self.core.sum() / self.core_full.sum()) if self.core_full.sum() else 1.0

    def by_step(self) -> np.ndarray:
        return self.core.sum(axis=1) / self.core_full.sum(axis=1)

    def by_layer(self) -> np.ndarray:
        return self.core.sum(axis=0) / self.core_full.sum(axis=0)


def plan_flops_table(loaded: LoadedPlan) -> PlanFlops | None:
    """Attention-core FLOPs per (step, layer) with the accounting of ``ditlens.compress.flops``
    (same schedule, same masks): None when the plan's fingerprint lacks the token grid."""
    from ditlens.compress.flops import head_core_flops, layer_sequences
    from ditlens.compress.methods import FULL
    from ditlens.compress.schedule import build_schedule

    plan = loaded.plan
    tokens = plan.model.tokens
    if tokens.grid is None or tokens.n_text is None:
        return None
    rows = 1 if plan.run.cfg_layout == "none" else 2
    d = plan.model.head_dim
    schedule = build_schedule(plan)
    core = np.zeros((plan.steps, plan.n_layers), dtype=np.float64)
    full = np.zeros_like(core)
    for i, layer in enumerate(plan.model.layers):
        seq = layer_sequences(layer, tokens.grid, tokens.n_text)
        full_head = head_core_flops(FULL, seq.layout, d) * seq.count
        for s in range(plan.steps):
            full[s, i] = full_head * plan.model.heads * rows
            action = schedule[s][i]
            if action.skip_module:
                continue
            total = 0
            for method in action.heads:  # an ASC head computes the cond row only
                total += head_core_flops(method, seq.layout, d) * seq.count * (1 if method.asc and rows == 2 else rows)
            for _, wars in action.refresh:  # a refresh step also runs the window to cache R = O - W
                total += head_core_flops(wars, seq.layout, d) * seq.count * (1 if wars.asc and rows == 2 else rows)
            core[s, i] = total
    return PlanFlops(core, full)


def plan_summary(loaded: LoadedPlan, flops: PlanFlops | None) -> list[tuple[str, str]]:
    plan = loaded.plan
    prov = plan.provenance
    run = plan.run
    fp = plan.model
    lines = [
        ("file", str(loaded.path)),
        ("model", f"{fp.family} {fp.transformer_class}: {len(fp.layers)} layers x {fp.heads} heads x {fp.head_dim}"),
        ("run", f"{run.steps} steps, {run.scheduler}, guidance {run.guidance}, {run.height}x{run.width}, cfg {run.cfg_layout}"),
        ("made by", f"{prov.search}" + (f", metric {prov.metric}" if prov.metric else "")
         + (f", delta {prov.delta:g}" if prov.delta is not None else "") + (f", c {prov.c:g}" if prov.c is not None else "")
         + (f" (ditlens {prov.ditlens_version})" if prov.ditlens_version else "")),
    ]
    if plan.flops is not None:
        module = plan.flops.attention_module_fraction
        lines.append(("FLOPs in plan", f"attention core {plan.flops.attention_core_fraction:.3f}"
                      + (f", attention module {module:.3f}" if module is not None else "")
                      + f" of full ({plan.flops.source})"))
    if flops is not None:
        lines.append(("FLOPs (static)", f"attention core {flops.fraction:.3f} of full"))
    else:
        lines.append(("FLOPs (static)", "unknown: the plan's fingerprint has no token grid"))
    if prov.notes:
        lines.append(("notes", prov.notes))
    return lines


def plan_trace_mismatch(loaded: LoadedPlan, header: TraceHeader, layers: Sequence[str]) -> str | None:
    """Why a plan does not describe the trace's model and run (shown as a warning), or None.
    ``layers``: the trace's attention layer names."""
    fp = loaded.plan.model
    if fp.family != header.family:
        return f"{loaded.name} is for a {fp.family} model, the trace's is {header.family}"
    if [l.name for l in fp.layers] != list(layers):
        return f"{loaded.name} lists {len(fp.layers)} attention layers, the trace {len(layers)} with other names: another model"
    if fp.heads != header.n_heads:
        return f"{loaded.name} is for {fp.heads} heads, the trace has {header.n_heads}"
    if loaded.plan.steps != header.steps:
        return f"{loaded.name} is for {loaded.plan.steps} steps, the trace has {header.steps}"
    grid = tuple(header.tokens.grid)
    if fp.tokens.grid is not None and tuple(fp.tokens.grid) != grid:
        return (f"{loaded.name} is for a token grid of {'x'.join(map(str, fp.tokens.grid))} (frames x height x width), "
                f"the trace's is {'x'.join(map(str, grid))}: another resolution")
    return None


def differing_cells(a: LoadedPlan, b: LoadedPlan) -> int | None:
    """(step, layer) entries where two plans of the same shape differ; None when shapes differ."""
    pa, pb = a.plan, b.plan
    if pa.steps != pb.steps or pa.n_layers != pb.n_layers or pa.model.heads != pb.model.heads:
        return None
    return sum(pa.head_methods(s, i) != pb.head_methods(s, i) for s in range(pa.steps) for i in range(pa.n_layers))


# ---------------------------------------------------------------------------------------------
# Validation reports


@dataclass
class LoadedReport:
    name: str
    folder: Path
    data: dict[str, Any]
    grid_png: bytes | None
    markdown: str = ""
    metrics: list[tuple[str, str]] = field(default_factory=list)
    per_prompt: list[dict[str, object]] = field(default_factory=list)

    def grid_data_uri(self) -> str | None:
        if self.grid_png is None:
            return None
        return "data:image/png;base64," + base64.b64encode(self.grid_png).decode("ascii")


def _fmt(value: object, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e5 else f"{value:.4e}"
    return str(value)


def _percent(value: object) -> str:
    return f"{value:.1%}" if isinstance(value, (int, float)) else "n/a"


def _times(value: object) -> str:
    return f"{value:.2f}x" if isinstance(value, (int, float)) else "n/a"


def report_metrics(d: dict[str, Any]) -> list[tuple[str, str]]:
    """The metrics table of a ``validate.json``, in the order of ``validate.md``."""
    flops = d.get("flops") or {}
    rows = [
        ("model", _fmt(d.get("model")) or "n/a"),
        ("plan", _fmt(d.get("plan"))),
        ("prompts", str(len(d.get("prompts") or []))),
        ("PSNR (dB, mean)", f"{d['psnr_mean']:.2f}" if isinstance(d.get("psnr_mean"), (int, float)) else "n/a"),
        ("SSIM (mean)", f"{d['ssim_mean']:.4f}" if isinstance(d.get("ssim_mean"), (int, float)) else "n/a"),
        ("attention-core FLOPs fraction", _fmt(flops.get("attention_core_fraction"))),
        ("attention-module FLOPs fraction", _fmt(flops.get("attention_module_fraction"))),
        ("end-to-end s (full / plan)", f"{_fmt(d.get('seconds_full'))} / {_fmt(d.get('seconds_plan'))}"),
        ("attention s (full / plan)", f"{_fmt(d.get('attention_seconds_full'))} / {_fmt(d.get('attention_seconds_plan'))}"),
        ("attention-module share (full)", _percent(d.get("attention_share"))),
        ("end-to-end speedup (Amdahl bound)", f"{_times(d.get('speedup'))} ({_times(d.get('amdahl_bound'))})"),
        ("speed", _fmt(d.get("speed_verdict"))),
        ("timing", f"every forward replayed from a CUDA graph ({_fmt(d.get('graph_replays'))} replays)"
                   if d.get("cuda_graphs") else "eager"),
        ("peak memory bytes (full / plan)", f"{_fmt(d.get('peak_memory_full'))} / {_fmt(d.get('peak_memory_plan'))}"),
        ("peak cache bytes", _fmt(d.get("peak_cache_bytes"))),
    ]
    for key, value in (d.get("classifier") or {}).items():
        rows.append((key, _fmt(value)))
    return rows


def load_report(path: str | Path) -> LoadedReport:
    """A ``ditlens validate`` output folder (or its ``validate.json``)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    json_path = path if path.is_file() else folder / "validate.json"
    if not json_path.is_file():
        raise DitlensError(f"no validation report at {path}: pass the folder `ditlens validate --out` wrote "
                           "(it holds validate.json and grid.png)")
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DitlensError(f"{json_path} is not a JSON validation report ({err})") from None
    if not isinstance(data, dict) or "psnr" not in data or "prompts" not in data:
        raise DitlensError(f"{json_path} is not a ditlens validation report (no psnr/prompts fields)")
    grid = folder / "grid.png"
    md = folder / "validate.md"
    per_prompt = [{"prompt": p, "PSNR (dB)": round(float(a), 3), "SSIM": round(float(b), 5)}
                  for p, a, b in zip(data.get("prompts", []), data.get("psnr", []), data.get("ssim", []))]
    name = folder.name if json_path.name == "validate.json" else json_path.name
    return LoadedReport(name, folder, data, grid.read_bytes() if grid.is_file() else None,
                        md.read_text(encoding="utf-8") if md.is_file() else "", report_metrics(data), per_prompt)


__all__ = ["LoadedPlan", "load_plans", "plan_layer_map", "plan_head_map", "method_shares", "plan_flops_table",
           "PlanFlops", "plan_summary", "plan_trace_mismatch", "differing_cells", "LoadedReport", "load_report",
           "CategoryMap", "cell_label", "cell_text"]
