"""Model-only inference throughput and latency (no HTTP): eager, TorchScript, CUDA graphs.

    python bench/infer_bench.py [--weights RUN_OR_VERSION_DIR] [--device auto]
                                [--batch-sizes 1 32 256 1024] [--iters 50]

The measured graph is the served one: uint8 images in, probabilities and attention
out (normalisation inside). Without --weights a freshly initialised model is used
(speed does not depend on the weights). Prints a table; --json writes the rows too.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
from timing import device_name, seconds_per_call

from seednet.constants import CIFAR10_MEAN, CIFAR10_STD
from seednet.device import resolve_device
from seednet.graph import InferenceModel
from seednet.model import ARCHITECTURES, build_model
from training.loading import load_model


def _cuda_graph(fn: Callable[[torch.Tensor], object], example: torch.Tensor):
    """Capture ``fn(static_input)`` once; replays cost one launch."""
    static_in = example.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(static_in)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(static_in)
    return graph.replay


def run(
    model: InferenceModel,
    device: torch.device,
    batch_sizes: list[int],
    iters: int,
    cuda_graphs: bool,
    torchscript: bool,
) -> list[dict]:
    model = model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    variants: list[tuple[str, str, Callable]] = []

    def eager(dtype):
        def call(x):
            with (
                torch.no_grad(),
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"),
            ):
                return model(x)

        return call

    precisions = ["fp32", "bf16"] if device.type == "cuda" else ["fp32"]
    for prec in precisions:
        variants.append(("eager", prec, eager(prec)))
    if torchscript:
        scripted = torch.jit.freeze(torch.jit.script(model))

        def ts_call(x):
            with torch.no_grad():
                return scripted(x)

        variants.append(("torchscript", "fp32", ts_call))
    rows = []
    for b in batch_sizes:
        x = torch.randint(0, 256, (b, 3, 32, 32), dtype=torch.uint8, device=device)
        for name, prec, fn in variants:
            iters_b = max(5, iters if b <= 256 else iters // 4)
            sec = seconds_per_call(lambda fn=fn, x=x: fn(x), iters_b, device)
            rows.append(
                {
                    "backend": name,
                    "precision": prec,
                    "cuda_graph": False,
                    "batch": b,
                    "ms_per_batch": sec * 1e3,
                    "images_per_second": b / sec,
                }
            )
            if cuda_graphs and device.type == "cuda" and name == "eager":
                replay = _cuda_graph(fn, x)
                sec = seconds_per_call(replay, iters_b, device)
                rows.append(
                    {
                        "backend": name,
                        "precision": prec,
                        "cuda_graph": True,
                        "batch": b,
                        "ms_per_batch": sec * 1e3,
                        "images_per_second": b / sec,
                    }
                )
            r = rows[-1]
            print(
                f"{r['backend']:<12} {r['precision']:<5} {str(r['cuda_graph']):<6} "
                f"{b:>6} {r['ms_per_batch']:>10.3f} {r['images_per_second']:>12.0f}",
                flush=True,
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--weights", type=Path, help="run dir or registry version dir")
    p.add_argument("--arch", choices=sorted(ARCHITECTURES), default="seednet")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 256, 1024])
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--no-torchscript", action="store_true")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.weights:
        net, what = load_model(args.weights)
    else:
        net, what = build_model(ARCHITECTURES[args.arch]).eval(), f"{args.arch} (random init)"
    model = InferenceModel(net, CIFAR10_MEAN, CIFAR10_STD)
    name = device_name(device)
    print(
        f"# infer_bench {what} on {name}, torch {torch.__version__}, "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
    )
    print(
        f"{'backend':<12} {'prec':<5} {'graph':<6} {'batch':>6} {'ms/batch':>10} {'images/s':>12}"
    )
    rows = run(
        model,
        device,
        args.batch_sizes,
        args.iters,
        not args.no_cuda_graphs,
        not args.no_torchscript,
    )
    if args.json:
        args.json.write_text(json.dumps({"device": name, "model": what, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
