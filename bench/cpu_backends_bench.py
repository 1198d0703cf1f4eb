"""CPU backends side by side on a registry version: ms per batch, images/s, accuracy.

    python bench/cpu_backends_bench.py [--root models] [--ref seednet@1]
                                       [--batch-sizes 1 8 64] [--rounds 8] [--seconds 0.3]
                                       [--ablation] [--json out.json]

Backends: TorchScript (torch's threads), ONNX Runtime with the library's defaults (what
the service used before), ONNX Runtime tuned (``seednet.runtimes``: what serves now),
OpenVINO, and the int8 export when ``python -m training quantize`` has recorded one.
``--ablation`` adds rows with one ONNX Runtime or OpenVINO setting changed at a time,
to show what each choice is worth. Each backend runs in its own process (idle while the
others are timed). Every cell is timed in ``--rounds`` short rounds that interleave the
backends (so a neighbour's load hits them alike), each running for ``--seconds`` (at
least one call) after a warm-up; the table gives the median call (and images/s from
it) and the best call (closest to an idle machine). Accuracy is what the
version's exports.json records (full test set), not measured here. The 1-, 5- and
15-minute load averages are printed before and after: other processes on the machine
show up there.

Needs the version's exports: ``python -m service.registry_cli materialize seednet@1``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from registry import Registry
from registry.manifest import EXPORT_FILES
from seednet.runtimes import (
    OpenVinoModel,
    default_threads,
    openvino_available,
    ort_run,
    ort_session,
)

Runner = Callable[[np.ndarray], object]


def _torchscript(path: Path) -> Runner:
    module = torch.jit.load(str(path), map_location="cpu").eval()

    def run(x: np.ndarray):
        with torch.inference_mode():
            return module(torch.from_numpy(x))

    return run


def _ort_defaults(path: Path) -> Runner:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: ort_run(session, x)


def _ort(path: Path, **options) -> Runner:
    session = ort_session(path, "cpu", **options)
    return lambda x: ort_run(session, x)


def _openvino(path: Path, **options) -> Runner:
    return OpenVinoModel(path, **options).run


def _variants(folder: Path) -> dict[str, tuple[str, Callable[[], Runner]]]:
    """Every row this script can measure: name -> (settings, opener)."""
    onnx, int8 = folder / EXPORT_FILES["onnx"], folder / EXPORT_FILES["onnx-int8"]
    n = default_threads()
    return {
        "torchscript": (
            f"torch, {torch.get_num_threads()} threads",
            lambda: _torchscript(folder / EXPORT_FILES["torchscript"]),
        ),
        "onnx (library defaults)": (
            "InferenceSession(path), nothing set",
            lambda: _ort_defaults(onnx),
        ),
        "onnx (tuned)": (f"ALL, {n} intra, 1 inter, sequential, no spin", lambda: _ort(onnx)),
        "openvino": (f"LATENCY, {n} threads, f32", lambda: _openvino(onnx)),
        "onnx-int8": (f"QDQ int8, tuned session, {n} intra", lambda: _ort(int8)),
        # --ablation: the tuned session with one setting changed
        "onnx: level disable": ("ORT_DISABLE_ALL", lambda: _ort(onnx, level="disable")),
        "onnx: level basic": ("ORT_ENABLE_BASIC", lambda: _ort(onnx, level="basic")),
        "onnx: level extended": ("ORT_ENABLE_EXTENDED", lambda: _ort(onnx, level="extended")),
        "onnx: 1 intra thread": ("1 intra-op thread", lambda: _ort(onnx, threads=1)),
        "onnx: parallel mode": (
            "ORT_PARALLEL, inter-op = library default",
            lambda: _ort(onnx, sequential=False, inter_op=None),
        ),
        "onnx: spinning on": ("intra-op threads spin", lambda: _ort(onnx, spinning=True)),
        "openvino: THROUGHPUT": (
            "THROUGHPUT hint, one request at a time",
            lambda: _openvino(onnx, hint="THROUGHPUT"),
        ),
    }


MAIN_ROWS = ("torchscript", "onnx (library defaults)", "onnx (tuned)", "openvino", "onnx-int8")


def time_calls(run: Runner, x: np.ndarray, seconds: float, min_calls: int = 1) -> list[float]:
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t0)
    return times


def _worker(conn, folder: str, name: str, batch_sizes: list[int]) -> None:
    """One backend in its own process; idle (blocked on the pipe) while others are timed.

    Separate processes keep one backend's thread pool (spinning or not) from stealing
    the cores while another is measured.
    """
    t0 = time.perf_counter()
    run = _variants(Path(folder))[name][1]()
    opened = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    inputs = {b: rng.integers(0, 256, (b, 3, 32, 32), dtype=np.uint8) for b in batch_sizes}
    for x in inputs.values():  # first calls allocate and pick kernels
        run(x)
    conn.send(opened)
    while (msg := conn.recv()) is not None:
        batch, seconds = msg
        conn.send(time_calls(run, inputs[batch], seconds))


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--root", type=Path, default=Path("models"))
    p.add_argument("--ref", default="seednet@1")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--seconds", type=float, default=0.3, help="per cell and round (>= 1 call)")
    p.add_argument("--ablation", action="store_true", help="also one setting changed at a time")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    registry = Registry(args.root)
    mv = registry.get(args.ref)
    for name in ("torchscript", "onnx"):
        registry.open_verified(mv, EXPORT_FILES[name])  # measure only verified exports
    derived = registry.derived(mv)
    accuracy = derived.get("accuracy", {})
    load_before = _load()
    print(
        f"# cpu_backends_bench {mv.ref} on {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, {default_threads()} threads, torch {torch.__version__}, "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, load average before: {load_before}"
    )
    names = [n for n in MAIN_ROWS if n != "openvino" or openvino_available()]
    if not (mv.path / EXPORT_FILES["onnx-int8"]).exists():
        names.remove("onnx-int8")
    else:
        registry.open_verified(mv, EXPORT_FILES["onnx-int8"])
    if args.ablation:
        names += [n for n in _variants(mv.path) if n not in MAIN_ROWS]
        if not openvino_available():
            names.remove("openvino: THROUGHPUT")
    settings = {n: _variants(mv.path)[n][0] for n in names}
    ctx = mp.get_context("spawn")
    workers = {}
    for name in names:
        here, there = ctx.Pipe()
        proc = ctx.Process(
            target=_worker, args=(there, str(mv.path), name, args.batch_sizes), daemon=True
        )
        proc.start()
        workers[name] = (proc, here)
        print(f"# opened {name} ({settings[name]}) in {here.recv():.2f} s", flush=True)
    samples: dict[tuple[str, int], list[float]] = {}
    for r in range(args.rounds):
        for name, (_proc, conn) in workers.items():
            for b in args.batch_sizes:
                time.sleep(0.2)  # let the previous backend's threads go idle
                conn.send((b, args.seconds))
                samples.setdefault((name, b), []).extend(conn.recv())
        print(f"# round {r + 1}/{args.rounds} done, load average {_load()}", flush=True)
    for proc, conn in workers.values():
        conn.send(None)
        proc.join(timeout=30)

    key = {"torchscript": "torchscript", "onnx (tuned)": "onnx", "onnx-int8": "onnx-int8"}
    print()
    print(
        "| backend | settings | batch | ms / batch (median) | images/s | best ms | calls "
        "| test accuracy |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    results = []
    for name in names:
        what = settings[name]
        acc = accuracy.get(key.get(name, ""), {}).get("accuracy")
        for b in args.batch_sizes:
            times = samples[(name, b)]
            ms, best = statistics.median(times) * 1e3, min(times) * 1e3
            results.append(
                {
                    "backend": name,
                    "settings": what,
                    "batch": b,
                    "ms_per_batch": ms,
                    "images_per_second": b / ms * 1e3,
                    "best_ms": best,
                    "calls": len(times),
                    "accuracy": acc,
                }
            )
            acc_text = f"{acc * 100:.2f} %" if isinstance(acc, float) else "-"
            print(
                f"| {name} | {what} | {b} | {ms:.2f} | {b / ms * 1e3:,.1f} | {best:.2f} "
                f"| {len(times)} "
                f"| {acc_text} |"
            )
    load_after = _load()
    print(f"\n# load average after: {load_after}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "ref": mv.ref,
                    "load_before": load_before,
                    "load_after": load_after,
                    "rows": results,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
