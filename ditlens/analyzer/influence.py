"""Per-head influence of compression candidates, recorded on the uncompressed trajectory.

For every attention layer, step, branch and head, and for each candidate method m, the
influence is the head's share of the layer's relative squared error (DESIGN §4, V2):

    I(h, m) = Σ_{tokens, channels of head h} (O'_h - O_h)² / Σ_{all heads, tokens, channels} (O - mean O)²

where O is the layer's attention output (per head, before the output projection; image and
text tokens) and O' the output with only head h compressed by m. Because the numerator only
involves head h, influences add up over heads: Σ_h I(h, m_h) is the RSE of the whole layer
under a head-wise plan, which is the constraint DiTFastAttnV2's integer program uses.

Candidates (method strings of the compression runtime):

- ``window(w)`` / ``arrow(w)``: the head attends the band |i - j| <= w over image tokens
  (``arrow`` for joint attention: text rows and columns kept). Computed from the layer's own
  q, k, v through :func:`ditlens.kernels.headwise_attention`, over the sequences the layer attends
  (one frame in per-frame self attention, the frames of one position in temporal attention, one
  sample where text lengths differ per sample, as in Mochi). Self, temporal and joint layers; NaN
  where the window keeps every pair of the layer.
- ``ast``: the output of the previous step is reused (NaN at step 0).
- ``asc``: the uncond branch reuses the cond output of the same step (NaN on the cond branch).

Stored in the trace at ``/influence/rse`` with axes (prompt, branch, step, layer, head,
candidate); the candidate labels are in the root attribute ``influence_candidates``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ditlens.analyzer.adapters import AttentionLayer, GroupedTensors, frames_to_canonical, temporal_to_canonical
from ditlens.analyzer.capture import BRANCHES, ForwardContext

INFLUENCE_PATH = "/influence/rse"
INFLUENCE_AXES = ("branch", "step", "layer", "head", "candidate")
DEFAULT_SPARSITIES = (0.5, 0.75, 0.9)


@dataclass(frozen=True)
class Candidate:
    method: str  # "window", "arrow", "ast" or "asc"
    window: int = 0

    @property
    def label(self) -> str:
        return f"{self.method}({self.window})" if self.method in ("window", "arrow") else self.method


def parse_candidates(spec: str) -> list[Candidate]:
    """``"ast,asc,arrow(64),window(16)"`` -> candidates."""
    from ditlens.errors import DitlensError

    out = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if part in ("ast", "asc"):
            out.append(Candidate(part))
            continue
        name, _, rest = part.partition("(")
        if name not in ("window", "arrow") or not rest.endswith(")") or not rest[:-1].isdigit():
            raise DitlensError(f"influence candidate {part!r}: use ast, asc, window(W) or arrow(W) with W in tokens")
        out.append(Candidate(name, int(rest[:-1])))
    return out


def default_candidates(n_image: int, joint: bool, has_cfg: bool) -> list[Candidate]:
    """Output cache, CFG share, and the band at 50/75/90 % image-pair sparsity."""
    from ditlens.kernels import window_for_sparsity

    method = "arrow" if joint else "window"
    widths = sorted({window_for_sparsity(n_image, s) for s in DEFAULT_SPARSITIES}, reverse=True)
    out = [Candidate("ast")] + ([Candidate("asc")] if has_cfg else [])
    return out + [Candidate(method, w) for w in widths]


def _sequence(tensors: GroupedTensors, name: str, layer: AttentionLayer) -> torch.Tensor | list[torch.Tensor] | None:
    """The layer's tensor over every token it attends, [batch, heads, tokens, D]: the canonical image
    tokens of self and temporal layers (frame-major; :func:`_attention_sequences` cuts them into the
    sequences the layer attends over), text and image in sequence order for joint layers, or one
    [1, heads, tokens_b, D] per batch row where text lengths differ per sample (Mochi). None for cross
    attention."""
    image = tensors.image.get(name)
    text = tensors.text.get(name)
    if image is None:
        return None
    if layer.kind in ("self", "temporal"):
        return image
    if layer.kind != "joint" or text is None:
        return None
    first = layer.text_position == "first"
    if isinstance(text, list):
        return [torch.cat([t, image[b:b + 1]] if first else [image[b:b + 1], t], dim=2) for b, t in enumerate(text)]
    return torch.cat([text, image], dim=2) if first else torch.cat([image, text], dim=2)


def _attention_sequences(x: torch.Tensor, kind: str, grid: tuple[int, int, int]) -> torch.Tensor:
    """Canonical image tokens [b, H, frames*hw, D] (frame-major) -> the sequences a layer attends over:
    [b*frames, H, hw, D] for per-frame self attention (Latte's spatial blocks), [b*hw, H, frames, D]
    for temporal attention; joint layers and single frames unchanged."""
    frames, hw = grid[0], grid[1] * grid[2]
    b, h, _, d = x.shape
    if kind == "self" and frames > 1:
        return x.reshape(b, h, frames, hw, d).transpose(1, 2).reshape(b * frames, h, hw, d)
    if kind == "temporal":
        return x.reshape(b, h, frames, hw, d).permute(0, 3, 1, 2, 4).reshape(b * hw, h, frames, d)
    return x


def _canonical_tokens(x: torch.Tensor, kind: str, grid: tuple[int, int, int]) -> torch.Tensor:
    """Inverse of :func:`_attention_sequences` (the adapters' own regrouping of such layers' calls)."""
    frames, hw = grid[0], grid[1] * grid[2]
    if kind == "self":
        return frames_to_canonical(x, x.shape[0] // frames)
    if kind == "temporal":
        return temporal_to_canonical(x, x.shape[0] // hw)
    return x


def _output(tensors: GroupedTensors) -> torch.Tensor | None:
    """All output tokens of a layer [batch, heads, N, D] (image then text), or None."""
    image, text = tensors.image.get("o"), tensors.text.get("o")
    if image is None or isinstance(text, list):
        return image
    return image if text is None else torch.cat([image, text], dim=2)


class InfluenceRecorder:
    """Capture observer computing I(h, m) for every candidate (see module docstring)."""

    def __init__(self, layers: list[AttentionLayer], candidates: list[Candidate] | Callable[[int], list[Candidate]],
                 n_steps: int, n_heads: int) -> None:
        """``candidates`` may be a function of the image token count of the longest self or joint
        attention sequence, resolved at the first layer."""
        self.layers = layers
        self._candidates = candidates
        self.n_steps, self.n_heads = n_steps, n_heads
        self._result: torch.Tensor | None = None
        self._previous: dict[tuple[int, str], torch.Tensor] = {}
        self._pending_cond: dict[int, tuple[int, torch.Tensor]] = {}

    def _store(self, branch: str, step: int, layer: int, c: int, values: torch.Tensor) -> None:
        if self._result is None:
            shape = (len(BRANCHES), self.n_steps, len(self.layers), self.n_heads, len(self.candidates))
            self._result = torch.full(shape, float("nan"), dtype=torch.float32, device=values.device)
        self._result[BRANCHES.index(branch), step, layer, :, c] = values.float()

    @property
    def candidates(self) -> list[Candidate]:
        if callable(self._candidates):
            raise RuntimeError("candidates are chosen at the first attention layer")
        return self._candidates

    def on_layer(self, layer_index: int, context: ForwardContext, tensors: GroupedTensors) -> None:
        if callable(self._candidates):
            grid = context.info.grid
            from ditlens.compress.flops import longest_image_sequence

            self._candidates = self._candidates(longest_image_sequence(self.layers, tuple(grid)))
        layer = self.layers[layer_index]
        out = _output(tensors)
        if out is None:
            return
        rows = context.rows
        order = sorted(rows, key=rows.get)
        # Rows in branch order: a slice (no index tensor, so no host-device sync).
        index = slice(None) if [rows[b] for b in order] == list(range(len(order))) else [rows[b] for b in order]
        o = out.float()[index]  # [branches here, H, N, D]
        centred = o - o.mean(dim=(1, 2, 3), keepdim=True)
        denominator = centred.pow(2).sum(dim=(1, 2, 3))  # [branches]

        def share(candidate_out: torch.Tensor, which: slice | list[int]) -> torch.Tensor:
            err = (candidate_out.float() - o[which]).pow(2).sum(dim=(2, 3))  # [b, H]
            return err / denominator[which, None]

        windowed = [c for c in self.candidates if c.method in ("window", "arrow")]
        if windowed:
            q, k, v = (_sequence(tensors, n, layer) for n in ("q", "k", "v"))
            if q is not None and k is not None and v is not None:
                self._windowed(layer, layer_index, context, order, index, q, k, v, o, share)
        for c_index, candidate in enumerate(self.candidates):
            if candidate.method == "ast":
                for i, branch in enumerate(order):
                    previous = self._previous.get((layer_index, branch))
                    if previous is not None:
                        self._store(branch, context.step, layer_index, c_index, share(previous[None], [i])[0])
            elif candidate.method == "asc":
                self._asc(layer_index, context, order, o, share, c_index)
        for i, branch in enumerate(order):
            self._previous[(layer_index, branch)] = o[i]

    def _windowed(self, layer, layer_index, context, order, index, q, k, v, o, share) -> None:
        from ditlens.compress.methods import HeadMethod, call_layout, removes_pairs
        from ditlens.kernels import headwise_attention

        grid = tuple(context.info.grid)
        per_sample = isinstance(q, list)  # text lengths differ per sample: one sequence per row
        if per_sample:
            groups = [(q[context.rows[b]], k[context.rows[b]], v[context.rows[b]]) for b in order]
        else:
            groups = [tuple(_attention_sequences(t[index], layer.kind, grid) for t in (q, k, v))]
        layouts = [call_layout(layer, grid, g[0].shape[2], g[1].shape[2]) for g in groups]
        for c_index, candidate in enumerate(self.candidates):
            if candidate.method not in ("window", "arrow"):
                continue
            mode = candidate.method if layer.kind == "joint" else "window"
            if not removes_pairs(HeadMethod(mode, candidate.window), layouts[0]):
                continue  # keeps every pair of this layer: not a candidate here (NaN), as in the searches
            outs = []
            for (gq, gk, gv), layout in zip(groups, layouts):
                seq = headwise_attention(gq, gk, gv, modes=mode, windows=candidate.window, n_text=layout.n_text,
                                         text_first=layout.text_first)
                if layout.n_text and layout.text_first:  # canonical order: image tokens, then text
                    seq = torch.cat([seq[:, :, layout.n_text:], seq[:, :, :layout.n_text]], dim=2)
                outs.append(seq[:, :, :layout.n_image] if per_sample else seq)  # o: image tokens only there
            values = share(_canonical_tokens(torch.cat(outs), layer.kind, grid), slice(None))
            for i, branch in enumerate(order):
                self._store(branch, context.step, layer_index, c_index, values[i])

    def _asc(self, layer_index, context, order, o, share, c_index) -> None:
        if "cond" in order and "uncond" in order:
            cond = o[order.index("cond")]
            self._store("uncond", context.step, layer_index, c_index, share(cond[None], [order.index("uncond")])[0])
        elif order == ["cond"]:
            self._pending_cond[layer_index] = (context.step, o[0])
        elif order == ["uncond"]:
            step, cond = self._pending_cond.pop(layer_index, (None, None))
            if step == context.step:
                self._store("uncond", context.step, layer_index, c_index, share(cond[None], [0])[0])

    def on_forward_end(self, context: ForwardContext) -> None:
        pass

    def finish(self, branches: list[str]) -> np.ndarray:
        shape = (len(branches), self.n_steps, len(self.layers), self.n_heads, len(self.candidates))
        self._previous.clear()
        self._pending_cond.clear()
        if self._result is None:
            return np.full(shape, np.nan, np.float32)
        out = self._result.cpu().numpy()[[BRANCHES.index(b) for b in branches]]
        self._result = None
        return np.ascontiguousarray(out)
