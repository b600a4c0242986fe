"""Measure the shipped embedded models with the shipped classifier, and draw sample grids.

    python -m training.evaluate_zoo --device cuda --out docs/zoo_metrics.json --grid-dir docs
    python -m training.evaluate_zoo --models tiny-dit --dit-images-per-class 20 --dit-guidance 4   # CPU check

Everything is loaded the way users load it (``ditlens.zoo.load_pipeline`` / ``load_classifier``
from package data). Besides the generated images it measures two references: the classifier
on the real test set (and classifier-FID of 5,000 real training images, the floor an ideal
generator would reach), and the scene judge on real composed scenes (what a perfect tiny-mmdit
would score).
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import torch

from ditlens.zoo import load_classifier, load_pipeline
from ditlens.zoo.data import (
    COLOURS,
    FASHION_CLASSES,
    NUM_CLASSES,
    REGION_NAMES,
    caption_for,
    compose_scenes,
    load_fashion_mnist,
)
from ditlens.zoo.evaluate import as_dict, evaluate_tiny_dit, evaluate_tiny_mmdit, evaluation_scenes, judge_scenes
from ditlens.zoo.pipelines import TINY_DIT_DEFAULT_GUIDANCE, TINY_MMDIT_DEFAULT_GUIDANCE


def _floats(text: str) -> list[float]:
    return [float(item) for item in text.split(",") if item.strip()]


def real_references(classifier, seed: int) -> dict:
    """Classifier accuracy on the test set, FID floor of real images, scene judge on real scenes."""
    test = load_fashion_mnist("test")
    train = load_fashion_mnist("train")
    rng = np.random.default_rng(seed)
    accuracy = float((classifier.predict(test.images) == test.labels).mean())
    subset = rng.choice(len(train.labels), 5000, replace=False)
    fid_real = classifier.fid(classifier.features(train.images[subset]))
    # 300 real composed scenes built from test-set items, judged like generated ones.
    scenes = evaluation_scenes(300, seed + 1)
    by_class = [np.flatnonzero(test.labels == c) for c in range(NUM_CLASSES)]
    slots = max(len(items) for items in scenes)
    item_images = np.zeros((len(scenes), slots, 28, 28), np.float32)
    regions = np.zeros((len(scenes), slots), np.int64)
    colours = np.zeros((len(scenes), slots, 3), np.float32)
    present = np.zeros((len(scenes), slots), bool)
    for row, items in enumerate(scenes):
        for slot, item in enumerate(items):
            item_images[row, slot] = test.images[rng.choice(by_class[item.class_id])] / 255.0
            regions[row, slot] = REGION_NAMES.index(item.region)
            colours[row, slot] = COLOURS[item.colour]
            present[row, slot] = True
    canvas = compose_scenes(torch.from_numpy(item_images), torch.from_numpy(regions), torch.from_numpy(colours),
                            torch.from_numpy(present))
    verdict = judge_scenes(canvas.permute(0, 2, 3, 1).numpy(), scenes, classifier)
    return {
        "classifier_test_accuracy": accuracy,
        "classifier_fid_real_train_5000": fid_real,
        "real_scene_item_class_accuracy": float(verdict.class_correct.mean()),
        "real_scene_item_colour_accuracy": float(verdict.colour_correct.mean()),
        "real_scene_empty_region_accuracy": float(verdict.empty_correct.mean()),
    }


def dit_grid(images: np.ndarray, per_row: int, path: Path, scale: int = 3) -> None:
    """Rows = classes (label on the left), ``per_row`` samples each."""
    from PIL import Image, ImageDraw

    size = images.shape[1] * scale
    label_width = 90
    sheet = Image.new("RGB", (label_width + per_row * size, NUM_CLASSES * size), "black")
    draw = ImageDraw.Draw(sheet)
    for c in range(NUM_CLASSES):
        draw.text((4, c * size + size // 2 - 5), FASHION_CLASSES[c], fill="white")
        for k in range(per_row):
            tile = (images[c * per_row + k, :, :, 0] * 255).round().astype(np.uint8)
            sheet.paste(Image.fromarray(tile).resize((size, size), Image.NEAREST).convert("RGB"),
                        (label_width + k * size, c * size))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def mmdit_grid(images: np.ndarray, captions: list[str], columns: int, path: Path, scale: int = 3) -> None:
    """Each scene with its caption under it."""
    from PIL import Image, ImageDraw

    size = images.shape[1] * scale
    text_height = 48
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * (size + 8), rows * (size + text_height)), (40, 40, 40))
    draw = ImageDraw.Draw(sheet)
    for index, (image, caption) in enumerate(zip(images, captions)):
        x = (index % columns) * (size + 8)
        y = (index // columns) * (size + text_height)
        tile = Image.fromarray((image * 255).round().astype(np.uint8)).resize((size, size), Image.NEAREST)
        sheet.paste(tile, (x, y))
        for line_index, line in enumerate(textwrap.wrap(caption, width=size // 6)[:4]):
            draw.text((x + 2, y + size + 2 + 11 * line_index), line, fill="white")
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny-dit,tiny-mmdit")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dit-guidance", default=f"{TINY_DIT_DEFAULT_GUIDANCE},1,2,3,6")
    parser.add_argument("--dit-images-per-class", type=int, default=300)
    parser.add_argument("--mmdit-guidance", default=f"{TINY_MMDIT_DEFAULT_GUIDANCE},1,3,7")
    parser.add_argument("--mmdit-scenes", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--skip-references", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="write the figures here as JSON")
    parser.add_argument("--grid-dir", type=Path, default=None, help="write docs/zoo_*.png sample grids here")
    args = parser.parse_args(argv)

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    classifier = load_classifier(device=device)
    results: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     "steps": args.steps, "seed": args.seed}
    if not args.skip_references:
        results["references"] = real_references(classifier, args.seed)
        print(json.dumps(results["references"], indent=1), flush=True)
    models = [m.strip() for m in args.models.split(",") if m.strip()]

    def save() -> None:  # after every measurement, so a run cut short keeps what it measured
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2) + "\n")

    save()

    if "tiny-dit" in models:
        pipe = load_pipeline("tiny-dit", device=device)
        pipe.set_progress_bar_config(disable=True)
        # Grids first (default settings, as a user would call it): cheap, and wanted even if time runs out.
        if args.grid_dir is not None:
            per_row = 8
            labels = np.repeat(np.arange(NUM_CLASSES), per_row).tolist()
            generator = torch.Generator(device=device).manual_seed(args.seed)
            images = pipe(class_labels=labels, generator=generator, num_inference_steps=args.steps, output_type="np").images
            dit_grid(images, per_row, args.grid_dir / "zoo_tiny_dit.png")
        rows = []
        for guidance in _floats(args.dit_guidance):
            start = time.perf_counter()
            quality, images = evaluate_tiny_dit(pipe, classifier, guidance, args.dit_images_per_class, args.steps,
                                                args.seed, args.batch_size)
            rows.append(as_dict(quality) | {"seconds": round(time.perf_counter() - start, 2)})
            results["tiny-dit"] = rows
            save()
            print(f"tiny-dit g={guidance}: class accuracy {quality.class_accuracy:.4f}, "
                  f"classifier-FID {quality.classifier_fid:.3f}", flush=True)

    if "tiny-mmdit" in models:
        pipe = load_pipeline("tiny-mmdit", device=device)
        pipe.set_progress_bar_config(disable=True)
        if args.grid_dir is not None:
            scenes = evaluation_scenes(16, args.seed + 7)
            captions = [caption_for(items) for items in scenes]
            generator = torch.Generator(device=device).manual_seed(args.seed)
            images = pipe(prompt=captions, generator=generator, num_inference_steps=args.steps, output_type="np").images
            mmdit_grid(images, captions, 4, args.grid_dir / "zoo_tiny_mmdit.png")
        rows = []
        for guidance in _floats(args.mmdit_guidance):
            start = time.perf_counter()
            quality, _, _ = evaluate_tiny_mmdit(pipe, classifier, guidance, args.mmdit_scenes, args.steps, args.seed,
                                                min(args.batch_size, 250))
            rows.append(as_dict(quality) | {"seconds": round(time.perf_counter() - start, 2)})
            results["tiny-mmdit"] = rows
            save()
            print(f"tiny-mmdit g={guidance}: item class {quality.item_class_accuracy:.4f}, colour "
                  f"{quality.item_colour_accuracy:.4f}, empty regions {quality.empty_region_accuracy:.4f}", flush=True)

    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
