"""Tests of the HDF5 trace store (ditlens.traces): round trip, crash safety with real
process kills, full disk, foreign/truncated/newer files, resume, merge, LabelledArray.

The crash tests run this very file as a child process (``child_main``) that writes a
trace and is killed with os._exit or SIGKILL at a chosen point; the parent then checks the
file against the same deterministic data (``prompt_data``).
"""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest

import ditlens.traces.writer as writer_module
from ditlens.errors import DitlensError, TraceFormatError
from ditlens.traces import (
    FORMAT,
    LabelledArray,
    PromptArray,
    RawSelection,
    TokenInfo,
    Trace,
    TraceHeader,
    TraceWriter,
    all_stat_keys,
    merge_traces,
    open_for_append,
    parse_stat_path,
    stat_axes,
    stat_path,
)

STEPS, N_LAYERS, HEADS, HEAD_DIM = 5, 3, 4, 8
N_PROMPTS = 4
KEYS = all_stat_keys()
TIMESTEPS = np.array([999.0, 749.25, 499.5, 249.75, 0.0])
RAW = RawSelection(tensors=("q", "k", "o"), steps=(0, 2, 4), layers=(0, 2), heads=(1, 3), tokens=(0, 3, 5, 20), channels=8)
ARRAYS = (PromptArray("/locality/decay", ("layer", "head"), (N_LAYERS, HEADS)),)


def make_header(n_prompts: int = N_PROMPTS, **changes: object) -> TraceHeader:
    header = TraceHeader(
        model_id="local/tiny-sd3",
        family="sd3",
        transformer_class="SD3Transformer2DModel",
        pipeline_class="StableDiffusion3Pipeline",
        steps=STEPS,
        guidance_scale=4.5,
        height=64,
        width=64,
        seed=7,
        cfg_layout="batched-uncond-first",
        prompts=[f"prompt number {i} ✓" for i in range(n_prompts)],
        layers=[f"transformer_blocks.{i}.attn" for i in range(N_LAYERS)],
        branches=["cond", "uncond"],
        n_heads=HEADS,
        head_dim=HEAD_DIM,
        tokens=TokenInfo(n_image=16, n_text=8, text_position="last", grid=(1, 4, 4)),
        extra={"scheduler": "FlowMatchEulerDiscreteScheduler", "dtype_bits": 16, "sigma_shift": 3.0},
    )
    return replace(header, **changes)


def prompt_data(i: int) -> tuple[dict, dict, dict]:
    """Deterministic stats/raw/arrays of prompt ``i`` (step comparisons are NaN at step 0)."""
    rng = np.random.default_rng(1000 + i)
    stats = {}
    for key in KEYS:
        shape = (2, STEPS, N_LAYERS, HEADS) if key[2] == "step" else (STEPS, N_LAYERS, HEADS)
        values = rng.random(shape).astype(np.float32)
        if key[2] == "step":
            values[:, 0] = np.nan
        stats[key] = values
    raw = {t: rng.standard_normal(RAW.prompt_shape(2)).astype(np.float32) for t in RAW.tensors}
    arrays = {"/locality/decay": rng.random((N_LAYERS, HEADS)).astype(np.float32)}
    return stats, raw, arrays


def write_prompts(writer: TraceWriter, indices: range | list[int], first_global: int = 0) -> None:
    """Write prompts; the data of local prompt j is prompt_data(first_global + j)."""
    for j in indices:
        stats, raw, arrays = prompt_data(first_global + j)
        writer.write_prompt(j, TIMESTEPS, stats, raw, arrays)


def write_trace(path: Path, n_written: int, n_prompts: int = N_PROMPTS, first_global: int = 0) -> Path:
    header = make_header(n_prompts)
    header = replace(header, prompts=[f"prompt number {first_global + i} ✓" for i in range(n_prompts)])
    with TraceWriter.create(path, header, KEYS, RAW, prompt_arrays=ARRAYS) as writer:
        write_prompts(writer, range(n_written), first_global)
    return path


def assert_prompts_intact(path: Path, n_expected: int, n_planned: int = N_PROMPTS) -> None:
    with Trace.open(path) as trace:
        assert trace.n_done == n_expected
        assert len(trace.header.prompts) == n_planned
        assert trace.prompts == [f"prompt number {i} ✓" for i in range(n_expected)]
        for key in KEYS:
            data = trace.stat(*key).data
            assert data.shape[0] == n_expected
            for i in range(n_expected):
                np.testing.assert_array_equal(data[i], prompt_data(i)[0][key])
        for tensor in RAW.tensors:
            data = trace.raw(tensor).data
            for i in range(n_expected):
                np.testing.assert_array_equal(data[i], prompt_data(i)[1][tensor].astype(np.float16))
        decay = trace.array("/locality/decay").data
        for i in range(n_expected):
            np.testing.assert_array_equal(decay[i], prompt_data(i)[2]["/locality/decay"])
        if n_expected:
            np.testing.assert_array_equal(trace.timesteps, TIMESTEPS)


def assert_one_line(error: BaseException, *fragments: str) -> None:
    message = str(error)
    assert message and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


# ---------------------------------------------------------------------------------------
# The child process of the crash tests


def child_main(argv: list[str]) -> None:
    """``path mode point prompt [dataset]``: write a trace and die at ``point``."""
    path, mode, point, prompt = Path(argv[0]), argv[1], argv[2], int(argv[3])
    target = argv[4] if len(argv) > 4 else ""
    die = (lambda: os._exit(3)) if mode == "exit" else (lambda: os.kill(os.getpid(), signal.SIGKILL))

    if point == "building":  # killed while the structure is built (before the rename)
        original = writer_module._build_file

        def build_then_die(*args: object, **kwargs: object) -> None:
            original(*args, **kwargs)
            die()

        writer_module._build_file = build_then_die
        TraceWriter.create(path, make_header(), KEYS, RAW, overwrite=True, prompt_arrays=ARRAYS)
        return
    if point == "rebuilding":  # killed while a killed run's file is copied for resume
        original_rebuild = writer_module._rebuild

        def rebuild_then_die(*args: object, **kwargs: object) -> None:
            original_rebuild(*args, **kwargs)
            die()

        writer_module._rebuild = rebuild_then_die
        TraceWriter.resume(path, make_header())
        return
    if point == "staging":  # killed after write_array, before the staged copy replaces the trace
        handle = open_for_append(path)
        handle.write_array("/maps/x", np.ones((2, 2)), ("layer", "head"))
        die()

    original_write = TraceWriter._write_slice
    original_flush = h5py.File.flush

    def write_slice(self: TraceWriter, dataset: h5py.Dataset, index: object, data: np.ndarray) -> None:
        if point == "during" and self.n_done == prompt and dataset.name == target:
            die()
        original_write(self, dataset, index, data)

    def flush(self: h5py.File) -> None:
        if point == "flush" and writer.n_done == prompt:
            die()
        original_flush(self)

    TraceWriter._write_slice = write_slice  # type: ignore[method-assign]
    h5py.File.flush = flush  # type: ignore[method-assign]
    writer = TraceWriter.create(path, make_header(), KEYS, RAW, prompt_arrays=ARRAYS)
    print("ready", flush=True)
    for i in range(N_PROMPTS):
        write_prompts(writer, [i])
        if point == "after" and i == prompt:
            die()
    writer.close()


def run_child(path: Path, *args: object) -> subprocess.Popen:
    code = (
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('trace_tests_child', sys.argv[1])\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "module.child_main(sys.argv[2:])\n"
    )
    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen(
        [sys.executable, "-c", code, __file__, str(path), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )


def expect_killed(proc: subprocess.Popen, mode: str) -> None:
    _, err = proc.communicate(timeout=120)
    expected = 3 if mode == "exit" else -signal.SIGKILL
    assert proc.returncode == expected, err


# ---------------------------------------------------------------------------------------
# Format helpers


def test_stat_keys_paths_and_axes() -> None:
    keys = all_stat_keys()
    assert len(keys) == len(set(keys)) == 4 * 2 * 4 + 4 * 2 * 3  # image has ssim, text does not
    assert ("text", "q", "step", "ssim") not in keys and ("image", "o", "cfg", "ssim") in keys
    assert keys == all_stat_keys()  # fixed order
    assert keys[0] == ("image", "q", "step", "l1")
    for key in keys:
        assert stat_path(key) == "/stats/" + "/".join(key)
        assert parse_stat_path(stat_path(key)) == key
    assert parse_stat_path("/stats/text/q/step/ssim") is None
    assert stat_axes("step") == ("prompt", "branch", "step", "layer", "head")
    assert stat_axes("cfg") == ("prompt", "step", "layer", "head")
    with pytest.raises(ValueError):
        stat_path(("text", "q", "step", "ssim"))


def test_raw_selection_nbytes_matches_stored_datasets(tmp_path: Path) -> None:
    path = write_trace(tmp_path / "t.h5", 1)
    expected = 2 * len(RAW.tensors) * N_PROMPTS * 2 * len(RAW.steps) * len(RAW.layers) * len(RAW.heads) * len(RAW.tokens) * 8
    assert RAW.nbytes(N_PROMPTS, 2) == expected
    with h5py.File(path, "r") as f:
        stored = sum(f[f"/raw/{t}"].size * f[f"/raw/{t}"].dtype.itemsize for t in RAW.tensors)
    assert stored == expected


# ---------------------------------------------------------------------------------------
# Round trip


def test_round_trip_every_stat_key_raw_and_indices(tmp_path: Path) -> None:
    path = tmp_path / "trace.h5"
    header = make_header()
    with TraceWriter.create(path, header, KEYS, RAW, prompt_arrays=ARRAYS) as writer:
        assert writer.n_done == 0 and writer.n_prompts == N_PROMPTS
        write_prompts(writer, range(N_PROMPTS - 1))  # the last planned prompt stays unwritten
        assert writer.n_done == N_PROMPTS - 1
    assert not (tmp_path / ".trace.h5.lock").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trace.h5"]  # no temporary left over

    assert_prompts_intact(path, N_PROMPTS - 1)
    with Trace.open(path) as trace:
        assert trace.header == header  # every field, tokens and extra attrs included
        assert not trace.live and not trace.complete
        assert trace.attrs["format"] == FORMAT and trace.attrs["format_version"] == 1
        for name in ("ditlens_version", "torch_version", "diffusers_version", "created"):
            assert isinstance(trace.attrs[name], str) and trace.attrs[name]
        assert trace.stat_keys() == KEYS
        assert trace.tokens == header.tokens and trace.layers == header.layers and trace.branches == ["cond", "uncond"]
        assert trace.timesteps.dtype == np.float64
        assert trace.file_size == path.stat().st_size

        l1 = trace.stat("image", "v", "step", "l1")
        assert l1.axes == stat_axes("step") and l1.data.dtype == np.float32
        np.testing.assert_array_equal(l1.coords["prompt"], header.prompts[: N_PROMPTS - 1])
        np.testing.assert_array_equal(l1.coords["step"], TIMESTEPS)
        np.testing.assert_array_equal(l1.coords["layer"], header.layers)
        np.testing.assert_array_equal(l1.coords["branch"], ["cond", "uncond"])
        assert trace.stat("text", "o", "cfg", "cosine").axes == stat_axes("cfg")

        raw = trace.raw("k")
        assert raw.axes == ("prompt", "branch", "step", "layer", "head", "token", "channel")
        assert raw.data.dtype == np.float16
        np.testing.assert_array_equal(raw.coords["step_index"], RAW.steps)
        np.testing.assert_array_equal(raw.coords["step"], TIMESTEPS[list(RAW.steps)])
        np.testing.assert_array_equal(raw.coords["layer"], [header.layers[i] for i in RAW.layers])
        np.testing.assert_array_equal(raw.coords["head"], RAW.heads)
        np.testing.assert_array_equal(raw.coords["token"], RAW.tokens)
        assert trace.raw_selection() == RAW
        assert trace.prompt_arrays() == ["/locality/decay"]
        with pytest.raises(DitlensError, match="stores no raw 'v'"):
            trace.raw("v")

    with h5py.File(path, "r") as f:  # the file contract, read without ditlens
        def check_axes(name: str, obj: object) -> None:
            if isinstance(obj, h5py.Dataset):
                assert "axes" in obj.attrs, name
                assert len([a for a in str(obj.attrs["axes"]).split(",") if a]) == obj.ndim, name

        f.visititems(check_axes)
        assert [s.decode() for s in f["/meta/prompts"][()]] == header.prompts
        assert f["/meta/timesteps"].dtype == np.float64
        assert f["/meta/tokens"].attrs["text_position"] == "last"
        np.testing.assert_array_equal(f["/meta/tokens"].attrs["grid"], [1, 4, 4])
        for axis, values in zip(("step", "layer", "head", "token"), (RAW.steps, RAW.layers, RAW.heads, RAW.tokens)):
            np.testing.assert_array_equal(f[f"/raw/index/{axis}"][()], values)
        for key in KEYS:
            ds = f[stat_path(key)]
            assert ds.dtype == np.float32 and ds.chunks[0] == 1 and ds.compression in ("gzip", "lzf")
            assert np.isnan(ds.fillvalue) and np.isnan(ds[N_PROMPTS - 1]).all()  # unwritten prompt: NaN
        assert f["/raw/q"].dtype == np.float16 and f["/raw/q"].compression in ("gzip", "lzf")
        assert int(f["/meta/n_done"][()]) == N_PROMPTS - 1


def test_writer_rejects_bad_input(tmp_path: Path) -> None:
    path = tmp_path / "t.h5"
    stats, raw, arrays = prompt_data(0)
    with TraceWriter.create(path, make_header(), KEYS, RAW, prompt_arrays=ARRAYS) as writer:
        with pytest.raises(ValueError, match="out of order"):
            writer.write_prompt(1, TIMESTEPS, stats, raw, arrays)
        with pytest.raises(ValueError, match="shape"):
            writer.write_prompt(0, TIMESTEPS, {**stats, KEYS[0]: np.zeros((2, 2))}, raw, arrays)
        with pytest.raises(ValueError, match="missing"):
            writer.write_prompt(0, TIMESTEPS, {k: v for k, v in stats.items() if k != KEYS[3]}, raw, arrays)
        with pytest.raises(ValueError, match="raw"):
            writer.write_prompt(0, TIMESTEPS, stats, {"q": raw["q"]}, arrays)
        writer.write_prompt(0, TIMESTEPS, stats, raw, arrays)
        with pytest.raises(DitlensError, match="timesteps"):
            writer.write_prompt(1, TIMESTEPS + 1.0, *prompt_data(1))
        assert writer.n_done == 1
    with pytest.raises(DitlensError, match="--overwrite") as info:
        TraceWriter.create(path, make_header(), KEYS)
    assert_one_line(info.value, str(path))
    with pytest.raises(ValueError, match="both branches"):
        TraceWriter.create(tmp_path / "u.h5", make_header(branches=["cond"]), [("image", "q", "cfg", "l1")])
    with TraceWriter.create(path, make_header(), KEYS[:2], overwrite=True) as writer:  # replaces it
        assert writer.stat_keys == KEYS[:2]
    with Trace.open(path) as trace:
        assert trace.n_done == 0 and trace.stat_keys() == KEYS[:2] and trace.raw_selection() is None


# ---------------------------------------------------------------------------------------
# LabelledArray against numpy


def test_labelled_array_sel_and_mean_match_numpy() -> None:
    rng = np.random.default_rng(0)
    data = rng.random((3, 2, 5, 3, 4))
    data[rng.random(data.shape) < 0.2] = np.nan
    data[:, :, 0] = np.nan  # an all-NaN step
    prompts = np.array(["a cat", "a dog", "a ship"])
    layers = np.array(["l0", "l1", "l2"])
    array = LabelledArray(
        data,
        ("prompt", "branch", "step", "layer", "head"),
        {"prompt": prompts, "branch": np.array(["cond", "uncond"]), "step": TIMESTEPS, "layer": layers},
    )
    np.testing.assert_array_equal(array.sel(prompt="a dog").data, data[1])
    np.testing.assert_array_equal(array.sel(prompt=1).data, data[1])
    np.testing.assert_array_equal(array.sel(step=749.25).data, data[:, :, 1])
    np.testing.assert_array_equal(array.sel(branch=-1, head=2).data, data[:, 1, :, :, 2])
    picked = array.sel(layer=["l2", 0], prompt=slice(1, None))
    np.testing.assert_array_equal(picked.data, data[1:][:, :, :, [2, 0]])
    np.testing.assert_array_equal(picked.coords["layer"], ["l2", "l0"])
    np.testing.assert_array_equal(picked.coords["prompt"], ["a dog", "a ship"])
    assert array.sel(prompt="a cat", step=0).axes == ("branch", "layer", "head")

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Mean of empty slice" warning leaks out
        mean_prompt = array.mean("prompt")
        mean_two = array.mean(["prompt", "head"])
        chained = array.sel(branch="cond").mean("prompt").mean("head")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        np.testing.assert_allclose(mean_prompt.data, np.nanmean(data, axis=0), equal_nan=True)
        np.testing.assert_allclose(mean_two.data, np.nanmean(data, axis=(0, 4)), equal_nan=True)
        np.testing.assert_allclose(
            chained.data, np.nanmean(np.nanmean(data[:, 0], axis=0), axis=-1), equal_nan=True, rtol=1e-12
        )
    assert mean_prompt.axes == ("branch", "step", "layer", "head") and "prompt" not in mean_prompt.coords
    assert np.isnan(mean_prompt.data[:, 0]).all()
    np.testing.assert_array_equal(chained.coords["step"], TIMESTEPS)

    with pytest.raises(DitlensError, match="no prompt labelled 'a cow'"):
        array.sel(prompt="a cow")
    with pytest.raises(DitlensError, match="no axis named 'token'"):
        array.sel(token=0)
    with pytest.raises(DitlensError, match="out of range"):
        array.sel(head=4)
    heads = LabelledArray(np.arange(6.0).reshape(2, 3), ("head", "token"), {"head": np.array([1, 3])})
    np.testing.assert_array_equal(heads.loc(head=3).data, [3.0, 4.0, 5.0])  # label 3 = position 1
    np.testing.assert_array_equal(heads.sel(head=1).data, [3.0, 4.0, 5.0])  # position 1


# ---------------------------------------------------------------------------------------
# Crash safety: real process kills


@pytest.mark.parametrize(
    ("mode", "point", "prompt", "dataset", "expected_done"),
    [
        ("exit", "after", 1, "", 2),  # killed right after write_prompt(1) returned
        ("sigkill", "during", 2, stat_path(("image", "q", "step", "l1")), 2),  # before its first dataset
        ("exit", "during", 2, "/raw/k", 2),  # stats written, raw half written
        ("sigkill", "flush", 2, "", 2),  # everything written, nothing flushed
        ("exit", "during", 2, "/meta/n_done", 2),  # data flushed, marker not yet raised
        ("sigkill", "during", 0, "/raw/q", 0),  # first prompt
    ],
)
def test_killed_writer_leaves_readable_trace_and_resumes(
    tmp_path: Path, mode: str, point: str, prompt: int, dataset: str, expected_done: int
) -> None:
    path = tmp_path / "trace.h5"
    expect_killed(run_child(path, mode, point, prompt, dataset), mode)
    assert_prompts_intact(path, expected_done)
    with Trace.open(path) as trace:
        assert trace.live  # the killed writer left the SWMR flags; readable all the same
    with TraceWriter.resume(path, make_header()) as writer:  # the lock died with the process
        assert writer.n_done == expected_done
        write_prompts(writer, range(expected_done, N_PROMPTS))
    assert_prompts_intact(path, N_PROMPTS)
    with Trace.open(path) as trace:
        assert not trace.live and trace.complete
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trace.h5"]


def test_sigkill_at_random_moments(tmp_path: Path) -> None:
    chooser = random.Random(1234)
    for attempt in range(2):
        path = tmp_path / f"trace{attempt}.h5"
        proc = run_child(path, "sigkill", "none", -1)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(chooser.uniform(0.0, 0.08))  # somewhere inside the writing loop
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=120)
        with Trace.open(path) as trace:
            n_done = trace.n_done
        assert_prompts_intact(path, n_done)
        with TraceWriter.resume(path, make_header()) as writer:
            assert writer.n_done == n_done
            write_prompts(writer, range(n_done, N_PROMPTS))
        assert_prompts_intact(path, N_PROMPTS)


@pytest.mark.parametrize("point", ["building", "rebuilding", "staging"])
def test_kill_while_changing_structure_keeps_the_old_file(tmp_path: Path, point: str) -> None:
    path = tmp_path / "trace.h5"
    if point == "building":  # an existing trace being overwritten
        write_trace(path, N_PROMPTS)
    elif point == "rebuilding":  # a killed run's trace being prepared for --resume
        expect_killed(run_child(path, "exit", "after", 1), "exit")
    else:  # a finished trace getting a derived map
        write_trace(path, N_PROMPTS)
    before = path.read_bytes()
    expect_killed(run_child(path, "exit", point, 0), "exit")
    assert path.read_bytes() == before
    expected = 2 if point == "rebuilding" else N_PROMPTS
    assert_prompts_intact(path, expected)
    with Trace.open(path) as trace:
        assert not trace.has("/maps/x")
    assert list(tmp_path.glob(".trace.h5.*.tmp"))  # the killed process's half-done copy
    with TraceWriter.resume(path, make_header()) as writer:  # the next writer clears it away
        write_prompts(writer, range(writer.n_done, N_PROMPTS))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trace.h5"]
    assert_prompts_intact(path, N_PROMPTS)


# ---------------------------------------------------------------------------------------
# Full disk


@pytest.mark.parametrize("where", ["write", "flush"])
def test_disk_full_becomes_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    path = tmp_path / "trace.h5"
    writer = TraceWriter.create(path, make_header(), KEYS, RAW, prompt_arrays=ARRAYS)
    write_prompts(writer, range(2))
    if where == "write":  # errno set, as from the OS

        def fail(self: TraceWriter, dataset: h5py.Dataset, index: object, data: np.ndarray) -> None:
            if dataset.name == "/raw/k":
                raise OSError(errno.ENOSPC, "No space left on device")
            dataset[index] = data

        monkeypatch.setattr(TraceWriter, "_write_slice", fail)
    else:  # h5py's wording: errno only inside the message

        def fail_flush(self: h5py.File) -> None:
            raise OSError(
                "Unable to flush file's cached information (file write failed: time = Mon Jan  1 00:00:00 2026\n"
                ", filename = 'trace.h5', file descriptor = 4, errno = 28, error message = 'No space left on device')"
            )

        monkeypatch.setattr(h5py.File, "flush", fail_flush)
    with pytest.raises(DitlensError) as info:
        write_prompts(writer, [2])
    assert_one_line(info.value, "disk full", "prompt 3 of 4", "2 finished prompts are safe", "--resume", str(path))
    with pytest.raises(DitlensError, match="closed"):
        write_prompts(writer, [2])
    writer.close()  # harmless after the failure
    monkeypatch.undo()
    assert_prompts_intact(path, 2)
    with TraceWriter.resume(path, make_header()) as resumed:  # lock released by the failure
        write_prompts(resumed, range(2, N_PROMPTS))
    assert_prompts_intact(path, N_PROMPTS)


def test_disk_full_while_creating(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(*args: object, **kwargs: object) -> None:
        Path(args[0]).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer_module, "_build_file", no_space)
    with pytest.raises(DitlensError) as info:
        TraceWriter.create(tmp_path / "t.h5", make_header(), KEYS)
    assert_one_line(info.value, "disk full", "free space")
    assert list(tmp_path.iterdir()) == []  # no trace, no temporary, no lock file


# ---------------------------------------------------------------------------------------
# Files that are not (readable) traces


def test_foreign_missing_and_newer_files_are_one_line_errors(tmp_path: Path) -> None:
    cases: dict[str, tuple[Path, str]] = {}
    cases["missing"] = (tmp_path / "missing.h5", "no trace at")
    text = tmp_path / "notes.h5"
    text.write_text("just some text, not HDF5\n")
    cases["text"] = (text, "not an HDF5 file")
    empty = tmp_path / "empty.h5"
    empty.write_bytes(b"")
    cases["empty"] = (empty, "not an HDF5 file")
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["data"] = np.arange(10)
    cases["foreign"] = (foreign, "not a ditlens trace")
    newer = write_trace(tmp_path / "newer.h5", 1)
    with h5py.File(newer, "r+") as f:
        f.attrs["format_version"] = 2
    cases["newer"] = (newer, "format_version 2")
    corrupt = write_trace(tmp_path / "corrupt.h5", 1)
    with open(corrupt, "r+b") as fh:  # damage the superblock after the signature
        fh.seek(20)
        fh.write(b"\xff" * 16)
    cases["corrupt"] = (corrupt, "corrupt")
    for name, (path, fragment) in cases.items():
        with pytest.raises(TraceFormatError) as info:
            Trace.open(path)
        assert_one_line(info.value, fragment, str(path))
    with pytest.raises(TraceFormatError, match="upgrade ditlens"):
        Trace.open(newer)


def test_truncated_files_are_one_line_errors(tmp_path: Path) -> None:
    path = write_trace(tmp_path / "full.h5", N_PROMPTS)
    content = path.read_bytes()
    for cut in (len(content) - 1, len(content) // 2, 100, 5):
        damaged = tmp_path / f"cut{cut}.h5"
        damaged.write_bytes(content[:cut])
        with pytest.raises(TraceFormatError) as info:
            with Trace.open(damaged) as trace:  # truncation may only show when data is read
                for key in trace.stat_keys():
                    trace.stat(*key)
        assert_one_line(info.value, "truncated", str(damaged))

    # A trace whose writer is still running (or was killed): an image of it, cut short.
    live = tmp_path / "live.h5"
    with TraceWriter.create(live, make_header(), KEYS, RAW, prompt_arrays=ARRAYS) as writer:
        write_prompts(writer, range(2))
        snapshot = live.read_bytes()
    image = tmp_path / "image.h5"
    image.write_bytes(snapshot)
    with Trace.open(image) as trace:
        assert trace.live and trace.n_done == 2
    image.write_bytes(snapshot[: len(snapshot) - 1000])
    with pytest.raises(TraceFormatError) as info:
        with Trace.open(image) as trace:
            for key in trace.stat_keys():
                trace.stat(*key)
    assert_one_line(info.value, "truncated")


# ---------------------------------------------------------------------------------------
# Resume


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("model_id", "other/model"),
        ("family", "flux"),
        ("steps", STEPS + 1),
        ("guidance_scale", 7.0),
        ("height", 128),
        ("seed", 8),
        ("layers", ["a", "b", "c"]),
        ("branches", ["cond"]),
        ("n_heads", HEADS * 2),
        ("tokens", TokenInfo(n_image=64, n_text=8, text_position="last", grid=(1, 8, 8))),
    ],
)
def test_resume_refuses_other_settings(tmp_path: Path, field: str, value: object) -> None:
    path = write_trace(tmp_path / "t.h5", 2)
    with pytest.raises(DitlensError) as info:
        TraceWriter.resume(path, make_header(**{field: value}))
    assert_one_line(info.value, f"{field} differs", str(path))
    assert_prompts_intact(path, 2)


def test_run_mismatch_compares_pipeline_arguments_and_per_prompt_text_lengths() -> None:
    """Pipeline arguments (``call.*`` attrs) recorded by both headers must agree; a header marked
    ``text_tokens=per_prompt`` (a pipeline that trims each prompt's text) may differ in n_text only."""
    from ditlens.traces.format import run_mismatch

    base = make_header(extra={"call.true_cfg_scale": 4.0, "call.max_sequence_length": 8})
    assert run_mismatch(base, make_header(extra={"call.true_cfg_scale": 4.0})) is None
    assert run_mismatch(base, make_header(extra={"call.true_cfg_scale": 9.0})) == ("call.true_cfg_scale", "4.0", "9.0")
    longer = TokenInfo(n_image=16, n_text=11, text_position="last", grid=(1, 4, 4))
    assert run_mismatch(make_header(), make_header(tokens=longer))[0] == "tokens"
    per_prompt = {"text_tokens": "per_prompt"}
    assert run_mismatch(make_header(extra=per_prompt), make_header(tokens=longer, extra=per_prompt)) is None
    other_grid = TokenInfo(n_image=16, n_text=11, text_position="last", grid=(1, 2, 8))
    assert run_mismatch(make_header(extra=per_prompt), make_header(tokens=other_grid, extra=per_prompt))[0] == "tokens"


def test_resume_checks_done_prompts_and_grows_the_prompt_axis(tmp_path: Path) -> None:
    path = write_trace(tmp_path / "t.h5", 2, n_prompts=3)
    other = make_header(3)
    other.prompts[1] = "a different prompt"
    with pytest.raises(DitlensError) as info:
        TraceWriter.resume(path, other)
    assert_one_line(info.value, "prompts differ at finished prompt 1")
    with pytest.raises(DitlensError, match="plans only 1"):
        TraceWriter.resume(path, make_header(1))

    with open_for_append(path) as handle:  # a derived map must survive the growth
        handle.write_array("/maps/mean_l1", np.arange(12.0).reshape(3, 4), ("layer", "head"), attrs={"metric": "l1"})
    with TraceWriter.resume(path, make_header(6)) as writer:
        assert (writer.n_done, writer.n_prompts) == (2, 6)
        write_prompts(writer, range(2, 5))
    assert_prompts_intact(path, 5, n_planned=6)
    with Trace.open(path) as trace:
        assert trace.stat("image", "q", "step", "l1").shape[0] == 5
        np.testing.assert_array_equal(trace.array("/maps/mean_l1").data, np.arange(12.0).reshape(3, 4))
        assert trace._file["/maps/mean_l1"].attrs["metric"] == "l1"
    with TraceWriter.resume(path, make_header(6)) as writer:  # clean file, same plan: in place
        write_prompts(writer, [5])
    assert_prompts_intact(path, 6, n_planned=6)


def test_second_writer_is_refused_and_live_reader_follows(tmp_path: Path) -> None:
    path = tmp_path / "t.h5"
    with TraceWriter.create(path, make_header(), KEYS, RAW, prompt_arrays=ARRAYS) as writer:
        write_prompts(writer, [0])
        with pytest.raises(DitlensError) as info:
            TraceWriter.resume(path, make_header())
        assert_one_line(info.value, "being written by another ditlens process")
        with Trace.open(path) as live:  # (in another process it would open in SWMR mode)
            assert live.n_done == 1
            write_prompts(writer, [1])
            assert live.refresh() == 2
            np.testing.assert_array_equal(live.stat(*KEYS[5]).data[1], prompt_data(1)[0][KEYS[5]])
        # A derived array in the middle of a run goes through a staged copy, then writing goes on.
        writer.write_array("/maps/partial", np.arange(4.0), ("head",))
        write_prompts(writer, [2, 3])
    assert_prompts_intact(path, N_PROMPTS)
    with Trace.open(path) as trace:
        np.testing.assert_array_equal(trace.array("/maps/partial").data, np.arange(4.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.h5"]


def test_open_for_append_writes_derived_arrays_atomically(tmp_path: Path) -> None:
    path = write_trace(tmp_path / "t.h5", N_PROMPTS)
    before = path.read_bytes()
    handle = open_for_append(path)
    handle.write_array("/maps/l1", np.ones((STEPS, N_LAYERS)), ("step", "layer"), coords={"layer": ["x", "y", "z"]})
    assert path.read_bytes() == before  # staged until close
    handle.write_array("/maps/l1", np.full((STEPS, N_LAYERS), 2.0), ("step", "layer"))  # same layout: in place
    handle.write_array("/maps/methods", np.array([["full", "ast"], ["window", "full"]]), ("a", "b"))
    with pytest.raises(ValueError, match="owns"):
        handle.write_array("/stats/mine", np.ones(3), ("x",))
    handle.close()
    with Trace.open(path) as trace:
        maps = trace.array("/maps/l1")
        np.testing.assert_array_equal(maps.data, np.full((STEPS, N_LAYERS), 2.0))
        np.testing.assert_array_equal(maps.coords["step"], TIMESTEPS)
        assert trace.array("/maps/methods").data.tolist() == [["full", "ast"], ["window", "full"]]
    with open_for_append(path) as handle:  # a new shape replaces the dataset
        handle.write_array("/maps/l1", np.zeros(4), ("head",))
    with Trace.open(path) as trace:
        assert trace.array("/maps/l1").axes == ("head",)
    assert_prompts_intact(path, N_PROMPTS)


# ---------------------------------------------------------------------------------------
# Merge


def test_merge_of_two_shards_equals_single_trace(tmp_path: Path) -> None:
    single = write_trace(tmp_path / "single.h5", 5, n_prompts=5)
    shard_a = write_trace(tmp_path / "a.h5", 3, n_prompts=3)
    shard_b = write_trace(tmp_path / "b.h5", 2, n_prompts=2, first_global=3)
    merged = merge_traces([shard_a, shard_b], tmp_path / "merged.h5")
    with Trace.open(single) as one, Trace.open(merged) as two:
        assert two.header.extra.pop("merged_from") == "a.h5,b.h5"
        assert one.header == two.header and one.n_done == two.n_done == 5
        assert one.datasets() == two.datasets()
        for path in one.datasets():
            np.testing.assert_array_equal(one._file[path][()], two._file[path][()], err_msg=path)

    with pytest.raises(DitlensError, match="overwrite one of its shards"):
        merge_traces([shard_a, shard_b], shard_a)
    other_seed = tmp_path / "seed.h5"
    with TraceWriter.create(other_seed, make_header(1, seed=99), KEYS, RAW, prompt_arrays=ARRAYS) as writer:
        write_prompts(writer, [0])
    with pytest.raises(DitlensError) as info:
        merge_traces([shard_a, other_seed], tmp_path / "bad.h5")
    assert_one_line(info.value, "seed differs")
    partial = write_trace(tmp_path / "partial.h5", 1, n_prompts=2, first_global=3)
    with pytest.raises(DitlensError, match="1 of 2 prompts done"):
        merge_traces([shard_a, partial], tmp_path / "p.h5")
    merged_partial = merge_traces([shard_a, partial], tmp_path / "p.h5", allow_partial=True)
    assert_prompts_intact(merged_partial, 4, n_planned=4)
