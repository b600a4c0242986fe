"""One entry point for every search: :func:`search` (used by the CLI and the demo)."""

from __future__ import annotations

from typing import Any, Sequence

from ditlens.compress.search.common import SearchResult
from ditlens.errors import DitlensError


def search(pipe: Any, prompts: Sequence[str], *, method: str = "v2", delta: float | None = None,
           target_flops: float | None = None, target_latency: float | None = None, trace: str | None = None,
           c: float | None = 1.5, candidates: Sequence[str] | str | None = None, latency: str = "flops",
           steps: int | None = None, guidance: float | None = None, height: int | None = None, width: int | None = None,
           seed: int = 0, micro_batch: int = 4, window: int | None = None, naive: bool = False,
           every_candidate: bool = False, early_reject: bool = True, row_split: bool = True, progress: bool = True,
           call_kwargs: dict | None = None,
           budget_iterations: int = 10, sparsities: Sequence[float] | None = None) -> SearchResult:
    """Search a plan with ``method`` v1 | v2 | trace, at threshold ``delta`` or for a budget
    (``target_flops``: attention-core FLOPs fraction; ``target_latency``: modelled latency fraction).
    ``steps`` (default 20), ``guidance``, ``height``, ``width`` and ``call_kwargs`` are the run of an
    online search; a search from a trace takes the trace's run and refuses others.
    ``sparsities``: V2 online, image-pair sparsities of the default arrow/window candidates
    (default 0.5, 0.75, 0.9; ignored when ``candidates`` is given)."""
    from ditlens.compress.search.budget import search_for_budget
    from ditlens.compress.search.engine import EngineConfig

    if method not in ("v1", "v2", "trace"):
        raise DitlensError(f"unknown search method {method!r}; use v1, v2 or trace")
    if method == "trace" and not trace:
        raise DitlensError("--method trace needs --trace T (a trace recorded with `ditlens profile --influence`)")
    if method == "trace":
        check_trace_run(trace, steps=steps, guidance=guidance, height=height, width=width, call_kwargs=call_kwargs)
    engine = EngineConfig(steps=20 if steps is None else steps, guidance=guidance, height=height, width=width, seed=seed,
                          micro_batch=micro_batch, progress=progress, call_kwargs=dict(call_kwargs or {}))

    def run(d: float) -> SearchResult:
        if method == "v2":
            from ditlens.compress.search.headwise import HeadwiseConfig, search_headwise

            extra = {} if sparsities is None else {"sparsities": tuple(sparsities)}
            return search_headwise(pipe, prompts, HeadwiseConfig(delta=d, c=c, candidates=candidates, latency=latency,
                                                                  engine=engine, **extra))
        if method == "v1":
            from ditlens.compress.search.greedy import GreedyConfig, search_greedy

            config = GreedyConfig(delta=d, window=window, naive=naive, every_candidate=every_candidate,
                                  early_reject=early_reject, row_split=row_split, engine=engine)
            return search_greedy(pipe, prompts, config)
        from ditlens.compress.search.from_trace import search_from_trace

        return search_from_trace(trace, pipe, delta=d, c=c, candidates=candidates, latency=latency)

    if target_flops is None and target_latency is None:
        return run(delta if delta is not None else (0.05 if method == "v1" else 0.1))
    measure = None
    target = target_flops
    if target_latency is not None:
        target = target_latency
        measure = _latency_measure(pipe, latency)
    outcome = search_for_budget(run, float(target), measure=measure, iterations=budget_iterations)
    result = outcome.result
    result.plan.provenance.add_note(f"budget target={'flops' if target_latency is None else 'latency'} {target:g}, "
                                    f"achieved {outcome.achieved:.4f}, δ tried {len(outcome.evaluations)}")
    return result


def check_trace_run(trace: str | None, *, steps: int | None = None, guidance: float | None = None,
                    height: int | None = None, width: int | None = None, call_kwargs: dict | None = None) -> None:
    """Refuse run settings a search from ``trace`` cannot honour: it plans for the run the trace
    recorded (it runs no pipeline)."""
    if call_kwargs:
        raise DitlensError("--method trace runs no pipeline, so pipeline arguments (--call-arg) do not apply; "
                           "they belong to the profile that recorded the trace")
    if not trace:
        return
    from ditlens.traces import Trace

    with Trace.open(trace) as opened:
        header = opened.header
    recorded = {"steps": header.steps, "guidance": header.guidance_scale, "height": header.height,
                "width": header.width}
    given = {"steps": steps, "guidance": guidance, "height": height, "width": width}
    differ = [f"--{k} {v:g} (the trace has {recorded[k]:g})" for k, v in given.items()
              if v is not None and recorded[k] is not None and float(v) != float(recorded[k])]
    if differ:
        raise DitlensError(f"a search from a trace plans for the run the trace recorded, not {', '.join(differ)}; "
                           "drop the option or profile that run")


def _latency_measure(pipe: Any, kind: str):
    from ditlens.compress.search.latency import build_latency, modelled_latency_fraction

    def measure(result: SearchResult) -> float:
        plan = result.plan
        methods = sorted({m.to_str() for s in range(plan.steps) for i in range(plan.n_layers)
                          for m in plan.head_methods(s, i)} - {"full"})
        rows = 2 if plan.run.cfg_layout != "none" else 1
        weight = next(pipe.transformer.parameters())  # time the kernels where and how the model runs
        model = build_latency(kind, list(plan.model.layers), methods, plan.model.tokens.grid, plan.model.tokens.n_text or 0,
                              plan.model.heads, plan.model.head_dim, rows, str(weight.device), weight.dtype)
        return modelled_latency_fraction(plan, model)

    return measure
