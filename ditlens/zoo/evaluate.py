"""Quality measures of the embedded models, judged by the shipped classifier.

* tiny-dit: class accuracy of generated images (the classifier agrees with the asked class)
  and classifier-FID against the real test set.
* tiny-mmdit: each caption's items are cut from their quadrant and checked for class
  (classifier) and colour (nearest palette colour); quadrants the caption leaves empty must
  stay dark.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from .classifier import FashionClassifier
from .data import (
    COLOUR_NAMES,
    NUM_CLASSES,
    REGION_NAMES,
    SceneItem,
    caption_for,
    nearest_colour,
    random_scene,
    region_crops,
)

# A quadrant counts as empty when fewer than this many of its 28x28 pixels are lit.
EMPTY_REGION_MAX_LIT = 20


@dataclass
class DiTQuality:
    """tiny-dit at one guidance scale."""

    guidance_scale: float
    num_images: int
    class_accuracy: float
    classifier_fid: float
    per_class_accuracy: list[float] = field(default_factory=list)


@dataclass
class MMDiTQuality:
    """tiny-mmdit at one guidance scale."""

    guidance_scale: float
    num_scenes: int
    num_items: int
    item_class_accuracy: float
    item_colour_accuracy: float
    item_both_accuracy: float
    empty_region_accuracy: float
    item_occupied_accuracy: float = float("nan")  # the item's quadrant is lit
    item_class_anywhere: float = float("nan")  # the class appears in some lit quadrant of the scene
    item_colour_anywhere: float = float("nan")  # the colour appears in some lit quadrant of the scene


def sample_tiny_dit(
    pipeline,
    class_labels: list[int],
    guidance_scale: float,
    num_inference_steps: int,
    seed: int,
    batch_size: int = 500,
    show_progress: bool = True,
) -> np.ndarray:
    """Generate one image per label, in batches; numpy [N, 32, 32, 1]."""
    device = pipeline._execution_device
    generator = torch.Generator(device=device).manual_seed(seed)
    chunks = []
    starts = range(0, len(class_labels), batch_size)
    for start in tqdm(starts, desc=f"tiny-dit g={guidance_scale}", disable=not show_progress):
        chunks.append(
            pipeline(
                class_labels=class_labels[start : start + batch_size],
                guidance_scale=guidance_scale,
                num_inference_steps=num_inference_steps,
                generator=generator,
                output_type="np",
            ).images
        )
    return np.concatenate(chunks)


def evaluate_tiny_dit(
    pipeline,
    classifier: FashionClassifier,
    guidance_scale: float,
    images_per_class: int = 100,
    num_inference_steps: int = 20,
    seed: int = 0,
    batch_size: int = 500,
    show_progress: bool = True,
) -> tuple[DiTQuality, np.ndarray]:
    """Class accuracy and classifier-FID of ``images_per_class`` images of every class."""
    labels = np.repeat(np.arange(NUM_CLASSES), images_per_class)
    images = sample_tiny_dit(pipeline, labels.tolist(), guidance_scale, num_inference_steps, seed, batch_size, show_progress)
    predicted = classifier.predict(images)
    correct = predicted == labels
    per_class = [float(correct[labels == c].mean()) for c in range(NUM_CLASSES)]
    fid = classifier.fid(classifier.features(images))
    quality = DiTQuality(
        guidance_scale=float(guidance_scale),
        num_images=int(len(labels)),
        class_accuracy=float(correct.mean()),
        classifier_fid=fid,
        per_class_accuracy=per_class,
    )
    return quality, images


@dataclass(frozen=True)
class SceneJudgement:
    """Per-item and per-empty-region verdicts for a batch of generated scenes."""

    class_correct: np.ndarray  # bool [items]: the item's quadrant holds its class
    colour_correct: np.ndarray  # bool [items]: the item's quadrant has its colour
    empty_correct: np.ndarray  # bool [empty regions]: quadrants the caption leaves out stay dark
    class_anywhere: np.ndarray  # bool [items]: some lit quadrant of the scene holds its class
    colour_anywhere: np.ndarray  # bool [items]: some lit quadrant of the scene has its colour
    occupied_correct: np.ndarray  # bool [items]: the item's quadrant is lit at all


def judge_scenes(images: np.ndarray, scenes: list[list[SceneItem]], classifier: FashionClassifier) -> SceneJudgement:
    """Check each scene's items (class, colour) in their quadrants, and that other quadrants are dark."""
    crops = region_crops(images)  # [N, 4, 28, 28, 3]
    flat = crops.reshape(-1, *crops.shape[2:])
    predicted_class = classifier.predict(flat).reshape(len(images), len(REGION_NAMES))
    colour_index, lit = nearest_colour(flat)
    colour_index = colour_index.reshape(len(images), len(REGION_NAMES))
    lit = lit.reshape(len(images), len(REGION_NAMES))
    class_ok, colour_ok, empty_ok, class_any, colour_any, occupied = [], [], [], [], [], []
    for row, items in enumerate(scenes):
        used = set()
        lit_regions = [r for r in range(len(REGION_NAMES)) if lit[row, r] >= EMPTY_REGION_MAX_LIT]
        for item in items:
            region = REGION_NAMES.index(item.region)
            colour = COLOUR_NAMES.index(item.colour)
            used.add(region)
            class_ok.append(predicted_class[row, region] == item.class_id)
            colour_ok.append(colour_index[row, region] == colour)
            occupied.append(region in lit_regions)
            class_any.append(any(predicted_class[row, r] == item.class_id for r in lit_regions))
            colour_any.append(any(colour_index[row, r] == colour for r in lit_regions))
        for region in range(len(REGION_NAMES)):
            if region not in used:
                empty_ok.append(lit[row, region] < EMPTY_REGION_MAX_LIT)
    return SceneJudgement(np.array(class_ok), np.array(colour_ok), np.array(empty_ok), np.array(class_any),
                          np.array(colour_any), np.array(occupied))


def evaluation_scenes(num_scenes: int, seed: int) -> list[list[SceneItem]]:
    rng = np.random.default_rng(seed)
    return [random_scene(rng) for _ in range(num_scenes)]


def evaluate_tiny_mmdit(
    pipeline,
    classifier: FashionClassifier,
    guidance_scale: float,
    num_scenes: int = 200,
    num_inference_steps: int = 20,
    seed: int = 0,
    batch_size: int = 200,
    show_progress: bool = True,
) -> tuple[MMDiTQuality, np.ndarray, list[list[SceneItem]]]:
    """Generate random captioned scenes (seeded) and judge their items."""
    scenes = evaluation_scenes(num_scenes, seed)
    captions = [caption_for(items) for items in scenes]
    device = pipeline._execution_device
    generator = torch.Generator(device=device).manual_seed(seed)
    chunks = []
    for start in tqdm(range(0, num_scenes, batch_size), desc=f"tiny-mmdit g={guidance_scale}", disable=not show_progress):
        chunks.append(
            pipeline(
                prompt=captions[start : start + batch_size],
                guidance_scale=guidance_scale,
                num_inference_steps=num_inference_steps,
                generator=generator,
                output_type="np",
            ).images
        )
    images = np.concatenate(chunks)
    verdict = judge_scenes(images, scenes, classifier)
    quality = MMDiTQuality(
        guidance_scale=float(guidance_scale),
        num_scenes=num_scenes,
        num_items=int(len(verdict.class_correct)),
        item_class_accuracy=float(verdict.class_correct.mean()),
        item_colour_accuracy=float(verdict.colour_correct.mean()),
        item_both_accuracy=float((verdict.class_correct & verdict.colour_correct).mean()),
        empty_region_accuracy=float(verdict.empty_correct.mean()) if len(verdict.empty_correct) else 1.0,
        item_occupied_accuracy=float(verdict.occupied_correct.mean()),
        item_class_anywhere=float(verdict.class_anywhere.mean()),
        item_colour_anywhere=float(verdict.colour_anywhere.mean()),
    )
    return quality, images, scenes


def as_dict(quality: DiTQuality | MMDiTQuality) -> dict:
    return asdict(quality)
