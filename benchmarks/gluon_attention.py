"""Does an explicitly scheduled Hopper kernel close the head-dim-128 dense gap to cuDNN (issue 6)?

ditlens' Triton launch runs dense FLUX attention (D = 128) at ~0.85-0.88x cuDNN's SDPA on the H100,
and every FLUX sparsity inherits that rate. Sessions 12, 24 and 25 exhausted what Triton's language can
schedule (key-loop orders, tiles, exponentials by polynomial): the compiler does not overlap one
block's softmax with the tensor cores' next GEMM. FlashAttention-3 does, by hand. Triton 3.6 ships
Gluon, a lower-level language with explicit wgmma, TMA and mbarriers, where that overlap can be
written. This script times three Gluon schedules (one kernel, ``fa_fwd``'s WS switch) beside SDPA and
ditlens' own dense launch:

- ``gluon``    one partition: S_j = Q·K_jᵀ is issued, then O += P_{j-1}·V_{j-1}, and the softmax of
               S_j runs while the second GEMM is in flight (FA3's intra-warpgroup overlap); K/V in a
               ring of STAGES tiles refilled by TMA from the compute warps;
- ``gluon-ws`` the same loop, with a one-warp loader partition issuing the TMA copies against
               per-slot empty/ready barriers (FA3's producer warp), the compute warps at 240 registers;
- ``gluon-ws2`` two compute partitions of one warpgroup each (64 query rows apiece) and the loader:
               the warpgroups synchronise only through the K/V ring, so they drift apart and one's
               GEMMs can hide the other's softmax.

All three are dense-only, non-causal, [B*H*L, D] descriptors with L a multiple of 128: a measurement of the
rate, not yet a ditlens backend. Checked against SDPA's output, timed with ``do_bench`` (median)::

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
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@gluon.jit
def _issue_kv(k_desc, v_desc, k_smem, v_smem, k_bar, v_bar, row, slot):
    mbarrier.expect(k_bar.index(slot), k_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [row, 0], k_bar.index(slot), k_smem.index(slot))
    mbarrier.expect(v_bar.index(slot), v_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(v_desc, [row, 0], v_bar.index(slot), v_smem.index(slot))


@gluon.jit
def _compute(o_desc, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, empty_bar, qk_scale, q_row, n_blocks,
             STAGES: gl.constexpr, NUM_WARPS: gl.constexpr, k_desc=None, v_desc=None, kv_row0=0,
             SELF_LOAD: gl.constexpr = False):
    """One query tile's key loop and epilogue. Block j's Q·Kᵀ is issued before block j-1's P·V, and
    block j's softmax runs while that P·V is in flight. A finished K/V slot is handed back through
    ``empty_bar`` (loader partition) or, with SELF_LOAD, refilled here by TMA."""
    BLOCK_M: gl.constexpr = q_smem.shape[0]
    HEAD_D: gl.constexpr = q_smem.shape[1]
    BLOCK_N: gl.constexpr = k_smem.shape[1]
    dtype: gl.constexpr = q_smem.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, HEAD_D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    orow_layout: gl.constexpr = gl.SliceLayout(1, o_layout)

    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    mbarrier.wait(q_bar, 0)
    mbarrier.wait(k_bar.index(0), 0)
    s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(0, deps=(s, ))
    s = s * qk_scale
    m_i = gl.max(s, axis=1)
    p = gl.exp2(s - gl.expand_dims(m_i, 1))
    l_i = gl.sum(p, axis=1)
    acc = gl.zeros([BLOCK_M, HEAD_D], gl.float32, o_layout)
    for j in range(1, n_blocks):
        slot = j % STAGES
        prev = (j - 1) % STAGES
        mbarrier.wait(k_bar.index(slot), (j // STAGES) & 1)
        s = warpgroup_mma(q_smem, k_smem.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        mbarrier.wait(v_bar.index(prev), ((j - 1) // STAGES) & 1)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        acc = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
        s = warpgroup_mma_wait(1, deps=(s, ))
        s = s * qk_scale
        m_new = gl.maximum(m_i, gl.max(s, axis=1))
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s - gl.expand_dims(m_new, 1))
        l_i = l_i * alpha + gl.sum(p, axis=1)
        acc, p_op = warpgroup_mma_wait(0, deps=(acc, p_op))
        if SELF_LOAD:
            nxt = j - 1 + STAGES
            if nxt < n_blocks:
                gl.thread_barrier()  # both warpgroups are done with the slot before TMA overwrites it
                _issue_kv(k_desc, v_desc, k_smem, v_smem, k_bar, v_bar, kv_row0 + nxt * BLOCK_N, prev)
        else:
            mbarrier.arrive(empty_bar.index(prev), count=1)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, orow_layout), 1)
        m_i = m_new
    last = (n_blocks - 1) % STAGES
    mbarrier.wait(v_bar.index(last), ((n_blocks - 1) // STAGES) & 1)
    p_op = gl.convert_layout(p.to(dtype), p_layout)
    acc = warpgroup_mma(p_op, v_smem.index(last), acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=(acc, p_op))[0]
    acc = acc / gl.expand_dims(gl.convert_layout(l_i, orow_layout), 1)
    q_smem.store(acc.to(dtype))  # Q is dead after the last Q·Kᵀ: its tile stages the output
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [q_row, 0], q_smem)
    tma.store_wait(0)


@gluon.jit
def _loader(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, empty_bar,
            q_row, kv_row0, n_blocks, STAGES: gl.constexpr, QP: gl.constexpr):
    """The loader partition: the Q tile(s), then every K/V block into the ring, each slot once its
    consumers handed it back."""
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    TILE_M: gl.constexpr = q_desc.block_type.shape[0]
    for i in gl.static_range(QP):
        mbarrier.expect(q_bar.index(i), q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [q_row + i * TILE_M, 0], q_bar.index(i), q_smem.index(i))
    for j in range(n_blocks):
        slot = j % STAGES
        mbarrier.wait(empty_bar.index(slot), ((j // STAGES) & 1) ^ 1)  # a fresh barrier passes phase 1
        _issue_kv(k_desc, v_desc, k_smem, v_smem, k_bar, v_bar, kv_row0 + j * BLOCK_N, slot)


@gluon.jit
def _half_compute(o_desc, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, empty_bar, qk_scale, q_row, n_blocks,
                  HALF: gl.constexpr, STAGES: gl.constexpr):
    TILE_M: gl.constexpr = q_smem.shape[1]
    _compute(o_desc, q_smem.index(HALF), k_smem, v_smem, q_bar.index(HALF), k_bar, v_bar, empty_bar, qk_scale,
             q_row + HALF * TILE_M, n_blocks, STAGES, 4)


@gluon.jit
def fa_fwd(q_desc, k_desc, v_desc, o_desc, qk_scale, seq_len,
           STAGES: gl.constexpr, WS: gl.constexpr, LOADER_REGS: gl.constexpr, num_warps: gl.constexpr):
    """Dense attention for one query tile of one (batch, head); [B*H*L, D] descriptors.

    WS = 0: one partition that also issues the TMA copies; WS = 1: a one-warp loader partition beside
    the compute warps; WS = 2: the loader and two compute partitions of one warpgroup (q_desc's block
    is then half the query tile), which synchronise only through the K/V ring."""
    QP: gl.constexpr = 2 if WS == 2 else 1
    TILE_M: gl.constexpr = q_desc.block_type.shape[0]
    HEAD_D: gl.constexpr = q_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    dtype: gl.constexpr = q_desc.dtype
    q_row = gl.program_id(1) * seq_len + gl.program_id(0) * (QP * TILE_M)
    kv_row0 = gl.program_id(1) * seq_len
    n_blocks = seq_len // BLOCK_N

    q_smem = gl.allocate_shared_memory(dtype, [QP, TILE_M, HEAD_D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_D], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [QP, 1], mbarrier.MBarrierLayout())
    k_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(QP):
        mbarrier.init(q_bar.index(i), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bar.index(i), count=1)
        mbarrier.init(v_bar.index(i), count=1)
        mbarrier.init(empty_bar.index(i), count=QP)  # one arrival per compute partition
    fence_async_shared()

    if WS == 0:
        mbarrier.expect(q_bar.index(0), q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [q_row, 0], q_bar.index(0), q_smem.index(0))
        for i in gl.static_range(STAGES):  # the loop refills a slot only after block j-1 left it
            if i < n_blocks:
                _issue_kv(k_desc, v_desc, k_smem, v_smem, k_bar, v_bar, kv_row0 + i * BLOCK_N, i)
        _compute(o_desc, q_smem.index(0), k_smem, v_smem, q_bar.index(0), k_bar, v_bar, empty_bar, qk_scale, q_row,
                 n_blocks, STAGES, num_warps, k_desc, v_desc, kv_row0, SELF_LOAD=True)
    elif WS == 1:
        gl.warp_specialize([
            (_compute, (o_desc, q_smem.index(0), k_smem, v_smem, q_bar.index(0), k_bar, v_bar, empty_bar, qk_scale,
                        q_row, n_blocks, STAGES, num_warps)),
            (_loader, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, empty_bar,
                       q_row, kv_row0, n_blocks, STAGES, QP)),
        ], [1], [LOADER_REGS])
    else:
        gl.warp_specialize([
            (_half_compute, (o_desc, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, empty_bar, qk_scale, q_row, n_blocks,
                             0, STAGES)),
            (_half_compute, (o_desc, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, empty_bar, qk_scale, q_row, n_blocks,
                             1, STAGES)),
            (_loader, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, empty_bar,
                       q_row, kv_row0, n_blocks, STAGES, QP)),
        ], [4, 1], [240, LOADER_REGS])


def _descriptor(x2d, block):
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    layout = gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16 if x2d.dtype == torch.bfloat16 else gl.float16)
    return TensorDescriptor.from_tensor(x2d, block, layout)


def gluon_attention(q, k, v, *, stages: int = 2, kind: str = "gluon", block_m: int = 128, block_n: int = 128):
    """Dense attention of q, k, v [B, H, L, D] (contiguous, L % 128 == 0) by the Gluon kernels above."""
    B, H, L, D = q.shape
    if L % block_m or L % block_n:
        raise ValueError(f"sequence length {L} is not a multiple of the {block_m}x{block_n} tile")
    o = torch.empty_like(q)
    rows = B * H * L
    q_block = [block_m // 2 if kind == "gluon-ws2" else block_m, D]
    qd = _descriptor(q.reshape(rows, D), q_block)
    kd = _descriptor(k.reshape(rows, D), [block_n, D])
    vd = _descriptor(v.reshape(rows, D), [block_n, D])
    od = _descriptor(o.reshape(rows, D), q_block)
    qk_scale = D ** -0.5 * 1.4426950408889634
    grid = (L // block_m, B * H)
    ws = {"gluon": 0, "gluon-ws": 1, "gluon-ws2": 2}[kind]
    fa_fwd[grid](qd, kd, vd, od, qk_scale, L, STAGES=stages, WS=ws, LOADER_REGS=24, num_warps=4 if ws == 2 else 8)
    return o


VARIANTS = ("gluon/2s", "gluon/3s", "gluon-ws/2s", "gluon-ws/3s", "gluon-ws2/2s", "gluon-ws2/3s")


def _inputs(shape: str):
    B, H, L, D = (int(x) for x in shape.split(","))
    torch.manual_seed(0)
    return [torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(3)]


def _bench(fn) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=50, rep=300, return_mode="median")


def _time_variant(variant: str, shapes: list[str]) -> list[dict]:
    """One variant at every shape, SDPA re-timed beside it (a child process: a kernel that hangs costs
    its timeout, not the run)."""
    from ditlens.kernels import headwise_attention

    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    rows = []
    for shape in shapes:
        q, k, v = _inputs(shape)
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        if variant == "ditlens":
            fn = lambda: headwise_attention(q, k, v, modes="full", windows=None, backend="triton")  # noqa: E731
        else:
            kind, st = variant.split("/")
            fn = lambda: gluon_attention(q, k, v, stages=int(st[:-1]), kind=kind)  # noqa: E731
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
    ap.add_argument("--variants", default="ditlens," + ",".join(VARIANTS))
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
