"""Tiny random-weight diffusers models and pipelines for the seven DiT families (test support).

Everything here is built locally from configs written in this file: no hub access, no
downloads. Tokenizers are real ``T5Tokenizer`` / ``CLIPTokenizer`` objects built over a
small word vocabulary (with a character fallback so any lowercase prompt tokenizes), text
encoders are tiny ``T5EncoderModel`` / ``CLIPTextModel(WithProjection)`` and VAEs are tiny
configs of the classes the real checkpoints use. All sizes are chosen so that a 3-4 step
pipeline call runs in well under a second on two CPU cores.

``TinyModel.expected`` is derived by hand from the sizes below (never from ditlens code):
it is the reference the ditlens adapters are tested against.

Public API::

    FAMILIES
    build_tiny(family, seed) -> TinyModel
    build_tiny_pipeline(family, seed) -> DiffusionPipeline
    pipeline_call_kwargs(family, prompt, steps, guidance, seed) -> dict
    save_tiny_pipeline(family, folder, seed) -> Path
"""

from __future__ import annotations

import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

FAMILIES: tuple[str, ...] = ("dit", "pixart", "sd3", "flux", "cogvideox", "latte", "mochi")

# Distilled guidance embedding value passed to FLUX (the "guidance_scale" of FLUX.1-dev).
FLUX_DISTILLED_GUIDANCE = 3.5

# DiT's pipeline uses class id 1000 as the null (unconditional) class, so the label table needs 1000 classes.
DIT_NUM_CLASSES = 1000


# --------------------------------------------------------------------------------------
# Sizes. Head counts, head dims, grids and text lengths differ across families on purpose.
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinyDims:
    """The sizes a tiny family is built from (latent sizes are in latent pixels, before patching)."""

    heads: int
    head_dim: int
    layers: int
    latent_channels: int
    latent_height: int
    latent_width: int
    patch: int
    latent_frames: int = 1  # latent frames the transformer sees (1 for images)
    text_len: int = 0  # text tokens entering the transformer (0: no text stream)
    text_dim: int = 0  # width of the text-encoder embeddings fed to the transformer
    vae_scale: int = 2  # spatial VAE factor of the tiny VAE
    pixel_frames: int = 1  # frames of the decoded video (what the pipeline is asked for)

    @property
    def grid(self) -> tuple[int, int, int]:
        return (self.latent_frames, self.latent_height // self.patch, self.latent_width // self.patch)

    @property
    def n_image(self) -> int:
        f, h, w = self.grid
        return f * h * w

    @property
    def height(self) -> int:
        return self.latent_height * self.vae_scale

    @property
    def width(self) -> int:
        return self.latent_width * self.vae_scale


DIMS: dict[str, TinyDims] = {
    # 8x8 latent, patch 2 -> 4x4 tokens; class-conditioned, no text.
    "dit": TinyDims(heads=2, head_dim=16, layers=2, latent_channels=4, latent_height=8, latent_width=8, patch=2),
    # 12x16 latent -> 6x8 tokens (non-square on purpose); T5 text of 7 tokens through cross-attention.
    "pixart": TinyDims(
        heads=4, head_dim=8, layers=2, latent_channels=4, latent_height=12, latent_width=16, patch=2,
        text_len=7, text_dim=24,
    ),
    # 10x8 latent -> 5x4 tokens (taller than wide); text = 6 CLIP tokens + 5 T5 tokens = 11.
    "sd3": TinyDims(
        heads=3, head_dim=16, layers=2, latent_channels=4, latent_height=10, latent_width=8, patch=2,
        text_len=6 + 5, text_dim=40,
    ),
    # 12x16 latent packed 2x2 -> 6x8 tokens; 9 T5 tokens.
    "flux": TinyDims(
        heads=2, head_dim=24, layers=1, latent_channels=4, latent_height=12, latent_width=16, patch=2,
        text_len=9, text_dim=32,
    ),
    # 9 pixel frames -> 3 latent frames (decoded back to 9, like 49 -> 13 -> 49); 8x12 latent -> 4x6 tokens
    # per frame; the VAE is 4x spatial.
    "cogvideox": TinyDims(
        heads=3, head_dim=16, layers=2, latent_channels=4, latent_height=8, latent_width=12, patch=2,
        latent_frames=3, pixel_frames=9, text_len=6, text_dim=32, vae_scale=4,
    ),
    # 3 frames (2D VAE per frame) of 8x8 latent -> 4x4 tokens per frame; T5 text of 10 tokens.
    "latte": TinyDims(
        heads=2, head_dim=12, layers=2, latent_channels=4, latent_height=8, latent_width=8, patch=2,
        latent_frames=3, pixel_frames=3, text_len=10, text_dim=16,
    ),
    # 7 pixel frames -> 2 latent frames (the pipeline hard-codes 6x temporal, 8x spatial); 6x8 latent -> 3x4.
    "mochi": TinyDims(
        heads=4, head_dim=8, layers=2, latent_channels=12, latent_height=6, latent_width=8, patch=2,
        latent_frames=2, pixel_frames=7, text_len=8, text_dim=32, vae_scale=8,
    ),
}

# SD3 text = CLIP tokens (padded to the CLIP tokenizer's model_max_length) then T5 tokens.
SD3_CLIP_LEN = 6
SD3_T5_LEN = 5
# FLUX: CLIP only gives the pooled vector; its tokenizer length does not reach the transformer.
FLUX_CLIP_LEN = 7
# Latte's pipeline pads T5 to 120 tokens (hard-coded) and, with mask_feature=True and one prompt,
# trims the text to the prompt's non-padding tokens.
LATTE_PIPELINE_PAD_LEN = 120


# --------------------------------------------------------------------------------------
# Public dataclass
# --------------------------------------------------------------------------------------


@dataclass
class TinyModel:
    """A tiny transformer with inputs for one forward and what its attention must look like."""

    family: str
    transformer: torch.nn.Module
    make_inputs: Callable[[int, torch.Generator], dict]
    expected: dict
    dims: TinyDims | None = field(repr=False, default=None)

    def expected_sdpa_calls(self, batch: int) -> list[tuple[int, int, int, int, int]]:
        """(batch, heads, q_len, k_len, head_dim) of every scaled_dot_product_attention call of one
        forward with ``make_inputs(batch, ...)``, in call order."""
        calls: list[tuple[int, int, int, int, int]] = []
        for spec in self.expected["sdpa_calls"]:
            if spec["per_sample_loop"]:
                calls.extend([(1, spec["heads"], spec["q_len"], spec["k_len"], spec["head_dim"])] * batch)
            else:
                calls.append(
                    (batch * spec["batch_factor"], spec["heads"], spec["q_len"], spec["k_len"], spec["head_dim"])
                )
        return calls


# --------------------------------------------------------------------------------------
# Seeding helpers (no global RNG state is changed)
# --------------------------------------------------------------------------------------


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------
# Tokenizers (local, real transformers classes)
# --------------------------------------------------------------------------------------

_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "in", "on", "with", "and", "at", "by", "to", "is",
    "photo", "picture", "painting", "drawing", "render", "video", "image", "portrait", "close", "up",
    "cat", "dog", "bird", "fish", "horse", "fox", "owl", "bear", "lion", "tiger", "rabbit", "duck",
    "tree", "forest", "flower", "mountain", "river", "lake", "sea", "ocean", "beach", "sky", "cloud",
    "sun", "moon", "star", "city", "street", "house", "castle", "car", "boat", "ship", "train", "road",
    "red", "blue", "green", "yellow", "white", "black", "orange", "purple", "pink", "brown", "gray",
    "big", "small", "old", "young", "happy", "dark", "bright", "sunny", "snowy", "rainy", "night", "day",
    "running", "flying", "sitting", "walking", "swimming", "sleeping", "playing", "eating",
    "astronaut", "robot", "man", "woman", "child", "people", "apple", "banana", "cake", "cup", "book",
    "shoe", "shirt", "dress", "bag", "coat", "sneaker", "trouser", "pullover", "sandal", "boot",
)
_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"
_PUNCT = ",.!?'-:;()"


def _build_t5_tokenizer(max_length: int):
    """A Unigram T5Tokenizer: whole words are cheap pieces, single characters are the fallback."""
    from transformers import T5Tokenizer

    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    seen = {piece for piece, _ in vocab}

    def add(piece: str, score: float) -> None:
        if piece not in seen:
            seen.add(piece)
            vocab.append((piece, score))

    for word in _WORDS:
        add("\u2581" + word, -1.0)
    for ch in _CHARS + _CHARS.upper() + _PUNCT:
        add("\u2581" + ch, -4.0)
        add(ch, -5.0)
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


def _build_clip_tokenizer(max_length: int):
    """A byte-level BPE CLIPTokenizer whose merges spell out the words of the small vocabulary."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in _CHARS + _PUNCT:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in _WORDS:
        if len(word) < 2:
            continue
        merged = word[0]
        for i, ch in enumerate(word[1:], start=1):
            piece = ch + ("</w>" if i == len(word) - 1 else "")
            pair = (merged, piece)
            merged = merged + piece
            if merged not in vocab:
                merges.append(pair)
                vocab[merged] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


# --------------------------------------------------------------------------------------
# Text encoders and VAEs
# --------------------------------------------------------------------------------------


def _t5_encoder(tokenizer, d_model: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_model // 2,
        d_ff=2 * d_model,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    with _seeded(seed):
        return T5EncoderModel(config).eval()


def _clip_encoder(tokenizer, hidden: int, seed: int, with_projection: bool, projection_dim: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,  # SD3 reads hidden_states[-2]
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection_dim or hidden,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    with _seeded(seed):
        return cls(config).eval()


def _autoencoder_kl(latent_channels: int, seed: int, scaling_factor: float, shift_factor: float | None,
                    use_quant_conv: bool = True):
    """2D VAE with 2 levels (spatial factor 2); keeps the mid-block attention real VAEs have."""
    from diffusers import AutoencoderKL

    with _seeded(seed):
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 16),
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=4,
            sample_size=32,
            scaling_factor=scaling_factor,
            shift_factor=shift_factor,
            use_quant_conv=use_quant_conv,
            use_post_quant_conv=use_quant_conv,
        ).eval()


# --------------------------------------------------------------------------------------
# Expected-dict helpers
# --------------------------------------------------------------------------------------


def _call(module: str, kind: str, heads: int, head_dim: int, q_len: int, k_len: int,
          batch_factor: int = 1, per_sample_loop: bool = False) -> dict:
    return {
        "module": module,  # qualified name inside the transformer
        "kind": kind,  # self | cross | joint | spatial | temporal | pool
        "heads": heads,
        "head_dim": head_dim,
        "q_len": q_len,
        "k_len": k_len,
        "batch_factor": batch_factor,  # SDPA batch = batch * batch_factor
        "per_sample_loop": per_sample_loop,  # one SDPA call per sample (batch 1 each)
    }


def _expected(d: TinyDims, *, n_text: int, text_position: str, cfg_layout: str,
              attention_modules: list[str], sdpa_calls: list[dict], **extra: Any) -> dict:
    out = {
        "n_heads": d.heads,
        "head_dim": d.head_dim,
        "n_image_tokens": d.n_image,
        "n_text_tokens": n_text,
        "text_position": text_position,
        "grid": d.grid,
        "n_attention_modules": len(attention_modules),
        "attention_modules": attention_modules,
        "cfg_layout": cfg_layout,
        "sdpa_calls": sdpa_calls,
        "height": d.height,
        "width": d.width,
        "num_frames": d.pixel_frames,
    }
    out.update(extra)
    return out


# --------------------------------------------------------------------------------------
# Families: transformer, inputs, expected
# --------------------------------------------------------------------------------------


def _dit(seed: int) -> TinyModel:
    from diffusers import DiTTransformer2DModel

    d = DIMS["dit"]
    with _seeded(seed):
        model = DiTTransformer2DModel(
            num_attention_heads=d.heads,
            attention_head_dim=d.head_dim,
            in_channels=d.latent_channels,
            out_channels=2 * d.latent_channels,  # learned sigma, as the real DiT-XL-2
            num_layers=d.layers,
            sample_size=d.latent_height,
            patch_size=d.patch,
            num_embeds_ada_norm=DIT_NUM_CLASSES,
        ).eval()

    def make_inputs(batch: int, generator: torch.Generator) -> dict:
        return {
            "hidden_states": torch.randn(batch, d.latent_channels, d.latent_height, d.latent_width, generator=generator),
            "timestep": torch.randint(0, 1000, (batch,), generator=generator),
            "class_labels": torch.randint(0, DIT_NUM_CLASSES, (batch,), generator=generator),
        }

    s = d.n_image
    modules = [f"transformer_blocks.{i}.attn1" for i in range(d.layers)]
    calls = [_call(m, "self", d.heads, d.head_dim, s, s) for m in modules]
    expected = _expected(d, n_text=0, text_position="none", cfg_layout="batched_cond_first",
                         attention_modules=modules, sdpa_calls=calls)
    return TinyModel("dit", model, make_inputs, expected, d)


def _pixart(seed: int) -> TinyModel:
    from diffusers import PixArtTransformer2DModel

    d = DIMS["pixart"]
    inner = d.heads * d.head_dim
    with _seeded(seed):
        model = PixArtTransformer2DModel(
            num_attention_heads=d.heads,
            attention_head_dim=d.head_dim,
            in_channels=d.latent_channels,
            out_channels=2 * d.latent_channels,
            num_layers=d.layers,
            cross_attention_dim=inner,
            sample_size=d.latent_height,
            patch_size=d.patch,
            caption_channels=d.text_dim,
            use_additional_conditions=False,
            interpolation_scale=1,
        ).eval()

    def make_inputs(batch: int, generator: torch.Generator) -> dict:
        return {
            "hidden_states": torch.randn(batch, d.latent_channels, d.latent_height, d.latent_width, generator=generator),
            "encoder_hidden_states": torch.randn(batch, d.text_len, d.text_dim, generator=generator),
            "encoder_attention_mask": torch.ones(batch, d.text_len, dtype=torch.long),
            "timestep": torch.randint(0, 1000, (batch,), generator=generator),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        }

    s, t = d.n_image, d.text_len
    modules, calls = [], []
    for i in range(d.layers):
        modules += [f"transformer_blocks.{i}.attn1", f"transformer_blocks.{i}.attn2"]
        calls += [
            _call(f"transformer_blocks.{i}.attn1", "self", d.heads, d.head_dim, s, s),
            _call(f"transformer_blocks.{i}.attn2", "cross", d.heads, d.head_dim, s, t),
        ]
    expected = _expected(d, n_text=t, text_position="none", cfg_layout="batched_uncond_first",
                         attention_modules=modules, sdpa_calls=calls)
    return TinyModel("pixart", model, make_inputs, expected, d)


SD3_CLIP_HIDDEN = (8, 12)  # two CLIP encoders, concatenated (20) then zero-padded to the T5 width
SD3_CLIP_PROJ = (8, 16)  # their projections, concatenated into the pooled vector


def _sd3(seed: int) -> TinyModel:
    from diffusers import SD3Transformer2DModel

    d = DIMS["sd3"]
    inner = d.heads * d.head_dim
    pooled_dim = sum(SD3_CLIP_PROJ)
    with _seeded(seed):
        model = SD3Transformer2DModel(
            sample_size=d.latent_height,
            patch_size=d.patch,
            in_channels=d.latent_channels,
            out_channels=d.latent_channels,
            num_layers=d.layers,
            attention_head_dim=d.head_dim,
            num_attention_heads=d.heads,
            joint_attention_dim=d.text_dim,
            caption_projection_dim=inner,
            pooled_projection_dim=pooled_dim,
            pos_embed_max_size=8,
            dual_attention_layers=(0,),  # SD3.5 style: block 0 also has an image-only attn2
            qk_norm="rms_norm",
        ).eval()

    def make_inputs(batch: int, generator: torch.Generator) -> dict:
        return {
            "hidden_states": torch.randn(batch, d.latent_channels, d.latent_height, d.latent_width, generator=generator),
            "encoder_hidden_states": torch.randn(batch, d.text_len, d.text_dim, generator=generator),
            "pooled_projections": torch.randn(batch, pooled_dim, generator=generator),
            "timestep": torch.rand(batch, generator=generator) * 1000,
        }

    s, t = d.n_image, d.text_len
    modules = ["transformer_blocks.0.attn", "transformer_blocks.0.attn2", "transformer_blocks.1.attn"]
    calls = [
        _call(modules[0], "joint", d.heads, d.head_dim, s + t, s + t),
        _call(modules[1], "self", d.heads, d.head_dim, s, s),
        _call(modules[2], "joint", d.heads, d.head_dim, s + t, s + t),
    ]
    expected = _expected(d, n_text=t, text_position="last", cfg_layout="batched_uncond_first",
                         attention_modules=modules, sdpa_calls=calls,
                         text_split={"clip": SD3_CLIP_LEN, "t5": SD3_T5_LEN})
    return TinyModel("sd3", model, make_inputs, expected, d)


FLUX_CLIP_HIDDEN = 16  # pooled CLIP vector width
FLUX_SINGLE_LAYERS = 2
FLUX_ROPE_AXES = (8, 8, 8)  # must sum to head_dim


def _flux_image_ids(h: int, w: int) -> torch.Tensor:
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def _flux(seed: int) -> TinyModel:
    from diffusers import FluxTransformer2DModel

    d = DIMS["flux"]
    assert sum(FLUX_ROPE_AXES) == d.head_dim
    packed_channels = d.latent_channels * d.patch * d.patch  # FLUX packs 2x2 latent pixels per token
    with _seeded(seed):
        model = FluxTransformer2DModel(
            patch_size=1,
            in_channels=packed_channels,
            num_layers=d.layers,
            num_single_layers=FLUX_SINGLE_LAYERS,
            attention_head_dim=d.head_dim,
            num_attention_heads=d.heads,
            joint_attention_dim=d.text_dim,
            pooled_projection_dim=FLUX_CLIP_HIDDEN,
            guidance_embeds=True,  # FLUX.1-dev: guidance-distilled
            axes_dims_rope=FLUX_ROPE_AXES,
        ).eval()

    _, gh, gw = d.grid

    def make_inputs(batch: int, generator: torch.Generator) -> dict:
        return {
            "hidden_states": torch.randn(batch, gh * gw, packed_channels, generator=generator),
            "encoder_hidden_states": torch.randn(batch, d.text_len, d.text_dim, generator=generator),
            "pooled_projections": torch.randn(batch, FLUX_CLIP_HIDDEN, generator=generator),
            "timestep": torch.rand(batch, generator=generator),  # FLUX takes t / 1000
            "guidance": torch.full((batch,), FLUX_DISTILLED_GUIDANCE),
            "txt_ids": torch.zeros(d.text_len, 3),
            "img_ids": _flux_image_ids(gh, gw),
        }

    n = d.n_image + d.text_len
    modules = [f"transformer_blocks.{i}.attn" for i in range(d.layers)]
    modules += [f"single_transformer_blocks.{i}.attn" for i in range(FLUX_SINGLE_LAYERS)]
    calls = [_call(m, "joint", d.heads, d.head_dim, n, n) for m in modules]
    expected = _expected(d, n_text=d.text_len, text_position="first", cfg_layout="none",
                         attention_modules=modules, sdpa_calls=calls, true_cfg_layout="separate_cond_first")
    return TinyModel("flux", model, make_inputs, expected, d)


COG_TIME_EMBED = 16


def _cogvideox_rotary(d: TinyDims) -> tuple[torch.Tensor, torch.Tensor]:
    # Same call CogVideoXPipeline._prepare_rotary_positional_embeddings makes for CogVideoX 1.0 (patch_size_t None).
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    frames, gh, gw = d.grid
    crops = get_resize_crop_region_for_grid((gh, gw), gw, gh)
    return get_3d_rotary_pos_embed(
        embed_dim=d.head_dim, crops_coords=crops, grid_size=(gh, gw), temporal_size=frames, device=torch.device("cpu")
    )


def _cogvideox(seed: int) -> TinyModel:
    from diffusers import CogVideoXTransformer3DModel

    d = DIMS["cogvideox"]
    with _seeded(seed):
        model = CogVideoXTransformer3DModel(
            num_attention_heads=d.heads,
            attention_head_dim=d.head_dim,
            in_channels=d.latent_channels,
            out_channels=d.latent_channels,
            time_embed_dim=COG_TIME_EMBED,
            text_embed_dim=d.text_dim,
            num_layers=d.layers,
            sample_width=d.latent_width,
            sample_height=d.latent_height,
            sample_frames=d.pixel_frames,
            patch_size=d.patch,
            temporal_compression_ratio=4,
            max_text_seq_length=d.text_len,
            use_rotary_positional_embeddings=True,  # as CogVideoX-5b
        ).eval()

    rotary = _cogvideox_rotary(d)

    def make_inputs(batch: int, generator: torch.Generator) -> dict:
        return {
            # CogVideoX takes (batch, frames, channels, height, width)
            "hidden_states": torch.randn(
                batch, d.latent_frames, d.latent_channels, d.latent_height, d.latent_width, generator=generator
            ),
            "encoder_hidden_states": torch.randn(batch, d.text_len, d.text_dim, generator=generator),
            "timestep": torch.randint(0, 1000, (batch,), generator=generator),
            "image_rotary_emb": rotary,
        }

    n = d.n_image + d.text_len
    modules = [f"transformer_blocks.{i}.attn1" for i in range(d.layers)]
    calls = [_call(m, "joint", d.heads, d.head_dim, n, n) for m in modules]
    expected = _expected(d, n_text=d.text_len, text_position="first", cfg_layout="batched_uncond_first",
                         attention_modules=modules, sdpa_calls=calls)
    return TinyModel("cogvideox", model, make_inputs, expected, d)


def _latte(seed: int) -> TinyModel:
    from diffusers import LatteTransformer3DModel

    d = DIMS["latte"]
    inner = d.heads * d.head_dim
    with _seeded(seed):
        model = LatteTransformer3DModel(
            num_attention_heads=d.heads,
            attention_head_dim=d.head_dim,
            in_channels=d.latent_channels,
            out_channels=2 * d.latent_channels,  # learned sigma: the pipeline keeps the first half
            num_layers=d.layers,
            cross_attention_dim=inner,
            attention_bias=True,
            sample_size=d.latent_height,
            patch_size=d.patch,
            activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000,
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
            caption_channels=d.text_dim,
            video_length=d.latent_frames,  # the temporal position table must match the frame count
        ).eval()

    def make_inputs(batch: int, generator: torch.Generator) -> dict:
        return {
            # Latte takes (batch, channels, frames, height, width)
            "hidden_states": torch.randn(
                batch, d.latent_channels, d.latent_frames, d.latent_height, d.latent_width, generator=generator
            ),
            "encoder_hidden_states": torch.randn(batch, d.text_len, d.text_dim, generator=generator),
            "timestep": torch.randint(0, 1000, (batch,), generator=generator),
            "enable_temporal_attentions": True,
        }

    frames, gh, gw = d.grid
    per_frame = gh * gw
    modules, calls = [], []
    for i in range(d.layers):
        spatial = f"transformer_blocks.{i}"
        temporal = f"temporal_transformer_blocks.{i}"
        modules += [f"{spatial}.attn1", f"{spatial}.attn2", f"{temporal}.attn1"]
        calls += [
            # spatial blocks fold frames into the batch: (B*F, tokens of one frame)
            _call(f"{spatial}.attn1", "spatial", d.heads, d.head_dim, per_frame, per_frame, batch_factor=frames),
            _call(f"{spatial}.attn2", "cross", d.heads, d.head_dim, per_frame, d.text_len, batch_factor=frames),
            # temporal blocks fold spatial positions into the batch: (B*H*W, frames)
            _call(f"{temporal}.attn1", "temporal", d.heads, d.head_dim, frames, frames, batch_factor=per_frame),
        ]
    expected = _expected(d, n_text=d.text_len, text_position="none", cfg_layout="batched_uncond_first",
                         attention_modules=modules, sdpa_calls=calls,
                         pipeline_text_tokens="prompt tokens incl. eos (mask_feature=True, one prompt), else 120")
    return TinyModel("latte", model, make_inputs, expected, d)


MOCHI_POOLED_DIM = 16  # width of Mochi's text stream inside the blocks (asymmetric: image stream is heads*head_dim)
MOCHI_TIME_EMBED = 16
MOCHI_POOL_HEADS = 8  # hard-coded in MochiCombinedTimestepCaptionEmbedding


def _mochi(seed: int) -> TinyModel:
    from diffusers import MochiTransformer3DModel

    d = DIMS["mochi"]
    with _seeded(seed):
        model = MochiTransformer3DModel(
            patch_size=d.patch,
            num_attention_heads=d.heads,
            attention_head_dim=d.head_dim,
            num_layers=d.layers,
            pooled_projection_dim=MOCHI_POOLED_DIM,
            in_channels=d.latent_channels,
            text_embed_dim=d.text_dim,
            time_embed_dim=MOCHI_TIME_EMBED,
            max_sequence_length=d.text_len,
        ).eval()
        # Mochi initialises its learned RoPE frequencies to zero (identity rotation); give them values so
        # that rotary embedding really acts in the tiny model.
        with torch.no_grad():
            model.pos_frequencies.normal_(0.0, 0.5)

    def make_inputs(batch: int, generator: torch.Generator) -> dict:
        return {
            "hidden_states": torch.randn(
                batch, d.latent_channels, d.latent_frames, d.latent_height, d.latent_width, generator=generator
            ),
            "encoder_hidden_states": torch.randn(batch, d.text_len, d.text_dim, generator=generator),
            "encoder_attention_mask": torch.ones(batch, d.text_len, dtype=torch.bool),
            "timestep": torch.rand(batch, generator=generator) * 1000,
        }

    n = d.n_image + d.text_len
    modules = [f"transformer_blocks.{i}.attn1" for i in range(d.layers)]
    calls = [
        # the caption attention pool in time_embed: one query attending [mean token, text tokens]
        _call("time_embed.pooler", "pool", MOCHI_POOL_HEADS, d.text_dim // MOCHI_POOL_HEADS, 1, 1 + d.text_len)
    ]
    # MochiAttnProcessor2_0 loops over samples and keeps only unmasked text tokens of each
    calls += [_call(m, "joint", d.heads, d.head_dim, n, n, per_sample_loop=True) for m in modules]
    expected = _expected(d, n_text=d.text_len, text_position="last", cfg_layout="batched_uncond_first",
                         attention_modules=modules, sdpa_calls=calls,
                         pipeline_text_tokens="per sample: unmasked T5 tokens only (uncond '' -> 1)")
    return TinyModel("mochi", model, make_inputs, expected, d)


_BUILDERS: dict[str, Callable[[int], TinyModel]] = {
    "dit": _dit,
    "pixart": _pixart,
    "sd3": _sd3,
    "flux": _flux,
    "cogvideox": _cogvideox,
    "latte": _latte,
    "mochi": _mochi,
}


def _check_family(family: str) -> None:
    if family not in _BUILDERS:
        raise KeyError(f"unknown tiny family {family!r}; choose one of {', '.join(FAMILIES)}")


def build_tiny(family: str, seed: int = 0) -> TinyModel:
    """The tiny random-weight transformer of ``family`` (eval mode, float32, CPU)."""
    _check_family(family)
    return _BUILDERS[family](seed)


# --------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------


def _pipe_dit(seed: int):
    from diffusers import DDIMScheduler, DiTPipeline

    tiny = build_tiny("dit", seed)
    vae = _autoencoder_kl(DIMS["dit"].latent_channels, seed + 1, scaling_factor=0.18215, shift_factor=None)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    id2label = {i: f"class{i}" for i in range(DIT_NUM_CLASSES)}
    pipe = DiTPipeline(transformer=tiny.transformer, vae=vae, scheduler=scheduler, id2label=id2label)
    # Hub DiT checkpoints keep id2label in model_index.json; register it so save/load keeps the labels.
    pipe.register_to_config(id2label={str(k): v for k, v in id2label.items()})
    return pipe


def _pipe_pixart(seed: int):
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline

    d = DIMS["pixart"]
    tiny = build_tiny("pixart", seed)
    tokenizer = _build_t5_tokenizer(d.text_len)
    return PixArtSigmaPipeline(
        tokenizer=tokenizer,
        text_encoder=_t5_encoder(tokenizer, d.text_dim, seed + 2),
        vae=_autoencoder_kl(d.latent_channels, seed + 1, scaling_factor=0.13025, shift_factor=None),
        transformer=tiny.transformer,
        scheduler=DPMSolverMultistepScheduler(num_train_timesteps=1000),
    )


def _pipe_sd3(seed: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    d = DIMS["sd3"]
    tiny = build_tiny("sd3", seed)
    tok1 = _build_clip_tokenizer(SD3_CLIP_LEN)
    tok2 = _build_clip_tokenizer(SD3_CLIP_LEN)
    tok3 = _build_t5_tokenizer(SD3_T5_LEN)
    assert sum(SD3_CLIP_HIDDEN) <= d.text_dim  # the pipeline zero-pads the CLIP embeddings to the T5 width
    return StableDiffusion3Pipeline(
        transformer=tiny.transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_autoencoder_kl(d.latent_channels, seed + 1, scaling_factor=1.5305, shift_factor=0.0609,
                            use_quant_conv=False),
        text_encoder=_clip_encoder(tok1, SD3_CLIP_HIDDEN[0], seed + 2, True, SD3_CLIP_PROJ[0]),
        tokenizer=tok1,
        text_encoder_2=_clip_encoder(tok2, SD3_CLIP_HIDDEN[1], seed + 3, True, SD3_CLIP_PROJ[1]),
        tokenizer_2=tok2,
        text_encoder_3=_t5_encoder(tok3, d.text_dim, seed + 4),
        tokenizer_3=tok3,
    )


def _pipe_flux(seed: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    d = DIMS["flux"]
    tiny = build_tiny("flux", seed)
    tok1 = _build_clip_tokenizer(FLUX_CLIP_LEN)
    tok2 = _build_t5_tokenizer(d.text_len)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=_autoencoder_kl(d.latent_channels, seed + 1, scaling_factor=0.3611, shift_factor=0.1159,
                            use_quant_conv=False),
        text_encoder=_clip_encoder(tok1, FLUX_CLIP_HIDDEN, seed + 2, with_projection=False),
        tokenizer=tok1,
        text_encoder_2=_t5_encoder(tok2, d.text_dim, seed + 3),
        tokenizer_2=tok2,
        transformer=tiny.transformer,
    )


def _pipe_cogvideox(seed: int):
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline

    d = DIMS["cogvideox"]
    tiny = build_tiny("cogvideox", seed)
    tokenizer = _build_t5_tokenizer(d.text_len)
    with _seeded(seed + 1):
        # 3 levels: spatial factor 4; the first two levels also halve time (temporal_compression_ratio 4)
        vae = AutoencoderKLCogVideoX(
            in_channels=3,
            out_channels=3,
            down_block_types=("CogVideoXDownBlock3D",) * 3,
            up_block_types=("CogVideoXUpBlock3D",) * 3,
            block_out_channels=(8, 8, 8),
            latent_channels=d.latent_channels,
            layers_per_block=1,
            norm_num_groups=4,
            temporal_compression_ratio=4,
            sample_height=d.height,
            sample_width=d.width,
        ).eval()
    assert 2 ** (len(vae.config.block_out_channels) - 1) == d.vae_scale
    scheduler = CogVideoXDDIMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
        clip_sample=False, set_alpha_to_one=True,
    )
    return CogVideoXPipeline(
        tokenizer=tokenizer,
        text_encoder=_t5_encoder(tokenizer, d.text_dim, seed + 2),
        vae=vae,
        transformer=tiny.transformer,
        scheduler=scheduler,
    )


def _pipe_latte(seed: int):
    from diffusers import DDIMScheduler, LattePipeline

    d = DIMS["latte"]
    tiny = build_tiny("latte", seed)
    tokenizer = _build_t5_tokenizer(LATTE_PIPELINE_PAD_LEN)
    return LattePipeline(
        tokenizer=tokenizer,
        text_encoder=_t5_encoder(tokenizer, d.text_dim, seed + 2),
        vae=_autoencoder_kl(d.latent_channels, seed + 1, scaling_factor=0.18215, shift_factor=None),
        transformer=tiny.transformer,
        scheduler=DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False),
    )


def _pipe_mochi(seed: int):
    from diffusers import AutoencoderKLMochi, FlowMatchEulerDiscreteScheduler, MochiPipeline

    d = DIMS["mochi"]
    tiny = build_tiny("mochi", seed)
    tokenizer = _build_t5_tokenizer(d.text_len)
    with _seeded(seed + 1):
        # The pipeline hard-codes 8x spatial / 6x temporal latents, so keep the real expansions; 32 channels
        # because Mochi's group norms use 32 groups.
        vae = AutoencoderKLMochi(
            in_channels=15,
            out_channels=3,
            encoder_block_out_channels=(32, 32, 32, 32),
            decoder_block_out_channels=(32, 32, 32, 32),
            latent_channels=d.latent_channels,
            layers_per_block=(1, 1, 1, 1, 1),
            temporal_expansions=(1, 2, 3),
            spatial_expansions=(2, 2, 2),
            add_attention_block=(False, False, False, False, False),
        ).eval()
    return MochiPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000),
        vae=vae,
        text_encoder=_t5_encoder(tokenizer, d.text_dim, seed + 2),
        tokenizer=tokenizer,
        transformer=tiny.transformer,
    )


_PIPELINE_BUILDERS: dict[str, Callable[[int], Any]] = {
    "dit": _pipe_dit,
    "pixart": _pipe_pixart,
    "sd3": _pipe_sd3,
    "flux": _pipe_flux,
    "cogvideox": _pipe_cogvideox,
    "latte": _pipe_latte,
    "mochi": _pipe_mochi,
}


def build_tiny_pipeline(family: str, seed: int = 0):
    """The full diffusers pipeline of ``family`` with tiny random weights and local tokenizers.

    Its transformer is identical (same weights) to ``build_tiny(family, seed).transformer``.
    """
    _check_family(family)
    pipe = _PIPELINE_BUILDERS[family](seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def dit_class_id(prompt: str) -> int:
    """DiT is class-conditioned: a prompt "class7" or "7" gives class 7, anything else a stable hash."""
    text = prompt.strip()
    if text.startswith("class"):
        text = text[len("class"):]
    if text.isdigit():
        return int(text) % DIT_NUM_CLASSES
    return zlib.crc32(prompt.encode("utf-8")) % DIT_NUM_CLASSES


def pipeline_call_kwargs(family: str, prompt: str, steps: int, guidance: float, seed: int) -> dict:
    """Keyword arguments for ``pipe(**kwargs)`` giving a tiny fast run that returns numpy images/frames.

    ``guidance > 1`` turns classifier-free guidance on. For FLUX (guidance-distilled) it means
    true CFG: ``true_cfg_scale=guidance`` with an empty negative prompt (a second, separate
    transformer call per step); the distilled guidance embedding stays at FLUX_DISTILLED_GUIDANCE.
    """
    _check_family(family)
    d = DIMS[family]
    generator = _gen(seed)
    common: dict[str, Any] = {"num_inference_steps": steps, "generator": generator, "output_type": "np"}
    if family == "dit":
        return {**common, "class_labels": [dit_class_id(prompt)], "guidance_scale": guidance}
    if family == "flux":
        kwargs = {**common, "prompt": prompt, "guidance_scale": FLUX_DISTILLED_GUIDANCE,
                  "height": d.height, "width": d.width, "max_sequence_length": d.text_len}
        if guidance > 1:
            kwargs.update(negative_prompt="", true_cfg_scale=guidance)
        return kwargs
    kwargs = {**common, "prompt": prompt, "guidance_scale": guidance, "height": d.height, "width": d.width}
    if family == "pixart":
        kwargs.update(max_sequence_length=d.text_len, use_resolution_binning=False, clean_caption=False)
    elif family == "sd3":
        kwargs.update(max_sequence_length=SD3_T5_LEN)
    elif family == "cogvideox":
        kwargs.update(num_frames=d.pixel_frames, max_sequence_length=d.text_len, use_dynamic_cfg=False)
    elif family == "latte":
        kwargs.update(video_length=d.pixel_frames, clean_caption=False)
    elif family == "mochi":
        kwargs.update(num_frames=d.pixel_frames, max_sequence_length=d.text_len)
    return kwargs


def save_tiny_pipeline(family: str, folder: str | Path, seed: int = 0) -> Path:
    """Write the tiny pipeline with ``save_pretrained`` so ``DiffusionPipeline.from_pretrained(folder)`` loads it."""
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    build_tiny_pipeline(family, seed).save_pretrained(path)
    return path
