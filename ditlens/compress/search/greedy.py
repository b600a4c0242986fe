"""DiTFastAttn (V1) greedy plan search, the paper's Algorithm 1.

For every step t, with the plan so far applied to earlier steps: O = the transformer's output at
step t with every layer uncompressed. Then for every layer i in order, the strategies
``[AST, WA-RS+ASC, WA-RS, ASC]`` are tried most compressive first; the first whose loss
L(O, O') on step t's transformer output is below ``(i + 1) / L · δ`` is kept (layers before i
keep their choices at this step, layers after i run uncompressed), else the layer stays full.
L is the A.2 mean relative absolute error (DESIGN §4, V1 loss), over all calibration prompts.
Every trial forward is recorded with its loss terms per batch row (``TrialPass``), from which
``greedy_floor`` bounds what any exact implementation could save.

Efficiency, without changing any decision:
* trials reuse the cached outputs of the blocks before layer i (``reuse_blocks``), and the trial
  that is accepted leaves its block output and caches behind, so its block is not rerun to commit;
* row split: after its own block, a trial runs only the rows whose output is not known already.
  An ASC trial leaves the cond branch as in the current state, and a WA-RS trial runs the cond
  branch exactly as the WA-RS+ASC trial before it: their cond rows are taken from that output
  (the last block's), and only the uncond rows run the blocks after the trial's;
* early rejection: the loss is a mean of non-negative terms over a known number of elements, so
  once the micro-batches run so far sum past the threshold, the remaining ones cannot bring it
  back under: the trial is rejected without running them.
``naive=True`` reruns the whole transformer on every prompt for every trial instead (the speed
reference: Alg. 1 as written). ``every_candidate=True`` also tries the strategies after the first
that passes, keeping that first (most compressive) one: the DiTFastAttn authors' published
calibration loop, which runs all four candidates per (step, layer) and keeps the last passing of the
reversed list. Same decisions, more trials: the second speed reference.
Strategies that cannot run are skipped: AST at step 0, WA-RS without an earlier full step of the
layer (or with another window since it), ASC without CFG, windows on cross attention.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from ditlens.compress.flops import layer_sequences, longest_image_sequence
from ditlens.compress.methods import FULL, HeadMethod, removes_pairs
from ditlens.compress.search.common import (SearchResult, all_prompts, all_reduce_sums, build_plan, provenance,
                                            refuse_windows_wider_than_every_layer, shard_prompts)
from ditlens.compress.search.engine import EngineConfig, PassConfig, SearchEngine, first_tensor

LOSS_CLIP = 10.0


def strategy_list(window: int) -> list[HeadMethod]:
    """Alg. 1's list, most compressive first: AST, WA-RS+ASC, WA-RS, ASC."""
    return [HeadMethod("ast"), HeadMethod("wars", window, True), HeadMethod("wars", window), HeadMethod("full", 0, True)]


def layer_threshold(i: int, n_layers: int, delta: float) -> float:
    """(i + 1) / L · δ for the 0-based layer index i."""
    return (i + 1) / n_layers * delta


CURRENT_STATE = "current state"


def known_cond_source(method: HeadMethod) -> HeadMethod | str | None:
    """Where the output of a trial's cond rows is already computed: ``CURRENT_STATE`` for ASC (its cond
    branch runs as in the current state), the WA-RS+ASC trial of the same window for WA-RS (the same
    cond branch), else None."""
    if method.base == "full" and method.asc:
        return CURRENT_STATE
    if method.base == "wars" and not method.asc:
        return HeadMethod("wars", method.window, True)
    return None


def v1_loss_row_sums(o: torch.Tensor, o_compressed: torch.Tensor) -> torch.Tensor:
    """Per batch row: Σ clip(|O - O'| / (max(|O|, |O'|) + 1e-6), 0, 10), float64 [rows]."""
    o, c = o.double(), o_compressed.double()
    ratio = ((o - c).abs() / (torch.maximum(o.abs(), c.abs()) + 1e-6)).clamp(0.0, LOSS_CLIP)
    return ratio.reshape(ratio.shape[0], -1).sum(dim=1)


def v1_loss_sums(o: torch.Tensor, o_compressed: torch.Tensor) -> tuple[float, int]:
    """(sum, count) of clip(|O - O'| / (max(|O|, |O'|) + 1e-6), 0, 10) (summed over micro-batches)."""
    return float(v1_loss_row_sums(o, o_compressed).sum()), o.numel()


@dataclass(frozen=True)
class TrialPass:
    """One micro-batch of one V1 trial: what it cost and the loss terms it contributed, per batch row."""

    step: int
    layer: int
    method: str
    micro_batch: int
    branches: tuple[str, ...]  # branch of every batch row ("cond" / "uncond")
    row_sums: tuple[float, ...]  # Σ of the A.2 terms of every batch row
    row_elements: int  # terms per batch row
    suffix_blocks: int  # blocks from the trial layer's block to the last (what block reuse must run)
    block_runs: int  # blocks this forward ran (the suffix, plus blocks rerun to commit earlier decisions)
    block_work: float = 0.0  # the same, each block weighted by the share of the rows it ran (row split)

    @property
    def loss_sum(self) -> float:
        return float(sum(self.row_sums))


@dataclass
class GreedyConfig:
    delta: float = 0.05
    window: int | None = None  # WA-RS half-width; None: 1/8 of a sequence's image tokens (V1's default)
    naive: bool = False
    engine: EngineConfig = field(default_factory=EngineConfig)
    early_reject: bool = True  # see the module docstring; off when naive
    every_candidate: bool = False  # the authors' loop: try every strategy, keep the most compressive passing one
    row_split: bool = True  # trials run only the rows whose output is not known (module docstring); off when naive


class GreedyController:
    def __init__(self, config: GreedyConfig) -> None:
        self.config = config
        self.methods: list[list[Any]] = []
        self.losses: np.ndarray | None = None
        self.trials = 0
        self.rejected_early = 0  # trials stopped before their last micro-batch
        self.passes: list[TrialPass] = []  # every trial forward, in order
        self.baseline_block_runs = 0  # blocks run for each step's uncompressed output O
        self.bar = None
        self.window: int | None = config.window

    def allowed(self, engine: SearchEngine, step: int, layer: int, method: HeadMethod) -> bool:
        kind = engine.layers[layer].kind
        if method.asc and (engine.cfg_rows != 2 or engine.adapter.attends_per_sample):
            return False
        if method.base == "ast":
            return step > 0
        if method.base == "wars":
            if kind == "cross":
                return False
            if not removes_pairs(method, layer_sequences(engine.layers[layer], engine.grid, 0).layout):
                return False  # a window that keeps every pair of this layer (temporal attention over few frames)
            return all(engine.wars_allowed(layer, h, method.window) for h in range(engine.heads))
        return True

    def _known_cond_source(self, engine: SearchEngine, method: HeadMethod, k: int, current_last: list[Any],
                           trial_last: dict[tuple[HeadMethod, int], Any]) -> Any:
        """The last block's output that already holds the cond rows of this trial on micro-batch k
        (see known_cond_source), or None."""
        if not self.config.row_split or self.config.naive or engine.cfg_rows != 2:
            return None
        source = known_cond_source(method)
        if source is None:
            return None
        return current_last[k] if source == CURRENT_STATE else trial_last.get((source, k))

    def run_step(self, engine: SearchEngine, step: int) -> list[Any]:
        L = len(engine.layers)
        if self.bar is None:
            grid = engine.grid
            if self.window is None:
                self.window = max(1, longest_image_sequence(engine.layers, grid) // 8)
            else:
                refuse_windows_wider_than_every_layer([f"wars({self.window})"], engine.layers, grid)
            engine.config.residual_widths = (self.window,)
            self.methods = [["full"] * L for _ in range(engine.config.steps)]
            self.losses = np.full((engine.config.steps, L), np.nan)
            self.bar = engine.progress(engine.config.steps * L, "V1 greedy search")
        runs_before = engine.block_runs
        baseline, current_last = [], []  # current_last: last block's output of the current state
        for mb in engine.micro_batches:
            baseline.append(first_tensor(engine.forward(mb, PassConfig())))
            current_last.append(engine.last_block_output)
        self.baseline_block_runs += engine.block_runs - runs_before
        (count,) = all_reduce_sums(sum(ref.numel() for ref in baseline))  # elements of the loss, all ranks
        early = self.config.early_reject and not self.config.naive
        # Micro-batches run in descending order of their last trial's loss: a trial that fails
        # then passes its threshold, and stops, after as few of them as possible (the sum does
        # not depend on the order, so neither does any decision).
        order = list(range(len(engine.micro_batches)))
        last_loss = [0.0] * len(order)
        for i in range(L):
            chosen = FULL
            threshold = layer_threshold(i, L, self.config.delta)
            trial_last: dict[tuple[HeadMethod, int], Any] = {}  # (method, micro-batch) -> last block's output
            for method in strategy_list(self.window):
                if not self.allowed(engine, step, i, method):
                    continue
                total = 0.0
                methods = (method,) * engine.heads
                skip = engine.block_pos[engine.block_of[i]]
                for ran, k in enumerate(order, start=1):
                    mb, runs_before, work_before = engine.micro_batches[k], engine.block_runs, engine.block_work
                    cfg = PassConfig(trial={i: methods}, skip_before=skip)
                    known = self._known_cond_source(engine, method, k, current_last, trial_last)
                    if known is not None:
                        cfg.rows = tuple(r for r, b in enumerate(mb.branches) if b != "cond")
                        cfg.rows_from, cfg.known_last = skip + 1, known
                    out = engine.forward(mb, cfg)
                    trial_last[(method, k)] = engine.last_block_output
                    row_sums = v1_loss_row_sums(baseline[k], first_tensor(out))
                    last_loss[k] = float(row_sums.sum())
                    self.passes.append(TrialPass(step, i, method.to_str(), k, mb.branches, tuple(row_sums.tolist()),
                                                 baseline[k][0].numel(), len(engine.blocks) - skip,
                                                 engine.block_runs - runs_before, engine.block_work - work_before))
                    total += last_loss[k]
                    if early and total / count >= threshold:  # the other terms are >= 0: rejected
                        self.rejected_early += ran < len(order)
                        break
                if early:
                    order.sort(key=lambda k: -last_loss[k])
                # Every rank decides on all prompts; a rank that stopped early is already past the
                # threshold on its own, so the sum over ranks rejects too.
                (total,) = all_reduce_sums(total)
                self.trials += 1
                loss = total / count
                if loss < threshold and chosen is FULL:
                    chosen = method
                    self.losses[step, i] = loss
                if chosen is not FULL and not self.config.every_candidate:
                    break
            engine.decide(i, (chosen,) * engine.heads)
            if chosen is not FULL:  # the state now has layer i compressed (full: it is unchanged)
                current_last = [trial_last.get((chosen, k)) for k in range(len(engine.micro_batches))]
            self.methods[step][i] = chosen.to_str()
            self.bar.update(1)
        return [engine.forward(mb, PassConfig(skip_before=len(engine.blocks))) for mb in engine.micro_batches]


def search_greedy(pipe: Any, prompts: Sequence[str], config: GreedyConfig | None = None, *,
                  registry: Any = None) -> SearchResult:
    """V1 greedy search (Alg. 1)."""
    config = config or GreedyConfig()
    prompts, engine_cfg = shard_prompts(prompts, config.engine)
    if config.naive:
        engine_cfg = EngineConfig(**{**engine_cfg.__dict__, "reuse_blocks": False})
    engine = SearchEngine(pipe, prompts, engine_cfg, registry)
    controller = GreedyController(config)
    start = time.perf_counter()
    try:
        output = engine.run(controller)
    finally:
        if controller.bar is not None:
            controller.bar.close()
    seconds = time.perf_counter() - start
    cfg_share = engine.cfg_rows == 2 and not engine.adapter.attends_per_sample
    strategies = [m.to_str() for m in strategy_list(controller.window or 0) if cfg_share or not m.asc]  # those tried
    notes = (f"strategies={','.join(strategies)}; window={controller.window}; naive={config.naive}; "
             f"every_candidate={config.every_candidate}; row_split={config.row_split and not config.naive}; "
             f"micro_batch={engine_cfg.micro_batch}; seed={engine_cfg.seed}; "
             f"trials={controller.trials}; rejected_early={controller.rejected_early}")
    prov = provenance("v1-greedy", "v1_loss", config.delta, None, strategies, all_prompts(prompts), notes)
    plan = build_plan(engine, controller.methods, prov)
    return SearchResult(plan, seconds, None, strategies, [], controller.losses, engine.forward_passes,
                        engine.block_runs, output, controller.passes, controller.baseline_block_runs, engine.block_work)


__all__ = ["GreedyConfig", "TrialPass", "search_greedy", "strategy_list", "layer_threshold", "v1_loss_sums",
           "v1_loss_row_sums", "known_cond_source", "CURRENT_STATE"]
