"""Triton kernel for 2D neighbourhood attention (window2d) over tokens on a (frames, rows, cols) grid.

Imported lazily by :mod:`ditlens.kernels.window2d`. Same tensor conventions as
:mod:`ditlens.kernels._triton_impl` (q, k, v, out ``[B, H, L, D]``, unit stride on D, token strides
compile-time constants, the head dim split into column tiles D0 + D1), whose helpers it uses.

The window is square on the grid: image query (row r, col c) attends image key (r', c') of any frame
iff ``|r - r'| <= radius`` and ``|c - c'| <= radius``. In the flattened token order such a window is
``2 radius + 1`` short runs, one per grid row, so 1D blocks of tokens waste most of every block.
Instead the kernel reads the tokens *as if reordered into tiles*: a query block is a
``TQ_R x TQ_C`` tile of the grid and a key block a ``TK_R x TK_C`` tile, gathered row by row from
their flattened positions (runs of ``TQ_C`` / ``TK_C`` consecutive tokens), so nothing is copied
and the output lands at the tokens' own positions. A query tile visits the key tiles that overlap
its window grown by the radius (every frame), one pipelined loop; key tiles that every query of
the tile attends entirely take no element mask, edge tiles mask ``|dr|, |dc| <= radius`` and keys
past the grid. With USE_TMA the key tiles come through 3D tensor descriptors instead of gathers.
Text tokens attend text tokens only (DESIGN §5 for window2d in joint attention): one more program
per ``BLOCK_M`` text rows, walking the text keys in a second loop (compiled only with HAS_TEXT).
"""

import triton
import triton.language as tl

from ditlens.kernels._triton_impl import _head_base, _kv_descriptors, _mm, _softmax_start, _softmax_step_inf


@triton.jit
def _gather_rows(base, tok, ok, offs_cols, STRIDE: tl.constexpr, HEAD_DIM: tl.constexpr, COL_MASK: tl.constexpr):
    """Rows ``tok`` (token indices, rows where ``ok`` is False read as 0) of one head slice, columns offs_cols."""
    ptrs = base + tok[:, None] * STRIDE + offs_cols[None, :]
    if COL_MASK:
        return tl.load(ptrs, mask=ok[:, None] & (offs_cols[None, :] < HEAD_DIM), other=0.0)
    return tl.load(ptrs, mask=ok[:, None], other=0.0)


@triton.jit
def _scatter_rows(base, tile, tok, ok, offs_cols, STRIDE: tl.constexpr, HEAD_DIM: tl.constexpr,
                  COL_MASK: tl.constexpr):
    ptrs = base + tok[:, None] * STRIDE + offs_cols[None, :]
    if COL_MASK:
        tl.store(ptrs, tile, mask=ok[:, None] & (offs_cols[None, :] < HEAD_DIM))
    else:
        tl.store(ptrs, tile, mask=ok[:, None])


@triton.jit
def _kv_tile(desc, base, tok, ok, frow, fcol, col0, offs_cols, STRIDE: tl.constexpr, HEAD_DIM: tl.constexpr,
             COL_MASK: tl.constexpr, FROM_DESC: tl.constexpr):
    """One K or V block as [BLOCK_N, width]: with FROM_DESC the copy engine loads the grid tile at
    (frame row ``frow``, col ``fcol``) through ``desc`` (rows past the frames, cols past the grid and
    channels past HEAD_DIM read as zero), otherwise the rows ``tok`` are gathered."""
    if FROM_DESC:
        t = desc.load([frow, fcol, col0])
        out = tl.reshape(t, [t.shape[0] * t.shape[1], t.shape[2]])
    else:
        out = _gather_rows(base, tok, ok, offs_cols, STRIDE, HEAD_DIM, COL_MASK)
    return out


@triton.jit
def _gathered_block(acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, dk0, dk1, dv0, dv1, frow, fcol, k_tok, k_ok,
                    q_row, q_col, k_row, k_col, rad, masked, qk_scale, offs_d0, offs_d1, HEAD_DIM: tl.constexpr,
                    SK: tl.constexpr, SV: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
                    UPCAST: tl.constexpr, FROM_DESC: tl.constexpr):
    """One key block of the online softmax, its keys at ``k_tok`` (gathered, or the grid tile at
    (frow, fcol) through the descriptors with FROM_DESC). When ``masked`` (a runtime flag, uniform over
    the program) a score is kept iff its key is valid and within ``rad`` of the query in rows and in
    cols, else -inf; a row with no key so far keeps m = -inf and takes its exponents against 0 (exact,
    as in _attend_segment_one_loop)."""
    k0 = _kv_tile(dk0, k_base, k_tok, k_ok, frow, fcol, 0, offs_d0, SK, HEAD_DIM, D0 > HEAD_DIM, FROM_DESC)
    qk = _mm(q0, tl.trans(k0), tl.zeros([q0.shape[0], k_tok.shape[0]], dtype=tl.float32), UPCAST)
    if HAS_D1:
        k1 = _kv_tile(dk1, k_base, k_tok, k_ok, frow, fcol, D0, offs_d1, SK, HEAD_DIM, D0 + D1 > HEAD_DIM, FROM_DESC)
        qk = _mm(q1, tl.trans(k1), qk, UPCAST)
    if masked:
        keep = (k_ok[None, :] & (tl.abs(q_row[:, None] - k_row[None, :]) <= rad)
                & (tl.abs(q_col[:, None] - k_col[None, :]) <= rad))
        qk = tl.where(keep, qk, float("-inf"))
    p, alpha, m_new, l_i = _softmax_step_inf(m_i, l_i, qk, qk_scale)
    p = p.to(q0.dtype)
    v0 = _kv_tile(dv0, v_base, k_tok, k_ok, frow, fcol, 0, offs_d0, SV, HEAD_DIM, D0 > HEAD_DIM, FROM_DESC)
    acc0 = _mm(p, v0, acc0 * alpha[:, None], UPCAST)
    if HAS_D1:
        v1 = _kv_tile(dv1, v_base, k_tok, k_ok, frow, fcol, D0, offs_d1, SV, HEAD_DIM, D0 + D1 > HEAD_DIM, FROM_DESC)
        acc1 = _mm(p, v1, acc1 * alpha[:, None], UPCAST)
    return acc0, acc1, m_new, l_i


@triton.jit(do_not_specialize=["L", "img_lo", "t_lo", "t_hi", "F", "R", "C", "n_tr", "n_tc"])
def window2d_fwd_kernel(Q, K, V, O, RAD,
                        stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_ob, stride_oh,
                        H, L, img_lo, t_lo, t_hi, F, R, C, n_tr, n_tc, qk_scale,
                        HEAD_DIM: tl.constexpr, SQ: tl.constexpr, SK: tl.constexpr, SV: tl.constexpr,
                        SO: tl.constexpr, TQ_R: tl.constexpr, TQ_C: tl.constexpr, TK_R: tl.constexpr,
                        TK_C: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
                        UPCAST: tl.constexpr, HINT_ALIGN: tl.constexpr, USE_TMA: tl.constexpr = False,
                        HAS_TEXT: tl.constexpr = True):
    """Grid: (query tiles of the image, F * n_tr * n_tc of them, then text blocks of TQ_R * TQ_C rows;
    B * H). RAD: int32 [H], each head's radius. Image tokens are ``[img_lo, img_lo + F * R * C)`` in
    frame-major, row-major order; text tokens ``[t_lo, t_hi)``.

    A text program is a tile whose rows and cols are all 0 (every distance 0, so its mask is the keys'
    validity) walking the text keys in runs of BLOCK_N. USE_TMA: image K/V tiles come through 3D
    tensor descriptors over the image tokens viewed as [F * R, C, D] (the host provides their scratch);
    text keys are always gathered."""
    BLOCK_M: tl.constexpr = TQ_R * TQ_C
    BLOCK_N: tl.constexpr = TK_R * TK_C
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh - b * H
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    rad = tl.load(RAD + h)
    q_base = _head_base(Q, b64, h64, stride_qb, stride_qh, HINT_ALIGN)
    k_base = _head_base(K, b64, h64, stride_kb, stride_kh, HINT_ALIGN)
    v_base = _head_base(V, b64, h64, stride_vb, stride_vh, HINT_ALIGN)
    o_base = _head_base(O, b64, h64, stride_ob, stride_oh, HINT_ALIGN)
    offs_d0 = tl.arange(0, D0)
    offs_d1 = D0 + tl.arange(0, D1)
    e_m = tl.arange(0, BLOCK_M)
    e_n = tl.arange(0, BLOCK_N)
    frame_len = R * C
    n_img_tiles = F * n_tr * n_tc
    is_img = tile < n_img_tiles
    # image tile (f, qa, qb): rows [r0, r0 + TQ_R), cols [c0, c0 + TQ_C) of frame f
    f = tile // (n_tr * n_tc)
    rem = tile - f * (n_tr * n_tc)
    qa = rem // n_tc
    r0 = tl.where(is_img, qa * TQ_R, 0)
    c0 = tl.where(is_img, (rem - qa * n_tc) * TQ_C, 0)
    q_row = tl.where(is_img, r0 + e_m // TQ_C, 0)
    q_col = tl.where(is_img, c0 + e_m % TQ_C, 0)
    text_tok = t_lo + (tile - n_img_tiles) * BLOCK_M + e_m
    q_tok = tl.where(is_img, img_lo + f * frame_len + q_row * C + q_col, text_tok)
    q_ok = tl.where(is_img, (q_row < R) & (q_col < C), text_tok < t_hi)
    q0 = _gather_rows(q_base, q_tok, q_ok, offs_d0, SQ, HEAD_DIM, D0 > HEAD_DIM)
    # the empty online softmax (and a zero second Q tile, replaced below by the gathered one)
    q1, acc0, acc1, m_i, l_i = _softmax_start(q_base, q0, e_m, offs_d1, L, SQ, HEAD_DIM, BLOCK_M, D0, D1, False)
    if HAS_D1:
        q1 = _gather_rows(q_base, q_tok, q_ok, offs_d1, SQ, HEAD_DIM, D0 + D1 > HEAD_DIM)
    # the key rows / cols within the radius of the tile's valid rows / cols, as ranges of key tiles
    r_last = tl.minimum(r0 + TQ_R, R) - 1
    c_last = tl.minimum(c0 + TQ_C, C) - 1
    ka0 = tl.maximum(r0 - rad, 0) // TK_R
    n_ka = tl.minimum(r_last + rad, R - 1) // TK_R - ka0 + 1
    kb0 = tl.maximum(c0 - rad, 0) // TK_C
    n_kb = tl.minimum(c_last + rad, C - 1) // TK_C - kb0 + 1
    per_frame = n_ka * n_kb
    u = e_n // TK_C
    w = e_n % TK_C
    # image K/V viewed as [F * R, C, D]; without USE_TMA the loads gather through k_base / v_base
    dk0, dk1, dv0, dv1 = _kv_descriptors(k_base + img_lo * SK, v_base + img_lo * SV, (F * R, C, HEAD_DIM),
                                         (C * SK, SK, 1), (C * SV, SV, 1), (TK_R, TK_C, D0), (TK_R, TK_C, D1),
                                         HAS_D1, USE_TMA)
    # image programs: the key tiles of every frame within reach
    for j in tl.range(0, tl.where(is_img, F * per_frame, 0)):
        fk = j // per_frame
        rest = j - fk * per_frame
        kr0 = (ka0 + rest // n_kb) * TK_R
        kc0 = (kb0 + rest % n_kb) * TK_C
        k_row = kr0 + u
        k_col = kc0 + w
        k_ok = (k_row < R) & (k_col < C)
        k_tok = img_lo + fk * frame_len + k_row * C + k_col
        # every valid query of the tile attends every key of a whole key tile within reach: no mask
        kr_last = kr0 + TK_R - 1
        kc_last = kc0 + TK_C - 1
        inside = ((kr_last < R) & (kc_last < C) & (r_last - kr0 <= rad) & (kr_last - r0 <= rad)
                  & (c_last - kc0 <= rad) & (kc_last - c0 <= rad))
        acc0, acc1, m_i, l_i = _gathered_block(acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, dk0, dk1, dv0, dv1,
                                               fk * R + kr0, kc0, k_tok, k_ok, q_row, q_col, k_row, k_col, rad,
                                               ~inside, qk_scale, offs_d0, offs_d1, HEAD_DIM, SK, SV, D0, D1, HAS_D1,
                                               UPCAST, USE_TMA)
    # text programs: the text keys (rows and cols 0: the mask is the keys' validity); compiled only with
    # text in the sequence (its gathers cost registers: benchmarks/kernel_resources.py --window2d)
    if HAS_TEXT:
        for j in tl.range(0, tl.where(is_img, 0, tl.cdiv(t_hi - t_lo, BLOCK_N))):
            k_tok = t_lo + j * BLOCK_N + e_n
            k_ok = k_tok < t_hi
            acc0, acc1, m_i, l_i = _gathered_block(acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, dk0, dk1, dv0,
                                                   dv1, 0, 0, k_tok, k_ok, q_row, q_col, e_n * 0, e_n * 0, rad, True,
                                                   qk_scale, offs_d0, offs_d1, HEAD_DIM, SK, SV, D0, D1, HAS_D1,
                                                   UPCAST, False)
    inv_l = 1.0 / tl.where(l_i > 0, l_i, 1.0)  # rows past the grid or the text attend nothing: not stored
    _scatter_rows(o_base, (acc0 * inv_l[:, None]).to(O.dtype.element_ty), q_tok, q_ok, offs_d0, SO, HEAD_DIM,
                  D0 > HEAD_DIM)
    if HAS_D1:
        _scatter_rows(o_base, (acc1 * inv_l[:, None]).to(O.dtype.element_ty), q_tok, q_ok, offs_d1, SO, HEAD_DIM,
                      D0 + D1 > HEAD_DIM)
