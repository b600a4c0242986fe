"""Writing ditlens traces, prompt by prompt, so that a killed run loses at most one prompt.

How a trace stays readable whatever happens to the writing process:

* The whole structure (every dataset, preallocated at its final shape with NaN fill) is
  built in a hidden temporary file next to the target, closed, and renamed into place,
  so the target path only ever holds a complete, cleanly closed HDF5 file.
* Prompts are then written with HDF5 in single-writer/multiple-reader (SWMR) mode, opened
  directly as SWMR so the superblock never shows a plain "open for write" state. SWMR
  orders its metadata writes so that the file on disk is consistent at every moment
  (that is what lets readers follow a live writer), hence also at the moment of a kill.
* ``/meta/n_done`` is the commit marker: a prompt's data is written, flushed and fsynced
  before the marker is raised, which is flushed and fsynced in turn. Readers only ever
  return the first ``n_done`` prompts, so a half-written prompt is invisible.
* Changing the structure (new derived datasets, a longer prompt list, repairing a killed
  run's file) never happens in place: a staged copy is modified and renamed over the
  original when done.
* A lock file next to the trace (``.<name>.lock``, flock) keeps two ditlens writers from
  working on one trace at once.
"""

from __future__ import annotations

import errno
import glob
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ditlens.errors import DitlensError
from ditlens.traces.format import (
    COORD_ATTR_PREFIX,
    FORMAT,
    FORMAT_VERSION,
    PER_PROMPT_ATTR,
    RAW_AXES,
    RAW_INDEX_AXES,
    RESERVED_ROOTS,
    PromptArray,
    RawSelection,
    StatKey,
    TraceHeader,
    check_stat_key,
    check_user_path,
    chunk_shape,
    join_axes,
    normalize_path,
    run_mismatch,
    split_axes,
    stat_axes,
    stat_path,
)
from ditlens.traces.reader import Trace

try:  # advisory locking is POSIX-only; elsewhere a second writer is not detected
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

STATS_COMPRESSION = {"compression": "gzip", "compression_opts": 1, "shuffle": True}  # level 1: same ratio on float noise, 2x faster
RAW_COMPRESSION = {"compression": "gzip", "compression_opts": 1, "shuffle": True}
# Derived arrays below this size are stored contiguous and uncompressed.
SMALL_ARRAY_BYTES = 64 * 1024


def _libver() -> tuple[str, str]:
    """Oldest format that supports SWMR (HDF5 1.10) up to the newest 1.x one, so that
    HDF5 1.10+ everywhere can read the traces."""
    try:
        from h5py._hl.files import libver_dict  # the names this h5py accepts for libver
    except ImportError:  # pragma: no cover - a future h5py layout
        libver_dict = {}
    return ("v110", "v114" if "v114" in libver_dict else "latest")


def _swmr_fapl() -> h5py.h5p.PropFAID:
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    high = getattr(h5py.h5f, "LIBVER_V114", h5py.h5f.LIBVER_LATEST)
    fapl.set_libver_bounds(h5py.h5f.LIBVER_V110, high)
    mdc_elements, slots, _, w0 = fapl.get_cache()
    fapl.set_cache(mdc_elements, slots, 0, w0)  # no chunk cache: see _open_for_change
    return fapl


def _open_for_change(path: Path, mode: str) -> h5py.File:
    """Open for building or changing a file. Without a chunk cache every chunk is written
    by the call that writes it, so a full disk raises there; a cached chunk would be
    written when its dataset is closed, where h5py can only print the error and go on."""
    return h5py.File(path, mode, libver=_libver(), rdcc_nbytes=0)


def _library_versions() -> dict[str, str]:
    """Versions of the libraries that shaped the numbers, read without importing them."""
    from importlib import metadata

    import ditlens

    versions = {"ditlens_version": ditlens.__version__}
    for name in ("torch", "diffusers"):
        try:
            versions[f"{name}_version"] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[f"{name}_version"] = "not installed"
    versions["h5py_version"] = h5py.version.version
    versions["hdf5_version"] = h5py.version.hdf5_version
    return versions


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _utf8(values: Sequence[str]) -> np.ndarray:
    return np.asarray(list(values), dtype=h5py.string_dtype("utf-8"))


def _is_disk_full(error: BaseException) -> bool:
    text = str(error)
    return (
        getattr(error, "errno", None) == errno.ENOSPC
        or "No space left" in text
        or "errno = 28," in text
        or "ENOSPC" in text
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _fsync_file(handle: h5py.File) -> None:
    """Push the OS's copy of the file to the disk (the sec2 driver exposes its fd)."""
    try:
        fd = handle.id.get_vfd_handle()
    except Exception:  # noqa: BLE001 - other drivers have no fd; flushing was all we could do
        return
    if isinstance(fd, int):
        os.fsync(fd)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _temp_path(path: Path, purpose: str) -> Path:
    """Hidden sibling of ``path`` (same filesystem, so the final rename is atomic)."""
    return path.parent / f".{path.name}.{purpose}-{os.getpid()}.tmp"


def _remove_stale_temps(path: Path) -> None:
    """Delete temporaries a killed ditlens process left beside ``path`` (safe: we hold the lock)."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*-*.tmp"):
        stale.unlink(missing_ok=True)


def _to_numpy(value: Any, dtype: np.dtype | type | None = None) -> np.ndarray:
    """numpy array of ``value`` (numpy or a CPU/GPU torch tensor) in ``dtype``."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor; no torch import needed
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            value = value.float()
        value = value.numpy()
    return np.asarray(value, dtype=dtype)


class _WriterLock:
    """An exclusive flock on ``.<name>.lock`` beside the trace, held while a writer is open."""

    def __init__(self, trace_path: Path) -> None:
        self.path = trace_path.parent / f".{trace_path.name}.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        if fcntl is None:  # pragma: no cover
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
                os.close(fd)
                raise DitlensError(
                    f"{self.path.parent / self.path.name[1:-5]} is being written by another ditlens process "
                    f"(pid {holder}): wait for it to finish or stop it first"
                ) from None
            # The previous holder may have unlinked the file between our open and our flock.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode("ascii"))
                self._fd = fd
                return
            os.close(fd)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None


# ---------------------------------------------------------------------------------------
# Building a file


def _validate_layout(
    header: TraceHeader,
    stat_keys: Sequence[StatKey],
    raw: RawSelection | None,
    prompt_arrays: Sequence[PromptArray],
) -> list[StatKey]:
    header.validate()
    keys = [check_stat_key(tuple(k)) for k in stat_keys]
    if len(set(keys)) != len(keys):
        raise ValueError("stat_keys has duplicates")
    if any(k[2] == "cfg" for k in keys) and set(header.branches) != {"cond", "uncond"}:
        raise ValueError("cfg statistics compare cond with uncond: the header needs both branches")
    if raw is not None:
        raw.validate(header)
    paths = [a.path for a in prompt_arrays]
    if len(set(paths)) != len(paths):
        raise ValueError("prompt_arrays has duplicate paths")
    for a, b in ((a, b) for a in paths for b in paths if a != b):
        if b.startswith(a + "/"):
            raise ValueError(f"prompt array {a} cannot also be the group of {b}")
    return keys


def _stat_shape(header: TraceHeader, comparison: str) -> tuple[int, ...]:
    n_prompts, steps, layers, heads = len(header.prompts), header.steps, len(header.layers), header.n_heads
    if comparison == "step":
        return (n_prompts, len(header.branches), steps, layers, heads)
    return (n_prompts, steps, layers, heads)


def _build_file(
    path: Path,
    header: TraceHeader,
    stat_keys: Sequence[StatKey],
    raw: RawSelection | None,
    prompt_arrays: Sequence[PromptArray],
    created: str,
    create_data: bool = True,
) -> None:
    """Write a complete, empty trace (NaN everywhere, n_done = 0) to ``path``."""
    n_prompts = len(header.prompts)
    with _open_for_change(path, "w") as f:
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        for key, value in header.run_attrs().items():
            f.attrs[key] = value
        for key, value in _library_versions().items():
            f.attrs[key] = value
        f.attrs["created"] = created
        for key, value in header.extra.items():
            f.attrs[key] = value

        meta = f.create_group("meta")
        for name, axis, values in (
            ("prompts", "prompt", header.prompts),
            ("layers", "layer", header.layers),
            ("branches", "branch", header.branches),
        ):
            meta.create_dataset(name, data=_utf8(values)).attrs["axes"] = axis
        # Contiguous and allocated now: later writes change bytes in place, never the structure.
        meta.create_dataset("timesteps", data=np.full(header.steps, np.nan, dtype=np.float64)).attrs["axes"] = "step"
        meta.create_dataset("n_done", data=np.int64(0)).attrs["axes"] = ""
        tokens = meta.create_group("tokens")
        tokens.attrs["n_image"] = header.tokens.n_image
        tokens.attrs["n_text"] = header.tokens.n_text
        tokens.attrs["text_position"] = header.tokens.text_position
        tokens.attrs["grid"] = np.asarray(header.tokens.grid, dtype=np.int64)

        if not create_data:
            return
        for key in stat_keys:
            shape = _stat_shape(header, key[2])
            ds = f.create_dataset(
                stat_path(key),
                shape=shape,
                dtype=np.float32,
                chunks=chunk_shape(shape, 4),
                fillvalue=np.float32(np.nan),
                **STATS_COMPRESSION,
            )
            ds.attrs["axes"] = join_axes(stat_axes(key[2]))
        if raw is not None:
            shape = (n_prompts, *raw.prompt_shape(len(header.branches)))
            for tensor in raw.tensors:
                ds = f.create_dataset(
                    f"/raw/{tensor}",
                    shape=shape,
                    dtype=np.float16,
                    chunks=chunk_shape(shape, 2, fixed_ones=4),  # prompt, branch, step, layer
                    fillvalue=np.float16(np.nan),
                    **RAW_COMPRESSION,
                )
                ds.attrs["axes"] = join_axes(RAW_AXES)
            index = f.require_group("/raw/index")
            for axis, values in zip(RAW_INDEX_AXES, (raw.steps, raw.layers, raw.heads, raw.tokens)):
                index.create_dataset(axis, data=np.asarray(values, dtype=np.int64)).attrs["axes"] = axis
        for spec in prompt_arrays:
            shape = (n_prompts, *spec.shape)
            dtype = np.dtype(spec.dtype)
            fill = np.nan if dtype.kind == "f" else 0
            ds = f.create_dataset(
                spec.path,
                shape=shape,
                dtype=dtype,
                chunks=chunk_shape(shape, dtype.itemsize),
                fillvalue=np.asarray(fill, dtype=dtype),
                **STATS_COMPRESSION,
            )
            ds.attrs["axes"] = join_axes(("prompt", *spec.axes))
            ds.attrs[PER_PROMPT_ATTR] = 1


def _prompt_array_specs(trace: Trace) -> list[PromptArray]:
    specs = []
    for path in trace.prompt_arrays():
        ds = trace._file[path]
        axes = split_axes(ds.attrs["axes"])
        specs.append(PromptArray(path=path, axes=axes[1:], shape=ds.shape[1:], dtype=ds.dtype.str))
    return specs


def _prompt_axis_paths(stat_keys: Sequence[StatKey], raw: RawSelection | None, arrays: Sequence[PromptArray]) -> list[str]:
    paths = [stat_path(k) for k in stat_keys]
    if raw is not None:
        paths += [f"/raw/{t}" for t in raw.tensors]
    return paths + [a.path for a in arrays]


def _rebuild(source: Trace, target: Path, header: TraceHeader) -> None:
    """Write to ``target`` a clean copy of ``source`` with the planned prompts of ``header``:
    finished prompts and derived arrays copied, everything else NaN."""
    src = source._file
    stat_keys = source.stat_keys()
    raw = source.raw_selection()
    arrays = _prompt_array_specs(source)
    n_done = source.n_done
    created = str(source.attrs.get("created", _now()))
    _build_file(target, header, stat_keys, raw, arrays, created=created)
    with _open_for_change(target, "r+") as dst:
        for path in _prompt_axis_paths(stat_keys, raw, arrays):
            source_ds, target_ds = src[path], dst[path]
            for i in range(n_done):  # one prompt at a time keeps memory bounded
                target_ds[i] = source_ds[i]
        dst["/meta/timesteps"][...] = source.timesteps
        per_prompt = set(_prompt_axis_paths(stat_keys, raw, arrays))
        _copy_derived(src, dst, per_prompt)
        dst["/meta/n_done"][()] = n_done


def _copy_derived(src: h5py.File, dst: h5py.File, skip: set[str]) -> None:
    """Copy every group attribute and dataset outside the format's own groups."""
    items: list[tuple[str, h5py.HLObject]] = []
    src.visititems(lambda name, obj: items.append(("/" + name, obj)))
    for path, obj in items:
        if path.split("/")[1] in RESERVED_ROOTS or path in skip:
            continue
        if isinstance(obj, h5py.Group):
            group = dst.require_group(path)
            for key, value in obj.attrs.items():
                group.attrs[key] = value
        elif not any(path.startswith(s + "/") for s in skip):
            parent, name = path.rsplit("/", 1)
            src.copy(obj, dst.require_group(parent or "/"), name=name)


# ---------------------------------------------------------------------------------------
# The writer


class TraceWriter:
    """Streams a trace to disk, one prompt at a time (see the module docstring for why a
    killed run leaves a readable file). Use :meth:`create`, :meth:`resume` or
    :func:`open_for_append`; it is a context manager."""

    def __init__(
        self,
        path: Path,
        header: TraceHeader,
        stat_keys: list[StatKey],
        raw: RawSelection | None,
        prompt_arrays: list[PromptArray],
        n_done: int,
        timesteps: np.ndarray | None,
        lock: _WriterLock,
    ) -> None:
        self.path = path
        self.header = header
        self.stat_keys = stat_keys
        self.raw = raw
        self.prompt_arrays = prompt_arrays
        self.n_done = n_done
        self._timesteps = timesteps
        self._lock = lock
        self._file: h5py.File | None = None  # SWMR on self.path, or plain on the staged copy
        self._staged: Path | None = None
        self._datasets: dict[str, h5py.Dataset] = {}
        self._closed = False

    # -- opening ------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        header: TraceHeader,
        stat_keys: Sequence[StatKey],
        raw: RawSelection | None = None,
        overwrite: bool = False,
        prompt_arrays: Sequence[PromptArray] = (),
    ) -> TraceWriter:
        """Start a new trace. ``prompt_arrays`` declares further per-prompt datasets that
        :meth:`write_prompt` fills (``arrays=``)."""
        target = Path(path)
        arrays = list(prompt_arrays)
        keys = _validate_layout(header, stat_keys, raw, arrays)
        check_can_write(target, probe_lock=False)  # the lock is taken just below
        if target.exists() and not overwrite:
            raise DitlensError(f"{target} already exists: pass --overwrite to replace it (or, profiling, --resume to continue it)")
        lock = _WriterLock(target)
        lock.acquire()
        _remove_stale_temps(target)
        temp = _temp_path(target, "new")
        try:
            _build_file(temp, header, keys, raw, arrays, created=_now())
            _fsync_path(temp)
            os.replace(temp, target)
            _fsync_dir(target.parent)
        except BaseException as error:
            temp.unlink(missing_ok=True)
            lock.release()
            if isinstance(error, OSError):
                raise _io_error(error, f"creating {target}", "nothing was written; free space and run again") from None
            raise
        writer = cls(target, header, keys, raw, arrays, n_done=0, timesteps=None, lock=lock)
        writer._open_now()
        return writer

    @classmethod
    def resume(cls, path: str | os.PathLike, header: TraceHeader) -> TraceWriter:
        """Continue a trace written by an earlier (possibly killed) run with the same settings.
        ``header.prompts`` must start with the prompts already done; it may plan more (or
        other not-yet-done) prompts than the trace did. The trace keeps its own ``extra``
        attributes (root attributes cannot change while prompts are being added)."""
        target = Path(path)
        header.validate()
        lock = _WriterLock(target)
        lock.acquire()
        try:
            writer = cls._attach(target, header, lock)
        except BaseException:
            lock.release()
            raise
        if not writer.complete:
            writer._open_now()
        return writer

    @classmethod
    def _attach(cls, target: Path, wanted: TraceHeader | None, lock: _WriterLock) -> TraceWriter:
        """Open an existing trace for writing (we hold its lock). A file left by a killed
        writer, or one whose prompt list changes, is first rebuilt into a clean copy."""
        _remove_stale_temps(target)
        with Trace.open(target) as trace:
            recorded = trace.header
            if wanted is not None:
                _check_resumable(target, trace, wanted)
                # Root attributes cannot change under SWMR: the trace's own extras stay.
                header = replace(wanted, extra=dict(recorded.extra))
            else:
                header = recorded
            if trace.live or header.prompts != recorded.prompts:
                temp = _temp_path(target, "resume")
                try:
                    _rebuild(trace, temp, header)
                    _fsync_path(temp)
                except BaseException as error:
                    temp.unlink(missing_ok=True)
                    if isinstance(error, OSError):
                        raise _io_error(
                            error, f"preparing {target} for writing", "the trace is unchanged; free space and retry"
                        ) from None
                    raise
                os.replace(temp, target)
                _fsync_dir(target.parent)
            stat_keys = trace.stat_keys()
            raw = trace.raw_selection()
            arrays = _prompt_array_specs(trace)
            n_done = trace.n_done
            timesteps = trace.timesteps if n_done > 0 and not np.isnan(trace.timesteps).any() else None
        return cls(target, header, stat_keys, raw, arrays, n_done=n_done, timesteps=timesteps, lock=lock)

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TraceWriter({str(self.path)!r}, prompts={self.n_done}/{self.n_prompts})"

    @property
    def n_prompts(self) -> int:
        """Planned prompts (length of the prompt axis)."""
        return len(self.header.prompts)

    @property
    def complete(self) -> bool:
        return self.n_done == self.n_prompts

    # -- writing prompts ----------------------------------------------------------------
    def write_prompt(
        self,
        prompt_index: int,
        timesteps: np.ndarray,
        stats: Mapping[StatKey, np.ndarray],
        raw: Mapping[str, np.ndarray] | None = None,
        arrays: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Write one prompt's statistics (``step`` keys: (branch, step, layer, head); ``cfg``
        keys: (step, layer, head)), raw tensors ((branch, step, layer, head, token, channel)
        of the selection), per-prompt ``arrays``; then commit it (``n_done`` += 1)."""
        self._check_open()
        if prompt_index != self.n_done:
            raise ValueError(f"write_prompt({prompt_index}) out of order: the next prompt to write is {self.n_done}")
        if self.n_done >= self.n_prompts:
            raise ValueError(f"all {self.n_prompts} planned prompts are written already")
        steps_values = self._check_timesteps(timesteps)
        writes = self._prepare(stats, raw or {}, arrays or {})

        k = prompt_index
        try:
            self._ensure_swmr()
            f, datasets = self._file, self._datasets
            assert f is not None
            if self._timesteps is None:
                self._write_slice(datasets["/meta/timesteps"], (), steps_values)
            for path, data in writes:
                self._write_slice(datasets[path], k, data)
            f.flush()
            _fsync_file(f)
            # The commit marker goes last, after the data is on disk.
            self._write_slice(datasets["/meta/n_done"], (), np.int64(k + 1))
            f.flush()
            _fsync_file(f)
        except OSError as error:
            self._abandon()
            raise _io_error(
                error,
                f"writing prompt {k + 1} of {self.n_prompts} to {self.path}",
                f"{_safe_prompts(k)}; free space (or fix the problem) and rerun with --resume",
            ) from None
        except BaseException:
            self._abandon()
            raise
        self._timesteps = steps_values
        self.n_done = k + 1

    def _write_slice(self, dataset: h5py.Dataset, index: Any, data: np.ndarray) -> None:
        """Every write goes through here (one place to observe or interrupt writes in tests)."""
        dataset[index] = data

    def _check_timesteps(self, timesteps: np.ndarray) -> np.ndarray:
        values = _to_numpy(timesteps, np.float64).reshape(-1)
        if values.shape != (self.header.steps,):
            raise ValueError(f"timesteps has {values.size} values for {self.header.steps} steps")
        if self._timesteps is not None and not np.allclose(values, self._timesteps, rtol=1e-9, atol=1e-9):
            raise DitlensError(
                f"the scheduler timesteps of this prompt differ from those recorded in {self.path}: "
                "use the same scheduler and step count, or write a new trace"
            )
        return values

    def _prepare(
        self,
        stats: Mapping[StatKey, np.ndarray],
        raw: Mapping[str, np.ndarray],
        arrays: Mapping[str, np.ndarray],
    ) -> list[tuple[str, np.ndarray]]:
        """Check every input against the layout before anything is written."""
        given = {tuple(k) for k in stats}
        missing = [k for k in self.stat_keys if k not in given]
        extra = [k for k in given if k not in set(self.stat_keys)]
        if missing or extra:
            raise ValueError(
                f"stats keys do not match the trace: missing {['/'.join(k) for k in missing]}, "
                f"not in the trace {['/'.join(map(str, k)) for k in extra]}"
            )
        h = self.header
        writes: list[tuple[str, np.ndarray]] = []
        for key in self.stat_keys:
            data = _to_numpy(stats[key], np.float32)
            expected = _stat_shape(h, key[2])[1:]
            if data.shape != expected:
                axes = ",".join(stat_axes(key[2])[1:])
                raise ValueError(f"stats[{'/'.join(key)}] has shape {data.shape}, expected {expected} ({axes})")
            writes.append((stat_path(key), data))
        wanted_raw = set(self.raw.tensors) if self.raw is not None else set()
        if set(raw) != wanted_raw:
            raise ValueError(f"raw tensors {sorted(raw)} do not match the trace's raw selection {sorted(wanted_raw)}")
        if self.raw is not None:
            expected = self.raw.prompt_shape(len(h.branches))
            for tensor in self.raw.tensors:
                data = _to_numpy(raw[tensor], np.float16)
                if data.shape != expected:
                    raise ValueError(
                        f"raw[{tensor!r}] has shape {data.shape}, expected {expected} "
                        "(branch, step, layer, head, token, channel)"
                    )
                writes.append((f"/raw/{tensor}", data))
        specs = {a.path: a for a in self.prompt_arrays}
        given_arrays = {normalize_path(p): v for p, v in arrays.items()}
        if set(given_arrays) != set(specs):
            raise ValueError(f"arrays {sorted(given_arrays)} do not match the declared prompt arrays {sorted(specs)}")
        for path, spec in specs.items():
            data = _to_numpy(given_arrays[path], np.dtype(spec.dtype))
            if data.shape != spec.shape:
                raise ValueError(f"arrays[{path!r}] has shape {data.shape}, expected {spec.shape} ({','.join(spec.axes)})")
            writes.append((path, data))
        return writes

    # -- derived arrays -----------------------------------------------------------------
    def write_array(
        self,
        path: str,
        data: np.ndarray,
        axes: Sequence[str],
        attrs: Mapping[str, Any] | None = None,
        coords: Mapping[str, Sequence[Any]] | None = None,
    ) -> None:
        """Store a derived dataset (e.g. ``/maps/...``), replacing any dataset at ``path``.
        ``coords`` gives labels for some axes (stored as ``coords.<axis>`` attrs). Changes
        go to a staged copy that replaces the trace on :meth:`close` (or the next
        :meth:`write_prompt`), so a kill never damages the trace."""
        self._check_open()
        path = normalize_path(path)
        check_user_path(path)
        if path in {a.path for a in self.prompt_arrays}:
            raise ValueError(f"{path} is a per-prompt array: write it with write_prompt(arrays=...)")
        values = _to_numpy(data)
        if values.dtype.kind in "UO":  # text labels, e.g. a method per (step, layer)
            values = np.asarray(values.astype(str).astype(object), dtype=h5py.string_dtype("utf-8"))
        axes = tuple(axes)
        if len(axes) != values.ndim:
            raise ValueError(f"{path}: data has {values.ndim} dimensions but axes {axes}")
        axes_attr = join_axes(axes) if axes else ""
        labels: dict[str, np.ndarray] = {}
        for axis, entries in (coords or {}).items():
            if axis not in axes:
                raise ValueError(f"{path}: coords given for unknown axis {axis!r}")
            array = np.asarray(list(entries))
            if len(array) != values.shape[axes.index(axis)]:
                raise ValueError(f"{path}: {len(array)} labels for axis {axis!r} of length {values.shape[axes.index(axis)]}")
            labels[axis] = _utf8([str(x) for x in array]) if array.dtype.kind in "USO" else array
        try:
            self._begin_staging()
            f = self._file
            assert f is not None
            existing = f.get(path)
            if isinstance(existing, h5py.Dataset) and existing.shape == values.shape and existing.dtype == values.dtype:
                existing[...] = values  # same layout: overwrite in place, no space leaked
                ds = existing
                for key in list(ds.attrs):
                    del ds.attrs[key]
            else:
                if existing is not None:
                    del f[path]
                ds = self._create_derived(f, path, values)
            ds.attrs["axes"] = axes_attr
            for key, value in (attrs or {}).items():
                ds.attrs[key] = value
            for axis, value in labels.items():
                ds.attrs[COORD_ATTR_PREFIX + axis] = value
        except OSError as error:
            self._abandon()
            raise _io_error(
                error, f"writing {path} to a staged copy of {self.path}", "the trace itself is unchanged; free space and retry"
            ) from None

    @staticmethod
    def _create_derived(f: h5py.File, path: str, values: np.ndarray) -> h5py.Dataset:
        if values.ndim == 0 or values.nbytes < SMALL_ARRAY_BYTES or values.dtype.kind not in "fiub":
            return f.create_dataset(path, data=values)
        return f.create_dataset(path, data=values, chunks=True, **STATS_COMPRESSION)

    # -- file states --------------------------------------------------------------------
    def _ensure_swmr(self) -> None:
        """Have ``self._file`` open in SWMR write mode on the trace itself."""
        if self._staged is not None:
            self._commit_staging()
        if self._file is None:
            try:
                fid = h5py.h5f.open(
                    os.fsencode(self.path), h5py.h5f.ACC_RDWR | h5py.h5f.ACC_SWMR_WRITE, fapl=_swmr_fapl()
                )
            except OSError as error:
                if "unable to lock" in str(error).lower():
                    raise DitlensError(
                        f"{self.path} is open in another program (a dashboard or another reader): "
                        "close it, then run again (with --resume to continue the trace)"
                    ) from None
                if "open for write" in str(error):
                    raise DitlensError(
                        f"{self.path} is open for writing elsewhere ({_first_line(error)}): close that program first"
                    ) from None
                raise
            self._file = h5py.File(fid)
            # Keep every dataset open for the session: closing one can flush data, and
            # errors there are only printed by h5py, never raised.
            self._datasets = {
                path: self._file[path]
                for path in ["/meta/timesteps", "/meta/n_done", *_prompt_axis_paths(self.stat_keys, self.raw, self.prompt_arrays)]
            }

    def _open_now(self) -> None:
        """Open for writing prompts at once, so a blocked file fails before any model runs."""
        try:
            self._ensure_swmr()
        except BaseException:
            self._abandon()
            raise

    def _begin_staging(self) -> None:
        """Switch to a staged copy of the trace that structure changes can go to."""
        if self._staged is not None:
            return
        if self._file is not None:
            self._file.close()
            self._file = None
            self._datasets = {}
        temp = _temp_path(self.path, "stage")
        try:
            shutil.copyfile(self.path, temp)
            self._file = _open_for_change(temp, "r+")
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        self._staged = temp

    def _commit_staging(self) -> None:
        assert self._staged is not None and self._file is not None
        self._file.close()
        self._file = None
        self._datasets = {}
        _fsync_path(self._staged)
        os.replace(self._staged, self.path)
        _fsync_dir(self.path.parent)
        self._staged = None

    def _abandon(self) -> None:
        """After a failure: drop the staged copy, close without raising, release the lock."""
        if self._file is not None:
            try:
                self._file.close()
            except Exception:  # noqa: BLE001 - the file is already in trouble; the marker protects readers
                pass
            self._file = None
            self._datasets = {}
        if self._staged is not None:
            self._staged.unlink(missing_ok=True)
            self._staged = None
        self._lock.release()
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise DitlensError(f"the writer for {self.path} is closed (after close() or an error): reopen with --resume")

    def close(self) -> None:
        """Commit staged changes, close the file and release the lock (idempotent)."""
        if self._closed:
            return
        try:
            if self._staged is not None:
                self._commit_staging()
            elif self._file is not None:
                self._file.flush()
                _fsync_file(self._file)
                self._file.close()
                self._file = None
                self._datasets = {}
        except OSError as error:
            self._abandon()
            raise _io_error(
                error, f"closing {self.path}", f"{_safe_prompts(self.n_done)}; free space and rerun with --resume"
            ) from None
        except BaseException:
            self._abandon()
            raise
        self._lock.release()
        self._closed = True


def _check_resumable(path: Path, trace: Trace, wanted: TraceHeader) -> None:
    mismatch = run_mismatch(trace.header, wanted)
    if mismatch is not None:
        field, recorded, asked = mismatch
        raise DitlensError(
            f"cannot resume {path}: {field} differs (trace: {recorded}, this run: {asked}); "
            "rerun with the trace's settings or write a new trace"
        )
    done = trace.prompts
    if len(wanted.prompts) < len(done):
        raise DitlensError(
            f"cannot resume {path}: it has {len(done)} finished prompts but this run plans only "
            f"{len(wanted.prompts)}; pass the same prompts (more may follow)"
        )
    for i, (have, want) in enumerate(zip(done, wanted.prompts)):
        if have != want:
            raise DitlensError(
                f"cannot resume {path}: prompts differ at finished prompt {i} (trace: {have!r}, "
                f"this run: {want!r}); pass the same prompts in the same order"
            )


def _safe_prompts(n_done: int) -> str:
    if n_done == 0:
        return "no prompt was finished yet"
    return f"the {n_done} finished prompt{'s' if n_done > 1 else ''} {'are' if n_done > 1 else 'is'} safe"


def check_can_write(path: str | os.PathLike, *, probe_lock: bool = True) -> None:
    """Refuse, before any model runs, a trace path that cannot be written: a folder, a folder that
    cannot be made or written in, or (``probe_lock``) a trace another ditlens process is writing.
    Processes that start together on one path (torchrun ranks) must not probe its lock."""
    target = Path(path)
    if target.is_dir():
        raise DitlensError(f"{target} is a directory: give a file path for the trace")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DitlensError(f"cannot make the folder of {target} ({_first_line(error)}): choose another path") from None
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise DitlensError(f"cannot write in {target.parent} (permission denied): choose another path")
    if not probe_lock:
        return
    lock = _WriterLock(target)
    try:
        lock.acquire()
    except OSError as error:
        raise _io_error(error, f"locking {target}", "choose another path") from None
    lock.release()


def _io_error(error: OSError, action: str, advice: str) -> DitlensError:
    if _is_disk_full(error):
        return DitlensError(f"disk full while {action}: {advice}")
    return DitlensError(f"I/O error while {action} ({_first_line(error)}): {advice}")


def open_for_append(path: str | os.PathLike) -> TraceWriter:
    """A writer on an existing (usually finished) trace, for ``write_array`` of derived
    data; the changes replace the trace atomically on ``close()``."""
    target = Path(path)
    lock = _WriterLock(target)
    lock.acquire()
    try:
        return TraceWriter._attach(target, None, lock)
    except BaseException:
        lock.release()
        raise


__all__ = ["TraceWriter", "open_for_append"]
