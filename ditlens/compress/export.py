"""Export a plan: the canonical JSON, and a deployment bundle that needs only ``ditlens.compress``.

The deployment form is the same validated JSON (schema v1, methods and fingerprint) plus a
short README naming the three calls that apply it; loading it imports nothing beyond
``ditlens.compress`` (no h5py, dash or plotly).
"""

from __future__ import annotations

from pathlib import Path

from ditlens.compress.plan import Plan

_README = """# ditlens plan for {family} ({transformer_class})

Run: {steps} steps, scheduler {scheduler}, guidance {guidance}, {height}x{width}, CFG {cfg_layout}.
Attention-core FLOPs fraction: {core}; attention-module fraction: {module}.

```python
from ditlens.compress import Plan, apply_plan
handle = apply_plan(pipe, Plan.load("plan.json"))   # refuses another model, resolution, step count or CFG layout
images = pipe(..., num_inference_steps={steps}).images
handle.remove()
```
Needs only `ditlens.compress` (plus torch and diffusers).
"""


def export_plan(plan: Plan | str | Path, out: str | Path, *, deploy: bool = True) -> list[Path]:
    """Write ``out`` (a .json file, or a folder for the deployment bundle: plan.json + README.md)."""
    if not isinstance(plan, Plan):
        plan = Plan.load(plan)
    plan.check_structure()
    out = Path(out)
    if not deploy:
        out.parent.mkdir(parents=True, exist_ok=True)
        return [plan.save(out)]
    out.mkdir(parents=True, exist_ok=True)
    written = [plan.save(out / "plan.json")]
    flops = plan.flops
    fmt = lambda x: "n/a" if x is None else f"{x:.4f}"
    readme = _README.format(
        family=plan.model.family, transformer_class=plan.model.transformer_class, steps=plan.run.steps,
        scheduler=plan.run.scheduler, guidance=plan.run.guidance, height=plan.run.height, width=plan.run.width,
        cfg_layout=plan.run.cfg_layout, core=fmt(flops.attention_core_fraction if flops else None),
        module=fmt(flops.attention_module_fraction if flops else None))
    (out / "README.md").write_text(readme, encoding="utf-8")
    written.append(out / "README.md")
    return written
