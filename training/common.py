"""Shared pieces of the training scripts: seeding, device, EMA, wall-clock budget, run records."""

from __future__ import annotations

import json
import random
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def setup_fast_math(device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def autocast_for(device: torch.device) -> AbstractContextManager:
    """bf16 autocast on CUDA; plain fp32 on the CPU (CPU bf16 is slow and only for smoke runs)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


class ExponentialMovingAverage:
    """EMA of a module's parameters, with the usual warm-up: decay_n = min(decay, (1+n)/(10+n))."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.shadow = [p.detach().clone().float() for p in self.params]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - decay)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for param, shadow in zip(self.params, self.shadow):
            param.copy_(shadow.to(param.dtype))


def warmup_lr(step: int, base_lr: float, warmup_steps: int) -> float:
    return base_lr * min(1.0, (step + 1) / max(1, warmup_steps))


class WallClock:
    """Stops a loop after ``max_seconds`` (0 = no limit)."""

    def __init__(self, max_seconds: float) -> None:
        self.max_seconds = max_seconds
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def expired(self) -> bool:
        return self.max_seconds > 0 and self.elapsed() >= self.max_seconds


@dataclass
class RunRecord:
    """What a training run did: written beside the weights as train_record.json."""

    script: str
    args: dict
    device: str
    torch_version: str
    steps: int = 0
    seconds: float = 0.0
    final_loss: float = float("nan")
    metrics: dict = field(default_factory=dict)

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
