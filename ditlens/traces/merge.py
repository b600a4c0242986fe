"""Merging trace shards (e.g. one per GPU or per prompt batch) into one trace."""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ditlens.errors import DitlensError
from ditlens.traces.format import run_mismatch, stat_path
from ditlens.traces.reader import Trace
from ditlens.traces.writer import TraceWriter, _prompt_array_specs


def merge_traces(
    shards: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    overwrite: bool = False,
    allow_partial: bool = False,
) -> Path:
    """Write ``out`` holding the finished prompts of every shard, concatenated in shard order.

    The shards must come from the same run settings (model, steps, guidance, size, seed,
    layers, branches, heads, tokens, timesteps, pipeline arguments), follow each other in
    prompt order (each shard's ``--prompt-offset`` where the last ended), and record the same statistics, raw
    selection and per-prompt arrays. Derived arrays (``write_array``) aggregate over a
    shard's prompts, so they are not carried over: run the analysis again on the merged
    trace. A shard with unfinished prompts is refused unless ``allow_partial``, in which
    case only its finished prompts are taken. Statistics no run can fill (the all-NaN text group
    that older traces of a model without text tokens hold) are neither compared nor carried over,
    so such a trace merges with a newer one.
    """
    paths = [Path(s) for s in shards]
    target = Path(out)
    if not paths:
        raise DitlensError("no shards to merge: give at least one trace")
    if any(_same_file(p, target) for p in paths):
        raise DitlensError(f"the merged trace {target} would overwrite one of its shards: choose another output path")
    if len({p.resolve() for p in paths}) != len(paths):
        raise DitlensError("a shard is listed twice: each trace may be merged once")

    with ExitStack() as stack:
        traces = [stack.enter_context(Trace.open(p)) for p in paths]
        first = traces[0]
        stat_keys = first.filled_stat_keys()
        raw = first.raw_selection()
        arrays = _prompt_array_specs(first)
        timesteps: np.ndarray | None = None
        next_offset = _prompt_offset(first)
        for trace in traces:
            offset = _prompt_offset(trace)
            if offset is not None and next_offset is not None and offset != next_offset:
                raise DitlensError(
                    f"cannot merge: {trace.path} starts at prompt {offset} (--prompt-offset) but the shards before it "
                    f"end at prompt {next_offset}; give the shards in prompt order, each starting where the last ended")
            next_offset = None if offset is None else offset + trace.n_done
            if not trace.complete and not allow_partial:
                raise DitlensError(
                    f"shard {trace.path} has {trace.n_done} of {len(trace.header.prompts)} prompts done: "
                    "finish it with --resume, or merge with --allow-partial to take only the finished ones"
                )
            mismatch = run_mismatch(first.header, trace.header)
            if mismatch is not None:
                field, a, b = mismatch
                raise DitlensError(f"cannot merge: {field} differs between {first.path} ({a}) and {trace.path} ({b})")
            for what, mine, theirs in (
                ("recorded statistics", stat_keys, trace.filled_stat_keys()),
                ("raw selection", raw, trace.raw_selection()),
                ("per-prompt arrays", arrays, _prompt_array_specs(trace)),
            ):
                if mine != theirs:
                    raise DitlensError(
                        f"cannot merge: the {what} of {trace.path} differ from those of {first.path}; "
                        "profile the shards with the same options"
                    )
            if trace.n_done:
                if timesteps is None:
                    timesteps = trace.timesteps
                elif not np.allclose(timesteps, trace.timesteps, rtol=1e-9, atol=1e-9):
                    raise DitlensError(
                        f"cannot merge: the scheduler timesteps of {trace.path} differ from the other shards'"
                    )

        prompts = [p for trace in traces for p in trace.prompts]
        if not prompts:
            raise DitlensError("cannot merge: the shards hold no finished prompts")
        merged_from = ",".join(p.name for p in paths)
        header = replace(first.header, prompts=prompts, extra={**first.header.extra, "merged_from": merged_from})
        with TraceWriter.create(target, header, stat_keys, raw, overwrite=overwrite, prompt_arrays=arrays) as writer:
            progress = tqdm(total=len(prompts), desc="merging prompts", unit="prompt", disable=None)
            for trace in traces:
                source = trace._file
                for i in range(trace.n_done):
                    stats = {key: source[stat_path(key)][i] for key in stat_keys}
                    raw_data = {t: source[f"/raw/{t}"][i] for t in raw.tensors} if raw is not None else None
                    extra = {a.path: source[a.path][i] for a in arrays}
                    writer.write_prompt(writer.n_done, trace.timesteps, stats, raw_data, extra)
                    progress.update(1)
            progress.close()
    return target


def _prompt_offset(trace: Trace) -> int | None:
    """Global index of the shard's first prompt (its seeds start there); None in older traces."""
    value = trace.header.extra.get("prompt_offset")
    return None if value is None else int(value)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


__all__ = ["merge_traces"]
