"""Plan search: MILP vs brute force, Alg. 1 order and thresholds, the V1 loss, determinism,
search trajectories equal to runtime replays, from-trace equal to online V2, budget mode."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from tests.tiny_models import build_tiny_pipeline, pipeline_call_kwargs
from ditlens.compress.runtime import apply_plan
from ditlens.compress.search.common import aggregate_influence
from ditlens.compress.search.engine import EngineConfig, SearchEngine
from ditlens.compress.search.greedy import GreedyConfig, layer_threshold, search_greedy, strategy_list, v1_loss_sums
from ditlens.compress.search.headwise import HeadwiseConfig, search_headwise
from ditlens.compress.search.milp import objective_value, solve_layer, total_influence
from ditlens.errors import DitlensError

STEPS = 3


# -- MILP --------------------------------------------------------------------------------------


def brute_force(influence, cost, full, delta, c):
    H, M = influence.shape
    best = float(np.sum(full))
    for assign in itertools.product(range(-1, M), repeat=H):
        total_i, total_l, ok = 0.0, 0.0, True
        for h, m in enumerate(assign):
            if m < 0:
                total_l += full[h]
                continue
            i = influence[h, m]
            if not np.isfinite(i) or i > c / H * delta or cost[h, m] >= full[h]:
                ok = False
                break
            total_i += i
            total_l += cost[h, m]
        if ok and total_i <= delta + 1e-12:
            best = min(best, total_l)
    return best


@pytest.mark.parametrize("seed", range(25))
def test_milp_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    H, M = rng.integers(2, 5), rng.integers(1, 4)
    influence = rng.uniform(0, 0.5, (H, M))
    influence[rng.uniform(size=(H, M)) < 0.15] = np.nan
    cost = rng.uniform(0, 1.2, (H, M))
    full = np.ones(H)
    delta, c = rng.uniform(0.05, 1.0), rng.choice([1.0, 1.5, 2.0])
    choice = solve_layer(influence, cost, full, delta, c)
    assert objective_value(choice, cost, full) == pytest.approx(brute_force(influence, cost, full, delta, c), abs=1e-9)
    assert total_influence(choice, influence) <= delta + 1e-9
    for h, m in enumerate(choice):
        if m >= 0:
            assert influence[h, m] <= c / H * delta


def test_head_constraint_spreads_budget():
    # One head could take the whole budget for the biggest saving; c/H·δ forbids it.
    influence = np.array([[0.9], [0.2], [0.2]])
    cost = np.array([[0.0], [0.6], [0.6]])
    full = np.ones(3)
    assert list(solve_layer(influence, cost, full, 1.0, None)) == [0, -1, -1]
    assert list(solve_layer(influence, cost, full, 1.0, 1.5)) == [-1, 0, 0]


def test_aggregate_influence_asc_cond_counts_zero():
    rse = np.full((2, 2, 1, 2), np.nan)
    rse[:, 1, 0, 1] = [0.2, 0.4]  # asc: uncond only
    rse[:, :, 0, 0] = 0.1  # ast
    rse[0, 0, 0, 0] = np.nan  # missing output: infeasible
    agg = aggregate_influence(rse, ["ast", "asc"], ["cond", "uncond"])
    assert np.isnan(agg[0, 0])
    assert agg[0, 1] == pytest.approx((0 + 0 + 0.2 + 0.4) / 4)


# -- V1 ----------------------------------------------------------------------------------------


def test_alg1_order_and_threshold():
    assert [m.to_str() for m in strategy_list(4)] == ["ast", "wars(4)+asc", "wars(4)", "asc"]
    assert [layer_threshold(i, 4, 0.2) for i in range(4)] == pytest.approx([0.05, 0.1, 0.15, 0.2])


def test_v1_loss_matches_numpy():
    rng = np.random.default_rng(0)
    o, c = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    s, n = v1_loss_sums(torch.tensor(o), torch.tensor(c))
    ref = np.clip(np.abs(o - c) / (np.maximum(np.abs(o), np.abs(c)) + 1e-6), 0, 10).mean()
    assert s / n == pytest.approx(ref, rel=1e-12)


def _setup(family):
    pipe = build_tiny_pipeline(family, 0)
    pipe.set_progress_bar_config(disable=True)
    kw = pipeline_call_kwargs(family, "a cat", STEPS, 3.0, 0)
    extra = {k: v for k, v in kw.items()
             if k not in ("num_inference_steps", "generator", "class_labels", "prompt", "guidance_scale")}
    prompts = ["1", "2", "3"] if family == "dit" else ["a cat", "a dog", "red car"]
    return pipe, prompts, EngineConfig(steps=STEPS, guidance=3.0, micro_batch=2, call_kwargs=extra, progress=False)


def _images(output):
    return np.asarray(output.images if hasattr(output, "images") else output[0])


def _replay(pipe, prompts, engine_cfg, plan):
    with apply_plan(pipe, plan, backend="dense"):
        return _images(pipe(**SearchEngine(pipe, prompts, engine_cfg).call_kwargs()))


def test_v1_greedy_follows_alg1_against_brute_trials():
    """Every layer's choice is the first feasible strategy with loss < threshold, where the loss is
    recomputed here independently by running the model with apply_plan (full at later layers)."""
    pipe, prompts, ecfg = _setup("dit")
    delta = 0.4
    result = search_greedy(pipe, prompts, GreedyConfig(delta=delta, window=2, engine=ecfg))
    plan = result.plan
    # search trajectory = runtime replay of the plan
    np.testing.assert_allclose(_replay(pipe, prompts, ecfg, plan), _images(result.output), atol=1e-5)
    assert plan.provenance.search == "v1-greedy" and plan.provenance.delta == delta
    # step 0 cannot use AST; all choices come from the strategy list or full
    allowed = {m.to_str() for m in strategy_list(2)} | {"full"}
    assert all(m in allowed for row in plan.methods for m in row)
    assert all(m != "ast" for m in plan.methods[0])
    # accepted losses respect the layer-scaled threshold
    L = plan.n_layers
    for s in range(STEPS):
        for i in range(L):
            if plan.methods[s][i] != "full":
                assert result.losses[s, i] < layer_threshold(i, L, delta)


def test_v1_naive_equals_block_cached():
    pipe, prompts, ecfg = _setup("pixart")
    fast = search_greedy(pipe, prompts, GreedyConfig(delta=0.3, window=2, engine=ecfg))
    naive = search_greedy(pipe, prompts, GreedyConfig(delta=0.3, window=2, naive=True, engine=ecfg))
    assert fast.plan.methods == naive.plan.methods
    assert fast.block_runs < naive.block_runs


def test_v1_every_candidate_reference_decides_the_same_with_more_trials():
    """The authors' calibration loop (every strategy tried, the most compressive passing one kept)
    is a speed reference only: it must choose the same plan and losses as Alg. 1's first-pass loop."""
    pipe, prompts, ecfg = _setup("pixart")

    def trials(result) -> int:
        return int(dict(p.split("=", 1) for p in result.plan.provenance.notes.split("; "))["trials"])

    naive = search_greedy(pipe, prompts, GreedyConfig(delta=0.3, window=2, naive=True, engine=ecfg))
    every = search_greedy(pipe, prompts, GreedyConfig(delta=0.3, window=2, naive=True, every_candidate=True,
                                                      engine=ecfg))
    assert every.plan.methods == naive.plan.methods
    np.testing.assert_array_equal(np.isnan(every.losses), np.isnan(naive.losses))
    np.testing.assert_allclose(every.losses[~np.isnan(naive.losses)], naive.losses[~np.isnan(naive.losses)])
    # a layer that took a strategy before the last one ran the rest too
    passed_early = sum(m not in ("full", "full+asc") for step in naive.plan.methods for m in step)
    assert passed_early > 0
    assert trials(every) > trials(naive)
    assert every.block_runs > naive.block_runs


@pytest.mark.parametrize("method", ["v1", "v2"])
def test_search_api_passes_every_setting_through(method):
    """search() gives the plan the method's own entry point gives for the same settings (steps,
    micro-batch, guidance, δ): none is dropped or shifted on the way."""
    from ditlens.compress.search.api import search

    pipe, prompts, ecfg = _setup("dit")
    direct = (search_greedy(pipe, prompts, GreedyConfig(delta=0.3, engine=ecfg)) if method == "v1" else
              search_headwise(pipe, prompts, HeadwiseConfig(delta=0.3, engine=ecfg)))
    via_api = search(pipe, prompts, method=method, delta=0.3, steps=ecfg.steps, guidance=ecfg.guidance,
                     micro_batch=ecfg.micro_batch, call_kwargs=ecfg.call_kwargs, progress=False)
    assert via_api.plan.steps == STEPS == direct.plan.steps
    assert via_api.plan.methods == direct.plan.methods


def test_v1_early_rejection_changes_no_decision():
    """Stopping a trial once its partial loss sum is past the threshold gives the same plan and the
    same accepted losses as running every micro-batch, with fewer forward passes."""
    pipe, prompts, ecfg = _setup("dit")
    ecfg = EngineConfig(**{**ecfg.__dict__, "micro_batch": 1})
    early = search_greedy(pipe, prompts, GreedyConfig(delta=0.03, window=2, engine=ecfg))
    full = search_greedy(pipe, prompts, GreedyConfig(delta=0.03, window=2, early_reject=False, engine=ecfg))
    assert early.plan.methods == full.plan.methods
    np.testing.assert_allclose(early.losses, full.losses, rtol=1e-12)
    assert "rejected_early=0" not in early.plan.provenance.notes
    assert early.forward_passes < full.forward_passes


@pytest.mark.parametrize("family", ["dit", "pixart"])
def test_v1_accepted_trial_is_committed_without_a_rerun(family):
    """An accepted trial's output cache and block output are installed when it is decided: later
    trials rerun blocks only to commit layers that stayed full. Same plan as the naive search, and
    the search's trajectory is the runtime's replay of its plan."""
    pipe, prompts, ecfg = _setup(family)
    ecfg = EngineConfig(**{**ecfg.__dict__, "micro_batch": 1})
    fast = search_greedy(pipe, prompts, GreedyConfig(delta=0.01, window=2, engine=ecfg))
    naive = search_greedy(pipe, prompts, GreedyConfig(delta=0.01, window=2, naive=True, engine=ecfg))
    assert fast.plan.methods == naive.plan.methods
    methods = [m for step in fast.plan.methods for m in step]
    assert "full" in methods and any(m != "full" for m in methods)
    after_accepted = [p for p in fast.trial_passes if p.layer > 0 and fast.plan.methods[p.step][p.layer - 1] != "full"]
    assert after_accepted and all(p.block_runs == p.suffix_blocks for p in after_accepted)
    reruns = sum(p.block_runs - p.suffix_blocks for p in fast.trial_passes)
    assert reruns <= len({p.micro_batch for p in fast.trial_passes}) * methods.count("full")
    np.testing.assert_allclose(_replay(pipe, prompts, ecfg, fast.plan), _images(fast.output), atol=1e-5)


@pytest.mark.parametrize("family", ["dit", "pixart"])
def test_v1_row_split_changes_no_loss(family):
    """Trials that run only their uncond rows after their block (ASC, WA-RS after WA-RS+ASC) give the
    same plan and the same accepted losses as computing every row, for less block work; the search's
    trajectory is the runtime's replay of its plan."""
    pipe, prompts, ecfg = _setup(family)
    split = search_greedy(pipe, prompts, GreedyConfig(delta=0.01, window=2, engine=ecfg))
    whole = search_greedy(pipe, prompts, GreedyConfig(delta=0.01, window=2, row_split=False, engine=ecfg))
    assert split.plan.methods == whole.plan.methods
    # float32 blocks over fewer rows block their GEMMs differently (~1e-6 apart on some CPUs), and the
    # A.2 loss divides by max(|o|, |o'|), which magnifies that where outputs are near zero
    np.testing.assert_allclose(split.losses, whole.losses, rtol=1e-5)
    for a, b in zip(split.trial_passes, whole.trial_passes):
        assert (a.step, a.layer, a.method, a.micro_batch) == (b.step, b.layer, b.method, b.micro_batch)
        np.testing.assert_allclose(a.row_sums, b.row_sums, rtol=1e-4, atol=1e-9)
    split_methods = {p.method for p in split.trial_passes if p.block_work < p.block_runs}
    assert split_methods and split_methods <= {"asc", "wars(2)"}
    assert whole.block_work == whole.block_runs and split.block_work < whole.block_work
    np.testing.assert_allclose(_replay(pipe, prompts, ecfg, split.plan), _images(split.output), atol=1e-5)


def _brute_rejection_units(losses, known, count, threshold):
    """Fewest units whose loss sums (with the known part) reach the threshold, by enumeration."""
    for n in range(len(losses) + 1):
        for subset in itertools.combinations(losses, n):
            if (known + sum(subset)) / count >= threshold:
                return n
    return len(losses)


@pytest.mark.parametrize("seed", range(20))
def test_exact_search_floor_equals_enumeration(seed):
    """The oracle floor of random synthetic trials against subset enumeration: a passing trial pays
    every unit, a failing one the fewest that prove it fails; ASC and WA-RS-after-WA-RS+ASC cond rows
    are free and counted from the start."""
    from ditlens.compress.search.greedy import TrialPass
    from ditlens.compress.search.greedy_floor import exact_search_floor

    rng = np.random.default_rng(seed)
    n_layers, delta, n_mb, elements = 4, 0.2, int(rng.integers(1, 4)), 5
    branches = ("cond", "uncond")
    passes, expected_prompt, expected_row, expected_all = [], 0.0, 0.0, 0.0
    for layer in range(n_layers):
        threshold = layer_threshold(layer, n_layers, delta)
        suffix = n_layers - layer
        for method in ["ast", "wars(2)+asc", "wars(2)", "asc"]:
            rows = rng.uniform(0, 2.5 * threshold * elements, size=(n_mb, 2))
            passes += [TrialPass(0, layer, method, k, branches, tuple(rows[k]), elements, suffix, suffix + 1)
                       for k in range(n_mb)]
            count = rows.size * elements
            if rows.sum() / count < threshold:
                expected_prompt += n_mb * suffix
                free = method in ("asc", "wars(2)")
                expected_row += (n_mb if free else 2 * n_mb) * suffix / 2
                expected_all += n_mb * suffix
                break
            expected_prompt += suffix * _brute_rejection_units(list(rows.sum(axis=1)), 0.0, count, threshold)
            if method in ("asc", "wars(2)"):  # cond rows known
                n = _brute_rejection_units(list(rows[:, 1]), rows[:, 0].sum(), count, threshold)
            else:
                n = _brute_rejection_units(list(rows.ravel()), 0.0, count, threshold)
            expected_row += n * suffix / 2
            expected_all += _brute_rejection_units(list(rows.ravel()), 0.0, count, threshold) * suffix / 2
    floor = exact_search_floor(passes, delta, n_layers)
    assert floor.row_all_unknown == pytest.approx(expected_all)
    assert floor.prompt == pytest.approx(expected_prompt)
    assert floor.row == pytest.approx(expected_row)
    assert floor.recorded == sum(p.block_runs for p in passes)


def test_exact_search_floor_premises_and_bound():
    """On a real search: the cond rows the floor counts as known carry the loss terms the search
    measured for them (WA-RS+ASC's cond rows for WA-RS; the current state's cond rows for ASC), and
    the floor is below what the search ran, with and without early rejection."""
    from ditlens.compress.search.greedy_floor import exact_search_floor

    pipe, prompts, ecfg = _setup("pixart")
    ecfg = EngineConfig(**{**ecfg.__dict__, "micro_batch": 1})
    delta = 0.01  # tight enough that AST fails and WA-RS+ASC, WA-RS and ASC run at some layers
    # without the row split, every row of every trial is computed: the premises are checked, not assumed
    full = search_greedy(pipe, prompts, GreedyConfig(delta=delta, window=2, early_reject=False, row_split=False,
                                                     engine=ecfg))
    early = search_greedy(pipe, prompts, GreedyConfig(delta=delta, window=2, engine=ecfg))
    assert early.plan.methods == full.plan.methods
    by_trial: dict = {}
    for p in full.trial_passes:
        by_trial.setdefault((p.step, p.layer, p.method), {})[p.micro_batch] = p
    n_layers = full.plan.n_layers
    checked = {"wars": 0, "asc": 0}
    current = {}  # micro-batch -> cond-row loss of the current state at this step
    for (step, layer, method), trial in by_trial.items():
        cond = {k: [v for v, b in zip(p.row_sums, p.branches) if b == "cond"] for k, p in trial.items()}
        if method == "wars(2)" and (step, layer, "wars(2)+asc") in by_trial:
            before = by_trial[(step, layer, "wars(2)+asc")]
            for k in trial:
                np.testing.assert_allclose(cond[k], [v for v, b in zip(before[k].row_sums, before[k].branches)
                                                     if b == "cond"], rtol=1e-9, atol=1e-12)
            checked["wars"] += 1
        if method == "asc":
            for k in trial:
                np.testing.assert_allclose(cond[k], current.get((step, k), [0.0] * len(cond[k])), rtol=1e-9, atol=1e-9)
            checked["asc"] += 1
        count = sum(len(p.row_sums) * p.row_elements for p in trial.values())
        if sum(p.loss_sum for p in trial.values()) / count < layer_threshold(layer, n_layers, delta):
            for k in trial:
                current[(step, k)] = cond[k]
    assert checked["wars"] > 0 and checked["asc"] > 0
    floor = exact_search_floor(full.trial_passes, delta, n_layers)
    assert floor.row <= floor.row_all_unknown <= floor.prompt < floor.recorded
    assert floor.failing_loss_ratios and min(floor.failing_loss_ratios) >= 1.0
    assert 0.0 < floor.failing_row_fraction <= 1.0
    ran_suffixes = sum(p.suffix_blocks for p in early.trial_passes)
    assert floor.prompt <= ran_suffixes <= sum(p.suffix_blocks for p in full.trial_passes)
    assert full.baseline_block_runs == early.baseline_block_runs > 0
    with pytest.raises(Exception, match="early_reject=False"):
        exact_search_floor(early.trial_passes, delta, n_layers)


# -- V2 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,cands", [("dit", "ast,asc,window(3),wars(2)"), ("sd3", "ast,asc,arrow(3),wars(2)"),
                                          ("mochi", "ast,arrow(3),wars(2)"),
                                          ("pixart", "ast,asc,window(3)")])
def test_v2_trajectory_equals_runtime_replay_and_is_deterministic(family, cands):
    pipe, prompts, ecfg = _setup(family)
    cfg = HeadwiseConfig(delta=0.6, candidates=cands, engine=ecfg)
    a = search_headwise(pipe, prompts, cfg)
    b = search_headwise(pipe, prompts, cfg)
    assert a.plan.methods == b.plan.methods
    np.testing.assert_array_equal(a.influence, b.influence)
    np.testing.assert_allclose(_replay(pipe, prompts, ecfg, a.plan), _images(a.output), atol=1e-5)
    assert a.plan.provenance.search == "v2-headwise" and a.plan.provenance.c == 1.5
    assert a.plan.provenance.calibration_prompts == prompts
    assert a.plan.flops is not None and a.plan.flops.attention_core_fraction < 1


def test_latte_calibration_runs_each_prompt_as_a_one_prompt_call():
    """Latte encodes a multi-prompt call's text otherwise than a one-prompt call's (all tokens kept,
    padding zeroed, unmasked): the search's one batched call gives each prompt its one-prompt encoding
    and masks the padding, so its uncompressed trajectory is what one-prompt inference computes."""
    pipe, _, ecfg = _setup("latte")
    prompts = ["a cat", "a small grey dog beside a long red car at night", "red"]  # three text lengths
    result = search_greedy(pipe, prompts, GreedyConfig(delta=0.0, engine=ecfg))  # δ = 0: every layer stays full
    assert all(m == "full" for row in result.plan.methods for m in row)
    searched = _images(result.output)
    for i, prompt in enumerate(prompts):
        kwargs = pipeline_call_kwargs("latte", prompt, STEPS, 3.0, i)  # seed + i, as the search seeds prompt i
        alone = _images(pipe(**kwargs))
        np.testing.assert_allclose(searched[i], alone[0], atol=2e-5)


def test_searches_size_windows_per_sequence_and_skip_windows_that_keep_every_pair(tmp_path):
    """Latte attends within each frame (spatial layers) and across frames (temporal layers): the
    default window ladders are sized on one frame's tokens, not on the whole grid, and no searched
    plan holds a window that keeps every pair of its layer (full attention at a window's price)."""
    from ditlens.compress.flops import layer_sequences
    from ditlens.compress.methods import WINDOWED, HeadMethod, removes_pairs
    from ditlens.compress.search.common import DEFAULT_SPARSITIES
    from ditlens.kernels import window_for_sparsity

    from ditlens.analyzer.profiler import ProfileConfig, profile
    from ditlens.compress.search.from_trace import search_from_trace

    pipe, prompts, ecfg = _setup("latte")
    v2 = search_headwise(pipe, prompts, HeadwiseConfig(delta=0.6, engine=ecfg))
    v1 = search_greedy(pipe, prompts, GreedyConfig(delta=0.6, engine=ecfg))
    extra = {k: v for k, v in ecfg.call_kwargs.items() if k != "output_type"}
    trace = tmp_path / "latte.h5"
    profile(pipe, prompts, trace, ProfileConfig(steps=STEPS, guidance=3.0, call_kwargs=extra, stat_keys=[], influence=True),
            progress=False, log=lambda s: None)
    offline = search_from_trace(trace, pipe, delta=0.5)  # window influences recorded per frame and per position
    grid = v2.plan.model.tokens.grid
    frame = grid[1] * grid[2]
    assert grid[0] > 1 and v2.plan.provenance.windows == sorted({window_for_sparsity(frame, s) for s in DEFAULT_SPARSITIES})
    assert v1.plan.provenance.windows == [frame // 8]
    kinds = {layer.kind for layer in v2.plan.model.layers}
    assert {"self", "temporal"} <= kinds
    assert offline.plan.provenance.windows == v2.plan.provenance.windows
    windowed = set()
    for plan in (v1.plan, v2.plan, offline.plan):
        for s in range(plan.steps):
            for i, layer in enumerate(plan.model.layers):
                layout = layer_sequences(layer, grid, 0).layout
                for method in plan.head_methods(s, i):
                    if method.base in WINDOWED:
                        windowed.add((plan.provenance.search, layer.kind))
                        assert removes_pairs(method, layout), (s, layer.name, method.to_str())
    assert {("v2-from-trace", "self"), ("v2-from-trace", "temporal"), ("v2-headwise", "self")} <= windowed
    # The rule itself: on 3 frames window(2) keeps every pair (left out), window(1) does not; one frame
    # of 16 tokens takes both. V2 and from-trace see it as an infinite cost, V1 as a strategy not tried.
    from types import SimpleNamespace

    from ditlens.compress.search.greedy import GreedyController
    from ditlens.compress.search.latency import flops_latency

    layers = list(v2.plan.model.layers)
    latency = flops_latency(layers, ["window(2)", "window(1)"], grid, 0, 8, 2)
    engine = SimpleNamespace(layers=layers, grid=grid, cfg_rows=2, heads=2, wars_allowed=lambda *a: True)
    for i, layer in enumerate(layers):
        if layer.kind in ("self", "temporal"):
            keeps_all = layer.kind == "temporal"
            assert np.isinf(latency.cost[i, 0]) == keeps_all and latency.cost[i, 1] < latency.full[i]
            assert GreedyController(GreedyConfig()).allowed(engine, 1, i, HeadMethod("wars", 2)) != keeps_all
            assert GreedyController(GreedyConfig()).allowed(engine, 1, i, HeadMethod("wars", 1))
    # A width that fits no layer (one frame has 16 tokens) is refused by name, in both searches.
    with pytest.raises(DitlensError, match=r"candidate window\(15\) keeps every pair on every layer.*16 image tokens"
                       r".*below 15"):
        search_headwise(pipe, prompts, HeadwiseConfig(delta=0.6, candidates="ast,window(15)", engine=ecfg))
    with pytest.raises(DitlensError, match=r"candidate wars\(15\) keeps every pair"):
        search_greedy(pipe, prompts, GreedyConfig(delta=0.6, window=15, engine=ecfg))


def test_searches_on_a_model_that_attends_per_sample(tmp_path):
    """Mochi's processor makes one attention call per batch sample, so the cond and uncond rows never
    share a call: V2 measures each row's influence in its own call, CFG share is left out of every
    search (the runtime cannot run it there) or refused when asked for, and the plans run."""
    from ditlens.analyzer.profiler import ProfileConfig, profile
    from ditlens.compress.search.from_trace import search_from_trace

    pipe, prompts, ecfg = _setup("mochi")
    v2 = search_headwise(pipe, prompts, HeadwiseConfig(delta=0.5, engine=ecfg))
    arrows = [m for m, c in enumerate(v2.candidates) if c.startswith("arrow")]
    assert arrows and np.isfinite(v2.influence[:, :, 0][..., arrows]).all()  # every row, from its own call
    v1 = search_greedy(pipe, prompts, GreedyConfig(delta=0.5, engine=ecfg))
    extra = {k: v for k, v in ecfg.call_kwargs.items() if k != "output_type"}
    trace = tmp_path / "mochi.h5"
    profile(pipe, prompts, trace, ProfileConfig(steps=STEPS, guidance=3.0, call_kwargs=extra, stat_keys=[], influence=True),
            progress=False, log=lambda s: None)
    offline = search_from_trace(trace, pipe, delta=0.5)
    assert "asc" not in offline.candidates
    # A trace that recorded CFG share anyway (made before the rule), here with zero influence: still left out
    from ditlens.compress.search.from_trace import INFLUENCE_AXES, INFLUENCE_PATH, read_influence
    from ditlens.traces.reader import Trace
    from ditlens.traces.writer import open_for_append

    with Trace.open(trace) as opened:
        data, labels, _ = read_influence(opened)
    old = tmp_path / "old.h5"
    old.write_bytes(trace.read_bytes())
    writer = open_for_append(old)
    writer.write_array(INFLUENCE_PATH + "_asc", np.concatenate([data, np.zeros_like(data[..., :1])], axis=-1),
                       INFLUENCE_AXES, coords={"candidate": labels + ["asc"]})
    writer.close()
    import h5py

    with h5py.File(old, "a") as f:
        del f[INFLUENCE_PATH]
        f.move(INFLUENCE_PATH + "_asc", INFLUENCE_PATH)
    assert "asc" not in search_from_trace(old, pipe, delta=0.5).candidates
    for result in (v1, v2, offline):
        assert not any(m.asc for s in range(result.plan.steps) for i in range(result.plan.n_layers)
                       for m in result.plan.head_methods(s, i))
        assert any(m != "full" for step in result.plan.methods for m in step)
        replay = _replay(pipe, prompts, ecfg, result.plan)
        if result.output is not None:
            np.testing.assert_allclose(replay, _images(result.output), atol=1e-5)
    from types import SimpleNamespace

    from ditlens.compress.methods import HeadMethod
    from ditlens.compress.search.greedy import GreedyController

    for per_sample in (True, False):  # V1 tries no ASC strategy there
        stub = SimpleNamespace(layers=list(v1.plan.model.layers), cfg_rows=2, adapter=SimpleNamespace(attends_per_sample=per_sample))
        assert GreedyController(GreedyConfig()).allowed(stub, 1, 0, HeadMethod("full", 0, True)) != per_sample
    with pytest.raises(DitlensError, match=r"mochi attends one sample per attention call.*\+asc"):
        search_headwise(pipe, prompts, HeadwiseConfig(delta=0.5, candidates="ast,asc", engine=ecfg))
    with pytest.raises(DitlensError, match=r"mochi attends one sample per attention call.*asc"):
        profile(pipe, prompts, tmp_path / "asc.h5", ProfileConfig(steps=STEPS, guidance=3.0, call_kwargs=extra, stat_keys=[],
                                                                 influence=True, influence_candidates="ast,asc"),
                progress=False, log=lambda s: None)


def test_v2_influence_against_dense_reference():
    """Step 0, layer 0: the recorded window influence equals a float64 recomputation from captured q, k, v."""
    from ditlens.analyzer.capture import AttentionInterceptor

    pipe, prompts, ecfg = _setup("dit")
    w = 1
    result = search_headwise(pipe, prompts, HeadwiseConfig(delta=1e-9, candidates=f"window({w})", engine=ecfg))
    layer = pipe.transformer.get_submodule(result.plan.model.layers[0].name)
    seen = []

    def grab(func, q, k, v, args, kwargs):
        seen.append((q.double(), k.double(), v.double()))
        return func(*args, **kwargs)

    orig = layer.forward
    def wrapped(*a, **k):
        if seen:
            return orig(*a, **k)
        with AttentionInterceptor(grab):
            return orig(*a, **k)
    layer.forward = wrapped
    try:
        pipe(**SearchEngine(pipe, prompts, ecfg).call_kwargs())
    finally:
        del layer.forward
    q, k, v = seen[0]
    n = q.shape[2]
    idx = torch.arange(n)
    band = (idx[:, None] - idx[None, :]).abs() <= w
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    full = scores.softmax(-1) @ v
    win = scores.masked_fill(~band, float("-inf")).softmax(-1) @ v
    P = len(prompts)
    rows = full.shape[0]
    for r in range(rows):
        centred = full[r] - full[r].mean()
        ref = ((win[r] - full[r]) ** 2).sum(dim=(1, 2)) / (centred ** 2).sum()
        prompt, branch = r % P, r // P  # DiT: cond first
        np.testing.assert_allclose(result.influence[prompt, branch, 0, 0, :, 0], ref.numpy(), rtol=1e-4)


def test_from_trace_equals_online(tmp_path):
    from ditlens.analyzer.profiler import ProfileConfig, profile
    from ditlens.compress.search.from_trace import INFLUENCE_AXES, INFLUENCE_PATH, search_from_trace
    from ditlens.traces.writer import open_for_append

    pipe, prompts, ecfg = _setup("sd3")
    prompts = prompts[:2]
    extra = {k: v for k, v in ecfg.call_kwargs.items() if k != "output_type"}
    trace = tmp_path / "t.h5"
    profile(pipe, prompts, trace, ProfileConfig(steps=STEPS, guidance=3.0, call_kwargs=extra, stat_keys=[]),
            progress=False, log=lambda s: None)
    online = search_headwise(pipe, prompts, HeadwiseConfig(delta=0.5, candidates="ast,asc,arrow(3),wars(2)", engine=ecfg))
    writer = open_for_append(trace)
    writer.write_array(INFLUENCE_PATH, online.influence, INFLUENCE_AXES,
                       coords={"candidate": online.candidates})
    writer.close()
    import h5py

    with h5py.File(trace, "a") as f:  # these influences were measured on the compressed trajectory
        f.attrs["influence_trajectory"] = "compressed"
    offline = search_from_trace(trace, pipe, delta=0.5)
    assert offline.plan.methods == online.plan.methods
    assert offline.plan.provenance.search == "v2-from-trace"


def _flux_true_cfg():
    pipe = build_tiny_pipeline("flux", 0)
    pipe.set_progress_bar_config(disable=True)
    kw = pipeline_call_kwargs("flux", "a cat", STEPS, 3.0, 0)
    assert kw["true_cfg_scale"] > 1 and kw["negative_prompt"] == ""  # a cond and an uncond forward per step
    extra = {k: v for k, v in kw.items() if k not in ("num_inference_steps", "generator", "prompt")}
    return pipe, ["a cat", "a dog", "red car"], EngineConfig(steps=STEPS, micro_batch=2, call_kwargs=extra,
                                                              progress=False)


@pytest.mark.parametrize("method", ["v1", "v2"])
def test_online_searches_run_flux_true_cfg_as_one_step_of_both_branches(method):
    """FLUX's true CFG runs the cond and then the uncond forward. The online searches join them
    into one step of both branches: an all-full search reproduces the plain pipeline, a
    compressing one equals the runtime's replay of its plan (which runs the two forwards apart,
    CFG share included), and the plan records the separate layout."""
    pipe, prompts, ecfg = _flux_true_cfg()

    def run(delta):
        if method == "v1":
            return search_greedy(pipe, prompts, GreedyConfig(delta=delta, window=3, engine=ecfg))
        return search_headwise(pipe, prompts, HeadwiseConfig(delta=delta, candidates="ast,asc,arrow(3),wars(2)",
                                                             engine=ecfg))

    plain = _images(pipe(**SearchEngine(pipe, prompts, ecfg).call_kwargs()))
    none = run(0.0)
    assert all(m == "full" for step in none.plan.methods for m in step)
    np.testing.assert_allclose(_images(none.output), plain, atol=1e-5)
    some = run(0.05 if method == "v1" else 0.1)
    used = {m for step in some.plan.methods for entry in step for m in ([entry] if isinstance(entry, str) else entry)}
    assert "asc" in used and used - {"asc"} != {"full"}, used
    assert some.plan.run.cfg_layout == "separate_cond_first"
    np.testing.assert_allclose(_replay(pipe, prompts, ecfg, some.plan), _images(some.output), atol=1e-5)
    assert run(0.05 if method == "v1" else 0.1).plan.methods == some.plan.methods


def test_cond_and_uncond_forwards_join_on_their_batch_rows_only():
    from ditlens.compress.search.engine import _join_rows

    cond = {"hidden": torch.zeros(2, 5), "ids": torch.arange(3), "scale": 1.0, "extra": None}
    uncond = {"hidden": torch.ones(2, 5), "ids": torch.arange(3), "scale": 1.0, "extra": None}
    joined = _join_rows(cond, uncond, 2)
    assert torch.equal(joined["hidden"], torch.cat([cond["hidden"], uncond["hidden"]]))  # cond rows first
    assert joined["ids"] is cond["ids"] and joined["scale"] == 1.0 and joined["extra"] is None
    with pytest.raises(DitlensError, match="argument 'ids' differs from the cond forward's"):
        _join_rows(cond, {**uncond, "ids": torch.arange(3) + 1}, 2)
    with pytest.raises(DitlensError, match="argument 'scale' differs"):
        _join_rows(cond, {**uncond, "scale": 2.0}, 2)


def test_online_search_refuses_a_pipeline_that_reads_the_cond_output_before_the_uncond_forward():
    """The cond forward is answered with a placeholder filled when the uncond forward runs: a
    pipeline that copied it before that would carry NaN on, and the next step says so."""
    pipe, prompts, ecfg = _flux_true_cfg()
    calls = []

    def copy_every_output(module, args, kwargs, output):  # a pipeline that copies each output at once
        calls.append(1)
        return (output[0].clone(),) + tuple(output[1:])

    handle = pipe.transformer.register_forward_hook(copy_every_output, with_kwargs=True)
    try:
        with pytest.raises(DitlensError, match="read the cond output of the step before its uncond forward"):
            search_headwise(pipe, prompts, HeadwiseConfig(delta=0.1, candidates="ast,asc", engine=ecfg))
    finally:
        handle.remove()
    assert len(calls) == 2  # step 0's cond and uncond forwards returned; step 1's cond forward was refused


def test_from_trace_plan_runs_on_flux_with_true_cfg_and_the_trace_run_is_kept(tmp_path):
    """A trace stores the scheduler's timesteps; FLUX's transformer receives them divided by 1000.
    A plan searched from a FLUX trace (true CFG) runs, a plan for
    another schedule is still refused, and a search from a trace refuses run settings other than the
    trace's instead of ignoring them."""
    from ditlens.analyzer.profiler import ProfileConfig, profile
    from ditlens.compress.search.api import search
    from ditlens.compress.search.from_trace import search_from_trace
    from ditlens.errors import PlanMismatchError

    pipe = build_tiny_pipeline("flux", 0)
    pipe.set_progress_bar_config(disable=True)
    kw = pipeline_call_kwargs("flux", "a cat", STEPS, 3.0, 0)
    extra = {k: v for k, v in kw.items() if k not in ("num_inference_steps", "generator", "prompt", "output_type")}
    trace = tmp_path / "flux.h5"
    profile(pipe, ["a cat", "a dog"], trace, ProfileConfig(steps=STEPS, call_kwargs=extra, stat_keys=[], influence=True),
            progress=False, log=lambda s: None)
    plan = search_from_trace(trace, pipe, delta=0.5).plan
    assert any(m != "full" for step in plan.methods for m in step)
    assert plan.run.timesteps[0] > 1.0  # the scheduler's values, not the transformer's
    with apply_plan(pipe, plan, backend="dense"):
        pipe(**pipeline_call_kwargs("flux", "a red bag", STEPS, 3.0, 1))
    import dataclasses

    plan.run = dataclasses.replace(plan.run, timesteps=tuple(t + 5.0 for t in plan.run.timesteps))
    with pytest.raises(PlanMismatchError, match="step 0 runs timestep"):
        with apply_plan(pipe, plan, backend="dense"):
            pipe(**pipeline_call_kwargs("flux", "a red bag", STEPS, 3.0, 1))
    with pytest.raises(DitlensError, match=r"plans for the run the trace recorded, not --steps 7 \(the trace has 3\)"):
        search(pipe, [], method="trace", trace=str(trace), steps=7)
    with pytest.raises(DitlensError, match=r"not --height 64 \(the trace has"):
        search(pipe, [], method="trace", trace=str(trace), height=64)
    with pytest.raises(DitlensError, match="--call-arg"):
        search(pipe, [], method="trace", trace=str(trace), call_kwargs={"true_cfg_scale": 3.0})
    assert search(pipe, [], method="trace", trace=str(trace), steps=STEPS, delta=0.5).plan.methods == plan.methods


def test_v2_prices_cross_attention_layers_at_their_text_length():
    """PixArt's first cross-attention layer runs after a self-attention layer: V2's cost model was
    built before any text was seen, priced cross layers at 0 and never compressed them. With an
    output cache free of error on them (δ large), they are compressed like the others."""
    pipe, prompts, ecfg = _setup("pixart")
    result = search_headwise(pipe, prompts, HeadwiseConfig(delta=1e3, candidates="ast", engine=ecfg))
    cross = [i for i, layer in enumerate(result.plan.model.layers) if layer.kind == "cross"]
    assert cross and all(result.plan.head_methods(s, i)[0].base == "ast" for s in range(1, STEPS) for i in cross)
    assert 0 < result.plan.flops.attention_core_fraction < 1


def test_searches_without_cfg_try_no_cfg_share():
    """A run without classifier-free guidance has no uncond rows: V2 refuses CFG-share candidates
    (it used to drop them silently and write an all-full plan), and V1 neither tries nor lists them."""
    import dataclasses

    pipe, prompts, ecfg = _setup("dit")
    ecfg = dataclasses.replace(ecfg, guidance=1.0)
    with pytest.raises(DitlensError, match=r"no classifier-free guidance .* CFG share \(\+asc\) cannot run"):
        search_headwise(pipe, prompts, HeadwiseConfig(delta=0.5, candidates="ast,asc", engine=ecfg))
    v1 = search_greedy(pipe, prompts, GreedyConfig(delta=0.5, window=2, engine=ecfg))
    assert v1.candidates == ["ast", "wars(2)"] and "strategies=ast,wars(2);" in v1.plan.provenance.notes
    assert not any(m.asc for s in range(v1.plan.steps) for i in range(v1.plan.n_layers) for m in v1.plan.head_methods(s, i))


def test_engine_refuses_an_empty_micro_batch(tmp_path):
    from ditlens.cli import main

    for bad in (0, -1):
        with pytest.raises(DitlensError, match="micro_batch must be at least 1"):
            EngineConfig(micro_batch=bad)
        assert main(["search", "--model", "tiny-dit", "--method", "v2", "--micro-batch", str(bad),
                     "--out", str(tmp_path / "p.json")]) == 2
    assert not (tmp_path / "p.json").exists()


def test_from_trace_uncompressed_influence_reuses_a_cache_one_step_only():
    from ditlens.compress.search.from_trace import solve_from_influence
    from ditlens.compress.plan import LayerInfo
    from ditlens.compress.search.latency import build_latency

    T, L, H = 6, 2, 3
    influence = np.zeros((1, 1, T, L, H, 2), np.float32)  # AST free everywhere, window a bit dearer
    influence[..., 1] = 1e-3
    influence[:, :, 0, :, :, 0] = np.nan  # nothing cached at step 0
    lat = build_latency("flops", [LayerInfo(f"l{i}", "self") for i in range(L)], ["ast", "window(2)"], (1, 8, 8), 0, H, 16, 1)
    stale = solve_from_influence(influence, ["ast", "window(2)"], ["cond"], lat, H, 1.0, None, one_step_ast=True)
    free = solve_from_influence(influence, ["ast", "window(2)"], ["cond"], lat, H, 1.0, None, one_step_ast=False)
    for methods, alternate in ((stale, True), (free, False)):
        for i in range(L):
            for h in range(H):
                entries = [methods[s][i] if isinstance(methods[s][i], list) else [methods[s][i]] * H for s in range(T)]
                ast = [entries[s][h] == "ast" for s in range(T)]
                assert ast[0] is False
                if alternate:  # never two output-cache steps in a row
                    assert ast == [False, True] * (T // 2)
                else:
                    assert all(ast[1:])


def test_latency_models_charge_wars_its_refresh():
    """A WA-RS step stands for two windowed products: its own (W + R) and its refresh's (R = O - W)."""
    from ditlens.compress.plan import LayerInfo
    from ditlens.compress.search.latency import build_latency

    layers = [LayerInfo("l0", "self")]
    n, w, d = 64, 2, 16
    pairs = sum(1 for i in range(n) for j in range(n) if abs(i - j) <= w)  # DESIGN §5 band on 64 tokens
    lat = build_latency("flops", layers, ["window(2)", "wars(2)"], (1, 8, 8), 0, 2, d, 1)
    assert lat.full[0] == 4 * d * n * n
    assert lat.cost[0, 0] == 4 * d * pairs
    assert lat.cost[0, 1] == 2 * 4 * d * pairs
    timed = build_latency("measured", layers, ["window(2)", "wars(2)"], (1, 8, 8), 0, 2, d, 1)
    assert timed.cost[0, 1] == 2 * timed.cost[0, 0] > 0


def test_budget_mode_reaches_target():
    from ditlens.compress.search.api import search

    pipe, prompts, ecfg = _setup("dit")
    result = search(pipe, prompts, method="v2", target_flops=0.6, candidates="ast,window(3),window(1)", steps=STEPS,
                    guidance=3.0, micro_batch=2, progress=False, call_kwargs=ecfg.call_kwargs, budget_iterations=4)
    assert result.plan.flops.attention_core_fraction <= 0.6
    assert "budget target=flops 0.6" in result.plan.provenance.notes


def test_width_ladder_sets_the_default_candidates():
    from ditlens.compress.search.api import search
    from ditlens.compress.search.common import default_candidates
    from ditlens.kernels import window_for_sparsity

    pipe, prompts, ecfg = _setup("dit")
    result = search(pipe, prompts, method="v2", delta=0.05, steps=STEPS, guidance=3.0, micro_batch=2, progress=False,
                    call_kwargs=ecfg.call_kwargs, sparsities=(0.25, 0.5))
    n_image = result.plan.model.tokens.n_image
    expected = ["ast"] + [f"window({int(window_for_sparsity(n_image, s))})" for s in (0.25, 0.5)]
    assert result.candidates == expected == default_candidates(n_image, False, sparsities=(0.25, 0.5))
    assert f"candidates={','.join(expected)}" in result.plan.provenance.notes


def test_cli_sparsities_are_checked():
    from ditlens.compress.search.cli import _sparsities

    assert _sparsities("0.25, 0.5,0.75") == (0.25, 0.5, 0.75)
    assert _sparsities(None) is None
    for bad in ("0.5,1.0", "half", ""):
        with pytest.raises(DitlensError, match="--sparsities"):
            _sparsities(bad)


def test_search_from_a_trace_needs_no_model_and_refuses_a_trace_it_would_ignore(tmp_path, capsys):
    """``ditlens search --trace T`` searches from T for the model T recorded; a trace given to a
    method that would not read it, or a model-running method without a model, is refused up front."""
    from ditlens.cli import main
    from ditlens.compress.plan import Plan

    trace, out = tmp_path / "t.h5", tmp_path / "p.json"
    assert main(["profile", "--model", "tiny-dit", "--prompt", "sneaker", "--prompt", "bag", "--steps", "3",
                 "--influence", "--out", str(trace)]) == 0
    assert main(["search", "--trace", str(trace), "--delta", "0.5", "--out", str(out)]) == 0
    plan = Plan.load(out)
    assert plan.provenance.search == "v2-from-trace" and "trace=t.h5" in plan.provenance.notes and plan.steps == 3
    assert main(["search", "--model", "tiny-dit", "--method", "trace", "--trace", str(trace), "--delta", "0.5",
                 "--out", str(tmp_path / "same.json")]) == 0
    assert Plan.load(tmp_path / "same.json").methods == plan.methods
    capsys.readouterr()
    assert main(["search", "--trace", str(trace), "--method", "v2", "--out", str(tmp_path / "x.json")]) == 2
    assert "--trace is read by --method trace only" in capsys.readouterr().err
    assert main(["search", "--method", "v1", "--out", str(tmp_path / "x.json")]) == 2
    assert "give --model" in capsys.readouterr().err
    import h5py

    with h5py.File(trace, "r+") as f:  # a trace recorded from a folder that is not here
        f.attrs["model_id"] = str(tmp_path / "gone")
    assert main(["search", "--trace", str(trace), "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "was recorded from model" in err and "pass --model" in err
    assert not (tmp_path / "x.json").exists()
