"""What explanations cost a running service: time per explanation over HTTP, and
/predict's throughput with and without explanation traffic beside it.

    python bench/explain_serving.py [--model seednet] [--backend auto] [--duration 20]
                                    [--concurrency 4] [--explain-clients 2] [--explains 20]

Starts the service as a user does (``python -m service`` from this checkout, on a free
loopback port, ``SEEDNET_EXPLAIN=on``, the registry in ``models/``, CPU), waits until it
is ready and its explanation worker has built the explainer, then runs three phases:

1. **explain latency**: ``--explains`` requests one after another, one real CIFAR-10 test
   image each, as the /attention page asks (all blocks and macro blocks, PNG maps, the
   strength maps per branch), then as many asking for block 7 only; median, 90th
   percentile and fastest, client side (upload, decode, queue, worker, encoding, JSON);
2. **/predict alone**: ``--concurrency`` closed-loop clients send one JPEG per request
   for ``--duration`` seconds: requests per second, p50 / p99 latency, errors;
3. **/predict with explanations**: the same, while ``--explain-clients`` closed-loop
   clients send explanation requests as fast as they are answered; /predict's figures
   again, and how many explanations were answered, refused (429) or timed out (503).

The load generator runs on the same host (its CPU time counts against the service's),
so the figures compare the phases with each other; they are not the host's capacity.
Prints a table with the host (lscpu's model name, CPUs, load average) and the date.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import httpx
from hostinfo import cpu_model, free_port  # (bench/ is on the path when run as a script)

REPO = Path(__file__).resolve().parents[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def start_service(args: argparse.Namespace, port: int) -> subprocess.Popen:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SEEDNET_")},
        "SEEDNET_REGISTRY_ROOT": str(args.registry),
        "SEEDNET_MODEL_NAME": args.model,
        "SEEDNET_BACKEND": args.backend,
        "SEEDNET_DEVICE": "cpu",
        "SEEDNET_PORT": str(port),
        "SEEDNET_EXPLAIN": "on",
        "SEEDNET_ACCESS_LOG": "false",
        "SEEDNET_LOG_LEVEL": "warning",
    }
    return subprocess.Popen([sys.executable, "-m", "service"], cwd=REPO, env=env)


def peak_rss_mib(pid: int) -> float:
    """A process's peak resident memory (VmHWM), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker_pids(pid: int) -> list[int]:
    """The service's explanation worker: its spawned child that runs the pool's loop."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
            if b"spawn_main" in cmdline:
                found.append(int(child))
    return found


def wait_ready(url: str, image: bytes, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the service exited with {proc.returncode}")
        try:
            r = httpx.post(f"{url}/explain", files={"file": ("a.jpg", image)}, timeout=60)
            if r.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("the service or its explanation worker did not become ready")


async def explain_latency(url: str, images: list[bytes], n: int, params: dict) -> list[float]:
    times = []
    async with httpx.AsyncClient(timeout=120) as client:
        for i in range(n):
            t0 = time.perf_counter()
            r = await client.post(
                f"{url}/explain", params=params, files={"file": ("a.jpg", images[i % len(images)])}
            )
            r.raise_for_status()
            times.append(time.perf_counter() - t0)
    return times


async def load(
    url: str, images: list[bytes], duration: float, concurrency: int, explainers: int
) -> dict:
    predict_ok: list[float] = []
    predict_bad: Counter = Counter()
    explained: Counter = Counter()
    explain_ok: list[float] = []
    stop = time.monotonic() + duration

    async def predict_loop(client: httpx.AsyncClient, k: int) -> None:
        i = k
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            try:
                r = await client.post(
                    f"{url}/predict", files={"file": ("a.jpg", images[i % len(images)])}
                )
                if r.status_code == 200:
                    predict_ok.append(time.perf_counter() - t0)
                else:
                    predict_bad[r.status_code] += 1
            except httpx.HTTPError as exc:
                predict_bad[type(exc).__name__] += 1
            i += concurrency

    async def explain_loop(client: httpx.AsyncClient, k: int) -> None:
        i = 1000 + k
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            r = await client.post(
                f"{url}/explain",
                params={"branch_maps": "strength"},
                files={"file": ("a.jpg", images[i % len(images)])},
            )
            explained[r.status_code] += 1
            if r.status_code == 200:
                explain_ok.append(time.perf_counter() - t0)
            elif r.status_code in (429, 503):
                await asyncio.sleep(float(r.headers.get("retry-after", "1")))
            i += explainers

    limits = httpx.Limits(max_connections=concurrency + explainers + 2)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        t0 = time.monotonic()
        await asyncio.gather(
            *(predict_loop(client, k) for k in range(concurrency)),
            *(explain_loop(client, k) for k in range(explainers)),
        )
        elapsed = time.monotonic() - t0
    return {
        "predict_rps": len(predict_ok) / elapsed,
        "predict_p50": percentile(predict_ok, 0.5) if predict_ok else float("nan"),
        "predict_p99": percentile(predict_ok, 0.99) if predict_ok else float("nan"),
        "predict_errors": dict(predict_bad),
        "explained": dict(explained),
        "explain_p50": percentile(explain_ok, 0.5) if explain_ok else float("nan"),
        "elapsed": elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", type=Path, default=REPO / "models")
    parser.add_argument("--model", default="seednet")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "cifar10")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--explain-clients", type=int, default=2)
    parser.add_argument("--explains", type=int, default=20)
    args = parser.parse_args()

    files = sorted((args.data / "test").rglob("*.jpg"))[::97][:64]
    images = [f.read_bytes() for f in files]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    started = datetime.now(timezone.utc)
    load_before = os.getloadavg()
    proc = start_service(args, port)
    try:
        wait_ready(url, images[0], proc)
        info = httpx.get(f"{url}/health/ready").json()["model"]
        page = asyncio.run(explain_latency(url, images, args.explains, {"branch_maps": "strength"}))
        block7 = asyncio.run(
            explain_latency(url, images, args.explains, {"blocks": "7", "macro": "false"})
        )
        alone = asyncio.run(load(url, images, args.duration, args.concurrency, 0))
        beside = asyncio.run(
            load(url, images, args.duration, args.concurrency, args.explain_clients)
        )
        memory = {"service": peak_rss_mib(proc.pid)}
        for child in worker_pids(proc.pid):
            memory["explanation worker"] = peak_rss_mib(child)
    finally:
        proc.terminate()
        proc.wait(60)
    load_after = os.getloadavg()

    print(
        f"\n{info['name']}@{info['version']}, /predict on {info['backend']}/{info['device']}; "
        f"explanations: eager, 1 thread, nice 10, own process"
    )
    print(
        f"host: {cpu_model()}, {os.cpu_count()} CPUs; {started:%Y-%m-%d %H:%M} UTC; "
        f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after"
    )
    print(
        "peak resident memory: "
        + ", ".join(f"{name} {mib:.0f} MiB" for name, mib in memory.items())
    )
    print("\nexplanation over HTTP (1 image)            median ms    p90 ms  fastest ms")
    for name, times in (
        ("all blocks + macro blocks, PNG (the page)", page),
        ("block 7 only", block7),
    ):
        ms = [t * 1000 for t in times]
        print(
            f"{name:<42} {statistics.median(ms):>9.0f} {percentile(ms, 0.9):>9.0f} {min(ms):>11.0f}"
        )
    print(
        f"\n/predict, {args.concurrency} clients, {args.duration:g} s   req/s   p50 ms   p99 ms"
        "  errors   explanations: 200 / 429 / 503, p50 ms"
    )
    for name, r in (
        ("alone", alone),
        (f"beside {args.explain_clients} explain clients", beside),
    ):
        ex = r["explained"]
        explains = (
            f"{ex.get(200, 0)} / {ex.get(429, 0)} / {ex.get(503, 0)}, {r['explain_p50'] * 1000:.0f}"
            if ex
            else "-"
        )
        print(
            f"{name:<33} {r['predict_rps']:>6.1f} {r['predict_p50'] * 1000:>8.1f} "
            f"{r['predict_p99'] * 1000:>8.1f} {sum(r['predict_errors'].values()):>7}   {explains}"
        )


if __name__ == "__main__":
    main()
