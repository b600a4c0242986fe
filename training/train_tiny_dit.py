"""Train tiny-dit: a class-conditional DiT on Fashion-MNIST (32x32 grey, pixel space).

    python -m training.train_tiny_dit --steps 6000 --max-seconds 0     # exact replay of a run
    python -m training.train_tiny_dit --max-seconds 170                # as on the H100
    python -m training.train_tiny_dit --steps 3 --batch-size 8 --out /tmp/dit   # CPU smoke run

Epsilon prediction under DDPM's linear beta schedule (1000 steps); labels are replaced by the
null class (index 10) with probability 0.1 so that one model gives both CFG branches. The
EMA weights are saved as a diffusers pipeline folder (fp16 safetensors).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.models.embeddings import LabelEmbedding
from tqdm.auto import tqdm

from ditlens.zoo.architectures import TinyDiTArchitecture, build_tiny_dit_scheduler, build_tiny_dit_transformer
from ditlens.zoo.data import NUM_CLASSES, load_fashion_mnist
from ditlens.zoo.pipelines import TinyDiTPipeline

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

DEFAULT_OUT = Path("ditlens/zoo/weights/tiny-dit")
DEFAULT_RECORD = Path("training/records/tiny-dit.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--record", type=Path, default=DEFAULT_RECORD)
    parser.add_argument("--steps", type=int, default=100_000, help="most optimiser steps")
    parser.add_argument("--max-seconds", type=float, default=170.0, help="stop after this long (0 = never)")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--label-dropout", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit-train", type=int, default=0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    seed_everything(args.seed)
    device = pick_device(args.device)
    setup_fast_math(device)
    train = load_fashion_mnist("train")
    count = args.limit_train or len(train.labels)
    # [N, 1, 32, 32] in [-1, 1]: 28x28 padded with 2 black pixels each side.
    images = torch.from_numpy(train.images[:count]).float().div(127.5).sub(1.0)
    images = F.pad(images, (2, 2, 2, 2), value=-1.0)[:, None].to(device)
    labels = torch.from_numpy(train.labels[:count]).to(device)

    arch = TinyDiTArchitecture()
    model = build_tiny_dit_transformer(arch).to(device)
    # diffusers' DiT drops labels inside every block independently while training; we want one
    # drop decision per sample shared by all blocks, so switch theirs off and drop here.
    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0
    noise_schedule = DDPMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
    alphas_cumprod = noise_schedule.alphas_cumprod.to(device)

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99),
                                  fused=device.type == "cuda")
    ema = ExponentialMovingAverage(model, args.ema_decay)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    clock = WallClock(args.max_seconds)
    record = RunRecord(script="training.train_tiny_dit", args={k: str(v) for k, v in vars(args).items()},
                       device=str(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
                       torch_version=torch.__version__)
    params = sum(p.numel() for p in model.parameters())
    print(f"tiny-dit: {params / 1e6:.2f} M parameters, {count} training images, device {record.device}")

    model.train()
    step = 0
    loss = torch.zeros((), device=device)
    progress = tqdm(total=args.steps, desc="tiny-dit", mininterval=5.0)
    while step < args.steps and not clock.expired():
        index = torch.randint(0, count, (args.batch_size,), device=device, generator=generator)
        clean = images[index]
        y = labels[index]
        drop = torch.rand(args.batch_size, device=device, generator=generator) < args.label_dropout
        y = torch.where(drop, torch.full_like(y, NUM_CLASSES), y)
        t = torch.randint(0, 1000, (args.batch_size,), device=device, generator=generator)
        noise = torch.randn(clean.shape, device=device, generator=generator)
        abar = alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = abar.sqrt() * clean + (1 - abar).sqrt() * noise

        for group in optimizer.param_groups:
            group["lr"] = warmup_lr(step, args.lr, args.warmup)
        with autocast_for(device):
            predicted = model(noisy, timestep=t, class_labels=y, return_dict=False)[0]
        loss = F.mse_loss(predicted.float(), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        ema.update()
        step += 1
        progress.update(1)
        if step % 200 == 0:
            progress.set_postfix(loss=f"{float(loss.detach()):.4f}")
    progress.close()
    seconds = clock.elapsed()

    ema.copy_to_model()
    model.eval()
    pipeline = TinyDiTPipeline(transformer=model.to(torch.float16), scheduler=build_tiny_dit_scheduler())
    pipeline.save_pretrained(args.out, safe_serialization=True)

    record.steps = step
    record.seconds = round(seconds, 2)
    record.final_loss = float(loss.detach())
    record.metrics = {"parameters": params, "images_seen": step * args.batch_size}
    record.write(args.record)
    print(f"tiny-dit: {step} steps in {seconds:.1f} s ({step * args.batch_size / max(seconds, 1e-9):.0f} img/s), "
          f"final loss {record.final_loss:.4f}, saved to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
