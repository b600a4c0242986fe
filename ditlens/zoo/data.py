"""Fashion-MNIST reading and the composed-scene data of tiny-mmdit.

The images come from the Debian package ``dataset-fashion-mnist`` (idx files, gzip).
Set ``DITLENS_FASHION_MNIST`` to read them from another folder.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ditlens.errors import DitlensError

# Where Debian's dataset-fashion-mnist installs the idx files (a system location, not a user path).
DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "DITLENS_FASHION_MNIST"

# Canonical class names, one word group per class index (Fashion-MNIST order).
FASHION_CLASSES: tuple[str, ...] = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
NUM_CLASSES = len(FASHION_CLASSES)

# Other spellings users type; each maps to a class index.
CLASS_ALIASES: dict[str, int] = {
    "t-shirt/top": 0,
    "tshirt": 0,
    "t shirt": 0,
    "trousers": 1,
    "pants": 1,
    "sweater": 2,
    "sneakers": 7,
    "boot": 9,
    "ankle-boot": 9,
    "ankle_boot": 9,
}

# Colours of tiny-mmdit scenes: each has a channel at full strength, so the brightest
# channel of a coloured item equals its grey value (what the classifier reads).
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "magenta": (1.0, 0.0, 1.0),
    "cyan": (0.0, 1.0, 1.0),
    "white": (1.0, 1.0, 1.0),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)

# Quadrants of the 64x64 canvas: (row, column) of the 32x32 cell, and the caption words.
REGIONS: tuple[tuple[str, int, int], ...] = (
    ("top left", 0, 0),
    ("top right", 0, 1),
    ("bottom left", 1, 0),
    ("bottom right", 1, 1),
)
REGION_NAMES: tuple[str, ...] = tuple(name for name, _, _ in REGIONS)
CANVAS_SIZE = 64
CELL_SIZE = 32
ITEM_SIZE = 28
ITEM_OFFSET = (CELL_SIZE - ITEM_SIZE) // 2  # the 28x28 item sits centred in its 32x32 cell


def fashion_mnist_dir() -> Path:
    """The folder holding the four idx.gz files."""
    return Path(os.environ.get(FASHION_MNIST_ENV, DEBIAN_FASHION_MNIST_DIR))


def _read_idx(path: Path) -> np.ndarray:
    """Read one gzip'd idx file (big-endian header: magic, then one uint32 per dimension)."""
    if not path.is_file():
        raise DitlensError(
            f"Fashion-MNIST file {path} is missing: install the Debian package dataset-fashion-mnist "
            f"or set {FASHION_MNIST_ENV} to the folder holding the idx.gz files"
        )
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    magic = int.from_bytes(raw[0:4], "big")
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte data
        raise DitlensError(f"{path} is not an unsigned-byte idx file (magic {magic:#x})")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DitlensError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {data.size}")
    return data.reshape(shape).copy()  # frombuffer is read-only; torch wants writable arrays


@dataclass(frozen=True)
class FashionSplit:
    """One split of Fashion-MNIST: images uint8 [N, 28, 28] and labels int64 [N]."""

    images: np.ndarray
    labels: np.ndarray


def load_fashion_mnist(split: str) -> FashionSplit:
    """Load ``"train"`` (60,000) or ``"test"`` (10,000) images with their labels."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise DitlensError(f"unknown Fashion-MNIST split {split!r}: use 'train' or 'test'")
    folder = fashion_mnist_dir()
    images = _read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")
    labels = _read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    return FashionSplit(images=images, labels=labels)


def class_index(label: int | str) -> int:
    """A class index from an int or a class name (case-insensitive, aliases accepted)."""
    if isinstance(label, (int, np.integer)):
        if not 0 <= int(label) < NUM_CLASSES:
            raise DitlensError(f"class index {label} is out of range: use 0..{NUM_CLASSES - 1}")
        return int(label)
    if isinstance(label, str):
        key = " ".join(label.strip().lower().split())
        if key in FASHION_CLASSES:
            return FASHION_CLASSES.index(key)
        if key in CLASS_ALIASES:
            return CLASS_ALIASES[key]
        raise DitlensError(f"unknown class name {label!r}: use one of {', '.join(FASHION_CLASSES)}")
    raise DitlensError(f"class label {label!r} must be an int or a class name")


# --------------------------------------------------------------------------------------
# Composed scenes (tiny-mmdit)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneItem:
    """One item of a scene: Fashion-MNIST class, colour name, region name."""

    class_id: int
    colour: str
    region: str


def caption_for(items: list[SceneItem] | tuple[SceneItem, ...]) -> str:
    """The caption of a scene, items in the order given: 'a red sneaker top left and a blue bag bottom right'."""
    phrases = [f"a {item.colour} {FASHION_CLASSES[item.class_id]} {item.region}" for item in items]
    if not phrases:
        return ""
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def random_scene(rng: np.random.Generator, min_items: int = 2, max_items: int = 3) -> list[SceneItem]:
    """2-3 items in distinct regions, random classes and colours, listed in random order."""
    count = int(rng.integers(min_items, max_items + 1))
    regions = rng.permutation(len(REGIONS))[:count]
    return [
        SceneItem(
            class_id=int(rng.integers(NUM_CLASSES)),
            colour=COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))],
            region=REGION_NAMES[int(region)],
        )
        for region in regions
    ]


def compose_scenes(
    item_images: torch.Tensor,
    region_index: torch.Tensor,
    colour_rgb: torch.Tensor,
    present: torch.Tensor,
) -> torch.Tensor:
    """Paint coloured items into their quadrants of a black 64x64 canvas.

    item_images: float [B, S, 28, 28] in [0, 1] (S item slots per scene);
    region_index: long [B, S] quadrant of each slot (distinct within a scene);
    colour_rgb: float [B, S, 3]; present: bool [B, S] (absent slots paint nothing).
    Returns float [B, 3, 64, 64] in [0, 1].
    """
    batch, slots = region_index.shape
    cells = torch.zeros(batch, len(REGIONS), 3, CELL_SIZE, CELL_SIZE, device=item_images.device)
    painted = item_images[:, :, None] * colour_rgb[:, :, :, None, None] * present[:, :, None, None, None]
    lo, hi = ITEM_OFFSET, ITEM_OFFSET + ITEM_SIZE
    rows = torch.arange(batch, device=item_images.device)
    for slot in range(slots):
        # Regions are distinct within a scene, so each (row, region) cell is written at most once.
        cells[rows, region_index[:, slot], :, lo:hi, lo:hi] += painted[:, slot]
    # cells [B, 4, 3, 32, 32] in REGIONS order (tl, tr, bl, br) -> canvas [B, 3, 64, 64]
    grid = cells.view(batch, 2, 2, 3, CELL_SIZE, CELL_SIZE)
    return grid.permute(0, 3, 1, 4, 2, 5).reshape(batch, 3, CANVAS_SIZE, CANVAS_SIZE)


def region_crops(images: np.ndarray) -> np.ndarray:
    """Cut [N, 64, 64, C] canvases into their items: [N, 4, 28, 28, C] in REGIONS order."""
    lo, hi = ITEM_OFFSET, ITEM_OFFSET + ITEM_SIZE
    crops = []
    for _, row, col in REGIONS:
        top, left = row * CELL_SIZE, col * CELL_SIZE
        crops.append(images[:, top + lo : top + hi, left + lo : left + hi, :])
    return np.stack(crops, axis=1)


def nearest_colour(crops: np.ndarray, min_brightness: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """Name the colour of each RGB crop [N, H, W, 3] in [0, 1].

    The mean colour of the pixels whose brightest channel exceeds ``min_brightness`` is scaled
    so that its brightest channel is 1 (item shading does not change the hue), then matched to
    the nearest entry of COLOURS. Returns (colour index [N], lit pixel count [N]); crops with no
    lit pixel get index -1.
    """
    palette = np.asarray(list(COLOURS.values()), dtype=np.float64)
    brightness = crops.max(axis=-1)
    lit = brightness > min_brightness
    counts = lit.reshape(len(crops), -1).sum(axis=1)
    sums = (crops * lit[..., None]).reshape(len(crops), -1, 3).sum(axis=1)
    mean = sums / np.maximum(counts, 1)[:, None]
    scaled = mean / np.maximum(mean.max(axis=1, keepdims=True), 1e-8)
    distance = ((scaled[:, None, :] - palette[None]) ** 2).sum(axis=-1)
    index = distance.argmin(axis=1)
    index[counts == 0] = -1
    return index, counts
