"""Train the Fashion-MNIST classifier that judges generated images.

    python -m training.train_classifier            # full run (GPU: ~15 s)
    python -m training.train_classifier --epochs 1 --limit-train 2000 --out /tmp/clf   # smoke run

Writes config.json, model.safetensors (fp16) and test_features.npz (mean/cov of the
penultimate features over the 10,000 real test images, the classifier-FID reference).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ditlens.zoo.classifier import (
    PIXEL_MEAN,
    PIXEL_STD,
    ClassifierConfig,
    FashionClassifier,
    FashionCNN,
    FeatureReference,
    feature_statistics,
)
from ditlens.zoo.data import load_fashion_mnist

from .common import RunRecord, WallClock, autocast_for, pick_device, seed_everything, setup_fast_math

DEFAULT_OUT = Path("ditlens/zoo/weights/classifier")
DEFAULT_RECORD = Path("training/records/classifier.json")


def random_shift(images: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Translate each [B, 1, 28, 28] image by up to ``max_shift`` pixels (zero fill)."""
    batch = images.shape[0]
    padded = F.pad(images, (max_shift,) * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (batch, 2), generator=generator, device=images.device)
    span = torch.arange(images.shape[-1], device=images.device)
    rows = (offsets[:, 0:1] + span)[:, :, None]
    cols = (offsets[:, 1:2] + span)[:, None, :]
    batch_index = torch.arange(batch, device=images.device)[:, None, None]
    return padded[batch_index, 0, rows, cols][:, None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--record", type=Path, default=DEFAULT_RECORD)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-seconds", type=float, default=0.0, help="stop early after this long (0 = never)")
    parser.add_argument("--limit-train", type=int, default=0, help="use only this many training images (smoke runs)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    seed_everything(args.seed)
    device = pick_device(args.device)
    setup_fast_math(device)
    train = load_fashion_mnist("train")
    test = load_fashion_mnist("test")
    count = args.limit_train or len(train.labels)

    def to_input(images: np.ndarray) -> torch.Tensor:
        return ((torch.from_numpy(images).float() / 255.0 - PIXEL_MEAN) / PIXEL_STD)[:, None].to(device)

    # The augmentation shifts raw [0,1] images (zero fill = black), then normalises.
    train_raw = (torch.from_numpy(train.images[:count]).float() / 255.0)[:, None].to(device)
    train_labels = torch.from_numpy(train.labels[:count]).to(device)
    test_inputs = to_input(test.images)
    test_labels = torch.from_numpy(test.labels).to(device)

    config = ClassifierConfig()
    model = FashionCNN(config).to(device)
    steps_per_epoch = math.ceil(count / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=total_steps, pct_start=0.15)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    clock = WallClock(args.max_seconds)
    record = RunRecord(script="training.train_classifier", args={k: str(v) for k, v in vars(args).items()},
                       device=str(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
                       torch_version=torch.__version__)
    step = 0
    loss_value = float("nan")
    progress = tqdm(total=total_steps, desc="classifier", mininterval=2.0)
    for _epoch in range(args.epochs):
        order = torch.randperm(count, device=device, generator=generator)
        model.train()
        for start in range(0, count, args.batch_size):
            index = order[start : start + args.batch_size]
            inputs = (random_shift(train_raw[index], generator) - PIXEL_MEAN) / PIXEL_STD
            with autocast_for(device):
                loss = F.cross_entropy(model(inputs), train_labels[index], label_smoothing=0.05)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            progress.update(1)
            if step % 100 == 0:
                loss_value = float(loss.detach())
                progress.set_postfix(loss=f"{loss_value:.3f}")
            if clock.expired():
                break
        if clock.expired():
            break
    progress.close()
    loss_value = float(loss.detach())
    train_seconds = clock.elapsed()

    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(test_inputs[i : i + 1000]) for i in range(0, len(test_inputs), 1000)])
    accuracy = float((logits.argmax(1) == test_labels).float().mean())

    # Reference statistics from the fp16 weights that ship, so FIDs use exactly what users load.
    classifier = FashionClassifier(model, config)
    classifier.save(args.out)
    shipped = FashionClassifier.load(args.out, device=device)
    shipped_features = shipped.features(test.images)
    mean, cov = feature_statistics(shipped_features)
    shipped.reference = FeatureReference(mean=mean, cov=cov, count=len(shipped_features))
    shipped.save(args.out)
    shipped_accuracy = float((shipped.predict(test.images) == test.labels).mean())

    record.steps = step
    record.seconds = round(train_seconds, 2)
    record.final_loss = loss_value
    record.metrics = {"test_accuracy_fp32": accuracy, "test_accuracy_shipped_fp16": shipped_accuracy}
    record.write(args.record)
    print(f"classifier: {step} steps in {record.seconds:.1f} s, test accuracy {shipped_accuracy:.4f} (fp16 weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
