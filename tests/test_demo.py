"""`ditlens demo` end to end on the embedded tiny-dit: every stage runs and writes what it says."""

from __future__ import annotations

import json

import pytest

from ditlens.errors import DitlensError
from ditlens.models import embedded_models

needs_zoo = pytest.mark.skipif("tiny-dit" not in embedded_models(), reason="embedded models are not installed")


@needs_zoo
@pytest.mark.slow
def test_demo_runs_the_whole_loop(tmp_path):
    from ditlens.compress import Plan
    from ditlens.demo import run_demo
    from ditlens.traces.reader import Trace

    lines: list[str] = []
    result = run_demo("tiny-dit", tmp_path / "demo", n_profile=2, n_validate=2, steps=10, latency="flops",
                      online=True, log=lines.append)
    assert list(result.seconds) == ["profile", "analyze", "search", "search online", "validate", "export"]
    assert all(s >= 0 for s in result.seconds.values())
    with Trace.open(result.trace) as trace:
        assert trace.n_done == 2 and trace.has("/influence/rse") and trace.has("/maps")
    plan = Plan.load(result.plan)
    assert plan.provenance.search == "v2-from-trace" and plan.provenance.calibration_prompts == ["t-shirt", "trouser"]
    assert plan.steps == 10
    # Budget mode: the static fraction of the saved plan meets the 0.5 target ...
    assert plan.flops is not None and plan.flops.attention_core_fraction <= 0.5 + 1e-9
    report = json.loads(result.report_json.read_text())
    # ... and the runtime's count while running it agrees (two independent FLOPs accountings).
    assert report["flops"]["attention_core_fraction"] == pytest.approx(plan.flops.attention_core_fraction, abs=1e-6)
    assert report["prompts"] == ["t-shirt", "trouser"] and len(report["psnr"]) == 2
    assert result.metrics["psnr"] == pytest.approx(sum(report["psnr"]) / 2)
    assert 0 < result.metrics["ssim"] <= 1 and 0 <= result.metrics["accuracy_plan"] <= 1
    assert result.grid.stat().st_size > 0 and "PSNR" in result.report_md.read_text()
    assert Plan.load(result.deploy / "plan.json").to_dict()["methods"] == plan.to_dict()["methods"]
    online = Plan.load(result.online["plan"])
    assert online.provenance.search != "v2-from-trace" and online.provenance.delta == pytest.approx(plan.provenance.delta)
    table = result.table()
    for needle in ("attention-core FLOPs fraction", "PSNR", "SSIM", "classifier accuracy", "time: validate",
                   str(result.plan), str(result.grid), str(result.report_md)):
        assert needle in table
    assert any(line.startswith("[6/6] export") for line in lines)


@needs_zoo
@pytest.mark.parametrize("kwargs, words", [
    ({"model": "sd3"}, "embedded model"),
    ({"target_flops": 1.5}, "between 0 and 1"),
    ({"n_validate": 0}, "at least 1"),
])
def test_demo_refuses_bad_input_with_one_line(tmp_path, kwargs, words):
    from ditlens.demo import run_demo

    with pytest.raises(DitlensError) as err:
        run_demo(out_dir=tmp_path / "demo", log=lambda s: None, **kwargs)
    assert words in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "demo").exists()  # refused before anything ran


@needs_zoo
def test_demo_cli_registers_its_options():
    import argparse

    from ditlens.demo import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["demo", "--model", "tiny-mmdit", "--online", "--target-flops", "0.4"])
    assert (args.model, args.online, args.target_flops, args.steps) == ("tiny-mmdit", True, 0.4, 20)
