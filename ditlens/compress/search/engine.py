"""The search engine: runs a pipeline over calibration prompts and lets a controller decide
every (step, layer) on the running, progressively compressed trajectory.

How it avoids recomputation (generic over diffusers transformers, no per-family code):

* The pipeline is called once with all calibration prompts; a hook on the transformer takes each
  step's batched forward, cuts it into **micro-batches** of prompts (cond and uncond rows of a
  prompt stay together, in the pipeline's CFG order) and hands the step to the controller. The
  transformer's activation memory is that of one micro-batch.
* A pipeline that runs CFG as two forwards per step (FLUX's true CFG: cond, then uncond) gets a
  NaN placeholder back from its cond forward; its uncond forward is joined to the held cond one
  (rows cond first), the step runs as a batched one, and the cond rows are written into the
  placeholder before the pipeline combines the two. A pipeline that read the placeholder first
  would carry NaN into the next step's latents, which the next cond forward refuses.
* Every transformer block (the ``ModuleList`` child holding an attention layer) caches its output
  per micro-batch once all of its attention layers are decided at this step. A later pass returns
  those cached outputs instead of running the blocks, so deciding layer i runs only the block of
  layer i (and, for V1's trials, the blocks after it).
* A trial (V1) writes no cache, but keeps what committing it would write: its layer's output cache
  and, once the rest of the block is decided, the block's output. Deciding the trial's methods
  installs them, so the accepted trial's block is not run again to commit it.
* A pass may run only some rows of its micro-batch from a given block on (``PassConfig.rows``), the
  last block's output taking the other rows from a known output: V1's row split.
* A pass may stop right after a layer's attention (``_Stop``): V2 needs nothing after it.
* Attention products are executed here from the call's own q, k, v (intercepted SDPA): the
  controller's per-head methods, or every candidate at once for V2's influences.

Method semantics and caches follow the compression runtime (DESIGN §5): output cache (``ast``)
= the head's output at the latest step it was computed; WA-RS = window + residual of the latest
pure ``full`` step (one window per refresh); ``+asc`` = uncond rows copy the cond rows. A layer's
caches are written only when its methods are decided (trials and undecided layers read them),
and a decided layer may run several times in one step with the same result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ditlens.compress.methods import FULL, CallLayout, HeadMethod, call_layout, dense_mask
from ditlens.errors import DitlensError

STEP_HOOK = "ditlens.search.step"
BLOCK_HOOK = "ditlens.search.block"
LAYER_HOOK = "ditlens.search.layer"
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class _Stop(Exception):
    """Raised inside a forward once the pass has what it needs."""


@dataclass
class EngineConfig:
    steps: int = 20
    guidance: float | None = None
    height: int | None = None
    width: int | None = None
    seed: int = 0
    micro_batch: int = 4
    reuse_blocks: bool = True  # False: every pass runs the whole transformer (naive baseline)
    residual_widths: tuple[int, ...] = ()  # WA-RS windows whose residuals are refreshed at full steps
    progress: bool = True
    call_kwargs: dict[str, Any] = field(default_factory=dict)  # passed through to the pipeline
    prompt_offset: int = 0  # global index of the first prompt (data-parallel shards): seeds are per prompt

    def __post_init__(self) -> None:
        if self.micro_batch < 1:
            raise DitlensError(f"micro_batch must be at least 1 calibration prompt per forward, got {self.micro_batch}")
        if self.steps < 1:
            raise DitlensError(f"steps must be at least 1, got {self.steps}")


@dataclass
class PassConfig:
    """What one forward of one micro-batch does."""

    trial: dict[int, tuple[HeadMethod, ...]] = field(default_factory=dict)  # no cache writes
    observe: int | None = None  # layer whose candidates are measured (runs full, then stops)
    skip_before: int = 0  # block position: cached blocks before it return their cache
    # Row split (V1): blocks from position ``rows_from`` on run only these rows of the micro-batch;
    # the last block's output takes the other rows from ``known_last`` (their output is known).
    rows: tuple[int, ...] | None = None
    rows_from: int = 0
    known_last: Any = None


@dataclass
class MicroBatch:
    index: int
    prompts: tuple[int, ...]  # prompt index of every batch row of the micro-batch
    branches: tuple[str, ...]  # branch of every batch row
    rows: torch.Tensor  # rows of the pipeline's batch
    args: tuple
    kwargs: dict


def _sdpa_params(args: tuple, kwargs: dict) -> dict[str, Any]:
    params = dict(zip(_SDPA_PARAMS, args))
    params.update(kwargs)
    return params


def _slice_batch(obj: Any, rows: torch.Tensor, batch: int) -> Any:
    """Rows of every tensor whose first dimension is the batch (dicts, lists and tuples recursed)."""
    if isinstance(obj, torch.Tensor):
        return obj.index_select(0, rows.to(obj.device)) if obj.dim() > 0 and obj.shape[0] == batch else obj
    if isinstance(obj, dict):
        return {k: _slice_batch(v, rows, batch) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not isinstance(obj, str):
        return type(obj)(_slice_batch(v, rows, batch) for v in obj)
    return obj


def _splice_rows(known: Any, part: Any, rows: torch.Tensor) -> Any:
    """``known`` with its ``rows`` replaced by ``part`` (tuples and lists recursed)."""
    if isinstance(part, torch.Tensor) and isinstance(known, torch.Tensor) and part.shape[0] == len(rows) \
            and known.shape[1:] == part.shape[1:]:
        out = known.clone()
        out[rows.to(out.device)] = part
        return out
    if isinstance(part, (tuple, list)) and isinstance(known, (tuple, list)):
        return type(part)(_splice_rows(k, p, rows) for k, p in zip(known, part))
    return part


def _join_rows(cond: Any, uncond: Any, batch: int, where: str = "argument") -> Any:
    """The cond and uncond forwards' arguments as one forward's, cond rows first: tensors whose
    first dimension is the batch are concatenated; anything else must be the same in both."""
    if isinstance(cond, torch.Tensor) and isinstance(uncond, torch.Tensor):
        if cond.dim() > 0 and cond.shape[0] == batch and uncond.shape == cond.shape:
            return torch.cat([cond, uncond])
        if cond.shape == uncond.shape and torch.equal(cond, uncond):
            return cond
    elif isinstance(cond, dict) and isinstance(uncond, dict) and cond.keys() == uncond.keys():
        return {k: _join_rows(v, uncond[k], batch, f"{where} {k!r}") for k, v in cond.items()}
    elif isinstance(cond, (list, tuple)) and not isinstance(cond, str) and type(cond) is type(uncond) \
            and len(cond) == len(uncond):
        return type(cond)(_join_rows(a, b, batch, f"{where} {i}") for i, (a, b) in enumerate(zip(cond, uncond)))
    elif cond is uncond or (not isinstance(cond, torch.Tensor) and cond == uncond):
        return cond
    raise DitlensError(f"the uncond forward's {where} differs from the cond forward's and has no batch dimension to "
                       "join them on; search this pipeline from a trace (ditlens profile --influence, then "
                       "ditlens search --trace)")


def _all_finite(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, dict):
        return all(_all_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)) and not isinstance(obj, str):
        return all(_all_finite(v) for v in obj)
    return True


def _model_output(tensor: torch.Tensor, return_dict: bool) -> Any:
    """What a diffusers transformer returns for ``tensor``."""
    if not return_dict:
        return (tensor,)
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    return Transformer2DModelOutput(sample=tensor)


def first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    return output.sample


def _replace_first(output: Any, tensor: torch.Tensor) -> Any:
    if isinstance(output, torch.Tensor):
        return tensor
    if isinstance(output, tuple):
        return (tensor,) + tuple(output[1:])
    if isinstance(output, list):
        return [tensor] + list(output[1:])
    return type(output)(sample=tensor)


@dataclass
class _KeptWrites:
    """What committing one micro-batch's trial pass would write."""

    heads: list[tuple[tuple[int, int, int], torch.Tensor, torch.Tensor]] = field(default_factory=list)  # key, idx, out
    block: Any = None  # the trial block's output, once the block's other layers are decided


@dataclass
class _HeldCond:
    """The cond forward of a separate-CFG step, answered once its uncond forward comes."""

    args: tuple
    kwargs: dict
    output: torch.Tensor  # returned to the pipeline as NaN, filled in place when the step runs


@dataclass
class HeadState:
    """Decision history of one (layer, head) across steps (shared by all micro-batches)."""

    refreshed: bool = False  # a pure full step happened (WA-RS has a residual)
    wars_window: int | None = None  # window used since the last refresh


class SearchEngine:
    """Drives one pipeline call over the calibration prompts; see the module docstring."""

    def __init__(self, pipe: Any, prompts: Sequence[str], config: EngineConfig, registry: Any = None) -> None:
        from ditlens.analyzer.adapters import default_registry

        if not prompts:
            raise DitlensError("plan search needs at least one calibration prompt")
        self.pipe = pipe
        self.prompts = list(prompts)
        self.config = config
        self.transformer: nn.Module = pipe.transformer
        self.device = next(self.transformer.parameters()).device
        self.adapter = (registry or default_registry()).find(self.transformer)
        self.layers = self.adapter.attention_layers(self.transformer)
        self.heads, self.head_dim = self.adapter.heads(self.transformer)
        self.block_of: list[str] = [self._block_name(l.name) for l in self.layers]
        self.blocks: list[str] = list(dict.fromkeys(self.block_of))  # execution order (layers are)
        self.block_pos = {b: i for i, b in enumerate(self.blocks)}
        self.layers_of_block: dict[str, list[int]] = {b: [] for b in self.blocks}
        for i, b in enumerate(self.block_of):
            self.layers_of_block[b].append(i)
        # run state
        self.step = -1
        self.timesteps: list[float] = []
        self.last_marker: tuple[str, float] | None = None
        self.grid: tuple[int, int, int] | None = None
        self.n_text = 0
        self.cfg_rows = 1
        self.cfg_layout = "none"
        self.separate_cfg = False  # the pipeline runs a cond and an uncond forward per step
        self.held: _HeldCond | None = None
        self.micro_batches: list[MicroBatch] = []
        self.mb: MicroBatch | None = None
        self.pass_cfg = PassConfig()
        self.decided: dict[int, tuple[HeadMethod, ...]] = {}
        self.block_cache: dict[tuple[int, str], Any] = {}
        self.head_cache: dict[tuple[int, int, int], torch.Tensor] = {}
        # (layer, methods) of a trial -> micro-batch -> what committing it would write (decide() installs it)
        self.kept: dict[tuple[int, tuple], dict[int, _KeptWrites]] = {}
        self.residual: dict[tuple[int, int, int, int], torch.Tensor] = {}
        self.head_state = [[HeadState() for _ in range(self.heads)] for _ in self.layers]
        self.observer: Callable[..., None] | None = None
        self.controller: Any = None
        self._original_forward: Callable | None = None
        self.forward_passes = 0
        self.block_runs = 0
        self.block_work = 0.0  # block runs weighted by the share of the micro-batch's rows they ran
        self.last_block_output: Any = None  # the last block's output of the latest pass (every row)
        self._split_rows: torch.Tensor | None = None  # PassConfig.rows of the running pass, on the model's device
        self.text_mask: torch.Tensor | None = None  # [prompts, text tokens]: own tokens (ModelAdapter.one_prompt_text)

    # -- structure -----------------------------------------------------------------------------
    def _block_name(self, layer_name: str) -> str:
        """The child of a ``ModuleList`` that holds the attention module (its transformer block)."""
        parts = layer_name.split(".")
        for n in range(len(parts) - 1):
            if isinstance(self.transformer.get_submodule(".".join(parts[: n + 1])), nn.ModuleList):
                name = ".".join(parts[: n + 2])
                if name != layer_name:
                    return name
        return layer_name  # the attention module is its own block

    # -- running -------------------------------------------------------------------------------
    def call_kwargs(self) -> dict[str, Any]:
        from ditlens.analyzer.adapters import _class_label

        cfg = self.config
        # One generator per prompt (seed + global index): a prompt's noise does not depend on
        # which other prompts share the call, so data-parallel shards reproduce one process.
        generators = [torch.Generator(device="cpu").manual_seed(cfg.seed + cfg.prompt_offset + i)
                      for i in range(len(self.prompts))]
        kwargs = self.adapter.call_kwargs(self.pipe, self.prompts[0], cfg.steps, cfg.guidance, cfg.height, cfg.width,
                                          generators[0])
        kwargs["generator"] = generators
        if "class_labels" in kwargs:
            kwargs["class_labels"] = [_class_label(self.pipe, p) for p in self.prompts]
        else:
            kwargs["prompt"] = list(self.prompts)
        extra = {k: v for k, v in cfg.call_kwargs.items() if k not in ("prompt", "class_labels", "generator")}
        for name in ("negative_prompt", "negative_prompt_2"):  # one per prompt: some pipelines encode a string once
            if isinstance(extra.get(name), str) and "prompt" in kwargs:
                extra[name] = [extra[name]] * len(self.prompts)
        kwargs.update(extra)
        return kwargs

    def run(self, controller: Any) -> Any:
        """Run the pipeline with ``controller.run_step(engine, step)`` deciding every step."""
        from ditlens.analyzer import hooks

        step_hook, block_hook, layer_hook = _hook_classes()
        kwargs = self.call_kwargs()
        self.text_mask = None
        if self.adapter.batch_changes_text and len(self.prompts) > 1:
            # one batched call, but every prompt encoded (and attended) as in one-prompt inference
            one_prompt = self.adapter.one_prompt_text(self.pipe, self.prompts, kwargs)
            if one_prompt is not None:
                kwargs, self.text_mask = one_prompt
        self.controller = controller
        self.separate_cfg, self.held = self.adapter.runs_separate_cfg(kwargs), None
        attached: list[tuple[nn.Module, str]] = []
        try:
            hooks.attach(self.transformer, step_hook(self), STEP_HOOK)
            attached.append((self.transformer, STEP_HOOK))
            for b in self.blocks:
                module = self.transformer.get_submodule(b)
                if b in [l.name for l in self.layers]:
                    continue  # an attention module that is its own block: never cached
                hooks.attach(module, block_hook(self, b), BLOCK_HOOK)
                attached.append((module, BLOCK_HOOK))
            for i, layer in enumerate(self.layers):
                module = self.transformer.get_submodule(layer.name)
                hooks.attach(module, layer_hook(self, i), LAYER_HOOK)
                attached.append((module, LAYER_HOOK))
            with torch.no_grad():
                output = self.pipe(**kwargs)
            if self.held is not None:
                raise DitlensError(f"the pipeline ran no uncond forward after the cond forward of step {self.step}; "
                                   "search this pipeline from a trace (ditlens profile --influence, then ditlens search "
                                   "--trace)")
            return output
        finally:
            self.held = None
            for module, name in reversed(attached):
                hooks.detach(module, name)
            self.head_cache.clear()
            self.residual.clear()
            self.block_cache.clear()

    def on_transformer_forward(self, original: Callable, args: tuple, kwargs: dict) -> Any:
        from ditlens.analyzer.capture import step_marker

        info = self.adapter.forward_info(self.transformer, args, kwargs)
        marker = step_marker(getattr(self.pipe, "scheduler", None), info)
        P = len(self.prompts)
        if self.held is not None:
            if marker != self.last_marker:
                raise DitlensError(f"the pipeline ran no uncond forward after the cond forward of step {self.step}")
            if info.batch != P:
                raise DitlensError(f"uncond forward of batch {info.batch} for {P} calibration prompts")
            held, self.held = self.held, None
            joined = self._run_step(original, _join_rows(held.args, args, P, "positional argument"),
                                    _join_rows(held.kwargs, kwargs, P), 2 * P)
            rows = first_tensor(joined)
            held.output.copy_(rows[:P])
            return _replace_first(joined, rows[P:])
        if marker == self.last_marker:
            raise DitlensError("plan search runs one transformer forward per step (batched CFG or no CFG), or a cond "
                               f"and an uncond forward where the {self.adapter.family} adapter expects them; this "
                               f"pipeline ran another forward at step {self.step}")
        self.step += 1
        if self.step >= self.config.steps:
            raise DitlensError(f"the pipeline ran more than {self.config.steps} steps; pass the step count it uses")
        self.timesteps.append(info.timestep_value)
        self.last_marker = marker
        self.grid = tuple(info.grid)
        if info.batch not in (P, 2 * P) or (self.separate_cfg and info.batch != P):
            raise DitlensError(f"transformer saw batch {info.batch} for {P} calibration prompts; use one image per prompt")
        if self.separate_cfg:
            if self.step > 0 and not _all_finite((args, kwargs)):
                raise DitlensError(f"step {self.step}'s cond forward got NaN or inf, most likely because the pipeline read "
                                   "the cond output of the step before its uncond forward ran; search this pipeline from "
                                   "a trace (ditlens profile --influence, then ditlens search --trace)")
            self.cfg_rows, self.cfg_layout = 2, "separate_cond_first"
            self.held = _HeldCond(args, kwargs, self.adapter.separate_cfg_output(self.transformer, args, kwargs))
            return _model_output(self.held.output, bool(kwargs.get("return_dict", True)))
        self.cfg_rows = info.batch // P
        pipe_layout = self.adapter.pipeline_cfg_layout(self.pipe)
        if self.cfg_rows == 2:
            if pipe_layout not in ("batched_cond_first", "batched_uncond_first"):
                raise DitlensError(f"pipeline CFG layout {pipe_layout!r} is not batched; plan search needs batched CFG")
            self.cfg_layout = pipe_layout
        else:
            self.cfg_layout = "none"
        return self._run_step(original, args, kwargs, info.batch)

    def _run_step(self, original: Callable, args: tuple, kwargs: dict, batch: int) -> Any:
        """Hand one step's forward (every row of the pipeline's batch) to the controller."""
        self._original_forward = original
        self.micro_batches = self._split(args, kwargs, batch)
        self.block_cache.clear()
        self.kept.clear()
        self.decided = {}
        outputs = self.controller.run_step(self, self.step)
        merged = torch.empty((batch,) + tuple(first_tensor(outputs[0]).shape[1:]),
                             dtype=first_tensor(outputs[0]).dtype, device=first_tensor(outputs[0]).device)
        for mb, out in zip(self.micro_batches, outputs):
            merged[mb.rows.to(merged.device)] = first_tensor(out)
        return _replace_first(outputs[0], merged)

    def _split(self, args: tuple, kwargs: dict, batch: int) -> list[MicroBatch]:
        P, size = len(self.prompts), self.config.micro_batch
        first = "uncond" if self.cfg_layout == "batched_uncond_first" else "cond"
        second = "uncond" if first == "cond" else "cond"
        out = []
        for index, start in enumerate(range(0, P, size)):
            prompts = list(range(start, min(P, start + size)))
            rows = list(prompts)
            branches = [first] * len(prompts)
            if self.cfg_rows == 2:
                rows += [P + p for p in prompts]
                branches += [second] * len(prompts)
                prompts = prompts + prompts
            idx = torch.tensor(rows, dtype=torch.long)
            mb_kwargs = _slice_batch(kwargs, idx, batch)
            if self.text_mask is not None:
                mask = self.text_mask[torch.tensor(prompts, dtype=torch.long)].to(self.device)
                mb_kwargs.update(self.adapter.text_mask_kwargs(mask, self.grid))
            out.append(MicroBatch(index, tuple(prompts), tuple(branches), idx, _slice_batch(args, idx, batch), mb_kwargs))
        return out

    def forward(self, mb: MicroBatch, cfg: PassConfig | None = None) -> Any:
        """One transformer forward of micro-batch ``mb`` under ``cfg``; None when the pass stopped early."""
        cfg = cfg or PassConfig()
        if cfg.rows is not None and not 0 < len(cfg.rows) < len(mb.prompts):
            raise DitlensError(f"a row split must keep some but not all of the micro-batch's {len(mb.prompts)} rows")
        self.mb, self.pass_cfg = mb, cfg
        self.last_block_output = None
        self._split_rows = None if cfg.rows is None else torch.tensor(cfg.rows, dtype=torch.long, device=self.device)
        if not self.config.reuse_blocks:
            self.pass_cfg.skip_before = 0
        self.forward_passes += 1
        try:
            return self._original_forward(*mb.args, **mb.kwargs)
        except _Stop:
            return None
        finally:
            self.mb, self.pass_cfg = None, PassConfig()

    def decide(self, layer: int, methods: Sequence[HeadMethod]) -> None:
        """Fix the methods of ``layer`` at this step (its caches are written from now on). When a
        trial of these methods ran every micro-batch, what it kept for committing is installed."""
        methods = tuple(methods)
        self.decided[layer] = methods
        kept = self.kept.get((layer, methods), {})
        if len(kept) == len(self.micro_batches):
            for mb_index, writes in kept.items():
                for key, idx, values in writes.heads:
                    cache = self.head_cache.get(key)
                    if cache is None:
                        cache = self.head_cache[key] = torch.zeros_like(values)
                    cache[:, idx] = values[:, idx]
                if writes.block is not None:
                    self.block_cache[(mb_index, self.block_of[layer])] = writes.block
        self.kept.clear()
        for h, m in enumerate(methods):
            state = self.head_state[layer][h]
            if m.base == "full" and not m.asc:
                state.refreshed, state.wars_window = True, None
            elif m.base == "wars":
                state.wars_window = m.window

    def _kept_writes(self, layer: int, methods: tuple[HeadMethod, ...]) -> _KeptWrites:
        """This micro-batch's kept writes for a trial of ``methods`` at ``layer``."""
        return self.kept.setdefault((layer, methods), {}).setdefault(self.mb.index, _KeptWrites())  # type: ignore[union-attr]

    def wars_allowed(self, layer: int, head: int, window: int) -> bool:
        state = self.head_state[layer][head]
        return state.refreshed and state.wars_window in (None, window)

    # -- hooks ---------------------------------------------------------------------------------
    def on_block(self, name: str, original: Callable, args: tuple, kwargs: dict) -> Any:
        mb = self.mb
        if mb is None:
            return original(*args, **kwargs)
        key, cfg, last = (mb.index, name), self.pass_cfg, name == self.blocks[-1]
        if self.block_pos[name] < cfg.skip_before and key in self.block_cache:
            if last:
                self.last_block_output = self.block_cache[key]
            return self.block_cache[key]
        self.block_runs += 1
        rows = self._split_rows
        split = rows is not None and self.block_pos[name] >= cfg.rows_from
        if split:
            batch = len(mb.prompts)
            args, kwargs = _slice_batch(args, rows, batch), _slice_batch(kwargs, rows, batch)
            self.block_work += len(rows) / batch
        else:
            self.block_work += 1.0
        out = original(*args, **kwargs)
        if split and last:
            out = _splice_rows(cfg.known_last, out, rows)
        if last:
            self.last_block_output = out
        if self.config.reuse_blocks and not split:
            undecided = [i for i in self.layers_of_block[name] if i not in self.decided]
            if not undecided:
                self.block_cache[key] = out
            elif len(undecided) == 1 and undecided[0] in cfg.trial and len(cfg.trial) == 1:
                i = undecided[0]
                self._kept_writes(i, cfg.trial[i]).block = out
        return out

    def on_layer(self, index: int, original: Callable, args: tuple, kwargs: dict) -> Any:
        from ditlens.analyzer.capture import AttentionInterceptor

        mb, cfg = self.mb, self.pass_cfg
        if mb is None:
            return original(*args, **kwargs)
        if index in cfg.trial:
            methods, commit = cfg.trial[index], False
        elif index in self.decided:
            methods, commit = self.decided[index], True
        else:
            methods, commit = None, False
        observe = cfg.observe == index
        calls = [0]

        def handler(func, q, k, v, call_args, call_kwargs):
            call = calls[0]
            calls[0] += 1
            if observe:
                out = func(*call_args, **call_kwargs)
                self.observer(index, call, func, call_args, call_kwargs, out)  # type: ignore[misc]
                return out
            if methods is None:
                return func(*call_args, **call_kwargs)
            return self.execute(index, call, methods, commit, func, call_args, call_kwargs)

        with AttentionInterceptor(handler):
            out = original(*args, **kwargs)
        if observe:
            raise _Stop()
        return out

    # -- attention -----------------------------------------------------------------------------
    def call_layout(self, index: int, q: torch.Tensor, k: torch.Tensor) -> CallLayout:
        layout = call_layout(self.layers[index], self.grid, q.shape[-2], k.shape[-2])  # type: ignore[arg-type]
        if layout.cross:
            self.n_text = layout.k_len
        elif layout.n_text:
            self.n_text = layout.n_text
        return layout

    def masked(self, func: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: dict,
               kind: str, w: int, layout: CallLayout) -> torch.Tensor:
        """Attention of every head of q/k/v under one mask, combined with the model's own mask."""
        extra = {k_: v_ for k_, v_ in params.items() if k_ not in ("query", "key", "value")}
        model_mask = extra.pop("attn_mask", None)
        if kind == "full":
            return func(q, k, v, attn_mask=model_mask, **extra)
        mask = dense_mask(kind, w, layout, str(q.device))
        if model_mask is not None:
            mask = model_mask & mask if model_mask.dtype == torch.bool else model_mask.masked_fill(~mask, float("-inf"))
        return func(q, k, v, attn_mask=mask, **extra)

    def cfg_halves(self, batch: int) -> tuple[slice, slice] | None:
        """(cond rows, uncond rows) of an attention call's batch, None without CFG."""
        if self.cfg_rows != 2:
            return None
        half = batch // 2
        first, second = slice(0, half), slice(half, batch)
        return (first, second) if self.mb.branches[0] == "cond" else (second, first)  # type: ignore[union-attr]

    def method_output(self, index: int, call: int, method: HeadMethod, func: Callable, params: dict,
                      layout: CallLayout, full: torch.Tensor | None) -> torch.Tensor:
        """Output of every head of one call under ``method`` [B', H, L, D] (NaN where impossible)."""
        q, k, v = params["query"], params["key"], params["value"]
        key = (index, call, self.mb.index)  # type: ignore[union-attr]
        if method.base == "ast":
            cached = self.head_cache.get(key)
            return cached if cached is not None else torch.full_like(full if full is not None else q, float("nan"))
        if method.mask_kind == "full":
            out = full if full is not None else self.masked(func, q, k, v, params, "full", 0, layout)
        else:
            out = self.masked(func, q, k, v, params, method.mask_kind, method.window, layout)
        if method.base == "wars":
            residual = self.residual.get(key + (method.window,))
            out = out + residual if residual is not None else torch.full_like(out, float("nan"))
        if method.asc:
            halves = self.cfg_halves(out.shape[0])
            if halves is None or out.shape[0] % 2:
                return torch.full_like(out, float("nan"))
            out = out.clone()
            out[halves[1]] = out[halves[0]]
        return out

    def execute(self, index: int, call: int, methods: tuple[HeadMethod, ...], commit: bool, func: Callable,
                call_args: tuple, call_kwargs: dict) -> torch.Tensor:
        params = _sdpa_params(call_args, call_kwargs)
        q = params["query"]
        layout = self.call_layout(index, q, params["key"])
        needs_full = any(m.mask_kind == "full" and m.computes for m in methods) or (
            commit and self.config.residual_widths and any(m.base == "full" and not m.asc for m in methods))
        full = func(*call_args, **call_kwargs) if needs_full else None
        out = None
        groups: dict[HeadMethod, list[int]] = {}
        for h, m in enumerate(methods):
            groups.setdefault(m, []).append(h)
        for method, heads in groups.items():
            result = self.method_output(index, call, method, func, params, layout, full)
            if out is None:
                out = torch.empty_like(result)
            idx = torch.tensor(heads, device=result.device)
            out[:, idx] = result[:, idx]
        assert out is not None
        key = (index, call, self.mb.index)  # type: ignore[union-attr]
        computing = [h for h, m in enumerate(methods) if m.computes]
        if not commit and self.config.reuse_blocks and index in self.pass_cfg.trial:
            # kept for decide(): what committing this call would write to the output cache (trial
            # methods never refresh a residual: that is pure full attention)
            writes = self._kept_writes(index, methods)
            if computing:
                writes.heads.append((key, torch.tensor(computing, device=out.device), out))
        if commit:
            if computing:
                idx = torch.tensor(computing, device=out.device)
                cache = self.head_cache.get(key)
                if cache is None:
                    cache = self.head_cache[key] = torch.zeros_like(out)
                cache[:, idx] = out[:, idx]
            refresh = [h for h, m in enumerate(methods) if m.base == "full" and not m.asc]
            if refresh and self.config.residual_widths and layout.k_len == layout.q_len and not layout.cross:
                idx = torch.tensor(refresh, device=out.device)
                for w in self.config.residual_widths:
                    windowed = self.masked(func, params["query"], params["key"], params["value"], params, "window", w, layout)
                    res = self.residual.get(key + (w,))
                    if res is None:
                        res = self.residual[key + (w,)] = torch.zeros_like(out)
                    res[:, idx] = (full - windowed)[:, idx]  # type: ignore[operator]
        return out

    # -- influence -----------------------------------------------------------------------------
    def influence_parts(self, full: torch.Tensor, candidate: torch.Tensor, call: int) -> tuple[np.ndarray, np.ndarray]:
        """Per batch row of the micro-batch: ([rows, H] Σ (O'_h - O_h)², [rows] Σ (O - mean O)²).
        A layer that attends one sample per call (``adapter.attends_per_sample``; its processor walks the
        batch in order, so call ``c`` holds row ``c``) fills row ``call`` and leaves zeros in the others:
        the sums over a forward's calls then give every row once."""
        rows = len(self.mb.prompts)  # type: ignore[union-attr]
        B, H = full.shape[:2]
        if B == 1 and rows > 1 and self.adapter.attends_per_sample:
            err, spread = self._row_parts(full, candidate, 1)
            err_all, spread_all = np.zeros((rows, H)), np.zeros(rows)
            err_all[call], spread_all[call] = err[0], spread[0]
            return err_all, spread_all
        if B % rows:
            raise DitlensError(f"attention call batch {B} is not a multiple of the micro-batch's {rows} rows")
        return self._row_parts(full, candidate, rows)

    @staticmethod
    def _row_parts(full: torch.Tensor, candidate: torch.Tensor, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """``influence_parts`` of a call whose batch holds ``rows`` rows, each B // rows samples long."""
        B, H = full.shape[:2]
        o = full.float().reshape(rows, B // rows, H, -1)
        c = candidate.float().reshape(rows, B // rows, H, -1)
        err = (c - o).pow(2).sum(dim=(1, 3))  # [rows, H]
        centred = o - o.mean(dim=(1, 2, 3), keepdim=True)
        spread = centred.pow(2).sum(dim=(1, 2, 3))
        return err.double().cpu().numpy(), spread.double().cpu().numpy()

    def progress(self, total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, disable=not self.config.progress, leave=False)


def _hook_classes():
    from diffusers.hooks import ModelHook

    class StepHook(ModelHook):
        def __init__(self, engine: SearchEngine) -> None:
            super().__init__()
            self.engine = engine

        def new_forward(self, module, *args, **kwargs):
            return self.engine.on_transformer_forward(self.fn_ref.original_forward, args, kwargs)

    class BlockHook(ModelHook):
        def __init__(self, engine: SearchEngine, name: str) -> None:
            super().__init__()
            self.engine, self.name = engine, name

        def new_forward(self, module, *args, **kwargs):
            return self.engine.on_block(self.name, self.fn_ref.original_forward, args, kwargs)

    class LayerHook(ModelHook):
        def __init__(self, engine: SearchEngine, index: int) -> None:
            super().__init__()
            self.engine, self.index = engine, index

        def new_forward(self, module, *args, **kwargs):
            return self.engine.on_layer(self.index, self.fn_ref.original_forward, args, kwargs)

    return StepHook, BlockHook, LayerHook


def layer_entry(methods: Sequence[HeadMethod]) -> str | list[str]:
    """A plan entry: one string when every head agrees, else one string per head."""
    texts = [m.to_str() for m in methods]
    return texts[0] if len(set(texts)) == 1 else texts


def safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(num > 0, np.inf, 0.0))


__all__ = ["SearchEngine", "EngineConfig", "PassConfig", "MicroBatch", "layer_entry", "first_tensor", "FULL"]
