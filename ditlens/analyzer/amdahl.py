"""How much of a denoising step is attention, and the speedup attention compression can reach.

Compressing attention alone cannot beat Amdahl's bound ``1 / (1 - a·s)`` where ``a`` is the
attention share of step time and ``s`` the fraction of attention time removed. ditlens measures
``a`` on the user's own model and resolution: one transformer forward (the inputs of the
pipeline's first step, captured from a real call) is timed as is and with every attention product
replaced by a no-op, both under the same interception so that its host overhead cancels.
With ``modules`` given, whole attention modules (projections too, which output caching also
skips) are taken out instead: each returns the output it gave in one real forward, uncomputed.
Eager forwards are timed in alternation (with, without, with, ...), so that a host whose speed
drifts slows both alike, and each round's share is kept: where the share is smaller than their
spread, it is below this host's timing noise.
"""

from __future__ import annotations

import statistics
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

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
    round_shares: tuple[float, ...] = ()  # 1 - without / with of each alternating round (eager timing)

    @property
    def below_noise(self) -> bool:
        """The share is smaller than half the spread of the rounds' shares: it is not told apart
        from zero on this host (a forward that waits on something else, not on attention)."""
        if not self.round_shares:
            return False
        return self.share < (max(self.round_shares) - min(self.round_shares)) / 2

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
        text = (f"attention {self.scope} are {a:.1%} of a transformer forward ({self.step_seconds * 1e3:.1f} ms); "
                f"compressing them alone is bounded by {bounds} of their work removed")
        if self.below_noise:
            low, high = min(self.round_shares), max(self.round_shares)
            text += (f"; below this host's timing noise (rounds {low:+.1%} to {high:+.1%}): the forward waits on "
                     "something else, on a GPU usually the host's launches (CUDA graphs take those out)")
        return text


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


def record_module_outputs(transformer: torch.nn.Module, args: tuple, kwargs: dict,
                          modules: Sequence[torch.nn.Module]) -> dict[int, Any]:
    """What each of ``modules`` returns in one real forward of ``transformer`` on these inputs, by id."""
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
    return outputs


@contextmanager
def modules_replaced_by_outputs(transformer: torch.nn.Module, args: tuple, kwargs: dict,
                                modules: Sequence[torch.nn.Module],
                                switch: _Switch | None = None) -> Iterator[None]:
    """Inside, each of ``modules`` returns what it returned in one real forward of ``transformer``
    on these inputs, computing nothing: the transformer's forward without those modules' work.
    With ``switch``, only while ``switch.drop`` is set; otherwise the modules compute as usual."""
    outputs = record_module_outputs(transformer, args, kwargs, modules)
    for m in modules:
        hooks.attach(m, RecordedOutputHook(outputs[id(m)], switch), RECORDED_OUTPUT_HOOK)
    try:
        yield
    finally:
        for m in modules:
            hooks.detach(m, RECORDED_OUTPUT_HOOK)


@dataclass
class _Switch:
    drop: bool = False  # while set, the attention work is taken out


class RecordedOutputHook(ModelHook):
    """The module returns ``output`` without computing anything (while ``switch.drop``, if given)."""

    def __init__(self, output: Any, switch: _Switch | None = None) -> None:
        super().__init__()
        self.output = output
        self.switch = switch

    def new_forward(self, module, *args, **kwargs):
        if self.switch is None or self.switch.drop:
            return self.output
        return self.fn_ref.original_forward(*args, **kwargs)


@contextmanager
def _attention_switch(transformer: torch.nn.Module, args: tuple, kwargs: dict,
                      modules: Sequence[torch.nn.Module] | None) -> Iterator[tuple[_Switch, Callable[[], Any]]]:
    """A switch that takes the attention work out of ``transformer``'s forward while set, and
    what to wrap each timed call in. The same interception (or hooks) runs in both positions, so
    its host work cancels out of the share."""
    switch = _Switch()
    if modules is not None:  # outputs recorded once, outside the timing
        with modules_replaced_by_outputs(transformer, args, kwargs, modules, switch):
            yield switch, ExitStack
        return

    def handler(func, q, k, v, call_args, call_kwargs):
        if switch.drop:
            return q.new_empty(q.shape[:-1] + (v.shape[-1],))
        return func(*call_args, **call_kwargs)

    yield switch, lambda: AttentionInterceptor(handler)


def _round_robin_seconds(calls: Sequence[tuple[Callable[[], None], Callable[[], Any]]], repeats: int,
                         device: torch.device, around: Callable[[], Any]) -> list[list[float]]:
    """Wall time of each ``(prepare, run)``'s ``run()`` (inside ``around()``) over ``repeats``
    rounds after an untimed warm-up round. A round calls each once, in order, so that a host whose
    speed drifts slows every call alike; ``prepare()`` runs untimed before its call."""
    times: list[list[float]] = [[] for _ in calls]
    with torch.inference_mode():
        for i in range(repeats + 1):
            for (prepare, run), kept in zip(calls, times):
                prepare()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                with around():
                    run()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if i:
                    kept.append(time.perf_counter() - t0)
    return times


def _time_forwards(transformer: torch.nn.Module, args: tuple, kwargs: dict, repeats: int,
                   cuda_graph: bool = False,
                   modules: Sequence[torch.nn.Module] | None = None) -> tuple[list[float], list[float]]:
    """Seconds of ``repeats`` forwards with attention and as many without.

    Eager: in alternating rounds (see :func:`_round_robin_seconds`). ``cuda_graph``: each variant
    captured and replayed in turn, one graph alive at a time (replays do no host work to drift)."""
    device = next(transformer.parameters()).device
    if cuda_graph and device.type != "cuda":
        raise DitlensError(f"a CUDA-graph timing needs the transformer on CUDA, not {device}")
    run = lambda: transformer(*args, **kwargs)  # noqa: E731
    with _attention_switch(transformer, args, kwargs, modules) as (switch, around):
        def setting(drop: bool) -> Callable[[], None]:
            return lambda: setattr(switch, "drop", drop)

        if not cuda_graph:
            with_attention, without = _round_robin_seconds([(setting(False), run), (setting(True), run)],
                                                           repeats, device, around)
            return with_attention, without
        timings = []
        for drop in (False, True):
            switch.drop = drop
            graph = torch.cuda.CUDAGraph()
            with torch.inference_mode(), around():
                run()  # warm-up: kernels compile outside the capture
                with torch.cuda.graph(graph):
                    run()
            timings.append(_round_robin_seconds([(lambda: None, graph.replay)], repeats, device, ExitStack)[0])
            del graph
        return timings[0], timings[1]


def measure_attention_share(pipeline: Any, call_kwargs: dict[str, Any], repeats: int = 3,
                            cuda_graph: bool = False,
                            modules: Sequence[torch.nn.Module] | None = None) -> AttentionShare:
    """Time one transformer forward with and without its attention products (median of ``repeats``).

    ``cuda_graph``: each variant captured in a CUDA graph and replayed, which takes the host out
    of the timing: the share a step has when it runs under :func:`ditlens.compress.apply_cuda_graphs`.
    ``modules``: take these whole modules out instead of the products (:func:`modules_replaced_by_outputs`)."""
    args, kwargs = capture_forward_inputs(pipeline, call_kwargs)
    with_attention, without = _time_forwards(pipeline.transformer, args, kwargs, repeats, cuda_graph, modules)
    rounds = () if cuda_graph else tuple(1.0 - b / a for a, b in zip(with_attention, without) if a > 0)
    return AttentionShare(statistics.median(with_attention), statistics.median(without),
                          "products" if modules is None else "modules", rounds)
