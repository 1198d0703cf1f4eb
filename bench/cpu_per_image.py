"""CPU time a running service spends per image, under load: the unit for sizing CPU pods.

    python bench/cpu_per_image.py --pid PID [--url http://127.0.0.1:8000]
                                  [--scenario single:64] [--scenario multi:4:16] [--duration 8]

For each scenario (``single:CONCURRENCY`` or ``multi:CONCURRENCY:IMAGES``) it reads the
server process's CPU time (user + system, all threads, from /proc/PID/stat) and the
service's ``seednet_images_processed_total`` from /metrics, drives the load with
bench/serve_bench.py (closed loop, real CIFAR-10 JPEGs), and reads both again. The ratio
is CPU-seconds per image, which other processes on the machine do not change much (a busy
shared host lowers the images/s a load test sees, not the CPU the server spends on each
image), so replicas with ``c`` dedicated CPUs serve about ``c / cpu_s_per_image`` images/s
if the work spreads over the CPUs (the model runtime's threads, the decode threads and the
event loop). The load generator's own CPU is not counted.

Only loopback targets are accepted (it is a tool for one's own service).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

REPO = Path(__file__).resolve().parents[1]
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """user + system CPU time of the process and all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (fields 14, 15)


def images_processed(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    for line in text.splitlines():
        if line.startswith("seednet_images_processed_total"):
            return float(line.split()[-1])
    raise RuntimeError("seednet_images_processed_total not on /metrics")


def run(url: str, pid: int, scenario: str, duration: float) -> dict:
    kind, concurrency, *rest = scenario.split(":")
    args = ["--kinds", kind, "--concurrency", concurrency]
    if kind == "multi":
        args += ["--multi-images", rest[0] if rest else "16"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        cpu0, img0, t0 = cpu_seconds(pid), images_processed(url), time.monotonic()
        subprocess.run(
            [sys.executable, str(REPO / "bench" / "serve_bench.py"), "--url", url,
             "--duration", str(duration), "--warmup", "1", "--json", str(out), *args],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        cpu1, img1, t1 = cpu_seconds(pid), images_processed(url), time.monotonic()
        (row,) = json.loads(out.read_text())["rows"]
    images = img1 - img0
    return {
        "scenario": scenario,
        "images": int(images),
        "wall_s": round(t1 - t0, 1),
        "server_cpu_s": round(cpu1 - cpu0, 2),
        "cpu_ms_per_image": round(1000 * (cpu1 - cpu0) / images, 2) if images else None,
        "seen_img_s": row["images_per_s"],
        "p50_ms": row["p50_ms"],
        "p99_ms": row["p99_ms"],
        "errors": row["errors"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--pid", type=int, required=True, help="the server process")
    parser.add_argument("--scenario", action="append", default=None)
    parser.add_argument("--duration", type=float, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if urlsplit(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        parser.error("only loopback targets")
    rows = [run(args.url, args.pid, s, args.duration) for s in args.scenario or ["single:64"]]
    cols = list(rows[0])
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
