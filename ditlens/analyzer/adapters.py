"""Model adapters: which modules are attention, how their tokens are laid out, how CFG is batched.

An adapter describes a diffusers transformer class without touching its code. The capture
hooks (:mod:`ditlens.analyzer.capture`) intercept every ``scaled_dot_product_attention`` call
an attention module makes and hand the calls to the adapter's :meth:`ModelAdapter.group`, which
returns the per-head tensors in one canonical layout:

    image tokens  [batch, heads, frames*height*width, head_dim]   (frame-major, then rows, then cols)
    text tokens   [batch, heads, n_text, head_dim]

Everything is read from the module classes, the config and the tensors seen at run time, never
from hard-coded head counts or text lengths.

Adding a model ditlens does not know::

    from ditlens.analyzer import AttentionLayer, ModelAdapter, default_registry

    class MyAdapter(ModelAdapter):
        family = "mymodel"
        transformer_classes = ("MyTransformer",)
        cfg_layout = "batched_uncond_first"

        def layer_kind(self, name, module):      # "self", "cross", "joint" or "temporal"
            return "joint"
        text_position = "last"                    # for joint attention: text tokens after image tokens

    registry = default_registry()
    registry.register(MyAdapter())
    ditlens.analyzer.profile(pipe, prompts, out="t.h5", registry=registry)

The CLI loads extra adapters with ``--adapter package.module:MyAdapter`` or from installed
packages that declare an entry point in the ``ditlens.adapters`` group.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from importlib import import_module, metadata
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from ditlens.errors import DitlensError, UnknownModelError

# The CFG layouts a pipeline can use (DESIGN §2).
CFG_LAYOUTS = ("batched_cond_first", "batched_uncond_first", "separate_cond_first", "none")
LAYER_KINDS = ("self", "cross", "joint", "temporal")
TENSOR_NAMES = ("q", "k", "v", "o")


@dataclass(frozen=True)
class AttentionLayer:
    """One attention module of the transformer, in the order the trace lists layers."""

    name: str  # qualified module name, e.g. "transformer_blocks.3.attn1"
    kind: str  # one of LAYER_KINDS
    text_position: str = "none"  # joint attention: "first" or "last"; else "none"


@dataclass(frozen=True)
class SDPACall:
    """Tensors of one attention product, as torch's SDPA saw them: [batch', heads, tokens, head_dim]."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor


@dataclass
class GroupedTensors:
    """One layer's tensors from one forward, split by token group in canonical layout.

    ``image[name]`` is [batch, heads, n_image, head_dim]; ``text[name]`` is
    [batch, heads, n_text, head_dim], or a list of [1, heads, n_text_b, head_dim] when samples of
    the batch carry different text lengths (Mochi drops padding per sample).
    """

    image: dict[str, torch.Tensor] = field(default_factory=dict)
    text: dict[str, torch.Tensor | list[torch.Tensor]] = field(default_factory=dict)


@dataclass(frozen=True)
class ForwardInfo:
    """What the transformer-level hook reads off each forward call.

    ``timestep`` is the forward's own timestep argument (a number or a tensor, possibly on the
    GPU). It is read as a number only through :attr:`timestep_value`, and only where needed:
    reading a device tensor makes the host wait for the device, and a wait at every forward keeps
    the host from queueing the next step while the GPU runs this one."""

    batch: int
    grid: tuple[int, int, int]  # frames, height, width in tokens
    timestep: Any

    @property
    def timestep_value(self) -> float:
        return timestep_float(self.timestep)


class ModelAdapter:
    """Describes one transformer family. Subclass and override what differs.

    Class attributes:
        family: short name used in traces and plans.
        transformer_classes: class names this adapter claims.
        cfg_layout: how the family's pipeline runs classifier-free guidance (CFG_LAYOUTS).
        text_position: where text tokens sit in joint attention ("first"/"last"/"none").
        pipeline_kind: "text" (prompt strings) or "class" (class labels).
        attends_per_sample: the attention processor makes one SDPA call per batch sample
            (Mochi), so the cond and uncond rows never meet in one call and CFG share (ASC)
            cannot run; the searches and the influence recorder leave it out.
        text_tokens_per_prompt: the pipeline trims the text to each prompt's length (Latte's
            masked features, Mochi's valid tokens), so a trace's text-token count is the first
            prompt's and runs of other prompts (resume, merge) may differ in it.
        batch_changes_text: a multi-prompt pipeline call encodes each prompt's text differently
            from a one-prompt call (Latte keeps every token of a multi-prompt call and zeroes the
            padding without masking it; alone, a prompt keeps only its own tokens). A search, which
            calibrates on one batched call, gives every prompt its one-prompt encoding
            (:meth:`one_prompt_text`) and masks the padding (:meth:`text_mask_kwargs`).
    """

    family: str = ""
    transformer_classes: tuple[str, ...] = ()
    cfg_layout: str = "batched_uncond_first"
    text_position: str = "none"
    pipeline_kind: str = "text"
    attends_per_sample: bool = False
    text_tokens_per_prompt: bool = False
    batch_changes_text: bool = False

    # -- discovery ---------------------------------------------------------------------------
    def matches(self, transformer: nn.Module) -> bool:
        names = {cls.__name__ for cls in type(transformer).__mro__}
        return any(name in names for name in self.transformer_classes)

    def is_attention_module(self, module: nn.Module) -> bool:
        """Attention modules are found by class: diffusers' legacy ``Attention``, every
        ``AttentionModuleMixin`` (the dispatcher-based ones: FluxAttention, ...) and the
        stand-alone processor-driven classes such as ``MochiAttention``."""
        from diffusers.models.attention import AttentionModuleMixin
        from diffusers.models.attention_processor import Attention

        if isinstance(module, (Attention, AttentionModuleMixin)):
            return True
        return type(module).__name__.endswith("Attention") and hasattr(module, "processor") and hasattr(module, "heads")

    def layer_kind(self, name: str, module: nn.Module) -> str:
        """Self, cross or joint, read off the module: cross attention projects a different
        input width for keys; joint attention has added (context) projections."""
        if getattr(module, "add_q_proj", None) is not None or getattr(module, "add_k_proj", None) is not None:
            return "joint"
        if getattr(module, "is_cross_attention", False):
            return "cross"
        return "self"

    def attention_layers(self, transformer: nn.Module) -> list[AttentionLayer]:
        layers = []
        for name, module in transformer.named_modules():
            if name and self.is_attention_module(module):
                kind = self.layer_kind(name, module)
                if kind not in LAYER_KINDS:
                    raise DitlensError(f"adapter {self.family!r} gave layer {name} kind {kind!r}; use one of {LAYER_KINDS}")
                layers.append(AttentionLayer(name, kind, self.text_position if kind == "joint" else "none"))
        return self.order_layers(layers)

    def order_layers(self, layers: list[AttentionLayer]) -> list[AttentionLayer]:
        """Execution order where it differs from registration order."""
        return layers

    def heads(self, transformer: nn.Module) -> tuple[int, int]:
        """(heads, head_dim) of the attention layers; all layers must agree."""
        found = set()
        for layer in self.attention_layers(transformer):
            module = transformer.get_submodule(layer.name)
            heads = getattr(module, "heads", None)
            inner = getattr(module, "inner_dim", None)
            if heads is None or inner is None:
                raise DitlensError(f"attention module {layer.name} has no heads/inner_dim attribute; give the adapter a heads() method")
            found.add((int(heads), int(inner) // int(heads)))
        if len(found) != 1:
            raise DitlensError(f"attention layers disagree on (heads, head_dim): {sorted(found)}; ditlens needs one head layout per model")
        return found.pop()

    # -- what a forward looks like ------------------------------------------------------------
    def patch_size(self, transformer: nn.Module) -> tuple[int, int]:
        """(temporal, spatial) patch size from the config."""
        cfg = transformer.config
        p = int(getattr(cfg, "patch_size", 1) or 1)
        pt = int(getattr(cfg, "patch_size_t", 1) or 1)
        return pt, p

    def forward_info(self, transformer: nn.Module, args: tuple, kwargs: dict) -> ForwardInfo:
        """Batch size, token grid and timestep of one transformer forward."""
        hidden = _argument(transformer, args, kwargs, "hidden_states")
        timestep = _argument(transformer, args, kwargs, "timestep")
        pt, p = self.patch_size(transformer)
        shape = tuple(hidden.shape)
        if len(shape) == 4:  # [B, C, H, W]
            grid = (1, shape[2] // p, shape[3] // p)
        elif len(shape) == 5:  # [B, C, F, H, W] (Latte, Mochi); CogVideoX overrides (frames second)
            grid = (shape[2] // pt, shape[3] // p, shape[4] // p)
        else:
            raise DitlensError(f"{self.family}: cannot read the token grid from hidden_states of shape {shape}")
        return ForwardInfo(batch=shape[0], grid=grid, timestep=timestep)

    def grid_for_size(self, transformer: nn.Module, height: int, width: int, frames: int = 1,
                      pipeline: Any = None) -> tuple[int, int, int]:
        """Token grid for an output size, before running (size estimates, plan checks)."""
        pt, _ = self.patch_size(transformer)
        per_token = self.pixels_per_token(transformer, pipeline)
        return (max(1, frames // pt), height // per_token, width // per_token)

    def frame_kwargs(self, pipeline: Any, token_frames: int) -> dict[str, int]:
        """The pipeline argument that gives ``token_frames`` frames of tokens: its frame parameter
        (``num_frames`` or ``video_length``) at the fewest video frames that do. Empty for a pipeline
        without one (an image model)."""
        params = inspect.signature(pipeline.__call__).parameters
        name = next((n for n in ("num_frames", "video_length") if n in params), None)
        if name is None:
            return {}
        transformer = pipeline.transformer
        for frames in range(1, 64 * token_frames + 64):
            if self.grid_for_size(transformer, 64, 64, frames, pipeline)[0] == token_frames:
                return {name: frames}
        raise DitlensError(f"{self.family}: no frame count gives {token_frames} frames of tokens; pass it with --call-arg")

    def vae_scale(self, transformer: nn.Module) -> int:
        return 8

    def pixels_per_token(self, transformer: nn.Module, pipeline: Any) -> int:
        """Output pixels along one side of a token: VAE factor times patch size."""
        vae = getattr(pipeline, "vae_scale_factor_spatial", None) or getattr(pipeline, "vae_scale_factor", None)
        if vae is None and pipeline is not None:
            model = getattr(pipeline, "vae", None)
            blocks = getattr(getattr(model, "config", None), "block_out_channels", None)
            if model is None:
                vae = 1  # a pixel-space pipeline (no VAE), like ditlens's embedded models
            elif blocks:  # a pipeline without the attribute (DiTPipeline): diffusers' rule for AutoencoderKL
                vae = 2 ** (len(blocks) - 1)
        return int(vae or self.vae_scale(transformer)) * self.patch_size(transformer)[1]

    # -- token layout -------------------------------------------------------------------------
    def group(self, layer: AttentionLayer, calls: Sequence[SDPACall], info: ForwardInfo) -> GroupedTensors:
        """Canonical per-group tensors of one layer from the SDPA calls it made in one forward."""
        if not calls:
            raise DitlensError(
                f"attention layer {layer.name} ran without a torch scaled_dot_product_attention call: "
                "use diffusers' native attention backend (the default) or give the adapter a group() method"
            )
        n_image = info.grid[0] * info.grid[1] * info.grid[2]
        if layer.kind == "joint":
            return _group_joint(layer, calls, n_image)
        if len(calls) != 1:
            raise DitlensError(f"layer {layer.name}: expected one attention product per forward, saw {len(calls)}")
        call = calls[0]
        if layer.kind == "temporal":
            return GroupedTensors(image={n: temporal_to_canonical(getattr(call, n), info.batch) for n in TENSOR_NAMES})
        if layer.kind == "self":
            return GroupedTensors(image={n: frames_to_canonical(getattr(call, n), info.batch) for n in TENSOR_NAMES})
        # cross: queries (and outputs) are image tokens, keys/values text tokens
        return GroupedTensors(
            image={n: frames_to_canonical(getattr(call, n), info.batch) for n in ("q", "o")},
            text={n: _first_frame(getattr(call, n), info) for n in ("k", "v")},
        )

    # -- pipelines ----------------------------------------------------------------------------
    def pipeline_cfg_layout(self, pipeline: Any) -> str:
        """A pipeline may declare its own order (``_ditlens_cfg_layout``), e.g. ditlens's zoo."""
        return str(getattr(pipeline, "_ditlens_cfg_layout", self.cfg_layout))

    def runs_separate_cfg(self, call_kwargs: dict[str, Any]) -> bool:
        """Whether a pipeline call with ``call_kwargs`` runs a cond and then an uncond transformer
        forward at every step (``separate_cond_first``) rather than one forward."""
        return False

    def separate_cfg_output(self, transformer: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        """An empty (NaN) tensor shaped like the transformer's output for a cond forward called
        with ``args``/``kwargs``, for a search that answers it only once the uncond forward came."""
        raise DitlensError(f"{type(self).__name__} does not run separate cond/uncond forwards")

    def one_prompt_text(self, pipeline: Any, prompts: Sequence[str], call_kwargs: dict[str, Any]
                        ) -> tuple[dict[str, Any], torch.Tensor] | None:
        """For a ``batch_changes_text`` pipeline: the multi-prompt ``call_kwargs`` changed so that
        every prompt gets the text encoding a one-prompt call gives it (padded to the longest), and
        the bool mask ``[prompts, text tokens]`` of its own tokens. None when the batched call
        already encodes each prompt as alone."""
        return None

    def text_mask_kwargs(self, mask: torch.Tensor, grid: tuple[int, int, int]) -> dict[str, Any]:
        """Transformer forward arguments that hide the text padding ``mask`` (bool, ``[rows, text
        tokens]``, one row per batch row of the forward) from attention."""
        return {}

    def call_kwargs(self, pipeline: Any, prompt: str, steps: int, guidance: float | None,
                    height: int | None, width: int | None, generator: torch.Generator) -> dict[str, Any]:
        """Keyword arguments of one pipeline call for one prompt (one image)."""
        params = inspect.signature(pipeline.__call__).parameters
        kwargs: dict[str, Any] = {"num_inference_steps": steps, "generator": generator}
        if guidance is not None:
            kwargs["guidance_scale"] = guidance
        if self.pipeline_kind == "class":
            kwargs["class_labels"] = [_class_label(pipeline, prompt)]
        else:
            kwargs["prompt"] = prompt
            if "num_images_per_prompt" in params:
                kwargs["num_images_per_prompt"] = 1
        if height is not None and "height" in params:
            kwargs["height"] = height
        if width is not None and "width" in params:
            kwargs["width"] = width
        if "output_type" in params:
            # Statistics need only the denoising loop: skip the VAE decode where there is one.
            kwargs["output_type"] = "latent" if getattr(pipeline, "vae", None) is not None else "np"
        return kwargs


@functools.lru_cache(maxsize=64)
def _forward_parameters(cls: type) -> tuple[str, ...]:
    return tuple(p for p in inspect.signature(cls.forward).parameters if p != "self")


def _argument(transformer: nn.Module, args: tuple, kwargs: dict, name: str) -> Any:
    if name in kwargs:
        return kwargs[name]
    params = _forward_parameters(type(transformer))
    if name in params and params.index(name) < len(args):
        return args[params.index(name)]
    raise DitlensError(f"{type(transformer).__name__}.forward was called without {name!r}; ditlens reads it to track steps and tokens")


def timestep_snapshot(timestep: Any) -> Any:
    """The first element of a timestep argument as a copy on its device (no host-device wait), for
    readers that keep it past the forward (a pipeline may reuse its timestep tensor in place)."""
    if isinstance(timestep, torch.Tensor):
        return timestep.detach().reshape(-1)[:1].clone() if timestep.numel() else float("nan")
    return timestep


def timestep_float(timestep: Any) -> float:
    """A timestep argument (number or tensor) as one number; a device tensor is read back."""
    if isinstance(timestep, torch.Tensor):
        return float(timestep.reshape(-1)[0].item()) if timestep.numel() else float("nan")
    return float(timestep)


def _class_label(pipeline: Any, prompt: str) -> int:
    text = str(prompt).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    if hasattr(pipeline, "get_label_ids"):
        try:
            return int(pipeline.get_label_ids([text])[0])
        except (KeyError, ValueError) as err:
            # diffusers' message lists every label (25 KB for ImageNet): name a few close ones instead
            import difflib

            names = [str(n) for n in getattr(pipeline, "labels", {}) or {}]
            close = difflib.get_close_matches(text, names, n=3, cutoff=0.5)
            if not names:
                raise DitlensError(f"unknown class label {text!r}: {str(err).splitlines()[0][:200]}") from None
            hint = f"; close: {', '.join(repr(c) for c in close)}" if close else ""
            raise DitlensError(f"unknown class label {text!r}: give a class number or one of the model's {len(names)} "
                               f"label names{hint}") from None
    raise DitlensError(f"class-conditional pipeline {type(pipeline).__name__} needs integer class labels, got {text!r}")


def frames_to_canonical(x: torch.Tensor, batch: int) -> torch.Tensor:
    """[batch*frames, H, hw, D] (frames folded into the batch, Latte's spatial blocks) -> [batch, H, frames*hw, D]."""
    bf, h, n, d = x.shape
    frames = bf // batch
    if frames == 1:
        return x
    return x.reshape(batch, frames, h, n, d).transpose(1, 2).reshape(batch, h, frames * n, d)


def _first_frame(x: torch.Tensor, info: ForwardInfo) -> torch.Tensor:
    """Text keys/values repeated once per frame: keep frame 0."""
    bf = x.shape[0]
    frames = bf // info.batch
    return x if frames == 1 else x.reshape(info.batch, frames, *x.shape[1:])[:, 0]


def temporal_to_canonical(x: torch.Tensor, batch: int) -> torch.Tensor:
    """[batch*hw, H, frames, D] (spatial positions folded into the batch) -> [batch, H, frames*hw, D]."""
    bhw, h, f, d = x.shape
    hw = bhw // batch
    return x.reshape(batch, hw, h, f, d).permute(0, 2, 3, 1, 4).reshape(batch, h, f * hw, d)


def _split_joint(x: torch.Tensor, n_image: int, text_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    n_text = x.shape[2] - n_image
    if n_text < 0:
        raise DitlensError(f"joint attention saw {x.shape[2]} tokens but the grid has {n_image} image tokens")
    if text_first:
        return x[:, :, n_text:], x[:, :, :n_text]
    return x[:, :, :n_image], x[:, :, n_image:]


def _group_joint(layer: AttentionLayer, calls: Sequence[SDPACall], n_image: int) -> GroupedTensors:
    text_first = layer.text_position == "first"
    out = GroupedTensors()
    for name in TENSOR_NAMES:
        parts = [_split_joint(getattr(c, name), n_image, text_first) for c in calls]
        out.image[name] = parts[0][0] if len(parts) == 1 else torch.cat([p[0] for p in parts])
        texts = [p[1] for p in parts]
        if len(texts) == 1:
            out.text[name] = texts[0]
        elif len({t.shape[2] for t in texts}) == 1:
            out.text[name] = torch.cat(texts)
        else:
            out.text[name] = texts
    return out


# --------------------------------------------------------------------------------------------
# The seven families of DESIGN §2
# --------------------------------------------------------------------------------------------


class DiTAdapter(ModelAdapter):
    family = "dit"
    transformer_classes = ("DiTTransformer2DModel",)
    cfg_layout = "batched_cond_first"  # DiTPipeline: cat([labels, null])
    pipeline_kind = "class"


class PixArtAdapter(ModelAdapter):
    family = "pixart"
    transformer_classes = ("PixArtTransformer2DModel",)
    cfg_layout = "batched_uncond_first"


class SD3Adapter(ModelAdapter):
    family = "sd3"
    transformer_classes = ("SD3Transformer2DModel",)
    cfg_layout = "batched_uncond_first"
    text_position = "last"  # JointAttnProcessor2_0: cat([image, context])


class FluxAdapter(ModelAdapter):
    family = "flux"
    transformer_classes = ("FluxTransformer2DModel",)
    # Guidance-distilled: no CFG. With true_cfg_scale > 1 the pipeline runs cond, then uncond.
    cfg_layout = "separate_cond_first"
    text_position = "first"

    def layer_kind(self, name: str, module: nn.Module) -> str:
        # Single-stream blocks get text and image already concatenated: joint too.
        return "joint"

    def runs_separate_cfg(self, call_kwargs: dict[str, Any]) -> bool:
        # FluxPipeline: do_true_cfg = true_cfg_scale > 1 and a negative prompt (or its embeddings)
        negative = call_kwargs.get("negative_prompt") is not None or (
            call_kwargs.get("negative_prompt_embeds") is not None
            and call_kwargs.get("negative_pooled_prompt_embeds") is not None)
        return float(call_kwargs.get("true_cfg_scale") or 1.0) > 1.0 and negative

    def separate_cfg_output(self, transformer: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        hidden = _argument(transformer, args, kwargs, "hidden_states")  # [B, tokens, channels]
        return hidden.new_full(tuple(hidden.shape[:-1]) + (transformer.proj_out.out_features,), float("nan"))

    def forward_info(self, transformer: nn.Module, args: tuple, kwargs: dict) -> ForwardInfo:
        hidden = _argument(transformer, args, kwargs, "hidden_states")
        timestep = _argument(transformer, args, kwargs, "timestep")
        img_ids = _argument(transformer, args, kwargs, "img_ids")
        ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        rows = int(ids[:, 1].max().item()) - int(ids[:, 1].min().item()) + 1
        cols = int(ids[:, 2].max().item()) - int(ids[:, 2].min().item()) + 1
        if rows * cols != hidden.shape[1]:
            rows, cols = 1, hidden.shape[1]
        return ForwardInfo(batch=hidden.shape[0], grid=(1, rows, cols), timestep=timestep)

    def pixels_per_token(self, transformer, pipeline):
        return 2 * super().pixels_per_token(transformer, pipeline)  # latents are packed 2x2


class CogVideoXAdapter(ModelAdapter):
    family = "cogvideox"
    transformer_classes = ("CogVideoXTransformer3DModel",)
    cfg_layout = "batched_uncond_first"
    text_position = "first"  # CogVideoXAttnProcessor2_0: cat([text, video]) through shared projections

    def layer_kind(self, name, module):
        return "joint"

    def forward_info(self, transformer, args, kwargs):
        hidden = _argument(transformer, args, kwargs, "hidden_states")  # [B, F, C, H, W]
        timestep = _argument(transformer, args, kwargs, "timestep")
        pt, p = self.patch_size(transformer)
        b, f, _, h, w = hidden.shape
        return ForwardInfo(batch=b, grid=(max(1, f // pt), h // p, w // p), timestep=timestep)

    def grid_for_size(self, transformer, height, width, frames=1, pipeline=None):
        pt, _ = self.patch_size(transformer)
        temporal = int(getattr(pipeline, "vae_scale_factor_temporal", None) or 4)
        per_token = self.pixels_per_token(transformer, pipeline)
        return (max(1, ((frames - 1) // temporal + 1) // pt), height // per_token, width // per_token)


class LatteAdapter(ModelAdapter):
    family = "latte"
    transformer_classes = ("LatteTransformer3DModel",)
    cfg_layout = "batched_uncond_first"
    text_tokens_per_prompt = True  # encode_prompt(mask_feature=True) keeps the prompt's own tokens
    batch_changes_text = True  # ... kept whole (all max_sequence_length tokens), the padding zeroed, unmasked

    def one_prompt_text(self, pipeline, prompts, call_kwargs):
        if not call_kwargs.get("mask_feature", True):
            return None  # untrimmed text: a batched call encodes every prompt as a one-prompt call does
        encode = inspect.signature(pipeline.encode_prompt).parameters
        cfg = float(call_kwargs.get("guidance_scale", 7.0)) > 1.0  # LattePipeline's default and rule
        options = {k: call_kwargs[k] for k in ("negative_prompt", "clean_caption") if k in call_kwargs and k in encode}
        device = getattr(pipeline, "_execution_device", None)
        pairs = [pipeline.encode_prompt(p, do_classifier_free_guidance=cfg, device=device, mask_feature=True, **options)
                 for p in prompts]  # each trimmed to its own tokens, as in a one-prompt call
        length = max(cond.shape[1] for cond, _ in pairs)
        mask = torch.zeros(len(prompts), length, dtype=torch.bool)

        def padded(embeds: torch.Tensor) -> torch.Tensor:
            return torch.cat([embeds[0], embeds.new_zeros(length - embeds.shape[1], embeds.shape[2])])

        for i, (cond, _) in enumerate(pairs):
            mask[i, :cond.shape[1]] = True
        kwargs = {k: v for k, v in call_kwargs.items() if k not in ("prompt", "negative_prompt", "clean_caption")}
        kwargs["prompt_embeds"] = torch.stack([padded(cond) for cond, _ in pairs])
        if cfg:
            kwargs["negative_prompt"] = None  # the pipeline refuses it beside negative_prompt_embeds
            kwargs["negative_prompt_embeds"] = torch.stack([padded(neg) for _, neg in pairs])
        return kwargs, mask

    def text_mask_kwargs(self, mask, grid):
        # The spatial blocks' cross-attention runs per frame (batch x frames rows, frames innermost)
        # and takes the mask as given: [rows, 1, text tokens], True = attend.
        return {"encoder_attention_mask": mask.repeat_interleave(grid[0], dim=0)[:, None, :]}

    def layer_kind(self, name: str, module: nn.Module) -> str:
        if name.startswith("temporal_transformer_blocks"):
            return "temporal"
        return super().layer_kind(name, module)

    def order_layers(self, layers):
        # Latte runs spatial block i, then temporal block i.
        def key(layer: AttentionLayer) -> tuple[int, int, str]:
            parts = layer.name.split(".")
            block = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
            return (block, 1 if layer.kind == "temporal" else 0, layer.name)

        return sorted(layers, key=key)


class MochiAdapter(ModelAdapter):
    family = "mochi"
    transformer_classes = ("MochiTransformer3DModel",)
    cfg_layout = "batched_uncond_first"
    text_position = "last"  # MochiAttnProcessor2_0: per sample, cat([video, valid text])
    attends_per_sample = True
    text_tokens_per_prompt = True

    def layer_kind(self, name, module):
        return "joint"

    def grid_for_size(self, transformer, height, width, frames=1, pipeline=None):
        temporal = int(getattr(pipeline, "vae_temporal_scale_factor", None) or 6)
        per_token = self.pixels_per_token(transformer, pipeline)
        return ((frames - 1) // temporal + 1, height // per_token, width // per_token)


BUILTIN_ADAPTERS: tuple[type[ModelAdapter], ...] = (
    DiTAdapter, PixArtAdapter, SD3Adapter, FluxAdapter, CogVideoXAdapter, LatteAdapter, MochiAdapter,
)


class AdapterRegistry:
    """The adapters a profile or plan run may choose from. Later registrations win."""

    def __init__(self, adapters: Iterable[ModelAdapter] = ()) -> None:
        self._adapters: list[ModelAdapter] = list(adapters)

    def register(self, adapter: ModelAdapter) -> ModelAdapter:
        if not isinstance(adapter, ModelAdapter):
            raise DitlensError(f"register() takes a ModelAdapter instance, got {type(adapter).__name__}")
        if not adapter.family or not adapter.transformer_classes:
            raise DitlensError(f"adapter {type(adapter).__name__} needs `family` and `transformer_classes`")
        self._adapters.insert(0, adapter)
        return adapter

    @property
    def families(self) -> list[str]:
        return [a.family for a in self._adapters]

    def for_family(self, family: str) -> ModelAdapter:
        for adapter in self._adapters:
            if adapter.family == family:
                return adapter
        raise UnknownModelError(f"unknown model family {family!r}; known: {', '.join(self.families)}")

    def find(self, transformer: nn.Module) -> ModelAdapter:
        for adapter in self._adapters:
            if adapter.matches(transformer):
                return adapter
        supported = ", ".join(f"{a.family} ({'/'.join(a.transformer_classes)})" for a in self._adapters)
        raise UnknownModelError(
            f"no ditlens adapter for {type(transformer).__name__}; supported families: {supported}; "
            "register your own with AdapterRegistry.register() or --adapter module:Class (README: 'Adding a model')"
        )


def load_adapter(spec: str) -> ModelAdapter:
    """``package.module:ClassName`` -> an adapter instance (the CLI's ``--adapter``)."""
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise DitlensError(f"--adapter {spec!r}: write it as package.module:ClassName")
    try:
        obj = getattr(import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise DitlensError(f"--adapter {spec!r} could not be loaded: {err}") from None
    return obj() if isinstance(obj, type) else obj


def default_registry(extra: Sequence[str | ModelAdapter] = ()) -> AdapterRegistry:
    """Built-in adapters, then those installed through the ``ditlens.adapters`` entry point
    group, then ``extra`` (specs or instances); a fresh registry each call."""
    registry = AdapterRegistry(cls() for cls in BUILTIN_ADAPTERS)
    for entry in metadata.entry_points(group="ditlens.adapters"):
        loaded = entry.load()
        registry.register(loaded() if isinstance(loaded, type) else loaded)
    for item in extra:
        registry.register(load_adapter(item) if isinstance(item, str) else item)
    return registry
