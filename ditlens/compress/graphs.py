"""Replay every transformer forward of a pipeline call as a CUDA graph.

At 1024² and below a DiT step on an H100/H200 is host-bound: Python, diffusers' modules and
kernel launches take longer to issue than the GPU takes to run them, so GPU work a plan removes
does not show as time. A CUDA graph replays a whole forward with one launch. ::

    from ditlens.compress import apply_cuda_graphs, apply_plan
    graphs = apply_cuda_graphs(pipe)       # with or without a plan, applied before or after
    pipe(...)   # first call: eager (Triton and torch.compile compile, libraries initialise)
    pipe(...)   # second call: each forward is captured into a graph, then replayed
    pipe(...)   # later calls: inputs copied into the graph's buffers, one replay per forward
    graphs.remove()

Graphs are kept per configuration: the uncompressed model and every plan (by its content and
backend) have their own, so alternating a plan with the uncompressed model replays both. All
graphs share one memory pool. That is safe because every tensor that crosses from one graph to
another (a plan's caches, a module output a later step reuses) is written and read within one
pipeline call of one configuration, and the graphs of a call replay in the order they were
captured; inputs live in buffers outside the pool and outputs are copied out at once.
Constants the kernels read from outside the graph (per-plan head tensors, masks, head indices)
come from caches that evict or from a runtime that is dropped on removal: each graph keeps the
ones it read alive (:mod:`ditlens.kernels.graph_constants`).

What a graph cannot see: anything the forward decides in Python from values that change
between calls without being a tensor input. ditlens' own plan runtime keys its graphs on the
step, so that is covered; other stateful hooks (diffusers' caches, the profiler) are refused.
A graph bakes in the addresses of the weights: after moving or replacing parameters call
:meth:`CudaGraphHandle.reset`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ditlens.errors import DitlensError
from ditlens.kernels.graph_constants import record_graph_constants

GRAPH_HOOK = "ditlens.compress.cuda_graphs"
_UNCOMPRESSED = "uncompressed"


@dataclass(frozen=True)
class CudaGraphConfig:
    """``eager_calls``: pipeline calls of a configuration that run eagerly before the next one is
    captured (kernels compile and libraries initialise there, which a capture cannot do)."""

    eager_calls: int = 1

    def __post_init__(self) -> None:
        if self.eager_calls < 1:
            raise DitlensError(f"eager_calls must be at least 1 (got {self.eager_calls}): a capture needs a warm-up call")


@dataclass
class _Forward:
    """One captured transformer forward."""

    graph: torch.cuda.CUDAGraph
    output: Any
    runtime_snapshot: Any  # what the plan runtime's host-side counters were after it (None without a plan)
    constants: list[Any]  # device constants read by the graph and living outside it: kept allocated with it


@dataclass
class _Inputs:
    """Static input buffers of one configuration and call signature."""

    buffers: list[torch.Tensor]
    forwards: dict[int, _Forward] = field(default_factory=dict)  # by forward index within the call


@dataclass
class GraphState:
    """Graphs and call tracking of one transformer."""

    pool: Any = None
    inputs: dict[tuple, _Inputs] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)  # calls seen per configuration
    timesteps_ref: Any = None
    forward_index: int = -1
    captures: int = 0
    replays: int = 0

    def clear(self) -> None:
        self.inputs.clear()
        self.calls.clear()
        self.timesteps_ref, self.forward_index = None, -1
        self.pool = None


class CudaGraphRunner:
    """Decides per forward whether to run eagerly, capture or replay, and does it."""

    def __init__(self, transformer: nn.Module, scheduler: Any, config: CudaGraphConfig) -> None:
        self.transformer = transformer
        self.scheduler = scheduler
        self.config = config
        self.state = GraphState()

    def _new_call(self) -> bool:
        # pipelines call scheduler.set_timesteps once per call, which replaces the timesteps tensor
        timesteps = getattr(self.scheduler, "timesteps", None)
        st = self.state
        if timesteps is not st.timesteps_ref or st.forward_index < 0:
            st.timesteps_ref, st.forward_index = timesteps, 0
            return True
        st.forward_index += 1
        return False

    def forward(self, original: Any, args: tuple, kwargs: dict) -> Any:
        runtime = _plan_runtime(self.transformer)
        config = runtime.graph_key if runtime is not None else _UNCOMPRESSED
        st = self.state
        if self._new_call():
            st.calls[config] = st.calls.get(config, 0) + 1
        if st.calls.get(config, 0) <= self.config.eager_calls:
            return original(*args, **kwargs)
        leaves, spec = tree_flatten((args, kwargs))
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        for t in tensors:
            if t.device.type != "cuda":
                raise DitlensError(f"CUDA graphs need every tensor input of the transformer on the GPU; got one of shape "
                                   f"{tuple(t.shape)} on {t.device}: move the pipeline to CUDA")
        signature = (config, str(spec), tuple((tuple(t.shape), t.dtype, t.stride()) for t in tensors),
                     tuple(_static_leaf(x) for x in leaves if not isinstance(x, torch.Tensor)))
        inputs = st.inputs.get(signature)
        if inputs is None:
            with torch.inference_mode(False), torch.no_grad():  # usable inside and outside inference mode
                inputs = _Inputs([_buffer_like(t) for t in tensors])
            st.inputs[signature] = inputs
        for buffer, t in zip(inputs.buffers, tensors):
            if buffer.data_ptr() != t.data_ptr():
                buffer.copy_(t)
        captured = inputs.forwards.get(st.forward_index)
        if captured is None:
            if runtime is not None:  # its step bookkeeping reads timesteps back: not inside a capture
                runtime.settle()
            captured = self._capture(original, leaves, spec, inputs.buffers, runtime)
            inputs.forwards[st.forward_index] = captured
            st.captures += 1
        captured.graph.replay()
        st.replays += 1
        if runtime is not None:  # the step bookkeeping after the launch, then the counters it resets
            runtime.settle()
            runtime.restore_graph_snapshot(captured.runtime_snapshot)
        return tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, captured.output)

    def _capture(self, original: Any, leaves: list, spec: Any, buffers: list[torch.Tensor], runtime: Any) -> _Forward:
        _refuse_stateful_hooks(self.transformer)
        it = iter(buffers)
        args, kwargs = tree_unflatten([next(it) if isinstance(x, torch.Tensor) else x for x in leaves], spec)
        if self.state.pool is None:
            self.state.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with record_graph_constants() as constants, torch.cuda.graph(graph, pool=self.state.pool):
                output = original(*args, **kwargs)
        except RuntimeError as exc:
            raise DitlensError(f"capturing a transformer forward in a CUDA graph failed ({str(exc).splitlines()[0]}); "
                               "something in the forward syncs with the host or allocates on the CPU: run without "
                               "CUDA graphs") from exc
        return _Forward(graph, output, runtime.graph_snapshot() if runtime is not None else None, constants)


def _buffer_like(t: torch.Tensor) -> torch.Tensor:
    """A buffer ``t`` can be copied into: same strides, or contiguous where ``t`` overlaps itself
    (pipelines pass ``timestep.expand(batch)``, a view with stride 0)."""
    return torch.empty_like(t, memory_format=torch.preserve_format)  # that rule is preserve_format's


def _static_leaf(x: Any) -> Any:
    try:
        hash(x)
        return x
    except TypeError:
        return repr(x)


def _plan_runtime(transformer: nn.Module) -> Any:
    from ditlens.compress.runtime import STEP_HOOK

    registry = getattr(transformer, "_diffusers_hook", None)
    hook = registry.get_hook(STEP_HOOK) if registry is not None else None
    return hook.runtime if hook is not None else None


def _refuse_stateful_hooks(transformer: nn.Module) -> None:
    """Hooks that decide in Python per call would be frozen into the graph: refuse them."""
    from ditlens.compress.runtime import LAYER_HOOK, STEP_HOOK

    allowed = {GRAPH_HOOK, STEP_HOOK, LAYER_HOOK}
    for name, module in transformer.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        for hook_name in getattr(registry, "hooks", {}):
            if hook_name not in allowed:
                where = name or type(transformer).__name__
                raise DitlensError(f"hook {hook_name!r} on {where} keeps per-call state that a CUDA graph would freeze; "
                                   "remove it (or the graphs: handle.remove()) before running")


def plan_graph_key(plan_json: str, backend: str) -> str:
    """What tells one plan configuration's graphs from another's."""
    return hashlib.sha1(f"{backend}\n{plan_json}".encode()).hexdigest()


@lru_cache(maxsize=1)
def _hook_class() -> type:
    from diffusers.hooks import ModelHook as base

    class CudaGraphHook(base):  # type: ignore[misc, valid-type]
        """On the transformer, inside the plan runtime's step hook (which tracks steps in Python
        every call): eager, capture or replay."""

        def __init__(self, runner: CudaGraphRunner) -> None:
            super().__init__()
            self.runner = runner

        def new_forward(self, module, *args, **kwargs):
            return self.runner.forward(self.fn_ref.original_forward, args, kwargs)

        def reset_state(self, module):
            self.runner.state.clear()
            return module

    return CudaGraphHook


@dataclass
class CudaGraphHandle:
    """Applied CUDA graphs. ``remove()`` takes the hook off and frees the graphs."""

    transformer: nn.Module
    runner: CudaGraphRunner
    removed: bool = False

    @property
    def captures(self) -> int:
        return self.runner.state.captures

    @property
    def replays(self) -> int:
        return self.runner.state.replays

    def reset(self) -> None:
        """Drop every graph (after moving or replacing weights); the next calls warm up and capture again."""
        self.runner.state.clear()

    def remove(self) -> None:
        from ditlens.analyzer import hooks

        if self.removed:
            return
        hooks.detach(self.transformer, GRAPH_HOOK)
        self.runner.state.clear()
        self.removed = True

    def __enter__(self) -> "CudaGraphHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def apply_cuda_graphs(pipe: Any, config: CudaGraphConfig | None = None) -> CudaGraphHandle:
    """Replay the transformer forwards of ``pipe`` (a diffusers pipeline on CUDA) as CUDA graphs.

    Works with and without a plan (:func:`ditlens.compress.apply_plan`, before or after); the first
    ``config.eager_calls`` calls of each configuration run eagerly, the next captures."""
    from ditlens.analyzer import hooks
    from ditlens.compress.runtime import STEP_HOOK

    config = config or CudaGraphConfig()
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        raise DitlensError(f"{type(pipe).__name__} has no .transformer; apply_cuda_graphs needs a diffusers DiT pipeline")
    param = next(transformer.parameters(), None)
    if param is None or param.device.type != "cuda":
        where = "no parameters" if param is None else f"parameters on {param.device}"
        raise DitlensError(f"CUDA graphs need the transformer on a CUDA device ({where}); call pipe.to('cuda') first")
    if hooks.has_hook(transformer, GRAPH_HOOK):
        raise DitlensError("CUDA graphs are already applied to this pipeline; remove them first (handle.remove())")
    runner = CudaGraphRunner(transformer, getattr(pipe, "scheduler", None), config)
    # The plan's step hook must stay outside the graph hook: it tracks steps in Python at every call.
    step_hook = hooks.take_off(transformer, STEP_HOOK)
    hooks.attach(transformer, _hook_class()(runner), GRAPH_HOOK)
    if step_hook is not None:
        hooks.attach(transformer, step_hook, STEP_HOOK)
    return CudaGraphHandle(transformer, runner)
