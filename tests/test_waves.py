"""The wave model of a launch (ditlens.kernels.waves) against hand-computed schedules and brute-force counts."""

import itertools

import pytest
import torch

from ditlens.kernels import TokenLayout, attention_mask, window_for_sparsity
from ditlens.kernels.patterns import head_attended_pairs, make_head_plan
from ditlens.kernels.triton_backend import launch_ranks
from ditlens.kernels.waves import (
    MERGE_BLOCKS,
    choose_full_split,
    makespan,
    makespan_shared,
    program_work,
    query_block_work,
    resident_programs,
)


def test_makespan_is_list_scheduling_in_launch_order():
    # two slots: 3 and 1 start at 0, 2 goes to the slot free at 1, then 2 to the one free at 3
    assert makespan([3, 1, 2, 2], 2) == 5
    # one long program last: it starts when the first slot frees up and ends the launch
    assert makespan([1] * 4 + [10], 4) == 11
    assert makespan([10] + [1] * 4, 4) == 10
    assert makespan([2.5], 8) == 2.5


def test_shared_sm_bound_on_hand_cases():
    # one SM with two slots: two programs share it (speed 1 each); one alone runs twice as fast
    assert makespan_shared([2, 2], 1, 2) == 2
    assert makespan_shared([2], 1, 2) == 1
    # breadth first: on two SMs the third program joins SM 0, whose two then run at speed 1 (8 / 2)
    assert makespan_shared([4, 4, 4], 2, 2) == 4
    # no schedule beats the work per slot or the longest program alone on an SM
    work = [5.0, 1.0, 3.0, 3.0, 2.0, 8.0, 1.0]
    assert makespan_shared(work, 2, 3) >= max(sum(work) / 6, 8 / 3)


def test_resident_programs_by_registers_and_shared_memory():
    # 158 registers round up to 160: 4 warps x 32 x 160 = 20,480 of 65,536 -> 3; 170 -> 176 -> 2
    assert resident_programs(158, 49 * 1024, 4) == 3
    assert resident_programs(170, 49 * 1024, 4) == 2
    assert resident_programs(168, 49 * 1024, 4) == 3
    # shared memory decides: 80 KiB + 1 KiB per program in 228 KiB -> 2
    assert resident_programs(64, 80 * 1024, 4) == 2
    assert resident_programs(255, 0, 8) == 1


@pytest.mark.parametrize("L,n_text,text_first", [(70, 0, False), (70, 12, True), (61, 9, False)])
@pytest.mark.parametrize("mode,w", [("window", 5), ("arrow", 3), ("window", 40), ("arrow", 0)])
def test_query_block_work_covers_every_attended_pair(L, n_text, text_first, mode, w):
    # the key blocks a query block's program visits hold every key of its rows' pattern, and at most two
    # blocks per segment more than the span of those keys (the walks start at the segments' first keys)
    block_m, block_n = 16, 8
    layout = TokenLayout(L, n_text, text_first)
    mask = attention_mask([mode], [w], L, n_text=n_text, text_first=text_first)[0]
    for m0 in range(0, L, block_m):
        rows = mask[m0:m0 + block_m]
        keys = rows.any(0).nonzero().flatten()
        work = query_block_work(mode, w, m0, layout, block_m, block_n)
        assert work * block_n >= rows.sum(1).max().item()
        assert work * block_n >= len(keys)
        assert work <= -(-len(keys) // block_n) + 2


def test_program_work_in_launch_order():
    L, block_m, block_n = 100, 16, 8
    modes, windows = ["window", "full", "skip", "full", "arrow"], [4, 0, 0, 0, 2]
    plan, layout = make_head_plan(modes, windows, 5, L), TokenLayout(L, 20, False)
    n_mblocks, n_key_blocks = 7, 13
    work = program_work(plan, layout, 2, block_m, block_n)
    assert len(work) == 5 * 2 * n_mblocks
    # full heads rank first: their programs (every key block) come first... except the text query blocks
    # (rows 80..99: blocks 5 and 6) of every rank, which _tile_of runs ahead of all the others
    n_text_programs = 5 * 2 * 2
    assert work[:4] == [n_key_blocks] * 4  # head 1, batch 0 and 1, text blocks 5 and 6
    assert work[n_text_programs:n_text_programs + 2 * 2 * 5] == [n_key_blocks] * 20  # both full heads' other blocks
    # split the last full head in 3: its one rank becomes three, each chunk a third of the keys plus the merge
    split = program_work(plan, layout, 2, block_m, block_n, 3, 1)
    assert len(split) == 7 * 2 * n_mblocks
    chunk_work = sorted({x for x in split if x % 1 == MERGE_BLOCKS})
    assert chunk_work == [n_key_blocks - 2 * 5 + MERGE_BLOCKS, 5 + MERGE_BLOCKS]
    assert sum(split) == pytest.approx(sum(work) + 3 * 2 * n_mblocks * MERGE_BLOCKS)
    # ranks as launch_ranks orders them: the unsplit full head, then the heaviest of the rest
    assert [h for h, _ in launch_ranks(plan, layout, 3, 1)][:1] == [1]


def test_pixart_1k_mixed_plan_schedule():
    # session 17's mixed plan at PixArt 1024² (16 heads in turn full / window at 75 % / skip, 128x64 tiles,
    # two programs per SM on 132 SMs): 384 full programs of 64 key blocks on 264 slots, so 120 slots run
    # two and the launch ends at 128 blocks, ~1.1 of the work per slot
    L, H = 4096, 16
    modes = [("full", "window", "skip")[h % 3] for h in range(H)]
    w = window_for_sparsity(L, 0.75)
    plan = make_head_plan(modes, [w if m == "window" else 0 for m in modes], H, L)
    layout = TokenLayout(L)
    choice = choose_full_split(plan, layout, 2, 128, 64, 264)
    assert choice.unsplit_makespan == 128
    assert 1.05 < choice.unsplit_makespan / choice.mean < 1.15
    assert choice.makespan <= choice.unsplit_makespan


def test_flux_1k_dense_tail_split():
    # dense FLUX 1024² (24 heads x 72 query blocks of 64 rows, 36 key blocks of 128) at three programs per
    # SM (396 slots): 4 full waves and a fifth of 144 programs (two heads) that keeps 36 % of the slots
    # busy. Splitting those two heads in 2 gives 288 chunks of 18 blocks that all start at once:
    # 4 x 36 + 18 + merge instead of 5 x 36
    L, H = 4608, 24
    plan, layout = make_head_plan(["full"] * H, [0] * H, H, L), TokenLayout(L, 512, True)
    assert makespan(program_work(plan, layout, 1, 64, 128, 2, 2), 396) == 4 * 36 + 18 + MERGE_BLOCKS
    choice = choose_full_split(plan, layout, 1, 64, 128, 396)
    assert choice.unsplit_makespan == 5 * 36
    assert choice.n_split_heads == 2 and choice.makespan <= 4 * 36 + 18 + MERGE_BLOCKS
    # the other bound: the fifth wave's 144 programs go one per SM, then 12 SMs take a second; alone a
    # program runs 3x faster (12 blocks' time), two share the SM (24)
    assert makespan_shared(program_work(plan, layout, 1, 64, 128), 132, 3) == pytest.approx(4 * 36 + 24)
    # FLUX 2048²: 24 x 264 = 6,336 programs, exactly 16 waves: nothing to gain
    L = 16896
    plan, layout = make_head_plan(["full"] * H, [0] * H, H, L), TokenLayout(L, 512, True)
    assert choose_full_split(plan, layout, 1, 64, 128, 396).split == 1


def test_choice_is_no_worse_than_every_candidate_it_tried():
    L, H = 300, 6
    modes = ["full", "arrow", "full", "window", "skip", "full"]
    plan, layout = make_head_plan(modes, [0, 20, 0, 9, 0, 0], H, L), TokenLayout(L, 30, True)
    for slots in (4, 9, 30):
        choice = choose_full_split(plan, layout, 2, 32, 32, slots, max_split=3)
        every = [makespan(program_work(plan, layout, 2, 32, 32, s, n), slots)
                 for s, n in itertools.product((2, 3), (1, 2, 3))]
        assert choice.makespan == min([choice.unsplit_makespan] + every)
        if choice.split > 1:
            assert makespan(program_work(plan, layout, 2, 32, 32, choice.split, choice.n_split_heads),
                            slots) == choice.makespan


def test_full_head_work_matches_pair_count():
    # a full head's programs visit every key block: work x block area = L^2 when both tiles divide L
    L = 64
    plan, layout = make_head_plan(["full"], [0], 1, L), TokenLayout(L)
    work = program_work(plan, layout, 1, 16, 8)
    assert sum(work) * 16 * 8 == head_attended_pairs("full", 0, layout) == L * L
    assert torch.tensor(work).eq(8).all()
