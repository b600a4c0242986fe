"""Embedded, trained models that ship inside the package (loaded offline from package data).

* ``tiny-dit`` — class-conditional Fashion-MNIST DiT (diffusers ``DiTTransformer2DModel``),
  32x32 grey, pixel space, called like ``DiTPipeline``.
* ``tiny-mmdit`` — text-conditioned SD3-style MMDiT (diffusers ``SD3Transformer2DModel``) on
  64x64 scenes of coloured Fashion-MNIST items, called like ``StableDiffusion3Pipeline``.
* a Fashion-MNIST CNN classifier (``load_classifier``) for class accuracy and classifier-FID.

>>> from ditlens.zoo import load_pipeline
>>> pipe = load_pipeline("tiny-dit")
>>> images = pipe(class_labels=["sneaker", 8], output_type="np").images  # [2, 32, 32, 1]
"""

from __future__ import annotations

from pathlib import Path

import torch

from ditlens.errors import DitlensError

from .data import COLOUR_NAMES, FASHION_CLASSES, REGION_NAMES, caption_for, class_index

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MODELS: tuple[str, ...] = ("tiny-dit", "tiny-mmdit")
CLASSIFIER_NAME = "classifier"


def model_dir(name: str) -> Path:
    """The package-data folder of an embedded model (a diffusers pipeline folder)."""
    if name not in MODELS and name != CLASSIFIER_NAME:
        raise DitlensError(f"unknown embedded model {name!r}: choose one of {', '.join(MODELS)}")
    folder = WEIGHTS_DIR / name
    if not folder.is_dir():
        raise DitlensError(f"the weights of {name} are missing from {folder}: reinstall ditlens")
    return folder


def dtype_keyword() -> str:
    """diffusers renamed from_pretrained's ``torch_dtype`` to ``dtype`` (the old name warns)."""
    import importlib.util

    has_dtype = importlib.util.find_spec("diffusers.utils.deprecation_utils") is not None
    return "dtype" if has_dtype else "torch_dtype"


def load_pipeline(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Load ``"tiny-dit"`` or ``"tiny-mmdit"`` with diffusers' ``from_pretrained``, offline.

    Weights are stored in fp16 and cast to ``dtype`` on load.
    """
    from .pipelines import TinyDiTPipeline, TinyMMDiTPipeline

    pipeline_class = {"tiny-dit": TinyDiTPipeline, "tiny-mmdit": TinyMMDiTPipeline}.get(name)
    if pipeline_class is None:
        raise DitlensError(f"unknown embedded model {name!r}: choose one of {', '.join(MODELS)}")
    pipeline = pipeline_class.from_pretrained(
        str(model_dir(name)), local_files_only=True, low_cpu_mem_usage=False, **{dtype_keyword(): dtype}
    )
    return pipeline.to(device)


def load_classifier(device: str | torch.device = "cpu"):
    """The shipped Fashion-MNIST classifier (``predict``, ``features``, ``fid``)."""
    from .classifier import FashionClassifier

    return FashionClassifier.load(model_dir(CLASSIFIER_NAME), device=device)


__all__ = [
    "MODELS",
    "FASHION_CLASSES",
    "COLOUR_NAMES",
    "REGION_NAMES",
    "caption_for",
    "class_index",
    "load_pipeline",
    "load_classifier",
    "model_dir",
]
