"""DiTFastAttnV2 head-wise search on the running, progressively compressed trajectory.

Per step, per layer in execution order: one pass per micro-batch runs the block of the layer
(earlier blocks come from the cache) and stops after the layer's attention. From that call's
q, k, v the engine computes the full output O and every candidate's output O'; the influence
of head h under candidate m is the layer's relative squared error when only head h changes:

    I(h, m) = Σ_{head h} (O'_h - O_h)² / Σ_{all heads} (O - mean O)²        (per prompt and branch)

averaged over prompts and branches (the profiler's ``/influence/rse`` uses the same definition,
so :mod:`~ditlens.compress.search.from_trace` solves the same programs). The layer's integer
program (:func:`~ditlens.compress.search.milp.solve_layer`) picks one method per head, the
choice is applied, and the search moves on.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from ditlens.compress.flops import longest_image_sequence
from ditlens.compress.methods import FULL, parse_method
from ditlens.compress.search.common import (DEFAULT_SPARSITIES, SearchResult, aggregate_influence, build_plan,
                                            default_candidates, parse_candidate_list, provenance,
                                            refuse_windows_wider_than_every_layer)
from ditlens.compress.search.common import all_prompts, gather_prompt_rows, shard_prompts
from ditlens.compress.search.engine import EngineConfig, PassConfig, SearchEngine, layer_entry, safe_ratio
from ditlens.compress.search.latency import LatencyModel, build_latency, method_allowed
from ditlens.compress.search.milp import solve_layer
from ditlens.errors import DitlensError


@dataclass
class HeadwiseConfig:
    delta: float = 0.1
    c: float | None = 1.5
    candidates: Sequence[str] | str | None = None  # None: default_candidates for the model
    latency: str = "flops"  # or "measured"
    engine: EngineConfig = field(default_factory=EngineConfig)
    # Image-pair sparsities of the default arrow/window candidates (used when candidates is None).
    sparsities: Sequence[float] = DEFAULT_SPARSITIES


class HeadwiseController:
    def __init__(self, config: HeadwiseConfig) -> None:
        self.config = config
        self.candidates: list[str] | None = None
        self.parsed: list[Any] = []
        self._latency_by_text: dict[int, LatencyModel] = {}
        self.methods: list[list[Any]] = []
        self.influence: np.ndarray | None = None
        self.branches: list[str] = []
        self._acc: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.bar = None
        self.total_prompts: int | None = None  # all ranks' calibration prompts (data parallel)

    def _setup(self, engine: SearchEngine) -> None:
        cfg = self.config
        grid = engine.grid
        n_image = longest_image_sequence(engine.layers, grid)
        joint = any(l.kind == "joint" for l in engine.layers)
        if cfg.candidates is None:
            self.candidates = default_candidates(n_image, joint, sparsities=cfg.sparsities, asc=False)
        else:
            self.candidates = parse_candidate_list(cfg.candidates)
            refuse_windows_wider_than_every_layer(self.candidates, engine.layers, grid)
            if engine.adapter.attends_per_sample and any(parse_method(m).asc for m in self.candidates):
                raise DitlensError(f"{engine.adapter.family} attends one sample per attention call, so CFG share "
                                   "(+asc) cannot run on it; drop it from the candidates")
            if engine.cfg_rows != 2 and any(parse_method(m).asc for m in self.candidates):
                raise DitlensError("this run has no classifier-free guidance (guidance <= 1, or a model without it), "
                                   "so CFG share (+asc) cannot run; drop it from the candidates or search with CFG")
        self.parsed = [parse_method(m) for m in self.candidates]
        engine.config.residual_widths = tuple(sorted({m.window for m in self.parsed if m.base == "wars"}))
        self.branches = ["cond", "uncond"] if engine.cfg_rows == 2 else ["cond"]
        P, T, L, H = self.total_prompts or len(engine.prompts), engine.config.steps, len(engine.layers), engine.heads
        self.influence = np.full((P, len(self.branches), T, L, H, len(self.candidates)), np.nan, np.float32)
        self.methods = [["full"] * L for _ in range(T)]
        self.bar = engine.progress(T * L, "V2 head-wise search")

    def _latency(self, engine: SearchEngine) -> LatencyModel:
        # The text length is known once a cross or joint layer has run (PixArt's first cross layer is
        # layer 1): a model built before then counts those layers as free, so there is one model per
        # text length seen (Mochi's varies per sample; a measured model is timed once per length).
        if engine.n_text not in self._latency_by_text:
            weight = next(engine.transformer.parameters())
            self._latency_by_text[engine.n_text] = build_latency(
                self.config.latency, engine.layers, self.candidates, engine.grid, engine.n_text, engine.heads,
                engine.head_dim, engine.cfg_rows, str(weight.device), weight.dtype)
        return self._latency_by_text[engine.n_text]

    def observe(self, engine: SearchEngine, index: int, call: int, func, call_args, call_kwargs, full) -> None:
        from ditlens.compress.search.engine import _sdpa_params

        params = _sdpa_params(call_args, call_kwargs)
        layout = engine.call_layout(index, params["query"], params["key"])
        layer = engine.layers[index]
        rows = len(engine.mb.prompts)
        errs = np.full((rows, engine.heads, len(self.candidates)), np.nan)
        spread = None
        for m, method in enumerate(self.parsed):
            if not method_allowed(self.candidates[m], layer, engine.cfg_rows == 2 and not engine.adapter.attends_per_sample,
                                  layout):
                continue
            out = engine.method_output(index, call, method, func, params, layout, full)
            err, spread = engine.influence_parts(full, out, call)
            errs[:, :, m] = err
        if spread is None:
            _, spread = engine.influence_parts(full, full, call)
        key = engine.mb.index
        if key in self._acc:
            e0, s0 = self._acc[key]
            self._acc[key] = (e0 + errs, s0 + spread)
        else:
            self._acc[key] = (errs, spread)

    def run_step(self, engine: SearchEngine, step: int) -> list[Any]:
        if self.candidates is None:
            self._setup(engine)
        engine.observer = lambda *a: self.observe(engine, *a)
        P = len(engine.prompts)
        for i, layer in enumerate(engine.layers):
            self._acc = {}
            for mb in engine.micro_batches:
                engine.forward(mb, PassConfig(observe=i, skip_before=engine.block_pos[engine.block_of[i]]))
            values = np.full((P, len(self.branches), engine.heads, len(self.candidates)), np.nan)
            for mb in engine.micro_batches:
                errs, spread = self._acc[mb.index]
                ratio = safe_ratio(errs, spread[:, None, None])
                for r, (p, b) in enumerate(zip(mb.prompts, mb.branches)):
                    values[p, self.branches.index(b)] = ratio[r]
            values = gather_prompt_rows(values)  # every rank solves on all calibration prompts
            for m, method in enumerate(self.parsed):  # WA-RS: one window per refresh (plan rule)
                if method.base == "wars":
                    for h in range(engine.heads):
                        if not engine.wars_allowed(i, h, method.window):
                            values[:, :, h, m] = np.nan
            self.influence[:, :, step, i] = values
            choice = self.solve(engine, i, values)
            methods = [FULL if c < 0 else self.parsed[c] for c in choice]
            engine.decide(i, methods)
            self.methods[step][i] = layer_entry(methods)
            self.bar.update(1)
        return [engine.forward(mb, PassConfig(skip_before=len(engine.blocks))) for mb in engine.micro_batches]

    def solve(self, engine: SearchEngine, layer: int, values: np.ndarray) -> np.ndarray:
        cost, full = self._latency(engine).layer_costs(layer, engine.heads)
        influence = aggregate_influence(values, self.candidates, self.branches)
        return solve_layer(influence, cost, full, self.config.delta, self.config.c)


def search_headwise(pipe: Any, prompts: Sequence[str], config: HeadwiseConfig | None = None, *,
                    registry: Any = None) -> SearchResult:
    """V2 head-wise search; returns the plan (runtime schema) and the influences it measured."""
    config = config or HeadwiseConfig()
    prompts, engine_config = shard_prompts(prompts, config.engine)
    config = dataclasses.replace(config, engine=engine_config)
    engine = SearchEngine(pipe, prompts, config.engine, registry)
    controller = HeadwiseController(config)
    controller.total_prompts = len(all_prompts(prompts))
    start = time.perf_counter()
    try:
        output = engine.run(controller)
    finally:
        if controller.bar is not None:
            controller.bar.close()
    seconds = time.perf_counter() - start
    notes = (f"candidates={','.join(controller.candidates)}; latency={config.latency}; "
             f"micro_batch={config.engine.micro_batch}; seed={config.engine.seed}")
    prov = provenance("v2-headwise", "rse", config.delta, config.c, controller.candidates, all_prompts(prompts), notes)
    plan = build_plan(engine, controller.methods, prov)
    return SearchResult(plan, seconds, controller.influence, list(controller.candidates), controller.branches,
                        forward_passes=engine.forward_passes, block_runs=engine.block_runs, output=output)


__all__ = ["HeadwiseConfig", "search_headwise"]
_ = torch
