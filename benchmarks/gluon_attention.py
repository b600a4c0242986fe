"""The Gluon dense kernel (head dim 128, FlashAttention-3's schedule) against SDPA and the Triton launch.

ditlens' Triton launch runs dense FLUX attention (D = 128) at ~0.84x cuDNN's SDPA on the H100, and every
FLUX sparsity inherits that rate. Sessions 12, 24 and 25 exhausted what Triton's language can schedule
(key-loop orders, tiles, exponentials by polynomial): its compiler does not overlap one block's softmax
with the tensor cores' next GEMM. ``ditlens.kernels._gluon_impl`` does, in Gluon (Triton 3.6's
lower-level language: wgmma, TMA and mbarriers by hand): a one-warp loader partition and two compute
warpgroups of 64 query rows each that synchronise only through a three-stage K/V ring; inside each,
block j's Q·Kᵀ is issued before block j-1's P·V and block j's softmax runs under it. It is reached
through ``headwise_attention``: ``backend="auto"`` runs it for D = 128 on Hopper (session 35).

The session-34 schedule comparison (the compute warps refilling the ring themselves, one compute
partition of two warpgroups, two stages) was timed with this script at commit cfab322, which still
carried those variants (BENCHMARKS.md §2, "Session 34"). Variants now: ``sdpa``, ``triton`` (the
all-full Triton launch), ``gluon`` (contiguous [B, H, L, D]), ``gluon-views`` (diffusers' views of
[B, L, H, D] storage, read and written in place), and ``triton@S`` / ``gluon@S``: every head arrow
with 512 text tokens first and w keeping 1 - S % of all pairs (as ``kernels.py`` picks it), the error
measured against the Triton launch; ``triton-mixed`` / ``gluon-mixed``: kernels.py's mixed plan (heads in
turn full, arrow at 75 %, skip). ``gluon@S`` and ``gluon-mixed`` call ``headwise_gluon`` directly, in its
default tile order (``full-first``, the API's; ``benchmarks/tile_order_ab.py`` compares the orders); ``triton-apply@S`` /
``gluon-apply@S``: the arrow launch adding a WA-RS residual in its epilogue (``windowed_plus_residual``).
Speedups are over dense SDPA, as issue 6 counts them. Each runs in a child process (a hang costs its timeout,
not the run) with SDPA re-timed beside it, ``do_bench`` median, max error against SDPA::

    python benchmarks/gluon_attention.py --out DIR [--shapes 1,24,16896,128 1,24,4608,128]

Needs an sm_90 GPU and Triton >= 3.6 (Gluon).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = ("triton", "gluon", "gluon-views", "triton@50", "gluon@50", "triton@75", "gluon@75", "gluon@90",
            "triton-mixed", "gluon-mixed", "triton-apply@50", "gluon-apply@50")
N_TEXT = 512  # FLUX's text tokens, first in the sequence: the arrow variants' layout


def _inputs(shape: str):
    B, H, L, D = (int(x) for x in shape.split(","))
    torch.manual_seed(0)
    return [torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(3)]


def _bench(fn) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=50, rep=300, return_mode="median")


def _time_variant(variant: str, shapes: list[str]) -> list[dict]:
    """One variant at every shape, SDPA re-timed beside it (run in a child process)."""
    from ditlens.kernels import headwise_attention, windowed_plus_residual
    from ditlens.kernels.gluon_backend import headwise_gluon
    from ditlens.kernels.patterns import TokenLayout, make_head_plan
    from small_shapes import arrow_window, mixed_modes  # benchmarks/ is on sys.path: this script's folder

    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    rows = []
    for shape in shapes:
        q, k, v = _inputs(shape)
        if variant == "gluon-views":  # the same values in [B, L, H, D] storage, as diffusers' processors pass them
            q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
        name, _, pct = variant.partition("@")
        backend = "gluon" if name.startswith("gluon") else "triton" if name.startswith("triton") else name
        fn = None
        if "-mixed" in name:  # kernels.py's mixed plan, error against the Triton launch
            H, L = q.shape[1], q.shape[2]
            modes = mixed_modes(H, "arrow")
            w = arrow_window(L, N_TEXT, 0.75)
            windows = [0 if m != "arrow" else w for m in modes]
            cached = torch.randn_like(q)
            kw = dict(modes=modes, windows=windows, n_text=N_TEXT, text_first=True, cached=cached)
            ref = headwise_attention(q, k, v, backend="triton", **kw)
        elif pct:  # every head arrow, w keeping 1 - s of all pairs (text rows and columns included), FLUX layout
            w = arrow_window(q.shape[2], N_TEXT, int(pct) / 100)
            if w is None:  # the text pairs alone keep more than 1 - s
                continue
            kw = dict(modes="arrow", windows=w, n_text=N_TEXT, text_first=True)
            ref = headwise_attention(q, k, v, backend="triton", **kw)  # checked against float64 in the test suite
            if name.endswith("-apply"):  # WA-RS apply: the same launch adding a residual in its epilogue
                res = torch.randn_like(q)
                akw = dict(windows=w, n_text=N_TEXT, text_first=True, pattern="arrow")
                ref = windowed_plus_residual(q, k, v, res, backend="triton", **akw)
                fn = lambda: windowed_plus_residual(q, k, v, res, backend=backend, **akw)  # noqa: E731
        else:
            kw = dict(modes="full", windows=None)
            ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        if backend == "gluon" and kw["windows"] is not None and fn is None:  # sparse plans: no API host work
            H, L = q.shape[1], q.shape[2]
            plan, lay = make_head_plan(kw["modes"], kw["windows"], H, L), TokenLayout(L, N_TEXT, True)
            fn = lambda: headwise_gluon(q, k, v, plan, lay, q.shape[-1] ** -0.5,  # noqa: E731
                                        cached=kw.get("cached"))
        if fn is None:
            fn = lambda: headwise_attention(q, k, v, backend=backend, **kw)  # noqa: E731
        err = (fn().float() - ref.float()).abs().max().item()
        ms = _bench(fn)
        sdpa_ms = _bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
        rows.append({"variant": variant, "shape": shape, "ms": ms, "sdpa_ms": sdpa_ms, "x_sdpa": sdpa_ms / ms,
                     "max_err": err})
    return rows


def main() -> None:
    import subprocess

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["1,24,16896,128", "1,24,4608,128"], help="B,H,L,D each")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--timeout", type=float, default=150.0, help="seconds per variant (compile included)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_time_variant(args.child, args.shapes)))
        return
    rows: list[dict] = []
    print(f"{'variant':16s} {'shape':18s} {'ms':>8s} {'SDPA ms':>8s} {'x SDPA':>7s} {'TFLOP/s':>8s} {'max err':>8s}",
          flush=True)
    for variant in filter(None, args.variants.split(",")):
        cmd = [sys.executable, __file__, "--child", variant, "--shapes", *args.shapes]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            if done.returncode:
                raise RuntimeError((done.stderr.strip().splitlines() or ["exit %d" % done.returncode])[-1][:200])
            got = json.loads(done.stdout.strip().splitlines()[-1])
        except (subprocess.TimeoutExpired, RuntimeError) as exc:
            msg = f"no result after {args.timeout:.0f} s (hang)" if isinstance(exc, subprocess.TimeoutExpired) else str(exc)
            rows.append({"variant": variant, "error": msg})
            print(f"{variant:16s} failed: {msg}", flush=True)
            continue
        for r in got:
            B, H, L, D = (int(x) for x in r["shape"].split(","))
            r["tflops"] = 4.0 * B * H * L * L * D / r["ms"] / 1e9
            print(f"{variant:16s} {r['shape']:18s} {r['ms']:8.3f} {r['sdpa_ms']:8.3f} {r['x_sdpa']:7.3f} "
                  f"{r['tflops']:8.1f} {r['max_err']:8.4f}", flush=True)
        rows += got
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gluon_attention.json").write_text(json.dumps(
            {"device": torch.cuda.get_device_name(), "triton": triton.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
