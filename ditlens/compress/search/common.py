"""Shared pieces of the searches: results, candidate sets, influence aggregation, plan assembly."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ditlens.compress.flops import layer_sequences, longest_image_sequence
from ditlens.compress.methods import WINDOWED, parse_method, removes_pairs, widest_window
from ditlens.compress.plan import Plan, Provenance, RunSpec, _defined_on, model_fingerprint, static_flops_summary
from ditlens.errors import DitlensError

DEFAULT_SPARSITIES = (0.5, 0.75, 0.9)


# -- data parallel (torch.distributed): calibration prompts sharded over ranks ------------------

def data_parallel() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, or (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_bounds(n: int, world: int) -> list[int]:
    """Contiguous shards of ``n`` prompts: rank r takes [bounds[r], bounds[r+1])."""
    return [round(i * n / world) for i in range(world + 1)]


def gather_prompt_rows(values: np.ndarray) -> np.ndarray:
    """Concatenate every rank's per-prompt rows (axis 0) in rank order: the array one process
    with all calibration prompts would hold. Identity without a process group."""
    rank, world = data_parallel()
    if world == 1:
        return values
    import torch.distributed as dist

    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, values)
    return np.concatenate([p for p in parts if p is not None and len(p)], axis=0)


def shard_prompts(prompts: Sequence[str], engine: Any) -> tuple[list[str], Any]:
    """Under torch.distributed: this rank's contiguous share of the calibration prompts and an
    engine config whose seeds follow the prompts' global indices."""
    import dataclasses

    rank, world = data_parallel()
    prompts = list(prompts)
    if world == 1:
        return prompts, engine
    bounds = shard_bounds(len(prompts), world)
    if any(bounds[r + 1] == bounds[r] for r in range(world)):
        raise DitlensError(f"{len(prompts)} calibration prompts cannot be shared by {world} ranks: give at least one each")
    engine = dataclasses.replace(engine, prompt_offset=engine.prompt_offset + bounds[rank])
    return prompts[bounds[rank]:bounds[rank + 1]], engine


def all_prompts(local: Sequence[str]) -> list[str]:
    """Every rank's prompts in rank order (the local list without a process group)."""
    rank, world = data_parallel()
    if world == 1:
        return list(local)
    import torch.distributed as dist

    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, list(local))
    return [p for part in parts for p in part]


def all_reduce_sums(*values: float) -> tuple[float, ...]:
    """Sums over ranks (float64), e.g. a loss numerator and count. Identity without a process group."""
    rank, world = data_parallel()
    if world == 1:
        return tuple(float(v) for v in values)
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return tuple(float(v) for v in t.cpu())


@dataclass
class SearchResult:
    """A searched plan and what the search measured on the way."""

    plan: Plan
    seconds: float
    influence: np.ndarray | None = None  # (prompt, branch, step, layer, head, candidate) float32, V2 only
    candidates: list[str] = field(default_factory=list)
    branches: list[str] = field(default_factory=list)
    losses: np.ndarray | None = None  # (step, layer) accepted V1 loss (NaN: full)
    forward_passes: int = 0
    block_runs: int = 0
    output: Any = None  # the pipeline's output on the searched trajectory (calibration prompts)
    trial_passes: list = field(default_factory=list)  # V1: every trial forward (greedy.TrialPass)
    baseline_block_runs: int = 0  # V1: blocks run for the uncompressed output of each step
    block_work: float = 0.0  # block runs, each weighted by the share of its micro-batch's rows it ran


def default_candidates(n_image: int, joint: bool, *, sparsities: Sequence[float] = DEFAULT_SPARSITIES,
                       asc: bool = False, wars: bool = False) -> list[str]:
    """V2's default set: output cache and the arrow (joint models) or window band at 50/75/90 %
    image-pair sparsity; CFG share and WA-RS on request."""
    from ditlens.kernels import window_for_sparsity

    kind = "arrow" if joint else "window"
    widths = sorted({int(window_for_sparsity(n_image, s)) for s in sparsities}, reverse=True)
    out = ["ast"] + [f"{kind}({w})" for w in widths]
    if wars:
        out += [f"wars({w})" for w in widths]
    if asc:
        out.append("asc")
    return out


def parse_candidate_list(spec: str | Sequence[str]) -> list[str]:
    """``"ast,arrow(16),asc"`` or a list -> canonical method strings (checked)."""
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    out = []
    for item in items:
        if not item:
            continue
        method = parse_method(item)
        if method.base == "full" and not method.asc:
            raise DitlensError("'full' is not a candidate: an unchosen head runs full")
        text = method.to_str()
        if text not in out:
            out.append(text)
    if not out:
        raise DitlensError("the candidate set is empty; give methods like 'ast,arrow(16)'")
    return out


def refuse_windows_wider_than_every_layer(candidates: Sequence[str], layers: Sequence[Any],
                                          grid: tuple[int, int, int]) -> None:
    """A windowed candidate that keeps every pair on every layer it could go to can save nothing:
    most often a width written for another resolution. Refused at the search's first step, where the
    grid is known."""
    for text in candidates:
        method = parse_method(text)
        if method.base not in WINDOWED:
            continue
        layouts = [layer_sequences(layer, grid, 0).layout for layer in layers if _defined_on(method, layer.kind)]
        if layouts and not any(removes_pairs(method, layout) for layout in layouts):
            n = longest_image_sequence(list(layers), grid)
            widest = max(widest_window(method.mask_kind, layout) for layout in layouts)
            raise DitlensError(f"candidate {text} keeps every pair on every layer at this resolution (the longest "
                               f"sequence has {n} image tokens); give a half-width below {widest}")


def aggregate_influence(rse: np.ndarray, candidates: Sequence[str], branches: Sequence[str]) -> np.ndarray:
    """[prompt, branch, head, candidate] -> [head, candidate]: the mean over prompts and branches.

    CFG share does not touch the cond branch (stored NaN there by the profiler): it counts 0.
    Any other NaN (no earlier output to reuse, no residual) makes the pair infeasible (NaN).
    """
    values = np.array(rse, dtype=np.float64, copy=True)
    if "cond" in branches:
        b = list(branches).index("cond")
        for m, text in enumerate(candidates):
            if parse_method(text).asc:
                values[:, b, :, m] = np.nan_to_num(values[:, b, :, m], nan=0.0)
    return values.mean(axis=(0, 1))


def build_plan(engine: Any, methods: list[list[Any]], provenance: Provenance) -> Plan:
    """A runtime plan from a finished engine run."""
    pipe = engine.pipe
    grid = engine.grid
    model = model_fingerprint(engine.transformer, engine.adapter, grid=grid, n_text=engine.n_text)
    height, width = engine.config.height, engine.config.width
    if (height is None or width is None) and grid is not None:
        per_token = engine.adapter.pixels_per_token(engine.transformer, pipe)
        height, width = grid[1] * per_token, grid[2] * per_token
    guidance = engine.config.guidance
    if guidance is None:
        guidance = getattr(pipe, "_guidance_scale", None)
    run = RunSpec(engine.config.steps, type(pipe.scheduler).__name__, None if guidance is None else float(guidance),
                  height, width, None if grid is None or grid[0] == 1 else grid[0], engine.cfg_layout,
                  tuple(float(t) for t in engine.timesteps))
    plan = Plan(model, run, methods, provenance)
    plan.check_structure()
    plan.flops = static_flops_summary(plan)
    return plan


def provenance(search: str, metric: str, delta: float | None, c: float | None, candidates: Sequence[str],
               prompts: Sequence[str], notes: str) -> Provenance:
    from datetime import datetime, timezone

    from ditlens import __version__

    windows = sorted({parse_method(m).window for m in candidates if parse_method(m).base in WINDOWED})
    return Provenance(search=search, metric=metric, delta=delta, c=c, windows=windows,
                      calibration_prompts=list(prompts), ditlens_version=__version__,
                      created=datetime.now(timezone.utc).isoformat(timespec="seconds"), notes=notes)
