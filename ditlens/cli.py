"""The ``ditlens`` command line. Each verb is a thin layer over the Python API of the same name."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from ditlens.errors import DitlensError


def _int_list(text: str | None) -> list[int] | None:
    """``"0,2,5-7"`` -> [0, 2, 5, 6, 7]; None stays None (all)."""
    if text is None or text == "all":
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part.strip()[1:]:
                lo, hi = part.split("-", 1)
                if int(hi) < int(lo):
                    raise DitlensError(f"index range {part.strip()!r} in {text!r} runs backwards: write it as {hi.strip()}-{lo.strip()}")
                out.extend(range(int(lo), int(hi) + 1))
            elif part.strip():
                out.append(int(part))
    except ValueError:
        raise DitlensError(f"cannot read index list {text!r}: write it like 0,2,5-7") from None
    return out


def _call_arg(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise DitlensError(f"--call-arg {text!r}: write KEY=VALUE (VALUE as JSON, or a plain string)")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def call_kwargs(items: list[str] | None) -> dict[str, Any]:
    """The pipeline arguments of repeated ``--call-arg KEY=VALUE`` options."""
    return dict(_call_arg(a) for a in items or [])


CALL_ARG_HELP = "extra pipeline argument KEY=VALUE (JSON value), e.g. num_frames=49; repeatable"


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.exists():
            raise DitlensError(f"--prompts-file {path} does not exist")
        prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return prompts


def cmd_profile(args: argparse.Namespace) -> int:
    from ditlens.analyzer import ProfileConfig, RawRequest, default_registry, profile
    from ditlens.analyzer.profiler import select_stat_keys
    from ditlens.traces.writer import check_can_write
    from ditlens.models import load_pipeline, parse_dtype

    prompts = _prompts(args)
    if not prompts:
        prompts = _default_prompts(args.model)
    raw = None
    if args.raw:
        raw = RawRequest(tensors=tuple(t.strip() for t in args.raw.split(",") if t.strip()),
                         layers=_int_list(args.raw_layers), steps=_int_list(args.raw_steps),
                         heads=_int_list(args.raw_heads), token_stride=args.token_stride,
                         max_bytes=int(args.max_raw_bytes))
    config = ProfileConfig(steps=args.steps, guidance=args.guidance, height=args.height, width=args.width,
                           seed=args.seed, raw=raw, resume=args.resume, overwrite=args.overwrite,
                           influence=args.influence, influence_candidates=args.influence_candidates,
                           stat_keys=select_stat_keys(args.metrics, args.tensors), prompt_offset=args.prompt_offset,
                           call_kwargs=call_kwargs(args.call_arg))
    registry = default_registry(args.adapter or [])
    check_can_write(args.out, probe_lock=False)  # before the model loads (minutes for a large one); torchrun ranks
    # start together, so the lock is probed later, on each rank's own shard
    device = init_distributed(args.device)
    pipe = load_pipeline(args.model, device=device, dtype=parse_dtype(args.dtype))
    result = profile(pipe, prompts, args.out, config, registry=registry, model_id=args.model)
    print(f"wrote {result.path} ({result.n_prompts} prompts, {result.n_new} new, {result.seconds:.1f} s)")
    return 0


def init_distributed(device: str) -> str:
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on CUDA, gloo on the CPU)
    and return this rank's device."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return device


def leave_distributed(*, succeeded: bool) -> None:
    """Destroy the process group that init_distributed joined, after a barrier when this rank
    succeeded. A gloo group left to the interpreter's exit, or torn down by a rank that finished
    early (search: only rank 0 writes the plan) while its peer still works, can abort a finished
    rank ("terminate called without an active exception"), which torchrun reports as a failed
    rank. A rank that failed skips the barrier: it exits, and torchrun stops the others."""
    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if succeeded:
            import torch

            # NCCL: the device init_distributed chose, not NCCL's guess
            dist.barrier(device_ids=[torch.cuda.current_device()] if dist.get_backend() == "nccl" else None)
        dist.destroy_process_group()


def _default_prompts(model: str) -> list[str]:
    from ditlens.models import default_prompts

    return default_prompts(model)


def cmd_info(args: argparse.Namespace) -> int:
    from ditlens.traces.reader import Trace

    with Trace.open(args.trace) as trace:
        h = trace.header
        print(f"trace      {args.trace} ({trace.file_size / 1e6:.2f} MB, format {trace.attrs.get('format_version')})")
        print(f"model      {h.model_id} [{h.family}] {h.transformer_class} / {h.pipeline_class}")
        print(f"run        {h.steps} steps, guidance {h.guidance_scale}, {h.height}x{h.width}, seed {h.seed}, "
              f"cfg {h.cfg_layout}")
        t = h.tokens
        print(f"tokens     {t.n_image} image (grid {t.grid[0]}x{t.grid[1]}x{t.grid[2]}), {t.n_text} text "
              f"({t.text_position})")
        print(f"layers     {len(h.layers)} attention layers x {h.n_heads} heads x {h.head_dim} channels")
        print(f"prompts    {trace.n_done} of {len(h.prompts)} done; branches {', '.join(h.branches)}")
        filled = len(trace.filled_stat_keys())
        empty = len(trace.stat_keys()) - filled  # an older ditlens wrote them all-NaN
        print(f"stats      {filled} maps"
              + (f" (and {empty} all-NaN ones an older ditlens wrote; no run fills them)" if empty else "")
              + ("; raw tensors stored" if trace.has("/raw") else ""))
        for extra in ("/maps", "/influence", "/locality"):
            if trace.has(extra):
                print(f"derived    {extra}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from ditlens.analyzer.maps import analyze

    report = analyze(args.trace, top=args.top, store=not args.no_store)
    print(report.render())
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from ditlens.analyzer.maps import compare

    print(compare(args.trace_a, args.trace_b).render())
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from ditlens.traces.merge import merge_traces

    out = merge_traces(args.shards, args.out, overwrite=args.overwrite, allow_partial=args.allow_partial)
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from ditlens import __version__

    parser = argparse.ArgumentParser(prog="ditlens", description="Profile, map and remove attention redundancy in DiTs.")
    parser.add_argument("--version", action="version", version=f"ditlens {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("profile", help="run prompts through a pipeline and record redundancy statistics")
    p.add_argument("--model", required=True, help="embedded model name, local pipeline folder or hub id")
    p.add_argument("--out", required=True, help="trace file to write (.h5)")
    p.add_argument("--prompt", action="append", help="a prompt (text, or a class label); repeatable")
    p.add_argument("--prompts-file", help="one prompt per line")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the pipeline's)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i")
    p.add_argument("--prompt-offset", type=int, default=0,
                   help="global index of the first prompt, for shards profiled separately and merged with "
                        "`ditlens merge` (seeds stay those of one run over all prompts)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--raw", help="store raw tensors: comma-separated subset of q,k,v,o")
    p.add_argument("--raw-layers", help="layer indices, e.g. 0,3,5-7 (default all)")
    p.add_argument("--raw-steps", help="step indices (default all)")
    p.add_argument("--raw-heads", help="head indices (default all)")
    p.add_argument("--token-stride", type=int, default=1, help="keep every n-th token of raw tensors")
    p.add_argument("--max-raw-bytes", type=float, default=2**30, help="refuse raw captures larger than this")
    p.add_argument("--metrics", default=None,
                   help="comma-separated subset of l1,rel_l1,cosine,ssim, or 'all' (default: all but ssim, the costly one)")
    p.add_argument("--tensors", default=None, help="comma-separated subset of q,k,v,o to record (default: all)")
    p.add_argument("--influence", action="store_true",
                   help="also record each head's influence (RSE) under compression candidates, for offline search")
    p.add_argument("--influence-candidates", default=None,
                   help="comma-separated candidates, e.g. ast,asc,arrow(64),window(16) (default: cache, CFG share, "
                        "bands at 50/75/90%% sparsity)")
    p.add_argument("--resume", action="store_true", help="continue a partial trace")
    p.add_argument("--overwrite", action="store_true", help="replace an existing trace")
    p.add_argument("--call-arg", action="append", help=CALL_ARG_HELP)
    p.add_argument("--adapter", action="append", help="extra model adapter, package.module:Class")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("analyze", help="aggregate a trace's maps and print the most and least redundant parts")
    p.add_argument("trace")
    p.add_argument("--top", type=int, default=3)
    p.add_argument("--no-store", action="store_true", help="do not write the aggregated maps into the trace")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("info", help="describe a trace")
    p.add_argument("trace")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("compare", help="rank-correlate the redundancy maps of two traces of one model")
    p.add_argument("trace_a")
    p.add_argument("trace_b")
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("merge", help="merge trace shards (same model and run, other prompts) into one trace")
    p.add_argument("shards", nargs="+", help="traces in prompt order (each shard's --prompt-offset where the last ended)")
    p.add_argument("--out", required=True, help="the merged trace")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--allow-partial", action="store_true", help="take only the finished prompts of unfinished shards")
    p.set_defaults(func=cmd_merge)
    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands() -> list[Callable[[Any], None]]:
    """Verbs owned by other subpackages register themselves here (compress, dashboards, demo)."""
    out = []
    for module_name in ("ditlens.compress.cli", "ditlens.dashboards.cli", "ditlens.demo"):
        try:
            module = __import__(module_name, fromlist=["register"])
        except ImportError as err:
            if err.name and err.name.startswith("ditlens"):
                continue
            raise
        out.append(module.register)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    code = 1
    try:
        code = int(args.func(args) or 0)
        return code
    except DitlensError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished prompts are in the trace; rerun with --resume", file=sys.stderr)
        return 130
    except Exception as err:  # the pipeline's own errors (a missing --call-arg, a size off its bins): one line
        if os.environ.get("DITLENS_TRACEBACK"):
            raise
        first = (str(err).strip().splitlines() or [""])[0]
        print(f"error: {type(err).__name__}: {first[:500]} (the whole traceback: rerun with DITLENS_TRACEBACK=1)",
              file=sys.stderr)
        return 1
    finally:
        leave_distributed(succeeded=code == 0)


if __name__ == "__main__":
    sys.exit(main())
