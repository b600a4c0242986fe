"""The diffusers pipelines of the embedded models.

``TinyDiTPipeline`` is called like diffusers' ``DiTPipeline``; ``TinyMMDiTPipeline`` like
``StableDiffusion3Pipeline``. Both work in pixel space (no VAE): the transformer's input and
output are images scaled to [-1, 1].

Classifier-free guidance layouts (read by ditlens' adapters through ``_ditlens_cfg_layout``):

* tiny-dit: one batched call per step, **cond first** — ``[x, x]`` with labels
  ``[y, null]`` (DiTPipeline's order); ``null`` is class index ``num_classes`` (10).
* tiny-mmdit: one batched call per step, **uncond first** — ``[x, x]`` with
  ``[embed(negative_prompt), embed(prompt)]`` (SD3's order); the default negative prompt is
  the empty caption.

With ``guidance_scale <= 1`` neither pipeline runs the unconditional branch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    DiffusionPipeline,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    ImagePipelineOutput,
    SD3Transformer2DModel,
)
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import logging as diffusers_logging
from diffusers.utils.torch_utils import randn_tensor

from ditlens.errors import DitlensError

from .data import FASHION_CLASSES, NUM_CLASSES, class_index
from .text import TinyTextEncoder, WordTokenizer

TINY_DIT_DEFAULT_STEPS = 20
TINY_DIT_DEFAULT_GUIDANCE = 3.0
TINY_MMDIT_DEFAULT_STEPS = 20
TINY_MMDIT_DEFAULT_GUIDANCE = 5.0


def _images_out(images: torch.Tensor, output_type: str, pipeline: DiffusionPipeline) -> Any:
    """[-1, 1] NCHW tensor -> 'pt' [0,1] NCHW tensor, 'np' [0,1] NHWC float32, or 'pil' list."""
    images = (images.float() / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return images
    array = images.cpu().permute(0, 2, 3, 1).numpy()
    if output_type == "np":
        return array
    if output_type == "pil":
        return pipeline.numpy_to_pil(array)
    raise DitlensError(f"unknown output_type {output_type!r}: use 'pil', 'np' or 'pt'")


class TinyDiTPipeline(DiffusionPipeline):
    """Class-conditional Fashion-MNIST DiT (32x32 grey, pixel space) with classifier-free guidance.

    Call it like ``DiTPipeline``: ``pipe(class_labels=[7, "bag"], num_inference_steps=20,
    guidance_scale=3.0, generator=torch.Generator().manual_seed(0), output_type="np").images``
    gives float32 [N, 32, 32, 1] in [0, 1]. Class labels are ints 0..9 or class names.
    CFG is batched, conditional half first (``[x, x]``, labels ``[y, null]``).
    """

    _ditlens_cfg_layout = "batched_cond_first"
    _ditlens_classifier = "fashion-mnist"  # validate scores its images with the embedded classifier
    model_cpu_offload_seq = "transformer"

    def __init__(self, transformer: DiTTransformer2DModel, scheduler: KarrasDiffusionSchedulers) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)
        self.id2label = dict(enumerate(FASHION_CLASSES))
        self.labels = {name: index for index, name in self.id2label.items()}

    @property
    def null_class_label(self) -> int:
        return int(self.transformer.config.num_embeds_ada_norm)

    def get_label_ids(self, label: int | str | Sequence[int | str]) -> list[int]:
        """Class indices from ints or Fashion-MNIST class names ("sneaker", "ankle boot", ...)."""
        if isinstance(label, (int, str, np.integer)):
            label = [label]
        return [class_index(item) for item in label]

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | str | Sequence[int | str] | torch.Tensor,
        guidance_scale: float = TINY_DIT_DEFAULT_GUIDANCE,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = TINY_DIT_DEFAULT_STEPS,
        output_type: str = "pil",
        return_dict: bool = True,
        latents: torch.Tensor | None = None,
        callback_on_step_end: Callable[[DiffusionPipeline, int, torch.Tensor, dict], dict] | None = None,
    ) -> ImagePipelineOutput | tuple:
        if isinstance(class_labels, torch.Tensor):
            class_labels = class_labels.flatten().tolist()
        label_ids = self.get_label_ids(class_labels)
        if num_inference_steps < 1:
            raise DitlensError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        batch = len(label_ids)
        config = self.transformer.config
        size = int(config.sample_size)
        channels = int(config.in_channels)
        device = self._execution_device
        dtype = self.transformer.dtype
        if latents is None:
            latents = randn_tensor((batch, channels, size, size), generator=generator, device=device, dtype=dtype)
        else:
            latents = latents.to(device=device, dtype=dtype)
        latents = latents * self.scheduler.init_noise_sigma

        use_cfg = guidance_scale > 1
        labels = torch.tensor(label_ids, device=device)
        if use_cfg:
            labels = torch.cat([labels, torch.full_like(labels, self.null_class_label)])  # cond first

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for step_index, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_input = torch.cat([latents, latents]) if use_cfg else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            timesteps = t.expand(model_input.shape[0]).to(device)
            noise_pred = self.transformer(model_input, timestep=timesteps, class_labels=labels, return_dict=False)[0]
            if use_cfg:
                cond, uncond = noise_pred.chunk(2)
                noise_pred = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            if callback_on_step_end is not None:
                outputs = callback_on_step_end(self, step_index, t, {"latents": latents})
                latents = outputs.pop("latents", latents)

        images = _images_out(latents, output_type, self)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


class TinyMMDiTPipeline(DiffusionPipeline):
    """Text-to-image SD3-style MMDiT on composed Fashion-MNIST scenes (64x64 RGB, pixel space).

    Call it like ``StableDiffusion3Pipeline``: ``pipe(prompt="a red sneaker top left and a blue
    bag bottom right", negative_prompt="", num_inference_steps=20, guidance_scale=5.0,
    generator=..., output_type="np").images`` gives float32 [N, 64, 64, 3] in [0, 1].
    The transformer is a diffusers ``SD3Transformer2DModel`` called exactly as SD3 calls it
    (``hidden_states, encoder_hidden_states, pooled_projections, timestep``); joint attention
    sees 1024 image tokens, then 32 text tokens. CFG is batched, unconditional half first.
    """

    _ditlens_cfg_layout = "batched_uncond_first"
    model_cpu_offload_seq = "text_encoder->transformer"

    def __init__(
        self,
        transformer: SD3Transformer2DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        text_encoder: TinyTextEncoder,
        tokenizer: WordTokenizer,
    ) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> "TinyMMDiTPipeline":
        # The word-level tokenizer is no diffusers/transformers class, so diffusers cannot load it
        # from model_index.json by itself: read it here and hand it in as a ready component.
        if "tokenizer" not in kwargs:
            kwargs["tokenizer"] = WordTokenizer.from_pretrained(Path(pretrained_model_name_or_path) / "tokenizer")
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> None:
        # diffusers writes the tokenizer entry of model_index.json as [null, null] (it is no
        # class it knows, and naming it there would make from_pretrained refuse it) and warns
        # that it cannot save it: save it here, and keep that expected warning quiet.
        pipeline_logger = diffusers_logging.get_logger("diffusers.pipelines.pipeline_utils")
        level = pipeline_logger.level
        pipeline_logger.setLevel(diffusers_logging.ERROR)
        try:
            super().save_pretrained(save_directory, **kwargs)
        finally:
            pipeline_logger.setLevel(level)
        self.tokenizer.save_pretrained(Path(save_directory) / "tokenizer")

    def encode_prompt(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        do_classifier_free_guidance: bool = True,
        num_images_per_prompt: int = 1,
        device: torch.device | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """(prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds)."""
        device = device or self._execution_device
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)

        def embed(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
            tokens = self.tokenizer(texts)
            hidden, pooled = self.text_encoder(tokens.input_ids.to(device), tokens.attention_mask.to(device))
            dtype = self.transformer.dtype
            hidden = hidden.to(dtype).repeat_interleave(num_images_per_prompt, dim=0)
            pooled = pooled.to(dtype).repeat_interleave(num_images_per_prompt, dim=0)
            return hidden, pooled

        prompt_embeds, pooled = embed(prompts)
        negative_embeds = negative_pooled = None
        if do_classifier_free_guidance:
            negative = negative_prompt if negative_prompt is not None else ""
            negatives = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
            if len(negatives) != len(prompts):
                raise DitlensError(f"negative_prompt has {len(negatives)} entries but prompt has {len(prompts)}")
            negative_embeds, negative_pooled = embed(negatives)
        return prompt_embeds, negative_embeds, pooled, negative_pooled

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = TINY_MMDIT_DEFAULT_STEPS,
        guidance_scale: float = TINY_MMDIT_DEFAULT_GUIDANCE,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[DiffusionPipeline, int, torch.Tensor, dict], dict] | None = None,
    ) -> ImagePipelineOutput | tuple:
        config = self.transformer.config
        patch = int(config.patch_size)
        largest = int(config.pos_embed_max_size) * patch
        height = height or int(config.sample_size)
        width = width or int(config.sample_size)
        if height % patch or width % patch or height > largest or width > largest:
            raise DitlensError(
                f"height and width must be multiples of {patch} and at most {largest}, got {height}x{width}"
            )
        if num_inference_steps < 1:
            raise DitlensError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        device = self._execution_device
        use_cfg = guidance_scale > 1
        prompt_embeds, negative_embeds, pooled, negative_pooled = self.encode_prompt(
            prompt, negative_prompt, use_cfg, num_images_per_prompt, device
        )
        if use_cfg:  # SD3 order: unconditional half first
            prompt_embeds = torch.cat([negative_embeds, prompt_embeds])
            pooled = torch.cat([negative_pooled, pooled])

        batch = pooled.shape[0] // (2 if use_cfg else 1)
        dtype = self.transformer.dtype
        shape = (batch, int(config.in_channels), height, width)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            latents = latents.to(device=device, dtype=dtype)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for step_index, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_input = torch.cat([latents, latents]) if use_cfg else latents
            timesteps = t.expand(model_input.shape[0])
            velocity = self.transformer(
                hidden_states=model_input,
                timestep=timesteps,
                encoder_hidden_states=prompt_embeds,
                pooled_projections=pooled,
                joint_attention_kwargs=joint_attention_kwargs,
                return_dict=False,
            )[0]
            if use_cfg:
                uncond, cond = velocity.chunk(2)
                velocity = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(velocity, t, latents, return_dict=False)[0]
            if callback_on_step_end is not None:
                outputs = callback_on_step_end(self, step_index, t, {"latents": latents})
                latents = outputs.pop("latents", latents)

        images = _images_out(latents, output_type, self)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


__all__ = ["TinyDiTPipeline", "TinyMMDiTPipeline", "NUM_CLASSES"]
