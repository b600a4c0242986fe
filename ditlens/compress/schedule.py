"""What the runtime does at each (step, layer): the plan resolved into concrete actions.

Derived once from a plan, shared by the runtime and the static FLOPs count so both agree on
what runs: which heads compute with which mask, which outputs must be kept for a later AST,
and at which ``full`` steps a WA-RS residual R = O - W must be computed (only when a later
WA-RS step uses it, with the window that step uses).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

from ditlens.compress.methods import FULL, HeadMethod

if TYPE_CHECKING:
    from ditlens.compress.plan import Plan


@dataclass(frozen=True)
class LayerStep:
    """The action of one layer at one step."""

    skip_module: bool  # whole-layer AST: return the module output cached at the latest step it ran
    heads: tuple[HeadMethod, ...]
    store_module: bool  # keep the module output: the next step skips the module
    store_heads: tuple[int, ...]  # heads whose attention output a later per-head AST reuses
    # (head, wars(w)[+asc]) whose residual R = O - W this full step computes; +asc: cond rows only
    refresh: tuple[tuple[int, HeadMethod], ...]

    @cached_property
    def all_full(self) -> bool:
        """Every head runs full attention (the model's own call computes the step)."""
        return all(m == FULL for m in self.heads)

    @property
    def plain(self) -> bool:
        """Every head full, nothing to keep: the original attention call runs untouched."""
        return self.all_full and not self.store_heads and not self.refresh

    @cached_property
    def uses_asc(self) -> bool:
        return any(m.asc for m in self.heads)

    # The runtime reads the groupings below at every attention call of the step: cached here, once
    # per (step, layer), instead of recomputed per call (host time in a host-bound loop).
    @cached_property
    def head_groups(self) -> tuple[tuple[tuple[str, str, int, bool], tuple[int, ...]], ...]:
        """The computing heads grouped by (base, mask kind, window, +asc), in order of first head."""
        groups: dict[tuple[str, str, int, bool], list[int]] = {}
        for h, m in enumerate(self.heads):
            if m.computes:
                groups.setdefault((m.base, m.mask_kind, m.window, m.asc), []).append(h)
        return tuple((key, tuple(heads)) for key, heads in groups.items())

    @cached_property
    def ast_heads(self) -> tuple[int, ...]:
        """Heads that copy a cached output (per-head AST)."""
        return tuple(h for h, m in enumerate(self.heads) if not m.computes)

    @cached_property
    def head_modes(self) -> tuple[str, ...]:
        """Each head's mask kind for one headwise launch ("skip" for AST heads)."""
        return tuple(m.mask_kind if m.computes else "skip" for m in self.heads)

    @cached_property
    def head_windows(self) -> tuple[int, ...]:
        return tuple(m.window for m in self.heads)

    @cached_property
    def fused_asc(self) -> bool | None:
        """For a step one headwise launch can run (full / window / arrow / AST heads, at least one of
        them sparse or AST, no WA-RS or window2d): whether every computing head has +asc (False: none
        has). None when the methods need the grouped path (see PlanRuntime._fused)."""
        computing = [m for m in self.heads if m.computes]
        if (any(m.base in ("wars", "window2d") for m in computing) or all(m.base == "full" for m in self.heads)
                or len({m.asc for m in computing}) > 1):
            return None
        asc = bool(computing) and computing[0].asc
        if asc and self.ast_heads:
            return None  # ASC with skipped heads: the grouped path
        return asc

    @cached_property
    def wars_windows(self) -> tuple[tuple[int, ...], bool] | None:
        """(window per head, +asc) when every head runs WA-RS with one +asc setting, else None."""
        asc = {m.asc for m in self.heads}
        if not self.heads or any(m.base != "wars" for m in self.heads) or len(asc) > 1:
            return None
        return tuple(m.window for m in self.heads), asc.pop()

    @cached_property
    def refresh_windows(self) -> tuple[tuple[int, ...], bool] | None:
        """(window per head, +asc) when this step refreshes the residual of every head, with one
        +asc setting, else None."""
        asc = {wars.asc for _, wars in self.refresh}
        if not self.refresh or len(self.refresh) != len(self.heads) or len(asc) > 1:
            return None
        return tuple(wars.window for _, wars in sorted(self.refresh, key=lambda hw: hw[0])), asc.pop()


def build_schedule(plan: "Plan") -> list[list[LayerStep]]:
    steps, n_layers, n_heads = plan.steps, plan.n_layers, plan.model.heads
    table = [[plan.head_methods(s, i) for i in range(n_layers)] for s in range(steps)]
    skip = [[plan.skips_module(s, i) for i in range(n_layers)] for s in range(steps)]
    out: list[list[LayerStep]] = [[None] * n_layers for _ in range(steps)]  # type: ignore[list-item]
    for i in range(n_layers):
        for s in range(steps):
            heads = table[s][i]
            if skip[s][i]:
                out[s][i] = LayerStep(True, heads, False, (), ())
                continue
            store_module = s + 1 < steps and skip[s + 1][i]
            # the next step at which the attention core runs again
            nxt = next((t for t in range(s + 1, steps) if not skip[t][i]), None)
            store_heads = tuple(h for h in range(n_heads)
                                if heads[h].computes and nxt is not None and table[nxt][i][h].base == "ast")
            refresh = []
            for h in range(n_heads):
                if heads[h] != FULL:
                    continue
                users = []  # the WA-RS steps that will read this step's residual
                for t in range(s + 1, steps):
                    if skip[t][i]:
                        continue
                    later = table[t][i][h]
                    if later == FULL:
                        break
                    if later.base == "wars":
                        users.append(later)
                if users:
                    # the uncond rows' residual is needed only if some user step does not copy cond (ASC)
                    refresh.append((h, HeadMethod("wars", users[0].window, all(u.asc for u in users))))
            out[s][i] = LayerStep(False, heads, store_module, store_heads, tuple(refresh))
    return out


def untouched_layers(schedule: list[list[LayerStep]]) -> set[int]:
    """Layers whose original attention call runs unchanged at every step, nothing cached or skipped."""
    n_layers = len(schedule[0]) if schedule else 0
    return {i for i in range(n_layers)
            if all(row[i].plain and not row[i].skip_module and not row[i].store_module for row in schedule)}
