"""How much of a denoising step is attention, and the speedup attention compression can reach.

Compressing attention alone cannot beat Amdahl's bound ``1 / (1 - a·s)`` where ``a`` is the
attention share of step time and ``s`` the fraction of attention time removed. ditlens measures
``a`` on the user's own model and resolution: one transformer forward (the inputs of the
pipeline's first step, captured from a real call) is timed as is and with every attention product
replaced by a no-op, both under the same interception so that its host overhead cancels.
With ``modules`` given, whole attention modules (projections too, which output caching also
skips) are taken out instead: each returns the output it gave in one real forward, uncomputed.
"""

from __future__ import annotations

import statistics
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from diffusers.hooks import ModelHook

from ditlens.analyzer import hooks
from ditlens.analyzer.capture import AttentionInterceptor
from ditlens.errors import DitlensError

RECORDED_OUTPUT_HOOK = "ditlens.analyzer.amdahl.recorded_output"  # what takes a module's work out (module scope)


@dataclass(frozen=True)
class AttentionShare:
    step_seconds: float  # one transformer forward with attention
    without_attention_seconds: float  # the same with every attention product (or module) a no-op
    scope: str = "products"  # what was taken out: "products" (the attention core) or "modules"

    @property
    def share(self) -> float:
        """Fraction of the forward spent in attention products or modules (clipped to [0, 1])."""
        if self.step_seconds <= 0:
            return 0.0
        return min(1.0, max(0.0, 1.0 - self.without_attention_seconds / self.step_seconds))

    def bound(self, removed: float) -> float:
        """Amdahl bound on the step speedup when the fraction ``removed`` of attention work goes."""
        if not 0.0 <= removed <= 1.0:
            raise DitlensError(f"removed attention fraction must be in [0, 1], got {removed}")
        return 1.0 / (1.0 - self.share * removed)

    def describe(self) -> str:
        a = self.share
        bounds = ", ".join(f"{self.bound(s):.2f}x at {s:.0%}" for s in (0.5, 0.76, 0.9))
        # "products": validate times whole attention modules (projections too, which output caching
        # also skips), so its bound for a caching plan can be higher than these
        return (f"attention {self.scope} are {a:.1%} of a transformer forward ({self.step_seconds * 1e3:.1f} ms); "
                f"compressing them alone is bounded by {bounds} of their work removed")


class _FirstForward(Exception):
    pass


def capture_forward_inputs(pipeline: Any, call_kwargs: dict[str, Any]) -> tuple[tuple, dict]:
    """The positional and keyword arguments of the transformer's first forward in a pipeline call
    (the call is stopped there)."""
    transformer = pipeline.transformer
    captured: list[tuple[tuple, dict]] = []

    def grab(module, args, kwargs):
        captured.append((args, kwargs))
        raise _FirstForward

    handle = transformer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.inference_mode():
            pipeline(**call_kwargs)
    except _FirstForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise DitlensError(f"{type(pipeline).__name__} never called its transformer; cannot time a step")
    return captured[0]


@contextmanager
def modules_replaced_by_outputs(transformer: torch.nn.Module, args: tuple, kwargs: dict,
                                modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Inside, each of ``modules`` returns what it returned in one real forward of ``transformer``
    on these inputs, computing nothing: the transformer's forward without those modules' work."""
    outputs: dict[int, Any] = {}
    handles = [m.register_forward_hook(lambda module, _, out: outputs.__setitem__(id(module), out)) for m in modules]
    try:
        with torch.inference_mode():
            transformer(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    missing = [type(m).__name__ for m in modules if id(m) not in outputs]
    if missing:
        raise DitlensError(f"{len(missing)} attention modules ({missing[0]}, ...) did not run in the transformer's "
                           "forward; pass modules of this transformer")
    for m in modules:
        hooks.attach(m, RecordedOutputHook(outputs[id(m)]), RECORDED_OUTPUT_HOOK)
    try:
        yield
    finally:
        for m in modules:
            hooks.detach(m, RECORDED_OUTPUT_HOOK)


class RecordedOutputHook(ModelHook):
    """The module returns ``output`` without computing anything."""

    def __init__(self, output: Any) -> None:
        super().__init__()
        self.output = output

    def new_forward(self, module, *args, **kwargs):
        return self.output


def _time_forward(transformer: torch.nn.Module, args: tuple, kwargs: dict, drop_attention: bool, repeats: int,
                  cuda_graph: bool = False, modules: Sequence[torch.nn.Module] | None = None) -> float:
    def handler(func, q, k, v, call_args, call_kwargs):
        if drop_attention:
            return q.new_empty(q.shape[:-1] + (v.shape[-1],))
        return func(*call_args, **call_kwargs)

    device = next(transformer.parameters()).device
    run = lambda: transformer(*args, **kwargs)  # noqa: E731
    with ExitStack() as stack:
        if modules is None:  # both timings under the interception, so its host work cancels
            around: Any = lambda: AttentionInterceptor(handler)  # noqa: E731
        else:
            if drop_attention:  # outputs recorded once, outside the timing
                stack.enter_context(modules_replaced_by_outputs(transformer, args, kwargs, modules))
            around = ExitStack
        if cuda_graph:
            if device.type != "cuda":
                raise DitlensError(f"a CUDA-graph timing needs the transformer on CUDA, not {device}")
            graph = torch.cuda.CUDAGraph()
            with torch.inference_mode(), around():
                run()  # warm-up: kernels compile outside the capture
                with torch.cuda.graph(graph):
                    run()
            run, around = graph.replay, ExitStack
        return _median_seconds(run, repeats, device, around)


def _median_seconds(run: Any, repeats: int, device: torch.device, around: Any) -> float:
    """Median wall time of ``run()`` (inside ``around()``) over ``repeats`` calls after a warm-up."""
    times = []
    with torch.inference_mode():
        for i in range(repeats + 1):  # the first is a warm-up
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            with around():
                run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_attention_share(pipeline: Any, call_kwargs: dict[str, Any], repeats: int = 3,
                            cuda_graph: bool = False,
                            modules: Sequence[torch.nn.Module] | None = None) -> AttentionShare:
    """Time one transformer forward with and without its attention products (median of ``repeats``).

    ``cuda_graph``: each variant captured in a CUDA graph and replayed, which takes the host out
    of the timing: the share a step has when it runs under :func:`ditlens.compress.apply_cuda_graphs`.
    ``modules``: take these whole modules out instead of the products (:func:`modules_replaced_by_outputs`)."""
    args, kwargs = capture_forward_inputs(pipeline, call_kwargs)
    transformer = pipeline.transformer
    with_attention = _time_forward(transformer, args, kwargs, False, repeats, cuda_graph, modules)
    without = _time_forward(transformer, args, kwargs, True, repeats, cuda_graph, modules)
    return AttentionShare(with_attention, without, "products" if modules is None else "modules")
