"""Which key-loop schedule closes the head-dim-128 gap to cuDNN on Hopper (issue 6).

ditlens' dense D = 128 launch runs at ~0.82x cuDNN's SDPA (FLUX-2K, H200), and every FLUX
sparsity inherits that. A back-of-the-envelope count says why: per 128x128 score tile the two
GEMMs take ~1.1 µs of an SM's tensor cores, the softmax (16k exp2 on the SFUs plus ~5 FP32 ops
per score) ~0.9 µs, and a loop that runs them one after the other reaches ~50 % of peak.
cuDNN / FlashAttention-3 overlap the two. This script times dense-only kernels that differ only
in how the key loop is scheduled, to find out which overlap Triton can express:

- ``base``      the textbook loop (what ditlens' unmasked loop does);
- ``lookahead`` the next block's Q·Kᵀ is issued before this block's softmax;
- ``split``     the query tile is two halves sharing each K/V tile: one half's softmax can run
                while the other half's GEMM is in flight (a ping-pong inside one program);
- ``lazy``      the accumulator is rescaled only when a row max grows by more than 2^8
                (a uniform branch; exact up to rounding: p ≤ 256 before normalisation).

Option ``poly2`` / ``poly4`` (base schedule) moves the exponentials of ½ / ¼ of each score tile's
columns from the SFUs (16 exp2 per clock per SM) to the FMA units, as ditlens' kernel does with
``KernelConfig.poly_exp`` (FlashAttention-4's trick for a softmax bound by its exponentials).

Every variant is checked against SDPA's output and timed with ``do_bench`` (median) in the same
process as SDPA and ditlens' own launch::

    python benchmarks/d128_schedules.py --out DIR [--shape 1,24,16896,128]

Needs a CUDA GPU with tensor descriptors (sm_90+); dense heads only, L a multiple of 256.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ditlens.kernels._triton_impl import _exp2_tile  # noqa: E402  (KernelConfig.poly_exp's exponentials)


@triton.jit
def _softmax_step(qk, m_i, l_i, acc, qk_scale, POLY: tl.constexpr = 0):
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = _exp2_tile(qk * qk_scale - m_new[:, None], POLY)
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    return p, m_new, l_i, acc


@triton.jit
def _tile(dq, dk, dv, do, Q, K, V, O, L, qk_scale, mb, bh, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
          D: tl.constexpr, SCHEDULE: tl.constexpr, DEVICE_DESC: tl.constexpr, PTR_IO: tl.constexpr,
          WS: tl.constexpr, QO_DEVICE_DESC: tl.constexpr, POLY: tl.constexpr):
    """BLOCK_M query rows of one (batch, head); [B*H*L, D] tensor descriptors, or per-head ones
    made on the device (DEVICE_DESC for K and V, QO_DEVICE_DESC for Q and O too, as ditlens'
    kernel does), Q and O through pointers (PTR_IO)."""
    row0 = bh * L
    q_row = row0 + mb * BLOCK_M
    dtype = dq.dtype
    if DEVICE_DESC:  # per-head descriptors, rows relative to the head
        head = row0.to(tl.int64) * D
        dk = tl.make_tensor_descriptor(K + head, shape=[L, D], strides=[D, 1], block_shape=[BLOCK_N, D])
        dv = tl.make_tensor_descriptor(V + head, shape=[L, D], strides=[D, 1], block_shape=[BLOCK_N, D])
        kv0 = 0
        if QO_DEVICE_DESC:
            dq = tl.make_tensor_descriptor(Q + head, shape=[L, D], strides=[D, 1], block_shape=[BLOCK_M, D])
            do = tl.make_tensor_descriptor(O + head, shape=[L, D], strides=[D, 1], block_shape=[BLOCK_M, D])
            q_row = mb * BLOCK_M
    else:
        kv0 = row0
    if SCHEDULE == 2:  # split: two halves of the query tile share every K/V tile
        HALF: tl.constexpr = BLOCK_M // 2
        qa = dq.load([q_row, 0])
        qb = dq.load([q_row + HALF, 0])
        ma = tl.zeros([HALF], dtype=tl.float32) - float("inf")
        mb_ = tl.zeros([HALF], dtype=tl.float32) - float("inf")
        la = tl.zeros([HALF], dtype=tl.float32)
        lb = tl.zeros([HALF], dtype=tl.float32)
        acca = tl.zeros([HALF, D], dtype=tl.float32)
        accb = tl.zeros([HALF, D], dtype=tl.float32)
        for start in tl.range(0, L, BLOCK_N):
            k = dk.load([kv0 + start, 0])
            qka = tl.dot(qa, tl.trans(k))
            qkb = tl.dot(qb, tl.trans(k))
            v = dv.load([kv0 + start, 0])
            pa, ma, la, acca = _softmax_step(qka, ma, la, acca, qk_scale)
            acca = tl.dot(pa.to(dtype), v, acca)
            pb, mb_, lb, accb = _softmax_step(qkb, mb_, lb, accb, qk_scale)
            accb = tl.dot(pb.to(dtype), v, accb)
        do.store([q_row, 0], (acca / la[:, None]).to(dtype))
        do.store([q_row + HALF, 0], (accb / lb[:, None]).to(dtype))
    else:
        offs_m = q_row + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        if PTR_IO:
            q = tl.load(Q + offs_m[:, None].to(tl.int64) * D + offs_d[None, :], mask=offs_m[:, None] < row0 + L)
        else:
            q = dq.load([q_row, 0])
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        if SCHEDULE == 1:  # lookahead: Q·Kᵀ of block j+1 issued before the softmax of block j
            qk = tl.dot(q, tl.trans(dk.load([kv0, 0])))
            for start in tl.range(BLOCK_N, L, BLOCK_N):
                qk_next = tl.dot(q, tl.trans(dk.load([kv0 + start, 0])))
                p, m_i, l_i, acc = _softmax_step(qk, m_i, l_i, acc, qk_scale)
                acc = tl.dot(p.to(dtype), dv.load([kv0 + start - BLOCK_N, 0]), acc)
                qk = qk_next
            p, m_i, l_i, acc = _softmax_step(qk, m_i, l_i, acc, qk_scale)
            acc = tl.dot(p.to(dtype), dv.load([kv0 + L - BLOCK_N, 0]), acc)
        elif SCHEDULE == 3:  # lazy: rescale only when some row max grew by more than 8 (log2 units)
            for start in tl.range(0, L, BLOCK_N):
                qk = tl.dot(q, tl.trans(dk.load([kv0 + start, 0])))
                m_blk = tl.max(qk, 1) * qk_scale
                if tl.max(m_blk - m_i) > 8.0:
                    m_new = tl.maximum(m_i, m_blk)
                    alpha = tl.math.exp2(m_i - m_new)
                    acc = acc * alpha[:, None]
                    l_i = l_i * alpha
                    m_i = m_new
                p = tl.math.exp2(qk * qk_scale - m_i[:, None])
                l_i = l_i + tl.sum(p, 1)
                acc = tl.dot(p.to(dtype), dv.load([kv0 + start, 0]), acc)
        else:  # base
            for start in tl.range(0, L, BLOCK_N, warp_specialize=WS):
                qk = tl.dot(q, tl.trans(dk.load([kv0 + start, 0])))
                p, m_i, l_i, acc = _softmax_step(qk, m_i, l_i, acc, qk_scale, POLY)
                acc = tl.dot(p.to(dtype), dv.load([kv0 + start, 0]), acc)
        out = (acc / l_i[:, None]).to(dtype)
        if PTR_IO:
            tl.store(O + offs_m[:, None].to(tl.int64) * D + offs_d[None, :], out, mask=offs_m[:, None] < row0 + L)
        else:
            do.store([q_row, 0], out)


def _dense_fn(dq, dk, dv, do, Q, K, V, O, L, n_mblocks, n_tiles, qk_scale, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, D: tl.constexpr, SCHEDULE: tl.constexpr, DEVICE_DESC: tl.constexpr,
              PTR_IO: tl.constexpr, WS: tl.constexpr, PERSISTENT: tl.constexpr, QO_DEVICE_DESC: tl.constexpr,
              POLY: tl.constexpr = 0):
    if PERSISTENT:  # one program per SM walks the tiles, query block fastest (K/V of a head stay in L2)
        for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
            _tile(dq, dk, dv, do, Q, K, V, O, L, qk_scale, tile % n_mblocks, tile // n_mblocks, BLOCK_M, BLOCK_N,
                  D, SCHEDULE, DEVICE_DESC, PTR_IO, WS, QO_DEVICE_DESC, POLY)
    else:
        pid = tl.program_id(0)
        _tile(dq, dk, dv, do, Q, K, V, O, L, qk_scale, pid % n_mblocks, pid // n_mblocks, BLOCK_M, BLOCK_N, D,
              SCHEDULE, DEVICE_DESC, PTR_IO, WS, QO_DEVICE_DESC, POLY)


_dense_kernel = triton.jit(_dense_fn)
_dense_kernel_any_len = triton.jit(do_not_specialize=["L", "n_mblocks", "n_tiles"])(_dense_fn)


SCHEDULES = {"base": 0, "lookahead": 1, "split": 2, "lazy": 3}
# Options that make the minimal kernel more like ditlens' own launch (to find which costs the time),
# or try Hopper features: device-side per-head descriptors, pointer loads of Q / stores of O, a
# sequence length not specialised on, Triton's warp specialization, one persistent program per SM,
# Q and O through per-head device descriptors too (qodesc, with devdesc), ½ or ¼ of the exponentials
# on the FMA units (poly2, poly4; base schedule).
OPTIONS = ("devdesc", "ptrio", "anylen", "ws", "persist", "qodesc", "poly2", "poly4")
# "schedule/BMxBN/Ww/Ss[+option...]"; BM of "split" is both halves together
VARIANTS = [
    "base/128x128/8w/3s", "base/128x128/8w/2s", "base/128x128/8w/4s", "base/128x64/8w/3s",
    "base/128x128/8w/3s+devdesc", "base/128x128/8w/3s+ptrio", "base/128x128/8w/3s+anylen",
    "base/128x128/8w/3s+devdesc+ptrio+anylen", "base/128x128/8w/3s+ws", "base/128x128/8w/3s+persist",
    "base/128x128/8w/2s+persist", "lookahead/128x128/8w/2s", "split/256x64/8w/2s", "lazy/128x128/8w/3s",
]


def parse_variant(name: str) -> tuple[str, int, int, int, int, frozenset[str]]:
    head, *options = name.split("+")
    schedule, tiles, warps, stages = head.split("/")
    bm, bn = (int(x) for x in tiles.split("x"))
    unknown = set(options) - set(OPTIONS)
    if schedule not in SCHEDULES or unknown:
        raise SystemExit(f"unknown variant {name!r}: schedules {', '.join(SCHEDULES)}, options {', '.join(OPTIONS)}")
    return schedule, bm, bn, int(warps.rstrip("w")), int(stages.rstrip("s")), frozenset(options)


def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, variant: str) -> torch.Tensor:
    """Dense attention of q, k, v [B, H, L, D] (contiguous, L % max(BM, BN) == 0) by one variant."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    schedule, block_m, block_n, warps, stages, options = parse_variant(variant)
    B, H, L, D = q.shape
    o = torch.empty_like(q)
    rows = block_m // 2 if schedule == "split" else block_m
    descs = [TensorDescriptor.from_tensor(t.view(B * H * L, D), [rows if t is q or t is o else block_n, D])
             for t in (q, k, v, o)]
    scale = 1.0 / math.sqrt(D) * 1.4426950408889634
    n_mblocks = L // block_m
    n_tiles = n_mblocks * B * H
    persistent = "persist" in options
    grid = (min(n_tiles, torch.cuda.get_device_properties(q.device).multi_processor_count) if persistent
            else n_tiles,)
    kernel = _dense_kernel_any_len if "anylen" in options else _dense_kernel
    kernel[grid](*descs, q, k, v, o, L, n_mblocks, n_tiles, scale, BLOCK_M=block_m, BLOCK_N=block_n, D=D,
                 SCHEDULE=SCHEDULES[schedule], DEVICE_DESC="devdesc" in options, PTR_IO="ptrio" in options,
                 WS="ws" in options, PERSISTENT=persistent, QO_DEVICE_DESC="qodesc" in options,
                 POLY=2 if "poly2" in options else 4 if "poly4" in options else 0, num_warps=warps,
                 num_stages=stages)
    return o


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="1,24,16896,128", help="B,H,L,D (FLUX-2K by default)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list like base/128x128/8w/3s+persist")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    from triton.testing import do_bench

    B, H, L, D = (int(x) for x in args.shape.split(","))
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    flops = 4.0 * B * H * L * L * D
    bench = lambda fn: do_bench(fn, warmup=50, rep=300, return_mode="median")  # noqa: E731
    sdpa_ms = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    rows = [{"variant": "sdpa", "ms": sdpa_ms, "tflops": flops / sdpa_ms / 1e9, "x_sdpa": 1.0, "max_err": 0.0}]
    from ditlens.kernels import headwise_attention

    own = lambda: headwise_attention(q, k, v, modes=["full"] * H, windows=[0] * H, backend="triton")  # noqa: E731
    err = (own().float() - ref.float()).abs().max().item()
    ms = bench(own)
    rows.append({"variant": "ditlens headwise (full)", "ms": ms, "tflops": flops / ms / 1e9, "x_sdpa": sdpa_ms / ms,
                 "max_err": err})
    for name in filter(None, args.variants.split(",")):
        parse_variant(name)
        try:
            fn = lambda: dense(q, k, v, name)  # noqa: E731
            err = (fn().float() - ref.float()).abs().max().item()
            ms = bench(fn)
        except Exception as exc:  # a config that does not compile (registers, shared memory) is a result too
            rows.append({"variant": name, "error": str(exc).splitlines()[0][:160]})
            print(f"{name:28s} failed: {rows[-1]['error']}", flush=True)
            continue
        rows.append({"variant": name, "ms": ms, "tflops": flops / ms / 1e9, "x_sdpa": sdpa_ms / ms, "max_err": err})
    print(f"{torch.cuda.get_device_name()}, bf16, B,H,L,D = {B},{H},{L},{D}")
    print(f"{'variant':42s} {'ms':>8s} {'TFLOP/s':>8s} {'x SDPA':>7s} {'max err':>8s}")
    for r in rows:
        if "error" not in r:
            print(f"{r['variant']:42s} {r['ms']:8.3f} {r['tflops']:8.1f} {r['x_sdpa']:7.3f} {r['max_err']:8.4f}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "d128_schedules.json").write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                                                  "shape": [B, H, L, D], "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
