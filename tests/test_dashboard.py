"""Dashboard data layer, plan/report views and CLI, without a browser.

References are independent of ditlens.dashboards: numpy over the HDF5 datasets read with h5py,
plan JSON read as plain JSON, FLOPs counted by hand from the token counts, validate.json as JSON.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import h5py
import numpy as np
import pytest

from test_dashboard_support import (
    PROMPTS,
    quiet_nanmean,
    STEPS,
    build_dashboard_data,
    ref_cv,
    ref_head_step,
    ref_layer_step,
    stat_values,
)

pytest.importorskip("dash")
pytest.importorskip("plotly")

from ditlens.dashboards.data import MEAN, TraceData  # noqa: E402
from ditlens.dashboards.plans import (  # noqa: E402
    load_plans,
    load_report,
    method_shares,
    plan_flops_table,
    plan_head_map,
    plan_layer_map,
    report_metrics,
)
from ditlens.errors import DitlensError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return build_dashboard_data(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def full(files):
    data = TraceData(files.full)
    yield data
    data.close()


@pytest.fixture(scope="module")
def plain(files):
    data = TraceData(files.plain)
    yield data
    data.close()


KEYS = [("image", "o", "step", "l1"), ("image", "k", "step", "ssim"), ("text", "q", "cfg", "cosine"),
        ("image", "v", "cfg", "rel_l1")]


@pytest.mark.parametrize("which", ["full", "plain"])
@pytest.mark.parametrize("key", KEYS)
def test_layer_step_and_head_step_maps_equal_numpy(which, key, files, full, plain):
    data = full if which == "full" else plain
    path = files.full if which == "full" else files.plain
    with h5py.File(path, "r") as f:
        stored = "/stats/" + "/".join(key) in f
    if not stored:  # the profiler's default leaves SSIM out: the view says so
        assert key[3] == "ssim" and which == "plain"
        with pytest.raises(DitlensError, match=f"this trace has no {'/'.join(key)} statistic"):
            data.layer_step_map(key, None, "cond")
        return
    n_prompts = data.n_done
    branches = ["cond", "uncond"] if key[2] == "step" else [None]
    for b, branch in enumerate(branches):
        bi = b if key[2] == "step" else None
        for prompt in (None, n_prompts - 1):
            for head in (None, 2):
                hm = data.layer_step_map(key, prompt, branch, head)
                ref = ref_layer_step(path, key, bi, prompt, head)
                assert hm.z.shape == (3, STEPS)
                np.testing.assert_allclose(hm.z, ref, rtol=1e-5, atol=1e-7, equal_nan=True)
            for layer in range(3):
                hs = data.head_step_map(key, prompt, branch, layer)
                np.testing.assert_allclose(hs.z, ref_head_step(path, key, bi, prompt, layer), rtol=1e-5, atol=1e-7,
                                           equal_nan=True)
    hm = data.layer_step_map(key, None, branches[0], None)
    # the full trace has `ditlens analyze` aggregates for every prompt: they are used; the plain one computes
    assert ("/maps/mean/" in hm.note) == (which == "full")
    assert hm.rows == data.layers and hm.cols == [str(s) for s in range(STEPS)]
    if key[2] == "step":
        assert np.isnan(hm.z[:, 0]).all() and np.isfinite(hm.z[:, 1:]).all()


def test_prompt_curves_and_cv_equal_numpy(files, full, plain):
    key = ("image", "o", "step", "l1")
    for data, path in ((full, files.full), (plain, files.plain)):
        for b, branch in enumerate(["cond", "uncond"]):
            cv = data.cv_map(key, branch)
            np.testing.assert_allclose(cv.z, ref_cv(path, key, b), rtol=1e-5, equal_nan=True)
        curves, _ = data.prompt_curves(key, "cond", 1)
        v = stat_values(path, key)[:, 0, :, 1, :]
        np.testing.assert_allclose(curves, quiet_nanmean(v, axis=2), rtol=1e-6, equal_nan=True)
    assert "/maps/cv/" in full.cv_map(key, "cond").note and "/stats/" in plain.cv_map(key, "cond").note
    # the mean-CV table: mean over steps, layers and heads of std/mean over prompts
    for data, path in ((full, files.full), (plain, files.plain)):
        table = {row["map"]: row for row in data.cv_table("image", "cond")}
        with h5py.File(path, "r") as f:
            stored = {f"{c}/{m}" for c in ("step", "cfg") for m in ("l1", "rel_l1", "cosine", "ssim")
                      if f"/stats/image/o/{c}/{m}" in f}
        assert set(table) == stored and {"step/l1", "cfg/cosine"} <= stored
        _check_cv_table(table, path)
    assert "step/ssim" in {row["map"] for row in full.cv_table("image", "cond")}


def _check_cv_table(table: dict, path: Path) -> None:
    for label, row in table.items():
        comparison, metric = label.split("/")
        for tensor in "qkvo":
            v = stat_values(path, ("image", tensor, comparison, metric))
            if comparison == "step":
                v = v[:, 0]
            with np.errstate(all="ignore"):
                cv = np.std(v, axis=0) / np.mean(v, axis=0)  # step 0 is NaN in every prompt
            assert row[tensor] == pytest.approx(float(np.mean(cv[np.isfinite(cv)])), rel=1e-5)


def test_cv_needs_two_prompts(tmp_path, files):
    import shutil

    one = tmp_path / "one.h5"
    shutil.copy(files.plain, one)
    with h5py.File(one, "r+") as f:
        f["/meta/n_done"][()] = 1
    data = TraceData(one)
    try:
        with pytest.raises(DitlensError, match="at least two finished prompts"):
            data.cv_map(("image", "o", "step", "l1"), "cond")
        assert data.layer_step_map(("image", "o", "step", "l1"), None, "cond").z.shape == (3, STEPS)
    finally:
        data.close()


def test_trace_without_finished_prompts_says_so(tmp_path, files):
    import shutil

    empty = tmp_path / "empty.h5"
    shutil.copy(files.plain, empty)
    with h5py.File(empty, "r+") as f:
        f["/meta/n_done"][()] = 0
    data = TraceData(empty)
    try:
        assert dict(data.run_facts())["prompts"] == "0 of 2 finished (partial trace)"
        with pytest.raises(DitlensError, match="holds no finished prompt yet"):
            data.layer_step_map(("image", "o", "step", "l1"), None, "cond")
    finally:
        data.close()


def test_influence_and_locality_render_generically(files, full):
    assert full.extra_datasets("influence") == ["/influence/rse"]
    assert full.extra_datasets("locality") == ["/locality/mass"]
    with h5py.File(files.full, "r") as f:
        rse = np.asarray(f["/influence/rse"][:], dtype=np.float64)  # prompt,branch,step,layer,head,candidate
        mass = np.asarray(f["/locality/mass"][:], dtype=np.float64)  # prompt,step,layer,head,band
        candidates = f.attrs.get("influence_candidates")
        stored = f["/influence/rse"].attrs.get("coords.candidate")
    expected = ([str(c) for c in stored] if stored is not None else str(candidates).split(","))
    assert full.axis_labels("/influence/rse", "candidate") == expected
    x, y, picks = full.default_view("/influence/rse")
    assert (x, y) == ("step", "layer")
    assert picks == {"prompt": MEAN, "branch": "0", "head": MEAN, "candidate": "0"}
    ref = quiet_nanmean(rse, axis=(0, 4))[0, :, :, 0].T  # mean over prompt, head; branch 0, candidate 0
    hm = full.generic_map("/influence/rse", x, y, picks)
    np.testing.assert_allclose(hm.z, ref, rtol=1e-6, equal_nan=True)
    assert hm.rows == full.layers
    # head x candidate of layer 1, step 2, branch 1, one prompt
    hm = full.generic_map("/influence/rse", "candidate", "head",
                          {"prompt": "2", "branch": "1", "step": "2", "layer": "1"})
    np.testing.assert_allclose(hm.z, rse[2, 1, 2, 1], rtol=1e-6, equal_nan=True)
    assert hm.cols == expected and hm.rows == ["0", "1", "2"]
    hm = full.generic_map("/locality/mass", "band", "layer", {"prompt": MEAN, "step": "3", "head": "0"})
    np.testing.assert_allclose(hm.z, mass.mean(axis=0)[3, :, 0, :], rtol=1e-6)
    assert hm.cols == ["w<=1", "w<=2", "w<=4", "all"]
    # influences of heads add up: the sum over heads (NaN where every head is NaN: AST at step 0)
    hm = full.generic_map("/influence/rse", "step", "layer", {"prompt": "0", "branch": "0", "head": "sum",
                                                               "candidate": "0"})
    ref = rse[0, 0, :, :, :, 0].sum(axis=2).T  # plain sum: NaN wherever a head is NaN
    np.testing.assert_allclose(hm.z, ref, rtol=1e-6, equal_nan=True)
    assert f"prompt {PROMPTS[0]}, branch cond, sum over head, candidate {expected[0]}" in hm.title
    hm = full.generic_map("/locality/mass", "band", "", {"prompt": "1", "step": MEAN, "layer": "2", "head": MEAN})
    np.testing.assert_allclose(hm.z, mass[1, :, 2, :, :].mean(axis=(0, 1))[None, :], rtol=1e-6)
    with pytest.raises(DitlensError, match="out of range"):
        full.generic_map("/locality/mass", "band", "layer", {"step": "9"})
    with pytest.raises(DitlensError, match="two different axes"):
        full.generic_map("/locality/mass", "band", "band", {})


def test_missing_groups_are_one_line_messages(plain):
    assert plain.extra_datasets("influence") == [] and plain.extra_datasets("locality") == []
    with pytest.raises(DitlensError) as err:
        plain.require_extra("influence")
    assert str(err.value) == "this trace has no influence maps: profile with --influence"
    with pytest.raises(DitlensError, match="no text/q/step/ssim statistic"):
        plain.layer_step_map(("text", "q", "step", "ssim"), None, "cond")
    with pytest.raises(DitlensError, match="head 7 is out of range"):
        plain.layer_step_map(("image", "o", "step", "l1"), None, "cond", 7)
    with pytest.raises(DitlensError, match="no branch"):
        plain.layer_step_map(("image", "o", "step", "l1"), None, "both")
    with pytest.raises(DitlensError, match="no dataset /influence/rse"):
        plain.generic_map("/influence/rse", "step", "layer", {})


def test_reads_are_lazy_and_sliced(files, monkeypatch):
    """Opening reads /meta only; a one-prompt map reads that prompt's and branch's hyperslab."""
    reads: list[tuple[str, object]] = []
    original = h5py.Dataset.__getitem__

    def spy(self, index):
        reads.append((self.name, index))
        return original(self, index)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    data = TraceData(files.full)
    try:
        assert all(name.startswith("/meta/") for name, _ in reads), reads
        reads.clear()
        data.layer_step_map(("image", "o", "step", "cosine"), 2, "uncond")
        assert [name for name, _ in reads] == ["/stats/image/o/step/cosine"]
        index = reads[0][1]
        assert index[:2] == (2, 1)  # prompt 2, branch uncond: nothing else is read
        reads.clear()
        data.layer_step_map(("image", "o", "step", "cosine"), None, "cond")
        assert [name for name, _ in reads] == ["/maps/mean/image/o/step/cosine"]  # the stored aggregate
        reads.clear()
        data.head_step_map(("image", "o", "cfg", "l1"), 0, None, 2)
        assert [name for name, _ in reads] == ["/stats/image/o/cfg/l1"] and reads[0][1][0] == 0
        assert reads[0][1][2] == 2  # layer 2 only
        reads.clear()
        data.layer_step_map(("image", "o", "step", "cosine"), 2, "uncond")
        assert reads == []  # cached
    finally:
        data.close()


def test_overview_lists_the_run_and_its_groups(files, full, plain):
    facts = dict(full.run_facts())
    with h5py.File(files.full, "r") as f:
        assert facts["model"] == f"{f.attrs['model_id']} [{f.attrs['family']}]"
        assert f"{STEPS} steps" in facts["run"]
    assert facts["prompts"] == f"{len(PROMPTS)} of {len(PROMPTS)} finished"
    rows = {r.group: r for r in full.contents()}
    assert set(rows) == {"/influence", "/locality", "/maps", "/meta", "/stats"}
    from ditlens.traces.format import all_stat_keys

    assert rows["/stats"].datasets == len(full.stat_keys()) == len(all_stat_keys())
    assert "candidate" in rows["/influence"].description
    assert {r.group for r in plain.contents()} == {"/meta", "/stats"}
    with h5py.File(files.full, "r") as f:
        assert rows["/stats"].stored_bytes == sum(f["stats"][k].id.get_storage_size() for k in _datasets(f["stats"]))


def test_text_statistics_of_a_model_without_text_are_not_offered(tmp_path, monkeypatch):
    """Traces written before the profiler left it out hold a text group for a model without text
    tokens (DiT), all NaN: the dashboard does not offer it."""
    from test_profile import run_config
    from tiny_models import build_tiny_pipeline

    import ditlens.analyzer.profiler as profiler_module
    from ditlens.analyzer import profile
    from ditlens.traces.format import all_stat_keys

    monkeypatch.setattr(profiler_module, "recorded_stat_keys", lambda keys, branches, n_text: list(keys))  # the old writer
    pipe = build_tiny_pipeline("dit")
    pipe.set_progress_bar_config(disable=True)
    l1 = [k for k in all_stat_keys() if k[3] == "l1"]
    config = run_config("dit", guidance=4.0, stat_keys=l1)
    config.steps = 2
    out = tmp_path / "old.h5"
    profile(pipe, ["1", "2"], out, config, progress=False, log=lambda s: None)
    with h5py.File(out, "r") as f:  # the file holds the text group, as such old traces did
        text = [k for k in _datasets(f["stats"]) if k.startswith("text")]
        assert text and all(np.isnan(f["stats"][k][...]).all() for k in text)
    data = TraceData(out)
    try:
        assert data.stat_options()["group"] == ["image"] and data.stat_options()["comparison"] == ["step", "cfg"]
        assert sorted(data.stat_keys()) == sorted(k for k in l1 if k[0] == "image")
        with pytest.raises(DitlensError, match="no text/q/step/l1 statistic"):
            data.layer_step_map(("text", "q", "step", "l1"), None, "cond")
    finally:
        data.close()


def _datasets(group: h5py.Group) -> list[str]:
    out: list[str] = []
    group.visititems(lambda name, obj: out.append(name) if isinstance(obj, h5py.Dataset) else None)
    return out


def test_plan_maps_follow_the_json(files):
    ast, heads = load_plans([files.plan_ast, files.plan_heads])
    methods = json.loads(files.plan_ast.read_text())["methods"]  # [step][layer]
    cm = plan_layer_map(ast)
    decoded = [[cm.categories[c] for c in row] for row in cm.codes]  # [layer][step]
    assert decoded == [[methods[s][i] for s in range(STEPS)] for i in range(3)]
    assert decoded[0] == ["full", "ast", "full", "ast"]
    per_head = json.loads(files.plan_heads.read_text())["methods"]
    cm = plan_layer_map(heads)
    assert {cm.categories[c] for row in cm.codes for c in row} == {"arrow(2)"}
    assert cm.text == [["2/3"] * STEPS] * 3
    hm = plan_head_map(heads, 1)
    decoded = [[hm.categories[c] for c in row] for row in hm.codes]  # [head][step]
    assert decoded == [[per_head[s][1][h] for s in range(STEPS)] for h in range(3)]
    assert decoded[1] == ["full"] * STEPS and decoded[0] == ["arrow(2)"] * STEPS
    assert method_shares(heads) == pytest.approx({"full": 1 / 3, "arrow(2)": 2 / 3})
    assert method_shares(ast) == pytest.approx({"full": 0.5, "ast": 0.5})


def test_plan_trace_mismatch_names_family_layers_heads_and_resolution(files):
    import dataclasses

    from ditlens.dashboards.plans import plan_trace_mismatch
    from ditlens.traces.reader import Trace

    (plan,) = load_plans([files.plan_ast])
    with Trace.open(files.full) as trace:
        header, layers = trace.header, list(trace.layers)
    assert plan_trace_mismatch(plan, header, layers) is None

    def changed(**fields):
        model = dataclasses.replace(plan.plan.model, **fields.pop("model", {}))
        return dataclasses.replace(plan, plan=dataclasses.replace(plan.plan, model=model, **fields))

    tokens = plan.plan.model.tokens
    bigger = dataclasses.replace(tokens, grid=(1, 2 * tokens.grid[1], 2 * tokens.grid[2]))
    for other, words in ((changed(model={"family": "pixart"}), "for a pixart model, the trace's is sd3"),
                         (changed(model={"layers": plan.plan.model.layers[:-1]}), "2 attention layers"),
                         (changed(model={"heads": 5}), "for 5 heads"),
                         (changed(model={"tokens": bigger}), "another resolution")):
        assert words in plan_trace_mismatch(other, header, layers)


def test_plan_flops_per_step_and_layer_count_pairs_by_hand(files):
    from ditlens.compress.flops import plan_flops

    ast, heads = load_plans([files.plan_ast, files.plan_heads])
    plan = ast.plan
    tokens = plan.model.tokens
    n_image = tokens.grid[0] * tokens.grid[1] * tokens.grid[2]
    d, h, rows = plan.model.head_dim, plan.model.heads, 2
    table = plan_flops_table(ast)
    for i, layer in enumerate(plan.model.layers):
        n = n_image + tokens.n_text if layer.kind == "joint" else n_image  # every query attends every key
        full_cost = 4 * d * n * n * h * rows
        assert table.core_full[:, i].tolist() == [full_cost] * STEPS
        # AST on steps 1 and 3 skips the module; steps 0 and 2 run full attention
        assert table.core[:, i].tolist() == [full_cost, 0, full_cost, 0]
    assert table.by_step().tolist() == [1.0, 0.0, 1.0, 0.0]
    for loaded in (ast, heads):
        report = plan_flops(loaded.plan)
        t = plan_flops_table(loaded)
        assert t.core.sum() == report.core and t.core_full.sum() == report.core_full
    # arrow(2) on 2 of 3 heads: count the attended pairs of the band |i - j| <= 2 by brute force
    t = plan_flops_table(heads)
    for i, layer in enumerate(heads.plan.model.layers):
        n_text = tokens.n_text if layer.kind == "joint" else 0
        n = n_image + n_text
        band = sum(1 for a in range(n_image) for b in range(n_image) if abs(a - b) <= 2)
        arrow_pairs = band + (n * n - n_image * n_image)  # every pair that touches text is kept
        expected = 4 * d * rows * (2 * arrow_pairs + n * n)
        assert t.core[:, i].tolist() == [expected] * STEPS


def test_report_view_reads_validate_outputs(files, tmp_path):
    report = load_report(files.report)
    raw = json.loads((files.report / "validate.json").read_text())
    metrics = dict(report.metrics)
    assert metrics["PSNR (dB, mean)"] == f"{np.mean(raw['psnr']):.2f}"
    assert metrics["SSIM (mean)"] == f"{np.mean(raw['ssim']):.4f}"
    assert float(metrics["attention-core FLOPs fraction"]) == pytest.approx(raw["flops"]["attention_core_fraction"],
                                                                            rel=1e-3)
    # the speed rows, from the raw seconds and FLOPs (not from the report's own derived fields)
    share = raw["attention_seconds_full"] / raw["seconds_full"]
    bound = 1 / (1 - share * (1 - raw["flops"]["attention_module_fraction"]))
    speedup = raw["seconds_full"] / raw["seconds_plan"]
    assert metrics["attention-module share (full)"] == f"{share:.1%}"
    assert metrics["end-to-end speedup (Amdahl bound)"] == f"{speedup:.2f}x ({bound:.2f}x)"
    assert metrics["timing"] == "eager" and metrics["speed"] == raw["speed_verdict"]
    graphed = dict(report_metrics({**raw, "cuda_graphs": True, "graph_replays": 12, "attention_seconds_full": None,
                                   "attention_seconds_plan": None}))
    assert graphed["timing"] == "every forward replayed from a CUDA graph (12 replays)"
    assert graphed["attention s (full / plan)"] == "n/a / n/a"
    assert [r["prompt"] for r in report.per_prompt] == raw["prompts"]
    assert report.grid_png[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_report(files.report / "validate.json").data == raw
    with pytest.raises(DitlensError, match="no validation report"):
        load_report(tmp_path)


def test_create_app_refuses_bad_inputs_with_one_line_errors(files, tmp_path):
    from ditlens.dashboards import create_app

    app = create_app(files.full, plan=files.plan_ast, report=files.report)
    assert app.title.endswith("full.h5")
    bad_plan = tmp_path / "plan.json"
    bad_plan.write_text("{not json")
    not_h5 = tmp_path / "x.h5"
    not_h5.write_text("hello")
    for kwargs, pattern in (({"trace_path": tmp_path / "none.h5"}, "no trace at"),
                            ({"trace_path": not_h5}, "not an HDF5 file"),
                            ({"trace_path": files.full, "plan": bad_plan}, "not valid JSON"),
                            ({"trace_path": files.full, "plan": tmp_path / "missing.json"}, "does not exist"),
                            ({"trace_path": files.full, "report": tmp_path}, "no validation report")):
        with pytest.raises(DitlensError, match=pattern) as err:
            create_app(**kwargs)
        assert "\n" not in str(err.value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_dash_verb(files, capsys):
    from ditlens.cli import build_parser, main

    args = build_parser().parse_args(["dash", str(files.full), "--plan", "a.json", "--plan", "b.json", "--port", "9"])
    assert (args.trace, args.plan, args.report, args.port, args.host) == (str(files.full), ["a.json", "b.json"],
                                                                          None, 9, "127.0.0.1")
    assert main(["dash", str(files.full) + ".missing"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no trace at") and len(err.splitlines()) == 1
    assert main(["dash", str(files.full), "--port", "70000"]) == 2
    assert "is not a port number" in capsys.readouterr().err
    with socket.socket() as taken:  # a port another server listens on: one error line, nothing announced
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["dash", str(files.full), "--port", str(taken.getsockname()[1])]) == 2
    out, err = capsys.readouterr()
    assert "choose another --port" in err and len(err.strip().splitlines()) == 1 and "http://" not in out
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "ditlens", "dash", str(files.full), "--plan", str(files.plan_ast),
                               "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_dash-layout", timeout=5) as response:
                    layout = response.read().decode("utf-8")
                break
            except OSError:
                assert server.poll() is None, server.stdout.read().decode()
                assert time.monotonic() < deadline, "ditlens dash did not start serving"
                time.sleep(0.5)
        assert "Redundancy maps" in layout and "full.h5" in layout
    finally:
        server.terminate()
        server.wait(timeout=30)
