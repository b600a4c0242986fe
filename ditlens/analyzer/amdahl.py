"""How much of a denoising step is attention, and the speedup attention compression can reach.

Compressing attention alone cannot beat Amdahl's bound ``1 / (1 - a·s)`` where ``a`` is the
attention share of step time and ``s`` the fraction of attention time removed. ditlens measures
``a`` on the user's own model and resolution: one transformer forward (the inputs of the
pipeline's first step, captured from a real call) is timed as is and with every attention product
replaced by a no-op, both under the same interception so that its host overhead cancels.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from ditlens.analyzer.capture import AttentionInterceptor
from ditlens.errors import DitlensError


@dataclass(frozen=True)
class AttentionShare:
    step_seconds: float  # one transformer forward with attention
    without_attention_seconds: float  # the same with every attention product a no-op

    @property
    def share(self) -> float:
        """Fraction of the forward spent in attention products (clipped to [0, 1])."""
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
        return (f"attention products are {a:.1%} of a transformer forward ({self.step_seconds * 1e3:.1f} ms); "
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


def _time_forward(transformer: torch.nn.Module, args: tuple, kwargs: dict, drop_attention: bool, repeats: int,
                  cuda_graph: bool = False) -> float:
    def handler(func, q, k, v, call_args, call_kwargs):
        if drop_attention:
            return q.new_empty(q.shape[:-1] + (v.shape[-1],))
        return func(*call_args, **call_kwargs)

    device = next(transformer.parameters()).device
    run = lambda: transformer(*args, **kwargs)  # noqa: E731
    if cuda_graph:
        if device.type != "cuda":
            raise DitlensError(f"a CUDA-graph timing needs the transformer on CUDA, not {device}")
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), AttentionInterceptor(handler):
            run()  # warm-up: kernels compile outside the capture
            with torch.cuda.graph(graph):
                run()
        run = graph.replay
    times = []
    with torch.inference_mode():
        for i in range(repeats + 1):  # the first is a warm-up
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            if cuda_graph:
                run()
            else:
                with AttentionInterceptor(handler):
                    run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_attention_share(pipeline: Any, call_kwargs: dict[str, Any], repeats: int = 3,
                            cuda_graph: bool = False) -> AttentionShare:
    """Time one transformer forward with and without its attention products (median of ``repeats``).

    ``cuda_graph``: each variant captured in a CUDA graph and replayed, which takes the host out
    of the timing: the share a step has when it runs under :func:`ditlens.compress.apply_cuda_graphs`."""
    args, kwargs = capture_forward_inputs(pipeline, call_kwargs)
    transformer = pipeline.transformer
    with_attention = _time_forward(transformer, args, kwargs, False, repeats, cuda_graph)
    without = _time_forward(transformer, args, kwargs, True, repeats, cuda_graph)
    return AttentionShare(with_attention, without)
