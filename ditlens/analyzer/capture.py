"""Capture hooks: see every attention product of a transformer without changing its output.

Two kinds of diffusers ``ModelHook`` cooperate:

* :class:`ForwardTrackerHook` on the transformer reads each forward's batch, token grid and
  timestep, advances the step index and says which batch rows are ``cond`` and ``uncond``.
* :class:`AttentionCaptureHook` on every attention module runs the module's own forward under
  an :class:`AttentionInterceptor` that sees each
  ``torch.nn.functional.scaled_dot_product_attention`` call, lets it run unchanged, and keeps
  its q, k, v and output. The adapter turns those calls into canonical per-group tensors.

The observer (:class:`CaptureObserver`) receives ``(layer index, step, branch rows, tensors)``
and does the work (statistics, raw copies). Interception runs the very same SDPA call the
model would have made, so the output is bit-identical with and without hooks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook
from torch import nn
from torch.overrides import TorchFunctionMode

from ditlens.analyzer import hooks
from ditlens.analyzer.adapters import (AttentionLayer, ForwardInfo, GroupedTensors, ModelAdapter, SDPACall,
                                      timestep_snapshot)
from ditlens.errors import DitlensError

TRACKER_HOOK = "ditlens.forward_tracker"
CAPTURE_HOOK = "ditlens.attention_capture"
BRANCHES = ("cond", "uncond")

# handler(func, q, k, v, args, kwargs) -> attention output
AttentionHandler = Callable[[Callable, torch.Tensor, torch.Tensor, torch.Tensor, tuple, dict], torch.Tensor]


def sdpa_qkv(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of an SDPA call, whether passed by position or by name."""
    names = ("query", "key", "value")
    values = list(args[:3]) + [kwargs[n] for n in names[len(args[:3]):]]
    return values[0], values[1], values[2]


_TORCH_SDPA = F.scaled_dot_product_attention  # torch's own function, whatever is swapped in later


class _InterceptMode(TorchFunctionMode):
    """Sees every torch call in its block; routes the SDPA ones to a handler."""

    def __init__(self, handler: AttentionHandler) -> None:
        super().__init__()
        self.handler = handler

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _TORCH_SDPA or func is F.scaled_dot_product_attention:
            q, k, v = sdpa_qkv(args, kwargs)
            return self.handler(_TORCH_SDPA, q, k, v, args, kwargs)
        return func(*args, **kwargs)


class AttentionInterceptor:
    """Routes ``scaled_dot_product_attention`` calls made inside a ``with`` block to a handler.

    Default: ``torch.nn.functional.scaled_dot_product_attention`` is swapped for a router for the
    block's duration. Every diffusers attention processor and the attention dispatcher look the
    function up at call time, so they are caught, and nothing else in the block pays for it.
    ``mode=True``: a ``TorchFunctionMode`` instead, which also catches code holding its own
    reference to the function but puts every torch call of the block through Python (measured
    +80 us per attention module on a CPU host: enough to make a GPU pipeline host-bound).
    The swap is process-wide while the block runs; do not run two pipelines in threads under it.
    """

    def __init__(self, handler: AttentionHandler, *, mode: bool = False) -> None:
        self.handler = handler
        self.mode = mode
        self._active: Any = None

    def __enter__(self) -> "AttentionInterceptor":
        if self.mode:
            self._active = _InterceptMode(self.handler)
            self._active.__enter__()
            return self
        inner, handler = F.scaled_dot_product_attention, self.handler

        def routed(*args: Any, **kwargs: Any) -> torch.Tensor:
            q, k, v = sdpa_qkv(args, kwargs)
            return handler(inner, q, k, v, args, kwargs)

        self._active = inner
        F.scaled_dot_product_attention = routed
        return self

    def __exit__(self, *exc: object) -> None:
        if self.mode:
            self._active.__exit__(*exc)
        else:
            F.scaled_dot_product_attention = self._active
        self._active = None


@dataclass
class InterceptRoute:
    """How one module's attention calls are caught: the fast swap until a call of the module is
    seen to miss it (the module holds its own reference to SDPA), the ``TorchFunctionMode`` after."""

    use_mode: bool = False


def run_intercepted(run: Callable[[], Any], handler: AttentionHandler, route: InterceptRoute) -> Any:
    """``run()`` with its SDPA calls routed to ``handler``. A run in which the swap saw no call is
    run again under the mode (attention modules are pure functions of their inputs), and the
    route remembers it."""
    seen = [0]

    def counted(func, q, k, v, args, kwargs):
        seen[0] += 1
        return handler(func, q, k, v, args, kwargs)

    if not route.use_mode:
        with AttentionInterceptor(counted):
            out = run()
        if seen[0]:
            return out
        route.use_mode = True
    with AttentionInterceptor(counted, mode=True):
        return run()


@dataclass(frozen=True)
class ForwardContext:
    """The forward in flight: its step, its grid and which batch rows hold which branch."""

    step: int
    info: ForwardInfo
    rows: dict[str, int]  # branch name -> batch row


class CaptureObserver(Protocol):
    def on_layer(self, layer_index: int, context: ForwardContext, tensors: GroupedTensors) -> None: ...

    def on_forward_end(self, context: ForwardContext) -> None: ...


class ObserverGroup:
    """Several observers fed from one capture (statistics, influence, ...)."""

    def __init__(self, *observers: CaptureObserver) -> None:
        self.observers = [o for o in observers if o is not None]

    def on_layer(self, layer_index: int, context: ForwardContext, tensors: GroupedTensors) -> None:
        for observer in self.observers:
            observer.on_layer(layer_index, context, tensors)

    def on_forward_end(self, context: ForwardContext) -> None:
        for observer in self.observers:
            observer.on_forward_end(context)


def step_marker(scheduler: Any, info: ForwardInfo) -> tuple[str, float]:
    """What tells one denoising step from the next: the scheduler's step index where it keeps one,
    else the timestep. Timesteps alone are not enough: pipelines that pass them in the latents'
    dtype (FLUX in bfloat16) round neighbouring steps to one value. The index is None until the
    first ``scheduler.step``, so step 0 is told apart by its timestep (the only forward at which
    the timestep is read back from the device)."""
    index = getattr(scheduler, "step_index", None) if scheduler is not None else None
    return ("index", float(index)) if index is not None else ("timestep", info.timestep_value)


@dataclass
class StepTracker:
    """Turns the sequence of transformer forwards of one pipeline call into (step, branch rows)."""

    cfg_layout: str
    max_steps: int
    scheduler: Any = None  # the pipeline's scheduler: its step index marks steps (see step_marker)
    step: int = -1
    last_marker: tuple[str, float] | None = None
    calls_at_step: int = 0
    timesteps: list[Any] = field(default_factory=list)  # each step's timestep, read back at the end

    def reset(self) -> None:
        self.step, self.last_marker, self.calls_at_step = -1, None, 0
        self.timesteps = []

    def advance(self, info: ForwardInfo) -> ForwardContext:
        marker = step_marker(self.scheduler, info)
        if self.last_marker is None or marker != self.last_marker:
            self.step += 1
            self.calls_at_step = 0
            self.last_marker = marker
            self.timesteps.append(timestep_snapshot(info.timestep))
        else:
            self.calls_at_step += 1
        if self.step >= self.max_steps:
            raise DitlensError(
                f"the pipeline ran more than {self.max_steps} denoising steps; pass the step count it really uses (--steps)"
            )
        return ForwardContext(self.step, info, self._rows(info.batch))

    def _rows(self, batch: int) -> dict[str, int]:
        layout = self.cfg_layout
        if layout in ("batched_cond_first", "batched_uncond_first") and batch == 2:
            return {"cond": 0, "uncond": 1} if layout == "batched_cond_first" else {"uncond": 0, "cond": 1}
        if batch != 1:
            raise DitlensError(
                f"transformer saw batch {batch} under CFG layout {layout!r}; ditlens profiles one image per prompt "
                "(num_images_per_prompt=1)"
            )
        if layout == "separate_cond_first":
            if self.calls_at_step > 1:
                raise DitlensError("more than two transformer calls at one step: not a cond/uncond pair")
            return {BRANCHES[self.calls_at_step]: 0}
        return {"cond": 0}


class ForwardTrackerHook(ModelHook):
    """On the transformer: sets the forward context that attention hooks read."""

    def __init__(self, adapter: ModelAdapter, tracker: StepTracker, observer: CaptureObserver) -> None:
        super().__init__()
        self.adapter = adapter
        self.tracker = tracker
        self.observer = observer
        self.context: ForwardContext | None = None

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        info = self.adapter.forward_info(module, args, kwargs)
        self.context = self.tracker.advance(info)
        try:
            output = self.fn_ref.original_forward(*args, **kwargs)
        finally:
            context, self.context = self.context, None
        self.observer.on_forward_end(context)
        return output

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.tracker.reset()
        self.context = None
        return module


class AttentionCaptureHook(ModelHook):
    """On one attention module: records its SDPA calls and hands them to the observer."""

    def __init__(self, layer: AttentionLayer, index: int, adapter: ModelAdapter, tracker_hook: ForwardTrackerHook,
                 observer: CaptureObserver) -> None:
        super().__init__()
        self.layer = layer
        self.index = index
        self.adapter = adapter
        self.tracker_hook = tracker_hook
        self.observer = observer
        self.route = InterceptRoute()

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        context = self.tracker_hook.context
        if context is None:  # called outside a transformer forward (e.g. a user's own call)
            return self.fn_ref.original_forward(*args, **kwargs)
        calls: list[SDPACall] = []

        def record(func, q, k, v, call_args, call_kwargs):
            out = func(*call_args, **call_kwargs)
            calls.append(SDPACall(q, k, v, out))
            return out

        output = run_intercepted(lambda: self.fn_ref.original_forward(*args, **kwargs), record, self.route)
        with torch.no_grad():
            grouped = self.adapter.group(self.layer, calls, context.info)
            self.observer.on_layer(self.index, context, grouped)
        return output


@dataclass
class CaptureHandle:
    """What :func:`apply_capture` attached; :meth:`remove` takes it all off again."""

    transformer: nn.Module
    layers: list[AttentionLayer]
    tracker: StepTracker
    modules: list[nn.Module]

    def remove(self) -> None:
        for module in self.modules:
            hooks.detach(module, CAPTURE_HOOK)
        hooks.detach(self.transformer, TRACKER_HOOK)

    def __enter__(self) -> "CaptureHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def apply_capture(transformer: nn.Module, adapter: ModelAdapter, observer: CaptureObserver, *, cfg_layout: str,
                  max_steps: int, layers: Sequence[AttentionLayer] | None = None, scheduler: Any = None) -> CaptureHandle:
    """Attach the tracker and one capture hook per attention layer. Use as a context manager.
    ``scheduler``: the pipeline's, whose step index tells steps apart (see :func:`step_marker`)."""
    layers = list(layers if layers is not None else adapter.attention_layers(transformer))
    if hooks.has_hook(transformer, TRACKER_HOOK):
        raise DitlensError("this transformer already carries ditlens capture hooks; remove them first")
    tracker = StepTracker(cfg_layout=cfg_layout, max_steps=max_steps, scheduler=scheduler)
    tracker_hook = ForwardTrackerHook(adapter, tracker, observer)
    modules = [transformer.get_submodule(layer.name) for layer in layers]
    try:
        hooks.attach(transformer, tracker_hook, TRACKER_HOOK)
        for index, (layer, module) in enumerate(zip(layers, modules)):
            hooks.attach(module, AttentionCaptureHook(layer, index, adapter, tracker_hook, observer), CAPTURE_HOOK)
    except Exception:
        CaptureHandle(transformer, layers, tracker, modules).remove()
        raise
    return CaptureHandle(transformer, layers, tracker, modules)
