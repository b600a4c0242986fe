"""Gluon source of the Hopper head-wise attention kernel (head dim 128): FlashAttention-3's schedule.

One program owns a 128-row query tile of one (batch, head) and runs three partitions: a one-warp
loader streaming the tile's K/V blocks through a STAGES-deep ring by TMA, and two compute warpgroups of 64 query
rows each. Inside a warpgroup, block j's Q·Kᵀ is issued before block j-1's P·V and block j's softmax
runs while that P·V is in flight; the two warpgroups synchronise only through the ring's barriers, so
one's GEMMs run under the other's exponentials. This schedule, timed on an H100 at FLUX-2K dense as
``benchmarks/gluon_attention.py`` had it at commit cfab322: 0.98-1.00x cuDNN's SDPA, against 0.84x for
the Triton launch (BENCHMARKS.md §2, "Session 34").

Window and arrow heads visit only their blocks, computed from the head's mode and half-width
(``_key_blocks``: the text blocks, then the band), and mask elements only in the band's edge blocks
(``_scores``), as the Triton kernel does (DESIGN.md §5 semantics, text tokens first). Skip heads visit
none: the loader puts their cached tile where Q would go and the warpgroups store it. The head-wise form
keeps the dense rate (0.97-0.99x SDPA at FLUX-2K and FLUX-1K, H100, session 35).

Tensors are 2-D TMA views (rows = tokens, columns = heads x head_dim); the (batch, head) of a program
maps to a row offset and a column offset, so contiguous [B, H, L, D] tensors and diffusers'
[B, L, H, D]-stored views are read in place. Needs Triton >= 3.6 (Gluon) and an sm_90 GPU; this
module is imported only there (``gluon_backend.py``).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

# Triton 3.6 names the TMA copies async_copy_global_to_shared / async_copy_shared_to_global; later
# releases call them async_load / async_store and make the old names raise
_tma_load = getattr(tma, "async_load", tma.async_copy_global_to_shared)
_tma_store = getattr(tma, "async_store", tma.async_copy_shared_to_global)


@gluon.jit
def _issue_kv(k_desc, v_desc, k_smem, v_smem, k_bar, v_bar, row, col, slot):
    mbarrier.expect(k_bar.index(slot), k_desc.block_type.nbytes)
    _tma_load(k_desc, [row, col], k_bar.index(slot), k_smem.index(slot))
    mbarrier.expect(v_bar.index(slot), v_desc.block_type.nbytes)
    _tma_load(v_desc, [row, col], v_bar.index(slot), v_smem.index(slot))


@gluon.jit
def _key_blocks(mode, w, tile_r0, n_text, seq_len, TILE_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """The key blocks a TILE_M-row query tile of one head visits, as (text blocks first, first band
    block, blocks in all): the sequence is blocks 0 .. n_a-1, then lo, lo+1, ... Text sits at the start
    (n_text a multiple of BLOCK_N; 0 for image-only). Full heads and the text queries of arrow heads
    visit every block; window heads' text queries the text blocks; image queries the band
    [r0 - w, r1 - 1 + w] of image keys, after the text blocks for arrow heads; skip heads none."""
    n_blocks = seq_len // BLOCK_N
    text_tile = tile_r0 < n_text
    every = (mode == 0) | ((mode == 2) & text_tile)
    lo_key = gl.maximum(tile_r0 - w, n_text)
    hi_key = gl.minimum(tile_r0 + TILE_M - 1 + w, seq_len - 1)
    lo_blk = lo_key // BLOCK_N
    n_a = gl.where(every, n_blocks, gl.where(text_tile | (mode == 2), n_text // BLOCK_N, 0))
    n_band = gl.where(every | text_tile, 0, hi_key // BLOCK_N + 1 - lo_blk)
    return n_a, lo_blk, gl.where(mode == 3, 0, n_a + n_band)


@gluon.jit
def _loader(q_desc, k_desc, v_desc, aux_desc, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, empty_bar,
            q_row, q_col, aux_row, aux_col, kv_row, kv_col, n_a, lo_blk, n_iter, STAGES: gl.constexpr,
            HAS_SKIP: gl.constexpr):
    """The loader partition: both halves of the Q tile (of the cached output, for a skip head), then
    the tile's key blocks into the ring, each slot once both compute warpgroups handed it back."""
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    HALF_M: gl.constexpr = q_desc.block_type.shape[0]
    for i in gl.static_range(2):
        mbarrier.expect(q_bar.index(i), q_desc.block_type.nbytes)
        if HAS_SKIP and n_iter == 0:
            _tma_load(aux_desc, [aux_row + i * HALF_M, aux_col], q_bar.index(i), q_smem.index(i))
        else:
            _tma_load(q_desc, [q_row + i * HALF_M, q_col], q_bar.index(i), q_smem.index(i))
    for t in range(n_iter):
        slot = t % STAGES
        blk = gl.where(t < n_a, t, lo_blk + t - n_a)
        mbarrier.wait(empty_bar.index(slot), ((t // STAGES) & 1) ^ 1)  # a fresh barrier passes phase 1
        _issue_kv(k_desc, v_desc, k_smem, v_smem, k_bar, v_bar, kv_row + blk * BLOCK_N, kv_col, slot)


@gluon.jit
def _scores(s, t, n_a, lo_blk, w, r0, qk_scale, s_layout: gl.constexpr, BLOCK_N: gl.constexpr,
            BANDS: gl.constexpr):
    """Scaled scores of visit t, with keys outside the band |i - j| <= w set to -inf where the block is
    a band block not inside every row's band (the first and last of the band)."""
    BLOCK_M: gl.constexpr = s.shape[0]
    s = s * qk_scale
    kb = (lo_blk + t - n_a) * BLOCK_N
    if BANDS and (t >= n_a) & ((kb < r0 + BLOCK_M - 1 - w) | (kb + BLOCK_N - 1 > r0 + w)):
        rows = r0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
        cols = kb + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        dist = gl.expand_dims(rows, 1) - gl.expand_dims(cols, 0)
        s = gl.where((dist <= w) & (dist >= -w), s, float("-inf"))
    return s


@gluon.jit
def _finite_max(m, BANDS: gl.constexpr):
    """The running row maximum to subtract: 0 where a banded row has met none of its keys yet (so exp2
    gives 0, not NaN); dense rows always have keys, and skip the select."""
    if BANDS:
        m = gl.where(m == float("-inf"), 0.0, m)
    return m


@gluon.jit
def _compute(o_desc, aux_desc, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, empty_bar, r_bar, qk_scale, o_row, o_col,
             aux_row, aux_col, r0, w, n_a, lo_blk, n_iter, STAGES: gl.constexpr, BANDS: gl.constexpr,
             RESIDUAL: gl.constexpr):
    """One warpgroup's 64 query rows (sequence positions r0 ...): the key loop with the softmax under
    the P·V GEMM, then the normalised output through Q's (now dead) shared tile and a TMA store. A row
    can meet a block with none of its keys (-inf throughout) before its first valid one: its maximum
    is then taken as 0 so that exp2 gives 0, not NaN. RESIDUAL 1 adds aux's rows to the output (WA-RS
    apply, W + R), 2 subtracts the output from them (WA-RS refresh, R = O - W), in float32; their tile is
    fetched into Q's, dead after the last Q·Kᵀ, while the last P·V runs."""
    BLOCK_M: gl.constexpr = q_smem.shape[0]
    HEAD_D: gl.constexpr = q_smem.shape[1]
    BLOCK_N: gl.constexpr = k_smem.shape[1]
    dtype: gl.constexpr = q_smem.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    orow_layout: gl.constexpr = gl.SliceLayout(1, o_layout)

    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    mbarrier.wait(q_bar, 0)
    mbarrier.wait(k_bar.index(0), 0)
    s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(0, deps=(s, ))
    s = _scores(s, 0, n_a, lo_blk, w, r0, qk_scale, s_layout, BLOCK_N, BANDS)
    m_i = gl.max(s, axis=1)
    p = gl.exp2(s - gl.expand_dims(_finite_max(m_i, BANDS), 1))
    l_i = gl.sum(p, axis=1)
    acc = gl.zeros([BLOCK_M, HEAD_D], gl.float32, o_layout)
    for t in range(1, n_iter):
        slot = t % STAGES
        prev = (t - 1) % STAGES
        mbarrier.wait(k_bar.index(slot), (t // STAGES) & 1)
        s = warpgroup_mma(q_smem, k_smem.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        mbarrier.wait(v_bar.index(prev), ((t - 1) // STAGES) & 1)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        acc = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
        s = warpgroup_mma_wait(1, deps=(s, ))  # Q·Kᵀ done, P·V still in flight
        s = _scores(s, t, n_a, lo_blk, w, r0, qk_scale, s_layout, BLOCK_N, BANDS)
        m_new = gl.maximum(m_i, gl.max(s, axis=1))
        m_use = _finite_max(m_new, BANDS)
        alpha = gl.exp2(m_i - m_use)
        p = gl.exp2(s - gl.expand_dims(m_use, 1))
        l_i = l_i * alpha + gl.sum(p, axis=1)
        acc, p_op = warpgroup_mma_wait(0, deps=(acc, p_op))
        mbarrier.arrive(empty_bar.index(prev), count=1)  # visit t-1's K/V slot is free
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, orow_layout), 1)
        m_i = m_new
    last = (n_iter - 1) % STAGES
    if RESIDUAL != 0:  # every Q·Kᵀ has completed (waited above): Q's tile can take the residual
        mbarrier.expect(r_bar, aux_desc.block_type.nbytes)
        _tma_load(aux_desc, [aux_row, aux_col], r_bar, q_smem)
    mbarrier.wait(v_bar.index(last), ((n_iter - 1) // STAGES) & 1)
    p_op = gl.convert_layout(p.to(dtype), p_layout)
    acc = warpgroup_mma(p_op, v_smem.index(last), acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=(acc, p_op))[0]
    acc = acc / gl.expand_dims(gl.convert_layout(l_i, orow_layout), 1)
    if RESIDUAL != 0:
        mbarrier.wait(r_bar, 0)
        res = q_smem.load(o_layout).to(gl.float32)
        if RESIDUAL == 1:
            acc = acc + res
        else:
            acc = res - acc
    q_smem.store(acc.to(dtype))  # Q is dead after the last Q·Kᵀ: its tile stages the output
    fence_async_shared()
    _tma_store(o_desc, [o_row, o_col], q_smem)
    tma.store_wait(0)


@gluon.jit
def _copy_cached(o_desc, q_smem, q_bar, o_row, o_col):
    """A skip head's rows: the cached output the loader put in Q's tile, stored as they are."""
    mbarrier.wait(q_bar, 0)
    _tma_store(o_desc, [o_row, o_col], q_smem)
    tma.store_wait(0)


@gluon.jit
def _half(o_desc, aux_desc, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, empty_bar, r_bar, qk_scale, q_row, q_col,
          aux_row, aux_col, tile_r0, w, n_a, lo_blk, n_iter, HALF: gl.constexpr, STAGES: gl.constexpr,
          BANDS: gl.constexpr, HAS_SKIP: gl.constexpr, RESIDUAL: gl.constexpr):
    HALF_M: gl.constexpr = q_smem.shape[1]
    if HAS_SKIP and n_iter == 0:
        _copy_cached(o_desc, q_smem.index(HALF), q_bar.index(HALF), q_row + HALF * HALF_M, q_col)
    else:
        _compute(o_desc, aux_desc, q_smem.index(HALF), k_smem, v_smem, q_bar.index(HALF), k_bar, v_bar, empty_bar,
                 r_bar.index(HALF), qk_scale, q_row + HALF * HALF_M, q_col, aux_row + HALF * HALF_M, aux_col,
                 tile_r0 + HALF * HALF_M, w, n_a, lo_blk, n_iter, STAGES, BANDS, RESIDUAL)


@gluon.jit
def headwise_fwd(q_desc, k_desc, v_desc, o_desc, aux_desc, modes_ptr, windows_ptr, order_ptr, qk_scale, seq_len,
                 n_text, heads, q_rows_b, q_rows_h, q_cols_h, kv_rows_b, kv_rows_h, kv_cols_h, aux_rows_b,
                 aux_rows_h, aux_cols_h, ALL_FULL: gl.constexpr, HAS_SKIP: gl.constexpr, HEAVY_FIRST: gl.constexpr,
                 RESIDUAL: gl.constexpr, STAGES: gl.constexpr, LOADER_REGS: gl.constexpr):
    """Grid (seq_len / 128, batch * heads), 4 warps (+ 4 + 1 in the partitions).

    Program (m, b * heads + h) computes query rows 128 m ... 128 m + 127 of head h, whose mode is
    modes_ptr[h] (0 full, 1 window, 2 arrow, 3 skip) and half-width windows_ptr[h]; text tokens are the first
    n_text (a multiple of BLOCK_N). It reads rows q_rows_b * b + q_rows_h * h + 128 m ... at column
    q_cols_h * h of the 2-D views (likewise K/V; O shares Q's view), with q_desc's block 64 x D and
    k_desc's BLOCK_N x D. aux_desc's view (rows aux_rows_b * b + aux_rows_h * h + 128 m ..., column
    aux_cols_h * h) holds the skip heads' cached output (HAS_SKIP) or the residual that RESIDUAL 1 adds to
    the output and RESIDUAL 2 subtracts it from (not both in one launch). ALL_FULL: every head full (modes and
    windows are not read). HEAVY_FIRST: program (m', r) runs the tile order_ptr[r * tiles + m'] (packed as
    (b * heads + h) * tiles + m), order_ptr listing every tile in the order the host chose
    (``gluon_backend._tile_order``: the long tiles first), which the GPU, starting programs in grid
    order, follows; otherwise program
    (m, b * heads + h) runs its own tile. seq_len is a multiple of 128 and of BLOCK_N."""
    HALF_M: gl.constexpr = q_desc.block_type.shape[0]
    HEAD_D: gl.constexpr = q_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    dtype: gl.constexpr = q_desc.dtype
    if HEAVY_FIRST:
        tiles = gl.num_programs(0)
        packed = gl.load(order_ptr + gl.program_id(1) * tiles + gl.program_id(0))
        tile = packed % tiles
        bh = packed // tiles
    else:
        tile = gl.program_id(0)
        bh = gl.program_id(1)
    b = bh // heads
    h = bh % heads
    tile_r0 = tile * (2 * HALF_M)
    q_row = b * q_rows_b + h * q_rows_h + tile_r0
    q_col = h * q_cols_h
    kv_row = b * kv_rows_b + h * kv_rows_h
    kv_col = h * kv_cols_h
    aux_row = b * aux_rows_b + h * aux_rows_h + tile_r0
    aux_col = h * aux_cols_h
    if ALL_FULL:
        mode = 0
        w = seq_len
    else:
        mode = gl.load(modes_ptr + h)
        w = gl.load(windows_ptr + h)
    n_a, lo_blk, n_iter = _key_blocks(mode, w, tile_r0, n_text, seq_len, 2 * HALF_M, BLOCK_N)

    q_smem = gl.allocate_shared_memory(dtype, [2, HALF_M, HEAD_D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_D], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    if RESIDUAL != 0:
        r_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(r_bar.index(i), count=1)
    else:
        r_bar = q_bar  # never waited on: the compute partitions touch r_bar only when RESIDUAL != 0
    for i in gl.static_range(2):
        mbarrier.init(q_bar.index(i), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bar.index(i), count=1)
        mbarrier.init(v_bar.index(i), count=1)
        mbarrier.init(empty_bar.index(i), count=2)  # one arrival per compute warpgroup
    fence_async_shared()
    gl.warp_specialize([
        (_half, (o_desc, aux_desc, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, empty_bar, r_bar, qk_scale, q_row,
                 q_col, aux_row, aux_col, tile_r0, w, n_a, lo_blk, n_iter, 0, STAGES, not ALL_FULL, HAS_SKIP,
                 RESIDUAL)),
        (_half, (o_desc, aux_desc, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, empty_bar, r_bar, qk_scale, q_row,
                 q_col, aux_row, aux_col, tile_r0, w, n_a, lo_blk, n_iter, 1, STAGES, not ALL_FULL, HAS_SKIP,
                 RESIDUAL)),
        (_loader, (q_desc, k_desc, v_desc, aux_desc, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, empty_bar,
                   q_row, q_col, aux_row, aux_col, kv_row, kv_col, n_a, lo_blk, n_iter, STAGES, HAS_SKIP)),
    ], [4, 1], [240, LOADER_REGS])
