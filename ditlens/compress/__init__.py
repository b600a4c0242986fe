"""Compression plans, the runtime that applies them, exact FLOPs accounting, validation, export.

Deployment needs only this subpackage (no h5py, dash or plotly)::

    from ditlens.compress import Plan, apply_plan, remove_plan
    plan = Plan.load("plan.json")            # checked against schema v1
    handle = apply_plan(pipe, plan)          # checked against the model; run checked on first forward
    images = pipe(...).images
    print(handle.flops.core_fraction, handle.peak_cache_bytes())
    handle.remove()                          # the pipeline is exactly as before

Below 2K a step is host-bound on an H100/H200; ``apply_cuda_graphs(pipe)`` replays every
transformer forward (plan or not) as one CUDA graph from the second call on, and
``lower_for_device(plan, "cuda").plan`` runs dense the WA-RS segments that the measured kernels
say cannot save time at the plan's shape. ``drop_asc(plan)`` removes the ASC entries, to measure
what they cost or save (BENCHMARKS.md §4, "Session 33").
"""

from ditlens.compress.graphs import CudaGraphConfig, CudaGraphHandle, apply_cuda_graphs
from ditlens.compress.flops import FlopsReport, plan_flops, projection_flops
from ditlens.compress.lowering import Lowering, drop_asc, lower_for_device, lower_unprofitable_wars, wars_segments
from ditlens.compress.methods import HeadMethod, attended_pairs, parse_method
from ditlens.compress.plan import (
    FlopsSummary,
    ModelFingerprint,
    Plan,
    Provenance,
    RunSpec,
    config_hash,
    load_schema,
    model_fingerprint,
)
from ditlens.compress.runtime import PlanHandle, apply_plan, remove_plan

__all__ = [
    "CudaGraphConfig", "CudaGraphHandle", "FlopsReport", "FlopsSummary", "HeadMethod", "Lowering", "ModelFingerprint", "Plan",
    "PlanHandle", "Provenance", "RunSpec", "apply_cuda_graphs", "apply_plan", "attended_pairs", "config_hash", "load_schema",
    "drop_asc", "lower_for_device", "lower_unprofitable_wars", "model_fingerprint", "parse_method", "plan_flops", "projection_flops",
    "remove_plan", "wars_segments",
]
