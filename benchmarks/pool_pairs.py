"""Pool the paired loop ratios of several ``benchmarks/e2e.py`` runs of one command.

Each run's row keeps the ratio of every (uncompressed, planned) pair of pipeline calls
(``pair_ratios`` in its JSON). One run's interval of the median is wide on a host that drifts
(DiT-XL 512² eager: pairs of identical calls spread ±20 %); runs of the same command on the same
code measure the same thing, so their pairs pool. Per row this prints each run's median, the
pooled median and its distribution-free interval at 95 % and at 95 % Bonferroni-adjusted for the
number of rows compared, and how many runs' medians fell below 1. Rows whose plan runs exactly
the uncompressed model's GPU work (the A/A control, the all-full plan, plans whose every WA-RS
segment was lowered to dense: attention fraction 100 %, no cache) also pool into one reference
distribution of ratios between identical calls.

With ``--before`` runs of the same command on earlier code, each row also prints the earlier
pooled median and the two-sided Mann-Whitney p-value of "this row's ratios moved": the test of
whether a code change moved one plan while the rows of identical work stayed put.

    python benchmarks/pool_pairs.py benchmarks/results/e2e_dit_eager_h100_session33.json \\
        benchmarks/results/e2e_dit_eager_b_h100_session33.json \\
        --before benchmarks/results/e2e_dit_eager_run{1,3}_h100_session32.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from _paths import benchmarks_last  # noqa: E402

benchmarks_last()

from e2e import median_interval  # noqa: E402


@dataclass
class PooledRow:
    model: str
    plan: str
    core_fraction: float
    identical_work: bool  # the plan runs the uncompressed model's GPU work (see the module doc)
    run_medians: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)


def _row_key(model: str, position: int, row: dict) -> tuple[str, int, str, float]:
    return model, position, row["plan"], round(row["core_fraction"], 4)


def pool(paths: list[Path]) -> list[PooledRow]:
    """The paired rows of every run, matched by model, position and plan; runs of different
    commands (other rows) are refused."""
    pooled: dict[tuple, PooledRow] = {}
    layout = None
    for path in paths:
        try:
            data = json.loads(path.read_text())
            models = data["models"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SystemExit(f"{path}: not a benchmarks/e2e.py result ({exc}); pass the JSON that e2e.py --out wrote")
        keys = []
        for model in models:
            for position, row in enumerate(model["rows"]):
                if not row.get("pair_ratios"):
                    continue  # the reference row, or a run made before pairs were kept
                key = _row_key(model["model"], position, row)
                keys.append(key)
                entry = pooled.setdefault(key, PooledRow(
                    model["model"], row["plan"], row["core_fraction"],
                    row["plan"] != "uncompressed" and row["core_fraction"] == 1.0 and row["cache_gib"] == 0.0))
                entry.run_medians.append(statistics.median(row["pair_ratios"]))
                entry.ratios.extend(row["pair_ratios"])
        if not keys:
            raise SystemExit(f"{path}: no row keeps its pair ratios (made before e2e.py kept them?); rerun it")
        if layout is not None and keys != layout:
            raise SystemExit(f"{path}: its rows differ from {paths[0]}'s; pool only runs of one e2e.py command")
        layout = keys
    return list(pooled.values())


def _key(row: PooledRow) -> tuple[str, str, float]:
    return row.model, row.plan, round(row.core_fraction, 4)


def _interval(ratios: list[float], level: float) -> str:
    bounds = median_interval(ratios, level)
    return "n/a" if bounds is None else f"{bounds[0]:.3f}-{bounds[1]:.3f}"


def report(rows: list[PooledRow], n_runs: int, before: list[PooledRow] | None = None) -> str:
    """The pooled table; with ``before`` (the same rows on earlier code) two more columns: the
    earlier pooled median and the Mann-Whitney p-value of a shift between the two."""
    from scipy.stats import mannwhitneyu

    if before is not None and [_key(r) for r in before] != [_key(r) for r in rows]:
        raise ValueError("the earlier runs' rows differ from these; compare runs of the same e2e.py command")
    bonferroni = 1.0 - 0.05 / len(rows)
    lines = [f"{n_runs} runs pooled; median of the paired ratios (>1: the plan is faster), distribution-free "
             f"intervals at 95 % and at {100 * bonferroni:.2f} % (95 % Bonferroni-adjusted for {len(rows)} rows)"
             + ("; before: the earlier runs' pooled median, p: two-sided Mann-Whitney test of a shift"
                if before else ""),
             f"  {'plan':<58} {'fraction':>8} {'runs':<24} {'pairs':>5} {'median':>6}  {'95 %':<11}  "
             f"{'adjusted':<11}  below 1" + ("  before      p" if before else "")]
    for index, row in enumerate(rows):
        runs = " ".join(f"{m:.3f}" for m in row.run_medians)
        below = sum(m < 1.0 for m in row.run_medians)
        mark = " (identical work)" if row.identical_work else ""
        lines.append(f"  {(row.plan + mark)[:58]:<58} {100 * row.core_fraction:7.1f}% {runs:<24} {len(row.ratios):5d} "
                     f"{statistics.median(row.ratios):6.3f}  {_interval(row.ratios, 0.95):<11}  "
                     f"{_interval(row.ratios, bonferroni):<11}  {below}/{len(row.run_medians)}"
                     + (f"{'':>5}{statistics.median(before[index].ratios):6.3f}  "
                        f"{mannwhitneyu(row.ratios, before[index].ratios).pvalue:5.3f}" if before else ""))
    reference = [r for row in rows if row.identical_work for r in row.ratios]
    if len(reference) >= 20:
        q = statistics.quantiles(reference, n=20)
        lines.append(f"  identical-work pairs pooled: {len(reference)}, median {statistics.median(reference):.3f} "
                     f"({_interval(reference, 0.95)}), 5/25/75/95 % quantiles "
                     f"{q[0]:.3f} / {q[4]:.3f} / {q[14]:.3f} / {q[18]:.3f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="JSON files that benchmarks/e2e.py --out wrote")
    parser.add_argument("--before", nargs="+", type=Path, default=[], metavar="RUN",
                        help="runs of the same command on earlier code, to test which rows moved")
    args = parser.parse_args()
    rows = pool(args.runs)
    before = pool(args.before) if args.before else None
    try:
        print(report(rows, len(args.runs), before))
    except ValueError as exc:
        raise SystemExit(f"{args.before[0]} against {args.runs[0]}: {exc}") from None


if __name__ == "__main__":
    main()
