"""Compression plans: JSON schema v1 (DESIGN §6), load-time checks, hand-made plans.

A plan is human-readable JSON (never pickle)::

    {"format": "ditlens.plan", "schema_version": 1,
     "model": {...fingerprint...}, "run": {...}, "provenance": {...}, "flops": {...},
     "methods": [[ "full", "wars(8)+asc", ["ast", "full", "arrow(16)", ...], ... ], ...]}

``methods[step][layer]`` is one method string for the whole layer or a list with one method per
head (see :mod:`ditlens.compress.methods`). A whole-layer ``"ast"`` skips the attention module
(projections included) and returns the module output cached at the latest step it ran; a
per-head ``"ast"`` reuses that head's attention output (projections still run).

:meth:`Plan.check_structure` refuses plans that cannot run (WA-RS with no earlier full step,
AST at step 0, ASC without CFG, windows on cross attention ...). :meth:`Plan.check_model`
refuses a plan made for another model; the runtime refuses another resolution, step count or
CFG layout on the first forward. Every refusal is a one-line :class:`PlanMismatchError` that
names the field.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Iterator, Union

from ditlens.compress.methods import WINDOWED, HeadMethod, parse_method, widest_window
from ditlens.errors import DitlensError, PlanMismatchError

SCHEMA_VERSION = 1
PLAN_FORMAT = "ditlens.plan"
CFG_LAYOUTS = ("batched_cond_first", "batched_uncond_first", "separate_cond_first", "none")
LayerMethod = Union[str, list[str]]


def load_schema() -> dict[str, Any]:
    """The JSON Schema of plan version 1, shipped in the package."""
    text = resources.files("ditlens.compress").joinpath("plan_schema_v1.json").read_text(encoding="utf-8")
    return json.loads(text)


@dataclass(frozen=True)
class LayerInfo:
    name: str
    kind: str  # self, cross, joint, temporal
    text_position: str = "none"


@dataclass(frozen=True)
class TokenInfo:
    n_image: int | None
    n_text: int | None
    text_position: str
    grid: tuple[int, int, int] | None


@dataclass(frozen=True)
class ModelFingerprint:
    family: str
    transformer_class: str
    config_hash: str
    layers: tuple[LayerInfo, ...]
    heads: int
    head_dim: int
    tokens: TokenInfo


@dataclass(frozen=True)
class RunSpec:
    steps: int
    scheduler: str
    guidance: float | None
    height: int | None
    width: int | None
    frames: int | None
    cfg_layout: str
    timesteps: tuple[float, ...] | None = None


@dataclass
class Provenance:
    search: str = "uniform"
    metric: str | None = None
    delta: float | None = None
    c: float | None = None
    windows: list[int] = field(default_factory=list)
    calibration_prompts: list[str] = field(default_factory=list)
    ditlens_version: str = ""
    created: str = ""
    notes: str = ""

    def add_note(self, note: str) -> None:
        """Append ``note`` to ``notes`` ("; "-separated)."""
        self.notes = f"{self.notes}; {note}" if self.notes else note


@dataclass
class FlopsSummary:
    attention_core_fraction: float
    attention_module_fraction: float | None
    source: str  # "static" (from the plan and the fingerprint) or "measured" (from a run)


def config_hash(config: Any) -> str:
    """sha256 (first 32 hex) of the transformer config without diffusers' private keys (paths, versions)."""
    items = {k: v for k, v in dict(config).items() if not str(k).startswith("_")}
    text = json.dumps(items, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def model_fingerprint(transformer: Any, adapter: Any, *, grid: tuple[int, int, int] | None = None,
                      n_text: int | None = None) -> ModelFingerprint:
    """Fingerprint of a transformer through its ditlens adapter (tokens: grid and text length when known)."""
    layers = tuple(LayerInfo(l.name, l.kind, l.text_position) for l in adapter.attention_layers(transformer))
    heads, head_dim = adapter.heads(transformer)
    text_position = adapter.text_position if any(l.kind == "joint" for l in layers) else "none"
    if not any(l.kind in ("joint", "cross") for l in layers):
        n_text = 0
    n_image = grid[0] * grid[1] * grid[2] if grid else None
    return ModelFingerprint(adapter.family, type(transformer).__name__, config_hash(transformer.config), layers,
                            int(heads), int(head_dim), TokenInfo(n_image, n_text, text_position, grid))


@dataclass
class Plan:
    """A compression plan: which method runs at every (step, layer[, head])."""

    model: ModelFingerprint
    run: RunSpec
    methods: list[list[LayerMethod]]
    provenance: Provenance = field(default_factory=Provenance)
    flops: FlopsSummary | None = None

    # -- access --------------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        return self.run.steps

    @property
    def n_layers(self) -> int:
        return len(self.model.layers)

    def layer_method(self, step: int, layer: int) -> LayerMethod:
        return self.methods[step][layer]

    def head_methods(self, step: int, layer: int) -> tuple[HeadMethod, ...]:
        """One parsed method per head (a whole-layer method broadcast to every head)."""
        entry = self.methods[step][layer]
        if isinstance(entry, str):
            return (parse_method(entry),) * self.model.heads
        return tuple(parse_method(m) for m in entry)

    def skips_module(self, step: int, layer: int) -> bool:
        """A whole-layer ``ast`` skips the attention module, projections included."""
        entry = self.methods[step][layer]
        return isinstance(entry, str) and parse_method(entry).base == "ast"

    def set(self, step: int, layer: int, method: LayerMethod | HeadMethod) -> "Plan":
        """Set one entry (string, HeadMethod or per-head list); returns self for chaining. Call
        :meth:`check_structure` (or save) afterwards."""
        if isinstance(method, HeadMethod):
            method = method.to_str()
        self.methods[step][layer] = list(method) if not isinstance(method, str) else method
        self.flops = None
        return self

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def uniform(cls, pipe: Any, steps: int, method: str = "full", *, at_steps: Iterable[int] | None = None,
                layers: Iterable[int] | None = None, heads: Iterable[int] | None = None,
                height: int | None = None, width: int | None = None, frames: int | None = None,
                guidance: float | None = None, cfg_layout: str | None = None, n_text: int | None = None,
                grid: tuple[int, int, int] | None = None, registry: Any = None, notes: str = "") -> "Plan":
        """A hand-made plan for ``pipe``: ``method`` at ``at_steps`` x ``layers`` (x ``heads``), full elsewhere.

        Defaults: every layer where ``method`` is defined (no windows on cross attention, no
        window2d on temporal attention); every step for stateless methods, steps 1..T-1 for
        ``ast`` and ``wars`` (step 0 must compute). ``heads`` given: a per-head entry with
        ``method`` on those heads and ``full`` on the others. ``grid`` (frames, rows, cols in
        tokens) defaults to what the adapter computes for ``height`` x ``width``; ``n_text`` (text
        tokens of joint/cross attention) makes the static FLOPs fractions exact. Examples::

            Plan.uniform(pipe, 20)                                   # all full
            Plan.uniform(pipe, 20, "ast", at_steps=range(1, 20, 2))  # AST every 2nd step
            Plan.uniform(pipe, 20, "window(8)")                      # a window everywhere
            Plan.uniform(pipe, 20, "wars(8)+asc", at_steps=range(1, 20))
        """
        from ditlens import __version__
        from ditlens.analyzer.adapters import default_registry

        adapter = (registry or default_registry()).find(pipe.transformer)
        if grid is None and height is not None and width is not None:
            grid = adapter.grid_for_size(pipe.transformer, height, width, frames or 1, pipeline=pipe)
        model = model_fingerprint(pipe.transformer, adapter, grid=grid, n_text=n_text)
        if cfg_layout is None:
            pipe_layout = adapter.pipeline_cfg_layout(pipe)
            cfg_layout = pipe_layout if (guidance is None or guidance > 1) and adapter.family != "flux" else "none"
        run = RunSpec(int(steps), type(pipe.scheduler).__name__, guidance, height, width, frames, cfg_layout)
        parsed = parse_method(method)
        if at_steps is None:
            at_steps = range(1, steps) if parsed.base in ("ast", "wars") else range(steps)
        step_set = set(at_steps)
        explicit_layers = layers is not None
        layer_set = set(layers) if layers is not None else set(range(len(model.layers)))
        head_list = sorted(set(heads)) if heads is not None else None
        methods: list[list[LayerMethod]] = []
        for s in range(steps):
            row: list[LayerMethod] = []
            for i, layer in enumerate(model.layers):
                wanted = s in step_set and i in layer_set and (explicit_layers or _defined_on(parsed, layer.kind))
                if not wanted:
                    row.append("full")
                elif head_list is None:
                    row.append(parsed.to_str())
                else:
                    row.append([parsed.to_str() if h in head_list else "full" for h in range(model.heads)])
            methods.append(row)
        provenance = Provenance(search="uniform", ditlens_version=__version__, created=_now(),
                                windows=[parsed.window] if parsed.base in WINDOWED else [], notes=notes)
        plan = cls(model, run, methods, provenance)
        plan.check_structure()
        plan.flops = static_flops_summary(plan)
        return plan

    # -- JSON ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        model = asdict(self.model)
        model["layers"] = [asdict(l) for l in self.model.layers]
        model["tokens"]["grid"] = list(self.model.tokens.grid) if self.model.tokens.grid else None
        run = asdict(self.run)
        run["timesteps"] = list(self.run.timesteps) if self.run.timesteps is not None else None
        return {
            "format": PLAN_FORMAT,
            "schema_version": SCHEMA_VERSION,
            "model": model,
            "run": run,
            "provenance": asdict(self.provenance),
            "flops": asdict(self.flops) if self.flops else None,
            "methods": [[m if isinstance(m, str) else list(m) for m in row] for row in self.methods],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=False)

    def save(self, path: str | Path) -> Path:
        self.check_structure()
        path = Path(path)
        path.write_text(self.to_json() + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_dict(cls, data: Any) -> "Plan":
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise PlanMismatchError("not a ditlens plan (field 'format' is not 'ditlens.plan')")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            newer = isinstance(version, int) and version > SCHEMA_VERSION
            raise PlanMismatchError(
                f"plan schema_version {version!r} is not supported (this ditlens reads version {SCHEMA_VERSION})"
                + ("; upgrade ditlens" if newer else ""))
        _schema_check(data)
        m, r = data["model"], data["run"]
        tokens = m["tokens"]
        model = ModelFingerprint(
            m["family"], m["transformer_class"], m["config_hash"],
            tuple(LayerInfo(l["name"], l["kind"], l["text_position"]) for l in m["layers"]),
            int(m["heads"]), int(m["head_dim"]),
            TokenInfo(tokens["n_image"], tokens["n_text"], tokens["text_position"],
                      tuple(tokens["grid"]) if tokens["grid"] else None))
        timesteps = r.get("timesteps")
        run = RunSpec(int(r["steps"]), r["scheduler"], r["guidance"], r["height"], r["width"], r["frames"],
                      r["cfg_layout"], tuple(float(t) for t in timesteps) if timesteps is not None else None)
        prov = Provenance(**{k: v for k, v in data["provenance"].items() if k in Provenance.__dataclass_fields__})
        flops = FlopsSummary(**data["flops"]) if data.get("flops") else None
        plan = cls(model, run, [list(row) for row in data["methods"]], prov, flops)
        plan.check_structure()
        return plan

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise PlanMismatchError(f"plan is not valid JSON ({err.msg} at line {err.lineno}); is it a ditlens plan?") from None
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        if not path.is_file():
            raise DitlensError(f"plan file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise PlanMismatchError(f"{path} is not a text JSON plan (pickled plans are not supported)") from None
        try:
            return cls.from_json(text)
        except PlanMismatchError as err:  # name the file: a command may read several plans
            raise PlanMismatchError(f"{path}: {err}") from None

    # -- checks --------------------------------------------------------------------------------
    def check_structure(self) -> None:
        """Refuse plans that cannot run, naming the entry (methods[step][layer]) and the reason."""
        run, model = self.run, self.model
        if run.cfg_layout not in CFG_LAYOUTS:
            raise PlanMismatchError(f"run.cfg_layout {run.cfg_layout!r} is not one of {', '.join(CFG_LAYOUTS)}")
        if len(self.methods) != run.steps:
            raise PlanMismatchError(f"plan has methods for {len(self.methods)} steps but run.steps is {run.steps}")
        if run.timesteps is not None and len(run.timesteps) != run.steps:
            raise PlanMismatchError(f"run.timesteps has {len(run.timesteps)} entries but run.steps is {run.steps}")
        n_layers, heads = len(model.layers), model.heads
        for s, row in enumerate(self.methods):
            if len(row) != n_layers:
                raise PlanMismatchError(f"methods[{s}] has {len(row)} layers but the model fingerprint lists {n_layers}")
            for i, entry in enumerate(row):
                where = f"methods[{s}][{i}] ({model.layers[i].name})"
                if not isinstance(entry, str):
                    if len(entry) != heads:
                        raise PlanMismatchError(f"{where} lists {len(entry)} head methods but the model has {heads} heads")
                try:
                    parsed = self.head_methods(s, i)
                except DitlensError as err:
                    raise PlanMismatchError(f"{where}: {err}") from None
                kind = model.layers[i].kind
                for h, method in enumerate(parsed):
                    if not _defined_on(method, kind):
                        raise PlanMismatchError(f"{where}: {method.to_str()} is not defined on {kind} attention")
                    if method.asc and run.cfg_layout == "none":
                        raise PlanMismatchError(
                            f"{where}: ASC shares the cond output with the uncond branch, but run.cfg_layout is "
                            "'none' (no CFG); remove +asc or make the plan for a run with guidance > 1")
                    if s == 0 and method.base == "ast":
                        raise PlanMismatchError(f"{where}: AST at step 0 has no earlier output to reuse")
        self._check_residuals()
        if model.tokens.grid is not None:
            self.check_windows(tuple(model.tokens.grid))

    def check_windows(self, grid: tuple[int, int, int]) -> None:
        """Refuse a window wider than the sequence its layer attends over on ``grid`` (frames, rows,
        cols): it keeps every pair, so it is full attention under another name, and most often a plan
        written for another resolution or layer kind. The runtime calls this on the first forward of a
        plan made without a grid."""
        from ditlens.compress.flops import layer_sequences

        for i, layer in enumerate(self.model.layers):
            layout = layer_sequences(layer, grid, 0).layout
            seen: set[str] = set()
            for s in range(self.steps):
                entry = self.methods[s][i]
                for text in ([entry] if isinstance(entry, str) else entry):
                    if text in seen:
                        continue
                    seen.add(text)
                    method = parse_method(text)
                    if method.base not in WINDOWED:
                        continue
                    widest = widest_window(method.mask_kind, layout)
                    if method.window > widest:
                        extent = (f"a {layout.grid[1]}x{layout.grid[2]} token grid" if method.mask_kind == "window2d"
                                  and layout.grid else f"{layout.n_image} image tokens")
                        raise PlanMismatchError(
                            f"methods[{s}][{i}] ({layer.name}): {method.to_str()} is wider than the {layer.kind} "
                            f"attention's sequence of {extent} (from a half-width of {widest} it keeps every "
                            f"pair); use 'full' or a half-width below {widest}")

    def residual_reads(self) -> Iterator[tuple[int, int, int, HeadMethod, int | None]]:
        """(layer, head, step, method, refresh step) of every WA-RS head-step. Its refresh is the
        latest earlier step at which the head ran plain ``full`` (None when there is none); a step
        whose module is skipped (AST) neither refreshes nor reads a residual."""
        for i in range(self.n_layers):
            refresh: list[int | None] = [None] * self.model.heads
            for s in range(self.steps):
                if self.skips_module(s, i):
                    continue
                for h, method in enumerate(self.head_methods(s, i)):
                    if method.base == "full" and not method.asc:
                        refresh[h] = s
                    elif method.base == "wars":
                        yield i, h, s, method, refresh[h]

    def _check_residuals(self) -> None:
        """Every WA-RS step needs an earlier pure ``full`` step of that layer/head (its refresh),
        and every WA-RS step that shares one refresh uses one window (the residual depends on it)."""
        window_of: dict[tuple[int, int, int], int] = {}
        for i, h, s, method, refresh in self.residual_reads():
            where = f"methods[{s}][{i}] ({self.model.layers[i].name}) head {h}"
            if refresh is None:
                raise PlanMismatchError(
                    f"{where}: WA-RS needs the residual of an earlier step at which the head ran "
                    "plain 'full' attention, and there is none; make an earlier step 'full'")
            window = window_of.setdefault((i, h, refresh), method.window)
            if window != method.window:
                raise PlanMismatchError(
                    f"{where}: WA-RS window {method.window} differs from window {window} used with "
                    f"the same residual (refreshed at step {refresh}); use one window per refresh")

    def check_model(self, transformer: Any, adapter: Any, scheduler: Any = None, pipeline_cfg_layout: str | None = None) -> None:
        """Refuse a plan made for another model (or scheduler / CFG order), naming the field."""
        fp = self.model
        if adapter.family != fp.family:
            raise PlanMismatchError(f"plan is for model family {fp.family!r} but the pipeline is {adapter.family!r} (model.family)")
        cls_name = type(transformer).__name__
        if cls_name != fp.transformer_class:
            raise PlanMismatchError(f"plan is for {fp.transformer_class} but the transformer is {cls_name} (model.transformer_class)")
        heads, head_dim = adapter.heads(transformer)
        if (heads, head_dim) != (fp.heads, fp.head_dim):
            raise PlanMismatchError(
                f"plan is for {fp.heads} heads x {fp.head_dim} channels but the model has {heads} x {head_dim} (model.heads/head_dim)")
        names = [l.name for l in adapter.attention_layers(transformer)]
        if names != [l.name for l in fp.layers]:
            raise PlanMismatchError(
                f"plan lists {len(fp.layers)} attention layers but the model has {len(names)} with other names (model.layers); "
                "the plan was made for another model")
        digest = config_hash(transformer.config)
        if digest != fp.config_hash:
            raise PlanMismatchError(
                f"the transformer config differs from the one the plan was made for (model.config_hash {fp.config_hash[:12]}… "
                f"vs {digest[:12]}…): another checkpoint or variant; make a plan for this model")
        if scheduler is not None and type(scheduler).__name__ != self.run.scheduler:
            raise PlanMismatchError(
                f"plan was made with scheduler {self.run.scheduler} but the pipeline uses {type(scheduler).__name__} (run.scheduler)")
        if pipeline_cfg_layout is not None and self.run.cfg_layout != "none":
            batched = {"batched_cond_first", "batched_uncond_first"}
            if self.run.cfg_layout != pipeline_cfg_layout and not (
                    self.run.cfg_layout not in batched and pipeline_cfg_layout not in batched):
                raise PlanMismatchError(
                    f"plan was made for CFG layout {self.run.cfg_layout!r} but the pipeline runs {pipeline_cfg_layout!r} "
                    "(run.cfg_layout)")

    def warn_guidance(self, guidance: float | None) -> None:
        if guidance is not None and self.run.guidance is not None and abs(guidance - self.run.guidance) > 1e-6:
            warnings.warn(f"plan was searched at guidance {self.run.guidance}, the pipeline runs {guidance}; "
                          "quality may differ", stacklevel=3)


def _defined_on(method: HeadMethod, kind: str) -> bool:
    if kind == "cross":
        return method.mask_kind == "full" or not method.computes
    if kind == "temporal":
        return method.mask_kind != "window2d"
    return True


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _schema_check(data: dict[str, Any]) -> None:
    """jsonschema when installed (names the path of the first error), else a few structural checks."""
    try:
        import jsonschema
    except ImportError:
        for key in ("model", "run", "provenance", "methods"):
            if key not in data:
                raise PlanMismatchError(f"plan has no field {key!r}")
        return
    validator = jsonschema.Draft202012Validator(load_schema())
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        where = list(err.absolute_path)
        if where[:1] == ["methods"] and len(where) in (3, 4):
            # a method the schema's patterns reject: say what is wrong with it, and where
            cell = f"step {where[1]}, layer {where[2]}"
            entries = ([(f"{cell}, head {h}", m) for h, m in enumerate(err.instance)] if isinstance(err.instance, list)
                       else [(cell + (f", head {where[3]}" if len(where) == 4 else ""), err.instance)])
            for at, method in entries:
                try:
                    parse_method(method)
                except DitlensError as bad:
                    raise PlanMismatchError(f"plan methods at {at}: {bad}") from None
        path = ".".join(str(p) for p in where) or "(top level)"
        raise PlanMismatchError(f"plan field {path}: {err.message.splitlines()[0][:200]}")


def static_flops_summary(plan: Plan) -> FlopsSummary | None:
    """Attention-core fraction from the plan and the fingerprint's tokens (None when tokens are unknown)."""
    from ditlens.compress.flops import plan_core_fraction

    fraction = plan_core_fraction(plan)
    return None if fraction is None else FlopsSummary(fraction, None, "static")


def head_method_table(plan: Plan) -> list[list[tuple[HeadMethod, ...]]]:
    """[step][layer] -> per-head methods (parsed once)."""
    return [[plan.head_methods(s, i) for i in range(plan.n_layers)] for s in range(plan.steps)]


__all__ = ["Plan", "ModelFingerprint", "RunSpec", "Provenance", "FlopsSummary", "LayerInfo", "TokenInfo",
           "model_fingerprint", "config_hash", "load_schema"]
