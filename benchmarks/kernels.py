"""Head-wise attention kernels vs SDPA and FlexAttention at DiT shapes (one run, one device).

Times (median of ``triton.testing.do_bench``, bf16, forward; each plan's SDPA, Flex, ditlens and Gluon
times in ``--rounds`` interleaved rounds, each arm's median over them reported):
  * SDPA (default backend, and each explicit backend that accepts the shape),
  * FlexAttention (``torch.compile``d) with block masks built from ditlens' own pattern
    functions (the same masks the Triton kernel runs),
  * xformers' memory-efficient attention where it imports,
  * ditlens' Triton kernel,
at 0/25/50/75/90 % sparsity (window for image-only models, arrow for joint attention; ``w``
chosen so that the attended query-key pairs, text rows and columns included, are ``1 - s`` of
all L^2 pairs, so the ideal speedup is 1 / (1 - s): 1.33 / 2 / 4 / 10x) and a mixed plan
(1/3 full, 1/3 arrow/window at 75 %, 1/3 skip). Before timing, a short sweep picks the tile
config per head dim. Writes ``kernels.md`` (table + command + device), ``kernels.json`` and
``kernels.png`` into ``--out``.

Usage (repo root): ``python benchmarks/kernels.py --out DIR [--quick] [--jobs N]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
import multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from ditlens.kernels import (  # noqa: E402
    KernelConfig,
    TokenLayout,
    attended_pairs,
    band_pairs,
)
from ditlens.kernels.patterns import headwise_mask_mod_from_tensors, make_head_plan, MODE_CODE  # noqa: E402
from ditlens.kernels.gluon_backend import check_gluon_inputs, headwise_gluon  # noqa: E402
from ditlens.kernels.triton_backend import headwise_triton, warsr_triton, warsr_two_pass_triton  # noqa: E402
from small_shapes import arrow_window, mixed_modes  # noqa: E402  (benchmarks/ is on sys.path: this script's folder)


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    heads: int
    n_image: int
    n_text: int
    text_first: bool
    head_dim: int

    @property
    def seq_len(self) -> int:
        return self.n_image + self.n_text

    @property
    def sparse_mode(self) -> str:
        return "arrow" if self.n_text else "window"

    def layout(self) -> TokenLayout:
        return TokenLayout(self.seq_len, self.n_text, self.text_first)


SHAPES = [  # the 2K shapes first: they carry the must-show targets
    Shape("PixArt-2K", 2, 16, 16384, 0, False, 72),
    Shape("FLUX-2K", 1, 24, 16384, 512, True, 128),
    Shape("PixArt-1K", 2, 16, 4096, 0, False, 72),
    Shape("FLUX-1K", 1, 24, 4096, 512, True, 128),
    Shape("SD3-1K", 2, 24, 4096, 333, False, 64),
    Shape("DiT-512", 2, 16, 1024, 0, False, 72),
]
SPARSITIES = [0.0, 0.25, 0.5, 0.75, 0.9]
_TILES = [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (64, 64, 4, 3),
          (128, 32, 4, 4)]
# every tile with pointer loads and with K/V through tensor descriptors (TMA)
TUNE_CONFIGS = [KernelConfig(*t, tma=tma) for tma in (False, True) for t in _TILES]
TUNE_SHAPE_FOR_DIM = {72: "PixArt-2K", 64: "SD3-1K", 128: "FLUX-2K"}
WARSR_SHAPES = ["PixArt-1K", "FLUX-1K"]


def config_label(c: KernelConfig) -> str:
    return (f"{c.block_m}x{c.block_n}/{c.num_warps}w/{c.num_stages}s" + ("/tma" if c.tma else "")
            + (f"/r{c.max_registers}" if c.max_registers else "") + ("/1l" if c.one_loop else ""))


@dataclass
class Plan:
    label: str
    modes: list[str]
    windows: list[int]
    sparsity: float | None = None  # share of all query-key pairs skipped, for uniform plans


def window_for_pair_sparsity(shape: Shape, sparsity: float) -> int | None:
    """Half-width w of the shape's sparse mode whose attended pairs (the band plus, for arrow, every
    pair with a text query or key) are (1 - sparsity) of all L^2 pairs; None when the text pairs
    alone are more than that (small_shapes.arrow_window; a window head without text is the same band)."""
    return arrow_window(shape.seq_len, shape.n_text, sparsity)


def make_plans(shape: Shape) -> list[Plan]:
    H = shape.heads
    plans = []
    for s in SPARSITIES:
        if s == 0.0:
            plans.append(Plan("dense 0%", ["full"] * H, [0] * H, 0.0))
        elif (w := window_for_pair_sparsity(shape, s)) is not None:  # else no such plan: text pairs exceed 1 - s
            plans.append(Plan(f"{shape.sparse_mode} {int(s * 100)}%", [shape.sparse_mode] * H, [w] * H, s))
    w75 = window_for_pair_sparsity(shape, 0.75)
    modes = list(mixed_modes(H, shape.sparse_mode))
    plans.append(Plan("mixed 1/3 full, 1/3 75%, 1/3 skip", modes, [w75 if m != "full" else 0 for m in modes]))
    return plans


def make_inputs(shape: Shape, device: str = "cuda", seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device=device).manual_seed(seed)
    size = (shape.batch, shape.heads, shape.seq_len, shape.head_dim)
    return tuple(torch.randn(size, generator=g, device=device, dtype=torch.bfloat16) for _ in range(4))


class FlexRunner:
    """Compiled FlexAttention for one shape; one mask_mod whose per-head tensors are updated in place."""

    def __init__(self, shape: Shape, device: str = "cuda") -> None:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        self.shape = shape
        self.create_block_mask = create_block_mask
        self.flex = torch.compile(flex_attention, dynamic=False)
        H = shape.heads
        self.codes = torch.zeros(H, dtype=torch.int32, device=device)
        self.wins = torch.zeros(H, dtype=torch.int32, device=device)
        lay = shape.layout()
        self.bounds = torch.tensor([lay.image_start, lay.image_end], dtype=torch.int32, device=device)
        self.mask_mod = headwise_mask_mod_from_tensors(self.codes, self.wins, self.bounds)
        self.device = device

    def set_plan(self, plan: Plan):
        self.codes.copy_(torch.tensor([MODE_CODE[m] for m in plan.modes], dtype=torch.int32))
        self.wins.copy_(torch.tensor(plan.windows, dtype=torch.int32))
        L = self.shape.seq_len
        return self.create_block_mask(self.mask_mod, B=None, H=self.shape.heads, Q_LEN=L, KV_LEN=L,
                                      device=self.device, BLOCK_SIZE=128, _compile=True)

    def run(self, q, k, v, block_mask, skip_idx, cached):
        out = self.flex(q, k, v, block_mask=block_mask)
        if skip_idx:
            out[:, skip_idx] = cached[:, skip_idx]
        return out


# ------------------------------------------------------------------------------------------
# parallel warm-up (compiles land in the on-disk Triton / Inductor caches)
# ------------------------------------------------------------------------------------------

def _warm_task(task: tuple) -> str:
    kind, shape_name, cfg = task
    shape = next(s for s in SHAPES if s.name == shape_name)
    t0 = time.time()
    q, k, v, cached = make_inputs(shape)
    lay = shape.layout()
    plans = make_plans(shape)
    if kind == "flex":
        runner = FlexRunner(shape)
        for plan in (plans[0], plans[3], plans[-1]):
            bm = runner.set_plan(plan)
            runner.run(q, k, v, bm, [h for h, m in enumerate(plan.modes) if m == "skip"], cached)
    else:
        plan = plans[3]
        hp = make_head_plan(plan.modes, plan.windows, shape.heads, shape.seq_len)
        scale = shape.head_dim ** -0.5
        if kind == "headwise":
            headwise_triton(q, k, v, hp, lay, scale, cached=cached, config=cfg)
        elif kind == "warsr":
            warsr_triton(q, k, v, hp, lay, scale, config=cfg)
        elif kind == "apply":
            headwise_triton(q, k, v, hp, lay, scale, residual=cached, config=cfg)
            headwise_triton(q, k, v, hp, lay, scale, residual=cached, config=cfg, subtract=True)
    torch.cuda.synchronize()
    return f"{kind} {shape_name} {cfg} {time.time() - t0:.1f}s"


def warm_up(jobs: int, tune: bool, shapes: list[str]) -> None:
    """Compile what the run will time, in parallel: Flex for ``shapes``, the tile sweep (or, without
    tuning, the default tile of each head dim among ``shapes``) and the WA-RS kernels."""
    from ditlens.kernels.triton_backend import default_config

    tasks: list[tuple] = [("flex", name, None) for name in shapes]
    for dim, shape_name in TUNE_SHAPE_FOR_DIM.items():
        if not tune and shape_name not in shapes:
            continue
        for cfg in TUNE_CONFIGS if tune else [default_config(dim, False)]:
            tasks.append(("headwise", shape_name, cfg))
    for shape_name in WARSR_SHAPES:  # the WA-RS measurements (same compiles serve other lengths)
        if shape_name not in shapes:
            continue
        head_dim = next(s for s in SHAPES if s.name == shape_name).head_dim
        for cfg in TUNE_CONFIGS if tune else [default_config(head_dim, False)]:
            tasks += [("warsr", shape_name, cfg), ("apply", shape_name, cfg)]
    run_pool(tasks, jobs)


def wait_for(path: str) -> None:
    """E.g. GPU tests running beside the compile phase: keep them out of the timings (240 s at most)."""
    if not path:
        return
    deadline = time.time() + 240
    while not os.path.exists(path) and time.time() < deadline:
        time.sleep(0.5)


def run_pool(tasks: list[tuple], jobs: int) -> None:
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        futures = [pool.submit(_warm_task, t) for t in tasks]
        for fut in tqdm(as_completed(futures), total=len(futures), desc="compile (parallel)"):
            try:
                print("  warm:", fut.result(), flush=True)
            except Exception as exc:  # a failing config is reported by the timing phase too
                print("  warm failed:", repr(exc)[:300], flush=True)


# ------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------

def bench(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def sdpa_backends_times(q, k, v) -> dict[str, float]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out: dict[str, float] = {"default": bench(lambda: F.scaled_dot_product_attention(q, k, v))}
    for name, be in [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                     ("efficient", SDPBackend.EFFICIENT_ATTENTION)]:
        try:
            with sdpa_kernel([be]):
                out[name] = bench(lambda: F.scaled_dot_product_attention(q, k, v))
        except Exception as exc:  # backend refuses this shape
            out[name] = float("nan")
            print(f"  sdpa {name}: {type(exc).__name__}", flush=True)
    return out


def xformers_time(q, k, v) -> float | None:
    try:
        import xformers.ops as xops  # type: ignore
    except Exception:
        return None
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    try:
        return bench(lambda: xops.memory_efficient_attention(qt, kt, vt))
    except Exception as exc:  # e.g. a wheel whose CUDA ops were built for another torch
        print(f"  xformers: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)
        return float("nan")


def tune(shapes_by_name: dict[str, Shape]) -> tuple[dict[int, KernelConfig], list[dict]]:
    chosen: dict[int, KernelConfig] = {}
    rows = []
    for dim, shape_name in TUNE_SHAPE_FOR_DIM.items():
        shape = shapes_by_name[shape_name]
        q, k, v, cached = make_inputs(shape)
        lay = shape.layout()
        plans = make_plans(shape)
        best = None
        for cfg in TUNE_CONFIGS:
            times = []
            try:
                for plan in (plans[0], plans[3]):
                    hp = make_head_plan(plan.modes, plan.windows, shape.heads, shape.seq_len)
                    times.append(bench(lambda: headwise_triton(q, k, v, hp, lay, shape.head_dim ** -0.5,
                                                               cached=cached, config=cfg)))
            except Exception as exc:
                print(f"  tune {shape_name} {cfg}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                continue
            rows.append({"head_dim": dim, "shape": shape_name, "config": asdict(cfg),
                         "dense_ms": times[0], "sparse75_ms": times[1]})
            print(f"  tune D={dim} {cfg}: dense {times[0]:.3f} ms, 75% {times[1]:.3f} ms", flush=True)
            score = times[0] + times[1]
            if best is None or score < best[0]:
                best = (score, cfg)
        if best is not None:
            chosen[dim] = best[1]
    return chosen, rows


@dataclass
class Row:
    shape: str
    plan: str
    density: float            # attended pairs / L^2 (all heads)
    ideal_speedup: float      # 1 / density
    sdpa_ms: float
    flex_ms: float
    ditlens_ms: float
    err_vs_flex: float
    extra: dict = field(default_factory=dict)


def interleaved_rounds(arms: dict, rounds: int) -> dict[str, list[float]]:
    """``rounds`` do_bench medians of every arm, the arms' order rotated from round to round: a drift of the
    card's clock over the minutes a shape takes lands on every arm alike, not on the one timed last."""
    names = list(arms)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            times[n].append(bench(arms[n]))
    return times


def run_shape(shape: Shape, cfg: KernelConfig | None, with_flex: bool = True,
              rounds: int = 3) -> tuple[list[Row], dict]:
    """Every plan of ``shape`` by SDPA, FlexAttention and ditlens (``cfg``, or None: each launch's own
    default, what a user gets: the all-full config for the dense plan, the windowed one otherwise), and the
    Gluon launch where it takes the plan; each plan's arms (SDPA included) in ``rounds`` interleaved rounds,
    their medians reported."""
    q, k, v, cached = make_inputs(shape)
    lay = shape.layout()
    scale = shape.head_dim ** -0.5
    L = shape.seq_len
    info: dict = {"sdpa": sdpa_backends_times(q, k, v)}
    info["xformers_ms"] = xformers_time(q, k, v)
    runner = FlexRunner(shape) if with_flex else None
    rows = []
    dense_pairs = shape.heads * L * L
    for plan in make_plans(shape):
        hp = make_head_plan(plan.modes, plan.windows, shape.heads, L)
        skip_idx = [h for h, m in enumerate(plan.modes) if m == "skip"]
        pairs = sum(attended_pairs(plan.modes, plan.windows, L, n_text=shape.n_text, text_first=shape.text_first))
        density = pairs / dense_pairs
        ours = headwise_triton(q, k, v, hp, lay, scale, cached=cached, config=cfg)
        arms = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
                "ditlens": lambda: headwise_triton(q, k, v, hp, lay, scale, cached=cached, config=cfg)}
        err = float("nan")
        if runner is not None:
            block_mask = runner.set_plan(plan)
            err = rel_err(ours, runner.run(q, k, v, block_mask, skip_idx, cached))
            arms["flex"] = lambda: runner.run(q, k, v, block_mask, skip_idx, cached)
        extra: dict = {}
        if check_gluon_inputs(q, hp, lay) is None:  # the Gluon launch (Hopper, D = 128, L % 128 == 0)
            try:  # a failing launch is a result of this run, not the end of it
                extra["gluon_err"] = rel_err(headwise_gluon(q, k, v, hp, lay, scale, cached=cached), ours)
                arms["gluon"] = lambda: headwise_gluon(q, k, v, hp, lay, scale, cached=cached)
            except Exception as exc:  # noqa: BLE001
                extra["gluon_error"] = f"{type(exc).__name__}: {exc}"[:200]
                print(f"  gluon launch failed: {extra['gluon_error']}", flush=True)
        times = interleaved_rounds(arms, rounds)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        extra["rounds_ms"] = times
        if "gluon" in med:
            extra["gluon_ms"] = med["gluon"]
        row = Row(shape.name, plan.label, density, 1.0 / density, med["sdpa"], med.get("flex", float("nan")),
                  med["ditlens"], err, extra)
        if plan.sparsity:
            row.extra["window"] = plan.windows[0]
            row.extra["image_density"] = band_pairs(shape.n_image, plan.windows[0]) / shape.n_image ** 2
        rows.append(row)
        print(f"  {shape.name:10s} {plan.label:34s} density {density:.3f}  sdpa {row.sdpa_ms:.3f}  flex {row.flex_ms:.3f}"
              f"  ditlens {row.ditlens_ms:.3f} ms  x{row.sdpa_ms / row.ditlens_ms:.2f} (ideal x{1 / density:.2f})"
              f"  err {err:.1e}",
              flush=True)
    # mixed plan: ideal = dense ditlens time scaled by the attended-pair fraction; and the
    # time of its parts (1/3 of the dense run + 1/3 of the 75 % run)
    dense_ours = rows[0].ditlens_ms
    mixed = rows[-1]
    mixed.extra["ideal_ms_pairs"] = dense_ours * mixed.density
    mixed.extra["ideal_ms_parts"] = dense_ours / 3 + rows[3].ditlens_ms / 3
    if "gluon_ms" in mixed.extra and "gluon_ms" in rows[0].extra and "gluon_ms" in rows[3].extra:
        mixed.extra["gluon_ideal_ms_pairs"] = rows[0].extra["gluon_ms"] * mixed.density
        mixed.extra["gluon_ideal_ms_parts"] = (rows[0].extra["gluon_ms"] + rows[3].extra["gluon_ms"]) / 3
    return rows, info


def run_warsr(shape: Shape, cfg: KernelConfig) -> dict:
    """WA-RS refresh (one pass) vs full + windowed separately; apply (W + R fused) vs windowed alone."""
    q, k, v, cached = make_inputs(shape)
    lay = shape.layout()
    scale = shape.head_dim ** -0.5
    H, L = shape.heads, shape.seq_len
    w = window_for_pair_sparsity(shape, 0.5)
    wplan = make_head_plan(shape.sparse_mode, w, H, L)
    fplan = make_head_plan("full", 0, H, L)
    full_out = headwise_triton(q, k, v, fplan, lay, scale, config=cfg)
    win_out = headwise_triton(q, k, v, wplan, lay, scale, config=cfg)
    o, r = warsr_triton(q, k, v, wplan, lay, scale, config=cfg)
    applied = headwise_triton(q, k, v, wplan, lay, scale, residual=r, config=cfg)
    res = {
        "shape": shape.name, "window": w,
        "refresh_ms": bench(lambda: warsr_triton(q, k, v, wplan, lay, scale, config=cfg)),
        "refresh_two_pass_ms": bench(lambda: warsr_two_pass_triton(q, k, v, wplan, lay, scale, config=cfg)),
        "full_plus_window_ms": bench(lambda: headwise_triton(q, k, v, fplan, lay, scale, config=cfg))
        + bench(lambda: headwise_triton(q, k, v, wplan, lay, scale, config=cfg)),
        "apply_ms": bench(lambda: headwise_triton(q, k, v, wplan, lay, scale, residual=r, config=cfg)),
        "window_only_ms": bench(lambda: headwise_triton(q, k, v, wplan, lay, scale, config=cfg)),
        "err_full": rel_err(o, full_out),
        "err_residual": ((r.float() - (full_out.float() - win_out.float())).norm() / full_out.float().norm()).item(),
        "err_apply": rel_err(applied, full_out),
    }
    print("  WA-RS", json.dumps(res), flush=True)
    return res


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------

def write_report(out_dir: str, header: dict, chosen: dict[int, KernelConfig], tune_rows: list[dict],
                 rows: list[Row], infos: dict, warsr: list[dict]) -> None:
    lines = [
        "## Kernels: head-wise attention (ditlens Triton vs SDPA vs FlexAttention)",
        "",
        f"Command: `{header['command']}`  ",
        f"Device: {header['device']}; torch {header['torch']}, triton {header['triton']}, "
        f"CUDA {header['cuda']}; tensor descriptors {'available' if header.get('tensor_descriptors') else 'absent'}; "
        f"{header['date']}.  ",
        f"bf16 forward, median of `triton.testing.do_bench` (warmup 25 ms, rep 100 ms); each plan's SDPA, Flex, "
        f"ditlens and Gluon times in {header.get('rounds', 1)} interleaved rounds (the arms' order rotated), the "
        "median of each arm's rounds shown (SDPA re-timed for every plan). "
        "Sparsity s: window (image-only) or arrow (joint) with w chosen so the attended pairs (text "
        "rows/columns included) are (1 - s) of all L^2 pairs; *density* = attended pairs / L^2 "
        "(all heads), *ideal x* = 1 / density. A sparsity that arrow cannot reach (its text "
        "pairs alone above 1 - s of all pairs, FLUX-1K at 90 %) has no row. FlexAttention is `torch.compile`d and uses "
        "block masks (128 x 128) built from the same pattern functions; the skip heads of the mixed "
        "plan are copied from a cache in both. *err* = ||ditlens - flex|| / ||flex||.",
        "",
        "| shape | plan | density | SDPA ms | Flex ms | ditlens ms | x SDPA | ideal x | x Flex | err |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r.shape} | {r.plan} | {r.density:.3f} | {r.sdpa_ms:.3f} | {r.flex_ms:.3f} | {r.ditlens_ms:.3f} | "
            f"{r.sdpa_ms / r.ditlens_ms:.2f} | {r.ideal_speedup:.2f} | {r.flex_ms / r.ditlens_ms:.2f} | "
            f"{r.err_vs_flex:.1e} |"
        )
    gluon = [r for r in rows if "gluon_ms" in r.extra]
    if gluon:
        lines += ["", "The Gluon launch (`backend=\"gluon\"`: FlashAttention-3's two-warpgroup schedule; Hopper, "
                  "head dim 128, lengths in multiples of 128; its default tile order, full-first, as `auto` runs it), same inputs; "
                  "*err* = ||gluon - ditlens Triton|| / ||ditlens Triton||:",
                  "", "| shape | plan | SDPA ms | Gluon ms | x SDPA | ideal x | Triton ms | x Triton | err |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in gluon:
            g = r.extra["gluon_ms"]
            lines.append(f"| {r.shape} | {r.plan} | {r.sdpa_ms:.3f} | {g:.3f} | {r.sdpa_ms / g:.2f} | "
                         f"{r.ideal_speedup:.2f} | {r.ditlens_ms:.3f} | {r.ditlens_ms / g:.2f} | "
                         f"{r.extra['gluon_err']:.1e} |")
    lines += ["", "Mixed plan vs its ideal time (dense ditlens time x attended-pair fraction; and the sum of "
              "its parts, 1/3 dense + 1/3 of the 75 % run):", "",
              "| shape | mixed ms | ideal (pairs) ms | ratio | ideal (parts) ms | ratio |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "ideal_ms_pairs" in r.extra:
            ip, ipart = r.extra["ideal_ms_pairs"], r.extra["ideal_ms_parts"]
            lines.append(f"| {r.shape} | {r.ditlens_ms:.3f} | {ip:.3f} | {r.ditlens_ms / ip:.2f} | "
                         f"{ipart:.3f} | {r.ditlens_ms / ipart:.2f} |")
        if "gluon_ideal_ms_pairs" in r.extra:  # the same against the Gluon launch's own dense and 75 % times
            g, ip, ipart = r.extra["gluon_ms"], r.extra["gluon_ideal_ms_pairs"], r.extra["gluon_ideal_ms_parts"]
            lines.append(f"| {r.shape} (Gluon) | {g:.3f} | {ip:.3f} | {g / ip:.2f} | {ipart:.3f} | {g / ipart:.2f} |")
    lines += ["", "SDPA backends (dense, ms; nan = refused the shape) and xformers:", "",
              "| shape | default | flash | cudnn | efficient | xformers |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, info in infos.items():
        s = info["sdpa"]
        xf = info.get("xformers_ms")
        lines.append(f"| {name} | {s['default']:.3f} | {s['flash']:.3f} | {s['cudnn']:.3f} | {s['efficient']:.3f} | "
                     f"{'not importable' if xf is None else f'{xf:.3f}'} |")
    if warsr:
        lines += ["", "WA-RS at 50 % sparsity: refresh in one pass (O and R = O - W) and in two launches "
                  "(R written by the windowed kernel's epilogue) vs full + windowed run separately; apply "
                  "(W + R fused in the epilogue) vs windowed alone:", "",
                  "| shape | one-pass refresh ms | two-pass refresh ms | full + window ms | apply ms | window ms | "
                  "err O | err R | err W+R |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for w in warsr:
            lines.append(f"| {w['shape']} | {w['refresh_ms']:.3f} | {w.get('refresh_two_pass_ms', float('nan')):.3f} | "
                         f"{w['full_plus_window_ms']:.3f} | {w['apply_ms']:.3f} | {w['window_only_ms']:.3f} | "
                         f"{w['err_full']:.1e} | {w['err_residual']:.1e} | {w['err_apply']:.1e} |")
    how = ("chosen per head dim by dense + 75 % time" if tune_rows else
           "the built-in defaults of the windowed launches (dense plans: the all-full launch's own default)")
    lines += ["", "Tile configs (BLOCK_M x BLOCK_N / warps / stages, /tma = K/V through tensor descriptors, /rN = "
              f"at most N registers, /1l = one loop per key segment) {how}: "
              + ", ".join(f"D={d}: {config_label(c)}" for d, c in chosen.items()), ""]
    if tune_rows:
        lines += ["| D | tuned on | config | dense ms | 75 % ms |", "| --- | --- | --- | ---: | ---: |"]
        for t in tune_rows:
            lines.append(f"| {t['head_dim']} | {t['shape']} | {config_label(KernelConfig(**t['config']))} | "
                         f"{t['dense_ms']:.3f} | {t['sparse75_ms']:.3f} |")
    with open(os.path.join(out_dir, "kernels.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    with open(os.path.join(out_dir, "kernels.json"), "w") as fh:
        json.dump({"header": header, "chosen": {d: asdict(c) for d, c in chosen.items()}, "tune": tune_rows,
                   "rows": [asdict(r) for r in rows], "infos": infos, "warsr": warsr}, fh, indent=1)
    plot(out_dir, rows)


def plot(out_dir: str, rows: list[Row]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return
    names = list(dict.fromkeys(r.shape for r in rows))
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5), sharey=False)
    for ax, name in zip(axes.flat, names):
        rs = [r for r in rows if r.shape == name and not r.plan.startswith("mixed")]
        xs = [100 * (1 - r.density) for r in rs]
        ax.plot(xs, [r.sdpa_ms / r.ditlens_ms for r in rs], "o-", label="ditlens (Triton)")
        ax.plot(xs, [r.sdpa_ms / r.flex_ms for r in rs], "s--", label="FlexAttention")
        ax.plot(xs, [r.ideal_speedup for r in rs], "k:", label="ideal (1 / density)")
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_title(name)
        ax.set_xlabel("sparsity (% of all query-key pairs)")
        ax.set_ylabel("speedup over SDPA")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(names):]:  # a run of fewer than six shapes: no empty frames
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "kernels.png"), dpi=110)


CHECK_CONFIGS = [KernelConfig(128, 64, 4, 3), KernelConfig(64, 64, 4, 3), KernelConfig(128, 128, 8, 3)]
CHECK_SHAPES = ["DiT-512", "PixArt-1K", "FLUX-1K"]


def _check_warm_tasks() -> list[tuple]:
    from ditlens.kernels.triton_backend import default_config

    tasks = [("headwise", name, cfg) for name in CHECK_SHAPES for cfg in CHECK_CONFIGS]
    tasks += [("headwise", name, default_config(next(s for s in SHAPES if s.name == name).head_dim, False))
              for name in ("PixArt-2K", "FLUX-2K", "SD3-1K")]
    return tasks


def run_check(out_dir: str, header: dict) -> None:
    """Second-run checks with the final code: ditlens + SDPA at the 2K shapes (no Flex), tile
    configs at short sequences, and strided ([B, L, H, D] views) vs contiguous inputs with a
    dense-mask SDPA cross-check of the values."""
    from ditlens.kernels.triton_backend import default_config
    from ditlens.kernels.patterns import attention_mask

    shapes_by_name = {s.name: s for s in SHAPES}
    lines = ["## Kernels: second run (final code) checks", "", f"Command: `{header['command']}`  ",
             f"Device: {header['device']}; torch {header['torch']}, triton {header['triton']}; {header['date']}.", "",
             "### ditlens vs SDPA, default tile configs", "",
             "| shape | plan | density | SDPA ms | ditlens ms | x SDPA | ideal x |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for name in ("PixArt-2K", "FLUX-2K", "SD3-1K"):
        shape = shapes_by_name[name]
        rows, _ = run_shape(shape, default_config(shape.head_dim, False), with_flex=False)
        for r in rows:
            lines.append(f"| {r.shape} | {r.plan} | {r.density:.3f} | {r.sdpa_ms:.3f} | {r.ditlens_ms:.3f} | "
                         f"{r.sdpa_ms / r.ditlens_ms:.2f} | {r.ideal_speedup:.2f} |")
        with open(os.path.join(out_dir, "kernels_check.md"), "w") as fh:
            fh.write("\n".join(lines) + "\n")
    lines += ["", "### tile configs at short sequences (ms)", "", "| shape | plan | " +
              " | ".join(f"{c.block_m}x{c.block_n}/{c.num_warps}w/{c.num_stages}s" for c in CHECK_CONFIGS) + " |",
              "| --- | --- |" + " ---: |" * len(CHECK_CONFIGS)]
    for name in CHECK_SHAPES:
        shape = shapes_by_name[name]
        q, k, v, cached = make_inputs(shape)
        lay = shape.layout()
        for plan in [p for p in make_plans(shape) if p.sparsity in (0.0, 0.5, 0.75)]:
            hp = make_head_plan(plan.modes, plan.windows, shape.heads, shape.seq_len)
            ts = []
            for cfg in CHECK_CONFIGS:
                ts.append(bench(lambda: headwise_triton(q, k, v, hp, lay, shape.head_dim ** -0.5, config=cfg)))
            lines.append(f"| {name} | {plan.label} | " + " | ".join(f"{t:.4f}" for t in ts) + " |")
            print("  check", name, plan.label, ts, flush=True)
    lines += ["", "### strided [B, L, H, D] views vs contiguous inputs (default config)", "",
              "| shape | plan | contiguous ms | strided ms | err strided vs dense-mask SDPA |", "| --- | --- | ---: | ---: | ---: |"]
    for name in ("DiT-512", "PixArt-1K"):
        shape = shapes_by_name[name]
        q, k, v, _ = make_inputs(shape)
        qs, ks, vs = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
        lay = shape.layout()
        cfg = default_config(shape.head_dim, False)
        for plan in [p for p in make_plans(shape) if p.sparsity in (0.0, 0.75)]:
            hp = make_head_plan(plan.modes, plan.windows, shape.heads, shape.seq_len)
            scale = shape.head_dim ** -0.5
            t_c = bench(lambda: headwise_triton(q, k, v, hp, lay, scale, config=cfg))
            t_s = bench(lambda: headwise_triton(qs, ks, vs, hp, lay, scale, config=cfg))
            mask = attention_mask(plan.modes, plan.windows, shape.seq_len, device="cuda")
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask[None])
            err = rel_err(headwise_triton(qs, ks, vs, hp, lay, scale, config=cfg), ref)
            lines.append(f"| {name} | {plan.label} | {t_c:.4f} | {t_s:.4f} | {err:.1e} |")
            print("  strided", name, plan.label, t_c, t_s, err, flush=True)
    with open(os.path.join(out_dir, "kernels_check.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def run_baselines(out: str, header: dict, shapes: list[Shape]) -> None:
    """Dense attention by every SDPA backend, xformers and ditlens' all-full launch (default config)."""
    lines = [f"`{header['command']}`", "", f"{header['device']}, torch {header['torch']}, triton {header['triton']}; "
             "bf16, dense, median of do_bench (ms); nan = refused the shape.", "",
             "| shape | SDPA default | flash | cudnn | efficient | xformers | ditlens all-full | ditlens / SDPA |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    results = {}
    for shape in tqdm(shapes, desc="shapes"):
        q, k, v, _ = make_inputs(shape)
        sdpa = sdpa_backends_times(q, k, v)
        xf = xformers_time(q, k, v)
        hp = make_head_plan(["full"] * shape.heads, [0] * shape.heads, shape.heads, shape.seq_len)
        ours = bench(lambda: headwise_triton(q, k, v, hp, shape.layout(), shape.head_dim ** -0.5))
        results[shape.name] = {"sdpa": sdpa, "xformers_ms": xf, "ditlens_ms": ours}
        xf_cell = "not importable" if xf is None else f"{xf:.3f}"
        lines.append(f"| {shape.name} | {sdpa['default']:.3f} | {sdpa['flash']:.3f} | {sdpa['cudnn']:.3f} | "
                     f"{sdpa['efficient']:.3f} | {xf_cell} | {ours:.3f} | {sdpa['default'] / ours:.2f}x |")
    with open(os.path.join(out, "baselines.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "baselines.json"), "w") as f:
        json.dump({"header": header, "results": results}, f, indent=1)
    print("\n".join(lines), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/bench_kernels", help="output folder")
    ap.add_argument("--jobs", type=int, default=12, help="parallel compile workers (0 = no warm-up pool)")
    ap.add_argument("--no-tune", action="store_true", help="skip the tile sweep, use the built-in defaults")
    ap.add_argument("--shapes", nargs="*", default=[s.name for s in SHAPES])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds per plan (medians reported)")
    ap.add_argument("--check", action="store_true", help="second-run checks only (see run_check)")
    ap.add_argument("--wait-file", default="", help="before timing, wait (up to 240 s) until this file exists")
    ap.add_argument("--baselines", action="store_true",
                    help="dense only: SDPA backends, xformers and the ditlens all-full launch per shape")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py needs a CUDA device")
    os.makedirs(args.out, exist_ok=True)
    import triton

    props = torch.cuda.get_device_properties(0)
    header = {
        "command": "python " + " ".join(sys.argv),
        "device": f"{props.name} ({props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB)",
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "tensor_descriptors": hasattr(triton.language, "make_tensor_descriptor"),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "host": platform.node(),
        "rounds": args.rounds,
    }
    print(json.dumps(header), flush=True)
    t0 = time.time()
    if args.baselines:
        run_baselines(args.out, header, [s for s in SHAPES if s.name in args.shapes])
        print(f"total {time.time() - t0:.0f}s")
        return
    if args.check:
        if args.jobs > 0:
            run_pool(_check_warm_tasks(), args.jobs)
        wait_for(args.wait_file)
        run_check(args.out, header)
        print(f"total {time.time() - t0:.0f}s")
        return
    if args.jobs > 0:
        warm_up(args.jobs, tune=not args.no_tune, shapes=args.shapes)
    print(f"warm-up done in {time.time() - t0:.0f}s", flush=True)
    wait_for(args.wait_file)
    shapes_by_name = {s.name: s for s in SHAPES}
    if args.no_tune:
        from ditlens.kernels.triton_backend import default_config

        chosen = {d: default_config(d, False) for d in TUNE_SHAPE_FOR_DIM}
        tune_rows: list[dict] = []
    else:
        chosen, tune_rows = tune(shapes_by_name)
    print("chosen configs:", {d: asdict(c) for d, c in chosen.items()}, flush=True)
    rows: list[Row] = []
    infos: dict = {}
    warsr: list[dict] = []
    for name in tqdm(args.shapes, desc="shapes"):
        shape = shapes_by_name[name]
        try:
            r, info = run_shape(shape, None if args.no_tune else chosen.get(shape.head_dim, KernelConfig()),
                                rounds=args.rounds)
            rows += r
            infos[name] = info
            torch.cuda.empty_cache()  # the shape's tensors are gone with run_shape's frame
        except Exception as exc:
            print(f"  {name} failed: {type(exc).__name__}: {str(exc)[:400]}", flush=True)
        write_report(args.out, header, chosen, tune_rows, rows, infos, warsr)
    for name in WARSR_SHAPES:
        if name in args.shapes:
            shape = shapes_by_name[name]
            try:
                warsr.append(run_warsr(shape, chosen.get(shape.head_dim, KernelConfig())))
            except Exception as exc:
                print(f"  WA-RS {name} failed: {type(exc).__name__}: {str(exc)[:400]}", flush=True)
    write_report(args.out, header, chosen, tune_rows, rows, infos, warsr)
    print(open(os.path.join(args.out, "kernels.md")).read())
    print(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
