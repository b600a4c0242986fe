"""Public entry points: head-wise attention, WA-RS refresh and apply, backend dispatch."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ditlens.errors import DitlensError
from ditlens.kernels.patterns import HeadPlan, TokenLayout, make_head_plan
from ditlens.kernels.reference import (
    headwise_attention_reference,
    warsr_attention_reference,
    windowed_plus_residual_reference,
)
from ditlens.kernels.gluon_backend import check_gluon_inputs, gluon_machine_refusal, headwise_gluon
from ditlens.kernels.torch_backends import flex_available, flex_refusal, headwise_flex, headwise_sdpa
from ditlens.kernels.triton_backend import (
    check_triton_inputs,
    headwise_triton,
    interpreting,
    triton_available,
    warsr_triton,
    warsr_two_pass_triton,
)

BACKENDS: tuple[str, ...] = ("auto", "triton", "gluon", "flex", "sdpa", "reference")


def available_backends() -> list[str]:
    """Backends usable in this process, in the order ``backend="auto"`` prefers them.

    ``"triton"`` needs CUDA (or ``TRITON_INTERPRET=1``, which runs the same kernels on CPU
    tensors through Triton's interpreter); ``"flex"`` needs a torch with FlexAttention
    (compiled on CUDA, eager and slow elsewhere); ``"sdpa"`` and ``"reference"`` always work.
    ``"gluon"`` (a Hopper GPU and Triton >= 3.6; head dim 128, lengths in multiples of 128) is listed
    after ``"triton"``: ``"auto"`` resolves to Triton and :func:`headwise_attention` then hands
    the calls Gluon takes (:func:`ditlens.kernels.gluon_backend.check_gluon_inputs`) to Gluon.
    """
    out = []
    if triton_available() and (interpreting() or torch.cuda.is_available()):
        out.append("triton")
    if gluon_machine_refusal() is None:
        out.append("gluon")
    if flex_available():
        out.append("flex")
    out += ["sdpa", "reference"]
    return out


def resolve_backend(q: torch.Tensor, backend: str = "auto") -> str:
    """The backend a call with ``q`` and ``backend`` runs on.

    ``"auto"``: Triton for float16/bfloat16 CUDA tensors (or CPU tensors when
    ``TRITON_INTERPRET=1``), else FlexAttention on CUDA, else SDPA with a dense mask; of the
    calls resolved to Triton, :func:`headwise_attention` gives those the Gluon kernel takes (head
    dim 128 on Hopper, which depends on the plan too) to Gluon. An explicit backend that cannot take
    the input raises :class:`DitlensError`.
    """
    if backend not in BACKENDS:
        raise DitlensError(f"unknown backend {backend!r}; use one of {list(BACKENDS)}")
    if backend == "auto":
        if check_triton_inputs(q) is None:
            return "triton"
        if q.is_cuda and flex_refusal(q) is None:
            return "flex"
        return "sdpa"
    if backend == "triton":
        reason = check_triton_inputs(q)
        if reason:
            raise DitlensError(f"backend='triton' cannot run this input: {reason}; use backend='auto'")
    if backend == "gluon":
        reason = check_gluon_inputs(q)
        if reason:
            raise DitlensError(f"backend='gluon' cannot run this input: {reason}; use backend='auto'")
    refusal = flex_refusal(q) if backend == "flex" else None
    if refusal:
        raise DitlensError(f"backend='flex' cannot run this input: {refusal}; use backend='sdpa'")
    return backend


def _prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, modes: Sequence[str] | str,
             windows: Sequence[int] | int | None, n_text: int, text_first: bool,
             scale: float | None) -> tuple[HeadPlan, TokenLayout, float]:
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise DitlensError(
            f"q, k, v must all be [B, H, L, D] of one shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise DitlensError("q, k, v must share one dtype and one device")
    _, H, L, D = q.shape
    layout = TokenLayout(L, int(n_text), bool(text_first))
    plan = make_head_plan(modes, windows, H, L)
    return plan, layout, (D ** -0.5 if scale is None else float(scale))


def _takes_gluon(q: torch.Tensor, plan: HeadPlan, layout: TokenLayout, chosen: str, asked: str) -> bool:
    """Whether a call resolved to ``chosen`` (asked for as ``asked``) runs on the Gluon kernel: asked for by
    name (raising when the plan does not fit it), or ``"auto"`` resolved to Triton and the plan fits.
    One plan check per call."""
    if chosen != "gluon" and not (chosen == "triton" and asked == "auto"):
        return False
    reason = check_gluon_inputs(q, plan, layout)
    if reason is not None and chosen == "gluon":
        raise DitlensError(f"backend='gluon' cannot run this plan: {reason}; use backend='auto'")
    return reason is None


def headwise_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                       modes: Sequence[str] | str, windows: Sequence[int] | int | None,
                       n_text: int = 0, text_first: bool = False, cached: torch.Tensor | None = None,
                       scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Multi-head attention where every head has its own sparsity pattern, in one launch.

    Parameters:
        q: Query tensor of shape ``[batch, heads, seq_len, head_dim]`` (any strides with a
            unit stride on ``head_dim`` run without a copy; others are made contiguous).
        k: Key tensor, same shape, dtype and device as ``q``.
        v: Value tensor, same shape, dtype and device as ``q``.
        modes: One of ``"full"``, ``"window"``, ``"arrow"``, ``"skip"`` per head (length
            ``heads``), or one string for all heads. Semantics in :mod:`ditlens.kernels.patterns`:
            ``window`` = image-image band ``|i - j| <= w`` plus text-text pairs;
            ``arrow`` = the band plus every pair with a text query or a text key.
        windows: Half-width ``w >= 0`` per head in tokens (or one int for all heads; ``None``
            when no head is window/arrow). Ignored for full and skip heads; a window at least
            as long as the sequence is the full band.
        n_text: Number of text tokens in ``seq_len`` (0 for image-only self-attention).
        text_first: Text tokens at the start of the sequence (FLUX) if True, at the end
            (SD3) if False.
        cached: Required when any head is ``"skip"``: ``[batch, heads, seq_len, head_dim]``
            whose skip-head slices are copied to the output (other heads are not read).
        scale: Softmax scale; defaults to ``head_dim ** -0.5``.
        backend: ``"auto"`` (Gluon -> Triton -> FlexAttention -> SDPA), ``"triton"``, ``"flex"``,
            ``"sdpa"``, ``"reference"`` (float64 dense, slow) or ``"gluon"`` (Hopper only: head_dim
            128, L a multiple of 128, for window and arrow heads the text tokens first in a multiple
            of 128: FlashAttention-3's schedule, :mod:`ditlens.kernels.gluon_backend`).

    Returns:
        Output tensor of shape ``[batch, heads, seq_len, head_dim]`` in ``q``'s dtype; on the Triton
        backend laid out like ``q`` (``[batch, seq_len, heads, head_dim]`` storage for diffusers'
        views, so merging the heads back is free), otherwise contiguous.
        Softmax statistics are accumulated in float32 by the Triton and Flex backends.
    """
    plan, layout, scale_f = _prepare(q, k, v, modes, windows, n_text, text_first, scale)
    if plan.has_skip and (cached is None or cached.shape != q.shape):
        raise DitlensError("skip heads need cached=<tensor of q's shape [B, H, L, D]> holding their outputs")
    chosen = resolve_backend(q, backend)
    if _takes_gluon(q, plan, layout, chosen, backend):  # FlashAttention-3's schedule: 0.92-0.99x cuDNN for FLUX
        return headwise_gluon(q, k, v, plan, layout, scale_f, cached=cached)
    if chosen == "triton":
        return headwise_triton(q, k, v, plan, layout, scale_f, cached=cached)
    if chosen == "flex":
        return headwise_flex(q, k, v, plan, layout, scale_f, cached=cached)
    if chosen == "sdpa":
        return headwise_sdpa(q, k, v, plan, layout, scale_f, cached=cached)
    return headwise_attention_reference(q, k, v, modes=plan.modes, windows=plan.windows, n_text=n_text,
                                        text_first=text_first, cached=cached, scale=scale_f)


def _windowed_plan(pattern: Sequence[str] | str, windows: Sequence[int] | int, H: int, L: int) -> HeadPlan:
    plan = make_head_plan(pattern, windows, H, L)
    bad = sorted({m for m in plan.modes if m not in ("window", "arrow")})
    if bad:
        raise DitlensError(f"WA-RS windows must be 'window' or 'arrow', got {bad}")
    return plan


def warsr_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, windows: Sequence[int] | int,
                    n_text: int = 0, text_first: bool = False, pattern: Sequence[str] | str = "window",
                    scale: float | None = None, backend: str = "auto",
                    fused: bool = False, full: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """WA-RS refresh step: full attention and its residual over windowed attention.

    Parameters:
        q, k, v: ``[batch, heads, seq_len, head_dim]`` as in :func:`headwise_attention`.
        windows: Half-width ``w`` per head (or one int).
        n_text, text_first: Token layout as in :func:`headwise_attention`.
        pattern: ``"window"`` or ``"arrow"`` per head (or one string): the windowed
            attention ``W`` whose residual is cached.
        scale, backend: As in :func:`headwise_attention`.
        fused: Triton only. ``False`` (default): two launches, full attention then the windowed
            kernel writing ``R = O - W`` in its epilogue. ``True``: one pass in which each score
            block inside the window feeds both softmaxes (no second attention over the window);
            correct, but measured 1.10x (DiT-512) and 1.18x (PixArt-1K) slower than the two
            launches on an H200 (BENCHMARKS.md §2, benchmarks/small_shapes.py).
        full: ``O`` when the caller has it already (e.g. from the model's own attention call),
            ``[batch, heads, seq_len, head_dim]``: then only the windowed pass runs (on Triton or Gluon:
            one launch writing ``R = O - W``) and ``full`` is returned as given.

    Returns:
        ``(full_out, residual)``, both ``[batch, heads, seq_len, head_dim]`` in ``q``'s dtype:
        ``full_out = O`` (ordinary attention) and ``residual = O - W`` (``W`` in float32 before
        the cast; the two-pass form subtracts from ``O`` as stored in ``q``'s dtype). The Gluon
        kernel runs the two-pass form (``"auto"`` gives it the calls it takes, as in
        :func:`headwise_attention`; ``fused`` keeps ``"auto"`` on Triton); the other backends run full
        and windowed attention separately.
    """
    _prepare(q, k, v, "full", 0, n_text, text_first, scale)
    _, H, L, _ = q.shape
    plan = _windowed_plan(pattern, windows, H, L)
    layout = TokenLayout(L, int(n_text), bool(text_first))
    scale_f = q.shape[-1] ** -0.5 if scale is None else float(scale)
    chosen = resolve_backend(q, backend)
    if full is not None and full.shape != q.shape:
        raise DitlensError(f"full must have q's shape {tuple(q.shape)}, got {tuple(full.shape)}")
    if not (fused and backend == "auto") and _takes_gluon(q, plan, layout, chosen, backend):  # R = O - W fused
        if full is None:
            full = headwise_gluon(q, k, v, make_head_plan("full", 0, H, L), layout, scale_f)
        return full, headwise_gluon(q, k, v, plan, layout, scale_f, residual=full, subtract=True)
    if chosen == "triton":
        if full is not None:
            return full, headwise_triton(q, k, v, plan, layout, scale_f, residual=full, subtract=True)
        if fused:
            return warsr_triton(q, k, v, plan, layout, scale_f)
        return warsr_two_pass_triton(q, k, v, plan, layout, scale_f)
    if chosen == "reference" and full is None:
        return warsr_attention_reference(q, k, v, windows=plan.windows, n_text=n_text, text_first=text_first,
                                         pattern=plan.modes, scale=scale_f)
    if full is None:
        full = headwise_attention(q, k, v, modes="full", windows=0, n_text=n_text, text_first=text_first,
                                  scale=scale_f, backend=chosen)
    win = headwise_attention(q, k, v, modes=plan.modes, windows=plan.windows, n_text=n_text,
                             text_first=text_first, scale=scale_f, backend=chosen)
    return full, (full.float() - win.float()).to(q.dtype)


def windowed_plus_residual(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, residual: torch.Tensor, *,
                           windows: Sequence[int] | int, n_text: int = 0, text_first: bool = False,
                           pattern: Sequence[str] | str = "window", scale: float | None = None,
                           backend: str = "auto") -> torch.Tensor:
    """WA-RS apply step: ``W + R`` with the residual added in the kernel's epilogue.

    Parameters:
        q, k, v: ``[batch, heads, seq_len, head_dim]`` as in :func:`headwise_attention`.
        residual: ``R`` from :func:`warsr_attention`, ``[batch, heads, seq_len, head_dim]``
            (any float dtype; added in float32).
        windows, n_text, text_first, pattern, scale, backend: As in :func:`warsr_attention`.

    Returns:
        ``W + R``, ``[batch, heads, seq_len, head_dim]`` in ``q``'s dtype.
    """
    _prepare(q, k, v, "full", 0, n_text, text_first, scale)
    _, H, L, _ = q.shape
    if residual.shape != q.shape:
        raise DitlensError(f"residual must have q's shape {tuple(q.shape)}, got {tuple(residual.shape)}")
    plan = _windowed_plan(pattern, windows, H, L)
    layout = TokenLayout(L, int(n_text), bool(text_first))
    scale_f = q.shape[-1] ** -0.5 if scale is None else float(scale)
    chosen = resolve_backend(q, backend)
    if _takes_gluon(q, plan, layout, chosen, backend):  # W + R in the epilogue
        return headwise_gluon(q, k, v, plan, layout, scale_f, residual=residual)
    if chosen == "triton":
        return headwise_triton(q, k, v, plan, layout, scale_f, residual=residual)
    if chosen == "reference":
        return windowed_plus_residual_reference(q, k, v, residual, windows=plan.windows, n_text=n_text,
                                                text_first=text_first, pattern=plan.modes, scale=scale_f)
    win = headwise_attention(q, k, v, modes=plan.modes, windows=plan.windows, n_text=n_text,
                             text_first=text_first, scale=scale_f, backend=chosen)
    return (win.float() + residual.float()).to(q.dtype)
