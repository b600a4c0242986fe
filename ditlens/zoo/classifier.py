"""A small Fashion-MNIST CNN used to judge generated images (class accuracy, classifier-FID).

``FashionClassifier.predict`` takes raw Fashion-MNIST arrays (uint8 [N, 28, 28]) and the
pipelines' numpy outputs alike (float [N, H, W, C] in [0, 1], C = 1 or 3, H = W = 28, 32 or
64 crops): colour images are reduced to their brightest channel (the scene colours each have
one channel at full strength), 32x32 images lose the 2-pixel border the DiT was trained with,
other sizes are resized to 28x28.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg
from torch import nn

from ditlens.errors import DitlensError

from .data import ITEM_SIZE, NUM_CLASSES

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
REFERENCE_NAME = "test_features.npz"
PIXEL_MEAN = 0.286  # Fashion-MNIST training-set mean and std of pixel values in [0, 1]
PIXEL_STD = 0.353


@dataclass
class ClassifierConfig:
    """Architecture of the CNN."""

    channels: tuple[int, int, int] = (32, 64, 128)
    feature_dim: int = 128
    num_classes: int = NUM_CLASSES


class FashionCNN(nn.Module):
    """conv-conv-pool, conv-conv-pool, conv, global average; a 128-d penultimate layer."""

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        c1, c2, c3 = config.channels

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.body = nn.Sequential(
            *block(1, c1), *block(c1, c1), nn.MaxPool2d(2),  # 14x14
            *block(c1, c2), *block(c2, c2), nn.MaxPool2d(2),  # 7x7
            *block(c2, c3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.penultimate = nn.Sequential(nn.Linear(c3, config.feature_dim), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.penultimate(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


def to_classifier_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Normalised float32 [N, 1, 28, 28] from any accepted image layout (see module doc)."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    array = np.asarray(images)
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    else:
        array = array.astype(np.float32)
    if array.ndim == 2:
        array = array[None]
    if array.ndim == 3:  # [N, H, W] grey
        array = array[..., None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise DitlensError(
            f"images of shape {tuple(np.shape(images))} are not understood: pass [N, 28, 28] uint8 or "
            "[N, H, W, 1|3] floats in [0, 1]"
        )
    grey = array.max(axis=-1)  # colour scenes: brightest channel = grey value of the item
    tensor = torch.from_numpy(np.ascontiguousarray(grey))[:, None]
    size = tensor.shape[-1]
    if tensor.shape[-2] != size:
        raise DitlensError(f"images must be square, got {tensor.shape[-2]}x{size}")
    if size == ITEM_SIZE + 4:  # the DiT's 32x32 canvas: a 28x28 item with a 2-pixel border
        tensor = tensor[:, :, 2:-2, 2:-2]
    elif size != ITEM_SIZE:
        tensor = F.interpolate(tensor, size=(ITEM_SIZE, ITEM_SIZE), mode="bilinear", antialias=True, align_corners=False)
    return ((tensor.clamp(0.0, 1.0) - PIXEL_MEAN) / PIXEL_STD).contiguous()


def frechet_distance(mean_a: np.ndarray, cov_a: np.ndarray, mean_b: np.ndarray, cov_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2)), in float64."""
    mean_a, mean_b = np.asarray(mean_a, np.float64), np.asarray(mean_b, np.float64)
    cov_a, cov_b = np.asarray(cov_a, np.float64), np.asarray(cov_b, np.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(cov_a @ cov_b)
    if caught or not np.isfinite(covmean).all():
        # Singular product (e.g. always-zero ReLU features): regularise both covariances a
        # little, as the usual FID implementations do.
        eps = 1e-6 * np.eye(cov_a.shape[0])
        covmean = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    covmean = np.real(covmean)
    diff = mean_a - mean_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean))


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of [N, D] features, float64."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise DitlensError(f"FID needs at least 2 feature rows, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


@dataclass(frozen=True)
class FeatureReference:
    """Mean and covariance of the classifier's features on the real Fashion-MNIST test set."""

    mean: np.ndarray
    cov: np.ndarray
    count: int


class FashionClassifier:
    """The trained CNN with numpy-in, numpy-out helpers."""

    def __init__(self, model: FashionCNN, config: ClassifierConfig, reference: FeatureReference | None = None) -> None:
        self.model = model.eval()
        self.config = config
        self.reference = reference

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def _run(self, images: np.ndarray | torch.Tensor, want_features: bool, batch_size: int) -> np.ndarray:
        inputs = to_classifier_input(images)
        outputs = []
        for start in range(0, len(inputs), batch_size):
            chunk = inputs[start : start + batch_size].to(self.device)
            result = self.model.features(chunk) if want_features else self.model(chunk)
            outputs.append(result.float().cpu().numpy())
        if not outputs:
            width = self.config.feature_dim if want_features else self.config.num_classes
            return np.zeros((0, width), np.float32)
        return np.concatenate(outputs)

    def logits(self, images: np.ndarray | torch.Tensor, batch_size: int = 512) -> np.ndarray:
        return self._run(images, want_features=False, batch_size=batch_size)

    def predict(self, images: np.ndarray | torch.Tensor, batch_size: int = 512) -> np.ndarray:
        """Class indices [N] (int64)."""
        return self.logits(images, batch_size).argmax(axis=1).astype(np.int64)

    def features(self, images: np.ndarray | torch.Tensor, batch_size: int = 512) -> np.ndarray:
        """Penultimate-layer features [N, feature_dim] (float32)."""
        return self._run(images, want_features=True, batch_size=batch_size)

    def fid(self, features: np.ndarray, reference: FeatureReference | None = None) -> float:
        """Classifier-feature FID of ``features`` (from :meth:`features`) against the real test set."""
        reference = reference or self.reference
        if reference is None:
            raise DitlensError("this classifier has no test-set feature reference: pass reference= or reload it")
        mean, cov = feature_statistics(features)
        return frechet_distance(mean, cov, reference.mean, reference.cov)

    def save(self, folder: str | Path) -> None:
        """Write config.json, fp16 model.safetensors and (if known) test_features.npz."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        state = {}
        for name, tensor in self.model.state_dict().items():
            # BatchNorm's counter stays integer; everything else is stored in fp16.
            state[name] = tensor.detach().cpu().contiguous() if not tensor.is_floating_point() else tensor.detach().cpu().half().contiguous()
        save_file(state, str(folder / WEIGHTS_NAME))
        if self.reference is not None:
            np.savez(
                folder / REFERENCE_NAME,
                mean=self.reference.mean.astype(np.float64),
                cov=self.reference.cov.astype(np.float64),
                count=np.int64(self.reference.count),
            )

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> "FashionClassifier":
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / CONFIG_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
            raise DitlensError(f"no classifier weights in {folder}: expected {CONFIG_NAME} and {WEIGHTS_NAME}")
        raw = json.loads((folder / CONFIG_NAME).read_text())
        config = ClassifierConfig(
            channels=tuple(raw["channels"]), feature_dim=int(raw["feature_dim"]), num_classes=int(raw["num_classes"])
        )
        model = FashionCNN(config)
        state = {name: t.float() if t.is_floating_point() else t for name, t in load_file(str(folder / WEIGHTS_NAME)).items()}
        model.load_state_dict(state)
        reference = None
        if (folder / REFERENCE_NAME).is_file():
            with np.load(folder / REFERENCE_NAME) as stats:
                reference = FeatureReference(mean=stats["mean"], cov=stats["cov"], count=int(stats["count"]))
        return cls(model.to(device), config, reference)
