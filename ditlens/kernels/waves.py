"""A wave model of one head-wise launch: when does its last program end?

The GPU hands a launch's programs out in program order, each to the first slot that frees up (a slot is
room for one resident program: SMs x programs per SM). A launch ends with its last program. So SMs idle at
its end when its programs are long next to the work per slot (a mixed plan's full heads at PixArt 1024²),
or when its last wave fills only part of the slots (dense FLUX 1024²: 4.36 waves). Splitting full heads
into key chunks (``KernelConfig.split_full`` / ``split_heads``) shortens programs and can fill that tail;
each chunk pays for writing its partial result and the last one for merging them.

Work is counted in key blocks: one ``block_m`` x ``block_n`` score tile and its P @ V. The model knows the
launch's order (:func:`~ditlens.kernels.triton_backend.launch_ranks`) and each program's key blocks (the
key segments the kernel walks); it does not know the per-block costs that differ (masked edge blocks,
skip heads' copies, the merge), which it takes as constants.
"""

from __future__ import annotations

import functools
import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ditlens.kernels.patterns import HeadPlan, TokenLayout
from ditlens.kernels.triton_backend import launch_ranks, triton_cdiv

# A skip head's program copies block_m rows from the cache: about a tenth of a key block's time.
SKIP_BLOCKS = 0.1
# A chunk's partial store, ticket and (for the last) merge, in key blocks; a guess until timed.
MERGE_BLOCKS = 0.5


def query_block_work(mode: str, w: int, m0: int, layout: TokenLayout, block_m: int, block_n: int) -> float:
    """Key blocks one program of a head in ``mode`` (half-width ``w``) visits for query rows
    [m0, m0 + block_m): every key block for a full head; for a window or arrow head its text-key segment
    (when it needs one) plus its image-key segment (the band around its image rows, or every image key for
    an arrow head's text rows), each walked in ``block_n`` steps from its start, as the kernel does."""
    L = layout.seq_len
    if mode == "full":
        return float(triton_cdiv(L, block_n))
    if mode == "skip":
        return SKIP_BLOCKS
    m_last = min(m0 + block_m, L) - 1
    img_lo, img_hi = layout.image_start, layout.image_end
    has_text_rows = m0 < layout.text_end and m_last >= layout.text_start
    rows_lo, rows_hi = max(m0, img_lo), min(m_last, img_hi - 1)
    text_keys = layout.n_text if (mode == "arrow" or has_text_rows) else 0
    if mode == "arrow" and has_text_rows:
        image_keys = img_hi - img_lo
    elif rows_lo <= rows_hi:
        image_keys = min(img_hi, rows_hi + w + 1) - max(img_lo, rows_lo - w)
    else:
        image_keys = 0
    return float(triton_cdiv(text_keys, block_n) + triton_cdiv(max(image_keys, 0), block_n))


@functools.lru_cache(maxsize=1024)
def _head_work(mode: str, w: int, layout: TokenLayout, block_m: int, block_n: int) -> tuple[float, ...]:
    """query_block_work of each query block of one unsplit head (the same for every split tried)."""
    return tuple(query_block_work(mode, w, m0, layout, block_m, block_n)
                 for m0 in range(0, layout.seq_len, block_m))


def program_work(plan: HeadPlan, layout: TokenLayout, batch: int, block_m: int, block_n: int, split: int = 1,
                 n_split_heads: int = 0) -> list[float]:
    """Each program's work in key blocks, in launch order (ranks heaviest first, then batch, then query
    block; the query blocks that hold text rows ahead of the rest, as ``_tile_of`` orders them)."""
    n_mblocks = triton_cdiv(layout.seq_len, block_m)
    # the kernel's text query blocks [t_lo // block_m, cdiv(t_hi, block_m)); none in all-full launches
    text_blocks = (range(0) if plan.all_full
                   else range(layout.text_start // block_m, triton_cdiv(layout.text_end, block_m)))
    mblock_order = list(text_blocks) + [mb for mb in range(n_mblocks) if mb not in text_blocks]
    n_key_blocks = triton_cdiv(layout.seq_len, block_n)
    per_chunk = triton_cdiv(n_key_blocks, split)
    ranks = launch_ranks(plan, layout, split, n_split_heads)
    work_of_rank = []
    for head, part in ranks:
        if part >= 0:  # a chunk: its key blocks, and its share of the partial results' store and merge
            chunk = part % split
            blocks = max(0, min(per_chunk, n_key_blocks - chunk * per_chunk))
            work_of_rank.append([blocks + MERGE_BLOCKS] * n_mblocks)
        else:
            work_of_rank.append(_head_work(plan.modes[head], plan.windows[head], layout, block_m, block_n))
    # _tile_of: the text query blocks of every rank first (rank, batch, block), then the other blocks
    n_text = len(text_blocks)
    order = ([(r, mb) for r in range(len(ranks)) for _ in range(batch) for mb in mblock_order[:n_text]]
             + [(r, mb) for r in range(len(ranks)) for _ in range(batch) for mb in mblock_order[n_text:]])
    return [work_of_rank[r][mb] for r, mb in order]


def resident_programs(registers: int, shared_bytes: int, num_warps: int, *, registers_per_sm: int = 65536,
                      shared_per_sm: int = 228 * 1024, warps_per_sm: int = 64, programs_per_sm: int = 32) -> int:
    """Programs of one compiled kernel resident on an SM at once (Hopper's limits by default): registers
    are allocated per warp in units of 256 (8 per thread), and each program reserves 1 KiB of shared
    memory for the system besides its own."""
    per_warp = triton_cdiv(registers * 32, 256) * 256
    by_registers = registers_per_sm // (per_warp * num_warps)
    by_shared = shared_per_sm // (shared_bytes + 1024)
    return max(0, min(by_registers, by_shared, warps_per_sm // num_warps, programs_per_sm))


def program_starts(work: Sequence[float], slots: int) -> list[float]:
    """When each of ``work`` (programs, in launch order) starts, each on the slot that frees up first."""
    free = [0.0] * max(1, min(slots, len(work)))
    starts = []
    for w in work:
        start = heapq.heappop(free)
        starts.append(start)
        heapq.heappush(free, start + w)
    return starts


def makespan(work: Sequence[float], slots: int) -> float:
    """When the last of ``work`` (programs, in launch order) ends, each program starting on the slot that
    frees up first (:func:`program_starts`). Programs run at the same speed whatever else their SM holds: an
    SM whose other slots have emptied speeds its last program up in reality, which the model leaves out (so
    it overstates a tail's cost a little)."""
    return max((s + w for s, w in zip(program_starts(work, slots), work)), default=0.0)


def makespan_shared(work: Sequence[float], sms: int, per_sm: int) -> float:
    """The other bound: an SM's programs share its throughput equally and the SM keeps all of it whatever
    it holds (a program alone on an SM runs ``per_sm`` times faster). Programs go out in launch order, each
    to the SM with the fewest resident programs (breadth first, as the hardware spreads a wave).
    :func:`makespan` is the opposite bound (a program's speed never changes); a real SM lies between, a
    program alone running faster but not ``per_sm`` times faster."""
    remaining = np.full((sms, per_sm), np.inf)
    following = iter(work)

    def dispatch() -> None:
        resident = np.isfinite(remaining).sum(1)
        while resident.min() < per_sm:
            w = next(following, None)
            if w is None:
                return
            sm = int(resident.argmin())
            remaining[sm, int(np.argmax(~np.isfinite(remaining[sm])))] = w
            resident[sm] += 1

    dispatch()
    elapsed = 0.0
    while np.isfinite(remaining).any():
        resident = np.isfinite(remaining).sum(1)
        rate = per_sm / np.maximum(resident, 1)  # per program of each SM
        step = (remaining.min(1) / rate).min()
        elapsed += step
        remaining -= step * rate[:, None]
        remaining[remaining <= 1e-9 * max(1.0, elapsed)] = np.inf
        dispatch()
    return elapsed


@dataclass(frozen=True)
class SplitChoice:
    """The wave model's verdict for one launch (times in key blocks)."""

    split: int  # key chunks per split full head (1: none)
    n_split_heads: int
    makespan: float  # the launch with this split
    unsplit_makespan: float
    mean: float  # the unsplit launch's work per slot: no schedule ends earlier

    @property
    def gain(self) -> float:
        """Modelled time without the split / with it."""
        return self.unsplit_makespan / self.makespan


def choose_full_split(plan: HeadPlan, layout: TokenLayout, batch: int, block_m: int, block_n: int, slots: int,
                      max_split: int = 8) -> SplitChoice:
    """The split of full heads (2..max_split chunks, for the last 1..all full heads) whose modelled launch
    ends first, or no split when none ends earlier than the launch as it is."""
    work = program_work(plan, layout, batch, block_m, block_n)
    base = makespan(work, slots)
    best = SplitChoice(1, 0, base, base, sum(work) / slots)
    n_full = plan.modes.count("full")
    for split in range(2, min(max_split, triton_cdiv(layout.seq_len, block_n)) + 1):
        for n_split in range(1, n_full + 1):
            t = makespan(program_work(plan, layout, batch, block_m, block_n, split, n_split), slots)
            if t < best.makespan - 1e-9:
                best = SplitChoice(split, n_split, t, base, best.mean)
    return best
