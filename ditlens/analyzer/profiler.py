"""``ditlens profile``: run a pipeline over prompts with capture hooks and write a trace.

Each prompt is one pipeline call (one image, seed ``seed + prompt index`` so that a resumed
run reproduces an uninterrupted one). Statistics stream on the device; after each prompt they
go to the trace and the file is flushed, so a killed run keeps every finished prompt.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ditlens.analyzer.adapters import AdapterRegistry, AttentionLayer, ModelAdapter, timestep_float, default_registry
from ditlens.analyzer.capture import BRANCHES, ObserverGroup, apply_capture
from ditlens.analyzer.influence import (INFLUENCE_AXES, INFLUENCE_PATH, Candidate, InfluenceRecorder,
                                        default_candidates, parse_candidates)
from ditlens.analyzer.stats import PromptStatistics, RawCapture
from ditlens.errors import DitlensError
from ditlens.traces.format import (CALL_ATTR_PREFIX, TEXT_TOKENS_ATTR, PromptArray, RawSelection, StatKey, TokenInfo,
                                   TraceHeader, all_stat_keys, recorded_stat_keys)


@dataclass
class RawRequest:
    """Which raw tensors to store (DESIGN §3): a subset, never everything by default."""

    tensors: tuple[str, ...] = ("q", "k", "v", "o")
    layers: Sequence[int] | None = None  # None: all
    steps: Sequence[int] | None = None
    heads: Sequence[int] | None = None
    token_stride: int = 1
    max_bytes: int = 1 << 30


@dataclass
class ProfileConfig:
    steps: int = 20
    guidance: float | None = None  # None: the pipeline's default
    height: int | None = None
    width: int | None = None
    seed: int = 0
    raw: RawRequest | None = None
    resume: bool = False
    overwrite: bool = False
    stat_keys: Sequence[StatKey] | None = None  # None: default_stat_keys() (all but ssim)
    influence: bool = False  # record per-head influence of compression candidates (/influence)
    influence_candidates: str | None = None  # e.g. "ast,asc,arrow(64)"; None: defaults for the model
    call_kwargs: dict[str, Any] = field(default_factory=dict)  # passed through to the pipeline
    prompt_offset: int = 0  # global index of the first prompt (seeds: seed + offset + i); set by sharding
    attention_share: bool = True  # time one forward with and without attention first (Amdahl bound)


@dataclass
class ProfileResult:
    path: Path
    n_prompts: int
    n_new: int
    seconds: float
    seconds_per_prompt: list[float]


def default_stat_keys() -> list[StatKey]:
    """Every statistic of DESIGN §3 except SSIM: on the H100 SSIM costs more than the model's own
    step (benchmarks/profile_overhead.py), so it is recorded only when asked (``--metrics all``)."""
    return [k for k in all_stat_keys() if k[3] != "ssim"]


def select_stat_keys(metrics: str | Sequence[str] | None = None, tensors: str | Sequence[str] | None = None
                     ) -> list[StatKey] | None:
    """The statistics to record for a metric and tensor subset (None: the defaults; "all": every metric)."""
    if metrics is None and tensors is None:
        return None
    split = lambda v: [x.strip() for x in v.split(",") if x.strip()] if isinstance(v, str) else list(v)
    keys = all_stat_keys()
    if metrics is None:
        metrics = sorted({k[3] for k in default_stat_keys()})
    elif metrics == "all":
        metrics = sorted({k[3] for k in keys})
    wanted_m = set(split(metrics))
    wanted_t = set(split(tensors)) if tensors is not None else {k[1] for k in keys}
    bad = (wanted_m - {k[3] for k in keys}) | (wanted_t - {k[1] for k in keys})
    if bad or not wanted_m or not wanted_t:
        raise DitlensError(f"unknown or empty --metrics/--tensors {sorted(bad)}: metrics are l1,rel_l1,cosine,ssim; "
                           "tensors q,k,v,o")
    return [k for k in keys if k[3] in wanted_m and k[1] in wanted_t]


def _resolve_indices(selected: Sequence[int] | None, size: int, what: str) -> tuple[int, ...]:
    if selected is None:
        return tuple(range(size))
    if not selected:
        raise DitlensError(f"--raw-{what} selects nothing; give indices like 0,2,5-7 or leave it out for all")
    bad = [i for i in selected if not 0 <= i < size]
    if bad:
        raise DitlensError(f"--raw-{what} {bad} out of range: the model has {size} {what} (0..{size - 1})")
    return tuple(sorted(set(int(i) for i in selected)))


def _check_raw_cap(need: int, cap: int, qualifier: str = "") -> None:
    if need > cap:
        raise DitlensError(f"raw capture needs {qualifier}{_human(need)}, over --max-raw-bytes {_human(cap)}: "
                           "narrow --raw-layers/--raw-steps/--raw-heads, raise --token-stride, or raise the cap")


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


@dataclass
class PromptRecord:
    """What one prompt produced, on the host."""

    stats: dict[StatKey, np.ndarray]
    raw: dict[str, np.ndarray] | None
    raw_selection: RawSelection | None
    timesteps: list[float]
    branches: list[str]
    grid: tuple[int, int, int]
    n_text: int
    influence: np.ndarray | None = None


class Profiler:
    """Runs prompts through a pipeline under capture hooks (the engine behind :func:`profile`)."""

    def __init__(self, pipeline: Any, config: ProfileConfig, *, registry: AdapterRegistry | None = None,
                 model_id: str = "") -> None:
        self.pipeline = pipeline
        self.config = config
        transformer = getattr(pipeline, "transformer", None)
        if transformer is None:
            raise DitlensError(f"{type(pipeline).__name__} has no .transformer; ditlens profiles diffusers DiT pipelines")
        self.transformer = transformer
        self.adapter: ModelAdapter = (registry or default_registry()).find(transformer)
        self.layers: list[AttentionLayer] = self.adapter.attention_layers(transformer)
        if not self.layers:
            raise DitlensError(f"no attention modules found in {type(transformer).__name__}")
        self.n_heads, self.head_dim = self.adapter.heads(transformer)
        self.cfg_layout = self.adapter.pipeline_cfg_layout(pipeline)
        self.model_id = model_id or str(getattr(transformer.config, "_name_or_path", "") or type(transformer).__name__)
        self.stat_keys = list(config.stat_keys or default_stat_keys())
        self.raw_tokens: int | None = None  # fixed by the first prompt
        self.share: Any = None  # AttentionShare, measured before the first prompt
        self.last_call: dict[str, Any] = {}
        self._candidates: list[Candidate] | None = None

    def _raw_capture(self) -> RawCapture | None:
        request = self.config.raw
        if request is None:
            return None
        if request.token_stride < 1:
            raise DitlensError(f"--token-stride must be >= 1, got {request.token_stride}")
        bad = [t for t in request.tensors if t not in ("q", "k", "v", "o")]
        if bad or not request.tensors:
            raise DitlensError(f"--raw takes a comma-separated subset of q,k,v,o; got {','.join(request.tensors)}")
        return RawCapture(
            tuple(request.tensors),
            _resolve_indices(request.steps, self.config.steps, "steps"),
            _resolve_indices(request.layers, len(self.layers), "layers"),
            _resolve_indices(request.heads, self.n_heads, "heads"),
            self.head_dim, request.token_stride, self.raw_tokens,
        )

    def run_prompt(self, index: int, prompt: str) -> PromptRecord:
        cfg = self.config
        raw = self._raw_capture()
        stats = PromptStatistics(self.stat_keys, cfg.steps, len(self.layers), self.n_heads, raw=raw)
        influence = None
        if cfg.influence:
            influence = InfluenceRecorder(self.layers, self.influence_candidates(), cfg.steps, self.n_heads)
        device = torch.device(getattr(self.pipeline, "_execution_device", None) or self.transformer.device)
        generator = torch.Generator(device="cpu" if device.type == "mps" else device.type)
        generator.manual_seed(cfg.seed + cfg.prompt_offset + index)
        kwargs = self.adapter.call_kwargs(self.pipeline, prompt, cfg.steps, cfg.guidance, cfg.height, cfg.width, generator)
        kwargs.update(cfg.call_kwargs)
        per_prompt = ("prompt", "negative_prompt", "class_labels", "generator")
        self.last_call = {k: v for k, v in kwargs.items()
                          if isinstance(v, (int, float, str, bool)) and k not in per_prompt}
        handle = apply_capture(self.transformer, self.adapter, ObserverGroup(stats, influence), cfg_layout=self.cfg_layout, max_steps=cfg.steps,
                               layers=self.layers, scheduler=getattr(self.pipeline, "scheduler", None))
        try:
            with torch.inference_mode():
                self.pipeline(**kwargs)
        finally:
            handle.remove()
        ran = handle.tracker.step + 1
        if ran != cfg.steps:
            raise DitlensError(f"the pipeline ran {ran} denoising steps, not --steps {cfg.steps}; pass the count it really runs")
        branches = [b for b in BRANCHES if b in stats.branches_seen]
        selection, raw_data = raw.finish(branches, stats.n_text) if raw is not None else (None, None)
        if selection is not None and self.raw_tokens is None:
            self.raw_tokens = raw.n_image + stats.n_text
        if influence is not None and self._candidates is None:
            self._candidates = influence.candidates
        return PromptRecord(stats.finish(branches), raw_data, selection, self._timesteps(handle.tracker.timesteps),
                            branches, stats.grid, stats.n_text,
                            influence.finish(branches) if influence is not None else None)

    def use_candidates(self, candidates: list[Candidate]) -> None:
        """Record the influence of these candidates (a resumed trace's own list)."""
        self._candidates = list(candidates)

    def influence_candidates(self) -> list[Candidate] | Callable[[int], list[Candidate]]:
        """The candidates of ``--influence``: as given, else the defaults for the model's image
        token count (resolved at the first layer of the first prompt, then fixed)."""
        if self._candidates is not None:
            return self._candidates
        if self.config.influence_candidates:
            chosen = parse_candidates(self.config.influence_candidates)
            if self.adapter.attends_per_sample and any(c.method == "asc" for c in chosen):
                raise DitlensError(f"{self.adapter.family} attends one sample per attention call, so CFG share (asc) "
                                   "cannot run on it; drop asc from the influence candidates")
            return chosen
        joint = any(layer.kind == "joint" for layer in self.layers)
        has_cfg_share = self.cfg_layout != "none" and not self.adapter.attends_per_sample
        return lambda n_image: default_candidates(n_image, joint, has_cfg_share)

    def _timesteps(self, seen: list[Any]) -> list[float]:
        """The scheduler's timestep values where it exposes them, else what the transformer saw
        (read back from the device once per prompt)."""
        scheduler_steps = getattr(getattr(self.pipeline, "scheduler", None), "timesteps", None)
        if scheduler_steps is not None and len(scheduler_steps) == len(seen):
            return [float(t) for t in scheduler_steps]
        return [timestep_float(t) for t in seen]

    def _effective(self, name: str, given: float | None) -> float:
        """The value a pipeline argument really had: given, passed through, or its default."""
        if name in self.last_call:
            return float(self.last_call[name])
        if given is not None:
            return float(given)
        default = inspect.signature(self.pipeline.__call__).parameters.get(name)
        if default is not None and isinstance(default.default, (int, float)):
            return float(default.default)
        return 1.0

    def header(self, prompts: list[str], record: PromptRecord) -> TraceHeader:
        cfg = self.config
        joint = any(layer.kind == "joint" for layer in self.layers)
        n_image = record.grid[0] * record.grid[1] * record.grid[2]
        guidance = self._effective("guidance_scale", cfg.guidance)
        per_token = self.adapter.pixels_per_token(self.transformer, self.pipeline)
        height = int(cfg.height or record.grid[1] * per_token)
        width = int(cfg.width or record.grid[2] * per_token)
        return TraceHeader(
            model_id=self.model_id, family=self.adapter.family,
            transformer_class=type(self.transformer).__name__, pipeline_class=type(self.pipeline).__name__,
            steps=cfg.steps, guidance_scale=float(guidance), height=height, width=width,
            seed=cfg.seed, cfg_layout=self.cfg_layout if "uncond" in record.branches else "none",
            prompts=list(prompts), layers=[layer.name for layer in self.layers], branches=list(record.branches),
            n_heads=self.n_heads, head_dim=self.head_dim,
            tokens=TokenInfo(n_image=n_image, n_text=record.n_text,
                             text_position=self.adapter.text_position if joint else "none", grid=tuple(record.grid)),
            extra={"layer_kinds": ",".join(layer.kind for layer in self.layers),
                   **({"influence_candidates": ",".join(c.label for c in self._candidates),
                      "influence_trajectory": "uncompressed"} if self._candidates else {}),
                   **({"attention_share": self.share.share, "forward_seconds": self.share.step_seconds}
                      if self.share is not None else {}),
                   **({TEXT_TOKENS_ATTR: "per_prompt"} if self.adapter.text_tokens_per_prompt else {}),
                   "prompt_offset": int(cfg.prompt_offset),
                   **{f"{CALL_ATTR_PREFIX}{k}": v for k, v in self.last_call.items() if k != "guidance_scale"}},
        )


def _check_resume(trace: Any, profiler: Profiler, prompts: list[str], capture: RawCapture | None) -> None:
    """Refuse to resume a trace of another model, run or recording, naming the field or option
    (before any compute)."""
    existing: TraceHeader = trace.header
    cfg = profiler.config
    checks = {
        "model_id": (existing.model_id, profiler.model_id),
        "family": (existing.family, profiler.adapter.family),
        "steps": (existing.steps, cfg.steps),
        "seed": (existing.seed, cfg.seed),
        "layers": (list(existing.layers), [layer.name for layer in profiler.layers]),
        "prompt_offset": (int(existing.extra.get("prompt_offset", cfg.prompt_offset)), cfg.prompt_offset),
        **{f"{CALL_ATTR_PREFIX}{k}": (existing.extra[f"{CALL_ATTR_PREFIX}{k}"], v) for k, v in cfg.call_kwargs.items()
           if f"{CALL_ATTR_PREFIX}{k}" in existing.extra},
    }
    for field_name, (old, new) in checks.items():
        if old != new:
            raise DitlensError(f"cannot resume: the trace has {field_name}={old!r} but this run has {new!r}")
    done = list(existing.prompts[:len(existing.prompts)])
    for i, (old, new) in enumerate(zip(done, prompts)):
        if old != new:
            raise DitlensError(f"cannot resume: prompt {i} in the trace is {old!r} but this run has {new!r}")
    _check_resume_recording(trace, profiler, capture)


def _check_resume_recording(trace: Any, profiler: Profiler, capture: RawCapture | None) -> None:
    """What the trace records per prompt (statistics, influence, raw tensors) must be recorded the
    same way for the rest: refuse other options, naming them. Influence candidates the run does not
    name are the trace's. ``capture``: this run's raw selection (``Profiler._raw_capture``)."""
    existing: TraceHeader = trace.header
    cfg = profiler.config
    want = recorded_stat_keys(profiler.stat_keys, existing.branches, existing.tokens.n_text)
    have = trace.filled_stat_keys()  # not the all-NaN keys of a trace from before recorded_stat_keys
    if sorted(want) != sorted(have):
        def names(keys: list) -> str:
            return ",".join(sorted({k[3] for k in keys})) + " of " + ",".join(sorted({k[1] for k in keys}))

        raise DitlensError(f"cannot resume: the trace records {names(have)} but this run asks for {names(want)}; "
                           "pass the --metrics and --tensors of the first run")
    recorded_influence = INFLUENCE_PATH in trace.prompt_arrays()
    if recorded_influence != bool(cfg.influence):
        raise DitlensError("cannot resume: the trace " + ("records" if recorded_influence else "has no") +
                           " per-head influence; " + ("pass --influence" if recorded_influence else "drop --influence"))
    if recorded_influence:
        labels = str(existing.extra.get("influence_candidates", ""))
        if cfg.influence_candidates and [c.label for c in parse_candidates(cfg.influence_candidates)] != labels.split(","):
            raise DitlensError(f"cannot resume: the trace's influence candidates are {labels}, not "
                               f"{cfg.influence_candidates}; pass those or drop --influence-candidates")
        profiler.use_candidates(parse_candidates(labels))
    raw = trace.raw_selection()
    if (raw is None) != (capture is None):
        raise DitlensError("cannot resume: the trace " + ("has no" if raw is None else "records") + " raw tensors; " +
                           ("drop --raw" if raw is None else f"pass --raw {','.join(raw.tensors)} and its selection"))
    if raw is not None and capture is not None:
        def selection(s: Any) -> tuple:
            return (tuple(t for t in ("q", "k", "v", "o") if t in s.tensors), tuple(s.steps), tuple(s.layers),
                    tuple(s.heads))

        stride = raw.tokens[1] - raw.tokens[0] if len(raw.tokens) > 1 else capture.stride
        if selection(capture) != selection(raw) or stride != capture.stride:
            raise DitlensError("cannot resume: the trace's raw selection differs from this run's; pass the --raw, "
                               "--raw-steps, --raw-layers, --raw-heads and --token-stride of the first run")


def profile(pipeline: Any, prompts: Sequence[str], out: str | Path, config: ProfileConfig | None = None, *,
            registry: AdapterRegistry | None = None, model_id: str = "", progress: bool = True,
            log: Callable[[str], None] = print) -> ProfileResult:
    """Profile ``pipeline`` on ``prompts`` into the trace ``out`` (DESIGN §3).

    Args:
        pipeline: a diffusers pipeline whose ``.transformer`` an adapter recognises.
        prompts: text prompts, or class labels (ints or names) for class-conditional models.
        out: trace path; refused if it exists unless ``config.overwrite`` or ``config.resume``.
        config: steps, guidance, size, seed, raw selection, resume.
        registry: adapters to choose from (default: built-ins and installed plug-ins).

    Under ``torch.distributed`` (e.g. ``torchrun --nproc-per-node N -m ditlens profile ...``) the
    prompts are split into contiguous shards, one per rank; each rank writes
    ``<out>.rank<r>of<N>.h5`` and rank 0 merges them into ``out``, equal to a single-process run
    of the same prompts (prompt i keeps seed + i).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return _profile_sharded(pipeline, list(prompts), Path(out), config or ProfileConfig(), registry=registry,
                                model_id=model_id, progress=progress, log=log)
    return _profile_local(pipeline, prompts, out, config, registry=registry, model_id=model_id, progress=progress,
                          log=log)


def shard_path(out: Path, rank: int, world: int) -> Path:
    return out.with_name(f"{out.stem}.rank{rank}of{world}{out.suffix}")


def _profile_sharded(pipeline: Any, prompts: list[str], out: Path, config: ProfileConfig, *, registry, model_id,
                     progress, log) -> ProfileResult:
    import dataclasses

    import torch.distributed as dist

    from ditlens.traces.merge import merge_traces

    rank, world = dist.get_rank(), dist.get_world_size()
    bounds = [round(i * len(prompts) / world) for i in range(world + 1)]
    start, stop = bounds[rank], bounds[rank + 1]
    if out.exists() and not (config.overwrite or config.resume):
        raise DitlensError(f"{out} already exists: pass --resume to continue it or --overwrite to replace it")
    t0 = time.perf_counter()
    result = None
    failure = None
    if stop > start:
        try:
            result = _profile_local(pipeline, prompts[start:stop], shard_path(out, rank, world),
                                    dataclasses.replace(config, prompt_offset=config.prompt_offset + start),
                                    registry=registry, model_id=model_id, progress=progress and rank == 0,
                                    log=log if rank == 0 else (lambda s: None))
        except DitlensError as err:
            failure = str(err)
    failures = [None] * world
    dist.all_gather_object(failures, failure)
    bad = [(r, f) for r, f in enumerate(failures) if f]
    if bad:
        raise DitlensError(f"rank {bad[0][0]} failed: {bad[0][1]}; finished shards are kept, rerun with --resume")
    shards = [shard_path(out, r, world) for r in range(world) if bounds[r + 1] > bounds[r]]
    if rank == 0:
        merge_traces(shards, out, overwrite=True)
        for shard in shards:
            shard.unlink()
        log(f"merged {len(shards)} shards into {out}")
    dist.barrier()
    n_new = result.n_new if result is not None else 0
    return ProfileResult(out, len(prompts), n_new, time.perf_counter() - t0,
                         result.seconds_per_prompt if result is not None else [])


def _profile_local(pipeline: Any, prompts: Sequence[str], out: str | Path, config: ProfileConfig | None = None, *,
                   registry: AdapterRegistry | None = None, model_id: str = "", progress: bool = True,
                   log: Callable[[str], None] = print) -> ProfileResult:
    from tqdm.auto import tqdm

    from ditlens.traces.reader import Trace
    from ditlens.traces.writer import TraceWriter, check_can_write

    config = config or ProfileConfig()
    prompts = [str(p) for p in prompts]
    if not prompts:
        raise DitlensError("no prompts given: pass --prompt (repeatable) or --prompts-file")
    out = Path(out)
    check_can_write(out)
    profiler = Profiler(pipeline, config, registry=registry, model_id=model_id)
    capture = profiler._raw_capture()  # a bad --raw or --token-stride is refused before any compute
    resuming = config.resume and out.exists()
    start = 0
    if resuming:
        with Trace.open(out) as existing:
            start = existing.n_done
            _check_resume(existing, profiler, prompts, capture)
            if existing.has("/raw/index/token"):
                profiler.raw_tokens = int(existing.tokens.n_image + existing.tokens.n_text)
        log(f"resuming {out}: {start} of {len(prompts)} prompts already done")
    elif out.exists() and not config.overwrite:
        raise DitlensError(f"{out} already exists: pass --resume to continue it or --overwrite to replace it")
    if capture is not None and config.height and config.width:
        grid = profiler.adapter.grid_for_size(profiler.transformer, config.height, config.width, pipeline=pipeline)
        estimate = RawSelection(capture.tensors, capture.steps, capture.layers, capture.heads,
                                tuple(range(0, grid[0] * grid[1] * grid[2], capture.stride)), profiler.head_dim)
        log(f"raw capture estimate (image tokens, two CFG branches): {_human(estimate.nbytes(len(prompts), 2))} "
            f"for {len(prompts)} prompts (cap {_human(config.raw.max_bytes)})")
        _check_raw_cap(estimate.nbytes(len(prompts), 1), config.raw.max_bytes, "at least ")  # one branch, no text

    if config.attention_share and start < len(prompts):
        from ditlens.analyzer.amdahl import measure_attention_share

        device = torch.device(getattr(pipeline, "_execution_device", None) or profiler.transformer.device)
        generator = torch.Generator(device="cpu" if device.type == "mps" else device.type).manual_seed(config.seed)
        kwargs = profiler.adapter.call_kwargs(pipeline, prompts[start], config.steps, config.guidance, config.height,
                                              config.width, generator)
        profiler.share = measure_attention_share(pipeline, {**kwargs, **config.call_kwargs})
        log(profiler.share.describe())

    writer = None
    per_prompt: list[float] = []
    t0 = time.perf_counter()
    bar = tqdm(total=len(prompts), initial=start, desc="profile", unit="prompt", disable=not progress)
    try:
        for index in range(start, len(prompts)):
            t_prompt = time.perf_counter()
            record = profiler.run_prompt(index, prompts[index])
            if writer is None:
                if record.raw_selection is not None:
                    need = record.raw_selection.nbytes(len(prompts), len(record.branches))
                    log(f"raw capture: {_human(need)} for {len(prompts)} prompts")
                    _check_raw_cap(need, config.raw.max_bytes)
                header = profiler.header(prompts, record)
                keys = recorded_stat_keys(profiler.stat_keys, record.branches, record.n_text)
                arrays = []
                if record.influence is not None:
                    arrays.append(PromptArray(INFLUENCE_PATH, INFLUENCE_AXES, record.influence.shape))
                writer = (TraceWriter.resume(out, header) if resuming else
                          TraceWriter.create(out, header, keys, record.raw_selection, overwrite=config.overwrite,
                                             prompt_arrays=arrays))
                # a resumed trace's own keys: one from before recorded_stat_keys may hold all-NaN ones too
                written = set(writer.stat_keys)
            stats = {k: v for k, v in record.stats.items() if k in written}
            extra_arrays = {INFLUENCE_PATH: record.influence} if record.influence is not None else None
            writer.write_prompt(index, np.asarray(record.timesteps, dtype=np.float64), stats, record.raw, extra_arrays)
            per_prompt.append(time.perf_counter() - t_prompt)
            bar.update(1)
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    return ProfileResult(out, len(prompts), len(per_prompt), time.perf_counter() - t0, per_prompt)
