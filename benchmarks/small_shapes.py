"""GPU time of the head-wise kernels at the short sequences where DiT-XL 512² and PixArt 1024² run,
per tile config: what a plan costs there once CUDA graphs remove the host (the e2e rows under
graphs). Each variant is timed with ``triton.testing.do_bench_cudagraph`` (launches replayed from
a graph: kernel time only), bf16, against SDPA in the same run, and checked: dense against SDPA,
window and arrow against masked attention on sampled rows of one head.

    python benchmarks/small_shapes.py --out DIR        # writes small_shapes.json and prints a table

Variants: dense; ``window(w)`` on every head; ``arrow`` on every head, its w skipping the same share
of all pairs as the window (text pairs kept, as benchmarks/kernels.py's sparsity rows); ``mixed``, the
heads in turn full, arrow (that w) and skip (kernels.py's mixed plan at the given sparsity); the WA-RS
apply step ``W + R`` (residual added in the epilogue); the WA-RS refresh's extra launch ``R = O - W``
(subtracting from a given ``O``, which the model's SDPA computed); the one-pass refresh that
computes ``O`` and ``R`` together.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
from pathlib import Path

from dataclasses import dataclass

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ditlens.kernels.patterns import HeadPlan, TokenLayout  # noqa: E402

# B, H, L, D, e2e window w, text tokens, placed first (FLUX and the 2K rows as benchmarks/kernels.py: w from
# --window-sparsity; SD3 puts its text last, which only its windowed rows would notice)
SHAPES = {"DiT-512": (2, 16, 1024, 72, 64, 0), "PixArt-1K": (2, 16, 4096, 72, 256, 0),
          "PixArt-2K": (2, 16, 16384, 72, 0, 0), "FLUX-1K": (1, 24, 4096 + 512, 128, 0, 512),
          "FLUX-2K": (1, 24, 16384 + 512, 128, 0, 512), "SD3-1K": (2, 24, 4096 + 333, 64, 0, 333)}
VARIANTS = ("dense", "window", "arrow", "mixed", "W+R", "R=O-W", "O,R fused")
CONFIGS = "128x64/4w/3s,64x64/4w/3s,64x64/4w/2s,64x32/4w/2s,128x32/4w/3s,32x32/2w/2s"


def _parse_config(text: str):
    """``"128x64/8w/3s"`` -> KernelConfig(128, 64, 8, 3); suffixes ``/tma`` (K/V through tensor
    descriptors), ``/ws`` (warp-specialized unmasked key loop), ``/eN`` (edge loops pipelined N deep),
    ``/rN`` (at most N registers per thread), ``/1l`` (one loop per key segment) and ``/skN`` or ``/skNhM``
    (full heads in N key chunks: all of them, or the last M; a trailing ``b``, e.g. ``/sk2h4b``, keeps the
    dense loop for the unsplit full heads: KernelConfig.split_branch) and ``/qo`` (Q and O of a split head dim
    through descriptors too: KernelConfig.qo_tma_split_dim) and ``/rt`` (the WA-RS residual through descriptors:
    KernelConfig.residual_tma) and ``/p2`` or ``/p4`` (½ or ¼ of the exponentials by polynomial: KernelConfig.poly_exp),
    in any order."""
    from ditlens.kernels.triton_backend import KernelConfig

    tiles, warps, stages, *flags = text.strip().split("/")
    edge = [f for f in flags if f[:1] == "e" and f[1:].isdigit()]
    regs = [f for f in flags if f[:1] == "r" and f[1:].isdigit()]
    split = [m for m in (re.fullmatch(r"sk(\d+)(?:h(\d+))?(b?)", f) for f in flags) if m]
    unknown = set(flags) - {"tma", "ws", "1l", "qo", "rt", "p2", "p4"} - set(edge) - set(regs) - {m[0] for m in split}
    if unknown or len(edge) > 1 or len(regs) > 1 or len(split) > 1:
        raise SystemExit(f"bad config flags in {text!r}; use /tma, /ws, /1l, /qo, /rt, /p2 or /p4, one /eN, one /rN "
                         "and one /skN")
    bm, bn = tiles.split("x")
    return KernelConfig(int(bm), int(bn), int(warps.rstrip("w")), int(stages.rstrip("s")), tma="tma" in flags,
                        warp_specialize="ws" in flags, edge_stages=int(edge[0][1:]) if edge else None,
                        max_registers=int(regs[0][1:]) if regs else None, one_loop="1l" in flags,
                        split_full=int(split[0][1]) if split else 1,
                        split_heads=int(split[0][2]) if split and split[0][2] else None,
                        split_branch=bool(split) and split[0][3] == "b", qo_tma_split_dim="qo" in flags,
                        residual_tma="rt" in flags, poly_exp=2 if "p2" in flags else 4 if "p4" in flags else 0)


def _label(cfg) -> str:
    return (f"{cfg.block_m}x{cfg.block_n}/{cfg.num_warps}w/{cfg.num_stages}s" + ("/tma" if cfg.tma else "")
            + ("/ws" if cfg.warp_specialize else "") + (f"/e{cfg.edge_stages}" if cfg.edge_stages else "")
            + (f"/r{cfg.max_registers}" if cfg.max_registers else "") + ("/1l" if cfg.one_loop else "")
            + (f"/sk{cfg.split_full}" if cfg.split_full > 1 else "")
            + (f"h{cfg.split_heads}" if cfg.split_full > 1 and cfg.split_heads is not None else "")
            + ("b" if cfg.split_full > 1 and cfg.split_branch else "") + ("/qo" if cfg.qo_tma_split_dim else "")
            + ("/rt" if cfg.residual_tma else "") + (f"/p{cfg.poly_exp}" if cfg.poly_exp else ""))


def band_window(L: int, sparsity: float) -> int:
    """The smallest half-width w whose band |i - j| <= w keeps at most (1 - sparsity) of the L^2 pairs
    (pairs = L (2w + 1) - w (w + 1)), as benchmarks/kernels.py picks its window rows."""
    lo, hi = 0, L
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if L * (2 * mid + 1) - mid * (mid + 1) <= (1.0 - sparsity) * L * L:
            lo = mid
        else:
            hi = mid - 1
    return lo


def arrow_window(L: int, n_text: int, sparsity: float) -> int | None:
    """Half-width of an arrow head (every pair with a text token kept, the band on image pairs) that
    skips ``sparsity`` of all L^2 pairs; None when the text pairs alone keep more than 1 - sparsity."""
    from ditlens.kernels.patterns import window_for_sparsity

    n = L - n_text
    band_target = (1.0 - sparsity) * L * L - (L * L - n * n)
    return window_for_sparsity(n, 1.0 - band_target / (n * n)) if band_target > 0 else None


def mixed_modes(heads: int, sparse_mode: str) -> tuple[str, ...]:
    """The mixed plan of kernels.py's tables: heads in turn full, ``sparse_mode`` and skip."""
    return tuple(("full", sparse_mode, "skip")[h % 3] for h in range(heads))


def sampled_error(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str, w: int,
                  layout, scale: float, n_rows: int = 1024) -> float:
    """Relative error of head 0 of batch 0 of ``out`` against float32 masked attention, on ``n_rows``
    query rows spread over the sequence plus the first and last 128 (edge blocks, partial tails); NaN
    rows make it NaN. Cheap enough for the 2K shapes, where the dense reference is not."""
    from ditlens.kernels.patterns import head_pattern

    L = q.shape[2]
    rows = torch.unique(torch.cat([torch.linspace(0, L - 1, n_rows, device=q.device).long(),
                                   torch.arange(min(128, L), device=q.device),
                                   torch.arange(max(L - 128, 0), L, device=q.device)]))
    mask = head_pattern(mode, w, rows[:, None], torch.arange(L, device=q.device)[None, :], layout)
    scores = (q[0, 0, rows].float() @ k[0, 0].float().T) * scale
    ref = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v[0, 0].float()
    got = out[0, 0, rows].float()
    return ((got - ref).norm() / ref.norm()).item()


@dataclass(frozen=True)
class ShapePlans:
    """One shape's token layout, windows and the plans of the variants."""

    B: int
    H: int
    L: int
    D: int
    w: int
    w_arrow: int
    layout: TokenLayout
    dense: HeadPlan
    window: HeadPlan
    arrow: HeadPlan
    mixed: HeadPlan


def shape_plans(name: str, window_sparsity: float | None) -> ShapePlans:
    """The shape's plans: w from ``window_sparsity`` (or the e2e plans' w, 50 % where there is none), the
    arrow's w skipping the same share of all pairs, the mixed plan full / arrow / skip in turn."""
    B, H, L, D, w, n_text = SHAPES[name]
    sparsity = 0.5 if window_sparsity is None else window_sparsity
    if window_sparsity is not None or not w:
        w = band_window(L, sparsity)
    w_arrow = arrow_window(L, n_text, sparsity) or 0
    mixed_heads = mixed_modes(H, "arrow")
    return ShapePlans(B, H, L, D, w, w_arrow, TokenLayout(L, n_text, True), HeadPlan(("full",) * H, (0,) * H),
                      HeadPlan(("window",) * H, (w,) * H), HeadPlan(("arrow",) * H, (w_arrow,) * H),
                      HeadPlan(mixed_heads, tuple(w_arrow if m == "arrow" else 0 for m in mixed_heads)))


@functools.lru_cache(maxsize=None)
def programs_per_sm(head_dim: int, cfg, all_full: bool, arch: int, on_device: bool = False) -> tuple[int, int | None]:
    """Resident programs per SM of the head-wise kernel compiled for ``arch``: (from its registers and shared
    memory by ditlens.kernels.waves.resident_programs, from the CUDA driver's occupancy calculator when
    ``on_device``, else None)."""
    from kernel_resources import compile_launch, resources

    from ditlens.kernels.waves import resident_programs

    kernel = compile_launch(head_dim, cfg, all_full, False, False, arch)
    res = resources(kernel)
    arithmetic = resident_programs(res["registers"], res["shared_bytes"], cfg.num_warps)
    if not on_device:
        return arithmetic, None
    import ctypes

    kernel._init_handles()  # loads the module and raises its dynamic shared memory limit
    count = ctypes.c_int(-1)
    ctypes.CDLL("libcuda.so.1").cuOccupancyMaxActiveBlocksPerMultiprocessor(
        ctypes.byref(count), ctypes.c_void_p(kernel.function), ctypes.c_int(cfg.num_warps * 32),
        ctypes.c_size_t(res["shared_bytes"]))
    return arithmetic, count.value


def modeled_launch(plan: HeadPlan, layout: TokenLayout, batch: int, head_dim: int, cfg, arch: int, sms: int) -> dict:
    """The wave model's makespan (key blocks) of one launch with ``cfg`` on a GPU of compute capability
    ``arch`` (x10) with ``sms`` SMs: slots = SMs x the programs per SM that the kernel compiled for that
    target (by the triton installed here) allows with its registers and shared memory; both bounds
    (``makespan``: a program's speed never changes; ``makespan_shared``: an SM keeps its throughput)."""
    from ditlens.kernels.triton_backend import full_head_split
    from ditlens.kernels.waves import makespan, makespan_shared, program_work

    split, n_split = full_head_split(plan, layout.seq_len, cfg)
    arithmetic, driver = programs_per_sm(head_dim, cfg, plan.all_full, arch, torch.cuda.is_available())
    per_sm = driver if driver is not None and driver > 0 else arithmetic
    slots = sms * per_sm
    work = program_work(plan, layout, batch, cfg.block_m, cfg.block_n, split, n_split)
    return {"per_sm": per_sm, "per_sm_arithmetic": arithmetic, "per_sm_driver": driver, "slots": slots,
            "makespan": makespan(work, slots), "makespan_shared": makespan_shared(work, sms, per_sm),
            "mean": sum(work) / slots}


def print_model_table(rows: list[dict]) -> None:
    """Measured and modelled times of each shape's configs, relative to the shape's first config."""
    print("| shape | variant | config | programs per SM (registers and shared memory / driver) | measured µs | "
          "÷ first config | modelled blocks, fixed speed / shared SM | ÷ first config | ÷ work per slot |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for key in ("dense", "mixed"):
        first: dict[str, dict] = {}
        for r in rows:
            model = r.get(f"{key}_model")
            if model is None:
                continue
            base = first.setdefault(r["shape"], r)
            measured = r.get(f"{key}_us", float("nan"))
            driver = model.get("per_sm_driver")
            print(f"| {r['shape']} | {key} | {r['config']} | {model.get('per_sm_arithmetic', model['per_sm'])} / "
                  f"{'—' if driver is None else driver} | {measured:.1f} | "
                  f"{measured / base.get(f'{key}_us', float('nan')):.3f} | "
                  f"{model['makespan']:.1f} / {model['makespan_shared']:.1f} | "
                  f"{model['makespan'] / base[f'{key}_model']['makespan']:.3f} / "
                  f"{model['makespan_shared'] / base[f'{key}_model']['makespan_shared']:.3f} | "
                  f"{model['makespan'] / model['mean']:.3f} / {model['makespan_shared'] / model['mean']:.3f} |")


def model_only(args: argparse.Namespace, configs: list, variants: list[str]) -> None:
    """The wave model's table without a GPU (kernels compiled for ``--arch``, ``--sms`` SMs)."""
    rows = []
    for name in args.shapes.split(","):
        sp = shape_plans(name, args.window_sparsity)
        for cfg in configs:
            rows.append({"shape": name, "config": _label(cfg),
                         **{f"{key}_model": modeled_launch(getattr(sp, key), sp.layout, sp.B, sp.D, cfg, args.arch,
                                                           args.sms)
                            for key in ("dense", "mixed") if key in variants}})
    print_model_table(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--configs", default=None,
                        help="tile configs to time, e.g. 128x64/8w/3s,64x64/4w/2s/tma (default: the built-in list)")
    parser.add_argument("--shapes", default="DiT-512,PixArt-1K", help=f"any of {', '.join(SHAPES)}")
    parser.add_argument("--window-sparsity", type=float, default=None,
                        help="window w skipping this share of all pairs instead of the e2e plans' w (PixArt-2K: 0.5)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"any of {', '.join(VARIANTS)}")
    parser.add_argument("--model", action="store_true",
                        help="also the wave model's time of the dense and mixed launches (ditlens.kernels.waves), "
                             "with the resident programs per SM of each config's compiled kernel")
    parser.add_argument("--model-only", action="store_true",
                        help="the wave model's table alone, on any machine (with --arch and --sms)")
    parser.add_argument("--arch", type=int, default=90, help="--model-only: compute capability x10 (90: H100/H200)")
    parser.add_argument("--sms", type=int, default=132, help="--model-only: SMs of the GPU (H100/H200 SXM: 132)")
    args = parser.parse_args()
    configs = [_parse_config(c) for c in (args.configs or CONFIGS).split(",")]
    variants = args.variants.split(",")
    if args.model_only:
        return model_only(args, configs, variants)
    from triton.testing import do_bench_cudagraph

    from ditlens.kernels.triton_backend import headwise_triton, warsr_triton

    major, minor = torch.cuda.get_device_capability()
    sms = torch.cuda.get_device_properties(0).multi_processor_count

    def bench(fn) -> float:
        try:
            fn()
        except Exception as exc:  # e.g. a config this triton cannot compile: a gap in the table, not a stop
            print(f"    failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)
            return float("nan")
        return float(do_bench_cudagraph(fn, rep=50, return_mode="median")) * 1e3  # µs

    rows = []
    for name in args.shapes.split(","):
        sp = shape_plans(name, args.window_sparsity)
        B, H, L, D, w, w_arrow, layout = sp.B, sp.H, sp.L, sp.D, sp.w, sp.w_arrow, sp.layout
        dense, window, arrow, mixed, mixed_heads = sp.dense, sp.window, sp.arrow, sp.mixed, sp.mixed.modes
        g = torch.Generator("cuda").manual_seed(0)
        q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
        residual = torch.randn_like(q)
        scale = D ** -0.5
        sdpa = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
        sdpa_out = torch.nn.functional.scaled_dot_product_attention(q, k, v).float()
        print(f"{name}: SDPA {sdpa:.1f} µs", flush=True)
        for cfg in configs:
            out, r_out = torch.empty_like(q), torch.empty_like(q)
            calls = {
                "dense": lambda: headwise_triton(q, k, v, dense, layout, scale, config=cfg, out=out),
                "window": lambda: headwise_triton(q, k, v, window, layout, scale, config=cfg, out=out),
                "arrow": lambda: headwise_triton(q, k, v, arrow, layout, scale, config=cfg, out=out),
                "mixed": lambda: headwise_triton(q, k, v, mixed, layout, scale, cached=residual, config=cfg, out=out),
                "W+R": lambda: headwise_triton(q, k, v, window, layout, scale, residual=residual, config=cfg, out=out),
                "R=O-W": lambda: headwise_triton(q, k, v, window, layout, scale, residual=residual, config=cfg,
                                                 out=out, subtract=True),
                "O,R fused": lambda: warsr_triton(q, k, v, window, layout, scale, config=cfg, out=out,
                                                  residual_out=r_out),
            }
            times = {key: bench(fn) if key in variants else float("nan") for key, fn in calls.items()}
            # what was timed is right: the dense launch against SDPA (relative Frobenius error)
            dense_err = float("nan")
            if "dense" in variants and times["dense"] == times["dense"]:
                calls["dense"]()
                dense_err = ((out.float() - sdpa_out).norm() / sdpa_out.norm()).item()
            # and the windowed launches against masked attention on sampled rows (a kernel that writes NaN
            # rows must not pass for a fast one); the mixed launch's full heads against SDPA (split-K chunks
            # merged right) and its skip heads against the cache they copy
            errs = {}
            if "mixed" in variants and times["mixed"] == times["mixed"]:
                calls["mixed"]()
                full = [h for h, m in enumerate(mixed_heads) if m == "full"]
                skip = [h for h, m in enumerate(mixed_heads) if m == "skip"]
                errs["mixed_full_err"] = ((out[:, full].float() - sdpa_out[:, full]).norm()
                                          / sdpa_out[:, full].norm()).item()
                errs["mixed_skip_exact"] = float(torch.equal(out[:, skip], residual[:, skip]))
            for key, mode, width in (("window", "window", w), ("arrow", "arrow", w_arrow)):
                if key in variants and times[key] == times[key]:
                    calls[key]()
                    errs[f"{key}_err"] = sampled_error(out, q, k, v, mode, width, layout, scale)
            models = {f"{key}_model": modeled_launch(plan, layout, B, D, cfg, major * 10 + minor, sms)
                      for key, plan in (("dense", dense), ("mixed", mixed)) if args.model and key in variants}
            rows.append({"shape": name, "w": w, "w_arrow": w_arrow, "config": _label(cfg), "sdpa_us": sdpa,
                         **{f"{key}_us": t for key, t in times.items()}, "dense_err_vs_sdpa": dense_err, **errs,
                         **models})
            print(f"  {rows[-1]['config']:<17} " + "  ".join(f"{key} {t:6.1f}" for key, t in times.items())
                  + f"  dense err {dense_err:.1e}" + "".join(f"  {key} {e:.1e}" for key, e in errs.items()),
                  flush=True)
    if args.model:
        print_model_table(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "small_shapes.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows},
                                                           indent=1))
    print("| shape | config | SDPA µs | dense µs | window(w) µs | arrow(w) µs | mixed µs | W + R µs | R = O - W µs | "
          "refresh: SDPA, then R = O - W µs | refresh: O and R in one pass µs |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['shape']} (w={r['w']}, arrow {r['w_arrow']}) | {r['config']} | {r['sdpa_us']:.1f} | "
              f"{r['dense_us']:.1f} | {r['window_us']:.1f} | {r['arrow_us']:.1f} | {r['mixed_us']:.1f} | "
              f"{r['W+R_us']:.1f} | "
              f"{r['R=O-W_us']:.1f} | {r['sdpa_us'] + r['R=O-W_us']:.1f} | {r['O,R fused_us']:.1f} |")


if __name__ == "__main__":
    main()
