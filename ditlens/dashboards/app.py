"""The Dash redundancy explorer: ``create_app(trace, plan=None, report=None)``.

Views (tabs): overview of the run; layer x step redundancy maps with a per-head drill-down and
per-layer curves; prompt variability (CV maps, the mean-CV table, per-prompt curves); influence
and locality maps, rendered generically from any labelled dataset under ``/influence`` or
``/locality``; plans (method maps, per-head breakdown, FLOPs, two plans side by side);
validation reports (metrics table and image grid).

The trace is opened once and read lazily (:class:`ditlens.dashboards.data.TraceData`); each
callback reads the slices its figures need. A missing group or statistic is a message on the
page, never a traceback.
"""

from __future__ import annotations

import logging
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import dash
from dash import ALL, Dash, Input, Output, State, dcc, html

from ditlens.dashboards import figures as figs
from ditlens.dashboards.data import (
    COMPARISON_NAMES,
    EXTRA_ROOTS,
    MEAN,
    METRIC_NAMES,
    SUM,
    TraceData,
    default_pick,
    human_bytes,
    stat_key,
)
from ditlens.dashboards.plans import (
    LoadedPlan,
    LoadedReport,
    category_colours,
    differing_cells,
    load_plans,
    load_report,
    method_key,
    method_shares,
    plan_flops_table,
    plan_head_map,
    plan_layer_map,
    plan_summary,
    plan_trace_mismatch,
)
from ditlens.errors import DitlensError

LOG = logging.getLogger("ditlens.dashboards")

TABS: tuple[tuple[str, str], ...] = (
    ("overview", "Overview"),
    ("maps", "Redundancy maps"),
    ("variability", "Prompt variability"),
    ("influence", "Influence"),
    ("locality", "Locality"),
    ("plans", "Plans"),
    ("validation", "Validation"),
)
STAT_TABS = ("maps", "variability")
EXTRA_ABOUT = {
    "influence": "Influence of a compression candidate on a head: the head's share of the layer's relative squared "
                 "error when only that head is compressed (DiTFastAttnV2; DESIGN §4). Lower is safer to compress. "
                 "Blank cells: the candidate does not apply there (AST at step 0, ASC on the cond branch).",
    "locality": "Attention locality recorded by the profiler. Choose which axes run across and down; every other "
                "axis is averaged or fixed to one entry.",
}
HIDDEN = {"display": "none"}
NONE = "none"
ONE_ROW = "(one row)"  # the "down" choice of a generic map that draws a single row

CSS = """
body { font-family: Helvetica, Arial, sans-serif; margin: 0; background: #f6f7f9; color: #1f2328; }
.top { background: #1f3a5f; color: white; padding: 12px 20px; }
.top h1 { font-size: 20px; margin: 0 0 4px 0; font-weight: 600; }
.top .sub { font-size: 13px; opacity: 0.9; }
.page { padding: 0 20px 30px 20px; }
.controls { display: flex; flex-wrap: wrap; gap: 18px; align-items: flex-end; background: white;
            border: 1px solid #d0d7de; border-radius: 6px; padding: 10px 14px; margin: 12px 0; }
.control { display: flex; flex-direction: column; gap: 4px; min-width: 120px; }
.control label.title { font-size: 11px; font-weight: 700; text-transform: uppercase; color: #57606a; }
.control .dash-dropdown { min-width: 220px; }
.card { background: white; border: 1px solid #d0d7de; border-radius: 6px; padding: 10px 14px; margin: 12px 0; }
.card h3 { margin: 4px 0 8px 0; font-size: 16px; }
.note { font-size: 12px; color: #57606a; margin: 2px 0 6px 4px; }
.msg { background: #fff8c5; border: 1px solid #d4a72c; color: #4d2d00; border-radius: 6px; padding: 10px 14px;
       margin: 12px 0; font-size: 14px; }
table.facts { border-collapse: collapse; font-size: 14px; }
table.facts td, table.facts th { border-bottom: 1px solid #eaeef2; padding: 5px 12px 5px 0; text-align: left;
       vertical-align: top; }
table.facts th { color: #57606a; font-weight: 600; white-space: nowrap; }
table.num td { text-align: right; font-variant-numeric: tabular-nums; }
table.num td:first-child { text-align: left; }
.row { display: flex; gap: 14px; flex-wrap: wrap; }
.col { flex: 1 1 480px; min-width: 0; }
img.grid { image-rendering: pixelated; border: 1px solid #d0d7de; }
"""

INDEX = """<!DOCTYPE html>
<html>
  <head>
    {%metas%}
    <title>{%title%}</title>
    {%favicon%}
    {%css%}
    <style>""" + CSS + """</style>
  </head>
  <body>
    {%app_entry%}
    <footer>{%config%}{%scripts%}{%renderer%}</footer>
  </body>
</html>
"""


def create_app(trace_path: str | Path, plan: str | Path | Sequence[str | Path] | None = None,
               report: str | Path | Sequence[str | Path] | None = None) -> Dash:
    """The explorer for one trace, optionally with plans (one or two or more, compared side by
    side) and ``ditlens validate`` report folders. Bad inputs raise a one-line DitlensError."""
    data = TraceData(trace_path)
    plans = load_plans(_as_list(plan))
    reports = [load_report(p) for p in _as_list(report)]
    app = Dash(__name__, title=f"ditlens · {data.path.name}", update_title=None, suppress_callback_exceptions=True)
    app.index_string = INDEX
    app.layout = _layout(data)
    _register(app, data, plans, reports)
    return app


def _as_list(value: str | Path | Sequence[str | Path] | None) -> list[str | Path]:
    if value is None:
        return []
    if isinstance(value, (str, Path)):
        return [value]
    return list(value)


# ---------------------------------------------------------------------------------------------
# Layout


def _control(title: str, component: Any, wrapper_id: str) -> html.Div:
    return html.Div([html.Label(title, className="title"), component], className="control", id=wrapper_id)


def _radio(id_: str, values: Sequence[str], labels: dict[str, str] | None = None,
           default: str | None = None) -> dcc.RadioItems:
    labels = labels or {}
    value = default if default in values else (values[0] if values else None)
    return dcc.RadioItems(id=id_, options=[{"label": labels.get(v, v), "value": v} for v in values],
                          value=value, inline=True,
                          inputStyle={"marginRight": "4px"}, labelStyle={"marginRight": "12px"})


def _layout(data: TraceData) -> html.Div:
    h = data.header
    opts = data.stat_options()
    sub = (f"{h.model_id} [{h.family}] · {h.steps} steps · {data.n_done} prompts · {len(h.layers)} layers x "
           f"{h.n_heads} heads · {human_bytes(data.trace.file_size)}")
    prompt_options = [{"label": f"mean of {data.n_done} prompts", "value": MEAN}] + [
        {"label": f"{i}: {p}", "value": str(i)} for i, p in enumerate(data.prompts)]
    head_options = [{"label": "mean over heads", "value": MEAN}] + [
        {"label": f"head {i}", "value": str(i)} for i in range(data.n_heads)]
    layer_options = [{"label": f"{i}: {name}", "value": str(i)} for i, name in enumerate(data.layers)]
    comparisons = opts["comparison"] or ["step"]
    controls = html.Div(id="stat-controls", className="controls", children=[
        _control("token group", _radio("ctl-group", opts["group"] or ["image"]), "wrap-group"),
        _control("tensor", _radio("ctl-tensor", opts["tensor"] or ["o"], {t: t.upper() for t in "qkvo"}, default="o"), "wrap-tensor"),
        _control("comparison", _radio("ctl-comparison", comparisons, COMPARISON_NAMES), "wrap-comparison"),
        _control("metric", _radio("ctl-metric", opts["metric"] or ["l1"], METRIC_NAMES), "wrap-metric"),
        _control("branch", _radio("ctl-branch", data.branches), "wrap-branch"),
        _control("prompt", dcc.Dropdown(id="ctl-prompt", options=prompt_options, value=MEAN, clearable=False),
                 "wrap-prompt"),
        _control("head", dcc.Dropdown(id="ctl-head", options=head_options, value=MEAN, clearable=False), "wrap-head"),
        _control("layer (drill-down)", dcc.Dropdown(id="ctl-layer", options=layer_options, value="0", clearable=False),
                 "wrap-layer"),
    ])
    return html.Div([
        html.Div([html.H1(f"ditlens · {data.path.name}"), html.Div(sub, className="sub")], className="top"),
        html.Div(className="page", children=[
            dcc.Tabs(id="tabs", value="overview", children=[dcc.Tab(label=label, value=value) for value, label in TABS]),
            controls,
            html.Div(id="view"),
        ]),
    ])


def _msg(text: str, id_: str | None = None) -> html.Div:
    kwargs = {"id": id_} if id_ else {}
    return html.Div(text, className="msg", style=None if text else HIDDEN, **kwargs)


def _graph(id_: str) -> dcc.Graph:
    return dcc.Graph(id=id_, figure=figs.empty_figure(), config={"displaylogo": False})


def _facts_table(rows: Sequence[tuple[str, str]], id_: str | None = None) -> html.Table:
    kwargs = {"id": id_} if id_ else {}
    return html.Table([html.Tr([html.Th(k), html.Td(v)]) for k, v in rows], className="facts", **kwargs)


def _overview_view(data: TraceData) -> html.Div:
    contents = data.contents()
    table = html.Table(
        [html.Tr([html.Th("group"), html.Th("datasets"), html.Th("stored"), html.Th("holds")])]
        + [html.Tr([html.Td(r.group), html.Td(str(r.datasets)), html.Td(human_bytes(r.stored_bytes)),
                    html.Td(r.description)]) for r in contents],
        className="facts", id="overview-contents")
    missing = [f"/{root}" for root in EXTRA_ROOTS if not data.extra_datasets(root)]
    if not any(r.group == "/maps" for r in contents):
        missing.append("/maps (run `ditlens analyze TRACE` to store prompt aggregates; views compute them meanwhile)")
    shown = data.prompts[:100]
    prompts = html.Ol([html.Li(p) for p in shown], start=0, style={"columns": "2", "fontSize": "13px"})
    more = html.Div(f"... and {data.n_done - len(shown)} more", className="note") if data.n_done > len(shown) else None
    return html.Div([
        html.Div([html.H3("Run"), _facts_table(data.run_facts(), "overview-facts")], className="card"),
        html.Div([html.H3("What the trace holds"), table,
                  html.Div(("not in this trace: " + "; ".join(missing)) if missing else "", className="note")],
                 className="card"),
        html.Div([html.H3(f"Prompts ({data.n_done} finished)"), prompts, more], className="card"),
    ])


def _maps_view() -> html.Div:
    return html.Div([
        _msg("", "maps-msg"),
        html.Div([_graph("maps-heatmap"), html.Div(id="maps-note", className="note"),
                  html.Div("click a cell to drill down into that layer's heads", className="note")], className="card"),
        html.Div([_graph("maps-heads"), html.Div(id="maps-heads-note", className="note")], className="card"),
        html.Div([_graph("maps-lines")], className="card"),
    ])


def _variability_view() -> html.Div:
    return html.Div([
        _msg("", "vari-msg"),
        html.Div([_graph("vari-cv"), html.Div(id="vari-note", className="note")], className="card"),
        html.Div([html.H3("Mean coefficient of variation across prompts (over layers, steps and heads; "
                          "DiTCacheAnalysis Table 2)"),
                  html.Div("rows of step comparisons use the selected branch", className="note"),
                  html.Div(id="vari-table")], className="card"),
        html.Div([_graph("vari-curves")], className="card"),
    ])


def _extra_view(data: TraceData, root: str) -> html.Div:
    paths = data.extra_datasets(root)
    if not paths:
        return html.Div([_msg(EXTRA_ROOTS[root], f"{root}-msg")])
    x, y, picks = data.default_view(paths[0])
    axes, _ = data.dataset_axes(paths[0])
    axis_options = [{"label": a, "value": a} for a in axes]
    y_options = axis_options + [{"label": ONE_ROW, "value": ONE_ROW}]
    return html.Div([
        _msg("", f"{root}-msg"),
        html.Div(EXTRA_ABOUT.get(root, ""), className="note", style={"marginTop": "10px"}),
        html.Div(className="controls", children=[
            _control("dataset", dcc.Dropdown(id=f"{root}-dataset", options=paths, value=paths[0], clearable=False),
                     f"{root}-wrap-dataset"),
            _control("across (x)", dcc.Dropdown(id=f"{root}-x", options=axis_options, value=x, clearable=False),
                     f"{root}-wrap-x"),
            _control("down (y)", dcc.Dropdown(id=f"{root}-y", options=y_options, value=y or ONE_ROW, clearable=False),
                     f"{root}-wrap-y"),
            html.Div(id=f"{root}-picks", children=_pickers(data, root, paths[0], x, y, picks),
                     style={"display": "flex", "gap": "18px", "flexWrap": "wrap"}),
        ]),
        html.Div([_graph(f"{root}-graph"), html.Div(id=f"{root}-note", className="note")], className="card"),
    ])


def _pickers(data: TraceData, root: str, path: str, x: str, y: str, picks: dict[str, str]) -> list[html.Div]:
    """One picker per axis that is neither across nor down: a position, or the mean."""
    axes, _ = data.dataset_axes(path)
    out = []
    for axis in axes:
        if axis in (x, y):
            continue
        labels = data.axis_labels(path, axis)
        options = [{"label": f"mean over {axis}", "value": MEAN}, {"label": f"sum over {axis}", "value": SUM}] + [
            {"label": f"{i}: {label}" if label != str(i) else label, "value": str(i)} for i, label in enumerate(labels)]
        out.append(_control(axis, dcc.Dropdown(id={"type": "pick", "root": root, "axis": axis}, options=options,
                                               value=picks.get(axis, default_pick(axis)), clearable=False),
                            f"{root}-wrap-pick-{axis}"))
    return out


def _plans_view(plans: list[LoadedPlan], data: TraceData) -> html.Div:
    if not plans:
        return html.Div([_msg("no plan given: start the dashboard with --plan PLAN.json (give --plan twice to compare "
                              "two plans side by side)", "plans-msg")])
    options = [{"label": p.name, "value": str(i)} for i, p in enumerate(plans)]
    n_layers = plans[0].plan.n_layers
    layer_options = [{"label": f"{i}: {l.name}", "value": str(i)} for i, l in enumerate(plans[0].plan.model.layers)]
    return html.Div([
        _msg("", "plans-msg"),
        html.Div(className="controls", children=[
            _control("left plan", dcc.Dropdown(id="plan-a", options=options, value="0", clearable=False), "wrap-plan-a"),
            _control("right plan", dcc.Dropdown(id="plan-b", options=[{"label": "(none)", "value": NONE}] + options,
                                                value="1" if len(plans) > 1 else NONE, clearable=False), "wrap-plan-b"),
            _control("layer (per-head breakdown)", dcc.Dropdown(id="plan-layer", options=layer_options,
                                                                value=str(min(1, n_layers - 1)) if n_layers else "0",
                                                                clearable=False), "wrap-plan-layer"),
        ]),
        html.Div(id="plans-compare", className="note"),
        html.Div(className="row", children=[html.Div(id="plan-col-a", className="col"),
                                            html.Div(id="plan-col-b", className="col")]),
        html.Div(className="row", children=[
            html.Div([_graph("plan-flops")], className="card col"),
            html.Div([_graph("plan-shares")], className="card col"),
        ]),
    ])


def _validation_view(reports: list[LoadedReport]) -> html.Div:
    if not reports:
        return html.Div([_msg("no validation report given: start the dashboard with --report DIR, the folder "
                              "`ditlens validate --out DIR` wrote", "validation-msg")])
    options = [{"label": r.name, "value": str(i)} for i, r in enumerate(reports)]
    return html.Div([
        _msg("", "validation-msg"),
        html.Div(className="controls", children=[
            _control("report", dcc.Dropdown(id="report-pick", options=options, value="0", clearable=False),
                     "wrap-report")]),
        html.Div(id="report-body"),
    ])


def _report_body(report: LoadedReport) -> list[Any]:
    per_prompt = html.Table(
        [html.Tr([html.Th("prompt"), html.Th("PSNR (dB)"), html.Th("SSIM")])]
        + [html.Tr([html.Td(r["prompt"]), html.Td(f"{r['PSNR (dB)']:.2f}"), html.Td(f"{r['SSIM']:.4f}")])
           for r in report.per_prompt], className="facts num", id="report-prompts")
    uri = report.grid_data_uri()
    n = max(1, len(report.per_prompt))
    if uri is None:
        image: Any = _msg(f"{report.folder} has no grid.png")
    else:
        image = html.Img(src=uri, id="report-grid", className="grid",
                         style={"height": f"{min(900, 150 * n)}px", "maxWidth": "100%"})
    return [
        html.Div(className="row", children=[
            html.Div([html.H3(f"Validation: {report.name}"), _facts_table(report.metrics, "report-metrics")],
                     className="card col"),
            html.Div([html.H3("Per prompt"), per_prompt], className="card col"),
        ]),
        html.Div([html.H3("Images: full | compressed | |difference| x 4 (one row per prompt)"), image],
                 className="card"),
    ]


def _plan_column(loaded: LoadedPlan, side: str, layer: int, data: TraceData) -> list[Any]:
    flops = plan_flops_table(loaded)
    warning = plan_trace_mismatch(loaded, data.header, data.layers)
    heads = plan_head_map(loaded, min(layer, loaded.plan.n_layers - 1))
    return [html.Div([
        html.H3(loaded.name),
        _msg(f"this plan does not match the trace: {warning}" if warning else ""),
        _facts_table(plan_summary(loaded, flops), f"plan-{side}-summary"),
        dcc.Graph(id=f"plan-{side}-methods", figure=figs.category_figure(plan_layer_map(loaded)),
                  config={"displaylogo": False}),
        dcc.Graph(id=f"plan-{side}-heads", figure=figs.category_figure(heads), config={"displaylogo": False}),
    ], className="card")]


# ---------------------------------------------------------------------------------------------
# Callbacks


def _guard(fallback: Callable[[str], Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Turn a DitlensError (or an unexpected error) inside a callback into the view's message."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        def inner(*args: Any) -> Any:
            try:
                return fn(*args)
            except DitlensError as err:
                return fallback(str(err))
            except Exception as err:  # a bug must not blank the page: say what failed, log the traceback
                LOG.error("dashboard callback %s failed:\n%s", fn.__name__, traceback.format_exc())
                return fallback(f"internal error in {fn.__name__}: {type(err).__name__}: {err}")

        inner.__name__ = fn.__name__
        return inner

    return wrap


def _int_or_none(value: str | None) -> int | None:
    return None if value in (None, MEAN) else int(value)


def _register(app: Dash, data: TraceData, plans: list[LoadedPlan], reports: list[LoadedReport]) -> None:
    control_wrappers = ["wrap-group", "wrap-tensor", "wrap-comparison", "wrap-metric", "wrap-branch", "wrap-prompt",
                        "wrap-head", "wrap-layer"]

    @app.callback(
        Output("view", "children"), Output("stat-controls", "style"),
        *[Output(w, "style") for w in control_wrappers],
        Input("tabs", "value"), Input("ctl-comparison", "value"))
    def show_tab(tab: str, comparison: str):
        views: dict[str, Callable[[], Any]] = {
            "overview": lambda: _overview_view(data),
            "maps": _maps_view,
            "variability": _variability_view,
            "influence": lambda: _extra_view(data, "influence"),
            "locality": lambda: _extra_view(data, "locality"),
            "plans": lambda: _plans_view(plans, data),
            "validation": lambda: _validation_view(reports),
        }
        trigger = dash.ctx.triggered_id
        try:
            view = views[tab]() if trigger != "ctl-comparison" else dash.no_update
        except DitlensError as err:
            view = _msg(str(err))
        shown = {w: None for w in control_wrappers}
        if comparison != "step":
            shown["wrap-branch"] = HIDDEN
        if tab == "variability":
            shown["wrap-prompt"] = shown["wrap-head"] = HIDDEN
        panel = None if tab in STAT_TABS and data.stat_keys() else HIDDEN
        return (view, panel, *[shown[w] for w in control_wrappers])

    @app.callback(Output("ctl-metric", "options"), Output("ctl-metric", "value"),
                  Input("ctl-group", "value"), Input("ctl-tensor", "value"), Input("ctl-comparison", "value"),
                  State("ctl-metric", "value"))
    def metric_choices(group: str, tensor: str, comparison: str, current: str):
        metrics = data.metrics_for(group, tensor, comparison)
        options = [{"label": METRIC_NAMES[m], "value": m} for m in metrics]
        value = current if current in metrics else (metrics[0] if metrics else None)
        return options, value

    def maps_fail(message: str):
        empty = figs.empty_figure(message)
        return message, None, empty, "", empty, "", empty

    @app.callback(
        Output("maps-msg", "children"), Output("maps-msg", "style"), Output("maps-heatmap", "figure"),
        Output("maps-note", "children"), Output("maps-heads", "figure"), Output("maps-heads-note", "children"),
        Output("maps-lines", "figure"),
        Input("ctl-group", "value"), Input("ctl-tensor", "value"), Input("ctl-comparison", "value"),
        Input("ctl-metric", "value"), Input("ctl-branch", "value"), Input("ctl-prompt", "value"),
        Input("ctl-head", "value"), Input("ctl-layer", "value"), Input("maps-heatmap", "id"))
    @_guard(maps_fail)
    def update_maps(group, tensor, comparison, metric, branch, prompt, head, layer, _mounted):
        if not data.stat_keys():
            raise DitlensError("this trace holds no statistics (/stats): profile again with at least one metric")
        if metric is None:
            raise DitlensError(f"this trace has no {group}/{tensor}/{comparison} statistic: pick another combination")
        key = stat_key(group, tensor, comparison, metric)
        p = _int_or_none(prompt)
        hm = data.layer_step_map(key, p, branch, _int_or_none(head))
        heads = data.head_step_map(key, p, branch, int(layer or 0))
        blank = "; step 0 is blank (no previous step)" if comparison == "step" else ""
        return ("", HIDDEN, figs.heatmap_figure(hm), f"source: {hm.note}{blank}", figs.heatmap_figure(heads),
                f"source: {heads.note}{blank}", figs.layer_lines_figure(hm))

    @app.callback(Output("ctl-layer", "value"), Input("maps-heatmap", "clickData"), prevent_initial_call=True)
    def drill_down(click):
        if not click or not click.get("points"):
            return dash.no_update
        name = click["points"][0].get("y")
        return str(data.layers.index(name)) if name in data.layers else dash.no_update

    def vari_fail(message: str):
        empty = figs.empty_figure(message)
        return message, None, empty, "", empty

    @app.callback(
        Output("vari-msg", "children"), Output("vari-msg", "style"), Output("vari-cv", "figure"),
        Output("vari-note", "children"), Output("vari-curves", "figure"),
        Input("ctl-group", "value"), Input("ctl-tensor", "value"), Input("ctl-comparison", "value"),
        Input("ctl-metric", "value"), Input("ctl-branch", "value"), Input("ctl-layer", "value"),
        Input("vari-cv", "id"))
    @_guard(vari_fail)
    def update_variability(group, tensor, comparison, metric, branch, layer, _mounted):
        if not data.stat_keys():
            raise DitlensError("this trace holds no statistics (/stats): profile again with at least one metric")
        if metric is None:
            raise DitlensError(f"this trace has no {group}/{tensor}/{comparison} statistic: pick another combination")
        key = stat_key(group, tensor, comparison, metric)
        cv = data.cv_map(key, branch)
        li = int(layer or 0)
        curves, note = data.prompt_curves(key, branch, li)
        curves_fig = figs.prompt_curves_figure(
            curves, data.prompts, data.step_labels(),
            f"{data.layers[li]}: {data.describe_key(key, branch)} per prompt (mean over heads)", metric)
        return "", HIDDEN, figs.heatmap_figure(cv, colorscale="Magma"), f"source: {cv.note}", curves_fig

    # The table reads every statistic of a group: its own callback, so that the maps above do not wait for it.
    @app.callback(Output("vari-table", "children"), Input("ctl-group", "value"), Input("ctl-branch", "value"),
                  Input("vari-table", "id"))
    @_guard(lambda message: _msg(message))
    def update_cv_table(group, branch, _mounted):
        if data.n_done < 2 or not data.stat_keys():
            return html.Div("needs at least two finished prompts and some statistics", className="note")
        rows = data.cv_table(group, branch)
        tensors = [t for t in "qkvo" if any(t in r for r in rows)]
        return html.Table(
            [html.Tr([html.Th(f"{group} map")] + [html.Th(t.upper()) for t in tensors])]
            + [html.Tr([html.Td(r["map"])] + [html.Td(f"{r[t]:.3f}" if t in r else "") for t in tensors]) for r in rows],
            className="facts num", id="vari-cv-table")

    for root in EXTRA_ROOTS:
        _register_extra(app, data, root)

    def plans_fail(message: str):
        empty = figs.empty_figure(message)
        return message, None, "", [], [], empty, empty

    @app.callback(
        Output("plans-msg", "children"), Output("plans-msg", "style"), Output("plans-compare", "children"),
        Output("plan-col-a", "children"), Output("plan-col-b", "children"), Output("plan-flops", "figure"),
        Output("plan-shares", "figure"),
        Input("plan-a", "value"), Input("plan-b", "value"), Input("plan-layer", "value"))
    @_guard(plans_fail)
    def update_plans(a, b, layer):
        chosen = [("a", plans[int(a)])] + ([("b", plans[int(b)])] if b not in (None, NONE) else [])
        li = int(layer or 0)
        cols = {side: _plan_column(p, side, li, data) for side, p in chosen}
        named_flops = [(p.name, f) for _, p in chosen if (f := plan_flops_table(p)) is not None]
        flops_fig = figs.flops_figure(named_flops) if named_flops else figs.empty_figure(
            "no FLOPs: the plans' fingerprints have no token grid")
        shares = [(p.name, method_shares(p)) for _, p in chosen]
        methods = sorted({m for _, s in shares for m in s}, key=method_key)
        colours = dict(zip(methods, category_colours(methods)))
        compare = ""
        if len(chosen) == 2:
            diff = differing_cells(chosen[0][1], chosen[1][1])
            compare = ("the two plans have different shapes" if diff is None else
                       f"{diff} of {chosen[0][1].plan.steps * chosen[0][1].plan.n_layers} (step, layer) entries differ")
        return ("", HIDDEN, compare, cols["a"], cols.get("b", []), flops_fig,
                figs.shares_figure(shares, colours))

    @app.callback(Output("report-body", "children"), Input("report-pick", "value"))
    @_guard(lambda message: [_msg(message)])
    def update_report(index):
        return _report_body(reports[int(index)])


def _register_extra(app: Dash, data: TraceData, root: str) -> None:
    """Callbacks of a generic view of the labelled datasets under ``/root``."""

    @app.callback(
        Output(f"{root}-x", "options"), Output(f"{root}-x", "value"), Output(f"{root}-y", "options"),
        Output(f"{root}-y", "value"), Input(f"{root}-dataset", "value"), prevent_initial_call=True)
    def choose_dataset(path):
        axes, _ = data.dataset_axes(path)
        x, y, _ = data.default_view(path)
        options = [{"label": a, "value": a} for a in axes]
        return options, x, options + [{"label": ONE_ROW, "value": ONE_ROW}], y or ONE_ROW

    @app.callback(Output(f"{root}-picks", "children"), Input(f"{root}-dataset", "value"),
                  Input(f"{root}-x", "value"), Input(f"{root}-y", "value"), prevent_initial_call=True)
    def choose_axes(path, x, y):
        _, _, picks = data.default_view(path)
        return _pickers(data, root, path, x, y, picks)

    def fail(message: str):
        return message, None, figs.empty_figure(message), ""

    @app.callback(
        Output(f"{root}-msg", "children"), Output(f"{root}-msg", "style"), Output(f"{root}-graph", "figure"),
        Output(f"{root}-note", "children"),
        Input(f"{root}-dataset", "value"), Input(f"{root}-x", "value"), Input(f"{root}-y", "value"),
        Input({"type": "pick", "root": root, "axis": ALL}, "value"),
        State({"type": "pick", "root": root, "axis": ALL}, "id"))
    @_guard(fail)
    def draw(path, x, y, values, ids):
        picks = {i["axis"]: v for i, v in zip(ids, values)}
        y = "" if y in (None, ONE_ROW) else y
        hm = data.generic_map(path, x, y, {a: v for a, v in picks.items() if a not in (x, y)})
        return "", HIDDEN, figs.heatmap_figure(hm, colorscale="Cividis"), f"source: {hm.note}"


__all__ = ["create_app"]
