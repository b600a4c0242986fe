"""Solve DiTFastAttnV2's programs offline from influence maps recorded in a trace (no model calls).

Trace layout read here (written by ``ditlens profile --influence``)::

    /influence/rse   float32, axes "prompt,branch,step,layer,head,candidate"
                     I(h, m) = Σ_{head h} (O'_h - O_h)² / Σ_{all heads} (O - mean O)²  per prompt and branch,
                     O the layer's attention output (per head, before the output projection),
                     O' the output with only head h under candidate m; NaN where a candidate
                     cannot run (output cache at step 0; CFG share on the cond branch = 0 change)
    candidate labels: the ``coords.candidate`` attribute of the dataset, else the root attribute
                     ``influence_candidates`` (comma-separated method strings: ast, asc,
                     window(w), arrow(w), wars(w))
    root attribute ``influence_trajectory``: "uncompressed" (the profiler; the default when
                     absent) or "compressed" (influences saved from an online search)

The influences of a profile are taken on the uncompressed trajectory, the online search's on
the compressed one; given the same influences both solve identical programs
(:func:`solve_from_influence`). The model (fingerprint only: config, layer names, heads) is
needed to write a plan the runtime accepts; it is loaded, never run.

An output cache measured on the uncompressed trajectory is one step old. Reused at two
steps in a row it would be two steps old, a change the trace never measured, so from an
uncompressed trajectory a head may take ``ast`` only where it computed at the previous step.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ditlens.compress.methods import FULL, parse_method
from ditlens.compress.plan import Plan, RunSpec, model_fingerprint, static_flops_summary
from ditlens.compress.search.common import SearchResult, aggregate_influence, parse_candidate_list, provenance
from ditlens.compress.search.engine import layer_entry
from ditlens.compress.search.latency import LatencyModel, build_latency
from ditlens.compress.search.milp import solve_layer
from ditlens.errors import DitlensError, TraceFormatError

INFLUENCE_PATH = "/influence/rse"
INFLUENCE_AXES = ("prompt", "branch", "step", "layer", "head", "candidate")


def solve_from_influence(influence: np.ndarray, candidates: Sequence[str], branches: Sequence[str],
                         latency: LatencyModel, heads: int, delta: float, c: float | None,
                         wars_rule: bool = True, one_step_ast: bool = False) -> list[list[Any]]:
    """methods[step][layer] from influences (prompt, branch, step, layer, head, candidate).

    ``one_step_ast``: forbid ``ast`` for a head that did not compute at the previous step
    (influences from the uncompressed trajectory measure a cache one step old only).
    """
    _, _, T, L, H, M = influence.shape
    parsed = [parse_method(m) for m in candidates]
    refreshed = np.zeros((L, H), bool)
    reused = np.zeros((L, H), bool)  # head took its output from the cache at the previous step
    window = np.full((L, H), -1)
    methods: list[list[Any]] = []
    for s in range(T):
        row = []
        for i in range(L):
            values = np.array(influence[:, :, s, i], dtype=np.float64)
            if wars_rule:  # WA-RS needs a refresh and keeps one window per refresh (plan rule)
                for m, method in enumerate(parsed):
                    if method.base == "wars":
                        bad = ~refreshed[i] | ((window[i] >= 0) & (window[i] != method.window))
                        values[:, :, bad, m] = np.nan
            if one_step_ast:
                for m, method in enumerate(parsed):
                    if not method.computes:
                        values[:, :, reused[i], m] = np.nan
            cost, full = latency.layer_costs(i, heads)
            choice = solve_layer(aggregate_influence(values, candidates, branches), cost, full, delta, c)
            chosen = [FULL if k < 0 else parsed[k] for k in choice]
            for h, m in enumerate(chosen):
                reused[i, h] = not m.computes
                if m.base == "full" and not m.asc:
                    refreshed[i, h], window[i, h] = True, -1
                elif m.base == "wars":
                    window[i, h] = m.window
            row.append(layer_entry(chosen))
        methods.append(row)
    return methods


def read_influence(trace: Any) -> tuple[np.ndarray, list[str], list[str]]:
    """(rse array in INFLUENCE_AXES order, candidate labels, branch labels) of an open trace."""
    if not trace.has(INFLUENCE_PATH):
        raise DitlensError(f"{trace.path} has no {INFLUENCE_PATH}: record it with `ditlens profile --influence`")
    arr = trace.array(INFLUENCE_PATH)
    if tuple(arr.axes) != INFLUENCE_AXES:
        raise TraceFormatError(f"{trace.path}: {INFLUENCE_PATH} has axes {arr.axes}, expected {','.join(INFLUENCE_AXES)}")
    labels = None
    coords = getattr(arr, "coords", {}) or {}
    if "candidate" in coords and np.asarray(coords["candidate"]).dtype.kind in "UO":
        labels = [str(x) for x in np.asarray(coords["candidate"])]
    if labels is None:
        attr = trace.attrs.get("influence_candidates")
        if not attr:
            raise TraceFormatError(f"{trace.path}: no candidate labels for {INFLUENCE_PATH} (coords or influence_candidates)")
        labels = [x.strip() for x in str(attr).split(",") if x.strip()]
    data = np.asarray(arr)
    if data.shape[-1] != len(labels):
        raise TraceFormatError(f"{trace.path}: {data.shape[-1]} candidates in {INFLUENCE_PATH} but {len(labels)} labels")
    if data.shape[0] == 0:
        raise DitlensError(f"{trace.path} holds no finished prompt; profile at least one")
    return data, parse_candidate_list(labels), list(trace.branches)


def search_from_trace(trace_path: str | Path, pipe: Any, *, delta: float = 0.1, c: float | None = 1.5,
                      candidates: Sequence[str] | str | None = None, latency: str = "flops",
                      registry: Any = None) -> SearchResult:
    """V2 programs from a trace's influences; ``pipe`` gives the fingerprint (it is not run)."""
    from ditlens.analyzer.adapters import default_registry
    from ditlens.traces import Trace

    start = time.perf_counter()
    with Trace.open(trace_path) as trace:
        data, labels, branches = read_influence(trace)
        header = trace.header
        uncompressed = str(trace.attrs.get("influence_trajectory", "uncompressed")) != "compressed"
        timesteps = tuple(float(t) for t in trace.timesteps)
    if candidates is not None:
        wanted = parse_candidate_list(candidates)
        missing = [m for m in wanted if m not in labels]
        if missing:
            raise DitlensError(f"candidates {', '.join(missing)} are not in the trace (it has {', '.join(labels)})")
        data = data[..., [labels.index(m) for m in wanted]]
        labels = wanted
    adapter = (registry or default_registry()).find(pipe.transformer)
    if adapter.attends_per_sample:  # CFG share cannot run there (older traces recorded it)
        keep = [i for i, m in enumerate(labels) if not parse_method(m).asc]
        data, labels = data[..., keep], [labels[i] for i in keep]
    layers = adapter.attention_layers(pipe.transformer)
    if [l.name for l in layers] != list(header.layers):
        raise DitlensError("the trace was recorded on another model (layer names differ); pass the model it was made with")
    tokens = header.tokens
    grid = tuple(int(x) for x in tokens.grid)
    fp = model_fingerprint(pipe.transformer, adapter, grid=grid, n_text=int(tokens.n_text or 0))
    cfg_rows = 2 if len(branches) == 2 else 1
    lat = build_latency(latency, list(fp.layers), labels, grid, int(fp.tokens.n_text or 0), fp.heads, fp.head_dim, cfg_rows)
    methods = solve_from_influence(data, labels, branches, lat, fp.heads, delta, c, one_step_ast=uncompressed)
    cfg_layout = header.cfg_layout if cfg_rows == 2 else "none"
    run = RunSpec(int(header.steps), str(type(pipe.scheduler).__name__), float(header.guidance_scale), int(header.height),
                  int(header.width), None if grid[0] == 1 else grid[0], cfg_layout, timesteps)
    notes = f"candidates={','.join(labels)}; latency={latency}; trace={Path(trace_path).name}"
    plan = Plan(fp, run, methods, provenance("v2-from-trace", "rse", delta, c, labels, list(header.prompts[: data.shape[0]]), notes))
    plan.check_structure()
    plan.flops = static_flops_summary(plan)
    return SearchResult(plan, time.perf_counter() - start, data, labels, branches)


__all__ = ["INFLUENCE_PATH", "INFLUENCE_AXES", "read_influence", "search_from_trace", "solve_from_influence"]
