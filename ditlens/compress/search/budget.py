"""Budget mode: search for an attention-FLOPs fraction (or a modelled latency fraction) instead of δ.

Bisection on δ in log space: the compressed share grows with δ (more pairs pass c/H·δ and the
budget widens), so the smallest δ whose plan meets the target is found in ``iterations`` solves.
Each solve is a whole search (cheap from a trace, a full run online). Deterministic: same inputs,
same sequence of δ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from ditlens.compress.search.common import SearchResult
from ditlens.errors import DitlensError


@dataclass
class BudgetOutcome:
    result: SearchResult
    delta: float
    achieved: float
    evaluations: list[tuple[float, float]]  # (δ, achieved fraction) in the order tried


def plan_fraction(result: SearchResult, target: str) -> float:
    """Attention-core FLOPs fraction of the plan (``flops``) — the modelled latency uses the same
    static accounting unless a latency model is given by the search (it is then recorded in notes)."""
    flops = result.plan.flops
    if flops is None:
        raise DitlensError("the plan has no static FLOPs (unknown token grid); budget mode needs it")
    return float(flops.attention_core_fraction)


def search_for_budget(search: Callable[[float], SearchResult], target_fraction: float, *,
                      measure: Callable[[SearchResult], float] | None = None, delta_low: float = 1e-4,
                      delta_high: float = 1.0, iterations: int = 10, max_delta: float = 1e3) -> BudgetOutcome:
    """Smallest δ (to the bisection's resolution) whose plan's fraction is <= ``target_fraction``."""
    if not 0 < target_fraction <= 1:
        raise DitlensError(f"target fraction {target_fraction} must be in (0, 1]")
    measure = measure or (lambda r: plan_fraction(r, "flops"))
    tried: list[tuple[float, float]] = []

    def run(delta: float) -> tuple[SearchResult, float]:
        result = search(delta)
        value = measure(result)
        tried.append((delta, value))
        return result, value

    best, value = run(delta_high)
    while value > target_fraction and delta_high < max_delta:
        delta_low, delta_high = delta_high, delta_high * 4
        best, value = run(delta_high)
    if value > target_fraction:
        return BudgetOutcome(best, delta_high, value, tried)  # unreachable target: the most compressive plan
    best_delta = delta_high
    lo, hi = math.log(delta_low), math.log(delta_high)
    for _ in range(iterations):
        mid = math.exp((lo + hi) / 2)
        result, value_mid = run(mid)
        if value_mid <= target_fraction:
            hi, best, best_delta, value = math.log(mid), result, mid, value_mid
        else:
            lo = math.log(mid)
    return BudgetOutcome(best, best_delta, value, tried)


__all__ = ["BudgetOutcome", "search_for_budget", "plan_fraction"]
