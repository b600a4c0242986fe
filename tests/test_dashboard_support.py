"""Test data of the dashboard tests (no tests here): real traces of the tiny SD3 pipeline, plans,
a validation report, and the numpy references the views are checked against.

``build_dashboard_data(root)`` writes everything once under ``root`` (both test modules call it
with the session's base temp folder, so the pipeline runs once per session):

* ``full.h5``: 3 prompts x 4 steps, CFG, every statistic (SSIM included), influence maps when the profiler records them (else a
  labelled /influence dataset written beside the statistics), ``ditlens analyze`` aggregates
  (/maps) and a labelled /locality dataset;
* ``plain.h5``: 2 prompts, the profiler's default statistics only (no /maps, /influence, /locality);
* ``ast.json`` (AST on steps 1 and 3), ``heads.json`` (arrow(2) on heads 0 and 2);
* ``report/``: ``ditlens validate`` of ``ast.json`` (validate.json, validate.md, grid.png).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

STEPS = 4
GUIDANCE = 3.0
PROMPTS = ["a red cat", "a cat red", "red a cat"]
LOCALITY_BANDS = ["w<=1", "w<=2", "w<=4", "all"]


@dataclass(frozen=True)
class DashboardData:
    full: Path
    plain: Path
    plan_ast: Path
    plan_heads: Path
    report: Path


def _profile(pipe, prompts: list[str], out: Path, influence: bool, every_statistic: bool) -> None:
    from test_profile import run_config

    from ditlens.analyzer import ProfileConfig, profile
    from ditlens.traces.format import all_stat_keys

    fields = {f.name for f in dataclasses.fields(ProfileConfig)}
    extra: dict = {"influence": True} if influence and "influence" in fields else {}
    if every_statistic:  # SSIM included (the profiler's default leaves it out)
        extra["stat_keys"] = all_stat_keys()
    config = run_config("sd3", guidance=GUIDANCE, **extra)
    config.steps = STEPS
    profile(pipe, prompts, out, config, progress=False, log=lambda s: None)


def build_dashboard_data(root: Path) -> DashboardData:
    root = Path(root) / "dashboard-data"
    data = DashboardData(root / "full.h5", root / "plain.h5", root / "ast.json", root / "heads.json", root / "report")
    if (root / "done").exists():
        return data
    root.mkdir(parents=True, exist_ok=True)
    from tiny_models import build_tiny_pipeline, pipeline_call_kwargs

    from ditlens.analyzer.maps import analyze
    from ditlens.compress.plan import Plan
    from ditlens.compress.validate import validate
    from ditlens.traces.reader import Trace
    from ditlens.traces.writer import open_for_append

    pipe = build_tiny_pipeline("sd3")
    pipe.set_progress_bar_config(disable=True)
    _profile(pipe, PROMPTS, data.full, influence=True, every_statistic=True)
    _profile(pipe, PROMPTS[:2], data.plain, influence=False, every_statistic=False)
    analyze(data.full)
    with Trace.open(data.full) as trace:
        n_layers, n_heads, has_influence = len(trace.layers), trace.header.n_heads, trace.has("/influence/rse")
        n_text, height, width = trace.tokens.n_text, trace.header.height, trace.header.width
        grid = trace.tokens.grid  # the token grid the run used (Plan.uniform would assume a VAE factor of 8)
    rng = np.random.default_rng(7)
    with open_for_append(data.full) as writer:
        shape = (len(PROMPTS), STEPS, n_layers, n_heads, len(LOCALITY_BANDS))
        writer.write_array("/locality/mass", rng.random(shape).astype(np.float32),
                           ("prompt", "step", "layer", "head", "band"), coords={"band": LOCALITY_BANDS})
        if not has_influence:  # a profiler without --influence: the same layout, written here
            candidates = ["ast", "asc", "arrow(2)"]
            shape = (len(PROMPTS), 2, STEPS, n_layers, n_heads, len(candidates))
            writer.write_array("/influence/rse", rng.random(shape).astype(np.float32),
                               ("prompt", "branch", "step", "layer", "head", "candidate"),
                               coords={"candidate": candidates})
    Plan.uniform(pipe, STEPS, "ast", at_steps=[1, 3], height=height, width=width, guidance=GUIDANCE,
                 grid=grid, n_text=n_text, notes="AST on steps 1 and 3").save(data.plan_ast)
    Plan.uniform(pipe, STEPS, "arrow(2)", heads=[0, 2], height=height, width=width, guidance=GUIDANCE,
                 grid=grid, n_text=n_text, notes="arrow(2) on heads 0 and 2").save(data.plan_heads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        validate(pipe, Plan.load(data.plan_ast), PROMPTS[:2],
                 lambda prompt, seed: pipeline_call_kwargs("sd3", prompt, STEPS, GUIDANCE, seed),
                 model_name="tiny sd3", plan_name="ast.json", out_dir=data.report)
    (root / "done").write_text("ok\n")
    return data


# ---------------------------------------------------------------------------------------------
# numpy references, straight from the HDF5 file (never through ditlens.dashboards)


def stat_values(path: Path, key: tuple[str, str, str, str]) -> np.ndarray:
    """The statistic over the finished prompts, float64."""
    with h5py.File(path, "r") as f:
        n = int(f["/meta/n_done"][()])
        return np.asarray(f["/stats/" + "/".join(key)][:n], dtype=np.float64)


def ref_layer_step(path: Path, key, branch: int | None, prompt: int | None, head: int | None) -> np.ndarray:
    """layer x step: prompt mean (or one prompt), head mean (or one head), NaN ignored."""
    v = stat_values(path, key)
    if branch is not None:
        v = v[:, branch]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        v = np.nanmean(v, axis=0) if prompt is None else v[prompt]  # step, layer, head
        v = np.nanmean(v, axis=2) if head is None else v[:, :, head]
    return v.T


def ref_head_step(path: Path, key, branch: int | None, prompt: int | None, layer: int) -> np.ndarray:
    v = stat_values(path, key)
    if branch is not None:
        v = v[:, branch]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        v = np.nanmean(v, axis=0) if prompt is None else v[prompt]
    return v[:, layer, :].T


def ref_cv(path: Path, key, branch: int | None) -> np.ndarray:
    """Per (step, layer, head) std/mean over prompts (ddof 0), then inf->NaN, mean over heads: layer x step."""
    v = stat_values(path, key)
    if branch is not None:
        v = v[:, branch]
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        cv = np.nanstd(v, axis=0) / np.nanmean(v, axis=0)
        cv[~np.isfinite(cv)] = np.nan
        return np.nanmean(cv, axis=2).T


def quiet_nanmean(values, axis) -> np.ndarray:
    """np.nanmean without the all-NaN warning (step 0 of a step comparison is NaN)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.asarray(values, dtype=np.float64), axis=axis)


def nan_equal(a, b, rtol: float = 1e-5, atol: float = 1e-7) -> bool:
    """Same shape, same NaN pattern, close elsewhere (None read back from the page is NaN)."""
    a = np.asarray(a, dtype=object)
    a = np.where(a == None, np.nan, a).astype(np.float64)  # noqa: E711 - elementwise None test
    b = np.asarray(b, dtype=np.float64)
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True))
