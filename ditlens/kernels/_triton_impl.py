"""Triton kernels for head-wise block-sparse attention (forward only).

Imported lazily by :mod:`ditlens.kernels.triton_backend`. Under ``TRITON_INTERPRET=1`` (set
before triton is imported) the same kernels run on CPU tensors through Triton's interpreter.

Layout: q, k, v, out, cache and residual are ``[B, H, L, D]`` with a unit stride on ``D`` and
every other stride a multiple of 8 elements (the host copies anything else); batch and head
strides are runtime arguments (hinted as multiples of 8 where Triton's own divisibility-by-16
specialisation cannot see it), token strides compile-time constants,
so every row starts 16-byte aligned and loads are 16 bytes wide (``D = 72`` rows are 144
bytes apart; diffusers' ``[B, L, H, D]`` views have head stride ``D``).

Head dimension ``D`` is covered by two column tiles ``D0`` (a power of two) and ``D1``
(16 or more, masked past ``D``), so ``D = 72`` costs 64 + 16 columns instead of 128.

Per program (one query block of ``BLOCK_M`` rows of one (batch, head)), a full head walks every
key (``_attend_all_keys``: unmasked blocks, one tail block masked at L). For a window or arrow head
the keys to visit are at most two token intervals, computed analytically from the head's mode and
window: segment A holds the text keys, segment B the image keys (the band ``[q - w, q + w]``
clipped to the image run, or all image keys when an arrow head's block contains text queries).
Each segment is walked in ``BLOCK_N`` steps from its start and split into masked head blocks, an
unmasked run of blocks that every row of the query block attends entirely, and masked tail
blocks: element masks only on edge blocks, and there each row's keys in the segment are one
interval (``_row_keys``), two compares per score. The walk is one loop per segment (the edge
blocks masked in a uniform branch; the default with tensor descriptors) or three loops.

Programs run the query blocks that hold text rows first, then the rest, heaviest head first
(``_tile_of``): an arrow head's text rows attend every key and would otherwise finish last.
"""

import triton
import triton.language as tl

NEG_BIG = tl.constexpr(-1.0e30)  # finite "minus infinity": a row whose first blocks are all masked stays NaN-free


@triton.jit
def _mm(a, b, acc, UPCAST: tl.constexpr):
    # The CPU interpreter multiplies bfloat16 bit patterns as integers: upcast there.
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def _head_base(ptr, b64, h64, stride_b, stride_h, HINT_ALIGN: tl.constexpr):
    """Start of one (batch, head) slice. With HINT_ALIGN the host has checked that both strides are
    multiples of 8 elements (16 bytes) although not of 16, which Triton cannot see by itself."""
    off = b64 * stride_b + h64 * stride_h
    if HINT_ALIGN:
        off = tl.multiple_of(off, 8)
    return ptr + off


@triton.jit
def _load_tile(base, offs_rows, offs_cols, row_hi, STRIDE: tl.constexpr, HEAD_DIM: tl.constexpr,
               ROW_MASK: tl.constexpr, COL_MASK: tl.constexpr):
    ptrs = base + offs_rows[:, None] * STRIDE + offs_cols[None, :]
    if ROW_MASK:
        if COL_MASK:
            tile = tl.load(ptrs, mask=(offs_rows[:, None] < row_hi) & (offs_cols[None, :] < HEAD_DIM), other=0.0)
        else:
            tile = tl.load(ptrs, mask=offs_rows[:, None] < row_hi, other=0.0)
    else:
        if COL_MASK:
            tile = tl.load(ptrs, mask=offs_cols[None, :] < HEAD_DIM, other=0.0)
        else:
            tile = tl.load(ptrs)
    return tile


@triton.jit
def _load_kv_tile(desc, base, start_n, offs_rows, offs_cols, col0, row_hi, STRIDE: tl.constexpr,
                  HEAD_DIM: tl.constexpr, ROW_MASK: tl.constexpr, COL_MASK: tl.constexpr, USE_TMA: tl.constexpr):
    """Rows [start_n, start_n + BLOCK) of a K or V head slice, columns [col0, col0 + width).

    With USE_TMA the copy engine loads the tile through ``desc`` (rows past the sequence and
    columns past HEAD_DIM read as zero; rows between ``row_hi`` and the sequence end are real keys
    that the caller masks in the scores), otherwise pointer loads masked at ``row_hi``."""
    if USE_TMA:
        tile = desc.load([start_n, col0])
    else:
        tile = _load_tile(base, offs_rows, offs_cols, row_hi, STRIDE, HEAD_DIM, ROW_MASK, COL_MASK)
    return tile


@triton.jit
def _store_tile(base, tile, offs_rows, offs_cols, row_hi, STRIDE: tl.constexpr, HEAD_DIM: tl.constexpr,
                COL_MASK: tl.constexpr):
    ptrs = base + offs_rows[:, None] * STRIDE + offs_cols[None, :]
    if COL_MASK:
        tl.store(ptrs, tile, mask=(offs_rows[:, None] < row_hi) & (offs_cols[None, :] < HEAD_DIM))
    else:
        tl.store(ptrs, tile, mask=offs_rows[:, None] < row_hi)


@triton.jit
def _head_tile_desc(base, L, HEAD_DIM: tl.constexpr, STRIDE: tl.constexpr, BLOCK_M: tl.constexpr,
                    WIDTH: tl.constexpr):
    """A tensor descriptor over one ``[L, HEAD_DIM]`` slice (row stride STRIDE; a head's tokens, or a
    split chunk's fp32 partials) in tiles of BLOCK_M x WIDTH: rows past L and columns past HEAD_DIM read
    as zero and are not written."""
    return tl.make_tensor_descriptor(base, shape=[L, HEAD_DIM], strides=[STRIDE, 1], block_shape=[BLOCK_M, WIDTH])


@triton.jit
def _row_keys(offs_m, mode, win, img_lo, img_hi, t_lo, t_hi, L):
    """Per query row, the keys it attends as two intervals (see patterns.py; modes full=0, window=1,
    arrow=2, skip=3): [lo_a, hi_a) in segment A (text keys, or every key for full heads) and
    [lo_b, hi_b) in segment B (image keys: the row's band, or all of them for an arrow head's
    text rows). Edge blocks mask with these bounds alone: two compares per score whatever the
    head's mode, and exact also in query blocks that mix text and image rows."""
    is_full = mode == 0
    is_arrow = mode == 2
    img_row = (offs_m >= img_lo) & (offs_m < img_hi)
    txt_row = (offs_m >= t_lo) & (offs_m < t_hi)
    a_on = is_full | is_arrow | txt_row
    lo_a = tl.where(a_on, tl.where(is_full, 0, t_lo), 0)
    hi_a = tl.where(a_on, tl.where(is_full, L, t_hi), 0)
    band = (~is_full) & img_row
    b_on = band | (is_arrow & txt_row)
    lo_b = tl.where(b_on, tl.where(band, tl.maximum(img_lo, offs_m - win), img_lo), 0)
    hi_b = tl.where(b_on, tl.where(band, tl.minimum(img_hi, offs_m + win + 1), img_hi), 0)
    return lo_a, hi_a, lo_b, hi_b


@triton.jit
def _in_rows(offs_n, row_lo, row_hi):
    """[rows, keys] mask: key offs_n[j] lies in row i's interval [row_lo[i], row_hi[i])."""
    return (offs_n[None, :] >= row_lo[:, None]) & (offs_n[None, :] < row_hi[:, None])


@triton.jit
def _unmasked_run(seg_lo, seg_hi, full_lo, full_hi, BLOCK_N: tl.constexpr):
    """(n_blocks, j_first, j_end): the segment [seg_lo, seg_hi) in BLOCK_N blocks from seg_lo, and the run
    [j_first, j_end) of them inside [full_lo, full_hi), which every row attends entirely (no mask)."""
    n_blocks = (tl.maximum(seg_hi - seg_lo, 0) + BLOCK_N - 1) // BLOCK_N
    j_first = (tl.maximum(full_lo - seg_lo, 0) + BLOCK_N - 1) // BLOCK_N
    j_end = tl.maximum(full_hi - seg_lo, 0) // BLOCK_N
    j_first = tl.minimum(j_first, n_blocks)
    j_end = tl.minimum(tl.maximum(j_end, j_first), n_blocks)
    return n_blocks, j_first, j_end


@triton.jit
def _softmax_start(q_base, q0, offs_m, offs_d1, L, SQ: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_M: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
                   m0=0, QO_DESC: tl.constexpr = False):
    """A query block's second column tile of Q (zeros without a split head dim; with QO_DESC through a
    tensor descriptor, rows from m0) and its empty online softmax: accumulators, row max -inf, row sum 0."""
    if HAS_D1 and QO_DESC:  # columns past HEAD_DIM and rows past L read as zero
        q1 = _head_tile_desc(q_base, L, HEAD_DIM, SQ, BLOCK_M, D1).load([m0, D0])
    elif HAS_D1:
        q1 = _load_tile(q_base, offs_m, offs_d1, L, SQ, HEAD_DIM, True, D0 + D1 > HEAD_DIM)
    else:
        q1 = tl.zeros([BLOCK_M, D1], dtype=q0.dtype)
    acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    return q1, acc0, acc1, m_i, l_i


@triton.jit
def _block_scores(q0, q1, k_base, dk0, dk1, start_n, offs_n, offs_d0, offs_d1, row_hi, HEAD_DIM: tl.constexpr,
                  SK: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr, ROW_MASK: tl.constexpr,
                  UPCAST: tl.constexpr, USE_TMA: tl.constexpr):
    """Raw scores Q·Kᵀ of the key block at start_n (pointer loads masked at row_hi with ROW_MASK)."""
    k0 = _load_kv_tile(dk0, k_base, start_n, offs_n, offs_d0, 0, row_hi, SK, HEAD_DIM, ROW_MASK, D0 > HEAD_DIM,
                       USE_TMA)
    qk = _mm(q0, tl.trans(k0), tl.zeros([q0.shape[0], offs_n.shape[0]], dtype=tl.float32), UPCAST)
    if HAS_D1:
        k1 = _load_kv_tile(dk1, k_base, start_n, offs_n, offs_d1, D0, row_hi, SK, HEAD_DIM, ROW_MASK,
                           D0 + D1 > HEAD_DIM, USE_TMA)
        qk = _mm(q1, tl.trans(k1), qk, UPCAST)
    return qk


@triton.jit
def _block_pv(acc0, acc1, p, alpha, v_base, dv0, dv1, start_n, offs_n, offs_d0, offs_d1, row_hi,
              HEAD_DIM: tl.constexpr, SV: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
              ROW_MASK: tl.constexpr, UPCAST: tl.constexpr, USE_TMA: tl.constexpr):
    """acc · alpha + P·V of the key block at start_n (P already in the inputs' dtype)."""
    v0 = _load_kv_tile(dv0, v_base, start_n, offs_n, offs_d0, 0, row_hi, SV, HEAD_DIM, ROW_MASK, D0 > HEAD_DIM,
                       USE_TMA)
    acc0 = _mm(p, v0, acc0 * alpha[:, None], UPCAST)
    if HAS_D1:
        v1 = _load_kv_tile(dv1, v_base, start_n, offs_n, offs_d1, D0, row_hi, SV, HEAD_DIM, ROW_MASK,
                           D0 + D1 > HEAD_DIM, USE_TMA)
        acc1 = _mm(p, v1, acc1 * alpha[:, None], UPCAST)
    return acc0, acc1


@triton.jit
def _exp2_fma(x):
    """2^x on the FMA units instead of the SFU: x = j + f with j an integer (x + 1.5·2²³ rounds it into
    the low mantissa bits) and f in [-½, ½]; 2^f by a degree-3 minimax polynomial (relative error
    7.5e-5, far below bf16's 3.9e-3 for P); j added to the exponent bits. 0 below -125 (and for -inf)."""
    xc = tl.maximum(x, -125.0)
    t = xc + 12582912.0
    f = xc - (t - 12582912.0)
    p = ((0.05517166 * f + 0.24261115) * f + 0.69326097) * f + 0.99992806
    r = (p.to(tl.int32, bitcast=True) + (t.to(tl.int32, bitcast=True) << 23)).to(tl.float32, bitcast=True)
    return tl.where(x < -125.0, 0.0, r)


@triton.jit
def _exp2_tile(x, POLY_EXP: tl.constexpr = 0):
    """exp2 of a [BM, BN] score tile, with POLY_EXP = 2 or 4 its last 1/POLY_EXP of columns through
    _exp2_fma (KernelConfig.poly_exp: relieves the SFUs, 16 exp2 per clock per SM, where they bind; on an
    H100 they do not, and it is slower). The splits are column halves / quarters, which a thread of a
    wgmma accumulator holds itself: no data moves between threads."""
    BM: tl.constexpr = x.shape[0]
    BN: tl.constexpr = x.shape[1]
    if POLY_EXP == 2:
        a, b = tl.split(tl.permute(tl.reshape(x, [BM, 2, BN // 2]), [0, 2, 1]))
        return tl.reshape(tl.permute(tl.join(tl.math.exp2(a), _exp2_fma(b)), [0, 2, 1]), [BM, BN])
    elif POLY_EXP == 4:
        # x[:, h1 * BN/2 + h2 * BN/4 + c] as [BM, c, h1, h2]
        lo, hi = tl.split(tl.permute(tl.reshape(x, [BM, 2, 2, BN // 4]), [0, 3, 1, 2]))  # h2 = 0 / 1
        hi0, hi1 = tl.split(hi)  # h1 = 0 / 1
        e = tl.join(tl.math.exp2(lo), tl.join(tl.math.exp2(hi0), _exp2_fma(hi1)))
        return tl.reshape(tl.permute(e, [0, 2, 3, 1]), [BM, BN])
    else:
        return tl.math.exp2(x)


@triton.jit
def _attend_block(acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, dk0, dk1, dv0, dv1, start_n, offs_d0, offs_d1,
                  seg_hi, row_lo, row_hi, qk_scale, HEAD_DIM: tl.constexpr, SK: tl.constexpr, SV: tl.constexpr,
                  BLOCK_N: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
                  MASKED: tl.constexpr, UPCAST: tl.constexpr, USE_TMA: tl.constexpr, POLY_EXP: tl.constexpr = 0):
    """One key block of the online softmax; with MASKED, row i keeps the keys in [row_lo[i], row_hi[i]);
    POLY_EXP: see _exp2_tile (unmasked blocks only)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    qk = _block_scores(q0, q1, k_base, dk0, dk1, start_n, offs_n, offs_d0, offs_d1, seg_hi, HEAD_DIM, SK, D0, D1,
                       HAS_D1, MASKED, UPCAST, USE_TMA)
    if MASKED:
        qk = tl.where(_in_rows(offs_n, row_lo, row_hi), qk * qk_scale, NEG_BIG)
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        qk = qk - m_new[:, None]
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        qk = qk * qk_scale - m_new[:, None]
    p = tl.math.exp2(qk) if MASKED else _exp2_tile(qk, POLY_EXP)
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc0, acc1 = _block_pv(acc0, acc1, p.to(q0.dtype), alpha, v_base, dv0, dv1, start_n, offs_n, offs_d0, offs_d1,
                           seg_hi, HEAD_DIM, SV, D0, D1, HAS_D1, MASKED, UPCAST, USE_TMA)
    return acc0, acc1, m_new, l_i


@triton.jit
def _attend_segment(acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, dk0, dk1, dv0, dv1, offs_d0, offs_d1, seg_lo,
                    seg_hi, full_lo, full_hi, row_lo, row_hi, qk_scale, HEAD_DIM: tl.constexpr, SK: tl.constexpr,
                    SV: tl.constexpr, BLOCK_N: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                    HAS_D1: tl.constexpr, UPCAST: tl.constexpr, USE_TMA: tl.constexpr,
                    WARP_SPEC: tl.constexpr = False, EDGE_STAGES: tl.constexpr = 3, POLY_EXP: tl.constexpr = 0):
    """Visit keys [seg_lo, seg_hi) in BLOCK_N steps; blocks inside [full_lo, full_hi) go unmasked,
    edge blocks masked by the rows' key intervals [row_lo, row_hi). WARP_SPEC warp-specializes the
    unmasked loop, the one that carries dense heads; EDGE_STAGES pipelines the (short) edge loops."""
    n_blocks, j_first, j_end = _unmasked_run(seg_lo, seg_hi, full_lo, full_hi, BLOCK_N)
    for j in tl.range(0, j_first, num_stages=EDGE_STAGES):
        acc0, acc1, m_i, l_i = _attend_block(acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, dk0, dk1, dv0, dv1,
                                             seg_lo + j * BLOCK_N, offs_d0, offs_d1, seg_hi, row_lo, row_hi,
                                             qk_scale, HEAD_DIM, SK, SV, BLOCK_N, D0, D1, HAS_D1, True, UPCAST,
                                             USE_TMA)
    for j in tl.range(j_first, j_end, warp_specialize=WARP_SPEC):
        acc0, acc1, m_i, l_i = _attend_block(acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, dk0, dk1, dv0, dv1,
                                             seg_lo + j * BLOCK_N, offs_d0, offs_d1, seg_hi, row_lo, row_hi,
                                             qk_scale, HEAD_DIM, SK, SV, BLOCK_N, D0, D1, HAS_D1, False, UPCAST,
                                             USE_TMA, POLY_EXP)
    for j in tl.range(j_end, n_blocks, num_stages=EDGE_STAGES):
        acc0, acc1, m_i, l_i = _attend_block(acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, dk0, dk1, dv0, dv1,
                                             seg_lo + j * BLOCK_N, offs_d0, offs_d1, seg_hi, row_lo, row_hi,
                                             qk_scale, HEAD_DIM, SK, SV, BLOCK_N, D0, D1, HAS_D1, True, UPCAST,
                                             USE_TMA)
    return acc0, acc1, m_i, l_i


@triton.jit
def _softmax_step_inf(m_i, l_i, qk, qk_scale, POLY_EXP: tl.constexpr = 0):
    """(p, alpha, m_new, l_new) of one block of unscaled scores masked with -inf: a row whose keys are all
    masked so far keeps m = -inf and takes its exponents against 0 (see _attend_segment_one_loop)."""
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = _exp2_tile(qk * qk_scale - m_ref[:, None], POLY_EXP)  # _exp2_fma maps -inf to 0 as exp2 does
    alpha = tl.math.exp2(m_i - m_ref)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _attend_segment_one_loop(acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, dk0, dk1, dv0, dv1, offs_d0, offs_d1,
                             seg_lo, seg_hi, full_lo, full_hi, row_lo, row_hi, L, qk_scale, HEAD_DIM: tl.constexpr,
                             SK: tl.constexpr, SV: tl.constexpr, BLOCK_N: tl.constexpr, D0: tl.constexpr,
                             D1: tl.constexpr, HAS_D1: tl.constexpr, UPCAST: tl.constexpr, USE_TMA: tl.constexpr,
                             POLY_EXP: tl.constexpr = 0):
    """_attend_segment in one pipelined loop: edge blocks take the rows' key intervals as their mask in
    a uniform branch, so they are prefetched like the others and the segment pays one pipeline fill.

    Masked scores are -inf and a row whose keys are all masked so far keeps m = -inf, its exponent
    taken against 0: masking with a finite -1e30 instead and subtracting a max made of it is not
    exact once the compiler contracts ``qk * scale - m`` into an FMA (the product's rounding error,
    ~1e21, reaches exp2: inf, then NaN), which the interpreter cannot show."""
    n_blocks, j_first, j_end = _unmasked_run(seg_lo, seg_hi, full_lo, full_hi, BLOCK_N)
    for j in tl.range(0, n_blocks):
        start_n = seg_lo + j * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        qk = _block_scores(q0, q1, k_base, dk0, dk1, start_n, offs_n, offs_d0, offs_d1, L, HEAD_DIM, SK, D0, D1,
                           HAS_D1, True, UPCAST, USE_TMA)
        if (j < j_first) | (j >= j_end):
            qk = tl.where(_in_rows(offs_n, row_lo, row_hi), qk, float("-inf"))
        p, alpha, m_new, l_i = _softmax_step_inf(m_i, l_i, qk, qk_scale, POLY_EXP)
        acc0, acc1 = _block_pv(acc0, acc1, p.to(q0.dtype), alpha, v_base, dv0, dv1, start_n, offs_n, offs_d0,
                               offs_d1, L, HEAD_DIM, SV, D0, D1, HAS_D1, True, UPCAST, USE_TMA)
        m_i = m_new
    return acc0, acc1, m_i, l_i


@triton.jit
def _attend_all_keys(acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, dk0, dk1, dv0, dv1, offs_m, offs_d0, offs_d1, L,
                     qk_scale, HEAD_DIM: tl.constexpr, SK: tl.constexpr, SV: tl.constexpr, BLOCK_N: tl.constexpr,
                     D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr, UPCAST: tl.constexpr,
                     USE_TMA: tl.constexpr, WARP_SPEC: tl.constexpr, KEYS_EVEN: tl.constexpr = False,
                     j_lo=0, j_hi=0, KEY_RANGE: tl.constexpr = False, POLY_EXP: tl.constexpr = 0):
    """A full head's query block: every key, unmasked blocks and one tail block masked at L (none when
    the host says L is a multiple of BLOCK_N: KEYS_EVEN). One key
    range and no per-head geometry: 160 registers (sm_90, D = 128, 64x128 tiles;
    benchmarks/kernel_resources.py), so 64-row tiles run two programs per SM.
    With KEY_RANGE only key blocks [j_lo, j_hi) (one chunk of a split full head)."""
    n_full = L // BLOCK_N
    row_lo = offs_m * 0
    row_hi = row_lo + L
    if KEY_RANGE:
        j_start = j_lo
        j_mid = tl.minimum(j_hi, n_full)
        j_tail = tl.maximum(j_lo, n_full)
        j_end = j_hi
    else:  # the constant start keeps the dense loop exactly as it was compiled before chunks existed
        j_start = 0
        j_mid = n_full
        j_tail = n_full
        j_end = (L + BLOCK_N - 1) // BLOCK_N
    for j in tl.range(j_start, j_mid, warp_specialize=WARP_SPEC):
        acc0, acc1, m_i, l_i = _attend_block(acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, dk0, dk1, dv0, dv1,
                                             j * BLOCK_N, offs_d0, offs_d1, L, row_lo, row_hi, qk_scale,
                                             HEAD_DIM, SK, SV, BLOCK_N, D0, D1, HAS_D1, False, UPCAST, USE_TMA,
                                             POLY_EXP)
    # the partial last block as a loop of at most one trip, not an `if`: on Triton 3.6 an `if` after the
    # pipelined loop made masked pointer loads of a split head dim (D = 72) read out of bounds on an H200.
    if not KEYS_EVEN:
        for j in range(j_tail, j_end):
            acc0, acc1, m_i, l_i = _attend_block(acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, dk0, dk1, dv0, dv1,
                                                 j * BLOCK_N, offs_d0, offs_d1, L, row_lo, row_hi, qk_scale,
                                                 HEAD_DIM, SK, SV, BLOCK_N, D0, D1, HAS_D1, True, UPCAST, USE_TMA)
    return acc0, acc1, m_i, l_i


@triton.jit
def _attend_key_chunk(acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, dk0, dk1, dv0, dv1, offs_m, offs_d0, offs_d1, L,
                      qk_scale, part, HEAD_DIM: tl.constexpr, SK: tl.constexpr, SV: tl.constexpr,
                      BLOCK_N: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
                      UPCAST: tl.constexpr, USE_TMA: tl.constexpr, WARP_SPEC: tl.constexpr,
                      KEYS_EVEN: tl.constexpr, SPLIT: tl.constexpr):
    """Chunk ``part % SPLIT`` of a split full head's key blocks (consecutive, ceil(blocks / SPLIT) each,
    the last ones possibly empty); every key block when ``part`` < 0 (a head that is not split)."""
    n_blocks = (L + BLOCK_N - 1) // BLOCK_N
    per_chunk = (n_blocks + SPLIT - 1) // SPLIT
    j_lo = tl.where(part >= 0, tl.minimum((part % SPLIT) * per_chunk, n_blocks), 0)
    j_hi = tl.where(part >= 0, tl.minimum(j_lo + per_chunk, n_blocks), n_blocks)
    return _attend_all_keys(acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, dk0, dk1, dv0, dv1, offs_m, offs_d0,
                            offs_d1, L, qk_scale, HEAD_DIM, SK, SV, BLOCK_N, D0, D1, HAS_D1, UPCAST, USE_TMA,
                            WARP_SPEC, KEYS_EVEN, j_lo, j_hi, True)


@triton.jit
def _segments(m0, L, mode, win, img_lo, img_hi, t_lo, t_hi, BLOCK_M: tl.constexpr):
    """Key intervals of one query block: A (text keys, or all keys for full heads), B (image keys).

    Returns (a_lo, a_hi, af_lo, af_hi, b_lo, b_hi, bf_lo, bf_hi): each segment and its sub-interval
    that every valid query row of the block attends entirely.
    """
    m_last = tl.minimum(m0 + BLOCK_M, L) - 1
    is_full = mode == 0
    is_arrow = mode == 2
    has_txt_q = (m0 < t_hi) & (m_last >= t_lo)
    qi_lo = tl.maximum(m0, img_lo)
    qi_hi = tl.minimum(m_last, img_hi - 1)
    has_img_q = qi_lo <= qi_hi
    band_lo = tl.maximum(img_lo, qi_lo - win)
    band_hi = tl.minimum(img_hi, qi_hi + win + 1)
    core_lo = tl.maximum(img_lo, qi_hi - win)
    core_hi = tl.minimum(img_hi, qi_lo + win + 1)
    # segment A
    need_t = is_arrow | has_txt_q
    a_lo = tl.where(is_full, 0, tl.where(need_t, t_lo, 0))
    a_hi = tl.where(is_full, L, tl.where(need_t, t_hi, 0))
    a_full_ok = is_full | is_arrow | (~has_img_q)
    af_lo = tl.where(a_full_ok, a_lo, 0)
    af_hi = tl.where(a_full_ok, a_hi, 0)
    # segment B
    arrow_txt = is_arrow & has_txt_q
    b_on = (~is_full) & (arrow_txt | has_img_q)
    b_lo = tl.where(b_on, tl.where(arrow_txt, img_lo, band_lo), 0)
    b_hi = tl.where(b_on, tl.where(arrow_txt, img_hi, band_hi), 0)
    b_full_ok = b_on & ~(has_txt_q & ~is_arrow)
    bf_lo = tl.where(b_full_ok, tl.where(has_img_q, core_lo, img_lo), 0)
    bf_hi = tl.where(b_full_ok, tl.where(has_img_q, core_hi, img_hi), 0)
    return a_lo, a_hi, af_lo, af_hi, b_lo, b_hi, bf_lo, bf_hi


@triton.jit
def _attend_windowed(acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, dk0, dk1, dv0, dv1, m0, offs_m, offs_d0, offs_d1,
                     mode, win, L, img_lo, img_hi, t_lo, t_hi, qk_scale, HEAD_DIM: tl.constexpr, SK: tl.constexpr,
                     SV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D0: tl.constexpr,
                     D1: tl.constexpr, HAS_D1: tl.constexpr, UPCAST: tl.constexpr, USE_TMA: tl.constexpr,
                     WARP_SPEC: tl.constexpr, EDGE_STAGES: tl.constexpr, ONE_LOOP: tl.constexpr,
                     POLY_EXP: tl.constexpr = 0):
    """A window or arrow head's query block: its two key segments (_segments), edge blocks masked by the
    rows' key intervals (_row_keys), walked in one loop per segment or in three."""
    a_lo, a_hi, af_lo, af_hi, b_lo, b_hi, bf_lo, bf_hi = _segments(m0, L, mode, win, img_lo, img_hi,
                                                                   t_lo, t_hi, BLOCK_M)
    lo_a, hi_a, lo_b, hi_b = _row_keys(offs_m, mode, win, img_lo, img_hi, t_lo, t_hi, L)
    if ONE_LOOP:
        acc0, acc1, m_i, l_i = _attend_segment_one_loop(
            acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, dk0, dk1, dv0, dv1, offs_d0, offs_d1, a_lo, a_hi,
            af_lo, af_hi, lo_a, hi_a, L, qk_scale, HEAD_DIM, SK, SV, BLOCK_N, D0, D1, HAS_D1, UPCAST, USE_TMA,
            POLY_EXP)
        acc0, acc1, m_i, l_i = _attend_segment_one_loop(
            acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, dk0, dk1, dv0, dv1, offs_d0, offs_d1, b_lo, b_hi,
            bf_lo, bf_hi, lo_b, hi_b, L, qk_scale, HEAD_DIM, SK, SV, BLOCK_N, D0, D1, HAS_D1, UPCAST, USE_TMA,
            POLY_EXP)
        l_i = tl.where(l_i > 0, l_i, 1.0)  # rows past L of a window head attend nothing: not stored
    else:
        acc0, acc1, m_i, l_i = _attend_segment(acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, dk0, dk1, dv0, dv1,
                                               offs_d0, offs_d1, a_lo, a_hi, af_lo, af_hi, lo_a, hi_a, qk_scale,
                                               HEAD_DIM, SK, SV, BLOCK_N, D0, D1, HAS_D1, UPCAST, USE_TMA,
                                               WARP_SPEC, EDGE_STAGES, POLY_EXP)
        acc0, acc1, m_i, l_i = _attend_segment(acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, dk0, dk1, dv0, dv1,
                                               offs_d0, offs_d1, b_lo, b_hi, bf_lo, bf_hi, lo_b, hi_b, qk_scale,
                                               HEAD_DIM, SK, SV, BLOCK_N, D0, D1, HAS_D1, UPCAST, USE_TMA,
                                               WARP_SPEC, EDGE_STAGES, POLY_EXP)
    return acc0, acc1, m_i, l_i


@triton.jit
def _tile_of(pid, B, n_mblocks, first_text_mb, end_text_mb):
    """(head rank, batch, query block) of program ``pid``: first the query blocks holding text rows
    [first_text_mb, end_text_mb) of every head (an arrow head's text rows attend every key: started
    last, they would run on alone at the end), then every other block, heads in ORDER's rank (heaviest
    first), batch, then query block fastest (neighbouring blocks share their K/V band in L2)."""
    n_text_mb = end_text_mb - first_text_mb
    n_heavy = (tl.num_programs(0) // (B * n_mblocks)) * B * n_text_mb
    if pid < n_heavy:
        per_rank = B * n_text_mb
        rank = pid // per_rank
        rem = pid - rank * per_rank
        b = rem // n_text_mb
        mb = first_text_mb + rem - b * n_text_mb
    else:
        n_rest = tl.maximum(n_mblocks - n_text_mb, 1)
        p = pid - n_heavy
        per_rank = B * n_rest
        rank = p // per_rank
        rem = p - rank * per_rank
        b = rem // n_rest
        j = rem - b * n_rest
        mb = tl.where(j < first_text_mb, j, j + n_text_mb)
    return rank, b, mb


# Sequence geometry is not specialised on (one compile serves every length); strides are,
# so the compiler still sees 16-byte aligned rows.
@triton.jit(do_not_specialize=["B", "L", "img_lo", "img_hi", "t_lo", "t_hi", "n_mblocks", "n_split_heads"])
def headwise_fwd_kernel(Q, K, V, O, C, R, MODE, WIN, ORDER, PART, WS, WML, CNT,
                        stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
                        stride_ob, stride_oh, stride_cb, stride_ch, stride_rb, stride_rh,
                        B, L, img_lo, img_hi, t_lo, t_hi, n_mblocks, n_split_heads, qk_scale,
                        HEAD_DIM: tl.constexpr, SQ: tl.constexpr, SK: tl.constexpr, SV: tl.constexpr,
                        SO: tl.constexpr, SC: tl.constexpr, SR: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                        HAS_D1: tl.constexpr, HAS_RESIDUAL: tl.constexpr, UPCAST: tl.constexpr,
                        HINT_ALIGN: tl.constexpr, SUBTRACT: tl.constexpr = False, USE_TMA: tl.constexpr = False,
                        WARP_SPEC: tl.constexpr = False, ALL_FULL: tl.constexpr = False,
                        EDGE_STAGES: tl.constexpr = 3, ONE_LOOP: tl.constexpr = False,
                        KEYS_EVEN: tl.constexpr = False, SPLIT: tl.constexpr = 1,
                        SPLIT_BRANCH: tl.constexpr = False, QO_SPLIT: tl.constexpr = False,
                        R_TMA: tl.constexpr = False, POLY_EXP: tl.constexpr = 0):
    """One launch for every head. Programs are ordered heaviest head first (ORDER), then batch,
    then query block; skip heads (mode 3) copy their rows from the cache C. With HAS_RESIDUAL the
    epilogue writes attention + R (or R - attention with SUBTRACT: WA-RS's residual O - W).
    With USE_TMA (Hopper and later) K and V tiles (and Q and O for unsplit head dims) go through
    per-head tensor descriptors, built here on the device (the host provides their scratch through
    ``triton.set_allocator``). ALL_FULL: every head is full (see _attend_all_keys), and KEYS_EVEN:
    L is a multiple of BLOCK_N (no partial key block); EDGE_STAGES:
    the pipeline depth of the masked edge loops (see _attend_segment); ONE_LOOP: each segment in one
    loop instead (see _attend_segment_one_loop). SPLIT > 1: some full heads (n_split_heads of them) split
    their keys into SPLIT chunks, each chunk a program of its own (its own ORDER rank, where PART holds
    f * SPLIT + chunk, f the head's index among the split heads; -1 for every other rank), merged by the
    last to finish (see _merge_key_chunks); SPLIT_BRANCH: the other full heads keep the dense loop.
    QO_SPLIT: Q and O of a split head dim through descriptors too (with USE_TMA); R_TMA: the residual R
    through descriptors wherever O goes through them. POLY_EXP: see _exp2_tile."""
    # text blocks first, except in all-full launches, where every program does the same work
    rank, b, mb = _tile_of(tl.program_id(0), B, n_mblocks, 0 if ALL_FULL else t_lo // BLOCK_M,
                           0 if ALL_FULL else (t_hi + BLOCK_M - 1) // BLOCK_M)
    h = tl.load(ORDER + rank)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    m0 = mb * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d0 = tl.arange(0, D0)
    offs_d1 = D0 + tl.arange(0, D1)
    o_base = _head_base(O, b64, h64, stride_ob, stride_oh, HINT_ALIGN)
    # all-full launches: no skip heads and no per-head geometry; with mode the constant 0 the compiled
    # kernel holds the dense path alone
    mode = 0 if ALL_FULL else tl.load(MODE + h)
    if mode == 3:
        c_base = _head_base(C, b64, h64, stride_cb, stride_ch, HINT_ALIGN)
        c0 = _load_tile(c_base, offs_m, offs_d0, L, SC, HEAD_DIM, True, D0 > HEAD_DIM)
        _store_tile(o_base, c0, offs_m, offs_d0, L, SO, HEAD_DIM, D0 > HEAD_DIM)
        if HAS_D1:
            c1 = _load_tile(c_base, offs_m, offs_d1, L, SC, HEAD_DIM, True, D0 + D1 > HEAD_DIM)
            _store_tile(o_base, c1, offs_m, offs_d1, L, SO, HEAD_DIM, D0 + D1 > HEAD_DIM)
    else:
        win = 0 if ALL_FULL else tl.load(WIN + h)
        part = tl.load(PART + rank) if SPLIT > 1 else -1
        _attend_query_block(Q, K, V, R, o_base, b64, h64, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb,
                            stride_vh, stride_rb, stride_rh, mode, win, L, img_lo, img_hi, t_lo, t_hi, m0, offs_m,
                            offs_d0, offs_d1, qk_scale, WS, WML, CNT, part, b * n_split_heads * n_mblocks + mb,
                            n_mblocks, O.dtype.element_ty,
                            HEAD_DIM, SQ, SK, SV, SO, SR, BLOCK_M, BLOCK_N, D0, D1, HAS_D1, HAS_RESIDUAL, UPCAST,
                            HINT_ALIGN, SUBTRACT, USE_TMA, WARP_SPEC, KEYS_EVEN, EDGE_STAGES, ONE_LOOP, SPLIT,
                            SPLIT_BRANCH, QO_SPLIT, R_TMA, POLY_EXP)


@triton.jit
def _kv_descriptors(k_base, v_base, shape, k_strides, v_strides, block0, block1, HAS_D1: tl.constexpr,
                    USE_TMA: tl.constexpr):
    """(dk0, dk1, dv0, dv1): tensor descriptors of K and V for the head-dim column tiles D0 (``block0``) and
    D1 (``block1``; the D0 ones again without a split), over ``shape`` with token-major ``*_strides``.
    Without USE_TMA, unused placeholders: the loads go through k_base / v_base."""
    if USE_TMA:
        dk0 = tl.make_tensor_descriptor(k_base, shape=shape, strides=k_strides, block_shape=block0)
        dv0 = tl.make_tensor_descriptor(v_base, shape=shape, strides=v_strides, block_shape=block0)
        if HAS_D1:
            dk1 = tl.make_tensor_descriptor(k_base, shape=shape, strides=k_strides, block_shape=block1)
            dv1 = tl.make_tensor_descriptor(v_base, shape=shape, strides=v_strides, block_shape=block1)
        else:
            dk1 = dk0
            dv1 = dv0
    else:
        dk0 = k_base
        dk1 = k_base
        dv0 = v_base
        dv1 = v_base
    return dk0, dk1, dv0, dv1


@triton.jit
def _attend_query_block(Q, K, V, R, o_base, b64, h64, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb,
                        stride_vh, stride_rb, stride_rh, mode, win, L, img_lo, img_hi, t_lo, t_hi, m0, offs_m,
                        offs_d0, offs_d1, qk_scale, WS, WML, CNT, part, block_base, n_mblocks,
                        OUT_DTYPE: tl.constexpr,
                        HEAD_DIM: tl.constexpr,
                        SQ: tl.constexpr, SK: tl.constexpr, SV: tl.constexpr, SO: tl.constexpr, SR: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                        HAS_D1: tl.constexpr, HAS_RESIDUAL: tl.constexpr, UPCAST: tl.constexpr,
                        HINT_ALIGN: tl.constexpr, SUBTRACT: tl.constexpr, USE_TMA: tl.constexpr,
                        WARP_SPEC: tl.constexpr, KEYS_EVEN: tl.constexpr, EDGE_STAGES: tl.constexpr,
                        ONE_LOOP: tl.constexpr, SPLIT: tl.constexpr, SPLIT_BRANCH: tl.constexpr,
                        QO_SPLIT: tl.constexpr, R_TMA: tl.constexpr, POLY_EXP: tl.constexpr = 0):
    """Attention of one query block of one (batch, head) that is not skipped, and its epilogue. For a chunk
    of a split full head (``part`` >= 0: f * SPLIT + chunk) one chunk of its keys, and the epilogue only in
    the chunk that merges; its query block is number ``block_base + f * n_mblocks`` among the split heads'
    (``block_base``: this batch's first, plus the query block's index)."""
    # Q and O go through descriptors with K and V: the copy engine puts Q in shared memory, where the
    # tensor cores read it (H200, D = 128, 64-row tiles: 0.93x cuDNN, 0.83x with Q and O by pointer;
    # benchmarks/d128_schedules.py). For split head dims (D = 72) only with QO_SPLIT (KernelConfig.
    # qo_tma_split_dim): the one PixArt-2K sweep with them on descriptors hit an illegal memory access
    # (in a config that also fails without them), and they have not been timed since.
    QO_DESC: tl.constexpr = USE_TMA and (QO_SPLIT or not HAS_D1)
    R_DESC: tl.constexpr = QO_DESC and R_TMA  # KernelConfig.residual_tma
    q_base = _head_base(Q, b64, h64, stride_qb, stride_qh, HINT_ALIGN)
    k_base = _head_base(K, b64, h64, stride_kb, stride_kh, HINT_ALIGN)
    v_base = _head_base(V, b64, h64, stride_vb, stride_vh, HINT_ALIGN)
    dk0, dk1, dv0, dv1 = _kv_descriptors(k_base, v_base, (L, HEAD_DIM), (SK, 1), (SV, 1), (BLOCK_N, D0),
                                         (BLOCK_N, D1), HAS_D1, USE_TMA)
    if QO_DESC:
        q0 = _head_tile_desc(q_base, L, HEAD_DIM, SQ, BLOCK_M, D0).load([m0, 0])
    else:
        q0 = _load_tile(q_base, offs_m, offs_d0, L, SQ, HEAD_DIM, True, D0 > HEAD_DIM)
    q1, acc0, acc1, m_i, l_i = _softmax_start(q_base, q0, offs_m, offs_d1, L, SQ, HEAD_DIM, BLOCK_M, D0, D1, HAS_D1,
                                              m0, QO_DESC)
    if mode == 0:  # a full head (every head of an all-full launch, where mode is the constant 0): all keys
        # with SPLIT > 1 a chunk walks its share in the ranged loop, and so does an unsplit full head (part
        # < 0: every key block), unless SPLIT_BRANCH sends that one to the dense loop (a runtime branch)
        if SPLIT > 1 and (not SPLIT_BRANCH or part >= 0):
            acc0, acc1, m_i, l_i = _attend_key_chunk(acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, dk0, dk1, dv0,
                                                     dv1, offs_m, offs_d0, offs_d1, L, qk_scale, part, HEAD_DIM,
                                                     SK, SV, BLOCK_N, D0, D1, HAS_D1, UPCAST, USE_TMA, WARP_SPEC,
                                                     KEYS_EVEN, SPLIT)
        else:
            acc0, acc1, m_i, l_i = _attend_all_keys(acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, dk0, dk1, dv0,
                                                    dv1, offs_m, offs_d0, offs_d1, L, qk_scale, HEAD_DIM, SK, SV,
                                                    BLOCK_N, D0, D1, HAS_D1, UPCAST, USE_TMA, WARP_SPEC, KEYS_EVEN,
                                                    POLY_EXP=POLY_EXP)
    else:
        acc0, acc1, m_i, l_i = _attend_windowed(acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, dk0, dk1, dv0, dv1,
                                                m0, offs_m, offs_d0, offs_d1, mode, win, L, img_lo, img_hi, t_lo,
                                                t_hi, qk_scale, HEAD_DIM, SK, SV, BLOCK_M, BLOCK_N, D0, D1, HAS_D1,
                                                UPCAST, USE_TMA, WARP_SPEC, EDGE_STAGES, ONE_LOOP, POLY_EXP)
    if SPLIT > 1:
        merges = part < 0  # a rank that is not a chunk writes its rows
        if mode == 0:
            if part >= 0:
                acc0, acc1, l_i, merges = _merge_key_chunks(acc0, acc1, m_i, l_i, WS, WML, CNT,
                                                            block_base + (part // SPLIT) * n_mblocks, part % SPLIT,
                                                            SPLIT, BLOCK_M, D0, D1, HAS_D1, USE_TMA)
        if merges:
            _epilogue(acc0, acc1, l_i, R, o_base, b64, h64, stride_rb, stride_rh, m0, offs_m, offs_d0, offs_d1, L,
                      OUT_DTYPE, HEAD_DIM, SO, SR, BLOCK_M, D0, D1, HAS_D1, HAS_RESIDUAL, HINT_ALIGN, SUBTRACT,
                      QO_DESC, R_DESC)
    else:
        _epilogue(acc0, acc1, l_i, R, o_base, b64, h64, stride_rb, stride_rh, m0, offs_m, offs_d0, offs_d1, L,
                  OUT_DTYPE, HEAD_DIM, SO, SR, BLOCK_M, D0, D1, HAS_D1, HAS_RESIDUAL, HINT_ALIGN, SUBTRACT, QO_DESC,
                  R_DESC)


@triton.jit
def _merge_key_chunks(acc0, acc1, m_i, l_i, WS, WML, CNT, block, chunk, SPLIT: tl.constexpr,
                      BLOCK_M: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
                      USE_TMA: tl.constexpr):
    """Split-K merge of a full head's query block whose keys ran as SPLIT programs (chunks).

    Each chunk stores its unnormalised accumulators and its row max and sum (fp32, WS / WML, padded to
    BLOCK_M x (D0 + D1): no masks), then takes a ticket from its query block's counter (CNT[block],
    zeroed by the host for each launch: a memset node under graph replay). The chunk that draws the
    last ticket has every other chunk's partials behind the counter's acquire; it merges them (softmax
    rescaling by 2^(m_c - max)) and returns merges=True with the merged accumulators and sum.
    An empty chunk (fewer key blocks than chunks) has m = -inf, l = 0 and weighs nothing."""
    rows = tl.arange(0, BLOCK_M)
    DP: tl.constexpr = D0 + D1 * HAS_D1  # the workspace's row: the padded head dim
    cols0 = tl.arange(0, D0)
    cols1 = D0 + tl.arange(0, D1)
    slot = (block * SPLIT + chunk).to(tl.int64)
    ws = WS + slot * (BLOCK_M * DP)
    tl.store(ws + rows[:, None] * DP + cols0[None, :], acc0)
    if HAS_D1:
        tl.store(ws + rows[:, None] * DP + cols1[None, :], acc1)
    ml = WML + slot * (2 * BLOCK_M)
    tl.store(ml + rows, m_i)
    tl.store(ml + BLOCK_M + rows, l_i)
    # every thread's partial stores happen before the one thread that takes the ticket releases them
    tl.debug_barrier()
    ticket = tl.atomic_add(CNT + block, 1, sem="acq_rel", scope="gpu")
    merges = ticket == SPLIT - 1
    if merges:  # an online softmax over the chunks, in a loop (registers do not grow with SPLIT)
        first = (block * SPLIT).to(tl.int64)
        m_all = tl.zeros_like(m_i) - float("inf")
        acc0 = tl.zeros_like(acc0)
        acc1 = tl.zeros_like(acc1)
        l_i = tl.zeros_like(l_i)
        for c in range(SPLIT):  # L2 reads (.cg, or the copy engine, which skips L1): other SMs wrote these
            ml_c = WML + (first + c) * (2 * BLOCK_M)
            m_c = tl.load(ml_c + rows, cache_modifier=".cg")
            m_new = tl.maximum(m_all, m_c)
            # rows where every chunk so far is empty keep m = -inf: their weights are taken against 0
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m_all - m_ref)
            weight = tl.math.exp2(m_c - m_ref)
            l_i = l_i * alpha + tl.load(ml_c + BLOCK_M + rows, cache_modifier=".cg") * weight
            ws_c = WS + (first + c) * (BLOCK_M * DP)
            if USE_TMA:  # the copy engine: no per-element addresses (D = 128 all-full, Triton 3.6: 174 -> 168
                # registers, no spill under a 168 cap; benchmarks/kernel_resources.py)
                part0 = _head_tile_desc(ws_c, BLOCK_M, DP, DP, BLOCK_M, D0).load([0, 0])
            else:
                part0 = tl.load(ws_c + rows[:, None] * DP + cols0[None, :], cache_modifier=".cg")
            acc0 = acc0 * alpha[:, None] + part0 * weight[:, None]
            if HAS_D1:
                if USE_TMA:
                    part1 = _head_tile_desc(ws_c, BLOCK_M, DP, DP, BLOCK_M, D1).load([0, D0])
                else:
                    part1 = tl.load(ws_c + rows[:, None] * DP + cols1[None, :], cache_modifier=".cg")
                acc1 = acc1 * alpha[:, None] + part1 * weight[:, None]
            m_all = m_new
    return acc0, acc1, l_i, merges


@triton.jit
def _epilogue(acc0, acc1, l_i, R, o_base, b64, h64, stride_rb, stride_rh, m0, offs_m, offs_d0, offs_d1, L,
              OUT_DTYPE: tl.constexpr, HEAD_DIM: tl.constexpr, SO: tl.constexpr, SR: tl.constexpr,
              BLOCK_M: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
              HAS_RESIDUAL: tl.constexpr, HINT_ALIGN: tl.constexpr, SUBTRACT: tl.constexpr, QO_DESC: tl.constexpr,
              R_DESC: tl.constexpr = False):
    """acc / l (plus or minus the residual) stored to the output rows of one query block; O through
    descriptors with QO_DESC (rows past L and columns past HEAD_DIM fall outside: not written), the
    residual R with R_DESC."""
    inv_l = 1.0 / l_i
    r_base = _head_base(R, b64, h64, stride_rb, stride_rh, HINT_ALIGN)
    out0 = _with_residual(acc0 * inv_l[:, None], r_base, m0, offs_m, offs_d0, 0, L, HEAD_DIM, SR, BLOCK_M, D0,
                          D0 > HEAD_DIM, HAS_RESIDUAL, SUBTRACT, R_DESC)
    if QO_DESC:
        _head_tile_desc(o_base, L, HEAD_DIM, SO, BLOCK_M, D0).store([m0, 0], out0.to(OUT_DTYPE))
    else:
        _store_tile(o_base, out0.to(OUT_DTYPE), offs_m, offs_d0, L, SO, HEAD_DIM, D0 > HEAD_DIM)
    if HAS_D1:
        out1 = _with_residual(acc1 * inv_l[:, None], r_base, m0, offs_m, offs_d1, D0, L, HEAD_DIM, SR, BLOCK_M, D1,
                              D0 + D1 > HEAD_DIM, HAS_RESIDUAL, SUBTRACT, R_DESC)
        if QO_DESC:
            _head_tile_desc(o_base, L, HEAD_DIM, SO, BLOCK_M, D1).store([m0, D0], out1.to(OUT_DTYPE))
        else:
            _store_tile(o_base, out1.to(OUT_DTYPE), offs_m, offs_d1, L, SO, HEAD_DIM, D0 + D1 > HEAD_DIM)


@triton.jit
def _with_residual(out, r_base, m0, offs_m, offs_cols, col0, L, HEAD_DIM: tl.constexpr, SR: tl.constexpr,
                   BLOCK_M: tl.constexpr, WIDTH: tl.constexpr, COL_MASK: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                   SUBTRACT: tl.constexpr, R_DESC: tl.constexpr):
    """One column tile of the output: ``out``, ``out + R`` or ``R - out`` (SUBTRACT: WA-RS's R = O - W),
    R's tile at columns [col0, col0 + WIDTH) loaded through a descriptor with R_DESC."""
    if HAS_RESIDUAL:
        if R_DESC:
            r = _head_tile_desc(r_base, L, HEAD_DIM, SR, BLOCK_M, WIDTH).load([m0, col0]).to(tl.float32)
        else:
            r = _load_tile(r_base, offs_m, offs_cols, L, SR, HEAD_DIM, True, COL_MASK).to(tl.float32)
        if SUBTRACT:
            out = r - out
        else:
            out = out + r
    return out


@triton.jit
def _both_block(acc0, acc1, m_i, l_i, wacc0, wacc1, wm_i, wl_i, q0, q1, k_base, v_base, start_n, offs_d0, offs_d1,
                L, lo_a, hi_a, lo_b, hi_b, qk_scale,
                HEAD_DIM: tl.constexpr, SK: tl.constexpr, SV: tl.constexpr, BLOCK_N: tl.constexpr,
                D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr, UPCAST: tl.constexpr):
    """One key block inside the windowed pattern: its scores, computed once, feed the full softmax
    (keys past L masked) and the windowed one (the rows' key intervals of segments A and B)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k0 = _load_tile(k_base, offs_n, offs_d0, L, SK, HEAD_DIM, True, D0 > HEAD_DIM)
    qk = _mm(q0, tl.trans(k0), tl.zeros([q0.shape[0], BLOCK_N], dtype=tl.float32), UPCAST)
    v0 = _load_tile(v_base, offs_n, offs_d0, L, SV, HEAD_DIM, True, D0 > HEAD_DIM)
    if HAS_D1:
        k1 = _load_tile(k_base, offs_n, offs_d1, L, SK, HEAD_DIM, True, D0 + D1 > HEAD_DIM)
        qk = _mm(q1, tl.trans(k1), qk, UPCAST)
        v1 = _load_tile(v_base, offs_n, offs_d1, L, SV, HEAD_DIM, True, D0 + D1 > HEAD_DIM)
    else:
        v1 = tl.zeros([BLOCK_N, D1], dtype=v0.dtype)
    qk = qk * qk_scale
    key_ok = (offs_n < L)[None, :]
    acc0, acc1, m_i, l_i = _online_update(acc0, acc1, m_i, l_i, tl.where(key_ok, qk, NEG_BIG), v0, v1,
                                          HAS_D1, UPCAST)
    allowed = _in_rows(offs_n, lo_a, hi_a) | _in_rows(offs_n, lo_b, hi_b)
    wacc0, wacc1, wm_i, wl_i = _online_update(wacc0, wacc1, wm_i, wl_i, tl.where(allowed, qk, NEG_BIG), v0, v1,
                                              HAS_D1, UPCAST)
    return acc0, acc1, m_i, l_i, wacc0, wacc1, wm_i, wl_i


@triton.jit
def _full_blocks(acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, j_lo, j_hi, offs_m, offs_d0, offs_d1, L, qk_scale,
                 HEAD_DIM: tl.constexpr, SK: tl.constexpr, SV: tl.constexpr, BLOCK_N: tl.constexpr,
                 D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr, UPCAST: tl.constexpr):
    """Key blocks [j_lo, j_hi) outside the windowed pattern: the full softmax alone, unmasked except
    for the sequence's partial last block."""
    n_whole = L // BLOCK_N
    row_lo = offs_m * 0
    row_hi = row_lo + L
    for j in range(j_lo, tl.minimum(j_hi, n_whole)):
        acc0, acc1, m_i, l_i = _attend_block(acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, k_base, k_base, v_base,
                                             v_base, j * BLOCK_N, offs_d0, offs_d1, L, row_lo, row_hi, qk_scale,
                                             HEAD_DIM, SK, SV, BLOCK_N, D0, D1, HAS_D1, False, UPCAST, False)
    for j in range(tl.maximum(j_lo, n_whole), j_hi):  # at most the one partial block
        acc0, acc1, m_i, l_i = _attend_block(acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, k_base, k_base, v_base,
                                             v_base, j * BLOCK_N, offs_d0, offs_d1, L, row_lo, row_hi, qk_scale,
                                             HEAD_DIM, SK, SV, BLOCK_N, D0, D1, HAS_D1, True, UPCAST, False)
    return acc0, acc1, m_i, l_i


@triton.jit
def _windowed_block_ranges(a_lo, a_hi, b_lo, b_hi, BLOCK_N: tl.constexpr):
    """The key blocks that touch the windowed intervals A and B, as two disjoint ascending block
    ranges (the second empty, at the first's end, when they overlap or one interval is empty)."""
    a_on = a_hi > a_lo
    b_on = b_hi > b_lo
    ja_lo = a_lo // BLOCK_N
    ja_hi = (a_hi + BLOCK_N - 1) // BLOCK_N
    jb_lo = b_lo // BLOCK_N
    jb_hi = (b_hi + BLOCK_N - 1) // BLOCK_N
    ja_lo, ja_hi = tl.where(a_on, ja_lo, jb_lo), tl.where(a_on, ja_hi, jb_hi)
    jb_lo, jb_hi = tl.where(b_on, jb_lo, ja_lo), tl.where(b_on, jb_hi, ja_hi)
    a_first = ja_lo <= jb_lo
    r1_lo = tl.where(a_first, ja_lo, jb_lo)
    r1_hi = tl.where(a_first, ja_hi, jb_hi)
    r2_lo = tl.where(a_first, jb_lo, ja_lo)
    r2_hi = tl.where(a_first, jb_hi, ja_hi)
    merge = r2_lo <= r1_hi
    r1_hi = tl.where(merge, tl.maximum(r1_hi, r2_hi), r1_hi)
    r2_lo = tl.where(merge, r1_hi, r2_lo)
    r2_hi = tl.where(merge, r1_hi, r2_hi)
    return r1_lo, r1_hi, r2_lo, r2_hi


@triton.jit
def _online_update(acc0, acc1, m_i, l_i, qk, v0, v1, HAS_D1: tl.constexpr, UPCAST: tl.constexpr):
    """Online-softmax step with already scaled (log2 domain) and masked scores qk."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.math.exp2(qk - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    p = p.to(v0.dtype)
    acc0 = _mm(p, v0, acc0 * alpha[:, None], UPCAST)
    if HAS_D1:
        acc1 = _mm(p, v1, acc1 * alpha[:, None], UPCAST)
    return acc0, acc1, m_new, l_i


@triton.jit(do_not_specialize=["H", "L", "img_lo", "img_hi", "t_lo", "t_hi", "n_mblocks"])
def warsr_fwd_kernel(Q, K, V, O, R, MODE, WIN,
                     stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
                     stride_ob, stride_oh, stride_rb, stride_rh,
                     H, L, img_lo, img_hi, t_lo, t_hi, n_mblocks, qk_scale,
                     HEAD_DIM: tl.constexpr, SQ: tl.constexpr, SK: tl.constexpr, SV: tl.constexpr,
                     SO: tl.constexpr, SR: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                     HAS_D1: tl.constexpr, UPCAST: tl.constexpr, HINT_ALIGN: tl.constexpr):
    """WA-RS refresh step in one pass: full output O and residual R = O - W, where W is the
    windowed (window/arrow, per head) output. The key blocks that touch the windowed pattern (at
    most two ranges, from the head's segments) are visited first, their scores computed once for
    both online softmaxes; every other block updates only O, without element masks (the layout
    of headwise_fwd_kernel's full heads). So the pass costs full attention plus the window's
    exponentials and P@V, not full plus windowed attention."""
    pid = tl.program_id(0)
    mb = pid % n_mblocks
    bh = pid // n_mblocks
    b = bh // H
    h = bh - b * H
    mode = tl.load(MODE + h)
    win = tl.load(WIN + h)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    m0 = mb * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d0 = tl.arange(0, D0)
    offs_d1 = D0 + tl.arange(0, D1)
    q_base = _head_base(Q, b64, h64, stride_qb, stride_qh, HINT_ALIGN)
    k_base = _head_base(K, b64, h64, stride_kb, stride_kh, HINT_ALIGN)
    v_base = _head_base(V, b64, h64, stride_vb, stride_vh, HINT_ALIGN)
    q0 = _load_tile(q_base, offs_m, offs_d0, L, SQ, HEAD_DIM, True, D0 > HEAD_DIM)
    q1, acc0, acc1, m_i, l_i = _softmax_start(q_base, q0, offs_m, offs_d1, L, SQ, HEAD_DIM, BLOCK_M, D0, D1, HAS_D1)
    wacc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    wacc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    wm_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    wl_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    a_lo, a_hi, _, _, b_lo, b_hi, _, _ = _segments(m0, L, mode, win, img_lo, img_hi, t_lo, t_hi, BLOCK_M)
    lo_a, hi_a, lo_b, hi_b = _row_keys(offs_m, mode, win, img_lo, img_hi, t_lo, t_hi, L)
    r1_lo, r1_hi, r2_lo, r2_hi = _windowed_block_ranges(a_lo, a_hi, b_lo, b_hi, BLOCK_N)
    for j in range(r1_lo, r1_hi):
        acc0, acc1, m_i, l_i, wacc0, wacc1, wm_i, wl_i = _both_block(
            acc0, acc1, m_i, l_i, wacc0, wacc1, wm_i, wl_i, q0, q1, k_base, v_base, j * BLOCK_N, offs_d0, offs_d1,
            L, lo_a, hi_a, lo_b, hi_b, qk_scale, HEAD_DIM, SK, SV, BLOCK_N, D0, D1, HAS_D1, UPCAST)
    for j in range(r2_lo, r2_hi):
        acc0, acc1, m_i, l_i, wacc0, wacc1, wm_i, wl_i = _both_block(
            acc0, acc1, m_i, l_i, wacc0, wacc1, wm_i, wl_i, q0, q1, k_base, v_base, j * BLOCK_N, offs_d0, offs_d1,
            L, lo_a, hi_a, lo_b, hi_b, qk_scale, HEAD_DIM, SK, SV, BLOCK_N, D0, D1, HAS_D1, UPCAST)
    # the rest of the keys feed the full softmax only: before, between and after the two ranges
    n_blocks = (L + BLOCK_N - 1) // BLOCK_N
    acc0, acc1, m_i, l_i = _full_blocks(acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, 0, r1_lo, offs_m, offs_d0,
                                        offs_d1, L, qk_scale, HEAD_DIM, SK, SV, BLOCK_N, D0, D1, HAS_D1,
                                        UPCAST)
    acc0, acc1, m_i, l_i = _full_blocks(acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, r1_hi, r2_lo, offs_m, offs_d0,
                                        offs_d1, L, qk_scale, HEAD_DIM, SK, SV, BLOCK_N, D0, D1, HAS_D1,
                                        UPCAST)
    acc0, acc1, m_i, l_i = _full_blocks(acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, r2_hi, n_blocks, offs_m,
                                        offs_d0, offs_d1, L, qk_scale, HEAD_DIM, SK, SV, BLOCK_N, D0, D1, HAS_D1,
                                        UPCAST)
    o_base = _head_base(O, b64, h64, stride_ob, stride_oh, HINT_ALIGN)
    r_base = _head_base(R, b64, h64, stride_rb, stride_rh, HINT_ALIGN)
    inv_l = 1.0 / l_i
    inv_wl = 1.0 / wl_i
    full0 = acc0 * inv_l[:, None]
    _store_tile(o_base, full0.to(O.dtype.element_ty), offs_m, offs_d0, L, SO, HEAD_DIM, D0 > HEAD_DIM)
    _store_tile(r_base, (full0 - wacc0 * inv_wl[:, None]).to(R.dtype.element_ty), offs_m, offs_d0, L, SR,
                HEAD_DIM, D0 > HEAD_DIM)
    if HAS_D1:
        full1 = acc1 * inv_l[:, None]
        _store_tile(o_base, full1.to(O.dtype.element_ty), offs_m, offs_d1, L, SO, HEAD_DIM, D0 + D1 > HEAD_DIM)
        _store_tile(r_base, (full1 - wacc1 * inv_wl[:, None]).to(R.dtype.element_ty), offs_m, offs_d1, L, SR,
                    HEAD_DIM, D0 + D1 > HEAD_DIM)
