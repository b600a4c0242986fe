"""Plotly figures of the dashboard, built from :mod:`ditlens.dashboards.data` and
:mod:`ditlens.dashboards.plans` objects. Values go to the browser as plain lists (NaN as null),
so what a test reads back from the page is exactly what was computed."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import plotly.colors as pc
import plotly.graph_objects as go

from ditlens.dashboards.data import Heatmap
from ditlens.dashboards.plans import CategoryMap, PlanFlops

FONT = dict(family="Helvetica, Arial, sans-serif", size=13)
MARGIN = dict(l=10, r=10, t=60, b=50)


def as_list(values: np.ndarray) -> list:
    """float array -> nested lists with None for NaN/inf (JSON null: a gap in plotly)."""
    arr = np.asarray(values, dtype=np.float64)
    out = arr.astype(object)
    out[~np.isfinite(arr)] = None
    return out.tolist()


def _height(n_rows: int, base: int = 170, per_row: int = 24, low: int = 340, high: int = 1100) -> int:
    return int(min(high, max(low, base + per_row * n_rows)))


def empty_figure(message: str = "") -> go.Figure:
    fig = go.Figure()
    fig.update_layout(template="plotly_white", font=FONT, height=260, margin=MARGIN,
                      xaxis=dict(visible=False), yaxis=dict(visible=False))
    if message:
        fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                           font=dict(size=14, color="#7a2e0e"))
    return fig


def heatmap_figure(hm: Heatmap, colorscale: str = "Viridis") -> go.Figure:
    """A labelled heatmap; for redundancy measures bright always means redundant."""
    reverse = hm.higher_is_redundant is False
    hint = ""
    if hm.higher_is_redundant is not None:
        hint = "<br><sub>bright = redundant</sub>"
    custom = None
    step_hover = ""
    if hm.col_hover:
        custom = [[hm.col_hover[j] for j in range(len(hm.cols))] for _ in hm.rows]
        step_hover = " (timestep %{customdata})"
    row_name = hm.row_title or "row"
    trace = go.Heatmap(
        z=as_list(hm.z), x=list(hm.cols), y=list(hm.rows), customdata=custom, colorscale=colorscale,
        reversescale=reverse, colorbar=dict(title=dict(text=f"{hm.value_name}{hint}")), xgap=1, ygap=1,
        hovertemplate=f"{row_name} %{{y}}<br>{hm.col_title.split(' (')[0]} %{{x}}{step_hover}"
                      f"<br>{hm.value_name} = %{{z:.4g}}<extra></extra>",
    )
    fig = go.Figure(trace)
    fig.update_layout(
        template="plotly_white", font=FONT, margin=MARGIN, height=_height(len(hm.rows)),
        title=dict(text=hm.title, font=dict(size=15)),
        xaxis=dict(title=hm.col_title, type="category", tickmode="auto", nticks=min(40, len(hm.cols))),
        yaxis=dict(title=hm.row_title, type="category", autorange="reversed", automargin=True),
    )
    return fig


def layer_lines_figure(hm: Heatmap) -> go.Figure:
    """One line per row of a map (per layer across steps), coloured by depth."""
    fig = go.Figure()
    n = len(hm.rows)
    colours = pc.sample_colorscale("Viridis", [i / max(1, n - 1) for i in range(n)])
    for i, name in enumerate(hm.rows):
        fig.add_trace(go.Scatter(
            x=list(hm.cols), y=as_list(hm.z[i]), mode="lines+markers", name=name, line=dict(color=colours[i], width=2),
            marker=dict(size=5), hovertemplate=f"{name}<br>step %{{x}}<br>{hm.value_name} = %{{y:.4g}}<extra></extra>",
        ))
    direction = {True: " (higher = more redundant)", False: " (lower = more redundant)"}.get(hm.higher_is_redundant, "")
    fig.update_layout(
        template="plotly_white", font=FONT, margin=MARGIN, height=440,
        title=dict(text=f"per layer across steps: {hm.title}", font=dict(size=15)),
        xaxis=dict(title=hm.col_title, type="category"), yaxis=dict(title=f"{hm.value_name}{direction}"),
        legend=dict(font=dict(size=11)), showlegend=n <= 40,
    )
    return fig


def prompt_curves_figure(values: np.ndarray, prompts: Sequence[str], steps: Sequence[str], title: str,
                         value_name: str) -> go.Figure:
    """One line per prompt (mean over heads of one layer), plus the prompt mean."""
    fig = go.Figure()
    for i, prompt in enumerate(prompts):
        fig.add_trace(go.Scatter(x=list(steps), y=as_list(values[i]), mode="lines", name=_short(prompt),
                                 line=dict(width=1.2), opacity=0.75,
                                 hovertemplate=f"{_short(prompt)}<br>step %{{x}}<br>{value_name} = %{{y:.4g}}<extra></extra>"))
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(values, axis=0)
    fig.add_trace(go.Scatter(x=list(steps), y=as_list(mean), mode="lines+markers", name="mean of prompts",
                             line=dict(color="black", width=3)))
    fig.update_layout(template="plotly_white", font=FONT, margin=MARGIN, height=420,
                      title=dict(text=title, font=dict(size=15)), xaxis=dict(title="step (0 = noisiest)", type="category"),
                      yaxis=dict(title=value_name), showlegend=len(prompts) <= 30)
    return fig


def _short(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def category_figure(cm: CategoryMap) -> go.Figure:
    """A categorical map (methods of a plan) with a legend of its categories. The heatmap's
    ``meta`` lists the categories, so ``z`` (category codes) can be read back as labels."""
    k = len(cm.categories)
    scale = []
    for i, colour in enumerate(cm.colours):  # a step colour scale: category i fills [i/k, (i+1)/k]
        scale += [[i / k, colour], [(i + 1) / k, colour]]
    cells = len(cm.rows) * len(cm.cols)
    show_text = bool(cm.text) and cells <= 900  # numbers in a few thousand cells are unreadable
    trace = go.Heatmap(
        z=cm.codes.tolist(), x=list(cm.cols), y=list(cm.rows), customdata=cm.hover,
        hovertemplate="%{customdata}<extra></extra>", colorscale=scale, zmin=-0.5, zmax=k - 0.5, xgap=1, ygap=1,
        showscale=False, meta=list(cm.categories), name="methods",
        text=cm.text if show_text else None, texttemplate="%{text}" if show_text else None,
        textfont=dict(size=11, color="black"),
    )
    fig = go.Figure(trace)
    for label, colour in zip(cm.categories, cm.colours):  # legend entries (no data)
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=label, showlegend=True, hoverinfo="skip",
                                 marker=dict(symbol="square", size=14, color=colour, line=dict(width=1, color="#555"))))
    fig.update_layout(
        template="plotly_white", font=FONT, margin=MARGIN, height=_height(len(cm.rows), base=170, per_row=22),
        title=dict(text=cm.title, font=dict(size=14)), legend=dict(title=dict(text="method")),
        xaxis=dict(title=cm.col_title, type="category"),
        yaxis=dict(title=cm.row_title, type="category", autorange="reversed", automargin=True),
    )
    return fig


def flops_figure(named: Sequence[tuple[str, PlanFlops]]) -> go.Figure:
    """Attention-core FLOPs fraction per step, one line per plan."""
    fig = go.Figure()
    for name, flops in named:
        fig.add_trace(go.Scatter(
            x=[str(s) for s in range(flops.core.shape[0])], y=as_list(flops.by_step()), mode="lines+markers",
            name=f"{name} (total {flops.fraction:.3f})",
            hovertemplate=f"{name}<br>step %{{x}}<br>core FLOPs fraction = %{{y:.3f}}<extra></extra>"))
    fig.update_layout(template="plotly_white", font=FONT, margin=MARGIN, height=360,
                      title=dict(text="attention-core FLOPs per step, as a fraction of full attention", font=dict(size=14)),
                      xaxis=dict(title="step (0 = noisiest)", type="category"),
                      yaxis=dict(title="fraction of full", range=[0, 1.05]), legend=dict(orientation="h", y=-0.25))
    return fig


def shares_figure(named: Sequence[tuple[str, dict[str, float]]], colours: dict[str, str]) -> go.Figure:
    """Share of (step, layer, head) cells per method, one group of bars per plan."""
    methods: list[str] = []
    for _, shares in named:
        methods += [m for m in shares if m not in methods]
    fig = go.Figure()
    for method in methods:
        fig.add_trace(go.Bar(x=[name for name, _ in named], y=[shares.get(method, 0.0) for _, shares in named],
                             name=method, marker_color=colours.get(method),
                             hovertemplate=f"{method}: %{{y:.1%}} of step x layer x head cells<extra></extra>"))
    fig.update_layout(template="plotly_white", font=FONT, margin=MARGIN, height=360, barmode="stack",
                      title=dict(text="methods: share of (step, layer, head) cells", font=dict(size=14)),
                      xaxis=dict(title="plan"), yaxis=dict(title="share", tickformat=".0%", range=[0, 1]))
    return fig


__all__ = ["heatmap_figure", "layer_lines_figure", "prompt_curves_figure", "category_figure", "flops_figure",
           "shares_figure", "empty_figure", "as_list"]
