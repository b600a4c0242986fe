"""The profiler's fused distance sums (Triton) against float64 sums, on strided per-head views."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

CHECK = textwrap.dedent("""
    import torch
    from ditlens.kernels.pair_stats import pair_sums, pair_sums_available
    from ditlens.analyzer.metrics import metrics_from_sums
    torch.manual_seed(0)
    device = {device!r}
    dtype = getattr(torch, {dtype!r})
    base = torch.randn(2, 37, 3, 24, device=device).to(dtype)      # [B, L, H, D]: diffusers' layout
    xs = [base[0].transpose(0, 1), torch.randn(3, 37, 24, device=device).to(dtype), base[1].transpose(0, 1)]
    ys = [torch.randn(3, 37, 24, device=device).to(dtype), base[1].transpose(0, 1), base[1].transpose(0, 1)]
    assert pair_sums_available(xs[0])
    out = pair_sums(xs, ys, block_t=16)
    assert out.shape == (3, 3, 5) and out.dtype == torch.float32
    for i, (x, y) in enumerate(zip(xs, ys)):
        x, y = x.double(), y.double()
        ref = torch.stack([(x - y).abs().sum((1, 2)), y.abs().sum((1, 2)), (x * y).sum((1, 2)),
                           (x * x).sum((1, 2)), (y * y).sum((1, 2))], -1)
        torch.testing.assert_close(out[i].double(), ref, rtol=1e-5, atol=1e-3)
    m = metrics_from_sums(out, 37 * 24)
    assert float(m["l1"][2].abs().max()) == 0.0 and torch.allclose(m["cosine"][2], torch.ones(3, device=device))
    print("ok")
""")


def _run(device: str, dtype: str, interpret: bool) -> None:
    env = dict(os.environ)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", CHECK.format(device=device, dtype=dtype)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_pair_sums_under_the_triton_interpreter():
    pytest.importorskip("triton")
    _run("cpu", "float32", interpret=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_pair_sums_on_cuda(dtype):
    _run("cuda", dtype, interpret=False)


ROWS_CHECK = textwrap.dedent("""
    import torch
    from ditlens.kernels.pair_stats import pair_sums_rows
    torch.manual_seed(1)
    device = {device!r}
    a = torch.randn(2, 37, 3, 24, device=device).transpose(1, 2)   # [B, H, L, D] view, strided
    b = torch.randn(2, 3, 37, 24, device=device)                   # contiguous
    out = pair_sums_rows([(a, 1), (b, 0)], [(b, 1), (a, 0)], block_t=16)
    for i, (x, y) in enumerate([(a[1], b[1]), (b[0], a[0])]):
        x, y = x.double(), y.double()
        ref = torch.stack([(x - y).abs().sum((1, 2)), y.abs().sum((1, 2)), (x * y).sum((1, 2)),
                           (x * x).sum((1, 2)), (y * y).sum((1, 2))], -1)
        torch.testing.assert_close(out[i].double(), ref, rtol=1e-5, atol=1e-3)
    # 16-byte loads off (asked, or impossible: 5 channels) give the same sums
    torch.testing.assert_close(pair_sums_rows([(a, 1), (b, 0)], [(b, 1), (a, 0)], block_t=16, vectorize=False), out)
    c = torch.randn(2, 3, 37, 5, device=device)
    odd = pair_sums_rows([(c, 0)], [(c, 1)], block_t=16)
    x, y = c[0].double(), c[1].double()
    torch.testing.assert_close(odd[0, :, 0].double(), (x - y).abs().sum((1, 2)), rtol=1e-5, atol=1e-3)
    print("ok")
""")


def test_pair_sums_of_batch_rows_under_the_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", ROWS_CHECK.format(device="cpu")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
