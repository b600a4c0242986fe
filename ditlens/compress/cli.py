"""``ditlens validate`` and ``ditlens export`` (registered by ditlens.cli)."""

from __future__ import annotations

import argparse
from typing import Any


def cmd_validate(args: argparse.Namespace) -> int:
    from ditlens.cli import call_kwargs
    from ditlens.compress.plan import Plan
    from ditlens.compress.validate import validate_pipeline
    from ditlens.errors import DitlensError
    from ditlens.models import default_prompts, load_pipeline, parse_dtype

    if args.cuda_graphs and not str(args.device).startswith("cuda"):
        raise DitlensError(f"--cuda-graphs needs --device cuda (got --device {args.device})")
    plan = Plan.load(args.plan)
    extra = call_kwargs(args.call_arg)
    pipe = load_pipeline(args.model, device=args.device, dtype=parse_dtype(args.dtype))
    if args.lower_unprofitable:
        plan = _lowered(plan, args)
    prompts = list(args.prompt or []) or default_prompts(args.model, args.num_prompts)
    report = validate_pipeline(pipe, plan, prompts, seed=args.seed, model_name=args.model, plan_name=args.plan,
                               out_dir=args.out, call_kwargs=extra, cuda_graphs=args.cuda_graphs)
    print(report.markdown())
    print(f"wrote {args.out}/validate.json, validate.md, grid.png")
    return 0


def _lowered(plan: Any, args: argparse.Namespace) -> Any:
    """The plan with its unpaying WA-RS segments run dense (kernels timed as validate will run
    them: eagerly, or replayed with --cuda-graphs), saved next to the report."""
    from pathlib import Path

    import torch

    from ditlens.compress.lowering import lower_for_device
    from ditlens.models import parse_dtype

    low = lower_for_device(plan, args.device, parse_dtype(args.dtype), graphs=args.cuda_graphs)
    measured = torch.device(args.device).type == "cuda"
    print(f"lowering: {low.summary()}" + ("" if measured else " (no kernel timings off CUDA: plan unchanged)"))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = low.plan.save(Path(args.out) / "plan_lowered.json")
    print(f"wrote {path}")
    return low.plan


def cmd_export(args: argparse.Namespace) -> int:
    from ditlens.compress.export import export_plan

    for path in export_plan(args.plan, args.out, deploy=not args.json_only):
        print(f"wrote {path}")
    return 0


def register(sub: Any) -> None:
    from ditlens.cli import CALL_ARG_HELP  # registered by ditlens.cli once it is loaded

    p = sub.add_parser("validate", help="run prompts with and without a plan; quality, FLOPs, latency, memory")
    p.add_argument("--model", required=True, help="embedded model name, local pipeline folder or hub id")
    p.add_argument("--plan", required=True, help="plan JSON")
    p.add_argument("--prompt", action="append", help="a prompt (text or class label); repeatable")
    p.add_argument("--num-prompts", type=int, default=8, help="default prompts of an embedded model to use")
    p.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i")
    p.add_argument("--out", default="validate_out", help="folder for validate.json, validate.md, grid.png")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--call-arg", action="append",
                   help=CALL_ARG_HELP + " (the plan's steps, guidance, size and frame count are passed already)")
    p.add_argument("--lower-unprofitable", action="store_true",
                   help="on CUDA, run dense the WA-RS segments whose timed kernels cannot pay for their refresh "
                        "(validates, and writes, plan_lowered.json)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="time every transformer forward replayed from a CUDA graph, with and without the plan "
                        "(on a host-bound GPU, below 2K, what a deployment with graphs gets); needs --device cuda")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("export", help="write a plan's canonical JSON and a deployment bundle")
    p.add_argument("plan", help="plan JSON")
    p.add_argument("--out", required=True, help="folder for the bundle (or a .json path with --json-only)")
    p.add_argument("--json-only", action="store_true", help="write only the canonical JSON")
    p.set_defaults(func=cmd_export)
    from ditlens.compress.search.cli import register_search

    register_search(sub)
