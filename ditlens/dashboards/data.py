"""What the dashboard reads from a trace: small 2-D maps, read lazily, slice by slice.

:class:`TraceData` wraps a :class:`ditlens.traces.reader.Trace` (header and labels) and a second
read-only HDF5 handle used for sliced reads: a figure for one prompt and one branch reads that
prompt's and that branch's hyperslab, never the whole dataset, and nothing is read until a
figure asks. Prompt means come from the ``/maps/mean`` aggregates that ``ditlens analyze``
stores when they cover every finished prompt, otherwise from ``/stats``. Every missing group
raises a one-line :class:`DitlensError` that the app shows as a message.
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

from ditlens.errors import DitlensError
from ditlens.traces.format import (
    COMPARISONS,
    COORD_ATTR_PREFIX,
    GROUPS,
    METRICS,
    TENSORS,
    StatKey,
    split_axes,
    stat_path,
)
from ditlens.traces.reader import Trace, open_h5_for_read, python_value

MEAN = "mean"  # the value of an axis picker that averages over the axis
SUM = "sum"  # ... that sums over it
HIGHER_IS_REDUNDANT = {"cosine": True, "ssim": True, "l1": False, "rel_l1": False}
METRIC_NAMES = {"l1": "L1 distance", "rel_l1": "relative L1", "cosine": "cosine similarity", "ssim": "SSIM"}
COMPARISON_NAMES = {"step": "step t vs t-1", "cfg": "cond vs uncond"}
EXTRA_ROOTS = {
    "influence": "this trace has no influence maps: profile with --influence",
    "locality": "this trace has no attention locality maps (/locality): profile with attention locality recording",
}
# Axes whose picker defaults to the mean; any other extra axis defaults to its first entry.
MEAN_BY_DEFAULT = ("prompt", "head", "token", "query", "key")
CACHE_ENTRIES = 64


@dataclass
class Heatmap:
    """One 2-D map as the figures draw it: ``z[row, col]`` with labels and titles."""

    z: np.ndarray
    rows: list[str]
    cols: list[str]
    row_title: str
    col_title: str
    title: str
    value_name: str
    note: str = ""  # where the values came from (shown under the figure)
    higher_is_redundant: bool | None = None  # None: not a redundancy measure
    col_hover: list[str] = field(default_factory=list)  # e.g. the timestep of each step


@dataclass(frozen=True)
class ContentRow:
    """One line of the overview's "what the trace holds" table."""

    group: str
    datasets: int
    stored_bytes: int
    description: str


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def nanmean(values: np.ndarray, axis: int | tuple[int, ...] | None) -> np.ndarray:
    """float64 mean ignoring NaN (step 0 of a step comparison is NaN); all-NaN gives NaN."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.asarray(np.nanmean(np.asarray(values, dtype=np.float64), axis=axis))


def coefficient_of_variation(values: np.ndarray) -> np.ndarray:
    """std / mean over axis 0 (ddof 0), NaN ignored (DESIGN §4; the formula of
    ``ditlens.analyzer.metrics.coefficient_of_variation``, here without importing torch)."""
    values = np.asarray(values, dtype=np.float64)
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanstd(values, axis=0, ddof=0) / np.nanmean(values, axis=0)


def nansum(values: np.ndarray, axis: int | tuple[int, ...]) -> np.ndarray:
    """float64 sum ignoring NaN; a slice that is all NaN gives NaN (not 0)."""
    values = np.asarray(values, dtype=np.float64)
    total = np.nansum(values, axis=axis)
    empty = np.all(np.isnan(values), axis=axis)
    return np.where(empty, np.nan, total)


class TraceData:
    """Lazy, sliced access to one trace for the dashboard (thread-safe: Dash serves in threads)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.trace = Trace.open(self.path)
        try:
            self._file, _ = open_h5_for_read(self.path)
        except BaseException:
            self.trace.close()
            raise
        self._lock = threading.RLock()
        self._cache: OrderedDict[tuple, object] = OrderedDict()
        # old traces of models without text tokens (DiT) hold an all-NaN text group: not offered
        self._keys: list[StatKey] = self.trace.filled_stat_keys()

    def close(self) -> None:
        self._file.close()
        self.trace.close()

    # -- labels ---------------------------------------------------------------------------
    @property
    def header(self):  # noqa: ANN201 - TraceHeader
        return self.trace.header

    @property
    def n_done(self) -> int:
        return self.trace.n_done

    @property
    def prompts(self) -> list[str]:
        return self.trace.prompts

    @property
    def layers(self) -> list[str]:
        return list(self.trace.layers)

    @property
    def branches(self) -> list[str]:
        return list(self.trace.branches)

    @property
    def n_heads(self) -> int:
        return int(self.header.n_heads)

    @property
    def steps(self) -> int:
        return int(self.header.steps)

    def step_labels(self) -> list[str]:
        return [str(i) for i in range(self.steps)]

    def timestep_hover(self) -> list[str]:
        return [f"{t:g}" for t in self.trace.timesteps]

    # -- the statistics -------------------------------------------------------------------
    def stat_keys(self) -> list[StatKey]:
        return list(self._keys)

    def stat_options(self) -> dict[str, list[str]]:
        """The groups, tensors, comparisons and metrics that occur in this trace's statistics."""
        present = self._keys
        return {
            "group": [g for g in GROUPS if any(k[0] == g for k in present)],
            "tensor": [t for t in TENSORS if any(k[1] == t for k in present)],
            "comparison": [c for c in COMPARISONS if any(k[2] == c for k in present)],
            "metric": [m for m in METRICS if any(k[3] == m for k in present)],
        }

    def metrics_for(self, group: str, tensor: str, comparison: str) -> list[str]:
        return [k[3] for k in self._keys if k[:3] == (group, tensor, comparison)]

    def _check_stat(self, key: StatKey) -> str:
        if self.n_done == 0:
            raise DitlensError(f"{self.path.name} holds no finished prompt yet: let the profile run (or --resume it)")
        if tuple(key) not in self._keys:
            raise DitlensError(
                f"this trace has no {'/'.join(key)} statistic: pick another combination, or profile again with it"
            )
        return stat_path(key)

    def _branch_index(self, key: StatKey, branch: str | None) -> int | None:
        if key[2] != "step":
            return None
        if branch not in self.branches:
            raise DitlensError(f"no branch {branch!r} in this trace (branches: {', '.join(self.branches)})")
        return self.branches.index(branch)

    def _prompt_index(self, prompt: int | None) -> int | None:
        if prompt is None:
            return None
        if not 0 <= int(prompt) < self.n_done:
            raise DitlensError(f"prompt {prompt} is out of range: the trace has {self.n_done} finished prompts")
        return int(prompt)

    def _mean_map_source(self, key: StatKey) -> str | None:
        """``/maps/mean/...`` when ``ditlens analyze`` stored it for every finished prompt."""
        path = "/maps/mean" + stat_path(key)[len("/stats"):]
        if path not in self._file or not isinstance(self._file[path], h5py.Dataset):
            return None
        n = self._file[path].attrs.get("n_prompts")
        return path if n is not None and int(n) == self.n_done else None

    def stat_block(self, key: StatKey, prompt: int | None, branch: str | None,
                   layer: int | None = None) -> tuple[np.ndarray, str]:
        """Values over (step, layer, head) - or (step, head) for one ``layer`` - for one prompt,
        or the mean over prompts (``prompt=None``); returns (values, note on the source)."""
        path = self._check_stat(key)
        p = self._prompt_index(prompt)
        b = self._branch_index(key, branch)
        layer_sel: object = slice(None) if layer is None else self._layer_index(layer)

        def read() -> tuple[np.ndarray, str]:
            if p is not None:
                index = (p,) + ((b,) if b is not None else ()) + (slice(None), layer_sel)
                return self._read(path, index), f"{path}, prompt {p}"
            mean_path = self._mean_map_source(key)
            if mean_path is not None:
                index = ((b,) if b is not None else ()) + (slice(None), layer_sel)
                return self._read(mean_path, index), f"{mean_path} (mean of {self.n_done} prompts, from ditlens analyze)"
            index = (slice(0, self.n_done),) + ((b,) if b is not None else ()) + (slice(None), layer_sel)
            return nanmean(self._read(path, index), axis=0), f"{path}, mean of {self.n_done} prompts"

        return self._cached(("block", key, p, b, layer), read)  # type: ignore[return-value]

    def _layer_index(self, layer: int) -> int:
        if not 0 <= int(layer) < len(self.layers):
            raise DitlensError(f"layer {layer} is out of range: the trace has {len(self.layers)} attention layers")
        return int(layer)

    def layer_step_map(self, key: StatKey, prompt: int | None, branch: str | None,
                       head: int | None = None) -> Heatmap:
        """Layer x step map of one statistic: mean over heads (or one ``head``)."""
        block, note = self.stat_block(key, prompt, branch)  # step, layer, head
        if head is None:
            z = nanmean(block, axis=2)
            which = "mean over heads"
        else:
            if not 0 <= int(head) < block.shape[2]:
                raise DitlensError(f"head {head} is out of range: the trace has {block.shape[2]} heads")
            z = block[:, :, int(head)].astype(np.float64)
            which = f"head {head}"
        return Heatmap(
            z=z.T, rows=self.layers, cols=self.step_labels(), row_title="attention layer",
            col_title="step (0 = noisiest)", title=f"{self.describe_key(key, branch)}, {self.describe_prompt(prompt)}, {which}",
            value_name=key[3], note=note, higher_is_redundant=HIGHER_IS_REDUNDANT[key[3]],
            col_hover=self.timestep_hover())

    def head_step_map(self, key: StatKey, prompt: int | None, branch: str | None, layer: int) -> Heatmap:
        """Head x step map of one statistic for one attention layer."""
        block, note = self.stat_block(key, prompt, branch, layer=layer)  # step, head
        return Heatmap(
            z=np.asarray(block, dtype=np.float64).T, rows=[str(h) for h in range(block.shape[1])],
            cols=self.step_labels(), row_title="head", col_title="step (0 = noisiest)",
            title=f"{self.layers[layer]}: {self.describe_key(key, branch)}, {self.describe_prompt(prompt)}",
            value_name=key[3], note=note, higher_is_redundant=HIGHER_IS_REDUNDANT[key[3]],
            col_hover=self.timestep_hover())

    def prompt_curves(self, key: StatKey, branch: str | None, layer: int) -> tuple[np.ndarray, str]:
        """(prompt, step) values of one layer, mean over heads: how prompts spread."""
        path = self._check_stat(key)
        b = self._branch_index(key, branch)
        index = (slice(0, self.n_done),) + ((b,) if b is not None else ()) + (slice(None), self._layer_index(layer))
        values = self._cached(("curves", key, b, layer), lambda: self._read(path, index))
        return nanmean(values, axis=2), f"{path}, {self.n_done} prompts"

    # -- prompt variability ---------------------------------------------------------------
    def cv_block(self, key: StatKey, branch: str | None) -> tuple[np.ndarray, str]:
        """Coefficient of variation across prompts (std/mean, ddof 0) per (step, layer, head)."""
        path = self._check_stat(key)
        b = self._branch_index(key, branch)

        def read() -> tuple[np.ndarray, str]:
            cv_path = "/maps/cv" + path[len("/stats"):]
            if cv_path in self._file and int(self._file[cv_path].attrs.get("n_prompts", -1)) == self.n_done:
                index = ((b,) if b is not None else ()) + (slice(None),)
                return self._read(cv_path, index).astype(np.float64), f"{cv_path} (from ditlens analyze)"
            index = (slice(0, self.n_done),) + ((b,) if b is not None else ()) + (slice(None),)
            cv = coefficient_of_variation(self._read(path, index))
            return cv, f"{path}, std/mean over {self.n_done} prompts"

        return self._cached(("cv", key, b), read)  # type: ignore[return-value]

    def cv_map(self, key: StatKey, branch: str | None) -> Heatmap:
        if self.n_done < 2:
            raise DitlensError("prompt variability needs at least two finished prompts; this trace has "
                               f"{self.n_done}")
        cv, note = self.cv_block(key, branch)
        return Heatmap(
            z=nanmean(_finite(cv), axis=2).T, rows=self.layers, cols=self.step_labels(), row_title="attention layer",
            col_title="step (0 = noisiest)", title=f"CV across {self.n_done} prompts: {self.describe_key(key, branch)}, "
            "mean over heads", value_name="CV", note=note, col_hover=self.timestep_hover())

    def cv_table(self, group: str, branch: str | None) -> list[dict[str, object]]:
        """DiTCacheAnalysis's table: mean CV over layers, steps and heads, per comparison/metric
        (rows) and tensor (columns), for one token group."""
        rows: list[dict[str, object]] = []
        for comparison in COMPARISONS:
            for metric in METRICS:
                row: dict[str, object] = {"map": f"{comparison}/{metric}"}
                for tensor in TENSORS:
                    key = (group, tensor, comparison, metric)
                    if key in self._keys:
                        cv, _ = self.cv_block(key, branch)
                        row[tensor] = float(nanmean(_finite(cv), axis=None))
                if len(row) > 1:
                    rows.append(row)
        return rows

    # -- further groups (influence, locality, ...) ----------------------------------------
    def extra_datasets(self, root: str) -> list[str]:
        """Datasets under ``/root`` that carry an ``axes`` attribute (rendered generically)."""
        group = self._file.get(root)
        if not isinstance(group, h5py.Group):
            return []
        found: list[str] = []

        def visit(name: str, obj: object) -> None:
            if isinstance(obj, h5py.Dataset) and "axes" in obj.attrs and obj.ndim >= 1:
                found.append(f"/{root}/{name}")

        group.visititems(visit)
        return sorted(found)

    def require_extra(self, root: str) -> list[str]:
        paths = self.extra_datasets(root)
        if not paths:
            raise DitlensError(EXTRA_ROOTS.get(root, f"this trace has no /{root} maps"))
        return paths

    def dataset_axes(self, path: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """Axis names and lengths of a dataset (prompt axes cut to the finished prompts)."""
        dataset = self._dataset(path)
        axes = split_axes(dataset.attrs["axes"])
        if len(axes) != dataset.ndim:
            raise DitlensError(f"{path} has {dataset.ndim} dimensions but axes {axes}: the trace is corrupt")
        shape = tuple(self.n_done if self._cut_prompt(dataset, i, a) else n
                      for i, (a, n) in enumerate(zip(axes, dataset.shape)))
        return axes, shape

    def axis_labels(self, path: str, axis: str) -> list[str]:
        """Labels of one axis of a dataset: stored ``coords.<axis>``, the trace's own labels,
        the ``<root>_candidates`` root attribute for a candidate axis, else positions."""
        dataset = self._dataset(path)
        axes, shape = self.dataset_axes(path)
        size = shape[axes.index(axis)]
        stored = dataset.attrs.get(COORD_ATTR_PREFIX + axis)
        if stored is not None:
            labels = [str(python_value(v)) for v in np.asarray(stored).ravel()]
            if len(labels) == size:
                return labels
        known: dict[str, list[str]] = {
            "prompt": self.prompts, "layer": self.layers, "branch": self.branches, "step": self.step_labels(),
        }
        if axis == "candidate":
            root = path.strip("/").split("/")[0]
            text = self.trace.attrs.get(f"{root}_candidates")
            if isinstance(text, str):
                known["candidate"] = [c.strip() for c in text.split(",") if c.strip()]
        labels = known.get(axis)
        if labels is not None and len(labels) == size:
            return [str(x) for x in labels]
        return [str(i) for i in range(size)]

    def default_view(self, path: str) -> tuple[str, str, dict[str, str]]:
        """(x axis, y axis, picks) to show first: step across, layer down when present."""
        axes, _ = self.dataset_axes(path)
        if len(axes) == 1:
            return axes[0], "", {}
        x = "step" if "step" in axes else axes[-1]
        rest = [a for a in axes if a != x]
        y = "layer" if "layer" in rest else rest[-1]
        picks = {a: default_pick(a) for a in axes if a not in (x, y)}
        return x, y, picks

    def generic_map(self, path: str, x: str, y: str, picks: dict[str, str]) -> Heatmap:
        """Any labelled dataset as a ``y`` x ``x`` map; every other axis is picked by position
        (a string of an int), averaged (``"mean"``) or summed (``"sum"``: influences of heads add
        up), NaN ignored (all NaN stays NaN). ``y=""`` draws one row."""
        axes, shape = self.dataset_axes(path)
        if x not in axes or (y and y not in axes) or x == y:
            raise DitlensError(f"choose two different axes of {path} (axes: {', '.join(axes)})")
        dataset = self._dataset(path)
        index: list[object] = []
        reduce: dict[str, str] = {}  # axis -> "mean" or "sum"
        for axis, size in zip(axes, shape):
            whole = slice(0, size)
            if axis in (x, y):
                index.append(whole)
                continue
            pick = str(picks.get(axis, MEAN))
            if pick in (MEAN, SUM):
                index.append(whole)
                reduce[axis] = pick
                continue
            try:
                position = int(pick)
            except ValueError:
                raise DitlensError(f"{axis}: pick a position, 'mean' or 'sum', not {pick!r}") from None
            if not 0 <= position < size:
                raise DitlensError(f"{axis} position {position} is out of range (0..{size - 1})")
            index.append(position)
        kept = [a for a, sel in zip(axes, index) if not isinstance(sel, int)]
        values = self._cached(("extra", path, tuple(str(s) for s in index)), lambda: self._read(path, tuple(index)))
        data = np.asarray(values, dtype=np.float64)
        for how in (SUM, MEAN):
            names = [a for a, h in reduce.items() if h == how]
            if names:
                positions = tuple(kept.index(a) for a in names)
                data = nanmean(data, axis=positions) if how == MEAN else nansum(data, axis=positions)
                kept = [a for a in kept if a not in names]
        if not y:
            data = data[None, :]
            rows = [path.rsplit("/", 1)[-1]]
        else:
            data = np.moveaxis(data, [kept.index(y), kept.index(x)], [0, 1])
            rows = self.axis_labels(path, y)
        chosen = [f"{reduce[a]} over {a}" if a in reduce else f"{a} {self.axis_labels(path, a)[int(picks[a])]}"
                  for a in axes if a not in (x, y)]
        attrs = {k: python_value(v) for k, v in dataset.attrs.items()}
        return Heatmap(
            z=data, rows=rows, cols=self.axis_labels(path, x), row_title=y or "", col_title=x,
            title=f"{path}" + (f" ({', '.join(chosen)})" if chosen else ""),
            value_name=str(attrs.get("units", path.rsplit("/", 1)[-1])), note=f"{path}, axes {','.join(axes)}",
            col_hover=self.timestep_hover() if x == "step" and len(self.trace.timesteps) == shape[axes.index(x)] else [])

    # -- the overview ---------------------------------------------------------------------
    def run_facts(self) -> list[tuple[str, str]]:
        h = self.header
        t = h.tokens
        facts = [
            ("trace", f"{self.path.name} ({human_bytes(self.trace.file_size)})"),
            ("model", f"{h.model_id} [{h.family}]"),
            ("classes", f"{h.transformer_class} / {h.pipeline_class}"),
            ("run", f"{h.steps} steps, guidance {h.guidance_scale:g}, {h.height}x{h.width} px, seed {h.seed}"),
            ("CFG", f"{h.cfg_layout}; branches {', '.join(h.branches)}"),
            ("prompts", f"{self.n_done} of {len(h.prompts)} finished" + ("" if self.trace.complete else " (partial trace)")),
            ("tokens", f"{t.n_image} image (grid {t.grid[0]}x{t.grid[1]}x{t.grid[2]} frames x rows x cols), "
                       f"{t.n_text} text ({t.text_position})"),
            ("attention", f"{len(h.layers)} layers x {h.n_heads} heads x {h.head_dim} channels"),
            ("timesteps", ", ".join(f"{v:g}" for v in self.trace.timesteps)),
        ]
        versions = [f"{name} {self.trace.attrs[key]}" for name, key in
                    (("ditlens", "ditlens_version"), ("torch", "torch_version"), ("diffusers", "diffusers_version"))
                    if key in self.trace.attrs]
        if versions:
            facts.append(("made with", ", ".join(versions) + (f" on {self.trace.attrs['created']}"
                                                             if "created" in self.trace.attrs else "")))
        return facts

    def contents(self) -> list[ContentRow]:
        """Top-level groups with their dataset count, stored size and what they hold."""
        rows: list[ContentRow] = []
        for name in sorted(self._file.keys()):
            obj = self._file[name]
            datasets: list[h5py.Dataset] = []
            if isinstance(obj, h5py.Dataset):
                datasets = [obj]
            else:
                obj.visititems(lambda _n, o: datasets.append(o) if isinstance(o, h5py.Dataset) else None)
            size = sum(d.id.get_storage_size() for d in datasets)
            rows.append(ContentRow(f"/{name}", len(datasets), size, self._describe_group(name, datasets)))
        return rows

    def _describe_group(self, name: str, datasets: list[h5py.Dataset]) -> str:
        if name == "meta":
            return "labels: prompts, layers, branches, timesteps, token layout"
        if name == "stats":
            opts = self.stat_options()
            return (f"{len(self._keys)} per-head statistics; groups {', '.join(opts['group'])}; tensors "
                    f"{', '.join(opts['tensor'])}; comparisons {', '.join(opts['comparison'])}; metrics "
                    f"{', '.join(opts['metric'])}")
        if name == "raw":
            sel = self.trace.raw_selection()
            if sel is None:
                return "raw tensors (none stored)"
            return (f"raw float16 {', '.join(sel.tensors)}: {len(sel.steps)} steps, {len(sel.layers)} layers, "
                    f"{len(sel.heads)} heads, {len(sel.tokens)} tokens x {sel.channels} channels")
        if name == "maps":
            n = datasets[0].attrs.get("n_prompts") if datasets else None
            return "prompt aggregates from ditlens analyze (mean, cv)" + (f" over {int(n)} prompts" if n is not None else "")
        described = []
        for d in datasets[:4]:
            axes = python_value(d.attrs.get("axes", ""))
            described.append(f"{d.name} [{axes}]")
        more = f" and {len(datasets) - 4} more" if len(datasets) > 4 else ""
        return ", ".join(described) + more

    # -- descriptions ---------------------------------------------------------------------
    def describe_key(self, key: StatKey, branch: str | None) -> str:
        group, tensor, comparison, metric = key
        text = f"{group} {tensor.upper()}, {COMPARISON_NAMES[comparison]}, {METRIC_NAMES[metric]}"
        return text + (f", {branch}" if comparison == "step" and branch else "")

    def describe_prompt(self, prompt: int | None) -> str:
        if prompt is None:
            return f"mean of {self.n_done} prompts"
        return f"prompt {prompt} ({self.prompts[int(prompt)]!r})"

    # -- reading --------------------------------------------------------------------------
    def _dataset(self, path: str) -> h5py.Dataset:
        obj = self._file.get(path)
        if not isinstance(obj, h5py.Dataset):
            raise DitlensError(f"this trace has no dataset {path}")
        if "axes" not in obj.attrs:
            raise DitlensError(f"{path} has no axes attribute, so the dashboard cannot label it")
        return obj

    def _cut_prompt(self, dataset: h5py.Dataset, position: int, axis: str) -> bool:
        """A leading prompt axis of the planned length holds data for the finished prompts only."""
        return position == 0 and axis == "prompt" and dataset.shape[0] == len(self.header.prompts)

    def _read(self, path: str, index: tuple) -> np.ndarray:
        with self._lock:
            dataset = self._file[path]
            try:
                return np.asarray(dataset[index])
            except (OSError, RuntimeError) as error:
                raise DitlensError(f"cannot read {path} ({str(error).splitlines()[0]}): the trace is truncated or corrupt") from None

    def _cached(self, key: tuple, compute: Callable[[], object]) -> object:
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            value = compute()
            self._cache[key] = value
            while len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)
            return value


def default_pick(axis: str) -> str:
    """First value of an axis picker: the mean for prompts, heads, tokens; else the first entry."""
    return MEAN if axis in MEAN_BY_DEFAULT else "0"


def _finite(values: np.ndarray) -> np.ndarray:
    """inf (a zero mean in a CV) as NaN, so that means ignore it."""
    out = np.asarray(values, dtype=np.float64).copy()
    out[~np.isfinite(out)] = np.nan
    return out


def stat_key(group: str, tensor: str, comparison: str, metric: str) -> StatKey:
    return (str(group), str(tensor), str(comparison), str(metric))


__all__ = ["TraceData", "Heatmap", "ContentRow", "MEAN", "SUM", "human_bytes", "stat_key", "EXTRA_ROOTS", "default_pick"]
