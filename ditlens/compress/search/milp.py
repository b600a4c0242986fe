"""DiTFastAttnV2's per-layer integer program (paper eq. 2), solved with scipy's HiGHS MILP.

For one (step, layer) with H heads and M candidate methods::

    min   Σ_h Σ_m X[h,m] · (L[h,m] - L_full[h])        (= total latency minus the all-full latency)
    s.t.  Σ_h Σ_m X[h,m] · I[h,m] <= δ                   (the layer's influence budget)
          Σ_m X[h,m] <= 1            for every head      (an unchosen head runs full)
          X[h,m] = 0 where I[h,m] > c/H · δ               (head constraint coefficient c)
          X[h,m] ∈ {0, 1}

Pairs with a non-finite influence (e.g. output cache at step 0) or no latency saving are left
out. The result is one candidate index per head, -1 for full.

Most programs never need the solver: when every head's cheapest admissible candidate together
stay within δ, that choice is optimal (it minimises every head's term with the budget relaxed).
HiGHS runs only when the budget binds (always, for c <= 1, it cannot).
"""

from __future__ import annotations

import numpy as np


def feasible_pairs(influence: np.ndarray, cost: np.ndarray, full_cost: np.ndarray, delta: float, c: float | None) -> np.ndarray:
    """Boolean [H, M]: pairs the program may choose."""
    H = influence.shape[0]
    ok = np.isfinite(influence) & np.isfinite(cost) & (cost < full_cost[:, None])
    ok &= influence <= delta
    if c is not None:
        ok &= influence <= c / H * delta
    return ok


def undominated(ok: np.ndarray, influence: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """``ok`` without pairs another candidate of the same head beats on both latency and influence
    (no worse on either, better on one, or equal on both with a lower index): an optimum never
    needs them, and HiGHS gets fewer variables."""
    M = ok.shape[1]
    # [H, m, o]: candidate o of the head against candidate m
    no_worse = (cost[:, None, :] <= cost[:, :, None]) & (influence[:, None, :] <= influence[:, :, None])
    better = ((cost[:, None, :] < cost[:, :, None]) | (influence[:, None, :] < influence[:, :, None])
              | (np.arange(M)[None, None, :] < np.arange(M)[None, :, None]))
    dominated = (no_worse & better & ok[:, None, :]).any(axis=2)
    return ok & ~dominated


def solve_layer(influence: np.ndarray, cost: np.ndarray, full_cost: np.ndarray | float, delta: float,
                c: float | None = 1.5) -> np.ndarray:
    """Optimal method index per head (-1: full). ``influence`` and ``cost`` are [H, M]; ``full_cost``
    [H] or a scalar (latency of a head running full); ``c=None`` drops the per-head constraint."""
    influence = np.asarray(influence, dtype=np.float64)
    cost = np.asarray(cost, dtype=np.float64)
    H, M = influence.shape
    full = np.broadcast_to(np.asarray(full_cost, dtype=np.float64), (H,))
    choice = np.full(H, -1, dtype=np.int64)
    ok = undominated(feasible_pairs(influence, cost, full, delta, c), influence, cost)
    pairs = np.argwhere(ok)
    if len(pairs) == 0:
        return choice
    from scipy.optimize import Bounds, LinearConstraint, milp

    n = len(pairs)
    saving = np.array([cost[h, m] - full[h] for h, m in pairs])  # negative: latency saved
    weights = np.array([influence[h, m] for h, m in pairs])
    # A tiny tie-break towards lower influence makes equal-latency optima deterministic and sensible.
    scale = max(float(np.abs(saving).max()), 1e-30)
    objective = saving / scale + 1e-9 * weights / max(delta, 1e-30)
    greedy = _unconstrained_optimum(pairs, objective, H)
    if sum(influence[h, m] for h, m in enumerate(greedy) if m >= 0) <= delta:
        return greedy
    heads = sorted({int(h) for h, _ in pairs})
    rows = np.zeros((1 + len(heads), n))
    rows[0] = weights
    for r, h in enumerate(heads, start=1):
        rows[r, pairs[:, 0] == h] = 1.0
    upper = np.concatenate([[delta], np.ones(len(heads))])
    result = milp(objective, constraints=LinearConstraint(rows, -np.inf, upper), integrality=np.ones(n),
                  bounds=Bounds(0, 1), options={"presolve": True})
    if result.x is None:  # infeasible cannot happen (X = 0 is feasible); keep all full defensively
        return choice
    for (h, m), x in zip(pairs, result.x):
        if x > 0.5:
            choice[h] = m
    return choice


def _unconstrained_optimum(pairs: np.ndarray, objective: np.ndarray, H: int) -> np.ndarray:
    """Every head's best admissible candidate (lowest objective, then lowest index), ignoring δ."""
    choice = np.full(H, -1, dtype=np.int64)
    best = np.zeros(H)
    for (h, m), value in zip(pairs, objective):
        if value < best[h]:
            choice[h], best[h] = m, value
    return choice


def objective_value(choice: np.ndarray, cost: np.ndarray, full_cost: np.ndarray | float) -> float:
    """Total latency of a choice (full heads at ``full_cost``)."""
    H = len(choice)
    full = np.broadcast_to(np.asarray(full_cost, dtype=np.float64), (H,))
    return float(sum(full[h] if m < 0 else cost[h, m] for h, m in enumerate(choice)))


def total_influence(choice: np.ndarray, influence: np.ndarray) -> float:
    return float(sum(influence[h, m] for h, m in enumerate(choice) if m >= 0))
