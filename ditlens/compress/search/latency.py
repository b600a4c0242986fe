"""Latency model of the search: what one head costs under each method, relative to full.

``flops`` (default): attention-core FLOPs of one head for one image over both CFG branches,
from the exact pair counts of :mod:`ditlens.compress.methods` (output cache costs 0, CFG share
computes the cond branch only). ``measured``: the median time of
:func:`ditlens.kernels.headwise_attention` running every head of the layer's layout in that
mode, on the given device and in the model's dtype (CPU timings are only indicative).

A WA-RS step costs its window twice in both models: the reuse step's launch (W + R) and the
windowed launch its refresh adds to the preceding full step (R = O - W), charged to the step it
serves (exact when one refresh serves one step, an upper bound when it serves several). At short
sequences a windowed launch costs over half a dense one (BENCHMARKS.md §2), so WA-RS then costs
more than full attention and the program leaves it out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ditlens.compress.flops import head_core_flops, layer_sequences
from ditlens.compress.methods import FULL, WINDOWED, CallLayout, HeadMethod, parse_method, removes_pairs
from ditlens.compress.plan import LayerInfo, _defined_on
from ditlens.errors import DitlensError

LATENCY_MODELS = ("flops", "measured")


def method_allowed(method: str, layer: LayerInfo, has_cfg: bool, layout: CallLayout | None = None) -> bool:
    """Whether the searches may give ``method`` to a head of ``layer``: defined on its kind, CFG share
    only with CFG, and (given the layer's ``layout``) a window only where it skips some pair."""
    parsed = parse_method(method)
    if parsed.asc and not has_cfg:
        return False
    if layout is not None and parsed.base in WINDOWED and not removes_pairs(parsed, layout):
        return False
    return _defined_on(parsed, layer.kind)


@dataclass
class LatencyModel:
    """cost[layer][candidate] and full[layer] in one unit (FLOPs or seconds) per head and image."""

    kind: str
    candidates: list[str]
    cost: np.ndarray  # [layers, candidates]; inf where a candidate is not allowed on a layer
    full: np.ndarray  # [layers]
    notes: dict[str, float] = field(default_factory=dict)

    def layer_costs(self, layer: int, heads: int) -> tuple[np.ndarray, np.ndarray]:
        """([H, M] cost, [H] full cost) of one layer."""
        return np.tile(self.cost[layer], (heads, 1)), np.full(heads, self.full[layer])

    def method_cost(self, layer: int, method: HeadMethod) -> float:
        text = method.to_str()
        if text == "full":
            return float(self.full[layer])
        if text in self.candidates:
            return float(self.cost[layer, self.candidates.index(text)])
        return float(self.full[layer])


def _rows_factor(method: HeadMethod, cfg_rows: int) -> float:
    return 1.0 if (method.asc and cfg_rows == 2) else float(cfg_rows)


def flops_latency(layers: list[LayerInfo], candidates: list[str], grid: tuple[int, int, int], n_text: int,
                  head_dim: int, cfg_rows: int) -> LatencyModel:
    cost = np.full((len(layers), len(candidates)), np.inf)
    full = np.zeros(len(layers))
    for i, layer in enumerate(layers):
        seq = layer_sequences(layer, grid, n_text)
        full[i] = head_core_flops(FULL, seq.layout, head_dim) * seq.count * cfg_rows
        for j, text in enumerate(candidates):
            if method_allowed(text, layer, cfg_rows == 2, seq.layout):
                m = parse_method(text)
                cost[i, j] = (head_core_flops(m, seq.layout, head_dim) * seq.count * _rows_factor(m, cfg_rows)
                              * _launches(m))
    return LatencyModel("flops", list(candidates), cost, full)


def _launches(method: HeadMethod) -> int:
    """Windowed products a step of ``method`` stands for: WA-RS's reuse and its refresh."""
    return 2 if method.base == "wars" else 1


def measured_latency(layers: list[LayerInfo], candidates: list[str], grid: tuple[int, int, int], n_text: int,
                     heads: int, head_dim: int, cfg_rows: int, device: str = "cpu", repeats: int = 5,
                     dtype: Any = None) -> LatencyModel:
    """Times ``headwise_attention`` per mode on each distinct layer layout (random q, k, v in
    ``dtype``, default float32 on the CPU and bfloat16 on CUDA: the kernels the runtime uses)."""
    import torch

    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32

    from ditlens.kernels import headwise_attention
    from ditlens.kernels.window2d import window2d_attention

    cost = np.full((len(layers), len(candidates)), np.inf)
    full = np.zeros(len(layers))
    timings: dict[tuple, float] = {}

    def timed(layout, count: int, mode: str, w: int) -> float:
        key = (layout, count, mode, w)
        if key not in timings:
            gen = torch.Generator(device="cpu").manual_seed(0)
            shape = (count, heads, layout.q_len, head_dim)
            q, k, v = (torch.randn(shape, generator=gen).to(device=device, dtype=dtype) for _ in range(3))
            kv_len = layout.k_len
            if kv_len != layout.q_len:  # cross attention: dense SDPA is the only method
                k, v = (torch.randn((count, heads, kv_len, head_dim), generator=gen).to(device=device, dtype=dtype)
                        for _ in range(2))
            def run():
                if mode == "full" or kv_len != layout.q_len:
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v)
                if mode == "window2d":
                    return window2d_attention(q, k, v, radius=w, grid=layout.grid, n_text=layout.n_text,
                                              text_first=layout.text_first)
                return headwise_attention(q, k, v, modes=mode, windows=w, n_text=layout.n_text,
                                          text_first=layout.text_first)
            run()
            samples = []
            for _ in range(repeats):
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                run()
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                samples.append(time.perf_counter() - t0)
            timings[key] = float(np.median(samples)) / heads
        return timings[key]

    for i, layer in enumerate(layers):
        seq = layer_sequences(layer, grid, n_text)
        full[i] = timed(seq.layout, seq.count, "full", 0) * cfg_rows
        for j, text in enumerate(candidates):
            if not method_allowed(text, layer, cfg_rows == 2, seq.layout):
                continue
            m = parse_method(text)
            if not m.computes:
                cost[i, j] = 0.0
            elif m.mask_kind == "full":
                cost[i, j] = full[i] / cfg_rows * _rows_factor(m, cfg_rows)
            elif m.mask_kind in ("window", "arrow") or (m.mask_kind == "window2d" and seq.layout.grid is not None):
                cost[i, j] = (timed(seq.layout, seq.count, m.mask_kind, m.window) * _rows_factor(m, cfg_rows)
                              * _launches(m))
            else:  # window2d off a grid (temporal attention) is refused by the plan: FLOPs share of the full time
                share = head_core_flops(m, seq.layout, head_dim) / max(head_core_flops(FULL, seq.layout, head_dim), 1)
                cost[i, j] = full[i] / cfg_rows * share * _rows_factor(m, cfg_rows)
    return LatencyModel("measured", list(candidates), cost, full)


def build_latency(kind: str, layers: list[LayerInfo], candidates: list[str], grid: tuple[int, int, int], n_text: int,
                  heads: int, head_dim: int, cfg_rows: int, device: str = "cpu", dtype: Any = None) -> LatencyModel:
    if kind == "flops":
        return flops_latency(layers, candidates, grid, n_text, head_dim, cfg_rows)
    if kind == "measured":
        return measured_latency(layers, candidates, grid, n_text, heads, head_dim, cfg_rows, device, dtype=dtype)
    raise DitlensError(f"unknown latency model {kind!r}; use one of {', '.join(LATENCY_MODELS)}")


def modelled_latency_fraction(plan, model: LatencyModel) -> float:
    """Σ latency of every (step, layer, head) under the plan / the all-full latency, per ``model``."""
    total = full = 0.0
    for s in range(plan.steps):
        for i in range(plan.n_layers):
            for method in plan.head_methods(s, i):
                total += model.method_cost(i, method)
                full += float(model.full[i])
    return total / full if full else 1.0
