"""Train tiny-mmdit: an SD3-style MMDiT on captioned 64x64 scenes of coloured Fashion-MNIST items.

    python -m training.train_tiny_mmdit --steps 4000 --max-seconds 0    # exact replay of a run
    python -m training.train_tiny_mmdit --max-seconds 230               # as on the H100
    python -m training.train_tiny_mmdit --steps 2 --batch-size 4 --out /tmp/mm   # CPU smoke run

Each scene puts 2-3 training-set items, each tinted one of 7 colours, into distinct quadrants
of a black canvas; its caption lists them in random order ("a red sneaker top left, a cyan
dress bottom left and a white bag top right"). Rectified flow as SD3 trains it: x_t =
(1 - s) x0 + s noise, target noise - x0, s from a logit-normal shifted like the sampling
scheduler. The text encoder is trained jointly; 10% of captions are replaced by the empty
caption (the CFG negative). The EMA weights are saved as a diffusers pipeline folder.
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

from ditlens.zoo.architectures import (
    MMDIT_FLOW_SHIFT,
    TinyMMDiTArchitecture,
    build_tiny_mmdit_scheduler,
    build_tiny_mmdit_text,
    build_tiny_mmdit_transformer,
)
from ditlens.zoo.data import (
    COLOUR_NAMES,
    COLOURS,
    FASHION_CLASSES,
    NUM_CLASSES,
    REGION_NAMES,
    compose_scenes,
    load_fashion_mnist,
)
from ditlens.zoo.pipelines import TinyMMDiTPipeline

from .common import (
    ExponentialMovingAverage,
    RunRecord,
    WallClock,
    autocast_for,
    pick_device,
    seed_everything,
    setup_fast_math,
    warmup_lr,
)

DEFAULT_OUT = Path("ditlens/zoo/weights/tiny-mmdit")
DEFAULT_RECORD = Path("training/records/tiny-mmdit.json")
MAX_SLOTS = 3


class SceneSampler:
    """Random scene specifications (numpy, seeded) and their captions."""

    def __init__(self, seed: int, caption_dropout: float) -> None:
        self.rng = np.random.default_rng(seed)
        self.caption_dropout = caption_dropout

    def sample(self, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
        counts = self.rng.integers(2, MAX_SLOTS + 1, batch)
        present = np.arange(MAX_SLOTS)[None, :] < counts[:, None]
        # A random permutation of the quadrants per scene; slot order is caption order.
        regions = np.argsort(self.rng.random((batch, len(REGION_NAMES))), axis=1)[:, :MAX_SLOTS]
        classes = self.rng.integers(0, NUM_CLASSES, (batch, MAX_SLOTS))
        colours = self.rng.integers(0, len(COLOUR_NAMES), (batch, MAX_SLOTS))
        dropped = self.rng.random(batch) < self.caption_dropout
        captions = []
        for row in range(batch):
            if dropped[row]:
                captions.append("")
                continue
            phrases = [
                f"a {COLOUR_NAMES[colours[row, s]]} {FASHION_CLASSES[classes[row, s]]} {REGION_NAMES[regions[row, s]]}"
                for s in range(counts[row])
            ]
            captions.append(", ".join(phrases[:-1]) + " and " + phrases[-1])
        return present, regions, classes, colours, captions


def batch_loss(text_encoder: torch.nn.Module, transformer: torch.nn.Module, tokens, noisy: torch.Tensor,
               sigma: torch.Tensor, target: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Rectified-flow loss of one batch (the velocity noise - x0 at noise level sigma)."""
    with autocast_for(device):
        hidden, pooled = text_encoder(tokens.input_ids.to(device, non_blocking=True),
                                      tokens.attention_mask.to(device, non_blocking=True))
        predicted = transformer(hidden_states=noisy, timestep=sigma * 1000.0, encoder_hidden_states=hidden,
                                pooled_projections=pooled, return_dict=False)[0]
    return F.mse_loss(predicted.float(), target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--record", type=Path, default=DEFAULT_RECORD)
    parser.add_argument("--steps", type=int, default=100_000, help="most optimiser steps")
    parser.add_argument("--max-seconds", type=float, default=230.0, help="stop after this long (0 = never)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--caption-dropout", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--init-from", type=Path, default=None,
                        help="continue from the transformer and text encoder of this pipeline folder")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the transformer and text encoder (falls back to eager if it fails)")
    parser.add_argument("--lr-decay", choices=["none", "cosine"], default="none",
                        help="cosine: decay to 0 over --steps, or over --max-seconds when that ends first")
    args = parser.parse_args(argv)

    seed_everything(args.seed)
    device = pick_device(args.device)
    setup_fast_math(device)
    train = load_fashion_mnist("train")
    # Items grouped by class ([10, n_per_class, 28, 28] in [0, 1]) so a scene can ask for a class.
    order = np.argsort(train.labels, kind="stable")
    per_class = np.bincount(train.labels, minlength=NUM_CLASSES).min()
    grouped = np.stack([train.images[order][train.labels[order] == c][:per_class] for c in range(NUM_CLASSES)])
    items = torch.from_numpy(grouped).to(device).float().div(255.0)
    palette = torch.tensor(list(COLOURS.values()), device=device)

    arch = TinyMMDiTArchitecture()
    transformer = build_tiny_mmdit_transformer(arch)
    tokenizer, text_encoder = build_tiny_mmdit_text(arch)
    if args.init_from is not None:
        # A second stage: same architecture, weights from an earlier run's saved (EMA) pipeline.
        earlier = TinyMMDiTPipeline.from_pretrained(str(args.init_from), low_cpu_mem_usage=False)
        transformer.load_state_dict(earlier.transformer.float().state_dict())
        text_encoder.load_state_dict(earlier.text_encoder.float().state_dict())
        del earlier
    transformer = transformer.to(device)
    text_encoder = text_encoder.to(device)
    trainable = list(transformer.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99),
                                  fused=device.type == "cuda")
    both = torch.nn.ModuleList([transformer, text_encoder])
    ema = ExponentialMovingAverage(both, args.ema_decay)
    sampler = SceneSampler(args.seed, args.caption_dropout)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    clock = WallClock(args.max_seconds)
    record = RunRecord(script="training.train_tiny_mmdit", args={k: str(v) for k, v in vars(args).items()},
                       device=str(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
                       torch_version=torch.__version__)
    params = sum(p.numel() for p in transformer.parameters())
    text_params = sum(p.numel() for p in text_encoder.parameters())
    print(f"tiny-mmdit: {params / 1e6:.2f} M transformer + {text_params / 1e6:.2f} M text-encoder parameters, "
          f"device {record.device}")

    both.train()
    run_transformer, run_text = transformer, text_encoder
    if args.compile:
        run_transformer, run_text = torch.compile(transformer), torch.compile(text_encoder)
    step = 0
    loss = torch.zeros((), device=device)
    progress = tqdm(total=args.steps, desc="tiny-mmdit", mininterval=5.0)
    while step < args.steps and not clock.expired():
        batch = args.batch_size
        present, regions, classes, colours, captions = sampler.sample(batch)
        tokens = tokenizer(captions)
        present_t = torch.from_numpy(present).to(device, non_blocking=True)
        regions_t = torch.from_numpy(regions).to(device, non_blocking=True)
        classes_t = torch.from_numpy(classes).to(device, non_blocking=True)
        colours_t = torch.from_numpy(colours).to(device, non_blocking=True)
        pick = torch.randint(0, items.shape[1], (batch, MAX_SLOTS), device=device, generator=generator)
        with torch.no_grad():
            canvas = compose_scenes(items[classes_t, pick], regions_t, palette[colours_t], present_t)
            clean = canvas * 2.0 - 1.0
            noise = torch.randn(clean.shape, device=device, generator=generator)
            logit = torch.randn(batch, device=device, generator=generator)
            s = torch.sigmoid(logit)
            sigma = MMDIT_FLOW_SHIFT * s / (1 + (MMDIT_FLOW_SHIFT - 1) * s)
            noisy = (1 - sigma.view(-1, 1, 1, 1)) * clean + sigma.view(-1, 1, 1, 1) * noise
            target = noise - clean

        lr = warmup_lr(step, args.lr, args.warmup)
        if args.lr_decay == "cosine":
            progress_fraction = max(step / args.steps, clock.elapsed() / args.max_seconds if args.max_seconds else 0.0)
            lr *= 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_fraction)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        try:
            loss = batch_loss(run_text, run_transformer, tokens, noisy, sigma, target, device)
            loss.backward()
        except Exception as err:  # a compiler failure must not cost the training run
            if run_transformer is transformer:
                raise
            print(f"torch.compile failed ({type(err).__name__}: {err}); training eagerly", flush=True)
            run_transformer, run_text = transformer, text_encoder
            optimizer.zero_grad(set_to_none=True)
            loss = batch_loss(run_text, run_transformer, tokens, noisy, sigma, target, device)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        ema.update()
        step += 1
        progress.update(1)
        if step % 200 == 0:
            progress.set_postfix(loss=f"{float(loss.detach()):.4f}")
    progress.close()
    seconds = clock.elapsed()

    ema.copy_to_model()
    both.eval()
    pipeline = TinyMMDiTPipeline(
        transformer=transformer.to(torch.float16),
        scheduler=build_tiny_mmdit_scheduler(),
        text_encoder=text_encoder.to(torch.float16),
        tokenizer=tokenizer,
    )
    pipeline.save_pretrained(args.out, safe_serialization=True)

    record.steps = step
    record.seconds = round(seconds, 2)
    record.final_loss = float(loss.detach())
    record.metrics = {"parameters": params, "text_encoder_parameters": text_params, "scenes_seen": step * batch}
    record.write(args.record)
    print(f"tiny-mmdit: {step} steps in {seconds:.1f} s ({step * batch / max(seconds, 1e-9):.0f} scenes/s), "
          f"final loss {record.final_loss:.4f}, saved to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
