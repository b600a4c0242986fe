"""Head-wise attention patterns: token layout, per-pattern mask functions, exact pair counts.

Everything here is pure and small, so the dense reference, FlexAttention's block masks,
the FLOPs accounting and the tests all derive from the same definitions.

Token layout (DESIGN.md §5). A sequence of ``L`` tokens holds ``n_text`` text tokens at the
start (``text_first=True``, FLUX) or at the end (``text_first=False``, SD3) and image tokens
everywhere else; image tokens are one contiguous run ``[image_start, image_end)``, so the
image-index distance ``|i - j|`` equals the token-index distance.

Patterns, per head, with half-width ``w`` (a query token ``q`` and a key token ``k``):

``full``
    every pair.
``window``
    image-image pairs with ``|q - k| <= w``, plus every text-text pair; no pair mixes text and
    image. With ``n_text == 0`` (self-attention-only models, every token an image token) this
    is exactly DESIGN §5's 1D band. With text present the band stays on the image tokens and
    text tokens keep attending among themselves, so every query row keeps at least one key
    (itself) and ``window(w)`` is ``arrow(w)`` minus the text<->image pairs.
``arrow``
    image-image pairs with ``|q - k| <= w``, plus every pair with a text query or a text key
    (V2's arrow attention for joint-attention MMDiTs).
``skip``
    no pair is computed; the head's output is copied from a cache (V2's head-wise output
    cache, V1's AST). It contributes no attended pairs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ditlens.errors import DitlensError

MODES: tuple[str, ...] = ("full", "window", "arrow", "skip")
# Integer codes shared with the Triton kernels (keep in sync with _triton_impl.py).
MODE_CODE: dict[str, int] = {"full": 0, "window": 1, "arrow": 2, "skip": 3}

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TokenLayout:
    """Where the text and the image tokens sit in a sequence of ``seq_len`` tokens."""

    seq_len: int
    n_text: int = 0
    text_first: bool = False

    def __post_init__(self) -> None:
        if self.seq_len < 1:
            raise DitlensError(f"sequence length must be positive, got {self.seq_len}")
        if not 0 <= self.n_text <= self.seq_len:
            raise DitlensError(
                f"n_text={self.n_text} does not fit a sequence of {self.seq_len} tokens; "
                "pass 0 <= n_text <= L"
            )

    @property
    def image_start(self) -> int:
        return self.n_text if self.text_first else 0

    @property
    def image_end(self) -> int:
        return self.seq_len if self.text_first else self.seq_len - self.n_text

    @property
    def n_image(self) -> int:
        return self.seq_len - self.n_text

    @property
    def text_start(self) -> int:
        return 0 if self.text_first else self.seq_len - self.n_text

    @property
    def text_end(self) -> int:
        return self.n_text if self.text_first else self.seq_len


@dataclass(frozen=True)
class HeadPlan:
    """A validated per-head plan: one mode and one half-width per head (windows clamped to L)."""

    modes: tuple[str, ...]
    windows: tuple[int, ...]

    @property
    def n_heads(self) -> int:
        return len(self.modes)

    @property
    def mode_codes(self) -> tuple[int, ...]:
        return tuple(MODE_CODE[m] for m in self.modes)

    @property
    def has_skip(self) -> bool:
        return "skip" in self.modes

    @property
    def has_full(self) -> bool:
        return "full" in self.modes

    @property
    def all_full(self) -> bool:
        return all(m == "full" for m in self.modes)


def make_head_plan(modes: Sequence[str] | str, windows: Sequence[int] | int | None, n_heads: int,
                   seq_len: int) -> HeadPlan:
    """Check ``modes``/``windows`` against ``n_heads`` and return them as a :class:`HeadPlan`.

    A single string or int is broadcast to every head. Windows are clamped to ``seq_len``
    (a window at least as wide as the sequence is the full band) and ignored (set to 0) for
    ``full`` and ``skip`` heads.
    """
    # a model calls with the same few plans thousands of times: check each once
    key_modes = modes if isinstance(modes, str) else tuple(modes)
    key_windows = windows if windows is None or isinstance(windows, int) else tuple(windows)
    try:
        return _head_plan(key_modes, key_windows, n_heads, seq_len)
    except TypeError:  # unhashable entries (e.g. tensors): check without the cache
        return _head_plan.__wrapped__(key_modes, key_windows, n_heads, seq_len)


@functools.lru_cache(maxsize=1024)
def _head_plan(modes: tuple[str, ...] | str, windows: tuple[int, ...] | int | None, n_heads: int,
               seq_len: int) -> HeadPlan:
    mode_list = [modes] * n_heads if isinstance(modes, str) else list(modes)
    if len(mode_list) != n_heads:
        raise DitlensError(f"modes has {len(mode_list)} entries but the input has {n_heads} heads; "
                           "pass one mode per head")
    bad = sorted({m for m in mode_list if m not in MODE_CODE})
    if bad:
        raise DitlensError(f"unknown attention mode(s) {bad}; use one of {list(MODES)}")
    if windows is None:
        windows = 0
    win_list = [windows] * n_heads if isinstance(windows, int) else [int(w) for w in windows]
    if len(win_list) != n_heads:
        raise DitlensError(f"windows has {len(win_list)} entries but the input has {n_heads} heads; "
                           "pass one half-width per head")
    out_w = []
    for m, w in zip(mode_list, win_list):
        if m in ("window", "arrow"):
            if w < 0:
                raise DitlensError(f"window half-width must be >= 0, got {w}")
            out_w.append(min(int(w), seq_len))
        else:
            out_w.append(0)
    return HeadPlan(tuple(mode_list), tuple(out_w))


# ----------------------------------------------------------------------------------------
# Mask functions (attention-gym style): pure, elementwise on broadcastable index tensors.
# ----------------------------------------------------------------------------------------

def is_image_token(idx: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """True where token index ``idx`` is an image token."""
    return (idx >= layout.image_start) & (idx < layout.image_end)


def full_pattern(q_idx: torch.Tensor, kv_idx: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Every pair attends."""
    return (q_idx >= 0) & (kv_idx >= 0)


def skip_pattern(q_idx: torch.Tensor, kv_idx: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """No pair is computed (the output comes from a cache)."""
    return (q_idx < 0) & (kv_idx < 0)


def window_pattern(q_idx: torch.Tensor, kv_idx: torch.Tensor, w: int | torch.Tensor,
                   layout: TokenLayout) -> torch.Tensor:
    """Image-image band ``|q - k| <= w`` plus text-text pairs."""
    q_img = is_image_token(q_idx, layout)
    k_img = is_image_token(kv_idx, layout)
    band = q_img & k_img & ((q_idx - kv_idx).abs() <= w)
    return band | (~q_img & ~k_img)


def arrow_pattern(q_idx: torch.Tensor, kv_idx: torch.Tensor, w: int | torch.Tensor,
                  layout: TokenLayout) -> torch.Tensor:
    """Image-image band ``|q - k| <= w`` plus every pair with a text query or a text key."""
    q_img = is_image_token(q_idx, layout)
    k_img = is_image_token(kv_idx, layout)
    band = q_img & k_img & ((q_idx - kv_idx).abs() <= w)
    return band | ~(q_img & k_img)


def head_pattern(mode: str, w: int, q_idx: torch.Tensor, kv_idx: torch.Tensor,
                 layout: TokenLayout) -> torch.Tensor:
    """The pattern of one head in ``mode`` with half-width ``w``."""
    if mode == "full":
        return full_pattern(q_idx, kv_idx, layout)
    if mode == "window":
        return window_pattern(q_idx, kv_idx, w, layout)
    if mode == "arrow":
        return arrow_pattern(q_idx, kv_idx, w, layout)
    if mode == "skip":
        return skip_pattern(q_idx, kv_idx, layout)
    raise DitlensError(f"unknown attention mode {mode!r}; use one of {list(MODES)}")


def headwise_mask_mod(plan: HeadPlan, layout: TokenLayout, device: torch.device | str = "cpu") -> MaskMod:
    """A FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` for a whole per-head plan.

    Per-head mode codes and windows are looked up from small tensors, so one compiled
    FlexAttention kernel serves every plan of the same shape. Skip heads attend nothing
    (their blocks are empty and skipped); the caller fills them from the cache.
    """
    codes = torch.tensor(plan.mode_codes, dtype=torch.int32, device=device)
    wins = torch.tensor(plan.windows, dtype=torch.int32, device=device)
    bounds = torch.tensor([layout.image_start, layout.image_end], dtype=torch.int32, device=device)
    return headwise_mask_mod_from_tensors(codes, wins, bounds)


def headwise_mask_mod_from_tensors(codes: torch.Tensor, wins: torch.Tensor, bounds: torch.Tensor) -> MaskMod:
    """:func:`headwise_mask_mod` over given tensors: mode codes ``[H]``, windows ``[H]`` and
    ``bounds = [image_start, image_end]`` (int32). Updating them in place changes the pattern
    without a new function, hence without recompiling FlexAttention."""

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        code = codes[h]
        img_lo = bounds[0]
        img_hi = bounds[1]
        q_img = (q_idx >= img_lo) & (q_idx < img_hi)
        k_img = (kv_idx >= img_lo) & (kv_idx < img_hi)
        band = q_img & k_img & ((q_idx - kv_idx).abs() <= wins[h])
        text_text = ~q_img & ~k_img
        mixed = q_img ^ k_img
        return (code == 0) | ((code == 1) & (band | text_text)) | ((code == 2) & (band | text_text | mixed))

    return mask_mod


def attention_mask(modes: Sequence[str] | str, windows: Sequence[int] | int | None, seq_len: int, *,
                   n_text: int = 0, text_first: bool = False, n_heads: int | None = None,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """The dense boolean mask ``[H, L, L]`` (``True`` = the query row attends the key column).

    ``modes``/``windows`` as in :func:`ditlens.kernels.headwise_attention`; ``n_heads`` is only
    needed when ``modes`` is a single string. Skip heads get an all-``False`` mask.
    """
    if n_heads is None:
        if isinstance(modes, str):
            raise DitlensError("attention_mask needs n_heads when modes is a single string")
        n_heads = len(modes)
    layout = TokenLayout(seq_len, n_text, text_first)
    plan = make_head_plan(modes, windows, n_heads, seq_len)
    idx = torch.arange(seq_len, device=device)
    q_idx, kv_idx = idx[:, None], idx[None, :]
    return torch.stack([head_pattern(m, w, q_idx, kv_idx, layout) for m, w in zip(plan.modes, plan.windows)])


# ----------------------------------------------------------------------------------------
# Exact pair counts (analytic) for FLOPs accounting.
# ----------------------------------------------------------------------------------------

def band_pairs(n: int, w: int) -> int:
    """Pairs ``(i, j)`` in ``[0, n)^2`` with ``|i - j| <= w``: ``n(2w+1) - w(w+1)`` for ``w < n``."""
    if n <= 0:
        return 0
    w = min(w, n - 1)
    return n * (2 * w + 1) - w * (w + 1)


def head_attended_pairs(mode: str, w: int, layout: TokenLayout) -> int:
    """Exact number of attended (query, key) pairs of one head."""
    n_img, n_txt = layout.n_image, layout.n_text
    if mode == "full":
        return layout.seq_len * layout.seq_len
    if mode == "skip":
        return 0
    band = band_pairs(n_img, w)
    if mode == "window":
        return band + n_txt * n_txt
    if mode == "arrow":
        return band + n_txt * n_txt + 2 * n_txt * n_img
    raise DitlensError(f"unknown attention mode {mode!r}; use one of {list(MODES)}")


def attended_pairs(modes: Sequence[str] | str, windows: Sequence[int] | int | None, seq_len: int, *,
                   n_text: int = 0, text_first: bool = False, n_heads: int | None = None) -> list[int]:
    """Per-head exact count of attended (query, key) pairs; equals ``attention_mask(...).sum((1, 2))``.

    Attention-core FLOPs of a head are ``4 * head_dim * pairs`` (DESIGN §5); skip heads count 0.
    """
    if n_heads is None:
        if isinstance(modes, str):
            raise DitlensError("attended_pairs needs n_heads when modes is a single string")
        n_heads = len(modes)
    layout = TokenLayout(seq_len, n_text, text_first)
    plan = make_head_plan(modes, windows, n_heads, seq_len)
    return [head_attended_pairs(m, w, layout) for m, w in zip(plan.modes, plan.windows)]


def window_for_sparsity(n_image: int, sparsity: float) -> int:
    """Half-width ``w`` whose band keeps the fraction ``1 - sparsity`` of the image-image pairs.

    Solves ``n(2w+1) - w(w+1) = (1 - s) n^2`` for ``w`` and rounds to the nearest count; the
    exact kept fraction is ``band_pairs(n, w) / n**2``.
    """
    if not 0.0 <= sparsity < 1.0:
        raise DitlensError(f"sparsity must be in [0, 1), got {sparsity}")
    if n_image <= 1 or sparsity == 0.0:
        return max(n_image - 1, 0)
    target = (1.0 - sparsity) * n_image * n_image
    # w^2 + (1 - 2n) w + (target - n) = 0, smaller root
    b = 2 * n_image - 1
    disc = b * b - 4.0 * (target - n_image)
    w_real = (b - math.sqrt(max(disc, 0.0))) / 2.0
    candidates = {max(0, min(n_image - 1, int(math.floor(w_real)) + d)) for d in (-1, 0, 1, 2)}
    return min(candidates, key=lambda w: (abs(band_pairs(n_image, w) - target), w))
