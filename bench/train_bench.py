"""Training throughput: forward + backward + optimizer step at a few batch sizes.

    python bench/train_bench.py [--device auto] [--batch-sizes 32 128 512] [--steps 20]

Prints a table of images/s and the implied seconds per 50,000-image epoch. On CUDA it
uses what training uses (bf16 autocast, channels_last); ``--compile`` adds torch.compile.
Random uint8 images stand in for the data: the loop's cost does not depend on pixels.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone

import torch
import torch.nn.functional as F
from timing import device_name, seconds_per_call

from seednet.device import resolve_device
from seednet.graph import Normalize
from seednet.model import ARCHITECTURES, build_model
from training.data import Augmentation


def bench_batch(
    arch: str, device: torch.device, batch: int, steps: int, warmup: int, compile_model: bool
) -> float:
    model = build_model(ARCHITECTURES[arch]).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if compile_model else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    gen = torch.Generator(device=device).manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    aug = Augmentation(cutout=12)
    normalize = Normalize().to(device)

    def step() -> None:
        x = normalize(aug(images, gen))
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits, _ = step_model(x)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return batch / seconds_per_call(step, steps, device, warmup)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", choices=sorted(ARCHITECTURES), default="seednet")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128, 512])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    name = device_name(device)
    print(
        f"# train_bench {args.arch} on {name}, torch {torch.__version__}, "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
        f"{', torch.compile' if args.compile else ''}"
    )
    print(f"{'batch':>6} {'images/s':>10} {'s/epoch (50k)':>14}")
    rows = []
    for b in args.batch_sizes:
        ips = bench_batch(args.arch, device, b, args.steps, args.warmup, args.compile)
        rows.append({"batch": b, "images_per_second": ips, "seconds_per_epoch": 50000 / ips})
        print(f"{b:>6} {ips:>10.0f} {50000 / ips:>14.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": name, "arch": args.arch, "compile": args.compile, "rows": rows},
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
