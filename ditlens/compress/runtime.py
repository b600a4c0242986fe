"""Apply a plan to a running diffusers pipeline, and take it off again.

Two kinds of diffusers ``ModelHook`` (attached with :mod:`ditlens.analyzer.hooks`, so they
compose with diffusers' own hooks and leave nothing behind):

* :class:`StepHook` on the transformer reads each forward's batch, grid and timestep, advances
  the step, says which batch rows are cond / uncond (or which forward is which branch with
  separate-forward CFG), checks the run against the plan, and resets every cache when a new
  pipeline call starts (the scheduler's ``timesteps`` tensor is replaced by ``set_timesteps``).
* :class:`LayerHook` on every attention module runs the module under an
  :class:`~ditlens.analyzer.capture.AttentionInterceptor` that replaces each
  ``scaled_dot_product_attention`` call by the plan's method, in the call's own layout
  ([batch', heads, tokens, head_dim], frames or grid positions folded into batch'). A
  whole-layer AST returns the module output of the latest step the module ran, without running
  the module.

Exactly what is cached, per layer, per attention call of the layer's forward and per CFG branch
(one entry for batched CFG, one per branch with separate forwards):

* the attention output [batch', H, L, D] of the heads a later per-head AST reuses (the output
  the head produced, whatever the method, at the latest step it was computed);
* the WA-RS residual R = O - W [batch', H, L, D] of heads refreshed at a ``full`` step;
* the module output of the latest step, when the next step skips the module;
* with separate-forward CFG, the cond forward's attention output of ASC heads for the uncond
  forward of the same step.

Nothing is kept that no later step reads.
"""

from __future__ import annotations

import contextlib
import inspect
from functools import lru_cache
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ditlens.compress.flops import FlopsCounter
from ditlens.compress.methods import CallLayout, HeadMethod, attended_pairs, call_layout, dense_mask
from ditlens.compress.plan import Plan
from ditlens.compress.schedule import LayerStep, build_schedule, untouched_layers
from ditlens.errors import DitlensError, PlanMismatchError
from ditlens.kernels.graph_constants import graph_constant
from ditlens.kernels.triton_backend import output_like

STEP_HOOK = "ditlens.compress.step"
LAYER_HOOK = "ditlens.compress.layer"
BACKENDS = ("auto", "dense", "flex", "kernels")
# How a full step that refreshes WA-RS residuals runs on Triton: one launch returning O and R = O - W,
# or the model's own attention followed by a windowed launch that subtracts (benchmarks/small_shapes.py)
WARSR_REFRESH = ("one-pass", "two-pass")
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


@dataclass
class ForwardState:
    """The forward in flight."""

    step: int
    grid: tuple[int, int, int]
    branch_key: str  # "all" (batched or no CFG), "cond" or "uncond" (separate forwards)
    batched_cfg: bool
    cond_first: bool


@dataclass
class RuntimeState:
    """Caches and step tracking of one pipeline call (cleared when the next call starts)."""

    step: int = -1
    last_marker: tuple[str, float] | None = None  # see ditlens.analyzer.capture.step_marker
    calls_at_step: int = 0
    timesteps_ref: Any = None
    unchecked_timesteps: list[tuple[int, Any]] = field(default_factory=list)  # (step, timestep argument)
    module_out: dict[tuple[int, str], Any] = field(default_factory=dict)
    head_out: dict[tuple[int, str, int], torch.Tensor] = field(default_factory=dict)
    residual: dict[tuple[int, str, int], torch.Tensor] = field(default_factory=dict)
    asc_out: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    peak_bytes: int = 0

    def clear(self) -> None:
        self.step, self.last_marker, self.calls_at_step = -1, None, 0
        self.unchecked_timesteps.clear()
        self.module_out.clear()
        self.head_out.clear()
        self.residual.clear()
        self.asc_out.clear()

    def cache_bytes(self) -> int:
        total = 0
        for store in (self.head_out, self.residual, self.asc_out):
            total += sum(t.numel() * t.element_size() for t in store.values())
        for out in self.module_out.values():
            total += sum(t.numel() * t.element_size() for t in _tensors(out))
        return total

    def note_peak(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self.cache_bytes())


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in _tensors(item)]
    return []


class PlanRuntime:
    """Everything one applied plan needs at run time."""

    def __init__(self, plan: Plan, adapter: Any, transformer: nn.Module, scheduler: Any, pipe: Any,
                 backend: str = "auto", count_flops: bool = True, warsr_refresh: str = "two-pass") -> None:
        if backend not in BACKENDS:
            raise DitlensError(f"unknown attention backend {backend!r}; use one of {', '.join(BACKENDS)}")
        if warsr_refresh not in WARSR_REFRESH:
            raise DitlensError(f"unknown warsr_refresh {warsr_refresh!r}; use one of {', '.join(WARSR_REFRESH)}")
        self.plan = plan
        self.adapter = adapter
        self.transformer = transformer
        self.scheduler = scheduler
        self.pipe = pipe
        self.backend = backend
        self.count_flops = count_flops
        self.warsr_refresh = warsr_refresh
        self.schedule = build_schedule(plan)
        # A plan that leaves every layer untouched (all full, e.g. once lowering ran every WA-RS
        # segment dense) changes nothing a forward computes. Its step bookkeeping (~70 µs of host time
        # per forward on a 2-core development machine) is then paid only by the first forward of each
        # call, which runs the checks: in a host-bound loop (DiT-XL 512² eager) that bookkeeping is
        # most of what such a plan would cost.
        # Layers the plan never changes get no hook unless FLOPs are counted (see apply_plan).
        self.untouched: set[int] = set() if count_flops else untouched_layers(self.schedule)
        self.idle = len(self.untouched) == len(plan.model.layers)
        self._checked_timesteps: Any = None  # the call (scheduler timesteps) whose first forward passed the checks
        self.state = RuntimeState()
        self.flops = FlopsCounter()
        self.forward: ForwardState | None = None
        # (transformer, args, kwargs) of a forward whose step bookkeeping has not run yet (see settle)
        self._pending: tuple[nn.Module, tuple, dict] | None = None
        self._windows_checked_on: tuple[int, ...] | None = None  # the grid a grid-less plan's windows passed
        self.attention_seconds = 0.0
        self._indices: dict[tuple[tuple[int, ...], str], torch.Tensor] = {}
        from ditlens.analyzer.capture import InterceptRoute, step_marker

        self.routes = [InterceptRoute() for _ in plan.model.layers]
        self._step_marker = step_marker  # imported once: begin_forward runs at every forward
        # Caches change size only at steps whose actions store into them; the peak is taken there.
        self._stores_at = [any(a.store_module or a.store_heads or a.refresh or a.uses_asc for a in row)
                           for row in self.schedule]
        from ditlens.compress.graphs import plan_graph_key

        # What tells this plan's CUDA graphs from other configurations'. Worked out here, with the
        # schedule: serialising a DiT-XL plan takes milliseconds, which a pipeline call that syncs at
        # every step (as diffusers' do) would otherwise pay in its first forward.
        self.graph_key: str = plan_graph_key(
            plan.to_json(), f"{backend}, flops {count_flops}, WA-RS refresh {warsr_refresh}")

    # -- CUDA graphs (ditlens.compress.graphs): a replayed forward runs none of the layer hooks ----
    def graph_snapshot(self) -> tuple[FlopsCounter | None, int]:
        """The host-side counters after a captured forward, restored after each of its replays."""
        return (self.flops.copy() if self.count_flops else None), self.state.cache_bytes()

    def restore_graph_snapshot(self, snapshot: tuple[FlopsCounter | None, int]) -> None:
        flops, cache_bytes = snapshot
        if flops is not None:  # a copy: the runtime resets its counter in place at the next call
            self.flops = flops.copy()
        self.state.peak_bytes = max(self.state.peak_bytes, cache_bytes)

    # -- steps ---------------------------------------------------------------------------------
    def defer_forward(self, transformer: nn.Module, args: tuple, kwargs: dict) -> None:
        """A transformer forward starts; its step bookkeeping waits for :meth:`settle`, unless it may
        read a timestep back from the GPU: a read waits for all work queued before it, so after the
        forward's launch it would stall the host for the whole forward."""
        self._pending = (transformer, args, kwargs)
        if self._may_read_timestep():
            self.settle()

    def checked_this_call(self) -> bool:
        """Whether a forward of the current pipeline call already passed the run checks (a new call
        sets new scheduler timesteps)."""
        timesteps = getattr(self.scheduler, "timesteps", None)
        return timesteps is not None and timesteps is self._checked_timesteps

    def _may_read_timestep(self) -> bool:
        """Whether the next forward's bookkeeping may read its timestep: where the scheduler keeps no
        step index (the step is told by the timestep, see step_marker), at the first forward of a call,
        and where the plan's timesteps are checked (steps 0, 1 and the last; see begin_forward)."""
        if getattr(self.scheduler, "step_index", None) is None:
            return True
        step = self.state.step
        return self.plan.run.timesteps is not None and (step < 1 or step + 1 >= self.plan.steps - 1)

    def settle(self) -> None:
        """Run the pending forward's step bookkeeping and run checks, once. The first layer that
        consults the plan calls it, and so does a CUDA graph capture; a forward that never consults
        the plan (a graph replay, or a plan that leaves every layer untouched) runs it after the
        forward is enqueued, where the host work overlaps the GPU's instead of delaying it. That
        matters where the pipeline waits for the GPU at every step (DiT-XL 512² under graphs)."""
        pending = self._pending
        if pending is not None:
            self._pending = None
            self.begin_forward(*pending)

    def begin_forward(self, transformer: nn.Module, args: tuple, kwargs: dict) -> None:
        info = self.adapter.forward_info(transformer, args, kwargs)
        st, plan = self.state, self.plan
        timesteps = getattr(self.scheduler, "timesteps", None)
        if timesteps is not None and timesteps is not st.timesteps_ref:
            st.clear()  # the pipeline called set_timesteps: a new call
            st.timesteps_ref = timesteps
            if isinstance(timesteps, (torch.Tensor, list, tuple)) and len(timesteps) != plan.steps:
                raise PlanMismatchError(
                    f"plan was made for {plan.steps} steps but the pipeline runs {len(timesteps)} (run.steps); "
                    f"call it with num_inference_steps={plan.steps} or make a plan for {len(timesteps)} steps")
        layout = plan.run.cfg_layout
        marker = self._step_marker(self.scheduler, info)
        if st.last_marker is None or marker != st.last_marker:
            if st.step >= 0 and layout == "separate_cond_first" and st.calls_at_step == 0:
                raise PlanMismatchError(
                    "plan was made for separate cond/uncond forwards (run.cfg_layout 'separate_cond_first') but step "
                    f"{st.step} ran one transformer forward; run with CFG on or use a plan made without CFG")
            if st.step + 1 >= plan.steps:
                st.clear()  # the previous call finished: a new one starts
            st.step += 1
            st.calls_at_step = 0
            st.last_marker = marker
        else:
            st.calls_at_step += 1
        if st.step == 0 and st.calls_at_step == 0:
            self.flops.reset()
            st.asc_out.clear()
        step = st.step
        # An idle plan's later forwards run bare if their timesteps can all be checked now.
        bare_from_here = self.idle and step == 0 and st.calls_at_step == 0 and self._check_schedule()
        if plan.run.timesteps is not None and st.calls_at_step == 0:
            # Reading a GPU timestep waits for the device, so only the first two steps (where another
            # scheduler setting already shows) are checked at once; the rest at the last step, from the
            # pipeline's own timestep tensors (kept, not copied: a copy is one more launch per step).
            st.unchecked_timesteps.append((step, info.timestep))
            if step < 2 or step == plan.steps - 1:
                self._check_timesteps(st.unchecked_timesteps)
                st.unchecked_timesteps.clear()
        grid = plan.model.tokens.grid
        if grid is not None and tuple(info.grid) != tuple(grid):
            what = ("frame count (run.frames)" if tuple(info.grid[1:]) == tuple(grid[1:]) else
                    "resolution (run.height/width)")
            raise PlanMismatchError(
                f"plan was made for a token grid of {grid[0]}x{grid[1]}x{grid[2]} (frames x rows x cols, "
                f"{plan.run.height}x{plan.run.width} pixels) but the pipeline runs {info.grid[0]}x{info.grid[1]}x{info.grid[2]}: "
                f"another {what}; call it as the plan was made or make a plan for this one")
        if grid is None and tuple(info.grid) != self._windows_checked_on:
            plan.check_windows(tuple(info.grid))  # a plan made without a grid: its windows meet one here
            self._windows_checked_on = tuple(info.grid)
        self.forward = self._branches(info, step, layout)
        if bare_from_here:
            self._checked_timesteps = timesteps

    def _check_timesteps(self, seen: list[tuple[int, Any]]) -> None:
        """Check each (step, timestep argument). A tensor the pipeline passed at several steps (reused
        in place) holds only its latest value: the earlier steps that passed it go unchecked."""
        from ditlens.analyzer.adapters import timestep_float

        last_use = {id(t): k for k, (_, t) in enumerate(seen) if isinstance(t, torch.Tensor)}
        for k, (step, timestep) in enumerate(seen):
            if not isinstance(timestep, torch.Tensor) or last_use[id(timestep)] == k:
                self._check_timestep(step, timestep_float(timestep))

    def _check_schedule(self) -> bool:
        """Check the timestep of every step after the first against the scheduler's schedule, which
        holds what the pipeline will pass up to its family's scale (FLUX passes t / 1000); step 0 is
        checked against the timestep passed. True when every step is checked (or the plan records no
        timesteps); False when the schedule cannot tell (no tensor schedule, or a plan whose step 0
        maps to the schedule by anything but 1 or 1 / 1000): then every forward is tracked."""
        expected = self.plan.run.timesteps
        if expected is None:
            return True
        schedule = getattr(self.scheduler, "timesteps", None)
        if not isinstance(schedule, torch.Tensor) or schedule.numel() != len(expected):
            return False
        values = schedule.detach().double().flatten().tolist()
        # plans record the transformer's axis or the scheduler's: step 0 tells which
        scale = next((c for c in (1.0, 1e-3) if _close(expected[0], values[0] * c)), None)
        if scale is None:
            return False
        for step in range(1, len(values)):
            if not _close(expected[step], values[step] * scale):
                raise PlanMismatchError(
                    f"step {step} runs timestep {values[step] * scale:g} but the plan was made for {expected[step]:g} "
                    "(run.timesteps): another scheduler setting, step count or resolution")
        return True

    def _check_timestep(self, step: int, value: float) -> None:
        expected = self.plan.run.timesteps[step]
        # Online searches record what the transformer receives; plans from a trace record the
        # scheduler's values (the trace's axis), which some families rescale (FLUX: t / 1000).
        schedule = getattr(getattr(self.pipe, "scheduler", None), "timesteps", None)
        if not _close(expected, value) and not (schedule is not None and step < len(schedule)
                                                and _close(expected, float(schedule[step]))):
            raise PlanMismatchError(
                f"step {step} runs timestep {value:g} but the plan was made for {expected:g} "
                "(run.timesteps): another scheduler setting, step count or resolution")

    def _branches(self, info: Any, step: int, layout: str) -> ForwardState:
        st = self.state
        # the pipeline's CFG switch cannot change within a call: read at step 0 (a property, host time)
        cfg_now = getattr(self.pipe, "do_classifier_free_guidance", None) if step == 0 else None
        if layout in ("batched_cond_first", "batched_uncond_first"):
            if info.batch % 2 or cfg_now is False:
                raise PlanMismatchError(
                    f"plan was made for batched CFG (run.cfg_layout {layout!r}) but the transformer saw batch {info.batch} "
                    "without CFG; run with guidance_scale > 1 or make a plan without CFG")
            if st.calls_at_step > 0:
                raise PlanMismatchError(f"plan expects one batched forward per step (run.cfg_layout {layout!r}) but step "
                                        f"{step} ran several")
            return ForwardState(step, info.grid, "all", True, layout == "batched_cond_first")
        if layout == "separate_cond_first":
            if st.calls_at_step > 1:
                raise PlanMismatchError(f"step {step} ran more than two transformer forwards; not a cond/uncond pair")
            return ForwardState(step, info.grid, ("cond", "uncond")[st.calls_at_step], False, True)
        if st.calls_at_step > 0 or cfg_now is True:
            raise PlanMismatchError(
                "plan was made without CFG (run.cfg_layout 'none') but the pipeline runs CFG; "
                "run with guidance_scale <= 1 or make a plan for this CFG layout")
        return ForwardState(step, info.grid, "all", False, True)

    def end_forward(self) -> None:
        self._pending = None  # a forward that raised before settling is not counted as a step
        # caches only grow or are replaced within a forward, so their size at its end is its peak
        if self.forward is not None and self._stores_at[self.forward.step]:
            self.state.note_peak()
        self.forward = None

    # -- layers --------------------------------------------------------------------------------
    def run_layer(self, index: int, module: nn.Module, original: Callable, args: tuple, kwargs: dict) -> Any:
        if self._pending is not None:
            self.settle()
        fwd = self.forward
        if fwd is None:
            return original(*args, **kwargs)
        action = self.schedule[fwd.step][index]
        key = (index, fwd.branch_key)
        if action.skip_module:
            if key not in self.state.module_out:
                raise DitlensError(f"layer {self.plan.model.layers[index].name}: no cached module output at step "
                                   f"{fwd.step} (was the pipeline call interrupted?)")
            if self.count_flops:  # what the skipped module would have cost
                self.flops.core_full += self.flops.last_core_full.get(key, 0)
                self.flops.projections_full += self.flops.last_projection.get(key, 0)
            return self.state.module_out[key]
        if action.plain and not self.count_flops:  # nothing to change or count: no interception at all
            out = original(*args, **kwargs)
        else:
            from ditlens.analyzer.capture import run_intercepted

            calls = [0]
            core_full_before, proj_before = self.flops.core_full, self.flops.projections

            def handler(func, q, k, v, call_args, call_kwargs):
                call = calls[0]
                calls[0] += 1
                return self.attend(index, call, action, func, call_args, call_kwargs)

            out = run_intercepted(lambda: original(*args, **kwargs), handler, self.routes[index])
        if self.count_flops:
            self.flops.last_projection[key] = self.flops.projections - proj_before
            self.flops.projections_full += self.flops.projections - proj_before
            self.flops.last_core_full[key] = self.flops.core_full - core_full_before
        if action.store_module:
            self.state.module_out[key] = out
        return out

    def call_layout(self, index: int, q: torch.Tensor, k: torch.Tensor) -> CallLayout:
        return call_layout(self.plan.model.layers[index], self.forward.grid, q.shape[-2], k.shape[-2])  # type: ignore[union-attr]

    def attend(self, index: int, call: int, action: LayerStep, func: Callable, call_args: tuple,
               call_kwargs: dict) -> torch.Tensor:
        """One attention product under the plan's per-head methods."""
        fwd = self.forward
        assert fwd is not None
        params = _sdpa_params(call_args, call_kwargs)
        q, k, v = params.pop("query"), params.pop("key"), params.pop("value")
        B, H, Lq, _ = q.shape
        d = q.shape[-1]
        layout = self.call_layout(index, q, k)
        full_flops = 4 * d * Lq * k.shape[-2]
        if self.count_flops:
            self.flops.core_full += full_flops * H * B
        if action.plain:
            if self.count_flops:
                self.flops.core += full_flops * H * B
            return func(*call_args, **call_kwargs)
        if params.get("is_causal"):
            raise DitlensError(f"layer {self.plan.model.layers[index].name} runs causal attention; ditlens plans assume "
                               "non-causal attention")
        if params.get("enable_gqa") and k.shape[1] != H:
            raise DitlensError("grouped-query attention is not supported by the compression runtime")
        st = self.state
        key = (index, fwd.branch_key, call)
        rows_all = slice(0, B)
        if fwd.batched_cfg:  # the cond rows are one half of the batch (ASC copies them into both)
            half = B // 2
            cond_rows = slice(0, half) if fwd.cond_first else slice(half, B)
        else:
            cond_rows = rows_all
        refreshed = False
        if action.all_full:  # a full step that only keeps caches
            out = self._warsr_one_pass(q, k, v, params, action, key, layout, fwd)
            refreshed = out is not None
            if out is None:  # the model's own call computes it
                out = func(*call_args, **call_kwargs)
            if self.count_flops:
                self.flops.core += full_flops * H * B
        else:
            out = self._warsr_apply(q, k, v, params, action, key, layout, cond_rows, fwd)
        if out is None:
            out = self._fused(q, k, v, params, action, key, layout, cond_rows, fwd)
        if out is None:
            out = self._grouped(index, call, action, func, q, k, v, params, key, layout, cond_rows, fwd)
        refresh: dict[tuple[str, int, bool], list[int]] = {}
        done = refreshed or self._warsr_refresh(q, k, v, params, action, key, layout, out, cond_rows, fwd)
        for h, wars in () if done else action.refresh:
            if not (wars.asc and fwd.branch_key == "uncond"):  # every step using it copies the cond branch
                refresh.setdefault((wars.mask_kind, wars.window, wars.asc), []).append(h)
        for (kind, w, asc), heads in refresh.items():
            idx = self._index(heads, q.device)
            rows = cond_rows if asc and fwd.batched_cfg else rows_all
            w_out = self._masked(func, q[rows][:, idx], k[rows][:, idx], v[rows][:, idx], params, rows, idx, kind, w,
                                 layout)
            if self.count_flops:
                self.flops.core += 4 * d * _pairs(kind, w, layout) * len(heads) * w_out.shape[0]
            if key not in st.residual:
                st.residual[key] = torch.zeros_like(out)
            st.residual[key][rows, idx] = out[rows][:, idx] - w_out
        if action.store_heads:
            if key not in st.head_out:
                st.head_out[key] = torch.zeros_like(out)
            if len(action.store_heads) == H:
                st.head_out[key].copy_(out)
            else:
                idx = self._index(action.store_heads, q.device)
                st.head_out[key][:, idx] = out[:, idx]
        if fwd.branch_key == "cond" and action.uses_asc:
            st.asc_out[(index, call)] = out
        return out

    def _grouped(self, index: int, call: int, action: LayerStep, func: Callable, q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor, params: dict, key: tuple, layout: CallLayout, cond_rows: slice,
                 fwd: ForwardState) -> torch.Tensor:
        """The heads of one call in groups of one method each (one attention product per group)."""
        st = self.state
        B, H, _, d = q.shape
        rows_all = slice(0, B)
        # in q's memory order (as SDPA returns it): merging the heads back costs no copy
        out = output_like(q, v.shape[-1])
        ast_heads = action.ast_heads
        for (base, kind, w, asc), heads in action.head_groups:
            every = len(heads) == H  # no gather/scatter when the group is the whole layer
            idx = None if every else self._index(heads, q.device)
            if asc and fwd.branch_key == "uncond":  # separate forwards: copy the cond forward's output
                cached = st.asc_out.get((index, call))
                if cached is None:
                    raise DitlensError(f"layer {self.plan.model.layers[index].name}: ASC at step {fwd.step} found no cond "
                                       "output (the uncond forward ran first?)")
                if every:
                    out.copy_(cached)
                else:
                    out[:, idx] = cached[:, idx]
                continue
            if asc and fwd.batched_cfg and B % 2:
                raise DitlensError(
                    f"layer {self.plan.model.layers[index].name}: ASC needs the cond and uncond rows in one attention call, "
                    f"but this layer attends one sample per call (batch {B}); remove +asc for this layer")
            rows = cond_rows if asc and fwd.batched_cfg else rows_all
            if every:
                o = self._masked(func, q[rows], k[rows], v[rows], params, rows, None, kind, w, layout)
            else:
                o = self._masked(func, q[rows][:, idx], k[rows][:, idx], v[rows][:, idx], params, rows, idx, kind, w,
                                 layout)
            if self.count_flops:
                self.flops.core += 4 * d * _pairs(kind, w, layout) * len(heads) * o.shape[0]
            if base == "wars":
                o = o + (st.residual[key][rows] if every else st.residual[key][rows][:, idx])
            if asc and fwd.batched_cfg:
                _into_both_halves(out, o, idx)
            elif every:
                out[rows] = o
            else:
                out[rows, idx] = o
        if ast_heads:
            cached = st.head_out.get(key)
            if cached is None:
                raise DitlensError(f"layer {self.plan.model.layers[index].name}: AST at step {fwd.step} found no cached "
                                   "output (was the pipeline call interrupted?)")
            if len(ast_heads) == H:
                out.copy_(cached)
            else:
                idx = self._index(ast_heads, q.device)
                out[:, idx] = cached[:, idx]
        return out

    def _fused(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: dict, action: LayerStep, key: tuple,
               layout: CallLayout, cond_rows: slice, fwd: ForwardState) -> torch.Tensor | None:
        """Every head of the call in one :func:`ditlens.kernels.headwise_attention` launch, or None
        when the methods need the grouped path: full / window / arrow / AST heads (no WA-RS, no
        window2d), with +asc on every head or on none, and at least one sparse or AST head."""
        methods = action.heads
        asc = action.fused_asc
        if (asc is None or not self._use_fast(q) or layout.cross or k.shape != q.shape
                or v.shape != q.shape or params.get("attn_mask") is not None or params.get("dropout_p")):
            return None
        if asc and (not fwd.batched_cfg or q.shape[0] % 2):
            return None
        skips = bool(action.ast_heads)
        cached = self.state.head_out.get(key) if skips else None
        if skips and cached is None:
            return None  # the grouped path says what is missing
        from ditlens.kernels import headwise_attention

        rows = cond_rows if asc else slice(0, q.shape[0])
        o = headwise_attention(q[rows], k[rows], v[rows], modes=action.head_modes, windows=action.head_windows,
                               n_text=layout.n_text, text_first=layout.text_first,
                               cached=None if cached is None else cached[rows], scale=params.get("scale"),
                               backend="flex" if self.backend == "flex" else "auto")
        if self.count_flops:
            for m in methods:
                if m.computes:
                    self.flops.core += 4 * q.shape[-1] * _pairs(m.mask_kind, m.window, layout) * o.shape[0]
        if not asc:
            return o
        out = torch.empty_like(q)
        _into_both_halves(out, o)
        return out

    def _whole_self_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: dict,
                              layout: CallLayout) -> bool:
        """Whether this call can go to :mod:`ditlens.kernels` as a whole: self-attention of one shape,
        no model mask or dropout, and a backend that uses the kernels (or FlexAttention)."""
        return (self._use_fast(q) and not layout.cross and k.shape == q.shape and v.shape == q.shape
                and params.get("attn_mask") is None and not params.get("dropout_p"))

    def _kernel_backend(self) -> str:
        return "flex" if self.backend == "flex" else "auto"

    def _count_windows(self, windows: tuple[int, ...], layout: CallLayout, head_dim: int, rows: int) -> None:
        """Attention FLOPs of one windowed product per head (one head per entry of ``windows``)."""
        if self.count_flops:
            self.flops.core += sum(4 * head_dim * _pairs("window", w, layout) * rows for w in windows)

    def _warsr_apply(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: dict, action: LayerStep,
                     key: tuple, layout: CallLayout, cond_rows: slice, fwd: ForwardState) -> torch.Tensor | None:
        """A WA-RS step on every head (each its own window): ``W + R`` in one launch, the residual added
        in the kernel's epilogue (the grouped path needs a window launch, an addition and a copy).
        None when the layer mixes methods or the call needs the grouped path."""
        spec = action.wars_windows
        if spec is None or not self._whole_self_attention(q, k, v, params, layout):
            return None
        windows, asc = spec
        residual = self.state.residual.get(key)
        if residual is None or (asc and not fwd.batched_cfg):
            return None  # separate forwards copy the cond output on the grouped path
        from ditlens.kernels import windowed_plus_residual

        if asc:
            q, k, v, residual = q[cond_rows], k[cond_rows], v[cond_rows], residual[cond_rows]
        o = windowed_plus_residual(q, k, v, residual, windows=windows, n_text=layout.n_text,
                                   text_first=layout.text_first, pattern="window", scale=params.get("scale"),
                                   backend=self._kernel_backend())
        self._count_windows(windows, layout, q.shape[-1], o.shape[0])
        # +asc: the uncond half is a copy of the cond half, whichever half comes first
        return o.repeat(2, 1, 1, 1) if asc else o

    def _warsr_one_pass(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: dict, action: LayerStep,
                        key: tuple, layout: CallLayout, fwd: ForwardState) -> torch.Tensor | None:
        """A full step whose every head feeds a later WA-RS step, as one Triton launch that returns
        ``O`` and stores ``R = O - W`` (each key block's scores shared by both softmaxes). None when
        the two-pass refresh applies instead: another backend, a call off the fast path, +ASC (its
        residual covers the cond rows only), or ``warsr_refresh="two-pass"``."""
        spec = action.refresh_windows
        if (self.warsr_refresh != "one-pass" or spec is None or spec[1]
                or not self._whole_self_attention(q, k, v, params, layout)):
            return None
        from ditlens.kernels import resolve_backend, warsr_attention

        if resolve_backend(q, self._kernel_backend()) != "triton":
            return None
        windows, _ = spec
        out, self.state.residual[key] = warsr_attention(
            q, k, v, windows=windows, n_text=layout.n_text, text_first=layout.text_first, pattern="window",
            scale=params.get("scale"), backend="triton", fused=True)
        self._count_windows(windows, layout, q.shape[-1], out.shape[0])
        return out

    def _warsr_refresh(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: dict, action: LayerStep,
                       key: tuple, layout: CallLayout, out: torch.Tensor, cond_rows: slice, fwd: ForwardState) -> bool:
        """The residuals ``R = O - W`` of a full step whose every head feeds a later WA-RS step, in one
        windowed launch that subtracts from ``O`` in its epilogue. False when the grouped loop must do it."""
        spec = action.refresh_windows
        if spec is None or not self._whole_self_attention(q, k, v, params, layout):
            return False
        windows, asc = spec
        if asc and not fwd.batched_cfg:
            return False
        from ditlens.kernels import warsr_attention

        st = self.state
        full = out
        if asc:
            q, k, v, full = q[cond_rows], k[cond_rows], v[cond_rows], out[cond_rows]
        _, r = warsr_attention(q, k, v, windows=windows, n_text=layout.n_text, text_first=layout.text_first,
                               pattern="window", scale=params.get("scale"), backend=self._kernel_backend(), full=full)
        self._count_windows(windows, layout, q.shape[-1], r.shape[0])
        if not asc:
            st.residual[key] = r
        else:  # the residual's uncond rows are never read
            if key not in st.residual:
                st.residual[key] = torch.zeros_like(out)
            st.residual[key][cond_rows] = r
        return True

    def _index(self, heads: tuple[int, ...] | list[int], device: torch.device) -> torch.Tensor:
        """A head-index tensor on ``device``, made once per head set (no host-to-device copy per call)."""
        key = (tuple(heads), str(device))
        idx = self._indices.get(key)
        if idx is None:
            idx = self._indices[key] = torch.tensor(key[0], device=device)
        return graph_constant(idx)

    def _masked(self, func: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: dict, rows: slice,
                heads: torch.Tensor | None, kind: str, w: int, layout: CallLayout) -> torch.Tensor:
        """Attention of a subset of rows/heads under one mask, combined with the model's own mask."""
        extra = dict(params)
        model_mask = extra.pop("attn_mask", None)
        if model_mask is not None and model_mask.dim() == 4:
            if model_mask.shape[0] not in (1,):
                model_mask = model_mask[rows]
            if model_mask.shape[1] not in (1,) and heads is not None:
                model_mask = model_mask[:, heads]
        if kind == "full":
            return func(q, k, v, attn_mask=model_mask, **extra)
        if model_mask is None and self._use_fast(q):
            fast = _fast_attention(q, k, v, kind, w, layout, extra.get("scale"), self.backend)
            if fast is not None:
                return fast
        mask = graph_constant(dense_mask(kind, w, layout, str(q.device)))
        if model_mask is not None:
            mask = model_mask & mask if model_mask.dtype == torch.bool else model_mask.masked_fill(~mask, float("-inf"))
        return func(q, k, v, attn_mask=mask, **extra)

    def _use_fast(self, q: torch.Tensor) -> bool:
        """Kernels or FlexAttention for this call (else dense masks through the model's SDPA)."""
        if self.backend == "dense":
            return False
        if self.backend == "flex":
            from ditlens.kernels.torch_backends import flex_refusal

            return flex_refusal(q) is None  # e.g. head_dim < 16 on CUDA: the dense path
        if self.backend == "kernels":
            return True
        return q.is_cuda

    def reset(self) -> None:
        self.state.clear()
        self.flops.reset()
        self._checked_timesteps = None


def _into_both_halves(out: torch.Tensor, o: torch.Tensor, heads: torch.Tensor | None = None) -> None:
    """ASC under batched CFG: ``o`` (the cond rows' output) into both halves of ``out``'s batch (cond
    and uncond rows, in either order), at ``heads`` or at every head, in one broadcast copy."""
    halves = out.unflatten(0, (2, out.shape[0] // 2))
    if heads is None:
        halves.copy_(o.unsqueeze(0))
    else:
        halves[:, :, heads] = o.unsqueeze(0)


def _close(expected: float, value: float) -> bool:
    """Timesteps equal up to float32 rounding and the scheduler's arithmetic."""
    return abs(expected - value) <= 1e-3 * max(1.0, abs(value))


def _pairs(kind: str, w: int, layout: CallLayout) -> int:
    return layout.q_len * layout.k_len if kind == "full" else attended_pairs(HeadMethod(kind, w), layout)


def _sdpa_params(args: tuple, kwargs: dict) -> dict[str, Any]:
    params = dict(zip(_SDPA_PARAMS, args))
    params.update(kwargs)
    return params


def _fast_attention(q, k, v, kind: str, w: int, layout: CallLayout, scale: float | None, backend: str):
    """ditlens.kernels when it is there (window/arrow, window2d on a grid), else FlexAttention; None: use
    the dense path."""
    if backend in ("auto", "kernels") and kind == "window2d" and scale is None and layout.grid is not None:
        from ditlens.kernels.window2d import window2d_attention

        return window2d_attention(q, k, v, radius=w, grid=layout.grid, n_text=layout.n_text,
                                  text_first=layout.text_first)
    if backend in ("auto", "kernels") and kind in ("window", "arrow") and scale is None:
        try:
            from ditlens.kernels import headwise_attention  # type: ignore[attr-defined]
        except ImportError:
            headwise_attention = None
        if headwise_attention is not None:
            n_heads = q.shape[1]
            return headwise_attention(q, k, v, modes=[kind] * n_heads, windows=[w] * n_heads, n_text=layout.n_text,
                                      text_first=layout.text_first)
        if backend == "kernels":
            raise DitlensError("backend 'kernels' asked for but ditlens.kernels.headwise_attention is not available")
    return _flex_attention(q, k, v, kind, w, layout, scale)


def _flex_attention(q, k, v, kind: str, w: int, layout: CallLayout, scale: float | None):
    try:
        from ditlens.kernels.torch_backends import flex_function, flex_refusal
    except ImportError:
        return None
    if flex_refusal(q):
        return None  # the caller runs the dense mask
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # eager (unfused) FlexAttention off CUDA: expected
        return flex_function(q.device)(q, k, v, block_mask=graph_constant(_block_mask(kind, w, layout, str(q.device))), scale=scale)


@lru_cache(maxsize=64)
def _block_mask(kind: str, w: int, layout: CallLayout, device: str):
    """FlexAttention block mask of one method and layout, built once (building costs a compile)."""
    from torch.nn.attention.flex_attention import create_block_mask

    from ditlens.compress.methods import method_mask

    def mask_mod(b, h, q_idx, kv_idx):
        return method_mask(kind, w, q_idx, kv_idx, layout)

    return create_block_mask(mask_mod, None, None, layout.q_len, layout.k_len, device=device)


# --------------------------------------------------------------------------------------------
# Hooks and the handle
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _hook_classes() -> tuple[type, type]:
    """ModelHook subclasses, built on first use so importing ditlens.compress does not import diffusers."""
    from diffusers.hooks import ModelHook as base

    class StepHook(base):  # type: ignore[misc, valid-type]
        """On the transformer: step tracking, branch rows, run checks."""

        def __init__(self, runtime: PlanRuntime, handle: "PlanHandle") -> None:
            super().__init__()
            self.runtime = runtime
            self.handle = handle

        def new_forward(self, module, *args, **kwargs):
            if self.runtime.idle and self.runtime.checked_this_call():  # nothing to track: the forward runs bare
                return self.fn_ref.original_forward(*args, **kwargs)
            self.runtime.defer_forward(module, args, kwargs)
            try:
                out = self.fn_ref.original_forward(*args, **kwargs)
                self.runtime.settle()  # if no layer consulted the plan: now, while the GPU runs the forward
                return out
            finally:
                self.runtime.end_forward()

        def reset_state(self, module):
            self.runtime.reset()
            return module

    class LayerHook(base):  # type: ignore[misc, valid-type]
        """On one attention module: the plan's methods for that layer."""

        def __init__(self, runtime: PlanRuntime, index: int) -> None:
            super().__init__()
            self.runtime = runtime
            self.index = index

        def new_forward(self, module, *args, **kwargs):
            return self.runtime.run_layer(self.index, module, self.fn_ref.original_forward, args, kwargs)

    return StepHook, LayerHook


@dataclass
class PlanHandle:
    """An applied plan. ``remove()`` (or ``remove_plan(pipe)``) takes everything off again."""

    plan: Plan
    runtime: PlanRuntime
    transformer: nn.Module
    modules: list[nn.Module]  # the attention modules that carry a layer hook
    linear_hooks: list[Any]
    removed: bool = False
    counted_linears: list[nn.Linear] = field(default_factory=list)  # projections whose FLOPs are counted

    @property
    def flops(self):
        """FLOPs executed by the latest pipeline call (:class:`~ditlens.compress.flops.FlopsReport`)."""
        return self.runtime.flops.report()

    def cache_bytes(self) -> int:
        """Bytes the caches hold now."""
        return self.runtime.state.cache_bytes()

    def peak_cache_bytes(self) -> int:
        """Largest cache size seen since the plan was applied."""
        return self.runtime.state.peak_bytes

    def reset(self) -> None:
        """Drop every cache (done automatically when a new pipeline call starts)."""
        self.runtime.reset()

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """Run the model without the plan for a while, keeping this handle's runtime: inside, the
        modules are exactly as :meth:`remove` leaves them; on exit the same hooks go back on, with
        the caches reset. The runtime's device constants (head-index tensors, whose upload from
        pageable memory synchronises the stream) survive, so a plan alternated with the
        uncompressed model, as ``validate`` does, does not rebuild them at every call."""
        from ditlens.analyzer import hooks

        if self.removed:
            raise DitlensError("this plan was removed; apply it again instead of suspending it")
        taken = self._take_off()
        try:
            yield
        finally:
            if not self.removed:  # removed inside: it stays off
                for module, hook, name in reversed(taken):  # the step hook first, as apply_plan attached it
                    hooks.attach(module, hook, name)
                self._count_projections()
                self.runtime.reset()

    def _take_off(self) -> list[tuple[nn.Module, Any, str]]:
        """Detach every hook of this plan and reset its runtime; the (module, hook, name) detached."""
        from ditlens.analyzer import hooks

        taken = []
        for module, name in [(m, LAYER_HOOK) for m in self.modules] + [(self.transformer, STEP_HOOK)]:
            hook = hooks.registered(module, name)
            if hook is not None:
                hooks.detach(module, name)
                taken.append((module, hook, name))
        for h in self.linear_hooks:
            h.remove()
        self.linear_hooks.clear()
        self.runtime.reset()
        return taken

    def _count_projections(self) -> None:
        """A FLOPs counter on each of :attr:`counted_linears`."""
        self.linear_hooks += [sub.register_forward_hook(_linear_counter(self.runtime)) for sub in self.counted_linears]

    def remove(self) -> None:
        if not self.removed:
            self._take_off()
            self.removed = True

    def __enter__(self) -> "PlanHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def apply_plan(pipe: Any, plan: Plan | str, *, registry: Any = None, backend: str = "auto",
               count_flops: bool = True, warsr_refresh: str = "two-pass") -> PlanHandle:
    """Apply ``plan`` (a :class:`Plan` or a path to its JSON) to ``pipe`` (a diffusers pipeline).

    The plan is checked against the pipeline's transformer and scheduler first (refused with a
    :class:`PlanMismatchError` naming the field); resolution, step count and CFG layout are
    checked on the first forward (a plan that changes no layer and counts no FLOPs checks only
    there: the call's other forwards run without the runtime). Returns a handle; ``handle.remove()`` or
    :func:`remove_plan` restore the pipeline exactly. ``warsr_refresh`` picks how a full step
    that refreshes WA-RS residuals runs on the Triton backend (``"one-pass"``: one launch for
    ``O`` and ``R``; ``"two-pass"``: the model's attention, then a windowed launch writing ``R``).
    """
    from ditlens.analyzer import hooks
    from ditlens.analyzer.adapters import default_registry

    if not isinstance(plan, Plan):
        plan = Plan.load(plan)
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        raise DitlensError(f"{type(pipe).__name__} has no .transformer; apply_plan needs a diffusers DiT pipeline")
    if hooks.has_hook(transformer, STEP_HOOK):
        raise DitlensError("a ditlens plan is already applied to this pipeline; remove it first (remove_plan(pipe))")
    adapter = (registry or default_registry()).find(transformer)
    plan.check_model(transformer, adapter, getattr(pipe, "scheduler", None), adapter.pipeline_cfg_layout(pipe))
    plan.check_structure()
    runtime = PlanRuntime(plan, adapter, transformer, getattr(pipe, "scheduler", None), pipe, backend, count_flops,
                          warsr_refresh)
    modules = [transformer.get_submodule(layer.name) for layer in plan.model.layers]
    # A layer the plan never changes gets no hook unless FLOPs are counted: every hook costs host time
    # at every forward, and a host-bound step (DiT-XL 512² eager) is made of little else.
    hooked = [index for index in range(len(modules)) if index not in runtime.untouched]
    step_cls, layer_cls = _hook_classes()
    handle = PlanHandle(plan, runtime, transformer, [modules[index] for index in hooked], [])
    try:
        hooks.attach(transformer, step_cls(runtime, handle), STEP_HOOK)
        for index in hooked:
            hooks.attach(modules[index], layer_cls(runtime, index), LAYER_HOOK)
        if count_flops:
            handle.counted_linears = [sub for module in modules for sub in module.modules() if isinstance(sub, nn.Linear)]
            handle._count_projections()
    except Exception:
        handle.remove()
        raise
    return handle


def _linear_counter(runtime: PlanRuntime):
    def hook(module: nn.Linear, inputs: tuple, output: torch.Tensor) -> None:
        if runtime.forward is not None:
            tokens = inputs[0].numel() // module.in_features
            runtime.flops.projections += 2 * module.in_features * module.out_features * tokens

    return hook


def remove_plan(pipe: Any) -> bool:
    """Remove the plan applied to ``pipe``; False when none was applied."""
    transformer = getattr(pipe, "transformer", None)
    registry = getattr(transformer, "_diffusers_hook", None)
    hook = registry.get_hook(STEP_HOOK) if registry is not None else None
    if hook is None:
        return False
    hook.handle.remove()
    return True


def signature_has(func: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False
