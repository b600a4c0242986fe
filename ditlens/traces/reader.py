"""Reading ditlens traces: :class:`Trace` (lazy) and :class:`LabelledArray`.

A trace that a killed profiler left behind is still marked "open for SWMR write" in its
HDF5 superblock; :meth:`Trace.open` reads it through HDF5's single-writer/multiple-reader
mode, which also lets it follow a trace that is being written right now
(:meth:`Trace.refresh`). Only the prompts counted by ``/meta/n_done`` are ever returned.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ditlens.errors import DitlensError, TraceFormatError
from ditlens.traces.format import (
    COORD_ATTR_PREFIX,
    FORMAT,
    FORMAT_VERSION,
    PER_PROMPT_ATTR,
    RAW_INDEX_AXES,
    RawSelection,
    StatKey,
    TokenInfo,
    TraceHeader,
    all_stat_keys,
    header_from_attrs,
    is_stat_key,
    recorded_stat_keys,
    split_axes,
    stat_path,
)

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"

Label = int | float | str


@dataclass
class LabelledArray:
    """A numpy array with named axes and a label array per axis (like a tiny xarray)."""

    data: np.ndarray
    axes: tuple[str, ...]
    coords: dict[str, np.ndarray]

    def __post_init__(self) -> None:
        self.axes = tuple(self.axes)
        self.coords = dict(self.coords)  # never add to the caller's dict
        if self.data.ndim != len(self.axes):
            raise ValueError(f"data has {self.data.ndim} dimensions but {len(self.axes)} axes {self.axes}")
        for axis, size in zip(self.axes, self.data.shape):
            labels = self.coords.get(axis)
            if labels is None:
                self.coords[axis] = np.arange(size)
            elif len(labels) != size:
                raise ValueError(f"axis {axis!r} has {size} entries but {len(labels)} labels")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    def __array__(self, dtype=None, copy=None):  # noqa: ANN001 - numpy protocol
        return np.asarray(self.data, dtype=dtype)

    def sel(self, **where: object) -> LabelledArray:
        """Select along named axes. A value that is an int picks that position; a str or
        float picks the entry with that label (e.g. a prompt, a layer name, a timestep).
        A scalar drops the axis; a slice (positions) or a list of such values keeps it."""
        return self._select(where, by_label_only=False)

    def loc(self, **where: object) -> LabelledArray:
        """Like :meth:`sel` but every value, ints included, is a label (e.g. raw head 4)."""
        return self._select(where, by_label_only=True)

    def mean(self, axis: str | Sequence[str]) -> LabelledArray:
        """NaN-ignoring mean (float64) over one or more named axes; all-NaN slices give NaN."""
        names = (axis,) if isinstance(axis, str) else tuple(axis)
        positions = tuple(self._axis_position(name) for name in names)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=RuntimeWarning)  # "Mean of empty slice"
            data = np.nanmean(self.data.astype(np.float64, copy=False), axis=positions)
        kept = tuple(a for a in self.axes if a not in names)
        coords = {k: v for k, v in self.coords.items() if k not in names}
        return LabelledArray(np.asarray(data), kept, coords)

    def _axis_position(self, axis: str) -> int:
        if axis not in self.axes:
            raise DitlensError(f"no axis named {axis!r}: this array has axes {', '.join(self.axes) or '(none)'}")
        return self.axes.index(axis)

    def _select(self, where: dict[str, object], by_label_only: bool) -> LabelledArray:
        index: list[object] = [slice(None)] * len(self.axes)
        coords = dict(self.coords)
        for axis, value in where.items():
            pos = self._axis_position(axis)
            labels = self.coords[axis]
            if isinstance(value, slice):
                index[pos] = value
                coords[axis] = labels[value]
            elif isinstance(value, (list, tuple, np.ndarray)):
                picks = [_resolve(axis, labels, v, by_label_only) for v in np.asarray(value, dtype=object).ravel()]
                index[pos] = np.asarray(picks, dtype=np.intp)
                coords[axis] = labels[index[pos]]
            else:
                index[pos] = _resolve(axis, labels, value, by_label_only)
                coords.pop(axis)
        # Apply one axis at a time so several list selections do not broadcast together.
        data = self.data
        for pos in reversed(range(len(index))):
            sub = [slice(None)] * pos + [index[pos]]
            data = data[tuple(sub)]
        kept = tuple(a for a, i in zip(self.axes, index) if not isinstance(i, (int, np.integer)))
        return LabelledArray(np.asarray(data), kept, {k: coords[k] for k in kept if k in coords} | _aux(coords, self.axes))

    def __repr__(self) -> str:
        dims = ", ".join(f"{a}={n}" for a, n in zip(self.axes, self.data.shape))
        return f"LabelledArray({dims}; dtype={self.data.dtype})"


def _aux(coords: dict[str, np.ndarray], axes: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Non-axis entries of ``coords`` (e.g. ``step_index``) carried along unchanged."""
    return {k: v for k, v in coords.items() if k not in axes}


def _resolve(axis: str, labels: np.ndarray, value: object, by_label_only: bool) -> int:
    """Position on ``axis`` named by ``value`` (see :meth:`LabelledArray.sel`)."""
    size = len(labels)
    if isinstance(value, (bool, np.bool_)):
        raise DitlensError(f"cannot select {axis}={value!r}: use a position (int) or a label (str or float)")
    if isinstance(value, (int, np.integer)) and not by_label_only:
        pos = int(value)
        if not -size <= pos < size:
            raise DitlensError(f"{axis} position {pos} is out of range: the axis has {size} entries")
        return pos % size
    if labels.dtype.kind in "UO" and isinstance(value, str):
        matches = np.flatnonzero(labels.astype(str) == value)
    elif labels.dtype.kind in "fiu" and isinstance(value, (int, float, np.integer, np.floating)):
        target = float(value)
        if labels.dtype.kind == "f":
            matches = np.flatnonzero(np.isclose(labels, target, rtol=1e-9, atol=1e-9))
        else:
            matches = np.flatnonzero(labels == target)
    else:
        matches = np.array([], dtype=np.intp)
    if len(matches) == 1:
        return int(matches[0])
    shown = ", ".join(repr(x.item() if hasattr(x, "item") else x) for x in labels[:6])
    more = ", ..." if size > 6 else ""
    if len(matches) > 1:
        raise DitlensError(f"{axis} label {value!r} is ambiguous ({len(matches)} entries carry it): select by position")
    raise DitlensError(f"no {axis} labelled {value!r} (labels: {shown}{more})")


# ---------------------------------------------------------------------------------------
# Opening files


def open_h5_for_read(path: str | os.PathLike) -> tuple[h5py.File, bool]:
    """Open ``path`` read-only; returns (file, live) where live means SWMR read mode (the
    file is being written, or its writer was killed). Every failure is a one-line
    TraceFormatError."""
    p = Path(path)
    if not p.exists():
        raise TraceFormatError(f"no trace at {p}: check the path")
    if p.is_dir():
        raise TraceFormatError(f"{p} is a directory, not a trace file")
    size = p.stat().st_size
    with open(p, "rb") as fh:
        head = fh.read(8)
    if head != HDF5_SIGNATURE:
        if size and HDF5_SIGNATURE.startswith(head) and len(head) < 8:
            raise TraceFormatError(f"{p} is truncated ({size} bytes): copy it again or rerun the profile")
        raise TraceFormatError(f"{p} is not an HDF5 file, so not a ditlens trace")
    try:
        return h5py.File(p, "r"), False
    except OSError as first:
        message = str(first)
    if "open for write" in message or "consistency flags" in message:
        # A writer holds it in SWMR mode, or was killed while holding it.
        try:
            handle = h5py.File(p, "r", swmr=True)
        except OSError as second:
            raise TraceFormatError(
                f"{p} was left open for writing by a program that is not a ditlens profiler "
                f"({_first_line(second)}); if nothing writes it any more, clear the flag with `h5clear -s {p}`"
            ) from None
        stored = stored_end_of_file(p)
        if stored is not None and stored > size:
            handle.close()
            raise TraceFormatError(_truncated_message(p, size, stored))
        return handle, True
    if "truncated file" in message:
        stored = stored_end_of_file(p)
        raise TraceFormatError(_truncated_message(p, size, stored))
    if "unable to lock" in message.lower():
        try:
            return h5py.File(p, "r", locking=False), False
        except OSError as second:
            message = str(second)
    raise TraceFormatError(f"cannot read {p} as HDF5 ({_first_line(message)}): the file is corrupt")


def stored_end_of_file(path: str | os.PathLike) -> int | None:
    """End-of-file address recorded in a version 2/3 HDF5 superblock (None for others)."""
    with open(path, "rb") as fh:
        head = fh.read(64)
    if head[:8] != HDF5_SIGNATURE or len(head) < 12 or head[8] not in (2, 3):
        return None
    offset_size = head[9]
    start = 12 + 2 * offset_size  # after base address and superblock extension address
    if len(head) < start + offset_size:
        return None
    base = int.from_bytes(head[12 : 12 + offset_size], "little")
    return base + int.from_bytes(head[start : start + offset_size], "little")


def _truncated_message(p: Path, size: int, stored: int | None) -> str:
    expected = f", {stored} expected" if stored is not None else ""
    return f"{p} is truncated ({size} bytes{expected}): copy it again or rerun the profile"


def _first_line(error: object) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def check_format(handle: h5py.File, p: Path) -> int:
    """Raise TraceFormatError unless ``handle`` is a ditlens trace this version reads."""
    fmt = handle.attrs.get("format")
    if isinstance(fmt, bytes):
        fmt = fmt.decode("utf-8", "replace")
    if fmt != FORMAT:
        raise TraceFormatError(f"{p} is an HDF5 file but not a ditlens trace (its format attribute is {fmt!r})")
    version = handle.attrs.get("format_version")
    try:
        version_int = int(version)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TraceFormatError(f"{p} has an invalid format_version {version!r}: the file is corrupt") from None
    if version_int > FORMAT_VERSION:
        raise TraceFormatError(
            f"{p} uses trace format_version {version_int} but this ditlens reads up to {FORMAT_VERSION}: "
            "upgrade ditlens"
        )
    if version_int < 1:
        raise TraceFormatError(f"{p} has an invalid format_version {version_int}: the file is corrupt")
    return version_int


def python_value(value: object) -> object:
    """h5py attribute value -> plain Python (str, int, float, bool or list)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return [python_value(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_strings(dataset: h5py.Dataset) -> list[str]:
    return [str(s) for s in dataset.asstr()[()]]


def read_tokens(group: h5py.Group) -> TokenInfo:
    attrs = group.attrs
    return TokenInfo(
        n_image=int(attrs["n_image"]),
        n_text=int(attrs["n_text"]),
        text_position=str(python_value(attrs["text_position"])),
        grid=tuple(int(g) for g in np.asarray(attrs["grid"]).ravel()),  # type: ignore[arg-type]
    )


# ---------------------------------------------------------------------------------------
# The trace


class Trace:
    """A ditlens trace opened for reading. Nothing but ``/meta`` is read until asked."""

    def __init__(self, path: Path, handle: h5py.File, live: bool) -> None:
        self.path = path
        self._file = handle
        self.live = live  # opened in SWMR read mode: a writer is (or was) active
        try:
            self.format_version = check_format(handle, path)
            self.attrs: dict[str, object] = {k: python_value(v) for k, v in handle.attrs.items()}
            meta = handle["meta"]
            planned = read_strings(meta["prompts"])
            layers = read_strings(meta["layers"])
            branches = read_strings(meta["branches"])
            tokens = read_tokens(meta["tokens"])
            self.header: TraceHeader = header_from_attrs(self.attrs, planned, layers, branches, tokens)
            self._n_done_ds = meta["n_done"]
            self._timesteps_ds = meta["timesteps"]
            self.n_done = self._read_n_done()
            self.timesteps: np.ndarray = np.asarray(self._timesteps_ds[()], dtype=np.float64)
        except TraceFormatError:
            raise
        except (KeyError, OSError, ValueError, TypeError, RuntimeError) as error:
            raise TraceFormatError(
                f"{path} is a ditlens trace with missing or unreadable metadata ({_first_line(error)}): "
                "the file is corrupt"
            ) from None
        if self.timesteps.shape != (self.header.steps,):
            raise TraceFormatError(f"{path} has {self.timesteps.shape} timesteps for {self.header.steps} steps: corrupt")

    @classmethod
    def open(cls, path: str | os.PathLike) -> Trace:
        p = Path(path)
        handle, live = open_h5_for_read(p)
        try:
            return cls(p, handle, live)
        except BaseException:
            handle.close()
            raise

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Trace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Trace({str(self.path)!r}, model={self.header.model_id!r}, "
            f"prompts={self.n_done}/{len(self.header.prompts)}, steps={self.header.steps}, "
            f"layers={len(self.layers)}, heads={self.header.n_heads})"
        )

    def _read_n_done(self) -> int:
        value = int(self._n_done_ds[()])
        if not 0 <= value <= len(self.header.prompts):
            raise TraceFormatError(
                f"{self.path} claims {value} finished prompts of {len(self.header.prompts)}: the file is corrupt"
            )
        return value

    def refresh(self) -> int:
        """Re-read how many prompts are done (for a trace being written); returns n_done."""
        if self.live:  # SWMR readers must ask for the writer's latest metadata
            self._n_done_ds.refresh()
            self._timesteps_ds.refresh()
        self.n_done = self._read_n_done()
        self.timesteps = np.asarray(self._timesteps_ds[()], dtype=np.float64)
        return self.n_done

    # -- labels -------------------------------------------------------------------------
    @property
    def prompts(self) -> list[str]:
        """The finished prompts (the labels of the prompt axis of every returned array)."""
        return self.header.prompts[: self.n_done]

    @property
    def layers(self) -> list[str]:
        return self.header.layers

    @property
    def branches(self) -> list[str]:
        return self.header.branches

    @property
    def tokens(self) -> TokenInfo:
        return self.header.tokens

    @property
    def complete(self) -> bool:
        return self.n_done == len(self.header.prompts)

    @property
    def file_size(self) -> int:
        return self.path.stat().st_size

    # -- contents -----------------------------------------------------------------------
    def stat_keys(self) -> list[StatKey]:
        """The statistics this trace holds, in :func:`all_stat_keys` order."""
        return [key for key in all_stat_keys() if stat_path(key) in self._file]

    def filled_stat_keys(self) -> list[StatKey]:
        """The statistics this trace holds that its run could fill: a trace written before the profiler
        left them out also holds all-NaN ones (the text group of a model without text tokens)."""
        return recorded_stat_keys(self.stat_keys(), self.branches, self.tokens.n_text)

    def stat(self, group: str, tensor: str, comparison: str, metric: str) -> LabelledArray:
        """One statistic over the finished prompts."""
        key = (group, tensor, comparison, metric)
        if not is_stat_key(key):
            raise DitlensError(f"{'/'.join(map(str, key))} is not a ditlens statistic (see ditlens.traces.all_stat_keys())")
        path = stat_path(key)  # type: ignore[arg-type]
        if path not in self._file:
            raise DitlensError(
                f"{self.path} holds no {'/'.join(key)} statistic: profile again with that tensor/metric enabled"
            )
        return self.array(path)

    def has(self, path: str) -> bool:
        """True when the file holds a dataset or group at ``path``."""
        return path in self._file

    def datasets(self) -> list[str]:
        """Paths of every dataset in the file."""
        found: list[str] = []
        self._file.visititems(lambda name, obj: found.append("/" + name) if isinstance(obj, h5py.Dataset) else None)
        return sorted(found)

    def prompt_arrays(self) -> list[str]:
        """Paths of the further per-prompt datasets (see ``PromptArray``)."""
        return [p for p in self.datasets() if bool(self._file[p].attrs.get(PER_PROMPT_ATTR, False))]

    def array(self, path: str) -> LabelledArray:
        """Any dataset, labelled by its ``axes`` attribute. Arrays with a leading prompt axis
        are cut to the finished prompts."""
        if not (self.has(path) and isinstance(self._file[path], h5py.Dataset)):
            raise DitlensError(f"{self.path} has no dataset {path}")
        dataset = self._file[path]
        if "axes" not in dataset.attrs:
            raise TraceFormatError(f"{self.path}: dataset {path} has no axes attribute: the file is corrupt")
        axes = split_axes(dataset.attrs["axes"])
        if len(axes) != dataset.ndim:
            raise TraceFormatError(
                f"{self.path}: dataset {path} has {dataset.ndim} dimensions but axes {axes}: the file is corrupt"
            )
        parts = path.strip("/").split("/")
        if len(parts) == 2 and parts[0] == "raw" and parts[1] in self.raw_tensors():
            return self.raw(parts[1])  # labelled from /raw/index
        cut = axes[:1] == ("prompt",) and dataset.shape[0] == len(self.header.prompts)
        selection = np.s_[: self.n_done] if cut else ()
        data = self._read(dataset, path, selection)
        coords = self._default_coords(axes, data.shape)
        coords.update(self._stored_coords(dataset, axes, data.shape))
        return LabelledArray(data, axes, coords)

    def raw_tensors(self) -> list[str]:
        raw = self._file.get("raw")
        if not isinstance(raw, h5py.Group):
            return []
        return [name for name in ("q", "k", "v", "o") if isinstance(raw.get(name), h5py.Dataset)]

    def raw_selection(self) -> RawSelection | None:
        """The raw subset recorded, or None when the trace stores no raw tensors."""
        tensors = self.raw_tensors()
        if not tensors:
            return None
        index = {name: self._raw_index(name) for name in RAW_INDEX_AXES}
        channels = int(self._file["raw"][tensors[0]].shape[-1])
        return RawSelection(
            tensors=tuple(tensors),
            steps=tuple(index["step"].tolist()),
            layers=tuple(index["layer"].tolist()),
            heads=tuple(index["head"].tolist()),
            tokens=tuple(index["token"].tolist()),
            channels=channels,
        )

    def raw(self, tensor: str) -> LabelledArray:
        """Raw float16 values of one tensor over the finished prompts; coords of step (timesteps),
        layer (names), head and token (indices) come from ``/raw/index``; ``step_index`` is
        added as an extra coordinate."""
        if tensor not in self.raw_tensors():
            stored = ", ".join(self.raw_tensors()) or "none"
            raise DitlensError(
                f"{self.path} stores no raw {tensor!r} (raw tensors stored: {stored}); "
                "profile again with that tensor in the raw selection"
            )
        path = f"/raw/{tensor}"
        dataset = self._file[path]
        axes = split_axes(dataset.attrs["axes"])
        data = self._read(dataset, path, np.s_[: self.n_done])
        steps = self._raw_index("step")
        layers = self._raw_index("layer")
        coords: dict[str, np.ndarray] = {
            "prompt": np.asarray(self.prompts, dtype=str),
            "branch": np.asarray(self.branches, dtype=str),
            "step": self.timesteps[steps],
            "layer": np.asarray([self.layers[i] for i in layers], dtype=str),
            "head": self._raw_index("head"),
            "token": self._raw_index("token"),
            "channel": np.arange(data.shape[-1]),
            "step_index": steps,
        }
        for axis, size in zip(axes, data.shape):
            if len(coords[axis]) != size:
                raise TraceFormatError(f"{self.path}: /raw/index/{axis} does not match {path}: the file is corrupt")
        return LabelledArray(data, axes, coords)

    # -- helpers ------------------------------------------------------------------------
    def _raw_index(self, axis: str) -> np.ndarray:
        path = f"/raw/index/{axis}"
        if path not in self._file:
            raise TraceFormatError(f"{self.path} stores raw tensors but lacks {path}: the file is corrupt")
        return np.asarray(self._read(self._file[path], path, ()), dtype=np.int64)

    def _read(self, dataset: h5py.Dataset, path: str, selection: object) -> np.ndarray:
        try:
            if self.live:
                dataset.refresh()
            if h5py.check_string_dtype(dataset.dtype) is not None:
                return np.asarray(dataset.asstr()[selection], dtype=str)
            return np.asarray(dataset[selection])
        except (OSError, RuntimeError, ValueError) as error:
            raise TraceFormatError(
                f"cannot read {path} from {self.path} ({_first_line(error)}): the file is truncated or corrupt"
            ) from None

    def _default_coords(self, axes: tuple[str, ...], shape: tuple[int, ...]) -> dict[str, np.ndarray]:
        """Labels for the axis names the format knows, when the lengths fit."""
        known: dict[str, np.ndarray] = {
            "branch": np.asarray(self.branches, dtype=str),
            "step": self.timesteps,
            "layer": np.asarray(self.layers, dtype=str),
        }
        coords: dict[str, np.ndarray] = {}
        for axis, size in zip(axes, shape):
            if axis == "prompt":
                if size == self.n_done:
                    coords[axis] = np.asarray(self.prompts, dtype=str)
                elif size == len(self.header.prompts):
                    coords[axis] = np.asarray(self.header.prompts, dtype=str)
            elif axis in known and len(known[axis]) == size:
                coords[axis] = known[axis]
        return coords

    def _stored_coords(self, dataset: h5py.Dataset, axes: tuple[str, ...], shape: tuple[int, ...]) -> dict[str, np.ndarray]:
        """Labels written with ``write_array(..., coords=...)`` (attrs ``coords.<axis>``)."""
        coords: dict[str, np.ndarray] = {}
        for axis, size in zip(axes, shape):
            name = COORD_ATTR_PREFIX + axis
            if name in dataset.attrs:
                labels = np.asarray(dataset.attrs[name])
                if labels.dtype.kind in "SO":
                    labels = np.asarray([python_value(v) for v in labels.ravel()], dtype=str)
                if len(labels) == size:
                    coords[axis] = labels
        return coords


__all__ = ["LabelledArray", "Trace", "open_h5_for_read", "stored_end_of_file"]
