"""Exact FLOPs accounting (DESIGN §5).

Attention-core FLOPs of one head = 4 · head_dim · (attended query-key pairs): 2·d per pair for
q·k and 2·d for the weighted sum of values. A head that reuses a cache (AST) or copies the cond
branch (ASC, on the uncond rows) costs 0. Pair counts come from the same mask definitions the
runtime executes (:func:`ditlens.compress.methods.attended_pairs`).

Attention-module FLOPs add the projections: each ``nn.Linear`` inside an attention module costs
2 · in_features · out_features per token it is applied to. A whole-layer AST skips the module,
projections included.

Two views:

* static, from a plan and the model fingerprint (:func:`plan_flops`), with the token layout
  each layer kind uses in diffusers: self attention runs one sequence per frame, temporal
  attention one sequence of frames per grid position, cross attention image queries against
  text keys, joint attention one sequence of text + image tokens;
* measured, from the masks a run actually executed (:class:`FlopsCounter`, filled by the runtime).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

from ditlens.compress.methods import FULL, CallLayout, HeadMethod, attended_pairs

if TYPE_CHECKING:
    from ditlens.compress.plan import LayerInfo, Plan


@dataclass(frozen=True)
class LayerSequences:
    """The attention products one layer runs per batch row: ``count`` sequences of ``layout``."""

    layout: CallLayout
    count: int


def layer_sequences(layer: "LayerInfo", grid: tuple[int, int, int], n_text: int) -> LayerSequences:
    frames, rows, cols = grid
    if layer.kind == "joint":
        n = frames * rows * cols + n_text
        return LayerSequences(CallLayout(n, n, n_text, layer.text_position == "first", grid), 1)
    if layer.kind == "temporal":
        return LayerSequences(CallLayout(frames, frames, 0, False, None), rows * cols)
    if layer.kind == "cross":
        return LayerSequences(CallLayout(rows * cols, n_text, 0, False, (1, rows, cols), cross=True), frames)
    return LayerSequences(CallLayout(rows * cols, rows * cols, 0, False, (1, rows, cols)), frames)


def longest_image_sequence(layers: Iterable[Any], grid: tuple[int, int, int]) -> int:
    """Image tokens of the longest sequence a self or joint layer attends over: what window widths
    are sized against (all frames in joint 3D attention, one frame in per-frame self attention, as in
    Latte, not the whole grid). ``layers``: LayerInfo or the adapters' AttentionLayer (kind, text_position)."""
    lengths = [layer_sequences(l, grid, 0).layout.n_image for l in layers if l.kind in ("self", "joint")]
    return max(lengths, default=grid[0] * grid[1] * grid[2])


def head_core_flops(method: HeadMethod, layout: CallLayout, head_dim: int) -> int:
    return 4 * head_dim * attended_pairs(method, layout)


@dataclass
class FlopsReport:
    """FLOPs of a plan (or a run) and of the same run with every head full."""

    core: int
    core_full: int
    projections: int | None = None
    projections_full: int | None = None

    @property
    def core_fraction(self) -> float:
        return self.core / self.core_full if self.core_full else 1.0

    @property
    def module_fraction(self) -> float | None:
        if self.projections is None or self.projections_full is None:
            return None
        total = self.core_full + self.projections_full
        return (self.core + self.projections) / total if total else 1.0

    def as_dict(self) -> dict[str, Any]:
        return {"attention_core_flops": self.core, "attention_core_flops_full": self.core_full,
                "projection_flops": self.projections, "projection_flops_full": self.projections_full,
                "attention_core_fraction": self.core_fraction, "attention_module_fraction": self.module_fraction}


def plan_flops(plan: "Plan", projection_flops_per_row: list[int] | None = None) -> FlopsReport | None:
    """Static FLOPs of ``plan`` per image (all steps, both CFG branches), None without a token grid.

    ``projection_flops_per_row``: projection FLOPs of each layer for one batch row (see
    :func:`projection_flops`); gives the module fraction.
    """
    tokens = plan.model.tokens
    if tokens.grid is None or tokens.n_text is None:
        return None
    from ditlens.compress.schedule import build_schedule

    schedule = build_schedule(plan)
    rows = 1 if plan.run.cfg_layout == "none" else 2
    d = plan.model.head_dim
    core = core_full = 0
    proj = proj_full = 0
    for i, layer in enumerate(plan.model.layers):
        seq = layer_sequences(layer, tokens.grid, tokens.n_text)
        full_head = head_core_flops(FULL, seq.layout, d) * seq.count
        for s in range(plan.steps):
            core_full += full_head * plan.model.heads * rows
            if projection_flops_per_row is not None:
                proj_full += projection_flops_per_row[i] * rows
            action = schedule[s][i]
            if action.skip_module:
                continue
            if projection_flops_per_row is not None:
                proj += projection_flops_per_row[i] * rows
            for method in action.heads:
                per_row = head_core_flops(method, seq.layout, d) * seq.count
                core += per_row * (1 if method.asc and rows == 2 else rows)
            for _, wars in action.refresh:  # the refresh step also runs the window to get R = O - W
                core += head_core_flops(wars, seq.layout, d) * seq.count * (1 if wars.asc and rows == 2 else rows)
    if projection_flops_per_row is None:
        return FlopsReport(core, core_full)
    return FlopsReport(core, core_full, proj, proj_full)


def plan_core_fraction(plan: "Plan") -> float | None:
    report = plan_flops(plan)
    return None if report is None else report.core_fraction


def projection_flops(transformer: Any, layers: list["LayerInfo"], grid: tuple[int, int, int], n_text: int) -> list[int]:
    """Projection FLOPs of each attention layer for one batch row, from its Linear shapes.

    Which tokens a Linear sees follows diffusers' attention modules: ``add_*_proj`` and
    ``to_add_out`` project text (context) tokens; in cross attention ``to_k``/``to_v`` project
    text; joint attention without separate context projections (CogVideoX, FLUX single blocks)
    projects text and image tokens together; everything else projects the layer's query tokens.
    """
    from torch import nn

    frames, rows, cols = grid
    n_image = frames * rows * cols
    out = []
    for layer in layers:
        module = transformer.get_submodule(layer.name)
        has_context = any(n.startswith("add_") or n == "to_add_out" for n, _ in module.named_children())
        total = 0
        for name, sub in module.named_modules():
            if not isinstance(sub, nn.Linear):
                continue
            top = name.split(".")[0]
            if top.startswith("add_") or top == "to_add_out":
                tokens = n_text
            elif layer.kind == "cross" and top in ("to_k", "to_v"):
                tokens = n_text * frames
            elif layer.kind == "joint" and not has_context:
                tokens = n_image + n_text
            else:
                tokens = n_image
            total += 2 * sub.in_features * sub.out_features * tokens
        out.append(total)
    return out


@dataclass
class FlopsCounter:
    """What a run executed (filled by the runtime): attention core per call, projections per Linear call."""

    core: int = 0
    core_full: int = 0
    projections: int = 0
    projections_full: int = 0
    # latest projection / full-core FLOPs of each (layer, branch key): what a skipped module would have cost
    last_projection: dict[tuple[int, str], int] = field(default_factory=dict)
    last_core_full: dict[tuple[int, str], int] = field(default_factory=dict)

    def reset(self) -> None:
        self.core = self.core_full = self.projections = self.projections_full = 0
        self.last_projection.clear()
        self.last_core_full.clear()

    def copy(self) -> "FlopsCounter":
        return FlopsCounter(self.core, self.core_full, self.projections, self.projections_full,
                            dict(self.last_projection), dict(self.last_core_full))

    def report(self) -> FlopsReport:
        return FlopsReport(self.core, self.core_full, self.projections, self.projections_full)
