"""The least work any exact implementation of V1's Alg. 1 could have done on a recorded search.

A V1 search that runs every micro-batch of every trial (``GreedyConfig(early_reject=False)``)
records the A.2 loss terms of every batch row of every trial (``SearchResult.trial_passes``).
Knowing them all after the fact, the cheapest exact search that reaches the same decisions

* runs a trial only from the block of the layer being decided (block reuse), and never reruns a
  block to commit a decision (the accepted trial already computed it);
* runs a trial that passes on every row whose output it cannot know: the decision needs its
  whole loss;
* stops a trial that fails as soon as the rows run so far sum past the threshold, running them
  in descending order of their loss terms (an oracle order no real search has).

Two granularities:

* ``prompt``: the unit is one micro-batch forward, as this engine runs them (with micro-batches
  of one prompt: one prompt's cond and uncond rows);
* ``row``: the unit is one batch row, and rows whose output is already known cost nothing and
  count their loss from the start. Those are the cond rows of an ASC trial (the cond branch runs
  exactly as in the current state) and the cond rows of a WA-RS trial after the WA-RS+ASC trial
  of the same layer (the cond branch runs the same WA-RS in both).

Costs are in block runs of the search's micro-batches (a row costs 1/rows of one; with every
unit of a trial costing the same, descending loss order is the cheapest way to reject). The
uncompressed output of every step is needed by any search and is reported apart.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

from ditlens.compress.methods import parse_method
from ditlens.compress.search.greedy import CURRENT_STATE, TrialPass, known_cond_source, layer_threshold
from ditlens.errors import DitlensError


@dataclass(frozen=True)
class SearchFloor:
    """Trial work, in block runs, of the recorded search and of the oracle exact searches."""

    trials: int
    recorded: float  # blocks the recorded trials ran
    prompt: float  # oracle, one micro-batch forward as the unit
    row: float  # oracle, one batch row as the unit, known rows free
    row_all_unknown: float  # oracle, one batch row as the unit, no row known (the finer unit alone)
    failing_loss_ratios: tuple[float, ...] = ()  # loss / threshold of every failing trial
    failing_row_fraction: float = 0.0  # share of the failing trials' unknown rows the row oracle runs


def _known_cond_rows(trial: list[TrialPass], tried_before: set[str]) -> set[tuple[int, int]]:
    """(micro-batch, row) pairs whose output an exact search already holds for this trial."""
    source = known_cond_source(parse_method(trial[0].method))
    if source is None or (source != CURRENT_STATE and source.to_str() not in tried_before):
        return set()
    return {(p.micro_batch, r) for p in trial for r, b in enumerate(p.branches) if b == "cond"}


def _oracle_cost(units: list[tuple[float, float]], known_sum: float, count: int, threshold: float,
                 passed: bool) -> float:
    """Cost of one trial given its unknown (loss sum, cost) units, every unit costing the same."""
    if passed:
        return sum(cost for _, cost in units)
    total, spent = known_sum, 0.0
    for loss, cost in sorted(units, key=lambda u: -u[0]):
        if total / count >= threshold:
            break
        total += loss
        spent += cost
    return spent


def exact_search_floor(passes: Sequence[TrialPass], delta: float, n_layers: int) -> SearchFloor:
    """Oracle trial work of the recorded first-pass V1 search (see the module docstring).

    ``passes``: ``SearchResult.trial_passes`` of a search run with ``early_reject=False`` and
    ``every_candidate=False``, so that every trial holds every micro-batch."""
    trials: dict[tuple[int, int, str], list[TrialPass]] = defaultdict(list)
    for p in passes:
        trials[(p.step, p.layer, p.method)].append(p)
    micro_batches = {p.micro_batch for p in passes}
    tried: dict[tuple[int, int], set[str]] = defaultdict(set)
    decided: set[tuple[int, int]] = set()
    recorded = prompt = row = row_all = 0.0
    ratios: list[float] = []
    failing_run = failing_all = 0.0
    for (step, layer, method), trial in trials.items():
        if {p.micro_batch for p in trial} != micro_batches or len(trial) != len(micro_batches):
            raise DitlensError(f"trial {method} at step {step}, layer {layer} lacks micro-batches: the floor needs a "
                               "search run with early_reject=False")
        if (step, layer) in decided:
            raise DitlensError(f"step {step}, layer {layer} ran a trial after one passed: the floor is for "
                               "the first-pass search (every_candidate=False)")
        count = sum(len(p.row_sums) * p.row_elements for p in trial)
        loss_sum = sum(p.loss_sum for p in trial)
        threshold = layer_threshold(layer, n_layers, delta)
        passed = loss_sum / count < threshold
        recorded += sum(p.block_runs for p in trial)
        prompt += _oracle_cost([(p.loss_sum, float(p.suffix_blocks)) for p in trial], 0.0, count, threshold, passed)
        known = _known_cond_rows(trial, tried[(step, layer)])
        row_cost = trial[0].suffix_blocks / max(len(p.row_sums) for p in trial)  # equal for every row
        units, known_sum = [], 0.0
        for p in trial:
            for r, value in enumerate(p.row_sums):
                if (p.micro_batch, r) in known:
                    known_sum += value
                else:
                    units.append((value, row_cost))
        cost = _oracle_cost(units, known_sum, count, threshold, passed)
        row += cost
        row_all += _oracle_cost([(v, row_cost) for p in trial for v in p.row_sums], 0.0, count, threshold, passed)
        if not passed:
            ratios.append(loss_sum / count / threshold)
            failing_run += cost
            failing_all += sum(c for _, c in units)
        tried[(step, layer)].add(method)
        if passed:
            decided.add((step, layer))
    return SearchFloor(len(trials), recorded, prompt, row, row_all, tuple(ratios),
                       failing_run / failing_all if failing_all else 0.0)


__all__ = ["SearchFloor", "exact_search_floor"]
