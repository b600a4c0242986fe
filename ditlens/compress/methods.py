"""Compression methods: their names, their token masks and their exact attended-pair counts.

A method of one head at one step is written as a short string (the plan's JSON form)::

    full            ordinary attention
    window(w)       image query i attends image key j iff |i - j| <= w (1D band, DiTFastAttn V1)
    arrow(w)        window(w) on image-image pairs, every pair with a text query or key kept (V2)
    window2d(r)     |row_i - row_j| <= r and |col_i - col_j| <= r on the token grid (frames unrestricted)
    wars(w)         window(w) plus the residual O - W cached at the latest earlier ``full`` step (V1 WA-RS)
    ast             the output of the latest earlier step at which it was computed (V1 AST, V2 output cache)
    ...+asc         the uncond branch reuses the cond branch's output of the same step (V1 ASC);
                    ``asc`` alone is ``full+asc``

In joint attention, ``window`` and ``window2d`` keep text-text pairs and drop text-image pairs
(so every query keeps a key), ``arrow`` keeps every pair that touches text. Self-attention
layers have no text tokens, so ``arrow(w)`` equals ``window(w)`` there.

Masks are small pure functions of (query index, key index), attention-gym style, so the dense
path, FlexAttention and the FLOPs count all derive from one definition.
"""

from __future__ import annotations

from typing import Any

import re
from dataclasses import dataclass
from functools import lru_cache

import torch

from ditlens.errors import DitlensError

BASE_METHODS: tuple[str, ...] = ("full", "window", "arrow", "window2d", "wars", "ast")
WINDOWED: tuple[str, ...] = ("window", "arrow", "window2d", "wars")
_METHOD_RE = re.compile(r"^\s*(?P<base>[a-z0-9]+)\s*(?:\(\s*(?P<w>-?\d+)\s*\))?\s*(?P<asc>\+\s*asc)?\s*$")


@dataclass(frozen=True)
class HeadMethod:
    """The method of one head (or of every head of a layer) at one step."""

    base: str = "full"
    window: int = 0
    asc: bool = False

    def __post_init__(self) -> None:
        if self.base not in BASE_METHODS:
            raise DitlensError(f"unknown method {self.base!r}; use one of {', '.join(BASE_METHODS)} (optionally +asc)")
        if self.base in WINDOWED and self.window < 0:
            raise DitlensError(f"method {self.base} needs a window half-width >= 0, got {self.window}")
        if self.base not in WINDOWED and self.window != 0:
            raise DitlensError(f"method {self.base} takes no window; write {self.base!r} without (w)")
        if self.base == "ast" and self.asc:
            raise DitlensError("'ast+asc' is meaningless: an AST output is reused as a whole; write 'ast'")

    @property
    def computes(self) -> bool:
        """Whether the attention product runs for this head (AST heads copy a cache)."""
        return self.base != "ast"

    @property
    def mask_kind(self) -> str:
        """The mask the attention product runs with: full, window, arrow or window2d."""
        return "window" if self.base == "wars" else self.base

    def to_str(self) -> str:
        if self.base == "full" and self.asc:
            return "asc"
        text = f"{self.base}({self.window})" if self.base in WINDOWED else self.base
        return text + ("+asc" if self.asc else "")


FULL = HeadMethod()


@lru_cache(maxsize=256)
def parse_method(text: str) -> HeadMethod:
    """``"wars(8)+asc"`` -> HeadMethod("wars", 8, True)."""
    if not isinstance(text, str):
        raise DitlensError(f"a method is a string like 'full', 'window(8)', 'wars(8)+asc' or 'ast', got {text!r}")
    if text.strip() == "asc":
        return HeadMethod("full", 0, True)
    match = _METHOD_RE.match(text)
    if match is None:
        raise DitlensError(f"cannot read method {text!r}; write it like 'full', 'window(8)', 'wars(8)+asc' or 'ast'")
    base, w, asc = match["base"], match["w"], bool(match["asc"])
    if base in WINDOWED and w is None:
        raise DitlensError(f"method {base!r} needs a half-width: write '{base}(8)'")
    return HeadMethod(base, int(w) if w is not None else 0, asc)


# --------------------------------------------------------------------------------------------
# Token layout of one attention product and its masks
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CallLayout:
    """Where the tokens of one attention product sit: ``n_text`` text tokens first or last,
    the rest image tokens on a ``grid`` (frames, rows, cols) in frame-major order. Cross
    attention (queries image, keys text) has ``cross=True`` and allows no masks."""

    q_len: int
    k_len: int
    n_text: int = 0
    text_first: bool = False
    grid: tuple[int, int, int] | None = None
    cross: bool = False

    @property
    def image_start(self) -> int:
        return self.n_text if self.text_first else 0

    @property
    def n_image(self) -> int:
        return self.q_len - self.n_text


def call_layout(layer: Any, grid: tuple[int, int, int], lq: int, lk: int) -> CallLayout:
    """Token layout of one attention call of ``layer`` (kind, text position) on the forward's grid:
    query/key lengths, text tokens and their place, and the image grid the window methods use."""
    frames, rows, cols = grid
    if layer.kind == "cross":
        return CallLayout(lq, lk, 0, False, (1, rows, cols), cross=True)
    if layer.kind == "joint":
        n_image = frames * rows * cols
        if lq < n_image or lq != lk:
            raise DitlensError(f"layer {layer.name}: joint attention over {lq} tokens but the grid has {n_image} image tokens")
        return CallLayout(lq, lk, lq - n_image, layer.text_position == "first", (frames, rows, cols))
    if layer.kind == "temporal":
        return CallLayout(lq, lk, 0, False, None)
    if lq == frames * rows * cols:
        return CallLayout(lq, lk, 0, False, (frames, rows, cols))
    if lq == rows * cols:
        return CallLayout(lq, lk, 0, False, (1, rows, cols))
    return CallLayout(lq, lk, 0, False, None)


def _image_coords(idx: torch.Tensor, layout: CallLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image index, and (row, col) on the grid, of token index ``idx`` (garbage for text tokens)."""
    image_idx = idx - layout.image_start
    rows, cols = (layout.grid[1], layout.grid[2]) if layout.grid else (1, max(layout.n_image, 1))
    within = image_idx % (rows * cols)
    return image_idx, within // cols, within % cols


def is_image(idx: torch.Tensor, layout: CallLayout) -> torch.Tensor:
    start = layout.image_start
    return (idx >= start) & (idx < start + layout.n_image)


def method_mask(kind: str, w: int, q_idx: torch.Tensor, k_idx: torch.Tensor, layout: CallLayout) -> torch.Tensor:
    """True where query ``q_idx`` attends key ``k_idx`` under mask ``kind`` (full/window/arrow/window2d)."""
    if kind == "full":
        return (q_idx >= 0) & (k_idx >= 0)
    if layout.cross:
        raise DitlensError(f"{kind} attention is not defined for cross attention (image queries, text keys); use full, asc or ast")
    q_img, k_img = is_image(q_idx, layout), is_image(k_idx, layout)
    qi, qr, qc = _image_coords(q_idx, layout)
    ki, kr, kc = _image_coords(k_idx, layout)
    if kind in ("window", "arrow"):
        near = (qi - ki).abs() <= w
    elif kind == "window2d":
        if layout.grid is None:
            raise DitlensError("window2d needs the token grid of the layer; it is not defined for temporal attention")
        near = ((qr - kr).abs() <= w) & ((qc - kc).abs() <= w)
    else:
        raise DitlensError(f"no mask for method {kind!r}")
    band = q_img & k_img & near
    if kind == "arrow":
        return band | ~(q_img & k_img)
    return band | (~q_img & ~k_img)


@lru_cache(maxsize=64)
def dense_mask(kind: str, w: int, layout: CallLayout, device: str = "cpu") -> torch.Tensor:
    """Boolean [q_len, k_len] mask (cached: one per method, window and layout)."""
    q_idx = torch.arange(layout.q_len, device=device)[:, None]
    k_idx = torch.arange(layout.k_len, device=device)[None, :]
    return method_mask(kind, w, q_idx, k_idx, layout)


def band_pairs(n: int, w: int) -> int:
    """Pairs (i, j) in [0, n)^2 with |i - j| <= w."""
    if n <= 0:
        return 0
    w = min(max(w, 0), n - 1)
    return n * (2 * w + 1) - w * (w + 1)


def widest_window(kind: str, layout: CallLayout) -> int:
    """The half-width from which mask ``kind`` keeps every pair of ``layout``: ``n_image - 1`` for the 1D
    band (window, arrow, wars), ``max(rows, cols) - 1`` for window2d (whose frames are unrestricted)."""
    if kind == "window2d":
        _, rows, cols = layout.grid if layout.grid else (1, 1, max(layout.n_image, 1))
        return max(rows, cols) - 1
    return max(layout.n_image - 1, 0)


def removes_pairs(method: HeadMethod, layout: CallLayout) -> bool:
    """Whether windowed ``method`` skips any pair of ``layout``; from :func:`widest_window` on, a window is
    full attention with a window's overhead, so the searches leave it out there."""
    return method.base in WINDOWED and method.window < widest_window(method.mask_kind, layout)


def attended_pairs(method: HeadMethod, layout: CallLayout) -> int:
    """Exact attended (query, key) pairs of one head for one sequence (one batch row), before ASC."""
    if not method.computes:
        return 0
    kind = method.mask_kind
    if kind == "full":
        return layout.q_len * layout.k_len
    n_img, n_txt = layout.n_image, layout.n_text
    if kind == "window2d":
        f, rows, cols = layout.grid if layout.grid else (1, 1, n_img)
        image = f * f * band_pairs(rows, method.window) * band_pairs(cols, method.window)
    else:
        image = band_pairs(n_img, method.window)
    text = n_txt * n_txt + (2 * n_txt * n_img if kind == "arrow" else 0)
    return image + text
