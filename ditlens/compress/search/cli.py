"""``ditlens search``: register with ``register_search(subparsers)``."""

from __future__ import annotations

import argparse
import time
from typing import Any

from ditlens.errors import DitlensError


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if prompts:
        return prompts
    from ditlens.models import default_prompts

    return default_prompts(args.model, args.num_prompts)


def _sparsities(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise DitlensError(f"--sparsities takes comma-separated fractions like 0.25,0.5,0.75, got {text!r}") from None
    if not values or not all(0.0 < x < 1.0 for x in values):
        raise DitlensError(f"--sparsities must be fractions strictly between 0 and 1, got {text!r}")
    return values


def _resolve_method_and_model(args: argparse.Namespace) -> bool:
    """``--trace T`` alone means a search from T, for the model T recorded: the pipeline is loaded
    only for its layer table and kernels, so naming the model again is redundant. Returns whether
    the model was taken from the trace."""
    if args.method is None:
        args.method = "trace" if args.trace else "v2"
    if args.method == "trace" and not args.trace:
        raise DitlensError("--method trace needs --trace T (a trace recorded by `ditlens profile --influence`)")
    if args.method != "trace" and args.trace:
        raise DitlensError(f"--trace is read by --method trace only, not by --method {args.method}: drop one of them")
    if args.model is None:
        if args.method != "trace":
            raise DitlensError(f"--method {args.method} runs the model: give --model (embedded name, folder or hub id)")
        from ditlens.traces import Trace

        with Trace.open(args.trace) as trace:
            args.model = trace.header.model_id
        return True
    return False


def cmd_search(args: argparse.Namespace) -> int:
    from ditlens.cli import call_kwargs, init_distributed
    from ditlens.compress.search import api
    from ditlens.compress.search.common import data_parallel
    from ditlens.models import load_pipeline, parse_dtype

    model_from_trace = _resolve_method_and_model(args)
    extra = call_kwargs(args.call_arg)
    if args.micro_batch < 1:
        raise DitlensError(f"--micro-batch must be at least 1, got {args.micro_batch}")
    if args.method == "trace":
        api.check_trace_run(args.trace, steps=args.steps, guidance=args.guidance, height=args.height,
                            width=args.width, call_kwargs=extra)
    device = init_distributed(args.device)  # torchrun: prompts are sharded over ranks, losses reduced
    try:
        pipe = load_pipeline(args.model, device=device, dtype=parse_dtype(args.dtype))
    except DitlensError as exc:
        if not model_from_trace:
            raise
        raise DitlensError(f"{args.trace} was recorded from model {args.model!r}, which does not load here ({exc}); "
                           "pass --model with that model's folder or hub id") from exc
    pipe.set_progress_bar_config(disable=True)
    prompts = [] if args.method == "trace" else _prompts(args)
    start = time.perf_counter()
    outcome = api.search(pipe, prompts, method=args.method, delta=args.delta, target_flops=args.target_flops,
                         target_latency=args.target_latency, trace=args.trace, c=args.c, candidates=args.candidates,
                         latency=args.latency, steps=args.steps, guidance=args.guidance, height=args.height,
                         width=args.width, seed=args.seed, micro_batch=args.micro_batch, window=args.window,
                         naive=args.naive, progress=data_parallel()[0] == 0, sparsities=_sparsities(args.sparsities),
                         call_kwargs=extra)
    if data_parallel()[0] != 0:
        return 0  # every rank holds the same plan; rank 0 writes it
    outcome.plan.save(args.out)
    flops = outcome.plan.flops
    frac = "n/a" if flops is None else f"{flops.attention_core_fraction:.4f}"
    # budget mode runs several searches: the wall time of all of them (outcome.seconds is the last one's)
    print(f"{args.method} search: δ={outcome.plan.provenance.delta:g}, attention-core FLOPs fraction {frac}, "
          f"{time.perf_counter() - start:.1f} s")
    print(f"wrote {args.out}")
    return 0


def register_search(sub: Any) -> None:
    from ditlens.cli import CALL_ARG_HELP  # registered by ditlens.cli once it is loaded

    p = sub.add_parser("search", help="search a compression plan (V1 greedy, V2 head-wise, or from a trace)")
    p.add_argument("--model", help="embedded model name, local pipeline folder or hub id (with --trace: the "
                                    "model the trace recorded, unless given)")
    p.add_argument("--method", choices=("v1", "v2", "trace"), default=None,
                   help="v2 (default), v1, or trace (the default when --trace is given)")
    p.add_argument("--trace", help="trace with /influence/rse: search from it without running the model")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--delta", type=float, default=None, help="threshold δ (default 0.1 for v2/trace, 0.05 for v1)")
    budget.add_argument("--target-flops", type=float, default=None, help="attention-core FLOPs fraction to reach")
    budget.add_argument("--target-latency", type=float, default=None, help="modelled attention latency fraction to reach")
    p.add_argument("--c", type=float, default=1.5, help="V2 head constraint coefficient")
    p.add_argument("--candidates", default=None, help="V2 candidate methods, e.g. 'ast,arrow(16),arrow(32),asc,wars(16)'")
    p.add_argument("--sparsities", default=None,
                   help="V2: image-pair sparsities of the default arrow/window candidates, e.g. 0.25,0.5,0.75,0.9 "
                        "(default 0.5,0.75,0.9; a finer ladder gives budget mode more choices)")
    p.add_argument("--latency", choices=("flops", "measured"), default="flops", help="latency model of the program")
    p.add_argument("--window", type=int, default=None, help="V1 WA-RS half-width (default: image tokens / 8)")
    p.add_argument("--naive", action="store_true", help="V1: rerun the whole transformer per trial (reference)")
    p.add_argument("--prompt", action="append", help="calibration prompt (repeatable)")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 20; --method trace: the trace's)")
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--call-arg", action="append", help=CALL_ARG_HELP)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--micro-batch", type=int, default=4, help="calibration prompts per forward")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", default="plan.json")
    p.set_defaults(func=cmd_search)
