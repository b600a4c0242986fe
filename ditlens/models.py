"""Load a pipeline from an embedded model name, a local folder or a hub id (offline-safe)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ditlens.errors import DitlensError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise DitlensError(f"unknown --dtype {name!r}; use one of {', '.join(DTYPES)}") from None


def embedded_models() -> tuple[str, ...]:
    try:
        from ditlens import zoo
    except ImportError:
        return ()
    return tuple(getattr(zoo, "MODELS", ()))


def load_pipeline(spec: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    """``spec``: an embedded model (``tiny-dit``), a folder written by ``save_pretrained``, or a hub id.

    Hub ids load through diffusers' own ``from_pretrained`` from the local cache only: nothing is downloaded."""
    if spec in embedded_models():
        from ditlens import zoo

        pipe = zoo.load_pipeline(spec, device=device, dtype=dtype)
        pipe.set_progress_bar_config(disable=True)  # ditlens shows its own progress
        return pipe
    from diffusers import DiffusionPipeline

    from ditlens.zoo import dtype_keyword

    path = Path(spec)
    if path.exists() and not (path / "model_index.json").exists():
        raise DitlensError(
            f"{spec} is a folder without model_index.json: ditlens needs a whole diffusers pipeline "
            "(save it with pipe.save_pretrained)")
    try:
        pipe = DiffusionPipeline.from_pretrained(spec, local_files_only=True, **{dtype_keyword(): dtype})
    except (OSError, ValueError) as err:
        known = ", ".join(embedded_models()) or "none installed"
        raise DitlensError(
            f"could not load model {spec!r} ({str(err).splitlines()[0]}); give a local pipeline folder, a hub id in the "
            f"local cache, or an embedded model ({known})") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def default_prompts(spec: str, count: int | None = None) -> list[str]:
    """Prompts for an embedded model when none are given: the ten Fashion-MNIST classes for
    tiny-dit, seeded random scene captions for tiny-mmdit (the same list every time)."""
    if spec not in embedded_models():
        raise DitlensError(f"no prompts given for {spec}: pass --prompt (repeatable) or --prompts-file")
    from ditlens.zoo.data import FASHION_CLASSES, caption_for, random_scene

    count = count or 10
    if spec == "tiny-dit":
        return [FASHION_CLASSES[i % len(FASHION_CLASSES)] for i in range(count)]
    import numpy as np

    rng = np.random.default_rng(0)
    return [caption_for(random_scene(rng)) for _ in range(count)]
