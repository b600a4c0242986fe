"""The ditlens trace format (format_version 1): names, shapes and the header (DESIGN.md §3).

A trace is one HDF5 file::

    /                        attrs: format, format_version, model_id, family, transformer_class,
                             pipeline_class, steps, guidance_scale, height, width, seed,
                             cfg_layout, n_heads, head_dim, ditlens/torch/diffusers/h5py/hdf5
                             versions, created, plus the header's ``extra`` attrs
    /meta/prompts            utf-8 strings, every planned prompt            axes "prompt"
    /meta/layers             utf-8 strings, attention layer names           axes "layer"
    /meta/branches           utf-8 strings, "cond" [, "uncond"]             axes "branch"
    /meta/timesteps          float64, scheduler timestep of each step       axes "step"
    /meta/n_done             int64 scalar: prompts fully written (the commit marker)
    /meta/tokens             group; attrs n_image, n_text, text_position, grid
    /stats/{group}/{tensor}/{comparison}/{metric}
                             float32, NaN until written; axes see :func:`stat_axes`
    /raw/{tensor}            float16, axes prompt,branch,step,layer,head,token,channel
    /raw/index/{step,layer,head,token}
                             int64 indices of the recorded subset
    any other dataset        per-prompt arrays (:class:`PromptArray`) or derived arrays
                             (``write_array``); every dataset has an ``axes`` attr

The prompt axis always has the length of the planned prompt list; only the first
``/meta/n_done`` entries hold data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

FORMAT = "ditlens.trace"
FORMAT_VERSION = 1

GROUPS = ("image", "text")
TENSORS = ("q", "k", "v", "o")
COMPARISONS = ("step", "cfg")
METRICS = ("l1", "rel_l1", "cosine", "ssim")
BRANCH_NAMES = ("cond", "uncond")
TEXT_POSITIONS = ("first", "last", "none")

StatKey = tuple[str, str, str, str]  # (group, tensor, comparison, metric)

# Root attributes written from the header's named fields, in this order.
HEADER_ATTRS = (
    "model_id",
    "family",
    "transformer_class",
    "pipeline_class",
    "steps",
    "guidance_scale",
    "height",
    "width",
    "seed",
    "cfg_layout",
    "n_heads",
    "head_dim",
)
# Root attributes the writer fills itself; a header's ``extra`` may not use these names.
SYSTEM_ATTRS = (
    "format",
    "format_version",
    "ditlens_version",
    "torch_version",
    "diffusers_version",
    "h5py_version",
    "hdf5_version",
    "created",
)
RESERVED_ATTRS = frozenset(HEADER_ATTRS + SYSTEM_ATTRS)

# Header fields that must agree for a resume or a merge (everything but prompts and extra).
RUN_FIELDS = (
    "model_id",
    "family",
    "transformer_class",
    "pipeline_class",
    "steps",
    "guidance_scale",
    "height",
    "width",
    "seed",
    "cfg_layout",
    "layers",
    "branches",
    "n_heads",
    "head_dim",
    "tokens",
)

RAW_AXES = ("prompt", "branch", "step", "layer", "head", "token", "channel")
RAW_INDEX_AXES = ("step", "layer", "head", "token")
# Paths owned by the format; per-prompt and derived arrays live elsewhere.
RESERVED_ROOTS = ("meta", "stats", "raw")
PER_PROMPT_ATTR = "ditlens_per_prompt"
COORD_ATTR_PREFIX = "coords."


def all_stat_keys() -> list[StatKey]:
    """Every valid statistic, in the fixed order group, tensor, comparison, metric."""
    keys: list[StatKey] = []
    for group in GROUPS:
        for tensor in TENSORS:
            for comparison in COMPARISONS:
                for metric in METRICS:
                    if metric == "ssim" and group != "image":
                        continue  # SSIM needs the token grid: image tokens only
                    keys.append((group, tensor, comparison, metric))
    return keys


def recorded_stat_keys(keys: Sequence[StatKey], branches: Sequence[str], n_text: int) -> list[StatKey]:
    """The keys a run can fill: no cond/uncond comparison without CFG, no text group for a model
    without text tokens (DiT), where they would only store NaN."""
    return [k for k in keys if (k[2] != "cfg" or "uncond" in branches) and (k[0] != "text" or n_text > 0)]


def is_stat_key(key: object) -> bool:
    """True when ``key`` is one of :func:`all_stat_keys`."""
    return isinstance(key, tuple) and key in _STAT_KEY_SET


def check_stat_key(key: object) -> StatKey:
    """Return ``key`` as a StatKey or raise ValueError naming why it is not one."""
    if not is_stat_key(key):
        raise ValueError(
            f"invalid stat key {key!r}: expected (group, tensor, comparison, metric) with group in "
            f"{GROUPS}, tensor in {TENSORS}, comparison in {COMPARISONS}, metric in {METRICS} "
            "(ssim for group image only)"
        )
    return key  # type: ignore[return-value]


def stat_path(key: StatKey) -> str:
    """HDF5 path of a statistic, e.g. ``/stats/image/q/step/l1``."""
    group, tensor, comparison, metric = check_stat_key(tuple(key))
    return f"/stats/{group}/{tensor}/{comparison}/{metric}"


def parse_stat_path(path: str) -> StatKey | None:
    """Inverse of :func:`stat_path`; None when ``path`` is not a statistic's path."""
    parts = tuple(p for p in path.strip("/").split("/"))
    if len(parts) != 5 or parts[0] != "stats":
        return None
    key = parts[1:]
    return key if is_stat_key(key) else None  # type: ignore[return-value]


def stat_axes(comparison: str) -> tuple[str, ...]:
    """Axis names of a statistic: ``step`` compares consecutive steps of each branch,
    ``cfg`` compares the two branches of each step."""
    if comparison == "step":
        return ("prompt", "branch", "step", "layer", "head")
    if comparison == "cfg":
        return ("prompt", "step", "layer", "head")
    raise ValueError(f"unknown comparison {comparison!r}: expected one of {COMPARISONS}")


def join_axes(axes: Sequence[str]) -> str:
    """The ``axes`` attribute value: comma-separated names."""
    for name in axes:
        if not isinstance(name, str) or not name or "," in name or name != name.strip():
            raise ValueError(f"invalid axis name {name!r}: use a non-empty name without commas or spaces around it")
    return ",".join(axes)


def split_axes(value: object) -> tuple[str, ...]:
    """Parse an ``axes`` attribute (str or bytes) into names; "" means a scalar."""
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    text = str(value)
    return tuple(text.split(",")) if text else ()


@dataclass(frozen=True)
class TokenInfo:
    """Token layout of the transformer's sequence."""

    n_image: int
    n_text: int
    text_position: str  # "first", "last" or "none"
    grid: tuple[int, int, int]  # frames, height, width in tokens

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", tuple(int(g) for g in self.grid))
        object.__setattr__(self, "n_image", int(self.n_image))
        object.__setattr__(self, "n_text", int(self.n_text))
        if self.text_position not in TEXT_POSITIONS:
            raise ValueError(f"text_position must be one of {TEXT_POSITIONS}, not {self.text_position!r}")
        if len(self.grid) != 3 or any(g < 1 for g in self.grid):
            raise ValueError(f"grid must be three positive sizes (frames, height, width), not {self.grid!r}")
        if self.n_image < 0 or self.n_text < 0:
            raise ValueError("n_image and n_text must be >= 0")

    @property
    def n_tokens(self) -> int:
        return self.n_image + self.n_text


@dataclass
class TraceHeader:
    """Everything a trace records about the run that produced it."""

    model_id: str
    family: str
    transformer_class: str
    pipeline_class: str
    steps: int
    guidance_scale: float
    height: int
    width: int
    seed: int
    cfg_layout: str
    prompts: list[str]  # ALL planned prompts (labels of the prompt axis), in order
    layers: list[str]
    branches: list[str]  # ["cond"] or ["cond", "uncond"]
    n_heads: int
    head_dim: int
    tokens: TokenInfo
    extra: dict[str, str | int | float] = field(default_factory=dict)  # more root attrs

    def validate(self) -> None:
        """Raise ValueError naming the first field that cannot be written."""
        for name in ("model_id", "family", "transformer_class", "pipeline_class", "cfg_layout"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"header.{name} must be a string")
        for name in ("steps", "n_heads", "head_dim", "height", "width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"header.{name} must be a positive integer, not {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise ValueError(f"header.seed must be an integer, not {self.seed!r}")
        if not isinstance(self.guidance_scale, (int, float, np.floating, np.integer)) or not math.isfinite(
            float(self.guidance_scale)
        ):
            raise ValueError(f"header.guidance_scale must be a finite number, not {self.guidance_scale!r}")
        if not self.prompts or not all(isinstance(p, str) for p in self.prompts):
            raise ValueError("header.prompts must be a non-empty list of strings")
        if not self.layers or not all(isinstance(name, str) and name for name in self.layers):
            raise ValueError("header.layers must be a non-empty list of layer names")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError("header.layers has duplicate names")
        if not self.branches or any(b not in BRANCH_NAMES for b in self.branches) or len(set(self.branches)) != len(
            self.branches
        ):
            raise ValueError(f"header.branches must be distinct names from {BRANCH_NAMES}, not {self.branches!r}")
        if not isinstance(self.tokens, TokenInfo):
            raise ValueError("header.tokens must be a TokenInfo")
        for key, value in self.extra.items():
            if key in RESERVED_ATTRS:
                raise ValueError(f"header.extra key {key!r} is reserved for the trace format")
            if not isinstance(key, str) or not key:
                raise ValueError(f"header.extra keys must be non-empty strings, not {key!r}")
            if not isinstance(value, (str, int, float, np.integer, np.floating)):
                raise ValueError(f"header.extra[{key!r}] must be a str, int or float, not {type(value).__name__}")

    def run_attrs(self) -> dict[str, str | int | float]:
        """The root attributes written from the named fields."""
        return {
            "model_id": self.model_id,
            "family": self.family,
            "transformer_class": self.transformer_class,
            "pipeline_class": self.pipeline_class,
            "steps": int(self.steps),
            "guidance_scale": float(self.guidance_scale),
            "height": int(self.height),
            "width": int(self.width),
            "seed": int(self.seed),
            "cfg_layout": self.cfg_layout,
            "n_heads": int(self.n_heads),
            "head_dim": int(self.head_dim),
        }


# Root attr (value "per_prompt") of a trace whose pipeline trims the text to each prompt's length:
# tokens.n_text is then the first prompt's, and runs of other prompts may differ in it.
TEXT_TOKENS_ATTR = "text_tokens"
CALL_ATTR_PREFIX = "call."  # root attrs of the scalar pipeline arguments a run passed


def run_mismatch(recorded: TraceHeader, wanted: TraceHeader) -> tuple[str, str, str] | None:
    """First field of :data:`RUN_FIELDS`, or pipeline argument (``call.*`` attrs, compared where
    both headers record them), where two headers differ, as (field, recorded value, wanted value)
    for a message; None when they agree."""
    per_prompt_text = "per_prompt" in (recorded.extra.get(TEXT_TOKENS_ATTR), wanted.extra.get(TEXT_TOKENS_ATTR))
    for name in RUN_FIELDS:
        a, b = getattr(recorded, name), getattr(wanted, name)
        if name == "guidance_scale":
            same = math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=1e-12)
        elif name in ("layers", "branches"):
            same = list(a) == list(b)
        elif name == "tokens" and per_prompt_text:
            same = replace(a, n_text=0) == replace(b, n_text=0)
        else:
            same = a == b
        if not same:
            return name, _describe(a), _describe(b)
    calls = [k for k in recorded.extra if k.startswith(CALL_ATTR_PREFIX) and k in wanted.extra]
    for key in sorted(calls):
        if recorded.extra[key] != wanted.extra[key]:
            return key, repr(recorded.extra[key]), repr(wanted.extra[key])
    return None


def _describe(value: object) -> str:
    """Short text for a value in a one-line message."""
    if isinstance(value, (list, tuple)):
        if len(value) > 4:
            return f"{len(value)} items [{value[0]!r}, {value[1]!r}, ..., {value[-1]!r}]"
        return repr(list(value))
    if isinstance(value, TokenInfo):
        return (
            f"{value.n_image} image + {value.n_text} text tokens ({value.text_position}), "
            f"grid {'x'.join(map(str, value.grid))}"
        )
    return repr(value)


@dataclass(frozen=True)
class RawSelection:
    """The subset of q/k/v/o stored raw (float16): which tensors, steps, layers, heads, tokens."""

    tensors: tuple[str, ...]
    steps: tuple[int, ...]
    layers: tuple[int, ...]
    heads: tuple[int, ...]
    tokens: tuple[int, ...]  # indices into the full token sequence (image and text)
    channels: int  # channels per head stored

    def __post_init__(self) -> None:
        for name in ("tensors", "steps", "layers", "heads", "tokens"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("steps", "layers", "heads", "tokens"):
            object.__setattr__(self, name, tuple(int(i) for i in getattr(self, name)))
        object.__setattr__(self, "channels", int(self.channels))

    def nbytes(self, n_prompts: int, n_branches: int) -> int:
        """float16 bytes the raw datasets will take (uncompressed)."""
        per_tensor = n_prompts * n_branches * math.prod(self.tensor_shape_per_prompt_branch())
        return 2 * len(self.tensors) * per_tensor

    def tensor_shape_per_prompt_branch(self) -> tuple[int, int, int, int, int]:
        return (len(self.steps), len(self.layers), len(self.heads), len(self.tokens), self.channels)

    def prompt_shape(self, n_branches: int) -> tuple[int, ...]:
        """Shape of one prompt's raw array of one tensor: (branch, step, layer, head, token, channel)."""
        return (n_branches, *self.tensor_shape_per_prompt_branch())

    def validate(self, header: TraceHeader) -> None:
        """Raise ValueError when the selection does not fit the header."""
        if not self.tensors or any(t not in TENSORS for t in self.tensors) or len(set(self.tensors)) != len(
            self.tensors
        ):
            raise ValueError(f"raw tensors must be distinct names from {TENSORS}, not {self.tensors!r}")
        limits = {
            "steps": header.steps,
            "layers": len(header.layers),
            "heads": header.n_heads,
            "tokens": header.tokens.n_tokens,
        }
        for name, limit in limits.items():
            values = getattr(self, name)
            if not values:
                raise ValueError(f"raw {name} selection is empty")
            if len(set(values)) != len(values) or list(values) != sorted(values):
                raise ValueError(f"raw {name} must be increasing and distinct")
            if values[0] < 0 or values[-1] >= limit:
                raise ValueError(f"raw {name} must lie in [0, {limit}), got {values[0]}..{values[-1]}")
        if not 1 <= self.channels <= header.head_dim:
            raise ValueError(f"raw channels must lie in [1, head_dim={header.head_dim}], not {self.channels}")


@dataclass(frozen=True)
class PromptArray:
    """A further per-prompt dataset the writer fills in ``write_prompt`` (e.g. locality or
    influence maps): stored at ``path`` with axes ``("prompt", *axes)``."""

    path: str
    axes: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str = "float32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "axes", tuple(self.axes))
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "path", normalize_path(self.path))
        check_user_path(self.path)
        join_axes(("prompt", *self.axes))
        if len(self.axes) != len(self.shape) or any(s < 1 for s in self.shape):
            raise ValueError(f"PromptArray {self.path}: axes {self.axes} and shape {self.shape} do not match")
        if "prompt" in self.axes:
            raise ValueError(f"PromptArray {self.path}: the prompt axis is implicit, do not list it")
        kind = np.dtype(self.dtype).kind
        if kind not in "fiub":
            raise ValueError(f"PromptArray {self.path}: dtype must be numeric, not {self.dtype}")


def normalize_path(path: str) -> str:
    """``a/b`` -> ``/a/b``; collapses doubled slashes."""
    parts = [p for p in str(path).split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise ValueError(f"invalid dataset path {path!r}")
    return "/" + "/".join(parts)


def check_user_path(path: str) -> None:
    """Per-prompt and derived arrays must stay out of the groups the format owns."""
    root = normalize_path(path).split("/")[1]
    if root in RESERVED_ROOTS:
        raise ValueError(f"{path!r} lies under /{root}, which the trace format owns; choose another group (e.g. /maps)")


def chunk_shape(shape: Sequence[int], itemsize: int, fixed_ones: int = 1, target_bytes: int = 1 << 20) -> tuple[int, ...]:
    """Chunk shape that keeps the first ``fixed_ones`` axes at 1 (one chunk per prompt, ...)
    and halves the next axes, outermost first, until a chunk is at most ``target_bytes``."""
    chunk = [1] * min(fixed_ones, len(shape)) + [max(1, int(s)) for s in shape[fixed_ones:]]
    axis = fixed_ones
    while axis < len(chunk) and math.prod(chunk) * itemsize > target_bytes:
        if chunk[axis] > 1:
            chunk[axis] = (chunk[axis] + 1) // 2
        else:
            axis += 1
    return tuple(chunk)


def header_from_attrs(
    attrs: Mapping[str, object],
    prompts: list[str],
    layers: list[str],
    branches: list[str],
    tokens: TokenInfo,
) -> TraceHeader:
    """Rebuild a header from a file's root attributes and /meta datasets."""
    extra = {k: v for k, v in attrs.items() if k not in RESERVED_ATTRS}
    return TraceHeader(
        model_id=str(attrs["model_id"]),
        family=str(attrs["family"]),
        transformer_class=str(attrs["transformer_class"]),
        pipeline_class=str(attrs["pipeline_class"]),
        steps=int(attrs["steps"]),  # type: ignore[arg-type]
        guidance_scale=float(attrs["guidance_scale"]),  # type: ignore[arg-type]
        height=int(attrs["height"]),  # type: ignore[arg-type]
        width=int(attrs["width"]),  # type: ignore[arg-type]
        seed=int(attrs["seed"]),  # type: ignore[arg-type]
        cfg_layout=str(attrs["cfg_layout"]),
        prompts=list(prompts),
        layers=list(layers),
        branches=list(branches),
        n_heads=int(attrs["n_heads"]),  # type: ignore[arg-type]
        head_dim=int(attrs["head_dim"]),  # type: ignore[arg-type]
        tokens=tokens,
        extra=extra,  # type: ignore[arg-type]
    )


_STAT_KEY_SET = frozenset(all_stat_keys())
