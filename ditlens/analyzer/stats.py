"""Streaming redundancy statistics, computed on the model's device while it runs.

:class:`PromptStatistics` is the capture observer for one prompt. For every attention layer
and forward it compares each tensor with the same layer's tensor one step earlier (``step``)
and, at each step, cond with uncond (``cfg``), for image and text tokens, and writes the
per-head values into device arrays. It keeps only one step of history per (layer, branch),
so memory does not grow with the number of steps; results leave the device once per prompt.
"""

from __future__ import annotations

import numpy as np
import torch

from ditlens.analyzer.adapters import GroupedTensors
from ditlens.analyzer.capture import BRANCHES, ForwardContext
from ditlens.analyzer.metrics import SUM_METRICS, metrics_from_sums, pair_sums_torch, pairwise_stats
from ditlens.kernels.pair_stats import pair_sums_available, pair_sums_rows
from ditlens.traces.format import RawSelection, StatKey

GroupTensor = torch.Tensor | list[torch.Tensor]


class RawCapture:
    """Copies a selected subset of raw tensors to host memory (float16).

    Token indices run over image tokens first, then text tokens (canonical order); with a
    stride s every s-th index is kept. The token axis is fixed by the first prompt
    (:meth:`finish` returns the selection); later prompts are cut or NaN-padded to it.
    """

    def __init__(self, tensors: tuple[str, ...], steps: tuple[int, ...], layers: tuple[int, ...],
                 heads: tuple[int, ...], head_dim: int, token_stride: int, n_tokens: int | None = None) -> None:
        self.tensors, self.steps, self.layers, self.heads = tensors, steps, layers, heads
        self.head_dim, self.stride, self.n_tokens = head_dim, token_stride, n_tokens
        self._step_pos = {s: i for i, s in enumerate(steps)}
        self._layer_pos = {l: i for i, l in enumerate(layers)}
        self._heads = torch.as_tensor(heads)
        self.n_image = 0
        # (tensor, branch, step slot, layer slot) -> (image part, text part), each [heads, tokens, head_dim]
        self._parts: dict[tuple[str, str, int, int], tuple[np.ndarray | None, np.ndarray | None]] = {}

    def observe(self, layer: int, context: ForwardContext, tensors: GroupedTensors) -> None:
        if context.step not in self._step_pos or layer not in self._layer_pos:
            return
        grid = context.info.grid
        self.n_image = grid[0] * grid[1] * grid[2]
        text_start = (-self.n_image) % self.stride  # first text token whose global index is on the stride
        slot = (self._step_pos[context.step], self._layer_pos[layer])
        for name in self.tensors:
            for branch, row in context.rows.items():
                image = _row(tensors.image.get(name), row)
                text = _row(tensors.text.get(name), row)
                self._parts[(name, branch) + slot] = (
                    None if image is None else _host(image[self._heads.to(image.device), ::self.stride]),
                    None if text is None else _host(text[self._heads.to(text.device), text_start::self.stride]),
                )

    def finish(self, branches: list[str], n_text: int) -> tuple[RawSelection, dict[str, np.ndarray]]:
        """``n_text``: the model's text tokens (seen by any layer, not only the selected ones)."""
        n_tokens = self.n_tokens if self.n_tokens is not None else self.n_image + n_text
        selection = RawSelection(self.tensors, self.steps, self.layers, self.heads,
                                 tuple(range(0, n_tokens, self.stride)), self.head_dim)
        n_sel = len(selection.tokens)
        n_img_sel = len(range(0, self.n_image, self.stride))
        shape = (len(branches), len(self.steps), len(self.layers), len(self.heads), n_sel, self.head_dim)
        data = {t: np.full(shape, np.nan, dtype=np.float16) for t in self.tensors}
        for (name, branch, s, l), (image, text) in self._parts.items():
            if branch not in branches:
                continue
            target = data[name][branches.index(branch), s, l]
            if image is not None:
                target[:, :min(n_img_sel, n_sel)] = image[:, :n_sel]
            if text is not None:
                room = max(0, n_sel - n_img_sel)
                take = min(room, text.shape[1])
                target[:, n_img_sel:n_img_sel + take] = text[:, :take]
        self._parts.clear()
        return selection, data


def _host(x: torch.Tensor) -> np.ndarray:
    return x.to(torch.float16).cpu().numpy()


HeadRef = tuple[torch.Tensor, int]  # (tensor [batch, heads, tokens, head_dim], row)


def _ref(x: GroupTensor | None, row: int) -> HeadRef | None:
    """One sample of a batched tensor or per-sample list, as (tensor, row) without a view."""
    if x is None:
        return None
    return (x[row], 0) if isinstance(x, list) else (x, row)


def _row(x: GroupTensor | None, row: int) -> torch.Tensor | None:
    """One sample's [heads, tokens, head_dim] from a batched tensor or a per-sample list."""
    if x is None:
        return None
    return x[row][0] if isinstance(x, list) else x[row]


class PromptStatistics:
    """Capture observer accumulating every statistic of one prompt on the device.

    Layers only queue their comparisons; when the transformer forward ends, all layers' pairs
    of one token group and shape are stacked into one batched metric call. The small result
    blocks stay on the device and are scattered into host arrays once per prompt, so the
    model never waits for the host.
    """

    def __init__(self, stat_keys: list[StatKey], n_steps: int, n_layers: int, n_heads: int,
                 raw: RawCapture | None = None, chunk_bytes: int = 1 << 30) -> None:
        self.keys = list(stat_keys)
        self.n_steps, self.n_layers, self.n_heads = n_steps, n_layers, n_heads
        self.raw = raw
        self.grid: tuple[int, int, int] | None = None
        self.branches_seen: set[str] = set()
        self.n_text = 0
        self._previous: dict[tuple[int, str], GroupedTensors] = {}
        self._pending_cond: dict[int, tuple[int, GroupedTensors]] = {}
        # (group, comparison) -> (tensor names, metric names) asked for
        self._plan: dict[tuple[str, str], tuple[list[str], list[str]]] = {}
        for g, t, c, m in self.keys:
            names, metrics = self._plan.setdefault((g, c), ([], []))
            if t not in names:
                names.append(t)
            if m not in metrics:
                metrics.append(m)
        # group -> every metric asked of it, in a fixed order (one metric call covers all comparisons)
        self._group_metrics: dict[str, list[str]] = {}
        for (g, _), (_, metrics) in self._plan.items():
            known = self._group_metrics.setdefault(g, [])
            known += [m for m in metrics if m not in known]
        # (group, metric names, [(comparison, tensor index, branch slot, step, layer)], values [items, metrics, heads])
        self._blocks: list[tuple[str, list[str], list[tuple[str, int, int, int, int]], torch.Tensor]] = []
        self._waiting: list[tuple[int, int, list]] = []  # (step, layer, pairs) of the forward in flight
        self.chunk_bytes = chunk_bytes

    # -- CaptureObserver ----------------------------------------------------------------------
    def on_layer(self, layer: int, context: ForwardContext, tensors: GroupedTensors) -> None:
        self.grid = context.info.grid
        self.branches_seen.update(context.rows)
        for text in tensors.text.values():
            self.n_text = max(self.n_text, max(t.shape[2] for t in text) if isinstance(text, list) else text.shape[2])
        # (comparison, branch slot, X source, X row, Y source, Y row); X is the current/cond tensor.
        pairs: list[tuple[str, int, GroupedTensors, int, GroupedTensors, int]] = []
        # History holds (tensors, batch row): no per-tensor views, which cost host time per layer.
        for branch, row in context.rows.items():
            previous = self._previous.get((layer, branch))
            if previous is not None:
                pairs.append(("step", BRANCHES.index(branch), tensors, row, *previous))
            self._previous[(layer, branch)] = (tensors, row)
        if "cond" in context.rows and "uncond" in context.rows:
            pairs.append(("cfg", 0, tensors, context.rows["cond"], tensors, context.rows["uncond"]))
        elif set(context.rows) == {"cond"}:
            self._pending_cond[layer] = (context.step, (tensors, context.rows["cond"]))
        elif set(context.rows) == {"uncond"}:
            step, cond = self._pending_cond.pop(layer, (None, None))
            if step == context.step:
                pairs.append(("cfg", 0, *cond, tensors, context.rows["uncond"]))
        # Compared once the forward ends, batched over all layers: per-layer Python work is what
        # made profiling slow on a fast GPU. The pairs only reference tensors the history keeps anyway.
        self._waiting.append((context.step, layer, pairs))
        if self.raw is not None:
            self.raw.observe(layer, context, tensors)

    def on_forward_end(self, context: ForwardContext) -> None:
        waiting, self._waiting = self._waiting, []
        for group in ("image", "text"):
            self._compare_group(group, waiting)

    # -- work ----------------------------------------------------------------------------------
    def _compare_group(self, group: str, waiting: list[tuple[int, int, list]]) -> None:
        """One token group of every layer of a forward: one metric call per tensor shape
        (stacked in chunks of at most ``chunk_bytes`` per side)."""
        # shape -> [(X ref, Y ref, slot)] where a ref is (batched tensor, row)
        items: dict[tuple[int, ...], list[tuple[HeadRef, HeadRef, tuple[str, int, int, int, int]]]] = {}
        metrics = self._group_metrics.get(group, [])
        for step, layer, pairs in waiting:
            for comparison, slot, x_src, x_row, y_src, y_row in pairs:
                plan = self._plan.get((group, comparison))
                if plan is None:
                    continue
                names = plan[0]
                x_map = x_src.image if group == "image" else x_src.text
                y_map = y_src.image if group == "image" else y_src.text
                for t_index, name in enumerate(names):
                    x, y = _ref(x_map.get(name), x_row), _ref(y_map.get(name), y_row)
                    if x is None or y is None:
                        continue
                    shape = x[0].shape[1:]
                    if shape != y[0].shape[1:] or 0 in shape:
                        continue
                    items.setdefault(tuple(shape), []).append((x, y, (comparison, t_index, slot, step, layer)))
        grid = self.grid if group == "image" else None
        for shape, members in items.items():
            first = members[0][0][0]
            summed = [m for m in metrics if m in SUM_METRICS]
            kernel = pair_sums_available(first)
            # Without the kernel a GPU takes the stacked path below (few large launches, not ~10 per pair).
            if summed and (kernel or not first.is_cuda):
                if kernel:
                    # Distances straight from the tensors where they lie (one launch, no stacking).
                    sums = pair_sums_rows([m[0] for m in members], [m[1] for m in members])
                else:
                    # One pair at a time from views of the batched tensors: each pair's two heads-sized
                    # slices stay in the CPU cache across the sums, where a stacked batch would not.
                    sums = torch.stack([pair_sums_torch(xs[xr], ys[yr]) for (xs, xr), (ys, yr), _ in members])
                values = metrics_from_sums(sums, shape[-2] * shape[-1])
                block = torch.stack([values[m] for m in summed], dim=1)  # [items, metrics, heads]
                self._blocks.append((group, summed, [m[2] for m in members], block))
                rest = [m for m in metrics if m not in SUM_METRICS]
            else:
                rest = metrics
            if not rest:
                continue
            per_chunk = max(1, self.chunk_bytes // (first[0].numel() * first.element_size()))
            for start in range(0, len(members), per_chunk):
                chunk = members[start:start + per_chunk]
                x = torch.stack([src[row] for src, row in (m[0] for m in chunk)])
                y = torch.stack([src[row] for src, row in (m[1] for m in chunk)])
                values = pairwise_stats(x, y, rest, grid)
                block = torch.stack([values[m].float() for m in rest], dim=1)  # [items, metrics, heads]
                # Scattered on the host once per prompt: no index tensors, no sync while the model runs.
                self._blocks.append((group, list(rest), [m[2] for m in chunk], block))

    def finish(self, branches: list[str]) -> dict[StatKey, np.ndarray]:
        """Host arrays of every key for the trace's branches; frees the history."""
        shape = (self.n_steps, self.n_layers, self.n_heads)
        full: dict[tuple[str, str], np.ndarray] = {}
        for (group, comparison), (names, metrics) in self._plan.items():
            lead = (len(names), len(metrics)) + ((len(BRANCHES),) if comparison == "step" else ())
            full[(group, comparison)] = np.full(lead + shape, np.nan, np.float32)
        if self._blocks:
            host = torch.cat([blk.reshape(-1) for *_, blk in self._blocks]).cpu().numpy()  # one copy
            offset = 0
            for group, metrics, slots, blk in self._blocks:
                size = blk.numel()
                values = host[offset:offset + size].reshape(blk.shape)
                offset += size
                for (comparison, t_index, slot, step, layer), row in zip(slots, values):
                    wanted = self._plan[(group, comparison)][1]
                    target = full[(group, comparison)]
                    for j, metric in enumerate(metrics):
                        if metric not in wanted:
                            continue
                        if comparison == "step":
                            target[t_index, wanted.index(metric), slot, step, layer] = row[j]
                        else:
                            target[t_index, wanted.index(metric), step, layer] = row[j]
        out: dict[StatKey, np.ndarray] = {}
        rows = [BRANCHES.index(b) for b in branches]
        for key in self.keys:
            group, name, comparison, metric = key
            names, metrics = self._plan[(group, comparison)]
            array = full[(group, comparison)][names.index(name), metrics.index(metric)]
            out[key] = np.ascontiguousarray(array[rows] if comparison == "step" else array)
        self._previous.clear()
        self._pending_cond.clear()
        self._blocks.clear()
        self._waiting.clear()
        return out
