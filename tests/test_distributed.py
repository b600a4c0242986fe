"""Profiling across processes with torch.distributed (gloo on the CPU, 2 real processes).

The merged trace of ``torchrun --nproc-per-node 2 -m ditlens profile`` must equal the
single-process trace of the same prompts, statistic by statistic.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tiny_models import save_tiny_pipeline

PROMPTS = ["1", "2", "3", "4", "5"]


def _profile(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)


@pytest.mark.slow
def test_two_process_profile_equals_single_process(tmp_path):
    from ditlens.traces.reader import Trace

    model = save_tiny_pipeline("dit", tmp_path / "tiny-dit")
    common = ["profile", "--model", str(model), "--steps", "3", "--guidance", "3"]
    for p in PROMPTS:
        common += ["--prompt", p]
    single = _profile(["-m", "ditlens", *common, "--out", "single.h5"], tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    dist = _profile(["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
                     "-m", "ditlens", *common, "--out", "dist.h5"], tmp_path)
    assert dist.returncode == 0, dist.stderr[-3000:]
    assert not list(tmp_path.glob("dist.rank*")), "shards were not cleaned up"
    with Trace.open(tmp_path / "single.h5") as a, Trace.open(tmp_path / "dist.h5") as b:
        assert a.n_done == b.n_done == len(PROMPTS)
        assert list(a.prompts) == list(b.prompts) == PROMPTS
        np.testing.assert_array_equal(a.timesteps, b.timesteps)
        assert a.stat_keys() == b.stat_keys()
        for key in a.stat_keys():
            np.testing.assert_array_equal(a.stat(*key).data, b.stat(*key).data, err_msg=str(key))
