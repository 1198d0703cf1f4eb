"""perf_analyzer (Triton's load generator) against the service's inference protocol.

    python bench/oip_bench.py [--http 127.0.0.1:8000] [--grpc 127.0.0.1:8001]
                              [--model seednet] [--protocols http grpc]
                              [--batch 1]
                              [--concurrency 1 4 16] [--measurement-ms 3000]
                              [--stability 50] [--images ../shared/cifar10/test]
                              [--count 64] [--perf-analyzer PATH] [--json out.json]

One perf_analyzer run per (protocol, concurrency): ``--input-data`` holds ``--count``
real CIFAR-10 JPEGs as decoded pixels for ``images`` (UINT8 [3, 32, 32]), the input the
model advertises. (``image_bytes``, the encoded files, is accepted by the service but not
advertised, so perf_analyzer cannot drive it; its decode path is /predict's, measured by
bench/serve_bench.py.) ``--batch`` is the images per
request (perf_analyzer ``-b``). Each run measures windows of ``--measurement-ms``
until ``--stability`` percent agreement (perf_analyzer's own rule), then the script
prints perf_analyzer's figures as one table: inferences (= images) per second and
client-side latency percentiles. A run that fails (any request error, or no stable
measurement) shows its error instead and the script exits non-zero.

perf_analyzer comes from the ``tritonclient`` 2.41.0 wheel (dev extra; the
``perf-analyzer`` wheel on the package index here is an empty placeholder). The
binary needs ``libb64.so.0d`` (Debian: ``apt-get install libb64-0d``) and
``libcudart.so.12`` even on a CPU host: ``scripts/setup.sh dev`` puts the latter in
``.venv/perf_analyzer-libs`` (outside ``site-packages``, so torch never sees a second
CUDA runtime), and ``perf_analyzer_command`` adds it to ``LD_LIBRARY_PATH``.

Over gRPC perf_analyzer also calls Triton's ``ModelConfig`` rpc, which the service
implements beside KServe's six. Only loopback targets are accepted: this is a tool
for benchmarking one's own service.
"""

from __future__ import annotations

import argparse
import csv
import io
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_IMAGES = Path("../shared/cifar10/test")
#: Where scripts/setup.sh installs libcudart.so.12 (nvidia-cuda-runtime-cu12, --target).
LIBS_DIR = "perf_analyzer-libs/nvidia/cuda_runtime/lib"


class PerfAnalyzerUnavailable(RuntimeError):
    """perf_analyzer is not installed, or cannot start here (a missing shared library)."""


def perf_analyzer_command(explicit: str | None = None) -> tuple[str, dict[str, str]]:
    """The perf_analyzer binary and an environment it starts in; else PerfAnalyzerUnavailable."""
    venv_bin = Path(sys.executable).parent
    candidates = (
        [explicit] if explicit else [shutil.which("perf_analyzer"), venv_bin / "perf_analyzer"]
    )
    binary = next((str(c) for c in candidates if c and Path(c).is_file()), None)
    if binary is None:
        raise PerfAnalyzerUnavailable(
            "perf_analyzer not found (install the dev extra: tritonclient 2.41.0 ships it)"
        )
    env = dict(os.environ)
    libs = [p for p in os.environ.get("PERF_ANALYZER_LIBS", "").split(os.pathsep) if p]
    libs += [str(d) for d in (venv_bin.parent / LIBS_DIR,) if d.is_dir()]
    if libs:
        env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, env.get("LD_LIBRARY_PATH", "")]).rstrip(
            os.pathsep
        )
    try:
        probe = subprocess.run(
            [binary, "--version"], env=env, capture_output=True, text=True, timeout=60
        )
    except OSError as exc:
        raise PerfAnalyzerUnavailable(f"{binary} cannot run: {exc}") from None
    if probe.returncode != 0:
        reason = (probe.stderr or probe.stdout).strip().splitlines()[:1]
        raise PerfAnalyzerUnavailable(f"{binary} cannot start: {' '.join(reason)}")
    return binary, env


def input_data(files: list[bytes], kind: str = "images") -> dict:
    """perf_analyzer ``--input-data`` JSON for ``images``, one step per image."""
    if kind != "images":
        raise ValueError("only the advertised input, images, can be driven by perf_analyzer")
    steps = []
    for data in files:
        rgb = Image.open(io.BytesIO(data)).convert("RGB").resize((32, 32), Image.BICUBIC)
        pixels = np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)
        steps.append({"images": {"content": pixels.reshape(-1).tolist(), "shape": [3, 32, 32]}})
    return {"data": steps}


@dataclass
class Row:
    protocol: str
    input: str
    batch: int
    concurrency: int
    infer_per_s: float | None = None
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    error: str | None = None


def run_one(
    binary: str,
    env: dict[str, str],
    url: str,
    protocol: str,
    model: str,
    data_file: Path,
    batch: int,
    concurrency: int,
    measurement_ms: int,
    stability: int,
    timeout: float,
) -> Row:
    row = Row(protocol, data_file.stem, batch, concurrency)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.csv"
        argv = [
            binary,
            "-m", model,
            "-u", url,
            "-i", protocol,
            "--input-data", str(data_file),
            "-b", str(batch),
            "--concurrency-range", f"{concurrency}:{concurrency}",
            "-p", str(measurement_ms),
            "-s", str(stability),
            "-r", "20",
            "-f", str(report),
        ]  # fmt: skip
        try:
            r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            row.error = f"no result within {timeout:.0f} s"
            return row
        if r.returncode != 0 or not report.is_file():
            lines = [ln.strip() for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
            errors = [ln for ln in lines if "error" in ln.lower() or "failed" in ln.lower()]
            row.error = (errors or lines or [f"exit status {r.returncode}"])[-1][:200]
            return row
        (record,) = list(csv.DictReader(report.open()))
    row.infer_per_s = float(record["Inferences/Second"])
    row.p50_ms, row.p95_ms, row.p99_ms = (
        float(record[f"p{p} latency"]) / 1000 for p in (50, 95, 99)
    )
    return row


def format_table(rows: list[Row]) -> str:
    head = "protocol  input        batch  concurrency  infer/s    p50 ms   p95 ms   p99 ms"
    lines = [head, "-" * len(head)]
    for r in rows:
        left = f"{r.protocol:<9} {r.input:<12} {r.batch:>5}  {r.concurrency:>11}"
        if r.error:
            lines.append(f"{left}  error: {r.error}")
        else:
            lines.append(
                f"{left}  {r.infer_per_s:>7.1f}  {r.p50_ms:>8.1f} {r.p95_ms:>8.1f} {r.p99_ms:>8.1f}"
            )
    return "\n".join(lines)


def check_loopback(url: str) -> None:
    host = url.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise SystemExit(f"{url}: only loopback targets (127.0.0.0/8, ::1, localhost) are accepted")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--http", default="127.0.0.1:8000", help="host:port of the REST server")
    ap.add_argument("--grpc", default="127.0.0.1:8001", help="host:port of the gRPC server")
    ap.add_argument("--model", default="seednet")
    ap.add_argument("--protocols", nargs="+", choices=["http", "grpc"], default=["http", "grpc"])
    ap.add_argument("--inputs", nargs="+", choices=["images"], default=["images"])
    ap.add_argument("--batch", type=int, default=1, help="images per request (perf_analyzer -b)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--measurement-ms", type=int, default=3000)
    ap.add_argument("--stability", type=int, default=50, help="perf_analyzer -s (percent)")
    ap.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of JPEGs")
    ap.add_argument("--count", type=int, default=64, help="images in the input data")
    ap.add_argument("--perf-analyzer", help="the perf_analyzer binary (default: on PATH/venv)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per run")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)

    urls = {"http": args.http, "grpc": args.grpc}
    for p in args.protocols:
        check_loopback(urls[p])
    try:
        binary, env = perf_analyzer_command(args.perf_analyzer)
    except PerfAnalyzerUnavailable as exc:
        print(f"perf_analyzer unavailable: {exc}", file=sys.stderr)
        return 2
    folder = args.images if args.images.is_absolute() else REPO_ROOT / args.images
    paths = sorted(folder.rglob("*.jpg"))[: args.count]
    if not paths:
        print(f"no JPEGs under {folder}", file=sys.stderr)
        return 2
    files = [p.read_bytes() for p in paths]

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data_files = {}
        for kind in args.inputs:
            data_files[kind] = Path(tmp) / f"{kind}.json"
            data_files[kind].write_text(json.dumps(input_data(files, kind)))
        for protocol in args.protocols:
            for kind in args.inputs:
                for c in args.concurrency:
                    row = run_one(
                        binary, env, urls[protocol], protocol, args.model, data_files[kind],
                        args.batch, c, args.measurement_ms, args.stability, args.timeout,
                    )  # fmt: skip
                    rows.append(row)
                    print(format_table([row]).splitlines()[-1], flush=True)
    print()
    print(format_table(rows))
    if args.json:
        doc = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": args.model,
            "rows": [asdict(r) for r in rows],
        }
        args.json.write_text(json.dumps(doc, indent=2))
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
