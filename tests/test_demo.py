"""`ditlens demo` end to end on the embedded tiny-dit: every stage runs and writes what it says."""

from __future__ import annotations

import json

import pytest

from ditlens.models import embedded_models


@pytest.mark.slow
def test_demo_runs_the_whole_loop(tmp_path):
    if "tiny-dit" not in embedded_models():
        pytest.skip("embedded models are not installed")
    from ditlens.compress import Plan
    from ditlens.demo import run_demo
    from ditlens.traces.reader import Trace

    lines: list[str] = []
    result = run_demo("tiny-dit", tmp_path / "demo", n_profile=2, n_validate=2, steps=10, log=lines.append)
    assert [stage for stage in result.seconds] == ["profile", "analyze", "search", "validate", "export"]
    with Trace.open(result.trace) as trace:
        assert trace.n_done == 2 and trace.has("/influence/rse") and trace.has("/maps")
    plan = Plan.load(result.plan)
    assert plan.provenance.search == "v2-from-trace" and plan.provenance.calibration_prompts == ["t-shirt", "trouser"]
    report = json.loads(result.report_json.read_text())
    assert report["prompts"] and 0 < report["flops"]["attention_core_fraction"] < 1
    assert result.grid.stat().st_size > 0 and (result.deploy / "plan.json").exists()
    table = result.table()
    for needle in ("attention-core FLOPs fraction", "PSNR", "SSIM", "classifier accuracy", "time: validate"):
        assert needle in table
    assert any(line.startswith("[5/5] export") for line in lines)
