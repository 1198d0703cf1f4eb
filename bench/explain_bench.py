"""What an explanation costs on the CPU: time per call and peak memory, per model.

    python bench/explain_bench.py [--models seednet@1 seednet-small@1] [--repeats 7]

Each model runs in a fresh process (so its peak resident memory is its own): load the
explainer from the registry's verified weights, warm up, then time ``Explainer.explain``
on one real test image (all blocks and macro blocks; each block alone; the macro blocks
need every block after the first macro block's input) and on 8 images, beside one
forward pass of the served graph (no gradients) for scale. Median and fastest of
``--repeats`` calls; torch's intra-op threads as set for the process. Prints a table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

from hostinfo import cpu_model  # (bench/ is on the path when run as a script)

REPO = Path(__file__).resolve().parents[1]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def timed(fn, repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000, min(times) * 1000


def measure(ref: str, repeats: int, queue) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from registry import Registry
    from seednet.explain import Explainer
    from training.data import default_source

    root = Path(default_source())
    root = root if root.is_absolute() else (REPO / root).resolve()
    files = sorted((root / "test" / "cat").glob("*.jpg"))[:8]
    images = np.stack([np.asarray(Image.open(f).convert("RGB")).transpose(2, 0, 1) for f in files])
    registry = Registry(REPO / "models")
    explainer = Explainer.from_registry(registry, registry.resolve(*ref.split("@")))
    one = images[:1]
    with torch.inference_mode():
        explainer.model(torch.from_numpy(one))
    rss_loaded = peak_rss_mib()
    explainer.explain(one)  # warm-up

    def forward():
        with torch.inference_mode():
            explainer.model(torch.from_numpy(one))

    rows = [("forward pass only (no gradients), 1 image", *timed(forward, repeats))]
    rows.append(
        (
            "explain 1 image: all blocks + macro blocks",
            *timed(lambda: explainer.explain(one), repeats),
        )
    )
    rss_one = peak_rss_mib()
    for b in range(1, explainer.num_blocks + 1):
        rows.append(
            (
                f"explain 1 image: block {b} only",
                *timed(lambda b=b: explainer.explain(one, blocks=[b], macro=False), repeats),
            )
        )
    rows.append(
        ("explain 8 images: all", *timed(lambda: explainer.explain(images), max(1, repeats // 2)))
    )
    queue.put(
        {
            "model": ref,
            "rows": rows,
            "rss_loaded_mib": rss_loaded,
            "rss_after_one_mib": rss_one,
            "rss_after_eight_mib": peak_rss_mib(),
            "threads": torch.get_num_threads(),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["seednet@1", "seednet-small@1"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    results = []
    started = datetime.now(timezone.utc)
    load_before = Path("/proc/loadavg").read_text().split()[0]
    for ref in args.models:
        queue = context.Queue()
        process = context.Process(target=measure, args=(ref, args.repeats, queue))
        process.start()
        results.append(queue.get())
        process.join()
    load_after = Path("/proc/loadavg").read_text().split()[0]
    print(
        f"\n{cpu_model()}, {results[0]['threads']} torch threads, "
        f"{started.isoformat(timespec='minutes')}, load average {load_before} -> {load_after}\n"
    )
    print("| model | call | median ms | fastest ms |")
    print("| --- | --- | ---: | ---: |")
    for r in results:
        for name, median, best in r["rows"]:
            print(f"| {r['model']} | {name} | {median:.0f} | {best:.0f} |")
    print("\n| model | peak RSS after load + one forward | after explaining 1 image | after 8 |")
    print("| --- | ---: | ---: | ---: |")
    for r in results:
        print(
            f"| {r['model']} | {r['rss_loaded_mib']:.0f} MiB | {r['rss_after_one_mib']:.0f} MiB "
            f"| {r['rss_after_eight_mib']:.0f} MiB |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
